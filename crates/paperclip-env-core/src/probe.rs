//! Probe results (spec 00 §12).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{ok, driver, summary, details}` returned by "Test" on an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// Whether the environment is usable.
    pub ok: bool,
    /// The driver probed.
    pub driver: String,
    /// One-line summary.
    pub summary: String,
    /// Driver-specific details.
    pub details: Option<Value>,
}
