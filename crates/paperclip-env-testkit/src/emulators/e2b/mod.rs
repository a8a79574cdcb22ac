//! An emulator of E2B's control plane and in-sandbox envd daemon (spec 20 §7),
//! with a Novita profile (spec 21 §6).
//!
//! ```no_run
//! # async fn demo() {
//! use paperclip_env_testkit::emulators::e2b::{E2bEmulator, Profile};
//! let emulator = E2bEmulator::start(Profile::E2b, "e2b_test_key").await.unwrap();
//! // Point the provider at emulator.url() for both the API and envd.
//! assert_eq!(emulator.live_sandboxes(), 0);
//! # }
//! ```

mod envd;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Which service the emulator plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// E2B.
    E2b,
    /// Novita (modern domain).
    Novita,
}

impl Profile {
    fn sandbox_id_header(self) -> &'static str {
        match self {
            Profile::E2b => "e2b-sandbox-id",
            Profile::Novita => "novita-sandbox-id",
        }
    }
}

/// A route faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /sandboxes`.
    Create,
    /// `POST /sandboxes/{id}/connect`.
    Connect,
    /// `POST /sandboxes/{id}/timeout`.
    SetTimeout,
    /// `POST /sandboxes/{id}/pause`.
    Pause,
    /// `DELETE /sandboxes/{id}`.
    Kill,
    /// `GET /sandboxes/{id}`.
    Get,
    /// envd `GET /health`.
    Health,
    /// envd `/files`.
    Files,
    /// envd `process.Process/Start`.
    Start,
    /// envd `filesystem.Filesystem/Remove`.
    Remove,
    /// envd `process.Process/SendSignal`.
    SendSignal,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match (method.as_str(), parts.as_slice()) {
            ("POST", ["sandboxes"]) => Route::Create,
            ("POST", ["sandboxes", _, "connect"]) => Route::Connect,
            ("POST", ["sandboxes", _, "timeout"]) => Route::SetTimeout,
            ("POST", ["sandboxes", _, "pause"]) => Route::Pause,
            ("DELETE", ["sandboxes", _]) => Route::Kill,
            ("GET", ["sandboxes", _]) => Route::Get,
            ("GET", ["health"]) => Route::Health,
            (_, ["files"]) => Route::Files,
            ("POST", ["process.Process", "Start"]) => Route::Start,
            ("POST", ["filesystem.Filesystem", "Remove"]) => Route::Remove,
            ("POST", ["process.Process", "SendSignal"]) => Route::SendSignal,
            _ => return None,
        })
    }
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and JSON body (`{"code", "message"}` when `None`).
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// An HTML error page with this status (as a proxy in front would send).
    HtmlPage(u16),
    /// Wait before handling.
    Delay(Duration),
    /// The edge's "sandbox was not found" 502.
    EnvdGone,
    /// Start: close the stream after this many data events, without end-of-stream.
    DropStreamAfter(usize),
    /// Start: send an envelope with the compressed flag set.
    MalformedEnvelope,
    /// Start: send headers, then nothing at all.
    SilentStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SandboxState {
    Running,
    Paused,
}

struct Sandbox {
    template: String,
    state: SandboxState,
    deadline: Instant,
    token: Option<String>,
    metadata: Value,
    root: PathBuf,
    processes: HashMap<u32, i32>,
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
    /// Template.
    pub template: String,
    /// `running` or `paused`.
    pub state: &'static str,
    /// Metadata sent at create.
    pub metadata: Value,
    /// Seconds left before the sandbox expires.
    pub seconds_left: u64,
}

pub(crate) struct Shared {
    profile: Profile,
    api_key: String,
    root: tempfile::TempDir,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    faults: super::FaultQueue<Route, Fault>,
    requests: Mutex<Vec<RecordedRequest>>,
    next_id: AtomicU64,
    creates: AtomicUsize,
    starts: AtomicUsize,
    keepalive: Mutex<Option<Duration>>,
}

/// The running emulator; stops (and kills every sandbox process) on drop.
pub struct E2bEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for E2bEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bEmulator")
            .field("addr", &self.addr)
            .field("profile", &self.shared.profile)
            .finish_non_exhaustive()
    }
}

impl E2bEmulator {
    /// Starts on 127.0.0.1 with a random port; `api_key` is the only key accepted.
    pub async fn start(profile: Profile, api_key: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            profile,
            api_key: api_key.to_owned(),
            root: tempfile::Builder::new()
                .prefix("paperclip-e2b-emulator-")
                .tempdir()?,
            sandboxes: Mutex::new(HashMap::new()),
            faults: Default::default(),
            requests: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            creates: AtomicUsize::new(0),
            starts: AtomicUsize::new(0),
            keepalive: Mutex::new(None),
        });
        let app = Router::new()
            .route("/sandboxes", post(create))
            .route("/sandboxes/{id}", get(detail))
            .route("/sandboxes/{id}", delete(kill))
            .route("/sandboxes/{id}/connect", post(connect))
            .route("/sandboxes/{id}/resume", post(resume_legacy))
            .route("/sandboxes/{id}/timeout", post(set_timeout))
            .route("/sandboxes/{id}/pause", post(pause))
            .route("/health", get(envd::health))
            .route("/files", post(envd::upload).get(envd::download))
            .route("/filesystem.Filesystem/Remove", post(envd::remove))
            .route("/filesystem.Filesystem/MakeDir", post(envd::make_dir))
            .route("/process.Process/Start", post(envd::start))
            .route("/process.Process/SendSignal", post(envd::send_signal))
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                record_and_inject,
            ))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(E2bEmulator {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:<port>`: the API URL and the envd (sandbox) URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sandboxes alive (running or paused).
    pub fn live_sandboxes(&self) -> usize {
        self.shared.reap_expired();
        self.shared.sandboxes.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Every live sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxSnapshot> {
        self.shared.reap_expired();
        let now = Instant::now();
        let sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SandboxSnapshot> = sandboxes
            .iter()
            .map(|(id, s)| SandboxSnapshot {
                id: id.clone(),
                template: s.template.clone(),
                state: match s.state {
                    SandboxState::Running => "running",
                    SandboxState::Paused => "paused",
                },
                metadata: s.metadata.clone(),
                seconds_left: s.deadline.saturating_duration_since(now).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// `POST /sandboxes` calls received.
    pub fn create_calls(&self) -> usize {
        self.shared.creates.load(Ordering::SeqCst)
    }

    /// `Process/Start` calls received.
    pub fn start_calls(&self) -> usize {
        self.shared.starts.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Queues `fault` for the next `times` requests of `route` (`usize::MAX`: sticky).
    pub fn inject(&self, route: Route, fault: Fault, times: usize) {
        self.shared.faults.push(route, fault, times);
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Makes a sandbox expire now (it becomes unknown to the API and envd).
    pub fn expire(&self, id: &str) {
        if let Some(s) = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            s.deadline = Instant::now();
        }
        self.shared.reap_expired();
    }

    /// Overrides the keepalive interval envd uses during silent commands.
    pub fn set_keepalive_interval(&self, interval: Duration) {
        *self
            .shared
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(interval);
    }
}

impl Drop for E2bEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let mut sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, sandbox) in sandboxes.drain() {
            envd::kill_all(&sandbox);
        }
    }
}

impl Shared {
    fn take_fault(&self, route: Route) -> Option<Fault> {
        self.faults.take(&route)
    }

    fn reap_expired(&self) {
        let now = Instant::now();
        let mut sandboxes = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<String> = sandboxes
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(sandbox) = sandboxes.remove(&id) {
                envd::kill_all(&sandbox);
                let _ = std::fs::remove_dir_all(&sandbox.root);
            }
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers.get("x-api-key").and_then(|v| v.to_str().ok()) == Some(self.api_key.as_str())
    }
}

fn api_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        json!({"code": status, "message": message}).to_string(),
    )
        .into_response()
}

pub(crate) fn envd_gone(id: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [("content-type", "application/json")],
        json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502}).to_string(),
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
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
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
    };
    if let Ok(mut requests) = shared.requests.lock() {
        requests.push(recorded);
    }
    let route = Route::of(&parts.method, parts.uri.path());
    if route == Some(Route::Create) {
        shared.creates.fetch_add(1, Ordering::SeqCst);
    }
    if route == Some(Route::Start) {
        shared.starts.fetch_add(1, Ordering::SeqCst);
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
                let mut response = api_error(status, &format!("injected {status}"));
                if let Some(after) = retry_after
                    && let Ok(value) = after.parse()
                {
                    response.headers_mut().insert("retry-after", value);
                }
                return response;
            }
            Fault::HtmlPage(status) => {
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                return (code, [("content-type", "text/html")], "<!DOCTYPE html><html><head><title>Access denied | Error 1010</title></head><body>blocked</body></html>").into_response();
            }
            Fault::EnvdGone => {
                let id = request
                    .headers()
                    .get(shared.profile.sandbox_id_header())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                return envd_gone(&id);
            }
            stream_fault => {
                request
                    .extensions_mut()
                    .insert(envd::StreamFault(stream_fault));
            }
        }
    }
    next.run(request).await
}

fn parse_json(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn timeout_of(body: &Value) -> Duration {
    Duration::from_secs(body.get("timeout").and_then(Value::as_u64).unwrap_or(15))
}

fn sandbox_json(id: &str, s: &Sandbox) -> Value {
    let mut v = json!({"templateID": s.template, "sandboxID": id, "alias": s.template, "clientID": "emulator",
        "envdVersion": "0.5.7", "domain": null, "trafficAccessToken": null});
    if let Some(token) = &s.token {
        v["envdAccessToken"] = json!(token);
    }
    v
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let body = parse_json(&body);
    let Some(template) = body
        .get("templateID")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return api_error(400, "templateID is required");
    };
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let id = format!("isb{n:05}emu");
    let root = shared.root.path().join(&id);
    if std::fs::create_dir_all(root.join("home")).is_err() {
        return api_error(500, "could not create the sandbox filesystem");
    }
    let secure = body.get("secure").and_then(Value::as_bool).unwrap_or(false);
    let sandbox = Sandbox {
        template: template.to_owned(),
        state: SandboxState::Running,
        deadline: Instant::now() + timeout_of(&body),
        token: secure.then(|| format!("envd-token-{n}-{}", uuid::Uuid::new_v4().simple())),
        metadata: body.get("metadata").cloned().unwrap_or(Value::Null),
        root,
        processes: HashMap::new(),
    };
    let json = sandbox_json(&id, &sandbox);
    shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, sandbox);
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        json.to_string(),
    )
        .into_response()
}

fn with_sandbox<T>(shared: &Shared, id: &str, f: impl FnOnce(&mut Sandbox) -> T) -> Option<T> {
    shared.reap_expired();
    let mut sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    sandboxes.get_mut(id).map(f)
}

async fn connect(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let timeout = timeout_of(&parse_json(&body));
    let result = with_sandbox(&shared, &id, |s| {
        let resumed = s.state == SandboxState::Paused;
        s.state = SandboxState::Running;
        s.deadline = s.deadline.max(Instant::now() + timeout);
        (resumed, sandbox_json(&id, s))
    });
    match result {
        Some((true, json)) => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        Some((false, json)) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

async fn resume_legacy(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let timeout = timeout_of(&parse_json(&body));
    match with_sandbox(&shared, &id, |s| {
        if s.state == SandboxState::Running {
            return None;
        }
        s.state = SandboxState::Running;
        s.deadline = Instant::now() + timeout;
        Some(sandbox_json(&id, s))
    }) {
        Some(Some(json)) => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        Some(None) => api_error(409, "sandbox is already running"),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

async fn set_timeout(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let timeout = timeout_of(&parse_json(&body));
    match with_sandbox(&shared, &id, |s| s.deadline = Instant::now() + timeout) {
        Some(()) => StatusCode::NO_CONTENT.into_response(),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

async fn pause(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    match with_sandbox(&shared, &id, |s| {
        if s.state == SandboxState::Paused {
            return false;
        }
        envd::kill_all(s);
        s.processes.clear();
        s.state = SandboxState::Paused;
        // A paused sandbox keeps its files for 30 days.
        s.deadline = Instant::now() + Duration::from_secs(30 * 86_400);
        true
    }) {
        Some(true) => StatusCode::NO_CONTENT.into_response(),
        Some(false) => api_error(409, "sandbox is already paused"),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

async fn kill(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    shared.reap_expired();
    let removed = shared
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    match removed {
        Some(sandbox) => {
            envd::kill_all(&sandbox);
            let _ = std::fs::remove_dir_all(&sandbox.root);
            StatusCode::NO_CONTENT.into_response()
        }
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

async fn detail(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    match with_sandbox(&shared, &id, |s| {
        let mut v = sandbox_json(&id, s);
        v["state"] = json!(if s.state == SandboxState::Running {
            "running"
        } else {
            "paused"
        });
        v["metadata"] = s.metadata.clone();
        v["cpuCount"] = json!(2);
        v["memoryMB"] = json!(512);
        v["diskSizeMB"] = json!(1024);
        v
    }) {
        Some(json) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}
