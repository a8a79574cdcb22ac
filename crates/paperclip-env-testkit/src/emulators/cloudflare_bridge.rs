//! An emulator of the Paperclip Cloudflare bridge Worker, protocol v1
//! (spec 23 §4, §5, §10). Sandboxes are get-or-create by id; commands run as
//! real local processes through the bridge's login-shell wrapper; streaming
//! exec speaks SSE with `: keepalive` comments.
//!
//! The sandbox filesystem is the host's: tests point `requestedCwd` at a
//! temporary directory.
//!
//! ```no_run
//! # async fn demo() {
//! use paperclip_env_testkit::emulators::cloudflare_bridge::BridgeEmulator;
//! let bridge = BridgeEmulator::start("bridge-token").await.unwrap();
//! assert_eq!(bridge.live_sandboxes(), 0);
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const PREFIX: &str = "/api/paperclip-sandbox/v1";

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub enum BridgeFault {
    /// A JSON error `{"error", "message"}` with this status.
    Status(u16, &'static str),
    /// An HTML error page (a proxy or Cloudflare 1010) with this status.
    Html(u16),
    /// 200 with a non-JSON content type.
    NonJsonOk,
    /// Delay before answering (headers included).
    Delay(Duration),
    /// Streaming exec: omit the last stdout event (the `complete` payload still has it).
    DropFinalChunk,
    /// Streaming exec: send an `error` event instead of `complete`.
    SseError,
    /// Streaming exec: close the stream without `complete`.
    SseNoComplete,
    /// Streaming exec: CRLF framing, one byte per HTTP chunk.
    SseCrlfBytewise,
    /// Exec: a result object without `exitCode`.
    NoExitCode,
}

/// A route faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BridgeRoute {
    /// `GET /health`.
    Health,
    /// `POST /probe`.
    Probe,
    /// `POST /leases/acquire`.
    Acquire,
    /// `POST /leases/resume`.
    Resume,
    /// `POST /leases/release`.
    Release,
    /// `DELETE /leases/{id}`.
    Destroy,
    /// `POST /exec`.
    Exec,
}

fn route_of(method: &Method, path: &str) -> Option<BridgeRoute> {
    let path = path.trim_end_matches('/');
    let rest = path.strip_prefix(PREFIX)?;
    Some(match (method.as_str(), rest) {
        ("GET", "/health") => BridgeRoute::Health,
        ("POST", "/probe") => BridgeRoute::Probe,
        ("POST", "/leases/acquire") => BridgeRoute::Acquire,
        ("POST", "/leases/resume") => BridgeRoute::Resume,
        ("POST", "/leases/release") => BridgeRoute::Release,
        ("DELETE", r) if r.starts_with("/leases/") => BridgeRoute::Destroy,
        ("POST", "/exec") => BridgeRoute::Exec,
        _ => return None,
    })
}

#[derive(Debug, Default)]
struct CfSandbox {
    /// The container's filesystem: a root of its own playing `/`.
    fs: Option<super::sandbox_fs::SandboxFs>,
    keep_alive: bool,
    sleep_after: String,
    sentinel: Option<String>,
    sessions: HashSet<String>,
    processes: HashSet<i32>,
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct BridgeRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Headers (lower-cased names).
    pub headers: Vec<(String, String)>,
    /// Body, parsed when JSON.
    pub body: Value,
}

impl BridgeRequest {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    token: String,
    root: tempfile::TempDir,
    sandboxes: Mutex<HashMap<String, CfSandbox>>,
    faults: super::FaultQueue<BridgeRoute, BridgeFault>,
    requests: Mutex<Vec<BridgeRequest>>,
    scripts: Mutex<Vec<String>>,
    random: AtomicU64,
    execs: AtomicUsize,
    keepalive: Mutex<Duration>,
}

/// The running emulator; kills every sandbox process on drop.
pub struct BridgeEmulator {
    server: super::serve::Server,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BridgeEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeEmulator")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl BridgeEmulator {
    /// Starts on 127.0.0.1 with a random port; `token` is `BRIDGE_AUTH_TOKEN`
    /// (empty: every request is rejected).
    pub async fn start(token: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            root: tempfile::Builder::new()
                .prefix("paperclip-cf-emulator-")
                .tempdir()?,
            sandboxes: Mutex::new(HashMap::new()),
            faults: Default::default(),
            requests: Mutex::new(Vec::new()),
            scripts: Mutex::new(Vec::new()),
            random: AtomicU64::new(0xabcd_0000),
            execs: AtomicUsize::new(0),
            keepalive: Mutex::new(Duration::from_secs(15)),
        });
        let app = Router::new()
            .fallback(dispatch)
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                auth_record_inject,
            ))
            .with_state(shared.clone());
        let server = super::serve::Server::start(app).await?;
        Ok(BridgeEmulator { server, shared })
    }

    /// `http://127.0.0.1:<port>` (allowed: it is localhost).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Sandboxes that exist.
    pub fn live_sandboxes(&self) -> usize {
        self.shared.sandboxes.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Ids of the sandboxes that exist.
    pub fn sandbox_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .shared
            .sandboxes
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// `(keepAlive, sleepAfter)` of a sandbox.
    pub fn sandbox_settings(&self, id: &str) -> Option<(bool, String)> {
        self.shared
            .sandboxes
            .lock()
            .ok()?
            .get(id)
            .map(|s| (s.keep_alive, s.sleep_after.clone()))
    }

    /// Simulates a container restart: the sandbox's lease sentinel is gone.
    pub fn wipe(&self, id: &str) {
        if let Some(s) = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            s.sentinel = None;
        }
    }

    /// `POST /exec` calls received.
    pub fn exec_calls(&self) -> usize {
        self.shared.execs.load(Ordering::SeqCst)
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<BridgeRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Every script the bridge ran.
    pub fn scripts(&self) -> Vec<String> {
        self.shared
            .scripts
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Queues `fault` for the next `times` requests of `route` (`usize::MAX`: sticky).
    pub fn inject(&self, route: BridgeRoute, fault: BridgeFault, times: usize) {
        self.shared.faults.push(route, fault, times);
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Interval of `: keepalive` comments on streaming exec (default 15 s).
    pub fn set_keepalive_interval(&self, interval: Duration) {
        *self
            .shared
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = interval;
    }
}

impl Drop for BridgeEmulator {
    fn drop(&mut self) {
        for (_, sandbox) in self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            for pgid in sandbox.processes {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let s = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        s,
        [("content-type", "application/json")],
        json!({"error": code, "message": message}).to_string(),
    )
        .into_response()
}

fn ok(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct Injected(BridgeFault);

async fn auth_record_inject(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    if let Ok(mut requests) = shared.requests.lock() {
        requests.push(BridgeRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        });
    }
    let presented = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if shared.token.is_empty() || !constant_time_eq(presented.as_bytes(), shared.token.as_bytes()) {
        return error(
            401,
            "unauthorized",
            "Missing or invalid bridge bearer token.",
        );
    }
    let route = route_of(&parts.method, parts.uri.path());
    if route == Some(BridgeRoute::Exec) {
        shared.execs.fetch_add(1, Ordering::SeqCst);
    }
    let mut request = Request::from_parts(parts, Body::from(bytes));
    if let Some(route) = route
        && let Some(fault) = shared.faults.take(&route)
    {
        match fault {
            BridgeFault::Status(status, code) => {
                return error(status, code, &format!("injected {code}"));
            }
            BridgeFault::Html(status) => {
                let s = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                return (s, [("content-type", "text/html; charset=UTF-8")], "<!DOCTYPE html><html><head><title>Access denied | error code: 1010</title></head><body>Cloudflare</body></html>").into_response();
            }
            BridgeFault::NonJsonOk => {
                return (StatusCode::OK, [("content-type", "text/plain")], "ok").into_response();
            }
            BridgeFault::Delay(d) => tokio::time::sleep(d).await,
            other => {
                request.extensions_mut().insert(Injected(other));
            }
        }
    }
    next.run(request).await
}

fn body_json(bytes: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        error(
            500,
            "internal_error",
            &format!("Unexpected token in JSON: {e}"),
        )
    })
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn b(v: &Value, key: &str, default: bool) -> bool {
    match v.get(key) {
        None => default,
        Some(x) => x == &Value::Bool(true),
    }
}

fn normalize(id: &str) -> String {
    let lowered = id.trim().to_lowercase();
    let mut out = String::new();
    let mut dash = false;
    for c in lowered.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
            if c == '-' {
                if !dash {
                    out.push('-');
                }
                dash = true;
            } else {
                out.push(c);
                dash = false;
            }
        } else if !dash {
            out.push('-');
            dash = true;
        }
    }
    out.trim_matches('-').to_owned()
}

fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r#"'"'"'"#))
}

/// The bridge's login-shell wrapper (spec 23 §5.3).
fn wrapper(
    command: &str,
    args: &[String],
    cwd: Option<&str>,
    env: &serde_json::Map<String, Value>,
    stdin_file: Option<&str>,
) -> Result<String, String> {
    let mut assignments = Vec::new();
    for (k, v) in env {
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("Invalid sandbox environment variable key: {k}"));
        }
        if let Some(v) = v.as_str() {
            assignments.push(format!("{k}={}", quote(v)));
        }
    }
    let words = std::iter::once(command)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut exec = if assignments.is_empty() {
        format!("exec {words}")
    } else {
        format!("exec env {} {words}", assignments.join(" "))
    };
    if let Some(file) = stdin_file {
        exec.push_str(&format!(" < {}", quote(file)));
    }
    let mut parts = vec![
        "if [ -f /etc/profile ]; then . /etc/profile >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.profile\" ]; then . \"$HOME/.profile\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.bash_profile\" ]; then . \"$HOME/.bash_profile\" >/dev/null 2>&1 || true; elif [ -f \"$HOME/.bashrc\" ]; then . \"$HOME/.bashrc\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.zprofile\" ]; then . \"$HOME/.zprofile\" >/dev/null 2>&1 || true; fi".to_owned(),
        "export NVM_DIR=\"${NVM_DIR:-$HOME/.nvm}\"".to_owned(),
        "[ -s \"$NVM_DIR/nvm.sh\" ] && . \"$NVM_DIR/nvm.sh\" >/dev/null 2>&1 || true".to_owned(),
    ];
    if let Some(cwd) = cwd {
        parts.push(format!("cd {}", quote(cwd)));
    }
    parts.push(exec);
    Ok(parts.join(" && "))
}

/// The container user's home (the Cloudflare sandbox runs as root).
const HOME: &str = "/root";

/// The filesystem of container `id`, created on first use.
fn container_fs(shared: &Shared, id: &str) -> Result<super::sandbox_fs::SandboxFs, Response> {
    let mut sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let sandbox = sandboxes.entry(id.to_owned()).or_default();
    if let Some(fs) = &sandbox.fs {
        return Ok(fs.clone());
    }
    let dir: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let fs = super::sandbox_fs::SandboxFs::create(shared.root.path().join(dir))
        .and_then(|fs| std::fs::create_dir_all(fs.root().join("root")).map(|()| fs))
        .map_err(|e| error(500, "internal_error", &format!("container filesystem: {e}")))?;
    sandbox.fs = Some(fs.clone());
    Ok(fs)
}

fn ensure_workspace(shared: &Shared, id: &str, cwd: &str) -> Result<(), Response> {
    let fs = container_fs(shared, id)?;
    let failed = |e: String| {
        error(
            500,
            "internal_error",
            &format!("mkdir -p {cwd} failed with exit code 1: {e}"),
        )
    };
    let host = fs.resolve(cwd, HOME).map_err(|e| failed(e.0))?;
    std::fs::create_dir_all(host).map_err(|e| failed(e.to_string()))
}

fn sentinel(id: &str, cwd: &str, body: &Value, resumed: bool) -> String {
    let json = json!({"provider": "cloudflare", "providerLeaseId": id, "remoteCwd": cwd,
        "sessionStrategy": if s(body, "sessionStrategy").as_deref() == Some("default") { "default" } else { "named" },
        "sessionId": s(body, "sessionId").unwrap_or_else(|| "paperclip".into()), "keepAlive": b(body, "keepAlive", false),
        "sleepAfter": s(body, "sleepAfter").unwrap_or_else(|| "10m".into()), "normalizeId": b(body, "normalizeId", true),
        "resumedLease": resumed, "updatedAt": chrono::Utc::now().to_rfc3339()});
    format!(
        "{}\n",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    )
}

fn lease_metadata(id: &str, cwd: &str, body: &Value, resumed: bool) -> Value {
    json!({"providerLeaseId": id, "metadata": {"provider": "cloudflare", "remoteCwd": cwd, "sandboxId": id,
        "sessionStrategy": if s(body, "sessionStrategy").as_deref() == Some("default") { "default" } else { "named" },
        "sessionId": s(body, "sessionId").unwrap_or_else(|| "paperclip".into()), "keepAlive": b(body, "keepAlive", false),
        "sleepAfter": s(body, "sleepAfter").unwrap_or_else(|| "10m".into()), "normalizeId": b(body, "normalizeId", true),
        "resumedLease": resumed}})
}

fn get_or_create(shared: &Shared, id: &str, body: &Value) {
    let mut sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let sandbox = sandboxes.entry(id.to_owned()).or_default();
    sandbox.keep_alive = b(body, "keepAlive", false);
    sandbox.sleep_after = s(body, "sleepAfter").unwrap_or_else(|| "10m".into());
}

fn destroy(shared: &Shared, id: &str) {
    if let Some(sandbox) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id)
    {
        for pgid in sandbox.processes {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        if let Some(fs) = sandbox.fs {
            let _ = std::fs::remove_dir_all(fs.root());
        }
    }
}

async fn dispatch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let injected = request.extensions().get::<Injected>().map(|i| i.0.clone());
    let headers = request.headers().clone();
    let bytes = axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let Some(route) = route_of(&method, &path) else {
        return error(
            404,
            "not_found",
            &format!("No bridge route matched {method} {path}."),
        );
    };
    let result = match route {
        BridgeRoute::Health => Ok(ok(
            json!({"ok": true, "provider": "cloudflare", "bridgeVersion": "0.1.0",
            "capabilities": {"reuseLease": true, "namedSessions": true, "previewUrls": false}}),
        )),
        BridgeRoute::Probe => probe(&shared, &bytes).await,
        BridgeRoute::Acquire => acquire(&shared, &bytes),
        BridgeRoute::Resume => resume(&shared, &bytes),
        BridgeRoute::Release => release(&shared, &bytes),
        BridgeRoute::Destroy => {
            let id = path.rsplit('/').next().unwrap_or("");
            let id = percent_decode(id);
            if id.is_empty() {
                Ok(error(
                    400,
                    "invalid_request",
                    "providerLeaseId path parameter is required.",
                ))
            } else {
                destroy(&shared, &id);
                Ok(ok(json!({"ok": true})))
            }
        }
        BridgeRoute::Exec => exec(shared.clone(), &bytes, injected, &headers).await,
    };
    result.unwrap_or_else(|response| response)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn probe(shared: &Arc<Shared>, bytes: &Bytes) -> Result<Response, Response> {
    let body = body_json(bytes)?;
    let n = shared.random.fetch_add(1, Ordering::SeqCst);
    let id = format!("pc-probe-{}-{n:08x}", chrono::Utc::now().timestamp_millis());
    get_or_create(shared, &id, &body);
    let cwd = s(&body, "requestedCwd").unwrap_or_else(|| "/workspace/paperclip".into());
    let result = ensure_workspace(shared, &id, &cwd);
    destroy(shared, &id);
    result?;
    Ok(ok(
        json!({"ok": true, "summary": "Connected to Cloudflare sandbox bridge.",
        "metadata": {"provider": "cloudflare", "remoteCwd": cwd, "namedSessions": s(&body, "sessionStrategy").as_deref() != Some("default"), "stdout": format!("{cwd}\n")}}),
    ))
}

fn acquire(shared: &Arc<Shared>, bytes: &Bytes) -> Result<Response, Response> {
    let body = body_json(bytes)?;
    let (Some(env_id), Some(run_id)) = (s(&body, "environmentId"), s(&body, "runId")) else {
        return Ok(error(
            400,
            "invalid_request",
            "environmentId and runId are required.",
        ));
    };
    let reuse = b(&body, "reuseLease", false);
    let raw = if reuse {
        format!("pc-env-{env_id}")
    } else {
        format!(
            "pc-{run_id}-{:08x}",
            shared.random.fetch_add(1, Ordering::SeqCst)
        )
    };
    let id = if b(&body, "normalizeId", true) {
        normalize(&raw)
    } else {
        raw
    };
    let cwd = s(&body, "requestedCwd").unwrap_or_else(|| "/workspace/paperclip".into());
    get_or_create(shared, &id, &body);
    if let Err(response) = ensure_workspace(shared, &id, &cwd) {
        if !reuse {
            destroy(shared, &id);
        }
        return Err(response);
    }
    if let Some(sandbox) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        sandbox.sentinel = Some(sentinel(&id, &cwd, &body, false));
    }
    Ok(ok(lease_metadata(&id, &cwd, &body, false)))
}

fn resume(shared: &Arc<Shared>, bytes: &Bytes) -> Result<Response, Response> {
    let body = body_json(bytes)?;
    let Some(id) = s(&body, "providerLeaseId") else {
        return Ok(error(
            400,
            "invalid_request",
            "providerLeaseId is required.",
        ));
    };
    get_or_create(shared, &id, &body);
    let cwd = s(&body, "requestedCwd").unwrap_or_else(|| "/workspace/paperclip".into());
    let has_sentinel = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .is_some_and(|s| s.sentinel.is_some());
    if !has_sentinel {
        return Ok(error(
            409,
            "sandbox_state_lost",
            "Cloudflare sandbox state is no longer available.",
        ));
    }
    ensure_workspace(shared, &id, &cwd)?;
    if let Some(sandbox) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        sandbox.sentinel = Some(sentinel(&id, &cwd, &body, true));
    }
    Ok(ok(lease_metadata(&id, &cwd, &body, true)))
}

fn release(shared: &Arc<Shared>, bytes: &Bytes) -> Result<Response, Response> {
    let body = body_json(bytes)?;
    if let Some(id) = s(&body, "providerLeaseId")
        && !b(&body, "reuseLease", false)
    {
        destroy(shared, &id);
    }
    Ok(ok(json!({"ok": true})))
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

async fn exec(
    shared: Arc<Shared>,
    bytes: &Bytes,
    fault: Option<BridgeFault>,
    _headers: &HeaderMap,
) -> Result<Response, Response> {
    let body = body_json(bytes)?;
    let (Some(id), Some(command)) = (
        s(&body, "providerLeaseId"),
        body.get("command")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
    ) else {
        return Ok(error(
            400,
            "invalid_request",
            "providerLeaseId and command are required.",
        ));
    };
    let args: Vec<String> = body
        .get("args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let cwd = body.get("cwd").and_then(Value::as_str).map(str::to_owned);
    let env = body
        .get("env")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let timeout = Duration::from_millis(
        body.get("timeoutMs")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(300_000.0) as u64,
    );
    let strategy_default = s(&body, "sessionStrategy").as_deref() == Some("default");
    let session = s(&body, "sessionId").unwrap_or_else(|| "paperclip".into());
    let stream = body.get("streamOutput") == Some(&Value::Bool(true));
    // exec does not check the sentinel: an unknown id gets a fresh container.
    get_or_create(&shared, &id, &json!({}));
    if !strategy_default {
        shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default()
            .sessions
            .insert(session.clone());
    }
    let fs = container_fs(&shared, &id)?;
    let stdin_file = match body
        .get("stdin")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(stdin) => {
            let path = format!("/tmp/.paperclip-bridge-stdin-{}", uuid::Uuid::new_v4());
            let host = fs
                .resolve(&path, HOME)
                .map_err(|e| error(500, "internal_error", &e.0))?;
            std::fs::write(&host, stdin)
                .map_err(|e| error(500, "internal_error", &e.to_string()))?;
            Some(path)
        }
        None => None,
    };
    let script = match wrapper(&command, &args, cwd.as_deref(), &env, stdin_file.as_deref()) {
        Ok(script) => script,
        Err(message) => return Ok(error(500, "internal_error", &message)),
    };
    shared
        .scripts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(script.clone());
    // The container's paths (its cwd, /tmp, /workspace…) live under its root.
    let mut child = fs
        .command("sh", fs.root(), HOME)
        .arg("-lc")
        .arg(fs.map_in(&script))
        .spawn()
        .map_err(|e| error(500, "internal_error", &e.to_string()))?;
    let pgid = child.id().unwrap_or(0) as i32;
    if let Some(sandbox) = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        sandbox.processes.insert(pgid);
    }
    let (tx, mut rx) = mpsc::channel::<Chunk>(64);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(super::sandbox_fs::pump(
            out,
            fs.unmapper(),
            tx.clone(),
            Chunk::Out,
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(super::sandbox_fs::pump(
            err,
            fs.unmapper(),
            tx.clone(),
            Chunk::Err,
        ));
    }
    drop(tx);

    let crlf = matches!(fault, Some(BridgeFault::SseCrlfBytewise));
    let (sse_tx, sse_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let keepalive = *shared.keepalive.lock().unwrap_or_else(|p| p.into_inner());
    let shared2 = shared.clone();
    let id2 = id.clone();
    let finish = async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut events: Vec<(String, Vec<u8>)> = Vec::new();
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let mut timed_out = false;
        let send = |tx: &mpsc::Sender<Result<Bytes, std::io::Error>>, text: String| {
            let tx = tx.clone();
            async move {
                let text = if crlf {
                    text.replace('\n', "\r\n")
                } else {
                    text
                };
                if crlf {
                    for byte in text.into_bytes() {
                        if tx.send(Ok(Bytes::from(vec![byte]))).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = tx.send(Ok(Bytes::from(text))).await;
                }
            }
        };
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(Chunk::Out(d)) => {
                        stdout.extend_from_slice(&d);
                        events.push(("stdout".into(), d));
                        if stream && let Some((kind, data)) = (events.len() > 1).then(|| events[events.len() - 2].clone()) {
                            send(&sse_tx, format!("event: {kind}\ndata: {}\n\n", json!({"data": String::from_utf8_lossy(&data)}))).await;
                        }
                    }
                    Some(Chunk::Err(d)) => {
                        stderr.extend_from_slice(&d);
                        events.push(("stderr".into(), d));
                        if stream && let Some((kind, data)) = (events.len() > 1).then(|| events[events.len() - 2].clone()) {
                            send(&sse_tx, format!("event: {kind}\ndata: {}\n\n", json!({"data": String::from_utf8_lossy(&data)}))).await;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if stream {
                        send(&sse_tx, ": keepalive\n\n".into()).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    timed_out = true;
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    break;
                }
            }
        }
        let status = child.wait().await;
        if let Some(file) = &stdin_file
            && let Ok(host) = fs.resolve(file, HOME)
        {
            let _ = std::fs::remove_file(host);
        }
        if let Some(sandbox) = shared2
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id2)
        {
            sandbox.processes.remove(&pgid);
        }
        // Streaming sends each event one step late; the last one goes out now
        // unless the fault drops it (the completion payload still carries it).
        if stream
            && let Some((kind, data)) = events.last().cloned()
            && !(fault == Some(BridgeFault::DropFinalChunk) && kind == "stdout")
        {
            send(
                &sse_tx,
                format!(
                    "event: {kind}\ndata: {}\n\n",
                    json!({"data": String::from_utf8_lossy(&data)})
                ),
            )
            .await;
        }
        let result = if timed_out {
            if strategy_default {
                destroy(&shared2, &id2);
            } else if let Some(sandbox) = shared2
                .sandboxes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&id2)
            {
                sandbox.sessions.remove(&session);
            }
            json!({"exitCode": null, "signal": null, "timedOut": true, "stdout": String::from_utf8_lossy(&stdout),
                   "stderr": format!("Command timed out after {}ms\n", timeout.as_millis())})
        } else {
            let code = status.ok().and_then(|s| s.code());
            let mut r = json!({"exitCode": code.unwrap_or(1), "signal": null, "timedOut": false,
                "stdout": String::from_utf8_lossy(&stdout), "stderr": String::from_utf8_lossy(&stderr)});
            if fault == Some(BridgeFault::NoExitCode) {
                r.as_object_mut().map(|o| o.remove("exitCode"));
            }
            r
        };
        if stream {
            match fault {
                Some(BridgeFault::SseError) => {
                    send(
                        &sse_tx,
                        format!(
                            "event: error\ndata: {}\n\n",
                            json!({"error": "sandbox exploded"})
                        ),
                    )
                    .await
                }
                Some(BridgeFault::SseNoComplete) => {}
                _ => send(&sse_tx, format!("event: complete\ndata: {result}\n\n")).await,
            }
        }
        result
    };
    if stream {
        tokio::spawn(finish);
        let body = Body::from_stream(futures::stream::unfold(sse_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        return Ok((
            StatusCode::OK,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
            ],
            body,
        )
            .into_response());
    }
    drop(sse_rx);
    Ok(ok(finish.await))
}
