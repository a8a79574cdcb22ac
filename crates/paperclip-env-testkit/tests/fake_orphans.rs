//! A fresh fake instance (say, after a restart) releases a sandbox another
//! instance created, found through the lease's `fakeRootDir`, and touches
//! nothing outside its own temp root.

use paperclip_env_core::{CallContext, LeaseHandle, LeaseStatus, ProviderConfig, SandboxProvider};
use paperclip_env_testkit::fake::{DIR_PREFIX, FakeProvider};
use serde_json::json;

fn ctx() -> CallContext {
    CallContext {
        company_id: None,
        environment_id: "env".into(),
        issue_id: None,
        config: ProviderConfig::new(Default::default()),
    }
}

fn handle(dir: &std::path::Path) -> LeaseHandle {
    LeaseHandle {
        provider_lease_id: Some("sandbox://fake/run/old".into()),
        metadata: json!({"fakeRootDir": dir.display().to_string()})
            .as_object()
            .cloned(),
        expires_at: None,
    }
}

#[tokio::test]
async fn orphaned_sandbox_under_the_root_is_removed() {
    let root = tempfile::tempdir().unwrap();
    let orphan = root.path().join(format!("{DIR_PREFIX}orphan"));
    std::fs::create_dir_all(orphan.join("workspace")).unwrap();
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    fake.release(&ctx(), &handle(&orphan), LeaseStatus::Expired)
        .await
        .unwrap();
    assert!(!orphan.exists());
    // Releasing again is a no-op success.
    fake.release(&ctx(), &handle(&orphan), LeaseStatus::Expired)
        .await
        .unwrap();
}

#[tokio::test]
async fn directories_outside_the_root_or_without_the_prefix_are_left_alone() {
    let root = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join(format!("{DIR_PREFIX}x"));
    let unprefixed = root.path().join("precious");
    let nested = root.path().join(format!("{DIR_PREFIX}a/{DIR_PREFIX}b"));
    for dir in [&outside, &unprefixed, &nested] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    for dir in [&outside, &unprefixed, &nested] {
        fake.destroy(&ctx(), &handle(dir)).await.unwrap();
        fake.release(&ctx(), &handle(dir), LeaseStatus::Released)
            .await
            .unwrap();
        assert!(dir.exists(), "{} removed", dir.display());
    }
}
