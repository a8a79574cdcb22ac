//! Modal sandboxes (spec 25) over Modal's gRPC API: the control plane
//! (`modal.client.ModalClient`: apps, registry images, sandboxes) and the
//! per-task command router (`modal.task_command_router.TaskCommandRouter`:
//! exec with streamed stdio, falling back to the legacy `ContainerExec`
//! calls when a task has no router). Protobuf types come from
//! `paperclip-env-modal-proto`.
//!
//! Deviations from the upstream plugin, all deliberate: stdin is streamed
//! with `TaskExecStdinWrite` (not staged through a file); a command killed by
//! a signal reports the signal name (not `128 + n`); a sandbox found but
//! already finished counts as expired; `reuseLease` sandboxes always get an
//! idle timeout (the config's, else [`ModalProviderBuilder::reuse_idle_timeout`]);
//! the effective exec timeout is the request's, else `execTimeoutMs`, else the
//! host's `timeoutMs`, else 300 s; and a cancelled acquire terminates its
//! half-made sandbox.
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_providers::modal::ModalProvider;
//! // Tokens come from each environment's config (`tokenId` / `tokenSecret`);
//! // `MODAL_SERVER_URL` overrides the endpoint (e.g. an emulator).
//! let modal = ModalProvider::from_env()?;
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(modal)).build();
//! # Ok(()) }
//! ```

mod client;
mod config;
mod exec;
mod script;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::workspace::shell_quote;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Diagnostic, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, OutputCollector, ProviderLease,
    ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, Severity, WorkspaceSpec,
};
use paperclip_env_modal_proto::api::generic_result::GenericStatus;
use paperclip_env_modal_proto::api::network_access::NetworkAccessType;
use paperclip_env_modal_proto::api::*;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

pub use client::RetryPolicy;
pub use config::{
    MODAL_DEFAULT_EXEC_TIMEOUT_MS, MODAL_DEFAULT_SANDBOX_TIMEOUT_MS, MODAL_DEFAULT_WORKDIR,
    MODAL_MAX_SANDBOX_TIMEOUT_MS, ModalConfig, ModalConfigSchema,
};

use client::ControlPlane;
use exec::{Ended, Executor};

/// The provider key.
pub const PROVIDER: &str = "modal";
/// Modal's public control-plane endpoint.
pub const MODAL_DEFAULT_SERVER_URL: &str = "https://api.modal.com:443";
/// The image builder version sent with `ImageGetOrCreate` when neither the
/// builder, `MODAL_IMAGE_BUILDER_VERSION` nor the environment's settings
/// name one (libmodal JS before 0.8 hard-coded it).
const FALLBACK_IMAGE_BUILDER_VERSION: &str = "2024.10";

/// Whether `id` has the shape of a V1 sandbox id, `sb-` and 22 base62
/// characters; any other id is a V2 sandbox's, reached through the `…V2`
/// RPCs (npm `modal` 0.11 decides the same way).
pub fn is_v1_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-")
        .is_some_and(|rest| rest.len() == 22 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Hosts whose router URLs are dialled without TLS (spec 25 §4.7).
fn is_local_host(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "172.21.0.1")
}

/// A lazily connecting HTTP/2 channel with libmodal's options; TLS (system
/// roots plus the bundled Mozilla roots, aws-lc-rs) for `https:` URLs,
/// plaintext h2c for `http:`.
pub(crate) fn channel(url: &str, connect_timeout: Duration) -> Result<Channel> {
    let invalid = |m: String| Error::invalid_field("serverUrl", m);
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| invalid(format!("invalid Modal server URL {url}: {e}")))?
        .connect_timeout(connect_timeout.min(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(64 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_enabled_roots())
            .map_err(|e| invalid(format!("TLS setup for {url} failed: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Builds a [`ModalProvider`].
///
/// ```
/// use std::time::Duration;
/// use paperclip_env_providers::modal::{ModalProvider, RetryPolicy};
/// let provider = ModalProvider::builder()
///     .server_url("http://127.0.0.1:50051")
///     .call_timeout(Duration::from_secs(30))
///     .retry_policy(RetryPolicy { max_retries: 2, ..RetryPolicy::default() })
///     .build()?;
/// assert_eq!(provider.server_url(), "http://127.0.0.1:50051");
/// # Ok::<(), paperclip_env_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ModalProviderBuilder {
    server_url: Option<String>,
    call_timeout: Duration,
    retry: RetryPolicy,
    probe_timeout: Duration,
    acquire_timeout: Duration,
    task_id_poll: Duration,
    task_id_max_polls: u32,
    reuse_idle_timeout: Duration,
    max_throttle_wait: Duration,
    image_builder_version: Option<String>,
}

impl Default for ModalProviderBuilder {
    fn default() -> Self {
        ModalProviderBuilder {
            server_url: None,
            call_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            probe_timeout: Duration::from_secs(120),
            acquire_timeout: Duration::from_secs(600),
            task_id_poll: Duration::from_millis(500),
            task_id_max_polls: 600,
            reuse_idle_timeout: Duration::from_secs(600),
            max_throttle_wait: Duration::from_secs(300),
            image_builder_version: None,
        }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl ModalProviderBuilder {
    /// Fills the server URL from `MODAL_SERVER_URL` when unset. Tokens are
    /// never read from the environment: each config carries its own.
    pub fn with_env(mut self) -> Self {
        self.server_url = self.server_url.or_else(|| env_var("MODAL_SERVER_URL"));
        self.image_builder_version = self
            .image_builder_version
            .or_else(|| env_var("MODAL_IMAGE_BUILDER_VERSION"));
        self
    }

    /// Longest one call waits in total while Modal throttles it (an
    /// `RPCRetryPolicy` in the error's status details; default 5 min). Past
    /// it the call fails with [`Error::RateLimited`] carrying the server's wait.
    pub fn max_throttle_wait(mut self, wait: Duration) -> Self {
        self.max_throttle_wait = wait;
        self
    }

    /// The image builder version to build with, instead of the one the
    /// environment's settings name (`EnvironmentGetOrCreate`);
    /// `with_env` reads `MODAL_IMAGE_BUILDER_VERSION`.
    pub fn image_builder_version(mut self, version: impl Into<String>) -> Self {
        self.image_builder_version = Some(version.into());
        self
    }

    /// The control-plane URL (default `https://api.modal.com:443`; `http://` = plaintext h2c).
    pub fn server_url(mut self, url: impl Into<String>) -> Self {
        self.server_url = Some(url.into());
        self
    }

    /// Deadline of each unary call (default 60 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Retries of idempotent unary calls (default 3, 100 ms × 2 up to 1 s).
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Deadline of a whole probe, cold start included (default 120 s).
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// Deadline of a whole acquire: image build, create and workspace (default 600 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Interval between `SandboxGetTaskId` polls while a sandbox starts (default 500 ms, at most 600 polls).
    pub fn task_id_poll(mut self, interval: Duration) -> Self {
        self.task_id_poll = interval;
        self
    }

    /// Idle timeout given to `reuseLease` sandboxes whose config sets none
    /// (default 10 min), so a detached sandbox never runs unattended for its
    /// whole lifetime.
    pub fn reuse_idle_timeout(mut self, timeout: Duration) -> Self {
        self.reuse_idle_timeout = timeout;
        self
    }

    /// Builds the provider (no connection is made until the first call).
    pub fn build(self) -> Result<ModalProvider> {
        let server_url = self
            .server_url
            .clone()
            .unwrap_or_else(|| MODAL_DEFAULT_SERVER_URL.to_owned());
        if !(server_url.starts_with("https://") || server_url.starts_with("http://")) {
            return Err(Error::invalid_field(
                "serverUrl",
                format!("Modal server URL must be http(s), got: {server_url}"),
            ));
        }
        Ok(ModalProvider {
            inner: Arc::new(Inner {
                local: is_local_host(&server_url),
                server_url,
                options: self,
                channel: OnceLock::new(),
                sessions: Mutex::new(HashMap::new()),
                images: Mutex::new(HashMap::new()),
                builder_versions: Mutex::new(HashMap::new()),
                routers: Mutex::new(HashMap::new()),
            }),
        })
    }
}

struct Inner {
    server_url: String,
    local: bool,
    options: ModalProviderBuilder,
    channel: OnceLock<Channel>,
    sessions: Mutex<HashMap<[u8; 32], Arc<ControlPlane>>>,
    images: Mutex<HashMap<(String, String), String>>,
    builder_versions: Mutex<HashMap<String, String>>,
    routers: Mutex<HashMap<String, Arc<Executor>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Modal provider. Cheap to clone; one channel and one auth session per
/// token pair are shared by every call.
#[derive(Clone)]
pub struct ModalProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ModalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModalProvider")
            .field("server_url", &self.inner.server_url)
            .finish_non_exhaustive()
    }
}

struct Settings {
    config: ModalConfig,
    cp: Arc<ControlPlane>,
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("SIG{signal}"),
    };
    name.to_owned()
}

/// `SandboxTerminate` (`SandboxTerminateV2` for a V2 id; idempotent,
/// retried); an unknown sandbox is already gone.
async fn terminate_sandbox(cp: &ControlPlane, id: &str) -> Result<()> {
    let request = SandboxTerminateRequest {
        sandbox_id: id.to_owned(),
    };
    let answer = if is_v1_sandbox_id(id) {
        cp.call("SandboxTerminate", request, true, |mut c, r| async move {
            c.sandbox_terminate(r).await
        })
        .await
    } else {
        cp.call("SandboxTerminateV2", request, true, |mut c, r| async move {
            c.sandbox_terminate_v2(r).await
        })
        .await
    };
    match answer {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Terminates a half-made sandbox if the acquire or probe future is dropped
/// (a caller deadline, a cancelled run) before it was handed over.
struct TerminateOnDrop {
    cp: Arc<ControlPlane>,
    id: Option<String>,
}

impl TerminateOnDrop {
    fn disarm(mut self) -> String {
        self.id.take().unwrap_or_default()
    }
}

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let cp = self.cp.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match terminate_sandbox(&cp, &id).await {
                        Ok(()) => debug!(provider = PROVIDER, sandbox = %id, "terminated a sandbox whose acquire was cancelled"),
                        Err(error) => warn!(provider = PROVIDER, sandbox = %id, %error,
                            "terminating a sandbox whose acquire was cancelled failed; it runs until its timeout"),
                    }
                });
            }
            Err(_) => warn!(provider = PROVIDER, sandbox = %id,
                "acquire cancelled outside a runtime; the sandbox runs until its timeout"),
        }
    }
}

/// The name of a final status (`GenericStatus` 8–10 are evictions and OOM kills).
fn status_name(status: GenericStatus) -> &'static str {
    match status {
        GenericStatus::Unspecified => "unspecified",
        GenericStatus::Success => "success",
        GenericStatus::Failure => "failure",
        GenericStatus::Terminated => "terminated",
        GenericStatus::Timeout => "timeout",
        GenericStatus::InitFailure => "init failure",
        GenericStatus::InternalFailure => "internal failure",
        GenericStatus::IdleTimeout => "idle timeout",
        GenericStatus::MemoryManagerEviction => "evicted by the memory manager",
        GenericStatus::MemoryThrashingEviction => "evicted for memory thrashing",
        GenericStatus::KernelOomKill => "killed by the kernel OOM killer",
    }
}

/// A create whose answer is awaited; dropped before the answer was taken,
/// it makes sure an answer that already arrived is terminated (one arriving
/// later finds the channel closed and is terminated by the create task).
struct PendingCreate {
    rx: Option<tokio::sync::oneshot::Receiver<Result<String>>>,
    cp: Arc<ControlPlane>,
}

impl PendingCreate {
    async fn wait(&mut self) -> Result<String> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(Error::provider(
                PROVIDER,
                "sandbox create answer already taken",
            ));
        };
        let answer = rx.await;
        self.rx = None;
        answer.unwrap_or_else(|_| {
            Err(Error::provider(
                PROVIDER,
                "the sandbox create task ended without an answer",
            ))
        })
    }
}

impl Drop for PendingCreate {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        if let Ok(Ok(id)) = rx.try_recv() {
            drop(TerminateOnDrop {
                cp: self.cp.clone(),
                id: Some(id),
            });
        }
    }
}

/// Error text of a non-successful image build (spec 25 §4.2).
fn image_build_error(image_id: &str, result: &GenericResult) -> Option<Error> {
    let status = GenericStatus::try_from(result.status).unwrap_or(GenericStatus::Unspecified);
    let message = match status {
        GenericStatus::Success => return None,
        GenericStatus::Failure | GenericStatus::MemoryManagerEviction => format!(
            "Image build for {image_id} failed with the exception:\n{}",
            result.exception
        ),
        GenericStatus::MemoryThrashingEviction | GenericStatus::KernelOomKill => format!(
            "Image build for {image_id} ran out of memory ({}). Please try again with more memory.{}",
            status_name(status),
            if result.exception.is_empty() {
                String::new()
            } else {
                format!("\n{}", result.exception)
            }
        ),
        GenericStatus::Terminated => format!(
            "Image build for {image_id} terminated due to external shut-down. Please try again."
        ),
        GenericStatus::Timeout => format!(
            "Image build for {image_id} timed out. Please try again with a larger timeout parameter."
        ),
        _ => format!(
            "Image build for {image_id} failed with unknown status: {}",
            result.status
        ),
    };
    Some(Error::provider(PROVIDER, message))
}

impl ModalProvider {
    /// A builder.
    pub fn builder() -> ModalProviderBuilder {
        ModalProviderBuilder::default()
    }

    /// A provider for `MODAL_SERVER_URL` (else Modal's public endpoint).
    pub fn from_env() -> Result<Self> {
        Self::builder().with_env().build()
    }

    /// The control-plane URL in use.
    pub fn server_url(&self) -> &str {
        &self.inner.server_url
    }

    fn settings(&self, ctx: &CallContext) -> Result<Settings> {
        let config = ModalConfig::from_provider_config(&ctx.config);
        let (token_id, token_secret) = config.credentials()?;
        let mut digest = Sha256::new();
        digest.update(token_id.expose_secret().as_bytes());
        digest.update([0u8]);
        digest.update(token_secret.expose_secret().as_bytes());
        let key: [u8; 32] = digest.finalize().into();
        let channel = match self.inner.channel.get() {
            Some(c) => c.clone(),
            None => {
                let c = channel(&self.inner.server_url, self.inner.options.call_timeout)?;
                self.inner.channel.get_or_init(|| c).clone()
            }
        };
        let cp = lock(&self.inner.sessions)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(ControlPlane::new(
                    channel,
                    token_id,
                    token_secret,
                    self.inner.options.call_timeout,
                    self.inner.options.retry,
                    self.inner.options.max_throttle_wait,
                    self.inner.local,
                ))
            })
            .clone();
        Ok(Settings { config, cp })
    }

    async fn app_id(&self, s: &Settings) -> Result<String> {
        let request = AppGetOrCreateRequest {
            app_name: s.config.app_name.clone(),
            environment_name: s.config.environment.clone().unwrap_or_default(),
            object_creation_type: ObjectCreationType::CreateIfMissing as i32,
        };
        let response =
            s.cp.call("AppGetOrCreate", request, true, |mut c, r| async move {
                c.app_get_or_create(r).await
            })
            .await?;
        Ok(response.app_id)
    }

    /// `images.fromRegistry(tag)` + build: `ImageGetOrCreate`, then the build
    /// stream until a result (reopened from the last entry id).
    async fn image_id(&self, s: &Settings, app_id: &str) -> Result<String> {
        let key = (app_id.to_owned(), s.config.image.clone());
        if let Some(id) = lock(&self.inner.images).get(&key) {
            return Ok(id.clone());
        }
        let request = ImageGetOrCreateRequest {
            app_id: app_id.to_owned(),
            image: Some(Image {
                dockerfile_commands: vec![format!("FROM {}", s.config.image)],
                ..Default::default()
            }),
            builder_version: self.builder_version(s).await,
            ..Default::default()
        };
        let response =
            s.cp.call("ImageGetOrCreate", request, true, |mut c, r| async move {
                c.image_get_or_create(r).await
            })
            .await?;
        let image_id = response.image_id;
        let mut result = response.result.filter(|r| r.status != 0);
        let mut last_entry_id = String::new();
        while result.is_none() {
            info!(provider = PROVIDER, image = %s.config.image, image_id, "waiting for the Modal image build");
            let (mut client, request) =
                s.cp.streaming_request(ImageJoinStreamingRequest {
                    image_id: image_id.clone(),
                    timeout: 55.0,
                    last_entry_id: last_entry_id.clone(),
                    include_logs_for_finished: true,
                })
                .await?;
            let scrub = |st: &tonic::Status| {
                client::map_status("ImageJoinStreaming", st, |m| s.cp.scrub(m))
            };
            let mut stream = client
                .image_join_streaming(request)
                .await
                .map_err(|st| scrub(&st))?
                .into_inner();
            while let Some(message) = stream.message().await.map_err(|st| scrub(&st))? {
                if !message.entry_id.is_empty() {
                    last_entry_id = message.entry_id.clone();
                    debug!(provider = PROVIDER, image_id, entry = %message.entry_id, "image build progress");
                }
                if let Some(r) = message.result.filter(|r| r.status != 0) {
                    result = Some(r);
                    break;
                }
            }
        }
        if let Some(error) = result
            .as_ref()
            .and_then(|r| image_build_error(&image_id, r))
        {
            return Err(error);
        }
        lock(&self.inner.images).insert(key, image_id.clone());
        Ok(image_id)
    }

    /// The image builder version: the builder's, else the environment's
    /// setting (`EnvironmentGetOrCreate`, cached per environment, as the JS
    /// SDK ≥ 0.8 reads it), else the old fixed default.
    async fn builder_version(&self, s: &Settings) -> String {
        if let Some(v) = &self.inner.options.image_builder_version {
            return v.clone();
        }
        let environment = s.config.environment.clone().unwrap_or_default();
        if let Some(v) = lock(&self.inner.builder_versions).get(&environment) {
            return v.clone();
        }
        let request = EnvironmentGetOrCreateRequest {
            deployment_name: environment.clone(),
            object_creation_type: ObjectCreationType::Unspecified as i32,
        };
        match s
            .cp
            .call(
                "EnvironmentGetOrCreate",
                request,
                true,
                |mut c, r| async move { c.environment_get_or_create(r).await },
            )
            .await
        {
            Ok(response) => {
                let version = response
                    .metadata
                    .and_then(|m| m.settings)
                    .map(|settings| settings.image_builder_version)
                    .filter(|v| !v.trim().is_empty());
                match version {
                    Some(v) => {
                        lock(&self.inner.builder_versions).insert(environment, v.clone());
                        v
                    }
                    None => FALLBACK_IMAGE_BUILDER_VERSION.to_owned(),
                }
            }
            Err(error) => {
                warn!(provider = PROVIDER, %error, "reading the environment's image builder version failed; using {FALLBACK_IMAGE_BUILDER_VERSION}");
                FALLBACK_IMAGE_BUILDER_VERSION.to_owned()
            }
        }
    }

    fn idle_timeout_secs(&self, config: &ModalConfig) -> Option<u32> {
        match config.idle_timeout_ms {
            Some(ms) => Some((ms / 1000).max(1) as u32),
            None if config.reuse_lease => {
                let cap = (config.sandbox_timeout_ms / 1000).max(1) as u64;
                Some(
                    self.inner
                        .options
                        .reuse_idle_timeout
                        .as_secs()
                        .clamp(1, cap) as u32,
                )
            }
            None => None,
        }
    }

    async fn create_sandbox(&self, s: &Settings, app_id: &str, image_id: &str) -> Result<String> {
        let c = &s.config;
        let network_access = if c.block_network {
            NetworkAccess {
                network_access_type: NetworkAccessType::Blocked as i32,
                allowed_cidrs: Vec::new(),
            }
        } else if let Some(cidrs) = &c.cidr_allowlist {
            NetworkAccess {
                network_access_type: NetworkAccessType::Allowlist as i32,
                allowed_cidrs: cidrs.clone(),
            }
        } else {
            NetworkAccess {
                network_access_type: NetworkAccessType::Open as i32,
                allowed_cidrs: Vec::new(),
            }
        };
        let request = SandboxCreateRequest {
            app_id: app_id.to_owned(),
            definition: Some(Sandbox {
                image_id: image_id.to_owned(),
                resources: Some(Resources::default()),
                timeout_secs: (c.sandbox_timeout_ms / 1000).clamp(1, 86_400) as u32,
                idle_timeout_secs: self.idle_timeout_secs(c),
                workdir: Some(c.workdir.clone()),
                network_access: Some(network_access),
                ..Default::default()
            }),
            environment_name: String::new(),
            tags: Vec::new(),
        };
        // Retried with the same idempotency key (Modal answers a repeat with
        // the first sandbox), bounded by the acquire deadline instead of the
        // per-call one: an image pull can hold a create for minutes. The call
        // runs in a task of its own, so a create that outlives its caller
        // (a deadline, a cancelled run) is terminated when it answers.
        let cp = s.cp.clone();
        let options = client::CallOptions {
            idempotent: true,
            timeout: self.inner.options.acquire_timeout,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let answer = cp
                .call_with("SandboxCreate", request, options, |mut c, r| async move {
                    c.sandbox_create(r).await
                })
                .await
                .map(|r| r.sandbox_id);
            if let Err(Ok(id)) = tx.send(answer) {
                warn!(provider = PROVIDER, sandbox = %id, "a sandbox create outlived its acquire; terminating it");
                drop(TerminateOnDrop { cp, id: Some(id) });
            }
        });
        let mut pending = PendingCreate {
            rx: Some(rx),
            cp: s.cp.clone(),
        };
        pending.wait().await
    }

    async fn set_tags(&self, s: &Settings, ctx: &CallContext, id: &str, run_id: Option<&str>) {
        let mut tags = vec![
            ("paperclip-provider", "modal".to_owned()),
            ("paperclip-environment-id", ctx.environment_id.clone()),
            ("paperclip-reuse-lease", s.config.reuse_lease.to_string()),
        ];
        if let Some(company) = &ctx.company_id {
            tags.push(("paperclip-company-id", company.clone()));
        }
        if let Some(run) = run_id {
            tags.push(("paperclip-run-id", run.to_owned()));
        }
        let request = SandboxTagsSetRequest {
            environment_name: s.config.environment.clone().unwrap_or_default(),
            sandbox_id: id.to_owned(),
            tags: tags
                .into_iter()
                .map(|(k, v)| SandboxTag {
                    tag_name: k.to_owned(),
                    tag_value: v,
                })
                .collect(),
        };
        let answer = if is_v1_sandbox_id(id) {
            s.cp.call("SandboxTagsSet", request, true, |mut c, r| async move {
                c.sandbox_tags_set(r).await
            })
            .await
        } else {
            s.cp.call("SandboxTagsSetV2", request, true, |mut c, r| async move {
                c.sandbox_tags_set_v2(r).await
            })
            .await
        };
        if let Err(error) = answer {
            warn!(provider = PROVIDER, sandbox = id, %error, "Failed to set tags on Modal sandbox {id}");
        }
    }

    /// `sandboxes.fromId`: `SandboxWait {timeout: 0}`. `false` when the
    /// sandbox is unknown or already finished (spec 25 §4.5).
    async fn alive(&self, s: &Settings, id: &str) -> Result<bool> {
        let request = SandboxWaitRequest {
            sandbox_id: id.to_owned(),
            timeout: 0.0,
        };
        let answer = if is_v1_sandbox_id(id) {
            s.cp.call("SandboxWait", request, true, |mut c, r| async move {
                c.sandbox_wait(r).await
            })
            .await
        } else {
            s.cp.call("SandboxWaitV2", request, true, |mut c, r| async move {
                c.sandbox_wait_v2(r).await
            })
            .await
        };
        match answer {
            Ok(response) => Ok(response.result.is_none_or(|r| r.status == 0)),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn terminate(&self, s: &Settings, id: &str) -> Result<()> {
        self.detach(id);
        terminate_sandbox(&s.cp, id).await
    }

    /// Local only: forgets the router connection (spec 25 §4.11).
    fn detach(&self, id: &str) {
        lock(&self.inner.routers).remove(id);
    }

    async fn task_id(&self, s: &Settings, id: &str) -> Result<String> {
        for _ in 0..self.inner.options.task_id_max_polls.max(1) {
            let request = SandboxGetTaskIdRequest {
                sandbox_id: id.to_owned(),
                ..Default::default()
            };
            let response = if is_v1_sandbox_id(id) {
                s.cp.call("SandboxGetTaskId", request, true, |mut c, r| async move {
                    c.sandbox_get_task_id(r).await
                })
                .await?
            } else {
                s.cp.call("SandboxGetTaskIdV2", request, true, |mut c, r| async move {
                    c.sandbox_get_task_id_v2(r).await
                })
                .await?
            };
            if let Some(result) = response.task_result {
                let status =
                    GenericStatus::try_from(result.status).unwrap_or(GenericStatus::Unspecified);
                return Err(Error::not_found(
                    if matches!(
                        status,
                        GenericStatus::MemoryManagerEviction
                            | GenericStatus::MemoryThrashingEviction
                            | GenericStatus::KernelOomKill
                    ) {
                        format!(
                            "Sandbox {id} has already completed: {}",
                            status_name(status)
                        )
                    } else if result.exception.is_empty() {
                        format!("Sandbox {id} has already completed")
                    } else {
                        format!(
                            "Sandbox {id} has already completed with result: exception:\"{}\"",
                            s.cp.scrub(&result.exception)
                        )
                    },
                ));
            }
            if let Some(task_id) = response.task_id.filter(|t| !t.is_empty()) {
                return Ok(task_id);
            }
            tokio::time::sleep(self.inner.options.task_id_poll).await;
        }
        Err(Error::Timeout {
            operation: format!("waiting for task ID for Sandbox {id}"),
            after: self.inner.options.task_id_poll * self.inner.options.task_id_max_polls,
        })
    }

    async fn router(&self, s: &Settings, id: &str) -> Result<Arc<Executor>> {
        if let Some(router) = lock(&self.inner.routers).get(id) {
            return Ok(router.clone());
        }
        let task_id = self.task_id(s, id).await?;
        let target = exec::Target {
            task_id,
            sandbox_id: id.to_owned(),
            v2: !is_v1_sandbox_id(id),
        };
        let router = Arc::new(Executor::open(&s.cp, target).await?);
        lock(&self.inner.routers).insert(id.to_owned(), router.clone());
        Ok(router)
    }

    /// Runs a helper script and returns `(ended, stdout, stderr)`.
    async fn run_script(
        &self,
        s: &Settings,
        id: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<(Ended, String, String)> {
        let router = self.router(s, id).await?;
        let output = OutputCollector::buffered();
        let argv = vec!["sh".to_owned(), "-lc".to_owned(), script.to_owned()];
        let ended = router.exec(&s.cp, argv, None, timeout, &output).await?;
        let result = output.finish(CommandExit::default());
        Ok((ended, result.stdout, result.stderr))
    }

    async fn mkdir(&self, s: &Settings, id: &str, dir: &str) -> Result<()> {
        let script = format!("mkdir -p {}", shell_quote(dir));
        let (ended, _, stderr) = self.run_script(s, id, &script, s.cp.call_timeout).await?;
        match ended {
            Ended::Code(0) => Ok(()),
            Ended::Code(n) => Err(Error::provider(
                PROVIDER,
                format!(
                    "Failed to create remote workspace directory '{dir}': mkdir exited with code {n}{}",
                    if stderr.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", stderr.trim())
                    }
                ),
            )),
            Ended::Signal(n) => Err(Error::provider(
                PROVIDER,
                format!(
                    "Failed to create remote workspace directory '{dir}': mkdir killed by {}",
                    signal_name(n)
                ),
            )),
            Ended::TimedOut => Err(Error::Timeout {
                operation: format!("creating remote workspace directory '{dir}'"),
                after: s.cp.call_timeout,
            }),
        }
    }

    /// App → image → create → tags → task id → workdir. On any failure after
    /// create the sandbox is terminated; a failed termination is logged with the id.
    async fn create_prepared(
        &self,
        s: &Settings,
        ctx: &CallContext,
        run_id: Option<&str>,
    ) -> Result<TerminateOnDrop> {
        let app_id = self.app_id(s).await?;
        let image_id = self.image_id(s, &app_id).await?;
        let id = self.create_sandbox(s, &app_id, &image_id).await?;
        let guard = TerminateOnDrop {
            cp: s.cp.clone(),
            id: Some(id.clone()),
        };
        self.set_tags(s, ctx, &id, run_id).await;
        if let Err(error) = self.mkdir(s, &id, &s.config.workdir).await {
            guard.disarm();
            if let Err(cleanup) = self.terminate(s, &id).await {
                warn!(provider = PROVIDER, sandbox = %id, error = %cleanup,
                    "terminating the sandbox after a failed acquire failed; it runs until its timeout");
                return Err(Error::provider(
                    PROVIDER,
                    format!("{error} (cleanup of sandbox {id} also failed: {cleanup})"),
                ));
            }
            return Err(error);
        }
        Ok(guard)
    }

    fn lease_metadata(
        &self,
        s: &Settings,
        id: &str,
        remote_cwd: &str,
        resumed: bool,
        run_id: Option<&str>,
    ) -> JsonObject {
        let c = &s.config;
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(PROVIDER));
        md.insert("shellCommand".into(), json!("sh"));
        md.insert("sandboxId".into(), json!(id));
        md.insert("appName".into(), json!(c.app_name));
        md.insert("image".into(), json!(c.image));
        md.insert("sandboxTimeoutMs".into(), json!(c.sandbox_timeout_ms));
        md.insert(
            "idleTimeoutMs".into(),
            json!(self.idle_timeout_secs(c).map(|s| u64::from(s) * 1000)),
        );
        md.insert("reuseLease".into(), json!(c.reuse_lease));
        md.insert("remoteCwd".into(), json!(remote_cwd));
        md.insert("resumedLease".into(), json!(resumed));
        if let Some(run) = run_id {
            md.insert("paperclipRunId".into(), json!(run));
        }
        md
    }

    fn expired() -> ProviderLease {
        let mut md = JsonObject::new();
        md.insert("expired".into(), json!(true));
        ProviderLease {
            provider_lease_id: None,
            metadata: Some(md),
            expires_at: None,
        }
    }

    async fn probe_inner(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let s = self.settings(ctx)?;
        let guard = self.create_prepared(&s, ctx, None).await?;
        let id = guard.id.clone().unwrap_or_default();
        let outcome = self
            .run_script(&s, &id, "printf paperclip-probe", s.cp.call_timeout)
            .await;
        guard.disarm();
        if let Err(error) = self.terminate(&s, &id).await {
            warn!(provider = PROVIDER, sandbox = %id, %error, "terminating the probe sandbox failed");
        }
        let (ended, stdout, _) = outcome?;
        let c = &s.config;
        if ended == Ended::Code(0) && stdout.trim() == "paperclip-probe" {
            let mut md = JsonObject::new();
            md.insert("provider".into(), json!(PROVIDER));
            md.insert("sandboxId".into(), json!(id));
            md.insert("appName".into(), json!(c.app_name));
            md.insert("image".into(), json!(c.image));
            md.insert("workdir".into(), json!(c.workdir));
            md.insert("sandboxTimeoutMs".into(), json!(c.sandbox_timeout_ms));
            md.insert("idleTimeoutMs".into(), json!(c.idle_timeout_ms));
            md.insert("reuseLease".into(), json!(c.reuse_lease));
            md.insert("remoteCwd".into(), json!(c.workdir));
            return Ok(ProviderProbe {
                ok: true,
                summary: Some(format!("Connected to Modal sandbox in app {}.", c.app_name)),
                diagnostics: Vec::new(),
                metadata: Some(md),
            });
        }
        let code = match ended {
            Ended::Code(n) => n.to_string(),
            Ended::Signal(n) => signal_name(n),
            Ended::TimedOut => "timeout".to_owned(),
        };
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(PROVIDER));
        md.insert("sandboxId".into(), json!(id));
        md.insert("appName".into(), json!(c.app_name));
        md.insert("image".into(), json!(c.image));
        Ok(ProviderProbe {
            ok: false,
            summary: Some(format!(
                "Modal sandbox probe failed: exit {code}, stdout={}",
                Value::String(stdout)
            )),
            diagnostics: Vec::new(),
            metadata: Some(md),
        })
    }
}

#[async_trait]
impl SandboxProvider for ModalProvider {
    fn key(&self) -> &str {
        PROVIDER
    }

    /// Image builds and cold starts outlast the host's 30 s default: the
    /// host waits for the provider's own acquire bound plus a margin, so the
    /// provider's deadline fires first and terminates what it created.
    fn default_lease_deadline(&self) -> Option<Duration> {
        Some(self.inner.options.acquire_timeout + Duration::from_secs(30))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            execute: true,
            realize_workspace: true,
            resume: true,
            destroy: true,
            probe: true,
            reusable_leases: true,
            expires_at: false,
            lifetime_refresh: false,
            streaming: true,
            stdin: true,
            multi_command_exec: true,
            native_sync: false,
            signals: true,
            run_lookup: false,
        }
    }

    fn plugin_key(&self) -> String {
        "paperclip.modal-sandbox-provider".to_owned()
    }

    fn config_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(ModalConfigSchema))
            .unwrap_or_else(|_| json!({"type": "object"}))
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let issues = ModalConfig::validate(config);
        Ok(if issues.is_empty() {
            ConfigValidation::valid(ModalConfig::normalized(config))
        } else {
            ConfigValidation::invalid(issues)
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let deadline = self.inner.options.probe_timeout;
        let outcome = match tokio::time::timeout(deadline, self.probe_inner(ctx)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout {
                operation: "Modal probe".into(),
                after: deadline,
            }),
        };
        outcome.or_else(|error| {
            let c = ModalConfig::from_provider_config(&ctx.config);
            let message = ctx.config.scrub(&error.to_string());
            debug!(provider = PROVIDER, error = %message, "probe failed");
            let mut md = JsonObject::new();
            md.insert("provider".into(), json!(PROVIDER));
            md.insert("appName".into(), json!(c.app_name));
            md.insert("image".into(), json!(c.image));
            md.insert("reuseLease".into(), json!(c.reuse_lease));
            md.insert("error".into(), json!(message));
            Ok(ProviderProbe {
                ok: false,
                summary: Some("Modal sandbox probe failed.".into()),
                diagnostics: vec![Diagnostic {
                    severity: Severity::Error,
                    message,
                    code: None,
                    details: None,
                }],
                metadata: Some(md),
            })
        })
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let s = self.settings(ctx)?;
        let deadline = self.inner.options.acquire_timeout;
        let id = match tokio::time::timeout(
            deadline,
            self.create_prepared(&s, ctx, Some(&request.run_id)),
        )
        .await
        {
            Ok(result) => result?.disarm(),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "Modal acquire".into(),
                    after: deadline,
                });
            }
        };
        let metadata =
            self.lease_metadata(&s, &id, &s.config.workdir, false, Some(&request.run_id));
        Ok(ProviderLease::new(id, metadata))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let s = self.settings(ctx)?;
        let Some(id) = lease.id() else {
            return Ok(Self::expired());
        };
        if !self.alive(&s, id).await? {
            self.detach(id);
            return Ok(Self::expired());
        }
        if let Err(error) = self.mkdir(&s, id, &s.config.workdir).await {
            // Never terminate a reusable sandbox here: detach and report.
            self.detach(id);
            return Err(error);
        }
        Ok(ProviderLease::new(
            id,
            self.lease_metadata(
                &s,
                id,
                &s.config.workdir,
                true,
                lease.metadata_str("paperclipRunId"),
            ),
        ))
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let s = self.settings(ctx)?;
        if !self.alive(&s, id).await? {
            self.detach(id);
            return Ok(());
        }
        if s.config.reuse_lease {
            // Detach only; the sandbox's idle timeout and lifetime bound its cost.
            self.detach(id);
            return Ok(());
        }
        self.terminate(&s, id).await
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let s = self.settings(ctx)?;
        if !self.alive(&s, id).await? {
            self.detach(id);
            return Ok(());
        }
        self.terminate(&s, id).await
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let s = self.settings(ctx)?;
        let cwd = lease
            .preferred_cwd(workspace)
            .unwrap_or_else(|| s.config.workdir.clone());
        if let Some(id) = lease.id()
            && self.alive(&s, id).await?
        {
            self.mkdir(&s, id, &cwd).await?;
        }
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(PROVIDER));
        metadata.insert("remoteCwd".into(), json!(cwd));
        Ok(RealizeWorkspaceResult {
            cwd,
            metadata: Some(metadata),
        })
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let Some(id) = lease.id() else {
            output.stderr(b"No provider lease ID available for execution.");
            return Ok(CommandExit::code(1));
        };
        let s = self.settings(ctx)?;
        let cwd = request
            .cwd
            .clone()
            .unwrap_or_else(|| s.config.workdir.clone());
        // Validate the command before any remote call.
        let script = script::login_script(&request.command, &request.args, &cwd, &request.env)?;
        let timeout_ms = s.config.exec_timeout_for(request.timeout_ms);
        if !self.alive(&s, id).await? {
            self.detach(id);
            return Err(Error::not_found(
                "Modal sandbox lease is no longer available.",
            ));
        }
        let router = self.router(&s, id).await?;
        let argv = vec!["sh".to_owned(), "-lc".to_owned(), script];
        let stdin = request.stdin.as_ref().map(|s| s.as_bytes());
        let ended = router
            .exec(
                &s.cp,
                argv,
                stdin,
                Duration::from_millis(timeout_ms),
                output,
            )
            .await?;
        Ok(match ended {
            Ended::Code(code) => CommandExit::code(code),
            Ended::Signal(signal) => CommandExit {
                exit_code: None,
                signal: Some(signal_name(signal)),
                ..Default::default()
            },
            Ended::TimedOut => {
                output.stderr(format!("Modal exec timed out after {timeout_ms}ms\n").as_bytes());
                CommandExit {
                    exit_code: None,
                    timed_out: true,
                    ..Default::default()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_dial_without_tls() {
        assert!(is_local_host("http://127.0.0.1:5000"));
        assert!(is_local_host("https://localhost:443/x"));
        assert!(is_local_host("http://[::1]:80"));
        assert!(!is_local_host("https://api.modal.com:443"));
    }

    #[test]
    fn image_build_messages() {
        let failed = GenericResult {
            status: GenericStatus::Failure as i32,
            exception: "boom".into(),
            ..Default::default()
        };
        assert_eq!(
            image_build_error("im-1", &failed).map(|e| e.to_string()),
            Some("modal: Image build for im-1 failed with the exception:\nboom".to_owned())
        );
        let ok = GenericResult {
            status: GenericStatus::Success as i32,
            ..Default::default()
        };
        assert!(image_build_error("im-1", &ok).is_none());
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(64), "SIG64");
    }
}
