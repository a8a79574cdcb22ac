//! Running a command as a real local process in its own process group, with
//! streamed output, stdin delivery and a SIGTERM → SIGKILL timeout.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paperclip_env_core::{CommandExit, Error, OutputCollector, OutputStream, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// `PATH` given to commands that do not set one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Grace between SIGTERM and SIGKILL on timeout.
pub const KILL_GRACE: Duration = Duration::from_millis(250);

/// What to run.
#[derive(Debug)]
pub struct ProcessSpec<'a> {
    /// Program.
    pub command: &'a str,
    /// Arguments, as argv.
    pub args: &'a [String],
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// The whole environment (nothing is inherited).
    pub env: &'a BTreeMap<String, String>,
    /// Stdin bytes, then EOF; `None`: stdin is closed at once.
    pub stdin: Option<&'a [u8]>,
    /// Timeout; `None` or zero: none.
    pub timeout: Option<Duration>,
}

/// Kills the process group if the future running the command is dropped
/// before the command was reaped (a deadline fired, the caller gave up).
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

async fn pump(
    mut reader: impl AsyncRead + Unpin,
    stream: OutputStream,
    output: &OutputCollector,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        output.push(stream, &buf[..n]);
    }
}

/// Runs the process to completion, pushing output into `output` as it arrives.
///
/// Spawn failures (program not found, bad cwd) are errors; a non-zero exit,
/// a signal or a timeout are results.
pub async fn run_process(
    provider: &str,
    spec: ProcessSpec<'_>,
    output: &OutputCollector,
) -> Result<CommandExit> {
    let mut cmd = Command::new(spec.command);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if !spec.env.contains_key("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::provider_with_source(
            provider,
            format!("Failed to start command \"{}\": {e}", spec.command),
            false,
            e,
        )
    })?;
    let mut guard = GroupGuard {
        pgid: child.id().map(|p| p as i32),
    };

    let stdin_task = match (child.stdin.take(), spec.stdin) {
        (Some(mut pipe), Some(bytes)) => {
            let bytes = bytes.to_vec();
            Some(tokio::spawn(async move {
                // A command that exits without reading stdin closes the pipe: not an error.
                let _ = pipe.write_all(&bytes).await;
                let _ = pipe.shutdown().await;
            }))
        }
        _ => None,
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::provider(provider, "stdout pipe missing"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| Error::provider(provider, "stderr pipe missing"))?;

    let run = async {
        let (out, err) = tokio::join!(
            pump(stdout, OutputStream::Stdout, output),
            pump(stderr, OutputStream::Stderr, output)
        );
        let status = child.wait().await;
        (out.and(err), status)
    };
    tokio::pin!(run);
    let timer = async {
        match spec.timeout.filter(|t| !t.is_zero()) {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let mut timed_out = false;
    let (io, status) = tokio::select! {
        done = &mut run => done,
        _ = timer => {
            timed_out = true;
            guard.signal(Signal::SIGTERM);
            tokio::select! {
                done = &mut run => done,
                _ = tokio::time::sleep(KILL_GRACE) => {
                    guard.signal(Signal::SIGKILL);
                    run.await
                }
            }
        }
    };
    if let Some(task) = stdin_task {
        task.abort();
    }
    let status = status.map_err(|e| {
        Error::provider_with_source(provider, "Waiting for the command failed", false, e)
    })?;
    // Reaped: background processes the command started on purpose keep running,
    // as they would in a real sandbox.
    guard.pgid = None;
    io.map_err(|e| {
        Error::provider_with_source(provider, "Reading command output failed", false, e)
    })?;
    let signal = status.signal().map(|s| {
        Signal::try_from(s)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("SIG{s}"))
    });
    Ok(CommandExit {
        exit_code: if timed_out { None } else { status.code() },
        signal,
        timed_out,
        metadata: None,
    })
}
