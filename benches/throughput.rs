//! Execute output throughput: a command writing 1 GiB to stdout through the
//! runtime and the fake provider with streaming on (a sink counting bytes,
//! nothing buffered), next to the same command run directly (a) with stdout
//! to /dev/null and (b) with stdout piped and drained by a bare reader.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, OutputCapture, OutputSink,
    OutputStream,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;
use tokio::io::AsyncReadExt;

const BYTES: u64 = 1 << 30;

fn command() -> (&'static str, Vec<String>) {
    (
        "head",
        vec!["-c".into(), BYTES.to_string(), "/dev/zero".into()],
    )
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
        json!({"provider": "fake-plugin", "timeoutMs": 600000}),
    );
    let lease = rt
        .block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "bench-run")))
        .expect("acquire")
        .lease;
    let mut group = c.benchmark_group("execute_1GiB_stdout");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(BYTES));
    group.bench_function("baseline: direct, stdout to /dev/null", |b| {
        b.to_async(&rt).iter(|| async {
            let (cmd, args) = command();
            let status = tokio::process::Command::new(cmd)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .await
                .expect("spawn");
            assert!(status.success());
        })
    });
    group.bench_function("baseline: direct, stdout piped and drained", |b| {
        b.to_async(&rt).iter(|| async {
            let (cmd, args) = command();
            let mut child = tokio::process::Command::new(cmd)
                .args(args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn");
            let mut stdout = child.stdout.take().expect("pipe");
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = stdout.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            assert_eq!(total, BYTES);
            child.wait().await.expect("wait");
        })
    });
    group.bench_function(
        "runtime: execute_streaming, sink counts, nothing buffered",
        |b| {
            b.to_async(&rt).iter(|| {
                let (runtime, env, lease) = (runtime.clone(), env.clone(), lease.clone());
                async move {
                    let counted = Arc::new(AtomicU64::new(0));
                    let counter = counted.clone();
                    let sink: Arc<dyn OutputSink> = Arc::new(move |_: OutputStream, d: &[u8]| {
                        counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    });
                    let (cmd, args) = command();
                    let request = ExecuteRequest::new(cmd)
                        .args(args)
                        .capture(OutputCapture::Discard);
                    let result = runtime
                        .execute_streaming(&env, &lease, &request, sink)
                        .await
                        .expect("execute");
                    assert!(result.success());
                    assert_eq!(counted.load(Ordering::Relaxed), BYTES);
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
