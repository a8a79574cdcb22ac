//! The control-plane REST API (`https://api.<domain>`), spec 20 §5.3.

use std::time::Duration;

use paperclip_env_core::{Error, Result};
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use crate::http::{HttpClient, RequestSpec};

/// A sandbox as create/connect return it.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxInfo {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(default)]
    pub envd_version: Option<String>,
    #[serde(default)]
    pub envd_access_token: Option<SecretString>,
    #[serde(default)]
    pub domain: Option<String>,
}

impl std::fmt::Debug for SandboxInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxInfo")
            .field("sandbox_id", &self.sandbox_id)
            .field("envd_version", &self.envd_version)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Where and as whom control-plane calls go.
#[derive(Clone)]
pub(crate) struct ApiConn {
    pub api_base: String,
    pub domain: String,
    pub api_key: SecretString,
    pub request_timeout: Duration,
}

/// `timeout` body fields are whole seconds, rounded up, clamped to `i32::MAX`.
pub(crate) fn seconds(ms: u64) -> u64 {
    ms.div_ceil(1000).min(i32::MAX as u64)
}

pub(crate) fn sensitive(value: &SecretString, field: &'static str) -> Result<HeaderValue> {
    let mut header = HeaderValue::from_str(value.expose_secret()).map_err(|_| {
        Error::invalid_field(
            field,
            format!("{field} contains characters that cannot be sent in an HTTP header."),
        )
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// Outcome of pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PauseOutcome {
    Done,
    AlreadyDone,
    Gone,
}

pub(crate) struct Api<'a> {
    pub http: &'a HttpClient,
    pub conn: &'a ApiConn,
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.conn.api_base.trim_end_matches('/'))
    }

    fn spec(&self, spec: RequestSpec) -> RequestSpec {
        spec.timeout(self.conn.request_timeout)
    }

    pub async fn create(&self, body: &Value) -> Result<SandboxInfo> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url("/sandboxes");
        let response = self
            .http
            .send(
                self.spec(RequestSpec::not_idempotent("create sandbox")),
                |c| c.post(&url).header("X-API-Key", key.clone()).json(body),
            )
            .await?;
        parse(self.http.provider(), "create sandbox", response).await
    }

    /// `None` when the sandbox is gone (404).
    pub async fn connect(&self, id: &str, timeout_ms: u64) -> Result<Option<SandboxInfo>> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url(&format!("/sandboxes/{id}/connect"));
        let body = serde_json::json!({"timeout": seconds(timeout_ms)});
        let response = self
            .http
            .send(
                self.spec(RequestSpec::idempotent("connect sandbox").accept(&[404])),
                |c| c.post(&url).header("X-API-Key", key.clone()).json(&body),
            )
            .await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        parse(self.http.provider(), "connect sandbox", response)
            .await
            .map(Some)
    }

    pub async fn set_timeout(&self, id: &str, timeout_ms: u64) -> Result<()> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url(&format!("/sandboxes/{id}/timeout"));
        let body = serde_json::json!({"timeout": seconds(timeout_ms)});
        self.http
            .send(
                self.spec(RequestSpec::idempotent("set sandbox timeout")),
                |c| c.post(&url).header("X-API-Key", key.clone()).json(&body),
            )
            .await?;
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<PauseOutcome> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url(&format!("/sandboxes/{id}/pause"));
        let response = self
            .http
            .send(
                self.spec(RequestSpec::idempotent("pause sandbox").accept(&[404, 409])),
                |c| c.post(&url).header("X-API-Key", key.clone()),
            )
            .await?;
        Ok(match response.status().as_u16() {
            404 => PauseOutcome::Gone,
            409 => PauseOutcome::AlreadyDone,
            _ => PauseOutcome::Done,
        })
    }

    /// `false` when the sandbox was already gone.
    pub async fn kill(&self, id: &str) -> Result<bool> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url(&format!("/sandboxes/{id}"));
        let response = self
            .http
            .send(
                self.spec(RequestSpec::idempotent("kill sandbox").accept(&[404])),
                |c| c.delete(&url).header("X-API-Key", key.clone()),
            )
            .await?;
        Ok(response.status().as_u16() != 404)
    }
}

async fn parse(
    provider: &str,
    operation: &str,
    response: reqwest::Response,
) -> Result<SandboxInfo> {
    let text = response.text().await.map_err(|e| {
        Error::provider_with_source(
            provider,
            format!("{operation}: reading the response failed"),
            true,
            e,
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::provider_with_source(
            provider,
            format!("{operation}: unexpected response body ({e})"),
            false,
            e,
        )
    })
}
