//! The conformance suite against a live account, `object_store`'s
//! `TEST_INTEGRATION` pattern: point `PAPERCLIP_ENV_LIVE_CONFIG` at an
//! Environment JSON file (the shape `paperclip-env --env` reads) and
//!
//! ```text
//! E2B_API_KEY=… PAPERCLIP_ENV_LIVE_CONFIG=e2b.json \
//!   cargo test --features full --test live_conformance -- --nocapture
//! ```
//!
//! runs every line against it: Part A against the provider `config.provider`
//! names (configured from its env fallbacks), then the runtime lines.
//! `PAPERCLIP_ENV_LIVE_ONLY=A6,R4` selects lines; secret references resolve
//! from `PAPERCLIP_SECRET_<ID>`. Without the variable the test says so and
//! passes; the harness itself always runs against the fake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use paperclip_env::core::secret::EnvSecretResolver;
use paperclip_env::core::{Environment, SandboxProvider};
use paperclip_env_testkit::conformance::live::{LiveOutcome, LiveSuite};

/// Every provider this build has, configured from its env fallbacks.
fn providers(fake_root: Option<&Path>) -> Vec<Arc<dyn SandboxProvider>> {
    let mut fake = paperclip_env::providers::fake::FakeProvider::builder();
    if let Some(root) = fake_root {
        fake = fake.temp_root(root);
    }
    let mut all: Vec<Arc<dyn SandboxProvider>> = vec![Arc::new(fake.build())];
    let mut add = |p: paperclip_env::Result<Arc<dyn SandboxProvider>>| match p {
        Ok(p) => all.push(p),
        Err(e) => eprintln!("a provider is not configured: {e}"),
    };
    use paperclip_env_providers::e2b::E2bProvider;
    add(E2bProvider::from_env().map(|p| Arc::new(p) as _));
    add(E2bProvider::novita_from_env().map(|p| Arc::new(p) as _));
    #[cfg(feature = "daytona")]
    add(paperclip_env::providers::daytona::DaytonaProvider::from_env().map(|p| Arc::new(p) as _));
    #[cfg(feature = "modal")]
    add(paperclip_env::providers::modal::ModalProvider::from_env().map(|p| Arc::new(p) as _));
    #[cfg(feature = "exe-dev")]
    add(paperclip_env::providers::exe_dev::ExeDevProvider::from_env().map(|p| Arc::new(p) as _));
    #[cfg(feature = "cloudflare")]
    add(
        paperclip_env::providers::cloudflare::CloudflareProvider::builder()
            .build()
            .map(|p| Arc::new(p) as _),
    );
    #[cfg(feature = "kubernetes")]
    add(Ok(Arc::new(
        paperclip_env::providers::kubernetes::KubernetesProvider::builder().build(),
    )));
    all
}

/// Reads the environment file and runs the suite, tearing down on Ctrl-C.
async fn run_live(path: &Path, only: &[String], fake_root: Option<&Path>) -> LiveOutcome {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let environment: Environment = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not an Environment JSON: {e}", path.display()));
    let mut builder = LiveSuite::builder(environment)
        .secrets(Arc::new(EnvSecretResolver::new()))
        .driver(Arc::new(paperclip_env_providers::ssh::SshDriver::new()))
        .only(only.iter().cloned())
        .call_timeout(Duration::from_secs(180));
    for provider in providers(fake_root) {
        builder = builder.provider(provider);
    }
    let suite = builder
        .build()
        .expect("the live config names a usable environment");
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    suite
        .run(
            |line| eprintln!("{} {:?}: {:?}", line.id, line.level, line.outcome),
            interrupted,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_environment_passes_conformance() {
    let Some(path) = std::env::var_os("PAPERCLIP_ENV_LIVE_CONFIG").filter(|p| !p.is_empty()) else {
        eprintln!(
            "skipping live conformance: set PAPERCLIP_ENV_LIVE_CONFIG to an Environment JSON \
             file (and the provider's credentials, e.g. E2B_API_KEY) to run the suite against \
             a real account"
        );
        return;
    };
    let only: Vec<String> = std::env::var("PAPERCLIP_ENV_LIVE_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let outcome = run_live(Path::new(&path), &only, None).await;
    assert!(
        outcome.passed(),
        "live conformance failed (interrupted: {}, cleanup: {:?}):\n{}",
        outcome.interrupted,
        outcome.cleanup,
        outcome.report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_harness_runs_a_config_file_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sandboxes");
    std::fs::create_dir_all(&root).unwrap();
    let path = dir.path().join("env.json");
    std::fs::write(
        &path,
        r#"{"id":"env-live","name":"Live","driver":"sandbox","config":{"provider":"fake-plugin"}}"#,
    )
    .unwrap();
    let outcome = run_live(&path, &["A6".into(), "R".into()], Some(&root)).await;
    assert!(outcome.passed(), "{}", outcome.report.summary());
    assert!(outcome.report.passed().contains(&"A6.1"));
    assert!(outcome.report.passed().contains(&"R12"));
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "sandboxes left"
    );
}
