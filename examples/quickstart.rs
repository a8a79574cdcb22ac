//! Quickstart: acquire a lease on the embedded fake provider (commands run as
//! real local processes in an isolated temp dir; no account needed), realize
//! a workspace, run a command with streamed output, release, and report.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use std::io::Write;
use std::sync::Arc;

use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus, OutputStream,
    WorkspaceSpec,
};
use paperclip_env::providers::fake::FakeProvider;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fake = FakeProvider::new();
    let runtime = EnvironmentRuntime::builder()
        .provider(Arc::new(fake.clone()))
        .build();

    let environment = Environment::new(
        "quickstart-env",
        "Quickstart sandbox",
        "sandbox",
        json!({"provider": "fake-plugin", "image": "fake:quickstart", "timeoutMs": 60_000}),
    );

    let record = runtime
        .acquire_run_lease(AcquireRunLease::for_run(
            environment.clone(),
            "quickstart-run",
        ))
        .await?;
    let lease = record.lease;
    println!(
        "acquired  lease {} ({})",
        lease.id,
        lease.provider_lease_id.as_deref().unwrap_or("-")
    );

    let realized = runtime
        .realize_workspace(&environment, &lease, &WorkspaceSpec::default())
        .await?;
    println!("workspace {}", realized.cwd);

    let script = "echo 'hello from the sandbox'; for i in 1 2 3; do echo \"step $i\"; sleep 0.2; done; echo 'done' >&2";
    let request = ExecuteRequest::new("sh")
        .arg("-c")
        .arg(script)
        .cwd(realized.cwd.clone())
        .timeout_ms(30_000);
    let sink = Arc::new(|stream: OutputStream, data: &[u8]| {
        let prefix = match stream {
            OutputStream::Stdout => "  stdout |",
            OutputStream::Stderr => "  stderr |",
        };
        for line in String::from_utf8_lossy(data).lines() {
            println!("{prefix} {line}");
        }
        let _ = std::io::stdout().flush();
    });
    println!("running   sh -c …");
    let result = runtime
        .execute_streaming(&environment, &lease, &request, sink)
        .await?;
    println!(
        "exited    code {:?}, timed out: {}",
        result.exit_code, result.timed_out
    );

    let released = runtime
        .release_run_leases("quickstart-run", LeaseStatus::Released)
        .await
        .into_result()?;
    for record in &released {
        println!(
            "released  lease {} → {} (cleanup: {})",
            record.lease.id,
            record.lease.status,
            record
                .lease
                .cleanup_status
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("sandboxes still alive: {}", fake.live_leases());
    if !result.success() || fake.live_leases() != 0 {
        return Err("quickstart did not complete cleanly".into());
    }
    Ok(())
}
