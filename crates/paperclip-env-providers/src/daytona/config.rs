//! The Daytona provider config (spec 22 §2): lenient parse, ordered
//! validation and the normalized config.

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, JsonObject};
use schemars::JsonSchema;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Default bound of create/start/stop/delete/execute operations (5 min).
pub const DAYTONA_DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Default bound of one state read.
pub const DAYTONA_DEFAULT_LIVENESS_TIMEOUT_MS: i64 = 30_000;
/// The public Daytona API.
pub const DAYTONA_DEFAULT_API_URL: &str = "https://app.daytona.io/api";
const MAX_TIMEOUT_MS: i64 = 86_400_000;

fn trimmed(values: &JsonObject, key: &str) -> Option<String> {
    values
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn blank_string(values: &JsonObject, key: &str) -> bool {
    matches!(values.get(key), Some(Value::String(s)) if s.trim().is_empty())
}

fn number(values: &JsonObject, key: &str) -> Option<f64> {
    match values.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if !s.trim().is_empty() => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

fn integer(values: &JsonObject, key: &str, default: i64) -> i64 {
    number(values, key)
        .map(|n| n.trunc() as i64)
        .unwrap_or(default)
}

/// A number as JSON: integral values without a fraction.
pub(crate) fn num_json(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        json!(n as i64)
    } else {
        json!(n)
    }
}

/// The Daytona config as the provider uses it.
#[derive(Clone)]
pub struct DaytonaConfig {
    /// API key (else the builder's, e.g. `DAYTONA_API_KEY`).
    pub api_key: Option<SecretString>,
    /// API base URL.
    pub api_url: Option<String>,
    /// Region/target.
    pub target: Option<String>,
    /// Snapshot to create from.
    pub snapshot: Option<String>,
    /// Image to create from.
    pub image: Option<String>,
    /// Code-toolbox language label.
    pub language: Option<String>,
    /// vCPUs (image creation only).
    pub cpu: Option<f64>,
    /// Memory GiB (image creation only).
    pub memory: Option<f64>,
    /// Disk GiB (image creation only).
    pub disk: Option<f64>,
    /// GPUs (image creation only).
    pub gpu: Option<f64>,
    /// Bound of create/start/stop/delete/execute.
    pub timeout_ms: i64,
    /// Bound of one state read; `≤ 0` disables.
    pub liveness_timeout_ms: i64,
    /// Auto-stop minutes.
    pub auto_stop_interval: i64,
    /// Auto-archive minutes.
    pub auto_archive_interval: i64,
    /// Auto-delete minutes.
    pub auto_delete_interval: i64,
    /// Stop/start instead of delete.
    pub reuse_lease: bool,
    /// Archive instead of delete on a non-reusable release.
    pub archive_on_release: bool,
}

impl std::fmt::Debug for DaytonaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaytonaConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field("api_url", &self.api_url)
            .field("target", &self.target)
            .field("snapshot", &self.snapshot)
            .field("image", &self.image)
            .field("timeout_ms", &self.timeout_ms)
            .field("reuse_lease", &self.reuse_lease)
            .finish_non_exhaustive()
    }
}

/// JSON Schema of the Daytona config (secret fields marked).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct DaytonaConfigSchema {
    /// Daytona API key; falls back to `DAYTONA_API_KEY`.
    #[schemars(with = "Option<SecretRefField>")]
    api_key: Option<String>,
    /// API base URL; falls back to `DAYTONA_API_URL`, then `https://app.daytona.io/api`.
    api_url: Option<String>,
    /// Region/target (e.g. `us`, `eu`).
    target: Option<String>,
    /// Snapshot name or ID to create from (not together with `image`).
    snapshot: Option<String>,
    /// Container image to create from (not together with `snapshot`).
    image: Option<String>,
    /// Code-toolbox language label (default `python`).
    language: Option<String>,
    /// vCPUs; image creation only.
    cpu: Option<u32>,
    /// Memory in GiB; image creation only.
    memory: Option<u32>,
    /// Disk in GiB; image creation only.
    disk: Option<u32>,
    /// GPUs; image creation only.
    gpu: Option<u32>,
    /// Bound of create/start/stop/delete/execute in milliseconds (default 300000).
    timeout_ms: Option<u64>,
    /// Bound of one state read in milliseconds (default 30000; ≤ 0 disables).
    liveness_timeout_ms: Option<i64>,
    /// Auto-stop minutes (default 15; 0 disables).
    auto_stop_interval: Option<i64>,
    /// Auto-archive minutes (default 60).
    auto_archive_interval: Option<i64>,
    /// Auto-delete minutes (default 10080; -1 disables).
    auto_delete_interval: Option<i64>,
    /// Stop on release and start again on resume instead of deleting.
    reuse_lease: Option<bool>,
}

impl DaytonaConfig {
    /// Lenient parse (spec 22 §2.1); never fails.
    pub fn from_values(values: &JsonObject) -> Self {
        DaytonaConfig {
            api_key: trimmed(values, "apiKey").map(SecretString::from),
            api_url: trimmed(values, "apiUrl"),
            target: trimmed(values, "target"),
            snapshot: trimmed(values, "snapshot"),
            image: trimmed(values, "image"),
            language: trimmed(values, "language"),
            cpu: number(values, "cpu"),
            memory: number(values, "memory"),
            disk: number(values, "disk"),
            gpu: number(values, "gpu"),
            timeout_ms: integer(values, "timeoutMs", DAYTONA_DEFAULT_TIMEOUT_MS as i64),
            liveness_timeout_ms: integer(
                values,
                "livenessTimeoutMs",
                DAYTONA_DEFAULT_LIVENESS_TIMEOUT_MS,
            ),
            auto_stop_interval: integer(values, "autoStopInterval", 15),
            auto_archive_interval: integer(values, "autoArchiveInterval", 60),
            auto_delete_interval: integer(values, "autoDeleteInterval", 10_080),
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
            archive_on_release: values.get("archiveOnRelease") == Some(&Value::Bool(true)),
        }
    }

    /// Parses a provider config, secrets included.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        parsed.api_key = config.secret("apiKey").cloned().or(parsed.api_key);
        parsed
    }

    /// The operation bound in milliseconds (at least 1).
    pub fn timeout(&self) -> u64 {
        self.timeout_ms.max(1) as u64
    }

    /// Whether any resource setting is present.
    pub fn has_resources(&self) -> bool {
        self.cpu.is_some() || self.memory.is_some() || self.disk.is_some() || self.gpu.is_some()
    }

    /// Validation (spec 22 §2.2): every issue, in order. `fallback_key`:
    /// whether a key is available outside the config (builder or env).
    pub fn validate(values: &JsonObject, fallback_key: bool) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let c = Self::from_values(values);
        if blank_string(values, "image") {
            issues.push(ConfigIssue::new("image", "Daytona image cannot be empty."));
        }
        if blank_string(values, "snapshot") {
            issues.push(ConfigIssue::new(
                "snapshot",
                "Daytona snapshot cannot be empty.",
            ));
        }
        if c.image.is_some() && c.snapshot.is_some() {
            issues.push(ConfigIssue::new(
                "image",
                "Daytona sandbox environments must set either image or snapshot, not both.",
            ));
        }
        if let Some(url) = &c.api_url
            && reqwest::Url::parse(url).is_err()
        {
            issues.push(ConfigIssue::new("apiUrl", "apiUrl must be a valid URL."));
        }
        if c.timeout_ms < 1 || c.timeout_ms > MAX_TIMEOUT_MS {
            issues.push(ConfigIssue::new(
                "timeoutMs",
                "timeoutMs must be between 1 and 86400000.",
            ));
        }
        if c.liveness_timeout_ms > MAX_TIMEOUT_MS {
            issues.push(ConfigIssue::new(
                "livenessTimeoutMs",
                "livenessTimeoutMs must be less than or equal to 86400000.",
            ));
        }
        if c.auto_stop_interval < 0 {
            issues.push(ConfigIssue::new(
                "autoStopInterval",
                "autoStopInterval must be greater than or equal to 0.",
            ));
        }
        if c.auto_archive_interval < 0 {
            issues.push(ConfigIssue::new(
                "autoArchiveInterval",
                "autoArchiveInterval must be greater than or equal to 0.",
            ));
        }
        if c.auto_delete_interval < -1 {
            issues.push(ConfigIssue::new(
                "autoDeleteInterval",
                "autoDeleteInterval must be greater than or equal to -1.",
            ));
        }
        let config_key = values.get("apiKey").is_some_and(|v| match v {
            Value::String(s) => !s.trim().is_empty(),
            Value::Null => false,
            _ => true, // a secret reference
        });
        if !config_key && !fallback_key {
            issues.push(ConfigIssue::new(
                "apiKey",
                "Daytona sandbox environments require an API key in config or DAYTONA_API_KEY.",
            ));
        }
        if c.has_resources() && c.image.is_none() {
            issues.push(ConfigIssue::new(
                "image",
                "Daytona resource settings require image-backed sandbox creation; snapshot/default sandbox creation cannot override CPU, memory, disk, or GPU.",
            ));
        }
        for (key, value) in [
            ("cpu", c.cpu),
            ("memory", c.memory),
            ("disk", c.disk),
            ("gpu", c.gpu),
        ] {
            if value.is_some_and(|v| v <= 0.0) {
                issues.push(ConfigIssue::new(
                    key,
                    format!("{key} must be greater than 0 when provided."),
                ));
            }
        }
        issues
    }

    /// Every parsed field, `apiKey` as given (a secret reference after persistence).
    pub fn normalized(values: &JsonObject) -> JsonObject {
        let c = Self::from_values(values);
        let opt_num = |n: Option<f64>| n.map(num_json).unwrap_or(Value::Null);
        let mut out = JsonObject::new();
        out.insert(
            "apiKey".into(),
            match values.get("apiKey") {
                Some(Value::String(s)) if s.trim().is_empty() => Value::Null,
                Some(Value::String(s)) => json!(s.trim()),
                Some(other) => other.clone(),
                None => Value::Null,
            },
        );
        out.insert("apiUrl".into(), json!(c.api_url));
        out.insert("target".into(), json!(c.target));
        out.insert("snapshot".into(), json!(c.snapshot));
        out.insert("image".into(), json!(c.image));
        out.insert("language".into(), json!(c.language));
        out.insert("timeoutMs".into(), json!(c.timeout_ms));
        out.insert("livenessTimeoutMs".into(), json!(c.liveness_timeout_ms));
        out.insert("cpu".into(), opt_num(c.cpu));
        out.insert("memory".into(), opt_num(c.memory));
        out.insert("disk".into(), opt_num(c.disk));
        out.insert("gpu".into(), opt_num(c.gpu));
        out.insert("autoStopInterval".into(), json!(c.auto_stop_interval));
        out.insert("autoArchiveInterval".into(), json!(c.auto_archive_interval));
        out.insert("autoDeleteInterval".into(), json!(c.auto_delete_interval));
        out.insert("reuseLease".into(), json!(c.reuse_lease));
        out.insert("archiveOnRelease".into(), json!(c.archive_on_release));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_and_invalid_config_in_order() {
        let values = json!({"apiUrl": "not-a-url", "image": "node:20", "snapshot": "snapshot-a", "timeoutMs": 0});
        let issues = DaytonaConfig::validate(values.as_object().unwrap(), false);
        let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Daytona sandbox environments must set either image or snapshot, not both.",
                "apiUrl must be a valid URL.",
                "timeoutMs must be between 1 and 86400000.",
                "Daytona sandbox environments require an API key in config or DAYTONA_API_KEY.",
            ]
        );
    }

    #[test]
    fn normalized_example() {
        let values = json!({"apiKey": " explicit-key ", "apiUrl": "https://app.daytona.io/api", "target": "us",
            "snapshot": "base-snapshot", "language": "typescript", "timeoutMs": 450000.7, "autoDeleteInterval": -1, "reuseLease": true});
        let n = DaytonaConfig::normalized(values.as_object().unwrap());
        assert_eq!(n["apiKey"], "explicit-key");
        assert_eq!(n["timeoutMs"], 450000);
        assert_eq!(n["autoStopInterval"], 15);
        assert_eq!(n["autoDeleteInterval"], -1);
        assert_eq!(n["image"], Value::Null);
        assert!(DaytonaConfig::validate(values.as_object().unwrap(), false).is_empty());
        let res = json!({"snapshot": "s", "cpu": 0, "apiKey": "k"});
        let issues = DaytonaConfig::validate(res.as_object().unwrap(), false);
        assert_eq!(issues.len(), 2);
        assert_eq!(
            issues[1].message,
            "cpu must be greater than 0 when provided."
        );
    }
}
