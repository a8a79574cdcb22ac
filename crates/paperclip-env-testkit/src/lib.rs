//! # paperclip-env-testkit
//!
//! What provider authors and SDK users need to test against paperclip-env:
//!
//! - [`fake`]: the deterministic fake provider (`fake-plugin`), with fault injection.
//! - [`conformance`]: the shared conformance suite (spec 11 Part A), one
//!   public check per line, run by every provider's own test file.
//! - `plugin_worker` (`plugin` feature): a reference worker of Paperclip's
//!   plugin protocol serving the fake, and its `paperclip-env-plugin-worker` binary.
//! - [`leak_drills`]: crash and deadline rounds proving an interrupted
//!   acquisition leaves nothing at the service, with a canary secret.
//! - [`logs`]: captures `tracing` output so tests can prove no secret is logged.
//! - [`recording`]: a provider wrapper that records every call, with
//!   lifecycle assertions.
//! - [`store_conformance`]: the lease store conformance suite (spec 00
//!   §2.4), run by every `LeaseStore` implementation's tests.
//! - [`postgres`]: a throwaway PostgreSQL server on loopback for store tests.
//! - [`fixtures`]: real servers for integration tests (`sshd` feature: a
//!   throwaway OpenSSH server).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

pub mod conformance;
#[cfg(feature = "emulators")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulators")))]
pub mod emulators;
/// The deterministic fake provider, re-exported from `paperclip-env-providers`
/// (feature `fake`), where the default build has it without the testkit.
pub use paperclip_env_providers::fake;
pub mod fixtures;
pub mod leak_drills;
pub mod logs;
#[cfg(feature = "plugin")]
#[cfg_attr(docsrs, doc(cfg(feature = "plugin")))]
pub mod plugin_worker;
pub mod postgres;
pub mod recording;
pub mod store_conformance;
