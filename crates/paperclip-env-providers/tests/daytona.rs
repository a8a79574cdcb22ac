//! The Daytona provider against the Daytona emulator: conformance plus one
//! test per injected fault.
#![cfg(feature = "daytona")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, ExecuteResult, LeaseHandle, LeaseStatus, OutputCollector, OutputSink,
    OutputStream, ProviderConfig, SandboxProvider,
};
use paperclip_env_providers::daytona::DaytonaProvider;
use paperclip_env_providers::http::{HttpOptions, RetryPolicy};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::daytona::{DaytonaEmulator, Fault, Route};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEY: &str = "dtn_secret_key_0123456789";

fn options() -> HttpOptions {
    HttpOptions {
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_retries: 2,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Setup {
    emu: Arc<DaytonaEmulator>,
    provider: DaytonaProvider,
}

async fn setup() -> Setup {
    let emu = Arc::new(DaytonaEmulator::start(KEY).await.unwrap());
    let provider = DaytonaProvider::builder()
        .http_options(options())
        .status_poll_interval(Duration::from_millis(100))
        .drain_window(Duration::from_millis(200))
        .build()
        .unwrap();
    Setup { emu, provider }
}

fn status(status: u16) -> Fault {
    Fault::Status {
        status,
        retry_after: None,
    }
}

impl Setup {
    fn config(&self, extra: Value) -> Value {
        let mut c =
            json!({"apiUrl": self.emu.url(), "apiKey": KEY, "timeoutMs": 60000, "target": "us"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        c
    }

    fn ctx(&self, extra: Value) -> CallContext {
        let mut values = self.config(extra).as_object().cloned().unwrap();
        values.remove("apiKey");
        CallContext {
            company_id: Some("company-1".into()),
            environment_id: "env-1".into(),
            issue_id: None,
            config: ProviderConfig::new(values).with_secret("apiKey", SecretString::from(KEY)),
        }
    }

    async fn try_acquire(&self, extra: Value) -> paperclip_env_core::Result<LeaseHandle> {
        let lease = self
            .provider
            .acquire(
                &self.ctx(extra),
                &AcquireRequest {
                    run_id: "run-1".into(),
                    workspace_mode: None,
                    ..Default::default()
                },
            )
            .await?;
        Ok(LeaseHandle {
            provider_lease_id: lease.provider_lease_id,
            metadata: lease.metadata,
            expires_at: None,
        })
    }

    async fn acquire(&self, extra: Value) -> LeaseHandle {
        self.try_acquire(extra).await.unwrap()
    }

    async fn run(
        &self,
        lease: &LeaseHandle,
        request: ExecuteRequest,
    ) -> paperclip_env_core::Result<ExecuteResult> {
        self.run_with(lease, request, None).await
    }

    async fn run_with(
        &self,
        lease: &LeaseHandle,
        request: ExecuteRequest,
        sink: Option<Arc<dyn OutputSink>>,
    ) -> paperclip_env_core::Result<ExecuteResult> {
        let output = OutputCollector::new(Default::default(), sink);
        let exit = self
            .provider
            .execute(&self.ctx(json!({})), lease, &request, &output)
            .await?;
        Ok(output.finish(exit))
    }

    async fn release(&self, lease: &LeaseHandle, extra: Value) -> paperclip_env_core::Result<()> {
        self.provider
            .release(&self.ctx(extra), lease, LeaseStatus::Released)
            .await
    }
}

fn collecting_sink() -> (Arc<dyn OutputSink>, Arc<Mutex<String>>) {
    let seen = Arc::new(Mutex::new(String::new()));
    let seen2 = seen.clone();
    let sink: Arc<dyn OutputSink> = Arc::new(move |s: OutputStream, d: &[u8]| {
        if s == OutputStream::Stdout {
            seen2.lock().unwrap().push_str(&String::from_utf8_lossy(d));
        }
    });
    (sink, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daytona_passes_conformance() {
    let s = setup().await;
    let (live, creates, execs, fa, fe, fr) = (
        s.emu.clone(),
        s.emu.clone(),
        s.emu.clone(),
        s.emu.clone(),
        s.emu.clone(),
        s.emu.clone(),
    );
    let fixture = Fixture::new(Arc::new(s.provider.clone()))
        .config(s.config(json!({})))
        .invalid_config(
            json!({"apiUrl": s.emu.url(), "apiKey": KEY, "image": "node:20", "snapshot": "snap"}),
        )
        .secret_value(KEY)
        .live_resources(move || live.live_sandboxes())
        .create_calls(move || creates.create_calls())
        .execute_calls(move || execs.exec_calls())
        .fail_next_acquire(move || fa.inject(Route::Folder, status(500), 3))
        .fail_next_execute(move || fe.inject(Route::SessionExec, status(500), 1))
        .fail_next_release(move || fr.inject(Route::Delete, status(500), 3));
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert_eq!(
        s.emu.running_sandboxes(),
        0,
        "left running: {:?}",
        s.emu.sandboxes()
    );
}

#[tokio::test]
async fn wire_shape_labels_headers_and_metadata() {
    let s = setup().await;
    let lease = s
        .acquire(json!({"image": "node:20", "cpu": 2, "memory": 4, "reuseLease": true}))
        .await;
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["provider"], "daytona");
    assert_eq!(md["sandboxState"], "started");
    assert_eq!(md["cpu"], 2);
    assert_eq!(md["workspaceSentinel"]["result"], "written");
    assert_eq!(md["workspaceSentinel"]["token"].as_str().unwrap().len(), 64);
    assert!(
        md["remoteCwd"]
            .as_str()
            .unwrap()
            .ends_with("/paperclip-workspace")
    );
    assert!(!serde_json::to_string(&md).unwrap().contains(KEY));
    let sandbox = s.emu.sandboxes().pop().unwrap();
    let body = &sandbox.create_body;
    assert_eq!(body["buildInfo"]["dockerfileContent"], "FROM node:20\n");
    assert_eq!(body["labels"]["paperclip-run-id"], "run-1");
    assert_eq!(body["labels"]["paperclip-reuse-lease"], "true");
    assert_eq!(body["labels"]["code-toolbox-language"], "python");
    assert_eq!(
        (
            body["autoStopInterval"].clone(),
            body["autoDeleteInterval"].clone()
        ),
        (json!(15), json!(10080))
    );
    assert_eq!(body["target"], "us");
    assert!(body.get("snapshot").is_none());
    for r in s.emu.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert_eq!(r.header("x-daytona-sdk-version"), Some("0.183.0"));
        assert_eq!(r.header("x-daytona-source"), Some("paperclip-env"));
        assert!(!r.body.contains(KEY), "a body carries the key: {}", r.path);
    }
    // Two executes with stdin: a unique upload per execute, removed afterwards.
    for _ in 0..2 {
        let r = s
            .run(&lease, ExecuteRequest::new("cat").stdin("piped"))
            .await
            .unwrap();
        assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "piped"));
    }
    let requests = s.emu.requests();
    let uploads: Vec<String> = requests
        .iter()
        .filter(|r| r.path.ends_with("/files/bulk-upload") && r.body.contains("paperclip-stdin-"))
        .map(|r| r.body.split("/tmp/paperclip-stdin-").nth(1).unwrap()[..36].to_owned())
        .collect();
    assert_eq!(uploads.len(), 2);
    assert_ne!(uploads[0], uploads[1]);
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method == "DELETE"
                && r.path.ends_with("/files")
                && r.query
                    .as_deref()
                    .unwrap_or("")
                    .contains("paperclip-stdin-"))
            .count(),
        2
    );
    // Session mode only, always asynchronous; one session for the lease.
    let execs: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/exec"))
        .collect();
    assert!(execs.iter().all(|r| r.body.contains("\"runAsync\":true")));
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/process/session"))
            .count(),
        1
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path.ends_with("/logs") && r.header("upgrade").is_some())
    );
    // Snapshot creation and ambiguity.
    let snap = s.acquire(json!({"snapshot": "base"})).await;
    let body = s
        .emu
        .sandboxes()
        .into_iter()
        .find(|x| Some(x.id.as_str()) == snap.id())
        .unwrap()
        .create_body;
    assert_eq!(body["snapshot"], "base");
    assert!(body.get("buildInfo").is_none() && body.get("cpu").is_none());
    let v = s
        .provider
        .validate_config(
            json!({"image": "a", "snapshot": "b", "apiKey": "k"})
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!v.ok);
    assert_eq!(
        v.errors[0].message,
        "Daytona sandbox environments must set either image or snapshot, not both."
    );
    s.release(&lease, json!({"reuseLease": true}))
        .await
        .unwrap();
    s.release(&snap, json!({})).await.unwrap();
    assert_eq!(s.emu.running_sandboxes(), 0);
}

#[tokio::test]
async fn streams_stdout_and_stderr_separately_and_live() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let (sink, seen) = collecting_sink();
    let r = s
        .run_with(
            &lease,
            ExecuteRequest::shell("printf out1; printf err1 >&2; sleep 0.3; printf out2; exit 3"),
            Some(sink),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (Some(3), "out1out2", "err1")
    );
    assert_eq!(seen.lock().unwrap().as_str(), "out1out2");
    // `exit 3` ended only the command: the session still works.
    let r = s
        .run(&lease, ExecuteRequest::new("printf").arg("again"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "again");
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn unauthorized_create_is_auth_error_without_retry_or_leak() {
    let s = setup().await;
    s.emu.inject(Route::Create, status(401), 1);
    let err = s.try_acquire(json!({})).await.unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(!err.to_string().contains(KEY));
    assert_eq!(s.emu.create_calls(), 1);
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn rate_limits_are_retried_then_reported() {
    let s = setup().await;
    s.emu.inject(
        Route::Create,
        Fault::Status {
            status: 429,
            retry_after: Some("1".into()),
        },
        1,
    );
    let started = Instant::now();
    let lease = s.acquire(json!({})).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(s.emu.create_calls(), 2);
    s.emu.inject(Route::Get, status(429), 1);
    s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    s.emu.inject(Route::Create, status(429), 3);
    let err = s.try_acquire(json!({})).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    s.release(&lease, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn failed_acquire_after_create_deletes_the_sandbox() {
    let s = setup().await;
    s.emu.inject(Route::WorkDir, status(503), 3);
    let err = s.try_acquire(json!({})).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(s.emu.create_calls(), 1);
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn sandbox_stuck_in_starting_times_out_and_is_deleted() {
    let s = setup().await;
    s.emu.inject(Route::Create, Fault::StuckStarting, 1);
    let started = Instant::now();
    let err = s.try_acquire(json!({"timeoutMs": 1000})).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("starting"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.emu.live_sandboxes(),
        0,
        "the stuck sandbox was not cleaned up"
    );
}

#[tokio::test]
async fn reusable_release_stops_and_resume_starts_with_sentinel() {
    let s = setup().await;
    let reuse = json!({"reuseLease": true});
    let lease = s.acquire(reuse.clone()).await;
    let id = lease.id().unwrap().to_owned();
    s.run(&lease, ExecuteRequest::shell("echo kept > kept.txt"))
        .await
        .unwrap();
    let sentinel = s
        .run(
            &lease,
            ExecuteRequest::new("cat").arg(".paperclip-runtime/reusable-sandbox-lease.json"),
        )
        .await
        .unwrap();
    let sentinel: Value = serde_json::from_str(&sentinel.stdout).unwrap();
    assert_eq!(sentinel["version"], 1);
    assert_eq!(
        sentinel["token"],
        lease.metadata.as_ref().unwrap()["workspaceSentinel"]["token"]
    );
    assert!(sentinel["writtenAt"].as_str().unwrap().contains('T'));
    s.release(&lease, reuse.clone()).await.unwrap();
    assert_eq!(s.emu.sandboxes()[0].state, "stopped");
    let resumed = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap();
    assert_eq!(resumed.provider_lease_id.as_deref(), Some(id.as_str()));
    let md = resumed.metadata.clone().unwrap();
    assert_eq!(
        (md["resumedLease"].clone(), md["resumedFromState"].clone()),
        (json!(true), json!("stopped"))
    );
    assert_eq!(md["workspaceSentinel"]["result"], "matched");
    let handle = LeaseHandle {
        provider_lease_id: resumed.provider_lease_id,
        metadata: resumed.metadata,
        expires_at: None,
    };
    let r = s
        .run(&handle, ExecuteRequest::new("cat").arg("kept.txt"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "kept\n");
    // A different image invalidates the reused sandbox.
    let other = s
        .provider
        .resume(
            &s.ctx(json!({"reuseLease": true, "snapshot": "other"})),
            &handle,
        )
        .await
        .unwrap();
    assert_eq!(other.provider_lease_id, None);
    assert_eq!(
        other.metadata.unwrap()["workspaceSentinel"]["result"],
        "mismatch"
    );
    // A missing sentinel file.
    s.run(
        &handle,
        ExecuteRequest::shell("rm -f .paperclip-runtime/reusable-sandbox-lease.json"),
    )
    .await
    .unwrap();
    let missing = s
        .provider
        .resume(&s.ctx(reuse.clone()), &handle)
        .await
        .unwrap();
    assert_eq!(
        missing.metadata.unwrap()["workspaceSentinel"]["result"],
        "missing"
    );
    s.provider.destroy(&s.ctx(reuse), &handle).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn not_found_during_resume_and_release() {
    let s = setup().await;
    let reuse = json!({"reuseLease": true});
    let lease = s.acquire(reuse.clone()).await;
    s.emu.inject(Route::Get, status(404), 1);
    let resumed = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap();
    assert_eq!(resumed.provider_lease_id, None);
    assert_eq!(resumed.metadata.unwrap()["expired"], true);
    s.emu.inject(Route::Get, status(404), 1);
    s.release(&lease, reuse.clone()).await.unwrap();
    s.provider.destroy(&s.ctx(reuse), &lease).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn server_errors_on_start_and_stop() {
    let s = setup().await;
    let reuse = json!({"reuseLease": true});
    let lease = s.acquire(reuse.clone()).await;
    s.release(&lease, reuse.clone()).await.unwrap();
    // 5xx on start during resume: propagated, sandbox kept.
    s.emu.inject(Route::Start, status(500), 3);
    let err = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(s.emu.live_sandboxes(), 1);
    let resumed = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap();
    assert!(resumed.provider_lease_id.is_some());
    // 5xx on stop during a reusable release: delete instead.
    s.emu.inject(Route::Stop, status(500), 3);
    s.release(&lease, reuse.clone()).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
    // Stop and delete both failing: the release fails (typed), nothing hidden.
    let lease = s.acquire(reuse.clone()).await;
    s.emu.inject(Route::Stop, status(500), 3);
    s.emu.inject(Route::Delete, status(500), 3);
    let err = s.release(&lease, reuse.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Provider { .. }), "{err:?}");
    s.provider.destroy(&s.ctx(reuse), &lease).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn stuck_start_on_resume_is_reported_not_awaited_forever() {
    let s = setup().await;
    let reuse = json!({"reuseLease": true, "timeoutMs": 1000});
    let lease = s.acquire(reuse.clone()).await;
    s.release(&lease, reuse.clone()).await.unwrap();
    s.emu.inject(Route::Start, Fault::StuckStarting, 1);
    let started = Instant::now();
    let err = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    s.provider.destroy(&s.ctx(reuse), &lease).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn one_shot_408_is_timed_out() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let output = OutputCollector::buffered();
    let exit = s
        .provider
        .execute_one_shot(
            &s.ctx(json!({})),
            &lease,
            &ExecuteRequest::shell("sleep 5").timeout_ms(1000),
            &output,
        )
        .await
        .unwrap();
    let r = output.finish(exit);
    assert!(r.timed_out && r.exit_code.is_none(), "{r:?}");
    assert!(r.stderr.contains("command execution timeout"), "{r:?}");
    s.emu.inject(Route::Execute, status(408), 1);
    let output = OutputCollector::buffered();
    let exit = s
        .provider
        .execute_one_shot(
            &s.ctx(json!({})),
            &lease,
            &ExecuteRequest::new("true"),
            &output,
        )
        .await
        .unwrap();
    assert!(exit.timed_out);
    let output = OutputCollector::buffered();
    let exit = s
        .provider
        .execute_one_shot(
            &s.ctx(json!({})),
            &lease,
            &ExecuteRequest::shell("printf a; printf b >&2; exit 7"),
            &output,
        )
        .await
        .unwrap();
    let r = output.finish(exit);
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(7), "ab"));
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn log_stream_that_never_closes_ends_by_status_polling() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    s.emu.inject(Route::Logs, Fault::LogsNeverClose, 1);
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        s.run(
            &lease,
            ExecuteRequest::shell("printf done; printf warn >&2"),
        ),
    )
    .await
    .expect("the execute hung on a log stream that never closes")
    .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (Some(0), "done", "warn")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn dropped_log_streams_reconnect_then_fall_back_to_polling() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let (sink, seen) = collecting_sink();
    s.emu.inject(Route::Logs, Fault::DropLogs, 1);
    let r = s
        .run_with(
            &lease,
            ExecuteRequest::shell("printf one; sleep 0.3; printf two"),
            Some(sink),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "onetwo");
    assert_eq!(
        seen.lock().unwrap().as_str(),
        "onetwo",
        "no duplicated output after the replay"
    );
    s.emu.inject(Route::Logs, Fault::DropLogs, 2);
    let r = s
        .run(
            &lease,
            ExecuteRequest::shell("printf a; sleep 0.2; printf b"),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "ab"));
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn command_past_its_deadline_times_out_and_gets_a_new_session() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let r = s
        .run(
            &lease,
            ExecuteRequest::shell("echo partial; sleep 30").timeout_ms(700),
        )
        .await
        .unwrap();
    assert!(r.timed_out && r.exit_code.is_none());
    // The daemon frames whole lines: what was printed before the deadline.
    assert_eq!(r.stdout, "partial\n");
    let r = s
        .run(&lease, ExecuteRequest::new("printf").arg("next"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "next");
    let requests = s.emu.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method == "DELETE" && r.path.contains("/process/session/"))
            .count(),
        1
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/process/session"))
            .count(),
        2
    );
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn session_not_found_opens_a_new_session_once() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    s.emu.inject(Route::SessionExec, status(404), 1);
    let r = s
        .run(&lease, ExecuteRequest::new("printf").arg("retried"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "retried");
    s.emu.inject(Route::SessionExec, status(404), 2);
    assert!(s.run(&lease, ExecuteRequest::new("true")).await.is_err());
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn execute_fault_is_not_retried() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let before = s.emu.exec_calls();
    s.emu.inject(Route::SessionExec, status(503), 1);
    assert!(s.run(&lease, ExecuteRequest::new("true")).await.is_err());
    assert_eq!(s.emu.exec_calls(), before + 1);
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn error_states_and_auto_stop() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let id = lease.id().unwrap().to_owned();
    // Auto-stopped behind our back: started again, new session.
    s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    s.emu.set_state(&id, "stopped", false, None);
    let r = s
        .run(&lease, ExecuteRequest::new("printf").arg("back"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "back");
    s.emu.set_state(&id, "error", true, Some("runner lost"));
    assert_eq!(
        s.run(&lease, ExecuteRequest::new("printf").arg("ok"))
            .await
            .unwrap()
            .stdout,
        "ok"
    );
    s.emu.set_state(&id, "error", false, Some("disk corrupted"));
    let err = s
        .run(&lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "Daytona sandbox {id} is in an unrecoverable error state: disk corrupted"
        )),
        "{err}"
    );
    s.release(&lease, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn file_upload_and_download() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let cwd = lease.metadata_str("remoteCwd").unwrap().to_owned();
    let ctx = s.ctx(json!({}));
    let path = format!("{cwd}/sub/data.bin");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    s.provider
        .upload_file(&ctx, &lease, &path, &bytes)
        .await
        .unwrap();
    assert_eq!(
        s.provider.download_file(&ctx, &lease, &path).await.unwrap(),
        bytes
    );
    let err = s
        .provider
        .download_file(&ctx, &lease, &format!("{cwd}/nope"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    s.provider.destroy(&ctx, &lease).await.unwrap();
    let err = s
        .provider
        .download_file(&ctx, &lease, &path)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("daytona_sandbox_not_found"),
        "{err}"
    );
}

#[tokio::test]
async fn no_api_key_in_any_log_line() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let s = setup().await;
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(KEY);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(s.provider.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-l",
        "Daytona",
        "sandbox",
        json!({"provider": "daytona", "apiKey": key_id, "apiUrl": s.emu.url()}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-l"))
        .await
        .unwrap()
        .lease;
    runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("printf").arg("x").stdin("in"),
        )
        .await
        .unwrap();
    s.emu.inject(Route::Delete, status(401), 1);
    let _ = runtime
        .release_run_leases("run-l", LeaseStatus::Released)
        .await;
    let logs = capture.text();
    assert!(logs.contains("http"), "the capture saw the HTTP spans");
    // The WebSocket library's own TRACE records reach the capture (through
    // the `log` bridge): its handshake log would carry the Authorization
    // header, so the handshake is not left to it (issue 26).
    assert!(
        logs.contains("tungstenite"),
        "the capture saw the WebSocket library's TRACE records"
    );
    assert!(!logs.contains(KEY), "a log line carries the API key");
    assert!(!format!("{:?}", s.provider).contains(KEY));
    assert!(
        !format!(
            "{:?}",
            DaytonaProvider::builder().api_key(SecretString::from(KEY))
        )
        .contains(KEY)
    );
    assert!(!serde_json::to_string(&lease).unwrap().contains(KEY));
}

#[tokio::test]
async fn hanging_state_read_hits_the_liveness_bound() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    s.emu
        .inject(Route::Get, Fault::Delay(Duration::from_secs(3)), 3);
    let started = Instant::now();
    let err = s
        .provider
        .execute(
            &s.ctx(json!({"livenessTimeoutMs": 200})),
            &lease,
            &ExecuteRequest::new("true"),
            &OutputCollector::buffered(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    s.emu.clear_faults();
    s.release(&lease, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn archive_on_release_archives_instead_of_deleting() {
    let s = setup().await;
    let cfg = json!({"archiveOnRelease": true});
    let lease = s.acquire(cfg.clone()).await;
    assert_eq!(lease.metadata.as_ref().unwrap()["archiveOnRelease"], true);
    s.release(&lease, cfg.clone()).await.unwrap();
    let sandbox = s.emu.sandboxes().pop().unwrap();
    assert_eq!(sandbox.state, "archived");
    assert_eq!(sandbox.create_body["autoDeleteInterval"], 60);
    s.provider.destroy(&s.ctx(cfg), &lease).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

fn session_creates(emu: &DaytonaEmulator) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/process/session"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_executes_on_one_lease_do_not_queue() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    // A waits for a file only B creates: if B queued behind A (one shared
    // daemon session runs its commands in turn), neither would finish.
    let waiter =
        ExecuteRequest::shell("while [ ! -f rendezvous ]; do sleep 0.05; done; echo A saw B");
    let maker = ExecuteRequest::shell("sleep 0.2; touch rendezvous; echo B done");
    let (a, b) = tokio::time::timeout(
        Duration::from_secs(20),
        futures::future::join(s.run(&lease, waiter), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.run(&lease, maker).await
        }),
    )
    .await
    .expect("the second execute queued behind the first");
    assert_eq!(a.unwrap().stdout, "A saw B\n");
    assert_eq!(b.unwrap().stdout, "B done\n");
    assert_eq!(
        session_creates(&s.emu),
        2,
        "one session per concurrent command"
    );
    // Sequential executes reuse an idle session of the pool.
    s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    assert_eq!(session_creates(&s.emu), 2);
    s.release(&lease, json!({})).await.unwrap();
    // Release deleted the pooled sessions.
    let deletes = s
        .emu
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path.contains("/process/session/"))
        .count();
    assert_eq!(deletes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_never_kills_another_command() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let long = ExecuteRequest::shell("sleep 1; echo survived");
    let doomed = ExecuteRequest::shell("sleep 30").timeout_ms(300);
    let (long, doomed) = tokio::time::timeout(
        Duration::from_secs(20),
        futures::future::join(s.run(&lease, long), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.run(&lease, doomed).await
        }),
    )
    .await
    .expect("hung");
    let doomed = doomed.unwrap();
    assert!(doomed.timed_out && doomed.exit_code.is_none(), "{doomed:?}");
    let long = long.unwrap();
    assert_eq!(
        (long.exit_code, long.stdout.as_str()),
        (Some(0), "survived\n")
    );
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn a_command_reading_stdin_gets_eof_or_the_given_stdin() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        s.run(&lease, ExecuteRequest::new("cat")),
    )
    .await
    .expect("cat without stdin waited for input")
    .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), ""));
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        s.run(
            &lease,
            ExecuteRequest::shell("read a; read b; echo \"$b $a\"").stdin("1\n2\n"),
        ),
    )
    .await
    .expect("hung")
    .unwrap();
    assert_eq!(r.stdout, "2 1\n");
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn output_is_exact_through_the_daemon_s_line_framing() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    // The daemon frames per line and ends a last partial line with "\n";
    // the provider still returns (and streams) exactly what was printed.
    for (script, out, err) in [
        ("printf 'a\\nb'; printf 'e' >&2", "a\nb", "e"),
        ("printf 'x\\n'; printf 'y\\n\\n' >&2", "x\n", "y\n\n"),
        ("true", "", ""),
        ("printf '\\n'", "\n", ""),
    ] {
        let (sink, seen) = collecting_sink();
        let r = s
            .run_with(&lease, ExecuteRequest::shell(script), Some(sink))
            .await
            .unwrap();
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str()),
            (out, err),
            "{script}"
        );
        assert_eq!(seen.lock().unwrap().as_str(), out, "streamed: {script}");
    }
    // What reached the daemon's log is the per-line framing.
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn shell_state_never_leaks_between_executes() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    // The login script sources ~/.profile in the session's shell: were that
    // not contained, every later command would see the variable grow.
    s.run(
        &lease,
        ExecuteRequest::shell("echo 'export PROFILE_RUNS=\"x$PROFILE_RUNS\"' > \"$HOME/.profile\""),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let r = s
            .run(&lease, ExecuteRequest::shell("echo \"$PROFILE_RUNS\""))
            .await
            .unwrap();
        assert_eq!(r.stdout, "x\n");
    }
    assert_eq!(
        session_creates(&s.emu),
        1,
        "all ran in the same pooled session"
    );
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn the_deprecated_toolbox_route_serves_sandboxes_without_a_proxy_url() {
    let s = setup().await;
    s.emu.hide_toolbox_proxy_url(true);
    let lease = s.acquire(json!({})).await;
    let id = lease.id().unwrap().to_owned();
    let r = s
        .run(&lease, ExecuteRequest::shell("echo via-api"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "via-api\n");
    let prefix = format!("/toolbox/{id}/toolbox/");
    let requests = s.emu.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path.starts_with(&prefix) && r.path.ends_with("/exec"))
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path.starts_with(&prefix) && r.path.ends_with("/logs"))
    );
    s.release(&lease, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn emulator_answers_the_auxiliary_api_routes() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let id = lease.id().unwrap();
    let client = reqwest::Client::new();
    let base = s.emu.url();
    let auth = format!("Bearer {KEY}");
    let labels: Value = client
        .put(format!("{base}/sandbox/{id}/labels"))
        .header("authorization", &auth)
        .json(&json!({"labels": {"a": "b"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(labels["labels"]["a"], "b");
    let preview: Value = client
        .get(format!("{base}/sandbox/{id}/ports/43127/preview-url"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        preview["url"]
            .as_str()
            .unwrap()
            .starts_with("https://43127-")
    );
    let snap = client
        .post(format!("{base}/sandbox/{id}/snapshot"))
        .header("authorization", &auth)
        .json(&json!({"name": "tpl"}))
        .send()
        .await
        .unwrap();
    assert_eq!(snap.status(), 200);
    assert_eq!(s.emu.sandboxes()[0].state, "snapshotting");
    let got = client
        .get(format!("{base}/snapshots/tpl"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let unauthorized = client
        .get(format!("{base}/sandbox/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.release(&lease, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test]
async fn cached_handle_is_reused_and_a_stale_one_is_refreshed() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let id = lease.id().unwrap().to_owned();
    let first = s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    assert_eq!(first.metadata.unwrap()["cacheHit"], false);
    let second = s.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    assert_eq!(second.metadata.unwrap()["cacheHit"], true);
    // Auto-stopped behind the cached handle: the command never started, so
    // the sandbox is started again and the command runs exactly once.
    s.emu.set_state(&id, "stopped", false, None);
    let execs = s.emu.exec_calls();
    let r = s
        .run(
            &lease,
            ExecuteRequest::shell("echo ran >> count.txt; cat count.txt"),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "ran\n");
    assert_eq!(s.emu.exec_calls(), execs + 2, "one refused exec, one real");
    let starts = s
        .emu
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/start"))
        .count();
    assert_eq!(starts, 1);
    s.release(&lease, json!({})).await.unwrap();
}

#[tokio::test]
async fn released_lease_refuses_commands_until_resumed() {
    let s = setup().await;
    let reuse = json!({"reuseLease": true});
    let lease = s.acquire(reuse.clone()).await;
    // Release waits for the running command instead of cutting it off.
    let (run, released) = tokio::join!(
        s.run(&lease, ExecuteRequest::shell("sleep 0.5; printf finished")),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.release(&lease, reuse.clone()).await
        }
    );
    assert_eq!(run.unwrap().stdout, "finished");
    released.unwrap();
    let output = OutputCollector::buffered();
    let err = s
        .provider
        .execute(
            &s.ctx(reuse.clone()),
            &lease,
            &ExecuteRequest::new("true"),
            &output,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is no longer active"), "{err}");
    assert_eq!(
        s.emu.sandboxes()[0].state,
        "stopped",
        "the refused command must not start the sandbox"
    );
    let resumed = s
        .provider
        .resume(&s.ctx(reuse.clone()), &lease)
        .await
        .unwrap();
    assert!(resumed.provider_lease_id.is_some());
    let output = OutputCollector::buffered();
    s.provider
        .execute(
            &s.ctx(reuse.clone()),
            &lease,
            &ExecuteRequest::new("true"),
            &output,
        )
        .await
        .unwrap();
    s.provider.destroy(&s.ctx(reuse), &lease).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_round_trip_through_the_toolbox_file_api() {
    use paperclip_env_core::workspace::{SyncOptions, TransferMethod, WorkspaceSync};
    let s = setup().await;
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(KEY);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(s.provider.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-w",
        "Daytona",
        "sandbox",
        json!({"provider": "daytona", "apiKey": key_id, "apiUrl": s.emu.url()}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-w"))
        .await
        .unwrap()
        .lease;
    let remote = lease.remote_cwd().unwrap().to_owned();
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join("pkg")).unwrap();
    std::fs::write(local.path().join("pkg/lib.txt"), "v1\n").unwrap();
    let sync = WorkspaceSync::for_lease(&runtime, &env, &lease)
        .await
        .unwrap();
    let up = sync
        .upload(local.path(), &remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(up.method, TransferMethod::Native("daytona-files".into()));
    let cat = runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("cat")
                .arg("pkg/lib.txt")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    assert_eq!(cat.stdout, "v1\n");
    runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("sh")
                .arg("-c")
                .arg("printf v2 > pkg/lib.txt")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    let down = sync
        .download(
            &remote,
            local.path(),
            Some(&up.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(down.method, TransferMethod::Native("daytona-files".into()));
    assert_eq!(
        std::fs::read_to_string(local.path().join("pkg/lib.txt")).unwrap(),
        "v2"
    );
    runtime
        .release_run_leases("run-w", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
}

#[tokio::test]
async fn run_resources_are_found_by_their_run_label() {
    let s = setup().await;
    let mine = s.acquire(json!({})).await;
    let other = s
        .provider
        .acquire(
            &s.ctx(json!({})),
            &AcquireRequest {
                run_id: "run-2".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The host's 30 s default never cuts a default-config acquire short.
    assert!(
        s.provider.default_lease_deadline().unwrap()
            > Duration::from_millis(paperclip_env_providers::daytona::DAYTONA_DEFAULT_TIMEOUT_MS)
    );
    let found = s
        .provider
        .list_run_resources(&s.ctx(json!({})), "run-1")
        .await
        .unwrap();
    let ids: Vec<_> = found.iter().filter_map(|h| h.id()).collect();
    assert_eq!(ids, vec![mine.id().unwrap()]);
    let listed = s
        .emu
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path == "/sandbox")
        .unwrap();
    assert!(listed.query.unwrap().contains("paperclip-run-id"));
    // What the sweep hands back, destroy accepts.
    s.provider
        .destroy(&s.ctx(json!({})), &found[0])
        .await
        .unwrap();
    assert!(
        s.provider
            .list_run_resources(&s.ctx(json!({})), "run-1")
            .await
            .unwrap()
            .is_empty()
    );
    let other = LeaseHandle {
        provider_lease_id: other.provider_lease_id,
        metadata: other.metadata,
        expires_at: None,
    };
    s.release(&other, json!({})).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

/// Issue 26: a Daytona acquisition killed after the create, or answered
/// after its caller's deadline, leaves no sandbox; the API key, given
/// inline, appears in no log, row or Debug output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daytona_passes_the_leak_drills() {
    use paperclip_env_testkit::leak_drills::{LeakDrill, crash_rounds, deadline_rounds};
    let s = setup().await;
    let (live, slow) = (s.emu.clone(), s.emu.clone());
    let drill = LeakDrill::new(
        Arc::new(s.provider.clone()),
        json!({"provider": "daytona", "apiUrl": s.emu.url(), "apiKey": KEY, "target": "us"}),
    )
    .canary(KEY)
    .call_deadline(Duration::from_secs(1))
    .live(move || live.live_sandboxes())
    .slow_create(move |d| slow.set_transition_delay(d.unwrap_or(Duration::from_millis(30))));
    crash_rounds(&drill, 3).await.unwrap();
    deadline_rounds(&drill, 3).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}

/// Issue 26: every call on a held lease returns within the runtime's
/// deadline when the Daytona API stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daytona_calls_on_a_silent_service_return_within_their_deadline() {
    use paperclip_env_testkit::fixtures::silent_proxy::SilentProxy;
    use paperclip_env_testkit::leak_drills::{LeakDrill, silent_service_round};
    let s = setup().await;
    // Toolbox calls then go through the API URL (the proxy) as well.
    s.emu.hide_toolbox_proxy_url(true);
    let upstream: std::net::SocketAddr = s
        .emu
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Arc::new(SilentProxy::start(upstream).await.unwrap());
    let live = s.emu.clone();
    let switch = proxy.clone();
    let drill = LeakDrill::new(
        Arc::new(s.provider.clone()),
        json!({"provider": "daytona", "apiUrl": proxy.url("http"), "apiKey": KEY, "target": "us"}),
    )
    .call_deadline(Duration::from_secs(1))
    .live(move || live.live_sandboxes())
    .silence(move |on| switch.silence(on));
    silent_service_round(&drill).await.unwrap();
    assert_eq!(s.emu.live_sandboxes(), 0);
}
