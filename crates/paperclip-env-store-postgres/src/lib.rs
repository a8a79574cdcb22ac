//! # paperclip-env-store-postgres
//!
//! A [`LeaseStore`] and [`EnvironmentStore`] in PostgreSQL, for services
//! whose hosts share lease state: a lease acquired on one host can be
//! released or reaped on another.
//!
//! - The `environment_leases` table has Paperclip's columns and indexes
//!   (spec 00 §2.3; timestamps `timestamptz`, metadata `jsonb`), with three
//!   deliberate differences: ids are `text` (SDK callers use non-UUID ids),
//!   there are no foreign keys (the SDK has no `companies` table), and the
//!   SDK adds the reaper's claim columns (`claimed_by`, `claimed_until`) and
//!   a `seq` identity for stable order. `environment_id` is nullable and
//!   cleanup counters live in `metadata` (`pendingCleanupRetryAttempts`,
//!   `lastCleanupError`), as Paperclip 2026.916 has them.
//!   Environments live in `paperclip_env_environments` (JSON bodies), so the
//!   store does not collide with Paperclip's own `environments` table.
//! - **Row locking**: every change is one `UPDATE … RETURNING`, and
//!   [`LeaseStore::try_claim`] is a conditional `UPDATE` on the claim
//!   columns. Under PostgreSQL's row locks a second host's concurrent claim
//!   waits for the first to commit, re-checks the condition, and fails, so
//!   two hosts' reapers never release the same lease twice.
//! - **Migrations** run in a transaction under an advisory lock, so hosts
//!   starting together migrate once.
//!
//! ```no_run
//! # async fn demo() -> paperclip_env_core::Result<()> {
//! use std::sync::Arc;
//! use paperclip_env_core::EnvironmentRuntime;
//! use paperclip_env_store_postgres::PostgresStore;
//! let store = Arc::new(PostgresStore::connect("host=127.0.0.1 user=postgres dbname=app").await?);
//! let runtime = EnvironmentRuntime::builder()
//!     .lease_store(store.clone())
//!     .environment_store(store)
//!     .build();
//! let report = runtime.reap().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use paperclip_env_core::lease::{
    CleanupStatus, Environment, EnvironmentLease, JsonObject, LeasePolicy, LeaseStatus,
};
use paperclip_env_core::store::{
    ACQUIRE_IN_PROGRESS_REASON, AcquiredLease, EnvironmentStore, LeaseStore, NewLease,
    ReleaseUpdate,
};
use paperclip_env_core::time::{self, Timestamp};
use paperclip_env_core::{Error, Result};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

/// Schema migrations, applied in order; the schema version table holds the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: environment_leases (spec 00 §2.3) plus SDK columns, and environments.
    "CREATE TABLE environment_leases (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        company_id text,
        environment_id text NOT NULL,
        execution_workspace_id text,
        issue_id text,
        heartbeat_run_id text,
        status text NOT NULL DEFAULT 'active',
        lease_policy text NOT NULL DEFAULT 'ephemeral',
        provider text,
        provider_lease_id text,
        acquired_at timestamptz NOT NULL DEFAULT now(),
        last_used_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz,
        released_at timestamptz,
        failure_reason text,
        cleanup_status text,
        metadata jsonb,
        cleanup_attempts integer NOT NULL DEFAULT 0,
        cleanup_error text,
        claimed_by text,
        claimed_until timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX environment_leases_company_environment_status_idx
        ON environment_leases (company_id, environment_id, status);
    CREATE INDEX environment_leases_company_execution_workspace_idx
        ON environment_leases (company_id, execution_workspace_id);
    CREATE INDEX environment_leases_company_issue_idx ON environment_leases (company_id, issue_id);
    CREATE INDEX environment_leases_heartbeat_run_idx ON environment_leases (heartbeat_run_id);
    CREATE INDEX environment_leases_company_last_used_idx
        ON environment_leases (company_id, last_used_at);
    CREATE INDEX environment_leases_provider_lease_idx ON environment_leases (provider_lease_id);
    CREATE INDEX environment_leases_status_idx ON environment_leases (status, cleanup_status);
    CREATE TABLE paperclip_env_environments (
        id text PRIMARY KEY,
        body jsonb NOT NULL,
        updated_at timestamptz NOT NULL
    );",
    // 2: Paperclip 2026.916: `environment_id` nullable (a `pending_cleanup`
    // row outlives its environment, as upstream's `on delete set null`), and
    // the SDK's `cleanup_attempts` / `cleanup_error` folded into metadata
    // (`pendingCleanupRetryAttempts`, `lastCleanupError`).
    "ALTER TABLE environment_leases ALTER COLUMN environment_id DROP NOT NULL;
    UPDATE environment_leases SET metadata =
        (CASE WHEN jsonb_typeof(metadata) = 'object' THEN metadata ELSE '{}'::jsonb END)
        || jsonb_strip_nulls(jsonb_build_object(
            'pendingCleanupRetryAttempts',
            CASE WHEN status = 'pending_cleanup' THEN LEAST(cleanup_attempts, 5) END,
            'lastCleanupError', cleanup_error))
        WHERE (cleanup_attempts > 0 AND status = 'pending_cleanup') OR cleanup_error IS NOT NULL;
    ALTER TABLE environment_leases DROP COLUMN cleanup_attempts;
    ALTER TABLE environment_leases DROP COLUMN cleanup_error;",
];

/// Serializes migrations between hosts (an arbitrary, fixed advisory lock key).
const MIGRATION_LOCK_KEY: i64 = 0x7061_7065_7263_6c70;

const LEASE_COLUMNS: &str = "id, company_id, environment_id, execution_workspace_id, issue_id, \
    heartbeat_run_id, status, lease_policy, provider, provider_lease_id, acquired_at, \
    last_used_at, expires_at, released_at, failure_reason, cleanup_status, metadata, \
    created_at, updated_at";

fn store_error(context: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Store {
        message: format!("postgres: {context}: {e}"),
        source: Some(Box::new(e)),
    }
}

fn lease_from_row(row: &Row) -> Result<EnvironmentLease> {
    let get_err = |e: tokio_postgres::Error| store_error("read lease row", e);
    let text = |name: &str| -> Result<String> { row.try_get::<_, String>(name).map_err(get_err) };
    let opt = |name: &str| -> Result<Option<String>> {
        row.try_get::<_, Option<String>>(name).map_err(get_err)
    };
    let ts =
        |name: &str| -> Result<Timestamp> { row.try_get::<_, Timestamp>(name).map_err(get_err) };
    let ts_opt = |name: &str| -> Result<Option<Timestamp>> {
        row.try_get::<_, Option<Timestamp>>(name).map_err(get_err)
    };
    let metadata = match row
        .try_get::<_, Option<Value>>("metadata")
        .map_err(get_err)?
    {
        None => None,
        Some(Value::Object(map)) => Some(map),
        // A row Paperclip (or a provider) wrote with a scalar or array root
        // must not fail a whole list: it reads as no metadata, as upstream's
        // writers treat a non-object root as `{}`.
        Some(_) => {
            tracing::warn!("postgres: lease metadata is not a JSON object; read as none");
            None
        }
    };
    Ok(EnvironmentLease {
        id: text("id")?,
        company_id: opt("company_id")?,
        environment_id: opt("environment_id")?,
        execution_workspace_id: opt("execution_workspace_id")?,
        issue_id: opt("issue_id")?,
        heartbeat_run_id: opt("heartbeat_run_id")?,
        status: text("status")?.parse()?,
        lease_policy: text("lease_policy")?.parse()?,
        provider: opt("provider")?,
        provider_lease_id: opt("provider_lease_id")?,
        acquired_at: ts("acquired_at")?,
        last_used_at: ts("last_used_at")?,
        expires_at: ts_opt("expires_at")?,
        released_at: ts_opt("released_at")?,
        failure_reason: opt("failure_reason")?,
        cleanup_status: opt("cleanup_status")?
            .map(|c| c.parse::<CleanupStatus>())
            .transpose()?,
        metadata,
        created_at: ts("created_at")?,
        updated_at: ts("updated_at")?,
    })
}

/// Leases and environments in PostgreSQL. Cheap to clone; clones share one
/// connection (tokio-postgres pipelines concurrent statements on it).
#[derive(Clone)]
pub struct PostgresStore {
    client: Arc<Client>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects (without TLS: use it on loopback or a private network) with
    /// a libpq-style connection string, and brings the schema up to date.
    /// The connection string may hold a password; it is never logged.
    pub async fn connect(connection_string: &str) -> Result<Self> {
        let (mut client, connection) = tokio_postgres::connect(connection_string, NoTls)
            .await
            .map_err(|e| store_error("connect", e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres lease store connection ended");
            }
        });
        Self::migrate(&mut client).await?;
        Ok(PostgresStore {
            client: Arc::new(client),
        })
    }

    async fn migrate(client: &mut Client) -> Result<()> {
        let tx = client
            .transaction()
            .await
            .map_err(|e| store_error("begin migration", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(|e| store_error("take migration lock", e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS paperclip_env_schema_version (version integer NOT NULL)",
        )
        .await
        .map_err(|e| store_error("create schema version table", e))?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM paperclip_env_schema_version", &[])
            .await
            .map_err(|e| store_error("read schema version", e))?
        {
            Some(row) => row.get(0),
            None => {
                tx.execute(
                    "INSERT INTO paperclip_env_schema_version (version) VALUES (0)",
                    &[],
                )
                .await
                .map_err(|e| store_error("init schema version", e))?;
                0
            }
        };
        let known = MIGRATIONS.len();
        let applied = usize::try_from(version).unwrap_or(usize::MAX);
        if applied > known {
            return Err(Error::store(format!(
                "postgres: the database has schema version {version}, newer than this \
                 paperclip-env understands ({known}); upgrade paperclip-env"
            )));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| store_error(&format!("apply migration {}", index + 1), e))?;
            let next = i32::try_from(index + 1).unwrap_or(i32::MAX);
            tx.execute(
                "UPDATE paperclip_env_schema_version SET version = $1",
                &[&next],
            )
            .await
            .map_err(|e| store_error("record schema version", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| store_error("commit migration", e))
    }

    /// The schema version of the database (number of migrations applied).
    pub async fn schema_version(&self) -> Result<u32> {
        let row = self
            .client
            .query_one("SELECT version FROM paperclip_env_schema_version", &[])
            .await
            .map_err(|e| store_error("read schema version", e))?;
        Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0))
    }

    /// Every lease, newest first.
    pub async fn list_all(&self) -> Result<Vec<EnvironmentLease>> {
        self.select("list leases", "ORDER BY created_at DESC, seq DESC", &[])
            .await
    }

    async fn one(
        &self,
        context: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<EnvironmentLease>> {
        self.client
            .query_opt(sql, params)
            .await
            .map_err(|e| store_error(context, e))?
            .as_ref()
            .map(lease_from_row)
            .transpose()
    }

    async fn select(
        &self,
        context: &str,
        filter: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<EnvironmentLease>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM environment_leases {filter}");
        self.client
            .query(&sql, params)
            .await
            .map_err(|e| store_error(context, e))?
            .iter()
            .map(lease_from_row)
            .collect()
    }
}

impl PostgresStore {
    /// Inserts a row with `status`, `failure_reason` and `cleanup_status`.
    async fn insert_row(
        &self,
        new: NewLease,
        status: LeaseStatus,
        failure_reason: Option<&'static str>,
        cleanup_status: Option<CleanupStatus>,
    ) -> Result<EnvironmentLease> {
        let now = time::now();
        let id = uuid::Uuid::new_v4().to_string();
        let policy = new.lease_policy.unwrap_or(LeasePolicy::Ephemeral).as_str();
        let metadata = new.metadata.map(Value::Object);
        let cleanup = cleanup_status.map(|c| c.as_str());
        let sql = format!(
            "INSERT INTO environment_leases (id, company_id, environment_id, \
             execution_workspace_id, issue_id, heartbeat_run_id, status, lease_policy, provider, \
             provider_lease_id, acquired_at, last_used_at, created_at, updated_at, expires_at, \
             metadata, failure_reason, cleanup_status) VALUES ($1, $2, $3, $4, $5, $6, $13, $7, \
             $8, $9, $10, $10, $10, $10, $11, $12, $14, $15) RETURNING {LEASE_COLUMNS}"
        );
        self.one(
            "insert lease",
            &sql,
            &[
                &id,
                &new.company_id,
                &new.environment_id,
                &new.execution_workspace_id,
                &new.issue_id,
                &new.heartbeat_run_id,
                &policy,
                &new.provider,
                &new.provider_lease_id,
                &now,
                &new.expires_at,
                &metadata,
                &status.as_str(),
                &failure_reason,
                &cleanup,
            ],
        )
        .await?
        .ok_or_else(|| Error::store("postgres: insert returned no row"))
    }
}

#[async_trait]
impl LeaseStore for PostgresStore {
    async fn insert(&self, new: NewLease) -> Result<EnvironmentLease> {
        self.insert_row(new, LeaseStatus::Active, None, None).await
    }

    async fn insert_acquiring(&self, new: NewLease) -> Result<EnvironmentLease> {
        self.insert_row(
            new,
            LeaseStatus::PendingCleanup,
            Some(ACQUIRE_IN_PROGRESS_REASON),
            Some(CleanupStatus::Pending),
        )
        .await
    }

    async fn complete_acquisition(
        &self,
        id: &str,
        acquired: AcquiredLease,
    ) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        let policy = acquired
            .lease_policy
            .unwrap_or(LeasePolicy::Ephemeral)
            .as_str();
        let metadata = acquired.metadata.map(Value::Object);
        // One conditional UPDATE under the row lock: a reaper that took the
        // row over first wins.
        let sql = format!(
            "UPDATE environment_leases SET status = 'active', failure_reason = NULL, \
             cleanup_status = NULL, lease_policy = $1, provider_lease_id = $2, expires_at = $3, \
             metadata = $4, last_used_at = $5, updated_at = $5 \
             WHERE id = $6 AND status = 'pending_cleanup' AND failure_reason = $7 \
             RETURNING {LEASE_COLUMNS}"
        );
        self.one(
            "complete acquisition",
            &sql,
            &[
                &policy,
                &acquired.provider_lease_id,
                &acquired.expires_at,
                &metadata,
                &now,
                &id,
                &ACQUIRE_IN_PROGRESS_REASON,
            ],
        )
        .await
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
        let released_at = (status != LeaseStatus::Retained).then_some(now);
        let cleanup = update.cleanup_status.map(|c| c.as_str());
        let error = match update.cleanup_status {
            Some(CleanupStatus::Failed | CleanupStatus::Pending) => update.cleanup_error.clone(),
            _ => None,
        };
        // Only the two metadata keys a release owns are written (`-` and
        // `jsonb_set`), so a concurrent write of another key survives: the
        // receipt is set or removed (upstream's `releaseLease`), the last
        // cleanup error set or removed with a cleanup status.
        let sql = format!(
            "UPDATE environment_leases SET status = $1, released_at = $2, last_used_at = $3, \
             updated_at = $3, failure_reason = COALESCE($4::text, failure_reason), \
             cleanup_status = COALESCE($5::text, cleanup_status), \
             metadata = CASE \
                 WHEN metadata IS NULL AND $8::jsonb IS NULL AND ($5::text IS NULL OR $6::text IS NULL) \
                     THEN NULL \
                 ELSE (WITH base AS (SELECT CASE WHEN $8::jsonb IS NULL \
                         THEN (CASE WHEN jsonb_typeof(metadata) = 'object' THEN metadata ELSE '{{}}'::jsonb END) \
                             - 'remoteExecutionTermination' \
                         ELSE jsonb_set(CASE WHEN jsonb_typeof(metadata) = 'object' THEN metadata \
                             ELSE '{{}}'::jsonb END, '{{remoteExecutionTermination}}', $8::jsonb, true) END AS m) \
                     SELECT CASE WHEN $5::text IS NULL THEN m \
                         WHEN $6::text IS NULL THEN m - 'lastCleanupError' \
                         ELSE jsonb_set(m, '{{lastCleanupError}}', to_jsonb($6::text), true) END FROM base) END \
             WHERE id = $7 RETURNING {LEASE_COLUMNS}"
        );
        self.one(
            "release lease",
            &sql,
            &[
                &status.as_str(),
                &released_at,
                &now,
                &update.failure_reason,
                &cleanup,
                &error,
                &id,
                &update.termination,
            ],
        )
        .await
    }

    async fn update_metadata(
        &self,
        id: &str,
        metadata: JsonObject,
    ) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        let metadata = Value::Object(metadata);
        let sql = format!(
            "UPDATE environment_leases SET metadata = $1, last_used_at = $2, updated_at = $2 \
             WHERE id = $3 RETURNING {LEASE_COLUMNS}"
        );
        self.one("update lease metadata", &sql, &[&metadata, &now, &id])
            .await
    }

    async fn touch(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        let now = time::now();
        let sql = format!(
            "UPDATE environment_leases SET last_used_at = $1, updated_at = $1 \
             WHERE id = $2 RETURNING {LEASE_COLUMNS}"
        );
        self.one("touch lease", &sql, &[&now, &id]).await
    }

    async fn get(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM environment_leases WHERE id = $1");
        self.one("get lease", &sql, &[&id]).await
    }

    async fn list_by_environment(
        &self,
        environment_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        let status = status.map(|s| s.as_str());
        self.select(
            "list leases by environment",
            "WHERE environment_id = $1 AND ($2::text IS NULL OR status = $2::text) \
             ORDER BY last_used_at DESC, created_at DESC, seq DESC",
            &[&environment_id, &status],
        )
        .await
    }

    async fn list_by_run(
        &self,
        run_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        let status = status.map(|s| s.as_str());
        self.select(
            "list leases by run",
            "WHERE heartbeat_run_id = $1 AND ($2::text IS NULL OR status = $2::text) \
             ORDER BY created_at ASC, seq ASC",
            &[&run_id, &status],
        )
        .await
    }

    async fn list_failed_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list failed cleanups",
            "WHERE cleanup_status = 'failed' ORDER BY updated_at ASC, seq ASC",
            &[],
        )
        .await
    }

    async fn list_active(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list active leases",
            "WHERE status = 'active' ORDER BY created_at ASC, seq ASC",
            &[],
        )
        .await
    }

    async fn list_pending_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list pending cleanups",
            "WHERE status = 'pending_cleanup' ORDER BY created_at ASC, seq ASC",
            &[],
        )
        .await
    }

    async fn claim_cleanup_attempt(&self, id: &str, expected: u32) -> Result<bool> {
        let now = time::now();
        let expected = i64::from(expected);
        // Paperclip's `claimPendingCleanupRetryAttempt`: one conditional
        // UPDATE under the row lock, reading the stored count with the same
        // clamping as `read_cleanup_attempts`, writing only the count key.
        let changed = self
            .client
            .execute(
                "UPDATE environment_leases SET \
                 metadata = jsonb_set(CASE WHEN jsonb_typeof(metadata) = 'object' THEN metadata \
                     ELSE '{}'::jsonb END, '{pendingCleanupRetryAttempts}', to_jsonb($2::bigint + 1), true), \
                 last_used_at = $3, updated_at = $3 \
                 WHERE id = $1 AND status = 'pending_cleanup' AND \
                 (CASE WHEN jsonb_typeof(metadata -> 'pendingCleanupRetryAttempts') = 'number' \
                     THEN LEAST(GREATEST(floor((metadata ->> 'pendingCleanupRetryAttempts')::numeric), 0), 5) \
                     ELSE 0 END) = $2::bigint",
                &[&id, &expected, &now],
            )
            .await
            .map_err(|e| store_error("claim cleanup attempt", e))?;
        Ok(changed == 1)
    }

    async fn try_claim(&self, id: &str, claimant: &str, ttl: Duration) -> Result<bool> {
        let now = time::now();
        let until = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(now);
        // One conditional UPDATE: a concurrent claimant blocks on the row
        // lock, then re-evaluates the condition against the committed claim.
        let changed = self
            .client
            .execute(
                "UPDATE environment_leases SET claimed_by = $2, claimed_until = $3 \
                 WHERE id = $1 AND (claimed_by IS NULL OR claimed_by = $2 \
                     OR claimed_until IS NULL OR claimed_until <= $4)",
                &[&id, &claimant, &until, &now],
            )
            .await
            .map_err(|e| store_error("claim lease", e))?;
        Ok(changed == 1)
    }
}

#[async_trait]
impl EnvironmentStore for PostgresStore {
    async fn get(&self, id: &str) -> Result<Option<Environment>> {
        let row = self
            .client
            .query_opt(
                "SELECT body FROM paperclip_env_environments WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| store_error("get environment", e))?;
        row.map(|r| {
            let body: Value = r.get(0);
            serde_json::from_value(body)
                .map_err(|e| store_error("environment row is unreadable", e))
        })
        .transpose()
    }

    async fn put(&self, environment: Environment) -> Result<()> {
        let body = serde_json::to_value(&environment)
            .map_err(|e| store_error("serialize environment", e))?;
        self.client
            .execute(
                "INSERT INTO paperclip_env_environments (id, body, updated_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE \
                 SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at",
                &[&environment.id, &body, &environment.updated_at],
            )
            .await
            .map_err(|e| store_error("put environment", e))?;
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let n = self
            .client
            .execute(
                "DELETE FROM paperclip_env_environments WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| store_error("remove environment", e))?;
        Ok(n > 0)
    }
}
