//! The state file: the routes, written atomically (a temporary file in the same
//! directory, fsync, rename, fsync of the directory) after every change, read at start.
//! A crash leaves either the previous table or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::routes::RouteTable;

/// Reads the routes; a missing file is an empty table. A file that does not parse is
/// an error (the proxy refuses to start rather than forget routes).
pub(crate) fn load(path: &Path) -> Result<RouteTable, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("state file {} does not parse: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RouteTable::default()),
        Err(e) => Err(format!("cannot read state file {}: {e}", path.display())),
    }
}

/// Replaces the file with `table`, atomically.
pub(crate) fn save(path: &Path, table: &RouteTable) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the state file path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let bytes = serde_json::to_vec_pretty(table).map_err(std::io::Error::other)?;
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routes::Route;

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        assert_eq!(load(&path).unwrap(), RouteTable::default());
        let mut table = RouteTable::default();
        table.routes.insert(
            "web".into(),
            Route {
                listen: "0.0.0.0:8080".parse().unwrap(),
                backend: "127.0.0.1:49153".parse().unwrap(),
                deployment_id: Some("d-1".into()),
                version: None,
            },
        );
        save(&path, &table).unwrap();
        save(&path, &table).unwrap();
        assert_eq!(load(&path).unwrap(), table);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("routes.json")]);
    }

    #[test]
    fn a_file_that_does_not_parse_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("routes.json"), "{err}");
    }
}
