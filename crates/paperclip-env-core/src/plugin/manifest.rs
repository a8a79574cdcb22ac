//! The parts of a plugin manifest (`PaperclipPluginManifestV1`) the SDK reads:
//! its id (the plugin key), its capabilities and its `environmentDrivers[]`
//! (spec 00 §10.1). The whole manifest is handed to the worker unchanged in
//! `initialize`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::ConfigIssue;
use crate::{Error, Result};

/// The capability a manifest must hold to declare environment drivers.
pub const DRIVERS_CAPABILITY: &str = "environment.drivers.register";

/// What an `environmentDrivers[]` entry backs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Backs `driver: "plugin"` environments (the default when `kind` is absent).
    EnvironmentDriver,
    /// Backs `driver: "sandbox"` environments whose `provider` is the driver key.
    SandboxProvider,
}

/// One `environmentDrivers[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverDeclaration {
    /// The driver key.
    pub driver_key: String,
    /// What it backs.
    pub kind: DriverKind,
    /// Display name.
    pub display_name: String,
    /// JSON Schema of the driver config (`format: "secret-ref"` marks secrets).
    pub config_schema: Value,
    /// Whether the driver keeps leases for reuse: the manifest's
    /// `sandboxCapabilities.reusableLeases`, else its legacy
    /// `supportsReusableLeases`; false when neither is declared, as upstream.
    pub supports_reusable_leases: bool,
}

/// A parsed plugin manifest.
///
/// ```
/// use paperclip_env_core::plugin::{DriverKind, PluginManifest};
/// let manifest = PluginManifest::from_json(serde_json::json!({
///     "id": "acme.sandbox",
///     "capabilities": ["environment.drivers.register"],
///     "environmentDrivers": [{"driverKey": "acme", "kind": "sandbox_provider", "displayName": "Acme", "configSchema": {"type": "object"}}]
/// })).unwrap();
/// assert_eq!(manifest.driver("acme").unwrap().kind, DriverKind::SandboxProvider);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PluginManifest {
    /// The plugin key (`id`).
    pub id: String,
    /// Declared environment drivers.
    pub drivers: Vec<DriverDeclaration>,
    /// The manifest as given, sent to the worker in `initialize`.
    pub raw: Value,
}

impl PluginManifest {
    /// Parses and checks a manifest; problems name their field.
    pub fn from_json(raw: Value) -> Result<Self> {
        let mut issues = Vec::new();
        let id = raw
            .get("id")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if id.is_none() {
            issues.push(ConfigIssue::new(
                "manifest.id",
                "Plugin manifests require an id.",
            ));
        }
        let has_capability = raw
            .get("capabilities")
            .and_then(Value::as_array)
            .is_some_and(|caps| caps.iter().any(|c| c.as_str() == Some(DRIVERS_CAPABILITY)));
        if !has_capability {
            issues.push(ConfigIssue::new(
                "manifest.capabilities",
                format!("Plugin manifests that declare environment drivers require the \"{DRIVERS_CAPABILITY}\" capability."),
            ));
        }
        let mut drivers = Vec::new();
        match raw.get("environmentDrivers") {
            Some(Value::Array(entries)) => {
                for (i, entry) in entries.iter().enumerate() {
                    let field = |name: &str| format!("manifest.environmentDrivers[{i}].{name}");
                    let driver_key = entry
                        .get("driverKey")
                        .and_then(Value::as_str)
                        .map(str::trim)
                        .filter(|s| !s.is_empty());
                    let kind = match entry.get("kind") {
                        None | Some(Value::Null) => Some(DriverKind::EnvironmentDriver),
                        Some(v) if v == "environment_driver" => Some(DriverKind::EnvironmentDriver),
                        Some(v) if v == "sandbox_provider" => Some(DriverKind::SandboxProvider),
                        Some(_) => {
                            issues.push(ConfigIssue::new(
                                field("kind"),
                                "kind must be \"environment_driver\" or \"sandbox_provider\".",
                            ));
                            None
                        }
                    };
                    let Some(driver_key) = driver_key else {
                        issues.push(ConfigIssue::new(
                            field("driverKey"),
                            "Environment drivers require a driverKey.",
                        ));
                        continue;
                    };
                    let Some(kind) = kind else { continue };
                    drivers.push(DriverDeclaration {
                        driver_key: driver_key.to_owned(),
                        kind,
                        display_name: entry
                            .get("displayName")
                            .and_then(Value::as_str)
                            .unwrap_or(driver_key)
                            .to_owned(),
                        config_schema: entry
                            .get("configSchema")
                            .cloned()
                            .unwrap_or_else(|| serde_json::json!({"type": "object"})),
                        // As upstream's `resolveDeclaredSandboxCapabilities`:
                        // `sandboxCapabilities.reusableLeases` wins over the
                        // legacy flag; neither declared means not reusable.
                        supports_reusable_leases: entry
                            .pointer("/sandboxCapabilities/reusableLeases")
                            .and_then(Value::as_bool)
                            .or_else(|| {
                                entry.get("supportsReusableLeases").and_then(Value::as_bool)
                            })
                            .unwrap_or(false),
                    });
                }
            }
            _ => issues.push(ConfigIssue::new(
                "manifest.environmentDrivers",
                "Plugin manifests require an environmentDrivers array.",
            )),
        }
        let mut seen = BTreeSet::new();
        if drivers.iter().any(|d| !seen.insert(d.driver_key.clone())) {
            issues.push(ConfigIssue::new(
                "manifest.environmentDrivers",
                "Duplicate environment driver keys",
            ));
        }
        match id {
            Some(id) if issues.is_empty() => Ok(PluginManifest { id, drivers, raw }),
            _ => Err(Error::invalid_config(issues)),
        }
    }

    /// The declaration of `driver_key`, any kind.
    pub fn driver(&self, driver_key: &str) -> Option<&DriverDeclaration> {
        self.drivers.iter().find(|d| d.driver_key == driver_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejects_bad_manifests_naming_the_field() {
        let e = PluginManifest::from_json(json!({"capabilities": []})).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { ref field, .. } if field == "manifest.id"));
        let e = PluginManifest::from_json(json!({
            "id": "p", "capabilities": [DRIVERS_CAPABILITY],
            "environmentDrivers": [{"driverKey": "a"}, {"driverKey": "a"}]
        }))
        .unwrap_err();
        assert_eq!(e.to_string(), "Duplicate environment driver keys");
        let e = PluginManifest::from_json(json!({
            "id": "p", "capabilities": [DRIVERS_CAPABILITY],
            "environmentDrivers": [{"driverKey": "a", "kind": "vm"}]
        }))
        .unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { ref field, .. } if field == "manifest.environmentDrivers[0].kind")
        );
    }

    #[test]
    fn reusable_leases_only_when_declared_with_the_nested_flag_winning() {
        let reusable = |entry: serde_json::Value| {
            let mut entry = entry;
            entry["driverKey"] = json!("a");
            PluginManifest::from_json(json!({
                "id": "p", "capabilities": [DRIVERS_CAPABILITY], "environmentDrivers": [entry]
            }))
            .unwrap()
            .drivers[0]
                .supports_reusable_leases
        };
        assert!(!reusable(json!({})));
        assert!(reusable(json!({"supportsReusableLeases": true})));
        assert!(reusable(
            json!({"sandboxCapabilities": {"reusableLeases": true}})
        ));
        assert!(!reusable(
            json!({"supportsReusableLeases": true, "sandboxCapabilities": {"reusableLeases": false}})
        ));
    }
}
