//! Exact object shapes (spec 26 §5–§6) as pure functions.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use super::config::KubernetesConfig;
use super::naming::MANAGED_BY;

/// Tenant ServiceAccount name.
pub const TENANT_SA: &str = "paperclip-tenant-sa";
/// Tenant Role name.
pub const TENANT_ROLE: &str = "paperclip-tenant-role";
/// Tenant RoleBinding name.
pub const TENANT_ROLE_BINDING: &str = "paperclip-tenant-rb";
/// Tenant ResourceQuota name.
pub const TENANT_QUOTA: &str = "paperclip-quota";
/// Tenant LimitRange name.
pub const TENANT_LIMITS: &str = "paperclip-limits";
/// Deny-all NetworkPolicy name.
pub const DENY_ALL: &str = "paperclip-deny-all";
/// Standard-mode egress NetworkPolicy name.
pub const EGRESS_ALLOW: &str = "paperclip-egress-allow";
/// Cilium-mode egress policy name.
pub const EGRESS_FQDN: &str = "paperclip-egress-fqdn";
/// Default namespace of the Paperclip server (callback target, gotcha G9).
pub const SERVER_NAMESPACE: &str = "paperclip";
/// Default label selector of the Paperclip server pods (gotcha G9).
pub const SERVER_POD_SELECTOR: (&str, &str) = ("app", "paperclip-server");
/// Callback port of the Paperclip server.
pub const CALLBACK_PORT: u16 = 3100;
/// The agent container's name.
pub const CONTAINER: &str = "agent";
/// The agent's home directory.
pub const HOME: &str = "/home/paperclip";

/// The pod's writable mounts (emptyDirs); everything else is on the
/// read-only root filesystem.
pub const WRITABLE_MOUNTS: [&str; 3] = ["/workspace", HOME, "/tmp"];

/// Whether an absolute in-pod path lies on one of [`WRITABLE_MOUNTS`].
pub fn is_writable_in_pod(path: &str) -> bool {
    let normalized = path.trim_end_matches('/');
    WRITABLE_MOUNTS.iter().any(|m| {
        normalized == *m
            || normalized
                .strip_prefix(m)
                .is_some_and(|rest| rest.starts_with('/') && !rest.split('/').any(|s| s == ".."))
    })
}

/// Private, link-local, loopback and multicast ranges excluded from the public fallback.
pub const PUBLIC_FALLBACK_EXCEPT: [&str; 8] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
];

fn managed_labels() -> Value {
    json!({"paperclip.io/managed-by": MANAGED_BY})
}

/// The tenant Namespace (§5.2). The company label is a valid label value
/// (hashed when the id is not one, e.g. `Acme, Inc.` or over 63
/// characters); then the raw id is kept in the annotation of the same name.
pub fn namespace(name: &str, company_id: &str) -> Value {
    let label = super::naming::label_value(company_id);
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
        "paperclip.io/company-id": label,
        "paperclip.io/managed-by": MANAGED_BY,
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/audit": "restricted",
        "pod-security.kubernetes.io/warn": "restricted"}}});
    if label != company_id {
        ns["metadata"]["annotations"] = json!({"paperclip.io/company-id": company_id});
    }
    ns
}

/// Annotations keeping the raw run and company ids of a workload whose
/// labels had to hash them; empty when the labels are the raw values.
pub fn raw_id_annotations(run_id: &str, company_id: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, raw) in [
        ("paperclip.io/run-id", run_id),
        ("paperclip.io/company-id", company_id),
    ] {
        if super::naming::label_value(raw) != raw {
            out.insert(key.to_owned(), raw.to_owned());
        }
    }
    out
}

/// `paperclip-tenant-sa`.
pub fn service_account(ns: &str, annotations: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": TENANT_SA, "namespace": ns,
        "annotations": annotations, "labels": managed_labels()}})
}

/// `paperclip-tenant-role`: only `get pods/log`.
pub fn role(ns: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": TENANT_ROLE, "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]})
}

/// `paperclip-tenant-rb`.
pub fn role_binding(ns: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": TENANT_ROLE_BINDING, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TENANT_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": TENANT_SA, "namespace": ns}]})
}

/// `paperclip-quota` (§5.4, not configurable).
pub fn resource_quota(ns: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": TENANT_QUOTA, "namespace": ns},
        "spec": {"hard": {"pods": "20", "requests.cpu": "10", "requests.memory": "20Gi",
            "limits.cpu": "20", "limits.memory": "40Gi"}}})
}

/// `paperclip-limits` (§5.3).
pub fn limit_range(ns: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": TENANT_LIMITS, "namespace": ns},
        "spec": {"limits": [{"type": "Container",
            "max": {"cpu": "4", "memory": "8Gi"},
            "min": {"cpu": "100m", "memory": "128Mi"},
            "default": {"cpu": "1", "memory": "2Gi"},
            "defaultRequest": {"cpu": "250m", "memory": "512Mi"}}]}})
}

/// `paperclip-deny-all`.
pub fn deny_all(ns: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": DENY_ALL, "namespace": ns, "labels": managed_labels()},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
}

/// What an egress policy selects and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSpec<'a> {
    /// Policy name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// `Some(run id)` for a scoped policy (selects `paperclip.io/run-id`), `None` for the tenant one.
    pub run_id: Option<&'a str>,
    /// DNS and callback rules.
    pub include_base_rules: bool,
    /// FQDNs.
    pub fqdns: &'a [String],
    /// CIDRs.
    pub cidrs: &'a [String],
    /// Owner reference of a scoped policy.
    pub owner: Option<&'a Value>,
    /// Namespace of the Paperclip server (callback target).
    pub server_namespace: &'a str,
    /// Labels selecting the Paperclip server pods.
    pub server_selector: &'a BTreeMap<String, String>,
}

fn selector(run_id: Option<&str>) -> Value {
    match run_id {
        Some(run) => json!({"matchLabels": {"paperclip.io/run-id": run}}),
        None => json!({"matchLabels": {"paperclip.io/role": "agent"}}),
    }
}

fn policy_metadata(spec: &EgressSpec<'_>) -> Value {
    let mut md =
        json!({"name": spec.name, "namespace": spec.namespace, "labels": managed_labels()});
    if let Some(owner) = spec.owner {
        md["ownerReferences"] = json!([owner]);
    }
    md
}

/// A standard-mode egress NetworkPolicy (§5.5).
pub fn egress_network_policy(spec: &EgressSpec<'_>) -> Value {
    let mut egress = Vec::new();
    if spec.include_base_rules {
        egress.push(json!({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}));
        egress.push(json!({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": spec.server_namespace}},
                "podSelector": {"matchLabels": spec.server_selector}}],
            "ports": [{"protocol": "TCP", "port": CALLBACK_PORT}]}));
    }
    for cidr in spec.cidrs {
        egress.push(json!({"to": [{"ipBlock": {"cidr": cidr}}]}));
    }
    if spec.cidrs.is_empty() && !spec.fqdns.is_empty() {
        egress.push(
            json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PUBLIC_FALLBACK_EXCEPT}}],
            "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}]}),
        );
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": policy_metadata(spec),
        "spec": {"podSelector": selector(spec.run_id), "policyTypes": ["Egress"], "egress": egress}})
}

/// A cilium-mode CiliumNetworkPolicy (§5.6).
pub fn cilium_network_policy(spec: &EgressSpec<'_>) -> Value {
    let mut egress = Vec::new();
    if spec.include_base_rules {
        egress.push(json!({"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
            "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}],
                "rules": {"dns": [{"matchPattern": "*"}]}}]}));
    }
    if !spec.fqdns.is_empty() {
        let names: Vec<Value> = spec.fqdns.iter().map(|f| json!({"matchName": f})).collect();
        egress.push(
            json!({"toFQDNs": names, "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}),
        );
    }
    if spec.include_base_rules {
        let mut server = Map::new();
        server.insert(
            "k8s:io.kubernetes.pod.namespace".into(),
            json!(spec.server_namespace),
        );
        for (k, v) in spec.server_selector {
            server.insert(k.clone(), json!(v));
        }
        egress.push(json!({"toEndpoints": [{"matchLabels": server}],
            "toPorts": [{"ports": [{"port": CALLBACK_PORT.to_string(), "protocol": "TCP"}]}]}));
    }
    if !spec.cidrs.is_empty() {
        let set: Vec<Value> = spec.cidrs.iter().map(|c| json!({"cidr": c})).collect();
        egress.push(json!({"toCIDRSet": set}));
    }
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": policy_metadata(spec),
        "spec": {"endpointSelector": selector(spec.run_id), "egress": egress}})
}

/// The pod security context (§6.2).
pub fn pod_security_context() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}})
}

/// The container security context (§6.2).
pub fn container_security_context() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
}

/// Inputs of a run's pod spec.
#[derive(Debug, Clone)]
pub struct PodInputs<'a> {
    /// Resolved image.
    pub image: &'a str,
    /// Env Secret name.
    pub secret_name: &'a str,
    /// Run labels (the pod template adds `paperclip.io/role: agent`).
    pub labels: &'a BTreeMap<String, String>,
    /// Workload annotations (raw ids the labels had to hash); may be empty.
    pub annotations: &'a BTreeMap<String, String>,
    /// Config (pull secrets, runtime class, resources).
    pub config: &'a KubernetesConfig,
}

fn resources(config: &KubernetesConfig) -> Value {
    let r = config.default_resources.as_ref();
    let requests = r
        .and_then(|r| r.requests.as_ref())
        .map(|m| json!(m))
        .unwrap_or_else(|| json!({"cpu": "250m", "memory": "512Mi"}));
    let limits = r
        .and_then(|r| r.limits.as_ref())
        .map(|m| json!(m))
        .unwrap_or_else(|| json!({"cpu": "2", "memory": "4Gi"}));
    json!({"requests": requests, "limits": limits})
}

fn pod_template(inputs: &PodInputs<'_>, job: bool) -> Value {
    let mut container = Map::new();
    container.insert("name".into(), json!(CONTAINER));
    container.insert("image".into(), json!(inputs.image));
    container.insert(
        "imagePullPolicy".into(),
        json!(super::adapters::pull_policy(inputs.image)),
    );
    let command = if job {
        json!(["/usr/bin/tini", "--", "/usr/local/bin/paperclip-agent-shim"])
    } else {
        json!(["/usr/bin/tini", "--", "/bin/sh", "-c", "sleep infinity"])
    };
    container.insert("command".into(), command);
    if !job {
        container.insert("env".into(), json!([{"name": "HOME", "value": HOME}]));
    }
    container.insert(
        "envFrom".into(),
        json!([{"secretRef": {"name": inputs.secret_name}}]),
    );
    container.insert("securityContext".into(), container_security_context());
    container.insert("resources".into(), resources(inputs.config));
    container.insert(
        "volumeMounts".into(),
        json!([{"name": "workspace", "mountPath": "/workspace"}, {"name": "home", "mountPath": HOME},
            {"name": "cache", "mountPath": "/home/paperclip/.cache"}, {"name": "tmp", "mountPath": "/tmp"}]),
    );
    let mut spec = Map::new();
    spec.insert("serviceAccountName".into(), json!(TENANT_SA));
    spec.insert("automountServiceAccountToken".into(), json!(false));
    spec.insert(
        "restartPolicy".into(),
        json!(if job { "Never" } else { "Always" }),
    );
    if let Some(rc) = &inputs.config.runtime_class_name {
        spec.insert("runtimeClassName".into(), json!(rc));
    }
    if !inputs.config.image_pull_secrets.is_empty() {
        let secrets: Vec<Value> = inputs
            .config
            .image_pull_secrets
            .iter()
            .map(|n| json!({"name": n}))
            .collect();
        spec.insert("imagePullSecrets".into(), Value::Array(secrets));
    }
    spec.insert("securityContext".into(), pod_security_context());
    spec.insert("containers".into(), json!([Value::Object(container)]));
    spec.insert(
        "volumes".into(),
        json!([{"name": "workspace", "emptyDir": {"sizeLimit": "8Gi"}}, {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]),
    );
    let mut labels = inputs.labels.clone();
    labels.insert("paperclip.io/role".into(), "agent".into());
    json!({"metadata": {"labels": labels}, "spec": spec})
}

/// The `Sandbox` CR (§6.1); no ownerReferences.
pub fn sandbox(api_version: &str, name: &str, ns: &str, inputs: &PodInputs<'_>) -> Value {
    let mut sb = json!({"apiVersion": format!("agents.x-k8s.io/{api_version}"), "kind": "Sandbox",
        "metadata": {"name": name, "namespace": ns, "labels": inputs.labels},
        "spec": {"podTemplate": pod_template(inputs, false)}});
    annotate(&mut sb, inputs.annotations);
    sb
}

fn annotate(object: &mut Value, annotations: &BTreeMap<String, String>) {
    if !annotations.is_empty() {
        object["metadata"]["annotations"] = json!(annotations);
    }
}

/// The `batch/v1` Job (§6.3).
pub fn job(name: &str, ns: &str, inputs: &PodInputs<'_>) -> Value {
    let mut job = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": inputs.labels},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": inputs.config.job_ttl_seconds_after_finished,
            "activeDeadlineSeconds": inputs.config.pod_activity_deadline_sec,
            "template": pod_template(inputs, true)}});
    annotate(&mut job, inputs.annotations);
    job
}

/// An owner reference to the workload.
pub fn owner_reference(
    api_version: &str,
    kind: &str,
    name: &str,
    uid: &str,
    controller: bool,
) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
        "controller": controller, "blockOwnerDeletion": controller})
}

/// The env Secret (§6.4). Values are exposed only into the request body.
pub fn env_secret(
    name: &str,
    ns: &str,
    run_id: &str,
    owner: &Value,
    data: &BTreeMap<String, SecretString>,
) -> Value {
    let string_data: Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.expose_secret())))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": ns,
            "labels": {"paperclip.io/run-id": run_id, "paperclip.io/managed-by": MANAGED_BY},
            "ownerReferences": [owner]},
        "stringData": string_data})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(v: Value) -> KubernetesConfig {
        KubernetesConfig::parse(v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn namespace_carries_pod_security_labels() {
        assert_eq!(
            namespace("paperclip-acme", "co-1"),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "paperclip-acme", "labels": {
                "paperclip.io/company-id": "co-1", "paperclip.io/managed-by": "paperclip-k8s-plugin",
                "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/audit": "restricted",
                "pod-security.kubernetes.io/warn": "restricted"}}})
        );
        let acme = namespace("paperclip-acme", "Acme, Inc.");
        let label = acme["metadata"]["labels"]["paperclip.io/company-id"]
            .as_str()
            .unwrap_or_default();
        assert!(super::super::validation::is_label_value(label), "{label}");
        assert_eq!(
            acme["metadata"]["annotations"]["paperclip.io/company-id"],
            "Acme, Inc."
        );
        assert!(
            raw_id_annotations("run-1", "co-1").is_empty()
                && raw_id_annotations("run 1", "co-1").len() == 1
        );
        assert_eq!(
            role("ns")["rules"],
            json!([{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}])
        );
        assert!(role("ns")["metadata"].get("labels").is_none());
        assert_eq!(
            service_account("ns", &BTreeMap::from([("a".to_owned(), "b".to_owned())]))["metadata"]
                ["annotations"],
            json!({"a": "b"})
        );
    }

    #[test]
    fn standard_policy_rules() {
        let fqdns = vec!["api.anthropic.com".to_owned()];
        let cidrs = vec!["203.0.113.0/24".to_owned()];
        let server = BTreeMap::from([("app".to_owned(), "paperclip-server".to_owned())]);
        let tenant = EgressSpec {
            name: EGRESS_ALLOW,
            namespace: "ns",
            run_id: None,
            include_base_rules: true,
            fqdns: &fqdns,
            cidrs: &[],
            owner: None,
            server_namespace: SERVER_NAMESPACE,
            server_selector: &server,
        };
        let p = egress_network_policy(&tenant);
        assert_eq!(
            p["spec"]["podSelector"],
            json!({"matchLabels": {"paperclip.io/role": "agent"}})
        );
        let egress = p["spec"]["egress"].as_array().unwrap();
        assert_eq!(egress.len(), 3, "dns, callback, public fallback");
        assert_eq!(
            egress[2]["to"][0]["ipBlock"]["except"]
                .as_array()
                .unwrap()
                .len(),
            8
        );
        assert_eq!(
            egress[2]["ports"],
            json!([{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}])
        );
        let with_cidr = EgressSpec {
            cidrs: &cidrs,
            ..tenant.clone()
        };
        let egress = egress_network_policy(&with_cidr)["spec"]["egress"].clone();
        assert_eq!(
            egress.as_array().unwrap().len(),
            3,
            "no fallback with CIDRs"
        );
        assert_eq!(
            egress[2],
            json!({"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]})
        );
        let owner = owner_reference("batch/v1", "Job", "pc-workload", "uid-1", false);
        let scoped = EgressSpec {
            name: "pc-workload-egress",
            run_id: Some("run-1"),
            include_base_rules: false,
            owner: Some(&owner),
            ..tenant
        };
        let p = egress_network_policy(&scoped);
        assert_eq!(p["metadata"]["name"], "pc-workload-egress");
        assert_eq!(
            p["spec"]["podSelector"],
            json!({"matchLabels": {"paperclip.io/run-id": "run-1"}})
        );
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], false);
        assert_eq!(p["spec"]["egress"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn cilium_policy_has_dns_visibility() {
        let fqdns = vec!["api.anthropic.com".to_owned()];
        let cidrs = vec!["10.0.0.0/8".to_owned()];
        let p = cilium_network_policy(&EgressSpec {
            name: EGRESS_FQDN,
            namespace: "ns",
            run_id: None,
            include_base_rules: true,
            fqdns: &fqdns,
            cidrs: &cidrs,
            owner: None,
            server_namespace: "ops",
            server_selector: &BTreeMap::from([("role".to_owned(), "api".to_owned())]),
        });
        assert_eq!(p["apiVersion"], "cilium.io/v2");
        let e = &p["spec"]["egress"];
        assert_eq!(
            e[0]["toPorts"][0]["rules"],
            json!({"dns": [{"matchPattern": "*"}]})
        );
        assert_eq!(e[1]["toFQDNs"], json!([{"matchName": "api.anthropic.com"}]));
        assert_eq!(e[2]["toPorts"][0]["ports"][0]["port"], "3100");
        assert_eq!(
            e[2]["toEndpoints"][0]["matchLabels"],
            json!({"k8s:io.kubernetes.pod.namespace": "ops", "role": "api"})
        );
        assert_eq!(e[3], json!({"toCIDRSet": [{"cidr": "10.0.0.0/8"}]}));
    }

    #[test]
    fn sandbox_and_job_manifests() {
        let c = config(
            json!({"inCluster": true, "runtimeClassName": "kata-fc", "imagePullSecrets": ["regcred"]}),
        );
        let labels = super::super::naming::run_labels("run-1", "co", "claude_local");
        let inputs = PodInputs {
            image: "img:v1",
            secret_name: "pc-x-env",
            labels: &labels,
            annotations: &BTreeMap::new(),
            config: &c,
        };
        let s = sandbox("v1beta1", "pc-x", "ns", &inputs);
        assert_eq!(s["apiVersion"], "agents.x-k8s.io/v1beta1");
        assert!(s["metadata"].get("ownerReferences").is_none());
        let pod = &s["spec"]["podTemplate"];
        assert_eq!(pod["metadata"]["labels"]["paperclip.io/role"], "agent");
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["runtimeClassName"], "kata-fc");
        assert_eq!(
            pod["spec"]["imagePullSecrets"],
            json!([{"name": "regcred"}])
        );
        assert_eq!(pod["spec"]["securityContext"], pod_security_context());
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            container["command"],
            json!(["/usr/bin/tini", "--", "/bin/sh", "-c", "sleep infinity"])
        );
        assert_eq!(
            container["env"],
            json!([{"name": "HOME", "value": "/home/paperclip"}])
        );
        assert_eq!(
            container["securityContext"]["capabilities"],
            json!({"drop": ["ALL"]})
        );
        assert_eq!(
            container["resources"],
            json!({"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "4Gi"}})
        );
        let j = job("pc-x", "ns", &inputs);
        assert_eq!(j["spec"]["backoffLimit"], 0);
        assert_eq!(j["spec"]["ttlSecondsAfterFinished"], 900);
        assert_eq!(j["spec"]["activeDeadlineSeconds"], 3600);
        assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
        assert_eq!(
            j["spec"]["template"]["spec"]["containers"][0]["command"],
            json!(["/usr/bin/tini", "--", "/usr/local/bin/paperclip-agent-shim"])
        );
        assert!(
            j["spec"]["template"]["spec"]["containers"][0]
                .get("env")
                .is_none()
        );
        let c = config(json!({"inCluster": true, "defaultResources": {"requests": {"cpu": "1"}}}));
        let inputs = PodInputs {
            config: &c,
            ..inputs
        };
        assert_eq!(
            job("pc-x", "ns", &inputs)["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "1"})
        );
    }
}
