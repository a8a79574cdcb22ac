//! The Modal provider against the testkit's gRPC emulator: the shared
//! conformance suite, one test per injected fault, config validation,
//! reuse/resume, exec timeouts, stdin and stdio, and secret hygiene.
#![cfg(feature = "modal")]

use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, Environment, EnvironmentRuntime, Error,
    ExecuteRequest, ExecuteResult, LeaseHandle, LeaseStatus, OutputCollector, ProviderConfig,
    SandboxProvider, WorkspaceSpec,
};
use paperclip_env_modal_proto::api::generic_result::GenericStatus;
use paperclip_env_providers::modal::{ModalProvider, RetryPolicy};
use paperclip_env_testkit::conformance::{self, Fixture};
use paperclip_env_testkit::emulators::modal::{Fault, ModalEmulator, Route};
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::Code;

const TOKEN_ID: &str = "ak-emulatortokenid0123456789";
const TOKEN_SECRET: &str = "as-emulatortokensecret9876543210";

struct Harness {
    emulator: Arc<ModalEmulator>,
    provider: ModalProvider,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let emulator = Arc::new(ModalEmulator::start(TOKEN_ID, TOKEN_SECRET).await.unwrap());
        let provider = ModalProvider::builder()
            .server_url(emulator.url())
            .call_timeout(Duration::from_secs(10))
            .retry_policy(RetryPolicy {
                max_retries: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
            })
            .task_id_poll(Duration::from_millis(20))
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        Harness {
            emulator,
            provider,
            dir,
        }
    }

    fn workdir(&self) -> String {
        self.dir.path().join("workspace").display().to_string()
    }

    /// A valid config (tokens in plaintext; `ctx` turns them into secrets).
    fn config(&self, extra: Value) -> Value {
        let mut config = json!({
            "appName": "paperclip-tests", "image": "node:20",
            "tokenId": TOKEN_ID, "tokenSecret": TOKEN_SECRET,
            "workdir": self.workdir(), "sandboxTimeoutMs": 600000,
        });
        if let (Some(base), Value::Object(extra)) = (config.as_object_mut(), extra) {
            base.extend(extra);
        }
        config
    }

    fn ctx(&self, extra: Value) -> CallContext {
        let values = self.config(extra).as_object().cloned().unwrap_or_default();
        let mut config = ProviderConfig::new(values.clone());
        for key in ["tokenId", "tokenSecret"] {
            if let Some(Value::String(v)) = values.get(key) {
                config = config.with_secret(key, SecretString::from(v.clone()));
            }
        }
        CallContext {
            company_id: Some("company-1".into()),
            environment_id: "env-1".into(),
            issue_id: None,
            config,
        }
    }

    async fn acquire(&self, extra: Value) -> paperclip_env_core::Result<LeaseHandle> {
        let lease = self
            .provider
            .acquire(
                &self.ctx(extra),
                &AcquireRequest {
                    run_id: "run-1".into(),
                    workspace_mode: None,
                },
            )
            .await?;
        Ok(LeaseHandle {
            provider_lease_id: lease.provider_lease_id,
            metadata: lease.metadata,
            expires_at: None,
        })
    }

    async fn run(
        &self,
        lease: &LeaseHandle,
        request: ExecuteRequest,
    ) -> paperclip_env_core::Result<ExecuteResult> {
        let output = OutputCollector::buffered();
        let exit = self
            .provider
            .execute(&self.ctx(json!({})), lease, &request, &output)
            .await?;
        Ok(output.finish(exit))
    }
}

fn fixture(h: &Harness) -> Fixture {
    let e = &h.emulator;
    let (live, creates, starts) = (e.clone(), e.clone(), e.clone());
    let (fa, fe, fr) = (e.clone(), e.clone(), e.clone());
    Fixture::new(Arc::new(h.provider.clone()))
        .config(h.config(json!({})))
        .invalid_config(json!({"appName": " ", "image": "node:20", "tokenId": TOKEN_ID, "tokenSecret": TOKEN_SECRET}))
        .secret_value(TOKEN_ID)
        .secret_value(TOKEN_SECRET)
        .live_resources(move || live.live_sandboxes())
        .create_calls(move || creates.create_calls())
        .execute_calls(move || starts.exec_starts())
        // The sandbox exists, then its start-up poll is refused.
        .fail_next_acquire(move || fa.inject(Route::SandboxGetTaskId, Fault::Status(Code::PermissionDenied), 1))
        .fail_next_execute(move || fe.inject(Route::TaskExecStart, Fault::Status(Code::Unavailable), 1))
        // Four failures outlast the three retries of the idempotent terminate.
        .fail_next_release(move || fr.inject(Route::SandboxTerminate, Fault::Status(Code::Unavailable), 4))
        .call_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modal_passes_conformance() {
    let h = Harness::start().await;
    let report = conformance::run(&fixture(&h)).await;
    println!("{}", report.summary());
    report.assert_passed();
    assert!(
        report.skipped().iter().all(|id| ["A6.14", "A7.2"].contains(id)),
        "unexpected skips: {:?}",
        report.skipped()
    );
    assert_eq!(
        h.emulator.live_sandboxes(),
        0,
        "conformance left sandboxes running: {:?}",
        h.emulator.sandboxes()
    );
}
