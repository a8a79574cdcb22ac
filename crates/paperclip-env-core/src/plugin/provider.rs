//! A [`SandboxProvider`] served out of process: a plugin manifest entry of
//! kind `sandbox_provider` backs `driver: "sandbox"` environments whose
//! `provider` is its driver key (spec 00 §5.4.2, §10.1).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::manifest::{DriverDeclaration, DriverKind};
use super::protocol::{self, BaseParams, ValidationResult, methods};
use super::worker::{PluginWorker, StreamedOutput};
use crate::Unsupported;
use crate::config::ConfigIssue;
use crate::deadline::{execute_deadline, lease_operation_deadline};
use crate::driver::RuntimeOptions;
use crate::execute::{CommandExit, ExecuteRequest, OutputCollector, OutputStream};
use crate::lease::{JsonObject, LeaseStatus};
use crate::provider::{
    AcquireRequest, CallContext, Capabilities, ConfigValidation, LeaseHandle, ProviderLease,
    ProviderProbe, Readiness, SandboxProvider,
};
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use crate::{Error, Operation, Result};

/// Capabilities implied by the optional methods a worker reported in
/// `initialize` (`None`: not started yet, every environment method assumed).
/// `streaming` is never implied: a worker may send `execute.log` chunks
/// (they reach the caller live) but nothing in `initialize` promises it.
///
/// ```
/// use paperclip_env_core::plugin::capabilities_from_methods;
/// let caps = capabilities_from_methods(Some(&["environmentAcquireLease".to_owned(), "environmentExecute".to_owned()]), true);
/// assert!(caps.execute && caps.stdin && !caps.resume && !caps.streaming);
/// ```
pub fn capabilities_from_methods(methods: Option<&[String]>, reusable: bool) -> Capabilities {
    let has = |m: &str| methods.is_none_or(|ms| ms.iter().any(|x| x == m));
    let execute = has(methods::EXECUTE);
    Capabilities {
        execute,
        realize_workspace: has(methods::REALIZE),
        resume: has(methods::RESUME),
        destroy: has(methods::DESTROY),
        probe: has(methods::PROBE),
        reusable_leases: reusable && has(methods::RESUME),
        expires_at: false,
        lifetime_refresh: false,
        streaming: false,
        stdin: execute,
        multi_command_exec: execute,
        native_sync: false,
        signals: false,
        run_lookup: false,
    }
}

/// A sandbox provider whose calls go to a plugin worker.
///
/// ```no_run
/// # async fn demo() -> paperclip_env_core::Result<()> {
/// use std::sync::Arc;
/// use paperclip_env_core::EnvironmentRuntime;
/// use paperclip_env_core::plugin::{PluginManifest, PluginSandboxProvider, PluginWorker, PluginWorkerConfig};
/// let manifest = PluginManifest::from_json(serde_json::json!({
///     "id": "acme.sandbox", "capabilities": ["environment.drivers.register"],
///     "environmentDrivers": [{"driverKey": "acme", "kind": "sandbox_provider"}]
/// }))?;
/// let worker = PluginWorker::new(PluginWorkerConfig::new("node", manifest).arg("dist/worker.js"));
/// let provider = PluginSandboxProvider::new(worker, "acme")?;
/// let runtime = EnvironmentRuntime::builder().provider(Arc::new(provider)).build();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PluginSandboxProvider {
    worker: PluginWorker,
    declaration: DriverDeclaration,
    capabilities: Option<Capabilities>,
    options: RuntimeOptions,
}

impl PluginSandboxProvider {
    /// The provider `driver_key` of `worker`'s plugin; the manifest must
    /// declare it with kind `sandbox_provider`.
    pub fn new(worker: PluginWorker, driver_key: &str) -> Result<Self> {
        let declaration = worker
            .manifest()
            .driver(driver_key)
            .filter(|d| d.kind == DriverKind::SandboxProvider)
            .cloned()
            .ok_or_else(|| {
                Error::invalid_field(
                    "driverKey",
                    format!(
                        "Plugin \"{}\" does not declare sandbox provider \"{driver_key}\".",
                        worker.plugin_key()
                    ),
                )
            })?;
        Ok(PluginSandboxProvider {
            worker,
            declaration,
            capabilities: None,
            options: RuntimeOptions::default(),
        })
    }

    /// Declares capabilities explicitly instead of deriving them from `supportedMethods`.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = Some(capabilities);
        self
    }

    /// Deadline tunables of the calls (default: the runtime's defaults).
    pub fn with_options(mut self, options: RuntimeOptions) -> Self {
        self.options = options;
        self
    }

    /// The worker.
    pub fn worker(&self) -> &PluginWorker {
        &self.worker
    }

    fn base(&self, ctx: &CallContext) -> JsonObject {
        self.worker.register_secrets(&ctx.config);
        BaseParams {
            driver_key: self.declaration.driver_key.clone(),
            company_id: ctx.company_id.clone(),
            environment_id: ctx.environment_id.clone(),
            issue_id: ctx.issue_id.clone(),
            config: ctx.config.expose_to_json(),
        }
        .to_object()
    }

    fn lease_deadline(&self, ctx: &CallContext) -> Duration {
        lease_operation_deadline(
            ctx.config.get("timeoutMs"),
            ctx.config.get("bridgeRequestTimeoutMs"),
            &self.options,
        )
    }

    async fn call(
        &self,
        ctx: Option<&CallContext>,
        operation: Operation,
        params: JsonObject,
        deadline: Duration,
    ) -> Result<Value> {
        self.call_with_output(ctx, operation, params, deadline, None)
            .await
            .map(|(value, _)| value)
    }

    /// [`Self::call`], streaming `execute.log` chunks into `output` when given.
    async fn call_with_output(
        &self,
        ctx: Option<&CallContext>,
        operation: Operation,
        params: JsonObject,
        deadline: Duration,
        output: Option<&OutputCollector>,
    ) -> Result<(Value, StreamedOutput)> {
        let key = self.key();
        let company = ctx.and_then(|c| c.company_id.as_deref());
        let method = operation.method_name();
        let params = Value::Object(params);
        let result = match output {
            Some(output) => {
                self.worker
                    .call_streaming(method, &params, company, Some(deadline), output)
                    .await
            }
            None => self
                .worker
                .call(method, &params, company, Some(deadline))
                .await
                .map(|value| (value, StreamedOutput::default())),
        }
        .map_err(|e| e.into_error(key, Unsupported::Provider(key.to_owned()), operation));
        match (result, ctx) {
            (Err(e), Some(ctx)) => Err(ctx.config.scrub_error(key, e)),
            (other, _) => other,
        }
    }

    fn malformed(&self, operation: Operation, why: impl std::fmt::Display) -> Error {
        Error::Provider {
            provider: self.key().to_owned(),
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

fn with_lease(mut params: JsonObject, lease: &LeaseHandle) -> JsonObject {
    params.insert("providerLeaseId".into(), json!(lease.provider_lease_id));
    if let Some(md) = &lease.metadata {
        params.insert("leaseMetadata".into(), Value::Object(md.clone()));
    }
    params
}

#[async_trait]
impl SandboxProvider for PluginSandboxProvider {
    fn key(&self) -> &str {
        &self.declaration.driver_key
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.unwrap_or_else(|| {
            capabilities_from_methods(
                self.worker.supported_methods().as_deref(),
                self.declaration.supports_reusable_leases,
            )
        })
    }

    fn config_schema(&self) -> Value {
        self.declaration.config_schema.clone()
    }

    fn plugin_key(&self) -> String {
        self.worker.plugin_key().to_owned()
    }

    async fn readiness(&self) -> Readiness {
        if self.worker.is_shut_down() {
            return Readiness::NotReady {
                status: "stopped".to_owned(),
            };
        }
        if self.worker.is_running() {
            return Readiness::Ready;
        }
        match self.worker.start().await {
            Ok(()) => Readiness::Ready,
            Err(_) => Readiness::WorkerUnavailable,
        }
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let mut params = JsonObject::new();
        params.insert("driverKey".into(), json!(self.declaration.driver_key));
        params.insert("config".into(), Value::Object(config.clone()));
        let op = Operation::ValidateConfig;
        let value = self
            .call(None, op, params, self.options.default_call_deadline)
            .await?;
        let result: ValidationResult =
            serde_json::from_value(value).map_err(|e| self.malformed(op, e))?;
        Ok(ConfigValidation {
            ok: result.ok,
            errors: result
                .errors
                .into_iter()
                .map(|m| ConfigIssue::new("", m))
                .collect(),
            warnings: result.warnings,
            normalized_config: result.normalized_config,
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let op = Operation::Probe;
        let value = self
            .call(Some(ctx), op, self.base(ctx), self.options.probe_deadline)
            .await?;
        let result: protocol::ProbeResult =
            serde_json::from_value(value).map_err(|e| self.malformed(op, e))?;
        Ok(ProviderProbe {
            ok: result.ok,
            summary: result.summary,
            diagnostics: result.diagnostics,
            metadata: result.metadata,
        })
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let mut params = self.base(ctx);
        params.insert("runId".into(), json!(request.run_id));
        if let Some(mode) = &request.workspace_mode {
            params.insert("workspaceMode".into(), json!(mode));
        }
        protocol::add_acquire_details(&mut params, &request.details);
        let op = Operation::Acquire;
        let value = self
            .call(Some(ctx), op, params, self.lease_deadline(ctx))
            .await?;
        protocol::parse_lease(value).map_err(|e| self.malformed(op, e))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        if lease.id().is_none() {
            return Err(Error::not_found("There is no provider lease id to resume."));
        }
        let op = Operation::Resume;
        let params = with_lease(self.base(ctx), lease);
        let value = self
            .call(Some(ctx), op, params, self.lease_deadline(ctx))
            .await?;
        protocol::parse_lease(value).map_err(|e| self.malformed(op, e))
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        self.worker.require_advertised(methods::RELEASE).await?;
        let params = with_lease(self.base(ctx), lease);
        self.call(
            Some(ctx),
            Operation::Release,
            params,
            self.lease_deadline(ctx),
        )
        .await
        .map(|_| ())
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        self.worker.require_advertised(methods::DESTROY).await?;
        let params = with_lease(self.base(ctx), lease);
        self.call(
            Some(ctx),
            Operation::Destroy,
            params,
            self.lease_deadline(ctx),
        )
        .await
        .map(|_| ())
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let mut params = self.base(ctx);
        params.insert("lease".into(), protocol::lease_json(lease));
        params.insert("workspace".into(), protocol::workspace_json(workspace));
        let op = Operation::RealizeWorkspace;
        let value = self
            .call(Some(ctx), op, params, self.lease_deadline(ctx))
            .await?;
        serde_json::from_value(value).map_err(|e| self.malformed(op, e))
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let mut params = self.base(ctx);
        params.insert("lease".into(), protocol::lease_json(lease));
        protocol::add_execute_fields(&mut params, request, lease.remote_cwd());
        let deadline = execute_deadline(
            request.timeout_ms,
            ctx.config.get("timeoutMs"),
            &self.options,
        );
        let op = Operation::Execute;
        let (value, streamed) = self
            .call_with_output(Some(ctx), op, params, deadline, Some(output))
            .await?;
        let result = protocol::parse_execute_result(value).map_err(|e| self.malformed(op, e))?;
        Ok(deliver(result, &streamed, output))
    }
}

/// Pushes the part of a plugin execute result's output that was not
/// already streamed into `output` ([`StreamedOutput::deliver_final`]) and
/// returns its exit.
pub(crate) fn deliver(
    result: crate::execute::ExecuteResult,
    streamed: &StreamedOutput,
    output: &OutputCollector,
) -> CommandExit {
    streamed.deliver_final(output, OutputStream::Stdout, result.stdout.as_bytes());
    streamed.deliver_final(output, OutputStream::Stderr, result.stderr.as_bytes());
    CommandExit {
        exit_code: result.exit_code,
        signal: result.signal,
        timed_out: result.timed_out,
        metadata: result.metadata,
    }
}
