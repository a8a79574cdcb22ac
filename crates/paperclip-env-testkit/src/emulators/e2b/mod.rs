//! An emulator of E2B's control plane and in-sandbox envd daemon (spec 20 §7),
//! with a Novita profile (spec 21 §6), faithful enough for the vendor SDKs
//! (`e2b` on PyPI and npm) pointed at it with `E2B_API_URL` and
//! `E2B_SANDBOX_URL`.
//!
//! Control plane: `POST /v2/sandboxes` and `/sandboxes` (create),
//! `POST /v2/sandboxes/{id}/connect` and `/sandboxes/{id}/connect`,
//! `/resume`, `/timeout`, `/pause`, `DELETE /sandboxes/{id}`,
//! `GET /sandboxes/{id}` (with `startedAt`/`endAt`), `GET /sandboxes` and
//! `GET /v2/sandboxes` (metadata and state filters, `limit`/`nextToken`).
//! [`ApiVersions::V1Only`] serves the v1 routes alone, as older deployments do.
//!
//! envd, addressed by the `E2b-Sandbox-Id` (or `Novita-Sandbox-Id`) header or
//! by the host `49983-<id>.<domain>`: `/health`, `/files` (multipart and
//! octet-stream upload, download; relative paths against the user's home),
//! `filesystem.Filesystem/{ListDir,Stat,MakeDir,Move,Remove}`,
//! `process.Process/{Start,Connect,List,SendInput,CloseStdin,SendSignal}`.
//! Each sandbox has its own root directory playing `/` (see
//! `sandbox_fs`): file paths never leave it, and commands run as local
//! processes as the sandbox user (`user`, home `/home/user`, `USER` and
//! `LOGNAME` set, `envVars` from create applied), with the sandbox trees in
//! their paths mapped under the root.
//!
//! Not served (answered with the service's JSON error, 404 or
//! `unimplemented`): templates, snapshots, metrics, logs, network updates,
//! volumes, `Filesystem/WatchDir` and watchers, `Process/StreamInput`, PTYs.
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

mod process;

use std::collections::HashMap;
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

/// Which control-plane API generations the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiVersions {
    /// `/v2/sandboxes…` and the v1 routes (today's service).
    #[default]
    V1AndV2,
    /// The v1 routes only: `/v2/…` answers 404, as older deployments do.
    V1Only,
}

/// Options of [`E2bEmulator::start_with`].
#[derive(Clone)]
pub struct E2bOptions {
    /// The service played.
    pub profile: Profile,
    /// The only API key accepted.
    pub api_key: String,
    /// The API generations served.
    pub api: ApiVersions,
}

impl std::fmt::Debug for E2bOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bOptions")
            .field("profile", &self.profile)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// A route faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /sandboxes` and `POST /v2/sandboxes`.
    Create,
    /// `POST /sandboxes/{id}/connect` and `POST /v2/sandboxes/{id}/connect`.
    Connect,
    /// `POST /sandboxes/{id}/timeout`.
    SetTimeout,
    /// `POST /sandboxes/{id}/pause`.
    Pause,
    /// `DELETE /sandboxes/{id}`.
    Kill,
    /// `GET /sandboxes/{id}`.
    Get,
    /// `GET /sandboxes` and `GET /v2/sandboxes`.
    List,
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
    /// envd `process.Process/Connect`.
    ProcessConnect,
    /// envd `process.Process/SendInput`.
    SendInput,
    /// envd `process.Process/List`.
    ProcessList,
    /// envd `filesystem.Filesystem/ListDir`, `Stat`, `MakeDir` and `Move`.
    Filesystem,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let path = path.strip_prefix("/v2").unwrap_or(path);
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match (method.as_str(), parts.as_slice()) {
            ("POST", ["sandboxes"]) => Route::Create,
            ("GET", ["sandboxes"]) => Route::List,
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
            ("POST", ["process.Process", "Connect"]) => Route::ProcessConnect,
            ("POST", ["process.Process", "SendInput"]) => Route::SendInput,
            ("POST", ["process.Process", "List"]) => Route::ProcessList,
            ("POST", ["filesystem.Filesystem", _]) => Route::Filesystem,
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
    /// Answer with this status and a JSON body carrying this `error_code`
    /// (e.g. 409 `sandbox_snapshot_guest_agent_unresponsive` on connect).
    ErrorCode {
        /// HTTP status.
        status: u16,
        /// The body's `error_code`.
        error_code: String,
    },
    /// An HTML error page with this status (as a proxy in front would send).
    HtmlPage(u16),
    /// Wait before handling.
    Delay(Duration),
    /// The edge's "sandbox was not found" 502.
    EnvdGone,
    /// Start or Connect: close the stream right after this many data events,
    /// without end-of-stream; the process keeps running (as envd's do when
    /// their client goes away) and `Process/Connect` reattaches to it.
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
    started_at: chrono::DateTime<chrono::Utc>,
    token: Option<String>,
    metadata: Value,
    env_vars: Vec<(String, String)>,
    fs: super::sandbox_fs::SandboxFs,
    processes: HashMap<u32, Arc<process::ProcessEntry>>,
    /// Paused while its guest agent did not answer: a memory resume is refused.
    guest_unresponsive: bool,
}

pub use super::RecordedRequest;

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
    api: ApiVersions,
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
    server: super::serve::Server,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for E2bEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bEmulator")
            .field("addr", &self.server.addr())
            .field("profile", &self.shared.profile)
            .finish_non_exhaustive()
    }
}

impl E2bEmulator {
    /// Starts on 127.0.0.1 with a random port; `api_key` is the only key accepted.
    pub async fn start(profile: Profile, api_key: &str) -> std::io::Result<Self> {
        Self::start_with(E2bOptions {
            profile,
            api_key: api_key.to_owned(),
            api: ApiVersions::default(),
        })
        .await
    }

    /// Starts on 127.0.0.1 with a random port and `options`.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use paperclip_env_testkit::emulators::e2b::{ApiVersions, E2bEmulator, E2bOptions, Profile};
    /// let old = E2bEmulator::start_with(E2bOptions {
    ///     profile: Profile::E2b,
    ///     api_key: "e2b_test_key".into(),
    ///     api: ApiVersions::V1Only,
    /// })
    /// .await
    /// .unwrap();
    /// # let _ = old;
    /// # }
    /// ```
    pub async fn start_with(options: E2bOptions) -> std::io::Result<Self> {
        let E2bOptions {
            profile,
            api_key,
            api,
        } = options;
        let shared = Arc::new(Shared {
            profile,
            api,
            api_key,
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
            .route("/sandboxes", post(create).get(list_v1))
            .route("/v2/sandboxes", post(create_v2).get(list_v2))
            .route("/v2/sandboxes/{id}/connect", post(connect_v2))
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
            .route("/filesystem.Filesystem/ListDir", post(envd::list_dir))
            .route("/filesystem.Filesystem/Stat", post(envd::stat))
            .route("/filesystem.Filesystem/Move", post(envd::move_entry))
            .route("/process.Process/Start", post(process::start))
            .route("/process.Process/Connect", post(process::connect))
            .route("/process.Process/List", post(process::list))
            .route("/process.Process/SendInput", post(process::send_input))
            .route("/process.Process/CloseStdin", post(process::close_stdin))
            .route("/process.Process/SendSignal", post(process::send_signal))
            .fallback(not_served)
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                record_and_inject,
            ))
            .with_state(shared.clone());
        let server = super::serve::Server::start(app).await?;
        Ok(E2bEmulator { server, shared })
    }

    /// `http://127.0.0.1:<port>`: the API URL and the envd (sandbox) URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
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

    /// Marks a sandbox as paused while its guest agent did not answer: a
    /// connect or resume that restores memory gets 409
    /// `sandbox_snapshot_guest_agent_unresponsive`; one with `memory: false`
    /// cold-boots it (its processes are gone, its files kept).
    pub fn mark_guest_unresponsive(&self, id: &str) {
        if let Some(s) = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            process::kill_all(s);
            s.processes.clear();
            s.state = SandboxState::Paused;
            s.guest_unresponsive = true;
        }
    }

    /// The host directory playing `/` in sandbox `id`.
    pub fn sandbox_root(&self, id: &str) -> Option<std::path::PathBuf> {
        self.shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|s| s.fs.root().to_path_buf())
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
        let mut sandboxes = self
            .shared
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, sandbox) in sandboxes.drain() {
            process::kill_all(&sandbox);
            let _ = std::fs::remove_dir_all(sandbox.fs.root());
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
                process::kill_all(&sandbox);
                let _ = std::fs::remove_dir_all(sandbox.fs.root());
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

fn api_error_code(status: u16, message: &str, error_code: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        json!({"code": status, "message": message, "error_code": error_code}).to_string(),
    )
        .into_response()
}

const GUEST_UNRESPONSIVE: &str = "sandbox_snapshot_guest_agent_unresponsive";

/// Routes the emulator does not serve answer as the service does: the API's
/// JSON error, or envd's Connect `unimplemented`.
async fn not_served(request: Request) -> Response {
    let path = request.uri().path();
    if path.starts_with("/process.") || path.starts_with("/filesystem.") {
        return (
            StatusCode::NOT_IMPLEMENTED,
            [("content-type", "application/json")],
            json!({"code": "unimplemented", "message": format!("{path} is not served by the emulator")})
                .to_string(),
        )
            .into_response();
    }
    api_error(
        404,
        &format!("{} {path} is not served by the emulator", request.method()),
    )
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
    let recorded = RecordedRequest::of(&parts, &bytes);
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
            Fault::ErrorCode { status, error_code } => {
                return api_error_code(status, &format!("injected {error_code}"), &error_code);
            }
            Fault::HtmlPage(status) => {
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                return (code, [("content-type", "text/html")], "<!DOCTYPE html><html><head><title>Access denied | Error 1010</title></head><body>blocked</body></html>").into_response();
            }
            Fault::EnvdGone => {
                let id = shared.envd_sandbox_id(request.headers());
                return envd_gone(&id);
            }
            stream_fault => {
                request
                    .extensions_mut()
                    .insert(process::StreamFault(stream_fault));
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

/// The envd version reported: new enough for octet-stream uploads and
/// stdin control, older than the file-metadata and watch features the
/// emulator does not serve.
const ENVD_VERSION: &str = "0.5.7";

fn sandbox_json(id: &str, s: &Sandbox) -> Value {
    let mut v = json!({"templateID": s.template, "sandboxID": id, "alias": s.template, "clientID": "emulator",
        "envdVersion": ENVD_VERSION, "domain": null, "trafficAccessToken": null});
    if let Some(token) = &s.token {
        v["envdAccessToken"] = json!(token);
    }
    v
}

/// `SandboxDetail` / `ListedSandbox`.
fn listed_json(id: &str, s: &Sandbox) -> Value {
    let left = s.deadline.saturating_duration_since(Instant::now());
    let end = chrono::Utc::now() + chrono::Duration::from_std(left).unwrap_or_default();
    let mut v = sandbox_json(id, s);
    v["state"] = json!(match s.state {
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
    });
    v["metadata"] = if s.metadata.is_object() {
        s.metadata.clone()
    } else {
        json!({})
    };
    v["startedAt"] = json!(
        s.started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    v["endAt"] = json!(end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    v["cpuCount"] = json!(2);
    v["memoryMB"] = json!(512);
    v["diskSizeMB"] = json!(1024);
    v["envdUnresponsiveAtPause"] = json!(s.guest_unresponsive);
    v
}

fn v2_disabled(shared: &Shared) -> Option<Response> {
    (shared.api == ApiVersions::V1Only).then(|| api_error(404, "Not Found"))
}

async fn create_v2(state: State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(response) = v2_disabled(&state.0) {
        return response;
    }
    create(state, headers, body).await
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
    let Ok(fs) = super::sandbox_fs::SandboxFs::create(shared.root.path().join(&id)) else {
        return api_error(500, "could not create the sandbox filesystem");
    };
    let secure = body.get("secure").and_then(Value::as_bool).unwrap_or(false);
    let env_vars = body
        .get("envVars")
        .and_then(Value::as_object)
        .map(|vars| {
            vars.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let sandbox = Sandbox {
        template: template.to_owned(),
        state: SandboxState::Running,
        deadline: Instant::now() + timeout_of(&body),
        started_at: chrono::Utc::now(),
        token: secure.then(|| format!("envd-token-{n}-{}", uuid::Uuid::new_v4().simple())),
        metadata: body.get("metadata").cloned().unwrap_or(Value::Null),
        env_vars,
        fs,
        processes: HashMap::new(),
        guest_unresponsive: false,
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

async fn connect_v2(
    state: State<Arc<Shared>>,
    path: Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = v2_disabled(&state.0) {
        return response;
    }
    connect(state, path, headers, body).await
}

/// Resumes a paused sandbox; `None` when its memory may not be restored.
fn resume(s: &mut Sandbox, body: &Value) -> Option<()> {
    let memory = body.get("memory").and_then(Value::as_bool).unwrap_or(true);
    if s.guest_unresponsive && memory {
        return None;
    }
    s.guest_unresponsive = false;
    s.state = SandboxState::Running;
    Some(())
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
    let body = parse_json(&body);
    // v2's body is optional and its timeout defaults to 300 s.
    let timeout = body
        .get("timeout")
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let result = with_sandbox(&shared, &id, |s| {
        let resumed = s.state == SandboxState::Paused;
        if resumed && resume(s, &body).is_none() {
            return None;
        }
        s.deadline = s.deadline.max(Instant::now() + timeout);
        Some((resumed, sandbox_json(&id, s)))
    });
    match result {
        Some(None) => api_error_code(
            409,
            "the sandbox's snapshot was taken while its guest agent was not responding",
            GUEST_UNRESPONSIVE,
        ),
        Some(Some((true, json))) => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        Some(Some((false, json))) => (
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
    let body = parse_json(&body);
    let timeout = timeout_of(&body);
    match with_sandbox(&shared, &id, |s| {
        if s.state == SandboxState::Running {
            return Err(false);
        }
        resume(s, &body).ok_or(true)?;
        s.deadline = Instant::now() + timeout;
        Ok(sandbox_json(&id, s))
    }) {
        Some(Ok(json)) => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        Some(Err(false)) => api_error(409, "sandbox is already running"),
        Some(Err(true)) => api_error_code(
            409,
            "the sandbox's snapshot was taken while its guest agent was not responding",
            GUEST_UNRESPONSIVE,
        ),
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
        process::kill_all(s);
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
            process::kill_all(&sandbox);
            let _ = std::fs::remove_dir_all(sandbox.fs.root());
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
    match with_sandbox(&shared, &id, |s| listed_json(&id, s)) {
        Some(json) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response(),
        None => api_error(404, &format!("sandbox {id} not found")),
    }
}

/// Decodes `%XX` escapes (and `+` as a space) of a query component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `metadata` filter, `k1=v1&k2=v2` with each side percent-encoded.
fn metadata_filter(query: &HashMap<String, String>) -> Vec<(String, String)> {
    query
        .get("metadata")
        .map(|m| {
            m.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn matches_metadata(s: &Sandbox, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| s.metadata.get(k).and_then(Value::as_str) == Some(v.as_str()))
}

/// Listed sandboxes that pass the filters, oldest first.
fn listed(shared: &Shared, filter: &[(String, String)], states: Option<&[&str]>) -> Vec<Value> {
    shared.reap_expired();
    let sandboxes = shared.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
    let mut found: Vec<(&String, &Sandbox)> = sandboxes
        .iter()
        .filter(|(_, s)| matches_metadata(s, filter))
        .filter(|(_, s)| {
            let state = match s.state {
                SandboxState::Running => "running",
                SandboxState::Paused => "paused",
            };
            states.is_none_or(|states| states.contains(&state))
        })
        .collect();
    found.sort_by(|a, b| (a.1.started_at, a.0).cmp(&(b.1.started_at, b.0)));
    found
        .into_iter()
        .map(|(id, s)| listed_json(id, s))
        .collect()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `GET /sandboxes`: running sandboxes (v1 lists no paused ones).
async fn list_v1(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let filter = metadata_filter(&query);
    json_response(
        StatusCode::OK,
        &Value::Array(listed(&shared, &filter, Some(&["running"]))),
    )
}

/// `GET /v2/sandboxes`: state filter (default running and paused), pages of
/// `limit` with the next page's token in `x-next-token`.
async fn list_v2(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = v2_disabled(&shared) {
        return response;
    }
    if !shared.authorized(&headers) {
        return api_error(401, "Invalid API key");
    }
    let filter = metadata_filter(&query);
    let states: Vec<&str> = query
        .get("state")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_else(|| vec!["running", "paused"]);
    let mut all = listed(&shared, &filter, Some(&states));
    if let Some(template) = query.get("template") {
        all.retain(|s| s["templateID"] == template.as_str() || s["alias"] == template.as_str());
    }
    if query.get("order").map(String::as_str) == Some("desc") {
        all.reverse();
    }
    let offset: usize = query
        .get("nextToken")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(100);
    let page: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
    let mut response = json_response(StatusCode::OK, &Value::Array(page));
    if offset + limit < all.len()
        && let Ok(value) = (offset + limit).to_string().parse()
    {
        response.headers_mut().insert("x-next-token", value);
    }
    response
}

impl Shared {
    /// The sandbox an envd request addresses: the routing header, else the
    /// host `49983-<id>.<domain>`, else (one base URL for every sandbox, and
    /// a client that sends no routing header, as the Novita SDK's connect
    /// path) the sandbox whose envd access token the request carries.
    pub(crate) fn envd_sandbox_id(&self, headers: &HeaderMap) -> String {
        let header = [self.profile.sandbox_id_header(), "e2b-sandbox-id"]
            .iter()
            .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
            .map(str::to_owned);
        header
            .or_else(|| {
                let host = headers.get("host")?.to_str().ok()?;
                let label = host.split('.').next()?;
                let (port, id) = label.split_once('-')?;
                (port.chars().all(|c| c.is_ascii_digit()) && !id.is_empty()).then(|| id.to_owned())
            })
            .or_else(|| {
                let token = headers.get("x-access-token")?.to_str().ok()?;
                let sandboxes = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
                sandboxes
                    .iter()
                    .find(|(_, s)| s.token.as_deref() == Some(token))
                    .map(|(id, _)| id.clone())
            })
            .unwrap_or_default()
    }
}
