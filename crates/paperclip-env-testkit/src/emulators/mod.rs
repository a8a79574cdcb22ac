//! In-process protocol emulators of the cloud providers. Each speaks the
//! provider's real wire protocol on 127.0.0.1 and runs commands as real local
//! processes, so providers are tested end to end without an account.

// Handlers return `Result<Response, Response>`: both arms are HTTP answers.
#[allow(clippy::result_large_err)]
pub mod cloudflare_bridge;
#[allow(clippy::result_large_err)]
pub mod daytona;
#[allow(clippy::result_large_err)]
pub mod e2b;
pub mod exe_dev;
#[cfg(feature = "emulators-kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulators-kubernetes")))]
#[allow(clippy::result_large_err)]
pub mod kubernetes;
#[cfg(feature = "emulators-modal")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulators-modal")))]
pub mod modal;
pub(crate) mod sandbox_fs;
mod serve;

pub use serve::RecordedRequest;

/// Faults queued per route: each request of a route takes the next one.
pub(crate) struct FaultQueue<R, F> {
    queues: std::sync::Mutex<std::collections::HashMap<R, std::collections::VecDeque<F>>>,
}

impl<R, F> Default for FaultQueue<R, F> {
    fn default() -> Self {
        FaultQueue {
            queues: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<R: std::hash::Hash + Eq, F: Clone> FaultQueue<R, F> {
    /// Queues `fault` for the next `times` requests of `route` (capped at
    /// 10,000; `usize::MAX` reads as "sticky").
    pub(crate) fn push(&self, route: R, fault: F, times: usize) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = queues.entry(route).or_default();
        for _ in 0..times.min(10_000) {
            queue.push_back(fault.clone());
        }
    }

    /// Removes every queued fault.
    pub(crate) fn clear(&self) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The next fault queued for `route`.
    pub(crate) fn take(&self, route: &R) -> Option<F> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(route)?
            .pop_front()
    }
}

/// A finished process's exit code as a shell reports it: the code, or
/// 128 + the signal number when a signal ended it.
pub(crate) fn shell_exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}
