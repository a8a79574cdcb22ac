//! The drivers core implements: `local` and `sandbox`.

mod builtin_fake;
mod local;
mod sandbox;

pub use local::LocalDriver;
pub use sandbox::SandboxDriver;

use serde_json::json;

use crate::lease::{Environment, JsonObject, LeaseContext};

/// `{driver, executionWorkspaceMode}`: the host keys every driver writes.
pub(crate) fn base_metadata(environment: &Environment, context: &LeaseContext) -> JsonObject {
    let mut md = JsonObject::new();
    md.insert("driver".into(), json!(environment.driver));
    md.insert(
        "executionWorkspaceMode".into(),
        json!(context.execution_workspace_mode),
    );
    md
}
