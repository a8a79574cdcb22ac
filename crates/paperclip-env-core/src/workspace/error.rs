//! Error kinds of workspace synchronisation.

use crate::Error;

/// Why a workspace transfer failed or was refused, carried by
/// [`Error::WorkspaceSync`]. Match on it instead of parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncErrorKind {
    /// An archive entry names an absolute path or climbs out with `..`.
    PathTraversal,
    /// A symlink points outside the tree it belongs to.
    SymlinkEscape,
    /// An entry type the sync refuses (device, fifo, socket, unknown).
    UnsupportedEntry,
    /// A file or directory name is not valid UTF-8.
    InvalidName,
    /// The workspace or archive exceeds the configured size or file-count
    /// limit; raised before anything is sent.
    LimitExceeded,
    /// Local and remote entries cannot be reconciled (e.g. a file where a
    /// directory is needed, or a path reached through a local symlink).
    Conflict,
    /// The archive is malformed or was truncated in transit.
    CorruptArchive,
    /// A remote transfer command exited non-zero.
    RemoteCommand,
    /// Local filesystem I/O failed.
    Io,
}

impl SyncErrorKind {
    /// A short name, used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncErrorKind::PathTraversal => "path traversal",
            SyncErrorKind::SymlinkEscape => "symlink escape",
            SyncErrorKind::UnsupportedEntry => "unsupported entry",
            SyncErrorKind::InvalidName => "invalid name",
            SyncErrorKind::LimitExceeded => "limit exceeded",
            SyncErrorKind::Conflict => "conflict",
            SyncErrorKind::CorruptArchive => "corrupt archive",
            SyncErrorKind::RemoteCommand => "remote command failed",
            SyncErrorKind::Io => "i/o error",
        }
    }
}

impl std::fmt::Display for SyncErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) fn sync_error(kind: SyncErrorKind, message: impl Into<String>) -> Error {
    Error::WorkspaceSync {
        kind,
        message: format!("workspace sync ({kind}): {}", message.into()),
        source: None,
    }
}

pub(crate) fn io_error(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::WorkspaceSync {
        kind: SyncErrorKind::Io,
        message: format!("workspace sync (i/o error): {what}: {e}"),
        source: Some(Box::new(e)),
    }
}
