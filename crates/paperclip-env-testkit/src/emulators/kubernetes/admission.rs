//! Pod Security admission, `restricted` profile: a pod created in a
//! namespace labelled `pod-security.kubernetes.io/enforce: restricted` is
//! refused with 403 `Forbidden` naming every violated control, in the API
//! server's wording. Checked: host namespaces, privileged containers,
//! capabilities (drop `ALL`, add at most `NET_BIND_SERVICE`), hostPath and
//! other non-allowed volume types, host ports, privilege escalation,
//! `runAsNonRoot`, `runAsUser: 0`, seccomp (`RuntimeDefault`/`Localhost`).
//! Not checked: AppArmor, SELinux options, `procMount`, sysctls, and the
//! `baseline` profile on its own.

use serde_json::Value;

use super::store::{ApiError, Store};

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

/// Admits or refuses a pod about to be created in `namespace`.
pub(crate) fn admit_pod(store: &Store, namespace: &str, pod: &Value) -> Result<(), ApiError> {
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
