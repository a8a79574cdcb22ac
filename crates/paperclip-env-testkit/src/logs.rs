//! Captures everything logged through `tracing` (TRACE level and up), and
//! the `log` crate's records too (reqwest, rustls and tungstenite log
//! through `log`), so a test can assert that no secret reaches a log line.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A capture of formatted log lines, active while its guard lives.
///
/// ```
/// use paperclip_env_testkit::logs::LogCapture;
/// let (logs, _guard) = LogCapture::start();
/// tracing::info!(user = "alice", "signed in");
/// assert!(logs.text().contains("signed in"));
/// ```
#[derive(Clone, Default)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture")
            .field("bytes", &self.buf.lock().map(|b| b.len()).unwrap_or(0))
            .finish()
    }
}

impl Write for LogCapture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Installs a TRACE-level subscriber for the current thread until the
    /// guard drops. `log` records are forwarded to `tracing` (process-wide,
    /// once; a logger someone else installed first stays in place).
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        static BRIDGE: std::sync::Once = std::sync::Once::new();
        BRIDGE.call_once(|| {
            let _ = tracing_log::LogTracer::init();
        });
        let capture = LogCapture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}
