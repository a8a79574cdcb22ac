//! The reaper: makes leaked leases impossible by default.
//!
//! A lease leaks when the process holding it dies between acquire and
//! release, when its run finishes without releasing it, or when provider
//! cleanup fails once and is never tried again. One [`Reaper::run_once`] pass:
//!
//! 1. releases **expired** active leases (`expiresAt` passed, or a sandbox /
//!    plugin lease older than [`RuntimeOptions::max_lease_lifetime`]) and **stranded**
//!    ones (their run is finished according to the host, or they are older
//!    than [`ReaperOptions::max_active_age`]) through their driver with status
//!    `expired` (reusable leases are destroyed, since a plain release would
//!    keep their resource for the next run);
//! 2. sweeps **orphaned acquisitions**: in-flight rows
//!    ([`crate::acquisition`]) whose heartbeat stopped for three beats of
//!    [`RuntimeOptions::acquisition_heartbeat`] belong to a process that died
//!    between writing the row and recording the provider's answer; the
//!    provider is asked for the resources labelled with the row's run and
//!    each one no lease records is destroyed;
//! 3. retries **failed cleanups**: `pending_cleanup` rows of
//!    [`LeaseStore::list_failed_cleanups`], with exponential backoff on the
//!    attempt count, counted from `updatedAt`. As in Paperclip 2026.916, the
//!    count lives in `metadata.pendingCleanupRetryAttempts`, each attempt is
//!    claimed with a compare-and-swap ([`LeaseStore::claim_cleanup_attempt`])
//!    before the teardown, and after 5 attempts
//!    ([`ReaperOptions::max_cleanup_attempts`]) the lease is left for manual
//!    cleanup, warned about once (`metadata.pendingCleanupRetryCapWarned`).
//!
//! While a release runs, the reaper renews its claim every third of
//! [`ReaperOptions::claim_ttl`], so a release that takes longer than the TTL
//! (a slow provider, a long deadline) is never started twice.
//!
//! Every lease is claimed with [`LeaseStore::try_claim`] before it is acted
//! on, so reapers on several hosts sharing one durable store never release
//! the same lease twice; running a pass again is harmless.
//!
//! [`LeaseStore::list_failed_cleanups`]: crate::LeaseStore::list_failed_cleanups
//! [`RuntimeOptions::acquisition_heartbeat`]: crate::RuntimeOptions::acquisition_heartbeat
//! [`RuntimeOptions::max_lease_lifetime`]: crate::RuntimeOptions::max_lease_lifetime
//! [`LeaseStore::claim_cleanup_attempt`]: crate::LeaseStore::claim_cleanup_attempt
//! [`LeaseStore::try_claim`]: crate::LeaseStore::try_claim

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::acquisition;
use crate::lease::{
    CleanupStatus, EnvironmentLease, LeasePolicy, LeaseStatus, PENDING_CLEANUP_ATTEMPT_CAP,
    PENDING_CLEANUP_CAP_WARNED_KEY,
};
use crate::runtime::EnvironmentRuntime;
use crate::time::{self, Timestamp};

/// Tunables of the reaper.
#[derive(Debug, Clone, PartialEq)]
pub struct ReaperOptions {
    /// Active leases acquired longer ago than this are stranded (default:
    /// `None`; leases still expire on `expiresAt`).
    pub max_active_age: Option<Duration>,
    /// Wait after the failed cleanup before the first sweep attempt (30 s);
    /// doubles with each sweep attempt.
    pub initial_backoff: Duration,
    /// Cap of the retry wait (1 h).
    pub max_backoff: Duration,
    /// After this many sweep attempts a `pending_cleanup` lease is left for
    /// manual cleanup and reported as abandoned (default `None`: Paperclip's
    /// cap of [`PENDING_CLEANUP_ATTEMPT_CAP`] = 5). Attempts are counted in
    /// `metadata.pendingCleanupRetryAttempts`. Spec 00 retried forever;
    /// issue #22 wins.
    pub max_cleanup_attempts: Option<u32>,
    /// How long a claim on a lease keeps other reapers away (2 min); renewed
    /// every third of it while a release runs, so a claim outlives the
    /// longest release it covers.
    pub claim_ttl: Duration,
}

impl Default for ReaperOptions {
    fn default() -> Self {
        ReaperOptions {
            max_active_age: None,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60 * 60),
            max_cleanup_attempts: None,
            claim_ttl: Duration::from_secs(120),
        }
    }
}

impl ReaperOptions {
    /// The sweep attempt cap in force (`max_cleanup_attempts`, else 5).
    pub fn attempt_cap(&self) -> u32 {
        self.max_cleanup_attempts
            .unwrap_or(PENDING_CLEANUP_ATTEMPT_CAP)
    }

    /// The wait before the next sweep of a cleanup the sweep already
    /// attempted `attempts` times (`initial_backoff` after the failed
    /// release itself, doubling with each sweep attempt).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exponent = attempts.min(30);
        self.initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff)
    }
}

/// A lease the reaper could not handle, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReapFailure {
    /// The lease (`*` for a failure of the whole pass, e.g. a store error).
    pub lease_id: String,
    /// What went wrong (never contains a secret).
    pub message: String,
}

/// What one reaper pass did. Every list holds lease ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReapReport {
    /// Active leases past `expiresAt`, released as `expired`.
    pub expired: Vec<String>,
    /// Active leases of finished runs or older than the maximum age, released as `expired`.
    pub stranded: Vec<String>,
    /// Released leases whose provider cleanup failed (now or on a retry); kept for the next pass.
    pub cleanup_failed: Vec<String>,
    /// In-flight acquisitions of dead processes, swept (their unrecorded
    /// resources destroyed); a sweep that failed is in `cleanup_failed`.
    pub orphaned: Vec<String>,
    /// Failed cleanups retried successfully.
    pub cleaned_up: Vec<String>,
    /// Failed cleanups whose backoff has not elapsed yet.
    pub deferred: Vec<String>,
    /// Failed cleanups past `max_cleanup_attempts`, left alone.
    pub abandoned: Vec<String>,
    /// Leases another reaper holds a claim on, or that changed under us.
    pub skipped: Vec<String>,
    /// Leases that could not be handled.
    pub failures: Vec<ReapFailure>,
}

impl ReapReport {
    /// Whether the pass released or cleaned anything.
    pub fn acted(&self) -> bool {
        !(self.expired.is_empty()
            && self.stranded.is_empty()
            && self.orphaned.is_empty()
            && self.cleaned_up.is_empty())
    }

    fn fail(&mut self, lease_id: &str, message: impl Into<String>) {
        let message = message.into();
        warn!(lease = %lease_id, %message, "reaper could not handle lease");
        self.failures.push(ReapFailure {
            lease_id: lease_id.to_owned(),
            message,
        });
    }
}

type FinishedRuns = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Finds and releases leaked leases; see the [module docs](self).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use paperclip_env_core::reaper::Reaper;
/// use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime, LeaseStatus};
/// let runtime = EnvironmentRuntime::builder().build();
/// let env = Environment::new("env-1", "Sandbox", "sandbox", serde_json::json!({"provider": "fake"}));
/// let lease = runtime.acquire_run_lease(AcquireRunLease::for_run(env, "run-1")).await?.lease;
/// // The host knows run-1 is over, but nobody released its lease.
/// let report = Reaper::new(runtime.clone()).finished_runs(|run| run == "run-1").run_once().await;
/// assert_eq!(report.stranded, vec![lease.id.clone()]);
/// let stored = runtime.lease_store().get(&lease.id).await?.unwrap();
/// assert_eq!(stored.status, LeaseStatus::Expired);
/// # Ok::<(), paperclip_env_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Reaper {
    runtime: EnvironmentRuntime,
    options: ReaperOptions,
    claimant: String,
    finished_runs: Option<FinishedRuns>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("options", &self.options)
            .field("claimant", &self.claimant)
            .finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper over the runtime's stores and drivers, with default options
    /// and a claimant id unique to this process and instance.
    pub fn new(runtime: EnvironmentRuntime) -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        Reaper {
            runtime,
            options: ReaperOptions::default(),
            claimant: format!("reaper-{}-{}", std::process::id(), &unique[..8]),
            finished_runs: None,
        }
    }

    /// Sets the tunables.
    pub fn options(mut self, options: ReaperOptions) -> Self {
        self.options = options;
        self
    }

    /// Names this reaper in lease claims (default `reaper-<pid>-<random>`).
    pub fn claimant(mut self, claimant: impl Into<String>) -> Self {
        self.claimant = claimant.into();
        self
    }

    /// Tells the reaper which runs are finished: their active leases are stranded.
    pub fn finished_runs(
        mut self,
        finished: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.finished_runs = Some(Arc::new(finished));
        self
    }

    /// Whether a `sandbox` or `plugin` lease outlived the runtime's
    /// `max_lease_lifetime` (the reaper's own bound; never stored as `expiresAt`).
    fn past_lifetime(&self, lease: &EnvironmentLease, now: Timestamp) -> bool {
        let bounded = matches!(
            lease.metadata_str("driver"),
            Some(crate::lease::driver_keys::SANDBOX | crate::lease::driver_keys::PLUGIN)
        );
        bounded
            && self
                .runtime
                .context()
                .options
                .max_lease_lifetime
                .and_then(|max| chrono::Duration::from_std(max).ok())
                .and_then(|max| lease.acquired_at.checked_add_signed(max))
                .is_some_and(|end| end <= now)
    }

    fn stranded(&self, lease: &EnvironmentLease, now: Timestamp) -> bool {
        let finished = match (&self.finished_runs, &lease.heartbeat_run_id) {
            (Some(f), Some(run)) => f(run),
            _ => false,
        };
        let too_old = self
            .options
            .max_active_age
            .and_then(|age| chrono::Duration::from_std(age).ok())
            .is_some_and(|age| lease.acquired_at + age <= now);
        finished || too_old
    }

    /// Claims the lease and re-reads it; `None` when another reaper holds it
    /// or it no longer satisfies `still`.
    async fn claim(
        &self,
        lease: &EnvironmentLease,
        report: &mut ReapReport,
        still: impl Fn(&EnvironmentLease) -> bool,
    ) -> Option<EnvironmentLease> {
        let store = self.runtime.lease_store();
        match store
            .try_claim(&lease.id, &self.claimant, self.options.claim_ttl)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                report.skipped.push(lease.id.clone());
                return None;
            }
            Err(e) => {
                report.fail(&lease.id, e.to_string());
                return None;
            }
        }
        match store.get(&lease.id).await {
            Ok(Some(current)) if still(&current) => Some(current),
            Ok(_) => {
                report.skipped.push(lease.id.clone());
                None
            }
            Err(e) => {
                report.fail(&lease.id, e.to_string());
                None
            }
        }
    }

    async fn environment_of(
        &self,
        lease: &EnvironmentLease,
        report: &mut ReapReport,
    ) -> Option<crate::Environment> {
        let found = match lease.environment_id.as_deref() {
            Some(id) => self.runtime.environment_store().get(id).await,
            None => Ok(None),
        };
        let shown = lease.environment_id.as_deref().unwrap_or("(none)");
        match found {
            Ok(Some(env)) => Some(env),
            // The environment was deleted (or the row has a null reference,
            // as Paperclip writes for an orphan recorded after a delete): the
            // lease's metadata records its driver and provider config (spec
            // 00 §2.9), which is all a release needs, so a stand-in
            // environment routes it.
            Ok(None) => match lease.metadata_str("driver") {
                Some(driver) => Some(crate::Environment::new(
                    lease.environment_id.clone().unwrap_or_default(),
                    format!("deleted environment {shown}"),
                    driver,
                    serde_json::Value::Object(Default::default()),
                )),
                None => {
                    report.fail(
                        &lease.id,
                        format!(
                            "environment {shown} is not in the store and the lease records no driver"
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                report.fail(&lease.id, e.to_string());
                None
            }
        }
    }

    /// Logs once per lease that it reached the attempt cap, marking
    /// `metadata.pendingCleanupRetryCapWarned` (Paperclip's one-time warning).
    async fn warn_capped_once(&self, lease: &EnvironmentLease) {
        let warned = lease
            .metadata
            .as_ref()
            .and_then(|m| m.get(PENDING_CLEANUP_CAP_WARNED_KEY))
            == Some(&serde_json::Value::Bool(true));
        if warned {
            return;
        }
        let mut metadata = lease.metadata.clone().unwrap_or_default();
        metadata.insert(
            PENDING_CLEANUP_CAP_WARNED_KEY.into(),
            serde_json::Value::Bool(true),
        );
        match self
            .runtime
            .lease_store()
            .update_metadata(&lease.id, metadata)
            .await
        {
            Ok(_) => warn!(
                lease = %lease.id,
                attempts = lease.cleanup_attempts(),
                "environment lease reached the pending_cleanup retry cap; left for manual cleanup"
            ),
            Err(e) => warn!(lease = %lease.id, error = %e, "could not mark the capped lease"),
        }
    }

    /// Runs `work` while renewing this reaper's claim on lease `id` every
    /// third of the claim TTL, so the claim outlives the work.
    async fn holding_claim<T>(&self, id: &str, work: impl std::future::Future<Output = T>) -> T {
        let ttl = self.options.claim_ttl;
        acquisition::while_ticking(ttl / 3, work, || async move {
            match self
                .runtime
                .lease_store()
                .try_claim(id, &self.claimant, ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    warn!(lease = %id, "another reaper took over a claim this reaper was renewing")
                }
                Err(e) => warn!(lease = %id, error = %e, "could not renew the reaper's claim"),
            }
        })
        .await
    }

    /// One pass; see the [module docs](self). Errors are collected in the
    /// report, never raised, so one bad lease does not stop the others.
    pub async fn run_once(&self) -> ReapReport {
        let mut report = ReapReport::default();
        let now = time::now();
        let store = self.runtime.lease_store().clone();

        match store.list_active().await {
            Ok(active) => {
                for lease in active {
                    let expired = lease.expires_at.is_some_and(|at| at <= now)
                        || self.past_lifetime(&lease, now);
                    if !expired && !self.stranded(&lease, now) {
                        continue;
                    }
                    let Some(current) = self
                        .claim(&lease, &mut report, |l| l.status == LeaseStatus::Active)
                        .await
                    else {
                        continue;
                    };
                    let Some(env) = self.environment_of(&current, &mut report).await else {
                        continue;
                    };
                    // A reusable lease is kept alive by a plain release (it
                    // waits for the next run); past its end it must go.
                    let release = async {
                        if current.lease_policy == LeasePolicy::ReuseByEnvironment {
                            self.runtime.destroy_run_lease(&env, &current).await
                        } else {
                            self.runtime
                                .release_lease(&env, &current, LeaseStatus::Expired)
                                .await
                        }
                    };
                    let outcome = self.holding_claim(&current.id, release).await;
                    match outcome {
                        Ok(released) => {
                            info!(lease = %current.id, expired, "reaper released lease");
                            if expired {
                                report.expired.push(current.id.clone());
                            } else {
                                report.stranded.push(current.id.clone());
                            }
                            if released.is_some_and(|r| {
                                r.lease.cleanup_status == Some(CleanupStatus::Failed)
                            }) {
                                report.cleanup_failed.push(current.id.clone());
                            }
                        }
                        Err(e) => report.fail(&current.id, e.to_string()),
                    }
                }
            }
            Err(e) => report.fail("*", e.to_string()),
        }

        let heartbeat = self.runtime.context().options.acquisition_heartbeat;
        match store.list_pending_cleanups().await {
            Ok(pending) => {
                for lease in pending {
                    // A sweep that failed is retried with backoff below.
                    if lease.cleanup_status == Some(CleanupStatus::Failed)
                        || !acquisition::is_stale(&lease, heartbeat, now)
                    {
                        continue;
                    }
                    let Some(current) = self
                        .claim(&lease, &mut report, |l| {
                            acquisition::is_stale(l, heartbeat, time::now())
                        })
                        .await
                    else {
                        continue;
                    };
                    let Some(env) = self.environment_of(&current, &mut report).await else {
                        continue;
                    };
                    let sweep = self.runtime.destroy_run_lease(&env, &current);
                    match self.holding_claim(&current.id, sweep).await {
                        Ok(Some(record))
                            if record.lease.cleanup_status == Some(CleanupStatus::Success) =>
                        {
                            info!(lease = %current.id, "reaper swept an orphaned acquisition");
                            report.orphaned.push(current.id.clone());
                        }
                        Ok(_) => report.cleanup_failed.push(current.id.clone()),
                        Err(e) => report.fail(&current.id, e.to_string()),
                    }
                }
            }
            Err(e) => report.fail("*", e.to_string()),
        }

        match store.list_failed_cleanups().await {
            Ok(failed) => {
                for lease in failed {
                    // Only `pending_cleanup` rows are swept, as in Paperclip:
                    // a `retained` lease keeps its resource on purpose.
                    if lease.status != LeaseStatus::PendingCleanup
                        || report.cleanup_failed.contains(&lease.id)
                    {
                        continue;
                    }
                    let attempts = lease.cleanup_attempts();
                    if attempts >= self.options.attempt_cap() {
                        report.abandoned.push(lease.id.clone());
                        self.warn_capped_once(&lease).await;
                        continue;
                    }
                    let due = chrono::Duration::from_std(self.options.backoff(attempts))
                        .map(|wait| lease.updated_at + wait <= now)
                        .unwrap_or(false);
                    if !due {
                        report.deferred.push(lease.id.clone());
                        continue;
                    }
                    let Some(current) = self
                        .claim(&lease, &mut report, |l| {
                            l.status == LeaseStatus::PendingCleanup
                                && l.cleanup_status == Some(CleanupStatus::Failed)
                                && l.cleanup_attempts() == attempts
                        })
                        .await
                    else {
                        continue;
                    };
                    let Some(env) = self.environment_of(&current, &mut report).await else {
                        continue;
                    };
                    // The attempt is counted before the teardown (a
                    // compare-and-swap on the stored count), so a thrown
                    // provider error still counts against the cap and two
                    // overlapping sweeps never both retry.
                    match store.claim_cleanup_attempt(&current.id, attempts).await {
                        Ok(true) => {}
                        Ok(false) => {
                            report.skipped.push(current.id.clone());
                            continue;
                        }
                        Err(e) => {
                            report.fail(&current.id, e.to_string());
                            continue;
                        }
                    }
                    let current = match store.get(&current.id).await {
                        Ok(Some(l)) => l,
                        Ok(None) => continue,
                        Err(e) => {
                            report.fail(&current.id, e.to_string());
                            continue;
                        }
                    };
                    match self
                        .holding_claim(&current.id, self.runtime.retry_cleanup(&env, &current))
                        .await
                    {
                        Ok(Some(record))
                            if record.lease.cleanup_status == Some(CleanupStatus::Success) =>
                        {
                            info!(lease = %current.id, "reaper cleaned up lease");
                            report.cleaned_up.push(current.id.clone());
                        }
                        Ok(_) => report.cleanup_failed.push(current.id.clone()),
                        Err(e) => report.fail(&current.id, e.to_string()),
                    }
                }
            }
            Err(e) => report.fail("*", e.to_string()),
        }
        report
    }

    /// Runs a pass now and then every `interval` on the current tokio
    /// runtime until the handle is shut down or dropped.
    pub fn spawn(self, interval: Duration) -> ReaperHandle {
        let (stop, mut stopped) = watch::channel(false);
        let passes = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(None));
        let (task_passes, task_last) = (passes.clone(), last.clone());
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        let report = self.run_once().await;
                        if let Ok(mut slot) = task_last.lock() {
                            *slot = Some(report);
                        }
                        task_passes.fetch_add(1, Ordering::SeqCst);
                    }
                    changed = stopped.changed() => {
                        if changed.is_err() || *stopped.borrow() {
                            break;
                        }
                    }
                }
            }
        });
        ReaperHandle {
            stop,
            task,
            passes,
            last,
        }
    }
}

/// A reaper running in the background. Dropping the handle stops it after
/// its current pass; [`ReaperHandle::shutdown`] also waits for that.
#[derive(Debug)]
pub struct ReaperHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    passes: Arc<AtomicU64>,
    last: Arc<Mutex<Option<ReapReport>>>,
}

impl ReaperHandle {
    /// Passes completed so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::SeqCst)
    }

    /// The report of the latest pass.
    pub fn last_report(&self) -> Option<ReapReport> {
        self.last.lock().ok().and_then(|r| r.clone())
    }

    /// Stops the reaper and waits for its current pass to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl EnvironmentRuntime {
    /// One reaper pass with default [`ReaperOptions`]: releases expired
    /// leases and retries due failed cleanups. See [`Reaper`] for stranded
    /// runs, options and background use.
    pub async fn reap(&self) -> ReapReport {
        Reaper::new(self.clone()).run_once().await
    }
}
