//! Secrets (spec 00 §4): references, resolvers, the schema's secret paths,
//! and the provider config type that keeps resolved values out of JSON.
//!
//! A resolved secret lives only in [`SecretString`]s inside a
//! [`ProviderConfig`] for the duration of one provider call. It is never
//! written into lease metadata, never printed by `Debug`, and is scrubbed from
//! provider metadata even when a provider echoes it under an undeclared key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use async_trait::async_trait;
use regex::Regex;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::lease::JsonObject;
use crate::{Error, Result};

/// The JSON Schema `format` that marks a secret field.
pub const SECRET_REF_FORMAT: &str = "secret-ref";

fn uuid_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new("(?i)^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
            .expect("static pattern")
    })
}

/// Whether `value` is a secret id (a UUID).
pub fn is_secret_id(value: &str) -> bool {
    uuid_pattern().is_match(value.trim())
}

/// Which version of a secret to resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretVersion {
    /// The newest version.
    #[default]
    Latest,
    /// A pinned version (1-based).
    Pinned(u32),
}

/// A reference to a stored secret: a secret id plus a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The secret's id (a UUID).
    pub secret_id: String,
    /// The version to resolve.
    pub version: SecretVersion,
}

impl SecretRef {
    /// A reference to the latest version of `secret_id`.
    pub fn latest(secret_id: impl Into<String>) -> Self {
        SecretRef {
            secret_id: secret_id.into(),
            version: SecretVersion::Latest,
        }
    }

    /// Parses a binding object `{"type":"secret_ref","secretId":<uuid>,"version":"latest"|n}` (strict).
    pub fn parse_binding(value: &Value) -> std::result::Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or("A secret reference must be an object.")?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "type" | "secretId" | "version") {
                return Err(format!("Unrecognized key \"{key}\" in secret reference."));
            }
        }
        if obj.get("type") != Some(&json!("secret_ref")) {
            return Err("A secret reference must have type \"secret_ref\".".into());
        }
        let id = obj
            .get("secretId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !is_secret_id(id) {
            return Err("A secret reference needs a UUID secretId.".into());
        }
        let version = match obj.get("version") {
            None | Some(Value::Null) => SecretVersion::Latest,
            Some(Value::String(s)) if s == "latest" => SecretVersion::Latest,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v >= 1 && v <= u32::MAX as u64 => SecretVersion::Pinned(v as u32),
                _ => {
                    return Err("A secret version must be \"latest\" or a positive integer.".into());
                }
            },
            Some(_) => {
                return Err("A secret version must be \"latest\" or a positive integer.".into());
            }
        };
        Ok(SecretRef {
            secret_id: id.trim().to_owned(),
            version,
        })
    }

    /// Reads a config value as a reference: a UUID string or a binding object.
    pub fn from_config_value(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) if is_secret_id(s) => Some(SecretRef::latest(s.trim())),
            Value::Object(_) => SecretRef::parse_binding(value).ok(),
            _ => None,
        }
    }

    /// The binding-object JSON form.
    pub fn to_json(&self) -> Value {
        let version = match self.version {
            SecretVersion::Latest => json!("latest"),
            SecretVersion::Pinned(v) => json!(v),
        };
        json!({"type": "secret_ref", "secretId": self.secret_id, "version": version})
    }
}

/// A secret to create (persistence of a pasted plaintext value, spec 00 §4.2).
pub struct NewSecret {
    /// Secret name.
    pub name: String,
    /// Secret description.
    pub description: String,
    /// The value.
    pub value: SecretString,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Turns secret references into values at call time. Implementations must
/// not cache across calls, so a rotated secret is seen by the next call.
#[async_trait]
pub trait SecretResolver: Send + Sync {
    /// Resolves one reference.
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString>;

    /// Resolves a secret of the run's responsible user by its key (an
    /// `envVars` `user_secret_ref`). `None` when the user has no such
    /// secret; the default knows no user secrets.
    async fn resolve_user_secret(
        &self,
        key: &str,
        version: SecretVersion,
    ) -> Result<Option<SecretString>> {
        let _ = (key, version);
        Ok(None)
    }

    /// Creates a secret and returns its id. Resolvers that only read refuse.
    async fn create(&self, secret: NewSecret) -> Result<String> {
        Err(Error::Secret {
            message: format!(
                "This secret resolver cannot create secrets ({}).",
                secret.name
            ),
        })
    }
}

/// An in-memory secret store with versions; for tests and embedded use.
///
/// ```
/// # tokio_test_block(async {
/// use paperclip_env_core::secret::{InMemorySecretResolver, SecretRef, SecretResolver};
/// use secrecy::ExposeSecret;
/// let secrets = InMemorySecretResolver::new();
/// let id = secrets.insert("s3cr3t");
/// let value = secrets.resolve(&SecretRef::latest(&id)).await.unwrap();
/// assert_eq!(value.expose_secret(), "s3cr3t");
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Default)]
pub struct InMemorySecretResolver {
    secrets: Mutex<HashMap<String, Vec<SecretString>>>,
}

impl std::fmt::Debug for InMemorySecretResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.secrets.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("InMemorySecretResolver")
            .field("secrets", &count)
            .finish()
    }
}

impl InMemorySecretResolver {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a new secret under a fresh UUID and returns the id.
    pub fn insert(&self, value: impl Into<String>) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.set(&id, value);
        id
    }

    /// Adds a version to `id` (creating it), returning the new version number.
    pub fn set(&self, id: &str, value: impl Into<String>) -> u32 {
        let mut secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let versions = secrets.entry(id.to_owned()).or_default();
        versions.push(SecretString::from(value.into()));
        versions.len() as u32
    }

    /// Removes a secret.
    pub fn remove(&self, id: &str) -> bool {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }
}

#[async_trait]
impl SecretResolver for InMemorySecretResolver {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString> {
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let versions = secrets
            .get(&reference.secret_id)
            .ok_or_else(|| Error::Secret {
                message: format!("Secret \"{}\" not found.", reference.secret_id),
            })?;
        let value = match reference.version {
            SecretVersion::Latest => versions.last(),
            SecretVersion::Pinned(v) => versions.get(v as usize - 1),
        };
        value.cloned().ok_or_else(|| Error::Secret {
            message: format!(
                "Secret \"{}\" has no version {:?}.",
                reference.secret_id, reference.version
            ),
        })
    }

    async fn create(&self, secret: NewSecret) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), vec![secret.value]);
        Ok(id)
    }
}

/// Resolves secrets from environment variables, read at every call.
///
/// A secret id maps to the variable given with [`EnvSecretResolver::with_var`],
/// else to `PAPERCLIP_SECRET_<ID>` (upper-cased, non-alphanumerics as `_`).
/// Only the latest version exists.
#[derive(Debug, Default, Clone)]
pub struct EnvSecretResolver {
    vars: HashMap<String, String>,
}

impl EnvSecretResolver {
    /// A resolver with no explicit mappings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `secret_id` to the variable `var`.
    pub fn with_var(mut self, secret_id: impl Into<String>, var: impl Into<String>) -> Self {
        self.vars.insert(secret_id.into(), var.into());
        self
    }

    /// The variable a secret id is read from.
    pub fn var_for(&self, secret_id: &str) -> String {
        self.vars.get(secret_id).cloned().unwrap_or_else(|| {
            let upper: String = secret_id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("PAPERCLIP_SECRET_{upper}")
        })
    }
}

#[async_trait]
impl SecretResolver for EnvSecretResolver {
    async fn resolve(&self, reference: &SecretRef) -> Result<SecretString> {
        if let SecretVersion::Pinned(v) = reference.version
            && v != 1
        {
            return Err(Error::Secret {
                message: format!(
                    "Environment secrets have one version; {} pins version {v}.",
                    reference.secret_id
                ),
            });
        }
        let var = self.var_for(&reference.secret_id);
        std::env::var(&var)
            .map(SecretString::from)
            .map_err(|_| Error::Secret {
                message: format!(
                    "Secret \"{}\" not found: environment variable {var} is not set.",
                    reference.secret_id
                ),
            })
    }
}

/// Schema stand-in for secret config fields in `schemars`-derived provider
/// configs: `#[schemars(with = "SecretRefField")]` on a `SecretString` field
/// emits `{"type": "string", "format": "secret-ref"}`.
///
/// ```
/// use paperclip_env_core::secret::{SecretRefField, collect_secret_ref_paths};
/// use secrecy::SecretString;
/// #[derive(schemars::JsonSchema)]
/// #[serde(rename_all = "camelCase")]
/// #[allow(dead_code)]
/// struct MyConfig {
///     #[schemars(with = "Option<SecretRefField>")]
///     api_key: Option<SecretString>,
///     template: Option<String>,
/// }
/// let schema = serde_json::to_value(schemars::schema_for!(MyConfig)).unwrap();
/// assert_eq!(collect_secret_ref_paths(&schema), vec!["apiKey"]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SecretRefField;

impl schemars::JsonSchema for SecretRefField {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretRef".into()
    }

    fn json_schema(_generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": SECRET_REF_FORMAT})
    }
}

/// Dot paths of every property marked `format: "secret-ref"` in a JSON Schema,
/// descending into nested `properties` and into `allOf`/`anyOf`/`oneOf`
/// branches at the same prefix (spec 00 §4.1).
///
/// ```
/// use paperclip_env_core::secret::collect_secret_ref_paths;
/// let schema = serde_json::json!({"type": "object", "properties": {
///     "apiKey": {"type": "string", "format": "secret-ref"},
///     "auth": {"type": "object", "properties": {"token": {"format": "secret-ref"}}}}});
/// assert_eq!(collect_secret_ref_paths(&schema), vec!["apiKey", "auth.token"]);
/// ```
pub fn collect_secret_ref_paths(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_schema(schema, "", &mut out);
    out.dedup();
    out
}

fn walk_schema(schema: &Value, prefix: &str, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        return;
    };
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (name, prop) in props {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if prop.get("format").and_then(Value::as_str) == Some(SECRET_REF_FORMAT)
                && !out.contains(&path)
            {
                out.push(path.clone());
            }
            walk_schema(prop, &path, out);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = obj.get(key) {
            for branch in branches {
                walk_schema(branch, prefix, out);
            }
        }
    }
}

pub(crate) fn get_path<'a>(map: &'a JsonObject, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = map.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

fn set_path(map: &mut JsonObject, path: &str, value: Value) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut current = map;
    for part in &parts[..parts.len() - 1] {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        current = entry.as_object_mut().expect("just made an object");
    }
    current.insert(parts[parts.len() - 1].to_owned(), value);
}

/// Deletes the value at `path` and then every parent left empty, innermost
/// first, stopping at the first non-empty one (spec 00 §4.4).
pub fn remove_path(map: &mut JsonObject, path: &str) -> Option<Value> {
    fn go(map: &mut JsonObject, parts: &[&str]) -> Option<Value> {
        if parts.len() == 1 {
            return map.remove(parts[0]);
        }
        let child = map.get_mut(parts[0])?.as_object_mut()?;
        let removed = go(child, &parts[1..]);
        if removed.is_some() && child.is_empty() {
            map.remove(parts[0]);
        }
        removed
    }
    let parts: Vec<&str> = path.split('.').collect();
    go(map, &parts)
}

/// Config handed to a provider: plain values plus resolved secrets kept apart.
///
/// ```
/// use paperclip_env_core::secret::ProviderConfig;
/// use secrecy::SecretString;
/// let config = ProviderConfig::new(serde_json::json!({"template": "base"}).as_object().unwrap().clone())
///     .with_secret("apiKey", SecretString::from("e2b_live_key"));
/// assert!(!format!("{config:?}").contains("e2b_live_key"));
/// assert_eq!(config.str("template"), Some("base"));
/// ```
#[derive(Clone, Default)]
pub struct ProviderConfig {
    values: JsonObject,
    secrets: BTreeMap<String, SecretString>,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("values", &self.values)
            .field(
                "secrets",
                &self
                    .secrets
                    .keys()
                    .map(|k| (k, "[REDACTED]"))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

impl ProviderConfig {
    /// Config with plain values and no secrets.
    pub fn new(values: JsonObject) -> Self {
        ProviderConfig {
            values,
            secrets: BTreeMap::new(),
        }
    }

    /// Adds a resolved secret at a dot path.
    pub fn with_secret(mut self, path: impl Into<String>, value: SecretString) -> Self {
        let path = path.into();
        remove_path(&mut self.values, &path);
        self.secrets.insert(path, value);
        self
    }

    /// Plain (non-secret) values.
    pub fn values(&self) -> &JsonObject {
        &self.values
    }

    /// A plain value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// A plain string value, trimmed; blank reads as absent.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// A resolved secret at a dot path.
    pub fn secret(&self, path: &str) -> Option<&SecretString> {
        self.secrets.get(path)
    }

    /// Dot paths of the resolved secrets.
    pub fn secret_paths(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// `timeoutMs` when it is a positive number (truncated).
    pub fn timeout_ms(&self) -> Option<u64> {
        positive_ms(self.values.get("timeoutMs"))
    }

    /// `reuseLease === true`.
    pub fn reuse_lease(&self) -> bool {
        self.values.get("reuseLease") == Some(&Value::Bool(true))
    }

    /// Deserializes into a typed config, secrets included (`SecretString`
    /// fields deserialize from them). Error messages are scrubbed of secrets.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let merged = self.expose_to_json();
        serde_json::from_value(Value::Object(merged)).map_err(|e| {
            let message = self.scrub(&e.to_string());
            Error::invalid_field("", format!("Invalid provider config: {message}"))
        })
    }

    /// The whole config as JSON **with plaintext secrets**: only for handing
    /// the config to an out-of-process provider over its own protocol.
    pub fn expose_to_json(&self) -> JsonObject {
        let mut merged = self.values.clone();
        for (path, value) in &self.secrets {
            set_path(
                &mut merged,
                path,
                Value::String(value.expose_secret().to_owned()),
            );
        }
        merged
    }

    /// Replaces every occurrence of a resolved secret in `text` with `[REDACTED]`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in self.secrets.values() {
            let v = value.expose_secret();
            if !v.is_empty() {
                out = out.replace(v, "[REDACTED]");
            }
        }
        out
    }

    /// An error whose message contains a resolved secret becomes a
    /// [`Error::Provider`] with the secret redacted; other errors pass through.
    pub fn scrub_error(&self, provider: &str, error: Error) -> Error {
        let text = error.to_string();
        let scrubbed = self.scrub(&text);
        if scrubbed == text {
            return error;
        }
        Error::Provider {
            provider: provider.to_owned(),
            message: scrubbed,
            retryable: error.is_retryable(),
            source: None,
        }
    }

    /// Removes from `metadata` every string value that contains a resolved
    /// secret, at any depth (spec 00 §4.4 Decision). Returns how many were removed.
    pub fn scrub_metadata(&self, metadata: &mut JsonObject) -> usize {
        let needles: Vec<&str> = self
            .secrets
            .values()
            .map(|s| s.expose_secret())
            .filter(|s| !s.is_empty())
            .collect();
        if needles.is_empty() {
            return 0;
        }
        scrub_object(metadata, &needles)
    }
}

fn scrub_object(map: &mut JsonObject, needles: &[&str]) -> usize {
    let mut removed = 0;
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let drop = match map.get_mut(&key) {
            Some(Value::String(s)) => needles.iter().any(|n| s.contains(n)),
            Some(Value::Object(child)) => {
                removed += scrub_object(child, needles);
                false
            }
            Some(Value::Array(items)) => {
                let before = items.len();
                items.retain(|item| !matches!(item, Value::String(s) if needles.iter().any(|n| s.contains(n))));
                removed += before - items.len();
                for item in items.iter_mut() {
                    if let Value::Object(child) = item {
                        removed += scrub_object(child, needles);
                    }
                }
                false
            }
            _ => false,
        };
        if drop {
            map.remove(&key);
            removed += 1;
        }
    }
    removed
}

pub(crate) fn positive_ms(value: Option<&Value>) -> Option<u64> {
    let n = match value? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (n.is_finite() && n >= 1.0).then(|| n.trunc() as u64)
}

/// Refuses a sandbox provider config whose secret field pins a version
/// (`{"type": "secret_ref", …, "version": 2}`): provider secret references
/// always resolve the latest version, so a pin is an error naming the field
/// rather than silently resolving another version (Paperclip 2026.916's
/// `canonicalizeSecretRefValue`).
pub fn reject_pinned_secret_versions(config: &JsonObject, secret_paths: &[String]) -> Result<()> {
    for path in secret_paths {
        if let Some(value @ Value::Object(_)) = get_path(config, path)
            && let Ok(reference) = SecretRef::parse_binding(value)
            && let SecretVersion::Pinned(version) = reference.version
        {
            return Err(Error::invalid_field(
                path.clone(),
                format!(
                    "Secret binding at {path} pins version {version}; sandbox provider secret references always resolve the latest version."
                ),
            ));
        }
    }
    Ok(())
}

/// Builds the provider config from a stored config (spec 00 §4.3): every
/// secret path holding a reference is resolved; a plaintext value at a secret
/// path is kept as an inline secret. Values at secret paths never stay in the
/// plain values.
pub async fn resolve_provider_config(
    stored: &JsonObject,
    secret_paths: &[String],
    resolver: &dyn SecretResolver,
) -> Result<ProviderConfig> {
    let mut config = ProviderConfig::new(stored.clone());
    for path in secret_paths {
        let Some(value) = get_path(stored, path).cloned() else {
            continue;
        };
        let resolved = match &value {
            Value::String(s) if s.trim().is_empty() => None,
            v => match SecretRef::from_config_value(v) {
                Some(reference) => Some(resolver.resolve(&reference).await?),
                None => v.as_str().map(|s| SecretString::from(s.to_owned())),
            },
        };
        remove_path(&mut config.values, path);
        if let Some(secret) = resolved {
            config.secrets.insert(path.clone(), secret);
        }
    }
    Ok(config)
}

/// The stored config as it may enter lease metadata: secret paths keep
/// references only; a plaintext value at a secret path is dropped.
pub fn stored_config_for_metadata(stored: &JsonObject, secret_paths: &[String]) -> JsonObject {
    let mut out = stored.clone();
    for path in secret_paths {
        if let Some(v) = get_path(stored, path)
            && SecretRef::from_config_value(v).is_none()
        {
            remove_path(&mut out, path);
        }
    }
    out
}

/// Removes every secret path from provider metadata (spec 00 §4.4).
pub fn strip_secret_paths(metadata: &mut JsonObject, secret_paths: &[String]) {
    for path in secret_paths {
        remove_path(metadata, path);
    }
}

fn slug(name: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
            dash = false;
        } else if !dash {
            out.push('-');
            dash = true;
        }
    }
    let trimmed: String = out.trim_matches('-').chars().take(48).collect();
    let trimmed = trimmed.trim_end_matches('-').to_owned();
    if trimmed.is_empty() {
        "environment".to_owned()
    } else {
        trimmed
    }
}

/// Persists secret fields of a config (spec 00 §4.2): non-strings are left
/// alone (a binding object collapses to its id), blank values are removed,
/// UUIDs are kept trimmed, and any other string becomes a new secret whose id
/// replaces it.
pub async fn persist_secret_refs(
    config: &mut JsonObject,
    secret_paths: &[String],
    resolver: &dyn SecretResolver,
    environment_name: &str,
    driver: &str,
) -> Result<()> {
    for path in secret_paths {
        let Some(value) = get_path(config, path).cloned() else {
            continue;
        };
        match value {
            Value::String(s) if s.trim().is_empty() => {
                remove_path(config, path);
            }
            Value::String(s) if is_secret_id(&s) => {
                set_path(config, path, Value::String(s.trim().to_owned()))
            }
            Value::String(s) => {
                let field: String = path
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '-'
                        }
                    })
                    .collect();
                let suffix: String = uuid::Uuid::new_v4().to_string().chars().take(8).collect();
                let name = format!(
                    "environment-{driver}-{}-{field}-{suffix}",
                    slug(environment_name)
                );
                let id = resolver
                    .create(NewSecret {
                        name,
                        description: format!("Secret for {environment_name} {field}."),
                        value: SecretString::from(s),
                    })
                    .await?;
                set_path(config, path, Value::String(id));
            }
            Value::Object(_) => {
                if let Some(reference) = SecretRef::from_config_value(&value) {
                    set_path(config, path, Value::String(reference.secret_id));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn schema_paths_include_combinators_and_nesting() {
        let schema = json!({"properties": {"a": {"format": "secret-ref"}, "n": {"properties": {"b": {"format": "secret-ref"}}}},
            "anyOf": [{"properties": {"c": {"format": "secret-ref"}}}], "allOf": [{"properties": {"a": {"format": "secret-ref"}}}]});
        assert_eq!(collect_secret_ref_paths(&schema), vec!["a", "n.b", "c"]);
    }

    #[test]
    fn remove_path_prunes_empty_parents() {
        let mut m = obj(json!({"auth": {"inner": {"token": "x"}}, "keep": 1}));
        remove_path(&mut m, "auth.inner.token");
        assert_eq!(Value::Object(m), json!({"keep": 1}));
        let mut m = obj(json!({"auth": {"inner": {"token": "x"}, "other": 2}}));
        remove_path(&mut m, "auth.inner.token");
        assert_eq!(Value::Object(m), json!({"auth": {"other": 2}}));
    }

    #[tokio::test]
    async fn env_resolver_reads_mapped_and_default_variables_at_call_time() {
        let resolver = EnvSecretResolver::new().with_var("abc", "PATH");
        assert!(
            !resolver
                .resolve(&SecretRef::latest("abc"))
                .await
                .unwrap()
                .expose_secret()
                .is_empty()
        );
        assert_eq!(resolver.var_for("7a1c-x"), "PAPERCLIP_SECRET_7A1C_X");
        let missing = resolver
            .resolve(&SecretRef::latest("7a1c-x"))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("PAPERCLIP_SECRET_7A1C_X"));
        let pinned = SecretRef {
            secret_id: "abc".into(),
            version: SecretVersion::Pinned(2),
        };
        assert!(resolver.resolve(&pinned).await.is_err());
    }

    #[tokio::test]
    async fn resolves_refs_and_keeps_them_out_of_values() {
        let secrets = InMemorySecretResolver::new();
        let id = secrets.insert("plain-key");
        let stored = obj(json!({"apiKey": id, "template": "base"}));
        let cfg = resolve_provider_config(&stored, &["apiKey".into()], &secrets)
            .await
            .unwrap();
        assert_eq!(cfg.secret("apiKey").unwrap().expose_secret(), "plain-key");
        assert!(cfg.get("apiKey").is_none());
        assert!(!format!("{cfg:?}").contains("plain-key"));
        secrets.set(&id, "rotated");
        let cfg = resolve_provider_config(&stored, &["apiKey".into()], &secrets)
            .await
            .unwrap();
        assert_eq!(cfg.secret("apiKey").unwrap().expose_secret(), "rotated");
    }

    #[tokio::test]
    async fn persistence_creates_secrets_keeps_ids_removes_blanks() {
        let secrets = InMemorySecretResolver::new();
        let existing = uuid::Uuid::new_v4().to_string();
        let mut cfg = obj(json!({"a": "pasted", "b": format!(" {existing} "), "c": "  ", "d": 5}));
        let paths: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        persist_secret_refs(&mut cfg, &paths, &secrets, "My Env!", "sandbox")
            .await
            .unwrap();
        let a = cfg["a"].as_str().unwrap();
        assert!(is_secret_id(a));
        assert_eq!(
            secrets
                .resolve(&SecretRef::latest(a))
                .await
                .unwrap()
                .expose_secret(),
            "pasted"
        );
        assert_eq!(cfg["b"], json!(existing));
        assert!(!cfg.contains_key("c"));
        assert_eq!(cfg["d"], json!(5));
    }

    #[test]
    fn metadata_scrub_removes_echoed_secrets() {
        let cfg = ProviderConfig::default().with_secret("apiKey", SecretString::from("tok-123"));
        let mut md = obj(
            json!({"echo": "Bearer tok-123", "nested": {"x": "tok-123"}, "list": ["tok-123", "ok"], "fine": "ok"}),
        );
        assert_eq!(cfg.scrub_metadata(&mut md), 3);
        assert_eq!(
            Value::Object(md),
            json!({"nested": {}, "list": ["ok"], "fine": "ok"})
        );
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("My  Env!"), "my-env");
        assert_eq!(slug("!!!"), "environment");
    }
}
