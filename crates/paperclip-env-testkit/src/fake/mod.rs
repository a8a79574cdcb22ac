//! The deterministic fake sandbox provider (`fake-plugin`, spec 10 §1).
//!
//! Commands run as real local processes in an isolated temp directory, with
//! only the explicit environment plus a default `PATH`. Ids and directory
//! names come from an injectable [`IdGenerator`]; faults can be queued per
//! operation; the provider counts what it holds so tests can prove nothing
//! leaked.

mod faults;
mod ids;
mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::secret::ProviderConfig;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, Operation, OutputCollector,
    ProviderLease, ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, WorkspaceSpec,
    time,
};
use serde_json::{Value, json};

pub use faults::Faults;
pub use ids::{IdGenerator, RandomIds, SequentialIds};
pub use process::{DEFAULT_PATH, KILL_GRACE, ProcessSpec, run_process};

/// The fake's provider key.
pub const FAKE_PROVIDER_KEY: &str = "fake-plugin";
/// Default image label.
pub const DEFAULT_IMAGE: &str = "fake:latest";
/// Default command timeout (ms).
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Prefix of sandbox directories.
pub const DIR_PREFIX: &str = "paperclip-fake-sandbox-";

/// The fake's parsed config (spec 10 §1.2); parsing never fails.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeConfig {
    /// Image label.
    pub image: String,
    /// Command timeout; zero or negative disables it.
    pub timeout_ms: f64,
    /// Keep leases for resume.
    pub reuse_lease: bool,
}

impl FakeConfig {
    /// Reads a config leniently, filling defaults.
    pub fn from_values(values: &JsonObject) -> Self {
        FakeConfig {
            image: values
                .get("image")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_IMAGE)
                .to_owned(),
            timeout_ms: values
                .get("timeoutMs")
                .and_then(Value::as_f64)
                .filter(|f| f.is_finite())
                .unwrap_or(DEFAULT_TIMEOUT_MS as f64),
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
        }
    }
}

#[derive(Debug, Clone)]
struct SandboxState {
    root_dir: PathBuf,
    remote_cwd: PathBuf,
    image: String,
    reuse_lease: bool,
}

/// Counters of what the fake did.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Sandboxes created.
    pub created: AtomicU64,
    /// Sandboxes removed.
    pub removed: AtomicU64,
    /// Commands started.
    pub executed: AtomicU64,
    /// Release calls received.
    pub releases: AtomicU64,
}

struct Inner {
    key: String,
    temp_root: PathBuf,
    ids: Arc<dyn IdGenerator>,
    strict_leases: bool,
    secret_fields: Vec<String>,
    echo_secrets: bool,
    leases: Mutex<HashMap<String, SandboxState>>,
    faults: Faults,
    stats: FakeStats,
    last_config: Mutex<Option<ProviderConfig>>,
}

/// The fake provider. Cheap to clone; clones share state.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus};
/// use paperclip_env_testkit::fake::FakeProvider;
/// let fake = FakeProvider::new();
/// let runtime = EnvironmentRuntime::builder().provider(Arc::new(fake.clone())).build();
/// let env = Environment::new("env-1", "Fake", "sandbox", serde_json::json!({"provider": "fake-plugin"}));
/// let lease = runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1")).await.unwrap().lease;
/// let result = runtime.execute(&env, &lease, &ExecuteRequest::new("echo").arg("hi")).await.unwrap();
/// assert_eq!(result.stdout, "hi\n");
/// runtime.release_run_leases("run-1", LeaseStatus::Released).await.into_result().unwrap();
/// assert_eq!(fake.live_leases(), 0);
/// # });
/// ```
#[derive(Clone)]
pub struct FakeProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("key", &self.inner.key)
            .field("temp_root", &self.inner.temp_root)
            .field("live_leases", &self.live_leases())
            .finish_non_exhaustive()
    }
}

/// Builds a [`FakeProvider`].
#[derive(Clone)]
pub struct FakeProviderBuilder {
    key: String,
    temp_root: Option<PathBuf>,
    ids: Arc<dyn IdGenerator>,
    strict_leases: bool,
    secret_fields: Vec<String>,
    echo_secrets: bool,
}

impl std::fmt::Debug for FakeProviderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProviderBuilder")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FakeProviderBuilder {
    /// Registers under another provider key (default `fake-plugin`).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Creates sandbox directories under `root` (default: the OS temp dir).
    pub fn temp_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.temp_root = Some(root.into());
        self
    }

    /// Uses `ids` for lease ids and directory suffixes.
    pub fn ids(mut self, ids: impl IdGenerator) -> Self {
        self.ids = Arc::new(ids);
        self
    }

    /// Execute and realize on an unknown lease fail with "not found" (real
    /// providers behave so; upstream's fake is lenient).
    pub fn strict_leases(mut self, strict: bool) -> Self {
        self.strict_leases = strict;
        self
    }

    /// Declares a secret config field (`format: "secret-ref"` in the schema).
    pub fn secret_field(mut self, path: impl Into<String>) -> Self {
        self.secret_fields.push(path.into());
        self
    }

    /// Misbehaves on purpose: echoes resolved secrets into lease metadata,
    /// so tests can prove the runtime scrubs them.
    pub fn echo_secrets_in_metadata(mut self, echo: bool) -> Self {
        self.echo_secrets = echo;
        self
    }

    /// Builds the provider.
    pub fn build(self) -> FakeProvider {
        FakeProvider {
            inner: Arc::new(Inner {
                key: self.key,
                temp_root: self.temp_root.unwrap_or_else(std::env::temp_dir),
                ids: self.ids,
                strict_leases: self.strict_leases,
                secret_fields: self.secret_fields,
                echo_secrets: self.echo_secrets,
                leases: Mutex::new(HashMap::new()),
                faults: Faults::default(),
                stats: FakeStats::default(),
                last_config: Mutex::new(None),
            }),
        }
    }
}

impl Default for FakeProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProvider {
    /// A fake with the defaults: key `fake-plugin`, OS temp dir, random ids.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> FakeProviderBuilder {
        FakeProviderBuilder {
            key: FAKE_PROVIDER_KEY.to_owned(),
            temp_root: None,
            ids: Arc::new(RandomIds),
            strict_leases: false,
            secret_fields: Vec::new(),
            echo_secrets: false,
        }
    }

    /// Queued faults.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Counters.
    pub fn stats(&self) -> &FakeStats {
        &self.inner.stats
    }

    /// Leases the fake currently holds (created and not removed).
    pub fn live_leases(&self) -> usize {
        self.inner.leases.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Ids of the leases the fake holds.
    pub fn lease_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .leases
            .lock()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The sandbox root directory of a lease.
    pub fn root_dir(&self, provider_lease_id: &str) -> Option<PathBuf> {
        self.inner
            .leases
            .lock()
            .ok()?
            .get(provider_lease_id)
            .map(|s| s.root_dir.clone())
    }

    /// The config the provider saw on its last call (secrets resolved).
    pub fn last_config(&self) -> Option<ProviderConfig> {
        self.inner.last_config.lock().ok()?.clone()
    }

    /// Simulates the provider losing a lease (its sandbox vanishes).
    pub fn lose_lease(&self, provider_lease_id: &str) -> bool {
        self.remove(provider_lease_id)
    }

    fn remember(&self, ctx: &CallContext) {
        if let Ok(mut last) = self.inner.last_config.lock() {
            *last = Some(ctx.config.clone());
        }
    }

    fn create_sandbox(&self, id: &str, config: &FakeConfig) -> Result<SandboxState> {
        std::fs::create_dir_all(&self.inner.temp_root)
            .map_err(|e| io_error(&self.inner.key, "create temp root", e))?;
        let mut last_error = None;
        for _ in 0..16 {
            let root = self
                .inner
                .temp_root
                .join(format!("{DIR_PREFIX}{}", self.inner.ids.dir_suffix()));
            match std::fs::create_dir(&root) {
                Ok(()) => {
                    let workspace = root.join("workspace");
                    std::fs::create_dir_all(&workspace)
                        .map_err(|e| io_error(&self.inner.key, "create workspace", e))?;
                    let state = SandboxState {
                        root_dir: root,
                        remote_cwd: workspace,
                        image: config.image.clone(),
                        reuse_lease: config.reuse_lease,
                    };
                    self.lock_leases().insert(id.to_owned(), state.clone());
                    self.inner.stats.created.fetch_add(1, Ordering::SeqCst);
                    return Ok(state);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => return Err(io_error(&self.inner.key, "create sandbox directory", e)),
            }
        }
        Err(io_error(
            &self.inner.key,
            "create sandbox directory",
            last_error.unwrap_or_else(|| std::io::Error::other("no free directory name")),
        ))
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, SandboxState>> {
        self.inner.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, id: &str) -> bool {
        let removed = self.lock_leases().remove(id);
        match removed {
            Some(state) => {
                let _ = std::fs::remove_dir_all(&state.root_dir);
                self.inner.stats.removed.fetch_add(1, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Removes the sandbox of a lease another fake instance created (e.g. in
    /// a process that died), found through its `fakeRootDir` metadata. Only a
    /// sandbox directory directly under this fake's `temp_root` is touched.
    fn remove_orphan(&self, lease: &LeaseHandle) -> bool {
        let Some(dir) = lease.metadata_str("fakeRootDir").map(PathBuf::from) else {
            return false;
        };
        let ours = dir.parent() == Some(self.inner.temp_root.as_path())
            && dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !ours || !dir.is_dir() {
            return false;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                self.inner.stats.removed.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }

    fn metadata(
        &self,
        id: &str,
        state: &SandboxState,
        resumed: bool,
        ctx: &CallContext,
    ) -> JsonObject {
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(self.inner.key));
        md.insert("image".into(), json!(state.image));
        md.insert("reuseLease".into(), json!(state.reuse_lease));
        md.insert(
            "remoteCwd".into(),
            json!(state.remote_cwd.display().to_string()),
        );
        md.insert(
            "fakeRootDir".into(),
            json!(state.root_dir.display().to_string()),
        );
        md.insert("resumedLease".into(), json!(resumed));
        md.insert("sandboxId".into(), json!(id));
        // Like cloud providers that write their lifetime default here: the
        // host must not take it for a call budget.
        let timeout = FakeConfig::from_values(ctx.config.values()).timeout_ms;
        md.insert("timeoutMs".into(), json!(timeout.round() as i64));
        if self.inner.echo_secrets {
            for path in ctx.config.secret_paths() {
                if let Some(secret) = ctx.config.secret(path) {
                    use paperclip_env_core::secrecy::ExposeSecret;
                    md.insert(path.to_owned(), json!(secret.expose_secret()));
                    md.insert(
                        format!("{path}Echo"),
                        json!(format!("token={}", secret.expose_secret())),
                    );
                }
            }
        }
        md
    }

    fn known(&self, lease: &LeaseHandle) -> Option<SandboxState> {
        lease
            .id()
            .and_then(|id| self.lock_leases().get(id).cloned())
    }
}

fn io_error(provider: &str, what: &str, e: std::io::Error) -> Error {
    Error::provider_with_source(provider, format!("Failed to {what}: {e}"), false, e)
}

#[async_trait]
impl SandboxProvider for FakeProvider {
    fn key(&self) -> &str {
        &self.inner.key
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
            run_lookup: true,
        }
    }

    fn config_schema(&self) -> Value {
        let mut properties = json!({
            "image": {"type": "string", "default": DEFAULT_IMAGE, "description": "Deterministic fake image label for metadata and matching."},
            "timeoutMs": {"type": "number", "default": DEFAULT_TIMEOUT_MS, "description": "Command timeout in milliseconds."},
            "reuseLease": {"type": "boolean", "default": false, "description": "Whether to reuse fake leases by environment id."}
        });
        for field in &self.inner.secret_fields {
            properties[field] = json!({"type": "string", "format": "secret-ref"});
        }
        json!({"type": "object", "properties": properties})
    }

    fn plugin_key(&self) -> String {
        "paperclip.fake-sandbox-provider".to_owned()
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        self.inner.faults.inject(Operation::ValidateConfig).await?;
        let parsed = FakeConfig::from_values(config);
        let mut normalized = config.clone();
        normalized.insert("image".into(), json!(parsed.image));
        normalized.insert("timeoutMs".into(), json!(parsed.timeout_ms));
        normalized.insert("reuseLease".into(), json!(parsed.reuse_lease));
        if parsed.timeout_ms.fract() == 0.0 {
            normalized.insert("timeoutMs".into(), json!(parsed.timeout_ms as i64));
        }
        Ok(ConfigValidation::valid(normalized))
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        self.inner.faults.inject(Operation::Probe).await?;
        self.remember(ctx);
        let c = FakeConfig::from_values(ctx.config.values());
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(self.inner.key));
        metadata.insert("image".into(), json!(c.image));
        metadata.insert("timeoutMs".into(), json!(c.timeout_ms));
        metadata.insert("reuseLease".into(), json!(c.reuse_lease));
        Ok(ProviderProbe {
            ok: true,
            summary: Some(format!(
                "Fake sandbox provider is ready for image {}.",
                c.image
            )),
            diagnostics: Vec::new(),
            metadata: Some(metadata),
        })
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        self.inner.faults.inject(Operation::Acquire).await?;
        self.remember(ctx);
        let config = FakeConfig::from_values(ctx.config.values());
        let id = if config.reuse_lease {
            format!("{}://{}", self.inner.key, ctx.environment_id)
        } else {
            format!(
                "{}://{}/{}",
                self.inner.key,
                request.run_id,
                self.inner.ids.uuid()
            )
        };
        let existing = self.lock_leases().get(&id).cloned();
        let (state, resumed) = match existing {
            Some(state) => (state, true),
            None => (self.create_sandbox(&id, &config)?, false),
        };
        if !resumed && let Some(stall) = self.inner.faults.after_create_stall() {
            tokio::time::sleep(stall).await;
        }
        Ok(ProviderLease::new(
            id.clone(),
            self.metadata(&id, &state, resumed, ctx),
        ))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        self.inner.faults.inject(Operation::Resume).await?;
        self.remember(ctx);
        let id = lease
            .id()
            .ok_or_else(|| Error::not_found("No provider lease id to resume."))?
            .to_owned();
        let state = match self.known(lease) {
            Some(state) => state,
            None => self.create_sandbox(&id, &FakeConfig::from_values(ctx.config.values()))?,
        };
        Ok(ProviderLease::new(
            id.clone(),
            self.metadata(&id, &state, true, ctx),
        ))
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        self.inner.stats.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.faults.inject(Operation::Release).await?;
        self.remember(ctx);
        if let Some(id) = lease.id()
            && !FakeConfig::from_values(ctx.config.values()).reuse_lease
            && !self.remove(id)
        {
            self.remove_orphan(lease);
        }
        Ok(())
    }

    async fn list_run_resources(
        &self,
        ctx: &CallContext,
        run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        self.inner
            .faults
            .inject(Operation::ListRunResources)
            .await?;
        self.remember(ctx);
        // Fresh sandboxes are named `<key>://<run>/<uuid>`: the run is the label.
        let prefix = format!("{}://{}/", self.inner.key, run_id);
        let mut ids: Vec<String> = self
            .lock_leases()
            .keys()
            .filter(|id| id.starts_with(&prefix))
            .cloned()
            .collect();
        ids.sort();
        Ok(ids
            .into_iter()
            .map(|id| LeaseHandle {
                provider_lease_id: Some(id),
                ..Default::default()
            })
            .collect())
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        self.inner.faults.inject(Operation::Destroy).await?;
        self.remember(ctx);
        if let Some(id) = lease.id()
            && !self.remove(id)
        {
            self.remove_orphan(lease);
        }
        Ok(())
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        self.inner
            .faults
            .inject(Operation::RealizeWorkspace)
            .await?;
        self.remember(ctx);
        let known = self.known(lease);
        if known.is_none() && self.inner.strict_leases {
            return Err(Error::not_found(format!(
                "Fake sandbox lease {:?} not found.",
                lease.provider_lease_id
            )));
        }
        let cwd = known
            .map(|s| s.remote_cwd.display().to_string())
            .or_else(|| lease.preferred_cwd(workspace))
            .unwrap_or_else(|| {
                std::env::temp_dir()
                    .join("paperclip-fake-sandbox-workspace")
                    .display()
                    .to_string()
            });
        std::fs::create_dir_all(&cwd)
            .map_err(|e| io_error(&self.inner.key, "create workspace", e))?;
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(self.inner.key));
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
        self.inner.faults.inject(Operation::Execute).await?;
        self.remember(ctx);
        let known = self.known(lease);
        if known.is_none() && self.inner.strict_leases {
            return Err(Error::not_found(format!(
                "Fake sandbox lease {:?} not found.",
                lease.provider_lease_id
            )));
        }
        let cwd: Option<PathBuf> = request
            .cwd
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(PathBuf::from)
            .or_else(|| known.map(|s| s.remote_cwd));
        let config = FakeConfig::from_values(ctx.config.values());
        let timeout_ms = request
            .timeout_ms
            .map(|t| t as f64)
            .unwrap_or(config.timeout_ms);
        let timeout = (timeout_ms > 0.0).then(|| Duration::from_millis(timeout_ms as u64));
        let started_at = time::to_iso(&time::now());
        self.inner.stats.executed.fetch_add(1, Ordering::SeqCst);
        let mut exit = run_process(
            &self.inner.key,
            ProcessSpec {
                command: &request.command,
                args: &request.args,
                cwd: cwd.as_deref().map(Path::new),
                env: &request.env,
                stdin: request.stdin.as_deref().map(str::as_bytes),
                timeout,
            },
            output,
        )
        .await?;
        let mut metadata = JsonObject::new();
        metadata.insert("startedAt".into(), json!(started_at));
        metadata.insert("commandLine".into(), json!(request.command_line()));
        exit.metadata = Some(metadata);
        Ok(exit)
    }
}
