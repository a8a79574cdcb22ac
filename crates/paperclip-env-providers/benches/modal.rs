//! Modal provider overhead against the gRPC emulator on loopback: one
//! execute of `true` (SandboxWait + TaskExecStart + two stdio streams +
//! stdin close + TaskExecWait), and 1 MiB of stdout through the router.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env_core::{
    AcquireRequest, CallContext, ExecuteRequest, LeaseHandle, OutputCollector, ProviderConfig,
    SandboxProvider,
};
use paperclip_env_providers::modal::ModalProvider;
use paperclip_env_testkit::emulators::modal::ModalEmulator;
use secrecy::SecretString;
use serde_json::json;

const TOKEN_ID: &str = "ak-bench";
const TOKEN_SECRET: &str = "as-bench";

fn modal(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let emulator = Arc::new(
        rt.block_on(ModalEmulator::start(TOKEN_ID, TOKEN_SECRET))
            .expect("emulator"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let provider = ModalProvider::builder()
        .server_url(emulator.url())
        .task_id_poll(Duration::from_millis(10))
        .build()
        .expect("provider");
    let ctx = CallContext {
        company_id: None,
        environment_id: "bench".into(),
        issue_id: None,
        config: ProviderConfig::new(
            json!({"appName": "bench", "image": "node:20", "workdir": dir.path().join("ws")})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
        .with_secret("tokenId", SecretString::from(TOKEN_ID))
        .with_secret("tokenSecret", SecretString::from(TOKEN_SECRET)),
    };
    let lease = rt
        .block_on(provider.acquire(
            &ctx,
            &AcquireRequest {
                run_id: "bench".into(),
                workspace_mode: None,
                ..Default::default()
            },
        ))
        .expect("acquire");
    let lease = LeaseHandle {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
        expires_at: None,
    };

    let mut group = c.benchmark_group("modal");
    group.sample_size(20);
    group.bench_function("execute_true", |b| {
        b.to_async(&rt).iter(|| async {
            let output = OutputCollector::buffered();
            provider
                .execute(&ctx, &lease, &ExecuteRequest::new("true"), &output)
                .await
                .expect("execute")
        })
    });
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("stdout_1mib", |b| {
        b.to_async(&rt).iter(|| async {
            let output = OutputCollector::buffered();
            provider
                .execute(
                    &ctx,
                    &lease,
                    &ExecuteRequest::shell("head -c 1048576 /dev/zero"),
                    &output,
                )
                .await
                .expect("execute")
        })
    });
    group.finish();
    rt.block_on(provider.destroy(&ctx, &lease))
        .expect("destroy");
}

criterion_group!(benches, modal);
criterion_main!(benches);
