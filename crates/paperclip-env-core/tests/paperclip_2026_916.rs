//! Round trips against Paperclip 2026.916 rows (fixtures under
//! `tests/fixtures/paperclip-2026.916`, written from upstream's validators
//! and schema): what Paperclip wrote reads and re-serializes unchanged, and
//! what the SDK writes has upstream's shape.

use std::path::PathBuf;

use paperclip_env_core::env_vars::{EnvBinding, VersionSelector};
use paperclip_env_core::lease::{
    Environment, EnvironmentLease, LeaseStatus, PENDING_CLEANUP_ATTEMPT_CAP, read_cleanup_attempts,
};
use paperclip_env_core::store::{InMemoryLeaseStore, LeaseStore, NewLease, ReleaseUpdate};
use paperclip_env_core::{CleanupStatus, EnvironmentStore, store::InMemoryEnvironmentStore};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/paperclip-2026.916")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

const ENVIRONMENTS: [&str; 4] = [
    "environment-sandbox-plugin.json",
    "environment-local.json",
    "environment-fake-sandbox.json",
    "environment-created-by-sdk.json",
];
const LEASES: [&str; 3] = [
    "lease-active.json",
    "lease-pending-cleanup-orphan.json",
    "lease-released-with-receipt.json",
];

/// The keys of upstream's `toEnvironment` (no `companyId`: instance-scoped).
const ENVIRONMENT_KEYS: [&str; 10] = [
    "config",
    "createdAt",
    "description",
    "driver",
    "envVars",
    "id",
    "metadata",
    "name",
    "status",
    "updatedAt",
];
/// The keys of upstream's `toEnvironmentLease` (no `cleanupAttempts` / `cleanupError`).
const LEASE_KEYS: [&str; 19] = [
    "acquiredAt",
    "cleanupStatus",
    "companyId",
    "createdAt",
    "environmentId",
    "executionWorkspaceId",
    "expiresAt",
    "failureReason",
    "heartbeatRunId",
    "id",
    "issueId",
    "lastUsedAt",
    "leasePolicy",
    "metadata",
    "provider",
    "providerLeaseId",
    "releasedAt",
    "status",
    "updatedAt",
];

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[test]
fn upstream_environments_read_and_rewrite_unchanged() {
    for name in ENVIRONMENTS {
        let raw = fixture(name);
        let env: Environment =
            serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = serde_json::to_value(&env).unwrap();
        assert_eq!(back, raw, "{name}");
        assert_eq!(keys(&back), ENVIRONMENT_KEYS, "{name}");
    }
    let env: Environment = serde_json::from_value(fixture(ENVIRONMENTS[0])).unwrap();
    assert_eq!(env.company_id, None, "instance-scoped");
    assert_eq!(env.env_vars.len(), 7);
    assert!(matches!(
        env.env_vars["SLACK_BOT_TOKEN"],
        EnvBinding::SecretRef {
            version: Some(VersionSelector::Pinned(2)),
            ..
        }
    ));
    assert!(
        !format!("{env:?}").contains("inline-value") && !format!("{env:?}").contains("production"),
        "inline and plain values never reach Debug"
    );
}

#[test]
fn upstream_leases_read_and_rewrite_unchanged_and_a_list_with_a_null_environment_reads() {
    let mut list = Vec::new();
    for name in LEASES {
        let raw = fixture(name);
        let lease: EnvironmentLease =
            serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let back = serde_json::to_value(&lease).unwrap();
        assert_eq!(back, raw, "{name}");
        assert_eq!(keys(&back), LEASE_KEYS, "{name}");
        list.push(raw);
    }
    let leases: Vec<EnvironmentLease> = serde_json::from_value(Value::Array(list)).unwrap();
    let orphan = &leases[1];
    assert_eq!(orphan.environment_id, None);
    assert_eq!(orphan.status, LeaseStatus::PendingCleanup);
    assert_eq!(orphan.cleanup_attempts(), 2);
    assert_eq!(
        orphan.failure_reason.as_deref(),
        Some(paperclip_env_core::lease::failure_reasons::ACQUIRE_REJECTED_TEARDOWN_FAILED)
    );
    let receipt = leases[2].termination_receipt().unwrap();
    assert_eq!(receipt["schema"], json!("paperclip.remote-termination.v1"));
}

#[test]
fn sweep_counts_are_read_as_upstream_reads_them() {
    let md = |v: Value| {
        json!({"pendingCleanupRetryAttempts": v})
            .as_object()
            .cloned()
    };
    assert_eq!(read_cleanup_attempts(None), 0);
    assert_eq!(read_cleanup_attempts(md(json!("3")).as_ref()), 0);
    assert_eq!(read_cleanup_attempts(md(json!(-2)).as_ref()), 0);
    assert_eq!(read_cleanup_attempts(md(json!(2.9)).as_ref()), 2);
    assert_eq!(
        read_cleanup_attempts(md(json!(1e300)).as_ref()),
        PENDING_CLEANUP_ATTEMPT_CAP
    );
}

/// What the SDK writes has upstream's shape: a UUID id, `envVars` with the
/// bindings as given, no `companyId`, and it equals the stored fixture
/// (checked with upstream's `createEnvironmentSchema`).
#[tokio::test]
async fn environments_the_sdk_creates_have_upstream_shape_and_survive_a_store() {
    let raw: Value = json!({
        "TOKEN": {"type": "secret_ref", "secretId": "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d", "version": "latest"},
        "MODE": {"type": "plain", "value": "ci"},
        "GH": {"type": "user_secret_ref", "key": "github.token", "required": false}
    });
    let vars = paperclip_env_core::env_vars::parse_env_vars(&raw).unwrap();
    let env = Environment::create(
        "Created by the SDK",
        "sandbox",
        json!({"provider": "fake", "image": "ubuntu:24.04", "reuseLease": false}),
    )
    .with_env_vars(vars);
    assert!(uuid_like(&env.id), "{}", env.id);
    let mut ours = serde_json::to_value(&env).unwrap();
    // Normalise what differs per run.
    ours["id"] = json!("00000000-0000-4000-8000-000000000001");
    ours["createdAt"] = json!("2026-09-16T12:00:00.000Z");
    ours["updatedAt"] = json!("2026-09-16T12:00:00.000Z");
    assert_eq!(ours, fixture("environment-created-by-sdk.json"));

    let store = InMemoryEnvironmentStore::new();
    store.put(env.clone()).await.unwrap();
    assert_eq!(store.get(&env.id).await.unwrap().unwrap(), env);
}

fn uuid_like(s: &str) -> bool {
    paperclip_env_core::secret::is_secret_id(s)
}

/// Lease ids are UUIDs, and the counters Paperclip keeps in metadata never
/// become top-level keys of the lease JSON.
#[tokio::test]
async fn leases_the_sdk_writes_have_upstream_keys() {
    let store = InMemoryLeaseStore::new();
    let lease = store
        .insert(NewLease {
            environment_id: "5f0d2c1e-8a4b-4c7d-9e2f-1a3b5c7d9e0f".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(uuid_like(&lease.id));
    store
        .release(
            &lease.id,
            LeaseStatus::PendingCleanup,
            ReleaseUpdate {
                failure_reason: Some("release_cleanup_failed".into()),
                cleanup_status: Some(CleanupStatus::Failed),
                cleanup_error: Some("boom".into()),
                termination: None,
            },
        )
        .await
        .unwrap();
    assert!(store.claim_cleanup_attempt(&lease.id, 0).await.unwrap());
    let row = store.get(&lease.id).await.unwrap().unwrap();
    let json = serde_json::to_value(&row).unwrap();
    assert_eq!(keys(&json), LEASE_KEYS);
    assert_eq!(json["metadata"]["pendingCleanupRetryAttempts"], json!(1));
    assert_eq!(
        json["environmentId"],
        json!("5f0d2c1e-8a4b-4c7d-9e2f-1a3b5c7d9e0f")
    );
    let back: EnvironmentLease = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(back).unwrap(), json);
}

/// The sandbox configs Paperclip stores, host flags included, parse and
/// normalize to themselves.
#[test]
fn upstream_sandbox_configs_with_host_flags_parse_and_normalize_to_themselves() {
    use paperclip_env_core::config::{RunnerLifecycleMode, SandboxConfig};
    for name in [
        "environment-sandbox-plugin.json",
        "environment-fake-sandbox.json",
    ] {
        let config = fixture(name)["config"].clone();
        let parsed = SandboxConfig::parse(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.to_json(), config, "{name}");
    }
    let warm = SandboxConfig::parse(&fixture("environment-sandbox-plugin.json")["config"]).unwrap();
    assert_eq!(
        warm.host_flags().runner_lifecycle_mode,
        Some(RunnerLifecycleMode::Warm)
    );
}
