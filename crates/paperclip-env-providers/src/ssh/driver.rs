//! The `ssh` runtime driver (spec 00 §5.3, spec 27 §5).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::config::{ConfigShape, SshConfig};
use paperclip_env_core::driver::{
    AcquireInput, ConfigPurpose, DriverContext, EnvironmentRuntimeDriver,
};
use paperclip_env_core::execute::{CommandExit, ExecuteRequest, OutputCollector};
use paperclip_env_core::lease::{
    Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus, driver_keys,
};
use paperclip_env_core::probe::ProbeResult;
use paperclip_env_core::realize::{
    RealizeWorkspaceResult, WorkspaceSpec, build_realization_record,
};
use paperclip_env_core::secret::{NewSecret, SecretRef};
use paperclip_env_core::store::{NewLease, ReleaseUpdate};
use paperclip_env_core::{Error, Result};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::host_keys::HostKeyPolicy;
use super::transport::{
    DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, RemoteCommand, SshAuth, SshError,
    SshTransport, shell_quote,
};

/// The `ssh` driver: runs commands on a machine you own, over SSH.
///
/// Connections are cached per lease and dropped on release. Authentication is
/// publickey only: `privateKey` (or `privateKeySecretRef`, resolved through
/// the runtime's secret resolver), else `identityFile`, else the process
/// user's default identity files (no ssh-agent).
///
/// ```no_run
/// # async fn demo() -> paperclip_env_core::Result<()> {
/// use std::sync::Arc;
/// use paperclip_env_core::{EnvironmentRuntime, ExecuteRequest, lease::Environment};
/// use paperclip_env_core::runtime::AcquireRunLease;
/// use paperclip_env_providers::ssh::SshDriver;
/// let runtime = EnvironmentRuntime::builder().driver(Arc::new(SshDriver::new())).build();
/// let env = Environment::new("env-1", "build box", "ssh", serde_json::json!({
///     "host": "build-01.internal", "username": "paperclip",
///     "remoteWorkspacePath": "/srv/paperclip/workspace",
///     "identityFile": "/home/me/.ssh/id_ed25519",
///     "knownHosts": "build-01.internal ssh-ed25519 AAAA…",
/// }));
/// let record = runtime.acquire_run_lease(AcquireRunLease::ad_hoc(env.clone())).await?;
/// let result = runtime.execute(&env, &record.lease, &ExecuteRequest::new("uname").arg("-a")).await?;
/// println!("{}", result.stdout);
/// # Ok(()) }
/// ```
pub struct SshDriver {
    connect_timeout: Duration,
    transports: Mutex<HashMap<String, Arc<SshTransport>>>,
}

impl std::fmt::Debug for SshDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.transports.lock().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("SshDriver")
            .field("connect_timeout", &self.connect_timeout)
            .field("cached_connections", &cached)
            .finish()
    }
}

impl Default for SshDriver {
    fn default() -> Self {
        Self::new()
    }
}

/// Lower-case alphanumerics with single dashes, at most 48 chars.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let cut: String = out.trim_matches('-').chars().take(48).collect();
    let cut = cut.trim_end_matches('-');
    if cut.is_empty() {
        "environment".into()
    } else {
        cut.into()
    }
}

struct EnsureFailure {
    error: Error,
    text: String,
    code: Option<i32>,
}

impl SshDriver {
    /// A driver with the spec's 10 s connect timeout.
    pub fn new() -> Self {
        SshDriver {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            transports: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the connect + handshake + auth budget (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Parses the environment's config and resolves the key secret.
    async fn runtime_config(ctx: &DriverContext, environment: &Environment) -> Result<SshConfig> {
        if environment.driver != driver_keys::SSH {
            return Err(Error::Contract(format!(
                "Expected SSH environment config for driver \"{}\".",
                environment.driver
            )));
        }
        let mut config = SshConfig::parse(&environment.config, ConfigShape::Input)?;
        if config.private_key.is_none()
            && let Some(reference) = &config.private_key_secret_ref
        {
            config.private_key = Some(ctx.secrets.resolve(reference).await?);
        }
        Ok(config)
    }

    /// A transport for a parsed config.
    pub fn transport_for(&self, config: &SshConfig) -> SshTransport {
        let auth = match (&config.private_key, &config.identity_file) {
            (Some(key), _) => SshAuth::PrivateKey(key.clone()),
            (None, Some(path)) => SshAuth::IdentityFile(PathBuf::from(path)),
            (None, None) => SshAuth::DefaultIdentities,
        };
        SshTransport::builder(&config.host, &config.username)
            .port(config.port)
            .auth(auth)
            .host_key_policy(HostKeyPolicy::from_config(
                config.strict_host_key_checking,
                config.known_hosts.as_deref(),
            ))
            .connect_timeout(self.connect_timeout)
            .build()
    }

    /// `mkdir -p` + `cd` + `pwd` (spec 27 §5.1) → the remote cwd.
    async fn ensure_workspace_ready(
        transport: &SshTransport,
        path: &str,
    ) -> std::result::Result<String, EnsureFailure> {
        let q = shell_quote(path);
        let script = format!("mkdir -p {q} && cd {q} && pwd");
        match transport.run_script(&script, DEFAULT_COMMAND_TIMEOUT).await {
            Ok(out) if out.exit.exit_code == Some(0) => Ok(out.stdout.trim().to_owned()),
            Ok(out) => {
                let text = [out.stderr.trim(), out.stdout.trim()]
                    .into_iter()
                    .find(|s| !s.is_empty())
                    .map(str::to_owned)
                    .unwrap_or_else(|| match out.exit.exit_code {
                        Some(c) => format!("Process exited with code {c}"),
                        None if out.exit.timed_out => {
                            "Timed out preparing the remote workspace.".into()
                        }
                        None => "Process was terminated by a signal".into(),
                    });
                Err(EnsureFailure {
                    error: Error::provider("ssh", format!("Remote workspace setup failed: {text}")),
                    text,
                    code: out.exit.exit_code,
                })
            }
            Err(e) => Err(EnsureFailure {
                text: e.to_string(),
                code: Some(255),
                error: e.into(),
            }),
        }
    }

    fn cached(&self, lease_id: &str) -> Option<Arc<SshTransport>> {
        self.transports
            .lock()
            .ok()
            .and_then(|t| t.get(lease_id).cloned())
    }

    async fn lease_transport(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Arc<SshTransport>> {
        if let Some(t) = self.cached(&lease.id) {
            return Ok(t);
        }
        let config = Self::runtime_config(ctx, environment).await?;
        let transport = Arc::new(self.transport_for(&config));
        if let Ok(mut map) = self.transports.lock() {
            map.insert(lease.id.clone(), transport.clone());
        }
        Ok(transport)
    }
}

#[async_trait]
impl EnvironmentRuntimeDriver for SshDriver {
    fn key(&self) -> &str {
        driver_keys::SSH
    }

    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
    ) -> Result<EnvironmentLease> {
        let config = Self::runtime_config(ctx, input.environment).await?;
        let transport = Arc::new(self.transport_for(&config));
        let remote_cwd = Self::ensure_workspace_ready(&transport, &config.remote_workspace_path)
            .await
            .map_err(|f| f.error)?;
        let mut metadata = JsonObject::new();
        metadata.insert("driver".into(), json!(input.environment.driver));
        metadata.insert(
            "executionWorkspaceMode".into(),
            json!(input.lease_context.execution_workspace_mode),
        );
        metadata.insert("host".into(), json!(config.host));
        metadata.insert("port".into(), json!(config.port));
        metadata.insert("username".into(), json!(config.username));
        metadata.insert(
            "remoteWorkspacePath".into(),
            json!(config.remote_workspace_path),
        );
        metadata.insert("remoteCwd".into(), json!(remote_cwd));
        let lease = ctx
            .store
            .insert(NewLease {
                company_id: input.company_id,
                environment_id: input.environment.id.clone(),
                execution_workspace_id: input.lease_context.execution_workspace_id.clone(),
                issue_id: input.issue_id,
                heartbeat_run_id: input.heartbeat_run_id,
                lease_policy: Some(LeasePolicy::Ephemeral),
                provider: Some("ssh".into()),
                provider_lease_id: Some(format!(
                    "ssh://{}@{}:{}{}",
                    config.username, config.host, config.port, remote_cwd
                )),
                expires_at: None,
                metadata: Some(metadata),
            })
            .await?;
        if let Ok(mut map) = self.transports.lock() {
            map.insert(lease.id.clone(), transport);
        }
        Ok(lease)
    }

    async fn release_run_lease(
        &self,
        ctx: &DriverContext,
        _environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<EnvironmentLease>> {
        let cached = self
            .transports
            .lock()
            .ok()
            .and_then(|mut t| t.remove(&lease.id));
        if let Some(t) = cached {
            t.disconnect().await;
        }
        ctx.store
            .release(&lease.id, status, ReleaseUpdate::default())
            .await
    }

    async fn realize_workspace(
        &self,
        _ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        Ok(build_realization_record(environment, lease, workspace))
    }

    async fn execute(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let transport = self.lease_transport(ctx, environment, lease).await?;
        let cwd = request
            .cwd
            .clone()
            .filter(|c| !c.trim().is_empty())
            .or_else(|| {
                lease
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get("remoteCwd"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            });
        let command = RemoteCommand {
            argv: std::iter::once(request.command.clone())
                .chain(request.args.iter().cloned())
                .collect(),
            cwd,
            env: request.env.clone(),
            stdin: request.stdin.as_ref().map(|s| s.as_bytes().to_vec()),
            timeout: Some(
                request
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_COMMAND_TIMEOUT),
            ),
            // The SDK caps what is kept with `request.capture` (truncation,
            // `outputTruncated`), never by killing the command.
            max_output_bytes: None,
        };
        transport
            .run(&command, output)
            .await
            .map_err(|e: SshError| e.into())
    }

    /// Workspace archives travel over the SSH channel itself (`cat` in and
    /// out of the remote file), never as base64 through `execute`.
    async fn workspace_access(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<paperclip_env_core::workspace::WorkspaceAccess> {
        let transport = self.lease_transport(ctx, environment, lease).await?;
        Ok(paperclip_env_core::workspace::WorkspaceAccess {
            capabilities: Some(paperclip_env_core::Capabilities {
                execute: true,
                realize_workspace: true,
                streaming: true,
                stdin: true,
                multi_command_exec: true,
                native_sync: true,
                signals: true,
                ..Default::default()
            }),
            transport: Some(Arc::new(ChannelTransfer(transport))),
        })
    }

    /// Probe: a pasted `privateKey` is kept. Persistence: it becomes a secret
    /// (`environment-ssh-<slug>-private-key-<8 hex>`) referenced by
    /// `privateKeySecretRef`, and `privateKey` is stored as null.
    async fn normalize_config(
        &self,
        ctx: &DriverContext,
        environment_name: &str,
        config: &Value,
        purpose: ConfigPurpose,
    ) -> Result<Value> {
        let mut parsed = SshConfig::parse(config, ConfigShape::Input)?;
        let Some(key) = parsed.private_key.take() else {
            return Ok(parsed.to_json());
        };
        match purpose {
            ConfigPurpose::Probe => {
                let mut v = parsed.to_json();
                v["privateKey"] = json!(key.expose_secret());
                Ok(v)
            }
            ConfigPurpose::Persistence => {
                let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
                let id = ctx
                    .secrets
                    .create(NewSecret {
                        name: format!(
                            "environment-ssh-{}-private-key-{suffix}",
                            slug(environment_name)
                        ),
                        description: format!("Secret for {environment_name} private-key."),
                        value: key,
                    })
                    .await?;
                parsed.private_key_secret_ref = Some(SecretRef::latest(id));
                Ok(parsed.to_json())
            }
        }
    }

    async fn probe(&self, ctx: &DriverContext, environment: &Environment) -> Result<ProbeResult> {
        let config = Self::runtime_config(ctx, environment).await?;
        let transport = self.transport_for(&config);
        let outcome = Self::ensure_workspace_ready(&transport, &config.remote_workspace_path).await;
        transport.disconnect().await;
        let mut details = json!({
            "host": config.host,
            "port": config.port,
            "username": config.username,
            "remoteWorkspacePath": config.remote_workspace_path,
        });
        Ok(match outcome {
            Ok(cwd) => {
                details["remoteCwd"] = json!(cwd);
                ProbeResult {
                    ok: true,
                    driver: driver_keys::SSH.into(),
                    summary: format!(
                        "Connected to {}@{} and verified the remote workspace path.",
                        config.username, config.host
                    ),
                    details: Some(details),
                }
            }
            Err(f) => {
                let text = Some(f.text.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "SSH probe failed.".into());
                details["error"] = json!(text);
                details["code"] = json!(f.code);
                ProbeResult {
                    ok: false,
                    driver: driver_keys::SSH.into(),
                    summary: format!("SSH probe failed for {}@{}.", config.username, config.host),
                    details: Some(details),
                }
            }
        })
    }
}

/// [`WorkspaceTransport`](paperclip_env_core::workspace::WorkspaceTransport)
/// over an SSH channel.
struct ChannelTransfer(Arc<SshTransport>);

#[async_trait]
impl paperclip_env_core::workspace::WorkspaceTransport for ChannelTransfer {
    fn name(&self) -> &str {
        "ssh"
    }

    async fn put_file(&self, local: &std::path::Path, remote: &str, timeout_ms: u64) -> Result<()> {
        self.0
            .put_file(local, remote, Duration::from_millis(timeout_ms))
            .await
            .map_err(Into::into)
    }

    async fn get_file(&self, remote: &str, local: &std::path::Path, timeout_ms: u64) -> Result<()> {
        self.0
            .get_file(remote, local, Duration::from_millis(timeout_ms))
            .await
            .map_err(Into::into)
    }
}
