//! Workspace synchronisation through the fake provider (issue #3, spec 00 §13.4).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use paperclip_env::core::workspace::{
    self, EntryKind, Snapshot, SyncErrorKind, SyncOptions, SyncPhase, TransferMethod,
    WorkspaceSync, WorkspaceTransport,
};
use paperclip_env::core::{
    AcquireRequest, AcquireRunLease, CallContext, Capabilities, CommandExit, Environment,
    EnvironmentLease, EnvironmentRuntime, Error, ExecuteRequest, LeaseHandle, LeaseStatus,
    Operation, OutputCollector, ProviderLease, Result, SandboxProvider,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

/// One recorded `execute`: the script, its timeout and whether it had stdin.
#[derive(Debug, Clone)]
struct Call {
    script: String,
    timeout_ms: Option<u64>,
    stdin: bool,
}

/// Wraps the fake to record executes and to switch the stdin capability.
#[derive(Clone)]
struct Spy {
    inner: FakeProvider,
    stdin: bool,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Replace every stdin chunk by zeros of the same length (still valid base64).
    corrupt_stdin: Arc<std::sync::atomic::AtomicBool>,
    /// Offered as the provider's native transport (and `native_sync` declared).
    transport: Option<Arc<dyn WorkspaceTransport>>,
    /// Scripts containing this text report a timeout instead of running.
    time_out_on: Arc<Mutex<Option<String>>>,
}

#[async_trait]
impl SandboxProvider for Spy {
    fn key(&self) -> &str {
        self.inner.key()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            stdin: self.stdin,
            native_sync: self.transport.is_some(),
            ..self.inner.capabilities()
        }
    }
    async fn workspace_transport(
        &self,
        _ctx: &CallContext,
        _lease: &LeaseHandle,
    ) -> Result<Option<Arc<dyn WorkspaceTransport>>> {
        Ok(self.transport.clone())
    }
    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        self.inner.acquire(ctx, request).await
    }
    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> Result<()> {
        self.inner.release(ctx, lease, status).await
    }
    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        assert!(
            self.stdin || request.stdin.is_none(),
            "stdin sent to a provider without stdin"
        );
        self.calls.lock().unwrap().push(Call {
            script: request.args.last().cloned().unwrap_or_default(),
            timeout_ms: request.timeout_ms,
            stdin: request.stdin.is_some(),
        });
        let script = request.args.last().cloned().unwrap_or_default();
        if let Some(needle) = self.time_out_on.lock().unwrap().as_deref()
            && script.contains(needle)
        {
            return Ok(CommandExit {
                timed_out: true,
                ..CommandExit::default()
            });
        }
        if self.corrupt_stdin.load(std::sync::atomic::Ordering::SeqCst)
            && let Some(stdin) = &request.stdin
        {
            let mut garbled = request.clone();
            garbled.stdin = Some("A".repeat(stdin.len()));
            return self.inner.execute(ctx, lease, &garbled, output).await;
        }
        self.inner.execute(ctx, lease, request, output).await
    }
}

struct Harness {
    _root: tempfile::TempDir,
    runtime: EnvironmentRuntime,
    env: Environment,
    lease: EnvironmentLease,
    remote: String,
    spy: Spy,
}

impl Harness {
    async fn new(stdin: bool) -> Harness {
        let root = tempfile::tempdir().unwrap();
        let spy = Spy {
            inner: FakeProvider::builder().temp_root(root.path()).build(),
            stdin,
            calls: Arc::default(),
            corrupt_stdin: Arc::default(),
            transport: None,
            time_out_on: Arc::default(),
        };
        let runtime = EnvironmentRuntime::builder()
            .provider(Arc::new(spy.clone()))
            .build();
        let env = Environment::new(
            "env-1",
            "Sync",
            "sandbox",
            json!({"provider": "fake-plugin"}),
        );
        let lease = runtime
            .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
            .await
            .unwrap()
            .lease;
        let remote = lease.remote_cwd().unwrap().to_owned();
        Harness {
            _root: root,
            runtime,
            env,
            lease,
            remote,
            spy,
        }
    }

    async fn sync(&self) -> WorkspaceSync<'_> {
        WorkspaceSync::for_lease(&self.runtime, &self.env, &self.lease)
            .await
            .unwrap()
    }

    async fn sh(&self, script: &str) {
        let r = self
            .runtime
            .execute(
                &self.env,
                &self.lease,
                &ExecuteRequest::shell(script).cwd(&self.remote),
            )
            .await
            .unwrap();
        assert!(r.success(), "{script}: {}", r.stderr);
    }

    fn calls(&self) -> Vec<Call> {
        self.spy.calls.lock().unwrap().clone()
    }

    async fn release(self) {
        self.runtime
            .release_run_leases("run-1", LeaseStatus::Released)
            .await
            .into_result()
            .unwrap();
    }
}

fn write(root: &Path, rel: &str, data: impl AsRef<[u8]>) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn chmod(root: &Path, rel: &str, mode: u32) {
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}

fn symlink(root: &Path, rel: &str, target: &str) {
    std::os::unix::fs::symlink(target, root.join(rel)).unwrap();
}

/// A tree with the shapes that broke upstream.
fn small_tree(root: &Path) {
    write(root, "src/main.rs", "fn main() {}\n");
    write(root, "src/nested/deep/a/b/c/leaf.txt", "leaf");
    std::fs::create_dir_all(root.join("empty/inner-empty")).unwrap();
    write(root, "bin/run.sh", "#!/bin/sh\necho hi\n");
    chmod(root, "bin/run.sh", 0o755);
    write(root, "readonly.txt", "ro");
    chmod(root, "readonly.txt", 0o444);
    symlink(root, "link-to-file", "src/main.rs");
    symlink(root, "link-to-dir", "src");
    symlink(root, "src/nested/up", "../main.rs");
    symlink(root, "dangling", "does-not-exist");
    write(root, "ünïcødé/日本語.txt", "こんにちは");
    write(root, "emoji 🎉 and 'quotes' $HOME.md", "party");
    write(root, "empty-file", "");
    let long = format!("{}/{}.txt", "d".repeat(120), "n".repeat(140));
    write(root, &long, "long names use GNU records");
}

fn many_files(root: &Path, n: usize) {
    for i in 0..n {
        write(
            root,
            &format!("many/{:02}/f{i}.txt", i % 100),
            format!("file {i}\n"),
        );
    }
}

fn big_file(root: &Path, rel: &str, bytes: usize) {
    // Pseudo-random so nothing downstream can cheat by compressing.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    write(root, rel, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_a_full_tree_is_identical() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    many_files(local.path(), 10_000);
    big_file(local.path(), "big/blob.bin", 100 * 1024 * 1024);
    let options = SyncOptions::default();
    let before = Snapshot::of_dir(local.path()).unwrap();
    assert!(before.file_count() > 10_000);

    let started = Instant::now();
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();
    let upload_time = started.elapsed();
    assert_eq!(up.method, TransferMethod::ExecStdin);
    assert_eq!(up.baseline, before, "the baseline describes what was sent");
    assert_eq!(
        Snapshot::of_dir(Path::new(&h.remote)).unwrap(),
        before,
        "remote tree differs"
    );
    assert!(
        !Path::new(&h.remote)
            .join(".paperclip-runtime/sync/INCOMPLETE")
            .exists()
    );

    let back = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let down = h
        .sync()
        .await
        .download(&h.remote, back.path(), None, &options)
        .await
        .unwrap();
    let download_time = started.elapsed();
    assert_eq!(
        Snapshot::of_dir(back.path()).unwrap(),
        before,
        "downloaded tree differs"
    );
    assert_eq!(down.remote, before);
    assert_eq!(down.changes.added.len(), before.entries.len());
    assert!(down.changes.modified.is_empty() && down.changes.deleted.is_empty());
    assert!(
        !back
            .path()
            .join(".paperclip-runtime/sync-incomplete")
            .exists()
    );
    println!(
        "upload {upload_time:?}, download {download_time:?}, archive {} bytes",
        up.archive_bytes
    );

    // Several MiB per command, every command with the default timeout.
    let calls = h.calls();
    let chunks = calls.iter().filter(|c| c.stdin).count();
    assert!((16..40).contains(&chunks), "{chunks} chunks");
    assert!(calls.iter().all(|c| c.timeout_ms == Some(300_000)));
    h.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_merges_three_way_against_the_baseline() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "keep-local-edit.txt", "base");
    write(local.path(), "delete-me.txt", "base");
    write(local.path(), "remote-edits.txt", "base");
    write(local.path(), "local-only-edit.txt", "base");
    write(local.path(), "gone-dir/x.txt", "base");
    symlink(local.path(), "old-link", "remote-edits.txt");
    let options = SyncOptions::default();
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();

    // Remote: delete two files, a dir and a link, edit one, add some.
    h.sh("rm keep-local-edit.txt delete-me.txt old-link && rm -r gone-dir && printf remote > remote-edits.txt \
          && mkdir -p new/dir && printf new > new/dir/file.txt && chmod 755 new/dir/file.txt && ln -s new new-link")
        .await;
    // Local: edit a file the remote deleted, and one the remote left alone.
    write(local.path(), "keep-local-edit.txt", "local edit");
    write(local.path(), "local-only-edit.txt", "local edit");

    let down = h
        .sync()
        .await
        .download(&h.remote, local.path(), Some(&up.baseline), &options)
        .await
        .unwrap();
    let c = &down.changes;
    assert_eq!(c.added, ["new", "new-link", "new/dir", "new/dir/file.txt"]);
    assert_eq!(c.modified, ["remote-edits.txt"]);
    assert_eq!(
        c.deleted,
        ["delete-me.txt", "gone-dir", "gone-dir/x.txt", "old-link"]
    );
    assert_eq!(c.kept_local, ["keep-local-edit.txt"]);
    let read = |p: &str| std::fs::read_to_string(local.path().join(p)).unwrap();
    assert_eq!(read("keep-local-edit.txt"), "local edit");
    assert_eq!(
        read("local-only-edit.txt"),
        "local edit",
        "remote did not touch it: local wins"
    );
    assert_eq!(read("remote-edits.txt"), "remote");
    assert_eq!(read("new-link/dir/file.txt"), "new");
    let mode = std::fs::metadata(local.path().join("new/dir/file.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(!local.path().join("delete-me.txt").exists());
    assert!(!local.path().join("gone-dir").exists());

    // A second download with the new baseline changes nothing.
    let again = h
        .sync()
        .await
        .download(&h.remote, local.path(), Some(&down.remote), &options)
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    h.release().await;
}

#[tokio::test]
async fn excludes_gitignore_and_dry_run() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), ".gitignore", "target/\n*.tmp\n");
    write(local.path(), "target/debug/huge", "x");
    write(local.path(), "a.tmp", "x");
    write(local.path(), "node_modules/pkg/index.js", "x");
    write(local.path(), "logs/app.log", "x");
    write(local.path(), ".paperclip-runtime/state", "x");
    write(local.path(), "src/._main.rs", "appledouble");
    write(local.path(), "src/main.rs", "fn main() {}");
    write(local.path(), ".env.example", "A=1");
    let options = SyncOptions::default()
        .exclude("node_modules/")
        .exclude("*.log")
        .dry_run(true);
    let plan = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();
    assert!(plan.dry_run);
    assert_eq!(
        plan.paths,
        [".env.example", ".gitignore", "logs", "src", "src/main.rs"]
    );
    assert_eq!((plan.files, plan.dirs, plan.bytes), (3, 2, 12 + 14 + 3));
    assert!(h.calls().is_empty(), "a dry run sends nothing");

    let sent = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options.clone().dry_run(false))
        .await
        .unwrap();
    assert_eq!(sent.paths, plan.paths);
    let remote = Snapshot::of_dir(Path::new(&h.remote)).unwrap();
    assert_eq!(
        remote.entries.keys().collect::<Vec<_>>(),
        plan.paths.iter().collect::<Vec<_>>()
    );
    // Gitignored things produced remotely do not come back either.
    h.sh("mkdir -p target && echo built > target/out && echo x > b.tmp && echo keep > kept.txt")
        .await;
    let down = h
        .sync()
        .await
        .download(&h.remote, local.path(), Some(&sent.baseline), &options)
        .await
        .unwrap();
    assert_eq!(down.changes.added, ["kept.txt"]);
    h.release().await;
}

/// Paperclip 2026.916's heavy directories stay out of both directions by
/// default (a *file* with such a name is kept), a caller pattern re-includes
/// one, and an empty list sends everything.
#[tokio::test]
async fn heavy_directories_are_excluded_by_default_and_overridable() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    for dir in paperclip_env::core::workspace::DEFAULT_HEAVY_DIR_EXCLUDES {
        write(local.path(), &format!("{dir}/x"), "heavy");
        write(local.path(), &format!("pkg/{dir}/y"), "heavy");
    }
    write(local.path(), "src/build", "a file named build is source");
    write(local.path(), "src/main.rs", "fn main() {}");
    let default = SyncOptions::default();
    let sent = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &default)
        .await
        .unwrap();
    assert_eq!(sent.paths, ["pkg", "src", "src/build", "src/main.rs"]);

    // Remotely produced heavy directories do not come back (pruned by find
    // before tar), a regular file named like one does.
    h.sh("mkdir -p node_modules/pkg a/dist && echo x > node_modules/pkg/i.js && echo y > a/dist/o.js && echo z > out2 && echo w > src/out")
        .await;
    let down = h
        .sync()
        .await
        .download(&h.remote, local.path(), Some(&sent.baseline), &default)
        .await
        .unwrap();
    let mut added = down.changes.added.clone();
    added.sort();
    assert_eq!(added, ["a", "out2", "src/out"], "{:?}", down.changes);

    let with_dist = default.clone().exclude("!dist/").dry_run(true);
    let plan = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &with_dist)
        .await
        .unwrap();
    assert!(plan.paths.iter().any(|p| p == "dist/x"), "{:?}", plan.paths);
    assert!(
        plan.paths.iter().any(|p| p == "pkg/dist/y"),
        "{:?}",
        plan.paths
    );
    assert!(!plan.paths.iter().any(|p| p.starts_with("node_modules")));

    let everything = SyncOptions::default()
        .heavy_dir_excludes(Vec::<String>::new())
        .dry_run(true);
    let plan = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &everything)
        .await
        .unwrap();
    assert!(
        plan.paths.iter().any(|p| p == "node_modules/x"),
        "{:?}",
        plan.paths
    );
    assert!(
        plan.paths.iter().any(|p| p == "pkg/.cache/y"),
        "{:?}",
        plan.paths
    );
    h.release().await;
}

/// An empty workspace packs to a valid empty tar (two zero blocks) that
/// system tar and our own extraction read, and uploads as an empty tree.
#[tokio::test]
async fn an_empty_workspace_is_a_valid_empty_archive() {
    let local = tempfile::tempdir().unwrap();
    let mut archive = Vec::new();
    let snapshot =
        paperclip_env::core::workspace::pack(local.path(), &SyncOptions::default(), &mut archive)
            .unwrap();
    assert_eq!(snapshot.file_count(), 0);
    assert_eq!(archive.len(), 1024);
    assert!(archive.iter().all(|b| *b == 0));
    let dest = tempfile::tempdir().unwrap();
    let back =
        paperclip_env::core::workspace::unpack(&archive[..], dest.path(), &SyncOptions::default())
            .unwrap();
    assert!(back.entries.is_empty());
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("empty.tar");
    std::fs::write(&file, &archive).unwrap();
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(listed.stdout.is_empty());

    let h = Harness::new(true).await;
    h.sh("echo stale > old.txt").await;
    let sent = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    assert!(sent.paths.is_empty());
    assert!(
        Snapshot::of_dir(Path::new(&h.remote))
            .unwrap()
            .entries
            .is_empty()
    );
    h.release().await;
}

#[tokio::test]
async fn limits_are_checked_before_anything_is_sent() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    many_files(local.path(), 50);
    write(local.path(), "big.bin", vec![7u8; 10_000]);
    let err = h
        .sync()
        .await
        .upload(
            local.path(),
            &h.remote,
            &SyncOptions::default().max_files(20),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::LimitExceeded,
                ..
            }
        ),
        "{err}"
    );
    let err = h
        .sync()
        .await
        .upload(
            local.path(),
            &h.remote,
            &SyncOptions::default().max_bytes(5_000),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::LimitExceeded,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("limit"), "{err}");
    assert!(h.calls().is_empty());

    // Download: the remote archive size is checked before it is fetched.
    h.sh("head -c 200000 /dev/zero > big").await;
    let err = h
        .sync()
        .await
        .download(
            &h.remote,
            local.path(),
            None,
            &SyncOptions::default().max_bytes(1_000).max_files(10),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::LimitExceeded,
                ..
            }
        ),
        "{err}"
    );
    assert!(h.calls().iter().all(|c| !c.script.contains("dd if=")));
    h.release().await;
}

#[tokio::test]
async fn escaping_symlinks_are_refused_both_ways() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "a.txt", "a");
    symlink(local.path(), "passwd", "/etc/passwd");
    let err = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::SymlinkEscape,
                ..
            }
        ),
        "{err}"
    );
    assert!(h.calls().is_empty());
    std::fs::remove_file(local.path().join("passwd")).unwrap();

    // The remote grows a link out of the workspace: the download is refused
    // and the local tree is untouched.
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    h.sh("echo changed > a.txt && ln -s ../../../../etc/passwd escape")
        .await;
    let before = Snapshot::of_dir(local.path()).unwrap();
    let err = h
        .sync()
        .await
        .download(
            &h.remote,
            local.path(),
            Some(&up.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::SymlinkEscape,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(Snapshot::of_dir(local.path()).unwrap(), before);
    assert!(
        !local
            .path()
            .join(".paperclip-runtime/sync-incomplete")
            .exists()
    );
    let leftovers: Vec<_> = std::fs::read_dir(local.path().join(".paperclip-runtime"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    h.release().await;
}

#[tokio::test]
async fn without_stdin_chunks_travel_as_printf_arguments() {
    let h = Harness::new(false).await;
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    big_file(local.path(), "blob.bin", 200_000);
    let options = SyncOptions::default().timeout_ms(42_000);
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();
    assert_eq!(up.method, TransferMethod::ExecArgs);
    assert_eq!(Snapshot::of_dir(Path::new(&h.remote)).unwrap(), up.baseline);
    let calls = h.calls();
    assert!(
        calls
            .iter()
            .all(|c| !c.stdin && c.timeout_ms == Some(42_000))
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.script.contains("printf '%s'"))
            .count()
            >= 4
    );
    h.release().await;
}

#[tokio::test]
async fn progress_reports_bytes_and_files() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    many_files(local.path(), 600);
    big_file(local.path(), "blob.bin", 3 * 1024 * 1024);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let options = SyncOptions::default()
        .chunk_bytes(1024 * 1024)
        .progress(move |p| sink.lock().unwrap().push(*p));
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let transfer: Vec<_> = seen
        .iter()
        .filter(|p| p.phase == SyncPhase::Transferring)
        .collect();
    assert!(transfer.len() >= 4, "{transfer:?}");
    assert!(
        transfer
            .windows(2)
            .all(|w| w[0].bytes_done < w[1].bytes_done)
    );
    assert_eq!(transfer.last().unwrap().bytes_done, up.archive_bytes);
    let packing = seen
        .iter()
        .rfind(|p| p.phase == SyncPhase::Packing)
        .unwrap();
    assert_eq!((packing.files_done, packing.files_total), (601, 601));
    h.release().await;
}

#[tokio::test]
async fn a_failed_transfer_leaves_the_remote_workspace_unchanged() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "a.txt", "first");
    write(local.path(), "dir/b.txt", "first");
    h.sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    let before = Snapshot::of_dir(Path::new(&h.remote)).unwrap();

    // The archive arrives garbled: the remote tar refuses it in staging and
    // the workspace is not touched.
    write(local.path(), "a.txt", "second");
    std::fs::remove_dir_all(local.path().join("dir")).unwrap();
    h.spy
        .corrupt_stdin
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::RemoteCommand,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upload extract"), "{err}");
    assert_eq!(Snapshot::of_dir(Path::new(&h.remote)).unwrap(), before);
    let sync_dir = Path::new(&h.remote).join(".paperclip-runtime/sync");
    let leftovers: Vec<_> = std::fs::read_dir(&sync_dir).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // A provider error mid-transfer is reported as such, remote unchanged.
    h.spy
        .corrupt_stdin
        .store(false, std::sync::atomic::Ordering::SeqCst);
    h.spy.inner.faults().fail_next(Operation::Execute, || {
        Error::provider("fake-plugin", "injected")
    });
    let err = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(Snapshot::of_dir(Path::new(&h.remote)).unwrap(), before);
    h.release().await;
}

/// A "native" transport: the fake's sandbox is a local directory, so a file copy is one.
struct CopyTransport(Arc<Mutex<u32>>);

#[async_trait]
impl WorkspaceTransport for CopyTransport {
    fn name(&self) -> &str {
        "copy"
    }
    async fn put_file(&self, local: &Path, remote: &str, _timeout_ms: u64) -> Result<()> {
        *self.0.lock().unwrap() += 1;
        std::fs::copy(local, remote)
            .map(|_| ())
            .map_err(|e| Error::provider("copy", e.to_string()))
    }
    async fn get_file(&self, remote: &str, local: &Path, _timeout_ms: u64) -> Result<()> {
        *self.0.lock().unwrap() += 1;
        std::fs::copy(remote, local)
            .map(|_| ())
            .map_err(|e| Error::provider("copy", e.to_string()))
    }
}

#[tokio::test]
async fn native_transport_is_used_when_declared() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    let uses = Arc::new(Mutex::new(0));
    let transport = Arc::new(CopyTransport(uses.clone()));
    let undeclared = h.sync().await.transport(transport.clone());
    assert_eq!(
        undeclared.method(),
        TransferMethod::ExecStdin,
        "native_sync not declared"
    );
    let caps = Capabilities {
        native_sync: true,
        ..h.spy.capabilities()
    };
    let sync = WorkspaceSync::new(&h.runtime, &h.env, &h.lease)
        .capabilities(caps)
        .transport(transport);
    assert_eq!(sync.method(), TransferMethod::Native("copy".into()));
    let up = sync
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(Snapshot::of_dir(Path::new(&h.remote)).unwrap(), up.baseline);
    let back = tempfile::tempdir().unwrap();
    sync.download(&h.remote, back.path(), None, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(Snapshot::of_dir(back.path()).unwrap(), up.baseline);
    assert_eq!(*uses.lock().unwrap(), 2);
    assert!(
        h.calls().iter().all(|c| !c.stdin),
        "no base64 chunks with a native transport"
    );
    h.release().await;
}

// ---- archives --------------------------------------------------------------

fn packed(root: &Path) -> (Vec<u8>, Snapshot) {
    let mut archive = Vec::new();
    let snapshot = workspace::pack(root, &SyncOptions::default(), &mut archive).unwrap();
    (archive, snapshot)
}

#[test]
fn archives_have_no_pax_or_xattr_records_and_are_deterministic() {
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    write(local.path(), "._AppleDouble", "resource fork");
    // Give a file an extended attribute where the filesystem allows it.
    let xattr_set = std::process::Command::new("setfattr")
        .args(["-n", "user.test", "-v", "1"])
        .arg(local.path().join("src/main.rs"))
        .status()
        .is_ok_and(|s| s.success());
    let (archive, snapshot) = packed(local.path());
    assert_eq!(archive, packed(local.path()).0, "same tree, same bytes");
    assert!(!snapshot.entries.contains_key("._AppleDouble"));
    let mut names = Vec::new();
    for block in archive.chunks(512) {
        let typeflag = block[156];
        assert!(
            typeflag != b'x' && typeflag != b'g',
            "PAX header in archive"
        );
    }
    for needle in [
        &b"LIBARCHIVE"[..],
        b"SCHILY",
        b"xattr",
        b"._AppleDouble",
        b"ustar\0",
    ] {
        assert!(
            !archive.windows(needle.len()).any(|w| w == needle),
            "{:?} in archive",
            String::from_utf8_lossy(needle)
        );
    }
    let mut reader = tar::Archive::new(archive.as_slice());
    for entry in reader.entries().unwrap() {
        let mut entry = entry.unwrap();
        assert!(entry.pax_extensions().unwrap().is_none());
        assert_eq!(entry.header().as_gnu().map(|_| ()), Some(()), "GNU header");
        names.push(
            entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_owned(),
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries in sorted order");
    println!("xattr set on a source file: {xattr_set}");
}

#[test]
fn system_gnu_tar_extracts_our_archives() {
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    many_files(local.path(), 300);
    let (archive, snapshot) = packed(local.path());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &archive).unwrap();
    let out = tempfile::tempdir().unwrap();
    let version = std::process::Command::new("tar")
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("GNU tar"));
    let status = std::process::Command::new("tar")
        .arg("-xpf")
        .arg(file.path())
        .arg("-C")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        status.stderr.is_empty(),
        "GNU tar warned: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(Snapshot::of_dir(out.path()).unwrap(), snapshot);
}

#[test]
fn our_extraction_reads_system_tar_archives() {
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    std::fs::hard_link(
        local.path().join("src/main.rs"),
        local.path().join("hardlink.rs"),
    )
    .unwrap();
    let expected = Snapshot::of_dir(local.path()).unwrap();
    let out = std::process::Command::new("tar")
        .args(["--format=posix", "-cf", "-", "-C"])
        .arg(local.path())
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let dest = tempfile::tempdir().unwrap();
    let got =
        workspace::unpack(out.stdout.as_slice(), dest.path(), &SyncOptions::default()).unwrap();
    assert_eq!(got, expected);
    assert_eq!(Snapshot::of_dir(dest.path()).unwrap(), expected);
}

// ---- hostile archives ------------------------------------------------------

/// `(path, type, link target, data)`, written verbatim (no path checks).
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn unpack_err(
    archive: &[u8],
    options: &SyncOptions,
) -> (SyncErrorKind, PathBuf, tempfile::TempDir) {
    let parent = tempfile::tempdir().unwrap();
    let dest = parent.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let err = workspace::unpack(archive, &dest, options).unwrap_err();
    let Error::WorkspaceSync { kind, .. } = err else {
        panic!("untyped error: {err}")
    };
    (kind, dest, parent)
}

#[test]
fn hostile_archives_are_rejected_with_typed_errors() {
    use tar::EntryType::*;
    let o = SyncOptions::default();
    let cases: Vec<(&str, Vec<u8>, SyncErrorKind)> = vec![
        (
            "dot-dot",
            raw_archive(&[(b"../evil.txt", Regular, b"", b"x")]),
            SyncErrorKind::PathTraversal,
        ),
        (
            "nested dot-dot",
            raw_archive(&[(b"a/../../evil.txt", Regular, b"", b"x")]),
            SyncErrorKind::PathTraversal,
        ),
        (
            "absolute",
            raw_archive(&[(b"/tmp/evil.txt", Regular, b"", b"x")]),
            SyncErrorKind::PathTraversal,
        ),
        (
            "absolute symlink",
            raw_archive(&[(b"l", Symlink, b"/etc/passwd", b"")]),
            SyncErrorKind::SymlinkEscape,
        ),
        (
            "climbing symlink",
            raw_archive(&[(b"d/l", Symlink, b"../../x", b"")]),
            SyncErrorKind::SymlinkEscape,
        ),
        (
            "symlink chain",
            raw_archive(&[(b"a", Symlink, b".", b""), (b"b", Symlink, b"a/..", b"")]),
            SyncErrorKind::SymlinkEscape,
        ),
        (
            "write through symlink",
            // Symlinks are created last, so `l/x` lands in a real directory `l`
            // and the link then collides with it.
            raw_archive(&[
                (b"l", Symlink, b"d", b""),
                (b"d/", Directory, b"", b""),
                (b"l/x", Regular, b"", b"x"),
            ]),
            SyncErrorKind::Conflict,
        ),
        (
            "char device",
            raw_archive(&[(b"tty", Char, b"", b"")]),
            SyncErrorKind::UnsupportedEntry,
        ),
        (
            "block device",
            raw_archive(&[(b"sda", Block, b"", b"")]),
            SyncErrorKind::UnsupportedEntry,
        ),
        (
            "fifo",
            raw_archive(&[(b"pipe", Fifo, b"", b"")]),
            SyncErrorKind::UnsupportedEntry,
        ),
        (
            "hard link out",
            raw_archive(&[(b"h", Link, b"../etc/passwd", b"")]),
            SyncErrorKind::PathTraversal,
        ),
        (
            "non-utf8 name",
            raw_archive(&[(b"\xff\xfe", Regular, b"", b"x")]),
            SyncErrorKind::InvalidName,
        ),
    ];
    for (name, archive, want) in cases {
        let (kind, dest, parent) = unpack_err(&archive, &o);
        assert_eq!(kind, want, "{name}");
        assert!(
            !parent.path().join("evil.txt").exists() && !Path::new("/tmp/evil.txt").exists(),
            "{name}"
        );
        drop(dest);
    }
    // Truncated archive.
    let mut archive = raw_archive(&[(b"f", Regular, b"", &[1u8; 4096])]);
    archive.truncate(1024);
    assert_eq!(unpack_err(&archive, &o).0, SyncErrorKind::CorruptArchive);
}

#[test]
fn oversize_archives_are_rejected() {
    let data = vec![0u8; 64 * 1024];
    let archive = raw_archive(&[
        (b"a", tar::EntryType::Regular, b"", &data),
        (b"b", tar::EntryType::Regular, b"", &data),
    ]);
    let (kind, _, _) = unpack_err(&archive, &SyncOptions::default().max_bytes(100_000));
    assert_eq!(kind, SyncErrorKind::LimitExceeded);
    let (kind, _, _) = unpack_err(&archive, &SyncOptions::default().max_files(1));
    assert_eq!(kind, SyncErrorKind::LimitExceeded);
}

#[test]
fn modes_survive_pack_and_unpack() {
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    let (archive, snapshot) = packed(local.path());
    let dest = tempfile::tempdir().unwrap();
    let got = workspace::unpack(archive.as_slice(), dest.path(), &SyncOptions::default()).unwrap();
    assert_eq!(got, snapshot);
    let Some(EntryKind::File { mode, .. }) = got.entries.get("bin/run.sh") else {
        panic!()
    };
    assert_eq!(*mode, 0o755);
}

#[tokio::test]
async fn download_never_writes_through_a_local_symlink_and_marks_a_partial_merge() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    write(local.path(), "a/f.txt", "base");
    write(local.path(), "b.txt", "base");
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    h.sh("printf remote > a/f.txt && printf remote > b.txt")
        .await;
    // Locally, `a` became a symlink to a directory outside the workspace.
    std::fs::remove_dir_all(local.path().join("a")).unwrap();
    symlink(local.path(), "a", outside.path().to_str().unwrap());
    let err = h
        .sync()
        .await
        .download(
            &h.remote,
            local.path(),
            Some(&up.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::SymlinkEscape,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("partially updated"), "{err}");
    assert!(
        !outside.path().join("f.txt").exists(),
        "wrote through the symlink"
    );
    assert!(
        local
            .path()
            .join(".paperclip-runtime/sync-incomplete")
            .exists()
    );
    h.release().await;
}

#[tokio::test]
async fn a_held_merge_lock_refuses_a_second_download() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "a.txt", "a");
    h.sync()
        .await
        .upload(local.path(), &h.remote, &SyncOptions::default())
        .await
        .unwrap();
    write(local.path(), ".paperclip-runtime/sync.lock", "pid 1");
    let err = h
        .sync()
        .await
        .download(&h.remote, local.path(), None, &SyncOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WorkspaceSync {
                kind: SyncErrorKind::Conflict,
                ..
            }
        ),
        "{err}"
    );
    std::fs::remove_file(local.path().join(".paperclip-runtime/sync.lock")).unwrap();
    h.sync()
        .await
        .download(&h.remote, local.path(), None, &SyncOptions::default())
        .await
        .unwrap();
    assert!(!local.path().join(".paperclip-runtime/sync.lock").exists());
    h.release().await;
}

#[tokio::test]
async fn the_provider_chooses_the_transfer_path() {
    let h = Harness::new(true).await;
    assert_eq!(h.sync().await.method(), TransferMethod::ExecStdin);
    let h = Harness::new(false).await;
    assert_eq!(h.sync().await.method(), TransferMethod::ExecArgs);

    // A provider offering a transport (and declaring native_sync) gets it.
    let root = tempfile::tempdir().unwrap();
    let uses = Arc::new(Mutex::new(0));
    let spy = Spy {
        inner: FakeProvider::builder().temp_root(root.path()).build(),
        stdin: true,
        calls: Arc::default(),
        corrupt_stdin: Arc::default(),
        transport: Some(Arc::new(CopyTransport(uses.clone()))),
        time_out_on: Arc::default(),
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(spy))
        .build();
    let env = Environment::new(
        "env-2",
        "Native",
        "sandbox",
        json!({"provider": "fake-plugin"}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    let sync = WorkspaceSync::for_lease(&runtime, &env, &lease)
        .await
        .unwrap();
    assert_eq!(sync.method(), TransferMethod::Native("copy".into()));
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "a.txt", "a");
    let remote = lease.remote_cwd().unwrap().to_owned();
    sync.upload(local.path(), &remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(*uses.lock().unwrap(), 1);
    assert_eq!(
        std::fs::read_to_string(Path::new(&remote).join("a.txt")).unwrap(),
        "a"
    );
    runtime
        .release_run_leases("run-2", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();

    // Drivers that say nothing (local) leave the default.
    let runtime = EnvironmentRuntime::builder().build();
    let env = Environment::new("env-3", "Local", "local", json!({}));
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-3"))
        .await
        .unwrap()
        .lease;
    let sync = WorkspaceSync::for_lease(&runtime, &env, &lease)
        .await
        .unwrap();
    assert_eq!(sync.method(), TransferMethod::ExecStdin);
}

#[tokio::test]
async fn preserved_names_stay_remote_only() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "src/a.txt", "a");
    write(local.path(), "node_modules/local-copy.js", "local");
    h.sh("mkdir -p node_modules && echo remote > node_modules/installed.js && echo stale > stale.txt")
        .await;
    let options = SyncOptions::default().preserve("node_modules");
    let up = h
        .sync()
        .await
        .upload(local.path(), &h.remote, &options)
        .await
        .unwrap();
    assert_eq!(up.paths, ["src", "src/a.txt"]);
    let remote = Path::new(&h.remote);
    assert!(
        remote.join("node_modules/installed.js").exists(),
        "preserved"
    );
    assert!(
        !remote.join("node_modules/local-copy.js").exists(),
        "not sent"
    );
    assert!(
        !remote.join("stale.txt").exists(),
        "everything else mirrors the upload"
    );
    let down = h
        .sync()
        .await
        .download(&h.remote, local.path(), Some(&up.baseline), &options)
        .await
        .unwrap();
    assert!(down.changes.is_empty(), "{:?}", down.changes);
    assert!(!local.path().join("node_modules/installed.js").exists());
    let err = h
        .sync()
        .await
        .upload(
            local.path(),
            &h.remote,
            &SyncOptions::default().preserve("a/b"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    h.release().await;
}

#[tokio::test]
async fn a_timed_out_transfer_command_is_a_typed_timeout() {
    let h = Harness::new(true).await;
    let local = tempfile::tempdir().unwrap();
    write(local.path(), "a.txt", "a");
    *h.spy.time_out_on.lock().unwrap() = Some("cat >>".into());
    let err = h
        .sync()
        .await
        .upload(
            local.path(),
            &h.remote,
            &SyncOptions::default().timeout_ms(1_234),
        )
        .await
        .unwrap_err();
    let Error::Timeout { operation, after } = &err else {
        panic!("not a timeout: {err}")
    };
    assert_eq!(operation, "workspace sync: upload chunk");
    assert_eq!(after.as_millis(), 1_234);
    assert!(!Path::new(&h.remote).join("a.txt").exists());
    h.release().await;
}

#[test]
fn snapshots_persist_as_json() {
    let local = tempfile::tempdir().unwrap();
    small_tree(local.path());
    let snapshot = Snapshot::of_dir(local.path()).unwrap();
    let text = serde_json::to_string(&snapshot).unwrap();
    assert!(text.contains("\"type\":\"symlink\""), "{text}");
    let back: Snapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, snapshot);
}
