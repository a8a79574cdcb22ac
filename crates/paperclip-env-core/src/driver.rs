//! The runtime driver contract (spec 00 §5).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::config::{ConfigShape, DriverConfig};
use crate::execute::{CommandExit, ExecuteRequest, OutputCollector};
use crate::lease::{Environment, EnvironmentLease, LeaseContext, LeaseStatus};
use crate::probe::ProbeResult;
use crate::provider::ProviderLease;
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use crate::secret::SecretResolver;
use crate::store::LeaseStore;
use crate::{Error, Operation, Result};

/// Tunables of the runtime, with the contract's defaults (spec 00 §9, §5.4.2).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Deadline of provider calls with no budget in config or request (30 s).
    pub default_call_deadline: Duration,
    /// Added to a command or config budget to get the call deadline (30 s).
    pub deadline_grace: Duration,
    /// Deadline of probes (120 s; providers may cold-start).
    pub probe_deadline: Duration,
    /// How long acquire waits for a provider whose worker is starting (5 s).
    pub provider_ready_timeout: Duration,
    /// Poll interval of that wait (100 ms).
    pub provider_ready_poll: Duration,
    /// The reaper's own bound on `sandbox` and `plugin` leases (default
    /// [`DEFAULT_MAX_LEASE_LIFETIME`], 24 h; `None`: no bound): an active
    /// lease acquired longer ago is released as `expired`, so no sandbox
    /// bills forever. It is never written as `expiresAt`: like Paperclip
    /// 2026.916, a lease stores an expiry only when its provider confirmed
    /// one (spec 00 had the SDK synthesize it; issue #22 wins).
    pub max_lease_lifetime: Option<Duration>,
    /// How often an acquisition in flight touches its row (10 s). The reaper
    /// treats a row silent for three beats as left by a dead process and
    /// sweeps the provider for what it may have created.
    pub acquisition_heartbeat: Duration,
}

/// Default lifetime of a lease whose provider reports no expiry: 24 hours,
/// longer than any agent run we know of, short enough that a leaked sandbox
/// costs one day at most once a reaper runs.
pub const DEFAULT_MAX_LEASE_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            default_call_deadline: Duration::from_secs(30),
            deadline_grace: Duration::from_secs(30),
            probe_deadline: Duration::from_secs(120),
            provider_ready_timeout: Duration::from_secs(5),
            provider_ready_poll: Duration::from_millis(100),
            max_lease_lifetime: Some(DEFAULT_MAX_LEASE_LIFETIME),
            acquisition_heartbeat: Duration::from_secs(10),
        }
    }
}

/// What the runtime hands every driver call.
#[derive(Clone)]
pub struct DriverContext {
    /// Where leases are recorded; every state change goes through it.
    pub store: Arc<dyn LeaseStore>,
    /// Resolves secret references at call time.
    pub secrets: Arc<dyn SecretResolver>,
    /// Tunables.
    pub options: RuntimeOptions,
}

impl std::fmt::Debug for DriverContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverContext")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Input of `acquire_run_lease`.
#[derive(Debug, Clone)]
pub struct AcquireInput<'a> {
    /// The environment to lease (must be active).
    pub environment: &'a Environment,
    /// Owning company.
    pub company_id: Option<String>,
    /// The issue, if any.
    pub issue_id: Option<String>,
    /// The run; `None` for ad-hoc leases (never reused, always ephemeral).
    pub heartbeat_run_id: Option<String>,
    /// The run's execution workspace.
    pub lease_context: LeaseContext,
    /// What else the run asks for (agent, adapter, requested cwd and expiry).
    pub details: crate::provider::AcquireDetails,
}

/// Why a config is being normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigPurpose {
    /// For a probe of an unsaved config: plaintext secrets accepted and kept.
    Probe,
    /// For saving: plaintext secrets become stored secrets.
    Persistence,
}

/// A runtime driver: `local`, `ssh`, `sandbox`, `plugin` or your own.
///
/// Object safe; registered in the runtime as `Arc<dyn EnvironmentRuntimeDriver>`.
/// Only `key`, `acquire_run_lease` and `release_run_lease` are required; the
/// other operations answer `Environment driver "<key>" does not support …`.
#[async_trait]
pub trait EnvironmentRuntimeDriver: Send + Sync + 'static {
    /// The driver key environments name in `driver`.
    fn key(&self) -> &str;

    /// Acquires a lease and records it in the store.
    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
    ) -> Result<EnvironmentLease>;

    /// Releases a lease with `status` and records it; `None` if the row is gone.
    async fn release_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<EnvironmentLease>>;

    /// Re-attaches to the lease's resource without writing the store.
    async fn resume_run_lease(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
        _lease: &EnvironmentLease,
    ) -> Result<ProviderLease> {
        Err(Error::driver_unsupported(self.key(), Operation::Resume))
    }

    /// Tears the resource down regardless of policy and records it.
    async fn destroy_run_lease(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
        _lease: &EnvironmentLease,
    ) -> Result<Option<EnvironmentLease>> {
        Err(Error::driver_unsupported(self.key(), Operation::Destroy))
    }

    /// Prepares the working directory of the lease.
    async fn realize_workspace(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
        _lease: &EnvironmentLease,
        _workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        Err(Error::driver_unsupported(
            self.key(),
            Operation::RealizeWorkspace,
        ))
    }

    /// Runs a command in the lease, delivering output into `output`.
    async fn execute(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
        _lease: &EnvironmentLease,
        _request: &ExecuteRequest,
        _output: &OutputCollector,
    ) -> Result<CommandExit> {
        Err(Error::driver_unsupported(self.key(), Operation::Execute))
    }

    /// Tests the environment. Expected failures are `ok: false` results.
    async fn probe(&self, _ctx: &DriverContext, _environment: &Environment) -> Result<ProbeResult> {
        Err(Error::driver_unsupported(self.key(), Operation::Probe))
    }

    /// What workspace sync may use for this lease (spec 00 §13.4): the
    /// provider's capabilities and an optional native transport. Default:
    /// nothing known, so sync goes through `execute` with stdin.
    async fn workspace_access(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
        _lease: &EnvironmentLease,
    ) -> Result<crate::workspace::WorkspaceAccess> {
        Ok(crate::workspace::WorkspaceAccess::default())
    }

    /// Called by the runtime before an environment is stored or leased: the
    /// environment's config with every plaintext value at a secret field
    /// moved into `ctx.secrets` and replaced by its reference, or `None`
    /// when nothing needs moving. Plaintext must never be persisted, and
    /// later calls on a lease only see references (spec 00 §4); a driver
    /// whose secret resolver cannot create secrets refuses the config with
    /// an error naming the field. Default: `None` (no secret fields).
    async fn secure_config(
        &self,
        _ctx: &DriverContext,
        _environment: &Environment,
    ) -> Result<Option<Value>> {
        Ok(None)
    }

    /// Validates and normalizes a config of this driver.
    async fn normalize_config(
        &self,
        _ctx: &DriverContext,
        _environment_name: &str,
        config: &Value,
        purpose: ConfigPurpose,
    ) -> Result<Value> {
        let shape = match purpose {
            ConfigPurpose::Probe | ConfigPurpose::Persistence => ConfigShape::Input,
        };
        DriverConfig::parse(self.key(), config, shape).map(|c| c.to_json())
    }
}
