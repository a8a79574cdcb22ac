//! The sandbox provider contract (spec 00 §10): what a provider such as E2B,
//! Daytona or the testkit fake implements. The `sandbox` driver routes to
//! providers by `config.provider`, strips the envelope, resolves secrets,
//! composes lease metadata and applies per-call deadlines; a provider only
//! talks to its service.

pub mod support;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::ConfigIssue;
use crate::execute::{CommandExit, ExecuteRequest, OutputCollector};
use crate::lease::{JsonObject, LeaseStatus};
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use crate::secret::ProviderConfig;
use crate::time::{self, Timestamp};
use crate::{Error, Operation, Result};

/// What a provider can do. The runtime refuses undeclared operations with a
/// typed "not supported" error, and the conformance suite runs only the
/// checks a provider declares.
///
/// ```
/// use paperclip_env_core::Capabilities;
/// let caps = Capabilities { execute: true, streaming: true, ..Capabilities::default() };
/// assert!(caps.execute && !caps.resume);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Runs commands (`execute`).
    pub execute: bool,
    /// Prepares a working directory (`realize_workspace`).
    pub realize_workspace: bool,
    /// Re-attaches to a kept resource (`resume`).
    pub resume: bool,
    /// Tears a resource down regardless of reuse (`destroy`).
    pub destroy: bool,
    /// Answers probes.
    pub probe: bool,
    /// Keeps resources across runs when `reuseLease` is set.
    pub reusable_leases: bool,
    /// Reports a lease lifetime (`expires_at`).
    pub expires_at: bool,
    /// Extends the lifetime before long commands.
    pub lifetime_refresh: bool,
    /// Delivers output while the command runs (otherwise one chunk at exit).
    pub streaming: bool,
    /// Delivers `stdin`.
    pub stdin: bool,
    /// Runs more than one command per lease.
    pub multi_command_exec: bool,
    /// Moves workspace archives without going through `execute`.
    pub native_sync: bool,
    /// Reports the terminating signal of killed commands.
    pub signals: bool,
    /// Lists its resources by run label ([`SandboxProvider::list_run_resources`]),
    /// so the reaper can sweep acquisitions whose process died mid-create.
    pub run_lookup: bool,
}

impl Capabilities {
    /// Whether the capability gating `operation` is declared. Validation,
    /// acquire and release are always supported.
    pub fn supports(&self, operation: Operation) -> bool {
        match operation {
            Operation::Execute => self.execute,
            Operation::RealizeWorkspace => self.realize_workspace,
            Operation::Resume => self.resume,
            Operation::Destroy => self.destroy,
            Operation::Probe => self.probe,
            Operation::WorkspaceSync => self.native_sync,
            Operation::ListRunResources => self.run_lookup,
            Operation::ValidateConfig | Operation::Acquire | Operation::Release => true,
        }
    }
}

/// Whether a provider can take calls now (spec 00 §5.4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Ready.
    Ready,
    /// Installed but not usable; `status` says why (e.g. `"disabled"`, `"errored"`).
    NotReady {
        /// The provider's status.
        status: String,
    },
    /// Installed and ready but its worker is not running (yet); acquire waits.
    WorkerUnavailable,
}

/// Result of `validate_config` (`{ok, errors, warnings, normalizedConfig}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigValidation {
    /// Whether the config is usable.
    pub ok: bool,
    /// Problems, each naming its field.
    #[serde(default)]
    pub errors: Vec<ConfigIssue>,
    /// Non-fatal remarks.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The config with defaults filled in; the host stores exactly this.
    #[serde(default)]
    pub normalized_config: Option<JsonObject>,
}

impl ConfigValidation {
    /// A passing validation with a normalized config.
    pub fn valid(normalized: JsonObject) -> Self {
        ConfigValidation {
            ok: true,
            normalized_config: Some(normalized),
            ..Default::default()
        }
    }

    /// A failing validation.
    pub fn invalid(errors: Vec<ConfigIssue>) -> Self {
        ConfigValidation {
            ok: false,
            errors,
            ..Default::default()
        }
    }

    /// Turns an [`Error::InvalidConfig`] into a failing validation; other errors pass through.
    pub fn from_result(result: Result<JsonObject>) -> Result<Self> {
        match result {
            Ok(normalized) => Ok(Self::valid(normalized)),
            Err(Error::InvalidConfig { issues, .. }) => Ok(Self::invalid(issues)),
            Err(e) => Err(e),
        }
    }
}

/// Severity of a probe diagnostic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational.
    Info,
    /// Worth a look.
    Warning,
    /// Blocks use.
    Error,
}

/// One probe finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    /// Severity.
    pub severity: Severity,
    /// Message.
    pub message: String,
    /// Machine-readable code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Extra details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// A provider's probe answer. Expected failures (unreachable, bad credentials)
/// are `ok: false`, not errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderProbe {
    /// Whether the provider is usable with this config.
    pub ok: bool,
    /// One-line summary.
    #[serde(default)]
    pub summary: Option<String>,
    /// Findings.
    #[serde(default)]
    pub diagnostics: Vec<Diagnostic>,
    /// Provider-defined metadata.
    #[serde(default)]
    pub metadata: Option<JsonObject>,
}

/// A provider's handle for a resource, as acquire and resume return it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderLease {
    /// The resource's id; must be non-empty for every later call.
    pub provider_lease_id: Option<String>,
    /// Provider metadata (should include `remoteCwd`).
    #[serde(default)]
    pub metadata: Option<JsonObject>,
    /// Lifetime end, when the provider has one.
    #[serde(with = "time::iso_opt", default)]
    pub expires_at: Option<Timestamp>,
}

impl ProviderLease {
    /// A lease with an id and metadata.
    pub fn new(provider_lease_id: impl Into<String>, metadata: JsonObject) -> Self {
        ProviderLease {
            provider_lease_id: Some(provider_lease_id.into()),
            metadata: Some(metadata),
            expires_at: None,
        }
    }

    /// The id when it is a non-empty string.
    pub fn id(&self) -> Option<&str> {
        self.provider_lease_id
            .as_deref()
            .filter(|s| !s.trim().is_empty())
    }
}

/// What every provider call carries (plugin protocol base params).
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Owning company.
    pub company_id: Option<String>,
    /// The environment.
    pub environment_id: String,
    /// The issue, if any.
    pub issue_id: Option<String>,
    /// Provider config: envelope stripped, secrets resolved.
    pub config: ProviderConfig,
}

/// The lease a call is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseHandle {
    /// The provider's id (null for leases whose acquire returned none).
    pub provider_lease_id: Option<String>,
    /// The lease's metadata.
    #[serde(default)]
    pub metadata: Option<JsonObject>,
    /// Lifetime end.
    #[serde(with = "time::iso_opt", default)]
    pub expires_at: Option<Timestamp>,
}

impl LeaseHandle {
    /// The id when it is a non-empty string.
    pub fn id(&self) -> Option<&str> {
        self.provider_lease_id
            .as_deref()
            .filter(|s| !s.trim().is_empty())
    }

    /// A string metadata value.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }

    /// The working directory recorded at acquire (`metadata.remoteCwd`),
    /// trimmed, if non-empty.
    pub fn remote_cwd(&self) -> Option<&str> {
        self.metadata_str("remoteCwd")
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// The working directory realize should use (spec 11 A5.2): the lease's
    /// `remoteCwd`, else the workspace's `remotePath`, else its `localPath`;
    /// `None` leaves the provider default.
    ///
    /// ```
    /// use paperclip_env_core::{LeaseHandle, WorkspaceSpec};
    /// let lease = LeaseHandle::default();
    /// let ws = WorkspaceSpec { remote_path: Some("/srv/ws".into()), ..Default::default() };
    /// assert_eq!(lease.preferred_cwd(&ws).as_deref(), Some("/srv/ws"));
    /// ```
    pub fn preferred_cwd(&self, workspace: &crate::realize::WorkspaceSpec) -> Option<String> {
        self.remote_cwd()
            .map(str::to_owned)
            .or_else(|| workspace.remote_path.clone())
            .or_else(|| workspace.local_path.clone())
    }
}

/// Acquire parameters beyond the context.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcquireRequest {
    /// The run id (a random UUID for ad-hoc acquisitions); label resources with it.
    pub run_id: String,
    /// The run's execution workspace mode.
    pub workspace_mode: Option<String>,
    /// What else the run asks for (agent, adapter, requested cwd and expiry).
    pub details: AcquireDetails,
}

/// What a run asks of its lease beyond its ids, as Paperclip's host sends
/// it to plugin workers on `environmentAcquireLease` (`agentId`,
/// `executionWorkspaceId`, `adapterType`, `executionWorkspaceSettings`,
/// `requestedExpiresAt`, `requestedCwd`). Every field is optional; a
/// provider that cannot honour a requested expiry returns no `expiresAt`.
///
/// ```
/// use paperclip_env_core::AcquireDetails;
/// let d = AcquireDetails { agent_id: Some("agent-1".into()), ..AcquireDetails::default() };
/// assert_eq!(serde_json::to_value(&d).unwrap(), serde_json::json!({"agentId": "agent-1"}));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcquireDetails {
    /// The agent the run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The run's execution workspace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_workspace_id: Option<String>,
    /// The run's harness / adapter type (selects a runtime image per run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_type: Option<String>,
    /// The execution workspace's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_workspace_settings: Option<JsonObject>,
    /// The latest time the lease may stay active.
    #[serde(
        with = "time::iso_opt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub requested_expires_at: Option<Timestamp>,
    /// The working directory the run asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_cwd: Option<String>,
}

/// A sandbox provider. Object safe; used as `Arc<dyn SandboxProvider>`.
///
/// Only `key`, `capabilities`, `acquire` and `release` are required; every
/// other operation answers "not supported" until the provider implements it
/// and declares it in [`Capabilities`].
#[async_trait]
pub trait SandboxProvider: Send + Sync + 'static {
    /// The provider key matched against `config.provider` (e.g. `"e2b"`).
    fn key(&self) -> &str;

    /// What the provider can do.
    fn capabilities(&self) -> Capabilities;

    /// What the provider can do with one lease.
    ///
    /// Providers whose leases differ by a variant chosen per config answer
    /// from the lease's metadata (Kubernetes: a `job` lease cannot run
    /// commands, a `sandbox-cr` lease can); the runtime gates every
    /// operation on an existing lease with this. Defaults to
    /// [`SandboxProvider::capabilities`].
    fn lease_capabilities(&self, _lease: &LeaseHandle) -> Capabilities {
        self.capabilities()
    }

    /// How the runtime names the provider in errors about `lease`, e.g.
    /// `"kubernetes (job backend)"`. Defaults to [`SandboxProvider::key`].
    fn lease_label(&self, _lease: &LeaseHandle) -> String {
        self.key().to_owned()
    }

    /// Deadline the host puts on acquire / resume / release / realize when
    /// the config sets no budget (`timeoutMs`, `bridgeRequestTimeoutMs`).
    ///
    /// `None` (the default) keeps the host default (30 s). Providers whose
    /// lease operations legitimately take longer — image builds, cold starts,
    /// pod scheduling — declare their own bound here so the host does not cut
    /// them short; the host uses the larger of the two. A budget set in the
    /// config always wins.
    fn default_lease_deadline(&self) -> Option<std::time::Duration> {
        None
    }

    /// JSON Schema of the provider config; secret fields carry
    /// `"format": "secret-ref"`.
    fn config_schema(&self) -> Value {
        json!({"type": "object"})
    }

    /// The plugin key reported in messages and metadata.
    fn plugin_key(&self) -> String {
        format!("paperclip-env.{}", self.key())
    }

    /// Whether the provider can take calls now.
    async fn readiness(&self) -> Readiness {
        Readiness::Ready
    }

    /// Validates a config (envelope stripped, secrets as given by the user).
    /// Invalid input is `ok: false`, never an error.
    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        Ok(ConfigValidation::valid(config.clone()))
    }

    /// Checks reachability and credentials without leaving anything behind.
    async fn probe(&self, _ctx: &CallContext) -> Result<ProviderProbe> {
        Err(Error::provider_unsupported(self.key(), Operation::Probe))
    }

    /// Creates (or, with reuse, finds) a resource. Must clean up partial
    /// creation before returning an error.
    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease>;

    /// Re-attaches to a kept resource; an error or an empty id means "gone".
    async fn resume(&self, _ctx: &CallContext, _lease: &LeaseHandle) -> Result<ProviderLease> {
        Err(Error::provider_unsupported(self.key(), Operation::Resume))
    }

    /// Releases a resource: destroys it, or keeps it resumable when the config
    /// says `reuseLease: true`. Idempotent; a null id is a no-op.
    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> Result<()>;

    /// Destroys a resource regardless of reuse. Idempotent.
    async fn destroy(&self, _ctx: &CallContext, _lease: &LeaseHandle) -> Result<()> {
        Err(Error::provider_unsupported(self.key(), Operation::Destroy))
    }

    /// Prepares the working directory and returns it.
    async fn realize_workspace(
        &self,
        _ctx: &CallContext,
        _lease: &LeaseHandle,
        _workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        Err(Error::provider_unsupported(
            self.key(),
            Operation::RealizeWorkspace,
        ))
    }

    /// A transport that moves workspace archives in and out of `lease`
    /// without `execute` (declare [`Capabilities::native_sync`] too). `ctx`
    /// carries the resolved config, so the transport can authenticate.
    async fn workspace_transport(
        &self,
        _ctx: &CallContext,
        _lease: &LeaseHandle,
    ) -> Result<Option<std::sync::Arc<dyn crate::workspace::WorkspaceTransport>>> {
        Ok(None)
    }

    /// The live resources labelled with `run_id` (the [`AcquireRequest::run_id`]
    /// `acquire` labelled them with), as handles `destroy` accepts. The
    /// reaper calls it for an acquisition whose process died before the
    /// provider's answer was recorded, and destroys what no lease row
    /// records; declare [`Capabilities::run_lookup`] with it.
    async fn list_run_resources(
        &self,
        _ctx: &CallContext,
        _run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        Err(Error::provider_unsupported(
            self.key(),
            Operation::ListRunResources,
        ))
    }

    /// Runs a command, pushing output into `output` as it arrives.
    async fn execute(
        &self,
        _ctx: &CallContext,
        _lease: &LeaseHandle,
        _request: &ExecuteRequest,
        _output: &OutputCollector,
    ) -> Result<CommandExit> {
        Err(Error::provider_unsupported(self.key(), Operation::Execute))
    }
}
