//! Commands through the per-task command router (spec 25 §4.7–4.8):
//! `TaskExecStart` with piped stdio, offset-resumable `TaskExecStdioRead`
//! streams, `TaskExecStdinWrite` and `TaskExecWait`, under one deadline.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use paperclip_env_core::{Error, OutputCollector, Result};
use paperclip_env_modal_proto::api::{
    ContainerExecGetOutputRequest, ContainerExecPutInputRequest, ContainerExecRequest,
    ContainerExecWaitRequest, ExecOutputOption, FileDescriptor, RuntimeInputMessage,
    SandboxGetCommandRouterAccessRequest, TaskGetCommandRouterAccessRequest,
    sandbox_get_command_router_access_request,
};
use paperclip_env_modal_proto::router::task_command_router_client::TaskCommandRouterClient;
use paperclip_env_modal_proto::router::*;
use secrecy::SecretString;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use super::PROVIDER;
use super::client::{ControlPlane, jwt_expiry, map_status, retryable, secret_value};

/// Most bytes of argv Modal accepts (ARG_MAX).
const MAX_ARGV_BYTES: usize = 65_536;
/// Transient retries of router calls (spec 25 §4.7).
const ROUTER_RETRIES: u32 = 10;
/// Per-call deadline of `TaskExecWait`; it is repeated until the exec deadline.
const WAIT_CALL: Duration = Duration::from_secs(60);

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// The exec deadline passed first.
    TimedOut,
}

/// Which sandbox a router belongs to: V1 sandboxes get router access by
/// task (`TaskGetCommandRouterAccess`), V2 sandboxes by sandbox id
/// (`SandboxGetCommandRouterAccess`), as the JS SDK does.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) task_id: String,
    pub(crate) sandbox_id: String,
    pub(crate) v2: bool,
}

/// A router JWT and when it expires (its unverified `exp`).
struct Jwt {
    token: SecretString,
    expires_at: Option<SystemTime>,
}

impl Jwt {
    fn new(token: SecretString) -> Self {
        let expires_at = jwt_expiry(secrecy::ExposeSecret::expose_secret(&token));
        Jwt { token, expires_at }
    }

    /// Whether a refresh can help: the JWT expires within 30 s (or has no `exp`).
    fn near_expiry(&self) -> bool {
        self.expires_at
            .is_none_or(|exp| exp <= SystemTime::now() + Duration::from_secs(30))
    }
}

/// A connection to one task's command router.
pub(crate) struct Router {
    client: TaskCommandRouterClient<Channel>,
    target: Target,
    task_id: String,
    url: String,
    jwt: Mutex<Jwt>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("task_id", &self.task_id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Router access → `(jwt, url)`; `None` when the task has no command router
/// (`FAILED_PRECONDITION`).
async fn access(cp: &ControlPlane, target: &Target) -> Result<Option<(SecretString, String)>> {
    let (rpc, answer) = if target.v2 {
        let request = SandboxGetCommandRouterAccessRequest {
            target: Some(
                sandbox_get_command_router_access_request::Target::SandboxId(
                    target.sandbox_id.clone(),
                ),
            ),
        };
        let rpc = "SandboxGetCommandRouterAccess";
        let answer = cp
            .call_status(rpc, request, true, |mut c, r| async move {
                c.sandbox_get_command_router_access(r).await
            })
            .await?
            .map(|r| (r.jwt, r.url));
        (rpc, answer)
    } else {
        let request = TaskGetCommandRouterAccessRequest {
            task_id: target.task_id.clone(),
        };
        let rpc = "TaskGetCommandRouterAccess";
        let answer = cp
            .call_status(rpc, request, true, |mut c, r| async move {
                c.task_get_command_router_access(r).await
            })
            .await?
            .map(|r| (r.jwt, r.url));
        (rpc, answer)
    };
    match answer {
        Ok((jwt, url)) => Ok(Some((SecretString::from(jwt), url))),
        Err(status) if status.code() == Code::FailedPrecondition => Ok(None),
        Err(status) => Err(map_status(rpc, &status, |m| cp.scrub(m))),
    }
}

fn check_argv(argv: &[String]) -> Result<()> {
    let total: usize = argv.iter().map(String::len).sum();
    if total > MAX_ARGV_BYTES {
        return Err(Error::InvalidInput {
            what: "command",
            message: format!(
                "Total length of CMD arguments must be less than {MAX_ARGV_BYTES} bytes (ARG_MAX). Got {total} bytes."
            ),
        });
    }
    Ok(())
}

/// How commands reach a task: its command router, or the legacy exec calls
/// when the router is not enabled.
#[derive(Debug)]
pub(crate) enum Executor {
    /// The per-task command router.
    Router(Box<Router>),
    /// `ContainerExec` and friends on the control plane.
    Legacy(Legacy),
}

impl Executor {
    /// Connects to the task's router, falling back to legacy exec.
    pub(crate) async fn open(cp: &ControlPlane, target: Target) -> Result<Self> {
        let task_id = target.task_id.clone();
        let task_id = task_id.as_str();
        match access(cp, &target).await? {
            Some((jwt, url)) => Router::open(cp, target, jwt, url)
                .await
                .map(|r| Executor::Router(Box::new(r))),
            None => {
                debug!(
                    provider = PROVIDER,
                    task_id, "command router not enabled; using legacy exec"
                );
                Ok(Executor::Legacy(Legacy {
                    task_id: task_id.to_owned(),
                }))
            }
        }
    }

    /// Runs `argv`; see [`Router::exec`].
    pub(crate) async fn exec(
        &self,
        cp: &ControlPlane,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &OutputCollector,
    ) -> Result<Ended> {
        check_argv(&argv)?;
        match self {
            Executor::Router(router) => router.exec(cp, argv, stdin, timeout, output).await,
            Executor::Legacy(legacy) => legacy.exec(cp, argv, stdin, timeout, output).await,
        }
    }
}

impl Router {
    /// Opens the router of `task_id`. The URL must be `https:`; it is dialled
    /// without TLS only when the control plane itself is on loopback (an emulator).
    async fn open(
        cp: &ControlPlane,
        target: Target,
        jwt: SecretString,
        url: String,
    ) -> Result<Self> {
        let Some(authority) = url.strip_prefix("https://") else {
            return Err(Error::provider(
                PROVIDER,
                format!("Task router URL must be https, got: {url}"),
            ));
        };
        let authority = authority.split('/').next().unwrap_or(authority);
        let dial = if cp.local {
            format!("http://{authority}")
        } else if authority.contains(':') {
            format!("https://{authority}")
        } else {
            format!("https://{authority}:443")
        };
        let channel = super::channel(&dial, cp.call_timeout)?;
        Ok(Router {
            client: TaskCommandRouterClient::new(channel)
                .max_decoding_message_size(100 * 1024 * 1024)
                .max_encoding_message_size(100 * 1024 * 1024),
            task_id: target.task_id.clone(),
            target,
            url,
            jwt: Mutex::new(Jwt::new(jwt)),
        })
    }

    fn request<T>(&self, message: T) -> Result<Request<T>> {
        let jwt = self
            .jwt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .token
            .clone();
        let bearer = SecretString::from(format!(
            "Bearer {}",
            secrecy::ExposeSecret::expose_secret(&jwt)
        ));
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", secret_value(&bearer, "routerToken")?);
        Ok(request)
    }

    /// After `UNAUTHENTICATED`: fetches a fresh JWT unless the current one is
    /// still far from expiry (another caller refreshed it, or the refusal had
    /// another cause; the call is then simply repeated once). A changed
    /// router URL is logged; the connection in use stays.
    async fn refresh(&self, cp: &ControlPlane) -> Result<()> {
        if !self
            .jwt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .near_expiry()
        {
            debug!(provider = PROVIDER, task_id = %self.task_id, "router JWT far from expiry; not refreshing");
            return Ok(());
        }
        let (jwt, url) = access(cp, &self.target).await?.ok_or_else(|| {
            Error::provider(
                PROVIDER,
                "Command router access is not available for this sandbox",
            )
        })?;
        if url != self.url {
            warn!(provider = PROVIDER, task_id = %self.task_id, "Task router URL changed during session");
        }
        *self.jwt.lock().unwrap_or_else(|p| p.into_inner()) = Jwt::new(jwt);
        Ok(())
    }

    /// A unary router call: one JWT refresh on `UNAUTHENTICATED`; with
    /// `transient_retries`, transient codes are retried (10 ms × 2 back-off).
    async fn unary<Req, Resp, F, Fut>(
        &self,
        cp: &ControlPlane,
        rpc: &'static str,
        message: Req,
        transient_retries: bool,
        per_call: Option<Duration>,
        f: F,
    ) -> std::result::Result<Resp, RouterFailure>
    where
        Req: Clone,
        F: Fn(TaskCommandRouterClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let mut refreshed = false;
        let mut retries = 0u32;
        loop {
            let mut request = self.request(message.clone()).map_err(RouterFailure::Sdk)?;
            if let Some(d) = per_call {
                request.set_timeout(d);
            }
            let outcome = match per_call {
                Some(d) => match tokio::time::timeout(
                    d + Duration::from_secs(1),
                    f(self.client.clone(), request),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded("client deadline elapsed")),
                },
                None => f(self.client.clone(), request).await,
            };
            let status = match outcome {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if status.code() == Code::Unauthenticated && !refreshed {
                refreshed = true;
                self.refresh(cp).await.map_err(RouterFailure::Sdk)?;
                continue;
            }
            if transient_retries && retryable(status.code()) && retries < ROUTER_RETRIES {
                tokio::time::sleep(Duration::from_millis(10 * 2u64.pow(retries))).await;
                retries += 1;
                continue;
            }
            return Err(RouterFailure::Status(rpc, status));
        }
    }

    /// Reads one stdio stream to its end, resuming at the current offset after
    /// transient failures; every chunk goes to `sink`.
    async fn read_stdio(
        &self,
        cp: &ControlPlane,
        exec_id: &str,
        fd: TaskExecStdioFileDescriptor,
        sink: impl Fn(&[u8]),
    ) -> std::result::Result<(), RouterFailure> {
        let mut offset = 0u64;
        let mut retries = 0u32;
        let mut refreshed = false;
        loop {
            let message = TaskExecStdioReadRequest {
                task_id: self.task_id.clone(),
                exec_id: exec_id.to_owned(),
                offset,
                file_descriptor: fd as i32,
            };
            let request = self.request(message).map_err(RouterFailure::Sdk)?;
            let status = match self.client.clone().task_exec_stdio_read(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(chunk)) => {
                                offset += chunk.data.len() as u64;
                                if !chunk.data.is_empty() {
                                    retries = 0;
                                    refreshed = false;
                                    sink(&chunk.data);
                                }
                            }
                            Ok(None) => return Ok(()),
                            Err(status) => break status,
                        }
                    }
                }
                Err(status) => status,
            };
            if status.code() == Code::Unauthenticated && !refreshed {
                refreshed = true;
                self.refresh(cp).await.map_err(RouterFailure::Sdk)?;
                continue;
            }
            if retryable(status.code()) && retries < ROUTER_RETRIES {
                debug!(provider = PROVIDER, exec_id, offset, code = ?status.code(), "reopening stdio stream");
                tokio::time::sleep(Duration::from_millis(10 * 2u64.pow(retries))).await;
                retries += 1;
                continue;
            }
            return Err(RouterFailure::Status("TaskExecStdioRead", status));
        }
    }

    /// Runs `argv` with piped stdio; output goes to `output` as it arrives.
    /// `stdin` (possibly empty) is written and closed; without it stdin is
    /// closed at once. Returns how the command ended.
    async fn exec(
        &self,
        cp: &ControlPlane,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &OutputCollector,
    ) -> Result<Ended> {
        let secs = timeout.as_secs().max(1);
        let exec_id = uuid::Uuid::new_v4().to_string();
        let start = TaskExecStartRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.clone(),
            command_args: argv,
            stdout_config: TaskExecStdoutConfig::Pipe as i32,
            stderr_config: TaskExecStderrConfig::Pipe as i32,
            timeout_secs: Some(secs.min(u64::from(u32::MAX)) as u32),
            ..Default::default()
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        // Retried on transient errors with the same exec id (as the JS SDK):
        // the router starts an exec id once, so a lost answer never runs the
        // command twice.
        self.unary(
            cp,
            "TaskExecStart",
            start,
            true,
            Some(cp.call_timeout),
            |mut c, r| async move { c.task_exec_start(r).await },
        )
        .await
        .map_err(|f| f.into_error(cp))?;

        let work = async {
            let stdin_done = self.write_stdin(cp, &exec_id, stdin.unwrap_or_default());
            let out = self.read_stdio(cp, &exec_id, TaskExecStdioFileDescriptor::Stdout, |d| {
                output.stdout(d)
            });
            let err = self.read_stdio(cp, &exec_id, TaskExecStdioFileDescriptor::Stderr, |d| {
                output.stderr(d)
            });
            let wait = self.wait(cp, &exec_id, deadline);
            let (stdin_done, out, err, ended) = tokio::join!(stdin_done, out, err, wait);
            // The command has ended here; a refused stdin write (e.g. to a
            // command that exited before reading) does not change its result.
            if let Err(failure) = stdin_done {
                let error = failure.into_error(cp);
                warn!(provider = PROVIDER, exec_id = %exec_id, %error, "writing stdin failed; the command ended anyway");
            }
            out?;
            err?;
            ended
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(Ended::Signal(_))) if started.elapsed() >= Duration::from_secs(secs) => {
                Ok(Ended::TimedOut)
            }
            Ok(Ok(ended)) => Ok(ended),
            Ok(Err(failure)) => Err(failure.into_error(cp)),
            Err(_) => Ok(Ended::TimedOut),
        }
    }

    async fn write_stdin(
        &self,
        cp: &ControlPlane,
        exec_id: &str,
        data: &[u8],
    ) -> std::result::Result<(), RouterFailure> {
        let mut message = TaskExecStdinWriteRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
            offset: 0,
            data: data.to_vec(),
            eof: false,
        };
        if !data.is_empty() {
            self.unary(
                cp,
                "TaskExecStdinWrite",
                message.clone(),
                true,
                Some(cp.call_timeout),
                |mut c, r| async move { c.task_exec_stdin_write(r).await },
            )
            .await?;
        }
        message.offset = data.len() as u64;
        message.data = Vec::new();
        message.eof = true;
        self.unary(
            cp,
            "TaskExecStdinWrite",
            message,
            true,
            Some(cp.call_timeout),
            |mut c, r| async move { c.task_exec_stdin_write(r).await },
        )
        .await?;
        Ok(())
    }

    async fn wait(
        &self,
        cp: &ControlPlane,
        exec_id: &str,
        deadline: Instant,
    ) -> std::result::Result<Ended, RouterFailure> {
        let message = TaskExecWaitRequest {
            task_id: self.task_id.clone(),
            exec_id: exec_id.to_owned(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Ended::TimedOut);
            }
            let per_call = left.min(WAIT_CALL);
            match self
                .unary(
                    cp,
                    "TaskExecWait",
                    message.clone(),
                    false,
                    Some(per_call),
                    |mut c, r| async move { c.task_exec_wait(r).await },
                )
                .await
            {
                Ok(response) => {
                    return match response.exit_status {
                        Some(task_exec_wait_response::ExitStatus::Code(code)) => {
                            Ok(Ended::Code(code))
                        }
                        Some(task_exec_wait_response::ExitStatus::Signal(signal)) => {
                            Ok(Ended::Signal(signal))
                        }
                        None => Err(RouterFailure::Sdk(Error::provider(
                            PROVIDER,
                            "Unexpected exit status",
                        ))),
                    };
                }
                Err(RouterFailure::Status(_, status)) if retryable(status.code()) => {
                    let pause = Duration::from_secs(1)
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                }
                Err(other) => return Err(other),
            }
        }
    }
}

/// A router failure: a gRPC status (mapped with the control plane's scrubber) or an SDK error.
pub(crate) enum RouterFailure {
    Status(&'static str, Status),
    Sdk(Error),
}

impl RouterFailure {
    fn into_error(self, cp: &ControlPlane) -> Error {
        match self {
            RouterFailure::Status(rpc, status) => map_status(rpc, &status, |m| cp.scrub(m)),
            RouterFailure::Sdk(error) => error,
        }
    }
}

/// Legacy exec (spec 25 §4.10): `ContainerExec`, per-fd
/// `ContainerExecGetOutput` resumed by batch index, `ContainerExecPutInput`
/// and `ContainerExecWait`. Signals arrive as `128 + n` exit codes.
#[derive(Debug)]
pub(crate) struct Legacy {
    task_id: String,
}

impl Legacy {
    async fn exec(
        &self,
        cp: &ControlPlane,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &OutputCollector,
    ) -> Result<Ended> {
        let secs = timeout.as_secs().max(1);
        let request = ContainerExecRequest {
            task_id: self.task_id.clone(),
            command: argv,
            stdout_output: ExecOutputOption::Pipe as i32,
            stderr_output: ExecOutputOption::Pipe as i32,
            timeout_secs: secs.min(u64::from(u32::MAX)) as u32,
            ..Default::default()
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        // Never repeated: the command may have started.
        let exec_id = cp
            .call("ContainerExec", request, false, |mut c, r| async move {
                c.container_exec(r).await
            })
            .await?
            .exec_id;
        let work = async {
            let input = self.put_input(cp, &exec_id, stdin.unwrap_or_default());
            let out = self.read_output(cp, &exec_id, FileDescriptor::Stdout, |d| output.stdout(d));
            let err = self.read_output(cp, &exec_id, FileDescriptor::Stderr, |d| output.stderr(d));
            let wait = self.wait(cp, &exec_id, deadline);
            let (input, out, err, code) = tokio::join!(input, out, err, wait);
            if let Err(error) = input {
                warn!(provider = PROVIDER, exec_id = %exec_id, %error, "writing stdin failed; the command ended anyway");
            }
            out?;
            err?;
            code
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(Some(code))) if code > 128 && started.elapsed() >= Duration::from_secs(secs) => {
                Ok(Ended::TimedOut)
            }
            Ok(Ok(Some(code))) => Ok(Ended::Code(code)),
            Ok(Ok(None)) | Err(_) => Ok(Ended::TimedOut),
            Ok(Err(error)) => Err(error),
        }
    }

    async fn put_input(&self, cp: &ControlPlane, exec_id: &str, data: &[u8]) -> Result<()> {
        let mut index = 0u64;
        let mut send = async |message: Vec<u8>, eof: bool| {
            index += 1;
            let request = ContainerExecPutInputRequest {
                exec_id: exec_id.to_owned(),
                input: Some(RuntimeInputMessage {
                    message,
                    message_index: index,
                    eof,
                }),
            };
            cp.call(
                "ContainerExecPutInput",
                request,
                true,
                |mut c, r| async move { c.container_exec_put_input(r).await },
            )
            .await
            .map(|_| ())
        };
        if !data.is_empty() {
            send(data.to_vec(), false).await?;
        }
        send(Vec::new(), true).await
    }

    async fn read_output(
        &self,
        cp: &ControlPlane,
        exec_id: &str,
        fd: FileDescriptor,
        sink: impl Fn(&[u8]),
    ) -> Result<()> {
        let mut last_batch_index = 0u64;
        let mut errors = 0u32;
        loop {
            let (mut client, request) = cp
                .streaming_request(ContainerExecGetOutputRequest {
                    exec_id: exec_id.to_owned(),
                    timeout: 55.0,
                    last_batch_index,
                    file_descriptor: fd as i32,
                    get_raw_bytes: true,
                })
                .await?;
            let failure = match client.container_exec_get_output(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(batch)) => {
                                for item in &batch.items {
                                    if item.message_bytes.is_empty() {
                                        sink(item.message.as_bytes());
                                    } else {
                                        sink(&item.message_bytes);
                                    }
                                }
                                last_batch_index = batch.batch_index;
                                errors = 0;
                                if batch.exit_code.is_some() {
                                    return Ok(());
                                }
                            }
                            // The long-poll ended: reopen from the last batch.
                            Ok(None) => break None,
                            Err(status) => break Some(status),
                        }
                    }
                }
                Err(status) => Some(status),
            };
            if let Some(status) = failure {
                if !retryable(status.code()) || errors >= ROUTER_RETRIES {
                    return Err(map_status("ContainerExecGetOutput", &status, |m| {
                        cp.scrub(m)
                    }));
                }
                tokio::time::sleep(Duration::from_millis(10 * 2u64.pow(errors))).await;
                errors += 1;
            }
        }
    }

    /// The exit code, or `None` when the deadline passed first.
    async fn wait(
        &self,
        cp: &ControlPlane,
        exec_id: &str,
        deadline: Instant,
    ) -> Result<Option<i32>> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // The server long-polls for `timeout`; stay inside the call deadline.
            let poll = left.min(Duration::from_secs(55)).min(cp.call_timeout / 2);
            let request = ContainerExecWaitRequest {
                exec_id: exec_id.to_owned(),
                timeout: poll.as_secs_f32(),
            };
            let response = cp
                .call("ContainerExecWait", request, true, |mut c, r| async move {
                    c.container_exec_wait(r).await
                })
                .await?;
            if response.completed {
                return Ok(Some(response.exit_code.unwrap_or(0)));
            }
        }
    }
}
