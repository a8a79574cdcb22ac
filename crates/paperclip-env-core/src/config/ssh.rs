//! `ssh` driver config (spec 00 §3.2, spec 27 §1).

use secrecy::SecretString;
use serde_json::{Value, json};

use super::{ConfigShape, Fields};
use crate::secret::SecretRef;
use crate::{Error, Result};

/// Config of an `ssh` environment.
///
/// `private_key` holds plaintext only at run time (resolved from
/// `private_key_secret_ref`) or in input shapes; it is never serialized.
#[derive(Clone)]
pub struct SshConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port (default 22).
    pub port: u16,
    /// Login user.
    pub username: String,
    /// Absolute remote workspace directory.
    pub remote_workspace_path: String,
    /// Plaintext private key (resolved at run time; never serialized).
    pub private_key: Option<SecretString>,
    /// Reference to the stored private key secret.
    pub private_key_secret_ref: Option<SecretRef>,
    /// Absolute path of a private key file on this host (SDK extension).
    pub identity_file: Option<String>,
    /// `known_hosts` lines for host-key verification.
    pub known_hosts: Option<String>,
    /// Verify the host key (default true).
    pub strict_host_key_checking: bool,
}

impl std::fmt::Debug for SshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("remote_workspace_path", &self.remote_workspace_path)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field("private_key_secret_ref", &self.private_key_secret_ref)
            .field("identity_file", &self.identity_file)
            .field("strict_host_key_checking", &self.strict_host_key_checking)
            .finish_non_exhaustive()
    }
}

impl SshConfig {
    /// Parses and validates; see the module docs for the rules.
    pub fn parse(value: &Value, shape: ConfigShape) -> Result<Self> {
        let mut f = Fields::new(value, "");
        let host = f.required_trimmed("host", "SSH environments require a host.");
        let port = if f.raw("port").is_some() {
            f.coerced_int("port", 1, 65535)
        } else {
            Some(22)
        };
        let username = f.required_trimmed("username", "SSH environments require a username.");
        let remote = f.required_trimmed(
            "remoteWorkspacePath",
            "SSH environments require a remote workspace path.",
        );
        if let Some(path) = &remote
            && !path.starts_with('/')
        {
            f.issue(
                "remoteWorkspacePath",
                "SSH remote workspace path must be absolute.",
            );
        }
        let private_key = match (f.raw("privateKey"), shape) {
            (None, _) => None,
            (Some(Value::String(s)), ConfigShape::Input) => Some(s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .map(SecretString::from),
            (Some(_), ConfigShape::Stored) => {
                f.issue(
                    "privateKey",
                    "privateKey must be null in a stored SSH config; store it as privateKeySecretRef.",
                );
                None
            }
            (Some(_), ConfigShape::Input) => {
                f.issue("privateKey", "privateKey must be a string.");
                None
            }
        };
        let secret_ref = match f.raw("privateKeySecretRef") {
            None => None,
            Some(v) => match SecretRef::parse_binding(&v) {
                Ok(r) => Some(r),
                Err(message) => {
                    f.issue("privateKeySecretRef", message);
                    None
                }
            },
        };
        let identity_file = f.optional_trimmed("identityFile");
        if let Some(path) = &identity_file
            && !path.starts_with('/')
        {
            f.issue("identityFile", "identityFile must be an absolute path.");
        }
        let known_hosts = f.optional_trimmed("knownHosts");
        let strict = f.bool_or("strictHostKeyChecking", true);
        f.reject_unknown();
        if !f.issues.is_empty() {
            return Err(Error::invalid_config(f.issues));
        }
        Ok(SshConfig {
            host: host.unwrap_or_default(),
            port: port.unwrap_or(22) as u16,
            username: username.unwrap_or_default(),
            remote_workspace_path: remote.unwrap_or_default(),
            private_key,
            private_key_secret_ref: secret_ref,
            identity_file,
            known_hosts,
            strict_host_key_checking: strict,
        })
    }

    /// Stored JSON form: `privateKey` is always null.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "remoteWorkspacePath": self.remote_workspace_path,
            "privateKey": null,
            "privateKeySecretRef": self.private_key_secret_ref.as_ref().map(SecretRef::to_json),
            "knownHosts": self.known_hosts,
            "strictHostKeyChecking": self.strict_host_key_checking,
        });
        if let Some(path) = &self.identity_file {
            v["identityFile"] = Value::String(path.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn normalizes_like_paperclip() {
        let c = SshConfig::parse(
            &json!({"host": " h ", "port": "2222", "username": "u", "remoteWorkspacePath": "/w", "knownHosts": "  "}),
            ConfigShape::Stored,
        )
        .unwrap();
        assert_eq!(
            c.to_json(),
            json!({"host":"h","port":2222,"username":"u","remoteWorkspacePath":"/w","privateKey":null,
                   "privateKeySecretRef":null,"knownHosts":null,"strictHostKeyChecking":true})
        );
    }

    #[test]
    fn reports_every_issue_with_field_names() {
        let Error::InvalidConfig {
            issues,
            message,
            field,
        } = SshConfig::parse(
            &json!({"port": 70000, "remoteWorkspacePath": "rel", "password": "x"}),
            ConfigShape::Stored,
        )
        .unwrap_err()
        else {
            panic!("expected InvalidConfig")
        };
        assert_eq!(field, "host");
        assert_eq!(message, "SSH environments require a host.");
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "host",
                "port",
                "username",
                "remoteWorkspacePath",
                "password"
            ]
        );
        assert!(issues[3].message.contains("absolute"));
    }

    #[test]
    fn stored_shape_rejects_plaintext_key_input_accepts_it() {
        let raw = json!({"host":"h","username":"u","remoteWorkspacePath":"/w","privateKey":"KEY-MATERIAL"});
        assert!(SshConfig::parse(&raw, ConfigShape::Stored).is_err());
        let c = SshConfig::parse(&raw, ConfigShape::Input).unwrap();
        assert_eq!(
            c.private_key.as_ref().unwrap().expose_secret(),
            "KEY-MATERIAL"
        );
        assert!(!format!("{c:?}").contains("KEY-MATERIAL"));
        assert!(!c.to_json().to_string().contains("KEY-MATERIAL"));
    }
}
