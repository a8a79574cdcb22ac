//! exe.dev provider config (spec 24 §3): lenient parse, ordered validation
//! and the SSH private-key linter.

use std::collections::BTreeMap;

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, JsonObject};
use schemars::JsonSchema;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// Default lifecycle + SSH timeout (5 min).
pub const DEFAULT_TIMEOUT_MS: i64 = 300_000;
/// Default API endpoint.
pub const DEFAULT_API_URL: &str = "https://exe.dev/exec";
/// Setup script used when none is configured: installs Node when missing.
pub const DEFAULT_SETUP_SCRIPT: &str = "command -v node >/dev/null 2>&1 || (curl -fsSL https://deb.nodesource.com/setup_20.x | sudo -E bash - && sudo apt-get install -y nodejs)";

/// The exe.dev config as the provider uses it. Secrets never appear in `Debug`.
#[derive(Clone)]
pub struct ExeDevConfig {
    /// API token (config or secret); `EXE_API_KEY` is applied by the provider.
    pub api_key: Option<SecretString>,
    /// PEM private key registered with exe.dev.
    pub ssh_private_key: Option<SecretString>,
    /// SSH login user (blank: the VM's default, `root`).
    pub ssh_user: Option<String>,
    /// Path of a key file on this host (used when no `sshPrivateKey`).
    pub ssh_identity_file: Option<String>,
    /// SSH port (raw, validated to 1..=65535).
    pub ssh_port: i64,
    /// `accept-new`, `yes` or `no`.
    pub strict_host_key_checking: String,
    /// `--image`.
    pub image: Option<String>,
    /// `--cpu`.
    pub cpu: Option<i64>,
    /// `--memory`.
    pub memory: Option<String>,
    /// `--disk`.
    pub disk: Option<String>,
    /// `--command`.
    pub command: Option<String>,
    /// `--env K=V` at creation.
    pub env: BTreeMap<String, String>,
    /// `--integration`.
    pub integrations: Vec<String>,
    /// `--tag`.
    pub tags: Vec<String>,
    /// `--setup-script` (`None`: the built-in Node installer).
    pub setup_script: Option<String>,
    /// `--prompt`.
    pub prompt: Option<String>,
    /// `--comment`.
    pub comment: Option<String>,
    /// VM name prefix (normalised).
    pub name_prefix: String,
    /// Normalised `/exec` endpoint.
    pub api_url: String,
    /// Lifecycle + command timeout in ms (raw, validated).
    pub timeout_ms: i64,
    /// Keep the VM between runs.
    pub reuse_lease: bool,
}

impl std::fmt::Debug for ExeDevConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExeDevConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .field(
                "ssh_private_key",
                &self.ssh_private_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field("ssh_user", &self.ssh_user)
            .field("ssh_identity_file", &self.ssh_identity_file)
            .field("ssh_port", &self.ssh_port)
            .field("strict_host_key_checking", &self.strict_host_key_checking)
            .field("image", &self.image)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("name_prefix", &self.name_prefix)
            .field("api_url", &self.api_url)
            .field("timeout_ms", &self.timeout_ms)
            .field("reuse_lease", &self.reuse_lease)
            .finish_non_exhaustive()
    }
}

/// JSON Schema of the exe.dev config (secret fields marked).
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct ExeDevConfigSchema {
    /// exe.dev API token (needs `new`, `ls`, `rm`); falls back to `EXE_API_KEY`.
    #[schemars(with = "Option<SecretRefField>")]
    api_key: Option<String>,
    /// OpenSSH/PEM private key registered with exe.dev.
    #[schemars(with = "Option<SecretRefField>")]
    ssh_private_key: Option<String>,
    /// SSH login user; blank uses the image default.
    ssh_user: Option<String>,
    /// Absolute path of a private key on this host (when `sshPrivateKey` is empty).
    ssh_identity_file: Option<String>,
    /// SSH port (default 22).
    ssh_port: Option<u16>,
    /// `accept-new` (default), `yes` or `no`.
    strict_host_key_checking: Option<String>,
    /// VM image.
    image: Option<String>,
    /// vCPUs.
    cpu: Option<u32>,
    /// Memory, e.g. `4GB`.
    memory: Option<String>,
    /// Disk, e.g. `20GB`.
    disk: Option<String>,
    /// `--command` (auto|none|custom).
    command: Option<String>,
    /// Environment set at VM creation.
    env: Option<BTreeMap<String, String>>,
    /// Integrations to attach.
    integrations: Option<Vec<String>>,
    /// Tags.
    tags: Option<Vec<String>>,
    /// First-boot script (default installs Node).
    setup_script: Option<String>,
    /// Shelley prompt.
    prompt: Option<String>,
    /// VM comment.
    comment: Option<String>,
    /// VM name prefix (default `paperclip`).
    name_prefix: Option<String>,
    /// API endpoint (default `https://exe.dev/exec`).
    api_url: Option<String>,
    /// Lifecycle and command timeout in ms (default 300000).
    timeout_ms: Option<u64>,
    /// Keep the VM between runs (never suspended).
    reuse_lease: Option<bool>,
}

fn opt_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Number(n) => n.as_f64().filter(|f| f.is_finite()).map(|_| n.to_string()),
        Value::String(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
        _ => None,
    }
}

fn number(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if !s.trim().is_empty() => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

fn list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(|v| opt_string(Some(v))).collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// `apiUrl` normalisation (spec 24 §3.1).
pub fn normalize_api_url(raw: Option<&str>) -> String {
    let raw = raw.map(str::trim).unwrap_or("");
    if raw.is_empty() {
        return DEFAULT_API_URL.to_owned();
    }
    let Ok(mut url) = reqwest::Url::parse(raw) else {
        return raw.to_owned();
    };
    let mut path = url.path().trim_end_matches('/').to_owned();
    if !path.ends_with("/exec") {
        path.push_str("/exec");
    }
    while path.contains("//") {
        path = path.replace("//", "/");
    }
    url.set_path(&path);
    url.to_string()
}

/// `namePrefix` normalisation (spec 24 §3.1).
pub fn normalize_prefix(raw: Option<&str>) -> String {
    let lower = raw.unwrap_or("paperclip").to_lowercase();
    let mut out = String::new();
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
            if !(c == '-' && out.ends_with('-')) {
                out.push(c);
            }
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    let base = if trimmed.is_empty() {
        "paperclip"
    } else {
        trimmed
    };
    base.chars().take(24).collect()
}

use paperclip_env_core::provider::support::valid_env_key;

impl ExeDevConfig {
    /// Lenient parse of plain values (spec 24 §3.1); never fails.
    pub fn from_values(values: &JsonObject) -> Self {
        let env = match values.get("env") {
            Some(Value::Object(map)) => map
                .iter()
                .filter_map(|(k, v)| {
                    let k = k.trim();
                    (!k.is_empty())
                        .then_some(())
                        .and_then(|_| opt_string(Some(v)))
                        .map(|v| (k.to_owned(), v))
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        ExeDevConfig {
            api_key: opt_string(values.get("apiKey")).map(SecretString::from),
            ssh_private_key: opt_string(values.get("sshPrivateKey")).map(SecretString::from),
            ssh_user: opt_string(values.get("sshUser")),
            ssh_identity_file: opt_string(values.get("sshIdentityFile")),
            ssh_port: number(values.get("sshPort")).map_or(22, |n| n.trunc() as i64),
            strict_host_key_checking: values
                .get("strictHostKeyChecking")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or("accept-new")
                .to_owned(),
            image: opt_string(values.get("image")),
            cpu: number(values.get("cpu")).map(|n| n.trunc() as i64),
            memory: opt_string(values.get("memory")),
            disk: opt_string(values.get("disk")),
            command: opt_string(values.get("command")),
            env,
            integrations: list(values.get("integrations")),
            tags: list(values.get("tags")),
            setup_script: opt_string(values.get("setupScript")),
            prompt: opt_string(values.get("prompt")),
            comment: opt_string(values.get("comment")),
            name_prefix: normalize_prefix(values.get("namePrefix").and_then(Value::as_str)),
            api_url: normalize_api_url(values.get("apiUrl").and_then(Value::as_str)),
            timeout_ms: number(values.get("timeoutMs"))
                .map_or(DEFAULT_TIMEOUT_MS, |n| n.trunc() as i64),
            reuse_lease: values.get("reuseLease") == Some(&Value::Bool(true)),
        }
    }

    /// Parse with resolved secrets (`apiKey`, `sshPrivateKey`) taking precedence.
    pub fn from_provider_config(config: &ProviderConfig) -> Self {
        let mut parsed = Self::from_values(config.values());
        if let Some(key) = config.secret("apiKey") {
            parsed.api_key = Some(key.clone());
        }
        if let Some(key) = config.secret("sshPrivateKey") {
            parsed.ssh_private_key = Some(key.clone());
        }
        parsed
    }

    /// Validation (spec 24 §3.2): every issue, in order. `env_key_present`
    /// says whether `EXE_API_KEY` (or a builder key) is available.
    pub fn validate(&self, raw: &JsonObject, env_key_present: bool) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if reqwest::Url::parse(&self.api_url).is_err() {
            issues.push(ConfigIssue::new("apiUrl", "apiUrl must be a valid URL."));
        }
        if !(1..=86_400_000).contains(&self.timeout_ms) {
            issues.push(ConfigIssue::new(
                "timeoutMs",
                "timeoutMs must be between 1 and 86400000.",
            ));
        }
        if self.cpu.is_some_and(|c| c <= 0) {
            issues.push(ConfigIssue::new(
                "cpu",
                "cpu must be greater than 0 when provided.",
            ));
        }
        if !(1..=65_535).contains(&self.ssh_port) {
            issues.push(ConfigIssue::new(
                "sshPort",
                "sshPort must be between 1 and 65535.",
            ));
        }
        if self.api_key.is_none() && !env_key_present {
            issues.push(ConfigIssue::new(
                "apiKey",
                "exe.dev environments require an API key in config or EXE_API_KEY.",
            ));
        }
        for key in self.env.keys().filter(|k| !valid_env_key(k)) {
            issues.push(ConfigIssue::new(
                "env",
                format!("env contains an invalid key: {key}"),
            ));
        }
        if matches!(raw.get("strictHostKeyChecking"), Some(Value::String(s)) if s.trim().is_empty())
        {
            issues.push(ConfigIssue::new(
                "strictHostKeyChecking",
                "strictHostKeyChecking cannot be empty.",
            ));
        } else if !["accept-new", "yes", "no"].contains(&self.strict_host_key_checking.as_str()) {
            issues.push(ConfigIssue::new(
                "strictHostKeyChecking",
                "strictHostKeyChecking must be one of accept-new, yes, no.",
            ));
        }
        if let Some(key) = &self.ssh_private_key
            && let Some(message) = lint_private_key(key.expose_secret())
        {
            issues.push(ConfigIssue::new("sshPrivateKey", message));
        }
        if self.ssh_private_key.is_none()
            && self
                .ssh_identity_file
                .as_deref()
                .is_some_and(|p| !p.starts_with('/'))
        {
            issues.push(ConfigIssue::new(
                "sshIdentityFile",
                "sshIdentityFile must be an absolute path.",
            ));
        }
        issues
    }

    /// Warnings returned by validation (spec 24 §3.2).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = vec!["The Paperclip host must have SSH access to the created exe.dev VM, and its SSH key must be registered with exe.dev. The API token only covers provisioning.".to_owned()];
        if self.reuse_lease {
            warnings.push(
                "reuseLease keeps the VM alive between runs; this provider does not suspend retained VMs."
                    .to_owned(),
            );
        }
        warnings
    }

    /// The normalised config: every field, secrets as given (a secret ref
    /// after persistence), `apiKey: null` when only the env var is set.
    pub fn normalized(&self, raw: &JsonObject) -> JsonObject {
        let passthrough = |k: &str| opt_string(raw.get(k)).map_or(Value::Null, Value::String);
        let v = json!({
            "apiKey": passthrough("apiKey"),
            "sshPrivateKey": passthrough("sshPrivateKey"),
            "sshUser": self.ssh_user,
            "sshIdentityFile": self.ssh_identity_file,
            "sshPort": self.ssh_port,
            "strictHostKeyChecking": self.strict_host_key_checking,
            "image": self.image,
            "cpu": self.cpu,
            "memory": self.memory,
            "disk": self.disk,
            "command": self.command,
            "env": self.env,
            "integrations": self.integrations,
            "tags": self.tags,
            "setupScript": self.setup_script,
            "prompt": self.prompt,
            "comment": self.comment,
            "namePrefix": self.name_prefix,
            "apiUrl": self.api_url,
            "timeoutMs": self.timeout_ms,
            "reuseLease": self.reuse_lease,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

fn is_base64_line(line: &str) -> bool {
    !line.is_empty()
        && line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=')
}

fn is_pem_header(line: &str) -> bool {
    let Some((name, value)) = line.split_once(':') else {
        return false;
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
        && value.starts_with(char::is_whitespace)
        && !value.trim().is_empty()
}

fn pem_label<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = line.trim_end().strip_prefix(marker)?;
    let label = rest.strip_suffix("PRIVATE KEY-----")?;
    label
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ')
        .then_some(label)
}

/// The SSH private-key linter (spec 24 §3.3): the first problem, if any.
pub fn lint_private_key(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.iter().any(|l| {
        l.strip_prefix("PuTTY-User-Key-File-")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    }) {
        return Some("sshPrivateKey looks like a PuTTY .ppk file. Convert it to OpenSSH format (PuTTYgen → Conversions → Export OpenSSH key) and paste the resulting PEM.".into());
    }
    let first = text.split_whitespace().next().unwrap_or("");
    let public = [
        "ssh-rsa",
        "ssh-dss",
        "ssh-ed25519",
        "sk-ssh-ed25519@openssh.com",
    ]
    .contains(&first)
        || first.starts_with("ecdsa-sha2-")
        || (first.starts_with("sk-ecdsa-sha2-") && first.ends_with("@openssh.com"));
    if public && text.split_whitespace().nth(1).is_some() {
        return Some("sshPrivateKey looks like a PUBLIC key. Paste the matching private key (the file without the .pub extension).".into());
    }
    let Some(begin) = lines
        .iter()
        .position(|l| pem_label(l, "-----BEGIN ").is_some())
    else {
        return Some("sshPrivateKey must be a PEM-encoded private key starting with a line like '-----BEGIN OPENSSH PRIVATE KEY-----'.".into());
    };
    let Some(end) = lines
        .iter()
        .rposition(|l| pem_label(l, "-----END ").is_some())
    else {
        return Some("sshPrivateKey is missing its '-----END … PRIVATE KEY-----' footer. Make sure you copied the whole file, including the final line.".into());
    };
    let head = pem_label(lines[begin], "-----BEGIN ").unwrap_or("").trim();
    let foot = pem_label(lines[end], "-----END ").unwrap_or("").trim();
    if head != foot {
        let show = |s: &str| {
            if s.is_empty() {
                "(none)".to_owned()
            } else {
                s.to_owned()
            }
        };
        return Some(format!(
            "sshPrivateKey header/footer mismatch (BEGIN {} vs END {}). The file is likely truncated or two keys are concatenated.",
            show(head),
            show(foot)
        ));
    }
    let body: Vec<&str> = if end > begin {
        lines[begin + 1..end]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    if body.is_empty() {
        return Some("sshPrivateKey appears to be empty between its BEGIN and END markers.".into());
    }
    if body.iter().any(|l| !is_base64_line(l) && !is_pem_header(l)) {
        return Some("sshPrivateKey body contains non-base64 characters. The key may have been corrupted by line-wrapping or copy-paste.".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_url_and_prefix() {
        assert_eq!(
            normalize_api_url(Some("https://exe.dev")),
            "https://exe.dev/exec"
        );
        assert_eq!(
            normalize_api_url(Some("https://exe.dev/exec/")),
            "https://exe.dev/exec"
        );
        assert_eq!(normalize_api_url(Some("https://h/x")), "https://h/x/exec");
        assert_eq!(
            normalize_prefix(Some(" Paperclip Sandbox ")),
            "paperclip-sandbox"
        );
        assert_eq!(normalize_prefix(Some("!!!")), "paperclip");
    }

    #[test]
    fn lints_keys() {
        assert!(
            lint_private_key("ssh-ed25519 AAAA me@host")
                .unwrap()
                .contains("PUBLIC")
        );
        assert!(
            lint_private_key("PuTTY-User-Key-File-3: ssh-ed25519")
                .unwrap()
                .contains("PuTTY")
        );
        assert!(lint_private_key("hello").unwrap().contains("PEM-encoded"));
        assert!(
            lint_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA")
                .unwrap()
                .contains("footer")
        );
        assert!(
            lint_private_key(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n\n-----END OPENSSH PRIVATE KEY-----"
            )
            .unwrap()
            .contains("empty")
        );
        assert!(
            lint_private_key(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAA AA!\n-----END OPENSSH PRIVATE KEY-----"
            )
            .unwrap()
            .contains("non-base64")
        );
        assert!(
            lint_private_key(
                "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----"
            )
            .unwrap()
            .contains("mismatch")
        );
        assert_eq!(
            lint_private_key(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
            ),
            None
        );
    }
}
