//! Command execution types (spec 00 §5.1, §11.1) and streaming output.
//!
//! Drivers and providers never build stdout/stderr strings themselves: they
//! push chunks into an [`OutputCollector`], which forwards them in order to the
//! caller's [`OutputSink`] (if any) and buffers them for the final
//! [`ExecuteResult`]. A provider that cannot stream pushes one chunk per
//! stream when the command exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::lease::JsonObject;

/// A command to run in a lease.
///
/// `Debug` prints environment variable *names* only: values often carry
/// credentials for the agent.
///
/// ```
/// use paperclip_env_core::ExecuteRequest;
/// let req = ExecuteRequest::new("sh").arg("-c").arg("echo $GREETING").env("GREETING", "hi").timeout_ms(5_000);
/// assert_eq!(req.args, ["-c", "echo $GREETING"]);
/// ```
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteRequest {
    /// Program to run (no shell unless the program is one).
    pub command: String,
    /// Arguments, delivered as argv exactly.
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory; the lease's `remoteCwd` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The only environment the command sees (plus provider defaults like `PATH`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Delivered on stdin, then EOF; `None` means stdin is closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// The command's own timeout; falls back to config `timeoutMs`, then the provider default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How much output to keep in the result (streaming is unaffected).
    #[serde(skip)]
    pub capture: OutputCapture,
    /// Run outside the lease's persistent session (upstream's
    /// `bypassSession`): set on commands that run before the run's agent
    /// work, such as a workspace provision command, so a provider that opens
    /// a session on the first command opens it on the first in-run command
    /// instead. Sent to plugin workers; providers without sessions ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bypass_session: bool,
}

impl std::fmt::Debug for ExecuteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecuteRequest")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field(
                "stdin",
                &self.stdin.as_ref().map(|s| format!("<{} bytes>", s.len())),
            )
            .field("timeout_ms", &self.timeout_ms)
            .field("capture", &self.capture)
            .field("bypass_session", &self.bypass_session)
            .finish()
    }
}

impl ExecuteRequest {
    /// A request to run `command` with no arguments.
    pub fn new(command: impl Into<String>) -> Self {
        ExecuteRequest {
            command: command.into(),
            ..Default::default()
        }
    }

    /// `sh -c <script>`.
    pub fn shell(script: impl Into<String>) -> Self {
        ExecuteRequest::new("sh").arg("-c").arg(script)
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets stdin.
    pub fn stdin(mut self, stdin: impl Into<String>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// Sets [`ExecuteRequest::bypass_session`].
    pub fn bypass_session(mut self, bypass: bool) -> Self {
        self.bypass_session = bypass;
        self
    }

    /// Sets the command timeout.
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// Sets how much output the result keeps.
    pub fn capture(mut self, capture: OutputCapture) -> Self {
        self.capture = capture;
        self
    }

    /// `command` and `args` joined by spaces, for display only.
    pub fn command_line(&self) -> String {
        std::iter::once(self.command.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How much of each stream the result keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputCapture {
    /// Everything (the contract's default).
    #[default]
    Full,
    /// At most this many bytes per stream (the first ones); the result's
    /// metadata says `outputTruncated: true` when cut.
    Limit(usize),
    /// Nothing: output only reaches the sink.
    Discard,
}

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Receives output chunks as they arrive, in order per stream.
///
/// Called from the task that reads the command's output: keep it quick.
pub trait OutputSink: Send + Sync {
    /// One chunk of output.
    fn on_output(&self, stream: OutputStream, data: &[u8]);
}

impl<F> OutputSink for F
where
    F: Fn(OutputStream, &[u8]) + Send + Sync,
{
    fn on_output(&self, stream: OutputStream, data: &[u8]) {
        self(stream, data)
    }
}

#[derive(Default)]
struct Buffers {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
    chunks: u64,
}

/// Where drivers and providers deliver output. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct OutputCollector {
    sink: Option<Arc<dyn OutputSink>>,
    capture: OutputCapture,
    buffers: Arc<Mutex<Buffers>>,
}

impl std::fmt::Debug for OutputCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCollector")
            .field("streaming", &self.sink.is_some())
            .field("capture", &self.capture)
            .finish_non_exhaustive()
    }
}

impl OutputCollector {
    /// A collector that buffers per `capture` and forwards to `sink`.
    pub fn new(capture: OutputCapture, sink: Option<Arc<dyn OutputSink>>) -> Self {
        OutputCollector {
            sink,
            capture,
            buffers: Arc::new(Mutex::new(Buffers::default())),
        }
    }

    /// A collector that buffers everything and streams nowhere.
    pub fn buffered() -> Self {
        Self::new(OutputCapture::Full, None)
    }

    /// Whether a caller is listening for chunks.
    pub fn is_streaming(&self) -> bool {
        self.sink.is_some()
    }

    /// Delivers a chunk.
    pub fn push(&self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        {
            let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
            buffers.chunks += 1;
            let limit = match self.capture {
                OutputCapture::Full => usize::MAX,
                OutputCapture::Limit(n) => n,
                OutputCapture::Discard => 0,
            };
            let buf = match stream {
                OutputStream::Stdout => &mut buffers.stdout,
                OutputStream::Stderr => &mut buffers.stderr,
            };
            let room = limit.saturating_sub(buf.len());
            let take = room.min(data.len());
            buf.extend_from_slice(&data[..take]);
            if take < data.len() && !matches!(self.capture, OutputCapture::Discard) {
                buffers.truncated = true;
            }
        }
        if let Some(sink) = &self.sink {
            sink.on_output(stream, data);
        }
    }

    /// Delivers stdout.
    pub fn stdout(&self, data: &[u8]) {
        self.push(OutputStream::Stdout, data)
    }

    /// Delivers stderr.
    pub fn stderr(&self, data: &[u8]) {
        self.push(OutputStream::Stderr, data)
    }

    /// Makes `authoritative` the stream's content, for providers whose final
    /// result is authoritative over streamed chunks: when what was streamed
    /// is a prefix, the missing tail is delivered as one more chunk (so the
    /// sink sees it too); otherwise the buffer is replaced.
    pub fn reconcile(&self, stream: OutputStream, authoritative: &[u8]) {
        let tail = {
            let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
            let buf = match stream {
                OutputStream::Stdout => &mut buffers.stdout,
                OutputStream::Stderr => &mut buffers.stderr,
            };
            if authoritative.starts_with(buf) {
                Some(authoritative[buf.len()..].to_vec())
            } else {
                if !matches!(self.capture, OutputCapture::Discard) {
                    *buf = authoritative.to_vec();
                }
                None
            }
        };
        if let Some(tail) = tail {
            self.push(stream, &tail);
        }
    }

    /// Chunks delivered so far.
    pub fn chunk_count(&self) -> u64 {
        self.buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .chunks
    }

    /// Builds the final result from what was collected and the exit.
    pub fn finish(&self, exit: CommandExit) -> ExecuteResult {
        let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let stdout = decode(std::mem::take(&mut buffers.stdout));
        let stderr = decode(std::mem::take(&mut buffers.stderr));
        let mut metadata = exit.metadata;
        if buffers.truncated {
            metadata
                .get_or_insert_with(JsonObject::new)
                .insert("outputTruncated".into(), true.into());
        }
        ExecuteResult {
            exit_code: if exit.timed_out { None } else { exit.exit_code },
            signal: exit.signal,
            timed_out: exit.timed_out,
            stdout,
            stderr,
            metadata,
        }
    }
}

/// Decodes a whole buffer once, lossily (spec 10 §1.6 Decision).
fn decode(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// How a command ended, as a provider reports it (output travels separately).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandExit {
    /// Exit code; `None` when killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// Terminating signal name (`"SIGKILL"`), if any.
    pub signal: Option<String>,
    /// Whether the command's own timeout fired.
    pub timed_out: bool,
    /// Provider-defined metadata.
    pub metadata: Option<JsonObject>,
}

impl CommandExit {
    /// A normal exit with a code.
    pub fn code(code: i32) -> Self {
        CommandExit {
            exit_code: Some(code),
            ..Default::default()
        }
    }
}

/// The result of a command (spec 00 §11.1). A non-zero exit is a result, not an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResult {
    /// Exit code; null when killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// Terminating signal name, if any.
    #[serde(default)]
    pub signal: Option<String>,
    /// Whether the command's own timeout fired.
    pub timed_out: bool,
    /// Captured stdout (UTF-8, lossily decoded).
    pub stdout: String,
    /// Captured stderr (UTF-8, lossily decoded).
    pub stderr: String,
    /// Provider-defined metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

impl ExecuteResult {
    /// Exit code 0 and no timeout.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_streams_and_buffers_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let sink: Arc<dyn OutputSink> = Arc::new(move |s: OutputStream, d: &[u8]| {
            sink_seen.lock().unwrap().push((s, d.to_vec()));
        });
        let c = OutputCollector::new(OutputCapture::Full, Some(sink));
        c.stdout(b"a");
        c.stderr(b"e");
        c.stdout(b"b");
        let r = c.finish(CommandExit::code(0));
        assert_eq!(r.stdout, "ab");
        assert_eq!(r.stderr, "e");
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn reconcile_delivers_a_dropped_tail_or_replaces() {
        let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
        let seen2 = seen.clone();
        let sink: Arc<dyn OutputSink> =
            Arc::new(move |_: OutputStream, d: &[u8]| seen2.lock().unwrap().extend_from_slice(d));
        let c = OutputCollector::new(OutputCapture::Full, Some(sink));
        c.stdout(b"ready");
        c.reconcile(OutputStream::Stdout, b"ready.json\n");
        assert_eq!(seen.lock().unwrap().as_slice(), b"ready.json\n");
        c.reconcile(OutputStream::Stderr, b"");
        c.stderr(b"garbled");
        c.reconcile(OutputStream::Stderr, b"clean");
        let r = c.finish(CommandExit::code(0));
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str()),
            ("ready.json\n", "clean")
        );
    }

    #[test]
    fn limit_and_discard() {
        let c = OutputCollector::new(OutputCapture::Limit(3), None);
        c.stdout(b"hello");
        let r = c.finish(CommandExit::code(0));
        assert_eq!(r.stdout, "hel");
        assert_eq!(r.metadata.unwrap()["outputTruncated"], true);
        let c = OutputCollector::new(OutputCapture::Discard, None);
        c.stdout(b"hello");
        let r = c.finish(CommandExit::code(0));
        assert_eq!(r.stdout, "");
        assert!(r.metadata.is_none());
    }

    #[test]
    fn timed_out_nulls_exit_code_and_utf8_split_survives() {
        let c = OutputCollector::buffered();
        let snow = "☃".as_bytes();
        c.stdout(&snow[..1]);
        c.stdout(&snow[1..]);
        let r = c.finish(CommandExit {
            exit_code: Some(143),
            timed_out: true,
            ..Default::default()
        });
        assert_eq!(r.exit_code, None);
        assert_eq!(r.stdout, "☃");
    }

    #[test]
    fn debug_hides_env_values() {
        let r = ExecuteRequest::new("x").env("TOKEN", "hunter2");
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
