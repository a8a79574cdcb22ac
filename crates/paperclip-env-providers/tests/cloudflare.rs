//! The Cloudflare provider against the bridge emulator: conformance plus one
//! test per injected fault.
#![cfg(feature = "cloudflare")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use paperclip_env_core::{
    AcquireRequest, CallContext, Error, ExecuteRequest, LeaseHandle, OutputCollector, OutputSink,
    OutputStream, ProviderConfig, SandboxProvider,
};
use paperclip_env_providers::cloudflare::CloudflareProvider;
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::cloudflare_bridge::{
    BridgeEmulator, BridgeFault, BridgeRoute,
};
use secrecy::SecretString;
use serde_json::{Value, json};

const TOKEN: &str = "bridge-secret-token-0123";

struct Setup {
    bridge: Arc<BridgeEmulator>,
    provider: CloudflareProvider,
    workspace: tempfile::TempDir,
}

async fn setup() -> Setup {
    let bridge = Arc::new(BridgeEmulator::start(TOKEN).await.unwrap());
    let provider = CloudflareProvider::builder().build().unwrap();
    Setup {
        bridge,
        provider,
        workspace: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn config(&self, extra: Value) -> Value {
        let mut c = json!({"bridgeBaseUrl": self.bridge.url(), "bridgeAuthToken": TOKEN, "requestedCwd": self.workspace.path().join("ws").display().to_string(), "timeoutMs": 60000});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        c
    }

    fn ctx(&self, extra: Value) -> CallContext {
        let mut values = self.config(extra).as_object().cloned().unwrap();
        let token = values
            .remove("bridgeAuthToken")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap();
        CallContext {
            company_id: None,
            environment_id: "Env_123".into(),
            issue_id: Some("issue-1".into()),
            config: ProviderConfig::new(values)
                .with_secret("bridgeAuthToken", SecretString::from(token)),
        }
    }

    async fn acquire(&self, extra: Value) -> LeaseHandle {
        let lease = self
            .provider
            .acquire(
                &self.ctx(extra),
                &AcquireRequest {
                    run_id: "Run_123".into(),
                    workspace_mode: None,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        LeaseHandle {
            provider_lease_id: lease.provider_lease_id,
            metadata: lease.metadata,
            expires_at: None,
        }
    }

    async fn run(
        &self,
        lease: &LeaseHandle,
        request: ExecuteRequest,
        sink: Option<Arc<dyn OutputSink>>,
    ) -> paperclip_env_core::Result<paperclip_env_core::ExecuteResult> {
        let output = OutputCollector::new(Default::default(), sink);
        let exit = self
            .provider
            .execute(&self.ctx(json!({})), lease, &request, &output)
            .await?;
        Ok(output.finish(exit))
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
async fn cloudflare_passes_conformance() {
    let s = setup().await;
    let (live, execs, fr, fe) = (
        s.bridge.clone(),
        s.bridge.clone(),
        s.bridge.clone(),
        s.bridge.clone(),
    );
    let fixture = Fixture::new(Arc::new(s.provider.clone()))
        .config(s.config(json!({"keepAlive": true})))
        .invalid_config(json!({"bridgeBaseUrl": "http://bridge.example.workers.dev", "bridgeAuthToken": TOKEN, "reuseLease": true, "keepAlive": false}))
        .secret_value(TOKEN)
        .live_resources(move || live.live_sandboxes())
        .execute_calls(move || execs.exec_calls())
        .fail_next_execute(move || fe.inject(BridgeRoute::Exec, BridgeFault::Status(500, "internal_error"), 1))
        .fail_next_release(move || fr.inject(BridgeRoute::Release, BridgeFault::Status(500, "internal_error"), 4));
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    // A6.13 executes on a destroyed lease; a v1 bridge answers by creating a
    // fresh container (spec 23 §4.4), the one sandbox the suite cannot clean.
    assert!(
        s.bridge.live_sandboxes() <= 1,
        "left behind: {:?}",
        s.bridge.sandbox_ids()
    );
}

#[tokio::test]
async fn ids_wire_shape_and_lease_metadata() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    assert_eq!(
        lease.provider_lease_id.as_deref(),
        Some("pc-run-123-abcd0000")
    );
    let md = lease.metadata.clone().unwrap();
    assert_eq!(
        md["sleepAfter"], "1h",
        "the plugin default wins over the bridge's 10m"
    );
    assert_eq!(md["sessionStrategy"], "named");
    let acquire = s
        .bridge
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/leases/acquire"))
        .unwrap();
    assert_eq!(
        acquire.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(acquire.header("x-paperclip-run-id"), Some("Run_123"));
    assert_eq!(acquire.header("x-paperclip-issue-id"), Some("issue-1"));
    assert_eq!(acquire.body["issueId"], "issue-1");
    let r = s
        .run(
            &lease,
            ExecuteRequest::new("printf")
                .arg("%s|")
                .arg("it's")
                .env("FOO", "b a r")
                .stdin("in"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "it's|");
    let script = s.bridge.scripts().pop().unwrap();
    assert!(
        script.contains(".profile")
            && script.ends_with(
                "'printf' '%s|' 'it'\"'\"'s' < '/tmp/.paperclip-bridge-stdin-"
                    .to_owned()
                    .as_str()
            )
            || script.contains("exec env FOO='b a r' 'printf'"),
        "{script}"
    );
    let reuse = s
        .acquire(json!({"reuseLease": true, "keepAlive": true}))
        .await;
    assert_eq!(reuse.provider_lease_id.as_deref(), Some("pc-env-env-123"));
}

#[tokio::test]
async fn bridge_channel_commands_never_stream_and_use_their_own_session() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let (sink, _) = collecting_sink();
    let request = ExecuteRequest::new("printf")
        .arg("{\"ready\":true}")
        .env("PAPERCLIP_SANDBOX_EXEC_CHANNEL", "bridge")
        .env("KEEP", "1");
    let r = s.run(&lease, request, Some(sink)).await.unwrap();
    assert_eq!(r.stdout, "{\"ready\":true}");
    let exec = s
        .bridge
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.ends_with("/exec"))
        .unwrap();
    assert_eq!(exec.body["streamOutput"], false);
    assert_eq!(exec.body["sessionId"], "paperclip-bridge");
    assert_eq!(
        exec.body["env"],
        json!({"KEEP": "1"}),
        "the marker variable is removed"
    );
}

#[tokio::test]
async fn dropped_final_chunk_is_recovered_across_1000_short_commands() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    s.bridge
        .inject(BridgeRoute::Exec, BridgeFault::DropFinalChunk, usize::MAX);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (provider, ctx, lease) = (s.provider.clone(), s.ctx(json!({})), lease.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..125 {
                let expected = format!("ready-{worker}-{i}.json");
                let (sink, seen) = collecting_sink();
                let output = OutputCollector::new(Default::default(), Some(sink));
                let exit = provider
                    .execute(
                        &ctx,
                        &lease,
                        &ExecuteRequest::new("printf").arg(&expected),
                        &output,
                    )
                    .await
                    .unwrap();
                let result = output.finish(exit);
                assert_eq!(result.stdout, expected, "the result lost its last chunk");
                assert_eq!(
                    *seen.lock().unwrap(),
                    expected,
                    "the stream lost its last chunk"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(s.bridge.exec_calls(), 1000);
}

#[tokio::test]
async fn silent_command_outlives_the_idle_timeout_on_keepalives() {
    let s = setup().await;
    s.bridge.set_keepalive_interval(Duration::from_millis(100));
    let provider = CloudflareProvider::builder()
        .idle_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let lease = s.acquire(json!({})).await;
    let (sink, _) = collecting_sink();
    let output = OutputCollector::new(Default::default(), Some(sink));
    let exit = provider
        .execute(
            &s.ctx(json!({})),
            &lease,
            &ExecuteRequest::shell("sleep 2; printf done"),
            &output,
        )
        .await
        .unwrap();
    assert_eq!(output.finish(exit).stdout, "done");
    // Without keepalives the same silence is a dropped stream.
    s.bridge.set_keepalive_interval(Duration::from_secs(3600));
    let (sink, _) = collecting_sink();
    let output = OutputCollector::new(Default::default(), Some(sink));
    let err = provider
        .execute(
            &s.ctx(json!({})),
            &lease,
            &ExecuteRequest::shell("sleep 2; printf done"),
            &output,
        )
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("silent"),
        "{err:?}"
    );
}

#[tokio::test]
async fn sse_framing_faults() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    let (sink, _) = collecting_sink();
    s.bridge
        .inject(BridgeRoute::Exec, BridgeFault::SseCrlfBytewise, 1);
    let r = s
        .run(
            &lease,
            ExecuteRequest::new("printf").arg("h\u{e9}llo ☃"),
            Some(sink.clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "h\u{e9}llo ☃");
    s.bridge.inject(BridgeRoute::Exec, BridgeFault::SseError, 1);
    let err = s
        .run(&lease, ExecuteRequest::new("true"), Some(sink.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("sandbox exploded"));
    s.bridge
        .inject(BridgeRoute::Exec, BridgeFault::SseNoComplete, 1);
    let err = s
        .run(&lease, ExecuteRequest::new("true"), Some(sink.clone()))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ended without a completion event"),
        "{err}"
    );
    s.bridge
        .inject(BridgeRoute::Exec, BridgeFault::NoExitCode, 1);
    let err = s
        .run(&lease, ExecuteRequest::new("true"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no exit code"), "{err}");
}

#[tokio::test]
async fn http_error_shapes() {
    let s = setup().await;
    let bad = CallContext {
        config: ProviderConfig::new(s.config(json!({})).as_object().cloned().unwrap())
            .with_secret("bridgeAuthToken", SecretString::from("wrong")),
        ..s.ctx(json!({}))
    };
    let err = s
        .provider
        .acquire(
            &bad,
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unauthenticated { .. })
            && err
                .to_string()
                .contains("Missing or invalid bridge bearer token.")
    );
    assert!(!err.to_string().contains("wrong"));

    s.bridge
        .inject(BridgeRoute::Acquire, BridgeFault::Html(403), 1);
    let err = s
        .provider
        .acquire(
            &s.ctx(json!({})),
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("failed with HTTP 403") && err.to_string().contains("1010"),
        "{err}"
    );
    s.bridge
        .inject(BridgeRoute::Acquire, BridgeFault::NonJsonOk, 1);
    let err = s
        .provider
        .acquire(
            &s.ctx(json!({})),
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("without a JSON body"),
        "a proxy page is never a lease: {err}"
    );
    s.bridge.inject(
        BridgeRoute::Acquire,
        BridgeFault::Status(500, "internal_error"),
        1,
    );
    let err = s
        .provider
        .acquire(
            &s.ctx(json!({})),
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");

    // Slow headers beyond bridgeRequestTimeoutMs time out with the spec's message.
    s.bridge.inject(
        BridgeRoute::Acquire,
        BridgeFault::Delay(Duration::from_secs(2)),
        1,
    );
    let err = s
        .provider
        .acquire(
            &s.ctx(json!({"bridgeRequestTimeoutMs": 300})),
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
    // An exec whose command timeout exceeds the request timeout is not cut early.
    let lease = s.acquire(json!({})).await;
    let output = OutputCollector::buffered();
    let exit = s
        .provider
        .execute(
            &s.ctx(json!({"bridgeRequestTimeoutMs": 300})),
            &lease,
            &ExecuteRequest::shell("sleep 1; printf ok").timeout_ms(5000),
            &output,
        )
        .await
        .unwrap();
    assert_eq!(output.finish(exit).stdout, "ok");
}

#[tokio::test]
async fn lost_lease_and_unknown_route_are_told_apart() {
    let s = setup().await;
    let lease = s.acquire(json!({})).await;
    s.bridge.wipe(lease.provider_lease_id.as_deref().unwrap());
    let gone = s.provider.resume(&s.ctx(json!({})), &lease).await.unwrap();
    assert_eq!(gone.provider_lease_id, None);
    assert_eq!(gone.metadata.unwrap()["expired"], true);
    assert_eq!(
        s.bridge.live_sandboxes(),
        0,
        "the container re-created by resume is destroyed"
    );

    s.bridge.inject(
        BridgeRoute::Exec,
        BridgeFault::Status(409, "sandbox_state_lost"),
        1,
    );
    let r = s
        .run(&lease, ExecuteRequest::new("true"), None)
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stderr.as_str()),
        (Some(1), "injected sandbox_state_lost\n")
    );

    // A bridge without the exec route is not a lost lease.
    let old_bridge = CallContext {
        config: ProviderConfig::new(
            s.config(json!({"bridgeBaseUrl": format!("{}/old", s.bridge.url())}))
                .as_object()
                .cloned()
                .unwrap(),
        )
        .with_secret("bridgeAuthToken", SecretString::from(TOKEN)),
        ..s.ctx(json!({}))
    };
    let output = OutputCollector::buffered();
    let err = s
        .provider
        .execute(&old_bridge, &lease, &ExecuteRequest::new("true"), &output)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not implement this route"),
        "{err}"
    );
}

#[tokio::test]
async fn command_timeout_default_strategy_destroys_the_sandbox() {
    let s = setup().await;
    let lease = s.acquire(json!({"sessionStrategy": "default"})).await;
    let output = OutputCollector::buffered();
    let exit = s
        .provider
        .execute(
            &s.ctx(json!({"sessionStrategy": "default"})),
            &lease,
            &ExecuteRequest::shell("printf part; sleep 30").timeout_ms(300),
            &output,
        )
        .await
        .unwrap();
    let r = output.finish(exit);
    assert!(r.timed_out && r.exit_code.is_none());
    assert!(r.stderr.ends_with('\n'));
    assert_eq!(
        s.bridge.live_sandboxes(),
        0,
        "a default-session timeout destroys the sandbox"
    );
}
