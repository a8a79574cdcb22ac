//! The hook for providers that can move files without `execute`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Capabilities, Result};

/// Moves whole files between this machine and a lease without going through
/// `execute` (an SSH channel, a provider's file API).
///
/// The sync still runs `tar` remotely through `execute`; a transport only
/// replaces the chunked base64 transfer of the archive. Attach one with
/// [`WorkspaceSync::transport`](super::WorkspaceSync::transport); it is used
/// when the provider declares [`Capabilities::native_sync`](crate::Capabilities).
#[async_trait]
pub trait WorkspaceTransport: Send + Sync {
    /// A short name for logs and reports (`"ssh"`, `"e2b-files"`).
    fn name(&self) -> &str;

    /// Copies the local file `local` to the absolute remote path `remote`
    /// (its directory exists), replacing any file there.
    async fn put_file(&self, local: &Path, remote: &str, timeout_ms: u64) -> Result<()>;

    /// Copies the absolute remote path `remote` into the local file `local`.
    async fn get_file(&self, remote: &str, local: &Path, timeout_ms: u64) -> Result<()>;
}

/// What a driver tells workspace sync about a lease: the provider's
/// capabilities (when known) and a native transport (when it has one).
/// Returned by `EnvironmentRuntimeDriver::workspace_access`.
#[derive(Clone, Default)]
pub struct WorkspaceAccess {
    /// The capabilities of the lease's provider; `None`: unknown (stdin is assumed).
    pub capabilities: Option<Capabilities>,
    /// A transport that moves archives without `execute`.
    pub transport: Option<Arc<dyn WorkspaceTransport>>,
}

impl std::fmt::Debug for WorkspaceAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceAccess")
            .field("capabilities", &self.capabilities)
            .field(
                "transport",
                &self.transport.as_ref().map(|t| t.name().to_owned()),
            )
            .finish()
    }
}
