//! Deploys from source through the real engine: a bare git repository over `file://`,
//! built with the classic builder on the real Docker engine, then run and health-checked
//! like any image.

mod common;

use std::time::Duration;

use common::git::{ImageGuard, Repo};
use common::*;
use stevedore::proto::{self, CancelRequest, DeployRequest, GitSource, PortMapping};

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

    let updates = deploy(&mut t.client, source_request(&t.app, &repo.file_url())).await;
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
    let again = deploy(&mut t.client, source_request(&t.app, &repo.file_url())).await;
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
    let mut t = Fixture::start("src-fail").await;
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
    let mut t = Fixture::start("src-cancel").await;
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
