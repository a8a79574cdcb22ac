//! exe.dev provider against the testkit emulator (HTTPS API) plus a real
//! OpenSSH sshd (the VMs' SSH): the shared conformance suite and one test
//! per injected fault.
#![cfg(feature = "exe-dev")]

use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::{
    AcquireRequest, CallContext, Error, ExecuteRequest, LeaseHandle, LeaseStatus, OutputCollector,
    ProviderConfig, SandboxProvider,
};
use paperclip_env_providers::exe_dev::ExeDevProvider;
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::exe_dev::{ExeCommand, ExeDevEmulator, ExeFault};
use paperclip_env_testkit::fixtures::sshd::{self, SshServer};
use secrecy::SecretString;
use serde_json::{Value, json};

const TOKEN: &str = "exe1.test-token-0123456789";

fn server() -> Option<SshServer> {
    if !sshd::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "sshd/ssh-keygen missing in CI: run scripts/setup.sh"
        );
        eprintln!("skipping: sshd/ssh-keygen not installed (run scripts/setup.sh)");
        return None;
    }
    Some(SshServer::start().expect("start sshd fixture"))
}

struct Env {
    srv: SshServer,
    api: Arc<ExeDevEmulator>,
    provider: ExeDevProvider,
}

async fn env() -> Option<Env> {
    let srv = server()?;
    let api = Arc::new(
        ExeDevEmulator::start(TOKEN, srv.host(), srv.port())
            .await
            .unwrap(),
    );
    let provider = ExeDevProvider::builder()
        .known_hosts(srv.known_hosts())
        .connect_timeout(Duration::from_secs(5))
        .ssh_connect_retries(2, Duration::from_millis(50))
        .build()
        .unwrap();
    Some(Env { srv, api, provider })
}

fn config(e: &Env) -> Value {
    json!({
        "apiKey": TOKEN,
        "apiUrl": e.api.url(),
        "sshPrivateKey": e.srv.client_key().private_key,
        "sshUser": e.srv.user(),
        "strictHostKeyChecking": "yes",
        "timeoutMs": 20000,
        "env": {"FOO": "bar"},
        "tags": "ci, paperclip",
    })
}

fn ctx(config: Value) -> CallContext {
    CallContext {
        company_id: Some("company-1".into()),
        environment_id: "env-1".into(),
        issue_id: None,
        config: ProviderConfig::new(config.as_object().cloned().unwrap_or_default()),
    }
}

fn acquire_request(run: &str) -> AcquireRequest {
    AcquireRequest {
        run_id: run.into(),
        workspace_mode: None,
        ..Default::default()
    }
}

fn handle(lease: &paperclip_env_core::ProviderLease) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone(),
        expires_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exe_dev_passes_conformance() {
    let Some(e) = env().await else { return };
    let (live, creates, fa, fr) = (e.api.clone(), e.api.clone(), e.api.clone(), e.api.clone());
    let fixture = Fixture::new(Arc::new(e.provider.clone()))
        .config(config(&e))
        .invalid_config(json!({"apiKey": TOKEN, "timeoutMs": 0, "sshPort": 70000}))
        .secret_value(TOKEN)
        .secret_value(e.srv.client_key().private_key.clone())
        .live_resources(move || live.live_vms())
        .create_calls(move || creates.create_calls())
        .fail_next_acquire(move || fa.inject(ExeCommand::New, ExeFault::UnreachableSsh, 1))
        .fail_next_release(move || fr.inject(ExeCommand::Rm, ExeFault::Status(500, "boom"), 1))
        .call_timeout(Duration::from_secs(30));
    let report = conformance::run(&fixture).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert_eq!(e.api.live_vms(), 0, "VMs left: {:?}", e.api.vm_names());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_execute_stdin_env_and_commands() {
    let Some(e) = env().await else { return };
    let c = ctx(config(&e));
    let lease = e
        .provider
        .acquire(&c, &acquire_request("Run-42"))
        .await
        .unwrap();
    assert_eq!(
        lease.provider_lease_id.as_deref(),
        Some("paperclip-env1-run42")
    );
    let h = handle(&lease);
    let out = OutputCollector::buffered();
    let mut req = ExecuteRequest::new("sh")
        .arg("-c")
        .arg("cat; printf '%s' \"$Q\"; pwd");
    req.env.insert("Q".into(), "it's".into());
    req.stdin = Some("hello\n".into());
    let exit = e.provider.execute(&c, &h, &req, &out).await.unwrap();
    let result = out.finish(exit);
    assert_eq!(result.exit_code, Some(0), "{}", result.stderr);
    let cwd = lease.metadata.as_ref().unwrap()["remoteCwd"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(result.stdout, format!("hello\nit's{cwd}\n"));
    let new = e
        .api
        .commands()
        .into_iter()
        .find(|c| c.starts_with("new "))
        .unwrap();
    assert!(new.contains("--no-email") && new.contains("--env='FOO=bar'"));
    assert!(new.contains("--tag='ci' --tag='paperclip'") && new.contains("nodesource"));
    // Non-zero exit and timeout.
    let out = OutputCollector::buffered();
    let exit = e
        .provider
        .execute(
            &c,
            &h,
            &ExecuteRequest::new("sh")
                .arg("-c")
                .arg("echo no >&2; exit 3"),
            &out,
        )
        .await
        .unwrap();
    assert_eq!(exit.exit_code, Some(3));
    let mut slow = ExecuteRequest::new("sleep").arg("30");
    slow.timeout_ms = Some(500);
    let exit = e
        .provider
        .execute(&c, &h, &slow, &OutputCollector::buffered())
        .await
        .unwrap();
    assert!(exit.timed_out && exit.exit_code.is_none());
    // Invalid env key is rejected before connecting.
    let mut bad = ExecuteRequest::new("true");
    bad.env.insert("1BAD".into(), "x".into());
    let err = e
        .provider
        .execute(&c, &h, &bad, &OutputCollector::buffered())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Invalid exe.dev environment variable key: 1BAD")
    );
    e.provider
        .release(&c, &h, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(e.api.live_vms(), 0);
    // Resume of a removed VM → expired.
    let resumed = e.provider.resume(&c, &h).await.unwrap();
    assert!(resumed.provider_lease_id.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_adopts_the_vm_by_name() {
    let Some(e) = env().await else { return };
    let mut cfg = config(&e);
    cfg["reuseLease"] = json!(true);
    let c = ctx(cfg);
    let first = e
        .provider
        .acquire(&c, &acquire_request("r1"))
        .await
        .unwrap();
    e.provider
        .release(&c, &handle(&first), LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(e.api.live_vms(), 1);
    let second = e
        .provider
        .acquire(&c, &acquire_request("r1"))
        .await
        .unwrap();
    assert_eq!(first.provider_lease_id, second.provider_lease_id);
    assert_eq!(e.api.create_calls(), 1);
    e.provider.destroy(&c, &handle(&second)).await.unwrap();
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_unauthenticated_and_not_leaked() {
    let Some(e) = env().await else { return };
    let (logs, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let mut cfg = config(&e);
    cfg["apiKey"] = json!("exe1.wrong-token-secret");
    let err = e
        .provider
        .acquire(&ctx(cfg), &acquire_request("r"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("(401)"));
    assert!(!format!("{err:?} {err}").contains("wrong-token-secret"));
    assert!(!logs.text().contains("wrong-token-secret"));
    assert!(!format!("{:?}", e.provider).contains(TOKEN));
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_200_and_non_json_are_errors() {
    let Some(e) = env().await else { return };
    let c = ctx(config(&e));
    e.api
        .inject(ExeCommand::New, ExeFault::ErrorInOk("quota exceeded"), 1);
    let err = e
        .provider
        .acquire(&c, &acquire_request("r"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("quota exceeded"), "{err}");
    assert!(
        !err.to_string().contains("FOO=bar"),
        "env values are redacted: {err}"
    );
    e.api.inject(ExeCommand::New, ExeFault::NonJsonOk, 1);
    let err = e
        .provider
        .acquire(&c, &acquire_request("r"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("did not return VM metadata"),
        "{err}"
    );
    assert_eq!(e.api.live_vms(), 0);
    // A `new` answer without VM fields is adopted through `ls`.
    e.api.inject(ExeCommand::New, ExeFault::NoVmFields, 1);
    let lease = e.provider.acquire(&c, &acquire_request("r")).await.unwrap();
    e.provider
        .release(&c, &handle(&lease), LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_is_surfaced_with_redacted_command() {
    let Some(e) = env().await else { return };
    let c = ctx(config(&e));
    e.api
        .inject(ExeCommand::New, ExeFault::Status(503, "upstream down"), 1);
    let err = e
        .provider
        .acquire(&c, &acquire_request("r"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("(503)") && text.contains("upstream down"),
        "{text}"
    );
    assert!(text.contains("--env='FOO=[REDACTED]'"), "{text}");
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_vm_is_removed_after_failed_acquire() {
    let Some(e) = env().await else { return };
    let c = ctx(config(&e));
    e.api.inject(ExeCommand::New, ExeFault::UnreachableSsh, 1);
    let err = e
        .provider
        .acquire(&c, &acquire_request("r"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("exe.dev VM paperclip-env1-r"),
        "{err}"
    );
    assert_eq!(e.api.create_calls(), 1);
    assert_eq!(e.api.remove_calls(), 1);
    assert_eq!(e.api.live_vms(), 0);
    // Probe reports the failure and leaves nothing behind.
    e.api.inject(ExeCommand::New, ExeFault::UnreachableSsh, 1);
    let probe = e.provider.probe(&c).await.unwrap();
    assert!(!probe.ok);
    assert_eq!(e.api.live_vms(), 0);
    let probe = e.provider.probe(&c).await.unwrap();
    assert!(probe.ok, "{probe:?}");
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_endpoint_override_and_validation() {
    let Some(e) = env().await else { return };
    let provider = ExeDevProvider::builder()
        .known_hosts(e.srv.known_hosts())
        .ssh_endpoint(e.srv.host(), e.srv.port())
        .build()
        .unwrap();
    let c = ctx(config(&e));
    let lease = provider.acquire(&c, &acquire_request("ovr")).await.unwrap();
    provider
        .release(&c, &handle(&lease), LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(e.api.live_vms(), 0);
    let v = provider
        .validate_config(
            json!({"sshPrivateKey": "ssh-ed25519 AAAA me@host", "apiKey": "k"})
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!v.ok);
    assert!(v.errors[0].message.contains("PUBLIC key"));
    let v = provider
        .validate_config(
            json!({"namePrefix": " Paperclip Sandbox "})
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!v.ok, "no API key");
    let with_key = ExeDevProvider::builder()
        .api_key(SecretString::from("k".to_owned()))
        .build()
        .unwrap();
    let v = with_key
        .validate_config(
            json!({"namePrefix": " Paperclip Sandbox "})
                .as_object()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(v.ok);
    assert_eq!(
        v.normalized_config.unwrap()["namePrefix"],
        "paperclip-sandbox"
    );
    assert_eq!(v.warnings.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_api_times_out() {
    let Some(e) = env().await else { return };
    let mut cfg = config(&e);
    cfg["timeoutMs"] = json!(300);
    e.api
        .inject(ExeCommand::New, ExeFault::Delay(Duration::from_secs(2)), 1);
    let err = e
        .provider
        .acquire(&ctx(cfg), &acquire_request("slow"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_realize_and_workspace_transport() {
    let Some(e) = env().await else { return };
    let c = ctx(config(&e));
    let lease = e
        .provider
        .acquire(&c, &acquire_request("ws"))
        .await
        .unwrap();
    let h = handle(&lease);
    let resumed = e.provider.resume(&c, &h).await.unwrap();
    assert_eq!(resumed.provider_lease_id, lease.provider_lease_id);
    assert_eq!(resumed.metadata.as_ref().unwrap()["resumedLease"], true);
    let target = e.srv.dir().join("realized dir").display().to_string();
    let spec = paperclip_env_core::realize::WorkspaceSpec {
        remote_path: Some(target.clone()),
        ..Default::default()
    };
    let mut md = h.metadata.clone().unwrap();
    md.remove("remoteCwd");
    let no_cwd = LeaseHandle {
        metadata: Some(md),
        ..h.clone()
    };
    let realized = e
        .provider
        .realize_workspace(&c, &no_cwd, &spec)
        .await
        .unwrap();
    assert_eq!(realized.cwd, target);
    assert!(std::path::Path::new(&target).is_dir());
    assert!(e.provider.capabilities().native_sync);
    let transport = e
        .provider
        .workspace_transport(&c, &h)
        .await
        .unwrap()
        .unwrap();
    let local = e.srv.dir().join("local.bin");
    std::fs::write(&local, b"archive bytes").unwrap();
    let remote = format!("{target}/copy.bin");
    transport.put_file(&local, &remote, 10_000).await.unwrap();
    let back = e.srv.dir().join("back.bin");
    transport.get_file(&remote, &back, 10_000).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), b"archive bytes");
    e.provider
        .release(&c, &h, LeaseStatus::Released)
        .await
        .unwrap();
    assert_eq!(e.api.live_vms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_metadata_and_debug() {
    let Some(e) = env().await else { return };
    let (logs, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let c = ctx(config(&e));
    let key = e.srv.client_key().private_key.clone();
    let key_body = key.lines().nth(1).unwrap_or_default().to_owned();
    let lease = e
        .provider
        .acquire(&c, &acquire_request("sec"))
        .await
        .unwrap();
    let h = handle(&lease);
    let out = OutputCollector::buffered();
    e.provider
        .execute(&c, &h, &ExecuteRequest::new("true"), &out)
        .await
        .unwrap();
    e.provider
        .release(&c, &h, LeaseStatus::Released)
        .await
        .unwrap();
    let md = serde_json::to_string(&lease.metadata).unwrap();
    for secret in [TOKEN, key_body.as_str()] {
        assert!(!logs.text().contains(secret));
        assert!(!md.contains(secret));
        assert!(!format!("{:?}", e.provider).contains(secret));
    }
    let parsed = paperclip_env_providers::exe_dev::ExeDevConfig::from_provider_config(&c.config);
    assert!(!format!("{parsed:?}").contains(TOKEN));
    assert!(!format!("{parsed:?}").contains(&key_body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_key_problems_remove_the_vm() {
    let Some(e) = env().await else { return };
    // Passes the linter, but is not a loadable key.
    let mut cfg = config(&e);
    cfg["sshPrivateKey"] =
        json!("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----");
    let err = e
        .provider
        .acquire(&ctx(cfg), &acquire_request("badkey"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("isn't an OpenSSH-format private key"),
        "{err}"
    );
    assert_eq!(e.api.live_vms(), 0);
    // A valid key the VM does not accept.
    let other = sshd::generate_key(e.srv.dir(), "stranger").unwrap();
    let mut cfg = config(&e);
    cfg["sshPrivateKey"] = json!(other.private_key);
    let err = e
        .provider
        .acquire(&ctx(cfg), &acquire_request("auth"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(
        err.to_string().contains("Failed to inspect exe.dev VM"),
        "{err}"
    );
    assert!(!err.to_string().contains(&other.private_key));
    assert_eq!(e.api.live_vms(), 0);
    assert_eq!(e.api.remove_calls(), 2);
}
