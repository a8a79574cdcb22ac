//! `sandbox` driver config: the built-in `fake` schema and the provider
//! envelope (spec 00 §3.3).

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Value, json};

use super::Fields;
use crate::lease::JsonObject;
use crate::{Error, Result};

/// Default image of the built-in fake provider.
pub const DEFAULT_FAKE_IMAGE: &str = "ubuntu:24.04";
/// Largest accepted `timeoutMs` (24 h).
pub const TIMEOUT_MS_MAX: i64 = 86_400_000;
/// Pattern of provider and plugin driver keys.
pub const PROVIDER_KEY_PATTERN: &str = "^[a-z0-9][a-z0-9._-]*$";
/// Keys the envelope owns.
pub const ENVELOPE_KEYS: [&str; 3] = ["provider", "reuseLease", "timeoutMs"];

pub(crate) fn key_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(PROVIDER_KEY_PATTERN).expect("static pattern"))
}

/// Smallest accepted `runnerIdleTimeoutMs` (1 s).
pub const RUNNER_IDLE_TIMEOUT_MS_MIN: i64 = 1_000;
/// Largest accepted `runnerIdleTimeoutMs` (24 h).
pub const RUNNER_IDLE_TIMEOUT_MS_MAX: i64 = 86_400_000;
/// `runnerIdleTimeoutMs` of a `warm` runner that sets none (5 min).
pub const WARM_RUNNER_IDLE_TIMEOUT_MS: u64 = 300_000;
/// Keys Paperclip removed from sandbox configs; a stored config may still
/// carry them, so they are dropped before validation (never an error, never
/// kept).
pub const REMOVED_SANDBOX_CONFIG_KEYS: [&str; 1] = ["streamAgentSessionOutput"];
/// The host-owned run-behaviour flags of every sandbox config.
pub const HOST_FLAG_KEYS: [&str; 4] = [
    "streamRunLogs",
    "runnerLifecycleMode",
    "runnerIdleTimeoutMs",
    "archiveOnRelease",
];

/// How a sandbox runner lives across turns (`runnerLifecycleMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerLifecycleMode {
    /// `inherit`: as the agent's adapter decides.
    Inherit,
    /// `per_turn`: a fresh runner for every turn.
    PerTurn,
    /// `warm`: the runner stays up between turns until idle for
    /// `runnerIdleTimeoutMs` (default 300 000).
    Warm,
}

impl RunnerLifecycleMode {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerLifecycleMode::Inherit => "inherit",
            RunnerLifecycleMode::PerTurn => "per_turn",
            RunnerLifecycleMode::Warm => "warm",
        }
    }
}

/// The host-owned flags Paperclip 2026.916 accepts in every sandbox config
/// (`fakeSandboxEnvironmentConfigSchema` and the plugin envelope). Each is
/// kept only when given, so a config re-serializes unchanged. The host owns
/// them: they are not part of [`ProviderEnvelope::provider_config`], and
/// they are re-applied after a provider normalizes its config (upstream's
/// `applyHostOwnedSandboxFlags`), so no provider can drop them. Spec 00 §3.3
/// had none of them (the fake schema rejected them); issue #22 wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFlags {
    /// `streamRunLogs`; absent means on ([`HostFlags::stream_run_logs`]).
    pub stream_run_logs: Option<bool>,
    /// `runnerLifecycleMode`.
    pub runner_lifecycle_mode: Option<RunnerLifecycleMode>,
    /// `runnerIdleTimeoutMs`, 1 000 ..= 86 400 000.
    pub runner_idle_timeout_ms: Option<u64>,
    /// `archiveOnRelease`.
    pub archive_on_release: Option<bool>,
}

impl HostFlags {
    /// Whether run logs stream (default on).
    pub fn stream_run_logs(&self) -> bool {
        self.stream_run_logs.unwrap_or(true)
    }

    /// The idle timeout in force: the configured one, else 300 000 for a
    /// `warm` runner, else none.
    pub fn effective_runner_idle_timeout_ms(&self) -> Option<u64> {
        self.runner_idle_timeout_ms.or((self.runner_lifecycle_mode
            == Some(RunnerLifecycleMode::Warm))
        .then_some(WARM_RUNNER_IDLE_TIMEOUT_MS))
    }

    /// Writes the flags that were given into `map` (over what is there).
    pub fn apply_to(&self, map: &mut JsonObject) {
        if let Some(v) = self.stream_run_logs {
            map.insert("streamRunLogs".into(), json!(v));
        }
        if let Some(v) = self.runner_lifecycle_mode {
            map.insert("runnerLifecycleMode".into(), json!(v.as_str()));
        }
        if let Some(v) = self.runner_idle_timeout_ms {
            map.insert("runnerIdleTimeoutMs".into(), json!(v));
        }
        if let Some(v) = self.archive_on_release {
            map.insert("archiveOnRelease".into(), json!(v));
        }
    }

    fn read(f: &mut Fields<'_>) -> HostFlags {
        for key in REMOVED_SANDBOX_CONFIG_KEYS {
            f.raw(key);
        }
        let optional_bool = |f: &mut Fields<'_>, key: &str| match f.raw(key) {
            None => None,
            Some(Value::Bool(b)) => Some(b),
            Some(_) => {
                let path = f.path(key);
                f.issue(key, format!("{path} must be a boolean."));
                None
            }
        };
        let stream_run_logs = optional_bool(f, "streamRunLogs");
        let archive_on_release = optional_bool(f, "archiveOnRelease");
        let runner_lifecycle_mode = match f.raw("runnerLifecycleMode") {
            None => None,
            Some(Value::String(s)) if s == "inherit" => Some(RunnerLifecycleMode::Inherit),
            Some(Value::String(s)) if s == "per_turn" => Some(RunnerLifecycleMode::PerTurn),
            Some(Value::String(s)) if s == "warm" => Some(RunnerLifecycleMode::Warm),
            Some(_) => {
                f.issue(
                    "runnerLifecycleMode",
                    "runnerLifecycleMode must be one of \"inherit\", \"per_turn\", \"warm\".",
                );
                None
            }
        };
        let runner_idle_timeout_ms = f
            .coerced_int(
                "runnerIdleTimeoutMs",
                RUNNER_IDLE_TIMEOUT_MS_MIN,
                RUNNER_IDLE_TIMEOUT_MS_MAX,
            )
            .map(|v| v as u64);
        HostFlags {
            stream_run_logs,
            runner_lifecycle_mode,
            runner_idle_timeout_ms,
            archive_on_release,
        }
    }
}

/// Config of the built-in `fake` provider (strict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSandboxConfig {
    /// Image label (trimmed; default `ubuntu:24.04`).
    pub image: String,
    /// Keep the lease for reuse.
    pub reuse_lease: bool,
    /// Host-owned run-behaviour flags.
    pub host_flags: HostFlags,
}

/// The provider envelope: host-owned keys plus provider-owned fields kept verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderEnvelope {
    /// Provider key.
    pub provider: String,
    /// Command / lease-operation timeout budget, 1 ..= 86 400 000.
    pub timeout_ms: Option<u64>,
    /// Keep the provider resource for the next run.
    pub reuse_lease: bool,
    /// Host-owned run-behaviour flags (not passed to the provider).
    pub host_flags: HostFlags,
    /// Every other key, verbatim (secret fields hold references).
    pub fields: JsonObject,
}

impl ProviderEnvelope {
    /// The config a provider receives: everything but `provider` (Paperclip's
    /// `stripSandboxProviderEnvelope`), so `reuseLease` and `timeoutMs` stay.
    pub fn provider_config(&self) -> JsonObject {
        let mut map = JsonObject::new();
        if let Some(t) = self.timeout_ms {
            map.insert("timeoutMs".into(), json!(t));
        }
        map.insert("reuseLease".into(), json!(self.reuse_lease));
        for (k, v) in &self.fields {
            map.insert(k.clone(), v.clone());
        }
        map
    }
}

/// A parsed `sandbox` config.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxConfig {
    /// `provider: "fake"` (or no provider).
    BuiltinFake(FakeSandboxConfig),
    /// Any other provider.
    Provider(ProviderEnvelope),
}

impl SandboxConfig {
    /// Parses and validates. A missing or blank `provider` means `fake`.
    ///
    /// ```
    /// use paperclip_env_core::config::SandboxConfig;
    /// let c = SandboxConfig::parse(&serde_json::json!({"provider": "e2b", "timeoutMs": "450000", "template": "base"})).unwrap();
    /// assert_eq!(c.provider(), "e2b");
    /// ```
    pub fn parse(value: &Value) -> Result<Self> {
        let provider = match value.get("provider") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => "fake".to_owned(),
        };
        let mut f = Fields::new(value, "");
        if provider == "fake" {
            f.raw("provider");
            let image = match f.raw("image") {
                None => Some(DEFAULT_FAKE_IMAGE.to_owned()),
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                Some(_) => {
                    f.issue("image", "Fake sandbox environments require an image.");
                    None
                }
            };
            let reuse_lease = f.bool_or("reuseLease", false);
            let host_flags = HostFlags::read(&mut f);
            f.reject_unknown();
            if !f.issues.is_empty() {
                return Err(Error::invalid_config(f.issues));
            }
            return Ok(SandboxConfig::BuiltinFake(FakeSandboxConfig {
                image: image.unwrap_or_default(),
                reuse_lease,
                host_flags,
            }));
        }
        f.raw("provider");
        if !key_pattern().is_match(&provider) {
            f.issue(
                "provider",
                "Sandbox provider key must start with a lowercase alphanumeric and contain only lowercase letters, digits, dots, hyphens, or underscores",
            );
        }
        let timeout_ms = f
            .coerced_int("timeoutMs", 1, TIMEOUT_MS_MAX)
            .map(|t| t as u64);
        let reuse_lease = f.bool_or("reuseLease", false);
        let host_flags = HostFlags::read(&mut f);
        let fields = f.rest();
        if !f.issues.is_empty() {
            return Err(Error::invalid_config(f.issues));
        }
        Ok(SandboxConfig::Provider(ProviderEnvelope {
            provider,
            timeout_ms,
            reuse_lease,
            host_flags,
            fields,
        }))
    }

    /// The provider key.
    pub fn provider(&self) -> &str {
        match self {
            SandboxConfig::BuiltinFake(_) => "fake",
            SandboxConfig::Provider(p) => &p.provider,
        }
    }

    /// Whether leases should be kept for reuse.
    pub fn reuse_lease(&self) -> bool {
        match self {
            SandboxConfig::BuiltinFake(c) => c.reuse_lease,
            SandboxConfig::Provider(p) => p.reuse_lease,
        }
    }

    /// The host-owned run-behaviour flags.
    pub fn host_flags(&self) -> &HostFlags {
        match self {
            SandboxConfig::BuiltinFake(c) => &c.host_flags,
            SandboxConfig::Provider(p) => &p.host_flags,
        }
    }

    /// Normalized JSON form (host flags included when given; removed keys
    /// such as `streamAgentSessionOutput` dropped).
    pub fn to_json(&self) -> Value {
        match self {
            SandboxConfig::BuiltinFake(c) => {
                let mut map = JsonObject::new();
                map.insert("provider".into(), json!("fake"));
                map.insert("image".into(), json!(c.image));
                map.insert("reuseLease".into(), json!(c.reuse_lease));
                c.host_flags.apply_to(&mut map);
                Value::Object(map)
            }
            SandboxConfig::Provider(p) => {
                let mut map = JsonObject::new();
                map.insert("provider".into(), json!(p.provider));
                map.extend(p.provider_config());
                p.host_flags.apply_to(&mut map);
                Value::Object(map)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_defaults() {
        assert_eq!(
            SandboxConfig::parse(&json!({})).unwrap().to_json(),
            json!({"provider":"fake","image":"ubuntu:24.04","reuseLease":false})
        );
        assert_eq!(
            SandboxConfig::parse(&json!({"provider":"fake","image":"  alpine  "}))
                .unwrap()
                .to_json(),
            json!({"provider":"fake","image":"alpine","reuseLease":false})
        );
        assert!(SandboxConfig::parse(&json!({"provider":"fake","extra":1})).is_err());
    }

    #[test]
    fn envelope_coerces_and_keeps_unknown_keys() {
        let c = SandboxConfig::parse(
            &json!({"provider":"e2b","timeoutMs":"450000","template":"base","nested":{"a":1}}),
        )
        .unwrap();
        assert_eq!(
            c.to_json(),
            json!({"provider":"e2b","timeoutMs":450000,"reuseLease":false,"template":"base","nested":{"a":1}})
        );
        let SandboxConfig::Provider(env) = c else {
            panic!()
        };
        assert!(!env.provider_config().contains_key("provider"));
    }

    #[test]
    fn host_flags_are_kept_defaulted_and_validated_in_every_sandbox_config() {
        let flags = json!({"streamRunLogs": false, "runnerLifecycleMode": "warm",
            "runnerIdleTimeoutMs": "60000", "archiveOnRelease": true, "streamAgentSessionOutput": true});
        for base in [
            json!({"provider": "fake"}),
            json!({"provider": "e2b", "template": "base"}),
        ] {
            let mut raw = base.as_object().unwrap().clone();
            raw.extend(flags.as_object().unwrap().clone());
            let c = SandboxConfig::parse(&Value::Object(raw)).unwrap();
            let out = c.to_json();
            assert_eq!(out["streamRunLogs"], json!(false));
            assert_eq!(out["runnerLifecycleMode"], json!("warm"));
            assert_eq!(out["runnerIdleTimeoutMs"], json!(60000));
            assert_eq!(out["archiveOnRelease"], json!(true));
            assert!(
                out.get("streamAgentSessionOutput").is_none(),
                "removed key stripped"
            );
            assert_eq!(
                SandboxConfig::parse(&out).unwrap(),
                c,
                "normalizes to itself"
            );
            if let SandboxConfig::Provider(p) = &c {
                let given = p.provider_config();
                assert!(
                    HOST_FLAG_KEYS.iter().all(|k| !given.contains_key(*k)),
                    "host-owned"
                );
            }
        }
        let plain = SandboxConfig::parse(&json!({"provider": "fake"})).unwrap();
        assert!(
            plain.host_flags().stream_run_logs(),
            "streamRunLogs defaults on"
        );
        assert_eq!(plain.host_flags().effective_runner_idle_timeout_ms(), None);
        let warm = SandboxConfig::parse(&json!({"provider": "e2b", "runnerLifecycleMode": "warm"}))
            .unwrap();
        assert_eq!(
            warm.host_flags().effective_runner_idle_timeout_ms(),
            Some(300_000)
        );
        for (bad, field) in [
            (json!({"runnerIdleTimeoutMs": 999}), "runnerIdleTimeoutMs"),
            (
                json!({"runnerIdleTimeoutMs": 86_400_001}),
                "runnerIdleTimeoutMs",
            ),
            (
                json!({"runnerLifecycleMode": "forever"}),
                "runnerLifecycleMode",
            ),
            (json!({"streamRunLogs": "yes"}), "streamRunLogs"),
            (json!({"archiveOnRelease": 1}), "archiveOnRelease"),
        ] {
            for provider in ["fake", "e2b"] {
                let mut raw = bad.as_object().unwrap().clone();
                raw.insert("provider".into(), json!(provider));
                let Error::InvalidConfig { field: got, .. } =
                    SandboxConfig::parse(&Value::Object(raw)).unwrap_err()
                else {
                    panic!("{bad}")
                };
                assert_eq!(got, field, "{bad} with {provider}");
            }
        }
    }

    #[test]
    fn envelope_rejects_bad_values() {
        let Error::InvalidConfig { issues, .. } =
            SandboxConfig::parse(&json!({"provider":"E2B","timeoutMs":0,"reuseLease":"yes"}))
                .unwrap_err()
        else {
            panic!()
        };
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, ["provider", "timeoutMs", "reuseLease"]);
        assert!(SandboxConfig::parse(&json!({"provider":"e2b","timeoutMs":86_400_001})).is_err());
    }
}
