//! Commands in the pod (spec 26 §9): argv construction and the WebSocket
//! exec subresource with a deadline on every call.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::AttachParams;
use paperclip_env_core::{CommandExit, Error, OutputCollector, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::warn;

use super::client::{KEY, map_error};
use super::manifests::CONTAINER;

/// `shQuote`: single quotes, each `'` as `'\''`.
///
/// ```
/// assert_eq!(paperclip_env_providers::kubernetes::sh_quote("a'b"), r"'a'\''b'");
/// ```
pub fn sh_quote(value: &str) -> String {
    paperclip_env_core::provider::support::shell_quote(value)
}

use paperclip_env_core::provider::support::valid_env_key;

/// `wrapCommandWithEnv` (spec 26 §9.2 step 3, with the RECOMMENDED cwd
/// variant): unchanged without usable env or cwd; else
/// `/bin/sh -c "cd '<cwd>' && export K='v'; exec 'a0' …"`. `PATH` is never
/// exported and invalid keys are skipped.
///
/// ```
/// use std::collections::BTreeMap;
/// use paperclip_env_providers::kubernetes::wrap_with_env;
/// let env = BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]);
/// assert_eq!(
///     wrap_with_env(vec!["node".into(), "run.js".into()], &env, Some("/workspace")),
///     ["/bin/sh", "-c", "cd '/workspace' && export FOO='bar'; exec 'node' 'run.js'"]
/// );
/// ```
pub fn wrap_with_env(
    argv: Vec<String>,
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Vec<String> {
    let exports: Vec<String> = env
        .iter()
        .filter(|(k, _)| k.as_str() != "PATH" && valid_env_key(k))
        .map(|(k, v)| format!("export {k}={};", sh_quote(v)))
        .collect();
    let cwd = cwd.map(str::trim).filter(|c| !c.is_empty());
    if exports.is_empty() && cwd.is_none() {
        return argv;
    }
    let mut script = String::new();
    if let Some(cwd) = cwd {
        script.push_str(&format!("cd {} && ", sh_quote(cwd)));
    }
    if !exports.is_empty() {
        script.push_str(&exports.join(" "));
        script.push(' ');
    }
    let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    script.push_str(&format!("exec {}", quoted.join(" ")));
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// The argv of an execute request (spec 26 §9.2 steps 2–5): stdin of `n`
/// bytes is framed with `head -c n` so no stdin-EOF is needed (gotcha G10).
///
/// ```
/// use std::collections::BTreeMap;
/// use paperclip_env_providers::kubernetes::build_argv;
/// assert_eq!(build_argv("ls", &[], &BTreeMap::new(), None, None), ["/bin/sh", "-lc", "ls"]);
/// assert_eq!(
///     build_argv("cat", &["-".into()], &BTreeMap::new(), None, Some(3)),
///     ["/bin/sh", "-c", "head -c 3 | 'cat' '-'"]
/// );
/// ```
pub fn build_argv(
    command: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    stdin_len: Option<usize>,
) -> Vec<String> {
    let command = command.trim();
    let argv = if !command.is_empty() && !args.is_empty() {
        std::iter::once(command.to_owned())
            .chain(args.iter().cloned())
            .collect()
    } else if !command.is_empty() {
        vec!["/bin/sh".into(), "-lc".into(), command.to_owned()]
    } else {
        vec!["/bin/sh".into(), "-l".into()]
    };
    let argv = wrap_with_env(argv, env, cwd);
    match stdin_len {
        Some(n) if n > 0 => {
            let quoted: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
            vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("head -c {n} | {}", quoted.join(" ")),
            ]
        }
        _ => argv,
    }
}

/// Wraps argv so a parent shell records its pid in `pid_file` (removed on
/// exit), which lets a liveness probe and a kill run as separate execs.
pub(crate) fn with_pid_file(argv: Vec<String>, pid_file: &str) -> Vec<String> {
    let mut out = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!(
            "f={}; echo $$ > \"$f\"; \"$@\"; rc=$?; rm -f \"$f\"; exit $rc",
            sh_quote(pid_file)
        ),
        "sh".to_owned(),
    ];
    out.extend(argv);
    out
}

/// Exit 0: the recorded process is alive; 1: it is gone; 3: not started (no pid yet).
pub(crate) fn probe_script(pid_file: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "p=$(cat {} 2>/dev/null) || exit 3; [ -n \"$p\" ] || exit 3; kill -0 \"$p\" 2>/dev/null || exit 1; exit 0",
            sh_quote(pid_file)
        ),
    ]
}

/// The script that kills the process group recorded in `pid_file`.
pub(crate) fn kill_script(pid_file: &str) -> Vec<String> {
    let f = sh_quote(pid_file);
    // No pkill (minimal images lack procps): the descendants of the
    // recorded pid are found through /proc/<pid>/status `PPid`, breadth
    // first, then the group and every one of them get SIGKILL.
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "p=$(cat {f} 2>/dev/null) && [ -n \"$p\" ] && {{ all=\"$p\"; front=\"$p\"; while [ -n \"$front\" ]; do next=''; for d in /proc/[0-9]*; do pp=''; while IFS=':	' read -r k v; do if [ \"$k\" = PPid ]; then pp=$v; break; fi; done 2>/dev/null < \"$d/status\"; for q in $front; do if [ \"$pp\" = \"$q\" ]; then next=\"$next ${{d#/proc/}}\"; fi; done; done; all=\"$all $next\"; front=$next; done; kill -KILL -- -\"$p\" 2>/dev/null; kill -KILL $all 2>/dev/null; }}; rm -f {f}; true"
        ),
    ]
}

/// The exit code carried by the channel-3 status (spec 26 §9.1).
///
/// ```
/// use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
/// use paperclip_env_providers::kubernetes::exit_code_of;
/// let ok = Status { status: Some("Success".into()), ..Default::default() };
/// assert_eq!(exit_code_of(&ok), 0);
/// ```
pub fn exit_code_of(status: &Status) -> i32 {
    if status.status.as_deref() == Some("Success") {
        return 0;
    }
    status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .and_then(|causes| {
            causes
                .iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
        })
        .and_then(|c| c.message.as_deref())
        .and_then(|m| m.trim().parse::<i32>().ok())
        .unwrap_or(1)
}

/// Where the output of an exec goes.
pub(crate) enum Sink<'a> {
    /// Streamed into the collector; the last bytes of stderr are kept too
    /// (for the network-denial hint).
    Collector(&'a OutputCollector, &'a mut Vec<u8>),
    /// Stdout written to a file, stderr kept.
    File(&'a mut tokio::fs::File, &'a mut Vec<u8>),
    /// Both kept in memory.
    Buffers(&'a mut Vec<u8>, &'a mut Vec<u8>),
}

/// How long output may keep draining after the status frame arrived.
const DRAIN_AFTER_STATUS: Duration = Duration::from_secs(10);
/// How long output may keep draining after the connection was lost.
const DRAIN_AFTER_LOSS: Duration = Duration::from_millis(500);

/// How much of the end of stderr is kept for the network-denial hint.
const STDERR_TAIL: usize = 16 * 1024;

/// The network-denial hint (spec 26 §8.3) when stderr looks like a blocked
/// connection; `None` otherwise.
///
/// ```
/// use paperclip_env_providers::kubernetes::network_denial_hint;
/// let hint = network_denial_hint(b"curl: (6) Could not resolve host: example.com\n").unwrap();
/// assert!(hint.contains("Paperclip network policy denied or could not route this request."));
/// assert!(network_denial_hint(b"file not found").is_none());
/// ```
pub fn network_denial_hint(stderr: &[u8]) -> Option<String> {
    const PATTERNS: [&str; 5] = [
        "could not resolve host",
        "network is unreachable",
        "connection timed out",
        "failed to connect",
        "temporary failure in name resolution",
    ];
    let text = String::from_utf8_lossy(stderr).to_lowercase();
    PATTERNS.iter().any(|p| text.contains(p)).then(|| {
        "\nPaperclip network policy denied or could not route this request. No task-scoped destinations are granted. Request access through executionWorkspaceSettings.networkEgress.\n".to_owned()
    })
}

/// Stdin of an exec.
pub(crate) enum Input<'a> {
    None,
    Bytes(&'a [u8]),
    File(&'a std::path::Path),
}

/// What an exec ended with.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The status frame arrived.
    Exited(i32),
    /// The budget ran out first.
    TimedOut,
}

async fn pump(mut reader: impl AsyncRead + Unpin, mut push: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => push(&buf[..n]),
        }
    }
}

/// Runs `argv` in the pod's `agent` container. The whole exchange (connect,
/// stdin, output, status) is bounded by `budget`; a socket that closes before
/// the status frame is a retryable provider error, never a hang.
pub(crate) async fn run(
    pods: &Api<Pod>,
    pod: &str,
    argv: Vec<String>,
    input: Input<'_>,
    sink: Sink<'_>,
    budget: Duration,
) -> Result<Ended> {
    let cmd0 = argv.first().cloned().unwrap_or_default();
    let has_stdin = !matches!(input, Input::None);
    let params = AttachParams::default()
        .container(CONTAINER)
        .stdin(has_stdin)
        .stdout(true)
        .stderr(true);
    let work = async {
        let mut attached = pods
            .exec(pod, argv, &params)
            .await
            .map_err(|e| map_error(&format!("exec in pod {pod}"), e))?;
        let status = attached.take_status();
        let stdout = attached.stdout();
        let stderr = attached.stderr();
        // Keep the stdin writer open until the end: on v4 dropping it closes the
        // whole socket and loses output (gotcha G10); `head -c` frames the bytes.
        let mut stdin_writer = attached.stdin();
        let feed = async {
            if let Some(w) = stdin_writer.as_mut() {
                match input {
                    Input::None => {}
                    Input::Bytes(bytes) => {
                        let _ = w.write_all(bytes).await;
                    }
                    Input::File(path) => {
                        if let Ok(mut f) = tokio::fs::File::open(path).await {
                            let _ = tokio::io::copy(&mut f, w).await;
                        }
                    }
                }
                let _ = w.flush().await;
            }
        };
        let read = async {
            match sink {
                Sink::Collector(out, tail) => {
                    let a = async {
                        if let Some(r) = stdout {
                            pump(r, |b| out.stdout(b)).await
                        }
                    };
                    let b = async {
                        if let Some(r) = stderr {
                            pump(r, |b| {
                                out.stderr(b);
                                tail.extend_from_slice(b);
                                let excess = tail.len().saturating_sub(STDERR_TAIL);
                                tail.drain(..excess);
                            })
                            .await
                        }
                    };
                    tokio::join!(a, b);
                    Ok(())
                }
                Sink::Buffers(o, e) => {
                    let a = async {
                        if let Some(r) = stdout {
                            pump(r, |b| o.extend_from_slice(b)).await
                        }
                    };
                    let b = async {
                        if let Some(r) = stderr {
                            pump(r, |b| e.extend_from_slice(b)).await
                        }
                    };
                    tokio::join!(a, b);
                    Ok(())
                }
                Sink::File(file, e) => {
                    let a = async {
                        match stdout {
                            Some(mut r) => tokio::io::copy(&mut r, file).await.map(|_| ()),
                            None => Ok(()),
                        }
                    };
                    let b = async {
                        if let Some(r) = stderr {
                            pump(r, |b| e.extend_from_slice(b)).await
                        }
                    };
                    let (written, ()) = tokio::join!(a, b);
                    written.map_err(|e| {
                        Error::provider_with_source(
                            KEY,
                            "writing exec output to a file failed",
                            false,
                            e,
                        )
                    })
                }
            }
        };
        let status_fut = async {
            match status {
                Some(s) => s.await,
                None => None,
            }
        };
        // kube leaves the output readers open when the connection dies (only a
        // clean end shuts them down), so the status channel decides: once it
        // resolves, the streams get a bounded moment to drain.
        let io = async { tokio::join!(feed, read).1 };
        let mut io = std::pin::pin!(io);
        let mut status_fut = std::pin::pin!(status_fut);
        let (read_result, status) = tokio::select! {
            read_result = &mut io => (Some(read_result), status_fut.await),
            status = &mut status_fut => {
                let drain = if status.is_some() { DRAIN_AFTER_STATUS } else { DRAIN_AFTER_LOSS };
                (tokio::time::timeout(drain, &mut io).await.ok(), status)
            }
        };
        if let Some(result) = read_result {
            result?;
        }
        match status {
            Some(status) => Ok(Ended::Exited(exit_code_of(&status))),
            None => Err(Error::Provider {
                provider: KEY.into(),
                message: format!(
                    "execInPod lost its exec connection before the command reported an exit status (connection_closed: WebSocket closed; pod={pod}, container={CONTAINER}, cmd0={cmd0}). The command was not re-run and may still be running in the pod."
                ),
                retryable: true,
                source: None,
            }),
        }
    };
    match tokio::time::timeout(budget, work).await {
        Ok(result) => result,
        Err(_) => {
            warn!(pod, cmd0 = %cmd0, budget_ms = budget.as_millis() as u64, "exec budget ran out");
            Ok(Ended::TimedOut)
        }
    }
}

/// The timeout error of a helper exec (not a user command).
pub(crate) fn timeout_error(pod: &str, cmd0: &str, budget: Duration) -> Error {
    Error::Timeout {
        operation: format!(
            "execInPod (pod={pod}, container={CONTAINER}, cmd0={cmd0}; no exit status arrived within the exec budget)"
        ),
        after: budget,
    }
}

/// Converts an exec end into a command exit.
pub(crate) fn to_exit(ended: Ended) -> CommandExit {
    match ended {
        Ended::Exited(code) => CommandExit::code(code),
        Ended::TimedOut => CommandExit {
            exit_code: None,
            signal: None,
            timed_out: true,
            metadata: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{StatusCause, StatusDetails};

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_wrap_cases() {
        let argv = vec!["node".to_owned(), "run.js".to_owned()];
        assert_eq!(wrap_with_env(argv.clone(), &env(&[]), None), argv);
        assert_eq!(
            wrap_with_env(argv.clone(), &env(&[("PATH", "/x")]), None),
            argv,
            "PATH is never exported"
        );
        assert_eq!(
            wrap_with_env(
                argv.clone(),
                &env(&[("FOO", "bar"), ("BAD-KEY", "x")]),
                Some("/workspace")
            ),
            [
                "/bin/sh",
                "-c",
                "cd '/workspace' && export FOO='bar'; exec 'node' 'run.js'"
            ]
        );
        assert_eq!(
            wrap_with_env(
                vec!["ls".into(), "-la".into()],
                &env(&[]),
                Some("/workspace/repo")
            ),
            ["/bin/sh", "-c", "cd '/workspace/repo' && exec 'ls' '-la'"]
        );
        assert_eq!(
            wrap_with_env(argv, &env(&[("A", "a'b"), ("B", "2")]), None)[2],
            r"export A='a'\''b'; export B='2'; exec 'node' 'run.js'"
        );
    }

    #[test]
    fn argv_shapes_and_stdin_framing() {
        let none = BTreeMap::new();
        assert_eq!(
            build_argv(" ls ", &[], &none, None, None),
            ["/bin/sh", "-lc", "ls"]
        );
        assert_eq!(build_argv("", &[], &none, None, None), ["/bin/sh", "-l"]);
        assert_eq!(
            build_argv("echo", &["a b".into()], &none, None, Some(0)),
            ["echo", "a b"]
        );
        assert_eq!(
            build_argv("cat", &["-".into()], &none, None, Some("héllo".len())),
            ["/bin/sh", "-c", "head -c 6 | 'cat' '-'"]
        );
    }

    #[test]
    fn the_kill_script_needs_no_procps() {
        let script = kill_script("/tmp/.p.pid").join(" ");
        assert!(!script.contains("pkill") && !script.contains("pgrep"));
        assert!(script.contains("/proc/[0-9]*") && script.contains("kill -KILL -- -"));
        let status = std::process::Command::new("/bin/sh")
            .arg("-n")
            .arg("-c")
            .arg(&kill_script("/tmp/.p.pid")[2])
            .status()
            .unwrap();
        assert!(status.success(), "the kill script does not parse");
    }

    #[test]
    fn exit_codes_from_status() {
        let ok = Status {
            status: Some("Success".into()),
            ..Default::default()
        };
        assert_eq!(exit_code_of(&ok), 0);
        let failed = Status {
            status: Some("Failure".into()),
            reason: Some("NonZeroExitCode".into()),
            details: Some(StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ExitCode".into()),
                    message: Some("7".into()),
                    field: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(exit_code_of(&failed), 7);
        let bare = Status {
            status: Some("Failure".into()),
            ..Default::default()
        };
        assert_eq!(exit_code_of(&bare), 1);
    }
}
