//! The in-sandbox daemon (envd): HTTP file API and Connect-RPC process API
//! (spec 20 §5.5–§5.7).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use paperclip_env_core::{CommandExit, Error, OutputCollector, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::api::sensitive;
use super::connect::{Decoder, Frame, encode};
use crate::http::{HttpClient, RequestSpec, RetryPolicy};

/// envd's port inside the sandbox.
pub(crate) const ENVD_PORT: u16 = 49983;

/// Where envd requests go and how they are authenticated.
pub(crate) struct Envd<'a> {
    pub http: &'a HttpClient,
    pub base: String,
    pub sandbox_id: String,
    headers: HeaderMap,
    pub request_timeout: Duration,
    pub keepalive_secs: u64,
    pub grace: Duration,
    /// Right after create the edge may answer 502 for a live sandbox: retry it.
    pub fresh: bool,
}

/// What an [`Envd`] needs beyond the client.
pub(crate) struct EnvdTarget<'a> {
    pub base: String,
    pub sandbox_id: &'a str,
    pub token: Option<&'a SecretString>,
    pub routing_headers: (&'static str, &'static str),
    pub request_timeout: Duration,
    pub keepalive_secs: u64,
    pub fresh: bool,
}

#[derive(Deserialize, Default)]
struct StartResponse {
    #[serde(default)]
    event: Option<ProcessEvent>,
}

#[derive(Deserialize, Default)]
struct ProcessEvent {
    #[serde(default)]
    start: Option<StartEvent>,
    #[serde(default)]
    data: Option<DataEvent>,
    #[serde(default)]
    end: Option<EndEvent>,
}

#[derive(Deserialize, Default)]
struct StartEvent {
    #[serde(default)]
    pid: Option<u32>,
}

#[derive(Deserialize, Default)]
struct DataEvent {
    #[serde(default)]
    stdout: Option<String>,
    #[serde(default)]
    stderr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct EndEvent {
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize, Default)]
struct EndOfStream {
    #[serde(default)]
    error: Option<ConnectError>,
}

#[derive(Deserialize, Default, Debug)]
struct ConnectError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: Option<String>,
}

/// A command for envd's `Process/Start`.
pub(crate) struct Run<'a> {
    pub cmd: &'a str,
    pub args: Vec<String>,
    pub cwd: Option<&'a str>,
    /// Command timeout; `None` or 0: none.
    pub timeout_ms: Option<u64>,
}

fn signal_from_status(status: &str) -> Option<String> {
    let name = status.strip_prefix("signal: ")?.trim();
    Some(
        match name {
            "killed" => "SIGKILL",
            "terminated" => "SIGTERM",
            "interrupt" => "SIGINT",
            "hangup" => "SIGHUP",
            "aborted" => "SIGABRT",
            "segmentation fault" => "SIGSEGV",
            "broken pipe" => "SIGPIPE",
            "quit" => "SIGQUIT",
            other => return Some(format!("SIG{}", other.to_ascii_uppercase())),
        }
        .to_owned(),
    )
}

/// Tracks whether stderr ended with a newline, for the timeout message rule.
struct StderrTail {
    any: bool,
    newline: bool,
}

impl<'a> Envd<'a> {
    pub fn new(http: &'a HttpClient, target: EnvdTarget<'_>) -> Result<Self> {
        let mut headers = HeaderMap::new();
        let id = HeaderValue::from_str(target.sandbox_id)
            .map_err(|_| Error::not_found(format!("{}: invalid sandbox id", http.provider())))?;
        headers.insert(HeaderName::from_static(target.routing_headers.0), id);
        headers.insert(
            HeaderName::from_static(target.routing_headers.1),
            HeaderValue::from(ENVD_PORT),
        );
        if let Some(token) = target.token {
            headers.insert(
                HeaderName::from_static("x-access-token"),
                sensitive(token, "envdAccessToken")?,
            );
        }
        Ok(Envd {
            http,
            base: target.base,
            sandbox_id: target.sandbox_id.to_owned(),
            headers,
            request_timeout: target.request_timeout,
            keepalive_secs: target.keepalive_secs,
            grace: Duration::from_secs(2),
            fresh: target.fresh,
        })
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        client
            .request(method, format!("{}{path}", self.base.trim_end_matches('/')))
            .headers(self.headers.clone())
    }

    fn post_create_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: if self.fresh { 4 } else { 0 },
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_millis(1600),
            ..RetryPolicy::default()
        }
    }

    /// Starting a command is not idempotent, so only answers that provably
    /// started nothing are retried: a 429 (honouring `Retry-After`) on any
    /// lease, and right after create the edge's routing-gap 502.
    fn start_retry(&self) -> RetryPolicy {
        if self.fresh {
            self.post_create_retry()
        } else {
            self.http.options().retry
        }
    }

    /// The edge answers 502 for sandboxes it does not know (spec 20 §5.8).
    fn edge_gone(&self, error: Error) -> Error {
        match error {
            Error::Provider { ref message, .. } if message.contains("HTTP 502") => self.gone(),
            other => other,
        }
    }

    fn gone(&self) -> Error {
        Error::not_found(format!(
            "{}: sandbox {} is not running anymore (the sandbox was not found)",
            self.http.provider(),
            self.sandbox_id
        ))
    }

    /// `GET /health` status, `None` when unreachable.
    pub async fn health(&self) -> Option<u16> {
        let request = self.request(self.http.reqwest(), reqwest::Method::GET, "/health");
        match tokio::time::timeout(Duration::from_secs(5), request.send()).await {
            Ok(Ok(response)) => Some(response.status().as_u16()),
            _ => None,
        }
    }

    /// Writes a file (multipart, parent dirs created, overwritten).
    pub async fn upload(&self, path: &str, data: &[u8]) -> Result<()> {
        let data = data.to_vec();
        let response = self
            .http
            .send(
                RequestSpec::idempotent("upload file")
                    .timeout(self.request_timeout)
                    .retry_statuses(&[502])
                    .retry(self.post_create_retry()),
                |c| {
                    let part =
                        reqwest::multipart::Part::bytes(data.clone()).file_name(path.to_owned());
                    self.request(c, reqwest::Method::POST, "/files")
                        .query(&[("path", path)])
                        .multipart(reqwest::multipart::Form::new().part("file", part))
                },
            )
            .await;
        response.map(|_| ()).map_err(|e| self.edge_gone(e))
    }

    /// Streams a remote file into `local`.
    pub async fn download_to(&self, path: &str, local: &std::path::Path) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let response = self
            .http
            .send(
                RequestSpec::idempotent("download file")
                    .stream()
                    .timeout(self.request_timeout),
                |c| {
                    self.request(c, reqwest::Method::GET, "/files")
                        .query(&[("path", path)])
                },
            )
            .await
            .map_err(|e| self.edge_gone(e))?;
        let io = |e: std::io::Error| {
            Error::provider_with_source(
                self.http.provider(),
                format!("writing {} failed", local.display()),
                false,
                e,
            )
        };
        let mut file = tokio::fs::File::create(local).await.map_err(io)?;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Error::provider_with_source(
                    self.http.provider(),
                    "the file download was interrupted",
                    true,
                    e,
                )
            })?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)
    }

    /// Removes a path; errors are returned for the caller to ignore or not.
    pub async fn remove(&self, path: &str) -> Result<()> {
        let body = json!({"path": path});
        self.http
            .send(
                RequestSpec::idempotent("remove file")
                    .timeout(self.request_timeout)
                    .accept(&[404]),
                |c| {
                    self.request(c, reqwest::Method::POST, "/filesystem.Filesystem/Remove")
                        .header("Connect-Protocol-Version", "1")
                        .json(&body)
                },
            )
            .await
            .map(|_| ())
    }

    async fn kill_process(&self, pid: u32) {
        let body = json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"});
        let result = self
            .http
            .send(
                RequestSpec::idempotent("send signal").timeout(Duration::from_secs(5)),
                |c| {
                    self.request(c, reqwest::Method::POST, "/process.Process/SendSignal")
                        .header("Connect-Protocol-Version", "1")
                        .json(&body)
                },
            )
            .await;
        if let Err(error) = result {
            warn!(pid, %error, "killing the timed-out process failed");
        }
    }

    /// Runs a command through `Process/Start`, streaming output into `output`.
    pub async fn run(&self, run: Run<'_>, output: &OutputCollector) -> Result<CommandExit> {
        let timeout_ms = run.timeout_ms.filter(|t| *t > 0);
        let mut process = json!({"cmd": run.cmd, "args": run.args, "envs": {}});
        if let Some(cwd) = run.cwd {
            process["cwd"] = json!(cwd);
        }
        let body = encode(
            0,
            json!({"process": process, "stdin": false})
                .to_string()
                .as_bytes(),
        );
        let response = self
            .http
            .send(
                RequestSpec::not_idempotent("start command")
                    .stream()
                    .timeout(self.request_timeout)
                    .retry_statuses(if self.fresh { &[502] } else { &[] })
                    .retry(self.start_retry()),
                |c| {
                    let mut r = self
                        .request(c, reqwest::Method::POST, "/process.Process/Start")
                        .header("Content-Type", "application/connect+json")
                        .header("Connect-Protocol-Version", "1")
                        .header("Keepalive-Ping-Interval", self.keepalive_secs.to_string())
                        .body(body.clone());
                    if let Some(ms) = timeout_ms {
                        r = r.header("Connect-Timeout-Ms", HeaderValue::from(ms));
                    }
                    r
                },
            )
            .await
            .map_err(|e| self.edge_gone(e))?;

        let mut state = StreamState {
            pid: None,
            command_deadline: None,
            end: None,
            tail: StderrTail {
                any: false,
                newline: false,
            },
        };
        let mut response = response;
        let mut reattached = 0;
        let outcome = loop {
            let outcome = self
                .consume(response, &mut state, output, timeout_ms)
                .await?;
            // envd keeps a process running when its stream drops: attach
            // to it again with `Process/Connect` while the sandbox is up.
            let (Err(Interrupted::Dropped(reason)), Some(pid)) = (&outcome, state.pid) else {
                break outcome;
            };
            if reattached >= MAX_REATTACH || !matches!(self.health().await, Some(200..=299)) {
                break outcome;
            }
            reattached += 1;
            debug!(pid, %reason, attempt = reattached, "command stream dropped; reattaching");
            match self.attach(pid).await {
                Ok(next) => response = next,
                Err(error) => {
                    debug!(pid, %error, "reattaching failed");
                    break outcome;
                }
            }
        };
        let StreamState { pid, end, tail, .. } = state;

        let timed_out_exit = |output: &OutputCollector, tail: &StderrTail| {
            let message = format!(
                "command timed out after {} ms",
                timeout_ms.unwrap_or_default()
            );
            let text = if tail.any && !tail.newline {
                format!("\n{message}\n")
            } else {
                format!("{message}\n")
            };
            output.stderr(text.as_bytes());
            CommandExit {
                exit_code: None,
                signal: None,
                timed_out: true,
                metadata: None,
            }
        };

        match outcome {
            Ok(None) => {
                let end = end.unwrap_or_default();
                let signal = end.status.as_deref().and_then(signal_from_status);
                Ok(CommandExit {
                    exit_code: if signal.is_some() {
                        None
                    } else {
                        Some(end.exit_code.unwrap_or(0))
                    },
                    signal,
                    timed_out: false,
                    metadata: None,
                })
            }
            Ok(Some(error)) => match error.code.as_str() {
                "deadline_exceeded" | "canceled" => Ok(timed_out_exit(output, &tail)),
                "unavailable" if pid.is_none() => Err(self.gone()),
                "unavailable" => self.dropped(pid, error.message.unwrap_or_default()).await,
                "unauthenticated" => Err(Error::Unauthenticated {
                    message: format!("{}: envd rejected the access token", self.http.provider()),
                    source: None,
                }),
                "permission_denied" => Err(Error::PermissionDenied {
                    message: format!(
                        "{}: {}",
                        self.http.provider(),
                        error.message.unwrap_or_default()
                    ),
                    source: None,
                }),
                "not_found" => Err(Error::not_found(format!(
                    "{}: {}",
                    self.http.provider(),
                    error.message.unwrap_or_default()
                ))),
                "resource_exhausted" => Err(Error::RateLimited {
                    message: format!(
                        "{}: {}",
                        self.http.provider(),
                        error.message.unwrap_or_default()
                    ),
                    retry_after: None,
                }),
                "invalid_argument" => Err(Error::InvalidInput {
                    what: "command",
                    message: error.message.unwrap_or_default(),
                }),
                code => Err(Error::provider(
                    self.http.provider(),
                    format!(
                        "command failed ({code}): {}",
                        error.message.unwrap_or_default()
                    ),
                )),
            },
            Err(Interrupted::LocalDeadline) => {
                if let Some(pid) = pid {
                    self.kill_process(pid).await;
                }
                Ok(timed_out_exit(output, &tail))
            }
            Err(Interrupted::Dropped(reason)) => self.dropped(pid, reason).await,
        }
    }

    /// Reads one `Start`/`Connect` stream into `output` until it ends, breaks
    /// or a deadline passes.
    async fn consume(
        &self,
        response: reqwest::Response,
        state: &mut StreamState,
        output: &OutputCollector,
        timeout_ms: Option<u64>,
    ) -> Result<std::result::Result<Option<ConnectError>, Interrupted>> {
        let mut stream = response.bytes_stream();
        let mut decoder = Decoder::default();
        let handshake_deadline = Instant::now() + self.request_timeout;
        let idle_limit = Duration::from_secs(self.keepalive_secs.max(1) * 2);
        let mut last_bytes = Instant::now();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);

        let StreamState {
            pid,
            command_deadline,
            end,
            tail,
        } = state;
        let outcome: std::result::Result<Option<ConnectError>, Interrupted> = loop {
            let deadline = if pid.is_none() {
                handshake_deadline
            } else {
                command_deadline.unwrap_or(far).min(last_bytes + idle_limit)
            };
            tokio::select! {
                chunk = stream.next() => match chunk {
                    Some(Ok(bytes)) => {
                        last_bytes = Instant::now();
                        decoder.push(&bytes);
                        let mut finished = None;
                        loop {
                            let frame = match decoder.next_frame() {
                                Ok(Some(frame)) => frame,
                                Ok(None) => break,
                                Err(message) => return Err(Error::provider(self.http.provider(), format!("envd protocol error: {message}"))),
                            };
                            match frame {
                                Frame::Message(payload) => {
                                    let message: StartResponse = serde_json::from_slice(&payload).map_err(|e| {
                                        Error::provider(self.http.provider(), format!("envd protocol error: bad event ({e})"))
                                    })?;
                                    let Some(event) = message.event else { continue };
                                    if let Some(start) = event.start {
                                        // A reattached stream starts again; the command's deadline does not.
                                        if pid.is_none() {
                                            *command_deadline = timeout_ms.map(|t| Instant::now() + Duration::from_millis(t) + self.grace);
                                        }
                                        *pid = Some(start.pid.unwrap_or(0));
                                    } else if pid.is_none() {
                                        return Err(Error::provider(self.http.provider(), "envd protocol error: expected start event"));
                                    }
                                    if let Some(data) = event.data {
                                        if let Some(b) = data.stdout {
                                            output.stdout(&decode(&b, self.http.provider())?);
                                        }
                                        if let Some(b) = data.stderr {
                                            let bytes = decode(&b, self.http.provider())?;
                                            if !bytes.is_empty() {
                                                *tail = StderrTail { any: true, newline: bytes.ends_with(b"\n") };
                                            }
                                            output.stderr(&bytes);
                                        }
                                    }
                                    if let Some(e) = event.end {
                                        *end = Some(e);
                                    }
                                }
                                Frame::EndOfStream(payload) => {
                                    let eos: EndOfStream = serde_json::from_slice(&payload).unwrap_or_default();
                                    finished = Some(eos.error);
                                    break;
                                }
                            }
                        }
                        if let Some(error) = finished {
                            break Ok(error);
                        }
                    }
                    Some(Err(e)) => break Err(Interrupted::Dropped(e.to_string())),
                    None => break Err(Interrupted::Dropped(if decoder.pending() > 0 { "stream ended inside an envelope".into() } else { "stream ended without end-of-stream".into() })),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if pid.is_none() {
                        return Err(Error::Timeout { operation: format!("{} start command", self.http.provider()), after: self.request_timeout });
                    }
                    if command_deadline.is_some_and(|d| Instant::now() >= d) {
                        break Err(Interrupted::LocalDeadline);
                    }
                    break Err(Interrupted::Dropped(format!("no data or keepalive for {}s", idle_limit.as_secs())));
                }
            }
        };

        Ok(outcome)
    }

    /// `Process/Connect` to a running process (same event stream as Start).
    async fn attach(&self, pid: u32) -> Result<reqwest::Response> {
        let body = encode(0, json!({"process": {"pid": pid}}).to_string().as_bytes());
        self.http
            .send(
                RequestSpec::idempotent("reattach to command")
                    .stream()
                    .timeout(self.request_timeout),
                |c| {
                    self.request(c, reqwest::Method::POST, "/process.Process/Connect")
                        .header("Content-Type", "application/connect+json")
                        .header("Connect-Protocol-Version", "1")
                        .header("Keepalive-Ping-Interval", self.keepalive_secs.to_string())
                        .body(body.clone())
                },
            )
            .await
    }

    /// A stream that broke mid-command: the sandbox is gone, or the transport failed.
    async fn dropped(&self, pid: Option<u32>, reason: String) -> Result<CommandExit> {
        match self.health().await {
            Some(502) => Err(self.gone()),
            status => {
                debug!(?status, ?pid, %reason, "command stream dropped");
                Err(Error::Provider {
                    provider: self.http.provider().to_owned(),
                    message: format!(
                        "the command stream was interrupted ({reason}); the command may still be running"
                    ),
                    retryable: true,
                    source: None,
                })
            }
        }
    }
}

enum Interrupted {
    LocalDeadline,
    Dropped(String),
}

/// Reattaches to a command after a dropped stream, at most this often.
const MAX_REATTACH: u32 = 3;

/// What one command's streams have told so far.
struct StreamState {
    pid: Option<u32>,
    command_deadline: Option<Instant>,
    end: Option<EndEvent>,
    tail: StderrTail,
}

fn decode(b64: &str, provider: &str) -> Result<Vec<u8>> {
    B64.decode(b64).map_err(|e| {
        Error::provider(
            provider,
            format!("envd protocol error: bad base64 output ({e})"),
        )
    })
}

/// Helper for simple commands whose output the provider parses.
pub(crate) async fn run_captured(
    envd: &Envd<'_>,
    script: &str,
    cwd: Option<&str>,
    timeout_ms: u64,
) -> Result<(i32, String, String)> {
    let output = OutputCollector::buffered();
    let exit = envd
        .run(
            Run {
                cmd: "/bin/bash",
                args: vec!["-l".into(), "-c".into(), script.to_owned()],
                cwd,
                timeout_ms: Some(timeout_ms),
            },
            &output,
        )
        .await?;
    let result = output.finish(exit);
    if result.timed_out {
        return Err(Error::Timeout {
            operation: format!("{} helper command", envd.http.provider()),
            after: Duration::from_millis(timeout_ms),
        });
    }
    Ok((result.exit_code.unwrap_or(-1), result.stdout, result.stderr))
}
