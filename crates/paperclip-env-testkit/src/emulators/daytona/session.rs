//! Toolbox sessions the way Daytona's daemon runs them (issue 19): one
//! long-lived shell per session reads one wrapper per command on its stdin,
//! so commands run one after another *in* that shell (`cd`, `export` and
//! `exit` change the session); an async command's stdin is a FIFO the
//! daemon holds open (a reader blocks until input arrives, it never sees
//! EOF), a sync command's stdin is empty; output is framed per line into the
//! command's log: marker (`01 01 01` stdout, `02 02 02` stderr) + line +
//! `\n`, a last line without newline gains one, a partial line stays
//! invisible until its newline or the end of the stream, NUL bytes are
//! dropped (the daemon frames with the shell's `read`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;

use crate::fake::DEFAULT_PATH;

/// Marks a stdout line in a command log.
pub(crate) const STDOUT_MARK: [u8; 3] = [1, 1, 1];
/// Marks a stderr line in a command log.
pub(crate) const STDERR_MARK: [u8; 3] = [2, 2, 2];

/// How often a command's output files are read into its log.
const LABEL_TICK: Duration = Duration::from_millis(10);

/// The shell the daemon picks: bash where the image has it, else `sh`.
pub(crate) fn shell_program() -> &'static str {
    if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "sh"
    }
}

/// Single-quotes a word for the shell.
fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r#"'"'"'"#))
}

/// Frames one output stream per line, as the daemon's labelers do.
#[derive(Debug, Default)]
pub(crate) struct LineFramer {
    pending: Vec<u8>,
}

impl LineFramer {
    /// Appends every complete line of `data` to `log`; keeps the rest.
    pub(crate) fn feed(&mut self, marker: [u8; 3], data: &[u8], log: &mut Vec<u8>) {
        for &byte in data {
            match byte {
                b'\n' => {
                    log.extend_from_slice(&marker);
                    log.append(&mut self.pending);
                    log.push(b'\n');
                }
                0 => {}
                other => self.pending.push(other),
            }
        }
    }

    /// End of the stream: a last line without newline gains one.
    pub(crate) fn finish(&mut self, marker: [u8; 3], log: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            log.extend_from_slice(&marker);
            log.append(&mut self.pending);
            log.push(b'\n');
        }
    }
}

/// One command of a session.
pub(crate) struct Command {
    pub(crate) id: String,
    pub(crate) command: String,
    /// The framed log (markers included).
    pub(crate) log: Mutex<Vec<u8>>,
    /// Set once the shell reported the exit code and the log is complete.
    pub(crate) exit: Mutex<Option<i32>>,
    /// The write end of the stdin FIFO (async commands), held until the end.
    stdin: Mutex<Option<std::fs::File>>,
    suppress_echo: bool,
}

impl Command {
    pub(crate) fn exit_code(&self) -> Option<i32> {
        *self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn log_bytes(&self) -> Vec<u8> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn json(&self) -> Value {
        let mut v = json!({"id": self.id, "command": self.command});
        if let Some(code) = self.exit_code() {
            v["exitCode"] = json!(code);
        }
        v
    }
}

/// Why a session call failed: `(status, code, message)` for the daemon's
/// error body.
pub(crate) type Refusal = (u16, &'static str, String);

/// One session: its shell, its commands, its state directory.
pub(crate) struct Session {
    pub(crate) id: String,
    dir: PathBuf,
    shell: tokio::sync::Mutex<Option<ChildStdin>>,
    pgid: Option<i32>,
    commands: Mutex<Vec<Arc<Command>>>,
    exited: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
}

impl Session {
    /// Starts the session's shell in `root` with the sandbox's environment.
    pub(crate) fn spawn(
        id: &str,
        dir: PathBuf,
        root: &Path,
        env: &[(String, String)],
    ) -> std::io::Result<Arc<Session>> {
        std::fs::create_dir_all(&dir)?;
        let mut command = tokio::process::Command::new(shell_program());
        command
            .current_dir(root)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", root);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take();
        let pgid = child.id().map(|p| p as i32);
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        tokio::spawn(async move {
            let _ = child.wait().await;
            flag.store(true, Ordering::SeqCst);
        });
        Ok(Arc::new(Session {
            id: id.to_owned(),
            dir,
            shell: tokio::sync::Mutex::new(stdin),
            pgid,
            commands: Mutex::new(Vec::new()),
            exited,
            cancelled: Arc::new(AtomicBool::new(false)),
        }))
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn command(&self, cid: &str) -> Option<Arc<Command>> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|c| c.id == cid)
            .cloned()
    }

    pub(crate) fn json(&self) -> Value {
        let commands: Vec<Value> = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.json())
            .collect();
        json!({"sessionId": self.id, "commands": commands})
    }

    /// Hands one command to the session's shell; it runs once the commands
    /// before it have finished.
    pub(crate) async fn exec(
        &self,
        text: &str,
        run_async: bool,
        suppress_echo: bool,
    ) -> Result<Arc<Command>, Refusal> {
        let bad = |what: &str, e: std::io::Error| (400, "BAD_REQUEST", format!("{what}: {e}"));
        let cid = uuid::Uuid::new_v4().to_string();
        let dir = self.dir.join(&cid);
        std::fs::create_dir_all(&dir).map_err(|e| bad("failed to create log directory", e))?;
        let script = dir.join("cmd.sh");
        std::fs::write(&script, text).map_err(|e| bad("failed to write command file", e))?;
        let (out, err, exit) = (
            dir.join("stdout"),
            dir.join("stderr"),
            dir.join("exit_code"),
        );
        for path in [&out, &err] {
            std::fs::File::create(path).map_err(|e| bad("failed to create log file", e))?;
        }
        let (input, holder) = if run_async {
            let fifo = dir.join("input.pipe");
            let made = tokio::process::Command::new("mkfifo")
                .arg(&fifo)
                .env("PATH", DEFAULT_PATH)
                .status()
                .await
                .map_err(|e| bad("failed to create input pipe", e))?;
            if !made.success() {
                return Err((400, "BAD_REQUEST", "failed to create input pipe".into()));
            }
            // Read-write so opening never blocks and the pipe never reports
            // EOF to the command: the daemon keeps a writer for its lifetime.
            let holder = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .map_err(|e| bad("failed to open input pipe", e))?;
            (fifo, Some(holder))
        } else {
            (PathBuf::from("/dev/null"), None)
        };
        let command = Arc::new(Command {
            id: cid,
            command: text.to_owned(),
            log: Mutex::new(Vec::new()),
            exit: Mutex::new(None),
            stdin: Mutex::new(holder),
            suppress_echo,
        });
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(command.clone());
        let wrapper = format!(
            "{{ . {}; }} < {} > {} 2> {}; echo $? > {}\n",
            quote(&script),
            quote(&input),
            quote(&out),
            quote(&err),
            quote(&exit)
        );
        {
            let mut shell = self.shell.lock().await;
            let written = match shell.as_mut() {
                Some(stdin) => match stdin.write_all(wrapper.as_bytes()).await {
                    Ok(()) => stdin.flush().await,
                    Err(e) => Err(e),
                },
                None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            };
            written.map_err(|e| bad("failed to write command", e))?;
        }
        tokio::spawn(label(
            command.clone(),
            [out, err],
            exit,
            self.exited.clone(),
            self.cancelled.clone(),
        ));
        Ok(command)
    }

    /// Sync execution: waits for the exit code (forever if the shell died
    /// mid-command, as the daemon does, until the session is deleted).
    pub(crate) async fn wait(&self, command: &Command) -> Result<i32, Refusal> {
        loop {
            if let Some(code) = command.exit_code() {
                return Ok(code);
            }
            if self.is_cancelled() {
                *command.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(1);
                return Err((400, "BAD_REQUEST", "session cancelled".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST …/command/{cid}/input`: writes to the command's stdin FIFO and
    /// echoes the input into the log as stdout (unless suppressed).
    pub(crate) fn input(&self, cid: &str, data: &str) -> Result<(), Refusal> {
        if self.exited.load(Ordering::SeqCst) {
            return Err((410, "GONE", "session process has exited".into()));
        }
        let Some(command) = self.command(cid) else {
            return Err((404, "NOT_FOUND", "command not found".into()));
        };
        if let Some(code) = command.exit_code() {
            return Err((
                410,
                "GONE",
                format!("command has already completed with exit code {code}"),
            ));
        }
        let mut data = data.to_owned();
        if !data.ends_with('\n') {
            data.push('\n');
        }
        let mut holder = command.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pipe) = holder.as_mut() else {
            return Err((
                500,
                "INTERNAL_SERVER_ERROR",
                "failed to open input pipe".into(),
            ));
        };
        pipe.write_all(data.as_bytes()).map_err(|e| {
            (
                500,
                "INTERNAL_SERVER_ERROR",
                format!("failed to write to input pipe: {e}"),
            )
        })?;
        if !command.suppress_echo {
            let mut log = command.log.lock().unwrap_or_else(|p| p.into_inner());
            log.extend_from_slice(&STDOUT_MARK);
            log.extend_from_slice(data.as_bytes());
        }
        Ok(())
    }

    /// `DELETE /process/session/{sid}`: SIGTERM to the shell's process
    /// group, up to `grace` for it to go, then SIGKILL.
    pub(crate) async fn terminate(&self, grace: Duration) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(pgid) = self.pgid {
            let group = Pid::from_raw(pgid);
            let _ = killpg(group, Signal::SIGTERM);
            let until = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < until && group_alive(pgid) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = killpg(group, Signal::SIGKILL);
        }
        self.shell.lock().await.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The sandbox stopped or went away: everything dies at once.
    pub(crate) fn kill(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(pgid) = self.pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Whether a process of the group still runs (zombies do not count: an
/// orphan's zombie lingers where PID 1 does not reap).
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killpg(Pid::from_raw(pgid), None).is_ok();
    };
    entries.filter_map(|e| e.ok()).any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp …"; comm may hold spaces or parens.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

/// Reads what was appended to `path` since `offset`.
fn read_from(path: &Path, offset: &mut u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(*offset)).is_ok()
        && file.read_to_end(&mut buf).is_ok()
    {
        *offset += buf.len() as u64;
    }
    buf
}

/// The exit code once the shell has written it whole.
fn read_exit(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    if !text.ends_with('\n') {
        return None;
    }
    text.trim().parse().ok()
}

/// Moves the command's output into its log line by line until it ends;
/// the exit code is published only after the log holds every line.
async fn label(
    command: Arc<Command>,
    streams: [PathBuf; 2],
    exit_path: PathBuf,
    exited: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
) {
    let marks = [STDOUT_MARK, STDERR_MARK];
    let mut framers = [LineFramer::default(), LineFramer::default()];
    let mut offsets = [0u64; 2];
    loop {
        let mut code = read_exit(&exit_path);
        let ended =
            code.is_none() && (exited.load(Ordering::SeqCst) || cancelled.load(Ordering::SeqCst));
        if ended {
            code = read_exit(&exit_path);
        }
        for i in 0..2 {
            let fresh = read_from(&streams[i], &mut offsets[i]);
            if !fresh.is_empty() {
                let mut log = command.log.lock().unwrap_or_else(|p| p.into_inner());
                framers[i].feed(marks[i], &fresh, &mut log);
            }
        }
        if code.is_some() || ended {
            {
                let mut log = command.log.lock().unwrap_or_else(|p| p.into_inner());
                for i in 0..2 {
                    framers[i].finish(marks[i], &mut log);
                }
            }
            command
                .stdin
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(code) = code {
                *command.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
            }
            return;
        }
        tokio::time::sleep(LABEL_TICK).await;
    }
}

/// Splits a framed log into `(stdout, stderr)`; bytes before the first
/// marker belong to neither (the daemon's demuxer).
pub(crate) fn demux(log: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut current: Option<bool> = None;
    let mut i = 0;
    while i < log.len() {
        if i + 3 <= log.len() && (log[i..i + 3] == STDOUT_MARK || log[i..i + 3] == STDERR_MARK) {
            current = Some(log[i] == 1);
            i += 3;
            continue;
        }
        match current {
            Some(true) => out.push(log[i]),
            Some(false) => err.push(log[i]),
            None => {}
        }
        i += 1;
    }
    (out, err)
}

/// The log with its markers removed (combined output for old clients).
pub(crate) fn strip_marks(log: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(log.len());
    let mut i = 0;
    while i < log.len() {
        if i + 3 <= log.len() && (log[i..i + 3] == STDOUT_MARK || log[i..i + 3] == STDERR_MARK) {
            i += 3;
        } else {
            out.push(log[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_framed_as_the_daemon_frames_them() {
        let mut framer = LineFramer::default();
        let mut log = Vec::new();
        framer.feed(STDOUT_MARK, b"one\ntw", &mut log);
        assert_eq!(log, b"\x01\x01\x01one\n", "a partial line stays invisible");
        framer.feed(STDOUT_MARK, b"o\0\nlast", &mut log);
        framer.finish(STDOUT_MARK, &mut log);
        assert_eq!(log, b"\x01\x01\x01one\n\x01\x01\x01two\n\x01\x01\x01last\n");
        let (out, err) = demux(b"junk\x01\x01\x01a\n\x02\x02\x02b\n");
        assert_eq!((out.as_slice(), err.as_slice()), (&b"a\n"[..], &b"b\n"[..]));
        assert_eq!(strip_marks(b"\x01\x01\x01a\n\x02\x02\x02b\n"), b"a\nb\n");
    }
}
