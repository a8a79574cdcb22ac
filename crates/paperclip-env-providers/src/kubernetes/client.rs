//! Kubernetes API calls: every call has a deadline, errors map to the SDK's
//! typed [`Error`], and only idempotent calls (GET, LIST, DELETE) are retried.

use std::time::Duration;

use kube::Client;
use paperclip_env_core::{Error, Result};
use serde_json::Value;
use tracing::debug;

/// Provider key used in errors.
pub(crate) const KEY: &str = "kubernetes";

/// Makes sure rustls has a process-wide crypto provider (aws-lc-rs) before
/// any client is built; a provider installed by someone else is kept.
pub(crate) fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing the race to another installer is fine: one provider is set either way.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
    });
}

/// Maps a kube error to the SDK error. `what` says which call failed.
pub(crate) fn map_error(what: &str, error: kube::Error) -> Error {
    match error {
        kube::Error::Api(status) => {
            let code = status.code;
            let message = format!("{what}: {} ({code} {})", status.message, status.reason);
            match code {
                404 => Error::not_found(message),
                401 => Error::Unauthenticated {
                    message,
                    source: None,
                },
                403 => Error::PermissionDenied {
                    message,
                    source: None,
                },
                409 => Error::Conflict { message },
                429 => Error::RateLimited {
                    message,
                    retry_after: None,
                },
                410 => Error::Provider {
                    provider: KEY.into(),
                    message: format!("{message}: resource version expired"),
                    retryable: true,
                    source: None,
                },
                c if c >= 500 => Error::Provider {
                    provider: KEY.into(),
                    message,
                    retryable: true,
                    source: None,
                },
                _ => Error::Provider {
                    provider: KEY.into(),
                    message,
                    retryable: false,
                    source: None,
                },
            }
        }
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => Error::Provider {
            provider: KEY.into(),
            message: format!("{what}: cannot reach the Kubernetes API: {e}"),
            retryable: true,
            source: Some(Box::new(e)),
        },
        e => Error::Provider {
            provider: KEY.into(),
            message: format!("{what}: {e}"),
            retryable: false,
            source: Some(Box::new(e)),
        },
    }
}

/// The status code of a mapped error, when it came from the API.
pub(crate) fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Conflict { .. })
}

/// A client plus the per-call deadline and retry budget.
#[derive(Clone)]
pub(crate) struct Kube {
    pub(crate) client: Client,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
}

fn request(
    method: http::Method,
    path: &str,
    body: Option<&Value>,
) -> Result<http::Request<Vec<u8>>> {
    let mut builder = http::Request::builder().method(method).uri(path);
    let bytes = match body {
        Some(b) => {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
            serde_json::to_vec(b)
                .map_err(|e| Error::provider(KEY, format!("encoding {path}: {e}")))?
        }
        None => Vec::new(),
    };
    builder
        .body(bytes)
        .map_err(|e| Error::provider(KEY, format!("building request {path}: {e}")))
}

impl Kube {
    async fn once<T>(&self, what: &str, fut: impl Future<Output = kube::Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| map_error(what, e)),
            Err(_) => Err(Error::Timeout {
                operation: format!("kubernetes {what}"),
                after: self.timeout,
            }),
        }
    }

    /// An idempotent call, retried on retryable errors with exponential
    /// back-off (100 ms doubling, at most 3.2 s).
    async fn idempotent(
        &self,
        what: &str,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut attempt = 0;
        loop {
            let req = request(method.clone(), path, body)?;
            match self.once(what, self.client.request::<Value>(req)).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && !is_conflict(&e) && attempt < self.retries => {
                    attempt += 1;
                    let backoff = Duration::from_millis(100u64 << attempt.min(5));
                    debug!(%e, attempt, "retrying idempotent Kubernetes call");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// GET; `None` on 404.
    pub(crate) async fn get(&self, path: &str) -> Result<Option<Value>> {
        match self
            .idempotent(&format!("GET {path}"), http::Method::GET, path, None)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// LIST `collection`, filtered by a label selector unless it is empty; the items.
    pub(crate) async fn list(&self, collection: &str, label_selector: &str) -> Result<Vec<Value>> {
        let path = if label_selector.is_empty() {
            collection.to_owned()
        } else {
            format!("{collection}?labelSelector={}", encode(label_selector))
        };
        let list = self
            .idempotent(
                &format!("LIST {collection}"),
                http::Method::GET,
                &path,
                None,
            )
            .await?;
        Ok(list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// POST (never retried: creating is not idempotent).
    pub(crate) async fn create(&self, collection: &str, body: &Value) -> Result<Value> {
        let req = request(http::Method::POST, collection, Some(body))?;
        self.once(
            &format!("POST {collection}"),
            self.client.request::<Value>(req),
        )
        .await
    }

    /// DELETE with `propagationPolicy=Foreground` (query and body); `false` on 404.
    pub(crate) async fn delete(&self, path: &str) -> Result<bool> {
        let full = format!("{path}?propagationPolicy=Foreground");
        let body = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"});
        match self
            .idempotent(
                &format!("DELETE {path}"),
                http::Method::DELETE,
                &full,
                Some(&body),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// GET returning text (pod logs).
    pub(crate) async fn get_text(&self, path: &str) -> Result<String> {
        let req = request(http::Method::GET, path, None)?;
        self.once(&format!("GET {path}"), self.client.request_text(req))
            .await
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A string at a JSON pointer.
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: "m".into(),
            reason: "R".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn status_codes_map_to_typed_errors() {
        assert!(map_error("x", api(404)).is_not_found());
        assert!(matches!(
            map_error("x", api(401)),
            Error::Unauthenticated { .. }
        ));
        assert!(matches!(
            map_error("x", api(403)),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(map_error("x", api(409)), Error::Conflict { .. }));
        assert!(map_error("x", api(410)).is_retryable());
        assert!(map_error("x", api(503)).is_retryable());
        assert!(!map_error("x", api(422)).is_retryable());
        assert_eq!(encode("a=b,c"), "a%3Db%2Cc");
    }
}
