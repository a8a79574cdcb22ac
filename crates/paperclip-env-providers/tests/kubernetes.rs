//! The Kubernetes provider against the in-process Kubernetes API emulator:
//! the shared conformance suite for both backends, the exact tenant and pod
//! objects as the emulator stored them, cleanup proven from the store, and
//! one test per injected fault.
#![cfg(feature = "kubernetes")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, LeaseHandle, LeaseStatus, Operation, OutputCollector, ProviderConfig,
    SandboxProvider, Unsupported,
};
use paperclip_env_providers::kubernetes::{Backend, KubernetesProvider};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::kubernetes::{KubeEmulator, KubeEmulatorOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

const COMPANY: &str = "company-1";
const NS: &str = "paperclip-company-1";
const CONFORMANCE_NS: &str = "paperclip-conformance-company";
const RUN_KINDS: [&str; 4] = ["Sandbox", "Job", "Pod", "Secret"];

fn provider(backend: Backend) -> KubernetesProvider {
    KubernetesProvider::builder()
        .backend(backend)
        .request_timeout(Duration::from_secs(10))
        .poll_interval(Duration::from_millis(50))
        .ready_timeout(Duration::from_secs(20))
        .retries(2)
        .exec_liveness_interval(Duration::from_secs(2))
        .host_env(BTreeMap::from([(
            "ANTHROPIC_API_KEY".to_owned(),
            SecretString::from("sk-ant-host-value"),
        )]))
        .build()
}

fn ctx(emulator: &KubeEmulator, config: Value) -> CallContext {
    CallContext {
        company_id: Some(COMPANY.into()),
        environment_id: "env-1".into(),
        issue_id: None,
        config: ProviderConfig::new(config.as_object().cloned().unwrap_or_default())
            .with_secret("kubeconfig", SecretString::from(emulator.kubeconfig_yaml())),
    }
}

fn handle(lease: paperclip_env_core::ProviderLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
        expires_at: lease.expires_at,
    }
}

async fn acquire(
    p: &KubernetesProvider,
    ctx: &CallContext,
    run: &str,
) -> paperclip_env_core::Result<LeaseHandle> {
    p.acquire(
        ctx,
        &AcquireRequest {
            run_id: run.into(),
            workspace_mode: None,
            ..Default::default()
        },
    )
    .await
    .map(handle)
}

/// Every per-run object (workloads, pods, env Secrets) in the store.
fn run_objects(emulator: &KubeEmulator) -> Vec<Value> {
    emulator
        .all_objects()
        .into_iter()
        .filter(|o| RUN_KINDS.contains(&o["kind"].as_str().unwrap_or_default()))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Exec sessions that ran a user command (not a liveness probe or a kill).
fn command_execs(emulator: &KubeEmulator) -> usize {
    emulator
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/exec"))
        .filter(|r| {
            percent_decode(r.query.as_deref().unwrap_or_default())
                .contains("rm -f \"$f\"; exit $rc")
        })
        .count()
}

fn requests(emulator: &KubeEmulator, method: &str, suffix: &str) -> usize {
    emulator
        .requests()
        .iter()
        .filter(|r| r.method == method && r.path.ends_with(suffix))
        .count()
}

async fn wait_no_processes(emulator: &KubeEmulator) {
    let start = Instant::now();
    while emulator.live_processes() > 0 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(emulator.live_processes(), 0, "pod processes left running");
}

/// A stored object without the fields the server fills in.
fn as_written(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(md) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            md.remove(k);
        }
    }
    if let Some(obj) = o.as_object_mut() {
        obj.remove("status");
    }
    // What the API server adds to every namespace.
    if o["kind"] == "Namespace" {
        if let Some(labels) = o
            .pointer_mut("/metadata/labels")
            .and_then(Value::as_object_mut)
        {
            labels.remove("kubernetes.io/metadata.name");
        }
        if let Some(obj) = o.as_object_mut() {
            obj.remove("spec");
        }
    }
    o
}

fn one(emulator: &KubeEmulator, api: &str, plural: &str, ns: Option<&str>, name: &str) -> Value {
    emulator
        .objects(api, plural, ns)
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{api} {plural} {name} not stored"))
}

fn fixture(emulator: &Arc<KubeEmulator>, p: &KubernetesProvider, config: Value) -> Fixture {
    let (live, creates, execs) = (emulator.clone(), emulator.clone(), emulator.clone());
    let (fa, fe, fr) = (emulator.clone(), emulator.clone(), emulator.clone());
    let mut config = config;
    config["kubeconfig"] = json!(emulator.kubeconfig_yaml());
    Fixture::new(Arc::new(p.clone()))
        .config(config)
        .invalid_config(json!({"egressAllowCidrs": ["999.0.0.0/8"]}))
        .secret_value(emulator.token().to_owned())
        .live_resources(move || run_objects(&live).len())
        .create_calls(move || {
            requests(&creates, "POST", "/sandboxes") + requests(&creates, "POST", "/jobs")
        })
        .execute_calls(move || command_execs(&execs))
        .fail_next_acquire(move || {
            fa.faults().server_error(
                "POST",
                &format!("/api/v1/namespaces/{CONFORMANCE_NS}/secrets"),
                1,
            )
        })
        .fail_next_execute(move || fe.faults().exec_never_answers())
        .fail_next_release(move || fr.faults().server_error("DELETE", "/apis/", 3))
        .call_timeout(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_cr_passes_conformance() {
    let emulator = Arc::new(KubeEmulator::start().await.unwrap());
    let p = provider(Backend::SandboxCr);
    let report = conformance::run(&fixture(&emulator, &p, json!({}))).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert!(
        report
            .skipped()
            .iter()
            .all(|id| ["A2.8", "A3.1", "A3.3", "A3.4", "A6.12", "A6.14", "A7.2"].contains(id)),
        "unexpected skips: {:?}",
        report.skipped()
    );
    assert_eq!(
        run_objects(&emulator),
        Vec::<Value>::new(),
        "conformance left run objects"
    );
    wait_no_processes(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_backend_passes_the_conformance_lines_it_declares() {
    let emulator = Arc::new(KubeEmulator::start().await.unwrap());
    let p = provider(Backend::Job);
    assert!(!p.capabilities().execute && !p.capabilities().multi_command_exec);
    let report = conformance::run(&fixture(&emulator, &p, json!({"backend": "job"}))).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert!(
        report.passed().contains(&"A7.2"),
        "execute must be refused with a typed error"
    );
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    wait_no_processes(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_objects_are_exact_and_created_once_in_order() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(
        &emulator,
        json!({"serviceAccountAnnotations": {"iam.example.com/role": "agent"}, "egressAllowCidrs": ["203.0.113.0/24"]}),
    );
    let lease = acquire(&p, &c, "run-1").await.unwrap();
    let posts: Vec<String> = emulator
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        posts,
        [
            "/api/v1/namespaces".to_owned(),
            format!("/api/v1/namespaces/{NS}/serviceaccounts"),
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles"),
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings"),
            format!("/api/v1/namespaces/{NS}/resourcequotas"),
            format!("/api/v1/namespaces/{NS}/limitranges"),
            format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"),
            format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"),
            format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes"),
            format!("/api/v1/namespaces/{NS}/secrets"),
        ]
    );
    let managed = json!({"paperclip.io/managed-by": "paperclip-k8s-plugin"});
    assert_eq!(
        as_written(&one(&emulator, "v1", "namespaces", None, NS)),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": {
            "paperclip.io/company-id": COMPANY, "paperclip.io/managed-by": "paperclip-k8s-plugin",
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/audit": "restricted",
            "pod-security.kubernetes.io/warn": "restricted"}}})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "v1",
            "serviceaccounts",
            Some(NS),
            "paperclip-tenant-sa"
        )),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "paperclip-tenant-sa", "namespace": NS,
            "annotations": {"iam.example.com/role": "agent"}, "labels": managed}})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "rbac.authorization.k8s.io/v1",
            "roles",
            Some(NS),
            "paperclip-tenant-role"
        )),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "paperclip-tenant-role", "namespace": NS},
            "rules": [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "rbac.authorization.k8s.io/v1",
            "rolebindings",
            Some(NS),
            "paperclip-tenant-rb"
        )),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "paperclip-tenant-rb", "namespace": NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "paperclip-tenant-role"},
            "subjects": [{"kind": "ServiceAccount", "name": "paperclip-tenant-sa", "namespace": NS}]})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "v1",
            "resourcequotas",
            Some(NS),
            "paperclip-quota"
        )),
        json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "paperclip-quota", "namespace": NS},
            "spec": {"hard": {"pods": "20", "requests.cpu": "10", "requests.memory": "20Gi", "limits.cpu": "20", "limits.memory": "40Gi"}}})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "v1",
            "limitranges",
            Some(NS),
            "paperclip-limits"
        )),
        json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "paperclip-limits", "namespace": NS},
            "spec": {"limits": [{"type": "Container", "max": {"cpu": "4", "memory": "8Gi"}, "min": {"cpu": "100m", "memory": "128Mi"},
                "default": {"cpu": "1", "memory": "2Gi"}, "defaultRequest": {"cpu": "250m", "memory": "512Mi"}}]}})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "networking.k8s.io/v1",
            "networkpolicies",
            Some(NS),
            "paperclip-deny-all"
        )),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "paperclip-deny-all", "namespace": NS, "labels": managed},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    );
    assert_eq!(
        as_written(&one(
            &emulator,
            "networking.k8s.io/v1",
            "networkpolicies",
            Some(NS),
            "paperclip-egress-allow"
        )),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "paperclip-egress-allow", "namespace": NS, "labels": managed},
            "spec": {"podSelector": {"matchLabels": {"paperclip.io/role": "agent"}}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "paperclip"}},
                         "podSelector": {"matchLabels": {"app": "paperclip-server"}}}],
                 "ports": [{"protocol": "TCP", "port": 3100}]},
                {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}})
    );
    // A second acquire by the same provider does not touch the tenant; a new
    // provider instance reads it (first write wins) and creates nothing.
    let posts_before = requests(&emulator, "POST", "");
    let second = acquire(&p, &c, "run-2").await.unwrap();
    assert_eq!(
        requests(&emulator, "POST", "") - posts_before,
        2,
        "workload + secret only"
    );
    let fresh = provider(Backend::SandboxCr);
    let c2 = ctx(
        &emulator,
        json!({"serviceAccountAnnotations": {"changed": "yes"}}),
    );
    let third = acquire(&fresh, &c2, "run-3").await.unwrap();
    assert_eq!(requests(&emulator, "POST", "") - posts_before, 4);
    assert_eq!(
        one(
            &emulator,
            "v1",
            "serviceaccounts",
            Some(NS),
            "paperclip-tenant-sa"
        )["metadata"]["annotations"],
        json!({"iam.example.com/role": "agent"})
    );
    for l in [&lease, &second, &third] {
        p.release(&c, l, LeaseStatus::Released).await.unwrap();
    }
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_mode_creates_one_network_policy_and_one_cnp() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(
        &emulator,
        json!({"egressMode": "cilium", "egressAllowFqdns": ["github.com"], "egressAllowCidrs": ["10.1.0.0/16"]}),
    );
    let lease = acquire(&p, &c, "run-c").await.unwrap();
    let nps = emulator.objects("networking.k8s.io/v1", "networkpolicies", Some(NS));
    assert_eq!(nps.len(), 1);
    assert_eq!(nps[0]["metadata"]["name"], "paperclip-deny-all");
    let cnps = emulator.objects("cilium.io/v2", "ciliumnetworkpolicies", Some(NS));
    assert_eq!(cnps.len(), 1);
    assert_eq!(
        as_written(&cnps[0]),
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "paperclip-egress-fqdn", "namespace": NS, "labels": {"paperclip.io/managed-by": "paperclip-k8s-plugin"}},
            "spec": {"endpointSelector": {"matchLabels": {"paperclip.io/role": "agent"}}, "egress": [
                {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
                 "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}],
                              "rules": {"dns": [{"matchPattern": "*"}]}}]},
                {"toFQDNs": [{"matchName": "api.anthropic.com"}, {"matchName": "github.com"}],
                 "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
                {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "paperclip", "app": "paperclip-server"}}],
                 "toPorts": [{"ports": [{"port": "3100", "protocol": "TCP"}]}]},
                {"toCIDRSet": [{"cidr": "10.1.0.0/16"}]}]}})
    );
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_security_baseline_on_the_run_pod_and_release_deletes_everything() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({"runtimeClassName": "kata-fc"}));
    // RuntimeClass admission: the class must exist before a pod names it.
    let err = acquire(&p, &c, "run-psa").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("pod rejected: RuntimeClass \"kata-fc\" not found"),
        "{err}"
    );
    api(
        &emulator,
        http::Method::POST,
        "/apis/node.k8s.io/v1/runtimeclasses",
        "application/json",
        Some(json!({"metadata": {"name": "kata-fc"}, "handler": "kata"})),
    )
    .await;
    let lease = acquire(&p, &c, "run-psa").await.unwrap();
    let name = lease.id().unwrap().to_owned();
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["namespace"], NS);
    assert_eq!(md["backend"], "sandbox-cr");
    assert_eq!(md["sandboxApiVersion"], "v1beta1");
    assert_eq!(md["secretName"], format!("{name}-env"));
    assert_eq!(
        md["podName"], name,
        "the controller names the pod like the Sandbox"
    );
    assert!(name.len() == 29 && name.starts_with("pc-"));

    let sandbox = one(
        &emulator,
        "agents.x-k8s.io/v1beta1",
        "sandboxes",
        Some(NS),
        &name,
    );
    assert!(sandbox["metadata"].get("ownerReferences").is_none());
    assert_eq!(
        sandbox["metadata"]["labels"]["paperclip.io/run-id"],
        "run-psa"
    );
    let pod = one(&emulator, "v1", "pods", Some(NS), &name);
    let spec = &pod["spec"];
    assert_eq!(
        spec["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(spec["runtimeClassName"], "kata-fc");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["serviceAccountName"], "paperclip-tenant-sa");
    assert_eq!(spec["restartPolicy"], "Always");
    let container = &spec["containers"][0];
    assert_eq!(container["name"], "agent");
    assert_eq!(
        container["image"],
        "ghcr.io/paperclipai/agent-runtime-claude:v1"
    );
    assert_eq!(
        container["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "workspace", "mountPath": "/workspace"}, {"name": "home", "mountPath": "/home/paperclip"},
            {"name": "cache", "mountPath": "/home/paperclip/.cache"}, {"name": "tmp", "mountPath": "/tmp"}])
    );
    assert_eq!(
        spec["volumes"],
        json!([{"name": "workspace", "emptyDir": {"sizeLimit": "8Gi"}}, {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}])
    );
    assert_eq!(pod["metadata"]["labels"]["paperclip.io/role"], "agent");

    let secret = one(&emulator, "v1", "secrets", Some(NS), &format!("{name}-env"));
    assert_eq!(
        secret["metadata"]["ownerReferences"],
        json!([{"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "name": name,
            "uid": sandbox["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}])
    );
    assert_eq!(
        secret["metadata"]["labels"],
        json!({"paperclip.io/run-id": "run-psa", "paperclip.io/managed-by": "paperclip-k8s-plugin"})
    );
    let data = secret["data"].as_object().unwrap();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    for k in [
        "ANTHROPIC_API_KEY",
        "BOOTSTRAP_TOKEN",
        "PAPERCLIP_NETWORK_EGRESS_POLICY",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert!(
        !serde_json::to_string(&md)
            .unwrap()
            .contains("sk-ant-host-value")
    );

    // The pod sees the Secret through envFrom.
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::shell("printf %s \"$PAPERCLIP_NETWORK_EGRESS_POLICY\""),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(out.finish(exit).stdout, "kubernetes-default-deny");

    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    let delete = emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE" && r.path.ends_with(&format!("/sandboxes/{name}")))
        .unwrap();
    assert_eq!(
        delete.query_param("propagationPolicy").as_deref(),
        Some("Foreground")
    );
    let left: Vec<Value> = emulator
        .all_objects()
        .into_iter()
        .filter(|o| serde_json::to_string(o).unwrap().contains(&name))
        .collect();
    assert_eq!(left, Vec::<Value>::new(), "release left per-run objects");
    wait_no_processes(&emulator).await;
    // Releasing again (404) is success.
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_exec_stream_is_a_retryable_error_not_a_hang() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-drop").await.unwrap();
    emulator.faults().drop_exec_after(4);
    let out = OutputCollector::buffered();
    // The exec budget is the default hour: only loss detection can end this.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        p.execute(
            &c,
            &lease,
            &ExecuteRequest::shell("printf 'abcdefgh'; sleep 20"),
            &out,
        ),
    )
    .await
    .expect("a dropped exec stream hung")
    .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains("lost its exec connection"),
        "{err}"
    );
    // The next command works.
    let out = OutputCollector::buffered();
    let exit = p
        .execute(&c, &lease, &ExecuteRequest::new("echo").arg("ok"), &out)
        .await
        .unwrap();
    assert_eq!(out.finish(exit).stdout, "ok\n");
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    wait_no_processes(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_that_never_answers_times_out_and_a_timeout_kills_the_command() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-hang").await.unwrap();
    emulator.faults().exec_never_answers();
    let out = OutputCollector::buffered();
    let exit = tokio::time::timeout(
        Duration::from_secs(30),
        p.execute(
            &c,
            &lease,
            &ExecuteRequest::new("true").timeout_ms(500),
            &out,
        ),
    )
    .await
    .expect("an exec that never answers hung")
    .unwrap();
    assert!(exit.timed_out && exit.exit_code.is_none());
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::shell("sleep 30").timeout_ms(300),
            &out,
        )
        .await
        .unwrap();
    assert!(exit.timed_out);
    let killed = emulator
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/exec"))
        .any(|r| percent_decode(r.query.as_deref().unwrap_or_default()).contains("kill -KILL"));
    assert!(killed, "a timed-out command is killed by a second exec");
    wait_no_processes(&emulator).await;
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_command_is_killed_in_the_pod_even_when_exec_outlives_its_client() {
    // As on a real node, closing the exec socket does not stop the process.
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        keep_exec_processes: true,
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-kill").await.unwrap();
    let out = OutputCollector::buffered();
    let request = ExecuteRequest::shell("sleep 30 & sleep 30; wait").timeout_ms(400);
    let exit = p.execute(&c, &lease, &request, &out).await.unwrap();
    assert!(exit.timed_out && exit.exit_code.is_none());
    wait_no_processes(&emulator).await;
    let out = OutputCollector::buffered();
    let exit = p
        .execute(&c, &lease, &ExecuteRequest::new("true"), &out)
        .await
        .unwrap();
    assert_eq!(exit.exit_code, Some(0));
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_fails_fast_and_leaves_nothing() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    emulator.faults().unschedulable_next_pod();
    // The readiness budget is 20 s: failing fast means well inside it.
    let err = tokio::time::timeout(Duration::from_secs(10), acquire(&p, &c, "run-u"))
        .await
        .expect("an unschedulable pod did not fail fast")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("Sandbox {NS}/pc-")) && text.contains(" failed: Unschedulable — "),
        "{text}"
    );
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());

    emulator.faults().fail_next_pod();
    let err = acquire(&p, &c, "run-f").await.unwrap_err();
    assert!(err.to_string().contains("failed: PodFailed — "), "{err}");
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_server_errors() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    // 409 on a tenant create is a race with another acquire: tolerated.
    emulator.faults().conflict_on_next_create("roles");
    let lease = acquire(&p, &c, "run-1").await.unwrap();
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    // 409 on the workload create is an error, typed, and nothing is left.
    emulator.faults().conflict_on_next_create("sandboxes");
    let err = acquire(&p, &c, "run-2").await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    // 5xx on an idempotent GET is retried.
    emulator
        .faults()
        .server_error("GET", &format!("/api/v1/namespaces/{NS}/pods/"), 2);
    let lease = acquire(&p, &c, "run-3").await.unwrap();
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    // 5xx on a create is not retried: one POST, a retryable error, nothing left.
    let posts = requests(&emulator, "POST", "/sandboxes");
    emulator
        .faults()
        .server_error("POST", "/apis/agents.x-k8s.io", 1);
    let err = acquire(&p, &c, "run-4").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(requests(&emulator, "POST", "/sandboxes") - posts, 1);
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    // A failed release is reported, not swallowed.
    let lease = acquire(&p, &c, "run-5").await.unwrap();
    emulator
        .faults()
        .server_error("DELETE", "/apis/agents.x-k8s.io", 3);
    assert!(p.release(&c, &lease, LeaseStatus::Released).await.is_err());
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1alpha1_only_cluster_and_missing_agent_sandbox() {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        sandbox_versions: vec!["v1alpha1".into()],
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-a").await.unwrap();
    let name = lease.id().unwrap().to_owned();
    assert_eq!(
        lease.metadata.as_ref().unwrap()["sandboxApiVersion"],
        "v1alpha1"
    );
    let sandbox = one(
        &emulator,
        "agents.x-k8s.io/v1alpha1",
        "sandboxes",
        Some(NS),
        &name,
    );
    assert_eq!(sandbox["apiVersion"], "agents.x-k8s.io/v1alpha1");
    let secret = one(&emulator, "v1", "secrets", Some(NS), &format!("{name}-env"));
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["apiVersion"],
        "agents.x-k8s.io/v1alpha1"
    );
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());

    let bare = KubeEmulator::start_with(KubeEmulatorOptions {
        sandbox_versions: vec![],
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let err = acquire(
        &provider(Backend::SandboxCr),
        &ctx(&bare, json!({})),
        "run-b",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("API group agents.x-k8s.io is not served by this cluster."),
        "{err}"
    );
    // The job backend needs no agent-sandbox.
    let job = provider(Backend::Job);
    let c = ctx(&bare, json!({"backend": "job"}));
    let lease = acquire(&job, &c, "run-j").await.unwrap();
    job.release(&c, &lease, LeaseStatus::Released)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_backend_runs_once_and_refuses_commands() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::Job);
    let c = ctx(
        &emulator,
        json!({"backend": "job", "jobTtlSecondsAfterFinished": 60, "podActivityDeadlineSec": 120}),
    );
    let lease = acquire(&p, &c, "run-job").await.unwrap();
    let name = lease.id().unwrap().to_owned();
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["backend"], "job");
    assert_eq!(md["nativeFileSyncUnsupported"], true);
    let job = one(&emulator, "batch/v1", "jobs", Some(NS), &name);
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 60);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 120);
    let template = &job["spec"]["template"]["spec"];
    assert_eq!(template["restartPolicy"], "Never");
    assert_eq!(
        template["containers"][0]["command"],
        json!(["/usr/bin/tini", "--", "/usr/local/bin/paperclip-agent-shim"])
    );
    let outcome = p
        .wait_for_job(&c, &lease, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(outcome.phase, "Succeeded");
    assert_eq!(outcome.exit_code, Some(0));
    assert!(
        outcome.log.contains("paperclip-agent-shim: run"),
        "{:?}",
        outcome.log
    );
    let pod = outcome.pod_name.unwrap();
    assert!(pod.starts_with(&format!("{name}-")));
    let err = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::new("true"),
            &OutputCollector::buffered(),
        )
        .await
        .unwrap_err();
    match &err {
        Error::NotSupported { operation, .. } => assert_eq!(*operation, Operation::Execute),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("job backend"), "{err}");
    // A finished Job cannot be resumed.
    let resumed = p.resume(&c, &lease).await.unwrap();
    assert!(resumed.id().is_none());
    p.destroy(&c, &lease).await.unwrap();
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    wait_no_processes(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_refuses_commands_on_the_job_backend() {
    // The lease's recorded backend decides, whatever the instance defaults to.
    for instance_backend in [Backend::Job, Backend::SandboxCr] {
        let emulator = KubeEmulator::start().await.unwrap();
        let secrets = Arc::new(InMemorySecretResolver::new());
        let kubeconfig_id = secrets.insert(emulator.kubeconfig_yaml());
        let runtime = EnvironmentRuntime::builder()
            .provider(Arc::new(provider(instance_backend)))
            .secrets(secrets)
            .build();
        let env = Environment::new(
            "env-job",
            "Kubernetes jobs",
            "sandbox",
            json!({"provider": "kubernetes", "kubeconfig": kubeconfig_id, "backend": "job"}),
        );
        let lease = runtime
            .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-rt-job"))
            .await
            .unwrap()
            .lease;
        assert_eq!(lease.metadata_str("backend"), Some("job"));
        let execs_before = requests(&emulator, "GET", "/exec");
        let err = runtime
            .execute(&env, &lease, &ExecuteRequest::new("true"))
            .await
            .unwrap_err();
        match &err {
            Error::NotSupported {
                operation: Operation::Execute,
                by: Unsupported::Provider(by),
            } => assert_eq!(by, "kubernetes (job backend)", "{instance_backend:?}"),
            other => panic!("{instance_backend:?}: {other:?}"),
        }
        assert!(
            err.to_string().contains("kubernetes (job backend)"),
            "{err}"
        );
        assert_eq!(
            requests(&emulator, "GET", "/exec"),
            execs_before,
            "nothing reached the pod"
        );
        runtime
            .release_run_leases("run-rt-job", LeaseStatus::Released)
            .await
            .into_result()
            .unwrap();
        assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_archives_travel_through_exec_and_tar() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-ws").await.unwrap();
    let transport = p.workspace_transport(&c, &lease).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/hello.txt"), "hello from the host\n").unwrap();
    let archive = dir.path().join("in.tar");
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    transport
        .put_file(&archive, "/tmp/in.tar", 10_000)
        .await
        .unwrap();
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::shell("mkdir -p /workspace/repo && tar -xf /tmp/in.tar -C /workspace/repo && cat /workspace/repo/sub/hello.txt && tar -cf /tmp/out.tar -C /workspace/repo ."),
            &out,
        )
        .await
        .unwrap();
    let result = out.finish(exit);
    assert_eq!(result.exit_code, Some(0), "{}", result.stderr);
    assert_eq!(result.stdout, "hello from the host\n");
    let back = dir.path().join("out.tar");
    transport
        .get_file("/tmp/out.tar", &back, 10_000)
        .await
        .unwrap();
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&back)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("sub/hello.txt"));
    // Realize creates a requested directory inside the pod.
    let ws = paperclip_env_core::WorkspaceSpec {
        remote_path: Some("/workspace/other".into()),
        ..Default::default()
    };
    let mut without_cwd = lease.clone();
    if let Some(md) = without_cwd.metadata.as_mut() {
        md.remove("remoteCwd");
    }
    let realized = p.realize_workspace(&c, &without_cwd, &ws).await.unwrap();
    assert_eq!(realized.cwd, "/workspace/other");
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::new("test").args(["-d", "/workspace/other"]),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(exit.exit_code, Some(0));
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_and_resume() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let before = emulator.all_objects().len();
    let probe = p.probe(&c).await.unwrap();
    assert!(probe.ok, "{probe:?}");
    assert_eq!(
        probe.summary.as_deref(),
        Some(format!("Kubernetes cluster reachable. Tenant namespace: {NS}.").as_str())
    );
    assert_eq!(
        emulator.all_objects().len(),
        before,
        "the probe creates nothing"
    );
    let bad = CallContext {
        config: ProviderConfig::new(json!({"egressMode": "x"}).as_object().cloned().unwrap()),
        ..c.clone()
    };
    let probe = p.probe(&bad).await.unwrap();
    assert!(!probe.ok);
    assert_eq!(
        probe.summary.as_deref(),
        Some("Invalid Kubernetes provider configuration.")
    );
    emulator
        .faults()
        .server_error("GET", &format!("/api/v1/namespaces/{NS}/pods"), 3);
    let probe = p.probe(&c).await.unwrap();
    assert!(!probe.ok);
    assert_eq!(
        probe.summary.as_deref(),
        Some("Kubernetes cluster probe failed.")
    );

    let lease = acquire(&p, &c, "run-r").await.unwrap();
    // A fresh provider (another worker) resumes from the lease metadata alone.
    let other = provider(Backend::SandboxCr);
    let resumed = other.resume(&c, &lease).await.unwrap();
    assert_eq!(resumed.id(), lease.id());
    let md = resumed.metadata.clone().unwrap();
    assert_eq!(md["resumedLease"], true);
    assert_eq!(md["phase"], "Running");
    let out = OutputCollector::buffered();
    let exit = other
        .execute(
            &c,
            &handle(resumed),
            &ExecuteRequest::new("echo").arg("back"),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(out.finish(exit).stdout, "back\n");
    p.destroy(&c, &lease).await.unwrap();
    let gone = other.resume(&c, &lease).await.unwrap();
    assert!(gone.id().is_none());
    assert_eq!(
        gone.metadata.unwrap()["reason"],
        "Sandbox CR no longer exists"
    );
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_timed_out_is_cleaned_up_when_it_lands_late() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = KubernetesProvider::builder()
        .request_timeout(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(50))
        .build();
    let c = ctx(&emulator, json!({}));
    // Provision the tenant first so only the workload create is slow.
    let lease = acquire(&p, &c, "run-0").await.unwrap();
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    emulator.faults().delay(
        "POST",
        "/apis/agents.x-k8s.io",
        Duration::from_millis(800),
        1,
    );
    let err = acquire(&p, &c, "run-late").await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    let start = Instant::now();
    while !run_objects(&emulator).is_empty() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        run_objects(&emulator),
        Vec::<Value>::new(),
        "the late Sandbox was left behind"
    );
    assert_eq!(
        requests(&emulator, "POST", "/sandboxes"),
        2,
        "the create was not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failures_get_the_egress_hint() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-net").await.unwrap();
    let out = OutputCollector::buffered();
    let request =
        ExecuteRequest::shell("echo 'curl: (6) Could not resolve host: example.com' >&2; exit 6");
    let exit = p.execute(&c, &lease, &request, &out).await.unwrap();
    let result = out.finish(exit);
    assert_eq!(result.exit_code, Some(6));
    assert_eq!(
        result.stderr,
        "curl: (6) Could not resolve host: example.com\n\nPaperclip network policy denied or could not route this request. No task-scoped destinations are granted. Request access through executionWorkspaceSettings.networkEgress.\n"
    );
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_works_over_v4_without_a_close_frame() {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        exec_protocols: vec!["v4.channel.k8s.io".into()],
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-v4").await.unwrap();
    let input = "héllo\nwörld\n".repeat(5000);
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::new("wc").arg("-c").stdin(input.clone()),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(out.finish(exit).stdout.trim(), input.len().to_string());
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::new("cat").stdin("").timeout_ms(5000),
            &out,
        )
        .await
        .unwrap();
    let result = out.finish(exit);
    assert!(!result.timed_out && result.stdout.is_empty());
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kubeconfig_is_a_typed_config_error_that_quotes_nothing() {
    let c = CallContext {
        company_id: Some(COMPANY.into()),
        environment_id: "env-1".into(),
        issue_id: None,
        config: ProviderConfig::new(Default::default()).with_secret(
            "kubeconfig",
            SecretString::from("token: [not-closed-secret-value"),
        ),
    };
    let p = provider(Backend::SandboxCr);
    let err = acquire(&p, &c, "run-bad").await.unwrap_err();
    match &err {
        Error::InvalidConfig { field, .. } => assert_eq!(field, "kubeconfig"),
        other => panic!("{other:?}"),
    }
    assert!(!format!("{err} {err:?}").contains("not-closed-secret-value"));
    let none = CallContext {
        config: ProviderConfig::new(Default::default()),
        ..c
    };
    let err = acquire(&p, &none, "run-none").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("kubernetes provider requires one of `inCluster` or `kubeconfig`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_over_https_with_the_kubeconfig_ca() {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        tls: true,
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    assert!(emulator.url().starts_with("https://"));
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-tls").await.unwrap();
    let out = OutputCollector::buffered();
    let exit = p
        .execute(
            &c,
            &lease,
            &ExecuteRequest::new("echo").arg("over tls"),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(out.finish(exit).stdout, "over tls\n");
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_sync_round_trip_through_the_runtime() {
    use paperclip_env_core::workspace::{SyncOptions, TransferMethod, WorkspaceSync};
    let emulator = KubeEmulator::start().await.unwrap();
    let secrets = Arc::new(InMemorySecretResolver::new());
    let kubeconfig_id = secrets.insert(emulator.kubeconfig_yaml());
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider(Backend::SandboxCr)))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-sync",
        "Kubernetes",
        "sandbox",
        json!({"provider": "kubernetes", "kubeconfig": kubeconfig_id}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-sync"))
        .await
        .unwrap()
        .lease;
    let remote = lease.remote_cwd().unwrap().to_owned();
    assert_eq!(remote, "/workspace");
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join("src/nested")).unwrap();
    std::fs::write(local.path().join("src/nested/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(local.path().join("README ☃.md"), "hello\n").unwrap();
    let sync = WorkspaceSync::for_lease(&runtime, &env, &lease)
        .await
        .unwrap();
    let uploaded = sync
        .upload(local.path(), &remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(
        uploaded.method,
        TransferMethod::Native("kubernetes-exec".into())
    );
    let read = runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("cat")
                .arg("src/nested/main.rs")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    assert_eq!(read.stdout, "fn main() {}\n");
    runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::shell("printf changed > 'README ☃.md' && printf new > added.txt")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    let downloaded = sync
        .download(
            &remote,
            local.path(),
            Some(&uploaded.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        downloaded.method,
        TransferMethod::Native("kubernetes-exec".into())
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("README ☃.md")).unwrap(),
        "changed"
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("added.txt")).unwrap(),
        "new"
    );
    runtime
        .release_run_leases("run-sync", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwd_is_honoured_inside_the_pod() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-cwd").await.unwrap();
    let out = OutputCollector::buffered();
    let request =
        ExecuteRequest::shell("mkdir -p /workspace/a/b && cd /workspace/a/b && touch here")
            .env("FOO", "it's");
    let exit = p.execute(&c, &lease, &request, &out).await.unwrap();
    assert_eq!(exit.exit_code, Some(0));
    let out = OutputCollector::buffered();
    let request = ExecuteRequest::shell("ls; printf '%s' \"$FOO\" >&2")
        .cwd("/workspace/a/b")
        .env("FOO", "it's");
    let exit = p.execute(&c, &lease, &request, &out).await.unwrap();
    let result = out.finish(exit);
    assert_eq!(
        (result.stdout.as_str(), result.stderr.as_str()),
        ("here\n", "it's")
    );
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test]
async fn kubeconfig_token_never_reaches_logs_errors_or_metadata() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let emulator = KubeEmulator::start().await.unwrap();
    let token = emulator.token().to_owned();
    let p = provider(Backend::SandboxCr);
    let secrets = Arc::new(InMemorySecretResolver::new());
    let kubeconfig_id = secrets.insert(emulator.kubeconfig_yaml());
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(p.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-k",
        "Kubernetes",
        "sandbox",
        json!({"provider": "kubernetes", "kubeconfig": kubeconfig_id}),
    );
    runtime.environment_store().put(env.clone()).await.unwrap();
    let record = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-secret"))
        .await
        .unwrap();
    let shown = format!("{record:?} {:?}", record.lease.metadata);
    assert!(!shown.contains(&token));
    let c = ctx(&emulator, json!({}));
    assert!(!format!("{c:?} {p:?}").contains(&token));
    // An error path: a 401 from a wrong token names no token.
    let wrong = CallContext {
        config: ProviderConfig::new(Default::default()).with_secret(
            "kubeconfig",
            SecretString::from(
                emulator
                    .kubeconfig_yaml()
                    .replace(&token, "wrong-token-value"),
            ),
        ),
        ..c.clone()
    };
    let err = provider(Backend::SandboxCr).probe(&wrong).await.unwrap();
    assert!(!err.ok);
    let text = format!("{err:?}");
    assert!(
        !text.contains("wrong-token-value") && !text.contains(&token),
        "{text}"
    );
    let err = acquire(&provider(Backend::SandboxCr), &wrong, "run-x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(!format!("{err:?} {err}").contains("wrong-token-value"));
    runtime
        .release_run_leases("run-secret", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let logs = capture.text();
    assert!(!logs.is_empty());
    assert!(!logs.contains(&token), "the token reached a log line");
    assert!(
        !logs.contains("sk-ant-host-value"),
        "an adapter key reached a log line"
    );
}

fn ctx_for_company(emulator: &KubeEmulator, company: &str, config: Value) -> CallContext {
    CallContext {
        company_id: Some(company.into()),
        ..ctx(emulator, config)
    }
}

/// A raw JSON request to the emulator through the `kube` client.
async fn api(
    emulator: &KubeEmulator,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Option<Value>,
) -> Value {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&emulator.kubeconfig_yaml()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .unwrap();
    client.request::<Value>(request).await.unwrap()
}

/// Creates the tenant namespace and a `paperclip-quota` allowing no pods
/// before the provider does, so the provider leaves them as they are.
async fn namespace_without_pod_quota(emulator: &KubeEmulator, ns: &str) {
    api(
        emulator,
        http::Method::POST,
        "/api/v1/namespaces",
        "application/json",
        Some(json!({"metadata": {"name": ns}})),
    )
    .await;
    api(
        emulator,
        http::Method::POST,
        &format!("/api/v1/namespaces/{ns}/resourcequotas"),
        "application/json",
        Some(json!({"metadata": {"name": "paperclip-quota"}, "spec": {"hard": {"pods": "0"}}})),
    )
    .await;
}

#[tokio::test]
async fn a_company_whose_id_is_no_label_value_still_gets_a_tenant() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let long = format!("acme-{}", "x".repeat(80));
    for company in ["Acme, Inc.", long.as_str()] {
        let c = ctx_for_company(&emulator, company, json!({}));
        let lease = acquire(&p, &c, "run 1 / Acme").await.unwrap();
        let ns = lease.metadata_str("namespace").unwrap().to_owned();
        let namespace = one(&emulator, "v1", "namespaces", None, &ns);
        let label = namespace["metadata"]["labels"]["paperclip.io/company-id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(label.len() <= 63 && label != company, "{label}");
        assert_eq!(
            namespace["metadata"]["annotations"]["paperclip.io/company-id"],
            company
        );
        let sandbox = one(
            &emulator,
            "agents.x-k8s.io/v1beta1",
            "sandboxes",
            Some(&ns),
            lease.id().unwrap(),
        );
        assert_eq!(
            sandbox["metadata"]["labels"]["paperclip.io/company-id"],
            label
        );
        assert_eq!(
            sandbox["metadata"]["annotations"]["paperclip.io/run-id"],
            "run 1 / Acme"
        );
        let out = OutputCollector::buffered();
        let exit = p
            .execute(&c, &lease, &ExecuteRequest::new("echo").arg("ok"), &out)
            .await
            .unwrap();
        assert_eq!(out.finish(exit).stdout, "ok\n");
        p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    }
}

#[tokio::test]
async fn config_values_a_cluster_would_refuse_fail_validation_naming_the_field() {
    let p = provider(Backend::SandboxCr);
    let validation = p
        .validate_config(
            json!({"inCluster": true, "egressAllowFqdns": ["*.example.com"],
                "serviceAccountAnnotations": {"bad key!": "x"},
                "defaultResources": {"requests": {"cpu": "3"}, "limits": {"cpu": "1"}}})
            .as_object()
            .unwrap(),
        )
        .await
        .unwrap();
    let fields: Vec<String> = validation.errors.iter().map(|i| i.field.clone()).collect();
    assert_eq!(
        fields,
        [
            "egressAllowFqdns.0",
            "defaultResources.requests.cpu",
            "serviceAccountAnnotations.bad key!"
        ],
        "{:?}",
        validation.errors
    );
}

#[tokio::test]
async fn a_quota_refused_run_fails_fast_with_the_quota_message() {
    let emulator = KubeEmulator::start().await.unwrap();
    namespace_without_pod_quota(&emulator, NS).await;
    // The ready budget is a minute: only a fast failure ends within the deadline.
    let slow = |backend| {
        KubernetesProvider::builder()
            .backend(backend)
            .poll_interval(Duration::from_millis(50))
            .ready_timeout(Duration::from_secs(60))
            .build()
    };
    let c = ctx(&emulator, json!({}));
    for backend in [Backend::SandboxCr, Backend::Job] {
        let p = slow(backend);
        let err = tokio::time::timeout(Duration::from_secs(10), acquire(&p, &c, "run-quota"))
            .await
            .expect("a quota refusal must not wait for the ready budget")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "exceeded quota: paperclip-quota, requested: pods=1, used: pods=0, limited: pods=0"
            ),
            "{backend:?}: {text}"
        );
    }
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_fast() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = KubernetesProvider::builder()
        .poll_interval(Duration::from_millis(50))
        .ready_timeout(Duration::from_secs(60))
        .build();
    let c = ctx(
        &emulator,
        json!({"imageRegistry": "registry.invalid/paperclip"}),
    );
    let err = tokio::time::timeout(Duration::from_secs(10), acquire(&p, &c, "run-pull"))
        .await
        .expect("an image pull failure must not wait for the ready budget")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        (text.contains("ErrImagePull") || text.contains("ImagePullBackOff"))
            && text.contains("registry.invalid"),
        "{text}"
    );
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
    // The job backend: the acquire returns with the pod, the wait fails fast.
    let jobs = KubernetesProvider::builder()
        .backend(Backend::Job)
        .poll_interval(Duration::from_millis(50))
        .ready_timeout(Duration::from_secs(60))
        .build();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let lease = acquire(&jobs, &c, "run-pull-job").await?;
        let waited = jobs.wait_for_job(&c, &lease, Duration::from_secs(60)).await;
        jobs.destroy(&c, &lease).await?;
        waited
    })
    .await
    .expect("an image pull failure must not wait for the Job deadline");
    let text = outcome.unwrap_err().to_string();
    assert!(text.contains("registry.invalid"), "{text}");
}

#[tokio::test]
async fn realize_refuses_a_path_on_the_read_only_root_filesystem() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-ro").await.unwrap();
    let mut without_cwd = lease.clone();
    if let Some(md) = without_cwd.metadata.as_mut() {
        md.remove("remoteCwd");
    }
    for path in ["/srv/work", "/workspace/../etc"] {
        let ws = paperclip_env_core::WorkspaceSpec {
            remote_path: Some(path.into()),
            ..Default::default()
        };
        let err = p
            .realize_workspace(&c, &without_cwd, &ws)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, Error::InvalidInput { .. }) && text.contains("read-only"),
            "{path}: {text}"
        );
    }
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test]
async fn a_deleting_sandbox_is_reported_as_expired() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-deleting").await.unwrap();
    let id = lease.id().unwrap().to_owned();
    let path = format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes/{id}");
    let merge = "application/merge-patch+json";
    // A finalizer holds the Sandbox in deletion, as a controller's would.
    api(
        &emulator,
        http::Method::PATCH,
        &path,
        merge,
        Some(json!({"metadata": {"finalizers": ["example.com/hold"]}})),
    )
    .await;
    api(
        &emulator,
        http::Method::DELETE,
        &path,
        "application/json",
        None,
    )
    .await;
    let sandbox = one(
        &emulator,
        "agents.x-k8s.io/v1beta1",
        "sandboxes",
        Some(NS),
        &id,
    );
    assert!(sandbox["metadata"]["deletionTimestamp"].is_string());
    let out = OutputCollector::buffered();
    let err = p
        .execute(&c, &lease, &ExecuteRequest::new("true"), &out)
        .await
        .unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("being deleted"),
        "{err}"
    );
    assert!(p.workspace_transport(&c, &lease).await.is_err());
    let resumed = p.resume(&c, &lease).await.unwrap();
    let md = resumed.metadata.unwrap();
    assert_eq!(md["expired"], true, "{md:?}");
    // Dropping the finalizer lets the deletion finish.
    api(
        &emulator,
        http::Method::PATCH,
        &path,
        merge,
        Some(json!({"metadata": {"finalizers": null}})),
    )
    .await;
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    let start = Instant::now();
    while !run_objects(&emulator).is_empty() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(run_objects(&emulator), Vec::<Value>::new());
}

#[tokio::test]
async fn a_sandbox_whose_pod_is_terminating_is_not_ready() {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        pod_termination: Duration::from_secs(30),
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-pod-deleting").await.unwrap();
    let pod = lease.metadata_str("podName").unwrap().to_owned();
    let out = OutputCollector::buffered();
    p.execute(&c, &lease, &ExecuteRequest::new("true"), &out)
        .await
        .unwrap();
    // The node is draining the pod: it stays, with a deletionTimestamp.
    api(
        &emulator,
        http::Method::DELETE,
        &format!("/api/v1/namespaces/{NS}/pods/{pod}?gracePeriodSeconds=30"),
        "application/json",
        None,
    )
    .await;
    assert!(
        one(&emulator, "v1", "pods", Some(NS), &pod)["metadata"]["deletionTimestamp"].is_string()
    );
    let err = p
        .execute(&c, &lease, &ExecuteRequest::new("true"), &out)
        .await
        .unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("being deleted"),
        "{err}"
    );
    let md = p.resume(&c, &lease).await.unwrap().metadata.unwrap();
    assert_eq!(md["expired"], true, "{md:?}");
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test]
async fn binary_files_round_trip_through_exec_unchanged() {
    let emulator = KubeEmulator::start().await.unwrap();
    let p = provider(Backend::SandboxCr);
    let c = ctx(&emulator, json!({}));
    let lease = acquire(&p, &c, "run-binary").await.unwrap();
    let transport = p.workspace_transport(&c, &lease).await.unwrap().unwrap();
    let root = emulator
        .pod_root(NS, lease.metadata_str("podName").unwrap())
        .unwrap();
    // Every byte value, and the pod's own host path inside the data: a
    // byte-for-byte pipe must not rewrite any of it.
    let mut bytes: Vec<u8> = (0..=255u8).collect();
    bytes.extend_from_slice(root.to_string_lossy().as_bytes());
    bytes.extend_from_slice(b"/workspace\n\x00\xff");
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("blob.bin");
    std::fs::write(&local, &bytes).unwrap();
    transport
        .put_file(&local, "/workspace/blob.bin", 10_000)
        .await
        .unwrap();
    let back = dir.path().join("back.bin");
    transport
        .get_file("/workspace/blob.bin", &back, 10_000)
        .await
        .unwrap();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "binary content changed in transit");
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
}

#[tokio::test]
async fn a_kubeconfig_given_inline_keeps_its_inner_token_out_of_errors_and_logs() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let emulator = KubeEmulator::start().await.unwrap();
    let canary = "canary-token-9f3b2a71c4d8e6f0";
    let yaml = emulator.kubeconfig_yaml().replace(emulator.token(), canary);
    // Inline (not a resolved secret), so the host scrubber knows nothing of it.
    let c = CallContext {
        config: ProviderConfig::new(
            json!({"kubeconfig": yaml})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        ),
        ..ctx(&emulator, json!({}))
    };
    let p = provider(Backend::SandboxCr);
    let err = acquire(&p, &c, "run-canary").await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    let probe = p.probe(&c).await.unwrap();
    let lease = LeaseHandle {
        provider_lease_id: Some("pc-missing".into()),
        metadata: Some(
            json!({"namespace": NS, "podName": "pc-missing", "sandboxApiVersion": "v1beta1"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        ),
        expires_at: None,
    };
    let release = p.release(&c, &lease, LeaseStatus::Released).await;
    let mut shown = format!("{err} {err:?} {probe:?} {release:?}");
    // And a whole run against a cluster that accepts the canary.
    let accepting = KubeEmulator::start_with(KubeEmulatorOptions {
        token: canary.to_owned(),
        ..KubeEmulatorOptions::default()
    })
    .await
    .unwrap();
    let c = CallContext {
        config: ProviderConfig::new(
            json!({"kubeconfig": accepting.kubeconfig_yaml()})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        ),
        ..ctx(&accepting, json!({}))
    };
    let lease = acquire(&p, &c, "run-canary-ok").await.unwrap();
    let out = OutputCollector::buffered();
    let exit = p
        .execute(&c, &lease, &ExecuteRequest::shell("echo ran; exit 3"), &out)
        .await
        .unwrap();
    let result = out.finish(exit);
    assert_eq!(
        (result.stdout.as_str(), result.exit_code),
        ("ran\n", Some(3))
    );
    shown.push_str(&format!("{lease:?} {result:?}"));
    p.release(&c, &lease, LeaseStatus::Released).await.unwrap();
    assert!(!shown.contains(canary), "{shown}");
    let logs = capture.text();
    assert!(!logs.is_empty(), "TRACE logs were captured");
    assert!(
        logs.contains("kube_client") && logs.contains("hyper_util"),
        "the kube and hyper client logs were captured"
    );
    assert!(!logs.contains(canary), "the inner token reached a log line");
}

/// Issue 26: a Kubernetes acquisition killed after the create, or answered
/// after its caller's deadline (a pod slow to start), leaves no Sandbox, pod
/// or Secret; the kubeconfig, given inline, and its token appear in no log,
/// row or Debug output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_passes_the_leak_drills() {
    use paperclip_env_testkit::leak_drills::{LeakDrill, crash_rounds, deadline_rounds};
    let emulator = Arc::new(
        KubeEmulator::start_with(KubeEmulatorOptions {
            ready_delay: Duration::from_millis(1500),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let live = emulator.clone();
    let drill = LeakDrill::new(
        Arc::new(provider(Backend::SandboxCr)),
        json!({"provider": "kubernetes", "kubeconfig": emulator.kubeconfig_yaml()}),
    )
    .canary(emulator.token().to_owned())
    .call_deadline(Duration::from_secs(1))
    .live(move || run_objects(&live).len())
    // Pods already start 1.5 s late: later than the 1 s deadline, sooner
    // than the 2 s hard bound.
    .slow_create(|_| {});
    crash_rounds(&drill, 2).await.unwrap();
    deadline_rounds(&drill, 2).await.unwrap();
    assert!(run_objects(&emulator).is_empty());
}

/// Issue 26: every call on a held Kubernetes lease (exec over WebSocket,
/// release, probe) returns within the runtime's deadline when the API
/// server stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_calls_on_a_silent_api_server_return_within_their_deadline() {
    use paperclip_env_testkit::fixtures::silent_proxy::SilentProxy;
    use paperclip_env_testkit::leak_drills::{LeakDrill, silent_service_round};
    let emulator = Arc::new(KubeEmulator::start().await.unwrap());
    let upstream: std::net::SocketAddr = emulator
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Arc::new(SilentProxy::start(upstream).await.unwrap());
    let kubeconfig = emulator
        .kubeconfig_yaml()
        .replace(emulator.url().trim_end_matches('/'), &proxy.url("http"));
    assert!(kubeconfig.contains(&proxy.url("http")), "{kubeconfig}");
    let (live, switch) = (emulator.clone(), proxy.clone());
    let drill = LeakDrill::new(
        Arc::new(provider(Backend::SandboxCr)),
        json!({"provider": "kubernetes", "kubeconfig": kubeconfig}),
    )
    .call_deadline(Duration::from_secs(2))
    .live(move || run_objects(&live).len())
    .silence(move |on| switch.silence(on));
    silent_service_round(&drill).await.unwrap();
    assert!(run_objects(&emulator).is_empty());
}
