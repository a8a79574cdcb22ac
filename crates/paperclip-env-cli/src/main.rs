//! `paperclip-env`: the operator CLI of paperclip-env.
//!
//! Probes environments, acquires, uses and releases leases, lists them, and
//! runs the reaper, with a SQLite file as its state, so a lease acquired by
//! one invocation can be used, released or reaped by a later one, even after
//! a crash. Environments are Paperclip's camelCase `Environment` JSON files;
//! secret references in their configs are read from environment variables
//! (`PAPERCLIP_SECRET_<ID>`) and never printed. Every provider compiled in
//! (cargo features, all on by default: `e2b`, `novita`, `cloudflare`,
//! `daytona`, `exe-dev`, `modal`, `kubernetes`, and the `ssh` driver) is
//! registered, reading its env fallbacks (`E2B_API_KEY`, `NOVITA_API_KEY`,
//! `DAYTONA_API_KEY`, `EXE_API_KEY`, `MODAL_SERVER_URL`, …). The fake provider
//! (`fake-plugin`) is always registered, so everything works with no account.
//! `--plugin FILE` adds a Paperclip provider plugin served by its own worker
//! process (see the README):
//!
//! ```text
//! echo '{"id":"env-1","name":"Fake","driver":"sandbox","config":{"provider":"fake-plugin"}}' > env.json
//! paperclip-env acquire --env env.json --run run-1
//! paperclip-env exec <LEASE_ID> -- echo hello
//! paperclip-env release <LEASE_ID>
//! paperclip-env leases
//! paperclip-env reap
//! paperclip-env sync up <LEASE_ID> ./workspace     # and `sync down` to bring it back
//! paperclip-env doctor --env env.json              # credentials, reachability, clock skew
//! paperclip-env conformance --env env.json         # the conformance suite, a line per check
//! paperclip-env emulate e2b   # a local E2B for the vendor SDK (see the README)
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use paperclip_env_core::secret::EnvSecretResolver;
use paperclip_env_core::store::{EnvironmentStore, LeaseStore};
use paperclip_env_core::time::{self, Timestamp};
use paperclip_env_core::{
    AcquireRunLease, Environment, EnvironmentLease, EnvironmentRuntime, EnvironmentRuntimeDriver,
    Error, ExecuteRequest, LeaseStatus, OutputCapture, OutputStream, ReapReport, Reaper,
    ReaperOptions, RuntimeOptions, SandboxProvider,
};
use paperclip_env_providers::fake::FakeProvider;
use paperclip_env_store_postgres::PostgresStore;
use paperclip_env_store_sqlite::SqliteStore;
use serde_json::{Value, json};

mod conformance;
mod doctor;
#[cfg(feature = "emulate")]
mod emulate;
mod sync;

/// Operate paperclip-env leases: probe environments, acquire, exec, release,
/// list and reap leases. State lives in a SQLite file, so leases survive
/// restarts and crashes.
#[derive(Debug, Parser)]
#[command(name = "paperclip-env", version, about, long_about = None)]
struct Cli {
    /// The SQLite state file [default: $XDG_DATA_HOME/paperclip-env/state.db,
    /// else ~/.local/share/paperclip-env/state.db].
    #[arg(long, global = true, env = "PAPERCLIP_ENV_STATE", value_name = "PATH")]
    state: Option<PathBuf>,

    /// A PostgreSQL connection string (libpq style); when given, lease state
    /// lives there (shared by several hosts) instead of the SQLite file.
    #[arg(
        long,
        global = true,
        env = "PAPERCLIP_ENV_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Where the fake provider (`fake-plugin`) creates sandbox directories
    /// [default: the OS temp dir].
    #[arg(
        long,
        global = true,
        env = "PAPERCLIP_ENV_FAKE_ROOT",
        value_name = "DIR"
    )]
    fake_root: Option<PathBuf>,

    /// Longest a sandbox or plugin lease may stay active before `reap`
    /// releases it (the reaper's bound; never stored as `expiresAt`), e.g.
    /// `90s`, `30m`, `24h`, `2d` [default: 24h].
    #[arg(long, global = true, env = "PAPERCLIP_ENV_MAX_LEASE_LIFETIME", value_name = "DURATION", value_parser = parse_duration)]
    max_lease_lifetime: Option<Duration>,

    /// How often an acquisition in flight marks its lease row alive, e.g.
    /// `10s` [default: 10s]. `reap` sweeps an acquisition whose row stayed
    /// silent for three beats: its process died before recording the
    /// provider's answer.
    #[arg(long, global = true, env = "PAPERCLIP_ENV_ACQUISITION_HEARTBEAT", value_name = "DURATION", value_parser = parse_duration)]
    acquisition_heartbeat: Option<Duration>,

    /// Fault injection for crash drills: the fake provider answers this long
    /// after creating a sandbox.
    #[arg(long, global = true, hide = true, env = "PAPERCLIP_ENV_FAKE_STALL_AFTER_CREATE", value_parser = parse_duration)]
    fake_stall_after_create: Option<Duration>,

    /// A Paperclip provider plugin to serve out of process (repeatable): a
    /// JSON file `{"manifest": <manifest object or path>, "command": "node",
    /// "args": ["…/dist/worker.js"], "env": {…}, "config": {…}}`. Its
    /// `sandbox_provider` entries back `driver: "sandbox"` environments,
    /// its `environment_driver` entries `driver: "plugin"` ones.
    #[cfg(feature = "plugin")]
    #[arg(
        long = "plugin",
        global = true,
        env = "PAPERCLIP_ENV_PLUGINS",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    plugins: Vec<PathBuf>,

    /// Log what happens inside on stderr: `-v` info, `-vv` debug, `-vvv`
    /// trace (default: warnings). `RUST_LOG` (e.g.
    /// `paperclip_env_core=debug`) overrides. Secrets are scrubbed before
    /// they are logged.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Test an environment without leasing it (reachability, credentials).
    Probe {
        /// The environment JSON file.
        #[arg(long = "env", value_name = "FILE")]
        environment: PathBuf,
    },
    /// Acquire a lease on an environment and record it in the state file.
    Acquire {
        /// The environment JSON file.
        #[arg(long = "env", value_name = "FILE")]
        environment: PathBuf,
        /// The run owning the lease (omit for an ad-hoc lease).
        #[arg(long, value_name = "RUN_ID")]
        run: Option<String>,
        /// The issue being worked on.
        #[arg(long, value_name = "ISSUE_ID")]
        issue: Option<String>,
        /// Keep the process alive after acquiring, until it is killed (crash
        /// drills: the lease stays active for the reaper to find).
        #[arg(long)]
        hold: bool,
    },
    /// Run a command in a leased environment; exits with the command's code.
    Exec {
        /// The lease id.
        lease: String,
        /// Working directory (default: the lease's).
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// Command timeout in milliseconds.
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Move a workspace into a lease (`up`) or back (`down`, a three-way
    /// merge against the last sync), with progress (files, bytes, rate) on
    /// stderr.
    Sync {
        /// `up`: DIR into the lease; `down`: the lease into DIR.
        #[arg(value_enum)]
        way: sync::Way,
        /// The lease id.
        lease: String,
        /// The local workspace directory.
        dir: PathBuf,
        /// The directory in the lease [default: the lease's remoteCwd, else
        /// its realized workspace].
        #[arg(long, value_name = "PATH")]
        remote: Option<String>,
        /// Leave out paths matching this gitignore-style pattern (repeatable;
        /// `.gitignore` files are honoured too).
        #[arg(long = "exclude", value_name = "PATTERN")]
        excludes: Vec<String>,
    },
    /// Check each configured environment (the `--env` files and every
    /// environment of a lease in the state file): credentials present,
    /// reachable (a probe), clock skew against the service; exits 1 when a
    /// check fails.
    Doctor {
        /// An environment JSON file to check (repeatable).
        #[arg(long = "env", value_name = "FILE")]
        environments: Vec<PathBuf>,
        /// Upper bound of each network check.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
        timeout: Duration,
    },
    /// Release a lease through its driver (provider cleanup included).
    Release {
        /// The lease id.
        lease: String,
        /// The status to record.
        #[arg(long, value_enum, default_value_t = ReleaseAs::Released)]
        status: ReleaseAs,
    },
    /// List leases with status, age and expiry (newest first).
    Leases {
        /// Only leases of this environment id.
        #[arg(long = "environment", value_name = "ID")]
        environment: Option<String>,
        /// Only leases with this status (active, released, expired, failed,
        /// retained, pending_cleanup).
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
    },
    /// Release expired and stranded leases and retry failed cleanups.
    Reap {
        /// Active leases older than this are stranded, e.g. `6h`.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        max_age: Option<Duration>,
        /// A run known to be finished: its active leases are stranded (repeatable).
        #[arg(long = "finished-run", value_name = "RUN_ID")]
        finished_runs: Vec<String>,
        /// Wait before the first cleanup retry; doubles per attempt.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
        initial_backoff: Duration,
    },
    /// Run the conformance suite against an environment (a real account, an
    /// SSH host, a plugin, an emulator): a line per check with its MUST or
    /// SHOULD level, then a summary. Everything it creates is released, also
    /// on Ctrl-C; exits 1 when a MUST line fails, 130 when interrupted. No
    /// state file is used.
    Conformance {
        /// The environment JSON file.
        #[arg(long = "env", value_name = "FILE")]
        environment: PathBuf,
        /// Run only these lines: ids (`A6.1`, `R4`) or prefixes (`A6`).
        #[arg(long, value_name = "LINE", num_args = 1.., value_delimiter = ',')]
        only: Vec<String>,
        /// Print the lines that would run, and exit.
        #[arg(long)]
        list: bool,
        /// Upper bound of one call to the environment.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "120s")]
        call_timeout: Duration,
    },
    /// Serve a provider's protocol emulator on 127.0.0.1 until SIGINT or
    /// SIGTERM; prints one JSON line with its URLs, credentials and the env
    /// vars the vendor SDK needs.
    #[cfg(feature = "emulate")]
    Emulate {
        /// The service to emulate.
        #[arg(value_enum)]
        provider: emulate::EmulatedProvider,
        /// The port on 127.0.0.1 (0: a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Serve HTTPS with a throwaway CA (written next to the kubeconfig);
        /// kubernetes only.
        #[arg(long)]
        tls: bool,
        /// The credential the emulator accepts [default: a random one].
        #[arg(long, value_name = "KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// e2b/novita: serve the v1 control-plane routes only (`/v2/…`
        /// answers 404), as older deployments do.
        #[arg(long)]
        v1_only: bool,
    },
}

/// Statuses an operator may release a lease with.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReleaseAs {
    /// Released normally.
    Released,
    /// Released because it expired.
    Expired,
    /// Released after a failure.
    Failed,
}

impl From<ReleaseAs> for LeaseStatus {
    fn from(value: ReleaseAs) -> Self {
        match value {
            ReleaseAs::Released => LeaseStatus::Released,
            ReleaseAs::Expired => LeaseStatus::Expired,
            ReleaseAs::Failed => LeaseStatus::Failed,
        }
    }
}

/// Parses `500ms`, `90s`, `30m`, `24h`, `2d`, or bare seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 90s, 30m, 24h; got {text:?}"))?;
    let secs = |k: u64| Duration::from_secs(n.saturating_mul(k));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(secs(1)),
        "m" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        "d" => Ok(secs(86_400)),
        other => Err(format!(
            "unknown duration unit {other:?} (use ms, s, m, h, d)"
        )),
    }
}

fn default_state_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("paperclip-env").join("state.db")
}

/// A spinner on stderr while a slow step runs (hidden when stderr is not a terminal).
fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

async fn slow<T>(message: &str, work: impl std::future::Future<Output = T>) -> T {
    let bar = spinner(message);
    let out = work.await;
    bar.finish_and_clear();
    out
}

/// Where the CLI keeps lease and environment state.
enum State {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PostgresStore>),
}

impl State {
    async fn list_all(&self) -> Result<Vec<EnvironmentLease>, Error> {
        match self {
            State::Sqlite(store) => store.list_all().await,
            State::Postgres(store) => store.list_all().await,
        }
    }
}

struct App {
    runtime: EnvironmentRuntime,
    state: State,
    json: bool,
    /// Where `sync` keeps the snapshot of each lease's last transfer.
    baselines: PathBuf,
}

fn read_environment(path: &Path) -> Result<Environment, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid_field("env", format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::invalid_field(
            "env",
            format!("{} is not an Environment JSON: {e}", path.display()),
        )
    })
}

fn human_age(from: Timestamp, to: Timestamp) -> String {
    let secs = (to - from).num_seconds();
    let (abs, suffix) = if secs < 0 {
        (-secs, "from now")
    } else {
        (secs, "ago")
    };
    let text = match abs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    };
    format!("{text} {suffix}")
}

fn lease_json(lease: &EnvironmentLease) -> Value {
    serde_json::to_value(lease).unwrap_or(Value::Null)
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

#[cfg(feature = "plugin")]
mod plugins {
    //! `--plugin FILE`: workers of Paperclip provider plugins.

    use std::path::Path;
    use std::sync::Arc;

    use paperclip_env_core::Error;
    use paperclip_env_core::plugin::{
        DriverKind, PluginDriver, PluginManifest, PluginSandboxProvider, PluginWorker,
        PluginWorkerConfig,
    };
    use serde::Deserialize;
    use serde_json::Value;

    /// Every worker this process registered, shut down before it exits.
    static WORKERS: std::sync::Mutex<Vec<PluginWorker>> = std::sync::Mutex::new(Vec::new());

    /// Sends `shutdown` to every started worker (so its `onShutdown` runs),
    /// then SIGTERM/SIGKILL as upstream. A plugin that kept state in the
    /// host is told on stderr that the state ends with this command: every
    /// CLI command starts fresh workers.
    pub(crate) async fn shutdown_all() {
        let workers = std::mem::take(&mut *WORKERS.lock().unwrap_or_else(|p| p.into_inner()));
        for worker in workers {
            if worker.has_host_state() {
                eprintln!(
                    "note: plugin \"{}\" kept state in the host (ctx.state); it does not survive this command, since each paperclip-env command starts its plugin workers afresh",
                    worker.plugin_key()
                );
            }
            if worker.starts() > 0 {
                worker.shutdown().await;
            }
        }
    }

    /// One `--plugin` file.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PluginFile {
        /// The manifest itself, or the path of a JSON file holding it
        /// (relative to the plugin file).
        manifest: Value,
        command: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        config: serde_json::Map<String, Value>,
        /// A stdout line that is not JSON-RPC fails the calls and restarts
        /// the worker, instead of being logged and skipped (the default).
        #[serde(default, rename = "strictStdout")]
        strict_stdout: bool,
    }

    fn read_json(path: &Path, what: &str) -> Result<Value, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid_field(
                what,
                format!("cannot read {what} file {}: {e}", path.display()),
            )
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::invalid_field(
                what,
                format!("{what} file {} is not JSON: {e}", path.display()),
            )
        })
    }

    /// Adds the plugins' providers and drivers to `registry`; workers start on first use.
    pub(crate) fn register(
        registry: &mut crate::Registry,
        files: &[std::path::PathBuf],
    ) -> Result<(), Error> {
        let mut driver: Option<PluginDriver> = None;
        for file in files {
            let spec: PluginFile =
                serde_json::from_value(read_json(file, "plugin")?).map_err(|e| {
                    Error::invalid_field("plugin", format!("plugin file {}: {e}", file.display()))
                })?;
            let manifest = match spec.manifest {
                Value::String(path) => {
                    let base = file.parent().unwrap_or_else(|| Path::new("."));
                    read_json(&base.join(path), "plugin.manifest")?
                }
                other => other,
            };
            let manifest = PluginManifest::from_json(manifest)?;
            let mut config = PluginWorkerConfig::new(spec.command, manifest.clone())
                .plugin_config(spec.config)
                .strict_stdout(spec.strict_stdout);
            for arg in spec.args {
                config = config.arg(arg);
            }
            for (key, value) in spec.env {
                config = config.env(key, value);
            }
            let worker = PluginWorker::new(config);
            WORKERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(worker.clone());
            for entry in &manifest.drivers {
                match entry.kind {
                    DriverKind::SandboxProvider => {
                        registry.providers.push(Arc::new(PluginSandboxProvider::new(
                            worker.clone(),
                            &entry.driver_key,
                        )?));
                    }
                    DriverKind::EnvironmentDriver => {
                        driver = Some(
                            driver
                                .take()
                                .unwrap_or_default()
                                .with_plugin(worker.clone()),
                        );
                    }
                }
            }
        }
        if let Some(driver) = driver {
            registry.drivers.push(Arc::new(driver));
        }
        Ok(())
    }
}

/// The providers and drivers one invocation serves.
pub(crate) struct Registry {
    pub(crate) providers: Vec<Arc<dyn SandboxProvider>>,
    pub(crate) drivers: Vec<Arc<dyn EnvironmentRuntimeDriver>>,
}

impl Registry {
    /// Every provider compiled into this binary, configured from the
    /// environment (their documented env fallbacks), the fake, and the
    /// `--plugin` files' providers and drivers.
    pub(crate) fn from_cli(cli: &Cli) -> Result<Self, Error> {
        let mut fake = FakeProvider::builder().secret_field("apiKey");
        if let Some(root) = &cli.fake_root {
            fake = fake.temp_root(root);
        }
        let fake = fake.build();
        if let Some(stall) = cli.fake_stall_after_create {
            fake.faults().stall_after_create(stall);
        }
        let mut registry = Registry {
            providers: vec![Arc::new(fake)],
            drivers: Vec::new(),
        };
        registry.compiled_in()?;
        #[cfg(feature = "plugin")]
        plugins::register(&mut registry, &cli.plugins)?;
        Ok(registry)
    }

    fn compiled_in(&mut self) -> Result<(), Error> {
        #[cfg(feature = "e2b")]
        self.providers.push(Arc::new(
            paperclip_env_providers::e2b::E2bProvider::from_env()?,
        ));
        #[cfg(feature = "novita")]
        self.providers.push(Arc::new(
            paperclip_env_providers::e2b::E2bProvider::novita_from_env()?,
        ));
        #[cfg(feature = "cloudflare")]
        self.providers.push(Arc::new(
            paperclip_env_providers::cloudflare::CloudflareProvider::builder().build()?,
        ));
        #[cfg(feature = "daytona")]
        self.providers.push(Arc::new(
            paperclip_env_providers::daytona::DaytonaProvider::from_env()?,
        ));
        #[cfg(feature = "exe-dev")]
        self.providers.push(Arc::new(
            paperclip_env_providers::exe_dev::ExeDevProvider::from_env()?,
        ));
        #[cfg(feature = "modal")]
        self.providers.push(Arc::new(
            paperclip_env_providers::modal::ModalProvider::from_env()?,
        ));
        #[cfg(feature = "kubernetes")]
        self.providers.push(Arc::new(
            paperclip_env_providers::kubernetes::KubernetesProvider::builder().build(),
        ));
        #[cfg(feature = "ssh")]
        self.drivers
            .push(Arc::new(paperclip_env_providers::ssh::SshDriver::new()));
        Ok(())
    }
}

impl App {
    async fn open(cli: &Cli) -> Result<Self, Error> {
        let state = match &cli.database_url {
            Some(url) => State::Postgres(Arc::new(
                slow("connecting to PostgreSQL", PostgresStore::connect(url)).await?,
            )),
            None => {
                let path = cli.state.clone().unwrap_or_else(default_state_path);
                State::Sqlite(Arc::new(SqliteStore::open(&path).await?))
            }
        };
        let (leases, environments): (Arc<dyn LeaseStore>, Arc<dyn EnvironmentStore>) = match &state
        {
            State::Sqlite(store) => (store.clone(), store.clone()),
            State::Postgres(store) => (store.clone(), store.clone()),
        };
        let defaults = RuntimeOptions::default();
        let options = RuntimeOptions {
            max_lease_lifetime: cli.max_lease_lifetime.or(defaults.max_lease_lifetime),
            acquisition_heartbeat: cli
                .acquisition_heartbeat
                .unwrap_or(defaults.acquisition_heartbeat),
            ..defaults
        };
        let mut builder = EnvironmentRuntime::builder()
            .lease_store(leases)
            .environment_store(environments)
            .secrets(Arc::new(EnvSecretResolver::new()))
            .options(options);
        let registry = Registry::from_cli(cli)?;
        for provider in registry.providers {
            builder = builder.provider(provider);
        }
        for driver in registry.drivers {
            builder = builder.driver(driver);
        }
        let runtime = builder.build();
        let state_path = cli.state.clone().unwrap_or_else(default_state_path);
        let baselines = state_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("baselines");
        Ok(App {
            runtime,
            state,
            json: cli.json,
            baselines,
        })
    }

    async fn lease_and_environment(
        &self,
        id: &str,
    ) -> Result<(EnvironmentLease, Environment), Error> {
        let lease = self
            .runtime
            .lease_store()
            .get(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("No lease {id} in the state file.")))?;
        let environment_id = lease.environment_id.clone().unwrap_or_default();
        let environment = self
            .runtime
            .environment_store()
            .get(&environment_id)
            .await?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "Environment {environment_id} of lease {id} is not in the state file."
                ))
            })?;
        Ok((lease, environment))
    }

    async fn run(&self, command: Command) -> Result<ExitCode, Error> {
        match command {
            Command::Probe { environment } => {
                let env = read_environment(&environment)?;
                let result = slow("probing", self.runtime.probe(&env)).await?;
                if self.json {
                    print_json(&serde_json::to_value(&result).unwrap_or(Value::Null));
                } else {
                    let verdict = if result.ok { "ok" } else { "FAILED" };
                    println!("{verdict}: {} ({})", result.summary, result.driver);
                }
                Ok(if result.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Acquire {
                environment,
                run,
                issue,
                hold,
            } => {
                let env = read_environment(&environment)?;
                let mut input = match run {
                    Some(run) => AcquireRunLease::for_run(env, run),
                    None => AcquireRunLease::ad_hoc(env),
                };
                if let Some(issue) = issue {
                    input = input.issue(issue);
                }
                let record = slow("acquiring lease", self.runtime.acquire_run_lease(input)).await?;
                if self.json {
                    print_json(&lease_json(&record.lease));
                } else {
                    let expiry = record
                        .lease
                        .expires_at
                        .map(|at| format!("expires {}", time::to_iso(&at)))
                        .unwrap_or_else(|| "no expiry".into());
                    println!("{} ({expiry})", record.lease.id);
                }
                if hold {
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    std::future::pending::<()>().await;
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Exec {
                lease,
                cwd,
                timeout_ms,
                command,
            } => {
                let (lease, env) = self.lease_and_environment(&lease).await?;
                if lease.status != LeaseStatus::Active {
                    return Err(Error::Conflict {
                        message: format!("Lease {} is {}, not active.", lease.id, lease.status),
                    });
                }
                let mut parts = command.into_iter();
                let program = parts.next().unwrap_or_default();
                let mut request = ExecuteRequest::new(program).args(parts);
                if let Some(cwd) = cwd {
                    request = request.cwd(cwd);
                }
                if let Some(ms) = timeout_ms {
                    request = request.timeout_ms(ms);
                }
                let result = if self.json {
                    self.runtime.execute(&env, &lease, &request).await?
                } else {
                    // Output reaches the terminal as it is produced.
                    let sink = |stream: OutputStream, data: &[u8]| {
                        use std::io::Write;
                        let _ = match stream {
                            OutputStream::Stdout => {
                                let mut out = std::io::stdout().lock();
                                out.write_all(data).and_then(|()| out.flush())
                            }
                            _ => {
                                let mut err = std::io::stderr().lock();
                                err.write_all(data).and_then(|()| err.flush())
                            }
                        };
                    };
                    let request = request.capture(OutputCapture::Discard);
                    self.runtime
                        .execute_streaming(&env, &lease, &request, Arc::new(sink))
                        .await?
                };
                self.runtime.lease_store().touch(&lease.id).await?;
                if self.json {
                    print_json(&json!({
                        "exitCode": result.exit_code,
                        "signal": result.signal,
                        "timedOut": result.timed_out,
                        "stdout": result.stdout,
                        "stderr": result.stderr,
                    }));
                } else if result.timed_out {
                    eprintln!("error: the command timed out");
                }
                let code = match result.exit_code {
                    Some(0) => ExitCode::SUCCESS,
                    Some(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
                    None => ExitCode::FAILURE,
                };
                Ok(code)
            }
            Command::Sync {
                way,
                lease,
                dir,
                remote,
                excludes,
            } => {
                let options = sync::Options {
                    way,
                    lease,
                    dir,
                    remote,
                    excludes,
                    baselines: self.baselines.clone(),
                };
                sync::run(self, options).await
            }
            Command::Doctor {
                environments,
                timeout,
            } => doctor::run(self, &environments, timeout).await,
            Command::Release { lease, status } => {
                let (lease, env) = self.lease_and_environment(&lease).await?;
                let released = slow(
                    "releasing lease",
                    self.runtime.release_lease(&env, &lease, status.into()),
                )
                .await?
                .ok_or_else(|| Error::not_found(format!("Lease {} vanished.", lease.id)))?;
                if self.json {
                    print_json(&lease_json(&released.lease));
                } else {
                    let cleanup = released
                        .lease
                        .cleanup_status
                        .map(|c| format!(", cleanup {c}"))
                        .unwrap_or_default();
                    println!("{} {}{cleanup}", released.lease.id, released.lease.status);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Leases {
                environment,
                status,
            } => {
                let status: Option<LeaseStatus> = status.map(|s| s.parse()).transpose()?;
                let leases: Vec<EnvironmentLease> = self
                    .state
                    .list_all()
                    .await?
                    .into_iter()
                    .filter(|l| {
                        environment
                            .as_ref()
                            .is_none_or(|e| l.environment_id.as_ref() == Some(e))
                    })
                    .filter(|l| status.is_none_or(|s| l.status == s))
                    .collect();
                if self.json {
                    print_json(&Value::Array(leases.iter().map(lease_json).collect()));
                } else {
                    self.print_table(&leases);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Reap {
                max_age,
                finished_runs,
                initial_backoff,
            } => {
                let options = ReaperOptions {
                    max_active_age: max_age,
                    initial_backoff,
                    ..Default::default()
                };
                let reaper = Reaper::new(self.runtime.clone())
                    .options(options)
                    .finished_runs(move |run| finished_runs.iter().any(|r| r == run));
                let report = slow("reaping leases", reaper.run_once()).await;
                self.print_reap(&report);
                Ok(if report.failures.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            #[cfg(feature = "emulate")]
            Command::Emulate { .. } => Err(Error::invalid_field(
                "command",
                "emulate runs without a state file",
            )),
            Command::Conformance { .. } => Err(Error::invalid_field(
                "command",
                "conformance runs without a state file",
            )),
        }
    }

    fn print_table(&self, leases: &[EnvironmentLease]) {
        let now = time::now();
        println!(
            "{:<36}  {:<16}  {:<15}  {:<8}  {:<14}  {:<16}  RUN",
            "ID", "ENVIRONMENT", "STATUS", "CLEANUP", "AGE", "EXPIRES"
        );
        for lease in leases {
            let expires = lease
                .expires_at
                .map(|at| {
                    if at <= now {
                        format!("expired {}", human_age(at, now))
                    } else {
                        human_age(at, now)
                    }
                })
                .unwrap_or_else(|| "never".into());
            println!(
                "{:<36}  {:<16}  {:<15}  {:<8}  {:<14}  {:<16}  {}",
                lease.id,
                lease.environment_id.as_deref().unwrap_or("-"),
                lease.status.as_str(),
                lease.cleanup_status.map(|c| c.as_str()).unwrap_or("-"),
                human_age(lease.acquired_at, now),
                expires,
                lease.heartbeat_run_id.as_deref().unwrap_or("-"),
            );
        }
    }

    fn print_reap(&self, report: &ReapReport) {
        if self.json {
            print_json(&serde_json::to_value(report).unwrap_or(Value::Null));
            return;
        }
        let line = |label: &str, ids: &[String]| {
            if !ids.is_empty() {
                println!("{label}: {}", ids.join(", "));
            }
        };
        line("expired", &report.expired);
        line("stranded", &report.stranded);
        line("orphaned acquisitions swept", &report.orphaned);
        line("cleaned up", &report.cleaned_up);
        line("cleanup failed (will retry)", &report.cleanup_failed);
        line("deferred (backoff)", &report.deferred);
        line("abandoned", &report.abandoned);
        line("skipped (claimed elsewhere)", &report.skipped);
        for failure in &report.failures {
            println!("failed {}: {}", failure.lease_id, failure.message);
        }
        if !report.acted() && report.failures.is_empty() {
            println!("nothing to reap");
        }
    }
}

/// Logs to stderr (stdout carries results and `--json`): `RUST_LOG` when
/// set, else warnings, raised by each `-v`.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    #[cfg(feature = "emulate")]
    if let Command::Emulate {
        provider,
        port,
        tls,
        api_key,
        v1_only,
    } = &cli.command
    {
        let options = emulate::EmulateOptions {
            provider: *provider,
            port: *port,
            tls: *tls,
            api_key: api_key.clone(),
            v1_only: *v1_only,
        };
        return match emulate::run(options).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Conformance {
        environment,
        only,
        list,
        call_timeout,
    } = &cli.command
    {
        let options = conformance::Options {
            environment: environment.clone(),
            only: only.clone(),
            list: *list,
            call_timeout: *call_timeout,
            json: cli.json,
        };
        let outcome = conformance::run(&cli, options).await;
        #[cfg(feature = "plugin")]
        plugins::shutdown_all().await;
        return match outcome {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let outcome = match App::open(&cli).await {
        Ok(app) => app.run(cli.command).await,
        Err(e) => Err(e),
    };
    #[cfg(feature = "plugin")]
    plugins::shutdown_all().await;
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(10_800)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
