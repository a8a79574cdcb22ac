//! An emulator of Modal's gRPC API (spec 25 §9): the control plane
//! `modal.client.ModalClient` and the per-task command router
//! `modal.task_command_router.TaskCommandRouter`, served with tonic over
//! plaintext HTTP/2 on 127.0.0.1, plus the legacy `ContainerExec` family
//! (used when the router is switched off). Token id/secret, auth tokens and
//! router JWTs are checked on every call. Sandboxes are temp directories;
//! commands run as real local processes (one process group each), killed at
//! their `timeout_secs`; sandbox lifetimes and idle timeouts are applied by a
//! background sweeper.
//!
//! ```no_run
//! # async fn demo() {
//! use paperclip_env_testkit::emulators::modal::ModalEmulator;
//! let emulator = ModalEmulator::start("ak-test", "as-test").await.unwrap();
//! // Point the provider's server URL at emulator.url().
//! assert_eq!(emulator.live_sandboxes(), 0);
//! # }
//! ```

mod control;
mod legacy;
mod router;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paperclip_env_modal_proto::api::modal_client_server::ModalClientServer;
use paperclip_env_modal_proto::api::{GenericResult, generic_result::GenericStatus};
use paperclip_env_modal_proto::router::task_command_router_server::TaskCommandRouterServer;
use tokio::time::Instant;
use tonic::{Code, Status};

/// An RPC faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `AuthTokenGet`.
    AuthTokenGet,
    /// `AppGetOrCreate`.
    AppGetOrCreate,
    /// `EnvironmentGetOrCreate`.
    EnvironmentGetOrCreate,
    /// `ImageGetOrCreate`.
    ImageGetOrCreate,
    /// `ImageJoinStreaming`.
    ImageJoinStreaming,
    /// `SandboxCreate`.
    SandboxCreate,
    /// `SandboxCreateV2`.
    SandboxCreateV2,
    /// `SandboxTagsSet` and `SandboxTagsSetV2`.
    SandboxTagsSet,
    /// `SandboxWait` and `SandboxWaitV2`.
    SandboxWait,
    /// `SandboxTerminate` and `SandboxTerminateV2`.
    SandboxTerminate,
    /// `SandboxGetTaskId` and `SandboxGetTaskIdV2`.
    SandboxGetTaskId,
    /// `TaskGetCommandRouterAccess`.
    TaskGetCommandRouterAccess,
    /// `SandboxGetCommandRouterAccess` (V2 sandboxes).
    SandboxGetCommandRouterAccess,
    /// Router `TaskExecStart`.
    TaskExecStart,
    /// Router `TaskExecStdioRead`.
    TaskExecStdioRead,
    /// Router `TaskExecStdinWrite`.
    TaskExecStdinWrite,
    /// Router `TaskExecWait`.
    TaskExecWait,
    /// Router `TaskExecPoll`.
    TaskExecPoll,
    /// Legacy `ContainerExec`.
    ContainerExec,
    /// Legacy `ContainerExecGetOutput`.
    ContainerExecGetOutput,
    /// Legacy `ContainerExecPutInput`.
    ContainerExecPutInput,
    /// Legacy `ContainerExecWait`.
    ContainerExecWait,
}

/// A fault one request of a [`Route`] answers with.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail with this gRPC status code (e.g. `UNAVAILABLE`, `UNAUTHENTICATED`).
    Status(Code),
    /// Modal's throttling: `RESOURCE_EXHAUSTED` whose status details carry an
    /// `RPCRetryPolicy` asking the client to retry after this long. Nothing
    /// is done for the throttled call.
    Throttle(Duration),
    /// The call is carried out, then its answer is lost: the client sees
    /// `UNAVAILABLE` (a dropped connection) although the effect happened.
    /// A retry with the same `x-idempotency-key` (or, for `TaskExecStart`,
    /// the same `exec_id`) gets the original answer.
    ResponseLost,
    /// `SandboxCreate` / `SandboxCreateV2`: the sandbox is created after this
    /// long, whether or not the caller is still waiting (as Modal finishes a
    /// create whose client gave up).
    SlowCreate(Duration),
    /// `ImageGetOrCreate`: the image is not cached and its build takes this long
    /// (the answer carries no result, so the client must join the build stream).
    SlowImageBuild(Duration),
    /// `AuthTokenGet`: answers with an empty token.
    EmptyAuthToken,
    /// `TaskGetCommandRouterAccess`: answers with a different router URL.
    RouterUrlChanged,
    /// `ImageGetOrCreate`: the build ends with `FAILURE` and this exception.
    ImageBuildFails(String),
    /// `ImageJoinStreaming` / `TaskExecStdioRead` / `ContainerExecGetOutput`:
    /// the stream sends at most one message (for output: at most this many
    /// bytes) and then ends early — image and legacy output streams end
    /// cleanly without a result, router stdio streams with `UNAVAILABLE`.
    EndStreamEarly(usize),
}

/// One gRPC call as the emulator saw it; secrets are reduced to booleans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCall {
    /// The RPC name (e.g. `SandboxCreate`).
    pub rpc: &'static str,
    /// `x-idempotency-key`.
    pub idempotency_key: Option<String>,
    /// `x-retry-attempt`.
    pub retry_attempt: Option<String>,
    /// `x-throttle-retry-attempt`.
    pub throttle_retry_attempt: Option<String>,
    /// `x-modal-client-type`.
    pub client_type: Option<String>,
    /// `x-modal-client-version`.
    pub client_version: Option<String>,
    /// Whether `x-modal-auth-token` was present.
    pub had_auth_token: bool,
    /// Whether the token id and secret matched (control plane) or the router
    /// JWT was valid (router).
    pub authorized: bool,
}

/// One exec as the router saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRecord {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Client-chosen exec id.
    pub exec_id: String,
    /// `command_args`.
    pub argv: Vec<String>,
    /// `timeout_secs`.
    pub timeout_secs: Option<u32>,
    /// Raw `stdout_config` (1 = PIPE).
    pub stdout_config: i32,
    /// Raw `stderr_config` (1 = PIPE).
    pub stderr_config: i32,
    /// Bytes written to stdin.
    pub stdin_bytes: usize,
    /// Whether stdin was closed with `eof`.
    pub stdin_closed: bool,
    /// Exit (`Some(Ok(code))`, `Some(Err(signal))`) once finished.
    pub exit: Option<Result<i32, i32>>,
}

/// A snapshot of one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSnapshot {
    /// Sandbox id.
    pub id: String,
    /// Whether it is a V2 sandbox (created with `SandboxCreateV2`).
    pub v2: bool,
    /// Owning app id.
    pub app_id: String,
    /// Image id.
    pub image_id: String,
    /// `timeout_secs` of the definition.
    pub timeout_secs: u32,
    /// `idle_timeout_secs` of the definition.
    pub idle_timeout_secs: Option<u32>,
    /// `workdir` of the definition.
    pub workdir: Option<String>,
    /// `network_access.network_access_type` (1 open, 2 blocked, 3 allowlist).
    pub network_access_type: i32,
    /// `network_access.allowed_cidrs`.
    pub allowed_cidrs: Vec<String>,
    /// Tags set with `SandboxTagsSet`.
    pub tags: HashMap<String, String>,
    /// Final status (`None` while running).
    pub finished: Option<GenericStatus>,
    /// Processes still running in it.
    pub running_processes: usize,
}

pub(crate) struct Exec {
    pub(crate) record: ExecRecord,
    pub(crate) stdout: Arc<router::Pipe>,
    pub(crate) stderr: Arc<router::Pipe>,
    pub(crate) exit: tokio::sync::watch::Receiver<Option<Result<i32, i32>>>,
    pub(crate) stdin: Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>,
    pub(crate) pgid: i32,
    /// Last legacy `RuntimeInputMessage.message_index` applied.
    pub(crate) input_index: u64,
}

pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) v2: bool,
    pub(crate) task_id: String,
    pub(crate) app_id: String,
    pub(crate) definition: paperclip_env_modal_proto::api::Sandbox,
    pub(crate) home: PathBuf,
    pub(crate) tags: HashMap<String, String>,
    pub(crate) result: Option<GenericResult>,
    pub(crate) execs: HashMap<String, Exec>,
    pub(crate) task_id_polls: usize,
    pub(crate) created: Instant,
    pub(crate) last_activity: Instant,
    pub(crate) router_jwts: Vec<String>,
}

impl Sandbox {
    fn running(&self) -> usize {
        self.execs
            .values()
            .filter(|e| e.exit.borrow().is_none())
            .count()
    }

    pub(crate) fn finish(&mut self, status: GenericStatus) {
        if self.result.is_some() {
            return;
        }
        for exec in self.execs.values() {
            if exec.exit.borrow().is_none() {
                let _ = killpg(Pid::from_raw(exec.pgid), Signal::SIGKILL);
            }
        }
        self.result = Some(GenericResult {
            status: status as i32,
            ..Default::default()
        });
    }
}

pub(crate) struct Image {
    pub(crate) id: String,
    pub(crate) ready_at: Instant,
    pub(crate) result: GenericResult,
}

pub(crate) struct Shared {
    pub(crate) token_id: String,
    pub(crate) token_secret: String,
    pub(crate) root: tempfile::TempDir,
    pub(crate) addr: Mutex<Option<SocketAddr>>,
    pub(crate) apps: Mutex<HashMap<(String, String), String>>,
    pub(crate) environments: Mutex<HashMap<String, String>>,
    pub(crate) image_builder_version: Mutex<String>,
    pub(crate) builder_versions: Mutex<Vec<String>>,
    /// Answers of carried-out creates by `(rpc, x-idempotency-key)`.
    pub(crate) idempotent: Mutex<HashMap<(&'static str, String), IdempotentAnswer>>,
    pub(crate) images: Mutex<HashMap<(String, String), Image>>,
    pub(crate) sandboxes: Mutex<HashMap<String, Sandbox>>,
    pub(crate) faults: super::FaultQueue<Route, Fault>,
    pub(crate) calls: Mutex<Vec<RecordedCall>>,
    pub(crate) auth_tokens: Mutex<Vec<(String, std::time::SystemTime)>>,
    pub(crate) join_entry_ids: Mutex<Vec<String>>,
    pub(crate) creates: AtomicUsize,
    pub(crate) exec_starts: AtomicUsize,
    pub(crate) task_id_polls: AtomicUsize,
    pub(crate) auth_token_ttl: Mutex<Duration>,
    pub(crate) router_token_ttl: Mutex<Duration>,
    pub(crate) router_enabled: std::sync::atomic::AtomicBool,
}

/// What a create answered, replayed for a retry with the same idempotency key.
#[derive(Clone)]
pub(crate) enum IdempotentAnswer {
    /// `SandboxCreate`.
    V1(paperclip_env_modal_proto::api::SandboxCreateResponse),
    /// `SandboxCreateV2`.
    V2(paperclip_env_modal_proto::api::SandboxCreateV2Response),
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// 22 random base62 characters: the suffix of a V1 sandbox id.
pub(crate) fn base62_22() -> String {
    let mut n = uuid::Uuid::new_v4().as_u128();
    let mut out = [b'0'; 22];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A ULID: 48 bits of milliseconds and 80 random bits, Crockford base32.
pub(crate) fn ulid() -> String {
    let ms = u128::from(chrono::Utc::now().timestamp_millis().max(0) as u64) & ((1 << 48) - 1);
    let random = uuid::Uuid::new_v4().as_u128() & ((1u128 << 80) - 1);
    let mut n = (ms << 80) | random;
    let mut out = [b'0'; 26];
    for slot in out.iter_mut().rev() {
        *slot = CROCKFORD[(n & 31) as usize];
        n >>= 5;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `id` has the V1 sandbox id shape (`sb-` + 22 base62 characters);
/// every other shape is V2, as the JS SDK decides.
pub fn is_v1_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-")
        .is_some_and(|rest| rest.len() == 22 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// A Modal-shaped object id: `prefix-` and 22 base62 characters.
    pub(crate) fn next(&self, prefix: &str) -> String {
        format!("{prefix}-{}", base62_22())
    }

    /// A JWT-shaped token whose payload carries `exp` (unsigned).
    pub(crate) fn jwt(&self, ttl: Duration, subject: &str) -> String {
        let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"exp": exp, "sub": subject, "jti": uuid::Uuid::new_v4().to_string()})
                .to_string(),
        );
        format!("{header}.{payload}.emulator")
    }

    pub(crate) fn fault(&self, route: Route) -> Option<Fault> {
        self.faults.take(&route)
    }

    /// Applies a queued `Status` fault; other faults are returned to the caller.
    pub(crate) fn status_fault(&self, route: Route) -> Result<Option<Fault>, Status> {
        match self.fault(route) {
            Some(Fault::Status(code)) => Err(Status::new(code, format!("injected {code:?}"))),
            Some(Fault::Throttle(after)) => Err(throttled(after)),
            other => Ok(other),
        }
    }

    pub(crate) fn sandbox_home(&self, id: &str) -> PathBuf {
        self.root.path().join(id)
    }
}

/// `RESOURCE_EXHAUSTED` with an `RPCRetryPolicy` in its status details, as
/// Modal throttles a client.
pub(crate) fn throttled(after: Duration) -> Status {
    use paperclip_env_modal_proto::api::{RpcRetryPolicy, RpcStatus};
    use paperclip_env_modal_proto::prost::Message;
    let message = format!("rate limited: retry after {:.3}s", after.as_secs_f32());
    let details = RpcStatus {
        code: Code::ResourceExhausted as i32,
        message: message.clone(),
        details: vec![paperclip_env_modal_proto::prost_types::Any {
            type_url: "type.googleapis.com/modal.client.RPCRetryPolicy".into(),
            value: RpcRetryPolicy {
                retry_after_secs: after.as_secs_f32(),
            }
            .encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::ResourceExhausted,
        message,
        tonic::codegen::Bytes::from(details.encode_to_vec()),
    )
}

/// Background sweeper: applies sandbox lifetimes and idle timeouts.
fn spawn_sweeper(shared: std::sync::Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut sandboxes = lock(&shared.sandboxes);
            for sandbox in sandboxes.values_mut() {
                if sandbox.result.is_some() {
                    continue;
                }
                let created = sandbox.created;
                if now.duration_since(created)
                    >= Duration::from_secs(u64::from(sandbox.definition.timeout_secs.max(1)))
                {
                    sandbox.finish(GenericStatus::Timeout);
                } else if let Some(idle) = sandbox.definition.idle_timeout_secs
                    && sandbox.running() == 0
                    && now.duration_since(sandbox.last_activity)
                        >= Duration::from_secs(u64::from(idle.max(1)))
                {
                    sandbox.finish(GenericStatus::IdleTimeout);
                }
            }
        }
    });
}

/// The image builder version environments report unless
/// [`ModalEmulator::set_image_builder_version`] says otherwise.
pub const DEFAULT_IMAGE_BUILDER_VERSION: &str = "2025.06";

/// The running emulator; stops (and kills every sandbox process) on drop.
pub struct ModalEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for ModalEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModalEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub(crate) struct Service {
    pub(crate) shared: Arc<Shared>,
}

impl ModalEmulator {
    /// Starts on 127.0.0.1 with a random port; only `token_id` / `token_secret` are accepted.
    pub async fn start(token_id: &str, token_secret: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            token_id: token_id.to_owned(),
            token_secret: token_secret.to_owned(),
            root: tempfile::Builder::new()
                .prefix("paperclip-modal-emulator-")
                .tempdir()?,
            addr: Mutex::new(None),
            apps: Mutex::new(HashMap::new()),
            environments: Mutex::new(HashMap::new()),
            image_builder_version: Mutex::new(DEFAULT_IMAGE_BUILDER_VERSION.to_owned()),
            builder_versions: Mutex::new(Vec::new()),
            idempotent: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            sandboxes: Mutex::new(HashMap::new()),
            faults: Default::default(),
            calls: Mutex::new(Vec::new()),
            auth_tokens: Mutex::new(Vec::new()),
            join_entry_ids: Mutex::new(Vec::new()),
            creates: AtomicUsize::new(0),
            exec_starts: AtomicUsize::new(0),
            task_id_polls: AtomicUsize::new(1),
            auth_token_ttl: Mutex::new(Duration::from_secs(3600)),
            router_token_ttl: Mutex::new(Duration::from_secs(3600)),
            router_enabled: std::sync::atomic::AtomicBool::new(true),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        *lock(&shared.addr) = Some(addr);
        let service = Service {
            shared: shared.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ModalClientServer::new(service.clone()))
                .add_service(TaskCommandRouterServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        spawn_sweeper(Arc::downgrade(&shared));
        Ok(ModalEmulator {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:<port>`: the control-plane server URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sandboxes still running (neither terminated nor timed out nor expired).
    pub fn live_sandboxes(&self) -> usize {
        lock(&self.shared.sandboxes)
            .values()
            .filter(|s| s.result.is_none())
            .count()
    }

    /// Every sandbox the emulator still knows, oldest first.
    pub fn sandboxes(&self) -> Vec<SandboxSnapshot> {
        let sandboxes = lock(&self.shared.sandboxes);
        let mut ordered: Vec<&Sandbox> = sandboxes.values().collect();
        ordered.sort_by_key(|s| s.created);
        ordered
            .into_iter()
            .map(|s| {
                let network = s.definition.network_access.clone().unwrap_or_default();
                SandboxSnapshot {
                    id: s.id.clone(),
                    v2: s.v2,
                    app_id: s.app_id.clone(),
                    image_id: s.definition.image_id.clone(),
                    timeout_secs: s.definition.timeout_secs,
                    idle_timeout_secs: s.definition.idle_timeout_secs,
                    workdir: s.definition.workdir.clone(),
                    network_access_type: network.network_access_type,
                    allowed_cidrs: network.allowed_cidrs,
                    tags: s.tags.clone(),
                    finished: s
                        .result
                        .as_ref()
                        .and_then(|r| GenericStatus::try_from(r.status).ok()),
                    running_processes: s.running(),
                }
            })
            .collect()
    }

    /// One sandbox by id.
    pub fn sandbox(&self, id: &str) -> Option<SandboxSnapshot> {
        self.sandboxes().into_iter().find(|s| s.id == id)
    }

    /// `SandboxCreate` calls so far (faulted ones included).
    pub fn create_calls(&self) -> usize {
        self.shared.creates.load(Ordering::SeqCst)
    }

    /// Command starts so far (`TaskExecStart` and legacy `ContainerExec`, faulted ones included).
    pub fn exec_starts(&self) -> usize {
        self.shared.exec_starts.load(Ordering::SeqCst)
    }

    /// Every exec started so far, in start order.
    pub fn execs(&self) -> Vec<ExecRecord> {
        let sandboxes = lock(&self.shared.sandboxes);
        let mut out: Vec<ExecRecord> = sandboxes
            .values()
            .flat_map(|s| {
                s.execs.values().map(|e| {
                    let mut r = e.record.clone();
                    r.exit = *e.exit.borrow();
                    r
                })
            })
            .collect();
        out.sort_by(|a, b| a.exec_id.cmp(&b.exec_id));
        out
    }

    /// `builder_version` of every `ImageGetOrCreate` so far.
    pub fn image_builder_versions(&self) -> Vec<String> {
        lock(&self.shared.builder_versions).clone()
    }

    /// The image builder version `EnvironmentGetOrCreate` reports from now on.
    pub fn set_image_builder_version(&self, version: &str) {
        *lock(&self.shared.image_builder_version) = version.to_owned();
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.shared.calls).clone()
    }

    /// `last_entry_id` values clients sent to `ImageJoinStreaming`.
    pub fn join_entry_ids(&self) -> Vec<String> {
        lock(&self.shared.join_entry_ids).clone()
    }

    /// Queues `fault` for the next `times` calls of `route`.
    pub fn inject(&self, route: Route, fault: Fault, times: usize) {
        self.shared.faults.push(route, fault, times);
    }

    /// Removes every queued fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// How many `SandboxGetTaskId` polls answer "not ready" after create (default 1).
    pub fn set_task_id_polls(&self, polls: usize) {
        self.shared.task_id_polls.store(polls, Ordering::SeqCst);
    }

    /// Whether tasks have a command router (default yes). Without one,
    /// `TaskGetCommandRouterAccess` answers `FAILED_PRECONDITION` and clients
    /// fall back to the legacy `ContainerExec` calls.
    pub fn set_command_router_enabled(&self, enabled: bool) {
        self.shared.router_enabled.store(enabled, Ordering::SeqCst);
    }

    /// Lifetime of auth tokens issued from now on (default 1 h).
    pub fn set_auth_token_ttl(&self, ttl: Duration) {
        *lock(&self.shared.auth_token_ttl) = ttl;
    }

    /// Lifetime of router JWTs issued from now on (default 1 h).
    pub fn set_router_token_ttl(&self, ttl: Duration) {
        *lock(&self.shared.router_token_ttl) = ttl;
    }

    /// Forgets a sandbox entirely (as after Modal's retention): `NOT_FOUND` from now on.
    pub fn expire(&self, id: &str) {
        if let Some(mut s) = lock(&self.shared.sandboxes).remove(id) {
            s.finish(GenericStatus::Timeout);
        }
    }

    /// Ends a sandbox as if its lifetime ran out; it is still found, with a `TIMEOUT` result.
    pub fn time_out(&self, id: &str) {
        if let Some(s) = lock(&self.shared.sandboxes).get_mut(id) {
            s.finish(GenericStatus::Timeout);
        }
    }
}

impl Drop for ModalEmulator {
    fn drop(&mut self) {
        for sandbox in lock(&self.shared.sandboxes).values_mut() {
            sandbox.finish(GenericStatus::Terminated);
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_shapes_tell_v1_from_v2() {
        let v1 = format!("sb-{}", base62_22());
        assert!(is_v1_sandbox_id(&v1), "{v1}");
        let v2 = format!("sb-{}", ulid());
        assert_eq!(v2.len(), 29);
        assert!(!is_v1_sandbox_id(&v2), "{v2}");
        assert!(!is_v1_sandbox_id("sb-short"));
        assert!(!is_v1_sandbox_id("ta-0123456789abcdefghijkl"));
        assert!(!is_v1_sandbox_id("sb-0123456789abcdefghij-l"));
        // ULIDs sort by time: a later one is never smaller in its time part.
        let (a, b) = (ulid(), ulid());
        assert!(a[..10] <= b[..10], "{a} {b}");
    }

    #[test]
    fn throttle_status_carries_a_retry_policy() {
        use paperclip_env_modal_proto::api::{RpcRetryPolicy, RpcStatus};
        use paperclip_env_modal_proto::prost::Message;
        let status = throttled(Duration::from_millis(250));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = RpcStatus::decode(status.details()).unwrap();
        let any = &details.details[0];
        assert!(any.type_url.ends_with("/modal.client.RPCRetryPolicy"));
        let policy = RpcRetryPolicy::decode(any.value.as_slice()).unwrap();
        assert!((policy.retry_after_secs - 0.25).abs() < 1e-6);
    }
}
