//! Fetching a git repository with the `git` program into a cache directory per app, so the
//! next fetch is incremental, then checking out a branch, tag or commit.
//!
//! - Progress: git writes `--progress` lines to stderr separated by carriage returns
//!   (`Receiving objects:  45% (450/1000), 1.20 MiB | 3.00 MiB/s`). [`parse_progress`] turns
//!   one such line into a [`GitProgress`]; git runs with `LC_ALL=C` so the words are English.
//! - Credentials: `https://user:token@host/repo` is split into the URL without them (the
//!   only one git is given on its command line or writes anywhere) and a credential that a
//!   helper hands to git through the child's environment. [`redact_url`] is applied to
//!   every line git prints before it leaves this module.
//! - Cancel: git runs in its own process group; cancelling (or dropping the future) kills
//!   the whole group, including `git-remote-http` and `index-pack`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::LazyLock;

use regex::Regex;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Where to fetch from and what to check out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSource {
    /// `https://…`, `http://…`, `git://…`, `ssh://…`, `file://…` or a local path. May carry
    /// credentials (`https://user:token@host/…`); they are never stored.
    pub url: String,
    /// A branch, a tag or a commit SHA (full or abbreviated); `None` is the remote's HEAD.
    pub reference: Option<String>,
    /// Whether `file://` and local paths may be fetched (they read the server's own
    /// disk: `--allow-local-git`).
    pub allow_local: bool,
}

/// What a fetch stage is doing, from the words git prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitStage {
    Enumerating,
    Counting,
    Compressing,
    Receiving,
    Unpacking,
    Resolving,
    Updating,
    Other(String),
}

impl GitStage {
    fn from_words(words: &str) -> Self {
        match words {
            "Enumerating objects" => Self::Enumerating,
            "Counting objects" => Self::Counting,
            "Compressing objects" => Self::Compressing,
            "Receiving objects" => Self::Receiving,
            "Unpacking objects" => Self::Unpacking,
            "Resolving deltas" => Self::Resolving,
            "Updating files" => Self::Updating,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The words git prints for this stage.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Enumerating => "Enumerating objects",
            Self::Counting => "Counting objects",
            Self::Compressing => "Compressing objects",
            Self::Receiving => "Receiving objects",
            Self::Unpacking => "Unpacking objects",
            Self::Resolving => "Resolving deltas",
            Self::Updating => "Updating files",
            Self::Other(s) => s,
        }
    }
}

/// One progress line of git, typed.
#[derive(Clone, Debug, PartialEq)]
pub struct GitProgress {
    pub stage: GitStage,
    /// The line came from the server (`remote: …`).
    pub(crate) remote: bool,
    /// Objects (or deltas, or files) done so far.
    pub(crate) current: u64,
    /// Their total, when git knows it (it does once the pack header arrived).
    pub total: Option<u64>,
    /// Bytes received so far (receiving and unpacking only). Git never knows the total.
    pub bytes: Option<u64>,
    /// Transfer rate in bytes per second, as git measured it.
    pub(crate) bytes_per_sec: Option<u64>,
    /// git printed `done` for this stage.
    pub(crate) done: bool,
}

impl GitProgress {
    /// current / total, when the total is known.
    pub(crate) fn fraction(&self) -> Option<f64> {
        match self.total {
            Some(0) => Some(1.0),
            Some(t) => Some((self.current as f64 / t as f64).clamp(0.0, 1.0)),
            None => None,
        }
    }
}

/// What a fetch reports while it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum FetchEvent {
    /// The fetch starts: `incremental` when the app's cache already held a repository.
    Started {
        url: String,
        incremental: bool,
    },
    Progress(GitProgress),
    /// A line git printed that is not progress (credentials already removed).
    Output(String),
    /// The reference resolved to this commit, now checked out.
    Commit {
        reference: String,
        sha: String,
    },
}

/// The result of [`fetch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The full SHA of the checked-out commit.
    pub commit: String,
    /// The working tree holding the checkout (the build context lives under it).
    pub worktree: PathBuf,
    /// The cache held the repository already, so only new objects were fetched.
    pub incremental: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git could not be started: {0}")]
    Spawn(std::io::Error),
    #[error("git {command} failed ({status}): {message}")]
    Failed {
        command: String,
        status: String,
        message: String,
    },
    #[error("reference {0:?} not found in the repository")]
    UnknownReference(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the fetch was cancelled")]
    Cancelled,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

static CREDENTIALS: LazyLock<Regex> = LazyLock::new(|| {
    // scheme://userinfo@ — the userinfo part is what we remove.
    Regex::new(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@").expect("regex")
});

/// `url` (or any text containing URLs) with the user and password of every
/// `scheme://user:password@host` removed: `https://***@host/…`.
pub(crate) fn redact_url(text: &str) -> String {
    CREDENTIALS.replace_all(text, "${scheme}***@").into_owned()
}

/// A user and password taken out of a URL (percent-decoded).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credential {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(***)")
    }
}

/// Splits `https://user:token@host/repo` into `https://host/repo` and the credential.
/// URLs with no user info (and scp-like `git@host:repo`, whose user is no secret) are
/// returned unchanged.
pub(crate) fn split_credentials(url: &str) -> (String, Option<Credential>) {
    let Some(caps) = CREDENTIALS.captures(url) else {
        return (url.to_owned(), None);
    };
    let whole = caps.get(0).expect("match");
    // Only the authority of the URL itself, not some URL later in the string.
    if whole.start() != 0 {
        return (url.to_owned(), None);
    }
    let scheme = &caps["scheme"];
    // ssh://git@host: the user is part of the address, not a secret; keep it.
    if scheme.eq_ignore_ascii_case("ssh://") && !caps["userinfo"].contains(':') {
        return (url.to_owned(), None);
    }
    let userinfo = &caps["userinfo"];
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let clean = format!("{scheme}{}", &url[whole.end()..]);
    (
        clean,
        Some(Credential {
            username: percent_decode(user),
            password: percent_decode(pass),
        }),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

static PROGRESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?P<remote>remote: )?(?P<stage>[A-Z][a-z]+(?: [a-z]+)*):\s+",
        r"(?:(?P<pct>\d+)%\s+\((?P<cur>\d+)/(?P<tot>\d+)\)|(?P<count>\d+))",
        r"(?:,\s+(?P<bytes>[\d.]+)\s+(?P<bunit>bytes?|KiB|MiB|GiB|TiB)",
        r"(?:\s+\|\s+(?P<rate>[\d.]+)\s+(?P<runit>bytes?|KiB|MiB|GiB|TiB)/s)?)?",
        r"(?P<done>,\s+done\.?)?",
    ))
    .expect("regex")
});

fn unit_bytes(value: &str, unit: &str) -> Option<u64> {
    let v: f64 = value.parse().ok()?;
    let mult = match unit {
        "byte" | "bytes" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((v * mult).round() as u64)
}

/// Parses one line of git's `--progress` output (a piece between `\r` or `\n`).
/// Returns `None` for lines that are not progress (`remote: Total 5 (delta 0)…`, errors).
pub(crate) fn parse_progress(line: &str) -> Option<GitProgress> {
    let line = line.trim_end();
    let caps = PROGRESS.captures(line)?;
    let (current, total) = if let Some(cur) = caps.name("cur") {
        (
            cur.as_str().parse().ok()?,
            caps.name("tot").and_then(|t| t.as_str().parse().ok()),
        )
    } else {
        (caps.name("count")?.as_str().parse().ok()?, None)
    };
    let bytes = match (caps.name("bytes"), caps.name("bunit")) {
        (Some(v), Some(u)) => unit_bytes(v.as_str(), u.as_str()),
        _ => None,
    };
    let bytes_per_sec = match (caps.name("rate"), caps.name("runit")) {
        (Some(v), Some(u)) => unit_bytes(v.as_str(), u.as_str()),
        _ => None,
    };
    Some(GitProgress {
        stage: GitStage::from_words(&caps["stage"]),
        remote: caps.name("remote").is_some(),
        current,
        total,
        bytes,
        bytes_per_sec,
        done: caps.name("done").is_some(),
    })
}

/// Splits a byte stream into lines at `\r` or `\n` (git rewrites progress lines in
/// place with `\r`). Holds an unfinished line until its end arrives.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes in; returns the complete, non-empty lines they finished.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\r' || b == b'\n' {
                if !self.partial.is_empty() {
                    lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                    self.partial.clear();
                }
            } else {
                self.partial.push(b);
            }
        }
        lines
    }

    /// The last line when the stream ended without a line break.
    pub(crate) fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            None
        } else {
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            Some(line)
        }
    }
}

/// Checks a branch, tag or SHA before it reaches git's command line.
pub(crate) fn validate_reference(reference: &str) -> Result<(), GitError> {
    let invalid = |reason: &str| GitError::Invalid {
        field: "ref",
        reason: reason.to_owned(),
    };
    if reference.is_empty() {
        return Err(invalid("empty"));
    }
    if reference.starts_with('-') {
        return Err(invalid("must not start with '-'"));
    }
    if reference.len() > 255 {
        return Err(invalid("longer than 255 characters"));
    }
    if reference
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == '~' || c == '^' || c == ':' || c == '\\')
        || reference.contains("..")
        || reference.contains("@{")
    {
        return Err(invalid("not a valid branch, tag or commit"));
    }
    Ok(())
}

/// Where a repository URL points (see [`validate_url`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlKind {
    /// `https://`, `http://`, `ssh://`, `git://` or scp-like `user@host:path`.
    Remote,
    /// `file://` or an absolute path: the server's own disk (only with
    /// [`GitSource::allow_local`]).
    Local,
}

/// The transports git may use (`GIT_ALLOW_PROTOCOL`): the remote ones, and `file` for
/// local repositories when they are allowed. Never `ext` (runs a command), `fd` or a
/// remote helper.
fn allowed_protocols(allow_local: bool) -> &'static str {
    if allow_local {
        "https:http:ssh:git:file"
    } else {
        "https:http:ssh:git"
    }
}

/// Checks a repository URL before it reaches git: `https://`, `http://`, `ssh://`,
/// `git://` and scp-like `user@host:path` are remote; `file://` and absolute paths are
/// local. Refused: anything else, git's `<transport>::<address>` form (`ext::…` runs a
/// command), and anything git could read as an option (a leading `-`, also as the host).
pub fn validate_url(url: &str) -> Result<UrlKind, GitError> {
    const ALLOWED: &str = "use https://, http://, ssh://, git://, user@host:path, or (when the server allows local repositories) file:// or an absolute path";
    let invalid = |reason: String| GitError::Invalid {
        field: "url",
        reason,
    };
    if url.is_empty() {
        return Err(invalid("empty".into()));
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid("not a repository URL".into()));
    }
    let scheme_len = url
        .char_indices()
        .take_while(|(i, c)| {
            c.is_ascii_alphabetic() || (*i > 0 && (c.is_ascii_digit() || "+.-".contains(*c)))
        })
        .count();
    let (scheme, rest) = url.split_at(scheme_len);
    if scheme_len > 0 && rest.starts_with("::") {
        return Err(invalid(format!(
            "git transport helpers ({scheme}::…) are not allowed; {ALLOWED}"
        )));
    }
    if let Some(after) = rest.strip_prefix("://") {
        let host = after.split('/').next().unwrap_or("");
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        return match scheme.to_ascii_lowercase().as_str() {
            "file" => Ok(UrlKind::Local),
            "https" | "http" | "ssh" | "git" if host.is_empty() => Err(invalid("no host".into())),
            "https" | "http" | "ssh" | "git" if host.starts_with('-') => {
                Err(invalid("a host must not start with '-'".into()))
            }
            "https" | "http" | "ssh" | "git" => Ok(UrlKind::Remote),
            other => Err(invalid(format!(
                "scheme {other}:// is not allowed; {ALLOWED}"
            ))),
        };
    }
    if url.starts_with('/') {
        return Ok(UrlKind::Local);
    }
    // scp-like ssh: user@host:path (a colon before any slash).
    if let Some((user_host, _)) = url.split_once(':')
        && !user_host.contains('/')
        && let Some((user, host)) = user_host.rsplit_once('@')
    {
        if user.is_empty() || host.is_empty() {
            return Err(invalid("user@host:path needs a user and a host".into()));
        }
        if host.starts_with('-') {
            return Err(invalid("a host must not start with '-'".into()));
        }
        return Ok(UrlKind::Remote);
    }
    Err(invalid(format!("not a repository URL; {ALLOWED}")))
}

/// The shell credential helper git runs; it reads the credential from the environment git
/// inherited from us, so it is never on a command line or on disk. It answers only for
/// the host (and port) of the URL, so a redirect elsewhere does not get it.
const HELPER: &str = concat!(
    "!f() { test \"$1\" = get || exit 0; h=; ",
    "while IFS= read -r l && test -n \"$l\"; do case \"$l\" in host=*) h=\"${l#host=}\";; esac; done; ",
    "test \"$h\" = \"$STEVEDORE_GIT_HOST\" || exit 0; ",
    "printf 'username=%s\\npassword=%s\\n' \"$STEVEDORE_GIT_USERNAME\" \"$STEVEDORE_GIT_PASSWORD\"; }; f"
);

/// `host[:port]` of a URL like `https://host:port/path` (what git calls `host`).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

/// How one git invocation is run.
struct GitRun<'a> {
    dir: &'a Path,
    /// The credential and the host it is for.
    credential: Option<(&'a Credential, &'a str)>,
    cancel: &'a CancellationToken,
    /// `GIT_ALLOW_PROTOCOL`: the only transports git may use, redirects included.
    protocols: &'static str,
}

/// Kills the process group of a git child when dropped (cancel, or the future dropped).
struct GroupKiller {
    pgid: Option<u32>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // No libc here (unsafe is forbidden): kill(1) signals the whole group.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

impl GitRun<'_> {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("git");
        cmd.current_dir(self.dir)
            .args(args)
            .env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GIT_ALLOW_PROTOCOL", self.protocols)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some((cred, host)) = self.credential {
            // Configuration through the environment (git ≥ 2.31): an empty helper first
            // resets any configured helper, then ours answers from the environment.
            cmd.env("GIT_CONFIG_COUNT", "2")
                .env("GIT_CONFIG_KEY_0", "credential.helper")
                .env("GIT_CONFIG_VALUE_0", "")
                .env("GIT_CONFIG_KEY_1", "credential.helper")
                .env("GIT_CONFIG_VALUE_1", HELPER)
                .env("STEVEDORE_GIT_USERNAME", &cred.username)
                .env("STEVEDORE_GIT_PASSWORD", &cred.password)
                .env("STEVEDORE_GIT_HOST", host);
        }
        cmd
    }

    /// Runs git, feeding stderr lines (progress or output) to `on_event`; returns stdout.
    async fn run(
        &self,
        args: &[&str],
        on_event: &mut (dyn FnMut(FetchEvent) + Send),
    ) -> Result<String, GitError> {
        let mut child = self.command(args).spawn().map_err(GitError::Spawn)?;
        let mut killer = GroupKiller { pgid: child.id() };
        let mut stderr = child.stderr.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut splitter = LineSplitter::default();
        let mut tail: Vec<String> = Vec::new();
        let mut handle = |line: String, tail: &mut Vec<String>| {
            let line = redact_url(&line);
            match parse_progress(&line) {
                Some(p) => on_event(FetchEvent::Progress(p)),
                None => {
                    if tail.len() == 8 {
                        tail.remove(0);
                    }
                    tail.push(line.clone());
                    on_event(FetchEvent::Output(line));
                }
            }
        };
        let read_stdout = async {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).await.map(|_| out)
        };
        let read_stderr = async {
            let mut buf = [0u8; 4096];
            loop {
                let n = stderr.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                for line in splitter.push(&buf[..n]) {
                    handle(line, &mut tail);
                }
            }
            if let Some(line) = splitter.finish() {
                handle(line, &mut tail);
            }
            Ok::<_, std::io::Error>(())
        };
        let read_all = async {
            let (out, err) = tokio::join!(read_stdout, read_stderr);
            err?;
            let out = out?;
            child.wait().await.map(|status| (status, out))
        };
        let (status, out) = tokio::select! {
            done = read_all => done?,
            _ = self.cancel.cancelled() => {
                killer.kill();
                return Err(GitError::Cancelled);
            }
        };
        killer.disarm();
        if !status.success() {
            return Err(GitError::Failed {
                command: args
                    .iter()
                    .find(|a| !a.starts_with('-') && !a.contains('='))
                    .copied()
                    .unwrap_or("")
                    .to_owned(),
                status: status.to_string(),
                message: redact_url(&tail.join("; ")),
            });
        }
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }
}

/// Removes lock files a killed git left behind (the caller holds the app's lock, so no
/// other git runs in this repository).
fn remove_stale_locks(git_dir: &Path) {
    fn walk(dir: &Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "objects" {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() && depth < 8 => walk(&path, depth + 1),
                Ok(t) if t.is_file() && name.to_string_lossy().ends_with(".lock") => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
    }
    walk(git_dir, 0);
}

/// Refs the cache keeps: every branch, every tag, and the remote's HEAD.
const REFSPECS: [&str; 3] = [
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
    "+HEAD:refs/stevedore/remote-head",
];

/// Fetches `source` into `cache_dir` (created if missing; one per app) and checks out
/// the reference there. The first call clones; later calls fetch only new objects.
///
/// The remote URL is never written to the repository: git fetches from the URL given on
/// its command line (without credentials), and the refs land under `refs/remotes/origin`.
pub async fn fetch(
    cache_dir: &Path,
    source: &GitSource,
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(FetchEvent) + Send),
) -> Result<Fetched, GitError> {
    if validate_url(&source.url)? == UrlKind::Local && !source.allow_local {
        return Err(GitError::Invalid {
            field: "url",
            reason: "local repositories (file:// or a path) are not allowed on this server (--allow-local-git)".into(),
        });
    }
    if let Some(r) = &source.reference {
        validate_reference(r)?;
    }
    let (url, credential) = split_credentials(&source.url);
    tokio::fs::create_dir_all(cache_dir).await?;
    let mut run = GitRun {
        dir: cache_dir,
        credential: None,
        cancel,
        protocols: allowed_protocols(source.allow_local),
    };
    let mut silent = |_: FetchEvent| {};
    let incremental = open_cache(&run, cache_dir).await?;
    on_event(FetchEvent::Started {
        url: redact_url(&url),
        incremental,
    });

    run.credential = credential.as_ref().map(|c| (c, url_host(&url)));
    // unpackLimit=1: always keep the pack (index-pack), so even a small fetch reports
    // "Receiving objects" with bytes and rate.
    let mut args = vec![
        "-c",
        "fetch.unpackLimit=1",
        "fetch",
        "--progress",
        "--prune",
        "--force",
        "--no-write-fetch-head",
    ];
    args.push("--end-of-options");
    args.push(&url);
    args.extend(REFSPECS);
    run.run(&args, on_event).await?;

    let reference = source.reference.clone();
    let sha = match resolve(&run, reference.as_deref()).await? {
        Some(sha) => sha,
        None => fetch_commit(&run, &url, reference.clone().unwrap_or_default(), on_event).await?,
    };
    run.credential = None;
    run.run(
        &["checkout", "--progress", "--force", "--detach", &sha],
        on_event,
    )
    .await?;
    run.run(&["clean", "-ffdxq"], &mut silent).await?;
    on_event(FetchEvent::Commit {
        reference: reference.unwrap_or_else(|| "HEAD".into()),
        sha: sha.clone(),
    });
    Ok(Fetched {
        commit: sha,
        worktree: cache_dir.to_owned(),
        incremental,
    })
}

/// Whether `cache_dir` holds a usable repository (a fetch is then incremental). A
/// missing or broken one is started over; a usable one loses the locks a killed git
/// left.
async fn open_cache(run: &GitRun<'_>, cache_dir: &Path) -> Result<bool, GitError> {
    let git_dir = cache_dir.join(".git");
    let mut silent = |_: FetchEvent| {};
    let incremental = git_dir.is_dir()
        && run
            .run(&["rev-parse", "--git-dir"], &mut silent)
            .await
            .is_ok();
    if !incremental {
        // A missing or broken cache: start over.
        if cache_dir.exists() {
            tokio::fs::remove_dir_all(cache_dir).await?;
            tokio::fs::create_dir_all(cache_dir).await?;
        }
        run.run(&["init", "--quiet"], &mut silent).await?;
    } else {
        remove_stale_locks(&git_dir);
    }
    Ok(incremental)
}

/// A commit no branch or tag points to (yet), asked for by name: its full SHA.
async fn fetch_commit(
    run: &GitRun<'_>,
    url: &str,
    r: String,
    on_event: &mut (dyn FnMut(FetchEvent) + Send),
) -> Result<String, GitError> {
    let looks_like_sha = (4..=40).contains(&r.len()) && r.chars().all(|c| c.is_ascii_hexdigit());
    if !looks_like_sha {
        return Err(GitError::UnknownReference(r));
    }
    let args = [
        "-c",
        "fetch.unpackLimit=1",
        "fetch",
        "--progress",
        "--no-write-fetch-head",
        "--end-of-options",
        url,
        &r,
    ];
    if run.run(&args, on_event).await.is_err() {
        return Err(GitError::UnknownReference(r));
    }
    resolve(run, Some(&r))
        .await?
        .ok_or(GitError::UnknownReference(r))
}

/// The commit `reference` names (remote branch, then tag, then SHA), or the remote HEAD.
async fn resolve(run: &GitRun<'_>, reference: Option<&str>) -> Result<Option<String>, GitError> {
    let candidates: Vec<String> = match reference {
        None => vec!["refs/stevedore/remote-head".into()],
        Some(r) => vec![
            format!("refs/remotes/origin/{r}"),
            format!("refs/tags/{r}"),
            r.to_owned(),
        ],
    };
    let mut silent = |_: FetchEvent| {};
    for c in candidates {
        let spec = format!("{c}^{{commit}}");
        if let Ok(sha) = run
            .run(
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &spec,
                ],
                &mut silent,
            )
            .await
            && sha.len() == 40
        {
            return Ok(Some(sha));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_receiving_with_bytes_and_rate() {
        let p =
            parse_progress("Receiving objects:  45% (450/1000), 1.20 MiB | 3.00 MiB/s").unwrap();
        assert_eq!(p.stage, GitStage::Receiving);
        assert!(!p.remote);
        assert_eq!((p.current, p.total), (450, Some(1000)));
        assert_eq!(p.bytes, Some((1.2f64 * 1048576.0).round() as u64));
        assert_eq!(p.bytes_per_sec, Some(3 * 1048576));
        assert!(!p.done);
        assert_eq!(p.fraction(), Some(0.45));
    }

    #[test]
    fn parses_done_lines_and_byte_units() {
        let p = parse_progress("Receiving objects: 100% (1000/1000), 2.50 MiB | 3.00 MiB/s, done.")
            .unwrap();
        assert!(p.done);
        let p = parse_progress("Unpacking objects: 100% (3/3), 250 bytes | 250.00 KiB/s, done.")
            .unwrap();
        assert_eq!(p.stage, GitStage::Unpacking);
        assert_eq!(p.bytes, Some(250));
        assert_eq!(p.bytes_per_sec, Some(256_000));
        let p = parse_progress("Receiving objects:  10% (1/10), 1 byte | 1 byte/s").unwrap();
        assert_eq!((p.bytes, p.bytes_per_sec), (Some(1), Some(1)));
        let p = parse_progress("Resolving deltas: 100% (10/10), done.").unwrap();
        assert_eq!(p.stage, GitStage::Resolving);
        assert_eq!((p.current, p.total, p.done), (10, Some(10), true));
        assert_eq!(p.bytes, None);
    }

    #[test]
    fn parses_remote_stages_and_counts_without_total() {
        let p = parse_progress("remote: Enumerating objects: 5, done.").unwrap();
        assert_eq!(p.stage, GitStage::Enumerating);
        assert!(p.remote);
        assert_eq!((p.current, p.total, p.done), (5, None, true));
        assert_eq!(p.fraction(), None);
        let p = parse_progress("remote: Counting objects: 100% (5/5), done.").unwrap();
        assert_eq!(p.stage, GitStage::Counting);
        let p = parse_progress("remote: Compressing objects:  50% (1/2)").unwrap();
        assert_eq!(p.stage, GitStage::Compressing);
        assert_eq!((p.current, p.total), (1, Some(2)));
        let p = parse_progress("Counting objects: 3").unwrap();
        assert_eq!((p.current, p.remote), (3, false));
        let p = parse_progress("Updating files: 100% (12/12), done.").unwrap();
        assert_eq!(p.stage, GitStage::Updating);
        let p = parse_progress("Checking connectivity: 7, done.").unwrap();
        assert_eq!(p.stage, GitStage::Other("Checking connectivity".into()));
    }

    #[test]
    fn non_progress_lines_are_not_progress() {
        for line in [
            "remote: Total 5 (delta 0), reused 0 (delta 0), pack-reused 0",
            "fatal: repository 'http://host/x.git/' not found",
            "From file:///tmp/repo",
            " * [new branch]      main       -> origin/main",
            "",
        ] {
            assert_eq!(parse_progress(line), None, "{line}");
        }
    }

    #[test]
    fn splitter_breaks_at_carriage_returns_and_newlines() {
        let mut s = LineSplitter::default();
        let lines = s.push(b"Receiving objects:  1% (1/100)\rReceiving obj");
        assert_eq!(lines, vec!["Receiving objects:  1% (1/100)"]);
        let lines = s.push(b"ects:  2% (2/100)\r\nremote: Total 3\n");
        assert_eq!(
            lines,
            vec!["Receiving objects:  2% (2/100)", "remote: Total 3"]
        );
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn redacts_credentials_anywhere_in_text() {
        assert_eq!(
            redact_url("https://user:s3cret@example.test/repo.git"),
            "https://***@example.test/repo.git"
        );
        assert_eq!(
            redact_url("fatal: unable to access 'http://tok@127.0.0.1:9/x/': refused"),
            "fatal: unable to access 'http://***@127.0.0.1:9/x/': refused"
        );
        assert_eq!(redact_url("file:///tmp/repo"), "file:///tmp/repo");
        assert_eq!(redact_url("git@host:org/repo"), "git@host:org/repo");
    }

    #[test]
    fn splits_credentials_out_of_urls() {
        let (url, cred) = split_credentials("https://user:p%40ss@example.test/r.git");
        assert_eq!(url, "https://example.test/r.git");
        let cred = cred.unwrap();
        assert_eq!(cred.username, "user");
        assert_eq!(cred.password, "p@ss");
        assert_eq!(format!("{cred:?}"), "Credential(***)");
        let (url, cred) = split_credentials("https://token@example.test/r.git");
        assert_eq!(url, "https://example.test/r.git");
        assert_eq!(cred.unwrap().password, "");
        let (url, cred) = split_credentials("ssh://git@example.test/r.git");
        assert_eq!(url, "ssh://git@example.test/r.git");
        assert!(cred.is_none());
        let (url, cred) = split_credentials("file:///srv/r.git");
        assert_eq!(url, "file:///srv/r.git");
        assert!(cred.is_none());
    }

    #[test]
    fn the_credential_is_for_the_url_host_only() {
        assert_eq!(
            url_host("https://example.test:8443/r.git"),
            "example.test:8443"
        );
        assert_eq!(url_host("http://127.0.0.1:9/x"), "127.0.0.1:9");
        assert_eq!(url_host("https://h"), "h");
    }

    #[test]
    fn references_that_could_be_options_are_refused() {
        assert!(validate_reference("main").is_ok());
        assert!(validate_reference("v1.2.3").is_ok());
        assert!(validate_reference("feature/x").is_ok());
        assert!(validate_reference("0123abcd").is_ok());
        for bad in [
            "",
            "-x",
            "--upload-pack=evil",
            "a..b",
            "a b",
            "a~1",
            "HEAD^",
            "a:b",
        ] {
            assert!(validate_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_checked() {
        use UrlKind::{Local, Remote};
        for (ok, kind) in [
            ("https://h/r.git", Remote),
            ("HTTPS://h/r.git", Remote),
            ("http://user:tok@127.0.0.1:8080/r.git", Remote),
            ("http://[::1]:8080/r.git", Remote),
            ("git@h:r.git", Remote),
            ("git@h:/srv/r.git", Remote),
            ("ssh://git@h:22/r", Remote),
            ("git://127.0.0.1/r", Remote),
            ("file:///srv/r.git", Local),
            ("/srv/r.git", Local),
        ] {
            assert_eq!(validate_url(ok).ok(), Some(kind), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("-u", "not a repository URL"),
            ("--upload-pack=x", "not a repository URL"),
            ("ftp://h/r", "scheme ftp:// is not allowed"),
            ("ext::sh -c touch% /tmp/pwned", "not a repository URL"),
            ("ext::sh", "transport helpers (ext::…)"),
            ("fd::3", "transport helpers (fd::…)"),
            ("ext://h/r", "scheme ext:// is not allowed"),
            ("relative/path", "not a repository URL"),
            ("./repo", "not a repository URL"),
            ("h:r", "not a repository URL"),
            ("ssh://-oProxyCommand=x/r", "must not start with '-'"),
            ("ssh://u@-oProxyCommand=x/r", "must not start with '-'"),
            ("u@-oProxyCommand=x:r", "must not start with '-'"),
            ("@h:r", "needs a user and a host"),
            ("https:///r", "no host"),
        ] {
            let err = validate_url(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_local_repository_needs_allow_local_and_git_gets_only_the_allowed_transports() {
        let dir = tempfile::tempdir().unwrap();
        let source = |url: &str, allow_local| GitSource {
            url: url.into(),
            reference: None,
            allow_local,
        };
        let cancel = CancellationToken::new();
        for url in ["file:///nonexistent/r.git", "/nonexistent/r.git"] {
            let err = fetch(dir.path(), &source(url, false), &cancel, &mut |_| {})
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("--allow-local-git"), "{err}");
        }
        // Allowed, it reaches git (and fails there: no such repository).
        let err = fetch(
            &dir.path().join("c"),
            &source("/nonexistent/r.git", true),
            &cancel,
            &mut |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("fetch failed"), "{err}");
        // Were a URL to get past the checks, git itself refuses its transport.
        let work = dir.path().join("w");
        std::fs::create_dir_all(&work).unwrap();
        let run = GitRun {
            dir: &work,
            credential: None,
            cancel: &cancel,
            protocols: allowed_protocols(false),
        };
        run.run(&["init", "--quiet"], &mut |_| {}).await.unwrap();
        let other = format!("file://{}", work.display());
        for (url, transport) in [(other.as_str(), "file"), ("ext::sh -c true", "ext")] {
            let err = run
                .run(&["fetch", "--end-of-options", url], &mut |_| {})
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("transport '{transport}' not allowed")),
                "{err}"
            );
        }
    }
}
