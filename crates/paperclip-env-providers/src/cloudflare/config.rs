//! Cloudflare bridge config (spec 23 §2).

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, JsonObject};
use schemars::JsonSchema;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Default workspace directory.
pub const DEFAULT_CWD: &str = "/workspace/paperclip";
/// Default per-command and bridge request timeout.
pub const DEFAULT_TIMEOUT_MS: i64 = 300_000;
const MAX_MS: i64 = 86_400_000;

/// How commands are grouped in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStrategy {
    /// A named session (`sessionId`).
    Named,
    /// The sandbox's default session.
    Default,
}

impl SessionStrategy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStrategy::Named => "named",
            SessionStrategy::Default => "default",
        }
    }
}

/// The parsed config.
#[derive(Clone)]
pub struct CloudflareConfig {
    /// Bridge Worker base URL (trimmed).
    pub bridge_base_url: String,
    /// Bridge bearer token.
    pub bridge_auth_token: Option<SecretString>,
    /// Reuse one sandbox per environment.
    pub reuse_lease: bool,
    /// Keep the container from idling.
    pub keep_alive: bool,
    /// Idle timeout (`"1h"`).
    pub sleep_after: String,
    /// Lowercase and sanitise sandbox ids.
    pub normalize_id: bool,
    /// Workspace directory.
    pub requested_cwd: String,
    /// Session grouping.
    pub session_strategy: SessionStrategy,
    /// Named session id.
    pub session_id: String,
    /// Default per-command timeout.
    pub timeout_ms: i64,
    /// Per-request timeout of bridge calls.
    pub bridge_request_timeout_ms: i64,
    /// Reserved.
    pub preview_hostname: Option<String>,
}

impl std::fmt::Debug for CloudflareConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareConfig")
            .field("bridge_base_url", &self.bridge_base_url)
            .field(
                "bridge_auth_token",
                &self.bridge_auth_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("reuse_lease", &self.reuse_lease)
            .field("keep_alive", &self.keep_alive)
            .field("sleep_after", &self.sleep_after)
            .field("requested_cwd", &self.requested_cwd)
            .field("session_strategy", &self.session_strategy)
            .field("session_id", &self.session_id)
            .field("timeout_ms", &self.timeout_ms)
            .field("bridge_request_timeout_ms", &self.bridge_request_timeout_ms)
            .finish_non_exhaustive()
    }
}

/// JSON Schema of the config (the token is the one secret field).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct CloudflareConfigSchema {
    /// Bridge Worker base URL (https unless localhost).
    bridge_base_url: String,
    /// Bridge bearer token.
    #[schemars(with = "SecretRefField")]
    bridge_auth_token: String,
    /// Reuse one sandbox per environment instead of one per run (requires keepAlive).
    reuse_lease: Option<bool>,
    /// Keep the container from idling between requests.
    keep_alive: Option<bool>,
    /// Idle timeout passed to getSandbox(); ignored when keepAlive is true.
    sleep_after: Option<String>,
    /// Lowercase and sanitise sandbox ids.
    normalize_id: Option<bool>,
    /// Workspace directory created in the sandbox.
    requested_cwd: Option<String>,
    /// `named` or `default`.
    session_strategy: Option<String>,
    /// Name of the session when `named`.
    session_id: Option<String>,
    /// Default per-command timeout.
    timeout_ms: Option<i64>,
    /// HTTP timeout of bridge requests.
    bridge_request_timeout_ms: Option<i64>,
    /// Reserved.
    preview_hostname: Option<String>,
}

fn string(values: &JsonObject, key: &str) -> Option<String> {
    values
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn boolean(values: &JsonObject, key: &str, default: bool) -> bool {
    match values.get(key) {
        None => default,
        Some(v) => v == &Value::Bool(true),
    }
}

/// `Number(value)` then truncation; `null` and `""` coerce to 0 (upstream quirk).
fn integer(values: &JsonObject, key: &str, default: i64) -> i64 {
    let n = match values.get(key) {
        None => return default,
        Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(Value::String(s)) if s.trim().is_empty() => 0.0,
        Some(Value::String(s)) => s.trim().parse::<f64>().unwrap_or(f64::NAN),
        Some(Value::Bool(b)) => f64::from(u8::from(*b)),
        Some(_) => f64::NAN,
    };
    if n.is_finite() {
        n.trunc() as i64
    } else {
        default
    }
}

impl CloudflareConfig {
    /// Lenient parse (spec 23 §2.1).
    pub fn from_values(values: &JsonObject) -> Self {
        CloudflareConfig {
            bridge_base_url: string(values, "bridgeBaseUrl").unwrap_or_default(),
            bridge_auth_token: string(values, "bridgeAuthToken").map(SecretString::from),
            reuse_lease: boolean(values, "reuseLease", false),
            keep_alive: boolean(values, "keepAlive", false),
            sleep_after: string(values, "sleepAfter").unwrap_or_else(|| "1h".into()),
            normalize_id: boolean(values, "normalizeId", true),
            requested_cwd: string(values, "requestedCwd").unwrap_or_else(|| DEFAULT_CWD.into()),
            session_strategy: if values.get("sessionStrategy").and_then(Value::as_str)
                == Some("default")
            {
                SessionStrategy::Default
            } else {
                SessionStrategy::Named
            },
            session_id: string(values, "sessionId").unwrap_or_else(|| "paperclip".into()),
            timeout_ms: integer(values, "timeoutMs", DEFAULT_TIMEOUT_MS),
            bridge_request_timeout_ms: integer(
                values,
                "bridgeRequestTimeoutMs",
                DEFAULT_TIMEOUT_MS,
            ),
            preview_hostname: string(values, "previewHostname"),
        }
    }

    /// Parses a provider config, secrets included.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        parsed.bridge_auth_token = config
            .secret("bridgeAuthToken")
            .cloned()
            .or(parsed.bridge_auth_token);
        parsed
    }

    /// Validation (spec 23 §2.2), every issue in order.
    pub fn validate(values: &JsonObject) -> Vec<ConfigIssue> {
        let c = Self::from_values(values);
        let mut issues = Vec::new();
        if c.bridge_base_url.is_empty() {
            issues.push(ConfigIssue::new(
                "bridgeBaseUrl",
                "Cloudflare sandbox environments require bridgeBaseUrl.",
            ));
        } else {
            match reqwest::Url::parse(&c.bridge_base_url) {
                Err(_) => issues.push(ConfigIssue::new(
                    "bridgeBaseUrl",
                    "bridgeBaseUrl must be a valid URL.",
                )),
                Ok(url) => {
                    let local = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                    if url.scheme() != "https" && !(url.scheme() == "http" && local) {
                        issues.push(ConfigIssue::new(
                            "bridgeBaseUrl",
                            "bridgeBaseUrl must use HTTPS unless it points at localhost.",
                        ));
                    }
                }
            }
        }
        let token_present = match values.get("bridgeAuthToken") {
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(Value::Object(_)) => true,
            _ => false,
        };
        if !token_present {
            issues.push(ConfigIssue::new(
                "bridgeAuthToken",
                "Cloudflare sandbox environments require bridgeAuthToken.",
            ));
        }
        if c.reuse_lease && !c.keep_alive {
            issues.push(ConfigIssue::new(
                "reuseLease",
                "reuseLease requires keepAlive for Cloudflare sandboxes.",
            ));
        }
        if !(1..=MAX_MS).contains(&c.timeout_ms) {
            issues.push(ConfigIssue::new(
                "timeoutMs",
                "timeoutMs must be between 1 and 86400000.",
            ));
        }
        if !(1..=MAX_MS).contains(&c.bridge_request_timeout_ms) {
            issues.push(ConfigIssue::new(
                "bridgeRequestTimeoutMs",
                "bridgeRequestTimeoutMs must be between 1 and 86400000.",
            ));
        }
        if !c.requested_cwd.starts_with('/') {
            issues.push(ConfigIssue::new(
                "requestedCwd",
                "requestedCwd must be an absolute POSIX path.",
            ));
        }
        if c.session_strategy == SessionStrategy::Named && c.session_id.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "sessionId",
                "sessionId is required when sessionStrategy is named.",
            ));
        }
        issues
    }

    /// All twelve fields; the token as given (a secret id after persistence).
    pub fn normalized(values: &JsonObject) -> JsonObject {
        let c = Self::from_values(values);
        let token = values.get("bridgeAuthToken").cloned().map(|v| match v {
            Value::String(s) => json!(s.trim()),
            other => other,
        });
        let mut out = JsonObject::new();
        out.insert("bridgeBaseUrl".into(), json!(c.bridge_base_url));
        out.insert("bridgeAuthToken".into(), token.unwrap_or(json!("")));
        out.insert("reuseLease".into(), json!(c.reuse_lease));
        out.insert("keepAlive".into(), json!(c.keep_alive));
        out.insert("sleepAfter".into(), json!(c.sleep_after));
        out.insert("normalizeId".into(), json!(c.normalize_id));
        out.insert("requestedCwd".into(), json!(c.requested_cwd));
        out.insert("sessionStrategy".into(), json!(c.session_strategy.as_str()));
        out.insert("sessionId".into(), json!(c.session_id));
        out.insert("timeoutMs".into(), json!(c.timeout_ms));
        out.insert(
            "bridgeRequestTimeoutMs".into(),
            json!(c.bridge_request_timeout_ms),
        );
        out.insert("previewHostname".into(), json!(c.preview_hostname));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn pinned_normalisation_and_rejection() {
        let n = CloudflareConfig::normalized(&obj(
            json!({"bridgeBaseUrl": " https://b.example.workers.dev/ ", "bridgeAuthToken": " t ",
            "timeoutMs": "450000.9", "bridgeRequestTimeoutMs": "40000.1", "sessionStrategy": "default"}),
        ));
        assert_eq!(n["timeoutMs"], 450000);
        assert_eq!(n["bridgeRequestTimeoutMs"], 40000);
        assert_eq!(n["sleepAfter"], "1h");
        assert_eq!(n["sessionId"], "paperclip");
        assert_eq!(n["previewHostname"], Value::Null);
        assert_eq!(n["bridgeBaseUrl"], "https://b.example.workers.dev/");
        let issues = CloudflareConfig::validate(&obj(
            json!({"bridgeBaseUrl": "http://bridge.example.workers.dev", "bridgeAuthToken": "t",
            "reuseLease": true, "keepAlive": false, "requestedCwd": "workspace/not-absolute"}),
        ));
        let messages: Vec<_> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "bridgeBaseUrl must use HTTPS unless it points at localhost.",
                "reuseLease requires keepAlive for Cloudflare sandboxes.",
                "requestedCwd must be an absolute POSIX path."
            ]
        );
        assert!(
            CloudflareConfig::validate(&obj(
                json!({"bridgeBaseUrl": "http://127.0.0.1:8787", "bridgeAuthToken": "t"})
            ))
            .is_empty()
        );
        let zero = CloudflareConfig::validate(&obj(
            json!({"bridgeBaseUrl": "https://x", "bridgeAuthToken": "t", "timeoutMs": null}),
        ));
        assert_eq!(zero[0].field, "timeoutMs", "null coerces to 0 and fails");
    }
}
