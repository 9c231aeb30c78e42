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
//! Each record is written with one `write` of the whole line, then `fdatasync`ed
//! before the next one is written: a crash loses at most the record being written. A
//! torn last line (no trailing newline) left by a crash is cut off when the log is
//! next opened, and the chain continues from the last whole record.
//!
//! # When the log cannot be written
//! The audit observer has a lossless queue: records wait in memory, in order, until
//! they can be written, and a background task retries every second. While the log is
//! not writable, [`Observer::admit`] refuses new deployments, so the engine answers
//! `UNAVAILABLE` ("audit log … cannot be written …") instead of running them
//! unaudited; deployments already running go on, and their records are written once
//! the file is writable again. One server writes one audit log at a time.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::events::{Observer, ObserverError};
use crate::model::{DeploymentId, EventKind, Update};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// File name of the audit log in the data directory (the default of `--audit-log`).
pub const AUDIT_LOG_FILE: &str = "audit.log";

/// How often a log that cannot be written is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The chain hash of a record whose canonical bytes (without `hash`) are `canonical`.
pub fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(canonical);
    hex::encode(h.finalize())
}

/// The log file and the chain's head. All IO is blocking: call from blocking threads.
struct Writer {
    path: PathBuf,
    file: Option<File>,
    last_seq: u64,
    last_hash: String,
    /// Records (without `seq`, `prev_hash`, `hash`) not yet written, oldest first.
    pending: VecDeque<Map<String, Value>>,
    last_error: Option<String>,
}

impl Writer {
    /// Opens the file (creating it and its directory) and reads the chain's head from
    /// its last whole line, cutting a torn last line.
    fn open(&mut self) -> Result<(), String> {
        let path = self.path.clone();
        let ctx = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ctx("cannot create the directory of", e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| ctx("cannot open", e))?;
        let (good_len, last) = last_whole_line(&mut file).map_err(|e| ctx("cannot read", e))?;
        let len = file.metadata().map_err(|e| ctx("cannot read", e))?.len();
        if good_len < len {
            tracing::warn!(path = %path.display(), bytes = len - good_len, "audit log ends in a torn record (a crash while writing?); cutting it");
            file.set_len(good_len)
                .map_err(|e| ctx("cannot cut the torn end of", e))?;
            file.sync_data().map_err(|e| ctx("cannot sync", e))?;
        }
        match last {
            None => {
                self.last_seq = 0;
                self.last_hash = GENESIS.into();
            }
            Some(line) => {
                let head = serde_json::from_slice::<Value>(&line)
                    .ok()
                    .and_then(|v| {
                        Some((v.get("seq")?.as_u64()?, v.get("hash")?.as_str()?.to_owned()))
                    })
                    .ok_or_else(|| {
                        format!(
                            "the last record of {} is unreadable; run `stevedore audit verify {}`",
                            path.display(),
                            path.display()
                        )
                    })?;
                (self.last_seq, self.last_hash) = head;
            }
        }
        self.file = Some(file);
        Ok(())
    }

    /// Writes every pending record, each synced before the next.
    fn flush(&mut self) -> Result<(), String> {
        if self.file.is_none() {
            self.open()?;
        }
        while let Some(record) = self.pending.front() {
            let mut record = record.clone();
            let seq = self.last_seq + 1;
            record.insert("seq".into(), seq.into());
            record.insert("prev_hash".into(), self.last_hash.clone().into());
            let canonical = serde_json::to_vec(&record).expect("a JSON map serializes");
            let hash = chain_hash(&self.last_hash, &canonical);
            record.insert("hash".into(), hash.clone().into());
            let mut line = serde_json::to_vec(&record).expect("a JSON map serializes");
            line.push(b'\n');
            let file = self.file.as_mut().expect("opened above");
            let written = file.write_all(&line).and_then(|()| file.sync_data());
            if let Err(e) = written {
                // Reopen next time: that also cuts a partly written line.
                self.file = None;
                return Err(format!("cannot write {}: {e}", self.path.display()));
            }
            self.last_seq = seq;
            self.last_hash = hash;
            self.pending.pop_front();
        }
        Ok(())
    }
}

/// Length of the file up to and including its last `\n`, and that last whole line.
fn last_whole_line(file: &mut File) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.take(len - start).read_to_end(&mut buf)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            if start == 0 {
                return Ok((0, None));
            }
            window *= 4;
            continue;
        };
        match buf[..end].iter().rposition(|b| *b == b'\n') {
            Some(begin) => {
                return Ok((start + end as u64 + 1, Some(buf[begin + 1..end].to_vec())));
            }
            None if start == 0 => return Ok((end as u64 + 1, Some(buf[..end].to_vec()))),
            None => window *= 4,
        }
    }
}

/// The append side of the audit log, shared by the observer and its retry task.
pub struct AuditLog {
    writer: Mutex<Writer>,
    writable: AtomicBool,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`. Never fails: a log that cannot be opened
    /// is not writable (see [`AuditLog::check`]) and is retried in the background.
    /// Must be called inside a tokio runtime.
    pub fn open(path: impl Into<PathBuf>) -> Arc<Self> {
        let path = path.into();
        let mut writer = Writer {
            path: path.clone(),
            file: None,
            last_seq: 0,
            last_hash: GENESIS.into(),
            pending: VecDeque::new(),
            last_error: None,
        };
        let ok = match writer.open() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "audit log cannot be written; new deployments are refused until it can");
                writer.last_error = Some(e);
                false
            }
        };
        let log = Arc::new(Self {
            writer: Mutex::new(writer),
            writable: AtomicBool::new(ok),
            path,
        });
        spawn_retry(Arc::downgrade(&log));
        log
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the last write (or open) succeeded.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    /// Ok while the log can be written; else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.is_writable() {
            return Ok(());
        }
        let why = self
            .writer
            .lock()
            .expect("audit lock")
            .last_error
            .clone()
            .unwrap_or_default();
        Err(format!(
            "audit log {} cannot be written ({why}); new deployments are refused until it can",
            self.path.display()
        ))
    }

    /// Queues `record` and writes every queued record. Blocking.
    fn append_blocking(&self, record: Option<Map<String, Value>>) -> Result<(), String> {
        let mut w = self.writer.lock().expect("audit lock");
        if let Some(r) = record {
            w.pending.push_back(r);
        }
        if w.pending.is_empty() && w.file.is_some() {
            return Ok(());
        }
        let result = w.flush();
        match &result {
            Ok(()) => {
                if !self.writable.swap(true, Ordering::SeqCst) {
                    tracing::info!(path = %self.path.display(), "audit log writable again; deployments are accepted");
                }
                w.last_error = None;
            }
            Err(e) => {
                if self.writable.swap(false, Ordering::SeqCst) {
                    tracing::error!(error = %e, queued = w.pending.len(), "audit log cannot be written; new deployments are refused until it can");
                }
                w.last_error = Some(e.clone());
            }
        }
        result
    }

    /// Appends a `refused` record (a call turned away by auth or the deploy policy,
    /// see `api::auth::AuditRefusals`) without making the caller wait: it is written
    /// in the background, in the chain like every record.
    pub fn record_refusal(self: &Arc<Self>, refusal: &crate::api::auth::RefusalEvent<'_>) {
        let record = json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "event": "refused",
            "method": refusal.method,
            "requested_by": refusal.caller.unwrap_or("anonymous"),
            "peer": refusal.peer.map(|p| p.to_string()).unwrap_or_default(),
            "code": format!("{:?}", refusal.code),
            "message": refusal.reason,
        });
        let Value::Object(record) = record else {
            unreachable!("json! of an object")
        };
        let log = self.clone();
        tokio::spawn(async move {
            if let Err(e) = log.append(Some(record)).await {
                tracing::warn!(error = %e, "audit record of a refused call is queued until the log can be written");
            }
        });
    }

    async fn append(self: &Arc<Self>, record: Option<Map<String, Value>>) -> Result<(), String> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(record))
            .await
            .map_err(|e| format!("audit writer task: {e}"))?
    }
}

fn spawn_retry(log: Weak<AuditLog>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            let Some(log) = log.upgrade() else { break };
            if !log.is_writable() {
                let _ = log.append(None).await;
            }
        }
    });
}

/// What the log knows of a deployment beyond the update at hand.
#[derive(Default)]
struct Context {
    image: String,
    image_digest: String,
    container_id: String,
    requested_by: String,
    env_keys: Vec<String>,
    started: bool,
}

/// The observer that writes the audit log. Subscribe it with
/// `ObserverRegistry::subscribe_lossless`.
pub struct AuditObserver {
    log: Arc<AuditLog>,
    live: Mutex<HashMap<DeploymentId, Context>>,
}

impl AuditObserver {
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self {
            log,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// The record for `u`, if it is a state change.
    fn record(&self, u: &Update) -> Option<Map<String, Value>> {
        let mut live = self.live.lock().expect("audit lock");
        let ctx = live.entry(u.deployment_id).or_default();
        let meta = |k: &str| u.metadata.get(k).filter(|v| !v.is_empty()).cloned();
        if let EventKind::Accepted = u.kind {
            ctx.image = meta("image").unwrap_or_default();
            ctx.requested_by = meta("requested_by").unwrap_or_default();
            ctx.env_keys = meta("env_keys")
                .map(|k| k.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
        }
        if let Some(d) = meta("image_digest") {
            ctx.image_digest = d;
        }
        if let Some(c) = meta("container_id") {
            ctx.container_id = c;
        }
        if let Some(r) = &u.result {
            if !r.image_digest.is_empty() {
                ctx.image_digest = r.image_digest.clone();
            }
            if !r.container_id.is_empty() {
                ctx.container_id = r.container_id.clone();
            }
        }
        let (event, outcome, error) = match &u.kind {
            EventKind::Accepted => ("accepted", None, None),
            EventKind::PhaseStarted if !ctx.started => {
                ctx.started = true;
                ("started", None, None)
            }
            EventKind::PhaseStarted => ("phase_started", None, None),
            EventKind::Cancelling => ("cancelling", None, None),
            EventKind::Finished { state } => {
                let error = (!matches!(state, crate::model::DeploymentState::Succeeded))
                    .then(|| u.message.clone());
                (state.as_str(), Some(state.as_str()), error)
            }
            EventKind::Queued { .. } | EventKind::Progress | EventKind::Output => return None,
        };
        let record = json!({
            "time": humantime::format_rfc3339_millis(u.timestamp).to_string(),
            "event": event,
            "deployment_id": u.deployment_id.to_string(),
            "sequence": u.sequence,
            "app": u.app.as_str(),
            "image": ctx.image,
            "image_digest": ctx.image_digest,
            "container_id": ctx.container_id,
            "phase": u.phase.as_str(),
            "outcome": outcome,
            "error": error,
            "requested_by": ctx.requested_by,
            "env_keys": ctx.env_keys,
            "message": u.message,
        });
        if u.is_terminal() {
            live.remove(&u.deployment_id);
        }
        match record {
            Value::Object(map) => Some(map),
            _ => unreachable!("json! of an object"),
        }
    }
}

#[async_trait]
impl Observer for AuditObserver {
    fn name(&self) -> &str {
        "audit"
    }

    async fn on_update(&self, update: Arc<Update>) -> Result<(), ObserverError> {
        let Some(record) = self.record(&update) else {
            return Ok(());
        };
        // On failure the record stays queued in the log (written by a later append or
        // the retry task), so nothing is lost; the failure is counted.
        self.log.append(Some(record)).await.map_err(ObserverError)
    }

    fn admit(&self) -> Result<(), ObserverError> {
        self.log.check().map_err(ObserverError)
    }
}

/// Where and why the chain breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ChainError {
    /// 1-based line number of the first bad line.
    pub line: u64,
    pub reason: String,
}

/// A verified log.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// The last record's hash (the genesis hash for an empty log).
    pub head: String,
}

/// Checks the whole chain of the log read from `input`.
pub fn verify_reader(input: impl Read) -> Result<VerifyReport, ChainError> {
    let mut reader = BufReader::new(input);
    let mut prev_hash = GENESIS.to_owned();
    let mut records = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let line_no = records + 1;
        let bad = |reason: String| ChainError {
            line: line_no,
            reason,
        };
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            return Err(bad(
                "incomplete record (no newline at the end): the file was truncated or a write was torn".into(),
            ));
        }
        let line = &buf[..buf.len() - 1];
        let mut record = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(format!("not valid JSON ({e})"))),
        };
        if serde_json::to_vec(&record).expect("a JSON map serializes") != line {
            return Err(bad("not in canonical form: the line was edited".into()));
        }
        let Some(Value::String(hash)) = record.remove("hash") else {
            return Err(bad("no hash".into()));
        };
        match record.get("seq").and_then(Value::as_u64) {
            Some(seq) if seq == line_no => {}
            Some(seq) => {
                return Err(bad(format!(
                    "seq is {seq}, expected {line_no}: a record was removed, inserted or reordered"
                )));
            }
            None => return Err(bad("no seq".into())),
        }
        match record.get("prev_hash").and_then(Value::as_str) {
            Some(p) if p == prev_hash => {}
            Some(_) => {
                return Err(bad(
                    "prev_hash is not the hash of the record before: a record was removed, inserted or reordered".into(),
                ));
            }
            None => return Err(bad("no prev_hash".into())),
        }
        let canonical = serde_json::to_vec(&record).expect("a JSON map serializes");
        if chain_hash(&prev_hash, &canonical) != hash {
            return Err(bad("hash mismatch: the record was changed".into()));
        }
        prev_hash = hash;
        records += 1;
    }
    Ok(VerifyReport {
        records,
        head: prev_hash,
    })
}

/// Checks the whole chain of the log at `path`.
pub fn verify(path: &Path) -> Result<VerifyReport, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    verify_reader(file).map_err(|e| format!("audit log {} is broken at {e}", path.display()))
}

/// `stevedore audit …`
#[derive(clap::Subcommand, Clone, Debug)]
pub enum AuditCommand {
    /// Check the audit log's hash chain; print the head hash. Exits non-zero naming
    /// the first bad line.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct VerifyArgs {
    /// The audit log (default: DATA_DIR/audit.log).
    pub path: Option<PathBuf>,
    /// Directory for Stevedore's state (where the default audit log is).
    #[arg(long, env = "STEVEDORE_DATA_DIR", default_value = "./stevedore-data")]
    pub data_dir: PathBuf,
    /// Also fail unless the last record's hash is this one (detects lines cut off the
    /// end, given a head exported earlier).
    #[arg(long)]
    pub expect_head: Option<String>,
}

/// Runs an `audit` subcommand: prints the outcome; an error means a non-zero exit.
pub fn run_command(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Verify(args) => {
            let path = args
                .path
                .unwrap_or_else(|| args.data_dir.join(AUDIT_LOG_FILE));
            let report = verify(&path)?;
            if let Some(expected) = &args.expect_head
                && !expected.eq_ignore_ascii_case(&report.head)
            {
                return Err(format!(
                    "audit log {}: the chain is intact but its head {} is not the expected {expected}: records were cut off the end (or it is another log)",
                    path.display(),
                    report.head
                ));
            }
            println!(
                "ok: {} records in {}\nhead: {}",
                report.records,
                path.display(),
                report.head
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn update(id: DeploymentId, seq: u64, kind: EventKind, phase: Phase) -> Arc<Update> {
        let mut metadata = std::collections::BTreeMap::new();
        if kind == EventKind::Accepted {
            metadata.insert("image".into(), "img:1".into());
            metadata.insert("env_keys".into(), "A,B".into());
            metadata.insert("requested_by".into(), "127.0.0.1:9".into());
        }
        Arc::new(Update {
            deployment_id: id,
            app: AppName::parse("web").unwrap(),
            kind,
            phase,
            message: "m".into(),
            metadata,
            ..Update::for_test(seq, false)
        })
    }

    async fn write_some(path: &Path, deployments: usize) {
        let obs = AuditObserver::new(AuditLog::open(path));
        for _ in 0..deployments {
            let id = DeploymentId::new();
            obs.on_update(update(id, 1, EventKind::Accepted, Phase::Queued))
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
        let err = obs
            .on_update(update(id, 1, EventKind::Accepted, Phase::Queued))
            .await;
        assert!(err.is_err());
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
}
