//! The runtime's view of any environment: lines that go through
//! [`EnvironmentRuntime`] only, so they apply to every driver (`local`,
//! `ssh`, `sandbox` with any provider, `plugin`) and to real accounts.
//!
//! Part A ([`super::LINES`]) checks a [`SandboxProvider`] directly; these
//! `R` lines check what a caller of the runtime sees: probe, lease rows,
//! realize, execute (the Part A execute lines, through the driver), live
//! streaming, a workspace round trip, no secret in lease rows, and release
//! by run. Each line names the spec line it covers in its title.
//!
//! Every line acquires under a run of its own (`<run_prefix>-<id>`) and
//! releases that run before it returns; [`super::live`] releases whatever an
//! interrupted line left.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use paperclip_env_core::{Environment, EnvironmentRuntime};
//! use paperclip_env_testkit::conformance::environment::{ENV_LINES, EnvFixture};
//! use paperclip_env_testkit::fake::FakeProvider;
//!
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(FakeProvider::new())).build();
//! let env = Environment::new("env-1", "Fake", "sandbox", serde_json::json!({"provider": "fake-plugin"}));
//! let fixture = EnvFixture::new(runtime, env);
//! let r4 = ENV_LINES.iter().find(|l| l.id == "R4").unwrap();
//! assert_eq!((r4.check)(&fixture).await, Ok(()));
//! # });
//! ```
//!
//! [`SandboxProvider`]: paperclip_env_core::SandboxProvider

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paperclip_env_core::workspace::{SyncOptions, WorkspaceSync};
use paperclip_env_core::{
    AcquireRunLease, Environment, EnvironmentLease, EnvironmentRuntime, Error, ExecuteRequest,
    ExecuteResult, LeaseStatus, OutputStream, WorkspaceSpec,
};

use super::{CheckResult, Fail, Level, ensure, failed};

type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckResult> + Send + 'a>>;

/// An environment and the runtime that serves it.
#[derive(Clone)]
pub struct EnvFixture {
    /// The runtime, with the environment's driver (and provider) registered.
    pub runtime: EnvironmentRuntime,
    /// The environment under test.
    pub environment: Environment,
    /// Prefix of the run ids the lines acquire under.
    pub run_prefix: String,
    /// Secret values that must never appear in lease rows (D3).
    pub secret_values: Vec<String>,
    /// Upper bound for any single runtime call made by a line.
    pub call_timeout: Duration,
}

impl std::fmt::Debug for EnvFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvFixture")
            .field("environment", &self.environment.id)
            .field("driver", &self.environment.driver)
            .field("run_prefix", &self.run_prefix)
            .finish_non_exhaustive()
    }
}

impl EnvFixture {
    /// A fixture for `environment` served by `runtime`, with a random run prefix.
    pub fn new(runtime: EnvironmentRuntime, environment: Environment) -> Self {
        EnvFixture {
            runtime,
            environment,
            run_prefix: format!("conformance-{}", uuid::Uuid::new_v4().simple()),
            secret_values: Vec::new(),
            call_timeout: Duration::from_secs(120),
        }
    }

    /// Adds a secret value that must not reach lease rows.
    pub fn secret_value(mut self, value: impl Into<String>) -> Self {
        self.secret_values.push(value.into());
        self
    }

    /// Sets the per-call upper bound.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The run id line `id` acquires under.
    pub fn run_id(&self, id: &str) -> String {
        format!("{}-{}", self.run_prefix, id.to_ascii_lowercase())
    }

    async fn timed<T>(
        &self,
        what: &str,
        future: impl Future<Output = paperclip_env_core::Result<T>>,
    ) -> Result<T, Fail> {
        match tokio::time::timeout(self.call_timeout, future).await {
            Ok(result) => result.map_err(failed(what)),
            Err(_) => Err(Fail::Failed(format!(
                "{what} did not return within {:?}",
                self.call_timeout
            ))),
        }
    }

    async fn acquire(&self, run: &str) -> Result<EnvironmentLease, Fail> {
        let input = AcquireRunLease::for_run(self.environment.clone(), run);
        Ok(self
            .timed("acquire", self.runtime.acquire_run_lease(input))
            .await?
            .lease)
    }

    async fn release_run(&self, run: &str) -> CheckResult {
        let report = tokio::time::timeout(
            self.call_timeout,
            self.runtime.release_run_leases(run, LeaseStatus::Released),
        )
        .await
        .map_err(|_| {
            Fail::Failed(format!(
                "release did not return within {:?}",
                self.call_timeout
            ))
        })?;
        report.into_result().map(drop).map_err(failed("release"))
    }

    async fn exec(
        &self,
        lease: &EnvironmentLease,
        request: ExecuteRequest,
    ) -> Result<ExecuteResult, Fail> {
        let what = format!("execute {}", request.command_line());
        match tokio::time::timeout(
            self.call_timeout,
            self.runtime.execute(&self.environment, lease, &request),
        )
        .await
        {
            Err(_) => Err(Fail::Failed(format!(
                "{what} did not return within {:?}",
                self.call_timeout
            ))),
            Ok(Err(e)) if is_unsupported(&e) => {
                Err(Fail::Skipped(format!("execute not supported: {e}")))
            }
            Ok(result) => result.map_err(failed(&what)),
        }
    }

    /// Acquires under line `id`'s run, runs `body`, and always releases the run.
    async fn with_lease<'a, F, Fut>(&'a self, id: &str, body: F) -> CheckResult
    where
        F: FnOnce(EnvironmentLease) -> Fut,
        Fut: Future<Output = CheckResult> + 'a,
    {
        let run = self.run_id(id);
        let lease = self.acquire(&run).await?;
        let result = body(lease).await;
        let released = self.release_run(&run).await;
        result.and(released)
    }

    /// The directory commands run in: the lease's `remoteCwd`, else the
    /// realized workspace, else `/tmp`.
    async fn base_dir(&self, lease: &EnvironmentLease) -> String {
        if let Some(cwd) = lease.remote_cwd() {
            return cwd.to_owned();
        }
        match tokio::time::timeout(
            self.call_timeout,
            self.runtime
                .realize_workspace(&self.environment, lease, &WorkspaceSpec::default()),
        )
        .await
        {
            Ok(Ok(realized)) if realized.cwd.starts_with('/') => realized.cwd,
            _ => "/tmp".to_owned(),
        }
    }
}

/// One runtime-level line.
pub struct EnvLine {
    /// Line id (`R1`, `R2`, …).
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// What it checks, with the spec line it covers.
    pub title: &'static str,
    /// The check.
    pub check: for<'a> fn(&'a EnvFixture) -> CheckFuture<'a>,
}

impl std::fmt::Debug for EnvLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvLine")
            .field("id", &self.id)
            .field("title", &self.title)
            .finish()
    }
}

macro_rules! env_lines {
    ($( $id:literal $level:ident $check:ident $title:literal ),+ $(,)?) => {
        /// Every runtime-level line, in order.
        pub const ENV_LINES: &[EnvLine] = &[
            $( EnvLine { id: $id, level: Level::$level, title: $title, check: |f| Box::pin($check(f)) } ),+
        ];
    };
}

env_lines! {
    "R1" Must r1_probe_ok "probe through the runtime answers ok (B5.6)",
    "R2" Must r2_acquire_records_active_lease "acquire records an active lease naming its driver (B1.3)",
    "R3" Must r3_realize_cwd_exists "realize returns an absolute cwd that exists (A5.1)",
    "R4" Must r4_exit_codes "exit 0 gives the exact stdout; a non-zero exit is a result (A6.1, A6.2)",
    "R5" Must r5_streams_separate "stdout and stderr are complete, separate UTF-8 (A6.3)",
    "R6" Must r6_argv_exact "args reach the command as argv exactly (A6.4)",
    "R7" Must r7_cwd_honoured "cwd is honoured (A6.5)",
    "R8" Should r8_env_explicit "the explicit env reaches the command, the host's does not (A6.6)",
    "R9" Must r9_stdin_then_eof "stdin is delivered, then EOF (A6.8)",
    "R10" Must r10_timeout_kills "a timeout kills the command and returns timed_out (A6.9)",
    "R11" Should r11_output_streams_live "output reaches the caller while the command still runs",
    "R12" Must r12_workspace_round_trip "workspace upload, remote edits, download merge (C4, C9)",
    "R13" Must r13_no_secret_in_lease_rows "lease rows carry no resolved secret (D3)",
    "R14" Must r14_release_by_run "release_run_leases releases the run's lease; a second call is a no-op (B3.1, B3.2)",
}

/// R1
pub async fn r1_probe_ok(f: &EnvFixture) -> CheckResult {
    let result = f.timed("probe", f.runtime.probe(&f.environment)).await?;
    ensure!(result.ok, "probe failed: {}", result.summary);
    Ok(())
}

/// R2
pub async fn r2_acquire_records_active_lease(f: &EnvFixture) -> CheckResult {
    f.with_lease("R2", |lease| async move {
        ensure!(
            lease.status == LeaseStatus::Active,
            "new lease is {}",
            lease.status
        );
        // The row is written before the provider call and touched while it
        // runs (recorded acquisitions), so lastUsedAt may trail acquiredAt.
        ensure!(
            lease.last_used_at >= lease.acquired_at,
            "lastUsedAt {} is before acquiredAt {}",
            lease.last_used_at,
            lease.acquired_at
        );
        ensure!(lease.released_at.is_none(), "releasedAt is set");
        let driver = lease
            .metadata
            .as_ref()
            .and_then(|m| m.get("driver"))
            .and_then(|d| d.as_str());
        ensure!(
            driver == Some(f.environment.driver.as_str()),
            "metadata.driver is {driver:?}, expected {:?}",
            f.environment.driver
        );
        let stored = f
            .runtime
            .lease_store()
            .get(&lease.id)
            .await
            .map_err(failed("reading the lease row"))?;
        ensure!(
            stored.as_ref().map(|l| l.status) == Some(LeaseStatus::Active),
            "the store has {:?} for the lease",
            stored.map(|l| l.status)
        );
        Ok(())
    })
    .await
}

fn is_unsupported(e: &Error) -> bool {
    matches!(e, Error::NotSupported { .. })
}

/// R3
pub async fn r3_realize_cwd_exists(f: &EnvFixture) -> CheckResult {
    f.with_lease("R3", |lease| async move {
        let realized = match tokio::time::timeout(
            f.call_timeout,
            f.runtime
                .realize_workspace(&f.environment, &lease, &WorkspaceSpec::default()),
        )
        .await
        {
            Err(_) => return Err(Fail::Failed("realize did not return".into())),
            Ok(Err(e)) if is_unsupported(&e) => {
                return Err(Fail::Skipped(format!("realize not supported: {e}")));
            }
            Ok(Err(e)) => return Err(Fail::Failed(format!("realize: {e}"))),
            Ok(Ok(realized)) => realized,
        };
        ensure!(
            realized.cwd.starts_with('/'),
            "cwd {:?} is not absolute",
            realized.cwd
        );
        match f
            .exec(
                &lease,
                ExecuteRequest::new("test").args(["-d", &realized.cwd]),
            )
            .await
        {
            // Nothing to look with: the absolute path is all we can check.
            Err(Fail::Skipped(_)) => Ok(()),
            Err(e) => Err(e),
            Ok(r) => {
                ensure!(
                    r.exit_code == Some(0),
                    "cwd {} does not exist in the lease",
                    realized.cwd
                );
                Ok(())
            }
        }
    })
    .await
}

/// R4
pub async fn r4_exit_codes(f: &EnvFixture) -> CheckResult {
    f.with_lease("R4", |lease| async move {
        let r = f
            .exec(&lease, ExecuteRequest::shell("printf hello"))
            .await?;
        ensure!(
            r.exit_code == Some(0) && !r.timed_out,
            "exit {:?}, timed_out {}",
            r.exit_code,
            r.timed_out
        );
        ensure!(r.stdout == "hello", "stdout {:?}", r.stdout);
        let r = f.exec(&lease, ExecuteRequest::shell("exit 3")).await?;
        ensure!(
            r.exit_code == Some(3),
            "exit code {:?}, expected 3",
            r.exit_code
        );
        Ok(())
    })
    .await
}

/// R5
pub async fn r5_streams_separate(f: &EnvFixture) -> CheckResult {
    f.with_lease("R5", |lease| async move {
        let r = f
            .exec(
                &lease,
                ExecuteRequest::shell("printf 'out ☃'; printf 'err é' >&2"),
            )
            .await?;
        ensure!(r.stdout == "out ☃", "stdout {:?}", r.stdout);
        ensure!(r.stderr == "err é", "stderr {:?}", r.stderr);
        Ok(())
    })
    .await
}

/// R6
pub async fn r6_argv_exact(f: &EnvFixture) -> CheckResult {
    f.with_lease("R6", |lease| async move {
        let args = [
            "%s|",
            "a b",
            "it's",
            "$HOME",
            "*",
            "\"dq\"",
            "",
            "back\\slash",
        ];
        let r = f
            .exec(&lease, ExecuteRequest::new("printf").args(args))
            .await?;
        let expected = "a b|it's|$HOME|*|\"dq\"||back\\slash|";
        ensure!(
            r.stdout == expected,
            "argv was altered: {:?} (expected {expected:?})",
            r.stdout
        );
        Ok(())
    })
    .await
}

/// R7
pub async fn r7_cwd_honoured(f: &EnvFixture) -> CheckResult {
    f.with_lease("R7", |lease| async move {
        let r = f.exec(&lease, ExecuteRequest::new("pwd").cwd("/")).await?;
        ensure!(r.stdout.trim() == "/", "cwd / gave pwd {:?}", r.stdout);
        Ok(())
    })
    .await
}

/// A variable of this process with a value distinctive enough that
/// finding it in the lease means the driver forwarded the host environment.
fn distinctive_host_var() -> Option<(String, String)> {
    const COMMON: [&str; 14] = [
        "PATH", "HOME", "USER", "LANG", "SHELL", "TERM", "PWD", "HOSTNAME", "LOGNAME", "SHLVL",
        "_", "OLDPWD", "TMPDIR", "TZ",
    ];
    std::env::vars()
        .filter(|(k, v)| {
            v.len() >= 8
                && !v.contains('\n')
                && !COMMON.contains(&k.as_str())
                && !k.starts_with("LC_")
                && !k.starts_with("XDG_")
                && !k.starts_with("SSH_")
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .min_by(|a, b| a.0.cmp(&b.0))
}

/// R8
pub async fn r8_env_explicit(f: &EnvFixture) -> CheckResult {
    let host = distinctive_host_var();
    let script = match &host {
        Some((name, _)) => format!("printf '%s|%s' \"$EXPLICIT_ONLY\" \"${{{name}-unset}}\""),
        None => "printf '%s|unset' \"$EXPLICIT_ONLY\"".to_owned(),
    };
    f.with_lease("R8", |lease| async move {
        let r = f
            .exec(
                &lease,
                ExecuteRequest::shell(script).env("EXPLICIT_ONLY", "visible"),
            )
            .await?;
        let (explicit, seen) = r.stdout.split_once('|').unwrap_or((r.stdout.as_str(), ""));
        ensure!(
            explicit == "visible",
            "the explicit env was lost: {:?}",
            r.stdout
        );
        if let Some((name, value)) = &host {
            ensure!(seen != value, "the host's {name} reached the command");
        }
        Ok(())
    })
    .await
}

/// R9
pub async fn r9_stdin_then_eof(f: &EnvFixture) -> CheckResult {
    f.with_lease("R9", |lease| async move {
        let r = f
            .exec(
                &lease,
                ExecuteRequest::new("cat").stdin("line one\nline two\n"),
            )
            .await?;
        ensure!(
            r.stdout == "line one\nline two\n",
            "stdin was not delivered: {:?}",
            r.stdout
        );
        let r = f
            .exec(&lease, ExecuteRequest::new("cat").timeout_ms(10_000))
            .await?;
        ensure!(
            r.stdout.is_empty() && !r.timed_out,
            "absent stdin was not closed"
        );
        Ok(())
    })
    .await
}

/// R10
pub async fn r10_timeout_kills(f: &EnvFixture) -> CheckResult {
    f.with_lease("R10", |lease| async move {
        let r = f
            .exec(
                &lease,
                ExecuteRequest::shell("trap '' TERM; while :; do sleep 1; done").timeout_ms(500),
            )
            .await?;
        ensure!(r.timed_out, "timed_out is false (exit {:?})", r.exit_code);
        Ok(())
    })
    .await
}

/// R11: the command prints, then waits for a marker file that the check
/// creates only once it has seen that output. Output that arrives only at
/// exit never unblocks it, and the command times out.
pub async fn r11_output_streams_live(f: &EnvFixture) -> CheckResult {
    f.with_lease("R11", |lease| async move {
        let dir = f.base_dir(&lease).await;
        let marker = format!(
            "{dir}/.paperclip-conformance-{}",
            uuid::Uuid::new_v4().simple()
        );
        let script =
            "echo first; while [ ! -e \"$1\" ]; do sleep 0.05; done; rm -f \"$1\"; echo second";
        let request = ExecuteRequest::new("sh")
            .args(["-c", script, "sh", &marker])
            // Well inside the call bound, so a command that never sees the
            // marker ends as timed out rather than as a stuck call.
            .timeout_ms(
                u64::try_from(f.call_timeout.as_millis() / 3)
                    .unwrap_or(15_000)
                    .clamp(1_000, 15_000),
            );
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
        let seen = Arc::new(Mutex::new(Some(seen_tx)));
        let sink = {
            let seen = seen.clone();
            move |stream: OutputStream, data: &[u8]| {
                if stream == OutputStream::Stdout
                    && !data.is_empty()
                    && let Some(tx) = seen.lock().ok().and_then(|mut s| s.take())
                {
                    let _ = tx.send(());
                }
            }
        };
        let mut run = Box::pin(tokio::time::timeout(
            f.call_timeout,
            f.runtime
                .execute_streaming(&f.environment, &lease, &request, Arc::new(sink)),
        ));
        // Whichever comes first: the command's end (no output seen while it
        // ran) or its first output, after which the check lets it finish.
        let finished = tokio::select! {
            result = &mut run => Some(result),
            seen = seen_rx => {
                if seen.is_ok() {
                    let touch = ExecuteRequest::new("touch").arg(&marker).timeout_ms(10_000);
                    f.exec(&lease, touch).await?;
                }
                None
            }
        };
        let result = match finished {
            Some(result) => result,
            None => run.await,
        };
        let result = result
            .map_err(|_| Fail::Failed("the streaming command did not return".into()))?
            .map_err(failed("execute_streaming"))?;
        ensure!(
            !result.timed_out,
            "no output arrived before the command finished (it waited for the check and timed out)"
        );
        ensure!(
            result.exit_code == Some(0),
            "exit {:?}, stderr {:?}",
            result.exit_code,
            result.stderr
        );
        Ok(())
    })
    .await
}

fn write(path: &Path, text: &str) -> Result<(), Fail> {
    std::fs::write(path, text).map_err(|e| Fail::Failed(format!("writing {}: {e}", path.display())))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// R12
pub async fn r12_workspace_round_trip(f: &EnvFixture) -> CheckResult {
    use std::os::unix::fs::PermissionsExt;
    let local = tempfile::tempdir().map_err(failed("local temp dir"))?;
    let root = local.path();
    write(&root.join("edit.txt"), "before\n")?;
    write(&root.join("with space.txt"), "gone soon\n")?;
    write(&root.join("keep.txt"), "kept\n")?;
    write(&root.join("run.sh"), "#!/bin/sh\necho ran\n")?;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .map_err(failed("chmod"))?;
    std::os::unix::fs::symlink("keep.txt", root.join("link")).map_err(failed("symlink"))?;
    f.with_lease("R12", |lease| async move {
        // A directory of our own in the lease: uploading replaces the
        // target's contents, which must never be a real workspace.
        let remote = format!(
            "{}/paperclip-conformance-{}",
            f.base_dir(&lease).await.trim_end_matches('/'),
            uuid::Uuid::new_v4().simple()
        );
        let result = round_trip(f, &lease, root, &remote).await;
        let _ = f
            .exec(&lease, ExecuteRequest::new("rm").args(["-rf", &remote]))
            .await;
        result
    })
    .await
}

async fn round_trip(
    f: &EnvFixture,
    lease: &EnvironmentLease,
    root: &Path,
    remote: &str,
) -> CheckResult {
    let sync = f
        .timed(
            "workspace sync",
            WorkspaceSync::for_lease(&f.runtime, &f.environment, lease),
        )
        .await?;
    let options = SyncOptions::default();
    let up = f
        .timed("upload", sync.upload(root, remote, &options))
        .await?;
    ensure!(up.files >= 4, "upload sent {} files, expected 4", up.files);
    let script =
        "printf after > edit.txt && rm 'with space.txt' && printf new > new.txt && ./run.sh";
    let r = f
        .exec(lease, ExecuteRequest::shell(script).cwd(remote))
        .await?;
    ensure!(
        r.exit_code == Some(0) && r.stdout == "ran\n",
        "remote edits failed: exit {:?}, stdout {:?}, stderr {:?}",
        r.exit_code,
        r.stdout,
        r.stderr
    );
    f.timed(
        "download",
        sync.download(remote, root, Some(&up.baseline), &options),
    )
    .await?;
    ensure!(
        read(&root.join("edit.txt")).as_deref() == Some("after"),
        "edit.txt was not brought back"
    );
    ensure!(
        read(&root.join("new.txt")).as_deref() == Some("new"),
        "new.txt was not brought back"
    );
    ensure!(
        !root.join("with space.txt").exists(),
        "a file deleted remotely is still here"
    );
    ensure!(
        read(&root.join("keep.txt")).as_deref() == Some("kept\n"),
        "an untouched file changed"
    );
    let link = std::fs::read_link(root.join("link")).ok();
    ensure!(
        link.as_deref() == Some(Path::new("keep.txt")),
        "the symlink came back as {link:?}"
    );
    let mode = std::fs::metadata(root.join("run.sh"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap_or(0);
    ensure!(mode & 0o100 != 0, "run.sh lost its executable bit");
    Ok(())
}

/// R13
pub async fn r13_no_secret_in_lease_rows(f: &EnvFixture) -> CheckResult {
    if f.secret_values.is_empty() {
        return Err(Fail::Skipped("the environment config has no secret".into()));
    }
    f.with_lease("R13", |lease| async move {
        let row = f
            .runtime
            .lease_store()
            .get(&lease.id)
            .await
            .map_err(failed("reading the lease row"))?;
        let text = serde_json::to_string(&(lease, row)).unwrap_or_default();
        for (i, secret) in f.secret_values.iter().enumerate() {
            ensure!(
                !secret.is_empty() && !text.contains(secret.as_str()),
                "secret #{} appears in the lease row",
                i + 1
            );
        }
        Ok(())
    })
    .await
}

/// R14
pub async fn r14_release_by_run(f: &EnvFixture) -> CheckResult {
    let run = f.run_id("R14");
    let lease = f.acquire(&run).await?;
    let first = tokio::time::timeout(
        f.call_timeout,
        f.runtime.release_run_leases(&run, LeaseStatus::Released),
    )
    .await
    .map_err(|_| Fail::Failed("release did not return".into()))?
    .into_result()
    .map_err(failed("release"))?;
    ensure!(
        first.len() == 1 && first[0].lease.id == lease.id,
        "the first release returned {} leases",
        first.len()
    );
    ensure!(
        first[0].lease.status == LeaseStatus::Released,
        "released lease is {}",
        first[0].lease.status
    );
    let second = tokio::time::timeout(
        f.call_timeout,
        f.runtime.release_run_leases(&run, LeaseStatus::Released),
    )
    .await
    .map_err(|_| Fail::Failed("the second release did not return".into()))?
    .into_result()
    .map_err(failed("second release"))?;
    ensure!(
        second.is_empty(),
        "the second release returned {} leases",
        second.len()
    );
    Ok(())
}
