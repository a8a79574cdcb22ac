//! E2B and Novita providers against the testkit emulator: the shared
//! conformance suite plus one test per injected fault.
#![cfg(feature = "e2b")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, CleanupStatus, Environment, EnvironmentRuntime,
    Error, ExecuteRequest, LeaseHandle, LeaseStatus, OutputCollector, OutputStream, ProviderConfig,
    SandboxProvider,
};
use paperclip_env_providers::e2b::E2bProvider;
use paperclip_env_providers::http::{HttpOptions, RetryPolicy};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::e2b::{E2bEmulator, Fault, Profile, Route};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEY: &str = "e2b_0123456789abcdef0123456789abcdef";

fn http_options() -> HttpOptions {
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

async fn e2b() -> (E2bEmulator, E2bProvider) {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    let provider = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(http_options())
        .build()
        .unwrap();
    (emulator, provider)
}

fn ctx(config: Value) -> CallContext {
    let mut values = config.as_object().cloned().unwrap_or_default();
    let key = values
        .remove("apiKey")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| KEY.to_owned());
    CallContext {
        company_id: Some("company-1".into()),
        environment_id: "env-1".into(),
        issue_id: None,
        config: ProviderConfig::new(values).with_secret("apiKey", SecretString::from(key)),
    }
}

fn fixture(emulator: &Arc<E2bEmulator>, provider: &E2bProvider, config: Value) -> Fixture {
    let (live, creates, starts) = (emulator.clone(), emulator.clone(), emulator.clone());
    let (fa, fe, fr) = (emulator.clone(), emulator.clone(), emulator.clone());
    Fixture::new(Arc::new(provider.clone()))
        .config(config)
        .invalid_config(json!({"template": "   ", "timeoutMs": 0}))
        .secret_value(KEY)
        .live_resources(move || live.live_sandboxes())
        .create_calls(move || creates.create_calls())
        .execute_calls(move || starts.start_calls())
        .fail_next_acquire(move || {
            fa.inject(
                Route::SetTimeout,
                Fault::Status {
                    status: 400,
                    retry_after: None,
                },
                1,
            )
        })
        .fail_next_execute(move || {
            fe.inject(
                Route::Start,
                Fault::Status {
                    status: 500,
                    retry_after: None,
                },
                1,
            )
        })
        .fail_next_release(move || {
            fr.inject(
                Route::Kill,
                Fault::Status {
                    status: 500,
                    retry_after: None,
                },
                3,
            )
        })
        .call_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_passes_conformance() {
    let (emulator, provider) = e2b().await;
    let emulator = Arc::new(emulator);
    let report = conformance::run(&fixture(
        &emulator,
        &provider,
        json!({"template": "base", "apiKey": KEY, "timeoutMs": 60000}),
    ))
    .await;
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
        emulator.live_sandboxes(),
        0,
        "conformance left sandboxes behind: {:?}",
        emulator.sandboxes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn novita_passes_conformance() {
    let emulator = Arc::new(E2bEmulator::start(Profile::Novita, KEY).await.unwrap());
    let provider = E2bProvider::novita()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(http_options())
        .build()
        .unwrap();
    let mut fixture = fixture(
        &emulator,
        &provider,
        json!({"apiKey": KEY, "timeoutMs": 60000}),
    );
    fixture.invalid_config = json!({"apiKey": KEY, "requestedCwd": "relative"})
        .as_object()
        .cloned();
    // Novita runs the "first call after create" probe through mkdir, not set-timeout.
    let fa = emulator.clone();
    fixture = fixture.fail_next_acquire(move || {
        fa.inject(
            Route::Start,
            Fault::Status {
                status: 400,
                retry_after: None,
            },
            1,
        )
    });
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert_eq!(emulator.live_sandboxes(), 0);
}

async fn acquire(provider: &E2bProvider, config: Value) -> paperclip_env_core::Result<LeaseHandle> {
    let lease = provider
        .acquire(
            &ctx(config),
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
    provider: &E2bProvider,
    lease: &LeaseHandle,
    request: ExecuteRequest,
) -> paperclip_env_core::Result<paperclip_env_core::ExecuteResult> {
    let output = OutputCollector::buffered();
    let exit = provider
        .execute(&ctx(json!({})), lease, &request, &output)
        .await?;
    Ok(output.finish(exit))
}

#[tokio::test]
async fn wire_shape_of_create_and_execute() {
    let (emulator, provider) = e2b().await;
    let lease = acquire(&provider, json!({"timeoutMs": 450001.9}))
        .await
        .unwrap();
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["provider"], "e2b");
    assert_eq!(md["shellCommand"], "bash");
    assert_eq!(md["timeoutMs"], 450001);
    assert!(
        md["remoteCwd"]
            .as_str()
            .unwrap()
            .ends_with("/paperclip-workspace")
    );
    let output = OutputCollector::buffered();
    let request = ExecuteRequest::new("printf")
        .arg("%s")
        .arg("hello")
        .env("FOO", "bar")
        .stdin("in");
    let exit = provider
        .execute(
            &ctx(json!({"timeoutMs": 450001.9})),
            &lease,
            &request,
            &output,
        )
        .await
        .unwrap();
    assert_eq!(output.finish(exit).stdout, "hello");
    let requests = emulator.requests();
    let create = requests.iter().find(|r| r.path == "/v2/sandboxes").unwrap();
    let body: Value = serde_json::from_str(&create.body).unwrap();
    assert_eq!(body["timeout"], 451, "seconds are rounded up");
    assert_eq!(body["secure"], true);
    assert_eq!(body["allow_internet_access"], true);
    assert_eq!(body["metadata"]["paperclipProvider"], "e2b");
    assert!(
        requests
            .iter()
            .all(|r| !(r.method == "POST" && r.path == "/sandboxes")),
        "v2 served: no v1 create"
    );
    for r in requests
        .iter()
        .filter(|r| r.path.starts_with("/sandboxes") || r.path.starts_with("/v2/"))
    {
        assert_eq!(r.header("x-api-key"), Some(KEY), "{} {}", r.method, r.path);
        assert!(!r.body.contains(KEY) && !r.query.as_deref().unwrap_or("").contains(KEY));
    }
    let start = requests
        .iter()
        .rev()
        .find(|r| r.path == "/process.Process/Start")
        .unwrap();
    assert_eq!(start.header("connect-protocol-version"), Some("1"));
    assert_eq!(start.header("keepalive-ping-interval"), Some("50"));
    assert_eq!(start.header("connect-timeout-ms"), Some("450001"));
    assert!(
        start
            .header("x-access-token")
            .is_some_and(|t| t.starts_with("envd-token-"))
    );
    assert!(
        start
            .body
            .contains("exec env FOO='bar' 'printf' '%s' 'hello' < '/tmp/paperclip-stdin-")
    );
    let refreshed = requests
        .iter()
        .filter(|r| r.path.ends_with("/timeout"))
        .count();
    assert!(
        refreshed >= 2,
        "lifetime refreshed at acquire and before the command"
    );
    let uploads = requests.iter().filter(|r| r.path == "/files").count();
    let removes = requests
        .iter()
        .filter(|r| r.path == "/filesystem.Filesystem/Remove")
        .count();
    assert_eq!((uploads, removes), (1, 1), "stdin staged and removed");
}

#[tokio::test]
async fn bad_api_key_is_unauthenticated_and_not_retried() {
    let (emulator, provider) = e2b().await;
    let err = acquire(&provider, json!({"apiKey": "e2b_wrong"}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(!err.to_string().contains("e2b_wrong"));
    assert_eq!(emulator.create_calls(), 1);
    let no_key = E2bProvider::builder()
        .api_url(emulator.url())
        .build()
        .unwrap();
    let err = no_key
        .acquire(
            &CallContext {
                config: ProviderConfig::default(),
                ..ctx(json!({}))
            },
            &AcquireRequest {
                run_id: "r".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "apiKey"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "E2B sandbox environments require an API key in config or E2B_API_KEY."
    );
}

#[tokio::test]
async fn expired_sandbox_resumes_as_expired_and_runtime_falls_back_to_fresh() {
    let (emulator, provider) = e2b().await;
    // The key comes from the provider (as E2B_API_KEY would), not from config.
    let keyed = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .api_key(SecretString::from(KEY))
        .http_options(http_options())
        .build()
        .unwrap();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(keyed))
        .build();
    let env = Environment::new(
        "env-r",
        "E2B",
        "sandbox",
        json!({"provider": "e2b", "reuseLease": true, "timeoutMs": 60000}),
    );
    let first = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    runtime
        .execute(&env, &first, &ExecuteRequest::shell("printf kept > marker"))
        .await
        .unwrap();
    runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        emulator.sandboxes()[0].state,
        "paused",
        "reuseLease pauses on release"
    );

    let resumed = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-2"))
        .await
        .unwrap()
        .lease;
    assert_eq!(resumed.provider_lease_id, first.provider_lease_id);
    let read = runtime
        .execute(&env, &resumed, &ExecuteRequest::new("cat").arg("marker"))
        .await
        .unwrap();
    assert_eq!(read.stdout, "kept", "workspace intact after pause/resume");
    runtime
        .release_run_leases("run-2", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();

    let id = first.provider_lease_id.clone().unwrap();
    emulator.expire(&id);
    let handle = LeaseHandle {
        provider_lease_id: Some(id.clone()),
        metadata: first.metadata.clone(),
        expires_at: None,
    };
    let gone = provider
        .resume(&ctx(json!({"reuseLease": true})), &handle)
        .await
        .unwrap();
    assert_eq!(gone.provider_lease_id, None);
    assert_eq!(gone.metadata.unwrap()["expired"], true);
    let fresh = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-3"))
        .await
        .unwrap()
        .lease;
    assert_ne!(
        fresh.provider_lease_id.as_deref(),
        Some(id.as_str()),
        "an expired sandbox leads to a fresh one"
    );
    runtime.destroy_run_lease(&env, &fresh).await.unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn rate_limits_are_retried_honouring_retry_after() {
    let (emulator, provider) = e2b().await;
    emulator.inject(
        Route::Create,
        Fault::Status {
            status: 429,
            retry_after: Some("1".into()),
        },
        1,
    );
    let started = Instant::now();
    let lease = acquire(&provider, json!({})).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited for Retry-After"
    );
    assert_eq!(emulator.create_calls(), 2);
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();

    emulator.inject(
        Route::Create,
        Fault::Status {
            status: 429,
            retry_after: None,
        },
        1,
    );
    acquire(&provider, json!({})).await.unwrap();
    emulator.inject(
        Route::Create,
        Fault::Status {
            status: 429,
            retry_after: None,
        },
        usize::MAX,
    );
    let err = acquire(&provider, json!({})).await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { .. }) && err.is_retryable(),
        "{err:?}"
    );
}

#[tokio::test]
async fn create_5xx_is_not_retried_and_leaks_nothing() {
    let (emulator, provider) = e2b().await;
    emulator.inject(
        Route::Create,
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    let err = acquire(&provider, json!({})).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(
        emulator.create_calls(),
        1,
        "sandbox creation is never retried blindly"
    );
    assert_eq!(emulator.live_sandboxes(), 0);
    // A failure after create kills what was created.
    emulator.inject(
        Route::SetTimeout,
        Fault::Status {
            status: 400,
            retry_after: None,
        },
        1,
    );
    acquire(&provider, json!({})).await.unwrap_err();
    assert_eq!(emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn failed_lifetime_refresh_does_not_stop_the_command() {
    let (emulator, provider) = e2b().await;
    let lease = acquire(&provider, json!({})).await.unwrap();
    emulator.inject(
        Route::SetTimeout,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        3,
    );
    let r = run(&provider, &lease, ExecuteRequest::new("printf").arg("ran"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "ran");
}

#[tokio::test]
async fn pause_conflict_failure_and_kill_failure() {
    let (emulator, provider) = e2b().await;
    let reuse = json!({"reuseLease": true});
    let lease = acquire(&provider, reuse.clone()).await.unwrap();
    emulator.inject(
        Route::Pause,
        Fault::Status {
            status: 409,
            retry_after: None,
        },
        1,
    );
    provider
        .release(&ctx(reuse.clone()), &lease, LeaseStatus::Released)
        .await
        .unwrap();
    emulator.inject(
        Route::Pause,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        3,
    );
    provider
        .release(&ctx(reuse.clone()), &lease, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(
        emulator.live_sandboxes(),
        0,
        "a failed pause falls back to kill"
    );

    // Kill failure through the runtime: recorded as a failed cleanup, no panic.
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(KEY);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-k",
        "E2B",
        "sandbox",
        json!({"provider": "e2b", "apiKey": key_id}),
    );
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-k"))
        .await
        .unwrap();
    emulator.inject(
        Route::Kill,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        3,
    );
    let released = runtime
        .release_run_leases("run-k", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(
        released[0].lease.cleanup_status,
        Some(CleanupStatus::Failed)
    );
    assert!(
        released[0]
            .lease
            .cleanup_error()
            .unwrap()
            .contains("HTTP 500")
    );
    assert!(!released[0].lease.cleanup_error().unwrap().contains(KEY));
}

#[tokio::test]
async fn edge_502_right_after_create_is_retried_and_permanent_502_is_gone() {
    let (emulator, provider) = e2b().await;
    emulator.inject(Route::Start, Fault::EnvdGone, 2);
    let lease = acquire(&provider, json!({})).await.unwrap();
    emulator.inject(Route::Start, Fault::EnvdGone, usize::MAX);
    let err = run(&provider, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(err.is_not_found() && !err.is_retryable(), "{err:?}");
    emulator.clear_faults();
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn slow_control_plane_times_out() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    let options = HttpOptions {
        request_timeout: Duration::from_millis(300),
        ..http_options()
    };
    let provider = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(options)
        .build()
        .unwrap();
    let lease = acquire(&provider, json!({})).await.unwrap();
    emulator.inject(Route::Connect, Fault::Delay(Duration::from_secs(2)), 3);
    let started = Instant::now();
    let err = run(&provider, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { .. }) && err.is_retryable(),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn stream_faults_give_typed_errors_and_keep_partial_output() {
    let (emulator, provider) = e2b().await;
    let lease = acquire(&provider, json!({})).await.unwrap();

    // A dropped stream is reattached with Process/Connect: nothing is lost
    // that the process printed after the reattach, and the command's own
    // exit is reported.
    emulator.inject(Route::Start, Fault::DropStreamAfter(2), 1);
    let result = run(
        &provider,
        &lease,
        ExecuteRequest::shell("printf partial; sleep 0.5; printf more; exit 4"),
    )
    .await
    .unwrap();
    assert_eq!(result.stdout, "partialmore");
    assert_eq!(result.exit_code, Some(4));
    assert!(
        emulator
            .requests()
            .iter()
            .any(|r| r.path == "/process.Process/Connect"),
        "reattached through Process/Connect"
    );

    // When reattaching fails too, the error is retryable and the partial
    // output reached the sink.
    emulator.inject(Route::Start, Fault::DropStreamAfter(2), 1);
    emulator.inject(
        Route::ProcessConnect,
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        usize::MAX,
    );

    let seen = Arc::new(Mutex::new(String::new()));
    let seen2 = seen.clone();
    let sink: Arc<dyn paperclip_env_core::OutputSink> =
        Arc::new(move |s: OutputStream, d: &[u8]| {
            if s == OutputStream::Stdout {
                seen2.lock().unwrap().push_str(&String::from_utf8_lossy(d));
            }
        });
    let output = OutputCollector::new(Default::default(), Some(sink));
    let err = provider
        .execute(
            &ctx(json!({})),
            &lease,
            &ExecuteRequest::shell("printf partial; sleep 0.3; printf more; sleep 5"),
            &output,
        )
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("interrupted"),
        "{err:?}"
    );
    assert!(
        seen.lock().unwrap().starts_with("partial"),
        "partial output reached the sink: {:?}",
        seen.lock().unwrap()
    );

    emulator.clear_faults();
    emulator.inject(Route::Start, Fault::MalformedEnvelope, 1);
    let err = run(&provider, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("protocol error"), "{err:?}");

    let quick = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(HttpOptions {
            request_timeout: Duration::from_millis(500),
            ..http_options()
        })
        .build()
        .unwrap();
    emulator.inject(Route::Start, Fault::SilentStream, 1);
    let err = run(&quick, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    emulator.inject(
        Route::Files,
        Fault::Status {
            status: 507,
            retry_after: None,
        },
        1,
    );
    let err = run(&provider, &lease, ExecuteRequest::new("cat").stdin("x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("507"), "{err:?}");
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn command_timeout_keeps_partial_output_and_appends_the_message() {
    let (emulator, provider) = e2b().await;
    let lease = acquire(&provider, json!({})).await.unwrap();
    let r = run(
        &provider,
        &lease,
        ExecuteRequest::shell("printf out; printf 'partial stderr' >&2; sleep 30").timeout_ms(500),
    )
    .await
    .unwrap();
    assert!(r.timed_out && r.exit_code.is_none());
    assert_eq!(r.stdout, "out");
    assert_eq!(r.stderr, "partial stderr\ncommand timed out after 500 ms\n");
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn silent_commands_survive_on_keepalives() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    emulator.set_keepalive_interval(Duration::from_millis(200));
    let provider = E2bProvider::builder()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(http_options())
        .keepalive_secs(1)
        .build()
        .unwrap();
    let lease = acquire(&provider, json!({})).await.unwrap();
    let r = run(
        &provider,
        &lease,
        ExecuteRequest::shell("sleep 3; printf done"),
    )
    .await
    .unwrap();
    assert_eq!(
        r.stdout, "done",
        "a silent command longer than the idle guard completes"
    );
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn novita_profile_wire_differences_and_validation() {
    let emulator = E2bEmulator::start(Profile::Novita, KEY).await.unwrap();
    let provider = E2bProvider::novita()
        .api_url(emulator.url())
        .sandbox_url(emulator.url())
        .http_options(http_options())
        .build()
        .unwrap();
    let validation = provider
        .validate_config(
            json!({"requestedCwd": "rel", "timeoutMs": 5000, "requestTimeoutMs": 500})
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    let messages: Vec<_> = validation
        .errors
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        messages,
        [
            "Novita sandbox environments require an API key in config or NOVITA_API_KEY.",
            "requestedCwd must be an absolute path.",
            "timeoutMs must be at least 10000.",
            "requestTimeoutMs must be at least 1000."
        ]
    );

    let novita_ctx = |config: Value| CallContext {
        environment_id: "env-n".into(),
        issue_id: Some("issue-7".into()),
        ..ctx(config)
    };
    let lease = provider
        .acquire(
            &novita_ctx(json!({})),
            &AcquireRequest {
                run_id: "run-n".into(),
                workspace_mode: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["provider"], "novita");
    assert_eq!(md["remoteCwd"], "/home/user/paperclip-workspace");
    assert_eq!(md["requestTimeoutMs"], 30000);
    let created = &emulator.sandboxes()[0];
    assert_eq!(created.metadata["paperclip-provider"], "novita");
    assert_eq!(created.metadata["paperclip-run-id"], "run-n");
    assert_eq!(created.metadata["paperclip-issue-id"], "issue-7");
    assert_eq!(created.metadata["paperclip-environment-id"], "env-n");
    let start = emulator
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/process.Process/Start")
        .unwrap();
    assert_eq!(
        start.header("novita-sandbox-id"),
        lease.provider_lease_id.as_deref()
    );

    // Concurrent executes with stdin never share a staged file.
    let handle = LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: None,
    };
    let runs = (0..4).map(|i| {
        let (provider, handle) = (provider.clone(), handle.clone());
        async move {
            let output = OutputCollector::buffered();
            let exit = provider
                .execute(
                    &ctx(json!({})),
                    &handle,
                    &ExecuteRequest::new("cat").stdin(format!("payload-{i}")),
                    &output,
                )
                .await
                .unwrap();
            output.finish(exit).stdout
        }
    });
    let outputs = futures::future::join_all(runs).await;
    assert_eq!(
        outputs,
        ["payload-0", "payload-1", "payload-2", "payload-3"]
    );

    // 401 on connect during resume propagates; 404 means expired.
    emulator.inject(
        Route::Connect,
        Fault::Status {
            status: 401,
            retry_after: None,
        },
        1,
    );
    let err = provider
        .resume(&novita_ctx(json!({"reuseLease": true})), &handle)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    provider
        .destroy(&novita_ctx(json!({})), &handle)
        .await
        .unwrap();
    let gone = provider
        .resume(&novita_ctx(json!({"reuseLease": true})), &handle)
        .await
        .unwrap();
    assert_eq!(gone.provider_lease_id, None);
    assert_eq!(
        gone.metadata.unwrap(),
        json!({"provider": "novita", "expired": true})
            .as_object()
            .unwrap()
            .clone()
    );
}

#[tokio::test]
async fn no_api_key_in_any_log_line() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let (emulator, provider) = e2b().await;
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(KEY);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider.clone()))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-l",
        "E2B",
        "sandbox",
        json!({"provider": "e2b", "apiKey": key_id}),
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
    emulator.inject(
        Route::Kill,
        Fault::Status {
            status: 401,
            retry_after: None,
        },
        1,
    );
    runtime
        .release_run_leases("run-l", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let logs = capture.text();
    assert!(logs.contains("http"), "the capture saw the HTTP spans");
    assert!(!logs.contains(KEY), "a log line carries the API key");
    assert!(
        !logs.contains("envd-token-"),
        "a log line carries the envd access token"
    );
    assert!(!format!("{provider:?}").contains(KEY));
    assert!(!serde_json::to_string(&lease).unwrap().contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_round_trip_through_the_envd_file_api() {
    use paperclip_env_core::workspace::{SyncOptions, TransferMethod, WorkspaceSync};
    let (emulator, provider) = e2b().await;
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key_id = secrets.insert(KEY);
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .secrets(secrets)
        .build();
    let env = Environment::new(
        "env-w",
        "E2B",
        "sandbox",
        json!({"provider": "e2b", "apiKey": key_id}),
    );
    let lease = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-w"))
        .await
        .unwrap()
        .lease;
    let remote = lease.remote_cwd().unwrap().to_owned();

    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join("src/nested")).unwrap();
    std::fs::write(local.path().join("src/nested/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(local.path().join("README ☃.md"), "hello\n").unwrap();
    let sync = WorkspaceSync::for_lease(&runtime, &env, &lease)
        .await
        .unwrap();
    let uploaded = sync
        .upload(local.path(), &remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(uploaded.method, TransferMethod::Native("e2b-files".into()));
    let read = runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::new("cat")
                .arg("src/nested/main.rs")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    assert_eq!(read.stdout, "fn main() {}\n");
    assert!(
        emulator
            .requests()
            .iter()
            .any(|r| r.path == "/files" && r.method == "POST"),
        "the archive went through POST /files"
    );

    runtime
        .execute(
            &env,
            &lease,
            &ExecuteRequest::shell("printf changed > 'README ☃.md' && printf new > added.txt")
                .cwd(remote.clone()),
        )
        .await
        .unwrap();
    let downloaded = sync
        .download(
            &remote,
            local.path(),
            Some(&uploaded.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        downloaded.method,
        TransferMethod::Native("e2b-files".into())
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("README ☃.md")).unwrap(),
        "changed"
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("added.txt")).unwrap(),
        "new"
    );
    runtime
        .release_run_leases("run-w", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
}

/// Acquire, execute with stdin, release: the calls every lease makes.
async fn lifecycle(provider: &E2bProvider) {
    let lease = acquire(provider, json!({"reuseLease": true}))
        .await
        .unwrap();
    let result = run(provider, &lease, ExecuteRequest::new("cat").stdin("in"))
        .await
        .unwrap();
    assert_eq!(result.stdout, "in");
    provider
        .release(
            &ctx(json!({"reuseLease": true})),
            &lease,
            LeaseStatus::Released,
        )
        .await
        .unwrap();
    let resumed = provider
        .resume(&ctx(json!({"reuseLease": true})), &lease)
        .await
        .unwrap();
    assert_eq!(resumed.provider_lease_id, lease.provider_lease_id);
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
}

#[tokio::test]
async fn v2_routes_are_preferred_and_v1_only_servers_still_work() {
    use paperclip_env_testkit::emulators::e2b::{ApiVersions, E2bOptions};
    let (emulator, provider) = e2b().await;
    lifecycle(&provider).await;
    let posts: Vec<String> = emulator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains("sandboxes"))
        .map(|r| r.path)
        .collect();
    assert!(posts.contains(&"/v2/sandboxes".to_owned()), "{posts:?}");
    assert!(
        posts
            .iter()
            .any(|p| p.starts_with("/v2/sandboxes/") && p.ends_with("/connect")),
        "{posts:?}"
    );
    assert!(
        !posts.iter().any(|p| p == "/sandboxes" || (p.starts_with("/sandboxes/") && p.ends_with("/connect"))),
        "no v1 create or connect against a v2 server: {posts:?}"
    );
    assert_eq!(emulator.live_sandboxes(), 0);

    let old = E2bEmulator::start_with(E2bOptions {
        profile: Profile::E2b,
        api_key: KEY.into(),
        api: ApiVersions::V1Only,
    })
    .await
    .unwrap();
    let provider = E2bProvider::builder()
        .api_url(old.url())
        .sandbox_url(old.url())
        .http_options(http_options())
        .build()
        .unwrap();
    lifecycle(&provider).await;
    let requests = old.requests();
    let v2: Vec<&str> = requests
        .iter()
        .filter(|r| r.path.starts_with("/v2/"))
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(
        v2,
        vec!["/v2/sandboxes"],
        "v2 tried once, then remembered as absent"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.method == "POST" && r.path == "/sandboxes")
    );
    assert_eq!(
        old.create_calls(),
        2,
        "the 404 on v2 created nothing; one v1 create"
    );
    assert_eq!(old.live_sandboxes(), 0);

    // A fresh provider whose first call is a resume learns v1 from the
    // connect: the v2 404 is not mistaken for a gone sandbox.
    let lease = acquire(&provider, json!({"reuseLease": true}))
        .await
        .unwrap();
    provider
        .release(
            &ctx(json!({"reuseLease": true})),
            &lease,
            LeaseStatus::Released,
        )
        .await
        .unwrap();
    let fresh = E2bProvider::builder()
        .api_url(old.url())
        .sandbox_url(old.url())
        .http_options(http_options())
        .build()
        .unwrap();
    let resumed = fresh
        .resume(&ctx(json!({"reuseLease": true})), &lease)
        .await
        .unwrap();
    assert_eq!(resumed.provider_lease_id, lease.provider_lease_id);
    fresh.destroy(&ctx(json!({})), &lease).await.unwrap();
    assert_eq!(old.live_sandboxes(), 0);
}

#[tokio::test]
async fn guest_unresponsive_snapshot_is_resumed_without_memory() {
    use paperclip_env_testkit::emulators::e2b::{ApiVersions, E2bOptions};
    for api in [ApiVersions::V1AndV2, ApiVersions::V1Only] {
        let emulator = E2bEmulator::start_with(E2bOptions {
            profile: Profile::E2b,
            api_key: KEY.into(),
            api,
        })
        .await
        .unwrap();
        let provider = E2bProvider::builder()
            .api_url(emulator.url())
            .sandbox_url(emulator.url())
            .http_options(http_options())
            .build()
            .unwrap();
        let config = json!({"reuseLease": true});
        let lease = acquire(&provider, config.clone()).await.unwrap();
        run(
            &provider,
            &lease,
            ExecuteRequest::shell("printf kept > marker"),
        )
        .await
        .unwrap();
        provider
            .release(&ctx(config.clone()), &lease, LeaseStatus::Released)
            .await
            .unwrap();
        let id = lease.provider_lease_id.clone().unwrap();
        emulator.mark_guest_unresponsive(&id);
        let resumed = provider.resume(&ctx(config.clone()), &lease).await.unwrap();
        assert_eq!(
            resumed.provider_lease_id.as_deref(),
            Some(id.as_str()),
            "{api:?}"
        );
        let read = run(&provider, &lease, ExecuteRequest::new("cat").arg("marker"))
            .await
            .unwrap();
        assert_eq!(read.stdout, "kept", "{api:?}: files survive a cold boot");
        let cold = emulator
            .requests()
            .into_iter()
            .filter(|r| r.body.contains("\"memory\":false"))
            .count();
        assert_eq!(cold, 1, "{api:?}: one resume without memory");
        provider.destroy(&ctx(json!({})), &lease).await.unwrap();
        assert_eq!(emulator.live_sandboxes(), 0);
    }
}

#[tokio::test]
async fn a_rate_limited_command_start_on_a_held_lease_is_retried_after_retry_after() {
    let (emulator, provider) = e2b().await;
    let lease = acquire(&provider, json!({})).await.unwrap();
    let starts = emulator.start_calls();
    emulator.inject(
        Route::Start,
        Fault::Status {
            status: 429,
            retry_after: Some("1".into()),
        },
        1,
    );
    let started = Instant::now();
    let result = run(&provider, &lease, ExecuteRequest::new("echo").arg("ok"))
        .await
        .unwrap();
    assert_eq!(result.stdout, "ok\n");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited for Retry-After"
    );
    assert_eq!(emulator.start_calls() - starts, 2, "one 429, one start");

    // A 429 that outlasts the retry budget is a typed, retryable rate limit;
    // a 502 on a held lease is not retried (the sandbox is gone).
    emulator.inject(
        Route::Start,
        Fault::Status {
            status: 429,
            retry_after: None,
        },
        usize::MAX,
    );
    let err = run(&provider, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { .. }) && err.is_retryable(),
        "{err:?}"
    );
    emulator.clear_faults();
    let before = emulator.start_calls();
    emulator.inject(Route::Start, Fault::EnvdGone, 1);
    let err = run(&provider, &lease, ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(emulator.start_calls() - before, 1);
    provider.destroy(&ctx(json!({})), &lease).await.unwrap();
}

/// Issue 26: an E2B acquisition killed after the create, or answered after
/// its caller's deadline, leaves no sandbox; the inline API key appears in
/// no log, row or Debug output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_passes_the_leak_drills() {
    use paperclip_env_testkit::leak_drills::{LeakDrill, crash_rounds, deadline_rounds};
    let (emulator, provider) = e2b().await;
    let emulator = Arc::new(emulator);
    let (live, slow) = (emulator.clone(), emulator.clone());
    let drill = LeakDrill::new(
        Arc::new(provider),
        json!({"provider": "e2b", "apiKey": KEY}),
    )
    .canary(KEY)
    .call_deadline(Duration::from_secs(1))
    .live(move || live.live_sandboxes())
    // The sandbox exists once the create returns; its workspace
    // directory is made afterwards, slowly.
    .slow_create(move |d| match d {
        Some(d) => slow.inject(Route::SetTimeout, Fault::Delay(d), 1000),
        None => slow.clear_faults(),
    });
    crash_rounds(&drill, 3).await.unwrap();
    deadline_rounds(&drill, 3).await.unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
}

/// Issue 26: every call on a held E2B lease returns within the runtime's
/// deadline when the service stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_calls_on_a_silent_service_return_within_their_deadline() {
    use paperclip_env_testkit::fixtures::silent_proxy::SilentProxy;
    use paperclip_env_testkit::leak_drills::{LeakDrill, silent_service_round};
    let emulator = Arc::new(E2bEmulator::start(Profile::E2b, KEY).await.unwrap());
    let upstream: std::net::SocketAddr = emulator
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Arc::new(SilentProxy::start(upstream).await.unwrap());
    let provider = E2bProvider::builder()
        .api_url(proxy.url("http"))
        .sandbox_url(proxy.url("http"))
        .http_options(http_options())
        .build()
        .unwrap();
    let (live, switch) = (emulator.clone(), proxy.clone());
    let drill = LeakDrill::new(
        Arc::new(provider),
        json!({"provider": "e2b", "apiKey": KEY}),
    )
    .call_deadline(Duration::from_secs(1))
    .live(move || live.live_sandboxes())
    .silence(move |on| switch.silence(on));
    silent_service_round(&drill).await.unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
}

#[tokio::test]
async fn run_resources_are_found_by_their_metadata_label() {
    let (emulator, provider) = e2b().await;
    let ctx = ctx(json!({}));
    let request = |run: &str| AcquireRequest {
        run_id: run.into(),
        workspace_mode: None,
        ..Default::default()
    };
    let a = provider.acquire(&ctx, &request("run-a")).await.unwrap();
    let _b = provider.acquire(&ctx, &request("run-b")).await.unwrap();
    let found = provider.list_run_resources(&ctx, "run-a").await.unwrap();
    let ids: Vec<_> = found.iter().filter_map(|h| h.id()).collect();
    assert_eq!(ids, vec![a.provider_lease_id.as_deref().unwrap()]);
    for handle in provider.list_run_resources(&ctx, "run-b").await.unwrap() {
        provider.destroy(&ctx, &handle).await.unwrap();
    }
    provider
        .destroy(
            &ctx,
            &LeaseHandle {
                provider_lease_id: a.provider_lease_id,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(emulator.live_sandboxes(), 0);
    assert!(
        provider
            .list_run_resources(&ctx, "run-a")
            .await
            .unwrap()
            .is_empty()
    );
}
