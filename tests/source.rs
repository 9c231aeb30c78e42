//! Deploys from source, the building blocks: fetching real git repositories (a bare repo
//! over file:// and one served over loopback HTTP by `git http-backend`), packing the
//! context and building it on the real Docker engine with the classic builder.
//!
//! Wiring into the deployment state machine is tested with the engine, later; these tests
//! hold the parts to their promises: progress, incremental fetches, step N/M, cache hits,
//! skipped builds, diagnostics, cancel, and no trace of credentials.

mod common;

use common::git::{ImageGuard, Repo, git, serve_git};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stevedore::source::build::{self, BuildError, BuildEvent, BuildOutcome, BuildSpec};
use stevedore::source::git::{self, FetchEvent, GitError, GitSource, GitStage};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// git fixtures

/// Some files so that a fetch has objects to count.
fn fill(repo: &Repo, n: usize, tag: &str) {
    for i in 0..n {
        repo.write(
            &format!("data/{tag}-{i}.txt"),
            &format!("{tag} {i} {}\n", "x".repeat(i * 37 % 500)),
        );
    }
}

#[derive(Default)]
struct Fetch {
    events: Vec<FetchEvent>,
}

impl Fetch {
    fn started(&self) -> Option<(String, bool)> {
        self.events.iter().find_map(|e| match e {
            FetchEvent::Started { url, incremental } => Some((url.clone(), *incremental)),
            _ => None,
        })
    }

    /// The largest object total a receiving or unpacking stage reported.
    fn objects_received(&self) -> Option<u64> {
        self.events
            .iter()
            .filter_map(|e| match e {
                FetchEvent::Progress(p)
                    if matches!(p.stage, GitStage::Receiving | GitStage::Unpacking) =>
                {
                    p.total
                }
                _ => None,
            })
            .max()
    }
}

async fn fetch(
    cache: &Path,
    url: &str,
    reference: Option<&str>,
) -> (Result<git::Fetched, GitError>, Fetch) {
    let mut log = Fetch::default();
    let source = GitSource {
        url: url.to_owned(),
        reference: reference.map(str::to_owned),
        allow_local: true,
    };
    let cancel = CancellationToken::new();
    let result = git::fetch(cache, &source, &cancel, &mut |e| log.events.push(e)).await;
    (result, log)
}

#[tokio::test]
async fn fetch_over_file_url_reports_progress_and_the_commit_then_fetches_incrementally() {
    let repo = Repo::new();
    repo.write("Dockerfile", "FROM stevedore-test/base:1\n");
    fill(&repo, 150, "first");
    let first = repo.commit("first");
    let cache = repo.root.join("cache/app");

    let (fetched, log) = fetch(&cache, &repo.file_url(), None).await;
    let fetched = fetched.unwrap();
    assert_eq!(fetched.commit, first);
    assert!(!fetched.incremental);
    assert!(!log.started().unwrap().1);
    let received_first = log.objects_received().expect("receiving progress");
    assert!(received_first >= 150, "objects: {received_first}");
    assert!(
        log.events.iter().any(|e| matches!(e,
            FetchEvent::Progress(p) if p.stage == GitStage::Receiving && p.bytes.is_some())),
        "bytes while receiving: {:?}",
        log.events
    );
    assert!(log.events.contains(&FetchEvent::Commit {
        reference: "HEAD".into(),
        sha: first.clone()
    }));
    assert!(cache.join("Dockerfile").is_file());
    assert!(cache.join("data/first-149.txt").is_file());

    // A new commit: only its objects travel.
    repo.write("data/first-0.txt", "changed\n");
    repo.write("new.txt", "new\n");
    let second = repo.commit("second");
    let (fetched, log) = fetch(&cache, &repo.file_url(), Some("main")).await;
    let fetched = fetched.unwrap();
    assert!(fetched.incremental);
    assert!(log.started().unwrap().1);
    assert_eq!(fetched.commit, second);
    let received_second = log.objects_received().unwrap_or(0);
    assert!(
        received_second < 10 && received_second < received_first,
        "incremental fetch received {received_second} objects (first: {received_first})"
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("new.txt")).unwrap(),
        "new\n"
    );

    // Back to the first commit by SHA (abbreviated), and by tag.
    let (fetched, _) = fetch(&cache, &repo.file_url(), Some(&first[..12])).await;
    assert_eq!(fetched.unwrap().commit, first);
    assert!(!cache.join("new.txt").exists(), "checkout is clean");
    git(&repo.work, &["tag", "v1", &first]);
    git(&repo.work, &["push", "--quiet", "origin", "v1"]);
    let (fetched, _) = fetch(&cache, &repo.file_url(), Some("v1")).await;
    assert_eq!(fetched.unwrap().commit, first);

    // An unknown reference is an error that names it.
    let (fetched, _) = fetch(&cache, &repo.file_url(), Some("no-such-branch")).await;
    let err = fetched.unwrap_err();
    assert!(
        matches!(err, GitError::UnknownReference(ref r) if r == "no-such-branch"),
        "{err}"
    );
}

#[tokio::test]
async fn a_cache_left_locked_by_a_killed_git_still_fetches() {
    let repo = Repo::new();
    repo.write("a", "a\n");
    let first = repo.commit("a");
    let cache = repo.root.join("cache/app");
    fetch(&cache, &repo.file_url(), None).await.0.unwrap();
    std::fs::write(cache.join(".git/index.lock"), "").unwrap();
    std::fs::write(cache.join(".git/shallow.lock"), "").unwrap();
    let (fetched, _) = fetch(&cache, &repo.file_url(), None).await;
    assert_eq!(fetched.unwrap().commit, first);
}

/// Every file under `dir` whose content contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn fetch_over_http_with_credentials_in_the_url_leaves_no_trace() {
    const SECRET: &str = "s3cret-Token-9f2c";
    let repo = Repo::new();
    repo.write("Dockerfile", "FROM stevedore-test/base:1\n");
    fill(&repo, 30, "http");
    let sha = repo.commit("over http");
    let server = serve_git(repo.root.clone(), Some(("deployer", SECRET)), false).await;
    let url = format!("http://deployer:{SECRET}@{}/repo.git", server.addr);
    let cache = repo.root.join("cache/http-app");

    let (fetched, log) = fetch(&cache, &url, Some("main")).await;
    let fetched = fetched.unwrap_or_else(|e| panic!("fetch over http: {e}"));
    assert_eq!(fetched.commit, sha);
    assert!(log.objects_received().is_some(), "{:?}", log.events);
    let requests = server.requests.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.ends_with("authorized=true")),
        "the credential reached the server: {requests:?}"
    );
    // Again, incrementally, with the credential still needed.
    let (fetched, log) = fetch(&cache, &url, None).await;
    assert_eq!(fetched.unwrap().commit, sha);
    assert_eq!(
        log.started().unwrap(),
        (format!("http://{}/repo.git", server.addr), true)
    );

    // No trace: not in the repository (config, FETCH_HEAD, logs, refs), not in events.
    assert_eq!(files_containing(&cache, SECRET), Vec::<PathBuf>::new());
    let config = std::fs::read_to_string(cache.join(".git/config")).unwrap();
    assert!(!config.contains("deployer"), "{config}");
    assert!(!format!("{:?}", log.events).contains(SECRET));

    // A wrong password fails with a message that does not echo it.
    let bad = format!("http://deployer:wrong-{SECRET}@{}/repo.git", server.addr);
    let (fetched, log) = fetch(&repo.root.join("cache/other"), &bad, None).await;
    let err = fetched.unwrap_err().to_string();
    assert!(!err.contains(SECRET), "{err}");
    assert!(!format!("{:?}", log.events).contains(SECRET));
    assert!(err.contains("fetch failed"), "{err}");
}

/// Command lines of running processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(text);
            }
        }
    }
    found
}

#[tokio::test]
async fn cancel_kills_a_hanging_fetch() {
    let repo = Repo::new();
    repo.write("a", "a\n");
    repo.commit("a");
    let server = serve_git(repo.root.clone(), None, true).await;
    let url = format!("http://{}/repo.git", server.addr);
    let cache = repo.root.join("cache/hang");
    let cancel = CancellationToken::new();
    let source = GitSource {
        url: url.clone(),
        reference: None,
        allow_local: false,
    };
    let task = {
        let cancel = cancel.clone();
        let cache = cache.clone();
        tokio::spawn(async move { git::fetch(&cache, &source, &cancel, &mut |_| {}).await })
    };
    // Wait until git is talking to the server.
    let started = Instant::now();
    while server.requests.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "git never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!processes_mentioning(&url).is_empty(), "git runs");
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("cancel returns promptly")
        .unwrap();
    assert!(matches!(result, Err(GitError::Cancelled)), "{result:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(&url);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "git processes left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// builds on the real engine

fn docker_client() -> bollard::Docker {
    bollard::Docker::connect_with_unix(
        "unix:///var/run/docker.sock",
        120,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("docker client")
}

struct Built {
    result: Result<BuildOutcome, BuildError>,
    events: Vec<BuildEvent>,
}

impl Built {
    fn steps(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::Step(s) => Some(format!("{}/{} {}", s.number, s.total, s.instruction)),
                _ => None,
            })
            .collect()
    }
    fn output(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::Output { line, .. } => Some(line.clone()),
                _ => None,
            })
            .collect()
    }
}

async fn run_build(app: &str, commit: &str, dir: &Path) -> Built {
    let docker = docker_client();
    let spec = BuildSpec::new(app, commit, dir.to_owned());
    let cancel = CancellationToken::new();
    let mut events = Vec::new();
    let result = build::build(&docker, &spec, &cancel, &mut |e| events.push(e)).await;
    Built { result, events }
}

fn dockerfile(marker: &str, last: &str) -> String {
    format!("FROM stevedore-test/base:1\nRUN echo preparing {marker} > /prepared\n{last}\n")
}

/// A context directory with a three-step Dockerfile ending in `last` (its RUN step unique
/// to this call, so the first build of it misses the cache).
fn context_with(last: &str) -> tempfile::TempDir {
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile(&marker, last)).unwrap();
    dir
}

#[tokio::test]
async fn build_reports_steps_tags_skips_a_built_commit_and_counts_cached_steps() {
    common::require_docker();
    let app = common::unique_app("src");
    let _images = ImageGuard(app.clone());
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let repo = Repo::new();
    repo.write("Dockerfile", &dockerfile(&marker, "COPY . /app"));
    repo.write("index.html", "hello from the repository\n");
    repo.write(".dockerignore", "secret.txt\n");
    repo.write("secret.txt", "do not send\n");
    let first = repo.commit("first");
    let cache = repo.root.join("cache").join(&app);
    let fetched = git::fetch(
        &cache,
        &GitSource {
            url: repo.file_url(),
            reference: Some("main".into()),
            allow_local: true,
        },
        &CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .unwrap();

    let built = run_build(&app, &fetched.commit, &fetched.worktree).await;
    let outcome = built
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("build: {e}\n{:?}", built.events));
    assert_eq!(
        built.steps(),
        vec![
            "1/3 FROM stevedore-test/base:1".to_owned(),
            format!("2/3 RUN echo preparing {marker} > /prepared"),
            "3/3 COPY . /app".to_owned(),
        ]
    );
    let BuildOutcome::Built {
        tag,
        image_id,
        total_steps,
        cached_steps,
        steps,
    } = outcome
    else {
        panic!("built: {outcome:?}")
    };
    assert_eq!(tag, &format!("stevedore/{app}:{first}"));
    assert_eq!((*total_steps, *cached_steps), (3, 0));
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|s| !s.cached));
    assert!(image_id.starts_with("sha256:"));
    assert!(
        built
            .events
            .iter()
            .any(|e| matches!(e, BuildEvent::Image { .. }))
    );
    assert!(
        built.events.iter().any(|e| matches!(
            e,
            BuildEvent::Context {
                files: 3,
                excluded: 1,
                ..
            }
        )),
        "{:?}",
        built.events
    );
    // The image holds the repository's file and not the ignored one.
    let out = common::docker(&["run", "--rm", tag, "cat", "/app/index.html"]);
    assert_eq!(out, "hello from the repository");
    let out = Command::new("docker")
        .args(["run", "--rm", tag, "ls", "/app"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(!listing.contains("secret.txt"), "{listing}");
    assert!(!listing.contains(".git"), "{listing}");

    // The same commit again: no build.
    let again = run_build(&app, &first, &fetched.worktree).await;
    match again.result.unwrap() {
        BuildOutcome::Skipped {
            tag: t,
            image_id: id,
        } => {
            assert_eq!(&t, tag);
            assert_eq!(&id, image_id);
        }
        other => panic!("expected a skipped build: {other:?}"),
    }
    assert!(matches!(
        again.events.as_slice(),
        [BuildEvent::Skipped { .. }]
    ));

    // A new commit: the RUN before COPY comes from the cache.
    repo.write("index.html", "changed\n");
    let second = repo.commit("second");
    let fetched = git::fetch(
        &cache,
        &GitSource {
            url: repo.file_url(),
            reference: None,
            allow_local: true,
        },
        &CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(fetched.commit, second);
    let built = run_build(&app, &second, &fetched.worktree).await;
    match built.result.as_ref().unwrap() {
        BuildOutcome::Built {
            cached_steps,
            steps,
            ..
        } => {
            assert_eq!(*cached_steps, 1, "{:?}", built.events);
            assert!(steps[1].cached && !steps[2].cached, "{steps:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(built.events.contains(&BuildEvent::Cached { number: 2 }));
    let out = common::docker(&[
        "run",
        "--rm",
        &format!("stevedore/{app}:{second}"),
        "cat",
        "/app/index.html",
    ]);
    assert_eq!(out, "changed");
}

#[tokio::test]
async fn a_failing_run_gives_diagnostics_naming_the_step_and_its_output() {
    common::require_docker();
    let app = common::unique_app("srcfail");
    let _images = ImageGuard(app.clone());
    let dir = context_with(
        "RUN echo compiling main.c && echo 'main.c:3: error: expected ;' >&2 && exit 3",
    );
    let built = run_build(&app, "0000000000000000000000000000000000000001", dir.path()).await;
    let Err(BuildError::Failed(failure)) = &built.result else {
        panic!("expected a failed build: {:?}", built.result)
    };
    let step = failure.step.as_ref().unwrap();
    assert_eq!((step.number, step.total), (3, 3));
    assert!(
        step.instruction.starts_with("RUN echo compiling"),
        "{step:?}"
    );
    assert_eq!(failure.exit_code, Some(3));
    // stdout and stderr are separate streams in the engine: their order may vary.
    let mut tail = failure.log_tail.clone();
    tail.sort();
    assert_eq!(
        tail,
        vec![
            "compiling main.c".to_owned(),
            "main.c:3: error: expected ;".to_owned()
        ]
    );
    let summary = built.result.as_ref().unwrap_err().to_string();
    assert!(
        summary.starts_with("step 3/3 (RUN echo compiling"),
        "{summary}"
    );
    assert!(summary.contains("returned a non-zero code: 3"), "{summary}");
    assert!(built.output().contains(&"compiling main.c".to_owned()));
    let d = failure.diagnostics();
    assert!(d.step.starts_with("step 3/3: RUN"), "{}", d.step);
    // No image under the app's name.
    assert_eq!(
        common::docker(&["images", "-q", &format!("stevedore/{app}")]),
        ""
    );
}

#[tokio::test]
async fn cancel_during_a_slow_run_stops_the_build_and_leaves_no_container() {
    common::require_docker();
    let app = common::unique_app("srccancel");
    let _images = ImageGuard(app.clone());
    let dir = context_with("RUN echo sleeping && sleep 30");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        let spec = BuildSpec::new(
            &app,
            "0000000000000000000000000000000000000002",
            dir.path().to_owned(),
        );
        tokio::spawn(async move {
            let docker = docker_client();
            build::build(&docker, &spec, &cancel, &mut |e| {
                let _ = tx.send(e);
            })
            .await
        })
    };
    // Wait for the slow step's container and its first line.
    let mut container = None;
    let mut saw_output = false;
    let started = Instant::now();
    while container.is_none() || !saw_output {
        let event = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("build events")
            .expect("build still running");
        match event {
            BuildEvent::Running {
                number: 3,
                container: c,
            } => container = Some(c),
            BuildEvent::Output { line, .. } if line == "sleeping" => saw_output = true,
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    let container = container.unwrap();
    let cancelled_at = Instant::now();
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("cancel returns promptly")
        .unwrap();
    assert!(matches!(result, Err(BuildError::Cancelled)), "{result:?}");
    // The engine stops the RUN container and removes it (forcerm).
    loop {
        let out = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                &format!("id={container}"),
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(25),
            "build container {container} still there after cancel"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(25),
        "well before the sleep's 30 s"
    );
    assert_eq!(
        common::docker(&["images", "-q", &format!("stevedore/{app}")]),
        ""
    );
}

#[tokio::test]
async fn a_missing_dockerfile_fails_before_any_build() {
    common::require_docker();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "no dockerfile\n").unwrap();
    let app = common::unique_app("srcnodf");
    let built = run_build(&app, "0000000000000000000000000000000000000003", dir.path()).await;
    let err = built.result.unwrap_err().to_string();
    assert_eq!(
        err,
        "dockerfile \"Dockerfile\" not found in the build context"
    );
}

#[tokio::test]
async fn a_missing_base_image_is_pulled_with_byte_progress() {
    common::require_docker();
    let (base, sizes) = common::push_random_image(3);
    let app = common::unique_app("srcpull");
    let _images = ImageGuard(app.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {base}\nRUN echo on top\n"),
    )
    .unwrap();
    let built = run_build(&app, "0000000000000000000000000000000000000004", dir.path()).await;
    let _ = Command::new("docker").args(["rmi", "-f", &base]).output();
    built
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("build: {e}\n{:?}", built.events));
    // The pull's events come inside step 1, with bytes of the random layer.
    let first_step = built
        .events
        .iter()
        .position(|e| matches!(e, BuildEvent::Step(s) if s.number == 1))
        .unwrap();
    let biggest = *sizes.iter().max().unwrap();
    let downloaded = built.events[first_step..]
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Pull {
                status,
                total: Some(t),
                current: Some(_),
                ..
            } if status == "Downloading" => Some(*t),
            _ => None,
        })
        .max();
    assert_eq!(downloaded, Some(biggest), "{:?}", built.events);
}
