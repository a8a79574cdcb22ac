//! The PostgreSQL store against a throwaway server on 127.0.0.1: conformance,
//! durability across reconnects, concurrent migration, and two concurrent
//! reapers releasing every lease exactly once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use paperclip_env_core::store::{EnvironmentStore, LeaseStore, NewLease};
use paperclip_env_core::{
    AcquireRunLease, CleanupStatus, Environment, EnvironmentRuntime, LeaseStatus, Reaper,
    RuntimeOptions,
};
use paperclip_env_store_postgres::PostgresStore;
use paperclip_env_testkit::fake::FakeProvider;
use paperclip_env_testkit::postgres::PgFixture;
use paperclip_env_testkit::store_conformance::{StoreFixture, run};

fn server() -> PgFixture {
    PgFixture::start().expect("a throwaway PostgreSQL (run scripts/setup.sh to install it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let pg = server();
    let store = PostgresStore::connect(&pg.connection_string())
        .await
        .unwrap();
    let report = run(&StoreFixture::new(&store).exclusive_claims(true)).await;
    report.assert_passed();
    assert_eq!(report.passed.len(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_reconnect_and_hosts_migrate_once() {
    let pg = server();
    let url = pg.connection_string();
    let (a, b) = tokio::join!(PostgresStore::connect(&url), PostgresStore::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.schema_version().await.unwrap(), 2);
    a.put(Environment::new(
        "env-1",
        "E",
        "local",
        serde_json::json!({}),
    ))
    .await
    .unwrap();
    let lease = a
        .insert(NewLease {
            environment_id: "env-1".into(),
            metadata: serde_json::json!({"k": [1, "v"]}).as_object().cloned(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(a);
    let c = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(
        LeaseStore::get(&c, &lease.id).await.unwrap(),
        Some(lease.clone())
    );
    assert_eq!(LeaseStore::get(&b, &lease.id).await.unwrap(), Some(lease));
    assert_eq!(
        EnvironmentStore::get(&c, "env-1")
            .await
            .unwrap()
            .unwrap()
            .name,
        "E"
    );
    assert!(c.remove("env-1").await.unwrap());
    assert_eq!(c.list_all().await.unwrap().len(), 1);

    // Eight hosts race to claim one lease: exactly one wins.
    let mut hosts = Vec::new();
    for _ in 0..8 {
        hosts.push(PostgresStore::connect(&url).await.unwrap());
    }
    let fresh = c
        .insert(NewLease {
            environment_id: "env-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let tasks: Vec<_> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            let id = fresh.id.clone();
            tokio::spawn(async move {
                host.try_claim(&id, &format!("host-{i}"), Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
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
async fn two_concurrent_reapers_release_each_lease_exactly_once() {
    let pg = server();
    let url = pg.connection_string();
    let root = tempfile::tempdir().unwrap();
    let options = RuntimeOptions {
        max_lease_lifetime: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    // Two "hosts": each its own connection and its own fake provider instance.
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
        let fake = FakeProvider::builder().temp_root(root.path()).build();
        let runtime = EnvironmentRuntime::builder()
            .lease_store(store.clone())
            .environment_store(store)
            .provider(Arc::new(fake.clone()))
            .options(options.clone())
            .build();
        hosts.push((runtime, fake));
    }
    const LEASES: usize = 12;
    for i in 0..LEASES {
        hosts[i % 2]
            .0
            .acquire_run_lease(AcquireRunLease::for_run(fake_env(), format!("run-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), LEASES);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let tasks: Vec<_> = hosts
        .iter()
        .map(|(runtime, _)| {
            let reaper = Reaper::new(runtime.clone());
            tokio::spawn(async move { reaper.run_once().await })
        })
        .collect();
    let mut released = Vec::new();
    for task in tasks {
        let report = task.await.unwrap();
        assert!(report.failures.is_empty(), "{report:?}");
        released.extend(report.expired);
    }
    let total = released.len();
    released.sort();
    released.dedup();
    assert_eq!(total, LEASES, "every lease released once: {released:?}");
    assert_eq!(released.len(), LEASES, "a lease was released twice");
    let provider_releases: u64 = hosts
        .iter()
        .map(|(_, fake)| fake.stats().releases.load(Ordering::SeqCst))
        .sum();
    assert_eq!(provider_releases, LEASES as u64);
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "a sandbox leaked"
    );
    let store = PostgresStore::connect(&url).await.unwrap();
    for lease in store.list_all().await.unwrap() {
        assert_eq!(lease.status, LeaseStatus::Expired);
        assert_eq!(lease.cleanup_status, Some(CleanupStatus::Success));
        assert_eq!(lease.cleanup_attempts(), 0, "no sweep was needed");
    }
    // A second round on both hosts finds nothing.
    for (runtime, _) in &hosts {
        assert!(!runtime.reap().await.acted());
    }
}
