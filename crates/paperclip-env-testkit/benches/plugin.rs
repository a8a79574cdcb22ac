//! Cost of the out-of-process plugin path: the same fake provider in process
//! and behind the reference worker (`paperclip-env-plugin-worker`, JSON-RPC
//! over stdio), for execute `true` on a held lease and a whole
//! acquire → release cycle. The difference is the protocol's overhead:
//! framing, serde and two pipe hops per call. Figures are in BENCHMARKS.md.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use paperclip_env_core::plugin::{
    PluginManifest, PluginSandboxProvider, PluginWorker, PluginWorkerConfig,
};
use paperclip_env_core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus,
};
use paperclip_env_testkit::fake::FakeProvider;
use paperclip_env_testkit::plugin_worker::{self, ENV_TEMP_ROOT, SANDBOX_DRIVER_KEY};
use serde_json::json;

const WORKER: &str = env!("CARGO_BIN_EXE_paperclip-env-plugin-worker");

fn environment(provider: &str) -> Environment {
    Environment::new(
        "bench-env",
        "Bench",
        "sandbox",
        json!({"provider": provider, "image": "fake:bench"}),
    )
}

fn bench_path(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    runtime: &EnvironmentRuntime,
    env: &Environment,
) {
    let held = rt
        .block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "held")))
        .expect("acquire")
        .lease;
    let mut group = c.benchmark_group("plugin");
    group.bench_function(format!("{name}: execute `true` on a held lease"), |b| {
        b.to_async(rt).iter(|| async {
            let result = runtime
                .execute(env, &held, &ExecuteRequest::new("true"))
                .await
                .expect("execute");
            assert_eq!(result.exit_code, Some(0));
        })
    });
    let mut run = 0u64;
    group.bench_function(format!("{name}: acquire → release"), |b| {
        b.to_async(rt).iter(|| {
            run += 1;
            let request = AcquireRunLease::for_run(env.clone(), format!("run-{run}"));
            async move {
                runtime.acquire_run_lease(request).await.expect("acquire");
                let report = runtime
                    .release_run_leases(&format!("run-{run}"), LeaseStatus::Released)
                    .await;
                assert_eq!(report.released.len(), 1);
            }
        })
    });
    group.finish();
    rt.block_on(runtime.release_lease(env, &held, LeaseStatus::Released))
        .expect("release held lease");
}

fn plugin(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let root = tempfile::tempdir().expect("temp dir");

    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let in_process = EnvironmentRuntime::builder()
        .provider(Arc::new(fake))
        .build();
    bench_path(
        c,
        &rt,
        "in process",
        &in_process,
        &environment("fake-plugin"),
    );

    let manifest =
        PluginManifest::from_json(plugin_worker::reference_manifest()).expect("manifest");
    let worker = PluginWorker::new(
        PluginWorkerConfig::new(WORKER, manifest)
            .env(ENV_TEMP_ROOT, root.path().to_string_lossy())
            .ready_timeout(Duration::from_secs(20)),
    );
    let provider =
        PluginSandboxProvider::new(worker.clone(), SANDBOX_DRIVER_KEY).expect("provider");
    let out_of_process = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .build();
    bench_path(
        c,
        &rt,
        "plugin worker",
        &out_of_process,
        &environment(SANDBOX_DRIVER_KEY),
    );
    rt.block_on(worker.shutdown());
}

criterion_group!(benches, plugin);
criterion_main!(benches);
