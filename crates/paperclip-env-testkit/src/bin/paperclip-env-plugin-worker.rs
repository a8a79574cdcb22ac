//! The reference plugin worker: Paperclip's plugin worker protocol on stdio,
//! serving the fake provider. Fault modes come from the environment (see
//! `paperclip_env_testkit::plugin_worker`). Stdout carries only protocol
//! messages; `--manifest` prints the worker's manifest instead.

use paperclip_env_testkit::fake::FakeProvider;
use paperclip_env_testkit::plugin_worker::{self, ENV_TEMP_ROOT, SECRET_FIELD, WorkerFaults};

fn main() -> std::process::ExitCode {
    // `--manifest` prints the manifest a host needs to run this worker.
    if std::env::args().nth(1).as_deref() == Some("--manifest") {
        println!("{}", plugin_worker::reference_manifest());
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reference worker: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut builder = FakeProvider::builder().secret_field(SECRET_FIELD);
    if let Some(root) = std::env::var_os(ENV_TEMP_ROOT) {
        builder = builder.temp_root(root);
    }
    let fake = builder.build();
    let faults = WorkerFaults::from_env();
    let served = runtime.block_on(plugin_worker::serve(
        fake,
        faults,
        tokio::io::stdin(),
        tokio::io::stdout(),
    ));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reference worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
