//! The `ssh` driver against a real throwaway OpenSSH server (spec 27 §12).
#![cfg(feature = "ssh")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use paperclip_env_core::lease::{Environment, EnvironmentLease, LeaseStatus};
use paperclip_env_core::realize::WorkspaceSpec;
use paperclip_env_core::runtime::AcquireRunLease;
use paperclip_env_core::secret::InMemorySecretResolver;
use paperclip_env_core::{EnvironmentRuntime, Error, ExecuteRequest, ExecuteResult};
use paperclip_env_providers::ssh::{
    HostKeyPolicy, HostKeyRejection, KnownHosts, RemoteCommand, SshAuth, SshDriver, SshError,
    SshTransport,
};
use paperclip_env_testkit::fixtures::sshd::{self, SshServer};
use serde_json::{Value, json};

fn server() -> Option<SshServer> {
    if !sshd::available() {
        // scripts/setup.sh installs OpenSSH; in CI a missing sshd is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "sshd/ssh-keygen missing in CI: run scripts/setup.sh"
        );
        eprintln!("skipping: sshd/ssh-keygen not installed (run scripts/setup.sh)");
        return None;
    }
    Some(SshServer::start().expect("start sshd fixture"))
}

fn config(srv: &SshServer, workspace: &str) -> Value {
    json!({
        "host": srv.host(),
        "port": srv.port(),
        "username": srv.user(),
        "remoteWorkspacePath": workspace,
        "privateKey": srv.client_key().private_key,
        "knownHosts": srv.known_hosts(),
        "strictHostKeyChecking": true,
    })
}

fn workspace(srv: &SshServer) -> String {
    srv.dir()
        .join("work space/nested/dir")
        .display()
        .to_string()
}

fn runtime() -> EnvironmentRuntime {
    EnvironmentRuntime::builder()
        .driver(Arc::new(SshDriver::new()))
        .build()
}

fn env_of(config: Value) -> Environment {
    Environment::new("env-ssh", "ssh box", "ssh", config)
}

async fn acquire(rt: &EnvironmentRuntime, env: &Environment) -> EnvironmentLease {
    rt.acquire_run_lease(AcquireRunLease::ad_hoc(env.clone()))
        .await
        .expect("acquire")
        .lease
}

struct Ready {
    srv: SshServer,
    rt: EnvironmentRuntime,
    env: Environment,
    lease: EnvironmentLease,
}

impl Ready {
    async fn exec(&self, req: ExecuteRequest) -> ExecuteResult {
        self.rt
            .execute(&self.env, &self.lease, &req)
            .await
            .expect("execute")
    }
}

async fn ready() -> Option<Ready> {
    let srv = server()?;
    let rt = runtime();
    let env = env_of(config(&srv, &workspace(&srv)));
    let lease = acquire(&rt, &env).await;
    Some(Ready {
        srv,
        rt,
        env,
        lease,
    })
}

fn ssh_source(err: &Error) -> Option<&SshError> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<SshError>())
}

fn transport(srv: &SshServer, policy: HostKeyPolicy) -> SshTransport {
    SshTransport::builder(srv.host(), srv.user())
        .port(srv.port())
        .auth(SshAuth::PrivateKey(
            srv.client_key().private_key.clone().into(),
        ))
        .host_key_policy(policy)
        .connect_timeout(Duration::from_secs(5))
        .build()
}

// --- config / validation (checklist 1–2) ---------------------------------

#[tokio::test]
async fn invalid_configs_name_the_field_without_connecting() {
    let rt = runtime();
    for (cfg, field, message) in [
        (
            json!({"host": " ", "username": "u", "remoteWorkspacePath": "/w"}),
            "host",
            "SSH environments require a host.",
        ),
        (
            json!({"host": "h", "username": "", "remoteWorkspacePath": "/w"}),
            "username",
            "SSH environments require a username.",
        ),
        (
            json!({"host": "h", "username": "u", "remoteWorkspacePath": "rel"}),
            "remoteWorkspacePath",
            "SSH remote workspace path must be absolute.",
        ),
        (
            json!({"host": "h", "username": "u", "remoteWorkspacePath": "/w", "port": 0}),
            "port",
            "",
        ),
        (
            json!({"host": "h", "username": "u", "remoteWorkspacePath": "/w", "port": 22.5}),
            "port",
            "",
        ),
        (
            json!({"host": "h", "username": "u", "remoteWorkspacePath": "/w", "password": "x"}),
            "password",
            "",
        ),
    ] {
        let err = rt
            .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
            .await
            .unwrap_err();
        let Error::InvalidConfig {
            field: f,
            message: m,
            ..
        } = &err
        else {
            panic!("expected InvalidConfig, got {err:?}");
        };
        assert_eq!(f, field);
        if !message.is_empty() {
            assert_eq!(m, message);
        }
    }
}

#[tokio::test]
async fn string_port_coerces() {
    let Some(srv) = server() else { return };
    let mut cfg = config(&srv, &workspace(&srv));
    cfg["port"] = json!(srv.port().to_string());
    let rt = runtime();
    let lease = acquire(&rt, &env_of(cfg)).await;
    assert_eq!(lease.metadata.unwrap()["port"], json!(srv.port()));
}

// --- connectivity / lease (checklist 5) -----------------------------------

#[tokio::test]
async fn acquire_creates_workspace_and_records_lease_identity() {
    let Some(r) = ready().await else { return };
    let path = workspace(&r.srv);
    assert!(std::path::Path::new(&path).is_dir(), "nested dir created");
    assert_eq!(
        r.lease.provider_lease_id.as_deref(),
        Some(format!("ssh://{}@127.0.0.1:{}{}", r.srv.user(), r.srv.port(), path).as_str())
    );
    assert_eq!(r.lease.provider.as_deref(), Some("ssh"));
    let md = r.lease.metadata.clone().unwrap();
    let keys: Vec<&str> = md.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "driver",
            "executionWorkspaceMode",
            "host",
            "port",
            "username",
            "remoteWorkspacePath",
            "remoteCwd"
        ]
    );
    assert_eq!(md["driver"], json!("ssh"));
    assert_eq!(md["remoteCwd"], json!(path));
    assert_eq!(md["host"], json!("127.0.0.1"));

    let realized =
        r.rt.realize_workspace(&r.env, &r.lease, &WorkspaceSpec::default())
            .await
            .unwrap();
    assert_eq!(realized.cwd, path);

    // Default cwd of commands is remoteCwd.
    let out = r.exec(ExecuteRequest::new("pwd")).await;
    assert_eq!(out.stdout.trim(), path);

    let released =
        r.rt.release_lease(&r.env, &r.lease, LeaseStatus::Released)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(released.lease.status, LeaseStatus::Released);
}

// --- host keys (checklist 6–9) --------------------------------------------

#[tokio::test]
async fn wrong_host_key_is_rejected_before_auth() {
    let Some(srv) = server() else { return };
    let other = sshd::generate_key(srv.dir(), "other_host").unwrap();
    let mut cfg = config(&srv, &workspace(&srv));
    cfg["knownHosts"] = json!(format!("[127.0.0.1]:{} {}", srv.port(), other.public_key));
    let start = Instant::now();
    let err = runtime()
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(
            err,
            Error::HostKeyRejected {
                problem: paperclip_env_core::HostKeyProblem::Mismatch,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("Host key verification failed"));
    assert!(matches!(
        ssh_source(&err),
        Some(SshError::HostKey {
            reason: HostKeyRejection::Mismatch,
            ..
        })
    ));
    assert!(
        !srv.log().contains("Accepted publickey"),
        "no auth happened"
    );
}

#[tokio::test]
async fn unknown_host_is_rejected() {
    let Some(srv) = server() else { return };
    let mut cfg = config(&srv, &workspace(&srv));
    // A bare entry only matches port 22, so it does not cover this port.
    cfg["knownHosts"] = json!(format!("127.0.0.1 {}", srv.host_public_key()));
    let err = runtime()
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HostKeyRejected {
                problem: paperclip_env_core::HostKeyProblem::UnknownHost,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        ssh_source(&err),
        Some(SshError::HostKey {
            reason: HostKeyRejection::UnknownHost,
            ..
        })
    ));
}

#[tokio::test]
async fn strict_without_known_hosts_and_empty_files_does_not_trust_on_first_use() {
    let Some(srv) = server() else { return };
    let empty = srv.dir().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let t = transport(
        &srv,
        HostKeyPolicy::Strict(KnownHosts::from_files(std::slice::from_ref(&empty))),
    );
    let err = t.connect().await.unwrap_err();
    assert!(matches!(
        err,
        SshError::HostKey {
            reason: HostKeyRejection::UnknownHost,
            ..
        }
    ));
    // And nothing was learned.
    assert_eq!(std::fs::read_to_string(&empty).unwrap(), "");
}

#[tokio::test]
async fn not_strict_accepts_a_wrong_known_hosts() {
    let Some(srv) = server() else { return };
    let other = sshd::generate_key(srv.dir(), "other_host").unwrap();
    let mut cfg = config(&srv, &workspace(&srv));
    cfg["knownHosts"] = json!(format!("[127.0.0.1]:{} {}", srv.port(), other.public_key));
    cfg["strictHostKeyChecking"] = json!(false);
    acquire(&runtime(), &env_of(cfg)).await;
}

#[tokio::test]
async fn hashed_entries_match_and_revoked_rejects() {
    let Some(srv) = server() else { return };
    let file = srv.dir().join("hashed_known_hosts");
    std::fs::write(&file, format!("{}\n", srv.known_hosts())).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let hashed = std::fs::read_to_string(&file).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let mut cfg = config(&srv, &workspace(&srv));
    cfg["knownHosts"] = json!(hashed);
    acquire(&runtime(), &env_of(cfg.clone())).await;

    cfg["knownHosts"] = json!(format!(
        "{}\n@revoked * {}",
        srv.known_hosts(),
        srv.host_public_key()
    ));
    let err = runtime()
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    assert!(matches!(
        ssh_source(&err),
        Some(SshError::HostKey {
            reason: HostKeyRejection::Revoked,
            ..
        })
    ));
}

// --- auth and reachability failures (checklist 10–11) ---------------------

#[tokio::test]
async fn wrong_private_key_is_unauthenticated_quickly() {
    let Some(srv) = server() else { return };
    let other = sshd::generate_key(srv.dir(), "stranger").unwrap();
    let mut cfg = config(&srv, &workspace(&srv));
    cfg["privateKey"] = json!(other.private_key);
    let start = Instant::now();
    let err = runtime()
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("Permission denied (publickey)"));
    assert!(matches!(
        ssh_source(&err),
        Some(SshError::AuthFailed { .. })
    ));
}

#[tokio::test]
async fn identity_file_auth_works() {
    let Some(srv) = server() else { return };
    let mut cfg = config(&srv, &workspace(&srv));
    cfg.as_object_mut().unwrap().remove("privateKey");
    cfg["identityFile"] = json!(srv.client_key().private_key_path.display().to_string());
    acquire(&runtime(), &env_of(cfg)).await;
}

#[tokio::test]
async fn refused_port_fails_fast_and_retryable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = json!({"host": "127.0.0.1", "port": port, "username": "u",
        "remoteWorkspacePath": "/w", "privateKey": "x", "strictHostKeyChecking": false});
    // An unparsable key is reported before dialing: use a real one.
    let dir = tempfile::tempdir().unwrap();
    if !sshd::available() {
        return;
    }
    let key = sshd::generate_key(dir.path(), "k").unwrap();
    let mut cfg = cfg;
    cfg["privateKey"] = json!(key.private_key);
    let start = Instant::now();
    let err = runtime()
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err,
            Error::Provider {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("Connection refused"));
    assert!(matches!(
        ssh_source(&err),
        Some(SshError::ConnectionRefused { .. })
    ));
}

#[tokio::test]
async fn stalled_server_times_out_within_the_connect_budget() {
    if !sshd::available() {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accept, never speak
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let key = sshd::generate_key(dir.path(), "k").unwrap();
    let cfg = json!({"host": "127.0.0.1", "port": port, "username": "u",
        "remoteWorkspacePath": "/w", "privateKey": key.private_key, "strictHostKeyChecking": false});
    let rt = EnvironmentRuntime::builder()
        .driver(Arc::new(
            SshDriver::new().with_connect_timeout(Duration::from_secs(2)),
        ))
        .build();
    let start = Instant::now();
    let err = rt
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(cfg)))
        .await
        .unwrap_err();
    let took = start.elapsed();
    hold.abort();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}

// --- command execution (checklist 12–18) ----------------------------------

#[tokio::test]
async fn argv_round_trips_exactly() {
    let Some(r) = ready().await else { return };
    let args = [
        "a b",
        "it's",
        "\"dq\"",
        "$HOME",
        "back\\slash",
        "new\nline",
        "",
        "ünï©ødé",
        "*",
        "; rm -rf /",
    ];
    let out = r
        .exec(ExecuteRequest::new("printf").arg("%s\\n").args(args))
        .await;
    assert_eq!(out.exit_code, Some(0), "{}", out.stderr);
    let expected: String = args.iter().map(|a| format!("{a}\n")).collect();
    assert_eq!(out.stdout, expected);
    assert_eq!(out.stderr, "");
}

#[tokio::test]
async fn exit_codes_and_stream_separation() {
    let Some(r) = ready().await else { return };
    let ok = r.exec(ExecuteRequest::shell("exit 0")).await;
    assert_eq!((ok.exit_code, ok.timed_out), (Some(0), false));
    let out = r
        .exec(ExecuteRequest::shell("echo out; echo err >&2; exit 42"))
        .await;
    assert_eq!(out.exit_code, Some(42));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    let killed = r.exec(ExecuteRequest::shell("kill -TERM $$")).await;
    assert_eq!(killed.exit_code, None);
    assert_eq!(killed.signal.as_deref(), Some("SIGTERM"));
}

#[tokio::test]
async fn bash_c_keeps_its_positional_args() {
    let Some(r) = ready().await else { return };
    let out = r
        .exec(
            ExecuteRequest::new("bash")
                .arg("-c")
                .arg("echo \"$0|$1\"; echo ${BASH_VERSION:+bash}")
                .arg("zero")
                .arg("one"),
        )
        .await;
    assert_eq!(out.stdout, "zero|one\nbash\n");
}

#[tokio::test]
async fn cwd_with_spaces_and_quotes() {
    let Some(r) = ready().await else { return };
    let dir = r.srv.dir().join("it's a dir");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.display().to_string();
    let out = r.exec(ExecuteRequest::shell("pwd").cwd(dir.clone())).await;
    assert_eq!(out.stdout.trim(), dir);
    let missing = r
        .exec(ExecuteRequest::shell("pwd").cwd("/definitely/not/here"))
        .await;
    assert_ne!(missing.exit_code, Some(0));
}

#[tokio::test]
async fn env_values_arrive_verbatim_and_leave_no_file_behind() {
    let Some(r) = ready().await else { return };
    let tricky = "it's $HOME `x` \"q\"\nline2";
    let out = r
        .exec(
            ExecuteRequest::new("sh")
                .arg("-c")
                .arg("printf '%s|%s' \"$TRICKY\" \"$OTHER\"")
                .env("TRICKY", tricky)
                .env("OTHER", "2"),
        )
        .await;
    assert_eq!(out.stdout, format!("{tricky}|2"));
    // The script travels over stdin: no launcher file is ever written
    // (older builds left `/tmp/paperclip-ssh-command-*` for a moment).
    let start = Instant::now();
    loop {
        let left = std::fs::read_dir("/tmp")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("paperclip-ssh-command-")
            })
            .count();
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "a launcher file was written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn env_with_stdin_delivers_every_stdin_byte_to_the_command() {
    let Some(r) = ready().await else { return };
    let stdin = "first line\n  \\ no newline at the end";
    let out = r
        .exec(
            ExecuteRequest::new("sh")
                .arg("-c")
                .arg("printf '%s:' \"$A\"; cat")
                .env("A", "1")
                .stdin(stdin)
                .timeout_ms(5_000),
        )
        .await;
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout, format!("1:{stdin}"));
    // Without stdin the command sees EOF at once, as without env.
    let none = r
        .exec(
            ExecuteRequest::new("sh")
                .arg("-c")
                .arg("printf '%s:' \"$A\"; cat")
                .env("A", "2")
                .timeout_ms(5_000),
        )
        .await;
    assert_eq!(none.stdout, "2:");
    // The script reader's own variables do not reach the command.
    let vars = r
        .exec(
            ExecuteRequest::new("sh")
                .arg("-c")
                .arg("set | grep -c __pc_ || true")
                .env("A", "3"),
        )
        .await;
    assert_eq!(vars.stdout.trim(), "0");
}

#[tokio::test]
async fn timeout_with_env_kills_the_remote_process_group() {
    let Some(r) = ready().await else { return };
    let marker = format!("3001.{}", std::process::id());
    let out = r
        .exec(
            ExecuteRequest::shell(format!("sleep {marker} & sleep {marker}; echo never"))
                .env("WITH_ENV", "1")
                .timeout_ms(1_000),
        )
        .await;
    assert!(out.timed_out);
    assert_eq!(out.exit_code, None);
    assert!(!out.stdout.contains("never"));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = pgrep(&format!("sleep {marker}"));
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn invalid_env_key_fails_without_running() {
    let Some(r) = ready().await else { return };
    let err =
        r.rt.execute(
            &r.env,
            &r.lease,
            &ExecuteRequest::shell("true").env("BAD-KEY", "x"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("Invalid SSH environment variable key: BAD-KEY")
    );
}

#[tokio::test]
async fn stdin_large_and_empty() {
    let Some(r) = ready().await else { return };
    let chunk = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkrLw==\n";
    let big: String = chunk.repeat((1 << 20) / chunk.len() + 1);
    let out = r.exec(ExecuteRequest::new("cat").stdin(big.clone())).await;
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), big.len());
    assert!(out.stdout == big);

    let start = Instant::now();
    let empty = r
        .exec(ExecuteRequest::new("cat").stdin("").timeout_ms(5_000))
        .await;
    assert_eq!((empty.exit_code, empty.stdout.as_str()), (Some(0), ""));
    let none = r.exec(ExecuteRequest::new("cat").timeout_ms(5_000)).await;
    assert_eq!((none.exit_code, none.timed_out), (Some(0), false));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn output_streams_while_running() {
    let Some(r) = ready().await else { return };
    struct Sink(std::sync::Mutex<Vec<Instant>>);
    impl paperclip_env_core::execute::OutputSink for Sink {
        fn on_output(&self, _s: paperclip_env_core::execute::OutputStream, _d: &[u8]) {
            self.0.lock().unwrap().push(Instant::now());
        }
    }
    let sink = Arc::new(Sink(std::sync::Mutex::new(Vec::new())));
    let start = Instant::now();
    let out =
        r.rt.execute_streaming(
            &r.env,
            &r.lease,
            &ExecuteRequest::shell("echo one; sleep 1; echo two"),
            sink.clone(),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "one\ntwo\n");
    let times = sink.0.lock().unwrap().clone();
    assert!(times.len() >= 2);
    assert!(
        times[0].duration_since(start) < Duration::from_millis(900),
        "first chunk arrived before the command finished"
    );
}

fn pgrep(pattern: &str) -> String {
    let out = std::process::Command::new("pgrep")
        .arg("-af")
        .arg(pattern)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn timeout_kills_the_remote_process_group() {
    let Some(r) = ready().await else { return };
    let marker = format!("3000.{}", std::process::id());
    let start = Instant::now();
    let out = r
        .exec(
            ExecuteRequest::shell(format!("sleep {marker} & sleep {marker}; echo never"))
                .timeout_ms(1_000),
        )
        .await;
    let took = start.elapsed();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, None);
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(!out.stdout.contains("never"));
    // Both sleeps (foreground and background) are gone.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = pgrep(&format!("sleep {marker}"));
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection is still usable.
    let again = r.exec(ExecuteRequest::shell("echo ok")).await;
    assert_eq!(again.stdout, "ok\n");
}

#[tokio::test]
async fn reconnects_after_the_connection_dropped() {
    let Some(srv) = server() else { return };
    let t = transport(
        &srv,
        HostKeyPolicy::Strict(KnownHosts::parse(&srv.known_hosts())),
    );
    let out = paperclip_env_core::execute::OutputCollector::buffered();
    let cmd = |s: &str| RemoteCommand {
        argv: vec!["sh".into(), "-c".into(), s.into()],
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    t.run(&cmd("echo first"), &out).await.unwrap();
    // Kill this connection's sshd session process: the TCP connection drops.
    let _ = t.run(&cmd("kill -9 $PPID"), &out).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out2 = paperclip_env_core::execute::OutputCollector::buffered();
    let exit = t.run(&cmd("echo second"), &out2).await.unwrap();
    assert_eq!(exit.exit_code, Some(0));
    assert_eq!(out2.finish(exit).stdout, "second\n");
}

// --- probe (checklist 27) ---------------------------------------------------

#[tokio::test]
async fn probe_reports_ok_and_failure_without_throwing() {
    let Some(srv) = server() else { return };
    let rt = runtime();
    let path = workspace(&srv);
    let ok = rt.probe(&env_of(config(&srv, &path))).await.unwrap();
    assert!(ok.ok);
    assert_eq!(
        ok.summary,
        format!(
            "Connected to {}@127.0.0.1 and verified the remote workspace path.",
            srv.user()
        )
    );
    assert_eq!(ok.details.as_ref().unwrap()["remoteCwd"], json!(path));

    // mkdir fails under a regular file.
    let file = srv.dir().join("plainfile");
    std::fs::write(&file, "x").unwrap();
    let bad = rt
        .probe(&env_of(config(&srv, &format!("{}/sub", file.display()))))
        .await
        .unwrap();
    assert!(!bad.ok);
    assert_eq!(
        bad.summary,
        format!("SSH probe failed for {}@127.0.0.1.", srv.user())
    );
    let d = bad.details.unwrap();
    assert!(
        d["error"].as_str().unwrap().contains("Not a directory"),
        "{d}"
    );
    assert_eq!(d["code"], json!(1));

    let other = sshd::generate_key(srv.dir(), "stranger").unwrap();
    let mut cfg = config(&srv, &path);
    cfg["privateKey"] = json!(other.private_key);
    let denied = rt.probe(&env_of(cfg)).await.unwrap();
    assert!(!denied.ok);
    assert!(
        denied.details.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("Permission denied")
    );
}

// --- secrets ------------------------------------------------------------------

#[tokio::test]
async fn private_key_never_leaks_and_secret_ref_resolves() {
    let Some(srv) = server() else { return };
    let secrets = Arc::new(InMemorySecretResolver::new());
    let key = srv.client_key().private_key.clone();
    let id = secrets.insert(key.clone());
    let driver = Arc::new(SshDriver::new());
    let rt = EnvironmentRuntime::builder()
        .driver(driver.clone())
        .secrets(secrets)
        .build();
    let mut cfg = config(&srv, &workspace(&srv));
    cfg.as_object_mut().unwrap().remove("privateKey");
    cfg["privateKeySecretRef"] = json!({"type": "secret_ref", "secretId": id, "version": "latest"});
    let env = env_of(cfg);
    let lease = acquire(&rt, &env).await;
    let body = key.lines().nth(1).expect("key body line").to_owned();
    let md = serde_json::to_string(&lease.metadata).unwrap();
    assert!(!md.contains(&body));
    assert!(!format!("{lease:?}").contains(&body));
    assert!(!format!("{driver:?}").contains(&body));
    let out = rt
        .execute(&env, &lease, &ExecuteRequest::shell("echo hi"))
        .await
        .unwrap();
    assert_eq!(out.stdout, "hi\n");

    // Errors (wrong host key, bad key text) never show the key.
    let mut wrong = config(&srv, &workspace(&srv));
    wrong["knownHosts"] = json!("nothing-here ssh-ed25519 AAAA");
    let err = rt
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(wrong)))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains(&body) && !format!("{err:?}").contains(&body));
    let mut garbage = config(&srv, &workspace(&srv));
    garbage["privateKey"] = json!(format!("{}SECRET-MATERIAL", &key[..key.len() / 2]));
    let err = rt
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(garbage)))
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(&body) && !shown.contains("SECRET-MATERIAL"),
        "{shown}"
    );
}

// --- native workspace transfer ----------------------------------------------

#[tokio::test]
async fn native_tar_transfer_round_trips_a_tree() {
    let Some(srv) = server() else { return };
    let t = transport(
        &srv,
        HostKeyPolicy::Strict(KnownHosts::parse(&srv.known_hosts())),
    );
    let src = srv.dir().join("src tree");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::fs::write(src.join("with space.txt"), "hello").unwrap();
    std::fs::write(src.join("it's \"quoted\""), "q").unwrap();
    std::fs::write(src.join(".dotfile"), "dot").unwrap();
    std::fs::write(
        src.join("nested/deeper/bin"),
        (0u8..=255).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("nested/deeper/bin", src.join("link")).unwrap();
    let remote = srv.dir().join("remote ws/inner").display().to_string();
    t.upload_dir(&src, &remote, Duration::from_secs(30))
        .await
        .unwrap();
    let back = srv.dir().join("back");
    t.download_dir(&remote, &back, Duration::from_secs(30))
        .await
        .unwrap();
    for tree in [std::path::PathBuf::from(&remote), back.clone()] {
        let status = std::process::Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&tree)
            .status()
            .unwrap();
        assert!(status.success(), "{} differs", tree.display());
    }
    assert!(
        std::fs::symlink_metadata(back.join("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // Single files, binary-safe, both ways.
    let remote_file = format!("{remote}/copied.bin");
    t.put_file(
        &src.join("nested/deeper/bin"),
        &remote_file,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let local_copy = srv.dir().join("got.bin");
    t.get_file(&remote_file, &local_copy, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&local_copy).unwrap(),
        (0u8..=255).collect::<Vec<_>>()
    );
    let missing = t
        .get_file("/definitely/not/here", &local_copy, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("get_file failed"), "{missing}");
}

#[tokio::test]
async fn output_cap_kills_the_command_with_a_distinct_error() {
    let Some(srv) = server() else { return };
    let t = transport(
        &srv,
        HostKeyPolicy::Strict(KnownHosts::parse(&srv.known_hosts())),
    );
    let marker = format!("4000.{}", std::process::id());
    let out = paperclip_env_core::execute::OutputCollector::buffered();
    let err = t
        .run(
            &RemoteCommand {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("head -c 2000000 /dev/zero; sleep {marker}"),
                ],
                timeout: Some(Duration::from_secs(20)),
                max_output_bytes: Some(1 << 20),
                ..Default::default()
            },
            &out,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::OutputLimit { limit } if limit == 1 << 20));
    assert_eq!(
        err.to_string(),
        "Process output exceeded maxBuffer of 1048576 bytes."
    );
    let kept = out.finish(Default::default());
    assert_eq!(kept.stdout.len(), 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !pgrep(&format!("sleep {marker}")).is_empty() {
        assert!(Instant::now() < deadline, "command survived the output cap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stalled_server_times_out_after_the_default_ten_seconds() {
    if !sshd::available() {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let key = sshd::generate_key(dir.path(), "k").unwrap();
    let cfg = json!({"host": "127.0.0.1", "port": port, "username": "u",
        "remoteWorkspacePath": "/w", "privateKey": key.private_key, "strictHostKeyChecking": false});
    let start = Instant::now();
    let probe = runtime().probe(&env_of(cfg)).await.unwrap();
    let took = start.elapsed();
    hold.abort();
    assert!(!probe.ok);
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(12),
        "{took:?}"
    );
    let d = probe.details.unwrap();
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("Connection timed out"),
        "{d}"
    );
    assert_eq!(d["code"], json!(255));
}

#[tokio::test]
async fn persistence_moves_a_pasted_key_into_a_secret_and_runtime_resolves_it() {
    use paperclip_env_core::driver::ConfigPurpose;
    let Some(srv) = server() else { return };
    let secrets = Arc::new(InMemorySecretResolver::new());
    let rt = EnvironmentRuntime::builder()
        .driver(Arc::new(SshDriver::new()))
        .secrets(secrets)
        .build();
    let input = config(&srv, &workspace(&srv));
    // Stored shape refuses a plaintext key.
    let err = rt
        .acquire_run_lease(AcquireRunLease::ad_hoc(env_of(json!({
            "host": "h", "username": "u", "remoteWorkspacePath": "/w", "privateKey": 5
        }))))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { ref field, .. } if field == "privateKey"));

    let probe_cfg = rt
        .normalize_config("ssh", "My Box", &input, ConfigPurpose::Probe)
        .await
        .unwrap();
    assert_eq!(
        probe_cfg["privateKey"].as_str(),
        input["privateKey"].as_str().map(str::trim)
    );

    let stored = rt
        .normalize_config("ssh", "My Box", &input, ConfigPurpose::Persistence)
        .await
        .unwrap();
    assert_eq!(stored["privateKey"], Value::Null);
    assert_eq!(stored["privateKeySecretRef"]["type"], json!("secret_ref"));
    assert_eq!(stored["privateKeySecretRef"]["version"], json!("latest"));
    assert!(!stored.to_string().contains("PRIVATE KEY"));
    // The stored config works at run time (secret resolved back into the key).
    let lease = acquire(&rt, &env_of(stored)).await;
    assert!(lease.provider_lease_id.unwrap().starts_with("ssh://"));
}

#[tokio::test]
async fn transport_debug_redacts_the_key() {
    let Some(srv) = server() else { return };
    let t = transport(
        &srv,
        HostKeyPolicy::Strict(KnownHosts::parse(&srv.known_hosts())),
    );
    let body = srv
        .client_key()
        .private_key
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    let shown = format!("{t:?}");
    assert!(
        shown.contains("REDACTED") && !shown.contains(&body),
        "{shown}"
    );
}

#[tokio::test]
async fn profiles_are_sourced_silently_and_env_wins() {
    let Some(r) = ready().await else { return };
    let home = r.srv.home();
    let out = r.exec(ExecuteRequest::shell("printf %s \"$HOME\"")).await;
    assert_eq!(
        out.stdout,
        home.display().to_string(),
        "fixture HOME applies"
    );
    std::fs::write(
        home.join(".profile"),
        "echo PROFILE-NOISE\necho PROFILE-ERR >&2\nexport FROM_PROFILE=yes\nexport OVERRIDE=from-profile\n",
    )
    .unwrap();
    let out = r
        .exec(
            ExecuteRequest::shell("printf '%s|%s' \"$FROM_PROFILE\" \"$OVERRIDE\"")
                .env("OVERRIDE", "from-env"),
        )
        .await;
    assert_eq!(out.stdout, "yes|from-env");
    assert_eq!(out.stderr, "");
    let plain = r
        .exec(ExecuteRequest::shell("printf %s \"$OVERRIDE\""))
        .await;
    assert_eq!(plain.stdout, "from-profile");
}

/// Runs `sleep` remotely, freezes (SIGSTOP) the server's session process
/// once it started, and returns what `run` reported and how long it took.
async fn run_against_frozen_server(
    keepalive: Option<Duration>,
    timeout: Duration,
) -> Option<(
    Result<paperclip_env_core::execute::CommandExit, SshError>,
    Duration,
)> {
    let srv = server()?;
    let t = SshTransport::builder(srv.host(), srv.user())
        .port(srv.port())
        .auth(SshAuth::PrivateKey(
            srv.client_key().private_key.clone().into(),
        ))
        .host_key_policy(HostKeyPolicy::Strict(KnownHosts::parse(&srv.known_hosts())))
        .keepalive_interval(keepalive)
        .build();
    let marker = format!("5000.{}", std::process::id());
    let ppid_file = srv.dir().join("session.ppid");
    let script = format!("echo $PPID > '{}'; sleep {marker}", ppid_file.display());
    let run = async {
        let out = paperclip_env_core::execute::OutputCollector::buffered();
        t.run(
            &RemoteCommand {
                argv: vec!["sh".into(), "-c".into(), script],
                timeout: Some(timeout),
                ..Default::default()
            },
            &out,
        )
        .await
    };
    let freeze = async {
        let deadline = Instant::now() + Duration::from_secs(5);
        let ppid = loop {
            if let Some(p) = std::fs::read_to_string(&ppid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "command did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        std::process::Command::new("kill")
            .args(["-STOP", &ppid.to_string()])
            .status()
            .unwrap();
        ppid
    };
    let start = Instant::now();
    let (result, ppid) = tokio::join!(run, freeze);
    let took = start.elapsed();
    // Clean up: thaw and end the session and the sleep.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &ppid.to_string()])
        .status();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &ppid.to_string()])
        .status();
    for line in pgrep(&format!("sleep {marker}")).lines() {
        if let Some(pid) = line.split_whitespace().next() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
    }
    Some((result, took))
}

#[tokio::test]
async fn keepalives_detect_a_frozen_server_during_a_command() {
    let Some((result, took)) =
        run_against_frozen_server(Some(Duration::from_millis(300)), Duration::from_secs(30)).await
    else {
        return;
    };
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            SshError::Transport {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn timeout_is_bounded_even_when_the_server_hangs() {
    let Some((result, took)) = run_against_frozen_server(None, Duration::from_secs(2)).await else {
        return;
    };
    assert!(result.unwrap().timed_out);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_sync_travels_over_the_ssh_channel() {
    use paperclip_env_core::workspace::{SyncOptions, TransferMethod, WorkspaceSync};
    let Some(r) = ready().await else { return };
    let remote = r.lease.remote_cwd().expect("remoteCwd").to_owned();
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(local.path().join("a/b")).unwrap();
    std::fs::write(local.path().join("a/b/file.txt"), "over ssh\n").unwrap();
    let sync = WorkspaceSync::for_lease(&r.rt, &r.env, &r.lease)
        .await
        .unwrap();
    let up = sync
        .upload(local.path(), &remote, &SyncOptions::default())
        .await
        .unwrap();
    assert_eq!(up.method, TransferMethod::Native("ssh".into()));
    let cat = r
        .exec(
            ExecuteRequest::new("cat")
                .arg("a/b/file.txt")
                .cwd(remote.clone()),
        )
        .await;
    assert_eq!(cat.stdout, "over ssh\n");
    r.exec(
        ExecuteRequest::new("sh")
            .arg("-c")
            .arg("printf back > a/b/file.txt")
            .cwd(remote.clone()),
    )
    .await;
    let down = sync
        .download(
            &remote,
            local.path(),
            Some(&up.baseline),
            &SyncOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(down.method, TransferMethod::Native("ssh".into()));
    assert_eq!(
        std::fs::read_to_string(local.path().join("a/b/file.txt")).unwrap(),
        "back"
    );
}
