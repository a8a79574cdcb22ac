//! # paperclip-env-modal-proto
//!
//! A minimal, wire-compatible subset of Modal's gRPC API (spec 25 §3): the
//! control plane `modal.client.ModalClient` and the per-task command router
//! `modal.task_command_router.TaskCommandRouter`, with Modal's package names
//! and field numbers. Feature `client` generates the tonic clients, feature
//! `server` the server traits (used by the testkit emulator).
//!
//! ```
//! use paperclip_env_modal_proto::router::{TaskExecStdioFileDescriptor, TaskExecStdoutConfig};
//! // The router's zero values mean "discard" and "stdout".
//! assert_eq!(TaskExecStdoutConfig::Devnull as i32, 0);
//! assert_eq!(TaskExecStdioFileDescriptor::Stdout as i32, 0);
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

/// `modal.client`: the control-plane messages and the `ModalClient` service.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("modal.client");
}

/// `modal.task_command_router`: exec through the per-task command router.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod router {
    tonic::include_proto!("modal.task_command_router");
}

/// The fully qualified control-plane service name (the `:path` prefix).
pub const MODAL_CLIENT_SERVICE: &str = "modal.client.ModalClient";

/// The fully qualified command-router service name.
pub const TASK_COMMAND_ROUTER_SERVICE: &str = "modal.task_command_router.TaskCommandRouter";

/// The prost runtime the generated types use (for encoding status details).
pub use prost;
/// Well-known types (`google.protobuf.Any` of status details).
pub use prost_types;
