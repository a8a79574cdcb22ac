//! The exe.dev provider (spec 24): whole VMs created, listed and removed
//! through exe.dev's HTTPS API (`POST /exec` with a CLI command line), work
//! over direct SSH to `<vm>.exe.xyz` through the shared [`crate::ssh`]
//! transport (one connection per lease, many channels).
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::{CallContext, ProviderConfig, SandboxProvider, AcquireRequest};
//! use paperclip_env_providers::exe_dev::ExeDevProvider;
//! let provider = ExeDevProvider::builder().with_env().build()?;
//! let config = serde_json::json!({"sshIdentityFile": "/home/me/.ssh/id_ed25519"});
//! let ctx = CallContext {
//!     company_id: None,
//!     environment_id: "env-1".into(),
//!     issue_id: None,
//!     config: ProviderConfig::new(config.as_object().cloned().unwrap_or_default()),
//! };
//! let lease = provider.acquire(&ctx, &AcquireRequest { run_id: "run-1".into(), workspace_mode: None, ..Default::default() }).await?;
//! println!("VM {:?}", lease.provider_lease_id);
//! # Ok(()) }
//! ```
//!
//! Decisions beyond the baseline (spec 24 §7):
//! - A `200` whose JSON has a top-level `error` string is an error.
//! - `strictHostKeyChecking`: `no` accepts any key; `yes` checks the
//!   builder's known-hosts text or the user's known_hosts files; `accept-new`
//!   checks the builder's known-hosts text when given, else accepts the key
//!   offered (trust on first use, nothing is written to disk).
//! - Non-zero exits keep the command's own stderr (it is streamed); only
//!   SSH-level failures are reported as `Failed to … exe.dev VM …` errors.
//! - With `reuseLease`, acquire adopts an existing VM with the run's name.
//! - The first SSH connection to a VM is retried with back-off on
//!   connection-level failures (a fresh VM may still be booting); auth and
//!   host-key failures are never retried.

mod config;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::execute::{CommandExit, ExecuteRequest, OutputCollector};
use paperclip_env_core::lease::LeaseStatus;
use paperclip_env_core::realize::{RealizeWorkspaceResult, WorkspaceSpec};
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, ConfigValidation, Error, JsonObject, LeaseHandle,
    ProviderLease, ProviderProbe, Result, SandboxProvider,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tracing::{debug, warn};

pub use config::{
    DEFAULT_API_URL, DEFAULT_SETUP_SCRIPT, DEFAULT_TIMEOUT_MS, ExeDevConfig, ExeDevConfigSchema,
    lint_private_key, normalize_api_url, normalize_prefix,
};

use crate::http::{HttpClient, HttpOptions, RequestSpec, RetryPolicy};
use crate::ssh::{
    HostKeyPolicy, KnownHosts, RemoteCommand, SshAuth, SshTransport, shell_quote, valid_env_key,
};

const KEY: &str = "exe-dev";
/// Upper bound of a lifecycle call (exe.dev's server limit is 30 s).
pub const API_MAX_TIMEOUT: Duration = Duration::from_millis(29_000);
/// SSH connect + handshake + auth budget.
pub const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Builder of an [`ExeDevProvider`].
pub struct ExeDevProviderBuilder {
    api_url: Option<String>,
    api_key: Option<SecretString>,
    http: HttpOptions,
    ssh_endpoint: Option<(String, u16)>,
    known_hosts: Option<String>,
    connect_timeout: Duration,
    ssh_connect_retries: u32,
    ssh_retry_backoff: Duration,
}

impl std::fmt::Debug for ExeDevProviderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExeDevProviderBuilder")
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("ssh_endpoint", &self.ssh_endpoint)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl ExeDevProviderBuilder {
    /// Reads `EXE_API_KEY` (trimmed) as the fallback API token.
    pub fn with_env(mut self) -> Self {
        if let Some(key) = std::env::var("EXE_API_KEY")
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            self.api_key = Some(SecretString::from(key));
        }
        self
    }

    /// Overrides the API endpoint for every config (tests, proxies).
    pub fn api_url(mut self, url: impl Into<String>) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// The fallback API token when a config has none.
    pub fn api_key(mut self, key: SecretString) -> Self {
        self.api_key = Some(key);
        self
    }

    /// HTTP options (the request timeout is capped at 29 s per call; retries are off).
    pub fn http_options(mut self, options: HttpOptions) -> Self {
        self.http = options;
        self
    }

    /// Connects every VM's SSH to `host:port` instead of the address
    /// exe.dev reports (tests, bastions).
    pub fn ssh_endpoint(mut self, host: impl Into<String>, port: u16) -> Self {
        self.ssh_endpoint = Some((host.into(), port));
        self
    }

    /// Known-hosts text checked for every VM unless `strictHostKeyChecking` is `no`.
    pub fn known_hosts(mut self, text: impl Into<String>) -> Self {
        self.known_hosts = Some(text.into());
        self
    }

    /// SSH connect budget (default 15 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Retries of the first SSH connection to a VM on connection-level
    /// failures (refused, reset), with exponential back-off starting at
    /// `backoff` (default 3 retries from 500 ms; `0` disables).
    pub fn ssh_connect_retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.ssh_connect_retries = retries;
        self.ssh_retry_backoff = backoff;
        self
    }

    /// Builds the provider.
    pub fn build(self) -> Result<ExeDevProvider> {
        let http = HttpClient::new(KEY, self.http)?;
        Ok(ExeDevProvider {
            inner: Arc::new(Inner {
                http,
                api_url: self.api_url,
                api_key: self.api_key,
                ssh_endpoint: self.ssh_endpoint,
                known_hosts: self.known_hosts,
                connect_timeout: self.connect_timeout,
                ssh_connect_retries: self.ssh_connect_retries,
                ssh_retry_backoff: self.ssh_retry_backoff,
                transports: Mutex::new(HashMap::new()),
            }),
        })
    }
}

struct Inner {
    http: HttpClient,
    api_url: Option<String>,
    api_key: Option<SecretString>,
    ssh_endpoint: Option<(String, u16)>,
    known_hosts: Option<String>,
    connect_timeout: Duration,
    ssh_connect_retries: u32,
    ssh_retry_backoff: Duration,
    transports: Mutex<HashMap<String, Arc<SshTransport>>>,
}

/// The exe.dev sandbox provider. Cheap to clone.
#[derive(Clone)]
pub struct ExeDevProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExeDevProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExeDevProvider")
            .field("api_url", &self.inner.api_url)
            .field(
                "api_key",
                &self.inner.api_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field("ssh_endpoint", &self.inner.ssh_endpoint)
            .finish_non_exhaustive()
    }
}

/// A VM as exe.dev describes it.
#[derive(Debug, Clone, PartialEq)]
struct Vm {
    name: String,
    ssh_dest: String,
    ssh_host: Option<String>,
    ssh_user: Option<String>,
    ssh_port: Option<u16>,
    https_url: Option<String>,
    region: Option<String>,
    region_display: Option<String>,
}

fn str_field(v: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_vm(v: &Value, depth: u8) -> Option<Vm> {
    if depth > 4 || !v.is_object() {
        return None;
    }
    for nested in ["vm", "data"] {
        if let Some(vm) = v.get(nested).and_then(|n| parse_vm(n, depth + 1)) {
            return Some(vm);
        }
    }
    let name = str_field(v, &["vm_name", "name", "vmName"])?;
    Some(Vm {
        ssh_dest: str_field(v, &["ssh_dest", "sshDest"])
            .unwrap_or_else(|| format!("{name}.exe.xyz")),
        ssh_host: str_field(v, &["ssh_host", "sshHost"]),
        ssh_user: str_field(v, &["ssh_user", "sshUser"]),
        ssh_port: v
            .get("ssh_port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
        https_url: str_field(v, &["https_url", "httpsUrl"]),
        region: str_field(v, &["region"]),
        region_display: str_field(v, &["region_display", "regionDisplay"]),
        name,
    })
}

/// `--flag='value'`, the value quoted for `sh`.
fn flag(name: &str, value: &str) -> String {
    format!("--{name}={}", quoted(value))
}

use paperclip_env_core::provider::support::shell_quote as quoted;

fn short_part(raw: &str) -> String {
    raw.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_lowercase()
}

fn random_part() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// `<prefix>-<env8>-<run8>` (≤ 63 chars; spec 24 §4).
fn vm_name(prefix: &str, environment_id: &str, run_id: &str) -> String {
    let env = Some(short_part(environment_id))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "env".into());
    let run = Some(short_part(run_id))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(random_part);
    format!("{prefix}-{env}-{run}").chars().take(63).collect()
}

/// The `new` command and its redacted form (spec 24 §4).
fn create_command(c: &ExeDevConfig, name: &str) -> (String, String) {
    let mut real = vec![
        "new".to_owned(),
        "--json".into(),
        "--no-email".into(),
        flag("name", name),
    ];
    let mut shown = real.clone();
    let mut both = |r: String, s: String| {
        real.push(r);
        shown.push(s);
    };
    let cpu = c.cpu.map(|n| n.to_string());
    for (name, value) in [
        ("image", &c.image),
        ("command", &c.command),
        ("cpu", &cpu),
        ("memory", &c.memory),
        ("disk", &c.disk),
        ("comment", &c.comment),
    ] {
        if let Some(v) = value {
            both(flag(name, v), flag(name, v));
        }
    }
    for (k, v) in &c.env {
        both(
            flag("env", &format!("{k}={v}")),
            flag("env", &format!("{k}=[REDACTED]")),
        );
    }
    for i in &c.integrations {
        both(flag("integration", i), flag("integration", i));
    }
    for t in &c.tags {
        both(flag("tag", t), flag("tag", t));
    }
    match &c.setup_script {
        Some(s) => both(flag("setup-script", s), flag("setup-script", "[REDACTED]")),
        None => both(
            flag("setup-script", DEFAULT_SETUP_SCRIPT),
            flag("setup-script", DEFAULT_SETUP_SCRIPT),
        ),
    }
    if let Some(p) = &c.prompt {
        both(flag("prompt", p), flag("prompt", "[REDACTED]"));
    }
    (real.join(" "), shown.join(" "))
}

/// Spec 24 §5.1.
fn ssh_failure(action: &str, vm: &str, stderr: &str, stdout: &str) -> String {
    let combined = format!("{stderr}\n{stdout}");
    let prefix = format!("Failed to {action} exe.dev VM {vm}");
    if combined.contains("Please complete registration by running: ssh exe.dev")
        || combined.contains("Please enter your email address:")
    {
        return format!(
            "{prefix}: the Paperclip host SSH key is not registered with exe.dev. Complete exe.dev's one-time SSH onboarding on this host by running `ssh exe.dev` and following the email verification prompt, then retry."
        );
    }
    let lower = combined.to_lowercase();
    if lower.find("load key").is_some_and(|i| {
        lower[i..]
            .lines()
            .next()
            .is_some_and(|l| l.contains("invalid format"))
    }) {
        return format!(
            "{prefix}: the configured SSH private key isn't an OpenSSH-format private key. Confirm the secret starts with `-----BEGIN … PRIVATE KEY-----` and isn't the `.pub` file or a PuTTY `.ppk` export."
        );
    }
    let detail = [stderr.trim(), stdout.trim()]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or("unknown error");
    format!("{prefix}: {detail}")
}

fn ssh_error(action: &str, vm: &str, error: crate::ssh::SshError) -> Error {
    let text = error.to_string();
    let mapped: Error = error.into();
    match mapped {
        Error::HostKeyRejected { .. } | Error::Timeout { .. } => mapped,
        Error::Unauthenticated { source, .. } => {
            let message = if matches!(
                source
                    .as_deref()
                    .and_then(|s| s.downcast_ref::<crate::ssh::SshError>()),
                Some(crate::ssh::SshError::InvalidKey(_))
            ) {
                ssh_failure(action, vm, "Load key: invalid format", "")
            } else {
                ssh_failure(action, vm, &text, "")
            };
            Error::Unauthenticated {
                message,
                source: None,
            }
        }
        other => Error::provider_with_source(KEY, ssh_failure(action, vm, &text, ""), true, other),
    }
}

/// Everything one call needs, resolved from the context.
struct Settings {
    config: ExeDevConfig,
    api_url: String,
    api_key: SecretString,
}

/// An error as it may be logged by the provider itself.
fn self_scrub(settings: &Settings, error: &Error) -> String {
    settings.scrub(&error.to_string())
}

impl Settings {
    /// `text` with the API key and the SSH private key (and each of its
    /// lines) replaced, for log lines written before the host scrubs.
    fn scrub(&self, text: &str) -> String {
        use secrecy::ExposeSecret;
        let mut needles: Vec<&str> = vec![self.api_key.expose_secret()];
        if let Some(key) = &self.config.ssh_private_key {
            needles.push(key.expose_secret());
            needles.extend(key.expose_secret().lines().filter(|l| l.len() >= 16));
        }
        let mut out = text.to_owned();
        for needle in needles.into_iter().filter(|n| !n.is_empty()) {
            out = out.replace(needle, "[REDACTED]");
        }
        out
    }
}

impl ExeDevProvider {
    /// A builder with exe.dev's defaults.
    pub fn builder() -> ExeDevProviderBuilder {
        ExeDevProviderBuilder {
            api_url: None,
            api_key: None,
            http: HttpOptions::default(),
            ssh_endpoint: None,
            known_hosts: None,
            connect_timeout: SSH_CONNECT_TIMEOUT,
            ssh_connect_retries: 3,
            ssh_retry_backoff: Duration::from_millis(500),
        }
    }

    /// A provider with `EXE_API_KEY` as the fallback token.
    pub fn from_env() -> Result<Self> {
        Self::builder().with_env().build()
    }

    fn settings(&self, ctx: &CallContext) -> Result<Settings> {
        let config = ExeDevConfig::from_provider_config(&ctx.config);
        let issues = config.validate(ctx.config.values(), self.inner.api_key.is_some());
        if !issues.is_empty() {
            return Err(Error::invalid_config(issues));
        }
        let api_key = config
            .api_key
            .clone()
            .or_else(|| self.inner.api_key.clone())
            .ok_or_else(|| {
                Error::invalid_field(
                    "apiKey",
                    "exe.dev environments require an API key in config or EXE_API_KEY.",
                )
            })?;
        let api_url = self
            .inner
            .api_url
            .clone()
            .unwrap_or_else(|| config.api_url.clone());
        Ok(Settings {
            config,
            api_url,
            api_key,
        })
    }

    /// Runs one CLI command through the HTTPS API (spec 24 §4).
    async fn lifecycle(&self, s: &Settings, command: &str, shown: &str) -> Result<Value> {
        let timeout = Duration::from_millis(s.config.timeout_ms.max(1) as u64).min(API_MAX_TIMEOUT);
        let auth = format!("Bearer {}", s.api_key.expose_secret());
        let response = self
            .inner
            .http
            .send(
                RequestSpec::not_idempotent("exec")
                    .accept_all()
                    .timeout(timeout)
                    .retry(RetryPolicy {
                        max_retries: 0,
                        ..Default::default()
                    }),
                |c| {
                    let mut value = reqwest::header::HeaderValue::from_str(&auth)
                        .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
                    value.set_sensitive(true);
                    c.post(&s.api_url)
                        .header(reqwest::header::AUTHORIZATION, value)
                        .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                        .body(command.to_owned())
                },
            )
            .await?;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        let failed = |detail: &str| format!("exe.dev API command failed ({detail}) for: {shown}");
        if !(200..300).contains(&status) {
            let message = failed(&status.to_string());
            let body = body.trim();
            let message = if body.is_empty() {
                message
            } else {
                format!("{message}: {}", body.chars().take(500).collect::<String>())
            };
            return Err(match status {
                401 => Error::Unauthenticated {
                    message,
                    source: None,
                },
                403 => Error::PermissionDenied {
                    message,
                    source: None,
                },
                _ => Error::provider(KEY, message),
            });
        }
        let trimmed = body.trim();
        if trimmed.is_empty() {
            return Ok(Value::Null);
        }
        let value = serde_json::from_str::<Value>(trimmed)
            .unwrap_or_else(|_| Value::String(trimmed.to_owned()));
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            return Err(Error::provider(
                KEY,
                format!("{}: {error}", failed(&status.to_string())),
            ));
        }
        Ok(value)
    }

    async fn lookup(&self, s: &Settings, name: &str) -> Result<Option<Vm>> {
        let command = format!("ls --json {}", quoted(name));
        let response = self.lifecycle(s, &command, &command).await?;
        let candidates: Vec<Value> = match response {
            Value::Object(ref o) if o.get("vms").is_some_and(Value::is_array) => o
                .get("vms")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        Ok(candidates
            .iter()
            .filter_map(|c| parse_vm(c, 0))
            .find(|vm| vm.name == name || vm.ssh_dest == name))
    }

    async fn remove(&self, s: &Settings, name: &str) -> Result<()> {
        self.drop_transport(name).await;
        let command = format!("rm --json {}", quoted(name));
        match self.lifecycle(s, &command, &command).await {
            Ok(_) => Ok(()),
            Err(Error::Provider { ref message, .. }) if message.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, s: &Settings, name: &str) -> Result<Vm> {
        let (command, shown) = create_command(&s.config, name);
        let response = self.lifecycle(s, &command, &shown).await?;
        if let Some(vm) = parse_vm(&response, 0) {
            return Ok(vm);
        }
        match self.lookup(s, name).await? {
            Some(vm) => Ok(vm),
            None => Err(Error::provider(
                KEY,
                format!("exe.dev did not return VM metadata for {name}."),
            )),
        }
    }

    fn transport(&self, s: &Settings, vm: &Vm) -> Arc<SshTransport> {
        if let Some(t) = self
            .inner
            .transports
            .lock()
            .ok()
            .and_then(|m| m.get(&vm.name).cloned())
        {
            return t;
        }
        let c = &s.config;
        let (dest_user, dest_host) = match vm.ssh_dest.split_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h.to_owned()),
            None => (None, vm.ssh_dest.clone()),
        };
        let (host, port) = match &self.inner.ssh_endpoint {
            Some((h, p)) => (h.clone(), *p),
            None => (
                vm.ssh_host.clone().unwrap_or(dest_host),
                vm.ssh_port.unwrap_or(c.ssh_port as u16),
            ),
        };
        let user = vm
            .ssh_user
            .clone()
            .or(dest_user)
            .or_else(|| c.ssh_user.clone())
            .unwrap_or_else(|| "root".into());
        let auth = match (&c.ssh_private_key, &c.ssh_identity_file) {
            (Some(key), _) => SshAuth::PrivateKey(key.clone()),
            (None, Some(path)) => SshAuth::IdentityFile(PathBuf::from(path)),
            (None, None) => SshAuth::DefaultIdentities,
        };
        let policy = match (c.strict_host_key_checking.as_str(), &self.inner.known_hosts) {
            ("no", _) => HostKeyPolicy::AcceptAny,
            (_, Some(text)) => HostKeyPolicy::Strict(KnownHosts::parse(text)),
            ("yes", None) => HostKeyPolicy::from_config(true, None),
            _ => HostKeyPolicy::AcceptAny,
        };
        let transport = Arc::new(
            SshTransport::builder(host, user)
                .port(port)
                .auth(auth)
                .host_key_policy(policy)
                .connect_timeout(self.inner.connect_timeout)
                .build(),
        );
        if let Ok(mut map) = self.inner.transports.lock() {
            map.insert(vm.name.clone(), transport.clone());
        }
        transport
    }

    async fn drop_transport(&self, name: &str) {
        let removed = self
            .inner
            .transports
            .lock()
            .ok()
            .and_then(|mut m| m.remove(name));
        if let Some(t) = removed {
            t.disconnect().await;
        }
    }

    fn command_timeout(s: &Settings) -> Duration {
        Duration::from_millis(s.config.timeout_ms.max(1) as u64)
    }

    async fn mkdir(&self, s: &Settings, vm: &Vm, dir: &str) -> Result<()> {
        let t = self.transport(s, vm);
        let out = t
            .run_script(
                &format!("mkdir -p {}", shell_quote(dir)),
                Self::command_timeout(s),
            )
            .await
            .map_err(|e| ssh_error("create workspace for", &vm.name, e))?;
        if out.exit.exit_code != Some(0) {
            return Err(Error::provider(
                KEY,
                ssh_failure("create workspace for", &vm.name, &out.stderr, &out.stdout),
            ));
        }
        Ok(())
    }

    /// Inspect + mkdir → lease (spec 24 §6 "build lease").
    async fn build_lease(
        &self,
        s: &Settings,
        vm: &Vm,
        requested_cwd: Option<&str>,
        resumed: bool,
    ) -> Result<ProviderLease> {
        let t = self.transport(s, vm);
        let script = "h=\"$HOME\"; [ -n \"$h\" ] || h=\"$(pwd)\"; printf '%s\\n' \"$h\"; if command -v bash >/dev/null 2>&1; then echo bash; else echo sh; fi";
        // A fresh VM may not accept SSH yet: retry connection-level
        // failures with back-off (never auth or host-key failures).
        let mut attempt = 0u32;
        let out = loop {
            match t.run_script(script, Self::command_timeout(s)).await {
                Ok(out) => break out,
                Err(e) => {
                    let error = ssh_error("inspect", &vm.name, e);
                    let transient = matches!(
                        error,
                        Error::Provider {
                            retryable: true,
                            ..
                        }
                    );
                    if !transient || attempt >= self.inner.ssh_connect_retries {
                        return Err(error);
                    }
                    let wait = self.inner.ssh_retry_backoff * 2u32.saturating_pow(attempt);
                    let shown = self_scrub(s, &error);
                    debug!(vm = %vm.name, error = %shown, wait_ms = wait.as_millis() as u64, "SSH not reachable yet; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        };
        if out.exit.exit_code != Some(0) {
            return Err(Error::provider(
                KEY,
                ssh_failure("inspect", &vm.name, &out.stderr, &out.stdout),
            ));
        }
        let mut lines = out.stdout.lines();
        let home = lines
            .next()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or("/tmp")
            .to_owned();
        let shell = if lines.next().map(str::trim) == Some("bash") {
            "bash"
        } else {
            "sh"
        };
        let cwd = requested_cwd
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}/paperclip-workspace", home.trim_end_matches('/')));
        self.mkdir(s, vm, &cwd).await?;
        let metadata = json!({
            "provider": KEY,
            "vmName": vm.name,
            "sshDest": vm.ssh_dest,
            "sshHost": vm.ssh_host,
            "sshUser": vm.ssh_user,
            "sshPort": vm.ssh_port,
            "httpsUrl": vm.https_url,
            "region": vm.region,
            "regionDisplay": vm.region_display,
            "shellCommand": shell,
            "remoteCwd": cwd,
            "timeoutMs": s.config.timeout_ms,
            "reuseLease": s.config.reuse_lease,
            "resumedLease": resumed,
        });
        Ok(ProviderLease::new(
            vm.name.clone(),
            metadata.as_object().cloned().unwrap_or_default(),
        ))
    }

    /// A VM from lease metadata (no API call).
    fn vm_of(lease: &LeaseHandle, id: &str) -> Vm {
        let md = |k: &str| lease.metadata_str(k).map(str::to_owned);
        Vm {
            name: id.to_owned(),
            ssh_dest: md("sshDest").unwrap_or_else(|| format!("{id}.exe.xyz")),
            ssh_host: md("sshHost"),
            ssh_user: md("sshUser"),
            ssh_port: lease
                .metadata
                .as_ref()
                .and_then(|m| m.get("sshPort"))
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok()),
            https_url: None,
            region: None,
            region_display: None,
        }
    }

    /// Creates a VM, prepares it, and removes it again if preparing fails.
    async fn create_prepared(
        &self,
        s: &Settings,
        name: &str,
        requested_cwd: Option<&str>,
    ) -> Result<ProviderLease> {
        let vm = self.create(s, name).await?;
        match self.build_lease(s, &vm, requested_cwd, false).await {
            Ok(lease) => Ok(lease),
            Err(error) => {
                if let Err(rm) = self.remove(s, &vm.name).await {
                    let shown = self_scrub(s, &rm);
                    warn!(vm = %vm.name, error = %shown, "removing the VM after a failed acquire failed");
                }
                Err(error)
            }
        }
    }
}

fn expired() -> JsonObject {
    let mut md = JsonObject::new();
    md.insert("expired".into(), json!(true));
    md
}

#[async_trait]
impl SandboxProvider for ExeDevProvider {
    fn key(&self) -> &str {
        KEY
    }

    /// Paperclip 2026.916's plugin id for this provider.
    fn plugin_key(&self) -> String {
        format!("paperclip.{}-sandbox-provider", self.key())
    }

    fn default_lease_deadline(&self) -> Option<Duration> {
        // Create (one API call), then SSH readiness with its retries, then setup.
        Some(
            API_MAX_TIMEOUT * 2
                + (SSH_CONNECT_TIMEOUT
                    + self.inner.ssh_retry_backoff
                        * 2u32.saturating_pow(self.inner.ssh_connect_retries))
                    * (self.inner.ssh_connect_retries + 1),
        )
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
            native_sync: true,
            signals: true,
            run_lookup: false,
        }
    }

    fn config_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(ExeDevConfigSchema))
            .unwrap_or_else(|_| json!({"type": "object"}))
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let parsed = ExeDevConfig::from_values(config);
        let issues = parsed.validate(config, self.inner.api_key.is_some());
        let mut result = if issues.is_empty() {
            ConfigValidation::valid(parsed.normalized(config))
        } else {
            ConfigValidation::invalid(issues)
        };
        result.warnings = parsed.warnings();
        Ok(result)
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let base = |error: Option<String>, extra: Option<JsonObject>| {
            let mut md = extra.unwrap_or_default();
            md.insert("provider".into(), json!(KEY));
            let c = ExeDevConfig::from_provider_config(&ctx.config);
            md.insert("timeoutMs".into(), json!(c.timeout_ms));
            md.insert("reuseLease".into(), json!(c.reuse_lease));
            if let Some(e) = error {
                md.insert("error".into(), json!(e));
            }
            md
        };
        let settings = match self.settings(ctx) {
            Ok(s) => s,
            Err(e) => {
                return Ok(ProviderProbe {
                    ok: false,
                    summary: Some("exe.dev environment probe failed.".into()),
                    metadata: Some(base(Some(e.to_string()), None)),
                    ..Default::default()
                });
            }
        };
        let name: String = format!("{}-probe-{}", settings.config.name_prefix, random_part())
            .chars()
            .take(63)
            .collect();
        let created = self.create_prepared(&settings, &name, None).await;
        if created.is_ok()
            && let Err(error) = self.remove(&settings, &name).await
        {
            let shown = self_scrub(&settings, &error);
            warn!(vm = %name, error = %shown, "removing the probe VM failed");
        }
        match created {
            Ok(lease) => Ok(ProviderProbe {
                ok: true,
                summary: Some(format!("Connected to exe.dev VM {name}.")),
                diagnostics: Vec::new(),
                metadata: Some(base(None, lease.metadata)),
            }),
            Err(error) => {
                let shown = self_scrub(&settings, &error);
                debug!(error = %shown, "exe.dev probe failed");
                Ok(ProviderProbe {
                    ok: false,
                    summary: Some("exe.dev environment probe failed.".into()),
                    diagnostics: vec![paperclip_env_core::Diagnostic {
                        severity: paperclip_env_core::Severity::Error,
                        message: error.to_string(),
                        code: None,
                        details: None,
                    }],
                    metadata: Some(base(Some(error.to_string()), None)),
                })
            }
        }
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let s = self.settings(ctx)?;
        let name = vm_name(&s.config.name_prefix, &ctx.environment_id, &request.run_id);
        if s.config.reuse_lease
            && let Some(vm) = self.lookup(&s, &name).await?
        {
            return self.build_lease(&s, &vm, None, true).await;
        }
        self.create_prepared(&s, &name, None).await
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let s = self.settings(ctx)?;
        let gone = ProviderLease {
            provider_lease_id: None,
            metadata: Some(expired()),
            expires_at: None,
        };
        let Some(id) = lease.id() else {
            return Ok(gone);
        };
        match self.lookup(&s, id).await? {
            None => Ok(gone),
            Some(vm) => {
                self.build_lease(&s, &vm, lease.metadata_str("remoteCwd"), true)
                    .await
            }
        }
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let s = self.settings(ctx)?;
        if s.config.reuse_lease {
            self.drop_transport(id).await;
            return Ok(());
        }
        self.remove(&s, id).await
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let s = self.settings(ctx)?;
        self.remove(&s, id).await
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let cwd = lease
            .preferred_cwd(workspace)
            .unwrap_or_else(|| "/tmp/paperclip-workspace".into());
        if let Some(id) = lease.id() {
            let s = self.settings(ctx)?;
            self.mkdir(&s, &Self::vm_of(lease, id), &cwd).await?;
        }
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(KEY));
        metadata.insert("remoteCwd".into(), json!(cwd));
        Ok(RealizeWorkspaceResult {
            cwd,
            metadata: Some(metadata),
        })
    }

    async fn workspace_transport(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
    ) -> Result<Option<Arc<dyn paperclip_env_core::workspace::WorkspaceTransport>>> {
        let Some(id) = lease.id() else {
            return Ok(None);
        };
        let s = self.settings(ctx)?;
        Ok(Some(Arc::new(SshFiles(
            self.transport(&s, &Self::vm_of(lease, id)),
        ))))
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
        if let Some(bad) = request.env.keys().find(|k| !valid_env_key(k)) {
            return Err(Error::InvalidInput {
                what: "env",
                message: format!("Invalid exe.dev environment variable key: {bad}"),
            });
        }
        let s = self.settings(ctx)?;
        let vm = Self::vm_of(lease, id);
        let cwd = request
            .cwd
            .clone()
            .or_else(|| lease.metadata_str("remoteCwd").map(str::to_owned));
        let mut argv = vec![request.command.clone()];
        argv.extend(request.args.iter().cloned());
        let command = RemoteCommand {
            argv,
            cwd,
            env: request.env.clone(),
            stdin: request.stdin.as_ref().map(|s| s.as_bytes().to_vec()),
            timeout: Some(
                request
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or_else(|| Self::command_timeout(&s)),
            ),
            max_output_bytes: None,
        };
        let transport = self.transport(&s, &vm);
        let mut exit = transport
            .run(&command, output)
            .await
            .map_err(|e| ssh_error("execute commands on", &vm.name, e))?;
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("vmName".into(), json!(vm.name));
        md.insert("sshDest".into(), json!(vm.ssh_dest));
        exit.metadata = Some(md);
        Ok(exit)
    }
}

/// Workspace archives over the lease's SSH connection.
struct SshFiles(Arc<SshTransport>);

#[async_trait]
impl paperclip_env_core::workspace::WorkspaceTransport for SshFiles {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_commands() {
        assert_eq!(
            vm_name("paperclip", "env-1", "Run_ABC-123456789"),
            "paperclip-env1-runabc12"
        );
        assert!(vm_name("p", "", "--").starts_with("p-env-"));
        let mut c = ExeDevConfig::from_values(&JsonObject::new());
        c.env.insert("K".into(), "it's".into());
        c.prompt = Some("secret prompt".into());
        let (real, shown) = create_command(&c, "vm1");
        assert!(real.starts_with("new --json --no-email --name='vm1'"));
        assert!(real.contains(r"--env='K=it'\''s'"));
        assert!(shown.contains("--env='K=[REDACTED]'") && shown.contains("--prompt='[REDACTED]'"));
        assert!(!shown.contains("secret prompt"));
        assert!(shown.contains("nodesource"));
    }

    #[test]
    fn parses_nested_records() {
        let vm = parse_vm(
            &json!({"data": {"vm_name": "a", "ssh_dest": "vm+a@vm.exe.xyz"}}),
            0,
        )
        .unwrap();
        assert_eq!(vm.name, "a");
        assert_eq!(vm.ssh_dest, "vm+a@vm.exe.xyz");
        assert!(parse_vm(&json!({"ok": true}), 0).is_none());
    }

    #[test]
    fn failure_messages() {
        assert!(
            ssh_failure("inspect", "v", "", "Please enter your email address:")
                .contains("not registered")
        );
        assert!(
            ssh_failure("inspect", "v", "Load key \"k\": invalid format", "")
                .contains("OpenSSH-format")
        );
        assert_eq!(
            ssh_failure("inspect", "v", " boom ", ""),
            "Failed to inspect exe.dev VM v: boom"
        );
    }
}
