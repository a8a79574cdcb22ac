//! The control-plane REST API (`https://api.<domain>`), spec 20 §5.3.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use paperclip_env_core::{Error, Result};
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

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

/// Which control-plane generation a server speaks, learned from its answers:
/// e2b ≥ 2.51 uses only `/v2/sandboxes` and `/v2/sandboxes/{id}/connect`;
/// older or compatible deployments serve v1 alone (a 404 on the v2 route).
pub(crate) const GENERATION_UNKNOWN: u8 = 0;
/// `/v2/…` answered.
pub(crate) const GENERATION_V2: u8 = 1;
/// `/v2/…` is not served: v1 only.
pub(crate) const GENERATION_V1: u8 = 2;

/// The `error_code` of a connect refused because the paused sandbox's
/// snapshot was taken while its guest agent hung; a resume without memory
/// (a cold boot from disk) still works.
const GUEST_UNRESPONSIVE: &str = "sandbox_snapshot_guest_agent_unresponsive";

pub(crate) struct Api<'a> {
    pub http: &'a HttpClient,
    pub conn: &'a ApiConn,
    /// Shared by every call of one provider.
    pub generation: &'a AtomicU8,
}

/// One control-plane answer read to its end.
struct Answer {
    status: u16,
    body: String,
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.conn.api_base.trim_end_matches('/'))
    }

    fn spec(&self, spec: RequestSpec) -> RequestSpec {
        spec.timeout(self.conn.request_timeout)
    }

    fn generation(&self) -> u8 {
        self.generation.load(Ordering::Relaxed)
    }

    fn learn(&self, generation: u8) {
        if self.generation.swap(generation, Ordering::Relaxed) != generation {
            debug!(
                provider = self.http.provider(),
                v2 = generation == GENERATION_V2,
                "control-plane generation"
            );
        }
    }

    async fn post(&self, spec: RequestSpec, path: &str, body: &Value) -> Result<Answer> {
        let key = sensitive(&self.conn.api_key, "apiKey")?;
        let url = self.url(path);
        let operation = spec.operation;
        let response = self
            .http
            .send(self.spec(spec), |c| {
                c.post(&url).header("X-API-Key", key.clone()).json(body)
            })
            .await?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|e| {
            Error::provider_with_source(
                self.http.provider(),
                format!("{operation}: reading the response failed"),
                true,
                e,
            )
        })?;
        Ok(Answer { status, body })
    }

    /// `POST /v2/sandboxes`, or `/sandboxes` where v2 is not served (a 404
    /// on the v2 route reached no handler, so nothing was created).
    pub async fn create(&self, body: &Value) -> Result<SandboxInfo> {
        if self.generation() != GENERATION_V1 {
            let answer = self
                .post(
                    RequestSpec::not_idempotent("create sandbox").accept(&[404]),
                    "/v2/sandboxes",
                    body,
                )
                .await?;
            if answer.status != 404 {
                self.learn(GENERATION_V2);
                return parse_text(self.http.provider(), "create sandbox", &answer.body);
            }
            if self.generation() == GENERATION_V2 {
                return Err(Error::provider(
                    self.http.provider(),
                    format!(
                        "create sandbox: HTTP 404: {}",
                        crate::http::message_from_body(&answer.body)
                    ),
                ));
            }
            self.learn(GENERATION_V1);
        }
        let answer = self
            .post(
                RequestSpec::not_idempotent("create sandbox"),
                "/sandboxes",
                body,
            )
            .await?;
        parse_text(self.http.provider(), "create sandbox", &answer.body)
    }

    /// Connects (resuming a paused sandbox); `None` when the sandbox is gone
    /// (404). v2 first, v1 where v2 is not served; a 409
    /// `sandbox_snapshot_guest_agent_unresponsive` is answered with a resume
    /// without memory.
    pub async fn connect(&self, id: &str, timeout_ms: u64) -> Result<Option<SandboxInfo>> {
        let body = json!({"timeout": seconds(timeout_ms)});
        let spec = || RequestSpec::idempotent("connect sandbox").accept(&[404, 409]);
        let mut v2 = false;
        let mut answer = None;
        if self.generation() != GENERATION_V1 {
            let first = self
                .post(spec(), &format!("/v2/sandboxes/{id}/connect"), &body)
                .await?;
            if first.status != 404 {
                self.learn(GENERATION_V2);
                v2 = true;
                answer = Some(first);
            } else if self.generation() == GENERATION_V2 {
                return Ok(None);
            }
        }
        let answer = match answer {
            Some(answer) => answer,
            None => {
                let answer = self
                    .post(spec(), &format!("/sandboxes/{id}/connect"), &body)
                    .await?;
                if answer.status != 404 && self.generation() == GENERATION_UNKNOWN {
                    self.learn(GENERATION_V1);
                }
                answer
            }
        };
        match answer.status {
            404 => Ok(None),
            409 => {
                let error: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
                if error.get("error_code").and_then(Value::as_str) != Some(GUEST_UNRESPONSIVE) {
                    return Err(Error::Conflict {
                        message: format!(
                            "{}: connect sandbox: HTTP 409: {}",
                            self.http.provider(),
                            crate::http::message_from_body(&answer.body)
                        ),
                    });
                }
                warn!(
                    sandbox = id,
                    "the sandbox's snapshot was taken while its guest agent hung; resuming it from disk (its processes are gone)"
                );
                self.cold_resume(id, timeout_ms, v2).await
            }
            _ => parse_text(self.http.provider(), "connect sandbox", &answer.body).map(Some),
        }
    }

    /// Resumes a paused sandbox from its disk state only (`memory: false`).
    async fn cold_resume(
        &self,
        id: &str,
        timeout_ms: u64,
        v2: bool,
    ) -> Result<Option<SandboxInfo>> {
        let (path, body) = if v2 {
            (
                format!("/v2/sandboxes/{id}/connect"),
                json!({"timeout": seconds(timeout_ms), "memory": false}),
            )
        } else {
            (
                format!("/sandboxes/{id}/resume"),
                json!({"timeout": seconds(timeout_ms), "autoPause": false, "memory": false}),
            )
        };
        let answer = self
            .post(
                RequestSpec::idempotent("resume sandbox without memory").accept(&[404]),
                &path,
                &body,
            )
            .await?;
        if answer.status == 404 {
            return Ok(None);
        }
        parse_text(
            self.http.provider(),
            "resume sandbox without memory",
            &answer.body,
        )
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

    /// Ids of the live (running or paused) sandboxes whose metadata has
    /// `key = value`: `GET /v2/sandboxes?metadata=…&state=running,paused`
    /// page by page (`x-next-token`), or `GET /sandboxes?metadata=…` where
    /// v2 is not served.
    pub async fn list_ids_by_metadata(&self, key: &str, value: &str) -> Result<Vec<String>> {
        let api_key = sensitive(&self.conn.api_key, "apiKey")?;
        let filter = format!("{key}={value}");
        let mut ids = Vec::new();
        if self.generation() != GENERATION_V1 {
            let url = self.url("/v2/sandboxes");
            let mut token: Option<String> = None;
            loop {
                let mut query: Vec<(&str, String)> = vec![
                    ("metadata", filter.clone()),
                    ("state", "running,paused".into()),
                    ("limit", "100".into()),
                ];
                if let Some(t) = &token {
                    query.push(("nextToken", t.clone()));
                }
                let response = self
                    .http
                    .send(
                        self.spec(RequestSpec::idempotent("list sandboxes").accept(&[404])),
                        |c| {
                            c.get(&url)
                                .header("X-API-Key", api_key.clone())
                                .query(&query)
                        },
                    )
                    .await?;
                if response.status().as_u16() == 404 {
                    self.learn(GENERATION_V1);
                    break;
                }
                self.learn(GENERATION_V2);
                let next = response
                    .headers()
                    .get("x-next-token")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                ids.extend(self.sandbox_ids(response).await?);
                match next {
                    Some(t) if token.as_deref() != Some(t.as_str()) => token = Some(t),
                    _ => return Ok(ids),
                }
            }
        }
        let url = self.url("/sandboxes");
        let response = self
            .http
            .send(self.spec(RequestSpec::idempotent("list sandboxes")), |c| {
                c.get(&url)
                    .header("X-API-Key", api_key.clone())
                    .query(&[("metadata", filter.as_str())])
            })
            .await?;
        ids.extend(self.sandbox_ids(response).await?);
        Ok(ids)
    }

    async fn sandbox_ids(&self, response: reqwest::Response) -> Result<Vec<String>> {
        let body = response.text().await.map_err(|e| {
            Error::provider_with_source(
                self.http.provider(),
                "list sandboxes: reading the response failed",
                true,
                e,
            )
        })?;
        let listed: Vec<Value> = serde_json::from_str(&body).map_err(|e| {
            Error::provider_with_source(
                self.http.provider(),
                format!("list sandboxes: unexpected response body ({e})"),
                false,
                e,
            )
        })?;
        Ok(listed
            .iter()
            .filter_map(|s| s.get("sandboxID").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
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

fn parse_text(provider: &str, operation: &str, text: &str) -> Result<SandboxInfo> {
    serde_json::from_str(text).map_err(|e| {
        Error::provider_with_source(
            provider,
            format!("{operation}: unexpected response body ({e})"),
            false,
            e,
        )
    })
}
