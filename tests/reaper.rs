//! The reaper on the in-memory store with the fake provider: expired,
//! stranded and reusable leases, retried destroys, backoff, background task.

use std::sync::Arc;
use std::time::Duration;

use paperclip_env::core::{
    AcquireRunLease, CleanupStatus, Environment, EnvironmentRuntime, Error, LeasePolicy,
    LeaseStatus, Operation, Reaper, ReaperOptions, RuntimeOptions,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

fn setup(lifetime: Duration) -> (EnvironmentRuntime, FakeProvider, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder().temp_root(dir.path()).build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .options(RuntimeOptions {
            max_lease_lifetime: Some(lifetime),
            ..Default::default()
        })
        .build();
    (runtime, fake, dir)
}

fn env(reuse: bool) -> Environment {
    Environment::new(
        "env-fake",
        "Fake",
        "sandbox",
        json!({"provider": "fake-plugin", "reuseLease": reuse}),
    )
}

#[tokio::test]
async fn default_runtime_options_bound_leases_without_storing_an_expiry() {
    assert_eq!(
        RuntimeOptions::default().max_lease_lifetime,
        Some(paperclip_env::core::driver::DEFAULT_MAX_LEASE_LIFETIME)
    );
    let fake = FakeProvider::new();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .build();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-1"))
        .await
        .unwrap()
        .lease;
    // Paperclip 2026.916 stores only a provider-confirmed expiry; the 24 h
    // bound is the reaper's own, so a fresh lease is neither expired nor
    // given a synthetic `expiresAt`.
    assert_eq!(lease.expires_at, None);
    assert!(!runtime.reap().await.acted());
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(fake.live_leases(), 0);
}

#[tokio::test]
async fn expired_leases_are_released_and_live_ones_kept() {
    let (runtime, fake, _dir) = setup(Duration::from_millis(30));
    let old = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-old"))
        .await
        .unwrap()
        .lease;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = Reaper::new(runtime.clone()).run_once().await;
    assert_eq!(report.expired, vec![old.id.clone()]);
    assert!(report.stranded.is_empty() && report.failures.is_empty());
    assert_eq!(fake.live_leases(), 0);
    let row = runtime.lease_store().get(&old.id).await.unwrap().unwrap();
    assert_eq!(row.status, LeaseStatus::Expired);
    assert!(row.released_at.is_some());

    let (runtime, fake, _dir) = setup(Duration::from_secs(3600));
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-live"))
        .await
        .unwrap();
    let report = runtime.reap().await;
    assert!(!report.acted(), "{report:?}");
    assert_eq!(fake.live_leases(), 1);
}

#[tokio::test]
async fn stranded_leases_by_finished_run_or_age() {
    let (runtime, fake, _dir) = setup(Duration::from_secs(3600));
    let done = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "done"))
        .await
        .unwrap()
        .lease;
    let running = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "running"))
        .await
        .unwrap()
        .lease;
    let report = Reaper::new(runtime.clone())
        .finished_runs(|run| run == "done")
        .run_once()
        .await;
    assert_eq!(report.stranded, vec![done.id]);
    assert_eq!(fake.live_leases(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = Reaper::new(runtime.clone())
        .options(ReaperOptions {
            max_active_age: Some(Duration::from_millis(10)),
            ..Default::default()
        })
        .run_once()
        .await;
    assert_eq!(report.stranded, vec![running.id]);
    assert_eq!(fake.live_leases(), 0);
}

#[tokio::test]
async fn an_expired_reusable_lease_is_destroyed_not_kept_for_reuse() {
    let (runtime, fake, _dir) = setup(Duration::from_millis(20));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(true), "run-1"))
        .await
        .unwrap()
        .lease;
    assert_eq!(lease.lease_policy, LeasePolicy::ReuseByEnvironment);
    tokio::time::sleep(Duration::from_millis(40)).await;
    let report = runtime.reap().await;
    assert_eq!(report.expired, vec![lease.id.clone()], "{report:?}");
    assert_eq!(fake.live_leases(), 0, "reusable sandbox kept after expiry");
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.status, LeaseStatus::Expired);
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
}

#[tokio::test]
async fn a_failed_destroy_is_retried_and_the_lease_ends_expired() {
    let (runtime, fake, _dir) = setup(Duration::from_millis(20));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(true), "run-1"))
        .await
        .unwrap()
        .lease;
    fake.faults().fail_next(Operation::Destroy, || {
        Error::provider("fake-plugin", "destroy refused")
    });
    tokio::time::sleep(Duration::from_millis(40)).await;
    let reaper = Reaper::new(runtime.clone()).options(ReaperOptions {
        initial_backoff: Duration::from_millis(50),
        ..Default::default()
    });
    let report = reaper.run_once().await;
    assert_eq!(report.cleanup_failed, vec![lease.id.clone()], "{report:?}");
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.status, LeaseStatus::PendingCleanup);
    assert_eq!(
        row.cleanup_attempts(),
        0,
        "the expiry destroy is no sweep attempt"
    );
    assert_eq!(fake.live_leases(), 1);

    let report = reaper.run_once().await;
    assert_eq!(report.deferred, vec![lease.id.clone()], "{report:?}");
    tokio::time::sleep(Duration::from_millis(80)).await;
    let report = reaper.run_once().await;
    assert_eq!(report.cleaned_up, vec![lease.id.clone()], "{report:?}");
    assert_eq!(fake.live_leases(), 0);
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.status, LeaseStatus::Expired);
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
    assert_eq!(row.cleanup_attempts(), 1);
    assert_eq!(row.failure_reason.as_deref(), Some("pending_cleanup_retry"));
    assert!(row.cleanup_error().is_none());
}

#[tokio::test]
async fn retries_stop_after_max_attempts_and_backoff_is_capped() {
    let options = ReaperOptions {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(10),
        ..Default::default()
    };
    assert_eq!(options.backoff(0), Duration::from_secs(1));
    assert_eq!(options.backoff(1), Duration::from_secs(2));
    assert_eq!(options.backoff(3), Duration::from_secs(8));
    assert_eq!(options.backoff(4), Duration::from_secs(10));
    assert_eq!(options.backoff(500), Duration::from_secs(10));
    assert_eq!(options.attempt_cap(), 5, "Paperclip's cap by default");

    let (runtime, fake, _dir) = setup(Duration::from_secs(3600));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-1"))
        .await
        .unwrap()
        .lease;
    for _ in 0..2 {
        fake.faults()
            .fail_next(Operation::Release, || Error::provider("fake-plugin", "no"));
        fake.faults()
            .fail_next(Operation::Destroy, || Error::provider("fake-plugin", "no"));
    }
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let reaper = Reaper::new(runtime.clone()).options(ReaperOptions {
        max_cleanup_attempts: Some(1),
        initial_backoff: Duration::ZERO,
        ..Default::default()
    });
    let first = reaper.run_once().await;
    assert_eq!(first.cleanup_failed, vec![lease.id.clone()], "{first:?}");
    let report = reaper.run_once().await;
    assert_eq!(report.abandoned, vec![lease.id.clone()], "{report:?}");
    assert_eq!(fake.live_leases(), 1);
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.cleanup_attempts(), 1);
    assert_eq!(
        row.metadata.as_ref().unwrap()["pendingCleanupRetryCapWarned"],
        serde_json::json!(true),
        "the cap is reported once and marked"
    );
}

/// Paperclip 2026.916's sweep: a failed release becomes `pending_cleanup`
/// and gets exactly five sweep attempts, each claimed before the teardown.
#[tokio::test]
async fn a_failed_release_gets_five_sweep_attempts_then_is_left_alone() {
    let (runtime, fake, _dir) = setup(Duration::from_secs(3600));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-1"))
        .await
        .unwrap()
        .lease;
    for _ in 0..12 {
        fake.faults()
            .fail_next(Operation::Release, || Error::provider("fake-plugin", "no"));
        fake.faults()
            .fail_next(Operation::Destroy, || Error::provider("fake-plugin", "no"));
    }
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.status, LeaseStatus::PendingCleanup);
    assert_eq!(
        row.failure_reason.as_deref(),
        Some("release_cleanup_failed")
    );
    let reaper = Reaper::new(runtime.clone()).options(ReaperOptions {
        initial_backoff: Duration::ZERO,
        ..Default::default()
    });
    for attempt in 1..=5 {
        let report = reaper.run_once().await;
        assert_eq!(
            report.cleanup_failed,
            vec![lease.id.clone()],
            "attempt {attempt}: {report:?}"
        );
        let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
        assert_eq!(row.cleanup_attempts(), attempt);
    }
    let report = reaper.run_once().await;
    assert_eq!(report.abandoned, vec![lease.id.clone()], "{report:?}");
    assert!(report.cleanup_failed.is_empty());
    assert_eq!(fake.live_leases(), 1, "left for manual cleanup");
}

#[tokio::test]
async fn background_reaper_runs_until_shutdown() {
    let (runtime, fake, _dir) = setup(Duration::from_millis(10));
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-1"))
        .await
        .unwrap();
    let handle = Reaper::new(runtime.clone()).spawn(Duration::from_millis(10));
    for _ in 0..300 {
        if fake.live_leases() == 0 && handle.passes() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.live_leases(), 0);
    assert!(handle.last_report().is_some());
    let passes = handle.passes();
    assert!(passes >= 2);
    handle.shutdown().await;
}

#[tokio::test]
async fn leases_of_a_deleted_environment_are_still_reaped() {
    let (runtime, fake, _dir) = setup(Duration::from_millis(20));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(false), "run-1"))
        .await
        .unwrap()
        .lease;
    assert!(
        runtime
            .environment_store()
            .remove("env-fake")
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(40)).await;
    let report = runtime.reap().await;
    assert_eq!(report.expired, vec![lease.id.clone()], "{report:?}");
    assert_eq!(fake.live_leases(), 0);
    let row = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
}

/// Paperclip 2026.916's delete guard: an environment with a `pending_cleanup`
/// lease or a live reusable lease cannot be deleted; once the sweep cleared
/// the cleanup and the reusable sandbox is destroyed, it can.
#[tokio::test]
async fn environment_delete_is_blocked_by_pending_cleanup_and_live_reusable_leases() {
    let (runtime, fake, _dir) = setup(Duration::from_secs(3600));
    let reusable = env(true);
    runtime
        .environment_store()
        .put(reusable.clone())
        .await
        .unwrap();
    let kept = runtime
        .acquire_run_lease(AcquireRunLease::for_run(reusable.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        runtime
            .environment_delete_blockers(&reusable.id)
            .await
            .unwrap(),
        vec!["reusable_sandbox_lease"]
    );
    fake.faults()
        .fail_next(Operation::Destroy, || Error::provider("fake-plugin", "no"));
    let row = runtime.lease_store().get(&kept.id).await.unwrap().unwrap();
    runtime.destroy_run_lease(&reusable, &row).await.unwrap();
    let err = runtime.delete_environment(&reusable.id).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert!(err.to_string().contains("pending_sandbox_cleanup"), "{err}");
    assert!(
        runtime
            .environment_store()
            .get(&reusable.id)
            .await
            .unwrap()
            .is_some()
    );

    let reaper = Reaper::new(runtime.clone()).options(ReaperOptions {
        initial_backoff: Duration::ZERO,
        ..Default::default()
    });
    let report = reaper.run_once().await;
    assert_eq!(report.cleaned_up, vec![kept.id.clone()], "{report:?}");
    assert!(runtime.delete_environment(&reusable.id).await.unwrap());
    assert_eq!(fake.live_leases(), 0);
}
