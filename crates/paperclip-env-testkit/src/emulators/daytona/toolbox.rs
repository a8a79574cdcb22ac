//! The toolbox daemon's routes: files, one-shot execute, sessions and their
//! logs (JSON and the follow WebSocket).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::session::{Session, demux, shell_program, strip_marks};
use super::{Fault, Json, Shared, daemon_error, not_found, special, with_sandbox};
use crate::fake::DEFAULT_PATH;

/// The sandbox root when the sandbox is started (toolbox calls need it).
pub(super) fn toolbox_root(shared: &Shared, id: &str) -> Result<PathBuf, Response> {
    match with_sandbox(shared, id, |s| (s.state.clone(), s.root.clone())) {
        None => Err(daemon_error(
            404,
            "NOT_FOUND",
            &format!("sandbox {id} not found"),
        )),
        Some((state, root)) if state == "started" => Ok(root),
        Some((state, _)) => Err(daemon_error(
            502,
            "BAD_GATEWAY",
            &format!("sandbox is {state}"),
        )),
    }
}

/// The daemon resolves relative paths against its working directory.
fn resolve(root: &FsPath, path: &str) -> PathBuf {
    let p = FsPath::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        root.join(p)
    }
}

fn io_error(e: &std::io::Error) -> Response {
    match e.kind() {
        std::io::ErrorKind::NotFound => daemon_error(404, "NOT_FOUND", &e.to_string()),
        std::io::ErrorKind::PermissionDenied => daemon_error(403, "FORBIDDEN", &e.to_string()),
        _ => daemon_error(400, "BAD_REQUEST", &e.to_string()),
    }
}

pub(super) async fn work_dir(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    match toolbox_root(&shared, &id) {
        Ok(root) => Json(json!({"dir": root.display().to_string()})),
        Err(r) => r,
    }
}

pub(super) async fn folder(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(path) = q.get("path") else {
        return daemon_error(400, "BAD_REQUEST", "path is required");
    };
    match std::fs::create_dir_all(resolve(&root, path)) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => daemon_error(400, "BAD_REQUEST", &e.to_string()),
    }
}

pub(super) async fn permissions(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(path) = q.get("path") else {
        return daemon_error(400, "BAD_REQUEST", "path is required");
    };
    let path = resolve(&root, path);
    if let Some(mode) = q.get("mode") {
        let Ok(bits) = u32::from_str_radix(mode, 8) else {
            return daemon_error(400, "BAD_REQUEST", "invalid mode format");
        };
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits)) {
            return io_error(&e);
        }
    } else if let Err(e) = std::fs::metadata(&path) {
        return io_error(&e);
    }
    StatusCode::OK.into_response()
}

/// `DELETE /files`: a directory needs `recursive=true` (400 otherwise,
/// empty or not), as in the daemon.
pub(super) async fn delete_file(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(path) = q.get("path").filter(|p| !p.is_empty()) else {
        return daemon_error(400, "BAD_REQUEST", "path is required");
    };
    let path = resolve(&root, path);
    let recursive = q.get("recursive").map(String::as_str) == Some("true");
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) => return io_error(&e),
    };
    if meta.is_dir() && !recursive {
        return daemon_error(
            400,
            "BAD_REQUEST",
            "cannot delete directory without recursive flag",
        );
    }
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => daemon_error(400, "BAD_REQUEST", &e.to_string()),
    }
}

fn file_info(path: &FsPath, name: String) -> Option<Value> {
    let meta = std::fs::metadata(path).ok()?;
    let modified: chrono::DateTime<chrono::Utc> = meta.modified().ok()?.into();
    let mode = meta.permissions().mode();
    let kind = if meta.is_dir() { 'd' } else { '-' };
    let mut rwx = String::new();
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        rwx.push(if bits & 4 != 0 { 'r' } else { '-' });
        rwx.push(if bits & 2 != 0 { 'w' } else { '-' });
        rwx.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    Some(json!({
        "name": name, "size": meta.len(), "mode": format!("{kind}{rwx}"),
        "modTime": modified.to_string(), "modifiedAt": modified.to_rfc3339(),
        "isDir": meta.is_dir(), "owner": meta.uid().to_string(), "group": meta.gid().to_string(),
        "permissions": format!("{:04o}", mode & 0o7777),
    }))
}

/// `GET /files?path=`: the entries of a directory (default: the work dir).
pub(super) async fn list_files(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let dir = resolve(&root, q.get("path").map(String::as_str).unwrap_or("."));
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => return io_error(&e),
    };
    let mut infos: Vec<Value> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| file_info(&e.path(), e.file_name().to_string_lossy().into_owned()))
        .collect();
    infos.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(Value::Array(infos))
}

pub(super) async fn bulk_upload(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    mut multipart: Multipart,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut paths: HashMap<String, String> = HashMap::new();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                errors.push(format!("reading part: {e}"));
                break;
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let Ok(data) = field.bytes().await else {
            errors.push(format!("{name}: unreadable part"));
            break;
        };
        let index = name
            .trim_start_matches("files[")
            .trim_end_matches(".path")
            .trim_end_matches(".file")
            .trim_end_matches(']')
            .to_owned();
        if name.ends_with(".path") {
            let dest = String::from_utf8_lossy(&data).trim().to_owned();
            if dest.is_empty() {
                errors.push(format!("path[{index}]: empty path"));
            } else {
                paths.insert(index, dest);
            }
        } else if name.ends_with(".file") {
            let Some(dest) = paths.get(&index) else {
                errors.push(format!("file[{index}]: missing .path metadata"));
                continue;
            };
            let target = resolve(&root, dest);
            if let Some(parent) = target.parent()
                && let Err(e) = std::fs::create_dir_all(parent)
            {
                errors.push(format!("{dest}: mkdir: {e}"));
                continue;
            }
            match std::fs::write(&target, &data) {
                Ok(()) => files.push(json!({"path": dest, "bytes": data.len()})),
                Err(e) => errors.push(format!("{dest}: create: {e}")),
            }
        }
    }
    if errors.is_empty() {
        Json(json!({"files": files}))
    } else {
        (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            json!({"errors": errors, "files": files}).to_string(),
        )
            .into_response()
    }
}

pub(super) async fn bulk_download(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let paths: Vec<String> = body["paths"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if paths.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            json!({"error": "no paths"}).to_string(),
        )
            .into_response();
    }
    let mut out = Vec::new();
    for path in paths {
        let (name, data) = match std::fs::read(resolve(&root, &path)) {
            Ok(bytes) => ("file", bytes),
            Err(_) => (
                "error",
                json!({"statusCode": 404, "message": format!("file not found: {path}"), "code": "FILE_NOT_FOUND"})
                    .to_string()
                    .into_bytes(),
            ),
        };
        out.extend_from_slice(
            format!("--DAYTONA-FILE-BOUNDARY\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{path}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--DAYTONA-FILE-BOUNDARY--\r\n");
    (
        StatusCode::OK,
        [(
            "content-type",
            "multipart/form-data; boundary=DAYTONA-FILE-BOUNDARY",
        )],
        out,
    )
        .into_response()
}

fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `POST /process/execute`: the command goes to a fresh shell on stdin;
/// stdout and stderr share one pipe (the combined `result`); `cwd` and
/// `envs` apply; `timeout` (seconds) kills the process group and answers 408.
pub(super) async fn execute(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return daemon_error(400, "BAD_REQUEST", "invalid request body");
    };
    let Some(command) = body["command"]
        .as_str()
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned)
    else {
        return daemon_error(
            400,
            "BAD_REQUEST",
            "command cannot be empty or whitespace-only",
        );
    };
    let mut envs: Vec<(String, String)> = Vec::new();
    if let Some(map) = body["envs"].as_object() {
        for (key, value) in map {
            if !valid_env_key(key) {
                return daemon_error(
                    400,
                    "BAD_REQUEST",
                    &format!("invalid environment variable name: '{key}'"),
                );
            }
            envs.push((key.clone(), value.as_str().unwrap_or_default().to_owned()));
        }
    }
    let cwd = body["cwd"]
        .as_str()
        .map(|c| resolve(&root, c))
        .unwrap_or_else(|| root.clone());
    let timeout = body["timeout"]
        .as_u64()
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return daemon_error(500, "INTERNAL_SERVER_ERROR", &e.to_string()),
    };
    let Ok(writer2) = writer.try_clone() else {
        return daemon_error(500, "INTERNAL_SERVER_ERROR", "cannot share the output pipe");
    };
    let mut process = tokio::process::Command::new(shell_program());
    process
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &root);
    for (key, value) in shared.sandbox_env(&id).into_iter().chain(envs) {
        process.env(key, value);
    }
    let spawned = process
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    // The command keeps the pipe's write ends until dropped: close ours so
    // the output ends when the process does.
    drop(process);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Json(json!({"exitCode": -1, "result": e.to_string()})),
    };
    let pgid = child.id().map(|p| p as i32);
    if let Some(pgid) = pgid {
        with_sandbox(&shared, &id, |s| s.pgids.push(pgid));
    }
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            let _ = stdin.write_all(command.as_bytes()).await;
        });
    }
    let run = async {
        let mut output = Vec::new();
        if let Ok(reader) = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into()) {
            let mut reader = reader;
            let _ = reader.read_to_end(&mut output).await;
        }
        (child.wait().await, output)
    };
    let finished = match timeout {
        Some(t) => tokio::time::timeout(t, run).await.ok(),
        None => Some(run.await),
    };
    match finished {
        Some((Ok(status), output)) => Json(
            json!({"exitCode": super::super::shell_exit_code(status), "result": String::from_utf8_lossy(&output)}),
        ),
        Some((Err(_), output)) => {
            Json(json!({"exitCode": -1, "result": String::from_utf8_lossy(&output)}))
        }
        None => {
            if let Some(pgid) = pgid {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            daemon_error(
                408,
                "REQUEST_TIMEOUT",
                "request timeout: command execution timeout",
            )
        }
    }
}

fn session_of(shared: &Shared, id: &str, sid: &str) -> Result<Arc<Session>, Response> {
    match with_sandbox(shared, id, |s| s.sessions.get(sid).cloned()) {
        None => Err(not_found(id)),
        Some(None) => Err(daemon_error(
            404,
            "NOT_FOUND",
            "not found: session not found",
        )),
        Some(Some(session)) => Ok(session),
    }
}

fn refusal((status, code, message): (u16, &str, String)) -> Response {
    daemon_error(status, code, &message)
}

pub(super) async fn session_create(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(sid) = body["sessionId"].as_str().map(str::to_owned) else {
        return daemon_error(400, "BAD_REQUEST", "sessionId is required");
    };
    if sid == "entrypoint" {
        return daemon_error(
            400,
            "BAD_REQUEST",
            "provided session ID is reserved and cannot be created/overridden",
        );
    }
    if with_sandbox(&shared, &id, |s| s.sessions.contains_key(&sid)) == Some(true) {
        return daemon_error(409, "CONFLICT", "conflict: session already exists");
    }
    let dir = shared.daemon_dir(&id).join("sessions").join(&sid);
    let session = match Session::spawn(&sid, dir, &root, &shared.sandbox_env(&id)) {
        Ok(s) => s,
        Err(e) => return daemon_error(500, "INTERNAL_SERVER_ERROR", &e.to_string()),
    };
    let inserted = with_sandbox(&shared, &id, |s| {
        if s.sessions.contains_key(&sid) {
            false
        } else {
            s.sessions.insert(sid.clone(), session.clone());
            true
        }
    });
    match inserted {
        Some(true) => StatusCode::CREATED.into_response(),
        Some(false) => {
            session.kill();
            daemon_error(409, "CONFLICT", "conflict: session already exists")
        }
        None => {
            session.kill();
            not_found(&id)
        }
    }
}

pub(super) async fn session_list(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let sessions = with_sandbox(&shared, &id, |s| {
        let mut all: Vec<Arc<Session>> = s.sessions.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    })
    .unwrap_or_default();
    Json(Value::Array(sessions.iter().map(|s| s.json()).collect()))
}

pub(super) async fn session_get(
    State(shared): State<Arc<Shared>>,
    Path((id, sid)): Path<(String, String)>,
) -> Response {
    match session_of(&shared, &id, &sid) {
        Ok(session) => Json(session.json()),
        Err(r) => r,
    }
}

pub(super) async fn session_delete(
    State(shared): State<Arc<Shared>>,
    Path((id, sid)): Path<(String, String)>,
) -> Response {
    let removed = with_sandbox(&shared, &id, |s| s.sessions.remove(&sid));
    match removed {
        Some(Some(session)) => {
            session.terminate(shared.session_grace()).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Some(None) => daemon_error(404, "NOT_FOUND", "not found: session not found"),
        None => not_found(&id),
    }
}

/// Which output shape the client gets (chosen by its SDK version, as the
/// daemon does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputMode {
    /// Markers stripped, `text/plain` (no version header, or < 0.27).
    Combined,
    /// The raw framed log, `text/plain`; the client demuxes (< 0.167).
    Raw,
    /// JSON `{output, stdout, stderr}` split by the server.
    Split,
}

fn sdk_version(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get("x-daytona-sdk-version")
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.trim().to_owned());
    }
    headers
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())?
        .split(',')
        .find_map(|p| p.trim().strip_prefix("X-Daytona-SDK-Version~"))
        .map(str::to_owned)
}

/// `major.minor.patch` of a version string (pre-release ignored).
fn version_triple(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

fn output_mode(headers: &HeaderMap) -> OutputMode {
    let Some(version) = sdk_version(headers).filter(|v| !v.is_empty()) else {
        let split = headers
            .get("x-daytona-split-output")
            .and_then(|v| v.to_str().ok())
            == Some("true");
        return if split {
            OutputMode::Raw
        } else {
            OutputMode::Combined
        };
    };
    if version.contains("dev") {
        return OutputMode::Split;
    }
    match version_triple(&version) {
        None => OutputMode::Split,
        Some(v) if v < (0, 27, 0) => OutputMode::Combined,
        Some(v) if v < (0, 167, 0) => OutputMode::Raw,
        Some(_) => OutputMode::Split,
    }
}

fn logs_body(log: &[u8]) -> Value {
    let (out, err) = demux(log);
    json!({"output": String::from_utf8_lossy(log), "stdout": String::from_utf8_lossy(&out), "stderr": String::from_utf8_lossy(&err)})
}

fn text(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [("content-type", "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

pub(super) async fn session_exec(
    State(shared): State<Arc<Shared>>,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return daemon_error(400, "BAD_REQUEST", "invalid request body");
    };
    let Some(command) = body["command"]
        .as_str()
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned)
    else {
        return daemon_error(400, "BAD_REQUEST", "command cannot be empty");
    };
    let run_async = body["runAsync"] == json!(true) || body["async"] == json!(true);
    let suppress = body["suppressInputEcho"] == json!(true);
    let session = match session_of(&shared, &id, &sid) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let cmd = match session.exec(&command, run_async, suppress).await {
        Ok(c) => c,
        Err(r) => return refusal(r),
    };
    if run_async {
        return (
            StatusCode::ACCEPTED,
            [("content-type", "application/json")],
            json!({"cmdId": cmd.id}).to_string(),
        )
            .into_response();
    }
    let code = match session.wait(&cmd).await {
        Ok(code) => code,
        Err(r) => return refusal(r),
    };
    let log = cmd.log_bytes();
    let mut v = match output_mode(&headers) {
        OutputMode::Combined => {
            json!({"cmdId": cmd.id, "output": String::from_utf8_lossy(&strip_marks(&log))})
        }
        OutputMode::Raw => json!({"cmdId": cmd.id, "output": String::from_utf8_lossy(&log)}),
        OutputMode::Split => {
            let mut v = logs_body(&log);
            v["cmdId"] = json!(cmd.id);
            v
        }
    };
    v["exitCode"] = json!(code);
    Json(v)
}

pub(super) async fn command_status(
    State(shared): State<Arc<Shared>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
) -> Response {
    let session = match session_of(&shared, &id, &sid) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match session.command(&cid) {
        Some(cmd) => Json(cmd.json()),
        None => daemon_error(404, "NOT_FOUND", "not found: command not found"),
    }
}

pub(super) async fn command_input(
    State(shared): State<Arc<Shared>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let session = match session_of(&shared, &id, &sid) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(data) = body["data"].as_str() else {
        return daemon_error(400, "BAD_REQUEST", "data is required");
    };
    match session.input(&cid, data) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => refusal(r),
    }
}

pub(super) async fn command_logs(
    State(shared): State<Arc<Shared>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let fault = special(&request);
    let session = match session_of(&shared, &id, &sid) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(cmd) = session.command(&cid) else {
        return daemon_error(404, "NOT_FOUND", "not found: command not found");
    };
    let (mut parts, _) = request.into_parts();
    let mode = output_mode(&parts.headers);
    let follow = q.get("follow").map(String::as_str) == Some("true");
    if parts.headers.contains_key("upgrade") {
        return match WebSocketUpgrade::from_request_parts(&mut parts, &shared).await {
            Ok(ws) => ws.on_upgrade(move |socket| {
                stream_logs(
                    socket,
                    session,
                    cmd,
                    follow,
                    mode == OutputMode::Combined,
                    fault,
                )
            }),
            Err(r) => r.into_response(),
        };
    }
    let log = cmd.log_bytes();
    match mode {
        OutputMode::Combined => text(strip_marks(&log)),
        OutputMode::Raw => text(log),
        OutputMode::Split => Json(logs_body(&log)),
    }
}

/// The follow socket: raw framed bytes (markers stripped for combined
/// clients), every chunk split in two frames so markers straddle frames;
/// closes (1000) a little after the command ended and the log drained, or
/// when the session goes.
async fn stream_logs(
    mut socket: WebSocket,
    session: Arc<Session>,
    cmd: Arc<super::session::Command>,
    follow: bool,
    combined: bool,
    fault: Option<Fault>,
) {
    let mut sent = 0usize;
    let mut finished_at: Option<Instant> = None;
    loop {
        let (chunk, done) = {
            let log = cmd.log.lock().unwrap_or_else(|p| p.into_inner());
            let done = cmd.exit_code().is_some() || session.is_cancelled();
            (log[sent.min(log.len())..].to_vec(), done)
        };
        let fresh = !chunk.is_empty();
        if fresh {
            sent += chunk.len();
            let bytes = if combined { strip_marks(&chunk) } else { chunk };
            let cut = bytes.len().min(2);
            for part in [&bytes[..cut], &bytes[cut..]] {
                if !part.is_empty()
                    && socket
                        .send(Message::Binary(Bytes::copy_from_slice(part)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            if fault == Some(Fault::DropLogs) {
                return; // dropped without a close frame
            }
        }
        if !follow {
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
        if done && !fresh {
            let at = *finished_at.get_or_insert_with(Instant::now);
            if fault != Some(Fault::LogsNeverClose) && at.elapsed() >= Duration::from_millis(100) {
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1000,
                        reason: "".into(),
                    })))
                    .await;
                return;
            }
        }
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}
