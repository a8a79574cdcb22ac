//! The control loop: garbage collector, agent-sandbox Sandbox controller,
//! Job controller and a kubelet simulation, reconciled every few
//! milliseconds until the emulator stops.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::exec::{self, PodContext};
use super::faults::{Fault, Hook};
use super::store::{self, Key, timestamp};
use super::{MainState, PodRuntime, Shared};

const TICK: Duration = Duration::from_millis(10);
const SANDBOX_GROUP: &str = "agents.x-k8s.io";
const NODE: &str = "emulator-node";

pub(crate) fn spawn(shared: Arc<Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => reconcile(&shared),
                _ = super::stopped(&mut shutdown) => break,
            }
        }
    });
}

fn reconcile(shared: &Arc<Shared>) {
    collect_garbage(shared);
    sandboxes(shared);
    jobs(shared);
    kubelet(shared);
    quotas(shared);
}

fn collect_garbage(shared: &Shared) {
    let finished = shared.store().finish_deletions();
    shared.after_delete(&finished);
    loop {
        let deleted = {
            let mut store = shared.store();
            let orphaned = store.orphaned();
            if orphaned.is_empty() {
                return;
            }
            let mut deleted = Vec::new();
            for key in orphaned {
                deleted.extend(store.delete_cascade(&key, false));
            }
            deleted
        };
        shared.after_delete(&deleted);
    }
}

/// Whether the object behind `key` still exists with `uid` (under the lock).
fn still_current(store: &super::store::Store, key: &Key, uid: &str) -> bool {
    store
        .get(key)
        .is_some_and(|object| str_at(object, "/metadata/uid") == uid)
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// FNV-1a 32-bit of the sandbox name, as 8 hex digits (agent-sandbox's
/// `sandbox-name-hash` label).
pub(crate) fn name_hash(name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

fn key(group: &str, plural: &str, namespace: &str, name: &str) -> Key {
    (group.into(), plural.into(), namespace.into(), name.into())
}

/// A condition, keeping `lastTransitionTime` when status and reason hold.
fn condition(previous: &Value, kind: &str, status: &str, reason: &str, message: &str) -> Value {
    let old = previous
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind));
    let since = match old {
        Some(c) if c["status"] == status && c["reason"] == reason => {
            c["lastTransitionTime"].clone()
        }
        _ => json!(timestamp()),
    };
    json!({"type": kind, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": since, "observedGeneration": 1})
}

/// What a controller's pod create meets: LimitRanger defaults, full pod
/// validation, then admission.
fn admit_new_pod(
    shared: &Shared,
    store: &store::Store,
    namespace: &str,
    pod: &mut Value,
) -> Result<(), store::ApiError> {
    super::admission::default_pod(store, namespace, pod);
    if let Some(pods_rt) = shared.resource("", "pods") {
        super::validation::validate(pods_rt, pod)?;
    }
    super::admission::admit_pod(store, namespace, pod)
}

/// A `Warning` Event about `object`, once per reason and message (as the
/// event recorder's aggregation leaves one visible entry).
#[allow(clippy::too_many_arguments)]
fn record_event(
    shared: &Shared,
    store: &mut store::Store,
    object: &Value,
    api_version: &str,
    kind: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let Some(rt) = shared.resource("", "events") else {
        return;
    };
    let namespace = str_at(object, "/metadata/namespace");
    let uid = str_at(object, "/metadata/uid");
    let seen = store.list("", "events", Some(namespace)).iter().any(|e| {
        str_at(e, "/involvedObject/uid") == uid
            && str_at(e, "/reason") == reason
            && str_at(e, "/message") == message
    });
    if seen {
        return;
    }
    let now = timestamp();
    let event = json!({"metadata": {"name": store::generated_name(&format!("{}.", str_at(object, "/metadata/name"))),
            "namespace": namespace},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "name": str_at(object, "/metadata/name"),
            "namespace": namespace, "uid": uid},
        "reason": reason, "message": message, "type": "Warning", "count": 1,
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": now, "lastTimestamp": now});
    let _ = store.create(rt, namespace, event);
}

/// The quota controller: `status.hard` and `status.used` of every quota.
fn quotas(shared: &Shared) {
    let mut store = shared.store();
    for quota in store.list("", "resourcequotas", None) {
        let namespace = str_at(&quota, "/metadata/namespace").to_owned();
        let name = str_at(&quota, "/metadata/name").to_owned();
        let Some(hard) = quota
            .pointer("/spec/hard")
            .and_then(Value::as_object)
            .cloned()
        else {
            continue;
        };
        let used: serde_json::Map<String, Value> =
            super::admission::quota_used(&store, &namespace, &hard)
                .into_iter()
                .map(|(r, v)| {
                    let text = super::validation::format_quantity(&r, v);
                    (r, json!(text))
                })
                .collect();
        store.set_status(
            &key("", "resourcequotas", &namespace, &name),
            json!({"hard": hard, "used": used}),
        );
    }
}

fn sandboxes(shared: &Shared) {
    let Some(rt) = shared.resource(SANDBOX_GROUP, "sandboxes").cloned() else {
        return;
    };
    let Some(storage_version) = rt.versions.first().cloned() else {
        return;
    };
    let all = shared.store().list(SANDBOX_GROUP, "sandboxes", None);
    for sandbox in all {
        let namespace = str_at(&sandbox, "/metadata/namespace").to_owned();
        let name = str_at(&sandbox, "/metadata/name").to_owned();
        let uid = str_at(&sandbox, "/metadata/uid").to_owned();
        let pod_name = sandbox
            .pointer("/metadata/annotations/agents.x-k8s.io~1pod-name")
            .and_then(Value::as_str)
            .unwrap_or(&name)
            .to_owned();
        let hash = name_hash(&name);
        let pod_key = key("", "pods", &namespace, &pod_name);
        let sandbox_key = key(SANDBOX_GROUP, "sandboxes", &namespace, &name);
        if sandbox
            .pointer("/spec/shutdownTime")
            .and_then(Value::as_str)
            .and_then(parse_time)
            .is_some_and(|at| chrono::Utc::now() >= at)
        {
            expire(shared, &sandbox, &sandbox_key, &pod_key);
            continue;
        }
        let mut store = shared.store();
        // The list above is a snapshot: skip a Sandbox deleted (or replaced)
        // since, so no pod is created for an owner that is already gone.
        if !still_current(&store, &sandbox_key, &uid)
            || sandbox.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let pod = match store.get(&pod_key).cloned() {
            Some(pod) => Some(pod),
            None => {
                let template = sandbox
                    .pointer("/spec/podTemplate")
                    .cloned()
                    .unwrap_or(json!({}));
                let mut labels = serde_json::Map::new();
                for (k, v) in template
                    .pointer("/metadata/labels")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if !k.starts_with("agents.x-k8s.io/") {
                        labels.insert(k.clone(), v.clone());
                    }
                }
                let propagated_labels = sorted_keys(&labels);
                labels.insert("agents.x-k8s.io/sandbox-name-hash".into(), json!(hash));
                let mut annotations = template
                    .pointer("/metadata/annotations")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let propagated_annotations = sorted_keys(&annotations);
                annotations.insert(
                    "agents.x-k8s.io/propagated-labels".into(),
                    json!(propagated_labels),
                );
                annotations.insert(
                    "agents.x-k8s.io/propagated-annotations".into(),
                    json!(propagated_annotations),
                );
                let pod = json!({
                    "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                        "annotations": annotations,
                        "ownerReferences": [{"apiVersion": format!("{SANDBOX_GROUP}/{storage_version}"),
                            "kind": "Sandbox", "name": name, "uid": uid, "controller": true,
                            "blockOwnerDeletion": true}]},
                    "spec": template.get("spec").cloned().unwrap_or(json!({})),
                    "status": {"phase": "Pending", "qosClass": "Burstable"},
                });
                let mut pod = pod;
                match admit_new_pod(shared, &store, &namespace, &mut pod) {
                    Ok(()) => shared
                        .resource("", "pods")
                        .and_then(|pods_rt| store.create(pods_rt, &namespace, pod).ok()),
                    Err(error) => {
                        let previous = sandbox.get("status").cloned().unwrap_or(json!({}));
                        let message = format!("failed to create pod: {}", error.message);
                        let status = json!({"conditions": [condition(&previous, "Ready", "False",
                            "ReconcilerError", &message)]});
                        store.set_status(&sandbox_key, status);
                        record_event(
                            shared,
                            &mut store,
                            &sandbox,
                            &format!("{SANDBOX_GROUP}/{storage_version}"),
                            "Sandbox",
                            "FailedCreate",
                            &format!("Error creating: {}", error.message),
                            "sandbox-controller",
                        );
                        continue;
                    }
                }
            }
        };
        let previous = sandbox.get("status").cloned().unwrap_or(json!({}));
        let phase = pod
            .as_ref()
            .map(|p| str_at(p, "/status/phase").to_owned())
            .unwrap_or_default();
        let pod_ready = pod.as_ref().is_some_and(|p| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        });
        let ips: Vec<Value> = pod
            .as_ref()
            .and_then(|p| p.pointer("/status/podIPs"))
            .and_then(Value::as_array)
            .map(|ips| ips.iter().filter_map(|i| i.get("ip").cloned()).collect())
            .unwrap_or_default();
        let mut conditions = Vec::new();
        let pod_deleting = pod
            .as_ref()
            .is_some_and(|p| p.pointer("/metadata/deletionTimestamp").is_some());
        match phase.as_str() {
            _ if pod_deleting => conditions.push(condition(
                &previous,
                "Ready",
                "False",
                "DependenciesNotReady",
                &format!("Pod {pod_name} is being deleted"),
            )),
            "Running" if pod_ready && !ips.is_empty() => {
                conditions.push(condition(
                    &previous,
                    "Ready",
                    "True",
                    "DependenciesReady",
                    "Pod is Ready",
                ));
            }
            "Failed" | "Succeeded" => {
                let reason = if phase == "Failed" {
                    "PodFailed"
                } else {
                    "PodSucceeded"
                };
                let message = format!(
                    "Pod {pod_name} {}",
                    if phase == "Failed" {
                        "failed"
                    } else {
                        "succeeded"
                    }
                );
                conditions.push(condition(&previous, "Ready", "False", reason, &message));
                conditions.push(condition(&previous, "Finished", "True", reason, &message));
            }
            "" => conditions.push(condition(
                &previous,
                "Ready",
                "False",
                "DependenciesNotReady",
                "Pod does not exist",
            )),
            other => conditions.push(condition(
                &previous,
                "Ready",
                "False",
                "DependenciesNotReady",
                &format!("Pod exists with phase: {other}"),
            )),
        }
        if let Some(scheduled) = pod.as_ref().and_then(|p| {
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
        }) {
            conditions.push(condition(
                &previous,
                "PodScheduled",
                scheduled["status"].as_str().unwrap_or("Unknown"),
                scheduled["reason"].as_str().unwrap_or("Scheduled"),
                scheduled["message"].as_str().unwrap_or_default(),
            ));
        }
        let mut status = json!({"conditions": conditions,
            "selector": format!("agents.x-k8s.io/sandbox-name-hash={hash}"), "replicas": 1});
        if !ips.is_empty() {
            status["podIPs"] = json!(ips);
        }
        if phase == "Running" {
            status["nodeName"] = json!(NODE);
        }
        store.set_status(&sandbox_key, status);
    }
}

/// At `shutdownTime` the controller deletes the pod, then deletes the
/// Sandbox (`shutdownPolicy: Delete`) or keeps it `Ready=False
/// SandboxExpired` (`Retain`, the default).
fn expire(shared: &Shared, sandbox: &Value, sandbox_key: &Key, pod_key: &Key) {
    let delete = sandbox
        .pointer("/spec/shutdownPolicy")
        .and_then(Value::as_str)
        == Some("Delete");
    let deleted = {
        let mut store = shared.store();
        let mut deleted = store.delete_cascade(pod_key, false);
        if delete {
            deleted.extend(store.delete_cascade(sandbox_key, false));
        } else {
            let previous = sandbox.get("status").cloned().unwrap_or(json!({}));
            let status = json!({"conditions": [condition(&previous, "Ready", "False", "SandboxExpired",
                "Sandbox has expired")], "replicas": 0});
            store.set_status(sandbox_key, status);
        }
        deleted
    };
    shared.after_delete(&deleted);
}

fn sorted_keys(map: &serde_json::Map<String, Value>) -> String {
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys.join(",")
}

fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn jobs(shared: &Shared) {
    let all = shared.store().list("batch", "jobs", None);
    for job in all {
        let namespace = str_at(&job, "/metadata/namespace").to_owned();
        let name = str_at(&job, "/metadata/name").to_owned();
        let uid = str_at(&job, "/metadata/uid").to_owned();
        let job_key = key("batch", "jobs", &namespace, &name);
        let previous = job.get("status").cloned().unwrap_or(json!({}));
        let finished = previous
            .get("conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True"
                })
            });
        if finished {
            let finished_at = previous
                .get("completionTime")
                .and_then(Value::as_str)
                .or_else(|| {
                    previous
                        .get("conditions")
                        .and_then(Value::as_array)
                        .and_then(|cs| cs.iter().find(|c| c["type"] == "Failed"))
                        .and_then(|c| c["lastTransitionTime"].as_str())
                })
                .and_then(parse_time);
            let expired = job
                .pointer("/spec/ttlSecondsAfterFinished")
                .and_then(Value::as_i64)
                .zip(finished_at)
                .is_some_and(|(ttl, at)| chrono::Utc::now() >= at + chrono::Duration::seconds(ttl));
            if expired {
                // The TTL-after-finished controller deletes in the background.
                let deleted = shared.store().delete_cascade(&job_key, false);
                shared.after_delete(&deleted);
            }
            continue;
        }
        let mut store = shared.store();
        if !still_current(&store, &job_key, &uid)
            || job.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let pods: Vec<Value> = store
            .list("", "pods", Some(&namespace))
            .into_iter()
            .filter(|p| store::owner_uids(p).contains(&uid))
            .collect();
        let mut status = previous.clone();
        if status.get("startTime").is_none() {
            status["startTime"] = json!(timestamp());
        }
        if pods.is_empty() && previous.get("active").is_none() {
            let template = job.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let mut labels = template
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            for (k, v) in [
                ("job-name", &name),
                ("batch.kubernetes.io/job-name", &name),
                ("controller-uid", &uid),
                ("batch.kubernetes.io/controller-uid", &uid),
            ] {
                labels.insert(k.into(), json!(v));
            }
            let pod = json!({
                "metadata": {"name": store::generated_name(&format!("{name}-")), "namespace": namespace,
                    "labels": labels,
                    "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                        "controller": true, "blockOwnerDeletion": true}]},
                "spec": template.get("spec").cloned().unwrap_or(json!({})),
                "status": {"phase": "Pending", "qosClass": "Burstable"},
            });
            // A refused pod (Pod Security admission) is retried, as the Job
            // controller does; the Job stays without active pods.
            let mut pod = pod;
            if let Err(error) = admit_new_pod(shared, &store, &namespace, &mut pod) {
                store.set_status(&job_key, status);
                record_event(
                    shared,
                    &mut store,
                    &job,
                    "batch/v1",
                    "Job",
                    "FailedCreate",
                    &format!("Error creating: {}", error.message),
                    "job-controller",
                );
                continue;
            }
            if let Some(pods_rt) = shared.resource("", "pods") {
                let _ = store.create(pods_rt, &namespace, pod);
            }
            status["active"] = json!(1);
            status["ready"] = json!(0);
            store.set_status(&job_key, status);
            continue;
        }
        let deadline = job
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_i64)
            .zip(
                status
                    .get("startTime")
                    .and_then(Value::as_str)
                    .and_then(parse_time),
            )
            .is_some_and(|(seconds, start)| {
                chrono::Utc::now() >= start + chrono::Duration::seconds(seconds)
            });
        let phase = pods
            .first()
            .map(|p| str_at(p, "/status/phase").to_owned())
            .unwrap_or_default();
        let now = json!(timestamp());
        if deadline && !matches!(phase.as_str(), "Succeeded" | "Failed") {
            for pod in &pods {
                let pod_key = key("", "pods", &namespace, str_at(pod, "/metadata/name"));
                let mut pod_status = pod.get("status").cloned().unwrap_or(json!({}));
                pod_status["phase"] = json!("Failed");
                pod_status["reason"] = json!("DeadlineExceeded");
                terminate_status(&mut pod_status, 137);
                if let Some(runtime) = shared.pods().get(str_at(pod, "/metadata/uid")) {
                    runtime.kill_all();
                }
                store.set_status(&pod_key, pod_status);
            }
            status["active"] = json!(0);
            status["failed"] = json!(pods.len().max(1));
            status["conditions"] = json!([
                {"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline", "lastProbeTime": now, "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline", "lastProbeTime": now, "lastTransitionTime": now}]);
            store.set_status(&job_key, status);
            continue;
        }
        match phase.as_str() {
            "Succeeded" => {
                status["active"] = json!(0);
                status["ready"] = json!(0);
                status["succeeded"] = json!(1);
                status["completionTime"] = now.clone();
                status["conditions"] = json!([
                    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                     "message": "Reached expected number of succeeded pods", "lastProbeTime": now, "lastTransitionTime": now},
                    {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                     "message": "Reached expected number of succeeded pods", "lastProbeTime": now, "lastTransitionTime": now}]);
            }
            "Failed" => {
                status["active"] = json!(0);
                status["ready"] = json!(0);
                status["failed"] = json!(1);
                status["conditions"] = json!([
                    {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit", "lastProbeTime": now, "lastTransitionTime": now},
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit", "lastProbeTime": now, "lastTransitionTime": now}]);
            }
            "Running" => {
                status["active"] = json!(1);
                status["ready"] = json!(1);
            }
            _ => {
                status["active"] = json!(pods.len().min(1));
                status["ready"] = json!(0);
            }
        }
        store.set_status(&job_key, status);
    }
}

/// Marks every container terminated with `code` and the pod not ready.
pub(crate) fn terminate_status(status: &mut Value, code: i32) {
    let now = timestamp();
    if let Some(containers) = status
        .get_mut("containerStatuses")
        .and_then(Value::as_array_mut)
    {
        for c in containers {
            let started = c
                .pointer("/state/running/startedAt")
                .cloned()
                .unwrap_or_else(|| json!(now));
            c["ready"] = json!(false);
            c["started"] = json!(false);
            c["state"] = json!({"terminated": {"exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "startedAt": started, "finishedAt": now}});
        }
    }
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            if c["type"] == "Ready" || c["type"] == "ContainersReady" {
                c["status"] = json!("False");
                c["reason"] = json!(if code == 0 {
                    "PodCompleted"
                } else {
                    "PodFailed"
                });
            }
        }
    }
}

fn pod_conditions(ready: bool, since: &str) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!([
        {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": null, "lastTransitionTime": since},
        {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": since},
        {"type": "Ready", "status": ready, "lastProbeTime": null, "lastTransitionTime": since},
        {"type": "ContainersReady", "status": ready, "lastProbeTime": null, "lastTransitionTime": since},
        {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": since},
    ])
}

fn container_statuses(pod: &Value, state: &Value, ready: bool) -> Value {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let uid = str_at(pod, "/metadata/uid");
    Value::Array(
        containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let image = c.get("image").cloned().unwrap_or(json!(""));
                json!({"name": c.get("name").cloned().unwrap_or(json!("")), "image": image,
                    "imageID": format!("{}@sha256:{}", image.as_str().unwrap_or_default(), "0".repeat(64)),
                    "containerID": format!("containerd://{}{i}", uid.replace('-', "")),
                    "ready": ready, "started": state.get("running").is_some(), "restartCount": 0,
                    "state": state})
            })
            .collect(),
    )
}

fn kubelet(shared: &Arc<Shared>) {
    let pods = shared.store().list("", "pods", None);
    let live: HashSet<String> = pods
        .iter()
        .map(|p| str_at(p, "/metadata/uid").to_owned())
        .collect();
    shared.pods().retain(|uid, runtime| {
        let keep = live.contains(uid);
        if !keep {
            runtime.kill_all();
            let _ = std::fs::remove_dir_all(&runtime.root);
        }
        keep
    });
    for pod in pods {
        let phase = str_at(&pod, "/status/phase").to_owned();
        if matches!(phase.as_str(), "Succeeded" | "Failed")
            || pod.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let uid = str_at(&pod, "/metadata/uid").to_owned();
        let namespace = str_at(&pod, "/metadata/namespace").to_owned();
        let name = str_at(&pod, "/metadata/name").to_owned();
        let pod_key = key("", "pods", &namespace, &name);
        let container = exec::container(&pod, None).cloned().unwrap_or(json!({}));
        let (fault, elapsed, started, main, ip) = {
            let mut runtimes = shared.pods();
            let runtime = runtimes.entry(uid.clone()).or_insert_with(|| {
                let (mounts, working_dir) = exec::mapped_paths(&container);
                let n = shared.next_ip.fetch_add(1, Ordering::SeqCst);
                PodRuntime {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    root: shared
                        .root
                        .path()
                        .join(&namespace)
                        .join(format!("{name}-{}", &uid[..uid.len().min(8)])),
                    mounts,
                    working_dir,
                    pgids: Arc::new(Mutex::new(HashSet::new())),
                    log: Arc::new(Mutex::new(Vec::new())),
                    main: Arc::new(Mutex::new(MainState::Idle)),
                    seen_at: tokio::time::Instant::now(),
                    fault: shared.faults.take(&Hook::PodStart),
                    ip: format!("10.244.{}.{}", (n / 250) % 250, n % 250 + 2),
                    started: false,
                    isolated: shared.opts.isolate_pods && exec::isolation_available(),
                    read_only_root: container.pointer("/securityContext/readOnlyRootFilesystem")
                        == Some(&json!(true)),
                    user: exec::run_as(&pod, &container),
                }
            });
            let main = *runtime.main.lock().unwrap_or_else(|p| p.into_inner());
            (
                runtime.fault.clone(),
                runtime.seen_at.elapsed(),
                runtime.started,
                main,
                runtime.ip.clone(),
            )
        };
        let previous = pod.get("status").cloned().unwrap_or(json!({}));
        let since = previous
            .get("startTime")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(timestamp);
        let base = |phase: &str| {
            json!({"phase": phase, "qosClass": "Burstable", "hostIP": "10.0.0.1",
                "hostIPs": [{"ip": "10.0.0.1"}], "startTime": since})
        };
        if fault == Some(Fault::Unschedulable) {
            let status = json!({"phase": "Pending", "qosClass": "Burstable", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
                 "lastProbeTime": null, "lastTransitionTime": since}]});
            shared.store().set_status(&pod_key, status);
            continue;
        }
        if elapsed < shared.opts.ready_delay {
            let mut status = base("Pending");
            status["conditions"] = json!([{"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": since}]);
            status["containerStatuses"] = container_statuses(
                &pod,
                &json!({"waiting": {"reason": "ContainerCreating"}}),
                false,
            );
            shared.store().set_status(&pod_key, status);
            continue;
        }
        if let Some(message) = image_pull_failure(shared, &container) {
            let backoff = elapsed >= shared.opts.ready_delay * 2;
            let (reason, message) = if backoff {
                (
                    "ImagePullBackOff",
                    format!("Back-off pulling image {:?}", str_at(&container, "/image")),
                )
            } else {
                ("ErrImagePull", message)
            };
            let mut status = base("Pending");
            status["conditions"] = pod_conditions(false, &since);
            status["containerStatuses"] = container_statuses(
                &pod,
                &json!({"waiting": {"reason": reason, "message": message}}),
                false,
            );
            shared.store().set_status(&pod_key, status);
            continue;
        }
        let env = match exec::container_env(shared, &pod, &container) {
            Ok(env) => env,
            Err(message) => {
                let mut status = base("Pending");
                status["conditions"] = pod_conditions(false, &since);
                status["containerStatuses"] = container_statuses(
                    &pod,
                    &json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                    false,
                );
                shared.store().set_status(&pod_key, status);
                continue;
            }
        };
        if fault == Some(Fault::PodFails) {
            let mut status = base("Failed");
            status["conditions"] = pod_conditions(false, &since);
            status["containerStatuses"] = container_statuses(
                &pod,
                &json!({"terminated": {"exitCode": 1,
                "reason": "Error", "startedAt": since, "finishedAt": timestamp()}}),
                false,
            );
            shared.store().set_status(&pod_key, status);
            continue;
        }
        let restart = str_at(&pod, "/spec/restartPolicy");
        let runs_to_completion = matches!(restart, "Never" | "OnFailure");
        if !started {
            let ctx = {
                let mut runtimes = shared.pods();
                let Some(runtime) = runtimes.get_mut(&uid) else {
                    continue;
                };
                let _ = std::fs::create_dir_all(&runtime.root);
                for mount in &runtime.mounts {
                    let _ =
                        std::fs::create_dir_all(runtime.root.join(mount.trim_start_matches('/')));
                }
                if runtime.isolated {
                    exec::prepare_isolated_root(&runtime.root, &runtime.mounts);
                }
                runtime.started = true;
                (
                    PodContext {
                        name: name.clone(),
                        root: runtime.root.clone(),
                        mounts: runtime.mounts.clone(),
                        working_dir: runtime.working_dir.clone(),
                        env,
                        pgids: runtime.pgids.clone(),
                        isolated: runtime.isolated,
                        read_only_root: runtime.read_only_root,
                        user: runtime.user.clone(),
                    },
                    runtime.log.clone(),
                    runtime.main.clone(),
                )
            };
            if runs_to_completion {
                let mut argv: Vec<String> = Vec::new();
                for part in ["command", "args"] {
                    for a in container
                        .get(part)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        argv.push(a.as_str().unwrap_or_default().to_owned());
                    }
                }
                let (ctx, log, main) = ctx;
                exec::start_main(shared, ctx, argv, log, main);
            }
        }
        let running = json!({"running": {"startedAt": since}});
        let status = match main {
            MainState::Exited(code) if runs_to_completion => {
                let mut status = base(if code == 0 { "Succeeded" } else { "Failed" });
                status["conditions"] = pod_conditions(true, &since);
                status["containerStatuses"] = container_statuses(&pod, &running, true);
                terminate_status(&mut status, code);
                status
            }
            _ => {
                let mut status = base("Running");
                status["podIP"] = json!(ip);
                status["podIPs"] = json!([{"ip": ip}]);
                status["conditions"] = pod_conditions(true, &since);
                status["containerStatuses"] = container_statuses(&pod, &running, true);
                status
            }
        };
        let mut store = shared.store();
        if let Some(current) = store.get(&pod_key)
            && current.pointer("/status/phase").and_then(Value::as_str) != Some(phase.as_str())
            && matches!(
                current.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            )
        {
            continue;
        }
        store.set_status(&pod_key, status);
        if pod.pointer("/spec/nodeName").is_none() {
            drop(store);
            bind(shared, &pod_key);
        }
    }
}

/// Sets `spec.nodeName` as the scheduler's binding does.
fn bind(shared: &Shared, pod_key: &Key) {
    let mut store = shared.store();
    let Some(mut pod) = store.get(pod_key).cloned() else {
        return;
    };
    pod["spec"]["nodeName"] = json!(NODE);
    if let Some(rt) = shared.resource("", "pods").cloned() {
        let _ = store.update(&rt, pod_key, pod, None);
    }
}

/// Why the node cannot pull the container's image: its registry is not
/// one of [`super::KubeEmulatorOptions::registries`] (the host does not
/// resolve), in containerd's wording.
fn image_pull_failure(shared: &Shared, container: &Value) -> Option<String> {
    let image = str_at(container, "/image");
    let (first, rest) = image.split_once('/').unwrap_or(("", image));
    let explicit = first.contains('.') || first.contains(':') || first == "localhost";
    let (host, path) = if explicit {
        (first, rest)
    } else {
        ("docker.io", image)
    };
    let hostname = host.split(':').next().unwrap_or(host);
    if shared
        .opts
        .registries
        .iter()
        .any(|r| r == host || r == hostname)
    {
        return None;
    }
    let (repo, tag) = match path.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (path, "latest"),
    };
    let reference = format!("{host}/{repo}:{tag}");
    Some(format!(
        "failed to pull and unpack image \"{reference}\": failed to resolve reference \"{reference}\": failed to do request: Head \"https://{host}/v2/{repo}/manifests/{tag}\": dial tcp: lookup {hostname}: no such host"
    ))
}
