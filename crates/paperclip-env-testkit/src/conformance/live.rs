//! Running the suites against a configured environment: a real E2B,
//! Daytona, Modal or Kubernetes account, an SSH host, a plugin, or an
//! emulator started with `paperclip-env emulate`.
//!
//! [`LiveSuite`] runs, for a `driver: "sandbox"` environment, every Part A
//! line against the provider named by `config.provider`, then the runtime
//! lines ([`super::environment::ENV_LINES`]) for every driver. Lines whose
//! fixture hooks (fault injection, resource counters) only an emulator can
//! provide are skipped. Everything the suite creates is released at the end,
//! and also when the run is interrupted:
//!
//! - runtime leases are recorded in the suite's own lease store; every one
//!   still active is released, in-flight acquisitions are waited for (the
//!   runtime tears down a sandbox that arrives after its caller gave up);
//! - provider resources made by Part A lines are tracked by a wrapper around
//!   the provider; what is still alive is destroyed, and runs are swept with
//!   [`SandboxProvider::list_run_resources`] where the provider declares it.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use paperclip_env_core::Environment;
//! use paperclip_env_testkit::{conformance::live::LiveSuite, fake::FakeProvider};
//!
//! let env = Environment::new("env-1", "Fake", "sandbox", serde_json::json!({"provider": "fake-plugin"}));
//! let suite = LiveSuite::builder(env)
//!     .provider(Arc::new(FakeProvider::new()))
//!     .only(["A6.1", "R4"])
//!     .build()
//!     .unwrap();
//! // Any future ends the run early (the CLI passes Ctrl-C); teardown still runs.
//! let outcome = suite.run(|line| println!("{} {:?}", line.id, line.outcome), std::future::pending()).await;
//! assert!(outcome.passed(), "{}", outcome.report.summary());
//! assert_eq!(outcome.report.passed(), ["A6.1", "R4"]);
//! # });
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::acquisition::is_in_flight;
use paperclip_env_core::secret::{
    InMemorySecretResolver, NewSecret, SecretRef, collect_secret_ref_paths, resolve_provider_config,
};
use paperclip_env_core::store::InMemoryLeaseStore;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Environment,
    EnvironmentRuntime, EnvironmentRuntimeDriver, Error, ExecuteRequest, JsonObject, LeaseHandle,
    LeaseStatus, OutputCollector, ProviderLease, ProviderProbe, Readiness, RealizeWorkspaceResult,
    Result, SandboxProvider, SecretResolver, WorkspaceSpec,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::environment::{ENV_LINES, EnvFixture};
use super::{Fail, Fixture, Level, LineResult, Outcome, Report};

/// Resolves references through the caller's resolver and keeps secrets the
/// runtime moves out of a config (inline plaintext) in memory, for this run.
struct LiveSecrets {
    created: InMemorySecretResolver,
    inner: Arc<dyn SecretResolver>,
}

#[async_trait]
impl SecretResolver for LiveSecrets {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString> {
        match self.created.resolve(reference).await {
            Ok(secret) => Ok(secret),
            Err(_) => self.inner.resolve(reference).await,
        }
    }

    async fn create(&self, secret: NewSecret) -> Result<String> {
        self.created.create(secret).await
    }
}

/// A resource a Part A line created and has not torn down yet.
struct Tracked {
    ctx: CallContext,
    lease: LeaseHandle,
}

#[derive(Default)]
struct TrackerState {
    live: BTreeMap<String, Tracked>,
    /// Runs acquired under, with a context to sweep them with.
    runs: BTreeMap<String, CallContext>,
}

/// The provider under test, recording what it holds so it can be torn down.
#[derive(Clone)]
struct TrackingProvider {
    inner: Arc<dyn SandboxProvider>,
    state: Arc<Mutex<TrackerState>>,
}

impl TrackingProvider {
    fn with_state<T>(&self, f: impl FnOnce(&mut TrackerState) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    fn track(&self, ctx: &CallContext, lease: &ProviderLease) {
        if let Some(id) = lease.provider_lease_id.clone().filter(|id| !id.is_empty()) {
            let handle = LeaseHandle {
                provider_lease_id: Some(id.clone()),
                metadata: lease.metadata.clone(),
                expires_at: lease.expires_at,
            };
            self.with_state(|s| {
                s.live.insert(
                    id,
                    Tracked {
                        ctx: ctx.clone(),
                        lease: handle,
                    },
                )
            });
        }
    }

    fn untrack(&self, lease: &LeaseHandle) {
        if let Some(id) = lease.id() {
            self.with_state(|s| s.live.remove(id));
        }
    }

    /// Destroys every tracked resource, then sweeps the runs; returns the
    /// ids torn down and the errors met.
    async fn teardown(&self, bound: Duration) -> (Vec<String>, Vec<String>) {
        let (live, runs) = self
            .with_state(|s| (std::mem::take(&mut s.live), std::mem::take(&mut s.runs)))
            .unwrap_or_default();
        let caps = self.inner.capabilities();
        let mut done = Vec::new();
        let mut errors = Vec::new();
        let mut handles: Vec<(String, CallContext, LeaseHandle)> = live
            .into_iter()
            .map(|(id, t)| (id, t.ctx, t.lease))
            .collect();
        if caps.run_lookup {
            for (run, ctx) in runs {
                match tokio::time::timeout(bound, self.inner.list_run_resources(&ctx, &run)).await {
                    Ok(Ok(found)) => {
                        for lease in found {
                            let id = lease.id().unwrap_or_default().to_owned();
                            if !id.is_empty() && !handles.iter().any(|(h, _, _)| *h == id) {
                                handles.push((id, ctx.clone(), lease));
                            }
                        }
                    }
                    Ok(Err(e)) => errors.push(format!("listing run {run}: {e}")),
                    Err(_) => errors.push(format!("listing run {run} timed out")),
                }
            }
        }
        for (id, mut ctx, lease) in handles {
            let call = async {
                if caps.destroy {
                    self.inner.destroy(&ctx, &lease).await
                } else {
                    let mut values = ctx.config.values().clone();
                    values.insert("reuseLease".into(), Value::Bool(false));
                    let mut config = paperclip_env_core::ProviderConfig::new(values);
                    for path in ctx
                        .config
                        .secret_paths()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                    {
                        if let Some(secret) = ctx.config.secret(&path) {
                            config = config.with_secret(path, secret.clone());
                        }
                    }
                    ctx.config = config;
                    self.inner
                        .release(&ctx, &lease, LeaseStatus::Released)
                        .await
                }
            };
            match tokio::time::timeout(bound, call).await {
                Ok(Ok(())) => done.push(id),
                Ok(Err(e)) => errors.push(format!("tearing down {id}: {e}")),
                Err(_) => errors.push(format!("tearing down {id} timed out")),
            }
        }
        (done, errors)
    }
}

#[async_trait]
impl SandboxProvider for TrackingProvider {
    fn key(&self) -> &str {
        self.inner.key()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn lease_capabilities(&self, lease: &LeaseHandle) -> Capabilities {
        self.inner.lease_capabilities(lease)
    }
    fn lease_label(&self, lease: &LeaseHandle) -> String {
        self.inner.lease_label(lease)
    }
    fn default_lease_deadline(&self) -> Option<Duration> {
        self.inner.default_lease_deadline()
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
        self.inner.validate_config(config).await
    }
    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        self.inner.probe(ctx).await
    }
    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        self.with_state(|s| s.runs.insert(request.run_id.clone(), ctx.clone()));
        let lease = self.inner.acquire(ctx, request).await?;
        self.track(ctx, &lease);
        Ok(lease)
    }
    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let resumed = self.inner.resume(ctx, lease).await?;
        self.track(ctx, &resumed);
        Ok(resumed)
    }
    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> Result<()> {
        self.inner.release(ctx, lease, status).await?;
        if !ctx.config.reuse_lease() {
            self.untrack(lease);
        }
        Ok(())
    }
    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        self.inner.destroy(ctx, lease).await?;
        self.untrack(lease);
        Ok(())
    }
    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        self.inner.realize_workspace(ctx, lease, workspace).await
    }
    async fn workspace_transport(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
    ) -> Result<Option<Arc<dyn paperclip_env_core::workspace::WorkspaceTransport>>> {
        self.inner.workspace_transport(ctx, lease).await
    }
    async fn list_run_resources(
        &self,
        ctx: &CallContext,
        run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        self.inner.list_run_resources(ctx, run_id).await
    }
    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        self.inner.execute(ctx, lease, request, output).await
    }
}

/// One selectable line of a live run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    /// Line id (`A6.1`, `R4`, …).
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// What it checks.
    pub title: &'static str,
}

/// Every line a live run can select: Part A, then the runtime lines.
pub fn all_lines() -> Vec<LineInfo> {
    super::LINES
        .iter()
        .map(|l| LineInfo {
            id: l.id,
            level: l.level,
            title: l.title,
        })
        .chain(ENV_LINES.iter().map(|l| LineInfo {
            id: l.id,
            level: l.level,
            title: l.title,
        }))
        .collect()
}

/// Whether `id` is selected by `only` (empty: every line). A selector
/// matches its id and the ids below it: `A6` selects `A6.1` … `A6.15`, a
/// part letter (`A`, `R`) every line of the part.
fn selected(only: &[String], id: &str) -> bool {
    only.is_empty()
        || only.iter().any(|sel| {
            let sel = sel.trim();
            let head = id.get(..sel.len());
            let next = id.as_bytes().get(sel.len()).copied();
            !sel.is_empty()
                && head.is_some_and(|h| h.eq_ignore_ascii_case(sel))
                && (next.is_none()
                    || next == Some(b'.')
                    || (sel.chars().all(|c| c.is_ascii_alphabetic())
                        && next.is_some_and(|c| c.is_ascii_digit())))
        })
}

/// What teardown did after the lines ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Runtime leases released by the teardown (left by an interrupted line).
    pub released_leases: Vec<String>,
    /// Provider resources destroyed by the teardown.
    pub destroyed_resources: Vec<String>,
    /// What could not be cleaned up; non-empty means something may be left.
    pub errors: Vec<String>,
}

impl Cleanup {
    /// Whether everything was cleaned up.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// The result of [`LiveSuite::run`].
#[derive(Debug, Clone)]
pub struct LiveOutcome {
    /// Per-line results of the lines that ran.
    pub report: Report,
    /// Whether the cancel future fired before every line ran.
    pub interrupted: bool,
    /// What the teardown did.
    pub cleanup: Cleanup,
}

impl LiveOutcome {
    /// Whether every MUST line held, the run completed, and cleanup was clean.
    pub fn passed(&self) -> bool {
        !self.interrupted && self.report.failures().is_empty() && self.cleanup.is_clean()
    }
}

/// Builds a [`LiveSuite`].
pub struct LiveSuiteBuilder {
    environment: Environment,
    providers: Vec<Arc<dyn SandboxProvider>>,
    drivers: Vec<Arc<dyn EnvironmentRuntimeDriver>>,
    secrets: Option<Arc<dyn SecretResolver>>,
    secret_values: Vec<String>,
    only: Vec<String>,
    call_timeout: Duration,
}

impl LiveSuiteBuilder {
    /// A secret the environment uses from outside its config (a provider's
    /// env fallback such as `E2B_API_KEY`): it must not appear in metadata
    /// or lease rows either (A2.7, R13).
    pub fn secret_value(mut self, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.secret_values.push(value);
        }
        self
    }

    /// Registers a sandbox provider; the one whose key is the environment's
    /// `config.provider` also gets the Part A lines.
    pub fn provider(mut self, provider: Arc<dyn SandboxProvider>) -> Self {
        self.providers.push(provider);
        self
    }

    /// Registers a runtime driver (`ssh`, `plugin`, your own).
    pub fn driver(mut self, driver: Arc<dyn EnvironmentRuntimeDriver>) -> Self {
        self.drivers.push(driver);
        self
    }

    /// Resolves the config's secret references (default: none resolvable).
    pub fn secrets(mut self, secrets: Arc<dyn SecretResolver>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Runs only these lines (ids, or prefixes such as `A6`).
    pub fn only(mut self, ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.only.extend(ids.into_iter().map(Into::into));
        self
    }

    /// Upper bound of one call (default 120 s: real accounts cold-start).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Checks the selection and the environment; secrets are resolved when
    /// the suite runs.
    pub fn build(self) -> Result<LiveSuite> {
        let known = all_lines();
        for sel in &self.only {
            if !known
                .iter()
                .any(|l| selected(std::slice::from_ref(sel), l.id))
            {
                return Err(Error::invalid_field(
                    "only",
                    format!(
                        "`only` names no conformance line {sel:?}; lines are {}",
                        known.iter().map(|l| l.id).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let provider_key = (self.environment.driver == "sandbox")
            .then(|| {
                self.environment
                    .config
                    .get("provider")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .flatten();
        let tracked = match &provider_key {
            Some(key) => {
                let provider = self
                    .providers
                    .iter()
                    .find(|p| p.key() == key)
                    .cloned()
                    .ok_or_else(|| {
                        Error::invalid_field(
                            "config.provider",
                            format!(
                                "provider {key:?} is not registered (registered: {})",
                                self.providers
                                    .iter()
                                    .map(|p| p.key().to_owned())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                Some(TrackingProvider {
                    inner: provider,
                    state: Arc::new(Mutex::new(TrackerState::default())),
                })
            }
            None => None,
        };
        let secrets = Arc::new(LiveSecrets {
            created: InMemorySecretResolver::new(),
            inner: self
                .secrets
                .unwrap_or_else(|| Arc::new(InMemorySecretResolver::new())),
        });
        let leases = Arc::new(InMemoryLeaseStore::new());
        let mut builder = EnvironmentRuntime::builder()
            .lease_store(leases.clone())
            .secrets(secrets.clone());
        for provider in self.providers {
            let registered: Arc<dyn SandboxProvider> = match &tracked {
                Some(t) if t.inner.key() == provider.key() => Arc::new(t.clone()),
                _ => provider,
            };
            builder = builder.provider(registered);
        }
        for driver in self.drivers {
            builder = builder.driver(driver);
        }
        let runtime = builder.build();
        if runtime.driver(&self.environment.driver).is_none() {
            return Err(Error::DriverNotRegistered {
                driver: self.environment.driver.clone(),
            });
        }
        Ok(LiveSuite {
            environment: self.environment,
            runtime,
            leases,
            secrets,
            tracked,
            secret_values: self.secret_values,
            only: self.only,
            call_timeout: self.call_timeout,
        })
    }
}

/// The conformance suites against one configured environment.
pub struct LiveSuite {
    environment: Environment,
    runtime: EnvironmentRuntime,
    leases: Arc<InMemoryLeaseStore>,
    secrets: Arc<LiveSecrets>,
    tracked: Option<TrackingProvider>,
    secret_values: Vec<String>,
    only: Vec<String>,
    call_timeout: Duration,
}

impl std::fmt::Debug for LiveSuite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSuite")
            .field("environment", &self.environment.id)
            .field("driver", &self.environment.driver)
            .field("only", &self.only)
            .finish_non_exhaustive()
    }
}

/// Every secret reference anywhere in `value`.
fn secret_refs(value: &Value, out: &mut Vec<SecretRef>) {
    if let Some(reference) = SecretRef::from_config_value(value) {
        out.push(reference);
        return;
    }
    match value {
        Value::Object(map) => map.values().for_each(|v| secret_refs(v, out)),
        Value::Array(items) => items.iter().for_each(|v| secret_refs(v, out)),
        _ => {}
    }
}

impl LiveSuite {
    /// A builder for `environment`.
    pub fn builder(environment: Environment) -> LiveSuiteBuilder {
        LiveSuiteBuilder {
            environment,
            providers: Vec::new(),
            drivers: Vec::new(),
            secrets: None,
            secret_values: Vec::new(),
            only: Vec::new(),
            call_timeout: Duration::from_secs(120),
        }
    }

    /// The lines this suite will run, in order (Part A only for sandbox environments).
    pub fn lines(&self) -> Vec<LineInfo> {
        all_lines()
            .into_iter()
            .filter(|l| self.tracked.is_some() || l.id.starts_with('R'))
            .filter(|l| selected(&self.only, l.id))
            .collect()
    }

    /// The Part A fixture: the stored config with references resolved
    /// (plaintext at secret paths, as a user would type it), and the secret
    /// values that must never reach metadata.
    async fn provider_fixture(
        &self,
        provider: &TrackingProvider,
    ) -> Result<(Fixture, Vec<String>)> {
        let mut config = self
            .environment
            .config
            .as_object()
            .cloned()
            .unwrap_or_default();
        config.remove("provider");
        let paths = collect_secret_ref_paths(&provider.config_schema());
        let resolved = resolve_provider_config(&config, &paths, self.secrets.as_ref()).await?;
        let secrets: Vec<String> = resolved
            .secret_paths()
            .filter_map(|p| resolved.secret(p))
            .map(|s| s.expose_secret().to_owned())
            .filter(|s| !s.is_empty())
            .chain(self.secret_values.iter().cloned())
            .collect();
        let mut fixture = Fixture::new(Arc::new(provider.clone()))
            .config(Value::Object(resolved.expose_to_json()))
            .call_timeout(self.call_timeout);
        fixture.environment_id = self.environment.id.clone();
        for secret in &secrets {
            fixture = fixture.secret_value(secret.clone());
        }
        Ok((fixture, secrets))
    }

    /// Runs the selected lines in order, calling `on_line` after each, until
    /// they are done or `cancel` completes; then tears down everything the
    /// run created.
    pub async fn run(
        &self,
        mut on_line: impl FnMut(&LineResult),
        cancel: impl Future<Output = ()>,
    ) -> LiveOutcome {
        let mut report = Report::default();
        let mut setup_errors = Vec::new();
        let lines = async {
            let mut env_secrets = self.secret_values.clone();
            if let Some(provider) = &self.tracked {
                match self.provider_fixture(provider).await {
                    Ok((fixture, secrets)) => {
                        env_secrets.extend(secrets);
                        for line in super::LINES.iter().filter(|l| selected(&self.only, l.id)) {
                            let outcome = outcome(line.level, (line.check)(&fixture).await);
                            let result = LineResult {
                                id: line.id,
                                level: line.level,
                                title: line.title,
                                outcome,
                            };
                            on_line(&result);
                            report.lines.push(result);
                        }
                    }
                    Err(e) => setup_errors.push(format!("resolving the provider config: {e}")),
                }
            }
            let mut refs = Vec::new();
            secret_refs(&self.environment.config, &mut refs);
            for reference in refs {
                match self.secrets.resolve(&reference).await {
                    Ok(secret) => env_secrets.push(secret.expose_secret().to_owned()),
                    Err(e) => setup_errors.push(format!("resolving a secret reference: {e}")),
                }
            }
            env_secrets.retain(|s| !s.is_empty());
            let mut fixture = EnvFixture::new(self.runtime.clone(), self.environment.clone())
                .call_timeout(self.call_timeout);
            for secret in BTreeSet::from_iter(env_secrets) {
                fixture = fixture.secret_value(secret);
            }
            for line in ENV_LINES.iter().filter(|l| selected(&self.only, l.id)) {
                let outcome = outcome(line.level, (line.check)(&fixture).await);
                let result = LineResult {
                    id: line.id,
                    level: line.level,
                    title: line.title,
                    outcome,
                };
                on_line(&result);
                report.lines.push(result);
            }
        };
        let interrupted = tokio::select! {
            () = lines => false,
            () = cancel => true,
        };
        let mut cleanup = self.teardown().await;
        cleanup.errors.splice(0..0, setup_errors);
        LiveOutcome {
            report,
            interrupted,
            cleanup,
        }
    }

    /// Releases what the runtime still holds and destroys what the provider
    /// wrapper still tracks.
    async fn teardown(&self) -> Cleanup {
        let mut cleanup = Cleanup::default();
        // Acquisitions whose caller was dropped finish in their own task:
        // wait for them to record the resource (and tear it down).
        let settle = tokio::time::Instant::now() + self.call_timeout;
        while self.leases.all().iter().any(is_in_flight) {
            if tokio::time::Instant::now() >= settle {
                cleanup
                    .errors
                    .push("an acquisition was still in flight at teardown".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for lease in self.leases.all() {
            let action = if lease.status == LeaseStatus::Active {
                Some(
                    self.runtime
                        .release_lease(&self.environment, &lease, LeaseStatus::Released),
                )
            } else {
                None
            };
            let Some(action) = action else {
                if lease.cleanup_status == Some(paperclip_env_core::CleanupStatus::Failed) {
                    match tokio::time::timeout(
                        self.call_timeout,
                        self.runtime.retry_cleanup(&self.environment, &lease),
                    )
                    .await
                    {
                        Ok(Ok(Some(record)))
                            if record.lease.cleanup_status
                                != Some(paperclip_env_core::CleanupStatus::Failed) =>
                        {
                            cleanup.released_leases.push(lease.id.clone());
                        }
                        _ => cleanup
                            .errors
                            .push(format!("lease {}: provider cleanup failed", lease.id)),
                    }
                }
                continue;
            };
            match tokio::time::timeout(self.call_timeout, action).await {
                Ok(Ok(Some(record)))
                    if record.lease.cleanup_status
                        != Some(paperclip_env_core::CleanupStatus::Failed) =>
                {
                    cleanup.released_leases.push(lease.id.clone());
                }
                Ok(Ok(_)) => cleanup
                    .errors
                    .push(format!("lease {}: provider cleanup failed", lease.id)),
                Ok(Err(e)) => cleanup.errors.push(format!("releasing {}: {e}", lease.id)),
                Err(_) => cleanup
                    .errors
                    .push(format!("releasing {} timed out", lease.id)),
            }
        }
        if let Some(provider) = &self.tracked {
            let (destroyed, errors) = provider.teardown(self.call_timeout).await;
            cleanup.destroyed_resources = destroyed;
            cleanup.errors.extend(errors);
        }
        cleanup
    }
}

fn outcome(level: Level, result: super::CheckResult) -> Outcome {
    match result {
        Ok(()) => Outcome::Passed,
        Err(Fail::Skipped(why)) => Outcome::Skipped(why),
        Err(Fail::Failed(why)) if level == Level::Should => Outcome::Warning(why),
        Err(Fail::Failed(why)) => Outcome::Failed(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_ids_and_their_children() {
        let only = vec!["A6".to_owned(), "r4".to_owned()];
        assert!(selected(&only, "A6.1"));
        assert!(selected(&only, "A6.15"));
        assert!(selected(&only, "R4"));
        assert!(!selected(&only, "R14"));
        assert!(!selected(&only, "A7.1"));
        assert!(selected(&[], "A7.1"));
        let part = vec!["R".to_owned()];
        assert!(selected(&part, "R1") && selected(&part, "R14"));
        assert!(!selected(&part, "A1.1"));
        assert!(!selected(&["R1".to_owned()], "R14"));
    }

    #[test]
    fn unknown_lines_are_refused_naming_the_field() {
        let env = Environment::new("e", "E", "local", serde_json::json!({}));
        let err = LiveSuite::builder(env).only(["Z9"]).build().unwrap_err();
        assert!(err.to_string().contains("Z9"), "{err}");
    }
}
