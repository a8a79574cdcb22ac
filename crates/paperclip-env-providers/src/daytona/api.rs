//! Daytona REST API (sandbox lifecycle) and toolbox (in-sandbox daemon)
//! calls (spec 22 §5).

use std::time::Duration;

use paperclip_env_core::{Error, Result};
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::http::{HttpClient, RequestSpec, message_from_body};

const KEY: &str = "daytona";
/// Sent so the daemon splits stdout and stderr (spec 22 §5.6).
pub(crate) const SDK_VERSION: &str = "0.183.0";

/// One resolved connection (resolved once per operation).
pub(crate) struct Conn {
    pub api_base: String,
    pub api_key: SecretString,
    pub target: Option<String>,
    pub liveness: Option<Duration>,
}

impl Conn {
    pub fn headers(&self) -> Result<HeaderMap> {
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.api_key.expose_secret()))
            .map_err(|_| {
            Error::invalid_field("apiKey", "the Daytona API key is not a valid header value")
        })?;
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        headers.insert(
            "x-daytona-source",
            HeaderValue::from_static("paperclip-env"),
        );
        headers.insert(
            "x-daytona-sdk-version",
            HeaderValue::from_static(SDK_VERSION),
        );
        Ok(headers)
    }
}

/// The fields of a `Sandbox` the provider uses.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Sandbox {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub error_reason: Option<String>,
    #[serde(default)]
    pub recoverable: Option<bool>,
    #[serde(default)]
    pub toolbox_proxy_url: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
}

impl Sandbox {
    pub fn state(&self) -> &str {
        self.state.as_deref().unwrap_or("unknown")
    }
}

pub(crate) fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

pub(crate) struct Api<'a> {
    pub http: &'a HttpClient,
    pub conn: &'a Conn,
}

async fn json_of<T: for<'de> Deserialize<'de>>(op: &str, response: reqwest::Response) -> Result<T> {
    let text = response.text().await.map_err(|e| {
        Error::provider_with_source(KEY, format!("{op}: reading the response failed"), true, e)
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::provider(KEY, format!("{op}: unexpected response: {e}")))
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.conn.api_base.trim_end_matches('/'))
    }

    pub async fn create(&self, body: &Value, timeout: Duration) -> Result<Sandbox> {
        let headers = self.conn.headers()?;
        let url = self.url("/sandbox");
        let response = self
            .http
            .send(
                RequestSpec::not_idempotent("create sandbox").timeout(timeout),
                |c| c.post(&url).headers(headers.clone()).json(body),
            )
            .await?;
        json_of("create sandbox", response).await
    }

    /// `None` when the sandbox does not exist.
    pub async fn get(&self, id: &str) -> Result<Option<Sandbox>> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/sandbox/{id}"));
        let mut spec = RequestSpec::idempotent("get sandbox").accept(&[404]);
        if let Some(liveness) = self.conn.liveness {
            spec = spec.timeout(liveness);
        }
        let response = self
            .http
            .send(spec, |c| c.get(&url).headers(headers.clone()))
            .await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        json_of("get sandbox", response).await.map(Some)
    }

    async fn action(
        &self,
        id: &str,
        op: &'static str,
        path: &str,
        timeout: Duration,
    ) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/sandbox/{id}/{path}"));
        self.http
            .send(RequestSpec::idempotent(op).timeout(timeout), |c| {
                c.post(&url).headers(headers.clone())
            })
            .await
            .map_err(|e| match e {
                Error::Timeout { after, .. } => Error::Timeout {
                    operation: format!(
                        "Daytona sandbox liveness call \"{op}\" did not respond within {} ms; the sandbox connection is unresponsive.",
                        after.as_millis()
                    ),
                    after,
                },
                other => other,
            })?;
        Ok(())
    }

    pub async fn start(&self, id: &str, seconds: u64) -> Result<()> {
        self.action(
            id,
            "start",
            "start",
            Duration::from_millis(seconds * 1000 + 5000),
        )
        .await
    }

    pub async fn recover(&self, id: &str, seconds: u64) -> Result<()> {
        self.action(
            id,
            "recover",
            "recover",
            Duration::from_millis(seconds * 1000 + 5000),
        )
        .await
    }

    pub async fn stop(&self, id: &str, seconds: u64) -> Result<()> {
        self.action(id, "stop", "stop", Duration::from_secs(seconds.max(1)))
            .await
    }

    pub async fn archive(&self, id: &str, seconds: u64) -> Result<()> {
        self.action(
            id,
            "archive",
            "archive",
            Duration::from_secs(seconds.max(1)),
        )
        .await
    }

    pub async fn set_auto_delete(&self, id: &str, minutes: i64) -> Result<()> {
        self.action(
            id,
            "set auto-delete",
            &format!("autodelete/{minutes}"),
            Duration::from_secs(30),
        )
        .await
    }

    /// The sandboxes carrying every label of `labels` (`GET /sandbox`,
    /// following `nextCursor`; an API answering a bare array is read too).
    pub async fn list(&self, labels: &Value) -> Result<Vec<Sandbox>> {
        let headers = self.conn.headers()?;
        let url = self.url("/sandbox");
        let filter = labels.to_string();
        let mut cursor: Option<String> = None;
        let mut out = Vec::new();
        // A bound on pages: one run labels a handful of sandboxes.
        for _ in 0..50 {
            let mut query = vec![("labels", filter.clone()), ("limit", "100".to_owned())];
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let response = self
                .http
                .send(RequestSpec::idempotent("list sandboxes"), |c| {
                    c.get(&url).headers(headers.clone()).query(&query)
                })
                .await?;
            let page: Value = json_of("list sandboxes", response).await?;
            let items = match &page {
                Value::Array(items) => items.clone(),
                other => other["items"].as_array().cloned().unwrap_or_default(),
            };
            for item in items {
                let sandbox: Sandbox = serde_json::from_value(item).map_err(|e| {
                    Error::provider(KEY, format!("list sandboxes: unexpected item: {e}"))
                })?;
                out.push(sandbox);
            }
            cursor = page["nextCursor"]
                .as_str()
                .filter(|c| !c.is_empty())
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// `false` when the sandbox was already gone.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/sandbox/{id}"));
        let response = self
            .http
            .send(
                RequestSpec::idempotent("delete sandbox").accept(&[404]),
                |c| c.delete(&url).headers(headers.clone()),
            )
            .await?;
        Ok(response.status().as_u16() != 404)
    }

    /// Polls until `started` (spec 22 §5.3).
    pub async fn wait_started(&self, id: &str, seconds: u64) -> Result<Sandbox> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut interval = Duration::from_millis(100);
        let begun = Instant::now();
        loop {
            let sandbox = self
                .get(id)
                .await?
                .ok_or_else(|| Error::not_found(format!("daytona: sandbox {id} not found")))?;
            match sandbox.state() {
                "started" => return Ok(sandbox),
                "error" | "build_failed" => {
                    return Err(Error::provider(
                        KEY,
                        format!(
                            "Sandbox {id} failed to start with status: {}, error reason: {}",
                            sandbox.state(),
                            sandbox.error_reason.as_deref().unwrap_or("unknown")
                        ),
                    ));
                }
                _ => {}
            }
            if Instant::now() + interval > deadline {
                return Err(Error::Timeout {
                    operation: format!(
                        "daytona: sandbox {id} did not reach started (still {})",
                        sandbox.state()
                    ),
                    after: Duration::from_secs(seconds),
                });
            }
            tokio::time::sleep(interval).await;
            if begun.elapsed() > Duration::from_secs(5) {
                interval = interval.mul_f64(1.1).min(Duration::from_secs(1));
            }
        }
    }

    /// Polls until `stopped` or gone.
    pub async fn wait_stopped(&self, id: &str, seconds: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let Some(sandbox) = self.get(id).await? else {
                return Ok(());
            };
            match sandbox.state() {
                "stopped" | "destroyed" | "archived" => return Ok(()),
                "error" | "build_failed" => {
                    return Err(Error::provider(
                        KEY,
                        format!(
                            "Sandbox {id} failed to stop with status: {}",
                            sandbox.state()
                        ),
                    ));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: format!("daytona: sandbox {id} did not reach stopped"),
                    after: Duration::from_secs(seconds),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The outcome of a one-shot `process/execute`.
pub(crate) enum OneShot {
    Done {
        exit_code: Option<i32>,
        result: String,
    },
    TimedOut(String),
}

/// Toolbox calls for one sandbox.
pub(crate) struct Toolbox<'a> {
    pub http: &'a HttpClient,
    /// The HTTP/1.1 client for log sockets.
    pub ws: &'a reqwest::Client,
    pub conn: &'a Conn,
    pub base: String,
}

impl<'a> Toolbox<'a> {
    pub fn new(
        http: &'a HttpClient,
        ws: &'a reqwest::Client,
        conn: &'a Conn,
        sandbox: &Sandbox,
    ) -> Self {
        let base = match sandbox.toolbox_proxy_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => format!("{}/{}", url.trim_end_matches('/'), sandbox.id),
            _ => format!(
                "{}/toolbox/{}/toolbox",
                conn.api_base.trim_end_matches('/'),
                sandbox.id
            ),
        };
        Toolbox {
            http,
            ws,
            conn,
            base,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Opens a toolbox WebSocket (log follow).
    pub async fn open_socket(&self, path: &str) -> Result<crate::daytona::logs::Socket> {
        let headers = self.conn.headers()?;
        crate::daytona::logs::connect(
            self.ws,
            &self.url(path),
            &headers,
            self.http.options().request_timeout,
        )
        .await
    }

    pub async fn dir(&self, path: &str) -> Result<Option<String>> {
        let headers = self.conn.headers()?;
        let url = self.url(path);
        let response = self
            .http
            .send(RequestSpec::idempotent("work dir").accept(&[404]), |c| {
                c.get(&url).headers(headers.clone())
            })
            .await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        let value: Value = json_of("work dir", response).await?;
        Ok(value["dir"]
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }

    pub async fn mkdir(&self, path: &str) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url("/files/folder");
        self.http
            .send(RequestSpec::idempotent("create folder"), |c| {
                c.post(&url)
                    .headers(headers.clone())
                    .query(&[("path", path), ("mode", "755")])
            })
            .await?;
        Ok(())
    }

    pub async fn delete_file(&self, path: &str) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url("/files");
        self.http
            .send(RequestSpec::idempotent("delete file").accept(&[404]), |c| {
                c.delete(&url)
                    .headers(headers.clone())
                    .query(&[("path", path)])
            })
            .await?;
        Ok(())
    }

    /// Bulk upload of one file.
    pub async fn upload(&self, path: &str, bytes: &[u8], timeout: Duration) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url("/files/bulk-upload");
        self.http
            .send(
                RequestSpec::idempotent("upload file").timeout(timeout),
                |c| {
                    let part =
                        reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(path.to_owned());
                    let form = reqwest::multipart::Form::new()
                        .text("files[0].path", path.to_owned())
                        .part("files[0].file", part);
                    c.post(&url).headers(headers.clone()).multipart(form)
                },
            )
            .await?;
        Ok(())
    }

    /// Bulk download of one file.
    pub async fn download(&self, path: &str, timeout: Duration) -> Result<Vec<u8>> {
        let headers = self.conn.headers()?;
        let url = self.url("/files/bulk-download");
        let body = json!({"paths": [path]});
        let response = self
            .http
            .send(
                RequestSpec::idempotent("download file").timeout(timeout),
                |c| c.post(&url).headers(headers.clone()).json(&body),
            )
            .await?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.bytes().await.map_err(|e| {
            Error::provider_with_source(KEY, "download file: reading the response failed", true, e)
        })?;
        let boundary = content_type
            .split(';')
            .find_map(|p| p.trim().strip_prefix("boundary="))
            .map(|b| b.trim_matches('"').to_owned())
            .unwrap_or_else(|| "DAYTONA-FILE-BOUNDARY".to_owned());
        for (name, data) in parse_multipart(&bytes, &boundary) {
            match name.as_str() {
                "file" => return Ok(data),
                "error" => {
                    return Err(Error::provider(
                        KEY,
                        format!(
                            "download of {path} failed: {}",
                            message_from_body(&String::from_utf8_lossy(&data))
                        ),
                    ));
                }
                _ => {}
            }
        }
        Err(Error::provider(
            KEY,
            format!("download of {path}: no file part"),
        ))
    }

    pub async fn execute(&self, command: &str, seconds: u64) -> Result<OneShot> {
        let headers = self.conn.headers()?;
        let url = self.url("/process/execute");
        let body = json!({"command": command, "timeout": seconds});
        let response = self
            .http
            .send(
                RequestSpec::not_idempotent("execute")
                    .accept(&[408])
                    .timeout(Duration::from_secs(seconds + 30)),
                |c| c.post(&url).headers(headers.clone()).json(&body),
            )
            .await;
        let response = match response {
            Ok(r) => r,
            Err(Error::Timeout { .. }) => {
                return Ok(OneShot::TimedOut(format!(
                    "Command timed out after {seconds} s."
                )));
            }
            Err(e) => return Err(e),
        };
        if response.status().as_u16() == 408 {
            let text = response.text().await.unwrap_or_default();
            let message = message_from_body(&text);
            return Ok(OneShot::TimedOut(if message.is_empty() {
                "request timeout: command execution timeout".into()
            } else {
                message
            }));
        }
        let value: Value = json_of("execute", response).await?;
        Ok(OneShot::Done {
            exit_code: value["exitCode"].as_i64().map(|c| c as i32),
            result: value["result"].as_str().unwrap_or_default().to_owned(),
        })
    }

    pub async fn create_session(&self, sid: &str) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url("/process/session");
        let body = json!({"sessionId": sid});
        self.http
            .send(
                RequestSpec::idempotent("create session").accept(&[409]),
                |c| c.post(&url).headers(headers.clone()).json(&body),
            )
            .await?;
        Ok(())
    }

    /// `Ok(None)`: the session is unknown (the sandbox restarted).
    pub async fn exec_async(&self, sid: &str, command: &str) -> Result<Option<String>> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/process/session/{sid}/exec"));
        let body = json!({"command": command, "runAsync": true});
        let response = self
            .http
            .send(
                RequestSpec::not_idempotent("session exec").accept(&[404]),
                |c| c.post(&url).headers(headers.clone()).json(&body),
            )
            .await?;
        if response.status().as_u16() == 404 {
            return Ok(None);
        }
        let value: Value = json_of("session exec", response).await?;
        value["cmdId"]
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| Error::provider(KEY, "session exec: no cmdId in the response"))
    }

    /// The command's exit code once it has finished.
    pub async fn command_exit(&self, sid: &str, cid: &str) -> Result<Option<i32>> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/process/session/{sid}/command/{cid}"));
        let response = self
            .http
            .send(
                RequestSpec::idempotent("command status").timeout(Duration::from_secs(30)),
                |c| c.get(&url).headers(headers.clone()),
            )
            .await?;
        let value: Value = json_of("command status", response).await?;
        Ok(value["exitCode"].as_i64().map(|c| c as i32))
    }

    /// Split logs `(stdout, stderr)`.
    pub async fn command_logs(&self, sid: &str, cid: &str) -> Result<(String, String)> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/process/session/{sid}/command/{cid}/logs"));
        let response = self
            .http
            .send(RequestSpec::idempotent("command logs"), |c| {
                c.get(&url).headers(headers.clone())
            })
            .await?;
        let value: Value = json_of("command logs", response).await?;
        Ok((
            value["stdout"].as_str().unwrap_or_default().to_owned(),
            value["stderr"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    pub async fn delete_session(&self, sid: &str) -> Result<()> {
        let headers = self.conn.headers()?;
        let url = self.url(&format!("/process/session/{sid}"));
        self.http
            .send(
                RequestSpec::idempotent("delete session").accept(&[404]),
                |c| c.delete(&url).headers(headers.clone()),
            )
            .await?;
        Ok(())
    }
}

/// Parts `(name, body)` of a `multipart/form-data` body.
pub(crate) fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delimiter = format!("--{boundary}");
    let d = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut positions = Vec::new();
    let mut i = 0;
    while i + d.len() <= body.len() {
        if &body[i..i + d.len()] == d {
            positions.push(i);
            i += d.len();
        } else {
            i += 1;
        }
    }
    for w in positions.windows(2) {
        let chunk = &body[w[0] + d.len()..w[1]];
        let Some(split) = chunk.windows(4).position(|x| x == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&chunk[..split]);
        let mut data = &chunk[split + 4..];
        if data.ends_with(b"\r\n") {
            data = &data[..data.len() - 2];
        }
        let name = head
            .split(';')
            .find_map(|p| p.trim().strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_owned())
            .unwrap_or_default();
        parts.push((name, data.to_vec()));
    }
    parts
}
