//! Fault injection for the fake provider.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use paperclip_env_core::{Error, Operation};

type ErrorFactory = Box<dyn Fn() -> Error + Send + Sync>;

/// Faults queued against the fake provider's operations.
///
/// ```
/// use paperclip_env_core::{Error, Operation};
/// use paperclip_env_testkit::fake::Faults;
/// let faults = Faults::default();
/// faults.fail_next(Operation::Acquire, || Error::provider("fake-plugin", "capacity exhausted"));
/// assert!(faults.take_failure(Operation::Acquire).is_some());
/// assert!(faults.take_failure(Operation::Acquire).is_none());
/// ```
#[derive(Default)]
pub struct Faults {
    failures: Mutex<HashMap<Operation, VecDeque<ErrorFactory>>>,
    delays: Mutex<HashMap<Operation, Duration>>,
    after_create: Mutex<Option<Duration>>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued: usize = self
            .failures
            .lock()
            .map(|m| m.values().map(VecDeque::len).sum())
            .unwrap_or(0);
        f.debug_struct("Faults")
            .field("queued_failures", &queued)
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// The next call of `operation` fails with the error `make` builds.
    pub fn fail_next(
        &self,
        operation: Operation,
        make: impl Fn() -> Error + Send + Sync + 'static,
    ) {
        self.fail_times(operation, 1, make);
    }

    /// The next `times` calls of `operation` fail.
    pub fn fail_times(
        &self,
        operation: Operation,
        times: usize,
        make: impl Fn() -> Error + Send + Sync + 'static,
    ) {
        let make: std::sync::Arc<dyn Fn() -> Error + Send + Sync> = std::sync::Arc::new(make);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let queue = failures.entry(operation).or_default();
        for _ in 0..times {
            let make = make.clone();
            queue.push_back(Box::new(move || make()));
        }
    }

    /// Every call of `operation` waits `delay` first (zero removes the delay).
    pub fn delay(&self, operation: Operation, delay: Duration) {
        let mut delays = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        if delay.is_zero() {
            delays.remove(&operation);
        } else {
            delays.insert(operation, delay);
        }
    }

    /// Every fresh sandbox is created first and the acquire then waits
    /// `delay` before answering (a provider waiting for readiness), so a
    /// deadline or a crash lands while a resource exists that no lease row
    /// records yet. Zero removes the stall.
    pub fn stall_after_create(&self, delay: Duration) {
        *self.after_create.lock().unwrap_or_else(|p| p.into_inner()) =
            (!delay.is_zero()).then_some(delay);
    }

    /// The stall set by [`Faults::stall_after_create`].
    pub fn after_create_stall(&self) -> Option<Duration> {
        *self.after_create.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes every queued failure and delay.
    pub fn clear(&self) {
        *self.after_create.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Pops the next queued failure of `operation`.
    pub fn take_failure(&self, operation: Operation) -> Option<Error> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get_mut(&operation)
            .and_then(VecDeque::pop_front)
            .map(|make| make())
    }

    /// The delay configured for `operation`.
    pub fn delay_for(&self, operation: Operation) -> Option<Duration> {
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&operation)
            .copied()
    }

    /// Applies the delay, then the queued failure, of `operation`.
    pub async fn inject(&self, operation: Operation) -> Result<(), Error> {
        if let Some(delay) = self.delay_for(operation) {
            tokio::time::sleep(delay).await;
        }
        match self.take_failure(operation) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}
