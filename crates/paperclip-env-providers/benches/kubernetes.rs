//! Kubernetes provider overhead against the API emulator on loopback
//! (sandbox-cr backend): one execute of `true` (readiness check + exec
//! WebSocket + status channel), 1 MiB of stdout through the exec channel
//! protocol, and a whole acquire → destroy (tenant already provisioned:
//! workload, env Secret, readiness, then Foreground delete).

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env_core::{
    AcquireRequest, CallContext, ExecuteRequest, LeaseHandle, OutputCollector, ProviderConfig,
    ProviderLease, SandboxProvider,
};
use paperclip_env_providers::kubernetes::{Backend, KubernetesProvider};
use paperclip_env_testkit::emulators::kubernetes::{KubeEmulator, KubeEmulatorOptions};
use secrecy::SecretString;
use serde_json::json;

fn handle(lease: ProviderLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
        expires_at: lease.expires_at,
    }
}

fn request(run: &str) -> AcquireRequest {
    AcquireRequest {
        run_id: run.into(),
        workspace_mode: None,
        ..Default::default()
    }
}

fn kubernetes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Path rewriting instead of per-process namespaces: the figures measure
    // the provider and the wire, not the emulator's `unshare` + mounts.
    let emulator = Arc::new(
        rt.block_on(KubeEmulator::start_with(KubeEmulatorOptions {
            isolate_pods: false,
            ..KubeEmulatorOptions::default()
        }))
        .expect("emulator"),
    );
    let provider = KubernetesProvider::builder()
        .backend(Backend::SandboxCr)
        .poll_interval(Duration::from_millis(10))
        .build();
    let ctx = CallContext {
        company_id: Some("bench".into()),
        environment_id: "bench".into(),
        issue_id: None,
        config: ProviderConfig::new(json!({}).as_object().cloned().unwrap_or_default())
            .with_secret("kubeconfig", SecretString::from(emulator.kubeconfig_yaml())),
    };
    let lease = handle(
        rt.block_on(provider.acquire(&ctx, &request("bench-held")))
            .expect("acquire"),
    );

    let mut group = c.benchmark_group("kubernetes");
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
    group.throughput(Throughput::Elements(1));
    let mut run = 0u64;
    group.bench_function("acquire_destroy", |b| {
        b.to_async(&rt).iter(|| {
            run += 1;
            let acquire = request(&format!("bench-{run}"));
            let (provider, ctx) = (&provider, &ctx);
            async move {
                let lease = handle(provider.acquire(ctx, &acquire).await.expect("acquire"));
                provider.destroy(ctx, &lease).await.expect("destroy");
            }
        })
    });
    group.finish();
    rt.block_on(provider.destroy(&ctx, &lease))
        .expect("destroy");
}

criterion_group!(benches, kubernetes);
criterion_main!(benches);
