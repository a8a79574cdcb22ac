//! `Environment.envVars`: variables every command of a lease sees.
//!
//! Paperclip 2026.916 stores an `env_vars` object on every environment
//! (`envConfigSchema` in `@paperclipai/shared`): a map from variable name to a
//! binding, one of
//!
//! - a bare string (the legacy inline form),
//! - `{"type": "plain", "value": …}`,
//! - `{"type": "secret_ref", "secretId": <uuid>, "version"?: "latest" | n,
//!   "projectionClass"?: …, "projectionAllowlistKey"?: … | null}`,
//! - `{"type": "user_secret_ref", "key": …, "version"?: …, "required"?: bool,
//!   "allowMissingOverride"?: bool}`.
//!
//! [`EnvBinding`] keeps exactly the keys it was given, so a row Paperclip
//! wrote re-serializes unchanged (optional keys stay absent, an explicit
//! `null` stays `null`). This is a change to spec 00 §2.2, which has no
//! `envVars`: the issue (#22) wins.
//!
//! The runtime applies the variables to **every** command of a lease
//! ([`crate::EnvironmentRuntime::execute`]); secret references are resolved
//! through the runtime's [`SecretResolver`] on each call (never cached, so a
//! rotated secret takes effect on the next command), and the request's own
//! `env` wins over a variable of the same name. Resolved values are
//! [`SecretString`]s until they are handed to the command, and errors of the
//! call are scrubbed of them.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::secret::{SecretRef, SecretResolver, SecretVersion, is_secret_id};
use crate::{Error, Result};

/// `envVars`: variable name → binding.
pub type EnvVars = BTreeMap<String, EnvBinding>;

/// The version a secret binding asks for (`"latest"` or a positive integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSelector {
    /// `"latest"`.
    Latest,
    /// A pinned version, 1-based.
    Pinned(u64),
}

impl VersionSelector {
    fn parse(value: &Value, field: &str) -> Result<Self> {
        match value {
            Value::String(s) if s == "latest" => Ok(VersionSelector::Latest),
            Value::Number(n) if n.as_u64().is_some_and(|v| v >= 1) => {
                Ok(VersionSelector::Pinned(n.as_u64().unwrap_or(1)))
            }
            _ => Err(Error::invalid_field(
                field,
                "A secret version must be \"latest\" or a positive integer.",
            )),
        }
    }

    fn to_json(self) -> Value {
        match self {
            VersionSelector::Latest => json!("latest"),
            VersionSelector::Pinned(v) => json!(v),
        }
    }

    fn to_secret_version(self) -> SecretVersion {
        match self {
            VersionSelector::Latest => SecretVersion::Latest,
            VersionSelector::Pinned(v) => {
                SecretVersion::Pinned(u32::try_from(v).unwrap_or(u32::MAX))
            }
        }
    }
}

/// One `envVars` entry; see the [module docs](self).
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum EnvBinding {
    /// A bare string (legacy inline value).
    Inline(String),
    /// `{"type": "plain", "value"}`.
    Plain {
        /// The value.
        value: String,
    },
    /// `{"type": "secret_ref", "secretId", …}`: a company secret.
    SecretRef {
        /// The secret's id (a UUID).
        secret_id: String,
        /// `version`, when given (absent means latest).
        version: Option<VersionSelector>,
        /// `projectionClass`, when given (`unclassified`, `class_3_static_lease`).
        projection_class: Option<String>,
        /// `projectionAllowlistKey`: absent (`None`), `null` (`Some(None)`) or a key.
        projection_allowlist_key: Option<Option<String>>,
    },
    /// `{"type": "user_secret_ref", "key", …}`: a secret of the run's
    /// responsible user, looked up by key.
    UserSecretRef {
        /// The user secret's key (`[a-zA-Z0-9_.-]{1,120}`).
        key: String,
        /// `version`, when given.
        version: Option<VersionSelector>,
        /// `required`, when given (absent means `true`).
        required: Option<bool>,
        /// `allowMissingOverride`, when given (absent means `false`).
        allow_missing_override: Option<bool>,
    },
}

impl fmt::Debug for EnvBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Inline and plain values may be credentials pasted by hand.
            EnvBinding::Inline(_) => f.write_str("Inline([redacted])"),
            EnvBinding::Plain { .. } => f.write_str("Plain { value: [redacted] }"),
            EnvBinding::SecretRef {
                secret_id, version, ..
            } => f
                .debug_struct("SecretRef")
                .field("secret_id", secret_id)
                .field("version", version)
                .finish_non_exhaustive(),
            EnvBinding::UserSecretRef {
                key,
                version,
                required,
                ..
            } => f
                .debug_struct("UserSecretRef")
                .field("key", key)
                .field("version", version)
                .field("required", required)
                .finish_non_exhaustive(),
        }
    }
}

fn user_secret_key_ok(key: &str) -> bool {
    let key = key.trim();
    !key.is_empty()
        && key.len() <= 120
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

const PROJECTION_CLASSES: [&str; 2] = ["unclassified", "class_3_static_lease"];

impl EnvBinding {
    /// Parses one binding; `field` (e.g. `envVars.TOKEN`) prefixes every
    /// error's field path. Keys other than the binding's are ignored, as
    /// Paperclip's validator strips them.
    pub fn from_json(value: &Value, field: &str) -> Result<Self> {
        let obj = match value {
            Value::String(s) => return Ok(EnvBinding::Inline(s.clone())),
            Value::Object(obj) => obj,
            _ => {
                return Err(Error::invalid_field(
                    field,
                    "An environment variable must be a string or a binding object.",
                ));
            }
        };
        let sub = |key: &str| format!("{field}.{key}");
        let string = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::invalid_field(sub(key), "Expected a string.")),
            }
        };
        let boolean = |key: &str| -> Result<Option<bool>> {
            match obj.get(key) {
                None => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(Error::invalid_field(sub(key), "Expected a boolean.")),
            }
        };
        let version = |key: &str| -> Result<Option<VersionSelector>> {
            obj.get(key)
                .map(|v| VersionSelector::parse(v, &sub(key)))
                .transpose()
        };
        match obj.get("type").and_then(Value::as_str) {
            Some("plain") => Ok(EnvBinding::Plain {
                value: string("value")?
                    .ok_or_else(|| Error::invalid_field(sub("value"), "Expected a string."))?,
            }),
            Some("secret_ref") => {
                let secret_id = string("secretId")?.unwrap_or_default();
                if !is_secret_id(&secret_id) {
                    return Err(Error::invalid_field(
                        sub("secretId"),
                        "A secret reference needs a UUID secretId.",
                    ));
                }
                let projection_class = string("projectionClass")?;
                if let Some(class) = &projection_class
                    && !PROJECTION_CLASSES.contains(&class.as_str())
                {
                    return Err(Error::invalid_field(
                        sub("projectionClass"),
                        format!("Unknown projection class \"{class}\"."),
                    ));
                }
                let projection_allowlist_key = match obj.get("projectionAllowlistKey") {
                    None => None,
                    Some(Value::Null) => Some(None),
                    Some(Value::String(s)) if !s.trim().is_empty() && s.trim().len() <= 160 => {
                        Some(Some(s.clone()))
                    }
                    Some(_) => {
                        return Err(Error::invalid_field(
                            sub("projectionAllowlistKey"),
                            "Expected a key of 1 to 160 characters or null.",
                        ));
                    }
                };
                Ok(EnvBinding::SecretRef {
                    secret_id,
                    version: version("version")?,
                    projection_class,
                    projection_allowlist_key,
                })
            }
            Some("user_secret_ref") => {
                let key = string("key")?.unwrap_or_default();
                if !user_secret_key_ok(&key) {
                    return Err(Error::invalid_field(
                        sub("key"),
                        "A user secret key must be 1 to 120 letters, digits, '_', '.' or '-'.",
                    ));
                }
                Ok(EnvBinding::UserSecretRef {
                    key,
                    version: version("version")?,
                    required: boolean("required")?,
                    allow_missing_override: boolean("allowMissingOverride")?,
                })
            }
            _ => Err(Error::invalid_field(
                sub("type"),
                "An environment variable binding must have type \"plain\", \"secret_ref\" or \"user_secret_ref\".",
            )),
        }
    }

    /// The JSON form, with exactly the keys that were given.
    pub fn to_json(&self) -> Value {
        match self {
            EnvBinding::Inline(s) => json!(s),
            EnvBinding::Plain { value } => json!({"type": "plain", "value": value}),
            EnvBinding::SecretRef {
                secret_id,
                version,
                projection_class,
                projection_allowlist_key,
            } => {
                let mut map = Map::new();
                map.insert("type".into(), json!("secret_ref"));
                map.insert("secretId".into(), json!(secret_id));
                if let Some(v) = version {
                    map.insert("version".into(), v.to_json());
                }
                if let Some(c) = projection_class {
                    map.insert("projectionClass".into(), json!(c));
                }
                if let Some(k) = projection_allowlist_key {
                    map.insert("projectionAllowlistKey".into(), json!(k));
                }
                Value::Object(map)
            }
            EnvBinding::UserSecretRef {
                key,
                version,
                required,
                allow_missing_override,
            } => {
                let mut map = Map::new();
                map.insert("type".into(), json!("user_secret_ref"));
                map.insert("key".into(), json!(key));
                if let Some(v) = version {
                    map.insert("version".into(), v.to_json());
                }
                if let Some(r) = required {
                    map.insert("required".into(), json!(r));
                }
                if let Some(a) = allow_missing_override {
                    map.insert("allowMissingOverride".into(), json!(a));
                }
                Value::Object(map)
            }
        }
    }
}

impl Serialize for EnvBinding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for EnvBinding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        EnvBinding::from_json(&value, "envVars").map_err(serde::de::Error::custom)
    }
}

/// Parses a whole `envVars` object, naming the variable in every error.
pub fn parse_env_vars(value: &Value) -> Result<EnvVars> {
    match value {
        Value::Null => Ok(EnvVars::new()),
        Value::Object(map) => map
            .iter()
            .map(|(name, v)| {
                Ok((
                    name.clone(),
                    EnvBinding::from_json(v, &format!("envVars.{name}"))?,
                ))
            })
            .collect(),
        _ => Err(Error::invalid_field(
            "envVars",
            "envVars must be an object.",
        )),
    }
}

/// Variables resolved for one command: plain values and secrets.
#[derive(Default)]
pub struct ResolvedEnv {
    vars: Vec<(String, SecretString)>,
}

impl fmt::Debug for ResolvedEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedEnv")
            .field(
                "names",
                &self.vars.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ResolvedEnv {
    /// Whether nothing was resolved.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The variable names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(k, _)| k.as_str())
    }

    /// Adds every variable to `env` that `env` does not set itself (the
    /// request's own values win).
    pub fn apply_to(&self, env: &mut BTreeMap<String, String>) {
        for (name, value) in &self.vars {
            env.entry(name.clone())
                .or_insert_with(|| value.expose_secret().to_owned());
        }
    }

    /// `text` with every non-empty resolved value replaced by `[REDACTED]`
    /// (longest first, so a value containing another is removed whole).
    pub fn scrub(&self, text: &str) -> String {
        let mut needles: Vec<&str> = self
            .vars
            .iter()
            .map(|(_, v)| v.expose_secret())
            .filter(|v| !v.is_empty())
            .collect();
        needles.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut out = text.to_owned();
        for needle in needles {
            out = out.replace(needle, "[REDACTED]");
        }
        out
    }

    /// An error whose message holds a resolved value, redacted (as an
    /// [`Error::Provider`] of `driver`); other errors pass through.
    pub fn scrub_error(&self, driver: &str, error: Error) -> Error {
        let text = error.to_string();
        let scrubbed = self.scrub(&text);
        if scrubbed == text {
            return error;
        }
        Error::Provider {
            provider: driver.to_owned(),
            message: scrubbed,
            retryable: error.is_retryable(),
            source: None,
        }
    }
}

/// Resolves `vars` for one command. A `secret_ref` is resolved through
/// `resolver` at its version; a `user_secret_ref` through
/// [`SecretResolver::resolve_user_secret`]: a missing one is skipped when
/// `required` is `false`, else an error naming the variable.
pub async fn resolve_env_vars(
    vars: &EnvVars,
    resolver: &dyn SecretResolver,
) -> Result<ResolvedEnv> {
    let mut out = ResolvedEnv::default();
    for (name, binding) in vars {
        let value = match binding {
            EnvBinding::Inline(s) | EnvBinding::Plain { value: s } => SecretString::from(s.clone()),
            EnvBinding::SecretRef {
                secret_id, version, ..
            } => {
                let reference = SecretRef {
                    secret_id: secret_id.trim().to_owned(),
                    version: version
                        .unwrap_or(VersionSelector::Latest)
                        .to_secret_version(),
                };
                resolver.resolve(&reference).await.map_err(|e| {
                    Error::invalid_field(
                        format!("envVars.{name}"),
                        format!("Secret {secret_id} for environment variable {name} could not be resolved: {e}"),
                    )
                })?
            }
            EnvBinding::UserSecretRef {
                key,
                version,
                required,
                ..
            } => {
                let version = version
                    .unwrap_or(VersionSelector::Latest)
                    .to_secret_version();
                match resolver.resolve_user_secret(key.trim(), version).await? {
                    Some(v) => v,
                    None if *required == Some(false) => continue,
                    None => {
                        return Err(Error::invalid_field(
                            format!("envVars.{name}"),
                            format!(
                                "user secret \"{key}\" not available at environment envVars.{name}"
                            ),
                        ));
                    }
                }
            }
        };
        out.vars.push((name.clone(), value));
    }
    Ok(out)
}

/// Serde helpers for the `envVars` field of [`crate::Environment`].
pub(crate) mod serde_env_vars {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        vars: &EnvVars,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let map: Map<String, Value> = vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
        Value::Object(map).serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<EnvVars, D::Error> {
        let value = Value::deserialize(d)?;
        parse_env_vars(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::InMemorySecretResolver;

    #[test]
    fn every_upstream_shape_round_trips_with_its_own_keys() {
        let raw = json!({
            "LEGACY": "inline",
            "PLAIN": {"type": "plain", "value": "v"},
            "REF": {"type": "secret_ref", "secretId": "7b0c8a4e-1f2d-4c3b-9a8e-5d6f7a8b9c0d"},
            "REF_FULL": {"type": "secret_ref", "secretId": "7b0c8a4e-1f2d-4c3b-9a8e-5d6f7a8b9c0d",
                "version": 3, "projectionClass": "class_3_static_lease", "projectionAllowlistKey": null},
            "USER": {"type": "user_secret_ref", "key": "github.token", "version": "latest",
                "required": false, "allowMissingOverride": true},
        });
        let vars = parse_env_vars(&raw).unwrap();
        let back: Map<String, Value> = vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
        assert_eq!(Value::Object(back), raw);
    }

    #[test]
    fn bad_bindings_name_their_field() {
        let err = parse_env_vars(&json!({"TOKEN": {"type": "secret_ref", "secretId": "nope"}}))
            .unwrap_err();
        assert!(err.to_string().contains("UUID"), "{err}");
        let Error::InvalidConfig { issues, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(issues[0].field, "envVars.TOKEN.secretId");
        let err =
            parse_env_vars(&json!({"X": {"type": "user_secret_ref", "key": "a b"}})).unwrap_err();
        let Error::InvalidConfig { issues, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(issues[0].field, "envVars.X.key");
    }

    #[tokio::test]
    async fn secrets_resolve_per_call_and_are_scrubbed() {
        let secrets = InMemorySecretResolver::new();
        let id = secrets.insert("s3cr3t-one");
        let vars = parse_env_vars(&json!({
            "TOKEN": {"type": "secret_ref", "secretId": id},
            "MODE": {"type": "plain", "value": "fast"},
            "OPTIONAL": {"type": "user_secret_ref", "key": "absent", "required": false},
        }))
        .unwrap();
        let resolved = resolve_env_vars(&vars, &secrets).await.unwrap();
        let mut env = BTreeMap::from([("MODE".to_owned(), "mine".to_owned())]);
        resolved.apply_to(&mut env);
        assert_eq!(env["TOKEN"], "s3cr3t-one");
        assert_eq!(env["MODE"], "mine", "the request's own value wins");
        assert!(!env.contains_key("OPTIONAL"));
        assert!(!format!("{resolved:?}").contains("s3cr3t"));
        assert_eq!(resolved.scrub("got s3cr3t-one"), "got [REDACTED]");
        // A rotation is seen by the next resolution.
        secrets.set(&id, "s3cr3t-two");
        let again = resolve_env_vars(&vars, &secrets).await.unwrap();
        let mut env = BTreeMap::new();
        again.apply_to(&mut env);
        assert_eq!(env["TOKEN"], "s3cr3t-two");
        // A required user secret that is missing names the variable.
        let vars =
            parse_env_vars(&json!({"GH": {"type": "user_secret_ref", "key": "gh"}})).unwrap();
        let err = resolve_env_vars(&vars, &secrets).await.unwrap_err();
        assert!(err.to_string().contains("envVars.GH"), "{err}");
    }
}
