//! The data model: environments, leases, statuses and policies (spec 00 §2).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::time::{self, Timestamp};

/// A JSON object, the shape of configs and metadata.
pub type JsonObject = Map<String, Value>;

macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name { $( $(#[$vmeta])* $variant ),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text of this value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::Error::Contract(format!(concat!("Unexpected ", $kind, " value: {}"), other))),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_enum!(
    /// Whether an environment may be leased.
    EnvironmentStatus, "environment status" {
        /// May be leased.
        Active => "active",
        /// Kept for history; cannot be leased.
        Archived => "archived",
    }
);

string_enum!(
    /// Lifecycle state of a lease row (spec 00 §2.5).
    LeaseStatus, "environment lease status" {
        /// In use.
        Active => "active",
        /// Released normally.
        Released => "released",
        /// Released because it expired.
        Expired => "expired",
        /// Released after a run failure.
        Failed => "failed",
        /// Kept after a failure (policy `retain_on_failure`).
        Retained => "retained",
        /// Released, but the provider resource still needs tearing down.
        PendingCleanup => "pending_cleanup",
    }
);

string_enum!(
    /// What happens to the provider resource on release (spec 00 §2.6).
    LeasePolicy, "environment lease policy" {
        /// Torn down on release.
        Ephemeral => "ephemeral",
        /// Kept for the next run of the same environment.
        ReuseByEnvironment => "reuse_by_environment",
        /// Declared by Paperclip, unused.
        ReuseByExecutionWorkspace => "reuse_by_execution_workspace",
        /// A failed release becomes `retained`.
        RetainOnFailure => "retain_on_failure",
    }
);

string_enum!(
    /// Outcome of the provider cleanup done on release (spec 00 §2.7).
    CleanupStatus, "environment lease cleanup status" {
        /// Not yet attempted.
        Pending => "pending",
        /// The provider confirmed cleanup.
        Success => "success",
        /// Cleanup failed; the resource may still exist.
        Failed => "failed",
    }
);

impl LeaseStatus {
    /// Whether a release may move a lease to this status.
    pub fn is_release_status(self) -> bool {
        !matches!(self, LeaseStatus::Active)
    }
}

/// The driver keys Paperclip defines. Custom drivers may use any other key.
pub mod driver_keys {
    /// Runs on the host itself.
    pub const LOCAL: &str = "local";
    /// Runs on an SSH host.
    pub const SSH: &str = "ssh";
    /// Runs in a sandbox provider's resource.
    pub const SANDBOX: &str = "sandbox";
    /// Runs through an out-of-process plugin driver.
    pub const PLUGIN: &str = "plugin";
}

fn default_driver() -> String {
    driver_keys::LOCAL.to_owned()
}

fn default_status() -> EnvironmentStatus {
    EnvironmentStatus::Active
}

fn default_config() -> Value {
    Value::Object(Map::new())
}

/// Saved configuration of a place where runs execute (spec 00 §2.2).
///
/// `Debug` redacts every string at a key that names a credential (`apiKey`,
/// `token`, `password`, `kubeconfig`, `privateKey`, …) in `config` and
/// `metadata`, so a config given with a plaintext secret never reaches a log
/// through `{:?}`:
///
/// ```
/// use paperclip_env_core::Environment;
/// let env = Environment::new("env-1", "E2B", "sandbox", serde_json::json!({"provider": "e2b", "apiKey": "e2b_live_123"}));
/// let shown = format!("{env:?}");
/// assert!(!shown.contains("e2b_live_123") && shown.contains("[redacted]"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Environment {
    /// Identifier (a UUID in Paperclip).
    pub id: String,
    /// Owning company (absent in later Paperclip revisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<String>,
    /// Display name, used in error messages.
    pub name: String,
    /// Free-form description.
    #[serde(default)]
    pub description: Option<String>,
    /// Driver key (`local`, `ssh`, `sandbox`, `plugin`, or a custom one).
    #[serde(default = "default_driver")]
    pub driver: String,
    /// Only `active` environments may be leased.
    #[serde(default = "default_status")]
    pub status: EnvironmentStatus,
    /// Driver config (spec 00 §3); secret fields hold secret ids, never plaintext.
    #[serde(default = "default_config")]
    pub config: Value,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Creation time.
    #[serde(with = "time::iso", default = "time::now")]
    pub created_at: Timestamp,
    /// Last update time.
    #[serde(with = "time::iso", default = "time::now")]
    pub updated_at: Timestamp,
}

/// Key fragments (lower case, `_`/`-` removed) that mark a credential.
const CREDENTIAL_KEY_PARTS: [&str; 10] = [
    "apikey",
    "token",
    "secret",
    "password",
    "passphrase",
    "credential",
    "kubeconfig",
    "privatekey",
    "accesskey",
    "authorization",
];

/// Whether a config key names a credential.
pub(crate) fn is_credential_key(key: &str) -> bool {
    let folded: String = key
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    CREDENTIAL_KEY_PARTS
        .iter()
        .any(|part| folded.contains(part))
}

/// `value` with every string under a credential key replaced by
/// `"[redacted]"` (secret ids, which are not secret, are kept).
pub(crate) fn redact_credentials(value: &Value) -> Value {
    fn walk(value: &Value, under_credential: bool) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), walk(v, under_credential || is_credential_key(k))))
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| walk(v, under_credential)).collect())
            }
            Value::String(s) if under_credential && !crate::secret::is_secret_id(s) => {
                Value::String("[redacted]".into())
            }
            other => other.clone(),
        }
    }
    walk(value, false)
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Environment")
            .field("id", &self.id)
            .field("company_id", &self.company_id)
            .field("name", &self.name)
            .field("description", &self.description)
            .field("driver", &self.driver)
            .field("status", &self.status)
            .field("config", &redact_credentials(&self.config))
            .field("metadata", &self.metadata.as_ref().map(redact_credentials))
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

impl Environment {
    /// A new active environment with the given driver and config.
    ///
    /// ```
    /// use paperclip_env_core::Environment;
    /// let env = Environment::new("env-1", "Sandbox", "sandbox", serde_json::json!({"provider": "fake"}));
    /// assert_eq!(env.driver, "sandbox");
    /// ```
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        driver: impl Into<String>,
        config: Value,
    ) -> Self {
        let now = time::now();
        Environment {
            id: id.into(),
            company_id: None,
            name: name.into(),
            description: None,
            driver: driver.into(),
            status: EnvironmentStatus::Active,
            config,
            metadata: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Sets the owning company.
    pub fn with_company(mut self, company_id: impl Into<String>) -> Self {
        self.company_id = Some(company_id.into());
        self
    }

    /// The config as an object (an absent or non-object config reads as `{}`).
    pub fn config_object(&self) -> JsonObject {
        match &self.config {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        }
    }
}

/// One use of an environment by one run (spec 00 §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentLease {
    /// Identifier (UUID).
    pub id: String,
    /// Owning company.
    #[serde(default)]
    pub company_id: Option<String>,
    /// The environment leased.
    pub environment_id: String,
    /// The run's persisted execution workspace.
    #[serde(default)]
    pub execution_workspace_id: Option<String>,
    /// The issue being worked on.
    #[serde(default)]
    pub issue_id: Option<String>,
    /// Owning run; `None` for ad-hoc (probe / Test) leases.
    #[serde(default)]
    pub heartbeat_run_id: Option<String>,
    /// Lifecycle state.
    pub status: LeaseStatus,
    /// Reuse / teardown policy.
    pub lease_policy: LeasePolicy,
    /// `local`, `ssh`, a sandbox provider key, or `plugin:<pluginKey>:<driverKey>`.
    #[serde(default)]
    pub provider: Option<String>,
    /// The provider's handle for the resource.
    #[serde(default)]
    pub provider_lease_id: Option<String>,
    /// When acquired.
    #[serde(with = "time::iso")]
    pub acquired_at: Timestamp,
    /// Touched by release and metadata updates.
    #[serde(with = "time::iso")]
    pub last_used_at: Timestamp,
    /// Provider lifetime end, when known.
    #[serde(with = "time::iso_opt", default)]
    pub expires_at: Option<Timestamp>,
    /// Set on every release except `retained`.
    #[serde(with = "time::iso_opt", default)]
    pub released_at: Option<Timestamp>,
    /// Why the lease failed (spec 00 §2.8).
    #[serde(default)]
    pub failure_reason: Option<String>,
    /// Outcome of provider cleanup (sandbox driver only).
    #[serde(default)]
    pub cleanup_status: Option<CleanupStatus>,
    /// Everything needed to act on the lease later (spec 00 §2.9).
    #[serde(default)]
    pub metadata: Option<JsonObject>,
    /// Provider cleanup attempts made so far (SDK extension; absent in Paperclip rows).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cleanup_attempts: u32,
    /// Last provider cleanup error (SDK extension; never contains a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_error: Option<String>,
    /// Row creation time.
    #[serde(with = "time::iso")]
    pub created_at: Timestamp,
    /// Row update time.
    #[serde(with = "time::iso")]
    pub updated_at: Timestamp,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl EnvironmentLease {
    /// Reads a string metadata key.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }

    /// The driver that owns this lease: `metadata.driver` when it is a string,
    /// else the environment's driver (spec 00 §6.2).
    pub fn driver_key<'a>(&'a self, environment: &'a Environment) -> &'a str {
        self.metadata_str("driver").unwrap_or(&environment.driver)
    }

    /// The working directory recorded at acquire (`metadata.remoteCwd`), trimmed, if non-empty.
    pub fn remote_cwd(&self) -> Option<&str> {
        self.metadata_str("remoteCwd")
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

/// The run's execution workspace, as far as leasing cares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionWorkspaceRef {
    /// Workspace id.
    pub id: Option<String>,
    /// Opaque mode string (e.g. `shared_workspace`, `isolated_workspace`).
    pub mode: Option<String>,
}

/// `{executionWorkspaceId, executionWorkspaceMode}` (spec 00 §2.10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseContext {
    /// The run's execution workspace id.
    pub execution_workspace_id: Option<String>,
    /// The run's execution workspace mode.
    pub execution_workspace_mode: Option<String>,
}

impl LeaseContext {
    /// Context of a run's persisted execution workspace (`None` → both null).
    pub fn from_workspace(workspace: Option<&ExecutionWorkspaceRef>) -> Self {
        LeaseContext {
            execution_workspace_id: workspace.and_then(|w| w.id.clone()),
            execution_workspace_mode: workspace.and_then(|w| w.mode.clone()),
        }
    }

    /// Context rebuilt from a lease (used for released leases).
    pub fn from_lease(lease: &EnvironmentLease) -> Self {
        LeaseContext {
            execution_workspace_id: lease.execution_workspace_id.clone(),
            execution_workspace_mode: lease
                .metadata_str("executionWorkspaceMode")
                .map(str::to_owned),
        }
    }
}

/// What the runtime returns for a lease: `{environment, lease, leaseContext}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The environment the lease belongs to.
    pub environment: Environment,
    /// The lease row.
    pub lease: EnvironmentLease,
    /// The run's workspace context.
    pub lease_context: LeaseContext,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enums_use_paperclip_strings() {
        assert_eq!(
            serde_json::to_value(LeaseStatus::PendingCleanup).unwrap(),
            json!("pending_cleanup")
        );
        assert_eq!(
            serde_json::to_value(LeasePolicy::ReuseByEnvironment).unwrap(),
            json!("reuse_by_environment")
        );
        let err = serde_json::from_value::<LeaseStatus>(json!("zombie")).unwrap_err();
        assert!(
            err.to_string()
                .contains("Unexpected environment lease status value: zombie")
        );
        for s in LeaseStatus::ALL {
            assert_eq!(s.as_str().parse::<LeaseStatus>().unwrap(), *s);
        }
    }

    #[test]
    fn paperclip_lease_json_round_trips() {
        let raw = json!({"id":"2a7c…","companyId":"c1","environmentId":"e1","executionWorkspaceId":null,
            "issueId":null,"heartbeatRunId":"run-1","status":"active","leasePolicy":"ephemeral",
            "provider":"fake-plugin","providerLeaseId":"fake-plugin://run-1/abc",
            "acquiredAt":"2026-05-11T10:00:00.000Z","lastUsedAt":"2026-05-11T10:00:00.000Z","expiresAt":null,"releasedAt":null,
            "failureReason":null,"cleanupStatus":null,"metadata":{"driver":"sandbox"},
            "createdAt":"2026-05-11T10:00:00.000Z","updatedAt":"2026-05-11T10:00:01.500Z"});
        let lease: EnvironmentLease = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(lease.metadata_str("driver"), Some("sandbox"));
        assert_eq!(serde_json::to_value(&lease).unwrap(), raw);
    }
}
