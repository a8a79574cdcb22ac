//! Kubernetes sandboxes (spec 26): one tenant namespace per company
//! (restricted Pod Security, quota, limits, deny-all networking opened
//! explicitly), one hardened pod per run, created either through an
//! agent-sandbox `Sandbox` CR (`sandbox-cr`, multi-command exec over the
//! WebSocket exec subresource) or a `batch/v1` Job (`job`, one-shot).
//!
//! A config's `backend` field selects the workload of new leases; without
//! one, the instance's default applies ([`KubernetesProviderBuilder::backend`],
//! `sandbox-cr`), and the instance declares that backend's [`Capabilities`].
//! A lease keeps the backend recorded in its metadata, and the runtime gates
//! operations on a lease by that backend's capabilities
//! ([`SandboxProvider::lease_capabilities`]): a Job runs its one command and
//! cannot run more, so `execute` on a job lease is refused with a typed
//! `NotSupported` naming `kubernetes (job backend)`; its result comes from
//! [`KubernetesProvider::wait_for_job`].
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_providers::kubernetes::{Backend, KubernetesProvider};
//! let provider = KubernetesProvider::builder().backend(Backend::SandboxCr).build();
//! let runtime = EnvironmentRuntime::builder().provider(Arc::new(provider)).build();
//! # Ok(()) }
//! ```

mod adapters;
mod client;
mod config;
mod exec;
mod manifests;
mod naming;
pub mod validation;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use paperclip_env_core::secret::ProviderConfig;
use paperclip_env_core::workspace::WorkspaceTransport;
use paperclip_env_core::{
    AcquireRequest, CallContext, Capabilities, CommandExit, ConfigValidation, Error,
    ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus, Operation, OutputCollector,
    ProviderLease, ProviderProbe, RealizeWorkspaceResult, Result, SandboxProvider, WorkspaceSpec,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};

pub use adapters::{
    AdapterDefaults, AdapterEntry, builtin as builtin_adapter, image_matches, pull_policy,
    resolve_image,
};
pub use config::{
    AUTH_REQUIRED_MESSAGE, Backend, DEFAULT_JOB_TTL_SECONDS, DEFAULT_NAMESPACE_PREFIX,
    DEFAULT_POD_ACTIVITY_DEADLINE_SEC, EgressMode, KubernetesConfig, KubernetesConfigSchema,
    Resources, is_ipv4_cidr,
};
pub use exec::{build_argv, exit_code_of, network_denial_hint, sh_quote, wrap_with_env};
pub use manifests::{
    CONTAINER, DENY_ALL, EGRESS_ALLOW, EGRESS_FQDN, EgressSpec, PodInputs, TENANT_LIMITS,
    TENANT_QUOTA, TENANT_ROLE, TENANT_ROLE_BINDING, TENANT_SA,
};
pub use naming::{MANAGED_BY, child_name, derive_company_slug, tenant_namespace, workload_name};

use client::{KEY, Kube, str_at};
use exec::{Ended, Input, Sink};

/// The agent-sandbox API group.
pub const SANDBOX_GROUP: &str = "agents.x-k8s.io";
/// Sandbox API versions in order of preference (spec 26 §7.4).
pub const SANDBOX_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// Default working directory in the pod.
pub const DEFAULT_CWD: &str = "/workspace";

/// Builds a [`KubernetesProvider`].
#[derive(Clone)]
pub struct KubernetesProviderBuilder {
    backend: Backend,
    request_timeout: Duration,
    poll_interval: Duration,
    resume_poll_interval: Duration,
    resume_timeout: Duration,
    ready_timeout: Option<Duration>,
    retries: u32,
    liveness_interval: Duration,
    host_env: Option<BTreeMap<String, SecretString>>,
}

impl std::fmt::Debug for KubernetesProviderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProviderBuilder")
            .field("backend", &self.backend)
            .field("request_timeout", &self.request_timeout)
            .field("poll_interval", &self.poll_interval)
            .field(
                "host_env_keys",
                &self.host_env.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .finish_non_exhaustive()
    }
}

impl Default for KubernetesProviderBuilder {
    fn default() -> Self {
        KubernetesProviderBuilder {
            backend: Backend::SandboxCr,
            request_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            resume_poll_interval: Duration::from_secs(1),
            resume_timeout: Duration::from_secs(30),
            ready_timeout: None,
            retries: 3,
            liveness_interval: Duration::from_secs(30),
            host_env: None,
        }
    }
}

impl KubernetesProviderBuilder {
    /// The backend this instance declares capabilities for and uses when a
    /// config does not name one (default `sandbox-cr`).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Deadline of each Kubernetes API request (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How often readiness and Job status are polled (default 2 s; resume uses 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self.resume_poll_interval = interval.min(self.resume_poll_interval);
        self
    }

    /// Upper bound for waiting on a new pod during acquire (default: the
    /// config's `podActivityDeadlineSec`).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = Some(timeout);
        self
    }

    /// Retries of idempotent calls (GET, LIST, DELETE) on 5xx, 429, 410 and
    /// connection errors (default 3). Creates are never retried.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// How often a running command is checked from a second exec when its
    /// exec stream may have died silently (default 30 s). A command whose
    /// process is gone without a status frame, or that never started, ends
    /// with a retryable "lost its exec connection" error instead of a hang.
    pub fn exec_liveness_interval(mut self, interval: Duration) -> Self {
        self.liveness_interval = interval.max(Duration::from_millis(50));
        self
    }

    /// The host environment adapter `envKeys` are copied from (default: this
    /// process's environment).
    pub fn host_env(mut self, env: BTreeMap<String, SecretString>) -> Self {
        self.host_env = Some(env);
        self
    }

    /// Builds the provider (no cluster call).
    pub fn build(self) -> KubernetesProvider {
        KubernetesProvider {
            inner: Arc::new(Inner {
                opts: self,
                clients: Mutex::new(HashMap::new()),
                tenants: tokio::sync::Mutex::new(HashSet::new()),
                versions: tokio::sync::Mutex::new(HashMap::new()),
                ready: Mutex::new(HashSet::new()),
            }),
        }
    }
}

struct Inner {
    opts: KubernetesProviderBuilder,
    clients: Mutex<HashMap<String, kube::Client>>,
    tenants: tokio::sync::Mutex<HashSet<String>>,
    versions: tokio::sync::Mutex<HashMap<String, String>>,
    ready: Mutex<HashSet<String>>,
}

/// The Kubernetes provider. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("backend", &self.inner.opts.backend)
            .finish_non_exhaustive()
    }
}

/// How a Job ended (job backend, spec 26 §14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// `Succeeded`, `Failed`, `Running` or `Pending` (the last two only when timed out).
    pub phase: String,
    /// `0` on success, `1` on failure, `None` when the wait timed out.
    pub exit_code: Option<i32>,
    /// The pod log (combined output).
    pub log: String,
    /// The Job's pod, when found.
    pub pod_name: Option<String>,
}

/// Everything a call needs about its cluster and tenant.
struct Target {
    kube: Kube,
    client_key: String,
    config: KubernetesConfig,
    namespace: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn invalid(issues: Vec<paperclip_env_core::ConfigIssue>) -> Error {
    Error::invalid_config(issues)
}

fn sandbox_collection(version: &str, ns: &str) -> String {
    format!("/apis/{SANDBOX_GROUP}/{version}/namespaces/{ns}/sandboxes")
}

fn job_collection(ns: &str) -> String {
    format!("/apis/batch/v1/namespaces/{ns}/jobs")
}

fn core_collection(ns: &str, plural: &str) -> String {
    format!("/api/v1/namespaces/{ns}/{plural}")
}

/// The call's secrets plus the credentials inside its kubeconfig (bearer
/// token, password, client key and certificate data, raw and decoded): an
/// error or metadata text containing any of them is scrubbed, not only one
/// that quotes the whole kubeconfig.
fn scrubber(ctx: &CallContext) -> ProviderConfig {
    use base64::Engine as _;
    let mut scrub = ctx.config.clone();
    let yaml = ctx
        .config
        .secret("kubeconfig")
        .or_else(|| ctx.config.secret("kubeconfigSecretRef"))
        .map(|s| s.expose_secret().to_owned())
        .or_else(|| {
            ["kubeconfig", "kubeconfigSecretRef"]
                .iter()
                .find_map(|k| ctx.config.get(k).and_then(Value::as_str).map(str::to_owned))
        });
    let Some(parsed) = yaml.and_then(|y| Kubeconfig::from_yaml(&y).ok()) else {
        return scrub;
    };
    let mut values: Vec<String> = Vec::new();
    for (i, user) in parsed.auth_infos.iter().enumerate() {
        let Some(auth) = &user.auth_info else {
            continue;
        };
        let encoded = [
            auth.token.as_ref().map(|t| t.expose_secret().to_owned()),
            auth.password.as_ref().map(|t| t.expose_secret().to_owned()),
            auth.client_key_data
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            auth.client_certificate_data.clone(),
        ];
        for value in encoded.into_iter().flatten() {
            let value = value.trim().to_owned();
            if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(&value)
                && let Ok(text) = String::from_utf8(decoded)
            {
                // A PEM's body lines may be quoted one by one.
                values.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                        .map(str::to_owned),
                );
                values.push(text);
            }
            values.push(value);
        }
        for (j, value) in values.drain(..).enumerate() {
            if value.len() >= 8 {
                scrub = scrub.with_secret(
                    format!("kubeconfig#users.{i}.{j}"),
                    SecretString::from(value),
                );
            }
        }
    }
    scrub
}

fn company_of(ctx: &CallContext) -> &str {
    ctx.company_id
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or(&ctx.environment_id)
}

/// What a backend can do: a Job runs its one command and cannot run more
/// (its result comes from [`KubernetesProvider::wait_for_job`]).
fn backend_capabilities(backend: Backend) -> Capabilities {
    let sandbox = backend == Backend::SandboxCr;
    Capabilities {
        execute: sandbox,
        realize_workspace: true,
        resume: true,
        destroy: true,
        probe: true,
        reusable_leases: false,
        expires_at: false,
        lifetime_refresh: false,
        streaming: sandbox,
        stdin: sandbox,
        multi_command_exec: sandbox,
        native_sync: sandbox,
        signals: false,
        run_lookup: true,
    }
}

fn md_str<'a>(lease: &'a LeaseHandle, key: &str) -> Option<&'a str> {
    lease
        .metadata_str(key)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn has_condition(v: &Value, kind: &str, status: &str) -> Option<(String, String)> {
    v.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind && c["status"] == status)
        .map(|c| {
            (
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

enum SandboxState {
    Ready,
    Failed(String, String),
    Terminating,
    Waiting,
}

fn deleting(object: &Value) -> bool {
    object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// A `ReconcilerError` is the controller failing to create what the
/// Sandbox needs (the API server refused its pod: quota, LimitRange,
/// admission, validation); a write conflict is the one retried shape.
fn permanent_reconciler_error(message: &str) -> bool {
    !(message.contains("the object has been modified")
        || message.contains("Operation cannot be fulfilled"))
}

/// Readiness classification of a Sandbox (spec 26 §8.1, condition-aware).
/// A Sandbox being deleted is never Ready, whatever its conditions say.
fn classify_sandbox(sb: &Value) -> SandboxState {
    let phase = str_at(sb, "/status/phase");
    if phase == Some("Terminating") || deleting(sb) {
        return SandboxState::Terminating;
    }
    if phase == Some("Ready") || has_condition(sb, "Ready", "True").is_some() {
        return SandboxState::Ready;
    }
    if let Some((reason, message)) = has_condition(sb, "Ready", "False")
        && reason == "ReconcilerError"
        && permanent_reconciler_error(&message)
    {
        return SandboxState::Failed(reason, message);
    }
    if phase == Some("Failed") {
        return SandboxState::Failed(
            str_at(sb, "/status/reason").unwrap_or_default().to_owned(),
            str_at(sb, "/status/message").unwrap_or_default().to_owned(),
        );
    }
    if let Some((r, m)) = has_condition(sb, "Failed", "True") {
        return SandboxState::Failed(r, m);
    }
    for kind in ["Finished", "Ready"] {
        let status = if kind == "Finished" { "True" } else { "False" };
        if let Some((r, m)) = has_condition(sb, kind, status)
            && r.to_lowercase().contains("fail")
        {
            return SandboxState::Failed(r, m);
        }
    }
    SandboxState::Waiting
}

/// Container waiting reasons no amount of waiting fixes.
const FATAL_WAITING: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerError",
];

/// Why a pod can never become ready (unschedulable, failed, its image
/// cannot be pulled), if it cannot.
fn pod_failure(pod: &Value) -> Option<(String, String)> {
    if let Some((reason, message)) = has_condition(pod, "PodScheduled", "False")
        && reason == "Unschedulable"
    {
        return Some((reason, message));
    }
    for status in ["initContainerStatuses", "containerStatuses"] {
        for c in pod
            .pointer(&format!("/status/{status}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(reason) = str_at(c, "/state/waiting/reason")
                && FATAL_WAITING.contains(&reason)
            {
                let name = str_at(c, "/name").unwrap_or_default();
                let message = str_at(c, "/state/waiting/message").unwrap_or_default();
                return Some((reason.to_owned(), format!("container {name}: {message}")));
            }
        }
    }
    if str_at(pod, "/status/phase") == Some("Failed") {
        return Some((
            str_at(pod, "/status/reason")
                .unwrap_or("PodFailed")
                .to_owned(),
            str_at(pod, "/status/message")
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    None
}

fn job_phase(job: &Value) -> &'static str {
    let count = |k: &str| {
        job.pointer(&format!("/status/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    if has_condition(job, "Failed", "True").is_some() || count("failed") > 0 {
        "Failed"
    } else if has_condition(job, "Complete", "True").is_some() || count("succeeded") > 0 {
        "Succeeded"
    } else if count("active") > 0 {
        "Running"
    } else {
        "Pending"
    }
}

fn expired(reason: impl Into<String>) -> ProviderLease {
    let mut md = JsonObject::new();
    md.insert("provider".into(), json!(KEY));
    md.insert("expired".into(), json!(true));
    md.insert("reason".into(), json!(reason.into()));
    ProviderLease {
        provider_lease_id: None,
        metadata: Some(md),
        expires_at: None,
    }
}

impl KubernetesProvider {
    /// A builder with the defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use paperclip_env_core::SandboxProvider;
    /// use paperclip_env_providers::kubernetes::{Backend, KubernetesProvider};
    /// let jobs = KubernetesProvider::builder()
    ///     .backend(Backend::Job)
    ///     .request_timeout(Duration::from_secs(10))
    ///     .build();
    /// assert!(!jobs.capabilities().multi_command_exec);
    /// ```
    pub fn builder() -> KubernetesProviderBuilder {
        KubernetesProviderBuilder::default()
    }

    /// The backend this instance declares capabilities for.
    pub fn backend(&self) -> Backend {
        self.inner.opts.backend
    }

    async fn client(
        &self,
        ctx: &CallContext,
        config: &KubernetesConfig,
    ) -> Result<(kube::Client, String)> {
        let key = if config.in_cluster {
            "in-cluster".to_owned()
        } else if let Some(k) = &config.kubeconfig {
            let digest = Sha256::digest(k.expose_secret().as_bytes());
            digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
        } else {
            return Err(Error::invalid_field(
                "kubeconfig",
                "createKubeConfig requires either inCluster=true or a kubeconfig string",
            ));
        };
        if let Some(c) = lock(&self.inner.clients).get(&key) {
            return Ok((c.clone(), key));
        }
        client::ensure_crypto_provider();
        let mut kube_config = if config.in_cluster {
            kube::Config::incluster().map_err(|e| {
                Error::invalid_field(
                    "inCluster",
                    format!("in-cluster Kubernetes config is unavailable: {e}"),
                )
            })?
        } else {
            let yaml = config
                .kubeconfig
                .as_ref()
                .map(|k| k.expose_secret().to_owned())
                .unwrap_or_default();
            // The parser's message may quote the document, so it is not repeated.
            let parsed = Kubeconfig::from_yaml(&yaml).map_err(|_| {
                Error::invalid_field(
                    "kubeconfig",
                    "kubeconfig is not a valid kubeconfig YAML document",
                )
            })?;
            kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    Error::invalid_field(
                        "kubeconfig",
                        scrubber(ctx).scrub(&format!("kubeconfig cannot be used: {e}")),
                    )
                })?
        };
        // Deadlines are applied per call (exec sessions may legitimately be long).
        kube_config.read_timeout = None;
        kube_config.write_timeout = None;
        kube_config.connect_timeout = Some(self.inner.opts.request_timeout);
        let client = kube::Client::try_from(kube_config).map_err(|e| {
            Error::provider(
                KEY,
                scrubber(ctx).scrub(&format!("building the Kubernetes client failed: {e}")),
            )
        })?;
        lock(&self.inner.clients).insert(key.clone(), client.clone());
        Ok((client, key))
    }

    async fn target(&self, ctx: &CallContext, lease: Option<&LeaseHandle>) -> Result<Target> {
        let config = KubernetesConfig::from_provider_config(&ctx.config).map_err(invalid)?;
        let (client, client_key) = self.client(ctx, &config).await?;
        let namespace = lease
            .and_then(|l| md_str(l, "namespace"))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                tenant_namespace(
                    &config.namespace_prefix,
                    config.company_slug.as_deref(),
                    company_of(ctx),
                )
            });
        if !naming::is_rfc1123_label(&namespace) {
            return Err(Error::invalid_field(
                "companySlug",
                format!(
                    "namespace \"{namespace}\" must be a valid RFC 1123 label of at most 63 characters"
                ),
            ));
        }
        Ok(Target {
            kube: Kube {
                client,
                timeout: self.inner.opts.request_timeout,
                retries: self.inner.opts.retries,
            },
            client_key,
            config,
            namespace,
        })
    }

    /// Picks the Sandbox API version (spec 26 §7.4), cached per cluster.
    async fn sandbox_version(&self, t: &Target) -> Result<String> {
        let mut cache = self.inner.versions.lock().await;
        if let Some(v) = cache.get(&t.client_key) {
            return Ok(v.clone());
        }
        let apis = t.kube.get("/apis").await?.unwrap_or(Value::Null);
        let group = apis
            .get("groups")
            .and_then(Value::as_array)
            .and_then(|groups| groups.iter().find(|g| g["name"] == SANDBOX_GROUP));
        let Some(group) = group else {
            return Err(Error::provider(
                KEY,
                "API group agents.x-k8s.io is not served by this cluster. Install the kubernetes-sigs/agent-sandbox controller, or set backend: \"job\" to dispatch runs as batch/v1 Jobs instead.",
            ));
        };
        let served: Vec<String> = group["versions"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| v["version"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let Some(version) = SANDBOX_VERSIONS
            .iter()
            .find(|v| served.iter().any(|s| s == *v))
        else {
            let serves = if served.is_empty() {
                "nothing".to_owned()
            } else {
                served.join(", ")
            };
            return Err(Error::provider(
                KEY,
                format!(
                    "API group agents.x-k8s.io serves none of [v1beta1, v1alpha1] (serves: {serves}). Upgrade the agent-sandbox controller, or set backend: \"job\"."
                ),
            ));
        };
        cache.insert(t.client_key.clone(), (*version).to_owned());
        Ok((*version).to_owned())
    }

    /// GET → 404 → POST; 409 on POST is success; an existing object is left untouched.
    async fn ensure_object(
        kube: &Kube,
        get_path: &str,
        collection: &str,
        body: &Value,
    ) -> Result<()> {
        if kube.get(get_path).await?.is_some() {
            return Ok(());
        }
        match kube.create(collection, body).await {
            Ok(_) => Ok(()),
            Err(e) if client::is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Tenant provisioning (spec 26 §5), once per namespace per provider instance.
    async fn ensure_tenant(&self, t: &Target, company_id: &str, fqdns: &[String]) -> Result<()> {
        let key = format!("{}|{}", t.client_key, t.namespace);
        let mut done = self.inner.tenants.lock().await;
        if done.contains(&key) {
            return Ok(());
        }
        let ns = &t.namespace;
        let kube = &t.kube;
        let core = |plural: &str| core_collection(ns, plural);
        let rbac =
            |plural: &str| format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{plural}");
        let net = format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies");
        Self::ensure_object(
            kube,
            &format!("/api/v1/namespaces/{ns}"),
            "/api/v1/namespaces",
            &manifests::namespace(ns, company_id),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{}/{TENANT_SA}", core("serviceaccounts")),
            &core("serviceaccounts"),
            &manifests::service_account(ns, &t.config.service_account_annotations),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{}/{TENANT_ROLE}", rbac("roles")),
            &rbac("roles"),
            &manifests::role(ns),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{}/{TENANT_ROLE_BINDING}", rbac("rolebindings")),
            &rbac("rolebindings"),
            &manifests::role_binding(ns),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{}/{TENANT_QUOTA}", core("resourcequotas")),
            &core("resourcequotas"),
            &manifests::resource_quota(ns),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{}/{TENANT_LIMITS}", core("limitranges")),
            &core("limitranges"),
            &manifests::limit_range(ns),
        )
        .await?;
        Self::ensure_object(
            kube,
            &format!("{net}/{DENY_ALL}"),
            &net,
            &manifests::deny_all(ns),
        )
        .await?;
        let cidrs = &t.config.egress_allow_cidrs;
        match t.config.egress_mode {
            EgressMode::Standard => {
                let spec = EgressSpec {
                    name: EGRESS_ALLOW,
                    namespace: ns,
                    run_id: None,
                    include_base_rules: true,
                    fqdns,
                    cidrs,
                    owner: None,
                    server_namespace: &t.config.server_namespace,
                    server_selector: &t.config.server_pod_selector,
                };
                Self::ensure_object(
                    kube,
                    &format!("{net}/{EGRESS_ALLOW}"),
                    &net,
                    &manifests::egress_network_policy(&spec),
                )
                .await?;
            }
            EgressMode::Cilium => {
                let cnp = format!("/apis/cilium.io/v2/namespaces/{ns}/ciliumnetworkpolicies");
                let spec = EgressSpec {
                    name: EGRESS_FQDN,
                    namespace: ns,
                    run_id: None,
                    include_base_rules: true,
                    fqdns,
                    cidrs,
                    owner: None,
                    server_namespace: &t.config.server_namespace,
                    server_selector: &t.config.server_pod_selector,
                };
                Self::ensure_object(
                    kube,
                    &format!("{cnp}/{EGRESS_FQDN}"),
                    &cnp,
                    &manifests::cilium_network_policy(&spec),
                )
                .await?;
            }
        }
        done.insert(key);
        Ok(())
    }

    fn host_env(&self, keys: &[String]) -> BTreeMap<String, SecretString> {
        match &self.inner.opts.host_env {
            Some(env) => env.clone(),
            None => keys
                .iter()
                .filter_map(|k| {
                    std::env::var(k)
                        .ok()
                        .map(|v| (k.clone(), SecretString::from(v)))
                })
                .collect(),
        }
    }

    /// Finds the Sandbox's pod (spec 26 §7.3, RECOMMENDED order).
    async fn sandbox_pod(&self, t: &Target, sandbox: &Value, name: &str) -> Result<Option<Value>> {
        let pods = core_collection(&t.namespace, "pods");
        let named = str_at(sandbox, "/status/podName")
            .or_else(|| str_at(sandbox, "/metadata/annotations/agents.x-k8s.io~1pod-name"))
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(name);
        if let Some(pod) = t.kube.get(&format!("{pods}/{named}")).await? {
            return Ok(Some(pod));
        }
        let items = t
            .kube
            .list(&pods, &format!("agents.x-k8s.io/sandbox-name={name}"))
            .await?;
        let exact: Vec<Value> = items
            .into_iter()
            .filter(|p| {
                p.pointer("/metadata/labels/agents.x-k8s.io~1sandbox-name")
                    .and_then(Value::as_str)
                    == Some(name)
            })
            .collect();
        Ok(exact
            .iter()
            .find(|p| str_at(p, "/status/phase") == Some("Running"))
            .or(exact.first())
            .cloned())
    }

    /// Waits until the Sandbox is Ready; fails fast on failed or unschedulable pods.
    async fn wait_sandbox_ready(
        &self,
        t: &Target,
        version: &str,
        name: &str,
        budget: Duration,
        poll: Duration,
    ) -> Result<String> {
        let ns = &t.namespace;
        let path = format!("{}/{name}", sandbox_collection(version, ns));
        let start = Instant::now();
        loop {
            let Some(sandbox) = t.kube.get(&path).await? else {
                return Err(Error::not_found(format!(
                    "Sandbox {ns}/{name} no longer exists"
                )));
            };
            match classify_sandbox(&sandbox) {
                SandboxState::Ready => {
                    let pod = self.sandbox_pod(t, &sandbox, name).await?;
                    return match pod.as_ref() {
                        Some(p) if deleting(p) => Err(Error::not_found(format!(
                            "the pod of Sandbox {ns}/{name} is being deleted: the lease has expired"
                        ))),
                        Some(p) => match str_at(p, "/metadata/name") {
                            Some(pod) => Ok(pod.to_owned()),
                            None => Err(Error::provider(KEY, "Sandbox pod has no name")),
                        },
                        None => Err(Error::provider(
                            KEY,
                            "Sandbox is Ready but no backing pod was found",
                        )),
                    };
                }
                SandboxState::Failed(reason, message) => {
                    let reason = if reason.is_empty() {
                        "unknown reason".to_owned()
                    } else {
                        reason
                    };
                    return Err(Error::provider(
                        KEY,
                        format!("Sandbox {ns}/{name} failed: {reason} — {message}"),
                    ));
                }
                SandboxState::Terminating => {
                    return Err(Error::not_found(format!(
                        "Sandbox {ns}/{name} is being deleted (Terminating): the lease has expired"
                    )));
                }
                SandboxState::Waiting => {
                    if let Some(pod) = self.sandbox_pod(t, &sandbox, name).await?
                        && let Some((reason, message)) = pod_failure(&pod)
                    {
                        return Err(Error::provider(
                            KEY,
                            format!("Sandbox {ns}/{name} failed: {reason} — {message}"),
                        ));
                    }
                }
            }
            if start.elapsed() >= budget {
                return Err(Error::Timeout {
                    operation: format!("waiting for Sandbox {ns}/{name} to reach Ready"),
                    after: budget,
                });
            }
            tokio::time::sleep(
                poll.min(budget.saturating_sub(start.elapsed()))
                    .max(Duration::from_millis(10)),
            )
            .await;
        }
    }

    /// The Job controller's refusal to create the Job's pod (a `Warning`
    /// `FailedCreate` event: quota, LimitRange, RuntimeClass, ServiceAccount,
    /// Pod Security), in the cluster's words.
    async fn job_refusal(&self, t: &Target, name: &str) -> Result<Option<String>> {
        let selector = client::encode(&format!(
            "involvedObject.name={name},involvedObject.kind=Job"
        ));
        let events = t
            .kube
            .list(
                &format!(
                    "{}?fieldSelector={selector}",
                    core_collection(&t.namespace, "events")
                ),
                "",
            )
            .await?;
        Ok(events
            .iter()
            .rev()
            .filter(|e| {
                str_at(e, "/reason") == Some("FailedCreate")
                    && str_at(e, "/involvedObject/name") == Some(name)
            })
            .filter_map(|e| str_at(e, "/message"))
            .next()
            .map(str::to_owned))
    }

    async fn job_pod(&self, t: &Target, name: &str) -> Result<Option<Value>> {
        let items = t
            .kube
            .list(
                &core_collection(&t.namespace, "pods"),
                &format!("job-name={name}"),
            )
            .await?;
        Ok(items
            .iter()
            .find(|p| str_at(p, "/status/phase") == Some("Running"))
            .or(items.first())
            .cloned())
    }

    /// Deletes the run's workload (Foreground); `false` when it was already gone.
    async fn delete_workload(
        &self,
        t: &Target,
        backend: Backend,
        version: Option<&str>,
        name: &str,
    ) -> Result<bool> {
        match backend {
            Backend::Job => {
                t.kube
                    .delete(&format!("{}/{name}", job_collection(&t.namespace)))
                    .await
            }
            Backend::SandboxCr => {
                let versions: Vec<String> = match version {
                    Some(v) => vec![v.to_owned()],
                    None => match self.sandbox_version(t).await {
                        Ok(v) => vec![v],
                        // Never let a failed discovery strand resources: try every version.
                        Err(_) => SANDBOX_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
                    },
                };
                let mut deleted = false;
                let mut last_error = None;
                for v in &versions {
                    match t
                        .kube
                        .delete(&format!("{}/{name}", sandbox_collection(v, &t.namespace)))
                        .await
                    {
                        Ok(d) => deleted |= d,
                        Err(e) => last_error = Some(e),
                    }
                }
                match last_error {
                    Some(e) if !deleted => Err(e),
                    _ => Ok(deleted),
                }
            }
        }
    }

    /// After an ambiguous create, deletes the named workload; when the create
    /// was never answered, keeps trying for one request timeout in case it
    /// lands late. A cleanup failure is logged with the name.
    async fn cleanup_ambiguous_create(
        &self,
        t: &Target,
        backend: Backend,
        version: Option<&str>,
        name: &str,
        unanswered: bool,
    ) {
        let start = Instant::now();
        loop {
            match self.delete_workload(t, backend, version, name).await {
                Ok(true) => {
                    info!(workload = %name, "deleted the workload of an ambiguous create");
                    return;
                }
                Ok(false) if unanswered && start.elapsed() < self.inner.opts.request_timeout => {
                    tokio::time::sleep(self.inner.opts.poll_interval).await;
                }
                Ok(false) => return,
                Err(e) => {
                    error!(namespace = %t.namespace, workload = %name, error = %e, "cleaning up after an ambiguous create failed; the workload may exist");
                    return;
                }
            }
        }
    }

    /// The backend recorded in a lease's metadata, else this instance's.
    fn recorded_backend(&self, lease: &LeaseHandle) -> Backend {
        md_str(lease, "backend")
            .and_then(Backend::parse)
            .unwrap_or(self.inner.opts.backend)
    }

    fn lease_backend(&self, t: &Target, lease: &LeaseHandle) -> Backend {
        md_str(lease, "backend")
            .and_then(Backend::parse)
            .unwrap_or_else(|| t.config.backend_or(self.inner.opts.backend))
    }

    fn ready_budget(&self, config: &KubernetesConfig) -> Duration {
        self.inner
            .opts
            .ready_timeout
            .unwrap_or(Duration::from_secs(config.pod_activity_deadline_sec))
    }

    /// The steps of acquire after the workload exists; any error here makes
    /// the caller delete the workload.
    #[allow(clippy::too_many_arguments)]
    async fn finish_acquire(
        &self,
        t: &Target,
        backend: Backend,
        version: Option<&str>,
        name: &str,
        created: &Value,
        run_label: &str,
        adapter: &AdapterDefaults,
    ) -> Result<(Option<String>, &'static str)> {
        let uid = str_at(created, "/metadata/uid")
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                Error::provider(
                    KEY,
                    match backend {
                        Backend::SandboxCr => "Sandbox CR created without a UID",
                        Backend::Job => "Job created without a UID",
                    },
                )
            })?;
        let (owner_api, kind) = match (backend, version) {
            (Backend::SandboxCr, Some(v)) => (format!("{SANDBOX_GROUP}/{v}"), "Sandbox"),
            _ => ("batch/v1".to_owned(), "Job"),
        };
        let mut env = adapters::build_env(adapter, &self.host_env(&adapter.env_keys));
        env.insert(
            "PAPERCLIP_NETWORK_EGRESS_POLICY".into(),
            SecretString::from("kubernetes-default-deny"),
        );
        env.insert(
            "PAPERCLIP_NETWORK_EGRESS_GRANT_PATH".into(),
            SecretString::from("executionWorkspaceSettings.networkEgress"),
        );
        env.insert(
            "PAPERCLIP_NETWORK_EGRESS_ALLOW_FQDNS".into(),
            SecretString::from(""),
        );
        env.insert(
            "PAPERCLIP_NETWORK_EGRESS_ALLOW_CIDRS".into(),
            SecretString::from(""),
        );
        env.insert(
            "BOOTSTRAP_TOKEN".into(),
            SecretString::from(naming::bootstrap_token()),
        );
        let owner = manifests::owner_reference(&owner_api, kind, name, uid, true);
        let secret = manifests::env_secret(
            &child_name(name, "-env"),
            &t.namespace,
            run_label,
            &owner,
            &env,
        );
        t.kube
            .create(&core_collection(&t.namespace, "secrets"), &secret)
            .await?;
        match backend {
            Backend::SandboxCr => {
                let version = version.unwrap_or(SANDBOX_VERSIONS[0]);
                let pod = self
                    .wait_sandbox_ready(
                        t,
                        version,
                        name,
                        self.ready_budget(&t.config),
                        self.inner.opts.poll_interval,
                    )
                    .await?;
                Ok((Some(pod), "Running"))
            }
            Backend::Job => {
                // Wait for the Job controller's pod so the lease names it and a
                // quick release never races the pod's creation.
                let budget = self.ready_budget(&t.config);
                let start = Instant::now();
                let pod = loop {
                    if let Some(pod) = self.job_pod(t, name).await? {
                        break pod;
                    }
                    if let Some(message) = self.job_refusal(t, name).await? {
                        return Err(Error::provider(
                            KEY,
                            format!(
                                "Job {}/{name} cannot create its pod: {message}",
                                t.namespace
                            ),
                        ));
                    }
                    if start.elapsed() >= budget {
                        return Err(Error::Timeout {
                            operation: format!(
                                "waiting for Job {}/{name} to create its pod",
                                t.namespace
                            ),
                            after: budget,
                        });
                    }
                    tokio::time::sleep(self.inner.opts.poll_interval).await;
                };
                if let Some((reason, message)) = pod_failure(&pod) {
                    return Err(Error::provider(
                        KEY,
                        format!("Job {}/{name} failed: {reason} — {message}", t.namespace),
                    ));
                }
                let pod = Some(pod);
                let phase = match pod.as_ref().and_then(|p| str_at(p, "/status/phase")) {
                    Some("Running") => "Running",
                    _ => "Pending",
                };
                Ok((
                    pod.and_then(|p| str_at(&p, "/metadata/name").map(str::to_owned)),
                    phase,
                ))
            }
        }
    }

    fn metadata(
        t: &Target,
        backend: Backend,
        name: &str,
        pod: Option<&str>,
        phase: &str,
        version: Option<&str>,
        run_id: Option<&str>,
    ) -> JsonObject {
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("namespace".into(), json!(t.namespace));
        md.insert("jobName".into(), json!(name));
        md.insert("podName".into(), json!(pod));
        md.insert("secretName".into(), json!(child_name(name, "-env")));
        md.insert("phase".into(), json!(phase));
        md.insert("backend".into(), json!(backend.as_str()));
        md.insert("scopedNetworkPolicyName".into(), Value::Null);
        md.insert(
            "scopedNetworkEgress".into(),
            json!({"allowFqdns": [], "allowCidrs": []}),
        );
        md.insert(
            "nativeFileSyncUnsupported".into(),
            json!(backend == Backend::Job),
        );
        md.insert("remoteCwd".into(), json!(DEFAULT_CWD));
        if let Some(run) = run_id {
            md.insert("paperclipRunId".into(), json!(run));
        }
        if let Some(v) = version {
            md.insert("sandboxApiVersion".into(), json!(v));
        }
        md
    }

    /// Resolves the pod of a sandbox-cr lease, waiting for readiness when this
    /// process has not seen the lease Ready yet.
    async fn ready_pod(
        &self,
        t: &Target,
        lease: &LeaseHandle,
        id: &str,
        budget: Duration,
    ) -> Result<String> {
        let version = match md_str(lease, "sandboxApiVersion") {
            Some(v) => v.to_owned(),
            None => self.sandbox_version(t).await?,
        };
        let cached = lock(&self.inner.ready).contains(id);
        if cached && let Some(pod) = md_str(lease, "podName") {
            // Seen Ready before, but a Sandbox or pod being deleted is never
            // Ready again: one look at each before running anything.
            let sandbox_path = format!("{}/{id}", sandbox_collection(&version, &t.namespace));
            let pod_path = format!("{}/{pod}", core_collection(&t.namespace, "pods"));
            let (sandbox, pod_object) =
                tokio::try_join!(t.kube.get(&sandbox_path), t.kube.get(&pod_path))?;
            let gone = match (&sandbox, &pod_object) {
                (None, _) => Some(format!("Sandbox {}/{id} no longer exists", t.namespace)),
                (Some(sb), _) if deleting(sb) => Some(format!(
                    "Sandbox {}/{id} is being deleted (Terminating): the lease has expired",
                    t.namespace
                )),
                (_, Some(p)) if deleting(p) => Some(format!(
                    "the pod {pod} of Sandbox {}/{id} is being deleted: the lease has expired",
                    t.namespace
                )),
                _ => None,
            };
            if let Some(message) = gone {
                lock(&self.inner.ready).remove(id);
                return Err(Error::not_found(message));
            }
            if pod_object.is_some() {
                return Ok(pod.to_owned());
            }
        }
        let pod = self
            .wait_sandbox_ready(t, &version, id, budget, self.inner.opts.poll_interval)
            .await?;
        lock(&self.inner.ready).insert(id.to_owned());
        Ok(pod)
    }

    fn pods(t: &Target) -> kube::Api<Pod> {
        kube::Api::namespaced(t.kube.client.clone(), &t.namespace)
    }

    /// Runs a helper script in the pod, capturing output; non-zero exit is an error.
    async fn helper(
        &self,
        t: &Target,
        pod: &str,
        argv: Vec<String>,
        input: Input<'_>,
        budget: Duration,
        what: &str,
    ) -> Result<Vec<u8>> {
        let cmd0 = argv.first().cloned().unwrap_or_default();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        match exec::run(
            &Self::pods(t),
            pod,
            argv,
            input,
            Sink::Buffers(&mut out, &mut err),
            budget,
        )
        .await?
        {
            Ended::Exited(0) => Ok(out),
            Ended::Exited(code) => Err(Error::provider(
                KEY,
                format!(
                    "{what} failed (exit {code}): {}",
                    String::from_utf8_lossy(&err).trim()
                ),
            )),
            Ended::TimedOut => Err(exec::timeout_error(pod, &cmd0, budget)),
        }
    }

    /// Watches a running command from the side (spec 26 §9.3 liveness): it
    /// returns only when the exec connection must be considered lost.
    async fn watch_exec(&self, t: &Target, pod: &str, pid_file: &str, cmd0: &str) -> Error {
        let interval = self.inner.opts.liveness_interval;
        let (mut missing, mut failures) = (0, 0);
        loop {
            tokio::time::sleep(interval).await;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let probe = exec::run(
                &Self::pods(t),
                pod,
                exec::probe_script(pid_file),
                Input::None,
                Sink::Buffers(&mut out, &mut err),
                self.inner.opts.request_timeout,
            )
            .await;
            let detail = match probe {
                Ok(Ended::Exited(0)) => {
                    (missing, failures) = (0, 0);
                    continue;
                }
                Ok(Ended::Exited(1)) => {
                    // Give a status frame already in flight one more interval.
                    tokio::time::sleep(interval).await;
                    "connection_closed: the command ended but no exit status arrived"
                }
                Ok(Ended::Exited(_)) => {
                    missing += 1;
                    if missing < 2 {
                        continue;
                    }
                    "keepalive_timeout: the command never started"
                }
                Ok(Ended::TimedOut) | Err(_) => {
                    failures += 1;
                    if failures < 2 {
                        continue;
                    }
                    "connection_error: the pod stopped answering liveness probes"
                }
            };
            return Error::Provider {
                provider: KEY.into(),
                message: format!(
                    "execInPod lost its exec connection before the command reported an exit status ({detail}; pod={pod}, container={CONTAINER}, cmd0={cmd0}). The command was not re-run and may still be running in the pod."
                ),
                retryable: true,
                source: None,
            };
        }
    }

    /// Waits for a Job lease to finish and returns its result (job backend,
    /// spec 26 §14): the pod log as output, exit 0 on success, 1 on failure,
    /// `None` when `timeout` ran out first.
    ///
    /// ```no_run
    /// # async fn demo(p: paperclip_env_providers::kubernetes::KubernetesProvider,
    /// #   ctx: paperclip_env_core::CallContext, lease: paperclip_env_core::LeaseHandle) -> paperclip_env_core::Result<()> {
    /// let outcome = p.wait_for_job(&ctx, &lease, std::time::Duration::from_secs(600)).await?;
    /// println!("{} {:?}\n{}", outcome.phase, outcome.exit_code, outcome.log);
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_job(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        timeout: Duration,
    ) -> Result<JobOutcome> {
        let Some(id) = lease.id() else {
            return Err(Error::not_found(
                "No provider lease ID available for execution.",
            ));
        };
        let t = self.target(ctx, Some(lease)).await?;
        if self.lease_backend(&t, lease) != Backend::Job {
            return Err(Error::InvalidInput {
                what: "lease",
                message: format!("lease {id} uses the sandbox-cr backend, not job"),
            });
        }
        let path = format!("{}/{id}/status", job_collection(&t.namespace));
        let start = Instant::now();
        let phase = loop {
            let Some(job) = t.kube.get(&path).await? else {
                return Err(Error::not_found(format!(
                    "Job {}/{id} no longer exists",
                    t.namespace
                )));
            };
            let phase = job_phase(&job);
            if phase == "Succeeded" || phase == "Failed" || start.elapsed() >= timeout {
                break phase;
            }
            // A pod that can never start, or none at all, fails now, not at the deadline.
            match self.job_pod(&t, id).await? {
                Some(pod) => {
                    if let Some((reason, message)) = pod_failure(&pod) {
                        return Err(Error::provider(
                            KEY,
                            format!("Job {}/{id} failed: {reason} — {message}", t.namespace),
                        ));
                    }
                }
                None => {
                    if let Some(message) = self.job_refusal(&t, id).await? {
                        return Err(Error::provider(
                            KEY,
                            format!("Job {}/{id} cannot create its pod: {message}", t.namespace),
                        ));
                    }
                }
            }
            tokio::time::sleep(
                self.inner
                    .opts
                    .poll_interval
                    .min(timeout.saturating_sub(start.elapsed()))
                    .max(Duration::from_millis(10)),
            )
            .await;
        };
        let pod = self.job_pod(&t, id).await?;
        let pod_name = pod
            .as_ref()
            .and_then(|p| str_at(p, "/metadata/name"))
            .map(str::to_owned);
        let log = match &pod_name {
            Some(p) => t
                .kube
                .get_text(&format!(
                    "{}/{p}/log?container={CONTAINER}",
                    core_collection(&t.namespace, "pods")
                ))
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, "reading the Job pod log failed");
                    String::new()
                }),
            None => String::new(),
        };
        let exit_code = match phase {
            "Succeeded" => Some(0),
            "Failed" => Some(1),
            _ => None,
        };
        Ok(JobOutcome {
            phase: phase.to_owned(),
            exit_code,
            log,
            pod_name,
        })
    }
}

#[async_trait]
impl SandboxProvider for KubernetesProvider {
    fn key(&self) -> &str {
        KEY
    }

    /// Paperclip 2026.916's plugin id for this provider.
    fn plugin_key(&self) -> String {
        format!("paperclip.{}-sandbox-provider", self.key())
    }

    fn capabilities(&self) -> Capabilities {
        backend_capabilities(self.inner.opts.backend)
    }

    /// A lease keeps the backend it was created with (spec 26 §14): a
    /// `job` lease cannot run commands even when this instance defaults to
    /// `sandbox-cr`, and the other way round.
    fn lease_capabilities(&self, lease: &LeaseHandle) -> Capabilities {
        backend_capabilities(self.recorded_backend(lease))
    }

    /// Provisioning the tenant, creating the workload and waiting for its
    /// pod (bounded by `podActivityDeadlineSec`, default one hour) plus a
    /// margin: the host must not cut a slow schedule short.
    fn default_lease_deadline(&self) -> Option<Duration> {
        let ready = self.inner.opts.ready_timeout.unwrap_or(Duration::from_secs(
            config::DEFAULT_POD_ACTIVITY_DEADLINE_SEC,
        ));
        Some(ready + self.inner.opts.request_timeout * 4 + Duration::from_secs(30))
    }

    fn lease_label(&self, lease: &LeaseHandle) -> String {
        match self.recorded_backend(lease) {
            Backend::Job => format!("{KEY} (job backend)"),
            Backend::SandboxCr => format!("{KEY} (sandbox-cr backend)"),
        }
    }

    fn config_schema(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(KubernetesConfigSchema))
            .unwrap_or_else(|_| json!({"type": "object"}))
    }

    async fn validate_config(&self, config: &JsonObject) -> Result<ConfigValidation> {
        Ok(match KubernetesConfig::parse(config) {
            Ok(parsed) => {
                let mut v = ConfigValidation::valid(parsed.normalized(config));
                v.warnings = parsed.warnings();
                v
            }
            Err(issues) => ConfigValidation::invalid(issues),
        })
    }

    async fn probe(&self, ctx: &CallContext) -> Result<ProviderProbe> {
        let result: Result<ProviderProbe> = async {
            let t = match self.target(ctx, None).await {
                Ok(t) => t,
                Err(Error::InvalidConfig { issues, .. }) => {
                    let mut md = JsonObject::new();
                    md.insert(
                        "errors".into(),
                        json!(issues.iter().map(ToString::to_string).collect::<Vec<_>>()),
                    );
                    return Ok(ProviderProbe {
                        ok: false,
                        summary: Some("Invalid Kubernetes provider configuration.".into()),
                        metadata: Some(md),
                        ..Default::default()
                    });
                }
                Err(e) => return Err(e),
            };
            let mut md = JsonObject::new();
            md.insert("namespace".into(), json!(t.namespace));
            md.insert("provider".into(), json!(KEY));
            match t
                .kube
                .list(&core_collection(&t.namespace, "pods"), "")
                .await
            {
                Ok(_) => Ok(ProviderProbe {
                    ok: true,
                    summary: Some(format!(
                        "Kubernetes cluster reachable. Tenant namespace: {}.",
                        t.namespace
                    )),
                    metadata: Some(md),
                    ..Default::default()
                }),
                Err(e) if e.is_not_found() => Ok(ProviderProbe {
                    ok: true,
                    summary: Some(format!(
                        "Kubernetes cluster reachable. Tenant namespace: {}.",
                        t.namespace
                    )),
                    metadata: Some(md),
                    ..Default::default()
                }),
                Err(e) => {
                    md.insert("error".into(), json!(scrubber(ctx).scrub(&e.to_string())));
                    Ok(ProviderProbe {
                        ok: false,
                        summary: Some("Kubernetes cluster probe failed.".into()),
                        metadata: Some(md),
                        ..Default::default()
                    })
                }
            }
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn acquire(&self, ctx: &CallContext, request: &AcquireRequest) -> Result<ProviderLease> {
        let result: Result<ProviderLease> = async {
        let t = self.target(ctx, None).await?;
        let company = company_of(ctx).to_owned();
        let adapter = adapters::resolve(&t.config, None)
            .map_err(|m| Error::invalid_field("adapterType", m))?;
        for w in t.config.warnings() {
            warn!("[plugin-kubernetes] {w}");
        }
        let backend = t.config.backend_or(self.inner.opts.backend);
        let version = match backend {
            Backend::SandboxCr => Some(self.sandbox_version(&t).await?),
            Backend::Job => None,
        };
        let mut fqdns = adapter.allow_fqdns.clone();
        for f in &t.config.egress_allow_fqdns {
            if !fqdns.contains(f) {
                fqdns.push(f.clone());
            }
        }
        self.ensure_tenant(&t, &company, &fqdns).await?;
        let name = workload_name();
        let run_label = naming::label_value(&request.run_id);
        let labels = naming::run_labels(&request.run_id, &company, &adapter.adapter_type);
        let annotations = manifests::raw_id_annotations(&request.run_id, &company);
        let image = resolve_image(&t.config, &adapter.runtime_image, None)
            .map_err(|m| Error::invalid_field("imageAllowList", m))?;
        let secret_name = child_name(&name, "-env");
        let inputs = PodInputs {
            image: &image,
            secret_name: &secret_name,
            labels: &labels,
            annotations: &annotations,
            config: &t.config,
        };
        let (collection, manifest) = match (backend, &version) {
            (Backend::SandboxCr, Some(v)) => (
                sandbox_collection(v, &t.namespace),
                manifests::sandbox(v, &name, &t.namespace, &inputs),
            ),
            _ => (
                job_collection(&t.namespace),
                manifests::job(&name, &t.namespace, &inputs),
            ),
        };
        let created = match t.kube.create(&collection, &manifest).await {
            Ok(created) => created,
            Err(e) => {
                // A create that timed out or hit a 5xx may still have happened:
                // make sure the named workload does not outlive the failure.
                if e.is_retryable() && !client::is_conflict(&e) {
                    let unanswered = matches!(e, Error::Timeout { .. });
                    self.cleanup_ambiguous_create(
                        &t,
                        backend,
                        version.as_deref(),
                        &name,
                        unanswered,
                    )
                    .await;
                }
                return Err(scrubber(ctx).scrub_error(KEY, e));
            }
        };
        info!(namespace = %t.namespace, workload = %name, backend = backend.as_str(), "created the run workload");
        match self
            .finish_acquire(
                &t,
                backend,
                version.as_deref(),
                &name,
                &created,
                &run_label,
                &adapter,
            )
            .await
        {
            Ok((pod, phase)) => {
                if backend == Backend::SandboxCr {
                    lock(&self.inner.ready).insert(name.clone());
                }
                let md = Self::metadata(
                    &t,
                    backend,
                    &name,
                    pod.as_deref(),
                    phase,
                    version.as_deref(),
                    Some(&request.run_id),
                );
                Ok(ProviderLease::new(name, md))
            }
            Err(e) => {
                let e = scrubber(ctx).scrub_error(KEY, e);
                match self
                    .delete_workload(&t, backend, version.as_deref(), &name)
                    .await
                {
                    Ok(_) => Err(e),
                    Err(cleanup) => {
                        error!(workload = %name, error = %cleanup, "deleting the workload of a failed acquire failed");
                        Err(Error::Provider {
                            provider: KEY.into(),
                            message: format!(
                                "{e}; deleting workload {}/{name} also failed: {cleanup}",
                                t.namespace
                            ),
                            retryable: e.is_retryable(),
                            source: Some(Box::new(e)),
                        })
                    }
                }
            }
        }
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn resume(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<ProviderLease> {
        let result: Result<ProviderLease> = async {
            let Some(id) = lease.id() else {
                return Ok(expired("No provider lease ID to resume"));
            };
            let t = self.target(ctx, Some(lease)).await?;
            let backend = self.lease_backend(&t, lease);
            lock(&self.inner.ready).remove(id);
            match backend {
                Backend::SandboxCr => {
                    let version = match md_str(lease, "sandboxApiVersion") {
                        Some(v) => v.to_owned(),
                        None => self.sandbox_version(&t).await?,
                    };
                    let pod = match self
                        .wait_sandbox_ready(
                            &t,
                            &version,
                            id,
                            self.inner.opts.resume_timeout,
                            self.inner.opts.resume_poll_interval,
                        )
                        .await
                    {
                        Ok(pod) => pod,
                        Err(e) if e.is_not_found() => {
                            let message = e.to_string();
                            return Ok(expired(if message.contains("no longer exists") {
                                "Sandbox CR no longer exists".to_owned()
                            } else {
                                message
                            }));
                        }
                        Err(e) => return Ok(expired(e.to_string())),
                    };
                    let Some(p) = t
                        .kube
                        .get(&format!("{}/{pod}", core_collection(&t.namespace, "pods")))
                        .await?
                    else {
                        return Ok(expired(format!("Pod {pod} no longer exists")));
                    };
                    let phase = str_at(&p, "/status/phase").unwrap_or("");
                    if p.pointer("/metadata/deletionTimestamp")
                        .is_some_and(|v| !v.is_null())
                        || phase != "Running"
                    {
                        let state = if p
                            .pointer("/metadata/deletionTimestamp")
                            .is_some_and(|v| !v.is_null())
                        {
                            "terminating"
                        } else if phase.is_empty() {
                            "in an unknown phase"
                        } else {
                            phase
                        };
                        return Ok(expired(format!("Pod {pod} is {state}")));
                    }
                    lock(&self.inner.ready).insert(id.to_owned());
                    let mut md = Self::metadata(
                        &t,
                        backend,
                        id,
                        Some(&pod),
                        "Running",
                        Some(&version),
                        md_str(lease, "paperclipRunId"),
                    );
                    if let Some(cwd) = md_str(lease, "remoteCwd") {
                        md.insert("remoteCwd".into(), json!(cwd));
                    }
                    md.insert("resumedLease".into(), json!(true));
                    Ok(ProviderLease::new(id, md))
                }
                Backend::Job => {
                    let Some(job) = t
                        .kube
                        .get(&format!("{}/{id}/status", job_collection(&t.namespace)))
                        .await?
                    else {
                        return Ok(expired("Job no longer exists"));
                    };
                    let phase = job_phase(&job);
                    if phase == "Succeeded" || phase == "Failed" {
                        return Ok(expired(format!("Job is {phase}")));
                    }
                    let pod = self.job_pod(&t, id).await?;
                    let pod_name = pod.as_ref().and_then(|p| str_at(p, "/metadata/name"));
                    let mut md = Self::metadata(
                        &t,
                        backend,
                        id,
                        pod_name,
                        phase,
                        None,
                        md_str(lease, "paperclipRunId"),
                    );
                    md.insert("resumedLease".into(), json!(true));
                    Ok(ProviderLease::new(id, md))
                }
            }
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        _status: LeaseStatus,
    ) -> Result<()> {
        let result: Result<()> = async {
            let Some(id) = lease.id() else { return Ok(()) };
            lock(&self.inner.ready).remove(id);
            let t = self.target(ctx, Some(lease)).await?;
            let backend = self.lease_backend(&t, lease);
            let deleted = self
                .delete_workload(&t, backend, md_str(lease, "sandboxApiVersion"), id)
                .await
                .map_err(|e| scrubber(ctx).scrub_error(KEY, e))?;
            if !deleted {
                debug!(workload = id, "the workload was already gone at release");
            }
            Ok(())
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    /// The Sandboxes (every served version) and Jobs of the tenant
    /// namespace labelled `paperclip.io/run-id=<run>`, as handles `destroy`
    /// accepts (namespace, backend and API version in the metadata).
    async fn list_run_resources(
        &self,
        ctx: &CallContext,
        run_id: &str,
    ) -> Result<Vec<LeaseHandle>> {
        let result: Result<Vec<LeaseHandle>> = async {
            let t = self.target(ctx, None).await?;
            let selector = format!("paperclip.io/run-id={}", naming::label_value(run_id));
            let handle = |name: &str, backend: Backend, version: Option<&str>| {
                let mut md = JsonObject::new();
                md.insert("namespace".into(), json!(t.namespace));
                md.insert("backend".into(), json!(backend.as_str()));
                if let Some(v) = version {
                    md.insert("sandboxApiVersion".into(), json!(v));
                }
                LeaseHandle {
                    provider_lease_id: Some(name.to_owned()),
                    metadata: Some(md),
                    expires_at: None,
                }
            };
            let name_of = |item: &Value| {
                item.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let mut found = Vec::new();
            // Sandboxes of whichever versions this cluster serves.
            if let Ok(version) = self.sandbox_version(&t).await {
                for item in t
                    .kube
                    .list(&sandbox_collection(&version, &t.namespace), &selector)
                    .await?
                {
                    if let Some(name) = name_of(&item) {
                        found.push(handle(&name, Backend::SandboxCr, Some(&version)));
                    }
                }
            }
            for item in t
                .kube
                .list(&job_collection(&t.namespace), &selector)
                .await?
            {
                if let Some(name) = name_of(&item) {
                    found.push(handle(&name, Backend::Job, None));
                }
            }
            Ok(found)
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn destroy(&self, ctx: &CallContext, lease: &LeaseHandle) -> Result<()> {
        let result: Result<()> = async {
            let Some(id) = lease.id() else { return Ok(()) };
            lock(&self.inner.ready).remove(id);
            let t = self.target(ctx, Some(lease)).await?;
            let backend = self.lease_backend(&t, lease);
            let mut failures: Vec<(String, Error)> = Vec::new();
            if let Err(e) = self
                .delete_workload(&t, backend, md_str(lease, "sandboxApiVersion"), id)
                .await
            {
                failures.push((id.to_owned(), e));
            }
            if let Some(pod) = md_str(lease, "podName")
                && let Err(e) = t
                    .kube
                    .delete(&format!("{}/{pod}", core_collection(&t.namespace, "pods")))
                    .await
            {
                failures.push((pod.to_owned(), e));
            }
            let secret = md_str(lease, "secretName")
                .map(str::to_owned)
                .unwrap_or_else(|| child_name(id, "-env"));
            if let Err(e) = t
                .kube
                .delete(&format!(
                    "{}/{secret}",
                    core_collection(&t.namespace, "secrets")
                ))
                .await
            {
                failures.push((secret, e));
            }
            match failures.len() {
                0 => Ok(()),
                1 => Err(failures.remove(0).1),
                _ => Err(Error::ReleaseFailed { failures }),
            }
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn realize_workspace(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let result: Result<RealizeWorkspaceResult> = async {
        let cwd = lease
            .preferred_cwd(workspace)
            .map(|c| c.trim().to_owned())
            .filter(|c| c.starts_with('/'))
            .unwrap_or_else(|| DEFAULT_CWD.to_owned());
        if !manifests::is_writable_in_pod(&cwd) {
            return Err(Error::InvalidInput {
                what: "workspace cwd",
                message: format!(
                    "cannot realize the workspace at {cwd}: the pod's root filesystem is read-only (readOnlyRootFilesystem); only {} are writable",
                    manifests::WRITABLE_MOUNTS.join(", ")
                ),
            });
        }
        if let Some(id) = lease.id() {
            let t = self.target(ctx, Some(lease)).await?;
            if self.lease_backend(&t, lease) == Backend::SandboxCr && cwd != DEFAULT_CWD {
                let budget = self.inner.opts.request_timeout;
                let pod = self
                    .ready_pod(&t, lease, id, self.ready_budget(&t.config))
                    .await?;
                self.helper(
                    &t,
                    &pod,
                    vec!["mkdir".into(), "-p".into(), cwd.clone()],
                    Input::None,
                    budget,
                    "creating the workspace directory",
                )
                .await?;
            }
        }
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("remoteCwd".into(), json!(cwd));
        Ok(RealizeWorkspaceResult {
            cwd,
            metadata: Some(md),
        })
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn workspace_transport(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
    ) -> Result<Option<Arc<dyn WorkspaceTransport>>> {
        let result: Result<Option<Arc<dyn WorkspaceTransport>>> = async {
            let Some(id) = lease.id() else {
                return Ok(None);
            };
            let t = self.target(ctx, Some(lease)).await?;
            if self.lease_backend(&t, lease) != Backend::SandboxCr {
                return Ok(None);
            }
            let pod = self
                .ready_pod(&t, lease, id, self.ready_budget(&t.config))
                .await?;
            let transport: Arc<dyn WorkspaceTransport> = Arc::new(ExecFiles {
                provider: self.clone(),
                target: Arc::new(t),
                pod,
            });
            Ok(Some(transport))
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let result: Result<CommandExit> = async {
        let job_refusal =
            || Error::provider_unsupported(self.lease_label(lease), Operation::Execute);
        // A Job runs its command once; it cannot run commands on demand.
        if self.recorded_backend(lease) == Backend::Job && lease.id().is_some() {
            return Err(job_refusal());
        }
        let Some(id) = lease.id() else {
            output.stderr(b"No provider lease ID available for execution.");
            return Ok(CommandExit::code(1));
        };
        let t = self.target(ctx, Some(lease)).await?;
        let backend = self.lease_backend(&t, lease);
        if backend == Backend::Job {
            return Err(job_refusal());
        }
        let budget = Duration::from_millis(
            request
                .timeout_ms
                .filter(|ms| *ms > 0)
                .or_else(|| ctx.config.timeout_ms())
                .unwrap_or(t.config.pod_activity_deadline_sec * 1000),
        );
        let start = Instant::now();
        let pod = match self.ready_pod(&t, lease, id, budget).await {
            Ok(pod) => pod,
            Err(Error::Timeout { .. }) => {
                output.stderr(
                    format!(
                        "Sandbox pod did not become Ready within {}ms",
                        budget.as_millis()
                    )
                    .as_bytes(),
                );
                return Ok(exec::to_exit(Ended::TimedOut));
            }
            Err(e) => return Err(scrubber(ctx).scrub_error(KEY, e)),
        };
        let stdin = request.stdin.as_deref().filter(|s| !s.is_empty());
        let argv = build_argv(
            &request.command,
            &request.args,
            &request.env,
            request.cwd.as_deref(),
            stdin.map(str::len),
        );
        let pid_file = format!("/tmp/.paperclip-exec-{}.pid", uuid::Uuid::new_v4());
        let argv = exec::with_pid_file(argv, &pid_file);
        let remaining = budget
            .saturating_sub(start.elapsed())
            .max(budget.min(Duration::from_secs(5)));
        let input = stdin
            .map(|s| Input::Bytes(s.as_bytes()))
            .unwrap_or(Input::None);
        let cmd0 = argv.get(4).cloned().unwrap_or_default();
        let pods = Self::pods(&t);
        let mut stderr_tail = Vec::new();
        let ended = tokio::select! {
            ended = exec::run(&pods, &pod, argv, input, Sink::Collector(output, &mut stderr_tail), remaining) => ended,
            lost = self.watch_exec(&t, &pod, &pid_file, &cmd0) => Err(lost),
        }
        .map_err(|e| scrubber(ctx).scrub_error(KEY, e))?;
        if matches!(ended, Ended::Exited(code) if code != 0)
            && let Some(hint) = network_denial_hint(&stderr_tail)
        {
            output.stderr(hint.as_bytes());
        }
        if matches!(ended, Ended::TimedOut) {
            let kill = exec::kill_script(&pid_file);
            if let Err(e) = self
                .helper(
                    &t,
                    &pod,
                    kill,
                    Input::None,
                    self.inner.opts.request_timeout,
                    "killing the timed-out command",
                )
                .await
            {
                error!(pod = %pod, error = %e, "killing a timed-out command failed; it may still run in the pod");
            }
        }
        let mut exit = exec::to_exit(ended);
        let mut md = JsonObject::new();
        md.insert("provider".into(), json!(KEY));
        md.insert("backend".into(), json!(backend.as_str()));
        md.insert("namespace".into(), json!(t.namespace));
        md.insert("sandboxName".into(), json!(id));
        md.insert("podName".into(), json!(pod));
        exit.metadata = Some(md);
        Ok(exit)
        }
        .await;
        result.map_err(|e| scrubber(ctx).scrub_error(KEY, e))
    }
}

/// Workspace archives moved through exec: `head -c <n> > file` with the bytes
/// on stdin, and `cat file` to read one back. `WorkspaceSync` runs `tar`.
struct ExecFiles {
    provider: KubernetesProvider,
    target: Arc<Target>,
    pod: String,
}

#[async_trait]
impl WorkspaceTransport for ExecFiles {
    fn name(&self) -> &str {
        "kubernetes-exec"
    }

    async fn put_file(&self, local: &Path, remote: &str, timeout_ms: u64) -> Result<()> {
        let size = tokio::fs::metadata(local)
            .await
            .map_err(|e| {
                Error::provider_with_source(
                    KEY,
                    format!("reading {} failed", local.display()),
                    false,
                    e,
                )
            })?
            .len();
        let script = if size == 0 {
            format!(": > {}", sh_quote(remote))
        } else {
            format!("head -c {size} > {}", sh_quote(remote))
        };
        let input = if size == 0 {
            Input::None
        } else {
            Input::File(local)
        };
        self.provider
            .helper(
                &self.target,
                &self.pod,
                vec!["/bin/sh".into(), "-c".into(), script],
                input,
                Duration::from_millis(timeout_ms.max(1)),
                "uploading a workspace archive",
            )
            .await
            .map(|_| ())
    }

    async fn get_file(&self, remote: &str, local: &Path, timeout_ms: u64) -> Result<()> {
        let mut file = tokio::fs::File::create(local).await.map_err(|e| {
            Error::provider_with_source(
                KEY,
                format!("creating {} failed", local.display()),
                false,
                e,
            )
        })?;
        let mut err = Vec::new();
        let budget = Duration::from_millis(timeout_ms.max(1));
        let argv = vec!["cat".to_owned(), "--".to_owned(), remote.to_owned()];
        match exec::run(
            &KubernetesProvider::pods(&self.target),
            &self.pod,
            argv,
            Input::None,
            Sink::File(&mut file, &mut err),
            budget,
        )
        .await?
        {
            Ended::Exited(0) => Ok(()),
            Ended::Exited(code) => Err(Error::provider(
                KEY,
                format!(
                    "downloading {remote} failed (exit {code}): {}",
                    String::from_utf8_lossy(&err).trim()
                ),
            )),
            Ended::TimedOut => Err(exec::timeout_error(&self.pod, "cat", budget)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn the_scrubber_knows_every_credential_inside_the_kubeconfig() {
        let pem_line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7canary";
        let key_pem =
            format!("-----BEGIN PRIVATE KEY-----\n{pem_line}\n-----END PRIVATE KEY-----\n");
        let key_data = base64::engine::general_purpose::STANDARD.encode(&key_pem);
        let cert_data = base64::engine::general_purpose::STANDARD
            .encode("-----BEGIN CERTIFICATE-----\nMIIDcanarycertificatebody0123456789\n-----END CERTIFICATE-----\n");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: tok-canary-123456\n    password: pw-canary-123456\n    client-key-data: {key_data}\n    client-certificate-data: {cert_data}\n"
        );
        for config in [
            ProviderConfig::new(JsonObject::new())
                .with_secret("kubeconfig", SecretString::from(yaml.clone())),
            ProviderConfig::new(
                json!({"kubeconfig": yaml})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
        ] {
            let ctx = CallContext {
                company_id: None,
                environment_id: "env".into(),
                issue_id: None,
                config,
            };
            let scrub = scrubber(&ctx);
            for leaked in [
                "tok-canary-123456",
                "pw-canary-123456",
                key_data.as_str(),
                pem_line,
                cert_data.as_str(),
                "MIIDcanarycertificatebody0123456789",
            ] {
                let text = scrub.scrub(&format!("error: saw {leaked} here"));
                assert!(!text.contains(leaked), "{leaked} survived: {text}");
            }
        }
    }
}
