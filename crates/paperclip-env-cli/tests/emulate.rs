//! `paperclip-env emulate <provider>`: the JSON line, a request against the
//! served emulator, and nothing left behind (temp dirs, processes) after
//! SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_paperclip-env");

/// A running `emulate`, with its own TMPDIR so everything it creates can be
/// checked after it exits.
struct Emulate {
    child: Child,
    tmp: tempfile::TempDir,
    line: Value,
}

impl Emulate {
    fn start(args: &[&str]) -> Emulate {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .arg("emulate")
            .args(args)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let line: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no JSON line ({e}): {line:?} {err}")
        });
        // Exactly one line: nothing else is printed while it runs.
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
            assert!(rest.is_empty(), "more on stdout: {rest:?}");
        });
        Emulate { child, tmp, line }
    }

    fn url(&self, key: &str) -> String {
        self.line["urls"][key].as_str().unwrap().to_owned()
    }

    /// SIGTERM, then the exit status and the cleanup checks.
    fn terminate(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "emulate ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status {status}");
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let strays = processes_under(self.tmp.path());
        assert!(strays.is_empty(), "processes left: {strays:?}");
    }
}

impl Drop for Emulate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose command line or working directory lies under `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    // A killed process group may take a moment to be reaped by init.
    for _ in 0..50 {
        found.clear();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let path = entry.path();
            if !entry
                .file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
            {
                continue;
            }
            let cmdline = std::fs::read(path.join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let cwd = std::fs::read_link(path.join("cwd"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let zombie = std::fs::read_to_string(path.join("stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true);
            if !zombie && (cmdline.contains(&needle) || cwd.starts_with(&needle)) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        if found.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    found
}

/// One HTTP/1.1 request; returns (status, body) once `done` accepts the
/// bytes read so far (or the server closes).
fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    done: impl Fn(&[u8]) -> bool,
) -> (u16, String) {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let mut stream = TcpStream::connect(authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if done(&buf) {
                    break;
                }
            }
            Err(e) => panic!("reading {path}: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

/// Opens an h2c connection (prior knowledge) and returns the type of the
/// server's first frame (a server must open with SETTINGS, type 4).
fn h2_first_frame_type(url: &str) -> u8 {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let mut stream = TcpStream::connect(authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).unwrap();
    header[3]
}

fn until_close(_: &[u8]) -> bool {
    false
}

#[test]
fn e2b_serves_the_sdk_env_and_leaves_nothing_after_sigterm() {
    let emulate = Emulate::start(&["e2b"]);
    let line = &emulate.line;
    assert_eq!(line["provider"], "e2b");
    let api = emulate.url("api");
    assert!(api.starts_with("http://127.0.0.1:"), "{api}");
    let key = line["credentials"]["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(line["env"]["E2B_API_URL"], api.as_str());
    assert_eq!(line["env"]["E2B_SANDBOX_URL"], api.as_str());
    assert_eq!(line["env"]["E2B_API_KEY"], key.as_str());

    let (status, _) = http(
        &api,
        "POST",
        "/sandboxes",
        &[("X-API-Key", "wrong")],
        b"{}",
        until_close,
    );
    assert_eq!(status, 401);
    let (status, body) = http(
        &api,
        "POST",
        "/sandboxes",
        &[("X-API-Key", &key), ("Content-Type", "application/json")],
        br#"{"templateID":"base","timeout":300}"#,
        until_close,
    );
    assert_eq!(status, 201, "{body}");
    let sandbox: Value = serde_json::from_str(&body).unwrap();
    let id = sandbox["sandboxID"].as_str().unwrap().to_owned();

    // A long-running sandbox process, which SIGTERM must not leave behind.
    let message = br#"{"process":{"cmd":"/bin/sh","args":["-c","echo started; exec sleep 300"]},"stdin":false}"#;
    let mut envelope = vec![0u8];
    envelope.extend_from_slice(&(message.len() as u32).to_be_bytes());
    envelope.extend_from_slice(message);
    let (status, stream) = http(
        &api,
        "POST",
        "/process.Process/Start",
        &[
            ("E2b-Sandbox-Id", &id),
            ("Content-Type", "application/connect+json"),
            ("Connect-Protocol-Version", "1"),
        ],
        &envelope,
        |buf| String::from_utf8_lossy(buf).contains("\"stdout\""),
    );
    assert_eq!(status, 200, "{stream}");
    assert!(stream.contains("\"pid\""), "{stream}");
    emulate.terminate();
}

#[test]
fn every_provider_starts_answers_and_cleans_up() {
    for (provider, probe_key, path) in [
        ("novita", "api", "/sandboxes/nope"),
        ("daytona", "api", "/sandbox"),
        ("cloudflare", "bridge", "/api/health"),
        ("modal", "server", "/"),
        ("kubernetes", "api", "/version"),
        ("exe-dev", "api", ""),
    ] {
        let emulate = Emulate::start(&[provider]);
        assert_eq!(emulate.line["provider"], provider);
        assert!(emulate.line["env"].is_object(), "{provider}");
        assert!(emulate.line["credentials"].is_object(), "{provider}");
        let url = emulate.url(probe_key);
        if provider == "modal" {
            assert_eq!(h2_first_frame_type(&url), 0x04, "modal: no HTTP/2 SETTINGS");
            emulate.terminate();
            continue;
        }
        // Any HTTP answer proves the emulator serves on the printed URL.
        let (status, body) = http(
            &url,
            "GET",
            &format!("/{}", path.trim_start_matches('/')),
            &[],
            b"",
            until_close,
        );
        assert!(status >= 200, "{provider}: no HTTP answer: {body}");
        if provider == "kubernetes" {
            let kubeconfig = emulate.line["env"]["KUBECONFIG"].as_str().unwrap();
            let text = std::fs::read_to_string(kubeconfig).unwrap();
            assert!(text.contains(&url), "{text}");
        }
        emulate.terminate();
    }
}

#[test]
fn a_fixed_port_is_served_and_tls_is_refused_where_the_service_is_plain() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let emulate = Emulate::start(&[
        "daytona",
        "--port",
        &port.to_string(),
        "--api-key",
        "dtn_fixed",
    ]);
    let api = emulate.url("api");
    assert_eq!(api, format!("http://127.0.0.1:{port}"));
    assert_eq!(emulate.line["env"]["DAYTONA_API_KEY"], "dtn_fixed");
    let (status, _) = http(
        &api,
        "GET",
        "/sandbox/nope",
        &[("Authorization", "Bearer wrong")],
        b"",
        until_close,
    );
    assert_eq!(status, 401);
    let (status, body) = http(
        &api,
        "GET",
        "/sandbox/nope",
        &[("Authorization", "Bearer dtn_fixed")],
        b"",
        until_close,
    );
    assert_eq!(status, 404, "{body}");
    emulate.terminate();

    let old = Emulate::start(&["e2b", "--v1-only", "--api-key", "e2b_fixed"]);
    let api = old.url("api");
    let create = |path: &str| {
        http(
            &api,
            "POST",
            path,
            &[
                ("X-API-Key", "e2b_fixed"),
                ("Content-Type", "application/json"),
            ],
            br#"{"templateID":"base"}"#,
            until_close,
        )
        .0
    };
    assert_eq!(create("/v2/sandboxes"), 404);
    assert_eq!(create("/sandboxes"), 201);
    old.terminate();

    let out = Command::new(BIN)
        .args(["emulate", "e2b", "--tls"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls"));
}
