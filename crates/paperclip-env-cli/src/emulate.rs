//! `paperclip-env emulate <provider>`: one of the testkit's protocol
//! emulators served standalone on 127.0.0.1, for the vendors' own clients and
//! for users testing their agent code offline.
//!
//! It prints exactly one JSON line on stdout once the emulator listens:
//!
//! ```text
//! {"provider":"e2b","urls":{…},"credentials":{…},"env":{…},"config":{…}}
//! ```
//!
//! `env` holds the variables the vendor SDK and our own provider read;
//! `config` is a Paperclip environment config for our provider. The process
//! runs until SIGINT or SIGTERM, then stops the emulator (which kills every
//! sandbox process it started) and removes every file it wrote.
//!
//! The keys per provider (`U` the served URL, secrets random unless
//! `--api-key`):
//!
//! | provider | `urls` | `credentials` | `env` |
//! | --- | --- | --- | --- |
//! | `e2b` | `api`, `sandbox` (both `U`) | `apiKey` (`e2b_…`) | `E2B_API_URL`, `E2B_SANDBOX_URL`, `E2B_API_KEY` |
//! | `novita` | `api`, `sandbox` | `apiKey` (`sk_…`) | `NOVITA_API_URL`, `NOVITA_SANDBOX_URL`, `NOVITA_API_KEY` |
//! | `daytona` | `api`, `toolbox` (`U/toolbox`) | `apiKey` | `DAYTONA_API_URL`, `DAYTONA_API_KEY`, `DAYTONA_TARGET` |
//! | `cloudflare` | `bridge` | `bridgeAuthToken` | none (the bridge has no env fallback; use `config`) |
//! | `modal` | `server` (h2c) | `tokenId`, `tokenSecret` | `MODAL_SERVER_URL`, `MODAL_TOKEN_ID`, `MODAL_TOKEN_SECRET` |
//! | `kubernetes` | `api` (`https://` with `--tls`) | `token`, `caFile` (with `--tls`) | `KUBECONFIG` (+ `SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS` with `--tls`) |
//! | `exe-dev` | `api` (`U/exec`), `ssh` | `apiKey`, `sshUser`, `sshPrivateKeyFile`, `knownHostsFile` (the last three when OpenSSH is installed) | `EXE_API_KEY` |

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::ValueEnum;
use paperclip_env_core::Error;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use paperclip_env_testkit::emulators;

/// The services `emulate` can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum EmulatedProvider {
    /// E2B: control plane and envd (Connect-RPC) on one port.
    E2b,
    /// Novita Agent Sandbox: the E2B protocol with Novita's profile.
    Novita,
    /// Daytona: REST API and toolbox.
    Daytona,
    /// The Paperclip Cloudflare bridge Worker.
    Cloudflare,
    /// Modal's gRPC API (h2c; with `--tls`, HTTP/2 over TLS).
    Modal,
    /// A Kubernetes API server (kubeconfig written to a temp file).
    Kubernetes,
    /// exe.dev's HTTPS API, with a throwaway sshd for the VMs when
    /// OpenSSH is installed.
    ExeDev,
}

/// Options of `paperclip-env emulate`.
#[derive(Debug, Clone)]
pub(crate) struct EmulateOptions {
    pub(crate) provider: EmulatedProvider,
    pub(crate) port: u16,
    pub(crate) tls: bool,
    pub(crate) api_key: Option<String>,
    pub(crate) v1_only: bool,
}

/// Everything one running emulator owns; dropping it stops the emulator,
/// kills its processes and removes its files.
struct Running {
    /// The emulator itself, type-erased (its `Drop` does the cleanup).
    _emulator: Box<dyn std::any::Any + Send>,
    /// The sshd fixture of exe-dev.
    _sshd: Option<paperclip_env_testkit::fixtures::sshd::SshServer>,
    /// Files written for clients (kubeconfig, CA bundle).
    _files: Option<tempfile::TempDir>,
    /// The `--port` forwarder, if any.
    forwarder: Option<tokio::task::JoinHandle<()>>,
    /// The JSON line.
    line: Value,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.abort();
        }
    }
}

fn io_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid_field("emulate", format!("{what}: {e}"))
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Binds `127.0.0.1:<port>` and forwards every connection to `target`, so a
/// fixed `--port` works for emulators that pick their own port.
async fn forward(
    port: u16,
    target: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| io_error(&format!("cannot bind 127.0.0.1:{port}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| io_error("listener address", e))?;
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            connections.spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
            while connections.try_join_next().is_some() {}
        }
    });
    Ok((addr, task))
}

/// The address behind an `http(s)://host:port[/path]` URL.
fn addr_of(url: &str) -> Result<SocketAddr, Error> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .parse()
        .map_err(|e| io_error(&format!("emulator URL {url}"), e))
}

/// `url` with its port replaced by `addr`'s.
fn with_addr(url: &str, addr: SocketAddr) -> Result<String, Error> {
    let old = addr_of(url)?;
    Ok(url.replacen(&old.to_string(), &addr.to_string(), 1))
}

/// Serves the emulator's listener on `--port` when one was asked for.
async fn public_url(
    url: String,
    port: u16,
) -> Result<(String, Option<tokio::task::JoinHandle<()>>), Error> {
    if port == 0 {
        return Ok((url, None));
    }
    let (addr, task) = forward(port, addr_of(&url)?).await?;
    Ok((with_addr(&url, addr)?, Some(task)))
}

fn client_files() -> Result<tempfile::TempDir, Error> {
    tempfile::Builder::new()
        .prefix("paperclip-env-emulate-")
        .tempdir()
        .map_err(|e| io_error("temp dir", e))
}

fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> Result<PathBuf, Error> {
    let path = dir.path().join(name);
    std::fs::write(&path, text).map_err(|e| io_error(&format!("writing {name}"), e))?;
    Ok(path)
}

async fn start(options: &EmulateOptions) -> Result<Running, Error> {
    let key = |prefix: &str| {
        options
            .api_key
            .clone()
            .unwrap_or_else(|| format!("{prefix}{}", random_hex()))
    };
    if options.tls && options.provider != EmulatedProvider::Kubernetes {
        return Err(Error::invalid_field(
            "tls",
            format!(
                "--tls is served for kubernetes only; {:?} clients accept plain HTTP on 127.0.0.1",
                options.provider
            ),
        ));
    }
    let e2b_like = matches!(
        options.provider,
        EmulatedProvider::E2b | EmulatedProvider::Novita
    );
    if options.v1_only && !e2b_like {
        return Err(Error::invalid_field(
            "v1-only",
            "--v1-only applies to e2b and novita only",
        ));
    }
    let start_error = |e: std::io::Error| io_error("starting the emulator", e);
    match options.provider {
        EmulatedProvider::E2b | EmulatedProvider::Novita => {
            let novita = options.provider == EmulatedProvider::Novita;
            let profile = if novita {
                emulators::e2b::Profile::Novita
            } else {
                emulators::e2b::Profile::E2b
            };
            let api_key = key(if novita { "sk_" } else { "e2b_" });
            let emulator = emulators::e2b::E2bEmulator::start_with(emulators::e2b::E2bOptions {
                profile,
                api_key: api_key.clone(),
                api: if options.v1_only {
                    emulators::e2b::ApiVersions::V1Only
                } else {
                    emulators::e2b::ApiVersions::V1AndV2
                },
            })
            .await
            .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let (name, prefix) = if novita {
                ("novita", "NOVITA")
            } else {
                ("e2b", "E2B")
            };
            let mut env = serde_json::Map::new();
            env.insert(format!("{prefix}_API_URL"), json!(url));
            env.insert(format!("{prefix}_SANDBOX_URL"), json!(url));
            env.insert(format!("{prefix}_API_KEY"), json!(api_key));
            let line = json!({
                "provider": name,
                "urls": {"api": url, "sandbox": url},
                "credentials": {"apiKey": api_key},
                "env": env,
                "config": {"provider": name, "apiKey": api_key, "template": "base"},
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: None,
                _files: None,
                forwarder,
                line,
            })
        }
        EmulatedProvider::Daytona => {
            let api_key = key("dtn_");
            let emulator = emulators::daytona::DaytonaEmulator::start(&api_key)
                .await
                .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let line = json!({
                "provider": "daytona",
                "urls": {"api": url, "toolbox": format!("{url}/toolbox")},
                "credentials": {"apiKey": api_key},
                "env": {"DAYTONA_API_URL": url, "DAYTONA_API_KEY": api_key, "DAYTONA_TARGET": "us"},
                "config": {"provider": "daytona", "apiKey": api_key, "apiUrl": url},
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: None,
                _files: None,
                forwarder,
                line,
            })
        }
        EmulatedProvider::Cloudflare => {
            let token = key("cf_");
            let emulator = emulators::cloudflare_bridge::BridgeEmulator::start(&token)
                .await
                .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let line = json!({
                "provider": "cloudflare",
                "urls": {"bridge": url},
                "credentials": {"bridgeAuthToken": token},
                "env": {},
                "config": {"provider": "cloudflare", "bridgeBaseUrl": url, "bridgeAuthToken": token},
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: None,
                _files: None,
                forwarder,
                line,
            })
        }
        EmulatedProvider::Modal => {
            let token_id = format!("ak-{}", random_hex());
            let token_secret = key("as-");
            let emulator = emulators::modal::ModalEmulator::start(&token_id, &token_secret)
                .await
                .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let line = json!({
                "provider": "modal",
                "urls": {"server": url},
                "credentials": {"tokenId": token_id, "tokenSecret": token_secret},
                "env": {"MODAL_SERVER_URL": url, "MODAL_TOKEN_ID": token_id, "MODAL_TOKEN_SECRET": token_secret},
                "config": {"provider": "modal", "tokenId": token_id, "tokenSecret": token_secret,
                    "appName": "paperclip-emulate", "image": "python:3.12-slim"},
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: None,
                _files: None,
                forwarder,
                line,
            })
        }
        EmulatedProvider::Kubernetes => {
            let token = key("emulator-token-");
            let emulator = emulators::kubernetes::KubeEmulator::start_with(
                emulators::kubernetes::KubeEmulatorOptions {
                    token: token.clone(),
                    tls: options.tls,
                    ..Default::default()
                },
            )
            .await
            .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let files = client_files()?;
            let kubeconfig = emulator.kubeconfig_yaml().replace(&emulator.url(), &url);
            let kubeconfig_path = write_file(&files, "kubeconfig", &kubeconfig)?;
            let mut credentials = json!({"token": token});
            let mut env = json!({"KUBECONFIG": kubeconfig_path});
            if let Some(pem) = emulator.ca_pem() {
                let ca = write_file(&files, "ca.pem", pem)?;
                credentials["caFile"] = json!(ca);
                env["SSL_CERT_FILE"] = json!(ca);
                env["NODE_EXTRA_CA_CERTS"] = json!(ca);
            }
            let line = json!({
                "provider": "kubernetes",
                "urls": {"api": url},
                "credentials": credentials,
                "env": env,
                "config": {"provider": "kubernetes", "kubeconfig": kubeconfig},
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: None,
                _files: Some(files),
                forwarder,
                line,
            })
        }
        EmulatedProvider::ExeDev => {
            let api_key = key("exe_");
            let sshd = if paperclip_env_testkit::fixtures::sshd::available() {
                Some(
                    paperclip_env_testkit::fixtures::sshd::SshServer::start()
                        .map_err(|e| io_error("starting sshd for the VMs", e))?,
                )
            } else {
                None
            };
            let (ssh_host, ssh_port) = sshd
                .as_ref()
                .map(|s| (s.host().to_owned(), s.port()))
                .unwrap_or_else(|| ("127.0.0.1".to_owned(), 22));
            let emulator = emulators::exe_dev::ExeDevEmulator::start(&api_key, &ssh_host, ssh_port)
                .await
                .map_err(start_error)?;
            let (url, forwarder) = public_url(emulator.url(), options.port).await?;
            let mut credentials = json!({"apiKey": api_key});
            let mut config = json!({"provider": "exe-dev", "apiKey": api_key, "apiUrl": url,
                "sshPort": ssh_port});
            let mut files = None;
            if let Some(server) = &sshd {
                let dir = client_files()?;
                let known_hosts = write_file(&dir, "known_hosts", &server.known_hosts())?;
                credentials["sshUser"] = json!(server.user());
                credentials["sshPrivateKeyFile"] = json!(server.client_key().private_key_path);
                credentials["knownHostsFile"] = json!(known_hosts);
                config["sshUser"] = json!(server.user());
                config["sshIdentityFile"] = json!(server.client_key().private_key_path);
                config["strictHostKeyChecking"] = json!("no");
                files = Some(dir);
            }
            let line = json!({
                "provider": "exe-dev",
                "urls": {"api": url, "ssh": format!("ssh://{ssh_host}:{ssh_port}")},
                "credentials": credentials,
                "env": {"EXE_API_KEY": api_key},
                "config": config,
            });
            Ok(Running {
                _emulator: Box::new(emulator),
                _sshd: sshd,
                _files: files,
                forwarder,
                line,
            })
        }
    }
}

/// Runs `emulate` until SIGINT or SIGTERM; everything it made is gone when
/// this returns.
pub(crate) async fn run(options: EmulateOptions) -> Result<(), Error> {
    use std::io::Write;
    use tokio::signal::unix::{SignalKind, signal};

    // Install the handlers first: a signal right after the JSON line must
    // still reach the cleanup below.
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| io_error("SIGTERM handler", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| io_error("SIGINT handler", e))?;
    let running = start(&options).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", running.line).map_err(|e| io_error("stdout", e))?;
        out.flush().map_err(|e| io_error("stdout", e))?;
    }
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    drop(running);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_to_the_forwarded_port() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            with_addr("http://127.0.0.1:1234/exec", addr).unwrap(),
            "http://127.0.0.1:4000/exec"
        );
        assert_eq!(addr_of("https://127.0.0.1:99").unwrap().port(), 99);
        assert!(addr_of("http://localhost:99").is_err());
    }
}
