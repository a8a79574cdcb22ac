//! Mapping of HTTP statuses and bodies to the SDK error enum.

use std::time::Duration;

use paperclip_env_core::Error;
use serde_json::Value;

/// The human message of an error body: the JSON `message` (or `error`) field,
/// an HTML page summarised by its title, else the trimmed text (bounded).
pub fn message_from_body(body: &str) -> String {
    let trimmed = body.trim();
    if let Ok(json) = serde_json::from_str::<Value>(trimmed) {
        for key in ["message", "error", "detail"] {
            match json.get(key) {
                Some(Value::String(s)) if !s.is_empty() => return s.clone(),
                Some(Value::Object(o)) => {
                    if let Some(Value::String(s)) = o.get("message") {
                        return s.clone();
                    }
                }
                _ => {}
            }
        }
    }
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
        let title = lower.find("<title>").and_then(|start| {
            lower[start + 7..]
                .find("</title>")
                .map(|end| trimmed[start + 7..start + 7 + end].trim().to_owned())
        });
        return format!(
            "HTML error page{}",
            title.map(|t| format!(": {t}")).unwrap_or_default()
        );
    }
    trimmed.chars().take(300).collect()
}

/// The error for a non-success status.
pub fn error_for_status(
    provider: &str,
    operation: &str,
    status: u16,
    message: &str,
    retry_after: Option<Duration>,
) -> Error {
    let detail = if message.is_empty() {
        format!("{operation}: HTTP {status}")
    } else {
        format!("{operation}: HTTP {status}: {message}")
    };
    match status {
        401 => Error::Unauthenticated {
            message: format!("{provider}: unauthorized, please check your credentials ({detail})"),
            source: None,
        },
        403 => Error::PermissionDenied {
            message: format!("{provider}: {detail}"),
            source: None,
        },
        404 => Error::NotFound {
            message: format!("{provider}: {detail}"),
            source: None,
        },
        408 => Error::Timeout {
            operation: format!("{provider} {operation}"),
            after: Duration::ZERO,
        },
        429 => Error::RateLimited {
            message: format!("{provider}: rate limit exceeded ({detail})"),
            retry_after,
        },
        500..=599 => Error::Provider {
            provider: provider.to_owned(),
            message: detail,
            retryable: true,
            source: None,
        },
        _ => Error::Provider {
            provider: provider.to_owned(),
            message: detail,
            retryable: false,
            source: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(
            message_from_body(r#"{"code":401,"message":"Invalid API key"}"#),
            "Invalid API key"
        );
        assert_eq!(
            message_from_body(
                "<!DOCTYPE html><html><head><title>Access denied | Error 1010</title></head></html>"
            ),
            "HTML error page: Access denied | Error 1010"
        );
        assert_eq!(message_from_body(""), "");
    }

    #[test]
    fn statuses() {
        assert!(matches!(
            error_for_status("e2b", "create", 401, "x", None),
            Error::Unauthenticated { .. }
        ));
        assert!(error_for_status("e2b", "create", 404, "", None).is_not_found());
        let limited = error_for_status("e2b", "create", 429, "", Some(Duration::from_secs(1)));
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(1)));
        assert!(error_for_status("e2b", "create", 503, "", None).is_retryable());
        assert!(!error_for_status("e2b", "create", 400, "", None).is_retryable());
    }
}
