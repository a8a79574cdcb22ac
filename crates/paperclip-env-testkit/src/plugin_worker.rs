//! A reference plugin worker: the worker side of Paperclip's plugin protocol
//! (`packages/plugins/sdk/src/worker-rpc-host.ts`) serving the [`FakeProvider`],
//! so the SDK's `plugin` driver and out-of-process sandbox providers run the
//! shared conformance suite against a real child process.
//!
//! The `paperclip-env-plugin-worker` binary runs [`serve`] on its stdio.
//! Faults are chosen through environment variables (the host passes them
//! with `PluginWorkerConfig::env`), so tests can make a worker crash, hang or
//! write garbage on a given method.

use std::path::PathBuf;
use std::sync::Arc;

use paperclip_env_core::plugin::protocol::{self, Incoming, RpcError, codes, methods};
use paperclip_env_core::secret::{
    InMemorySecretResolver, collect_secret_ref_paths, resolve_provider_config,
};
use paperclip_env_core::{
    AcquireRequest, CallContext, Error, ExecuteRequest, JsonObject, LeaseHandle, LeaseStatus,
    Operation, OutputCapture, OutputCollector, OutputSink, OutputStream, SandboxProvider,
    WorkspaceSpec,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

use crate::fake::FakeProvider;

/// Plugin key of the reference worker's manifest.
pub const PLUGIN_KEY: &str = "paperclip-env.reference-worker";
/// Driver key of its `sandbox_provider` entry (the fake's key).
pub const SANDBOX_DRIVER_KEY: &str = "fake-plugin";
/// Driver key of its `environment_driver` entry.
pub const ENVIRONMENT_DRIVER_KEY: &str = "fake-driver";
/// Secret config field the reference worker declares (`format: "secret-ref"`).
pub const SECRET_FIELD: &str = "apiKey";

/// Env var: exit with status 3 when this method is called.
pub const ENV_CRASH_ON: &str = "PAPERCLIP_ENV_WORKER_CRASH_ON";
/// Env var: never answer this method.
pub const ENV_HANG_ON: &str = "PAPERCLIP_ENV_WORKER_HANG_ON";
/// Method on which the worker wedges: it stops reading requests altogether
/// (a plugin stuck in a busy loop), so it answers neither that call nor
/// `health` afterwards.
pub const ENV_WEDGE_ON: &str = "PAPERCLIP_ENV_WORKER_WEDGE_ON";
/// Env var: answer this method with a line that is not JSON.
pub const ENV_GARBAGE_ON: &str = "PAPERCLIP_ENV_WORKER_GARBAGE_ON";
/// Env var: comma-separated methods answered with `METHOD_NOT_IMPLEMENTED`.
pub const ENV_NOT_IMPLEMENTED: &str = "PAPERCLIP_ENV_WORKER_NOT_IMPLEMENTED";
/// Env var: `1` makes failures echo the config's secrets into the error
/// message, stderr and a `log` notification (to prove the host scrubs them).
pub const ENV_LEAK_SECRETS: &str = "PAPERCLIP_ENV_WORKER_LEAK_SECRETS";
/// Env var: a directory for test control: `fail-next-<method>` files make
/// the next call of that method fail; `stats.json` holds `{live, created, executed}`.
pub const ENV_CONTROL_DIR: &str = "PAPERCLIP_ENV_WORKER_CONTROL_DIR";
/// Env var: where the fake creates sandbox directories.
pub const ENV_TEMP_ROOT: &str = "PAPERCLIP_ENV_WORKER_TEMP_ROOT";

/// Fault modes of the reference worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerFaults {
    /// Exit when this method is called.
    pub crash_on: Option<String>,
    /// Never answer this method.
    pub hang_on: Option<String>,
    /// Stop reading requests on this method ([`ENV_WEDGE_ON`]).
    pub wedge_on: Option<String>,
    /// Write garbage instead of answering this method.
    pub garbage_on: Option<String>,
    /// Methods answered with `METHOD_NOT_IMPLEMENTED`.
    pub not_implemented: Vec<String>,
    /// Echo secrets into errors, stderr and logs on failures.
    pub leak_secrets: bool,
    /// Test control directory.
    pub control_dir: Option<PathBuf>,
}

impl WorkerFaults {
    /// Reads the fault modes from the environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        WorkerFaults {
            crash_on: var(ENV_CRASH_ON),
            hang_on: var(ENV_HANG_ON),
            wedge_on: var(ENV_WEDGE_ON),
            garbage_on: var(ENV_GARBAGE_ON),
            not_implemented: var(ENV_NOT_IMPLEMENTED)
                .map(|v| v.split(',').map(|m| m.trim().to_owned()).collect())
                .unwrap_or_default(),
            leak_secrets: var(ENV_LEAK_SECRETS).as_deref() == Some("1"),
            control_dir: var(ENV_CONTROL_DIR).map(PathBuf::from),
        }
    }
}

/// The reference worker's manifest: one `sandbox_provider` and one
/// `environment_driver` entry, both served by the fake.
///
/// ```
/// use paperclip_env_core::plugin::{DriverKind, PluginManifest};
/// let m = PluginManifest::from_json(paperclip_env_testkit::plugin_worker::reference_manifest()).unwrap();
/// assert_eq!(m.driver("fake-driver").unwrap().kind, DriverKind::EnvironmentDriver);
/// ```
pub fn reference_manifest() -> Value {
    let schema = json!({
        "type": "object",
        "properties": {
            "image": {"type": "string"},
            "timeoutMs": {"type": "number"},
            "reuseLease": {"type": "boolean"},
            SECRET_FIELD: {"type": "string", "format": "secret-ref"}
        }
    });
    json!({
        "id": PLUGIN_KEY,
        "apiVersion": 1,
        "version": env!("CARGO_PKG_VERSION"),
        "displayName": "paperclip-env reference worker",
        "description": "The fake provider behind Paperclip's plugin worker protocol.",
        "author": "paperclip-env",
        "categories": ["automation"],
        "capabilities": ["environment.drivers.register"],
        "entrypoints": {"worker": "paperclip-env-plugin-worker"},
        "environmentDrivers": [
            {"driverKey": SANDBOX_DRIVER_KEY, "kind": "sandbox_provider", "displayName": "Fake sandbox (out of process)", "configSchema": schema, "supportsReusableLeases": true},
            {"driverKey": ENVIRONMENT_DRIVER_KEY, "kind": "environment_driver", "displayName": "Fake environment driver", "configSchema": schema, "supportsReusableLeases": true}
        ]
    })
}

const ENVIRONMENT_METHODS: [&str; 8] = [
    methods::VALIDATE_CONFIG,
    methods::PROBE,
    methods::ACQUIRE,
    methods::RESUME,
    methods::RELEASE,
    methods::DESTROY,
    methods::REALIZE,
    methods::EXECUTE,
];

fn operation_of(method: &str) -> Option<Operation> {
    Some(match method {
        methods::VALIDATE_CONFIG => Operation::ValidateConfig,
        methods::PROBE => Operation::Probe,
        methods::ACQUIRE => Operation::Acquire,
        methods::RESUME => Operation::Resume,
        methods::RELEASE => Operation::Release,
        methods::DESTROY => Operation::Destroy,
        methods::REALIZE => Operation::RealizeWorkspace,
        methods::EXECUTE => Operation::Execute,
        _ => return None,
    })
}

struct Server<W> {
    fake: FakeProvider,
    faults: WorkerFaults,
    out: Mutex<W>,
}

impl<W: AsyncWrite + Unpin + Send> Server<W> {
    async fn write(&self, line: &str) {
        let mut out = self.out.lock().await;
        let _ = out.write_all(line.as_bytes()).await;
        let _ = out.flush().await;
    }

    async fn notify_log(&self, level: &str, message: &str) {
        let line = format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "method": methods::LOG, "params": {"level": level, "message": message}})
        );
        self.write(&line).await;
    }

    fn write_stats(&self) {
        let Some(dir) = &self.faults.control_dir else {
            return;
        };
        let stats = self.fake.stats();
        let body = json!({
            "live": self.fake.live_leases(),
            "created": stats.created.load(std::sync::atomic::Ordering::SeqCst),
            "executed": stats.executed.load(std::sync::atomic::Ordering::SeqCst),
        });
        let tmp = dir.join("stats.json.tmp");
        if std::fs::write(&tmp, body.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("stats.json"));
        }
    }

    fn arm_control_faults(&self, method: &str, op: Operation) {
        let Some(dir) = &self.faults.control_dir else {
            return;
        };
        // `stall-after-create-ms`: every fresh sandbox answers that much
        // later than it is created (a slow provider, for deadline tests).
        if let Ok(ms) = std::fs::read_to_string(dir.join("stall-after-create-ms")) {
            let ms = ms.trim().parse::<u64>().unwrap_or(0);
            self.fake
                .faults()
                .stall_after_create(std::time::Duration::from_millis(ms));
        }
        let flag = dir.join(format!("fail-next-{method}"));
        if std::fs::remove_file(&flag).is_ok() {
            self.fake.faults().fail_next(op, || {
                Error::provider(SANDBOX_DRIVER_KEY, "injected by the test control directory")
            });
        }
    }

    async fn context(&self, params: &Value) -> Result<CallContext, RpcError> {
        let config = params
            .get("config")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let paths = collect_secret_ref_paths(&self.fake.config_schema());
        let resolved = resolve_provider_config(&config, &paths, &InMemorySecretResolver::new())
            .await
            .map_err(|e| RpcError::new(codes::INVALID_PARAMS, e.to_string()))?;
        let str_of = |k: &str| params.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(CallContext {
            company_id: str_of("companyId"),
            environment_id: str_of("environmentId").unwrap_or_default(),
            issue_id: str_of("issueId"),
            config: resolved,
        })
    }

    fn to_rpc_error(&self, e: Error, params: &Value) -> RpcError {
        let (code, kind) = match &e {
            Error::NotSupported { .. } => (codes::METHOD_NOT_IMPLEMENTED, None),
            Error::Timeout { .. } => (codes::TIMEOUT, None),
            Error::NotFound { .. } => (codes::WORKER_ERROR, Some("not_found")),
            Error::InvalidConfig { .. } | Error::InvalidInput { .. } => {
                (codes::WORKER_ERROR, Some("invalid_config"))
            }
            Error::Unauthenticated { .. } => (codes::WORKER_ERROR, Some("unauthenticated")),
            Error::RateLimited { .. } => (codes::WORKER_ERROR, Some("rate_limited")),
            _ => (codes::WORKER_ERROR, None),
        };
        let mut message = e.to_string();
        if self.faults.leak_secrets
            && let Some(secret) = params
                .get("config")
                .and_then(|c| c.get(SECRET_FIELD))
                .and_then(Value::as_str)
        {
            message = format!("{message} (with credential {secret})");
            eprintln!("reference worker failing with credential {secret}");
        }
        RpcError {
            code,
            message,
            data: Some(json!({"paperclipEnv": {"kind": kind, "retryable": e.is_retryable()}})),
        }
    }

    async fn environment(
        &self,
        method: &str,
        params: &Value,
        invocation_id: Option<&str>,
    ) -> Result<Value, Error> {
        let ctx = self
            .context(params)
            .await
            .map_err(|e| Error::invalid_field("config", e.message))?;
        let lease_from = |key: &str| -> LeaseHandle {
            match key {
                "lease" => params
                    .get("lease")
                    .cloned()
                    .and_then(|l| serde_json::from_value(l).ok())
                    .unwrap_or_default(),
                _ => LeaseHandle {
                    provider_lease_id: params
                        .get("providerLeaseId")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    metadata: params
                        .get("leaseMetadata")
                        .and_then(Value::as_object)
                        .cloned(),
                    expires_at: None,
                },
            }
        };
        let fake = &self.fake;
        let json_of = |v: Result<Value, serde_json::Error>| {
            v.map_err(|e| Error::provider(SANDBOX_DRIVER_KEY, e.to_string()))
        };
        match method {
            methods::VALIDATE_CONFIG => {
                let config = params
                    .get("config")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let v = fake.validate_config(&config).await?;
                Ok(json!({
                    "ok": v.ok,
                    "warnings": v.warnings,
                    "errors": v.errors.iter().map(|i| i.message.clone()).collect::<Vec<_>>(),
                    "normalizedConfig": v.normalized_config,
                }))
            }
            methods::PROBE => json_of(serde_json::to_value(fake.probe(&ctx).await?)),
            methods::ACQUIRE => {
                let request = AcquireRequest {
                    run_id: params
                        .get("runId")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    workspace_mode: params
                        .get("workspaceMode")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    ..Default::default()
                };
                json_of(serde_json::to_value(fake.acquire(&ctx, &request).await?))
            }
            methods::RESUME => json_of(serde_json::to_value(
                fake.resume(&ctx, &lease_from("id")).await?,
            )),
            methods::RELEASE => {
                fake.release(&ctx, &lease_from("id"), LeaseStatus::Released)
                    .await?;
                Ok(Value::Null)
            }
            methods::DESTROY => {
                fake.destroy(&ctx, &lease_from("id")).await?;
                Ok(Value::Null)
            }
            methods::REALIZE => {
                let workspace: WorkspaceSpec = params
                    .get("workspace")
                    .cloned()
                    .and_then(|w| serde_json::from_value(w).ok())
                    .unwrap_or_default();
                json_of(serde_json::to_value(
                    fake.realize_workspace(&ctx, &lease_from("lease"), &workspace)
                        .await?,
                ))
            }
            methods::EXECUTE => {
                let request: ExecuteRequest = serde_json::from_value(params.clone())
                    .map_err(|e| Error::invalid_field("command", e.to_string()))?;
                // Output streams to the host as `execute.log` chunks while
                // the command runs (as the SDK's `ctx.execute` log sink does),
                // and the result carries it all again.
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let sink = invocation_id.map(|invocation| {
                    let invocation = invocation.to_owned();
                    Arc::new(move |stream: OutputStream, data: &[u8]| {
                        let name = match stream {
                            OutputStream::Stdout => "stdout",
                            OutputStream::Stderr => "stderr",
                        };
                        let chunk = String::from_utf8_lossy(data);
                        let _ = tx.send(protocol::execute_log_line(&invocation, name, &chunk));
                    }) as Arc<dyn OutputSink>
                });
                let output = OutputCollector::new(OutputCapture::Full, sink);
                let lease = lease_from("lease");
                let run = fake.execute(&ctx, &lease, &request, &output);
                tokio::pin!(run);
                let exit = loop {
                    tokio::select! {
                        biased;
                        Some(line) = rx.recv() => self.write(&line).await,
                        exit = &mut run => break exit?,
                    }
                };
                // Chunks pushed just before the exit go out before the answer.
                while let Ok(line) = rx.try_recv() {
                    self.write(&line).await;
                }
                json_of(serde_json::to_value(output.finish(exit)))
            }
            other => Err(Error::provider(
                SANDBOX_DRIVER_KEY,
                format!("Unknown method: {other}"),
            )),
        }
    }

    async fn dispatch(
        &self,
        method: &str,
        params: &Value,
        invocation_id: Option<&str>,
    ) -> Result<Value, RpcError> {
        match method {
            methods::INITIALIZE => {
                let supported: Vec<&str> = ENVIRONMENT_METHODS
                    .iter()
                    .copied()
                    .filter(|m| !self.faults.not_implemented.iter().any(|n| n == m))
                    .collect();
                Ok(json!({"ok": true, "supportedMethods": supported}))
            }
            methods::HEALTH => Ok(json!({"status": "ok"})),
            methods::SHUTDOWN => Ok(Value::Null),
            m if ENVIRONMENT_METHODS.contains(&m) => {
                if self.faults.not_implemented.iter().any(|n| n == m) {
                    return Err(RpcError::new(
                        codes::METHOD_NOT_IMPLEMENTED,
                        format!("{m} is not implemented by this plugin"),
                    ));
                }
                if self.faults.crash_on.as_deref() == Some(m) {
                    eprintln!("reference worker: crashing on {m}");
                    std::process::exit(3);
                }
                if self.faults.hang_on.as_deref() == Some(m) {
                    std::future::pending::<()>().await;
                }
                if let Some(op) = operation_of(m) {
                    self.arm_control_faults(m, op);
                }
                let result = self.environment(m, params, invocation_id).await;
                self.write_stats();
                match result {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        let rpc = self.to_rpc_error(e, params);
                        if self.faults.leak_secrets {
                            self.notify_log("error", &rpc.message).await;
                        }
                        Err(rpc)
                    }
                }
            }
            other => Err(RpcError::new(
                codes::METHOD_NOT_FOUND,
                format!("Unknown method: {other}"),
            )),
        }
    }
}

/// Serves the protocol on `input`/`output` until stdin closes or `shutdown`
/// is answered. Requests are handled concurrently, as upstream's host does.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use paperclip_env_testkit::{fake::FakeProvider, plugin_worker::{serve, WorkerFaults}};
/// let input = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{}}\n".to_vec();
/// let (mut host, worker_out) = tokio::io::duplex(4096);
/// serve(FakeProvider::new(), WorkerFaults::default(), &input[..], worker_out).await.unwrap();
/// let mut answer = String::new();
/// tokio::io::AsyncReadExt::read_to_string(&mut host, &mut answer).await.unwrap();
/// assert!(answer.contains(r#""supportedMethods":["environmentValidateConfig""#));
/// # });
/// ```
pub async fn serve<R, W>(
    fake: FakeProvider,
    faults: WorkerFaults,
    input: R,
    output: W,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let server = Arc::new(Server {
        fake,
        faults,
        out: Mutex::new(output),
    });
    let mut lines = BufReader::new(input).lines();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message = match protocol::parse_line(&line) {
            Ok(m) => m,
            Err(e) => {
                let err = RpcError::new(codes::PARSE_ERROR, format!("Parse error: {}", e.0));
                server
                    .write(&protocol::error_line(&Value::Null, &err))
                    .await;
                continue;
            }
        };
        let Incoming::Request {
            id,
            method,
            params,
            invocation_id,
        } = message
        else {
            continue;
        };
        if server.faults.wedge_on.as_deref() == Some(method.as_str()) {
            // Stuck: nothing more is read or answered, `health` included.
            std::future::pending::<()>().await;
        }
        if server.faults.garbage_on.as_deref() == Some(method.as_str()) {
            server.write("this line is not JSON-RPC\n").await;
            continue;
        }
        let shutdown = method == methods::SHUTDOWN;
        let server = server.clone();
        let task = async move {
            let line = match server
                .dispatch(&method, &params, invocation_id.as_deref())
                .await
            {
                Ok(result) => protocol::result_line(&id, &result),
                Err(e) => protocol::error_line(&id, &e),
            };
            server.write(&line).await;
        };
        if shutdown {
            task.await;
            break;
        }
        tasks.spawn(task);
    }
    // Stdin closed: let calls in flight answer briefly, then stop.
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    tasks.abort_all();
    Ok(())
}

/// Reads the stats file of a control directory: `(live, created, executed)`.
pub fn read_stats(control_dir: &std::path::Path) -> (usize, usize, usize) {
    let stats: JsonObject = std::fs::read_to_string(control_dir.join("stats.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    (n("live"), n("created"), n("executed"))
}
