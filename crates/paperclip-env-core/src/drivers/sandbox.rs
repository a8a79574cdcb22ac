//! The `sandbox` driver (spec 00 §5.4): routes to sandbox providers by
//! `config.provider`, strips the envelope, resolves secrets per call, composes
//! lease metadata, matches reusable leases, records cleanup outcomes, and puts
//! a deadline on every provider call.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{base_metadata, builtin_fake};
use crate::acquisition::{self, AcquireTiming, Acquirer, acquire_recorded};
use crate::config::{SandboxConfig, TIMEOUT_MS_MAX};
use crate::deadline::{execute_deadline, lease_operation_deadline, with_deadline};
use crate::driver::{AcquireInput, ConfigPurpose, DriverContext, EnvironmentRuntimeDriver};
use crate::execute::{CommandExit, ExecuteRequest, OutputCollector};
use crate::lease::{
    CleanupStatus, Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus, driver_keys,
};
use crate::probe::ProbeResult;
use crate::provider::{
    AcquireRequest, CallContext, LeaseHandle, ProviderLease, Readiness, SandboxProvider,
};
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec, build_realization_record};
use crate::secret::{
    ProviderConfig, collect_secret_ref_paths, persist_secret_refs, positive_ms,
    resolve_provider_config, stored_config_for_metadata, strip_secret_paths,
};
use crate::store::AcquiredLease;
use crate::store::{NewLease, ReleaseUpdate};
use crate::{Error, Operation, Result, Unsupported, time};

/// Host metadata key recording the call budgets the user configured
/// (`timeoutMs`, `bridgeRequestTimeoutMs`) at acquire. Later calls on the
/// lease derive their deadlines from it, never from a `timeoutMs` a provider
/// wrote into its metadata (a provider default such as E2B's one hour is the
/// sandbox lifetime, not a call budget).
pub const HOST_BUDGETS_KEY: &str = "hostBudgets";

/// Metadata keys the host owns; provider metadata never overrides them (spec 00 §2.9 Decision).
pub const HOST_METADATA_KEYS: [&str; 8] = [
    "acquisition",
    HOST_BUDGETS_KEY,
    "driver",
    "executionWorkspaceMode",
    "pluginId",
    "pluginKey",
    "sandboxProviderPlugin",
    "provider",
];

/// Keys dropped when lease metadata is turned back into provider config (spec 00 §5.4.6 Decision).
pub const INTERNAL_METADATA_KEYS: [&str; 10] = [
    "acquisition",
    HOST_BUDGETS_KEY,
    "driver",
    "executionWorkspaceMode",
    "pluginId",
    "pluginKey",
    "providerMetadata",
    "shellCommand",
    "sandboxProviderPlugin",
    "workspaceRealization",
];

/// `failureReason` written when a lease is released as `failed`.
pub const RUN_FAILURE_REASON: &str = crate::lease::failure_reasons::ADAPTER_OR_RUN_FAILURE;
/// `failureReason` written when a lease is destroyed.
pub const DESTROYED_REASON: &str = "lease_destroyed";

/// The `sandbox` driver and its provider registry.
///
/// ```
/// use std::sync::Arc;
/// use paperclip_env_core::drivers::SandboxDriver;
/// let driver = SandboxDriver::new();
/// assert!(driver.provider("e2b").is_none());
/// ```
#[derive(Default)]
pub struct SandboxDriver {
    providers: RwLock<BTreeMap<String, Arc<dyn SandboxProvider>>>,
}

impl std::fmt::Debug for SandboxDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDriver")
            .field("providers", &self.provider_keys())
            .finish()
    }
}

/// A lease that belongs to a provider-backed (non built-in) sandbox.
fn provider_key_of(lease: &EnvironmentLease) -> Option<&str> {
    let md = lease.metadata.as_ref()?;
    let provider = md
        .get("provider")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty());
    let plugin_flag = md
        .get("sandboxProviderPlugin")
        .is_some_and(|v| v != &Value::Bool(false) && !v.is_null());
    match provider {
        Some("fake") if !plugin_flag => None,
        Some(p) => Some(p),
        None => None,
    }
}

fn release_outcome(status: LeaseStatus, policy: LeasePolicy) -> (LeaseStatus, Option<String>) {
    if status == LeaseStatus::Failed {
        let stored = if policy == LeasePolicy::RetainOnFailure {
            LeaseStatus::Retained
        } else {
            LeaseStatus::Failed
        };
        (stored, Some(RUN_FAILURE_REASON.to_owned()))
    } else {
        (status, None)
    }
}

/// `{timeoutMs, bridgeRequestTimeoutMs}` as the user configured them (absent keys omitted).
fn host_budgets(stored: &JsonObject) -> Value {
    let mut budgets = JsonObject::new();
    for key in ["timeoutMs", "bridgeRequestTimeoutMs"] {
        if let Some(v) = stored.get(key).filter(|v| positive_ms(Some(v)).is_some()) {
            budgets.insert(key.into(), v.clone());
        }
    }
    Value::Object(budgets)
}

/// The budgets later calls on `lease` use: those recorded at acquire, else
/// (rows written before budgets were recorded) the rebuilt config's.
fn lease_budgets<'a>(
    lease: &'a EnvironmentLease,
    config: &'a ProviderConfig,
) -> (Option<&'a Value>, Option<&'a Value>) {
    match lease
        .metadata
        .as_ref()
        .and_then(|m| m.get(HOST_BUDGETS_KEY))
    {
        Some(recorded) => (
            recorded.get("timeoutMs"),
            recorded.get("bridgeRequestTimeoutMs"),
        ),
        None => (
            config.get("timeoutMs"),
            config.get("bridgeRequestTimeoutMs"),
        ),
    }
}

fn lease_handle(lease: &EnvironmentLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: lease.expires_at,
    }
}

fn resumable(lease: &EnvironmentLease, run_id: &str) -> bool {
    lease.lease_policy == LeasePolicy::ReuseByEnvironment
        && match lease.status {
            LeaseStatus::Released | LeaseStatus::Retained => true,
            LeaseStatus::Active => lease.heartbeat_run_id.as_deref() == Some(run_id),
            _ => false,
        }
}

/// Provider-backed reuse match (spec 00 §7.2), compared canonically.
fn matches_stored_config(lease: &EnvironmentLease, stored: &JsonObject) -> bool {
    let Some(md) = lease.metadata.as_ref() else {
        return false;
    };
    lease
        .provider_lease_id
        .as_deref()
        .is_some_and(|id| !id.is_empty())
        && md.get("provider") == stored.get("provider")
        && md.get("reuseLease") == Some(&Value::Bool(true))
        && stored
            .iter()
            .filter(|(k, _)| k.as_str() != "provider" && k.as_str() != "reuseLease")
            .all(|(k, v)| md.get(k) == Some(v))
}

impl SandboxDriver {
    /// A driver with no providers (the built-in `fake` is always there).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a provider (builder form).
    pub fn with_provider(self, provider: Arc<dyn SandboxProvider>) -> Self {
        self.register(provider);
        self
    }

    /// Registers a provider; a later one with the same key replaces the earlier.
    pub fn register(&self, provider: Arc<dyn SandboxProvider>) {
        let mut providers = self.providers.write().unwrap_or_else(|p| p.into_inner());
        providers.insert(provider.key().to_owned(), provider);
    }

    /// The provider registered under `key`.
    pub fn provider(&self, key: &str) -> Option<Arc<dyn SandboxProvider>> {
        self.providers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Registered provider keys.
    pub fn provider_keys(&self) -> Vec<String> {
        self.providers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn missing(key: &str) -> Error {
        Error::ProviderUnavailable {
            provider: key.to_owned(),
            message: format!(
                "Sandbox provider \"{key}\" is not registered as a built-in provider and no matching plugin is available."
            ),
            retryable: false,
        }
    }

    /// Resolves a provider for acquire, waiting a bounded time for a worker
    /// that is starting (spec 00 §5.4.2).
    async fn provider_for_acquire(
        &self,
        key: &str,
        ctx: &DriverContext,
    ) -> Result<Arc<dyn SandboxProvider>> {
        let provider = self.provider(key).ok_or_else(|| Self::missing(key))?;
        let deadline = tokio::time::Instant::now() + ctx.options.provider_ready_timeout;
        loop {
            match provider.readiness().await {
                Readiness::Ready => return Ok(provider),
                Readiness::NotReady { status } => {
                    return Err(Error::ProviderUnavailable {
                        provider: key.to_owned(),
                        message: format!(
                            "Sandbox provider \"{key}\" is installed via plugin \"{}\", but that plugin is currently {status}.",
                            provider.plugin_key()
                        ),
                        retryable: false,
                    });
                }
                Readiness::WorkerUnavailable if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::ProviderUnavailable {
                        provider: key.to_owned(),
                        message: format!(
                            "Sandbox provider \"{key}\" is installed via plugin \"{}\", but its worker is not running.",
                            provider.plugin_key()
                        ),
                        retryable: true,
                    });
                }
                Readiness::WorkerUnavailable => {
                    tokio::time::sleep(
                        ctx.options
                            .provider_ready_poll
                            .max(Duration::from_millis(1)),
                    )
                    .await;
                }
            }
        }
    }

    /// The provider if registered and ready now (no waiting).
    async fn provider_ready_now(&self, key: &str) -> Option<Arc<dyn SandboxProvider>> {
        let provider = self.provider(key)?;
        (provider.readiness().await == Readiness::Ready).then_some(provider)
    }

    fn parse_sandbox_config(environment: &Environment) -> Result<SandboxConfig> {
        if environment.driver != driver_keys::SANDBOX {
            return Err(Error::Contract(format!(
                "Expected sandbox environment config for driver \"{}\".",
                environment.driver
            )));
        }
        SandboxConfig::parse(&environment.config)
    }

    /// The stored (secret-id) provider config of an existing lease: lease
    /// metadata minus host keys (spec 00 §5.4.6 with the Decision), else the
    /// environment's config when it still names the same provider.
    fn stored_config_for_lease(
        environment: &Environment,
        lease: &EnvironmentLease,
        provider: &str,
    ) -> JsonObject {
        if let Some(md) = lease.metadata.as_ref()
            && md.get("provider").and_then(Value::as_str) == Some(provider)
        {
            let mut loose = md.clone();
            for key in INTERNAL_METADATA_KEYS {
                loose.remove(key);
            }
            loose.insert(
                "reuseLease".into(),
                json!(md.get("reuseLease") == Some(&Value::Bool(true))),
            );
            if let Ok(SandboxConfig::Provider(envelope)) =
                SandboxConfig::parse(&Value::Object(loose.clone()))
            {
                return envelope.provider_config();
            }
            loose.remove("provider");
            return loose;
        }
        if environment.driver == driver_keys::SANDBOX
            && let Ok(SandboxConfig::Provider(envelope)) = SandboxConfig::parse(&environment.config)
            && envelope.provider == provider
        {
            return envelope.provider_config();
        }
        let mut fallback = lease.metadata.clone().unwrap_or_default();
        for key in INTERNAL_METADATA_KEYS {
            fallback.remove(key);
        }
        fallback.remove("provider");
        fallback
    }

    async fn lease_call(
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        provider: &dyn SandboxProvider,
    ) -> Result<CallContext> {
        let stored = Self::stored_config_for_lease(environment, lease, provider.key());
        let paths = collect_secret_ref_paths(&provider.config_schema());
        let config = resolve_provider_config(&stored, &paths, ctx.secrets.as_ref()).await?;
        Ok(CallContext {
            company_id: lease.company_id.clone(),
            environment_id: lease
                .environment_id
                .clone()
                .unwrap_or_else(|| environment.id.clone()),
            issue_id: lease.issue_id.clone(),
            config,
        })
    }

    fn lease_deadline(
        (timeout, bridge): (Option<&Value>, Option<&Value>),
        ctx: &DriverContext,
        provider: &dyn SandboxProvider,
    ) -> Duration {
        if positive_ms(timeout).is_none()
            && positive_ms(bridge).is_none()
            && let Some(own) = provider.default_lease_deadline()
        {
            return own.max(ctx.options.default_call_deadline);
        }
        lease_operation_deadline(timeout, bridge, &ctx.options)
    }

    async fn acquire_builtin(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
        config: crate::config::FakeSandboxConfig,
    ) -> Result<EnvironmentLease> {
        let environment = input.environment;
        let run_id = input.heartbeat_run_id.clone();
        // The built-in fake is never reusable (Paperclip 2026.916: it does
        // not declare reusable leases), whatever its `reuseLease` says: every
        // acquisition is a fresh, ephemeral lease.
        let ephemeral = crate::config::FakeSandboxConfig {
            reuse_lease: false,
            ..config
        };
        let handle = builtin_fake::acquire(
            &ephemeral,
            &environment.id,
            &run_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        );
        let policy = LeasePolicy::Ephemeral;
        let mut metadata = base_metadata(environment, &input.lease_context);
        for (k, v) in handle.metadata.unwrap_or_default() {
            if !HOST_METADATA_KEYS.contains(&k.as_str()) || k == "provider" {
                metadata.insert(k, v);
            }
        }
        ctx.store
            .insert(NewLease {
                company_id: input.company_id,
                environment_id: environment.id.clone(),
                execution_workspace_id: input.lease_context.execution_workspace_id.clone(),
                issue_id: input.issue_id,
                heartbeat_run_id: run_id,
                lease_policy: Some(policy),
                provider: Some("fake".into()),
                provider_lease_id: handle.provider_lease_id,
                // Only a provider-confirmed expiry is stored (Paperclip
                // 2026.916); the reaper bounds the lease by
                // `max_lease_lifetime` itself.
                expires_at: None,
                metadata: Some(metadata),
            })
            .await
    }

    async fn acquire_provider(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
        envelope: crate::config::ProviderEnvelope,
    ) -> Result<EnvironmentLease> {
        let environment = input.environment;
        let provider = self.provider_for_acquire(&envelope.provider, ctx).await?;
        let paths = collect_secret_ref_paths(&provider.config_schema());
        let worker_stored = envelope.provider_config();
        crate::secret::reject_pinned_secret_versions(&worker_stored, &paths)?;
        let config = resolve_provider_config(&worker_stored, &paths, ctx.secrets.as_ref()).await?;
        let mut stored_for_metadata = JsonObject::new();
        stored_for_metadata.insert("provider".into(), json!(envelope.provider));
        stored_for_metadata.extend(stored_config_for_metadata(&worker_stored, &paths));
        // Host-owned flags are recorded with the config (as Paperclip's
        // lease metadata has them), never handed to the provider.
        envelope.host_flags.apply_to(&mut stored_for_metadata);
        let call = CallContext {
            company_id: input.company_id.clone(),
            environment_id: environment.id.clone(),
            issue_id: input.issue_id.clone(),
            config,
        };
        let deadline = Self::lease_deadline(
            (
                call.config.get("timeoutMs"),
                call.config.get("bridgeRequestTimeoutMs"),
            ),
            ctx,
            provider.as_ref(),
        );
        let run_id = input.heartbeat_run_id.clone();
        let reusable = envelope.reuse_lease && run_id.is_some();
        // Resources are labelled with the run id (a random one for ad-hoc
        // leases); the in-flight row keeps it so a sweep can find them.
        let run_label = run_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

        let mut candidate = None;
        if reusable {
            let run = run_id.as_deref().unwrap_or_default();
            let kept = ctx.store.list_by_environment(&environment.id, None).await?;
            if provider.capabilities().resume {
                candidate = kept
                    .iter()
                    .find(|l| resumable(l, run) && matches_stored_config(l, &stored_for_metadata))
                    .cloned();
            }
            // Paperclip 2026.916's `cleanupObsoleteReusableSandboxLeases`:
            // a kept sandbox of this environment and execution workspace
            // whose recorded config no longer matches can never be resumed,
            // so it is destroyed (`lease_fingerprint_mismatch`) instead of
            // lingering until the reaper's lifetime bound.
            let workspace = input.lease_context.execution_workspace_id.as_deref();
            for obsolete in kept.iter().filter(|l| {
                l.lease_policy == LeasePolicy::ReuseByEnvironment
                    && matches!(l.status, LeaseStatus::Released | LeaseStatus::Retained)
                    && l.execution_workspace_id.as_deref() == workspace
                    && !matches_stored_config(l, &stored_for_metadata)
            }) {
                self.retire_mismatched(ctx, environment, obsolete).await;
            }
        }

        let mut host_metadata = base_metadata(environment, &input.lease_context);
        host_metadata.insert("pluginKey".into(), json!(provider.plugin_key()));
        host_metadata.insert("sandboxProviderPlugin".into(), json!(true));
        host_metadata.insert(HOST_BUDGETS_KEY.into(), host_budgets(&worker_stored));
        let mut pending_metadata = stored_for_metadata.clone();
        pending_metadata.extend(host_metadata.clone());
        crate::acquisition::mark_in_flight(
            &mut pending_metadata,
            &run_label,
            ctx.options.acquisition_heartbeat,
        );

        let policy = if reusable {
            LeasePolicy::ReuseByEnvironment
        } else {
            LeasePolicy::Ephemeral
        };
        let pending = NewLease {
            company_id: input.company_id,
            environment_id: environment.id.clone(),
            execution_workspace_id: input.lease_context.execution_workspace_id.clone(),
            issue_id: input.issue_id,
            heartbeat_run_id: run_id,
            lease_policy: Some(policy),
            provider: Some(envelope.provider.clone()),
            provider_lease_id: None,
            expires_at: None,
            metadata: Some(pending_metadata),
        };
        let own_bound = provider.default_lease_deadline().unwrap_or_default();
        let timing = AcquireTiming {
            caller_deadline: deadline,
            hard_deadline: deadline.max(own_bound).saturating_mul(2),
            heartbeat: ctx.options.acquisition_heartbeat,
        };
        let acquirer = Arc::new(SandboxAcquirer {
            store: ctx.store.clone(),
            provider,
            call,
            deadline,
            paths,
            stored_metadata: stored_for_metadata,
            host_metadata,
            candidate,
            run_label,
            workspace_mode: input.lease_context.execution_workspace_mode.clone(),
            details: input.details.clone(),
            policy,
        });
        acquire_recorded(
            ctx.store.clone(),
            pending,
            timing,
            "environmentAcquireLease",
            acquirer,
        )
        .await
    }

    /// Destroys a kept lease whose fingerprint no longer matches, recording
    /// `lease_fingerprint_mismatch`; a failed teardown leaves it
    /// `pending_cleanup` for the sweep. Never fails the acquisition.
    async fn retire_mismatched(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) {
        let cleanup = match provider_key_of(lease) {
            Some(key) => {
                let key = key.to_owned();
                self.provider_cleanup(ctx, environment, lease, &key, true, LeaseStatus::Expired)
                    .await
            }
            None => Ok(()),
        };
        let reason = Some(crate::lease::failure_reasons::LEASE_FINGERPRINT_MISMATCH.to_owned());
        let (status, update) = match cleanup {
            Ok(()) => (
                LeaseStatus::Expired,
                ReleaseUpdate {
                    failure_reason: reason,
                    cleanup_status: Some(CleanupStatus::Success),
                    cleanup_error: None,
                    termination: crate::lease::remote_termination_receipt(lease, "destroyed"),
                },
            ),
            Err(message) => (
                LeaseStatus::PendingCleanup,
                ReleaseUpdate {
                    failure_reason: reason,
                    cleanup_status: Some(CleanupStatus::Failed),
                    cleanup_error: Some(message),
                    termination: None,
                },
            ),
        };
        match ctx.store.release(&lease.id, status, update).await {
            Ok(_) => {
                info!(lease = %lease.id, %status, "retired a reusable lease whose config no longer matches")
            }
            Err(e) => {
                warn!(lease = %lease.id, error = %e, "could not record a retired reusable lease")
            }
        }
    }

    async fn provider_cleanup(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        provider_key: &str,
        destroy: bool,
        status: LeaseStatus,
    ) -> std::result::Result<(), String> {
        let Some(provider) = self.provider_ready_now(provider_key).await else {
            return Err(format!(
                "Sandbox provider \"{provider_key}\" is not registered or not running; cleanup was not attempted."
            ));
        };
        let call = Self::lease_call(ctx, environment, lease, provider.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let deadline =
            Self::lease_deadline(lease_budgets(lease, &call.config), ctx, provider.as_ref());
        let handle = lease_handle(lease);
        let result = if destroy && provider.lease_capabilities(&handle).destroy {
            with_deadline(
                "environmentDestroyLease",
                deadline,
                provider.destroy(&call, &handle),
            )
            .await
        } else if destroy {
            let call = forced_ephemeral(&call);
            with_deadline(
                "environmentReleaseLease",
                deadline,
                provider.release(&call, &handle, status),
            )
            .await
        } else {
            with_deadline(
                "environmentReleaseLease",
                deadline,
                provider.release(&call, &handle, status),
            )
            .await
        };
        result.map_err(|e| call.config.scrub(&e.to_string()))
    }

    /// Sweeps the provider for what an acquisition that never completed may
    /// have created: every live resource labelled with its run that no lease
    /// row records is destroyed. Deferred (an error) while another
    /// acquisition of the same run is still alive, whose resource would look
    /// the same.
    async fn sweep_in_flight(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        provider_key: &str,
    ) -> std::result::Result<(), String> {
        let Some(label) = acquisition::run_label(lease).map(str::to_owned) else {
            return Err("the in-flight lease records no run label to sweep by".into());
        };
        let Some(provider) = self.provider_ready_now(provider_key).await else {
            return Err(format!(
                "Sandbox provider \"{provider_key}\" is not registered or not running; the sweep was not attempted."
            ));
        };
        let handle = lease_handle(lease);
        if !provider.lease_capabilities(&handle).run_lookup {
            return Err(format!(
                "Sandbox provider \"{provider_key}\" cannot list its resources by run; resources labelled with run \"{label}\" must be checked by hand."
            ));
        }
        let mut recorded = std::collections::HashSet::new();
        if let Some(run) = lease.heartbeat_run_id.as_deref() {
            let rows = ctx
                .store
                .list_by_run(run, None)
                .await
                .map_err(|e| e.to_string())?;
            let now = time::now();
            for row in rows.iter().filter(|r| r.id != lease.id) {
                if acquisition::is_in_flight(row)
                    && !acquisition::is_stale(row, ctx.options.acquisition_heartbeat, now)
                {
                    return Err(format!(
                        "another acquisition of run \"{run}\" is in flight (lease {}); the sweep is deferred",
                        row.id
                    ));
                }
                if let Some(id) = row.provider_lease_id.as_deref() {
                    recorded.insert(id.to_owned());
                }
            }
        }
        let call = Self::lease_call(ctx, environment, lease, provider.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let deadline =
            Self::lease_deadline(lease_budgets(lease, &call.config), ctx, provider.as_ref());
        let found = with_deadline(
            "environmentListRunResources",
            deadline,
            provider.list_run_resources(&call, &label),
        )
        .await
        .map_err(|e| call.config.scrub(&e.to_string()))?;
        let mut failures = Vec::new();
        for resource in found {
            let Some(id) = resource.id().map(str::to_owned) else {
                continue;
            };
            if recorded.contains(&id) {
                continue;
            }
            let outcome = if provider.lease_capabilities(&resource).destroy {
                with_deadline(
                    "environmentDestroyLease",
                    deadline,
                    provider.destroy(&call, &resource),
                )
                .await
            } else {
                let forced = forced_ephemeral(&call);
                with_deadline(
                    "environmentReleaseLease",
                    deadline,
                    provider.release(&forced, &resource, LeaseStatus::Expired),
                )
                .await
            };
            match outcome {
                Ok(()) => {
                    warn!(provider = provider_key, resource = %id, run = %label, "destroyed a resource no lease recorded")
                }
                Err(e) => failures.push(format!("{id}: {}", call.config.scrub(&e.to_string()))),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "destroying unrecorded resources of run \"{label}\" failed: {}",
                failures.join("; ")
            ))
        }
    }

    async fn realize_fallback(
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> RealizeWorkspaceResult {
        build_realization_record(environment, lease, workspace)
    }
}

/// The provider side of one recorded acquisition (see [`crate::acquisition`]).
struct SandboxAcquirer {
    /// Where a kept lease whose resource is gone is retired.
    store: Arc<dyn crate::store::LeaseStore>,
    provider: Arc<dyn SandboxProvider>,
    call: CallContext,
    /// Bound of each teardown call.
    deadline: Duration,
    paths: Vec<String>,
    /// The stored (secret-id) provider config, with `provider`.
    stored_metadata: JsonObject,
    /// Host-owned keys (driver, workspace mode, plugin key, budgets).
    host_metadata: JsonObject,
    /// A kept lease of this environment to resume instead of creating one.
    candidate: Option<EnvironmentLease>,
    run_label: String,
    workspace_mode: Option<String>,
    details: crate::provider::AcquireDetails,
    policy: LeasePolicy,
}

impl SandboxAcquirer {
    fn key(&self) -> &str {
        self.provider.key()
    }
}

#[async_trait]
impl Acquirer for SandboxAcquirer {
    async fn acquire(&self) -> Result<AcquiredLease> {
        let mut handle: Option<ProviderLease> = None;
        if let Some(candidate) = &self.candidate {
            // Paperclip 2026.916: a failed resume is an error, never a silent
            // fresh acquire (spec 00 §7.2 fell back on any failure; issue #22
            // wins). The kept lease is preserved and no replacement is created.
            let kept = candidate.provider_lease_id.as_deref().unwrap_or_default();
            let failed = |cause: String, retryable: bool| Error::Provider {
                provider: self.key().to_owned(),
                message: format!(
                    "Reusable sandbox lease \"{kept}\" could not be resumed; the lease was preserved and no replacement was created. ({cause})"
                ),
                retryable,
                source: None,
            };
            match self
                .provider
                .resume(&self.call, &lease_handle(candidate))
                .await
            {
                Ok(lease) if lease.id().is_some() => handle = Some(lease),
                // The provider answered that the kept resource is gone (no
                // lease id, e.g. an expired sandbox): its row is retired as
                // `resume_failed` and a fresh one is acquired, as upstream
                // does when the provider hands back another lease.
                Ok(_) => {
                    let update = ReleaseUpdate {
                        failure_reason: Some(crate::lease::failure_reasons::RESUME_FAILED.into()),
                        cleanup_status: Some(CleanupStatus::Success),
                        cleanup_error: None,
                        termination: None,
                    };
                    if let Err(e) = self
                        .store
                        .release(&candidate.id, LeaseStatus::Expired, update)
                        .await
                    {
                        warn!(lease = %candidate.id, error = %e, "could not retire a kept lease whose resource is gone");
                    }
                }
                Err(error) => {
                    let retryable = error.is_retryable();
                    return Err(failed(
                        self.call.config.scrub(&error.to_string()),
                        retryable,
                    ));
                }
            }
        }
        let handle = match handle {
            Some(h) => h,
            None => {
                let request = AcquireRequest {
                    run_id: self.run_label.clone(),
                    workspace_mode: self.workspace_mode.clone(),
                    details: self.details.clone(),
                };
                self.provider
                    .acquire(&self.call, &request)
                    .await
                    .map_err(|e| self.call.config.scrub_error(self.key(), e))?
            }
        };

        let mut provider_metadata = handle.metadata.clone().unwrap_or_default();
        strip_secret_paths(&mut provider_metadata, &self.paths);
        let scrubbed = self.call.config.scrub_metadata(&mut provider_metadata);
        if scrubbed > 0 {
            warn!(
                provider = self.key(),
                scrubbed, "provider metadata echoed a secret; removed"
            );
        }
        // Stored config first, provider metadata over it (never over host
        // keys), then the host keys.
        let mut metadata = self.stored_metadata.clone();
        for (k, v) in provider_metadata {
            if !HOST_METADATA_KEYS.contains(&k.as_str()) {
                metadata.insert(k, v);
            }
        }
        metadata.extend(self.host_metadata.clone());
        Ok(AcquiredLease {
            lease_policy: Some(self.policy),
            provider_lease_id: handle.provider_lease_id.clone(),
            // Only the provider's own expiry is stored (see `RuntimeOptions::max_lease_lifetime`).
            expires_at: handle.expires_at,
            metadata: Some(metadata),
        })
    }

    async fn teardown(&self, acquired: &AcquiredLease) -> Result<()> {
        let lease = LeaseHandle {
            provider_lease_id: acquired.provider_lease_id.clone(),
            metadata: acquired.metadata.clone(),
            expires_at: acquired.expires_at,
        };
        if self.provider.lease_capabilities(&lease).destroy {
            with_deadline(
                "environmentDestroyLease",
                self.deadline,
                self.provider.destroy(&self.call, &lease),
            )
            .await
        } else {
            let call = forced_ephemeral(&self.call);
            with_deadline(
                "environmentReleaseLease",
                self.deadline,
                self.provider.release(&call, &lease, LeaseStatus::Failed),
            )
            .await
        }
    }

    fn scrub(&self, message: &str) -> String {
        self.call.config.scrub(message)
    }
}

/// `call` with `reuseLease: false`, so a provider without `destroy` tears
/// the resource down on release instead of keeping it.
fn forced_ephemeral(call: &CallContext) -> CallContext {
    let mut values = call.config.values().clone();
    values.insert("reuseLease".into(), json!(false));
    let mut forced = ProviderConfig::new(values);
    for path in call.config.secret_paths() {
        if let Some(secret) = call.config.secret(path) {
            forced = forced.with_secret(path, secret.clone());
        }
    }
    CallContext {
        config: forced,
        ..call.clone()
    }
}

#[async_trait]
impl EnvironmentRuntimeDriver for SandboxDriver {
    fn key(&self) -> &str {
        driver_keys::SANDBOX
    }

    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
    ) -> Result<EnvironmentLease> {
        let config = Self::parse_sandbox_config(input.environment)?;
        let span = info_span!("sandbox.acquire", provider = config.provider(), environment = %input.environment.id);
        match config {
            SandboxConfig::BuiltinFake(fake) => {
                self.acquire_builtin(ctx, input, fake)
                    .instrument(span)
                    .await
            }
            SandboxConfig::Provider(envelope) => {
                self.acquire_provider(ctx, input, envelope)
                    .instrument(span)
                    .await
            }
        }
    }

    async fn release_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<EnvironmentLease>> {
        let cleanup = match provider_key_of(lease) {
            Some(key) => {
                let key = key.to_owned();
                self.provider_cleanup(ctx, environment, lease, &key, false, status)
                    .instrument(info_span!("sandbox.release", provider = %key, lease = %lease.id))
                    .await
            }
            None => {
                if builtin_fake::config_from_metadata(lease.metadata.as_ref()).is_none()
                    && !matches!(
                        Self::parse_sandbox_config(environment),
                        Ok(SandboxConfig::BuiltinFake(_))
                    )
                {
                    return Err(Error::Contract(format!(
                        "Expected sandbox environment config for lease \"{}\".",
                        lease.id
                    )));
                }
                Ok(())
            }
        };
        let (stored_status, failure_reason) = release_outcome(status, lease.lease_policy);
        let (stored_status, update) = match cleanup {
            Ok(()) => {
                // A kept (reusable) resource is still running: no receipt.
                let gone = lease.lease_policy != LeasePolicy::ReuseByEnvironment
                    && stored_status != LeaseStatus::Retained;
                let termination = gone
                    .then(|| crate::lease::remote_termination_receipt(lease, "destroyed"))
                    .flatten();
                (
                    stored_status,
                    ReleaseUpdate {
                        failure_reason,
                        cleanup_status: Some(CleanupStatus::Success),
                        cleanup_error: None,
                        termination,
                    },
                )
            }
            Err(message) => {
                warn!(lease = %lease.id, %message, "provider cleanup failed; recorded for retry");
                // As in Paperclip 2026.916, a failed cleanup routes the row to
                // `pending_cleanup` (the only status the sweep retries), except
                // a `retained` one, which keeps its resource on purpose.
                let (stored_status, failure_reason) = if stored_status == LeaseStatus::Retained {
                    (stored_status, failure_reason)
                } else {
                    (
                        LeaseStatus::PendingCleanup,
                        failure_reason.or_else(|| {
                            Some(crate::lease::failure_reasons::RELEASE_CLEANUP_FAILED.into())
                        }),
                    )
                };
                (
                    stored_status,
                    ReleaseUpdate {
                        failure_reason,
                        cleanup_status: Some(CleanupStatus::Failed),
                        cleanup_error: Some(message),
                        termination: None,
                    },
                )
            }
        };
        ctx.store.release(&lease.id, stored_status, update).await
    }

    async fn resume_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<ProviderLease> {
        let Some(key) = provider_key_of(lease) else {
            let config =
                builtin_fake::config_from_metadata(lease.metadata.as_ref()).ok_or_else(|| {
                    Error::Contract(format!(
                        "Expected sandbox environment config for lease \"{}\".",
                        lease.id
                    ))
                })?;
            let id = lease
                .provider_lease_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "Sandbox lease \"{}\" does not have a provider lease id to resume.",
                        lease.id
                    ))
                })?;
            return Ok(builtin_fake::resume(&config, id));
        };
        let provider = self.provider(key).ok_or_else(|| Self::missing(key))?;
        let handle = lease_handle(lease);
        if !provider.lease_capabilities(&handle).resume {
            return Err(Error::provider_unsupported(
                provider.lease_label(&handle),
                Operation::Resume,
            ));
        }
        let call = Self::lease_call(ctx, environment, lease, provider.as_ref()).await?;
        let deadline =
            Self::lease_deadline(lease_budgets(lease, &call.config), ctx, provider.as_ref());
        let resumed = with_deadline(
            "environmentResumeLease",
            deadline,
            provider.resume(&call, &handle),
        )
        .await
        .map_err(|e| call.config.scrub_error(key, e))?;
        if resumed.id().is_none() {
            return Err(Error::not_found(format!(
                "Sandbox provider \"{key}\" could not resume lease \"{}\".",
                lease.id
            )));
        }
        Ok(resumed)
    }

    async fn destroy_run_lease(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<Option<EnvironmentLease>> {
        if acquisition::is_in_flight(lease)
            && let Some(key) = provider_key_of(lease)
        {
            let key = key.to_owned();
            let swept = self
                .sweep_in_flight(ctx, environment, lease, &key)
                .instrument(info_span!("sandbox.sweep", provider = %key, lease = %lease.id))
                .await;
            let (status, cleanup_status, cleanup_error) = match swept {
                Ok(()) => (LeaseStatus::Expired, CleanupStatus::Success, None),
                // The marker stays, so the next sweep looks again.
                Err(message) => (
                    LeaseStatus::PendingCleanup,
                    CleanupStatus::Failed,
                    Some(message),
                ),
            };
            let update = ReleaseUpdate {
                failure_reason: Some(acquisition::ACQUIRE_ORPHANED_REASON.into()),
                cleanup_status: Some(cleanup_status),
                cleanup_error,
                termination: None,
            };
            return ctx.store.release(&lease.id, status, update).await;
        }
        let cleanup = match provider_key_of(lease) {
            Some(key) => {
                let key = key.to_owned();
                self.provider_cleanup(ctx, environment, lease, &key, true, LeaseStatus::Expired)
                    .await
            }
            None => Ok(()),
        };
        // A sweep attempt on a `pending_cleanup` row records Paperclip's
        // `pending_cleanup_retry`; any other destroy our `lease_destroyed`.
        let reason = if lease.status == LeaseStatus::PendingCleanup {
            crate::lease::failure_reasons::PENDING_CLEANUP_RETRY
        } else {
            DESTROYED_REASON
        };
        let update = match cleanup {
            Ok(()) => (
                LeaseStatus::Expired,
                ReleaseUpdate {
                    failure_reason: Some(reason.into()),
                    cleanup_status: Some(CleanupStatus::Success),
                    cleanup_error: None,
                    termination: crate::lease::remote_termination_receipt(lease, "destroyed"),
                },
            ),
            Err(message) => (
                LeaseStatus::PendingCleanup,
                ReleaseUpdate {
                    failure_reason: Some(reason.into()),
                    cleanup_status: Some(CleanupStatus::Failed),
                    cleanup_error: Some(message),
                    termination: None,
                },
            ),
        };
        ctx.store.release(&lease.id, update.0, update.1).await
    }

    async fn realize_workspace(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        let Some(key) = provider_key_of(lease) else {
            return Ok(Self::realize_fallback(environment, lease, workspace).await);
        };
        let provider = self.provider(key).ok_or_else(|| Self::missing(key))?;
        let handle = lease_handle(lease);
        if !provider.lease_capabilities(&handle).realize_workspace {
            return Ok(Self::realize_fallback(environment, lease, workspace).await);
        }
        let call = Self::lease_call(ctx, environment, lease, provider.as_ref()).await?;
        let deadline =
            Self::lease_deadline(lease_budgets(lease, &call.config), ctx, provider.as_ref());
        with_deadline(
            "environmentRealizeWorkspace",
            deadline,
            provider.realize_workspace(&call, &handle, workspace),
        )
        .instrument(info_span!("sandbox.realize", provider = %key, lease = %lease.id))
        .await
        .map_err(|e| call.config.scrub_error(key, e))
    }

    async fn workspace_access(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
    ) -> Result<crate::workspace::WorkspaceAccess> {
        let Some(provider) = provider_key_of(lease).and_then(|key| self.provider(key)) else {
            return Ok(crate::workspace::WorkspaceAccess::default());
        };
        let handle = lease_handle(lease);
        let capabilities = provider.lease_capabilities(&handle);
        let transport = if capabilities.native_sync {
            let call = Self::lease_call(ctx, environment, lease, provider.as_ref()).await?;
            provider
                .workspace_transport(&call, &handle)
                .await
                .map_err(|e| call.config.scrub_error(provider.key(), e))?
        } else {
            None
        };
        Ok(crate::workspace::WorkspaceAccess {
            capabilities: Some(capabilities),
            transport,
        })
    }

    async fn execute(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        request: &ExecuteRequest,
        output: &OutputCollector,
    ) -> Result<CommandExit> {
        let Some(key) = provider_key_of(lease) else {
            return Err(Error::NotSupported {
                operation: Operation::Execute,
                by: Unsupported::BuiltinSandboxExecute,
            });
        };
        let provider = self.provider(key).ok_or_else(|| Self::missing(key))?;
        let handle = lease_handle(lease);
        if !provider.lease_capabilities(&handle).execute {
            return Err(Error::provider_unsupported(
                provider.lease_label(&handle),
                Operation::Execute,
            ));
        }
        let call = Self::lease_call(ctx, environment, lease, provider.as_ref()).await?;
        let deadline = execute_deadline(
            request.timeout_ms,
            lease_budgets(lease, &call.config).0,
            &ctx.options,
        );
        with_deadline("environmentExecute", deadline, provider.execute(&call, &handle, request, output))
            .instrument(info_span!("sandbox.execute", provider = %key, lease = %lease.id, command = %request.command))
            .await
            .map_err(|e| call.config.scrub_error(key, e))
    }

    async fn probe(&self, ctx: &DriverContext, environment: &Environment) -> Result<ProbeResult> {
        match Self::parse_sandbox_config(environment)? {
            SandboxConfig::BuiltinFake(c) => Ok(ProbeResult {
                ok: true,
                driver: driver_keys::SANDBOX.into(),
                summary: format!("Fake sandbox provider is ready for image {}.", c.image),
                details: Some(
                    json!({"provider": "fake", "image": c.image, "reuseLease": c.reuse_lease}),
                ),
            }),
            SandboxConfig::Provider(envelope) => {
                let key = envelope.provider.clone();
                let Some(provider) = self.provider_ready_now(&key).await else {
                    return Ok(ProbeResult {
                        ok: false,
                        driver: driver_keys::SANDBOX.into(),
                        summary: format!(
                            "Sandbox provider \"{key}\" is not installed or its plugin worker is not running."
                        ),
                        details: Some(json!({"provider": key})),
                    });
                };
                let paths = collect_secret_ref_paths(&provider.config_schema());
                let config = resolve_provider_config(
                    &envelope.provider_config(),
                    &paths,
                    ctx.secrets.as_ref(),
                )
                .await?;
                let call = CallContext {
                    company_id: environment.company_id.clone(),
                    environment_id: environment.id.clone(),
                    issue_id: None,
                    config,
                };
                let probe = with_deadline(
                    "environmentProbe",
                    ctx.options.probe_deadline,
                    provider.probe(&call),
                )
                .await
                .map_err(|e| call.config.scrub_error(&key, e))?;
                let verdict = if probe.ok { "passed" } else { "failed" };
                let mut metadata = probe.metadata.unwrap_or_default();
                call.config.scrub_metadata(&mut metadata);
                // Diagnostics quote the provider's answers, which may echo a
                // credential: scrubbed like metadata.
                let diagnostics: Vec<crate::provider::Diagnostic> = probe
                    .diagnostics
                    .into_iter()
                    .map(|mut d| {
                        d.message = call.config.scrub(&d.message);
                        if let Some(details) = d.details.take() {
                            let mut wrapper = JsonObject::new();
                            wrapper.insert("d".into(), details);
                            call.config.scrub_metadata(&mut wrapper);
                            d.details = wrapper.remove("d");
                        }
                        d
                    })
                    .collect();
                let summary = probe.summary.map(|s| call.config.scrub(&s));
                Ok(ProbeResult {
                    ok: probe.ok,
                    driver: driver_keys::SANDBOX.into(),
                    summary: summary
                        .unwrap_or_else(|| format!("Sandbox provider \"{key}\" probe {verdict}.")),
                    details: Some(json!({
                        "provider": key,
                        "pluginKey": provider.plugin_key(),
                        "diagnostics": diagnostics,
                        "metadata": metadata,
                    })),
                })
            }
        }
    }

    async fn secure_config(
        &self,
        ctx: &DriverContext,
        environment: &Environment,
    ) -> Result<Option<Value>> {
        let Ok(SandboxConfig::Provider(envelope)) = Self::parse_sandbox_config(environment) else {
            return Ok(None);
        };
        let Some(provider) = self.provider(&envelope.provider) else {
            return Ok(None);
        };
        let paths = collect_secret_ref_paths(&provider.config_schema());
        let Value::Object(mut config) = environment.config.clone() else {
            return Ok(None);
        };
        let plaintext: Vec<&String> = paths
            .iter()
            .filter(|path| {
                crate::secret::get_path(&config, path).is_some_and(|v| {
                    v.as_str()
                        .is_some_and(|s| !s.trim().is_empty() && !crate::secret::is_secret_id(s))
                })
            })
            .collect();
        if plaintext.is_empty() {
            return Ok(None);
        }
        let fields: Vec<String> = plaintext.into_iter().cloned().collect();
        match persist_secret_refs(
            &mut config,
            &fields,
            ctx.secrets.as_ref(),
            &environment.name,
            driver_keys::SANDBOX,
        )
        .await
        {
            Ok(()) => {
                debug!(environment = %environment.id, fields = ?fields, "inline secrets moved to the secret store");
                Ok(Some(Value::Object(config)))
            }
            Err(Error::Secret { .. }) => Err(Error::invalid_field(
                &fields[0],
                format!(
                    "{} holds a plaintext secret; this runtime's secret resolver cannot store it, so give a secret reference instead.",
                    fields[0]
                ),
            )),
            Err(e) => Err(e),
        }
    }

    async fn normalize_config(
        &self,
        ctx: &DriverContext,
        environment_name: &str,
        config: &Value,
        purpose: ConfigPurpose,
    ) -> Result<Value> {
        match SandboxConfig::parse(config)? {
            SandboxConfig::BuiltinFake(_) if purpose == ConfigPurpose::Persistence => {
                Err(Error::invalid_field(
                    "provider",
                    "Built-in fake sandbox environments are reserved for internal probes and cannot be saved.",
                ))
            }
            c @ SandboxConfig::BuiltinFake(_) => Ok(c.to_json()),
            SandboxConfig::Provider(envelope) => {
                let key = envelope.provider.clone();
                let provider = self.provider_ready_now(&key).await.ok_or_else(|| Error::ProviderUnavailable {
                    provider: key.clone(),
                    message: format!("Sandbox provider \"{key}\" is not installed or its plugin worker is not running."),
                    retryable: false,
                })?;
                let paths = collect_secret_ref_paths(&provider.config_schema());
                crate::secret::reject_pinned_secret_versions(&envelope.provider_config(), &paths)?;
                let validation = provider
                    .validate_config(&envelope.provider_config())
                    .await?;
                if !validation.ok {
                    let mut issues = validation.errors;
                    if issues.is_empty() {
                        issues.push(crate::config::ConfigIssue::new(
                            "",
                            format!("Sandbox provider \"{key}\" rejected its config."),
                        ));
                    }
                    return Err(Error::invalid_config(issues));
                }
                let mut normalized = validation
                    .normalized_config
                    .unwrap_or_else(|| envelope.provider_config());
                if purpose == ConfigPurpose::Persistence {
                    persist_secret_refs(
                        &mut normalized,
                        &paths,
                        ctx.secrets.as_ref(),
                        environment_name,
                        driver_keys::SANDBOX,
                    )
                    .await?;
                }
                let mut out = JsonObject::new();
                out.insert("provider".into(), json!(key));
                out.extend(normalized);
                // Upstream's `applyHostOwnedSandboxFlags`: a provider that
                // allowlists its own fields cannot drop the host's flags.
                for key in crate::config::HOST_FLAG_KEYS
                    .iter()
                    .chain(crate::config::REMOVED_SANDBOX_CONFIG_KEYS.iter())
                {
                    out.remove(*key);
                }
                envelope.host_flags.apply_to(&mut out);
                if let Some(t) = out.get("timeoutMs").and_then(Value::as_i64)
                    && !(1..=TIMEOUT_MS_MAX).contains(&t)
                {
                    return Err(Error::invalid_field(
                        "timeoutMs",
                        format!("timeoutMs must be between 1 and {TIMEOUT_MS_MAX}."),
                    ));
                }
                Ok(Value::Object(out))
            }
        }
    }
}
