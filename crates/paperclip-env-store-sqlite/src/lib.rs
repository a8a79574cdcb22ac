//! # paperclip-env-store-sqlite
//!
//! A durable [`LeaseStore`] and [`EnvironmentStore`] in one SQLite file: the
//! default state of an embedded paperclip-env host and of the
//! `paperclip-env` CLI. Leases survive restarts, so a reaper started later
//! finds what a dead process left behind.
//!
//! - **One file, WAL**, `synchronous = FULL`: every state change is committed
//!   before the store call that records it returns, and the runtime records
//!   each provider outcome through the store before reporting it.
//! - **Schema migrations** keyed on `PRAGMA user_version`; a file written by a
//!   newer version is refused instead of misread.
//! - **Same columns as Paperclip's `environment_leases`** (spec 00 §2.3),
//!   (`environment_id` nullable, as in Paperclip 2026.916), plus the reaper's
//!   claim columns (`claimed_by`, `claimed_until`), so reapers in several
//!   processes sharing one file never act on the same lease at once. Cleanup
//!   counters live in `metadata` (`pendingCleanupRetryAttempts`,
//!   `lastCleanupError`); migration 2 moves those of older files there.
//! - `rusqlite` with the bundled SQLite (no system library), driven through
//!   `tokio::task::spawn_blocking` so the async runtime never blocks on disk.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use paperclip_env_core::{AcquireRunLease, Environment, EnvironmentRuntime, LeaseStatus};
//! use paperclip_env_store_sqlite::SqliteStore;
//! let dir = tempfile::tempdir().unwrap();
//! let store = Arc::new(SqliteStore::open(dir.path().join("state.db")).await?);
//! let runtime = EnvironmentRuntime::builder()
//!     .lease_store(store.clone())
//!     .environment_store(store.clone())
//!     .build();
//! let env = Environment::new("env-1", "Local", "local", serde_json::json!({}));
//! let lease = runtime.acquire_run_lease(AcquireRunLease::for_run(env, "run-1")).await?.lease;
//! // A second handle on the same file (say, after a restart) sees the lease.
//! let reopened = SqliteStore::open(dir.path().join("state.db")).await?;
//! assert_eq!(reopened.list_all().await?[0].id, lease.id);
//! runtime.release_run_leases("run-1", LeaseStatus::Released).await.into_result()?;
//! # Ok::<(), paperclip_env_core::Error>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
use rusqlite::{Connection, OptionalExtension, Row, params};

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: Paperclip's environment_leases (spec 00 §2.3) plus SDK columns, and environments.
    "CREATE TABLE environment_leases (
        id TEXT PRIMARY KEY NOT NULL,
        company_id TEXT,
        environment_id TEXT NOT NULL,
        execution_workspace_id TEXT,
        issue_id TEXT,
        heartbeat_run_id TEXT,
        status TEXT NOT NULL DEFAULT 'active',
        lease_policy TEXT NOT NULL DEFAULT 'ephemeral',
        provider TEXT,
        provider_lease_id TEXT,
        acquired_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL,
        expires_at TEXT,
        released_at TEXT,
        failure_reason TEXT,
        cleanup_status TEXT,
        metadata TEXT,
        cleanup_attempts INTEGER NOT NULL DEFAULT 0,
        cleanup_error TEXT,
        claimed_by TEXT,
        claimed_until TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
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
    CREATE INDEX environment_leases_environment_last_used_idx
        ON environment_leases (environment_id, last_used_at, created_at);
    CREATE INDEX environment_leases_status_idx ON environment_leases (status, cleanup_status);
    CREATE TABLE environments (
        id TEXT PRIMARY KEY NOT NULL,
        body TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );",
    // 2: Paperclip 2026.916: `environment_id` nullable (a `pending_cleanup`
    // row outlives its environment), and the SDK's `cleanup_attempts` /
    // `cleanup_error` columns folded into metadata (`pendingCleanupRetryAttempts`,
    // `lastCleanupError`) so no lease JSON carries keys Paperclip lacks.
    "CREATE TABLE environment_leases_v2 (
        id TEXT PRIMARY KEY NOT NULL,
        company_id TEXT,
        environment_id TEXT,
        execution_workspace_id TEXT,
        issue_id TEXT,
        heartbeat_run_id TEXT,
        status TEXT NOT NULL DEFAULT 'active',
        lease_policy TEXT NOT NULL DEFAULT 'ephemeral',
        provider TEXT,
        provider_lease_id TEXT,
        acquired_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL,
        expires_at TEXT,
        released_at TEXT,
        failure_reason TEXT,
        cleanup_status TEXT,
        metadata TEXT,
        claimed_by TEXT,
        claimed_until TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    INSERT INTO environment_leases_v2 (rowid, id, company_id, environment_id,
        execution_workspace_id, issue_id, heartbeat_run_id, status, lease_policy, provider,
        provider_lease_id, acquired_at, last_used_at, expires_at, released_at, failure_reason,
        cleanup_status, metadata, claimed_by, claimed_until, created_at, updated_at)
    SELECT rowid, id, company_id, environment_id, execution_workspace_id, issue_id,
        heartbeat_run_id, status, lease_policy, provider, provider_lease_id, acquired_at,
        last_used_at, expires_at, released_at, failure_reason, cleanup_status,
        CASE WHEN (cleanup_attempts = 0 OR status <> 'pending_cleanup') AND cleanup_error IS NULL
            THEN metadata
            ELSE json_patch(COALESCE(metadata, '{}'), json_object(
                'pendingCleanupRetryAttempts', CASE WHEN status = 'pending_cleanup'
                    THEN MIN(cleanup_attempts, 5) ELSE NULL END,
                'lastCleanupError', cleanup_error)) END,
        claimed_by, claimed_until, created_at, updated_at
    FROM environment_leases;
    DROP TABLE environment_leases;
    ALTER TABLE environment_leases_v2 RENAME TO environment_leases;
    CREATE INDEX environment_leases_company_environment_status_idx
        ON environment_leases (company_id, environment_id, status);
    CREATE INDEX environment_leases_company_execution_workspace_idx
        ON environment_leases (company_id, execution_workspace_id);
    CREATE INDEX environment_leases_company_issue_idx ON environment_leases (company_id, issue_id);
    CREATE INDEX environment_leases_heartbeat_run_idx ON environment_leases (heartbeat_run_id);
    CREATE INDEX environment_leases_company_last_used_idx
        ON environment_leases (company_id, last_used_at);
    CREATE INDEX environment_leases_provider_lease_idx ON environment_leases (provider_lease_id);
    CREATE INDEX environment_leases_environment_last_used_idx
        ON environment_leases (environment_id, last_used_at, created_at);
    CREATE INDEX environment_leases_status_idx ON environment_leases (status, cleanup_status);",
];

const LEASE_COLUMNS: &str = "id, company_id, environment_id, execution_workspace_id, issue_id, \
    heartbeat_run_id, status, lease_policy, provider, provider_lease_id, acquired_at, \
    last_used_at, expires_at, released_at, failure_reason, cleanup_status, metadata, \
    created_at, updated_at";

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn store_error(context: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Store {
        message: format!("sqlite: {context}: {e}"),
        source: Some(Box::new(e)),
    }
}

/// A lease row as SQLite returns it, before the text columns are parsed.
struct RawLease {
    id: String,
    company_id: Option<String>,
    environment_id: Option<String>,
    execution_workspace_id: Option<String>,
    issue_id: Option<String>,
    heartbeat_run_id: Option<String>,
    status: String,
    lease_policy: String,
    provider: Option<String>,
    provider_lease_id: Option<String>,
    acquired_at: String,
    last_used_at: String,
    expires_at: Option<String>,
    released_at: Option<String>,
    failure_reason: Option<String>,
    cleanup_status: Option<String>,
    metadata: Option<String>,
    created_at: String,
    updated_at: String,
}

impl RawLease {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawLease {
            id: row.get(0)?,
            company_id: row.get(1)?,
            environment_id: row.get(2)?,
            execution_workspace_id: row.get(3)?,
            issue_id: row.get(4)?,
            heartbeat_run_id: row.get(5)?,
            status: row.get(6)?,
            lease_policy: row.get(7)?,
            provider: row.get(8)?,
            provider_lease_id: row.get(9)?,
            acquired_at: row.get(10)?,
            last_used_at: row.get(11)?,
            expires_at: row.get(12)?,
            released_at: row.get(13)?,
            failure_reason: row.get(14)?,
            cleanup_status: row.get(15)?,
            metadata: row.get(16)?,
            created_at: row.get(17)?,
            updated_at: row.get(18)?,
        })
    }

    fn into_lease(self) -> Result<EnvironmentLease> {
        let ts = |column: &str, value: &str| -> Result<Timestamp> {
            time::parse_iso(value).ok_or_else(|| {
                Error::store(format!(
                    "sqlite: lease {}: unreadable {column} {value:?}",
                    self.id
                ))
            })
        };
        let ts_opt = |column: &str, value: &Option<String>| -> Result<Option<Timestamp>> {
            value.as_deref().map(|v| ts(column, v)).transpose()
        };
        let metadata = match &self.metadata {
            None => None,
            Some(text) => Some(
                serde_json::from_str::<JsonObject>(text)
                    .map_err(|e| store_error("lease metadata is not a JSON object", e))?,
            ),
        };
        Ok(EnvironmentLease {
            status: self.status.parse()?,
            lease_policy: self.lease_policy.parse()?,
            cleanup_status: self
                .cleanup_status
                .as_deref()
                .map(str::parse::<CleanupStatus>)
                .transpose()?,
            acquired_at: ts("acquired_at", &self.acquired_at)?,
            last_used_at: ts("last_used_at", &self.last_used_at)?,
            expires_at: ts_opt("expires_at", &self.expires_at)?,
            released_at: ts_opt("released_at", &self.released_at)?,
            created_at: ts("created_at", &self.created_at)?,
            updated_at: ts("updated_at", &self.updated_at)?,
            metadata,
            id: self.id,
            company_id: self.company_id,
            environment_id: self.environment_id,
            execution_workspace_id: self.execution_workspace_id,
            issue_id: self.issue_id,
            heartbeat_run_id: self.heartbeat_run_id,
            provider: self.provider,
            provider_lease_id: self.provider_lease_id,
            failure_reason: self.failure_reason,
        })
    }
}

fn leases(raw: Vec<RawLease>) -> Result<Vec<EnvironmentLease>> {
    raw.into_iter().map(RawLease::into_lease).collect()
}

fn metadata_text(metadata: &Option<JsonObject>) -> Result<Option<String>> {
    metadata
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| store_error("serialize lease metadata", e))
}

/// Leases and environments in one SQLite file. Cheap to clone; clones share
/// one connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) the store
    /// file at `path` and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let open_path = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            if let Some(parent) = open_path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| store_error("create the store directory", e))?;
            }
            let mut conn =
                Connection::open(&open_path).map_err(|e| store_error("open the store", e))?;
            Self::prepare(&mut conn, true)?;
            Ok(conn)
        })
        .await
        .map_err(|e| store_error("open task", e))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Some(path),
        })
    }

    /// A private in-memory database (for tests; nothing survives the handle).
    pub async fn open_in_memory() -> Result<Self> {
        let mut conn =
            Connection::open_in_memory().map_err(|e| store_error("open in memory", e))?;
        Self::prepare(&mut conn, false)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: None,
        })
    }

    /// The store file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The schema version of the file (number of migrations applied).
    pub async fn schema_version(&self) -> Result<u32> {
        self.call("read schema version", |conn| {
            conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        })
        .await
    }

    /// Every lease, newest first (the CLI's `leases` command).
    pub async fn list_all(&self) -> Result<Vec<EnvironmentLease>> {
        let raw = self
            .call("list leases", |conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {LEASE_COLUMNS} FROM environment_leases \
                     ORDER BY created_at DESC, rowid DESC"
                ))?;
                stmt.query_map([], RawLease::from_row)?.collect()
            })
            .await?;
        leases(raw)
    }

    fn prepare(conn: &mut Connection, file: bool) -> Result<()> {
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| store_error("set busy timeout", e))?;
        if file {
            // WAL lets readers in other processes work while one writes;
            // FULL syncs each commit, so a committed change survives a crash.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| store_error("enable WAL", e))?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|e| store_error("set synchronous", e))?;
        }
        Self::migrate(conn)
    }

    fn migrate(conn: &mut Connection) -> Result<()> {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| store_error("begin migration", e))?;
        let version: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| store_error("read schema version", e))?;
        let known = MIGRATIONS.len();
        if version as usize > known {
            return Err(Error::store(format!(
                "sqlite: the store file has schema version {version}, newer than this \
                 paperclip-env understands ({known}); upgrade paperclip-env"
            )));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)
                .map_err(|e| store_error(&format!("apply migration {}", index + 1), e))?;
            tx.pragma_update(None, "user_version", index + 1)
                .map_err(|e| store_error("record schema version", e))?;
        }
        tx.commit().map_err(|e| store_error("commit migration", e))
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn call<T, F>(&self, context: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::store("sqlite: connection lock poisoned"))?;
            f(&mut guard).map_err(|e| store_error(context, e))
        })
        .await
        .map_err(|e| store_error(context, e))?
    }

    async fn update_returning(
        &self,
        context: &'static str,
        sql: String,
        values: Vec<Option<String>>,
    ) -> Result<Option<EnvironmentLease>> {
        let raw = self
            .call(context, move |conn| {
                conn.query_row(
                    &sql,
                    rusqlite::params_from_iter(values.iter()),
                    RawLease::from_row,
                )
                .optional()
            })
            .await?;
        raw.map(RawLease::into_lease).transpose()
    }

    async fn select(
        &self,
        context: &'static str,
        filter: &'static str,
        values: Vec<Option<String>>,
    ) -> Result<Vec<EnvironmentLease>> {
        let raw = self
            .call(context, move |conn| {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {LEASE_COLUMNS} FROM environment_leases {filter}"
                ))?;
                stmt.query_map(
                    rusqlite::params_from_iter(values.iter()),
                    RawLease::from_row,
                )?
                .collect()
            })
            .await?;
        leases(raw)
    }
}

impl SqliteStore {
    /// Inserts a row with `status`, `failure_reason` and `cleanup_status` (SQL literals or NULL).
    async fn insert_row(
        &self,
        new: NewLease,
        status: LeaseStatus,
        failure_reason: Option<&'static str>,
        cleanup_status: Option<CleanupStatus>,
    ) -> Result<EnvironmentLease> {
        let now = time::to_iso(&time::now());
        let values: Vec<Option<String>> = vec![
            Some(uuid::Uuid::new_v4().to_string()),
            new.company_id,
            Some(new.environment_id),
            new.execution_workspace_id,
            new.issue_id,
            new.heartbeat_run_id,
            Some(
                new.lease_policy
                    .unwrap_or(LeasePolicy::Ephemeral)
                    .as_str()
                    .to_owned(),
            ),
            new.provider,
            new.provider_lease_id,
            Some(now),
            new.expires_at.as_ref().map(time::to_iso),
            metadata_text(&new.metadata)?,
            Some(status.as_str().to_owned()),
            failure_reason.map(str::to_owned),
            cleanup_status.map(|c| c.as_str().to_owned()),
        ];
        let sql = format!(
            "INSERT INTO environment_leases (id, company_id, environment_id, \
             execution_workspace_id, issue_id, heartbeat_run_id, status, lease_policy, provider, \
             provider_lease_id, acquired_at, last_used_at, created_at, updated_at, expires_at, \
             metadata, failure_reason, cleanup_status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?13, ?7, \
             ?8, ?9, ?10, ?10, ?10, ?10, ?11, ?12, ?14, ?15) RETURNING {LEASE_COLUMNS}"
        );
        self.update_returning("insert lease", sql, values)
            .await?
            .ok_or_else(|| Error::store("sqlite: insert returned no row"))
    }
}

#[async_trait]
impl LeaseStore for SqliteStore {
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
        let now = time::to_iso(&time::now());
        let values = vec![
            Some(
                acquired
                    .lease_policy
                    .unwrap_or(LeasePolicy::Ephemeral)
                    .as_str()
                    .to_owned(),
            ),
            acquired.provider_lease_id,
            acquired.expires_at.as_ref().map(time::to_iso),
            metadata_text(&acquired.metadata)?,
            Some(now),
            Some(id.to_owned()),
            Some(ACQUIRE_IN_PROGRESS_REASON.to_owned()),
        ];
        // One conditional UPDATE: a reaper that took the row over first wins.
        let sql = format!(
            "UPDATE environment_leases SET status = 'active', failure_reason = NULL, \
             cleanup_status = NULL, lease_policy = ?1, provider_lease_id = ?2, expires_at = ?3, \
             metadata = ?4, last_used_at = ?5, updated_at = ?5 \
             WHERE id = ?6 AND status = 'pending_cleanup' AND failure_reason = ?7 \
             RETURNING {LEASE_COLUMNS}"
        );
        self.update_returning("complete acquisition", sql, values)
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
        let now = time::to_iso(&time::now());
        let released_at = (status != LeaseStatus::Retained).then(|| now.clone());
        let termination = update
            .termination
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| store_error("serialize termination receipt", e))?;
        let error = match update.cleanup_status {
            Some(CleanupStatus::Failed | CleanupStatus::Pending) => update.cleanup_error.clone(),
            _ => None,
        };
        let values = vec![
            Some(status.as_str().to_owned()),
            released_at,
            Some(now),
            update.failure_reason,
            update.cleanup_status.map(|c| c.as_str().to_owned()),
            error,
            Some(id.to_owned()),
            termination,
        ];
        // Only the two keys a release owns are written in the metadata
        // (json_set / json_remove), so a concurrent write of another key
        // survives: the receipt is set or removed, the last cleanup error set
        // or removed with a cleanup status.
        let sql = format!(
            "UPDATE environment_leases SET status = ?1, released_at = ?2, last_used_at = ?3, \
             updated_at = ?3, failure_reason = COALESCE(?4, failure_reason), \
             cleanup_status = COALESCE(?5, cleanup_status), \
             metadata = CASE \
                 WHEN metadata IS NULL AND ?8 IS NULL AND (?5 IS NULL OR ?6 IS NULL) THEN NULL \
                 ELSE ( \
                   CASE WHEN ?5 IS NULL THEN json(m.base) \
                        WHEN ?6 IS NULL THEN json_remove(m.base, '$.lastCleanupError') \
                        ELSE json_set(m.base, '$.lastCleanupError', ?6) END) END \
             FROM (SELECT CASE WHEN ?8 IS NULL \
                     THEN json_remove(COALESCE(metadata, '{{}}'), '$.remoteExecutionTermination') \
                     ELSE json_set(COALESCE(metadata, '{{}}'), '$.remoteExecutionTermination', json(?8)) END AS base \
                   FROM environment_leases WHERE id = ?7) AS m \
             WHERE id = ?7 RETURNING {LEASE_COLUMNS}"
        );
        self.update_returning("release lease", sql, values).await
    }

    async fn update_metadata(
        &self,
        id: &str,
        metadata: JsonObject,
    ) -> Result<Option<EnvironmentLease>> {
        let now = time::to_iso(&time::now());
        let values = vec![
            metadata_text(&Some(metadata))?,
            Some(now),
            Some(id.to_owned()),
        ];
        let sql = format!(
            "UPDATE environment_leases SET metadata = ?1, last_used_at = ?2, updated_at = ?2 \
             WHERE id = ?3 RETURNING {LEASE_COLUMNS}"
        );
        self.update_returning("update lease metadata", sql, values)
            .await
    }

    async fn touch(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        let now = time::to_iso(&time::now());
        let sql = format!(
            "UPDATE environment_leases SET last_used_at = ?1, updated_at = ?1 \
             WHERE id = ?2 RETURNING {LEASE_COLUMNS}"
        );
        self.update_returning("touch lease", sql, vec![Some(now), Some(id.to_owned())])
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<EnvironmentLease>> {
        Ok(self
            .select("get lease", "WHERE id = ?1", vec![Some(id.to_owned())])
            .await?
            .into_iter()
            .next())
    }

    async fn list_by_environment(
        &self,
        environment_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list leases by environment",
            "WHERE environment_id = ?1 AND (?2 IS NULL OR status = ?2) \
             ORDER BY last_used_at DESC, created_at DESC, rowid DESC",
            vec![
                Some(environment_id.to_owned()),
                status.map(|s| s.as_str().to_owned()),
            ],
        )
        .await
    }

    async fn list_by_run(
        &self,
        run_id: &str,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list leases by run",
            "WHERE heartbeat_run_id = ?1 AND (?2 IS NULL OR status = ?2) \
             ORDER BY created_at ASC, rowid ASC",
            vec![
                Some(run_id.to_owned()),
                status.map(|s| s.as_str().to_owned()),
            ],
        )
        .await
    }

    async fn list_failed_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list failed cleanups",
            "WHERE cleanup_status = 'failed' ORDER BY updated_at ASC, rowid ASC",
            Vec::new(),
        )
        .await
    }

    async fn list_active(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list active leases",
            "WHERE status = 'active' ORDER BY created_at ASC, rowid ASC",
            Vec::new(),
        )
        .await
    }

    async fn list_pending_cleanups(&self) -> Result<Vec<EnvironmentLease>> {
        self.select(
            "list pending cleanups",
            "WHERE status = 'pending_cleanup' ORDER BY created_at ASC, rowid ASC",
            Vec::new(),
        )
        .await
    }

    async fn claim_cleanup_attempt(&self, id: &str, expected: u32) -> Result<bool> {
        let now = time::to_iso(&time::now());
        let id = id.to_owned();
        // One conditional UPDATE: the stored count is read with Paperclip's
        // clamping (a non-number is 0, floored, capped at 5), and only the
        // count key is written.
        let changed = self
            .call("claim cleanup attempt", move |conn| {
                conn.execute(
                    "UPDATE environment_leases SET \
                     metadata = json_set(COALESCE(metadata, '{}'), '$.pendingCleanupRetryAttempts', ?2 + 1), \
                     last_used_at = ?3, updated_at = ?3 \
                     WHERE id = ?1 AND status = 'pending_cleanup' AND \
                     (CASE WHEN json_type(metadata, '$.pendingCleanupRetryAttempts') IN ('integer', 'real') \
                        THEN MIN(MAX(CAST(json_extract(metadata, '$.pendingCleanupRetryAttempts') AS INTEGER), 0), 5) \
                        ELSE 0 END) = ?2",
                    params![id, i64::from(expected), now],
                )
            })
            .await?;
        Ok(changed == 1)
    }

    async fn try_claim(&self, id: &str, claimant: &str, ttl: Duration) -> Result<bool> {
        let now = time::now();
        let until = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(now);
        let (id, claimant) = (id.to_owned(), claimant.to_owned());
        let (now, until) = (time::to_iso(&now), time::to_iso(&until));
        let changed = self
            .call("claim lease", move |conn| {
                conn.execute(
                    "UPDATE environment_leases SET claimed_by = ?2, claimed_until = ?3 \
                     WHERE id = ?1 AND (claimed_by IS NULL OR claimed_by = ?2 \
                         OR claimed_until IS NULL OR claimed_until <= ?4)",
                    params![id, claimant, until, now],
                )
            })
            .await?;
        Ok(changed == 1)
    }
}

#[async_trait]
impl EnvironmentStore for SqliteStore {
    async fn get(&self, id: &str) -> Result<Option<Environment>> {
        let id = id.to_owned();
        let body: Option<String> = self
            .call("get environment", move |conn| {
                conn.query_row(
                    "SELECT body FROM environments WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| store_error("environment row is unreadable", e))
        })
        .transpose()
    }

    async fn put(&self, environment: Environment) -> Result<()> {
        let body = serde_json::to_string(&environment)
            .map_err(|e| store_error("serialize environment", e))?;
        let updated = time::to_iso(&environment.updated_at);
        let id = environment.id;
        self.call("put environment", move |conn| {
            conn.execute(
                "INSERT INTO environments (id, body, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, \
                 updated_at = excluded.updated_at",
                params![id, body, updated],
            )
        })
        .await
        .map(|_| ())
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.call("remove environment", move |conn| {
            conn.execute("DELETE FROM environments WHERE id = ?1", params![id])
        })
        .await
        .map(|n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 file's `cleanup_attempts` / `cleanup_error` columns move
    /// into metadata, and `environment_id` becomes nullable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_2_folds_cleanup_columns_into_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO environment_leases (id, environment_id, status, acquired_at, \
                 last_used_at, created_at, updated_at, cleanup_status, cleanup_attempts, \
                 cleanup_error, metadata) VALUES ('a', 'env', 'pending_cleanup', \
                 '2026-05-11T10:00:00.000Z', '2026-05-11T10:00:00.000Z', \
                 '2026-05-11T10:00:00.000Z', '2026-05-11T10:00:00.000Z', 'failed', 9, 'boom', \
                 '{\"driver\":\"sandbox\"}'), ('b', 'env', 'released', \
                 '2026-05-11T10:00:00.000Z', '2026-05-11T10:00:00.000Z', \
                 '2026-05-11T10:00:00.000Z', '2026-05-11T10:00:00.000Z', 'success', 1, NULL, NULL)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), 2);
        let a = LeaseStore::get(&store, "a").await.unwrap().unwrap();
        assert_eq!(
            serde_json::Value::Object(a.metadata.clone().unwrap()),
            serde_json::json!({"driver": "sandbox", "pendingCleanupRetryAttempts": 5, "lastCleanupError": "boom"})
        );
        assert_eq!(a.cleanup_attempts(), 5);
        let b = LeaseStore::get(&store, "b").await.unwrap().unwrap();
        assert_eq!(b.metadata, None, "a released row keeps no counter");
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("cleanupAttempts").is_none() && json.get("cleanupError").is_none());
        // A row with a null environment reads (and lists) fine.
        store
            .call("null environment", |conn| {
                conn.execute(
                    "UPDATE environment_leases SET environment_id = NULL WHERE id = 'a'",
                    [],
                )
            })
            .await
            .unwrap();
        let all = store.list_all().await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(
            all.iter()
                .any(|l| l.id == "a" && l.environment_id.is_none())
        );
    }
}
