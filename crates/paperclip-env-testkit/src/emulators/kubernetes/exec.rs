//! Pod processes: the `exec` subresource over WebSocket (channel protocol
//! `v5.channel.k8s.io` / `v4.channel.k8s.io`), run-to-completion
//! containers, `pods/{name}/log`, and the mapping of in-pod paths to the
//! pod's root directory (see the module docs of [`super`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::faults::{Fault, Hook};
use super::store::{ApiError, Key};
use super::{MainState, Shared};
use crate::fake::DEFAULT_PATH;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// Characters that continue a path component.
fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Rewrites every occurrence of one of `mounts` (absolute in-pod paths) in
/// `text` to `<root><mount>`, at path boundaries only, longest mount first.
pub(crate) fn rewrite(text: &str, root: &Path, mounts: &[String]) -> String {
    let root = root.to_string_lossy();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut previous: Option<char> = None;
    'scan: while let Some(c) = rest.chars().next() {
        let boundary_before =
            previous.is_none_or(|p| !(path_char(p) || p == '/' || p == '$' || p == '~'));
        if c == '/' && boundary_before {
            for mount in mounts {
                if let Some(after) = rest.strip_prefix(mount.as_str())
                    && after.chars().next().is_none_or(|n| !path_char(n))
                {
                    out.push_str(&root);
                    out.push_str(mount);
                    previous = mount.chars().last();
                    rest = after;
                    continue 'scan;
                }
            }
        }
        out.push(c);
        previous = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Maps the pod root back out of a process's output, so `pwd` or an error
/// message shows `/workspace/…` as in a real pod rather than the host path.
///
/// Works on raw bytes across read boundaries: a chunk's tail that could be
/// the start of the root is held back until the next chunk (or the end).
pub(crate) struct Unmapper {
    root: Vec<u8>,
    carry: Vec<u8>,
}

impl Unmapper {
    /// `active: false` passes every byte through untouched (isolated pods).
    pub(crate) fn new(root: &Path, active: bool) -> Self {
        Self {
            root: if active {
                root.to_string_lossy().into_owned().into_bytes()
            } else {
                Vec::new()
            },
            carry: Vec::new(),
        }
    }

    /// The bytes of `chunk` that can be released now.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            if !self.root.is_empty() && data[i..].starts_with(&self.root) {
                i += self.root.len();
                continue;
            }
            out.push(data[i]);
            i += 1;
        }
        // Hold back the longest tail that is a proper prefix of the root.
        let keep = (1..self.root.len().min(out.len() + 1))
            .rev()
            .find(|k| out.ends_with(&self.root[..*k]))
            .unwrap_or(0);
        self.carry = out.split_off(out.len() - keep);
        out
    }

    /// Whatever is still held back, at end of stream.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

/// Host directories a pod sees (bound read-through into its root when
/// pods are isolated); everything else in the pod's filesystem is its own.
const HOST_DIRS: [&str; 13] = [
    "usr", "etc", "dev", "proc", "sys", "opt", "var", "bin", "sbin", "lib", "lib32", "lib64",
    "libx32",
];

/// In the pod's mount namespace: makes the root and each volume a mount,
/// binds the host's system directories in (read-only, except `/dev`,
/// `/proc` and `/sys`, so no pod can change the host's files), makes the
/// root read-only when the container asks for `readOnlyRootFilesystem`,
/// then runs the command chrooted there in its in-pod working directory.
/// `$1` root, `$2` cwd, `$3` `1` for a read-only root, `$4` the volume
/// paths (space-separated, parents first), `$5` `uid:gid` to run as and
/// `$6` its groups (empty: the namespace's root).
const ISOLATE_SCRIPT: &str = r#"r=$1; d=$2; ro=$3; vols=$4; u=$5; g=$6; shift 6
fail() { echo "kube emulator: cannot $1" >&2; exit 125; }
mount --bind "$r" "$r" || fail "make the pod root a mount"
for v in $vols; do mount --bind "$r$v" "$r$v" || fail "mount the volume $v"; done
for m in usr etc dev proc sys opt var bin sbin lib lib32 lib64 libx32; do
  if [ ! -e "$r/$m" ] && [ ! -L "$r/$m" ]; then
    if [ -L "/$m" ]; then ln -s "$(readlink "/$m")" "$r/$m"; elif [ -d "/$m" ]; then mkdir "$r/$m"; fi
  fi
  if [ -d "$r/$m" ] && [ ! -L "$r/$m" ]; then
    mount --rbind "/$m" "$r/$m" || fail "bind /$m into the pod root"
    case $m in dev|proc|sys) ;; *) mount -o remount,bind,ro "$r/$m" || fail "make /$m read-only" ;; esac
  fi
done
[ -x "$r/bin/sh" ] || fail "find /bin/sh in the pod root ($(ls -la "$r" 2>&1 | tr '\n' ' '))"
if [ "$ro" = 1 ]; then mount -o remount,bind,ro "$r" || fail "make the root read-only"; fi
if [ -n "$u" ]; then
  exec chroot --userspec="$u" --groups="$g" "$r" /bin/sh -c 'cd "$1" || exit 1; shift; exec "$@"' sh "$d" "$@"
fi
exec chroot "$r" /bin/sh -c 'cd "$1" || exit 1; shift; exec "$@"' sh "$d" "$@""#;

/// How pod processes are isolated on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isolation {
    /// The emulator runs as root: a private mount namespace, and the
    /// container's `runAsUser`/`runAsGroup` are applied.
    Root,
    /// A user namespace mapping the emulator's user to root, and a mount
    /// namespace: processes run as that namespace's root.
    UserNamespace,
    /// Neither: in-pod paths are rewritten instead.
    Unavailable,
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// This host's [`Isolation`], checked once per process.
pub(crate) fn isolation() -> Isolation {
    static MODE: std::sync::OnceLock<Isolation> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        if !succeeds("chroot", &["--version"]) {
            return Isolation::Unavailable;
        }
        // `/proc/self` belongs to the process's effective user.
        let root = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        if root && succeeds("unshare", &["--mount", "--propagation", "private", "true"]) {
            return Isolation::Root;
        }
        if succeeds(
            "unshare",
            &[
                "--user",
                "--map-root-user",
                "--mount",
                "--propagation",
                "private",
                "true",
            ],
        ) {
            return Isolation::UserNamespace;
        }
        Isolation::Unavailable
    })
}

/// Whether pod processes can run in their own mount namespace and root.
pub(crate) fn isolation_available() -> bool {
    isolation() != Isolation::Unavailable
}

/// Lays out an isolated pod root: mount points (or the host's symlinks)
/// for [`HOST_DIRS`] next to the pod's own volume directories, which are
/// world-writable as the kubelet makes `emptyDir`s.
pub(crate) fn prepare_isolated_root(root: &Path, volumes: &[String]) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
    for volume in volumes {
        let _ = std::fs::set_permissions(
            root.join(volume.trim_start_matches('/')),
            std::fs::Permissions::from_mode(0o777),
        );
    }
    for dir in HOST_DIRS {
        let host = Path::new("/").join(dir);
        let inside = root.join(dir);
        if inside.symlink_metadata().is_ok() {
            continue;
        }
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&host) {
                    let _ = std::os::unix::fs::symlink(target, &inside);
                }
            }
            Ok(meta) if meta.is_dir() => {
                let _ = std::fs::create_dir_all(&inside);
            }
            _ => {}
        }
    }
}

/// Whether an in-pod executable exists: pod volumes are under the root,
/// everything else is the host's (bound read-through).
fn exists_in_pod(ctx: &PodContext, program: &str) -> bool {
    let located = |path: &str| {
        let own = ctx
            .mounts
            .iter()
            .any(|m| path == m || path.starts_with(&format!("{m}/")));
        if own {
            ctx.root.join(path.trim_start_matches('/')).exists()
        } else {
            Path::new(path).exists()
        }
    };
    if program.contains('/') {
        return located(program);
    }
    DEFAULT_PATH
        .split(':')
        .any(|dir| located(&format!("{dir}/{program}")))
}

/// What a process of a pod needs.
pub(crate) struct PodContext {
    pub name: String,
    pub root: PathBuf,
    pub mounts: Vec<String>,
    pub working_dir: Option<String>,
    pub env: Vec<(String, String)>,
    pub pgids: Arc<Mutex<HashSet<i32>>>,
    /// Run in the pod's own mount namespace, chrooted into its root: in-pod
    /// paths are real, nothing is rewritten in or out.
    pub isolated: bool,
    /// The container's `readOnlyRootFilesystem` (enforced when isolated).
    pub read_only_root: bool,
    /// The container's user (`runAsUser`, applied when the emulator is root).
    pub user: Option<RunAs>,
}

/// Who a container's processes run as (its or its pod's `securityContext`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// `runAsGroup` plus `fsGroup` and `supplementalGroups`.
    pub groups: Vec<u32>,
}

/// The `runAsUser` of a pod's container, with its groups; `None` when
/// neither the container nor the pod sets one.
pub(crate) fn run_as(pod: &Value, container: &Value) -> Option<RunAs> {
    let pick = |key: &str| {
        container
            .pointer(&format!("/securityContext/{key}"))
            .or_else(|| pod.pointer(&format!("/spec/securityContext/{key}")))
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    let uid = pick("runAsUser")?;
    let gid = pick("runAsGroup").unwrap_or(0);
    let mut groups = vec![gid];
    if let Some(fs) = pod
        .pointer("/spec/securityContext/fsGroup")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
    {
        groups.push(fs);
    }
    for g in pod
        .pointer("/spec/securityContext/supplementalGroups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
    {
        groups.push(g);
    }
    groups.dedup();
    Some(RunAs { uid, gid, groups })
}

/// The container of `pod` named `container` (the first when `None`).
pub(crate) fn container<'a>(pod: &'a Value, name: Option<&str>) -> Option<&'a Value> {
    let containers = pod.pointer("/spec/containers")?.as_array()?;
    match name {
        Some(name) => containers
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name)),
        None => containers.first(),
    }
}

/// The in-pod paths mapped into the pod root: volume mounts and workingDir.
pub(crate) fn mapped_paths(container: &Value) -> (Vec<String>, Option<String>) {
    let mut mounts: Vec<String> = container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m.get("mountPath").and_then(Value::as_str))
                .map(|p| p.trim_end_matches('/').to_owned())
                .filter(|p| p.starts_with('/') && p.len() > 1)
                .collect()
        })
        .unwrap_or_default();
    let working_dir = container
        .get("workingDir")
        .and_then(Value::as_str)
        .map(|p| p.trim_end_matches('/').to_owned())
        .filter(|p| p.starts_with('/') && p.len() > 1);
    if let Some(dir) = &working_dir
        && !mounts.contains(dir)
    {
        mounts.push(dir.clone());
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    (mounts, working_dir)
}

/// The container's environment as the kubelet builds it: `env` values and
/// downward-API names, `envFrom` Secrets and ConfigMaps. `Err` names a
/// missing Secret/ConfigMap (the kubelet's `CreateContainerConfigError`).
pub(crate) fn container_env(
    shared: &Shared,
    pod: &Value,
    container: &Value,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let store = shared.store();
    let mut env = Vec::new();
    let source = |plural: &str, name: &str| {
        store
            .get(&(
                String::new(),
                plural.to_owned(),
                namespace.clone(),
                name.to_owned(),
            ))
            .cloned()
    };
    for from in container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let prefix = from
            .get("prefix")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(name) = from.pointer("/secretRef/name").and_then(Value::as_str) {
            let Some(secret) = source("secrets", name) else {
                if from.pointer("/secretRef/optional") == Some(&json!(true)) {
                    continue;
                }
                return Err(format!("secret \"{name}\" not found"));
            };
            for (k, v) in secret
                .get("data")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .unwrap_or_default();
                env.push((
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
        }
        if let Some(name) = from.pointer("/configMapRef/name").and_then(Value::as_str) {
            let Some(map) = source("configmaps", name) else {
                if from.pointer("/configMapRef/optional") == Some(&json!(true)) {
                    continue;
                }
                return Err(format!("configmap \"{name}\" not found"));
            };
            for (k, v) in map
                .get("data")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                env.push((
                    format!("{prefix}{k}"),
                    v.as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    for var in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = var.get("name").and_then(Value::as_str) else {
            continue;
        };
        let value = if let Some(value) = var.get("value").and_then(Value::as_str) {
            value.to_owned()
        } else if let Some(path) = var
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            let pointer = format!("/{}", path.replace('.', "/"));
            pod.pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        } else if let Some(secret) = var.pointer("/valueFrom/secretKeyRef") {
            let name = secret
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let key = secret
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(object) = source("secrets", name) else {
                return Err(format!("secret \"{name}\" not found"));
            };
            let encoded = object
                .pointer(&format!("/data/{key}"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            String::new()
        };
        env.retain(|(k, _)| k != name);
        env.push((name.to_owned(), value));
    }
    Ok(env)
}

/// Builds the local command for an in-pod argv (see the module docs of
/// [`super`]): tini dropped, programs substituted, paths mapped.
pub(crate) fn command(
    shared: &Shared,
    ctx: &PodContext,
    argv: &[String],
) -> Option<tokio::process::Command> {
    let mut argv: Vec<String> = argv.to_vec();
    if argv
        .first()
        .is_some_and(|a| a == "/usr/bin/tini" || a == "tini")
    {
        argv.remove(0);
        if argv.first().is_some_and(|a| a == "--") {
            argv.remove(0);
        }
    }
    if let Some(first) = argv.first().cloned()
        && let Some((_, replacement)) = shared.opts.programs.iter().find(|(p, _)| *p == first)
    {
        argv.splice(0..1, replacement.iter().cloned());
    }
    if ctx.isolated {
        return isolated_command(ctx, &argv);
    }
    let argv: Vec<String> = argv
        .iter()
        .map(|a| rewrite(a, &ctx.root, &ctx.mounts))
        .collect();
    let (program, args) = argv.split_first()?;
    let mut command = tokio::process::Command::new(program);
    command.args(args).env_clear().env("PATH", DEFAULT_PATH);
    let home = if ctx.mounts.iter().any(|m| m == "/home/paperclip") {
        ctx.root.join("home/paperclip")
    } else {
        ctx.root.clone()
    };
    command.env("HOME", &home).env("HOSTNAME", &ctx.name);
    if ctx.mounts.iter().any(|m| m == "/tmp") {
        command.env("TMPDIR", ctx.root.join("tmp"));
    }
    for (k, v) in &ctx.env {
        if k != "PATH" {
            command.env(k, rewrite(v, &ctx.root, &ctx.mounts));
        }
    }
    let cwd = match &ctx.working_dir {
        Some(dir) => PathBuf::from(rewrite(dir, &ctx.root, &ctx.mounts)),
        None => ctx.root.clone(),
    };
    command
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    Some(command)
}

/// The command of an isolated pod: `unshare` (user + mount namespace, the
/// same pid, so process-group kills still reach it) binds the host's system
/// directories into the pod root and chroots there; argv, env and output
/// pass through untouched. `None` when the program does not exist in the
/// pod (the caller answers as the runtime does).
fn isolated_command(ctx: &PodContext, argv: &[String]) -> Option<tokio::process::Command> {
    let program = argv.first()?;
    if !exists_in_pod(ctx, program) {
        return None;
    }
    // Parents before children, so a nested volume is mounted on top.
    let mut volumes: Vec<&str> = ctx
        .mounts
        .iter()
        .map(String::as_str)
        .filter(|m| !m.contains(char::is_whitespace))
        .collect();
    volumes.sort_by_key(|m| m.len());
    let mut command = tokio::process::Command::new("unshare");
    let as_root = isolation() == Isolation::Root;
    if !as_root {
        command.args(["--user", "--map-root-user"]);
    }
    let (user, groups) = match (as_root, &ctx.user) {
        (true, Some(user)) => (
            format!("{}:{}", user.uid, user.gid),
            user.groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => (String::new(), String::new()),
    };
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            ISOLATE_SCRIPT,
            "sh",
        ])
        .arg(&ctx.root)
        .arg(ctx.working_dir.as_deref().unwrap_or("/"))
        .arg(if ctx.read_only_root { "1" } else { "0" })
        .arg(volumes.join(" "))
        .arg(user)
        .arg(groups)
        .args(argv)
        .env_clear()
        .env("PATH", DEFAULT_PATH);
    let home = if ctx.mounts.iter().any(|m| m == "/home/paperclip") {
        "/home/paperclip"
    } else {
        "/"
    };
    command.env("HOME", home).env("HOSTNAME", &ctx.name);
    if ctx.mounts.iter().any(|m| m == "/tmp") {
        command.env("TMPDIR", "/tmp");
    }
    for (k, v) in &ctx.env {
        if k != "PATH" {
            command.env(k, v);
        }
    }
    command
        .current_dir(&ctx.root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    Some(command)
}

/// Counts a live process and kills its process group when dropped.
pub(crate) struct ProcessGuard {
    pgid: Option<i32>,
    pgids: Arc<Mutex<HashSet<i32>>>,
    live: Arc<AtomicUsize>,
}

impl ProcessGuard {
    pub fn new(
        child: &tokio::process::Child,
        pgids: Arc<Mutex<HashSet<i32>>>,
        live: Arc<AtomicUsize>,
    ) -> Self {
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        if let Some(pgid) = pgid {
            pgids.lock().unwrap_or_else(|p| p.into_inner()).insert(pgid);
        }
        live.fetch_add(1, Ordering::SeqCst);
        ProcessGuard { pgid, pgids, live }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            self.pgids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pgid);
        }
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The pod, its container and process context, or the API error a real
/// server gives for exec/log on it.
fn pod_context(
    shared: &Shared,
    namespace: &str,
    name: &str,
    container_name: Option<&str>,
) -> Result<(Value, Value, PodContext), ApiError> {
    let key: Key = (String::new(), "pods".into(), namespace.into(), name.into());
    let pod = shared.store().get(&key).cloned();
    let pods_rt = shared
        .resource("", "pods")
        .ok_or_else(ApiError::unknown_resource)?;
    let pod = pod.ok_or_else(|| ApiError::not_found(pods_rt, name))?;
    let container = container(&pod, container_name).cloned().ok_or_else(|| {
        ApiError::bad_request(format!(
            "container {} is not valid for pod {name}",
            container_name.unwrap_or_default()
        ))
    })?;
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let runtime = shared.pods();
    let runtime = runtime.get(&uid).filter(|r| r.started).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unable to upgrade connection: container not found (\"{}\")",
            container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ))
    })?;
    let ctx = PodContext {
        name: name.to_owned(),
        root: runtime.root.clone(),
        mounts: runtime.mounts.clone(),
        working_dir: runtime.working_dir.clone(),
        env: Vec::new(),
        pgids: runtime.pgids.clone(),
        isolated: runtime.isolated,
        read_only_root: runtime.read_only_root,
        user: runtime.user.clone(),
    };
    Ok((pod, container, ctx))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn flag(params: &[(String, String)], name: &str) -> bool {
    param(params, name).is_some_and(|v| v == "true" || v == "1")
}

/// `GET|POST pods/{name}/exec`: upgrades to a WebSocket and runs the argv.
pub(crate) async fn exec(
    shared: Arc<Shared>,
    parts: &mut Parts,
    namespace: &str,
    name: &str,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    let argv: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if argv.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    if !["stdin", "stdout", "stderr"]
        .iter()
        .any(|s| flag(params, s))
    {
        return Err(ApiError::bad_request(
            "you must specify at least one of stdin, stdout, stderr",
        ));
    }
    if flag(params, "tty") {
        return Err(ApiError::bad_request(
            "tty exec is not supported by the emulator",
        ));
    }
    let (pod, container, mut ctx) =
        pod_context(&shared, namespace, name, param(params, "container"))?;
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return Err(ApiError::bad_request(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    ctx.env = container_env(&shared, &pod, &container).map_err(ApiError::bad_request)?;
    let offered: Vec<String> = parts
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()))
        .collect();
    let Some(protocol) = shared
        .opts
        .exec_protocols
        .iter()
        .find(|p| offered.contains(p))
        .cloned()
    else {
        return Err(ApiError::bad_request(format!(
            "unable to upgrade connection: none of the offered subprotocols {offered:?} is supported ({:?})",
            shared.opts.exec_protocols
        )));
    };
    let upgrade = WebSocketUpgrade::from_request_parts(parts, &())
        .await
        .map_err(|_| ApiError::bad_request("Upgrade request required"))?;
    let fault = shared.faults.take(&Hook::Exec);
    let streams = Streams {
        stdin: flag(params, "stdin"),
        stdout: flag(params, "stdout"),
        stderr: flag(params, "stderr"),
        v5: protocol == "v5.channel.k8s.io",
    };
    Ok(upgrade
        .protocols([protocol])
        .on_upgrade(move |socket| async move {
            run(shared, socket, ctx, argv, streams, fault).await;
        }))
}

/// The streams an exec asked for, and whether v5 (close-stdin) is spoken.
#[derive(Debug, Clone, Copy)]
struct Streams {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    v5: bool,
}

fn status_frame(code: i32, argv: &[String]) -> Message {
    let status = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", argv.join(" ")),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
    };
    frame(ERROR, status.to_string().as_bytes())
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(Bytes::from(bytes))
}

async fn close(mut socket: WebSocket) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

async fn run(
    shared: Arc<Shared>,
    mut socket: WebSocket,
    ctx: PodContext,
    argv: Vec<String>,
    streams: Streams,
    fault: Option<Fault>,
) {
    let mut shutdown = shared.shutdown.clone();
    if fault == Some(Fault::ExecNeverAnswers) {
        loop {
            tokio::select! {
                message = socket.recv() => match message {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                _ = super::stopped(&mut shutdown) => return,
            }
        }
    }
    let drop_after = match fault {
        Some(Fault::DropExecAfter(bytes)) => Some(bytes),
        _ => None,
    };
    let Some(mut command) = command(&shared, &ctx, &argv) else {
        let message = format!(
            "OCI runtime exec failed: exec failed: unable to start container process: exec: {:?}: executable file not found in $PATH: unknown\r\n",
            argv.first().map(String::as_str).unwrap_or_default()
        );
        let _ = socket.send(frame(STDERR, message.as_bytes())).await;
        let _ = socket.send(status_frame(126, &argv)).await;
        close(socket).await;
        return;
    };
    command.stdin(if streams.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    if !streams.stdout {
        command.stdout(Stdio::null());
    }
    if !streams.stderr {
        command.stderr(Stdio::null());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let message = format!(
                "OCI runtime exec failed: exec failed: unable to start container process: exec: {:?}: {error}: unknown\r\n",
                argv.first().map(String::as_str).unwrap_or_default()
            );
            let _ = socket.send(frame(STDERR, message.as_bytes())).await;
            let _ = socket.send(status_frame(126, &argv)).await;
            close(socket).await;
            return;
        }
    };
    let guard = ProcessGuard::new(&child, ctx.pgids.clone(), shared.live.clone());
    let (tx, mut output) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    for (channel, reader) in [
        (
            STDOUT,
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
        (
            STDERR,
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ),
    ] {
        let Some(mut reader) = reader else { continue };
        let tx = tx.clone();
        let mut unmapper = Unmapper::new(&ctx.root, !ctx.isolated);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                match reader.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = unmapper.push(&buffer[..n]);
                        if !data.is_empty() && tx.send((channel, data)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let rest = unmapper.finish();
            if !rest.is_empty() {
                let _ = tx.send((channel, rest)).await;
            }
        });
    }
    drop(tx);
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut stdin_tx = Some(stdin_tx);
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            while let Some(chunk) = stdin_rx.recv().await {
                if stdin.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = stdin.shutdown().await;
        });
    } else {
        stdin_tx = None;
    }
    let mut sent = 0usize;
    let mut streams_open = true;
    loop {
        tokio::select! {
            message = socket.recv() => match message {
                // Some clients (the Python client) send stdin as TEXT
                // frames: the channel is the first character, as in binary.
                Some(Ok(Message::Text(text))) => {
                    let data = text.as_bytes();
                    if data.first() == Some(&STDIN)
                        && let Some(tx) = &stdin_tx
                    {
                        let _ = tx.send(data[1..].to_vec());
                    }
                }
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(&STDIN) => {
                        if let Some(tx) = &stdin_tx {
                            let _ = tx.send(data[1..].to_vec());
                        }
                    }
                    Some(&CLOSE) if streams.v5 && data.get(1) == Some(&STDIN) => stdin_tx = None,
                    Some(&RESIZE) | Some(_) | None => {}
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    if shared.opts.keep_exec_processes {
                        detach(child, guard, shared.shutdown.clone());
                    }
                    return;
                }
                Some(Ok(_)) => {}
            },
            chunk = output.recv(), if streams_open => match chunk {
                Some((channel, data)) => {
                    let data = match drop_after {
                        Some(limit) if sent + data.len() >= limit => {
                            let keep = limit.saturating_sub(sent);
                            if keep > 0 {
                                let _ = socket.send(frame(channel, &data[..keep])).await;
                            }
                            // Dropped without a close frame or status: the
                            // client sees the connection vanish mid-stream.
                            return;
                        }
                        _ => data,
                    };
                    sent += data.len();
                    if socket.send(frame(channel, &data)).await.is_err() {
                        return;
                    }
                }
                None => streams_open = false,
            },
            status = child.wait(), if !streams_open => {
                let code = status.map(crate::emulators::shell_exit_code).unwrap_or(1);
                let _ = socket.send(status_frame(code, &argv)).await;
                close(socket).await;
                return;
            },
            _ = super::stopped(&mut shutdown) => return,
        }
    }
}

/// Lets an exec'd process outlive its client, as on a real node, until
/// it exits, its pod is deleted or the emulator stops.
fn detach(
    mut child: tokio::process::Child,
    guard: ProcessGuard,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = child.wait() => {}
            _ = super::stopped(&mut shutdown) => {}
        }
        drop(guard);
    });
}

/// Starts a run-to-completion container's command; its combined output is
/// the pod log and its exit code lands in `main`.
pub(crate) fn start_main(
    shared: &Arc<Shared>,
    ctx: PodContext,
    argv: Vec<String>,
    log: Arc<Mutex<Vec<u8>>>,
    main: Arc<Mutex<MainState>>,
) {
    let set = |state: MainState| *main.lock().unwrap_or_else(|p| p.into_inner()) = state;
    let Some(mut command) = command(shared, &ctx, &argv) else {
        set(MainState::Exited(128));
        return;
    };
    command.stdin(Stdio::null());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(format!("exec {:?} failed: {error}\n", argv.first()).as_bytes());
            set(MainState::Exited(128));
            return;
        }
    };
    set(MainState::Running);
    let guard = ProcessGuard::new(&child, ctx.pgids.clone(), shared.live.clone());
    let mut readers = Vec::new();
    for reader in [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let log = log.clone();
        let mut reader = reader;
        let mut unmapper = Unmapper::new(&ctx.root, !ctx.isolated);
        readers.push(tokio::spawn(async move {
            let mut buffer = vec![0u8; 16 * 1024];
            while let Ok(n) = reader.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                let data = unmapper.push(&buffer[..n]);
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&data);
            }
            let rest = unmapper.finish();
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&rest);
        }));
    }
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let code = tokio::select! {
            status = child.wait() => status.map(crate::emulators::shell_exit_code).unwrap_or(1),
            _ = super::stopped(&mut shutdown) => 137,
        };
        for reader in readers {
            let _ = reader.await;
        }
        drop(guard);
        *main.lock().unwrap_or_else(|p| p.into_inner()) = MainState::Exited(code);
    });
}

/// `GET pods/{name}/log` (`container`, `tailLines`, `follow` waits for the
/// container to finish, then answers the whole log).
pub(crate) async fn log(
    shared: &Arc<Shared>,
    namespace: &str,
    name: &str,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    let key: Key = (String::new(), "pods".into(), namespace.into(), name.into());
    let pod = shared.store().get(&key).cloned();
    let pods_rt = shared
        .resource("", "pods")
        .ok_or_else(ApiError::unknown_resource)?;
    let pod = pod.ok_or_else(|| ApiError::not_found(pods_rt, name))?;
    let container_name = param(params, "container");
    let container = container(&pod, container_name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "container {} is not valid for pod {name}",
            container_name.unwrap_or_default()
        ))
    })?;
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let (log, main) = {
        let pods = shared.pods();
        match pods.get(&uid).filter(|r| r.started) {
            Some(runtime) => (runtime.log.clone(), runtime.main.clone()),
            None => {
                return Err(ApiError::bad_request(format!(
                    "container \"{}\" in pod \"{name}\" is waiting to start: ContainerCreating",
                    container
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                )));
            }
        }
    };
    if flag(params, "follow") {
        let mut shutdown = shared.shutdown.clone();
        loop {
            if *main.lock().unwrap_or_else(|p| p.into_inner()) != MainState::Running {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                _ = super::stopped(&mut shutdown) => break,
            }
        }
    }
    let mut text = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(tail) = param(params, "tailLines").and_then(|t| t.parse::<usize>().ok()) {
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        text = lines[lines.len().saturating_sub(tail)..].concat();
    }
    Ok((StatusCode::OK, [("content-type", "text/plain")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_unmapped_across_chunk_boundaries() {
        let root = Path::new("/tmp/emu/pods/ns/pc-1");
        let text = b"cwd=/tmp/emu/pods/ns/pc-1/workspace/paperclip\nx/tmp/emu/other\n";
        for split in 0..text.len() {
            let mut u = Unmapper::new(root, true);
            let mut out = u.push(&text[..split]);
            out.extend(u.push(&text[split..]));
            out.extend(u.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "cwd=/workspace/paperclip\nx/tmp/emu/other\n",
                "split at {split}"
            );
        }
    }

    #[test]
    fn mount_paths_are_rewritten_at_boundaries_only() {
        let root = Path::new("/r");
        let mounts = vec![
            "/home/paperclip/.cache".to_owned(),
            "/home/paperclip".to_owned(),
            "/workspace".to_owned(),
            "/tmp".to_owned(),
        ];
        let cases = [
            ("/workspace", "/r/workspace"),
            ("cd '/workspace/repo' && ls", "cd '/r/workspace/repo' && ls"),
            ("tar -x -C /workspace", "tar -x -C /r/workspace"),
            ("/workspaces", "/workspaces"),
            ("/x/workspace", "/x/workspace"),
            (
                "a=/tmp/f:/home/paperclip/.cache/x",
                "a=/r/tmp/f:/r/home/paperclip/.cache/x",
            ),
            ("$HOME/workspace", "$HOME/workspace"),
            ("/home/paperclip2", "/home/paperclip2"),
            ("x/tmp", "x/tmp"),
        ];
        for (input, expected) in cases {
            assert_eq!(rewrite(input, root, &mounts), expected, "{input}");
        }
    }
}
