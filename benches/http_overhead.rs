//! HTTP provider overhead: one execute of `true` through the E2B provider
//! against its emulator on loopback, next to bare reqwest calls of the same
//! shape (connect, set-timeout, Process/Start stream read to the end).

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use paperclip_env::core::{
    AcquireRequest, CallContext, ExecuteRequest, LeaseHandle, OutputCollector, ProviderConfig,
    SandboxProvider,
};
use paperclip_env_providers::e2b::E2bProvider;
use paperclip_env_testkit::emulators::e2b::{E2bEmulator, Profile};
use secrecy::SecretString;
use serde_json::json;

const KEY: &str = "e2b_bench";

fn envelope(payload: &serde_json::Value) -> Vec<u8> {
    let bytes = payload.to_string().into_bytes();
    let mut out = vec![0u8];
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let emulator = Arc::new(
        rt.block_on(E2bEmulator::start(Profile::E2b, KEY))
            .expect("emulator"),
    );
    let provider = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .build()
        .expect("provider");
    let ctx = CallContext {
        company_id: None,
        environment_id: "bench".into(),
        issue_id: None,
        config: ProviderConfig::new(
            json!({"timeoutMs": 600000})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
        .with_secret("apiKey", SecretString::from(KEY)),
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
    let handle = LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: None,
    };
    let id = lease.provider_lease_id.clone().unwrap_or_default();
    let token = emulator
        .requests()
        .iter()
        .rev()
        .find_map(|r| r.header("x-access-token").map(str::to_owned))
        .unwrap_or_default();
    let client = reqwest::Client::new();
    let base = emulator.url();
    let mut group = c.benchmark_group("e2b_execute_true");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("baseline: bare reqwest, same three calls", |b| {
        b.to_async(&rt).iter(|| {
            let (client, base, id, token) = (client.clone(), base.clone(), id.clone(), token.clone());
            async move {
                client.post(format!("{base}/sandboxes/{id}/connect")).header("X-API-Key", KEY).json(&json!({"timeout": 600})).send().await.expect("connect");
                client.post(format!("{base}/sandboxes/{id}/timeout")).header("X-API-Key", KEY).json(&json!({"timeout": 600})).send().await.expect("timeout");
                let body = envelope(&json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "exec 'true'"], "envs": {}}, "stdin": false}));
                let response = client
                    .post(format!("{base}/process.Process/Start"))
                    .header("E2b-Sandbox-Id", &id)
                    .header("X-Access-Token", &token)
                    .header("Content-Type", "application/connect+json")
                    .body(body)
                    .send()
                    .await
                    .expect("start");
                response.bytes().await.expect("stream");
            }
        })
    });
    group.bench_function("provider: E2bProvider::execute", |b| {
        b.to_async(&rt).iter(|| {
            let (provider, ctx, handle) = (provider.clone(), ctx.clone(), handle.clone());
            async move {
                let output = OutputCollector::buffered();
                let exit = provider
                    .execute(&ctx, &handle, &ExecuteRequest::new("true"), &output)
                    .await
                    .expect("execute");
                assert_eq!(exit.exit_code, Some(0));
            }
        })
    });
    group.finish();
    rt.block_on(provider.destroy(&ctx, &handle))
        .expect("destroy");
}

criterion_group!(benches, overhead);
criterion_main!(benches);
