//! What every provider example does once it has a runtime and an
//! environment: acquire → upload a workspace → run a command with streamed
//! output → download what it changed → release, printing each step.
//!
//! Not an example itself (`examples/common/` has no `main.rs`); each example
//! includes it with `mod common;`.

// Each example uses the helpers it needs.
#![allow(dead_code)]

/// `println!` that ignores a closed stdout (`| head`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use paperclip_env::core::async_trait;
use paperclip_env::core::secrecy::SecretString;
use paperclip_env::core::secret::{
    EnvSecretResolver, InMemorySecretResolver, NewSecret, SecretRef,
};
use paperclip_env::core::workspace::{SyncOptions, WorkspaceSync};
use paperclip_env::core::{
    AcquireRunLease, Environment, EnvironmentRuntime, ExecuteRequest, LeaseStatus, OutputStream,
    SecretResolver, WorkspaceSpec,
};

/// The error type of the examples.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An environment from the JSON file `PAPERCLIP_ENV_EXAMPLE_ENV` names, if
/// set: the way to point any example at a real account or host.
pub fn environment_from_file() -> Result<Option<Environment>, BoxError> {
    let Some(path) = std::env::var_os("PAPERCLIP_ENV_EXAMPLE_ENV").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)?;
    Ok(Some(serde_json::from_str(&text)?))
}

/// Secret references resolve from `PAPERCLIP_SECRET_<ID>`; inline secrets
/// (which the runtime moves out of a config on first use) are kept in
/// memory for the life of the example.
struct ExampleSecrets {
    inline: InMemorySecretResolver,
    env: EnvSecretResolver,
}

#[async_trait]
impl SecretResolver for ExampleSecrets {
    async fn resolve(&self, reference: &SecretRef) -> paperclip_env::Result<SecretString> {
        match self.inline.resolve(reference).await {
            Ok(secret) => Ok(secret),
            Err(_) => self.env.resolve(reference).await,
        }
    }

    async fn create(&self, secret: NewSecret) -> paperclip_env::Result<String> {
        self.inline.create(secret).await
    }
}

/// The secret resolver of the examples.
pub fn secrets() -> Arc<dyn SecretResolver> {
    Arc::new(ExampleSecrets {
        inline: InMemorySecretResolver::new(),
        env: EnvSecretResolver::new(),
    })
}

/// Whether `var` is set to something non-empty.
pub fn has_env(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

fn write_workspace(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join("README.md"), "# agent workspace\n")?;
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("src/task.txt"), "count the lines of README.md\n")?;
    Ok(())
}

/// Runs the lifecycle once and fails unless the command succeeded and its
/// result came back into the local workspace.
pub async fn run(runtime: &EnvironmentRuntime, environment: &Environment) -> Result<(), BoxError> {
    let run_id = format!("example-{}", std::process::id());
    let record = runtime
        .acquire_run_lease(AcquireRunLease::for_run(
            environment.clone(),
            run_id.clone(),
        ))
        .await?;
    let lease = record.lease;
    say!(
        "acquired   lease {} ({})",
        lease.id,
        lease.provider_lease_id.as_deref().unwrap_or("-")
    );
    let outcome = use_lease(runtime, environment, &lease).await;
    // Release whatever happened above: nothing is left running.
    let released = runtime
        .release_run_leases(&run_id, LeaseStatus::Released)
        .await
        .into_result()?;
    for record in &released {
        say!(
            "released   lease {} → {} (cleanup: {})",
            record.lease.id,
            record.lease.status,
            record
                .lease
                .cleanup_status
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    outcome
}

async fn use_lease(
    runtime: &EnvironmentRuntime,
    environment: &Environment,
    lease: &paperclip_env::core::EnvironmentLease,
) -> Result<(), BoxError> {
    let realized = runtime
        .realize_workspace(environment, lease, &WorkspaceSpec::default())
        .await?;
    let remote = format!("{}/example-workspace", realized.cwd.trim_end_matches('/'));
    say!("workspace  {remote}");

    let local = tempfile::tempdir()?;
    write_workspace(local.path())?;
    let sync = WorkspaceSync::for_lease(runtime, environment, lease).await?;
    let options = SyncOptions::default();
    let up = sync.upload(local.path(), &remote, &options).await?;
    say!(
        "uploaded   {} files, {} bytes ({:?})",
        up.files,
        up.bytes,
        up.method
    );

    let script = "echo \"working in $(pwd)\"; for i in 1 2 3; do echo \"step $i\"; sleep 0.1; done; \
                  wc -l < README.md > src/lines.txt; echo done >&2";
    let request = ExecuteRequest::new("sh")
        .args(["-c", script])
        .cwd(remote.clone())
        .timeout_ms(60_000);
    let sink = Arc::new(|stream: OutputStream, data: &[u8]| {
        let prefix = match stream {
            OutputStream::Stdout => "  stdout |",
            OutputStream::Stderr => "  stderr |",
        };
        for line in String::from_utf8_lossy(data).lines() {
            say!("{prefix} {line}");
        }
        let _ = std::io::stdout().flush();
    });
    let result = runtime
        .execute_streaming(environment, lease, &request, sink)
        .await?;
    say!(
        "exited     code {:?}, timed out: {}",
        result.exit_code,
        result.timed_out
    );
    if !result.success() {
        return Err(format!("the command failed: {}", result.stderr).into());
    }

    let down = sync
        .download(&remote, local.path(), Some(&up.baseline), &options)
        .await?;
    say!(
        "downloaded added {:?}, modified {:?}, deleted {:?}",
        down.changes.added,
        down.changes.modified,
        down.changes.deleted
    );
    let lines = std::fs::read_to_string(local.path().join("src/lines.txt"))?;
    if lines.trim() != "1" {
        return Err(format!("src/lines.txt came back as {lines:?}").into());
    }
    Ok(())
}
