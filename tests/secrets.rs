//! Secrets (spec 11 Part D): never in metadata, Debug, Display, errors or logs.

use std::sync::Arc;

use paperclip_env::core::config::{ConfigShape, SshConfig};
use paperclip_env::core::secrecy::ExposeSecret;
use paperclip_env::core::secret::{
    InMemorySecretResolver, SecretRef, SecretResolver, is_secret_id,
};
use paperclip_env::core::{
    AcquireRunLease, ConfigPurpose, Environment, EnvironmentRuntime, Error, ExecuteRequest,
    LeaseStatus, Operation,
};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

const SECRET: &str = "sk-live-4f1d9c2be7a0";

struct Setup {
    runtime: EnvironmentRuntime,
    fake: FakeProvider,
    secrets: Arc<InMemorySecretResolver>,
    _root: tempfile::TempDir,
}

fn setup(echo: bool) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .key("fake-secret")
        .secret_field("apiKey")
        .echo_secrets_in_metadata(echo)
        .build();
    let secrets = Arc::new(InMemorySecretResolver::new());
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .secrets(secrets.clone())
        .build();
    Setup {
        runtime,
        fake,
        secrets,
        _root: root,
    }
}

#[tokio::test]
async fn d1_persistence_stores_ids_keeps_uuids_and_drops_blanks() {
    let s = setup(false);
    let saved = s
        .runtime
        .normalize_config(
            "sandbox",
            "Prod E2B",
            &json!({"provider": "fake-secret", "apiKey": SECRET}),
            ConfigPurpose::Persistence,
        )
        .await
        .unwrap();
    let id = saved["apiKey"].as_str().unwrap();
    assert!(is_secret_id(id));
    assert!(!saved.to_string().contains(SECRET));
    assert_eq!(
        s.secrets
            .resolve(&SecretRef::latest(id))
            .await
            .unwrap()
            .expose_secret(),
        SECRET
    );

    let kept = s
        .runtime
        .normalize_config(
            "sandbox",
            "Prod",
            &json!({"provider": "fake-secret", "apiKey": format!(" {id} ")}),
            ConfigPurpose::Persistence,
        )
        .await
        .unwrap();
    assert_eq!(kept["apiKey"], json!(id));
    let blank = s
        .runtime
        .normalize_config(
            "sandbox",
            "Prod",
            &json!({"provider": "fake-secret", "apiKey": "  "}),
            ConfigPurpose::Persistence,
        )
        .await
        .unwrap();
    assert!(blank.get("apiKey").is_none());
}

#[tokio::test]
async fn d2_d3_d5_provider_gets_plaintext_metadata_keeps_the_id_rotation_is_seen() {
    let s = setup(false);
    let id = s.secrets.insert(SECRET);
    let env = Environment::new(
        "env-1",
        "E",
        "sandbox",
        json!({"provider": "fake-secret", "apiKey": id}),
    );
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;
    assert_eq!(
        s.fake
            .last_config()
            .unwrap()
            .secret("apiKey")
            .unwrap()
            .expose_secret(),
        SECRET
    );
    let md = lease.metadata.clone().unwrap();
    assert_eq!(md["apiKey"], json!(id), "metadata holds the secret id");
    assert!(!serde_json::to_string(&lease).unwrap().contains(SECRET));

    s.secrets.set(&id, "sk-rotated-value");
    s.runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap();
    assert_eq!(
        s.fake
            .last_config()
            .unwrap()
            .secret("apiKey")
            .unwrap()
            .expose_secret(),
        "sk-rotated-value"
    );
}

#[tokio::test]
async fn d3_echoed_secrets_and_inline_plaintext_never_reach_metadata() {
    let s = setup(true);
    // Plaintext given inline (not as a reference) is used for the call but not stored.
    let env = Environment::new(
        "env-1",
        "E",
        "sandbox",
        json!({"provider": "fake-secret", "apiKey": SECRET}),
    );
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap()
        .lease;
    let stored = serde_json::to_string(&lease).unwrap();
    assert!(
        !stored.contains(SECRET),
        "lease leaked the secret: {stored}"
    );
    assert!(
        lease.metadata.unwrap().get("apiKeyEcho").is_none(),
        "an echo under an undeclared key is scrubbed"
    );
}

#[tokio::test]
async fn d4_no_secret_in_logs_errors_or_debug_across_a_faulty_lifecycle() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();

    let s = setup(true);
    let id = s.secrets.insert(SECRET);
    let env = Environment::new(
        "env-1",
        "E",
        "sandbox",
        json!({"provider": "fake-secret", "apiKey": id}),
    );
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1"))
        .await
        .unwrap()
        .lease;

    // A provider error that quotes the key is redacted before it reaches the caller.
    s.fake.faults().fail_next(Operation::Execute, || {
        Error::provider("fake-secret", format!("401 for key {SECRET}"))
    });
    let err = s
        .runtime
        .execute(&env, &lease, &ExecuteRequest::new("true"))
        .await
        .unwrap_err();
    assert!(
        !err.to_string().contains(SECRET) && !format!("{err:?}").contains(SECRET),
        "{err:?}"
    );
    assert!(err.to_string().contains("[REDACTED]"));

    // A failed cleanup records the (redacted) error.
    s.fake.faults().fail_next(Operation::Release, || {
        Error::provider("fake-secret", format!("bad key {SECRET}"))
    });
    let released = s
        .runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    let cleanup_error = released[0].lease.cleanup_error().unwrap().to_owned();
    assert!(!cleanup_error.contains(SECRET), "{cleanup_error}");

    assert!(!format!("{:?}", s.fake.last_config().unwrap()).contains(SECRET));
    assert!(!format!("{:?}", s.runtime).contains(SECRET));
    let logs = capture.text();
    assert!(
        !logs.is_empty(),
        "the lifecycle logged nothing; the capture is broken"
    );
    assert!(
        !logs.contains(SECRET),
        "a log line carries the secret:\n{logs}"
    );
}

#[test]
fn d4_config_types_redact_in_debug() {
    let ssh = SshConfig::parse(
        &json!({"host": "h", "username": "u", "remoteWorkspacePath": "/w", "privateKey": SECRET}),
        ConfigShape::Input,
    )
    .unwrap();
    assert!(!format!("{ssh:?}").contains(SECRET));
    assert!(!ssh.to_json().to_string().contains(SECRET));
    let request = ExecuteRequest::new("agent")
        .env("ANTHROPIC_API_KEY", SECRET)
        .stdin(SECRET);
    assert!(!format!("{request:?}").contains(SECRET));
}

/// An API key given inline (not as a reference) is moved into the secret
/// store on first use: the stored environment, the lease, `Debug` of every
/// type holding the config and the logs carry only the reference, and the
/// later calls (execute, release, the reaper's) still authenticate.
#[tokio::test]
async fn d6_inline_plaintext_becomes_a_reference_on_first_use() {
    let (capture, _guard) = paperclip_env_testkit::logs::LogCapture::start();
    let s = setup(false);
    let env = Environment::new(
        "env-inline",
        "Inline",
        "sandbox",
        json!({"provider": "fake-secret", "apiKey": SECRET}),
    );
    let input = AcquireRunLease::for_run(env.clone(), "run-1");
    assert!(!format!("{input:?}").contains(SECRET), "{input:?}");
    let record = s.runtime.acquire_run_lease(input).await.unwrap();
    assert!(!format!("{record:?}").contains(SECRET));

    // The environment is stored with a reference to a new secret.
    let stored = s
        .runtime
        .environment_store()
        .get("env-inline")
        .await
        .unwrap()
        .unwrap();
    let id = stored.config["apiKey"].as_str().unwrap().to_owned();
    assert!(is_secret_id(&id), "{}", stored.config);
    let value = s.secrets.resolve(&SecretRef::latest(&id)).await.unwrap();
    assert_eq!(value.expose_secret(), SECRET);
    assert_eq!(record.environment.config["apiKey"], json!(id));
    assert_eq!(record.lease.metadata.as_ref().unwrap()["apiKey"], json!(id));

    // Later calls rebuild the config from the lease and still get the key,
    // even with the caller's original (plaintext) environment.
    s.runtime
        .execute(&env, &record.lease, &ExecuteRequest::new("true"))
        .await
        .unwrap();
    let seen = s.fake.last_config().unwrap();
    assert_eq!(seen.secret("apiKey").unwrap().expose_secret(), SECRET);
    s.runtime
        .release_run_leases("run-1", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
    assert_eq!(s.fake.live_leases(), 0, "the release authenticated");
    assert_eq!(
        s.fake
            .last_config()
            .unwrap()
            .secret("apiKey")
            .unwrap()
            .expose_secret(),
        SECRET
    );
    assert!(!capture.text().contains(SECRET), "{}", capture.text());
}

/// A resolver that cannot store secrets refuses an inline secret with an
/// error naming the field, before anything is created.
#[tokio::test]
async fn d6_inline_plaintext_is_refused_when_it_cannot_be_stored() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .key("fake-secret")
        .secret_field("apiKey")
        .build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .secrets(Arc::new(
            paperclip_env::core::secret::EnvSecretResolver::new(),
        ))
        .build();
    let env = Environment::new(
        "env-inline",
        "Inline",
        "sandbox",
        json!({"provider": "fake-secret", "apiKey": SECRET}),
    );
    let err = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, "run-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("apiKey") && !shown.contains(SECRET),
        "{shown}"
    );
    assert_eq!(fake.live_leases(), 0);
    assert!(
        runtime
            .environment_store()
            .get("env-inline")
            .await
            .unwrap()
            .is_none()
    );
}

/// Paperclip 2026.916 `envVars`: every command of a lease sees them, secret
/// references are resolved on each call (a rotation shows on the next
/// command), the request's own env wins, and an error quoting a resolved
/// value is redacted.
#[tokio::test]
async fn env_vars_reach_every_command_with_secrets_resolved_per_call() {
    let s = setup(false);
    let id = s.secrets.insert(SECRET);
    let vars = paperclip_env::core::env_vars::parse_env_vars(&json!({
        "API_TOKEN": {"type": "secret_ref", "secretId": id, "version": "latest"},
        "MODE": {"type": "plain", "value": "ci"},
        "LEGACY": "inline",
    }))
    .unwrap();
    let env = Environment::new("env-v", "E", "sandbox", json!({"provider": "fake-secret"}))
        .with_env_vars(vars);
    let lease = s
        .runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-v"))
        .await
        .unwrap()
        .lease;
    assert!(!serde_json::to_string(&lease).unwrap().contains(SECRET));
    let script = ExecuteRequest::shell("printf '%s|%s|%s' \"$API_TOKEN\" \"$MODE\" \"$LEGACY\"");
    let out = s.runtime.execute(&env, &lease, &script).await.unwrap();
    assert_eq!(out.stdout, format!("{SECRET}|ci|inline"));

    s.secrets.set(&id, "sk-rotated-2");
    let own = script.clone().env("MODE", "mine");
    let out = s.runtime.execute(&env, &lease, &own).await.unwrap();
    assert_eq!(
        out.stdout, "sk-rotated-2|mine|inline",
        "rotation seen, request env wins"
    );

    s.fake.faults().fail_next(Operation::Execute, || {
        Error::provider("fake-secret", "env had sk-rotated-2 in it")
    });
    let err = s.runtime.execute(&env, &lease, &script).await.unwrap_err();
    assert!(!err.to_string().contains("sk-rotated-2"), "{err}");
    assert!(err.to_string().contains("[REDACTED]"), "{err}");

    // A secret that cannot be resolved fails the command, naming the variable.
    assert!(s.secrets.remove(&id));
    let err = s.runtime.execute(&env, &lease, &script).await.unwrap_err();
    assert!(err.to_string().contains("API_TOKEN"), "{err}");
    s.runtime
        .release_run_leases("run-v", LeaseStatus::Released)
        .await
        .into_result()
        .unwrap();
}
