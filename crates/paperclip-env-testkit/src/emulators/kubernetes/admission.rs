//! Pod Security admission, `restricted` profile: a pod created in a
//! namespace labelled `pod-security.kubernetes.io/enforce: restricted` is
//! refused with 403 `Forbidden` naming every violated control, in the API
//! server's wording. Checked: host namespaces, privileged containers,
//! capabilities (drop `ALL`, add at most `NET_BIND_SERVICE`), hostPath and
//! other non-allowed volume types, host ports, privilege escalation,
//! `runAsNonRoot`, `runAsUser: 0`, seccomp (`RuntimeDefault`/`Localhost`).
//! Not checked: AppArmor, SELinux options, `procMount`, sysctls, and the
//! `baseline` profile on its own.
//!
//! Also here, the other admission plugins a pod meets: ServiceAccount (its
//! account, `default` unless named, must exist; every namespace gets its
//! `default` account when it is created), RuntimeClass (must exist), LimitRanger
//! (defaults, then `min`/`max` per container) and ResourceQuota (every
//! quota in the namespace; tracked compute resources must be stated; the
//! live pods' usage plus the new pod's may not exceed `hard`), each refusal
//! a 403 `Forbidden` in the API server's wording.

use serde_json::Value;

use super::store::{ApiError, Store};
use super::validation::{format_quantity, quantity};

const ENFORCE: &str = "pod-security.kubernetes.io/enforce";
const ALLOWED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect()
}

fn name(container: &Value) -> &str {
    container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(names: &[&str]) -> &'static str {
    if names.len() == 1 {
        "container"
    } else {
        "containers"
    }
}

/// The `restricted` violations of a pod spec, in the API server's order
/// and wording.
pub(crate) fn restricted_violations(spec: &Value) -> Vec<String> {
    let mut out: Vec<(&str, String)> = Vec::new();
    let pod_sc = spec.get("securityContext").cloned().unwrap_or(Value::Null);
    let containers = containers(spec);
    let host: Vec<&str> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| spec.get(*k) == Some(&Value::Bool(true)))
        .collect();
    if !host.is_empty() {
        let parts: Vec<String> = host.iter().map(|h| format!("{h}=true")).collect();
        out.push((
            "hostNamespaces",
            format!("host namespaces ({})", parts.join(", ")),
        ));
    }
    let privileged: Vec<&str> = containers
        .iter()
        .filter(|c| c.pointer("/securityContext/privileged") == Some(&Value::Bool(true)))
        .map(|c| name(c))
        .collect();
    if !privileged.is_empty() {
        out.push((
            "privileged",
            format!(
                "privileged ({} {} must not set securityContext.privileged=true)",
                plural(&privileged),
                quoted(&privileged)
            ),
        ));
    }
    let forbidden_adds: Vec<&str> = containers
        .iter()
        .filter(|c| {
            c.pointer("/securityContext/capabilities/add")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v != "NET_BIND_SERVICE"))
        })
        .map(|c| name(c))
        .collect();
    let no_drop: Vec<&str> = containers
        .iter()
        .filter(|c| {
            !c.pointer("/securityContext/capabilities/drop")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|v| v == "ALL"))
        })
        .map(|c| name(c))
        .collect();
    if !forbidden_adds.is_empty() || !no_drop.is_empty() {
        let mut parts = Vec::new();
        if !no_drop.is_empty() {
            parts.push(format!(
                "{} {} must set securityContext.capabilities.drop=[\"ALL\"]",
                plural(&no_drop),
                quoted(&no_drop)
            ));
        }
        if !forbidden_adds.is_empty() {
            parts.push(format!(
                "{} {} must not include capabilities other than \"NET_BIND_SERVICE\" in securityContext.capabilities.add",
                plural(&forbidden_adds),
                quoted(&forbidden_adds)
            ));
        }
        out.push((
            "capabilities",
            format!("unrestricted capabilities ({})", parts.join("; ")),
        ));
    }
    for volume in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let volume_name = volume
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(fields) = volume.as_object() else {
            continue;
        };
        for kind in fields.keys().filter(|k| *k != "name") {
            if kind == "hostPath" {
                out.push((
                    "hostPathVolumes",
                    format!("hostPath volumes (volume {volume_name:?})"),
                ));
            }
            if !ALLOWED_VOLUMES.contains(&kind.as_str()) {
                out.push((
                    "restrictedVolumes",
                    format!("restricted volume types (volume {volume_name:?} uses restricted volume type {kind:?})"),
                ));
            }
        }
    }
    let host_ports: Vec<String> = containers
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("hostPort").and_then(Value::as_i64))
                .filter(|p| *p != 0)
                .map(|p| format!("{:?} uses hostPort {p}", name(c)))
        })
        .collect();
    if !host_ports.is_empty() {
        let noun = if host_ports.len() == 1 {
            "container"
        } else {
            "containers"
        };
        out.push((
            "hostPorts",
            format!("hostPort ({noun} {})", host_ports.join(", ")),
        ));
    }
    let escalation: Vec<&str> = containers
        .iter()
        .filter(|c| {
            c.pointer("/securityContext/allowPrivilegeEscalation") != Some(&Value::Bool(false))
        })
        .map(|c| name(c))
        .collect();
    if !escalation.is_empty() {
        out.push(("allowPrivilegeEscalation", format!(
            "allowPrivilegeEscalation != false ({} {} must set securityContext.allowPrivilegeEscalation=false)",
            plural(&escalation),
            quoted(&escalation)
        )));
    }
    let pod_non_root = pod_sc.get("runAsNonRoot") == Some(&Value::Bool(true));
    let root_ok = |c: &&Value| match c.pointer("/securityContext/runAsNonRoot") {
        Some(Value::Bool(v)) => *v,
        _ => pod_non_root,
    };
    let not_non_root: Vec<&str> = containers
        .iter()
        .filter(|c| !root_ok(c))
        .map(|c| name(c))
        .collect();
    if !not_non_root.is_empty() {
        out.push((
            "runAsNonRoot",
            format!(
                "runAsNonRoot != true (pod or {} {} must set securityContext.runAsNonRoot=true)",
                plural(&not_non_root),
                quoted(&not_non_root)
            ),
        ));
    }
    let pod_root_user = pod_sc.get("runAsUser").and_then(Value::as_i64) == Some(0);
    let root_users: Vec<&str> = containers
        .iter()
        .filter(|c| {
            c.pointer("/securityContext/runAsUser")
                .and_then(Value::as_i64)
                == Some(0)
        })
        .map(|c| name(c))
        .collect();
    if pod_root_user || !root_users.is_empty() {
        out.push((
            "runAsUser",
            "runAsUser=0 (pod and containers must not set runAsUser=0)".to_owned(),
        ));
    }
    let seccomp_ok = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .is_some_and(|t| t == "RuntimeDefault" || t == "Localhost")
    };
    let pod_seccomp = seccomp_ok(pod_sc.pointer("/seccompProfile/type"));
    let no_seccomp: Vec<&str> = containers
        .iter()
        .filter(
            |c| match c.pointer("/securityContext/seccompProfile/type") {
                Some(t) => !seccomp_ok(Some(t)),
                None => !pod_seccomp,
            },
        )
        .map(|c| name(c))
        .collect();
    if !no_seccomp.is_empty() {
        out.push(("seccompProfile", format!(
            "seccompProfile (pod or {} {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            plural(&no_seccomp),
            quoted(&no_seccomp)
        )));
    }
    // The API server reports checks in the order of their ids.
    out.sort_by_key(|(id, _)| *id);
    out.into_iter().map(|(_, message)| message).collect()
}

fn forbidden(pod: &Value, message: String) -> ApiError {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    ApiError {
        code: 403,
        reason: "Forbidden",
        message: format!("pods \"{name}\" is forbidden: {message}"),
        details: serde_json::json!({"name": name, "kind": "pods"}),
    }
}

fn in_namespace(store: &Store, plural: &str, namespace: &str) -> Vec<Value> {
    store.list("", plural, Some(namespace))
}

fn container_list(pod: &Value) -> Vec<Value> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// LimitRanger's mutation: each container without a limit or request of
/// a resource a `Container` LimitRange item defaults gets the default
/// (`default` for limits, `defaultRequest`, else the limit, for requests).
pub(crate) fn default_pod(store: &Store, namespace: &str, pod: &mut Value) {
    for range in in_namespace(store, "limitranges", namespace) {
        for item in range
            .pointer("/spec/limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| i.get("type").and_then(Value::as_str) == Some("Container"))
        {
            let Some(containers) = pod
                .pointer_mut("/spec/containers")
                .and_then(Value::as_array_mut)
            else {
                return;
            };
            for c in containers.iter_mut() {
                if !c["resources"].is_object() {
                    c["resources"] = serde_json::json!({});
                }
                for (kind, source) in [("limits", "default"), ("requests", "defaultRequest")] {
                    let defaults = item.get(source).and_then(Value::as_object).cloned();
                    for (resource, value) in defaults.into_iter().flatten() {
                        if !c["resources"][kind].is_object() {
                            c["resources"][kind] = serde_json::json!({});
                        }
                        if c["resources"][kind].get(&resource).is_none() {
                            c["resources"][kind][&resource] = value;
                        }
                    }
                }
                // A request left unset defaults to the limit.
                let limits = c["resources"]["limits"].as_object().cloned();
                for (resource, value) in limits.into_iter().flatten() {
                    if !c["resources"]["requests"].is_object() {
                        c["resources"]["requests"] = serde_json::json!({});
                    }
                    if c["resources"]["requests"].get(&resource).is_none() {
                        c["resources"]["requests"][&resource] = value;
                    }
                }
            }
        }
    }
}

fn amount(c: &Value, kind: &str, resource: &str) -> Option<(i128, String)> {
    let v = c.pointer(&format!("/resources/{kind}/{resource}"))?;
    let text = v
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string());
    Some((quantity(&text)?, text))
}

/// LimitRanger's validation: `min`/`max` of each `Container` item.
fn check_limit_ranges(store: &Store, namespace: &str, pod: &Value) -> Result<(), String> {
    let mut problems = Vec::new();
    for range in in_namespace(store, "limitranges", namespace) {
        for item in range
            .pointer("/spec/limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| i.get("type").and_then(Value::as_str) == Some("Container"))
        {
            for c in container_list(pod) {
                for (resource, bound) in item
                    .get("min")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    let bound_text = bound.as_str().unwrap_or_default();
                    let Some(min) = quantity(bound_text) else {
                        continue;
                    };
                    match amount(&c, "requests", resource) {
                        Some((req, text)) if req < min => problems.push(format!(
                            "minimum {resource} usage per Container is {bound_text}, but request is {text}"
                        )),
                        None => problems.push(format!(
                            "minimum {resource} usage per Container is {bound_text}.  No request is specified"
                        )),
                        _ => {}
                    }
                }
                for (resource, bound) in item
                    .get("max")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    let bound_text = bound.as_str().unwrap_or_default();
                    let Some(max) = quantity(bound_text) else {
                        continue;
                    };
                    match amount(&c, "limits", resource) {
                        Some((lim, text)) if lim > max => problems.push(format!(
                            "maximum {resource} usage per Container is {bound_text}, but limit is {text}"
                        )),
                        None => problems.push(format!(
                            "maximum {resource} usage per Container is {bound_text}.  No limit is specified"
                        )),
                        _ => {}
                    }
                }
            }
        }
    }
    match problems.len() {
        0 => Ok(()),
        1 => Err(problems.remove(0)),
        _ => Err(format!("[{}]", problems.join(", "))),
    }
}

/// What one pod counts against a quota, per quota resource name.
fn pod_usage(pod: &Value) -> Vec<(String, i128)> {
    let mut out = vec![("pods".to_owned(), 1_000_000_000i128)];
    for (kind, short) in [("requests", true), ("limits", false)] {
        for resource in ["cpu", "memory"] {
            let total: i128 = container_list(pod)
                .iter()
                .filter_map(|c| amount(c, kind, resource).map(|(v, _)| v))
                .sum();
            out.push((format!("{kind}.{resource}"), total));
            if short {
                out.push((resource.to_owned(), total));
            }
        }
    }
    out
}

fn terminal(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Current usage of `quota`'s resources by the namespace's live pods.
pub(crate) fn quota_used(
    store: &Store,
    namespace: &str,
    hard: &serde_json::Map<String, Value>,
) -> Vec<(String, i128)> {
    let pods: Vec<Value> = in_namespace(store, "pods", namespace)
        .into_iter()
        .filter(|p| !terminal(p))
        .collect();
    hard.keys()
        .map(|resource| {
            let used: i128 = pods
                .iter()
                .flat_map(pod_usage)
                .filter(|(r, _)| r == resource)
                .map(|(_, v)| v)
                .sum();
            (resource.clone(), used)
        })
        .collect()
}

fn pretty(items: &[(String, i128)]) -> String {
    let mut items: Vec<&(String, i128)> = items.iter().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    items
        .iter()
        .map(|(r, v)| format!("{r}={}", format_quantity(r, *v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// ResourceQuota admission for a new pod.
fn check_quotas(store: &Store, namespace: &str, pod: &Value) -> Result<(), String> {
    let usage = pod_usage(pod);
    for quota in in_namespace(store, "resourcequotas", namespace) {
        let name = quota
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(hard) = quota.pointer("/spec/hard").and_then(Value::as_object) else {
            continue;
        };
        // Compute resources a quota tracks must be stated by every container.
        let mut missing: Vec<String> = Vec::new();
        for resource in hard.keys() {
            let (kind, res) = match resource.split_once('.') {
                Some((k @ ("requests" | "limits"), r)) => (k, r),
                None if matches!(resource.as_str(), "cpu" | "memory") => {
                    ("requests", resource.as_str())
                }
                _ => continue,
            };
            let lacking: Vec<String> = container_list(pod)
                .iter()
                .filter(|c| amount(c, kind, res).is_none())
                .map(|c| {
                    c.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            if !lacking.is_empty() {
                missing.push(format!("{kind}.{res} for: {}", lacking.join(",")));
            }
        }
        if !missing.is_empty() {
            missing.sort();
            return Err(format!(
                "failed quota: {name}: must specify {}",
                missing.join("; ")
            ));
        }
        let used = quota_used(store, namespace, hard);
        let mut exceeded = Vec::new();
        for (resource, limit) in hard {
            let Some(limit) = limit.as_str().and_then(quantity) else {
                continue;
            };
            let requested = usage
                .iter()
                .find(|(r, _)| r == resource)
                .map(|(_, v)| *v)
                .unwrap_or(0);
            if requested == 0 {
                continue;
            }
            let now = used
                .iter()
                .find(|(r, _)| r == resource)
                .map(|(_, v)| *v)
                .unwrap_or(0);
            if now + requested > limit {
                exceeded.push((resource.clone(), requested, now, limit));
            }
        }
        if !exceeded.is_empty() {
            let requested: Vec<(String, i128)> = exceeded
                .iter()
                .map(|(r, v, _, _)| (r.clone(), *v))
                .collect();
            let used: Vec<(String, i128)> = exceeded
                .iter()
                .map(|(r, _, v, _)| (r.clone(), *v))
                .collect();
            let limited: Vec<(String, i128)> = exceeded
                .iter()
                .map(|(r, _, _, v)| (r.clone(), *v))
                .collect();
            return Err(format!(
                "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
                pretty(&requested),
                pretty(&used),
                pretty(&limited)
            ));
        }
    }
    Ok(())
}

/// Admits or refuses a pod about to be created in `namespace`, in the API
/// server's order: ServiceAccount (its account must exist), Pod
/// Security, RuntimeClass (must exist), LimitRanger bounds, ResourceQuota.
/// Defaults ([`default_pod`]) must have been applied.
pub(crate) fn admit_pod(store: &Store, namespace: &str, pod: &mut Value) -> Result<(), ApiError> {
    let account = pod
        .pointer("/spec/serviceAccountName")
        .or_else(|| pod.pointer("/spec/serviceAccount"))
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .unwrap_or("default")
        .to_owned();
    if store
        .get(&(
            String::new(),
            "serviceaccounts".into(),
            namespace.into(),
            account.clone(),
        ))
        .is_none()
    {
        return Err(forbidden(
            pod,
            format!(
                "error looking up service account {namespace}/{account}: serviceaccount \"{account}\" not found"
            ),
        ));
    }
    // The ServiceAccount admission plugin writes the account it admitted.
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("serviceAccountName".into(), Value::String(account.clone()));
        spec.insert("serviceAccount".into(), Value::String(account));
    }
    admit_pod_security(store, namespace, pod)?;
    if let Some(class) = pod
        .pointer("/spec/runtimeClassName")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        && store
            .get(&(
                "node.k8s.io".into(),
                "runtimeclasses".into(),
                String::new(),
                class.into(),
            ))
            .is_none()
    {
        return Err(forbidden(
            pod,
            format!("pod rejected: RuntimeClass \"{class}\" not found"),
        ));
    }
    check_limit_ranges(store, namespace, pod).map_err(|m| forbidden(pod, m))?;
    check_quotas(store, namespace, pod).map_err(|m| forbidden(pod, m))?;
    Ok(())
}

/// Pod Security admission alone.
fn admit_pod_security(store: &Store, namespace: &str, pod: &Value) -> Result<(), ApiError> {
    let key = (
        String::new(),
        "namespaces".to_owned(),
        String::new(),
        namespace.to_owned(),
    );
    let enforced = store
        .get(&key)
        .and_then(|ns| ns.pointer("/metadata/labels").cloned())
        .and_then(|labels| {
            labels
                .get(ENFORCE)
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    if enforced.as_deref() != Some("restricted") {
        return Ok(());
    }
    let violations = restricted_violations(pod.get("spec").unwrap_or(&Value::Null));
    if violations.is_empty() {
        return Ok(());
    }
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Err(ApiError {
        code: 403,
        reason: "Forbidden",
        message: format!(
            "pods \"{name}\" is forbidden: violates PodSecurity \"restricted:latest\": {}",
            violations.join(", ")
        ),
        details: serde_json::json!({"name": name, "kind": "pods"}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_spec_26_baseline_passes_restricted() {
        let spec = json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "agent", "securityContext": {"runAsNonRoot": true,
                "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "workspace", "emptyDir": {"sizeLimit": "8Gi"}}]});
        assert_eq!(restricted_violations(&spec), Vec::<String>::new());
    }

    #[test]
    fn each_violation_is_named() {
        let spec = json!({
            "hostNetwork": true,
            "securityContext": {"runAsUser": 0},
            "containers": [{"name": "agent", "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]},
                    "seccompProfile": {"type": "Unconfined"}}}],
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}]});
        let violations = restricted_violations(&spec);
        let expected = [
            "allowPrivilegeEscalation != false (container \"agent\" must set securityContext.allowPrivilegeEscalation=false)",
            "unrestricted capabilities (container \"agent\" must set securityContext.capabilities.drop=[\"ALL\"]; container \"agent\" must not include capabilities other than \"NET_BIND_SERVICE\" in securityContext.capabilities.add)",
            "host namespaces (hostNetwork=true)",
            "hostPath volumes (volume \"host\")",
            "hostPort (container \"agent\" uses hostPort 80)",
            "privileged (container \"agent\" must not set securityContext.privileged=true)",
            "restricted volume types (volume \"host\" uses restricted volume type \"hostPath\")",
            "runAsNonRoot != true (pod or container \"agent\" must set securityContext.runAsNonRoot=true)",
            "runAsUser=0 (pod and containers must not set runAsUser=0)",
            "seccompProfile (pod or container \"agent\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
        ];
        assert_eq!(violations, expected);
    }
}
