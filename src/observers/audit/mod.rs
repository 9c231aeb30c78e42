//! The audit log: one JSON object per line for each deployment state change, in a
//! hash chain that `stevedore audit verify` checks.
//!
//! # Records
//! Events: `accepted`, `started` (the deployment left the queue and entered its first
//! phase), `phase_started` (each later phase), `cancelling`, and the terminal
//! `succeeded` / `failed` / `cancelled`. Calls turned away by auth or the deploy
//! policy are `refused` records (`method`, `requested_by`, `peer`, `code`, `message`;
//! no deployment fields). Each record has `seq`, `time` (RFC 3339, UTC),
//! `event`, `deployment_id`, `sequence` (the update's sequence in the deployment),
//! `app`, `image`, `image_digest` and `container_id` (once known), `phase`,
//! `outcome` and `error` (terminal records), `requested_by` (the caller: the token's name
//! with `--tokens-file`, else the peer address), `env_keys` (names only: env values, like registry credentials,
//! are never written), `message`, `prev_hash` and `hash`.
//!
//! # The chain
//! `hash` = hex SHA-256 of `prev_hash` (64 hex characters), a `\n`, and the record's
//! canonical bytes: the record without `hash`, as compact JSON with keys sorted. The
//! first record's `prev_hash` is 64 zeros; `seq` counts from 1 with no gap. Every line
//! is itself written in canonical form (keys sorted, `hash` among them), so any
//! changed byte, a removed, reordered or inserted line breaks the chain at that line.
//! Removing lines at the end is only seen against a head hash kept elsewhere
//! (`audit verify --expect-head`): verify prints the head to export.
//!
//! # Durability (fsync policy)
//! The records queued together (a burst of updates: those handed over before the
//! observer's queue runs empty, and those that follow within [`GATHER`] of it:
//! [`Observer::gather`], [`Observer::on_idle`]) are written with one `write` of their
//! lines, then one `fdatasync`, before any later record is written: a crash loses at
//! most the records not yet synced, which were only in memory (the observer's queue)
//! anyway. A deployment's state changes often come a few milliseconds apart; the
//! wait makes them one `fdatasync` instead of one each. A torn last line (no trailing newline) left by a crash is cut off when the
//! log is next opened, and the chain continues from the last whole record.
//!
//! # When the log cannot be written
//! The audit observer has a lossless queue: records wait in memory, in order, until
//! they can be written, and a background task retries every second. While the log is
//! not writable, [`Observer::admit`] refuses new deployments, so the engine answers
//! `UNAVAILABLE` ("audit log … cannot be written …") instead of running them
//! unaudited; deployments already running go on, and their records are written once
//! the file is writable again. One server writes one audit log at a time.

mod cli;
mod log;
mod observer;
mod verify;

pub use cli::{AuditCommand, VerifyArgs, run_command};
pub(crate) use log::{AUDIT_LOG_FILE, AuditLog, GENESIS, chain_hash};
pub(crate) use observer::AuditObserver;
#[cfg(test)]
use verify::verify_reader;

/// How long a burst of records waits for the records that follow before it is
/// written and synced.
pub(crate) const GATHER: std::time::Duration = std::time::Duration::from_millis(5);
pub use verify::{VerifyReport, verify};

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::events::Observer;
    use crate::model::*;

    fn update(id: DeploymentId, seq: u64, kind: EventKind, phase: Phase) -> Arc<Update> {
        Arc::new(Update {
            deployment_id: id,
            app: AppName::parse("web").unwrap(),
            kind,
            phase,
            message: "m".into(),
            ..Update::for_test(seq, false)
        })
    }

    async fn write_some(path: &Path, deployments: usize) {
        let obs = AuditObserver::new(AuditLog::open(path));
        for _ in 0..deployments {
            let id = DeploymentId::new();
            obs.on_update(update(id, 1, EventKind::accepted_for_test(), Phase::Queued))
                .await
                .unwrap();
            obs.on_update(update(id, 2, EventKind::Progress, Phase::Queued))
                .await
                .unwrap();
            obs.on_update(update(id, 3, EventKind::PhaseStarted, Phase::Validating))
                .await
                .unwrap();
            let end = EventKind::Finished {
                state: DeploymentState::Failed,
            };
            obs.on_update(update(id, 4, end, Phase::Failed))
                .await
                .unwrap();
        }
        obs.on_idle().await.unwrap();
    }

    #[tokio::test]
    async fn chain_continues_across_reopen_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        write_some(&path, 1).await;
        write_some(&path, 2).await;
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 9);
        let text = std::fs::read_to_string(&path).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "accepted");
        assert_eq!(first["prev_hash"], GENESIS);
        assert_eq!(first["env_keys"], json!(["A", "B"]));
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["hash"], report.head.as_str());
        assert_eq!(last["outcome"], "failed");
        assert_eq!(last["error"], "m");
        let second: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(second["event"], "started");
    }

    #[tokio::test]
    async fn torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_some(&path, 1).await;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"trunc").unwrap();
        let err = verify(&path).unwrap_err();
        assert!(err.contains("line 4: incomplete"), "{err}");
        write_some(&path, 1).await;
        assert_eq!(verify(&path).unwrap().records, 6);
    }

    #[tokio::test]
    async fn unwritable_log_refuses_then_recovers_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, b"a file where a directory should be").unwrap();
        let path = blocker.join("audit.log");
        let obs = AuditObserver::new(AuditLog::open(&path));
        assert!(obs.admit().unwrap_err().0.contains("cannot be written"));
        let id = DeploymentId::new();
        obs.on_update(update(id, 1, EventKind::accepted_for_test(), Phase::Queued))
            .await
            .unwrap();
        assert!(
            obs.on_idle().await.is_err(),
            "the queued record cannot be written"
        );
        std::fs::remove_file(&blocker).unwrap();
        for _ in 0..100 {
            if obs.admit().is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(obs.admit().is_ok(), "the retry task reopens the log");
        assert_eq!(
            verify(&path).unwrap().records,
            1,
            "the queued record was written"
        );
    }

    #[test]
    fn verify_names_the_first_bad_line() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        rt.block_on(write_some(&path, 2));
        let good = std::fs::read(&path).unwrap();
        let lines: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 6);
        let check = |bytes: Vec<u8>, line: u64| {
            let err = verify_reader(bytes.as_slice()).unwrap_err();
            assert_eq!(err.line, line, "{err}");
        };
        // A byte of line 3 changed.
        let mut flipped = good.clone();
        let at = lines[..2].iter().map(|l| l.len()).sum::<usize>() + 40;
        flipped[at] ^= 0x01;
        check(flipped, 3);
        // Line 2 removed.
        let removed: Vec<u8> = [lines[0], lines[2], lines[3], lines[4], lines[5]].concat();
        check(removed, 2);
        // Lines 4 and 5 swapped.
        let swapped: Vec<u8> =
            [lines[0], lines[1], lines[2], lines[4], lines[3], lines[5]].concat();
        check(swapped, 4);
        // Truncated in the middle of line 6.
        check(good[..good.len() - 10].to_vec(), 6);
        // A line inserted (a copy of line 1 after line 1).
        let inserted: Vec<u8> = [lines[0], lines[0], lines[1]].concat();
        check(inserted, 2);
    }

    /// A log whose records are chained by the formula, with the `seq` and
    /// `prev_hash` fields as given (`None`: the true previous hash): each record's
    /// hash is right, so only the field checks can find a bad link.
    fn chained(fields: &[(u64, Option<&str>)]) -> Vec<u8> {
        let mut prev = GENESIS.to_owned();
        let mut log = Vec::new();
        for (seq, prev_field) in fields {
            let mut record = serde_json::Map::new();
            record.insert("event".into(), "accepted".into());
            record.insert("prev_hash".into(), prev_field.unwrap_or(&prev).into());
            record.insert("seq".into(), (*seq).into());
            let hash = chain_hash(&prev, &serde_json::to_vec(&record).unwrap());
            record.insert("hash".into(), hash.clone().into());
            log.extend(serde_json::to_vec(&record).unwrap());
            log.push(b'\n');
            prev = hash;
        }
        log
    }

    /// `seq` and `prev_hash` are each checked, not only through the hash: a record
    /// numbered out of turn, or naming another predecessor, fails on that field.
    #[test]
    fn verify_checks_seq_and_prev_hash_fields() {
        let report = verify_reader(chained(&[(1, None), (2, None)]).as_slice()).unwrap();
        assert_eq!(report.records, 2);
        let err = verify_reader(chained(&[(1, None), (3, None)]).as_slice()).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.starts_with("seq is 3, expected 2"), "{err}");
        let err = verify_reader(chained(&[(1, None), (2, Some(GENESIS))]).as_slice()).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(
            err.reason
                .starts_with("prev_hash is not the hash of the record before"),
            "{err}"
        );
    }

    /// Known answer: two records chained by the documented formula, the hashes
    /// computed once outside this code (Python `hashlib.sha256` of
    /// `prev_hash + "\n" + canonical JSON`). A change to the formula (separator,
    /// field order, what is hashed) fails here even though writer and verifier share
    /// `chain_hash`.
    #[test]
    fn the_chain_matches_a_known_answer() {
        let first = r#"{"app":"web","event":"accepted","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","seq":1,"time":"2026-01-01T00:00:00.000Z"}"#;
        let first_hash = "b2a8191d56dba078d6717ca23a93e14bc73c0b787d23ea8a49a58f0cfbc260a8";
        let second = r#"{"app":"web","event":"succeeded","prev_hash":"b2a8191d56dba078d6717ca23a93e14bc73c0b787d23ea8a49a58f0cfbc260a8","seq":2,"time":"2026-01-01T00:00:01.000Z"}"#;
        let head = "991152f06059288bdef68867609ead4d73ad16e3765d366c41d18bc5d43c0a36";
        assert_eq!(chain_hash(GENESIS, first.as_bytes()), first_hash);
        assert_eq!(chain_hash(first_hash, second.as_bytes()), head);
        // The same records as lines of a log (`hash` sorted in among the keys).
        let line = |canonical: &str, hash: &str| {
            let mut v: serde_json::Map<String, Value> = serde_json::from_str(canonical).unwrap();
            v.insert("hash".into(), hash.into());
            format!("{}\n", serde_json::to_string(&v).unwrap())
        };
        let log = line(first, first_hash) + &line(second, head);
        assert!(log.starts_with(r#"{"app":"web","event":"accepted","hash":"b2a8"#));
        let report = verify_reader(log.as_bytes()).unwrap();
        assert_eq!(report.records, 2);
        assert_eq!(report.head, head);
    }

    /// A forger who rewrites an early record and recomputes every hash after it
    /// produces a chain that is internally consistent: `verify` alone passes it (it
    /// cannot know better), which is why the head is exported and checked with
    /// `--expect-head`; against the old head the forgery fails.
    #[tokio::test]
    async fn a_rewritten_and_relinked_log_fails_only_against_the_exported_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_some(&path, 2).await;
        let old_head = verify(&path).unwrap().head;

        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev = GENESIS.to_owned();
        let mut forged = String::new();
        for (i, line) in text.lines().enumerate() {
            let mut record: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            record.remove("hash");
            if i == 0 {
                record.insert("requested_by".into(), "someone-else".into());
            }
            record.insert("prev_hash".into(), prev.clone().into());
            let hash = chain_hash(&prev, &serde_json::to_vec(&record).unwrap());
            record.insert("hash".into(), hash.clone().into());
            forged.push_str(&serde_json::to_string(&record).unwrap());
            forged.push('\n');
            prev = hash;
        }
        std::fs::write(&path, &forged).unwrap();

        let report = verify(&path).expect("a relinked chain passes the internal checks");
        assert_eq!(report.records, 6);
        assert_ne!(report.head, old_head);
        let check = |expect_head: Option<String>| {
            run_command(AuditCommand::Verify(VerifyArgs {
                path: Some(path.clone()),
                data_dir: dir.path().to_owned(),
                expect_head,
            }))
        };
        let err = check(Some(old_head)).unwrap_err();
        assert!(err.contains("is not the expected"), "{err}");
        check(Some(report.head)).unwrap();
        check(None).unwrap();
    }
}
