//! Out-of-process providers over Paperclip's plugin worker protocol (spec 00
//! §5.5, §10). A plugin worker is a child process speaking newline-delimited
//! JSON-RPC 2.0 on its stdio; any provider written for Paperclip (an npm
//! plugin package whose worker runs under `node`), or any program speaking
//! the same protocol, runs under this SDK unchanged.
//!
//! - [`PluginWorker`]: the process (spawn with a minimal environment in its
//!   own process group, `initialize` handshake under a bounded wait,
//!   per-call deadlines, a `health` check before a worker with a hung call is
//!   killed, restart after a crash, `shutdown`), and the host side of the
//!   worker's own calls (`config.get`, `state.*`, `secrets.resolve`, `log`;
//!   see `host_services`).
//! - [`PluginDriver`]: the `plugin` runtime driver (`environment_driver`
//!   manifest entries, `driver: "plugin"` environments).
//! - [`PluginSandboxProvider`]: a [`crate::SandboxProvider`] for
//!   `sandbox_provider` manifest entries (`driver: "sandbox"` environments).
//!
//! Upstream sources followed (`paperclipai/paperclip`):
//! `packages/plugins/sdk/src/protocol.ts` @ `00766dc2` (envelopes, error
//! codes, NDJSON framing, `environment*` shapes),
//! `packages/plugins/sdk/src/worker-rpc-host.ts` @ `00e3661a` (worker side:
//! `initialize` → `{ok, supportedMethods}`, `METHOD_NOT_IMPLEMENTED`
//! messages, `shutdown`), `server/src/services/plugin-worker-manager.ts` @
//! `007bc94c` (host side: `fork(entrypoint)` with stdio pipes, env
//! allowlist, `initialize` params, pending calls failed with
//! `WORKER_UNAVAILABLE` on exit, `TIMEOUT` messages, shutdown escalation),
//! and the plugin driver of `server/src/services/environment-runtime.ts`
//! (seed `003_environment-runtime.code-only.txt`).

mod driver;
mod host_methods;
mod host_services;
mod manifest;
pub mod protocol;
mod provider;
mod worker;

pub use driver::PluginDriver;
pub use manifest::{DRIVERS_CAPABILITY, DriverDeclaration, DriverKind, PluginManifest};
pub use provider::{PluginSandboxProvider, capabilities_from_methods};
pub use worker::{
    CRASH_WINDOW, CallError, HOST_CONTROLLED_ENV, INHERITED_ENV, MAX_CONSECUTIVE_CRASHES,
    MAX_EXECUTE_LOG_CHUNK_CHARS, MAX_EXECUTE_LOG_TOTAL_CHARS, NOISE_EXCERPT_BYTES, PluginWorker,
    PluginWorkerConfig, StreamedOutput, rpc_error_to_error,
};
