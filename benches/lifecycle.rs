//! Lifecycle overhead: acquire → execute `true` → release through the runtime
//! and the fake provider, and execute alone on a held lease, next to spawning
//! `true` directly with `tokio::process`: with inherited stdio, and with
//! stdout/stderr captured through pipes as the execute contract requires (the
//! like-for-like baseline). Ratios are in BENCHMARKS.md.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

fn lifecycle(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let root = tempfile::tempdir().expect("temp dir");
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake))
        .build();
    let env = Environment::new(
        "bench-env",
        "Bench",
        "sandbox",
        json!({"provider": "fake-plugin"}),
    );
    let mut group = c.benchmark_group("lifecycle");
    group.bench_function("baseline: tokio::process spawn `true`", |b| {
        b.to_async(&rt).iter(|| async {
            let status = tokio::process::Command::new("true")
                .status()
                .await
                .expect("spawn");
            assert!(status.success());
        })
    });
    group.bench_function(
        "baseline: tokio::process spawn `true`, output captured",
        |b| {
            b.to_async(&rt).iter(|| async {
                let output = tokio::process::Command::new("true")
                    .env_clear()
                    .stdin(std::process::Stdio::null())
                    .process_group(0)
                    .output()
                    .await
                    .expect("spawn");
                assert!(output.status.success());
            })
        },
    );
    let held = rt
        .block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "held")))
        .expect("acquire")
        .lease;
    group.bench_function("runtime: execute `true` on a held lease", |b| {
        b.to_async(&rt).iter(|| async {
            let result = runtime
                .execute(&env, &held, &ExecuteRequest::new("true"))
                .await
                .expect("execute");
            assert!(result.success());
        })
    });
    let mut n = 0u64;
    group.bench_function("runtime: acquire → execute `true` → release", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let run = format!("run-{n}");
            let (runtime, env) = (runtime.clone(), env.clone());
            async move {
                let lease = runtime
                    .acquire_run_lease(AcquireRunLease::for_run(env.clone(), run.clone()))
                    .await
                    .expect("acquire")
                    .lease;
                let result = runtime
                    .execute(&env, &lease, &ExecuteRequest::new("true"))
                    .await
                    .expect("execute");
                assert!(result.success());
                runtime
                    .release_run_leases(&run, LeaseStatus::Released)
                    .await
                    .into_result()
                    .expect("release");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
