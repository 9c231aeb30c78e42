//! The SQLite side of the store's reads (sqlx, bundled SQLite, WAL) and the
//! migrations from `migrations/`, embedded at compile time. Runtime-checked queries.
//! The queued writes are `writer.rs`'s.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::{ListFilter, Measured, Retention, RetentionOutcome, StoreError, StoredLog, nanos};
use crate::engine::eta::{PullSample, StepSample};
use crate::model::{AppName, DeploymentId, DeploymentState, DeploymentStatus, Operation, Update};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

fn state_str(s: DeploymentState) -> &'static str {
    s.as_str()
}

/// A list of values bound as one parameter, read with `json_each`.
fn json_list(values: impl Iterator<Item = String>) -> String {
    serde_json::Value::Array(values.map(serde_json::Value::String).collect()).to_string()
}

fn parse_status(id: &str, json: &str) -> Result<DeploymentStatus, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

impl SqliteStore {
    pub(crate) async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With WAL, NORMAL is durable against process crashes (kill -9); only an
            // OS crash or power loss can lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// A connection of the caller's own, out of the pool (the writer's).
    pub(crate) async fn own_connection(&self) -> Result<SqliteConnection, StoreError> {
        Ok(self.pool.acquire().await?.detach())
    }

    pub(crate) async fn status(
        &self,
        id: DeploymentId,
    ) -> Result<Option<DeploymentStatus>, StoreError> {
        let id = id.to_string();
        let row = sqlx::query("SELECT status FROM deployments WHERE id = ?1")
            .bind(&id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_status(&id, r.get::<&str, _>(0)))
            .transpose()
    }

    /// The stored request of `id` (secrets removed), as JSON.
    pub(crate) async fn request(
        &self,
        id: DeploymentId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let row = sqlx::query("SELECT request FROM deployments WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| serde_json::from_str(r.get::<&str, _>(0)).ok()))
    }

    pub(crate) async fn log(
        &self,
        id: DeploymentId,
        after: u64,
        limit: Option<usize>,
    ) -> Result<StoredLog, StoreError> {
        let key = id.to_string();
        let oldest: Option<i64> =
            sqlx::query("SELECT MIN(sequence) FROM updates WHERE deployment_id = ?1")
                .bind(&key)
                .fetch_one(&self.pool)
                .await?
                .get(0);
        let rows = sqlx::query(
            "SELECT body FROM updates WHERE deployment_id = ?1 AND sequence > ?2 ORDER BY sequence
             LIMIT ?3",
        )
        .bind(&key)
        .bind(after as i64)
        .bind(limit.map_or(-1, |l| l as i64))
        .fetch_all(&self.pool)
        .await?;
        let mut updates = Vec::with_capacity(rows.len());
        for r in rows {
            let update: Update =
                serde_json::from_str(r.get::<&str, _>(0)).map_err(|e| StoreError::Corrupt {
                    id: key.clone(),
                    reason: e.to_string(),
                })?;
            updates.push(update);
        }
        Ok(StoredLog {
            oldest: oldest.map(|s| s as u64),
            updates,
        })
    }

    pub(crate) async fn find_idempotent(
        &self,
        app: &AppName,
        key: &str,
    ) -> Result<Option<DeploymentId>, StoreError> {
        let row = sqlx::query("SELECT id FROM deployments WHERE app = ?1 AND idempotency_key = ?2")
            .bind(app.as_str())
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(first_column_id))
    }

    pub(crate) async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        let (before_ns, before_id) = match filter.before {
            Some((ns, id)) => (Some(ns.min(i64::MAX as u128) as i64), Some(id.to_string())),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT id, status FROM deployments
             WHERE (?1 IS NULL OR app = ?1)
               AND (?2 IS NULL OR state = ?2)
               AND (?3 IS NULL OR created_ns < ?3 OR (created_ns = ?3 AND id < ?4))
               AND (?6 IS NULL OR operation = ?6)
             ORDER BY created_ns DESC, id DESC
             LIMIT ?5",
        )
        .bind(filter.app.as_ref().map(|a| a.as_str().to_owned()))
        .bind(filter.state.map(state_str))
        .bind(before_ns)
        .bind(before_id)
        .bind(filter.limit as i64)
        .bind(filter.operation.map(Operation::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse_status(r.get::<&str, _>(0), r.get::<&str, _>(1)))
            .collect()
    }

    /// Per app, the newest deployment or removal (`succeeded_only`: the newest
    /// SUCCEEDED deployment, removals left out), sorted by app.
    pub(crate) async fn newest_per_app(
        &self,
        succeeded_only: bool,
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, status FROM (
                SELECT id, status, app, ROW_NUMBER() OVER (
                    PARTITION BY app ORDER BY created_ns DESC, id DESC) AS rn
                FROM deployments WHERE (?1 = 0 OR (state = ?2 AND operation = ?3)))
             WHERE rn = 1 ORDER BY app",
        )
        .bind(succeeded_only)
        .bind(state_str(DeploymentState::Succeeded))
        .bind(Operation::Deploy.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse_status(r.get::<&str, _>(0), r.get::<&str, _>(1)))
            .collect()
    }

    /// Of `ids`, those the store holds as ended (SUCCEEDED, FAILED or CANCELLED).
    pub(crate) async fn ended(
        &self,
        ids: &[DeploymentId],
    ) -> Result<HashSet<DeploymentId>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM deployments
             WHERE id IN (SELECT value FROM json_each(?1)) AND state NOT IN (?2, ?3)",
        )
        .bind(json_list(ids.iter().map(|id| id.to_string())))
        .bind(state_str(DeploymentState::Pending))
        .bind(state_str(DeploymentState::Running))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().filter_map(first_column_id).collect())
    }

    /// Per app of `apps`, its newest SUCCEEDED deployment or removal (apps with none
    /// are left out).
    pub(crate) async fn newest_succeeded(
        &self,
        apps: &[AppName],
    ) -> Result<Vec<DeploymentStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.status FROM json_each(?1) AS a
             JOIN deployments AS d ON d.id = (
                 SELECT id FROM deployments WHERE app = a.value AND state = ?2
                 ORDER BY created_ns DESC, id DESC LIMIT 1)",
        )
        .bind(json_list(apps.iter().map(|a| a.as_str().to_owned())))
        .bind(state_str(DeploymentState::Succeeded))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse_status(r.get::<&str, _>(0), r.get::<&str, _>(1)))
            .collect()
    }

    /// The first SUCCEEDED deployment of `app` created after `created` (ns, id).
    pub(crate) async fn next_succeeded(
        &self,
        app: &AppName,
        created: SystemTime,
        id: DeploymentId,
    ) -> Result<Option<DeploymentId>, StoreError> {
        let row = sqlx::query(
            "SELECT id FROM deployments
             WHERE app = ?1 AND state = ?2
               AND (created_ns > ?3 OR (created_ns = ?3 AND id > ?4))
             ORDER BY created_ns, id LIMIT 1",
        )
        .bind(app.as_str())
        .bind(state_str(DeploymentState::Succeeded))
        .bind(nanos(created))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().and_then(first_column_id))
    }

    pub(crate) async fn record_removal(
        &self,
        app: &AppName,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO app_removals (app, removed_ns) VALUES (?1, ?2)
             ON CONFLICT (app) DO UPDATE SET removed_ns = MAX(removed_ns, excluded.removed_ns)",
        )
        .bind(app.as_str())
        .bind(nanos(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When each removed app was last removed (ns).
    pub(crate) async fn removals(&self) -> Result<HashMap<String, i64>, StoreError> {
        let rows = sqlx::query("SELECT app, removed_ns FROM app_removals")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect())
    }

    pub(crate) async fn unfinished(&self) -> Result<Vec<DeploymentStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, status FROM deployments WHERE state IN ('pending', 'running')
             ORDER BY created_ns",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| parse_status(r.get::<&str, _>(0), r.get::<&str, _>(1)))
            .collect()
    }

    pub(crate) async fn count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM deployments")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        Ok(n as u64)
    }

    /// The pull and build samples of `ids` (see migrations/0004_eta_samples.sql).
    pub(crate) async fn measured(
        &self,
        ids: &[DeploymentId],
    ) -> Result<HashMap<DeploymentId, Measured>, StoreError> {
        let mut out: HashMap<DeploymentId, Measured> = HashMap::new();
        for id in ids {
            let key = id.to_string();
            let pull =
                sqlx::query("SELECT bytes, duration_us FROM pull_samples WHERE deployment_id = ?1")
                    .bind(&key)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|r| PullSample {
                        bytes: r.get::<i64, _>(0).max(0) as u64,
                        duration: micros(r.get(1)),
                    });
            let build: Vec<StepSample> = sqlx::query(
                "SELECT instruction, cached, duration_us FROM build_steps
                 WHERE deployment_id = ?1 ORDER BY number",
            )
            .bind(&key)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| StepSample {
                instruction: r.get(0),
                cached: r.get(1),
                duration: micros(r.get(2)),
            })
            .collect();
            if pull.is_some() || !build.is_empty() {
                out.insert(*id, Measured { pull, build });
            }
        }
        Ok(out)
    }

    pub(crate) async fn apply_retention(
        &self,
        retention: &Retention,
        now: SystemTime,
    ) -> Result<RetentionOutcome, StoreError> {
        let mut out = RetentionOutcome::default();
        let mut tx = self.pool.begin().await?;
        let mut doomed: Vec<String> = Vec::new();
        if let Some(max) = retention.max_deployments {
            let rows = sqlx::query(
                "SELECT id FROM deployments WHERE state NOT IN ('pending', 'running')
                 ORDER BY created_ns DESC, id DESC LIMIT -1 OFFSET ?1",
            )
            .bind(max as i64)
            .fetch_all(&mut *tx)
            .await?;
            doomed.extend(rows.iter().map(|r| r.get::<String, _>(0)));
        }
        if let Some(age) = retention.max_age {
            let cutoff = nanos(now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH));
            let rows = sqlx::query(
                "SELECT id FROM deployments WHERE state NOT IN ('pending', 'running')
                 AND created_ns < ?1",
            )
            .bind(cutoff)
            .fetch_all(&mut *tx)
            .await?;
            doomed.extend(rows.iter().map(|r| r.get::<String, _>(0)));
        }
        doomed.sort();
        doomed.dedup();
        for id in &doomed {
            for delete in [
                "DELETE FROM pull_samples WHERE deployment_id = ?1",
                "DELETE FROM build_steps WHERE deployment_id = ?1",
            ] {
                sqlx::query(delete).bind(id).execute(&mut *tx).await?;
            }
            out.updates_removed += sqlx::query("DELETE FROM updates WHERE deployment_id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            out.deployments_removed += sqlx::query("DELETE FROM deployments WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if let Some(keep) = retention.max_log_updates {
            let keep = keep.max(1) as i64;
            out.updates_removed += sqlx::query(
                "DELETE FROM updates WHERE sequence <= (
                     SELECT d.last_sequence - ?1 FROM deployments d
                     WHERE d.id = updates.deployment_id
                       AND d.state NOT IN ('pending', 'running'))",
            )
            .bind(keep)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(out)
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

/// The deployment ID in a row's first column (rows of `SELECT id …`).
fn first_column_id(row: &sqlx::sqlite::SqliteRow) -> Option<DeploymentId> {
    uuid::Uuid::parse_str(row.get::<&str, _>(0))
        .ok()
        .map(DeploymentId)
}
