//! An emulator of Daytona's REST API and toolbox daemon (spec 22 §6): the
//! sandbox state machine, persistent sessions running real local processes,
//! the log-follow WebSocket with 3-byte stream markers, bulk upload and
//! download, and fault injection per route.
//!
//! ```no_run
//! # async fn demo() {
//! use paperclip_env_testkit::emulators::daytona::DaytonaEmulator;
//! let emulator = DaytonaEmulator::start("dtn_test_key").await.unwrap();
//! // Use emulator.url() as the provider's `apiUrl`; every sandbox's
//! // `toolboxProxyUrl` points back at the emulator.
//! assert_eq!(emulator.live_sandboxes(), 0);
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::fake::DEFAULT_PATH;

/// A route faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /sandbox`.
    Create,
    /// `GET /sandbox/{id}`.
    Get,
    /// `POST /sandbox/{id}/start`.
    Start,
    /// `POST /sandbox/{id}/stop`.
    Stop,
    /// `DELETE /sandbox/{id}`.
    Delete,
    /// Toolbox `GET /work-dir`.
    WorkDir,
    /// Toolbox `POST /files/folder`.
    Folder,
    /// Toolbox `POST /files/bulk-upload`.
    Upload,
    /// Toolbox `POST /files/bulk-download`.
    Download,
    /// Toolbox `POST /process/execute`.
    Execute,
    /// Toolbox `POST /process/session`.
    SessionCreate,
    /// Toolbox `POST /process/session/{sid}/exec`.
    SessionExec,
    /// Toolbox `GET /process/session/{sid}/command/{cid}`.
    CommandStatus,
    /// Toolbox `GET …/logs` (JSON or WebSocket).
    Logs,
    /// Toolbox `DELETE /process/session/{sid}`.
    SessionDelete,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match (method.as_str(), parts.as_slice()) {
            ("POST", ["sandbox"]) => Route::Create,
            ("GET", ["sandbox", _]) => Route::Get,
            ("POST", ["sandbox", _, "start"]) => Route::Start,
            ("POST", ["sandbox", _, "stop"]) => Route::Stop,
            ("DELETE", ["sandbox", _]) => Route::Delete,
            ("GET", ["toolbox", _, "work-dir"]) => Route::WorkDir,
            ("POST", ["toolbox", _, "files", "folder"]) => Route::Folder,
            ("POST", ["toolbox", _, "files", "bulk-upload"]) => Route::Upload,
            ("POST", ["toolbox", _, "files", "bulk-download"]) => Route::Download,
            ("POST", ["toolbox", _, "process", "execute"]) => Route::Execute,
            ("POST", ["toolbox", _, "process", "session"]) => Route::SessionCreate,
            ("POST", ["toolbox", _, "process", "session", _, "exec"]) => Route::SessionExec,
            ("GET", ["toolbox", _, "process", "session", _, "command", _]) => Route::CommandStatus,
            ("GET", ["toolbox", _, "process", "session", _, "command", _, "logs"]) => Route::Logs,
            ("DELETE", ["toolbox", _, "process", "session", _]) => Route::SessionDelete,
            _ => return None,
        })
    }
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status (API error body of spec 22 §5.4); a 429 also
    /// carries `X-RateLimit-*` headers.
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// Wait before handling.
    Delay(Duration),
    /// Create/Start: the sandbox stays in `starting` forever.
    StuckStarting,
    /// Logs (WebSocket): never close the socket, even after the command ended.
    LogsNeverClose,
    /// Logs (WebSocket): drop the connection after the first frame.
    DropLogs,
}

#[derive(Clone)]
struct SpecialFault(Fault);

struct Command {
    command: String,
    log: Mutex<Vec<u8>>,
    exit: Mutex<Option<i32>>,
}

struct Session {
    commands: HashMap<String, Arc<Command>>,
    pgids: Vec<i32>,
}

struct Sbx {
    name: String,
    labels: Value,
    create_body: Value,
    state: String,
    pending: Option<(String, Instant)>,
    recoverable: bool,
    error_reason: Option<String>,
    root: PathBuf,
    sessions: HashMap<String, Session>,
    pgids: Vec<i32>,
    created_at: String,
    updated_at: String,
}

impl Sbx {
    fn settle(&mut self) {
        if let Some((target, at)) = &self.pending
            && Instant::now() >= *at
        {
            self.state = target.clone();
            self.pending = None;
            self.updated_at = now();
        }
    }

    fn kill_all(&mut self) {
        for pgid in self.pgids.drain(..) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        self.sessions.clear();
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Method.
    pub method: String,
    /// Path (no query).
    pub path: String,
    /// Query string.
    pub query: Option<String>,
    /// Headers, lower-cased names (sensitive values included: tests assert on them).
    pub headers: Vec<(String, String)>,
    /// Body, lossily decoded, at most 64 KiB.
    pub body: String,
}

impl RecordedRequest {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// A snapshot of one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSnapshot {
    /// Id.
    pub id: String,
    /// State (`started`, `stopped`, …).
    pub state: String,
    /// Labels sent at create.
    pub labels: Value,
    /// The whole create body.
    pub create_body: Value,
}

struct Shared {
    api_key: String,
    base: String,
    root: tempfile::TempDir,
    sandboxes: Mutex<HashMap<String, Sbx>>,
    faults: super::FaultQueue<Route, Fault>,
    requests: Mutex<Vec<RecordedRequest>>,
    creates: AtomicUsize,
    execs: AtomicUsize,
    next_id: AtomicUsize,
    transition: Mutex<Duration>,
    snapshots: Mutex<HashMap<String, String>>,
}

/// The running emulator; stops (and kills every sandbox process) on drop.
pub struct DaytonaEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for DaytonaEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaytonaEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DaytonaEmulator {
    /// Starts on 127.0.0.1 with a random port; `api_key` is the only key accepted.
    pub async fn start(api_key: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            base: format!("http://{addr}"),
            root: tempfile::Builder::new()
                .prefix("paperclip-daytona-emulator-")
                .tempdir()?,
            sandboxes: Mutex::new(HashMap::new()),
            faults: Default::default(),
            requests: Mutex::new(Vec::new()),
            creates: AtomicUsize::new(0),
            execs: AtomicUsize::new(0),
            next_id: AtomicUsize::new(1),
            transition: Mutex::new(Duration::from_millis(30)),
            snapshots: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/sandbox", post(create))
            .route("/sandbox/{id}", get(get_sandbox).delete(delete_sandbox))
            .route("/sandbox/{id}/start", post(start))
            .route("/sandbox/{id}/stop", post(stop))
            .route("/sandbox/{id}/recover", post(recover))
            .route("/sandbox/{id}/archive", post(archive))
            .route("/sandbox/{id}/autodelete/{m}", post(autodelete))
            .route("/sandbox/{id}/labels", axum::routing::put(put_labels))
            .route("/sandbox/{id}/ports/{port}/preview-url", get(preview_url))
            .route("/sandbox/{id}/ssh-access", post(ssh_access))
            .route("/sandbox/{id}/snapshot", post(snapshot_sandbox))
            .route(
                "/snapshots/{name}",
                get(get_snapshot).delete(delete_snapshot),
            )
            .route("/toolbox/{id}/work-dir", get(work_dir))
            .route("/toolbox/{id}/user-home-dir", get(work_dir))
            .route("/toolbox/{id}/files/folder", post(folder))
            .route("/toolbox/{id}/files", delete(delete_file))
            .route("/toolbox/{id}/files/bulk-upload", post(bulk_upload))
            .route("/toolbox/{id}/files/bulk-download", post(bulk_download))
            .route("/toolbox/{id}/process/execute", post(execute))
            .route("/toolbox/{id}/process/session", post(session_create))
            .route(
                "/toolbox/{id}/process/session/{sid}",
                delete(session_delete),
            )
            .route(
                "/toolbox/{id}/process/session/{sid}/exec",
                post(session_exec),
            )
            .route(
                "/toolbox/{id}/process/session/{sid}/command/{cid}",
                get(command_status),
            )
            .route(
                "/toolbox/{id}/process/session/{sid}/command/{cid}/logs",
                get(command_logs),
            )
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                record_and_inject,
            ))
            .with_state(shared.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(DaytonaEmulator {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:<port>`: the API URL (the toolbox lives under `/toolbox`).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// Sandboxes that exist (any state but deleted).
    pub fn live_sandboxes(&self) -> usize {
        self.shared.sandboxes.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Sandboxes in `started` or a transition towards it (they use quota).
    pub fn running_sandboxes(&self) -> usize {
        self.sandboxes()
            .iter()
            .filter(|s| matches!(s.state.as_str(), "started" | "starting" | "creating"))
            .count()
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxSnapshot> {
        let mut sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SandboxSnapshot> = sandboxes
            .iter_mut()
            .map(|(id, s)| {
                s.settle();
                SandboxSnapshot {
                    id: id.clone(),
                    state: s.state.clone(),
                    labels: s.labels.clone(),
                    create_body: s.create_body.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// `POST /sandbox` calls received.
    pub fn create_calls(&self) -> usize {
        self.shared.creates.load(Ordering::SeqCst)
    }

    /// Command starts received (session exec).
    pub fn exec_calls(&self) -> usize {
        self.shared.execs.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Queues `fault` for the next `times` requests of `route`.
    pub fn inject(&self, route: Route, fault: Fault, times: usize) {
        self.shared.faults.push(route, fault, times);
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// How long `creating`/`starting`/`stopping` last (default 30 ms).
    pub fn set_transition_delay(&self, delay: Duration) {
        *self
            .shared
            .transition
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Scripts a state (e.g. `error` with `recoverable`, `build_failed`),
    /// or simulates auto-stop with `stopped` (kills the sandbox's processes).
    pub fn set_state(&self, id: &str, state: &str, recoverable: bool, reason: Option<&str>) {
        let mut sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sandboxes.get_mut(id) {
            if state != "started" {
                s.kill_all();
            }
            s.state = state.to_owned();
            s.pending = None;
            s.recoverable = recoverable;
            s.error_reason = reason.map(str::to_owned);
            s.updated_at = now();
        }
    }
}

impl Drop for DaytonaEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let mut sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, mut sandbox) in sandboxes.drain() {
            sandbox.kill_all();
        }
    }
}

impl Shared {
    fn take_fault(&self, route: Route) -> Option<Fault> {
        self.faults.take(&route)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", self.api_key).as_str())
    }

    fn transition(&self) -> Duration {
        *self.transition.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sandbox_json(&self, id: &str, s: &Sbx) -> Value {
        let b = &s.create_body;
        json!({"id": id, "organizationId": "org-emulator", "name": s.name, "user": "daytona", "env": {},
            "labels": s.labels, "public": false, "networkBlockAll": false,
            "target": b.get("target").cloned().unwrap_or(json!("us")),
            "cpu": b.get("cpu").cloned().unwrap_or(json!(1)), "gpu": b.get("gpu").cloned().unwrap_or(json!(0)),
            "memory": b.get("memory").cloned().unwrap_or(json!(1)), "disk": b.get("disk").cloned().unwrap_or(json!(3)),
            "state": s.state, "errorReason": s.error_reason, "recoverable": s.recoverable,
            "snapshot": b.get("snapshot").cloned().unwrap_or(Value::Null),
            "autoStopInterval": b.get("autoStopInterval").cloned().unwrap_or(json!(15)),
            "autoArchiveInterval": b.get("autoArchiveInterval").cloned().unwrap_or(json!(60)),
            "autoDeleteInterval": b.get("autoDeleteInterval").cloned().unwrap_or(json!(-1)),
            "createdAt": s.created_at, "updatedAt": s.updated_at,
            "toolboxProxyUrl": format!("{}/toolbox", self.base)})
    }
}

fn api_error(status: u16, message: &str, path: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        json!({"path": format!("/api{path}"), "timestamp": now(), "statusCode": status,
            "error": code.canonical_reason().unwrap_or("Error"), "message": message})
        .to_string(),
    )
        .into_response()
}

fn daemon_error(status: u16, code: &str, message: &str) -> Response {
    let s = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        s,
        [("content-type", "application/json")],
        json!({"statusCode": status, "message": message, "code": code, "timestamp": now()})
            .to_string(),
    )
        .into_response()
}

async fn record_and_inject(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 256 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if let Ok(mut requests) = shared.requests.lock() {
        requests.push(RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_owned),
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
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]).into_owned(),
        });
    }
    if !shared.authorized(&parts.headers) {
        return api_error(401, "Unauthorized", &path);
    }
    let route = Route::of(&parts.method, &path);
    match route {
        Some(Route::Create) => {
            shared.creates.fetch_add(1, Ordering::SeqCst);
        }
        Some(Route::SessionExec) => {
            shared.execs.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    let mut request = Request::from_parts(parts, Body::from(bytes));
    if let Some(route) = route
        && let Some(fault) = shared.take_fault(route)
    {
        match fault {
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Status {
                status,
                retry_after,
            } => {
                let mut response = api_error(status, &format!("injected {status}"), &path);
                let headers = response.headers_mut();
                if let Some(after) = retry_after
                    && let Ok(value) = after.parse()
                {
                    headers.insert("retry-after", value);
                }
                if status == 429 {
                    headers.insert(
                        "x-ratelimit-limit-sandbox",
                        axum::http::HeaderValue::from_static("10"),
                    );
                    headers.insert(
                        "x-ratelimit-remaining-sandbox",
                        axum::http::HeaderValue::from_static("0"),
                    );
                    headers.insert(
                        "x-ratelimit-reset-sandbox",
                        axum::http::HeaderValue::from_static("1"),
                    );
                }
                return response;
            }
            special => {
                request.extensions_mut().insert(SpecialFault(special));
            }
        }
    }
    next.run(request).await
}

fn special(request: &Request) -> Option<Fault> {
    request
        .extensions()
        .get::<SpecialFault>()
        .map(|f| f.0.clone())
}

async fn create(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let fault = special(&request);
    let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if body.get("snapshot").is_some_and(|v| !v.is_null())
        && body.get("buildInfo").is_some_and(|v| !v.is_null())
    {
        return api_error(
            400,
            "Cannot specify both snapshot and buildInfo",
            "/sandbox",
        );
    }
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let id = format!(
        "sbx-{n:04}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let root = shared.root.path().join(&id);
    if let Err(e) = std::fs::create_dir_all(&root) {
        return api_error(500, &format!("cannot create sandbox root: {e}"), "/sandbox");
    }
    let stuck = fault == Some(Fault::StuckStarting);
    let image = body.get("buildInfo").is_some_and(|v| !v.is_null());
    let sbx = Sbx {
        name: id.clone(),
        labels: body.get("labels").cloned().unwrap_or(json!({})),
        create_body: body.clone(),
        state: if stuck {
            "starting"
        } else if image {
            "pending_build"
        } else {
            "creating"
        }
        .to_owned(),
        pending: (!stuck).then(|| ("started".to_owned(), Instant::now() + shared.transition())),
        recoverable: false,
        error_reason: None,
        root,
        sessions: HashMap::new(),
        pgids: Vec::new(),
        created_at: now(),
        updated_at: now(),
    };
    let out = shared.sandbox_json(&id, &sbx);
    if let Ok(mut sandboxes) = shared.sandboxes.lock() {
        sandboxes.insert(id, sbx);
    }
    Json(out)
}

#[allow(non_snake_case)]
fn Json(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn with_sandbox<T>(shared: &Shared, id: &str, f: impl FnOnce(&mut Sbx) -> T) -> Option<T> {
    let mut sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let s = sandboxes.get_mut(id)?;
    s.settle();
    Some(f(s))
}

fn not_found(id: &str) -> Response {
    api_error(
        404,
        &format!("Sandbox with ID or name {id} not found"),
        &format!("/sandbox/{id}"),
    )
}

async fn get_sandbox(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match with_sandbox(&shared, &id, |s| shared.sandbox_json(&id, s)) {
        Some(v) => Json(v),
        None => not_found(&id),
    }
}

async fn start(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let stuck = special(&request) == Some(Fault::StuckStarting);
    let delay = shared.transition();
    let result = with_sandbox(&shared, &id, |s| match s.state.as_str() {
        "started" | "starting" => Ok(()),
        "stopped" | "archived" => {
            s.state = "starting".into();
            s.pending = (!stuck).then(|| ("started".to_owned(), Instant::now() + delay));
            s.updated_at = now();
            Ok(())
        }
        other => Err(format!("Sandbox is in state {other} and cannot be started")),
    });
    match result {
        None => not_found(&id),
        Some(Err(m)) => api_error(400, &m, &format!("/sandbox/{id}/start")),
        Some(Ok(())) => match with_sandbox(&shared, &id, |s| shared.sandbox_json(&id, s)) {
            Some(v) => Json(v),
            None => not_found(&id),
        },
    }
}

async fn stop(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let delay = shared.transition();
    let result = with_sandbox(&shared, &id, |s| match s.state.as_str() {
        "started" => {
            s.kill_all();
            s.state = "stopping".into();
            s.pending = Some(("stopped".to_owned(), Instant::now() + delay));
            Ok(shared.sandbox_json(&id, s))
        }
        "stopping" | "stopped" => Ok(shared.sandbox_json(&id, s)),
        other => Err(format!("Sandbox is in state {other} and cannot be stopped")),
    });
    match result {
        None => not_found(&id),
        Some(Err(m)) => api_error(400, &m, &format!("/sandbox/{id}/stop")),
        Some(Ok(v)) => Json(v),
    }
}

async fn recover(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let delay = shared.transition();
    let result = with_sandbox(&shared, &id, |s| {
        if s.state == "error" && s.recoverable {
            s.state = "starting".into();
            s.error_reason = None;
            s.pending = Some(("started".to_owned(), Instant::now() + delay));
            Ok(shared.sandbox_json(&id, s))
        } else {
            Err("Sandbox is not in a recoverable error state".to_owned())
        }
    });
    match result {
        None => not_found(&id),
        Some(Err(m)) => api_error(400, &m, &format!("/sandbox/{id}/recover")),
        Some(Ok(v)) => Json(v),
    }
}

async fn archive(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let result = with_sandbox(&shared, &id, |s| {
        if s.state == "stopped" {
            s.state = "archived".into();
            Ok(shared.sandbox_json(&id, s))
        } else {
            Err("Sandbox must be stopped to be archived".to_owned())
        }
    });
    match result {
        None => not_found(&id),
        Some(Err(m)) => api_error(400, &m, &format!("/sandbox/{id}/archive")),
        Some(Ok(v)) => Json(v),
    }
}

async fn autodelete(
    State(shared): State<Arc<Shared>>,
    Path((id, m)): Path<(String, i64)>,
) -> Response {
    match with_sandbox(&shared, &id, |s| {
        s.create_body["autoDeleteInterval"] = json!(m)
    }) {
        Some(()) => StatusCode::OK.into_response(),
        None => not_found(&id),
    }
}

async fn put_labels(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let labels = body.get("labels").cloned().unwrap_or(json!({}));
    match with_sandbox(&shared, &id, |s| {
        s.labels = labels.clone();
        s.updated_at = now();
    }) {
        Some(()) => Json(json!({"labels": labels})),
        None => not_found(&id),
    }
}

async fn preview_url(
    State(shared): State<Arc<Shared>>,
    Path((id, port)): Path<(String, u16)>,
) -> Response {
    match with_sandbox(&shared, &id, |_| ()) {
        Some(()) => Json(
            json!({"sandboxId": id, "url": format!("https://{port}-{id}.proxy.daytona.invalid"),
            "token": format!("preview-{}", uuid::Uuid::new_v4().simple())}),
        ),
        None => not_found(&id),
    }
}

async fn ssh_access(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match with_sandbox(&shared, &id, |_| ()) {
        Some(()) => {
            let token = format!("ssh-{}", uuid::Uuid::new_v4().simple());
            Json(
                json!({"id": uuid::Uuid::new_v4().to_string(), "sandboxId": id, "token": token,
                "sshCommand": format!("ssh {token}@ssh.daytona.invalid"), "expiresAt": now(),
                "createdAt": now(), "updatedAt": now()}),
            )
        }
        None => not_found(&id),
    }
}

async fn snapshot_sandbox(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(name) = body["name"].as_str().map(str::to_owned) else {
        return api_error(400, "name is required", &format!("/sandbox/{id}/snapshot"));
    };
    let delay = shared.transition();
    let result = with_sandbox(&shared, &id, |s| {
        if s.state != "started" {
            return Err(format!(
                "Sandbox is in state {} and cannot be snapshotted",
                s.state
            ));
        }
        s.state = "snapshotting".into();
        s.pending = Some(("started".to_owned(), Instant::now() + delay));
        Ok(shared.sandbox_json(&id, s))
    });
    match result {
        None => not_found(&id),
        Some(Err(m)) => api_error(400, &m, &format!("/sandbox/{id}/snapshot")),
        Some(Ok(v)) => {
            if let Ok(mut snapshots) = shared.snapshots.lock() {
                snapshots.insert(name, format!("snap-{}", uuid::Uuid::new_v4().simple()));
            }
            Json(v)
        }
    }
}

async fn get_snapshot(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let snapshots = shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
    match snapshots
        .iter()
        .find(|(n, sid)| **n == name || **sid == name)
    {
        Some((n, sid)) => Json(json!({"id": sid, "name": n, "state": "active"})),
        None => api_error(
            404,
            &format!("Snapshot {name} not found"),
            &format!("/snapshots/{name}"),
        ),
    }
}

async fn delete_snapshot(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let mut snapshots = shared.snapshots.lock().unwrap_or_else(|p| p.into_inner());
    let before = snapshots.len();
    snapshots.retain(|n, sid| *n != name && *sid != name);
    if snapshots.len() < before {
        StatusCode::OK.into_response()
    } else {
        api_error(
            404,
            &format!("Snapshot {name} not found"),
            &format!("/snapshots/{name}"),
        )
    }
}

async fn delete_sandbox(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let removed = shared.sandboxes.lock().ok().and_then(|mut s| s.remove(&id));
    match removed {
        Some(mut s) => {
            s.kill_all();
            s.state = "destroying".into();
            let v = shared.sandbox_json(&id, &s);
            let _ = std::fs::remove_dir_all(&s.root);
            Json(v)
        }
        None => not_found(&id),
    }
}

/// The sandbox root when the sandbox is started (toolbox calls need it).
fn toolbox_root(shared: &Shared, id: &str) -> Result<PathBuf, Response> {
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

async fn work_dir(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match toolbox_root(&shared, &id) {
        Ok(root) => Json(json!({"dir": root.display().to_string()})),
        Err(r) => r,
    }
}

async fn folder(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let Some(path) = q.get("path") else {
        return daemon_error(400, "BAD_REQUEST", "path is required");
    };
    match std::fs::create_dir_all(path) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => daemon_error(400, "BAD_REQUEST", &e.to_string()),
    }
}

async fn delete_file(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let Some(path) = q.get("path") else {
        return daemon_error(400, "BAD_REQUEST", "path is required");
    };
    let p = std::path::Path::new(path);
    let result = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => daemon_error(404, "NOT_FOUND", "file not found"),
    }
}

async fn bulk_upload(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    mut multipart: Multipart,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let mut paths: HashMap<String, String> = HashMap::new();
    let mut files = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return daemon_error(400, "BAD_REQUEST", &e.to_string()),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let Ok(data) = field.bytes().await else {
            return daemon_error(400, "BAD_REQUEST", "unreadable part");
        };
        if let Some(index) = name.strip_suffix(".path") {
            paths.insert(
                index.to_owned(),
                String::from_utf8_lossy(&data).into_owned(),
            );
        } else if let Some(index) = name.strip_suffix(".file") {
            let Some(path) = paths.get(index) else {
                return daemon_error(400, "BAD_REQUEST", "file part before its path");
            };
            let p = std::path::Path::new(path);
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Err(e) = std::fs::write(p, &data) {
                return daemon_error(400, "BAD_REQUEST", &e.to_string());
            }
            files.push(json!({"path": path, "bytes": data.len()}));
        }
    }
    Json(json!({"files": files}))
}

async fn bulk_download(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
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
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "no paths"}))).into_response();
    }
    let mut out = Vec::new();
    for path in paths {
        let (name, data) = match std::fs::read(&path) {
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

fn spawn_shell(root: &std::path::Path, script: &str) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(root)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

async fn execute(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(command) = body["command"].as_str().filter(|c| !c.trim().is_empty()) else {
        return daemon_error(400, "BAD_REQUEST", "command is required");
    };
    let timeout = body["timeout"]
        .as_u64()
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let mut child = match spawn_shell(&root, command) {
        Ok(c) => c,
        Err(e) => return Json(json!({"exitCode": -1, "result": e.to_string()})),
    };
    let pgid = child.id().map(|p| p as i32);
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return daemon_error(500, "INTERNAL_SERVER_ERROR", "no pipes");
    };
    let run = async {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let _ = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
        let status = child.wait().await;
        o.extend_from_slice(&e);
        (status, o)
    };
    let finished = match timeout {
        Some(t) => tokio::time::timeout(t, run).await.ok(),
        None => Some(run.await),
    };
    match finished {
        Some((Ok(status), output)) => Json(
            json!({"exitCode": super::shell_exit_code(status), "result": String::from_utf8_lossy(&output)}),
        ),
        Some((Err(e), _)) => Json(json!({"exitCode": -1, "result": e.to_string()})),
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

async fn session_create(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = toolbox_root(&shared, &id) {
        return r;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(sid) = body["sessionId"].as_str().map(str::to_owned) else {
        return daemon_error(400, "BAD_REQUEST", "sessionId is required");
    };
    let created = with_sandbox(&shared, &id, |s| {
        if s.sessions.contains_key(&sid) {
            false
        } else {
            s.sessions.insert(
                sid.clone(),
                Session {
                    commands: HashMap::new(),
                    pgids: Vec::new(),
                },
            );
            true
        }
    });
    match created {
        Some(true) => StatusCode::CREATED.into_response(),
        Some(false) => daemon_error(409, "CONFLICT", "conflict: session already exists"),
        None => not_found(&id),
    }
}

async fn session_delete(
    State(shared): State<Arc<Shared>>,
    Path((id, sid)): Path<(String, String)>,
) -> Response {
    let removed = with_sandbox(&shared, &id, |s| s.sessions.remove(&sid));
    match removed {
        Some(Some(session)) => {
            for pgid in session.pgids {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Some(None) => daemon_error(404, "NOT_FOUND", "not found: session not found"),
        None => not_found(&id),
    }
}

async fn pump(mut reader: impl tokio::io::AsyncRead + Unpin, marker: u8, cmd: Arc<Command>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut log = cmd.log.lock().unwrap_or_else(|p| p.into_inner());
                log.extend_from_slice(&[marker; 3]);
                log.extend_from_slice(&buf[..n]);
            }
        }
    }
}

async fn session_exec(
    State(shared): State<Arc<Shared>>,
    Path((id, sid)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let root = match toolbox_root(&shared, &id) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(command) = body["command"].as_str().map(str::to_owned) else {
        return daemon_error(400, "BAD_REQUEST", "command is required");
    };
    if body["runAsync"] != json!(true) {
        // Synchronous session execution hangs with login scripts upstream.
        return daemon_error(
            400,
            "BAD_REQUEST",
            "emulator: only runAsync session execution is supported",
        );
    }
    if with_sandbox(&shared, &id, |s| s.sessions.contains_key(&sid)) != Some(true) {
        return daemon_error(404, "NOT_FOUND", "not found: session not found");
    }
    let mut child = match spawn_shell(&root, &command) {
        Ok(c) => c,
        Err(e) => return daemon_error(500, "INTERNAL_SERVER_ERROR", &e.to_string()),
    };
    let cid = uuid::Uuid::new_v4().to_string();
    let cmd = Arc::new(Command {
        command,
        log: Mutex::new(Vec::new()),
        exit: Mutex::new(None),
    });
    let pgid = child.id().map(|p| p as i32);
    with_sandbox(&shared, &id, |s| {
        if let Some(pgid) = pgid {
            s.pgids.push(pgid);
        }
        if let Some(session) = s.sessions.get_mut(&sid) {
            session.commands.insert(cid.clone(), cmd.clone());
            if let Some(pgid) = pgid {
                session.pgids.push(pgid);
            }
        }
    });
    let out = child.stdout.take();
    let err = child.stderr.take();
    tokio::spawn(async move {
        let a = out.map(|o| tokio::spawn(pump(o, 1, cmd.clone())));
        let b = err.map(|e| tokio::spawn(pump(e, 2, cmd.clone())));
        let status = child.wait().await;
        if let Some(a) = a {
            let _ = a.await;
        }
        if let Some(b) = b {
            let _ = b.await;
        }
        let code = status.map(super::shell_exit_code).unwrap_or(-1);
        *cmd.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
    });
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        json!({"cmdId": cid}).to_string(),
    )
        .into_response()
}

fn find_command(shared: &Shared, id: &str, sid: &str, cid: &str) -> Option<Arc<Command>> {
    with_sandbox(shared, id, |s| {
        s.sessions.get(sid)?.commands.get(cid).cloned()
    })
    .flatten()
}

async fn command_status(
    State(shared): State<Arc<Shared>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
) -> Response {
    let Some(cmd) = find_command(&shared, &id, &sid, &cid) else {
        return daemon_error(404, "NOT_FOUND", "not found: command not found");
    };
    let mut v = json!({"id": cid, "command": cmd.command});
    if let Some(code) = *cmd.exit.lock().unwrap_or_else(|p| p.into_inner()) {
        v["exitCode"] = json!(code);
    }
    Json(v)
}

fn split_log(log: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (mut out, mut err, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let mut current = 0u8;
    let mut i = 0;
    while i < log.len() {
        if i + 3 <= log.len() && (log[i..i + 3] == [1, 1, 1] || log[i..i + 3] == [2, 2, 2]) {
            current = log[i];
            i += 3;
            continue;
        }
        match current {
            1 => out.push(log[i]),
            2 => err.push(log[i]),
            _ => {}
        }
        all.push(log[i]);
        i += 1;
    }
    (out, err, all)
}

async fn command_logs(
    State(shared): State<Arc<Shared>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let fault = special(&request);
    let Some(cmd) = find_command(&shared, &id, &sid, &cid) else {
        return daemon_error(404, "NOT_FOUND", "not found: command not found");
    };
    let (mut parts, _) = request.into_parts();
    let follow = q.get("follow").map(String::as_str) == Some("true");
    if parts.headers.contains_key("upgrade") {
        return match WebSocketUpgrade::from_request_parts(&mut parts, &shared).await {
            Ok(ws) => ws.on_upgrade(move |socket| stream_logs(socket, cmd, follow, fault)),
            Err(r) => r.into_response(),
        };
    }
    let log = cmd.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (out, err, all) = split_log(&log);
    Json(
        json!({"output": String::from_utf8_lossy(&all), "stdout": String::from_utf8_lossy(&out), "stderr": String::from_utf8_lossy(&err)}),
    )
}

async fn stream_logs(mut socket: WebSocket, cmd: Arc<Command>, follow: bool, fault: Option<Fault>) {
    let mut sent = 0usize;
    let mut finished_at: Option<Instant> = None;
    loop {
        let (chunk, done) = {
            let log = cmd.log.lock().unwrap_or_else(|p| p.into_inner());
            let done = cmd.exit.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            (log[sent..].to_vec(), done)
        };
        if !chunk.is_empty() {
            sent += chunk.len();
            // Split every write in two frames so markers straddle frames.
            let cut = chunk.len().min(2);
            for part in [&chunk[..cut], &chunk[cut..]] {
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
        if done && chunk.is_empty() {
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
