//! Daytona sandboxes (spec 22): the REST API for the sandbox lifecycle and
//! the toolbox daemon for commands (sessions with WebSocket log streaming)
//! and files.
//!
//! # How commands run (decisions, issue 19)
//!
//! The daemon gives each session one long-lived shell and writes every
//! command of the session into it, so the session's commands run one after
//! another and a command's `cd`/`export`/`exit` change the session. Upstream
//! runs all of a lease's commands in one session; against the real daemon
//! that queues a second execute behind a long first one, and a deadline
//! that deletes the session kills both. This provider instead:
//!
//! - keeps a **session pool** per lease: an execute takes an idle session or
//!   creates one when all are busy, and returns it only once its command has
//!   finished (at most 4 idle sessions are kept; extra ones are deleted).
//!   Concurrent executes therefore never share a shell, sequential ones reuse
//!   one (no session create per command), and a deadline deletes the timed-out
//!   command's own session, which runs nothing else. A session whose command
//!   failed mid-stream is deleted, never reused; a `session not found`
//!   empties the pool (the sandbox restarted) and the command is retried once
//!   in a new session. Release and destroy delete the pooled sessions.
//! - runs each command as `( ( <login script> ); status=$?; <trailer>; exit
//!   $status )`: nothing the command or the sourced profiles do (`cd`,
//!   variables, `exit`) reaches the session's shell.
//! - redirects stdin from the staged stdin file, or from `/dev/null` when the
//!   request has none: an async session command's stdin is a pipe the daemon
//!   holds open, so a reader would otherwise wait forever.
//! - recovers exact output from the daemon's per-line framing (every line is
//!   logged as marker + line + `\n`, so a last line without newline gains one):
//!   each command ends by printing `\n<random trailer>` on both streams; the
//!   byte before the trailer is the command's own, and live delivery holds
//!   back only what could still be the start of the trailer. NUL bytes are
//!   dropped by the daemon and cannot be recovered.
//! - opens the log WebSocket with an HTTP/1.1 upgrade sent by reqwest, not by
//!   tungstenite, whose TRACE log of the handshake would print the
//!   Authorization header.
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_providers::daytona::DaytonaProvider;
//! // Reads DAYTONA_API_KEY, DAYTONA_API_URL (or DAYTONA_SERVER_URL) and DAYTONA_TARGET.
//! let daytona = DaytonaProvider::from_env()?;
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(daytona)).build();
//! # Ok(()) }
//! ```

mod api;
mod config;
mod logs;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Diagnostic, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, OutputCollector, OutputStream,
    ProviderLease, ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, Severity,
    WorkspaceSpec,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, warn};

pub use config::{
    DAYTONA_DEFAULT_API_URL, DAYTONA_DEFAULT_LIVENESS_TIMEOUT_MS, DAYTONA_DEFAULT_TIMEOUT_MS,
    DaytonaConfig, DaytonaConfigSchema,
};

use api::{Api, Conn, OneShot, Sandbox, Toolbox, secs};
use logs::{Frame, Replay};

use crate::http::{HttpClient, HttpOptions};

const KEY: &str = "daytona";
/// Idle sessions kept per lease; more concurrent commands get sessions that
/// are deleted when they finish.
const MAX_IDLE_SESSIONS: usize = 4;
const SENTINEL_REL: &str = ".paperclip-runtime/reusable-sandbox-lease.json";
const SHELL_DETECT: &str =
    "if command -v bash >/dev/null 2>&1; then printf bash; else printf sh; fi";

fn env_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Builds a [`DaytonaProvider`].
#[derive(Clone, Default)]
pub struct DaytonaProviderBuilder {
    api_url: Option<String>,
    api_key: Option<SecretString>,
    target: Option<String>,
    http: HttpOptions,
    poll_interval: Option<Duration>,
    drain_window: Option<Duration>,
}

impl std::fmt::Debug for DaytonaProviderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaytonaProviderBuilder")
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl DaytonaProviderBuilder {
    /// Fills unset options from `DAYTONA_API_KEY`, `DAYTONA_API_URL` (else
    /// `DAYTONA_SERVER_URL`) and `DAYTONA_TARGET`.
    pub fn with_env(mut self) -> Self {
        self.api_key = self
            .api_key
            .or_else(|| env_var("DAYTONA_API_KEY").map(SecretString::from));
        self.api_url = self
            .api_url
            .or_else(|| env_var("DAYTONA_API_URL"))
            .or_else(|| env_var("DAYTONA_SERVER_URL"));
        self.target = self.target.or_else(|| env_var("DAYTONA_TARGET"));
        self
    }

    /// The API base URL used when a config has none.
    pub fn api_url(mut self, url: impl Into<String>) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// The API key used when a config has none.
    pub fn api_key(mut self, key: SecretString) -> Self {
        self.api_key = Some(key);
        self
    }

    /// The target used when a config has none.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// HTTP client settings.
    pub fn http_options(mut self, options: HttpOptions) -> Self {
        self.http = options;
        self
    }

    /// How often the command status is polled while streaming (default 500 ms).
    pub fn status_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// How long trailing log frames are awaited once a command has an exit
    /// code (default 1.5 s).
    pub fn drain_window(mut self, window: Duration) -> Self {
        self.drain_window = Some(window);
        self
    }

    /// Builds the provider.
    pub fn build(self) -> Result<DaytonaProvider> {
        let ws = logs::socket_client(self.http.connect_timeout)?;
        let http = HttpClient::new(KEY, self.http)?;
        Ok(DaytonaProvider {
            inner: Arc::new(Inner {
                http,
                ws,
                api_url: self.api_url,
                api_key: self.api_key,
                target: self.target,
                poll_interval: self.poll_interval.unwrap_or(Duration::from_millis(500)),
                drain_window: self.drain_window.unwrap_or(Duration::from_millis(1500)),
                sessions: Mutex::new(HashMap::new()),
                handles: Mutex::new(HashMap::new()),
                gates: Mutex::new(HashMap::new()),
            }),
        })
    }
}

struct Inner {
    http: HttpClient,
    /// HTTP/1.1 client for the log WebSocket (upgrades need HTTP/1.1).
    ws: reqwest::Client,
    api_url: Option<String>,
    api_key: Option<SecretString>,
    target: Option<String>,
    poll_interval: Duration,
    drain_window: Duration,
    /// Idle toolbox sessions per lease (the pool, see the module docs),
    /// keyed by account hash + lease id (never the secret itself).
    sessions: Mutex<HashMap<String, Vec<String>>>,
    /// Sandbox record per lease (same keys), refreshed after half the
    /// auto-stop interval (spec 22 §3.13).
    handles: Mutex<HashMap<String, (Sandbox, std::time::Instant)>>,
    /// Admission per lease: executes hold a read guard; teardown takes the
    /// write guard (waiting for running commands) and closes admission.
    gates: Mutex<HashMap<String, Arc<tokio::sync::RwLock<bool>>>>,
}

/// The Daytona provider. Cheap to clone.
#[derive(Clone)]
pub struct DaytonaProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DaytonaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaytonaProvider")
            .field("api_url", &self.inner.api_url)
            .field(
                "api_key",
                &self.inner.api_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

struct Settings {
    conn: Conn,
    config: DaytonaConfig,
    /// Hash of `{apiUrl, apiKey}` for keys of in-memory state.
    account: String,
}

impl Settings {
    fn seconds(&self) -> u64 {
        secs(self.config.timeout())
    }
}

/// Single-quotes a word for `sh`.
pub use paperclip_env_core::provider::support::shell_quote as quote;
use paperclip_env_core::provider::support::valid_env_key;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The login-shell script (spec 22 §3.10).
fn login_script(
    command: &str,
    args: &[String],
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
    stdin_path: Option<&str>,
) -> Result<String> {
    for key in env.keys() {
        if !valid_env_key(key) {
            return Err(Error::InvalidInput {
                what: "environment variable",
                message: format!("Invalid sandbox environment variable key: {key}"),
            });
        }
    }
    let mut vars: Vec<(String, String)> = [
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GCM_INTERACTIVE", "Never"),
        ("GIT_ASKPASS", "echo"),
        ("SSH_ASKPASS", "echo"),
        ("SSH_ASKPASS_REQUIRE", "force"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in env {
        match vars.iter_mut().find(|(existing, _)| existing == k) {
            Some(slot) => slot.1 = v.clone(),
            None => vars.push((k.clone(), v.clone())),
        }
    }
    let mut fragments = vec![
        "if [ -f /etc/profile ]; then . /etc/profile >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.profile\" ]; then . \"$HOME/.profile\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.bash_profile\" ]; then . \"$HOME/.bash_profile\" >/dev/null 2>&1 || true; elif [ -f \"$HOME/.bashrc\" ]; then . \"$HOME/.bashrc\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.zprofile\" ]; then . \"$HOME/.zprofile\" >/dev/null 2>&1 || true; fi".to_owned(),
    ];
    if let Some(cwd) = cwd.map(str::trim).filter(|c| !c.is_empty()) {
        fragments.push(format!("cd {}", quote(cwd)));
    }
    let assignments = vars
        .iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join(" ");
    let words = std::iter::once(command)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    // No stdin given: EOF, never the daemon's input pipe (held open for
    // async session commands, so a reader would wait forever).
    let last = format!(
        "env {assignments} {words} < {}",
        quote(stdin_path.unwrap_or("/dev/null"))
    );
    fragments.push(last);
    Ok(fragments.join(" && "))
}

/// Git network operations get at most two minutes (spec 22 §3.10).
const GIT_NETWORK_CAP_MS: u64 = 120_000;

fn is_git_network(command: &str, args: &[String]) -> bool {
    if command.rsplit('/').next() != Some("git") {
        return false;
    }
    let mut words = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "-C" | "-c" | "--git-dir" | "--work-tree" => {
                iter.next();
            }
            a if a.starts_with('-') => {}
            a => words.push(a),
        }
    }
    match words.as_slice() {
        [first, ..] if matches!(*first, "push" | "fetch" | "pull" | "ls-remote" | "clone") => true,
        ["remote", "update", ..] | ["submodule", "update", ..] => true,
        _ => false,
    }
}

impl DaytonaProvider {
    /// A builder.
    pub fn builder() -> DaytonaProviderBuilder {
        DaytonaProviderBuilder::default()
    }

    /// The provider configured from the environment.
    pub fn from_env() -> Result<Self> {
        Self::builder().with_env().build()
    }

    fn settings(&self, ctx: &CallContext) -> Result<Settings> {
        let config = DaytonaConfig::from_provider_config(&ctx.config);
        let api_key = config
            .api_key
            .clone()
            .or_else(|| self.inner.api_key.clone())
            .ok_or_else(|| {
                Error::invalid_field(
                    "apiKey",
                    "Daytona sandbox environments require an API key in config or DAYTONA_API_KEY.",
                )
            })?;
        let api_base = config
            .api_url
            .clone()
            .or_else(|| self.inner.api_url.clone())
            .unwrap_or_else(|| DAYTONA_DEFAULT_API_URL.to_owned());
        let target = config.target.clone().or_else(|| self.inner.target.clone());
        let mut hasher = Sha256::new();
        hasher.update(json!({"apiKey": api_key.expose_secret(), "apiUrl": api_base}).to_string());
        let account = hex(&hasher.finalize());
        let liveness = (config.liveness_timeout_ms > 0)
            .then(|| Duration::from_millis(config.liveness_timeout_ms as u64));
        Ok(Settings {
            conn: Conn {
                api_base,
                api_key,
                target,
                liveness,
            },
            config,
            account,
        })
    }

    fn api<'a>(&'a self, settings: &'a Settings) -> Api<'a> {
        Api {
            http: &self.inner.http,
            conn: &settings.conn,
        }
    }

    fn toolbox<'a>(&'a self, settings: &'a Settings, sandbox: &Sandbox) -> Toolbox<'a> {
        Toolbox::new(&self.inner.http, &self.inner.ws, &settings.conn, sandbox)
    }

    fn session_key(settings: &Settings, ctx: &CallContext, id: &str) -> String {
        format!(
            "{}|{}|{}|{id}",
            settings.account,
            ctx.company_id.as_deref().unwrap_or(""),
            ctx.environment_id
        )
    }

    fn gate(&self, key: &str) -> Arc<tokio::sync::RwLock<bool>> {
        self.inner
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    /// Waits for running commands on the lease, then sets whether new
    /// ones are refused.
    async fn set_closed(&self, key: &str, closed: bool) {
        let gate = self.gate(key);
        *gate.write().await = closed;
    }

    fn evict_handle(&self, key: &str) {
        self.inner
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn remember_handle(&self, key: &str, sandbox: &Sandbox) {
        self.inner
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), (sandbox.clone(), std::time::Instant::now()));
    }

    /// The cached sandbox record, or a fresh `GET`; `(sandbox, cache hit)`.
    /// A hit must be the lease's sandbox; failed lookups are never cached.
    async fn handle(&self, settings: &Settings, key: &str, id: &str) -> Result<(Sandbox, bool)> {
        let cached = self
            .inner
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        if let Some((sandbox, at)) = cached {
            if sandbox.id != id {
                self.evict_handle(key);
                return Err(Error::provider(
                    KEY,
                    format!(
                        "cached Daytona sandbox {} does not match lease {id}",
                        sandbox.id
                    ),
                ));
            }
            let stop_minutes = settings.config.auto_stop_interval;
            let fresh = stop_minutes <= 0
                || at.elapsed() < Duration::from_millis(stop_minutes as u64 * 30_000);
            if fresh {
                return Ok((sandbox, true));
            }
        }
        match self.get_or_gone(settings, id).await {
            Ok(sandbox) => {
                self.remember_handle(key, &sandbox);
                Ok((sandbox, false))
            }
            Err(error) => {
                self.evict_handle(key);
                Err(error)
            }
        }
    }

    /// Drops the lease's idle sessions from the pool; returns their ids.
    fn forget_session(&self, key: &str) -> Vec<String> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .unwrap_or_default()
    }

    /// An idle session of the lease, if the pool has one.
    fn checkout_session(&self, key: &str) -> Option<String> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)?
            .pop()
    }

    /// Returns a session whose command has finished to the pool; `Some` is
    /// a session beyond the pool's size, for the caller to delete.
    fn checkin_session(&self, key: &str, sid: String) -> Option<String> {
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let idle = sessions.entry(key.to_owned()).or_default();
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(sid);
            None
        } else {
            Some(sid)
        }
    }

    fn create_body(&self, settings: &Settings, ctx: &CallContext, run_id: Option<&str>) -> Value {
        let c = &settings.config;
        let language = c.language.clone().unwrap_or_else(|| "python".into());
        let mut labels = json!({
            "paperclip-provider": "daytona",
            "paperclip-company-id": ctx.company_id.clone().unwrap_or_default(),
            "paperclip-environment-id": ctx.environment_id,
            "paperclip-reuse-lease": if c.reuse_lease { "true" } else { "false" },
            "code-toolbox-language": language,
        });
        if let Some(run) = run_id {
            labels["paperclip-run-id"] = json!(run);
        }
        let mut body = json!({
            "env": {}, "labels": labels, "language": language,
            "autoStopInterval": c.auto_stop_interval,
            "autoArchiveInterval": c.auto_archive_interval,
            "autoDeleteInterval": c.auto_delete_interval,
        });
        if let Some(target) = &settings.conn.target {
            body["target"] = json!(target);
        }
        if let Some(image) = &c.image {
            body["buildInfo"] = json!({"dockerfileContent": format!("FROM {image}\n")});
            for (key, value) in [
                ("cpu", c.cpu),
                ("memory", c.memory),
                ("disk", c.disk),
                ("gpu", c.gpu),
            ] {
                if let Some(v) = value {
                    body[key] = config::num_json(v);
                }
            }
        } else if let Some(snapshot) = &c.snapshot {
            body["snapshot"] = json!(snapshot);
        }
        body
    }

    fn sentinel_token(settings: &Settings, ctx: &CallContext) -> String {
        let c = &settings.config;
        let opt = |n: Option<f64>| n.map(config::num_json).unwrap_or(Value::Null);
        let canonical: BTreeMap<&str, Value> = [
            ("provider", json!("daytona")),
            ("companyId", json!(ctx.company_id)),
            ("environmentId", json!(ctx.environment_id)),
            ("image", json!(c.image)),
            ("snapshot", json!(c.snapshot)),
            ("target", json!(settings.conn.target)),
            ("cpu", opt(c.cpu)),
            ("memory", opt(c.memory)),
            ("disk", opt(c.disk)),
            ("gpu", opt(c.gpu)),
        ]
        .into_iter()
        .collect();
        let text = serde_json::to_string(&canonical).unwrap_or_default();
        hex(&Sha256::digest(text.as_bytes()))
    }

    /// Working dir (spec 22 §3.2).
    async fn remote_cwd(&self, tb: &Toolbox<'_>) -> Result<String> {
        let root = match tb.dir("/work-dir").await? {
            Some(dir) => dir,
            None => tb
                .dir("/user-home-dir")
                .await?
                .unwrap_or_else(|| "/home/daytona".into()),
        };
        let cwd = format!("{}/paperclip-workspace", root.trim_end_matches('/'));
        tb.mkdir(&cwd).await?;
        Ok(cwd)
    }

    async fn detect_shell(&self, tb: &Toolbox<'_>, seconds: u64) -> &'static str {
        match tb.execute(SHELL_DETECT, seconds).await {
            Ok(OneShot::Done { result, .. }) if result.trim() == "bash" => "bash",
            _ => "sh",
        }
    }

    async fn write_sentinel(
        &self,
        tb: &Toolbox<'_>,
        settings: &Settings,
        ctx: &CallContext,
        cwd: &str,
    ) -> Result<Value> {
        let path = format!("{cwd}/{SENTINEL_REL}");
        if !settings.config.reuse_lease {
            return Ok(json!({"path": path, "token": null, "result": "skipped"}));
        }
        let token = Self::sentinel_token(settings, ctx);
        tb.mkdir(&format!("{cwd}/.paperclip-runtime")).await?;
        let content = serde_json::to_string_pretty(&json!({
            "version": 1, "token": token, "companyId": ctx.company_id,
            "environmentId": ctx.environment_id, "provider": "daytona",
            "writtenAt": iso_now(),
        }))
        .unwrap_or_default();
        tb.upload(
            &path,
            content.as_bytes(),
            Duration::from_secs(settings.seconds()),
        )
        .await?;
        Ok(json!({"path": path, "token": token, "result": "written"}))
    }

    /// Identity check of a reused sandbox (spec 22 §3.6). Stricter than
    /// upstream: the token is also recomputed from the current config, so a
    /// changed image/snapshot/target/resources is a `mismatch`.
    async fn verify_sentinel(
        &self,
        tb: &Toolbox<'_>,
        settings: &Settings,
        ctx: &CallContext,
        lease: &LeaseHandle,
        cwd: &str,
    ) -> Value {
        let recorded = lease
            .metadata
            .as_ref()
            .and_then(|m| m.get("workspaceSentinel"))
            .cloned()
            .unwrap_or(Value::Null);
        let path = recorded["path"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{cwd}/{SENTINEL_REL}"));
        let Some(expected) = recorded["token"].as_str() else {
            return json!({"path": path, "token": null, "result": "missing"});
        };
        if expected != Self::sentinel_token(settings, ctx) {
            return json!({"path": path, "token": expected, "result": "mismatch"});
        }
        let result = match tb
            .execute(&format!("cat {}", quote(&path)), settings.seconds())
            .await
        {
            Ok(OneShot::Done {
                exit_code: Some(0),
                result,
            }) => match serde_json::from_str::<Value>(&result) {
                Ok(v) if v["token"].as_str() == Some(expected) => "matched",
                _ => "mismatch",
            },
            _ => "missing",
        };
        json!({"path": path, "token": expected, "result": result})
    }

    /// Creates a sandbox and prepares it; deletes it on any failure after create.
    async fn create_prepared(
        &self,
        ctx: &CallContext,
        settings: &Settings,
        run_id: Option<&str>,
    ) -> Result<(Sandbox, String, &'static str, Value)> {
        let api = self.api(settings);
        let body = self.create_body(settings, ctx, run_id);
        let seconds = settings.seconds();
        let created = api.create(&body, Duration::from_secs(seconds + 30)).await?;
        let prepared = async {
            let sandbox = api.wait_started(&created.id, seconds).await?;
            let tb = self.toolbox(settings, &sandbox);
            let cwd = self.remote_cwd(&tb).await?;
            let shell = self.detect_shell(&tb, seconds).await;
            let sentinel = self.write_sentinel(&tb, settings, ctx, &cwd).await?;
            Ok::<_, Error>((sandbox, cwd, shell, sentinel))
        }
        .await;
        match prepared {
            Ok(done) => Ok(done),
            Err(error) => {
                if let Err(delete_error) = api.delete(&created.id).await {
                    warn!(sandbox = %created.id, error = %delete_error, "deleting the half-prepared sandbox failed");
                }
                Err(error)
            }
        }
    }

    fn lease_metadata(
        settings: &Settings,
        sandbox: &Sandbox,
        cwd: &str,
        shell: &str,
        sentinel: Value,
        resumed_from: Option<&str>,
    ) -> JsonObject {
        let c = &settings.config;
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!("daytona"));
        md.insert("shellCommand".into(), json!(shell));
        md.insert("sandboxId".into(), json!(sandbox.id));
        md.insert(
            "sandboxName".into(),
            json!(sandbox.name.clone().unwrap_or_else(|| sandbox.id.clone())),
        );
        md.insert("sandboxState".into(), json!("started"));
        md.insert("image".into(), json!(c.image));
        md.insert("snapshot".into(), json!(c.snapshot));
        md.insert(
            "target".into(),
            json!(
                settings
                    .conn
                    .target
                    .clone()
                    .or_else(|| sandbox.target.clone())
            ),
        );
        md.insert("timeoutMs".into(), json!(c.timeout_ms));
        md.insert("reuseLease".into(), json!(c.reuse_lease));
        md.insert("remoteCwd".into(), json!(cwd));
        md.insert("resumedLease".into(), json!(resumed_from.is_some()));
        if let Some(from) = resumed_from {
            md.insert("resumedFromState".into(), json!(from));
        }
        for (key, value) in [
            ("cpu", c.cpu),
            ("memory", c.memory),
            ("disk", c.disk),
            ("gpu", c.gpu),
        ] {
            if let Some(v) = value {
                md.insert(key.into(), config::num_json(v));
            }
        }
        if c.archive_on_release {
            md.insert("archiveOnRelease".into(), json!(true));
        }
        md.insert("workspaceSentinel".into(), sentinel);
        md
    }

    /// Ensure started (spec 22 §3.9).
    async fn ensure_started(
        &self,
        settings: &Settings,
        sandbox: Sandbox,
        seconds: u64,
    ) -> Result<Sandbox> {
        let api = self.api(settings);
        match sandbox.state() {
            "started" => Ok(sandbox),
            "error" if sandbox.recoverable == Some(true) => {
                api.recover(&sandbox.id, seconds).await?;
                api.wait_started(&sandbox.id, seconds).await
            }
            "error" | "build_failed" => Err(Error::provider(
                KEY,
                format!(
                    "Daytona sandbox {} is in an unrecoverable error state: {}",
                    sandbox.id,
                    sandbox.error_reason.as_deref().unwrap_or("unknown error")
                ),
            )),
            _ => {
                api.start(&sandbox.id, seconds).await?;
                api.wait_started(&sandbox.id, seconds).await
            }
        }
    }

    async fn get_or_gone(&self, settings: &Settings, id: &str) -> Result<Sandbox> {
        self.api(settings)
            .get(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("daytona: sandbox {id} not found")))
    }

    async fn teardown_session(&self, settings: &Settings, ctx: &CallContext, sandbox: &Sandbox) {
        let idle = self.forget_session(&Self::session_key(settings, ctx, &sandbox.id));
        if sandbox.state() != "started" {
            return;
        }
        let tb = self.toolbox(settings, sandbox);
        for sid in idle {
            if let Err(error) = tb.delete_session(&sid).await {
                debug!(%error, "deleting a pooled session failed");
            }
        }
    }

    /// Runs one command in a session of the lease's pool (spec 22 §3.11,
    /// module docs): an idle session, or a new one when every session is
    /// busy; back to the pool only once its command has finished.
    async fn run_in_session(
        &self,
        tb: &Toolbox<'_>,
        key: &str,
        script: &str,
        (timeout_ms, timeout_message): (u64, &str),
        output: &OutputCollector,
        accepted: &mut bool,
    ) -> Result<CommandExit> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let trailer = format!("paperclip-end-{}", uuid::Uuid::new_v4().simple());
        // Inner subshell: the command's `exit`, `cd`, `export` stay in it;
        // outer subshell: the status variable never reaches the session.
        let command = format!(
            "( ( {script} ); paperclip_status=$?; printf '\\n%s\\n' '{trailer}'; printf '\\n%s\\n' '{trailer}' >&2; exit $paperclip_status )"
        );
        let mut attempt = 0;
        let (sid, cid) = loop {
            let (sid, pooled) = match self.checkout_session(key) {
                Some(sid) => (sid, true),
                None => {
                    let sid = format!("paperclip-{}", uuid::Uuid::new_v4());
                    tb.create_session(&sid).await?;
                    (sid, false)
                }
            };
            match tb.exec_async(&sid, &command).await {
                Ok(Some(cid)) => {
                    *accepted = true;
                    break (sid, cid);
                }
                // The sandbox restarted behind our back: its sessions are
                // gone, pooled or not.
                Ok(None) if attempt == 0 => {
                    debug!(pooled, "session not found; opening a new one");
                    self.forget_session(key);
                    attempt += 1;
                }
                Ok(None) => return Err(Error::provider(KEY, "session exec: session not found")),
                Err(error) => {
                    // A failed start may still have reached the session's
                    // shell (a reset after the request went out): never
                    // queue a later command behind it.
                    if let Err(e) = tb.delete_session(&sid).await {
                        debug!(error = %e, "deleting the session of a refused exec failed");
                    }
                    return Err(error);
                }
            }
        };
        let mut streams = logs::Streams::new(&trailer);
        let followed =
            tokio::time::timeout_at(deadline, self.follow(tb, &sid, &cid, output, &mut streams))
                .await;
        let exit_code = match followed {
            Ok(Ok(code)) => code,
            Ok(Err(error)) => {
                // The command may still run there: never hand this session
                // to another command.
                if let Err(e) = tb.delete_session(&sid).await {
                    debug!(error = %e, "deleting the session of a failed command failed");
                }
                return Err(error);
            }
            Err(_) => {
                // Deadline: delete this command's own session (kills it and
                // nothing else: no other command runs in it).
                streams.flush(output);
                output.stderr(format!("{timeout_message}\n").as_bytes());
                if let Err(error) = tb.delete_session(&sid).await {
                    debug!(%error, "deleting the timed-out session failed");
                }
                return Ok(CommandExit {
                    exit_code: None,
                    timed_out: true,
                    ..Default::default()
                });
            }
        };
        let logs = tb.command_logs(&sid, &cid).await;
        if let Some(extra) = self.checkin_session(key, sid)
            && let Err(error) = tb.delete_session(&extra).await
        {
            debug!(%error, "deleting a session beyond the pool size failed");
        }
        let (stdout, stderr) = logs?;
        output.reconcile(OutputStream::Stdout, streams.exact(stdout.as_bytes()));
        output.reconcile(OutputStream::Stderr, streams.exact(stderr.as_bytes()));
        Ok(CommandExit {
            exit_code,
            ..Default::default()
        })
    }

    /// Streams the logs until the command ends; returns its exit code.
    async fn follow(
        &self,
        tb: &Toolbox<'_>,
        sid: &str,
        cid: &str,
        output: &OutputCollector,
        streams: &mut logs::Streams,
    ) -> Result<Option<i32>> {
        let path = format!("/process/session/{sid}/command/{cid}/logs?follow=true");
        let mut failures = 0;
        let mut exit: Option<i32> = None;
        while failures < 2 {
            let mut socket = match tb.open_socket(&path).await {
                Ok(s) => s,
                Err(error) => {
                    debug!(%error, "log stream connect failed");
                    failures += 1;
                    continue;
                }
            };
            let mut replay = Replay::new();
            let mut ticker = tokio::time::interval(self.inner.poll_interval);
            ticker.tick().await;
            let mut drain_until: Option<Instant> = None;
            let ended_normally = loop {
                let sleep_drain = async {
                    match drain_until {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    frame = logs::next(&mut socket) => match frame {
                        Frame::Data(bytes) => replay.feed(&bytes, streams, output),
                        Frame::Closed => break true,
                        Frame::Failed => break false,
                    },
                    _ = ticker.tick(), if exit.is_none() => {
                        if let Some(code) = tb.command_exit(sid, cid).await? {
                            exit = Some(code);
                            drain_until = Some(Instant::now() + self.inner.drain_window);
                        }
                    },
                    _ = sleep_drain => {
                        let _ = socket.close(None).await;
                        break true;
                    }
                }
            };
            if ended_normally {
                if exit.is_some() {
                    return Ok(exit);
                }
                for wait in [0u64, 50, 100, 200] {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    if let Some(code) = tb.command_exit(sid, cid).await? {
                        return Ok(Some(code));
                    }
                }
                return Ok(None);
            }
            failures += 1;
        }
        // Streaming failed twice: poll.
        loop {
            if let Some(code) = tb.command_exit(sid, cid).await? {
                return Ok(Some(code));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Current time as ISO-8601 (UTC, seconds).
fn iso_now() -> String {
    paperclip_env_core::time::now().to_rfc3339()
}

fn expired(extra: Option<(&str, Value)>) -> ProviderLease {
    let mut md = JsonObject::new();
    md.insert("expired".into(), json!(true));
    if let Some((k, v)) = extra {
        md.insert(k.into(), v);
    }
    ProviderLease {
        provider_lease_id: None,
        metadata: Some(md),
        expires_at: None,
    }
}

#[async_trait]
impl SandboxProvider for DaytonaProvider {
    fn key(&self) -> &str {
        KEY
    }

    /// Paperclip 2026.916's plugin id for this provider.
    fn plugin_key(&self) -> String {
        format!("paperclip.{}-sandbox-provider", self.key())
    }

    fn default_lease_deadline(&self) -> Option<Duration> {
        // Acquire waits up to the default `timeoutMs` for `started` (spec 22
        // §5.3), plus the create call and the toolbox preparation calls.
        Some(Duration::from_millis(DAYTONA_DEFAULT_TIMEOUT_MS) + Duration::from_secs(60))
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
            signals: false,
            run_lookup: true,
        }
    }

    async fn workspace_transport(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
    ) -> Result<Option<std::sync::Arc<dyn paperclip_env_core::workspace::WorkspaceTransport>>> {
        if lease.id().is_none() {
            return Ok(None);
        }
        Ok(Some(std::sync::Arc::new(ToolboxFiles {
            provider: self.clone(),
            ctx: ctx.clone(),
            lease: lease.clone(),
        })))
    }

    fn config_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(DaytonaConfigSchema))
            .unwrap_or_else(|_| json!({"type": "object"}))
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let issues = DaytonaConfig::validate(config, self.inner.api_key.is_some());
        Ok(if issues.is_empty() {
            ConfigValidation::valid(DaytonaConfig::normalized(config))
        } else {
            ConfigValidation::invalid(issues)
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let c = DaytonaConfig::from_provider_config(&ctx.config);
        let failure = |error: &Error| {
            let message = ctx.config.scrub(&error.to_string());
            let mut md = JsonObject::new();
            md.insert("provider".into(), json!(KEY));
            md.insert("image".into(), json!(c.image));
            md.insert("snapshot".into(), json!(c.snapshot));
            md.insert("timeoutMs".into(), json!(c.timeout_ms));
            md.insert("reuseLease".into(), json!(c.reuse_lease));
            md.insert("error".into(), json!(message));
            ProviderProbe {
                ok: false,
                summary: Some("Daytona sandbox probe failed.".into()),
                diagnostics: vec![Diagnostic {
                    severity: Severity::Error,
                    message,
                    code: None,
                    details: None,
                }],
                metadata: Some(md),
            }
        };
        let settings = match self.settings(ctx) {
            Ok(s) => s,
            Err(e) => return Ok(failure(&e)),
        };
        let api = self.api(&settings);
        let seconds = settings.seconds();
        let created = match api
            .create(
                &self.create_body(&settings, ctx, None),
                Duration::from_secs(seconds + 30),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return Ok(failure(&e)),
        };
        let checked = async {
            let sandbox = api.wait_started(&created.id, seconds).await?;
            let tb = self.toolbox(&settings, &sandbox);
            let cwd = self.remote_cwd(&tb).await?;
            let shell = self.detect_shell(&tb, seconds).await;
            Ok::<_, Error>((sandbox, cwd, shell))
        }
        .await;
        if let Err(error) = api.delete(&created.id).await {
            warn!(sandbox = %created.id, %error, "deleting the probe sandbox failed");
        }
        match checked {
            Ok((sandbox, cwd, shell)) => {
                let name = sandbox.name.clone().unwrap_or_else(|| sandbox.id.clone());
                let mut md = JsonObject::new();
                md.insert("provider".into(), json!(KEY));
                md.insert("shellCommand".into(), json!(shell));
                md.insert("sandboxId".into(), json!(sandbox.id));
                md.insert("sandboxName".into(), json!(name));
                md.insert("target".into(), json!(settings.conn.target));
                md.insert("image".into(), json!(c.image));
                md.insert("snapshot".into(), json!(c.snapshot));
                md.insert("timeoutMs".into(), json!(c.timeout_ms));
                md.insert("reuseLease".into(), json!(c.reuse_lease));
                md.insert("remoteCwd".into(), json!(cwd));
                Ok(ProviderProbe {
                    ok: true,
                    summary: Some(format!("Connected to Daytona sandbox {name}.")),
                    diagnostics: Vec::new(),
                    metadata: Some(md),
                })
            }
            Err(error) => Ok(failure(&error)),
        }
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let settings = self.settings(ctx)?;
        let (sandbox, cwd, shell, sentinel) = self
            .create_prepared(ctx, &settings, Some(&request.run_id))
            .await?;
        let md = Self::lease_metadata(&settings, &sandbox, &cwd, shell, sentinel, None);
        Ok(ProviderLease::new(sandbox.id.clone(), md))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let settings = self.settings(ctx)?;
        let Some(id) = lease.id() else {
            return Ok(expired(None));
        };
        let key = Self::session_key(&settings, ctx, id);
        self.evict_handle(&key);
        let Some(sandbox) = self.api(&settings).get(id).await? else {
            return Ok(expired(None));
        };
        if sandbox.state() != "started" {
            self.forget_session(&Self::session_key(&settings, ctx, id));
        }
        let from = sandbox.state().to_owned();
        // Transient errors propagate; the sandbox is never deleted here.
        let sandbox = self
            .ensure_started(&settings, sandbox, settings.seconds())
            .await?;
        let tb = self.toolbox(&settings, &sandbox);
        let cwd = self.remote_cwd(&tb).await?;
        let sentinel = self.verify_sentinel(&tb, &settings, ctx, lease, &cwd).await;
        if sentinel["result"] != "matched" {
            return Ok(expired(Some(("workspaceSentinel", sentinel))));
        }
        let shell = self.detect_shell(&tb, settings.seconds()).await;
        let md = Self::lease_metadata(&settings, &sandbox, &cwd, shell, sentinel, Some(&from));
        self.set_closed(&key, false).await;
        Ok(ProviderLease::new(id, md))
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let settings = self.settings(ctx)?;
        let key = Self::session_key(&settings, ctx, id);
        self.set_closed(&key, true).await;
        self.evict_handle(&key);
        let api = self.api(&settings);
        let Some(sandbox) = api.get(id).await? else {
            self.forget_session(&Self::session_key(&settings, ctx, id));
            return Ok(());
        };
        self.teardown_session(&settings, ctx, &sandbox).await;
        let seconds = settings.seconds();
        if settings.config.reuse_lease {
            let stopped = async {
                if !matches!(sandbox.state(), "stopped" | "archived") {
                    api.stop(id, seconds).await?;
                    api.wait_stopped(id, seconds).await?;
                }
                Ok::<_, Error>(())
            }
            .await;
            match stopped {
                Ok(()) => return Ok(()),
                Err(error) => {
                    warn!(sandbox = id, %error, "stopping the reusable sandbox failed; deleting it")
                }
            }
        }
        if settings.config.archive_on_release {
            let archived = async {
                if !matches!(sandbox.state(), "stopped" | "archived") {
                    api.stop(id, seconds).await?;
                    api.wait_stopped(id, seconds).await?;
                }
                api.set_auto_delete(id, 60).await?;
                api.archive(id, seconds).await
            }
            .await;
            match archived {
                Ok(()) => return Ok(()),
                Err(error) => {
                    warn!(sandbox = id, %error, "archiving the sandbox failed; deleting it")
                }
            }
        }
        api.delete(id).await.map(|_| ())
    }

    /// The run's sandboxes, found by the labels `acquire` set
    /// (`paperclip-run-id`, with the provider and environment labels).
    async fn list_run_resources(
        &self,
        ctx: &CallContext,
        run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        let settings = self.settings(ctx)?;
        let labels = json!({
            "paperclip-provider": KEY,
            "paperclip-environment-id": ctx.environment_id,
            "paperclip-run-id": run_id,
        });
        let sandboxes = self.api(&settings).list(&labels).await?;
        Ok(sandboxes
            .into_iter()
            .filter(|s| !matches!(s.state(), "destroyed" | "destroying"))
            .map(|s| LeaseHandle {
                provider_lease_id: Some(s.id),
                ..Default::default()
            })
            .collect())
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let settings = self.settings(ctx)?;
        let key = Self::session_key(&settings, ctx, id);
        self.set_closed(&key, true).await;
        self.evict_handle(&key);
        let api = self.api(&settings);
        if let Some(sandbox) = api.get(id).await? {
            self.teardown_session(&settings, ctx, &sandbox).await;
        }
        api.delete(id).await.map(|_| ())
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let settings = self.settings(ctx)?;
        let cwd = lease
            .metadata_str("remoteCwd")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| workspace.remote_path.clone())
            .or_else(|| workspace.local_path.clone())
            .unwrap_or_else(|| "/paperclip-workspace".to_owned());
        if let Some(id) = lease.id() {
            let sandbox = self.get_or_gone(&settings, id).await?;
            let sandbox = self
                .ensure_started(&settings, sandbox, settings.seconds())
                .await?;
            self.toolbox(&settings, &sandbox).mkdir(&cwd).await?;
        }
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("remoteCwd".into(), json!(cwd));
        Ok(RealizeWorkspaceResult {
            cwd,
            metadata: Some(md),
        })
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let settings = self.settings(ctx)?;
        let Some(id) = lease.id() else {
            output.stderr(b"No provider lease ID available for execution.");
            return Ok(CommandExit::code(1));
        };
        let stdin_path = request
            .stdin
            .as_ref()
            .map(|_| format!("/tmp/paperclip-stdin-{}", uuid::Uuid::new_v4()));
        let cwd = request
            .cwd
            .clone()
            .or_else(|| lease.metadata_str("remoteCwd").map(str::to_owned));
        let script = login_script(
            &request.command,
            &request.args,
            cwd.as_deref(),
            &request.env,
            stdin_path.as_deref(),
        )?;
        let timeout_ms = request
            .timeout_ms
            .filter(|t| *t > 0)
            .unwrap_or_else(|| settings.config.timeout());
        let git_network = is_git_network(&request.command, &request.args);
        let timeout_ms = if git_network {
            timeout_ms.min(GIT_NETWORK_CAP_MS)
        } else {
            timeout_ms
        };
        let timeout_message = if git_network {
            format!(
                "Git network operation timed out after {} s — the remote may be unreachable or noninteractive credentials are not configured.",
                secs(timeout_ms)
            )
        } else {
            format!("Command timed out after {} s.", secs(timeout_ms))
        };
        let key = Self::session_key(&settings, ctx, id);
        let gate = self.gate(&key);
        let admitted = gate.read().await;
        if *admitted {
            return Err(Error::not_found(format!(
                "Daytona sandbox lease {id} is no longer active."
            )));
        }
        let started = Instant::now();
        let mut attempt = 0;
        let (result, hit) = loop {
            let (sandbox, hit) = self.handle(&settings, &key, id).await?;
            if sandbox.state() != "started" {
                self.forget_session(&key);
            }
            let sandbox = match self
                .ensure_started(&settings, sandbox, secs(timeout_ms))
                .await
            {
                Ok(sandbox) => sandbox,
                Err(error) => {
                    self.evict_handle(&key);
                    return Err(error);
                }
            };
            self.remember_handle(&key, &sandbox);
            let tb = self.toolbox(&settings, &sandbox);
            let mut accepted = false;
            let result = match (&stdin_path, &request.stdin) {
                (Some(path), Some(stdin)) => {
                    tb.upload(path, stdin.as_bytes(), Duration::from_millis(timeout_ms))
                        .await
                }
                _ => Ok(()),
            };
            let result = match result {
                Ok(()) => {
                    self.run_in_session(
                        &tb,
                        &key,
                        &script,
                        (timeout_ms, &timeout_message),
                        output,
                        &mut accepted,
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            if let Some(path) = &stdin_path
                && let Err(error) = tb.delete_file(path).await
            {
                debug!(%error, "removing the staged stdin file failed");
            }
            match result {
                // The command never started: if the sandbox stopped behind
                // our back (auto-stop, stale handle), start it and retry once.
                Err(error) if !accepted && attempt == 0 => {
                    self.evict_handle(&key);
                    match self.api(&settings).get(id).await {
                        Ok(Some(fresh)) if fresh.state() != "started" => {
                            debug!(sandbox = id, state = fresh.state(), %error, "sandbox not started; retrying once");
                            self.forget_session(&key);
                            attempt += 1;
                        }
                        _ => break (Err(error), hit),
                    }
                }
                other => break (other, hit),
            }
        };
        let mut exit = result?;
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("sandboxId".into(), json!(id));
        md.insert("cacheHit".into(), json!(hit));
        md.insert(
            "durationMs".into(),
            json!(started.elapsed().as_millis() as u64),
        );
        exit.metadata = Some(md);
        Ok(exit)
    }
}

impl DaytonaProvider {
    /// Runs `command` once through `process/execute` (no session): the
    /// host's provisioning path. stdout and stderr come back combined as
    /// stdout; a daemon 408 becomes `timed_out`.
    pub async fn execute_one_shot(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let settings = self.settings(ctx)?;
        let id = lease
            .id()
            .ok_or_else(|| Error::not_found("daytona: no provider lease id"))?;
        let cwd = request
            .cwd
            .clone()
            .or_else(|| lease.metadata_str("remoteCwd").map(str::to_owned));
        let script = login_script(
            &request.command,
            &request.args,
            cwd.as_deref(),
            &request.env,
            None,
        )?;
        let timeout_ms = request
            .timeout_ms
            .filter(|t| *t > 0)
            .unwrap_or_else(|| settings.config.timeout());
        let sandbox = self.get_or_gone(&settings, id).await?;
        let sandbox = self
            .ensure_started(&settings, sandbox, secs(timeout_ms))
            .await?;
        match self
            .toolbox(&settings, &sandbox)
            .execute(&script, secs(timeout_ms))
            .await?
        {
            OneShot::Done { exit_code, result } => {
                output.stdout(result.as_bytes());
                Ok(CommandExit {
                    exit_code: Some(exit_code.unwrap_or(1)),
                    ..Default::default()
                })
            }
            OneShot::TimedOut(message) => {
                output.stderr(format!("{message}\n").as_bytes());
                Ok(CommandExit {
                    exit_code: None,
                    timed_out: true,
                    ..Default::default()
                })
            }
        }
    }

    /// Uploads a file into the lease's sandbox (workspace transfer).
    pub async fn upload_file(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        path: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let settings = self.settings(ctx)?;
        let id = lease
            .id()
            .ok_or_else(|| Error::not_found("daytona: no provider lease id"))?;
        let sandbox = self.get_or_gone(&settings, id).await?;
        let sandbox = self
            .ensure_started(&settings, sandbox, settings.seconds())
            .await?;
        self.toolbox(&settings, &sandbox)
            .upload(path, bytes, Duration::from_secs(settings.seconds()))
            .await
    }

    /// Downloads a file from the lease's sandbox (workspace transfer). A
    /// missing sandbox fails with exactly `daytona_sandbox_not_found`.
    pub async fn download_file(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        path: &str,
    ) -> Result<Vec<u8>> {
        let settings = self.settings(ctx)?;
        let id = lease
            .id()
            .ok_or_else(|| Error::not_found("daytona_sandbox_not_found"))?;
        let Some(sandbox) = self.api(&settings).get(id).await? else {
            return Err(Error::not_found("daytona_sandbox_not_found"));
        };
        let sandbox = self
            .ensure_started(&settings, sandbox, settings.seconds())
            .await?;
        self.toolbox(&settings, &sandbox)
            .download(path, Duration::from_secs(settings.seconds()))
            .await
    }
}

/// Workspace archives through the toolbox file API instead of base64 over exec.
struct ToolboxFiles {
    provider: DaytonaProvider,
    ctx: CallContext,
    lease: LeaseHandle,
}

impl ToolboxFiles {
    fn timed_out(what: &str, timeout_ms: u64) -> Error {
        Error::Timeout {
            operation: format!("daytona {what}"),
            after: Duration::from_millis(timeout_ms),
        }
    }
}

#[async_trait]
impl paperclip_env_core::workspace::WorkspaceTransport for ToolboxFiles {
    fn name(&self) -> &str {
        "daytona-files"
    }

    async fn put_file(&self, local: &std::path::Path, remote: &str, timeout_ms: u64) -> Result<()> {
        let data = tokio::fs::read(local).await.map_err(|e| {
            Error::provider_with_source(
                "daytona",
                format!("reading {} failed", local.display()),
                false,
                e,
            )
        })?;
        tokio::time::timeout(
            Duration::from_millis(timeout_ms.max(1)),
            self.provider
                .upload_file(&self.ctx, &self.lease, remote, &data),
        )
        .await
        .map_err(|_| Self::timed_out("file upload", timeout_ms))?
    }

    async fn get_file(&self, remote: &str, local: &std::path::Path, timeout_ms: u64) -> Result<()> {
        let data = tokio::time::timeout(
            Duration::from_millis(timeout_ms.max(1)),
            self.provider.download_file(&self.ctx, &self.lease, remote),
        )
        .await
        .map_err(|_| Self::timed_out("file download", timeout_ms))??;
        tokio::fs::write(local, data).await.map_err(|e| {
            Error::provider_with_source(
                "daytona",
                format!("writing {} failed", local.display()),
                false,
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_network_detection() {
        let a = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(is_git_network(
            "git",
            &a(&["-C", "/repo", "push", "origin"])
        ));
        assert!(is_git_network("/usr/bin/git", &a(&["-c", "x=y", "fetch"])));
        assert!(is_git_network("git", &a(&["remote", "update"])));
        assert!(is_git_network(
            "git",
            &a(&["submodule", "update", "--init"])
        ));
        assert!(!is_git_network("git", &a(&["status"])));
        assert!(!is_git_network("git", &a(&["remote", "-v"])));
        assert!(!is_git_network("sh", &a(&["-c", "git push"])));
    }

    #[test]
    fn script_shape() {
        let mut env = BTreeMap::new();
        env.insert("FOO".to_owned(), "bar".to_owned());
        let s = login_script("printf", &["hello".into()], Some("/workspace"), &env, None).unwrap();
        assert!(
            s.contains("/etc/profile") && s.contains("cd '/workspace'") && !s.contains("exec ")
        );
        assert!(s.ends_with("&& env GIT_TERMINAL_PROMPT='0' GCM_INTERACTIVE='Never' GIT_ASKPASS='echo' SSH_ASKPASS='echo' SSH_ASKPASS_REQUIRE='force' FOO='bar' 'printf' 'hello' < '/dev/null'"), "{s}");
        env.insert("1BAD".into(), "x".into());
        assert!(login_script("x", &[], None, &env, None).is_err());
    }
}
