//! The `local` driver (spec 00 §5.2): runs on this host, nothing to provision.

use async_trait::async_trait;
use serde_json::json;

use super::base_metadata;
use crate::Result;
use crate::driver::{AcquireInput, DriverContext, EnvironmentRuntimeDriver};
use crate::lease::{Environment, EnvironmentLease, LeasePolicy, LeaseStatus, driver_keys};
use crate::probe::ProbeResult;
use crate::realize::{RealizeWorkspaceResult, WorkspaceSpec, build_realization_record};
use crate::store::{NewLease, ReleaseUpdate};

/// The `local` driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalDriver;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[async_trait]
impl EnvironmentRuntimeDriver for LocalDriver {
    fn key(&self) -> &str {
        driver_keys::LOCAL
    }

    async fn acquire_run_lease(
        &self,
        ctx: &DriverContext,
        input: AcquireInput<'_>,
    ) -> Result<EnvironmentLease> {
        ctx.store
            .insert(NewLease {
                company_id: input.company_id,
                environment_id: input.environment.id.clone(),
                execution_workspace_id: input.lease_context.execution_workspace_id.clone(),
                issue_id: input.issue_id,
                heartbeat_run_id: input.heartbeat_run_id,
                lease_policy: Some(LeasePolicy::Ephemeral),
                provider: Some("local".into()),
                provider_lease_id: None,
                expires_at: None,
                metadata: Some(base_metadata(input.environment, &input.lease_context)),
            })
            .await
    }

    async fn release_run_lease(
        &self,
        ctx: &DriverContext,
        _environment: &Environment,
        lease: &EnvironmentLease,
        status: LeaseStatus,
    ) -> Result<Option<EnvironmentLease>> {
        ctx.store
            .release(&lease.id, status, ReleaseUpdate::default())
            .await
    }

    async fn realize_workspace(
        &self,
        _ctx: &DriverContext,
        environment: &Environment,
        lease: &EnvironmentLease,
        workspace: &WorkspaceSpec,
    ) -> Result<RealizeWorkspaceResult> {
        Ok(build_realization_record(environment, lease, workspace))
    }

    async fn probe(&self, _ctx: &DriverContext, _environment: &Environment) -> Result<ProbeResult> {
        let cwd = std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(ProbeResult {
            ok: true,
            driver: driver_keys::LOCAL.into(),
            summary: "Local environment is available on this Paperclip host.".into(),
            details: Some(json!({"hostname": hostname(), "cwd": cwd})),
        })
    }
}
