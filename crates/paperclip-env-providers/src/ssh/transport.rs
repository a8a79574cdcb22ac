//! A reusable SSH transport over russh: connect, authenticate, verify the
//! host key, run commands with streaming output, exit codes, signals and
//! timeouts that kill the remote process group (spec 27 §2–§4).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paperclip_env_core::execute::{CommandExit, OutputCollector};
use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use secrecy::{ExposeSecret, SecretString};

use super::host_keys::{HostKeyPolicy, HostKeyRejection, lookup_name};

/// Connect + handshake + auth budget (`ConnectTimeout=10`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default command timeout (`runSshCommand`, 15 s).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// Default keepalive interval.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// First stderr line of every tracked command: the remote shell's pid, which
/// is also its process group (sshd makes each session child a session leader).
const PGID_MARKER: &str = "__paperclip_ssh_pgid__:";

/// An SSH failure, before conversion into the SDK's [`paperclip_env_core::Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// An env key is not a shell identifier; nothing was sent.
    #[error("Invalid SSH environment variable key: {0}")]
    InvalidEnvKey(String),
    /// The private key could not be loaded (the key itself is never shown).
    #[error("SSH private key could not be loaded: {0}")]
    InvalidKey(String),
    /// The TCP connection was refused.
    #[error("ssh: connect to host {host} port {port}: Connection refused")]
    ConnectionRefused {
        /// Host dialed.
        host: String,
        /// Port dialed.
        port: u16,
    },
    /// TCP connect, handshake and authentication did not finish in time.
    #[error("ssh: connect to host {host} port {port}: Connection timed out")]
    ConnectTimeout {
        /// Host dialed.
        host: String,
        /// Port dialed.
        port: u16,
        /// The budget that elapsed.
        after: Duration,
    },
    /// The server's host key was not accepted.
    #[error("Host key verification failed for {name}: {}", describe(.reason))]
    HostKey {
        /// The known-hosts lookup name (`host` or `[host]:port`).
        name: String,
        /// Why.
        reason: HostKeyRejection,
        /// SHA256 fingerprint of the offered key.
        fingerprint: String,
    },
    /// The server rejected our key (`Permission denied (publickey).`).
    #[error("{user}@{host}: Permission denied (publickey).")]
    AuthFailed {
        /// Login user.
        user: String,
        /// Host.
        host: String,
    },
    /// A stream exceeded the command's output cap; the command was killed.
    #[error("Process output exceeded maxBuffer of {limit} bytes.")]
    OutputLimit {
        /// The per-stream cap.
        limit: usize,
    },
    /// Any other transport failure.
    #[error("ssh {host}:{port}: {message}")]
    Transport {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// What failed.
        message: String,
        /// Whether a retry may help (false once a command may have started).
        retryable: bool,
    },
}

fn describe(reason: &HostKeyRejection) -> &'static str {
    match reason {
        HostKeyRejection::UnknownHost => "no matching known_hosts entry (unknown host)",
        HostKeyRejection::Mismatch => "the offered key does not match known_hosts (key mismatch)",
        HostKeyRejection::Revoked => "the offered key is marked @revoked",
    }
}

impl From<SshError> for paperclip_env_core::Error {
    fn from(e: SshError) -> Self {
        use paperclip_env_core::Error;
        let message = e.to_string();
        match e {
            SshError::InvalidEnvKey(_) => Error::InvalidInput {
                what: "env",
                message,
            },
            SshError::InvalidKey(_) | SshError::AuthFailed { .. } => Error::Unauthenticated {
                message,
                source: Some(Box::new(e)),
            },
            SshError::HostKey {
                ref name,
                ref reason,
                ..
            } => Error::HostKeyRejected {
                host: name.clone(),
                problem: match reason {
                    HostKeyRejection::UnknownHost => {
                        paperclip_env_core::HostKeyProblem::UnknownHost
                    }
                    HostKeyRejection::Mismatch => paperclip_env_core::HostKeyProblem::Mismatch,
                    HostKeyRejection::Revoked => paperclip_env_core::HostKeyProblem::Revoked,
                },
                message,
                source: Some(Box::new(e)),
            },
            SshError::ConnectTimeout {
                ref host,
                port,
                after,
            } => Error::Timeout {
                operation: format!("SSH connect to {host}:{port}"),
                after,
            },
            SshError::ConnectionRefused { .. } => {
                Error::provider_with_source("ssh", message, true, e)
            }
            SshError::OutputLimit { .. } => Error::provider_with_source("ssh", message, false, e),
            SshError::Transport { retryable, .. } => {
                Error::provider_with_source("ssh", message, retryable, e)
            }
        }
    }
}

/// How the client authenticates (publickey only; never password or
/// keyboard-interactive, like OpenSSH with `BatchMode=yes`).
#[derive(Clone)]
pub enum SshAuth {
    /// An unencrypted private key in OpenSSH/PEM text, kept in memory.
    PrivateKey(SecretString),
    /// An absolute path of an unencrypted private key file.
    IdentityFile(PathBuf),
    /// The process user's default identity files (`~/.ssh/id_ed25519`,
    /// `id_ecdsa`, `id_rsa`), tried in that order. `ssh-agent` is not used.
    DefaultIdentities,
}

impl std::fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshAuth::PrivateKey(_) => f.write_str("PrivateKey([REDACTED])"),
            SshAuth::IdentityFile(p) => f.debug_tuple("IdentityFile").field(p).finish(),
            SshAuth::DefaultIdentities => f.write_str("DefaultIdentities"),
        }
    }
}

/// Builder of an [`SshTransport`].
#[derive(Debug, Clone)]
pub struct SshTransportBuilder {
    host: String,
    port: u16,
    username: String,
    auth: SshAuth,
    policy: HostKeyPolicy,
    connect_timeout: Duration,
    keepalive_interval: Option<Duration>,
}

impl SshTransportBuilder {
    /// TCP port (default 22).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Authentication (default [`SshAuth::DefaultIdentities`]).
    pub fn auth(mut self, auth: SshAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Host-key policy (default: strict against the user's known_hosts files).
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Budget of connect + handshake + auth (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Keepalive interval (default 15 s; `None` disables keepalives).
    pub fn keepalive_interval(mut self, interval: Option<Duration>) -> Self {
        self.keepalive_interval = interval;
        self
    }

    /// Builds the transport; it connects lazily on first use.
    pub fn build(self) -> SshTransport {
        SshTransport {
            settings: Arc::new(self),
            conn: tokio::sync::Mutex::new(None),
        }
    }
}

/// One command to run remotely (argv form; spec 27 §4.3–§4.4).
#[derive(Clone, Default)]
pub struct RemoteCommand {
    /// Program and arguments; each word is single-quoted, so argv arrives exactly.
    pub argv: Vec<String>,
    /// Directory to `cd` into first (the command fails if it does not exist).
    pub cwd: Option<String>,
    /// Environment added on top of the login environment (wins over profiles).
    pub env: BTreeMap<String, String>,
    /// Bytes written to stdin before EOF; `None` sends EOF at once.
    pub stdin: Option<Vec<u8>>,
    /// Timeout; on expiry the remote process group is killed.
    pub timeout: Option<Duration>,
    /// Per-stream output cap; exceeding it kills the remote process group
    /// and fails with [`SshError::OutputLimit`] (`None`: unlimited).
    pub max_output_bytes: Option<usize>,
}

impl std::fmt::Debug for RemoteCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCommand")
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("stdin", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("max_output_bytes", &self.max_output_bytes)
            .finish()
    }
}

/// What is written to a command's stdin before EOF.
enum StdinSource {
    None,
    Bytes(Vec<u8>),
    Reader(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
}

fn stdin_of(cmd: &RemoteCommand) -> StdinSource {
    match &cmd.stdin {
        Some(bytes) => StdinSource::Bytes(bytes.clone()),
        None => StdinSource::None,
    }
}

/// An output sink that appends stdout to a file (binary-safe) and keeps stderr.
struct FileSink {
    file: Mutex<std::fs::File>,
    stderr: Mutex<Vec<u8>>,
    failed: Mutex<Option<std::io::Error>>,
}

impl paperclip_env_core::execute::OutputSink for FileSink {
    fn on_output(&self, stream: paperclip_env_core::execute::OutputStream, data: &[u8]) {
        use std::io::Write;
        match stream {
            paperclip_env_core::execute::OutputStream::Stdout => {
                if let Ok(mut f) = self.file.lock()
                    && let Err(e) = f.write_all(data)
                    && let Ok(mut slot) = self.failed.lock()
                {
                    *slot = Some(e);
                }
            }
            paperclip_env_core::execute::OutputStream::Stderr => {
                if let Ok(mut buf) = self.stderr.lock() {
                    buf.extend_from_slice(data);
                }
            }
        }
    }
}

/// POSIX single-quoting: `'` becomes `'\''` (spec 27 §4.1).
pub use paperclip_env_core::provider::support::shell_quote;
/// Whether `key` is a valid env name (`^[A-Za-z_][A-Za-z0-9_]*$`).
pub use paperclip_env_core::provider::support::valid_env_key;

const PROFILE_LINES: [&str; 3] = [
    r#"if [ -f "$HOME/.profile" ]; then . "$HOME/.profile" >/dev/null 2>&1 || true; fi"#,
    r#"if [ -f "$HOME/.bash_profile" ]; then . "$HOME/.bash_profile" >/dev/null 2>&1 || true; fi"#,
    r#"if [ -f "$HOME/.zprofile" ]; then . "$HOME/.zprofile" >/dev/null 2>&1 || true; fi"#,
];

/// The remote script of spec 27 §4.3: profiles, then `exec [env K=V…] sh -c <command>`.
fn remote_script(remote_command: &str, env: &BTreeMap<String, String>) -> String {
    let mut lines = vec!["#!/bin/sh".to_owned()];
    lines.extend(PROFILE_LINES.iter().map(|l| (*l).to_owned()));
    let env_words: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={}", shell_quote(v)))
        .collect();
    if env_words.is_empty() {
        lines.push(format!("exec sh -c {}", shell_quote(remote_command)));
    } else {
        lines.push(format!(
            "exec env {} sh -c {}",
            env_words.join(" "),
            shell_quote(remote_command)
        ));
    }
    lines.join("\n")
}

/// `cd '<cwd>' && exec 'cmd' 'arg'…`; argv is never unwrapped into `sh -c`
/// (fixes spec 27 G4: `bash -c` scripts run under bash with all their args).
fn remote_command_line(cmd: &RemoteCommand) -> String {
    let exec = format!(
        "exec {}",
        cmd.argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    match &cmd.cwd {
        Some(cwd) => format!("cd {} && {exec}", shell_quote(cwd)),
        None => exec,
    }
}

/// The remote side of a script sent over stdin: `sh` reads lines up to a
/// random end line and `eval`s them, then the command inherits the rest of
/// stdin. The shell's `read` consumes a pipe byte by byte (POSIX), so not one
/// byte of the command's own stdin is lost. A stream that ends before the end
/// line runs nothing (exit 125). Returns the exec string's `sh -c` body and
/// the bytes to write to stdin (script, end line, then `stdin`).
fn stdin_script_reader(script: &str, stdin: Option<&[u8]>) -> (String, Vec<u8>) {
    let end = loop {
        let candidate = format!(
            "__paperclip_ssh_script_end_{}__",
            uuid::Uuid::new_v4().simple()
        );
        if !script.contains(&candidate) {
            break candidate;
        }
    };
    let reader = format!(
        "__pc_s=; __pc_ok=; while IFS= read -r __pc_l; do if [ \"$__pc_l\" = {end} ]; then __pc_ok=1; break; fi; __pc_s=\"$__pc_s$__pc_l\n\"; done; [ -n \"$__pc_ok\" ] || exit 125; unset __pc_l __pc_ok; eval \"$__pc_s\""
    );
    let mut bytes = Vec::with_capacity(script.len() + end.len() + 2 + stdin.map_or(0, <[u8]>::len));
    // The buffered script holds env values: drop it before anything runs.
    bytes.extend_from_slice(b"unset __pc_s\n");
    bytes.extend_from_slice(script.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(end.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(stdin.unwrap_or_default());
    (reader, bytes)
}

struct ClientHandler {
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    rejection: Arc<Mutex<Option<SshError>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let name = lookup_name(&self.host, self.port);
        let outcome = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self
                .policy
                .check(&self.host, self.port, key)
                .map_err(|reason| SshError::HostKey {
                    name,
                    reason,
                    fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
                }),
            PublicKeyOrCertificate::Certificate(_) => match self.policy {
                HostKeyPolicy::AcceptAny => Ok(()),
                HostKeyPolicy::Strict(_) => Err(SshError::HostKey {
                    name,
                    reason: HostKeyRejection::UnknownHost,
                    fingerprint: "host certificate (unsupported)".into(),
                }),
            },
        };
        match outcome {
            Ok(()) => Ok(true),
            Err(e) => {
                if let Ok(mut slot) = self.rejection.lock() {
                    *slot = Some(e);
                }
                Ok(false)
            }
        }
    }
}

/// A (lazily connected, self-reconnecting) SSH connection to one host.
///
/// ```no_run
/// # async fn demo() -> Result<(), paperclip_env_providers::ssh::SshError> {
/// use paperclip_env_providers::ssh::{HostKeyPolicy, RemoteCommand, SshAuth, SshTransport};
/// use paperclip_env_core::execute::OutputCollector;
/// let key = std::fs::read_to_string("/home/me/.ssh/id_ed25519").unwrap_or_default();
/// let transport = SshTransport::builder("build-01.internal", "paperclip")
///     .port(22)
///     .auth(SshAuth::PrivateKey(key.into()))
///     .host_key_policy(HostKeyPolicy::from_config(true, Some("build-01.internal ssh-ed25519 AAAA…")))
///     .build();
/// let output = OutputCollector::buffered();
/// let exit = transport
///     .run(&RemoteCommand { argv: vec!["uname".into(), "-a".into()], ..Default::default() }, &output)
///     .await?;
/// println!("{:?} {}", exit.exit_code, output.finish(exit.clone()).stdout);
/// # Ok(()) }
/// ```
pub struct SshTransport {
    settings: Arc<SshTransportBuilder>,
    conn: tokio::sync::Mutex<Option<Arc<Handle<ClientHandler>>>>,
}

impl std::fmt::Debug for SshTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport")
            .field("host", &self.settings.host)
            .field("port", &self.settings.port)
            .field("username", &self.settings.username)
            .field("auth", &self.settings.auth)
            .finish_non_exhaustive()
    }
}

/// Collected output of a small helper command.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    /// How it ended.
    pub exit: CommandExit,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
}

/// stdout and stderr are separate pipes, so the pgid line may still be in
/// flight when we decide to kill: wait for it briefly (other output dropped).
async fn await_pgid(reader: &mut russh::ChannelReadHalf, state: &mut ReadState) {
    if state.pgid.is_some() || state.marker_done {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(msg) = reader.wait().await {
            if let ChannelMsg::ExtendedData { data, ext: 1 } = msg {
                let _ = state.filter_stderr(&data);
                if state.marker_done {
                    break;
                }
            }
        }
    })
    .await;
}

enum ReadEnd {
    Exited,
    Dropped,
    OverLimit,
}

#[derive(Default)]
struct ReadState {
    pgid: Option<u32>,
    marker_buf: Vec<u8>,
    marker_done: bool,
    exit_code: Option<i32>,
    signal: Option<String>,
}

impl ReadState {
    /// Strips the pgid line from the start of stderr; returns the rest.
    fn filter_stderr(&mut self, data: &[u8]) -> Vec<u8> {
        if self.marker_done {
            return data.to_vec();
        }
        self.marker_buf.extend_from_slice(data);
        let Some(nl) = self.marker_buf.iter().position(|b| *b == b'\n') else {
            if self.marker_buf.len() > 256 {
                self.marker_done = true;
                return std::mem::take(&mut self.marker_buf);
            }
            return Vec::new();
        };
        self.marker_done = true;
        let line = String::from_utf8_lossy(&self.marker_buf[..nl]).into_owned();
        let rest = self.marker_buf[nl + 1..].to_vec();
        match line.strip_prefix(PGID_MARKER) {
            Some(pid) => {
                self.pgid = pid.trim().parse().ok();
                rest
            }
            None => std::mem::take(&mut self.marker_buf),
        }
    }
}

fn signal_name(sig: &russh::Sig) -> String {
    let name = match sig {
        russh::Sig::ABRT => "ABRT",
        russh::Sig::ALRM => "ALRM",
        russh::Sig::FPE => "FPE",
        russh::Sig::HUP => "HUP",
        russh::Sig::ILL => "ILL",
        russh::Sig::INT => "INT",
        russh::Sig::KILL => "KILL",
        russh::Sig::PIPE => "PIPE",
        russh::Sig::QUIT => "QUIT",
        russh::Sig::SEGV => "SEGV",
        russh::Sig::TERM => "TERM",
        russh::Sig::USR1 => "USR1",
        russh::Sig::Custom(s) => s.as_str(),
    };
    format!("SIG{name}")
}

impl SshTransport {
    /// Starts a builder for `username@host`.
    pub fn builder(host: impl Into<String>, username: impl Into<String>) -> SshTransportBuilder {
        SshTransportBuilder {
            host: host.into(),
            port: 22,
            username: username.into(),
            auth: SshAuth::DefaultIdentities,
            policy: HostKeyPolicy::from_config(true, None),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
        }
    }

    /// Host.
    pub fn host(&self) -> &str {
        &self.settings.host
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.settings.port
    }

    /// Login user.
    pub fn username(&self) -> &str {
        &self.settings.username
    }

    fn transport_err(&self, message: impl Into<String>, retryable: bool) -> SshError {
        SshError::Transport {
            host: self.settings.host.clone(),
            port: self.settings.port,
            message: message.into(),
            retryable,
        }
    }

    fn load_keys(&self) -> Result<Vec<PrivateKey>, SshError> {
        match &self.settings.auth {
            SshAuth::PrivateKey(text) => russh::keys::decode_secret_key(text.expose_secret(), None)
                .map(|k| vec![k])
                .map_err(|_| {
                    SshError::InvalidKey(
                        "privateKey is not an unencrypted OpenSSH or PEM private key".into(),
                    )
                }),
            SshAuth::IdentityFile(path) => russh::keys::load_secret_key(path, None)
                .map(|k| vec![k])
                .map_err(|_| {
                    SshError::InvalidKey(format!(
                        "identityFile {} is missing or not an unencrypted private key",
                        path.display()
                    ))
                }),
            SshAuth::DefaultIdentities => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                let keys: Vec<PrivateKey> = home
                    .iter()
                    .flat_map(|h| {
                        ["id_ed25519", "id_ecdsa", "id_rsa"].map(|n| h.join(".ssh").join(n))
                    })
                    .filter_map(|p| russh::keys::load_secret_key(p, None).ok())
                    .collect();
                if keys.is_empty() {
                    Err(SshError::InvalidKey(
                        "no privateKey, privateKeySecretRef or identityFile configured and no default identity (~/.ssh/id_ed25519, id_ecdsa, id_rsa) could be loaded".into(),
                    ))
                } else {
                    Ok(keys)
                }
            }
        }
    }

    async fn connect_once(&self) -> Result<Handle<ClientHandler>, SshError> {
        let s = &self.settings;
        let keys = self.load_keys()?;
        let rejection = Arc::new(Mutex::new(None));
        let handler = ClientHandler {
            host: s.host.clone(),
            port: s.port,
            policy: s.policy.clone(),
            rejection: rejection.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: s.keepalive_interval,
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let dial_host = if s.host.contains(':') && !s.host.starts_with('[') {
            s.host.clone()
        } else {
            s.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        };
        let attempt = async {
            let stream = tokio::net::TcpStream::connect((dial_host.as_str(), s.port))
                .await
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        SshError::ConnectionRefused {
                            host: s.host.clone(),
                            port: s.port,
                        }
                    } else {
                        self.transport_err(format!("connect failed: {e}"), true)
                    }
                })?;
            // `connect_stream` never applies `Config::nodelay` to a socket
            // it did not dial; without it every small request waits out
            // Nagle against the peer's delayed ACK (~40 ms per exec).
            stream
                .set_nodelay(true)
                .map_err(|e| self.transport_err(format!("cannot set TCP_NODELAY: {e}"), true))?;
            let mut handle = client::connect_stream(config, stream, handler)
                .await
                .map_err(|e| self.transport_err(format!("handshake failed: {e}"), true))?;
            let mut accepted = false;
            for key in keys {
                let hash = if key.algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|e| self.transport_err(format!("handshake failed: {e}"), true))?
                        .flatten()
                        .or(Some(HashAlg::Sha512))
                } else {
                    None
                };
                let result = handle
                    .authenticate_publickey(
                        s.username.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                    )
                    .await
                    .map_err(|e| self.transport_err(format!("authentication failed: {e}"), true))?;
                if result.success() {
                    accepted = true;
                    break;
                }
            }
            if !accepted {
                return Err(SshError::AuthFailed {
                    user: s.username.clone(),
                    host: s.host.clone(),
                });
            }
            Ok(handle)
        };
        let outcome = tokio::time::timeout(s.connect_timeout, attempt).await;
        let host_key_failure = rejection.lock().ok().and_then(|mut r| r.take());
        if let Some(e) = host_key_failure {
            return Err(e);
        }
        match outcome {
            Ok(r) => r,
            Err(_) => Err(SshError::ConnectTimeout {
                host: s.host.clone(),
                port: s.port,
                after: s.connect_timeout,
            }),
        }
    }

    /// Connects (or reuses a live connection).
    pub async fn connect(&self) -> Result<(), SshError> {
        self.handle(false).await.map(|_| ())
    }

    async fn handle(&self, fresh: bool) -> Result<Arc<Handle<ClientHandler>>, SshError> {
        let mut conn = self.conn.lock().await;
        if let Some(h) = conn.as_ref()
            && !fresh
            && !h.is_closed()
        {
            return Ok(h.clone());
        }
        let h = Arc::new(self.connect_once().await?);
        *conn = Some(h.clone());
        Ok(h)
    }

    /// Closes the connection (a later call reconnects).
    pub async fn disconnect(&self) {
        if let Some(h) = self.conn.lock().await.take() {
            let _ = h
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    async fn open_channel(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        let h = self.handle(false).await?;
        match h.channel_open_session().await {
            Ok(c) => Ok(c),
            // The connection dropped before the command started: reconnect once.
            Err(_) => self
                .handle(true)
                .await?
                .channel_open_session()
                .await
                .map_err(|e| {
                    self.transport_err(format!("cannot open a session channel: {e}"), true)
                }),
        }
    }

    /// Runs an exec string as-is (the login shell runs it with `-c`),
    /// streaming output into `output`. On timeout the remote process group is
    /// killed (TERM, then KILL after 2 s) through a second channel.
    pub async fn exec(
        &self,
        command: &str,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
        output: &OutputCollector,
    ) -> Result<CommandExit, SshError> {
        let stdin = match stdin {
            Some(bytes) => StdinSource::Bytes(bytes),
            None => StdinSource::None,
        };
        self.exec_with(command, stdin, timeout, None, output).await
    }

    async fn exec_with(
        &self,
        command: &str,
        stdin: StdinSource,
        timeout: Option<Duration>,
        max_output: Option<usize>,
        output: &OutputCollector,
    ) -> Result<CommandExit, SshError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let start = async {
            let channel = self.open_channel().await?;
            let tracked = format!("printf '{PGID_MARKER}%s\\n' \"$$\" >&2; {command}");
            channel
                .exec(true, tracked)
                .await
                .map_err(|e| self.transport_err(format!("exec request failed: {e}"), true))?;
            Ok::<_, SshError>(channel)
        };
        let channel = match deadline {
            Some(d) => match tokio::time::timeout_at(d, start).await {
                Ok(r) => r?,
                // The server never answered the channel or exec request.
                Err(_) => {
                    return Ok(CommandExit {
                        exit_code: None,
                        signal: None,
                        timed_out: true,
                        metadata: None,
                    });
                }
            },
            None => start.await?,
        };
        let (mut reader, writer) = channel.split();
        let writer = Arc::new(writer);
        let stdin_writer = writer.clone();
        let stdin_task = tokio::spawn(async move {
            match stdin {
                StdinSource::Bytes(bytes) if !bytes.is_empty() => {
                    let _ = stdin_writer.data(&bytes[..]).await;
                }
                StdinSource::Reader(reader) => {
                    let _ = stdin_writer.data(reader).await;
                }
                _ => {}
            }
            let _ = stdin_writer.eof().await;
        });
        let mut state = ReadState::default();
        let limit = max_output.unwrap_or(usize::MAX);
        let (mut out_bytes, mut err_bytes) = (0usize, 0usize);
        let read = async {
            let mut end = ReadEnd::Dropped;
            while let Some(msg) = reader.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        let room = limit - out_bytes;
                        output.stdout(&data[..room.min(data.len())]);
                        out_bytes += room.min(data.len());
                        if data.len() > room {
                            return ReadEnd::OverLimit;
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        let rest = state.filter_stderr(&data);
                        let room = limit - err_bytes;
                        output.stderr(&rest[..room.min(rest.len())]);
                        err_bytes += room.min(rest.len());
                        if rest.len() > room {
                            return ReadEnd::OverLimit;
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        state.exit_code = Some(exit_status as i32);
                        end = ReadEnd::Exited;
                    }
                    ChannelMsg::ExitSignal { signal_name: s, .. } => {
                        state.signal = Some(signal_name(&s));
                        end = ReadEnd::Exited;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            end
        };
        let outcome = match deadline {
            Some(d) => tokio::time::timeout_at(d, read).await.ok(),
            None => Some(read.await),
        };
        stdin_task.abort();
        match outcome {
            Some(ReadEnd::Exited) => {
                if !state.marker_done && !state.marker_buf.is_empty() {
                    output.stderr(&std::mem::take(&mut state.marker_buf));
                }
                Ok(CommandExit {
                    exit_code: if state.signal.is_some() {
                        None
                    } else {
                        state.exit_code
                    },
                    signal: state.signal,
                    timed_out: false,
                    metadata: None,
                })
            }
            Some(ReadEnd::OverLimit) => {
                await_pgid(&mut reader, &mut state).await;
                let _ = writer.signal(russh::Sig::TERM).await;
                if let Some(pgid) = state.pgid {
                    self.kill_group(pgid).await;
                }
                let _ = writer.close().await;
                Err(SshError::OutputLimit { limit })
            }
            Some(ReadEnd::Dropped) => Err(self.transport_err(
                "the connection closed before the command reported an exit status",
                false,
            )),
            None => {
                await_pgid(&mut reader, &mut state).await;
                let _ = writer.signal(russh::Sig::TERM).await;
                if let Some(pgid) = state.pgid {
                    self.kill_group(pgid).await;
                }
                let _ = writer.close().await;
                Ok(CommandExit {
                    exit_code: None,
                    signal: None,
                    timed_out: true,
                    metadata: None,
                })
            }
        }
    }

    /// Kills the remote process group; bounded (5 s) even if the server hangs.
    async fn kill_group(&self, pgid: u32) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.kill_group_inner(pgid)).await;
    }

    async fn kill_group_inner(&self, pgid: u32) {
        let script = format!(
            "kill -TERM -- -{pgid} 2>/dev/null; i=0; while kill -0 -- -{pgid} 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; kill -KILL -- -{pgid} 2>/dev/null; true"
        );
        let Ok(channel) = self.open_channel().await else {
            return;
        };
        if channel.exec(true, script).await.is_err() {
            return;
        }
        let (mut reader, _writer) = channel.split();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = reader.wait().await {
                if matches!(msg, ChannelMsg::Close) {
                    break;
                }
            }
        })
        .await;
    }

    /// Runs a shell snippet (no env) with a timeout and collects its output.
    pub async fn run_script(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<ScriptOutput, SshError> {
        let output = OutputCollector::buffered();
        let cmd = format!(
            "exec sh -c {}",
            shell_quote(&remote_script(script, &BTreeMap::new()))
        );
        let exit = self.exec(&cmd, None, Some(timeout), &output).await?;
        let result = output.finish(exit.clone());
        Ok(ScriptOutput {
            exit,
            stdout: result.stdout,
            stderr: result.stderr,
        })
    }

    /// Runs a [`RemoteCommand`] (spec 27 §4.3): login profiles sourced, env
    /// applied last (so it wins), argv quoted exactly. With env, the script
    /// travels ahead of the command's stdin on the same channel (see
    /// `stdin_script_reader`), so env values never appear in an exec request
    /// and no launcher file costs an extra round trip.
    pub async fn run(
        &self,
        cmd: &RemoteCommand,
        output: &OutputCollector,
    ) -> Result<CommandExit, SshError> {
        if let Some(bad) = cmd.env.keys().find(|k| !valid_env_key(k)) {
            return Err(SshError::InvalidEnvKey(bad.clone()));
        }
        if cmd.argv.is_empty() {
            return Err(self.transport_err("empty command", false));
        }
        let line = remote_command_line(cmd);
        let script = remote_script(&line, &cmd.env);
        if cmd.env.is_empty() {
            let exec = format!("exec sh -c {}", shell_quote(&script));
            return self
                .exec_with(
                    &exec,
                    stdin_of(cmd),
                    cmd.timeout,
                    cmd.max_output_bytes,
                    output,
                )
                .await;
        }
        let (reader, stdin) = stdin_script_reader(&script, cmd.stdin.as_deref());
        self.exec_with(
            &format!("exec sh -c {}", shell_quote(&reader)),
            StdinSource::Bytes(stdin),
            cmd.timeout,
            cmd.max_output_bytes,
            output,
        )
        .await
    }

    fn check_transfer(&self, what: &str, exit: &CommandExit, stderr: &str) -> Result<(), SshError> {
        if exit.exit_code == Some(0) {
            return Ok(());
        }
        let reason = if exit.timed_out {
            "timed out".to_owned()
        } else {
            Some(stderr.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("exit {:?}, signal {:?}", exit.exit_code, exit.signal))
        };
        Err(self.transport_err(format!("{what} failed: {reason}"), false))
    }

    /// Copies the local file `local` to the absolute remote path `remote`
    /// (its directory must exist), streaming it over the channel.
    pub async fn put_file(
        &self,
        local: &std::path::Path,
        remote: &str,
        timeout: Duration,
    ) -> Result<(), SshError> {
        let file = tokio::fs::File::open(local).await.map_err(|e| {
            self.transport_err(format!("cannot read {}: {e}", local.display()), false)
        })?;
        let output = OutputCollector::buffered();
        let exit = self
            .exec_with(
                &format!("cat > {}", shell_quote(remote)),
                StdinSource::Reader(Box::new(file)),
                Some(timeout),
                None,
                &output,
            )
            .await?;
        let r = output.finish(exit.clone());
        self.check_transfer("put_file", &exit, &r.stderr)
    }

    async fn download_to(
        &self,
        command: &str,
        local: &std::path::Path,
        timeout: Duration,
        what: &str,
    ) -> Result<(), SshError> {
        let file = std::fs::File::create(local).map_err(|e| {
            self.transport_err(format!("cannot write {}: {e}", local.display()), false)
        })?;
        let sink = Arc::new(FileSink {
            file: Mutex::new(file),
            stderr: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
        });
        let output = OutputCollector::new(
            paperclip_env_core::execute::OutputCapture::Discard,
            Some(sink.clone()),
        );
        let exit = self
            .exec_with(command, StdinSource::None, Some(timeout), None, &output)
            .await?;
        if let Some(e) = sink.failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(self.transport_err(format!("cannot write {}: {e}", local.display()), false));
        }
        let stderr = sink
            .stderr
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.check_transfer(what, &exit, &stderr)
    }

    /// Copies the absolute remote path `remote` into the local file `local` (binary-safe).
    pub async fn get_file(
        &self,
        remote: &str,
        local: &std::path::Path,
        timeout: Duration,
    ) -> Result<(), SshError> {
        self.download_to(
            &format!("cat -- {}", shell_quote(remote)),
            local,
            timeout,
            "get_file",
        )
        .await
    }

    /// Native workspace upload: the local directory is streamed as a tar
    /// archive (local `tar -c`) into `tar -x` in `remote_dir` (created if
    /// missing). Symlinks are preserved; existing remote files are overwritten
    /// but not deleted.
    pub async fn upload_dir(
        &self,
        local_dir: &std::path::Path,
        remote_dir: &str,
        timeout: Duration,
    ) -> Result<(), SshError> {
        let mut child = tokio::process::Command::new("tar")
            .arg("-c")
            .arg("-C")
            .arg(local_dir)
            .arg(".")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| self.transport_err(format!("cannot run local tar: {e}"), false))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(self.transport_err("local tar has no stdout", false));
        };
        let q = shell_quote(remote_dir);
        let output = OutputCollector::buffered();
        let exit = self
            .exec_with(
                &format!("mkdir -p {q} && tar -x -f - -C {q}"),
                StdinSource::Reader(Box::new(stdout)),
                Some(timeout),
                None,
                &output,
            )
            .await;
        let local = child.wait_with_output().await;
        let exit = exit?;
        let r = output.finish(exit.clone());
        self.check_transfer("upload_dir (remote tar -x)", &exit, &r.stderr)?;
        match local {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(self.transport_err(
                format!(
                    "upload_dir (local tar -c) failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                false,
            )),
            Err(e) => Err(self.transport_err(format!("local tar failed: {e}"), false)),
        }
    }

    /// Native workspace download: `tar -c` of `remote_dir` streamed back and
    /// extracted into `local_dir` (created if missing).
    pub async fn download_dir(
        &self,
        remote_dir: &str,
        local_dir: &std::path::Path,
        timeout: Duration,
    ) -> Result<(), SshError> {
        std::fs::create_dir_all(local_dir).map_err(|e| {
            self.transport_err(format!("cannot create {}: {e}", local_dir.display()), false)
        })?;
        let archive = tempfile_path(local_dir);
        let result = self
            .download_to(
                &format!("tar -c -f - -C {} .", shell_quote(remote_dir)),
                &archive,
                timeout,
                "download_dir (remote tar -c)",
            )
            .await;
        let extracted = match result {
            Ok(()) => tokio::process::Command::new("tar")
                .arg("-x")
                .arg("-f")
                .arg(&archive)
                .arg("-C")
                .arg(local_dir)
                .output()
                .await
                .map_err(|e| self.transport_err(format!("cannot run local tar: {e}"), false))
                .and_then(|out| {
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(self.transport_err(
                            format!(
                                "download_dir (local tar -x) failed: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            ),
                            false,
                        ))
                    }
                }),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&archive);
        extracted
    }
}

/// A fresh archive path in the system temp dir (never inside the target).
fn tempfile_path(_dir: &std::path::Path) -> PathBuf {
    std::env::temp_dir().join(format!(
        "paperclip-ssh-download-{}.tar",
        uuid::Uuid::new_v4()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_matches_spec() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a'b'c"), r"'a'\''b'\''c'");
        assert_eq!(shell_quote(r#"a "b" \c"#), r#"'a "b" \c'"#);
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn env_keys() {
        assert!(valid_env_key("_A1"));
        assert!(!valid_env_key("BAD-KEY"));
        assert!(!valid_env_key("1A"));
        assert!(!valid_env_key(""));
    }

    #[test]
    fn pgid_marker_is_stripped_across_chunks() {
        let mut s = ReadState::default();
        assert!(s.filter_stderr(b"__paperclip_ssh_p").is_empty());
        assert_eq!(s.filter_stderr(b"gid__:1234\nerr"), b"err");
        assert_eq!(s.pgid, Some(1234));
        assert_eq!(s.filter_stderr(b"more"), b"more");
    }
}
