//! The Modal provider config (spec 25 §1): lenient parsing, ordered
//! validation with the upstream messages, and the normalized form.

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, Error, JsonObject, Result};
use schemars::JsonSchema;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Default sandbox working directory.
pub const MODAL_DEFAULT_WORKDIR: &str = "/workspace/paperclip";
/// Default sandbox lifetime (1 h).
pub const MODAL_DEFAULT_SANDBOX_TIMEOUT_MS: i64 = 3_600_000;
/// Default per-exec timeout (5 min).
pub const MODAL_DEFAULT_EXEC_TIMEOUT_MS: i64 = 300_000;
/// Longest sandbox lifetime Modal accepts (24 h).
pub const MODAL_MAX_SANDBOX_TIMEOUT_MS: i64 = 86_400_000;

fn trimmed(values: &JsonObject, key: &str) -> Option<String> {
    values
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// JavaScript `Number(v)` then truncation; `null`, `""` and non-finite are absent.
fn number(values: &JsonObject, key: &str) -> Option<i64> {
    let n = match values.get(key)? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) if !s.trim().is_empty() => s.trim().parse::<f64>().ok()?,
        Value::Bool(b) => f64::from(u8::from(*b)),
        _ => return None,
    };
    n.is_finite().then(|| n.trunc() as i64)
}

/// Whether a secret field holds something (a non-empty string or a secret reference).
fn present(values: &JsonObject, key: &str) -> bool {
    match values.get(key) {
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Object(_)) => true,
        _ => false,
    }
}

/// The Modal config as the provider uses it.
#[derive(Clone)]
pub struct ModalConfig {
    /// Modal App name (looked up with create-if-missing).
    pub app_name: String,
    /// Registry image reference, e.g. `node:20`.
    pub image: String,
    /// Token id (`x-modal-token-id`).
    pub token_id: Option<SecretString>,
    /// Token secret (`x-modal-token-secret`).
    pub token_secret: Option<SecretString>,
    /// Modal environment name (`None`: the server default).
    pub environment: Option<String>,
    /// Sandbox working directory and lease `remoteCwd`.
    pub workdir: String,
    /// Sandbox lifetime.
    pub sandbox_timeout_ms: i64,
    /// Idle timeout, when set.
    pub idle_timeout_ms: Option<i64>,
    /// Default per-exec timeout.
    pub exec_timeout_ms: i64,
    /// Whether `execTimeoutMs` was given explicitly (else the host's `timeoutMs` applies).
    pub exec_timeout_explicit: bool,
    /// The host-level command timeout (`timeoutMs`) the runtime passes along.
    pub host_timeout_ms: Option<i64>,
    /// Block all network access.
    pub block_network: bool,
    /// Allowed CIDRs (network otherwise blocked).
    pub cidr_allowlist: Option<Vec<String>>,
    /// Detach instead of terminate on release.
    pub reuse_lease: bool,
}

impl std::fmt::Debug for ModalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &Option<SecretString>| s.as_ref().map(|_| "[REDACTED]");
        f.debug_struct("ModalConfig")
            .field("app_name", &self.app_name)
            .field("image", &self.image)
            .field("token_id", &redacted(&self.token_id))
            .field("token_secret", &redacted(&self.token_secret))
            .field("environment", &self.environment)
            .field("workdir", &self.workdir)
            .field("sandbox_timeout_ms", &self.sandbox_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("exec_timeout_ms", &self.exec_timeout_ms)
            .field("block_network", &self.block_network)
            .field("cidr_allowlist", &self.cidr_allowlist)
            .field("reuse_lease", &self.reuse_lease)
            .finish()
    }
}

/// JSON Schema of the Modal config (secret fields marked).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct ModalConfigSchema {
    /// Modal App name; created if missing.
    app_name: String,
    /// Registry image reference, e.g. `node:20` or `python:3.13`.
    image: String,
    /// Modal token id (required together with `tokenSecret`).
    #[schemars(with = "Option<SecretRefField>")]
    token_id: Option<String>,
    /// Modal token secret (required together with `tokenId`).
    #[schemars(with = "Option<SecretRefField>")]
    token_secret: Option<String>,
    /// Modal environment name; the server default when unset.
    environment: Option<String>,
    /// Absolute working directory in the sandbox (default `/workspace/paperclip`).
    workdir: Option<String>,
    /// Sandbox lifetime in ms: a multiple of 1000 between 1000 and 86400000 (default 3600000).
    sandbox_timeout_ms: Option<u64>,
    /// Idle timeout in ms (a multiple of 1000), after which an idle sandbox stops.
    idle_timeout_ms: Option<u64>,
    /// Default per-command timeout in ms (a multiple of 1000, default 300000).
    exec_timeout_ms: Option<u64>,
    /// Block all network access from the sandbox.
    block_network: Option<bool>,
    /// Allow only these CIDRs (not combinable with `blockNetwork`).
    cidr_allowlist: Option<Vec<String>>,
    /// Keep the sandbox running after release and re-attach to it later.
    reuse_lease: Option<bool>,
}

impl ModalConfig {
    /// Lenient parse (spec 25 §1.1); never fails.
    ///
    /// ```
    /// use paperclip_env_providers::modal::ModalConfig;
    /// let values = serde_json::json!({"appName": " app ", "image": "node:20", "sandboxTimeoutMs": "1800000"});
    /// let config = ModalConfig::from_values(values.as_object().unwrap());
    /// assert_eq!((config.app_name.as_str(), config.sandbox_timeout_ms), ("app", 1_800_000));
    /// assert!(ModalConfig::validate(values.as_object().unwrap())
    ///     .iter()
    ///     .any(|issue| issue.field == "tokenId"));
    /// ```
    pub fn from_values(values: &JsonObject) -> Self {
        let cidr_allowlist = values
            .get("cidrAllowlist")
            .and_then(Value::as_array)
            .and_then(|a| {
                let cidrs: Vec<String> = a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                (!cidrs.is_empty()).then_some(cidrs)
            });
        let exec_timeout = number(values, "execTimeoutMs");
        ModalConfig {
            app_name: trimmed(values, "appName").unwrap_or_default(),
            image: trimmed(values, "image").unwrap_or_default(),
            token_id: trimmed(values, "tokenId").map(SecretString::from),
            token_secret: trimmed(values, "tokenSecret").map(SecretString::from),
            environment: trimmed(values, "environment"),
            workdir: trimmed(values, "workdir").unwrap_or_else(|| MODAL_DEFAULT_WORKDIR.into()),
            sandbox_timeout_ms: number(values, "sandboxTimeoutMs")
                .unwrap_or(MODAL_DEFAULT_SANDBOX_TIMEOUT_MS),
            idle_timeout_ms: number(values, "idleTimeoutMs"),
            exec_timeout_ms: exec_timeout.unwrap_or(MODAL_DEFAULT_EXEC_TIMEOUT_MS),
            exec_timeout_explicit: exec_timeout.is_some(),
            host_timeout_ms: number(values, "timeoutMs").filter(|n| *n > 0),
            block_network: values.get("blockNetwork") == Some(&Value::Bool(true)),
            cidr_allowlist,
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
        }
    }

    /// Parses a provider config, resolved secrets included.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        parsed.token_id = config.secret("tokenId").cloned().or(parsed.token_id);
        parsed.token_secret = config
            .secret("tokenSecret")
            .cloned()
            .or(parsed.token_secret);
        parsed
    }

    /// The runtime guard: both tokens, or a typed error naming the field.
    pub fn credentials(&self) -> Result<(SecretString, SecretString)> {
        match (&self.token_id, &self.token_secret) {
            (Some(id), Some(secret)) => Ok((id.clone(), secret.clone())),
            (None, None) => Err(Error::invalid_field(
                "tokenId",
                "Modal sandbox environments require tokenId and tokenSecret.",
            )),
            (id, _) => Err(Error::invalid_field(
                if id.is_none() {
                    "tokenId"
                } else {
                    "tokenSecret"
                },
                "Modal sandbox environments require both tokenId and tokenSecret to be configured.",
            )),
        }
    }

    /// The per-exec timeout in ms (whole seconds, at least 1 s): the request's,
    /// else an explicit `execTimeoutMs`, else the host's `timeoutMs`, else 300 000.
    pub fn exec_timeout_for(&self, requested_ms: Option<u64>) -> u64 {
        let base = requested_ms
            .filter(|ms| *ms > 0)
            .map(|ms| ms.min(i64::MAX as u64) as i64)
            .or(self.exec_timeout_explicit.then_some(self.exec_timeout_ms))
            .or(self.host_timeout_ms)
            .unwrap_or(self.exec_timeout_ms);
        ((base / 1000) * 1000).max(1000) as u64
    }

    /// Validation (spec 25 §1.2): every issue, in the upstream order.
    pub fn validate(values: &JsonObject) -> Vec<ConfigIssue> {
        let c = Self::from_values(values);
        let mut issues = Vec::new();
        if c.app_name.is_empty() {
            issues.push(ConfigIssue::new(
                "appName",
                "Modal sandbox environments require an appName.",
            ));
        }
        if c.image.is_empty() {
            issues.push(ConfigIssue::new(
                "image",
                "Modal sandbox environments require an image reference.",
            ));
        }
        if !c.workdir.starts_with('/') {
            issues.push(ConfigIssue::new(
                "workdir",
                format!("workdir must be an absolute path, got: {}", c.workdir),
            ));
        }
        if c.sandbox_timeout_ms < 1000
            || c.sandbox_timeout_ms > MODAL_MAX_SANDBOX_TIMEOUT_MS
            || c.sandbox_timeout_ms % 1000 != 0
        {
            issues.push(ConfigIssue::new(
                "sandboxTimeoutMs",
                "sandboxTimeoutMs must be a positive multiple of 1000 between 1000 and 86400000.",
            ));
        }
        if let Some(idle) = c.idle_timeout_ms
            && (idle < 1000 || idle % 1000 != 0)
        {
            issues.push(ConfigIssue::new(
                "idleTimeoutMs",
                "idleTimeoutMs must be a positive multiple of 1000 when provided.",
            ));
        }
        if c.exec_timeout_ms < 1000 || c.exec_timeout_ms % 1000 != 0 {
            issues.push(ConfigIssue::new(
                "execTimeoutMs",
                "execTimeoutMs must be a positive multiple of 1000.",
            ));
        }
        if c.block_network && c.cidr_allowlist.is_some() {
            issues.push(ConfigIssue::new(
                "cidrAllowlist",
                "cidrAllowlist cannot be combined with blockNetwork.",
            ));
        }
        match (present(values, "tokenId"), present(values, "tokenSecret")) {
            (true, true) => {}
            (false, false) => issues.push(ConfigIssue::new(
                "tokenId",
                "Modal sandbox environments require tokenId and tokenSecret.",
            )),
            (id, _) => issues.push(ConfigIssue::new(
                if id { "tokenSecret" } else { "tokenId" },
                "tokenId and tokenSecret must both be provided when either is set.",
            )),
        }
        issues
    }

    /// All twelve fields; `tokenId`/`tokenSecret` as given (secret ids after persistence).
    pub fn normalized(values: &JsonObject) -> JsonObject {
        let c = Self::from_values(values);
        let as_given = |key: &str| {
            values
                .get(key)
                .filter(|v| present(values, key) && !v.is_null())
                .cloned()
                .map(|v| match v {
                    Value::String(s) => json!(s.trim()),
                    other => other,
                })
                .unwrap_or(Value::Null)
        };
        let mut out = JsonObject::new();
        out.insert("appName".into(), json!(c.app_name));
        out.insert("image".into(), json!(c.image));
        out.insert("tokenId".into(), as_given("tokenId"));
        out.insert("tokenSecret".into(), as_given("tokenSecret"));
        out.insert("environment".into(), json!(c.environment));
        out.insert("workdir".into(), json!(c.workdir));
        out.insert("sandboxTimeoutMs".into(), json!(c.sandbox_timeout_ms));
        out.insert("idleTimeoutMs".into(), json!(c.idle_timeout_ms));
        out.insert("execTimeoutMs".into(), json!(c.exec_timeout_ms));
        out.insert("blockNetwork".into(), json!(c.block_network));
        out.insert("cidrAllowlist".into(), json!(c.cidr_allowlist));
        out.insert("reuseLease".into(), json!(c.reuse_lease));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn pinned_errors_in_order() {
        let issues = ModalConfig::validate(&obj(json!({
            "appName": "", "image": "", "sandboxTimeoutMs": 1500, "idleTimeoutMs": 1500,
            "execTimeoutMs": 0, "blockNetwork": true, "cidrAllowlist": ["1.2.3.4/32"], "tokenId": "only-id"
        })));
        let messages: Vec<_> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Modal sandbox environments require an appName.",
                "Modal sandbox environments require an image reference.",
                "sandboxTimeoutMs must be a positive multiple of 1000 between 1000 and 86400000.",
                "idleTimeoutMs must be a positive multiple of 1000 when provided.",
                "execTimeoutMs must be a positive multiple of 1000.",
                "cidrAllowlist cannot be combined with blockNetwork.",
                "tokenId and tokenSecret must both be provided when either is set.",
            ]
        );
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "appName",
                "image",
                "sandboxTimeoutMs",
                "idleTimeoutMs",
                "execTimeoutMs",
                "cidrAllowlist",
                "tokenSecret"
            ]
        );
    }

    #[test]
    fn lenient_parse_and_defaults() {
        let c = ModalConfig::from_values(&obj(json!({
            "appName": " app ", "image": "node:20", "sandboxTimeoutMs": "1800000.9",
            "idleTimeoutMs": "", "cidrAllowlist": [" 10.0.0.0/8 ", 3, ""], "reuseLease": "true"
        })));
        assert_eq!(c.app_name, "app");
        assert_eq!(c.sandbox_timeout_ms, 1_800_000);
        assert_eq!(c.idle_timeout_ms, None);
        assert_eq!(c.cidr_allowlist, Some(vec!["10.0.0.0/8".to_owned()]));
        assert!(!c.reuse_lease);
        assert_eq!(c.workdir, MODAL_DEFAULT_WORKDIR);
        assert_eq!(
            Value::Object(ModalConfig::normalized(&obj(
                json!({"appName": "a", "image": "i"})
            ))),
            json!({"appName": "a", "image": "i", "tokenId": null, "tokenSecret": null, "environment": null,
                   "workdir": "/workspace/paperclip", "sandboxTimeoutMs": 3600000, "idleTimeoutMs": null,
                   "execTimeoutMs": 300000, "blockNetwork": false, "cidrAllowlist": null, "reuseLease": false})
        );
    }

    #[test]
    fn relative_workdir_and_missing_tokens() {
        let issues = ModalConfig::validate(&obj(
            json!({"appName": "a", "image": "i", "workdir": "rel"}),
        ));
        let messages: Vec<_> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "workdir must be an absolute path, got: rel",
                "Modal sandbox environments require tokenId and tokenSecret."
            ]
        );
    }

    #[test]
    fn exec_timeout_precedence_and_rounding() {
        let c = ModalConfig::from_values(&obj(json!({"timeoutMs": 300})));
        assert_eq!(c.exec_timeout_for(None), 1000);
        assert_eq!(c.exec_timeout_for(Some(2500)), 2000);
        let c = ModalConfig::from_values(&obj(json!({"timeoutMs": 300, "execTimeoutMs": 7000})));
        assert_eq!(c.exec_timeout_for(None), 7000);
        assert_eq!(
            ModalConfig::from_values(&obj(json!({}))).exec_timeout_for(None),
            300_000
        );
    }
}
