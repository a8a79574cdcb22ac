//! Runtime behaviour (spec 11 Part B) exercised with the fake provider.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paperclip_env::core::drivers::SandboxDriver;
use paperclip_env::core::store::{InMemoryEnvironmentStore, InMemoryLeaseStore, LeaseStore};
use paperclip_env::core::{
    AcquireRequest, AcquireRunLease, CallContext, Capabilities, CleanupStatus, ConfigPurpose,
    DriverContext, Environment, EnvironmentLease, EnvironmentRuntime, EnvironmentRuntimeDriver,
    EnvironmentStatus, Error, ExecuteRequest, LeaseHandle, LeasePolicy, LeaseStatus, Operation,
    OutputStream, ProviderLease, Readiness, RuntimeOptions, SandboxProvider, WorkspaceSpec,
    async_trait,
};
use paperclip_env_testkit::fake::{FakeProvider, SequentialIds};
use paperclip_env_testkit::recording::RecordingProvider;
use serde_json::{Value, json};

struct Setup {
    runtime: EnvironmentRuntime,
    fake: FakeProvider,
    _root: tempfile::TempDir,
}

fn setup_with(options: RuntimeOptions) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .ids(SequentialIds::new())
        .build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .options(options)
        .build();
    Setup {
        runtime,
        fake,
        _root: root,
    }
}

fn setup() -> Setup {
    setup_with(RuntimeOptions::default())
}

fn fake_env(config: Value) -> Environment {
    let mut c = json!({"provider": "fake-plugin", "image": "fake:test"});
    c.as_object_mut()
        .unwrap()
        .extend(config.as_object().cloned().unwrap_or_default());
    Environment::new("env-1", "Fake sandbox", "sandbox", c).with_company("company-1")
}

fn local_env() -> Environment {
    Environment::new("env-local", "Local", "local", json!({})).with_company("company-1")
}

async fn all_leases(runtime: &EnvironmentRuntime, env: &str) -> Vec<EnvironmentLease> {
    runtime
        .lease_store()
        .list_by_environment(env, None)
        .await
        .unwrap()
}

// ---- B1 acquire ----

#[tokio::test]
async fn b1_1_inactive_environment_is_refused_without_a_lease() {
    let s = setup();
    let mut env = local_env();
    env.status = EnvironmentStatus::Archived;
    env.name = "Old box".into();
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Environment \"Old box\" is not active.");
    assert!(all_leases(&s.runtime, "env-local").await.is_empty());
}

#[tokio::test]
async fn b1_2_unregistered_driver_is_refused_without_a_lease() {
    let s = setup();
    let env = Environment::new("env-x", "X", "kubernetes", json!({}));
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DriverNotRegistered { .. }));
    assert_eq!(
        err.to_string(),
        "Environment driver \"kubernetes\" is not registered in the environment runtime yet."
    );
    assert!(all_leases(&s.runtime, "env-x").await.is_empty());
}

#[tokio::test]
async fn b1_3_to_b1_5_local_lease_shape_and_context() {
    let s = setup();
    let record = s
        .runtime
        .acquire_run_lease(
            AcquireRunLease::for_run(local_env(), "run-1")
                .execution_workspace(Some("ws-1".into()), Some("shared_workspace".into())),
        )
        .await
        .unwrap();
    let lease = &record.lease;
    assert_eq!(lease.status, LeaseStatus::Active);
    assert_eq!(lease.acquired_at, lease.last_used_at);
    assert!(
        lease.released_at.is_none()
            && lease.failure_reason.is_none()
            && lease.cleanup_status.is_none()
    );
    assert_eq!(lease.provider.as_deref(), Some("local"));
    assert_eq!(lease.lease_policy, LeasePolicy::Ephemeral);
    assert!(lease.provider_lease_id.is_none());
    assert_eq!(
        json!(lease.metadata),
        json!({"driver": "local", "executionWorkspaceMode": "shared_workspace"})
    );
    assert_eq!(
        record.lease_context.execution_workspace_id.as_deref(),
        Some("ws-1")
    );
    assert_eq!(lease.company_id.as_deref(), Some("company-1"));

    let projectless = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(local_env(), "run-2"))
        .await
        .unwrap();
    assert_eq!(projectless.lease_context.execution_workspace_id, None);
    assert_eq!(projectless.lease_context.execution_workspace_mode, None);
}

#[tokio::test]
async fn b1_7_b1_8_policy_and_ad_hoc_run_ids() {
    let s = setup();
    let reusable = fake_env(json!({"reuseLease": true}));
    let run = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(reusable.clone(), "run-1"))
        .await
        .unwrap();
    assert_eq!(run.lease.lease_policy, LeasePolicy::ReuseByEnvironment);
    let ad_hoc = s
        .runtime
        .acquire_run_lease(AcquireRunLease::ad_hoc(fake_env(json!({}))))
        .await
        .unwrap();
    assert_eq!(ad_hoc.lease.lease_policy, LeasePolicy::Ephemeral);
    let id = ad_hoc.lease.provider_lease_id.unwrap();
    let run_part = id
        .trim_start_matches("fake-plugin://")
        .split('/')
        .next()
        .unwrap();
    assert!(
        uuid_like(run_part),
        "ad-hoc acquire must pass a random UUID run id, got {id}"
    );
    // Ad-hoc acquisitions on a reusable environment never reuse either.
    let ad_hoc_reuse = s
        .runtime
        .acquire_run_lease(AcquireRunLease::ad_hoc(reusable))
        .await
        .unwrap();
    assert_eq!(ad_hoc_reuse.lease.lease_policy, LeasePolicy::Ephemeral);
    assert_eq!(ad_hoc_reuse.lease.heartbeat_run_id, None);
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn b1_9_to_b1_11_reuse_resumes_the_kept_sandbox_with_its_workspace() {
    let s = setup();
    let recording = RecordingProvider::new(Arc::new(s.fake.clone()));
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(recording.clone()))
        .build();
    let env = fake_env(json!({"reuseLease": true}));
    let first = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    let wrote = runtime
        .execute(&env, &first, &ExecuteRequest::shell("printf kept > marker"))
        .await
        .unwrap();
    assert!(wrote.success());
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        s.fake.live_leases(),
        1,
        "a reusable release keeps the sandbox"
    );

    let second = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    assert_ne!(second.id, first.id, "a resumed lease gets a new row");
    assert_eq!(second.provider_lease_id, first.provider_lease_id);
    assert_eq!(
        second.metadata.as_ref().unwrap()["resumedLease"],
        json!(true)
    );
    let read = runtime
        .execute(&env, &second, &ExecuteRequest::new("cat").arg("marker"))
        .await
        .unwrap();
    assert_eq!(read.stdout, "kept");
    assert!(recording.operations().contains(&Operation::Resume));

    // A different image does not match: fresh acquire, no resume.
    recording.clear();
    runtime
        .release_run_leases("run-2", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let other = fake_env(json!({"reuseLease": true, "image": "fake:other"}));
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(other, "run-3"))
        .await
        .unwrap();
    let ops = recording.operations();
    assert!(!ops.contains(&Operation::Resume), "{ops:?}");
    assert!(ops.contains(&Operation::Acquire));
}

#[tokio::test]
async fn b1_11_a_failed_resume_is_an_error_and_the_kept_lease_is_preserved() {
    let s = setup();
    let recording = RecordingProvider::new(Arc::new(s.fake.clone()));
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(recording.clone()))
        .build();
    let env = fake_env(json!({"reuseLease": true}));
    let kept = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    recording.clear();
    s.fake
        .faults()
        .fail_next(Operation::Resume, || Error::not_found("sandbox expired"));
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-2"))
        .await
        .unwrap_err();
    // Paperclip 2026.916: no silent fresh acquire (spec 00 fell back).
    assert_eq!(recording.operations(), vec![Operation::Resume]);
    let text = err.to_string();
    assert!(
        text.contains("could not be resumed") && text.contains("no replacement was created"),
        "{text}"
    );
    let row = runtime.lease_store().get(&kept.id).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        LeaseStatus::Released,
        "the kept lease is preserved"
    );
    assert_eq!(s.fake.live_leases(), 1);
}

/// Paperclip 2026.916: a kept sandbox whose recorded config no longer
/// matches the environment's is destroyed (`lease_fingerprint_mismatch`)
/// when the environment is next acquired, instead of lingering.
#[tokio::test]
async fn a_kept_lease_whose_config_changed_is_destroyed_as_a_fingerprint_mismatch() {
    let s = setup();
    let env = fake_env(json!({"reuseLease": true, "runnerLifecycleMode": "warm"}));
    let kept = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    s.runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(s.fake.live_leases(), 1);
    let changed = fake_env(json!({"reuseLease": true, "runnerLifecycleMode": "per_turn"}));
    let fresh = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(changed, "run-2"))
        .await
        .unwrap()
        .lease;
    assert_ne!(fresh.id, kept.id);
    assert_eq!(
        fresh.metadata.as_ref().unwrap()["runnerLifecycleMode"],
        json!("per_turn"),
        "host flags are recorded with the config"
    );
    let old = s
        .runtime
        .lease_store()
        .get(&kept.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.status, LeaseStatus::Expired);
    assert_eq!(
        old.failure_reason.as_deref(),
        Some("lease_fingerprint_mismatch")
    );
    assert_eq!(s.fake.live_leases(), 1, "only the fresh sandbox is left");
}

#[tokio::test]
async fn b1_12_active_lease_of_another_run_is_never_resumed() {
    let s = setup();
    let recording = RecordingProvider::new(Arc::new(s.fake.clone()));
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(recording.clone()))
        .build();
    let env = fake_env(json!({"reuseLease": true}));
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap();
    recording.clear();
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-2"))
        .await
        .unwrap();
    assert!(!recording.operations().contains(&Operation::Resume));
}

#[tokio::test]
async fn b1_13_provider_config_is_stripped_and_keeps_envelope_fields() {
    let s = setup();
    let env = fake_env(json!({"timeoutMs": "450000", "custom": {"nested": true}}));
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap();
    let config = s.fake.last_config().unwrap();
    assert!(config.get("provider").is_none());
    assert_eq!(config.get("timeoutMs"), Some(&json!(450000)));
    assert_eq!(config.get("reuseLease"), Some(&json!(false)));
    assert_eq!(config.get("custom"), Some(&json!({"nested": true})));
}

/// A provider that tries to overwrite host-owned metadata keys.
struct HostileProvider;

#[async_trait]
impl SandboxProvider for HostileProvider {
    fn key(&self) -> &str {
        "hostile"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn acquire(
        &self,
        _ctx: &CallContext,
        _r: &AcquireRequest,
    ) -> paperclip_env::Result<ProviderLease> {
        let md = json!({"driver": "local", "pluginKey": "evil", "sandboxProviderPlugin": false, "provider": "fake",
            "executionWorkspaceMode": "evil", "image": "overridden", "remoteCwd": "/work"});
        Ok(ProviderLease::new(
            "hostile-1",
            md.as_object().unwrap().clone(),
        ))
    }
    async fn release(
        &self,
        _ctx: &CallContext,
        _l: &LeaseHandle,
        _s: LeaseStatus,
    ) -> paperclip_env::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn b1_14_b1_15_metadata_composition_and_reserved_keys() {
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(HostileProvider))
        .build();
    let env = Environment::new(
        "env-h",
        "H",
        "sandbox",
        json!({"provider": "hostile", "image": "stored", "timeoutMs": 1000}),
    );
    let lease = runtime
        .acquire_run_lease(
            AcquireRunLease::for_run(env.clone(), "run-1")
                .execution_workspace(None, Some("isolated_workspace".into())),
        )
        .await
        .unwrap()
        .lease;
    let md = lease.metadata.as_ref().unwrap();
    assert_eq!(md["driver"], "sandbox");
    assert_eq!(md["provider"], "hostile");
    assert_eq!(md["sandboxProviderPlugin"], true);
    assert_eq!(md["executionWorkspaceMode"], "isolated_workspace");
    assert_eq!(md["pluginKey"], "paperclip-env.hostile");
    assert_eq!(
        md["image"], "overridden",
        "provider metadata overrides stored-config keys"
    );
    assert_eq!(md["timeoutMs"], 1000);
    assert_eq!(md["remoteCwd"], "/work");
    // Routing still works: release goes through the sandbox driver and the hostile provider.
    let released = runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
}

/// A provider whose worker comes up after a while (or never).
struct SlowStart {
    ready_after: Option<Duration>,
    started: std::time::Instant,
    status: Option<&'static str>,
}

#[async_trait]
impl SandboxProvider for SlowStart {
    fn key(&self) -> &str {
        "slow"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn readiness(&self) -> Readiness {
        if let Some(status) = self.status {
            return Readiness::NotReady {
                status: status.into(),
            };
        }
        match self.ready_after {
            Some(after) if self.started.elapsed() >= after => Readiness::Ready,
            _ => Readiness::WorkerUnavailable,
        }
    }
    async fn acquire(
        &self,
        _ctx: &CallContext,
        r: &AcquireRequest,
    ) -> paperclip_env::Result<ProviderLease> {
        Ok(ProviderLease::new(
            format!("slow://{}", r.run_id),
            Default::default(),
        ))
    }
    async fn release(
        &self,
        _c: &CallContext,
        _l: &LeaseHandle,
        _s: LeaseStatus,
    ) -> paperclip_env::Result<()> {
        Ok(())
    }
}

fn fast_ready_options() -> RuntimeOptions {
    RuntimeOptions {
        provider_ready_timeout: Duration::from_millis(400),
        provider_ready_poll: Duration::from_millis(20),
        ..Default::default()
    }
}

#[tokio::test]
async fn b1_16_b1_17_provider_readiness_wait_and_messages() {
    let env = Environment::new("env-s", "S", "sandbox", json!({"provider": "slow"}));
    let warming = SlowStart {
        ready_after: Some(Duration::from_millis(100)),
        started: std::time::Instant::now(),
        status: None,
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(warming))
        .options(fast_ready_options())
        .build();
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap();

    let never = SlowStart {
        ready_after: None,
        started: std::time::Instant::now(),
        status: None,
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(never))
        .options(fast_ready_options())
        .build();
    let started = std::time::Instant::now();
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        err.to_string(),
        "Sandbox provider \"slow\" is installed via plugin \"paperclip-env.slow\", but its worker is not running."
    );

    let disabled = SlowStart {
        ready_after: None,
        started: std::time::Instant::now(),
        status: Some("disabled"),
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(disabled))
        .build();
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Sandbox provider \"slow\" is installed via plugin \"paperclip-env.slow\", but that plugin is currently disabled."
    );

    let runtime = EnvironmentRuntime::builder().build();
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Sandbox provider \"slow\" is not registered as a built-in provider and no matching plugin is available."
    );
}

// ---- built-in fake ----

#[tokio::test]
async fn builtin_fake_is_never_reusable_and_releases_after_switch_to_local() {
    let runtime = EnvironmentRuntime::builder().build();
    let env = Environment::new(
        "env-1",
        "Probe",
        "sandbox",
        json!({"reuseLease": true, "image": "alpine"}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    // Paperclip 2026.916: the built-in fake declares no reusable leases, so
    // `reuseLease: true` still gives a fresh, ephemeral lease every time.
    assert_eq!(lease.lease_policy, LeasePolicy::Ephemeral);
    assert!(
        lease
            .provider_lease_id
            .as_deref()
            .unwrap()
            .starts_with("sandbox://fake/run-1/")
    );
    assert_eq!(
        json!(lease.metadata),
        json!({"driver":"sandbox","executionWorkspaceMode":null,"provider":"fake","image":"alpine","reuseLease":false})
    );
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let again = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    assert_ne!(again.provider_lease_id, lease.provider_lease_id);
    assert!(
        again
            .metadata
            .as_ref()
            .unwrap()
            .get("resumedLease")
            .is_none()
    );

    // B2.3: no command execution for built-in providers.
    let err = runtime
        .execute(&env, &again, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Sandbox driver does not support direct command execution for built-in providers."
    );

    // Switching the environment to local later still releases through the sandbox driver.
    let mut switched = env.clone();
    switched.driver = "local".into();
    switched.config = json!({});
    runtime.environment_store().put(switched).await.unwrap();
    let released = runtime
        .release_run_leases("run-2", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released[0].lease.status, LeaseStatus::Released);
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
}

// ---- B2 routing ----

#[tokio::test]
async fn b2_1_release_uses_the_driver_recorded_on_the_lease() {
    let s = setup();
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(local_env(), "run-1"))
        .await
        .unwrap();
    let mut switched = local_env();
    switched.driver = "ssh".into();
    s.runtime.environment_store().put(switched).await.unwrap();
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(
        released[0].lease.cleanup_status, None,
        "B3.9: local release leaves cleanupStatus null"
    );
}

#[tokio::test]
async fn b2_2_unsupported_operations_name_the_driver() {
    let s = setup();
    let env = local_env();
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    let e = s.runtime.resume_run_lease(&env, &lease).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Environment driver \"local\" does not support lease resume."
    );
    let e = s.runtime.destroy_run_lease(&env, &lease).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Environment driver \"local\" does not support lease destroy."
    );
    let e = s
        .runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Environment driver \"local\" does not support command execution."
    );
    let realized = s
        .runtime
        .realize_workspace(
            &env,
            &lease,
            &WorkspaceSpec {
                local_path: Some("/srv/ws".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(realized.cwd, "/srv/ws");
    let record = &realized.metadata.unwrap()["workspaceRealization"];
    assert_eq!(record["summary"], "Local workspace realized at /srv/ws.");
    // Paperclip 2026.916's record shape.
    assert_eq!(record["mode"], "copy");
    assert_eq!(record["authoritativeRoot"], "/srv/ws");
    assert_eq!(record["pathAliases"], json!([]));
    assert_eq!(record["outboundRestorePaths"], json!([]));
    assert_eq!(record["additional"], json!([]));
    assert!(record.get("transport").is_none() && record.get("sync").is_none());
}

#[tokio::test]
async fn realization_records_read_in_place_hints_aliases_and_additional_sources() {
    let runtime = EnvironmentRuntime::builder().build();
    let env = Environment::new("env-s", "Sandbox", "sandbox", json!({"provider": "fake"}));
    let mut lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-s"))
        .await
        .unwrap()
        .lease;
    let md = lease.metadata.get_or_insert_with(Default::default);
    md.insert("remoteCwd".into(), json!("/workspace"));
    md.insert(
        "workspaceRealization".into(),
        json!({"mode": "in_place", "pathAliases": [{"path": "/srv/ws", "target": "/workspace"}, {"path": "x"}],
            "outboundRestorePaths": ["out/", " "]}),
    );
    let realized = runtime
        .realize_workspace(
            &env,
            &lease,
            &WorkspaceSpec {
                local_path: Some("/srv/ws".into()),
                metadata: json!({"workspaceRealizationRequest": {"additionalSources": [
                    {"localPath": "/srv/other", "projectId": "p2"}, {"projectId": "no-path"}]}})
                .as_object()
                .cloned(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let record = &realized.metadata.unwrap()["workspaceRealization"];
    assert_eq!(record["mode"], "in_place");
    assert_eq!(record["authoritativeRoot"], "/workspace");
    assert_eq!(
        record["pathAliases"],
        json!([{"path": "/srv/ws", "target": "/workspace"}])
    );
    assert_eq!(record["outboundRestorePaths"], json!(["out/"]));
    assert_eq!(
        record["additional"],
        json!([{"path": "/srv/other", "projectId": "p2", "projectWorkspaceId": null, "repoUrl": null, "repoRef": null}])
    );
}

#[tokio::test]
async fn b2_6_calls_on_a_lease_use_the_config_recorded_at_acquire() {
    let s = setup();
    let env = fake_env(json!({"image": "fake:first", "timeoutMs": 5000}));
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    let mut edited = env.clone();
    edited.config = json!({"provider": "other-provider", "image": "fake:second"});
    s.runtime
        .environment_store()
        .put(edited.clone())
        .await
        .unwrap();
    let r = s
        .runtime
        .execute(&edited, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap();
    assert!(r.success());
    let config = s.fake.last_config().unwrap();
    assert_eq!(config.get("image"), Some(&json!("fake:first")));
    assert!(
        config.get("driver").is_none() && config.get("sandboxProviderPlugin").is_none(),
        "host keys are dropped"
    );
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(s.fake.live_leases(), 0);
}

// ---- B3 release ----

#[tokio::test]
async fn b3_1_b3_2_release_run_leases_releases_each_active_lease_once() {
    let s = setup();
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-1"))
        .await
        .unwrap();
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(local_env(), "run-1"))
        .await
        .unwrap();
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(local_env(), "run-other"))
        .await
        .unwrap();
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released.len(), 2);
    assert!(
        released
            .iter()
            .all(|r| r.lease.status == LeaseStatus::Released && r.lease.released_at.is_some())
    );
    let releases = s.fake.stats().releases.load(Ordering::SeqCst);
    let again = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(
        s.fake.stats().releases.load(Ordering::SeqCst),
        releases,
        "no provider effect the second time"
    );
    assert!(
        s.runtime
            .release_run_leases("run-none", LeaseStatus::Released)
            .await
            .into_result()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn b3_3_b3_11_failed_cleanup_is_recorded_and_listed_for_retry() {
    let s = setup();
    let env = fake_env(json!({}));
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap();
    s.fake.faults().fail_next(Operation::Release, || {
        Error::provider("fake-plugin", "provider API down")
    });
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Expired)
        .await
        .into_result()
        .unwrap();
    let lease = &released[0].lease;
    assert_eq!(
        lease.status,
        LeaseStatus::PendingCleanup,
        "a failed cleanup routes the row to the sweep (Paperclip 2026.916)"
    );
    assert_eq!(
        lease.failure_reason.as_deref(),
        Some("release_cleanup_failed")
    );
    assert_eq!(lease.cleanup_status, Some(CleanupStatus::Failed));
    assert!(lease.cleanup_error().unwrap().contains("provider API down"));
    assert_eq!(lease.cleanup_attempts(), 0, "only sweeps count attempts");
    let pending = s
        .runtime
        .lease_store()
        .list_failed_cleanups()
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, lease.id);
    assert_eq!(
        s.fake.live_leases(),
        1,
        "the resource is still there, and the record says so"
    );
}

#[tokio::test]
async fn b3_4_to_b3_6_cleanup_success_failure_reason_and_retain() {
    let s = setup();
    let env = fake_env(json!({}));
    s.runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap();
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Failed)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released[0].lease.status, LeaseStatus::Failed);
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(
        released[0].lease.failure_reason.as_deref(),
        Some("adapter_or_run_failure")
    );

    let mut lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    lease.lease_policy = LeasePolicy::RetainOnFailure;
    let retained = s
        .runtime
        .release_lease(&env, &lease, LeaseStatus::Failed)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!(retained.status, LeaseStatus::Retained);
    assert!(retained.released_at.is_none());
    assert_eq!(
        retained.failure_reason.as_deref(),
        Some("adapter_or_run_failure")
    );
}

#[tokio::test]
async fn b3_7_provider_gone_at_release_records_failed_cleanup_without_a_call() {
    let s = setup();
    let store = Arc::new(InMemoryLeaseStore::new());
    let envs = Arc::new(InMemoryEnvironmentStore::new());
    let with_provider = EnvironmentRuntime::builder()
        .lease_store(store.clone())
        .environment_store(envs.clone())
        .provider(Arc::new(s.fake.clone()))
        .build();
    with_provider
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-1"))
        .await
        .unwrap();
    let without = EnvironmentRuntime::builder()
        .lease_store(store)
        .environment_store(envs)
        .build();
    let released = without
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.status,
        LeaseStatus::PendingCleanup,
        "left for the sweep"
    );
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Failed)
    );
    assert_eq!(s.fake.stats().releases.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn b3_8_releasing_an_unknown_id_is_none() {
    let store = InMemoryLeaseStore::new();
    assert!(
        store
            .release("nope", LeaseStatus::Released, Default::default())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .release("nope", LeaseStatus::Active, Default::default())
            .await
            .is_err()
    );
}

/// A driver whose release always fails.
struct BrokenRelease;

#[async_trait]
impl EnvironmentRuntimeDriver for BrokenRelease {
    fn key(&self) -> &str {
        "broken"
    }
    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: paperclip_env::core::AcquireInput<'_>,
    ) -> paperclip_env::Result<EnvironmentLease> {
        ctx.store
            .insert(paperclip_env::core::store::NewLease {
                environment_id: input.environment.id.clone(),
                heartbeat_run_id: input.heartbeat_run_id,
                metadata: Some(json!({"driver": "broken"}).as_object().unwrap().clone()),
                ..Default::default()
            })
            .await
    }
    async fn release_run_lease(
        &self,
        _ctx: &DriverContext,
        _e: &Environment,
        _l: &EnvironmentLease,
        _s: LeaseStatus,
    ) -> paperclip_env::Result<Option<EnvironmentLease>> {
        Err(Error::provider("broken", "release exploded"))
    }
}

#[tokio::test]
async fn b3_10_b3_12_release_errors_are_aggregated_and_orphans_skipped() {
    let runtime = EnvironmentRuntime::builder()
        .driver(Arc::new(BrokenRelease))
        .build();
    let broken_env = Environment::new("env-b", "B", "broken", json!({}));
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(broken_env, "run-1"))
        .await
        .unwrap();
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(local_env(), "run-1"))
        .await
        .unwrap();
    let orphan = Environment::new("env-gone", "Gone", "local", json!({}));
    let orphan_lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(orphan, "run-1"))
        .await
        .unwrap()
        .lease;
    runtime
        .environment_store()
        .remove("env-gone")
        .await
        .unwrap();

    let report = runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await;
    assert_eq!(
        report.released.len(),
        1,
        "the healthy lease is released despite the broken one"
    );
    assert_eq!(report.failures.len(), 1);
    assert!(
        report.failures[0]
            .1
            .to_string()
            .contains("release exploded")
    );
    assert_eq!(report.skipped, vec![orphan_lease.id.clone()]);
    let still = runtime
        .lease_store()
        .get(&orphan_lease.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.status, LeaseStatus::Active);
    let err = report.into_result().unwrap_err();
    assert!(matches!(err, Error::ReleaseFailed { .. }));
}

// ---- B4 deadlines ----

#[tokio::test(start_paused = true)]
async fn b4_deadlines_follow_request_and_config_budgets() {
    let s = setup();
    let env = fake_env(json!({"timeoutMs": 1234}));
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    s.fake
        .faults()
        .delay(Operation::Execute, Duration::from_secs(10_000));

    let err = s
        .runtime
        .execute(&env, &lease, &ExecuteRequest::new("true").timeout_ms(1000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(31_000)),
        "{err:?}"
    );
    let err = s
        .runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(31_234)),
        "{err:?}"
    );
    let err = s
        .runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("true").timeout_ms(3_600_000),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(3_630_000)),
        "not clamped"
    );
    assert!(
        !err.is_retryable(),
        "the command may still run: not retried blindly"
    );

    s.fake
        .faults()
        .delay(Operation::Acquire, Duration::from_secs(10_000));
    let env = fake_env(json!({"timeoutMs": 1234, "bridgeRequestTimeoutMs": 40000}));
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-2"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(70_000)),
        "{err:?}"
    );
    let err = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-3"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_secs(30)),
        "{err:?}"
    );
}

/// The fake provider, declaring its own lease-operation deadline the way
/// cold-starting providers (Modal, Kubernetes) do.
struct SlowStarter {
    inner: FakeProvider,
    own: Duration,
}

#[async_trait]
impl SandboxProvider for SlowStarter {
    fn key(&self) -> &str {
        self.inner.key()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn default_lease_deadline(&self) -> Option<Duration> {
        Some(self.own)
    }
    async fn acquire(
        &self,
        ctx: &CallContext,
        request: &AcquireRequest,
    ) -> paperclip_env::Result<ProviderLease> {
        self.inner.acquire(ctx, request).await
    }
    async fn release(
        &self,
        ctx: &CallContext,
        lease: &LeaseHandle,
        status: LeaseStatus,
    ) -> paperclip_env::Result<()> {
        self.inner.release(ctx, lease, status).await
    }
}

#[tokio::test(start_paused = true)]
async fn b4_provider_declared_lease_deadline_applies_only_without_a_config_budget() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let runtime_with = |own| {
        EnvironmentRuntime::builder()
            .provider(Arc::new(SlowStarter {
                inner: fake.clone(),
                own,
            }))
            .build()
    };
    fake.faults()
        .delay(Operation::Acquire, Duration::from_secs(45));

    // A 45 s cold start fits the provider's declared 90 s.
    let runtime = runtime_with(Duration::from_secs(90));
    let acquired = runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-1"))
        .await
        .expect("the provider's own deadline is used");
    assert_eq!(acquired.lease.status, LeaseStatus::Active);

    // A config budget always wins over the provider's declaration.
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(
            fake_env(json!({"timeoutMs": 1234})),
            "run-2",
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(31_234)),
        "{err:?}"
    );

    // A declaration shorter than the host default never shortens it.
    let runtime = runtime_with(Duration::from_secs(5));
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-3"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_secs(30)),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn b4_a_caller_that_gives_up_mid_acquire_strands_nothing() {
    let s = setup();
    s.fake
        .faults()
        .delay(Operation::Acquire, Duration::from_secs(5));
    let env = fake_env(json!({"timeoutMs": 60_000}));
    // The caller stops waiting after one second and drops the acquire.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        s.runtime
            .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-impatient")),
    )
    .await;
    assert!(gave_up.is_err(), "the acquire should still be in flight");

    // The acquisition finishes on its own; nobody is waiting for the
    // sandbox any more, so it is torn down at once and the row says why.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let leases = all_leases(&s.runtime, "env-1").await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].status, LeaseStatus::Expired);
    assert_eq!(
        leases[0].failure_reason.as_deref(),
        Some("acquire_abandoned")
    );
    assert_eq!(leases[0].cleanup_status, Some(CleanupStatus::Success));
    assert_eq!(s.fake.live_leases(), 0, "nothing leaked");

    // The run's release has nothing left to do.
    let report = s
        .runtime
        .release_run_leases("run-impatient", LeaseStatus::Released)
        .await;
    assert!(report.released.is_empty() && report.failures.is_empty());
}

// ---- B5 config and probe ----

#[tokio::test]
async fn b5_config_normalization_through_the_runtime() {
    let s = setup();
    let fake = s
        .runtime
        .normalize_config(
            "sandbox",
            "Probe",
            &json!({"image": "  alpine "}),
            ConfigPurpose::Probe,
        )
        .await
        .unwrap();
    assert_eq!(
        fake,
        json!({"provider": "fake", "image": "alpine", "reuseLease": false})
    );
    let err = s
        .runtime
        .normalize_config("sandbox", "Probe", &json!({}), ConfigPurpose::Persistence)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Built-in fake sandbox environments are reserved for internal probes and cannot be saved."
    );
    let provider = s
        .runtime
        .normalize_config(
            "sandbox",
            "Fake",
            &json!({"provider": "fake-plugin", "timeoutMs": "450000", "extra": 1}),
            ConfigPurpose::Persistence,
        )
        .await
        .unwrap();
    assert_eq!(
        provider,
        json!({"provider": "fake-plugin", "timeoutMs": 450000, "reuseLease": false, "extra": 1, "image": "fake:latest"})
    );
    let err = s
        .runtime
        .normalize_config(
            "sandbox",
            "X",
            &json!({"provider": "missing"}),
            ConfigPurpose::Persistence,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Sandbox provider \"missing\" is not installed or its plugin worker is not running."
    );
    let err = s
        .runtime
        .normalize_config("ssh", "X", &json!({"host": "h"}), ConfigPurpose::Probe)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DriverNotRegistered { .. }));
}

#[tokio::test]
async fn b5_6_probe_results_per_driver() {
    let s = setup();
    let local = s.runtime.probe(&local_env()).await.unwrap();
    assert!(local.ok);
    assert_eq!(
        local.summary,
        "Local environment is available on this Paperclip host."
    );
    assert!(local.details.unwrap()["hostname"].is_string());
    let builtin = s
        .runtime
        .probe(&Environment::new(
            "e",
            "F",
            "sandbox",
            json!({"image": "alpine"}),
        ))
        .await
        .unwrap();
    assert_eq!(
        json!(builtin),
        json!({"ok": true, "driver": "sandbox", "summary": "Fake sandbox provider is ready for image alpine.",
               "details": {"provider": "fake", "image": "alpine", "reuseLease": false}})
    );
    let provider = s.runtime.probe(&fake_env(json!({}))).await.unwrap();
    assert!(provider.ok);
    assert_eq!(
        provider.summary,
        "Fake sandbox provider is ready for image fake:test."
    );
    let details = provider.details.unwrap();
    assert_eq!(details["provider"], "fake-plugin");
    assert_eq!(details["diagnostics"], json!([]));
    let missing = s
        .runtime
        .probe(&Environment::new(
            "e",
            "M",
            "sandbox",
            json!({"provider": "e2b"}),
        ))
        .await
        .unwrap();
    assert!(!missing.ok);
    assert_eq!(
        missing.summary,
        "Sandbox provider \"e2b\" is not installed or its plugin worker is not running."
    );
    assert_eq!(s.fake.live_leases(), 0, "probes leave nothing behind");
}

// ---- streaming execute ----

#[tokio::test]
async fn streaming_execute_delivers_chunks_in_order_before_exit_and_loses_nothing() {
    let s = setup();
    let env = fake_env(json!({}));
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    let seen: Arc<Mutex<Vec<(OutputStream, String)>>> = Arc::default();
    let first_chunk_before_exit = Arc::new(AtomicBool::new(false));
    let chunks = Arc::new(AtomicUsize::new(0));
    let (seen2, chunks2) = (seen.clone(), chunks.clone());
    let sink = Arc::new(move |stream: OutputStream, data: &[u8]| {
        chunks2.fetch_add(1, Ordering::SeqCst);
        seen2
            .lock()
            .unwrap()
            .push((stream, String::from_utf8_lossy(data).into_owned()));
    });
    let watcher = {
        let (chunks, flag) = (chunks.clone(), first_chunk_before_exit.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            flag.store(chunks.load(Ordering::SeqCst) > 0, Ordering::SeqCst);
        })
    };
    let request = ExecuteRequest::shell("printf first; sleep 0.8; printf err >&2; printf last");
    let result = s
        .runtime
        .execute_streaming(&env, &lease, &request, sink)
        .await
        .unwrap();
    watcher.await.unwrap();
    assert!(
        first_chunk_before_exit.load(Ordering::SeqCst),
        "output arrived only at exit"
    );
    assert_eq!(result.stdout, "firstlast");
    assert_eq!(result.stderr, "err");
    let streamed: String = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(streamed, "firstlast", "the final chunk is never lost");
}

#[tokio::test]
async fn nothing_leaks_after_a_full_lifecycle() {
    let s = setup();
    let env = fake_env(json!({}));
    for run in 0..5 {
        let run = format!("run-{run}");
        let lease = s
            .runtime
            .acquire_run_lease(AcquireRunLease::for_run(env.clone(), run.clone()))
            .await
            .unwrap()
            .lease;
        let realized = s
            .runtime
            .realize_workspace(&env, &lease, &WorkspaceSpec::default())
            .await
            .unwrap();
        let r = s
            .runtime
            .execute(
                &env,
                &lease,
                &ExecuteRequest::new("pwd").cwd(realized.cwd.clone()),
            )
            .await
            .unwrap();
        assert_eq!(r.stdout.trim(), realized.cwd);
        s.runtime
            .release_run_leases(&run, LeaseStatus::Released)
            .await
            .into_result()
            .unwrap();
    }
    assert_eq!(s.fake.live_leases(), 0);
    let root_entries = std::fs::read_dir(s._root.path()).unwrap().count();
    assert_eq!(
        root_entries, 0,
        "sandbox directories are removed on release"
    );
}

#[tokio::test]
async fn sandbox_destroy_records_expired_or_pending_cleanup() {
    let s = setup();
    let env = fake_env(json!({"reuseLease": true}));
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    let destroyed = s
        .runtime
        .destroy_run_lease(&env, &lease)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!(destroyed.status, LeaseStatus::Expired);
    assert_eq!(destroyed.failure_reason.as_deref(), Some("lease_destroyed"));
    assert_eq!(s.fake.live_leases(), 0, "destroy ignores reuseLease");

    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    s.fake.faults().fail_next(Operation::Destroy, || {
        Error::provider("fake-plugin", "nope")
    });
    let pending = s
        .runtime
        .destroy_run_lease(&env, &lease)
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert_eq!(pending.status, LeaseStatus::PendingCleanup);
    assert_eq!(pending.cleanup_status, Some(CleanupStatus::Failed));
}

#[tokio::test]
async fn a_failed_store_insert_tears_the_provider_resource_down() {
    struct FailingStore(InMemoryLeaseStore);
    #[async_trait]
    impl LeaseStore for FailingStore {
        async fn insert(
            &self,
            _l: paperclip_env::core::store::NewLease,
        ) -> paperclip_env::Result<EnvironmentLease> {
            Err(Error::store("disk full"))
        }
        async fn insert_acquiring(
            &self,
            l: paperclip_env::core::store::NewLease,
        ) -> paperclip_env::Result<EnvironmentLease> {
            self.0.insert_acquiring(l).await
        }
        async fn complete_acquisition(
            &self,
            _id: &str,
            _a: paperclip_env::core::store::AcquiredLease,
        ) -> paperclip_env::Result<Option<EnvironmentLease>> {
            Err(Error::store("disk full"))
        }
        async fn release(
            &self,
            id: &str,
            s: LeaseStatus,
            u: paperclip_env::core::store::ReleaseUpdate,
        ) -> paperclip_env::Result<Option<EnvironmentLease>> {
            self.0.release(id, s, u).await
        }
        async fn update_metadata(
            &self,
            id: &str,
            m: paperclip_env::core::JsonObject,
        ) -> paperclip_env::Result<Option<EnvironmentLease>> {
            self.0.update_metadata(id, m).await
        }
        async fn touch(&self, id: &str) -> paperclip_env::Result<Option<EnvironmentLease>> {
            self.0.touch(id).await
        }
        async fn get(&self, id: &str) -> paperclip_env::Result<Option<EnvironmentLease>> {
            self.0.get(id).await
        }
        async fn list_by_environment(
            &self,
            e: &str,
            s: Option<LeaseStatus>,
        ) -> paperclip_env::Result<Vec<EnvironmentLease>> {
            self.0.list_by_environment(e, s).await
        }
        async fn list_by_run(
            &self,
            r: &str,
            s: Option<LeaseStatus>,
        ) -> paperclip_env::Result<Vec<EnvironmentLease>> {
            self.0.list_by_run(r, s).await
        }
        async fn list_failed_cleanups(&self) -> paperclip_env::Result<Vec<EnvironmentLease>> {
            self.0.list_failed_cleanups().await
        }
    }
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let runtime = EnvironmentRuntime::builder()
        .lease_store(Arc::new(FailingStore(InMemoryLeaseStore::new())))
        .provider(Arc::new(fake.clone()))
        .build();
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Store { .. }));
    assert_eq!(
        fake.live_leases(),
        0,
        "the sandbox created before the failed insert was destroyed"
    );

    // When that teardown fails too, the error says so and names the
    // resource: it is not only logged.
    for operation in [Operation::Destroy, Operation::Release] {
        fake.faults().fail_next(operation, || {
            Error::provider("fake-plugin", "teardown refused")
        });
    }
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-2"))
        .await
        .unwrap_err();
    let shown = err.to_string();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert!(
        shown.contains("disk full")
            && shown.contains("also failed")
            && shown.contains("teardown refused"),
        "{shown}"
    );
    assert_eq!(fake.live_leases(), 1, "the stranded sandbox is real");
    fake.faults().clear();
}

#[test]
fn sandbox_driver_is_usable_on_its_own() {
    let driver = SandboxDriver::new().with_provider(Arc::new(FakeProvider::new()));
    assert_eq!(driver.provider_keys(), vec!["fake-plugin".to_owned()]);
}

#[tokio::test]
async fn the_configured_maximum_bounds_leases_through_the_reaper_not_a_stored_expiry() {
    let s = setup_with(RuntimeOptions {
        max_lease_lifetime: Some(Duration::from_millis(50)),
        ..Default::default()
    });
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(fake_env(json!({})), "run-1"))
        .await
        .unwrap()
        .lease;
    assert_eq!(
        lease.expires_at, None,
        "only a provider-confirmed expiry is stored"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    let report = s.runtime.reap().await;
    assert_eq!(report.expired, vec![lease.id.clone()], "{report:?}");
    assert_eq!(s.fake.live_leases(), 0);
}
