//! Workspace sync throughput: upload and download of a 10 000-file tree
//! through the runtime and the fake provider, next to `tar -c | tar -x`
//! between two local directories (the baseline: no SDK, no base64, no
//! per-command process). Criterion reports each in files/s; before the
//! Criterion runs, the bench prints the ratios `upload / baseline` and
//! `download / baseline` from a few timed rounds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use paperclip_env::core::workspace::{SyncOptions, WorkspaceSync};
use paperclip_env::core::{AcquireRunLease, Environment, EnvironmentLease, EnvironmentRuntime};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

const FILES: usize = 10_000;

struct Setup {
    _root: tempfile::TempDir,
    source: PathBuf,
    scratch: PathBuf,
    runtime: EnvironmentRuntime,
    env: Environment,
    lease: EnvironmentLease,
    remote: String,
}

fn setup(rt: &tokio::runtime::Runtime) -> Setup {
    let root = tempfile::tempdir().expect("temp dir");
    let source = root.path().join("source");
    for i in 0..FILES {
        let path = source.join(format!("d{:02}/s{:02}/f{i}.txt", i % 50, i % 7));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, format!("small file number {i}\n").repeat(1 + i % 20))
            .expect("write");
    }
    let scratch = root.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    let fake = FakeProvider::builder()
        .temp_root(root.path().join("fake"))
        .build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake))
        .build();
    let env = Environment::new(
        "bench-env",
        "Bench",
        "sandbox",
        json!({"provider": "fake-plugin"}),
    );
    let lease = rt
        .block_on(runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "bench-run")))
        .expect("acquire")
        .lease;
    let remote = lease.remote_cwd().expect("remoteCwd").to_owned();
    Setup {
        _root: root,
        source,
        scratch,
        runtime,
        env,
        lease,
        remote,
    }
}

fn tar_pipe(source: &Path, dest: &Path) {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).expect("mkdir");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("tar -cf - -C \"$1\" . | tar -xf - -C \"$2\"")
        .arg("sh")
        .arg(source)
        .arg(dest)
        .status()
        .expect("tar");
    assert!(status.success());
}

async fn upload(s: &Setup) {
    WorkspaceSync::new(&s.runtime, &s.env, &s.lease)
        .upload(&s.source, &s.remote, &SyncOptions::default())
        .await
        .expect("upload");
}

async fn download(s: &Setup, dest: &Path) {
    let _ = std::fs::remove_dir_all(dest);
    WorkspaceSync::new(&s.runtime, &s.env, &s.lease)
        .download(&s.remote, dest, None, &SyncOptions::default())
        .await
        .expect("download");
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn workspace_sync(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = setup(&rt);
    let down_dest = s.scratch.join("download");
    let tar_dest = s.scratch.join("tar");

    let rounds = 3;
    let time = |f: &mut dyn FnMut()| {
        median(
            (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect(),
        )
    };
    let baseline = time(&mut || tar_pipe(&s.source, &tar_dest));
    let up = time(&mut || rt.block_on(upload(&s)));
    let down = time(&mut || rt.block_on(download(&s, &down_dest)));
    let rate = |d: Duration| FILES as f64 / d.as_secs_f64();
    println!(
        "workspace_sync ({FILES} files): tar|tar {baseline:?} ({:.0} files/s); upload {up:?} ({:.0} files/s, {:.2}x baseline); download {down:?} ({:.0} files/s, {:.2}x baseline)",
        rate(baseline),
        rate(up),
        up.as_secs_f64() / baseline.as_secs_f64(),
        rate(down),
        down.as_secs_f64() / baseline.as_secs_f64(),
    );

    let mut group = c.benchmark_group("workspace_sync");
    group.sample_size(10);
    group.throughput(Throughput::Elements(FILES as u64));
    group.bench_function("baseline: tar -c | tar -x (10k files)", |b| {
        b.iter(|| tar_pipe(&s.source, &tar_dest))
    });
    group.bench_function("upload through the fake (10k files)", |b| {
        b.to_async(&rt).iter(|| upload(&s))
    });
    group.bench_function("download through the fake (10k files)", |b| {
        b.to_async(&rt).iter(|| download(&s, &down_dest))
    });
    group.finish();
}

criterion_group!(benches, workspace_sync);
criterion_main!(benches);
