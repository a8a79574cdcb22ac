//! An emulator of exe.dev's HTTPS lifecycle API (spec 24 §2, §8):
//! `POST /exec` with a bearer token and a CLI command line as the body
//! (`new`, `ls`, `rm`, `whoami`). VMs are records only; their SSH endpoint is
//! whatever the test configured (normally the testkit's sshd fixture).
//!
//! ```no_run
//! # async fn demo() {
//! use paperclip_env_testkit::emulators::exe_dev::ExeDevEmulator;
//! let api = ExeDevEmulator::start("exe1.token", "127.0.0.1", 2222).await.unwrap();
//! assert_eq!(api.live_vms(), 0);
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A fault to inject into the next matching command.
#[derive(Debug, Clone, PartialEq)]
pub enum ExeFault {
    /// This status with a plain-text body.
    Status(u16, &'static str),
    /// `200` with `{"error": <text>}`.
    ErrorInOk(&'static str),
    /// `200` with a body that is not JSON.
    NonJsonOk,
    /// `200` with a JSON object that has no VM fields (the VM is still created).
    NoVmFields,
    /// Wait this long before answering normally.
    Delay(Duration),
    /// `new` succeeds but the VM's SSH port refuses connections.
    UnreachableSsh,
}

/// Which command a fault targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExeCommand {
    /// `new`.
    New,
    /// `ls`.
    Ls,
    /// `rm`.
    Rm,
    /// Any command.
    Any,
}

struct Shared {
    token: String,
    ssh_host: String,
    ssh_port: u16,
    vms: Mutex<BTreeMap<String, Value>>,
    faults: Mutex<VecDeque<(ExeCommand, ExeFault)>>,
    commands: Mutex<Vec<String>>,
    creates: AtomicUsize,
    removes: AtomicUsize,
}

/// The running emulator; stops when dropped.
pub struct ExeDevEmulator {
    server: super::serve::Server,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ExeDevEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExeDevEmulator")
            .field("addr", &self.server.addr())
            .field("live_vms", &self.live_vms())
            .finish()
    }
}

impl ExeDevEmulator {
    /// Starts on `127.0.0.1:0`; VMs it creates report `ssh_host`/`ssh_port`.
    pub async fn start(token: &str, ssh_host: &str, ssh_port: u16) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            ssh_host: ssh_host.to_owned(),
            ssh_port,
            vms: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(VecDeque::new()),
            commands: Mutex::new(Vec::new()),
            creates: AtomicUsize::new(0),
            removes: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(dispatch).with_state(shared.clone());
        let server = super::serve::Server::start(app).await?;
        Ok(ExeDevEmulator { server, shared })
    }

    /// `http://127.0.0.1:<port>/exec`.
    pub fn url(&self) -> String {
        format!("http://{}/exec", self.server.addr())
    }

    /// VMs that exist now.
    pub fn live_vms(&self) -> usize {
        self.shared.vms.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Names of the VMs that exist now.
    pub fn vm_names(&self) -> Vec<String> {
        self.shared
            .vms
            .lock()
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Successful `new` commands so far.
    pub fn create_calls(&self) -> usize {
        self.shared.creates.load(Ordering::SeqCst)
    }

    /// Successful `rm` commands so far.
    pub fn remove_calls(&self) -> usize {
        self.shared.removes.load(Ordering::SeqCst)
    }

    /// Every command body received (authorised or not), in order.
    pub fn commands(&self) -> Vec<String> {
        self.shared
            .commands
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Queues `fault` for the next `times` commands matching `command`.
    pub fn inject(&self, command: ExeCommand, fault: ExeFault, times: usize) {
        if let Ok(mut faults) = self.shared.faults.lock() {
            for _ in 0..times {
                faults.push_back((command, fault.clone()));
            }
        }
    }

    /// Adds a VM record directly (as if created earlier).
    pub fn insert_vm(&self, name: &str) {
        let record = self.shared.record(name, self.shared.ssh_port);
        if let Ok(mut vms) = self.shared.vms.lock() {
            vms.insert(name.to_owned(), record);
        }
    }
}

impl Shared {
    fn record(&self, name: &str, port: u16) -> Value {
        json!({
            "vm_name": name,
            "ssh_dest": self.ssh_host,
            "ssh_host": self.ssh_host,
            "ssh_port": port,
            "https_url": format!("https://{name}.exe.xyz"),
            "status": "running",
            "region": "lon",
            "region_display": "London, UK",
        })
    }

    fn take_fault(&self, command: ExeCommand) -> Option<ExeFault> {
        let mut faults = self.faults.lock().ok()?;
        let index = faults
            .iter()
            .position(|(c, _)| *c == command || *c == ExeCommand::Any)?;
        faults.remove(index).map(|(_, f)| f)
    }
}

/// Splits a command line like `sh` would (single quotes, double quotes,
/// backslash escapes outside quotes). `None` on an unterminated quote.
pub fn lex(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        other => word.push(other),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => word.push(chars.next()?),
                        other => word.push(other),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

fn text(status: u16, body: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_owned(),
    )
        .into_response()
}

fn ok_json(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn refused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1)
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() != "/exec" {
        return text(404, "not found");
    }
    if method != Method::POST {
        return text(405, "method not allowed");
    }
    let line = String::from_utf8_lossy(&body).into_owned();
    if let Ok(mut c) = shared.commands.lock() {
        c.push(line.clone());
    }
    let expected = format!("Bearer {}", shared.token);
    if headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v != expected)
    {
        return text(401, "unauthorized: invalid API token");
    }
    let Some(words) = lex(&line) else {
        return ok_json(json!({"error": "unterminated quote"}));
    };
    let command = match words.first().map(String::as_str) {
        Some("new") => ExeCommand::New,
        Some("ls") => ExeCommand::Ls,
        Some("rm") => ExeCommand::Rm,
        Some("whoami") => return ok_json(json!({"email": "agent@example.com"})),
        other => {
            return ok_json(json!({"error": format!("unknown command: {}", other.unwrap_or(""))}));
        }
    };
    let mut unreachable = false;
    let mut no_vm_fields = false;
    match shared.take_fault(command) {
        Some(ExeFault::Status(status, body)) => return text(status, body),
        Some(ExeFault::ErrorInOk(message)) => return ok_json(json!({"error": message})),
        Some(ExeFault::NonJsonOk) => return text(200, "VM created, probably"),
        Some(ExeFault::Delay(d)) => tokio::time::sleep(d).await,
        Some(ExeFault::UnreachableSsh) => unreachable = true,
        Some(ExeFault::NoVmFields) => no_vm_fields = true,
        None => {}
    }
    let args: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
    let positional: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with("--"))
        .collect();
    match command {
        ExeCommand::New => {
            let Some(name) = args
                .iter()
                .find_map(|a| a.strip_prefix("--name="))
                .filter(|n| !n.is_empty())
            else {
                return ok_json(json!({"error": "--name is required"}));
            };
            let port = if unreachable {
                refused_port()
            } else {
                shared.ssh_port
            };
            let record = shared.record(name, port);
            let Ok(mut vms) = shared.vms.lock() else {
                return text(500, "poisoned");
            };
            if vms.contains_key(name) {
                return ok_json(json!({"error": format!("VM name {name} is already taken")}));
            }
            vms.insert(name.to_owned(), record.clone());
            shared.creates.fetch_add(1, Ordering::SeqCst);
            if no_vm_fields {
                ok_json(json!({"ok": true}))
            } else {
                ok_json(record)
            }
        }
        ExeCommand::Ls => {
            let vms = shared
                .vms
                .lock()
                .map(|v| {
                    v.iter()
                        .filter(|(n, _)| positional.first().is_none_or(|want| n.as_str() == *want))
                        .map(|(_, r)| r.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            ok_json(json!({"vms": vms}))
        }
        ExeCommand::Rm | ExeCommand::Any => {
            let Some(name) = positional.first() else {
                return ok_json(json!({"error": "rm needs a VM name"}));
            };
            let removed = shared
                .vms
                .lock()
                .map(|mut v| v.remove(*name).is_some())
                .unwrap_or(false);
            if removed {
                shared.removes.fetch_add(1, Ordering::SeqCst);
                ok_json(json!({}))
            } else {
                ok_json(json!({"error": format!("vm {name} not found")}))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lex;

    #[test]
    fn lexes_like_sh() {
        assert_eq!(
            lex(r#"new --json --name='a b' --env='K=it'"'"'s'"#).unwrap(),
            vec!["new", "--json", "--name=a b", "--env=K=it's"]
        );
        assert!(lex("rm 'x").is_none());
    }
}
