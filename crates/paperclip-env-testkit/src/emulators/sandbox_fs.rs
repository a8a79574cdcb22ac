//! One sandbox's filesystem: a host directory that plays the sandbox's `/`.
//!
//! File APIs resolve every sandbox path under that root and refuse paths
//! that leave it (through `..` or a symlink), so a client can never read or
//! write the host's files. Commands run as local processes; the paths of the
//! sandbox's writable trees (`/home`, `/tmp`, `/root`, `/workspace`, …) in
//! their argv, env and cwd are mapped under the root, and the root is mapped
//! back out of their output, so `pwd` prints `/home/user`.

use std::path::{Path, PathBuf};

/// Sandbox trees that live under the root; everything else (`/bin`,
/// `/usr`, `/etc`) is the host's, read-only by convention.
const MOUNTS: &[&str] = &[
    "/home",
    "/tmp",
    "/root",
    "/workspace",
    "/paperclip-workspace",
    "/code",
    "/mnt",
    "/var/tmp",
];

/// A sandbox root on the host.
#[derive(Debug, Clone)]
pub(crate) struct SandboxFs {
    root: PathBuf,
    root_text: String,
}

/// Why a sandbox path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathRefused(pub String);

impl SandboxFs {
    /// A root at `root` (created, with `/tmp` and `/home/user`).
    pub(crate) fn create(root: PathBuf) -> std::io::Result<SandboxFs> {
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::create_dir_all(root.join("home/user"))?;
        let root = root.canonicalize()?;
        let root_text = root.to_string_lossy().into_owned();
        Ok(SandboxFs { root, root_text })
    }

    /// The host directory playing `/`.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of sandbox path `path` (absolute, or relative to
    /// `home`), refused when it resolves outside the root.
    pub(crate) fn resolve(&self, path: &str, home: &str) -> Result<PathBuf, PathRefused> {
        if path.contains('\0') {
            return Err(PathRefused("path contains a NUL byte".into()));
        }
        let full = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("{home}/{path}")
        };
        let mut parts: Vec<&str> = Vec::new();
        for part in full.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                part => parts.push(part),
            }
        }
        let host = self.root.join(parts.join("/"));
        // The deepest existing ancestor must stay inside the root once
        // symlinks are followed.
        let mut probe = host.clone();
        while std::fs::symlink_metadata(&probe).is_err() {
            if !probe.pop() {
                break;
            }
        }
        let real = probe
            .canonicalize()
            .map_err(|e| PathRefused(format!("cannot resolve {path}: {e}")))?;
        if !real.starts_with(&self.root) {
            return Err(PathRefused(format!("{path} leads outside the sandbox")));
        }
        Ok(host)
    }

    /// The sandbox path of a host path under the root.
    pub(crate) fn sandbox_path(&self, host: &Path) -> String {
        match host.strip_prefix(&self.root) {
            Ok(rest) if rest.as_os_str().is_empty() => "/".into(),
            Ok(rest) => format!("/{}", rest.to_string_lossy()),
            Err(_) => host.to_string_lossy().into_owned(),
        }
    }

    /// `text` with every sandbox tree path mapped under the root (at path
    /// boundaries; paths already under the root are left alone).
    pub(crate) fn map_in(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < text.len() {
            let boundary_before = i == 0 || is_boundary(bytes[i - 1]);
            if boundary_before && bytes[i] == b'/' && !text[i..].starts_with(&self.root_text) {
                let rest = &text[i..];
                if let Some(mount) = MOUNTS.iter().find(|m| {
                    rest.starts_with(**m)
                        && rest[m.len()..]
                            .bytes()
                            .next()
                            .is_none_or(|b| b == b'/' || is_boundary(b))
                }) {
                    out.push_str(&self.root_text);
                    out.push_str(mount);
                    i += mount.len();
                    continue;
                }
            }
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
        out
    }

    /// A command run inside this sandbox: `program` and the cwd mapped
    /// under the root, the environment cleared but for `PATH`, `HOME` (the
    /// sandbox path `home`, mapped) and `TMPDIR` (the sandbox's `/tmp`),
    /// stdin closed, stdout and stderr piped, its own process group (kill
    /// it with `killpg`), killed when dropped.
    pub(crate) fn command(&self, program: &str, cwd: &Path, home: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.map_in(program));
        command
            .current_dir(cwd)
            .env_clear()
            .env("PATH", crate::fake::DEFAULT_PATH)
            .env("HOME", self.map_in(home))
            .env("TMPDIR", self.root.join("tmp"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// A streaming mapper of process output back to sandbox paths.
    pub(crate) fn unmapper(&self) -> Unmapper {
        Unmapper {
            root: self.root_text.clone().into_bytes(),
            held: Vec::new(),
        }
    }
}

fn is_boundary(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t'
            | b'\n'
            | b'\r'
            | b'\''
            | b'"'
            | b'`'
            | b'='
            | b':'
            | b';'
            | b'('
            | b')'
            | b'<'
            | b'>'
            | b'|'
            | b'&'
            | b','
            | b'{'
            | b'['
    )
}

/// Reads a process's output until EOF, maps the root back out of it and
/// sends each chunk wrapped by `wrap` (stops when the receiver is gone).
pub(crate) async fn pump<T>(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    mut unmapper: Unmapper,
    tx: tokio::sync::mpsc::Sender<T>,
    wrap: impl Fn(Vec<u8>) -> T,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = unmapper.push(&buf[..n]);
                if !data.is_empty() && tx.send(wrap(data)).await.is_err() {
                    return;
                }
            }
        }
    }
    let rest = unmapper.finish();
    if !rest.is_empty() {
        let _ = tx.send(wrap(rest)).await;
    }
}

/// Removes the root from output chunks, even when one is split across
/// chunks (the start of the root is held back until the next one).
pub(crate) struct Unmapper {
    root: Vec<u8>,
    held: Vec<u8>,
}

impl Unmapper {
    /// The mapped bytes of `chunk` that are safe to emit now.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            if data[i..].starts_with(&self.root) {
                i += self.root.len();
                // The root itself is `/`; `<root>/x` is `/x`.
                if data.get(i) != Some(&b'/') {
                    out.push(b'/');
                }
                continue;
            }
            out.push(data[i]);
            i += 1;
        }
        let keep = (1..self.root.len().min(out.len() + 1))
            .rev()
            .find(|k| out.ends_with(&self.root[..*k]))
            .unwrap_or(0);
        self.held = out.split_off(out.len() - keep);
        out
    }

    /// Whatever is still held back.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs() -> (tempfile::TempDir, SandboxFs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = SandboxFs::create(dir.path().join("sbx")).unwrap();
        (dir, fs)
    }

    #[test]
    fn paths_resolve_under_the_root_and_never_leave_it() {
        let (_dir, fs) = fs();
        let root = fs.root().to_path_buf();
        assert_eq!(
            fs.resolve("/etc/passwd", "/home/user").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            fs.resolve("a/b.txt", "/home/user").unwrap(),
            root.join("home/user/a/b.txt")
        );
        assert_eq!(
            fs.resolve("/../../etc", "/home/user").unwrap(),
            root.join("etc")
        );
        std::os::unix::fs::symlink("/etc", root.join("home/user/out")).unwrap();
        assert!(fs.resolve("out/passwd", "/home/user").is_err());
        assert!(fs.resolve("/home/user/out", "/home/user").is_err());
        assert_eq!(fs.sandbox_path(&root.join("home/user/x")), "/home/user/x");
        assert_eq!(fs.sandbox_path(&root), "/");
    }

    #[test]
    fn command_paths_are_mapped_in_and_output_is_mapped_out() {
        let (_dir, fs) = fs();
        let root = fs.root().to_string_lossy().into_owned();
        assert_eq!(
            fs.map_in("cd '/home/user/w' && cat </tmp/in >/dev/null; ls /usr/bin /homework"),
            format!(
                "cd '{root}/home/user/w' && cat <{root}/tmp/in >/dev/null; ls /usr/bin /homework"
            )
        );
        let mapped = fs.map_in("/tmp/x");
        assert_eq!(fs.map_in(&mapped), mapped, "mapping twice changes nothing");

        let mut unmapper = fs.unmapper();
        let text = format!("{root}/home/user\n{root}\n");
        let (a, b) = text.as_bytes().split_at(root.len() / 2);
        let mut out = unmapper.push(a);
        out.extend(unmapper.push(b));
        out.extend(unmapper.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "/home/user\n/\n");
    }
}
