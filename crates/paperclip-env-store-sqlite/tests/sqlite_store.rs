//! The SQLite store: conformance, durability across reopen, migrations,
//! exclusive claims across handles, and a full runtime lifecycle.

use std::sync::Arc;

use paperclip_env_core::store::{EnvironmentStore, LeaseStore, NewLease};
use paperclip_env_core::{
    AcquireRunLease, CleanupStatus, Environment, EnvironmentRuntime, LeaseStatus, Operation,
    Reaper, ReaperOptions, RuntimeOptions,
};
use paperclip_env_store_sqlite::SqliteStore;
use paperclip_env_testkit::fake::FakeProvider;
use paperclip_env_testkit::store_conformance::{StoreFixture, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("state.db"))
        .await
        .unwrap();
    let report = run(&StoreFixture::new(&store).exclusive_claims(true)).await;
    report.assert_passed();
    assert_eq!(report.passed.len(), 14);
}

#[tokio::test]
async fn in_memory_database_conforms() {
    let store = SqliteStore::open_in_memory().await.unwrap();
    run(&StoreFixture::new(&store).exclusive_claims(true))
        .await
        .assert_passed();
}

#[tokio::test]
async fn leases_and_environments_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/state.db");
    let lease = {
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), 2);
        store
            .put(Environment::new(
                "env-1",
                "E",
                "local",
                serde_json::json!({}),
            ))
            .await
            .unwrap();
        store
            .insert(NewLease {
                environment_id: "env-1".into(),
                metadata: serde_json::json!({"k": "v"}).as_object().cloned(),
                ..Default::default()
            })
            .await
            .unwrap()
    };
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), 2);
    assert_eq!(
        LeaseStore::get(&store, &lease.id).await.unwrap(),
        Some(lease)
    );
    let env = EnvironmentStore::get(&store, "env-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.name, "E");
    assert!(store.remove("env-1").await.unwrap());
    assert!(!store.remove("env-1").await.unwrap());
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).await.unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert!(err.to_string().contains("newer than this"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_exclusive_across_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    let lease = a
        .insert(NewLease {
            environment_id: "env".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ttl = std::time::Duration::from_secs(60);
    assert!(a.try_claim(&lease.id, "host-a", ttl).await.unwrap());
    assert!(!b.try_claim(&lease.id, "host-b", ttl).await.unwrap());
}

fn fake_env() -> Environment {
    Environment::new(
        "env-fake",
        "Fake",
        "sandbox",
        serde_json::json!({"provider": "fake-plugin"}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_releases_a_lease_left_by_a_restarted_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sandboxes");
    let path = dir.path().join("state.db");
    let options = RuntimeOptions {
        max_lease_lifetime: Some(std::time::Duration::from_millis(50)),
        ..Default::default()
    };
    let sandbox_dir;
    {
        // First "process": acquires and forgets.
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        let fake = FakeProvider::builder().temp_root(&root).build();
        let runtime = EnvironmentRuntime::builder()
            .lease_store(store.clone())
            .environment_store(store)
            .provider(Arc::new(fake.clone()))
            .options(options.clone())
            .build();
        let lease = runtime
            .acquire_run_lease(AcquireRunLease::for_run(fake_env(), "run-1"))
            .await
            .unwrap()
            .lease;
        assert!(
            lease.expires_at.is_none(),
            "no expiry is stored unless the provider confirms one"
        );
        sandbox_dir = std::path::PathBuf::from(lease.metadata_str("fakeRootDir").unwrap());
        assert!(sandbox_dir.is_dir());
    }
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    // Second "process": a fresh store handle and a fresh fake that never saw the lease.
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let fake = FakeProvider::builder().temp_root(&root).build();
    let runtime = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .environment_store(store.clone())
        .provider(Arc::new(fake.clone()))
        .options(options)
        .build();
    let report = runtime.reap().await;
    assert_eq!(report.expired.len(), 1, "{report:?}");
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(!sandbox_dir.exists(), "sandbox directory leaked");
    let lease = store.list_all().await.unwrap().remove(0);
    assert_eq!(lease.status, LeaseStatus::Expired);
    assert_eq!(lease.cleanup_status, Some(CleanupStatus::Success));
    // Idempotent: a second pass has nothing to do.
    let again = runtime.reap().await;
    assert!(!again.acted(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cleanup_is_retried_with_backoff_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(dir.path().join("state.db"))
            .await
            .unwrap(),
    );
    let fake = FakeProvider::builder()
        .temp_root(dir.path().join("sandboxes"))
        .build();
    let runtime = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .environment_store(store.clone())
        .provider(Arc::new(fake.clone()))
        .build();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(), "run-1"))
        .await
        .unwrap()
        .lease;
    // The release fails, and so does the sweep's first teardown (a destroy:
    // the row is `pending_cleanup`).
    fake.faults().fail_next(Operation::Release, || {
        paperclip_env_core::Error::provider("fake-plugin", "release refused")
    });
    fake.faults().fail_next(Operation::Destroy, || {
        paperclip_env_core::Error::provider("fake-plugin", "release refused")
    });
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(fake.live_leases(), 1);
    let reaper = Reaper::new(runtime.clone()).options(ReaperOptions {
        initial_backoff: std::time::Duration::from_millis(200),
        ..Default::default()
    });
    // Not due yet.
    let report = reaper.run_once().await;
    assert_eq!(report.deferred, vec![lease.id.clone()], "{report:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let report = reaper.run_once().await;
    assert_eq!(report.cleanup_failed, vec![lease.id.clone()], "{report:?}");
    let row = LeaseStore::get(store.as_ref(), &lease.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, LeaseStatus::PendingCleanup);
    assert_eq!(row.cleanup_attempts(), 1, "one sweep attempt claimed");
    assert!(row.cleanup_error().unwrap().contains("release refused"));
    // Backoff doubled (400 ms): 100 ms later still deferred.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(reaper.run_once().await.deferred, vec![lease.id.clone()]);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let report = reaper.run_once().await;
    assert_eq!(report.cleaned_up, vec![lease.id.clone()], "{report:?}");
    assert_eq!(fake.live_leases(), 0);
    let row = LeaseStore::get(store.as_ref(), &lease.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, LeaseStatus::Expired);
    assert_eq!(row.failure_reason.as_deref(), Some("pending_cleanup_retry"));
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
    assert_eq!(row.cleanup_attempts(), 2);
    assert!(row.cleanup_error().is_none());
    assert_eq!(
        row.termination_receipt().and_then(|r| r.get("state")),
        Some(&serde_json::json!("destroyed")),
        "the sweep's confirmed teardown leaves a receipt: {:?}",
        row.metadata
    );
    assert!(store.list_failed_cleanups().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reapers_on_one_file_release_each_lease_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let root = dir.path().join("sandboxes");
    let options = RuntimeOptions {
        max_lease_lifetime: Some(std::time::Duration::from_millis(10)),
        ..Default::default()
    };
    let mut runtimes = Vec::new();
    let mut fakes = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        let fake = FakeProvider::builder().temp_root(&root).build();
        runtimes.push(
            EnvironmentRuntime::builder()
                .lease_store(store.clone())
                .environment_store(store)
                .provider(Arc::new(fake.clone()))
                .options(options.clone())
                .build(),
        );
        fakes.push(fake);
    }
    for i in 0..8 {
        runtimes[0]
            .acquire_run_lease(AcquireRunLease::for_run(fake_env(), format!("run-{i}")))
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let reapers: Vec<_> = runtimes
        .iter()
        .map(|rt| {
            let reaper = Reaper::new(rt.clone());
            tokio::spawn(async move { reaper.run_once().await })
        })
        .collect();
    let mut reports = Vec::new();
    for task in reapers {
        reports.push(task.await.unwrap());
    }
    let (a, b) = (&reports[0], &reports[1]);
    let mut released: Vec<String> = a.expired.iter().chain(b.expired.iter()).cloned().collect();
    released.sort();
    let before = released.len();
    released.dedup();
    assert_eq!(before, 8, "a: {a:?}\nb: {b:?}");
    assert_eq!(released.len(), 8, "a lease was released twice");
    let provider_releases: u64 = fakes
        .iter()
        .map(|f| f.stats().releases.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(provider_releases, 8);
    // Judge leaks by the sandbox directories: a fake's in-memory map does not
    // see sandboxes the other host's fake removed.
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "a sandbox leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reaper_runs_and_shuts_down() {
    let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let runtime = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .environment_store(store.clone())
        .build();
    let env = Environment::new("env-l", "L", "local", serde_json::json!({}));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "done-run"))
        .await
        .unwrap()
        .lease;
    let handle = Reaper::new(runtime.clone())
        .finished_runs(|run| run == "done-run")
        .spawn(std::time::Duration::from_millis(10));
    for _ in 0..200 {
        if handle.passes() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(handle.passes() >= 2);
    handle.shutdown().await;
    let row = LeaseStore::get(store.as_ref(), &lease.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, LeaseStatus::Expired);
}
