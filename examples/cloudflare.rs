//! Cloudflare Sandbox through the Paperclip bridge Worker: acquire, upload a
//! workspace, run a command with streamed output (SSE), download, release.
//!
//! ```sh
//! PAPERCLIP_ENV_EXAMPLE_ENV=cloudflare.json cargo run --example cloudflare --features cloudflare   # your bridge
//! cargo run --example cloudflare --features cloudflare                                           # the emulator
//! ```
//!
//! The bridge has no env fallback: a real bridge is an environment file with
//! `bridgeBaseUrl` and `bridgeAuthToken` (a secret reference read from
//! `PAPERCLIP_SECRET_<ID>`, or inline). Without one the example starts the
//! testkit's bridge emulator in process.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::cloudflare::CloudflareProvider;
use paperclip_env_testkit::emulators::cloudflare_bridge::BridgeEmulator;
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let (environment, _emulator) = match common::environment_from_file()? {
        Some(env) => (env, None),
        None => {
            let token = format!("cf_example{}", std::process::id());
            let emulator = BridgeEmulator::start(&token).await?;
            say!(
                "no environment file: using the bridge emulator at {}",
                emulator.url()
            );
            let env = Environment::new(
                "example-cloudflare",
                "Cloudflare example",
                "sandbox",
                json!({"provider": "cloudflare", "bridgeBaseUrl": emulator.url(),
                       "bridgeAuthToken": token, "timeoutMs": 120_000}),
            );
            (env, Some(emulator))
        }
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(CloudflareProvider::builder().build()?))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
