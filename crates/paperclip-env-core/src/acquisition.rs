//! Recorded acquisitions: no provider resource without a lease row.
//!
//! A lease leaks when something is created that no row records. Three
//! windows used to allow it: the process dying between the provider's
//! create and the row insert, a deadline dropping the provider's future
//! mid-create (so the provider's own cleanup never ran), and a caller that
//! gave up while the insert was under way. `acquire_recorded` closes all
//! three:
//!
//! 1. **Row first.** An in-flight row ([`LeaseStore::insert_acquiring`]:
//!    `pending_cleanup`, reason `acquire_in_progress`, the run label in
//!    `metadata.acquisition`) is written before the provider is called. While
//!    the provider works, the row is touched every
//!    [`RuntimeOptions::acquisition_heartbeat`]; a row whose heartbeat stopped
//!    for three beats belongs to a dead process, and the reaper sweeps the
//!    provider for resources labelled with its run.
//! 2. **The caller's deadline never cancels the provider.** The provider call
//!    runs in a task of its own. A caller that times out (or drops its
//!    future) gets its error at once; the task carries on until the provider
//!    answers, so a create either finishes and is torn down by us, or fails
//!    and is cleaned up by the provider itself. Only a provider that outlives
//!    the hard bound (twice the larger of the caller's deadline and the
//!    provider's declared bound) is dropped, and then the row stays for the
//!    reaper.
//! 3. **Handed over exactly once.** The task turns the row `active` with a
//!    compare-and-swap ([`LeaseStore::complete_acquisition`]) and hands the
//!    lease to the caller through a channel; if the caller is gone by then,
//!    or a sweep took the row over, the task tears the resource down and
//!    records the outcome on the row.
//!
//! [`RuntimeOptions::acquisition_heartbeat`]: crate::RuntimeOptions::acquisition_heartbeat

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::{Instrument, warn};

use crate::lease::{CleanupStatus, EnvironmentLease, JsonObject, LeaseStatus, failure_reasons};
use crate::store::{AcquiredLease, LeaseStore, NewLease, ReleaseUpdate};
use crate::{Error, Result, time};

/// Metadata key of an in-flight row: `{state, runLabel, startedAt}`.
pub const ACQUISITION_METADATA_KEY: &str = "acquisition";
/// `failureReason` of a row whose acquisition failed (the provider cleaned up).
pub const ACQUIRE_FAILED_REASON: &str = "acquire_failed";
/// `failureReason` of a row whose caller gave up before the provider answered;
/// the resource that arrived later was torn down.
pub const ACQUIRE_ABANDONED_REASON: &str = "acquire_abandoned";
/// `failureReason` of an in-flight row swept by the reaper after its process died.
pub const ACQUIRE_ORPHANED_REASON: &str = "acquire_orphaned";

/// The run label of an in-flight row: the run id providers labelled the
/// resources of this acquisition with (a random one for ad-hoc leases).
pub fn run_label(lease: &EnvironmentLease) -> Option<&str> {
    lease
        .metadata
        .as_ref()?
        .get(ACQUISITION_METADATA_KEY)?
        .get("runLabel")?
        .as_str()
}

/// Whether `lease` is the record of an acquisition that has not completed
/// (written before the provider call, never turned active).
pub fn is_in_flight(lease: &EnvironmentLease) -> bool {
    lease.status == LeaseStatus::PendingCleanup
        && lease
            .metadata
            .as_ref()
            .and_then(|m| m.get(ACQUISITION_METADATA_KEY))
            .and_then(|a| a.get("state"))
            .and_then(Value::as_str)
            == Some("acquiring")
}

/// Whether the in-flight `lease` was last touched longer ago than three
/// heartbeats: its process is gone and the reaper may sweep it. The
/// heartbeat is the one the acquiring process recorded in the row
/// (`acquisition.heartbeatMs`), so a reaper configured differently never
/// mistakes a live acquisition for a dead one; `heartbeat` is the fallback.
pub fn is_stale(lease: &EnvironmentLease, heartbeat: Duration, now: time::Timestamp) -> bool {
    let recorded = lease
        .metadata
        .as_ref()
        .and_then(|m| m.get(ACQUISITION_METADATA_KEY))
        .and_then(|a| a.get("heartbeatMs"))
        .and_then(Value::as_u64)
        .map(Duration::from_millis);
    let heartbeat = recorded.unwrap_or(heartbeat);
    let stale =
        chrono::Duration::from_std(heartbeat.saturating_mul(3)).unwrap_or(chrono::Duration::MAX);
    is_in_flight(lease)
        && lease
            .updated_at
            .checked_add_signed(stale)
            .is_none_or(|at| at <= now)
}

/// Adds the in-flight marker to `metadata`.
pub(crate) fn mark_in_flight(metadata: &mut JsonObject, run_label: &str, heartbeat: Duration) {
    metadata.insert(
        ACQUISITION_METADATA_KEY.into(),
        json!({
            "state": "acquiring",
            "runLabel": run_label,
            "startedAt": time::to_iso(&time::now()),
            "heartbeatMs": heartbeat.max(MIN_HEARTBEAT).as_millis() as u64,
        }),
    );
}

/// Shortest heartbeat interval used (a zero option would spin).
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// What a driver plugs into [`acquire_recorded`]: the provider call and the
/// teardown of what it created.
#[async_trait]
pub(crate) trait Acquirer: Send + Sync + 'static {
    /// Asks the provider for the resource and composes the row's fields.
    async fn acquire(&self) -> Result<AcquiredLease>;
    /// Tears down what [`Acquirer::acquire`] returned (bounded by the implementor).
    async fn teardown(&self, acquired: &AcquiredLease) -> Result<()>;
    /// Removes secrets from a message before it is stored or returned.
    fn scrub(&self, message: &str) -> String;
}

/// Timing of one recorded acquisition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcquireTiming {
    /// What the caller waits.
    pub caller_deadline: Duration,
    /// After this the provider call is dropped and the row left for the reaper.
    pub hard_deadline: Duration,
    /// How often the in-flight row is touched.
    pub heartbeat: Duration,
}

/// Records the acquisition, runs it in its own task and hands the lease over
/// exactly once; see the [module docs](self).
pub(crate) async fn acquire_recorded(
    store: Arc<dyn LeaseStore>,
    pending: NewLease,
    timing: AcquireTiming,
    operation: &'static str,
    acquirer: Arc<dyn Acquirer>,
) -> Result<EnvironmentLease> {
    let row = store.insert_acquiring(pending).await?;
    let (tx, rx) = oneshot::channel::<Result<EnvironmentLease>>();
    let task = run_task(store, row, timing, operation, acquirer, tx);
    tokio::spawn(task.in_current_span());
    match tokio::time::timeout(timing.caller_deadline, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Error::Contract(
            "the lease acquisition task ended without an answer".into(),
        )),
        Err(_) => Err(Error::Timeout {
            operation: operation.to_owned(),
            after: timing.caller_deadline,
        }),
    }
}

async fn run_task(
    store: Arc<dyn LeaseStore>,
    row: EnvironmentLease,
    timing: AcquireTiming,
    operation: &'static str,
    acquirer: Arc<dyn Acquirer>,
    tx: oneshot::Sender<Result<EnvironmentLease>>,
) {
    let call = tokio::time::timeout(timing.hard_deadline, acquirer.acquire());
    let outcome = with_heartbeat(store.as_ref(), &row.id, timing.heartbeat, call).await;
    let acquired = match outcome {
        Err(_) => {
            // The provider outlived the hard bound: its future is dropped
            // mid-call, so whatever it made is unknown. The row stays in
            // flight, its heartbeat stops, and the reaper sweeps by run label.
            warn!(lease = %row.id, after = ?timing.hard_deadline, "provider acquire outlived its hard bound; left for the reaper");
            let _ = tx.send(Err(Error::Timeout {
                operation: operation.to_owned(),
                after: timing.hard_deadline,
            }));
            return;
        }
        Ok(Err(error)) => {
            // The provider cleans up a failed create itself (its contract).
            let update = ReleaseUpdate {
                failure_reason: Some(ACQUIRE_FAILED_REASON.into()),
                cleanup_status: Some(CleanupStatus::Success),
                cleanup_error: None,
                termination: None,
            };
            if let Err(store_error) = store.release(&row.id, LeaseStatus::Failed, update).await {
                warn!(lease = %row.id, error = %store_error, "could not record the failed acquisition; the reaper will sweep it");
            }
            let _ = tx.send(Err(error));
            return;
        }
        Ok(Ok(acquired)) => acquired,
    };

    if tx.is_closed() {
        // The caller gave up while the provider worked: nobody will use it.
        abandon(store.as_ref(), &row, acquirer.as_ref(), &acquired).await;
        return;
    }
    match store.complete_acquisition(&row.id, acquired.clone()).await {
        Ok(Some(lease)) => {
            if let Err(Ok(lease)) = tx.send(Ok(lease)) {
                // The caller went away between the check and the send.
                abandon(store.as_ref(), &lease, acquirer.as_ref(), &acquired).await;
            }
        }
        Ok(None) => {
            // A sweep took the row over (the process looked dead): the
            // resource is ours to remove, and the row keeps the sweep's word.
            let outcome = acquirer.teardown(&acquired).await;
            let id = acquired.provider_lease_id.as_deref().unwrap_or("(no id)");
            let message = match outcome {
                Ok(()) => format!(
                    "the lease acquisition was swept as orphaned before it completed; provider resource {id} was released"
                ),
                Err(e) => format!(
                    "the lease acquisition was swept as orphaned before it completed; releasing provider resource {id} failed: {}",
                    acquirer.scrub(&e.to_string())
                ),
            };
            let _ = tx.send(Err(Error::Store {
                message,
                source: None,
            }));
        }
        Err(error) => {
            // The resource exists but its row could not be completed: tear it
            // down so nothing leaks. The row stays in flight (pending_cleanup)
            // when that fails too, so the reaper still finds the resource.
            warn!(lease = %row.id, %error, "recording the lease failed; releasing the provider resource");
            let teardown = acquirer.teardown(&acquired).await;
            let id = acquired.provider_lease_id.as_deref().unwrap_or("(no id)");
            let result = match teardown {
                Ok(()) => {
                    let update = ReleaseUpdate {
                        failure_reason: Some(
                            failure_reasons::ACQUIRE_REJECTED_TEARDOWN_SUCCEEDED.into(),
                        ),
                        cleanup_status: Some(CleanupStatus::Success),
                        cleanup_error: None,
                        termination: None,
                    };
                    let _ = store.release(&row.id, LeaseStatus::Failed, update).await;
                    Err(error)
                }
                Err(cleanup_error) => {
                    let message = acquirer.scrub(&cleanup_error.to_string());
                    // The row is the durable record of the live resource:
                    // give it the provider id and Paperclip's reason, so the
                    // sweep retries the teardown directly. If the store is
                    // still down the row stays in flight, and the reaper
                    // sweeps the provider by run label instead.
                    if store
                        .complete_acquisition(&row.id, acquired.clone())
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                    {
                        let update = ReleaseUpdate {
                            failure_reason: Some(
                                failure_reasons::ACQUIRE_REJECTED_TEARDOWN_FAILED.into(),
                            ),
                            cleanup_status: Some(CleanupStatus::Failed),
                            cleanup_error: Some(message.clone()),
                            termination: None,
                        };
                        let _ = store
                            .release(&row.id, LeaseStatus::PendingCleanup, update)
                            .await;
                    }
                    Err(Error::Store {
                        message: format!(
                            "recording the lease failed ({error}); releasing provider resource {id} also failed: {message}"
                        ),
                        source: None,
                    })
                }
            };
            let _ = tx.send(result);
        }
    }
}

/// Tears down a resource nobody will use and records why on its row.
async fn abandon(
    store: &dyn LeaseStore,
    row: &EnvironmentLease,
    acquirer: &dyn Acquirer,
    acquired: &AcquiredLease,
) {
    let update = match acquirer.teardown(acquired).await {
        Ok(()) => ReleaseUpdate {
            failure_reason: Some(ACQUIRE_ABANDONED_REASON.into()),
            cleanup_status: Some(CleanupStatus::Success),
            cleanup_error: None,
            termination: None,
        },
        Err(e) => ReleaseUpdate {
            failure_reason: Some(ACQUIRE_ABANDONED_REASON.into()),
            cleanup_status: Some(CleanupStatus::Failed),
            cleanup_error: Some(acquirer.scrub(&e.to_string())),
            termination: None,
        },
    };
    let failed = update.cleanup_status == Some(CleanupStatus::Failed);
    // A failed teardown stays `pending_cleanup` with the provider id known,
    // so the reaper's failed-cleanup retries destroy it.
    let status = if failed {
        LeaseStatus::PendingCleanup
    } else {
        LeaseStatus::Expired
    };
    if failed && row.status != LeaseStatus::Active {
        // Record the provider id the teardown needs before giving up the row.
        let _ = store.complete_acquisition(&row.id, acquired.clone()).await;
    }
    match store.release(&row.id, status, update).await {
        Ok(_) => {
            warn!(lease = %row.id, %status, "the caller gave up before the provider answered; resource torn down")
        }
        Err(e) => warn!(lease = %row.id, error = %e, "could not record an abandoned acquisition"),
    }
}

/// Runs `future`, touching row `id` every `heartbeat` until it finishes.
async fn with_heartbeat<T>(
    store: &dyn LeaseStore,
    id: &str,
    heartbeat: Duration,
    future: impl std::future::Future<Output = T>,
) -> T {
    while_ticking(heartbeat.max(MIN_HEARTBEAT), future, || async {
        if let Err(e) = store.touch(id).await {
            warn!(lease = %id, error = %e, "could not touch the in-flight lease row");
        }
    })
    .await
}

/// Runs `future` to its end, running `tick` every `every` meanwhile (first
/// after one interval). The one keep-alive loop of the crate: acquisition
/// heartbeats and reaper claim renewals.
pub(crate) async fn while_ticking<T, F, Fut>(
    every: Duration,
    future: impl std::future::Future<Output = T>,
    mut tick: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(every.max(MIN_HEARTBEAT));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    tokio::pin!(future);
    loop {
        tokio::select! {
            out = &mut future => return out,
            _ = ticker.tick() => tick().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::ACQUIRE_IN_PROGRESS_REASON;

    #[test]
    fn in_flight_rows_are_recognised_by_their_marker() {
        let mut md = JsonObject::new();
        mark_in_flight(&mut md, "run-7", Duration::from_secs(10));
        let now = time::now();
        let lease = EnvironmentLease {
            id: "l".into(),
            company_id: None,
            environment_id: Some("e".into()),
            execution_workspace_id: None,
            issue_id: None,
            heartbeat_run_id: None,
            status: LeaseStatus::PendingCleanup,
            lease_policy: crate::LeasePolicy::Ephemeral,
            provider: None,
            provider_lease_id: None,
            acquired_at: now,
            last_used_at: now,
            expires_at: None,
            released_at: None,
            failure_reason: Some(ACQUIRE_IN_PROGRESS_REASON.into()),
            cleanup_status: Some(CleanupStatus::Pending),
            metadata: Some(md),
            created_at: now,
            updated_at: now,
        };
        assert!(is_in_flight(&lease));
        assert_eq!(run_label(&lease), Some("run-7"));
        assert!(!is_stale(&lease, Duration::from_secs(10), now));
        let later = now + chrono::Duration::seconds(31);
        assert!(is_stale(&lease, Duration::from_secs(10), later));
        // The acquirer's recorded heartbeat wins over the reaper's option.
        let soon = now + chrono::Duration::seconds(2);
        assert!(!is_stale(&lease, Duration::from_millis(1), soon));
        let active = EnvironmentLease {
            status: LeaseStatus::Active,
            ..lease
        };
        assert!(!is_in_flight(&active));
    }
}
