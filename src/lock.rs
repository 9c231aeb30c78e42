//! Exclusive locks on the files a server owns (its data dir and its audit log), so a
//! second server started on the same files refuses to start instead of recovering
//! (and removing) the first one's live containers and interleaving its audit chain.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    /// Another process holds it.
    #[error("{0}")]
    Held(String),
    /// The lock file could not be opened or locked.
    #[error("{0}")]
    Io(String),
}

type Result<T> = std::result::Result<T, LockError>;

/// The lock file in the data dir.
pub(crate) const DATA_DIR_LOCK_FILE: &str = "stevedore.lock";

/// An exclusive lock held until dropped (the OS releases it when the process dies,
/// so a crashed server never leaves a stale lock behind).
#[derive(Debug)]
pub(crate) struct HeldLock {
    _file: File,
}

impl HeldLock {
    /// Takes the lock on `path` (created if missing) and writes this process's pid in
    /// it. Fails at once, naming the holder's pid, when another process holds it.
    /// `what` names what the lock protects, for the message.
    pub(crate) fn acquire(path: &Path, what: &str) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| LockError::Io(format!("cannot open lock file {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                };
                return Err(LockError::Held(format!(
                    "{what} is in use by another stevedore server ({holder} holds {}); \
                     stop it or give this one another --data-dir",
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(LockError::Io(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
        let io = |e: std::io::Error| LockError::Io(format!("cannot write {}: {e}", path.display()));
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The lock file of an audit log: a file next to it, `<audit log>.lock`.
pub(crate) fn audit_lock_path(audit_log: &Path) -> PathBuf {
    let mut name = audit_log.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_DIR_LOCK_FILE);
        let first = HeldLock::acquire(&path, "data dir").unwrap();
        let err = HeldLock::acquire(&path, "data dir")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        HeldLock::acquire(&path, "data dir").expect("free again once dropped");
    }
}
