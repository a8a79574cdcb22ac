//! The control-plane client (spec 25 §2): one tonic channel, Modal's
//! metadata on every call, the lazily fetched auth token, retries of
//! idempotent unary calls, and gRPC status → [`Error`] mapping.

use std::future::Future;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use paperclip_env_core::{Error, Result};
use paperclip_env_modal_proto::api::modal_client_client::ModalClientClient;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use super::PROVIDER;

/// Sent as `x-modal-client-type`: `CLIENT_TYPE_LIBMODAL_JS`, what the JS SDK
/// the Paperclip plugin uses sends (7, `CLIENT_TYPE_LIBMODAL`, means
/// "libmodal before v0.3.15" to the server).
pub(crate) const CLIENT_TYPE: &str = "8";
/// Sent as `x-modal-client-version` ("behave like Python SDK 1.0.0").
pub(crate) const CLIENT_VERSION: &str = "1.0.0";

/// Retry policy of idempotent unary calls (spec 25 §2.4).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt (default 3).
    pub max_retries: u32,
    /// First back-off (default 100 ms), doubled per attempt.
    pub initial_backoff: Duration,
    /// Back-off cap (default 1 s).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// The wait a throttled call's status asks for: an `RPCRetryPolicy` among the
/// `RPCStatus` details of `grpc-status-details-bin` (as Modal's SDKs read it).
pub(crate) fn server_retry_after(status: &Status) -> Option<Duration> {
    use paperclip_env_modal_proto::api::{RpcRetryPolicy, RpcStatus};
    use paperclip_env_modal_proto::prost::Message;
    let details = status.details();
    if details.is_empty() {
        return None;
    }
    let rpc_status = RpcStatus::decode(details).ok()?;
    let policy = rpc_status
        .details
        .iter()
        .find(|d| d.type_url.ends_with("/modal.client.RPCRetryPolicy"))?;
    let policy = RpcRetryPolicy::decode(policy.value.as_slice()).ok()?;
    Duration::try_from_secs_f32(policy.retry_after_secs.max(0.0)).ok()
}

impl RetryPolicy {
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.max_backoff)
    }
}

/// gRPC codes a repeated call may get past (spec 25 §2.4).
pub(crate) fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::DeadlineExceeded
            | Code::Unavailable
            | Code::Cancelled
            | Code::Internal
            | Code::Unknown
    )
}

/// Maps a gRPC status onto the SDK error, naming the RPC. The status message
/// comes from the server and is scrubbed by the caller's `scrub`.
pub(crate) fn map_status(rpc: &str, status: &Status, scrub: impl Fn(&str) -> String) -> Error {
    let message = format!("Modal {rpc} failed: {}", scrub(status.message()));
    match status.code() {
        Code::Unauthenticated => Error::Unauthenticated {
            message,
            source: None,
        },
        Code::PermissionDenied => Error::PermissionDenied {
            message,
            source: None,
        },
        Code::NotFound => Error::NotFound {
            message,
            source: None,
        },
        Code::DeadlineExceeded => Error::Timeout {
            operation: format!("Modal {rpc}"),
            after: Duration::ZERO,
        },
        Code::ResourceExhausted => Error::RateLimited {
            message,
            retry_after: server_retry_after(status),
        },
        Code::AlreadyExists => Error::Conflict { message },
        Code::InvalidArgument | Code::OutOfRange => Error::InvalidInput {
            what: "Modal request",
            message,
        },
        code => Error::Provider {
            provider: PROVIDER.into(),
            message: format!("{message} ({code:?})"),
            retryable: retryable(code),
            source: None,
        },
    }
}

/// Expiry of a JWT from its unverified payload `exp`; `None` when absent.
pub(crate) fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

/// A metadata value holding a secret, marked sensitive so HTTP/2 never indexes or logs it.
pub(crate) fn secret_value(secret: &SecretString, field: &str) -> Result<AsciiMetadataValue> {
    let mut value = AsciiMetadataValue::try_from(secret.expose_secret()).map_err(|_| {
        Error::invalid_field(
            field,
            format!("{field} contains characters not allowed in a header"),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn ascii(value: &str) -> AsciiMetadataValue {
    AsciiMetadataValue::try_from(value).unwrap_or_else(|_| AsciiMetadataValue::from_static(""))
}

struct AuthToken {
    token: SecretString,
    expires_at: SystemTime,
}

/// A control-plane session for one (server, token) pair.
pub(crate) struct ControlPlane {
    client: ModalClientClient<Channel>,
    token_id: SecretString,
    token_secret: SecretString,
    auth: tokio::sync::Mutex<Option<AuthToken>>,
    pub(crate) call_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    /// Longest a call waits in total for the server's throttling.
    pub(crate) max_throttle_wait: Duration,
    pub(crate) local: bool,
}

/// How one logical unary call is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallOptions {
    /// Whether transient failures are retried (same idempotency key).
    pub(crate) idempotent: bool,
    /// Deadline of each attempt.
    pub(crate) timeout: Duration,
}

impl ControlPlane {
    pub(crate) fn new(
        channel: Channel,
        token_id: SecretString,
        token_secret: SecretString,
        call_timeout: Duration,
        retry: RetryPolicy,
        max_throttle_wait: Duration,
        local: bool,
    ) -> Self {
        ControlPlane {
            client: ModalClientClient::new(channel)
                .max_decoding_message_size(100 * 1024 * 1024)
                .max_encoding_message_size(100 * 1024 * 1024),
            token_id,
            token_secret,
            auth: tokio::sync::Mutex::new(None),
            call_timeout,
            retry,
            max_throttle_wait,
            local,
        }
    }

    /// Replaces secret values in server text before it reaches an error or a log.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in [&self.token_id, &self.token_secret] {
            let s = secret.expose_secret();
            if !s.is_empty() {
                out = out.replace(s, "[REDACTED]");
            }
        }
        out
    }

    fn decorate(
        &self,
        meta: &mut MetadataMap,
        auth: Option<&SecretString>,
        idempotency_key: &str,
        attempt: u32,
        throttle_attempt: u32,
        started: Instant,
    ) -> Result<()> {
        meta.insert(
            "x-modal-client-type",
            AsciiMetadataValue::from_static(CLIENT_TYPE),
        );
        meta.insert(
            "x-modal-client-version",
            AsciiMetadataValue::from_static(CLIENT_VERSION),
        );
        meta.insert(
            "x-modal-libmodal-version",
            ascii(concat!("paperclip-env-rs/", env!("CARGO_PKG_VERSION"))),
        );
        meta.insert("x-modal-token-id", secret_value(&self.token_id, "tokenId")?);
        meta.insert(
            "x-modal-token-secret",
            secret_value(&self.token_secret, "tokenSecret")?,
        );
        if let Some(token) = auth {
            meta.insert("x-modal-auth-token", secret_value(token, "authToken")?);
        }
        meta.insert("x-idempotency-key", ascii(idempotency_key));
        meta.insert("x-retry-attempt", ascii(&attempt.to_string()));
        meta.insert(
            "x-throttle-retry-attempt",
            ascii(&throttle_attempt.to_string()),
        );
        let delay = || ascii(&format!("{:.3}", started.elapsed().as_secs_f64()));
        if attempt > 0 {
            meta.insert("x-retry-delay", delay());
        }
        if throttle_attempt > 0 {
            meta.insert("x-throttle-retry-delay", delay());
        }
        Ok(())
    }

    /// The auth token, fetched (or refreshed within 5 min of expiry) under one lock.
    async fn auth_token(&self) -> Result<SecretString> {
        let mut slot = self.auth.lock().await;
        let now = SystemTime::now();
        if let Some(current) = slot.as_ref()
            && current.expires_at > now + Duration::from_secs(300)
        {
            return Ok(current.token.clone());
        }
        // A token near its expiry is refreshed; while it is still valid, a
        // failed refresh keeps it in use (the next call tries again).
        let still_valid = slot
            .as_ref()
            .filter(|current| current.expires_at > now)
            .map(|current| current.token.clone());
        let fetched = self
            .unary(
                "AuthTokenGet",
                Default::default(),
                CallOptions {
                    idempotent: true,
                    timeout: self.call_timeout,
                },
                None,
                |mut c, r| async move { c.auth_token_get(r).await },
            )
            .await
            .and_then(|response| {
                if response.token.is_empty() {
                    Err(Error::provider(
                        PROVIDER,
                        "Internal error: did not receive auth token from server, please contact Modal support",
                    ))
                } else {
                    Ok(response)
                }
            });
        let response = match (fetched, still_valid) {
            (Ok(response), _) => response,
            (Err(error), Some(token)) => {
                warn!(provider = PROVIDER, %error, "refreshing the Modal auth token failed; the current one is still valid");
                return Ok(token);
            }
            (Err(error), None) => return Err(error),
        };
        let expires_at = jwt_expiry(&response.token)
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(20 * 60));
        let token = SecretString::from(response.token);
        *slot = Some(AuthToken {
            token: token.clone(),
            expires_at,
        });
        Ok(token)
    }

    /// One logical unary call: a fresh idempotency key, the auth token, the
    /// per-call deadline, and (when `idempotent`) retries on transient codes.
    pub(crate) async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        idempotent: bool,
        f: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let options = CallOptions {
            idempotent,
            timeout: self.call_timeout,
        };
        self.call_with(rpc, request, options, f).await
    }

    /// [`ControlPlane::call`] with explicit options (e.g. a longer deadline).
    pub(crate) async fn call_with<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        options: CallOptions,
        f: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let token = self.auth_token().await?;
        self.unary(rpc, request, options, Some(&token), f).await
    }

    /// Like [`ControlPlane::call`], but a final gRPC status is handed back
    /// for the caller to interpret (SDK errors still fail).
    pub(crate) async fn call_status<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        idempotent: bool,
        f: F,
    ) -> Result<std::result::Result<Resp, Status>>
    where
        Req: Clone,
        F: Fn(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let token = self.auth_token().await?;
        let options = CallOptions {
            idempotent,
            timeout: self.call_timeout,
        };
        self.unary_status(rpc, request, options, Some(&token), f)
            .await
    }

    async fn unary<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        options: CallOptions,
        auth: Option<&SecretString>,
        f: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        match self.unary_status(rpc, request, options, auth, f).await? {
            Ok(response) => Ok(response),
            Err(status) if status.code() == Code::DeadlineExceeded => Err(Error::Timeout {
                operation: format!("Modal {rpc}"),
                after: options.timeout,
            }),
            Err(status) => Err(map_status(rpc, &status, |m| self.scrub(m))),
        }
    }

    async fn unary_status<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        request: Req,
        options: CallOptions,
        auth: Option<&SecretString>,
        f: F,
    ) -> Result<std::result::Result<Resp, Status>>
    where
        Req: Clone,
        F: Fn(ModalClientClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let key = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut throttle_attempt = 0u32;
        loop {
            let mut req = Request::new(request.clone());
            self.decorate(
                req.metadata_mut(),
                auth,
                &key,
                attempt,
                throttle_attempt,
                started,
            )?;
            req.set_timeout(options.timeout);
            let status = match tokio::time::timeout(
                options.timeout + Duration::from_secs(1),
                f(self.client.clone(), req),
            )
            .await
            {
                Ok(Ok(response)) => return Ok(Ok(response.into_inner())),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("client deadline elapsed"),
            };
            // Throttling: the server did nothing and names the wait; every
            // call honours it (idempotent or not), within max_throttle_wait.
            if let Some(after) = server_retry_after(&status) {
                let wait = after.max(self.retry.initial_backoff);
                if started.elapsed() + wait < self.max_throttle_wait {
                    debug!(
                        provider = PROVIDER,
                        rpc,
                        throttle_attempt,
                        wait_ms = wait.as_millis() as u64,
                        "Modal asked to retry later"
                    );
                    tokio::time::sleep(wait).await;
                    throttle_attempt += 1;
                    continue;
                }
                return Ok(Err(status));
            }
            if options.idempotent && retryable(status.code()) && attempt < self.retry.max_retries {
                let delay = self.retry.backoff(attempt);
                debug!(provider = PROVIDER, rpc, attempt, code = ?status.code(), "retrying Modal call");
                tokio::time::sleep(delay).await;
                attempt += 1;
                continue;
            }
            return Ok(Err(status));
        }
    }

    /// The raw client for streaming calls, with Modal metadata attached.
    pub(crate) async fn streaming_request<Req>(
        &self,
        request: Req,
    ) -> Result<(ModalClientClient<Channel>, Request<Req>)> {
        let token = self.auth_token().await?;
        let mut req = Request::new(request);
        let key = uuid::Uuid::new_v4().to_string();
        self.decorate(req.metadata_mut(), Some(&token), &key, 0, 0, Instant::now())?;
        Ok((self.client.clone(), req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_expiry_reads_exp() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":2000000000}"#);
        let token = format!("h.{payload}.s");
        assert_eq!(
            jwt_expiry(&token),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(jwt_expiry("not-a-jwt"), None);
    }

    #[test]
    fn status_mapping() {
        let id = |m: &str| m.to_owned();
        assert!(matches!(
            map_status("X", &Status::unauthenticated("no"), id),
            Error::Unauthenticated { .. }
        ));
        assert!(map_status("X", &Status::not_found("gone"), id).is_not_found());
        assert!(matches!(
            map_status("X", &Status::resource_exhausted("slow"), id),
            Error::RateLimited { .. }
        ));
        let e = map_status("X", &Status::unavailable("down"), id);
        assert!(e.is_retryable(), "{e:?}");
        assert!(!map_status("X", &Status::failed_precondition("no"), id).is_retryable());
        assert_eq!(RetryPolicy::default().backoff(5), Duration::from_secs(1));
    }
}
