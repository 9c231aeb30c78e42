//! One function per client command: connect, call, render, exit code.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;

use super::connect::{Client, ConnectArgs, Failure};
use super::follow::{Follower, Start, state_name};
use super::proto::{
    App, CancelRequest, DeploymentState, DeploymentStatus, GetStatusRequest, ListAppsRequest,
    ListDeploymentsRequest, Operation, RemoveAppRequest,
};
use super::render::{self, fmt_secs, noun, phase_name, renderer, resolve};
use super::{
    AppsArgs, CancelArgs, CommonArgs, DeployArgs, Exit, FollowArgs, ListArgs, Output, RemoveArgs,
    StateArg, StatusArgs, WatchArgs,
};

/// SIGINT as a stream, taken before anything slow so Ctrl-C is ours from the start.
fn interrupts() -> Signal {
    signal(SignalKind::interrupt()).expect("SIGINT handler")
}

fn follower<'a>(
    client: Client,
    common: &'a CommonArgs,
    opts: &'a FollowArgs,
    interrupts: Signal,
    started: Instant,
) -> Follower<'a> {
    Follower {
        client,
        connect: &common.connect,
        opts,
        render: renderer(common.output),
        interrupts,
        deadline: opts.timeout.map(|t| started + t),
        noun: "deployment",
    }
}

/// `--detach`: the ID on stdout (or, with `--output json`, what `json` prints), and on
/// stderr how to follow or stop it.
fn print_accepted(common: &CommonArgs, what: &str, id: &str, json: impl FnOnce()) {
    if resolve(common.output) == Output::Json {
        json();
    } else {
        println!("{id}");
    }
    if !matches!(common.output, Output::Quiet | Output::Json) {
        let flags = common.connect.flags_for_hint();
        eprintln!(
            "{what} {id} accepted\n  follow it: stevedore watch {id}{flags}\n  stop it:   stevedore cancel {id}{flags}"
        );
    }
}

/// Connects, or leaves with 130 on Ctrl-C meanwhile.
async fn connect(args: &ConnectArgs, interrupts: &mut Signal) -> Result<Client, Exit> {
    tokio::select! {
        c = args.connect() => c.map_err(Failure::report),
        _ = interrupts.recv() => Err(Exit::Interrupted),
    }
}

pub(crate) async fn deploy(args: DeployArgs) -> Exit {
    let started = Instant::now();
    let mut interrupts = interrupts();
    let req = match args.request.build() {
        Ok(r) => r,
        Err(message) => return Failure::usage(message).report(),
    };
    let common = &args.common;
    let mut client = match connect(&common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let call = tokio::select! {
        r = client.deploy(req) => r,
        _ = interrupts.recv() => {
            eprintln!("stevedore: interrupted before the server accepted the deployment (see `stevedore list`)");
            return Exit::Interrupted;
        }
    };
    let mut stream = match call {
        Ok(r) => r.into_inner(),
        Err(status) => return common.connect.failure(&status).report(),
    };
    if args.detach {
        return match stream.message().await {
            Ok(Some(first)) => {
                let json = || renderer(Output::Json).update(&first);
                print_accepted(common, "deployment", &first.deployment_id, json);
                Exit::Success
            }
            Ok(None) => Failure {
                exit: Exit::Rpc,
                message: format!(
                    "the server at {} ended the stream before accepting the deployment",
                    common.connect.url()
                ),
            }
            .report(),
            Err(status) => common.connect.failure(&status).report(),
        };
    }
    follower(client, common, &args.follow, interrupts, started)
        .run(Start::Deploy(stream))
        .await
}

/// RemoveApp with `detach` (the server answers once the removal is accepted), then the
/// removal followed by its ID as `deploy` follows a deployment.
pub(crate) async fn remove(args: RemoveArgs) -> Exit {
    let started = Instant::now();
    let mut interrupts = interrupts();
    let common = &args.common;
    let mut client = match connect(&common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let req = RemoveAppRequest {
        app: args.app.clone(),
        detach: true,
        stop_timeout: args.stop_timeout.map(Into::into),
    };
    let call = tokio::select! {
        r = client.remove_app(req) => r,
        _ = interrupts.recv() => {
            eprintln!("stevedore: interrupted before the server accepted the removal (see `stevedore list`)");
            return Exit::Interrupted;
        }
    };
    let accepted = match call {
        Ok(r) => r.into_inner(),
        Err(status) => return common.connect.failure(&status).report(),
    };
    let id = accepted.deployment_id.clone();
    if args.detach {
        print_accepted(common, "removal", &id, || print_json(&accepted));
        return Exit::Success;
    }
    let mut follower = follower(client, common, &args.follow, interrupts, started);
    follower.noun = "removal";
    follower.run(Start::Watch { id, after: 0 }).await
}

pub(crate) async fn watch(args: WatchArgs) -> Exit {
    let started = Instant::now();
    let mut interrupts = interrupts();
    let client = match connect(&args.common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    follower(client, &args.common, &args.follow, interrupts, started)
        .run(Start::Watch {
            id: args.id.clone(),
            after: args.after,
        })
        .await
}

pub(crate) async fn status(args: StatusArgs) -> Exit {
    let mut interrupts = interrupts();
    let mut client = match connect(&args.common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let req = GetStatusRequest {
        deployment_id: args.id.clone(),
    };
    match client.get_status(req).await {
        Ok(r) => {
            let s = r.into_inner();
            match resolve(args.common.output) {
                Output::Json => print_json(&s),
                Output::Quiet => {}
                _ => print_status(&s),
            }
            Exit::Success
        }
        Err(status) => args.common.connect.failure(&status).report(),
    }
}

pub(crate) async fn list(args: ListArgs) -> Exit {
    let mut interrupts = interrupts();
    let mut client = match connect(&args.common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let state = args.state.map(|s| match s {
        StateArg::Pending => DeploymentState::Pending,
        StateArg::Running => DeploymentState::Running,
        StateArg::Succeeded => DeploymentState::Succeeded,
        StateArg::Failed => DeploymentState::Failed,
        StateArg::Cancelled => DeploymentState::Cancelled,
    });
    let mut found: Vec<DeploymentStatus> = Vec::new();
    let mut page_token = String::new();
    while found.len() < args.limit as usize {
        let req = ListDeploymentsRequest {
            app: args.app.clone().unwrap_or_default(),
            state: state.map(|s| s as i32).unwrap_or_default(),
            page_size: (args.limit as usize - found.len()).min(100) as u32,
            page_token: page_token.clone(),
        };
        match client.list_deployments(req).await {
            Ok(r) => {
                let r = r.into_inner();
                found.extend(r.deployments);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            Err(status) => return args.common.connect.failure(&status).report(),
        }
    }
    found.truncate(args.limit as usize);
    match resolve(args.common.output) {
        Output::Json => found.iter().for_each(print_json),
        Output::Quiet => {}
        _ => print_table(&found),
    }
    Exit::Success
}

pub(crate) async fn apps(args: AppsArgs) -> Exit {
    let mut interrupts = interrupts();
    let mut client = match connect(&args.common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let apps = match client.list_apps(ListAppsRequest {}).await {
        Ok(r) => r.into_inner().apps,
        Err(status) => return args.common.connect.failure(&status).report(),
    };
    match resolve(args.common.output) {
        Output::Json => apps.iter().for_each(print_json),
        Output::Quiet => {}
        _ => print_apps(&apps),
    }
    Exit::Success
}

/// One line per app: what runs now (image, endpoint, since when) and the latest
/// deployment's state.
fn print_apps(apps: &[App]) {
    if apps.is_empty() {
        eprintln!("no apps");
        return;
    }
    let width = apps.iter().map(|a| a.app.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<width$}  {:<36}  {:>8}  {:<30}  LATEST",
        "APP", "RUNNING", "SINCE", "ENDPOINT"
    );
    for a in apps {
        let current = a.current.as_ref();
        let latest = a.latest.as_ref().map(|l| {
            format!(
                "{} {} {} {}",
                noun(l.operation()),
                l.deployment_id,
                state_name(l.state()),
                phase_name(l.phase())
            )
        });
        println!(
            "{:<width$}  {:<36}  {:>8}  {:<30}  {}",
            a.app,
            current.map(|c| c.image.as_str()).unwrap_or("-"),
            current
                .and_then(|c| c.since.as_ref())
                .map(|t| fmt_secs(age(t)))
                .unwrap_or_else(|| "-".into()),
            current
                .and_then(|c| c.endpoints.values().next())
                .map(String::as_str)
                .unwrap_or("-"),
            latest.unwrap_or_default()
        );
    }
}

pub(crate) async fn cancel(args: CancelArgs) -> Exit {
    let started = Instant::now();
    let mut interrupts = interrupts();
    let mut client = match connect(&args.common.connect, &mut interrupts).await {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    let req = CancelRequest {
        deployment_id: args.id.clone(),
    };
    let call = tokio::select! {
        r = client.cancel_deployment(req) => r,
        _ = interrupts.recv() => return Exit::Interrupted,
    };
    let status = match call {
        Ok(r) => r.into_inner().status.unwrap_or_default(),
        Err(status) => return args.common.connect.failure(&status).report(),
    };
    if !args.wait {
        match resolve(args.common.output) {
            Output::Json => print_json(&status),
            Output::Quiet => {}
            _ => println!(
                "cancel requested: deployment {} is {}",
                status.deployment_id,
                state_name(status.state())
            ),
        }
        return Exit::Success;
    }
    let opts = FollowArgs {
        timeout: None,
        reconnect_timeout: std::time::Duration::from_secs(60),
        cancel_on_interrupt: false,
    };
    follower(client, &args.common, &opts, interrupts, started)
        .run(Start::Watch {
            id: args.id.clone(),
            after: status.last_sequence,
        })
        .await
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("generated serde never fails")
    );
}

/// RFC 3339 (as the JSON mapping writes it) and how long ago.
fn when(ts: Option<&pbjson_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let text = serde_json::to_value(ts).ok()?.as_str()?.to_owned();
    Some(format!("{text} ({} ago)", fmt_secs(age(ts))))
}

fn age(ts: &pbjson_types::Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    (now - ts.seconds as f64).max(0.0)
}

fn print_status(s: &DeploymentStatus) {
    let mut rows: Vec<(&str, String)> = vec![
        (noun(s.operation()), s.deployment_id.clone()),
        ("app", s.app.clone()),
    ];
    match s.operation() {
        Operation::Deploy => rows.push(("image", s.image.clone())),
        Operation::RemoveApp => rows.push(("operation", "remove app".into())),
    }
    rows.push((
        "state",
        format!(
            "{} (phase {}, {:.0}% done)",
            state_name(s.state()),
            phase_name(s.phase()),
            s.total_progress * 100.0
        ),
    ));
    if s.queue_position > 0 {
        rows.push(("queue", format!("position {}", s.queue_position)));
    }
    for (name, ts) in [
        ("created", &s.created_at),
        ("started", &s.started_at),
        ("finished", &s.finished_at),
    ] {
        if let Some(w) = when(ts.as_ref()) {
            rows.push((name, w));
        }
    }
    if !s.requested_by.is_empty() {
        rows.push(("requested by", s.requested_by.clone()));
    }
    rows.push(("updates", s.last_sequence.to_string()));
    if let Some(r) = s.result.as_ref().filter(|r| r.success)
        && s.operation() == Operation::RemoveApp
    {
        rows.push(("removed", format!("{} container(s)", r.containers_removed)));
    }
    if !s.error.is_empty() {
        rows.push(("error", s.error.clone()));
    }
    for (name, value) in rows {
        println!("{name:<13} {value}");
    }
    if let Some(r) = &s.result {
        for l in render::result_lines(r) {
            println!("{l}");
        }
    }
}

fn print_table(list: &[DeploymentStatus]) {
    if list.is_empty() {
        eprintln!("no deployments");
        return;
    }
    let width = list.iter().map(|s| s.app.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<36}  {:<width$}  {:<10}  {:<12}  {:>4}  {:>8}  IMAGE",
        "ID", "APP", "STATE", "PHASE", "DONE", "AGE"
    );
    for s in list {
        println!(
            "{:<36}  {:<width$}  {:<10}  {:<12}  {:>3}%  {:>8}  {}",
            s.deployment_id,
            s.app,
            state_name(s.state()),
            phase_name(s.phase()),
            (s.total_progress * 100.0).round(),
            s.created_at
                .as_ref()
                .map(|t| fmt_secs(age(t)))
                .unwrap_or_default(),
            match s.operation() {
                Operation::Deploy => s.image.as_str(),
                Operation::RemoveApp => "(remove app)",
            }
        );
    }
}
