//! The `ssh` driver: any host you can SSH into, with strict host-key
//! checking; a workspace uploaded over the SSH channel, a command with
//! streamed output, the result downloaded, the lease released.
//!
//! ```sh
//! PAPERCLIP_ENV_EXAMPLE_ENV=host.json cargo run --example ssh --features ssh   # your host
//! cargo run --example ssh --features ssh                                     # a throwaway sshd
//! ```
//!
//! `host.json` is an Environment with `driver: "ssh"` and a config such as
//! `{"host": "build-1", "username": "agent", "remoteWorkspacePath":
//! "/home/agent/work", "privateKeySecretRef": "<uuid>", "knownHosts": "…"}`,
//! the key read from `PAPERCLIP_SECRET_<UUID>`. Without a file the example
//! starts a real OpenSSH sshd on 127.0.0.1 (needs `sshd` and `ssh-keygen`).

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::ssh::SshDriver;
use paperclip_env_testkit::fixtures::sshd::{self, SshServer};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let mut _server = None;
    let environment = match common::environment_from_file()? {
        Some(env) => env,
        None => {
            if !sshd::available() {
                return Err(
                    "no environment file and no sshd to start (run scripts/setup.sh)".into(),
                );
            }
            let server = SshServer::start()?;
            say!(
                "no environment file: using a throwaway sshd on {}:{}",
                server.host(),
                server.port()
            );
            let env = Environment::new(
                "example-ssh",
                "SSH example",
                "ssh",
                // An inline private key: the runtime moves it into the secret
                // store on first use and keeps only the reference.
                json!({"host": server.host(), "port": server.port(), "username": server.user(),
                       "remoteWorkspacePath": server.dir().join("work").display().to_string(),
                       "privateKey": server.client_key().private_key,
                       "knownHosts": server.known_hosts(), "strictHostKeyChecking": true}),
            );
            _server = Some(server);
            env
        }
    };
    let runtime = EnvironmentRuntime::builder()
        .driver(Arc::new(SshDriver::new()))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
