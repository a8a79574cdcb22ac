//! # paperclip-env-providers
//!
//! Sandbox providers and drivers for paperclip-env, each behind a cargo feature.
//!
//! | feature | what it adds |
//! | --- | --- |
//! | `fake` | the deterministic local fake provider (`fake-plugin`) from the testkit |
//! | `ssh` | the `ssh` runtime driver and reusable SSH transport ([`ssh`]) |
//! | `e2b`, `novita`, `daytona`, `cloudflare`, `exe-dev`, `modal`, `kubernetes` | reserved for their providers |
//! | `full` | every provider |
#![deny(missing_docs)]
#![forbid(unsafe_code)]

/// The deterministic fake provider (`fake-plugin`): commands run as real local
/// processes in an isolated temp directory.
#[cfg(feature = "fake")]
pub mod fake {
    pub use paperclip_env_testkit::fake::*;
}

#[cfg(feature = "ssh")]
pub mod ssh;
