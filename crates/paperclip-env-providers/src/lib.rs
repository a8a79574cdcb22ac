//! # paperclip-env-providers
//!
//! Sandbox providers and drivers for paperclip-env, each behind a cargo feature.
//!
//! | feature | what it adds |
//! | --- | --- |
//! | `fake` | the deterministic local fake provider (`fake-plugin`): real processes in a temp dir, fault injection (the testkit re-exports it) |
//! | `e2b` | E2B sandboxes: control-plane REST plus the in-sandbox envd Connect-RPC API |
//! | `novita` | Novita Agent Sandbox: the E2B protocol with Novita's profile |
//! | `cloudflare` | Cloudflare Sandbox through the Paperclip bridge Worker (JSON + SSE) |
//! | `http` | the shared HTTP machinery (enabled by every HTTP provider) |
//! | `ssh` | the `ssh` runtime driver and reusable SSH transport |
//! | `daytona` | Daytona sandboxes: REST API plus the toolbox daemon (sessions, WebSocket logs) |
//! | `exe-dev` | exe.dev VMs: lifecycle over the HTTPS API, commands over SSH |
//! | `modal` | Modal sandboxes over Modal's gRPC API (control plane plus the per-task command router) |
//! | `kubernetes` | Kubernetes: one tenant namespace per company, an agent-sandbox `Sandbox` CR or a `batch/v1` Job per run, exec over the WebSocket exec subresource |
//! | `full` | every provider |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "fake")]
#[cfg_attr(docsrs, doc(cfg(feature = "fake")))]
pub mod fake;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;

#[cfg(feature = "e2b")]
#[cfg_attr(docsrs, doc(cfg(feature = "e2b")))]
pub mod e2b;

#[cfg(feature = "cloudflare")]
#[cfg_attr(docsrs, doc(cfg(feature = "cloudflare")))]
pub mod cloudflare;

#[cfg(feature = "ssh")]
#[cfg_attr(docsrs, doc(cfg(feature = "ssh")))]
pub mod ssh;

#[cfg(feature = "daytona")]
#[cfg_attr(docsrs, doc(cfg(feature = "daytona")))]
pub mod daytona;

#[cfg(feature = "exe-dev")]
#[cfg_attr(docsrs, doc(cfg(feature = "exe-dev")))]
pub mod exe_dev;

#[cfg(feature = "kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "kubernetes")))]
pub mod kubernetes;
#[cfg(feature = "modal")]
#[cfg_attr(docsrs, doc(cfg(feature = "modal")))]
pub mod modal;
