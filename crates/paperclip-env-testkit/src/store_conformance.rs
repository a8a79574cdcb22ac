//! The lease store conformance suite: one public check per rule of spec 00
//! §2.4 (plus the SDK's reaper operations), each taking a `&dyn LeaseStore`.
//! Every store's own tests call [`run`]; differences between stores are
//! parameters ([`StoreFixture`]), not forked tests.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use paperclip_env_core::store::InMemoryLeaseStore;
//! use paperclip_env_testkit::store_conformance::{StoreFixture, run};
//! let store = InMemoryLeaseStore::new();
//! run(&StoreFixture::new(&store)).await.assert_passed();
//! # });
//! ```
//!
//! Checks use fresh environment and run ids, so they can share one store
//! with other data. Timestamps have millisecond resolution; checks that need
//! an order sleep a few milliseconds between writes.

use std::time::Duration;

use paperclip_env_core::lease::{CleanupStatus, EnvironmentLease, LeasePolicy, LeaseStatus};
use paperclip_env_core::store::{
    ACQUIRE_IN_PROGRESS_REASON, AcquiredLease, LeaseStore, NewLease, ReleaseUpdate,
};
use paperclip_env_core::time;
use serde_json::json;

/// What a check returns: `Err` names the broken rule.
pub type StoreCheck = std::result::Result<(), String>;

/// The store under test and the parameters where stores legitimately differ.
#[derive(Clone, Copy)]
pub struct StoreFixture<'a> {
    /// The store.
    pub store: &'a dyn LeaseStore,
    /// Whether [`LeaseStore::try_claim`] excludes other claimants (durable
    /// stores shared by several hosts must; in-process stores need not).
    pub exclusive_claims: bool,
}

impl std::fmt::Debug for StoreFixture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFixture")
            .field("exclusive_claims", &self.exclusive_claims)
            .finish_non_exhaustive()
    }
}

impl<'a> StoreFixture<'a> {
    /// A fixture for `store`, with non-exclusive claims.
    pub fn new(store: &'a dyn LeaseStore) -> Self {
        StoreFixture {
            store,
            exclusive_claims: false,
        }
    }

    /// Declares that claims are exclusive between claimants.
    pub fn exclusive_claims(mut self, exclusive: bool) -> Self {
        self.exclusive_claims = exclusive;
        self
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

fn err(context: &str, e: paperclip_env_core::Error) -> String {
    format!("{context}: {e}")
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

async fn insert(f: &StoreFixture<'_>, new: NewLease) -> Result<EnvironmentLease, String> {
    f.store.insert(new).await.map_err(|e| err("insert", e))
}

fn new_lease(environment_id: &str, run: Option<&str>) -> NewLease {
    NewLease {
        environment_id: environment_id.to_owned(),
        heartbeat_run_id: run.map(str::to_owned),
        ..Default::default()
    }
}

/// Insert: `active`, policy `ephemeral`, all four times equal, nullable fields null.
pub async fn insert_defaults(f: &StoreFixture<'_>) -> StoreCheck {
    let lease = insert(f, new_lease(&fresh("env"), None)).await?;
    ensure!(
        lease.status == LeaseStatus::Active,
        "status is {}",
        lease.status
    );
    ensure!(
        lease.lease_policy == LeasePolicy::Ephemeral,
        "policy is {}",
        lease.lease_policy
    );
    ensure!(
        lease.acquired_at == lease.last_used_at
            && lease.acquired_at == lease.created_at
            && lease.acquired_at == lease.updated_at,
        "acquiredAt, lastUsedAt, createdAt, updatedAt differ: {lease:?}"
    );
    ensure!(
        lease.released_at.is_none()
            && lease.failure_reason.is_none()
            && lease.cleanup_status.is_none()
            && lease.metadata.is_none()
            && lease.expires_at.is_none()
            && lease.cleanup_attempts() == 0
            && lease.cleanup_error().is_none(),
        "a nullable field is set on insert: {lease:?}"
    );
    ensure!(!lease.id.is_empty(), "empty id");
    Ok(())
}

/// Every field, metadata JSON and timestamps included, reads back as written.
pub async fn round_trip_every_field(f: &StoreFixture<'_>) -> StoreCheck {
    let expires = time::now() + chrono::Duration::minutes(90);
    let metadata = json!({"driver": "sandbox", "nested": {"list": [1, 2.5, "x", null, true]},
        "unicode": "héllo ✓", "empty": {}});
    let new = NewLease {
        company_id: Some(fresh("company")),
        environment_id: fresh("env"),
        execution_workspace_id: Some(fresh("ws")),
        issue_id: Some(fresh("issue")),
        heartbeat_run_id: Some(fresh("run")),
        lease_policy: Some(LeasePolicy::ReuseByEnvironment),
        provider: Some("fake-plugin".into()),
        provider_lease_id: Some("sandbox://fake/run/1".into()),
        expires_at: Some(expires),
        metadata: metadata.as_object().cloned(),
    };
    let lease = insert(f, new.clone()).await?;
    let read = f
        .store
        .get(&lease.id)
        .await
        .map_err(|e| err("get", e))?
        .ok_or("inserted lease not found")?;
    ensure!(read == lease, "read back differs:\n{read:?}\n{lease:?}");
    ensure!(read.company_id == new.company_id, "companyId");
    ensure!(
        read.execution_workspace_id == new.execution_workspace_id,
        "executionWorkspaceId"
    );
    ensure!(read.issue_id == new.issue_id, "issueId");
    ensure!(
        read.heartbeat_run_id == new.heartbeat_run_id,
        "heartbeatRunId"
    );
    ensure!(
        read.lease_policy == LeasePolicy::ReuseByEnvironment,
        "leasePolicy"
    );
    ensure!(read.provider == new.provider, "provider");
    ensure!(
        read.provider_lease_id == new.provider_lease_id,
        "providerLeaseId"
    );
    ensure!(
        read.expires_at == Some(expires),
        "expiresAt {:?} != {expires:?}",
        read.expires_at
    );
    ensure!(
        read.metadata == new.metadata,
        "metadata {:?}",
        read.metadata
    );
    let released = f
        .store
        .release(
            &lease.id,
            LeaseStatus::PendingCleanup,
            ReleaseUpdate {
                failure_reason: Some("lease_destroyed".into()),
                cleanup_status: Some(CleanupStatus::Failed),
                cleanup_error: Some("boom".into()),
                termination: None,
            },
        )
        .await
        .map_err(|e| err("release", e))?
        .ok_or("release of a known lease returned None")?;
    let read = f
        .store
        .get(&lease.id)
        .await
        .map_err(|e| err("get", e))?
        .ok_or("released lease not found")?;
    ensure!(read == released, "released row reads back differently");
    ensure!(
        read.status == LeaseStatus::PendingCleanup,
        "status {}",
        read.status
    );
    Ok(())
}

/// Unknown ids: get, release, updateMetadata and touch return `None`, no error.
pub async fn unknown_id_is_none(f: &StoreFixture<'_>) -> StoreCheck {
    let id = fresh("missing");
    ensure!(
        f.store.get(&id).await.map_err(|e| err("get", e))?.is_none(),
        "get"
    );
    ensure!(
        f.store
            .release(&id, LeaseStatus::Released, ReleaseUpdate::default())
            .await
            .map_err(|e| err("release", e))?
            .is_none(),
        "release"
    );
    ensure!(
        f.store
            .update_metadata(&id, Default::default())
            .await
            .map_err(|e| err("update_metadata", e))?
            .is_none(),
        "update_metadata"
    );
    ensure!(
        f.store
            .touch(&id)
            .await
            .map_err(|e| err("touch", e))?
            .is_none(),
        "touch"
    );
    Ok(())
}

/// Release sets `releasedAt` (null for `retained`), touches `lastUsedAt`, may
/// be repeated, and refuses `active`.
pub async fn release_sets_released_at(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let lease = insert(f, new_lease(&env, None)).await?;
    pause().await;
    let released = f
        .store
        .release(&lease.id, LeaseStatus::Released, ReleaseUpdate::default())
        .await
        .map_err(|e| err("release", e))?
        .ok_or("release returned None")?;
    ensure!(
        released.status == LeaseStatus::Released,
        "status {}",
        released.status
    );
    ensure!(
        released.released_at.is_some(),
        "releasedAt null after release"
    );
    ensure!(
        released.last_used_at > lease.last_used_at,
        "lastUsedAt not touched"
    );
    ensure!(
        released.updated_at == released.last_used_at,
        "updatedAt != lastUsedAt"
    );
    ensure!(
        released.cleanup_attempts() == 0,
        "a release counted a sweep attempt"
    );
    let retained = f
        .store
        .release(&lease.id, LeaseStatus::Retained, ReleaseUpdate::default())
        .await
        .map_err(|e| err("release retained", e))?
        .ok_or("second release returned None")?;
    ensure!(
        retained.status == LeaseStatus::Retained,
        "re-release did not rewrite status"
    );
    ensure!(
        retained.released_at.is_none(),
        "releasedAt set for retained"
    );
    ensure!(
        f.store
            .release(&lease.id, LeaseStatus::Active, ReleaseUpdate::default())
            .await
            .is_err(),
        "release to active accepted"
    );
    Ok(())
}

/// `failureReason` and `cleanupStatus` are written only when provided; the
/// last cleanup error is kept in `metadata.lastCleanupError` (cleared on
/// success), a release never counts a sweep attempt, and every release sets
/// or removes `metadata.remoteExecutionTermination` (Paperclip 2026.916's
/// `releaseLease`) while other metadata keys survive.
pub async fn release_writes_fields_only_when_provided(f: &StoreFixture<'_>) -> StoreCheck {
    let lease = insert(
        f,
        NewLease {
            metadata: json!({"keep": 1}).as_object().cloned(),
            ..new_lease(&fresh("env"), None)
        },
    )
    .await?;
    let id = lease.id.as_str();
    let release = |status, update| async move {
        f.store
            .release(id, status, update)
            .await
            .map_err(|e| err("release", e))?
            .ok_or_else(|| "release returned None".to_owned())
    };
    let receipt = json!({"schema": "paperclip.remote-termination.v1", "state": "destroyed"});
    let first = release(
        LeaseStatus::PendingCleanup,
        ReleaseUpdate {
            failure_reason: Some("release_cleanup_failed".into()),
            cleanup_status: Some(CleanupStatus::Failed),
            cleanup_error: Some("provider said no".into()),
            termination: Some(receipt.clone()),
        },
    )
    .await?;
    ensure!(
        first.cleanup_attempts() == 0,
        "a release counted attempts: {}",
        first.cleanup_attempts()
    );
    ensure!(
        first.cleanup_error() == Some("provider said no"),
        "cleanupError {:?}",
        first.metadata
    );
    ensure!(
        first.termination_receipt() == Some(&receipt),
        "receipt not stored: {:?}",
        first.metadata
    );
    let second = release(LeaseStatus::PendingCleanup, ReleaseUpdate::default()).await?;
    ensure!(
        second.failure_reason.as_deref() == Some("release_cleanup_failed"),
        "failureReason overwritten without being provided"
    );
    ensure!(
        second.cleanup_status == Some(CleanupStatus::Failed),
        "cleanupStatus overwritten without being provided"
    );
    ensure!(
        second.cleanup_error().is_some(),
        "cleanupError dropped without cleanupStatus"
    );
    ensure!(
        second.termination_receipt().is_none(),
        "a release without a receipt kept the earlier one"
    );
    let third = release(
        LeaseStatus::Expired,
        ReleaseUpdate {
            cleanup_status: Some(CleanupStatus::Success),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        third.cleanup_status == Some(CleanupStatus::Success),
        "cleanupStatus"
    );
    ensure!(
        third.cleanup_error().is_none(),
        "cleanupError kept after success"
    );
    ensure!(
        third.metadata.as_ref().and_then(|m| m.get("keep")) == Some(&json!(1)),
        "a release lost an unrelated metadata key: {:?}",
        third.metadata
    );
    Ok(())
}

/// `claim_cleanup_attempt` is a compare-and-swap on
/// `metadata.pendingCleanupRetryAttempts`: it wins only on a
/// `pending_cleanup` row whose count equals the expected one, writes only the
/// count, and reads a malformed count as Paperclip does (non-number 0,
/// floored, clamped to 0..=5).
pub async fn cleanup_attempt_claims_are_compare_and_swap(f: &StoreFixture<'_>) -> StoreCheck {
    let lease = insert(
        f,
        NewLease {
            metadata: json!({"keep": "x", "pendingCleanupRetryAttempts": "junk"})
                .as_object()
                .cloned(),
            ..new_lease(&fresh("env"), None)
        },
    )
    .await?;
    let id = lease.id.as_str();
    let claim = |expected| async move {
        f.store
            .claim_cleanup_attempt(id, expected)
            .await
            .map_err(|e| err("claim_cleanup_attempt", e))
    };
    ensure!(!claim(0).await?, "claimed an attempt on an active lease");
    f.store
        .release(
            &lease.id,
            LeaseStatus::PendingCleanup,
            ReleaseUpdate::default(),
        )
        .await
        .map_err(|e| err("release", e))?;
    ensure!(!claim(1).await?, "claimed with a stale expected count");
    ensure!(
        claim(0).await?,
        "first claim (malformed count reads 0) lost"
    );
    ensure!(!claim(0).await?, "a second claim at the same count won");
    let read = f
        .store
        .get(&lease.id)
        .await
        .map_err(|e| err("get", e))?
        .ok_or("lease gone")?;
    ensure!(read.cleanup_attempts() == 1, "count {:?}", read.metadata);
    ensure!(
        read.metadata.as_ref().and_then(|m| m.get("keep")) == Some(&json!("x")),
        "the claim rewrote other metadata: {:?}",
        read.metadata
    );
    ensure!(read.updated_at >= lease.updated_at, "updatedAt not touched");
    for n in 1..paperclip_env_core::lease::PENDING_CLEANUP_ATTEMPT_CAP {
        ensure!(claim(n).await?, "claim at {n} lost");
    }
    let capped = f
        .store
        .get(&lease.id)
        .await
        .map_err(|e| err("get", e))?
        .ok_or("lease gone")?;
    ensure!(
        capped.cleanup_attempts() == 5,
        "count {:?}",
        capped.metadata
    );
    ensure!(
        !f.store
            .claim_cleanup_attempt(&fresh("missing"), 0)
            .await
            .map_err(|e| err("claim_cleanup_attempt", e))?,
        "claimed an unknown lease"
    );
    Ok(())
}

/// updateMetadata replaces metadata and touches `lastUsedAt`; touch only touches.
pub async fn update_metadata_and_touch(f: &StoreFixture<'_>) -> StoreCheck {
    let lease = insert(
        f,
        NewLease {
            metadata: json!({"a": 1, "b": 2}).as_object().cloned(),
            ..new_lease(&fresh("env"), None)
        },
    )
    .await?;
    pause().await;
    let replacement = json!({"c": [3]}).as_object().cloned().unwrap_or_default();
    let updated = f
        .store
        .update_metadata(&lease.id, replacement.clone())
        .await
        .map_err(|e| err("update_metadata", e))?
        .ok_or("update_metadata returned None")?;
    ensure!(
        updated.metadata == Some(replacement),
        "metadata merged instead of replaced"
    );
    ensure!(
        updated.last_used_at > lease.last_used_at,
        "lastUsedAt not touched"
    );
    pause().await;
    let touched = f
        .store
        .touch(&lease.id)
        .await
        .map_err(|e| err("touch", e))?
        .ok_or("touch returned None")?;
    ensure!(
        touched.last_used_at > updated.last_used_at,
        "touch did not move lastUsedAt"
    );
    ensure!(
        touched.metadata == updated.metadata && touched.status == LeaseStatus::Active,
        "touch changed more"
    );
    Ok(())
}

/// listByEnvironment: `lastUsedAt` desc then `createdAt` desc, status filter,
/// other environments excluded.
pub async fn list_by_environment_order(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let a = insert(f, new_lease(&env, None)).await?;
    pause().await;
    let b = insert(f, new_lease(&env, None)).await?;
    pause().await;
    let c = insert(f, new_lease(&env, None)).await?;
    insert(f, new_lease(&fresh("other-env"), None)).await?;
    pause().await;
    f.store.touch(&a.id).await.map_err(|e| err("touch", e))?;
    let ids: Vec<String> = f
        .store
        .list_by_environment(&env, None)
        .await
        .map_err(|e| err("list_by_environment", e))?
        .into_iter()
        .map(|l| l.id)
        .collect();
    ensure!(
        ids == vec![a.id.clone(), c.id.clone(), b.id.clone()],
        "order {ids:?}, expected a (touched), c, b"
    );
    f.store
        .release(&c.id, LeaseStatus::Released, ReleaseUpdate::default())
        .await
        .map_err(|e| err("release", e))?;
    let active: Vec<String> = f
        .store
        .list_by_environment(&env, Some(LeaseStatus::Active))
        .await
        .map_err(|e| err("list_by_environment", e))?
        .into_iter()
        .map(|l| l.id)
        .collect();
    ensure!(active == vec![a.id, b.id], "status filter gave {active:?}");
    Ok(())
}

/// listByRun: the run's leases oldest first, with status filter.
pub async fn list_by_run_order(f: &StoreFixture<'_>) -> StoreCheck {
    let (env, run) = (fresh("env"), fresh("run"));
    let a = insert(f, new_lease(&env, Some(&run))).await?;
    pause().await;
    let b = insert(f, new_lease(&env, Some(&run))).await?;
    insert(f, new_lease(&env, Some(&fresh("other-run")))).await?;
    insert(f, new_lease(&env, None)).await?;
    let ids: Vec<String> = f
        .store
        .list_by_run(&run, None)
        .await
        .map_err(|e| err("list_by_run", e))?
        .into_iter()
        .map(|l| l.id)
        .collect();
    ensure!(ids == vec![a.id.clone(), b.id.clone()], "order {ids:?}");
    f.store
        .release(&a.id, LeaseStatus::Failed, ReleaseUpdate::default())
        .await
        .map_err(|e| err("release", e))?;
    let active = f
        .store
        .list_by_run(&run, Some(LeaseStatus::Active))
        .await
        .map_err(|e| err("list_by_run", e))?;
    ensure!(
        active.len() == 1 && active[0].id == b.id,
        "status filter gave {active:?}"
    );
    Ok(())
}

/// listFailedCleanups holds exactly the rows whose cleanup failed; a later
/// success takes a row out.
pub async fn list_failed_cleanups_only_failed(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let failed = insert(f, new_lease(&env, None)).await?;
    let ok = insert(f, new_lease(&env, None)).await?;
    let update = |status| ReleaseUpdate {
        cleanup_status: Some(status),
        cleanup_error: Some("x".into()),
        ..Default::default()
    };
    f.store
        .release(
            &failed.id,
            LeaseStatus::PendingCleanup,
            update(CleanupStatus::Failed),
        )
        .await
        .map_err(|e| err("release", e))?;
    f.store
        .release(
            &ok.id,
            LeaseStatus::Released,
            update(CleanupStatus::Success),
        )
        .await
        .map_err(|e| err("release", e))?;
    let ids = |v: Vec<EnvironmentLease>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
    let listed = ids(f
        .store
        .list_failed_cleanups()
        .await
        .map_err(|e| err("list", e))?);
    ensure!(listed.contains(&failed.id), "failed cleanup not listed");
    ensure!(!listed.contains(&ok.id), "successful cleanup listed");
    f.store
        .release(
            &failed.id,
            LeaseStatus::Expired,
            update(CleanupStatus::Success),
        )
        .await
        .map_err(|e| err("release", e))?;
    let listed = ids(f
        .store
        .list_failed_cleanups()
        .await
        .map_err(|e| err("list", e))?);
    ensure!(
        !listed.contains(&failed.id),
        "cleaned-up lease still listed"
    );
    Ok(())
}

/// listActive holds the active rows only, oldest first.
pub async fn list_active_only_active(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let a = insert(f, new_lease(&env, None)).await?;
    pause().await;
    let b = insert(f, new_lease(&env, None)).await?;
    let c = insert(f, new_lease(&env, None)).await?;
    f.store
        .release(&c.id, LeaseStatus::Released, ReleaseUpdate::default())
        .await
        .map_err(|e| err("release", e))?;
    let ids: Vec<String> = f
        .store
        .list_active()
        .await
        .map_err(|e| err("list_active", e))?
        .into_iter()
        .filter(|l| l.environment_id.as_deref() == Some(env.as_str()))
        .map(|l| l.id)
        .collect();
    ensure!(ids == vec![a.id, b.id], "list_active gave {ids:?}");
    Ok(())
}

/// tryClaim: the claimant may re-claim; with exclusive claims another
/// claimant is refused until the claim expires.
pub async fn claims(f: &StoreFixture<'_>) -> StoreCheck {
    let lease = insert(f, new_lease(&fresh("env"), None)).await?;
    let claim = |who: &'static str, ttl: Duration| {
        let id = lease.id.clone();
        async move {
            f.store
                .try_claim(&id, who, ttl)
                .await
                .map_err(|e| err("try_claim", e))
        }
    };
    let long = Duration::from_secs(60);
    ensure!(claim("a", long).await?, "first claim refused");
    ensure!(claim("a", long).await?, "re-claim by the holder refused");
    if f.exclusive_claims {
        ensure!(!claim("b", long).await?, "second claimant got a held claim");
        ensure!(
            !f.store
                .try_claim(&fresh("missing"), "a", long)
                .await
                .map_err(|e| err("try_claim", e))?,
            "claim of an unknown lease succeeded"
        );
        ensure!(
            claim("a", Duration::ZERO).await?,
            "holder could not shorten its claim"
        );
        pause().await;
        ensure!(claim("b", long).await?, "expired claim not taken over");
    }
    Ok(())
}

/// insertAcquiring writes an in-flight row (`pending_cleanup`, cleanup
/// `pending`, reason `acquire_in_progress`) that is neither active nor a
/// failed cleanup, and is listed by listPendingCleanups.
pub async fn acquiring_row_is_pending(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let run = fresh("run");
    let mut new = new_lease(&env, Some(&run));
    new.provider = Some("e2b".into());
    new.metadata = json!({"acquisition": {"state": "acquiring"}})
        .as_object()
        .cloned();
    let row = f
        .store
        .insert_acquiring(new)
        .await
        .map_err(|e| err("insert_acquiring", e))?;
    ensure!(
        row.status == LeaseStatus::PendingCleanup
            && row.cleanup_status == Some(CleanupStatus::Pending)
            && row.failure_reason.as_deref() == Some(ACQUIRE_IN_PROGRESS_REASON)
            && row.provider_lease_id.is_none()
            && row.heartbeat_run_id.as_deref() == Some(run.as_str()),
        "in-flight row: {row:?}"
    );
    let active = f
        .store
        .list_active()
        .await
        .map_err(|e| err("list_active", e))?;
    ensure!(
        !active.iter().any(|l| l.id == row.id),
        "an in-flight row is listed as active"
    );
    let failed = f
        .store
        .list_failed_cleanups()
        .await
        .map_err(|e| err("list_failed_cleanups", e))?;
    ensure!(
        !failed.iter().any(|l| l.id == row.id),
        "an in-flight row is listed as a failed cleanup"
    );
    let pending = f
        .store
        .list_pending_cleanups()
        .await
        .map_err(|e| err("list_pending_cleanups", e))?;
    ensure!(
        pending.iter().any(|l| l.id == row.id),
        "listPendingCleanups misses the in-flight row"
    );
    Ok(())
}

/// completeAcquisition turns an in-flight row active with the provider's
/// answer, once; a row something else took over is left alone (`None`).
pub async fn complete_acquisition_is_conditional(f: &StoreFixture<'_>) -> StoreCheck {
    let env = fresh("env");
    let row = f
        .store
        .insert_acquiring(new_lease(&env, Some(&fresh("run"))))
        .await
        .map_err(|e| err("insert_acquiring", e))?;
    pause().await;
    let expires = time::now() + chrono::Duration::minutes(30);
    let acquired = AcquiredLease {
        lease_policy: Some(LeasePolicy::ReuseByEnvironment),
        provider_lease_id: Some("sbx-1".into()),
        expires_at: Some(expires),
        metadata: json!({"remoteCwd": "/w"}).as_object().cloned(),
    };
    let done = f
        .store
        .complete_acquisition(&row.id, acquired.clone())
        .await
        .map_err(|e| err("complete_acquisition", e))?
        .ok_or("completing an in-flight row returned None")?;
    ensure!(
        done.status == LeaseStatus::Active
            && done.failure_reason.is_none()
            && done.cleanup_status.is_none()
            && done.provider_lease_id.as_deref() == Some("sbx-1")
            && done.lease_policy == LeasePolicy::ReuseByEnvironment
            && done.metadata == acquired.metadata
            && done.expires_at.map(|t| t.timestamp_millis()) == Some(expires.timestamp_millis())
            && done.last_used_at > row.last_used_at,
        "completed row: {done:?}"
    );
    let again = f
        .store
        .complete_acquisition(&row.id, acquired.clone())
        .await
        .map_err(|e| err("complete_acquisition", e))?;
    ensure!(again.is_none(), "an active row was completed a second time");

    let taken = f
        .store
        .insert_acquiring(new_lease(&env, None))
        .await
        .map_err(|e| err("insert_acquiring", e))?;
    f.store
        .release(
            &taken.id,
            LeaseStatus::Expired,
            ReleaseUpdate {
                failure_reason: Some("acquire_orphaned".into()),
                cleanup_status: Some(CleanupStatus::Success),
                cleanup_error: None,
                termination: None,
            },
        )
        .await
        .map_err(|e| err("release", e))?;
    let late = f
        .store
        .complete_acquisition(&taken.id, acquired)
        .await
        .map_err(|e| err("complete_acquisition", e))?;
    ensure!(late.is_none(), "a swept row was completed");
    let stored = f
        .store
        .get(&taken.id)
        .await
        .map_err(|e| err("get", e))?
        .ok_or("swept row vanished")?;
    ensure!(
        stored.status == LeaseStatus::Expired,
        "a late completion changed a swept row: {stored:?}"
    );
    ensure!(
        f.store
            .complete_acquisition(&fresh("missing"), AcquiredLease::default())
            .await
            .map_err(|e| err("complete_acquisition", e))?
            .is_none(),
        "completing an unknown row returned a lease"
    );
    Ok(())
}

/// Outcome of [`run`]: failed checks by name.
#[derive(Debug, Default)]
pub struct StoreReport {
    /// Names of checks that passed.
    pub passed: Vec<&'static str>,
    /// `(check, message)` of checks that failed.
    pub failed: Vec<(&'static str, String)>,
}

impl StoreReport {
    /// Panics with every failure listed (for tests).
    #[track_caller]
    pub fn assert_passed(&self) {
        if !self.failed.is_empty() {
            let lines: Vec<String> = self
                .failed
                .iter()
                .map(|(name, msg)| format!("  {name}: {msg}"))
                .collect();
            panic!("store conformance failed:\n{}", lines.join("\n"));
        }
    }
}

/// Runs every check against the fixture's store.
pub async fn run(f: &StoreFixture<'_>) -> StoreReport {
    let mut report = StoreReport::default();
    macro_rules! check {
        ($($name:ident),+ $(,)?) => {$(
            match $name(f).await {
                Ok(()) => report.passed.push(stringify!($name)),
                Err(msg) => report.failed.push((stringify!($name), msg)),
            }
        )+};
    }
    check!(
        insert_defaults,
        round_trip_every_field,
        unknown_id_is_none,
        release_sets_released_at,
        release_writes_fields_only_when_provided,
        cleanup_attempt_claims_are_compare_and_swap,
        update_metadata_and_touch,
        list_by_environment_order,
        list_by_run_order,
        list_failed_cleanups_only_failed,
        list_active_only_active,
        claims,
        acquiring_row_is_pending,
        complete_acquisition_is_conditional,
    );
    report
}
