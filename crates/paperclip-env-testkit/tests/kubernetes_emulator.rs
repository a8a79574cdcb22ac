//! The Kubernetes API emulator driven by the standard `kube` client: if
//! `kube` can use it, the provider's real client code can too.
#![cfg(feature = "emulators-kubernetes")]

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{
    Api, ApiResource, AttachParams, DeleteParams, DynamicObject, GroupVersionKind, ListParams,
    LogParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use paperclip_env_testkit::emulators::kubernetes::{KubeEmulator, KubeEmulatorOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const NS: &str = "paperclip-acme";

async fn client_with(
    emulator: &KubeEmulator,
    token: Option<&str>,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let mut yaml = emulator.kubeconfig_yaml();
    if let Some(token) = token {
        yaml = yaml.replace(emulator.token(), token);
    }
    let kubeconfig = Kubeconfig::from_yaml(&yaml)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn client(
    emulator: &KubeEmulator,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    client_with(emulator, None).await
}

fn api_error(error: &kube::Error) -> Option<(u16, String)> {
    match error {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

async fn namespace(client: &Client, name: &str) -> TestResult {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
    Ok(())
}

fn sandbox_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("agents.x-k8s.io", version, "Sandbox"),
        "sandboxes",
    )
}

/// A Sandbox shaped like spec 26 §6.1.
fn sandbox(name: &str, version: &str) -> Result<DynamicObject, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": format!("agents.x-k8s.io/{version}"), "kind": "Sandbox",
        "metadata": {"name": name, "labels": {"paperclip.io/run-id": "run-1"}},
        "spec": {"podTemplate": {
            "metadata": {"labels": {"paperclip.io/run-id": "run-1", "paperclip.io/role": "agent",
                "agents.x-k8s.io/reserved": "dropped"}},
            "spec": {
                "restartPolicy": "Always",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "agent", "image": "ghcr.io/paperclip/agent:1",
                    "command": ["/usr/bin/tini", "--", "/bin/sh", "-c", "sleep infinity"],
                    "env": [{"name": "HOME", "value": "/home/paperclip"}],
                    "volumeMounts": [
                        {"name": "workspace", "mountPath": "/workspace"},
                        {"name": "home", "mountPath": "/home/paperclip"},
                        {"name": "cache", "mountPath": "/home/paperclip/.cache"},
                        {"name": "tmp", "mountPath": "/tmp"}]}],
                "volumes": [
                    {"name": "workspace", "emptyDir": {"sizeLimit": "8Gi"}},
                    {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]}}}
    }))
}

/// Polls `check` every 20 ms, for at most 10 s.
async fn until<F, Fut>(what: &str, mut check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("gave up waiting for {what}").into())
}

fn ready(object: &DynamicObject) -> bool {
    object.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

async fn ready_sandbox(
    client: &Client,
    name: &str,
    version: &str,
) -> Result<DynamicObject, Box<dyn std::error::Error + Send + Sync>> {
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource(version));
    sandboxes
        .create(&PostParams::default(), &sandbox(name, version)?)
        .await?;
    until("the Sandbox to be Ready", || async {
        sandboxes.get(name).await.is_ok_and(|s| ready(&s))
    })
    .await?;
    Ok(sandboxes.get(name).await?)
}

struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
}

async fn run(
    client: &Client,
    pod: &str,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Output, Box<dyn std::error::Error + Send + Sync>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let params = AttachParams::default()
        .container("agent")
        .stdin(stdin.is_some())
        .stderr(true);
    let mut process = pods.exec(pod, argv.iter().copied(), &params).await?;
    let writer = match stdin {
        Some(input) => {
            let mut writer = process.stdin().ok_or("no stdin")?;
            let input = input.to_vec();
            Some(tokio::spawn(async move {
                writer.write_all(&input).await?;
                writer.shutdown().await
            }))
        }
        None => None,
    };
    let mut stdout_reader = process.stdout().ok_or("no stdout")?;
    let mut stderr_reader = process.stderr().ok_or("no stderr")?;
    let status = process.take_status().ok_or("no status")?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let (a, b) = tokio::join!(
        stdout_reader.read_to_end(&mut stdout),
        stderr_reader.read_to_end(&mut stderr)
    );
    a?;
    b?;
    if let Some(writer) = writer {
        writer.await??;
    }
    let status = status.await;
    process.join().await?;
    Ok(Output {
        stdout,
        stderr,
        status,
    })
}

#[tokio::test]
async fn namespaces_are_created_listed_fetched_and_deleted() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespace(&client, NS).await?;
    let fetched = namespaces.get(NS).await?;
    assert_eq!(fetched.metadata.name.as_deref(), Some(NS));
    assert!(fetched.metadata.uid.is_some());
    assert!(fetched.metadata.resource_version.is_some());
    assert!(fetched.metadata.creation_timestamp.is_some());
    assert_eq!(
        fetched
            .metadata
            .labels
            .unwrap_or_default()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some(NS)
    );
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert_eq!(names, vec!["default", "kube-system", NS]);

    let duplicate = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await;
    let error = duplicate.err().ok_or("duplicate create succeeded")?;
    assert_eq!(api_error(&error), Some((409, "AlreadyExists".into())));
    assert!(
        error
            .to_string()
            .contains("namespaces \"paperclip-acme\" already exists"),
        "{error}"
    );

    namespaces.delete(NS, &DeleteParams::default()).await?;
    let missing = namespaces
        .get(NS)
        .await
        .err()
        .ok_or("deleted namespace still served")?;
    assert_eq!(api_error(&missing), Some((404, "NotFound".into())));
    assert!(
        emulator
            .objects("v1", "namespaces", None)
            .iter()
            .all(|n| n["metadata"]["name"] != NS)
    );
    Ok(())
}

#[tokio::test]
async fn config_maps_filter_by_label_selector_and_reject_stale_updates() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for (name, labels) in [
        ("web", json!({"app": "web", "tier": "front"})),
        ("api", json!({"app": "api", "tier": "back"})),
        ("plain", json!({})),
    ] {
        let map = json!({"metadata": {"name": name, "labels": labels}, "data": {"k": name}});
        maps.create(&PostParams::default(), &serde_json::from_value(map)?)
            .await?;
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|m| m.metadata.name)
            .collect()
    };
    let cases = [
        ("app=web", vec!["web"]),
        ("app==api", vec!["api"]),
        ("app!=web", vec!["api", "plain"]),
        ("app in (web,api)", vec!["api", "web"]),
        ("app notin (web)", vec!["api", "plain"]),
        ("tier", vec!["api", "web"]),
        ("!tier", vec!["plain"]),
        ("app=web,tier=back", vec![]),
    ];
    for (selector, expected) in cases {
        let listed = names(maps.list(&ListParams::default().labels(selector)).await?);
        assert_eq!(listed, expected, "{selector}");
    }
    let by_field = names(
        maps.list(&ListParams::default().fields("metadata.name=plain"))
            .await?,
    );
    assert_eq!(by_field, vec!["plain"]);

    let current = maps.get("web").await?;
    let mut stale = current.clone();
    let mut updated = current.clone();
    updated.data = Some([("k".to_owned(), "v2".to_owned())].into());
    let replaced = maps
        .replace("web", &PostParams::default(), &updated)
        .await?;
    assert_ne!(
        replaced.metadata.resource_version,
        current.metadata.resource_version
    );
    assert_eq!(replaced.metadata.uid, current.metadata.uid);
    stale.data = Some([("k".to_owned(), "lost".to_owned())].into());
    let conflict = maps
        .replace("web", &PostParams::default(), &stale)
        .await
        .err()
        .ok_or("stale update accepted")?;
    assert_eq!(api_error(&conflict), Some((409, "Conflict".into())));

    let merged = maps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"extra": "1"}})),
        )
        .await?;
    assert_eq!(
        merged
            .data
            .unwrap_or_default()
            .get("extra")
            .map(String::as_str),
        Some("1")
    );
    let patched = maps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"k": "v3", "extra": null}})),
        )
        .await?;
    let data = patched.data.unwrap_or_default();
    assert_eq!(data.get("k").map(String::as_str), Some("v3"));
    assert!(!data.contains_key("extra"));

    let missing = maps.get("nope").await.err().ok_or("missing map served")?;
    assert_eq!(api_error(&missing), Some((404, "NotFound".into())));
    assert!(
        missing
            .to_string()
            .contains("configmaps \"nope\" not found"),
        "{missing}"
    );
    Ok(())
}

#[tokio::test]
async fn a_wrong_token_gets_401_and_missing_namespaces_404() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let stranger = client_with(&emulator, Some("not-the-token")).await?;
    let namespaces: Api<Namespace> = Api::all(stranger);
    let error = namespaces
        .list(&ListParams::default())
        .await
        .err()
        .ok_or("unauthenticated list served")?;
    assert_eq!(api_error(&error), Some((401, "Unauthorized".into())));

    let client = client(&emulator).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client, "nowhere");
    let error = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
        )
        .await
        .err()
        .ok_or("create in a missing namespace succeeded")?;
    assert_eq!(api_error(&error), Some((404, "NotFound".into())));
    assert!(
        error
            .to_string()
            .contains("namespaces \"nowhere\" not found"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn discovery_serves_both_sandbox_versions_v1beta1_preferred() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await?;
    let group = discovery
        .groups()
        .find(|g| g.name() == "agents.x-k8s.io")
        .ok_or("agents.x-k8s.io not discovered")?;
    assert_eq!(
        group.versions().collect::<Vec<_>>(),
        vec!["v1beta1", "v1alpha1"]
    );
    assert_eq!(group.preferred_version_or_latest(), "v1beta1");
    let (resource, caps) = group.recommended_kind("Sandbox").ok_or("no Sandbox kind")?;
    assert_eq!(resource.plural, "sandboxes");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(discovery.has_group("batch"));
    assert!(discovery.has_group("networking.k8s.io"));
    assert!(discovery.has_group("rbac.authorization.k8s.io"));

    let only_alpha = KubeEmulator::start_with(KubeEmulatorOptions {
        sandbox_versions: vec!["v1alpha1".into()],
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let discovery = kube::discovery::Discovery::new(crate::client(&only_alpha).await?)
        .run()
        .await?;
    let group = discovery
        .groups()
        .find(|g| g.name() == "agents.x-k8s.io")
        .ok_or("agents.x-k8s.io not discovered")?;
    assert_eq!(group.versions().collect::<Vec<_>>(), vec!["v1alpha1"]);

    let none = KubeEmulator::start_with(KubeEmulatorOptions {
        sandbox_versions: Vec::new(),
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let discovery = kube::discovery::Discovery::new(crate::client(&none).await?)
        .run()
        .await?;
    assert!(!discovery.has_group("agents.x-k8s.io"));
    Ok(())
}

#[tokio::test]
async fn a_sandbox_gets_a_ready_pod_owned_by_it_and_deleting_it_cascades() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let sandbox = ready_sandbox(&client, "pc-01jrun", "v1beta1").await?;
    let sandbox_uid = sandbox.metadata.uid.clone().ok_or("no uid")?;
    let condition = sandbox.data["status"]["conditions"][0].clone();
    assert_eq!(condition["reason"], "DependenciesReady");
    assert_eq!(
        sandbox.data["status"]["selector"],
        "agents.x-k8s.io/sandbox-name-hash=4ce52ac7"
    );
    assert!(sandbox.data["status"]["podIPs"][0].is_string());
    assert!(sandbox.data["status"].get("phase").is_none());

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod = pods.get("pc-01jrun").await?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("paperclip.io/run-id").map(String::as_str),
        Some("run-1")
    );
    assert_eq!(
        labels.get("paperclip.io/role").map(String::as_str),
        Some("agent")
    );
    assert_eq!(
        labels
            .get("agents.x-k8s.io/sandbox-name-hash")
            .map(String::as_str),
        Some("4ce52ac7")
    );
    assert!(!labels.contains_key("agents.x-k8s.io/reserved"));
    let owner = pod.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.len(), 1);
    assert_eq!(owner[0].uid, sandbox_uid);
    assert_eq!(owner[0].kind, "Sandbox");
    assert_eq!(owner[0].api_version, "agents.x-k8s.io/v1beta1");
    assert_eq!(owner[0].controller, Some(true));
    let status = pod.status.ok_or("pod without status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let container = status.container_statuses.unwrap_or_default();
    assert_eq!(container[0].name, "agent");
    assert!(container[0].ready);
    assert!(
        container[0]
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .is_some()
    );

    // A settled Sandbox and pod are not rewritten by the controllers.
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sandboxes.get("pc-01jrun").await?.metadata.resource_version,
        sandbox.metadata.resource_version
    );
    assert_eq!(
        pods.get("pc-01jrun").await?.metadata.resource_version,
        pod.metadata.resource_version
    );

    // The same object is served at v1alpha1.
    let alpha: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1alpha1"));
    assert_eq!(
        alpha.get("pc-01jrun").await?.types.map(|t| t.api_version),
        Some("agents.x-k8s.io/v1alpha1".into())
    );

    // An env Secret owned by the Sandbox goes with it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = json!({"metadata": {"name": "pc-01jrun-env", "ownerReferences": [{
        "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "name": "pc-01jrun",
        "uid": sandbox_uid, "controller": true, "blockOwnerDeletion": true}]},
        "type": "Opaque", "stringData": {"BOOTSTRAP_TOKEN": "abc"}});
    let created = secrets
        .create(&PostParams::default(), &serde_json::from_value(secret)?)
        .await?;
    assert_eq!(
        created
            .data
            .unwrap_or_default()
            .get("BOOTSTRAP_TOKEN")
            .map(|b| b.0.clone()),
        Some(b"abc".to_vec())
    );

    sandboxes
        .delete("pc-01jrun", &DeleteParams::foreground())
        .await?;
    assert!(
        emulator
            .objects("agents.x-k8s.io/v1beta1", "sandboxes", Some(NS))
            .is_empty()
    );
    assert!(emulator.objects("v1", "pods", Some(NS)).is_empty());
    assert!(emulator.objects("v1", "secrets", Some(NS)).is_empty());
    let delete = emulator
        .requests()
        .into_iter()
        .rfind(|r| r.method == "DELETE")
        .ok_or("no DELETE recorded")?;
    assert_eq!(
        delete.path,
        format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes/pc-01jrun")
    );
    assert_eq!(
        delete
            .body
            .as_ref()
            .and_then(|b| b.get("propagationPolicy"))
            .cloned(),
        Some(json!("Foreground"))
    );
    Ok(())
}

#[tokio::test]
async fn exec_streams_output_and_reports_a_non_zero_exit_code() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-exec", "v1beta1").await?;

    let ok = run(
        &client,
        "pc-exec",
        &["/bin/sh", "-c", "printf out; printf err >&2"],
        None,
    )
    .await?;
    assert_eq!(ok.stdout, b"out");
    assert_eq!(ok.stderr, b"err");
    let status = ok.status.ok_or("no status")?;
    assert_eq!(status.status.as_deref(), Some("Success"));

    let failed = run(
        &client,
        "pc-exec",
        &["/bin/sh", "-c", "echo partial; exit 3"],
        None,
    )
    .await?;
    assert_eq!(failed.stdout, b"partial\n");
    let status = failed.status.ok_or("no status")?;
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let causes = status.details.and_then(|d| d.causes).unwrap_or_default();
    assert_eq!(causes[0].reason.as_deref(), Some("ExitCode"));
    assert_eq!(causes[0].message.as_deref(), Some("3"));
    assert_eq!(emulator.live_processes(), 0);
    Ok(())
}

#[tokio::test]
async fn exec_stdin_round_trips_and_close_stdin_ends_the_input() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-stdin", "v1beta1").await?;
    let input: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let echoed = run(&client, "pc-stdin", &["cat"], Some(&input)).await?;
    assert_eq!(echoed.stdout.len(), input.len());
    assert!(echoed.stdout == input, "binary stdin did not round-trip");
    assert_eq!(echoed.status.and_then(|s| s.status), Some("Success".into()));

    let v5_close = emulator.requests().into_iter().any(|r| {
        r.path.ends_with("/pods/pc-stdin/exec") && r.query_param("stdin").as_deref() == Some("true")
    });
    assert!(v5_close);
    Ok(())
}

#[tokio::test]
async fn tar_through_exec_lands_in_the_pod_root_never_on_the_host() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-tar", "v1beta1").await?;
    let marker = format!("marker-{}", std::process::id());
    let mut archive = tar::Builder::new(Vec::new());
    let content: Vec<u8> = (0..=255u8).collect();
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    archive.append_data(
        &mut header,
        format!("{marker}/data.bin"),
        content.as_slice(),
    )?;
    let archive = archive.into_inner()?;
    let script = format!("head -c {} | tar -x -C '/workspace'", archive.len());
    let extracted = run(
        &client,
        "pc-tar",
        &["/bin/sh", "-c", &script],
        Some(&archive),
    )
    .await?;
    assert_eq!(
        extracted.status.and_then(|s| s.status),
        Some("Success".into()),
        "{}",
        String::from_utf8_lossy(&extracted.stderr)
    );

    let root = emulator.pod_root(NS, "pc-tar").ok_or("no pod root")?;
    assert_eq!(
        std::fs::read(root.join("workspace").join(&marker).join("data.bin"))?,
        content
    );
    assert!(!std::path::Path::new("/workspace").join(&marker).exists());

    let listed = run(
        &client,
        "pc-tar",
        &["tar", "-c", "-C", "/workspace", &marker],
        None,
    )
    .await?;
    let mut entries = tar::Archive::new(listed.stdout.as_slice());
    let mut found = Vec::new();
    for entry in entries.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut bytes = Vec::new();
            entry.read_to_end_sync(&mut bytes)?;
            found.push((entry.path()?.to_string_lossy().into_owned(), bytes));
        }
    }
    assert_eq!(found, vec![(format!("{marker}/data.bin"), content)]);

    let home = run(
        &client,
        "pc-tar",
        &[
            "/bin/sh",
            "-c",
            "cd /workspace && pwd && echo $HOME && echo $TMPDIR",
        ],
        None,
    )
    .await?;
    // The processes run under the pod root; their output shows in-pod paths.
    let text = String::from_utf8(home.stdout)?;
    assert_eq!(text, "/workspace\n/home/paperclip\n/tmp\n");
    Ok(())
}

trait ReadSync {
    fn read_to_end_sync(&mut self, out: &mut Vec<u8>) -> std::io::Result<usize>;
}

impl<R: std::io::Read> ReadSync for R {
    fn read_to_end_sync(&mut self, out: &mut Vec<u8>) -> std::io::Result<usize> {
        std::io::Read::read_to_end(self, out)
    }
}

#[tokio::test]
async fn a_job_runs_its_command_once_and_serves_the_pod_log() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    for (name, exit) in [("pc-job-ok", "0"), ("pc-job-bad", "4")] {
        let job = json!({"metadata": {"name": name, "labels": {"paperclip.io/run-id": name}},
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 300, "activeDeadlineSeconds": 600,
                "template": {"metadata": {"labels": {"paperclip.io/run-id": name}}, "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "agent", "image": "agent:1",
                        "command": ["/usr/bin/tini", "--", "/usr/local/bin/paperclip-agent-shim"],
                        "envFrom": [{"secretRef": {"name": format!("{name}-env")}}],
                        "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}]}],
                    "volumes": [{"name": "workspace", "emptyDir": {}}]}}}});
        jobs.create(&PostParams::default(), &serde_json::from_value(job)?)
            .await?;
        // The Secret comes after the workload, as the provider creates it.
        let secret = json!({"metadata": {"name": format!("{name}-env")},
            "stringData": {"PAPERCLIP_RUN_ID": name, "PAPERCLIP_SHIM_EXIT": exit}});
        secrets
            .create(&PostParams::default(), &serde_json::from_value(secret)?)
            .await?;
    }
    let finished = |job: &Job| {
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
            })
            .map(|c| c.type_.clone())
    };
    for (name, outcome) in [("pc-job-ok", "Complete"), ("pc-job-bad", "Failed")] {
        until("the Job to finish", || async {
            jobs.get_status(name)
                .await
                .is_ok_and(|j| finished(&j).is_some())
        })
        .await?;
        let job = jobs.get_status(name).await?;
        assert_eq!(finished(&job).as_deref(), Some(outcome));
        let status = job.status.ok_or("no status")?;
        assert_eq!(status.active, Some(0));
        if outcome == "Complete" {
            assert_eq!(status.succeeded, Some(1));
        } else {
            assert_eq!(status.failed, Some(1));
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let listed = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await?;
        assert_eq!(listed.items.len(), 1);
        let pod_name = listed.items[0]
            .metadata
            .name
            .clone()
            .ok_or("pod without name")?;
        assert!(
            pod_name.starts_with(&format!("{name}-")) && pod_name.len() == name.len() + 6,
            "{pod_name}"
        );
        let log = pods
            .logs(
                &pod_name,
                &LogParams {
                    container: Some("agent".into()),
                    ..LogParams::default()
                },
            )
            .await?;
        assert_eq!(log, format!("paperclip-agent-shim: run {name}\n"));
    }
    // Deleting a Job in the foreground takes its pod along.
    jobs.delete("pc-job-ok", &DeleteParams::foreground())
        .await?;
    let left: Vec<Value> = emulator.objects("v1", "pods", Some(NS));
    assert_eq!(left.len(), 1);
    assert!(
        left[0]["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("pc-job-bad-"))
    );
    assert_eq!(emulator.live_processes(), 0);
    Ok(())
}

#[tokio::test]
async fn watch_streams_changes_and_answers_410_for_expired_versions() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let version = maps
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .ok_or("no list rv")?;
    let mut stream = Box::pin(
        maps.watch(&WatchParams::default().timeout(5), &version)
            .await?,
    );
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "w"}}))?,
    )
    .await?;
    maps.delete("w", &DeleteParams::default()).await?;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match futures::StreamExt::next(&mut stream).await {
            Some(Ok(WatchEvent::Added(m))) => {
                kinds.push(format!("added {}", m.metadata.name.unwrap_or_default()))
            }
            Some(Ok(WatchEvent::Deleted(m))) => {
                kinds.push(format!("deleted {}", m.metadata.name.unwrap_or_default()))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    assert_eq!(kinds, vec!["added w", "deleted w"]);

    emulator.compact();
    let mut expired = Box::pin(
        maps.watch(&WatchParams::default().timeout(5), &version)
            .await?,
    );
    match futures::StreamExt::next(&mut expired).await {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => return Err(format!("expected a 410 error event, got {other:?}").into()),
    }

    emulator.faults().gone_next_watch();
    let mut gone = Box::pin(maps.watch(&WatchParams::default().timeout(5), "0").await?);
    match futures::StreamExt::next(&mut gone).await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => return Err(format!("expected a 410 error event, got {other:?}").into()),
    }
    Ok(())
}

fn condition(object: &DynamicObject, kind: &str) -> Option<(String, String)> {
    object.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| {
            cs.iter().find(|c| c["type"] == kind).map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
}

#[tokio::test]
async fn an_unschedulable_pod_keeps_its_sandbox_not_ready() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    emulator.faults().unschedulable_next_pod();
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    sandboxes
        .create(&PostParams::default(), &sandbox("pc-stuck", "v1beta1")?)
        .await?;
    until("PodScheduled=False on the Sandbox", || async {
        sandboxes.get("pc-stuck").await.is_ok_and(|s| {
            condition(&s, "PodScheduled") == Some(("False".into(), "Unschedulable".into()))
        })
    })
    .await?;
    let sandbox = sandboxes.get("pc-stuck").await?;
    assert_eq!(
        condition(&sandbox, "Ready"),
        Some(("False".into(), "DependenciesNotReady".into()))
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let status = pods.get("pc-stuck").await?.status.ok_or("no pod status")?;
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let scheduled = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .ok_or("no PodScheduled condition")?;
    assert_eq!(
        (scheduled.status.as_str(), scheduled.reason.as_deref()),
        ("False", Some("Unschedulable"))
    );
    // Exec into a pod that never started is refused like a real API server does.
    let refused = pods
        .exec(
            "pc-stuck",
            ["true"],
            &AttachParams::default().container("agent"),
        )
        .await
        .err()
        .ok_or("exec into a pending pod succeeded")?;
    assert!(
        refused.to_string().contains("container not found"),
        "{refused}"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_pod_marks_its_sandbox_failed_and_finished() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        sandbox_versions: vec!["v1alpha1".into()],
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    emulator.faults().fail_next_pod();
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1alpha1"));
    sandboxes
        .create(&PostParams::default(), &sandbox("pc-fail", "v1alpha1")?)
        .await?;
    until("Finished=True on the Sandbox", || async {
        sandboxes
            .get("pc-fail")
            .await
            .is_ok_and(|s| condition(&s, "Finished").is_some())
    })
    .await?;
    let sandbox = sandboxes.get("pc-fail").await?;
    assert_eq!(
        condition(&sandbox, "Ready"),
        Some(("False".into(), "PodFailed".into()))
    );
    assert_eq!(
        condition(&sandbox, "Finished"),
        Some(("True".into(), "PodFailed".into()))
    );
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let pod = pods.get("pc-fail").await?;
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Failed"));
    assert_eq!(
        pod.metadata.owner_references.unwrap_or_default()[0].api_version,
        "agents.x-k8s.io/v1alpha1"
    );
    Ok(())
}

#[tokio::test]
async fn injected_409_and_5xx_answer_once_then_the_api_recovers() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    emulator.faults().conflict_on_next_create("sandboxes");
    let conflict = sandboxes
        .create(&PostParams::default(), &sandbox("pc-409", "v1beta1")?)
        .await
        .err()
        .ok_or("injected 409 not answered")?;
    assert_eq!(api_error(&conflict), Some((409, "AlreadyExists".into())));
    assert!(
        emulator
            .objects("agents.x-k8s.io/v1beta1", "sandboxes", Some(NS))
            .is_empty()
    );
    sandboxes
        .create(&PostParams::default(), &sandbox("pc-409", "v1beta1")?)
        .await?;

    emulator
        .faults()
        .server_error("GET", &format!("/api/v1/namespaces/{NS}/pods"), 2);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for _ in 0..2 {
        let error = pods
            .list(&ListParams::default())
            .await
            .err()
            .ok_or("injected 500 not answered")?;
        assert_eq!(api_error(&error), Some((500, "InternalError".into())));
    }
    pods.list(&ListParams::default()).await?;

    // kube's client retries a 429 after its Retry-After; the log shows both.
    let before = emulator.requests().len();
    emulator
        .faults()
        .status_error("*", "/api/v1/namespaces", 429, 1);
    pods.list(&ListParams::default()).await?;
    let lists = emulator.requests()[before..]
        .iter()
        .filter(|r| r.method == "GET" && r.path == format!("/api/v1/namespaces/{NS}/pods"))
        .count();
    assert_eq!(lists, 2);
    Ok(())
}

#[tokio::test]
async fn a_delayed_route_trips_the_client_read_timeout() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let kubeconfig = Kubeconfig::from_yaml(&emulator.kubeconfig_yaml())?;
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_millis(200));
    let client = Client::try_from(config)?;
    emulator
        .faults()
        .delay("GET", "/api/v1/namespaces", Duration::from_secs(5), 1);
    let namespaces: Api<Namespace> = Api::all(client);
    let error = namespaces
        .list(&ListParams::default())
        .await
        .err()
        .ok_or("delayed request answered in time")?;
    assert!(api_error(&error).is_none(), "{error}");
    namespaces.list(&ListParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn an_exec_stream_dropped_mid_way_brings_no_status_and_leaves_no_process() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-drop", "v1beta1").await?;
    emulator.faults().drop_exec_after(4);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut process = pods
        .exec(
            "pc-drop",
            ["/bin/sh", "-c", "echo 0123456789; sleep 30"],
            &AttachParams::default().container("agent"),
        )
        .await?;
    let mut stdout = process.stdout().ok_or("no stdout")?;
    let status = process.take_status().ok_or("no status")?;
    // kube reports the vanished connection from `join` (its stdout reader
    // never sees EOF after a transport error, so callers must watch both).
    let joined = process.join().await;
    assert!(joined.is_err(), "a dropped connection joined cleanly");
    let mut received = [0u8; 4];
    stdout.read_exact(&mut received).await?;
    assert_eq!(&received, b"0123");
    assert!(
        status.await.is_none(),
        "a dropped stream delivered a status"
    );
    until("the dropped exec's process to die", || async {
        emulator.live_processes() == 0
    })
    .await?;

    emulator.faults().exec_never_answers();
    let mut silent = pods
        .exec(
            "pc-drop",
            ["echo", "hi"],
            &AttachParams::default().container("agent"),
        )
        .await?;
    let mut stdout = silent.stdout().ok_or("no stdout")?;
    let mut buffer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(300), stdout.read_to_end(&mut buffer)).await;
    assert!(waited.is_err(), "a silent exec answered");
    assert!(buffer.is_empty());
    silent.abort();
    assert_eq!(emulator.live_processes(), 0);

    // The next exec is served normally.
    let ok = run(&client, "pc-drop", &["echo", "back"], None).await?;
    assert_eq!(ok.stdout, b"back\n");
    Ok(())
}

#[tokio::test]
async fn v4_only_servers_need_the_head_c_stdin_framing() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        exec_protocols: vec!["v4.channel.k8s.io".into()],
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-v4", "v1beta1").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let input = b"hello over v4";
    let script = format!("head -c {} | tr a-z A-Z", input.len());
    let mut process = pods
        .exec(
            "pc-v4",
            ["/bin/sh", "-c", script.as_str()],
            &AttachParams::default().container("agent").stdin(true),
        )
        .await?;
    // Keep stdin open: over v4, dropping it would close the whole socket.
    let mut writer = process.stdin().ok_or("no stdin")?;
    writer.write_all(input).await?;
    let mut stdout = process.stdout().ok_or("no stdout")?;
    let status = process.take_status().ok_or("no status")?;
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).await?;
    assert_eq!(out, b"HELLO OVER V4");
    assert_eq!(
        status.await.and_then(|s| s.status).as_deref(),
        Some("Success")
    );
    drop(writer);
    process.join().await?;
    Ok(())
}

#[tokio::test]
async fn garbage_collection_follows_owner_references_and_honours_orphan() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let create = |name: &str, owner: Option<(&str, String)>| {
        let mut object = json!({"metadata": {"name": name}});
        if let Some((owner_name, uid)) = owner {
            object["metadata"]["ownerReferences"] =
                json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": owner_name, "uid": uid}]);
        }
        let maps = maps.clone();
        async move {
            let map: ConfigMap = serde_json::from_value(object)?;
            let created = maps.create(&PostParams::default(), &map).await?;
            created.metadata.uid.ok_or_else(|| "no uid".into())
        }
    };
    let root: Result<String, Box<dyn std::error::Error + Send + Sync>> = create("root", None).await;
    let root = root?;
    let child: Result<String, Box<dyn std::error::Error + Send + Sync>> =
        create("child", Some(("root", root))).await;
    let child = child?;
    let grandchild: Result<String, Box<dyn std::error::Error + Send + Sync>> =
        create("grandchild", Some(("child", child))).await;
    grandchild?;
    maps.delete("root", &DeleteParams::background()).await?;
    assert!(emulator.objects("v1", "configmaps", Some(NS)).is_empty());

    let kept: Result<String, Box<dyn std::error::Error + Send + Sync>> =
        create("kept-root", None).await;
    let kept = kept?;
    let orphan: Result<String, Box<dyn std::error::Error + Send + Sync>> =
        create("orphan", Some(("kept-root", kept))).await;
    orphan?;
    maps.delete("kept-root", &DeleteParams::orphan()).await?;
    let left = maps.get("orphan").await?;
    assert!(
        left.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // An object whose owner never existed is collected.
    let dangling: Result<String, Box<dyn std::error::Error + Send + Sync>> = create(
        "dangling",
        Some(("ghost", "00000000-0000-0000-0000-000000000000".into())),
    )
    .await;
    dangling?;
    until("the dangling object to be collected", || async {
        maps.get_opt("dangling").await.is_ok_and(|m| m.is_none())
    })
    .await?;

    // Jobs orphan their pods unless asked otherwise, as the real API does.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let job = json!({"metadata": {"name": "pc-orphan-job"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "agent", "image": "x", "command": ["true"]}]}}}});
    jobs.create(&PostParams::default(), &serde_json::from_value(job)?)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    until("the Job's pod", || async {
        pods.list(&ListParams::default().labels("job-name=pc-orphan-job"))
            .await
            .is_ok_and(|l| l.items.len() == 1)
    })
    .await?;
    jobs.delete("pc-orphan-job", &DeleteParams::default())
        .await?;
    assert_eq!(
        pods.list(&ListParams::default().labels("job-name=pc-orphan-job"))
            .await?
            .items
            .len(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn a_job_past_its_active_deadline_fails_and_its_process_dies() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let job = json!({"metadata": {"name": "pc-slow"}, "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 1,
        "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "agent", "image": "x", "command": ["sleep", "30"]}]}}}});
    jobs.create(&PostParams::default(), &serde_json::from_value(job)?)
        .await?;
    until("the Job to fail", || async {
        jobs.get_status("pc-slow").await.is_ok_and(|j| {
            j.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Failed" && c.reason.as_deref() == Some("DeadlineExceeded"))
            })
        })
    })
    .await?;
    until("the Job's process to die", || async {
        emulator.live_processes() == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn tenant_objects_of_the_checklist_round_trip() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let kinds = [
        (
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            "paperclip-tenant-sa",
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "Role",
            "roles",
            "paperclip-tenant-role",
        ),
        (
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            "paperclip-tenant-rb",
        ),
        (
            "",
            "v1",
            "ResourceQuota",
            "resourcequotas",
            "paperclip-quota",
        ),
        ("", "v1", "LimitRange", "limitranges", "paperclip-limits"),
        (
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            "paperclip-deny-all",
        ),
        (
            "cilium.io",
            "v2",
            "CiliumNetworkPolicy",
            "ciliumnetworkpolicies",
            "paperclip-egress-fqdn",
        ),
    ];
    for (group, version, kind, plural, name) in kinds {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
        let missing = api
            .get(name)
            .await
            .err()
            .ok_or("object served before creation")?;
        assert_eq!(
            api_error(&missing),
            Some((404, "NotFound".into())),
            "{kind}"
        );
        let object = DynamicObject::new(name, &resource).data(json!({"spec": {"marker": kind}}));
        api.create(&PostParams::default(), &object).await?;
        let again = api
            .create(&PostParams::default(), &object)
            .await
            .err()
            .ok_or("duplicate accepted")?;
        assert_eq!(
            api_error(&again),
            Some((409, "AlreadyExists".into())),
            "{kind}"
        );
        let fetched = api.get(name).await?;
        assert_eq!(fetched.data["spec"]["marker"], json!(kind));
        let api_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        // One of this name (a namespace also has its `default` ServiceAccount).
        assert_eq!(
            emulator
                .objects(&api_version, plural, Some(NS))
                .iter()
                .filter(|o| o["metadata"]["name"] == *name)
                .count(),
            1,
            "{kind}"
        );
    }
    let posts: Vec<String> = emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path)
        .collect();
    assert!(posts.contains(&format!(
        "/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies"
    )));
    assert!(posts.contains(&format!(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles"
    )));

    // Deleting the namespace takes every object in it along.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(NS, &DeleteParams::default()).await?;
    assert!(
        emulator
            .all_objects()
            .iter()
            .all(|o| o["metadata"]["namespace"] != NS)
    );
    Ok(())
}

#[tokio::test]
async fn every_pod_process_dies_with_its_pod_and_with_the_emulator() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-procs", "v1beta1").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut pids = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut process = pods
            .exec(
                "pc-procs",
                ["/bin/sh", "-c", "echo $$; exec sleep 30"],
                &AttachParams::default().container("agent"),
            )
            .await?;
        let mut stdout = process.stdout().ok_or("no stdout")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        pids.push(String::from_utf8(line)?.trim().parse::<i32>()?);
        sessions.push((process, stdout));
    }
    assert_eq!(emulator.live_processes(), 2);
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(pids.iter().all(|p| alive(*p)));

    // Deleting the Sandbox deletes the pod, which kills its processes.
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    sandboxes
        .delete("pc-procs", &DeleteParams::background())
        .await?;
    until("the pod's processes to die", || async {
        emulator.live_processes() == 0
    })
    .await?;
    until("the pids to be reaped", || async {
        pids.iter().all(|p| !alive(*p))
    })
    .await?;
    drop(sessions);

    // And the emulator going away takes any survivor along.
    ready_sandbox(&client, "pc-procs-2", "v1beta1").await?;
    let mut process = pods
        .exec(
            "pc-procs-2",
            ["/bin/sh", "-c", "echo $$; exec sleep 30"],
            &AttachParams::default().container("agent"),
        )
        .await?;
    let mut stdout = process.stdout().ok_or("no stdout")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).await? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let pid = String::from_utf8(line)?.trim().parse::<i32>()?;
    assert!(alive(pid));
    drop(emulator);
    until("the survivor to die", || async { !alive(pid) }).await?;
    Ok(())
}

#[tokio::test]
async fn sandboxes_expire_at_their_shutdown_time_per_policy() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    let past = "2020-01-01T00:00:00Z";
    for (name, policy) in [
        ("pc-expire-delete", "Delete"),
        ("pc-expire-retain", "Retain"),
    ] {
        let mut object = sandbox(name, "v1beta1")?;
        object.data["spec"]["shutdownTime"] = json!(past);
        object.data["spec"]["shutdownPolicy"] = json!(policy);
        sandboxes.create(&PostParams::default(), &object).await?;
    }
    until("the Delete-policy Sandbox to go", || async {
        sandboxes
            .get_opt("pc-expire-delete")
            .await
            .is_ok_and(|s| s.is_none())
    })
    .await?;
    until("the Retain-policy Sandbox to expire", || async {
        sandboxes.get("pc-expire-retain").await.is_ok_and(|s| {
            condition(&s, "Ready") == Some(("False".into(), "SandboxExpired".into()))
        })
    })
    .await?;
    assert!(emulator.objects("v1", "pods", Some(NS)).is_empty());
    Ok(())
}

#[tokio::test]
async fn finished_jobs_are_deleted_after_their_ttl() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let job = json!({"metadata": {"name": "pc-ttl"}, "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 0,
        "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "agent", "image": "x", "command": ["true"]}]}}}});
    jobs.create(&PostParams::default(), &serde_json::from_value(job)?)
        .await?;
    until("the finished Job to be deleted", || async {
        jobs.get_opt("pc-ttl").await.is_ok_and(|j| j.is_none())
    })
    .await?;
    until("its pod to be collected", || async {
        emulator.objects("v1", "pods", Some(NS)).is_empty()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_pod_failing_on_its_node_fails_its_sandbox() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-node-fail", "v1beta1").await?;
    emulator.set_pod_phase(NS, "pc-node-fail", "Failed");
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    until("Ready=False PodFailed", || async {
        sandboxes.get("pc-node-fail").await.is_ok_and(|s| {
            condition(&s, "Ready") == Some(("False".into(), "PodFailed".into()))
                && condition(&s, "Finished") == Some(("True".into(), "PodFailed".into()))
        })
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let refused = pods
        .exec(
            "pc-node-fail",
            ["true"],
            &AttachParams::default().container("agent"),
        )
        .await
        .err()
        .ok_or("exec into a failed pod succeeded")?;
    assert!(
        refused
            .to_string()
            .contains("cannot exec into a container in a completed pod"),
        "{refused}"
    );
    Ok(())
}

/// Raw HTTP, for what the typed client hides: headers, media types, bodies.
async fn raw(
    emulator: &KubeEmulator,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, reqwest::header::HeaderMap, Value), Box<dyn std::error::Error + Send + Sync>> {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", emulator.url()))
        .bearer_auth(emulator.token());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await?;
    Ok((
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

#[tokio::test]
async fn the_wire_format_follows_api_conventions() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let maps = format!("/api/v1/namespaces/{NS}/configmaps");

    // Status objects carry kind, code, reason and details.
    let (code, _, body) = raw(
        &emulator,
        reqwest::Method::GET,
        &format!("{maps}/none"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 404);
    assert_eq!(
        body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "configmaps \"none\" not found", "reason": "NotFound",
            "details": {"name": "none", "kind": "configmaps"}, "code": 404})
    );

    // generateName, JSON patch, unknown patch types, a missing name.
    let (code, _, created) = raw(
        &emulator,
        reqwest::Method::POST,
        &maps,
        Some("application/json"),
        Some(json!({"metadata": {"generateName": "gen-"}, "data": {"a": "1"}})),
    )
    .await?;
    assert_eq!(code, 201);
    let name = created["metadata"]["name"]
        .as_str()
        .ok_or("no generated name")?
        .to_owned();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert_eq!(created["metadata"]["generation"], 1);
    let (code, _, patched) = raw(&emulator, reqwest::Method::PATCH, &format!("{maps}/{name}"),
        Some("application/json-patch+json"),
        Some(json!([{"op": "add", "path": "/data/b", "value": "2"}, {"op": "remove", "path": "/data/a"}]))).await?;
    assert_eq!(code, 200);
    assert_eq!(patched["data"], json!({"b": "2"}));
    let (code, _, _) = raw(
        &emulator,
        reqwest::Method::PATCH,
        &format!("{maps}/{name}"),
        Some("text/plain"),
        Some(json!({})),
    )
    .await?;
    assert_eq!(code, 415);
    let (code, _, invalid) = raw(
        &emulator,
        reqwest::Method::POST,
        &maps,
        Some("application/json"),
        Some(json!({"metadata": {}})),
    )
    .await?;
    assert_eq!((code, invalid["reason"].as_str()), (422, Some("Invalid")));

    // DELETE honours a DeleteOptions body and its preconditions.
    let (code, _, conflict) = raw(
        &emulator,
        reqwest::Method::DELETE,
        &format!("{maps}/{name}"),
        Some("application/json"),
        Some(json!({"preconditions": {"uid": "someone-else"}})),
    )
    .await?;
    assert_eq!((code, conflict["reason"].as_str()), (409, Some("Conflict")));
    let (code, _, _) = raw(
        &emulator,
        reqwest::Method::DELETE,
        &format!("{maps}/{name}?propagationPolicy=Foreground"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 200);

    // Unknown resources, and the v1alpha1 deprecation warning.
    let (code, _, _) = raw(
        &emulator,
        reqwest::Method::GET,
        "/apis/example.com/v1/widgets",
        None,
        None,
    )
    .await?;
    assert_eq!(code, 404);
    let (code, headers, _) = raw(
        &emulator,
        reqwest::Method::GET,
        &format!("/apis/agents.x-k8s.io/v1alpha1/namespaces/{NS}/sandboxes"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let warning = headers
        .get("warning")
        .and_then(|w| w.to_str().ok())
        .unwrap_or_default();
    assert!(
        warning.contains("agents.x-k8s.io/v1alpha1 Sandbox is deprecated"),
        "{warning}"
    );

    // The request log keeps method, path, query and JSON body.
    let last = emulator
        .requests()
        .into_iter()
        .rfind(|r| r.method == "DELETE")
        .ok_or("no DELETE logged")?;
    assert_eq!(
        last.query_param("propagationPolicy").as_deref(),
        Some("Foreground")
    );
    let with_body = emulator
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .ok_or("no PATCH logged")?;
    assert_eq!(
        with_body.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert!(with_body.body.is_some());
    Ok(())
}

#[tokio::test]
async fn with_keep_exec_processes_a_command_outlives_its_client_until_the_pod_goes() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        keep_exec_processes: true,
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-keep", "v1beta1").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut process = pods
        .exec(
            "pc-keep",
            ["/bin/sh", "-c", "echo started; exec sleep 30"],
            &AttachParams::default().container("agent"),
        )
        .await?;
    let mut stdout = process.stdout().ok_or("no stdout")?;
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).await?;
    assert_eq!(&first, b"started\n");
    process.abort();
    drop(stdout);
    // Give the server every chance to notice the client is gone.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            emulator.live_processes(),
            1,
            "the command died with its client"
        );
    }
    pods.delete("pc-keep", &DeleteParams::default()).await?;
    until("the kept process to die with its pod", || async {
        emulator.live_processes() == 0
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn restricted_namespaces_refuse_pods_that_break_pod_security() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labelled = json!({"metadata": {"name": NS, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}});
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(labelled)?)
        .await?;

    // A bare pod is refused with the API server's 403 wording.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let bare = json!({"metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "agent", "image": "x"}]}});
    let refused = pods
        .create(&PostParams::default(), &serde_json::from_value(bare)?)
        .await
        .err()
        .ok_or("an insecure pod was admitted")?;
    assert_eq!(api_error(&refused), Some((403, "Forbidden".into())));
    assert!(
        refused.to_string().contains(
            "pods \"bare\" is forbidden: violates PodSecurity \"restricted:latest\": allowPrivilegeEscalation != false"
        ),
        "{refused}"
    );

    // A Sandbox whose template breaks it reports the controller's error.
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    sandboxes
        .create(&PostParams::default(), &sandbox("pc-insecure", "v1beta1")?)
        .await?;
    until("Ready=False ReconcilerError", || async {
        sandboxes.get("pc-insecure").await.is_ok_and(|s| {
            condition(&s, "Ready") == Some(("False".into(), "ReconcilerError".into()))
        })
    })
    .await?;
    assert!(emulator.objects("v1", "pods", Some(NS)).is_empty());

    // The spec 26 §6.2 baseline is admitted.
    let mut hardened = sandbox("pc-hardened", "v1beta1")?;
    let template = &mut hardened.data["spec"]["podTemplate"]["spec"];
    template["securityContext"] = json!({"runAsNonRoot": true, "runAsUser": 1000,
        "runAsGroup": 1000, "fsGroup": 1000, "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"}});
    template["containers"][0]["securityContext"] = json!({"runAsNonRoot": true,
        "runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    sandboxes.create(&PostParams::default(), &hardened).await?;
    until("the hardened Sandbox to be Ready", || async {
        sandboxes.get("pc-hardened").await.is_ok_and(|s| ready(&s))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn exec_honours_the_requested_streams() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-streams", "v1beta1").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut process = pods
        .exec(
            "pc-streams",
            ["/bin/sh", "-c", "echo visible; echo hidden >&2"],
            &AttachParams::default().container("agent").stderr(false),
        )
        .await?;
    assert!(process.stderr().is_none());
    let mut stdout = process.stdout().ok_or("no stdout")?;
    let status = process.take_status().ok_or("no status")?;
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).await?;
    assert_eq!(out, b"visible\n");
    assert_eq!(
        status.await.and_then(|s| s.status).as_deref(),
        Some("Success")
    );
    process.join().await?;
    let exec = emulator
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/pods/pc-streams/exec"))
        .ok_or("no exec logged")?;
    // An absent stream parameter means false, as on the API server.
    assert_ne!(exec.query_param("stderr").as_deref(), Some("true"));
    assert_eq!(exec.query_param("container").as_deref(), Some("agent"));
    Ok(())
}

#[tokio::test]
async fn over_https_the_kubeconfig_ca_is_verified_and_exec_still_upgrades() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        tls: true,
        ..KubeEmulatorOptions::default()
    })
    .await?;
    assert!(emulator.url().starts_with("https://127.0.0.1:"));
    let pem = emulator.ca_pem().ok_or("no CA")?;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(
        emulator
            .kubeconfig_yaml()
            .contains("certificate-authority-data: ")
    );

    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-tls", "v1beta1").await?;
    let out = run(&client, "pc-tls", &["echo", "secure"], None).await?;
    assert_eq!(out.stdout, b"secure\n");

    // Without the CA the server is not trusted.
    let untrusted: String = emulator
        .kubeconfig_yaml()
        .lines()
        .filter(|l| !l.contains("certificate-authority-data"))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&untrusted)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    let stranger: Api<Namespace> = Api::all(Client::try_from(config)?);
    let refused = stranger
        .list(&ListParams::default())
        .await
        .err()
        .ok_or("an unknown CA was trusted")?;
    assert!(api_error(&refused).is_none(), "{refused}");
    Ok(())
}

/// The exec channel protocol byte by byte, with a plain WebSocket client.
#[tokio::test]
async fn exec_frames_follow_the_channel_protocol() -> TestResult {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-raw", "v1beta1").await?;
    let url = format!(
        "{}/api/v1/namespaces/{NS}/pods/pc-raw/exec?command=/bin/sh&command=-c&command=cat%3B%20echo%20err%20%3E%262%3B%20exit%205&container=agent&stdin=true&stdout=true&stderr=true&tty=false",
        emulator.url().replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", emulator.token()).parse()?,
    );
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "v5.channel.k8s.io, v4.channel.k8s.io".parse()?,
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("v5.channel.k8s.io")
    );
    socket
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await?;
    socket
        .send(Message::Binary([&[0u8][..], b"in\x00\xff"].concat().into()))
        .await?;
    socket.send(Message::Binary(vec![255u8, 0].into())).await?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut status = None;
    let mut pong = false;
    let mut closed = false;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Binary(frame) => match frame.first() {
                Some(1) => stdout.extend_from_slice(&frame[1..]),
                Some(2) => stderr.extend_from_slice(&frame[1..]),
                Some(3) => status = Some(serde_json::from_slice::<Value>(&frame[1..])?),
                other => return Err(format!("unexpected channel {other:?}").into()),
            },
            Message::Pong(payload) => pong = &payload[..] == b"are you there",
            Message::Close(_) => closed = true,
            _ => {}
        }
    }
    assert!(pong, "ping not answered");
    assert!(closed, "no close frame after the status");
    assert_eq!(stdout, b"in\x00\xff");
    assert_eq!(stderr, b"err\n");
    assert_eq!(
        status,
        Some(json!({"metadata": {}, "status": "Failure",
            "message": "command terminated with non-zero exit code: error executing command [/bin/sh -c cat; echo err >&2; exit 5], exit code 5",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "5"}]}}))
    );
    Ok(())
}

#[tokio::test]
async fn debug_output_never_shows_the_token() -> TestResult {
    let options = KubeEmulatorOptions {
        token: "very-secret-token".into(),
        ..KubeEmulatorOptions::default()
    };
    assert!(!format!("{options:?}").contains("very-secret-token"));
    let emulator = KubeEmulator::start_with(options).await?;
    assert_eq!(emulator.token(), "very-secret-token");
    assert!(!format!("{emulator:?}").contains("very-secret-token"));
    let client = client(&emulator).await?;
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces.list(&ListParams::default()).await?;
    assert!(
        emulator
            .requests()
            .iter()
            .all(|r| !format!("{r:?}").contains("very-secret-token")),
        "the request log kept the bearer token"
    );
    Ok(())
}

/// POSTs `body` to `path` and returns (code, status or object).
async fn post(emulator: &KubeEmulator, path: &str, body: Value) -> (u16, Value) {
    let (code, _, value) = raw(
        emulator,
        reqwest::Method::POST,
        path,
        Some("application/json"),
        Some(body),
    )
    .await
    .unwrap_or_else(|e| (0, Default::default(), json!(e.to_string())));
    (code, value)
}

fn causes(status: &Value) -> Vec<(String, String)> {
    status["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["field"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pod(name: &str, resources: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "agent", "image": "agent:1",
        "resources": resources}]}})
}

#[tokio::test]
async fn each_invalid_object_is_rejected_as_the_api_server_does() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let ns_path = "/api/v1/namespaces";
    let in_ns = |plural: &str| format!("/api/v1/namespaces/{NS}/{plural}");
    // Label values: "Acme, Inc." and 64 characters.
    let (code, status) = post(
        &emulator,
        ns_path,
        json!({"metadata": {"name": "paperclip-x", "labels": {"paperclip.io/company-id": "Acme, Inc."}}}),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(status["details"]["kind"], "Namespace");
    assert_eq!(
        status["message"],
        "Namespace \"paperclip-x\" is invalid: metadata.labels: Invalid value: \"Acme, Inc.\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
    );
    assert_eq!(causes(&status)[0].0, "metadata.labels", "{status}");
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueInvalid"
    );
    let (code, status) = post(
        &emulator,
        ns_path,
        json!({"metadata": {"name": "paperclip-y", "labels": {"a": "v".repeat(64)}}}),
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        causes(&status)[0]
            .1
            .ends_with("must be no more than 63 characters")
    );
    // Names: a namespace is a DNS label (no dots); other objects subdomains.
    let (code, status) = post(&emulator, ns_path, json!({"metadata": {"name": "a.b"}})).await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(causes(&status)[0].0, "metadata.name");
    let (code, _) = post(
        &emulator,
        &in_ns("configmaps"),
        json!({"metadata": {"name": "a.b"}}),
    )
    .await;
    assert_eq!(code, 201);
    // Annotation keys and label keys.
    let (code, status) = post(
        &emulator,
        &in_ns("serviceaccounts"),
        json!({"metadata": {"name": "sa", "annotations": {"bad key!": "x"}, "labels": {"a/b/c": "x"}}}),
    )
    .await;
    assert_eq!(code, 422);
    let fields: Vec<String> = causes(&status).into_iter().map(|c| c.0).collect();
    assert_eq!(
        fields,
        ["metadata.labels", "metadata.annotations"],
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is invalid: [")
    );
    // Secret keys, including those given as stringData.
    let (code, status) = post(
        &emulator,
        &in_ns("secrets"),
        json!({"metadata": {"name": "s"}, "stringData": {"BAD KEY": "v", "GOOD_KEY": "v"}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(causes(&status)[0].0, "data[BAD KEY]");
    // Quantities: a built-in type cannot even decode a bad one (400).
    let (code, status) = post(
        &emulator,
        &in_ns("pods"),
        pod("p1", json!({"limits": {"cpu": "two"}})),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!(
        status["message"],
        "Pod in version \"v1\" cannot be handled as a Pod: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    );
    // Requests above limits, a missing image, an unknown volume.
    let mut bad = pod(
        "p2",
        json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
    );
    bad["spec"]["containers"][0]["image"] = json!("");
    bad["spec"]["containers"][0]["volumeMounts"] = json!([{"name": "nope", "mountPath": "/x"}]);
    let (code, status) = post(&emulator, &in_ns("pods"), bad).await;
    assert_eq!(code, 422);
    assert_eq!(
        causes(&status),
        [
            (
                "spec.containers[0].image".to_owned(),
                "Required value".to_owned()
            ),
            (
                "spec.containers[0].volumeMounts[0].name".to_owned(),
                "Not found: \"nope\"".to_owned()
            ),
            (
                "spec.containers[0].resources.requests".to_owned(),
                "Invalid value: \"2\": must be less than or equal to cpu limit of 1".to_owned()
            ),
        ]
    );
    // Job basics.
    let (code, status) = post(
        &emulator,
        &format!("/apis/batch/v1/namespaces/{NS}/jobs"),
        json!({"metadata": {"name": "j"}, "spec": {"backoffLimit": -1, "template": {"spec": {
            "restartPolicy": "Always", "containers": [{"name": "agent", "image": "x"}]}}}}),
    )
    .await;
    assert_eq!(code, 422);
    let fields: Vec<String> = causes(&status).into_iter().map(|c| c.0).collect();
    assert_eq!(
        fields,
        ["spec.template.spec.restartPolicy", "spec.backoffLimit"],
        "{status}"
    );
    // NetworkPolicy basics.
    let (code, status) = post(
        &emulator,
        &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"),
        json!({"metadata": {"name": "np"}, "spec": {"podSelector": {}, "policyTypes": ["Egres"],
            "egress": [{"to": [{"ipBlock": {"cidr": "999.0.0.0/8"}}], "ports": [{"protocol": "ICMP", "port": 70000}]}]}}),
    )
    .await;
    assert_eq!(code, 422);
    let fields: Vec<String> = causes(&status).into_iter().map(|c| c.0).collect();
    assert_eq!(
        fields,
        [
            "spec.policyTypes[0]",
            "spec.egress[0].ports[0].protocol",
            "spec.egress[0].ports[0].port",
            "spec.egress[0].to[0].ipBlock.cidr"
        ]
    );
    // CRD schemas: Cilium's matchName pattern, the Sandbox's podTemplate.
    let (code, status) = post(
        &emulator,
        &format!("/apis/cilium.io/v2/namespaces/{NS}/ciliumnetworkpolicies"),
        json!({"metadata": {"name": "cnp"}, "spec": {"endpointSelector": {},
            "egress": [{"toFQDNs": [{"matchName": "*.example.com"}]}]}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(
        causes(&status)[0].1,
        "Invalid value: \"*.example.com\": spec.egress[0].toFQDNs[0].matchName in body should match '^([-a-zA-Z0-9_]+[.]?)+$'"
    );
    let (code, status) = post(
        &emulator,
        &format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes"),
        json!({"metadata": {"name": "sb"}, "spec": {}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(
        causes(&status),
        [("spec.podTemplate".to_owned(), "Required value".to_owned())]
    );
    assert_eq!(status["details"]["group"], "agents.x-k8s.io");
    // LimitRange bounds in order, quota quantities decoded.
    let (code, status) = post(
        &emulator,
        &in_ns("limitranges"),
        json!({"metadata": {"name": "lr"}, "spec": {"limits": [{"type": "Container",
            "max": {"cpu": "1"}, "default": {"cpu": "2"}, "defaultRequest": {"cpu": "250m"}}]}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(
        causes(&status),
        [(
            "spec.limits[0].default[cpu]".to_owned(),
            "Invalid value: \"2\": default value 2 is greater than max value 1".to_owned()
        )]
    );
    let (code, _) = post(
        &emulator,
        &in_ns("resourcequotas"),
        json!({"metadata": {"name": "q"}, "spec": {"hard": {"pods": "many"}}}),
    )
    .await;
    assert_eq!(code, 400);
    // Protobuf bodies are answered 415; JSON is what the emulator speaks.
    let (code, _, status) = raw(
        &emulator,
        reqwest::Method::POST,
        &in_ns("configmaps"),
        Some("application/vnd.kubernetes.protobuf"),
        Some(json!({"metadata": {"name": "pb"}})),
    )
    .await?;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    // Nothing refused was stored.
    assert!(emulator.objects("v1", "secrets", Some(NS)).is_empty());
    assert!(emulator.objects("v1", "pods", Some(NS)).is_empty());
    assert!(emulator.objects("batch/v1", "jobs", Some(NS)).is_empty());
    Ok(())
}

#[tokio::test]
async fn dry_run_answers_without_persisting_and_jobs_get_their_defaults() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let maps = format!("/api/v1/namespaces/{NS}/configmaps");
    let (code, object) = post(
        &emulator,
        &format!("{maps}?dryRun=All"),
        json!({"metadata": {"name": "dry"}, "data": {"a": "b"}}),
    )
    .await;
    assert_eq!(code, 201);
    assert!(object["metadata"]["uid"].is_string());
    assert!(emulator.objects("v1", "configmaps", Some(NS)).is_empty());
    let (code, _) = post(&emulator, &maps, json!({"metadata": {"name": "wet"}})).await;
    assert_eq!(code, 201);
    let (code, _, _) = raw(
        &emulator,
        reqwest::Method::DELETE,
        &format!("{maps}/wet?dryRun=All"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 200);
    assert_eq!(emulator.objects("v1", "configmaps", Some(NS)).len(), 1);
    // Job defaulting.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let job = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "j"}, "spec": {"template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "agent", "image": "x", "command": ["true"]}]}}}}))?,
        )
        .await?;
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let spec = job.spec.ok_or("no spec")?;
    assert_eq!(
        (spec.completions, spec.parallelism, spec.backoff_limit),
        (Some(1), Some(1), Some(6))
    );
    assert_eq!(spec.completion_mode.as_deref(), Some("NonIndexed"));
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    assert_eq!(selector["batch.kubernetes.io/controller-uid"], uid);
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    assert_eq!(labels["job-name"], "j");
    assert_eq!(labels["batch.kubernetes.io/controller-uid"], uid);
    Ok(())
}

#[tokio::test]
async fn limit_ranges_default_and_bound_containers_and_quotas_are_enforced() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let in_ns = |plural: &str| format!("/api/v1/namespaces/{NS}/{plural}");
    let (code, _) = post(
        &emulator,
        &in_ns("limitranges"),
        json!({"metadata": {"name": "limits"}, "spec": {"limits": [{"type": "Container",
            "max": {"cpu": "4", "memory": "8Gi"}, "min": {"cpu": "100m", "memory": "128Mi"},
            "default": {"cpu": "1", "memory": "2Gi"}, "defaultRequest": {"cpu": "250m", "memory": "512Mi"}}]}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, _) = post(
        &emulator,
        &in_ns("resourcequotas"),
        json!({"metadata": {"name": "quota"}, "spec": {"hard": {"pods": "2", "limits.cpu": "2"}}}),
    )
    .await;
    assert_eq!(code, 201);
    // ServiceAccount admission: the namespace has `default`, not `ghost`.
    let mut ghost = pod("g", json!({}));
    ghost["spec"]["serviceAccountName"] = json!("ghost");
    let (code, status) = post(&emulator, &in_ns("pods"), ghost).await;
    assert_eq!(code, 403);
    assert_eq!(
        status["message"],
        format!(
            "pods \"g\" is forbidden: error looking up service account {NS}/ghost: serviceaccount \"ghost\" not found"
        )
    );
    // Defaults filled in.
    let (code, created) = post(&emulator, &in_ns("pods"), pod("a", json!({}))).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["spec"]["containers"][0]["resources"],
        json!({"limits": {"cpu": "1", "memory": "2Gi"}, "requests": {"cpu": "250m", "memory": "512Mi"}})
    );
    // min / max.
    let (code, status) = post(
        &emulator,
        &in_ns("pods"),
        pod(
            "b",
            json!({"requests": {"cpu": "50m"}, "limits": {"cpu": "8"}}),
        ),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    assert_eq!(
        status["message"],
        "pods \"b\" is forbidden: [minimum cpu usage per Container is 100m, but request is 50m, maximum cpu usage per Container is 4, but limit is 8]"
    );
    // The quota: one more CPU fits, the next does not.
    let (code, _) = post(&emulator, &in_ns("pods"), pod("c", json!({}))).await;
    assert_eq!(code, 201);
    let (code, status) = post(&emulator, &in_ns("pods"), pod("d", json!({}))).await;
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    assert_eq!(
        status["message"],
        "pods \"d\" is forbidden: exceeded quota: quota, requested: limits.cpu=1,pods=1, used: limits.cpu=2,pods=2, limited: limits.cpu=2,pods=2"
    );
    until("the quota status to show usage", || async {
        emulator
            .objects("v1", "resourcequotas", Some(NS))
            .first()
            .is_some_and(|q| q["status"]["used"] == json!({"limits.cpu": "2", "pods": "2"}))
    })
    .await?;
    // A Job whose pod is refused records the refusal as an event.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "j"}, "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "agent", "image": "x", "command": ["true"]}]}}}}))?,
    )
    .await?;
    until("a FailedCreate event", || async {
        emulator.objects("v1", "events", Some(NS)).iter().any(|e| {
            e["reason"] == "FailedCreate"
                && e["involvedObject"]["name"] == "j"
                && e["message"].as_str().is_some_and(|m| {
                    m.starts_with("Error creating: pods \"j-")
                        && m.contains("exceeded quota: quota")
                })
        })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn images_from_unknown_registries_fail_to_pull() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let mut unpullable = pod("p", json!({}));
    unpullable["spec"]["containers"][0]["image"] = json!("registry.invalid/team/agent:v1");
    let (code, _) = post(
        &emulator,
        &format!("/api/v1/namespaces/{NS}/pods"),
        unpullable,
    )
    .await;
    assert_eq!(code, 201);
    let waiting = |reason: &'static str| {
        let emulator = &emulator;
        move || async move {
            emulator
                .objects("v1", "pods", Some(NS))
                .first()
                .is_some_and(|p| {
                    p["status"]["phase"] == "Pending"
                        && p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                            == reason
                })
        }
    };
    until("ErrImagePull", waiting("ErrImagePull")).await?;
    let pods = emulator.objects("v1", "pods", Some(NS));
    assert_eq!(
        pods[0]["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
        "failed to pull and unpack image \"registry.invalid/team/agent:v1\": failed to resolve reference \"registry.invalid/team/agent:v1\": failed to do request: Head \"https://registry.invalid/v2/team/agent/manifests/v1\": dial tcp: lookup registry.invalid: no such host"
    );
    until("ImagePullBackOff", waiting("ImagePullBackOff")).await?;
    Ok(())
}

#[tokio::test]
async fn deletion_is_graceful_finalizers_hold_and_namespaces_terminate() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        pod_termination: Duration::from_millis(500),
        ..KubeEmulatorOptions::default()
    })
    .await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-del", "v1beta1").await?;
    // Foreground: the Sandbox waits for its terminating pod.
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    sandboxes
        .delete("pc-del", &DeleteParams::foreground())
        .await?;
    let sandbox = sandboxes.get("pc-del").await?;
    assert!(sandbox.metadata.deletion_timestamp.is_some());
    assert_eq!(
        sandbox.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_owned()])
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let terminating = pods.get("pc-del").await?;
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(terminating.metadata.deletion_grace_period_seconds.is_some());
    until("the pod and its Sandbox to go", || async {
        pods.get_opt("pc-del").await.is_ok_and(|p| p.is_none())
            && sandboxes.get_opt("pc-del").await.is_ok_and(|s| s.is_none())
    })
    .await?;
    // A finalizer holds an object until it is removed.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
        )?,
    )
    .await?;
    maps.delete("held", &DeleteParams::default()).await?;
    assert!(
        maps.get("held")
            .await?
            .metadata
            .deletion_timestamp
            .is_some()
    );
    maps.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert!(maps.get_opt("held").await?.is_none());
    // A namespace with held content is Terminating and refuses new content.
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "held2", "finalizers": ["example.com/hold"]}}),
        )?,
    )
    .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(NS, &DeleteParams::default()).await?;
    let ns = namespaces.get(NS).await?;
    assert_eq!(
        ns.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    let refused = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "late"}}))?,
        )
        .await
        .err()
        .ok_or("a terminating namespace accepted new content")?;
    assert_eq!(api_error(&refused), Some((403, "Forbidden".to_owned())));
    maps.patch(
        "held2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    until("the namespace to go", || async {
        namespaces.get_opt(NS).await.is_ok_and(|n| n.is_none())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn exec_takes_stdin_in_text_frames_and_passes_bytes_through() -> TestResult {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-text", "v1beta1").await?;
    // `head -c 5` then every byte value from printf, then pwd.
    let url = format!(
        "{}/api/v1/namespaces/{NS}/pods/pc-text/exec?command=/bin/sh&command=-c&command=head%20-c%205%3B%20printf%20%27%5C000%5C377%5C200%27%3B%20cd%20/workspace%20%26%26%20pwd&container=agent&stdin=true&stdout=true&stderr=true&tty=false",
        emulator.url().replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", emulator.token()).parse()?,
    );
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "v4.channel.k8s.io".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket.send(Message::Text("\u{0}hello".into())).await?;
    let mut stdout = Vec::new();
    while let Some(message) = socket.next().await {
        if let Message::Binary(frame) = message?
            && frame.first() == Some(&1)
        {
            stdout.extend_from_slice(&frame[1..]);
        }
    }
    assert_eq!(stdout, b"hello\x00\xff\x80/workspace\n");
    Ok(())
}

#[tokio::test]
async fn isolated_pods_see_their_own_filesystem_with_a_read_only_root() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    if !emulator.isolates_pods() {
        eprintln!("user namespaces unavailable: the path-rewriting fallback is tested elsewhere");
        return Ok(());
    }
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    let mut object = sandbox("pc-ro", "v1beta1")?;
    object.data["spec"]["podTemplate"]["spec"]["containers"][0]["securityContext"] =
        json!({"readOnlyRootFilesystem": true, "runAsUser": 1000, "runAsGroup": 1000});
    sandboxes.create(&PostParams::default(), &object).await?;
    until("the Sandbox to be Ready", || async {
        sandboxes.get("pc-ro").await.is_ok_and(|s| ready(&s))
    })
    .await?;
    let root = emulator.pod_root(NS, "pc-ro").ok_or("no pod root")?;
    // The host's temp dir (where the pod root lives) is not the pod's /tmp.
    let script = format!(
        "cd /workspace && pwd && echo w > f && cat f; mkdir /srv 2>&1; {{ echo e > /etc/pc-emulator-probe; }} 2>&1; test -e '{}' || echo own-tmp; id -u",
        root.display()
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut attached = pods
        .exec(
            "pc-ro",
            vec!["/bin/sh", "-c", script.as_str()],
            &AttachParams::default().stderr(false),
        )
        .await?;
    let mut stdout = String::new();
    if let Some(mut reader) = attached.stdout() {
        reader.read_to_string(&mut stdout).await?;
    }
    attached.join().await?;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "/workspace");
    assert_eq!(lines[1], "w");
    assert!(lines[2].contains("Read-only file system"), "{stdout}");
    assert!(lines[3].contains("Read-only file system"), "{stdout}");
    assert!(!std::path::Path::new("/etc/pc-emulator-probe").exists());
    assert_eq!(lines.get(4).copied(), Some("own-tmp"), "{stdout}");
    // runAsUser is applied when the emulator can (it runs as root).
    let emulator_is_root = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    let expected_uid = if emulator_is_root { "1000" } else { "0" };
    assert_eq!(lines.get(5).copied(), Some(expected_uid), "{stdout}");
    assert_eq!(std::fs::read_to_string(root.join("workspace/f"))?, "w\n");
    Ok(())
}

#[tokio::test]
async fn without_isolation_in_pod_paths_are_rewritten_instead() -> TestResult {
    let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
        isolate_pods: false,
        ..KubeEmulatorOptions::default()
    })
    .await?;
    assert!(!emulator.isolates_pods());
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    ready_sandbox(&client, "pc-map", "v1beta1").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut attached = pods
        .exec(
            "pc-map",
            vec![
                "/bin/sh",
                "-c",
                "cd /workspace && pwd && echo hi > /workspace/f",
            ],
            &AttachParams::default().stderr(false),
        )
        .await?;
    let mut stdout = String::new();
    if let Some(mut reader) = attached.stdout() {
        reader.read_to_string(&mut stdout).await?;
    }
    attached.join().await?;
    assert_eq!(stdout, "/workspace\n");
    let root = emulator.pod_root(NS, "pc-map").ok_or("no pod root")?;
    assert_eq!(std::fs::read_to_string(root.join("workspace/f"))?, "hi\n");
    Ok(())
}

#[tokio::test]
async fn a_sandbox_whose_pod_is_refused_reports_a_reconciler_error() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    let (code, _) = post(
        &emulator,
        &format!("/api/v1/namespaces/{NS}/resourcequotas"),
        json!({"metadata": {"name": "none"}, "spec": {"hard": {"pods": "0"}}}),
    )
    .await;
    assert_eq!(code, 201);
    let sandboxes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &sandbox_resource("v1beta1"));
    sandboxes
        .create(&PostParams::default(), &sandbox("pc-refused", "v1beta1")?)
        .await?;
    until("a ReconcilerError", || async {
        sandboxes.get("pc-refused").await.is_ok_and(|s| {
            condition(&s, "Ready")
                .is_some_and(|(status, reason)| status == "False" && reason == "ReconcilerError")
        })
    })
    .await?;
    let object = sandboxes.get("pc-refused").await?;
    let message = object.data["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        message,
        "failed to create pod: pods \"pc-refused\" is forbidden: exceeded quota: none, requested: pods=1, used: pods=0, limited: pods=0"
    );
    assert!(emulator.objects("v1", "pods", Some(NS)).is_empty());
    let events = emulator.objects("v1", "events", Some(NS));
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "FailedCreate" && e["involvedObject"]["kind"] == "Sandbox"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn sandbox_crd_schemas_prune_unknown_fields_and_fill_defaults() -> TestResult {
    let emulator = KubeEmulator::start().await?;
    let client = client(&emulator).await?;
    namespace(&client, NS).await?;
    for version in ["v1beta1", "v1alpha1"] {
        let mut object = serde_json::to_value(sandbox(&format!("pc-{version}"), version)?)?;
        object["spec"]["bogus"] = json!(true);
        object["spec"]["podTemplate"]["extra"] = json!(1);
        let (code, created) = post(
            &emulator,
            &format!("/apis/agents.x-k8s.io/{version}/namespaces/{NS}/sandboxes"),
            object,
        )
        .await;
        assert_eq!(code, 201, "{created}");
        let spec = &created["spec"];
        assert!(spec.get("bogus").is_none() && spec["podTemplate"].get("extra").is_none());
        assert_eq!(spec["shutdownPolicy"], "Retain");
        if version == "v1beta1" {
            assert_eq!(spec["operatingMode"], "Running");
            assert!(spec.get("replicas").is_none());
        } else {
            assert_eq!(spec["replicas"], 1);
            assert!(spec.get("operatingMode").is_none());
        }
    }
    let mut bad = serde_json::to_value(sandbox("pc-bad", "v1beta1")?)?;
    bad["spec"]["operatingMode"] = json!("Paused");
    let (code, status) = post(
        &emulator,
        &format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes"),
        bad,
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(
        causes(&status),
        [(
            "spec.operatingMode".to_owned(),
            "Unsupported value: \"Paused\": supported values: \"Running\", \"Suspended\""
                .to_owned()
        )]
    );
    let (code, status) = post(
        &emulator,
        &format!("/apis/agents.x-k8s.io/v1beta1/namespaces/{NS}/sandboxes"),
        json!({"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "metadata": {"name": "pc-nospec"}}),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(causes(&status)[0].0, "spec");
    Ok(())
}
