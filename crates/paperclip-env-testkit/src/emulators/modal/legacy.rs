//! The legacy exec family on the control plane (`ContainerExec`,
//! `ContainerExecGetOutput`, `ContainerExecPutInput`, `ContainerExecWait`),
//! served from the same process machinery as the router. A batch index is
//! the byte offset after the batch, so `last_batch_index` resumes exactly.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use paperclip_env_modal_proto::api::*;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tonic::Status;

use super::router::{ExitRx, Pipe, SpawnSpec, StderrMode, spawn_exec};
use super::{Fault, Service, lock};

pub(crate) type OutputStream =
    Pin<Box<dyn Stream<Item = Result<RuntimeOutputBatch, Status>> + Send>>;

/// Legacy exit codes: signals become `128 + n`.
fn exit_code(exit: Result<i32, i32>) -> i32 {
    match exit {
        Ok(code) => code,
        Err(signal) => 128 + signal,
    }
}

impl Service {
    fn legacy_parts(&self, exec_id: &str) -> Result<(Arc<Pipe>, Arc<Pipe>, ExitRx), Status> {
        let sandboxes = lock(&self.shared.sandboxes);
        let exec = sandboxes
            .values()
            .find_map(|s| s.execs.get(exec_id))
            .ok_or_else(|| Status::not_found(format!("Exec {exec_id} not found")))?;
        Ok((exec.stdout.clone(), exec.stderr.clone(), exec.exit.clone()))
    }

    pub(crate) fn legacy_exec(
        &self,
        req: ContainerExecRequest,
    ) -> Result<ContainerExecResponse, Status> {
        let exec_id = self.shared.next("ex");
        let mut sandboxes = lock(&self.shared.sandboxes);
        let sandbox = sandboxes
            .values_mut()
            .find(|s| s.task_id == req.task_id)
            .ok_or_else(|| Status::not_found(format!("Task {} not found", req.task_id)))?;
        sandbox.last_activity = Instant::now();
        let pipe = ExecOutputOption::Pipe as i32;
        let stderr = match ExecOutputOption::try_from(req.stderr_output) {
            Ok(ExecOutputOption::Pipe) => StderrMode::Pipe,
            Ok(ExecOutputOption::Stdout) => StderrMode::Stdout,
            _ => StderrMode::Null,
        };
        spawn_exec(
            sandbox,
            SpawnSpec {
                exec_id: exec_id.clone(),
                argv: req.command,
                workdir: req.workdir,
                stdout_pipe: req.stdout_output == pipe,
                stderr,
                timeout_secs: Some(req.timeout_secs).filter(|s| *s > 0),
                stdout_config: req.stdout_output,
                stderr_config: req.stderr_output,
            },
        )?;
        Ok(ContainerExecResponse { exec_id })
    }

    pub(crate) fn legacy_output(
        &self,
        req: ContainerExecGetOutputRequest,
        fault: Option<Fault>,
    ) -> Result<OutputStream, Status> {
        let (stdout, stderr, exit) = self.legacy_parts(&req.exec_id)?;
        let fd = req.file_descriptor;
        let pipe = if fd == FileDescriptor::Stderr as i32 {
            stderr
        } else {
            stdout
        };
        let budget = match fault {
            Some(Fault::EndStreamEarly(n)) => Some(n),
            _ => None,
        };
        let until = Instant::now()
            + Duration::from_secs_f32(if req.timeout > 0.0 {
                req.timeout.min(300.0)
            } else {
                55.0
            });
        let stream = futures::stream::unfold(
            (req.last_batch_index as usize, budget, false),
            move |(offset, budget, done)| {
                let (pipe, mut exit) = (pipe.clone(), exit.clone());
                async move {
                    if done || budget == Some(0) {
                        return None;
                    }
                    let max = budget.unwrap_or(4096).min(4096);
                    let read = tokio::time::timeout_at(until, pipe.read_from(offset, max)).await;
                    match read {
                        // The long-poll ran out: end the stream; the client reopens.
                        Err(_) => None,
                        Ok(Some(data)) => {
                            let next = offset + data.len();
                            let batch = RuntimeOutputBatch {
                                items: vec![RuntimeOutputMessage {
                                    file_descriptor: fd,
                                    message: String::new(),
                                    message_bytes: data,
                                }],
                                batch_index: next as u64,
                                exit_code: None,
                            };
                            let left = budget.map(|b| b.saturating_sub(next - offset));
                            Some((Ok(batch), (next, left, false)))
                        }
                        Ok(None) => {
                            let code = exit.wait_for(Option::is_some).await.ok().and_then(|e| *e);
                            let batch = RuntimeOutputBatch {
                                items: Vec::new(),
                                batch_index: offset as u64,
                                exit_code: Some(code.map(exit_code).unwrap_or(-1)),
                            };
                            Some((Ok(batch), (offset, budget, true)))
                        }
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    pub(crate) async fn legacy_input(
        &self,
        req: ContainerExecPutInputRequest,
    ) -> Result<(), Status> {
        let input = req.input.unwrap_or_default();
        let stdin = {
            let mut sandboxes = lock(&self.shared.sandboxes);
            let exec = sandboxes
                .values_mut()
                .find_map(|s| s.execs.get_mut(&req.exec_id))
                .ok_or_else(|| Status::not_found(format!("Exec {} not found", req.exec_id)))?;
            // Message indexes make retries idempotent.
            if input.message_index <= exec.input_index {
                return Ok(());
            }
            exec.input_index = input.message_index;
            exec.record.stdin_bytes += input.message.len();
            exec.record.stdin_closed |= input.eof;
            exec.stdin.clone()
        };
        let mut slot = stdin.lock().await;
        if let Some(pipe) = slot.as_mut() {
            let _ = pipe.write_all(&input.message).await;
            let _ = pipe.flush().await;
        }
        if input.eof {
            *slot = None;
        }
        Ok(())
    }

    pub(crate) async fn legacy_wait(
        &self,
        req: ContainerExecWaitRequest,
    ) -> Result<ContainerExecWaitResponse, Status> {
        let (_, _, mut exit) = self.legacy_parts(&req.exec_id)?;
        let limit = Duration::from_secs_f32(req.timeout.clamp(0.0, 300.0));
        match tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => Ok(ContainerExecWaitResponse {
                exit_code: (*done).map(exit_code),
                completed: true,
            }),
            Ok(Err(_)) => Err(Status::internal("exec state lost")),
            Err(_) => Ok(ContainerExecWaitResponse {
                exit_code: None,
                completed: false,
            }),
        }
    }
}
