//! Workspace synchronisation (spec 00 §13.4): move a local workspace into a
//! lease and bring the changes back.
//!
//! * **Archives** are plain GNU/ustar tar streams written with the `tar`
//!   crate: no extended attributes, no PAX headers, no AppleDouble `._*`
//!   files, entries in sorted order. The remote side only needs `sh`, `tar`,
//!   `base64`, `dd`, `wc`, `find` and `mv`, which the sandbox contract
//!   guarantees.
//! * **Transfer** goes through the runtime's `execute`: chunks of base64 on
//!   stdin appended to a remote file (several MiB per command), or, for
//!   providers without stdin, `printf` chunks in argv. A provider that
//!   declares [`Capabilities::native_sync`] can move the archive with a
//!   [`WorkspaceTransport`] instead. Every command carries the caller's
//!   timeout (default 300 000 ms).
//! * **Excludes**: `.paperclip-runtime` and `._*` always, `.gitignore` rules
//!   (optional, on by default), Paperclip 2026.916's heavy directories
//!   ([`DEFAULT_HEAVY_DIR_EXCLUDES`]: `node_modules`, `vendor`, `dist`,
//!   `build`, `out`, `coverage`, `.next`, `.turbo`, `.cache`, at any depth;
//!   [`SyncOptions::heavy_dir_excludes`], re-included by a caller pattern
//!   such as `!dist/`) and the caller's gitignore-style patterns. Spec 00
//!   §13.4 had no default excludes; issue #22 wins. Unlike upstream, only
//!   *directories* of those names are left out (a file called `build` is
//!   source).
//! * An **empty workspace** packs to a valid empty tar (two zero blocks).
//!   Size and file-count limits are checked before anything is sent.
//! * **Safety**: extraction (locally with our own checks, remotely into a
//!   staging directory) refuses `..`, absolute paths, devices and symlinks
//!   leaving the tree. A remote upload only replaces the workspace after the
//!   archive extracted completely; a local download is merged from a staging
//!   directory, and an interrupted merge leaves
//!   `.paperclip-runtime/sync-incomplete` behind.
//! * **Download** does the three-way merge of §13.4 against the upload
//!   baseline and reports what changed.

mod archive;
mod error;
mod merge;
mod snapshot;
mod transport;

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

pub use error::SyncErrorKind;
pub use merge::SyncChanges;
pub use snapshot::{EntryKind, RUNTIME_DIR, Snapshot};
pub use transport::{WorkspaceAccess, WorkspaceTransport};

use archive::{ExtractPolicy, extract_archive, write_archive};
use error::{io_error, sync_error};
use snapshot::{Filter, ScanKind, scan, symlink_escapes};

use crate::execute::{ExecuteRequest, ExecuteResult, OutputCapture};
use crate::lease::{Environment, EnvironmentLease};
use crate::provider::Capabilities;
use crate::runtime::EnvironmentRuntime;
use crate::{Error, Result};

/// Timeout of each transfer command when the caller gives none (spec 00 §13.3).
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// Raw archive bytes per transfer command (8 MiB of base64).
pub const DEFAULT_CHUNK_BYTES: usize = 6 * 1024 * 1024;
/// Raw bytes per `printf` command when the provider has no stdin (the
/// base64 text stays well below Linux's 128 KiB single-argument limit).
pub const ARGV_CHUNK_BYTES: usize = 48 * 1024;
/// Default limit on the bytes of file content in one transfer (4 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Default limit on entries (files, directories, symlinks) in one transfer.
pub const DEFAULT_MAX_FILES: u64 = 250_000;

/// Receives progress reports; called from transfer tasks, keep it quick.
pub type ProgressCallback = Arc<dyn Fn(&SyncProgress) + Send + Sync>;

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDirection {
    /// Local workspace into the lease.
    Upload,
    /// Lease back into the local workspace.
    Download,
}

/// The step a transfer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Writing the archive (upload) or having the remote side write it (download).
    Packing,
    /// Moving archive bytes.
    Transferring,
    /// Extracting the archive.
    Unpacking,
    /// Applying the download to the local workspace.
    Merging,
}

/// One progress report. Byte counts are file-content bytes while packing and
/// unpacking, archive bytes while transferring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// Upload or download.
    pub direction: SyncDirection,
    /// Current step.
    pub phase: SyncPhase,
    /// Bytes done in this step.
    pub bytes_done: u64,
    /// Bytes this step will handle (0 when unknown).
    pub bytes_total: u64,
    /// Entries done in this step.
    pub files_done: u64,
    /// Entries this step will handle (0 when unknown).
    pub files_total: u64,
}

/// Directories Paperclip 2026.916 leaves out of every sandbox workspace
/// archive (`SANDBOX_WORKSPACE_HEAVY_DIR_NAMES` in `@paperclipai/adapter-utils`),
/// matched by name at any depth, on top of `.gitignore`.
pub const DEFAULT_HEAVY_DIR_EXCLUDES: [&str; 9] = [
    "node_modules",
    "vendor",
    "dist",
    "build",
    "out",
    "coverage",
    ".next",
    ".turbo",
    ".cache",
];

/// Options of an upload or download.
///
/// ```
/// use paperclip_env_core::workspace::SyncOptions;
/// let options = SyncOptions::default().exclude("node_modules/").exclude("*.log").timeout_ms(60_000);
/// assert!(options.respect_gitignore);
/// ```
#[derive(Clone)]
pub struct SyncOptions {
    /// Extra gitignore-style patterns to leave out (relative to the workspace root).
    pub exclude: Vec<String>,
    /// Honour `.gitignore` files in the tree (default `true`).
    pub respect_gitignore: bool,
    /// Directory names left out at any depth (default
    /// [`DEFAULT_HEAVY_DIR_EXCLUDES`]); empty to send everything. A caller
    /// pattern `!name` / `!name/` re-includes one of them.
    pub heavy_dir_excludes: Vec<String>,
    /// Most file-content bytes one transfer may carry (on download: archive bytes).
    pub max_bytes: u64,
    /// Most entries one transfer may carry.
    pub max_files: u64,
    /// Plan only: scan and check limits, send nothing (upload).
    pub dry_run: bool,
    /// Timeout of every transfer command.
    pub timeout_ms: u64,
    /// Raw archive bytes per transfer command over stdin (rounded down to a
    /// multiple of 3 so base64 chunks concatenate).
    pub chunk_bytes: usize,
    /// Allow symlinks whose target leaves the workspace (default: refused).
    pub allow_escaping_symlinks: bool,
    /// Top-level names that live only remotely (e.g. a dependency cache):
    /// an upload neither sends, deletes nor overwrites them, and a download
    /// does not bring them back (spec 00 §13.4 "preserved names").
    pub preserve: Vec<String>,
    /// Progress callback.
    pub progress: Option<ProgressCallback>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            exclude: Vec::new(),
            respect_gitignore: true,
            heavy_dir_excludes: DEFAULT_HEAVY_DIR_EXCLUDES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
            dry_run: false,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            allow_escaping_symlinks: false,
            preserve: Vec::new(),
            progress: None,
        }
    }
}

impl std::fmt::Debug for SyncOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncOptions")
            .field("exclude", &self.exclude)
            .field("respect_gitignore", &self.respect_gitignore)
            .field("heavy_dir_excludes", &self.heavy_dir_excludes)
            .field("max_bytes", &self.max_bytes)
            .field("max_files", &self.max_files)
            .field("dry_run", &self.dry_run)
            .field("timeout_ms", &self.timeout_ms)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("allow_escaping_symlinks", &self.allow_escaping_symlinks)
            .field("preserve", &self.preserve)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl SyncOptions {
    /// Adds a gitignore-style exclude pattern.
    pub fn exclude(mut self, pattern: impl Into<String>) -> Self {
        self.exclude.push(pattern.into());
        self
    }

    /// Replaces the heavy directory names left out by default
    /// (an empty list sends them all).
    pub fn heavy_dir_excludes<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.heavy_dir_excludes = names.into_iter().map(Into::into).collect();
        self
    }

    /// The heavy directory names in force: [`Self::heavy_dir_excludes`]
    /// minus those a caller pattern re-includes (`!name`, `!name/`,
    /// `!**/name`, `!**/name/`).
    pub fn effective_heavy_dirs(&self) -> Vec<&str> {
        let negated: Vec<&str> = self
            .exclude
            .iter()
            .filter_map(|p| p.trim().strip_prefix('!'))
            .map(|p| p.trim_start_matches("**/").trim_end_matches('/'))
            .collect();
        self.heavy_dir_excludes
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty() && !n.contains('/') && !negated.contains(n))
            .collect()
    }

    /// Adds a top-level name that is left alone remotely.
    pub fn preserve(mut self, name: impl Into<String>) -> Self {
        self.preserve.push(name.into());
        self
    }

    /// Sets the per-command timeout.
    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = timeout_ms;
        self
    }

    /// Sets the content-byte limit.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the entry-count limit.
    pub fn max_files(mut self, max_files: u64) -> Self {
        self.max_files = max_files;
        self
    }

    /// Plan only.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets the raw bytes per transfer command.
    pub fn chunk_bytes(mut self, chunk_bytes: usize) -> Self {
        self.chunk_bytes = chunk_bytes;
        self
    }

    /// Sets the progress callback.
    pub fn progress(mut self, callback: impl Fn(&SyncProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(callback));
        self
    }

    fn report(&self, progress: SyncProgress) {
        if let Some(callback) = &self.progress {
            callback(&progress);
        }
    }

    fn policy(&self) -> ExtractPolicy {
        ExtractPolicy {
            max_entries: self.max_files,
            max_bytes: self.max_bytes,
            allow_escaping_symlinks: self.allow_escaping_symlinks,
        }
    }
}

/// How archive bytes travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferMethod {
    /// Base64 chunks on stdin of `execute`.
    ExecStdin,
    /// Base64 chunks in `printf` arguments of `execute` (no stdin).
    ExecArgs,
    /// A [`WorkspaceTransport`], named.
    Native(String),
}

/// What an upload sent (or, with `dry_run`, would send).
#[derive(Debug, Clone)]
pub struct UploadReport {
    /// How the archive travelled (planned method for a dry run).
    pub method: TransferMethod,
    /// Whether nothing was sent.
    pub dry_run: bool,
    /// Every path included, sorted.
    pub paths: Vec<String>,
    /// Regular files included.
    pub files: u64,
    /// Directories included.
    pub dirs: u64,
    /// Symlinks included.
    pub symlinks: u64,
    /// File-content bytes included.
    pub bytes: u64,
    /// Size of the archive sent (0 for a dry run).
    pub archive_bytes: u64,
    /// Special files (sockets, fifos, devices) left out.
    pub skipped: Vec<String>,
    /// The uploaded state, the baseline of a later download's merge (empty
    /// for a dry run).
    pub baseline: Snapshot,
}

/// What a download brought back.
#[derive(Debug, Clone)]
pub struct DownloadReport {
    /// How the archive travelled.
    pub method: TransferMethod,
    /// Size of the archive received.
    pub archive_bytes: u64,
    /// What changed locally.
    pub changes: SyncChanges,
    /// The remote state received (after excludes): the baseline of the next
    /// round trip.
    pub remote: Snapshot,
}

/// Uploads and downloads a workspace for one lease.
pub struct WorkspaceSync<'a> {
    runtime: &'a EnvironmentRuntime,
    environment: &'a Environment,
    lease: &'a EnvironmentLease,
    capabilities: Option<Capabilities>,
    transport: Option<Arc<dyn WorkspaceTransport>>,
}

impl std::fmt::Debug for WorkspaceSync<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceSync")
            .field("lease", &self.lease.id)
            .field("method", &self.method())
            .finish_non_exhaustive()
    }
}

/// Single-quotes a value for `sh` (spec 00 §13.3).
pub use crate::provider::support::shell_quote;

fn tmp_file() -> Result<std::fs::File> {
    tempfile::tempfile().map_err(|e| io_error("creating a temporary archive", e))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sync_error(SyncErrorKind::Io, format!("sync task failed: {e}")))?
}

impl<'a> WorkspaceSync<'a> {
    /// Sync for `lease` of `environment`, through `runtime`.
    ///
    /// ```no_run
    /// # async fn demo(runtime: &paperclip_env_core::EnvironmentRuntime,
    /// #   env: &paperclip_env_core::Environment,
    /// #   lease: &paperclip_env_core::EnvironmentLease) -> paperclip_env_core::Result<()> {
    /// use std::path::Path;
    /// use paperclip_env_core::workspace::{SyncOptions, WorkspaceSync};
    ///
    /// let sync = WorkspaceSync::new(runtime, env, lease);
    /// let remote = lease.remote_cwd().unwrap_or("/tmp/workspace").to_owned();
    /// let options = SyncOptions::default().exclude("node_modules/");
    /// let up = sync.upload(Path::new("./agent-workspace"), &remote, &options).await?;
    /// // ... run the agent in the lease ...
    /// let down = sync
    ///     .download(&remote, Path::new("./agent-workspace"), Some(&up.baseline), &options)
    ///     .await?;
    /// println!("added {:?}, modified {:?}, deleted {:?}",
    ///     down.changes.added, down.changes.modified, down.changes.deleted);
    /// # Ok(()) }
    /// ```
    pub fn new(
        runtime: &'a EnvironmentRuntime,
        environment: &'a Environment,
        lease: &'a EnvironmentLease,
    ) -> Self {
        WorkspaceSync {
            runtime,
            environment,
            lease,
            capabilities: None,
            transport: None,
        }
    }

    /// Sync for `lease`, configured by the lease's driver: the sandbox driver
    /// reports its provider's capabilities (stdin, `native_sync`) and
    /// transport, so the transfer path is chosen for the caller.
    pub async fn for_lease(
        runtime: &'a EnvironmentRuntime,
        environment: &'a Environment,
        lease: &'a EnvironmentLease,
    ) -> Result<Self> {
        let key = lease.driver_key(environment);
        let driver = runtime
            .driver(key)
            .ok_or_else(|| Error::DriverNotRegistered {
                driver: key.to_owned(),
            })?;
        let access = driver
            .workspace_access(runtime.context(), environment, lease)
            .await?;
        Ok(WorkspaceSync {
            runtime,
            environment,
            lease,
            capabilities: access.capabilities,
            transport: access.transport,
        })
    }

    /// Declares what the lease's provider can do: `stdin` picks base64 over
    /// stdin (else `printf` arguments), `native_sync` allows the transport.
    /// Without it, stdin is assumed and an attached transport is used.
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = Some(capabilities);
        self
    }

    /// Attaches a native transport for the archive.
    pub fn transport(mut self, transport: Arc<dyn WorkspaceTransport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The transfer path the capabilities choose.
    pub fn method(&self) -> TransferMethod {
        let native_allowed = self.capabilities.is_none_or(|c| c.native_sync);
        match (&self.transport, self.capabilities) {
            (Some(t), _) if native_allowed => TransferMethod::Native(t.name().to_owned()),
            (_, Some(c)) if !c.stdin => TransferMethod::ExecArgs,
            _ => TransferMethod::ExecStdin,
        }
    }

    async fn run(
        &self,
        step: &str,
        script: String,
        stdin: Option<String>,
        capture: OutputCapture,
        options: &SyncOptions,
    ) -> Result<ExecuteResult> {
        // Spec 00 §13.3/§13.5: bash only when the lease declares it.
        let shell = if self.lease.metadata_str("shellCommand") == Some("bash") {
            "bash"
        } else {
            "sh"
        };
        let mut request = ExecuteRequest::new(shell)
            .arg("-c")
            .arg(script)
            .timeout_ms(options.timeout_ms)
            .capture(capture);
        request.stdin = stdin;
        let result = self
            .runtime
            .execute(self.environment, self.lease, &request)
            .await?;
        if result.timed_out {
            return Err(Error::Timeout {
                operation: format!("workspace sync: {step}"),
                after: Duration::from_millis(options.timeout_ms),
            });
        }
        if !result.success() {
            let code = result
                .exit_code
                .map_or_else(|| "null".to_owned(), |c| c.to_string());
            let stderr = result.stderr.trim();
            let detail = if stderr.is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.chars().take(2000).collect::<String>())
            };
            return Err(sync_error(
                SyncErrorKind::RemoteCommand,
                format!("{step} failed with exit code {code}{detail}"),
            ));
        }
        Ok(result)
    }

    /// Uploads `local_dir` into the absolute `remote_dir`, which afterwards
    /// holds exactly the uploaded tree (plus its `.paperclip-runtime`).
    ///
    /// Limits and symlink checks run before anything is sent. The remote
    /// workspace is only replaced after the archive extracted completely into
    /// a staging directory; if the swap itself fails,
    /// `<remote_dir>/.paperclip-runtime/sync/INCOMPLETE` marks it.
    pub async fn upload(
        &self,
        local_dir: &Path,
        remote_dir: &str,
        options: &SyncOptions,
    ) -> Result<UploadReport> {
        check_remote_dir(remote_dir)?;
        let root = local_dir.to_path_buf();
        let scan_options = options.clone();
        let scanned = blocking(move || {
            let filter = Filter::new(&root, &scan_options)?;
            scan(&root, &filter, &scan_options)
        })
        .await?;
        let mut report = UploadReport {
            method: self.method(),
            dry_run: options.dry_run,
            paths: Vec::with_capacity(scanned.entries.len()),
            files: 0,
            dirs: 0,
            symlinks: 0,
            bytes: 0,
            archive_bytes: 0,
            skipped: scanned.skipped.clone(),
            baseline: Snapshot::default(),
        };
        for entry in &scanned.entries {
            match &entry.kind {
                ScanKind::Dir => report.dirs += 1,
                ScanKind::File { size } => {
                    report.files += 1;
                    report.bytes += size;
                }
                ScanKind::Symlink { target } => {
                    report.symlinks += 1;
                    if !options.allow_escaping_symlinks && symlink_escapes(&entry.rel, target) {
                        return Err(sync_error(
                            SyncErrorKind::SymlinkEscape,
                            format!(
                                "symlink {} -> {target} points outside the workspace",
                                entry.rel
                            ),
                        ));
                    }
                }
            }
            report.paths.push(entry.rel.clone());
        }
        let entries = scanned.entries.len() as u64;
        if entries > options.max_files {
            return Err(sync_error(
                SyncErrorKind::LimitExceeded,
                format!(
                    "workspace has {entries} entries, the limit is {}",
                    options.max_files
                ),
            ));
        }
        if report.bytes > options.max_bytes {
            return Err(sync_error(
                SyncErrorKind::LimitExceeded,
                format!(
                    "workspace holds {} bytes, the limit is {}",
                    report.bytes, options.max_bytes
                ),
            ));
        }
        if options.dry_run {
            return Ok(report);
        }

        let pack_options = options.clone();
        let (files_total, bytes_total) = (report.files, report.bytes);
        let (baseline, mut archive) = blocking(move || {
            let (mut files_done, mut bytes_done) = (0u64, 0u64);
            let (snapshot, file) = write_archive(
                &scanned.entries,
                std::io::BufWriter::with_capacity(1 << 20, tmp_file()?),
                |size| {
                    files_done += 1;
                    bytes_done += size;
                    if files_done % 256 == 0 || files_done == files_total {
                        pack_options.report(SyncProgress {
                            direction: SyncDirection::Upload,
                            phase: SyncPhase::Packing,
                            bytes_done,
                            bytes_total,
                            files_done,
                            files_total,
                        });
                    }
                },
            )?;
            let mut file = file
                .into_inner()
                .map_err(|e| io_error("writing the archive", e.into_error()))?;
            file.rewind()
                .map_err(|e| io_error("rewinding the archive", e))?;
            Ok((snapshot, file))
        })
        .await?;
        let archive_len = archive
            .metadata()
            .map_err(|e| io_error("reading the archive", e))?
            .len();
        report.archive_bytes = archive_len;
        report.baseline = baseline;

        let id = uuid::Uuid::new_v4().simple().to_string();
        let vars = remote_vars(remote_dir, &id);
        let result = self
            .send_archive(&vars, &mut archive, archive_len, entries, options)
            .await;
        if result.is_err() {
            let cleanup = format!("{vars}rm -rf \"$ST\" \"$B64\" \"$TAR\"", vars = vars.script);
            let _ = self
                .run(
                    "upload cleanup",
                    cleanup,
                    None,
                    OutputCapture::Limit(4096),
                    options,
                )
                .await;
        }
        result.map(|()| report)
    }

    async fn send_archive(
        &self,
        vars: &RemoteVars,
        archive: &mut std::fs::File,
        archive_len: u64,
        entries: u64,
        options: &SyncOptions,
    ) -> Result<()> {
        let method = self.method();
        let prepare = format!(
            "{v}mkdir -p \"$R\" \"$RT\" && rm -f \"$B64\" \"$TAR\" && : > \"$B64\"",
            v = vars.script
        );
        let small = OutputCapture::Limit(64 * 1024);
        self.run("upload prepare", prepare, None, small, options)
            .await?;
        let progress = |bytes_done: u64| {
            options.report(SyncProgress {
                direction: SyncDirection::Upload,
                phase: SyncPhase::Transferring,
                bytes_done,
                bytes_total: archive_len,
                files_done: 0,
                files_total: entries,
            })
        };
        let decode = match &method {
            TransferMethod::Native(_) => {
                if let Some(transport) = &self.transport {
                    let path = tempfile::NamedTempFile::new()
                        .map_err(|e| io_error("creating a temporary archive", e))?;
                    let mut out = path
                        .reopen()
                        .map_err(|e| io_error("creating a temporary archive", e))?;
                    std::io::copy(archive, &mut out)
                        .map_err(|e| io_error("copying the archive", e))?;
                    transport
                        .put_file(path.path(), &vars.tar, options.timeout_ms)
                        .await?;
                    progress(archive_len);
                }
                ""
            }
            TransferMethod::ExecStdin | TransferMethod::ExecArgs => {
                let stdin = method == TransferMethod::ExecStdin;
                let chunk = if stdin {
                    (options.chunk_bytes.max(3) / 3) * 3
                } else {
                    ARGV_CHUNK_BYTES
                };
                let mut buf = vec![0u8; chunk];
                let mut sent = 0u64;
                loop {
                    let n = read_full(archive, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    let text = BASE64.encode(&buf[..n]);
                    if stdin {
                        let script = format!("{v}cat >> \"$B64\"", v = vars.script);
                        self.run("upload chunk", script, Some(text), small, options)
                            .await?;
                    } else {
                        let script = format!(
                            "{v}printf '%s' {text} >> \"$B64\"",
                            v = vars.script,
                            text = shell_quote(&text)
                        );
                        self.run("upload chunk", script, None, small, options)
                            .await?;
                    }
                    sent += n as u64;
                    progress(sent);
                }
                "base64 -d < \"$B64\" > \"$TAR\"\nrm -f \"$B64\"\n"
            }
        };
        let finalize = format!(
            r#"{v}set -e
trap 'rm -rf "$ST" "$B64" "$TAR"' EXIT
{decode}size=$(wc -c < "$TAR" | tr -d ' ')
if [ "$size" -ne {archive_len} ]; then echo "archive arrived with $size bytes, expected {archive_len}" >&2; exit 3; fi
rm -rf "$ST"
mkdir -p "$ST"
tar -xpf "$TAR" -C "$ST"
rm -f "$TAR"
: > "$RT/INCOMPLETE"
find "$R" -mindepth 1 -maxdepth 1 ! -name {runtime}{preserved} -exec rm -rf -- {{}} +
for f in "$ST"/* "$ST"/.[!.]* "$ST"/..?*; do
  if [ -e "$f" ] || [ -L "$f" ]; then mv -- "$f" "$R"/; fi
done
rm -f "$RT/INCOMPLETE"
"#,
            v = vars.script,
            runtime = RUNTIME_DIR,
            preserved = options
                .preserve
                .iter()
                .map(|name| format!(" ! -name {}", shell_quote(name)))
                .collect::<String>(),
        );
        options.report(SyncProgress {
            direction: SyncDirection::Upload,
            phase: SyncPhase::Unpacking,
            bytes_done: 0,
            bytes_total: archive_len,
            files_done: 0,
            files_total: entries,
        });
        self.run("upload extract", finalize, None, small, options)
            .await?;
        options.report(SyncProgress {
            direction: SyncDirection::Upload,
            phase: SyncPhase::Unpacking,
            bytes_done: archive_len,
            bytes_total: archive_len,
            files_done: entries,
            files_total: entries,
        });
        Ok(())
    }

    /// Downloads the absolute `remote_dir` into `local_dir` and merges it
    /// three-way against `baseline` (the [`UploadReport::baseline`] of the
    /// upload): remote changes win, entries deleted remotely are deleted
    /// locally only if unchanged locally since the upload. Without a
    /// baseline nothing is deleted and every remote difference wins.
    ///
    /// The archive is extracted and checked in a staging directory under
    /// `<local_dir>/.paperclip-runtime` first; a failure there leaves the
    /// workspace untouched. A failure while merging leaves
    /// `<local_dir>/.paperclip-runtime/sync-incomplete` and says so.
    pub async fn download(
        &self,
        remote_dir: &str,
        local_dir: &Path,
        baseline: Option<&Snapshot>,
        options: &SyncOptions,
    ) -> Result<DownloadReport> {
        check_remote_dir(remote_dir)?;
        // Validate patterns before any remote work.
        Filter::new(local_dir, options)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let vars = remote_vars(remote_dir, &id);
        let mut excludes = format!("--exclude={} --exclude='._*'", shell_quote(RUNTIME_DIR));
        for name in &options.preserve {
            excludes.push_str(" --exclude=");
            excludes.push_str(&shell_quote(&format!("./{name}")));
        }
        for pattern in &options.exclude {
            // Plain names mean the same to tar and gitignore; the rest is
            // filtered locally after the transfer.
            let plain = pattern.trim_end_matches('/');
            if !plain.is_empty() && !plain.contains('/') && !plain.starts_with('!') {
                excludes.push_str(" --exclude=");
                excludes.push_str(&shell_quote(plain));
            }
        }
        options.report(SyncProgress {
            direction: SyncDirection::Download,
            phase: SyncPhase::Packing,
            bytes_done: 0,
            bytes_total: 0,
            files_done: 0,
            files_total: 0,
        });
        // Heavy directories are pruned remotely by `find` into an exclude
        // file (`tar -X`, GNU and BusyBox alike), so a regular file with one
        // of those names still comes back; the local filter applies the same
        // rule after the transfer.
        let heavy = options.effective_heavy_dirs();
        let heavy_list = if heavy.is_empty() {
            String::new()
        } else {
            let names = heavy
                .iter()
                .map(|n| format!("-name {}", shell_quote(n)))
                .collect::<Vec<_>>()
                .join(" -o ");
            excludes.push_str(" -X \"$RT/heavy-excludes\"");
            format!(
                "(cd \"$R\" && find . -type d \\( {names} \\) -prune -print) > \"$RT/heavy-excludes\"\n"
            )
        };
        let pack = format!(
            "{v}set -e\nmkdir -p \"$RT\"\n{heavy_list}tar -cf \"$TAR\" -C \"$R\" {excludes} .\nrm -f \"$RT/heavy-excludes\"\nwc -c < \"$TAR\"",
            v = vars.script
        );
        let small = OutputCapture::Limit(64 * 1024);
        let result = self.fetch_archive(&vars, pack, options, small).await;
        let cleanup = format!("{v}rm -f \"$TAR\"", v = vars.script);
        let _ = self
            .run("download cleanup", cleanup, None, small, options)
            .await;
        let (archive, archive_len) = result?;

        let local = local_dir.to_path_buf();
        let merge_options = options.clone();
        let baseline = baseline.cloned();
        let changes_and_remote = blocking(move || {
            apply_download(
                &local,
                archive,
                archive_len,
                baseline.as_ref(),
                &merge_options,
            )
        })
        .await?;
        Ok(DownloadReport {
            method: self.method(),
            archive_bytes: archive_len,
            changes: changes_and_remote.0,
            remote: changes_and_remote.1,
        })
    }

    async fn fetch_archive(
        &self,
        vars: &RemoteVars,
        pack: String,
        options: &SyncOptions,
        small: OutputCapture,
    ) -> Result<(std::fs::File, u64)> {
        let packed = self
            .run("download pack", pack, None, small, options)
            .await?;
        let archive_len: u64 = packed.stdout.trim().parse().map_err(|_| {
            sync_error(
                SyncErrorKind::RemoteCommand,
                format!(
                    "download pack printed {:?} instead of the archive size",
                    packed.stdout.trim()
                ),
            )
        })?;
        if archive_len
            > options
                .max_bytes
                .saturating_add(options.max_files.saturating_mul(1024))
        {
            return Err(sync_error(
                SyncErrorKind::LimitExceeded,
                format!(
                    "remote workspace archive has {archive_len} bytes, the limit is {} bytes of content",
                    options.max_bytes
                ),
            ));
        }
        let mut file = tmp_file()?;
        match (self.method(), &self.transport) {
            (TransferMethod::Native(_), Some(transport)) => {
                let path = tempfile::NamedTempFile::new()
                    .map_err(|e| io_error("creating a temporary archive", e))?;
                transport
                    .get_file(&vars.tar, path.path(), options.timeout_ms)
                    .await?;
                let mut src = path
                    .reopen()
                    .map_err(|e| io_error("reading the downloaded archive", e))?;
                std::io::copy(&mut src, &mut file)
                    .map_err(|e| io_error("copying the downloaded archive", e))?;
            }
            _ => {
                let chunk = (options.chunk_bytes.max(3) / 3) * 3;
                let mut offset = 0u64;
                let mut index = 0u64;
                while offset < archive_len {
                    let script = format!(
                        "{v}dd if=\"$TAR\" bs={chunk} skip={index} count=1 2>/dev/null | base64",
                        v = vars.script
                    );
                    let out = self
                        .run("download chunk", script, None, OutputCapture::Full, options)
                        .await?;
                    let text: String = out.stdout.split_ascii_whitespace().collect();
                    let bytes = BASE64.decode(text.as_bytes()).map_err(|e| {
                        sync_error(
                            SyncErrorKind::CorruptArchive,
                            format!("download chunk {index} is not valid base64: {e}"),
                        )
                    })?;
                    let expected = (archive_len - offset).min(chunk as u64);
                    if bytes.len() as u64 != expected {
                        return Err(sync_error(
                            SyncErrorKind::CorruptArchive,
                            format!(
                                "download chunk {index} has {} bytes, expected {expected}",
                                bytes.len()
                            ),
                        ));
                    }
                    file.write_all(&bytes)
                        .map_err(|e| io_error("writing the downloaded archive", e))?;
                    offset += expected;
                    index += 1;
                    options.report(SyncProgress {
                        direction: SyncDirection::Download,
                        phase: SyncPhase::Transferring,
                        bytes_done: offset,
                        bytes_total: archive_len,
                        files_done: 0,
                        files_total: 0,
                    });
                }
            }
        }
        file.rewind()
            .map_err(|e| io_error("rewinding the downloaded archive", e))?;
        Ok((file, archive_len))
    }
}

/// Writes the archive an upload of `local_dir` would send into `out` (after
/// excludes and limits) and returns its snapshot. Blocking; useful for
/// inspection, caching and tools.
///
/// ```
/// use paperclip_env_core::workspace::{pack, SyncOptions};
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("a.txt"), "hi")?;
/// let mut archive = Vec::new();
/// let snapshot = pack(dir.path(), &SyncOptions::default(), &mut archive)?;
/// assert_eq!(snapshot.file_count(), 1);
/// assert_eq!(archive.len() % 512, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pack<W: Write>(local_dir: &Path, options: &SyncOptions, out: W) -> Result<Snapshot> {
    let filter = Filter::new(local_dir, options)?;
    let scanned = scan(local_dir, &filter, options)?;
    let entries = scanned.entries.len() as u64;
    let bytes: u64 = scanned
        .entries
        .iter()
        .map(|e| match e.kind {
            ScanKind::File { size } => size,
            _ => 0,
        })
        .sum();
    if entries > options.max_files || bytes > options.max_bytes {
        return Err(sync_error(
            SyncErrorKind::LimitExceeded,
            format!(
                "workspace has {entries} entries and {bytes} bytes, the limits are {} and {}",
                options.max_files, options.max_bytes
            ),
        ));
    }
    for entry in &scanned.entries {
        if let ScanKind::Symlink { target } = &entry.kind
            && !options.allow_escaping_symlinks
            && symlink_escapes(&entry.rel, target)
        {
            return Err(sync_error(
                SyncErrorKind::SymlinkEscape,
                format!(
                    "symlink {} -> {target} points outside the workspace",
                    entry.rel
                ),
            ));
        }
    }
    write_archive(&scanned.entries, out, |_| {}).map(|(snapshot, _)| snapshot)
}

/// Extracts an untrusted archive into the empty directory `dest` with the
/// same checks a download applies (no `..`, no absolute paths, no devices,
/// no escaping symlinks, limits), returning what it extracted. Blocking.
pub fn unpack<R: Read>(archive: R, dest: &Path, options: &SyncOptions) -> Result<Snapshot> {
    extract_archive(archive, dest, &options.policy(), |_, _| {})
}

/// Extracts the downloaded archive into staging, filters it and merges it.
fn apply_download(
    local: &Path,
    archive: std::fs::File,
    archive_len: u64,
    baseline: Option<&Snapshot>,
    options: &SyncOptions,
) -> Result<(SyncChanges, Snapshot)> {
    std::fs::create_dir_all(local)
        .map_err(|e| io_error(format!("creating {}", local.display()), e))?;
    let runtime_dir = local.join(RUNTIME_DIR);
    std::fs::create_dir_all(&runtime_dir)
        .map_err(|e| io_error(format!("creating {}", runtime_dir.display()), e))?;
    let staging = tempfile::Builder::new()
        .prefix("sync-staging-")
        .tempdir_in(&runtime_dir)
        .map_err(|e| io_error("creating the staging directory", e))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, archive);
    let extracted = extract_archive(reader, staging.path(), &options.policy(), |done, _| {
        if done % 256 == 0 {
            options.report(SyncProgress {
                direction: SyncDirection::Download,
                phase: SyncPhase::Unpacking,
                bytes_done: 0,
                bytes_total: archive_len,
                files_done: done,
                files_total: 0,
            });
        }
    })?;
    let filter = Filter::new(staging.path(), options)?;
    let kept = scan(staging.path(), &filter, options)?;
    let mut remote = Snapshot::default();
    for entry in kept.entries {
        if let Some(kind) = extracted.entries.get(&entry.rel) {
            remote.entries.insert(entry.rel, kind.clone());
        }
    }
    let _lock = MergeLock::acquire(&runtime_dir)?;
    let marker = runtime_dir.join("sync-incomplete");
    std::fs::write(&marker, b"a workspace download was being merged here\n")
        .map_err(|e| io_error(format!("writing {}", marker.display()), e))?;
    let total = remote.entries.len() as u64;
    let changes = merge::merge(local, staging.path(), &remote, baseline, |done| {
        if done % 256 == 0 || done == total {
            options.report(SyncProgress {
                direction: SyncDirection::Download,
                phase: SyncPhase::Merging,
                bytes_done: 0,
                bytes_total: 0,
                files_done: done,
                files_total: total,
            });
        }
    })
    .map_err(|e| match e {
        Error::WorkspaceSync {
            kind,
            message,
            source,
        } => Error::WorkspaceSync {
            kind,
            message: format!(
                "{message} (the local workspace was partially updated; {} marks it)",
                marker.display()
            ),
            source,
        },
        other => other,
    })?;
    let _ = std::fs::remove_file(&marker);
    Ok((changes, remote))
}

/// How old a merge lock must be before another download may take it over.
pub const MERGE_LOCK_STALE_AFTER: Duration = Duration::from_secs(30);

/// A per-workspace merge lock (`.paperclip-runtime/sync.lock`), so two
/// downloads never merge into the same directory at once. A lock older than
/// [`MERGE_LOCK_STALE_AFTER`] is taken over; it is removed on drop.
struct MergeLock {
    path: std::path::PathBuf,
}

impl MergeLock {
    fn acquire(runtime_dir: &Path) -> Result<MergeLock> {
        let path = runtime_dir.join("sync.lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let _ = writeln!(file, "pid {}", std::process::id());
                    return Ok(MergeLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default();
                    if age < MERGE_LOCK_STALE_AFTER {
                        return Err(sync_error(
                            SyncErrorKind::Conflict,
                            format!(
                                "another download is merging into this workspace ({} is {}s old)",
                                path.display(),
                                age.as_secs()
                            ),
                        ));
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io_error(format!("creating {}", path.display()), e)),
            }
        }
        Err(sync_error(
            SyncErrorKind::Conflict,
            format!("could not take the merge lock {}", path.display()),
        ))
    }
}

impl Drop for MergeLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file
            .read(&mut buf[filled..])
            .map_err(|e| io_error("reading the archive", e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

fn check_remote_dir(remote_dir: &str) -> Result<()> {
    if !remote_dir.starts_with('/') || remote_dir.contains('\0') || remote_dir.trim() == "/" {
        return Err(Error::InvalidInput {
            what: "remote workspace directory",
            message: format!("{remote_dir:?} must be an absolute path other than /"),
        });
    }
    Ok(())
}

/// Shell variables every remote step starts with.
struct RemoteVars {
    script: String,
    tar: String,
}

fn remote_vars(remote_dir: &str, id: &str) -> RemoteVars {
    let remote = remote_dir.trim_end_matches('/');
    let runtime = format!("{remote}/{RUNTIME_DIR}/sync");
    let tar = format!("{runtime}/transfer-{id}.tar");
    let script = format!(
        "R={r}; RT={rt}; ST={st}; B64={b64}; TAR={tar}\n",
        r = shell_quote(remote),
        rt = shell_quote(&runtime),
        st = shell_quote(&format!("{runtime}/staging-{id}")),
        b64 = shell_quote(&format!("{runtime}/transfer-{id}.b64")),
        tar = shell_quote(&tar),
    );
    RemoteVars { script, tar }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
