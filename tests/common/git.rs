//! git fixtures (a bare repository and a working clone pushing to it, served over
//! loopback HTTP by `git http-backend`) and the cleanup of images built from source.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Stevedore Test",
            "-c",
            "user.email=test@stevedore.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository (`<root>/repo.git`) and a working clone that pushes to it.
pub struct Repo {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Repo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let bare = root.join("repo.git");
        let work = root.join("work");
        git(&root, &["init", "--quiet", "--bare", "repo.git"]);
        git(&root, &["init", "--quiet", "work"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Self {
            _dir: dir,
            root,
            bare,
            work,
        }
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.work.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Commits everything and pushes `main`; returns the SHA.
    pub fn commit(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "--quiet", "-m", message]);
        git(
            &self.work,
            &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

/// Removes every `stevedore/<app>:*` image when dropped.
pub struct ImageGuard(pub String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args([
                "images",
                "-q",
                "--no-trunc",
                &format!("stevedore/{}", self.0),
            ])
            .output();
        if let Ok(out) = out {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.lines().collect();
            if !ids.is_empty() {
                let mut args = vec!["rmi", "-f"];
                args.extend(ids);
                let _ = Command::new("docker").args(&args).output();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// git over loopback HTTP: `git http-backend` behind a tiny CGI runner with basic auth

fn base64(input: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub struct HttpGit {
    pub addr: std::net::SocketAddr,
    /// "METHOD target authorized?" per request.
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpGit {
    /// The URL of the bare repository `name` (e.g. `repo.git`) under the served root.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }
}

impl Drop for HttpGit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the repositories under `root` over HTTP on 127.0.0.1; requires `user:password`
/// with basic auth when given. `stall`: accept requests and never answer.
pub async fn serve_git(root: PathBuf, auth: Option<(&str, &str)>, stall: bool) -> HttpGit {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let expected = auth.map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())));
    let log = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let root = root.clone();
            let expected = expected.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let _ = handle_http(stream, &root, expected.as_deref(), &log, stall).await;
            });
        }
    });
    HttpGit {
        addr,
        requests,
        task,
    }
}

async fn handle_http(
    mut stream: tokio::net::TcpStream,
    root: &Path,
    expected_auth: Option<&str>,
    log: &Mutex<Vec<String>>,
    stall: bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_owned();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = buf[head_end..].to_vec();
    if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        while body.len() < len {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = read_chunked(&mut stream, body).await?;
    }
    let authorized = match expected_auth {
        None => true,
        Some(e) => header("authorization").as_deref() == Some(e),
    };
    log.lock()
        .unwrap()
        .push(format!("{method} {target} authorized={authorized}"));
    if stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    if !authorized {
        stream
            .write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "test")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(t) = header("content-type") {
        cmd.env("CONTENT_TYPE", t);
    }
    if let Some(e) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", e);
    }
    if let Some(p) = header("git-protocol") {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await?;
    let _ = writer.await;
    let stdout = out.stdout;
    let split = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| stdout.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let (cgi_head, cgi_body) = match split {
        Some((p, n)) => (
            String::from_utf8_lossy(&stdout[..p]).into_owned(),
            &stdout[p + n..],
        ),
        None => (String::new(), &stdout[..]),
    };
    let mut status = "200 OK".to_owned();
    let mut response_headers = String::new();
    for line in cgi_head.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(s) = line.strip_prefix("Status:") {
            status = s.trim().to_owned();
        } else if !line.is_empty() {
            response_headers.push_str(line);
            response_headers.push_str("\r\n");
        }
    }
    let response = format!(
        "HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        cgi_body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(cgi_body).await?;
    stream.shutdown().await
}

async fn read_chunked(
    stream: &mut tokio::net::TcpStream,
    mut raw: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        // Make sure a full size line is there.
        while !raw.windows(2).any(|w| w == b"\r\n") {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(body);
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&raw[..line_end]).into_owned();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        while raw.len() < line_end + 2 + size + 2 {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(body);
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw.drain(..line_end + 2 + size + 2);
    }
}
