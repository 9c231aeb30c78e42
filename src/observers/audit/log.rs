//! The append side of the audit log: the file, the hash chain's head, the pending
//! records and the retry task (see the module doc of `audit` for the formula and the
//! fsync policy).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// File name of the audit log in the data directory (the default of `--audit-log`).
pub(crate) const AUDIT_LOG_FILE: &str = "audit.log";

/// How often a log that cannot be written is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The chain hash of a record whose canonical bytes (without `hash`) are `canonical`.
pub(crate) fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
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

    /// Writes every pending record: one `write` of their lines, then one
    /// `fdatasync`. They leave the queue (and the chain's head moves) only once synced;
    /// on an error they stay queued and the file is reopened next time (which also
    /// cuts a partly written line).
    fn flush(&mut self) -> Result<(), String> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let (mut seq, mut hash) = (self.last_seq, self.last_hash.clone());
        let mut lines = Vec::new();
        for record in &self.pending {
            let mut record = record.clone();
            seq += 1;
            record.insert("seq".into(), seq.into());
            record.insert("prev_hash".into(), hash.clone().into());
            let canonical = serde_json::to_vec(&record).expect("a JSON map serializes");
            hash = chain_hash(&hash, &canonical);
            record.insert("hash".into(), hash.clone().into());
            serde_json::to_writer(&mut lines, &record).expect("a JSON map serializes");
            lines.push(b'\n');
        }
        let file = self.file.as_mut().expect("opened above");
        let written = file.write_all(&lines).and_then(|()| file.sync_data());
        if let Err(e) = written {
            self.file = None;
            return Err(format!("cannot write {}: {e}", self.path.display()));
        }
        self.last_seq = seq;
        self.last_hash = hash;
        self.pending.clear();
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

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path`. Never fails: a log that cannot be opened
    /// is not writable (see [`AuditLog::check`]) and is retried in the background.
    /// Must be called inside a tokio runtime.
    pub(crate) fn open(path: impl Into<PathBuf>) -> Arc<Self> {
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

    /// Whether the last write (or open) succeeded.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    /// Ok while the log can be written; else why not.
    pub(crate) fn check(&self) -> Result<(), String> {
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

    /// Queues `record` (if any) and writes every queued record. Blocking.
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

    /// Queues `record` without writing it: the next [`AuditLog::append`] (or the
    /// retry task) writes it with the others queued, with one `fdatasync` for all.
    pub(super) fn queue(&self, record: Map<String, Value>) {
        self.writer
            .lock()
            .expect("audit lock")
            .pending
            .push_back(record);
    }

    pub(super) async fn append(
        self: &Arc<Self>,
        record: Option<Map<String, Value>>,
    ) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `last_whole_line` of a file holding `bytes`, on a thread: a reader that never
    /// ends fails here within 10 s instead of hanging the suite.
    fn last_line_of(bytes: Vec<u8>) -> (u64, Option<Vec<u8>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            std::fs::write(&path, &bytes).unwrap();
            let mut file = File::open(&path).unwrap();
            let _ = tx.send(last_whole_line(&mut file).unwrap());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("last_whole_line returns within 10 s")
    }

    #[test]
    fn the_last_whole_line_and_where_it_ends() {
        let some = |s: &str| Some(s.as_bytes().to_vec());
        assert_eq!(last_line_of(vec![]), (0, None));
        assert_eq!(last_line_of(b"torn".to_vec()), (0, None));
        assert_eq!(last_line_of(b"a\n".to_vec()), (2, some("a")));
        assert_eq!(last_line_of(b"a\nbb\n".to_vec()), (5, some("bb")));
        assert_eq!(last_line_of(b"a\nbb\ntorn".to_vec()), (5, some("bb")));
    }

    #[test]
    fn lines_longer_than_the_read_window() {
        let long = "x".repeat(100 * 1024);
        // The only line, longer than the first 64 KiB window.
        let (end, line) = last_line_of(format!("{long}\n").into_bytes());
        assert_eq!(end, long.len() as u64 + 1);
        assert_eq!(line.as_deref(), Some(long.as_bytes()));
        // A long last line after a short one, then a torn tail.
        let (end, line) = last_line_of(format!("a\n{long}\ntorn").into_bytes());
        assert_eq!(end, 2 + long.len() as u64 + 1);
        assert_eq!(line.as_deref(), Some(long.as_bytes()));
        // A torn tail longer than the window after a whole line.
        let (end, line) = last_line_of(format!("a\n{long}{long}").into_bytes());
        assert_eq!((end, line), (2, Some(b"a".to_vec())));
        // No line end at all in more than a window.
        assert_eq!(last_line_of(long.clone().into_bytes()), (0, None));
    }
}
