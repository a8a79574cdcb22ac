//! An in-process Kubernetes API server emulator (spec 26 §7 and §17): enough
//! of the real wire protocol that standard clients work against it (the
//! `kube` crate, tested; the official Python client `kubernetes` 37.0.2,
//! in CI through `tests/vendor/kubernetes_client.py`: CRUD, watch, patches,
//! the Sandbox CRD and Jobs, exec with its status channel, `ApiException`
//! bodies; `kubectl` 1.32 get/create/exec/delete over HTTPS
//! with `--validate=false`, since no OpenAPI document and no `Table`
//! rendering are served, and client-go sends no bearer token over plain
//! HTTP), with pods whose commands run as real local processes.
//!
//! # What it serves
//!
//! Plain HTTP on `127.0.0.1`, or HTTPS with a throwaway CA
//! ([`KubeEmulatorOptions::tls`]); bearer-token auth (401 `Status`
//! otherwise).
//!
//! - Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`,
//!   `/apis/{group}/{version}` for the core group, `batch/v1`,
//!   `rbac.authorization.k8s.io/v1`, `networking.k8s.io/v1`, `cilium.io/v2`
//!   and the agent-sandbox CRD `agents.x-k8s.io` at
//!   [`KubeEmulatorOptions::sandbox_versions`] (default `v1beta1` then
//!   `v1alpha1`; empty: the group is not served).
//! - A generic JSON object store: create (with
//!   `generateName`), get, list (label selectors `=`, `==`, `!=`, `in`,
//!   `notin`, existence, `!key`; field selectors), update (PUT, 409
//!   `Conflict` on a stale `resourceVersion`), patch (JSON merge patch,
//!   JSON patch; strategic merge and apply patches are applied as merge
//!   patches), delete (`propagationPolicy` in the query or a
//!   `DeleteOptions` body, preconditions), deletecollection, `status`
//!   subresources, watch (`watch=true`, newline-delimited `WatchEvent`s, 410
//!   `Expired` for a resourceVersion older than the kept history),
//!   `dryRun=All` (validated and admitted, nothing stored). Errors
//!   are `metav1.Status` objects (404 `NotFound`, 409 `AlreadyExists`/
//!   `Conflict`, 422 `Invalid` with `details.causes`, 401 `Unauthorized`,
//!   415 for protobuf bodies: JSON only). Secrets fold `stringData` into
//!   base64 `data`.
//! - Validation as the API server does it for the kinds the provider
//!   writes (`validation.rs`): names (DNS-1123 label for namespaces,
//!   subdomain otherwise), label keys and values, annotation keys, Secret
//!   keys, pod specs (containers, images, env names, quantities, requests ≤
//!   limits, volume mounts, restart policy), Job specs, NetworkPolicies,
//!   and the `Sandbox` and `CiliumNetworkPolicy` CRD schemas (`Sandbox`:
//!   `spec` and `podTemplate` required, enums, unknown fields pruned,
//!   defaults `operatingMode: Running` at `v1beta1`, `replicas: 1` at
//!   `v1alpha1`, `shutdownPolicy: Retain`); a quantity a
//!   built-in type cannot decode is a 400, as the server's decoder answers.
//!   New Jobs get the server's defaults (selector on the controller uid,
//!   `completions`/`parallelism` 1, `backoffLimit` 6, template labels).
//! - Garbage collection and graceful deletion: deleting an owner deletes
//!   every dependent whose `ownerReferences` name its uid, transitively
//!   (`Orphan` strips the references instead); objects whose owners are all
//!   gone are collected. An object with `metadata.finalizers` gets a
//!   `deletionTimestamp` and stays until they are removed; `Foreground`
//!   keeps the owner (finalizer `foregroundDeletion`) while dependents are
//!   still going; a deleted pod stays terminating for
//!   [`KubeEmulatorOptions::pod_termination`] (default: gone at once); a
//!   deleted namespace is `Terminating`, refuses new content (403) and goes
//!   once empty. Anything nothing holds is removed within the request. Jobs
//!   default to `Orphan` like the real API.
//! - Controllers: the Sandbox controller (pod named like the Sandbox, labels
//!   = podTemplate labels + `agents.x-k8s.io/sandbox-name-hash`, controller
//!   ownerReference, then `Ready=True reason DependenciesReady`, `podIPs`,
//!   `selector`; `shutdownTime` with `shutdownPolicy` `Delete` or `Retain`
//!   → `Ready=False SandboxExpired`; `v1alpha1` requests carry the CRD's
//!   deprecation `Warning` header while `v1beta1` is served), the Job
//!   controller (pod `{job}-xxxxx` labelled `job-name`, Job
//!   `active`/`succeeded`/`failed`, `Complete`/`Failed` conditions,
//!   `activeDeadlineSeconds` → `DeadlineExceeded`, `ttlSecondsAfterFinished`
//!   deletes the finished Job), and a kubelet simulation that turns pods
//!   `Running` after [`KubeEmulatorOptions::ready_delay`] (waiting with
//!   `CreateContainerConfigError` while an `envFrom` Secret is missing).
//! - Admission of pods (created directly or by a controller), in the
//!   server's wording: ServiceAccount (its account, `default` unless named, must exist; a new namespace gets `default`), Pod
//!   Security (`restricted` in a namespace labelled
//!   `pod-security.kubernetes.io/enforce: restricted`), RuntimeClass (must
//!   exist), LimitRanger (defaults, then `min`/`max`), ResourceQuota
//!   (`exceeded quota: …` / `must specify …`, 403; quota `status.used` kept
//!   current). The Sandbox controller reports a refusal as `Ready=False
//!   reason ReconcilerError`, the Job controller as a `Warning` event
//!   `FailedCreate`. Network policies are stored, not enforced.
//! - Image pulls: a container whose image is on a registry not in
//!   [`KubeEmulatorOptions::registries`] waits with `ErrImagePull`, then
//!   `ImagePullBackOff`, in containerd's wording.
//! - Pod exec over WebSocket (`v5.channel.k8s.io` preferred,
//!   `v4.channel.k8s.io`): channel 0 stdin, 1 stdout, 2 stderr, 3 the
//!   `metav1.Status` (`Success`, or `Failure` reason `NonZeroExitCode` with
//!   an `ExitCode` cause), 255 close-stdin (v5), pings answered; stdin
//!   also in TEXT frames (channel as the first character, as the Python
//!   client sends it); a missing executable answers the runtime's error
//!   with exit 126; and `pods/{name}/log`.
//!
//! # The pod filesystem
//!
//! Pods are not containers: each pod gets a directory under the emulator's
//! temp dir (its *root*), holding every `volumeMounts[].mountPath` and the
//! container's `workingDir`. Env comes from the container's `env`
//! (`value`, `fieldRef` of `metadata.name`/`namespace`/`uid`) and `envFrom`
//! Secrets/ConfigMaps, as in a real container; `HOME` is
//! `/home/paperclip` (when mounted), `TMPDIR` `/tmp`, `PATH` a standard
//! system path. A leading `/usr/bin/tini --` is dropped, and executables
//! listed in [`KubeEmulatorOptions::programs`] are replaced by local
//! commands.
//!
//! **Isolated pods (the default where the host allows user namespaces).**
//! Each process runs through `unshare --mount` (with `--user
//! --map-root-user` unless the emulator is root): in
//! its own mount namespace the host's system directories (`/usr`, `/etc`,
//! `/dev`, `/proc`, `/sys`, `/opt`, `/var` and the `/bin`-style links) are
//! bound into the root, then the command is chrooted there, in its in-pod
//! working directory. In-pod paths are therefore real (`pwd` prints
//! `/workspace/…`, a path assembled at run time works), the host's `/tmp`,
//! `/home` and `/workspace` are out of reach, and nothing is rewritten:
//! argv, env, stdin, stdout, stderr and pod logs pass byte for byte. The
//! mounts live only in that namespace and vanish with it; the process keeps
//! its pid, so process-group kills still reach it. The bound host
//! directories are read-only (but `/dev`, `/proc`, `/sys`), and with the
//! container's `readOnlyRootFilesystem` so is everything but its volumes,
//! as in a real pod ("Read-only file system"). When the emulator runs as
//! root, no user namespace is needed and processes run as the container's
//! `runAsUser`/`runAsGroup` (with `fsGroup` and `supplementalGroups`), on
//! world-writable volumes as the kubelet makes `emptyDir`s; otherwise they
//! run as the user namespace's root (the emulator's user outside) and
//! `runAsUser` is not enforced. Why not a namespace-free scheme (symlinks,
//! `PWD`): `getcwd()` and a shell's `pwd` resolve the real directory, so
//! only a changed root makes
//! `/workspace` print as `/workspace` without rewriting output.
//!
//! **Fallback ([`KubeEmulatorOptions::isolate_pods`] `false`, or no user
//! namespaces).** Every occurrence of a mapped in-pod path in the argv
//! (including inside `sh -c` scripts) and in env values is rewritten to
//! `<root><path>` (longest path first, only at path boundaries), and the
//! pod root is stripped back out of stdout, stderr and pod logs so `pwd`
//! prints `/workspace/…`; output that happens to contain the root's host
//! path is then altered, a path assembled at run time (`"/work""space"`) is
//! not rewritten, and paths outside the mounts are the host's.
//!
//! Containers with `restartPolicy: Always` are simulated as running (their
//! command, typically `sleep infinity`, is not run); with `Never`/
//! `OnFailure` their command runs once as a local process whose combined
//! output is the pod log.
//!
//! Every process runs in its own process group and is killed when its
//! exec socket closes (unless [`KubeEmulatorOptions::keep_exec_processes`]),
//! its pod is deleted, or the emulator is dropped.
//!
//! Note for clients: when an exec connection vanishes (see
//! [`KubeFaults::drop_exec_after`]), `kube`'s `AttachedProcess::join`
//! returns the error but its stdout reader never reaches EOF, so a caller
//! must watch `join` (or a deadline), not only the output streams.
//!
//! # Contract
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use paperclip_env_testkit::emulators::kubernetes::{KubeEmulator, KubeEmulatorOptions};
//! let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
//!     sandbox_versions: vec!["v1alpha1".into()],
//!     ..KubeEmulatorOptions::default()
//! })
//! .await?;
//! let kubeconfig = emulator.kubeconfig_yaml(); // server = url(), user token = token()
//! # let _ = kubeconfig;
//! // … drive a client, then:
//! let pods = emulator.objects("v1", "pods", Some("paperclip-acme"));
//! assert!(pods.is_empty());
//! assert_eq!(emulator.live_processes(), 0);
//! # Ok(()) }
//! ```

mod admission;
mod controllers;
mod exec;
mod faults;
mod routes;
mod selectors;
mod store;
mod tls;
mod validation;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::serve::ListenerExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

pub use faults::KubeFaults;

use store::{Key, ResourceType, Store};

/// Options of [`KubeEmulator::start_with`].
#[derive(Clone)]
pub struct KubeEmulatorOptions {
    /// Served versions of the agent-sandbox `Sandbox` CRD, e.g.
    /// `["v1alpha1"]`; empty: `agents.x-k8s.io` is not served at all.
    pub sandbox_versions: Vec<String>,
    /// How long a new pod stays `Pending` before it runs.
    pub ready_delay: Duration,
    /// The bearer token the server accepts (anything else gets 401).
    pub token: String,
    /// Exec subprotocols the server accepts, preferred first.
    pub exec_protocols: Vec<String>,
    /// In-pod executables replaced by a local argv prefix (the original
    /// arguments follow). Default: `/usr/local/bin/paperclip-agent-shim`
    /// prints `paperclip-agent-shim: run <PAPERCLIP_RUN_ID>` and exits with
    /// `$PAPERCLIP_SHIM_EXIT` (default 0). In isolated pods the replacement
    /// runs inside the pod, so it must live under the host's system
    /// directories (`/usr`, `/bin`, `/opt`, …), not in a host temp dir.
    pub programs: Vec<(String, Vec<String>)>,
    /// Keep an exec'd process running when its client goes away (as a real
    /// node does; it still dies with its pod or the emulator). Default
    /// `false`: a closed exec socket kills the process group.
    pub keep_exec_processes: bool,
    /// Serve HTTPS with a throwaway CA ([`KubeEmulator::ca_pem`]); the
    /// kubeconfig then carries `certificate-authority-data`.
    pub tls: bool,
    /// Run each pod's processes in their own user and mount namespace,
    /// chrooted into the pod root with the host's system directories bound
    /// in (see "The pod filesystem"), when the host allows it. Default
    /// `true`; `false` (or a host without user namespaces) falls back to
    /// rewriting in-pod paths.
    pub isolate_pods: bool,
    /// How long a deleted pod stays `Terminating` (with `deletionTimestamp`
    /// and `deletionGracePeriodSeconds`; its processes are killed at once),
    /// capped by the delete's `gracePeriodSeconds`. Default zero: a deleted
    /// pod is gone at once.
    pub pod_termination: Duration,
    /// Registries the simulated kubelet can pull from (host names; an image
    /// without a registry host is on `docker.io`). A pod whose image is on
    /// any other registry stays `Pending` with `ErrImagePull`, then
    /// `ImagePullBackOff`, as a node that cannot resolve the host does.
    pub registries: Vec<String>,
}

impl std::fmt::Debug for KubeEmulatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never printed.
        f.debug_struct("KubeEmulatorOptions")
            .field("sandbox_versions", &self.sandbox_versions)
            .field("ready_delay", &self.ready_delay)
            .field("exec_protocols", &self.exec_protocols)
            .field("programs", &self.programs)
            .field("keep_exec_processes", &self.keep_exec_processes)
            .field("tls", &self.tls)
            .field("isolate_pods", &self.isolate_pods)
            .field("pod_termination", &self.pod_termination)
            .field("registries", &self.registries)
            .finish_non_exhaustive()
    }
}

impl Default for KubeEmulatorOptions {
    fn default() -> Self {
        KubeEmulatorOptions {
            sandbox_versions: vec!["v1beta1".into(), "v1alpha1".into()],
            ready_delay: Duration::from_millis(50),
            token: format!("emulator-token-{}", uuid::Uuid::new_v4().simple()),
            exec_protocols: vec!["v5.channel.k8s.io".into(), "v4.channel.k8s.io".into()],
            programs: vec![(
                "/usr/local/bin/paperclip-agent-shim".into(),
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo \"paperclip-agent-shim: run ${PAPERCLIP_RUN_ID:-unknown}\"; exit \"${PAPERCLIP_SHIM_EXIT:-0}\"".into(),
                    "paperclip-agent-shim".into(),
                ],
            )],
            keep_exec_processes: false,
            tls: false,
            isolate_pods: true,
            pod_termination: Duration::ZERO,
            registries: [
                "docker.io",
                "ghcr.io",
                "registry.k8s.io",
                "quay.io",
                "gcr.io",
                "mcr.microsoft.com",
                "public.ecr.aws",
                "localhost",
            ]
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        }
    }
}

/// One request the emulator received (the bearer token is not recorded).
#[derive(Debug, Clone, PartialEq)]
pub struct KubeRequest {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// The JSON body, when there was one.
    pub body: Option<Value>,
}

impl KubeRequest {
    /// One query parameter (first occurrence, percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        routes::query_pairs(self.query.as_deref().unwrap_or_default())
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MainState {
    /// Simulated as running (restartPolicy Always) or not started yet.
    Idle,
    Running,
    Exited(i32),
}

/// What the kubelet simulation keeps per pod (by uid).
pub(crate) struct PodRuntime {
    pub namespace: String,
    pub name: String,
    pub root: PathBuf,
    pub mounts: Vec<String>,
    pub working_dir: Option<String>,
    pub pgids: Arc<Mutex<HashSet<i32>>>,
    pub log: Arc<Mutex<Vec<u8>>>,
    pub main: Arc<Mutex<MainState>>,
    pub seen_at: tokio::time::Instant,
    pub fault: Option<faults::Fault>,
    pub ip: String,
    pub started: bool,
    pub isolated: bool,
    pub read_only_root: bool,
    pub user: Option<exec::RunAs>,
}

impl PodRuntime {
    fn kill_all(&self) {
        let pgids: Vec<i32> = self
            .pgids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for pgid in pgids {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

pub(crate) struct Shared {
    pub token: String,
    pub ca_pem: Option<String>,
    pub base: String,
    pub opts: KubeEmulatorOptions,
    pub types: Vec<ResourceType>,
    pub root: tempfile::TempDir,
    pub store: Mutex<Store>,
    pub requests: Mutex<Vec<KubeRequest>>,
    pub faults: KubeFaults,
    pub pods: Mutex<HashMap<String, PodRuntime>>,
    pub live: Arc<AtomicUsize>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub next_ip: AtomicUsize,
}

impl Shared {
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodRuntime>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn resource(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
    }

    /// Side effects of objects that began deleting: a terminating pod's
    /// processes are killed (its object stays for the grace period).
    pub fn after_mark(&self, marked: &[(Key, Value)]) {
        for (key, object) in marked {
            if key.0.is_empty()
                && key.1 == "pods"
                && let Some(uid) = object.pointer("/metadata/uid").and_then(Value::as_str)
                && let Some(runtime) = self.pods().get(uid)
            {
                runtime.kill_all();
            }
        }
    }

    /// After a write: an object waiting for deletion whose finalizers were
    /// just removed goes now.
    pub fn after_update(&self) {
        let removed = self.store().finish_deletions();
        self.after_delete(&removed);
    }

    /// Side effects of deleted objects: a deleted pod's processes die and
    /// its root is removed; a deleted namespace takes its objects along.
    pub fn after_delete(&self, deleted: &[(Key, Value)]) {
        let mut more = Vec::new();
        for (key, object) in deleted {
            if key.0.is_empty() && key.1 == "namespaces" {
                let mut store = self.store();
                for inner in store.keys_in_namespace(&key.3) {
                    more.extend(store.delete_cascade(&inner, false));
                }
            }
            if key.0.is_empty()
                && key.1 == "pods"
                && let Some(uid) = object.pointer("/metadata/uid").and_then(Value::as_str)
            {
                let runtime = self.pods().remove(uid);
                if let Some(runtime) = runtime {
                    runtime.kill_all();
                    let _ = std::fs::remove_dir_all(&runtime.root);
                }
            }
        }
        if !more.is_empty() {
            self.after_delete(&more);
        }
    }
}

/// Resolves once the emulator is stopping.
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// The running emulator; stops its server and kills every pod process on
/// drop.
pub struct KubeEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for KubeEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl KubeEmulator {
    /// Starts on 127.0.0.1 with a random port and default options
    /// (`Sandbox` served at `v1beta1` and `v1alpha1`, random token).
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let emulator = paperclip_env_testkit::emulators::kubernetes::KubeEmulator::start().await?;
    /// assert!(emulator.url().starts_with("http://127.0.0.1:"));
    /// # Ok(()) }
    /// ```
    pub async fn start() -> std::io::Result<KubeEmulator> {
        Self::start_with(KubeEmulatorOptions::default()).await
    }

    /// Starts with `opts`.
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// use paperclip_env_testkit::emulators::kubernetes::{KubeEmulator, KubeEmulatorOptions};
    /// let emulator = KubeEmulator::start_with(KubeEmulatorOptions {
    ///     sandbox_versions: Vec::new(), // agent-sandbox not installed
    ///     ..KubeEmulatorOptions::default()
    /// })
    /// .await?;
    /// # let _ = emulator;
    /// # Ok(()) }
    /// ```
    pub async fn start_with(opts: KubeEmulatorOptions) -> std::io::Result<KubeEmulator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let tls = if opts.tls {
            Some(tls::authority()?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let shared = Arc::new(Shared {
            token: opts.token.clone(),
            ca_pem: tls.as_ref().map(|(pem, _)| pem.clone()),
            base: format!("{scheme}://{addr}"),
            types: store::registry(&opts.sandbox_versions),
            opts,
            root: tempfile::Builder::new()
                .prefix("paperclip-kube-emulator-")
                .tempdir()?,
            store: Mutex::new(Store::new()),
            requests: Mutex::new(Vec::new()),
            faults: KubeFaults::default(),
            pods: Mutex::new(HashMap::new()),
            live: Arc::new(AtomicUsize::new(0)),
            shutdown: shutdown_rx.clone(),
            next_ip: AtomicUsize::new(10),
        });
        routes::seed(&shared);
        let app = routes::router(shared.clone());
        let mut stop = shutdown_rx.clone();
        match tls {
            Some((_, acceptor)) => {
                let listener = tls::TlsListener {
                    tcp: listener,
                    acceptor,
                };
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stopped(&mut stop).await })
                        .await;
                });
            }
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener.tap_io(super::serve::no_delay), app)
                        .with_graceful_shutdown(async move { stopped(&mut stop).await })
                        .await;
                });
            }
        }
        controllers::spawn(shared.clone(), shutdown_rx);
        Ok(KubeEmulator {
            addr,
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:<port>` (`https://` with [`KubeEmulatorOptions::tls`]).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig whose cluster server is [`Self::url`] (trusting
    /// [`Self::ca_pem`] over HTTPS) and whose user authenticates with
    /// [`Self::token`]; context `emulator`, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        use base64::Engine as _;
        let authority = self
            .shared
            .ca_pem
            .as_ref()
            .map(|pem| {
                format!(
                    "    certificate-authority-data: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(pem)
                )
            })
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n{authority}contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n  user:\n    token: {token}\n",
            url = self.url(),
            token = self.shared.token
        )
    }

    /// The PEM of the CA that signed the server certificate (with
    /// [`KubeEmulatorOptions::tls`]).
    pub fn ca_pem(&self) -> Option<&str> {
        self.shared.ca_pem.as_deref()
    }

    /// Stored objects of one type, e.g. `("v1", "pods", Some(ns))`,
    /// `("agents.x-k8s.io/v1beta1", "sandboxes", Some(ns))`,
    /// `("v1", "namespaces", None)`; `None` for a namespaced type means every
    /// namespace. Each carries `apiVersion` and `kind`.
    pub fn objects(
        &self,
        api_version: &str,
        kind_plural: &str,
        namespace: Option<&str>,
    ) -> Vec<Value> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let Some(rt) = self.shared.resource(group, kind_plural) else {
            return Vec::new();
        };
        self.shared
            .store()
            .list(group, kind_plural, namespace)
            .into_iter()
            .map(|o| routes::typed(rt, version, o))
            .collect()
    }

    /// Every stored object (with `apiVersion`/`kind`), including the seeded
    /// `default` and `kube-system` namespaces.
    pub fn all_objects(&self) -> Vec<Value> {
        let all = self.shared.store().all();
        all.into_iter()
            .filter_map(|(key, object)| {
                let rt = self.shared.resource(&key.0, &key.1)?;
                let version = rt.versions.first()?.clone();
                Some(routes::typed(rt, &version, object))
            })
            .collect()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fault injection.
    pub fn faults(&self) -> &KubeFaults {
        &self.shared.faults
    }

    /// Processes (execs and run-to-completion containers) still running.
    pub fn live_processes(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// The host directory standing in for a pod's filesystem root (mount
    /// paths live under it), once the pod has been started.
    pub fn pod_root(&self, namespace: &str, pod: &str) -> Option<PathBuf> {
        self.shared
            .pods()
            .values()
            .find(|r| r.namespace == namespace && r.name == pod)
            .map(|r| r.root.clone())
    }

    /// Whether pod processes run isolated (their own mount namespace and
    /// root, see "The pod filesystem"): [`KubeEmulatorOptions::isolate_pods`]
    /// and a host that allows user namespaces.
    pub fn isolates_pods(&self) -> bool {
        self.shared.opts.isolate_pods && exec::isolation_available()
    }

    /// Drops the watch history: a watch from any earlier resourceVersion
    /// gets 410 `Expired`.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Sets a pod's phase as a node would (`Failed`, `Succeeded`, …),
    /// killing its processes when terminal; controllers follow.
    pub fn set_pod_phase(&self, namespace: &str, pod: &str, phase: &str) {
        let key: Key = (String::new(), "pods".into(), namespace.into(), pod.into());
        let mut store = self.shared.store();
        let Some(object) = store.get(&key).cloned() else {
            return;
        };
        let mut status = object.get("status").cloned().unwrap_or_else(|| json!({}));
        status["phase"] = json!(phase);
        if matches!(phase, "Failed" | "Succeeded") {
            controllers::terminate_status(&mut status, if phase == "Failed" { 1 } else { 0 });
            if let Some(uid) = object.pointer("/metadata/uid").and_then(Value::as_str)
                && let Some(runtime) = self.shared.pods().get(uid)
            {
                runtime.kill_all();
            }
        }
        store.set_status(&key, status);
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        let mut pods = self.shared.pods();
        for (_, runtime) in pods.drain() {
            runtime.kill_all();
        }
    }
}
