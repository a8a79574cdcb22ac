//! exe.dev: a VM created through the HTTPS API, commands and workspace
//! transfer over SSH, the VM removed at release.
//!
//! ```sh
//! EXE_API_KEY=exe_… cargo run --example exe_dev --features exe-dev   # your account
//! cargo run --example exe_dev --features exe-dev                     # the emulator
//! ```
//!
//! With `EXE_API_KEY` set the provider reads it as its token (your SSH key
//! and known_hosts as configured for exe.dev); without it the example starts
//! the testkit's exe.dev API emulator and a throwaway OpenSSH sshd for the
//! VMs (needs `sshd` and `ssh-keygen`; `scripts/setup.sh` installs them).
//! `PAPERCLIP_ENV_EXAMPLE_ENV=env.json` runs an environment file.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::secrecy::SecretString;
use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::exe_dev::ExeDevProvider;
use paperclip_env_testkit::emulators::exe_dev::ExeDevEmulator;
use paperclip_env_testkit::fixtures::sshd::{self, SshServer};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let file = common::environment_from_file()?;
    let mut _emulated = None;
    let (provider, environment) = if file.is_some() || common::has_env("EXE_API_KEY") {
        say!("exe.dev account from EXE_API_KEY");
        let env = file.unwrap_or_else(|| {
            Environment::new(
                "example-exe-dev",
                "exe.dev example",
                "sandbox",
                json!({"provider": "exe-dev", "timeoutMs": 120_000}),
            )
        });
        (ExeDevProvider::from_env()?, env)
    } else {
        if !sshd::available() {
            return Err(
                "the exe.dev emulator needs sshd and ssh-keygen (run scripts/setup.sh)".into(),
            );
        }
        let server = SshServer::start()?;
        let key = format!("exe_example{}", std::process::id());
        let emulator = ExeDevEmulator::start(&key, server.host(), server.port()).await?;
        say!(
            "no EXE_API_KEY: using the exe.dev emulator at {}",
            emulator.url()
        );
        let provider = ExeDevProvider::builder()
            .api_url(emulator.url())
            .api_key(SecretString::from(key))
            .build()?;
        let env = Environment::new(
            "example-exe-dev",
            "exe.dev example",
            "sandbox",
            json!({"provider": "exe-dev", "sshPort": server.port(), "sshUser": server.user(),
                   "sshIdentityFile": server.client_key().private_key_path,
                   // The throwaway sshd's host key is new on every run.
                   "strictHostKeyChecking": "no", "timeoutMs": 120_000}),
        );
        _emulated = Some((emulator, server));
        (provider, env)
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(provider))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
