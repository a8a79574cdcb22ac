//! Cloudflare Sandbox through the Paperclip bridge Worker (spec 23, protocol v1).
//!
//! ```no_run
//! # fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_providers::cloudflare::CloudflareProvider;
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(CloudflareProvider::builder().build()?)).build();
//! # Ok(()) }
//! ```

mod config;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, OutputCollector, OutputStream,
    ProviderLease, ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, WorkspaceSpec,
};
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::time::Instant;

pub use config::{
    CloudflareConfig, CloudflareConfigSchema, DEFAULT_CWD, DEFAULT_TIMEOUT_MS, SessionStrategy,
};

use crate::http::{HttpClient, HttpOptions, RequestSpec, RetryPolicy, message_from_body};

/// The bridge API prefix.
pub const API_PREFIX: &str = "/api/paperclip-sandbox/v1";
/// Env variable marking machine-consumed ("bridge channel") commands.
pub const EXEC_CHANNEL_VAR: &str = "PAPERCLIP_SANDBOX_EXEC_CHANNEL";
const KEY: &str = "cloudflare";

/// Builds a [`CloudflareProvider`].
#[derive(Debug, Clone)]
pub struct CloudflareProviderBuilder {
    http: HttpOptions,
    idle_timeout: Duration,
    stream_grace: Duration,
}

impl CloudflareProviderBuilder {
    /// HTTP client settings (the per-request timeout comes from each config's
    /// `bridgeRequestTimeoutMs`; retries apply only to idempotent calls).
    pub fn http_options(mut self, options: HttpOptions) -> Self {
        self.http = options;
        self
    }

    /// How long a streaming exec may go without a byte (keepalives count)
    /// before it is treated as dropped (default 60 s; the bridge sends a
    /// keepalive every 15 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Added to a streaming exec's request timeout to get the deadline over
    /// the whole stream (default 60 s).
    pub fn stream_grace(mut self, grace: Duration) -> Self {
        self.stream_grace = grace;
        self
    }

    /// Builds the provider.
    pub fn build(self) -> Result<CloudflareProvider> {
        Ok(CloudflareProvider {
            inner: Arc::new(Inner {
                http: HttpClient::new(KEY, self.http)?,
                idle_timeout: self.idle_timeout,
                stream_grace: self.stream_grace,
            }),
        })
    }
}

struct Inner {
    http: HttpClient,
    idle_timeout: Duration,
    stream_grace: Duration,
}

/// The Cloudflare provider. Cheap to clone.
#[derive(Clone)]
pub struct CloudflareProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CloudflareProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareProvider")
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// A non-2xx bridge answer.
struct BridgeError {
    status: u16,
    code: Option<String>,
    message: String,
}

impl BridgeError {
    fn is_unknown_route(&self) -> bool {
        self.status == 404
            && self.code.as_deref() == Some("not_found")
            && self.message.starts_with("No bridge route matched")
    }

    fn is_lost_lease(&self) -> bool {
        (self.status == 409 || self.status == 404) && !self.is_unknown_route()
    }

    fn into_error(self) -> Error {
        let message = format!("Cloudflare sandbox bridge: {}", self.message);
        match self.status {
            401 => Error::Unauthenticated {
                message,
                source: None,
            },
            403 => Error::PermissionDenied {
                message,
                source: None,
            },
            400 | 422 => Error::InvalidInput {
                what: "bridge request",
                message,
            },
            404 if self.is_unknown_route() => Error::Provider {
                provider: KEY.into(),
                message: format!(
                    "{message} (the bridge does not implement this route; deploy the current bridge)"
                ),
                retryable: false,
                source: None,
            },
            404 | 409 => Error::NotFound {
                message,
                source: None,
            },
            s => Error::Provider {
                provider: KEY.into(),
                message,
                retryable: s >= 500,
                source: None,
            },
        }
    }
}

enum Outcome {
    Ok(Value),
    Failed(BridgeError),
}

/// One bridge call.
struct Call<'a> {
    method: reqwest::Method,
    path: &'a str,
    id: Option<&'a str>,
    body: Option<&'a Value>,
    operation: &'static str,
    idempotent: bool,
}

struct Bridge<'a> {
    http: &'a HttpClient,
    base: reqwest::Url,
    token: HeaderValue,
    headers: Vec<(&'static str, String)>,
    request_timeout: Duration,
}

fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.to_ascii_lowercase().contains("application/json"))
}

async fn bridge_error(response: reqwest::Response) -> BridgeError {
    let status = response.status().as_u16();
    let json = is_json(&response);
    let text = response.text().await.unwrap_or_default();
    let body: Option<Value> = if json {
        serde_json::from_str(&text).ok()
    } else {
        None
    };
    let code = body
        .as_ref()
        .and_then(|b| b.get("error"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let message = body
        .as_ref()
        .and_then(|b| b.get("message"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let detail = if json {
                String::new()
            } else {
                format!(" ({})", message_from_body(&text)).replace(" ()", "")
            };
            format!("Cloudflare sandbox bridge request failed with HTTP {status}.{detail}")
        });
    BridgeError {
        status,
        code,
        message,
    }
}

impl Bridge<'_> {
    fn url(&self, path: &str, id: Option<&str>) -> Result<reqwest::Url> {
        let mut url = self.base.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|_| {
                Error::invalid_field("bridgeBaseUrl", "bridgeBaseUrl must be a valid URL.")
            })?;
            segments.pop_if_empty();
            for part in format!("{API_PREFIX}{path}")
                .split('/')
                .filter(|p| !p.is_empty())
            {
                segments.push(part);
            }
            if let Some(id) = id {
                segments.push(id);
            }
        }
        Ok(url)
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        url: &reqwest::Url,
    ) -> reqwest::RequestBuilder {
        let mut request = client
            .request(method, url.clone())
            .header("Authorization", self.token.clone())
            .header("Content-Type", "application/json");
        for (name, value) in &self.headers {
            request = request.header(*name, value.as_str());
        }
        request
    }

    /// A JSON call; `idempotent` allows retries of transport failures and 5xx.
    async fn call(&self, call: Call<'_>, timeout: Duration) -> Result<Outcome> {
        let Call {
            method,
            path,
            id,
            body,
            operation,
            idempotent,
        } = call;
        let url = self.url(path, id)?;
        let spec = if idempotent {
            RequestSpec::idempotent(operation)
        } else {
            RequestSpec::not_idempotent(operation)
        }
        .accept_all()
        .timeout(timeout);
        let response = self
            .http
            .send(spec, |c| {
                let r = self.request(c, method.clone(), &url);
                match body {
                    Some(b) => r.body(b.to_string()),
                    None => r,
                }
            })
            .await
            .map_err(|e| match e {
                Error::Timeout { .. } => Error::Timeout {
                    operation: format!(
                        "Cloudflare sandbox bridge request timed out after {}ms.",
                        timeout.as_millis()
                    ),
                    after: timeout,
                },
                other => other,
            })?;
        if !response.status().is_success() {
            return Ok(Outcome::Failed(bridge_error(response).await));
        }
        if !is_json(&response) {
            return Err(Error::provider(
                KEY,
                format!(
                    "{operation}: the bridge answered HTTP {} without a JSON body (a proxy page?)",
                    response.status().as_u16()
                ),
            ));
        }
        let text = response.text().await.map_err(|e| {
            Error::provider_with_source(
                KEY,
                format!("{operation}: reading the response failed"),
                true,
                e,
            )
        })?;
        serde_json::from_str(&text).map(Outcome::Ok).map_err(|e| {
            Error::provider(
                KEY,
                format!("{operation}: invalid JSON from the bridge ({e})"),
            )
        })
    }
}

fn ok_or_error(outcome: Outcome) -> Result<Value> {
    match outcome {
        Outcome::Ok(v) => Ok(v),
        Outcome::Failed(e) => Err(e.into_error()),
    }
}

fn lease_from(value: Value) -> Result<ProviderLease> {
    let id = value
        .get("providerLeaseId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let Some(id) = id else {
        return Err(Error::provider(
            KEY,
            "the bridge returned a lease without a providerLeaseId",
        ));
    };
    let metadata = value
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Ok(ProviderLease::new(id, metadata))
}

fn expired() -> ProviderLease {
    let mut md = JsonObject::new();
    md.insert("provider".into(), json!(KEY));
    md.insert("expired".into(), json!(true));
    ProviderLease {
        provider_lease_id: None,
        metadata: Some(md),
        expires_at: None,
    }
}

/// The result JSON `{exitCode, signal, timedOut, stdout, stderr}`; an exit code
/// must be present unless the command timed out.
fn result_from(value: &Value) -> Result<(CommandExit, String, String)> {
    let timed_out = value
        .get("timedOut")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let exit_code = match value.get("exitCode") {
        Some(Value::Number(n)) => n.as_i64().map(|n| n as i32),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(Error::provider(
                KEY,
                "the bridge result has a non-numeric exitCode",
            ));
        }
    };
    if exit_code.is_none() && !timed_out {
        return Err(Error::provider(
            KEY,
            "the bridge result has no exit code and did not time out; treating it as a failure",
        ));
    }
    let text = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let signal = value
        .get("signal")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((
        CommandExit {
            exit_code,
            signal,
            timed_out,
            metadata: None,
        },
        text("stdout"),
        text("stderr"),
    ))
}

impl CloudflareProvider {
    /// A builder with the defaults.
    pub fn builder() -> CloudflareProviderBuilder {
        CloudflareProviderBuilder {
            http: HttpOptions {
                retry: RetryPolicy::default(),
                ..HttpOptions::default()
            },
            idle_timeout: Duration::from_secs(60),
            stream_grace: Duration::from_secs(60),
        }
    }

    fn bridge<'a>(
        &'a self,
        config: &CloudflareConfig,
        ctx: &CallContext,
        run_id: Option<&str>,
    ) -> Result<Bridge<'a>> {
        let base = reqwest::Url::parse(&config.bridge_base_url).map_err(|_| {
            Error::invalid_field("bridgeBaseUrl", "bridgeBaseUrl must be a valid URL.")
        })?;
        let token = config.bridge_auth_token.as_ref().ok_or_else(|| {
            Error::invalid_field(
                "bridgeAuthToken",
                "Cloudflare sandbox environments require bridgeAuthToken.",
            )
        })?;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|_| {
                Error::invalid_field(
                    "bridgeAuthToken",
                    "bridgeAuthToken contains characters that cannot be sent in an HTTP header.",
                )
            })?;
        header.set_sensitive(true);
        let mut headers = vec![("X-Paperclip-Environment-Id", ctx.environment_id.clone())];
        if let Some(run) = run_id.filter(|r| !r.is_empty()) {
            headers.push(("X-Paperclip-Run-Id", run.to_owned()));
        }
        if let Some(issue) = ctx.issue_id.as_deref().filter(|i| !i.is_empty()) {
            headers.push(("X-Paperclip-Issue-Id", issue.to_owned()));
        }
        Ok(Bridge {
            http: &self.inner.http,
            base,
            token: header,
            headers,
            request_timeout: Duration::from_millis(config.bridge_request_timeout_ms.max(1) as u64),
        })
    }

    fn config(ctx: &CallContext) -> CloudflareConfig {
        CloudflareConfig::from_provider_config(&ctx.config)
    }

    async fn exec(
        &self,
        bridge: &Bridge<'_>,
        body: Value,
        output: &OutputCollector,
        stream: bool,
    ) -> Result<std::result::Result<CommandExit, BridgeError>> {
        let command_timeout = body
            .get("timeoutMs")
            .and_then(Value::as_i64)
            .filter(|t| *t > 0)
            .unwrap_or(0) as u64;
        let timeout = bridge
            .request_timeout
            .max(Duration::from_millis(command_timeout));
        if !stream {
            return match bridge
                .call(
                    Call {
                        method: reqwest::Method::POST,
                        path: "/exec",
                        id: None,
                        body: Some(&body),
                        operation: "exec",
                        idempotent: false,
                    },
                    timeout,
                )
                .await?
            {
                Outcome::Ok(value) => {
                    let (exit, stdout, stderr) = result_from(&value)?;
                    output.stdout(stdout.as_bytes());
                    output.stderr(stderr.as_bytes());
                    Ok(Ok(exit))
                }
                Outcome::Failed(e) => Ok(Err(e)),
            };
        }
        let url = bridge.url("/exec", None)?;
        let response = bridge
            .http
            .send(
                RequestSpec::not_idempotent("exec")
                    .stream()
                    .accept_all()
                    .timeout(timeout),
                |c| {
                    bridge
                        .request(c, reqwest::Method::POST, &url)
                        .body(body.to_string())
                },
            )
            .await?;
        if !response.status().is_success() {
            return Ok(Err(bridge_error(response).await));
        }
        if is_json(&response) {
            // A bridge that ignores streamOutput answers with the plain result.
            let value: Value = response.json().await.map_err(|e| {
                Error::provider(KEY, format!("exec: invalid JSON from the bridge ({e})"))
            })?;
            let (exit, stdout, stderr) = result_from(&value)?;
            output.stdout(stdout.as_bytes());
            output.stderr(stderr.as_bytes());
            return Ok(Ok(exit));
        }
        let deadline = Instant::now() + timeout + self.inner.stream_grace;
        let mut last_byte = Instant::now();
        let mut parser = sse::Parser::default();
        let mut complete: Option<Value> = None;
        let mut body_stream = response.bytes_stream();
        loop {
            let wake = deadline.min(last_byte + self.inner.idle_timeout);
            let events = tokio::select! {
                chunk = body_stream.next() => match chunk {
                    Some(Ok(bytes)) => {
                        last_byte = Instant::now();
                        parser.push(&bytes)
                    }
                    Some(Err(e)) => return Err(Error::provider_with_source(KEY, "the exec stream was interrupted", true, e)),
                    None => {
                        let events: Vec<_> = parser.finish().into_iter().collect();
                        self.handle_events(events, output, &mut complete)?;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout { operation: format!("Cloudflare sandbox bridge request timed out after {}ms.", timeout.as_millis()), after: timeout });
                    }
                    return Err(Error::Provider { provider: KEY.into(), message: format!("the exec stream went silent for {}s without a keepalive", self.inner.idle_timeout.as_secs()), retryable: true, source: None });
                }
            };
            self.handle_events(events, output, &mut complete)?;
        }
        let Some(result) = complete else {
            return Err(Error::provider(
                KEY,
                "Cloudflare sandbox bridge streaming response ended without a completion event.",
            ));
        };
        let (exit, stdout, stderr) = result_from(&result)?;
        // The completion payload is authoritative: recover any chunk the stream dropped.
        output.reconcile(OutputStream::Stdout, stdout.as_bytes());
        output.reconcile(OutputStream::Stderr, stderr.as_bytes());
        Ok(Ok(exit))
    }

    fn handle_events(
        &self,
        events: Vec<sse::Event>,
        output: &OutputCollector,
        complete: &mut Option<Value>,
    ) -> Result<()> {
        for event in events {
            match event.kind.as_str() {
                "stdout" | "stderr" => {
                    let data = serde_json::from_str::<Value>(&event.data).ok();
                    if let Some(chunk) = data
                        .as_ref()
                        .and_then(|d| d.get("data"))
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                    {
                        let stream = if event.kind == "stdout" {
                            OutputStream::Stdout
                        } else {
                            OutputStream::Stderr
                        };
                        output.push(stream, chunk.as_bytes());
                    }
                }
                "complete" => {
                    *complete = Some(serde_json::from_str(&event.data).map_err(|e| {
                        Error::provider(KEY, format!("invalid completion event ({e})"))
                    })?);
                }
                "error" => {
                    let message = serde_json::from_str::<Value>(&event.data)
                        .ok()
                        .and_then(|d| d.get("error").and_then(Value::as_str).map(str::to_owned))
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| {
                            "Cloudflare sandbox bridge streaming command failed.".into()
                        });
                    return Err(Error::provider(KEY, message));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn session_fields(config: &CloudflareConfig, body: &mut Value) {
        body["sessionStrategy"] = json!(config.session_strategy.as_str());
        body["sessionId"] = json!(config.session_id);
    }

    fn lease_body(config: &CloudflareConfig) -> Value {
        json!({"keepAlive": config.keep_alive, "sleepAfter": config.sleep_after, "normalizeId": config.normalize_id,
               "sessionStrategy": config.session_strategy.as_str(), "sessionId": config.session_id, "timeoutMs": config.timeout_ms})
    }
}

#[async_trait]
impl SandboxProvider for CloudflareProvider {
    fn key(&self) -> &str {
        KEY
    }

    fn default_lease_deadline(&self) -> Option<Duration> {
        // A bridge call may take the default bridge request budget (5 min).
        Some(Duration::from_millis(DEFAULT_TIMEOUT_MS as u64) + Duration::from_secs(30))
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
            signals: false,
            run_lookup: false,
        }
    }

    fn config_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(CloudflareConfigSchema))
            .unwrap_or_else(|_| json!({"type": "object"}))
    }

    fn plugin_key(&self) -> String {
        "paperclip.cloudflare-sandbox-provider".into()
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        let issues = CloudflareConfig::validate(config);
        Ok(if issues.is_empty() {
            ConfigValidation::valid(CloudflareConfig::normalized(config))
        } else {
            ConfigValidation::invalid(issues)
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let config = Self::config(ctx);
        let failed = |error: String| ProviderProbe {
            ok: false,
            summary: Some("Cloudflare sandbox bridge probe failed.".into()),
            diagnostics: Vec::new(),
            metadata: Some(
                json!({"provider": KEY, "error": ctx.config.scrub(&error)})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
        let bridge = match self.bridge(&config, ctx, None) {
            Ok(b) => b,
            Err(e) => return Ok(failed(e.to_string())),
        };
        let capabilities = match bridge
            .call(
                Call {
                    method: reqwest::Method::GET,
                    path: "/health",
                    id: None,
                    body: None,
                    operation: "health",
                    idempotent: true,
                },
                bridge.request_timeout,
            )
            .await
        {
            Ok(Outcome::Ok(health)) => health.get("capabilities").cloned(),
            _ => None,
        };
        let mut body = Self::lease_body(&config);
        body["requestedCwd"] = json!(config.requested_cwd);
        match bridge
            .call(
                Call {
                    method: reqwest::Method::POST,
                    path: "/probe",
                    id: None,
                    body: Some(&body),
                    operation: "probe",
                    idempotent: false,
                },
                bridge.request_timeout,
            )
            .await
            .and_then(ok_or_error)
        {
            Ok(value) => {
                let mut metadata = value
                    .get("metadata")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                if let Some(caps) = capabilities {
                    metadata.insert("bridgeCapabilities".into(), caps);
                }
                Ok(ProviderProbe {
                    ok: value.get("ok").and_then(Value::as_bool).unwrap_or(false),
                    summary: value
                        .get("summary")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    diagnostics: Vec::new(),
                    metadata: Some(metadata),
                })
            }
            Err(e) => Ok(failed(e.to_string())),
        }
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let config = Self::config(ctx);
        let bridge = self.bridge(&config, ctx, Some(&request.run_id))?;
        let mut body = Self::lease_body(&config);
        body["environmentId"] = json!(ctx.environment_id);
        body["runId"] = json!(request.run_id);
        body["issueId"] = json!(ctx.issue_id);
        body["reuseLease"] = json!(config.reuse_lease);
        body["requestedCwd"] = json!(config.requested_cwd);
        let value = ok_or_error(
            bridge
                .call(
                    Call {
                        method: reqwest::Method::POST,
                        path: "/leases/acquire",
                        id: None,
                        body: Some(&body),
                        operation: "acquire lease",
                        idempotent: false,
                    },
                    bridge.request_timeout,
                )
                .await?,
        )?;
        lease_from(value)
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let Some(id) = lease.id() else {
            return Ok(expired());
        };
        let config = Self::config(ctx);
        let bridge = self.bridge(&config, ctx, None)?;
        let mut body = Self::lease_body(&config);
        body["providerLeaseId"] = json!(id);
        body["requestedCwd"] = json!(
            lease
                .metadata_str("remoteCwd")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or(&config.requested_cwd)
        );
        match bridge
            .call(
                Call {
                    method: reqwest::Method::POST,
                    path: "/leases/resume",
                    id: None,
                    body: Some(&body),
                    operation: "resume lease",
                    idempotent: false,
                },
                bridge.request_timeout,
            )
            .await?
        {
            Outcome::Ok(value) => lease_from(value),
            Outcome::Failed(e) if e.is_lost_lease() => {
                // A v1 bridge's resume re-creates the container before it notices
                // the lost state (ids are get-or-create): tear the empty one down.
                if let Err(error) = bridge
                    .call(
                        Call {
                            method: reqwest::Method::DELETE,
                            path: "/leases",
                            id: Some(id),
                            body: None,
                            operation: "destroy lease",
                            idempotent: true,
                        },
                        bridge.request_timeout,
                    )
                    .await
                {
                    tracing::warn!(lease = id, %error, "destroying the re-created empty sandbox failed");
                }
                Ok(expired())
            }
            Outcome::Failed(e) => Err(e.into_error()),
        }
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let config = Self::config(ctx);
        let bridge = self.bridge(&config, ctx, None)?;
        let body = json!({"providerLeaseId": id, "reuseLease": config.reuse_lease, "keepAlive": config.keep_alive});
        ok_or_error(
            bridge
                .call(
                    Call {
                        method: reqwest::Method::POST,
                        path: "/leases/release",
                        id: None,
                        body: Some(&body),
                        operation: "release lease",
                        idempotent: true,
                    },
                    bridge.request_timeout,
                )
                .await?,
        )
        .map(|_| ())
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let Some(id) = lease.id() else { return Ok(()) };
        let config = Self::config(ctx);
        let bridge = self.bridge(&config, ctx, None)?;
        ok_or_error(
            bridge
                .call(
                    Call {
                        method: reqwest::Method::DELETE,
                        path: "/leases",
                        id: Some(id),
                        body: None,
                        operation: "destroy lease",
                        idempotent: true,
                    },
                    bridge.request_timeout,
                )
                .await?,
        )
        .map(|_| ())
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let config = Self::config(ctx);
        let cwd = lease
            .preferred_cwd(workspace)
            .unwrap_or_else(|| config.requested_cwd.clone());
        if let Some(id) = lease.id() {
            let bridge = self.bridge(&config, ctx, None)?;
            let mut body = json!({"providerLeaseId": id, "command": "mkdir", "args": ["-p", cwd], "cwd": "/",
                                  "timeoutMs": config.timeout_ms, "streamOutput": false});
            Self::session_fields(&config, &mut body);
            let output = OutputCollector::buffered();
            let outcome = self
                .exec(&bridge, body, &output, false)
                .await
                .and_then(|r| r.map_err(BridgeError::into_error));
            if let Err(e) = outcome {
                return Err(Error::provider(
                    KEY,
                    format!("Failed to prepare Cloudflare sandbox workspace at {cwd}: {e}"),
                ));
            }
        }
        let mut metadata = JsonObject::new();
        metadata.insert("provider".into(), json!(KEY));
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
            output.stderr(b"No provider lease ID available for execution.\n");
            return Ok(CommandExit::code(1));
        };
        let config = Self::config(ctx);
        let bridge = self.bridge(&config, ctx, None)?;
        let mut env = request.env.clone();
        let bridge_channel = env.get(EXEC_CHANNEL_VAR).map(String::as_str) == Some("bridge");
        let mut body = json!({"providerLeaseId": id, "command": request.command, "args": request.args, "env": env,
            "stdin": request.stdin, "timeoutMs": request.timeout_ms.map(|t| t as i64).unwrap_or(config.timeout_ms)});
        if let Some(cwd) = &request.cwd {
            body["cwd"] = json!(cwd);
        }
        if bridge_channel {
            env.remove(EXEC_CHANNEL_VAR);
            body["env"] = json!(env);
            body["sessionStrategy"] = json!("named");
            body["sessionId"] = json!(format!("{}-bridge", config.session_id));
        } else {
            Self::session_fields(&config, &mut body);
        }
        // Machine-consumed output never streams (the stream could drop its last chunk).
        let stream = output.is_streaming() && !bridge_channel;
        body["streamOutput"] = json!(stream);
        match self.exec(&bridge, body, output, stream).await? {
            Ok(exit) => Ok(exit),
            Err(e) if e.is_lost_lease() => {
                let message = if e.message.is_empty() {
                    "Cloudflare sandbox lease is no longer available.".to_owned()
                } else {
                    e.message
                };
                output.stderr(format!("{message}\n").as_bytes());
                Ok(CommandExit::code(1))
            }
            Err(e) => Err(e.into_error()),
        }
    }
}
