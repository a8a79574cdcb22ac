//! # paperclip-env-testkit
//!
//! What provider authors and SDK users need to test against paperclip-env:
//!
//! - [`fake`]: the deterministic fake provider (`fake-plugin`), with fault injection.
//! - [`conformance`]: the shared conformance suite (spec 11 Part A), one
//!   public check per line, run by every provider's own test file.
//! - [`recording`]: a provider wrapper that records every call, with
//!   lifecycle assertions.
//! - [`fixtures`]: real servers for integration tests (`sshd` feature: a
//!   throwaway OpenSSH server).
#![deny(missing_docs)]

pub mod conformance;
pub mod fake;
pub mod fixtures;
pub mod recording;
