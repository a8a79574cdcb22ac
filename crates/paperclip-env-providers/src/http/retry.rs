//! Backoff with jitter and `Retry-After` parsing.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// How failed calls are retried.
///
/// ```
/// use std::time::Duration;
/// use paperclip_env_providers::http::RetryPolicy;
/// let policy = RetryPolicy::default();
/// assert!(policy.backoff(0) <= Duration::from_millis(200));
/// assert!(policy.backoff(10) <= policy.max_backoff);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 disables retries).
    pub max_retries: u32,
    /// Backoff before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    pub max_backoff: Duration,
    /// Upper bound of a server-requested `Retry-After` wait; longer requests
    /// are not waited for (the error is returned with its `retry_after`).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// Full-jitter exponential backoff for retry number `attempt` (0-based):
    /// a random duration in `[0, min(max, initial · 2^attempt)]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff);
        let millis = ceiling.as_millis() as u64;
        if millis == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// Parses a `Retry-After` value: delay seconds or an HTTP date.
///
/// ```
/// use std::time::Duration;
/// use paperclip_env_providers::http::parse_retry_after;
/// assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
/// assert_eq!(parse_retry_after("soon"), None);
/// ```
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            ..Default::default()
        };
        for attempt in 0..10 {
            let cap =
                Duration::from_millis(100 * 2u64.pow(attempt)).min(Duration::from_millis(800));
            assert!(p.backoff(attempt) <= cap);
        }
    }

    #[test]
    fn retry_after_dates() {
        let future = SystemTime::now() + Duration::from_secs(120);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(&httpdate::fmt_http_date(SystemTime::UNIX_EPOCH)),
            Some(Duration::ZERO)
        );
    }
}
