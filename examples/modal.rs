//! Modal: acquire a sandbox over Modal's gRPC API, upload a workspace, run a
//! command with streamed output, download the result, release.
//!
//! ```sh
//! MODAL_TOKEN_ID=ak-… MODAL_TOKEN_SECRET=as-… cargo run --example modal --features modal   # your account
//! cargo run --example modal --features modal                                             # the emulator
//! ```
//!
//! With `MODAL_TOKEN_ID` and `MODAL_TOKEN_SECRET` set, the provider talks to
//! `MODAL_SERVER_URL` (default Modal's API) with those tokens; without them
//! the example starts the testkit's Modal gRPC emulator in process.
//! `PAPERCLIP_ENV_EXAMPLE_ENV=env.json` runs an environment file.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::modal::ModalProvider;
use paperclip_env_testkit::emulators::modal::ModalEmulator;
use serde_json::json;

fn environment(token_id: &str, token_secret: &str) -> Environment {
    // Inline tokens: the runtime moves them into the secret store on first
    // use and keeps only their references.
    Environment::new(
        "example-modal",
        "Modal example",
        "sandbox",
        json!({"provider": "modal", "tokenId": token_id, "tokenSecret": token_secret,
               "appName": "paperclip-env-example", "image": "python:3.12-slim",
               "timeoutMs": 120_000}),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let file = common::environment_from_file()?;
    let tokens = std::env::var("MODAL_TOKEN_ID")
        .ok()
        .zip(std::env::var("MODAL_TOKEN_SECRET").ok())
        .filter(|(id, secret)| !id.is_empty() && !secret.is_empty());
    let (provider, environment, _emulator) = match (file, tokens) {
        (Some(env), _) => (ModalProvider::from_env()?, env, None),
        (None, Some((id, secret))) => {
            say!("Modal account from MODAL_TOKEN_ID / MODAL_TOKEN_SECRET");
            (ModalProvider::from_env()?, environment(&id, &secret), None)
        }
        (None, None) => {
            let (id, secret) = ("ak-example", format!("as-example{}", std::process::id()));
            let emulator = ModalEmulator::start(id, &secret).await?;
            say!(
                "no MODAL_TOKEN_ID: using the Modal emulator at {}",
                emulator.url()
            );
            let provider = ModalProvider::builder()
                .server_url(emulator.url())
                .build()?;
            (provider, environment(id, &secret), Some(emulator))
        }
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
