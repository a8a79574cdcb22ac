//! # paperclip-env
//!
//! Run AI-agent work in remote execution environments from Rust: acquire a
//! run lease on a machine (a cloud sandbox, a Kubernetes pod, an SSH host, a
//! local temp dir), realize a workspace there, execute commands with streamed
//! output, and release or reuse the lease, with nothing leaked and no secret
//! exposed.
//!
//! This crate re-exports [`core`] (the contract and the runtime),
//! [`providers`] (one cargo feature per provider) and, for tests,
//! `paperclip-env-testkit`.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use paperclip_env::core::{AcquireRunLease, Environment, EnvironmentRuntime, LeaseStatus};
//! let runtime = EnvironmentRuntime::builder().build();
//! let env = Environment::new("env-1", "Local", "local", serde_json::json!({}));
//! runtime.acquire_run_lease(AcquireRunLease::for_run(env, "run-1")).await?;
//! runtime.release_run_leases("run-1", LeaseStatus::Released).await.into_result()?;
//! # Ok::<(), paperclip_env::core::Error>(())
//! # }).unwrap();
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

pub use paperclip_env_core as core;
pub use paperclip_env_providers as providers;

pub use paperclip_env_core::{
    AcquireRunLease, Environment, EnvironmentLease, EnvironmentRuntime, Error, ExecuteRequest,
    ExecuteResult, LeaseStatus, Result, SandboxProvider,
};

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
