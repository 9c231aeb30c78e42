//! The build context: a tar of a directory that honours its `.dockerignore` the way the
//! docker CLI does (the daemon does not filter an uploaded tar). File modes, owners and
//! mtimes are kept, symlinks are stored as symlinks (never followed), sockets and fifos
//! are left out. The Dockerfile and `.dockerignore` are always sent, even when excluded.

use std::path::{Component, Path, PathBuf};

use super::dockerignore::{DockerIgnore, PatternError};

/// A packed context.
#[derive(Debug)]
pub(crate) struct PackedContext {
    pub(crate) tar: Vec<u8>,
    /// Regular files and symlinks in the tar.
    pub(crate) files: u64,
    /// Their content bytes.
    pub(crate) bytes: u64,
    /// Paths left out by `.dockerignore` (a skipped directory counts once).
    pub(crate) excluded: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("dockerfile {0:?} not found in the build context")]
    MissingDockerfile(String),
    #[error("{0}")]
    Ignore(#[from] PatternError),
    #[error("the build context is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the build context: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks a path inside the repository (`context_dir`, `dockerfile`): relative, no `..`,
/// and returns it cleaned (`"."` for the root).
pub(crate) fn relative_path(field: &'static str, path: &str) -> Result<String, ContextError> {
    let invalid = |reason: &str| ContextError::Invalid {
        field,
        reason: reason.to_owned(),
    };
    if path.chars().any(|c| c.is_control()) {
        return Err(invalid("control characters"));
    }
    let p = Path::new(path);
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(invalid("must stay inside the repository (no '..')"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid("must be relative to the repository root"));
            }
        }
    }
    Ok(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

/// Options of [`pack`].
#[derive(Clone, Debug)]
pub(crate) struct PackOptions {
    /// The Dockerfile, relative to the context directory.
    pub(crate) dockerfile: String,
    /// Paths (relative to the context root) never sent, whatever `.dockerignore` says:
    /// the cache's own `.git`.
    pub(crate) always_exclude: Vec<String>,
    /// Refuse a context larger than this many bytes of file content.
    pub(crate) max_bytes: u64,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            dockerfile: "Dockerfile".into(),
            always_exclude: vec![".git".into()],
            max_bytes: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Packs `context_dir` into a tar for `POST /build`. Blocking: run it on a blocking thread.
pub(crate) fn pack(
    context_dir: &Path,
    options: &PackOptions,
) -> Result<PackedContext, ContextError> {
    let dockerfile = relative_path("dockerfile", &options.dockerfile)?;
    let df_path = context_dir.join(&dockerfile);
    if dockerfile == "." || !df_path.is_file() {
        return Err(ContextError::MissingDockerfile(dockerfile));
    }
    let mut ignore = match std::fs::read_to_string(context_dir.join(".dockerignore")) {
        Ok(text) => DockerIgnore::parse(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DockerIgnore::default(),
        Err(e) => return Err(e.into()),
    };
    // As the docker CLI: the daemon needs both, and removes them itself when excluded.
    if ignore.is_excluded(".dockerignore") {
        ignore.keep(".dockerignore");
    }
    if ignore.is_excluded(&dockerfile) {
        ignore.keep(&dockerfile);
    }
    let mut packer = Packer {
        builder: tar::Builder::new(Vec::new()),
        ignore,
        always_exclude: options.always_exclude.clone(),
        max_bytes: options.max_bytes,
        files: 0,
        bytes: 0,
        excluded: 0,
    };
    packer.builder.follow_symlinks(false);
    packer.builder.mode(tar::HeaderMode::Complete);
    packer.walk(context_dir, "")?;
    let Packer {
        builder,
        files,
        bytes,
        excluded,
        ..
    } = packer;
    let tar = builder.into_inner()?;
    Ok(PackedContext {
        tar,
        files,
        bytes,
        excluded,
    })
}

struct Packer {
    builder: tar::Builder<Vec<u8>>,
    ignore: DockerIgnore,
    always_exclude: Vec<String>,
    max_bytes: u64,
    files: u64,
    bytes: u64,
    excluded: u64,
}

impl Packer {
    fn walk(&mut self, dir: &Path, prefix: &str) -> Result<(), ContextError> {
        let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for (name, path) in entries {
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if self.always_exclude.contains(&rel) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)?;
            let excluded = self.ignore.is_excluded(&rel);
            let ft = meta.file_type();
            if ft.is_dir() {
                if excluded {
                    self.excluded += 1;
                    // The docker CLI's rule: enter an excluded directory only when an
                    // exception could bring back something inside it.
                    if self.ignore.has_exceptions() && self.ignore.must_descend(&rel) {
                        self.walk(&path, &rel)?;
                    }
                    continue;
                }
                self.builder.append_path_with_name(&path, &rel)?;
                self.walk(&path, &rel)?;
            } else if ft.is_file() || ft.is_symlink() {
                if excluded {
                    self.excluded += 1;
                    continue;
                }
                if ft.is_file() {
                    self.bytes += meta.len();
                    if self.bytes > self.max_bytes {
                        return Err(ContextError::TooLarge {
                            limit: self.max_bytes,
                        });
                    }
                }
                self.files += 1;
                self.builder.append_path_with_name(&path, &rel)?;
            }
            // Sockets, fifos and devices are not build input.
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// path → (entry type, mode, link target or content)
    fn entries(tar: &[u8]) -> BTreeMap<String, (tar::EntryType, u32, String)> {
        let mut archive = tar::Archive::new(tar);
        let mut out = BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_owned();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let extra = if kind.is_symlink() {
                e.link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            } else {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                s
            };
            out.insert(path, (kind, mode, extra));
        }
        out
    }

    #[test]
    fn honours_dockerignore_and_keeps_modes_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "Dockerfile", "FROM x\n");
        write(
            root,
            ".dockerignore",
            "*.log\nsecret/\n!secret/public.txt\nnode_modules\n.dockerignore\n",
        );
        write(root, "app.sh", "#!/bin/sh\n");
        std::fs::set_permissions(root.join("app.sh"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        write(root, "debug.log", "x");
        write(root, "sub/debug.log", "kept: *.log is anchored at the root");
        write(root, "secret/key", "k");
        write(root, "secret/public.txt", "p");
        write(root, "node_modules/a/b.js", "b");
        write(root, ".git/config", "[core]");
        std::os::unix::fs::symlink("app.sh", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();

        let packed = pack(root, &PackOptions::default()).unwrap();
        let e = entries(&packed.tar);
        let names: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                ".dockerignore",
                "Dockerfile",
                "app.sh",
                "link",
                "outside",
                "secret/public.txt",
                "sub",
                "sub/debug.log",
            ]
        );
        assert_eq!(e["app.sh"].1 & 0o777, 0o751);
        assert!(e["link"].0.is_symlink());
        assert_eq!(e["link"].2, "app.sh");
        assert_eq!(e["outside"].2, "/etc/passwd", "symlinks are not followed");
        assert_eq!(e["Dockerfile"].2, "FROM x\n");
        assert_eq!(packed.files, 7);
        // debug.log, secret (dir), secret/key, node_modules (dir)
        assert_eq!(packed.excluded, 4);
    }

    #[test]
    fn dockerfile_is_sent_even_when_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "build/app.Dockerfile", "FROM x\n");
        write(root, "build/other", "o");
        write(root, ".dockerignore", "build\n");
        let options = PackOptions {
            dockerfile: "./build/app.Dockerfile".into(),
            ..PackOptions::default()
        };
        let e = entries(&pack(root, &options).unwrap().tar);
        let names: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(names, vec![".dockerignore", "build/app.Dockerfile"]);
    }

    #[test]
    fn a_missing_dockerfile_is_an_error_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "README", "r");
        let err = pack(dir.path(), &PackOptions::default()).unwrap_err();
        assert!(matches!(err, ContextError::MissingDockerfile(ref d) if d == "Dockerfile"));
        let options = PackOptions {
            dockerfile: "../Dockerfile".into(),
            ..PackOptions::default()
        };
        assert!(matches!(
            pack(dir.path(), &options).unwrap_err(),
            ContextError::Invalid {
                field: "dockerfile",
                ..
            }
        ));
    }

    #[test]
    fn a_context_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "Dockerfile", "FROM x\n");
        write(dir.path(), "big", &"x".repeat(100));
        let options = PackOptions {
            max_bytes: 50,
            ..PackOptions::default()
        };
        assert!(matches!(
            pack(dir.path(), &options).unwrap_err(),
            ContextError::TooLarge { limit: 50 }
        ));
    }

    #[test]
    fn relative_paths_are_checked_and_cleaned() {
        assert_eq!(relative_path("context_dir", "").unwrap(), ".");
        assert_eq!(relative_path("context_dir", ".").unwrap(), ".");
        assert_eq!(relative_path("context_dir", "./a//b/").unwrap(), "a/b");
        assert!(relative_path("context_dir", "/etc").is_err());
        assert!(relative_path("context_dir", "a/../../b").is_err());
    }
}
