//! Injectable id generation, so tests can make fake ids and paths deterministic.

use std::sync::atomic::{AtomicU64, Ordering};

/// Produces the random parts of fake ids and directory names.
pub trait IdGenerator: Send + Sync + 'static {
    /// A UUID-shaped string (used in `fake-plugin://<runId>/<uuid>`).
    fn uuid(&self) -> String;
    /// A short suffix for `paperclip-fake-sandbox-<suffix>` directories.
    fn dir_suffix(&self) -> String;
}

/// Real random UUIDs (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomIds;

impl IdGenerator for RandomIds {
    fn uuid(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    fn dir_suffix(&self) -> String {
        uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
    }
}

/// Counting ids: `00000000-0000-4000-8000-000000000001`, `…0002`, …; directory
/// suffixes `000001`, `000002`, ….
///
/// ```
/// use paperclip_env_providers::fake::{IdGenerator, SequentialIds};
/// let ids = SequentialIds::new();
/// assert_eq!(ids.uuid(), "00000000-0000-4000-8000-000000000001");
/// assert_eq!(ids.dir_suffix(), "000001");
/// ```
#[derive(Debug, Default)]
pub struct SequentialIds {
    uuids: AtomicU64,
    dirs: AtomicU64,
}

impl SequentialIds {
    /// Starts at 1.
    pub fn new() -> Self {
        Self::default()
    }
}

impl IdGenerator for SequentialIds {
    fn uuid(&self) -> String {
        let n = self.uuids.fetch_add(1, Ordering::SeqCst) + 1;
        format!("00000000-0000-4000-8000-{n:012}")
    }

    fn dir_suffix(&self) -> String {
        let n = self.dirs.fetch_add(1, Ordering::SeqCst) + 1;
        format!("{n:06}")
    }
}
