//! The provider conformance suite (spec 11 Part A).
//!
//! One public async check per line of the spec, each taking a [`Fixture`]
//! (the provider plus the parameters where providers differ), and
//! [`run`], the one-line entry point a provider's test file calls:
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use paperclip_env_testkit::{conformance, fake::FakeProvider};
//! let fake = FakeProvider::new();
//! let report = conformance::run(&conformance::Fixture::new(Arc::new(fake.clone()))
//!     .live_resources(move || fake.live_leases())).await;
//! report.assert_passed();
//! # }
//! ```
//!
//! Checks are selected by the provider's declared [`Capabilities`]; a
//! `SHOULD` line that fails is reported as a warning, not a failure.

mod checks;
pub mod environment;
pub mod live;

use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::secret::{
    InMemorySecretResolver, collect_secret_ref_paths, resolve_provider_config,
};
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, JsonObject, LeaseHandle, LeaseStatus,
    ProviderConfig, ProviderLease, SandboxProvider,
};
use serde_json::{Value, json};

pub use checks::*;

/// Requirement level of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Must hold.
    Must,
    /// Should hold; a failure is a warning.
    Should,
}

/// Why a check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// The behaviour is wrong.
    Failed(String),
    /// The check does not apply (capability not declared, fixture hook missing).
    Skipped(String),
}

/// What a check returns.
pub type CheckResult = std::result::Result<(), Fail>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::conformance::Fail::Failed(format!($($msg)+)));
        }
    };
}
pub(crate) use ensure;

/// Turns a provider error into a failure with context.
pub(crate) fn failed<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> Fail + '_ {
    move |e| Fail::Failed(format!("{context}: {e}"))
}

/// A hook run before a call, e.g. to arm a fault in an emulator.
pub type Hook = Arc<dyn Fn() + Send + Sync>;
/// A counter read from the provider or its emulator.
pub type Counter = Arc<dyn Fn() -> usize + Send + Sync>;

/// The provider under test and everything in which providers differ.
#[derive(Clone)]
pub struct Fixture {
    /// The provider.
    pub provider: Arc<dyn SandboxProvider>,
    /// A valid provider config (envelope stripped; secrets may be plaintext).
    pub config: JsonObject,
    /// A config `validate_config` must reject (A1.1), if the provider has one.
    pub invalid_config: Option<JsonObject>,
    /// Environment id used by the checks.
    pub environment_id: String,
    /// Run id used by the checks.
    pub run_id: String,
    /// Secret values that must never appear in lease metadata (A2.7).
    pub secret_values: Vec<String>,
    /// Counts the provider resources alive now (A1.3, A2.5, A4.1).
    pub live_resources: Option<Counter>,
    /// Counts resource creations so far (A2.6).
    pub create_calls: Option<Counter>,
    /// Counts command starts so far (A6.15).
    pub execute_calls: Option<Counter>,
    /// Makes the next acquire fail after partial creation (A2.5, A2.6).
    pub fail_next_acquire: Option<Hook>,
    /// Makes the next execute fail (A6.15).
    pub fail_next_execute: Option<Hook>,
    /// Makes the next release fail (A4.6).
    pub fail_next_release: Option<Hook>,
    /// Upper bound for any single call made by a check.
    pub call_timeout: Duration,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("provider", &self.provider.key())
            .field("config_keys", &self.config.keys().collect::<Vec<_>>())
            .field("environment_id", &self.environment_id)
            .finish_non_exhaustive()
    }
}

impl Fixture {
    /// A fixture with an empty config and no hooks.
    pub fn new(provider: Arc<dyn SandboxProvider>) -> Self {
        Fixture {
            provider,
            config: JsonObject::new(),
            invalid_config: None,
            environment_id: format!("conformance-env-{}", uuid::Uuid::new_v4()),
            run_id: format!("conformance-run-{}", uuid::Uuid::new_v4()),
            secret_values: Vec::new(),
            live_resources: None,
            create_calls: None,
            execute_calls: None,
            fail_next_acquire: None,
            fail_next_execute: None,
            fail_next_release: None,
            call_timeout: Duration::from_secs(60),
        }
    }

    /// Sets the valid config.
    pub fn config(mut self, config: Value) -> Self {
        self.config = config.as_object().cloned().unwrap_or_default();
        self
    }

    /// Sets the config validation must reject.
    pub fn invalid_config(mut self, config: Value) -> Self {
        self.invalid_config = config.as_object().cloned();
        self
    }

    /// Adds a secret value that must not reach metadata.
    pub fn secret_value(mut self, value: impl Into<String>) -> Self {
        self.secret_values.push(value.into());
        self
    }

    /// Sets the live-resource counter.
    pub fn live_resources(mut self, f: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.live_resources = Some(Arc::new(f));
        self
    }

    /// Sets the creation counter.
    pub fn create_calls(mut self, f: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.create_calls = Some(Arc::new(f));
        self
    }

    /// Sets the command-start counter.
    pub fn execute_calls(mut self, f: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.execute_calls = Some(Arc::new(f));
        self
    }

    /// Sets the acquire-failure hook.
    pub fn fail_next_acquire(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.fail_next_acquire = Some(Arc::new(f));
        self
    }

    /// Sets the execute-failure hook.
    pub fn fail_next_execute(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.fail_next_execute = Some(Arc::new(f));
        self
    }

    /// Sets the release-failure hook.
    pub fn fail_next_release(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.fail_next_release = Some(Arc::new(f));
        self
    }

    /// Sets the per-call upper bound.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub(crate) fn caps(&self) -> Capabilities {
        self.provider.capabilities()
    }

    pub(crate) fn require(&self, declared: bool, capability: &str) -> CheckResult {
        if declared {
            Ok(())
        } else {
            Err(Fail::Skipped(format!(
                "capability `{capability}` not declared"
            )))
        }
    }

    /// The config with `overrides` merged in.
    pub(crate) fn config_with(&self, overrides: Value) -> JsonObject {
        let mut config = self.config.clone();
        if let Value::Object(extra) = overrides {
            config.extend(extra);
        }
        config
    }

    /// A call context for `config` (plaintext at secret paths becomes inline secrets).
    pub(crate) async fn context(
        &self,
        config: &JsonObject,
    ) -> std::result::Result<CallContext, Fail> {
        let paths = collect_secret_ref_paths(&self.provider.config_schema());
        let resolved: ProviderConfig =
            resolve_provider_config(config, &paths, &InMemorySecretResolver::new())
                .await
                .map_err(failed("resolving the fixture config"))?;
        Ok(CallContext {
            company_id: Some("conformance-company".into()),
            environment_id: self.environment_id.clone(),
            issue_id: None,
            config: resolved,
        })
    }

    pub(crate) async fn timed<T>(
        &self,
        what: &str,
        future: impl std::future::Future<Output = paperclip_env_core::Result<T>>,
    ) -> std::result::Result<paperclip_env_core::Result<T>, Fail> {
        tokio::time::timeout(self.call_timeout, future)
            .await
            .map_err(|_| {
                Fail::Failed(format!(
                    "{what} did not return within {:?}",
                    self.call_timeout
                ))
            })
    }

    /// Acquires with `config` for the fixture's run.
    pub(crate) async fn acquire(
        &self,
        ctx: &CallContext,
    ) -> std::result::Result<ProviderLease, Fail> {
        let request = AcquireRequest {
            run_id: self.run_id.clone(),
            workspace_mode: None,
            ..Default::default()
        };
        self.timed("acquire", self.provider.acquire(ctx, &request))
            .await?
            .map_err(failed("acquire"))
    }

    /// Tears a lease down (destroy if declared, else release without reuse); errors ignored.
    pub(crate) async fn cleanup(&self, lease: &LeaseHandle) {
        if self.caps().destroy {
            if let Ok(ctx) = self.context(&self.config).await {
                let _ = self
                    .timed("destroy", self.provider.destroy(&ctx, lease))
                    .await;
            }
        } else if let Ok(ctx) = self
            .context(&self.config_with(json!({"reuseLease": false})))
            .await
        {
            let _ = self
                .timed(
                    "release",
                    self.provider.release(&ctx, lease, LeaseStatus::Released),
                )
                .await;
        }
    }

    pub(crate) fn live(&self) -> Option<usize> {
        self.live_resources.as_ref().map(|f| f())
    }
}

/// Turns an acquired lease into the handle later calls take.
pub(crate) fn handle(lease: &ProviderLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: lease.expires_at,
    }
}

/// Outcome of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Held.
    Passed,
    /// A MUST line failed.
    Failed(String),
    /// A SHOULD line failed.
    Warning(String),
    /// Not applicable.
    Skipped(String),
}

/// One line's result.
#[derive(Debug, Clone)]
pub struct LineResult {
    /// Spec id, e.g. `A6.9`.
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// What the line says.
    pub title: &'static str,
    /// Outcome.
    pub outcome: Outcome,
}

/// Every line's result.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per-line results, in spec order.
    pub lines: Vec<LineResult>,
}

impl Report {
    /// Lines that failed.
    pub fn failures(&self) -> Vec<&LineResult> {
        self.lines
            .iter()
            .filter(|l| matches!(l.outcome, Outcome::Failed(_)))
            .collect()
    }

    /// Lines that passed.
    pub fn passed(&self) -> Vec<&'static str> {
        self.lines
            .iter()
            .filter(|l| l.outcome == Outcome::Passed)
            .map(|l| l.id)
            .collect()
    }

    /// Lines skipped.
    pub fn skipped(&self) -> Vec<&'static str> {
        self.lines
            .iter()
            .filter(|l| matches!(l.outcome, Outcome::Skipped(_)))
            .map(|l| l.id)
            .collect()
    }

    /// A one-line-per-check summary.
    pub fn summary(&self) -> String {
        self.lines
            .iter()
            .map(|l| {
                let (tag, detail) = match &l.outcome {
                    Outcome::Passed => ("pass", String::new()),
                    Outcome::Failed(m) => ("FAIL", format!(": {m}")),
                    Outcome::Warning(m) => ("warn", format!(": {m}")),
                    Outcome::Skipped(m) => ("skip", format!(": {m}")),
                };
                format!("{tag} {} {}{detail}", l.id, l.title)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics listing every failed MUST line.
    pub fn assert_passed(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "conformance failures:\n{}",
            self.summary()
        );
    }
}

/// Runs every line against the fixture, sequentially.
pub async fn run(fixture: &Fixture) -> Report {
    let mut report = Report::default();
    for line in checks::LINES {
        let outcome = match (line.check)(fixture).await {
            Ok(()) => Outcome::Passed,
            Err(Fail::Skipped(why)) => Outcome::Skipped(why),
            Err(Fail::Failed(why)) if line.level == Level::Should => Outcome::Warning(why),
            Err(Fail::Failed(why)) => Outcome::Failed(why),
        };
        report.lines.push(LineResult {
            id: line.id,
            level: line.level,
            title: line.title,
            outcome,
        });
    }
    report
}
