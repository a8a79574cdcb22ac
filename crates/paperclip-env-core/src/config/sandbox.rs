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

/// Config of the built-in `fake` provider (strict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSandboxConfig {
    /// Image label (trimmed; default `ubuntu:24.04`).
    pub image: String,
    /// Keep the lease for reuse.
    pub reuse_lease: bool,
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
            f.reject_unknown();
            if !f.issues.is_empty() {
                return Err(Error::invalid_config(f.issues));
            }
            return Ok(SandboxConfig::BuiltinFake(FakeSandboxConfig {
                image: image.unwrap_or_default(),
                reuse_lease,
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
        let fields = f.rest();
        if !f.issues.is_empty() {
            return Err(Error::invalid_config(f.issues));
        }
        Ok(SandboxConfig::Provider(ProviderEnvelope {
            provider,
            timeout_ms,
            reuse_lease,
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

    /// Normalized JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            SandboxConfig::BuiltinFake(c) => {
                json!({"provider": "fake", "image": c.image, "reuseLease": c.reuse_lease})
            }
            SandboxConfig::Provider(p) => {
                let mut map = JsonObject::new();
                map.insert("provider".into(), json!(p.provider));
                map.extend(p.provider_config());
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
