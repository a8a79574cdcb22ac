//! Per-call deadlines derived from command and config budgets (spec 00 §9).
//! Explicit budgets are never clamped (Decision).

use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use crate::driver::RuntimeOptions;
use crate::secret::positive_ms;
use crate::{Error, Result};

/// Deadline of an execute call: request `timeoutMs`, else config `timeoutMs`,
/// plus the grace; the default deadline when neither is set.
pub fn execute_deadline(
    request_timeout_ms: Option<u64>,
    config_timeout: Option<&Value>,
    options: &RuntimeOptions,
) -> Duration {
    let base = request_timeout_ms
        .filter(|t| *t > 0)
        .or_else(|| positive_ms(config_timeout));
    match base {
        Some(ms) => Duration::from_millis(ms) + options.deadline_grace,
        None => options.default_call_deadline,
    }
}

/// Deadline of acquire / resume / release / realize: the larger of config
/// `timeoutMs` and `bridgeRequestTimeoutMs`, plus the grace; else the default.
pub fn lease_operation_deadline(
    timeout_ms: Option<&Value>,
    bridge_request_timeout_ms: Option<&Value>,
    options: &RuntimeOptions,
) -> Duration {
    match [
        positive_ms(timeout_ms),
        positive_ms(bridge_request_timeout_ms),
    ]
    .into_iter()
    .flatten()
    .max()
    {
        Some(ms) => Duration::from_millis(ms) + options.deadline_grace,
        None => options.default_call_deadline,
    }
}

/// Runs `future` under `deadline`, mapping expiry to [`Error::Timeout`].
pub async fn with_deadline<T>(
    operation: &str,
    deadline: Duration,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, future).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            operation: operation.to_owned(),
            after: deadline,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_the_contract_figures() {
        let o = RuntimeOptions::default();
        assert_eq!(
            execute_deadline(Some(1000), None, &o),
            Duration::from_millis(31_000)
        );
        assert_eq!(
            execute_deadline(None, Some(&json!(1234)), &o),
            Duration::from_millis(31_234)
        );
        assert_eq!(execute_deadline(None, None, &o), Duration::from_secs(30));
        assert_eq!(
            lease_operation_deadline(Some(&json!(1234)), None, &o),
            Duration::from_millis(31_234)
        );
        assert_eq!(
            lease_operation_deadline(Some(&json!(1234)), Some(&json!(40000)), &o),
            Duration::from_millis(70_000)
        );
        assert_eq!(
            lease_operation_deadline(None, None, &o),
            Duration::from_secs(30)
        );
        // Explicit budgets are not clamped at 15 minutes.
        assert_eq!(
            execute_deadline(Some(3_600_000), None, &o),
            Duration::from_millis(3_630_000)
        );
    }
}
