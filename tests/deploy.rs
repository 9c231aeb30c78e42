//! Deploy against a real Docker engine and a real registry.

mod common;

use common::*;
use stevedore::proto::{
    self, DeployRequest, GetStatusRequest, HealthCheck, HttpHealthCheck, ListDeploymentsRequest,
    ProgressUpdate, health_check,
};
use tonic::Code;

#[tokio::test]
async fn deploy_pulls_from_the_registry_and_serves() {
    let t = Fixture::start("pull").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let (image, layer_sizes) = push_random_image(6);

    let updates = deploy(&mut client, web_request(&app, &image)).await;
    assert_well_formed(&updates);
    use proto::Phase::*;
    assert_eq!(
        phases(&updates),
        vec![
            Queued,
            Validating,
            Pulling,
            Creating,
            Starting,
            HealthCheck,
            Switching,
            Cleanup,
            Complete
        ]
    );

    // Byte-exact pull progress: the last pull detail says every byte of the layers
    // that had to be downloaded arrived; the random layer is among them.
    let pulls: Vec<_> = updates.iter().filter_map(|u| u.pull.clone()).collect();
    assert!(!pulls.is_empty(), "pull progress was reported");
    let last = pulls.last().unwrap();
    assert_eq!(last.image_current_bytes, last.image_total_bytes);
    // The base layers are already present locally (stevedore-test/web:1), so exactly
    // the random layer is downloaded: the total is its size in the registry manifest.
    let random_layer = *layer_sizes.last().unwrap();
    assert!(random_layer > 6 * 1024 * 1024, "{layer_sizes:?}");
    assert_eq!(
        last.image_total_bytes, random_layer,
        "manifest: {layer_sizes:?}"
    );
    let mut seen = 0;
    for p in &pulls {
        assert!(p.image_current_bytes >= seen, "pull bytes went back");
        seen = p.image_current_bytes;
    }

    let end = terminal(&updates);
    assert_eq!(end.phase(), Complete);
    assert_eq!(end.total_progress, 1.0);
    let result = end.result.clone().unwrap();
    assert!(result.success);
    assert!(
        result.image_digest.contains("sha256:"),
        "{}",
        result.image_digest
    );
    let url = result
        .endpoints
        .get("8080/tcp")
        .expect("endpoint for 8080/tcp");
    let (status, body) = http_get(url).await;
    assert_eq!((status, body.trim()), (200, "v1"));

    let status = client
        .get_status(GetStatusRequest {
            deployment_id: end.deployment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state(), proto::DeploymentState::Succeeded);
    assert_eq!(status.last_sequence, end.sequence);
    assert_eq!(app_containers(&app).len(), 1);
    t.stop().await;
}

// ---------------------------------------------------------------------------
// Helpers local to these tests
// ---------------------------------------------------------------------------

fn millis(ms: i32) -> Option<pbjson_types::Duration> {
    Some(pbjson_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    })
}

/// A web request whose image HEALTHCHECK is polled every 200ms.
fn quick_request(app: &str, image: &str) -> DeployRequest {
    let mut req = web_request(app, image);
    req.health_check = Some(HealthCheck {
        check: None,
        timeout: secs(60),
        interval: millis(200),
    });
    req
}

fn timestamp_key(u: &ProgressUpdate) -> (i64, i32) {
    let t = u.timestamp.as_ref().expect("timestamp set");
    (t.seconds, t.nanos)
}

// ---------------------------------------------------------------------------
// Redeploy, failure with rollback, queueing, disconnects
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redeploy_replaces_the_container() {
    let t = Fixture::start("redeploy").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let first = deploy(&mut client, quick_request(&app, "stevedore-test/web:1")).await;
    assert_well_formed(&first);
    let url1 = succeeded_url(&first);
    assert_eq!(http_get(&url1).await.1.trim(), "v1");
    let old_id = terminal(&first).result.clone().unwrap().container_id;
    assert_eq!(app_containers(&app), vec![old_id.clone()]);

    let second = deploy(&mut client, quick_request(&app, "stevedore-test/web:2")).await;
    assert_well_formed(&second);
    let url2 = succeeded_url(&second);
    let new_id = terminal(&second).result.clone().unwrap().container_id;
    assert_ne!(new_id, old_id, "a redeploy creates a new container");
    assert_eq!(
        app_containers(&app),
        vec![new_id.clone()],
        "exactly the new container is left"
    );
    let (status, body) = http_get(&url2).await;
    assert_eq!((status, body.trim()), (200, "v2"));
    // The switch reported taking the old container out, and it is gone from the engine.
    assert!(
        second
            .iter()
            .any(|u| metadata(u).get("removed_container_id") == Some(&old_id)),
        "the switch names the removed container"
    );
    let inspect = std::process::Command::new("docker")
        .args(["inspect", &old_id])
        .output()
        .unwrap();
    assert!(
        !inspect.status.success(),
        "old container {old_id} still exists"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_crashing_image_fails_with_diagnostics_and_the_previous_version_serves() {
    let t = Fixture::start("crash").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let good = deploy(&mut client, quick_request(&app, "stevedore-test/web:1")).await;
    let url = succeeded_url(&good);
    let good_id = terminal(&good).result.clone().unwrap().container_id;

    let bad = deploy(&mut client, quick_request(&app, "stevedore-test/crash:1")).await;
    assert_well_formed(&bad);
    let end = terminal(&bad);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert_eq!(end.level(), proto::Level::Error);
    let result = end.result.clone().unwrap();
    assert!(!result.success);
    let diagnostics = result.diagnostics.expect("diagnostics on failure");
    assert_eq!(diagnostics.exit_code, Some(1), "{diagnostics:?}");
    assert!(!diagnostics.oom_killed);
    for line in [
        "starting crash image",
        "loading config",
        "fatal: config missing",
    ] {
        assert!(
            diagnostics.log_tail.iter().any(|l| l.contains(line)),
            "{line:?} not in the log tail {:?}",
            diagnostics.log_tail
        );
    }
    assert!(
        matches!(
            diagnostics.failed_phase(),
            proto::Phase::Starting | proto::Phase::HealthCheck
        ),
        "{diagnostics:?}"
    );
    assert!(end.message.contains("exited"), "{}", end.message);
    assert_eq!(
        metadata(end).get("exit_code").map(String::as_str),
        Some("1")
    );

    let status = get_status(&mut client, &end.deployment_id).await;
    assert_eq!(status.state(), proto::DeploymentState::Failed);
    assert_eq!(status.error, end.message);

    // Rolled back: the previous version is the app's only container and still serves.
    assert_eq!(app_containers(&app), vec![good_id]);
    let (code, body) = http_get(&url).await;
    assert_eq!((code, body.trim()), (200, "v1"));
    t.stop().await;
}

#[tokio::test]
async fn concurrent_deploys_of_one_app_run_one_after_the_other() {
    let t = Fixture::start("queue").await;
    let app = t.app.clone();
    let mut client1 = t.client.clone();
    let mut client2 = t.server.client().await;

    let mut first = deploy_stream(&mut client1, quick_request(&app, "stevedore-test/web:1")).await;
    // Once the first deployment is validating it holds the app's lock.
    let mut first_updates = first.until(|u| u.phase() == proto::Phase::Validating).await;
    let first_rest = tokio::spawn(async move { first.rest().await });
    let second = deploy(&mut client2, quick_request(&app, "stevedore-test/web:2")).await;
    first_updates.extend(first_rest.await.unwrap());

    assert_well_formed(&first_updates);
    assert_well_formed(&second);
    let first_end = terminal(&first_updates);
    assert_eq!(
        first_end.phase(),
        proto::Phase::Complete,
        "{}",
        first_end.message
    );
    let url = succeeded_url(&second);

    // The second waited in QUEUED at position 1 …
    let queued: Vec<_> = second
        .iter()
        .filter(|u| u.phase() == proto::Phase::Queued && metadata(u).contains_key("queue_position"))
        .collect();
    assert!(!queued.is_empty(), "the second deployment showed QUEUED");
    assert_eq!(metadata(queued[0])["queue_position"], "1");
    // … and began validating only after the first's terminal update.
    let validating = second
        .iter()
        .find(|u| u.phase() == proto::Phase::Validating)
        .expect("second validated");
    assert!(
        timestamp_key(validating) >= timestamp_key(first_end),
        "second started validating before the first ended"
    );
    assert!(
        validating.sequence > queued[0].sequence,
        "validating follows queued"
    );

    let second_id = terminal(&second).result.clone().unwrap().container_id;
    assert_eq!(app_containers(&app), vec![second_id]);
    assert_eq!(http_get(&url).await.1.trim(), "v2");
    t.stop().await;
}

#[tokio::test]
async fn a_dropped_stream_leaves_the_deployment_running() {
    let t = Fixture::start("drop").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut stream = deploy_stream(&mut client, quick_request(&app, "stevedore-test/web:1")).await;
    let seen = stream.until(|u| u.sequence == 3).await;
    assert!(seen.iter().all(|u| u.result.is_none()), "ended too early");
    let id = seen[0].deployment_id.clone();
    drop(stream);

    let status = wait_finished(&mut client, &id).await;
    assert_eq!(
        status.state(),
        proto::DeploymentState::Succeeded,
        "{}",
        status.error
    );
    assert_eq!(status.total_progress, 1.0);
    let result = status.result.expect("result on a finished deployment");
    assert_eq!(app_containers(&app), vec![result.container_id.clone()]);
    let (code, body) = http_get(&result.endpoints["8080/tcp"]).await;
    assert_eq!((code, body.trim()), (200, "v1"));
    t.stop().await;
}

/// A fixed host port can be held by one container only: the previous version is
/// stopped right before the new one starts, removed once the new one is healthy, and
/// started again when the new one fails.
#[tokio::test]
async fn a_fixed_host_port_is_handed_over_and_given_back_on_failure() {
    require_docker();
    let app = unique_app("fixed");
    let _guard = AppGuard(app.clone());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fixed = |image: &str| {
        let mut req = quick_request(&app, image);
        req.ports[0].host_port = u32::from(port);
        req
    };
    let url = format!("http://127.0.0.1:{port}/");
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let first = deploy(&mut client, fixed("stevedore-test/web:1")).await;
    assert_eq!(succeeded_url(&first), format!("http://127.0.0.1:{port}"));
    let v1 = terminal(&first).result.clone().unwrap().container_id;
    assert_eq!(http_get(&url).await, (200, "v1\n".into()));

    // Redeploy on the same port: handed over, and the new version serves.
    let second = deploy(&mut client, fixed("stevedore-test/web:2")).await;
    assert_well_formed(&second);
    succeeded_url(&second);
    let handover = second
        .iter()
        .find(|u| metadata(u).contains_key("stopped_container_id"))
        .expect("the handover is announced");
    assert_eq!(handover.phase(), proto::Phase::Starting);
    assert_eq!(handover.level(), proto::Level::Warning);
    assert_eq!(metadata(handover)["stopped_container_id"], v1);
    assert_eq!(http_get(&url).await, (200, "v2\n".into()));
    let v2 = terminal(&second).result.clone().unwrap().container_id;
    assert_eq!(app_containers(&app), vec![v2.clone()]);

    // A failing deploy on the same port: the previous version gets the port back.
    let third = deploy(&mut client, fixed("stevedore-test/crash:1")).await;
    assert_well_formed(&third);
    let end = terminal(&third);
    assert_eq!(end.phase(), proto::Phase::Failed);
    assert!(
        end.message.contains("previous version was started again"),
        "{}",
        end.message
    );
    assert_eq!(app_containers(&app), vec![v2]);
    // Started again without a health wait: give its server a moment to listen.
    assert_eq!(http_get_eventually(&url).await, (200, "v2\n".into()));
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Bad input, unreachable engine, unknown IDs
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_is_invalid_argument_and_starts_nothing() {
    let t = Fixture::start("bad").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    // One bad field through the whole server: the table of bad fields and their
    // messages is `api::convert::tests::every_bad_field_is_named` (no Docker needed).
    let mut req = web_request(&app, "stevedore-test/web:1");
    req.labels
        .insert("io.stevedore.app".into(), "someone-else".into());
    let err = client
        .deploy(req)
        .await
        .expect_err("a reserved label is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("labels"),
        "message {:?} should name the field",
        err.message()
    );

    // Nothing started: no container for the app, no deployment on the t.server.
    assert!(app_containers(&app).is_empty());
    let list = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.deployments.is_empty(), "{:?}", list.deployments);
    let all = client
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.deployments.is_empty(), "{:?}", all.deployments);
    t.stop().await;
}

#[tokio::test]
async fn an_unreachable_engine_is_unavailable_naming_the_address() {
    let data_dir = tempfile::tempdir().unwrap();
    let address = "unix:///nonexistent/docker.sock";
    let server = BinaryServer::spawn(data_dir.path(), &["--docker-host", address]);

    let (code, body) = http_get(&format!("http://{}/healthz", server.http_addr)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(address), "/healthz names the engine: {body}");

    let mut client = connect(server.grpc_addr).await;
    let app = unique_app("noengine");
    let err = match client
        .deploy(web_request(&app, "stevedore-test/web:1"))
        .await
    {
        Ok(_) => panic!("deploy accepted with no engine"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(address),
        "{:?} should name {address}",
        err.message()
    );
    // Nothing was recorded either.
    let all = client
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.deployments.is_empty());
}

#[tokio::test]
async fn get_status_of_an_unknown_deployment_is_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        let err = client
            .get_status(GetStatusRequest {
                deployment_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{id}: {err:?}");
        assert!(err.message().contains(&id), "{:?}", err.message());
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Health checks and the deadline
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_explicit_http_health_check_passes() {
    let t = Fixture::start("http").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = web_request(&app, "stevedore-test/plain:1");
    req.health_check = Some(HealthCheck {
        check: Some(health_check::Check::Http(HttpHealthCheck {
            port: 8080,
            path: "/".into(),
            expect_status: 200,
        })),
        timeout: secs(30),
        interval: millis(200),
    });
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let url = succeeded_url(&updates);
    let result = terminal(&updates).result.clone().unwrap();
    assert_eq!(result.health.len(), 1);
    assert_eq!(result.health[0].check, "http");
    assert!(result.health[0].healthy, "{:?}", result.health);
    assert_eq!(http_get(&url).await.1.trim(), "plain");
    t.stop().await;
}

#[tokio::test]
async fn an_unhealthy_image_fails_in_health_check() {
    let t = Fixture::start("unhealthy").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let updates = deploy(
        &mut client,
        quick_request(&app, "stevedore-test/unhealthy:1"),
    )
    .await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert!(end.message.contains("unhealthy"), "{}", end.message);
    let result = end.result.clone().unwrap();
    let diagnostics = result.diagnostics.unwrap();
    assert_eq!(diagnostics.failed_phase(), proto::Phase::HealthCheck);
    assert_eq!(result.health.len(), 1);
    assert!(!result.health[0].healthy);
    assert!(
        app_containers(&app).is_empty(),
        "the failed container was removed"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_health_timeout_fails_and_leaves_nothing() {
    let t = Fixture::start("slowhealth").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = quick_request(&app, "stevedore-test/slowhealth:1");
    req.health_check.as_mut().unwrap().timeout = secs(3);
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert!(
        end.message.contains("not healthy after"),
        "timeout message expected: {}",
        end.message
    );
    let diagnostics = end.result.clone().unwrap().diagnostics.unwrap();
    assert_eq!(diagnostics.failed_phase(), proto::Phase::HealthCheck);
    // Attempts were reported while waiting.
    assert!(
        updates
            .iter()
            .any(|u| u.phase() == proto::Phase::HealthCheck && metadata(u).contains_key("attempt"))
    );
    assert!(app_containers(&app).is_empty(), "nothing is left behind");
    t.stop().await;
}

#[tokio::test]
async fn the_deadline_bounds_the_deployment() {
    let t = Fixture::start("deadline").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = quick_request(&app, "stevedore-test/slowhealth:1");
    req.deadline = secs(3);
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Failed, "{}", end.message);
    assert!(
        end.message.contains("deadline") && end.message.contains("exceeded"),
        "{}",
        end.message
    );
    let status = get_status(&mut client, &end.deployment_id).await;
    assert_eq!(status.state(), proto::DeploymentState::Failed);
    assert!(app_containers(&app).is_empty(), "nothing is left behind");
    t.stop().await;
}

/// Issue 17: an image whose base layer is local (the usual redeploy of a new version)
/// pulls with progress that follows the bytes still to come: the "Already exists"
/// layer seen first does not send PULLING to 99%, and phase and total progress
/// advance over several updates instead of standing still and then jumping.
#[tokio::test]
async fn pull_progress_with_a_local_base_layer_advances() {
    let t = Fixture::start("pullbase").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let (image, _) = push_random_image(6);
    let proxy = throttled_registry(2 * 1024 * 1024).await;
    let image = image.replacen(&registry(), &proxy.to_string(), 1);

    let updates = deploy(&mut client, web_request(&app, &image)).await;
    assert_well_formed(&updates);
    assert_eq!(terminal(&updates).phase(), proto::Phase::Complete);
    let pulling: Vec<&ProgressUpdate> = updates
        .iter()
        .filter(|u| u.phase() == proto::Phase::Pulling && u.pull.is_some())
        .collect();
    let shown = |u: &&ProgressUpdate| {
        format!(
            "{:.3}/{:.3} {}",
            u.phase_progress, u.total_progress, u.message
        )
    };
    let trace: Vec<String> = pulling.iter().map(shown).collect();
    let (last, during) = pulling.split_last().expect("pull updates");
    assert_eq!(last.phase_progress, 1.0, "{trace:#?}");
    assert!(
        during.len() >= 4,
        "several updates while pulling: {trace:#?}"
    );
    // Never near the end before most bytes arrived.
    for u in during {
        let p = u.pull.as_ref().unwrap();
        let bytes = p.image_current_bytes as f64 / p.image_total_bytes.max(1) as f64;
        assert!(
            u.phase_progress <= bytes + 0.01,
            "progress ahead of the bytes: {trace:#?}"
        );
    }
    let distinct = |f: fn(&ProgressUpdate) -> f64| {
        let mut v: Vec<f64> = during.iter().map(|u| f(u)).collect();
        v.dedup();
        v.len()
    };
    assert!(
        distinct(|u| u.phase_progress) >= 3 && distinct(|u| u.total_progress) >= 3,
        "progress advances over the pull: {trace:#?}"
    );
    // The pull succeeded before it said so.
    let pulled = updates
        .iter()
        .position(|u| u.metadata.get("pulled").map(String::as_str) == Some("true"))
        .expect("pulled: true");
    assert!(std::ptr::eq(&updates[pulled], *last), "{trace:#?}");
}

/// The host addresses Docker reports for a deployment's container, from inspect:
/// (HostConfig.PortBindings, NetworkSettings.Ports) for `8080/tcp`.
fn bound_addresses(deployment_id: &str) -> (Vec<String>, Vec<String>) {
    let id = deployment_containers(deployment_id)
        .pop()
        .expect("the container");
    let ips = |template: &str| -> Vec<String> {
        let json = docker(&["inspect", "-f", template, &id]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["8080/tcp"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|b| b["HostIp"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    (
        ips("{{json .HostConfig.PortBindings}}"),
        ips("{{json .NetworkSettings.Ports}}"),
    )
}

/// Issue 17: apps are published on the server's --publish-ip (127.0.0.1 by default),
/// never on every interface unasked; `PortMapping.host_ip` picks another address; the
/// endpoint names the address Docker reports as bound, and it serves there.
#[tokio::test]
async fn ports_are_published_on_the_requested_host_ip() {
    let t = Fixture::start("hostip").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let updates = deploy(&mut client, web_request(&app, "stevedore-test/web:1")).await;
    let end = terminal(&updates).clone();
    assert_eq!(end.phase(), proto::Phase::Complete, "{}", end.message);
    let (config, bound) = bound_addresses(&end.deployment_id);
    assert_eq!(config, vec!["127.0.0.1"], "the default --publish-ip");
    assert_eq!(bound, vec!["127.0.0.1"], "docker binds loopback only");
    let url = &end.result.as_ref().unwrap().endpoints["8080/tcp"];
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let mut req = web_request(&app, "stevedore-test/web:2");
    req.ports[0].host_ip = "127.0.0.2".into();
    let updates = deploy(&mut client, req).await;
    let end = terminal(&updates).clone();
    assert_eq!(end.phase(), proto::Phase::Complete, "{}", end.message);
    let (config, bound) = bound_addresses(&end.deployment_id);
    assert_eq!(
        (config, bound),
        (vec!["127.0.0.2".to_string()], vec!["127.0.0.2".to_string()])
    );
    let url = end.result.as_ref().unwrap().endpoints["8080/tcp"].clone();
    assert!(url.starts_with("http://127.0.0.2:"), "{url}");
    let (status, body) = http_get(&url).await;
    assert_eq!((status, body.trim()), (200, "v2"));
    // Nothing answers on the same port at another loopback address.
    let other = url.replacen("127.0.0.2", "127.0.0.3", 1);
    assert!(reqwest::get(&other).await.is_err(), "{other} is not bound");

    let mut bad = web_request(&app, "stevedore-test/web:2");
    bad.ports[0].host_ip = "not-an-ip".into();
    let err = client.deploy(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("ports[0].host_ip"),
        "{}",
        err.message()
    );
}
