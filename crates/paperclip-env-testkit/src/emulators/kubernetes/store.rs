//! The generic object store: every resource is a JSON object keyed by
//! group, plural, namespace and name, with the metadata the API server
//! maintains (`uid`, `resourceVersion`, `creationTimestamp`, `generation`),
//! `metav1.Status` errors, a bounded event history for watches, and
//! ownerReference garbage collection.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// How many events a watch can resume from; older resource versions get 410.
const HISTORY: usize = 4096;

/// One served resource type.
#[derive(Debug, Clone)]
pub(crate) struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Subresources (`status`, `exec`, `log`).
    pub subresources: Vec<String>,
}

impl ResourceType {
    /// Whether the type is served from a CRD (the agent-sandbox and Cilium
    /// groups) rather than built into the API server.
    pub(crate) fn is_custom(&self) -> bool {
        matches!(self.group.as_str(), "agents.x-k8s.io" | "cilium.io")
    }

    fn new(group: &str, versions: &[&str], plural: &str, kind: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.to_owned(),
            versions: versions.iter().map(|v| (*v).to_owned()).collect(),
            plural: plural.to_owned(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_owned(),
            namespaced,
            short_names: Vec::new(),
            subresources: Vec::new(),
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    fn sub(mut self, names: &[&str]) -> Self {
        self.subresources = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// `pods` for the core group, `sandboxes.agents.x-k8s.io` otherwise (as
    /// the API server spells the resource in error messages).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.iter().any(|s| s == "status")
    }
}

/// The resource types the emulator serves; the agent-sandbox CRD is served
/// at `sandbox_versions` (none: the group is absent).
pub(crate) fn registry(sandbox_versions: &[String]) -> Vec<ResourceType> {
    let mut types = vec![
        ResourceType::new("", &["v1"], "namespaces", "Namespace", false)
            .short(&["ns"])
            .sub(&["status"]),
        ResourceType::new("", &["v1"], "pods", "Pod", true)
            .short(&["po"])
            .sub(&["status", "exec", "log"]),
        ResourceType::new("", &["v1"], "secrets", "Secret", true),
        ResourceType::new("", &["v1"], "configmaps", "ConfigMap", true).short(&["cm"]),
        ResourceType::new("", &["v1"], "serviceaccounts", "ServiceAccount", true).short(&["sa"]),
        ResourceType::new("", &["v1"], "services", "Service", true)
            .short(&["svc"])
            .sub(&["status"]),
        ResourceType::new("", &["v1"], "resourcequotas", "ResourceQuota", true)
            .short(&["quota"])
            .sub(&["status"]),
        ResourceType::new("", &["v1"], "limitranges", "LimitRange", true).short(&["limits"]),
        ResourceType::new("", &["v1"], "events", "Event", true).short(&["ev"]),
        ResourceType::new("batch", &["v1"], "jobs", "Job", true).sub(&["status"]),
        ResourceType::new(
            "node.k8s.io",
            &["v1"],
            "runtimeclasses",
            "RuntimeClass",
            false,
        ),
        ResourceType::new("rbac.authorization.k8s.io", &["v1"], "roles", "Role", true),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            &["v1"],
            "rolebindings",
            "RoleBinding",
            true,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            &["v1"],
            "clusterroles",
            "ClusterRole",
            false,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            &["v1"],
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        ),
        ResourceType::new(
            "networking.k8s.io",
            &["v1"],
            "networkpolicies",
            "NetworkPolicy",
            true,
        )
        .short(&["netpol"]),
        ResourceType::new(
            "cilium.io",
            &["v2"],
            "ciliumnetworkpolicies",
            "CiliumNetworkPolicy",
            true,
        )
        .short(&["cnp"])
        .sub(&["status"]),
    ];
    if !sandbox_versions.is_empty() {
        let versions: Vec<&str> = sandbox_versions.iter().map(String::as_str).collect();
        types.push(
            ResourceType::new("agents.x-k8s.io", &versions, "sandboxes", "Sandbox", true)
                .short(&["sandbox"])
                .sub(&["status"]),
        );
    }
    types
}

/// An API error, rendered as a `metav1.Status`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn status(&self) -> Value {
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code});
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }

    fn details(rt: &ResourceType, name: &str) -> Value {
        let mut details = json!({"name": name, "kind": rt.plural});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        details
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", rt.qualified()),
            details: Self::details(rt, name),
        }
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", rt.qualified()),
            details: Self::details(rt, name),
        }
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                rt.qualified()
            ),
            details: Self::details(rt, name),
        }
    }

    pub fn invalid(rt: &ResourceType, name: &str, field: &str, message: &str) -> Self {
        let mut details = Self::details(rt, name);
        details["causes"] =
            json!([{"reason": "FieldValueRequired", "message": message, "field": field}]);
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {field}: {message}", rt.kind),
            details,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn unknown_resource() -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".to_owned(),
            details: json!({}),
        }
    }

    pub fn method_not_allowed(method: &str) -> Self {
        ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!(
                "the server does not allow this method on the requested resource ({method})"
            ),
            details: json!({}),
        }
    }

    pub fn unsupported_media(content_type: &str) -> Self {
        ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {content_type:?})"
            ),
            details: json!({}),
        }
    }
}

/// Store key: group, plural, namespace ("" when cluster-scoped), name.
pub(crate) type Key = (String, String, String, String);

/// A change, for watches and the controllers.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: &'static str,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub object: Value,
}

/// Every object, plus the event history.
pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion below this are expired.
    floor: u64,
    events: tokio::sync::broadcast::Sender<Event>,
    /// When each gracefully deleted pod may go (its `deletionTimestamp`, precisely).
    due: HashMap<Key, Instant>,
}

/// What a delete did: the object as answered, and what left the store.
pub(crate) struct Deletion {
    pub answer: Value,
    pub removed: Vec<(Key, Value)>,
    /// Objects that began deleting (pods among them lose their processes).
    pub marked: Vec<(Key, Value)>,
}

/// How a delete treats what it reaches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeleteMode {
    /// Strip dependents' owner references instead of deleting them.
    pub orphan: bool,
    /// Keep the owner (finalizer `foregroundDeletion`) while dependents remain.
    pub foreground: bool,
    /// How long a deleted pod stays terminating (zero: removed at once).
    pub pod_grace: Duration,
}

/// Now, as the API server formats timestamps.
pub(crate) fn timestamp() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Store {
            objects: BTreeMap::new(),
            rv: 1000,
            history: VecDeque::new(),
            floor: 0,
            events,
            due: HashMap::new(),
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Events after `rv` of one resource type, or `None` when `rv` is older
    /// than the kept history (the watch answers 410 Gone).
    pub fn events_since(&self, rv: u64, group: &str, plural: &str) -> Option<Vec<Event>> {
        if rv < self.floor {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.rv > rv && e.group == group && e.plural == plural)
                .cloned()
                .collect(),
        )
    }

    /// Drops the event history, so any older resourceVersion reads as expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.floor = self.rv;
    }

    fn record(&mut self, kind: &'static str, key: &Key, object: &Value) {
        let event = Event {
            rv: self.rv,
            kind,
            group: key.0.clone(),
            plural: key.1.clone(),
            namespace: key.2.clone(),
            object: object.clone(),
        };
        if self.history.len() >= HISTORY
            && let Some(oldest) = self.history.pop_front()
        {
            self.floor = oldest.rv;
        }
        self.history.push_back(event.clone());
        let _ = self.events.send(event);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of one type, in one namespace or all (`None`).
    pub fn list(&self, group: &str, plural: &str, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.0 == group && k.1 == plural && namespace.is_none_or(|ns| k.2 == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<(Key, Value)> {
        self.objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn namespace_exists(&self, namespace: &str) -> bool {
        self.objects.contains_key(&(
            String::new(),
            "namespaces".to_owned(),
            String::new(),
            namespace.to_owned(),
        ))
    }

    /// Whether `namespace` exists and is being deleted.
    pub fn namespace_terminating(&self, namespace: &str) -> bool {
        self.objects
            .get(&(
                String::new(),
                "namespaces".to_owned(),
                String::new(),
                namespace.to_owned(),
            ))
            .is_some_and(|ns| ns.pointer("/metadata/deletionTimestamp").is_some())
    }

    fn dependents_of(&self, uid: &str) -> Vec<Key> {
        self.objects
            .iter()
            .filter(|(_, v)| owner_uids(v).iter().any(|u| u == uid))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn finalizers(object: &Value) -> Vec<String> {
        object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .map(|f| {
                f.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes as the API server does: an object with finalizers, a pod
    /// with a grace period, a namespace with content, or (foreground) an
    /// owner whose dependents are still going, gets `deletionTimestamp` and
    /// stays until [`Self::finish_deletions`] sees it free; anything else is
    /// removed at once. Dependents are deleted (or orphaned) the same way.
    pub fn delete_graceful(&mut self, key: &Key, mode: DeleteMode) -> Option<Deletion> {
        let current = self.objects.get(key)?.clone();
        let mut out = Deletion {
            answer: current.clone(),
            removed: Vec::new(),
            marked: Vec::new(),
        };
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return Some(out);
        }
        let uid = str_at(&current, "/metadata/uid")
            .unwrap_or_default()
            .to_owned();
        let is_pod = key.0.is_empty() && key.1 == "pods";
        let is_namespace = key.0.is_empty() && key.1 == "namespaces";
        let child_mode = DeleteMode {
            orphan: false,
            foreground: false,
            ..mode
        };
        if is_namespace {
            for inner in self.keys_in_namespace(&key.3) {
                if let Some(d) = self.delete_graceful(&inner, child_mode) {
                    out.removed.extend(d.removed);
                    out.marked.extend(d.marked);
                }
            }
        } else if !uid.is_empty() {
            for dependent in self.dependents_of(&uid) {
                if mode.orphan {
                    self.drop_owner(&dependent, &uid);
                } else if let Some(d) = self.delete_graceful(&dependent, child_mode) {
                    out.removed.extend(d.removed);
                    out.marked.extend(d.marked);
                }
            }
        }
        let mut finalizers = Self::finalizers(&current);
        let waiting_dependents = !uid.is_empty() && !self.dependents_of(&uid).is_empty();
        if mode.foreground
            && waiting_dependents
            && !finalizers.iter().any(|f| f == "foregroundDeletion")
        {
            finalizers.push("foregroundDeletion".into());
        }
        let namespace_busy = is_namespace && !self.keys_in_namespace(&key.3).is_empty();
        let pod_grace = is_pod && !mode.pod_grace.is_zero();
        if finalizers.is_empty() && !namespace_busy && !pod_grace {
            if let Some(removed) = self.remove(key) {
                out.answer = removed.clone();
                out.removed.push((key.clone(), removed));
            }
            return Some(out);
        }
        let rv = self.next_rv();
        let mut marked = current;
        let due = chrono::Utc::now()
            + chrono::Duration::from_std(if pod_grace {
                mode.pod_grace
            } else {
                Duration::ZERO
            })
            .unwrap_or_default();
        marked["metadata"]["deletionTimestamp"] =
            json!(due.format("%Y-%m-%dT%H:%M:%SZ").to_string());
        marked["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !finalizers.is_empty() {
            marked["metadata"]["finalizers"] = json!(finalizers);
        }
        if is_pod {
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(mode.pod_grace.as_secs());
            self.due
                .insert(key.clone(), Instant::now() + mode.pod_grace);
        }
        if is_namespace {
            marked["status"] = json!({"phase": "Terminating"});
        }
        self.objects.insert(key.clone(), marked.clone());
        self.record("MODIFIED", key, &marked);
        out.answer = marked.clone();
        out.marked.push((key.clone(), marked));
        Some(out)
    }

    /// Removes what graceful deletion was waiting for: owners whose
    /// dependents are gone lose `foregroundDeletion`; pods past their grace
    /// period, emptied namespaces and objects without finalizers go.
    pub fn finish_deletions(&mut self) -> Vec<(Key, Value)> {
        let deleting: Vec<(Key, Value)> = self
            .objects
            .iter()
            .filter(|(_, v)| v.pointer("/metadata/deletionTimestamp").is_some())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut removed = Vec::new();
        for (key, object) in deleting {
            let uid = str_at(&object, "/metadata/uid")
                .unwrap_or_default()
                .to_owned();
            let mut finalizers = Self::finalizers(&object);
            if finalizers.iter().any(|f| f == "foregroundDeletion")
                && self.dependents_of(&uid).is_empty()
            {
                finalizers.retain(|f| f != "foregroundDeletion");
                let rv = self.next_rv();
                if let Some(stored) = self.objects.get_mut(&key) {
                    stored["metadata"]["finalizers"] = json!(finalizers);
                    stored["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let stored = stored.clone();
                    self.record("MODIFIED", &key, &stored);
                }
            }
            if !finalizers.is_empty() {
                continue;
            }
            let is_namespace = key.0.is_empty() && key.1 == "namespaces";
            if is_namespace && !self.keys_in_namespace(&key.3).is_empty() {
                continue;
            }
            if self.due.get(&key).is_some_and(|due| Instant::now() < *due) {
                continue;
            }
            self.due.remove(&key);
            if let Some(object) = self.remove(&key) {
                removed.push((key, object));
            }
        }
        removed
    }

    /// Creates `object` (its name already resolved), filling server metadata.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        object: Value,
    ) -> Result<Value, ApiError> {
        self.create_with(rt, namespace, object, |_, _| {})
    }

    /// What [`Self::create_with`] would store, without storing it (dry run).
    pub fn preview(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut object: Value,
        finish: impl FnOnce(&mut Value, &str),
    ) -> Result<Value, ApiError> {
        let name = str_at(&object, "/metadata/name")
            .unwrap_or_default()
            .to_owned();
        let key: Key = (
            rt.group.clone(),
            rt.plural.clone(),
            namespace.to_owned(),
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        let uid = uuid::Uuid::new_v4().to_string();
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("uid".into(), json!(uid));
            metadata.insert("creationTimestamp".into(), json!(timestamp()));
            metadata.insert("generation".into(), json!(1));
            if rt.namespaced {
                metadata.insert("namespace".into(), json!(namespace));
            }
        }
        finish(&mut object, &uid);
        Ok(object)
    }

    /// Creates `object`, then lets `finish` fill defaults that need the uid.
    pub fn create_with(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut object: Value,
        finish: impl FnOnce(&mut Value, &str),
    ) -> Result<Value, ApiError> {
        let name = str_at(&object, "/metadata/name")
            .unwrap_or_default()
            .to_owned();
        let key: Key = (
            rt.group.clone(),
            rt.plural.clone(),
            namespace.to_owned(),
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        let rv = self.next_rv();
        let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        let uid = uuid::Uuid::new_v4().to_string();
        metadata.insert("uid".into(), json!(uid));
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        metadata.insert("creationTimestamp".into(), json!(timestamp()));
        metadata.insert("generation".into(), json!(1));
        metadata.remove("deletionTimestamp");
        metadata.remove("deletionGracePeriodSeconds");
        if rt.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        finish(&mut object, &uid);
        self.objects.insert(key.clone(), object.clone());
        self.record("ADDED", &key, &object);
        Ok(object)
    }

    /// Replaces the stored object; `expected_rv` (when given) must match.
    /// Server metadata is kept; `generation` moves when `spec` changes.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        key: &Key,
        mut object: Value,
        expected_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let Some(current) = self.objects.get(key) else {
            return Err(ApiError::not_found(rt, &key.3));
        };
        let current_rv = str_at(current, "/metadata/resourceVersion").unwrap_or_default();
        if let Some(expected) = expected_rv
            && !expected.is_empty()
            && expected != current_rv
        {
            return Err(ApiError::conflict(rt, &key.3));
        }
        if object == *current {
            return Ok(object);
        }
        let mut generation = current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if current.get("spec") != object.get("spec") {
            generation += 1;
        }
        let preserved: Vec<(&str, Option<Value>)> =
            ["uid", "creationTimestamp", "namespace", "deletionTimestamp"]
                .iter()
                .map(|f| (*f, current.pointer(&format!("/metadata/{f}")).cloned()))
                .collect();
        let rv = self.next_rv();
        let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        metadata.insert("name".into(), json!(key.3));
        for (field, value) in preserved {
            match value {
                Some(v) => metadata.insert(field.into(), v),
                None => metadata.remove(field),
            };
        }
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        metadata.insert("generation".into(), json!(generation));
        self.objects.insert(key.clone(), object.clone());
        self.record("MODIFIED", key, &object);
        Ok(object)
    }

    /// Sets `status` (the controllers' write); no event when nothing changed.
    pub fn set_status(&mut self, key: &Key, status: Value) -> bool {
        let Some(current) = self.objects.get(key) else {
            return false;
        };
        if current.get("status") == Some(&status) {
            return false;
        }
        let rv = self.next_rv();
        let Some(object) = self.objects.get_mut(key) else {
            return false;
        };
        object["status"] = status;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = object.clone();
        self.record("MODIFIED", key, &object);
        true
    }

    /// Removes one object (no cascade).
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        self.due.remove(key);
        let mut object = self.objects.remove(key)?;
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record("DELETED", key, &object);
        Some(object)
    }

    /// Deletes `key` and, unless `orphan`, every dependent (transitively)
    /// whose ownerReferences name a deleted uid; orphans lose those
    /// references instead. Returns the deleted object first, then the
    /// deleted dependents.
    pub fn delete_cascade(&mut self, key: &Key, orphan: bool) -> Vec<(Key, Value)> {
        let Some(root) = self.remove(key) else {
            return Vec::new();
        };
        let mut deleted = vec![(key.clone(), root)];
        let mut index = 0;
        while index < deleted.len() {
            let uid = str_at(&deleted[index].1, "/metadata/uid")
                .unwrap_or_default()
                .to_owned();
            index += 1;
            if uid.is_empty() {
                continue;
            }
            let dependents: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, v)| owner_uids(v).contains(&uid))
                .map(|(k, _)| k.clone())
                .collect();
            for dependent in dependents {
                if orphan {
                    self.drop_owner(&dependent, &uid);
                } else if let Some(object) = self.remove(&dependent) {
                    deleted.push((dependent, object));
                }
            }
        }
        deleted
    }

    fn drop_owner(&mut self, key: &Key, uid: &str) {
        let Some(mut object) = self.objects.get(key).cloned() else {
            return;
        };
        if let Some(refs) = object
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
        }
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.record("MODIFIED", key, &object);
    }

    /// Objects every one of whose owners is gone (the garbage collector's
    /// view); namespaced dependents only look for owners in their namespace.
    pub fn orphaned(&self) -> Vec<Key> {
        let uids: HashSet<String> = self
            .objects
            .values()
            .filter_map(|v| str_at(v, "/metadata/uid").map(str::to_owned))
            .collect();
        self.objects
            .iter()
            .filter(|(_, v)| {
                let owners = owner_uids(v);
                !owners.is_empty() && owners.iter().all(|u| !uids.contains(u))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every object in a namespace (for namespace deletion).
    pub fn keys_in_namespace(&self, namespace: &str) -> Vec<Key> {
        self.objects
            .keys()
            .filter(|k| k.2 == namespace)
            .cloned()
            .collect()
    }
}

/// The uids an object's ownerReferences name.
pub(crate) fn owner_uids(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The name of a `generateName` object: the prefix plus five random
/// lower-case alphanumerics, as the API server does.
pub(crate) fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let suffix: String = bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Secrets: `stringData` is write-only and merged into base64 `data`.
pub(crate) fn fold_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
            data.insert(
                k,
                json!(base64::engine::general_purpose::STANDARD.encode(text.as_bytes())),
            );
        }
    }
}
