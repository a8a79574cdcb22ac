//! Leak drills: acquisitions interrupted by a deadline or by the death of
//! their process must leave no resource at the service, and a canary secret
//! given inline must appear in no log, row or `Debug` output. Every
//! provider that declares [`Capabilities::run_lookup`] runs them from its own
//! test file against its emulator, like the conformance suite.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use paperclip_env_testkit::fake::FakeProvider;
//! use paperclip_env_testkit::leak_drills::{LeakDrill, crash_rounds, deadline_rounds};
//! let fake = FakeProvider::new();
//! let (live, stall) = (fake.clone(), fake.clone());
//! let drill = LeakDrill::new(Arc::new(fake), serde_json::json!({"provider": "fake-plugin"}))
//!     .live(move || live.live_leases())
//!     .slow_create(move |d| stall.faults().stall_after_create(d.unwrap_or_default()));
//! crash_rounds(&drill, 2).await.unwrap();
//! deadline_rounds(&drill, 2).await.unwrap();
//! # });
//! ```
//!
//! - [`crash_rounds`]: the provider creates its resource and its caller's
//!   process "dies" (the call never returns, as after `kill -9`): the row
//!   written before the create stays in flight, its heartbeat stops, and one
//!   reaper pass must find the resource by run label and destroy it.
//! - [`deadline_rounds`]: the service answers the create after the caller's
//!   deadline: the caller gets its timeout at once and the late resource must
//!   be torn down without anyone's help.
//! - [`silent_service_round`]: the service stops answering under a held
//!   lease: execute, release and probe each return within the runtime's
//!   deadline (the failed cleanup recorded), and once the service answers
//!   again one reaper pass removes the resource.
//!
//! [`Capabilities::run_lookup`]: paperclip_env_core::Capabilities::run_lookup

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use paperclip_env_core::secret::{InMemorySecretResolver, SecretResolver};
use paperclip_env_core::store::InMemoryLeaseStore;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, ConfigValidation, Environment, EnvironmentRuntime,
    Error, ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, OutputCollector, ProviderLease,
    ProviderProbe, Readiness, RealizeWorkspaceResult, Reaper, Result, RuntimeOptions,
    SandboxProvider, WorkspaceSpec, async_trait,
};
use serde_json::Value;

use crate::logs::LogCapture;

type Live = Arc<dyn Fn() -> usize + Send + Sync>;
type SlowCreate = Arc<dyn Fn(Option<Duration>) + Send + Sync>;
type Silence = Arc<dyn Fn(bool) + Send + Sync>;

/// What a drill needs to know about one provider and its emulator.
#[derive(Clone)]
pub struct LeakDrill {
    provider: Arc<dyn SandboxProvider>,
    config: Value,
    live: Live,
    slow_create: Option<SlowCreate>,
    silence: Option<Silence>,
    canary: Option<String>,
    call_deadline: Duration,
}

impl std::fmt::Debug for LeakDrill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeakDrill")
            .field("provider", &self.provider.key())
            .field("call_deadline", &self.call_deadline)
            .finish_non_exhaustive()
    }
}

impl LeakDrill {
    /// A drill of `provider` with the environment config `config` (with
    /// `provider`; leave `timeoutMs` out, so calls get the runtime's short
    /// default deadline).
    pub fn new(provider: Arc<dyn SandboxProvider>, config: Value) -> Self {
        LeakDrill {
            provider,
            config,
            live: Arc::new(|| 0),
            slow_create: None,
            silence: None,
            canary: None,
            call_deadline: Duration::from_millis(300),
        }
    }

    /// How many resources the service holds now (the emulator's count).
    pub fn live(mut self, live: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.live = Arc::new(live);
        self
    }

    /// Makes the service answer creates this much later than it makes the
    /// resource (`None`: normal speed). Needed by [`deadline_rounds`].
    pub fn slow_create(mut self, slow: impl Fn(Option<Duration>) + Send + Sync + 'static) -> Self {
        self.slow_create = Some(Arc::new(slow));
        self
    }

    /// Makes the service stop answering (`true`) or answer again, e.g.
    /// through a [`SilentProxy`](crate::fixtures::silent_proxy::SilentProxy)
    /// the config points at. Needed by [`silent_service_round`].
    pub fn silence(mut self, silence: impl Fn(bool) + Send + Sync + 'static) -> Self {
        self.silence = Some(Arc::new(silence));
        self
    }

    /// A secret the config holds inline: it must be moved to the secret
    /// store and appear in no log line, row, environment or `Debug` output.
    pub fn canary(mut self, secret: impl Into<String>) -> Self {
        self.canary = Some(secret.into());
        self
    }

    /// The runtime's default call deadline in the drills (300 ms).
    pub fn call_deadline(mut self, deadline: Duration) -> Self {
        self.call_deadline = deadline;
        self
    }
}

/// Wraps the provider under drill: declares no acquire bound of its own (so
/// the drill's short deadline applies) and, when `die` is set, never
/// returns from a successful acquire, as if its process had been killed.
struct Drilled {
    inner: Arc<dyn SandboxProvider>,
    die: AtomicBool,
}

#[async_trait]
impl SandboxProvider for Drilled {
    fn key(&self) -> &str {
        self.inner.key()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn lease_capabilities(&self, lease: &LeaseHandle) -> Capabilities {
        self.inner.lease_capabilities(lease)
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
        let lease = self.inner.acquire(ctx, request).await?;
        if self.die.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(lease)
    }
    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        self.inner.resume(ctx, lease).await
    }
    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> Result<()> {
        self.inner.release(ctx, lease, status).await
    }
    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        self.inner.destroy(ctx, lease).await
    }
    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        self.inner.realize_workspace(ctx, lease, workspace).await
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
    ) -> Result<paperclip_env_core::CommandExit> {
        self.inner.execute(ctx, lease, request, output).await
    }
}

struct Rig {
    runtime: EnvironmentRuntime,
    store: Arc<InMemoryLeaseStore>,
    drilled: Arc<Drilled>,
    heartbeat: Duration,
}

fn rig(drill: &LeakDrill) -> Rig {
    let drilled = Arc::new(Drilled {
        inner: drill.provider.clone(),
        die: AtomicBool::new(false),
    });
    let store = Arc::new(InMemoryLeaseStore::new());
    let secrets: Arc<dyn SecretResolver> = Arc::new(InMemorySecretResolver::new());
    let heartbeat = Duration::from_millis(50);
    let runtime = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .secrets(secrets)
        .provider(drilled.clone())
        .options(RuntimeOptions {
            default_call_deadline: drill.call_deadline,
            probe_deadline: drill.call_deadline,
            deadline_grace: Duration::ZERO,
            acquisition_heartbeat: heartbeat,
            ..Default::default()
        })
        .build();
    Rig {
        runtime,
        store,
        drilled,
        heartbeat,
    }
}

async fn until(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> std::result::Result<(), String> {
    let start = tokio::time::Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting until {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn environment(drill: &LeakDrill, round: usize) -> Environment {
    Environment::new(
        format!("env-drill-{round}"),
        format!("Leak drill {round}"),
        "sandbox",
        drill.config.clone(),
    )
}

fn check_canary(
    drill: &LeakDrill,
    rig: &Rig,
    logs: &LogCapture,
    shown: &[String],
) -> std::result::Result<(), String> {
    let Some(canary) = drill.canary.as_deref() else {
        return Ok(());
    };
    let rows = serde_json::to_string(&rig.store.all()).unwrap_or_default();
    if rows.contains(canary) {
        return Err("the canary secret is in a lease row".into());
    }
    if logs.text().contains(canary) {
        return Err("the canary secret is in a log line".into());
    }
    if let Some(text) = shown.iter().find(|s| s.contains(canary)) {
        return Err(format!("the canary secret is in a shown value: {text}"));
    }
    Ok(())
}

/// `rounds` acquisitions whose process "dies" right after the provider
/// created the resource; after each, one reaper pass must leave the service
/// with as many resources as before. See the [module docs](self).
pub async fn crash_rounds(drill: &LeakDrill, rounds: usize) -> std::result::Result<(), String> {
    let (logs, _guard) = LogCapture::start();
    let rig = rig(drill);
    let baseline = (drill.live)();
    rig.drilled.die.store(true, Ordering::SeqCst);
    let mut shown = Vec::new();
    for round in 0..rounds {
        let env = environment(drill, round);
        shown.push(format!("{env:?}"));
        let run = format!("drill-crash-{round}-{}", uuid::Uuid::new_v4());
        let input = paperclip_env_core::AcquireRunLease::for_run(env, run);
        shown.push(format!("{input:?}"));
        match rig.runtime.acquire_run_lease(input).await {
            Err(Error::Timeout { .. }) => {}
            Err(e) => return Err(format!("round {round}: acquire failed otherwise: {e}")),
            Ok(_) => return Err(format!("round {round}: a dying acquire returned a lease")),
        }
        until(
            "the service holds the unrecorded resource",
            Duration::from_secs(30),
            || (drill.live)() > baseline,
        )
        .await
        .map_err(|e| format!("round {round}: {e}"))?;
        // The provider's future is dropped at the hard bound (twice the
        // deadline); three missed beats later the row is stale.
        tokio::time::sleep(drill.call_deadline * 2 + rig.heartbeat * 4).await;
        let report = Reaper::new(rig.runtime.clone()).run_once().await;
        shown.push(format!("{report:?}"));
        if report.orphaned.len() != 1 || !report.failures.is_empty() {
            return Err(format!(
                "round {round}: the reaper did not sweep the orphan: {report:?}"
            ));
        }
        until(
            "the orphaned resource is gone",
            Duration::from_secs(30),
            || (drill.live)() == baseline,
        )
        .await
        .map_err(|e| format!("round {round}: {e} ({} live)", (drill.live)()))?;
    }
    check_canary(drill, &rig, &logs, &shown)
}

/// `rounds` acquisitions whose service answers after the caller's deadline:
/// the caller gets its timeout and the late resource is torn down by the
/// acquisition itself, with no reaper. See the [module docs](self).
pub async fn deadline_rounds(drill: &LeakDrill, rounds: usize) -> std::result::Result<(), String> {
    let Some(slow) = drill.slow_create.clone() else {
        return Err("deadline rounds need LeakDrill::slow_create".into());
    };
    let (logs, _guard) = LogCapture::start();
    let rig = rig(drill);
    let baseline = (drill.live)();
    // Later than the caller's deadline, sooner than the hard bound.
    slow(Some(drill.call_deadline + drill.call_deadline / 2));
    let mut shown = Vec::new();
    let outcome = async {
        for round in 0..rounds {
            let env = environment(drill, round);
            let run = format!("drill-deadline-{round}-{}", uuid::Uuid::new_v4());
            let caller = tokio::time::timeout(
                drill.call_deadline * 4,
                rig.runtime
                    .acquire_run_lease(paperclip_env_core::AcquireRunLease::for_run(env, run)),
            )
            .await
            .map_err(|_| format!("round {round}: the caller was not answered at its deadline"))?;
            match caller {
                Err(Error::Timeout { .. }) => {}
                Err(e) => return Err(format!("round {round}: acquire failed otherwise: {e}")),
                Ok(r) => {
                    shown.push(format!("{r:?}"));
                    return Err(format!("round {round}: the slow acquire beat its deadline"));
                }
            }
            until(
                "the late resource is torn down",
                Duration::from_secs(30),
                || (drill.live)() == baseline,
            )
            .await
            .map_err(|e| format!("round {round}: {e} ({} live)", (drill.live)()))?;
        }
        Ok(())
    }
    .await;
    slow(None);
    outcome?;
    // The row is closed just after the teardown it records.
    let closed = |l: &paperclip_env_core::EnvironmentLease| {
        matches!(l.status, LeaseStatus::Expired | LeaseStatus::Failed)
    };
    if until("every row is closed", Duration::from_secs(10), || {
        rig.store.all().iter().all(closed)
    })
    .await
    .is_err()
    {
        let open: Vec<_> = rig.store.all().into_iter().filter(|l| !closed(l)).collect();
        return Err(format!("a deadline round left an open row: {open:?}"));
    }
    check_canary(drill, &rig, &logs, &shown)
}

/// Acquires a lease, silences the service, and checks that execute, release
/// and probe each return within the runtime's deadline, the release
/// recording a failed cleanup; then lets the service answer again and
/// checks that one reaper pass removes the resource. See the
/// [module docs](self).
pub async fn silent_service_round(drill: &LeakDrill) -> std::result::Result<(), String> {
    let Some(silence) = drill.silence.clone() else {
        return Err("the silent-service round needs LeakDrill::silence".into());
    };
    let rig = rig(drill);
    let baseline = (drill.live)();
    let env = environment(drill, 0);
    let run = format!("drill-silent-{}", uuid::Uuid::new_v4());
    let record = rig
        .runtime
        .acquire_run_lease(paperclip_env_core::AcquireRunLease::for_run(
            env.clone(),
            run,
        ))
        .await
        .map_err(|e| format!("acquire on an answering service failed: {e}"))?;
    let lease = record.lease;
    silence(true);
    let bound = drill.call_deadline * 3;
    let outcome = async {
        let execute = tokio::time::timeout(
            bound,
            rig.runtime
                .execute(&env, &lease, &ExecuteRequest::new("true")),
        )
        .await
        .map_err(|_| format!("execute on a silent service outlived {bound:?}"))?;
        if !matches!(execute, Err(Error::Timeout { .. })) {
            return Err(format!("execute on a silent service: {execute:?}"));
        }
        let probe = tokio::time::timeout(bound, rig.runtime.probe(&env))
            .await
            .map_err(|_| format!("probe of a silent service outlived {bound:?}"))?;
        if matches!(&probe, Ok(p) if p.ok) {
            return Err("probe of a silent service passed".into());
        }
        let released = tokio::time::timeout(
            bound,
            rig.runtime
                .release_lease(&env, &lease, LeaseStatus::Released),
        )
        .await
        .map_err(|_| format!("release on a silent service outlived {bound:?}"))?
        .map_err(|e| format!("release on a silent service: {e}"))?
        .ok_or("the released row vanished")?;
        if released.lease.cleanup_status != Some(paperclip_env_core::CleanupStatus::Failed) {
            return Err(format!(
                "a release the service never answered is not a failed cleanup: {:?}",
                released.lease
            ));
        }
        Ok(())
    }
    .await;
    silence(false);
    outcome?;
    let reaper = Reaper::new(rig.runtime.clone()).options(paperclip_env_core::ReaperOptions {
        initial_backoff: Duration::ZERO,
        ..Default::default()
    });
    let report = reaper.run_once().await;
    if report.cleaned_up != vec![lease.id.clone()] {
        return Err(format!("the failed cleanup was not retried: {report:?}"));
    }
    until("the resource is gone", Duration::from_secs(30), || {
        (drill.live)() == baseline
    })
    .await
}
