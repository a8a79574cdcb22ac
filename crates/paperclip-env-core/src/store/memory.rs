//! In-memory stores: the default for embedded use and tests.

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;

use super::{
    ACQUIRE_IN_PROGRESS_REASON, AcquiredLease, EnvironmentStore, LeaseStore, NewLease,
    ReleaseUpdate,
};
use crate::lease::{
    CleanupStatus, Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus,
};
use crate::{Error, Result, time};

#[derive(Default)]
struct Tables {
    leases: HashMap<String, EnvironmentLease>,
    by_environment: HashMap<String, Vec<String>>,
    by_run: HashMap<String, Vec<String>>,
    /// Reaper claims: lease id → (claimant, claimed until).
    claims: HashMap<String, (String, time::Timestamp)>,
}

/// Leases in memory, indexed by environment and run.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use paperclip_env_core::store::{InMemoryLeaseStore, LeaseStore, NewLease};
/// let store = InMemoryLeaseStore::new();
/// let lease = store.insert(NewLease { environment_id: "env-1".into(), ..Default::default() }).await.unwrap();
/// assert_eq!(store.get(&lease.id).await.unwrap().unwrap().status.as_str(), "active");
/// # });
/// ```
#[derive(Default)]
pub struct InMemoryLeaseStore {
    tables: RwLock<Tables>,
}

impl std::fmt::Debug for InMemoryLeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryLeaseStore")
            .field("leases", &self.len())
            .finish()
    }
}

impl InMemoryLeaseStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of lease rows.
    pub fn len(&self) -> usize {
        self.read().map(|t| t.leases.len()).unwrap_or(0)
    }

    /// Whether the store holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every lease row (unordered).
    pub fn all(&self) -> Vec<EnvironmentLease> {
        self.read()
            .map(|t| t.leases.values().cloned().collect())
            .unwrap_or_default()
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, Tables>> {
        self.tables
            .read()
            .map_err(|_| Error::store("lease table lock poisoned"))
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Tables>> {
        self.tables
            .write()
            .map_err(|_| Error::store("lease table lock poisoned"))
    }

    fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&mut EnvironmentLease),
    ) -> Result<Option<EnvironmentLease>> {
        let mut tables = self.write()?;
        Ok(tables.leases.get_mut(id).map(|lease| {
            f(lease);
            lease.clone()
        }))
    }

    fn insert_row(
        &self,
        new: NewLease,
        status: LeaseStatus,
        failure_reason: Option<String>,
        cleanup_status: Option<CleanupStatus>,
    ) -> Result<EnvironmentLease> {
        let now = time::now();
        let lease = EnvironmentLease {
            id: uuid::Uuid::new_v4().to_string(),
            company_id: new.company_id,
            environment_id: Some(new.environment_id),
            execution_workspace_id: new.execution_workspace_id,
            issue_id: new.issue_id,
            heartbeat_run_id: new.heartbeat_run_id,
            status,
            lease_policy: new.lease_policy.unwrap_or(LeasePolicy::Ephemeral),
            provider: new.provider,
            provider_lease_id: new.provider_lease_id,
            acquired_at: now,
            last_used_at: now,
            expires_at: new.expires_at,
            released_at: None,
            failure_reason,
            cleanup_status,
            metadata: new.metadata,
            created_at: now,
            updated_at: now,
        };
        let mut tables = self.write()?;
        if let Some(environment) = &lease.environment_id {
            tables
                .by_environment
                .entry(environment.clone())
                .or_default()
                .push(lease.id.clone());
        }
        if let Some(run) = &lease.heartbeat_run_id {
            tables
                .by_run
                .entry(run.clone())
                .or_default()
                .push(lease.id.clone());
        }
        tables.leases.insert(lease.id.clone(), lease.clone());
        Ok(lease)
    }
}

#[async_trait]
impl LeaseStore for InMemoryLeaseStore {
    async fn insert(&self, new: NewLease) -> Result<EnvironmentLease> {
        self.insert_row(new, LeaseStatus::Active, None, None)
    }

    async fn insert_acquiring(&self, new: NewLease) -> Result<EnvironmentLease> {
        self.insert_row(
            new,
            LeaseStatus::PendingCleanup,
            Some(ACQUIRE_IN_PROGRESS_REASON.to_owned()),
            Some(CleanupStatus::Pending),
        )
    }

    async fn complete_acquisition(
        &self,
        id: &str,
        acquired: AcquiredLease,
    ) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        let mut tables = self.write()?;
        let Some(lease) = tables.leases.get_mut(id) else {
            return Ok(None);
        };
        if lease.status != LeaseStatus::PendingCleanup
            || lease.failure_reason.as_deref() != Some(ACQUIRE_IN_PROGRESS_REASON)
        {
            return Ok(None);
        }
        lease.status = LeaseStatus::Active;
        lease.failure_reason = None;
        lease.cleanup_status = None;
        lease.lease_policy = acquired.lease_policy.unwrap_or(LeasePolicy::Ephemeral);
        lease.provider_lease_id = acquired.provider_lease_id;
        lease.expires_at = acquired.expires_at;
        lease.metadata = acquired.metadata;
        lease.last_used_at = now;
        lease.updated_at = now;
        Ok(Some(lease.clone()))
    }

    async fn release(
        &self,
        id: &str,
        status: LeaseStatus,
        update: ReleaseUpdate,
    ) -> Result<Option<EnvironmentLease>> {
        if !status.is_release_status() {
            return Err(Error::Contract(format!(
                "A lease cannot be released with status {status}."
            )));
        }
        let now = time::now();
        self.modify(id, |lease| {
            lease.status = status;
            lease.released_at = if status == LeaseStatus::Retained {
                None
            } else {
                Some(now)
            };
            lease.last_used_at = now;
            lease.updated_at = now;
            lease.metadata = super::released_metadata(lease.metadata.as_ref(), &update);
            if let Some(reason) = update.failure_reason {
                lease.failure_reason = Some(reason);
            }
            if let Some(cleanup) = update.cleanup_status {
                lease.cleanup_status = Some(cleanup);
            }
        })
    }

    async fn update_metadata(
        &self,
        id: &str,
        metadata: JsonObject,
    ) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        self.modify(id, |lease| {
            lease.metadata = Some(metadata);
            lease.last_used_at = now;
            lease.updated_at = now;
        })
    }

    async fn touch(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        self.modify(id, |lease| {
            lease.last_used_at = now;
            lease.updated_at = now;
        })
    }

    async fn get(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        Ok(self.read()?.leases.get(id).cloned())
    }

    async fn list_by_environment(
        &self,
        environment_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        let tables = self.read()?;
        let mut out: Vec<EnvironmentLease> = tables
            .by_environment
            .get(environment_id)
            .into_iter()
            .flatten()
            .filter_map(|id| tables.leases.get(id))
            .filter(|l| status.is_none_or(|s| l.status == s))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.last_used_at
                .cmp(&a.last_used_at)
                .then(b.created_at.cmp(&a.created_at))
        });
        Ok(out)
    }

    async fn list_by_run(
        &self,
        run_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        let tables = self.read()?;
        Ok(tables
            .by_run
            .get(run_id)
            .into_iter()
            .flatten()
            .filter_map(|id| tables.leases.get(id))
            .filter(|l| status.is_none_or(|s| l.status == s))
            .cloned()
            .collect())
    }

    async fn list_failed_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        let tables = self.read()?;
        let mut out: Vec<_> = tables
            .leases
            .values()
            .filter(|l| l.cleanup_status == Some(CleanupStatus::Failed))
            .cloned()
            .collect();
        out.sort_by_key(|l| l.updated_at);
        Ok(out)
    }

    async fn list_active(&self) -> Result<Vec<EnvironmentLease>> {
        let tables = self.read()?;
        let mut out: Vec<_> = tables
            .leases
            .values()
            .filter(|l| l.status == LeaseStatus::Active)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn list_pending_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        let tables = self.read()?;
        let mut out: Vec<_> = tables
            .leases
            .values()
            .filter(|l| l.status == LeaseStatus::PendingCleanup)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn claim_cleanup_attempt(&self, id: &str, expected: u32) -> Result<bool> {
        let now = time::now();
        let mut tables = self.write()?;
        let Some(lease) = tables.leases.get_mut(id) else {
            return Ok(false);
        };
        if lease.status != LeaseStatus::PendingCleanup || lease.cleanup_attempts() != expected {
            return Ok(false);
        }
        lease.metadata.get_or_insert_with(JsonObject::new).insert(
            crate::lease::PENDING_CLEANUP_ATTEMPTS_KEY.into(),
            serde_json::json!(expected + 1),
        );
        lease.last_used_at = now;
        lease.updated_at = now;
        Ok(true)
    }

    async fn try_claim(&self, id: &str, claimant: &str, ttl: std::time::Duration) -> Result<bool> {
        let now = time::now();
        let until = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(now);
        let mut tables = self.write()?;
        if !tables.leases.contains_key(id) {
            return Ok(false);
        }
        let free = tables
            .claims
            .get(id)
            .is_none_or(|(holder, held_until)| holder == claimant || *held_until <= now);
        if free {
            tables
                .claims
                .insert(id.to_owned(), (claimant.to_owned(), until));
        }
        Ok(free)
    }
}

/// Environments in memory.
#[derive(Debug, Default)]
pub struct InMemoryEnvironmentStore {
    environments: RwLock<HashMap<String, Environment>>,
}

impl InMemoryEnvironmentStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl EnvironmentStore for InMemoryEnvironmentStore {
    async fn get(&self, id: &str) -> Result<Option<Environment>> {
        let envs = self
            .environments
            .read()
            .map_err(|_| Error::store("environment table lock poisoned"))?;
        Ok(envs.get(id).cloned())
    }

    async fn put(&self, environment: Environment) -> Result<()> {
        let mut envs = self
            .environments
            .write()
            .map_err(|_| Error::store("environment table lock poisoned"))?;
        envs.insert(environment.id.clone(), environment);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let mut envs = self
            .environments
            .write()
            .map_err(|_| Error::store("environment table lock poisoned"))?;
        Ok(envs.remove(id).is_some())
    }
}
