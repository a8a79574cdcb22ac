//! E2B sandboxes (spec 20) and Novita Agent Sandbox (spec 21): one protocol
//! client (control-plane REST plus the in-sandbox envd Connect-RPC API)
//! parameterised by a [`Flavor`].
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_providers::e2b::E2bProvider;
//! // Reads E2B_API_KEY, E2B_DOMAIN, E2B_API_URL and E2B_SANDBOX_URL.
//! let e2b = E2bProvider::from_env()?;
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(e2b)).build();
//! # Ok(()) }
//! ```

mod api;
mod config;
mod connect;
mod envd;
mod script;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, OutputCollector, ProviderLease,
    ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, WorkspaceSpec,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use tracing::{debug, warn};

pub use config::{
    E2B_DEFAULT_TIMEOUT_MS, E2bConfig, E2bConfigSchema, NOVITA_DEFAULT_CWD,
    NOVITA_DEFAULT_REQUEST_TIMEOUT_MS, NOVITA_DEFAULT_TIMEOUT_MS, NovitaConfig, NovitaConfigSchema,
};
pub use script::quote;

use api::{Api, ApiConn, PauseOutcome, SandboxInfo};
use envd::{Envd, EnvdTarget, Run, run_captured};

use crate::http::{HttpClient, HttpOptions};

/// Which service the client speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// E2B (`e2b.app`).
    E2b,
    /// Novita Agent Sandbox (`us-phx-1.sandbox.novita.ai`).
    Novita,
}

impl Flavor {
    /// The provider key.
    pub fn key(self) -> &'static str {
        match self {
            Flavor::E2b => "e2b",
            Flavor::Novita => "novita",
        }
    }

    fn default_domain(self) -> &'static str {
        match self {
            Flavor::E2b => "e2b.app",
            Flavor::Novita => "us-phx-1.sandbox.novita.ai",
        }
    }

    fn env(self, what: &str) -> String {
        match self {
            Flavor::E2b => format!("E2B_{what}"),
            Flavor::Novita => format!("NOVITA_{what}"),
        }
    }

    fn routing_headers(self) -> (&'static str, &'static str) {
        match self {
            Flavor::E2b => ("e2b-sandbox-id", "e2b-sandbox-port"),
            Flavor::Novita => ("novita-sandbox-id", "novita-sandbox-port"),
        }
    }

    fn missing_key_message(self) -> &'static str {
        match self {
            Flavor::E2b => "E2B sandbox environments require an API key in config or E2B_API_KEY.",
            Flavor::Novita => {
                "Novita sandbox environments require an API key in config or NOVITA_API_KEY."
            }
        }
    }
}

/// Builds an [`E2bProvider`].
#[derive(Clone)]
pub struct E2bProviderBuilder {
    flavor: Flavor,
    domain: Option<String>,
    api_url: Option<String>,
    sandbox_url: Option<String>,
    api_key: Option<SecretString>,
    http: HttpOptions,
    keepalive_secs: u64,
}

impl std::fmt::Debug for E2bProviderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bProviderBuilder")
            .field("flavor", &self.flavor)
            .field("domain", &self.domain)
            .field("api_url", &self.api_url)
            .field("sandbox_url", &self.sandbox_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl E2bProviderBuilder {
    fn new(flavor: Flavor) -> Self {
        E2bProviderBuilder {
            flavor,
            domain: None,
            api_url: None,
            sandbox_url: None,
            api_key: None,
            http: HttpOptions::default(),
            keepalive_secs: 50,
        }
    }

    /// Fills unset options from the environment (`<P>_DOMAIN`, `<P>_API_URL`,
    /// `<P>_SANDBOX_URL`, `<P>_API_KEY`, with `P` = `E2B` or `NOVITA`).
    pub fn with_env(mut self) -> Self {
        let f = self.flavor;
        self.domain = self.domain.or_else(|| env_var(&f.env("DOMAIN")));
        self.api_url = self.api_url.or_else(|| env_var(&f.env("API_URL")));
        self.sandbox_url = self.sandbox_url.or_else(|| env_var(&f.env("SANDBOX_URL")));
        self.api_key = self
            .api_key
            .or_else(|| env_var(&f.env("API_KEY")).map(SecretString::from));
        self
    }

    /// The service domain (`api.<domain>` and `49983-<id>.<domain>`).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The control-plane base URL (overrides the domain).
    pub fn api_url(mut self, url: impl Into<String>) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// One base URL for every envd request, routed by the sandbox-id header.
    pub fn sandbox_url(mut self, url: impl Into<String>) -> Self {
        self.sandbox_url = Some(url.into());
        self
    }

    /// The API key used when a config has none.
    pub fn api_key(mut self, key: SecretString) -> Self {
        self.api_key = Some(key);
        self
    }

    /// HTTP client settings.
    pub fn http_options(mut self, options: HttpOptions) -> Self {
        self.http = options;
        self
    }

    /// Seconds of silence after which envd sends a keepalive (default 50).
    pub fn keepalive_secs(mut self, secs: u64) -> Self {
        self.keepalive_secs = secs.max(1);
        self
    }

    /// Builds the provider.
    pub fn build(self) -> Result<E2bProvider> {
        let http = HttpClient::new(self.flavor.key(), self.http)?;
        Ok(E2bProvider {
            inner: Arc::new(Inner {
                flavor: self.flavor,
                http,
                domain: self.domain,
                api_url: self.api_url,
                sandbox_url: self.sandbox_url,
                api_key: self.api_key,
                keepalive_secs: self.keepalive_secs,
                // Novita serves the v1 routes; E2B learns from its first answer.
                api_generation: std::sync::atomic::AtomicU8::new(match self.flavor {
                    Flavor::E2b => api::GENERATION_UNKNOWN,
                    Flavor::Novita => api::GENERATION_V1,
                }),
            }),
        })
    }
}

struct Inner {
    flavor: Flavor,
    http: HttpClient,
    domain: Option<String>,
    api_url: Option<String>,
    sandbox_url: Option<String>,
    api_key: Option<SecretString>,
    keepalive_secs: u64,
    api_generation: std::sync::atomic::AtomicU8,
}

/// The E2B (or Novita) provider. Cheap to clone.
#[derive(Clone)]
pub struct E2bProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for E2bProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bProvider")
            .field("flavor", &self.inner.flavor)
            .field("domain", &self.inner.domain)
            .field("api_url", &self.inner.api_url)
            .field("sandbox_url", &self.inner.sandbox_url)
            .field(
                "api_key",
                &self.inner.api_key.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

/// Per-call settings resolved from config and builder.
#[derive(Clone)]
struct Settings {
    conn: ApiConn,
    timeout_ms: u64,
    reuse_lease: bool,
    flavor_config: FlavorConfig,
}

#[derive(Clone)]
enum FlavorConfig {
    E2b(E2bConfig),
    Novita(NovitaConfig),
}

impl E2bProvider {
    /// A builder for E2B.
    pub fn builder() -> E2bProviderBuilder {
        E2bProviderBuilder::new(Flavor::E2b)
    }

    /// A builder for Novita Agent Sandbox.
    #[cfg(feature = "novita")]
    #[cfg_attr(docsrs, doc(cfg(feature = "novita")))]
    pub fn novita() -> E2bProviderBuilder {
        E2bProviderBuilder::new(Flavor::Novita)
    }

    /// E2B configured from the environment.
    pub fn from_env() -> Result<Self> {
        Self::builder().with_env().build()
    }

    /// Novita configured from the environment.
    #[cfg(feature = "novita")]
    #[cfg_attr(docsrs, doc(cfg(feature = "novita")))]
    pub fn novita_from_env() -> Result<Self> {
        Self::novita().with_env().build()
    }

    /// Which service this provider speaks to.
    pub fn flavor(&self) -> Flavor {
        self.inner.flavor
    }

    fn settings(&self, ctx: &CallContext) -> Result<Settings> {
        let inner = &self.inner;
        let (flavor_config, api_key, domain, timeout_ms, request_timeout, reuse_lease) =
            match inner.flavor {
                Flavor::E2b => {
                    let c = E2bConfig::from_provider_config(&ctx.config);
                    let key = c.api_key.clone();
                    (
                        FlavorConfig::E2b(c.clone()),
                        key,
                        None,
                        c.timeout_ms,
                        inner.http.options().request_timeout,
                        c.reuse_lease,
                    )
                }
                Flavor::Novita => {
                    let c = NovitaConfig::from_provider_config(&ctx.config);
                    let key = c.api_key.clone();
                    let domain = c.domain.clone();
                    let rt = Duration::from_millis(c.request_timeout_ms);
                    (
                        FlavorConfig::Novita(c.clone()),
                        key,
                        domain,
                        c.timeout_ms,
                        rt,
                        c.reuse_lease,
                    )
                }
            };
        let api_key = api_key
            .or_else(|| inner.api_key.clone())
            .ok_or_else(|| Error::invalid_field("apiKey", inner.flavor.missing_key_message()))?;
        let domain = domain
            .or_else(|| inner.domain.clone())
            .unwrap_or_else(|| inner.flavor.default_domain().to_owned());
        let api_base = match (&inner.api_url, inner.flavor) {
            (Some(url), _) => url.clone(),
            (None, _) => format!("https://api.{domain}"),
        };
        Ok(Settings {
            conn: ApiConn {
                api_base,
                domain,
                api_key,
                request_timeout,
            },
            timeout_ms,
            reuse_lease,
            flavor_config,
        })
    }

    fn api<'a>(&'a self, conn: &'a ApiConn) -> Api<'a> {
        Api {
            http: &self.inner.http,
            conn,
            generation: &self.inner.api_generation,
        }
    }

    fn envd<'a>(
        &'a self,
        settings: &Settings,
        id: &'a str,
        info: &'a SandboxInfo,
        fresh: bool,
    ) -> Result<Envd<'a>> {
        let domain = info
            .domain
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| settings.conn.domain.clone());
        let base = self
            .inner
            .sandbox_url
            .clone()
            .unwrap_or_else(|| format!("https://{}-{id}.{domain}", envd::ENVD_PORT));
        Envd::new(
            &self.inner.http,
            EnvdTarget {
                base,
                sandbox_id: id,
                token: info.envd_access_token.as_ref(),
                routing_headers: self.inner.flavor.routing_headers(),
                request_timeout: settings.conn.request_timeout,
                keepalive_secs: self.inner.keepalive_secs,
                fresh,
            },
        )
    }

    fn create_body(&self, settings: &Settings, ctx: &CallContext, run_id: Option<&str>) -> Value {
        let timeout = api::seconds(settings.timeout_ms);
        match &settings.flavor_config {
            FlavorConfig::E2b(c) => {
                let mut metadata = json!({"paperclipProvider": "e2b"});
                if let Some(run) = run_id {
                    metadata["paperclipRunId"] = json!(run);
                }
                json!({"templateID": c.template, "timeout": timeout, "metadata": metadata,
                       "secure": true, "allow_internet_access": true, "autoPause": false})
            }
            FlavorConfig::Novita(c) => {
                let mut metadata = json!({"paperclip-provider": "novita", "paperclip-environment-id": ctx.environment_id});
                if let Some(company) = &ctx.company_id {
                    metadata["paperclip-company-id"] = json!(company);
                }
                if let Some(issue) = &ctx.issue_id {
                    metadata["paperclip-issue-id"] = json!(issue);
                }
                if let Some(run) = run_id {
                    metadata["paperclip-run-id"] = json!(run);
                }
                let mut body = json!({"templateID": c.template.clone().unwrap_or_else(|| "base".into()), "metadata": metadata,
                    "timeout": timeout, "secure": c.secure.unwrap_or(true), "allow_internet_access": true, "autoPause": c.auto_pause});
                if c.auto_pause {
                    body["autoResume"] = json!({"enabled": false});
                }
                body
            }
        }
    }

    /// Finds or creates the workspace directory; returns `(remoteCwd, shell)`.
    async fn prepare_workspace(
        &self,
        settings: &Settings,
        envd: &Envd<'_>,
        remembered: Option<&str>,
    ) -> Result<(String, &'static str)> {
        let helper_timeout = settings.conn.request_timeout.as_millis() as u64;
        match &settings.flavor_config {
            FlavorConfig::E2b(_) => {
                let cwd = match remembered {
                    Some(cwd) => cwd.to_owned(),
                    None => {
                        let (code, stdout, stderr) =
                            run_captured(envd, "pwd", None, helper_timeout).await?;
                        if code != 0 {
                            return Err(Error::provider(
                                self.inner.flavor.key(),
                                format!("pwd failed with exit code {code}: {}", stderr.trim()),
                            ));
                        }
                        let home = Some(stdout.trim()).filter(|s| !s.is_empty()).unwrap_or("/");
                        format!("{}/paperclip-workspace", home.trim_end_matches('/'))
                    }
                };
                self.mkdir(envd, &cwd, helper_timeout).await?;
                Ok((cwd, "bash"))
            }
            FlavorConfig::Novita(c) => {
                let cwd = remembered
                    .map(str::to_owned)
                    .unwrap_or_else(|| c.requested_cwd.clone());
                self.mkdir(envd, &cwd, helper_timeout).await?;
                let detect =
                    "if command -v bash >/dev/null 2>&1; then printf bash; else printf sh; fi";
                let shell = match run_captured(envd, detect, Some("/"), helper_timeout).await {
                    Ok((_, out, _)) if out.trim() == "bash" => "bash",
                    _ => "sh",
                };
                Ok((cwd, shell))
            }
        }
    }

    async fn mkdir(&self, envd: &Envd<'_>, dir: &str, timeout_ms: u64) -> Result<()> {
        let (code, _, stderr) = run_captured(
            envd,
            &format!("mkdir -p {}", quote(dir)),
            Some("/"),
            timeout_ms,
        )
        .await?;
        if code != 0 {
            return Err(Error::provider(
                self.inner.flavor.key(),
                format!(
                    "mkdir -p {dir} failed with exit code {code}: {}",
                    stderr.trim()
                ),
            ));
        }
        Ok(())
    }

    fn lease_metadata(
        &self,
        settings: &Settings,
        info: &SandboxInfo,
        cwd: &str,
        shell: &str,
        resumed: bool,
        run_id: Option<&str>,
    ) -> JsonObject {
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(self.inner.flavor.key()));
        md.insert("shellCommand".into(), json!(shell));
        match &settings.flavor_config {
            FlavorConfig::E2b(c) => {
                md.insert("template".into(), json!(c.template));
                md.insert("timeoutMs".into(), json!(c.timeout_ms));
                md.insert("reuseLease".into(), json!(c.reuse_lease));
                md.insert("sandboxId".into(), json!(info.sandbox_id));
                md.insert(
                    "sandboxDomain".into(),
                    json!(
                        info.domain
                            .clone()
                            .filter(|d| !d.is_empty())
                            .unwrap_or_else(|| settings.conn.domain.clone())
                    ),
                );
            }
            FlavorConfig::Novita(c) => {
                md.insert("sandboxId".into(), json!(info.sandbox_id));
                md.insert("template".into(), json!(c.template));
                md.insert("timeoutMs".into(), json!(c.timeout_ms));
                md.insert("requestTimeoutMs".into(), json!(c.request_timeout_ms));
                md.insert("autoPause".into(), json!(c.auto_pause));
                md.insert("reuseLease".into(), json!(c.reuse_lease));
            }
        }
        md.insert("remoteCwd".into(), json!(cwd));
        md.insert("resumedLease".into(), json!(resumed));
        if let Some(run) = run_id {
            md.insert("paperclipRunId".into(), json!(run));
        }
        md
    }

    /// Creates a sandbox and prepares it; kills it if preparation fails.
    async fn create_prepared(
        &self,
        ctx: &CallContext,
        settings: &Settings,
        run_id: Option<&str>,
    ) -> Result<(SandboxInfo, String, &'static str)> {
        let api = self.api(&settings.conn);
        let info = api.create(&self.create_body(settings, ctx, run_id)).await?;
        let prepared = async {
            if let Some(version) = &info.envd_version
                && version_less_than(version, (0, 1, 0))
            {
                return Err(Error::provider(
                    self.inner.flavor.key(),
                    format!("envd {version} is too old; update the template"),
                ));
            }
            if self.inner.flavor == Flavor::E2b {
                api.set_timeout(&info.sandbox_id, settings.timeout_ms)
                    .await?;
            }
            let envd = self.envd(settings, &info.sandbox_id, &info, true)?;
            self.prepare_workspace(settings, &envd, None).await
        }
        .await;
        match prepared {
            Ok((cwd, shell)) => Ok((info, cwd, shell)),
            Err(error) => {
                if let Err(kill_error) = api.kill(&info.sandbox_id).await {
                    warn!(sandbox = %info.sandbox_id, error = %ctx.config.scrub(&kill_error.to_string()), "killing the half-prepared sandbox failed");
                }
                Err(error)
            }
        }
    }

    async fn connect_or_gone(&self, settings: &Settings, id: &str) -> Result<SandboxInfo> {
        self.api(&settings.conn)
            .connect(id, settings.timeout_ms)
            .await?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "{}: sandbox {id} not found (expired or killed)",
                    self.inner.flavor.key()
                ))
            })
    }

    fn stdin_path() -> String {
        format!("/tmp/paperclip-stdin-{}", uuid::Uuid::new_v4())
    }
}

fn version_less_than(version: &str, min: (u64, u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v < min
}

#[async_trait]
impl SandboxProvider for E2bProvider {
    fn key(&self) -> &str {
        self.inner.flavor.key()
    }

    /// Paperclip 2026.916's plugin id for this provider.
    fn plugin_key(&self) -> String {
        format!("paperclip.{}-sandbox-provider", self.key())
    }

    /// Create (one control-plane call, up to a minute on a cold template),
    /// envd readiness and the workspace directory: the host's 30 s default
    /// must not cut a cold create short.
    fn default_lease_deadline(&self) -> Option<Duration> {
        Some(Duration::from_secs(120))
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
            lifetime_refresh: self.inner.flavor == Flavor::E2b,
            streaming: true,
            stdin: true,
            multi_command_exec: true,
            native_sync: true,
            signals: true,
            run_lookup: true,
        }
    }

    async fn workspace_transport(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
    ) -> Result<Option<Arc<dyn paperclip_env_core::workspace::WorkspaceTransport>>> {
        let Some(id) = lease.id() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(EnvdFiles {
            provider: self.clone(),
            settings: self.settings(ctx)?,
            id: id.to_owned(),
        })))
    }

    fn config_schema(&self) -> Value {
        let schema = match self.inner.flavor {
            Flavor::E2b => schemars::schema_for!(E2bConfigSchema),
            Flavor::Novita => schemars::schema_for!(NovitaConfigSchema),
        };
        serde_json::to_value(schema).unwrap_or_else(|_| json!({"type": "object"}))
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let (issues, normalized) = match self.inner.flavor {
            Flavor::E2b => (E2bConfig::validate(config), E2bConfig::normalized(config)),
            Flavor::Novita => (
                NovitaConfig::validate(config, self.inner.api_key.is_some()),
                NovitaConfig::normalized(config),
            ),
        };
        Ok(if issues.is_empty() {
            ConfigValidation::valid(normalized)
        } else {
            ConfigValidation::invalid(issues)
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let key = self.inner.flavor.key();
        let settings = match self.settings(ctx) {
            Ok(s) => s,
            Err(e) => {
                return Ok(ProviderProbe {
                    ok: false,
                    summary: Some(self.probe_failed_summary(ctx)),
                    metadata: Some(self.probe_metadata(ctx, Some(&e.to_string()), None)),
                    ..Default::default()
                });
            }
        };
        match self.create_prepared(ctx, &settings, None).await {
            Ok((info, cwd, shell)) => {
                if let Err(error) = self.api(&settings.conn).kill(&info.sandbox_id).await {
                    warn!(sandbox = %info.sandbox_id, error = %ctx.config.scrub(&error.to_string()), "killing the probe sandbox failed");
                }
                let summary = match self.inner.flavor {
                    Flavor::E2b => format!(
                        "Connected to E2B sandbox template {}.",
                        E2bConfig::from_provider_config(&ctx.config).template
                    ),
                    Flavor::Novita => format!("Connected to Novita sandbox {}.", info.sandbox_id),
                };
                let metadata = match self.inner.flavor {
                    Flavor::E2b => {
                        let mut md = self.probe_metadata(ctx, None, Some(&info));
                        md.insert("remoteCwd".into(), json!(cwd));
                        md
                    }
                    Flavor::Novita => {
                        self.lease_metadata(&settings, &info, &cwd, shell, false, None)
                    }
                };
                Ok(ProviderProbe {
                    ok: true,
                    summary: Some(summary),
                    diagnostics: Vec::new(),
                    metadata: Some(metadata),
                })
            }
            Err(error) => {
                debug!(provider = key, error = %ctx.config.scrub(&error.to_string()), "probe failed");
                Ok(ProviderProbe {
                    ok: false,
                    summary: Some(self.probe_failed_summary(ctx)),
                    diagnostics: vec![paperclip_env_core::Diagnostic {
                        severity: paperclip_env_core::Severity::Error,
                        message: error.to_string(),
                        code: None,
                        details: None,
                    }],
                    metadata: Some(self.probe_metadata(ctx, Some(&error.to_string()), None)),
                })
            }
        }
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let settings = self.settings(ctx)?;
        let (info, cwd, shell) = self
            .create_prepared(ctx, &settings, Some(&request.run_id))
            .await?;
        let metadata =
            self.lease_metadata(&settings, &info, &cwd, shell, false, Some(&request.run_id));
        Ok(ProviderLease::new(info.sandbox_id.clone(), metadata))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let settings = self.settings(ctx)?;
        let Some(id) = lease.id() else {
            return Ok(ProviderLease {
                provider_lease_id: None,
                metadata: Some(expired(self.inner.flavor)),
                expires_at: None,
            });
        };
        let api = self.api(&settings.conn);
        let Some(info) = api.connect(id, settings.timeout_ms).await? else {
            return Ok(ProviderLease {
                provider_lease_id: None,
                metadata: Some(expired(self.inner.flavor)),
                expires_at: None,
            });
        };
        let prepared = async {
            if let Err(error) = api.set_timeout(id, settings.timeout_ms).await {
                if self.inner.flavor == Flavor::E2b {
                    return Err(error);
                }
                debug!(error = %ctx.config.scrub(&error.to_string()), "lifetime refresh after resume failed");
            }
            let envd = self.envd(&settings, id, &info, true)?;
            self.prepare_workspace(
                &settings,
                &envd,
                lease
                    .metadata_str("remoteCwd")
                    .filter(|_| self.inner.flavor == Flavor::Novita),
            )
            .await
        }
        .await;
        match prepared {
            Ok((cwd, shell)) => Ok(ProviderLease::new(
                id,
                self.lease_metadata(
                    &settings,
                    &info,
                    &cwd,
                    shell,
                    true,
                    lease.metadata_str("paperclipRunId"),
                ),
            )),
            Err(error) => {
                if self.inner.flavor == Flavor::E2b {
                    let _ = api.kill(id).await;
                }
                Err(error)
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
        let settings = self.settings(ctx)?;
        let api = self.api(&settings.conn);
        if settings.reuse_lease {
            match api.pause(id).await {
                Ok(PauseOutcome::Done | PauseOutcome::AlreadyDone | PauseOutcome::Gone) => {
                    return Ok(());
                }
                Err(error) => {
                    warn!(sandbox = id, error = %ctx.config.scrub(&error.to_string()), "pausing failed; killing instead")
                }
            }
        }
        api.kill(id).await.map(|_| ())
    }

    /// The live sandboxes whose metadata carries the run label the create
    /// wrote (`paperclipRunId` on E2B, `paperclip-run-id` on Novita).
    async fn list_run_resources(
        &self,
        ctx: &CallContext,
        run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        let settings = self.settings(ctx)?;
        let key = match self.inner.flavor {
            Flavor::E2b => "paperclipRunId",
            Flavor::Novita => "paperclip-run-id",
        };
        let ids = self
            .api(&settings.conn)
            .list_ids_by_metadata(key, run_id)
            .await?;
        Ok(ids
            .into_iter()
            .map(|id| LeaseHandle {
                provider_lease_id: Some(id),
                ..Default::default()
            })
            .collect())
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let settings = self.settings(ctx)?;
        self.api(&settings.conn).kill(id).await.map(|_| ())
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let settings = self.settings(ctx)?;
        let fallback = match &settings.flavor_config {
            FlavorConfig::E2b(_) => "/paperclip-workspace".to_owned(),
            FlavorConfig::Novita(c) => c.requested_cwd.clone(),
        };
        let cwd = lease.preferred_cwd(workspace).unwrap_or(fallback);
        if let Some(id) = lease.id() {
            let info = self.connect_or_gone(&settings, id).await?;
            let envd = self.envd(&settings, id, &info, false)?;
            self.mkdir(
                &envd,
                &cwd,
                settings.conn.request_timeout.as_millis() as u64,
            )
            .await?;
        }
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(self.inner.flavor.key()));
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
        let settings = self.settings(ctx)?;
        let Some(id) = lease.id() else {
            let message = match self.inner.flavor {
                Flavor::E2b => "No provider lease ID available for execution.",
                Flavor::Novita => "No provider lease ID available for execution.\n",
            };
            output.stderr(message.as_bytes());
            return Ok(CommandExit::code(1));
        };
        // Validate the command before any remote call.
        let stdin_path = request.stdin.as_ref().map(|_| Self::stdin_path());
        let script = match self.inner.flavor {
            Flavor::E2b => script::e2b_script(
                &request.command,
                &request.args,
                &request.env,
                stdin_path.as_deref(),
            )?,
            Flavor::Novita => script::novita_script(
                &request.command,
                &request.args,
                request.cwd.as_deref(),
                &request.env,
                stdin_path.as_deref(),
            )?,
        };
        let api = self.api(&settings.conn);
        let info = self.connect_or_gone(&settings, id).await?;
        if self.inner.flavor == Flavor::E2b
            && let Err(error) = api.set_timeout(id, settings.timeout_ms).await
        {
            // Best effort: the connect above already extended the lifetime.
            warn!(sandbox = id, error = %ctx.config.scrub(&error.to_string()), "refreshing the sandbox lifetime failed; running the command anyway");
        }
        let envd = self.envd(&settings, id, &info, false)?;
        if let (Some(path), Some(stdin)) = (&stdin_path, &request.stdin)
            && let Err(error) = envd.upload(path, stdin.as_bytes()).await
        {
            let _ = envd.remove(path).await;
            return Err(error);
        }
        let cwd = match self.inner.flavor {
            Flavor::E2b => request.cwd.as_deref(),
            Flavor::Novita => Some("/"),
        };
        let timeout_ms = request.timeout_ms.unwrap_or(settings.timeout_ms);
        let result = envd
            .run(
                Run {
                    cmd: "/bin/bash",
                    args: vec!["-l".into(), "-c".into(), script],
                    cwd,
                    timeout_ms: Some(timeout_ms),
                },
                output,
            )
            .await;
        if let Some(path) = &stdin_path
            && let Err(error) = envd.remove(path).await
        {
            debug!(%error, "removing the staged stdin file failed");
        }
        let mut exit = result?;
        if self.inner.flavor == Flavor::Novita {
            let mut md = JsonObject::new();
            md.insert("provider".into(), json!("novita"));
            md.insert("sandboxId".into(), json!(id));
            exit.metadata = Some(md);
        }
        Ok(exit)
    }
}

fn expired(flavor: Flavor) -> JsonObject {
    let mut md = JsonObject::new();
    if flavor == Flavor::Novita {
        md.insert("provider".into(), json!("novita"));
    }
    md.insert("expired".into(), json!(true));
    md
}

impl E2bProvider {
    fn probe_failed_summary(&self, ctx: &CallContext) -> String {
        match self.inner.flavor {
            Flavor::E2b => format!(
                "E2B sandbox probe failed for template {}.",
                E2bConfig::from_provider_config(&ctx.config).template
            ),
            Flavor::Novita => "Novita sandbox probe failed.".to_owned(),
        }
    }

    fn probe_metadata(
        &self,
        ctx: &CallContext,
        error: Option<&str>,
        info: Option<&SandboxInfo>,
    ) -> JsonObject {
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(self.inner.flavor.key()));
        match self.inner.flavor {
            Flavor::E2b => {
                let c = E2bConfig::from_provider_config(&ctx.config);
                md.insert("template".into(), json!(c.template));
                md.insert("timeoutMs".into(), json!(c.timeout_ms));
                md.insert("reuseLease".into(), json!(c.reuse_lease));
            }
            Flavor::Novita => {
                let c = NovitaConfig::from_provider_config(&ctx.config);
                md.insert("template".into(), json!(c.template));
                md.insert("timeoutMs".into(), json!(c.timeout_ms));
                md.insert("requestTimeoutMs".into(), json!(c.request_timeout_ms));
                md.insert("reuseLease".into(), json!(c.reuse_lease));
            }
        }
        if let Some(info) = info {
            md.insert("sandboxId".into(), json!(info.sandbox_id));
            md.insert("sandboxDomain".into(), json!(info.domain));
        }
        if let Some(error) = error {
            md.insert("error".into(), json!(ctx.config.scrub(error)));
        }
        md
    }
}

/// Workspace archives through envd's file API instead of base64 over exec.
struct EnvdFiles {
    provider: E2bProvider,
    settings: Settings,
    id: String,
}

impl EnvdFiles {
    async fn with_envd<T>(
        &self,
        timeout_ms: u64,
        what: &'static str,
        f: impl AsyncFnOnce(&Envd<'_>) -> Result<T>,
    ) -> Result<T> {
        let work = async {
            let info = self
                .provider
                .connect_or_gone(&self.settings, &self.id)
                .await?;
            let envd = self.provider.envd(&self.settings, &self.id, &info, false)?;
            f(&envd).await
        };
        match tokio::time::timeout(Duration::from_millis(timeout_ms.max(1)), work).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: format!("{} {what}", self.provider.key()),
                after: Duration::from_millis(timeout_ms),
            }),
        }
    }
}

#[async_trait]
impl paperclip_env_core::workspace::WorkspaceTransport for EnvdFiles {
    fn name(&self) -> &str {
        match self.provider.flavor() {
            Flavor::E2b => "e2b-files",
            Flavor::Novita => "novita-files",
        }
    }

    async fn put_file(&self, local: &std::path::Path, remote: &str, timeout_ms: u64) -> Result<()> {
        let data = tokio::fs::read(local).await.map_err(|e| {
            Error::provider_with_source(
                self.provider.key(),
                format!("reading {} failed", local.display()),
                false,
                e,
            )
        })?;
        self.with_envd(timeout_ms, "file upload", async |envd| {
            envd.upload(remote, &data).await
        })
        .await
    }

    async fn get_file(&self, remote: &str, local: &std::path::Path, timeout_ms: u64) -> Result<()> {
        self.with_envd(timeout_ms, "file download", async |envd| {
            envd.download_to(remote, local).await
        })
        .await
    }
}
