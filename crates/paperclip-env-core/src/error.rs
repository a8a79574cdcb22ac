//! The one error type at the SDK boundary.
//!
//! Providers and drivers keep their own private error types and convert into
//! [`Error`] when they return. Every variant renders a message a person can act
//! on; where the Paperclip contract fixes the wording (spec 00 §6.3, §5.4.2),
//! the message is quoted exactly.

use std::time::Duration;

use crate::config::ConfigIssue;

/// Boxed source error carried by several variants.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An operation of the driver or provider contract, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Config validation.
    ValidateConfig,
    /// Reachability / auth probe.
    Probe,
    /// Lease acquisition.
    Acquire,
    /// Lease resume.
    Resume,
    /// Lease release.
    Release,
    /// Lease destroy.
    Destroy,
    /// Workspace realization.
    RealizeWorkspace,
    /// Command execution.
    Execute,
    /// Workspace upload or download.
    WorkspaceSync,
    /// Lookup of the resources labelled with a run (orphan sweeps).
    ListRunResources,
}

impl Operation {
    /// The phrase the runtime uses in "does not support …" messages (spec 00 §6.3).
    pub fn support_phrase(self) -> &'static str {
        match self {
            Operation::ValidateConfig => "config validation",
            Operation::Probe => "probes",
            Operation::Acquire => "lease acquisition",
            Operation::Resume => "lease resume",
            Operation::Release => "lease release",
            Operation::Destroy => "lease destroy",
            Operation::RealizeWorkspace => "workspace realization",
            Operation::Execute => "command execution",
            Operation::WorkspaceSync => "workspace sync",
            Operation::ListRunResources => "lookup of resources by run",
        }
    }

    /// The plugin-protocol method name of this operation (spec 00 §10.2).
    pub fn method_name(self) -> &'static str {
        match self {
            Operation::ValidateConfig => "environmentValidateConfig",
            Operation::Probe => "environmentProbe",
            Operation::Acquire => "environmentAcquireLease",
            Operation::Resume => "environmentResumeLease",
            Operation::Release => "environmentReleaseLease",
            Operation::Destroy => "environmentDestroyLease",
            Operation::RealizeWorkspace => "environmentRealizeWorkspace",
            Operation::Execute => "environmentExecute",
            Operation::WorkspaceSync => "environmentSync",
            Operation::ListRunResources => "environmentListRunResources",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.method_name())
    }
}

/// Who refused an unsupported operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// A runtime driver (`local`, `ssh`, `sandbox`, `plugin`, …).
    Driver(String),
    /// A sandbox provider (`e2b`, `fake-plugin`, …).
    Provider(String),
    /// The sandbox driver's built-in providers (spec 00 §5.4.5).
    BuiltinSandboxExecute,
}

/// Why a remote host's key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostKeyProblem {
    /// No known-hosts entry matches the host (add one, or pin the key).
    UnknownHost,
    /// An entry matches the host but not the key it offered (possible attack).
    Mismatch,
    /// The offered key is marked `@revoked`.
    Revoked,
}

/// Every error the SDK returns.
///
/// Use [`Error::is_retryable`] to decide whether repeating the same call can
/// succeed; the SDK itself never repeats calls that are not idempotent
/// (sandbox creation, command execution).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config failed validation. `field` names the first offending field;
    /// `issues` lists every problem found.
    #[error("{message}")]
    InvalidConfig {
        /// Dot path of the first offending field (empty for the whole object).
        field: String,
        /// The first issue's message (the spec's wording).
        message: String,
        /// Every issue found, in order.
        issues: Vec<ConfigIssue>,
    },
    /// A request argument (not a stored config) is invalid.
    #[error("invalid {what}: {message}")]
    InvalidInput {
        /// What was invalid.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The thing addressed does not exist (lease gone, sandbox expired, …).
    #[error("{message}")]
    NotFound {
        /// Human-readable message.
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// Credentials missing or rejected.
    #[error("{message}")]
    Unauthenticated {
        /// Human-readable message; never contains the credential.
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// Credentials accepted, operation refused.
    #[error("{message}")]
    PermissionDenied {
        /// Human-readable message.
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The remote host's key failed verification; nothing was sent to it.
    #[error("{message}")]
    HostKeyRejected {
        /// The known-hosts lookup name (`host` or `[host]:port`).
        host: String,
        /// Why.
        problem: HostKeyProblem,
        /// Human-readable message (with the offered key's fingerprint).
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A deadline elapsed before the operation finished.
    #[error("{operation} timed out after {}ms", after.as_millis())]
    Timeout {
        /// What timed out (an operation or a call name).
        operation: String,
        /// The deadline that elapsed.
        after: Duration,
    },
    /// The remote side asked us to slow down.
    #[error("{message}")]
    RateLimited {
        /// Human-readable message.
        message: String,
        /// How long the remote side asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The driver or provider does not implement the operation.
    #[error("{}", unsupported_message(.by, *.operation))]
    NotSupported {
        /// The operation refused.
        operation: Operation,
        /// The driver or provider that refused it.
        by: Unsupported,
    },
    /// Acquire on an environment whose status is not `active`.
    #[error("Environment \"{name}\" is not active.")]
    EnvironmentInactive {
        /// The environment's name.
        name: String,
    },
    /// No driver is registered under the requested key.
    #[error("Environment driver \"{driver}\" is not registered in the environment runtime yet.")]
    DriverNotRegistered {
        /// The driver key.
        driver: String,
    },
    /// A sandbox provider is missing, not ready, or its worker is down
    /// (spec 00 §5.4.2). The message is the spec's.
    #[error("{message}")]
    ProviderUnavailable {
        /// The provider key.
        provider: String,
        /// The spec's message.
        message: String,
        /// `true` when waiting may help (a worker starting or restarting),
        /// `false` when it cannot (no such provider, a disabled plugin).
        retryable: bool,
    },
    /// Two writers raced for the same lease or resource.
    #[error("{message}")]
    Conflict {
        /// Human-readable message.
        message: String,
    },
    /// A provider or transport failed.
    #[error("{provider}: {message}")]
    Provider {
        /// Provider or driver key.
        provider: String,
        /// Human-readable message; never contains a secret.
        message: String,
        /// Whether repeating the call may succeed.
        retryable: bool,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The lease store failed.
    #[error("lease store: {message}")]
    Store {
        /// Human-readable message.
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A secret reference could not be resolved.
    #[error("{message}")]
    Secret {
        /// Human-readable message; names the secret id, never its value.
        message: String,
    },
    /// Releasing several leases failed for some of them; the report holds
    /// the successes too.
    #[error("{} lease release(s) failed: {}", .failures.len(), join_failures(.failures))]
    ReleaseFailed {
        /// `(lease id, error)` per failed lease.
        failures: Vec<(String, Error)>,
    },
    /// A contract rule was broken by a caller (e.g. an illegal status).
    #[error("{0}")]
    Contract(String),
    /// A workspace upload or download failed or was refused (spec 00 §13.4).
    #[error("{message}")]
    WorkspaceSync {
        /// What went wrong, for matching.
        kind: crate::workspace::SyncErrorKind,
        /// Human-readable message naming the path or step involved.
        message: String,
        /// Underlying cause.
        #[source]
        source: Option<BoxError>,
    },
}

fn unsupported_message(by: &Unsupported, op: Operation) -> String {
    match by {
        Unsupported::Driver(key) => {
            format!(
                "Environment driver \"{key}\" does not support {}.",
                op.support_phrase()
            )
        }
        Unsupported::Provider(key) => {
            format!(
                "Sandbox provider \"{key}\" does not support {}.",
                op.support_phrase()
            )
        }
        Unsupported::BuiltinSandboxExecute => {
            "Sandbox driver does not support direct command execution for built-in providers."
                .to_owned()
        }
    }
}

fn join_failures(failures: &[(String, Error)]) -> String {
    failures
        .iter()
        .map(|(id, e)| format!("{id}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Whether repeating the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            // A call that may have created something (a sandbox, a running
            // command) is not repeated blindly after a timeout.
            Error::Timeout { operation, .. } => !is_creating_operation(operation),
            Error::RateLimited { .. } | Error::Conflict { .. } => true,
            Error::Provider { retryable, .. } => *retryable,
            Error::ProviderUnavailable { retryable, .. } => *retryable,
            Error::Store { .. } => true,
            Error::ReleaseFailed { failures } => failures.iter().any(|(_, e)| e.is_retryable()),
            _ => false,
        }
    }

    /// How long the remote side asked to wait before a retry, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the error means "the resource is gone".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// A [`Error::NotSupported`] refused by a driver.
    pub fn driver_unsupported(driver: impl Into<String>, operation: Operation) -> Self {
        Error::NotSupported {
            operation,
            by: Unsupported::Driver(driver.into()),
        }
    }

    /// A [`Error::NotSupported`] refused by a provider.
    pub fn provider_unsupported(provider: impl Into<String>, operation: Operation) -> Self {
        Error::NotSupported {
            operation,
            by: Unsupported::Provider(provider.into()),
        }
    }

    /// A [`Error::NotFound`] with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::NotFound {
            message: message.into(),
            source: None,
        }
    }

    /// A non-retryable [`Error::Provider`].
    pub fn provider(provider: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Provider {
            provider: provider.into(),
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// A [`Error::Provider`] with a source and retryability.
    pub fn provider_with_source(
        provider: impl Into<String>,
        message: impl Into<String>,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Provider {
            provider: provider.into(),
            message: message.into(),
            retryable,
            source: Some(source.into()),
        }
    }

    /// A [`Error::Store`] with a message.
    pub fn store(message: impl Into<String>) -> Self {
        Error::Store {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::InvalidConfig`] from a list of issues (must be non-empty to be useful).
    pub fn invalid_config(issues: Vec<ConfigIssue>) -> Self {
        let (field, message) = issues
            .first()
            .map(|i| (i.field.clone(), i.message.clone()))
            .unwrap_or_else(|| (String::new(), "Invalid environment config.".to_owned()));
        Error::InvalidConfig {
            field,
            message,
            issues,
        }
    }

    /// An [`Error::InvalidConfig`] with one issue.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid_config(vec![ConfigIssue::new(field, message)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_messages_are_exact() {
        assert_eq!(
            Error::driver_unsupported("local", Operation::Resume).to_string(),
            "Environment driver \"local\" does not support lease resume."
        );
        assert_eq!(
            Error::driver_unsupported("x", Operation::Execute).to_string(),
            "Environment driver \"x\" does not support command execution."
        );
        assert_eq!(
            Error::driver_unsupported("x", Operation::RealizeWorkspace).to_string(),
            "Environment driver \"x\" does not support workspace realization."
        );
        assert_eq!(
            Error::driver_unsupported("x", Operation::Destroy).to_string(),
            "Environment driver \"x\" does not support lease destroy."
        );
        assert_eq!(
            Error::EnvironmentInactive {
                name: "Prod".into()
            }
            .to_string(),
            "Environment \"Prod\" is not active."
        );
        assert_eq!(
            Error::DriverNotRegistered {
                driver: "k8s".into()
            }
            .to_string(),
            "Environment driver \"k8s\" is not registered in the environment runtime yet."
        );
        assert_eq!(
            Error::NotSupported {
                operation: Operation::Execute,
                by: Unsupported::BuiltinSandboxExecute
            }
            .to_string(),
            "Sandbox driver does not support direct command execution for built-in providers."
        );
    }

    #[test]
    fn retryability() {
        assert!(
            Error::Timeout {
                operation: "x".into(),
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(
            Error::RateLimited {
                message: "slow".into(),
                retry_after: None
            }
            .is_retryable()
        );
        assert!(!Error::not_found("gone").is_retryable());
        assert!(!Error::invalid_field("host", "SSH environments require a host.").is_retryable());
        assert_eq!(
            Error::invalid_field("host", "SSH environments require a host.").to_string(),
            "SSH environments require a host."
        );
    }
}

/// Operations whose timeout leaves their effect unknown: acquiring (a
/// sandbox may exist) and executing (the command may be running).
fn is_creating_operation(operation: &str) -> bool {
    matches!(
        operation,
        "environmentAcquireLease" | "environmentExecute" | "acquire" | "execute"
    )
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn retryability_follows_idempotency() {
        let timeout = |op: &str| Error::Timeout {
            operation: op.into(),
            after: Duration::from_secs(1),
        };
        assert!(!timeout("environmentAcquireLease").is_retryable());
        assert!(!timeout("environmentExecute").is_retryable());
        assert!(timeout("environmentReleaseLease").is_retryable());
        assert!(timeout("environmentProbe").is_retryable());
        let unavailable = |retryable| Error::ProviderUnavailable {
            provider: "x".into(),
            message: "m".into(),
            retryable,
        };
        assert!(!unavailable(false).is_retryable());
        assert!(unavailable(true).is_retryable());
    }
}
