//! The Daytona emulator against the daemon's behaviour (daytonaio/daytona
//! v0.190.0, issue 19), driven over plain HTTP as an SDK would.
#![cfg(feature = "emulators")]

use std::time::Duration;

use paperclip_env_testkit::emulators::daytona::DaytonaEmulator;
use serde_json::{Value, json};

const KEY: &str = "dtn_emulator_key";

struct Client {
    emu: DaytonaEmulator,
    http: reqwest::Client,
}

impl Client {
    async fn start() -> Self {
        Client {
            emu: DaytonaEmulator::start(KEY).await.unwrap(),
            http: reqwest::Client::new(),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.emu.url()))
            .bearer_auth(KEY)
            .header("x-daytona-sdk-version", "0.226.1")
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.req(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A started sandbox; returns its id.
    async fn sandbox(&self, body: Value) -> String {
        let (status, created) = self
            .json(reqwest::Method::POST, "/sandbox", Some(body))
            .await;
        assert_eq!(status, 200, "{created}");
        let id = created["id"].as_str().unwrap().to_owned();
        for _ in 0..100 {
            let (_, s) = self
                .json(reqwest::Method::GET, &format!("/sandbox/{id}"), None)
                .await;
            if s["state"] == "started" {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("sandbox {id} never started");
    }

    async fn session(&self, id: &str, sid: &str) {
        let (status, body) = self
            .json(
                reqwest::Method::POST,
                &format!("/toolbox/{id}/process/session"),
                Some(json!({"sessionId": sid})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    async fn exec(&self, id: &str, sid: &str, command: &str, run_async: bool) -> (u16, Value) {
        self.json(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/session/{sid}/exec"),
            Some(json!({"command": command, "runAsync": run_async})),
        )
        .await
    }

    async fn status(&self, id: &str, sid: &str, cid: &str) -> Value {
        self.json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/process/session/{sid}/command/{cid}"),
            None,
        )
        .await
        .1
    }

    async fn logs(&self, id: &str, sid: &str, cid: &str) -> Value {
        self.json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/process/session/{sid}/command/{cid}/logs"),
            None,
        )
        .await
        .1
    }

    /// Waits (bounded) for the command's exit code.
    async fn exit_code(&self, id: &str, sid: &str, cid: &str) -> i64 {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(code) = self.status(id, sid, cid).await["exitCode"].as_i64() {
                    return code;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the command never finished")
    }
}

#[tokio::test]
async fn session_commands_share_one_shell_and_run_in_turn() {
    let c = Client::start().await;
    let id = c
        .sandbox(json!({"env": {"SANDBOX_VAR": "from-create"}}))
        .await;
    c.session(&id, "s1").await;
    // Synchronous exec: 200 with the split output and the exit code.
    let (status, r) = c
        .exec(
            &id,
            "s1",
            "mkdir -p sub && cd sub && export KEPT=yes",
            false,
        )
        .await;
    assert_eq!((status, r["exitCode"].clone()), (200, json!(0)), "{r}");
    let (_, r) = c
        .exec(&id, "s1", "pwd; echo \"$KEPT $SANDBOX_VAR\"", false)
        .await;
    let stdout = r["stdout"].as_str().unwrap();
    assert!(stdout.ends_with("/sub\nyes from-create\n"), "{r}");
    // Commands queue behind a running one: the second starts only after
    // the first has finished.
    let (_, a) = c.exec(&id, "s1", "sleep 0.3; echo first", true).await;
    let (_, b) = c.exec(&id, "s1", "echo second", true).await;
    let (a, b) = (a["cmdId"].as_str().unwrap(), b["cmdId"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(c.status(&id, "s1", b).await.get("exitCode").is_none());
    assert_eq!(c.exit_code(&id, "s1", b).await, 0);
    assert_eq!(c.exit_code(&id, "s1", a).await, 0);
    // `exit` ends the session's shell: its command never reports an exit
    // code, and later commands cannot be written.
    let (_, e) = c.exec(&id, "s1", "exit 3", true).await;
    let e = e["cmdId"].as_str().unwrap().to_owned();
    let input = format!("/toolbox/{id}/process/session/s1/command/{e}/input");
    tokio::time::timeout(Duration::from_secs(10), async {
        while c
            .json(reqwest::Method::POST, &input, Some(json!({"data": "x"})))
            .await
            .0
            != 410
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the session's shell never exited");
    assert!(c.status(&id, "s1", &e).await.get("exitCode").is_none());
    let (status, _) = c.exec(&id, "s1", "true", true).await;
    assert_eq!(status, 400);
    let (_, session) = c
        .json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/process/session/s1"),
            None,
        )
        .await;
    assert_eq!(session["sessionId"], "s1");
    // The refused command is recorded too, as the daemon records it before writing.
    assert_eq!(
        session["commands"].as_array().unwrap().len(),
        6,
        "{session}"
    );
}

#[tokio::test]
async fn logs_are_framed_per_line_as_the_daemon_does() {
    let c = Client::start().await;
    let id = c.sandbox(json!({})).await;
    c.session(&id, "s").await;
    let (_, r) = c
        .exec(
            &id,
            "s",
            "printf 'one\\ntw'; printf 'e1\\n' >&2; sleep 1; printf 'o\\0\\nlast'",
            true,
        )
        .await;
    let cid = r["cmdId"].as_str().unwrap().to_owned();
    let partial = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let logs = c.logs(&id, "s", &cid).await;
            if logs["stdout"] != "" && logs["stderr"] != "" {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no output");
    assert!(c.status(&id, "s", &cid).await.get("exitCode").is_none());
    assert_eq!(partial["stdout"], "one\n", "a partial line stays invisible");
    assert_eq!(c.exit_code(&id, "s", &cid).await, 0);
    let logs = c.logs(&id, "s", &cid).await;
    assert_eq!(
        logs["stdout"], "one\ntwo\nlast\n",
        "NUL dropped, last line gains \\n"
    );
    assert_eq!(logs["stderr"], "e1\n");
    let raw = logs["output"].as_str().unwrap();
    assert!(raw.starts_with("\u{1}\u{1}\u{1}one\n"), "{raw:?}");
    assert!(raw.contains("\u{2}\u{2}\u{2}e1\n") && raw.ends_with("\u{1}\u{1}\u{1}last\n"));
    // Without an SDK version the daemon answers the combined text.
    let text = c
        .http
        .get(format!(
            "{}/toolbox/{id}/process/session/s/command/{cid}/logs",
            c.emu.url()
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("one\n") && !text.contains('\u{1}'),
        "{text:?}"
    );
}

#[tokio::test]
async fn async_stdin_is_held_open_until_input_arrives() {
    let c = Client::start().await;
    let id = c.sandbox(json!({})).await;
    c.session(&id, "s").await;
    let (_, r) = c
        .exec(&id, "s", "read line; echo \"got $line\"", true)
        .await;
    let cid = r["cmdId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.status(&id, "s", &cid).await.get("exitCode").is_none(),
        "stdin must not be at EOF"
    );
    let (status, _) = c
        .json(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/session/s/command/{cid}/input"),
            Some(json!({"data": "hello"})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(c.exit_code(&id, "s", &cid).await, 0);
    let logs = c.logs(&id, "s", &cid).await;
    assert_eq!(
        logs["stdout"], "hello\ngot hello\n",
        "input is echoed as stdout"
    );
    let (status, _) = c
        .json(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/session/s/command/{cid}/input"),
            Some(json!({"data": "late"})),
        )
        .await;
    assert_eq!(status, 410);
    // A synchronous command reads EOF at once.
    let (_, r) = tokio::time::timeout(Duration::from_secs(10), c.exec(&id, "s", "cat", false))
        .await
        .expect("a sync cat must see EOF");
    assert_eq!(r["exitCode"], 0);
}

#[tokio::test]
async fn session_delete_sends_sigterm_then_sigkill() {
    let c = Client::start().await;
    c.emu.set_session_grace(Duration::from_secs(1));
    let id = c.sandbox(json!({})).await;
    let (_, dir) = c
        .json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/work-dir"),
            None,
        )
        .await;
    let root = std::path::PathBuf::from(dir["dir"].as_str().unwrap());
    c.session(&id, "s").await;
    c.exec(
        &id,
        "s",
        "( trap 'echo term > term.txt; exit 0' TERM; touch ready.txt; while :; do sleep 0.05; done )",
        true,
    )
    .await;
    c.session(&id, "t").await;
    c.exec(
        &id,
        "t",
        "( trap '' TERM; i=0; while :; do i=$((i+1)); echo $i > alive.txt; sleep 0.05; done )",
        true,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(root.join("ready.txt").exists() && root.join("alive.txt").exists()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the commands never started");
    for sid in ["s", "t"] {
        let response = c
            .req(
                reqwest::Method::DELETE,
                &format!("/toolbox/{id}/process/session/{sid}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }
    assert_eq!(
        std::fs::read_to_string(root.join("term.txt")).unwrap(),
        "term\n"
    );
    // The TERM-ignoring loop was killed after the grace: it writes no more.
    let before = std::fs::read_to_string(root.join("alive.txt")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::read_to_string(root.join("alive.txt")).unwrap(),
        before
    );
    let (status, _) = c
        .json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/process/session/s"),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn execute_files_and_api_routes_follow_the_daemon_and_the_sdk() {
    let c = Client::start().await;
    let id = c
        .sandbox(json!({"env": {"FROM_CREATE": "1"}, "labels": {"team": "a"}}))
        .await;
    let other = c.sandbox(json!({"labels": {"team": "b"}})).await;
    // One-shot execute: cwd and envs apply, the sandbox env reaches it,
    // bad env keys are refused.
    c.json(
        reqwest::Method::POST,
        &format!("/toolbox/{id}/files/folder?path=work&mode=755"),
        None,
    )
    .await;
    let (_, r) = c
        .json(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/execute"),
            Some(json!({"command": "pwd; echo $FOO $FROM_CREATE; echo err >&2", "cwd": "work", "envs": {"FOO": "bar"}})),
        )
        .await;
    let result = r["result"].as_str().unwrap();
    assert!(result.ends_with("/work\nbar 1\nerr\n"), "{r}");
    let (status, _) = c
        .json(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/execute"),
            Some(json!({"command": "true", "envs": {"1BAD": "x"}})),
        )
        .await;
    assert_eq!(status, 400);
    // Relative upload paths land in the work dir; listing; deleting a
    // directory needs recursive=true.
    let form = reqwest::multipart::Form::new()
        .text("files[0].path", "up/rel.txt")
        .part(
            "files[0].file",
            reqwest::multipart::Part::bytes(b"rel".to_vec()).file_name("rel.txt"),
        );
    let response = c
        .req(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/files/bulk-upload"),
        )
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, listing) = c
        .json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/files?path=up"),
            None,
        )
        .await;
    assert_eq!(listing[0]["name"], "rel.txt");
    assert_eq!(
        (listing[0]["size"].clone(), listing[0]["isDir"].clone()),
        (json!(3), json!(false))
    );
    let (status, _) = c
        .json(
            reqwest::Method::DELETE,
            &format!("/toolbox/{id}/files?path=up"),
            None,
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = c
        .json(
            reqwest::Method::DELETE,
            &format!("/toolbox/{id}/files?path=up&recursive=true"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    // The deprecated passthrough reaches the same toolbox.
    let (status, dir) = c
        .json(
            reqwest::Method::GET,
            &format!("/toolbox/{id}/toolbox/work-dir"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{dir}");
    // API: the fields the 0.226 SDK requires, the label-filtered list, the
    // interval setters answering the sandbox, the build-logs URL.
    let (_, s) = c
        .json(reqwest::Method::GET, &format!("/sandbox/{id}"), None)
        .await;
    for field in [
        "id",
        "organizationId",
        "name",
        "user",
        "env",
        "labels",
        "public",
        "networkBlockAll",
        "kvm",
        "target",
        "cpu",
        "gpu",
        "memory",
        "disk",
        "toolboxProxyUrl",
    ] {
        assert!(
            s.get(field).is_some_and(|v| !v.is_null()),
            "missing {field}: {s}"
        );
    }
    assert!(s["cpu"].is_i64() && s["env"]["FROM_CREATE"] == "1");
    let labels = urlencode(r#"{"team":"b"}"#);
    let (_, page) = c
        .json(
            reqwest::Method::GET,
            &format!("/sandbox?labels={labels}"),
            None,
        )
        .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(
        (items.len(), items[0]["id"].as_str()),
        (1, Some(other.as_str())),
        "{page}"
    );
    for (route, field) in [
        ("autostop", "autoStopInterval"),
        ("autodelete", "autoDeleteInterval"),
    ] {
        let (status, s) = c
            .json(
                reqwest::Method::POST,
                &format!("/sandbox/{id}/{route}/7"),
                None,
            )
            .await;
        assert_eq!((status, s[field].clone()), (200, json!(7)), "{s}");
    }
    let (_, url) = c
        .json(
            reqwest::Method::GET,
            &format!("/sandbox/{id}/build-logs-url"),
            None,
        )
        .await;
    assert!(url["url"].as_str().unwrap().ends_with("/build-logs"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
