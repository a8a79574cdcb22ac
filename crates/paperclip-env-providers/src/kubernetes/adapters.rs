//! Adapter defaults (spec 26 §3) and image resolution (§11), as data.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde_json::{Value, json};

use super::config::KubernetesConfig;

/// One built-in registry row.
struct Builtin {
    adapter_type: &'static str,
    runtime_image: &'static str,
    env_keys: &'static [&'static str],
    allow_fqdns: &'static [&'static str],
    probe_command: &'static str,
}

/// The canonical built-in registry (spec 26 §3.1).
const BUILTIN: &[Builtin] = &[
    Builtin {
        adapter_type: "claude_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-claude:v1",
        env_keys: &["ANTHROPIC_API_KEY"],
        allow_fqdns: &["api.anthropic.com"],
        probe_command: "claude --version",
    },
    Builtin {
        adapter_type: "codex_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-codex:v1",
        env_keys: &["OPENAI_API_KEY"],
        allow_fqdns: &["api.openai.com"],
        probe_command: "codex --version",
    },
    Builtin {
        adapter_type: "gemini_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-gemini:v1",
        env_keys: &["GOOGLE_API_KEY", "GEMINI_API_KEY"],
        allow_fqdns: &["generativelanguage.googleapis.com"],
        probe_command: "gemini --version",
    },
    Builtin {
        adapter_type: "cursor_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-cursor:v1",
        env_keys: &["ANTHROPIC_API_KEY", "OPENAI_API_KEY"],
        allow_fqdns: &["api.anthropic.com", "api.openai.com"],
        probe_command: "cursor-agent --version",
    },
    Builtin {
        adapter_type: "opencode_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-opencode:v1",
        env_keys: &["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENROUTER_API_KEY"],
        allow_fqdns: &["api.anthropic.com", "api.openai.com", "openrouter.ai"],
        probe_command: "opencode --version",
    },
    Builtin {
        adapter_type: "acpx_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-acpx:v1",
        env_keys: &["ANTHROPIC_API_KEY", "OPENAI_API_KEY"],
        allow_fqdns: &["api.anthropic.com", "api.openai.com"],
        probe_command: "acpx --version",
    },
    Builtin {
        adapter_type: "pi_local",
        runtime_image: "ghcr.io/paperclipai/agent-runtime-pi:v1",
        env_keys: &["ANTHROPIC_API_KEY"],
        allow_fqdns: &["api.anthropic.com"],
        probe_command: "pi --version",
    },
];

/// An adapter's runtime defaults, from the built-in or configured registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterDefaults {
    /// The adapter type.
    pub adapter_type: String,
    /// Default container image.
    pub runtime_image: String,
    /// Host env keys copied into the run's Secret.
    pub env_keys: Vec<String>,
    /// FQDNs the adapter needs.
    pub allow_fqdns: Vec<String>,
    /// Command that checks the adapter is installed.
    pub probe_command: Option<String>,
    /// Env defaults (overridden by `env_keys` values).
    pub default_env: BTreeMap<String, String>,
}

/// The built-in defaults of an adapter type.
///
/// ```
/// use paperclip_env_providers::kubernetes::builtin_adapter;
/// let claude = builtin_adapter("claude_local").unwrap();
/// assert_eq!(claude.runtime_image, "ghcr.io/paperclipai/agent-runtime-claude:v1");
/// assert!(builtin_adapter("vim_local").is_none());
/// ```
pub fn builtin(adapter_type: &str) -> Option<AdapterDefaults> {
    BUILTIN
        .iter()
        .find(|b| b.adapter_type == adapter_type)
        .map(|b| AdapterDefaults {
            adapter_type: b.adapter_type.into(),
            runtime_image: b.runtime_image.into(),
            env_keys: b.env_keys.iter().map(|s| (*s).to_owned()).collect(),
            allow_fqdns: b.allow_fqdns.iter().map(|s| (*s).to_owned()).collect(),
            probe_command: Some(b.probe_command.into()),
            default_env: BTreeMap::new(),
        })
}

/// One entry of the declarative `adapters` registry (spec 26 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    /// The adapter type.
    pub adapter_type: String,
    /// Whether the entry is usable (default `true`).
    pub enabled: bool,
    /// Container image.
    pub runtime_image: Option<String>,
    /// Host env keys.
    pub env_keys: Vec<String>,
    /// FQDNs.
    pub allow_fqdns: Vec<String>,
    /// Probe command.
    pub probe_command: Option<String>,
    /// Env defaults.
    pub default_env: BTreeMap<String, String>,
}

const ENTRY_KEYS: &[&str] = &[
    "adapterType",
    "enabled",
    "runtimeImage",
    "envKeys",
    "allowFqdns",
    "probeCommand",
    "defaultEnv",
];

fn string_list(
    map: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Vec<String>, (String, String)> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| (key.to_owned(), format!("{key} must be an array of strings"))),
        Some(_) => Err((key.to_owned(), format!("{key} must be an array of strings"))),
    }
}

impl AdapterEntry {
    /// Strict parse: unknown keys are rejected. The error is `(field, message)`.
    ///
    /// ```
    /// use paperclip_env_providers::kubernetes::AdapterEntry;
    /// let entry = AdapterEntry::parse(&serde_json::json!({"adapterType": "x", "runtimeImage": "img:1"})).unwrap();
    /// assert!(entry.enabled && entry.env_keys.is_empty());
    /// assert!(AdapterEntry::parse(&serde_json::json!({"adapterType": "x", "bogus": 1})).is_err());
    /// ```
    pub fn parse(value: &Value) -> Result<Self, (String, String)> {
        let Value::Object(map) = value else {
            return Err((String::new(), "adapter entries must be objects".into()));
        };
        if let Some(unknown) = map.keys().find(|k| !ENTRY_KEYS.contains(&k.as_str())) {
            return Err((unknown.clone(), format!("Unrecognized key: \"{unknown}\"")));
        }
        let adapter_type = match map.get("adapterType") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err((
                    "adapterType".into(),
                    "adapterType must be a non-empty string".into(),
                ));
            }
        };
        let enabled = match map.get("enabled") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(("enabled".into(), "enabled must be a boolean".into())),
        };
        let opt_string = |key: &str| match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((key.to_owned(), format!("{key} must be a string"))),
        };
        let default_env = match map.get("defaultEnv") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(env)) => env
                .iter()
                .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
                .ok_or_else(|| {
                    (
                        "defaultEnv".to_owned(),
                        "defaultEnv values must be strings".to_owned(),
                    )
                })?,
            Some(_) => return Err(("defaultEnv".into(), "defaultEnv must be an object".into())),
        };
        Ok(AdapterEntry {
            adapter_type,
            enabled,
            runtime_image: opt_string("runtimeImage")?,
            env_keys: string_list(map, "envKeys")?,
            allow_fqdns: string_list(map, "allowFqdns")?,
            probe_command: opt_string("probeCommand")?,
            default_env,
        })
    }

    /// The camelCase form.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"adapterType": self.adapter_type, "enabled": self.enabled,
            "envKeys": self.env_keys, "allowFqdns": self.allow_fqdns, "defaultEnv": self.default_env});
        if let Some(image) = &self.runtime_image {
            v["runtimeImage"] = json!(image);
        }
        if let Some(probe) = &self.probe_command {
            v["probeCommand"] = json!(probe);
        }
        v
    }
}

/// Resolves the effective adapter (spec 26 §3.3): the trimmed per-run type
/// if non-empty, else the config's; the configured registry when non-empty,
/// else the built-in one. The error is the spec's message.
pub fn resolve(
    config: &KubernetesConfig,
    per_run: Option<&str>,
) -> Result<AdapterDefaults, String> {
    let adapter_type = per_run
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(&config.adapter_type);
    if config.adapters.is_empty() {
        return builtin(adapter_type)
            .ok_or_else(|| format!("Unknown adapter type: {adapter_type}"));
    }
    let entry = config
        .adapters
        .iter()
        .find(|e| e.adapter_type == adapter_type && e.enabled)
        .ok_or_else(|| {
            format!("Adapter \"{adapter_type}\" is not in the configured adapter registry")
        })?;
    let runtime_image = entry.runtime_image.clone().ok_or_else(|| {
        format!("Adapter \"{adapter_type}\" is missing required runtime field: runtimeImage")
    })?;
    Ok(AdapterDefaults {
        adapter_type: adapter_type.to_owned(),
        runtime_image,
        env_keys: entry.env_keys.clone(),
        allow_fqdns: entry.allow_fqdns.clone(),
        probe_command: entry.probe_command.clone(),
        default_env: entry.default_env.clone(),
    })
}

/// `buildAdapterEnv`: `defaultEnv`, then each `envKeys` entry whose value in
/// `host_env` is set and non-empty. Values stay secret.
pub fn build_env(
    adapter: &AdapterDefaults,
    host_env: &BTreeMap<String, SecretString>,
) -> BTreeMap<String, SecretString> {
    use secrecy::ExposeSecret;
    let mut env: BTreeMap<String, SecretString> = adapter
        .default_env
        .iter()
        .map(|(k, v)| (k.clone(), SecretString::from(v.clone())))
        .collect();
    for key in &adapter.env_keys {
        if let Some(v) = host_env.get(key).filter(|v| !v.expose_secret().is_empty()) {
            env.insert(key.clone(), v.clone());
        }
    }
    env
}

/// An image glob as an anchored regex: `*` → `[^/]*`, `?` → `[^/]`; wildcards never cross `/`.
fn glob_regex(pattern: &str) -> Option<regex::Regex> {
    let mut re = String::from("^");
    for c in pattern.chars() {
        match c {
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            other => re.push_str(&regex::escape(&other.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).ok()
}

/// Whether `image` matches the allow-list glob `pattern` (spec 26 §11.1).
///
/// ```
/// use paperclip_env_providers::kubernetes::image_matches;
/// assert!(image_matches("ghcr.io/x:v?", "ghcr.io/x:v1"));
/// assert!(!image_matches("ghcr.io/*:v1", "ghcr.io/paperclipai/agent-runtime-claude:v1"));
/// ```
pub fn image_matches(pattern: &str, image: &str) -> bool {
    glob_regex(pattern).is_some_and(|re| re.is_match(image))
}

/// Resolves the image (spec 26 §11.2): an allowed override, else the
/// registry rewrite of the default, else the default.
///
/// ```
/// use paperclip_env_providers::kubernetes::{KubernetesConfig, resolve_image};
/// let values = serde_json::json!({"inCluster": true, "imageRegistry": "registry.example.com/paperclip"});
/// let config = KubernetesConfig::parse(values.as_object().unwrap()).unwrap();
/// assert_eq!(
///     resolve_image(&config, "ghcr.io/paperclipai/agent-runtime-claude:v1", None).unwrap(),
///     "registry.example.com/paperclip/agent-runtime-claude:v1"
/// );
/// ```
pub fn resolve_image(
    config: &KubernetesConfig,
    default_image: &str,
    image_override: Option<&str>,
) -> Result<String, String> {
    if let Some(image) = image_override {
        if config
            .image_allow_list
            .iter()
            .any(|p| image_matches(p, image))
        {
            return Ok(image.to_owned());
        }
        return Err(format!("Image override \"{image}\" is not in allowlist"));
    }
    let Some(registry) = &config.image_registry else {
        return Ok(default_image.to_owned());
    };
    let registry = registry.trim_end_matches('/');
    let (path, tag) = match default_image.rfind(':') {
        Some(i) if !default_image[i..].contains('/') => {
            (&default_image[..i], Some(&default_image[i + 1..]))
        }
        _ => (default_image, None),
    };
    let rest: Vec<&str> = path.split('/').skip(2).collect();
    let rest = if rest.is_empty() {
        path.rsplit('/').next().unwrap_or(path).to_owned()
    } else {
        rest.join("/")
    };
    Ok(match tag {
        Some(tag) => format!("{registry}/{rest}:{tag}"),
        None => format!("{registry}/{rest}"),
    })
}

/// Pull policy (spec 26 §11.3): `Always` for floating tags, else `IfNotPresent`.
///
/// ```
/// use paperclip_env_providers::kubernetes::pull_policy;
/// assert_eq!(pull_policy("ghcr.io/x/y:latest"), "Always");
/// assert_eq!(pull_policy("ghcr.io/x/y:v1"), "IfNotPresent");
/// ```
pub fn pull_policy(image: &str) -> &'static str {
    if image.contains("@sha256:") {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    if ["latest", "dev", "main", "stable"].contains(&tag) {
        "Always"
    } else {
        "IfNotPresent"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn config(v: Value) -> KubernetesConfig {
        KubernetesConfig::parse(v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn globs_never_cross_slashes() {
        assert!(image_matches("ghcr.io/x:v?", "ghcr.io/x:v1"));
        assert!(!image_matches("ghcr.io/x:v?", "ghcr.io/x:v12"));
        assert!(image_matches(
            "ghcr.io/paperclipai/*:v1",
            "ghcr.io/paperclipai/agent-runtime-claude:v1"
        ));
        assert!(!image_matches(
            "ghcr.io/*:v1",
            "ghcr.io/paperclipai/agent-runtime-claude:v1"
        ));
        assert!(
            !image_matches("ghcr.io/x.y", "ghcr.io/xzy"),
            "dots are literal"
        );
    }

    #[test]
    fn image_resolution() {
        let c = config(json!({"inCluster": true}));
        let default = "ghcr.io/paperclipai/agent-runtime-claude:v1";
        assert_eq!(resolve_image(&c, default, None).unwrap(), default);
        assert_eq!(
            resolve_image(&c, default, Some("evil/img:1")).unwrap_err(),
            "Image override \"evil/img:1\" is not in allowlist"
        );
        let c = config(
            json!({"inCluster": true, "imageRegistry": "registry.example.com/paperclip",
            "imageAllowList": ["ghcr.io/paperclipai/*:v?"]}),
        );
        assert_eq!(
            resolve_image(&c, default, None).unwrap(),
            "registry.example.com/paperclip/agent-runtime-claude:v1"
        );
        assert_eq!(
            resolve_image(&c, default, Some("ghcr.io/paperclipai/custom:v2")).unwrap(),
            "ghcr.io/paperclipai/custom:v2"
        );
        assert_eq!(pull_policy("x/y:latest"), "Always");
        assert_eq!(pull_policy("x/y"), "Always");
        assert_eq!(pull_policy("registry:5000/y:v1"), "IfNotPresent");
        assert_eq!(pull_policy("x/y@sha256:abc"), "IfNotPresent");
    }

    #[test]
    fn registry_errors_and_env() {
        let c = config(json!({"inCluster": true}));
        assert_eq!(
            resolve(&c, Some("  ")).unwrap().adapter_type,
            "claude_local"
        );
        assert_eq!(
            resolve(&c, Some("zz")).unwrap_err(),
            "Unknown adapter type: zz"
        );
        assert_eq!(
            resolve(&c, Some(" codex_local ")).unwrap().env_keys,
            ["OPENAI_API_KEY"]
        );
        let c = config(json!({"inCluster": true, "adapters": [
            {"adapterType": "claude_local", "runtimeImage": "img:1", "envKeys": ["K"], "defaultEnv": {"K": "d", "D": "x"}},
            {"adapterType": "bare"}]}));
        assert_eq!(
            resolve(&c, Some("codex_local")).unwrap_err(),
            "Adapter \"codex_local\" is not in the configured adapter registry"
        );
        assert_eq!(
            resolve(&c, Some("bare")).unwrap_err(),
            "Adapter \"bare\" is missing required runtime field: runtimeImage"
        );
        let a = resolve(&c, None).unwrap();
        let mut host = BTreeMap::new();
        host.insert("K".to_owned(), SecretString::from("secret"));
        let env = build_env(&a, &host);
        assert_eq!(env["K"].expose_secret(), "secret");
        assert_eq!(env["D"].expose_secret(), "x");
        host.insert("K".to_owned(), SecretString::from(""));
        assert_eq!(build_env(&a, &host)["K"].expose_secret(), "d");
        let bad = KubernetesConfig::parse(
            json!({"inCluster": true, "adapters": [{"adapterType": "x", "extra": 1}]})
                .as_object()
                .unwrap(),
        );
        assert_eq!(bad.unwrap_err()[0].field, "adapters.0.extra");
    }
}
