//! Writing plain GNU/ustar archives and extracting untrusted ones safely.
//!
//! Archives carry no extended attributes and no PAX headers: every entry is a
//! GNU header (long names use GNU `L`/`K` records, which every GNU tar and
//! busybox tar read), owned by uid/gid 0, in sorted path order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::error::{SyncErrorKind, io_error, sync_error};
use super::snapshot::{EntryKind, ScanEntry, ScanKind, Snapshot, hex, symlink_escapes};
use crate::Result;

/// Counts and hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Writes `entries` (sorted) as a tar stream into `out`; returns the snapshot
/// of what was written, with file hashes computed on the way.
pub(crate) fn write_archive<W: Write>(
    entries: &[ScanEntry],
    out: W,
    mut on_file: impl FnMut(u64),
) -> Result<(Snapshot, W)> {
    let mut builder = tar::Builder::new(out);
    let mut snapshot = Snapshot::default();
    for entry in entries {
        let mut header = Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(entry.mtime);
        header.set_mode(entry.mode);
        let werr = |e: std::io::Error| io_error(format!("archiving {}", entry.rel), e);
        match &entry.kind {
            ScanKind::Dir => {
                header.set_entry_type(EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{}/", entry.rel), std::io::empty())
                    .map_err(werr)?;
                snapshot
                    .entries
                    .insert(entry.rel.clone(), EntryKind::Dir { mode: entry.mode });
            }
            ScanKind::Symlink { target } => {
                header.set_entry_type(EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, &entry.rel, target)
                    .map_err(werr)?;
                snapshot.entries.insert(
                    entry.rel.clone(),
                    EntryKind::Symlink {
                        target: target.clone(),
                    },
                );
            }
            ScanKind::File { size } => {
                header.set_entry_type(EntryType::Regular);
                header.set_size(*size);
                let file = File::open(&entry.abs)
                    .map_err(|e| io_error(format!("opening {}", entry.abs.display()), e))?;
                let mut reader = HashingReader {
                    inner: file.take(*size),
                    hasher: Sha256::new(),
                    read: 0,
                };
                builder
                    .append_data(&mut header, &entry.rel, &mut reader)
                    .map_err(werr)?;
                if reader.read != *size {
                    return Err(sync_error(
                        SyncErrorKind::Conflict,
                        format!("{} changed size while it was archived", entry.rel),
                    ));
                }
                snapshot.entries.insert(
                    entry.rel.clone(),
                    EntryKind::File {
                        mode: entry.mode,
                        size: *size,
                        sha256: hex(&reader.hasher.finalize()),
                    },
                );
                on_file(*size);
            }
        }
    }
    let out = builder
        .into_inner()
        .map_err(|e| io_error("finishing archive", e))?;
    Ok((snapshot, out))
}

/// Limits and policy of an extraction.
#[derive(Debug, Clone)]
pub(crate) struct ExtractPolicy {
    pub max_entries: u64,
    pub max_bytes: u64,
    pub allow_escaping_symlinks: bool,
}

/// Checks an archive path and turns it into a clean relative path; `None`
/// for the archive root (`./`).
pub(crate) fn clean_archive_path(raw: &[u8]) -> Result<Option<String>> {
    let text = std::str::from_utf8(raw).map_err(|_| {
        sync_error(
            SyncErrorKind::InvalidName,
            format!(
                "archive entry name is not UTF-8: {}",
                String::from_utf8_lossy(raw)
            ),
        )
    })?;
    if text.contains('\0') {
        return Err(sync_error(
            SyncErrorKind::InvalidName,
            format!("archive entry {text:?} contains a NUL byte"),
        ));
    }
    if text.starts_with('/') {
        return Err(sync_error(
            SyncErrorKind::PathTraversal,
            format!("archive entry {text:?} is an absolute path"),
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(sync_error(
                    SyncErrorKind::PathTraversal,
                    format!("archive entry {text:?} contains \"..\""),
                ));
            }
            p => parts.push(p),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Makes sure every ancestor of `rel` under `root` is a real directory
/// (creating missing ones); refuses to go through symlinks or files.
pub(crate) fn ensure_parents(root: &Path, rel: &str) -> Result<()> {
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(sync_error(
                    SyncErrorKind::SymlinkEscape,
                    format!(
                        "{rel} would be written through the symlink {}",
                        path.display()
                    ),
                ));
            }
            Ok(_) => {
                return Err(sync_error(
                    SyncErrorKind::Conflict,
                    format!("{rel}: {} is not a directory", path.display()),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path)
                    .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
            }
            Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
        }
    }
    Ok(())
}

/// Extracts an untrusted archive into `dest` (an empty staging directory).
///
/// Refuses absolute paths, `..`, devices, fifos and other special entries,
/// symlinks that leave `dest`, and archives over the limits. Symlinks are
/// created last, so no entry is ever written through one. Hard links become
/// copies of an earlier file of the same archive. Directory modes are recorded
/// in the snapshot but not applied (the staging tree stays writable).
pub(crate) fn extract_archive<R: Read>(
    reader: R,
    dest: &Path,
    policy: &ExtractPolicy,
    mut on_entry: impl FnMut(u64, u64),
) -> Result<Snapshot> {
    let corrupt = |e: std::io::Error| {
        sync_error(
            SyncErrorKind::CorruptArchive,
            format!("reading archive: {e}"),
        )
    };
    let mut archive = tar::Archive::new(reader);
    let mut snapshot = Snapshot::default();
    let mut symlinks: BTreeMap<String, String> = BTreeMap::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    for item in archive.entries().map_err(corrupt)? {
        let mut entry = item.map_err(corrupt)?;
        let entry_type = entry.header().entry_type();
        if matches!(entry_type, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let Some(rel) = clean_archive_path(&entry.path_bytes())? else {
            continue;
        };
        count += 1;
        if count > policy.max_entries {
            return Err(sync_error(
                SyncErrorKind::LimitExceeded,
                format!("archive has more than {} entries", policy.max_entries),
            ));
        }
        let mode = entry.header().mode().map_err(corrupt)? & 0o777;
        let path = dest.join(&rel);
        match entry_type {
            EntryType::Directory => {
                ensure_parents(dest, &rel)?;
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        return Err(sync_error(
                            SyncErrorKind::Conflict,
                            format!("archive entry {rel} is both a file and a directory"),
                        ));
                    }
                    Err(_) => std::fs::create_dir(&path)
                        .map_err(|e| io_error(format!("creating {}", path.display()), e))?,
                }
                snapshot.entries.insert(rel, EntryKind::Dir { mode });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                bytes = bytes.saturating_add(size);
                if bytes > policy.max_bytes {
                    return Err(sync_error(
                        SyncErrorKind::LimitExceeded,
                        format!("archive holds more than {} bytes", policy.max_bytes),
                    ));
                }
                ensure_parents(dest, &rel)?;
                remove_existing_file(&path, &rel, &mut snapshot)?;
                let mtime = entry.header().mtime().ok();
                let (size, sha256) = write_new_file(&path, &mut entry, mode, mtime)?;
                snapshot
                    .entries
                    .insert(rel, EntryKind::File { mode, size, sha256 });
                on_entry(count, size);
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(std::io::Error::other("hard link without target")))?;
                let target = clean_archive_path(&target)?.ok_or_else(|| {
                    sync_error(
                        SyncErrorKind::PathTraversal,
                        format!("hard link {rel} to root"),
                    )
                })?;
                let Some(EntryKind::File { mode, size, sha256 }) =
                    snapshot.entries.get(&target).cloned()
                else {
                    return Err(sync_error(
                        SyncErrorKind::UnsupportedEntry,
                        format!("hard link {rel} does not point at an earlier file ({target})"),
                    ));
                };
                bytes = bytes.saturating_add(size);
                if bytes > policy.max_bytes {
                    return Err(sync_error(
                        SyncErrorKind::LimitExceeded,
                        format!("archive holds more than {} bytes", policy.max_bytes),
                    ));
                }
                ensure_parents(dest, &rel)?;
                remove_existing_file(&path, &rel, &mut snapshot)?;
                std::fs::copy(dest.join(&target), &path)
                    .map_err(|e| io_error(format!("copying {target} to {rel}"), e))?;
                snapshot
                    .entries
                    .insert(rel, EntryKind::File { mode, size, sha256 });
                on_entry(count, size);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(std::io::Error::other("symlink without target")))?;
                let target = std::str::from_utf8(&target)
                    .map_err(|_| {
                        sync_error(
                            SyncErrorKind::InvalidName,
                            format!("symlink target of {rel} is not UTF-8"),
                        )
                    })?
                    .to_owned();
                if !policy.allow_escaping_symlinks && symlink_escapes(&rel, &target) {
                    return Err(sync_error(
                        SyncErrorKind::SymlinkEscape,
                        format!("symlink {rel} -> {target} points outside the workspace"),
                    ));
                }
                symlinks.insert(rel, target);
            }
            other => {
                return Err(sync_error(
                    SyncErrorKind::UnsupportedEntry,
                    format!("archive entry {rel} has unsupported type {other:?}"),
                ));
            }
        }
    }
    for (rel, target) in symlinks {
        ensure_parents(dest, &rel)?;
        let path = dest.join(&rel);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(sync_error(
                    SyncErrorKind::Conflict,
                    format!("archive entry {rel} is both a directory and a symlink"),
                ));
            }
            Ok(_) => {
                std::fs::remove_file(&path)
                    .map_err(|e| io_error(format!("replacing {}", path.display()), e))?;
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&target, &path)
            .map_err(|e| io_error(format!("creating symlink {}", path.display()), e))?;
        snapshot.entries.insert(rel, EntryKind::Symlink { target });
    }
    if !policy.allow_escaping_symlinks {
        check_symlinks_resolve_inside(dest, &snapshot)?;
    }
    Ok(snapshot)
}

/// Resolves every symlink that points at something existing and checks the
/// result stays under `root` (catches chains the textual check cannot see,
/// such as `a -> .` followed by `b -> a/..`).
pub(crate) fn check_symlinks_resolve_inside(root: &Path, snapshot: &Snapshot) -> Result<()> {
    let canonical_root = std::fs::canonicalize(root)
        .map_err(|e| io_error(format!("resolving {}", root.display()), e))?;
    for (rel, kind) in &snapshot.entries {
        if let EntryKind::Symlink { target } = kind
            && let Ok(resolved) = std::fs::canonicalize(root.join(rel))
            && !resolved.starts_with(&canonical_root)
        {
            return Err(sync_error(
                SyncErrorKind::SymlinkEscape,
                format!("symlink {rel} -> {target} resolves outside the workspace"),
            ));
        }
    }
    Ok(())
}

fn remove_existing_file(path: &Path, rel: &str, snapshot: &mut Snapshot) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(sync_error(
            SyncErrorKind::Conflict,
            format!("archive entry {rel} is both a directory and a file"),
        )),
        Ok(_) => {
            snapshot.entries.remove(rel);
            std::fs::remove_file(path)
                .map_err(|e| io_error(format!("replacing {}", path.display()), e))
        }
        Err(_) => Ok(()),
    }
}

fn write_new_file(
    path: &PathBuf,
    data: &mut impl Read,
    mode: u32,
    mtime: Option<u64>,
) -> Result<(u64, String)> {
    let werr = |e: std::io::Error| io_error(format!("writing {}", path.display()), e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    let mut reader = HashingReader {
        inner: data,
        hasher: Sha256::new(),
        read: 0,
    };
    std::io::copy(&mut reader, &mut file).map_err(|e| {
        sync_error(
            SyncErrorKind::CorruptArchive,
            format!("reading {} from the archive: {e}", path.display()),
        )
    })?;
    if let Some(mtime) = mtime {
        let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(werr)?;
    Ok((reader.read, hex(&reader.hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_cleaned_or_refused() {
        assert_eq!(
            clean_archive_path(b"./a/b").unwrap().as_deref(),
            Some("a/b")
        );
        assert_eq!(clean_archive_path(b"./").unwrap(), None);
        assert!(clean_archive_path(b"/etc/passwd").is_err());
        assert!(clean_archive_path(b"a/../../x").is_err());
        assert!(clean_archive_path(b"\xff").is_err());
        let nul = clean_archive_path(b"a\0b").unwrap_err().to_string();
        assert!(
            nul.contains("NUL byte") && !nul.contains("absolute"),
            "{nul}"
        );
    }
}
