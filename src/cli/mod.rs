//! The client commands (`deploy`, `watch`, `status`, `list`, `cancel`, `apps`, `remove`): a
//! tonic client of the public gRPC API, the follower that turns an update stream (of a
//! deployment or a removal) into an exit code
//! (resume on a broken stream, `--timeout`, Ctrl-C), and the renderers (`tty`, `plain`,
//! `json`, `quiet`).
//!
//! *Not here:* anything of the engine or the server. The CLI talks to a server only
//! through the API every other client uses, with its own generated types
//! ([`proto`]), so it can be moved to its own crate unchanged.

mod commands;
mod connect;
mod follow;
pub mod proto;
mod render;
mod request;
mod tty;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

pub(crate) use connect::ConnectArgs;
pub(crate) use request::DeployRequestArgs;

/// Exit codes of the client commands (documented in `--help` and the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The deployment or removal succeeded (or the command did what it was asked).
    Success = 0,
    /// The deployment or removal failed.
    Failed = 1,
    /// Usage error: bad flags, an unreadable `-f` file, or a request the server
    /// refused as INVALID_ARGUMENT.
    Usage = 2,
    /// The deployment was cancelled.
    Cancelled = 3,
    /// The server is unreachable, or answered with an error (auth included).
    Rpc = 4,
    /// No such deployment.
    NotFound = 5,
    /// `--timeout` ran out; the deployment keeps running.
    Timeout = 124,
    /// Interrupted (Ctrl-C); the deployment keeps running.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Shown at the end of every client command's `--help`.
pub(crate) const EXIT_CODES_HELP: &str = "\
Exit codes (from the terminal update of the deployment or removal, never from an
earlier event):
  0    succeeded                 3    cancelled
  1    failed                    4    server unreachable, or an RPC error (auth included)
  2    usage error               5    no such deployment or removal
  124  --timeout ran out (it keeps running on the server)
  130  interrupted by Ctrl-C (it keeps running on the server)";

/// The client commands, flattened into the binary's subcommands.
// Parsed once at start: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deploy IMAGE as APP and follow its progress until it ends.
    #[command(after_help = EXIT_CODES_HELP)]
    Deploy(DeployArgs),
    /// Follow a deployment (from the start, or after sequence N) until it ends.
    #[command(after_help = EXIT_CODES_HELP)]
    Watch(WatchArgs),
    /// Show a deployment's state, progress, timings and result.
    #[command(after_help = EXIT_CODES_HELP)]
    Status(StatusArgs),
    /// List deployments, newest first.
    #[command(after_help = EXIT_CODES_HELP)]
    List(ListArgs),
    /// Cancel a queued or running deployment (the previous version keeps running).
    #[command(after_help = EXIT_CODES_HELP)]
    Cancel(CancelArgs),
    /// What runs now, per app: image, endpoints, since when, and the latest deployment.
    #[command(after_help = EXIT_CODES_HELP)]
    Apps(AppsArgs),
    /// Stop and remove every container of APP (after its running and queued
    /// deployments) and follow the removal until it ends; the history stays.
    #[command(after_help = EXIT_CODES_HELP)]
    Remove(RemoveArgs),
}

/// How to show what happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// `tty` when stderr is a terminal, else `plain`.
    Auto,
    /// Live bars and phase lines on stderr.
    Tty,
    /// Lines without control codes: one per phase change and important event.
    Plain,
    /// One JSON object per line on stdout (proto3 JSON mapping), nothing else there.
    Json,
    /// Nothing but errors: only the exit code tells.
    Quiet,
}

/// Flags every client command takes.
#[derive(Args, Clone, Debug)]
pub(crate) struct CommonArgs {
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    /// Output: auto, tty, plain, json or quiet. `NO_COLOR` turns colours off.
    #[arg(
        long,
        short = 'o',
        value_enum,
        env = "STEVEDORE_OUTPUT",
        default_value = "auto"
    )]
    pub(crate) output: Output,
}

/// How long to follow, and what Ctrl-C does.
#[derive(Args, Clone, Debug)]
pub(crate) struct FollowArgs {
    /// Stop following after this long (e.g. `5m`) and exit 124; the deployment keeps
    /// running.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// When the stream breaks, reconnect (with backoff) and resume for this long, then
    /// exit 4 with the command to resume by hand.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) reconnect_timeout: Duration,
    /// Ctrl-C cancels the deployment and waits for its end (a second Ctrl-C leaves at
    /// once), instead of detaching.
    #[arg(long)]
    pub(crate) cancel_on_interrupt: bool,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub(crate) request: DeployRequestArgs,
    /// Print the deployment ID and exit 0 as soon as the server accepts it.
    #[arg(long, conflicts_with_all = ["timeout", "cancel_on_interrupt"])]
    pub(crate) detach: bool,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Deployment ID.
    pub(crate) id: String,
    /// Start after this sequence (the last one you saw); 0 replays everything.
    #[arg(long, default_value_t = 0)]
    pub(crate) after: u64,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Deployment ID.
    pub(crate) id: String,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this app's deployments.
    #[arg(long)]
    pub(crate) app: Option<String>,
    /// Only deployments in this state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<StateArg>,
    /// At most this many deployments.
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: u32,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Args, Debug)]
pub struct AppsArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The app whose containers are stopped and removed.
    pub(crate) app: String,
    /// Each container's stop grace after its stop signal (e.g. `30s`), then it is
    /// killed; default: the container's own StopTimeout, else 10s.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) stop_timeout: Option<Duration>,
    /// Print the removal's ID and exit 0 as soon as the server accepts it.
    #[arg(long, conflicts_with_all = ["timeout", "cancel_on_interrupt"])]
    pub(crate) detach: bool,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Deployment ID.
    pub(crate) id: String,
    /// Follow the deployment until it has ended (exit code from its end: 3 when
    /// cancelled).
    #[arg(long)]
    pub(crate) wait: bool,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

/// Runs a client command; the process exits with the returned code.
pub async fn run(command: Command) -> ExitCode {
    let exit = match command {
        Command::Deploy(args) => commands::deploy(args).await,
        Command::Watch(args) => commands::watch(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::List(args) => commands::list(args).await,
        Command::Cancel(args) => commands::cancel(args).await,
        Command::Apps(args) => commands::apps(args).await,
        Command::Remove(args) => commands::remove(args).await,
    };
    exit.into()
}
