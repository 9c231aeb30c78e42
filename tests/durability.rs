//! Deployments and their updates survive disconnects, slow readers, cancels and
//! restarts. Real server, real Docker engine, real registry.

mod common;

use std::time::Duration;

use common::*;
use stevedore::proto::{
    self, CancelRequest, DeployRequest, ListDeploymentsRequest, ProgressUpdate,
};
use tonic::Code;

const WEB1: &str = "stevedore-test/web:1";
const WEB2: &str = "stevedore-test/web:2";
const SLOWHEALTH: &str = "stevedore-test/slowhealth:1";

/// Starts a deploy and reads its stream until `until` holds for an update; returns the
/// updates read and the open stream.
async fn deploy_until(
    client: &mut Client,
    req: DeployRequest,
    until: impl Fn(&ProgressUpdate) -> bool,
) -> (Vec<ProgressUpdate>, Updates) {
    let mut stream = deploy_stream(client, req).await;
    (stream.until(until).await, stream)
}

fn in_phase(phase: proto::Phase) -> impl Fn(&ProgressUpdate) -> bool {
    move |u| u.phase() == phase
}

async fn assert_serves(url: &str, body: &str) {
    let (code, text) = http_get(url).await;
    assert_eq!((code, text.trim()), (200, body), "GET {url}");
}

fn sequences(updates: &[ProgressUpdate]) -> Vec<u64> {
    updates.iter().map(|u| u.sequence).collect()
}

/// An image reference that no registry holds: its deployment fails fast in PULLING.
fn missing_image() -> String {
    format!(
        "{}/stevedore-test/missing-{}:1",
        registry(),
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_deploy_stream_resumes_with_watch_exactly_once() {
    let t = Fixture::start("resume").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let (first, stream) =
        deploy_until(&mut client, web_request(&app, WEB1), |u| u.sequence == 3).await;
    drop(stream);
    let id = first[0].deployment_id.clone();

    let rest = watch(&mut client, &id, 3).await.expect("watch from 3");
    assert!(!rest.is_empty());
    let expected: Vec<u64> = (4..4 + rest.len() as u64).collect();
    assert_eq!(sequences(&rest), expected, "none missing or repeated");
    assert_eq!(terminal(&rest).phase(), proto::Phase::Complete);

    let mut joined = first.clone();
    joined.extend(rest);
    assert_well_formed(&joined);
    let full = watch(&mut client, &id, 0).await.unwrap();
    assert_eq!(full, joined, "the log replays the same updates");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_watchers_get_identical_logs_and_a_stalled_one_catches_up() {
    // A 2-update buffer per watcher: the deployment's 20-30 updates outgrow it.
    let t = Fixture::start_with(
        "watchers",
        |c| c.watch_buffer = 2,
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let (first, mut deploy_stream) =
        deploy_until(&mut client, web_request(&app, WEB1), |_| true).await;
    let id = first[0].deployment_id.clone();

    // A watcher that reads one update, then nothing until the deployment has ended.
    let mut stalled = watch_stream(&mut client, &id, 0).await.unwrap();
    let stalled_first = stalled.next_update().await;

    // A watcher slower than the deployment: with a 2-update buffer its backlog outgrows
    // the buffer, so the server blocks on it and it reads the rest from the log.
    let mut slow = watch_stream(&mut client, &id, 0).await.unwrap();
    let slow_reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(u) = slow.next().await.expect("the slow watcher ends cleanly") {
            got.push(u);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        got
    });

    // 200 watchers over 8 connections (a connection carries at most 200 streams).
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(t.server.client().await);
    }
    let mut watchers = Vec::new();
    for i in 0..200 {
        let mut c = clients[i % clients.len()].clone();
        let id = id.clone();
        watchers.push(tokio::spawn(async move { watch(&mut c, &id, 0).await }));
    }

    let (rest, end) = deploy_stream.drain().await;
    assert!(end.is_none(), "{end:?}");
    let mut reference = first;
    reference.extend(rest);
    assert_well_formed(&reference);
    assert_eq!(terminal(&reference).phase(), proto::Phase::Complete);

    for w in watchers {
        let log = w.await.unwrap().expect("watch ends cleanly");
        assert_eq!(log, reference, "every watcher gets the same gap-free log");
    }

    // The deployment finished while the stalled watcher read nothing; it now reads
    // the rest from the log, none missing or repeated.
    assert_eq!(
        status(&mut client, &id).await.unwrap().state(),
        proto::DeploymentState::Succeeded
    );
    let (stalled_rest, end) = stalled.drain().await;
    assert!(end.is_none(), "{end:?}");
    let mut stalled_log = vec![stalled_first];
    stalled_log.extend(stalled_rest);
    assert_eq!(stalled_log, reference);
    // The slow watcher got every update once, in order (Updates checks each sequence
    // as it arrives), and it was still reading when the deployment ended.
    let slow_log = slow_reader.await.unwrap();
    assert_eq!(slow_log, reference);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_history_and_ends_interrupted_deployments() {
    require_docker();
    let app = unique_app("restart");
    let _guard = AppGuard(app.clone());
    let data = tempfile::tempdir().unwrap();

    // --- first server: a deployment succeeds, another is in flight at SIGTERM.
    let a = BinaryServer::spawn(data.path(), &["--shutdown-grace", "1s"]);
    let mut client = connect(a.grpc_addr).await;
    let mut v1_req = web_request(&app, WEB1);
    v1_req.idempotency_key = "v1".into();
    let v1_log = deploy(&mut client, v1_req.clone()).await;
    assert_well_formed(&v1_log);
    let v1_end = terminal(&v1_log).clone();
    assert_eq!(v1_end.phase(), proto::Phase::Complete);
    let v1 = v1_end.deployment_id.clone();
    let v1_url = endpoint(&v1_end);
    let v1_status = status(&mut client, &v1).await.unwrap();

    let (seen, mut s_stream) = deploy_until(
        &mut client,
        web_request(&app, SLOWHEALTH),
        in_phase(proto::Phase::HealthCheck),
    )
    .await;
    let s = seen[0].deployment_id.clone();
    assert_eq!(deployment_containers(&s).len(), 1);
    let pid = a.child.id().to_string();
    signal(&["-TERM", &pid]);
    let (more, end) = s_stream.drain().await;
    let end = end.expect("the stream ends with a status on shutdown");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let last_seen = more.last().unwrap_or(seen.last().unwrap()).sequence;
    assert!(
        end.message()
            .contains(&format!("after_sequence={last_seen}")),
        "{}",
        end.message()
    );
    let mut a = a;
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit:?}");
    assert!(
        deployment_containers(&s).is_empty(),
        "the deployment interrupted at shutdown rolled back"
    );

    // --- second server: history answers unchanged; resume the interrupted stream.
    let b = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(b.grpc_addr).await;
    assert_eq!(status(&mut client, &v1).await.unwrap(), v1_status);
    assert_eq!(watch(&mut client, &v1, 0).await.unwrap(), v1_log);
    let rest = watch(&mut client, &s, last_seen).await.unwrap();
    assert_eq!(rest.first().unwrap().sequence, last_seen + 1);
    let s_end = terminal(&rest);
    assert_eq!(s_end.phase(), proto::Phase::Failed);
    assert!(
        s_end.message.contains("interrupted by server shutdown"),
        "{}",
        s_end.message
    );
    let listed: Vec<String> = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deployments
        .into_iter()
        .map(|d| d.deployment_id)
        .collect();
    assert_eq!(listed, vec![s.clone(), v1.clone()], "newest first");
    // An idempotent retry after the restart replays the same deployment.
    let retry = deploy(&mut client, v1_req).await;
    assert_eq!(retry, v1_log);
    assert_eq!(app_containers(&app).len(), 1);

    // A deployment in flight when the process is killed (-9).
    let (seen, _stream) = deploy_until(
        &mut client,
        web_request(&app, SLOWHEALTH),
        in_phase(proto::Phase::HealthCheck),
    )
    .await;
    let v2 = seen[0].deployment_id.clone();
    assert_eq!(deployment_containers(&v2).len(), 1);
    // Another deployment of the app, queued behind it.
    let mut queued_client = client.clone();
    let (queued_seen, _queued_stream) =
        deploy_until(&mut queued_client, web_request(&app, WEB2), |_| true).await;
    let queued = queued_seen[0].deployment_id.clone();
    assert_eq!(
        status(&mut client, &queued).await.unwrap().state(),
        proto::DeploymentState::Pending
    );
    // kill -9 loses what the store's writer has not committed yet (a few ms, see
    // DURABILITY.md); give it time so the queued deployment is on disk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = b;
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();

    // A container of another server (its deployment is in no store here) must be left
    // alone by the recovery.
    let stranger_app = unique_app("stranger");
    let _stranger_guard = AppGuard(stranger_app.clone());
    let stranger = docker(&[
        "run",
        "-d",
        "--label",
        &format!("io.stevedore.app={stranger_app}"),
        "--label",
        &format!("io.stevedore.deployment={}", uuid::Uuid::new_v4()),
        "stevedore-test/sleeper:1",
    ]);

    // --- third server: the killed deployment ended FAILED, its container gone, the
    // previous version still serving, and the app's queue free.
    let c = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(c.grpc_addr).await;
    let v2_status = status(&mut client, &v2).await.unwrap();
    assert_eq!(v2_status.state(), proto::DeploymentState::Failed);
    assert!(
        v2_status.error.contains("interrupted by a restart")
            && v2_status
                .error
                .contains("the app's previous version keeps running"),
        "{}",
        v2_status.error
    );
    let v2_log = watch(&mut client, &v2, 0).await.unwrap();
    assert_well_formed(&v2_log);
    assert_eq!(terminal(&v2_log).phase(), proto::Phase::Failed);
    assert!(deployment_containers(&v2).is_empty());
    let v1_containers = deployment_containers(&v1);
    assert_eq!(v1_containers.len(), 1, "v1 still has its container");
    assert_eq!(app_containers(&app), v1_containers);
    assert_serves(&v1_url, "v1").await;
    assert_eq!(status(&mut client, &v1).await.unwrap(), v1_status);
    // Nothing stays queued after a restart: the queued deployment ended FAILED too.
    assert_eq!(
        status(&mut client, &queued).await.unwrap().state(),
        proto::DeploymentState::Failed
    );
    let queued_log = watch(&mut client, &queued, 0).await.unwrap();
    assert_well_formed(&queued_log);
    assert_eq!(terminal(&queued_log).phase(), proto::Phase::Failed);
    assert_eq!(
        app_containers(&stranger_app),
        vec![stranger.clone()],
        "another server's container was left alone"
    );

    let v3_log = deploy(&mut client, web_request(&app, WEB2)).await;
    let v3_end = terminal(&v3_log);
    assert_eq!(v3_end.phase(), proto::Phase::Complete, "{}", v3_end.message);
    assert_serves(&endpoint(v3_end), "v2").await;
    drop(c);
}

/// SIGTERM with a deployment running and time left in the grace: the open stream ends
/// with UNAVAILABLE and the resume point, a new Deploy is refused with UNAVAILABLE,
/// and the running deployment finishes (SUCCEEDED, its version serving) before the
/// process exits cleanly. The next server reports it finished, not interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_a_running_deployment_finish_within_the_grace() {
    require_docker();
    let app = unique_app("grace");
    let _guard = AppGuard(app.clone());
    let data = tempfile::tempdir().unwrap();
    let a = BinaryServer::spawn(data.path(), &["--shutdown-grace", "120s"]);
    let mut client = connect(a.grpc_addr).await;
    let mut req = web_request(&app, WEB2);
    // Long enough that the late Deploy below reaches the server while it is still
    // draining, not after it exited (a loaded machine can take seconds per call).
    req.hooks = vec![proto::Hook {
        name: "wait".into(),
        command: vec!["sleep".into(), "12".into()],
        tty: false,
        timeout: secs(60),
    }];
    let (seen, mut stream) = deploy_until(&mut client, req, in_phase(proto::Phase::Hooks)).await;
    let id = seen[0].deployment_id.clone();
    signal(&["-TERM", &a.child.id().to_string()]);
    let (_, end) = stream.drain().await;
    let end = end.expect("the stream ends with a status on shutdown");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let late = unique_app("grace-late");
    let _late_guard = AppGuard(late.clone());
    let refused = client
        .deploy(web_request(&late, WEB1))
        .await
        .expect_err("a deploy during shutdown was accepted");
    // UNAVAILABLE from the server; or, when the server's HTTP/2 GOAWAY closed the
    // idle connection before the call went out, the client's own "connection
    // closed" (CANCELLED); or, when the GOAWAY crossed the call on the wire, the
    // client's transport error naming it (INTERNAL, "GoAway(…, NO_ERROR, Remote)").
    // Either way nothing was started.
    let crossed_goaway =
        refused.code() == Code::Internal && format!("{refused:?}").contains("GoAway");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::Cancelled) || crossed_goaway,
        "{refused:?}"
    );
    assert!(
        app_containers(&late).is_empty(),
        "the late deploy started nothing"
    );
    let mut a = a;
    let exit = a.child.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit:?}");
    assert_eq!(
        app_containers(&app),
        deployment_containers(&id),
        "the finished deployment's container is the app's"
    );
    assert_eq!(app_containers(&app).len(), 1);

    let b = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(b.grpc_addr).await;
    let finished = status(&mut client, &id).await.unwrap();
    assert_eq!(
        finished.state(),
        proto::DeploymentState::Succeeded,
        "{}",
        finished.error
    );
    let log = watch(&mut client, &id, 0).await.unwrap();
    assert_well_formed(&log);
    assert_eq!(terminal(&log).phase(), proto::Phase::Complete);
}

/// `kill ARGS` (a signal to a process this test started).
fn signal(args: &[&str]) {
    let ok = std::process::Command::new("kill")
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {args:?}");
}

/// A registry that stops sending in the middle of a blob fails the deployment in
/// PULLING once the pull has been silent for `--docker-timeout`, with a message
/// naming the stall, long before the deployment's own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_that_stalls_mid_blob_fails_naming_the_stall() {
    require_docker();
    let (image, _) = push_random_image(24);
    // Manifest and config are a few KiB: 8 MiB ends inside the 24 MiB layer.
    let proxy = stalling_registry(8 * 1024 * 1024).await;
    let image = image.replacen(&registry(), &proxy.to_string(), 1);
    let app = unique_app("stall");
    let _guard = AppGuard(app.clone());
    let server = TestServer::start_with(
        |c| c.docker_timeout = Duration::from_secs(8),
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let mut client = server.client().await;
    // The request's deadline is 120 s: the stall must end it first.
    let log = deploy(&mut client, web_request(&app, &image)).await;
    assert_well_formed(&log);
    assert!(
        log.iter().any(|u| u.pull.as_ref().is_some_and(|p| {
            p.image_current_bytes > 0 && p.image_current_bytes < p.image_total_bytes
        })),
        "the pull had started sending the layer before it stalled"
    );
    let end = terminal(&log);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert!(
        end.message
            .contains("image pull (no progress) timed out after 8s"),
        "{}",
        end.message
    );
    let d = end.result.clone().unwrap().diagnostics.unwrap();
    assert_eq!(d.failed_phase(), proto::Phase::Pulling);
    assert!(app_containers(&app).is_empty());
    server.stop().await;
}

/// Cancels the deployment in `phase` (reached when `reached` holds) with a deploy of
/// WEB2 queued behind it; checks everything the issue asks of a cancel.
async fn cancel_scenario(image: String, reached: impl Fn(&ProgressUpdate) -> bool) {
    let app = unique_app("cancel");
    let _guard = AppGuard(app.clone());
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let v1_log = deploy(&mut client, web_request(&app, WEB1)).await;
    let v1_end = terminal(&v1_log).clone();
    assert_eq!(v1_end.phase(), proto::Phase::Complete);
    let v1_url = endpoint(&v1_end);
    // Cancelling a finished deployment is refused.
    let err = client
        .cancel_deployment(CancelRequest {
            deployment_id: v1_end.deployment_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let (seen, mut stream) = deploy_until(&mut client, web_request(&app, &image), reached).await;
    let id = seen[0].deployment_id.clone();
    let phase = seen.last().unwrap().phase();

    // A deploy of the same app queued behind it.
    let mut queued_client = client.clone();
    let queued_req = web_request(&app, WEB2);
    let (_, mut queued_stream) = deploy_until(&mut queued_client, queued_req, |u| {
        metadata(u).get("queue_position").map(String::as_str) == Some("1")
    })
    .await;
    let queued = tokio::spawn(async move { queued_stream.drain().await });

    let cancelled = client
        .cancel_deployment(CancelRequest {
            deployment_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(cancelled.state(), proto::DeploymentState::Cancelled);
    // The previous version is still serving once the cancel is done.
    assert_serves(&v1_url, "v1").await;
    assert!(deployment_containers(&id).is_empty(), "nothing left behind");

    let (rest, end) = stream.drain().await;
    assert!(end.is_none(), "{end:?}");
    let mut log = seen;
    log.extend(rest);
    assert_well_formed(&log);
    let cancelling: Vec<_> = log
        .iter()
        .filter(|u| u.message.starts_with("cancel requested"))
        .collect();
    assert_eq!(
        cancelling.len(),
        1,
        "the stream shows the cancel being carried out"
    );
    assert_eq!(cancelling[0].phase(), phase);
    assert_eq!(terminal(&log).phase(), proto::Phase::Cancelled);

    // The queue moves on: the queued deploy runs, replacing v1 (still running until then).
    let (rest, end) = queued.await.unwrap();
    assert!(end.is_none(), "{end:?}");
    let queued_end = terminal(&rest);
    assert_eq!(
        queued_end.phase(),
        proto::Phase::Complete,
        "{}",
        queued_end.message
    );
    assert!(
        rest.iter().any(|u| u
            .message
            .contains(&format!("(deployment {})", v1_end.deployment_id))),
        "the queued deploy took the still-running v1 out"
    );
    assert_serves(&endpoint(queued_end), "v2").await;
    assert_eq!(app_containers(&app).len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_during_pull() {
    require_docker();
    let (image, _) = push_random_image(24);
    // Pull through a proxy sending 4 MB/s: the 24 MB layer takes about 6 s.
    let proxy = throttled_registry(4 * 1024 * 1024).await;
    let image = image.replacen(&registry(), &proxy.to_string(), 1);
    cancel_scenario(image, |u| {
        u.pull.as_ref().is_some_and(|p| {
            p.image_current_bytes > 0 && p.image_current_bytes < p.image_total_bytes
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_during_health_check() {
    require_docker();
    cancel_scenario(SLOWHEALTH.into(), |u| {
        u.phase() == proto::Phase::HealthCheck && u.message.starts_with("health check attempt")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_removes_history_with_clear_codes() {
    let t = Fixture::start_with(
        "retention",
        |c| {
            c.retention_max_deployments = Some(2);
            c.retention_max_log_updates = Some(3);
        },
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let log = deploy(&mut client, web_request(&app, &missing_image())).await;
        assert_eq!(terminal(&log).phase(), proto::Phase::Failed);
        ids.push(log[0].deployment_id.clone());
    }
    // Retention runs by itself after each deployment (no manual call here): the oldest
    // deployment goes, NOT_FOUND, saying why it may be.
    let err = eventually_async(
        STATE_LIMIT,
        "retention to remove the oldest deployment",
        || {
            let mut client = client.clone();
            let id = ids[0].clone();
            async move { status(&mut client, &id).await.err() }
        },
    )
    .await;
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("retention"), "{}", err.message());
    assert_eq!(
        watch(&mut client, &ids[0], 0).await.unwrap_err().code(),
        Code::NotFound
    );

    // The newest keeps its status and the last 3 updates of its log.
    eventually_async(STATE_LIMIT, "retention to trim the newest log", || {
        let mut client = client.clone();
        let id = ids[2].clone();
        async move { (watch(&mut client, &id, 0).await.err()?.code() == Code::OutOfRange).then_some(()) }
    })
    .await;
    let last = status(&mut client, &ids[2]).await.unwrap();
    assert_eq!(last.state(), proto::DeploymentState::Failed);
    let n = last.last_sequence;
    let err = watch(&mut client, &ids[2], 0).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message()
            .contains(&format!("the oldest held is {}", n - 2)),
        "{}",
        err.message()
    );
    let tail = watch(&mut client, &ids[2], n - 3).await.unwrap();
    assert_eq!(sequences(&tail), vec![n - 2, n - 1, n]);
    assert_eq!(terminal(&tail).phase(), proto::Phase::Failed);

    let listed = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deployments;
    assert_eq!(listed.len(), 2);
    t.stop().await;
}

/// `--retention-max-age` on the binary: a deployment older than the limit goes when the
/// next deployment ends, without any manual call; the young one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_max_age_removes_old_deployments_by_itself() {
    require_docker();
    let app = unique_app("max-age");
    let _guard = AppGuard(app.clone());
    let data = tempfile::tempdir().unwrap();
    let server = BinaryServer::spawn(data.path(), &["--retention-max-age", "8s"]);
    let mut client = connect(server.grpc_addr).await;
    let old = deploy(&mut client, web_request(&app, &missing_image())).await;
    let old = old[0].deployment_id.clone();
    assert!(status(&mut client, &old).await.is_ok());
    tokio::time::sleep(Duration::from_secs(9)).await;
    let young = deploy(&mut client, web_request(&app, &missing_image())).await;
    let young = young[0].deployment_id.clone();
    let err = eventually_async(
        STATE_LIMIT,
        "max-age retention to remove the old deployment",
        || {
            let mut client = client.clone();
            let id = old.clone();
            async move { status(&mut client, &id).await.err() }
        },
    )
    .await;
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("retention"), "{}", err.message());
    assert!(
        status(&mut client, &young).await.is_ok(),
        "the young one stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_pages_have_no_duplicates_or_holes() {
    require_docker();
    let app = unique_app("list");
    let other = unique_app("list-other");
    let _guards = (AppGuard(app.clone()), AppGuard(other.clone()));
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut created = Vec::new();
    for i in 0..13 {
        let log = deploy(&mut client, web_request(&app, &missing_image())).await;
        created.push(log[0].deployment_id.clone());
        if i % 4 == 0 {
            deploy(&mut client, web_request(&other, &missing_image())).await;
        }
    }
    created.reverse(); // newest first

    let page = |token: String| ListDeploymentsRequest {
        app: app.clone(),
        state: proto::DeploymentState::Failed as i32,
        page_size: 4,
        page_token: token,
    };
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let resp = client
            .list_deployments(page(token))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.deployments.len() <= 4);
        assert!(resp.deployments.iter().all(|d| d.app == app));
        listed.extend(resp.deployments.into_iter().map(|d| d.deployment_id));
        pages += 1;
        if pages == 1 {
            // A deployment created between pages does not shift later pages.
            deploy(&mut client, web_request(&app, &missing_image())).await;
        }
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    assert_eq!(pages, 4);
    assert_eq!(listed, created, "every deployment once, newest first");

    let none = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            state: proto::DeploymentState::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.deployments.is_empty());
    let err = client
        .list_deployments(page("garbage".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotent_retry_gives_one_deployment_and_one_container() {
    let t = Fixture::start("idem").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let mut req = web_request(&app, WEB1);
    req.idempotency_key = "release-42".into();

    let (first, mut stream) = deploy_until(&mut client, req.clone(), |u| u.sequence == 2).await;
    // The retry while the first still runs: same deployment, replayed from the start.
    let retry = deploy(&mut client, req.clone()).await;
    let (rest, end) = stream.drain().await;
    assert!(end.is_none());
    let mut original = first;
    original.extend(rest);
    assert_well_formed(&original);
    assert_eq!(retry, original);
    assert_eq!(terminal(&original).phase(), proto::Phase::Complete);

    // And once it has ended (served from the store).
    let again = deploy(&mut client, req.clone()).await;
    assert_eq!(again, original);

    let listed = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deployments;
    assert_eq!(listed.len(), 1, "one deployment");
    assert_eq!(app_containers(&app).len(), 1, "one container");

    // The same key for another app is another deployment.
    let other = unique_app("idem-other");
    let _other_guard = AppGuard(other.clone());
    let mut other_req = req;
    other_req.app = other.clone();
    other_req.image = missing_image();
    let other_log = deploy(&mut client, other_req).await;
    assert_ne!(other_log[0].deployment_id, original[0].deployment_id);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_never_holds_secrets() {
    let t = Fixture::start("secrets").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let mut req = web_request(&app, WEB1);
    req.env
        .insert("API_TOKEN".into(), "env-value-7f3a9c".into());
    req.registry_auth = Some(proto::RegistryAuth {
        username: "user-7f3a9c".into(),
        password: "password-7f3a9c".into(),
        identity_token: "token-7f3a9c".into(),
    });
    let log = deploy(&mut client, req).await;
    assert_eq!(terminal(&log).phase(), proto::Phase::Complete);
    t.server
        .server
        .as_ref()
        .unwrap()
        .engine
        .store()
        .flush()
        .await;
    let mut bytes = Vec::new();
    for f in ["stevedore.db", "stevedore.db-wal"] {
        if let Ok(b) = std::fs::read(t.server.data_dir.path().join(f)) {
            bytes.extend(b);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("API_TOKEN"), "env keys are stored");
    assert!(
        text.contains(&log[0].deployment_id),
        "the deployment is stored"
    );
    for secret in [
        "env-value-7f3a9c",
        "user-7f3a9c",
        "password-7f3a9c",
        "token-7f3a9c",
    ] {
        assert!(!text.contains(secret), "{secret} was stored");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_streams_carry_heartbeats_outside_the_log() {
    let t = Fixture::start_with(
        "heartbeat",
        |c| c.heartbeat_interval = Duration::from_millis(100),
        stevedore::events::ObserverRegistry::new(),
    )
    .await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let mut req = web_request(&app, SLOWHEALTH);
    // Probe every 2s: the stream is quiet in between.
    req.health_check = Some(proto::HealthCheck {
        interval: Some(pbjson_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..Default::default()
    });
    let mut raw = client.deploy(req).await.unwrap().into_inner();
    let mut real = Vec::new();
    let mut heartbeats = Vec::new();
    while heartbeats.len() < 3 {
        let u = tokio::time::timeout(STATE_LIMIT, raw.message())
            .await
            .unwrap_or_else(|_| {
                panic!("timed out after {STATE_LIMIT:?} waiting for a heartbeat; got {real:?}")
            })
            .unwrap()
            .unwrap();
        if u.heartbeat {
            assert_eq!(
                u.sequence,
                real.last().map_or(0, |r: &ProgressUpdate| r.sequence)
            );
            assert_eq!(u.deployment_id, real[0].deployment_id);
            assert_eq!(u.level(), proto::Level::Verbose);
            assert!(u.result.is_none());
            heartbeats.push(u);
        } else {
            real.push(u);
        }
    }
    let id = real[0].deployment_id.clone();
    client
        .cancel_deployment(CancelRequest {
            deployment_id: id.clone(),
        })
        .await
        .unwrap();
    let after = real.last().unwrap().sequence;
    let (rest, end) = Updates::new(raw, after).drain().await;
    assert!(end.is_none(), "{end:?}");
    real.extend(rest);
    assert_well_formed(&real);
    // The log holds no heartbeat.
    assert_eq!(watch(&mut client, &id, 0).await.unwrap(), real);
    t.stop().await;
}

/// A deployment that stopped the previous version to take over a fixed host port, and
/// then died with its server (kill -9): the next start removes its container and starts
/// the previous version again, which serves on its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_gives_a_fixed_port_back_to_the_previous_version() {
    require_docker();
    let app = unique_app("fixed-restart");
    let _guard = AppGuard(app.clone());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fixed = |image: &str| {
        let mut req = web_request(&app, image);
        req.ports[0].host_port = u32::from(port);
        req
    };
    let url = format!("http://127.0.0.1:{port}/");
    let data = tempfile::tempdir().unwrap();

    let mut first = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(first.grpc_addr).await;
    let v1 = deploy(&mut client, fixed(WEB1)).await;
    assert_eq!(terminal(&v1).phase(), proto::Phase::Complete);
    let previous = terminal(&v1).result.clone().unwrap().container_id;
    assert_eq!(http_get(&url).await, (200, "v1\n".into()));

    // The next deployment stops v1 for the port and then waits in its health check.
    let (seen, _stream) = deploy_until(
        &mut client,
        fixed(SLOWHEALTH),
        in_phase(proto::Phase::HealthCheck),
    )
    .await;
    assert!(
        seen.iter()
            .any(|u| u.metadata.get("stopped_container_id") == Some(&previous)),
        "the handover stopped v1"
    );
    let interrupted = seen[0].deployment_id.clone();
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();

    let second = BinaryServer::spawn(data.path(), &[]);
    let mut client = connect(second.grpc_addr).await;
    let status = status(&mut client, &interrupted).await.unwrap();
    assert_eq!(status.state(), proto::DeploymentState::Failed);
    assert!(
        status.error.contains("interrupted by a restart"),
        "{}",
        status.error
    );
    assert!(deployment_containers(&interrupted).is_empty());
    assert_eq!(app_containers(&app), vec![previous]);
    assert_eq!(http_get_eventually(&url).await, (200, "v1\n".into()));
}

/// Runs `stevedore serve ARGS` expecting it to exit at once; a server that starts
/// instead is killed and fails the test.
fn refused_serve(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let child = std::process::Command::new(binary())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn stevedore serve");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.expect("wait for stevedore serve"),
        Err(_) => {
            signal(&["-KILL", &pid.to_string()]);
            panic!("a second server on the same files started instead of refusing");
        }
    }
}

/// Issue 17: a second server on the same data dir refuses to start, naming the pid of
/// the server holding it, and leaves the first one serving; a separate audit log is
/// locked too. Once the first has stopped, the data dir is free again.
#[tokio::test]
async fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let first = BinaryServer::spawn(data.path(), &[]);
    let second = refused_serve(&["--data-dir".as_ref(), data.path().as_os_str()]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second server refused: {stderr}"
    );
    assert!(
        stderr.contains(&format!("process {}", first.child.id())) && stderr.contains("data dir"),
        "the refusal names the holder's pid: {stderr}"
    );
    // The first one still answers.
    let mut client = connect(first.grpc_addr).await;
    client
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .expect("the first server still answers");

    // Another data dir, but the first server's audit log: refused as well.
    let other = tempfile::tempdir().unwrap();
    let audit = data.path().join("audit.log");
    let third = refused_serve(&[
        "--data-dir".as_ref(),
        other.path().as_os_str(),
        "--audit-log".as_ref(),
        audit.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(
        !third.status.success(),
        "the third server refused: {stderr}"
    );
    assert!(
        stderr.contains("audit log") && stderr.contains(&format!("process {}", first.child.id())),
        "{stderr}"
    );

    drop(first);
    let again = BinaryServer::spawn(data.path(), &[]);
    drop(again);
}
