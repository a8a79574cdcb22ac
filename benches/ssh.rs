//! SSH: exec round-trip latency and 1 GiB stdout throughput through the SSH
//! driver (russh) against a throwaway OpenSSH sshd on 127.0.0.1, next to the
//! OpenSSH `ssh` client doing the same against the same server.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, OutputCapture, OutputSink,
    OutputStream,
};
use paperclip_env_providers::ssh::SshDriver;
use paperclip_env_testkit::fixtures::sshd::{self, SshServer};
use serde_json::json;

const BYTES: u64 = 1 << 30;

fn ssh_cli(srv: &SshServer, known_hosts: &std::path::Path, command: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(&srv.client_key().private_key_path)
        .arg("-p")
        .arg(srv.port().to_string())
        .arg(format!("{}@127.0.0.1", srv.user()))
        .arg(command);
    cmd
}

fn ssh(c: &mut Criterion) {
    if !sshd::available() {
        eprintln!("skipping: sshd not installed (run scripts/setup.sh)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let srv = SshServer::start().expect("sshd");
    let known_hosts = srv.dir().join("bench_known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", srv.known_hosts())).expect("known hosts");
    let runtime = EnvironmentRuntime::builder()
        .driver(Arc::new(SshDriver::new()))
        .build();
    let env = Environment::new(
        "bench-ssh",
        "ssh",
        "ssh",
        json!({
            "host": srv.host(), "port": srv.port(), "username": srv.user(),
            "remoteWorkspacePath": srv.dir().join("ws").display().to_string(),
            "privateKey": srv.client_key().private_key, "knownHosts": srv.known_hosts(), "strictHostKeyChecking": true,
        }),
    );
    let lease = rt
        .block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "bench")))
        .expect("acquire")
        .lease;

    let mut latency = c.benchmark_group("ssh_exec_true");
    latency
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    latency.bench_function(
        "baseline: OpenSSH ssh client (new connection each time)",
        |b| {
            b.iter(|| {
                assert!(
                    ssh_cli(&srv, &known_hosts, "true")
                        .status()
                        .expect("ssh")
                        .success()
                )
            })
        },
    );
    latency.bench_function(
        "driver: execute `true` (connection reused by the lease)",
        |b| {
            b.to_async(&rt).iter(|| async {
                let r = runtime
                    .execute(&env, &lease, &ExecuteRequest::new("true"))
                    .await
                    .expect("execute");
                assert_eq!(r.exit_code, Some(0));
            })
        },
    );
    latency.bench_function(
        "driver: execute `true` with one env var (connection reused by the lease)",
        |b| {
            b.to_async(&rt).iter(|| async {
                let r = runtime
                    .execute(&env, &lease, &ExecuteRequest::new("true").env("BENCH", "1"))
                    .await
                    .expect("execute");
                assert_eq!(r.exit_code, Some(0));
            })
        },
    );
    latency.finish();

    let mut throughput = c.benchmark_group("ssh_1GiB_stdout");
    throughput
        .sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Bytes(BYTES));
    let produce = format!("head -c {BYTES} /dev/zero");
    throughput.bench_function("baseline: OpenSSH ssh client, stdout to /dev/null", |b| {
        b.iter(|| {
            let status = ssh_cli(&srv, &known_hosts, &produce)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("ssh");
            assert!(status.success());
        })
    });
    throughput.bench_function("driver: execute_streaming, nothing buffered", |b| {
        b.to_async(&rt).iter(|| async {
            let sink: Arc<dyn OutputSink> = Arc::new(|_: OutputStream, _: &[u8]| {});
            let request = ExecuteRequest::new("head")
                .args(["-c", &BYTES.to_string(), "/dev/zero"])
                .capture(OutputCapture::Discard);
            let r = runtime
                .execute_streaming(&env, &lease, &request, sink)
                .await
                .expect("execute");
            assert_eq!(r.exit_code, Some(0));
        })
    });
    throughput.finish();
}

criterion_group!(benches, ssh);
criterion_main!(benches);
