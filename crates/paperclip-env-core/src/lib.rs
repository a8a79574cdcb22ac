//! # paperclip-env-core
//!
//! The core contract of paperclip-env: run AI-agent work in remote execution
//! environments. A caller acquires a **run lease** on an [`Environment`]
//! through the [`EnvironmentRuntime`], realizes a workspace in it, executes
//! commands (with streamed output), and releases the lease; the runtime
//! records every state change in a [`LeaseStore`].
//!
//! Two trait layers:
//! - [`EnvironmentRuntimeDriver`]: `local`, `ssh`, `sandbox`, `plugin` or your own.
//! - [`SandboxProvider`]: what the `sandbox` driver routes to by
//!   `config.provider` (E2B, Daytona, … in `paperclip-env-providers`; the fake
//!   in `paperclip-env-testkit`).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime, LeaseStatus};
//! let runtime = EnvironmentRuntime::builder().build();
//! let env = Environment::new("env-1", "Probe", "sandbox", serde_json::json!({"provider": "fake", "image": "alpine"}));
//! let record = runtime.acquire_run_lease(AcquireRunLease::for_run(env.clone(), "run-1")).await?;
//! assert!(record.lease.provider_lease_id.unwrap().starts_with("sandbox://fake/run-1/"));
//! runtime.release_run_leases("run-1", LeaseStatus::Released).await.into_result()?;
//! # Ok::<(), paperclip_env_core::Error>(())
//! # }).unwrap();
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod acquisition;
pub mod config;
pub mod deadline;
pub mod driver;
pub mod drivers;
pub mod env_vars;
mod error;
pub mod execute;
pub mod lease;
#[cfg(feature = "plugin")]
#[cfg_attr(docsrs, doc(cfg(feature = "plugin")))]
pub mod plugin;
pub mod probe;
pub mod provider;
pub mod realize;
pub mod reaper;
pub mod runtime;
pub mod secret;
pub mod store;
pub mod time;
pub mod workspace;

pub use config::ConfigIssue;
pub use driver::{
    AcquireInput, ConfigPurpose, DriverContext, EnvironmentRuntimeDriver, RuntimeOptions,
};
pub use env_vars::{EnvBinding, EnvVars};
pub use error::{BoxError, Error, HostKeyProblem, Operation, Result, Unsupported};
pub use execute::{
    CommandExit, ExecuteRequest, ExecuteResult, OutputCapture, OutputCollector, OutputSink,
    OutputStream,
};
pub use lease::{
    CleanupStatus, Environment, EnvironmentLease, EnvironmentStatus, ExecutionWorkspaceRef,
    JsonObject, LeaseContext, LeasePolicy, LeaseRecord, LeaseStatus,
};
pub use probe::ProbeResult;
pub use provider::{
    AcquireDetails, AcquireRequest, CallContext, Capabilities, ConfigValidation, Diagnostic,
    LeaseHandle, ProviderLease, ProviderProbe, Readiness, SandboxProvider, Severity,
};
pub use realize::{RealizeWorkspaceResult, WorkspaceSpec};
pub use reaper::{ReapReport, Reaper, ReaperHandle, ReaperOptions};
pub use runtime::{AcquireRunLease, EnvironmentRuntime, ReleaseReport, RuntimeBuilder};
pub use secret::{ProviderConfig, SecretResolver};
pub use store::{EnvironmentStore, LeaseStore};

/// Re-exported for `async_trait` implementations of the traits.
pub use async_trait::async_trait;
/// Re-exported so providers and callers name the same secret type.
pub use secrecy;
