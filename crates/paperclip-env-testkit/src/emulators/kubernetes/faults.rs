//! Fault injection: each fault is consumed by the request or pod it hits.

use std::sync::Mutex;
use std::time::Duration;

use super::super::FaultQueue;

/// Where a queued fault waits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Hook {
    /// The next pod the kubelet simulation starts.
    PodStart,
    /// The next exec WebSocket.
    Exec,
    /// The next watch.
    Watch,
    /// The next create (POST) of a resource plural.
    Create(String),
}

/// A queued fault.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fault {
    Unschedulable,
    PodFails,
    DropExecAfter(usize),
    ExecNeverAnswers,
    WatchGone,
    CreateConflict,
}

/// An HTTP fault on requests matching a method and path prefix.
#[derive(Debug, Clone)]
pub(crate) struct HttpFault {
    pub method: String,
    pub path_prefix: String,
    pub remaining: usize,
    pub action: HttpAction,
}

#[derive(Debug, Clone)]
pub(crate) enum HttpAction {
    Status(u16),
    Delay(Duration),
}

/// Fault injection handle of a [`super::KubeEmulator`].
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use paperclip_env_testkit::emulators::kubernetes::KubeEmulator;
/// let emulator = KubeEmulator::start().await?;
/// emulator.faults().unschedulable_next_pod();
/// emulator.faults().server_error("GET", "/apis/agents.x-k8s.io", 2);
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct KubeFaults {
    queue: FaultQueue<Hook, Fault>,
    http: Mutex<Vec<HttpFault>>,
}

impl std::fmt::Debug for KubeFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeFaults").finish_non_exhaustive()
    }
}

impl KubeFaults {
    /// The next pod started stays `Pending` with `PodScheduled=False`
    /// reason `Unschedulable` (its Sandbox reports `Ready=False`).
    pub fn unschedulable_next_pod(&self) {
        self.queue.push(Hook::PodStart, Fault::Unschedulable, 1);
    }

    /// The next pod started goes `Failed` (its Sandbox reports `Ready=False`
    /// and `Finished=True`, both reason `PodFailed`; its Job fails).
    pub fn fail_next_pod(&self) {
        self.queue.push(Hook::PodStart, Fault::PodFails, 1);
    }

    /// The next create of `plural` (e.g. `"sandboxes"`) answers 409
    /// `AlreadyExists` without storing anything.
    pub fn conflict_on_next_create(&self, plural: &str) {
        self.queue
            .push(Hook::Create(plural.to_owned()), Fault::CreateConflict, 1);
    }

    /// The next `times` requests with `method` (`"*"` for any) whose path
    /// starts with `path_prefix` answer 500 `InternalError`.
    pub fn server_error(&self, method: &str, path_prefix: &str, times: usize) {
        self.status_error(method, path_prefix, 500, times);
    }

    /// Like [`Self::server_error`] with any status code (a `metav1.Status`
    /// body; 429 carries `Retry-After: 1`).
    pub fn status_error(&self, method: &str, path_prefix: &str, status: u16, times: usize) {
        self.push_http(method, path_prefix, times, HttpAction::Status(status));
    }

    /// The next `times` matching requests wait `delay` before being handled.
    pub fn delay(&self, method: &str, path_prefix: &str, delay: Duration, times: usize) {
        self.push_http(method, path_prefix, times, HttpAction::Delay(delay));
    }

    /// The next exec WebSocket is dropped (no close frame, no status) once
    /// `bytes` bytes of output have been sent; its process is killed.
    pub fn drop_exec_after(&self, bytes: usize) {
        self.queue.push(Hook::Exec, Fault::DropExecAfter(bytes), 1);
    }

    /// The next exec WebSocket is accepted but never answers (no process,
    /// no frames) until the client goes away or the emulator stops.
    pub fn exec_never_answers(&self) {
        self.queue.push(Hook::Exec, Fault::ExecNeverAnswers, 1);
    }

    /// The next watch answers with an `ERROR` event carrying a 410 `Expired`
    /// Status, as the API server does for a too-old resourceVersion.
    pub fn gone_next_watch(&self) {
        self.queue.push(Hook::Watch, Fault::WatchGone, 1);
    }

    /// Removes every queued fault.
    pub fn clear(&self) {
        self.queue.clear();
        self.http.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn push_http(&self, method: &str, path_prefix: &str, times: usize, action: HttpAction) {
        if times == 0 {
            return;
        }
        self.http
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HttpFault {
                method: method.to_ascii_uppercase(),
                path_prefix: path_prefix.to_owned(),
                remaining: times,
                action,
            });
    }

    pub(crate) fn take(&self, hook: &Hook) -> Option<Fault> {
        self.queue.take(hook)
    }

    /// The first HTTP fault matching the request, consumed.
    pub(crate) fn take_http(&self, method: &str, path: &str) -> Option<HttpAction> {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        let index = http.iter().position(|f| {
            (f.method == "*" || f.method == method) && path.starts_with(&f.path_prefix)
        })?;
        let action = http[index].action.clone();
        http[index].remaining -= 1;
        if http[index].remaining == 0 {
            http.remove(index);
        }
        Some(action)
    }
}
