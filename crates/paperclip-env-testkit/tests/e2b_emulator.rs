//! The E2B emulator on the wire, as the vendor SDKs use it: v2 and v1
//! control-plane routes, list filters, the sandbox user and root, the
//! filesystem and process RPCs, and host-pattern routing.
#![cfg(feature = "emulators")]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use paperclip_env_testkit::emulators::e2b::{ApiVersions, E2bEmulator, E2bOptions, Profile};
use serde_json::{Value, json};

const KEY: &str = "e2b_0123456789abcdef";

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    fn new(emulator: &E2bEmulator) -> Client {
        Client {
            http: reqwest::Client::new(),
            url: emulator.url(),
        }
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("X-API-KEY", KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn create(&self, body: Value) -> String {
        let (status, sandbox) = self
            .api(reqwest::Method::POST, "/v2/sandboxes", Some(body))
            .await;
        assert_eq!(status, 201, "{sandbox}");
        sandbox["sandboxID"].as_str().unwrap().to_owned()
    }

    fn envd(&self, id: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .header("E2b-Sandbox-Id", id)
            .header("E2b-Sandbox-Port", "49983")
    }

    async fn rpc(&self, id: &str, method: &str, body: Value) -> (u16, Value) {
        let response = self
            .envd(id, &format!("/{method}"))
            .header("Connect-Protocol-Version", "1")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A server-streaming call, read to its end: (events, end-of-stream).
    async fn stream(
        &self,
        request: reqwest::RequestBuilder,
        message: Value,
    ) -> (Vec<Value>, Value) {
        let payload = message.to_string().into_bytes();
        let mut body = vec![0u8];
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(&payload);
        let response = request
            .header("Content-Type", "application/connect+json")
            .header("Connect-Protocol-Version", "1")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let bytes = response.bytes().await.unwrap();
        let (mut events, mut end) = (Vec::new(), Value::Null);
        let mut i = 0;
        while i + 5 <= bytes.len() {
            let len = u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]])
                as usize;
            let message: Value = serde_json::from_slice(&bytes[i + 5..i + 5 + len]).unwrap();
            if bytes[i] & 2 != 0 {
                end = message;
            } else {
                events.push(message["event"].clone());
            }
            i += 5 + len;
        }
        (events, end)
    }

    async fn run(&self, id: &str, cmd: &str, extra: Value) -> (String, String, Value) {
        let mut process = json!({"cmd": "/bin/bash", "args": ["-l", "-c", cmd]});
        if let Some(map) = extra.as_object() {
            for (k, v) in map {
                process[k] = v.clone();
            }
        }
        let (events, _) = self
            .stream(
                self.envd(id, "/process.Process/Start"),
                json!({"process": process, "stdin": false}),
            )
            .await;
        output(&events)
    }
}

fn output(events: &[Value]) -> (String, String, Value) {
    let (mut out, mut err, mut end) = (Vec::new(), Vec::new(), Value::Null);
    for event in events {
        if let Some(b) = event.pointer("/data/stdout").and_then(Value::as_str) {
            out.extend(B64.decode(b).unwrap());
        }
        if let Some(b) = event.pointer("/data/stderr").and_then(Value::as_str) {
            err.extend(B64.decode(b).unwrap());
        }
        if let Some(e) = event.get("end") {
            end = e.clone();
        }
    }
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        end,
    )
}

#[tokio::test]
async fn v2_and_v1_routes_list_filters_and_detail_times() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    let c = Client::new(&emulator);
    let a = c
        .create(
            json!({"templateID": "base", "timeout": 300, "metadata": {"team": "a b", "run": "1"}}),
        )
        .await;
    let (status, b) = c
        .api(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base", "metadata": {"team": "c"}})),
        )
        .await;
    assert_eq!(status, 201);
    let b = b["sandboxID"].as_str().unwrap().to_owned();

    let (status, detail) = c
        .api(reqwest::Method::GET, &format!("/sandboxes/{a}"), None)
        .await;
    assert_eq!(status, 200);
    for field in [
        "startedAt",
        "endAt",
        "state",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdVersion",
        "clientID",
    ] {
        assert!(detail.get(field).is_some(), "{field} missing: {detail}");
    }
    let started =
        chrono::DateTime::parse_from_rfc3339(detail["startedAt"].as_str().unwrap()).unwrap();
    let end = chrono::DateTime::parse_from_rfc3339(detail["endAt"].as_str().unwrap()).unwrap();
    assert!((end - started).num_seconds() >= 298, "{detail}");

    // The SDK sends metadata as `k=v` pairs, each side percent-encoded.
    let (status, listed) = c
        .api(
            reqwest::Method::GET,
            "/v2/sandboxes?metadata=team%3Da%2520b%26run%3D1",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.as_str()]);
    let (_, all) = c.api(reqwest::Method::GET, "/sandboxes", None).await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/sandboxes/{b}/pause"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (_, running) = c
        .api(reqwest::Method::GET, "/v2/sandboxes?state=running", None)
        .await;
    assert_eq!(running.as_array().unwrap().len(), 1);
    let (_, paused) = c
        .api(reqwest::Method::GET, "/v2/sandboxes?state=paused", None)
        .await;
    assert_eq!(paused[0]["sandboxID"], b.as_str());
    let (_, v1) = c.api(reqwest::Method::GET, "/sandboxes", None).await;
    assert_eq!(
        v1.as_array().unwrap().len(),
        1,
        "v1 lists running sandboxes only"
    );
    let response = c
        .http
        .get(format!("{}/v2/sandboxes?limit=1", c.url))
        .header("X-API-KEY", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-next-token"], "1");

    let (status, resumed) = c
        .api(
            reqwest::Method::POST,
            &format!("/v2/sandboxes/{b}/connect"),
            Some(json!({"timeout": 60})),
        )
        .await;
    assert_eq!(
        (status, resumed["sandboxID"].as_str()),
        (201, Some(b.as_str()))
    );
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/v2/sandboxes/{b}/connect"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);

    // A snapshot taken while the guest agent hung: memory resume refused.
    emulator.mark_guest_unresponsive(&b);
    for path in [
        format!("/v2/sandboxes/{b}/connect"),
        format!("/sandboxes/{b}/connect"),
    ] {
        let (status, error) = c
            .api(reqwest::Method::POST, &path, Some(json!({"timeout": 60})))
            .await;
        assert_eq!(status, 409);
        assert_eq!(
            error["error_code"],
            "sandbox_snapshot_guest_agent_unresponsive"
        );
        assert_eq!(error["code"], 409);
    }
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/v2/sandboxes/{b}/connect"),
            Some(json!({"timeout": 60, "memory": false})),
        )
        .await;
    assert_eq!(status, 201);

    let (status, error) = c.api(reqwest::Method::GET, "/templates", None).await;
    assert_eq!(
        (status, error["code"].as_u64()),
        (404, Some(404)),
        "unserved routes answer the API's error JSON"
    );
}

#[tokio::test]
async fn v1_only_mode_answers_404_on_v2() {
    let emulator = E2bEmulator::start_with(E2bOptions {
        profile: Profile::E2b,
        api_key: KEY.into(),
        api: ApiVersions::V1Only,
    })
    .await
    .unwrap();
    let c = Client::new(&emulator);
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, created) = c
        .api(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(status, 201);
    let id = created["sandboxID"].as_str().unwrap();
    let (status, _) = c
        .api(
            reqwest::Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 10})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = c.api(reqwest::Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(status, 404);
    assert_eq!(emulator.live_sandboxes(), 1);
}

#[tokio::test]
async fn files_and_commands_stay_inside_the_sandbox_root_as_the_sandbox_user() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    let c = Client::new(&emulator);
    let id = c
        .create(json!({"templateID": "base", "envVars": {"GREETING": "hi from create"}}))
        .await;
    let root = emulator.sandbox_root(&id).unwrap();
    let marker = format!("/tmp/paperclip-e2b-escape-{}", std::process::id());

    // Absolute paths land under the root, never on the host.
    let response = c
        .envd(&id, "/files")
        .query(&[("path", marker.as_str())])
        .header("Content-Type", "application/octet-stream")
        .body("inside")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let entries: Value = response.json().await.unwrap();
    assert_eq!(entries[0]["path"], marker.as_str());
    assert!(
        !std::path::Path::new(&marker).exists(),
        "wrote the host's {marker}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join(marker.trim_start_matches('/'))).unwrap(),
        "inside"
    );

    // `..` cannot climb out, and a symlink out of the root is refused.
    let response = c
        .http
        .get(format!("{}/files", c.url))
        .header("E2b-Sandbox-Id", &id)
        .query(&[("path", "/../../etc/hostname")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        404,
        "resolved under the root, where it does not exist"
    );
    std::os::unix::fs::symlink("/etc", root.join("home/user/etc-link")).unwrap();
    let response = c
        .http
        .get(format!("{}/files", c.url))
        .header("E2b-Sandbox-Id", &id)
        .query(&[("path", "etc-link/hostname")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["code"], 400,
        "the /files error code is an integer: {error}"
    );

    // Relative paths resolve against the user's home.
    let part = reqwest::multipart::Part::bytes(b"notes".to_vec()).file_name("docs/notes.txt");
    let response = c
        .envd(&id, "/files")
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    let entries: Value = response.json().await.unwrap();
    assert_eq!(entries[0]["path"], "/home/user/docs/notes.txt");

    // Commands run as `user` in /home/user, with envVars and the staged file.
    let (out, err, end) = c
        .run(&id, &format!("pwd; echo $USER $LOGNAME $HOME; echo \"$GREETING\"; cat docs/notes.txt; echo; cat {marker}; echo; echo $EXTRA"), json!({"envs": {"EXTRA": "per-command"}}))
        .await;
    assert_eq!(
        out,
        format!("/home/user\nuser user /home/user\nhi from create\nnotes\ninside\nper-command\n"),
        "stderr: {err}"
    );
    assert_eq!(end, json!({"exited": true, "status": "exit status 0"}));
    let (out, _, _) = c.run(&id, "pwd", json!({"cwd": "/tmp"})).await;
    assert_eq!(out, "/tmp\n");
    let (_, _, end) = c.run(&id, "exit 3", json!({})).await;
    assert_eq!(
        end,
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    let (_, _, end) = c.run(&id, "kill -9 $$", json!({})).await;
    assert_eq!(end["exited"], false);
    assert_eq!(end["status"], "signal: killed");
    assert_eq!(end["error"], "signal: killed");

    // Filesystem RPCs.
    let (status, listed) = c
        .rpc(
            &id,
            "filesystem.Filesystem/ListDir",
            json!({"path": "/home/user", "depth": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let paths: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"/home/user/docs") && paths.contains(&"/home/user/docs/notes.txt"),
        "{paths:?}"
    );
    let (status, stat) = c
        .rpc(
            &id,
            "filesystem.Filesystem/Stat",
            json!({"path": "docs/notes.txt"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(stat["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(stat["entry"]["size"], "5");
    assert_eq!(stat["entry"]["owner"], "user");
    let (status, moved) = c
        .rpc(
            &id,
            "filesystem.Filesystem/Move",
            json!({"source": "docs/notes.txt", "destination": "/home/user/moved.txt"}),
        )
        .await;
    assert_eq!(
        (status, moved["entry"]["path"].as_str()),
        (200, Some("/home/user/moved.txt"))
    );
    let (status, missing) = c
        .rpc(
            &id,
            "filesystem.Filesystem/Stat",
            json!({"path": "docs/notes.txt"}),
        )
        .await;
    assert_eq!((status, missing["code"].as_str()), (404, Some("not_found")));
    let (status, _) = c
        .rpc(
            &id,
            "filesystem.Filesystem/Remove",
            json!({"path": "moved.txt"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = c
        .rpc(&id, "filesystem.Filesystem/WatchDir", json!({"path": "/"}))
        .await;
    assert_eq!(status, 501, "unserved RPCs answer unimplemented");
}

#[tokio::test]
async fn stdin_list_and_reattach_through_process_connect() {
    let emulator = E2bEmulator::start(Profile::E2b, KEY).await.unwrap();
    let c = Client::new(&emulator);
    let id = c.create(json!({"templateID": "base"})).await;

    // A command with open stdin, started in the background.
    let payload = json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "read line; echo got:$line"]}, "stdin": true, "tag": "reader"}).to_string();
    let mut body = vec![0u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(payload.as_bytes());
    let start = c
        .envd(&id, "/process.Process/Start")
        .header("Content-Type", "application/connect+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let mut start_stream = start.bytes_stream();
    use futures::StreamExt;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("pid") {
        seen.extend(start_stream.next().await.unwrap().unwrap());
    }
    drop(start_stream);

    let (status, listed) = c.rpc(&id, "process.Process/List", json!({})).await;
    assert_eq!(status, 200);
    let process = &listed["processes"][0];
    assert_eq!(process["tag"], "reader");
    assert_eq!(process["config"]["cmd"], "/bin/bash");
    let pid = process["pid"].as_u64().unwrap();

    // The first stream is gone; the process is not. Reattach, then feed it.
    let attach = c.stream(
        c.envd(&id, "/process.Process/Connect"),
        json!({"process": {"pid": pid}}),
    );
    let feed = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (status, _) = c
            .rpc(
                &id,
                "process.Process/SendInput",
                json!({"process": {"pid": pid}, "input": {"stdin": B64.encode("hello\n")}}),
            )
            .await;
        assert_eq!(status, 200);
    };
    let ((events, end), ()) = tokio::join!(attach, feed);
    assert_eq!(events[0]["start"]["pid"], pid);
    let (out, _, exit) = output(&events);
    assert_eq!(out, "got:hello\n");
    assert_eq!(exit["exited"], true);
    assert_eq!(end, json!({}));
    let (status, _) = c
        .rpc(
            &id,
            "process.Process/Connect",
            json!({"process": {"pid": pid}}),
        )
        .await;
    assert_ne!(status, 200, "a finished process cannot be attached");
}

#[tokio::test]
async fn envd_is_routed_by_host_pattern_without_a_header() {
    let emulator = E2bEmulator::start(Profile::Novita, KEY).await.unwrap();
    let c = Client::new(&emulator);
    let (status, created) = c
        .api(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(status, 201);
    let id = created["sandboxID"].as_str().unwrap();
    let response = c
        .http
        .get(format!("{}/health", c.url))
        .header("Host", format!("49983-{id}.sandbox.novita.ai"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = c
        .http
        .get(format!("{}/health", c.url))
        .header("Host", "49983-nope.sandbox.novita.ai")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);

    // One base URL, no routing header: the access token names the sandbox.
    let (_, secure) = c
        .api(
            reqwest::Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base", "secure": true})),
        )
        .await;
    let token = secure["envdAccessToken"].as_str().unwrap();
    let response = c
        .http
        .get(format!("{}/health", c.url))
        .header("X-Access-Token", token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}
