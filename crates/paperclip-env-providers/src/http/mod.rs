//! Shared HTTP machinery for every HTTP provider: one `reqwest` client per
//! provider instance, connect and request timeouts kept apart from command
//! timeouts and lease lifetimes, retries with exponential backoff and jitter
//! (connect errors always; 429 honouring `Retry-After`; 5xx and timeouts only
//! for idempotent calls), status → [`paperclip_env_core::Error`] mapping, and
//! a tracing span per call. Secrets travel only in headers marked sensitive.

mod client;
mod retry;
mod status;

pub use client::{HttpClient, HttpOptions, Idempotency, RequestSpec};
pub use retry::{RetryPolicy, parse_retry_after};
pub use status::{error_for_status, message_from_body};
