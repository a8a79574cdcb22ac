//! Chaos against a cloud protocol: `paperclip-env acquire` processes talking
//! to the E2B emulator are killed with SIGKILL after E2B created their
//! sandboxes and before the answers were recorded; `paperclip-env reap` in
//! a fresh process must leave the emulator with no sandbox at all.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use paperclip_env_testkit::emulators::e2b::{E2bEmulator, Fault, Profile, Route};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_paperclip-env");
const KEY: &str = "e2b_chaos0123456789abcdef0123456789ab";

fn command(state: &Path, url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--state")
        .arg(state)
        .args(["--json", "--acquisition-heartbeat", "200ms"])
        .env("E2B_API_KEY", KEY)
        .env("E2B_API_URL", url)
        .env("E2B_SANDBOX_URL", url)
        .env_remove("PAPERCLIP_ENV_STATE")
        .env_remove("PAPERCLIP_ENV_DATABASE_URL")
        .stdin(Stdio::null());
    cmd
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_killed_after_the_e2b_create_are_swept_by_reap() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    // E2B has created the sandbox when the provider sets its lifetime;
    // that call hangs, so every kill lands between create and record.
    emulator.inject(
        Route::SetTimeout,
        Fault::Delay(Duration::from_secs(120)),
        100,
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let env = dir.path().join("env.json");
    std::fs::write(
        &env,
        json!({"id": "env-e2b", "name": "E2B", "driver": "sandbox", "config": {"provider": "e2b"}})
            .to_string(),
    )
    .unwrap();

    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let mut child = command(&state, &emulator.url())
            .args(["acquire", "--env", env.to_str().unwrap()])
            .args(["--run", &format!("chaos-run-{round}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until("E2B holds the round's sandbox", || {
            emulator.live_sandboxes() == round + 1
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(
        emulator.live_sandboxes(),
        ROUNDS,
        "the sandboxes outlived their processes"
    );

    // Three missed heartbeats (200 ms each) later every row is stale.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let out = command(&state, &emulator.url())
        .arg("reap")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["orphaned"].as_array().map(Vec::len),
        Some(ROUNDS),
        "{report}"
    );
    assert_eq!(report["failures"], json!([]), "{report}");
    until("E2B holds no sandbox", || emulator.live_sandboxes() == 0).await;

    let out = command(&state, &emulator.url())
        .arg("leases")
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["status"], "expired", "{row}");
        assert_eq!(row["failureReason"], "acquire_orphaned", "{row}");
        assert!(!row.to_string().contains(KEY), "{row}");
    }
}
