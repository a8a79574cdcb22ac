//! The built-in `fake` sandbox provider (spec 10 §2): creates nothing, runs
//! nothing; used for probes and runtime tests.

use serde_json::json;

use crate::config::FakeSandboxConfig;
use crate::lease::JsonObject;
use crate::provider::ProviderLease;

pub(crate) fn metadata(config: &FakeSandboxConfig) -> JsonObject {
    let mut md = JsonObject::new();
    md.insert("provider".into(), json!("fake"));
    md.insert("image".into(), json!(config.image));
    md.insert("reuseLease".into(), json!(config.reuse_lease));
    config.host_flags.apply_to(&mut md);
    md
}

pub(crate) fn acquire(
    config: &FakeSandboxConfig,
    environment_id: &str,
    run_id: &str,
) -> ProviderLease {
    let id = if config.reuse_lease {
        format!("sandbox://fake/{environment_id}")
    } else {
        format!("sandbox://fake/{run_id}/{}", uuid::Uuid::new_v4())
    };
    ProviderLease::new(id, metadata(config))
}

pub(crate) fn resume(config: &FakeSandboxConfig, provider_lease_id: &str) -> ProviderLease {
    let mut md = metadata(config);
    md.insert("resumedLease".into(), json!(true));
    ProviderLease::new(provider_lease_id, md)
}

/// Config rebuilt from lease metadata: needs `provider: "fake"` and a string image.
pub(crate) fn config_from_metadata(metadata: Option<&JsonObject>) -> Option<FakeSandboxConfig> {
    let md = metadata?;
    if md.get("provider")?.as_str()? != "fake" {
        return None;
    }
    Some(FakeSandboxConfig {
        image: md.get("image")?.as_str()?.to_owned(),
        reuse_lease: md.get("reuseLease") == Some(&json!(true)),
        host_flags: Default::default(),
    })
}
