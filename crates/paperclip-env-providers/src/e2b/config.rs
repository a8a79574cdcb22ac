//! E2B and Novita provider configs (spec 20 §2, spec 21 §2).

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, JsonObject};
use schemars::JsonSchema;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Default E2B sandbox lifetime and command timeout (1 h).
pub const E2B_DEFAULT_TIMEOUT_MS: u64 = 3_600_000;
/// Default Novita sandbox lifetime and command timeout.
pub const NOVITA_DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Default Novita request timeout.
pub const NOVITA_DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default Novita workspace directory.
pub const NOVITA_DEFAULT_CWD: &str = "/home/user/paperclip-workspace";

fn trimmed(values: &JsonObject, key: &str) -> Option<String> {
    values
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn number(values: &JsonObject, key: &str) -> Option<f64> {
    match values.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if !s.trim().is_empty() => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// The E2B config as the provider uses it.
#[derive(Clone)]
pub struct E2bConfig {
    /// Template name or id (default `base`).
    pub template: String,
    /// Team API key (else `E2B_API_KEY`).
    pub api_key: Option<SecretString>,
    /// Sandbox lifetime and default command timeout.
    pub timeout_ms: u64,
    /// Pause on release instead of killing.
    pub reuse_lease: bool,
}

impl std::fmt::Debug for E2bConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bConfig")
            .field("template", &self.template)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("timeout_ms", &self.timeout_ms)
            .field("reuse_lease", &self.reuse_lease)
            .finish()
    }
}

/// JSON Schema of the E2B config (secret fields marked).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct E2bConfigSchema {
    /// E2B template name or ID.
    template: Option<String>,
    /// Team API key; falls back to `E2B_API_KEY`.
    #[schemars(with = "Option<SecretRefField>")]
    api_key: Option<String>,
    /// Sandbox lifetime in milliseconds, refreshed on each command. Defaults to 1 hour.
    timeout_ms: Option<u64>,
    /// Pause and reuse the sandbox across runs instead of killing it.
    reuse_lease: Option<bool>,
}

impl E2bConfig {
    /// Lenient parse (spec 20 §2.1); never fails.
    pub fn from_values(values: &JsonObject) -> Self {
        let timeout_ms = number(values, "timeoutMs")
            .filter(|n| n.is_finite())
            .map(|n| n.trunc().max(0.0) as u64)
            .unwrap_or(E2B_DEFAULT_TIMEOUT_MS);
        E2bConfig {
            template: trimmed(values, "template").unwrap_or_else(|| "base".into()),
            api_key: trimmed(values, "apiKey").map(SecretString::from),
            timeout_ms,
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
        }
    }

    /// Parses a provider config, secrets included.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        parsed.api_key = config.secret("apiKey").cloned().or(parsed.api_key);
        parsed
    }

    /// Validation (spec 20 §2.2): every issue, in order.
    pub fn validate(values: &JsonObject) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if matches!(values.get("template"), Some(Value::String(s)) if s.trim().is_empty()) {
            issues.push(ConfigIssue::new(
                "template",
                "E2B sandbox environments require a template.",
            ));
        }
        let parsed = Self::from_values(values);
        if parsed.timeout_ms < 1 || parsed.timeout_ms > 86_400_000 {
            issues.push(ConfigIssue::new(
                "timeoutMs",
                "timeoutMs must be between 1 and 86400000.",
            ));
        }
        issues
    }

    /// `{template, apiKey, timeoutMs, reuseLease}` with `apiKey` as given (a secret id after persistence).
    pub fn normalized(values: &JsonObject) -> JsonObject {
        let parsed = Self::from_values(values);
        let mut out = JsonObject::new();
        out.insert("template".into(), json!(parsed.template));
        out.insert(
            "apiKey".into(),
            values
                .get("apiKey")
                .filter(|v| !v.is_null())
                .cloned()
                .map(|v| match v {
                    Value::String(s) => json!(s.trim()),
                    other => other,
                })
                .unwrap_or(Value::Null),
        );
        out.insert("timeoutMs".into(), json!(parsed.timeout_ms));
        out.insert("reuseLease".into(), json!(parsed.reuse_lease));
        out
    }
}

/// The Novita config as the provider uses it.
#[derive(Clone)]
pub struct NovitaConfig {
    /// Team API key (else `NOVITA_API_KEY`).
    pub api_key: Option<SecretString>,
    /// API domain override.
    pub domain: Option<String>,
    /// Template (SDK default `base`).
    pub template: Option<String>,
    /// Absolute workspace directory.
    pub requested_cwd: String,
    /// Sandbox lifetime and default command timeout (≥ 10 000).
    pub timeout_ms: u64,
    /// Per-call request timeout (≥ 1 000).
    pub request_timeout_ms: u64,
    /// Secured sandbox (`None`: the default, `true`).
    pub secure: Option<bool>,
    /// Pause instead of kill on sandbox timeout.
    pub auto_pause: bool,
    /// Pause on release instead of killing.
    pub reuse_lease: bool,
}

impl std::fmt::Debug for NovitaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NovitaConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("domain", &self.domain)
            .field("template", &self.template)
            .field("requested_cwd", &self.requested_cwd)
            .field("timeout_ms", &self.timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("secure", &self.secure)
            .field("auto_pause", &self.auto_pause)
            .field("reuse_lease", &self.reuse_lease)
            .finish()
    }
}

/// JSON Schema of the Novita config (secret fields marked).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct NovitaConfigSchema {
    /// Novita API key; falls back to `NOVITA_API_KEY`.
    #[schemars(with = "Option<SecretRefField>")]
    api_key: Option<String>,
    /// API domain override (not a URL; `api.` is prefixed).
    domain: Option<String>,
    /// Template ID or name.
    template: Option<String>,
    /// Workspace directory created in the sandbox; must be absolute.
    requested_cwd: Option<String>,
    /// Sandbox lifetime and default per-command timeout; at least 10000.
    timeout_ms: Option<u64>,
    /// HTTP/RPC request timeout; at least 1000.
    request_timeout_ms: Option<u64>,
    /// Ask for a secured sandbox.
    secure: Option<bool>,
    /// Pause instead of kill when the sandbox times out.
    auto_pause: Option<bool>,
    /// Pause on release and resume later instead of killing.
    reuse_lease: Option<bool>,
}

fn positive_integer(values: &JsonObject, key: &str, default: u64) -> u64 {
    number(values, key)
        .filter(|n| n.is_finite() && *n > 0.0)
        .map(|n| n.trunc() as u64)
        .unwrap_or(default)
}

impl NovitaConfig {
    /// Lenient parse (spec 21 §2.1); never fails.
    pub fn from_values(values: &JsonObject) -> Self {
        NovitaConfig {
            api_key: trimmed(values, "apiKey").map(SecretString::from),
            domain: trimmed(values, "domain"),
            template: trimmed(values, "template"),
            requested_cwd: trimmed(values, "requestedCwd")
                .unwrap_or_else(|| NOVITA_DEFAULT_CWD.into()),
            timeout_ms: positive_integer(values, "timeoutMs", NOVITA_DEFAULT_TIMEOUT_MS),
            request_timeout_ms: positive_integer(
                values,
                "requestTimeoutMs",
                NOVITA_DEFAULT_REQUEST_TIMEOUT_MS,
            ),
            secure: values.get("secure").and_then(Value::as_bool),
            auto_pause: values.get("autoPause") == Some(&Value::Bool(true)),
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
        }
    }

    /// Parses a provider config, secrets included.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        parsed.api_key = config.secret("apiKey").cloned().or(parsed.api_key);
        parsed
    }

    /// Validation (spec 21 §2.2): every issue, in order. `env_key_present`
    /// says whether `NOVITA_API_KEY` (or the builder's key) is set.
    pub fn validate(values: &JsonObject, env_key_present: bool) -> Vec<ConfigIssue> {
        let parsed = Self::from_values(values);
        let mut issues = Vec::new();
        if parsed.api_key.is_none() && !env_key_present {
            issues.push(ConfigIssue::new(
                "apiKey",
                "Novita sandbox environments require an API key in config or NOVITA_API_KEY.",
            ));
        }
        if !parsed.requested_cwd.starts_with('/') {
            issues.push(ConfigIssue::new(
                "requestedCwd",
                "requestedCwd must be an absolute path.",
            ));
        }
        if parsed.timeout_ms < 10_000 {
            issues.push(ConfigIssue::new(
                "timeoutMs",
                "timeoutMs must be at least 10000.",
            ));
        }
        if parsed.request_timeout_ms < 1_000 {
            issues.push(ConfigIssue::new(
                "requestTimeoutMs",
                "requestTimeoutMs must be at least 1000.",
            ));
        }
        issues
    }

    /// All nine fields as parsed; `apiKey` as given.
    pub fn normalized(values: &JsonObject) -> JsonObject {
        let p = Self::from_values(values);
        let mut out = JsonObject::new();
        out.insert(
            "apiKey".into(),
            values
                .get("apiKey")
                .filter(|v| !matches!(v, Value::String(s) if s.trim().is_empty()))
                .cloned()
                .unwrap_or(Value::Null),
        );
        out.insert("domain".into(), json!(p.domain));
        out.insert("template".into(), json!(p.template));
        out.insert("requestedCwd".into(), json!(p.requested_cwd));
        out.insert("timeoutMs".into(), json!(p.timeout_ms));
        out.insert("requestTimeoutMs".into(), json!(p.request_timeout_ms));
        out.insert("secure".into(), json!(p.secure));
        out.insert("autoPause".into(), json!(p.auto_pause));
        out.insert("reuseLease".into(), json!(p.reuse_lease));
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
    fn e2b_parse_and_validate() {
        let c = E2bConfig::from_values(&obj(json!({"template": "  ", "timeoutMs": "450000.9"})));
        assert_eq!(c.template, "base");
        assert_eq!(c.timeout_ms, 450000);
        assert_eq!(
            E2bConfig::from_values(&obj(json!({"timeoutMs": "abc"}))).timeout_ms,
            3_600_000
        );
        let issues = E2bConfig::validate(&obj(json!({"template": " ", "timeoutMs": 0})));
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, ["template", "timeoutMs"]);
        assert_eq!(
            Value::Object(E2bConfig::normalized(&obj(json!({})))),
            json!({"template": "base", "apiKey": null, "timeoutMs": 3600000, "reuseLease": false})
        );
    }

    #[test]
    fn novita_defaults_and_ordered_errors() {
        assert_eq!(
            Value::Object(NovitaConfig::normalized(&obj(json!({})))),
            json!({"apiKey":null,"domain":null,"template":null,"requestedCwd":"/home/user/paperclip-workspace",
                   "timeoutMs":300000,"requestTimeoutMs":30000,"secure":null,"autoPause":false,"reuseLease":false})
        );
        assert_eq!(
            NovitaConfig::from_values(&obj(json!({"timeoutMs": -5}))).timeout_ms,
            300_000
        );
        let issues = NovitaConfig::validate(
            &obj(json!({"requestedCwd": "rel", "timeoutMs": 5000, "requestTimeoutMs": 500})),
            false,
        );
        let messages: Vec<_> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Novita sandbox environments require an API key in config or NOVITA_API_KEY.",
                "requestedCwd must be an absolute path.",
                "timeoutMs must be at least 10000.",
                "requestTimeoutMs must be at least 1000."
            ]
        );
    }
}
