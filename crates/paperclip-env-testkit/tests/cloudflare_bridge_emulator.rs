//! The Cloudflare bridge emulator keeps each container's files under its own
//! root: the workspace it creates and the paths its commands touch never
//! reach the host's.
#![cfg(feature = "emulators")]

use paperclip_env_testkit::emulators::cloudflare_bridge::BridgeEmulator;
use serde_json::{Value, json};

const TOKEN: &str = "bridge-token";

#[tokio::test]
async fn container_paths_stay_under_the_container_root() {
    let bridge = BridgeEmulator::start(TOKEN).await.unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{}/api/paperclip-sandbox/v1{path}", bridge.url()))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let tag = format!("paperclip-cf-{}", std::process::id());
    let cwd = format!("/workspace/{tag}");
    let lease: Value = post(
        "/leases/acquire",
        json!({"environmentId": "env-1", "runId": "run-1", "requestedCwd": cwd}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = lease["providerLeaseId"]
        .as_str()
        .unwrap_or_else(|| panic!("{lease}"))
        .to_owned();
    assert!(
        !std::path::Path::new(&cwd).exists(),
        "created the host's {cwd}"
    );

    let marker = format!("/tmp/{tag}");
    let result: Value = post(
        "/exec",
        json!({"providerLeaseId": id, "command": "sh", "cwd": cwd, "stdin": "from stdin",
            "args": ["-c", format!("pwd; cat > {marker}; cat {marker}; echo; echo $HOME")]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(result["exitCode"], 0, "{result}");
    assert_eq!(result["stdout"], format!("{cwd}\nfrom stdin\n/root\n"));
    assert!(
        !std::path::Path::new(&marker).exists(),
        "wrote the host's {marker}"
    );

    post("/leases/release", json!({"providerLeaseId": id}))
        .await
        .unwrap();
    assert_eq!(bridge.live_sandboxes(), 0);
}
