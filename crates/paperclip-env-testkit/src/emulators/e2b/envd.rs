//! The envd side of the E2B emulator: files, filesystem RPCs and the
//! `Process/Start` server stream with real local processes.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::{Fault, Sandbox, SandboxState, Shared, envd_gone};
use crate::fake::DEFAULT_PATH;

/// A stream fault handed from the fault middleware to the Start handler.
#[derive(Clone)]
pub(crate) struct StreamFault(pub Fault);

const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END: u8 = 0x02;

fn envelope(flags: u8, payload: &Value) -> Vec<u8> {
    let bytes = payload.to_string().into_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    out
}

fn connect_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

pub(crate) fn kill_all(sandbox: &Sandbox) {
    for pgid in sandbox.processes.values() {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
}

/// Why envd refused a request.
enum Refused {
    Gone(String),
    BadToken,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Gone(id) => envd_gone(&id),
            Refused::BadToken => connect_error(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "invalid access token",
            ),
        }
    }
}

/// The sandbox an envd request addresses, if running; the access token is checked.
fn resolve(shared: &Shared, headers: &HeaderMap) -> Result<(String, PathBuf), Refused> {
    shared.reap_expired();
    let id = headers
        .get(shared.profile.sandbox_id_header())
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sandbox) = sandboxes
        .get(&id)
        .filter(|s| s.state == SandboxState::Running)
    else {
        return Err(Refused::Gone(id));
    };
    if let Some(token) = &sandbox.token
        && headers.get("x-access-token").and_then(|v| v.to_str().ok()) != Some(token.as_str())
    {
        return Err(Refused::BadToken);
    }
    Ok((id, sandbox.root.join("home")))
}

pub(crate) async fn health(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match resolve(&shared, &headers) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused.into_response(),
    }
}

pub(crate) async fn upload(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    if let Err(refused) = resolve(&shared, &headers) {
        return refused.into_response();
    }
    let is_multipart = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    let (path, data) = if is_multipart {
        let mut multipart = match Multipart::from_request(request, &shared).await {
            Ok(m) => m,
            Err(e) => {
                return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e.to_string());
            }
        };
        let mut found = None;
        while let Ok(Some(field)) = multipart.next_field().await {
            if field.name() == Some("file") {
                let name = field.file_name().map(str::to_owned);
                match field.bytes().await {
                    Ok(bytes) => found = Some((query.get("path").cloned().or(name), bytes)),
                    Err(e) => {
                        return connect_error(
                            StatusCode::BAD_REQUEST,
                            "invalid_argument",
                            &e.to_string(),
                        );
                    }
                }
            }
        }
        match found {
            Some((Some(path), bytes)) => (path, bytes),
            _ => {
                return connect_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "missing file part or path",
                );
            }
        }
    } else {
        let Some(path) = query.get("path").cloned() else {
            return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "missing path");
        };
        match axum::body::to_bytes(request.into_body(), 512 * 1024 * 1024).await {
            Ok(bytes) => (path, bytes),
            Err(e) => {
                return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e.to_string());
            }
        }
    };
    if !path.starts_with('/') {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "path must be absolute",
        );
    }
    let target = PathBuf::from(&path);
    if let Some(parent) = target.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(&target, &data) {
        return connect_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        );
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        json!([{"path": path, "name": name, "type": "file"}]).to_string(),
    )
        .into_response()
}

pub(crate) async fn download(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = resolve(&shared, &headers) {
        return refused.into_response();
    }
    match query.get("path").map(std::fs::read) {
        Some(Ok(bytes)) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            bytes,
        )
            .into_response(),
        _ => connect_error(StatusCode::NOT_FOUND, "not_found", "file not found"),
    }
}

pub(crate) async fn remove(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = resolve(&shared, &headers) {
        return refused.into_response();
    }
    let path = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("path").and_then(Value::as_str).map(PathBuf::from));
    let Some(path) = path else {
        return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "missing path");
    };
    let result = if path.is_dir() {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match result {
        Ok(()) => (StatusCode::OK, [("content-type", "application/json")], "{}").into_response(),
        Err(_) => connect_error(StatusCode::NOT_FOUND, "not_found", "path not found"),
    }
}

pub(crate) async fn make_dir(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = resolve(&shared, &headers) {
        return refused.into_response();
    }
    let path = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("path").and_then(Value::as_str).map(PathBuf::from));
    let Some(path) = path else {
        return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "missing path");
    };
    if path.exists() {
        return connect_error(
            StatusCode::CONFLICT,
            "already_exists",
            "path already exists",
        );
    }
    match std::fs::create_dir_all(&path) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            json!({"entry": {"path": path, "type": "directory"}}).to_string(),
        )
            .into_response(),
        Err(e) => connect_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

pub(crate) async fn send_signal(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok((id, _)) = resolve(&shared, &headers) else {
        return envd_gone("");
    };
    let request = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let pid = request
        .pointer("/process/pid")
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    let signal = match request.get("signal") {
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => Signal::SIGTERM,
        Some(Value::Number(n)) if n.as_u64() == Some(15) => Signal::SIGTERM,
        _ => Signal::SIGKILL,
    };
    let pgid = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .and_then(|s| s.processes.get(&pid).copied());
    match pgid {
        Some(pgid) => {
            let _ = killpg(Pid::from_raw(pgid), signal);
            (StatusCode::OK, [("content-type", "application/json")], "{}").into_response()
        }
        None => connect_error(StatusCode::NOT_FOUND, "not_found", "process not found"),
    }
}

fn status_text(status: &std::process::ExitStatus) -> (i32, String) {
    if let Some(code) = status.code() {
        return (code, format!("exit status {code}"));
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
    (-1, format!("signal: {name}"))
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

async fn pump(mut reader: impl AsyncRead + Unpin, tx: mpsc::Sender<Chunk>, stdout: bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let chunk = if stdout {
                    Chunk::Out(data)
                } else {
                    Chunk::Err(data)
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

pub(crate) async fn start(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = request.headers().clone();
    let fault = request
        .extensions()
        .get::<StreamFault>()
        .map(|f| f.0.clone());
    let (id, home) = match resolve(&shared, &headers) {
        Ok(found) => found,
        Err(refused) => return refused.into_response(),
    };
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    if body.len() < 5 || body[0] & FLAG_COMPRESSED != 0 {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "expected one uncompressed envelope",
        );
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(payload) = body.get(5..5 + len) else {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "truncated envelope",
        );
    };
    let message: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let process = message.get("process").cloned().unwrap_or(Value::Null);
    let Some(cmd) = process
        .get("cmd")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "process.cmd is required",
        );
    };
    let args: Vec<String> = process
        .get("args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let cwd = process
        .get("cwd")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| home.clone());
    let timeout = headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_millis);
    let keepalive = shared.keepalive.lock().ok().and_then(|k| *k).or_else(|| {
        headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
    });

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let response_body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let response = (
        StatusCode::OK,
        [("content-type", "application/connect+json")],
        response_body,
    )
        .into_response();

    if matches!(fault, Some(Fault::SilentStream)) {
        tokio::spawn(async move { tx.closed().await });
        return response;
    }

    let mut command = tokio::process::Command::new(&cmd);
    command
        .args(&args)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(envs) = process.get("envs").and_then(Value::as_object) {
        for (k, v) in envs {
            if let Some(v) = v.as_str() {
                command.env(k, v);
            }
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return connect_error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                &format!("failed to start {cmd}: {e}"),
            );
        }
    };
    let pid = child.id().unwrap_or(0);
    if let Some(s) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        s.processes.insert(pid, pid as i32);
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Chunk>(64);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(pump(stdout, out_tx.clone(), true));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(pump(stderr, out_tx.clone(), false));
    }
    drop(out_tx);

    tokio::spawn(async move {
        // Every envelope goes out in two HTTP chunks, so clients must buffer.
        let send = |tx: &mpsc::Sender<Result<Bytes, std::io::Error>>, bytes: Vec<u8>| {
            let tx = tx.clone();
            async move {
                let cut = bytes.len().min(3);
                let (a, b) = bytes.split_at(cut);
                tx.send(Ok(Bytes::copy_from_slice(a))).await.is_ok()
                    && tx.send(Ok(Bytes::copy_from_slice(b))).await.is_ok()
            }
        };
        let mut connected =
            send(&tx, envelope(0, &json!({"event": {"start": {"pid": pid}}}))).await;
        if matches!(fault, Some(Fault::MalformedEnvelope)) {
            let _ = tx
                .send(Ok(Bytes::from(envelope(FLAG_COMPRESSED, &json!({})))))
                .await;
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait().await;
            return;
        }
        let drop_after = match fault {
            Some(Fault::DropStreamAfter(n)) => Some(n),
            _ => None,
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut data_events = 0usize;
        let mut timed_out = false;
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
                chunk = out_rx.recv() => match chunk {
                    Some(chunk) => {
                        let (key, data) = match chunk {
                            Chunk::Out(d) => ("stdout", d),
                            Chunk::Err(d) => ("stderr", d),
                        };
                        // Split every read in two events, which splits multibyte characters.
                        let mid = data.len() / 2;
                        for part in [&data[..mid], &data[mid..]] {
                            if part.is_empty() {
                                continue;
                            }
                            if drop_after.is_some_and(|n| data_events >= n) {
                                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                                let _ = child.wait().await;
                                return;
                            }
                            let event = json!({"event": {"data": {key: B64.encode(part)}}});
                            if connected {
                                connected = send(&tx, envelope(0, &event)).await;
                            }
                            data_events += 1;
                        }
                    }
                    None => break,
                },
                _ = keepalive_sleep => {
                    if connected {
                        connected = send(&tx, envelope(0, &json!({"event": {"keepalive": {}}}))).await;
                    }
                }
                _ = deadline_sleep => {
                    timed_out = true;
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    break;
                }
            }
        }
        let status = child.wait().await;
        if let Some(s) = shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            s.processes.remove(&pid);
        }
        if !connected {
            return;
        }
        if timed_out {
            let _ = send(&tx, envelope(FLAG_END, &json!({"error": {"code": "deadline_exceeded", "message": "context deadline exceeded"}}))).await;
            return;
        }
        let (code, text) = status
            .as_ref()
            .map(status_text)
            .unwrap_or((-1, "signal: killed".into()));
        let mut end = json!({"exited": true, "status": text});
        if code != 0 {
            end["exitCode"] = json!(code);
        }
        if send(&tx, envelope(0, &json!({"event": {"end": end}}))).await {
            let _ = send(&tx, envelope(FLAG_END, &json!({}))).await;
        }
    });
    response
}
