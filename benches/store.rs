//! Store cost: lease state changes (insert, then release) per second on the
//! SQLite store (file, WAL, synchronous=FULL), next to the in-memory store.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env::core::LeaseStatus;
use paperclip_env::core::store::{InMemoryLeaseStore, LeaseStore, NewLease, ReleaseUpdate};
use paperclip_env_store_sqlite::SqliteStore;

async fn cycle(store: &dyn LeaseStore, i: u64) {
    let lease = store
        .insert(NewLease {
            environment_id: "bench-env".into(),
            heartbeat_run_id: Some(format!("run-{i}")),
            ..Default::default()
        })
        .await
        .expect("insert");
    store
        .release(&lease.id, LeaseStatus::Released, ReleaseUpdate::default())
        .await
        .expect("release");
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = rt
        .block_on(SqliteStore::open(dir.path().join("bench.db")))
        .expect("open");
    let memory = InMemoryLeaseStore::new();
    let mut group = c.benchmark_group("lease_state_changes");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(2));
    let mut i = 0u64;
    group.bench_function("baseline: in-memory store, insert + release", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let memory = &memory;
            async move { cycle(memory, i).await }
        })
    });
    group.bench_function(
        "sqlite store (WAL, synchronous=FULL), insert + release",
        |b| {
            b.to_async(&rt).iter(|| {
                i += 1;
                let sqlite = &sqlite;
                async move { cycle(sqlite, i).await }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, stores);
criterion_main!(benches);
