//! The plugin path: Paperclip's plugin worker protocol against the reference
//! worker (`paperclip-env-plugin-worker`, the fake behind a real child
//! process), through both manifest kinds, plus crashing, hanging and
//! garbage-writing workers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::plugin::{
    CallError, PluginDriver, PluginManifest, PluginSandboxProvider, PluginWorker,
    PluginWorkerConfig,
};
use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRunLease, Capabilities, CleanupStatus, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, LeaseStatus, Operation, OutputStream, RuntimeOptions, Unsupported,
    WorkspaceSpec,
};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::logs::LogCapture;
use paperclip_env_testkit::plugin_worker::{
    self, ENV_CONTROL_DIR, ENV_CRASH_ON, ENV_GARBAGE_ON, ENV_HANG_ON, ENV_LEAK_SECRETS,
    ENV_NOT_IMPLEMENTED, ENV_TEMP_ROOT, ENV_WEDGE_ON, ENVIRONMENT_DRIVER_KEY, PLUGIN_KEY,
    SANDBOX_DRIVER_KEY,
};
use serde_json::json;

const WORKER: &str = env!("CARGO_BIN_EXE_paperclip-env-plugin-worker");

/// A temp dir for the fake's sandboxes and the control files, kept alive by the test.
struct Dirs {
    root: tempfile::TempDir,
    control: tempfile::TempDir,
}

fn dirs() -> Dirs {
    Dirs {
        root: tempfile::tempdir().unwrap(),
        control: tempfile::tempdir().unwrap(),
    }
}

fn worker_config(dirs: &Dirs, env: &[(&str, &str)]) -> PluginWorkerConfig {
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let mut config = PluginWorkerConfig::new(WORKER, manifest)
        .env(ENV_TEMP_ROOT, dirs.root.path().to_string_lossy())
        .env(ENV_CONTROL_DIR, dirs.control.path().to_string_lossy())
        .ready_timeout(Duration::from_secs(20));
    for (k, v) in env {
        config = config.env(*k, *v);
    }
    config
}

fn live(control: &Path) -> usize {
    plugin_worker::read_stats(control).0
}

/// The fake's capabilities, minus streaming: plugin execute answers at exit.
fn fake_capabilities() -> Capabilities {
    Capabilities {
        execute: true,
        realize_workspace: true,
        resume: true,
        destroy: true,
        probe: true,
        reusable_leases: true,
        stdin: true,
        multi_command_exec: true,
        signals: true,
        ..Capabilities::default()
    }
}

fn short_deadlines() -> RuntimeOptions {
    RuntimeOptions {
        default_call_deadline: Duration::from_millis(1500),
        deadline_grace: Duration::from_millis(200),
        provider_ready_timeout: Duration::from_secs(20),
        ..RuntimeOptions::default()
    }
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn wait_gone(pid: u32) -> bool {
    for _ in 0..100 {
        if !pid_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn sandbox_runtime(worker: &PluginWorker, options: RuntimeOptions) -> EnvironmentRuntime {
    let provider = PluginSandboxProvider::new(worker.clone(), SANDBOX_DRIVER_KEY)
        .unwrap()
        .with_options(options.clone());
    EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .options(options)
        .build()
}

fn sandbox_env() -> Environment {
    Environment::new(
        "env-plugin-sandbox",
        "Plugin sandbox",
        "sandbox",
        json!({"provider": SANDBOX_DRIVER_KEY, "image": "fake:test", "timeoutMs": 60000}),
    )
}

fn plugin_runtime(worker: &PluginWorker, options: RuntimeOptions) -> EnvironmentRuntime {
    EnvironmentRuntime::builder()
        .driver(Arc::new(PluginDriver::new().with_plugin(worker.clone())))
        .options(options)
        .build()
}

fn plugin_env() -> Environment {
    Environment::new(
        "env-plugin-driver",
        "Plugin driver",
        "plugin",
        json!({"pluginKey": PLUGIN_KEY, "driverKey": ENVIRONMENT_DRIVER_KEY, "driverConfig": {"image": "fake:test"}}),
    )
    .with_company("company-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_provider_kind_passes_conformance() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    let provider = PluginSandboxProvider::new(worker.clone(), SANDBOX_DRIVER_KEY)
        .unwrap()
        .with_capabilities(fake_capabilities());
    let control = dirs.control.path().to_path_buf();
    let flag = |method: &'static str| {
        let control = control.clone();
        move || {
            std::fs::write(control.join(format!("fail-next-{method}")), b"").unwrap();
        }
    };
    let (c1, c2, c3) = (control.clone(), control.clone(), control.clone());
    let fixture = Fixture::new(Arc::new(provider))
        .config(
            json!({"image": "fake:test", "timeoutMs": 300000, "apiKey": "sk-plugin-conformance"}),
        )
        .secret_value("sk-plugin-conformance")
        .live_resources(move || live(&c1))
        .create_calls(move || plugin_worker::read_stats(&c2).1)
        .execute_calls(move || plugin_worker::read_stats(&c3).2)
        .fail_next_acquire(flag("environmentAcquireLease"))
        .fail_next_execute(flag("environmentExecute"))
        .fail_next_release(flag("environmentReleaseLease"));
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert!(
        report.passed().len() >= 30,
        "too few lines ran: {:?}",
        report.passed()
    );
    assert_eq!(live(&control), 0, "the suite leaked sandboxes");
    assert_eq!(
        worker.starts(),
        1,
        "the worker restarted during a clean run"
    );
    let pid = worker.pid().unwrap();
    worker.shutdown().await;
    assert!(wait_gone(pid).await, "worker still running after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_driver_kind_runs_the_whole_lifecycle() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    let runtime = plugin_runtime(&worker, RuntimeOptions::default());
    let env = plugin_env();

    let normalized = runtime
        .normalize_config(
            "plugin",
            "Plugin driver",
            &env.config,
            paperclip_env_core::ConfigPurpose::Persistence,
        )
        .await
        .unwrap();
    assert_eq!(normalized["driverConfig"]["image"], "fake:test");
    assert_eq!(normalized["driverConfig"]["reuseLease"], false);

    let probe = runtime.probe(&env).await.unwrap();
    assert!(probe.ok, "{probe:?}");
    assert_eq!(probe.driver, "plugin");
    assert_eq!(
        probe.details.as_ref().unwrap()["driverKey"],
        ENVIRONMENT_DRIVER_KEY
    );

    let record = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1").issue("issue-1"))
        .await
        .unwrap();
    let lease = record.lease;
    assert_eq!(lease.status, LeaseStatus::Active);
    assert_eq!(
        lease.provider.as_deref(),
        Some(format!("plugin:{PLUGIN_KEY}:{ENVIRONMENT_DRIVER_KEY}").as_str())
    );
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["driver"], "plugin");
    assert_eq!(md["pluginKey"], PLUGIN_KEY);
    assert_eq!(md["driverKey"], ENVIRONMENT_DRIVER_KEY);
    assert_eq!(md["providerMetadata"]["provider"], "fake-plugin");
    assert_eq!(live(dirs.control.path()), 1);

    let realized = runtime
        .realize_workspace(&env, &lease, &WorkspaceSpec::default())
        .await
        .unwrap();
    assert!(
        realized
            .cwd
            .starts_with(&*dirs.root.path().to_string_lossy()),
        "{}",
        realized.cwd
    );

    let result = runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::shell("printf %s \"$GREETING\"; echo oops >&2; exit 3")
                .env("GREETING", "hi")
                .stdin("ignored"),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            result.exit_code,
            result.stdout.as_str(),
            result.stderr.as_str()
        ),
        (Some(3), "hi", "oops\n")
    );

    let resumed = runtime.resume_run_lease(&env, &lease).await.unwrap();
    assert_eq!(resumed.provider_lease_id, lease.provider_lease_id);
    // Resume does not write the store.
    let stored = runtime.lease_store().get(&lease.id).await.unwrap().unwrap();
    assert_eq!(stored.status, LeaseStatus::Active);

    let destroyed = runtime
        .destroy_run_lease(&env, &lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(destroyed.lease.status, LeaseStatus::Failed);
    assert_eq!(
        destroyed.lease.failure_reason.as_deref(),
        Some("lease_destroyed")
    );
    assert_eq!(live(dirs.control.path()), 0);

    // A second lease released by run; the environment switched to local meanwhile,
    // so the plugin gets an empty driverConfig (spec 00 §5.5) and still releases.
    let second = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    assert_eq!(live(dirs.control.path()), 1);
    let switched = Environment::new(env.id.clone(), "Now local", "local", json!({}));
    let released = runtime
        .release_lease(&switched, &second, LeaseStatus::Released)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(released.lease.status, LeaseStatus::Released);
    assert_eq!(released.lease.cleanup_status, None);
    assert_eq!(live(dirs.control.path()), 0);
    assert_eq!(worker.starts(), 1);
    worker.shutdown().await;
}

#[tokio::test]
async fn sandbox_kind_runs_through_the_runtime_with_secrets_kept_out_of_logs_and_errors() {
    let (logs, _guard) = LogCapture::start();
    let dirs = dirs();
    const SECRET: &str = "sk-live-plugin-7f3a9c";
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_LEAK_SECRETS, "1")])
            .secret_env("WORKER_TOKEN", "tok-env-5d1e".into()),
    );
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(SECRET);
    let provider = PluginSandboxProvider::new(worker.clone(), SANDBOX_DRIVER_KEY).unwrap();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-secret",
        "Secret",
        "sandbox",
        json!({"provider": SANDBOX_DRIVER_KEY, "image": "fake:test", "apiKey": key_id}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-s"))
        .await
        .unwrap()
        .lease;
    let md = serde_json::to_string(&lease.metadata).unwrap();
    assert!(!md.contains(SECRET), "secret in lease metadata: {md}");
    let ok = runtime
        .execute(&env, &lease, &ExecuteRequest::new("echo").arg("ok"))
        .await
        .unwrap();
    assert_eq!(ok.stdout, "ok\n");

    // The worker fails and echoes the credential into its error, stderr and a log line.
    std::fs::write(
        dirs.control.path().join("fail-next-environmentExecute"),
        b"",
    )
    .unwrap();
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(SECRET), "secret in error: {shown}");
    assert!(
        shown.contains("[REDACTED]"),
        "the worker did not try to leak: {shown}"
    );

    runtime
        .release_run_leases("run-s", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
    // Let the stderr reader drain.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = logs.text();
    assert!(
        text.contains("[plugin stderr]") && text.contains("[REDACTED]"),
        "expected scrubbed worker output in logs:\n{text}"
    );
    assert!(!text.contains(SECRET), "secret in logs:\n{text}");
    assert!(!text.contains("tok-env-5d1e"), "worker env secret in logs");
    assert!(!format!("{worker:?} {:?}", worker.config()).contains("tok-env-5d1e"));
}

/// A crashed worker comes back on its own after the back-off, as upstream's
/// host restarts it on a timer, without waiting for the next call.
#[tokio::test]
async fn a_crashed_worker_is_restarted_on_a_timer() {
    let dirs = dirs();
    let mut config = worker_config(&dirs, &[(ENV_CRASH_ON, "environmentProbe")]);
    config.restart_backoff = Duration::from_millis(200);
    let worker = PluginWorker::new(config);
    worker.start().await.unwrap();
    let first = worker.pid().unwrap();
    let params = json!({"driverKey": SANDBOX_DRIVER_KEY, "environmentId": "e", "config": {}});
    let err = worker
        .call("environmentProbe", &params, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Unavailable(_)), "{err:?}");
    assert!(wait_gone(first).await);
    let mut restarted = false;
    for _ in 0..100 {
        if worker.is_running() && worker.pid() != Some(first) {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(restarted, "the worker was not restarted after its crash");
    assert_eq!(worker.starts(), 2);
    worker.shutdown().await;
}

/// After `MAX_CONSECUTIVE_CRASHES` crashes in the window the worker stays
/// down and calls fail at once with the reason; `start()` tries again.
#[tokio::test]
async fn a_crash_looping_worker_stays_down_until_started_again() {
    let dirs = dirs();
    let mut config = worker_config(&dirs, &[(ENV_CRASH_ON, "environmentProbe")]);
    config.restart_backoff = Duration::from_millis(1);
    let worker = PluginWorker::new(config);
    let params = json!({"driverKey": SANDBOX_DRIVER_KEY, "environmentId": "e", "config": {}});
    for _ in 0..paperclip_env_core::plugin::MAX_CONSECUTIVE_CRASHES {
        let err = worker
            .call("environmentProbe", &params, None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::Unavailable(_)), "{err:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!worker.is_running(), "a crash-looping worker was restarted");
    let starts = worker.starts();
    let err = worker
        .call(
            "environmentValidateConfig",
            &json!({"driverKey": SANDBOX_DRIVER_KEY, "config": {}}),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("crashed 10 times"), "{err}");
    assert_eq!(
        worker.starts(),
        starts,
        "a call restarted a crash-looping worker"
    );
    worker.start().await.unwrap();
    let validated = worker
        .call(
            "environmentValidateConfig",
            &json!({"driverKey": SANDBOX_DRIVER_KEY, "config": {}}),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(validated["ok"], true);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_crashes_mid_call_gives_a_retryable_error_and_is_restarted() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(
        &dirs,
        &[(ENV_CRASH_ON, "environmentExecute")],
    ));
    let runtime = sandbox_runtime(&worker, RuntimeOptions::default());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-c"))
        .await
        .unwrap()
        .lease;
    let first_pid = worker.pid().unwrap();
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("Worker process exited (code=3, signal=null)"),
        "{text}"
    );
    assert!(
        text.contains("crashing on environmentExecute"),
        "stderr excerpt missing: {text}"
    );
    assert!(wait_gone(first_pid).await);

    // The next call restarts the worker; the lease is released, nothing stuck.
    let released = runtime
        .release_run_leases("run-c", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released[0].lease.status, LeaseStatus::Released);
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(worker.starts(), 2);
    assert_ne!(worker.pid(), Some(first_pid));
    worker.shutdown().await;
}

/// A hung call is rejected alone, as upstream's host does: the worker still
/// answers `health`, so it keeps running, and another lease's call in flight
/// on the same worker completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_is_rejected_alone_while_the_worker_answers_health() {
    let dirs = dirs();
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_HANG_ON, "environmentProbe")])
            .health_timeout(Duration::from_millis(500)),
    );
    let runtime = sandbox_runtime(&worker, short_deadlines());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-h"))
        .await
        .unwrap()
        .lease;
    let pid = worker.pid().unwrap();
    let other_call = ExecuteRequest::shell("sleep 2; echo still-here").timeout_ms(10_000);
    let probe_params =
        json!({"driverKey": SANDBOX_DRIVER_KEY, "environmentId": env.id, "config": env.config});
    let (probe, executed) = tokio::join!(
        worker.call(
            "environmentProbe",
            &probe_params,
            None,
            Some(Duration::from_millis(300))
        ),
        runtime.execute(&env, &lease, &other_call)
    );
    assert!(
        matches!(probe, Err(CallError::Timeout { ref method, .. }) if method == "environmentProbe"),
        "{probe:?}"
    );
    let executed = executed.expect("the other lease's call survived the hung one");
    assert_eq!(executed.stdout.trim(), "still-here");
    // The health check after the timeout has long been answered.
    assert!(pid_alive(pid), "a worker that answers health was killed");
    assert_eq!(worker.pid(), Some(pid));
    assert_eq!(worker.starts(), 1);

    let released = runtime
        .release_run_leases("run-h", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(live(dirs.control.path()), 0);
    worker.shutdown().await;
}

/// A worker that stops answering altogether (a busy loop) fails its
/// `health` check after the timed-out call and is killed; the next call
/// starts a fresh one.
#[tokio::test]
async fn a_worker_that_stops_answering_health_is_killed_and_restarted() {
    let dirs = dirs();
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_WEDGE_ON, "environmentExecute")])
            .health_timeout(Duration::from_millis(300)),
    );
    let runtime = sandbox_runtime(&worker, short_deadlines());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-w"))
        .await
        .unwrap()
        .lease;
    let wedged_pid = worker.pid().unwrap();
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true").timeout_ms(100))
        .await
        .unwrap_err();
    // Deadline = command timeout 100 ms + grace 200 ms (spec 00 §9).
    match &err {
        Error::Timeout { operation, after } => {
            assert_eq!(operation, "environmentExecute");
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(!err.is_retryable(), "a timed-out execute is not idempotent");
    assert!(
        wait_gone(wedged_pid).await,
        "the wedged worker was not killed"
    );

    let released = runtime
        .release_run_leases("run-w", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(worker.starts(), 2);
    assert_eq!(live(dirs.control.path()), 0);
    worker.shutdown().await;
}

#[tokio::test]
async fn under_strict_stdout_a_garbage_writing_worker_gives_a_protocol_error_and_no_stuck_lease() {
    let dirs = dirs();
    // Strict stdout: the garbage fails the call at once instead of being skipped.
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_GARBAGE_ON, "environmentExecute")]).strict_stdout(true),
    );
    let runtime = sandbox_runtime(&worker, RuntimeOptions::default());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-g"))
        .await
        .unwrap()
        .lease;
    // A protocol error, not a timeout: the call did not wait for its deadline.
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    match &err {
        Error::Provider {
            message,
            retryable: true,
            ..
        } => {
            assert!(message.contains("not JSON-RPC 2.0"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let released = runtime
        .release_run_leases("run-g", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(released[0].lease.status, LeaseStatus::Released);
    assert_eq!(worker.starts(), 2);
    worker.shutdown().await;
}

#[tokio::test]
async fn a_plugin_driver_release_that_hangs_records_failed_cleanup_and_releases_the_row() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(
        &dirs,
        &[(ENV_HANG_ON, "environmentReleaseLease")],
    ));
    let runtime = plugin_runtime(&worker, short_deadlines());
    let env = plugin_env();
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-r"))
        .await
        .unwrap();
    let released = runtime
        .release_run_leases("run-r", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let lease = &released[0].lease;
    assert_eq!(lease.status, LeaseStatus::PendingCleanup);
    assert_eq!(
        lease.failure_reason.as_deref(),
        Some("release_cleanup_failed")
    );
    assert_eq!(lease.cleanup_status, Some(CleanupStatus::Failed));
    assert!(
        lease
            .cleanup_error()
            .unwrap_or_default()
            .contains("timed out after 1500ms"),
        "{lease:?}"
    );
    assert_eq!(
        runtime
            .lease_store()
            .list_failed_cleanups()
            .await
            .unwrap()
            .len(),
        1
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn method_not_implemented_maps_to_not_supported() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(
        &dirs,
        &[(
            ENV_NOT_IMPLEMENTED,
            "environmentExecute,environmentRealizeWorkspace",
        )],
    ));
    let runtime = plugin_runtime(&worker, RuntimeOptions::default());
    let env = plugin_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-n"))
        .await
        .unwrap()
        .lease;
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotSupported { operation: Operation::Execute, by: Unsupported::Driver(d) } if d == "plugin"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "Environment driver \"plugin\" does not support command execution."
    );

    // The sandbox-provider adapter derives its capabilities from `supportedMethods`.
    let provider = PluginSandboxProvider::new(worker.clone(), SANDBOX_DRIVER_KEY).unwrap();
    let caps = paperclip_env_core::SandboxProvider::capabilities(&provider);
    assert!(!caps.execute && !caps.realize_workspace && caps.resume && caps.destroy);
    runtime
        .release_run_leases("run-n", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
}

/// A worker that does not advertise `environmentReleaseLease` is not sent
/// one, as upstream: the release records a failed cleanup (the reaper's
/// work), for the sandbox-provider and the driver kind alike.
#[tokio::test]
async fn a_release_the_worker_does_not_advertise_is_not_sent_and_records_failed_cleanup() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(
        &dirs,
        &[(ENV_NOT_IMPLEMENTED, "environmentReleaseLease")],
    ));
    for (runtime, env, run) in [
        (
            plugin_runtime(&worker, short_deadlines()),
            plugin_env(),
            "run-nr-driver",
        ),
        (
            sandbox_runtime(&worker, short_deadlines()),
            sandbox_env(),
            "run-nr-sandbox",
        ),
    ] {
        runtime
            .acquire_run_lease(AcquireRunLease::for_run(env.clone(), run))
            .await
            .unwrap();
        let outcome = runtime.release_run_leases(run, LeaseStatus::Released).await;
        let rows = runtime.lease_store().list_by_run(run, None).await.unwrap();
        assert_eq!(rows.len(), 1, "{outcome:?}");
        assert_eq!(
            rows[0].cleanup_status,
            Some(CleanupStatus::Failed),
            "{:?}",
            rows[0]
        );
        assert_ne!(rows[0].status, LeaseStatus::Active, "{:?}", rows[0]);
    }
    // Nothing was released: both sandboxes are still there for the reaper.
    assert_eq!(live(dirs.control.path()), 2);
    worker.shutdown().await;
}

/// A worker whose lease records `remoteCwd: /srv/box-1` and whose execute
/// answers with the `cwd` it was sent (or `none`).
const CWD_ECHO_WORKER: &str = r#"
id_of() { printf '%s' "$1" | sed -n 's/^{"jsonrpc":"2.0","id":\([0-9]*\),.*/\1/p'; }
read -r line
printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"supportedMethods":["environmentAcquireLease","environmentReleaseLease","environmentExecute"]}}\n' "$(id_of "$line")"
while read -r line; do
  case "$line" in
    *'"method":"environmentAcquireLease"'*) r='{"providerLeaseId":"box-1","metadata":{"remoteCwd":"/srv/box-1"}}';;
    *'"method":"environmentExecute"'*)
      cwd=$(printf '%s' "$line" | sed -n 's/.*"cwd":"\([^"]*\)".*/\1/p')
      r=$(printf '{"exitCode":0,"timedOut":false,"stdout":"%s","stderr":""}' "${cwd:-none}");;
    *) r='null';;
  esac
  printf '{"jsonrpc":"2.0","id":%s,"result":%s}\n' "$(id_of "$line")" "$r"
done
"#;

/// `cwd` is always sent on execute: the lease's `remoteCwd` when the request
/// names none, the request's own otherwise, as upstream's host does.
#[tokio::test]
async fn execute_sends_the_leases_remote_cwd_when_the_request_has_none() {
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let mut config = PluginWorkerConfig::new("sh", manifest)
        .arg("-c")
        .arg(CWD_ECHO_WORKER)
        .ready_timeout(Duration::from_secs(5));
    config.shutdown_drain = Duration::from_millis(300);
    config.shutdown_grace = Duration::from_millis(300);
    let worker = PluginWorker::new(config);
    let runtime = sandbox_runtime(&worker, short_deadlines());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-cwd"))
        .await
        .unwrap()
        .lease;
    assert_eq!(lease.remote_cwd(), Some("/srv/box-1"));
    let defaulted = runtime
        .execute(&env, &lease, &ExecuteRequest::new("pwd"))
        .await
        .unwrap();
    assert_eq!(defaulted.stdout, "/srv/box-1");
    let explicit = runtime
        .execute(&env, &lease, &ExecuteRequest::new("pwd").cwd("/srv/other"))
        .await
        .unwrap();
    assert_eq!(explicit.stdout, "/srv/other");
    runtime
        .release_run_leases("run-cwd", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
}

#[tokio::test]
async fn resolution_errors_use_the_contract_messages() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    let runtime = plugin_runtime(&worker, RuntimeOptions::default());
    let missing = Environment::new(
        "e",
        "E",
        "plugin",
        json!({"pluginKey": "nope", "driverKey": "x"}),
    );
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(missing, "r"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Plugin environment driver \"nope:x\" is not ready."
    );
    let undeclared = Environment::new(
        "e",
        "E",
        "plugin",
        json!({"pluginKey": PLUGIN_KEY, "driverKey": "other"}),
    );
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(undeclared, "r"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Plugin \"{PLUGIN_KEY}\" does not declare environment driver \"other\".")
    );
    assert!(matches!(err, Error::InvalidConfig { ref field, .. } if field == "driverKey"));
    assert_eq!(
        runtime
            .lease_store()
            .list_by_run("r", None)
            .await
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn a_worker_that_cannot_start_is_reported_within_the_readiness_bound() {
    // A tiny shell worker that reads the handshake and never answers.
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let silent = PluginWorkerConfig::new("sh", manifest.clone())
        .arg("-c")
        .arg("read line; exec sleep 60")
        .ready_timeout(Duration::from_millis(300));
    let worker = PluginWorker::new(silent);
    let runtime = sandbox_runtime(
        &worker,
        RuntimeOptions {
            provider_ready_timeout: Duration::from_millis(500),
            ..RuntimeOptions::default()
        },
    );
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(sandbox_env(), "run-x"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Sandbox provider \"{SANDBOX_DRIVER_KEY}\" is installed via plugin \"{PLUGIN_KEY}\", but its worker is not running."
        )
    );
    // Within the back-off a start fails at once (no spawn), naming the last failure.
    let err = worker.start().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("timed out after 300ms") && text.contains("next attempt in"),
        "{text}"
    );
    assert!(!worker.is_running());
    // After the back-off the next start really tries again, and the wait doubles.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = worker.start().await.unwrap_err().to_string();
    assert!(!err.contains("next attempt in"), "still backing off: {err}");
    let text = worker.start().await.unwrap_err().to_string();
    assert!(
        text.contains("failed to start 2 time(s) in a row"),
        "{text}"
    );

    // A program that does not exist.
    let absent = PluginWorker::new(PluginWorkerConfig::new(
        "/nonexistent/paperclip-worker",
        manifest,
    ));
    let err = absent.start().await.unwrap_err();
    assert!(
        err.to_string().contains("Failed to start the worker"),
        "{err}"
    );
}

#[tokio::test]
async fn dropping_the_last_handle_kills_the_worker_process_group() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    worker.start().await.unwrap();
    let pid = worker.pid().unwrap();
    assert!(pid_alive(pid));
    drop(worker);
    assert!(wait_gone(pid).await, "worker outlived its handle");
}

/// A tiny shell worker: prints noise before its handshake answer, then per
/// call sends a `log` notification and two worker→host requests (one the
/// host serves, one it does not) before answering.
const SHELL_WORKER: &str = r#"
id_of() { printf '%s' "$1" | sed -n 's/^{"jsonrpc":"2.0","id":\([0-9]*\),.*/\1/p'; }
read -r line
echo "npm notice: this line is not JSON-RPC"
printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"supportedMethods":["environmentProbe"]}}\n' "$(id_of "$line")"
while read -r line; do
  printf '{"jsonrpc":"2.0","method":"log","params":{"level":"warn","message":"probing from the shell worker"}}\n'
  printf '{"jsonrpc":"2.0","id":"w1","method":"config.get","params":{}}\n'
  read -r reply; echo "config reply: $reply" >&2
  printf '{"jsonrpc":"2.0","id":"w2","method":"secrets.resolve","params":{}}\n'
  read -r reply; echo "unknown reply: $reply" >&2
  printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"summary":"shell probe"}}\n' "$(id_of "$line")"
done
"#;

fn shell_worker(strict_stdout: bool) -> PluginWorker {
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let mut config = PluginWorkerConfig::new("sh", manifest)
        .arg("-c")
        .arg(SHELL_WORKER)
        .plugin_config(json!({"region": "eu-1"}).as_object().unwrap().clone())
        .ready_timeout(Duration::from_secs(5));
    config.strict_stdout = strict_stdout;
    config.shutdown_drain = Duration::from_millis(300);
    config.shutdown_grace = Duration::from_millis(300);
    PluginWorker::new(config)
}

#[tokio::test]
async fn worker_notifications_and_worker_to_host_requests_are_served() {
    let (logs, _guard) = LogCapture::start();
    let worker = shell_worker(false);
    let result = worker
        .call(
            "environmentProbe",
            &json!({"driverKey": SANDBOX_DRIVER_KEY}),
            Some("co"),
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"ok": true, "summary": "shell probe"}));
    assert_eq!(
        worker.supported_methods(),
        Some(vec!["environmentProbe".to_owned()])
    );
    worker.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = logs.text();
    assert!(text.contains("unparseable message from worker"), "{text}");
    assert!(
        text.contains("[plugin] probing from the shell worker"),
        "{text}"
    );
    assert!(
        text.contains(r#"config reply: {"jsonrpc":"2.0","id":"w1","result":{"region":"eu-1"}}"#),
        "{text}"
    );
    // A method upstream serves, refused with upstream's capability error
    // (the manifest lacks `secrets.read-ref`), not "method not found".
    assert!(
        text.contains("-32001")
            && text.contains(
                r#"missing required capability \"secrets.read-ref\" for method \"secrets.resolve\""#
            ),
        "{text}"
    );
}

/// A worker whose stray `console.log`s carry a secret and run long: one
/// before its handshake answer and one before every answer.
const NOISY_WORKER: &str = r#"
id_of() { printf '%s' "$1" | sed -n 's/^{"jsonrpc":"2.0","id":\([0-9]*\),.*/\1/p'; }
pad=$(printf 'x%.0s' $(seq 1 600))
read -r line
echo "setup: connecting with $NOISY_TOKEN $pad"
printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"supportedMethods":["environmentProbe"]}}\n' "$(id_of "$line")"
while read -r line; do
  echo "{\"handler\": \"probe\", \"token\": \"$NOISY_TOKEN\"}"
  printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"summary":"noisy probe"}}\n' "$(id_of "$line")"
done
"#;

fn noisy_worker(strict_stdout: bool) -> PluginWorker {
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let mut config = PluginWorkerConfig::new("sh", manifest)
        .arg("-c")
        .arg(NOISY_WORKER)
        .secret_env("NOISY_TOKEN", "noisy-secret-7f3a".to_owned().into())
        .ready_timeout(Duration::from_secs(5))
        .strict_stdout(strict_stdout);
    config.shutdown_drain = Duration::from_millis(300);
    config.shutdown_grace = Duration::from_millis(300);
    PluginWorker::new(config)
}

#[tokio::test]
async fn stdout_noise_is_logged_scrubbed_capped_and_skipped_by_default() {
    let (logs, _guard) = LogCapture::start();
    let worker = noisy_worker(false);
    worker.start().await.unwrap();
    for _ in 0..2 {
        let result = worker
            .call(
                "environmentProbe",
                &json!({}),
                None,
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        assert_eq!(result, json!({"ok": true, "summary": "noisy probe"}));
    }
    assert_eq!(worker.starts(), 1, "noise must not restart the worker");
    worker.shutdown().await;
    let text = logs.text();
    assert!(
        text.contains("unparseable message from worker, skipped: Invalid JSON: setup: connecting with [REDACTED] xxx"),
        "{text}"
    );
    // Valid JSON that is not JSON-RPC is skipped the same way.
    assert!(
        text.contains(r#"Invalid or missing jsonrpc version"#)
            && text.contains(r#"{"handler": "probe", "token": "[REDACTED]"}"#),
        "{text}"
    );
    assert!(!text.contains("noisy-secret-7f3a"), "{text}");
    // The 600-character line is cut to the excerpt bound.
    assert!(!text.contains(&"x".repeat(300)), "{text}");
}

#[tokio::test]
async fn strict_stdout_makes_noise_a_protocol_error() {
    let worker = shell_worker(true);
    let err = worker.start().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Worker initialize failed") && text.contains("not JSON-RPC 2.0"),
        "{text}"
    );
    assert!(!worker.is_running());
    let noisy = noisy_worker(true);
    let text = noisy.start().await.unwrap_err().to_string();
    assert!(
        text.contains("[REDACTED]") && !text.contains("noisy-secret-7f3a"),
        "{text}"
    );
}

/// Runs a command that prints a line, waits for a gate file the test creates
/// only after that line reached the sink, then prints more: the first chunk
/// provably arrives before the command exits.
async fn assert_live_streaming(runtime: &EnvironmentRuntime, env: &Environment, run: &str) {
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), run))
        .await
        .unwrap()
        .lease;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("gate");
    let script = format!(
        "echo first; echo warn-1 >&2; while [ ! -e '{}' ]; do sleep 0.02; done; echo second; echo warn-2 >&2",
        gate.display()
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sink = Arc::new(move |stream: OutputStream, data: &[u8]| {
        let _ = tx.send((stream, data.to_vec()));
    });
    let call = {
        let (runtime, env, lease) = (runtime.clone(), env.clone(), lease.clone());
        tokio::spawn(async move {
            runtime
                .execute_streaming(&env, &lease, &ExecuteRequest::shell(script), sink)
                .await
        })
    };
    let mut chunks = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no chunk arrived while the command waits for its gate")
        .unwrap();
    assert!(
        !call.is_finished(),
        "the call answered before the gate opened"
    );
    chunks.push(first);
    std::fs::write(&gate, b"").unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    while let Ok(chunk) = rx.try_recv() {
        chunks.push(chunk);
    }
    let text_of = |s: OutputStream| {
        String::from_utf8(
            chunks
                .iter()
                .filter(|(st, _)| *st == s)
                .flat_map(|(_, d)| d.clone())
                .collect(),
        )
        .unwrap()
    };
    assert_eq!(result.stdout, "first\nsecond\n");
    assert_eq!(result.stderr, "warn-1\nwarn-2\n");
    // Neither lost nor duplicated: the sink saw exactly the final output.
    assert_eq!(text_of(OutputStream::Stdout), result.stdout);
    assert_eq!(text_of(OutputStream::Stderr), result.stderr);
    runtime
        .release_run_leases(run, LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
}

/// A worker whose `environmentExecute` streams a forged chunk (another
/// invocation id), an untagged one, a malformed one and a real one, then
/// answers with the real chunk plus a tail it never streamed.
const STREAMING_SHELL_WORKER: &str = r#"
id_of() { printf '%s' "$1" | sed -n 's/^{"jsonrpc":"2.0","id":\([0-9]*\),.*/\1/p'; }
inv_of() { printf '%s' "$1" | sed -n 's/.*"paperclipInvocation":{"id":"\([^"]*\)".*/\1/p'; }
read -r line
printf '{"jsonrpc":"2.0","id":%s,"result":{"ok":true,"supportedMethods":["environmentExecute"]}}\n' "$(id_of "$line")"
while read -r line; do
  inv=$(inv_of "$line")
  printf '{"jsonrpc":"2.0","method":"execute.log","params":{"stream":"stdout","chunk":"forged\\n"},"paperclipInvocationId":"not-%s"}\n' "$inv"
  printf '{"jsonrpc":"2.0","method":"execute.log","params":{"stream":"stdout","chunk":"untagged\\n"}}\n'
  printf '{"jsonrpc":"2.0","method":"execute.log","params":{"stream":"stdin","chunk":"bad\\n"},"paperclipInvocationId":"%s"}\n' "$inv"
  printf '{"jsonrpc":"2.0","method":"execute.log","params":{"stream":"stdout","chunk":"real\\n"},"paperclipInvocationId":"%s"}\n' "$inv"
  printf '{"jsonrpc":"2.0","id":%s,"result":{"exitCode":0,"timedOut":false,"stdout":"real\\ntail\\n","stderr":""}}\n' "$(id_of "$line")"
done
"#;

#[tokio::test]
async fn execute_log_chunks_of_other_or_no_invocations_are_dropped_and_the_tail_is_added() {
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    let mut config = PluginWorkerConfig::new("sh", manifest)
        .arg("-c")
        .arg(STREAMING_SHELL_WORKER)
        .ready_timeout(Duration::from_secs(5));
    config.shutdown_drain = Duration::from_millis(300);
    config.shutdown_grace = Duration::from_millis(300);
    let worker = PluginWorker::new(config);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink_seen = seen.clone();
    let sink = Arc::new(move |_: OutputStream, data: &[u8]| {
        sink_seen.lock().unwrap().extend_from_slice(data);
    });
    let output = paperclip_env_core::OutputCollector::new(
        paperclip_env_core::OutputCapture::Full,
        Some(sink),
    );
    let (value, streamed) = worker
        .call_streaming(
            "environmentExecute",
            &json!({"command": "true"}),
            Some("co"),
            Some(Duration::from_secs(5)),
            &output,
        )
        .await
        .unwrap();
    assert_eq!(streamed.stdout, b"real\n");
    assert_eq!(seen.lock().unwrap().as_slice(), b"real\n");
    let stdout = value["stdout"].as_str().unwrap();
    streamed.deliver_final(&output, OutputStream::Stdout, stdout.as_bytes());
    assert_eq!(seen.lock().unwrap().as_slice(), b"real\ntail\n");
    let result = output.finish(paperclip_env_core::CommandExit::code(0));
    assert_eq!(result.stdout, "real\ntail\n");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_log_chunks_stream_live_and_reconcile_with_the_result() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    let sandbox = sandbox_runtime(&worker, RuntimeOptions::default());
    assert_live_streaming(&sandbox, &sandbox_env(), "run-stream-sandbox").await;
    let driver = plugin_runtime(&worker, RuntimeOptions::default());
    assert_live_streaming(&driver, &plugin_env(), "run-stream-driver").await;
    assert_eq!(worker.starts(), 1);
    assert_eq!(live(dirs.control.path()), 0);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_worker_and_get_their_own_answers() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    let runtime = sandbox_runtime(&worker, RuntimeOptions::default());
    let env = sandbox_env();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-p"))
        .await
        .unwrap()
        .lease;
    let calls = (0..8).map(|i| {
        let (runtime, env, lease) = (runtime.clone(), env.clone(), lease.clone());
        async move {
            // Later calls finish first, so answers arrive out of order.
            let script = format!("sleep 0.{}; echo {i}", 8 - i);
            runtime
                .execute(&env, &lease, &ExecuteRequest::shell(script))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap().stdout, format!("{i}\n"));
    }
    assert_eq!(worker.starts(), 1);
    runtime
        .release_run_leases("run-p", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(live(dirs.control.path()), 0);
    worker.shutdown().await;
}

/// A call its caller abandons is dropped alone; the worker, which still
/// answers `health`, serves the next call. After `shutdown` nothing restarts it.
#[tokio::test]
async fn an_abandoned_call_is_dropped_alone_and_shutdown_is_final() {
    let dirs = dirs();
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_HANG_ON, "environmentProbe")])
            .health_timeout(Duration::from_millis(300)),
    );
    worker.start().await.unwrap();
    let pid = worker.pid().unwrap();
    let params = json!({"driverKey": SANDBOX_DRIVER_KEY, "environmentId": "e", "config": {}});
    let call = worker.call("environmentProbe", &params, None, None);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );
    // Longer than the health timeout: a failed check would have killed it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pid_alive(pid), "a worker that answers health was killed");
    let validated = worker
        .call(
            "environmentValidateConfig",
            &json!({"driverKey": SANDBOX_DRIVER_KEY, "config": {}}),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(validated["ok"], true);
    assert_eq!(worker.starts(), 1);
    assert_eq!(worker.pid(), Some(pid));
    worker.shutdown().await;
    assert!(worker.is_shut_down());
    assert!(wait_gone(pid).await, "shutdown left the worker running");
    let err = worker
        .call("environmentValidateConfig", &json!({}), None, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has been shut down"), "{err}");
}

/// With a zero health timeout an abandoned call kills the worker at once
/// (nothing it started keeps running), and the next call restarts it.
#[tokio::test]
async fn a_zero_health_timeout_kills_the_worker_of_an_abandoned_call() {
    let dirs = dirs();
    let worker = PluginWorker::new(
        worker_config(&dirs, &[(ENV_HANG_ON, "environmentProbe")]).health_timeout(Duration::ZERO),
    );
    worker.start().await.unwrap();
    let pid = worker.pid().unwrap();
    let params = json!({"driverKey": SANDBOX_DRIVER_KEY, "environmentId": "e", "config": {}});
    let call = worker.call("environmentProbe", &params, None, None);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );
    assert!(wait_gone(pid).await, "the worker kept running");
    let validated = worker
        .call(
            "environmentValidateConfig",
            &json!({"driverKey": SANDBOX_DRIVER_KEY, "config": {}}),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(validated["ok"], true);
    assert_eq!(worker.starts(), 2);
    worker.shutdown().await;
}

#[tokio::test]
async fn plugin_driver_resolves_secret_refs_and_keeps_them_out_of_errors_logs_and_metadata() {
    let (logs, _guard) = LogCapture::start();
    let dirs = dirs();
    const SECRET: &str = "sk-driver-secret-91b2";
    let worker = PluginWorker::new(worker_config(&dirs, &[(ENV_LEAK_SECRETS, "1")]));
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(SECRET);
    let runtime = EnvironmentRuntime::builder()
        .driver(Arc::new(PluginDriver::new().with_plugin(worker.clone())))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-driver-secret",
        "Driver secret",
        "plugin",
        json!({"pluginKey": PLUGIN_KEY, "driverKey": ENVIRONMENT_DRIVER_KEY, "driverConfig": {"image": "fake:test", "apiKey": key_id}}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-ds"))
        .await
        .unwrap()
        .lease;
    let shown = format!("{lease:?}");
    assert!(!shown.contains(SECRET), "secret in the lease: {shown}");
    std::fs::write(
        dirs.control.path().join("fail-next-environmentExecute"),
        b"",
    )
    .unwrap();
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    // The worker echoed the credential it received: resolved, then scrubbed.
    assert!(shown.contains("with credential [REDACTED]"), "{shown}");
    assert!(
        !shown.contains(SECRET) && !shown.contains(&key_id),
        "{shown}"
    );
    runtime
        .release_run_leases("run-ds", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = logs.text();
    assert!(text.contains("[REDACTED]"), "{text}");
    assert!(!text.contains(SECRET), "secret in logs:\n{text}");
}

/// The plugin driver records its acquisition before the worker is asked and
/// never lets the caller's deadline cancel the worker's call: a lease that
/// arrives after the caller gave up is released through the worker, and
/// the row says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_driver_acquire_that_outlives_its_caller_leaves_nothing() {
    let dirs = dirs();
    let worker = PluginWorker::new(worker_config(&dirs, &[]));
    worker.start().await.unwrap();
    let options = RuntimeOptions {
        default_call_deadline: Duration::from_millis(400),
        ..short_deadlines()
    };
    let runtime = plugin_runtime(&worker, options);
    std::fs::write(dirs.control.path().join("stall-after-create-ms"), "600").unwrap();
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(plugin_env(), "run-slow"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    let rows = runtime
        .lease_store()
        .list_by_run("run-slow", None)
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        1,
        "the acquisition was recorded before the call"
    );

    let mut settled = None;
    for _ in 0..200 {
        let row = runtime
            .lease_store()
            .get(&rows[0].id)
            .await
            .unwrap()
            .unwrap();
        if row.status == LeaseStatus::Expired && live(dirs.control.path()) == 0 {
            settled = Some(row);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let row = settled.expect("the late lease was released and recorded");
    assert_eq!(row.failure_reason.as_deref(), Some("acquire_abandoned"));
    assert_eq!(row.cleanup_status, Some(CleanupStatus::Success));
    assert!(
        worker.is_running(),
        "the worker was not killed for a slow call"
    );
    worker.shutdown().await;
}

/// The plugin's own environment cannot override what the host controls
/// (PATH, NODE_PATH, NODE_ENV, TZ, PAPERCLIP_PLUGIN_ID), as upstream; other
/// host variables never reach the worker; its own variables do.
#[tokio::test]
async fn the_worker_environment_is_minimal_and_host_controlled_keys_win() {
    let out = tempfile::tempdir().unwrap();
    let dump = out.path().join("env.txt");
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest()).unwrap();
    // Answers `initialize` with the request's id, after writing its environment.
    let script = format!(
        "env > '{}'; read line; id=$(printf %s \"$line\" | grep -o '\"id\":[0-9]*' | head -n 1 | cut -d: -f2); \
         printf '{{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":{{\"ok\":true,\"supportedMethods\":[]}}}}\\n' \"$id\"; exec sleep 30",
        dump.display()
    );
    let mut config = PluginWorkerConfig::new("/bin/sh", manifest)
        .arg("-c")
        .arg(script)
        .env("PATH", "/plugin/bin")
        .env("TZ", "Mars/Olympus")
        .env("PAPERCLIP_PLUGIN_ID", "someone.else")
        .env("BOX_REGION", "eu-1")
        .ready_timeout(Duration::from_secs(10));
    config.shutdown_drain = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_millis(200);
    let worker = PluginWorker::new(config);
    worker.start().await.unwrap();
    let env = std::fs::read_to_string(&dump).unwrap();
    let var = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    assert_eq!(var("PATH"), std::env::var("PATH").ok());
    assert_eq!(
        var("TZ").as_deref(),
        Some(std::env::var("TZ").as_deref().unwrap_or("UTC"))
    );
    assert_eq!(var("PAPERCLIP_PLUGIN_ID").as_deref(), Some(PLUGIN_KEY));
    assert_eq!(var("BOX_REGION").as_deref(), Some("eu-1"));
    assert_eq!(var("CARGO_MANIFEST_DIR"), None, "host environment leaked");
    worker.shutdown().await;
}
