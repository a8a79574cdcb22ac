//! Paperclip 2026.916's host-owned sandbox flags (`streamRunLogs`,
//! `runnerLifecycleMode`, `runnerIdleTimeoutMs`, `archiveOnRelease`) survive
//! every provider's config normalization, the removed
//! `streamAgentSessionOutput` is stripped, and a pinned secret version is
//! refused naming the field.
#![cfg(feature = "full")]

use std::sync::Arc;

use paperclip_env::core::{ConfigPurpose, Environment, EnvironmentRuntime, Error, SandboxProvider};
use paperclip_env::providers;
use serde_json::{Value, json};

fn flags() -> Value {
    json!({"streamRunLogs": false, "runnerLifecycleMode": "warm", "runnerIdleTimeoutMs": 90000,
        "archiveOnRelease": true, "streamAgentSessionOutput": true})
}

/// Every provider with a config its own validation accepts.
fn providers_and_configs() -> Vec<(Arc<dyn SandboxProvider>, Value)> {
    vec![
        (Arc::new(providers::fake::FakeProvider::new()), json!({})),
        (
            Arc::new(providers::e2b::E2bProvider::builder().build().unwrap()),
            json!({"template": "base"}),
        ),
        (
            Arc::new(providers::e2b::E2bProvider::novita().build().unwrap()),
            json!({"apiKey": "7a1c2b8e-1111-4222-8333-944455556666"}),
        ),
        (
            Arc::new(
                providers::cloudflare::CloudflareProvider::builder()
                    .build()
                    .unwrap(),
            ),
            json!({"bridgeBaseUrl": "https://bridge.example.test", "bridgeAuthToken": "7a1c2b8e-1111-4222-8333-944455556666"}),
        ),
        (
            Arc::new(
                providers::daytona::DaytonaProvider::builder()
                    .build()
                    .unwrap(),
            ),
            json!({"apiKey": "7a1c2b8e-1111-4222-8333-944455556666"}),
        ),
        (
            Arc::new(
                providers::exe_dev::ExeDevProvider::builder()
                    .build()
                    .unwrap(),
            ),
            json!({"apiKey": "7a1c2b8e-1111-4222-8333-944455556666"}),
        ),
        (
            Arc::new(providers::modal::ModalProvider::builder().build().unwrap()),
            json!({"appName": "paperclip", "image": "python:3.12", "tokenId": "7a1c2b8e-1111-4222-8333-944455556666", "tokenSecret": "7a1c2b8e-1111-4222-8333-944455556667"}),
        ),
        (
            Arc::new(providers::kubernetes::KubernetesProvider::builder().build()),
            json!({"inCluster": true}),
        ),
    ]
}

#[tokio::test]
async fn host_flags_survive_every_providers_normalization() {
    let mut checked = Vec::new();
    for (provider, config) in providers_and_configs() {
        let key = provider.key().to_owned();
        if key != "fake-plugin" {
            // The seven built-in providers carry Paperclip 2026.916's plugin ids.
            assert_eq!(
                provider.plugin_key(),
                format!("paperclip.{key}-sandbox-provider"),
                "{key}"
            );
        }
        let runtime = EnvironmentRuntime::builder().provider(provider).build();
        let mut raw = config.as_object().unwrap().clone();
        raw.insert("provider".into(), json!(key));
        raw.extend(flags().as_object().unwrap().clone());
        let normalized = runtime
            .normalize_config(
                "sandbox",
                "Flags",
                &Value::Object(raw),
                ConfigPurpose::Probe,
            )
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(
            normalized["streamRunLogs"],
            json!(false),
            "{key}: {normalized}"
        );
        assert_eq!(normalized["runnerLifecycleMode"], json!("warm"), "{key}");
        assert_eq!(normalized["runnerIdleTimeoutMs"], json!(90000), "{key}");
        assert_eq!(normalized["archiveOnRelease"], json!(true), "{key}");
        assert!(
            normalized.get("streamAgentSessionOutput").is_none(),
            "{key}: {normalized}"
        );
        checked.push(key);
    }
    assert_eq!(checked.len(), 8, "{checked:?}");
}

#[tokio::test]
async fn a_pinned_secret_version_is_refused_naming_the_field() {
    let fake = providers::fake::FakeProvider::builder()
        .key("fake-secret")
        .secret_field("apiKey")
        .build();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake))
        .build();
    let config = json!({"provider": "fake-secret", "apiKey":
        {"type": "secret_ref", "secretId": "7a1c2b8e-1111-4222-8333-944455556666", "version": 3}});
    for purpose in [ConfigPurpose::Probe, ConfigPurpose::Persistence] {
        let err = runtime
            .normalize_config("sandbox", "Pinned", &config, purpose)
            .await
            .unwrap_err();
        let Error::InvalidConfig { field, message, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(field, "apiKey");
        assert!(message.contains("pins version 3"), "{message}");
    }
    let env = Environment::new("env-p", "Pinned", "sandbox", config);
    let err = runtime
        .acquire_run_lease(paperclip_env::core::AcquireRunLease::for_run(env, "run-p"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pins version 3"), "{err}");
    let latest = json!({"provider": "fake-secret", "apiKey":
        {"type": "secret_ref", "secretId": "7a1c2b8e-1111-4222-8333-944455556666", "version": "latest"}});
    runtime
        .normalize_config("sandbox", "Latest", &latest, ConfigPurpose::Probe)
        .await
        .unwrap();
}
