//! envd's process service: `Start` and `Connect` server streams over real
//! local processes run as the sandbox user inside the sandbox root, plus
//! `List`, `SendInput`, `CloseStdin` and `SendSignal`.
//!
//! A process outlives the stream that started it (envd detaches it from the
//! request): its events go to a broadcast channel every attached stream
//! reads, so `Connect` reattaches after a dropped stream.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, mpsc};

use super::envd::{Target, connect_error, resolve, unary};
use super::{Fault, Sandbox, Shared};
use crate::emulators::sandbox_fs::pump;

/// A stream fault handed from the fault middleware to the stream handlers.
#[derive(Clone)]
pub(crate) struct StreamFault(pub Fault);

const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END: u8 = 0x02;

/// What a running process tells the streams attached to it.
#[derive(Clone, Debug)]
enum Event {
    Data(&'static str, Vec<u8>),
    End(Value),
    /// The `Connect-Timeout-Ms` of its Start elapsed; it was killed.
    Deadline,
}

/// One process of a sandbox.
pub(crate) struct ProcessEntry {
    pgid: i32,
    config: Value,
    tag: Option<String>,
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    events: broadcast::Sender<Event>,
}

pub(super) fn kill_all(sandbox: &Sandbox) {
    for entry in sandbox.processes.values() {
        let _ = killpg(Pid::from_raw(entry.pgid), Signal::SIGKILL);
    }
}

fn envelope(flags: u8, payload: &Value) -> Vec<u8> {
    let bytes = payload.to_string().into_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

/// The one enveloped JSON message of a streaming request.
fn stream_message(body: &[u8]) -> Result<Value, Response> {
    if body.len() < 5 || body[0] & FLAG_COMPRESSED != 0 {
        return Err(connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "expected one uncompressed envelope",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(payload) = body.get(5..5 + len) else {
        return Err(connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "truncated envelope",
        ));
    };
    serde_json::from_slice(payload).map_err(|e| {
        connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!("bad JSON: {e}"),
        )
    })
}

/// `exit status N` / `signal: killed`, as Go's `ProcessState.String()`.
fn end_event(status: &std::process::ExitStatus) -> Value {
    if let Some(code) = status.code() {
        let text = format!("exit status {code}");
        let mut end = json!({"exited": true, "status": text});
        if code != 0 {
            end["exitCode"] = json!(code);
            end["error"] = json!(text);
        }
        return end;
    }
    let name = match status.signal().unwrap_or(0) {
        9 => "killed",
        15 => "terminated",
        2 => "interrupt",
        1 => "hangup",
        6 => "aborted",
        11 => "segmentation fault",
        13 => "broken pipe",
        3 => "quit",
        _ => "unknown signal",
    };
    let text = format!("signal: {name}");
    json!({"exitCode": -1, "exited": false, "status": text, "error": text})
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_millis)
}

fn keepalive_of(shared: &Shared, headers: &HeaderMap) -> Option<Duration> {
    shared.keepalive.lock().ok().and_then(|k| *k).or_else(|| {
        headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

fn streaming_response() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, Response) {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let response = (
        StatusCode::OK,
        [("content-type", "application/connect+json")],
        body,
    )
        .into_response();
    (tx, response)
}

/// Feeds one attached stream: `start`, then the process's events, keepalives
/// while it is silent, and the end-of-stream envelope.
async fn stream_events(
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    pid: u32,
    mut events: broadcast::Receiver<Event>,
    keepalive: Option<Duration>,
    stream_deadline: Option<Duration>,
    fault: Option<Fault>,
) {
    // Every envelope goes out in two HTTP chunks, so clients must buffer.
    let send = |bytes: Vec<u8>| {
        let tx = tx.clone();
        async move {
            let cut = bytes.len().min(3);
            let (a, b) = bytes.split_at(cut);
            tx.send(Ok(Bytes::copy_from_slice(a))).await.is_ok()
                && tx.send(Ok(Bytes::copy_from_slice(b))).await.is_ok()
        }
    };
    if !send(envelope(0, &json!({"event": {"start": {"pid": pid}}}))).await {
        return;
    }
    if matches!(fault, Some(Fault::MalformedEnvelope)) {
        let _ = tx
            .send(Ok(Bytes::from(envelope(FLAG_COMPRESSED, &json!({})))))
            .await;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        return;
    }
    let drop_after = match fault {
        Some(Fault::DropStreamAfter(n)) => Some(n),
        _ => None,
    };
    let deadline = stream_deadline.map(|d| tokio::time::Instant::now() + d);
    let mut data_events = 0usize;
    loop {
        let keepalive_sleep = async {
            match keepalive {
                Some(k) => tokio::time::sleep(k).await,
                None => std::future::pending().await,
            }
        };
        let deadline_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::Data(key, data)) => {
                    // Split every read in two events, which splits multibyte characters.
                    let mid = data.len() / 2;
                    for part in [&data[..mid], &data[mid..]] {
                        if part.is_empty() {
                            continue;
                        }
                        let event = json!({"event": {"data": {key: B64.encode(part)}}});
                        if !send(envelope(0, &event)).await {
                            return;
                        }
                        data_events += 1;
                        if drop_after.is_some_and(|n| data_events >= n) {
                            // The connection closes; the process runs on.
                            return;
                        }
                    }
                }
                Ok(Event::End(end)) => {
                    if send(envelope(0, &json!({"event": {"end": end}}))).await {
                        let _ = send(envelope(FLAG_END, &json!({}))).await;
                    }
                    return;
                }
                Ok(Event::Deadline) => {
                    let _ = send(envelope(FLAG_END, &json!({"error": {"code": "deadline_exceeded", "message": "context deadline exceeded"}}))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = send(envelope(FLAG_END, &json!({"error": {"code": "unavailable", "message": "the process went away"}}))).await;
                    return;
                }
            },
            _ = keepalive_sleep => {
                if !send(envelope(0, &json!({"event": {"keepalive": {}}}))).await {
                    return;
                }
            }
            _ = deadline_sleep => {
                let _ = send(envelope(FLAG_END, &json!({"error": {"code": "deadline_exceeded", "message": "context deadline exceeded"}}))).await;
                return;
            }
        }
    }
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the local command for a `ProcessConfig`, as the sandbox user.
fn command_for(
    target: &Target,
    process: &Value,
    stdin: bool,
) -> Result<tokio::process::Command, Response> {
    let fs = &target.fs;
    let Some(cmd) = process.get("cmd").and_then(Value::as_str) else {
        return Err(connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "process.cmd is required",
        ));
    };
    let cwd = process
        .get("cwd")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .unwrap_or(&target.home);
    let cwd_host = fs
        .resolve(cwd, &target.home)
        .map_err(|e| connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e.0))?;
    if !cwd_host.is_dir() {
        return Err(connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!("cwd '{cwd}' does not exist"),
        ));
    }

    let mut command = fs.command(cmd, &cwd_host, &target.home);
    command
        .args(
            string_list(process.get("args"))
                .iter()
                .map(|a| fs.map_in(a)),
        )
        .env("USER", &target.user)
        .env("LOGNAME", &target.user);
    if stdin {
        command.stdin(Stdio::piped());
    }
    for (k, v) in &target.env_vars {
        command.env(k, fs.map_in(v));
    }
    if let Some(envs) = process.get("envs").and_then(Value::as_object) {
        for (k, v) in envs {
            if let Some(v) = v.as_str() {
                command.env(k, fs.map_in(v));
            }
        }
    }
    Ok(command)
}

pub(crate) async fn start(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = request.headers().clone();
    let fault = request
        .extensions()
        .get::<StreamFault>()
        .map(|f| f.0.clone());
    let target = match resolve(&shared, &headers) {
        Ok(target) => target,
        Err(refused) => return refused.into_response(),
    };
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let message = match stream_message(&body) {
        Ok(message) => message,
        Err(response) => return response,
    };
    let process = message.get("process").cloned().unwrap_or(Value::Null);
    let stdin = message
        .get("stdin")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut command = match command_for(&target, &process, stdin) {
        Ok(command) => command,
        Err(response) => return response,
    };
    let timeout = header_ms(&headers, "connect-timeout-ms");
    let keepalive = keepalive_of(&shared, &headers);
    let (tx, response) = streaming_response();
    if matches!(fault, Some(Fault::SilentStream)) {
        tokio::spawn(async move { tx.closed().await });
        return response;
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return connect_error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                &format!(
                    "failed to start {}: {e}",
                    process.get("cmd").and_then(Value::as_str).unwrap_or("")
                ),
            );
        }
    };
    let pid = child.id().unwrap_or(0);
    let (events, receiver) = broadcast::channel(1024);
    let entry = Arc::new(ProcessEntry {
        pgid: pid as i32,
        config: process.clone(),
        tag: message
            .pointer("/process/tag")
            .or_else(|| message.get("tag"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        stdin: tokio::sync::Mutex::new(child.stdin.take()),
        events: events.clone(),
    });
    if let Some(s) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&target.id)
    {
        s.processes.insert(pid, entry);
    }
    let (out_tx, mut out_rx) = mpsc::channel(64);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(pump(stdout, target.fs.unmapper(), out_tx.clone(), |d| {
            ("stdout", d)
        }));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(pump(stderr, target.fs.unmapper(), out_tx.clone(), |d| {
            ("stderr", d)
        }));
    }
    drop(out_tx);

    // The process itself, detached from any stream.
    let sandbox_id = target.id.clone();
    let driver_shared = shared.clone();
    tokio::spawn(async move {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut timed_out = false;
        loop {
            let deadline_sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                chunk = out_rx.recv() => match chunk {
                    Some((key, data)) => {
                        let _ = events.send(Event::Data(key, data));
                    }
                    None => break,
                },
                _ = deadline_sleep, if !timed_out => {
                    timed_out = true;
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        let status = child.wait().await;
        if let Some(s) = driver_shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&sandbox_id)
        {
            s.processes.remove(&pid);
        }
        let _ = events.send(if timed_out {
            Event::Deadline
        } else {
            match status {
                Ok(status) => Event::End(end_event(&status)),
                Err(_) => Event::End(
                    json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"}),
                ),
            }
        });
    });
    tokio::spawn(stream_events(tx, pid, receiver, keepalive, None, fault));
    response
}

/// The process a `ProcessSelector` (`{"pid": N}` or `{"tag": "x"}`) names.
fn select(
    shared: &Shared,
    target: &Target,
    selector: Option<&Value>,
) -> Option<(u32, Arc<ProcessEntry>)> {
    let selector = selector?;
    let sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let processes = &sandboxes.get(&target.id)?.processes;
    if let Some(pid) = selector.get("pid").and_then(Value::as_u64) {
        let pid = pid as u32;
        return processes.get(&pid).map(|e| (pid, e.clone()));
    }
    let tag = selector.get("tag").and_then(Value::as_str)?;
    processes
        .iter()
        .find(|(_, e)| e.tag.as_deref() == Some(tag))
        .map(|(pid, e)| (*pid, e.clone()))
}

fn process_not_found() -> Response {
    connect_error(StatusCode::NOT_FOUND, "not_found", "process not found")
}

pub(crate) async fn connect(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = request.headers().clone();
    let fault = request
        .extensions()
        .get::<StreamFault>()
        .map(|f| f.0.clone());
    let target = match resolve(&shared, &headers) {
        Ok(target) => target,
        Err(refused) => return refused.into_response(),
    };
    let body = axum::body::to_bytes(request.into_body(), 1024 * 1024)
        .await
        .unwrap_or_default();
    let message = match stream_message(&body) {
        Ok(message) => message,
        Err(response) => return response,
    };
    let Some((pid, entry)) = select(&shared, &target, message.get("process")) else {
        return process_not_found();
    };
    let receiver = entry.events.subscribe();
    let (tx, response) = streaming_response();
    tokio::spawn(stream_events(
        tx,
        pid,
        receiver,
        keepalive_of(&shared, &headers),
        header_ms(&headers, "connect-timeout-ms"),
        fault,
    ));
    response
}

fn empty_ok() -> Response {
    (StatusCode::OK, [("content-type", "application/json")], "{}").into_response()
}

pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = match unary(&shared, &headers, &body) {
        Ok((target, _)) => target,
        Err(response) => return response,
    };
    let sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let mut processes: Vec<Value> = sandboxes
        .get(&target.id)
        .map(|s| {
            s.processes
                .iter()
                .map(|(pid, e)| {
                    let mut info = json!({"pid": pid, "config": e.config});
                    if let Some(tag) = &e.tag {
                        info["tag"] = json!(tag);
                    }
                    info
                })
                .collect()
        })
        .unwrap_or_default();
    processes.sort_by_key(|p| p["pid"].as_u64());
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        json!({"processes": processes}).to_string(),
    )
        .into_response()
}

pub(crate) async fn send_input(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Some((_, entry)) = select(&shared, &target, message.get("process")) else {
        return process_not_found();
    };
    let Some(data) = message
        .pointer("/input/stdin")
        .and_then(Value::as_str)
        .and_then(|b| B64.decode(b).ok())
    else {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "input.stdin (base64) is required; PTY input is not served",
        );
    };
    let mut stdin = entry.stdin.lock().await;
    let Some(pipe) = stdin.as_mut() else {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "failed_precondition",
            "the process has no open stdin",
        );
    };
    match pipe.write_all(&data).await {
        Ok(()) => empty_ok(),
        Err(e) => connect_error(
            StatusCode::BAD_REQUEST,
            "failed_precondition",
            &e.to_string(),
        ),
    }
}

pub(crate) async fn close_stdin(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Some((_, entry)) = select(&shared, &target, message.get("process")) else {
        return process_not_found();
    };
    entry.stdin.lock().await.take();
    empty_ok()
}

pub(crate) async fn send_signal(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let signal = match message.get("signal") {
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => Signal::SIGTERM,
        Some(Value::Number(n)) if n.as_u64() == Some(15) => Signal::SIGTERM,
        _ => Signal::SIGKILL,
    };
    match select(&shared, &target, message.get("process")) {
        Some((_, entry)) => {
            let _ = killpg(Pid::from_raw(entry.pgid), signal);
            empty_ok()
        }
        None => process_not_found(),
    }
}
