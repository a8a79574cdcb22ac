//! The envd side of the E2B emulator: the HTTP file API and the filesystem
//! RPCs, every path confined to the sandbox's own root.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::{SandboxState, Shared, envd_gone};
use crate::emulators::sandbox_fs::SandboxFs;

/// A Connect error: `{"code": "<name>", "message"}` with the code's status.
pub(crate) fn connect_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

/// An envd HTTP API error: `{"message", "code": <int>}`.
fn files_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"message": message, "code": status.as_u16()}).to_string(),
    )
        .into_response()
}

/// Why envd refused a request.
pub(crate) enum Refused {
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

/// The sandbox an envd request addresses, as whom.
pub(crate) struct Target {
    pub id: String,
    pub fs: SandboxFs,
    pub user: String,
    pub home: String,
    pub env_vars: Vec<(String, String)>,
}

/// The home directory of a sandbox user.
pub(crate) fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".into()
    } else {
        format!("/home/{user}")
    }
}

/// The user of `Authorization: Basic base64("<user>:")`, else `user`.
fn user_of(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| B64.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .map(|text| text.split(':').next().unwrap_or("").to_owned())
        .filter(|u| !u.is_empty() && !u.contains('/') && u != "." && u != "..")
        .unwrap_or_else(|| "user".into())
}

/// The running sandbox an envd request addresses; the access token is checked.
pub(crate) fn resolve(shared: &Shared, headers: &HeaderMap) -> Result<Target, Refused> {
    shared.reap_expired();
    let id = shared.envd_sandbox_id(headers);
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
    let user = user_of(headers);
    let home = home_of(&user);
    if let Ok(host) = sandbox.fs.resolve(&home, "/") {
        let _ = std::fs::create_dir_all(host);
    }
    Ok(Target {
        id,
        fs: sandbox.fs.clone(),
        home,
        user,
        env_vars: sandbox.env_vars.clone(),
    })
}

pub(crate) async fn health(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match resolve(&shared, &headers) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// The home for `/files` calls: `username` wins over the Authorization user.
fn files_home(target: &Target, query: &HashMap<String, String>) -> String {
    query
        .get("username")
        .filter(|u| !u.is_empty() && !u.contains('/'))
        .map(|u| home_of(u))
        .unwrap_or_else(|| target.home.clone())
}

fn write_file(target: &Target, home: &str, path: &str, data: &[u8]) -> Result<Value, Response> {
    let host = target
        .fs
        .resolve(path, home)
        .map_err(|e| files_error(StatusCode::BAD_REQUEST, &e.0))?;
    if host.is_dir() {
        return Err(files_error(
            StatusCode::BAD_REQUEST,
            &format!("path '{path}' is a directory"),
        ));
    }
    if let Some(parent) = host.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| files_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
    }
    std::fs::write(&host, data)
        .map_err(|e| files_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
    let name = host
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(json!({"path": target.fs.sandbox_path(&host), "name": name, "type": "file"}))
}

pub(crate) async fn upload(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    let target = match resolve(&shared, &headers) {
        Ok(target) => target,
        Err(refused) => return refused.into_response(),
    };
    let home = files_home(&target, &query);
    let is_multipart = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    let mut written = Vec::new();
    if is_multipart {
        let mut multipart = match Multipart::from_request(request, &shared).await {
            Ok(m) => m,
            Err(e) => return files_error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let single = query.get("path").cloned();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) => return files_error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            if field.name() != Some("file") {
                continue;
            }
            let name = field.file_name().map(str::to_owned);
            let bytes = match field.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => return files_error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let Some(path) = single.clone().or(name) else {
                return files_error(StatusCode::BAD_REQUEST, "missing path");
            };
            match write_file(&target, &home, &path, &bytes) {
                Ok(entry) => written.push(entry),
                Err(response) => return response,
            }
        }
        if written.is_empty() {
            return files_error(StatusCode::BAD_REQUEST, "missing file part");
        }
    } else {
        let Some(path) = query.get("path").cloned() else {
            return files_error(StatusCode::BAD_REQUEST, "missing path");
        };
        let gzip = headers
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        if gzip {
            return files_error(
                StatusCode::BAD_REQUEST,
                "gzip uploads are not served by the emulator",
            );
        }
        let bytes = match axum::body::to_bytes(request.into_body(), 512 * 1024 * 1024).await {
            Ok(bytes) => bytes,
            Err(e) => return files_error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        match write_file(&target, &home, &path, &bytes) {
            Ok(entry) => written.push(entry),
            Err(response) => return response,
        }
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Value::Array(written).to_string(),
    )
        .into_response()
}

pub(crate) async fn download(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let target = match resolve(&shared, &headers) {
        Ok(target) => target,
        Err(refused) => return refused.into_response(),
    };
    let home = files_home(&target, &query);
    let Some(path) = query.get("path") else {
        return files_error(StatusCode::BAD_REQUEST, "missing path");
    };
    let host = match target.fs.resolve(path, &home) {
        Ok(host) => host,
        Err(e) => return files_error(StatusCode::BAD_REQUEST, &e.0),
    };
    if host.is_dir() {
        return files_error(
            StatusCode::BAD_REQUEST,
            &format!("path '{path}' is a directory"),
        );
    }
    match std::fs::read(&host) {
        Ok(bytes) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Err(_) => files_error(
            StatusCode::NOT_FOUND,
            &format!("path '{path}' does not exist"),
        ),
    }
}

/// A unary Connect request's JSON body and its target.
pub(crate) fn unary(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Target, Value), Response> {
    let target = resolve(shared, headers).map_err(IntoResponse::into_response)?;
    let message = serde_json::from_slice::<Value>(body).map_err(|e| {
        connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!("bad JSON: {e}"),
        )
    })?;
    Ok((target, message))
}

fn ok_json(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The host path of a message's `field`, resolved under the sandbox root.
fn path_field(target: &Target, message: &Value, field: &str) -> Result<PathBuf, Response> {
    let Some(path) = message.get(field).and_then(Value::as_str) else {
        return Err(connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!("missing {field}"),
        ));
    };
    target
        .fs
        .resolve(path, &target.home)
        .map_err(|e| connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e.0))
}

fn permissions_text(mode: u32, dir: bool) -> String {
    let mut text = String::with_capacity(10);
    text.push(if dir { 'd' } else { '-' });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}

/// A `filesystem.EntryInfo` in proto3 JSON (int64 as a string).
fn entry_info(target: &Target, host: &Path) -> Option<Value> {
    let link = std::fs::symlink_metadata(host).ok()?;
    let is_symlink = link.file_type().is_symlink();
    let meta = std::fs::metadata(host).unwrap_or(link.clone());
    let kind = if meta.is_dir() {
        "FILE_TYPE_DIRECTORY"
    } else {
        "FILE_TYPE_FILE"
    };
    let modified = meta
        .modified()
        .ok()
        .map(chrono::DateTime::<chrono::Utc>::from)
        .unwrap_or_else(chrono::Utc::now);
    let mode = meta.permissions().mode() & 0o777;
    let mut entry = json!({
        "name": host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        "type": kind,
        "path": target.fs.sandbox_path(host),
        "size": meta.size().to_string(),
        "mode": mode,
        "permissions": permissions_text(mode, meta.is_dir()),
        "owner": target.user,
        "group": target.user,
        "modifiedTime": modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    if is_symlink {
        entry["isSymlink"] = json!(true);
        if let Ok(to) = std::fs::read_link(host) {
            let to = if to.is_absolute() {
                target.fs.sandbox_path(&to)
            } else {
                to.to_string_lossy().into_owned()
            };
            entry["symlinkTarget"] = json!(to);
        }
    }
    Some(entry)
}

fn not_found(path: &Path, target: &Target) -> Response {
    connect_error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("path '{}' does not exist", target.fs.sandbox_path(path)),
    )
}

pub(crate) async fn remove(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let path = match path_field(&target, &message, "path") {
        Ok(path) => path,
        Err(response) => return response,
    };
    if path == target.fs.root() {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "cannot remove /",
        );
    }
    let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
    let result = if is_dir {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match result {
        Ok(()) => ok_json(json!({})),
        Err(_) => not_found(&path, &target),
    }
}

pub(crate) async fn make_dir(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let path = match path_field(&target, &message, "path") {
        Ok(path) => path,
        Err(response) => return response,
    };
    if path.exists() {
        return connect_error(
            StatusCode::CONFLICT,
            "already_exists",
            "path already exists",
        );
    }
    match std::fs::create_dir_all(&path) {
        Ok(()) => ok_json(json!({"entry": entry_info(&target, &path)})),
        Err(e) => connect_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

pub(crate) async fn stat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let path = match path_field(&target, &message, "path") {
        Ok(path) => path,
        Err(response) => return response,
    };
    match entry_info(&target, &path) {
        Some(entry) => ok_json(json!({"entry": entry})),
        None => not_found(&path, &target),
    }
}

fn walk(target: &Target, dir: &Path, depth: u64, out: &mut Vec<Value>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = read.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if let Some(entry) = entry_info(target, &path) {
            out.push(entry);
        }
        let real_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if depth > 1 && real_dir {
            walk(target, &path, depth - 1, out);
        }
    }
}

pub(crate) async fn list_dir(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let path = match path_field(&target, &message, "path") {
        Ok(path) => path,
        Err(response) => return response,
    };
    let depth = message
        .get("depth")
        .and_then(Value::as_u64)
        .filter(|d| *d > 0)
        .unwrap_or(1);
    if !path.exists() {
        return not_found(&path, &target);
    }
    if !path.is_dir() {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            &format!(
                "path '{}' is not a directory",
                target.fs.sandbox_path(&path)
            ),
        );
    }
    let mut entries = Vec::new();
    walk(&target, &path, depth, &mut entries);
    ok_json(json!({"entries": entries}))
}

pub(crate) async fn move_entry(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (target, message) = match unary(&shared, &headers, &body) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let (source, destination) = match (
        path_field(&target, &message, "source"),
        path_field(&target, &message, "destination"),
    ) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(response), _) | (_, Err(response)) => return response,
    };
    if std::fs::symlink_metadata(&source).is_err() {
        return not_found(&source, &target);
    }
    if let Some(parent) = destination.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::rename(&source, &destination) {
        Ok(()) => ok_json(json!({"entry": entry_info(&target, &destination)})),
        Err(e) => connect_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}
