//! Driver configs and their validation (spec 00 §3).
//!
//! Every parser collects *all* problems as [`ConfigIssue`]s (field path plus the
//! spec's message) and returns them as one [`Error::InvalidConfig`], whose
//! message is the first issue's, as Paperclip reports it.

mod fields;
mod plugin;
mod sandbox;
mod ssh;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use plugin::PluginDriverConfig;
pub use sandbox::{
    DEFAULT_FAKE_IMAGE, ENVELOPE_KEYS, FakeSandboxConfig, HOST_FLAG_KEYS, HostFlags,
    PROVIDER_KEY_PATTERN, ProviderEnvelope, REMOVED_SANDBOX_CONFIG_KEYS,
    RUNNER_IDLE_TIMEOUT_MS_MAX, RUNNER_IDLE_TIMEOUT_MS_MIN, RunnerLifecycleMode, SandboxConfig,
    TIMEOUT_MS_MAX, WARM_RUNNER_IDLE_TIMEOUT_MS,
};
pub use ssh::SshConfig;

pub(crate) use fields::Fields;

use crate::lease::driver_keys;
use crate::{Error, Result};

/// One validation problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigIssue {
    /// Dot path of the field (empty for the object itself).
    pub field: String,
    /// Human-readable message (the spec's wording where it fixes one).
    pub message: String,
}

impl ConfigIssue {
    /// A new issue.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigIssue {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Which Paperclip schema flavour to apply (spec 00 §3.2, spec 27 §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigShape {
    /// As stored: secrets only as references (an SSH `privateKey` string is rejected).
    #[default]
    Stored,
    /// As submitted for a probe or for saving: plaintext secrets accepted.
    Input,
}

/// A parsed driver config.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DriverConfig {
    /// `local`: any object, kept as is.
    Local(crate::lease::JsonObject),
    /// `ssh`.
    Ssh(SshConfig),
    /// `sandbox`.
    Sandbox(SandboxConfig),
    /// `plugin`.
    Plugin(PluginDriverConfig),
}

impl DriverConfig {
    /// Parses `config` for `driver`; unknown drivers are an error
    /// (`Unsupported environment driver "<driver>".`).
    ///
    /// ```
    /// use paperclip_env_core::config::{ConfigShape, DriverConfig};
    /// let err = DriverConfig::parse("ssh", &serde_json::json!({"host": " "}), ConfigShape::Stored).unwrap_err();
    /// assert_eq!(err.to_string(), "SSH environments require a host.");
    /// ```
    pub fn parse(driver: &str, config: &Value, shape: ConfigShape) -> Result<DriverConfig> {
        match driver {
            driver_keys::LOCAL => Ok(DriverConfig::Local(
                config.as_object().cloned().unwrap_or_default(),
            )),
            driver_keys::SSH => SshConfig::parse(config, shape).map(DriverConfig::Ssh),
            driver_keys::SANDBOX => SandboxConfig::parse(config).map(DriverConfig::Sandbox),
            driver_keys::PLUGIN => PluginDriverConfig::parse(config).map(DriverConfig::Plugin),
            other => Err(Error::invalid_field(
                "driver",
                format!("Unsupported environment driver \"{other}\"."),
            )),
        }
    }

    /// The normalized JSON form (secrets as references only).
    pub fn to_json(&self) -> Value {
        match self {
            DriverConfig::Local(map) => Value::Object(map.clone()),
            DriverConfig::Ssh(c) => c.to_json(),
            DriverConfig::Sandbox(c) => c.to_json(),
            DriverConfig::Plugin(c) => c.to_json(),
        }
    }
}
