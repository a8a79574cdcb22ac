//! One plugin worker process: spawn, newline-delimited JSON-RPC framing,
//! request ids, the pending-call map, readiness (the `initialize`
//! handshake under a bounded wait), restart after a crash, and shutdown.
//!
//! Behaviour follows upstream `server/src/services/plugin-worker-manager.ts`
//! (minimal environment, stderr forwarded to the log, pending calls failed
//! with `WORKER_UNAVAILABLE` when the process exits, `shutdown` then SIGTERM
//! then SIGKILL), with these differences, all deliberate:
//! - the worker runs in its own process group, and the whole group is killed
//!   on drop, on a call deadline and on shutdown, so nothing it started
//!   outlives it;
//! - a call whose deadline passes (or whose caller gives up) is rejected
//!   alone, as upstream does; the host then asks the worker `health` and
//!   kills its process group only if no answer comes within
//!   [`PluginWorkerConfig::health_timeout`] (a worker blocked in a busy loop,
//!   not one awaiting a slow provider), so calls of other leases in flight on
//!   the same worker survive a hung one. The next call restarts a killed
//!   worker;
//! - a line on stdout that is not JSON-RPC 2.0 (a stray `console.log` in a
//!   plugin or its dependencies) is logged as a warning, scrubbed of secrets
//!   and cut to [`NOISE_EXCERPT_BYTES`], and skipped, as upstream does;
//!   [`PluginWorkerConfig::strict_stdout`] makes it a protocol error instead
//!   (the pending calls fail at once and the worker restarts);
//! - `execute.log` notifications feed the [`OutputCollector`] of the
//!   `environmentExecute` call whose `paperclipInvocationId` they carry, live
//!   and in order ([`PluginWorker::call_streaming`]); like upstream, a chunk
//!   is dropped when it is not a non-empty string on `stdout`/`stderr`, is
//!   over [`MAX_EXECUTE_LOG_CHUNK_CHARS`], names no active call, arrives
//!   while calls of two companies overlap on the worker (the shared pipe
//!   cannot prove which one wrote it), or would take the call past
//!   [`MAX_EXECUTE_LOG_TOTAL_CHARS`]. The final result stays authoritative
//!   (see `deliver` in the provider);
//! - every call carries `paperclipInvocation` (`{id, scope}`), with an empty
//!   scope when the call has no company, where upstream attaches one only to
//!   company-scoped calls: a company-less environment (instance-scoped, as
//!   Paperclip 2026.916 allows) still gets its `execute.log` chunks streamed,
//!   and a worker → host call that needs a company is still refused;
//! - everything the worker writes to logs or errors is scrubbed of every
//!   secret the SDK has handed it.
//! - a worker that exits on its own (a crash) is restarted on a timer, as
//!   upstream: after `restart_backoff` (1 s) doubled per crash up to 5
//!   minutes, with ±25 % jitter; after [`MAX_CONSECUTIVE_CRASHES`] crashes
//!   within [`CRASH_WINDOW`] it stays down (calls fail at once) until
//!   [`PluginWorker::start`] is called. A call that arrives before the timer
//!   restarts the worker itself. Failed starts back off the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use super::host_services::{HostContext, HostServices, log_plugin_message};
use super::manifest::PluginManifest;
use super::protocol::{self, Incoming, InitializeResult, InstanceInfo, RpcError, codes, methods};
use crate::Unsupported;
use crate::execute::{OutputCollector, OutputStream};
use crate::lease::JsonObject;
use crate::secret::{ProviderConfig, SecretResolver};
use crate::{Error, Operation, Result};

/// Host environment variables a worker inherits (upstream's allowlist);
/// everything else of the host environment is withheld.
pub const INHERITED_ENV: [&str; 5] = ["HOME", "PATH", "NODE_PATH", "NODE_ENV", "TZ"];

/// Variables the host sets for the worker that the plugin's own environment
/// ([`PluginWorkerConfig::env`]) cannot override, as upstream: `PATH`,
/// `NODE_PATH`, `NODE_ENV`, `TZ` and `PAPERCLIP_PLUGIN_ID`.
pub const HOST_CONTROLLED_ENV: [&str; 5] =
    ["PATH", "NODE_PATH", "NODE_ENV", "TZ", "PAPERCLIP_PLUGIN_ID"];

/// How to start and talk to one plugin worker.
///
/// ```
/// use paperclip_env_core::plugin::{PluginManifest, PluginWorkerConfig};
/// let manifest = PluginManifest::from_json(serde_json::json!({
///     "id": "acme.sandbox", "capabilities": ["environment.drivers.register"],
///     "environmentDrivers": [{"driverKey": "acme", "kind": "sandbox_provider"}]
/// })).unwrap();
/// let config = PluginWorkerConfig::new("node", manifest).arg("node_modules/@acme/sandbox/dist/worker.js");
/// assert_eq!(config.args, ["node_modules/@acme/sandbox/dist/worker.js"]);
/// ```
#[derive(Clone)]
pub struct PluginWorkerConfig {
    /// Program to run (`node` for npm plugins).
    pub command: String,
    /// Its arguments (the worker entrypoint for npm plugins).
    pub args: Vec<String>,
    /// Working directory; the host's when absent.
    pub cwd: Option<PathBuf>,
    /// Extra environment on top of [`INHERITED_ENV`] and `PAPERCLIP_PLUGIN_ID`.
    pub env: BTreeMap<String, String>,
    /// Secret environment (API keys the worker needs): never logged, and
    /// scrubbed from everything the worker writes.
    pub secret_env: BTreeMap<String, SecretString>,
    /// The plugin manifest, sent in `initialize`.
    pub manifest: PluginManifest,
    /// The plugin's bootstrap config, sent in `initialize` and answered to `config.get`.
    pub plugin_config: JsonObject,
    /// Host identity sent in `initialize`.
    pub instance: InstanceInfo,
    /// Host API version sent in `initialize` when the manifest names none
    /// (1); a manifest's `apiVersion` is sent as is, as upstream does.
    pub api_version: u32,
    /// Bound on starting the process and completing `initialize` (15 s).
    pub ready_timeout: Duration,
    /// Deadline of calls given none (30 s, the worker manager's `rpcTimeoutMs`).
    pub default_call_deadline: Duration,
    /// How long `shutdown` waits for the worker to answer `shutdown` and exit
    /// before SIGTERM (10 s, upstream's `SHUTDOWN_DRAIN_MS`): time for its
    /// `onShutdown` to finish in-flight work.
    pub shutdown_drain: Duration,
    /// How long after SIGTERM before SIGKILL (5 s, upstream's
    /// `SIGTERM_GRACE_MS`).
    pub shutdown_grace: Duration,
    /// Wait before retrying a worker that failed to start (1 s), doubled per
    /// consecutive failure up to 5 minutes; calls in between fail at once.
    /// Zero disables the back-off. A crash after a good start is not a
    /// failed start: the next call restarts at once.
    pub restart_backoff: Duration,
    /// Treat a stdout line that is not JSON-RPC as a protocol error that
    /// fails the pending calls and restarts the worker (false: log it as a
    /// warning and skip it, as upstream does).
    pub strict_stdout: bool,
    /// Longest accepted stdout line (64 MiB); longer is a protocol error.
    pub max_line_bytes: usize,
    /// After a call timed out or was abandoned, how long the worker has to
    /// answer `health` before its process group is killed (10 s). Zero
    /// kills at once.
    pub health_timeout: Duration,
    /// Where the worker's `secrets.resolve` calls look secrets up (none:
    /// they are refused with the capability error).
    pub secret_resolver: Option<Arc<dyn SecretResolver>>,
}

impl std::fmt::Debug for PluginWorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWorkerConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("env", &self.env)
            .field("secret_env", &self.secret_env.keys().collect::<Vec<_>>())
            .field("plugin", &self.manifest.id)
            .field("ready_timeout", &self.ready_timeout)
            .field("default_call_deadline", &self.default_call_deadline)
            .field("health_timeout", &self.health_timeout)
            .field("shutdown_drain", &self.shutdown_drain)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("secret_resolver", &self.secret_resolver.is_some())
            .finish_non_exhaustive()
    }
}

impl PluginWorkerConfig {
    /// A config running `command` for `manifest`, with the defaults.
    pub fn new(command: impl Into<String>, manifest: PluginManifest) -> Self {
        PluginWorkerConfig {
            command: command.into(),
            args: Vec::new(),
            cwd: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            manifest,
            plugin_config: JsonObject::new(),
            instance: InstanceInfo {
                instance_id: uuid::Uuid::new_v4().to_string(),
                host_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            api_version: 1,
            ready_timeout: Duration::from_secs(15),
            default_call_deadline: Duration::from_secs(30),
            shutdown_drain: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            restart_backoff: Duration::from_secs(1),
            strict_stdout: false,
            max_line_bytes: 64 * 1024 * 1024,
            health_timeout: Duration::from_secs(10),
            secret_resolver: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Adds a secret environment variable.
    pub fn secret_env(mut self, key: impl Into<String>, value: SecretString) -> Self {
        self.secret_env.insert(key.into(), value);
        self
    }

    /// Sets the bootstrap config.
    pub fn plugin_config(mut self, config: JsonObject) -> Self {
        self.plugin_config = config;
        self
    }

    /// Sets the readiness bound.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Sets the default call deadline.
    pub fn default_call_deadline(mut self, deadline: Duration) -> Self {
        self.default_call_deadline = deadline;
        self
    }

    /// Sets [`PluginWorkerConfig::strict_stdout`].
    pub fn strict_stdout(mut self, strict: bool) -> Self {
        self.strict_stdout = strict;
        self
    }

    /// Sets [`PluginWorkerConfig::shutdown_drain`] and
    /// [`PluginWorkerConfig::shutdown_grace`].
    pub fn shutdown_timings(mut self, drain: Duration, grace: Duration) -> Self {
        self.shutdown_drain = drain;
        self.shutdown_grace = grace;
        self
    }

    /// Sets [`PluginWorkerConfig::secret_resolver`].
    pub fn secret_resolver(mut self, resolver: Arc<dyn SecretResolver>) -> Self {
        self.secret_resolver = Some(resolver);
        self
    }

    /// Sets [`PluginWorkerConfig::health_timeout`].
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }
}

/// Longest excerpt of a skipped non-JSON-RPC stdout line in the log.
pub const NOISE_EXCERPT_BYTES: usize = 200;
/// Longest accepted `execute.log` chunk, in characters (upstream's bound).
pub const MAX_EXECUTE_LOG_CHUNK_CHARS: usize = 1_000_000;
/// Most characters one execute call may stream (upstream's bound); later
/// chunks are dropped, and the final result still carries the output.
pub const MAX_EXECUTE_LOG_TOTAL_CHARS: usize = 128 * 1024 * 1024;

/// What the worker streamed through `execute.log` during one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamedOutput {
    /// Streamed stdout, in order.
    pub stdout: Vec<u8>,
    /// Streamed stderr, in order.
    pub stderr: Vec<u8>,
}

impl StreamedOutput {
    /// Whether nothing was streamed.
    pub fn is_empty(&self) -> bool {
        self.stdout.is_empty() && self.stderr.is_empty()
    }

    /// Delivers the final result's `text` for `stream` without repeating what
    /// was streamed (upstream's `undeliveredSuffix`): nothing streamed, the
    /// whole text; streamed a prefix of it, the rest; streamed something it
    /// does not continue (a provider that fell back to another buffer), the
    /// collector's buffer is replaced by the final text, which is
    /// authoritative, and the sink keeps what it saw.
    pub fn deliver_final(&self, output: &OutputCollector, stream: OutputStream, text: &[u8]) {
        let streamed = match stream {
            OutputStream::Stdout => &self.stdout,
            OutputStream::Stderr => &self.stderr,
        };
        if streamed.is_empty() {
            output.push(stream, text);
        } else if let Some(rest) = text.strip_prefix(streamed.as_slice()) {
            output.push(stream, rest);
        } else {
            warn!(target: "paperclip_env::plugin", stream = ?stream, "the final execute result does not continue the streamed output; keeping the final result");
            output.reconcile(stream, text);
        }
    }
}

/// Where `execute.log` chunks of one in-flight `environmentExecute` go.
struct ExecuteRoute {
    invocation_id: String,
    company_id: Option<String>,
    output: OutputCollector,
    streamed: Arc<Mutex<StreamedOutput>>,
    delivered_chars: usize,
    cross_company_blocked: bool,
}

/// The chunk sink of a streaming call: its collector and what was streamed.
type RouteSink = (OutputCollector, Arc<Mutex<StreamedOutput>>);

/// Why a call to the worker failed.
///
/// ```
/// use std::time::Duration;
/// use paperclip_env_core::plugin::CallError;
/// use paperclip_env_core::{Error, Operation, Unsupported};
/// let e = CallError::Timeout { method: "environmentExecute".into(), after: Duration::from_secs(31) }
///     .into_error("acme", Unsupported::Provider("acme".into()), Operation::Execute);
/// // The command may still be running: a timed-out execute is not retried blindly.
/// assert!(matches!(e, Error::Timeout { .. }) && !e.is_retryable());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The worker answered with a JSON-RPC error (message scrubbed).
    Rpc(RpcError),
    /// No answer before the deadline. The call alone is rejected; the
    /// worker is killed only if it then fails its `health` check.
    Timeout {
        /// The method.
        method: String,
        /// The deadline.
        after: Duration,
    },
    /// The worker is not running, failed to start, or exited mid-call.
    Unavailable(String),
    /// The worker broke the protocol (garbage on stdout, malformed answer).
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Rpc(e) => write!(f, "{} (code {})", e.message, e.code),
            CallError::Timeout { method, after } => {
                write!(
                    f,
                    "RPC call \"{method}\" timed out after {}ms",
                    after.as_millis()
                )
            }
            CallError::Unavailable(m) => f.write_str(m),
            CallError::Protocol(m) => write!(f, "plugin worker protocol error: {m}"),
        }
    }
}

/// Longest error message a worker can put into an SDK error (4 KiB): a
/// plugin that answers with a whole log or response body must not flood
/// the caller's logs and the lease row.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// `message` cut at [`MAX_ERROR_MESSAGE_BYTES`] on a character boundary,
/// saying how much was cut.
fn cap_message(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} more bytes cut)",
        &message[..end],
        message.len() - end
    )
}

impl CallError {
    /// The SDK error for this failure of `operation`; `by` names who refuses
    /// unimplemented methods and `label` is the provider label in messages.
    pub fn into_error(self, label: &str, by: Unsupported, operation: Operation) -> Error {
        match self {
            CallError::Rpc(e) => rpc_error_to_error(e, label, by, operation),
            CallError::Timeout { method, after } => Error::Timeout {
                operation: method,
                after,
            },
            CallError::Unavailable(message) => Error::Provider {
                provider: label.to_owned(),
                message: cap_message(message),
                retryable: true,
                source: None,
            },
            CallError::Protocol(message) => Error::Provider {
                provider: label.to_owned(),
                message: format!("plugin worker protocol error: {}", cap_message(message)),
                retryable: true,
                source: None,
            },
        }
    }
}

/// Maps a worker's JSON-RPC error onto [`Error`] (spec 00 §10.2 codes).
/// `data.paperclipEnv.kind` (`not_found`, `invalid_config`, `unauthenticated`,
/// `rate_limited`) and `data.paperclipEnv.retryable` refine `WORKER_ERROR`
/// answers when a worker provides them; plain Paperclip workers never do.
///
/// ```
/// use paperclip_env_core::plugin::protocol::{RpcError, codes};
/// use paperclip_env_core::plugin::rpc_error_to_error;
/// use paperclip_env_core::{Error, Operation, Unsupported};
/// let e = rpc_error_to_error(
///     RpcError::new(codes::METHOD_NOT_IMPLEMENTED, "environmentExecute is not implemented by this plugin"),
///     "acme", Unsupported::Provider("acme".into()), Operation::Execute);
/// assert_eq!(e.to_string(), "Sandbox provider \"acme\" does not support command execution.");
/// ```
pub fn rpc_error_to_error(
    e: RpcError,
    label: &str,
    by: Unsupported,
    operation: Operation,
) -> Error {
    let mut e = e;
    e.message = cap_message(std::mem::take(&mut e.message));
    let hint = e.data.as_ref().and_then(|d| d.get("paperclipEnv"));
    let kind = hint.and_then(|h| h.get("kind")).and_then(Value::as_str);
    let retryable = hint
        .and_then(|h| h.get("retryable"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match e.code {
        codes::METHOD_NOT_IMPLEMENTED | codes::METHOD_NOT_FOUND => {
            Error::NotSupported { operation, by }
        }
        // The worker (or a host the worker called) gave up: upstream words it
        // `… timed out after <n>ms`.
        codes::TIMEOUT => Error::Timeout {
            operation: operation.method_name().to_owned(),
            after: timeout_in_message(&e.message),
        },
        codes::CAPABILITY_DENIED | codes::INVOCATION_SCOPE_DENIED | codes::CROSS_TENANT_CONFIG => {
            Error::PermissionDenied {
                message: e.message,
                source: None,
            }
        }
        codes::WORKER_UNAVAILABLE => Error::Provider {
            provider: label.to_owned(),
            message: e.message,
            retryable: true,
            source: None,
        },
        _ => match kind {
            Some("not_found") => Error::NotFound {
                message: e.message,
                source: None,
            },
            Some("invalid_config") => Error::invalid_field("", e.message),
            Some("unauthenticated") => Error::Unauthenticated {
                message: e.message,
                source: None,
            },
            Some("rate_limited") => Error::RateLimited {
                message: e.message,
                retry_after: None,
            },
            _ => Error::Provider {
                provider: label.to_owned(),
                message: e.message,
                retryable,
                source: None,
            },
        },
    }
}

fn timeout_in_message(message: &str) -> Duration {
    message
        .rsplit_once("after ")
        .and_then(|(_, tail)| tail.trim_end_matches('.').strip_suffix("ms"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
}

/// How many distinct secrets a worker's scrubber remembers. Rotating
/// secrets would otherwise grow the list for the life of a long-running
/// host; the most recently used ones are kept.
const SCRUBBER_CAPACITY: usize = 1024;

/// Secrets handed to the worker; scrubbed from everything it writes.
#[derive(Default)]
struct Scrubber {
    /// Most recently registered last.
    secrets: RwLock<std::collections::VecDeque<SecretString>>,
}

impl Scrubber {
    fn add(&self, value: &SecretString) {
        if value.expose_secret().is_empty() {
            return;
        }
        let mut secrets = self.secrets.write().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = secrets
            .iter()
            .position(|s| s.expose_secret() == value.expose_secret())
        {
            // Already known: mark it as the most recently used.
            if let Some(known) = secrets.remove(at) {
                secrets.push_back(known);
            }
            return;
        }
        if secrets.len() >= SCRUBBER_CAPACITY {
            secrets.pop_front();
        }
        secrets.push_back(value.clone());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.secrets.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in self
            .secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out = out.replace(s.expose_secret(), "[REDACTED]");
        }
        out
    }
}

type Pending = HashMap<u64, oneshot::Sender<std::result::Result<Value, CallError>>>;

/// One running (or just exited) worker process.
struct Process {
    pid: Option<u32>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Mutex<Pending>,
    /// In-flight streaming execute calls, by request id.
    routes: Mutex<HashMap<u64, ExecuteRoute>>,
    alive: AtomicBool,
    exited: watch::Receiver<bool>,
    /// Plugin id, for logs.
    plugin: String,
    /// See [`PluginWorkerConfig::health_timeout`].
    health_timeout: Duration,
    /// A `health` check is in flight.
    checking: AtomicBool,
    /// Request ids of health checks: a range of their own, far above the
    /// host's call ids, so the two never meet in the pending map.
    health_ids: AtomicU64,
}

/// First request id of health checks.
const HEALTH_ID_BASE: u64 = 1 << 62;

impl Process {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ExecuteRoute>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, error: CallError) {
        self.lock_routes().clear();
        let drained: Vec<_> = self.lock_pending().drain().collect();
        for (_, tx) in drained {
            let _ = tx.send(Err(error.clone()));
        }
    }

    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            // The worker leads its own group; ESRCH means it is gone already.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// A call timed out or was abandoned: ask the worker `health` and kill it
    /// only if no answer comes within the health timeout. One check at a
    /// time; without a runtime to run it on, the worker is killed at once.
    fn suspect(self: &Arc<Self>, why: &'static str) {
        if !self.alive() {
            return;
        }
        if self.health_timeout.is_zero() {
            self.kill(why);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.kill(why);
            return;
        };
        if self.checking.swap(true, Ordering::SeqCst) {
            return;
        }
        let process = self.clone();
        runtime.spawn(async move {
            let answered = process.answers_health().await;
            process.checking.store(false, Ordering::SeqCst);
            if answered {
                debug!(target: "paperclip_env::plugin", plugin = %process.plugin, why, "the worker still answers health; keeping it");
            } else if process.alive() {
                warn!(target: "paperclip_env::plugin", plugin = %process.plugin, why, after_ms = process.health_timeout.as_millis() as u64, "the worker did not answer health; killing it");
                process.kill("the worker stopped answering health");
            }
        });
    }

    /// Whether the worker answers `health` (with a result or an error)
    /// within the health timeout.
    async fn answers_health(&self) -> bool {
        let id = self.health_ids.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(id, tx);
        let probe = async {
            self.write_line(&protocol::request_line(
                id,
                methods::HEALTH,
                &json!({}),
                None,
            ))
            .await
            .ok()?;
            rx.await.ok()
        };
        let answer = tokio::time::timeout(self.health_timeout, probe).await;
        self.lock_pending().remove(&id);
        matches!(answer, Ok(Some(Ok(_)) | Some(Err(CallError::Rpc(_)))))
    }

    /// Kills the worker and everything in its process group.
    fn kill(&self, why: &str) {
        if self.alive.swap(false, Ordering::SeqCst) {
            debug!(target: "paperclip_env::plugin", pid = ?self.pid, why, "killing plugin worker");
        }
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
    }

    async fn write_line(&self, line: &str) -> std::io::Result<()> {
        let mut stdin = self.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "worker stdin is closed",
            ));
        };
        pipe.write_all(line.as_bytes()).await?;
        pipe.flush().await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes a pending call; when the call is abandoned before its answer
/// arrives (caller gave up, or its deadline passed), checks that the worker
/// still answers `health` and kills it if not.
struct PendingGuard {
    process: Arc<Process>,
    id: u64,
    armed: bool,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.process.lock_routes().remove(&self.id);
        if self.armed && self.process.lock_pending().remove(&self.id).is_some() {
            self.process
                .suspect("a call was abandoned before the worker answered");
        }
    }
}

/// Consecutive failed starts, for the back-off.
struct FailedStarts {
    count: u32,
    retry_at: tokio::time::Instant,
    last: String,
}

/// Longest wait between start attempts.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);
/// Crashes within [`CRASH_WINDOW`] after which a worker is not restarted
/// (upstream's `MAX_CONSECUTIVE_CRASHES`).
pub const MAX_CONSECUTIVE_CRASHES: usize = 10;
/// The window crashes are counted in (10 minutes, upstream's `CRASH_WINDOW_MS`).
pub const CRASH_WINDOW: Duration = Duration::from_secs(600);

/// Recent crashes, for the restart timer and the crash-loop stop.
#[derive(Default)]
struct Crashes {
    at: std::collections::VecDeque<tokio::time::Instant>,
    /// Set once the worker crashed too often: why it stays down.
    stopped: Option<String>,
}

/// The wait before the `n`th consecutive restart attempt (1-based): `base`
/// doubled per earlier attempt, capped at [`MAX_RESTART_BACKOFF`]. Failed
/// starts wait exactly this; crashes add ±25 % jitter.
fn restart_backoff(base: Duration, n: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(16)))
        .min(MAX_RESTART_BACKOFF)
}

/// [`restart_backoff`] after the `crashes`th crash, with ±25 % jitter.
fn crash_backoff(base: Duration, crashes: usize) -> Duration {
    let jitter = 0.75 + 0.5 * (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    restart_backoff(base, u32::try_from(crashes).unwrap_or(u32::MAX)).mul_f64(jitter)
}

struct Shared {
    config: PluginWorkerConfig,
    current: Mutex<Option<Arc<Process>>>,
    start_lock: tokio::sync::Mutex<()>,
    supported: Mutex<Option<Vec<String>>>,
    starts: AtomicU64,
    failed_starts: Mutex<Option<FailedStarts>>,
    crashes: Mutex<Crashes>,
    next_id: AtomicU64,
    closed: AtomicBool,
    scrubber: Scrubber,
    host: HostServices,
}

impl Shared {
    fn lock_crashes(&self) -> std::sync::MutexGuard<'_, Crashes> {
        self.crashes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one worker → host request (see `host_services`).
    async fn answer_host_call(
        &self,
        method: &str,
        params: &Value,
    ) -> std::result::Result<Value, RpcError> {
        let config = &self.config;
        let capabilities: Vec<&str> = config
            .manifest
            .raw
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let cx = HostContext {
            plugin_id: &config.manifest.id,
            capabilities,
            config: &config.plugin_config,
            resolver: config.secret_resolver.as_ref(),
        };
        let answer = self
            .host
            .answer(&cx, method, params, |text| self.scrubber.scrub(text))
            .await?;
        if let Some(secret) = &answer.revealed {
            self.scrubber.add(secret);
        }
        Ok(answer.result)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(p) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            p.kill("the worker handle was dropped");
        }
    }
}

/// A plugin worker: a child process speaking the plugin protocol on its
/// stdio. Cheap to clone; clones share the process. Started lazily by the
/// first call (or eagerly by [`PluginWorker::start`]); restarted by the next
/// call after it crashed, hung or broke the protocol. Dropping the last clone
/// kills the worker's process group.
///
/// ```no_run
/// # async fn demo() -> paperclip_env_core::Result<()> {
/// use paperclip_env_core::plugin::{PluginManifest, PluginWorker, PluginWorkerConfig};
/// let manifest = PluginManifest::from_json(serde_json::json!({
///     "id": "acme.sandbox", "capabilities": ["environment.drivers.register"],
///     "environmentDrivers": [{"driverKey": "acme", "kind": "sandbox_provider"}]
/// }))?;
/// let worker = PluginWorker::new(PluginWorkerConfig::new("node", manifest).arg("dist/worker.js"));
/// worker.start().await?;
/// assert!(worker.supported_methods().unwrap_or_default().iter().any(|m| m == "environmentAcquireLease"));
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PluginWorker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PluginWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWorker")
            .field("plugin", &self.shared.config.manifest.id)
            .field("running", &self.is_running())
            .field("starts", &self.starts())
            .finish()
    }
}

enum LineRead {
    Eof,
    Line,
    TooLong,
}

async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        if let Some(pos) = available.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&available[..pos]);
            reader.consume(pos + 1);
            return Ok(LineRead::Line);
        }
        let n = available.len();
        buf.extend_from_slice(available);
        reader.consume(n);
        if buf.len() > cap {
            return Ok(LineRead::TooLong);
        }
    }
}

fn describe_exit(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .and_then(|s| s.code())
        .map_or_else(|| "null".to_owned(), |c| c.to_string());
    let signal = status
        .and_then(|s| s.signal())
        .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
        .map_or_else(|| "null".to_owned(), |s| s.as_str().to_owned());
    format!("Worker process exited (code={code}, signal={signal})")
}

const MAX_STDERR_EXCERPT: usize = 8_000;

impl PluginWorker {
    /// A worker for `config`; nothing starts until the first call or [`PluginWorker::start`].
    pub fn new(config: PluginWorkerConfig) -> Self {
        let scrubber = Scrubber::default();
        for value in config.secret_env.values() {
            scrubber.add(value);
        }
        PluginWorker {
            shared: Arc::new(Shared {
                config,
                current: Mutex::new(None),
                start_lock: tokio::sync::Mutex::new(()),
                supported: Mutex::new(None),
                starts: AtomicU64::new(0),
                failed_starts: Mutex::new(None),
                crashes: Mutex::new(Crashes::default()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                scrubber,
                host: HostServices::default(),
            }),
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &PluginManifest {
        &self.shared.config.manifest
    }

    /// The plugin key (manifest id).
    pub fn plugin_key(&self) -> &str {
        &self.shared.config.manifest.id
    }

    /// The config.
    pub fn config(&self) -> &PluginWorkerConfig {
        &self.shared.config
    }

    /// Whether [`PluginWorker::shutdown`] was called (no restart follows).
    pub fn is_shut_down(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Whether a worker process is up and initialized.
    pub fn is_running(&self) -> bool {
        self.current().is_some_and(|p| p.alive())
    }

    /// The worker's process id, when running.
    pub fn pid(&self) -> Option<u32> {
        self.current().filter(|p| p.alive()).and_then(|p| p.pid)
    }

    /// How many times a worker process was started and initialized.
    pub fn starts(&self) -> u64 {
        self.shared.starts.load(Ordering::SeqCst)
    }

    /// Optional methods the worker reported in `initialize`, once it has run.
    pub fn supported_methods(&self) -> Option<Vec<String>> {
        self.shared
            .supported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Registers the secrets of `config` for scrubbing (done by every call
    /// that hands the worker a provider config).
    pub fn register_secrets(&self, config: &ProviderConfig) {
        for path in config.secret_paths() {
            if let Some(value) = config.secret(path) {
                self.shared.scrubber.add(value);
            }
        }
    }

    /// `text` with every registered secret replaced by `[REDACTED]`.
    pub fn scrub(&self, text: &str) -> String {
        self.shared.scrubber.scrub(text)
    }

    fn current(&self) -> Option<Arc<Process>> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn label(&self) -> String {
        format!("plugin:{}", self.plugin_key())
    }

    /// Starts the worker (if not running) and waits for `initialize`, bounded
    /// by [`PluginWorkerConfig::ready_timeout`].
    pub async fn start(&self) -> Result<()> {
        // An explicit start is the operator's word: a crash-looping worker
        // gets another chance.
        {
            let mut crashes = self.lock_crashes();
            crashes.stopped = None;
            crashes.at.clear();
        }
        self.ensure_running()
            .await
            .map(|_| ())
            .map_err(|e| Error::ProviderUnavailable {
                provider: self.label(),
                message: e.to_string(),
                retryable: true,
            })
    }

    async fn ensure_running(&self) -> std::result::Result<Arc<Process>, CallError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(CallError::Unavailable(format!(
                "The worker of plugin \"{}\" has been shut down.",
                self.plugin_key()
            )));
        }
        if let Some(p) = self.current().filter(|p| p.alive()) {
            return Ok(p);
        }
        if let Some(why) = self.lock_crashes().stopped.clone() {
            return Err(CallError::Unavailable(why));
        }
        let _starting = self.shared.start_lock.lock().await;
        if let Some(p) = self.current().filter(|p| p.alive()) {
            return Ok(p);
        }
        if let Some(old) = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            old.kill("restarting");
            info!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), "restarting plugin worker");
        }
        if let Some(f) = self
            .shared
            .failed_starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let now = tokio::time::Instant::now();
            if now < f.retry_at {
                return Err(CallError::Unavailable(format!(
                    "{} (failed to start {} time(s) in a row; next attempt in {}ms)",
                    f.last,
                    f.count,
                    (f.retry_at - now).as_millis()
                )));
            }
        }
        let result = self.start_process().await;
        let mut failed = self
            .shared
            .failed_starts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => *failed = None,
            Err(e) => {
                let count = failed.as_ref().map_or(1, |f| f.count + 1);
                let wait = restart_backoff(self.shared.config.restart_backoff, count);
                *failed = Some(FailedStarts {
                    count,
                    retry_at: tokio::time::Instant::now() + wait,
                    last: e.to_string(),
                });
            }
        }
        result
    }

    /// Spawns a process and runs the `initialize` handshake (start lock held).
    async fn start_process(&self) -> std::result::Result<Arc<Process>, CallError> {
        let process = self.spawn()?;
        let cfg = &self.shared.config;
        let params = json!({
            "manifest": cfg.manifest.raw,
            "config": cfg.plugin_config,
            "instanceInfo": cfg.instance,
            "apiVersion": cfg
                .manifest
                .raw
                .get("apiVersion")
                .and_then(Value::as_u64)
                .unwrap_or(u64::from(cfg.api_version)),
            "databaseNamespace": null,
        });
        let outcome = self
            .send(
                &process,
                methods::INITIALIZE,
                &params,
                None,
                cfg.ready_timeout,
                None,
            )
            .await
            .and_then(|v| {
                serde_json::from_value::<InitializeResult>(v)
                    .map_err(|e| CallError::Protocol(format!("malformed initialize result: {e}")))
            });
        match outcome {
            Ok(result) if result.ok => {
                *self
                    .shared
                    .supported
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(result.supported_methods);
                *self
                    .shared
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(process.clone());
                self.shared.starts.fetch_add(1, Ordering::SeqCst);
                info!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), pid = ?process.pid, "plugin worker started and initialized");
                Ok(process)
            }
            other => {
                process.kill("initialize failed");
                let why = match other {
                    Ok(_) => "Worker initialize returned ok=false".to_owned(),
                    Err(e) => e.to_string(),
                };
                let message = format!(
                    "Worker initialize failed for \"{}\": {why}",
                    self.plugin_key()
                );
                error!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), "{message}");
                Err(CallError::Unavailable(message))
            }
        }
    }

    fn spawn(&self) -> std::result::Result<Arc<Process>, CallError> {
        let cfg = &self.shared.config;
        let mut cmd = Command::new(&cfg.command);
        cmd.args(&cfg.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // The plugin's own environment first; then what the host controls,
        // which it cannot override (upstream spreads `options.env` before
        // PATH, NODE_PATH, PAPERCLIP_PLUGIN_ID, NODE_ENV and TZ).
        cmd.envs(&cfg.env);
        for (key, value) in &cfg.secret_env {
            cmd.env(key, value.expose_secret());
        }
        for key in INHERITED_ENV {
            if let Ok(value) = std::env::var(key) {
                cmd.env(key, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "");
        }
        if std::env::var_os("NODE_PATH").is_none() {
            cmd.env("NODE_PATH", "");
        }
        if std::env::var_os("NODE_ENV").is_none() {
            cmd.env("NODE_ENV", "production");
        }
        if std::env::var_os("TZ").is_none() {
            cmd.env("TZ", "UTC");
        }
        cmd.env("PAPERCLIP_PLUGIN_ID", &cfg.manifest.id);
        if let Some(cwd) = &cfg.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|e| {
            CallError::Unavailable(format!(
                "Failed to start the worker of plugin \"{}\" ({}): {e}",
                cfg.manifest.id, cfg.command
            ))
        })?;
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = (stdin, stdout, stderr) else {
            return Err(CallError::Unavailable(
                "worker stdio pipes are missing".into(),
            ));
        };
        let (exit_tx, exit_rx) = watch::channel(false);
        let process = Arc::new(Process {
            pid: child.id(),
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            pending: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            exited: exit_rx,
            plugin: cfg.manifest.id.clone(),
            health_timeout: cfg.health_timeout,
            checking: AtomicBool::new(false),
            health_ids: AtomicU64::new(HEALTH_ID_BASE),
        });
        let excerpt = Arc::new(Mutex::new(String::new()));
        let stderr_done = tokio::spawn(self.clone_weak().stderr_task(stderr, excerpt.clone()));
        tokio::spawn(self.clone_weak().stdout_task(
            process.clone(),
            child,
            stdout,
            (excerpt, stderr_done),
            exit_tx,
        ));
        Ok(process)
    }

    fn lock_crashes(&self) -> std::sync::MutexGuard<'_, Crashes> {
        self.shared.lock_crashes()
    }

    /// The worker exited on its own: count the crash, and restart it after
    /// the back-off unless it crashed too often (see the module docs).
    fn on_crash(shared: &Arc<Shared>, message: &str) {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let plugin = shared.config.manifest.id.clone();
        let count = {
            let mut crashes = shared.lock_crashes();
            let now = tokio::time::Instant::now();
            crashes.at.push_back(now);
            while crashes
                .at
                .front()
                .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
            {
                crashes.at.pop_front();
            }
            let count = crashes.at.len();
            if count >= MAX_CONSECUTIVE_CRASHES {
                let why = format!(
                    "The worker of plugin \"{plugin}\" crashed {count} times within {} minutes and is not restarted; call start() to try again. Last exit: {}",
                    CRASH_WINDOW.as_secs() / 60,
                    message.lines().next().unwrap_or_default()
                );
                error!(target: "paperclip_env::plugin", plugin = %plugin, crashes = count, "plugin worker crash-looping; not restarting");
                crashes.stopped = Some(why);
                return;
            }
            count
        };
        let delay = crash_backoff(shared.config.restart_backoff, count);
        info!(target: "paperclip_env::plugin", plugin = %plugin, crashes = count, delay_ms = delay.as_millis() as u64, "plugin worker crashed; restarting after the back-off");
        let weak = Arc::downgrade(shared);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let worker = PluginWorker { shared };
            if worker.is_running() || worker.is_shut_down() {
                return;
            }
            if let Err(e) = worker.ensure_running().await {
                warn!(target: "paperclip_env::plugin", plugin = %worker.plugin_key(), "restart after a crash failed: {e}");
            }
        });
    }

    fn clone_weak(&self) -> WeakWorker {
        WeakWorker {
            shared: Arc::downgrade(&self.shared),
            plugin: self.plugin_key().to_owned(),
            strict_stdout: self.shared.config.strict_stdout,
            max_line: self.shared.config.max_line_bytes,
        }
    }

    async fn send(
        &self,
        process: &Arc<Process>,
        method: &str,
        params: &Value,
        company_id: Option<&str>,
        deadline: Duration,
        sink: Option<RouteSink>,
    ) -> std::result::Result<Value, CallError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let invocation_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        if let Some((output, streamed)) = sink {
            process.lock_routes().insert(
                id,
                ExecuteRoute {
                    invocation_id: invocation_id.clone(),
                    company_id: company_id.map(str::to_owned),
                    output,
                    streamed,
                    delivered_chars: 0,
                    cross_company_blocked: false,
                },
            );
        }
        process.lock_pending().insert(id, tx);
        let mut guard = PendingGuard {
            process: process.clone(),
            id,
            armed: true,
        };
        let line = protocol::request_line_for(id, method, params, company_id, &invocation_id);
        if let Err(e) = process.write_line(&line).await {
            guard.armed = false;
            process.lock_pending().remove(&id);
            process.kill("stdin write failed");
            return Err(CallError::Unavailable(format!(
                "Cannot call \"{method}\": the worker of plugin \"{}\" is not running ({e})",
                self.plugin_key()
            )));
        }
        let answer = tokio::time::timeout(deadline, rx).await;
        match answer {
            Ok(Ok(outcome)) => {
                guard.armed = false;
                outcome
            }
            Ok(Err(_)) => {
                guard.armed = false;
                Err(CallError::Unavailable(format!(
                    "The worker of plugin \"{}\" went away during \"{method}\"",
                    self.plugin_key()
                )))
            }
            Err(_) => {
                // The guard drops armed: the pending entry goes and the
                // worker is asked `health` (killed if it does not answer).
                warn!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), method, after_ms = deadline.as_millis() as u64, "plugin worker call timed out; checking the worker still answers health");
                drop(guard);
                Err(CallError::Timeout {
                    method: method.to_owned(),
                    after: deadline,
                })
            }
        }
    }

    /// Calls `method` with `params` under `deadline` (the default deadline
    /// when `None`), starting or restarting the worker first if needed.
    pub async fn call(
        &self,
        method: &str,
        params: &Value,
        company_id: Option<&str>,
        deadline: Option<Duration>,
    ) -> std::result::Result<Value, CallError> {
        let process = self.ensure_running().await?;
        let deadline = deadline.unwrap_or(self.shared.config.default_call_deadline);
        self.send(&process, method, params, company_id, deadline, None)
            .await
    }

    /// [`PluginWorker::call`] for a call whose worker may stream output
    /// (`environmentExecute`): every `execute.log` notification carrying this
    /// call's invocation id is pushed into `output` as it arrives, in order,
    /// until the answer. Returns the answer and what was streamed, so the
    /// caller can deliver only the part of the final result not yet seen
    /// ([`StreamedOutput::deliver_final`]).
    pub async fn call_streaming(
        &self,
        method: &str,
        params: &Value,
        company_id: Option<&str>,
        deadline: Option<Duration>,
        output: &OutputCollector,
    ) -> std::result::Result<(Value, StreamedOutput), CallError> {
        let process = self.ensure_running().await?;
        let deadline = deadline.unwrap_or(self.shared.config.default_call_deadline);
        let streamed = Arc::new(Mutex::new(StreamedOutput::default()));
        let sink = (output.clone(), streamed.clone());
        let value = self
            .send(&process, method, params, company_id, deadline, Some(sink))
            .await?;
        let streamed = std::mem::take(&mut *streamed.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((value, streamed))
    }

    /// Whether the worker stored anything through `state.set` (kept by this
    /// host in memory, so it ends with the host process).
    pub fn has_host_state(&self) -> bool {
        self.shared.host.has_state()
    }

    /// Fails, without calling it, when the worker does not advertise the
    /// lifecycle `method` in its `supportedMethods`: like upstream's host, no
    /// release or destroy is sent that the live worker cannot serve, and the
    /// caller records a failed cleanup for the reaper instead. Starts the
    /// worker first when it is not running.
    pub async fn require_advertised(&self, method: &str) -> Result<()> {
        self.start().await?;
        match self.supported_methods() {
            Some(methods) if !methods.iter().any(|m| m == method) => Err(Error::Provider {
                provider: self.label(),
                message: format!(
                    "Plugin \"{}\" does not advertise {method}; the lease is left for cleanup.",
                    self.plugin_key()
                ),
                retryable: false,
                source: None,
            }),
            _ => Ok(()),
        }
    }

    /// Stops the worker as upstream's host does: `shutdown`, waiting up to
    /// [`PluginWorkerConfig::shutdown_drain`] for the answer and the exit,
    /// then SIGTERM to its process group, then SIGKILL after
    /// [`PluginWorkerConfig::shutdown_grace`]. No restart happens afterwards.
    pub async fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let _starting = self.shared.start_lock.lock().await;
        let Some(process) = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let drain = self.shared.config.shutdown_drain;
        let grace = self.shared.config.shutdown_grace;
        let mut exited = process.exited.clone();
        if process.alive() {
            let mut drained = exited.clone();
            let graceful = async {
                self.send_no_kill(&process, methods::SHUTDOWN, &json!({}))
                    .await;
                let _ = drained.wait_for(|e| *e).await;
            };
            if tokio::time::timeout(drain, graceful).await.is_err() {
                debug!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), "worker did not exit after shutdown; sending SIGTERM");
                process.signal_group(nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(grace, exited.wait_for(|e| *e))
                    .await
                    .is_err()
                {
                    warn!(target: "paperclip_env::plugin", plugin = %self.plugin_key(), "worker ignored shutdown and SIGTERM; sending SIGKILL");
                }
            }
        }
        process.kill("shutdown");
        let _ = tokio::time::timeout(grace, exited.wait_for(|e| *e)).await;
    }

    async fn send_no_kill(&self, process: &Arc<Process>, method: &str, params: &Value) {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        process.lock_pending().insert(id, tx);
        if process
            .write_line(&protocol::request_line(id, method, params, None))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        process.lock_pending().remove(&id);
    }
}

/// What the background tasks hold: no strong reference, so dropping the last
/// [`PluginWorker`] still kills the process.
struct WeakWorker {
    shared: std::sync::Weak<Shared>,
    plugin: String,
    strict_stdout: bool,
    max_line: usize,
}

impl WeakWorker {
    fn scrub(&self, text: &str) -> String {
        match self.shared.upgrade() {
            Some(s) => s.scrubber.scrub(text),
            // No handle left: nothing is known to scrub with, so say nothing.
            None => "[worker output withheld: handle dropped]".to_owned(),
        }
    }

    /// Why `line` is not JSON-RPC, with an excerpt: scrubbed first (so no
    /// cut can leave part of a secret), then cut to [`NOISE_EXCERPT_BYTES`].
    fn describe_noise(&self, line: &str) -> String {
        let scrubbed = self.scrub(line.trim());
        let why = match protocol::parse_line(&scrubbed) {
            Err(e) if !e.0.starts_with("Invalid JSON") => e.0,
            _ => "Invalid JSON".to_owned(),
        };
        let mut end = scrubbed.len().min(NOISE_EXCERPT_BYTES);
        while !scrubbed.is_char_boundary(end) {
            end -= 1;
        }
        let more = if end < scrubbed.len() { "…" } else { "" };
        let mut why = why;
        if why.len() > NOISE_EXCERPT_BYTES {
            let mut cut = NOISE_EXCERPT_BYTES;
            while !why.is_char_boundary(cut) {
                cut -= 1;
            }
            why.truncate(cut);
        }
        format!("{why}: {}{more}", &scrubbed[..end])
    }

    /// Routes one `execute.log` chunk to the call it names (module docs).
    fn route_execute_log(&self, process: &Process, params: &Value, invocation_id: Option<&str>) {
        let drop_chunk = |reason: &str| {
            debug!(target: "paperclip_env::plugin", plugin = %self.plugin, reason, "dropping execute.log notification");
        };
        let stream = match params.get("stream").and_then(Value::as_str) {
            Some("stdout") => OutputStream::Stdout,
            Some("stderr") => OutputStream::Stderr,
            _ => return drop_chunk("invalid-stream"),
        };
        let Some(chunk) = params.get("chunk").and_then(Value::as_str) else {
            return drop_chunk("invalid-chunk");
        };
        let chars = chunk.chars().count();
        if chars == 0 || chars > MAX_EXECUTE_LOG_CHUNK_CHARS {
            return drop_chunk("invalid-chunk");
        }
        let Some(invocation_id) = invocation_id else {
            return drop_chunk("missing-invocation");
        };
        let output = {
            let mut routes = process.lock_routes();
            let mut companies = routes.values().map(|r| r.company_id.as_deref());
            let cross_company = companies
                .next()
                .is_some_and(|first| companies.any(|c| c != first));
            if cross_company {
                routes
                    .values_mut()
                    .for_each(|r| r.cross_company_blocked = true);
            }
            let Some(route) = routes
                .values_mut()
                .find(|r| r.invocation_id == invocation_id)
            else {
                return drop_chunk("no-active-route");
            };
            if route.cross_company_blocked {
                return drop_chunk("cross-company-scope");
            }
            if route.delivered_chars + chars > MAX_EXECUTE_LOG_TOTAL_CHARS {
                return drop_chunk("execute-output-cap");
            }
            route.delivered_chars += chars;
            {
                let mut streamed = route.streamed.lock().unwrap_or_else(|p| p.into_inner());
                match stream {
                    OutputStream::Stdout => streamed.stdout.extend_from_slice(chunk.as_bytes()),
                    OutputStream::Stderr => streamed.stderr.extend_from_slice(chunk.as_bytes()),
                }
            }
            route.output.clone()
        };
        // Outside the lock: the sink is the caller's code. This task reads
        // stdout in order, so chunks reach it in order and before the answer.
        output.push(stream, chunk.as_bytes());
    }

    async fn stderr_task(self, stderr: tokio::process::ChildStderr, excerpt: Arc<Mutex<String>>) {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        while let Ok(LineRead::Line | LineRead::TooLong) =
            read_line_capped(&mut reader, &mut buf, self.max_line).await
        {
            let line = self.scrub(&String::from_utf8_lossy(&buf));
            warn!(target: "paperclip_env::plugin", plugin = %self.plugin, stream = "stderr", "[plugin stderr] {line}");
            let mut ex = excerpt.lock().unwrap_or_else(|p| p.into_inner());
            if !ex.is_empty() {
                ex.push('\n');
            }
            ex.push_str(&line);
            if ex.len() > MAX_STDERR_EXCERPT {
                let mut cut = ex.len() - MAX_STDERR_EXCERPT;
                while !ex.is_char_boundary(cut) {
                    cut += 1;
                }
                ex.drain(..cut);
            }
        }
    }

    async fn stdout_task(
        self,
        process: Arc<Process>,
        mut child: Child,
        stdout: tokio::process::ChildStdout,
        (excerpt, stderr_done): (Arc<Mutex<String>>, tokio::task::JoinHandle<()>),
        exit_tx: watch::Sender<bool>,
    ) {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        let mut broken: Option<String> = None;
        loop {
            match read_line_capped(&mut reader, &mut buf, self.max_line).await {
                Ok(LineRead::Eof) | Err(_) => break,
                Ok(LineRead::TooLong) => {
                    broken = Some(format!(
                        "the worker wrote a line longer than {} bytes",
                        self.max_line
                    ));
                    break;
                }
                Ok(LineRead::Line) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if line.trim().is_empty() {
                        continue;
                    }
                    match protocol::parse_line(&line) {
                        Ok(message) => self.handle(&process, message).await,
                        Err(_) if !self.strict_stdout => {
                            warn!(target: "paperclip_env::plugin", plugin = %self.plugin, "unparseable message from worker, skipped: {}", self.describe_noise(&line));
                        }
                        Err(_) => {
                            broken = Some(format!(
                                "the worker wrote a line that is not JSON-RPC 2.0 (strict stdout): {}",
                                self.describe_noise(&line)
                            ));
                            break;
                        }
                    }
                }
            }
        }
        if let Some(why) = &broken {
            error!(target: "paperclip_env::plugin", plugin = %self.plugin, "{why}; killing the worker");
            process.fail_all(CallError::Protocol(why.clone()));
            process.kill("protocol error");
        }
        // Still marked alive: nobody on the host side killed it, so it crashed
        // (or exited) on its own.
        let crashed = process.alive.swap(false, Ordering::SeqCst);
        // Stdout closed: the worker exited or is about to; give it a moment, then kill.
        let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                process.signal_group(nix::sys::signal::Signal::SIGKILL);
                child.wait().await.ok()
            }
        };
        // Reap anything the worker left in its group.
        process.signal_group(nix::sys::signal::Signal::SIGKILL);
        *process.stdin.lock().await = None;
        // The last stderr lines usually say why the worker died.
        let _ = tokio::time::timeout(Duration::from_millis(500), stderr_done).await;
        let mut message = describe_exit(status);
        let ex = excerpt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trim()
            .to_owned();
        if !ex.is_empty() {
            message = format!("{message}\n\nWorker stderr:\n{ex}");
        }
        if broken.is_none() {
            info!(target: "paperclip_env::plugin", plugin = %self.plugin, "{}", message.lines().next().unwrap_or_default());
        }
        process.fail_all(CallError::Unavailable(message.clone()));
        let _ = exit_tx.send(true);
        if crashed && let Some(shared) = self.shared.upgrade() {
            // Only the worker's current process: an old one exiting late is no crash.
            let current = shared
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &process));
            if current {
                PluginWorker::on_crash(&shared, &message);
            }
        }
    }

    async fn handle(&self, process: &Arc<Process>, message: Incoming) {
        match message {
            Incoming::Response { id, outcome } => {
                let Some(id) = id.as_u64() else {
                    warn!(target: "paperclip_env::plugin", plugin = %self.plugin, "worker response without a usable id: {}", self.scrub(&format!("{outcome:?}")));
                    return;
                };
                // No chunk after the answer: the caller reconciles from here on.
                process.lock_routes().remove(&id);
                let Some(tx) = process.lock_pending().remove(&id) else {
                    debug!(target: "paperclip_env::plugin", plugin = %self.plugin, id, "response for unknown or abandoned request id");
                    return;
                };
                let outcome = outcome.map_err(|mut e| {
                    e.message = self.scrub(&e.message);
                    e.data = e
                        .data
                        .and_then(|d| serde_json::from_str(&self.scrub(&d.to_string())).ok());
                    CallError::Rpc(e)
                });
                let _ = tx.send(outcome);
            }
            Incoming::Request {
                id, method, params, ..
            } => {
                // Answered from its own task: the reader must never wait on
                // stdin (a worker blocked on a full stdout pipe would
                // deadlock) nor on a secret resolver.
                let shared = self.shared.clone();
                let process = process.clone();
                tokio::spawn(async move {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let line = match shared.answer_host_call(&method, &params).await {
                        Ok(result) => protocol::result_line(&id, &result),
                        Err(e) => {
                            debug!(target: "paperclip_env::plugin", plugin = %shared.config.manifest.id, method = %method, code = e.code, "refused a worker call to the host: {}", e.message);
                            protocol::error_line(&id, &e)
                        }
                    };
                    let _ = process.write_line(&line).await;
                });
            }
            Incoming::Notification {
                method,
                params,
                invocation_id,
            } if method == methods::EXECUTE_LOG => {
                self.route_execute_log(process, &params, invocation_id.as_deref());
            }
            Incoming::Notification { method, params, .. } if method == methods::LOG => {
                log_plugin_message(&self.plugin, &params, |text| self.scrub(text));
            }
            Incoming::Notification { method, .. } => {
                debug!(target: "paperclip_env::plugin", plugin = %self.plugin, method = %method, "notification from worker");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn final_results_deliver_only_what_was_not_streamed() {
        use super::StreamedOutput;
        use crate::execute::{CommandExit, OutputCollector, OutputStream};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink_seen = seen.clone();
        let sink = std::sync::Arc::new(move |s: OutputStream, d: &[u8]| {
            if s == OutputStream::Stdout {
                sink_seen.lock().unwrap().extend_from_slice(d);
            }
        });
        let output = OutputCollector::new(crate::OutputCapture::Full, Some(sink));
        // Streamed a prefix: only the rest is pushed.
        output.stdout(b"one\n");
        let streamed = StreamedOutput {
            stdout: b"one\n".to_vec(),
            stderr: b"diverged".to_vec(),
        };
        streamed.deliver_final(&output, OutputStream::Stdout, b"one\ntwo\n");
        // Streamed something the final result does not continue: the final wins.
        output.stderr(b"diverged");
        streamed.deliver_final(&output, OutputStream::Stderr, b"authoritative");
        let result = output.finish(CommandExit::code(0));
        assert_eq!(result.stdout, "one\ntwo\n");
        assert_eq!(result.stderr, "authoritative");
        assert_eq!(seen.lock().unwrap().as_slice(), b"one\ntwo\n");
        // Nothing streamed: everything is pushed.
        let output = OutputCollector::buffered();
        StreamedOutput::default().deliver_final(&output, OutputStream::Stdout, b"all");
        assert_eq!(output.finish(CommandExit::code(0)).stdout, "all");
    }

    #[test]
    fn worker_error_messages_are_capped_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let capped = super::cap_message(long.clone());
        assert!(capped.len() < 4200, "{}", capped.len());
        assert!(capped.ends_with("more bytes cut)"));
        assert_eq!(super::cap_message("short".into()), "short");
        let e = super::rpc_error_to_error(
            super::protocol::RpcError::new(-32000, long),
            "acme",
            crate::Unsupported::Provider("acme".into()),
            crate::Operation::Execute,
        );
        assert!(e.to_string().len() < 4300);
    }
    #[test]
    fn scrubber_is_bounded_and_keeps_recent_secrets() {
        let scrubber = super::Scrubber::default();
        let first = SecretString::from("secret-first-0001");
        scrubber.add(&first);
        for i in 0..super::SCRUBBER_CAPACITY + 10 {
            scrubber.add(&SecretString::from(format!("rotated-secret-{i:06}")));
            if i % 100 == 0 {
                // Re-registering keeps `first` among the most recent.
                scrubber.add(&first);
            }
        }
        assert_eq!(scrubber.len(), super::SCRUBBER_CAPACITY);
        let last = format!("rotated-secret-{:06}", super::SCRUBBER_CAPACITY + 9);
        let shown = scrubber.scrub(&format!(
            "a secret-first-0001 b {last} c rotated-secret-000000"
        ));
        assert_eq!(shown, "a [REDACTED] b [REDACTED] c rotated-secret-000000");
    }

    use super::*;

    #[test]
    fn maps_plugin_error_codes() {
        let by = || Unsupported::Provider("p".into());
        let e = rpc_error_to_error(
            RpcError::new(
                codes::METHOD_NOT_IMPLEMENTED,
                "environmentExecute is not implemented by this plugin",
            ),
            "p",
            by(),
            Operation::Execute,
        );
        assert!(matches!(
            e,
            Error::NotSupported {
                operation: Operation::Execute,
                ..
            }
        ));
        let e = rpc_error_to_error(
            RpcError::new(
                codes::TIMEOUT,
                "Worker→host call \"config.get\" timed out after 30000ms",
            ),
            "p",
            by(),
            Operation::Acquire,
        );
        assert!(
            matches!(e, Error::Timeout { ref operation, after } if operation == "environmentAcquireLease" && after == Duration::from_secs(30))
        );
        let e = rpc_error_to_error(
            RpcError::new(codes::WORKER_UNAVAILABLE, "gone"),
            "p",
            by(),
            Operation::Release,
        );
        assert!(e.is_retryable());
        let e = rpc_error_to_error(
            RpcError::new(codes::CAPABILITY_DENIED, "no"),
            "p",
            by(),
            Operation::Acquire,
        );
        assert!(matches!(e, Error::PermissionDenied { .. }));
        let e = rpc_error_to_error(
            RpcError::new(codes::WORKER_ERROR, "boom"),
            "p",
            by(),
            Operation::Acquire,
        );
        assert!(
            matches!(e, Error::Provider { retryable: false, ref message, .. } if message == "boom")
        );
        let mut hinted = RpcError::new(codes::WORKER_ERROR, "lease x not found");
        hinted.data = Some(json!({"paperclipEnv": {"kind": "not_found"}}));
        assert!(rpc_error_to_error(hinted, "p", by(), Operation::Resume).is_not_found());
    }

    #[test]
    fn scrubber_replaces_every_registered_secret() {
        let s = Scrubber::default();
        s.add(&SecretString::from("hunter2"));
        s.add(&SecretString::from(""));
        assert_eq!(
            s.scrub("pw=hunter2 again hunter2"),
            "pw=[REDACTED] again [REDACTED]"
        );
    }
}
