//! `paperclip-env conformance`: the suite against environments served by
//! `paperclip-env emulate`, a real OpenSSH sshd and the fake; MUST failures
//! exit 1; Ctrl-C tears down what was in flight. And `doctor` against an
//! emulated service (credentials, reachability, the service's clock).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_paperclip-env");

/// A scratch dir for one test: env files, the fake's sandboxes, TMPDIR.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let scratch = Scratch {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(scratch.fake_root()).unwrap();
        scratch
    }

    fn fake_root(&self) -> PathBuf {
        self.dir.path().join("sandboxes")
    }

    fn env_file(&self, driver: &str, config: Value) -> PathBuf {
        let path = self.dir.path().join(format!("env-{driver}.json"));
        let env = json!({"id": format!("env-{driver}"), "name": "Under test", "driver": driver, "config": config});
        std::fs::write(&path, env.to_string()).unwrap();
        path
    }

    fn command(&self, env_file: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("conformance")
            .arg("--env")
            .arg(env_file)
            .args(extra)
            .env("PAPERCLIP_ENV_FAKE_ROOT", self.fake_root())
            // Never the state file: conformance keeps its leases in memory.
            .env(
                "PAPERCLIP_ENV_STATE",
                self.dir.path().join("must-not-exist.db"),
            )
            .stdin(Stdio::null());
        cmd
    }

    fn sandboxes(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.fake_root())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `--json` and returns the document, asserting the exit status.
fn run_json(cmd: &mut Command, expect_success: bool) -> Value {
    let out = cmd.arg("--json").output().unwrap();
    assert_eq!(
        out.status.success(),
        expect_success,
        "exit {:?}: {}",
        out.status,
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)))
}

fn outcome_of<'a>(report: &'a Value, id: &str) -> &'a str {
    report["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == id)
        .and_then(|l| l["outcome"].as_str())
        .unwrap_or("absent")
}

/// Every MUST line held, nothing failed to clean up, and the lines that
/// prove the basics ran and passed.
fn assert_conformant(report: &Value, must_pass: &[&str]) {
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["summary"]["failed"], 0, "{report:#}");
    assert_eq!(report["interrupted"], false);
    assert!(
        report["cleanup"]["errors"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    for id in must_pass {
        assert_eq!(outcome_of(report, id), "pass", "{id}: {report:#}");
    }
    for line in report["lines"].as_array().unwrap() {
        assert!(
            ["MUST", "SHOULD"].contains(&line["level"].as_str().unwrap()),
            "{line}"
        );
    }
}

#[test]
fn the_fake_passes_and_prints_a_line_per_check_with_its_level() {
    let scratch = Scratch::new();
    let env = scratch.env_file("sandbox", json!({"provider": "fake-plugin"}));
    let out = scratch.command(&env, &[]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("PASS  MUST    A6.1 "),
        "no A6.1 line: {stdout}"
    );
    assert!(stdout.contains("PASS  MUST    R12 "), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("SKIP") || l.contains("SHOULD")),
        "{stdout}"
    );
    let summary = stdout.lines().last().unwrap();
    assert!(
        summary.contains(" 0 failed (MUST)") && summary.contains("cleanup clean"),
        "{summary}"
    );
    assert!(scratch.sandboxes().is_empty(), "{:?}", scratch.sandboxes());
    assert!(!scratch.dir.path().join("must-not-exist.db").exists());
}

#[test]
fn only_selects_lines_and_prefixes_and_refuses_unknown_ones() {
    let scratch = Scratch::new();
    let env = scratch.env_file("sandbox", json!({"provider": "fake-plugin"}));
    let out = scratch
        .command(&env, &["--json", "--only", "A6,R4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Progress lines on stderr, the document alone on stdout.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PASS  MUST    R4 "),
        "{}",
        text(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = report["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"A6.1") && ids.contains(&"A6.15"), "{ids:?}");
    assert!(ids.contains(&"R4"), "{ids:?}");
    assert!(
        ids.iter().all(|id| id.starts_with("A6.") || *id == "R4"),
        "{ids:?}"
    );

    let out = scratch.command(&env, &["--only", "Z9"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("only"), "{}", text(&out));

    let out = scratch
        .command(&env, &["--list", "--only", "R"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("MUST    R14"), "{listed}");
    assert!(scratch.sandboxes().is_empty());
}

/// A running `paperclip-env emulate <provider>`.
struct Emulate {
    child: Child,
    line: Value,
}

impl Emulate {
    fn start(provider: &str) -> Emulate {
        let mut child = Command::new(BIN)
            .args(["emulate", provider])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let line: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("emulate {provider}: no JSON line ({e}): {line:?}"));
        Emulate { child, line }
    }

    /// `conformance` with the emulator's env (the providers' env fallbacks).
    fn conformance(&self, scratch: &Scratch, extra: &[&str]) -> Command {
        let env = scratch.env_file("sandbox", self.line["config"].clone());
        let mut cmd = scratch.command(&env, extra);
        for (key, value) in self.line["env"].as_object().unwrap() {
            cmd.env(key, value.as_str().unwrap());
        }
        cmd
    }
}

impl Drop for Emulate {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sandboxes an E2B-protocol emulator still runs (its v1 list).
fn e2b_sandboxes(emulate: &Emulate) -> Value {
    let api = emulate.line["urls"]["api"].as_str().unwrap();
    let key = emulate.line["credentials"]["apiKey"].as_str().unwrap();
    let authority = api.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    use std::io::Write;
    write!(
        stream,
        "GET /sandboxes HTTP/1.1\r\nHost: {authority}\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // The emulator answers with a plain (not chunked) JSON body.
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[cfg(feature = "emulate")]
#[test]
fn emulated_e2b_passes_and_is_left_empty() {
    let emulate = Emulate::start("e2b");
    let scratch = Scratch::new();
    // The key from E2B_API_KEY (the provider's env fallback), not the config:
    // it must stay out of metadata and lease rows all the same.
    let mut config = emulate.line["config"].clone();
    config.as_object_mut().unwrap().remove("apiKey");
    let env = scratch.env_file("sandbox", config);
    let mut cmd = scratch.command(&env, &[]);
    for (key, value) in emulate.line["env"].as_object().unwrap() {
        cmd.env(key, value.as_str().unwrap());
    }
    let report = run_json(&mut cmd, true);
    assert_conformant(
        &report,
        &[
            "A2.1", "A2.7", "A4.2", "A6.1", "A6.4", "A6.9", "R1", "R4", "R11", "R12", "R13", "R14",
        ],
    );
    assert_eq!(report["environment"]["provider"], "e2b");
    assert_eq!(e2b_sandboxes(&emulate), json!([]), "sandboxes left running");
}

#[cfg(feature = "emulate")]
#[test]
fn emulated_daytona_passes() {
    let emulate = Emulate::start("daytona");
    let scratch = Scratch::new();
    let report = run_json(&mut emulate.conformance(&scratch, &[]), true);
    assert_conformant(
        &report,
        &["A2.1", "A6.1", "A6.9", "R1", "R4", "R11", "R12", "R14"],
    );
    assert_eq!(report["environment"]["provider"], "daytona");
}

#[cfg(feature = "emulate")]
#[test]
fn emulated_novita_passes() {
    let emulate = Emulate::start("novita");
    let scratch = Scratch::new();
    let report = run_json(&mut emulate.conformance(&scratch, &[]), true);
    assert_conformant(
        &report,
        &["A2.1", "A6.1", "A6.9", "R1", "R4", "R12", "R13", "R14"],
    );
    assert_eq!(report["environment"]["provider"], "novita");
}

/// The Cloudflare bridge and exe.dev (its VMs are a real sshd): the
/// lifecycle lines, to keep the test short.
#[cfg(feature = "emulate")]
#[test]
fn emulated_cloudflare_and_exe_dev_pass_the_lifecycle_lines() {
    for provider in ["cloudflare", "exe-dev"] {
        let emulate = Emulate::start(provider);
        if provider == "exe-dev" && emulate.line["credentials"].get("sshUser").is_none() {
            eprintln!("skipping exe-dev: no sshd installed (run scripts/setup.sh)");
            continue;
        }
        let scratch = Scratch::new();
        let only = "A2.1,A4.2,A6.1,A6.4,R1,R4,R12,R14";
        let report = run_json(&mut emulate.conformance(&scratch, &["--only", only]), true);
        assert_conformant(&report, &only.split(',').collect::<Vec<_>>());
        assert_eq!(report["environment"]["provider"], provider);
    }
}

/// The Kubernetes emulator schedules a pod per lease (about 2 s each): the
/// lifecycle lines only, to keep the test short.
#[cfg(feature = "emulate")]
#[test]
fn emulated_kubernetes_passes_the_lifecycle_lines() {
    let emulate = Emulate::start("kubernetes");
    let scratch = Scratch::new();
    let only = "A2.1,A4.2,A6.1,A6.4,R1,R4,R12,R14";
    let report = run_json(&mut emulate.conformance(&scratch, &["--only", only]), true);
    assert_conformant(&report, &only.split(',').collect::<Vec<_>>());
    assert_eq!(report["environment"]["provider"], "kubernetes");
}

#[cfg(feature = "emulate")]
#[test]
fn doctor_checks_credentials_reachability_and_clock() {
    let emulate = Emulate::start("e2b");
    let scratch = Scratch::new();
    // The key comes from the env fallback, not the config.
    let mut config = emulate.line["config"].clone();
    config.as_object_mut().unwrap().remove("apiKey");
    let env = scratch.env_file("sandbox", config);
    let doctor = |with_key: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--state")
            .arg(scratch.dir.path().join("state.db"))
            .args(["--json", "doctor", "--env"])
            .arg(&env)
            .stdin(Stdio::null());
        for (key, value) in emulate.line["env"].as_object().unwrap() {
            if with_key || key != "E2B_API_KEY" {
                cmd.env(key, value.as_str().unwrap());
            }
        }
        if !with_key {
            cmd.env_remove("E2B_API_KEY");
        }
        cmd.output().unwrap()
    };
    let out = doctor(true);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = report[0]["checks"].as_array().unwrap();
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| {
                (
                    c["verdict"].as_str().unwrap().to_owned(),
                    c["detail"].to_string(),
                )
            })
            .unwrap()
    };
    assert_eq!(verdict("credentials").0, "ok", "{report:#}");
    assert!(
        verdict("credentials").1.contains("E2B_API_KEY"),
        "{report:#}"
    );
    assert_eq!(verdict("reachable").0, "ok", "{report:#}");
    let (clock, detail) = verdict("clock");
    assert_eq!(clock, "ok", "{report:#}");
    assert!(
        detail.contains("skew") && detail.contains("Date"),
        "{detail}"
    );

    let out = doctor(false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report[0]["checks"][0]["verdict"], "fail", "{report:#}");
}

#[cfg(feature = "ssh")]
mod ssh {
    use super::*;
    use paperclip_env_testkit::fixtures::sshd::{self, SshServer};

    fn server() -> Option<SshServer> {
        if !sshd::available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "sshd/ssh-keygen missing in CI: run scripts/setup.sh"
            );
            eprintln!("skipping: sshd/ssh-keygen not installed (run scripts/setup.sh)");
            return None;
        }
        Some(SshServer::start().expect("start sshd fixture"))
    }

    const KEY_ID: &str = "0b5c3c1e-8d64-4b52-9b8f-5a3f25c1d0aa";

    fn config(srv: &SshServer, known_hosts: &str) -> Value {
        json!({
            "host": srv.host(),
            "port": srv.port(),
            "username": srv.user(),
            "remoteWorkspacePath": srv.dir().join("work space").display().to_string(),
            "privateKeySecretRef": {"type": "secret_ref", "secretId": KEY_ID, "version": "latest"},
            "knownHosts": known_hosts,
            "strictHostKeyChecking": true,
        })
    }

    fn command(scratch: &Scratch, srv: &SshServer, env: &Path, extra: &[&str]) -> Command {
        let mut cmd = scratch.command(env, extra);
        cmd.env(
            format!(
                "PAPERCLIP_SECRET_{}",
                KEY_ID.to_uppercase().replace('-', "_")
            ),
            &srv.client_key().private_key,
        );
        cmd
    }

    #[test]
    fn the_sshd_fixture_passes_and_the_key_never_shows() {
        let Some(srv) = server() else { return };
        let scratch = Scratch::new();
        let env = scratch.env_file("ssh", config(&srv, &srv.known_hosts()));
        let out = command(&scratch, &srv, &env, &["--json"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_conformant(
            &report,
            &[
                "R1", "R2", "R4", "R5", "R6", "R7", "R9", "R10", "R11", "R12", "R13", "R14",
            ],
        );
        // Part A is about sandbox providers: an SSH host gets the runtime lines.
        assert!(
            report["lines"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["id"].as_str().unwrap().starts_with('R')),
            "{report:#}"
        );
        let key_line = srv
            .client_key()
            .private_key
            .lines()
            .nth(1)
            .unwrap()
            .to_owned();
        assert!(
            !text(&out).contains(&key_line),
            "the private key was printed"
        );
    }

    #[test]
    fn a_must_failure_exits_one() {
        let Some(srv) = server() else { return };
        let scratch = Scratch::new();
        // A known_hosts entry for another key: strict checking refuses the host.
        let stranger = sshd::generate_key(scratch.dir.path(), "stranger").unwrap();
        let known_hosts = format!(
            "[{}]:{} {}",
            srv.host(),
            srv.port(),
            stranger.public_key.trim()
        );
        let env = scratch.env_file("ssh", config(&srv, &known_hosts));
        let out = command(&scratch, &srv, &env, &["--only", "R1,R4"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("FAIL  MUST    R1 "), "{stdout}");
        assert!(stdout.contains(" failed (MUST)"), "{stdout}");
    }
}

/// Sends SIGINT once a sandbox exists, then checks the exit code and that
/// the fake's temp root is empty again.
fn interrupt_mid_acquire(only: &str) {
    let scratch = Scratch::new();
    let env = scratch.env_file("sandbox", json!({"provider": "fake-plugin"}));
    let mut child = scratch
        .command(&env, &["--only", only])
        // Every acquire creates its sandbox, then waits 3 s to answer.
        .env("PAPERCLIP_ENV_FAKE_STALL_AFTER_CREATE", "3s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while scratch.sandboxes().is_empty() {
        assert!(Instant::now() < deadline, "no sandbox was ever created");
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before acquiring"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted"), "{stdout}");
    assert!(stdout.contains("cleanup clean"), "{stdout}");
    assert!(
        scratch.sandboxes().is_empty(),
        "left behind: {:?}\n{stdout}",
        scratch.sandboxes()
    );
}

#[test]
fn ctrl_c_during_a_provider_acquire_destroys_the_sandbox() {
    interrupt_mid_acquire("A2.1");
}

#[test]
fn ctrl_c_during_a_runtime_acquire_releases_the_sandbox() {
    interrupt_mid_acquire("R2");
}
