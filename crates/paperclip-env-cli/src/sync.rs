//! `paperclip-env sync up|down LEASE DIR`: moves a workspace into a lease and
//! back, with progress (files, bytes, rate) on stderr.
//!
//! `up` uploads DIR into the lease (replacing the remote directory's
//! contents) and keeps the upload's snapshot next to the state file
//! (`baselines/<lease>.json`); `down` brings the remote directory back with a
//! three-way merge against that snapshot, so local edits to files the lease
//! did not touch survive and remote deletions apply only to files unchanged
//! locally. Without a snapshot, `down` adds and overwrites but deletes
//! nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use paperclip_env_core::workspace::{
    Snapshot, SyncDirection, SyncOptions, SyncPhase, SyncProgress, TransferMethod, WorkspaceSync,
};
use paperclip_env_core::{EnvironmentLease, Error, LeaseStatus, WorkspaceSpec};
use serde_json::json;

use crate::{App, print_json};

/// Which way `sync` moves the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Way {
    /// Local DIR into the lease.
    Up,
    /// The lease back into local DIR.
    Down,
}

/// Options of `paperclip-env sync`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) way: Way,
    pub(crate) lease: String,
    pub(crate) dir: PathBuf,
    pub(crate) remote: Option<String>,
    pub(crate) excludes: Vec<String>,
    pub(crate) baselines: PathBuf,
}

/// `1.5 KiB`, `12.0 MiB`.
pub(crate) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[0])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn phase_name(phase: SyncPhase) -> &'static str {
    match phase {
        SyncPhase::Packing => "packing",
        SyncPhase::Transferring => "transferring",
        SyncPhase::Unpacking => "unpacking",
        SyncPhase::Merging => "merging",
    }
}

fn method_name(method: &TransferMethod) -> String {
    match method {
        TransferMethod::ExecStdin => "exec-stdin".into(),
        TransferMethod::ExecArgs => "exec-args".into(),
        TransferMethod::Native(name) => name.clone(),
    }
}

/// Progress on stderr: a bar on a terminal, otherwise a line per phase
/// change and at most one every half second, so logs and tests see it.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last: Mutex<(Option<SyncPhase>, Option<Instant>)>,
}

impl Progress {
    fn new() -> Arc<Self> {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Arc::new(Progress {
            bar,
            started: Instant::now(),
            last: Mutex::new((None, None)),
        })
    }

    fn report(&self, p: &SyncProgress) {
        let way = match p.direction {
            SyncDirection::Upload => "up",
            SyncDirection::Download => "down",
        };
        if let Some(bar) = &self.bar {
            bar.set_message(phase_name(p.phase));
            bar.set_length(p.bytes_total.max(p.bytes_done));
            bar.set_position(p.bytes_done);
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = Instant::now();
        let phase_changed = last.0 != Some(p.phase);
        let due = last
            .1
            .is_none_or(|at| now.duration_since(at) >= Duration::from_millis(500));
        let done = p.bytes_total > 0 && p.bytes_done >= p.bytes_total;
        if !(phase_changed || due || done) {
            return;
        }
        *last = (Some(p.phase), Some(now));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let total = |n: u64| {
            if n == 0 {
                "?".to_owned()
            } else {
                n.to_string()
            }
        };
        eprintln!(
            "sync {way} {}: {}/{} files, {}/{}, {}/s",
            phase_name(p.phase),
            p.files_done,
            total(p.files_total),
            human_bytes(p.bytes_done as f64),
            if p.bytes_total == 0 {
                "?".to_owned()
            } else {
                human_bytes(p.bytes_total as f64)
            },
            human_bytes(p.bytes_done as f64 / secs),
        );
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn baseline_path(dir: &Path, lease: &str) -> PathBuf {
    let safe: String = lease
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.json"))
}

fn save_baseline(dir: &Path, lease: &str, snapshot: &Snapshot) -> Result<(), Error> {
    let io =
        |e: std::io::Error| Error::invalid_field("state", format!("saving the sync baseline: {e}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_string(snapshot)
        .map_err(|e| Error::invalid_field("state", format!("encoding the sync baseline: {e}")))?;
    std::fs::write(baseline_path(dir, lease), text).map_err(io)
}

fn load_baseline(dir: &Path, lease: &str) -> Option<Snapshot> {
    let text = std::fs::read_to_string(baseline_path(dir, lease)).ok()?;
    serde_json::from_str(&text).ok()
}

async fn remote_dir(
    app: &App,
    env: &paperclip_env_core::Environment,
    lease: &EnvironmentLease,
    remote: Option<String>,
) -> Result<String, Error> {
    if let Some(remote) = remote {
        return Ok(remote);
    }
    if let Some(cwd) = lease.remote_cwd() {
        return Ok(cwd.to_owned());
    }
    Ok(app
        .runtime
        .realize_workspace(env, lease, &WorkspaceSpec::default())
        .await?
        .cwd)
}

/// Runs `sync`.
pub(crate) async fn run(app: &App, options: Options) -> Result<std::process::ExitCode, Error> {
    let (lease, env) = app.lease_and_environment(&options.lease).await?;
    if lease.status != LeaseStatus::Active {
        return Err(Error::Conflict {
            message: format!("Lease {} is {}, not active.", lease.id, lease.status),
        });
    }
    let remote = remote_dir(app, &env, &lease, options.remote).await?;
    let progress = Progress::new();
    let mut sync_options = SyncOptions::default();
    for pattern in options.excludes {
        sync_options = sync_options.exclude(pattern);
    }
    let sink = progress.clone();
    let sync_options = sync_options.progress(move |p| sink.report(p));
    let sync = WorkspaceSync::for_lease(&app.runtime, &env, &lease).await?;
    let started = Instant::now();
    let outcome = match options.way {
        Way::Up => {
            let report = sync.upload(&options.dir, &remote, &sync_options).await;
            progress.finish();
            let report = report?;
            save_baseline(&options.baselines, &lease.id, &report.baseline)?;
            let elapsed = started.elapsed();
            let rate = report.archive_bytes as f64 / elapsed.as_secs_f64().max(0.001);
            eprintln!(
                "uploaded {} files ({}, archive {}) to {remote} in {:.2}s, {}/s via {}",
                report.files,
                human_bytes(report.bytes as f64),
                human_bytes(report.archive_bytes as f64),
                elapsed.as_secs_f64(),
                human_bytes(rate),
                method_name(&report.method),
            );
            json!({
                "direction": "up",
                "lease": lease.id,
                "remote": remote,
                "local": options.dir,
                "method": method_name(&report.method),
                "files": report.files,
                "dirs": report.dirs,
                "symlinks": report.symlinks,
                "bytes": report.bytes,
                "archiveBytes": report.archive_bytes,
                "skipped": report.skipped,
                "elapsedMs": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                "bytesPerSecond": rate.round(),
            })
        }
        Way::Down => {
            std::fs::create_dir_all(&options.dir).map_err(|e| {
                Error::invalid_field(
                    "dir",
                    format!("cannot create {}: {e}", options.dir.display()),
                )
            })?;
            let baseline = load_baseline(&options.baselines, &lease.id);
            let report = sync
                .download(&remote, &options.dir, baseline.as_ref(), &sync_options)
                .await;
            progress.finish();
            let report = report?;
            save_baseline(&options.baselines, &lease.id, &report.remote)?;
            let elapsed = started.elapsed();
            let rate = report.archive_bytes as f64 / elapsed.as_secs_f64().max(0.001);
            let changes = &report.changes;
            eprintln!(
                "downloaded {remote}: {} added, {} modified, {} deleted, {} kept local (archive {}) in {:.2}s, {}/s via {}",
                changes.added.len(),
                changes.modified.len(),
                changes.deleted.len(),
                changes.kept_local.len(),
                human_bytes(report.archive_bytes as f64),
                elapsed.as_secs_f64(),
                human_bytes(rate),
                method_name(&report.method),
            );
            if !app.json {
                for (tag, paths) in [
                    ("A", &changes.added),
                    ("M", &changes.modified),
                    ("D", &changes.deleted),
                    ("K", &changes.kept_local),
                ] {
                    for path in paths {
                        println!("{tag} {path}");
                    }
                }
            }
            json!({
                "direction": "down",
                "lease": lease.id,
                "remote": remote,
                "local": options.dir,
                "method": method_name(&report.method),
                "baseline": baseline.is_some(),
                "changes": {
                    "added": changes.added,
                    "modified": changes.modified,
                    "deleted": changes.deleted,
                    "keptLocal": changes.kept_local,
                },
                "archiveBytes": report.archive_bytes,
                "elapsedMs": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                "bytesPerSecond": rate.round(),
            })
        }
    };
    app.runtime.lease_store().touch(&lease.id).await?;
    if app.json {
        print_json(&outcome);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }

    #[test]
    fn baseline_files_are_named_safely() {
        let dir = Path::new("/state/baselines");
        assert_eq!(
            baseline_path(dir, "../x/y"),
            Path::new("/state/baselines/___x_y.json")
        );
    }
}
