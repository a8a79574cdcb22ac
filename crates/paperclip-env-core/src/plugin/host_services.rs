//! Answers to the worker's calls to the host (worker → host requests), as
//! far as they make sense for an SDK host:
//!
//! - `config.get`: the plugin's bootstrap config;
//! - `state.get` / `state.set` / `state.delete`: a key-value store kept in
//!   memory by the [`PluginWorker`](super::PluginWorker), keyed like
//!   upstream's (`scopeKind`, `scopeId`, `namespace`, `stateKey`); it
//!   survives worker restarts but not the host process;
//! - `secrets.resolve`: a secret id resolved through the
//!   [`SecretResolver`] given with
//!   [`PluginWorkerConfig::secret_resolver`](super::PluginWorkerConfig::secret_resolver)
//!   (its latest version); the value is added to the worker's scrubber
//!   before it is sent, so nothing the worker writes afterwards can carry it
//!   into a log;
//! - `log`, `metrics.write`, `telemetry.track`, `activity.log`,
//!   `span.record`, `events.emit`: accepted and written to the `tracing` log
//!   (scrubbed), since an SDK host has no activity feed or event bus.
//!
//! Every other method upstream's host serves is refused with upstream's
//! capability error (-32001), and so is a served method whose capability
//! the manifest does not declare (with upstream's message). Only a name
//! upstream does not know gets "method not found" (-32601).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tracing::{debug, error, info, warn};

use super::host_methods::required_capability;
use super::protocol::{RpcError, codes};
use crate::lease::JsonObject;
use crate::secret::{SecretRef, SecretResolver};

/// One entry of the plugin state store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StateKey {
    scope_kind: String,
    scope_id: Option<String>,
    namespace: String,
    state_key: String,
}

/// The worker → host services of one plugin (shared by its restarts).
#[derive(Default)]
pub(crate) struct HostServices {
    state: Mutex<HashMap<StateKey, Value>>,
}

/// What one answer needs to know about the plugin.
pub(crate) struct HostContext<'a> {
    /// The plugin's id.
    pub plugin_id: &'a str,
    /// Capabilities its manifest declares.
    pub capabilities: Vec<&'a str>,
    /// Its bootstrap config.
    pub config: &'a JsonObject,
    /// Where `secrets.resolve` looks secrets up.
    pub resolver: Option<&'a Arc<dyn SecretResolver>>,
}

/// A served answer: the result, and a secret value the scrubber must learn
/// before the result is written.
pub(crate) struct HostAnswer {
    pub result: Value,
    pub revealed: Option<secrecy::SecretString>,
}

impl From<Value> for HostAnswer {
    fn from(result: Value) -> Self {
        HostAnswer {
            result,
            revealed: None,
        }
    }
}

fn str_param<'a>(params: &'a Value, key: &str) -> Option<&'a str> {
    params
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Writes a worker's `log` (notification or request: `{level, message}`) to
/// the `tracing` log at its level, scrubbed.
pub(crate) fn log_plugin_message(plugin: &str, params: &Value, scrub: impl Fn(&str) -> String) {
    let level = params
        .get("level")
        .and_then(Value::as_str)
        .unwrap_or("info");
    let message = scrub(params.get("message").and_then(Value::as_str).unwrap_or(""));
    match level {
        "error" => error!(target: "paperclip_env::plugin", plugin, "[plugin] {message}"),
        "warn" => warn!(target: "paperclip_env::plugin", plugin, "[plugin] {message}"),
        "debug" => debug!(target: "paperclip_env::plugin", plugin, "[plugin] {message}"),
        _ => info!(target: "paperclip_env::plugin", plugin, "[plugin] {message}"),
    }
}

fn invalid(method: &str, message: &str) -> RpcError {
    RpcError::new(codes::INVALID_PARAMS, format!("{method}: {message}"))
}

impl HostServices {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, HashMap<StateKey, Value>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any state entry exists.
    pub(crate) fn has_state(&self) -> bool {
        !self.lock_state().is_empty()
    }

    fn state_key(method: &str, params: &Value) -> Result<StateKey, RpcError> {
        let scope_kind = str_param(params, "scopeKind")
            .ok_or_else(|| invalid(method, "scopeKind must be a non-empty string"))?;
        let state_key = str_param(params, "stateKey")
            .ok_or_else(|| invalid(method, "stateKey must be a non-empty string"))?;
        Ok(StateKey {
            scope_kind: scope_kind.to_owned(),
            scope_id: str_param(params, "scopeId").map(str::to_owned),
            namespace: str_param(params, "namespace")
                .unwrap_or("default")
                .to_owned(),
            state_key: state_key.to_owned(),
        })
    }

    /// Answers one worker → host request. `scrub` cleans what is logged.
    pub(crate) async fn answer(
        &self,
        cx: &HostContext<'_>,
        method: &str,
        params: &Value,
        scrub: impl Fn(&str) -> String,
    ) -> Result<HostAnswer, RpcError> {
        let Some(capability) = required_capability(method) else {
            return Err(RpcError::new(
                codes::METHOD_NOT_FOUND,
                format!("Host does not handle method \"{method}\""),
            ));
        };
        if let Some(capability) = capability
            && !cx.capabilities.contains(&capability)
        {
            return Err(RpcError::new(
                codes::CAPABILITY_DENIED,
                format!(
                    "Plugin \"{}\" is missing required capability \"{capability}\" for method \"{method}\"",
                    cx.plugin_id
                ),
            ));
        }
        match method {
            "config.get" => Ok(Value::Object(cx.config.clone()).into()),
            "state.get" => {
                let key = Self::state_key(method, params)?;
                Ok(self
                    .lock_state()
                    .get(&key)
                    .cloned()
                    .unwrap_or(Value::Null)
                    .into())
            }
            "state.set" => {
                let key = Self::state_key(method, params)?;
                let value = params.get("value").cloned().unwrap_or(Value::Null);
                self.lock_state().insert(key, value);
                Ok(Value::Null.into())
            }
            "state.delete" => {
                let key = Self::state_key(method, params)?;
                self.lock_state().remove(&key);
                Ok(Value::Null.into())
            }
            "secrets.resolve" => self.resolve_secret(cx, params).await,
            "log" => {
                log_plugin_message(cx.plugin_id, params, &scrub);
                Ok(Value::Null.into())
            }
            "metrics.write" | "telemetry.track" | "activity.log" | "span.record"
            | "events.emit" => {
                debug!(target: "paperclip_env::plugin", plugin = cx.plugin_id, method, params = %scrub(&params.to_string()), "plugin host call recorded in the log");
                Ok(Value::Null.into())
            }
            _ => Err(RpcError::new(
                codes::CAPABILITY_DENIED,
                format!(
                    "Method \"{method}\" is not available in the paperclip-env host (plugin \"{}\")",
                    cx.plugin_id
                ),
            )),
        }
    }

    async fn resolve_secret(
        &self,
        cx: &HostContext<'_>,
        params: &Value,
    ) -> Result<HostAnswer, RpcError> {
        let method = "secrets.resolve";
        let reference = str_param(params, "secretRef")
            .ok_or_else(|| invalid(method, "secretRef must be a non-empty string"))?;
        let Some(resolver) = cx.resolver else {
            return Err(RpcError::new(
                codes::CAPABILITY_DENIED,
                format!(
                    "Method \"{method}\" is not available: no secret resolver is configured for plugin \"{}\"",
                    cx.plugin_id
                ),
            ));
        };
        match resolver.resolve(&SecretRef::latest(reference)).await {
            Ok(value) => {
                use secrecy::ExposeSecret;
                Ok(HostAnswer {
                    result: Value::String(value.expose_secret().to_owned()),
                    revealed: Some(value),
                })
            }
            Err(e) => Err(RpcError::new(codes::WORKER_ERROR, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::InMemorySecretResolver;
    use serde_json::json;

    fn cx<'a>(
        capabilities: &[&'a str],
        config: &'a JsonObject,
        resolver: Option<&'a Arc<dyn SecretResolver>>,
    ) -> HostContext<'a> {
        HostContext {
            plugin_id: "acme.box",
            capabilities: capabilities.to_vec(),
            config,
            resolver,
        }
    }

    async fn ask(
        services: &HostServices,
        cx: &HostContext<'_>,
        method: &str,
        params: Value,
    ) -> Result<Value, RpcError> {
        services
            .answer(cx, method, &params, str::to_owned)
            .await
            .map(|a| a.result)
    }

    #[tokio::test]
    async fn state_round_trips_by_scope_and_needs_its_capabilities() {
        let services = HostServices::default();
        let config = JsonObject::new();
        let full = cx(&["plugin.state.read", "plugin.state.write"], &config, None);
        let key = json!({"scopeKind": "instance", "stateKey": "counter"});
        assert_eq!(
            ask(&services, &full, "state.get", key.clone())
                .await
                .unwrap(),
            Value::Null
        );
        let mut set = key.clone();
        set["value"] = json!({"n": 1});
        assert!(!services.has_state());
        ask(&services, &full, "state.set", set).await.unwrap();
        assert!(services.has_state());
        assert_eq!(
            ask(&services, &full, "state.get", key.clone())
                .await
                .unwrap(),
            json!({"n": 1})
        );
        // Another namespace or scope is another entry.
        let other = json!({"scopeKind": "instance", "stateKey": "counter", "namespace": "b"});
        assert_eq!(
            ask(&services, &full, "state.get", other).await.unwrap(),
            Value::Null
        );
        ask(&services, &full, "state.delete", key.clone())
            .await
            .unwrap();
        assert_eq!(
            ask(&services, &full, "state.get", key.clone())
                .await
                .unwrap(),
            Value::Null
        );

        let read_only = cx(&["plugin.state.read"], &config, None);
        let denied = ask(&services, &read_only, "state.set", key.clone())
            .await
            .unwrap_err();
        assert_eq!(denied.code, codes::CAPABILITY_DENIED);
        assert_eq!(
            denied.message,
            "Plugin \"acme.box\" is missing required capability \"plugin.state.write\" for method \"state.set\""
        );
        let bad = ask(
            &services,
            &full,
            "state.get",
            json!({"scopeKind": "instance"}),
        )
        .await
        .unwrap_err();
        assert_eq!(bad.code, codes::INVALID_PARAMS);
        assert!(bad.message.contains("stateKey"), "{}", bad.message);
    }

    #[tokio::test]
    async fn upstream_methods_not_served_are_capability_errors_and_unknown_ones_not_found() {
        let services = HostServices::default();
        let config = JsonObject::new();
        let cx = cx(&["issues.read"], &config, None);
        let e = ask(&services, &cx, "issues.list", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, codes::CAPABILITY_DENIED);
        assert!(
            e.message
                .contains("not available in the paperclip-env host"),
            "{}",
            e.message
        );
        let e = ask(&services, &cx, "db.query", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, codes::CAPABILITY_DENIED);
        assert!(
            e.message.contains("database.namespace.read"),
            "{}",
            e.message
        );
        let e = ask(&services, &cx, "no.such.method", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, codes::METHOD_NOT_FOUND);
        // No capability needed.
        assert_eq!(
            ask(&services, &cx, "log", json!({"message": "hi"}))
                .await
                .unwrap(),
            Value::Null
        );
        assert_eq!(
            ask(&services, &cx, "config.get", json!({})).await.unwrap(),
            json!({})
        );
    }

    #[tokio::test]
    async fn secrets_resolve_through_the_resolver_and_reveal_the_value_to_the_scrubber() {
        let services = HostServices::default();
        let config = JsonObject::new();
        let secrets = InMemorySecretResolver::new();
        let id = secrets.insert("box-token-123");
        let resolver: Arc<dyn SecretResolver> = Arc::new(secrets);
        let cx_ok = cx(&["secrets.read-ref"], &config, Some(&resolver));
        let answer = services
            .answer(
                &cx_ok,
                "secrets.resolve",
                &json!({"secretRef": id}),
                str::to_owned,
            )
            .await
            .unwrap();
        assert_eq!(answer.result, json!("box-token-123"));
        assert!(answer.revealed.is_some());
        let missing = ask(
            &services,
            &cx_ok,
            "secrets.resolve",
            json!({"secretRef": "nope"}),
        )
        .await
        .unwrap_err();
        assert_eq!(missing.code, codes::WORKER_ERROR);
        let no_resolver = cx(&["secrets.read-ref"], &config, None);
        let e = ask(
            &services,
            &no_resolver,
            "secrets.resolve",
            json!({"secretRef": id}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, codes::CAPABILITY_DENIED);
        let no_cap = cx(&[], &config, Some(&resolver));
        let e = ask(
            &services,
            &no_cap,
            "secrets.resolve",
            json!({"secretRef": id}),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, codes::CAPABILITY_DENIED);
        assert!(e.message.contains("secrets.read-ref"));
    }
}
