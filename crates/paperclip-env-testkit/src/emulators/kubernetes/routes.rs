//! Request routing: discovery, the generic REST verbs on every served
//! resource, watch, pod log, and the hand-off to exec.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::faults::{Fault, Hook, HttpAction};
use super::selectors::{self, Requirement};
use super::store::{self, ApiError, Key, ResourceType};
use super::{KubeRequest, Shared};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// The namespaces a fresh cluster has.
pub(crate) fn seed(shared: &Shared) {
    let Some(rt) = shared.resource("", "namespaces").cloned() else {
        return;
    };
    let mut store = shared.store();
    for name in ["default", "kube-system"] {
        let _ = store.create(
            &rt,
            "",
            prepare_namespace(json!({"metadata": {"name": name}})),
        );
        default_service_account(shared, &mut store, name);
    }
}

/// The ServiceAccount controller's `default` account of a new namespace
/// (created with the namespace, so a pod right after it is admitted).
fn default_service_account(shared: &Shared, store: &mut store::Store, namespace: &str) {
    if let Some(sa) = shared.resource("", "serviceaccounts") {
        let _ = store.create(sa, namespace, json!({"metadata": {"name": "default"}}));
    }
}

fn prepare_namespace(mut object: Value) -> Value {
    let name = object
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null);
    if !object["metadata"]["labels"].is_object() {
        object["metadata"]["labels"] = json!({});
    }
    object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
    object["spec"] = json!({"finalizers": ["kubernetes"]});
    object["status"] = json!({"phase": "Active"});
    object
}

/// `object` with `apiVersion`/`kind` for the version it is served at.
pub(crate) fn typed(rt: &ResourceType, version: &str, mut object: Value) -> Value {
    if let Some(map) = object.as_object_mut() {
        let mut out = serde_json::Map::new();
        out.insert("apiVersion".into(), json!(rt.api_version(version)));
        out.insert("kind".into(), json!(rt.kind));
        for (k, v) in std::mem::take(map) {
            if k != "apiVersion" && k != "kind" {
                out.insert(k, v);
            }
        }
        *map = out;
    }
    // The two Sandbox versions differ in status: v1alpha1 has `replicas`,
    // v1beta1 `nodeName`.
    if rt.group == "agents.x-k8s.io"
        && let Some(status) = object.get_mut("status").and_then(Value::as_object_mut)
    {
        status.remove(if version == "v1alpha1" {
            "nodeName"
        } else {
            "replicas"
        });
    }
    // Likewise the spec: `replicas` is v1alpha1's, `operatingMode` v1beta1's.
    if rt.group == "agents.x-k8s.io"
        && let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.remove(if version == "v1alpha1" {
            "operatingMode"
        } else {
            "replicas"
        });
    }
    object
}

pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

pub(crate) fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(code, &error.status());
    if error.code == 429
        && let Ok(value) = "1".parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

fn unauthorized() -> Response {
    error_response(&ApiError {
        code: 401,
        reason: "Unauthorized",
        message: "Unauthorized".into(),
        details: Value::Null,
    })
}

/// What a path names.
enum Target {
    Version,
    Discovery(Value),
    Collection {
        rt: ResourceType,
        version: String,
        namespace: Option<String>,
    },
    Object {
        rt: ResourceType,
        version: String,
        namespace: String,
        name: String,
        sub: Option<String>,
    },
}

fn resource_list(shared: &Shared, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for rt in shared
        .types
        .iter()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
    {
        resources.push(json!({"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "shortNames": rt.short_names,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}));
        for sub in &rt.subresources {
            let (kind, verbs) = match sub.as_str() {
                "exec" => ("PodExecOptions", json!(["create", "get"])),
                "log" => ("Pod", json!(["get"])),
                _ => (rt.kind.as_str(), json!(["get", "patch", "update"])),
            };
            resources.push(
                json!({"name": format!("{}/{sub}", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": kind, "verbs": verbs}),
            );
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn api_group(shared: &Shared, group: &str) -> Option<Value> {
    let mut versions: Vec<String> = Vec::new();
    for rt in shared.types.iter().filter(|t| t.group == group) {
        for v in &rt.versions {
            if !versions.contains(v) {
                versions.push(v.clone());
            }
        }
    }
    let preferred = versions.first()?.clone();
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
        "preferredVersion": {"groupVersion": format!("{group}/{preferred}"), "version": preferred}}),
    )
}

fn resolve(shared: &Shared, path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segments.as_slice() {
        ["version"] => return Ok(Target::Version),
        ["api"] => {
            return Ok(Target::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.base.split("://").nth(1).unwrap_or_default()}]}),
            ));
        }
        ["apis"] => {
            let mut groups = Vec::new();
            let mut seen = Vec::new();
            for rt in shared.types.iter().filter(|t| !t.group.is_empty()) {
                if !seen.contains(&rt.group) {
                    seen.push(rt.group.clone());
                    if let Some(g) = api_group(shared, &rt.group) {
                        groups.push(g);
                    }
                }
            }
            return Ok(Target::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ));
        }
        ["api", "v1"] => return Ok(Target::Discovery(resource_list(shared, "", "v1"))),
        ["apis", group] => {
            return api_group(shared, group)
                .map(Target::Discovery)
                .ok_or_else(ApiError::unknown_resource);
        }
        ["apis", group, version] => {
            if api_group(shared, group).is_none_or(|g| {
                !g["versions"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|v| v["version"] == *version))
            }) {
                return Err(ApiError::unknown_resource());
            }
            return Ok(Target::Discovery(resource_list(shared, group, version)));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (group, version, rest),
        _ => return Err(ApiError::unknown_resource()),
    };
    let find = |plural: &str| {
        shared
            .types
            .iter()
            .find(|t| {
                t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
            })
            .cloned()
    };
    let version = version.to_owned();
    if let ["namespaces", namespace, plural, tail @ ..] = rest
        && let Some(rt) = find(plural).filter(|t| t.namespaced)
    {
        let namespace = (*namespace).to_owned();
        return match tail {
            [] => Ok(Target::Collection {
                rt,
                version,
                namespace: Some(namespace),
            }),
            [name] => Ok(Target::Object {
                rt,
                version,
                namespace,
                name: (*name).to_owned(),
                sub: None,
            }),
            [name, sub] if rt.subresources.iter().any(|s| s == sub) => Ok(Target::Object {
                rt,
                version,
                namespace,
                name: (*name).to_owned(),
                sub: Some((*sub).to_owned()),
            }),
            _ => Err(ApiError::unknown_resource()),
        };
    }
    match rest {
        [plural] => {
            let rt = find(plural).ok_or_else(ApiError::unknown_resource)?;
            Ok(Target::Collection {
                rt,
                version,
                namespace: None,
            })
        }
        [plural, name, tail @ ..] => {
            let rt = find(plural)
                .filter(|t| !t.namespaced)
                .ok_or_else(ApiError::unknown_resource)?;
            let sub = match tail {
                [] => None,
                [sub] if rt.subresources.iter().any(|s| s == sub) => Some((*sub).to_owned()),
                _ => return Err(ApiError::unknown_resource()),
            };
            Ok(Target::Object {
                rt,
                version,
                namespace: String::new(),
                name: (*name).to_owned(),
                sub,
            })
        }
        _ => Err(ApiError::unknown_resource()),
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(KubeRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: serde_json::from_slice(&bytes).ok(),
        });
    if !authorized(&shared, &parts.headers) {
        return unauthorized();
    }
    match shared.faults.take_http(parts.method.as_str(), &path) {
        Some(HttpAction::Status(code)) => {
            return error_response(&ApiError {
                code,
                reason: match code {
                    429 => "TooManyRequests",
                    503 => "ServiceUnavailable",
                    504 => "Timeout",
                    _ => "InternalError",
                },
                message: format!("injected fault: HTTP {code}"),
                details: Value::Null,
            });
        }
        Some(HttpAction::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    if !bytes.is_empty()
        && content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/vnd.kubernetes.protobuf"))
    {
        return error_response(&ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {:?}; this emulator speaks JSON only)",
                content_type.as_deref().unwrap_or_default()
            ),
            details: json!({}),
        });
    }
    let params = query_pairs(query.as_deref().unwrap_or_default());
    let target = match resolve(&shared, &path) {
        Ok(target) => target,
        Err(error) => return error_response(&error),
    };
    let result = dispatch(
        &shared,
        &mut parts,
        target,
        &params,
        content_type.as_deref(),
        &bytes,
    )
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    if path.starts_with("/apis/agents.x-k8s.io/v1alpha1/")
        && shared
            .resource("agents.x-k8s.io", "sandboxes")
            .is_some_and(|rt| rt.versions.iter().any(|v| v == "v1beta1"))
        && let Ok(value) = "299 - \"agents.x-k8s.io/v1alpha1 Sandbox is deprecated; use agents.x-k8s.io/v1beta1 Sandbox instead\"".parse()
    {
        response.headers_mut().insert("warning", value);
    }
    response
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| token == shared.token)
}

/// `dryRun=All`: validate and admit, answer as if written, persist nothing.
fn dry_run(params: &[(String, String)]) -> bool {
    params.iter().any(|(k, v)| k == "dryRun" && v == "All")
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn dispatch(
    shared: &Arc<Shared>,
    parts: &mut Parts,
    target: Target,
    params: &[(String, String)],
    content_type: Option<&str>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let method = parts.method.clone();
    match target {
        Target::Version => Ok(json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-paperclip-emulator",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
                "platform": "linux/amd64"}),
        )),
        Target::Discovery(value) if method == Method::GET => {
            Ok(json_response(StatusCode::OK, &value))
        }
        Target::Discovery(_) => Err(ApiError::method_not_allowed(method.as_str())),
        Target::Collection {
            rt,
            version,
            namespace,
        } => match method {
            Method::GET => {
                let watch = param(params, "watch").is_some_and(|w| w == "true" || w == "1");
                if watch {
                    watch_stream(shared, &rt, &version, namespace.as_deref(), params)
                } else {
                    list(shared, &rt, &version, namespace.as_deref(), params)
                }
            }
            Method::POST => {
                let namespace = match (rt.namespaced, namespace) {
                    (true, Some(ns)) => ns,
                    (false, _) => String::new(),
                    (true, None) => return Err(ApiError::method_not_allowed("POST")),
                };
                let object = parse_body(body)?;
                create(shared, &rt, &version, &namespace, object, dry_run(params))
                    .map(|o| json_response(StatusCode::CREATED, &o))
            }
            Method::DELETE => {
                let objects =
                    delete_collection(shared, &rt, &version, namespace.as_deref(), params, body)?;
                Ok(json_response(StatusCode::OK, &objects))
            }
            _ => Err(ApiError::method_not_allowed(method.as_str())),
        },
        Target::Object {
            rt,
            version,
            namespace,
            name,
            sub,
        } => {
            let key: Key = (
                rt.group.clone(),
                rt.plural.clone(),
                namespace.clone(),
                name.clone(),
            );
            match (method.clone(), sub.as_deref()) {
                (Method::GET | Method::POST, Some("exec")) => {
                    super::exec::exec(shared.clone(), parts, &namespace, &name, params).await
                }
                (Method::GET, Some("log")) => {
                    super::exec::log(shared, &namespace, &name, params).await
                }
                (Method::GET, None | Some("status")) => {
                    let object = shared
                        .store()
                        .get(&key)
                        .cloned()
                        .ok_or_else(|| ApiError::not_found(&rt, &name))?;
                    Ok(json_response(StatusCode::OK, &typed(&rt, &version, object)))
                }
                (Method::PUT, sub @ (None | Some("status"))) => {
                    let object = parse_body(body)?;
                    replace(
                        shared,
                        &rt,
                        &version,
                        &key,
                        object,
                        sub.is_some(),
                        dry_run(params),
                    )
                    .map(|o| json_response(StatusCode::OK, &o))
                }
                (Method::PATCH, sub @ (None | Some("status"))) => patch(
                    shared,
                    &rt,
                    &version,
                    &key,
                    content_type.unwrap_or_default(),
                    body,
                    sub.is_some(),
                    dry_run(params),
                ),
                (Method::DELETE, None) => {
                    let deleted = delete(shared, &rt, &key, params, body)?;
                    Ok(json_response(
                        StatusCode::OK,
                        &typed(&rt, &version, deleted),
                    ))
                }
                _ => Err(ApiError::method_not_allowed(method.as_str())),
            }
        }
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    Ok(value)
}

fn selectors_of(
    params: &[(String, String)],
) -> Result<(Vec<Requirement>, Vec<Requirement>), ApiError> {
    let labels = match param(params, "labelSelector") {
        Some(s) => selectors::parse_labels(s).map_err(ApiError::bad_request)?,
        None => Vec::new(),
    };
    let fields = match param(params, "fieldSelector") {
        Some(s) => selectors::parse_fields(s).map_err(ApiError::bad_request)?,
        None => Vec::new(),
    };
    Ok((labels, fields))
}

fn list(
    shared: &Shared,
    rt: &ResourceType,
    version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors_of(params)?;
    let store = shared.store();
    let items: Vec<Value> = store
        .list(&rt.group, &rt.plural, namespace)
        .into_iter()
        .filter(|o| selectors::labels_match(&labels, o) && selectors::fields_match(&fields, o))
        .map(|o| typed(rt, version, o))
        .collect();
    let body = json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(version),
        "metadata": {"resourceVersion": store.resource_version().to_string()}, "items": items});
    Ok(json_response(StatusCode::OK, &body))
}

fn create(
    shared: &Shared,
    rt: &ResourceType,
    version: &str,
    namespace: &str,
    mut object: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if let Some(kind) = object.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({})",
            object
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            rt.api_version(version)
        )));
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if let Some(ns) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        && rt.namespaced
        && !ns.is_empty()
        && ns != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => match object
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(prefix) if !prefix.is_empty() => store::generated_name(prefix),
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
        },
    };
    object["metadata"]["name"] = json!(name);
    if rt.namespaced
        && !shared.store().namespace_exists(namespace)
        && let Some(ns_rt) = shared.resource("", "namespaces")
    {
        return Err(ApiError::not_found(ns_rt, namespace));
    }
    if rt.namespaced && shared.store().namespace_terminating(namespace) {
        return Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                rt.qualified()
            ),
            details: json!({"name": name, "kind": rt.plural, "causes": [{"reason": "NamespaceTerminating",
                "message": format!("namespace {namespace} is being terminated"), "field": "metadata.namespace"}]}),
        });
    }
    if let Some(Fault::CreateConflict) = shared.faults.take(&Hook::Create(rt.plural.clone())) {
        return Err(ApiError::already_exists(rt, &name));
    }
    if rt.has_status()
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
        // A built-in type's status struct is always serialized, empty at
        // first (`"status": {}`); a custom resource has none until set.
        if !rt.is_custom() {
            map.insert("status".into(), json!({}));
        }
    }
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => store::fold_string_data(&mut object),
        ("", "namespaces") => object = prepare_namespace(object),
        ("", "pods") => {
            object["status"] = json!({"phase": "Pending", "qosClass": "Burstable"});
        }
        _ => {}
    }
    let mut store = shared.store();
    if rt.group.is_empty() && rt.plural == "pods" {
        super::admission::default_pod(&store, namespace, &mut object);
    }
    if rt.group == "agents.x-k8s.io" && rt.plural == "sandboxes" {
        super::validation::prune_and_default_sandbox(version, &mut object);
    }
    super::validation::validate(rt, &object)?;
    if rt.group.is_empty() && rt.plural == "pods" {
        super::admission::admit_pod(&store, namespace, &mut object)?;
    }
    let is_job = rt.group == "batch" && rt.plural == "jobs";
    let finish = |object: &mut Value, uid: &str| {
        if is_job {
            super::validation::default_job(object, uid);
        }
    };
    if dry_run {
        return Ok(typed(
            rt,
            version,
            store.preview(rt, namespace, object, finish)?,
        ));
    }
    let created = store.create_with(rt, namespace, object, finish)?;
    if rt.group.is_empty()
        && rt.plural == "namespaces"
        && let Some(name) = created.pointer("/metadata/name").and_then(Value::as_str)
    {
        default_service_account(shared, &mut store, name);
    }
    Ok(typed(rt, version, created))
}

/// Keeps what a write may not change: the status for a main-resource write
/// of a type with a status subresource; everything but the status for a
/// `status` write.
fn restrict(rt: &ResourceType, current: &Value, mut incoming: Value, status_only: bool) -> Value {
    if status_only {
        let mut out = current.clone();
        out["status"] = incoming.get("status").cloned().unwrap_or(Value::Null);
        if let Some(rv) = incoming.pointer("/metadata/resourceVersion").cloned() {
            out["metadata"]["resourceVersion"] = rv;
        }
        out
    } else {
        if rt.has_status() {
            match current.get("status") {
                Some(status) => incoming["status"] = status.clone(),
                None => {
                    if let Some(map) = incoming.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        if rt.group.is_empty() && rt.plural == "secrets" {
            store::fold_string_data(&mut incoming);
        }
        incoming
    }
}

fn replace(
    shared: &Shared,
    rt: &ResourceType,
    version: &str,
    key: &Key,
    mut object: Value,
    status_only: bool,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str)
        && name != key.3
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.3
        )));
    }
    let mut store = shared.store();
    let current = store
        .get(key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt, &key.3))?;
    let expected = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut object = restrict(rt, &current, object, status_only);
    if rt.group == "agents.x-k8s.io" && rt.plural == "sandboxes" && !status_only {
        super::validation::prune_and_default_sandbox(version, &mut object);
    }
    super::validation::validate(rt, &object)?;
    if dry_run {
        return Ok(typed(rt, version, object));
    }
    let updated = store.update(rt, key, object, expected.as_deref())?;
    drop(store);
    shared.after_update();
    Ok(typed(rt, version, updated))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    version: &str,
    key: &Key,
    content_type: &str,
    body: &Bytes,
    status_only: bool,
    dry_run: bool,
) -> Result<Response, ApiError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let document: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })?;
    let current = shared.store().get(key).cloned();
    let Some(current) = current else {
        if media == "application/apply-patch+yaml" {
            let object = create(shared, rt, version, &key.2, document, dry_run)?;
            return Ok(json_response(StatusCode::CREATED, &object));
        }
        return Err(ApiError::not_found(rt, &key.3));
    };
    let mut patched = current.clone();
    match media {
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => json_patch::merge(&mut patched, &document),
        "application/json-patch+json" => {
            let operations: json_patch::Patch = serde_json::from_value(document.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut patched, &operations).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!(
                    "the server rejected our request due to an error in our request: {e}"
                ),
                details: Value::Null,
            })?;
        }
        other => return Err(ApiError::unsupported_media(other)),
    }
    let expected = document
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    let mut object = restrict(rt, &current, patched, status_only);
    if rt.group == "agents.x-k8s.io" && rt.plural == "sandboxes" && !status_only {
        super::validation::prune_and_default_sandbox(version, &mut object);
    }
    super::validation::validate(rt, &object)?;
    if dry_run {
        return Ok(json_response(StatusCode::OK, &typed(rt, version, object)));
    }
    let updated = shared
        .store()
        .update(rt, key, object, expected.as_deref())?;
    shared.after_update();
    Ok(json_response(StatusCode::OK, &typed(rt, version, updated)))
}

/// The propagation policy of a delete: query first, then the
/// `DeleteOptions` body; Jobs orphan by default, like the real API.
fn orphans(rt: &ResourceType, params: &[(String, String)], options: &Value) -> bool {
    let policy = param(params, "propagationPolicy")
        .map(str::to_owned)
        .or_else(|| {
            options
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    match policy.as_deref() {
        Some("Orphan") => true,
        Some(_) => false,
        None => {
            options.get("orphanDependents").and_then(Value::as_bool) == Some(true)
                || (param(params, "orphanDependents") == Some("true"))
                || (options.get("orphanDependents").is_none()
                    && rt.group == "batch"
                    && rt.plural == "jobs")
        }
    }
}

fn delete(
    shared: &Shared,
    rt: &ResourceType,
    key: &Key,
    params: &[(String, String)],
    body: &Bytes,
) -> Result<Value, ApiError> {
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let orphan = orphans(rt, params, &options);
    let foreground = param(params, "propagationPolicy")
        .or_else(|| options.get("propagationPolicy").and_then(Value::as_str))
        == Some("Foreground");
    let deletion = {
        let mut store = shared.store();
        let current = store
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, &key.3))?;
        for field in ["uid", "resourceVersion"] {
            if let Some(expected) = options
                .pointer(&format!("/preconditions/{field}"))
                .and_then(Value::as_str)
                && current
                    .pointer(&format!("/metadata/{field}"))
                    .and_then(Value::as_str)
                    != Some(expected)
            {
                return Err(ApiError::conflict(rt, &key.3));
            }
        }
        if dry_run(params) {
            return Ok(current);
        }
        let grace = param(params, "gracePeriodSeconds")
            .and_then(|g| g.parse::<u64>().ok())
            .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_u64));
        let pod_grace = match grace {
            Some(0) => Duration::ZERO,
            Some(seconds) => shared
                .opts
                .pod_termination
                .min(Duration::from_secs(seconds)),
            None => shared.opts.pod_termination,
        };
        store.delete_graceful(
            key,
            store::DeleteMode {
                orphan,
                foreground,
                pod_grace,
            },
        )
    };
    let deletion = deletion.ok_or_else(|| ApiError::not_found(rt, &key.3))?;
    shared.after_mark(&deletion.marked);
    shared.after_delete(&deletion.removed);
    Ok(deletion.answer)
}

fn delete_collection(
    shared: &Shared,
    rt: &ResourceType,
    version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
    body: &Bytes,
) -> Result<Value, ApiError> {
    let (labels, fields) = selectors_of(params)?;
    let keys: Vec<Key> = shared
        .store()
        .list(&rt.group, &rt.plural, namespace)
        .into_iter()
        .filter(|o| selectors::labels_match(&labels, o) && selectors::fields_match(&fields, o))
        .filter_map(|o| {
            Some((
                rt.group.clone(),
                rt.plural.clone(),
                o.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                o.pointer("/metadata/name")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    let mut items = Vec::new();
    for key in keys {
        if let Ok(object) = delete(shared, rt, &key, params, body) {
            items.push(typed(rt, version, object));
        }
    }
    Ok(
        json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(version),
        "metadata": {"resourceVersion": shared.store().resource_version().to_string()}, "items": items}),
    )
}

fn watch_event(kind: &str, object: Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone_event(rv: &str) -> Bytes {
    watch_event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410}),
    )
}

fn watch_stream(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors_of(params)?;
    let since = param(params, "resourceVersion").unwrap_or("0").to_owned();
    let timeout = param(params, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let namespace = namespace.map(str::to_owned);
    let selected = {
        let labels = labels.clone();
        let fields = fields.clone();
        let namespace = namespace.clone();
        move |event_ns: &str, object: &Value| {
            namespace.as_deref().is_none_or(|ns| ns == event_ns)
                && selectors::labels_match(&labels, object)
                && selectors::fields_match(&fields, object)
        }
    };
    let ok = |first: Vec<Bytes>, live: Option<tokio::sync::broadcast::Receiver<store::Event>>| {
        let rt = rt.clone();
        let version = version.to_owned();
        let selected = selected.clone();
        let shutdown = shared.shutdown.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let live_stream = futures::stream::unfold(live, move |receiver| {
            let rt = rt.clone();
            let version = version.clone();
            let selected = selected.clone();
            let mut shutdown = shutdown.clone();
            async move {
                let mut receiver = receiver?;
                loop {
                    let event = tokio::select! {
                        event = receiver.recv() => event,
                        _ = tokio::time::sleep_until(deadline) => return None,
                        _ = super::stopped(&mut shutdown) => return None,
                    };
                    match event {
                        Ok(e)
                            if e.group == rt.group
                                && e.plural == rt.plural
                                && selected(&e.namespace, &e.object) =>
                        {
                            let object = typed(&rt, &version, e.object);
                            return Some((
                                Ok::<Bytes, std::io::Error>(watch_event(e.kind, object)),
                                Some(receiver),
                            ));
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            return Some((Ok(gone_event("lagged")), None));
                        }
                        Err(_) => return None,
                    }
                }
            }
        });
        let stream = futures::StreamExt::chain(
            futures::stream::iter(first.into_iter().map(Ok::<Bytes, std::io::Error>)),
            live_stream,
        );
        (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("transfer-encoding", "chunked"),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    };
    if shared.faults.take(&Hook::Watch) == Some(Fault::WatchGone) {
        return Ok(ok(vec![gone_event(&since)], None));
    }
    let store = shared.store();
    let receiver = store.subscribe();
    let first: Vec<Bytes> = if since.is_empty() || since == "0" {
        store
            .list(&rt.group, &rt.plural, namespace.as_deref())
            .into_iter()
            .filter(|o| selectors::labels_match(&labels, o) && selectors::fields_match(&fields, o))
            .map(|o| watch_event("ADDED", typed(rt, version, o)))
            .collect()
    } else {
        let Ok(rv) = since.parse::<u64>() else {
            return Err(ApiError::bad_request(format!(
                "invalid resource version: {since}"
            )));
        };
        match store.events_since(rv, &rt.group, &rt.plural) {
            Some(events) => events
                .into_iter()
                .filter(|e| selected(&e.namespace, &e.object))
                .map(|e| watch_event(e.kind, typed(rt, version, e.object)))
                .collect(),
            None => {
                drop(store);
                return Ok(ok(vec![gone_event(&since)], None));
            }
        }
    };
    drop(store);
    Ok(ok(first, Some(receiver)))
}
