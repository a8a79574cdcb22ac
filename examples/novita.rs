//! Novita Agent Sandbox (the E2B protocol, Novita's profile): acquire a sandbox, upload a workspace, run a command with streamed
//! output, download the result, release.
//!
//! ```sh
//! NOVITA_API_KEY=sk_… cargo run --example novita --features novita   # your account
//! cargo run --example novita --features novita                       # the emulator
//! ```
//!
//! With `NOVITA_API_KEY` set the provider reads its env fallbacks (`NOVITA_API_KEY`,
//! `NOVITA_DOMAIN`, `NOVITA_API_URL`, …); without it the example starts the
//! testkit's E2B emulator with Novita's profile in process. `PAPERCLIP_ENV_EXAMPLE_ENV=env.json`
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
            "example-novita",
            "Novita example",
            "sandbox",
            json!({"provider": "novita", "template": "base", "timeoutMs": 120_000}),
        )
    };
    let file = common::environment_from_file()?;
    let (provider, environment, _emulator) = if file.is_some() || common::has_env("NOVITA_API_KEY")
    {
        say!("Novita account from the environment (NOVITA_API_KEY, …)");
        (
            E2bProvider::novita_from_env()?,
            file.unwrap_or_else(default_env),
            None,
        )
    } else {
        let key = format!("sk_example{}", std::process::id());
        let emulator = E2bEmulator::start(Profile::Novita, &key).await?;
        say!(
            "no NOVITA_API_KEY: using the Novita emulator at {}",
            emulator.url()
        );
        let provider = E2bProvider::novita()
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
