//! The HTTP JSON API and its event streams against a real server and engine: every
//! endpoint, resume by Last-Event-ID exactly once, 204 after the end, out_of_range
//! after retention, auth by scope, 400 naming the field, a stalled reader, ListApps
//! (after a restart too) and superseded_by.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use stevedore::api::auth::{Scope, new_token, token_entry};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(STREAM_LIMIT)
        .build()
        .unwrap()
}

/// A DeployRequest in its JSON form: quick TCP health check of port 8080.
fn deploy_body(app: &str, image: &str) -> Value {
    json!({
        "app": app,
        "image": image,
        "ports": [{"containerPort": 8080}],
        "healthCheck": {"timeout": "60s", "interval": "0.2s"},
        "deadline": "120s",
    })
}

async fn post_deploy(base: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
    let mut r = http().post(format!("{base}/v1/deployments")).json(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// One parsed SSE event.
#[derive(Debug, Clone, Default)]
struct Sse {
    id: Option<String>,
    event: String,
    data: String,
}

/// Reads events from a streaming response; `stop` after the event it returns true for.
async fn read_events(resp: &mut reqwest::Response, mut stop: impl FnMut(&Sse) -> bool) -> Vec<Sse> {
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STREAM_LIMIT, resp.chunk())
        .await
        .expect("the stream moves")
        .unwrap()
    {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut e = Sse::default();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    e.id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    e.event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    e.data.push_str(v.trim_start());
                }
            }
            if e.event.is_empty() && e.data.is_empty() {
                continue; // retry hint, comments
            }
            let done = stop(&e);
            events.push(e);
            if done {
                return events;
            }
        }
    }
    events
}

async fn open_events(base: &str, id: &str, last_event_id: Option<u64>) -> reqwest::Response {
    let mut r = http().get(format!("{base}/v1/deployments/{id}/events"));
    if let Some(l) = last_event_id {
        r = r.header("last-event-id", l.to_string());
    }
    r.send().await.unwrap()
}

async fn deployment_id(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["deploymentId"]
        .as_str()
        .expect("a deployment ID")
        .to_owned()
}

/// `app` as GET /v1/apps lists it.
async fn listed_app(base: &str, app: &str) -> Option<Value> {
    let (code, apps) = get_json(&format!("{base}/v1/apps"), None).await;
    assert_eq!(code, 200, "{apps}");
    apps["apps"]
        .as_array()?
        .iter()
        .find(|a| a["app"] == app)
        .cloned()
}

fn seq(e: &Sse) -> u64 {
    e.id.as_deref().unwrap().parse().unwrap()
}

async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = http().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_and_resume_the_event_stream_exactly_once() {
    let t = Fixture::start("http-resume").await;
    let base = format!("http://{}", t.server.http_addr);
    let resp = post_deploy(&base, &deploy_body(&t.app, "stevedore-test/web:1"), None).await;
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["deploymentId"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/deployments/{id}"));
    assert_eq!(accepted["app"], t.app.as_str());
    // Without auth the caller is the HTTP client's address, as over gRPC.
    let by = accepted["requestedBy"].as_str().unwrap();
    assert!(by.starts_with("127.0.0.1:"), "requested_by: {by}");

    // Read a few events, drop the connection, resume by Last-Event-ID.
    let mut first = open_events(&base, &id, None).await;
    assert_eq!(
        first.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let head = read_events(&mut first, |e| seq(e) >= 3).await;
    drop(first);
    let last = seq(head.last().unwrap());
    let mut second = open_events(&base, &id, Some(last)).await;
    let tail = read_events(&mut second, |e| e.event == "result").await;
    let all: Vec<u64> = head.iter().chain(&tail).map(seq).collect();
    let n = *all.last().unwrap();
    assert_eq!(
        all,
        (1..=n).collect::<Vec<_>>(),
        "every update exactly once, in order"
    );
    let end: Value = serde_json::from_str(&tail.last().unwrap().data).unwrap();
    assert_eq!(end["result"]["success"], true, "{end}");
    assert!(
        head.iter()
            .chain(&tail[..tail.len() - 1])
            .all(|e| e.event == "update")
    );
    for e in head.iter().chain(&tail) {
        let u: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(u["sequence"].as_str().unwrap(), e.id.as_deref().unwrap());
    }

    // After the end: 204 (an EventSource stops); ?after=N resumes too.
    assert_eq!(
        open_events(&base, &id, Some(n)).await.status().as_u16(),
        204
    );
    let mut after = http()
        .get(format!("{base}/v1/deployments/{id}/events?after={}", n - 1))
        .send()
        .await
        .unwrap();
    let rest = read_events(&mut after, |e| e.event == "result").await;
    assert_eq!(rest.iter().map(seq).collect::<Vec<_>>(), vec![n]);

    // Status, list (filters), apps.
    let (code, status) = get_json(&format!("{base}/v1/deployments/{id}"), None).await;
    assert_eq!(
        (code, status["state"].as_str()),
        (200, Some("DEPLOYMENT_STATE_SUCCEEDED"))
    );
    let (code, list) = get_json(
        &format!(
            "{base}/v1/deployments?app={}&state=succeeded&page_size=5",
            t.app
        ),
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(list["deployments"][0]["deploymentId"], id.as_str());
    let app = listed_app(&base, &t.app).await.expect("the app is listed");
    assert_eq!(app["current"]["deploymentId"], id.as_str());
    let url = app["current"]["endpoints"]["8080/tcp"].as_str().unwrap();
    assert_eq!(http_get(url).await.0, 200, "the live endpoint answers");

    // Cancelling an ended deployment is a conflict, named as gRPC names it.
    let resp = http()
        .post(format!("{base}/v1/deployments/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "FAILED_PRECONDITION");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_deployment_says_so_apps_survive_a_restart_and_remove() {
    let t = Fixture::start("http-apps").await;
    let base = format!("http://{}", t.server.http_addr);
    let mut ids = Vec::new();
    for image in ["stevedore-test/web:1", "stevedore-test/web:2"] {
        let resp = post_deploy(&base, &deploy_body(&t.app, image), None).await;
        assert_eq!(resp.status().as_u16(), 202);
        let v: Value = resp.json().await.unwrap();
        let id = v["deploymentId"].as_str().unwrap().to_owned();
        let mut events = open_events(&base, &id, None).await;
        read_events(&mut events, |e| e.event == "result").await;
        ids.push(id);
    }
    let (_, first) = get_json(&format!("{base}/v1/deployments/{}", ids[0]), None).await;
    assert_eq!(first["supersededBy"], ids[1].as_str());
    assert!(
        first["result"].get("endpoints").is_none(),
        "a replaced deployment's endpoints are not presented as live: {first}"
    );
    let (_, second) = get_json(&format!("{base}/v1/deployments/{}", ids[1]), None).await;
    assert!(second.get("supersededBy").is_none(), "{second}");

    // After a restart on the same data dir, ListApps still knows what runs.
    let TestServer {
        server, data_dir, ..
    } = t.server;
    server.unwrap().stop().await.unwrap();
    let mut config = serve_config(data_dir.path());
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let again = stevedore::server::start(config, Default::default())
        .await
        .unwrap();
    let app = listed_app(&format!("http://{}", again.http_addr), &t.app)
        .await
        .expect("listed after a restart");
    assert_eq!(app["current"]["deploymentId"], ids[1].as_str());
    assert_eq!(app["latest"]["deploymentId"], ids[1].as_str());
    assert!(app["current"]["image"].as_str().unwrap().ends_with("web:2"));

    // RemoveApp: an operation of its own (202 + Location), followed on its event
    // stream: stopping, removing, SUCCEEDED with the count. Every container goes, the
    // app leaves ListApps, history stays.
    let base = format!("http://{}", again.http_addr);
    assert!(!app_containers(&t.app).is_empty());
    let resp = http()
        .delete(format!("{base}/v1/apps/{}", t.app))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = resp.json().await.unwrap();
    let rid = accepted["deploymentId"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/deployments/{rid}"));
    assert_eq!(accepted["operation"], "OPERATION_REMOVE_APP", "{accepted}");
    let mut events = open_events(&base, &rid, None).await;
    let got = read_events(&mut events, |e| e.event == "result").await;
    let updates: Vec<Value> = (got.iter())
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    let phases: Vec<&str> = updates.iter().filter_map(|u| u["phase"].as_str()).collect();
    for phase in ["PHASE_SWITCHING", "PHASE_CLEANUP", "PHASE_COMPLETE"] {
        assert!(phases.contains(&phase), "{phase} in {phases:?}");
    }
    assert!(
        updates
            .iter()
            .any(|u| u["metadata"]["stop_outcome"].is_string())
            && updates
                .iter()
                .any(|u| u["metadata"]["removed_container_id"].is_string()),
        "the stop and each removal are reported: {updates:#?}"
    );
    assert!(
        updates
            .iter()
            .all(|u| u["operation"] == "OPERATION_REMOVE_APP")
    );
    let end = updates.last().unwrap();
    assert_eq!(got.last().unwrap().event, "result");
    assert_eq!(end["result"]["success"], true, "{end}");
    assert!(
        end["result"]["containersRemoved"].as_u64().unwrap() >= 1,
        "{end}"
    );
    assert!(app_containers(&t.app).is_empty());
    assert!(listed_app(&base, &t.app).await.is_none());
    let (code, replaced) = get_json(&format!("{base}/v1/deployments/{}", ids[1]), None).await;
    assert_eq!(code, 200, "history stays");
    assert_eq!(replaced["supersededBy"], rid.as_str(), "{replaced}");
    let resp = http()
        .delete(format!("{base}/v1/apps/Bad_Name"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // Counted apart from deployments, and audited with who asked.
    let (_, metrics) = http_get(&format!("{base}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"stevedore_app_removals_total{outcome="succeeded"} 1"#),
        "{metrics}"
    );
    again.stop().await.unwrap();
    let audit = stevedore::observers::audit::verify(&data_dir.path().join("audit.log"))
        .expect("the audit chain verifies");
    assert!(audit.records > 0);
    let records: Vec<Value> = std::fs::read_to_string(data_dir.path().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["deployment_id"] == rid.as_str())
        .collect();
    let done = records
        .iter()
        .find(|r| r["event"] == "succeeded")
        .expect("the removal's outcome is audited");
    assert_eq!(
        (&done["operation"], &done["app"], &done["outcome"]),
        (&json!("remove_app"), &json!(t.app), &json!("succeeded"))
    );
    let by = done["requested_by"].as_str().unwrap();
    assert!(
        by.starts_with("127.0.0.1:"),
        "the HTTP client's address: {by}"
    );

    // After another restart the removal is still there to look up.
    let mut config = serve_config(data_dir.path());
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let third = stevedore::server::start(config, Default::default())
        .await
        .unwrap();
    let (code, status) = get_json(
        &format!("http://{}/v1/deployments/{rid}", third.http_addr),
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(status["state"], "DEPLOYMENT_STATE_SUCCEEDED", "{status}");
    assert_eq!(status["operation"], "OPERATION_REMOVE_APP");
    assert!(status["result"]["containersRemoved"].as_u64().unwrap() >= 1);
    assert_eq!(status["requestedBy"], by);
    third.stop().await.unwrap();
}

/// A removal waits behind the app's running deployment (queued, then it runs), and a
/// RemoveApp without `detach` answers once it has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_waits_for_the_deployment_in_progress() {
    let mut t = Fixture::start("http-rm-queue").await;
    let base = format!("http://{}", t.server.http_addr);
    deploy(&mut t.client, web_request(&t.app, "stevedore-test/web:1")).await;
    // A deployment that stays in HEALTH_CHECK (its health never settles).
    let mut slow = web_request(&t.app, "stevedore-test/slowhealth:1");
    slow.health_check = Some(stevedore::proto::HealthCheck {
        check: Some(stevedore::proto::health_check::Check::Docker(
            Default::default(),
        )),
        timeout: secs(300),
        ..Default::default()
    });
    slow.deadline = secs(600);
    let mut running = deploy_stream(&mut t.client, slow).await;
    let first = running.next_update().await;
    running
        .until(|u| u.phase == stevedore::proto::Phase::HealthCheck as i32)
        .await;

    let mut client = t.server.client().await;
    let app = t.app.clone();
    let waiting = tokio::spawn(async move {
        let request = stevedore::proto::RemoveAppRequest {
            app,
            ..Default::default()
        };
        client.remove_app(request).await
    });
    // The removal is listed, queued behind the deployment; the call has not returned.
    let removal = eventually_async(STATE_LIMIT, "the removal to be listed", || {
        let base = base.clone();
        let app = t.app.clone();
        async move {
            let (_, list) = get_json(&format!("{base}/v1/deployments?app={app}"), None).await;
            list["deployments"]
                .as_array()?
                .iter()
                .find(|d| d["operation"] == "OPERATION_REMOVE_APP")
                .cloned()
        }
    })
    .await;
    let rid = removal["deploymentId"].as_str().unwrap().to_owned();
    assert_eq!(removal["state"], "DEPLOYMENT_STATE_PENDING", "{removal}");
    let mut watch = watch_stream(&mut t.client, &rid, 0).await.unwrap();
    let queued = watch
        .until(|u| u.metadata.contains_key("queued_behind"))
        .await;
    assert_eq!(
        queued.last().unwrap().metadata["queued_behind"],
        first.deployment_id
    );
    assert!(
        !waiting.is_finished(),
        "RemoveApp waits for the removal's end"
    );

    // Once the deployment ends (cancelled here), the removal runs.
    let resp = http()
        .post(format!(
            "{base}/v1/deployments/{}/cancel",
            first.deployment_id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    running.rest().await;
    let rest = watch.rest().await;
    let end = terminal(&rest);
    assert_eq!(end.phase(), stevedore::proto::Phase::Complete);
    assert_eq!(end.result.as_ref().unwrap().containers_removed, 1);
    let answer = tokio::time::timeout(STATE_LIMIT, waiting)
        .await
        .expect("RemoveApp answers once the removal ended")
        .unwrap()
        .expect("RemoveApp succeeds")
        .into_inner();
    assert_eq!(answer.deployment_id, rid);
    assert_eq!(answer.containers_removed, 1);
    assert!(answer.removed_at.is_some());
    assert!(app_containers(&t.app).is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_unknown_ids_and_auth_by_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (read_secret, read_digest) = new_token();
    let (deploy_secret, deploy_digest) = new_token();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        token_entry("viewer", &read_digest, &[Scope::Read])
            + &token_entry("ci", &deploy_digest, &[Scope::Deploy]),
    )
    .unwrap();
    let t = Fixture::start_with(
        "http-auth",
        |c| c.security.tokens_file = Some(tokens.clone()),
        Default::default(),
    )
    .await;
    let base = format!("http://{}", t.server.http_addr);
    let body = deploy_body(&t.app, "stevedore-test/web:1");

    // 401 without a token (and the page itself stays open), 403 with too little scope.
    let resp = post_deploy(&base, &body, None).await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "UNAUTHENTICATED");
    assert_eq!(get_json(&format!("{base}/v1/apps"), None).await.0, 401);
    assert_eq!(
        get_json(&format!("{base}/v1/apps"), Some("stv_wrong"))
            .await
            .0,
        401
    );
    // The page is embedded and open (it asks for the token); nothing from elsewhere.
    let (code, page) = http_get(&format!("{base}/deployments/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(code, 200);
    assert!(page.contains(r#"src="/ui/app.js""#), "{page}");
    let (code, js) = http_get(&format!("{base}/ui/app.js")).await;
    assert_eq!(code, 200);
    assert!(js.contains("Authorization") && !js.contains("EventSource("));
    assert!(!page.contains("http") && !js.contains("https://"));
    let resp = post_deploy(&base, &body, Some(&read_secret)).await;
    assert_eq!(resp.status().as_u16(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "PERMISSION_DENIED");
    assert_eq!(
        get_json(&format!("{base}/v1/apps"), Some(&read_secret))
            .await
            .0,
        200
    );

    // 400 naming the field, the same message as gRPC.
    let mut bad = body.clone();
    bad["image"] = json!("");
    let resp = post_deploy(&base, &bad, Some(&deploy_secret)).await;
    assert_eq!(resp.status().as_u16(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "INVALID_ARGUMENT");
    assert!(
        err["message"].as_str().unwrap().starts_with("image:"),
        "{err}"
    );
    let resp = post_deploy(&base, &json!({"app": 5}), Some(&deploy_secret)).await;
    assert_eq!(resp.status().as_u16(), 400);
    let (code, err) = get_json(
        &format!("{base}/v1/deployments?state=sideways"),
        Some(&read_secret),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        err["message"].as_str().unwrap().starts_with("state:"),
        "{err}"
    );

    // 404 for an unknown deployment, on every route.
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/v1/deployments/{unknown}"),
        format!("/v1/deployments/{unknown}/events"),
    ] {
        let (code, err) = get_json(&format!("{base}{path}"), Some(&read_secret)).await;
        assert_eq!(
            (code, err["code"].as_str()),
            (404, Some("NOT_FOUND")),
            "{path}"
        );
    }

    // A deploy token deploys; the event stream needs a token too (never in the URL).
    let resp = post_deploy(&base, &body, Some(&deploy_secret)).await;
    assert_eq!(resp.status().as_u16(), 202);
    let id = deployment_id(resp).await;
    assert_eq!(open_events(&base, &id, None).await.status().as_u16(), 401);
    let mut events = http()
        .get(format!("{base}/v1/deployments/{id}/events"))
        .bearer_auth(&read_secret)
        .send()
        .await
        .unwrap();
    let got = read_events(&mut events, |e| e.event == "result").await;
    assert_eq!(got.last().unwrap().event, "result");
    let resp = http()
        .post(format!("{base}/v1/deployments/{id}/cancel"))
        .bearer_auth(&read_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    // RemoveApp needs the deploy scope.
    let resp = http()
        .delete(format!("{base}/v1/apps/{}", t.app))
        .bearer_auth(&read_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "PERMISSION_DENIED");
    assert!(!app_containers(&t.app).is_empty(), "nothing was removed");

    // Who am I, per token (what the page shows Cancel and Remove by).
    let (code, me) = get_json(&format!("{base}/v1/whoami"), Some(&read_secret)).await;
    assert_eq!(code, 200);
    assert_eq!(
        me,
        json!({"name": "viewer", "scopes": ["read"], "auth": true})
    );
    let (_, me) = get_json(&format!("{base}/v1/whoami"), Some(&deploy_secret)).await;
    assert_eq!(
        me,
        json!({"name": "ci", "scopes": ["read", "deploy"], "auth": true})
    );
    assert_eq!(get_json(&format!("{base}/v1/whoami"), None).await.0, 401);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_point_removed_by_retention_is_named_not_skipped() {
    let t = Fixture::start_with(
        "http-retention",
        |c| c.retention_max_log_updates = Some(3),
        Default::default(),
    )
    .await;
    let base = format!("http://{}", t.server.http_addr);
    let resp = post_deploy(&base, &deploy_body(&t.app, "stevedore-test/web:1"), None).await;
    let id = deployment_id(resp).await;
    let mut events = open_events(&base, &id, None).await;
    let all = read_events(&mut events, |e| e.event == "result").await;
    let n = seq(all.last().unwrap());
    let oldest = n - 2;
    let got = eventually_async(STATE_LIMIT, "retention to trim the log", || {
        let base = base.clone();
        let id = id.clone();
        async move {
            let mut r = open_events(&base, &id, Some(1)).await;
            let got = read_events(&mut r, |_| true).await;
            (got[0].event == "out_of_range").then_some(got)
        }
    })
    .await;
    let body: Value = serde_json::from_str(&got[0].data).unwrap();
    assert_eq!(body["code"], "OUT_OF_RANGE");
    assert_eq!(body["oldest_sequence"], oldest, "{body}");
    // From the oldest held on, the rest, exactly once.
    let mut r = open_events(&base, &id, Some(oldest - 1)).await;
    let rest = read_events(&mut r, |e| e.event == "result").await;
    assert_eq!(
        rest.iter().map(seq).collect::<Vec<_>>(),
        (oldest..=n).collect::<Vec<_>>()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_reader_does_not_slow_the_deployment() {
    let t = Fixture::start_with(
        "http-stall",
        |c| {
            c.watch_buffer = 2;
            c.watch_stall_timeout = Duration::from_secs(1);
        },
        Default::default(),
    )
    .await;
    let base = format!("http://{}", t.server.http_addr);
    let resp = post_deploy(&base, &deploy_body(&t.app, "stevedore-test/web:1"), None).await;
    let id = deployment_id(resp).await;
    // A stream opened and never read.
    let stalled = open_events(&base, &id, None).await;
    assert_eq!(stalled.status().as_u16(), 200);
    let mut client = t.client.clone();
    let end = wait_finished(&mut client, &id).await;
    assert_eq!(end.state(), stevedore::proto::DeploymentState::Succeeded);
    // Reading it afterwards still gives the updates in order, or an error event to
    // resume from — never a silent gap.
    let mut stalled = stalled;
    let got = read_events(&mut stalled, |e| e.event != "update").await;
    let seqs: Vec<u64> = got.iter().filter(|e| e.id.is_some()).map(seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    drop(stalled);
    t.stop().await;
}
