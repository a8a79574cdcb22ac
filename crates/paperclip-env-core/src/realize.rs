//! Workspace realization: request and result types and the
//! `WorkspaceRealizationRecord` (spec 00 §11.2).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::lease::{Environment, EnvironmentLease, JsonObject, driver_keys};

/// The workspace to realize in a lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// The workspace on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_path: Option<String>,
    /// The requested directory in the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_path: Option<String>,
    /// Execution workspace mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Extra data; `workspaceRealizationRequest` is read from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// `{cwd, metadata?}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RealizeWorkspaceResult {
    /// Absolute working directory in the lease.
    pub cwd: String,
    /// Driver or provider metadata (`workspaceRealization` for host-built records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

fn str_of<'a>(map: Option<&'a JsonObject>, key: &str) -> Option<&'a str> {
    map?.get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Builds the version-1 realization record for a local, SSH or built-in
/// sandbox lease, and the `cwd` the driver returns.
///
/// The record has Paperclip 2026.916's shape (`buildWorkspaceRealizationRecord`):
/// `mode` (`copy`, or `in_place` when the lease's or provider's
/// `workspaceRealization` says so), `authoritativeRoot` (given, else the remote
/// path in place, else the local path), `pathAliases` (`[{path, target}]`),
/// `outboundRestorePaths`, and `additional` (the request's
/// `additionalSources`); the `transport` and `sync` blocks of spec 00 §11.2
/// are gone, as upstream dropped them (issue #22 wins).
pub fn build_realization_record(
    environment: &Environment,
    lease: &EnvironmentLease,
    workspace: &WorkspaceSpec,
) -> RealizeWorkspaceResult {
    let transport = match environment.driver.as_str() {
        d @ (driver_keys::SSH | driver_keys::SANDBOX | driver_keys::PLUGIN) => d,
        _ => driver_keys::LOCAL,
    };
    let transport = match lease.metadata_str("driver") {
        Some(
            d
            @ (driver_keys::SSH | driver_keys::SANDBOX | driver_keys::PLUGIN | driver_keys::LOCAL),
        ) => d,
        _ => transport,
    };
    let md = lease.metadata.as_ref();
    let request = workspace
        .metadata
        .as_ref()
        .and_then(|m| {
            m.get("workspaceRealizationRequest")
                .or_else(|| m.get("request"))
        })
        .and_then(Value::as_object);
    let lease_remote = lease.remote_cwd();
    let remote_path: Option<String> = lease_remote
        .or_else(|| str_of(md, "remotePath"))
        .map(str::to_owned)
        .or_else(|| {
            if transport == driver_keys::LOCAL {
                None
            } else {
                workspace.remote_path.clone()
            }
        });
    let local_path = str_of(request, "localPath")
        .map(str::to_owned)
        .or_else(|| workspace.local_path.clone())
        .or_else(|| {
            if transport == driver_keys::LOCAL {
                workspace.remote_path.clone()
            } else {
                None
            }
        })
        .unwrap_or_else(|| "/".to_owned());
    let provider = lease.provider.clone().or_else(|| match transport {
        driver_keys::SSH => Some("ssh".into()),
        driver_keys::LOCAL => Some("local".into()),
        _ => None,
    });
    let host = str_of(md, "host");
    let port = md.and_then(|m| m.get("port")).and_then(Value::as_u64);
    let username = str_of(md, "username");
    let sandbox_id = str_of(md, "sandboxId");
    let remote_display = remote_path.clone();
    let summary = match transport {
        driver_keys::SSH => format!(
            "SSH workspace realized at {}@{}:{}:{}.",
            username.unwrap_or("user"),
            host.unwrap_or("host"),
            port.unwrap_or(22),
            remote_display.as_deref().unwrap_or(&local_path)
        ),
        driver_keys::SANDBOX => format!(
            "Sandbox workspace realized at {}{}.",
            remote_display.as_deref().unwrap_or("/"),
            sandbox_id.map(|s| format!(" in {s}")).unwrap_or_default()
        ),
        driver_keys::PLUGIN => {
            format!(
                "Plugin workspace realized at {}.",
                remote_display.as_deref().unwrap_or(&local_path)
            )
        }
        _ => format!("Local workspace realized at {local_path}."),
    };
    let mut remote = JsonObject::new();
    remote.insert("path".into(), json!(remote_path));
    if let Some(h) = host {
        remote.insert("host".into(), json!(h));
    }
    if let Some(p) = port {
        remote.insert("port".into(), json!(p));
    }
    if let Some(u) = username {
        remote.insert("username".into(), json!(u));
    }
    if let Some(s) = sandbox_id {
        remote.insert("sandboxId".into(), json!(s));
    }
    let req = |key: &str| str_of(request, key).map(str::to_owned);
    // Paperclip 2026.916 reads the realization hints from the lease's
    // `workspaceRealization`, then the provider metadata's, then the
    // provider metadata itself (later wins).
    let mut hints = JsonObject::new();
    let provider_md = md
        .and_then(|m| m.get("providerMetadata"))
        .and_then(Value::as_object);
    for layer in [
        md.and_then(|m| m.get("workspaceRealization"))
            .and_then(Value::as_object),
        provider_md
            .and_then(|m| m.get("workspaceRealization"))
            .and_then(Value::as_object),
        provider_md,
    ]
    .into_iter()
    .flatten()
    {
        hints.extend(layer.clone());
    }
    let in_place = [hints.get("mode"), hints.get("realizationMode")]
        .iter()
        .any(|v| v.and_then(Value::as_str) == Some("in_place"));
    let mode = if in_place { "in_place" } else { "copy" };
    let authoritative_root = str_of(Some(&hints), "authoritativeRoot")
        .map(str::to_owned)
        .or_else(|| in_place.then(|| remote_path.clone()).flatten())
        .unwrap_or_else(|| local_path.clone());
    let path_aliases: Vec<Value> = hints
        .get("pathAliases")
        .or_else(|| hints.get("workspaceAliases"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.as_object();
            let path = str_of(entry, "path")?;
            let target = str_of(entry, "target")?;
            Some(json!({"path": path, "target": target}))
        })
        .collect();
    let outbound_restore_paths: Vec<Value> = hints
        .get("outboundRestorePaths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::trim).filter(|s| !s.is_empty()))
        .map(|s| json!(s))
        .collect();
    let additional: Vec<Value> = request
        .and_then(|r| r.get("additionalSources"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.as_object();
            let path = str_of(entry, "localPath")?;
            let field = |key: &str| str_of(entry, key).map(str::to_owned);
            Some(json!({
                "path": path,
                "projectId": field("projectId"),
                "projectWorkspaceId": field("projectWorkspaceId"),
                "repoUrl": field("repoUrl"),
                "repoRef": field("repoRef"),
            }))
        })
        .collect();
    let record = json!({
        "version": 1,
        "mode": mode,
        "authoritativeRoot": authoritative_root,
        "pathAliases": path_aliases,
        "outboundRestorePaths": outbound_restore_paths,
        "provider": provider,
        "environmentId": environment.id,
        "leaseId": lease.id,
        "providerLeaseId": lease.provider_lease_id,
        "local": {
            "path": local_path,
            "source": req("source").unwrap_or_else(|| "task_session".into()),
            "strategy": req("strategy").unwrap_or_else(|| "project_primary".into()),
            "projectId": req("projectId"),
            "projectWorkspaceId": req("projectWorkspaceId"),
            "repoUrl": req("repoUrl"),
            "repoRef": req("repoRef"),
            "branchName": req("branchName"),
            "worktreePath": req("worktreePath"),
        },
        "additional": additional,
        "remote": remote,
        "bootstrap": {"command": req("provisionCommand")},
        "rebuild": {
            "executionWorkspaceId": lease.execution_workspace_id,
            "mode": workspace.mode,
            "repoUrl": req("repoUrl"),
            "repoRef": req("repoRef"),
            "localPath": local_path,
            "remotePath": remote_path,
            "providerLeaseId": lease.provider_lease_id,
            "metadata": {
                "source": req("source").unwrap_or_else(|| "task_session".into()),
                "runtimeOverlay": request.and_then(|r| r.get("runtimeOverlay")).cloned(),
                "environmentDriver": environment.driver,
                "provider": provider,
                "providerMetadata": md.cloned(),
            }
        },
        "summary": summary,
    });
    let cwd = if transport == driver_keys::LOCAL {
        workspace
            .local_path
            .clone()
            .or_else(|| workspace.remote_path.clone())
            .unwrap_or_else(|| "/".into())
    } else {
        remote_path.unwrap_or(local_path)
    };
    let mut metadata = JsonObject::new();
    metadata.insert("workspaceRealization".into(), record);
    RealizeWorkspaceResult {
        cwd,
        metadata: Some(metadata),
    }
}
