//! The checks, one per line of spec 11 Part A.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use paperclip_env_core::secret::{
    InMemorySecretResolver, collect_secret_ref_paths, persist_secret_refs, strip_secret_paths,
};
use paperclip_env_core::{
    AcquireRequest, AcquireRunLease, CallContext, CleanupStatus, Environment, EnvironmentRuntime,
    Error, ExecuteRequest, ExecuteResult, LeaseHandle, LeaseStatus, Operation, OutputCollector,
    SandboxProvider, WorkspaceSpec,
};
use serde_json::{Value, json};

use super::{CheckResult, Fail, Fixture, Level, ensure, failed, handle};
use crate::recording::{RecordingProvider, assert_event_order};

type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckResult> + Send + 'a>>;

/// One line of the suite.
pub struct Line {
    /// Spec id.
    pub id: &'static str,
    /// Level.
    pub level: Level,
    /// What it checks.
    pub title: &'static str,
    /// The check.
    pub check: for<'a> fn(&'a Fixture) -> CheckFuture<'a>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("id", &self.id)
            .field("title", &self.title)
            .finish()
    }
}

macro_rules! lines {
    ($( $id:literal $level:ident $check:ident $title:literal ),+ $(,)?) => {
        /// Every line, in spec order.
        pub const LINES: &[Line] = &[
            $( Line { id: $id, level: Level::$level, title: $title, check: |f| Box::pin($check(f)) } ),+
        ];
    };
}

lines! {
    "A1.1" Must a1_1_validate_config "validate_config reports ok/errors without failing",
    "A1.2" Must a1_2_normalized_config_complete "normalized config is complete and stable",
    "A1.3" Must a1_3_validate_and_probe_leave_nothing "validation and probe leave nothing behind",
    "A1.4" Must a1_4_probe_reports_result "probe answers with a result",
    "A1.5" Must a1_5_unknown_keys_ignored "unknown config keys are ignored",
    "A1.6" Must a1_6_provider_key_stripped "the envelope key `provider` never reaches the provider",
    "A1.7" Should a1_7_probe_within_deadline "probe completes within 120 s",
    "A2.1" Must a2_1_acquire_returns_usable_id "acquire returns a non-empty, usable provider lease id",
    "A2.2" Must a2_2_acquire_metadata_shape "acquire metadata is an object with sane remoteCwd/shellCommand",
    "A2.3" Must a2_3_any_run_id "acquire accepts any run id",
    "A2.4" Must a2_4_expires_at "expires_at is a sane instant when returned",
    "A2.5" Must a2_5_failed_acquire_leaves_nothing "a failed acquire leaves nothing behind",
    "A2.6" Must a2_6_acquire_not_retried "acquire is not retried blindly",
    "A2.7" Must a2_7_no_plaintext_secret_in_metadata "metadata carries no plaintext secret",
    "A2.8" Should a2_8_reuse_returns_same_resource "reusable acquire may return the kept resource",
    "A3.1" Must a3_1_resume_preserves_workspace "resume after a reusable release keeps the workspace",
    "A3.2" Must a3_2_resume_of_gone_resource "resume of a gone resource never hands back a dead handle",
    "A3.3" Should a3_3_resume_marks_resumed "resume metadata says resumedLease: true",
    "A3.4" Must a3_4_resume_uses_lease_metadata "resume works from the old lease's id and metadata",
    "A4.1" Must a4_1_release_destroys_or_keeps "release destroys, or keeps with reuseLease",
    "A4.2" Must a4_2_release_idempotent "release is idempotent",
    "A4.3" Must a4_3_release_null_id "release of a null id is a no-op",
    "A4.4" Must a4_4_destroy_regardless_of_reuse "destroy removes the resource regardless of reuse, idempotently",
    "A4.5" Must a4_5_release_from_metadata_config "release works from lease metadata after the environment changed",
    "A4.6" Should a4_6_release_errors_typed "release errors are typed",
    "A5.1" Must a5_1_realize_returns_existing_cwd "realize returns an absolute cwd that exists",
    "A5.2" Should a5_2_realize_prefers_lease_cwd "realize prefers the lease's remoteCwd",
    "A5.3" Must a5_3_realize_needs_no_contents "realize does not need workspace contents",
    "A6.1" Must a6_1_execute_success "a successful command gives exit 0 and its exact stdout",
    "A6.2" Must a6_2_nonzero_exit_is_result "a non-zero exit is a result, not an error",
    "A6.3" Must a6_3_streams_separate_utf8 "stdout and stderr are complete, separate UTF-8",
    "A6.4" Must a6_4_argv_exact "args reach the command as argv exactly",
    "A6.5" Must a6_5_cwd_honoured "cwd is honoured",
    "A6.6" Must a6_6_env_isolated "only the explicit env reaches the command",
    "A6.7" Should a6_7_default_path "the default PATH contains /usr/local/bin",
    "A6.8" Must a6_8_stdin_delivered_then_eof "stdin is delivered, then EOF",
    "A6.9" Must a6_9_timeout_kills "a timeout kills the command and returns timed_out",
    "A6.10" Should a6_10_timeout_exit_code_null "a timed-out command has a null exit code",
    "A6.11" Must a6_11_config_timeout_applies "config timeoutMs applies when the request has none",
    "A6.12" Should a6_12_signal_reported "a command killed by a signal reports it",
    "A6.13" Should a6_13_unknown_lease_not_found "execute on a destroyed lease fails with not found",
    "A6.14" Should a6_14_lifetime_refresh "lifetime is refreshed before commands",
    "A6.15" Must a6_15_execute_not_retried "execute is never retried",
    "A7.1" Must a7_1_lifecycle_order "validate → probe → acquire → realize → execute → destroy is recorded in order",
    "A7.2" Must a7_2_unsupported_is_typed "an unsupported operation gives a typed not-supported error",
    "A7.3" Should a7_3_run_id_labels_resource "the resource carries the run id",
}

async fn exec(
    f: &Fixture,
    ctx: &CallContext,
    lease: &LeaseHandle,
    request: ExecuteRequest,
) -> Result<ExecuteResult, Fail> {
    let output = OutputCollector::buffered();
    let exit = f
        .timed("execute", f.provider.execute(ctx, lease, &request, &output))
        .await?
        .map_err(failed(&format!("execute {}", request.command_line())))?;
    Ok(output.finish(exit))
}

/// Acquires with the fixture config, runs `body`, and always cleans up.
async fn with_lease<'a, F, Fut>(f: &'a Fixture, body: F) -> CheckResult
where
    F: FnOnce(CallContext, LeaseHandle) -> Fut,
    Fut: Future<Output = CheckResult> + 'a,
{
    let ctx = f.context(&f.config).await?;
    let lease = handle(&f.acquire(&ctx).await?);
    let result = body(ctx, lease.clone()).await;
    f.cleanup(&lease).await;
    result
}

fn pick_host_var() -> Option<String> {
    const COMMON: [&str; 12] = [
        "PATH", "HOME", "USER", "LANG", "SHELL", "TERM", "PWD", "HOSTNAME", "LOGNAME", "SHLVL",
        "_", "OLDPWD",
    ];
    std::env::vars()
        .filter(|(k, v)| {
            !v.is_empty()
                && !COMMON.contains(&k.as_str())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(k, _)| k)
        .find(|k| k.starts_with("CARGO") || k.starts_with("NEXTEST") || k.starts_with("RUST"))
}

/// A1.1
pub async fn a1_1_validate_config(f: &Fixture) -> CheckResult {
    let valid = f
        .timed("validate", f.provider.validate_config(&f.config))
        .await?
        .map_err(failed("validate_config"))?;
    ensure!(
        valid.ok,
        "the fixture's valid config was rejected: {:?}",
        valid.errors
    );
    if let Some(invalid) = &f.invalid_config {
        let result = f
            .timed("validate", f.provider.validate_config(invalid))
            .await?
            .map_err(failed("validate_config"))?;
        ensure!(!result.ok, "an invalid config was accepted");
        ensure!(
            !result.errors.is_empty(),
            "an invalid config was rejected without a message"
        );
        ensure!(
            result.errors.iter().all(|e| !e.message.trim().is_empty()),
            "an error message is blank"
        );
    }
    Ok(())
}

/// A1.2
pub async fn a1_2_normalized_config_complete(f: &Fixture) -> CheckResult {
    let first = f
        .timed("validate", f.provider.validate_config(&f.config))
        .await?
        .map_err(failed("validate_config"))?;
    let normalized = first
        .normalized_config
        .ok_or_else(|| Fail::Failed("no normalized config returned".into()))?;
    let second = f
        .timed("validate", f.provider.validate_config(&normalized))
        .await?
        .map_err(failed("re-validate"))?;
    ensure!(
        second.ok,
        "the normalized config does not validate: {:?}",
        second.errors
    );
    ensure!(
        second.normalized_config.as_ref() == Some(&normalized),
        "normalizing twice changed the config: {normalized:?} → {:?}",
        second.normalized_config
    );
    Ok(())
}

/// A1.3
pub async fn a1_3_validate_and_probe_leave_nothing(f: &Fixture) -> CheckResult {
    let before = f
        .live()
        .ok_or_else(|| Fail::Skipped("fixture has no live_resources counter".into()))?;
    let _ = f
        .timed("validate", f.provider.validate_config(&f.config))
        .await?;
    if f.caps().probe {
        let ctx = f.context(&f.config).await?;
        let _ = f.timed("probe", f.provider.probe(&ctx)).await?;
    }
    let after = f.live().unwrap_or_default();
    ensure!(
        after == before,
        "live resources went from {before} to {after}"
    );
    Ok(())
}

/// A1.4
pub async fn a1_4_probe_reports_result(f: &Fixture) -> CheckResult {
    f.require(f.caps().probe, "probe")?;
    let ctx = f.context(&f.config).await?;
    let probe = f
        .timed("probe", f.provider.probe(&ctx))
        .await?
        .map_err(failed("probe raised instead of answering"))?;
    ensure!(
        probe.ok,
        "probe of a valid config answered ok: false ({:?})",
        probe.summary
    );
    Ok(())
}

/// A1.5
pub async fn a1_5_unknown_keys_ignored(f: &Fixture) -> CheckResult {
    let config = f.config_with(json!({
        "unknownConformanceKey": "ignored", "driver": "sandbox", "pluginKey": "conformance",
        "sandboxProviderPlugin": true, "executionWorkspaceMode": null
    }));
    let ctx = f.context(&config).await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.cleanup(&lease).await;
    Ok(())
}

/// A saved environment for the fixture's provider, and a runtime around it.
/// Plaintext secret fields are persisted as secret references first, as a
/// host saving the environment would.
async fn runtime_for(
    f: &Fixture,
    provider: Arc<dyn SandboxProvider>,
) -> Result<(EnvironmentRuntime, Environment), Fail> {
    let secrets = Arc::new(InMemorySecretResolver::new());
    let mut config = f.config.clone();
    let paths = collect_secret_ref_paths(&f.provider.config_schema());
    persist_secret_refs(
        &mut config,
        &paths,
        secrets.as_ref(),
        "Conformance",
        "sandbox",
    )
    .await
    .map_err(failed("persisting secret fields"))?;
    config.insert("provider".into(), json!(f.provider.key()));
    let env = Environment::new(
        f.environment_id.clone(),
        "Conformance",
        "sandbox",
        Value::Object(config),
    );
    let runtime = EnvironmentRuntime::builder()
        .provider(provider)
        .secrets(secrets)
        .build();
    Ok((runtime, env))
}

/// A1.6
pub async fn a1_6_provider_key_stripped(f: &Fixture) -> CheckResult {
    let recording = RecordingProvider::new(f.provider.clone());
    let (runtime, env) = runtime_for(f, Arc::new(recording.clone())).await?;
    let run = format!("{}-a16", f.run_id);
    runtime
        .acquire_run_lease(AcquireRunLease::for_run(env, run.clone()))
        .await
        .map_err(failed("acquire through the runtime"))?;
    runtime
        .release_run_leases(&run, LeaseStatus::Released)
        .await
        .into_result()
        .map_err(failed("release"))?;
    let events = recording.events();
    ensure!(!events.is_empty(), "the provider saw no calls");
    for e in &events {
        ensure!(
            !e.config_keys.iter().any(|k| k == "provider"),
            "{} received `provider` in its config",
            e.operation
        );
    }
    Ok(())
}

/// A1.7
pub async fn a1_7_probe_within_deadline(f: &Fixture) -> CheckResult {
    f.require(f.caps().probe, "probe")?;
    let ctx = f.context(&f.config).await?;
    match tokio::time::timeout(Duration::from_secs(120), f.provider.probe(&ctx)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(Fail::Failed("probe took longer than 120 s".into())),
    }
}

/// A2.1
pub async fn a2_1_acquire_returns_usable_id(f: &Fixture) -> CheckResult {
    with_lease(f, |ctx, lease| async move {
        ensure!(
            lease.id().is_some(),
            "acquire returned no provider lease id"
        );
        if f.caps().execute {
            let r = exec(f, &ctx, &lease, ExecuteRequest::new("true")).await?;
            ensure!(
                r.exit_code == Some(0),
                "`true` in the new lease gave {:?}",
                r.exit_code
            );
        }
        Ok(())
    })
    .await
}

/// A2.2
pub async fn a2_2_acquire_metadata_shape(f: &Fixture) -> CheckResult {
    with_lease(f, |_ctx, lease| async move {
        let md = lease
            .metadata
            .as_ref()
            .ok_or_else(|| Fail::Failed("acquire returned no metadata object".into()))?;
        if let Some(cwd) = md.get("remoteCwd") {
            let cwd = cwd.as_str().unwrap_or_default();
            ensure!(cwd.starts_with('/'), "remoteCwd {cwd:?} is not absolute");
        }
        if let Some(shell) = md.get("shellCommand") {
            ensure!(
                shell == "bash" || shell == "sh",
                "shellCommand {shell} is neither bash nor sh"
            );
        }
        Ok(())
    })
    .await
}

/// A2.3
pub async fn a2_3_any_run_id(f: &Fixture) -> CheckResult {
    let ctx = f.context(&f.config).await?;
    for run_id in [
        uuid::Uuid::new_v4().to_string(),
        "run with spaces/ünïcode".to_owned(),
    ] {
        let request = AcquireRequest {
            run_id: run_id.clone(),
            workspace_mode: Some("isolated_workspace".into()),
            ..Default::default()
        };
        let lease = f
            .timed("acquire", f.provider.acquire(&ctx, &request))
            .await?
            .map_err(failed(&format!("acquire with run id {run_id:?}")))?;
        f.cleanup(&handle(&lease)).await;
    }
    Ok(())
}

/// A2.4
pub async fn a2_4_expires_at(f: &Fixture) -> CheckResult {
    with_lease(f, |_ctx, lease| async move {
        if f.caps().expires_at {
            ensure!(
                lease.expires_at.is_some(),
                "capability expires_at declared but acquire returned none"
            );
        }
        if let Some(at) = lease.expires_at {
            ensure!(
                at > paperclip_env_core::time::now() - chrono::Duration::minutes(1),
                "expires_at {at} is in the past"
            );
        }
        Ok(())
    })
    .await
}

/// A2.5
pub async fn a2_5_failed_acquire_leaves_nothing(f: &Fixture) -> CheckResult {
    let hook = f
        .fail_next_acquire
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no fail_next_acquire hook".into()))?;
    let before = f
        .live()
        .ok_or_else(|| Fail::Skipped("fixture has no live_resources counter".into()))?;
    hook();
    let ctx = f.context(&f.config).await?;
    let request = AcquireRequest {
        run_id: f.run_id.clone(),
        workspace_mode: None,
        ..Default::default()
    };
    let result = f
        .timed("acquire", f.provider.acquire(&ctx, &request))
        .await?;
    if let Ok(lease) = &result {
        f.cleanup(&handle(lease)).await;
        return Err(Fail::Failed(
            "the injected acquire failure did not fail acquire".into(),
        ));
    }
    let after = f.live().unwrap_or_default();
    ensure!(
        after == before,
        "a failed acquire left {} resource(s) behind",
        after.saturating_sub(before)
    );
    Ok(())
}

/// A2.6
pub async fn a2_6_acquire_not_retried(f: &Fixture) -> CheckResult {
    let hook = f
        .fail_next_acquire
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no fail_next_acquire hook".into()))?;
    let counter = f
        .create_calls
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no create_calls counter".into()))?;
    let before = counter();
    hook();
    let ctx = f.context(&f.config).await?;
    let request = AcquireRequest {
        run_id: f.run_id.clone(),
        workspace_mode: None,
        ..Default::default()
    };
    if let Ok(lease) = f
        .timed("acquire", f.provider.acquire(&ctx, &request))
        .await?
    {
        f.cleanup(&handle(&lease)).await;
        return Err(Fail::Failed(
            "the injected acquire failure did not fail acquire".into(),
        ));
    }
    let attempts = counter() - before;
    ensure!(
        attempts <= 1,
        "acquire created {attempts} times for one call"
    );
    Ok(())
}

/// A2.7
pub async fn a2_7_no_plaintext_secret_in_metadata(f: &Fixture) -> CheckResult {
    if f.secret_values.is_empty() {
        return Err(Fail::Skipped("fixture declares no secret values".into()));
    }
    with_lease(f, |_ctx, lease| async move {
        let mut md = lease.metadata.clone().unwrap_or_default();
        strip_secret_paths(
            &mut md,
            &collect_secret_ref_paths(&f.provider.config_schema()),
        );
        let text = Value::Object(md).to_string();
        for secret in &f.secret_values {
            ensure!(
                !text.contains(secret.as_str()),
                "a secret value appears in metadata outside secret-ref paths"
            );
        }
        Ok(())
    })
    .await
}

/// A2.8
pub async fn a2_8_reuse_returns_same_resource(f: &Fixture) -> CheckResult {
    f.require(f.caps().reusable_leases, "reusable_leases")?;
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": true})))
        .await?;
    let first = handle(&f.acquire(&ctx).await?);
    let second = handle(&f.acquire(&ctx).await?);
    let same = first.id() == second.id();
    let marked = second.metadata.as_ref().and_then(|m| m.get("resumedLease")) == Some(&json!(true));
    f.cleanup(&first).await;
    f.cleanup(&second).await;
    ensure!(
        !same || marked,
        "the kept resource was returned without resumedLease: true"
    );
    Ok(())
}

async fn reuse_roundtrip(f: &Fixture) -> Result<(CallContext, LeaseHandle, LeaseHandle), Fail> {
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": true})))
        .await?;
    let lease = handle(&f.acquire(&ctx).await?);
    if f.caps().execute {
        let marker = ExecuteRequest::shell("printf kept > .paperclip-conformance-marker");
        let cwd = lease.metadata_str("remoteCwd").map(str::to_owned);
        let marker = match cwd {
            Some(cwd) => marker.cwd(cwd),
            None => marker,
        };
        let r = exec(f, &ctx, &lease, marker).await?;
        ensure!(
            r.exit_code == Some(0),
            "writing the marker failed: {}",
            r.stderr
        );
    }
    f.timed(
        "release",
        f.provider.release(&ctx, &lease, LeaseStatus::Released),
    )
    .await?
    .map_err(failed("reusable release"))?;
    let resumed = f
        .timed("resume", f.provider.resume(&ctx, &lease))
        .await?
        .map_err(failed("resume"))?;
    Ok((ctx, lease, handle(&resumed)))
}

/// A3.1
pub async fn a3_1_resume_preserves_workspace(f: &Fixture) -> CheckResult {
    f.require(
        f.caps().resume && f.caps().reusable_leases,
        "resume + reusable_leases",
    )?;
    f.require(f.caps().execute, "execute")?;
    let (ctx, original, resumed) = reuse_roundtrip(f).await?;
    let result = async {
        ensure!(
            resumed.id().is_some(),
            "resume returned no provider lease id"
        );
        let cwd = resumed
            .metadata_str("remoteCwd")
            .or(original.metadata_str("remoteCwd"))
            .map(str::to_owned);
        let read = ExecuteRequest::shell("cat .paperclip-conformance-marker");
        let read = match cwd {
            Some(cwd) => read.cwd(cwd),
            None => read,
        };
        let r = exec(f, &ctx, &resumed, read).await?;
        ensure!(
            r.stdout == "kept",
            "the workspace was not preserved (stdout {:?}, stderr {:?})",
            r.stdout,
            r.stderr
        );
        Ok(())
    }
    .await;
    f.cleanup(&resumed).await;
    f.cleanup(&original).await;
    result
}

/// A3.2
pub async fn a3_2_resume_of_gone_resource(f: &Fixture) -> CheckResult {
    f.require(f.caps().resume, "resume")?;
    let ctx = f.context(&f.config).await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.cleanup(&lease).await;
    match f.timed("resume", f.provider.resume(&ctx, &lease)).await? {
        Err(_) => Ok(()),
        Ok(resumed) if resumed.id().is_none() => Ok(()),
        Ok(resumed) => {
            let resumed = handle(&resumed);
            let usable = if f.caps().execute {
                exec(f, &ctx, &resumed, ExecuteRequest::new("true"))
                    .await
                    .map(|r| r.exit_code == Some(0))
                    .unwrap_or(false)
            } else {
                true
            };
            f.cleanup(&resumed).await;
            ensure!(
                usable,
                "resume of a gone resource returned a handle that cannot run commands"
            );
            Ok(())
        }
    }
}

/// A3.3
pub async fn a3_3_resume_marks_resumed(f: &Fixture) -> CheckResult {
    f.require(
        f.caps().resume && f.caps().reusable_leases,
        "resume + reusable_leases",
    )?;
    let (_ctx, original, resumed) = reuse_roundtrip(f).await?;
    let marked = resumed
        .metadata
        .as_ref()
        .and_then(|m| m.get("resumedLease"))
        == Some(&json!(true));
    f.cleanup(&resumed).await;
    f.cleanup(&original).await;
    ensure!(marked, "resume metadata lacks resumedLease: true");
    Ok(())
}

/// A3.4
pub async fn a3_4_resume_uses_lease_metadata(f: &Fixture) -> CheckResult {
    f.require(
        f.caps().resume && f.caps().reusable_leases,
        "resume + reusable_leases",
    )?;
    let (_ctx, original, resumed) = reuse_roundtrip(f).await?;
    let ok = resumed.id().is_some();
    f.cleanup(&resumed).await;
    f.cleanup(&original).await;
    ensure!(
        ok,
        "resume from the old lease's id and metadata returned no id"
    );
    Ok(())
}

/// A4.1
pub async fn a4_1_release_destroys_or_keeps(f: &Fixture) -> CheckResult {
    let before = f
        .live()
        .ok_or_else(|| Fail::Skipped("fixture has no live_resources counter".into()))?;
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": false})))
        .await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.timed(
        "release",
        f.provider.release(&ctx, &lease, LeaseStatus::Released),
    )
    .await?
    .map_err(failed("release"))?;
    let after = f.live().unwrap_or_default();
    ensure!(
        after == before,
        "release without reuse left the resource alive ({before} → {after})"
    );
    if f.caps().reusable_leases {
        let ctx = f
            .context(&f.config_with(json!({"reuseLease": true})))
            .await?;
        let lease = handle(&f.acquire(&ctx).await?);
        f.timed(
            "release",
            f.provider.release(&ctx, &lease, LeaseStatus::Released),
        )
        .await?
        .map_err(failed("release"))?;
        let kept = f.live().unwrap_or_default();
        f.cleanup(&lease).await;
        ensure!(
            kept == before + 1,
            "release with reuseLease did not keep the resource ({before} → {kept})"
        );
        let cleaned = f.live().unwrap_or_default();
        ensure!(
            cleaned == before,
            "cleanup of the kept resource failed ({cleaned} alive)"
        );
    }
    Ok(())
}

/// A4.2
pub async fn a4_2_release_idempotent(f: &Fixture) -> CheckResult {
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": false})))
        .await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.timed(
        "release",
        f.provider.release(&ctx, &lease, LeaseStatus::Released),
    )
    .await?
    .map_err(failed("first release"))?;
    f.timed(
        "release",
        f.provider.release(&ctx, &lease, LeaseStatus::Released),
    )
    .await?
    .map_err(failed("second release"))?;
    Ok(())
}

/// A4.3
pub async fn a4_3_release_null_id(f: &Fixture) -> CheckResult {
    let ctx = f.context(&f.config).await?;
    f.timed(
        "release",
        f.provider
            .release(&ctx, &LeaseHandle::default(), LeaseStatus::Released),
    )
    .await?
    .map_err(failed("release with a null provider lease id"))?;
    Ok(())
}

/// A4.4
pub async fn a4_4_destroy_regardless_of_reuse(f: &Fixture) -> CheckResult {
    f.require(f.caps().destroy, "destroy")?;
    let before = f.live();
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": true})))
        .await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.timed("destroy", f.provider.destroy(&ctx, &lease))
        .await?
        .map_err(failed("destroy"))?;
    if let Some(before) = before {
        let after = f.live().unwrap_or_default();
        ensure!(
            after == before,
            "destroy of a reusable lease left the resource alive"
        );
    }
    f.timed("destroy", f.provider.destroy(&ctx, &lease))
        .await?
        .map_err(failed("second destroy"))?;
    Ok(())
}

/// A4.5
pub async fn a4_5_release_from_metadata_config(f: &Fixture) -> CheckResult {
    let before = f.live();
    let (runtime, env) = runtime_for(f, f.provider.clone()).await?;
    let run = format!("{}-a45", f.run_id);
    let record = runtime
        .acquire_run_lease(AcquireRunLease::for_run(env.clone(), run.clone()))
        .await
        .map_err(failed("acquire through the runtime"))?;
    // The environment is switched to another driver after the lease was taken.
    let mut switched = env.clone();
    switched.driver = "local".into();
    switched.config = json!({});
    runtime
        .environment_store()
        .put(switched)
        .await
        .map_err(failed("update environment"))?;
    let released = runtime
        .release_run_leases(&run, LeaseStatus::Released)
        .await
        .into_result()
        .map_err(failed("release"))?;
    ensure!(
        released.len() == 1,
        "expected one released lease, got {}",
        released.len()
    );
    let lease = &released[0].lease;
    ensure!(lease.id == record.lease.id, "released the wrong lease");
    ensure!(
        lease.cleanup_status == Some(CleanupStatus::Success),
        "provider cleanup from metadata failed: {:?}",
        lease.cleanup_error()
    );
    if let Some(before) = before {
        let after = f.live().unwrap_or_default();
        ensure!(
            after == before,
            "the resource survived a release from metadata"
        );
    }
    Ok(())
}

/// A4.6
pub async fn a4_6_release_errors_typed(f: &Fixture) -> CheckResult {
    let hook = f
        .fail_next_release
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no fail_next_release hook".into()))?;
    let ctx = f
        .context(&f.config_with(json!({"reuseLease": false})))
        .await?;
    let lease = handle(&f.acquire(&ctx).await?);
    hook();
    let result = f
        .timed(
            "release",
            f.provider.release(&ctx, &lease, LeaseStatus::Released),
        )
        .await?;
    f.cleanup(&lease).await;
    match result {
        Ok(()) => Err(Fail::Failed(
            "the injected release failure did not fail release".into(),
        )),
        Err(Error::Contract(m)) => Err(Fail::Failed(format!(
            "release failed with an untyped error: {m}"
        ))),
        Err(e) => {
            ensure!(
                !e.to_string().trim().is_empty(),
                "release error has no message"
            );
            Ok(())
        }
    }
}

/// A5.1
pub async fn a5_1_realize_returns_existing_cwd(f: &Fixture) -> CheckResult {
    f.require(f.caps().realize_workspace, "realize_workspace")?;
    with_lease(f, |ctx, lease| async move {
        let workspace = WorkspaceSpec {
            mode: Some("isolated_workspace".into()),
            ..Default::default()
        };
        let realized = f
            .timed(
                "realize",
                f.provider.realize_workspace(&ctx, &lease, &workspace),
            )
            .await?
            .map_err(failed("realize"))?;
        ensure!(
            realized.cwd.starts_with('/'),
            "cwd {:?} is not absolute",
            realized.cwd
        );
        if f.caps().execute {
            let r = exec(
                f,
                &ctx,
                &lease,
                ExecuteRequest::new("test").args(["-d", &realized.cwd]),
            )
            .await?;
            ensure!(
                r.exit_code == Some(0),
                "realized cwd {} does not exist in the lease",
                realized.cwd
            );
        }
        Ok(())
    })
    .await
}

/// A5.2
pub async fn a5_2_realize_prefers_lease_cwd(f: &Fixture) -> CheckResult {
    f.require(f.caps().realize_workspace, "realize_workspace")?;
    with_lease(f, |ctx, lease| async move {
        let Some(expected) = lease.metadata_str("remoteCwd").map(str::to_owned) else {
            return Err(Fail::Skipped("lease metadata has no remoteCwd".into()));
        };
        let workspace = WorkspaceSpec {
            remote_path: Some("/tmp/paperclip-conformance-other".into()),
            ..Default::default()
        };
        let realized = f
            .timed(
                "realize",
                f.provider.realize_workspace(&ctx, &lease, &workspace),
            )
            .await?
            .map_err(failed("realize"))?;
        ensure!(
            realized.cwd == expected,
            "realize chose {:?} over the lease's remoteCwd {expected:?}",
            realized.cwd
        );
        Ok(())
    })
    .await
}

/// A5.3
pub async fn a5_3_realize_needs_no_contents(f: &Fixture) -> CheckResult {
    f.require(f.caps().realize_workspace, "realize_workspace")?;
    with_lease(f, |ctx, lease| async move {
        let workspace = WorkspaceSpec {
            local_path: Some("/nonexistent/paperclip-conformance-local".into()),
            ..Default::default()
        };
        f.timed(
            "realize",
            f.provider.realize_workspace(&ctx, &lease, &workspace),
        )
        .await?
        .map_err(failed("realize"))?;
        Ok(())
    })
    .await
}

/// Runs one command in a fresh lease and hands the result to `verify`.
async fn run_one(
    f: &Fixture,
    request: ExecuteRequest,
    verify: impl FnOnce(ExecuteResult) -> CheckResult,
) -> CheckResult {
    f.require(f.caps().execute, "execute")?;
    with_lease(f, |ctx, lease| async move {
        verify(exec(f, &ctx, &lease, request).await?)
    })
    .await
}

/// A6.1
pub async fn a6_1_execute_success(f: &Fixture) -> CheckResult {
    run_one(f, ExecuteRequest::shell("printf hello"), |r| {
        ensure!(
            r.exit_code == Some(0) && !r.timed_out,
            "exit {:?}, timed_out {}",
            r.exit_code,
            r.timed_out
        );
        ensure!(r.stdout == "hello", "stdout {:?}", r.stdout);
        Ok(())
    })
    .await
}

/// A6.2
pub async fn a6_2_nonzero_exit_is_result(f: &Fixture) -> CheckResult {
    run_one(f, ExecuteRequest::shell("exit 3"), |r| {
        ensure!(
            r.exit_code == Some(3),
            "exit code {:?}, expected 3",
            r.exit_code
        );
        Ok(())
    })
    .await
}

/// A6.3
pub async fn a6_3_streams_separate_utf8(f: &Fixture) -> CheckResult {
    run_one(
        f,
        ExecuteRequest::shell("printf 'out ☃'; printf 'err é' >&2"),
        |r| {
            ensure!(r.stdout == "out ☃", "stdout {:?}", r.stdout);
            ensure!(r.stderr == "err é", "stderr {:?}", r.stderr);
            Ok(())
        },
    )
    .await
}

/// A6.4
pub async fn a6_4_argv_exact(f: &Fixture) -> CheckResult {
    let args = [
        "%s|",
        "a b",
        "it's",
        "$HOME",
        "*",
        "\"dq\"",
        "",
        "back\\slash",
        "new\nline",
    ];
    run_one(f, ExecuteRequest::new("printf").args(args), |r| {
        let expected = "a b|it's|$HOME|*|\"dq\"||back\\slash|new\nline|";
        ensure!(
            r.stdout == expected,
            "argv was altered: {:?} (expected {expected:?})",
            r.stdout
        );
        Ok(())
    })
    .await
}

/// A6.5
pub async fn a6_5_cwd_honoured(f: &Fixture) -> CheckResult {
    f.require(f.caps().execute, "execute")?;
    with_lease(f, |ctx, lease| async move {
        let r = exec(f, &ctx, &lease, ExecuteRequest::new("pwd").cwd("/")).await?;
        ensure!(r.stdout.trim() == "/", "cwd / gave pwd {:?}", r.stdout);
        if let Some(cwd) = lease.metadata_str("remoteCwd").map(str::to_owned) {
            let r = exec(f, &ctx, &lease, ExecuteRequest::new("pwd").cwd(cwd.clone())).await?;
            ensure!(r.stdout.trim() == cwd, "cwd {cwd} gave pwd {:?}", r.stdout);
        }
        Ok(())
    })
    .await
}

/// A6.6
pub async fn a6_6_env_isolated(f: &Fixture) -> CheckResult {
    let host = pick_host_var();
    let script = match &host {
        Some(name) => format!("printf '%s|%s' \"$EXPLICIT_ONLY\" \"${{{name}-unset}}\""),
        None => "printf '%s|unset' \"$EXPLICIT_ONLY\"".to_owned(),
    };
    run_one(
        f,
        ExecuteRequest::shell(script).env("EXPLICIT_ONLY", "visible"),
        |r| {
            ensure!(
                r.stdout == "visible|unset",
                "env leaked or was lost: {:?} (host var {host:?})",
                r.stdout
            );
            Ok(())
        },
    )
    .await
}

/// A6.7
pub async fn a6_7_default_path(f: &Fixture) -> CheckResult {
    run_one(f, ExecuteRequest::shell("printf %s \"$PATH\""), |r| {
        ensure!(
            r.stdout.split(':').any(|p| p == "/usr/local/bin"),
            "default PATH {:?} lacks /usr/local/bin",
            r.stdout
        );
        Ok(())
    })
    .await
}

/// A6.8
pub async fn a6_8_stdin_delivered_then_eof(f: &Fixture) -> CheckResult {
    f.require(f.caps().stdin, "stdin")?;
    f.require(f.caps().execute, "execute")?;
    with_lease(f, |ctx, lease| async move {
        let r = exec(
            f,
            &ctx,
            &lease,
            ExecuteRequest::new("cat").stdin("line one\nline two\n"),
        )
        .await?;
        ensure!(
            r.stdout == "line one\nline two\n",
            "stdin was not delivered: {:?}",
            r.stdout
        );
        let r = exec(
            f,
            &ctx,
            &lease,
            ExecuteRequest::new("cat").stdin("").timeout_ms(10_000),
        )
        .await?;
        ensure!(
            r.stdout.is_empty() && !r.timed_out,
            "empty stdin was not closed"
        );
        let r = exec(
            f,
            &ctx,
            &lease,
            ExecuteRequest::new("cat").timeout_ms(10_000),
        )
        .await?;
        ensure!(
            r.stdout.is_empty() && !r.timed_out,
            "absent stdin was not closed"
        );
        Ok(())
    })
    .await
}

fn stubborn() -> ExecuteRequest {
    ExecuteRequest::shell("trap '' TERM; while :; do sleep 1; done")
}

/// A6.9
pub async fn a6_9_timeout_kills(f: &Fixture) -> CheckResult {
    run_one(f, stubborn().timeout_ms(300), |r| {
        ensure!(r.timed_out, "timed_out is false");
        Ok(())
    })
    .await
}

/// A6.10
pub async fn a6_10_timeout_exit_code_null(f: &Fixture) -> CheckResult {
    run_one(f, ExecuteRequest::shell("sleep 30").timeout_ms(300), |r| {
        ensure!(
            r.timed_out && r.exit_code.is_none(),
            "timed_out {}, exit code {:?}",
            r.timed_out,
            r.exit_code
        );
        Ok(())
    })
    .await
}

/// A6.11
pub async fn a6_11_config_timeout_applies(f: &Fixture) -> CheckResult {
    f.require(f.caps().execute, "execute")?;
    let ctx = f.context(&f.config_with(json!({"timeoutMs": 300}))).await?;
    let lease = handle(&f.acquire(&ctx).await?);
    let result = exec(f, &ctx, &lease, ExecuteRequest::shell("sleep 30")).await;
    f.cleanup(&lease).await;
    let r = result?;
    ensure!(
        r.timed_out,
        "config timeoutMs 300 did not time the command out"
    );
    Ok(())
}

/// A6.12
pub async fn a6_12_signal_reported(f: &Fixture) -> CheckResult {
    f.require(f.caps().signals, "signals")?;
    run_one(f, ExecuteRequest::shell("kill -KILL $$"), |r| {
        ensure!(
            r.signal.as_deref() == Some("SIGKILL"),
            "signal {:?}",
            r.signal
        );
        ensure!(
            r.exit_code.is_none(),
            "exit code {:?} for a signalled command",
            r.exit_code
        );
        Ok(())
    })
    .await
}

/// A6.13
pub async fn a6_13_unknown_lease_not_found(f: &Fixture) -> CheckResult {
    f.require(f.caps().execute, "execute")?;
    let ctx = f.context(&f.config).await?;
    let lease = handle(&f.acquire(&ctx).await?);
    f.cleanup(&lease).await;
    let output = OutputCollector::buffered();
    match f
        .timed(
            "execute",
            f.provider
                .execute(&ctx, &lease, &ExecuteRequest::new("true"), &output),
        )
        .await?
    {
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(Fail::Failed(format!("expected not found, got: {e}"))),
        Ok(_) => Err(Fail::Failed(
            "execute on a destroyed lease succeeded".into(),
        )),
    }
}

/// A6.14
pub async fn a6_14_lifetime_refresh(f: &Fixture) -> CheckResult {
    f.require(f.caps().lifetime_refresh, "lifetime_refresh")?;
    Err(Fail::Skipped(
        "lifetime refresh is observable only through the provider's service; see its own tests"
            .into(),
    ))
}

/// A6.15
pub async fn a6_15_execute_not_retried(f: &Fixture) -> CheckResult {
    f.require(f.caps().execute, "execute")?;
    let hook = f
        .fail_next_execute
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no fail_next_execute hook".into()))?;
    let counter = f
        .execute_calls
        .clone()
        .ok_or_else(|| Fail::Skipped("fixture has no execute_calls counter".into()))?;
    with_lease(f, |ctx, lease| async move {
        let before = counter();
        hook();
        let output = OutputCollector::buffered();
        let result = f
            .timed(
                "execute",
                f.provider
                    .execute(&ctx, &lease, &ExecuteRequest::new("true"), &output),
            )
            .await?;
        ensure!(
            result.is_err(),
            "the injected execute failure did not fail execute"
        );
        let starts = counter() - before;
        ensure!(
            starts <= 1,
            "one execute started the command {starts} times"
        );
        Ok(())
    })
    .await
}

/// A7.1
pub async fn a7_1_lifecycle_order(f: &Fixture) -> CheckResult {
    let recording = RecordingProvider::new(f.provider.clone());
    let caps = f.caps();
    let ctx = f.context(&f.config).await?;
    let mut expected = vec![Operation::ValidateConfig];
    f.timed("validate", recording.validate_config(&f.config))
        .await?
        .map_err(failed("validate"))?;
    if caps.probe {
        f.timed("probe", recording.probe(&ctx))
            .await?
            .map_err(failed("probe"))?;
        expected.push(Operation::Probe);
    }
    let request = AcquireRequest {
        run_id: f.run_id.clone(),
        workspace_mode: None,
        ..Default::default()
    };
    let lease = handle(
        &f.timed("acquire", recording.acquire(&ctx, &request))
            .await?
            .map_err(failed("acquire"))?,
    );
    expected.push(Operation::Acquire);
    let body = async {
        if caps.realize_workspace {
            f.timed(
                "realize",
                recording.realize_workspace(&ctx, &lease, &WorkspaceSpec::default()),
            )
            .await?
            .map_err(failed("realize"))?;
            expected.push(Operation::RealizeWorkspace);
        }
        if caps.execute {
            let output = OutputCollector::buffered();
            f.timed(
                "execute",
                recording.execute(&ctx, &lease, &ExecuteRequest::new("true"), &output),
            )
            .await?
            .map_err(failed("execute"))?;
            expected.push(Operation::Execute);
        }
        Ok::<(), Fail>(())
    }
    .await;
    if caps.destroy {
        f.timed("destroy", recording.destroy(&ctx, &lease))
            .await?
            .map_err(failed("destroy"))?;
        expected.push(Operation::Destroy);
    } else {
        f.timed(
            "release",
            recording.release(&ctx, &lease, LeaseStatus::Released),
        )
        .await?
        .map_err(failed("release"))?;
        expected.push(Operation::Release);
    }
    body?;
    assert_event_order(&recording.events(), &expected).map_err(Fail::Failed)
}

/// A7.2
pub async fn a7_2_unsupported_is_typed(f: &Fixture) -> CheckResult {
    let caps = f.caps();
    let undeclared: Vec<Operation> = [
        Operation::Probe,
        Operation::Resume,
        Operation::Destroy,
        Operation::RealizeWorkspace,
        Operation::Execute,
    ]
    .into_iter()
    .filter(|op| !caps.supports(*op))
    .collect();
    if undeclared.is_empty() {
        return Err(Fail::Skipped("every optional operation is declared".into()));
    }
    let ctx = f.context(&f.config).await?;
    let lease = LeaseHandle {
        provider_lease_id: Some("paperclip-conformance-unknown".into()),
        ..Default::default()
    };
    for op in undeclared {
        let output = OutputCollector::buffered();
        let result = match op {
            Operation::Probe => f.provider.probe(&ctx).await.map(|_| ()),
            Operation::Resume => f.provider.resume(&ctx, &lease).await.map(|_| ()),
            Operation::Destroy => f.provider.destroy(&ctx, &lease).await,
            Operation::RealizeWorkspace => f
                .provider
                .realize_workspace(&ctx, &lease, &WorkspaceSpec::default())
                .await
                .map(|_| ()),
            _ => f
                .provider
                .execute(&ctx, &lease, &ExecuteRequest::new("true"), &output)
                .await
                .map(|_| ()),
        };
        match result {
            Err(Error::NotSupported { operation, .. }) if operation == op => {}
            Err(e) => {
                return Err(Fail::Failed(format!(
                    "undeclared {op} failed with {e} instead of not supported"
                )));
            }
            Ok(()) => {
                return Err(Fail::Failed(format!(
                    "undeclared {op} succeeded; declare the capability"
                )));
            }
        }
    }
    Ok(())
}

/// A7.3
pub async fn a7_3_run_id_labels_resource(f: &Fixture) -> CheckResult {
    with_lease(f, |_ctx, lease| async move {
        let in_id = lease.id().is_some_and(|id| id.contains(&f.run_id));
        let in_md = lease
            .metadata
            .as_ref()
            .is_some_and(|m| Value::Object(m.clone()).to_string().contains(&f.run_id));
        ensure!(
            in_id || in_md,
            "neither the lease id nor its metadata carries the run id"
        );
        Ok(())
    })
    .await
}
