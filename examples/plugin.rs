//! A Paperclip provider plugin served out of process: the host side of the
//! plugin worker protocol (JSON-RPC over the worker's stdio) drives a sandbox
//! through acquire → upload → streamed command → download → release.
//!
//! ```sh
//! cargo run --example plugin --features plugin
//! ```
//!
//! The worker is this example itself started again with `--worker`: it serves
//! the testkit's reference worker (the fake provider behind the protocol),
//! the same way `node dist/worker.js` serves an npm plugin. To run a real
//! plugin, give the CLI a plugin file: `paperclip-env --plugin plugin.json …`
//! (see the README).

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::plugin::{
    PluginManifest, PluginSandboxProvider, PluginWorker, PluginWorkerConfig,
};
use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env_testkit::fake::FakeProvider;
use paperclip_env_testkit::plugin_worker::{self, SANDBOX_DRIVER_KEY, SECRET_FIELD, WorkerFaults};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    if std::env::args().nth(1).as_deref() == Some("--worker") {
        let fake = FakeProvider::builder().secret_field(SECRET_FIELD).build();
        plugin_worker::serve(
            fake,
            WorkerFaults::default(),
            tokio::io::stdin(),
            tokio::io::stdout(),
        )
        .await?;
        return Ok(());
    }
    let manifest = PluginManifest::from_json(plugin_worker::reference_manifest())?;
    let me = std::env::current_exe()?;
    let config = PluginWorkerConfig::new(me.display().to_string(), manifest).arg("--worker");
    let worker = PluginWorker::new(config);
    say!("plugin worker: {} --worker", me.display());
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(PluginSandboxProvider::new(
            worker,
            SANDBOX_DRIVER_KEY,
        )?))
        .secrets(common::secrets())
        .build();
    let environment = Environment::new(
        "example-plugin",
        "Plugin example",
        "sandbox",
        json!({"provider": SANDBOX_DRIVER_KEY, "image": "fake:example", "timeoutMs": 60_000}),
    );
    common::run(&runtime, &environment).await
}
