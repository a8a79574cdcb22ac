//! Walking a workspace (with excludes) and describing it as a [`Snapshot`].

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SyncOptions;
use super::error::{SyncErrorKind, io_error, sync_error};
use crate::{Error, Result};

/// Name of the runtime directory that is never synchronised (spec 00 §13.3).
pub const RUNTIME_DIR: &str = ".paperclip-runtime";

/// One entry of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EntryKind {
    /// A directory with its permission bits.
    Dir {
        /// Permission bits (`0o777` mask).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits (`0o777` mask).
        mode: u32,
        /// Length in bytes.
        size: u64,
        /// Lowercase hex SHA-256 of the contents.
        sha256: String,
    },
    /// A symbolic link (never followed).
    Symlink {
        /// The link target, as stored.
        target: String,
    },
}

impl EntryKind {
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self, EntryKind::Dir { .. })
    }
}

/// The state of a workspace tree: relative `/`-separated paths to entries,
/// sorted. Upload returns one as the baseline for the three-way merge of a
/// later download; it serializes to JSON so callers can persist it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Entries by relative path.
    pub entries: BTreeMap<String, EntryKind>,
}

impl Snapshot {
    /// Number of regular files.
    pub fn file_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, EntryKind::File { .. }))
            .count()
    }

    /// Sum of regular file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// Reads a local tree (no excludes beyond the runtime directory and
    /// AppleDouble files), hashing every file.
    pub fn of_dir(root: &Path) -> Result<Snapshot> {
        let options = SyncOptions {
            respect_gitignore: false,
            heavy_dir_excludes: Vec::new(),
            ..SyncOptions::default()
        };
        let scan = scan(root, &Filter::new(root, &options)?, &options)?;
        let mut snapshot = Snapshot::default();
        for entry in scan.entries {
            let kind = match entry.kind {
                ScanKind::Dir => EntryKind::Dir { mode: entry.mode },
                ScanKind::Symlink { target } => EntryKind::Symlink { target },
                ScanKind::File { size } => EntryKind::File {
                    mode: entry.mode,
                    size,
                    sha256: hash_file(&entry.abs)?,
                },
            };
            snapshot.entries.insert(entry.rel, kind);
        }
        Ok(snapshot)
    }
}

/// Which paths a sync skips: `.paperclip-runtime`, AppleDouble `._*` files,
/// `.gitignore` rules (optional) and the caller's gitignore-style patterns.
#[derive(Clone)]
pub(crate) struct Filter {
    patterns: Arc<Gitignore>,
    preserve: Arc<Vec<String>>,
}

impl Filter {
    pub(crate) fn new(root: &Path, options: &SyncOptions) -> Result<Filter> {
        let mut builder = GitignoreBuilder::new(root);
        // Heavy directories first, so a later caller pattern (`!dist/`) can
        // re-include one, as gitignore's last match wins.
        for name in options.effective_heavy_dirs() {
            builder
                .add_line(None, &format!("{name}/"))
                .map_err(|e| Error::InvalidInput {
                    what: "heavy directory exclude",
                    message: format!("{name:?}: {e}"),
                })?;
        }
        for pattern in &options.exclude {
            builder
                .add_line(None, pattern)
                .map_err(|e| Error::InvalidInput {
                    what: "exclude pattern",
                    message: format!("{pattern:?}: {e}"),
                })?;
        }
        let patterns = builder.build().map_err(|e| Error::InvalidInput {
            what: "exclude pattern",
            message: e.to_string(),
        })?;
        for name in &options.preserve {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(Error::InvalidInput {
                    what: "preserved name",
                    message: format!("{name:?} must be a single top-level name"),
                });
            }
        }
        Ok(Filter {
            patterns: Arc::new(patterns),
            preserve: Arc::new(options.preserve.clone()),
        })
    }

    /// Whether `rel` (relative, `/`-separated) is excluded by the fixed rules
    /// or the caller's patterns (not by `.gitignore` files).
    pub(crate) fn excludes(&self, rel: &Path, is_dir: bool) -> bool {
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        if name == RUNTIME_DIR || name.starts_with("._") {
            return true;
        }
        if let Some(top) = rel.iter().next().and_then(|c| c.to_str())
            && (top == RUNTIME_DIR || self.preserve.iter().any(|p| p == top))
        {
            return true;
        }
        self.patterns
            .matched_path_or_any_parents(rel, is_dir)
            .is_ignore()
    }
}

/// What a scanned path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanKind {
    Dir,
    File { size: u64 },
    Symlink { target: String },
}

/// One scanned path.
#[derive(Debug, Clone)]
pub(crate) struct ScanEntry {
    pub rel: String,
    pub abs: PathBuf,
    pub kind: ScanKind,
    pub mode: u32,
    pub mtime: u64,
}

/// The result of walking a tree.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Sorted by relative path.
    pub entries: Vec<ScanEntry>,
    /// Special files (sockets, fifos, devices) that were left out.
    pub skipped: Vec<String>,
}

/// Walks `root` without following symlinks.
pub(crate) fn scan(root: &Path, filter: &Filter, options: &SyncOptions) -> Result<Scan> {
    let meta = std::fs::symlink_metadata(root)
        .map_err(|e| io_error(format!("reading {}", root.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidInput {
            what: "workspace directory",
            message: format!("{} is not a directory", root.display()),
        });
    }
    let mut walker = ignore::WalkBuilder::new(root);
    walker
        .standard_filters(false)
        .hidden(false)
        .git_ignore(options.respect_gitignore)
        .require_git(false)
        .follow_links(false);
    let walk_filter = filter.clone();
    let walk_root = root.to_path_buf();
    walker.filter_entry(move |entry| {
        let Ok(rel) = entry.path().strip_prefix(&walk_root) else {
            return true;
        };
        if rel.as_os_str().is_empty() {
            return true;
        }
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        !walk_filter.excludes(rel, is_dir)
    });
    let mut out = Scan::default();
    for item in walker.build() {
        let entry = item.map_err(|e| {
            sync_error(
                SyncErrorKind::Io,
                format!("walking {}: {e}", root.display()),
            )
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let abs = entry.path().to_path_buf();
        let rel_path = abs.strip_prefix(root).map_err(|_| {
            sync_error(
                SyncErrorKind::Io,
                format!("{} is outside the workspace", abs.display()),
            )
        })?;
        let rel = rel_str(rel_path)?;
        let meta = std::fs::symlink_metadata(&abs)
            .map_err(|e| io_error(format!("reading {}", abs.display()), e))?;
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            ScanKind::Dir
        } else if file_type.is_file() {
            ScanKind::File { size: meta.len() }
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&abs)
                .map_err(|e| io_error(format!("reading link {}", abs.display()), e))?;
            let target = target.to_str().ok_or_else(|| {
                sync_error(
                    SyncErrorKind::InvalidName,
                    format!("symlink target of {rel} is not UTF-8"),
                )
            })?;
            ScanKind::Symlink {
                target: target.to_owned(),
            }
        } else {
            out.skipped.push(rel);
            continue;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        out.entries.push(ScanEntry {
            rel,
            abs,
            kind,
            mode: meta.permissions().mode() & 0o777,
            mtime,
        });
    }
    out.entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// A relative path as a `/`-separated UTF-8 string.
pub(crate) fn rel_str(rel: &Path) -> Result<String> {
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            std::path::Component::Normal(part) => parts.push(part.to_str().ok_or_else(|| {
                sync_error(
                    SyncErrorKind::InvalidName,
                    format!("{} is not valid UTF-8", rel.display()),
                )
            })?),
            std::path::Component::CurDir => {}
            _ => {
                return Err(sync_error(
                    SyncErrorKind::PathTraversal,
                    format!("{} is not a plain relative path", rel.display()),
                ));
            }
        }
    }
    Ok(parts.join("/"))
}

/// Whether a symlink at `link_rel` (relative to the tree root) pointing at
/// `target` leaves the tree, judged on the text of the paths.
pub(crate) fn symlink_escapes(link_rel: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return true;
    }
    let mut depth: i64 = link_rel.split('/').filter(|p| !p.is_empty()).count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// SHA-256 of a file, lowercase hex.
pub(crate) fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_error(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_is_judged_from_the_link_directory() {
        assert!(!symlink_escapes("a", "b"));
        assert!(!symlink_escapes("d/a", "../b"));
        assert!(symlink_escapes("a", "../b"));
        assert!(symlink_escapes("d/a", "../../b"));
        assert!(symlink_escapes("a", "/etc/passwd"));
        assert!(!symlink_escapes("d/e/a", "./x/../../y"));
        assert!(symlink_escapes("a", ""));
    }

    #[test]
    fn filter_always_skips_runtime_dir_and_appledouble() {
        let root = Path::new("/w");
        let f = Filter::new(
            root,
            &SyncOptions {
                exclude: vec!["*.log".into(), "build/".into()],
                ..SyncOptions::default()
            },
        )
        .unwrap();
        assert!(f.excludes(Path::new(".paperclip-runtime"), true));
        assert!(f.excludes(Path::new(".paperclip-runtime/x"), false));
        assert!(f.excludes(Path::new("src/._foo.rs"), false));
        assert!(f.excludes(Path::new("a/b.log"), false));
        assert!(f.excludes(Path::new("build"), true));
        assert!(!f.excludes(Path::new("build"), false));
        assert!(!f.excludes(Path::new("src/main.rs"), false));
    }
}
