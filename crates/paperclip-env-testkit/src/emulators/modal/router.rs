//! The per-task command router: `modal.task_command_router.TaskCommandRouter`.
//! Commands run as real local processes in their own process group.

use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paperclip_env_modal_proto::router::task_command_router_server::TaskCommandRouter;
use paperclip_env_modal_proto::router::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{Exec, ExecRecord, Fault, RecordedCall, Route, Service, lock};
use crate::fake::DEFAULT_PATH;

/// Largest stdio message the router sends.
const CHUNK: usize = 4096;

/// An append-only output buffer readers follow by offset.
#[derive(Default)]
pub(crate) struct Pipe {
    state: Mutex<(Vec<u8>, bool)>,
    notify: Notify,
}

impl Pipe {
    pub(crate) fn append(&self, data: &[u8]) {
        lock(&self.state).0.extend_from_slice(data);
        self.notify.notify_waiters();
    }

    fn close(&self) {
        lock(&self.state).1 = true;
        self.notify.notify_waiters();
    }

    /// Bytes from `offset` (at most `max`), waiting for more; `None` at EOF.
    pub(crate) async fn read_from(&self, offset: usize, max: usize) -> Option<Vec<u8>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = lock(&self.state);
                if state.0.len() > offset {
                    let end = state.0.len().min(offset + max.max(1));
                    return Some(state.0[offset..end].to_vec());
                }
                if state.1 {
                    return None;
                }
            }
            notified.await;
        }
    }
}

async fn pump(mut reader: impl AsyncRead + Unpin, pipe: Arc<Pipe>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => pipe.append(&buf[..n]),
        }
    }
}

type StdioStream = Pin<Box<dyn Stream<Item = Result<TaskExecStdioReadResponse, Status>> + Send>>;

impl Service {
    /// Records a router call, checks the bearer JWT against the task and applies a status fault.
    fn admit_router(
        &self,
        meta: &MetadataMap,
        rpc: &'static str,
        route: Route,
        task_id: &str,
    ) -> Result<Option<Fault>, Status> {
        let bearer = meta
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let authorized = {
            let mut sandboxes = lock(&self.shared.sandboxes);
            match sandboxes.values_mut().find(|s| s.task_id == task_id) {
                Some(s) => {
                    s.last_activity = Instant::now();
                    bearer.as_ref().is_some_and(|b| s.router_jwts.contains(b))
                }
                None => false,
            }
        };
        lock(&self.shared.calls).push(RecordedCall {
            rpc,
            idempotency_key: None,
            retry_attempt: None,
            throttle_retry_attempt: None,
            client_type: meta
                .get("x-modal-client-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            client_version: None,
            had_auth_token: meta.get("x-modal-auth-token").is_some(),
            authorized,
        });
        if route == Route::TaskExecStart {
            self.shared.exec_starts.fetch_add(1, Ordering::SeqCst);
        }
        if !authorized {
            return Err(Status::unauthenticated("invalid or missing router token"));
        }
        self.shared.status_fault(route)
    }

    pub(crate) fn exec_parts(
        &self,
        task_id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Pipe>, Arc<Pipe>, ExitRx, StdinSlot), Status> {
        let sandboxes = lock(&self.shared.sandboxes);
        let exec = sandboxes
            .values()
            .find(|s| s.task_id == task_id)
            .and_then(|s| s.execs.get(exec_id))
            .ok_or_else(|| Status::not_found(format!("Exec {exec_id} not found")))?;
        Ok((
            exec.stdout.clone(),
            exec.stderr.clone(),
            exec.exit.clone(),
            exec.stdin.clone(),
        ))
    }
}

pub(crate) type ExitRx = tokio::sync::watch::Receiver<Option<Result<i32, i32>>>;
pub(crate) type StdinSlot = Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>;

fn exit_response(exit: Result<i32, i32>) -> Option<task_exec_wait_response::ExitStatus> {
    Some(match exit {
        Ok(code) => task_exec_wait_response::ExitStatus::Code(code),
        Err(signal) => task_exec_wait_response::ExitStatus::Signal(signal),
    })
}

/// Where a command's stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StderrMode {
    Null,
    Pipe,
    Stdout,
}

/// What to start (router and legacy exec share the process machinery).
pub(crate) struct SpawnSpec {
    pub(crate) exec_id: String,
    pub(crate) argv: Vec<String>,
    pub(crate) workdir: Option<String>,
    pub(crate) stdout_pipe: bool,
    pub(crate) stderr: StderrMode,
    pub(crate) timeout_secs: Option<u32>,
    pub(crate) stdout_config: i32,
    pub(crate) stderr_config: i32,
}

/// Starts a command as a real local process in its own process group; its
/// output fills the exec's pipes and `timeout_secs` kills the group.
pub(crate) fn spawn_exec(sandbox: &mut super::Sandbox, spec: SpawnSpec) -> Result<(), Status> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(Status::invalid_argument("command_args must not be empty"));
    };
    if sandbox.result.is_some() {
        return Err(Status::failed_precondition("the sandbox has finished"));
    }
    let cwd = spec
        .workdir
        .clone()
        .or_else(|| sandbox.definition.workdir.clone())
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| sandbox.home.clone());
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &sandbox.home)
        .stdin(Stdio::piped())
        .stdout(if spec.stdout_pipe {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(match spec.stderr {
            StderrMode::Null => Stdio::null(),
            _ => Stdio::piped(),
        })
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| Status::invalid_argument(format!("failed to start {program}: {e}")))?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let stdout = Arc::new(Pipe::default());
    let stderr = Arc::new(Pipe::default());
    let mut readers = Vec::new();
    match child.stdout.take() {
        Some(out) => readers.push(tokio::spawn(pump(out, stdout.clone()))),
        None => stdout.close(),
    }
    let stderr_target = if spec.stderr == StderrMode::Stdout {
        stdout.clone()
    } else {
        stderr.clone()
    };
    match child.stderr.take() {
        Some(err) => readers.push(tokio::spawn(pump(err, stderr_target))),
        None => stderr.close(),
    }
    let stdin: StdinSlot = Arc::new(tokio::sync::Mutex::new(child.stdin.take()));
    let (exit_tx, exit_rx) = tokio::sync::watch::channel(None);
    {
        let (stdout, stderr) = (stdout.clone(), stderr.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            // Drain what the process wrote before it exited, then close.
            for reader in readers {
                let _ = reader.await;
            }
            stdout.close();
            stderr.close();
            let exit = match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(code), _) => Ok(code),
                    (None, Some(signal)) => Err(signal),
                    (None, None) => Ok(-1),
                },
                Err(_) => Ok(-1),
            };
            let _ = exit_tx.send(Some(exit));
        });
    }
    if let Some(secs) = spec.timeout_secs.filter(|s| *s > 0) {
        let exit = exit_rx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(secs))).await;
            if exit.borrow().is_none() {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        });
    }
    sandbox.last_activity = Instant::now();
    sandbox.execs.insert(
        spec.exec_id.clone(),
        Exec {
            record: ExecRecord {
                sandbox_id: sandbox.id.clone(),
                exec_id: spec.exec_id.clone(),
                argv: spec.argv.clone(),
                timeout_secs: spec.timeout_secs,
                stdout_config: spec.stdout_config,
                stderr_config: spec.stderr_config,
                stdin_bytes: 0,
                stdin_closed: false,
                exit: None,
            },
            stdout,
            stderr,
            exit: exit_rx,
            stdin,
            pgid,
            input_index: 0,
        },
    );
    Ok(())
}

#[tonic::async_trait]
impl TaskCommandRouter for Service {
    async fn task_exec_start(
        &self,
        request: Request<TaskExecStartRequest>,
    ) -> Result<Response<TaskExecStartResponse>, Status> {
        let task_id = request.get_ref().task_id.clone();
        let fault = self.admit_router(
            request.metadata(),
            "TaskExecStart",
            Route::TaskExecStart,
            &task_id,
        )?;
        let lost = matches!(fault, Some(Fault::ResponseLost));
        let req = request.into_inner();
        let mut sandboxes = lock(&self.shared.sandboxes);
        let sandbox = sandboxes
            .values_mut()
            .find(|s| s.task_id == req.task_id)
            .ok_or_else(|| Status::not_found(format!("Task {} not found", req.task_id)))?;
        // The exec id makes a start idempotent: a retry starts nothing new.
        if sandbox.execs.contains_key(&req.exec_id) {
            return Ok(Response::new(TaskExecStartResponse {}));
        }
        let stderr = match TaskExecStderrConfig::try_from(req.stderr_config) {
            Ok(TaskExecStderrConfig::Pipe) => StderrMode::Pipe,
            Ok(TaskExecStderrConfig::Stdout) => StderrMode::Stdout,
            _ => StderrMode::Null,
        };
        spawn_exec(
            sandbox,
            SpawnSpec {
                exec_id: req.exec_id.clone(),
                argv: req.command_args.clone(),
                workdir: req.workdir.clone(),
                stdout_pipe: req.stdout_config == TaskExecStdoutConfig::Pipe as i32,
                stderr,
                timeout_secs: req.timeout_secs,
                stdout_config: req.stdout_config,
                stderr_config: req.stderr_config,
            },
        )?;
        if lost {
            return Err(Status::unavailable(
                "connection reset (injected: response lost)",
            ));
        }
        Ok(Response::new(TaskExecStartResponse {}))
    }

    type TaskExecStdioReadStream = StdioStream;

    async fn task_exec_stdio_read(
        &self,
        request: Request<TaskExecStdioReadRequest>,
    ) -> Result<Response<StdioStream>, Status> {
        let task_id = request.get_ref().task_id.clone();
        let fault = self.admit_router(
            request.metadata(),
            "TaskExecStdioRead",
            Route::TaskExecStdioRead,
            &task_id,
        )?;
        let req = request.into_inner();
        let (stdout, stderr, _, _) = self.exec_parts(&req.task_id, &req.exec_id)?;
        let pipe = if req.file_descriptor == TaskExecStdioFileDescriptor::Stderr as i32 {
            stderr
        } else {
            stdout
        };
        // With `EndStreamEarly(n)` the stream stops with UNAVAILABLE after n bytes.
        let budget = match fault {
            Some(Fault::EndStreamEarly(n)) => Some(n),
            _ => None,
        };
        let stream = futures::stream::unfold(
            (req.offset as usize, budget, false),
            move |(offset, budget, done)| {
                let pipe = pipe.clone();
                async move {
                    if done {
                        return None;
                    }
                    if budget == Some(0) {
                        return Some((
                            Err(Status::unavailable("stream reset by emulator")),
                            (offset, budget, true),
                        ));
                    }
                    let max = budget.unwrap_or(CHUNK).min(CHUNK);
                    let data = pipe.read_from(offset, max).await?;
                    let sent = data.len();
                    Some((
                        Ok(TaskExecStdioReadResponse { data }),
                        (offset + sent, budget.map(|b| b - sent.min(b)), false),
                    ))
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn task_exec_stdin_write(
        &self,
        request: Request<TaskExecStdinWriteRequest>,
    ) -> Result<Response<TaskExecStdinWriteResponse>, Status> {
        let task_id = request.get_ref().task_id.clone();
        self.admit_router(
            request.metadata(),
            "TaskExecStdinWrite",
            Route::TaskExecStdinWrite,
            &task_id,
        )?;
        let req = request.into_inner();
        let (_, _, _, stdin) = self.exec_parts(&req.task_id, &req.exec_id)?;
        let written = {
            let sandboxes = lock(&self.shared.sandboxes);
            sandboxes
                .values()
                .find(|s| s.task_id == req.task_id)
                .and_then(|s| s.execs.get(&req.exec_id))
                .map(|e| e.record.stdin_bytes as u64)
                .unwrap_or(0)
        };
        if req.offset > written {
            return Err(Status::invalid_argument(format!(
                "stdin offset {} is past the {written} bytes written",
                req.offset
            )));
        }
        // A retried write may overlap what was already written: skip that part.
        let skip = (written - req.offset).min(req.data.len() as u64) as usize;
        let fresh = &req.data[skip..];
        let mut slot = stdin.lock().await;
        if let Some(pipe) = slot.as_mut() {
            // A process that already exited closes its end: the write is moot, not an error.
            let _ = pipe.write_all(fresh).await;
            let _ = pipe.flush().await;
        }
        if req.eof {
            *slot = None;
        }
        drop(slot);
        let mut sandboxes = lock(&self.shared.sandboxes);
        if let Some(exec) = sandboxes
            .values_mut()
            .find(|s| s.task_id == req.task_id)
            .and_then(|s| s.execs.get_mut(&req.exec_id))
        {
            exec.record.stdin_bytes += fresh.len();
            exec.record.stdin_closed |= req.eof;
        }
        Ok(Response::new(TaskExecStdinWriteResponse {}))
    }

    async fn task_exec_wait(
        &self,
        request: Request<TaskExecWaitRequest>,
    ) -> Result<Response<TaskExecWaitResponse>, Status> {
        let task_id = request.get_ref().task_id.clone();
        self.admit_router(
            request.metadata(),
            "TaskExecWait",
            Route::TaskExecWait,
            &task_id,
        )?;
        let req = request.into_inner();
        let (_, _, mut exit, _) = self.exec_parts(&req.task_id, &req.exec_id)?;
        let status = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("exec state lost"))?
            .unwrap_or(Ok(-1));
        Ok(Response::new(TaskExecWaitResponse {
            exit_status: exit_response(status),
        }))
    }

    async fn task_exec_poll(
        &self,
        request: Request<TaskExecPollRequest>,
    ) -> Result<Response<TaskExecPollResponse>, Status> {
        let task_id = request.get_ref().task_id.clone();
        self.admit_router(
            request.metadata(),
            "TaskExecPoll",
            Route::TaskExecPoll,
            &task_id,
        )?;
        let req = request.into_inner();
        let (_, _, exit, _) = self.exec_parts(&req.task_id, &req.exec_id)?;
        let status = *exit.borrow();
        Ok(Response::new(TaskExecPollResponse {
            exit_status: status.map(|s| match s {
                Ok(code) => task_exec_poll_response::ExitStatus::Code(code),
                Err(signal) => task_exec_poll_response::ExitStatus::Signal(signal),
            }),
        }))
    }
}
