//! E2B: acquire a sandbox, upload a workspace, run a command with streamed
//! output, download the result, release.
//!
//! ```sh
//! E2B_API_KEY=e2b_… cargo run --example e2b --features e2b   # your account
//! cargo run --example e2b --features e2b                     # the E2B emulator
//! ```
//!
//! With `E2B_API_KEY` set the provider reads its env fallbacks (`E2B_API_KEY`,
//! `E2B_DOMAIN`, `E2B_API_URL`, …); without it the example starts the
//! testkit's E2B emulator in process. `PAPERCLIP_ENV_EXAMPLE_ENV=env.json`
//! runs an environment file instead of the default config.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::secrecy::SecretString;
use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::e2b::E2bProvider;
use paperclip_env_testkit::emulators::e2b::{E2bEmulator, Profile};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let default_env = || {
        Environment::new(
            "example-e2b",
            "E2B example",
            "sandbox",
            json!({"provider": "e2b", "template": "base", "timeoutMs": 120_000}),
        )
    };
    let file = common::environment_from_file()?;
    let (provider, environment, _emulator) = if file.is_some() || common::has_env("E2B_API_KEY") {
        say!("E2B account from the environment (E2B_API_KEY, E2B_DOMAIN, …)");
        (
            E2bProvider::from_env()?,
            file.unwrap_or_else(default_env),
            None,
        )
    } else {
        let key = format!("e2b_example{}", std::process::id());
        let emulator = E2bEmulator::start(Profile::E2b, &key).await?;
        say!(
            "no E2B_API_KEY: using the E2B emulator at {}",
            emulator.url()
        );
        let provider = E2bProvider::builder()
            .api_url(emulator.url())
            .sandbox_url(emulator.url())
            .api_key(SecretString::from(key))
            .build()?;
        (provider, default_env(), Some(emulator))
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
