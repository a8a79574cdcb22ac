//! A real Paperclip plugin under the SDK host: `plugins/sdk-local/worker.mjs`
//! is written with the published worker SDK (`@paperclipai/plugin-sdk`
//! 2026.916.1, `definePlugin` + `runWorker`), run by `node`, and driven
//! through the host in `paperclip-env-core::plugin`: the conformance suite,
//! live streaming, stdout noise, worker → host calls, a hung call, a wedged
//! worker and shutdown.
//!
//! The SDK is installed, pinned, by `scripts/setup.sh` (through
//! `scripts/plugin-sdk-setup.sh`) into
//! `~/.cache/paperclip-env/vendor/plugin-sdk-<version>/node_modules`
//! (`PAPERCLIP_ENV_VENDOR_DIR` moves the vendor dir;
//! `PAPERCLIP_ENV_PLUGIN_SDK_MODULES` names another `node_modules`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::plugin::{
    CallError, PluginManifest, PluginSandboxProvider, PluginWorker, PluginWorkerConfig,
};
use paperclip_env_core::{
    AcquireRunLease, Capabilities, CleanupStatus, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, LeaseStatus, OutputStream, RuntimeOptions,
};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::logs::LogCapture;
use serde_json::json;

const SDK_VERSION: &str = "2026.916.1";
const DRIVER_KEY: &str = "sdk-local";
const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/sdk-local");

fn sdk_modules() -> PathBuf {
    let modules = std::env::var_os("PAPERCLIP_ENV_PLUGIN_SDK_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let vendor = std::env::var_os("PAPERCLIP_ENV_VENDOR_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").expect("HOME is set");
                    Path::new(&home).join(".cache/paperclip-env/vendor")
                });
            vendor
                .join(format!("plugin-sdk-{SDK_VERSION}"))
                .join("node_modules")
        });
    assert!(
        modules
            .join("@paperclipai/plugin-sdk/package.json")
            .exists(),
        "@paperclipai/plugin-sdk {SDK_VERSION} is not installed at {}: run `bash scripts/setup.sh` \
         (it installs node packages the tests need)",
        modules.display()
    );
    modules
}

/// The plugin's directory (worker + `node_modules` link), its lease root and
/// its control directory, alive as long as the test holds them.
struct Plugin {
    home: tempfile::TempDir,
    root: tempfile::TempDir,
    control: tempfile::TempDir,
}

impl Plugin {
    fn new() -> Plugin {
        let home = tempfile::tempdir().unwrap();
        // ESM resolves bare imports from the module's own directory up, so
        // the worker sits beside a `node_modules` link.
        std::os::unix::fs::symlink(sdk_modules(), home.path().join("node_modules")).unwrap();
        std::fs::copy(
            Path::new(PLUGIN_DIR).join("worker.mjs"),
            home.path().join("worker.mjs"),
        )
        .unwrap();
        Plugin {
            home,
            root: tempfile::tempdir().unwrap(),
            control: tempfile::tempdir().unwrap(),
        }
    }

    fn manifest() -> PluginManifest {
        let raw = std::fs::read_to_string(Path::new(PLUGIN_DIR).join("manifest.json")).unwrap();
        PluginManifest::from_json(serde_json::from_str(&raw).unwrap()).unwrap()
    }

    fn config(&self, env: &[(&str, &str)]) -> PluginWorkerConfig {
        let mut config = PluginWorkerConfig::new("node", Self::manifest())
            .arg("worker.mjs")
            .env("SDK_LOCAL_ROOT", self.root.path().to_string_lossy())
            .env("SDK_LOCAL_CONTROL", self.control.path().to_string_lossy())
            .plugin_config(
                json!({"region": "eu-1"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )
            .ready_timeout(Duration::from_secs(30));
        config.cwd = Some(self.home.path().to_path_buf());
        for (k, v) in env {
            config = config.env(*k, *v);
        }
        config
    }

    fn worker(&self, env: &[(&str, &str)]) -> PluginWorker {
        PluginWorker::new(self.config(env))
    }

    /// Lease directories that exist now.
    fn live(&self) -> usize {
        std::fs::read_dir(self.root.path())
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("sdk-local-"))
                    .count()
            })
            .unwrap_or(0)
    }

    fn counter(&self, name: &str) -> usize {
        std::fs::read_to_string(self.control.path().join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// What the plugin's hooks give: everything but reusable leases.
fn capabilities() -> Capabilities {
    Capabilities {
        execute: true,
        realize_workspace: true,
        resume: true,
        destroy: true,
        probe: true,
        stdin: true,
        multi_command_exec: true,
        signals: true,
        ..Capabilities::default()
    }
}

fn options() -> RuntimeOptions {
    RuntimeOptions {
        default_call_deadline: Duration::from_secs(5),
        deadline_grace: Duration::from_millis(500),
        provider_ready_timeout: Duration::from_secs(30),
        ..RuntimeOptions::default()
    }
}

fn runtime(worker: &PluginWorker) -> EnvironmentRuntime {
    let provider = PluginSandboxProvider::new(worker.clone(), DRIVER_KEY)
        .unwrap()
        .with_capabilities(capabilities())
        .with_options(options());
    EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .options(options())
        .build()
}

fn environment() -> Environment {
    Environment::new(
        "env-sdk-local",
        "sdk-local",
        "sandbox",
        json!({"provider": DRIVER_KEY, "image": "local", "timeoutMs": 60000}),
    )
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn wait_gone(pid: u32) -> bool {
    for _ in 0..250 {
        if !pid_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_plugin_passes_conformance_under_the_host() {
    let plugin = Arc::new(Plugin::new());
    let worker = plugin.worker(&[]);
    let provider = PluginSandboxProvider::new(worker.clone(), DRIVER_KEY)
        .unwrap()
        .with_capabilities(capabilities());
    let flag = |method: &'static str| {
        let control = plugin.control.path().to_path_buf();
        move || std::fs::write(control.join(format!("fail-next-{method}")), b"").unwrap()
    };
    let (p1, p2, p3) = (plugin.clone(), plugin.clone(), plugin.clone());
    let fixture = Fixture::new(Arc::new(provider))
        .config(json!({"image": "local", "timeoutMs": 300000, "apiKey": "sk-sdk-conformance"}))
        .secret_value("sk-sdk-conformance")
        .live_resources(move || p1.live())
        .create_calls(move || p2.counter("creates"))
        .execute_calls(move || p3.counter("executes"))
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
    assert_eq!(plugin.live(), 0, "the suite leaked lease directories");
    assert_eq!(
        worker.starts(),
        1,
        "the worker restarted during a clean run"
    );
    let pid = worker.pid().unwrap();
    worker.shutdown().await;
    assert!(wait_gone(pid).await, "worker still running after shutdown");
    assert!(
        plugin.control.path().join("shutdown").exists(),
        "onShutdown did not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_live_before_the_command_exits() {
    let plugin = Plugin::new();
    let worker = plugin.worker(&[]);
    let runtime = runtime(&worker);
    let env = environment();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-stream"))
        .await
        .unwrap()
        .lease;
    let gate = plugin.control.path().join("gate");
    let script = format!(
        "echo first; echo warn-1 >&2; while [ ! -e '{}' ]; do sleep 0.02; done; echo second",
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
                .execute_streaming(
                    &env,
                    &lease,
                    &ExecuteRequest::shell(script).timeout_ms(20_000),
                    sink,
                )
                .await
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no chunk arrived while the command waits for its gate")
        .unwrap();
    assert!(
        !call.is_finished(),
        "the call answered before the gate opened"
    );
    std::fs::write(&gate, b"").unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut chunks = vec![first];
    while let Ok(chunk) = rx.try_recv() {
        chunks.push(chunk);
    }
    assert_eq!(result.stdout, "first\nsecond\n");
    assert_eq!(result.stderr, "warn-1\n");
    let streamed: Vec<u8> = chunks
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(String::from_utf8(streamed).unwrap(), result.stdout);
    runtime
        .release_run_leases("run-stream", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(plugin.live(), 0);
    worker.shutdown().await;
}

/// `ctx.state` and `ctx.config` calls reach the host: the probe counter kept
/// in the host's state grows across calls; another worker has its own.
#[tokio::test]
async fn worker_to_host_calls_are_served_and_stdout_noise_is_skipped() {
    let (logs, _guard) = LogCapture::start();
    let plugin = Plugin::new();
    let worker = plugin.worker(&[]);
    let runtime = runtime(&worker);
    let env = environment();
    let first = runtime.probe(&env).await.unwrap();
    let second = runtime.probe(&env).await.unwrap();
    assert!(first.ok && second.ok, "{first:?} {second:?}");
    assert_eq!(second.summary, "sdk-local ready (probe 2)");
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-noise"))
        .await
        .unwrap()
        .lease;
    let done = runtime
        .execute(&env, &lease, &ExecuteRequest::shell("echo ok"))
        .await
        .unwrap();
    assert_eq!(done.stdout, "ok\n");
    runtime
        .release_run_leases("run-noise", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
    let text = logs.text();
    // `console.log` in setup and in handlers: logged and skipped.
    assert!(
        text.contains("sdk-local: setting up (this line is not JSON-RPC)"),
        "{text}"
    );
    assert!(text.contains("sdk-local: running"), "{text}");
    assert!(text.contains("sdk-local: probing"), "{text}");
    // `ctx.logger` reaches the host's log.
    assert!(text.contains("[plugin] sdk-local plugin ready"), "{text}");

    // A fresh worker sharing nothing with the first: its state starts empty.
    let fresh = plugin.worker(&[]);
    let probe = runtime_probe(&fresh, &env).await;
    assert_eq!(probe["summary"], "sdk-local ready (probe 1)");
    assert_eq!(probe["metadata"]["region"], "eu-1");
    fresh.shutdown().await;
}

async fn runtime_probe(worker: &PluginWorker, env: &Environment) -> serde_json::Value {
    worker
        .call(
            "environmentProbe",
            &json!({"driverKey": DRIVER_KEY, "companyId": "co", "environmentId": env.id, "config": env.config}),
            None,
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap()
}

/// A handler that never settles is rejected alone: the SDK worker keeps
/// answering `health`, so it is not killed, and another lease's command in
/// flight on the same worker completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_leaves_the_worker_and_other_leases_alive() {
    let plugin = Plugin::new();
    let worker = PluginWorker::new(
        plugin
            .config(&[("SDK_LOCAL_HANG_ON", "environmentProbe")])
            .health_timeout(Duration::from_secs(2)),
    );
    let runtime = runtime(&worker);
    let env = environment();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-hung"))
        .await
        .unwrap()
        .lease;
    let pid = worker.pid().unwrap();
    let params = json!({"driverKey": DRIVER_KEY, "companyId": "co", "environmentId": env.id, "config": env.config});
    let other = ExecuteRequest::shell("sleep 2; echo still-here").timeout_ms(20_000);
    let (probe, executed) = tokio::join!(
        worker.call(
            "environmentProbe",
            &params,
            None,
            Some(Duration::from_millis(500))
        ),
        runtime.execute(&env, &lease, &other)
    );
    assert!(matches!(probe, Err(CallError::Timeout { .. })), "{probe:?}");
    assert_eq!(executed.unwrap().stdout, "still-here\n");
    assert!(pid_alive(pid), "a worker that answers health was killed");
    assert_eq!(worker.starts(), 1);
    let released = runtime
        .release_run_leases("run-hung", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(plugin.live(), 0);
    worker.shutdown().await;
}

/// A handler that spins blocks the worker's event loop: the `health` check
/// after the timed-out call gets no answer, the worker is killed, and the
/// release afterwards runs on a fresh worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_worker_is_killed_after_its_health_check_fails() {
    let plugin = Plugin::new();
    let worker = PluginWorker::new(
        plugin
            .config(&[("SDK_LOCAL_WEDGE_ON", "environmentExecute")])
            .health_timeout(Duration::from_millis(500)),
    );
    let runtime = runtime(&worker);
    let env = environment();
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-wedged"))
        .await
        .unwrap()
        .lease;
    let pid = worker.pid().unwrap();
    let err = runtime
        .execute(&env, &lease, &ExecuteRequest::new("true").timeout_ms(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(wait_gone(pid).await, "the wedged worker was not killed");
    let released = runtime
        .release_run_leases("run-wedged", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Success)
    );
    assert_eq!(worker.starts(), 2);
    assert_eq!(plugin.live(), 0);
    worker.shutdown().await;
}

/// The run's details reach the plugin's acquire as upstream's host sends
/// them: agent, execution workspace, adapter type, requested cwd and expiry.
#[tokio::test]
async fn acquire_sends_the_runs_details() {
    let plugin = Plugin::new();
    let worker = plugin.worker(&[]);
    let runtime = runtime(&worker);
    let expires = paperclip_env_core::time::now() + chrono::Duration::hours(1);
    let request = AcquireRunLease::for_run(environment(), "run-details")
        .execution_workspace(Some("ews-1".into()), Some("isolated_workspace".into()))
        .agent("agent-7")
        .adapter_type("codex_local")
        .requested_cwd("/work/requested")
        .requested_expires_at(expires);
    let lease = runtime.acquire_run_lease(request).await.unwrap().lease;
    let requested = &lease.metadata.as_ref().unwrap()["requested"];
    assert_eq!(requested["agentId"], "agent-7", "{requested}");
    assert_eq!(requested["executionWorkspaceId"], "ews-1");
    assert_eq!(requested["adapterType"], "codex_local");
    assert_eq!(requested["requestedCwd"], "/work/requested");
    assert_eq!(requested["workspaceMode"], "isolated_workspace");
    let sent = requested["requestedExpiresAt"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(sent).unwrap();
    assert_eq!(parsed.timestamp(), expires.timestamp());
    runtime
        .release_run_leases("run-details", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    worker.shutdown().await;
}
