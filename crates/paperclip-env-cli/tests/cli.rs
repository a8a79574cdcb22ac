//! End-to-end tests of the built `paperclip-env` binary on the fake provider.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_paperclip-env");

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn fake_root(&self) -> PathBuf {
        self.dir.path().join("sandboxes")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--state")
            .arg(self.dir.path().join("state/state.db"))
            .env("PAPERCLIP_ENV_FAKE_ROOT", self.fake_root())
            .env_remove("PAPERCLIP_ENV_STATE")
            .env_remove("PAPERCLIP_ENV_MAX_LEASE_LIFETIME")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.run(&full);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn env_file(&self, config: Value) -> PathBuf {
        let path = self.dir.path().join("env.json");
        let env = json!({"id": "env-fake", "name": "Fake sandbox", "driver": "sandbox", "config": config});
        std::fs::write(&path, env.to_string()).unwrap();
        path
    }

    fn sandboxes(&self) -> usize {
        std::fs::read_dir(self.fake_root())
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn help_documents_every_command() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (command, words) in [
        ("probe", "Test an environment"),
        ("acquire", "Acquire a lease"),
        ("exec", "Run a command"),
        ("release", "Release a lease"),
        ("leases", "List leases"),
        ("reap", "expired and stranded"),
        ("sync", "Move a workspace"),
        ("conformance", "Run the conformance suite"),
        ("doctor", "Check each configured environment"),
    ] {
        assert!(help.contains(command), "--help lacks {command}:\n{help}");
        assert!(help.contains(words), "--help lacks {words:?}:\n{help}");
        let sub = Command::new(BIN)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(sub.status.success(), "{command} --help failed");
        let sub_help = String::from_utf8_lossy(&sub.stdout);
        assert!(sub_help.contains("Usage: paperclip-env"), "{sub_help}");
    }
    for flag in ["--state", "--json", "--fake-root", "--max-lease-lifetime"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn full_lifecycle_on_the_fake_provider() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let env = env.to_str().unwrap();

    let probe = sb.ok_json(&["probe", "--env", env]);
    assert_eq!(probe["ok"], json!(true), "{probe}");

    let lease = sb.ok_json(&["acquire", "--env", env, "--run", "run-1"]);
    let id = lease["id"].as_str().unwrap().to_owned();
    assert_eq!(lease["status"], "active");
    assert!(
        lease["expiresAt"].is_null(),
        "only a provider-confirmed expiry is stored (the lifetime bound is the reaper's)"
    );
    let root = PathBuf::from(lease["metadata"]["fakeRootDir"].as_str().unwrap());
    assert!(root.is_dir() && root.starts_with(sb.fake_root()));

    let out = sb.run(&["exec", &id, "--", "sh", "-c", "echo hello; echo oops >&2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    let out = sb.run(&["exec", &id, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let result = {
        let out = sb.run(&["--json", "exec", &id, "--", "echo", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(result["exitCode"], 0);
    assert_eq!(result["stdout"], "json\n");

    let listed = sb.ok_json(&["leases"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let table = sb.run(&["leases", "--status", "active"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&id) && table.contains("active") && table.contains("EXPIRES"),
        "{table}"
    );

    let released = sb.ok_json(&["release", &id]);
    assert_eq!(released["status"], "released");
    assert_eq!(released["cleanupStatus"], "success");
    assert!(!root.exists(), "sandbox not cleaned up");
    assert_eq!(sb.sandboxes(), 0);

    let active = sb.ok_json(&["leases", "--status", "active"]);
    assert_eq!(active, json!([]));
    let out = sb.run(&["exec", &id, "--", "true"]);
    assert!(!out.status.success(), "exec on a released lease must fail");
    let reap = sb.ok_json(&["reap"]);
    assert_eq!(reap["expired"], json!([]));
}

#[test]
fn a_killed_acquire_is_reaped_after_restart() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let mut child = sb
        .command()
        .args(["--json", "--max-lease-lifetime", "1s", "acquire", "--hold"])
        .args(["--env", env.to_str().unwrap(), "--run", "doomed-run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let lease: Value = loop {
        let line = lines.next().expect("acquire printed its lease").unwrap();
        printed.push_str(&line);
        if line == "}" {
            break serde_json::from_str(&printed).unwrap();
        }
    };
    // The process dies between acquire and release.
    child.kill().unwrap();
    child.wait().unwrap();
    let id = lease["id"].as_str().unwrap();
    let root = PathBuf::from(lease["metadata"]["fakeRootDir"].as_str().unwrap());
    assert!(root.is_dir(), "sandbox should still exist after the crash");
    let listed = sb.ok_json(&["leases", "--status", "active"]);
    assert_eq!(listed[0]["id"], id);

    std::thread::sleep(Duration::from_millis(1200));
    // The lifetime bound is applied by the reaper (no stored expiry).
    let report = sb.ok_json(&["--max-lease-lifetime", "1s", "reap"]);
    assert_eq!(report["expired"], json!([id]), "{report}");
    assert_eq!(report["failures"], json!([]));
    assert!(!root.exists(), "the crashed process's sandbox leaked");
    assert_eq!(sb.sandboxes(), 0);
    let row = &sb.ok_json(&["leases"])[0];
    assert_eq!(row["status"], "expired");
    assert_eq!(row["cleanupStatus"], "success");
    assert!(row["releasedAt"].is_string());

    let again = sb.ok_json(&["reap"]);
    assert_eq!(again["expired"], json!([]), "reaping twice released again");
}

/// kill -9 while the provider is still creating: the sandbox exists, no
/// lease records it, only the in-flight row written before the create does.
/// After three missed heartbeats `reap` finds the sandbox by its run label.
#[test]
fn a_process_killed_mid_acquire_leaves_a_row_and_reap_sweeps_its_sandbox() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let mut child = sb
        .command()
        .args(["--json", "--acquisition-heartbeat", "200ms", "acquire"])
        .args(["--env", env.to_str().unwrap(), "--run", "killed-run"])
        .env("PAPERCLIP_ENV_FAKE_STALL_AFTER_CREATE", "60s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sb.sandboxes() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the create finish (the fake then stalls for a minute), then
    // SIGKILL: no destructor, no cleanup of any kind runs in the child.
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(sb.sandboxes(), 1, "the sandbox outlived its process");
    let rows = sb.ok_json(&["leases"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["status"], "pending_cleanup", "{rows}");
    assert_eq!(rows[0]["failureReason"], "acquire_in_progress");
    let id = rows[0]["id"].clone();

    std::thread::sleep(Duration::from_millis(800));
    let report = sb.ok_json(&["reap"]);
    assert_eq!(report["orphaned"], json!([id]), "{report}");
    assert_eq!(report["failures"], json!([]));
    assert_eq!(sb.sandboxes(), 0, "the orphaned sandbox was not destroyed");
    let row = &sb.ok_json(&["leases"])[0];
    assert_eq!(row["status"], "expired");
    assert_eq!(row["failureReason"], "acquire_orphaned");
    assert_eq!(row["cleanupStatus"], "success");
    let again = sb.ok_json(&["reap"]);
    assert_eq!(again["orphaned"], json!([]), "{again}");
}

/// `-v` shows what happens inside on stderr, stdout keeps the result, and
/// an inline API key is in neither.
#[test]
fn verbose_logs_go_to_stderr_without_secrets() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let env = env.to_str().unwrap();
    let lease = sb.ok_json(&["acquire", "--env", env, "--run", "noisy-run"]);
    let out = sb.run(&["--json", "-v", "reap", "--max-age", "0s"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stranded"], json!([lease["id"]]), "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reaper released lease"), "{stderr}");
    let quiet = sb.run(&["--json", "reap"]);
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
}

#[test]
fn stranded_leases_of_finished_runs_are_reaped() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let env = env.to_str().unwrap();
    let a = sb.ok_json(&["acquire", "--env", env, "--run", "finished"]);
    let b = sb.ok_json(&["acquire", "--env", env, "--run", "still-going"]);
    let report = sb.ok_json(&["reap", "--finished-run", "finished"]);
    assert_eq!(report["stranded"], json!([a["id"]]), "{report}");
    let active = sb.ok_json(&["leases", "--status", "active"]);
    assert_eq!(active[0]["id"], b["id"]);
    let report = sb.ok_json(&["reap", "--max-age", "0s"]);
    assert_eq!(report["stranded"], json!([b["id"]]), "{report}");
    assert_eq!(sb.sandboxes(), 0);
}

#[test]
fn secrets_are_never_printed() {
    let sb = Sandbox::new();
    let secret_id = "5f0c7a8e-3d1b-4c2a-9e6f-0a1b2c3d4e5f";
    let secret = "sk-live-do-not-print-4242";
    let var = format!(
        "PAPERCLIP_SECRET_{}",
        secret_id.to_uppercase().replace('-', "_")
    );
    let env = sb.env_file(json!({"provider": "fake-plugin",
        "apiKey": {"type": "secret_ref", "secretId": secret_id, "version": "latest"}}));
    let env = env.to_str().unwrap();
    let with_secret = |args: &[&str]| sb.command().env(&var, secret).args(args).output().unwrap();
    let mut seen = String::new();
    let out = with_secret(&["--json", "acquire", "--env", env, "--run", "r"]);
    assert!(out.status.success(), "{}", text(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = lease["id"].as_str().unwrap().to_owned();
    seen.push_str(&text(&out));
    for args in [
        vec!["probe", "--env", env],
        vec!["--json", "probe", "--env", env],
        vec!["leases"],
        vec!["--json", "leases"],
        vec!["exec", &id, "--", "echo", "hi"],
        vec!["--json", "release", &id],
        vec!["--json", "reap"],
    ] {
        let out = with_secret(&args);
        seen.push_str(&text(&out));
    }
    assert!(!seen.contains(secret), "a secret was printed:\n{seen}");
    // Without the variable the acquire fails, naming the reference, not a value.
    let out = sb.run(&["acquire", "--env", env]);
    assert!(!out.status.success());
    assert!(!text(&out).contains(secret));
    assert_no_secret_in_state(&sb.dir.path().join("state/state.db"), secret);
}

fn assert_no_secret_in_state(path: &Path, secret: &str) {
    let bytes = std::fs::read(path).unwrap();
    let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
    for data in [bytes, wal] {
        assert!(
            !data.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret stored in the state file"
        );
    }
}

#[test]
fn bad_input_is_a_clean_error() {
    let sb = Sandbox::new();
    let out = sb.run(&["acquire", "--env", "/nonexistent/env.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot read"), "{}", text(&out));
    let out = sb.run(&["release", "no-such-lease"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("No lease no-such-lease"),
        "{}",
        text(&out)
    );
    let out = sb.run(&["leases", "--status", "zombie"]);
    assert!(!out.status.success());
    let out = sb.run(&["--max-lease-lifetime", "soon", "leases"]);
    assert!(!out.status.success());
    // A database password never reaches the output, even when connecting fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url =
        format!("host=127.0.0.1 port={port} user=u password=hunter2-db-secret connect_timeout=2");
    let out = sb
        .command()
        .env("PAPERCLIP_ENV_DATABASE_URL", &url)
        .arg("leases")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("postgres: connect"), "{}", text(&out));
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
}

#[test]
fn postgres_state_is_shared_between_invocations() {
    let pg = paperclip_env_testkit::postgres::PgFixture::start()
        .expect("a throwaway PostgreSQL (run scripts/setup.sh to install it)");
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let env = env.to_str().unwrap();
    let url = pg.connection_string();
    let pg_json = |args: &[&str]| -> Value {
        let out = sb
            .command()
            .env("PAPERCLIP_ENV_DATABASE_URL", &url)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let lease = pg_json(&["acquire", "--env", env, "--run", "run-pg"]);
    let id = lease["id"].as_str().unwrap();
    assert_eq!(pg_json(&["leases", "--status", "active"])[0]["id"], id);
    // The SQLite state file knows nothing about it.
    assert_eq!(sb.ok_json(&["leases"]), json!([]));
    let report = pg_json(&["reap", "--finished-run", "run-pg"]);
    assert_eq!(report["stranded"], json!([id]));
    assert_eq!(sb.sandboxes(), 0);
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--database-url"));
}

/// Every provider compiled in is registered: a probe reaches the provider's
/// own validation (named field, provider key) instead of "not installed",
/// and nothing leaves loopback because the configs are incomplete.
#[test]
fn compiled_in_providers_are_registered() {
    let sb = Sandbox::new();
    let cases: Vec<(Value, &str)> = vec![
        #[cfg(feature = "kubernetes")]
        (json!({"provider": "kubernetes"}), "kubeconfig"),
        #[cfg(feature = "modal")]
        (json!({"provider": "modal", "appName": "x"}), "tokenId"),
    ];
    for (config, field) in cases {
        let out = sb.run(&[
            "--json",
            "probe",
            "--env",
            sb.env_file(config.clone()).to_str().unwrap(),
        ]);
        let shown = text(&out);
        assert!(!out.status.success(), "{config}: {shown}");
        assert!(!shown.contains("is not installed"), "{config}: {shown}");
        assert!(shown.contains(field), "{config}: {shown}");
    }
}

/// A minimal plugin worker in sh: answers the handshake, probe, acquire,
/// execute and release, and logs every method it receives to `$CALLS`.
#[cfg(feature = "plugin")]
const SHELL_PLUGIN: &str = r#"
id_of() { printf '%s' "$1" | sed -n 's/^{"jsonrpc":"2.0","id":\([0-9]*\),.*/\1/p'; }
while read -r line; do
  id=$(id_of "$line")
  method=$(printf '%s' "$line" | sed -n 's/.*"method":"\([A-Za-z.]*\)".*/\1/p')
  echo "$method" >> "$CALLS"
  case "$method" in
    initialize) r='{"ok":true,"supportedMethods":["environmentProbe","environmentAcquireLease","environmentReleaseLease","environmentExecute"]}';;
    environmentProbe) [ -n "$NOISY" ] && echo "npm notice: not JSON-RPC"; r='{"ok":true,"summary":"shell box is ready"}';;
    environmentAcquireLease) r='{"providerLeaseId":"box-1","metadata":{"remoteCwd":"/box"}}';;
    environmentExecute) r='{"exitCode":0,"timedOut":false,"stdout":"hello from the plugin\n","stderr":""}';;
    shutdown) printf '{"jsonrpc":"2.0","id":%s,"result":null}\n' "$id"; exit 0;;
    *) r='null';;
  esac
  printf '{"jsonrpc":"2.0","id":%s,"result":%s}\n' "$id" "$r"
done
"#;

/// A plugin that prints to stdout works by default (the line is logged and
/// skipped); `"strictStdout": true` in the plugin file makes it an error.
#[cfg(feature = "plugin")]
#[test]
fn plugin_files_choose_between_skipping_and_refusing_stdout_noise() {
    let sb = Sandbox::new();
    let manifest = json!({
        "id": "acme.shell-box", "apiVersion": 1, "version": "0.0.1",
        "capabilities": ["environment.drivers.register"],
        "environmentDrivers": [{"driverKey": "shell-box", "kind": "sandbox_provider",
            "configSchema": {"type": "object"}}]
    });
    let env = sb.env_file(json!({"provider": "shell-box"}));
    let env = env.to_str().unwrap();
    let calls = sb.dir.path().join("calls.log");
    let file = |name: &str, strict: Option<bool>| {
        let mut spec = json!({"manifest": manifest, "command": "sh", "args": ["-c", SHELL_PLUGIN],
            "env": {"CALLS": calls.to_str().unwrap(), "NOISY": "1"}});
        if let Some(strict) = strict {
            spec["strictStdout"] = json!(strict);
        }
        let path = sb.dir.path().join(name);
        std::fs::write(&path, spec.to_string()).unwrap();
        path
    };
    let lenient = file("lenient.json", None);
    let probe = sb.ok_json(&["--plugin", lenient.to_str().unwrap(), "probe", "--env", env]);
    assert_eq!(probe["summary"], "shell box is ready", "{probe}");
    let strict = file("strict.json", Some(true));
    let out = sb.run(&["--plugin", strict.to_str().unwrap(), "probe", "--env", env]);
    let shown = text(&out);
    assert!(
        shown.contains("not JSON-RPC 2.0") && !shown.contains("shell box is ready"),
        "{shown}"
    );
}

/// `--plugin FILE` serves a Paperclip provider plugin out of process: its
/// `sandbox_provider` entry backs a `driver: "sandbox"` environment through
/// probe, acquire, exec and release, each invocation starting the worker.
#[cfg(feature = "plugin")]
#[test]
fn plugin_files_register_out_of_process_providers() {
    let sb = Sandbox::new();
    let calls = sb.dir.path().join("calls.log");
    let manifest = json!({
        "id": "acme.shell-box",
        "apiVersion": 1,
        "version": "0.0.1",
        "displayName": "Shell box",
        "capabilities": ["environment.drivers.register"],
        "entrypoints": {"worker": "worker.sh"},
        "environmentDrivers": [{"driverKey": "shell-box", "kind": "sandbox_provider",
            "displayName": "Shell box", "configSchema": {"type": "object"}}]
    });
    std::fs::write(sb.dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let plugin = sb.dir.path().join("plugin.json");
    std::fs::write(
        &plugin,
        json!({"manifest": "manifest.json", "command": "sh", "args": ["-c", SHELL_PLUGIN],
            "env": {"CALLS": calls.to_str().unwrap()}})
        .to_string(),
    )
    .unwrap();
    let plugin = plugin.to_str().unwrap();
    let env = sb.env_file(json!({"provider": "shell-box"}));
    let env = env.to_str().unwrap();

    let probe = sb.ok_json(&["--plugin", plugin, "probe", "--env", env]);
    assert_eq!(probe["ok"], json!(true), "{probe}");
    assert_eq!(probe["summary"], "shell box is ready");
    let lease = sb.ok_json(&[
        "--plugin", plugin, "acquire", "--env", env, "--run", "run-p",
    ]);
    assert_eq!(lease["providerLeaseId"], "box-1");
    let id = lease["id"].as_str().unwrap().to_owned();
    let out = sb.run(&["--plugin", plugin, "exec", &id, "--", "echo", "hi"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the plugin\n"
    );
    let released = sb.ok_json(&["--plugin", plugin, "release", &id]);
    assert_eq!(released["status"], "released");
    assert_eq!(released["cleanupStatus"], "success");
    let seen = std::fs::read_to_string(&calls).unwrap();
    for method in [
        "initialize",
        "environmentProbe",
        "environmentAcquireLease",
        "environmentExecute",
        "environmentReleaseLease",
    ] {
        assert!(
            seen.lines().any(|l| l == method),
            "{method} not called: {seen}"
        );
    }
    // Every command that started the worker stopped it with `shutdown`
    // (so a plugin's `onShutdown` runs): probe, acquire, exec, release.
    assert_eq!(
        seen.lines().filter(|l| *l == "shutdown").count(),
        4,
        "{seen}"
    );

    // A broken plugin file is a clean error naming the field.
    std::fs::write(sb.dir.path().join("bad.json"), r#"{"command": "sh"}"#).unwrap();
    let bad = sb.dir.path().join("bad.json");
    let out = sb.run(&["--plugin", bad.to_str().unwrap(), "leases"]);
    assert!(!out.status.success());
    let shown = text(&out);
    assert!(
        shown.contains("plugin file") && shown.contains("manifest"),
        "{shown}"
    );
    assert!(!shown.contains("panicked"), "{shown}");
}

#[test]
fn exec_streams_output_before_the_command_exits() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let lease = sb.ok_json(&["acquire", "--env", env.to_str().unwrap(), "--run", "run-s"]);
    let id = lease["id"].as_str().unwrap().to_owned();
    // The command prints, then waits for a file only this test creates, and
    // only after it has read that first line.
    let marker = sb.dir.path().join("go");
    let script = "echo first; while [ ! -e \"$1\" ]; do sleep 0.05; done; echo second";
    let mut child = sb
        .command()
        .args(["exec", &id, "--", "sh", "-c", script, "sh"])
        .arg(&marker)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // If output only came at exit, the read below would wait forever: a
    // watchdog unblocks the command and the test fails instead.
    let fired = Arc::new(AtomicBool::new(false));
    {
        let (fired, marker) = (fired.clone(), marker.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            fired.store(true, Ordering::SeqCst);
            let _ = std::fs::write(marker, "");
        });
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "first\n");
    assert!(
        !fired.load(Ordering::SeqCst),
        "no output until the watchdog fired"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command already exited"
    );
    std::fs::write(&marker, "").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "second\n");
    assert!(child.wait().unwrap().success());
    sb.ok_json(&["release", &id]);
}

#[test]
fn sync_moves_a_workspace_up_and_back_with_progress() {
    let sb = Sandbox::new();
    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let lease = sb.ok_json(&[
        "acquire",
        "--env",
        env.to_str().unwrap(),
        "--run",
        "run-sync",
    ]);
    let id = lease["id"].as_str().unwrap().to_owned();
    let local = sb.dir.path().join("work");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    std::fs::write(local.join("a.txt"), "a\n").unwrap();
    std::fs::write(local.join("b.txt"), "b\n").unwrap();
    std::fs::write(local.join("sub/c.txt"), "c\n").unwrap();
    let dir = local.to_str().unwrap();

    let out = sb.run(&["sync", "up", &id, dir]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sync up "), "no progress lines: {stderr}");
    assert!(
        stderr.contains("files,") && stderr.contains("/s"),
        "{stderr}"
    );
    assert!(stderr.contains("uploaded 3 files"), "{stderr}");

    let up = sb.ok_json(&["sync", "up", &id, dir]);
    assert_eq!(up["direction"], "up");
    assert_eq!(up["files"], 3);
    assert!(up["archiveBytes"].as_u64().unwrap() > 0);
    let remote = up["remote"].as_str().unwrap().to_owned();

    let edit = "printf changed > a.txt && rm b.txt && printf new > d.txt";
    let out = sb.run(&["exec", &id, "--cwd", &remote, "--", "sh", "-c", edit]);
    assert!(out.status.success(), "{}", text(&out));
    // A local edit to a file the lease did not touch survives the merge.
    std::fs::write(local.join("sub/c.txt"), "edited here\n").unwrap();

    let down = sb.ok_json(&["sync", "down", &id, dir]);
    assert_eq!(down["baseline"], true);
    assert_eq!(down["changes"]["added"], json!(["d.txt"]), "{down}");
    assert_eq!(down["changes"]["modified"], json!(["a.txt"]), "{down}");
    assert_eq!(down["changes"]["deleted"], json!(["b.txt"]), "{down}");
    assert_eq!(
        std::fs::read_to_string(local.join("a.txt")).unwrap(),
        "changed"
    );
    assert_eq!(std::fs::read_to_string(local.join("d.txt")).unwrap(), "new");
    assert!(!local.join("b.txt").exists());
    assert_eq!(
        std::fs::read_to_string(local.join("sub/c.txt")).unwrap(),
        "edited here\n"
    );

    let out = sb.run(&["sync", "down", &id, dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("downloaded "),
        "{}",
        text(&out)
    );
    sb.ok_json(&["release", &id]);
    let out = sb.run(&["sync", "up", &id, dir]);
    assert!(!out.status.success(), "sync on a released lease must fail");
}

#[test]
fn doctor_checks_the_environments_of_the_state_file() {
    let sb = Sandbox::new();
    let out = sb.run(&["doctor"]);
    assert!(!out.status.success(), "nothing to check must be an error");
    assert!(text(&out).contains("--env"), "{}", text(&out));

    let env = sb.env_file(json!({"provider": "fake-plugin"}));
    let lease = sb.ok_json(&["acquire", "--env", env.to_str().unwrap(), "--run", "run-d"]);
    let out = sb.run(&["doctor"]);
    assert!(out.status.success(), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("env-fake (sandbox, provider fake-plugin)"),
        "{report}"
    );
    assert!(report.contains("ok    reachable"), "{report}");
    assert!(report.contains("warn  clock"), "{report}");
    sb.ok_json(&["release", lease["id"].as_str().unwrap()]);
}
