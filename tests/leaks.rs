//! No sandbox without a record: acquisitions that a deadline, a dropped
//! caller or a dead process interrupts leave nothing behind (issue: leaks
//! under crashes and deadlines). The fake provider stands in for a slow
//! cloud: it creates its sandbox first and answers later.

use std::sync::Arc;
use std::time::Duration;

use paperclip_env::core::acquisition::{self, ACQUIRE_ABANDONED_REASON, ACQUIRE_ORPHANED_REASON};
use paperclip_env::core::store::InMemoryLeaseStore;
use paperclip_env::core::{
    AcquireRunLease, CleanupStatus, Environment, EnvironmentRuntime, Error, ExecuteRequest,
    LeaseStatus, LeaseStore, Operation, Reaper, RuntimeOptions,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

struct Setup {
    runtime: EnvironmentRuntime,
    fake: FakeProvider,
    store: Arc<InMemoryLeaseStore>,
    _root: tempfile::TempDir,
}

fn setup(options: RuntimeOptions) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let store = Arc::new(InMemoryLeaseStore::new());
    let runtime = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .provider(Arc::new(fake.clone()))
        .options(options)
        .build();
    Setup {
        runtime,
        fake,
        store,
        _root: root,
    }
}

fn short(call: Duration) -> RuntimeOptions {
    RuntimeOptions {
        default_call_deadline: call,
        acquisition_heartbeat: Duration::from_millis(50),
        ..Default::default()
    }
}

fn env() -> Environment {
    Environment::new(
        "env-fake",
        "Fake",
        "sandbox",
        json!({"provider": "fake-plugin"}),
    )
}

/// Polls `cond` every 20 ms; panics with `what` when it is still false after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test]
async fn a_deadline_shorter_than_the_provider_leaves_no_sandbox() {
    // The provider answers after the caller's deadline (200 ms) but within
    // the hard bound (twice that).
    let s = setup(short(Duration::from_millis(200)));
    s.fake
        .faults()
        .stall_after_create(Duration::from_millis(300));
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        s.runtime
            .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1")),
    )
    .await
    .expect("the caller gets its answer at its own deadline")
    .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(s.fake.live_leases(), 1, "the provider is still working");

    eventually("the late sandbox is torn down", || {
        s.fake.live_leases() == 0
    })
    .await;
    let rows = s.store.all();
    assert_eq!(rows.len(), 1, "{rows:?}");
    eventually("the row records the abandonment", || {
        s.store.all()[0].status == LeaseStatus::Expired
    })
    .await;
    let row = &s.store.all()[0];
    assert_eq!(
        row.failure_reason.as_deref(),
        Some(ACQUIRE_ABANDONED_REASON)
    );
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
}

#[tokio::test]
async fn a_caller_that_drops_its_future_strands_nothing() {
    let s = setup(short(Duration::from_secs(5)));
    s.fake
        .faults()
        .stall_after_create(Duration::from_millis(400));
    let runtime = s.runtime.clone();
    let call = tokio::spawn(async move {
        runtime
            .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
            .await
    });
    eventually("the sandbox exists", || s.fake.live_leases() == 1).await;
    call.abort();
    eventually("the sandbox is torn down", || s.fake.live_leases() == 0).await;
    eventually("the row is closed", || {
        s.store
            .all()
            .iter()
            .all(|l| l.status == LeaseStatus::Expired)
    })
    .await;
}

#[tokio::test]
async fn the_row_exists_before_the_provider_is_asked() {
    let s = setup(short(Duration::from_secs(5)));
    s.fake
        .faults()
        .delay(Operation::Acquire, Duration::from_millis(300));
    let runtime = s.runtime.clone();
    let call = tokio::spawn(async move {
        runtime
            .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
            .await
    });
    eventually("the in-flight row is written", || !s.store.is_empty()).await;
    let row = s.store.all().remove(0);
    assert!(acquisition::is_in_flight(&row), "{row:?}");
    assert_eq!(row.status, LeaseStatus::PendingCleanup);
    assert_eq!(acquisition::run_label(&row), Some("run-1"));
    assert_eq!(s.fake.live_leases(), 0, "nothing created yet");
    let lease = call.await.unwrap().unwrap().lease;
    assert_eq!(lease.id, row.id, "the same row turns active");
    assert_eq!(lease.status, LeaseStatus::Active);
    assert!(lease.provider_lease_id.is_some());
    assert!(!lease.metadata.as_ref().unwrap().contains_key("acquisition"));
}

#[tokio::test]
async fn a_failed_acquire_is_recorded_as_failed() {
    let s = setup(short(Duration::from_secs(5)));
    s.fake.faults().fail_next(Operation::Acquire, || {
        Error::provider("fake-plugin", "capacity exhausted")
    });
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capacity exhausted"), "{err}");
    let row = s.store.all().remove(0);
    assert_eq!(row.status, LeaseStatus::Failed);
    assert_eq!(row.failure_reason.as_deref(), Some("acquire_failed"));
    // Nothing for the reaper to do.
    let report = Reaper::new(s.runtime.clone()).run_once().await;
    assert!(!report.acted(), "{report:?}");
}

/// A provider that hangs past the hard bound has its future dropped: the
/// in-process stand-in for a process killed mid-acquire. The row stays in
/// flight, its heartbeat stops, and the reaper sweeps the provider by run.
#[tokio::test]
async fn the_reaper_sweeps_an_acquisition_whose_heartbeat_stopped() {
    let s = setup(short(Duration::from_millis(100)));
    // A lease of the same run that is recorded properly must survive.
    let kept = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
        .await
        .unwrap()
        .lease;
    s.fake.faults().stall_after_create(Duration::from_secs(30));
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(s.fake.live_leases(), 2);

    let reaper = Reaper::new(s.runtime.clone());
    // While the heartbeat beats (the task still waits for the provider),
    // the in-flight row is left alone.
    let early = reaper.run_once().await;
    assert!(early.orphaned.is_empty(), "{early:?}");

    // Past the hard bound (2 × 100 ms) the call is dropped; three missed
    // beats later the row is stale.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let report = reaper.run_once().await;
    assert_eq!(report.orphaned.len(), 1, "{report:?}");
    assert_eq!(s.fake.live_leases(), 1, "only the recorded sandbox is left");
    assert_eq!(
        s.fake.lease_ids(),
        vec![kept.provider_lease_id.clone().unwrap()]
    );
    let swept = s.store.get(&report.orphaned[0]).await.unwrap().unwrap();
    assert_eq!(swept.status, LeaseStatus::Expired);
    assert_eq!(
        swept.failure_reason.as_deref(),
        Some(ACQUIRE_ORPHANED_REASON)
    );
    assert_eq!(swept.cleanup_status, Some(CleanupStatus::Success));
    // A second pass has nothing left to do.
    assert!(!reaper.run_once().await.acted());
}

#[tokio::test]
async fn a_failed_sweep_is_recorded_and_retried() {
    let s = setup(short(Duration::from_millis(100)));
    s.fake.faults().stall_after_create(Duration::from_secs(30));
    let _ = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env(), "run-1"))
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.fake.faults().fail_next(Operation::ListRunResources, || {
        Error::provider("fake-plugin", "list refused")
    });
    let reaper = Reaper::new(s.runtime.clone()).options(paperclip_env::core::ReaperOptions {
        initial_backoff: Duration::ZERO,
        ..Default::default()
    });
    let report = reaper.run_once().await;
    assert_eq!(report.cleanup_failed.len(), 1, "{report:?}");
    let row = s
        .store
        .get(&report.cleanup_failed[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, LeaseStatus::PendingCleanup);
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Failed));
    assert!(
        row.cleanup_error().unwrap().contains("list refused"),
        "{row:?}"
    );
    assert_eq!(s.fake.live_leases(), 1);
    let retry = reaper.run_once().await;
    assert_eq!(retry.cleaned_up, vec![row.id.clone()], "{retry:?}");
    assert_eq!(s.fake.live_leases(), 0);
}

#[tokio::test]
async fn later_calls_use_the_runtime_budget_not_a_provider_default_in_metadata() {
    // The fake writes its default `timeoutMs` (five minutes) into lease
    // metadata; the environment sets none, so calls get the runtime default.
    let s = setup(short(Duration::from_millis(300)));
    let env = env();
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    assert!(lease.metadata.as_ref().unwrap().contains_key("timeoutMs"));
    s.fake
        .faults()
        .delay(Operation::Execute, Duration::from_secs(20));
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        s.runtime
            .execute(&env, &lease, &ExecuteRequest::new("true")),
    )
    .await
    .expect("execute ends at the runtime's deadline")
    .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    s.fake
        .faults()
        .delay(Operation::Release, Duration::from_secs(20));
    let released = tokio::time::timeout(
        Duration::from_secs(5),
        s.runtime.release_lease(&env, &lease, LeaseStatus::Released),
    )
    .await
    .expect("release ends at the runtime's deadline")
    .unwrap()
    .unwrap();
    assert_eq!(released.lease.cleanup_status, Some(CleanupStatus::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_passes_the_leak_drills_with_an_inline_canary() {
    use paperclip_env_testkit::leak_drills::{LeakDrill, crash_rounds, deadline_rounds};
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .secret_field("apiKey")
        .build();
    let (live, stall) = (fake.clone(), fake.clone());
    let drill = LeakDrill::new(
        Arc::new(fake),
        json!({"provider": "fake-plugin", "apiKey": "canary-sk-9f8e7d6c5b4a"}),
    )
    .canary("canary-sk-9f8e7d6c5b4a")
    .live(move || live.live_leases())
    .slow_create(move |d| stall.faults().stall_after_create(d.unwrap_or_default()));
    crash_rounds(&drill, 5).await.unwrap();
    deadline_rounds(&drill, 5).await.unwrap();
}
