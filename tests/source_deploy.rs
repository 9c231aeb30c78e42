//! Deploys from source through the real engine: a bare git repository served over
//! loopback HTTP by `git http-backend` (or over `file://` on a server started with
//! `--allow-local-git`), built with the classic builder on the real Docker engine, then
//! run and health-checked like any image; and the ETA learned from earlier deployments.

mod common;

use std::time::Duration;

use common::git::{ImageGuard, Repo, serve_git};
use common::*;
use stevedore::events::ObserverRegistry;
use stevedore::proto::{self, CancelRequest, DeployRequest, GitSource, PortMapping};
use tonic::Code;

/// A server that may fetch local repositories (`--allow-local-git`).
async fn local_git_fixture(prefix: &str) -> Fixture {
    Fixture::start_with(
        prefix,
        |c| c.security.allow_local_git = true,
        ObserverRegistry::new(),
    )
    .await
}

/// A request to deploy `url` as `app`, publishing container port 8080.
fn source_request(app: &str, url: &str) -> DeployRequest {
    DeployRequest {
        app: app.into(),
        source: Some(GitSource {
            url: url.into(),
            r#ref: "main".into(),
            ..Default::default()
        }),
        ports: vec![PortMapping {
            container_port: 8080,
            host_port: 0,
            protocol: "tcp".into(),
            ..Default::default()
        }],
        deadline: secs(240),
        ..Default::default()
    }
}

/// A repository whose three-step Dockerfile serves `site/index.html` (unique content,
/// so the first build misses the cache) with busybox httpd.
fn site_repo(content: &str) -> (Repo, String) {
    let repo = Repo::new();
    repo.write("site/index.html", content);
    repo.write(
        "Dockerfile",
        "FROM stevedore-test/base:1\nCOPY site/index.html /var/www/index.html\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/var/www\"]\n",
    );
    let sha = repo.commit("site");
    (repo, sha)
}

fn messages(updates: &[proto::ProgressUpdate], phase: proto::Phase) -> Vec<String> {
    updates
        .iter()
        .filter(|u| u.phase() == phase)
        .map(|u| u.message.clone())
        .collect()
}

#[tokio::test]
async fn a_repository_is_fetched_built_and_served_and_a_built_commit_is_not_built_again() {
    let mut t = Fixture::start("src-site").await;
    let _images = ImageGuard(t.app.clone());
    let content = format!("from source {}\n", uuid::Uuid::new_v4());
    let (repo, sha) = site_repo(&content);
    let git_server = serve_git(repo.root.clone(), None, false).await;
    let repo_url = git_server.url("repo.git");

    let updates = deploy(&mut t.client, source_request(&t.app, &repo_url)).await;
    assert_well_formed(&updates);
    let url = succeeded_url(&updates);
    assert_eq!(
        phases(&updates)[..4],
        [
            proto::Phase::Queued,
            proto::Phase::Validating,
            proto::Phase::Fetching,
            proto::Phase::Building
        ],
        "{:?}",
        phases(&updates)
    );
    assert!(
        !phases(&updates).contains(&proto::Phase::Pulling),
        "a built image is not pulled"
    );
    let fetching = &updates
        .iter()
        .filter(|u| u.phase() == proto::Phase::Fetching)
        .collect::<Vec<_>>();
    assert!(
        fetching
            .iter()
            .any(|u| metadata(u).get("commit") == Some(&sha)),
        "the commit is in the stream"
    );
    let building = messages(&updates, proto::Phase::Building);
    for (n, instruction) in [
        (1, "FROM stevedore-test/base:1"),
        (2, "COPY site/index.html /var/www/index.html"),
        (3, "CMD"),
    ] {
        assert!(
            building
                .iter()
                .any(|m| m.starts_with(&format!("step {n}/3: {instruction}"))),
            "step {n}/3 in {building:#?}"
        );
    }
    let step_progress: Vec<f64> = updates
        .iter()
        .filter(|u| u.phase() == proto::Phase::Building && u.message.starts_with("step "))
        .filter(|u| !u.message.contains("using cache"))
        .map(|u| u.phase_progress)
        .collect();
    assert!(step_progress.windows(2).all(|w| w[0] <= w[1]));
    let end = terminal(&updates);
    assert_eq!(end.result.as_ref().unwrap().commit, sha);
    let status = get_status(&mut t.client, &end.deployment_id).await;
    assert_eq!(status.commit, sha);
    assert_eq!(status.image, format!("stevedore/{}:{sha}", t.app));
    let (code, body) = http_get_eventually(&format!("{url}/index.html")).await;
    assert_eq!((code, body.as_str()), (200, content.as_str()));

    // The same commit again: fetched incrementally, not built again.
    let again = deploy(&mut t.client, source_request(&t.app, &repo_url)).await;
    assert_well_formed(&again);
    succeeded_url(&again);
    assert!(
        again.iter().any(|u| u.phase() == proto::Phase::Building
            && metadata(u).get("build_skipped").map(String::as_str) == Some("true")),
        "{:#?}",
        messages(&again, proto::Phase::Building)
    );
    assert!(
        !messages(&again, proto::Phase::Building)
            .iter()
            .any(|m| m.starts_with("step ")),
        "no step runs for a built commit"
    );
    drop(repo);
    t.stop().await;
}

#[tokio::test]
async fn a_failing_run_ends_failed_naming_the_step_with_its_output() {
    let mut t = local_git_fixture("src-fail").await;
    let _images = ImageGuard(t.app.clone());
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let repo = Repo::new();
    repo.write(
        "Dockerfile",
        &format!("FROM stevedore-test/base:1\nRUN echo out-{marker} && exit 3\n"),
    );
    repo.commit("broken");
    let updates = deploy(&mut t.client, source_request(&t.app, &repo.file_url())).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    let d = end.result.as_ref().unwrap().diagnostics.clone().unwrap();
    assert_eq!(d.failed_phase(), proto::Phase::Building);
    assert!(d.step.starts_with("step 2/2: RUN echo out-"), "{}", d.step);
    assert_eq!(d.exit_code, Some(3));
    assert!(
        d.log_tail
            .iter()
            .any(|l| l.contains(&format!("out-{marker}"))),
        "{:?}",
        d.log_tail
    );
    assert!(end.message.contains("step 2/2"), "{}", end.message);
    assert!(app_containers(&t.app).is_empty());
    t.stop().await;
}

/// Containers (any state) whose command mentions `needle`.
fn containers_running(needle: &str) -> Vec<String> {
    docker(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Command}}"])
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn cancel_during_a_build_stops_it_and_leaves_nothing_behind() {
    let mut t = local_git_fixture("src-cancel").await;
    let _images = ImageGuard(t.app.clone());
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let repo = Repo::new();
    repo.write(
        "Dockerfile",
        &format!("FROM stevedore-test/base:1\nRUN echo {marker} && sleep 30\n"),
    );
    repo.commit("slow");
    let mut stream = deploy_stream(&mut t.client, source_request(&t.app, &repo.file_url())).await;
    let seen = stream
        .until(|u| u.phase() == proto::Phase::Building && u.message.starts_with("step 2/2"))
        .await;
    let id = seen[0].deployment_id.clone();
    eventually(STATE_LIMIT, "the RUN container", || {
        (!containers_running(&marker).is_empty()).then_some(())
    })
    .await;
    t.client
        .cancel_deployment(CancelRequest {
            deployment_id: id.clone(),
        })
        .await
        .expect("cancel");
    let rest = stream.rest().await;
    let end = rest.last().unwrap();
    assert_eq!(end.phase(), proto::Phase::Cancelled, "{}", end.message);
    // Well before the sleep would end.
    eventually(Duration::from_secs(20), "the build container gone", || {
        containers_running(&marker).is_empty().then_some(())
    })
    .await;
    assert!(deployment_containers(&id).is_empty());
    assert!(app_containers(&t.app).is_empty());
    t.stop().await;
}

/// A repository whose Dockerfile has six steps: FROM, three steps that do not depend on
/// the site (unique per test, so the first build misses the cache), then the COPY of the
/// site and the CMD. A commit that changes only the site rebuilds the last two.
fn layered_repo(marker: &str, content: &str) -> Repo {
    let repo = Repo::new();
    repo.write("site/index.html", content);
    repo.write(
        "Dockerfile",
        &format!(
            "FROM stevedore-test/base:1\nRUN echo {marker} > /build-marker\nRUN mkdir -p /var/www\nENV SITE_ROOT=/var/www\nCOPY site/index.html /var/www/index.html\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/var/www\"]\n"
        ),
    );
    repo
}

#[tokio::test]
async fn a_new_commit_builds_with_its_cached_steps_counted_and_an_eta_per_step() {
    let mut t = Fixture::start("src-cache").await;
    let _images = ImageGuard(t.app.clone());
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let repo = layered_repo(&marker, "first\n");
    repo.commit("first");
    let git_server = serve_git(repo.root.clone(), None, false).await;
    let url = git_server.url("repo.git");

    let first = deploy(&mut t.client, source_request(&t.app, &url)).await;
    succeeded_url(&first);
    assert!(first.iter().all(|u| u.eta.is_none()), "no history yet");

    // Only the site changes: steps 2–4 come from the cache, 5 and 6 are built.
    repo.write("site/index.html", "second\n");
    let sha = repo.commit("second");
    let second = deploy(&mut t.client, source_request(&t.app, &url)).await;
    assert_well_formed(&second);
    let served = succeeded_url(&second);
    let building: Vec<&proto::ProgressUpdate> = second
        .iter()
        .filter(|u| u.phase() == proto::Phase::Building)
        .collect();
    let trace: Vec<String> = building
        .iter()
        .map(|u| {
            let eta = u.eta.as_ref().map(|e| e.basis.as_str()).unwrap_or("-");
            format!("{} | {eta}", u.message)
        })
        .collect();
    for n in 2..=4 {
        assert!(
            building
                .iter()
                .any(|u| u.message == format!("step {n}/6: using cache")),
            "step {n} cached: {trace:#?}"
        );
    }
    let built = building
        .iter()
        .find(|u| u.message.starts_with("built "))
        .unwrap_or_else(|| panic!("{trace:#?}"));
    assert!(
        built.message.ends_with("6 steps, 3 from cache"),
        "{}",
        built.message
    );
    assert_eq!(
        metadata(built).get("cached_steps").map(String::as_str),
        Some("3")
    );
    // Every update of the build has an estimate; the steps' rest on the per-step history.
    assert!(building.iter().all(|u| u.eta.is_some()), "{trace:#?}");
    let at_step = |n: u32| {
        building
            .iter()
            .find(|u| u.message.starts_with(&format!("step {n}/6: ")))
            .and_then(|u| u.eta.clone())
            .unwrap_or_else(|| panic!("step {n}: {trace:#?}"))
    };
    // The only build before built every step: none is expected cached until the
    // builder says so.
    let eta = at_step(2);
    assert!(
        eta.basis
            .contains("build: step 2/6, 4 left, 0 expected cached"),
        "{trace:#?}"
    );
    assert_eq!(eta.samples, 1);
    let eta = at_step(6);
    assert!(eta.basis.contains("build: step 6/6, 0 left"), "{trace:#?}");
    assert!(
        secs_of(&eta.low) <= secs_of(&eta.remaining)
            && secs_of(&eta.remaining) <= secs_of(&eta.high)
    );
    let at_accept = second[0].eta.clone().expect("an estimate at once");
    eprintln!(
        "new commit, cached steps: estimated {:.2}s [{:.2}s, {:.2}s] at accept, took {:.2}s (the first deploy: {:.2}s)\n{}",
        secs_of(&at_accept.remaining),
        secs_of(&at_accept.low),
        secs_of(&at_accept.high),
        secs_of(&terminal(&second).elapsed),
        secs_of(&terminal(&first).elapsed),
        at_accept.basis
    );
    assert_eq!(terminal(&second).result.as_ref().unwrap().commit, sha);
    let (code, body) = http_get_eventually(&format!("{served}/index.html")).await;
    assert_eq!((code, body.as_str()), (200, "second\n"));
    t.stop().await;
}

#[tokio::test]
async fn local_repositories_need_allow_local_git_and_other_schemes_are_refused() {
    let t = Fixture::start("src-scheme").await;
    let mut client = t.client.clone();
    let repo = Repo::new();
    repo.write("Dockerfile", "FROM stevedore-test/base:1\n");
    repo.commit("local");
    let refused = |url: String| {
        let mut client = client.clone();
        let req = source_request(&t.app, &url);
        async move { client.deploy(req).await.expect_err(&url) }
    };
    for url in [repo.file_url(), repo.bare.display().to_string()] {
        let err = refused(url).await;
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().starts_with("source.url: "), "{err:?}");
        assert!(err.message().contains("--allow-local-git"), "{err:?}");
    }
    for url in [
        "ext::sh",
        "ftp://127.0.0.1/repo.git",
        "ssh://-oProxyCommand=x/r",
    ] {
        let err = refused(url.to_owned()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
        assert!(err.message().starts_with("source.url: "), "{err:?}");
    }
    let list = client
        .list_deployments(proto::ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.deployments.is_empty(), "nothing was deployed");
    t.stop().await;
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test]
async fn a_url_with_credentials_leaves_no_trace() {
    const SECRET: &str = "tok-9f2c41e7d3b8";
    let mut t = Fixture::start("src-cred").await;
    // Nothing listens there: the fetch fails, and its error must not echo the token.
    let url = format!("http://deployer:{SECRET}@127.0.0.1:9/repo.git");
    let updates = deploy(&mut t.client, source_request(&t.app, &url)).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert_eq!(
        end.result
            .as_ref()
            .unwrap()
            .diagnostics
            .as_ref()
            .unwrap()
            .failed_phase(),
        proto::Phase::Fetching
    );
    let text = format!("{updates:?}");
    assert!(!text.contains(SECRET), "a token in the updates");
    assert!(
        text.contains("***@127.0.0.1:9"),
        "the URL is shown redacted"
    );
    let status = get_status(&mut t.client, &end.deployment_id).await;
    assert!(!format!("{status:?}").contains(SECRET));
    let data_dir = t.server.data_dir.path().to_owned();
    // The store (database or its WAL) and the audit log hold the redacted URL …
    eventually(STATE_LIMIT, "the redacted URL on disk", || {
        (files_containing(&data_dir, "***@127.0.0.1:9").len() >= 2).then_some(())
    })
    .await;
    // … and nothing on disk holds the token (the git cache included).
    assert!(
        files_containing(&data_dir, SECRET).is_empty(),
        "the token is in {:?}",
        files_containing(&data_dir, SECRET)
    );
    t.stop().await;
}

// ---------------------------------------------------------------------------------------
// ETA

/// web:1 (present locally, so no pull) with a hook that sleeps `sleep` seconds: a
/// deployment that takes a fixed time more than its Docker calls.
fn timed_request(app: &str, sleep: u32) -> DeployRequest {
    DeployRequest {
        hooks: vec![proto::Hook {
            name: "wait".into(),
            command: vec!["sh".into(), "-c".into(), format!("sleep {sleep}")],
            tty: false,
            timeout: secs(60),
        }],
        ..web_request(app, "stevedore-test/web:1")
    }
}

async fn start_server(dir: &std::path::Path) -> stevedore::server::RunningServer {
    stevedore::server::start(
        serve_config(dir),
        stevedore::events::ObserverRegistry::new(),
    )
    .await
    .expect("server starts")
}

fn secs_of(d: &Option<pbjson_types::Duration>) -> f64 {
    let d = d.as_ref().expect("a duration");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

#[tokio::test]
async fn the_eta_is_learned_from_earlier_deployments_survives_a_restart_and_flags_overdue() {
    require_docker();
    let app = unique_app("eta");
    let _guard = AppGuard(app.clone());
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let mut client = connect(server.grpc_addr).await;

    let first = deploy(&mut client, timed_request(&app, 3)).await;
    succeeded_url(&first);
    assert!(
        first.iter().all(|u| u.eta.is_none()),
        "no estimate without history"
    );
    for _ in 0..2 {
        let updates = deploy(&mut client, timed_request(&app, 3)).await;
        succeeded_url(&updates);
        let without: Vec<_> = updates[..updates.len() - 1]
            .iter()
            .filter(|u| u.eta.is_none())
            .map(|u| (u.sequence, u.phase(), u.message.clone()))
            .collect();
        assert!(
            without.is_empty(),
            "updates without an estimate: {without:?}"
        );
    }
    server.stop().await.expect("clean shutdown");

    // After a restart, the history is read back from the store.
    let server = start_server(dir.path()).await;
    let mut client = connect(server.grpc_addr).await;
    let fourth = deploy(&mut client, timed_request(&app, 3)).await;
    succeeded_url(&fourth);
    let eta = fourth[0]
        .eta
        .clone()
        .expect("an estimate on the first update");
    let actual = secs_of(&terminal(&fourth).elapsed);
    let (remaining, low, high) = (
        secs_of(&eta.remaining),
        secs_of(&eta.low),
        secs_of(&eta.high),
    );
    eprintln!("eta: {remaining:.2}s [{low:.2}s, {high:.2}s], actual {actual:.2}s");
    assert!(low <= remaining && remaining <= high, "{eta:?}");
    assert!(
        (remaining - actual).abs() <= actual * 0.25,
        "estimated {remaining:.2}s, took {actual:.2}s ({eta:?})"
    );
    assert_eq!(eta.samples, 3);
    assert!(eta.basis.contains("3 earlier deployments"), "{}", eta.basis);
    assert!(!eta.overdue);
    let status = get_status(&mut client, &fourth[0].deployment_id).await;
    assert!(status.eta.is_none(), "no estimate once ended");

    // Much slower than its history: overdue.
    let slow = deploy(&mut client, timed_request(&app, 12)).await;
    succeeded_url(&slow);
    assert!(
        slow.iter()
            .any(|u| u.eta.as_ref().is_some_and(|e| e.overdue)),
        "a deployment slower than any earlier one is overdue"
    );
    server.stop().await.expect("clean shutdown");
}

/// The pull of an app's earlier deployment (its bytes and time, kept in the store across
/// a restart) gives the throughput the next pull is estimated with, by its bytes left.
#[tokio::test]
async fn a_pull_is_estimated_by_its_bytes_left_and_the_throughput_measured_before() {
    require_docker();
    let app = unique_app("eta-pull");
    let _guard = AppGuard(app.clone());
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = push_random_image(6);
    // About 2 MiB/s: the pull takes seconds, with several updates.
    let proxy = throttled_registry(2 * 1024 * 1024).await;
    let image = image.replacen(&registry(), &proxy.to_string(), 1);

    let server = start_server(dir.path()).await;
    let mut client = connect(server.grpc_addr).await;
    let first = deploy(&mut client, web_request(&app, &image)).await;
    succeeded_url(&first);
    server.stop().await.expect("clean shutdown");

    // Pulled again after a restart: the image is gone locally (with the container
    // that ran it).
    let running = app_containers(&app);
    let mut rm = vec!["rm", "-f"];
    rm.extend(running.iter().map(String::as_str));
    docker(&rm);
    docker(&["rmi", &image]);
    let server = start_server(dir.path()).await;
    let mut client = connect(server.grpc_addr).await;
    let second = deploy(&mut client, web_request(&app, &image)).await;
    succeeded_url(&second);
    let with_bytes: Vec<(u64, proto::Eta)> = second
        .iter()
        .filter(|u| u.phase() == proto::Phase::Pulling)
        .filter_map(|u| Some((u.pull.as_ref()?.image_current_bytes, u.eta.clone()?)))
        .collect();
    let trace: Vec<String> = with_bytes
        .iter()
        .map(|(b, e)| format!("{b} bytes: {:.2}s | {}", secs_of(&e.remaining), e.basis))
        .collect();
    let by_bytes: Vec<&proto::Eta> = with_bytes
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e.basis.contains("MiB left at") && e.basis.contains("measured over 1 pull"))
        .collect();
    assert!(by_bytes.len() >= 2, "{trace:#?}");
    for e in &by_bytes {
        let (low, mid, high) = (secs_of(&e.low), secs_of(&e.remaining), secs_of(&e.high));
        assert!(low <= mid && mid <= high, "{e:?}");
    }
    // The bytes left shrink: so does the estimate.
    let first_left = secs_of(&by_bytes[0].remaining);
    let last_left = secs_of(&by_bytes.last().unwrap().remaining);
    assert!(last_left < first_left, "{trace:#?}");
    let pulling_started = second
        .iter()
        .find(|u| u.phase() == proto::Phase::Pulling)
        .unwrap();
    let pulled = second
        .iter()
        .find(|u| metadata(u).get("pulled").map(String::as_str) == Some("true"))
        .unwrap();
    eprintln!(
        "pull: estimated {first_left:.2}s left at the first update with bytes; the phase took {:.2}s\n{trace:#?}",
        secs_of(&pulled.elapsed) - secs_of(&pulling_started.elapsed)
    );
    server.stop().await.expect("clean shutdown");
    let _ = std::process::Command::new("docker")
        .args(["rmi", &image])
        .output();
}
