//! Lease persistence (spec 00 §2.4). Every state change of a lease goes
//! through a [`LeaseStore`]; [`EnvironmentStore`] is where the runtime looks
//! environments up when it releases a run's leases.

mod memory;

use async_trait::async_trait;

pub use memory::{InMemoryEnvironmentStore, InMemoryLeaseStore};

use crate::Result;
use crate::lease::{
    CleanupStatus, Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus,
};
use crate::time::Timestamp;

/// A lease row to insert (always `active`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewLease {
    /// Owning company.
    pub company_id: Option<String>,
    /// The environment.
    pub environment_id: String,
    /// The run's execution workspace.
    pub execution_workspace_id: Option<String>,
    /// The issue.
    pub issue_id: Option<String>,
    /// Owning run.
    pub heartbeat_run_id: Option<String>,
    /// Policy (default `ephemeral`).
    pub lease_policy: Option<LeasePolicy>,
    /// Provider label.
    pub provider: Option<String>,
    /// Provider handle.
    pub provider_lease_id: Option<String>,
    /// Lifetime end.
    pub expires_at: Option<Timestamp>,
    /// Metadata.
    pub metadata: Option<JsonObject>,
}

/// `failureReason` of a row written before the provider is asked to create
/// anything (status `pending_cleanup`, `cleanupStatus: pending`). Such a row
/// is the record of an acquisition in flight: if the process dies before the
/// provider answers, the reaper finds it and sweeps the provider for
/// resources labelled with its run.
pub const ACQUIRE_IN_PROGRESS_REASON: &str = "acquire_in_progress";

/// What the provider answered for an acquisition: written onto its
/// in-flight row by [`LeaseStore::complete_acquisition`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcquiredLease {
    /// Policy (default `ephemeral`).
    pub lease_policy: Option<LeasePolicy>,
    /// Provider handle.
    pub provider_lease_id: Option<String>,
    /// Lifetime end.
    pub expires_at: Option<Timestamp>,
    /// Metadata (replaces the in-flight row's).
    pub metadata: Option<JsonObject>,
}

/// Optional fields written by a release; `None` keeps the previous value.
///
/// Like Paperclip 2026.916's `releaseLease`, every release also rewrites two
/// metadata keys: `remoteExecutionTermination` is set to
/// [`ReleaseUpdate::termination`] when given and **removed** otherwise (a
/// later release without a receipt must not inherit an earlier stop's
/// authority), and with a `cleanup_status` the last error is kept in
/// `metadata.lastCleanupError` (removed on success). No release counts an
/// attempt: attempts are counted only by the sweep's
/// [`LeaseStore::claim_cleanup_attempt`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseUpdate {
    /// Why the lease failed.
    pub failure_reason: Option<String>,
    /// Outcome of provider cleanup; when set, `cleanup_error` is recorded in
    /// metadata (cleared on success).
    pub cleanup_status: Option<CleanupStatus>,
    /// The cleanup error message, recorded with a `cleanup_status`.
    pub cleanup_error: Option<String>,
    /// A provider-confirmed termination receipt, stored as
    /// `metadata.remoteExecutionTermination`.
    pub termination: Option<serde_json::Value>,
}

/// The metadata a release leaves: `metadata` with the termination receipt
/// and the last cleanup error rewritten per `update` (shared by the stores
/// that compute it in Rust).
pub fn released_metadata(
    metadata: Option<&JsonObject>,
    update: &ReleaseUpdate,
) -> Option<JsonObject> {
    use crate::lease::{LAST_CLEANUP_ERROR_KEY, REMOTE_TERMINATION_KEY};
    let touches_error = update.cleanup_status.is_some();
    if metadata.is_none()
        && update.termination.is_none()
        && !(touches_error && update.cleanup_error.is_some())
    {
        return None;
    }
    let mut out = metadata.cloned().unwrap_or_default();
    match &update.termination {
        Some(receipt) => {
            out.insert(REMOTE_TERMINATION_KEY.into(), receipt.clone());
        }
        None => {
            out.remove(REMOTE_TERMINATION_KEY);
        }
    }
    if touches_error {
        match (&update.cleanup_status, &update.cleanup_error) {
            (Some(CleanupStatus::Success), _) | (_, None) => {
                out.remove(LAST_CLEANUP_ERROR_KEY);
            }
            (_, Some(message)) => {
                out.insert(
                    LAST_CLEANUP_ERROR_KEY.into(),
                    serde_json::Value::String(message.clone()),
                );
            }
        }
    }
    Some(out)
}

/// Where leases live.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Inserts a new `active` lease (`acquiredAt = lastUsedAt = now`).
    async fn insert(&self, lease: NewLease) -> Result<EnvironmentLease>;

    /// Inserts the record of an acquisition in flight, before any provider
    /// call: status `pending_cleanup`, `cleanupStatus: pending`,
    /// `failureReason` [`ACQUIRE_IN_PROGRESS_REASON`]
    /// (`acquiredAt = lastUsedAt = now`). `lease_policy` and
    /// `provider_lease_id` of `lease` are stored as given (normally unset).
    async fn insert_acquiring(&self, lease: NewLease) -> Result<EnvironmentLease>;

    /// Turns an in-flight row into an `active` lease with the provider's
    /// answer, clearing `failureReason` and `cleanupStatus` and touching
    /// `lastUsedAt`, **only if** the row is still in flight (`pending_cleanup`
    /// with [`ACQUIRE_IN_PROGRESS_REASON`]); atomic in durable stores. `None`
    /// when the row is gone or something else (a reaper's sweep) took it
    /// over: the caller must then tear its resource down itself.
    async fn complete_acquisition(
        &self,
        id: &str,
        acquired: AcquiredLease,
    ) -> Result<Option<EnvironmentLease>>;

    /// Sets `status` (any but `active`), `releasedAt` (null for `retained`),
    /// touches `lastUsedAt`, and writes the update's fields when given.
    /// Unknown id → `None`. No precondition on the current status.
    async fn release(
        &self,
        id: &str,
        status: LeaseStatus,
        update: ReleaseUpdate,
    ) -> Result<Option<EnvironmentLease>>;

    /// Replaces metadata and touches `lastUsedAt`; unknown id → `None`.
    async fn update_metadata(
        &self,
        id: &str,
        metadata: JsonObject,
    ) -> Result<Option<EnvironmentLease>>;

    /// Touches `lastUsedAt`; unknown id → `None`.
    async fn touch(&self, id: &str) -> Result<Option<EnvironmentLease>>;

    /// One lease.
    async fn get(&self, id: &str) -> Result<Option<EnvironmentLease>>;

    /// An environment's leases, most recently used first (then newest first).
    async fn list_by_environment(
        &self,
        environment_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>>;

    /// A run's leases, oldest first.
    async fn list_by_run(
        &self,
        run_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>>;

    /// Leases whose provider cleanup failed (`cleanupStatus: failed`), oldest
    /// update first. The reaper retries those that are `pending_cleanup`.
    async fn list_failed_cleanups(&self) -> Result<Vec<EnvironmentLease>>;

    /// Every `active` lease, oldest first: what the reaper inspects for
    /// expired and stranded leases. Stores that cannot enumerate return an
    /// error, and the reaper reports it instead of guessing.
    async fn list_active(&self) -> Result<Vec<EnvironmentLease>> {
        Err(crate::Error::store(
            "this lease store cannot list active leases for the reaper",
        ))
    }

    /// Every `pending_cleanup` row, oldest first: in-flight acquisitions and
    /// resources whose teardown is still owed. Stores that cannot enumerate
    /// return an error, which the reaper reports.
    async fn list_pending_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        Err(crate::Error::store(
            "this lease store cannot list pending cleanups for the reaper",
        ))
    }

    /// Claims one sweep attempt on a `pending_cleanup` lease, as Paperclip's
    /// `claimPendingCleanupRetryAttempt`: **only if** the lease is still
    /// `pending_cleanup` and its stored attempt count
    /// ([`crate::lease::read_cleanup_attempts`]) still equals `expected`, the
    /// count becomes `expected + 1` (only that metadata key is written) and
    /// `lastUsedAt`/`updatedAt` are touched. `true` for the one caller that
    /// won; two sweeps reading the same count never both retry. The default
    /// is a read-then-write, atomic only in single-process stores; durable
    /// stores do it in one conditional `UPDATE`.
    async fn claim_cleanup_attempt(&self, id: &str, expected: u32) -> Result<bool> {
        let Some(lease) = self.get(id).await? else {
            return Ok(false);
        };
        if lease.status != LeaseStatus::PendingCleanup || lease.cleanup_attempts() != expected {
            return Ok(false);
        }
        let mut metadata = lease.metadata.unwrap_or_default();
        metadata.insert(
            crate::lease::PENDING_CLEANUP_ATTEMPTS_KEY.into(),
            serde_json::json!(expected + 1),
        );
        Ok(self.update_metadata(id, metadata).await?.is_some())
    }

    /// Claims a lease for one reaper pass of `claimant` for `ttl`, so several
    /// hosts sharing the store never act on the same lease at once. `true`
    /// when the claim is held (fresh, or already ours), `false` when another
    /// claimant holds an unexpired claim or the lease is unknown. The default
    /// suits single-process stores: every claim succeeds.
    async fn try_claim(&self, id: &str, claimant: &str, ttl: std::time::Duration) -> Result<bool> {
        let _ = (id, claimant, ttl);
        Ok(true)
    }
}

/// Where environments live.
#[async_trait]
pub trait EnvironmentStore: Send + Sync + 'static {
    /// One environment.
    async fn get(&self, id: &str) -> Result<Option<Environment>>;
    /// Inserts or replaces an environment.
    async fn put(&self, environment: Environment) -> Result<()>;
    /// Removes an environment; `false` if it was not there.
    async fn remove(&self, id: &str) -> Result<bool>;
}
