//! Three-way merge of a downloaded tree into the local workspace (spec 00
//! §13.4): remote wins for everything it changed since the upload baseline;
//! an entry deleted remotely is deleted locally only if the local copy still
//! equals the baseline.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::archive::ensure_parents;
use super::error::{SyncErrorKind, io_error, sync_error};
use super::snapshot::{EntryKind, Snapshot, hash_file};
use crate::Result;

/// What a download changed in the local workspace. Paths are relative and
/// `/`-separated; directories are included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncChanges {
    /// Entries that did not exist locally.
    pub added: Vec<String>,
    /// Entries replaced by the remote version (content, mode, type or target).
    pub modified: Vec<String>,
    /// Entries removed because they were deleted remotely.
    pub deleted: Vec<String>,
    /// Entries deleted remotely but kept because they changed locally since
    /// the upload.
    pub kept_local: Vec<String>,
}

impl SyncChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.modified.is_empty() && self.deleted.is_empty()
    }
}

/// The local entry at `rel`, if it exists and is reachable without
/// following a symlink; `None` when absent.
fn local_entry(
    root: &Path,
    rel: &str,
    want_hash_for: Option<&EntryKind>,
) -> Result<Option<EntryKind>> {
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(_) => return Ok(None),
        }
    }
    let path = root.join(rel);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    let ft = meta.file_type();
    Ok(Some(if ft.is_dir() {
        EntryKind::Dir { mode }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(&path)
            .map_err(|e| io_error(format!("reading link {}", path.display()), e))?;
        EntryKind::Symlink {
            target: target.to_string_lossy().into_owned(),
        }
    } else if ft.is_file() {
        let size = meta.len();
        // Hash only when the comparison can still come out equal.
        let sha256 = match want_hash_for {
            Some(EntryKind::File {
                mode: m, size: s, ..
            }) if *m == mode && *s == size => hash_file(&path)?,
            _ => String::new(),
        };
        EntryKind::File { mode, size, sha256 }
    } else {
        return Err(sync_error(
            SyncErrorKind::UnsupportedEntry,
            format!("{rel} is a special file locally"),
        ));
    }))
}

fn remove_any(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.map_err(|e| io_error(format!("removing {}", path.display()), e))
}

/// Applies `remote` (extracted under `staging`, same filesystem as `local`)
/// onto `local`. Files are moved out of `staging`. Returns what changed.
pub(crate) fn merge(
    local: &Path,
    staging: &Path,
    remote: &Snapshot,
    baseline: Option<&Snapshot>,
    mut on_entry: impl FnMut(u64),
) -> Result<SyncChanges> {
    let mut changes = SyncChanges::default();
    let mut dir_modes = Vec::new();
    let mut done = 0u64;
    for (rel, remote_kind) in &remote.entries {
        done += 1;
        on_entry(done);
        let base = baseline.and_then(|b| b.entries.get(rel));
        if baseline.is_some() && base == Some(remote_kind) {
            continue;
        }
        let current = local_entry(local, rel, Some(remote_kind))?;
        if current.as_ref() == Some(remote_kind) {
            continue;
        }
        ensure_parents(local, rel)?;
        let dst = local.join(rel);
        match remote_kind {
            EntryKind::Dir { mode } => {
                match &current {
                    Some(EntryKind::Dir { .. }) => {}
                    Some(_) => {
                        remove_any(&dst)?;
                        std::fs::create_dir(&dst)
                            .map_err(|e| io_error(format!("creating {}", dst.display()), e))?;
                    }
                    None => std::fs::create_dir(&dst)
                        .map_err(|e| io_error(format!("creating {}", dst.display()), e))?,
                }
                dir_modes.push((dst, *mode));
            }
            EntryKind::File { .. } | EntryKind::Symlink { .. } => {
                if matches!(current, Some(EntryKind::Dir { .. })) {
                    remove_any(&dst)?;
                }
                // rename() replaces a file or symlink atomically.
                let src = staging.join(rel);
                std::fs::rename(&src, &dst)
                    .map_err(|e| io_error(format!("moving {rel} into place"), e))?;
            }
        }
        if current.is_some() {
            changes.modified.push(rel.clone());
        } else {
            changes.added.push(rel.clone());
        }
    }
    if let Some(baseline) = baseline {
        // Deepest first, so directories are emptied before they are removed.
        for (rel, base_kind) in baseline.entries.iter().rev() {
            if remote.entries.contains_key(rel) {
                continue;
            }
            let Some(current) = local_entry(local, rel, Some(base_kind))? else {
                continue;
            };
            let path = local.join(rel);
            match base_kind {
                EntryKind::Dir { .. } => {
                    if current.is_dir() && std::fs::remove_dir(&path).is_ok() {
                        changes.deleted.push(rel.clone());
                    } else {
                        changes.kept_local.push(rel.clone());
                    }
                }
                _ if &current == base_kind => {
                    std::fs::remove_file(&path)
                        .map_err(|e| io_error(format!("removing {}", path.display()), e))?;
                    changes.deleted.push(rel.clone());
                }
                _ => changes.kept_local.push(rel.clone()),
            }
        }
        changes.deleted.sort();
        changes.kept_local.sort();
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error(format!("setting mode of {}", dir.display()), e))?;
    }
    Ok(changes)
}
