//! `plugin` driver config (spec 00 §3.4).

use serde_json::{Value, json};

use super::{Fields, sandbox::key_pattern};
use crate::lease::JsonObject;
use crate::{Error, Result};

/// Config of a `plugin` environment.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginDriverConfig {
    /// The plugin's key.
    pub plugin_key: String,
    /// The environment driver the plugin declares.
    pub driver_key: String,
    /// Driver-owned config, passed to the plugin.
    pub driver_config: JsonObject,
}

impl PluginDriverConfig {
    /// Parses and validates (strict).
    pub fn parse(value: &Value) -> Result<Self> {
        let mut f = Fields::new(value, "");
        let plugin_key =
            f.required_trimmed("pluginKey", "Plugin environments require a plugin key.");
        let driver_key =
            f.required_trimmed("driverKey", "Plugin environments require a driver key.");
        if let Some(k) = &driver_key
            && !key_pattern().is_match(k)
        {
            f.issue(
                "driverKey",
                "Environment driver key must start with a lowercase alphanumeric and contain only lowercase letters, digits, dots, hyphens, or underscores",
            );
        }
        let driver_config = match f.raw("driverConfig") {
            None => JsonObject::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                f.issue("driverConfig", "driverConfig must be an object.");
                JsonObject::new()
            }
        };
        f.reject_unknown();
        if !f.issues.is_empty() {
            return Err(Error::invalid_config(f.issues));
        }
        Ok(PluginDriverConfig {
            plugin_key: plugin_key.unwrap_or_default(),
            driver_key: driver_key.unwrap_or_default(),
            driver_config,
        })
    }

    /// Normalized JSON form.
    pub fn to_json(&self) -> Value {
        json!({"pluginKey": self.plugin_key, "driverKey": self.driver_key, "driverConfig": self.driver_config})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let c =
            PluginDriverConfig::parse(&json!({"pluginKey": "acme", "driverKey": "box"})).unwrap();
        assert_eq!(
            c.to_json(),
            json!({"pluginKey":"acme","driverKey":"box","driverConfig":{}})
        );
        let e = PluginDriverConfig::parse(&json!({"pluginKey": "acme", "driverKey": "Box"}))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Environment driver key must start")
        );
    }
}
