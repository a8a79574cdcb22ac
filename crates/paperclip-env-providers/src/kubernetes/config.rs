//! The `kubernetes` driver config (spec 26 §1): parsing with every issue
//! named by its field, in schema order, defaults, and the normalized
//! camelCase form the host stores.

use std::collections::BTreeMap;

use paperclip_env_core::secret::{ProviderConfig, SecretRefField};
use paperclip_env_core::{ConfigIssue, JsonObject};
use schemars::JsonSchema;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::adapters::{self, AdapterEntry};

/// Default namespace prefix.
pub const DEFAULT_NAMESPACE_PREFIX: &str = "paperclip-";
/// Default Job TTL after it finishes (seconds).
pub const DEFAULT_JOB_TTL_SECONDS: u64 = 900;
/// Default pod activity deadline / exec budget (seconds).
pub const DEFAULT_POD_ACTIVITY_DEADLINE_SEC: u64 = 3600;
/// Default adapter.
pub const DEFAULT_ADAPTER_TYPE: &str = "claude_local";

/// The auth failure message (spec 26 §1.2, exact).
pub const AUTH_REQUIRED_MESSAGE: &str =
    "kubernetes provider requires one of `inCluster` or `kubeconfig`";

/// Which workload a run gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// An agent-sandbox `Sandbox` CR: a long-lived pod, multi-command exec.
    #[default]
    SandboxCr,
    /// A `batch/v1` Job: one-shot, no multi-command exec.
    Job,
}

impl Backend {
    /// The config value (`"sandbox-cr"` / `"job"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::SandboxCr => "sandbox-cr",
            Backend::Job => "job",
        }
    }

    /// Parses a config value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "sandbox-cr" => Some(Backend::SandboxCr),
            "job" => Some(Backend::Job),
            _ => None,
        }
    }
}

/// How egress is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EgressMode {
    /// Kubernetes NetworkPolicy (CIDR only).
    #[default]
    Standard,
    /// CiliumNetworkPolicy (exact FQDNs).
    Cilium,
}

impl EgressMode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Standard => "standard",
            EgressMode::Cilium => "cilium",
        }
    }
}

/// Container requests/limits (`defaultResources`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    /// `requests` (`cpu`, `memory`), replacing the built-in object wholesale.
    pub requests: Option<BTreeMap<String, String>>,
    /// `limits`, likewise.
    pub limits: Option<BTreeMap<String, String>>,
}

/// The parsed config. `Debug` never prints the kubeconfig.
#[derive(Clone)]
pub struct KubernetesConfig {
    /// Use the in-pod ServiceAccount.
    pub in_cluster: bool,
    /// Inline kubeconfig YAML (resolved secret).
    pub kubeconfig: Option<SecretString>,
    /// Namespace prefix (`paperclip-`).
    pub namespace_prefix: String,
    /// Company slug; derived from the company id when absent.
    pub company_slug: Option<String>,
    /// Registry rewrite target, `host[:port][/path]` (any scheme stripped).
    pub image_registry: Option<String>,
    /// Globs an image override must match.
    pub image_allow_list: Vec<String>,
    /// Pull secrets in the tenant namespace.
    pub image_pull_secrets: Vec<String>,
    /// Extra FQDNs beyond the adapter defaults.
    pub egress_allow_fqdns: Vec<String>,
    /// Extra IPv4 CIDRs.
    pub egress_allow_cidrs: Vec<String>,
    /// `standard` or `cilium`.
    pub egress_mode: EgressMode,
    /// Container resources override.
    pub default_resources: Option<Resources>,
    /// Pod runtime class (e.g. `kata-fc`).
    pub runtime_class_name: Option<String>,
    /// Annotations on `paperclip-tenant-sa`.
    pub service_account_annotations: BTreeMap<String, String>,
    /// Job TTL after finishing.
    pub job_ttl_seconds_after_finished: u64,
    /// Job deadline; default exec/readiness budget for sandbox-cr.
    pub pod_activity_deadline_sec: u64,
    /// Default adapter.
    pub adapter_type: String,
    /// Declarative registry replacing the built-in one when non-empty.
    pub adapters: Vec<AdapterEntry>,
    /// Workload kind; `None` when the config does not say (the provider's default applies).
    pub backend: Option<Backend>,
    /// Namespace of the Paperclip server the agents call back (gotcha G9).
    pub server_namespace: String,
    /// Labels of the Paperclip server pods (gotcha G9).
    pub server_pod_selector: BTreeMap<String, String>,
}

impl std::fmt::Debug for KubernetesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesConfig")
            .field("in_cluster", &self.in_cluster)
            .field(
                "kubeconfig",
                &self.kubeconfig.as_ref().map(|_| "[REDACTED]"),
            )
            .field("namespace_prefix", &self.namespace_prefix)
            .field("company_slug", &self.company_slug)
            .field("image_registry", &self.image_registry)
            .field("egress_mode", &self.egress_mode)
            .field("adapter_type", &self.adapter_type)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            in_cluster: false,
            kubeconfig: None,
            namespace_prefix: DEFAULT_NAMESPACE_PREFIX.into(),
            company_slug: None,
            image_registry: None,
            image_allow_list: Vec::new(),
            image_pull_secrets: Vec::new(),
            egress_allow_fqdns: Vec::new(),
            egress_allow_cidrs: Vec::new(),
            egress_mode: EgressMode::Standard,
            default_resources: None,
            runtime_class_name: None,
            service_account_annotations: BTreeMap::new(),
            job_ttl_seconds_after_finished: DEFAULT_JOB_TTL_SECONDS,
            pod_activity_deadline_sec: DEFAULT_POD_ACTIVITY_DEADLINE_SEC,
            adapter_type: DEFAULT_ADAPTER_TYPE.into(),
            adapters: Vec::new(),
            backend: None,
            server_namespace: super::manifests::SERVER_NAMESPACE.into(),
            server_pod_selector: BTreeMap::from([(
                super::manifests::SERVER_POD_SELECTOR.0.to_owned(),
                super::manifests::SERVER_POD_SELECTOR.1.to_owned(),
            )]),
        }
    }
}

/// JSON Schema of the config; `kubeconfig` is a secret reference.
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct KubernetesConfigSchema {
    /// Use the in-pod ServiceAccount.
    in_cluster: Option<bool>,
    /// Inline kubeconfig YAML, stored as a Paperclip secret.
    #[schemars(with = "Option<SecretRefField>")]
    kubeconfig: Option<String>,
    /// Alias of `kubeconfig` (the name the upstream README uses): a Paperclip secret id.
    #[schemars(with = "Option<SecretRefField>")]
    kubeconfig_secret_ref: Option<String>,
    /// Tenant namespace prefix, `^[a-z0-9-]{1,32}$`.
    namespace_prefix: Option<String>,
    /// Company slug, `^[a-z0-9-]{1,32}$`; derived from the company id when absent.
    company_slug: Option<String>,
    /// Registry rewrite target, `host[:port][/path]`.
    image_registry: Option<String>,
    /// Globs an image override must match.
    image_allow_list: Option<Vec<String>>,
    /// Names of pull Secrets in the tenant namespace.
    image_pull_secrets: Option<Vec<String>>,
    /// Extra FQDNs the agent may reach.
    egress_allow_fqdns: Option<Vec<String>>,
    /// Extra IPv4 CIDRs the agent may reach.
    egress_allow_cidrs: Option<Vec<String>>,
    /// `standard` (NetworkPolicy) or `cilium` (CiliumNetworkPolicy).
    egress_mode: Option<String>,
    /// Container requests/limits replacing the defaults.
    default_resources: Option<Value>,
    /// Pod runtime class.
    runtime_class_name: Option<String>,
    /// Annotations on the tenant ServiceAccount.
    service_account_annotations: Option<BTreeMap<String, String>>,
    /// Job TTL after finishing (seconds, ≥ 0).
    job_ttl_seconds_after_finished: Option<u64>,
    /// Job deadline and default exec budget (seconds, ≥ 1).
    pod_activity_deadline_sec: Option<u64>,
    /// Default adapter type.
    adapter_type: Option<String>,
    /// Adapter registry replacing the built-in one.
    adapters: Option<Vec<Value>>,
    /// `sandbox-cr` or `job`.
    backend: Option<String>,
    /// Namespace of the Paperclip server agents call back (default `paperclip`).
    paperclip_server_namespace: Option<String>,
    /// Labels selecting the Paperclip server pods (default `{app: paperclip-server}`).
    paperclip_server_pod_selector: Option<BTreeMap<String, String>>,
}

struct Parser<'a> {
    values: &'a JsonObject,
    issues: Vec<ConfigIssue>,
}

impl Parser<'_> {
    fn issue(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue::new(field, message));
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.issue(key, format!("{key} must be a string"));
                None
            }
        }
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        match self.present(key)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.issue(key, format!("{key} must be a boolean"));
                None
            }
        }
    }

    fn strings(&mut self, key: &str) -> Vec<String> {
        match self.present(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                let mut bad = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        _ => bad.push(i),
                    }
                }
                for i in bad {
                    self.issue(
                        format!("{key}.{i}"),
                        format!("{key} entries must be strings"),
                    );
                }
                out
            }
            Some(_) => {
                self.issue(key, format!("{key} must be an array of strings"));
                Vec::new()
            }
        }
    }

    fn string_map(&mut self, key: &str) -> BTreeMap<String, String> {
        match self.present(key) {
            None => BTreeMap::new(),
            Some(Value::Object(map)) => {
                let mut out = BTreeMap::new();
                let mut bad = Vec::new();
                for (k, v) in map {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        _ => bad.push(k.clone()),
                    }
                }
                for k in bad {
                    self.issue(
                        format!("{key}.{k}"),
                        format!("{key} values must be strings"),
                    );
                }
                out
            }
            Some(_) => {
                self.issue(key, format!("{key} must be an object of strings"));
                BTreeMap::new()
            }
        }
    }

    fn integer(&mut self, key: &str, min: u64, default: u64) -> u64 {
        match self.present(key) {
            None => default,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f >= min as f64 && f <= u32::MAX as f64 => f as u64,
                _ => {
                    self.issue(key, format!("{key} must be an integer >= {min}"));
                    default
                }
            },
            Some(_) => {
                self.issue(key, format!("{key} must be an integer >= {min}"));
                default
            }
        }
    }
}

use super::validation::{
    is_config_map_key, is_dns1123_subdomain, is_env_var_name, is_fqdn_match_name, is_label_value,
    is_qualified_name, parse_quantity,
};

/// The tenant LimitRange's per-container bounds (`paperclip-limits`, §5.3)
/// in nano-units: a `defaultResources` outside them is refused by every
/// cluster the driver provisions, so config validation refuses it first.
const CONTAINER_MIN: [(&str, &str); 2] = [("cpu", "100m"), ("memory", "128Mi")];
const CONTAINER_MAX: [(&str, &str); 2] = [("cpu", "4"), ("memory", "8Gi")];
/// The built-in container resources (§6.2) a partial `defaultResources` keeps.
pub(crate) const BUILTIN_REQUESTS: [(&str, &str); 2] = [("cpu", "250m"), ("memory", "512Mi")];
/// See [`BUILTIN_REQUESTS`].
pub(crate) const BUILTIN_LIMITS: [(&str, &str); 2] = [("cpu", "2"), ("memory", "4Gi")];

fn bound(
    table: &'static [(&'static str, &'static str)],
    resource: &str,
) -> Option<(&'static str, i128)> {
    let (_, text) = table.iter().find(|(r, _)| *r == resource)?;
    Some((text, parse_quantity(text)?))
}

fn check_resources(p: &mut Parser<'_>, r: &Resources) {
    let table = |m: &Option<BTreeMap<String, String>>, builtin: &[(&str, &str)]| {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        match m {
            Some(m) => out.extend(m.clone()),
            None => out.extend(
                builtin
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            ),
        }
        out
    };
    let requests = table(&r.requests, &BUILTIN_REQUESTS);
    let limits = table(&r.limits, &BUILTIN_LIMITS);
    let mut parsed = BTreeMap::new();
    for (kind, values, given) in [
        ("requests", &requests, r.requests.is_some()),
        ("limits", &limits, r.limits.is_some()),
    ] {
        for (resource, text) in values {
            let field = format!("defaultResources.{kind}.{resource}");
            match parse_quantity(text) {
                Some(v) if v >= 0 => {
                    parsed.insert((kind, resource.clone()), v);
                }
                _ if given => p.issue(
                    field,
                    format!("defaultResources.{kind}.{resource} must be a Kubernetes quantity such as \"500m\" or \"2Gi\" (got {text:?})"),
                ),
                _ => {}
            }
        }
    }
    for resource in ["cpu", "memory"] {
        let request = parsed.get(&("requests", resource.to_owned())).copied();
        let limit = parsed.get(&("limits", resource.to_owned())).copied();
        if let (Some(req), Some(lim)) = (request, limit)
            && req > lim
        {
            p.issue(
                format!("defaultResources.requests.{resource}"),
                format!(
                    "defaultResources.requests.{resource} ({}) must be less than or equal to the {resource} limit ({})",
                    requests[resource], limits[resource]
                ),
            );
        }
        if let (Some(req), Some((min_text, min))) = (request, bound(&CONTAINER_MIN, resource))
            && req < min
        {
            p.issue(
                format!("defaultResources.requests.{resource}"),
                format!("defaultResources.requests.{resource} ({}) is below the tenant LimitRange minimum {min_text}", requests[resource]),
            );
        }
        if let (Some(lim), Some((max_text, max))) = (limit, bound(&CONTAINER_MAX, resource))
            && lim > max
        {
            p.issue(
                format!("defaultResources.limits.{resource}"),
                format!("defaultResources.limits.{resource} ({}) is above the tenant LimitRange maximum {max_text}", limits[resource]),
            );
        }
    }
}

fn fqdn_message(field: &str, fqdn: &str) -> String {
    format!(
        "{field} entry {fqdn:?} is not a DNS name Cilium accepts (toFQDNs matchName must match ^([-a-zA-Z0-9_]+[.]?)+$; no wildcards, schemes, ports or paths)"
    )
}

/// Problems of a declared adapter the API server would refuse: env keys
/// that are not Secret keys and environment variable names, FQDNs Cilium's
/// CRD rejects. `(field within the entry, message)`.
fn adapter_issues(entry: &AdapterEntry) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let env_ok = |k: &str| is_env_var_name(k) && is_config_map_key(k);
    for (i, key) in entry.env_keys.iter().enumerate() {
        if !env_ok(key) {
            out.push((
                format!("envKeys.{i}"),
                format!("envKeys entry {key:?} must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*) usable as a Secret key"),
            ));
        }
    }
    for key in entry.default_env.keys().filter(|k| !env_ok(k)) {
        out.push((
            format!("defaultEnv.{key}"),
            format!("defaultEnv key {key:?} must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*) usable as a Secret key"),
        ));
    }
    for (i, fqdn) in entry.allow_fqdns.iter().enumerate() {
        if !is_fqdn_match_name(fqdn) {
            out.push((format!("allowFqdns.{i}"), fqdn_message("allowFqdns", fqdn)));
        }
    }
    out
}

fn slug_ok(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Strict IPv4 CIDR (spec 26 §1.1 RECOMMENDED): four decimal octets 0–255,
/// prefix 0–32, exactly one `/`.
///
/// ```
/// use paperclip_env_providers::kubernetes::is_ipv4_cidr;
/// assert!(is_ipv4_cidr("203.0.113.0/24"));
/// assert!(!is_ipv4_cidr("999.0.0.0/8"));
/// ```
pub fn is_ipv4_cidr(value: &str) -> bool {
    let mut parts = value.split('/');
    let (Some(addr), Some(prefix), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let decimal = |s: &str, max: u32| {
        !s.is_empty()
            && s.len() <= 3
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| n <= max)
    };
    let octets: Vec<&str> = addr.split('.').collect();
    octets.len() == 4 && octets.iter().all(|o| decimal(o, 255)) && decimal(prefix, 32)
}

/// Strips any `scheme://` and trailing `/` from an `imageRegistry` value
/// (gotcha G5); `None` when what is left is not `host[:port][/path]`.
pub(crate) fn registry_host_path(value: &str) -> Option<String> {
    let trimmed = value.trim();
    let rest = trimmed
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (hostname, port) = host.split_once(':').unwrap_or((host, ""));
    let host_ok = !hostname.is_empty()
        && hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_empty() || (port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()));
    let path_ok = path.split('/').all(|seg| {
        path.is_empty()
            || (!seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)))
    });
    (host_ok && port_ok && path_ok && (port.is_empty() || host.contains(':')))
        .then(|| rest.to_owned())
}

fn parse_resources(p: &mut Parser<'_>) -> Option<Resources> {
    let value = p.present("defaultResources")?.clone();
    let Value::Object(map) = value else {
        p.issue("defaultResources", "defaultResources must be an object");
        return None;
    };
    let mut out = Resources::default();
    for (key, slot) in [("requests", &mut out.requests), ("limits", &mut out.limits)] {
        match map.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(inner)) => {
                let mut m = BTreeMap::new();
                for (k, v) in inner {
                    match (k.as_str(), v) {
                        ("cpu" | "memory", Value::String(s)) => {
                            m.insert(k.clone(), s.clone());
                        }
                        _ => p.issue(
                            format!("defaultResources.{key}.{k}"),
                            format!("defaultResources.{key} accepts only string cpu and memory"),
                        ),
                    }
                }
                *slot = Some(m);
            }
            Some(_) => p.issue(
                format!("defaultResources.{key}"),
                format!("defaultResources.{key} must be an object"),
            ),
        }
    }
    for k in map.keys().filter(|k| *k != "requests" && *k != "limits") {
        p.issue(
            format!("defaultResources.{k}"),
            "defaultResources accepts only requests and limits",
        );
    }
    Some(out)
}

impl KubernetesConfig {
    /// Parses plain values (secrets as given); every problem is returned, in
    /// schema order, each naming its field. Unknown keys are ignored.
    ///
    /// ```
    /// use paperclip_env_providers::kubernetes::KubernetesConfig;
    /// let values = serde_json::json!({"inCluster": true, "egressAllowCidrs": ["10.0.0.0/99"]});
    /// let issues = KubernetesConfig::parse(values.as_object().unwrap()).unwrap_err();
    /// assert_eq!((issues[0].field.as_str(), issues[0].message.as_str()), ("egressAllowCidrs.0", "Invalid CIDR"));
    /// ```
    pub fn parse(values: &JsonObject) -> Result<Self, Vec<ConfigIssue>> {
        let mut p = Parser {
            values,
            issues: Vec::new(),
        };
        let mut c = KubernetesConfig {
            in_cluster: p.bool("inCluster").unwrap_or(false),
            ..Default::default()
        };
        let mut kubeconfig_given = false;
        for key in ["kubeconfig", "kubeconfigSecretRef"] {
            match p.present(key) {
                None => {}
                // A secret binding (`{type: "secret_ref", secretId}`) before resolution.
                Some(Value::Object(_)) => kubeconfig_given = true,
                Some(Value::String(text)) if text.trim().is_empty() => {}
                Some(Value::String(text)) => {
                    kubeconfig_given = true;
                    if c.kubeconfig.is_none() {
                        c.kubeconfig = Some(SecretString::from(text.clone()));
                    }
                }
                Some(_) => p.issue(key, format!("{key} must be a string or a secret reference")),
            }
        }
        if let Some(prefix) = p.string("namespacePrefix") {
            if slug_ok(&prefix) {
                c.namespace_prefix = prefix;
            } else {
                p.issue(
                    "namespacePrefix",
                    "namespacePrefix must match ^[a-z0-9-]{1,32}$",
                );
            }
        }
        if let Some(slug) = p.string("companySlug") {
            if slug_ok(&slug) {
                c.company_slug = Some(slug);
            } else {
                p.issue("companySlug", "companySlug must match ^[a-z0-9-]{1,32}$");
            }
        }
        if let (Some(slug), true) = (
            &c.company_slug,
            !p.issues.iter().any(|i| i.field == "namespacePrefix"),
        ) {
            let ns = format!("{}{slug}", c.namespace_prefix);
            if !super::naming::is_rfc1123_label(&ns) {
                p.issue(
                    "companySlug",
                    format!("namespace \"{ns}\" (namespacePrefix + companySlug) must be a valid RFC 1123 label of at most 63 characters"),
                );
            }
        }
        if let Some(registry) = p.string("imageRegistry") {
            match registry_host_path(&registry) {
                Some(host_path) => c.image_registry = Some(host_path),
                None => p.issue(
                    "imageRegistry",
                    "imageRegistry must be a registry reference host[:port][/path]",
                ),
            }
        }
        c.image_allow_list = p.strings("imageAllowList");
        c.image_pull_secrets = p.strings("imagePullSecrets");
        c.egress_allow_fqdns = p.strings("egressAllowFqdns");
        c.egress_allow_cidrs = p.strings("egressAllowCidrs");
        let bad_cidrs: Vec<usize> = c
            .egress_allow_cidrs
            .iter()
            .enumerate()
            .filter(|(_, cidr)| !is_ipv4_cidr(cidr))
            .map(|(i, _)| i)
            .collect();
        for i in bad_cidrs {
            p.issue(format!("egressAllowCidrs.{i}"), "Invalid CIDR");
        }
        let bad_fqdns: Vec<(usize, String)> = c
            .egress_allow_fqdns
            .iter()
            .enumerate()
            .filter(|(_, f)| !is_fqdn_match_name(f))
            .map(|(i, f)| (i, f.clone()))
            .collect();
        for (i, fqdn) in bad_fqdns {
            p.issue(
                format!("egressAllowFqdns.{i}"),
                fqdn_message("egressAllowFqdns", &fqdn),
            );
        }
        let bad_pull: Vec<usize> = c
            .image_pull_secrets
            .iter()
            .enumerate()
            .filter(|(_, n)| !is_dns1123_subdomain(n))
            .map(|(i, _)| i)
            .collect();
        for i in bad_pull {
            p.issue(
                format!("imagePullSecrets.{i}"),
                "imagePullSecrets entries must be Secret names (lowercase RFC 1123 subdomains)",
            );
        }
        if let Some(mode) = p.string("egressMode") {
            match mode.as_str() {
                "standard" => c.egress_mode = EgressMode::Standard,
                "cilium" => c.egress_mode = EgressMode::Cilium,
                _ => p.issue(
                    "egressMode",
                    "egressMode must be \"standard\" or \"cilium\"",
                ),
            }
        }
        c.default_resources = parse_resources(&mut p);
        if let Some(r) = c.default_resources.clone() {
            check_resources(&mut p, &r);
        }
        c.runtime_class_name = p
            .string("runtimeClassName")
            .filter(|s| !s.trim().is_empty());
        if let Some(rc) = &c.runtime_class_name
            && !is_dns1123_subdomain(rc)
        {
            p.issue(
                "runtimeClassName",
                "runtimeClassName must be a lowercase RFC 1123 subdomain (a RuntimeClass name)",
            );
        }
        c.service_account_annotations = p.string_map("serviceAccountAnnotations");
        let bad_keys: Vec<String> = c
            .service_account_annotations
            .keys()
            .filter(|k| !is_qualified_name(&k.to_lowercase()))
            .cloned()
            .collect();
        for key in bad_keys {
            p.issue(
                format!("serviceAccountAnnotations.{key}"),
                format!("serviceAccountAnnotations key {key:?} is not a valid annotation key: an optional DNS subdomain prefix and '/', then at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"),
            );
        }
        c.job_ttl_seconds_after_finished =
            p.integer("jobTtlSecondsAfterFinished", 0, DEFAULT_JOB_TTL_SECONDS);
        c.pod_activity_deadline_sec = p.integer(
            "podActivityDeadlineSec",
            1,
            DEFAULT_POD_ACTIVITY_DEADLINE_SEC,
        );
        if let Some(adapter) = p.string("adapterType") {
            if adapters::builtin(&adapter).is_some() {
                c.adapter_type = adapter;
            } else {
                p.issue(
                    "adapterType",
                    "adapterType must be one of the known adapter types",
                );
            }
        }
        match p.present("adapters") {
            None => {}
            Some(Value::Array(items)) => {
                let items = items.clone();
                for (i, item) in items.iter().enumerate() {
                    match AdapterEntry::parse(item) {
                        Ok(entry) => {
                            for (field, message) in adapter_issues(&entry) {
                                p.issue(format!("adapters.{i}.{field}"), message);
                            }
                            c.adapters.push(entry)
                        }
                        Err((field, message)) => p.issue(
                            if field.is_empty() {
                                format!("adapters.{i}")
                            } else {
                                format!("adapters.{i}.{field}")
                            },
                            message,
                        ),
                    }
                }
            }
            Some(_) => p.issue("adapters", "adapters must be an array"),
        }
        if let Some(backend) = p.string("backend") {
            match Backend::parse(&backend) {
                Some(b) => c.backend = Some(b),
                None => p.issue("backend", "backend must be \"sandbox-cr\" or \"job\""),
            }
        }
        if let Some(ns) = p.string("paperclipServerNamespace") {
            if super::naming::is_rfc1123_label(&ns) {
                c.server_namespace = ns;
            } else {
                p.issue(
                    "paperclipServerNamespace",
                    "paperclipServerNamespace must be a valid namespace name",
                );
            }
        }
        if p.present("paperclipServerPodSelector").is_some() {
            let selector = p.string_map("paperclipServerPodSelector");
            if selector.is_empty()
                || !selector
                    .iter()
                    .all(|(k, v)| is_qualified_name(k) && is_label_value(v))
            {
                p.issue(
                    "paperclipServerPodSelector",
                    "paperclipServerPodSelector keys and values must be valid label syntax",
                );
            } else {
                c.server_pod_selector = selector;
            }
        }
        if !c.in_cluster && !kubeconfig_given {
            p.issue("kubeconfig", AUTH_REQUIRED_MESSAGE);
        }
        if p.issues.is_empty() {
            Ok(c)
        } else {
            Err(p.issues)
        }
    }

    /// Parses a resolved provider config: the kubeconfig comes from the
    /// resolved secret when the host resolved one.
    pub fn from_provider_config(config: &ProviderConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut values = config.values().clone();
        let secret = config
            .secret("kubeconfig")
            .or_else(|| config.secret("kubeconfigSecretRef"))
            .cloned();
        if secret.is_some() {
            // A placeholder keeps the auth rule satisfied without copying the secret.
            values.insert("kubeconfig".into(), json!("[resolved secret]"));
            values.remove("kubeconfigSecretRef");
        }
        let mut parsed = Self::parse(&values)?;
        if secret.is_some() {
            parsed.kubeconfig = secret.filter(|s| !s.expose_secret().trim().is_empty());
            if parsed.kubeconfig.is_none() && !parsed.in_cluster {
                return Err(vec![ConfigIssue::new("kubeconfig", AUTH_REQUIRED_MESSAGE)]);
            }
        }
        Ok(parsed)
    }

    /// The effective backend given the provider's default.
    pub fn backend_or(&self, default: Backend) -> Backend {
        self.backend.unwrap_or(default)
    }

    /// The normalized config (defaults filled in, camelCase). `kubeconfig`
    /// is copied as given by `raw` (a secret id after persistence), never
    /// from a resolved secret.
    pub fn normalized(&self, raw: &JsonObject) -> JsonObject {
        let mut out = JsonObject::new();
        out.insert("inCluster".into(), json!(self.in_cluster));
        for key in ["kubeconfig", "kubeconfigSecretRef"] {
            if let Some(k) = raw.get(key).filter(|v| !v.is_null()) {
                out.insert(key.into(), k.clone());
            }
        }
        out.insert("namespacePrefix".into(), json!(self.namespace_prefix));
        if let Some(slug) = &self.company_slug {
            out.insert("companySlug".into(), json!(slug));
        }
        if let Some(r) = &self.image_registry {
            out.insert("imageRegistry".into(), json!(r));
        }
        out.insert("imageAllowList".into(), json!(self.image_allow_list));
        out.insert("imagePullSecrets".into(), json!(self.image_pull_secrets));
        out.insert("egressAllowFqdns".into(), json!(self.egress_allow_fqdns));
        out.insert("egressAllowCidrs".into(), json!(self.egress_allow_cidrs));
        out.insert("egressMode".into(), json!(self.egress_mode.as_str()));
        if let Some(r) = &self.default_resources {
            let mut m = JsonObject::new();
            if let Some(req) = &r.requests {
                m.insert("requests".into(), json!(req));
            }
            if let Some(lim) = &r.limits {
                m.insert("limits".into(), json!(lim));
            }
            out.insert("defaultResources".into(), Value::Object(m));
        }
        if let Some(rc) = &self.runtime_class_name {
            out.insert("runtimeClassName".into(), json!(rc));
        }
        out.insert(
            "serviceAccountAnnotations".into(),
            json!(self.service_account_annotations),
        );
        out.insert(
            "jobTtlSecondsAfterFinished".into(),
            json!(self.job_ttl_seconds_after_finished),
        );
        out.insert(
            "podActivityDeadlineSec".into(),
            json!(self.pod_activity_deadline_sec),
        );
        out.insert("adapterType".into(), json!(self.adapter_type));
        if !self.adapters.is_empty() {
            out.insert(
                "adapters".into(),
                Value::Array(self.adapters.iter().map(AdapterEntry::to_json).collect()),
            );
        }
        out.insert(
            "backend".into(),
            json!(self.backend.unwrap_or_default().as_str()),
        );
        out.insert(
            "paperclipServerNamespace".into(),
            json!(self.server_namespace),
        );
        out.insert(
            "paperclipServerPodSelector".into(),
            json!(self.server_pod_selector),
        );
        out
    }

    /// The validation warnings of spec 26 §1.4 (standard mode cannot enforce FQDNs).
    pub fn warnings(&self) -> Vec<String> {
        if self.egress_mode != EgressMode::Standard {
            return Vec::new();
        }
        let mut fqdns: Vec<String> = adapters::resolve(self, None)
            .map(|a| a.allow_fqdns)
            .unwrap_or_default();
        for f in &self.egress_allow_fqdns {
            if !fqdns.contains(f) {
                fqdns.push(f.clone());
            }
        }
        if fqdns.is_empty() {
            return Vec::new();
        }
        let list = fqdns.join(", ");
        vec![if self.egress_allow_cidrs.is_empty() {
            format!(
                "egressMode=standard cannot enforce FQDN-based egress rules (Kubernetes NetworkPolicy is CIDR-only). To keep the configured FQDNs reachable ({list}) without operator intervention, the plugin will allow public IPv4 egress on TCP 80/443 with private/link-local/loopback/multicast ranges excluded. This is broader than exact FQDN allow-listing — switch egressMode to \"cilium\" (requires Cilium CNI) for precise enforcement, or set egressAllowCidrs explicitly to override the fallback."
            )
        } else {
            format!(
                "egressMode=standard cannot enforce FQDN-based egress rules. The following FQDNs are reachable only via the operator-supplied egressAllowCidrs: {list}. Switch egressMode to \"cilium\" (requires Cilium CNI) for exact FQDN allow-listing."
            )
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    fn messages(v: Value) -> Vec<(String, String)> {
        match KubernetesConfig::parse(&obj(v)) {
            Ok(_) => Vec::new(),
            Err(issues) => issues.into_iter().map(|i| (i.field, i.message)).collect(),
        }
    }

    #[test]
    fn auth_rule_and_whitespace_kubeconfig() {
        assert_eq!(
            messages(json!({})),
            vec![("kubeconfig".to_owned(), AUTH_REQUIRED_MESSAGE.to_owned())]
        );
        assert_eq!(messages(json!({"kubeconfig": "   "})).len(), 1);
        assert!(messages(json!({"inCluster": true})).is_empty());
        assert!(messages(json!({"inCluster": true, "kubeconfig": "apiVersion: v1"})).is_empty());
        assert!(messages(json!({"kubeconfig": "apiVersion: v1"})).is_empty());
        assert!(
            messages(json!({"kubeconfigSecretRef": "11111111-2222-3333-4444-555555555555"}))
                .is_empty()
        );
        assert!(
            messages(json!({"kubeconfig": {"type": "secret_ref", "secretId": "x"}})).is_empty()
        );
        assert_eq!(messages(json!({"kubeconfig": 5}))[0].0, "kubeconfig");
        let via_alias = ProviderConfig::new(JsonObject::new())
            .with_secret("kubeconfigSecretRef", SecretString::from("apiVersion: v1"));
        let parsed = KubernetesConfig::from_provider_config(&via_alias).unwrap();
        assert_eq!(
            parsed
                .kubeconfig
                .map(|k| k.expose_secret().to_owned())
                .as_deref(),
            Some("apiVersion: v1")
        );
    }

    #[test]
    fn cidrs_are_strict() {
        for bad in [
            "not-a-cidr",
            "999.0.0.0/8",
            "10.0.0.0/99",
            "10.0.0/24",
            "10.0.0.0/8/8",
            "10.0.0.0",
        ] {
            assert!(!is_ipv4_cidr(bad), "{bad}");
        }
        for good in ["0.0.0.0/0", "10.0.0.0/8", "203.0.113.7/32"] {
            assert!(is_ipv4_cidr(good), "{good}");
        }
        assert_eq!(
            messages(json!({"inCluster": true, "egressAllowCidrs": ["10.0.0.0/8", "999.0.0.0/8"]})),
            vec![("egressAllowCidrs.1".to_owned(), "Invalid CIDR".to_owned())]
        );
    }

    #[test]
    fn issues_come_in_schema_order_naming_fields() {
        let got = messages(json!({
            "namespacePrefix": "-UPPER",
            "egressMode": "calico",
            "podActivityDeadlineSec": 0,
            "jobTtlSecondsAfterFinished": -1,
            "adapterType": "nope",
            "backend": "vm"
        }));
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "namespacePrefix",
                "egressMode",
                "jobTtlSecondsAfterFinished",
                "podActivityDeadlineSec",
                "adapterType",
                "backend",
                "kubeconfig"
            ]
        );
        assert_eq!(
            got[4].1,
            "adapterType must be one of the known adapter types"
        );
    }

    #[test]
    fn namespace_must_fit_63_characters() {
        let prefix = "a".repeat(32);
        let slug = "b".repeat(32);
        let got =
            messages(json!({"inCluster": true, "namespacePrefix": prefix, "companySlug": slug}));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "companySlug");
        assert!(got[0].1.contains("63 characters"));
    }

    #[test]
    fn values_the_api_server_would_refuse_are_refused_naming_the_field() {
        let got = messages(json!({
            "inCluster": true,
            "egressAllowFqdns": ["api.example.com", "*.example.com", "https://x.io/"],
            "imagePullSecrets": ["regcred", "Bad_Name"],
            "defaultResources": {"requests": {"cpu": "two", "memory": "8Gi"},
                "limits": {"cpu": "1", "memory": "4Gi"}},
            "runtimeClassName": "Kata FC",
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn", "bad key!": "x"},
            "adapters": [{"adapterType": "custom", "runtimeImage": "img:1",
                "envKeys": ["OK_KEY", "BAD-KEY"], "defaultEnv": {"A B": "1", "FINE": "2"},
                "allowFqdns": ["a..b"]}],
        }));
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "egressAllowFqdns.1",
                "egressAllowFqdns.2",
                "imagePullSecrets.1",
                "defaultResources.requests.cpu",
                "defaultResources.requests.memory",
                "runtimeClassName",
                "serviceAccountAnnotations.bad key!",
                "adapters.0.envKeys.1",
                "adapters.0.defaultEnv.A B",
                "adapters.0.allowFqdns.0",
            ],
            "{got:?}"
        );
        assert!(
            got[4]
                .1
                .contains("less than or equal to the memory limit (4Gi)"),
            "{}",
            got[4].1
        );
        // requests over the built-in limits when only requests are given.
        let got = messages(json!({"inCluster": true,
            "defaultResources": {"requests": {"cpu": "3"}}}));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].1.contains("cpu limit (2)"), "{}", got[0].1);
        // The tenant LimitRange bounds.
        let got = messages(json!({"inCluster": true,
            "defaultResources": {"requests": {"cpu": "50m", "memory": "1Gi"}, "limits": {"cpu": "8", "memory": "2Gi"}}}));
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "defaultResources.requests.cpu",
                "defaultResources.limits.cpu"
            ]
        );
        assert!(KubernetesConfig::parse(&obj(json!({"inCluster": true,
            "defaultResources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1.5", "memory": "2Gi"}}})))
        .is_ok());
    }

    #[test]
    fn callback_target_is_configurable() {
        let c = KubernetesConfig::parse(&obj(
            json!({"inCluster": true, "paperclipServerNamespace": "ops",
            "paperclipServerPodSelector": {"app.kubernetes.io/name": "paperclip"}}),
        ))
        .unwrap();
        assert_eq!(c.server_namespace, "ops");
        assert_eq!(c.server_pod_selector["app.kubernetes.io/name"], "paperclip");
        let got = messages(
            json!({"inCluster": true, "paperclipServerNamespace": "-bad",
            "paperclipServerPodSelector": {"bad key!": "x"}}),
        );
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            ["paperclipServerNamespace", "paperclipServerPodSelector"]
        );
    }

    #[test]
    fn registry_scheme_is_stripped() {
        let c = KubernetesConfig::parse(&obj(json!({"inCluster": true, "imageRegistry": "https://registry.example.com:5000/paperclip/"}))).unwrap();
        assert_eq!(
            c.image_registry.as_deref(),
            Some("registry.example.com:5000/paperclip")
        );
        assert_eq!(
            registry_host_path("registry.example.com/paperclip").as_deref(),
            Some("registry.example.com/paperclip")
        );
        assert!(registry_host_path("bad host/x").is_none());
    }

    #[test]
    fn normalized_round_trips_and_hides_nothing_secret() {
        let raw = obj(
            json!({"kubeconfig": "11111111-2222-3333-4444-555555555555", "reuseLease": true,
            "defaultResources": {"requests": {"cpu": "1"}}, "serviceAccountAnnotations": {"a": "b"}}),
        );
        let c = KubernetesConfig::parse(&raw).unwrap();
        let normalized = c.normalized(&raw);
        assert_eq!(
            Value::Object(normalized.clone()),
            json!({"inCluster": false, "kubeconfig": "11111111-2222-3333-4444-555555555555",
                "namespacePrefix": "paperclip-", "imageAllowList": [], "imagePullSecrets": [],
                "egressAllowFqdns": [], "egressAllowCidrs": [], "egressMode": "standard",
                "defaultResources": {"requests": {"cpu": "1"}},
                "serviceAccountAnnotations": {"a": "b"}, "jobTtlSecondsAfterFinished": 900,
                "podActivityDeadlineSec": 3600, "adapterType": "claude_local", "backend": "sandbox-cr",
                "paperclipServerNamespace": "paperclip", "paperclipServerPodSelector": {"app": "paperclip-server"}})
        );
        let again = KubernetesConfig::parse(&normalized)
            .unwrap()
            .normalized(&normalized);
        assert_eq!(again, normalized);
    }

    #[test]
    fn debug_redacts_the_kubeconfig() {
        let config = ProviderConfig::new(obj(json!({"inCluster": false})))
            .with_secret("kubeconfig", SecretString::from("token: hunter2-secret"));
        let c = KubernetesConfig::from_provider_config(&config).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[REDACTED]"));
    }

    #[test]
    fn standard_mode_warnings() {
        let c = KubernetesConfig::parse(&obj(json!({"inCluster": true}))).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("reachable (api.anthropic.com) without operator intervention"));
        let c = KubernetesConfig::parse(&obj(
            json!({"inCluster": true, "egressAllowCidrs": ["10.0.0.0/8"]}),
        ))
        .unwrap();
        assert!(c.warnings()[0].contains("operator-supplied egressAllowCidrs: api.anthropic.com."));
        let c = KubernetesConfig::parse(&obj(json!({"inCluster": true, "egressMode": "cilium"})))
            .unwrap();
        assert!(c.warnings().is_empty());
    }
}
