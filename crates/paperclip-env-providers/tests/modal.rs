//! The Modal provider against the testkit's gRPC emulator: the shared
//! conformance suite, one test per injected fault, config validation,
//! reuse/resume, exec timeouts, stdin and stdio, and secret hygiene.
#![cfg(feature = "modal")]

use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, ExecuteResult, LeaseHandle, LeaseStatus, OutputCollector, ProviderConfig,
    SandboxProvider, WorkspaceSpec,
};
use paperclip_env_modal_proto::api::generic_result::GenericStatus;
use paperclip_env_providers::modal::{ModalProvider, RetryPolicy};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::modal::{Fault, ModalEmulator, Route};
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::Code;

const TOKEN_ID: &str = "ak-emulatortokenid0123456789";
const TOKEN_SECRET: &str = "as-emulatortokensecret9876543210";

struct Harness {
    emulator: Arc<ModalEmulator>,
    provider: ModalProvider,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let emulator = Arc::new(ModalEmulator::start(TOKEN_ID, TOKEN_SECRET).await.unwrap());
        let provider = ModalProvider::builder()
            .server_url(emulator.url())
            .call_timeout(Duration::from_secs(10))
            .retry_policy(RetryPolicy {
                max_retries: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
            })
            .task_id_poll(Duration::from_millis(20))
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        Harness {
            emulator,
            provider,
            dir,
        }
    }

    fn workdir(&self) -> String {
        self.dir.path().join("workspace").display().to_string()
    }

    /// A valid config (tokens in plaintext; `ctx` turns them into secrets).
    fn config(&self, extra: Value) -> Value {
        let mut config = json!({
            "appName": "paperclip-tests", "image": "node:20",
            "tokenId": TOKEN_ID, "tokenSecret": TOKEN_SECRET,
            "workdir": self.workdir(), "sandboxTimeoutMs": 600000,
        });
        if let (Some(base), Value::Object(extra)) = (config.as_object_mut(), extra) {
            base.extend(extra);
        }
        config
    }

    fn ctx(&self, extra: Value) -> CallContext {
        let values = self.config(extra).as_object().cloned().unwrap_or_default();
        let mut config = ProviderConfig::new(values.clone());
        for key in ["tokenId", "tokenSecret"] {
            if let Some(Value::String(v)) = values.get(key) {
                config = config.with_secret(key, SecretString::from(v.clone()));
            }
        }
        CallContext {
            company_id: Some("company-1".into()),
            environment_id: "env-1".into(),
            issue_id: None,
            config,
        }
    }

    async fn acquire(&self, extra: Value) -> paperclip_env_core::Result<LeaseHandle> {
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

    async fn run(
        &self,
        lease: &LeaseHandle,
        request: ExecuteRequest,
    ) -> paperclip_env_core::Result<ExecuteResult> {
        let output = OutputCollector::buffered();
        let exit = self
            .provider
            .execute(&self.ctx(json!({})), lease, &request, &output)
            .await?;
        Ok(output.finish(exit))
    }
}

fn fixture(h: &Harness) -> Fixture {
    let e = &h.emulator;
    let (live, creates, starts) = (e.clone(), e.clone(), e.clone());
    let (fa, fe, fr) = (e.clone(), e.clone(), e.clone());
    Fixture::new(Arc::new(h.provider.clone()))
        .config(h.config(json!({})))
        .invalid_config(json!({"appName": " ", "image": "node:20", "tokenId": TOKEN_ID, "tokenSecret": TOKEN_SECRET}))
        .secret_value(TOKEN_ID)
        .secret_value(TOKEN_SECRET)
        .live_resources(move || live.live_sandboxes())
        .create_calls(move || creates.create_calls())
        .execute_calls(move || starts.exec_starts())
        // The sandbox exists, then its start-up poll is refused.
        .fail_next_acquire(move || fa.inject(Route::SandboxGetTaskId, Fault::Status(Code::PermissionDenied), 1))
        // Transient start failures are retried with the same exec id; a
        // refusal is not.
        .fail_next_execute(move || fe.inject(Route::TaskExecStart, Fault::Status(Code::PermissionDenied), 1))
        // Four failures outlast the three retries of the idempotent terminate.
        .fail_next_release(move || fr.inject(Route::SandboxTerminate, Fault::Status(Code::Unavailable), 4))
        .call_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modal_passes_conformance() {
    let h = Harness::start().await;
    let report = conformance::run(&fixture(&h)).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert!(
        report
            .skipped()
            .iter()
            .all(|id| ["A6.14", "A7.2"].contains(id)),
        "unexpected skips: {:?}",
        report.skipped()
    );
    assert_eq!(
        h.emulator.live_sandboxes(),
        0,
        "conformance left sandboxes running: {:?}",
        h.emulator.sandboxes()
    );
}

fn error_of<T: std::fmt::Debug>(r: paperclip_env_core::Result<T>) -> Error {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn wire_shape_of_create_tags_and_exec() {
    let h = Harness::start().await;
    let lease = h
        .acquire(
            json!({"idleTimeoutMs": "30000", "blockNetwork": true, "sandboxTimeoutMs": 120000}),
        )
        .await
        .unwrap();
    let id = lease.id().unwrap().to_owned();
    let sandbox = h.emulator.sandbox(&id).unwrap();
    assert_eq!(sandbox.timeout_secs, 120);
    assert_eq!(sandbox.idle_timeout_secs, Some(30));
    assert_eq!(sandbox.workdir.as_deref(), Some(h.workdir().as_str()));
    assert_eq!(sandbox.network_access_type, 2, "BLOCKED");
    assert_eq!(
        sandbox.tags.get("paperclip-provider").map(String::as_str),
        Some("modal")
    );
    assert_eq!(
        sandbox.tags.get("paperclip-run-id").map(String::as_str),
        Some("run-1")
    );
    assert_eq!(
        sandbox
            .tags
            .get("paperclip-reuse-lease")
            .map(String::as_str),
        Some("false")
    );
    assert_eq!(
        sandbox.tags.get("paperclip-company-id").map(String::as_str),
        Some("company-1")
    );
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["provider"], "modal");
    assert_eq!(md["shellCommand"], "sh");
    assert_eq!(md["remoteCwd"], json!(h.workdir()));
    assert_eq!(md["resumedLease"], false);
    assert_eq!(md["idleTimeoutMs"], 30000);

    let r = h
        .run(
            &lease,
            ExecuteRequest::new("printf").arg("hi").timeout_ms(4500),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "hi"));
    let execs = h.emulator.execs();
    let last = execs
        .iter()
        .find(|e| e.argv.last().is_some_and(|s| s.ends_with("'printf' 'hi'")))
        .unwrap();
    assert_eq!(&last.argv[..2], ["sh", "-lc"]);
    assert_eq!(
        (last.stdout_config, last.stderr_config),
        (1, 1),
        "PIPE is set explicitly"
    );
    assert_eq!(
        last.timeout_secs,
        Some(4),
        "caller timeouts round down to whole seconds"
    );
    assert!(last.stdin_closed, "stdin is always closed");
    assert!(last.argv[2].contains(&format!("cd '{}'", h.workdir())));

    let calls = h.emulator.calls();
    assert_eq!(
        calls.iter().filter(|c| c.rpc == "AuthTokenGet").count(),
        1,
        "one auth session is shared"
    );
    for call in calls.iter().filter(|c| !c.rpc.starts_with("TaskExec")) {
        assert_eq!(call.client_type.as_deref(), Some("8"), "{call:?}");
        assert_eq!(call.client_version.as_deref(), Some("1.0.0"));
        assert!(call.authorized, "{call:?}");
        assert_eq!(call.had_auth_token, call.rpc != "AuthTokenGet", "{call:?}");
        assert!(call.idempotency_key.is_some());
    }
    for call in calls.iter().filter(|c| c.rpc.starts_with("TaskExec")) {
        assert!(
            call.authorized && !call.had_auth_token,
            "router calls carry only the bearer JWT: {call:?}"
        );
    }
    h.provider
        .release(&h.ctx(json!({})), &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn cidr_allowlist_and_default_network() {
    let h = Harness::start().await;
    let lease = h
        .acquire(json!({"cidrAllowlist": ["10.0.0.0/8", " "]}))
        .await
        .unwrap();
    let sandbox = h.emulator.sandbox(lease.id().unwrap()).unwrap();
    assert_eq!(sandbox.network_access_type, 3, "ALLOWLIST");
    assert_eq!(sandbox.allowed_cidrs, ["10.0.0.0/8"]);
    assert_eq!(
        sandbox.idle_timeout_secs, None,
        "no idle timeout unless asked or reused"
    );
    let open = h.acquire(json!({})).await.unwrap();
    assert_eq!(
        h.emulator
            .sandbox(open.id().unwrap())
            .unwrap()
            .network_access_type,
        1,
        "OPEN"
    );
    for l in [lease, open] {
        h.provider.destroy(&h.ctx(json!({})), &l).await.unwrap();
    }
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn config_validation_names_fields() {
    let h = Harness::start().await;
    let v = h
        .provider
        .validate_config(&json!({"appName": "", "image": "", "sandboxTimeoutMs": 1500, "idleTimeoutMs": 1500,
            "execTimeoutMs": 0, "blockNetwork": true, "cidrAllowlist": ["1.2.3.4/32"], "tokenId": "only-id"})
            .as_object().cloned().unwrap())
        .await
        .unwrap();
    assert!(!v.ok);
    let fields: Vec<_> = v.errors.iter().map(|i| i.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "appName",
            "image",
            "sandboxTimeoutMs",
            "idleTimeoutMs",
            "execTimeoutMs",
            "cidrAllowlist",
            "tokenSecret"
        ]
    );
    for bad in [
        json!({"sandboxTimeoutMs": 86_401_000}),
        json!({"sandboxTimeoutMs": 0}),
        json!({"workdir": "relative/dir"}),
        json!({"execTimeoutMs": 2500}),
        json!({"tokenSecret": null}),
    ] {
        let v = h
            .provider
            .validate_config(h.config(bad.clone()).as_object().unwrap())
            .await
            .unwrap();
        assert!(!v.ok, "{bad} should be rejected");
    }
    let v = h
        .provider
        .validate_config(
            h.config(json!({"sandboxTimeoutMs": "86400000"}))
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(v.ok, "{:?}", v.errors);
    let normalized = v.normalized_config.unwrap();
    assert_eq!(normalized["sandboxTimeoutMs"], 86_400_000);
    assert_eq!(normalized.len(), 12);
    let schema = h.provider.config_schema().to_string();
    assert!(schema.contains("secret-ref"), "{schema}");

    // The runtime guard refuses one token without calling Modal.
    let only_id = h.acquire(json!({"tokenSecret": null})).await;
    match error_of(only_id) {
        Error::InvalidConfig { field, message, .. } => {
            assert_eq!(field, "tokenSecret");
            assert_eq!(
                message,
                "Modal sandbox environments require both tokenId and tokenSecret to be configured."
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        h.emulator.calls().is_empty(),
        "no RPC before both tokens are known"
    );
}

#[tokio::test]
async fn wrong_token_is_unauthenticated_without_retries() {
    let h = Harness::start().await;
    let e = error_of(h.acquire(json!({"tokenSecret": "as-wrong"})).await);
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    assert!(!e.to_string().contains("as-wrong"));
    assert_eq!(h.emulator.calls().len(), 1, "UNAUTHENTICATED is final");
    let probe = h
        .provider
        .probe(&h.ctx(json!({"tokenSecret": "as-wrong"})))
        .await
        .unwrap();
    assert!(!probe.ok);
    assert_eq!(
        probe.summary.as_deref(),
        Some("Modal sandbox probe failed.")
    );
    assert_eq!(h.emulator.live_sandboxes(), 0);
    // An injected UNAUTHENTICATED on a later call is final too.
    let lease = h.acquire(json!({})).await.unwrap();
    h.emulator
        .inject(Route::SandboxWait, Fault::Status(Code::Unauthenticated), 1);
    let e = error_of(h.run(&lease, ExecuteRequest::new("true")).await);
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn unavailable_is_retried_with_the_same_idempotency_key() {
    let h = Harness::start().await;
    h.emulator
        .inject(Route::AppGetOrCreate, Fault::Status(Code::Unavailable), 2);
    let lease = h.acquire(json!({})).await.unwrap();
    let attempts: Vec<_> = h
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.rpc == "AppGetOrCreate")
        .collect();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|c| c.idempotency_key == attempts[0].idempotency_key)
    );
    let numbers: Vec<_> = attempts
        .iter()
        .map(|c| c.retry_attempt.clone().unwrap_or_default())
        .collect();
    assert_eq!(numbers, ["0", "1", "2"]);

    h.emulator
        .inject(Route::AppGetOrCreate, Fault::Status(Code::Unavailable), 4);
    let e = error_of(h.acquire(json!({})).await);
    assert!(
        e.is_retryable(),
        "UNAVAILABLE maps to a retryable provider error: {e:?}"
    );
    assert_eq!(h.emulator.live_sandboxes(), 1);

    // Sandbox create is repeated with its idempotency key, as Modal's SDKs do.
    let creates = h.emulator.create_calls();
    h.emulator
        .inject(Route::SandboxCreate, Fault::Status(Code::Unavailable), 1);
    let second = h.acquire(json!({})).await.unwrap();
    assert_eq!(h.emulator.create_calls(), creates + 2);
    let keys: Vec<_> = h
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.rpc == "SandboxCreate")
        .skip(creates)
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
    assert_eq!(h.emulator.live_sandboxes(), 2);
    h.provider
        .destroy(&h.ctx(json!({})), &second)
        .await
        .unwrap();
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn expired_sandbox_is_not_found_everywhere() {
    let h = Harness::start().await;
    let ctx = h.ctx(json!({"reuseLease": true}));
    let lease = h.acquire(json!({"reuseLease": true})).await.unwrap();
    h.provider
        .release(&ctx, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    h.emulator.expire(lease.id().unwrap());
    let resumed = h.provider.resume(&ctx, &lease).await.unwrap();
    assert_eq!(resumed.provider_lease_id, None);
    assert_eq!(resumed.metadata.unwrap()["expired"], true);
    let e = error_of(h.run(&lease, ExecuteRequest::new("true")).await);
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.to_string(), "Modal sandbox lease is no longer available.");
    h.provider
        .release(&ctx, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    h.provider.destroy(&ctx, &lease).await.unwrap();

    // Finished but still known (its lifetime ran out): also expired.
    let lease = h.acquire(json!({"reuseLease": true})).await.unwrap();
    h.provider
        .release(&ctx, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    h.emulator.time_out(lease.id().unwrap());
    let resumed = h.provider.resume(&ctx, &lease).await.unwrap();
    assert_eq!(resumed.provider_lease_id, None);
}

#[tokio::test]
async fn reuse_lease_detaches_and_reattaches_with_an_idle_timeout() {
    let h = Harness::start().await;
    let ctx = h.ctx(json!({"reuseLease": true}));
    let lease = h.acquire(json!({"reuseLease": true})).await.unwrap();
    let id = lease.id().unwrap().to_owned();
    assert_eq!(
        h.emulator.sandbox(&id).unwrap().idle_timeout_secs,
        Some(600),
        "the cost guard is set"
    );
    h.run(&lease, ExecuteRequest::shell("printf kept > marker.txt"))
        .await
        .unwrap();
    h.provider
        .release(&ctx, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(
        h.emulator.live_sandboxes(),
        1,
        "reuseLease keeps the sandbox running"
    );
    assert!(
        !h.emulator
            .calls()
            .iter()
            .any(|c| c.rpc == "SandboxTerminate")
    );

    let resumed = h.provider.resume(&ctx, &lease).await.unwrap();
    assert_eq!(resumed.provider_lease_id.as_deref(), Some(id.as_str()));
    assert_eq!(resumed.metadata.as_ref().unwrap()["resumedLease"], true);
    assert_eq!(
        resumed.metadata.as_ref().unwrap()["paperclipRunId"],
        "run-1"
    );
    let r = h
        .run(&lease, ExecuteRequest::new("cat").arg("marker.txt"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "kept");

    // Without reuse, release terminates.
    let plain = h.acquire(json!({})).await.unwrap();
    h.provider
        .release(&h.ctx(json!({})), &plain, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(
        h.emulator.sandbox(plain.id().unwrap()).unwrap().finished,
        Some(GenericStatus::Terminated)
    );
    h.provider.destroy(&ctx, &lease).await.unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn idle_timeout_stops_a_detached_sandbox() {
    let h = Harness::start().await;
    let ctx = h.ctx(json!({"reuseLease": true, "idleTimeoutMs": 1000}));
    let lease = h
        .acquire(json!({"reuseLease": true, "idleTimeoutMs": 1000}))
        .await
        .unwrap();
    h.provider
        .release(&ctx, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    let id = lease.id().unwrap().to_owned();
    assert!(
        eventually(
            || h.emulator.sandbox(&id).and_then(|s| s.finished) == Some(GenericStatus::IdleTimeout)
        )
        .await,
        "{:?}",
        h.emulator.sandbox(&id)
    );
    let resumed = h.provider.resume(&ctx, &lease).await.unwrap();
    assert_eq!(
        resumed.provider_lease_id, None,
        "an idle-stopped sandbox leads to a fresh one"
    );
}

#[tokio::test]
async fn slow_image_build_streams_progress_and_reopens() {
    let (logs, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let h = Harness::start().await;
    h.emulator.inject(
        Route::ImageGetOrCreate,
        Fault::SlowImageBuild(Duration::from_millis(600)),
        1,
    );
    h.emulator
        .inject(Route::ImageJoinStreaming, Fault::EndStreamEarly(1), 1);
    let lease = h.acquire(json!({})).await.unwrap();
    let entries = h.emulator.join_entry_ids();
    assert!(
        entries.len() >= 2,
        "the early-ended stream was reopened: {entries:?}"
    );
    assert_eq!(entries[0], "");
    assert_eq!(entries[1], "entry-1", "reopened from the last entry id");
    let text = logs.text();
    assert!(text.contains("waiting for the Modal image build"), "{text}");
    assert!(text.contains("image build progress"));
    // The built image is cached: a second acquire skips ImageGetOrCreate.
    let before = h
        .emulator
        .calls()
        .iter()
        .filter(|c| c.rpc == "ImageGetOrCreate")
        .count();
    let second = h.acquire(json!({})).await.unwrap();
    assert_eq!(
        h.emulator
            .calls()
            .iter()
            .filter(|c| c.rpc == "ImageGetOrCreate")
            .count(),
        before
    );
    for l in [lease, second] {
        h.provider.destroy(&h.ctx(json!({})), &l).await.unwrap();
    }
}

#[tokio::test]
async fn failed_image_build_creates_nothing() {
    let h = Harness::start().await;
    h.emulator.inject(
        Route::ImageGetOrCreate,
        Fault::ImageBuildFails("no such image".into()),
        1,
    );
    let e = error_of(h.acquire(json!({"image": "does-not-exist:1"})).await);
    assert!(
        e.to_string()
            .contains("failed with the exception:\nno such image"),
        "{e}"
    );
    assert_eq!(h.emulator.create_calls(), 0);
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn stdio_stream_cut_early_resumes_at_the_offset() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    // Cut both streams mid-character: "é" and "☃" are multi-byte.
    h.emulator
        .inject(Route::TaskExecStdioRead, Fault::EndStreamEarly(3), 2);
    let r = h
        .run(
            &lease,
            ExecuteRequest::shell("printf 'aé☃bcdefgh'; printf 'eé☃rr' >&2"),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, "aé☃bcdefgh", "no byte lost or duplicated");
    assert_eq!(r.stderr, "eé☃rr");
    let reads = h
        .emulator
        .calls()
        .iter()
        .filter(|c| c.rpc == "TaskExecStdioRead")
        .count();
    assert!(reads >= 4, "both streams were reopened ({reads} reads)");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn large_stdout_and_stderr_stay_separate_and_ordered() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    let r = h
        .run(&lease, ExecuteRequest::shell("i=0; while [ $i -lt 3000 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done"))
        .await
        .unwrap();
    let expected = |p: &str| (0..3000).map(|i| format!("{p} {i}\n")).collect::<String>();
    assert_eq!(r.stdout, expected("out"));
    assert_eq!(r.stderr, expected("err"));
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

fn count(h: &Harness, rpc: &str) -> usize {
    h.emulator.calls().iter().filter(|c| c.rpc == rpc).count()
}

#[tokio::test]
async fn router_unauthenticated_refreshes_the_jwt_only_near_expiry() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    // A JWT far from expiry is not refreshed: the call is repeated once.
    let before = count(&h, "TaskGetCommandRouterAccess");
    h.emulator.inject(
        Route::TaskExecStart,
        Fault::Status(Code::Unauthenticated),
        1,
    );
    let r = h
        .run(&lease, ExecuteRequest::new("printf").arg("ok"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "ok");
    assert_eq!(count(&h, "TaskGetCommandRouterAccess"), before);
    h.emulator.inject(
        Route::TaskExecStart,
        Fault::Status(Code::Unauthenticated),
        2,
    );
    let e = error_of(h.run(&lease, ExecuteRequest::new("true")).await);
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();

    // A JWT within 30 s of expiry is refreshed once; a moved router URL
    // is a warning, not a failed call.
    h.emulator.set_router_token_ttl(Duration::from_secs(10));
    let lease = h.acquire(json!({})).await.unwrap();
    let before = count(&h, "TaskGetCommandRouterAccess");
    h.emulator.inject(
        Route::TaskExecStart,
        Fault::Status(Code::Unauthenticated),
        1,
    );
    h.emulator.inject(
        Route::TaskGetCommandRouterAccess,
        Fault::RouterUrlChanged,
        1,
    );
    let r = h
        .run(&lease, ExecuteRequest::new("printf").arg("moved"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "moved");
    assert_eq!(count(&h, "TaskGetCommandRouterAccess"), before + 1);
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_exec_fallback_passes_conformance() {
    let h = Harness::start().await;
    h.emulator.set_command_router_enabled(false);
    let fe = h.emulator.clone();
    let fixture = fixture(&h).fail_next_execute(move || {
        fe.inject(Route::ContainerExec, Fault::Status(Code::Unavailable), 1)
    });
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    // Legacy exec reports signals as 128 + n exit codes: the SHOULD line A6.12 only warns.
    assert!(!report.passed().contains(&"A6.12"));
    assert_eq!(h.emulator.live_sandboxes(), 0);
    let calls = h.emulator.calls();
    assert!(calls.iter().any(|c| c.rpc == "ContainerExec"));
    assert!(
        !calls.iter().any(|c| c.rpc.starts_with("TaskExec")),
        "the router was never used"
    );
}

#[tokio::test]
async fn legacy_exec_streams_stdin_output_and_timeouts() {
    let h = Harness::start().await;
    h.emulator.set_command_router_enabled(false);
    let lease = h.acquire(json!({})).await.unwrap();
    let r = h
        .run(
            &lease,
            ExecuteRequest::new("cat")
                .stdin("legacy ☃\n")
                .timeout_ms(5000),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "legacy ☃\n"));
    // An output stream that ends early is reopened from the last batch index.
    h.emulator
        .inject(Route::ContainerExecGetOutput, Fault::EndStreamEarly(2), 2);
    let r = h
        .run(
            &lease,
            ExecuteRequest::shell("printf 'abcdefé'; printf 'xyz' >&2; exit 4"),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (Some(4), "abcdefé", "xyz")
    );
    let r = h
        .run(
            &lease,
            ExecuteRequest::shell("printf early; sleep 30").timeout_ms(1000),
        )
        .await
        .unwrap();
    assert!(r.timed_out && r.exit_code.is_none(), "{r:?}");
    assert_eq!(r.stdout, "early");
    let id = lease.id().unwrap().to_owned();
    assert!(
        eventually(|| h
            .emulator
            .sandbox(&id)
            .is_some_and(|s| s.running_processes == 0))
        .await
    );
    let exec = h
        .emulator
        .execs()
        .into_iter()
        .find(|e| e.argv[2].contains("sleep 30"))
        .unwrap();
    assert_eq!(
        (exec.stdout_config, exec.stderr_config),
        (2, 2),
        "legacy PIPE is 2"
    );
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn exec_timeout_reports_timed_out_and_kills_the_process() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    let r = h
        .run(
            &lease,
            ExecuteRequest::shell("printf started; sleep 30").timeout_ms(1000),
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.exit_code, None);
    assert_eq!(r.stdout, "started", "partial output is kept");
    let id = lease.id().unwrap().to_owned();
    assert!(
        eventually(|| h
            .emulator
            .sandbox(&id)
            .is_some_and(|s| s.running_processes == 0))
        .await,
        "the timed-out process is still running"
    );
    let killed = h
        .emulator
        .execs()
        .into_iter()
        .find(|e| e.argv[2].contains("sleep 30"))
        .unwrap();
    assert_eq!(killed.timeout_secs, Some(1));
    assert_eq!(killed.exit, Some(Err(9)), "killed with SIGKILL");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn stdin_is_written_then_closed() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    let r = h
        .run(
            &lease,
            ExecuteRequest::new("cat")
                .stdin("line one\nline two ☃\n")
                .timeout_ms(5000),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "line one\nline two ☃\n");
    let exec = h
        .emulator
        .execs()
        .into_iter()
        .find(|e| e.argv[2].ends_with("'cat'"))
        .unwrap();
    assert_eq!(exec.stdin_bytes, "line one\nline two ☃\n".len());
    assert!(exec.stdin_closed);
    // A refused stdin write does not fail a command that already ended.
    h.emulator.inject(
        Route::TaskExecStdinWrite,
        Fault::Status(Code::FailedPrecondition),
        1,
    );
    let r = h
        .run(
            &lease,
            ExecuteRequest::new("printf").arg("done").stdin("ignored"),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "done"));
    // A command that ignores stdin and exits fast still succeeds.
    let r = h
        .run(
            &lease,
            ExecuteRequest::new("true").stdin("x".repeat(100_000)),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn mkdir_failure_terminates_on_acquire_but_only_detaches_on_resume() {
    let h = Harness::start().await;
    let e = error_of(h.acquire(json!({"workdir": "/dev/null/not-a-dir"})).await);
    assert!(
        e.to_string()
            .contains("Failed to create remote workspace directory '/dev/null/not-a-dir'"),
        "{e}"
    );
    assert_eq!(h.emulator.create_calls(), 1);
    assert_eq!(h.emulator.live_sandboxes(), 0, "the sandbox was terminated");

    let lease = h.acquire(json!({"reuseLease": true})).await.unwrap();
    let bad = h.ctx(json!({"reuseLease": true, "workdir": "/dev/null/not-a-dir"}));
    assert!(h.provider.resume(&bad, &lease).await.is_err());
    assert_eq!(
        h.emulator.live_sandboxes(),
        1,
        "a reusable sandbox is never terminated by resume"
    );
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn tag_failure_does_not_fail_acquire() {
    let h = Harness::start().await;
    h.emulator.inject(
        Route::SandboxTagsSet,
        Fault::Status(Code::PermissionDenied),
        1,
    );
    let lease = h.acquire(json!({})).await.unwrap();
    assert!(
        h.emulator
            .sandbox(lease.id().unwrap())
            .unwrap()
            .tags
            .is_empty()
    );
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn probe_reports_and_leaves_nothing_behind() {
    let h = Harness::start().await;
    let probe = h.provider.probe(&h.ctx(json!({}))).await.unwrap();
    assert!(probe.ok, "{probe:?}");
    assert_eq!(
        probe.summary.as_deref(),
        Some("Connected to Modal sandbox in app paperclip-tests.")
    );
    assert_eq!(probe.metadata.unwrap()["remoteCwd"], json!(h.workdir()));
    assert_eq!(h.emulator.live_sandboxes(), 0);
    assert!(
        h.emulator
            .execs()
            .iter()
            .any(|e| e.argv[2] == "printf paperclip-probe")
    );
}

#[tokio::test]
async fn realize_creates_the_preferred_cwd() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    let target = h.dir.path().join("elsewhere").display().to_string();
    let workspace = WorkspaceSpec {
        remote_path: Some(target.clone()),
        ..Default::default()
    };
    let mut no_cwd = lease.clone();
    no_cwd.metadata = None;
    let realized = h
        .provider
        .realize_workspace(&h.ctx(json!({})), &no_cwd, &workspace)
        .await
        .unwrap();
    assert_eq!(realized.cwd, target);
    assert!(std::path::Path::new(&target).is_dir());
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn secrets_never_reach_logs_metadata_errors_or_debug() {
    let (logs, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let h = Harness::start().await;
    let secrets = Arc::new(InMemorySecretResolver::new());
    let id_ref = secrets.insert(TOKEN_ID);
    let secret_ref = secrets.insert(TOKEN_SECRET);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(h.provider.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-s",
        "Modal",
        "sandbox",
        json!({"provider": "modal", "appName": "paperclip-tests", "image": "node:20",
               "tokenId": id_ref, "tokenSecret": secret_ref, "workdir": h.workdir()}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-s"))
        .await
        .unwrap()
        .lease;
    let r = runtime
        .execute(&env, &lease, &ExecuteRequest::new("cat").stdin("input"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "input");
    h.emulator
        .inject(Route::SandboxTerminate, Fault::Status(Code::Unavailable), 4);
    let failed = runtime
        .release_run_leases("run-s", LeaseStatus::Released)
        .await;
    let released = failed.into_result().unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(paperclip_env_core::CleanupStatus::Failed),
        "the failed terminate is recorded"
    );
    assert!(
        released[0]
            .lease
            .cleanup_error()
            .is_some_and(|e| e.contains("SandboxTerminate"))
    );
    let error_text = format!("{released:?}");
    assert!(!error_text.contains(TOKEN_SECRET) && !error_text.contains(TOKEN_ID));
    h.provider
        .destroy(
            &h.ctx(json!({})),
            &LeaseHandle {
                provider_lease_id: lease.provider_lease_id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let bad = error_of(
        h.acquire(json!({"tokenSecret": "as-wrong-but-secret"}))
            .await,
    );
    assert!(!format!("{bad:?} {bad}").contains("as-wrong-but-secret"));

    let text = logs.text();
    assert!(text.contains("modal"), "the capture saw the provider");
    assert!(
        text.contains("h2::") || text.contains("hyper"),
        "the capture saw the transport"
    );
    for secret in [TOKEN_ID, TOKEN_SECRET, "emulator\"", "Bearer "] {
        assert!(!text.contains(secret), "a log line carries {secret}");
    }
    assert!(
        !serde_json::to_string(&lease)
            .unwrap()
            .contains(TOKEN_SECRET)
    );
    assert!(!format!("{:?}", h.provider).contains(TOKEN_SECRET));
    let config =
        paperclip_env_providers::modal::ModalConfig::from_provider_config(&h.ctx(json!({})).config);
    let debug = format!("{config:?}");
    assert!(
        !debug.contains(TOKEN_SECRET) && !debug.contains(TOKEN_ID),
        "{debug}"
    );
}

#[tokio::test]
async fn short_lived_auth_tokens_are_refreshed() {
    let h = Harness::start().await;
    // Tokens within 5 minutes of expiry are refreshed before use.
    h.emulator.set_auth_token_ttl(Duration::from_secs(120));
    let lease = h.acquire(json!({})).await.unwrap();
    h.run(&lease, ExecuteRequest::new("true")).await.unwrap();
    let calls = h.emulator.calls();
    let tokens = calls.iter().filter(|c| c.rpc == "AuthTokenGet").count();
    let control = calls
        .iter()
        .filter(|c| !c.rpc.starts_with("TaskExec") && c.rpc != "AuthTokenGet")
        .count();
    assert_eq!(
        tokens, control,
        "every control-plane call got a fresh token"
    );
    assert!(calls.iter().all(|c| c.authorized), "{calls:?}");
    h.emulator.set_auth_token_ttl(Duration::from_secs(3600));
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn sandbox_lifetime_ends_the_sandbox() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({"sandboxTimeoutMs": 2000})).await.unwrap();
    let id = lease.id().unwrap().to_owned();
    assert_eq!(h.emulator.sandbox(&id).unwrap().timeout_secs, 2);
    assert!(
        eventually(
            || h.emulator.sandbox(&id).and_then(|s| s.finished) == Some(GenericStatus::Timeout)
        )
        .await,
        "{:?}",
        h.emulator.sandbox(&id)
    );
    let e = error_of(h.run(&lease, ExecuteRequest::new("true")).await);
    assert!(e.is_not_found(), "{e:?}");
    // Release of a finished sandbox is a no-op, not an error.
    h.provider
        .release(&h.ctx(json!({})), &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn https_to_a_plaintext_server_fails_with_a_typed_error() {
    let h = Harness::start().await;
    let tls = ModalProvider::builder()
        .server_url(h.emulator.url().replace("http://", "https://"))
        .retry_policy(RetryPolicy {
            max_retries: 1,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        })
        .call_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = error_of(
        tls.acquire(
            &h.ctx(json!({})),
            &AcquireRequest {
                run_id: "run-tls".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await,
    );
    assert!(
        matches!(e, Error::Provider { .. } | Error::Timeout { .. }),
        "{e:?}"
    );
    assert!(!e.to_string().contains(TOKEN_SECRET));
    assert!(
        h.emulator.calls().is_empty(),
        "no gRPC call got through without TLS"
    );
    assert!(
        ModalProvider::builder()
            .server_url("ftp://x")
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn a_cancelled_acquire_terminates_its_half_made_sandbox() {
    let h = Harness::start().await;
    // The sandbox never becomes ready, so acquire runs into its deadline.
    h.emulator.set_task_id_polls(usize::MAX);
    let slow = ModalProvider::builder()
        .server_url(h.emulator.url())
        .task_id_poll(Duration::from_millis(20))
        .acquire_timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    let e = error_of(
        slow.acquire(
            &h.ctx(json!({})),
            &AcquireRequest {
                run_id: "run-cancel".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await,
    );
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(h.emulator.create_calls(), 1);
    assert!(
        eventually(|| h.emulator.live_sandboxes() == 0).await,
        "the half-made sandbox was left running: {:?}",
        h.emulator.sandboxes()
    );
    assert_eq!(
        h.emulator.sandboxes()[0].finished,
        Some(GenericStatus::Terminated)
    );
}

#[tokio::test]
async fn an_empty_auth_token_is_a_clear_error() {
    let h = Harness::start().await;
    h.emulator
        .inject(Route::AuthTokenGet, Fault::EmptyAuthToken, 1);
    let e = error_of(h.acquire(json!({})).await);
    assert!(
        e.to_string()
            .contains("did not receive auth token from server"),
        "{e}"
    );
    assert_eq!(
        h.emulator.calls().len(),
        1,
        "nothing is called without a token"
    );
    // The next call fetches a token again and succeeds.
    let lease = h.acquire(json!({})).await.unwrap();
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn a_throttled_create_waits_and_succeeds() {
    let h = Harness::start().await;
    h.emulator.inject(
        Route::SandboxCreate,
        Fault::Throttle(Duration::from_millis(150)),
        2,
    );
    let lease = h.acquire(json!({})).await.unwrap();
    let creates: Vec<_> = h
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.rpc == "SandboxCreate")
        .collect();
    assert_eq!(creates.len(), 3, "{creates:?}");
    let throttle: Vec<_> = creates
        .iter()
        .map(|c| c.throttle_retry_attempt.clone().unwrap_or_default())
        .collect();
    assert_eq!(throttle, ["0", "1", "2"]);
    assert!(
        creates
            .iter()
            .all(|c| c.idempotency_key == creates[0].idempotency_key
                && c.retry_attempt.as_deref() == Some("0")),
        "throttling is not a transient retry: {creates:?}"
    );
    assert_eq!(h.emulator.sandboxes().len(), 1);
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();

    // A throttle longer than the provider will wait fails with the server's wait.
    let impatient = ModalProvider::builder()
        .server_url(h.emulator.url())
        .task_id_poll(Duration::from_millis(20))
        .max_throttle_wait(Duration::from_millis(200))
        .build()
        .unwrap();
    h.emulator.inject(
        Route::SandboxCreate,
        Fault::Throttle(Duration::from_secs(5)),
        1,
    );
    let e = error_of(
        impatient
            .acquire(
                &h.ctx(json!({})),
                &AcquireRequest {
                    run_id: "run-throttled".into(),
                    workspace_mode: None,
                    ..Default::default()
                },
            )
            .await,
    );
    match e {
        Error::RateLimited { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(5)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(h.emulator.sandboxes().len(), 1, "nothing more was created");
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_leaves_exactly_one_sandbox() {
    let h = Harness::start().await;
    h.emulator
        .inject(Route::SandboxCreate, Fault::ResponseLost, 1);
    let lease = h.acquire(json!({})).await.unwrap();
    assert_eq!(
        h.emulator.create_calls(),
        2,
        "the lost answer was asked again"
    );
    let sandboxes = h.emulator.sandboxes();
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    assert_eq!(
        lease.provider_lease_id.as_deref(),
        Some(sandboxes[0].id.as_str())
    );
    assert_eq!(
        sandboxes[0]
            .tags
            .get("paperclip-run-id")
            .map(String::as_str),
        Some("run-1")
    );
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn an_exec_start_whose_answer_is_lost_runs_once() {
    let h = Harness::start().await;
    let lease = h.acquire(json!({})).await.unwrap();
    let starts = h.emulator.exec_starts();
    h.emulator
        .inject(Route::TaskExecStart, Fault::ResponseLost, 1);
    let marker = h.dir.path().join("runs");
    let script = format!("echo run >> '{}'; printf once", marker.display());
    let r = h
        .run(&lease, ExecuteRequest::new("sh").arg("-c").arg(script))
        .await
        .unwrap();
    assert_eq!(r.stdout, "once");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(
        h.emulator.exec_starts(),
        starts + 2,
        "the start was retried"
    );
    let started: Vec<_> = h
        .emulator
        .execs()
        .into_iter()
        .filter(|e| e.argv.iter().any(|a| a.contains("printf once")))
        .collect();
    assert_eq!(started.len(), 1, "one exec id, one process: {started:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn a_slow_create_is_not_cut_by_the_call_deadline() {
    let h = Harness::start().await;
    // Each call may take 300 ms, the create takes longer: only the acquire
    // deadline bounds it.
    let provider = ModalProvider::builder()
        .server_url(h.emulator.url())
        .call_timeout(Duration::from_millis(300))
        .task_id_poll(Duration::from_millis(20))
        .build()
        .unwrap();
    h.emulator.inject(
        Route::SandboxCreate,
        Fault::SlowCreate(Duration::from_millis(900)),
        1,
    );
    let ctx = h.ctx(json!({}));
    let lease = provider
        .acquire(
            &ctx,
            &AcquireRequest {
                run_id: "run-slow".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h.emulator.create_calls(), 1);
    let handle = LeaseHandle {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
        expires_at: None,
    };
    provider.destroy(&ctx, &handle).await.unwrap();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn a_create_that_outlives_its_acquire_is_terminated() {
    let h = Harness::start().await;
    let slow = ModalProvider::builder()
        .server_url(h.emulator.url())
        .task_id_poll(Duration::from_millis(20))
        .acquire_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    h.emulator.inject(
        Route::SandboxCreate,
        Fault::SlowCreate(Duration::from_millis(1200)),
        1,
    );
    let e = error_of(
        slow.acquire(
            &h.ctx(json!({})),
            &AcquireRequest {
                run_id: "run-outlived".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await,
    );
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(
        eventually(|| h.emulator.sandboxes().len() == 1 && h.emulator.live_sandboxes() == 0).await,
        "the late sandbox was left running: {:?}",
        h.emulator.sandboxes()
    );
    assert_eq!(
        h.emulator.sandboxes()[0].finished,
        Some(GenericStatus::Terminated)
    );
}

#[tokio::test]
async fn the_image_builder_version_comes_from_the_environment() {
    let h = Harness::start().await;
    h.emulator.set_image_builder_version("2099.01");
    let first = h.acquire(json!({})).await.unwrap();
    let second = h.acquire(json!({"image": "python:3.13"})).await.unwrap();
    assert_eq!(h.emulator.image_builder_versions(), ["2099.01", "2099.01"]);
    assert_eq!(
        count(&h, "EnvironmentGetOrCreate"),
        1,
        "cached per environment"
    );
    for lease in [first, second] {
        h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
    }
    // The builder's version wins over the environment's.
    let pinned = ModalProvider::builder()
        .server_url(h.emulator.url())
        .task_id_poll(Duration::from_millis(20))
        .image_builder_version("2023.12")
        .build()
        .unwrap();
    let ctx = h.ctx(json!({"image": "alpine:3.21"}));
    let lease = pinned
        .acquire(
            &ctx,
            &AcquireRequest {
                run_id: "run-pinned".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.emulator
            .image_builder_versions()
            .last()
            .map(String::as_str),
        Some("2023.12")
    );
    let handle = LeaseHandle {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
        expires_at: None,
    };
    pinned.destroy(&ctx, &handle).await.unwrap();
}

#[tokio::test]
async fn a_still_valid_auth_token_outlives_a_failed_refresh() {
    let h = Harness::start().await;
    // Every call wants a refresh (the token is within 5 min of expiry) …
    h.emulator.set_auth_token_ttl(Duration::from_secs(120));
    let lease = h.acquire(json!({})).await.unwrap();
    // … and every refresh fails, yet the token in hand is still good.
    h.emulator.inject(
        Route::AuthTokenGet,
        Fault::Status(Code::Unavailable),
        usize::MAX,
    );
    let r = h
        .run(&lease, ExecuteRequest::new("printf").arg("still"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "still");
    h.provider.destroy(&h.ctx(json!({})), &lease).await.unwrap();
    h.emulator.clear_faults();
    assert_eq!(h.emulator.live_sandboxes(), 0);
}

/// Creates a V2 sandbox as npm `modal` 0.11 does (`SandboxCreateV2`), with a raw client.
async fn create_v2_sandbox(h: &Harness) -> String {
    use paperclip_env_modal_proto::api::modal_client_client::ModalClientClient;
    use paperclip_env_modal_proto::api::*;
    fn request<T>(message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut()
            .insert("x-modal-token-id", TOKEN_ID.parse().unwrap());
        r.metadata_mut()
            .insert("x-modal-token-secret", TOKEN_SECRET.parse().unwrap());
        r
    }
    let channel = tonic::transport::Endpoint::from_shared(h.emulator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ModalClientClient::new(channel);
    let app = client
        .app_get_or_create(request(AppGetOrCreateRequest {
            app_name: "paperclip-plugin".into(),
            environment_name: String::new(),
            object_creation_type: ObjectCreationType::CreateIfMissing as i32,
        }))
        .await
        .unwrap()
        .into_inner()
        .app_id;
    let image = client
        .image_get_or_create(request(ImageGetOrCreateRequest {
            app_id: app.clone(),
            image: Some(Image {
                dockerfile_commands: vec!["FROM node:20".into()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .image_id;
    let created = client
        .sandbox_create_v2(request(SandboxCreateV2Request {
            app_id: app,
            definition: Some(Sandbox {
                image_id: image,
                timeout_secs: 600,
                workdir: Some(h.workdir()),
                ..Default::default()
            }),
            tags: vec![SandboxTag {
                tag_name: "paperclip-reuse-lease".into(),
                tag_value: "true".into(),
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!created.task_id.is_empty());
    assert!(created.command_router_access.is_some());
    created.sandbox_id
}

#[tokio::test]
async fn a_v2_lease_resumes_runs_and_releases() {
    let h = Harness::start().await;
    let id = create_v2_sandbox(&h).await;
    assert!(
        !paperclip_env_providers::modal::is_v1_sandbox_id(&id),
        "{id}"
    );
    assert!(h.emulator.sandbox(&id).is_some_and(|s| s.v2));
    let lease = LeaseHandle {
        provider_lease_id: Some(id.clone()),
        metadata: Some(
            json!({"provider": "modal", "sandboxId": id, "reuseLease": true})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        ),
        expires_at: None,
    };
    let reuse = h.ctx(json!({"reuseLease": true}));
    let resumed = h.provider.resume(&reuse, &lease).await.unwrap();
    assert_eq!(resumed.provider_lease_id.as_deref(), Some(id.as_str()));
    let r = h
        .run(&lease, ExecuteRequest::new("printf").arg("v2"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "v2");
    // Releasing a reusable lease detaches; the sandbox keeps running.
    h.provider
        .release(&reuse, &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert!(
        h.emulator
            .sandbox(&id)
            .is_some_and(|s| s.finished.is_none())
    );
    // A plain release terminates it through the V2 RPC.
    h.provider
        .release(&h.ctx(json!({})), &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(
        h.emulator.sandbox(&id).and_then(|s| s.finished),
        Some(GenericStatus::Terminated)
    );
    let rpcs: Vec<_> = h.emulator.calls().into_iter().map(|c| c.rpc).collect();
    for v2 in [
        "SandboxWaitV2",
        "SandboxGetTaskIdV2",
        "SandboxGetCommandRouterAccess",
        "SandboxTerminateV2",
    ] {
        assert!(rpcs.contains(&v2), "{v2} missing from {rpcs:?}");
    }
    for v1 in [
        "SandboxWait",
        "SandboxGetTaskId",
        "TaskGetCommandRouterAccess",
        "SandboxTerminate",
    ] {
        assert!(
            !rpcs.contains(&v1),
            "V1 {v1} used for a V2 sandbox: {rpcs:?}"
        );
    }
    // Afterwards the lease is expired, through the V2 lookup too.
    let again = h.provider.resume(&reuse, &lease).await.unwrap();
    assert_eq!(again.provider_lease_id, None);
}
