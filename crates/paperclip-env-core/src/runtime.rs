//! The runtime service (spec 00 §6): a driver registry plus the operations
//! callers use. Later calls on a lease are routed by `lease.metadata.driver`,
//! not by the environment's current driver.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tracing::{Instrument, info_span, warn};

use crate::driver::{
    AcquireInput, ConfigPurpose, DriverContext, EnvironmentRuntimeDriver, RuntimeOptions,
};
use crate::drivers::{LocalDriver, SandboxDriver};
use crate::execute::{ExecuteRequest, ExecuteResult, OutputCollector, OutputSink};
use crate::lease::{
    Environment, EnvironmentLease, EnvironmentStatus, ExecutionWorkspaceRef, LeaseContext,
    LeaseRecord, LeaseStatus,
};
use crate::probe::ProbeResult;
use crate::provider::{AcquireDetails, ProviderLease, SandboxProvider};
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use crate::secret::{InMemorySecretResolver, SecretResolver};
use crate::store::{EnvironmentStore, InMemoryEnvironmentStore, InMemoryLeaseStore, LeaseStore};
use crate::{Error, Result};

/// Input of [`EnvironmentRuntime::acquire_run_lease`].
#[derive(Debug, Clone)]
pub struct AcquireRunLease {
    /// The environment to lease.
    pub environment: Environment,
    /// Owning company (defaults to the environment's).
    pub company_id: Option<String>,
    /// The issue worked on.
    pub issue_id: Option<String>,
    /// The run; `None` for ad-hoc leases (probes, "Test").
    pub heartbeat_run_id: Option<String>,
    /// The run's persisted execution workspace.
    pub execution_workspace: Option<ExecutionWorkspaceRef>,
    /// What else the run asks for: agent, adapter type, workspace settings,
    /// requested cwd and expiry (sent to plugin workers as upstream does).
    pub details: AcquireDetails,
}

impl AcquireRunLease {
    /// Acquire `environment` for `run_id`.
    pub fn for_run(environment: Environment, run_id: impl Into<String>) -> Self {
        AcquireRunLease {
            company_id: environment.company_id.clone(),
            environment,
            issue_id: None,
            heartbeat_run_id: Some(run_id.into()),
            execution_workspace: None,
            details: AcquireDetails::default(),
        }
    }

    /// An ad-hoc acquisition (no run): never reused, always ephemeral.
    pub fn ad_hoc(environment: Environment) -> Self {
        AcquireRunLease {
            company_id: environment.company_id.clone(),
            environment,
            issue_id: None,
            heartbeat_run_id: None,
            execution_workspace: None,
            details: AcquireDetails::default(),
        }
    }

    /// Sets the issue.
    pub fn issue(mut self, issue_id: impl Into<String>) -> Self {
        self.issue_id = Some(issue_id.into());
        self
    }

    /// Sets the execution workspace.
    pub fn execution_workspace(mut self, id: Option<String>, mode: Option<String>) -> Self {
        self.execution_workspace = Some(ExecutionWorkspaceRef { id, mode });
        self
    }

    /// Sets the agent the run belongs to.
    pub fn agent(mut self, agent_id: impl Into<String>) -> Self {
        self.details.agent_id = Some(agent_id.into());
        self
    }

    /// Sets the run's adapter (harness) type.
    pub fn adapter_type(mut self, adapter_type: impl Into<String>) -> Self {
        self.details.adapter_type = Some(adapter_type.into());
        self
    }

    /// Sets the working directory the run asks for.
    pub fn requested_cwd(mut self, cwd: impl Into<String>) -> Self {
        self.details.requested_cwd = Some(cwd.into());
        self
    }

    /// Sets the latest time the lease may stay active.
    pub fn requested_expires_at(mut self, at: crate::time::Timestamp) -> Self {
        self.details.requested_expires_at = Some(at);
        self
    }

    /// Sets the execution workspace's settings.
    pub fn execution_workspace_settings(mut self, settings: crate::lease::JsonObject) -> Self {
        self.details.execution_workspace_settings = Some(settings);
        self
    }
}

/// What [`EnvironmentRuntime::release_run_leases`] did: every lease it
/// released and every one it could not (it does not stop at the first error).
#[derive(Debug, Default)]
pub struct ReleaseReport {
    /// Released leases.
    pub released: Vec<LeaseRecord>,
    /// `(lease id, error)` per lease that failed.
    pub failures: Vec<(String, Error)>,
    /// Leases skipped because their environment no longer exists (they stay active).
    pub skipped: Vec<String>,
}

impl ReleaseReport {
    /// The released records, or [`Error::ReleaseFailed`] if any lease failed.
    pub fn into_result(self) -> Result<Vec<LeaseRecord>> {
        if self.failures.is_empty() {
            Ok(self.released)
        } else {
            Err(Error::ReleaseFailed {
                failures: self.failures,
            })
        }
    }
}

/// Builds an [`EnvironmentRuntime`].
pub struct RuntimeBuilder {
    store: Option<Arc<dyn LeaseStore>>,
    environments: Option<Arc<dyn EnvironmentStore>>,
    secrets: Option<Arc<dyn SecretResolver>>,
    drivers: Vec<Arc<dyn EnvironmentRuntimeDriver>>,
    replace_defaults: bool,
    sandbox: SandboxDriver,
    options: RuntimeOptions,
}

impl RuntimeBuilder {
    /// Uses this lease store (default: in memory).
    pub fn lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses this environment store (default: in memory).
    pub fn environment_store(mut self, store: Arc<dyn EnvironmentStore>) -> Self {
        self.environments = Some(store);
        self
    }

    /// Uses this secret resolver (default: an empty in-memory one).
    pub fn secrets(mut self, secrets: Arc<dyn SecretResolver>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Registers a sandbox provider with the `sandbox` driver.
    pub fn provider(self, provider: Arc<dyn SandboxProvider>) -> Self {
        self.sandbox.register(provider);
        self
    }

    /// Registers a driver; a later driver with the same key replaces an earlier one.
    pub fn driver(mut self, driver: Arc<dyn EnvironmentRuntimeDriver>) -> Self {
        self.drivers.push(driver);
        self
    }

    /// Registers only the drivers given with [`RuntimeBuilder::driver`] (Paperclip's `drivers` option).
    pub fn without_default_drivers(mut self) -> Self {
        self.replace_defaults = true;
        self
    }

    /// Sets the tunables.
    pub fn options(mut self, options: RuntimeOptions) -> Self {
        self.options = options;
        self
    }

    /// Builds the runtime.
    pub fn build(self) -> EnvironmentRuntime {
        let mut drivers: HashMap<String, Arc<dyn EnvironmentRuntimeDriver>> = HashMap::new();
        if !self.replace_defaults {
            drivers.insert(LocalDriver.key().to_owned(), Arc::new(LocalDriver));
            drivers.insert(self.sandbox.key().to_owned(), Arc::new(self.sandbox));
        }
        for driver in self.drivers {
            drivers.insert(driver.key().to_owned(), driver);
        }
        EnvironmentRuntime {
            inner: Arc::new(Inner {
                drivers,
                environments: self
                    .environments
                    .unwrap_or_else(|| Arc::new(InMemoryEnvironmentStore::new())),
                ctx: DriverContext {
                    store: self
                        .store
                        .unwrap_or_else(|| Arc::new(InMemoryLeaseStore::new())),
                    secrets: self
                        .secrets
                        .unwrap_or_else(|| Arc::new(InMemorySecretResolver::new())),
                    options: self.options,
                },
            }),
        }
    }
}

struct Inner {
    drivers: HashMap<String, Arc<dyn EnvironmentRuntimeDriver>>,
    environments: Arc<dyn EnvironmentStore>,
    ctx: DriverContext,
}

/// The environment runtime. Cheap to clone; clones share everything.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime, LeaseStatus};
/// let runtime = EnvironmentRuntime::builder().build();
/// let env = Environment::new("env-1", "Local", "local", serde_json::json!({}));
/// let record = runtime.acquire_run_lease(AcquireRunLease::for_run(env, "run-1")).await.unwrap();
/// assert_eq!(record.lease.provider.as_deref(), Some("local"));
/// let released = runtime.release_run_leases("run-1", LeaseStatus::Released).await.into_result().unwrap();
/// assert_eq!(released[0].lease.status, LeaseStatus::Released);
/// # });
/// ```
#[derive(Clone)]
pub struct EnvironmentRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EnvironmentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&String> = self.inner.drivers.keys().collect();
        keys.sort();
        f.debug_struct("EnvironmentRuntime")
            .field("drivers", &keys)
            .finish_non_exhaustive()
    }
}

impl EnvironmentRuntime {
    /// A builder with in-memory stores, `local` and `sandbox` drivers.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            store: None,
            environments: None,
            secrets: None,
            drivers: Vec::new(),
            replace_defaults: false,
            sandbox: SandboxDriver::new(),
            options: RuntimeOptions::default(),
        }
    }

    /// The driver registered under `key`.
    pub fn driver(&self, key: &str) -> Option<Arc<dyn EnvironmentRuntimeDriver>> {
        self.inner.drivers.get(key).cloned()
    }

    /// The lease store.
    pub fn lease_store(&self) -> &Arc<dyn LeaseStore> {
        &self.inner.ctx.store
    }

    /// The environment store.
    pub fn environment_store(&self) -> &Arc<dyn EnvironmentStore> {
        &self.inner.environments
    }

    /// Why `environment_id` may not be deleted now, as Paperclip 2026.916's
    /// `getDeleteBlastRadius` names it: `pending_sandbox_cleanup` while a
    /// lease of it is `pending_cleanup` (the row is the only durable
    /// reference to a resource still to be torn down), and
    /// `reusable_sandbox_lease` while a `reuse_by_environment` lease of it is
    /// `active`, `released` or `retained` (a live sandbox kept for the next
    /// run). Empty when the delete may go ahead.
    pub async fn environment_delete_blockers(
        &self,
        environment_id: &str,
    ) -> Result<Vec<&'static str>> {
        let leases = self
            .inner
            .ctx
            .store
            .list_by_environment(environment_id, None)
            .await?;
        let mut reasons = Vec::new();
        if leases
            .iter()
            .any(|l| l.status == LeaseStatus::PendingCleanup)
        {
            reasons.push("pending_sandbox_cleanup");
        }
        if leases.iter().any(|l| {
            l.lease_policy == crate::lease::LeasePolicy::ReuseByEnvironment
                && matches!(
                    l.status,
                    LeaseStatus::Active | LeaseStatus::Released | LeaseStatus::Retained
                )
        }) {
            reasons.push("reusable_sandbox_lease");
        }
        Ok(reasons)
    }

    /// Deletes an environment unless [`Self::environment_delete_blockers`]
    /// names a reason, which is then an [`Error::Conflict`] listing them.
    /// `false` when the environment was not there. (Spec 00 had no delete
    /// guard; issue #22 wins. The check and the delete are two store calls:
    /// a host that shares its stores must serialise deletes itself, as the
    /// stores have no cross-table transaction.)
    pub async fn delete_environment(&self, environment_id: &str) -> Result<bool> {
        let blockers = self.environment_delete_blockers(environment_id).await?;
        if !blockers.is_empty() {
            return Err(Error::Conflict {
                message: format!(
                    "Environment {environment_id} cannot be deleted: {} (resolve the cleanup or destroy the reusable sandbox first).",
                    blockers.join(", ")
                ),
            });
        }
        self.inner.environments.remove(environment_id).await
    }

    /// The context drivers receive.
    pub fn context(&self) -> &DriverContext {
        &self.inner.ctx
    }

    fn driver_or_err(&self, key: &str) -> Result<Arc<dyn EnvironmentRuntimeDriver>> {
        self.driver(key).ok_or_else(|| Error::DriverNotRegistered {
            driver: key.to_owned(),
        })
    }

    fn lease_driver(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Arc<dyn EnvironmentRuntimeDriver>> {
        self.driver_or_err(lease.driver_key(environment))
    }

    fn record(environment: Environment, lease: EnvironmentLease) -> LeaseRecord {
        let lease_context = LeaseContext::from_lease(&lease);
        LeaseRecord {
            environment,
            lease,
            lease_context,
        }
    }

    /// Acquires a lease. The environment must be active and its driver
    /// registered; both are checked before any provider call or row insert.
    /// The environment is saved in the environment store.
    pub async fn acquire_run_lease(&self, input: AcquireRunLease) -> Result<LeaseRecord> {
        let environment = input.environment;
        if environment.status != EnvironmentStatus::Active {
            return Err(Error::EnvironmentInactive {
                name: environment.name.clone(),
            });
        }
        let driver = self.driver_or_err(&environment.driver)?;
        let mut environment = environment;
        if let Some(config) = driver.secure_config(&self.inner.ctx, &environment).await? {
            // Plaintext secrets became references: the stored environment
            // and everything recorded from now on hold references only.
            environment.config = config;
        }
        self.inner.environments.put(environment.clone()).await?;
        let lease_context = LeaseContext::from_workspace(input.execution_workspace.as_ref());
        let span = info_span!("acquire_run_lease", environment = %environment.id, driver = %environment.driver);
        let lease = driver
            .acquire_run_lease(
                &self.inner.ctx,
                AcquireInput {
                    environment: &environment,
                    company_id: input.company_id.or_else(|| environment.company_id.clone()),
                    issue_id: input.issue_id,
                    heartbeat_run_id: input.heartbeat_run_id,
                    lease_context: lease_context.clone(),
                    details: AcquireDetails {
                        execution_workspace_id: input
                            .details
                            .execution_workspace_id
                            .clone()
                            .or_else(|| lease_context.execution_workspace_id.clone()),
                        ..input.details
                    },
                },
            )
            .instrument(span)
            .await?;
        Ok(LeaseRecord {
            environment,
            lease,
            lease_context,
        })
    }

    /// Releases every `active` lease of a run, continuing past failures.
    /// Leases whose environment is gone are skipped and stay active.
    pub async fn release_run_leases(&self, run_id: &str, status: LeaseStatus) -> ReleaseReport {
        let mut report = ReleaseReport::default();
        let leases = match self
            .inner
            .ctx
            .store
            .list_by_run(run_id, Some(LeaseStatus::Active))
            .await
        {
            Ok(leases) => leases,
            Err(e) => {
                report.failures.push(("*".into(), e));
                return report;
            }
        };
        for lease in leases {
            let Some(environment_id) = lease.environment_id.as_deref() else {
                report.skipped.push(lease.id.clone());
                continue;
            };
            let environment = match self.inner.environments.get(environment_id).await {
                Ok(Some(env)) => env,
                Ok(None) => {
                    report.skipped.push(lease.id.clone());
                    continue;
                }
                Err(e) => {
                    report.failures.push((lease.id.clone(), e));
                    continue;
                }
            };
            match self.release_lease(&environment, &lease, status).await {
                Ok(Some(record)) => report.released.push(record),
                Ok(None) => {}
                Err(e) => {
                    warn!(lease = %lease.id, error = %e, "lease release failed");
                    report.failures.push((lease.id.clone(), e));
                }
            }
        }
        report
    }

    /// Releases one lease (ad-hoc leases are released this way). A driver
    /// missing for the lease's key falls back to a plain store release.
    pub async fn release_lease(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<LeaseRecord>> {
        if !status.is_release_status() {
            return Err(Error::Contract(format!(
                "A lease cannot be released with status {status}."
            )));
        }
        let span = info_span!("release_lease", lease = %lease.id, status = %status);
        let released = match self.driver(lease.driver_key(environment)) {
            Some(driver) => {
                driver
                    .release_run_lease(&self.inner.ctx, environment, lease, status)
                    .instrument(span)
                    .await?
            }
            None => {
                self.inner
                    .ctx
                    .store
                    .release(&lease.id, status, Default::default())
                    .await?
            }
        };
        Ok(released.map(|l| Self::record(environment.clone(), l)))
    }

    /// Runs provider cleanup again for a released lease whose cleanup failed
    /// (`cleanupStatus = failed`), through the lease's driver, and lets the
    /// store record the new outcome (the attempt is counted). A
    /// `pending_cleanup` lease (a failed destroy) is destroyed again and
    /// becomes `expired` on success; any other lease is released again with
    /// its stored status (a stray `active` one as `expired`).
    pub async fn retry_cleanup(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Option<LeaseRecord>> {
        match lease.status {
            LeaseStatus::PendingCleanup => self.destroy_run_lease(environment, lease).await,
            LeaseStatus::Active => {
                self.release_lease(environment, lease, LeaseStatus::Expired)
                    .await
            }
            other => self.release_lease(environment, lease, other).await,
        }
    }

    /// Re-attaches to the lease's resource (no store write).
    pub async fn resume_run_lease(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<ProviderLease> {
        self.lease_driver(environment, lease)?
            .resume_run_lease(&self.inner.ctx, environment, lease)
            .await
    }

    /// Tears the lease's resource down regardless of policy.
    pub async fn destroy_run_lease(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Option<LeaseRecord>> {
        let destroyed = self
            .lease_driver(environment, lease)?
            .destroy_run_lease(&self.inner.ctx, environment, lease)
            .await?;
        Ok(destroyed.map(|l| Self::record(environment.clone(), l)))
    }

    /// Prepares the lease's working directory.
    pub async fn realize_workspace(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        self.lease_driver(environment, lease)?
            .realize_workspace(&self.inner.ctx, environment, lease, workspace)
            .await
    }

    /// Runs a command and returns its buffered result.
    pub async fn execute(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
    ) -> Result<ExecuteResult> {
        self.execute_with(
            environment,
            lease,
            request,
            OutputCollector::new(request.capture, None),
        )
        .await
    }

    /// Runs a command, delivering output chunks to `sink` as they arrive; the
    /// result also carries the output per the request's capture mode.
    pub async fn execute_streaming(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
        sink: Arc<dyn OutputSink>,
    ) -> Result<ExecuteResult> {
        self.execute_with(
            environment,
            lease,
            request,
            OutputCollector::new(request.capture, Some(sink)),
        )
        .await
    }

    async fn execute_with(
        &self,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
        output: OutputCollector,
    ) -> Result<ExecuteResult> {
        let driver = self.lease_driver(environment, lease)?;
        if environment.env_vars.is_empty() {
            let exit = driver
                .execute(&self.inner.ctx, environment, lease, request, &output)
                .await?;
            return Ok(output.finish(exit));
        }
        // `envVars` apply to every command of the lease; secrets are resolved
        // now, for this call only, and never outlive it.
        let resolved = crate::env_vars::resolve_env_vars(
            &environment.env_vars,
            self.inner.ctx.secrets.as_ref(),
        )
        .await?;
        let mut with_env = request.clone();
        resolved.apply_to(&mut with_env.env);
        let exit = driver
            .execute(&self.inner.ctx, environment, lease, &with_env, &output)
            .await
            .map_err(|e| resolved.scrub_error(driver.key(), e))?;
        Ok(output.finish(exit))
    }

    /// Tests an environment. Expected failures are `ok: false` results.
    pub async fn probe(&self, environment: &Environment) -> Result<ProbeResult> {
        self.driver_or_err(&environment.driver)?
            .probe(&self.inner.ctx, environment)
            .await
    }

    /// Validates and normalizes a config for `driver`. For
    /// [`ConfigPurpose::Persistence`], plaintext secrets become stored secrets
    /// and the result holds their ids.
    pub async fn normalize_config(
        &self,
        driver: &str,
        environment_name: &str,
        config: &Value,
        purpose: ConfigPurpose,
    ) -> Result<Value> {
        self.driver_or_err(driver)?
            .normalize_config(&self.inner.ctx, environment_name, config, purpose)
            .await
    }
}
