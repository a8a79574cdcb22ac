//! Kubernetes: a hardened pod per run (an agent-sandbox `Sandbox`), a
//! workspace uploaded into it, a command with streamed output over the exec
//! WebSocket, the result downloaded, the pod released.
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo run --example kubernetes --features kubernetes   # your cluster
//! cargo run --example kubernetes --features kubernetes                             # the emulator
//! ```
//!
//! With `KUBECONFIG` set, that file is passed inline as the `kubeconfig`
//! secret (the cluster needs the agent-sandbox CRDs); without it the example
//! starts the testkit's Kubernetes API server emulator in process.
//! `PAPERCLIP_ENV_EXAMPLE_ENV=env.json` runs an environment file.

#[macro_use]
mod common;

use std::sync::Arc;

use paperclip_env::core::{Environment, EnvironmentRuntime};
use paperclip_env::providers::kubernetes::KubernetesProvider;
use paperclip_env_testkit::emulators::kubernetes::KubeEmulator;
use serde_json::json;

fn environment(kubeconfig: &str) -> Environment {
    Environment::new(
        "example-kubernetes",
        "Kubernetes example",
        "sandbox",
        json!({"provider": "kubernetes", "kubeconfig": kubeconfig, "timeoutMs": 120_000}),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), common::BoxError> {
    let file = common::environment_from_file()?;
    let kubeconfig = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty());
    let (environment, _emulator) = match (file, kubeconfig) {
        (Some(env), _) => (env, None),
        (None, Some(path)) => {
            say!("cluster from KUBECONFIG={}", path.to_string_lossy());
            (environment(&std::fs::read_to_string(path)?), None)
        }
        (None, None) => {
            let emulator = KubeEmulator::start().await?;
            say!(
                "no KUBECONFIG: using the Kubernetes emulator at {}",
                emulator.url()
            );
            (environment(&emulator.kubeconfig_yaml()), Some(emulator))
        }
    };
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(KubernetesProvider::builder().build()))
        .secrets(common::secrets())
        .build();
    common::run(&runtime, &environment).await
}
