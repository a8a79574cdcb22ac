//! Concurrency: 1,000 leases acquired, each running a command, and released
//! concurrently on the fake provider (wall time); plus the memory an idle
//! lease costs in the runtime and the in-memory store (printed once).

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

const LEASES: usize = 1000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn setup() -> (EnvironmentRuntime, Environment, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("temp dir");
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(
            FakeProvider::builder().temp_root(root.path()).build(),
        ))
        .build();
    let env = Environment::new(
        "bench-env",
        "Bench",
        "sandbox",
        json!({"provider": "fake-plugin"}),
    );
    (runtime, env, root)
}

fn idle_lease_memory(rt: &tokio::runtime::Runtime) {
    let (runtime, env, _root) = setup();
    // Warm up allocator and lazy statics with one lease.
    rt.block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "warm")))
        .expect("acquire");
    let before = rss_bytes();
    rt.block_on(async {
        for i in 0..10_000 {
            runtime
                .acquire_run_lease(AcquireRunLease::for_run(env.clone(), format!("idle-{i}")))
                .await
                .expect("acquire");
        }
    });
    let after = rss_bytes();
    let per_lease = after.saturating_sub(before) as f64 / 10_000.0;
    println!(
        "idle lease memory: {:.1} KiB per lease in the runtime, store and fake provider (RSS {:.1} MiB → {:.1} MiB over 10,000 leases)",
        per_lease / 1024.0,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
}

fn concurrency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    idle_lease_memory(&rt);
    let mut group = c.benchmark_group("concurrency");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    let mut round = 0u64;
    group.bench_function(
        "1000 leases: acquire → execute `true` → release, concurrently",
        |b| {
            b.to_async(&rt).iter(|| {
                round += 1;
                let (runtime, env, root) = setup();
                async move {
                    let tasks = (0..LEASES).map(|i| {
                        let (runtime, env) = (runtime.clone(), env.clone());
                        let run = format!("r{round}-{i}");
                        tokio::spawn(async move {
                            let lease = runtime
                                .acquire_run_lease(AcquireRunLease::for_run(
                                    env.clone(),
                                    run.clone(),
                                ))
                                .await
                                .expect("acquire")
                                .lease;
                            let r = runtime
                                .execute(&env, &lease, &ExecuteRequest::new("true"))
                                .await
                                .expect("execute");
                            assert!(r.success());
                            runtime
                                .release_run_leases(&run, LeaseStatus::Released)
                                .await
                                .into_result()
                                .expect("release");
                        })
                    });
                    for task in futures::future::join_all(tasks).await {
                        task.expect("task");
                    }
                    drop(root);
                }
            })
        },
    );
    group.bench_function(
        "baseline: 1000 × spawn `true` directly, concurrently",
        |b| {
            b.to_async(&rt).iter(|| async {
                let tasks = (0..LEASES).map(|_| {
                    tokio::spawn(async {
                        tokio::process::Command::new("true")
                            .status()
                            .await
                            .expect("spawn")
                    })
                });
                for task in futures::future::join_all(tasks).await {
                    assert!(task.expect("task").success());
                }
            })
        },
    );
    group.bench_function(
        "baseline: 1000 × spawn `true` with output captured, concurrently",
        |b| {
            b.to_async(&rt).iter(|| async {
                let tasks = (0..LEASES).map(|_| {
                    tokio::spawn(async {
                        tokio::process::Command::new("true")
                            .env_clear()
                            .stdin(std::process::Stdio::null())
                            .process_group(0)
                            .output()
                            .await
                            .expect("spawn")
                    })
                });
                for task in futures::future::join_all(tasks).await {
                    assert!(task.expect("task").status.success());
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, concurrency);
criterion_main!(benches);
