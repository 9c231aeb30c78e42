//! Progress from inside the container, against a real Docker engine: log milestones
//! while the new container starts and is health-checked, and hook commands run with
//! `docker exec` (with and without a TTY) before the switch.

mod common;

use common::*;
use stevedore::proto::{self, Level, Phase};

fn hook(name: &str, command: &[&str], tty: bool, timeout_secs: i64) -> proto::Hook {
    proto::Hook {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        tty,
        timeout: secs(timeout_secs),
    }
}

/// The hook of the issue: redraws `10%` … `100%` on one line, 0.1s apart.
const PERCENT_SCRIPT: &str =
    r#"for i in 10 20 30 40 50 60 70 80 90 100; do printf "\r%d%%" $i; sleep 0.1; done"#;

fn hook_updates<'a>(
    updates: &'a [proto::ProgressUpdate],
    name: &str,
) -> Vec<&'a proto::ProgressUpdate> {
    updates
        .iter()
        .filter(|u| {
            u.phase() == Phase::Hooks && u.metadata.get("hook").map(String::as_str) == Some(name)
        })
        .collect()
}

#[tokio::test]
async fn log_milestones_move_health_check_progress_and_count() {
    let t = Fixture::start("milestones").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = web_request(&app, "stevedore-test/milestones:1");
    let milestone = |pattern: &str, progress: f64, description: &str| proto::Milestone {
        pattern: pattern.into(),
        progress,
        description: description.into(),
    };
    req.milestones = vec![
        milestone(r"^step 1/4$", 0.25, "loading schema"),
        milestone(r"^step 2/4$", 0.5, "restoring data"),
        milestone(r"^checkpoint complete$", -1.0, "checkpoint written"),
        milestone(r"^step 3/4$", 0.75, "building indexes"),
        milestone(r"^step 4/4$", 1.0, "warming caches"),
    ];
    // The log check reads the same output as the milestones.
    req.health_check = Some(proto::HealthCheck {
        check: Some(proto::health_check::Check::Log(proto::LogHealthCheck {
            pattern: "^ready$".into(),
        })),
        timeout: secs(30),
        interval: None,
    });
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Complete, "{}", end.message);

    let hits: Vec<_> = updates
        .iter()
        .filter(|u| u.metadata.contains_key("milestone"))
        .collect();
    for u in &hits {
        assert_eq!(u.phase(), Phase::HealthCheck, "{u:?}");
    }
    let steps: Vec<(f64, &str, &str, &str)> = hits
        .iter()
        .filter(|u| !u.metadata.contains_key("count"))
        .map(|u| {
            (
                u.phase_progress,
                u.message.as_str(),
                u.metadata["line"].as_str(),
                u.metadata["milestone"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            (0.25, "loading schema", "step 1/4", "0"),
            (0.5, "restoring data", "step 2/4", "1"),
            (0.75, "building indexes", "step 3/4", "3"),
            (1.0, "warming caches", "step 4/4", "4"),
        ]
    );
    let counts: Vec<(&str, &str, &str)> = hits
        .iter()
        .filter(|u| u.metadata.contains_key("count"))
        .map(|u| {
            (
                u.metadata["count"].as_str(),
                u.message.as_str(),
                u.metadata["line"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("1", "checkpoint written", "checkpoint complete"),
            ("2", "checkpoint written", "checkpoint complete"),
            ("3", "checkpoint written", "checkpoint complete"),
        ]
    );
    // Each counter hit came after the step it follows (order of the output kept).
    let seq = |pred: &dyn Fn(&proto::ProgressUpdate) -> bool| {
        hits.iter().find(|u| pred(u)).unwrap().sequence
    };
    assert!(
        seq(&|u| u.metadata.get("count").map(String::as_str) == Some("1"))
            > seq(&|u| u.message == "loading schema")
    );
    assert!(
        seq(&|u| u.metadata.get("count").map(String::as_str) == Some("3"))
            < seq(&|u| u.message == "warming caches")
    );

    let result = end.result.clone().unwrap();
    let log = result.health.iter().find(|h| h.check == "log").unwrap();
    assert!(log.healthy, "{log:?}");
    let (status, body) = http_get(&result.endpoints["8080/tcp"]).await;
    assert_eq!((status, body.trim()), (200, "milestones"));
    t.stop().await;
}

#[tokio::test]
async fn tty_hook_percentages_drive_progress_scaled_over_the_hooks() {
    let t = Fixture::start("hook-tty").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = web_request(&app, "stevedore-test/web:1");
    req.hooks = vec![
        hook("progress", &["sh", "-c", PERCENT_SCRIPT], true, 30),
        hook(
            "check-tty",
            &[
                "sh",
                "-c",
                "if [ -t 1 ]; then echo tty; else echo no-tty; fi; echo done",
            ],
            true,
            30,
        ),
    ];
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Complete, "{}", end.message);
    use Phase::*;
    assert_eq!(
        phases(&updates),
        vec![
            Queued,
            Validating,
            Pulling,
            Creating,
            Starting,
            HealthCheck,
            Hooks,
            Switching,
            Cleanup,
            Complete
        ]
    );

    // Hook 0 of 2 covers [0, 0.5]: every percentage it drew, in order, scaled.
    let first = hook_updates(&updates, "progress");
    let percents: Vec<(String, f64)> = first
        .iter()
        .filter(|u| u.metadata.contains_key("percent"))
        .map(|u| (u.metadata["percent"].clone(), u.phase_progress))
        .collect();
    let expected: Vec<(String, f64)> = (1..=10)
        .map(|i| ((i * 10).to_string(), i as f64 * 10.0 / 200.0))
        .collect();
    assert_eq!(percents, expected);
    for u in first.iter().filter(|u| u.metadata.contains_key("percent")) {
        assert_eq!(u.level(), Level::Verbose);
    }
    // The redraws collapse to one output line: the last render.
    let output: Vec<&str> = first
        .iter()
        .filter(|u| u.metadata.contains_key("lines"))
        .map(|u| u.message.as_str())
        .collect();
    assert_eq!(output, vec!["100%"]);
    let exec_id = first
        .iter()
        .find_map(|u| u.metadata.get("exec_id"))
        .expect("the hook's exec id is reported");
    assert!(!exec_id.is_empty());

    // Hook 1 of 2 runs under a TTY and ends at 1.0.
    let second = hook_updates(&updates, "check-tty");
    let lines: Vec<&str> = second
        .iter()
        .filter(|u| u.level() == Level::Verbose && u.metadata.contains_key("lines"))
        .flat_map(|u| u.message.lines())
        .collect();
    assert_eq!(lines, vec!["tty", "done"]);
    for u in &second {
        assert!(u.phase_progress >= 0.5, "{u:?}");
    }
    let last = second.last().unwrap();
    assert_eq!(last.phase_progress, 1.0);
    assert_eq!(last.metadata["exit_code"], "0");

    let (status, body) = http_get(&end.result.clone().unwrap().endpoints["8080/tcp"]).await;
    assert_eq!((status, body.trim()), (200, "v1"));
    t.stop().await;
}

#[tokio::test]
async fn the_same_hook_without_a_tty_completes() {
    let t = Fixture::start("hook-notty").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());

    let mut req = web_request(&app, "stevedore-test/web:1");
    req.hooks = vec![hook(
        "progress",
        &[
            "sh",
            "-c",
            &format!("{PERCENT_SCRIPT}; echo; if [ -t 1 ]; then echo tty; else echo no-tty; fi"),
        ],
        false,
        30,
    )];
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Complete, "{}", end.message);
    let ours = hook_updates(&updates, "progress");
    let lines: Vec<&str> = ours
        .iter()
        .filter(|u| u.metadata.contains_key("lines"))
        .flat_map(|u| u.message.lines())
        .collect();
    assert_eq!(lines, vec!["100%", "no-tty"]);
    assert_eq!(ours.last().unwrap().phase_progress, 1.0);
    assert_eq!(app_containers(&app).len(), 1);
    t.stop().await;
}

/// Deploys web:1 as `app` and returns its endpoint.
async fn deploy_v1(client: &mut Client, app: &str) -> String {
    let updates = deploy(client, web_request(app, "stevedore-test/web:1")).await;
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Complete, "{}", end.message);
    let url = end.result.clone().unwrap().endpoints["8080/tcp"].clone();
    assert_eq!(http_get(&url).await.1.trim(), "v1");
    url
}

#[tokio::test]
async fn a_failing_hook_fails_the_deployment_and_the_previous_version_keeps_serving() {
    let t = Fixture::start("hook-fail").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let url = deploy_v1(&mut client, &app).await;
    let before = app_containers(&app);

    let mut req = web_request(&app, "stevedore-test/web:2");
    req.hooks = vec![
        hook("ok", &["true"], false, 30),
        hook(
            "migrate",
            &[
                "sh",
                "-c",
                "echo applying 0042_users; sleep 0.2; echo 'error: relation users exists' >&2; exit 2",
            ],
            false,
            30,
        ),
        hook("never", &["sh", "-c", "echo should not run"], false, 30),
    ];
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Failed);
    assert_eq!(end.level(), Level::Error);
    assert_eq!(end.metadata["exit_code"], "2");
    assert_eq!(end.metadata["failed_phase"], "hooks");
    assert!(
        end.message.contains("hook migrate exited with code 2"),
        "{}",
        end.message
    );
    let result = end.result.clone().unwrap();
    assert!(!result.success);
    let d = result.diagnostics.unwrap();
    assert_eq!(d.failed_phase(), Phase::Hooks);
    assert_eq!(d.step, "hook migrate");
    assert_eq!(d.exit_code, Some(2));
    assert_eq!(
        d.log_tail,
        vec!["applying 0042_users", "error: relation users exists"]
    );
    assert!(
        hook_updates(&updates, "never").is_empty(),
        "hooks after a failure do not run"
    );

    // Rolled back: the new container is gone, the previous one still serves v1.
    assert_eq!(app_containers(&app), before);
    assert_eq!(http_get(&url).await, (200, "v1\n".into()));
    t.stop().await;
}

#[tokio::test]
async fn a_hook_past_its_timeout_fails_and_its_exec_is_gone() {
    let t = Fixture::start("hook-timeout").await;
    let (app, mut client) = (t.app.clone(), t.client.clone());
    let url = deploy_v1(&mut client, &app).await;
    let before = app_containers(&app);

    let mut req = web_request(&app, "stevedore-test/web:2");
    // 10 s, not 2: the `log_tail` check needs the exec to have started and printed
    // before the timeout, which a loaded two-core machine may not do within 2 s.
    req.hooks = vec![hook(
        "warm-cache",
        &["sh", "-c", "echo warming; sleep 300"],
        true,
        10,
    )];
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), Phase::Failed);
    assert!(
        end.message
            .contains("hook warm-cache did not finish within 10s"),
        "{}",
        end.message
    );
    let d = end.result.clone().unwrap().diagnostics.unwrap();
    assert_eq!(d.step, "hook warm-cache");
    assert_eq!(d.exit_code, None);
    assert_eq!(d.log_tail, vec!["warming"]);

    // The exec (and its `sleep 300`) went with the removed container.
    let exec_id = hook_updates(&updates, "warm-cache")
        .iter()
        .find_map(|u| u.metadata.get("exec_id").cloned())
        .expect("exec id reported");
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let inspect = docker.inspect_exec(&exec_id).await;
    assert!(
        matches!(
            inspect,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })
        ),
        "exec {exec_id} still known to the engine: {inspect:?}"
    );
    assert_eq!(app_containers(&app), before);
    assert_eq!(http_get(&url).await, (200, "v1\n".into()));
    t.stop().await;
}
