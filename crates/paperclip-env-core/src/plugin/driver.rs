//! The `plugin` runtime driver (spec 00 §5.5): environments with
//! `driver: "plugin"` and config `{pluginKey, driverKey, driverConfig}` are
//! served by a plugin worker's `environment*` methods.

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;
use serde_json::{Value, json};
use tracing::warn;

use super::protocol::{self, ValidationResult, methods};
use super::provider::deliver;
use super::worker::{PluginWorker, StreamedOutput};
use crate::Unsupported;
use crate::acquisition::{self, AcquireTiming, Acquirer};
use crate::config::PluginDriverConfig;
use crate::deadline::execute_deadline;
use crate::driver::{AcquireInput, ConfigPurpose, DriverContext, EnvironmentRuntimeDriver};
use crate::execute::{CommandExit, ExecuteRequest, OutputCollector};
use crate::lease::{
    CleanupStatus, Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus, driver_keys,
};
use crate::probe::ProbeResult;
use crate::provider::{LeaseHandle, ProviderLease};
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use crate::secret::{
    ProviderConfig, collect_secret_ref_paths, resolve_provider_config, strip_secret_paths,
};
use crate::store::{AcquiredLease, NewLease, ReleaseUpdate};
use crate::{Error, Operation, Result};

/// `failureReason` written when a plugin lease is destroyed.
const DESTROYED_REASON: &str = "lease_destroyed";

/// The `plugin` driver and its installed plugins, keyed by plugin key.
///
/// ```no_run
/// # async fn demo() -> paperclip_env_core::Result<()> {
/// use std::sync::Arc;
/// use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime};
/// use paperclip_env_core::plugin::{PluginDriver, PluginManifest, PluginWorker, PluginWorkerConfig};
/// let manifest = PluginManifest::from_json(serde_json::json!({
///     "id": "acme.boxes", "capabilities": ["environment.drivers.register"],
///     "environmentDrivers": [{"driverKey": "box", "kind": "environment_driver"}]
/// }))?;
/// let worker = PluginWorker::new(PluginWorkerConfig::new("node", manifest).arg("dist/worker.js"));
/// let runtime = EnvironmentRuntime::builder()
///     .driver(Arc::new(PluginDriver::new().with_plugin(worker)))
///     .build();
/// let env = Environment::new("env-1", "Boxes", "plugin",
///     serde_json::json!({"pluginKey": "acme.boxes", "driverKey": "box", "driverConfig": {"size": "s"}}));
/// let record = runtime.acquire_run_lease(AcquireRunLease::for_run(env, "run-1")).await?;
/// assert_eq!(record.lease.provider.as_deref(), Some("plugin:acme.boxes:box"));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct PluginDriver {
    plugins: RwLock<BTreeMap<String, PluginWorker>>,
}

struct Resolved {
    worker: PluginWorker,
    plugin_key: String,
    driver_key: String,
    /// `driverConfig`, with the fields the driver's schema marks
    /// `format: "secret-ref"` resolved (secret ids) or kept as inline secrets.
    config: ProviderConfig,
    /// Those fields' paths.
    secret_paths: Vec<String>,
}

impl Resolved {
    async fn build(
        ctx: &DriverContext,
        worker: PluginWorker,
        plugin_key: String,
        driver_key: String,
        driver_config: JsonObject,
    ) -> Result<Self> {
        let secret_paths = worker
            .manifest()
            .driver(&driver_key)
            .map(|d| collect_secret_ref_paths(&d.config_schema))
            .unwrap_or_default();
        let config =
            resolve_provider_config(&driver_config, &secret_paths, ctx.secrets.as_ref()).await?;
        Ok(Resolved {
            worker,
            plugin_key,
            driver_key,
            config,
            secret_paths,
        })
    }

    fn label(&self) -> String {
        format!("plugin:{}:{}", self.plugin_key, self.driver_key)
    }

    fn base(
        &self,
        company_id: Option<&String>,
        environment_id: &str,
        issue_id: Option<&String>,
    ) -> JsonObject {
        protocol::BaseParams {
            driver_key: self.driver_key.clone(),
            company_id: company_id.cloned(),
            environment_id: environment_id.to_owned(),
            issue_id: issue_id.cloned(),
            config: self.config.expose_to_json(),
        }
        .to_object()
    }

    async fn call(
        &self,
        operation: Operation,
        params: JsonObject,
        company_id: Option<&str>,
        deadline: std::time::Duration,
    ) -> Result<Value> {
        self.call_with_output(operation, params, company_id, deadline, None)
            .await
            .map(|(value, _)| value)
    }

    /// [`Self::call`], streaming `execute.log` chunks into `output` when given.
    async fn call_with_output(
        &self,
        operation: Operation,
        params: JsonObject,
        company_id: Option<&str>,
        deadline: std::time::Duration,
        output: Option<&OutputCollector>,
    ) -> Result<(Value, StreamedOutput)> {
        let label = self.label();
        self.worker.register_secrets(&self.config);
        let method = operation.method_name();
        let params = Value::Object(params);
        match output {
            Some(output) => {
                self.worker
                    .call_streaming(method, &params, company_id, Some(deadline), output)
                    .await
            }
            None => self
                .worker
                .call(method, &params, company_id, Some(deadline))
                .await
                .map(|value| (value, StreamedOutput::default())),
        }
        .map_err(|e| {
            let e = e.into_error(
                &label,
                Unsupported::Driver(driver_keys::PLUGIN.to_owned()),
                operation,
            );
            self.config.scrub_error(&label, e)
        })
    }

    fn malformed(&self, operation: Operation, why: impl std::fmt::Display) -> Error {
        Error::Provider {
            provider: self.label(),
            message: format!(
                "plugin worker protocol error: malformed {} result: {}",
                operation.method_name(),
                self.worker.scrub(&why.to_string())
            ),
            retryable: false,
            source: None,
        }
    }
}

fn read_str<'a>(md: Option<&'a JsonObject>, key: &str) -> Option<&'a str> {
    md?.get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn lease_with_metadata(mut params: JsonObject, lease: &EnvironmentLease) -> JsonObject {
    params.insert("providerLeaseId".into(), json!(lease.provider_lease_id));
    if let Some(md) = &lease.metadata {
        params.insert("leaseMetadata".into(), Value::Object(md.clone()));
    }
    params
}

fn lease_handle(lease: &EnvironmentLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: lease.expires_at,
    }
}

impl PluginDriver {
    /// A driver with no plugins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plugin (builder form).
    pub fn with_plugin(self, worker: PluginWorker) -> Self {
        self.register(worker);
        self
    }

    /// Installs a plugin; a later one with the same key replaces the earlier.
    pub fn register(&self, worker: PluginWorker) {
        self.plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker.plugin_key().to_owned(), worker);
    }

    /// The plugin installed under `plugin_key`.
    pub fn plugin(&self, plugin_key: &str) -> Option<PluginWorker> {
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(plugin_key)
            .cloned()
    }

    /// Shuts every plugin worker down.
    pub async fn shutdown(&self) {
        let workers: Vec<PluginWorker> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for worker in workers {
            worker.shutdown().await;
        }
    }

    fn parse_config(environment: &Environment) -> Result<PluginDriverConfig> {
        if environment.driver != driver_keys::PLUGIN {
            return Err(Error::Contract(format!(
                "Expected plugin environment config for driver \"{}\".",
                environment.driver
            )));
        }
        PluginDriverConfig::parse(&environment.config)
    }

    /// Resolves the plugin and starts its worker if needed (`resolvePluginDriver`).
    async fn resolve(&self, plugin_key: &str, driver_key: &str) -> Result<PluginWorker> {
        let label = format!("{plugin_key}:{driver_key}");
        let worker = self
            .plugin(plugin_key)
            .ok_or_else(|| Error::ProviderUnavailable {
                provider: format!("plugin:{label}"),
                message: format!("Plugin environment driver \"{label}\" is not ready."),
                retryable: false,
            })?;
        if worker.manifest().driver(driver_key).is_none() {
            return Err(Error::invalid_field(
                "driverKey",
                format!(
                    "Plugin \"{plugin_key}\" does not declare environment driver \"{driver_key}\"."
                ),
            ));
        }
        if let Err(e) = worker.start().await {
            warn!(target: "paperclip_env::plugin", plugin = %plugin_key, "worker unavailable: {e}");
            return Err(Error::ProviderUnavailable {
                provider: format!("plugin:{label}"),
                message: format!("Plugin environment driver \"{label}\" has no running worker."),
                retryable: true,
            });
        }
        Ok(worker)
    }

    async fn resolve_for_acquire(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
    ) -> Result<Resolved> {
        let config = Self::parse_config(environment)?;
        let worker = self.resolve(&config.plugin_key, &config.driver_key).await?;
        Resolved::build(
            ctx,
            worker,
            config.plugin_key,
            config.driver_key,
            config.driver_config,
        )
        .await
    }

    /// `resolvePluginDriverForRelease`: metadata first, then the current config.
    async fn resolve_for_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Resolved> {
        let md = lease.metadata.as_ref();
        let (md_plugin_id, md_plugin_key, md_driver_key) = (
            read_str(md, "pluginId"),
            read_str(md, "pluginKey"),
            read_str(md, "driverKey"),
        );
        let current = Self::parse_config(environment).ok();
        if md_plugin_id.is_none() && md_plugin_key.is_none() && md_driver_key.is_none() {
            let Some(current) = current else {
                return Err(Error::Contract(format!(
                    "Expected plugin environment config for driver \"{}\".",
                    environment.driver
                )));
            };
            let worker = self
                .resolve(&current.plugin_key, &current.driver_key)
                .await?;
            return Resolved::build(
                ctx,
                worker,
                current.plugin_key,
                current.driver_key,
                current.driver_config,
            )
            .await;
        }
        let plugin_key = md_plugin_id
            .or(md_plugin_key)
            .map(str::to_owned)
            .or_else(|| current.as_ref().map(|c| c.plugin_key.clone()))
            .unwrap_or_else(|| "unknown".to_owned());
        let Some(driver_key) = md_driver_key
            .map(str::to_owned)
            .or_else(|| current.as_ref().map(|c| c.driver_key.clone()))
        else {
            return Err(Error::Contract(format!(
                "Plugin environment driver \"{plugin_key}:unknown\" is missing a driver key."
            )));
        };
        let worker = self.resolve(&plugin_key, &driver_key).await?;
        let driver_config = match current {
            Some(c) if c.plugin_key == plugin_key && c.driver_key == driver_key => c.driver_config,
            _ => JsonObject::new(),
        };
        Resolved::build(ctx, worker, plugin_key, driver_key, driver_config).await
    }

    async fn release_call(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<()> {
        let r = self.resolve_for_lease(ctx, environment, lease).await?;
        let params = lease_with_metadata(
            r.base(
                lease.company_id.as_ref(),
                &environment.id,
                lease.issue_id.as_ref(),
            ),
            lease,
        );
        r.worker.require_advertised(methods::RELEASE).await?;
        r.call(
            Operation::Release,
            params,
            lease.company_id.as_deref(),
            ctx.options.default_call_deadline,
        )
        .await
        .map(|_| ())
    }
}

/// The worker side of one recorded acquisition (see [`crate::acquisition`]):
/// the run-lease row exists before `environmentAcquireLease` is sent, and
/// a lease the host cannot record is released through the worker, with a
/// failed release kept on the row for the reaper instead of only logged.
struct PluginAcquirer {
    resolved: Resolved,
    params: JsonObject,
    company_id: Option<String>,
    environment_id: String,
    issue_id: Option<String>,
    host_metadata: JsonObject,
    /// Bound of the worker's acquire call: the hard bound, not the
    /// caller's deadline (a caller that gives up must not kill the call).
    acquire_deadline: std::time::Duration,
    /// Bound of the teardown call.
    deadline: std::time::Duration,
}

#[async_trait]
impl Acquirer for PluginAcquirer {
    async fn acquire(&self) -> Result<AcquiredLease> {
        let r = &self.resolved;
        let value = r
            .call(
                Operation::Acquire,
                self.params.clone(),
                self.company_id.as_deref(),
                self.acquire_deadline,
            )
            .await?;
        let provider_lease =
            protocol::parse_lease(value).map_err(|e| r.malformed(Operation::Acquire, e))?;
        let mut provider_metadata = provider_lease.metadata.clone().unwrap_or_default();
        strip_secret_paths(&mut provider_metadata, &r.secret_paths);
        r.config.scrub_metadata(&mut provider_metadata);
        let mut metadata = JsonObject::new();
        metadata.insert("providerMetadata".into(), Value::Object(provider_metadata));
        metadata.extend(self.host_metadata.clone());
        // Only the provider's own expiry is stored (Paperclip 2026.916); the
        // reaper bounds the lease by `RuntimeOptions::max_lease_lifetime`.
        let expires_at = provider_lease.expires_at;
        Ok(AcquiredLease {
            lease_policy: Some(LeasePolicy::Ephemeral),
            provider_lease_id: provider_lease.provider_lease_id,
            expires_at,
            metadata: Some(metadata),
        })
    }

    async fn teardown(&self, acquired: &AcquiredLease) -> Result<()> {
        let r = &self.resolved;
        let mut params = r.base(
            self.company_id.as_ref(),
            &self.environment_id,
            self.issue_id.as_ref(),
        );
        params.insert("providerLeaseId".into(), json!(acquired.provider_lease_id));
        r.call(
            Operation::Release,
            params,
            self.company_id.as_deref(),
            self.deadline,
        )
        .await
        .map(|_| ())
    }

    fn scrub(&self, message: &str) -> String {
        self.resolved
            .worker
            .scrub(&self.resolved.config.scrub(message))
    }
}

#[async_trait]
impl EnvironmentRuntimeDriver for PluginDriver {
    fn key(&self) -> &str {
        driver_keys::PLUGIN
    }

    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
    ) -> Result<EnvironmentLease> {
        let environment = input.environment;
        let r = self.resolve_for_acquire(ctx, environment).await?;
        let mut params = r.base(
            input.company_id.as_ref(),
            &environment.id,
            input.issue_id.as_ref(),
        );
        let run_id = input
            .heartbeat_run_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        params.insert("runId".into(), json!(run_id));
        if let Some(mode) = &input.lease_context.execution_workspace_mode {
            params.insert("workspaceMode".into(), json!(mode));
        }
        protocol::add_acquire_details(&mut params, &input.details);
        let mut host_metadata = JsonObject::new();
        host_metadata.insert("driver".into(), json!(environment.driver));
        host_metadata.insert(
            "executionWorkspaceMode".into(),
            json!(input.lease_context.execution_workspace_mode),
        );
        host_metadata.insert("pluginId".into(), json!(r.plugin_key));
        host_metadata.insert("pluginKey".into(), json!(r.plugin_key));
        host_metadata.insert("driverKey".into(), json!(r.driver_key));
        let mut pending_metadata = host_metadata.clone();
        acquisition::mark_in_flight(
            &mut pending_metadata,
            &run_id,
            ctx.options.acquisition_heartbeat,
        );
        let pending = NewLease {
            company_id: input.company_id.clone(),
            environment_id: environment.id.clone(),
            execution_workspace_id: input.lease_context.execution_workspace_id.clone(),
            issue_id: input.issue_id.clone(),
            heartbeat_run_id: input.heartbeat_run_id.clone(),
            lease_policy: Some(LeasePolicy::Ephemeral),
            provider: Some(r.label()),
            provider_lease_id: None,
            expires_at: None,
            metadata: Some(pending_metadata),
        };
        let deadline = ctx.options.default_call_deadline;
        let timing = AcquireTiming {
            caller_deadline: deadline,
            hard_deadline: deadline.saturating_mul(2),
            heartbeat: ctx.options.acquisition_heartbeat,
        };
        let acquirer = std::sync::Arc::new(PluginAcquirer {
            resolved: r,
            params,
            company_id: input.company_id.clone(),
            environment_id: environment.id.clone(),
            issue_id: input.issue_id.clone(),
            host_metadata,
            acquire_deadline: timing.hard_deadline,
            deadline,
        });
        acquisition::acquire_recorded(
            ctx.store.clone(),
            pending,
            timing,
            "environmentAcquireLease",
            acquirer,
        )
        .await
    }

    /// Calls `environmentReleaseLease`, then records the release. Decision
    /// (deviation from B, where the error propagates and the row stays
    /// `active`): a failed or impossible provider release is recorded as
    /// `cleanupStatus: failed` with its error, and the row is still released,
    /// as the sandbox driver does (spec 00 §8), so a crashed or hung worker
    /// never leaves a stuck lease and the cleanup is visible for retry.
    async fn release_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<EnvironmentLease>> {
        let (status, update) = match self.release_call(ctx, environment, lease).await {
            Ok(()) => (status, ReleaseUpdate::default()),
            Err(e) => {
                warn!(target: "paperclip_env::plugin", lease = %lease.id, "plugin lease cleanup failed: {e}");
                // Paperclip 2026.916: a failed cleanup becomes `pending_cleanup`
                // (`release_cleanup_failed`), so the sweep retries it; a
                // `retained` release keeps its status.
                let (status, failure_reason) = if status == LeaseStatus::Retained {
                    (status, None)
                } else if status == LeaseStatus::Failed {
                    (
                        LeaseStatus::PendingCleanup,
                        Some(crate::lease::failure_reasons::ADAPTER_OR_RUN_FAILURE.to_owned()),
                    )
                } else {
                    (
                        LeaseStatus::PendingCleanup,
                        Some(crate::lease::failure_reasons::RELEASE_CLEANUP_FAILED.to_owned()),
                    )
                };
                (
                    status,
                    ReleaseUpdate {
                        failure_reason,
                        cleanup_status: Some(CleanupStatus::Failed),
                        cleanup_error: Some(e.to_string()),
                        termination: None,
                    },
                )
            }
        };
        ctx.store.release(&lease.id, status, update).await
    }

    async fn resume_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<ProviderLease> {
        if lease.provider_lease_id.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Contract(format!(
                "Plugin environment lease \"{}\" does not have a provider lease id to resume.",
                lease.id
            )));
        }
        let r = self.resolve_for_lease(ctx, environment, lease).await?;
        let params = lease_with_metadata(
            r.base(
                lease.company_id.as_ref(),
                &environment.id,
                lease.issue_id.as_ref(),
            ),
            lease,
        );
        let value = r
            .call(
                Operation::Resume,
                params,
                lease.company_id.as_deref(),
                ctx.options.default_call_deadline,
            )
            .await?;
        protocol::parse_lease(value).map_err(|e| r.malformed(Operation::Resume, e))
    }

    async fn destroy_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Option<EnvironmentLease>> {
        let r = self.resolve_for_lease(ctx, environment, lease).await?;
        let params = lease_with_metadata(
            r.base(
                lease.company_id.as_ref(),
                &environment.id,
                lease.issue_id.as_ref(),
            ),
            lease,
        );
        r.worker.require_advertised(methods::DESTROY).await?;
        r.call(
            Operation::Destroy,
            params,
            lease.company_id.as_deref(),
            ctx.options.default_call_deadline,
        )
        .await?;
        ctx.store
            .release(
                &lease.id,
                LeaseStatus::Failed,
                ReleaseUpdate {
                    failure_reason: Some(DESTROYED_REASON.to_owned()),
                    ..ReleaseUpdate::default()
                },
            )
            .await
    }

    async fn realize_workspace(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let r = self.resolve_for_lease(ctx, environment, lease).await?;
        let mut params = r.base(
            lease.company_id.as_ref(),
            &environment.id,
            lease.issue_id.as_ref(),
        );
        params.insert("lease".into(), protocol::lease_json(&lease_handle(lease)));
        params.insert("workspace".into(), protocol::workspace_json(workspace));
        let value = r
            .call(
                Operation::RealizeWorkspace,
                params,
                lease.company_id.as_deref(),
                ctx.options.default_call_deadline,
            )
            .await?;
        serde_json::from_value(value).map_err(|e| r.malformed(Operation::RealizeWorkspace, e))
    }

    async fn execute(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let r = self.resolve_for_lease(ctx, environment, lease).await?;
        let mut params = r.base(
            lease.company_id.as_ref(),
            &environment.id,
            lease.issue_id.as_ref(),
        );
        params.insert("lease".into(), protocol::lease_json(&lease_handle(lease)));
        protocol::add_execute_fields(&mut params, request, lease.remote_cwd());
        let deadline =
            execute_deadline(request.timeout_ms, r.config.get("timeoutMs"), &ctx.options);
        let (value, streamed) = r
            .call_with_output(
                Operation::Execute,
                params,
                lease.company_id.as_deref(),
                deadline,
                Some(output),
            )
            .await?;
        let result = protocol::parse_execute_result(value)
            .map_err(|e| r.malformed(Operation::Execute, e))?;
        Ok(deliver(result, &streamed, output))
    }

    async fn probe(&self, ctx: &DriverContext, environment: &Environment) -> Result<ProbeResult> {
        let r = self.resolve_for_acquire(ctx, environment).await?;
        let params = r.base(environment.company_id.as_ref(), &environment.id, None);
        let value = r
            .call(
                Operation::Probe,
                params,
                environment.company_id.as_deref(),
                ctx.options.probe_deadline,
            )
            .await?;
        let result: protocol::ProbeResult =
            serde_json::from_value(value).map_err(|e| r.malformed(Operation::Probe, e))?;
        let label = format!("{}:{}", r.plugin_key, r.driver_key);
        let summary = result.summary.clone().unwrap_or_else(|| {
            format!(
                "Plugin environment driver \"{label}\" probe {}.",
                if result.ok { "passed" } else { "failed" }
            )
        });
        Ok(ProbeResult {
            ok: result.ok,
            driver: driver_keys::PLUGIN.to_owned(),
            summary,
            details: Some(json!({
                "pluginKey": r.plugin_key,
                "driverKey": r.driver_key,
                "diagnostics": result.diagnostics,
                "metadata": result.metadata.unwrap_or_default(),
            })),
        })
    }

    async fn normalize_config(
        &self,
        ctx: &DriverContext,
        _environment_name: &str,
        config: &Value,
        _purpose: ConfigPurpose,
    ) -> Result<Value> {
        let mut parsed = PluginDriverConfig::parse(config)?;
        let worker = self.resolve(&parsed.plugin_key, &parsed.driver_key).await?;
        let r = Resolved::build(
            ctx,
            worker,
            parsed.plugin_key.clone(),
            parsed.driver_key.clone(),
            parsed.driver_config.clone(),
        )
        .await?;
        let mut params = JsonObject::new();
        params.insert("driverKey".into(), json!(r.driver_key));
        params.insert("config".into(), Value::Object(parsed.driver_config.clone()));
        let value = r
            .call(
                Operation::ValidateConfig,
                params,
                None,
                ctx.options.default_call_deadline,
            )
            .await?;
        let result: ValidationResult =
            serde_json::from_value(value).map_err(|e| r.malformed(Operation::ValidateConfig, e))?;
        if !result.ok {
            let message = result.errors.first().cloned().unwrap_or_else(|| {
                format!(
                    "Plugin environment driver \"{}:{}\" rejected its config.",
                    r.plugin_key, r.driver_key
                )
            });
            return Err(Error::invalid_field("driverConfig", message));
        }
        if let Some(normalized) = result.normalized_config {
            parsed.driver_config = normalized;
        }
        Ok(parsed.to_json())
    }
}
