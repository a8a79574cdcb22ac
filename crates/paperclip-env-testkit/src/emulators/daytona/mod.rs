//! An emulator of Daytona's REST API and toolbox daemon (spec 22 §6),
//! following the daemon's behaviour (daytonaio/daytona v0.190.0, issue 19):
//! the sandbox state machine; sessions as one long-lived shell each, whose
//! commands run one after another in it with per-line framed logs and an
//! input FIFO held open for async commands; synchronous session exec; the
//! log-follow WebSocket with 3-byte stream markers; one-shot execute with
//! `cwd` and `envs`; bulk upload and download, file listing and deletion;
//! the deprecated `{apiUrl}/toolbox/{id}/toolbox/…` routes; and fault
//! injection per route.
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

mod session;
mod toolbox;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::time::Instant;

use session::Session;

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
    /// Toolbox `POST /process/session/{sid}/command/{cid}/input`.
    SessionInput,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let mut parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // `{apiUrl}/toolbox/{id}/toolbox/…` is the same toolbox route.
        if parts.len() > 2 && parts[0] == "toolbox" && parts[2] == "toolbox" {
            parts.remove(2);
        }
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
            ("POST", ["toolbox", _, "process", "session", _, "command", _, "input"]) => {
                Route::SessionInput
            }
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

struct Sbx {
    name: String,
    labels: Value,
    create_body: Value,
    state: String,
    pending: Option<(String, Instant)>,
    recoverable: bool,
    error_reason: Option<String>,
    root: PathBuf,
    sessions: HashMap<String, Arc<Session>>,
    /// Process groups of one-shot executes.
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
        for (_, session) in self.sessions.drain() {
            session.kill();
        }
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
    /// How long a deleted session's processes get between SIGTERM and SIGKILL.
    session_grace: Mutex<Duration>,
    /// When set, sandboxes carry an empty `toolboxProxyUrl` (clients must
    /// use the deprecated `{apiUrl}/toolbox/{id}/toolbox/…` routes).
    hide_proxy_url: AtomicBool,
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
            session_grace: Mutex::new(Duration::from_secs(1)),
            hide_proxy_url: AtomicBool::new(false),
        });
        let mut app = Router::new()
            .route("/sandbox", post(create).get(list_sandboxes))
            .route("/sandbox/{id}", get(get_sandbox).delete(delete_sandbox))
            .route("/sandbox/{id}/start", post(start))
            .route("/sandbox/{id}/stop", post(stop))
            .route("/sandbox/{id}/recover", post(recover))
            .route("/sandbox/{id}/archive", post(archive))
            .route("/sandbox/{id}/autostop/{m}", post(autostop))
            .route("/sandbox/{id}/autoarchive/{m}", post(autoarchive))
            .route("/sandbox/{id}/autodelete/{m}", post(autodelete))
            .route("/sandbox/{id}/labels", axum::routing::put(put_labels))
            .route("/sandbox/{id}/ports/{port}/preview-url", get(preview_url))
            .route("/sandbox/{id}/ssh-access", post(ssh_access))
            .route("/sandbox/{id}/snapshot", post(snapshot_sandbox))
            .route("/sandbox/{id}/toolbox-proxy-url", get(toolbox_proxy_url))
            .route("/sandbox/{id}/build-logs-url", get(build_logs_url))
            .route("/sandbox/{id}/build-logs", get(build_logs))
            .route(
                "/snapshots/{name}",
                get(get_snapshot).delete(delete_snapshot),
            );
        // The toolbox through the proxy, and through the API's deprecated
        // `/toolbox/{id}/toolbox/…` passthrough.
        for prefix in ["/toolbox/{id}", "/toolbox/{id}/toolbox"] {
            app = app
                .route(&format!("{prefix}/work-dir"), get(toolbox::work_dir))
                .route(&format!("{prefix}/user-home-dir"), get(toolbox::work_dir))
                .route(&format!("{prefix}/files/folder"), post(toolbox::folder))
                .route(
                    &format!("{prefix}/files"),
                    get(toolbox::list_files).delete(toolbox::delete_file),
                )
                .route(
                    &format!("{prefix}/files/permissions"),
                    post(toolbox::permissions),
                )
                .route(
                    &format!("{prefix}/files/bulk-upload"),
                    post(toolbox::bulk_upload),
                )
                .route(
                    &format!("{prefix}/files/bulk-download"),
                    post(toolbox::bulk_download),
                )
                .route(&format!("{prefix}/process/execute"), post(toolbox::execute))
                .route(
                    &format!("{prefix}/process/session"),
                    post(toolbox::session_create).get(toolbox::session_list),
                )
                .route(
                    &format!("{prefix}/process/session/{{sid}}"),
                    get(toolbox::session_get).delete(toolbox::session_delete),
                )
                .route(
                    &format!("{prefix}/process/session/{{sid}}/exec"),
                    post(toolbox::session_exec),
                )
                .route(
                    &format!("{prefix}/process/session/{{sid}}/command/{{cid}}"),
                    get(toolbox::command_status),
                )
                .route(
                    &format!("{prefix}/process/session/{{sid}}/command/{{cid}}/logs"),
                    get(toolbox::command_logs),
                )
                .route(
                    &format!("{prefix}/process/session/{{sid}}/command/{{cid}}/input"),
                    post(toolbox::command_input),
                );
        }
        let app = app
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                record_and_inject,
            ))
            .with_state(shared.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener.tap_io(super::serve::no_delay), app)
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

    /// How long a deleted session's processes get between SIGTERM and
    /// SIGKILL (default 1 s; the daemon's grace is configurable too).
    pub fn set_session_grace(&self, grace: Duration) {
        *self
            .shared
            .session_grace
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = grace;
    }

    /// Answers every sandbox with an empty `toolboxProxyUrl`, so clients
    /// fall back to the API's deprecated `/toolbox/{id}/toolbox/…` routes.
    pub fn hide_toolbox_proxy_url(&self, hide: bool) {
        self.shared.hide_proxy_url.store(hide, Ordering::SeqCst);
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
        // The SDKs (0.226) validate these strictly: integers, string maps,
        // a string target, a `kvm` flag and a `toolboxProxyUrl` string.
        let int = |key: &str, default: i64| {
            b.get(key)
                .and_then(Value::as_f64)
                .map(|v| v.round() as i64)
                .unwrap_or(default)
        };
        let desired = match s
            .pending
            .as_ref()
            .map(|(t, _)| t.as_str())
            .unwrap_or(&s.state)
        {
            "stopped" | "stopping" => "stopped",
            "archived" | "archiving" => "archived",
            "destroyed" | "destroying" => "destroyed",
            _ => "started",
        };
        let proxy = if self.hide_proxy_url.load(Ordering::SeqCst) {
            String::new()
        } else {
            format!("{}/toolbox", self.base)
        };
        json!({"id": id, "organizationId": "org-emulator", "name": s.name, "user": "daytona",
            "env": string_map(b.get("env")), "labels": string_map(Some(&s.labels)),
            "public": b.get("public").and_then(Value::as_bool).unwrap_or(false),
            "networkBlockAll": b.get("networkBlockAll").and_then(Value::as_bool).unwrap_or(false),
            "kvm": false,
            "target": b.get("target").and_then(Value::as_str).unwrap_or("us"),
            "cpu": int("cpu", 1), "gpu": int("gpu", 0), "memory": int("memory", 1), "disk": int("disk", 3),
            "state": s.state, "desiredState": desired, "errorReason": s.error_reason, "recoverable": s.recoverable,
            "snapshot": b.get("snapshot").cloned().unwrap_or(Value::Null),
            "buildInfo": b.get("buildInfo").cloned().unwrap_or(Value::Null),
            "autoStopInterval": b.get("autoStopInterval").cloned().unwrap_or(json!(15)),
            "autoArchiveInterval": b.get("autoArchiveInterval").cloned().unwrap_or(json!(60)),
            "autoDeleteInterval": b.get("autoDeleteInterval").cloned().unwrap_or(json!(-1)),
            "createdAt": s.created_at, "updatedAt": s.updated_at, "lastActivityAt": s.updated_at,
            "daemonVersion": "0.190.0", "runnerId": "runner-emulator", "backupState": "None",
            "toolboxProxyUrl": proxy})
    }

    /// The sandbox's `env` from create, for its processes.
    fn sandbox_env(&self, id: &str) -> Vec<(String, String)> {
        with_sandbox(self, id, |s| {
            string_map(s.create_body.get("env"))
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
    }

    /// The daemon's own state (sessions, logs), outside the sandbox's files.
    fn daemon_dir(&self, id: &str) -> PathBuf {
        self.root.path().join(format!("{id}.daemon"))
    }

    fn session_grace(&self) -> Duration {
        *self.session_grace.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A JSON object with every value as a string (labels, env).
fn string_map(v: Option<&Value>) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(m)) = v {
        for (k, v) in m {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            out.insert(k.clone(), Value::String(s));
        }
    }
    Value::Object(out)
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

/// Sets one lifecycle interval and answers with the sandbox.
fn set_interval(shared: &Shared, id: &str, key: &str, minutes: i64) -> Response {
    match with_sandbox(shared, id, |s| {
        s.create_body[key] = json!(minutes);
        s.updated_at = now();
        shared.sandbox_json(id, s)
    }) {
        Some(v) => Json(v),
        None => not_found(id),
    }
}

async fn autostop(
    State(shared): State<Arc<Shared>>,
    Path((id, m)): Path<(String, i64)>,
) -> Response {
    set_interval(&shared, &id, "autoStopInterval", m)
}

async fn autoarchive(
    State(shared): State<Arc<Shared>>,
    Path((id, m)): Path<(String, i64)>,
) -> Response {
    set_interval(&shared, &id, "autoArchiveInterval", m)
}

async fn autodelete(
    State(shared): State<Arc<Shared>>,
    Path((id, m)): Path<(String, i64)>,
) -> Response {
    set_interval(&shared, &id, "autoDeleteInterval", m)
}

/// `GET /sandbox?labels={json}`: one page `{items, nextCursor}` of the
/// sandboxes carrying every given label.
async fn list_sandboxes(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let wanted: serde_json::Map<String, Value> = match q.get("labels") {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            _ => return api_error(400, "labels must be a JSON object", "/sandbox"),
        },
    };
    let mut sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let mut items: Vec<Value> = sandboxes
        .iter_mut()
        .filter_map(|(id, s)| {
            s.settle();
            let labels = string_map(Some(&s.labels));
            wanted
                .iter()
                .all(|(k, v)| labels.get(k).and_then(Value::as_str) == v.as_str())
                .then(|| shared.sandbox_json(id, s))
        })
        .collect();
    items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!({"items": items, "nextCursor": null}))
}

async fn toolbox_proxy_url(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match with_sandbox(&shared, &id, |_| ()) {
        Some(()) => Json(json!({"url": format!("{}/toolbox", shared.base)})),
        None => not_found(&id),
    }
}

async fn build_logs_url(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match with_sandbox(&shared, &id, |_| ()) {
        Some(()) => Json(json!({"url": format!("{}/sandbox/{id}/build-logs", shared.base)})),
        None => not_found(&id),
    }
}

/// The image build's log (the emulator builds nothing: one line per step).
async fn build_logs(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match with_sandbox(&shared, &id, |s| {
        s.create_body["buildInfo"]["dockerfileContent"]
            .as_str()
            .map(str::to_owned)
    }) {
        Some(dockerfile) => {
            let mut log = String::new();
            for line in dockerfile.unwrap_or_default().lines() {
                log.push_str(&format!("Step: {line}\n"));
            }
            log.push_str("Build complete\n");
            (
                StatusCode::OK,
                [("content-type", "text/plain; charset=utf-8")],
                log,
            )
                .into_response()
        }
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
            let _ = std::fs::remove_dir_all(shared.daemon_dir(&id));
            Json(v)
        }
        None => not_found(&id),
    }
}
