//! `audit verify`: checks the whole chain of a log, naming the first bad line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use super::{GENESIS, chain_hash};

/// Where and why the chain breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub(crate) struct ChainError {
    /// 1-based line number of the first bad line.
    pub(crate) line: u64,
    pub(crate) reason: String,
}

/// A verified log.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// The last record's hash (the genesis hash for an empty log).
    pub head: String,
}

/// Checks the whole chain of the log read from `input`.
pub(crate) fn verify_reader(input: impl Read) -> Result<VerifyReport, ChainError> {
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
