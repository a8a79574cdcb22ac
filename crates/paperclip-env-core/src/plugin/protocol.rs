//! Wire types of Paperclip's plugin worker protocol: JSON-RPC 2.0 envelopes,
//! the plugin error codes and the `environment*` parameter and result shapes
//! (spec 00 §10.2; upstream `packages/plugins/sdk/src/protocol.ts`).
//!
//! Framing is newline-delimited JSON (one message per line, `\n`
//! terminated), exactly as upstream `serializeMessage` / `parseMessage`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::execute::{ExecuteRequest, ExecuteResult};
use crate::lease::JsonObject;
use crate::provider::{Diagnostic, LeaseHandle, ProviderLease};
use crate::realize::WorkspaceSpec;
use crate::time;

/// The JSON-RPC version every message carries.
pub const JSONRPC_VERSION: &str = "2.0";

/// Standard JSON-RPC 2.0 and Paperclip plugin error codes (`JSONRPC_ERROR_CODES`,
/// `PLUGIN_RPC_ERROR_CODES`).
pub mod codes {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal JSON-RPC error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The worker process is not running or not reachable.
    pub const WORKER_UNAVAILABLE: i64 = -32000;
    /// The plugin lacks the capability for this operation.
    pub const CAPABILITY_DENIED: i64 = -32001;
    /// The worker reported an unhandled error.
    pub const WORKER_ERROR: i64 = -32002;
    /// The call timed out waiting for the worker.
    pub const TIMEOUT: i64 = -32003;
    /// The worker does not implement the optional method.
    pub const METHOD_NOT_IMPLEMENTED: i64 = -32004;
    /// A worker → host call tried to leave the invocation's company scope.
    pub const INVOCATION_SCOPE_DENIED: i64 = -32005;
    /// A config delivery would have mixed two companies in a single-tenant worker.
    pub const CROSS_TENANT_CONFIG: i64 = -32006;
    /// Catch-all.
    pub const UNKNOWN: i64 = -32099;
}

/// Method names (host → worker).
pub mod methods {
    /// Handshake: `{manifest, config, instanceInfo, apiVersion, databaseNamespace}` → `{ok, supportedMethods}`.
    pub const INITIALIZE: &str = "initialize";
    /// Graceful stop; the worker exits after answering.
    pub const SHUTDOWN: &str = "shutdown";
    /// Liveness.
    pub const HEALTH: &str = "health";
    /// Config validation of a driver.
    pub const VALIDATE_CONFIG: &str = "environmentValidateConfig";
    /// Probe.
    pub const PROBE: &str = "environmentProbe";
    /// Lease acquisition.
    pub const ACQUIRE: &str = "environmentAcquireLease";
    /// Lease resume.
    pub const RESUME: &str = "environmentResumeLease";
    /// Lease release.
    pub const RELEASE: &str = "environmentReleaseLease";
    /// Lease destroy.
    pub const DESTROY: &str = "environmentDestroyLease";
    /// Workspace realization.
    pub const REALIZE: &str = "environmentRealizeWorkspace";
    /// Command execution.
    pub const EXECUTE: &str = "environmentExecute";
    /// Worker → host structured log notification.
    pub const LOG: &str = "log";
    /// Worker → host: the plugin's bootstrap config.
    pub const CONFIG_GET: &str = "config.get";
    /// Worker → host notification: one chunk of a running command's output
    /// (`params: {stream: "stdout"|"stderr", chunk}`), tagged with the
    /// `paperclipInvocationId` of the `environmentExecute` call it belongs to.
    pub const EXECUTE_LOG: &str = "execute.log";
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// Machine-readable code (see [`codes`]).
    pub code: i64,
    /// Human-readable message.
    pub message: String,
    /// Optional structured data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with a code and message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// One message read from the other side, classified like upstream's type guards.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A response to one of our requests.
    Response {
        /// The echoed id (`null` for parse-error responses).
        id: Value,
        /// `result` or `error`.
        outcome: Result<Value, RpcError>,
    },
    /// A request the other side wants answered.
    Request {
        /// Its id.
        id: Value,
        /// Method name.
        method: String,
        /// Parameters (`null` when absent).
        params: Value,
        /// The host-issued invocation it belongs to ([`invocation_id_of`]).
        invocation_id: Option<String>,
    },
    /// A fire-and-forget notification.
    Notification {
        /// Method name.
        method: String,
        /// Parameters (`null` when absent).
        params: Value,
        /// The host-issued invocation it belongs to ([`invocation_id_of`]).
        invocation_id: Option<String>,
    },
}

/// Why a line is not a JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn excerpt(line: &str) -> String {
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

/// Parses one line (`parseMessage` plus the type guards).
///
/// ```
/// use paperclip_env_core::plugin::protocol::{parse_line, Incoming};
/// let msg = parse_line(r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#).unwrap();
/// assert!(matches!(msg, Incoming::Response { outcome: Ok(_), .. }));
/// assert!(parse_line("hello").is_err());
/// ```
pub fn parse_line(line: &str) -> Result<Incoming, ParseError> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Err(ParseError("Empty message".into()));
    }
    let value: Value = serde_json::from_str(trimmed)
        .map_err(|_| ParseError(format!("Invalid JSON: {}", excerpt(trimmed))))?;
    let Value::Object(mut obj) = value else {
        return Err(ParseError("Message must be a JSON object".into()));
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
        return Err(ParseError(format!(
            "Invalid or missing jsonrpc version (expected \"2.0\", got {})",
            obj.get("jsonrpc")
                .map(Value::to_string)
                .unwrap_or_else(|| "undefined".into())
        )));
    }
    let method = obj.get("method").and_then(Value::as_str).map(str::to_owned);
    let params = obj.remove("params").unwrap_or(Value::Null);
    let invocation_id = invocation_id_of(&obj);
    match (method, obj.remove("id")) {
        (Some(method), Some(id)) if !id.is_null() => Ok(Incoming::Request {
            id,
            method,
            params,
            invocation_id,
        }),
        (Some(method), None) => Ok(Incoming::Notification {
            method,
            params,
            invocation_id,
        }),
        (None, Some(id)) => {
            if let Some(error) = obj.remove("error").filter(|e| !e.is_null()) {
                let error: RpcError = serde_json::from_value(error)
                    .map_err(|e| ParseError(format!("Malformed error object: {e}")))?;
                Ok(Incoming::Response {
                    id,
                    outcome: Err(error),
                })
            } else if let Some(result) = obj.remove("result") {
                Ok(Incoming::Response {
                    id,
                    outcome: Ok(result),
                })
            } else {
                Err(ParseError("Response has neither result nor error".into()))
            }
        }
        _ => Err(ParseError("Not a request, notification or response".into())),
    }
}

/// The host-issued invocation a message belongs to: a worker echoes it as
/// `paperclipInvocationId` on what it sends during a call; a host request
/// carries it as `paperclipInvocation.id`.
pub fn invocation_id_of(message: &serde_json::Map<String, Value>) -> Option<String> {
    message
        .get("paperclipInvocationId")
        .or_else(|| message.get("paperclipInvocation").and_then(|i| i.get("id")))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A request line (`createRequest` + `serializeMessage`), newline included,
/// with the host-issued `paperclipInvocation` scope upstream attaches (a
/// fresh invocation id; see [`request_line_for`]).
///
/// ```
/// use paperclip_env_core::plugin::protocol::request_line;
/// let line = request_line(1, "environmentProbe", &serde_json::json!({}), Some("company-1"));
/// assert!(line.starts_with(r#"{"jsonrpc":"2.0","id":1,"method":"environmentProbe""#) && line.ends_with('\n'));
/// ```
pub fn request_line(id: u64, method: &str, params: &Value, company_id: Option<&str>) -> String {
    request_line_for(
        id,
        method,
        params,
        company_id,
        &uuid::Uuid::new_v4().to_string(),
    )
}

/// [`request_line`] with a given invocation id, which the worker echoes as
/// `paperclipInvocationId` on the `execute.log` notifications of that call.
pub fn request_line_for(
    id: u64,
    method: &str,
    params: &Value,
    company_id: Option<&str>,
    invocation_id: &str,
) -> String {
    let mut msg = json!({"jsonrpc": JSONRPC_VERSION, "id": id, "method": method, "params": params});
    // Host-issued invocation scope, as upstream attaches to every call.
    let scope = match company_id {
        Some(c) => json!({"companyId": c}),
        None => json!({}),
    };
    msg["paperclipInvocation"] = json!({"id": invocation_id, "scope": scope});
    let mut line = msg.to_string();
    line.push('\n');
    line
}

/// An `execute.log` notification line (worker side): one output chunk of
/// the `environmentExecute` call `invocation_id`.
///
/// ```
/// use paperclip_env_core::plugin::protocol::{execute_log_line, parse_line, Incoming};
/// let line = execute_log_line("inv-1", "stdout", "hello\n");
/// let Ok(Incoming::Notification { method, params, invocation_id }) = parse_line(&line) else { panic!() };
/// assert_eq!((method.as_str(), invocation_id.as_deref()), ("execute.log", Some("inv-1")));
/// assert_eq!(params["chunk"], "hello\n");
/// ```
pub fn execute_log_line(invocation_id: &str, stream: &str, chunk: &str) -> String {
    let mut line = json!({
        "jsonrpc": JSONRPC_VERSION,
        "method": methods::EXECUTE_LOG,
        "params": {"stream": stream, "chunk": chunk},
        "paperclipInvocationId": invocation_id,
    })
    .to_string();
    line.push('\n');
    line
}

/// A success response line.
pub fn result_line(id: &Value, result: &Value) -> String {
    let mut line = json!({"jsonrpc": JSONRPC_VERSION, "id": id, "result": result}).to_string();
    line.push('\n');
    line
}

/// An error response line (`createErrorResponse`).
pub fn error_line(id: &Value, error: &RpcError) -> String {
    let mut line = json!({"jsonrpc": JSONRPC_VERSION, "id": id, "error": error}).to_string();
    line.push('\n');
    line
}

/// `{instanceId, hostVersion}` of the initialize call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    /// UUID of this host instance.
    pub instance_id: String,
    /// Semver of the host.
    pub host_version: String,
}

/// Result of `initialize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResult {
    /// Whether initialization succeeded.
    pub ok: bool,
    /// Optional methods the worker implements.
    #[serde(default)]
    pub supported_methods: Vec<String>,
}

/// Base params of every environment method but validate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseParams {
    /// The driver declared by the plugin.
    pub driver_key: String,
    /// Owning company (upstream sends it even when null).
    pub company_id: Option<String>,
    /// The environment.
    pub environment_id: String,
    /// The issue, if any.
    #[serde(default)]
    pub issue_id: Option<String>,
    /// Driver / provider config (plaintext secrets on the wire).
    #[serde(default)]
    pub config: JsonObject,
}

impl BaseParams {
    /// The params as a JSON object, to extend with method fields.
    pub fn to_object(&self) -> JsonObject {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }
}

/// `PluginEnvironmentLease` on the wire.
pub fn lease_json(lease: &LeaseHandle) -> Value {
    json!({
        "providerLeaseId": lease.provider_lease_id,
        "metadata": lease.metadata,
        "expiresAt": lease.expires_at.as_ref().map(time::to_iso),
    })
}

/// Parses a `PluginEnvironmentLease` result; `expiresAt` that is empty or not
/// an ISO instant reads as none (upstream `parseExpiresAt`).
pub fn parse_lease(value: Value) -> Result<ProviderLease, String> {
    let Value::Object(obj) = value else {
        return Err("lease result must be an object".into());
    };
    let provider_lease_id = match obj.get("providerLeaseId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("providerLeaseId must be a string or null".into()),
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err("metadata must be an object".into()),
    };
    let expires_at = obj
        .get("expiresAt")
        .and_then(Value::as_str)
        .and_then(time::parse_iso);
    Ok(ProviderLease {
        provider_lease_id,
        metadata,
        expires_at,
    })
}

/// `environmentValidateConfig` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationResult {
    /// Whether the config is usable.
    pub ok: bool,
    /// Non-fatal remarks.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Problems.
    #[serde(default)]
    pub errors: Vec<String>,
    /// The config with defaults applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized_config: Option<JsonObject>,
}

/// `environmentProbe` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// Whether the driver is usable.
    pub ok: bool,
    /// One-line summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Findings.
    #[serde(default)]
    pub diagnostics: Vec<Diagnostic>,
    /// Provider metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// `environmentRealizeWorkspace` workspace param.
pub fn workspace_json(workspace: &WorkspaceSpec) -> Value {
    serde_json::to_value(workspace).unwrap_or_else(|_| json!({}))
}

/// Adds the execute fields to `params` (`command, args, cwd, env, stdin,
/// timeoutMs, bypassSession`). `cwd` is always sent, as upstream's host does: the request's,
/// else the lease's `remoteCwd` (`lease_cwd`), when either is known.
///
/// ```
/// use paperclip_env_core::ExecuteRequest;
/// use paperclip_env_core::plugin::protocol::add_execute_fields;
/// let mut params = serde_json::Map::new();
/// add_execute_fields(&mut params, &ExecuteRequest::new("ls"), Some("/work/lease-1"));
/// assert_eq!(params["cwd"], "/work/lease-1");
/// assert!(params.get("bypassSession").is_none());
/// add_execute_fields(&mut params, &ExecuteRequest::new("make").bypass_session(true), None);
/// assert_eq!(params["bypassSession"], true);
/// ```
pub fn add_execute_fields(
    params: &mut JsonObject,
    request: &ExecuteRequest,
    lease_cwd: Option<&str>,
) {
    params.insert("command".into(), json!(request.command));
    params.insert("args".into(), json!(request.args));
    if let Some(cwd) = request.cwd.as_deref().or(lease_cwd) {
        params.insert("cwd".into(), json!(cwd));
    }
    params.insert("env".into(), json!(request.env));
    if let Some(stdin) = &request.stdin {
        params.insert("stdin".into(), json!(stdin));
    }
    if let Some(t) = request.timeout_ms {
        params.insert("timeoutMs".into(), json!(t));
    }
    // Only when set, as upstream's host sends it.
    if request.bypass_session {
        params.insert("bypassSession".into(), json!(true));
    }
}

/// Adds the run's acquire details to `environmentAcquireLease` params, each
/// only when known, as upstream's host sends them (`agentId`,
/// `executionWorkspaceId`, `adapterType`, `executionWorkspaceSettings`,
/// `requestedExpiresAt`, `requestedCwd`).
///
/// ```
/// use paperclip_env_core::AcquireDetails;
/// use paperclip_env_core::plugin::protocol::add_acquire_details;
/// let mut params = serde_json::Map::new();
/// let details = AcquireDetails { adapter_type: Some("codex_local".into()), ..AcquireDetails::default() };
/// add_acquire_details(&mut params, &details);
/// assert_eq!(serde_json::Value::Object(params), serde_json::json!({"adapterType": "codex_local"}));
/// ```
pub fn add_acquire_details(params: &mut JsonObject, details: &crate::provider::AcquireDetails) {
    if let Ok(Value::Object(fields)) = serde_json::to_value(details) {
        params.extend(fields);
    }
}

/// Parses an `environmentExecute` result (§11.1).
///
/// ```
/// use paperclip_env_core::plugin::protocol::parse_execute_result;
/// let r = parse_execute_result(serde_json::json!({"exitCode": 0, "timedOut": false, "stdout": "hi\n", "stderr": ""})).unwrap();
/// assert!(r.success() && r.stdout == "hi\n");
/// ```
pub fn parse_execute_result(value: Value) -> Result<ExecuteResult, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        exit_code: Option<f64>,
        #[serde(default)]
        signal: Option<String>,
        #[serde(default)]
        timed_out: bool,
        #[serde(default)]
        stdout: String,
        #[serde(default)]
        stderr: String,
        #[serde(default)]
        metadata: Option<JsonObject>,
    }
    let wire: Wire = serde_json::from_value(value).map_err(|e| e.to_string())?;
    Ok(ExecuteResult {
        exit_code: wire
            .exit_code
            .filter(|c| c.is_finite() && c.fract() == 0.0)
            .map(|c| c as i32),
        signal: wire.signal,
        timed_out: wire.timed_out,
        stdout: wire.stdout,
        stderr: wire.stderr,
        metadata: wire.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32004,"message":"x"}}"#),
            Ok(Incoming::Response {
                outcome: Err(RpcError { code: -32004, .. }),
                ..
            })
        ));
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","method":"log","params":{"level":"info"}}"#),
            Ok(Incoming::Notification { .. })
        ));
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","id":"a","method":"config.get","params":{}}"#),
            Ok(Incoming::Request { .. })
        ));
        assert!(parse_line(r#"{"jsonrpc":"1.0","id":1,"result":1}"#).is_err());
        assert!(parse_line(r#"{"jsonrpc":"2.0","id":1}"#).is_err());
        assert!(parse_line("[1,2]").is_err());
        assert!(parse_line("\u{1F600}".repeat(300).as_str()).is_err());
    }

    #[test]
    fn invocation_ids_are_read_from_workers_and_hosts() {
        let line = request_line_for(1, "environmentExecute", &json!({}), None, "inv-9");
        assert!(matches!(
            parse_line(&line),
            Ok(Incoming::Request { invocation_id: Some(ref i), .. }) if i == "inv-9"
        ));
        assert!(matches!(
            parse_line(
                r#"{"jsonrpc":"2.0","method":"execute.log","params":{},"paperclipInvocationId":""}"#
            ),
            Ok(Incoming::Notification {
                invocation_id: None,
                ..
            })
        ));
    }

    #[test]
    fn request_lines_are_ndjson() {
        let line = request_line(7, "environmentProbe", &json!({"a": 1}), Some("co"));
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["paperclipInvocation"]["scope"]["companyId"], "co");
    }

    #[test]
    fn lease_expiry_parsing_is_lenient() {
        let l = parse_lease(json!({"providerLeaseId": "x", "expiresAt": "not a date"})).unwrap();
        assert_eq!(l.expires_at, None);
        let l =
            parse_lease(json!({"providerLeaseId": null, "expiresAt": "2030-01-01T00:00:00.000Z"}))
                .unwrap();
        assert!(l.expires_at.is_some() && l.provider_lease_id.is_none());
        assert!(parse_lease(json!({"providerLeaseId": 5})).is_err());
    }
}
