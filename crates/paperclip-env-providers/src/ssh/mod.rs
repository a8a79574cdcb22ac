//! The `ssh` driver and a reusable SSH transport (spec 27), over russh.
//!
//! - [`SshDriver`]: the `EnvironmentRuntimeDriver` for `driver: "ssh"`.
//! - [`SshTransport`]: connect/authenticate/verify, then run commands with
//!   streaming output, exit codes and signals, timeouts that kill the remote
//!   process group, keepalives and reconnect-before-command. The exe.dev
//!   provider reuses it.
//! - [`host_keys`]: known-hosts parsing and matching.
//!
//! Decisions where upstream Paperclip (OpenSSH CLI) differs or is vague:
//! - Auth is publickey only; with no key configured the process user's
//!   default identity files are tried; ssh-agent is **not** used.
//! - Exit: a remote `exit-signal` is reported as `signal: "SIG<NAME>"` with
//!   `exitCode: None` (not 255); a dropped connection before an exit status
//!   is an error, never a fake exit code.
//! - Timeout: the remote shell's process group (sshd makes each session a
//!   session leader) gets TERM, then KILL after 2 s, via a second channel,
//!   so the command does not outlive its timeout (fixes G7). Processes that
//!   leave the group (`setsid`) are not tracked.
//! - `sh -c`/`bash -c` argv is never unwrapped: argv is always quoted and
//!   `exec`ed as given (fixes G4).
//! - Output caps are the caller's `OutputCapture`; no separate max-buffer error.
//! - Workspace transfer over the channel is not implemented here.

mod driver;
pub mod host_keys;
mod transport;

pub use driver::SshDriver;
pub use host_keys::{HostKeyPolicy, HostKeyRejection, KnownHosts};
pub use transport::{
    DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL, RemoteCommand,
    ScriptOutput, SshAuth, SshError, SshTransport, SshTransportBuilder, shell_quote, valid_env_key,
};
