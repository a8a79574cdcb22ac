//! A provider wrapper that records every call (spec 10 §3.2), plus the
//! lifecycle assertions of spec 10 §3.3.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, ExecuteRequest,
    JsonObject, LeaseHandle, LeaseStatus, Operation, OutputCollector, ProviderLease, ProviderProbe,
    Readiness, RealizeWorkspaceResult, Result, SandboxProvider, WorkspaceSpec, time,
};
use serde_json::Value;

/// One recorded call.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderEvent {
    /// Which operation.
    pub operation: Operation,
    /// The environment (`"unknown"` for validation).
    pub environment_id: String,
    /// When the call started (ISO-8601).
    pub timestamp: String,
    /// The provider lease id the call was about, if any.
    pub provider_lease_id: Option<String>,
    /// The plain (non-secret) config keys the provider received.
    pub config_keys: Vec<String>,
    /// The error message, if the call failed.
    pub error: Option<String>,
}

/// Wraps a provider and records every call. Cheap to clone; clones share the log.
///
/// ```
/// use std::sync::Arc;
/// use paperclip_env_testkit::{fake::FakeProvider, recording::RecordingProvider};
/// let recording = RecordingProvider::new(Arc::new(FakeProvider::new()));
/// assert!(recording.events().is_empty());
/// ```
#[derive(Clone)]
pub struct RecordingProvider {
    inner: Arc<dyn SandboxProvider>,
    events: Arc<Mutex<Vec<ProviderEvent>>>,
}

impl std::fmt::Debug for RecordingProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingProvider")
            .field("provider", &self.inner.key())
            .finish_non_exhaustive()
    }
}

impl RecordingProvider {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn SandboxProvider>) -> Self {
        RecordingProvider {
            inner,
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Every call so far.
    pub fn events(&self) -> Vec<ProviderEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The operations called so far, in order.
    pub fn operations(&self) -> Vec<Operation> {
        self.events().into_iter().map(|e| e.operation).collect()
    }

    /// Forgets the log.
    pub fn clear(&self) {
        if let Ok(mut e) = self.events.lock() {
            e.clear();
        }
    }

    fn record<T>(
        &self,
        operation: Operation,
        environment_id: &str,
        lease_id: Option<&str>,
        config: Option<&JsonObject>,
        result: &Result<T>,
    ) {
        let event = ProviderEvent {
            operation,
            environment_id: environment_id.to_owned(),
            timestamp: time::to_iso(&time::now()),
            provider_lease_id: lease_id.map(str::to_owned),
            config_keys: config
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }
}

#[async_trait]
impl SandboxProvider for RecordingProvider {
    fn key(&self) -> &str {
        self.inner.key()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn config_schema(&self) -> Value {
        self.inner.config_schema()
    }

    fn plugin_key(&self) -> String {
        self.inner.plugin_key()
    }

    async fn readiness(&self) -> Readiness {
        self.inner.readiness().await
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let r = self.inner.validate_config(config).await;
        self.record(Operation::ValidateConfig, "unknown", None, Some(config), &r);
        r
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let r = self.inner.probe(ctx).await;
        self.record(
            Operation::Probe,
            &ctx.environment_id,
            None,
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let r = self.inner.acquire(ctx, request).await;
        let id = r.as_ref().ok().and_then(|l| l.provider_lease_id.clone());
        self.record(
            Operation::Acquire,
            &ctx.environment_id,
            id.as_deref(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let r = self.inner.resume(ctx, lease).await;
        self.record(
            Operation::Resume,
            &ctx.environment_id,
            lease.id(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> Result<()> {
        let r = self.inner.release(ctx, lease, status).await;
        self.record(
            Operation::Release,
            &ctx.environment_id,
            lease.id(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let r = self.inner.destroy(ctx, lease).await;
        self.record(
            Operation::Destroy,
            &ctx.environment_id,
            lease.id(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let r = self.inner.realize_workspace(ctx, lease, workspace).await;
        self.record(
            Operation::RealizeWorkspace,
            &ctx.environment_id,
            lease.id(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let r = self.inner.execute(ctx, lease, request, output).await;
        self.record(
            Operation::Execute,
            &ctx.environment_id,
            lease.id(),
            Some(ctx.config.values()),
            &r,
        );
        r
    }
}

/// `expected` appears as a subsequence of the recorded operations.
pub fn assert_event_order(
    events: &[ProviderEvent],
    expected: &[Operation],
) -> std::result::Result<(), String> {
    let actual: Vec<Operation> = events.iter().map(|e| e.operation).collect();
    let mut it = actual.iter();
    if expected.iter().all(|want| it.any(|got| got == want)) {
        Ok(())
    } else {
        Err(format!(
            "Environment event order mismatch.\nexpected: {expected:?}\nactual: {actual:?}"
        ))
    }
}

fn position(
    events: &[ProviderEvent],
    environment_id: &str,
    ops: &[Operation],
    last: bool,
) -> Option<usize> {
    let mut matching = events.iter().enumerate().filter(|(_, e)| {
        e.environment_id == environment_id && ops.contains(&e.operation) && e.error.is_none()
    });
    if last {
        matching.next_back().map(|(i, _)| i)
    } else {
        matching.next().map(|(i, _)| i)
    }
}

/// An acquire and a later release or destroy exist for the environment.
pub fn assert_lease_lifecycle(
    events: &[ProviderEvent],
    environment_id: &str,
) -> std::result::Result<(usize, usize), String> {
    let acquire = position(events, environment_id, &[Operation::Acquire], false)
        .ok_or_else(|| format!("no successful acquire for environment {environment_id}"))?;
    let end = position(
        events,
        environment_id,
        &[Operation::Release, Operation::Destroy],
        true,
    )
    .ok_or_else(|| format!("no successful release or destroy for environment {environment_id}"))?;
    if acquire > end {
        return Err(format!(
            "acquire (event {acquire}) came after release/destroy (event {end})"
        ));
    }
    Ok((acquire, end))
}

/// A realize happened between acquire and release.
pub fn assert_workspace_realization_lifecycle(
    events: &[ProviderEvent],
    environment_id: &str,
) -> std::result::Result<(), String> {
    let (start, end) = assert_lease_lifecycle(events, environment_id)?;
    events[start..=end]
        .iter()
        .any(|e| e.operation == Operation::RealizeWorkspace)
        .then_some(())
        .ok_or_else(|| "no realizeWorkspace between acquire and release".to_owned())
}

/// At least one execute, every one between acquire and release.
pub fn assert_execution_lifecycle(
    events: &[ProviderEvent],
    environment_id: &str,
) -> std::result::Result<(), String> {
    let (start, end) = assert_lease_lifecycle(events, environment_id)?;
    let executes: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.operation == Operation::Execute && e.environment_id == environment_id)
        .map(|(i, _)| i)
        .collect();
    if executes.is_empty() {
        return Err("no execute recorded".into());
    }
    if executes.iter().any(|i| *i < start || *i > end) {
        return Err("an execute happened outside the lease lifecycle".into());
    }
    Ok(())
}

/// An event of `operation` failed (for `environment_id` when given).
pub fn assert_environment_error(
    events: &[ProviderEvent],
    operation: Operation,
    environment_id: Option<&str>,
) -> std::result::Result<(), String> {
    events
        .iter()
        .any(|e| {
            e.operation == operation
                && e.error.is_some()
                && environment_id.is_none_or(|id| e.environment_id == id)
        })
        .then_some(())
        .ok_or_else(|| format!("no failed {operation} event"))
}
