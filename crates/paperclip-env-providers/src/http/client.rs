//! The retrying HTTP client.

use std::time::Duration;

use paperclip_env_core::{Error, Result};
use reqwest::header::RETRY_AFTER;
use tracing::{Instrument, debug, debug_span, field};

use super::retry::{RetryPolicy, parse_retry_after};
use super::status::{error_for_status, message_from_body};

/// Client-wide settings. Each default has a reason:
/// - `connect_timeout` 10 s: OpenSSH's `ConnectTimeout=10` and E2B's edge both
///   answer well within it; a dead host should fail fast.
/// - `request_timeout` 60 s: the E2B SDK's per-call timeout; bounds each
///   control-plane call and each streaming handshake, never a command.
/// - retries: see [`RetryPolicy::default`].
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// TCP + TLS connect deadline.
    pub connect_timeout: Duration,
    /// Deadline of one request (for streams: until the response headers).
    pub request_timeout: Duration,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// `User-Agent` sent on every request.
    pub user_agent: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            user_agent: format!("paperclip-env/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Whether repeating a call can do harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Safe to repeat: 5xx and timeouts are retried.
    Idempotent,
    /// Not safe (creating a sandbox, starting a command): only failures that
    /// provably never reached the server (connect errors, 429) are retried.
    NotIdempotent,
}

/// How to send one call.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Operation name for errors and spans (e.g. `"create sandbox"`).
    pub operation: &'static str,
    /// Retry safety.
    pub idempotency: Idempotency,
    /// Statuses returned to the caller instead of mapped to an error (e.g. 404 on kill).
    pub accept: &'static [u16],
    /// Return every status but 429 to the caller (providers with their own error bodies).
    pub accept_all: bool,
    /// Statuses known to mean "not delivered", retried even when not idempotent.
    pub retry_statuses: &'static [u16],
    /// The response is a stream: the request timeout bounds only the wait for headers.
    pub stream: bool,
    /// Overrides the client's request timeout.
    pub timeout: Option<Duration>,
    /// Overrides the client's retry policy.
    pub retry: Option<RetryPolicy>,
}

impl RequestSpec {
    /// An idempotent call.
    pub fn idempotent(operation: &'static str) -> Self {
        RequestSpec {
            operation,
            idempotency: Idempotency::Idempotent,
            accept: &[],
            accept_all: false,
            retry_statuses: &[],
            stream: false,
            timeout: None,
            retry: None,
        }
    }

    /// A call that must not be repeated blindly.
    pub fn not_idempotent(operation: &'static str) -> Self {
        RequestSpec {
            idempotency: Idempotency::NotIdempotent,
            ..Self::idempotent(operation)
        }
    }

    /// Returns these statuses to the caller.
    pub fn accept(mut self, statuses: &'static [u16]) -> Self {
        self.accept = statuses;
        self
    }

    /// Returns every status but 429 to the caller.
    pub fn accept_all(mut self) -> Self {
        self.accept_all = true;
        self
    }

    /// Retries these statuses regardless of idempotency.
    pub fn retry_statuses(mut self, statuses: &'static [u16]) -> Self {
        self.retry_statuses = statuses;
        self
    }

    /// Marks the response as a stream.
    pub fn stream(mut self) -> Self {
        self.stream = true;
        self
    }

    /// Overrides the request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Overrides the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }
}

/// One `reqwest` client per provider instance, with retries and error mapping.
///
/// ```
/// use paperclip_env_providers::http::{HttpClient, HttpOptions};
/// let client = HttpClient::new("e2b", HttpOptions::default()).unwrap();
/// assert_eq!(client.provider(), "e2b");
/// ```
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    options: HttpOptions,
    provider: String,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("provider", &self.provider)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds the client.
    pub fn new(provider: impl Into<String>, options: HttpOptions) -> Result<Self> {
        let provider = provider.into();
        let inner = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .user_agent(options.user_agent.clone())
            .build()
            .map_err(|e| {
                Error::provider_with_source(
                    provider.clone(),
                    "building the HTTP client failed",
                    false,
                    e,
                )
            })?;
        Ok(HttpClient {
            inner,
            options,
            provider,
        })
    }

    /// The provider key used in errors.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The settings.
    pub fn options(&self) -> &HttpOptions {
        &self.options
    }

    /// The underlying client.
    pub fn reqwest(&self) -> &reqwest::Client {
        &self.inner
    }

    /// Sends a request built by `build` (called once per attempt), retrying
    /// per the spec, and returns a response whose status is a success or one
    /// of `spec.accept`; any other status becomes a typed error.
    pub async fn send(
        &self,
        spec: RequestSpec,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let policy = spec.retry.unwrap_or(self.options.retry);
        let timeout = spec.timeout.unwrap_or(self.options.request_timeout);
        let idempotent = spec.idempotency == Idempotency::Idempotent;
        let span = debug_span!("http", provider = %self.provider, operation = spec.operation, attempt = field::Empty, status = field::Empty);
        async {
            let mut attempt = 0u32;
            loop {
                tracing::Span::current().record("attempt", attempt);
                let mut request = build(&self.inner);
                if !spec.stream {
                    request = request.timeout(timeout);
                }
                let started = std::time::Instant::now();
                let sent = match tokio::time::timeout(timeout, request.send()).await {
                    Ok(result) => result.map_err(Failure::Transport),
                    Err(_) => Err(Failure::Deadline),
                };
                let retries_left = attempt < policy.max_retries;
                match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        tracing::Span::current().record("status", status);
                        debug!(elapsed_ms = started.elapsed().as_millis() as u64, "response");
                        if response.status().is_success() || spec.accept.contains(&status) || (spec.accept_all && status != 429) {
                            return Ok(response);
                        }
                        let retry_after = response
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_retry_after);
                        let body = tokio::time::timeout(timeout, response.text()).await.ok().and_then(|r| r.ok()).unwrap_or_default();
                        let message = message_from_body(&body);
                        let retryable_status = status == 429
                            || spec.retry_statuses.contains(&status)
                            || (idempotent && matches!(status, 500 | 502 | 503 | 504));
                        let wait = match retry_after {
                            Some(after) if status == 429 && after > policy.max_retry_after => None,
                            Some(after) if status == 429 => Some(after),
                            _ => Some(policy.backoff(attempt)),
                        };
                        if retryable_status && retries_left && let Some(wait) = wait {
                            debug!(status, wait_ms = wait.as_millis() as u64, "retrying");
                            tokio::time::sleep(wait).await;
                            attempt += 1;
                            continue;
                        }
                        return Err(error_for_status(&self.provider, spec.operation, status, &message, retry_after));
                    }
                    Err(failure) => {
                        let (retryable, error) = self.transport_error(&spec, failure, timeout, idempotent);
                        if retryable && retries_left {
                            let wait = policy.backoff(attempt);
                            debug!(%error, wait_ms = wait.as_millis() as u64, "retrying after transport error");
                            tokio::time::sleep(wait).await;
                            attempt += 1;
                            continue;
                        }
                        return Err(error);
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn transport_error(
        &self,
        spec: &RequestSpec,
        failure: Failure,
        timeout: Duration,
        idempotent: bool,
    ) -> (bool, Error) {
        match failure {
            Failure::Deadline => (
                idempotent,
                Error::Timeout {
                    operation: format!("{} {}", self.provider, spec.operation),
                    after: timeout,
                },
            ),
            Failure::Transport(e) if e.is_timeout() => (
                idempotent,
                Error::Timeout {
                    operation: format!("{} {}", self.provider, spec.operation),
                    after: timeout,
                },
            ),
            Failure::Transport(e) if e.is_connect() => (
                true,
                Error::provider_with_source(
                    self.provider.clone(),
                    format!("{}: connection failed: {e}", spec.operation),
                    true,
                    e,
                ),
            ),
            Failure::Transport(e) => (
                idempotent,
                Error::provider_with_source(
                    self.provider.clone(),
                    format!("{}: request failed: {e}", spec.operation),
                    true,
                    e,
                ),
            ),
        }
    }
}

enum Failure {
    Transport(reqwest::Error),
    Deadline,
}
