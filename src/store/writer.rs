//! The store's writer: a task with a connection of its own (taken out of the pool)
//! that takes what is queued (up to [`MAX_BATCH`] operations at a time), commits it
//! in one transaction, then answers the flushes of the batch.
//!
//! A batch is one command to the connection's SQLite thread: sqlx runs each command
//! on that thread, a round trip (two thread wake-ups) each, so a transaction of
//! statements sent one by one (BEGIN, each row, each status, COMMIT) cost four or
//! more round trips per batch. Here the batch is a single text of statements (the
//! rows of each table in one multi-row statement) with its values bound in order, so
//! it costs one, however many rows it holds. And a batch waits [`GATHER`] after its
//! first operation for the ones that follow (a deployment's updates often come a
//! few milliseconds apart): fewer, larger transactions, each a set of WAL page writes
//! and file locks less. A flush does not wait. The deployments' tasks only push onto
//! the channel and never wait for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{Executor, QueryBuilder};
use tokio::sync::{Notify, mpsc};

use super::{WriteOp, nanos};
use crate::model::{DeploymentId, DeploymentStatus};

/// Most operations committed in one transaction. At most 9 values each, well under
/// SQLite's 32,766 variables a statement.
const MAX_BATCH: usize = 1024;

/// How long a batch waits after its first operation for more (group commit): what a
/// kill -9 can lose grows by as much.
pub(super) const GATHER: Duration = Duration::from_millis(5);

/// The writer task: commits what is queued, batch by batch, in order. `urgent` is
/// notified by a flush, which ends the wait for more at once. Ends when every
/// [`super::Store`] handle is gone, after committing what was queued.
pub(super) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::UnboundedReceiver<WriteOp>,
    urgent: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let flushing = |batch: &[WriteOp]| batch.iter().any(|op| matches!(op, WriteOp::Flush(_)));
        if !flushing(&batch) {
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                () = urgent.notified() => {}
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match commit(&mut conn, &batch).await {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "store write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, ops = batch.len(), "store write failed; these updates are not persisted");
                    break;
                }
            }
        }
        for op in batch.drain(..) {
            if let WriteOp::Flush(done) = op {
                let _ = done.send(());
            }
        }
    }
}

/// One batch in one transaction, sent as one command. A deployment's status, when
/// the batch carries one, is written once (its latest). On an error the transaction is rolled back,
/// so a retry starts clean.
async fn commit(conn: &mut SqliteConnection, batch: &[WriteOp]) -> Result<(), sqlx::Error> {
    let Some(mut sql) = statements(batch) else {
        return Ok(());
    };
    let done = sql.build().persistent(false).execute(&mut *conn).await;
    if done.is_err() {
        let _ = conn.execute("ROLLBACK").await;
    }
    done.map(|_| ())
}

/// The statements of `batch`, between BEGIN and COMMIT, in an order that keeps the
/// channel's: new deployments' rows first (a deployment is queued before its first
/// update), then the updates, the ETA samples, and last the statuses. `None` when
/// there is nothing to write (only flushes).
fn statements(batch: &[WriteOp]) -> Option<QueryBuilder<Sqlite>> {
    let mut inserts = Vec::new();
    let mut updates = Vec::new();
    let mut pulls = Vec::new();
    let mut steps = Vec::new();
    let mut statuses: HashMap<DeploymentId, &DeploymentStatus> = HashMap::new();
    for op in batch {
        match op {
            WriteOp::Insert {
                status,
                idempotency_key,
                request,
            } => inserts.push((status, idempotency_key, request)),
            WriteOp::Append { update, status } => {
                updates.push(update);
                if let Some(status) = status {
                    statuses.insert(status.id, status);
                }
            }
            WriteOp::Pull { id, sample } => pulls.push((id, sample)),
            WriteOp::Build { id, steps: list } => {
                steps.extend((list.iter().enumerate()).map(|(i, step)| (id, i as i64 + 1, step)))
            }
            WriteOp::Flush(_) => {}
        }
    }
    if inserts.is_empty() && updates.is_empty() && pulls.is_empty() && steps.is_empty() {
        return None;
    }
    let mut sql = QueryBuilder::new("BEGIN IMMEDIATE; ");
    if !inserts.is_empty() {
        // A new deployment's row (kept as it is if the ID is already there).
        sql.push(
            "INSERT INTO deployments (id, app, state, created_ns, finished_ns, last_sequence,
               idempotency_key, request, status, operation) ",
        );
        sql.push_values(inserts, |mut row, (status, key, request)| {
            row.push_bind(status.id.to_string())
                .push_bind(status.app.as_str().to_owned())
                .push_bind(status.state.as_str())
                .push_bind(nanos(status.created_at))
                .push("NULL")
                .push_bind(status.last_sequence as i64)
                .push_bind(key.clone())
                .push_bind(request.clone())
                .push_bind(json(status))
                .push_bind(status.operation.as_str());
        });
        sql.push(" ON CONFLICT (id) DO NOTHING; ");
    }
    if !updates.is_empty() {
        // The logs' updates (each kept as it is if its sequence is already there).
        sql.push("INSERT OR IGNORE INTO updates (deployment_id, sequence, body) ");
        sql.push_values(updates, |mut row, update| {
            row.push_bind(update.deployment_id.to_string())
                .push_bind(update.sequence as i64)
                .push_bind(json(&**update));
        });
        sql.push("; ");
    }
    if !pulls.is_empty() {
        // Image downloads, for pull estimates.
        sql.push("INSERT OR REPLACE INTO pull_samples (deployment_id, bytes, duration_us) ");
        sql.push_values(pulls, |mut row, (id, sample)| {
            row.push_bind(id.to_string())
                .push_bind(sample.bytes.min(i64::MAX as u64) as i64)
                .push_bind(micros(sample.duration));
        });
        sql.push("; ");
    }
    if !steps.is_empty() {
        // Build steps (numbered from 1), for build estimates.
        sql.push(
            "INSERT OR REPLACE INTO build_steps
               (deployment_id, number, instruction, cached, duration_us) ",
        );
        sql.push_values(steps, |mut row, (id, number, step)| {
            row.push_bind(id.to_string())
                .push_bind(number)
                .push_bind(step.instruction.clone())
                .push_bind(step.cached)
                .push_bind(micros(step.duration));
        });
        sql.push("; ");
    }
    if !statuses.is_empty() {
        // Each deployment's latest status into its row, from a table of values.
        sql.push(
            "UPDATE deployments SET state = v.column2, finished_ns = v.column3,
               last_sequence = v.column4, status = v.column5
             FROM (",
        );
        sql.push_values(statuses.values(), |mut row, status| {
            row.push_bind(status.id.to_string())
                .push_bind(status.state.as_str())
                .push_bind(status.finished_at.map(nanos))
                .push_bind(status.last_sequence as i64)
                .push_bind(json(*status));
        });
        sql.push(") AS v WHERE deployments.id = v.column1; ");
    }
    sql.push("COMMIT;");
    Some(sql)
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serializes")
}

fn micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::engine::eta::{PullSample, StepSample};
    use crate::store::sqlite::SqliteStore;

    async fn pull_samples(db: &mut SqliteConnection) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM pull_samples")
            .fetch_one(db)
            .await
            .unwrap()
            .get(0)
    }

    /// A batch that fails part-way leaves nothing behind, and the writer's connection
    /// is not left inside its transaction: the next batch commits.
    #[tokio::test]
    async fn a_failed_batch_is_rolled_back_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        let mut writer = db.own_connection().await.unwrap();
        let mut other = db.own_connection().await.unwrap();
        // The build steps' statement comes after the pull samples' and now fails.
        other.execute("DROP TABLE build_steps").await.unwrap();
        let pull = |id| WriteOp::Pull {
            id,
            sample: PullSample {
                bytes: 1000,
                duration: Duration::from_millis(5),
            },
        };
        let id = DeploymentId::new();
        let failing = [
            pull(id),
            WriteOp::Build {
                id,
                steps: vec![StepSample {
                    instruction: "RUN true".into(),
                    cached: false,
                    duration: Duration::from_millis(1),
                }],
            },
        ];
        let e = commit(&mut writer, &failing).await.unwrap_err();
        assert!(e.to_string().contains("build_steps"), "{e}");
        assert_eq!(
            pull_samples(&mut other).await,
            0,
            "the pull sample rolled back"
        );

        commit(&mut writer, &[pull(id)]).await.unwrap();
        assert_eq!(pull_samples(&mut other).await, 1);
    }

    /// Only flushes: nothing to write, no transaction.
    #[test]
    fn a_batch_of_flushes_has_no_statements() {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        assert!(statements(&[WriteOp::Flush(tx)]).is_none());
    }
}
