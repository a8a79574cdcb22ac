//! The data model: environments, leases, statuses and policies (spec 00 §2).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::env_vars::EnvVars;
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
    /// Variables applied to every command of a lease (Paperclip 2026.916
    /// `envVars`; see [`crate::env_vars`]). Absent reads as `{}`, and `{}` is
    /// written, as Paperclip's `env_vars` column is `NOT NULL DEFAULT '{}'`.
    #[serde(default, with = "crate::env_vars::serde_env_vars")]
    pub env_vars: EnvVars,
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
            .field("env_vars", &self.env_vars)
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
            env_vars: EnvVars::new(),
            metadata: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// A new active environment with a fresh UUID id, as Paperclip creates them.
    ///
    /// ```
    /// use paperclip_env_core::Environment;
    /// let env = Environment::create("Sandbox", "sandbox", serde_json::json!({}));
    /// assert!(uuid::Uuid::parse_str(&env.id).is_ok());
    /// ```
    pub fn create(name: impl Into<String>, driver: impl Into<String>, config: Value) -> Self {
        Environment::new(uuid::Uuid::new_v4().to_string(), name, driver, config)
    }

    /// Sets the variables applied to every command of its leases.
    pub fn with_env_vars(mut self, env_vars: EnvVars) -> Self {
        self.env_vars = env_vars;
        self
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
    /// The environment leased. `None` in a row whose environment was deleted
    /// while it was `pending_cleanup` (Paperclip 2026.916's foreign key is
    /// `on delete set null`, and an orphan recorded after a concurrent delete
    /// is written with a null reference); such a row still carries everything
    /// its teardown needs in `metadata`. Spec 00 §2.3 had it required; issue
    /// #22 wins.
    #[serde(default)]
    pub environment_id: Option<String>,
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
    /// Provider lifetime end, only when the provider confirmed one (Paperclip
    /// 2026.916 records only a provider-attested expiry; the host's own
    /// `max_lease_lifetime` is the reaper's bound, never a stored expiry).
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
    /// Row creation time.
    #[serde(with = "time::iso")]
    pub created_at: Timestamp,
    /// Row update time.
    #[serde(with = "time::iso")]
    pub updated_at: Timestamp,
}

/// Metadata key of the pending-cleanup sweep's attempt counter (Paperclip's
/// `PENDING_CLEANUP_ATTEMPTS_METADATA_KEY`). Replaces the SDK's former
/// top-level `cleanupAttempts` column, which Paperclip rows never had.
pub const PENDING_CLEANUP_ATTEMPTS_KEY: &str = "pendingCleanupRetryAttempts";
/// Metadata key set once a lease reached the sweep cap and was reported
/// (Paperclip's `PENDING_CLEANUP_CAP_WARNED_METADATA_KEY`).
pub const PENDING_CLEANUP_CAP_WARNED_KEY: &str = "pendingCleanupRetryCapWarned";
/// How many sweep attempts a `pending_cleanup` lease gets before it is left
/// for manual cleanup (Paperclip's `PENDING_CLEANUP_SWEEP_ATTEMPT_CAP`).
pub const PENDING_CLEANUP_ATTEMPT_CAP: u32 = 5;
/// Metadata key of the last provider cleanup error (an SDK extension inside
/// `metadata`, scrubbed of secrets; replaces the former top-level
/// `cleanupError`, which Paperclip rows never had). Cleared on success.
pub const LAST_CLEANUP_ERROR_KEY: &str = "lastCleanupError";
/// Metadata key of a provider-confirmed termination receipt
/// (`{schema: "paperclip.remote-termination.v1", …}`).
pub const REMOTE_TERMINATION_KEY: &str = "remoteExecutionTermination";

/// `failureReason` strings of Paperclip 2026.916 that the SDK writes.
pub mod failure_reasons {
    /// A release whose provider cleanup failed: the row becomes
    /// `pending_cleanup`, so the sweep retries the teardown (spec 00 left
    /// the row in its release status with `cleanupStatus: failed`; issue #22
    /// wins).
    pub const RELEASE_CLEANUP_FAILED: &str = "release_cleanup_failed";
    /// A resource created but never recorded on an `active` row, whose
    /// inline teardown failed: the row stays `pending_cleanup` for the sweep.
    pub const ACQUIRE_REJECTED_TEARDOWN_FAILED: &str = "acquire_rejected_teardown_failed";
    /// The same, but the inline teardown removed the resource.
    pub const ACQUIRE_REJECTED_TEARDOWN_SUCCEEDED: &str = "acquire_rejected_teardown_succeeded";
    /// Written by a sweep attempt on a `pending_cleanup` row.
    pub const PENDING_CLEANUP_RETRY: &str = "pending_cleanup_retry";
    /// A kept reusable lease destroyed because its recorded config (its
    /// fingerprint) no longer matches the environment's.
    pub const LEASE_FINGERPRINT_MISMATCH: &str = "lease_fingerprint_mismatch";
    /// A kept reusable lease whose resource the provider reported gone on
    /// resume; a fresh lease replaced it.
    pub const RESUME_FAILED: &str = "resume_failed";
    /// A lease released as `failed` (the run failed).
    pub const ADAPTER_OR_RUN_FAILURE: &str = "adapter_or_run_failure";
}

/// Schema tag of a termination receipt.
pub const REMOTE_TERMINATION_SCHEMA: &str = "paperclip.remote-termination.v1";

/// The termination receipt Paperclip 2026.916 stores in
/// `metadata.remoteExecutionTermination` once the provider confirmed that
/// the lease's resource is `stopped` or `destroyed`:
/// `{schema, companyId, runId, leaseId, provider, providerLeaseId, state,
/// confirmedAt}`. `None` (no receipt) for a lease without a run, a provider
/// lease id, or a non-local provider, as upstream binds a receipt only to
/// such a lease.
pub fn remote_termination_receipt(lease: &EnvironmentLease, state: &str) -> Option<Value> {
    let run = lease.heartbeat_run_id.as_deref()?;
    let provider = lease
        .provider
        .as_deref()
        .filter(|p| *p != driver_keys::LOCAL)?;
    let provider_lease_id = lease
        .provider_lease_id
        .as_deref()
        .filter(|p| !p.is_empty())?;
    if !matches!(state, "stopped" | "destroyed") {
        return None;
    }
    Some(serde_json::json!({
        "schema": REMOTE_TERMINATION_SCHEMA,
        "companyId": lease.company_id,
        "runId": run,
        "leaseId": lease.id,
        "provider": provider,
        "providerLeaseId": provider_lease_id,
        "state": state,
        "confirmedAt": time::to_iso(&time::now()),
    }))
}

/// The sweep attempt count stored in `metadata`, read as Paperclip reads it:
/// a non-number or negative value is 0, a fraction is floored, and the value
/// is clamped to [`PENDING_CLEANUP_ATTEMPT_CAP`].
pub fn read_cleanup_attempts(metadata: Option<&JsonObject>) -> u32 {
    let Some(value) = metadata
        .and_then(|m| m.get(PENDING_CLEANUP_ATTEMPTS_KEY))
        .and_then(Value::as_f64)
    else {
        return 0;
    };
    if !value.is_finite() || value <= 0.0 {
        return 0;
    }
    (value.floor().min(f64::from(PENDING_CLEANUP_ATTEMPT_CAP))) as u32
}

impl EnvironmentLease {
    /// Sweep attempts claimed so far (`metadata.pendingCleanupRetryAttempts`,
    /// clamped as Paperclip reads it).
    pub fn cleanup_attempts(&self) -> u32 {
        read_cleanup_attempts(self.metadata.as_ref())
    }

    /// The last provider cleanup error (`metadata.lastCleanupError`).
    pub fn cleanup_error(&self) -> Option<&str> {
        self.metadata_str(LAST_CLEANUP_ERROR_KEY)
    }

    /// The provider-confirmed termination receipt, if the last release
    /// recorded one (`metadata.remoteExecutionTermination`).
    pub fn termination_receipt(&self) -> Option<&Value> {
        self.metadata.as_ref()?.get(REMOTE_TERMINATION_KEY)
    }

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
