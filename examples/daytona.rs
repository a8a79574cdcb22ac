//! Daytona: acquire a sandbox, upload a workspace, run a command with
//! streamed output, download the result, release.
//!
//! ```sh
//! DAYTONA_API_KEY=dtn_… cargo run --example daytona --features daytona   # your account
//! cargo run --example daytona --features daytona                         # the emulator
//! ```
//!
//! With `DAYTONA_API_KEY` set the provider reads its env fallbacks
//! (`DAYTONA_API_KEY`, `DAYTONA_API_URL`, `DAYTONA_TARGET`); without it the
//! example starts the testkit's Daytona emulator (REST API and toolbox) in
//! process. `PAPERCLIP_ENV_EXAMPLE_ENV=env.json` runs an environment file.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::secrecy::SecretString;
use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::daytona::DaytonaProvider;
use paperclip_env_testkit::emulators::daytona::DaytonaEmulator;
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let default_env = || {
        Environment::new(
            "example-daytona",
            "Daytona example",
            "sandbox",
            json!({"provider": "daytona", "timeoutMs": 120_000}),
        )
    };
    let file = common::environment_from_file()?;
    let (provider, environment, _emulator) = if file.is_some() || common::has_env("DAYTONA_API_KEY")
    {
        say!("Daytona account from the environment (DAYTONA_API_KEY, DAYTONA_API_URL, …)");
        (
            DaytonaProvider::from_env()?,
            file.unwrap_or_else(default_env),
            None,
        )
    } else {
        let key = format!("dtn_example{}", std::process::id());
        let emulator = DaytonaEmulator::start(&key).await?;
        say!(
            "no DAYTONA_API_KEY: using the Daytona emulator at {}",
            emulator.url()
        );
        let provider = DaytonaProvider::builder()
            .api_url(emulator.url())
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
