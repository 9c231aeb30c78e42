use clap::{Parser, Subcommand};
use stevedore::observers::audit::{self, AuditCommand};
use stevedore::server::{self, ServeConfig};

/// Stevedore: deploy container images as apps, with streamed progress.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        env = "STEVEDORE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeConfig),
    /// Run the apps' front door: forwards each app's public port to its current version.
    Proxy(stevedore::proxy::ProxyConfig),
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    #[command(flatten)]
    Client(stevedore::cli::Command),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token (once) and the entry to add to the tokens file.
    New {
        /// The token's name: recorded as the caller in logs, audit and `requested_by`.
        name: String,
        /// What the token may do (repeatable).
        #[arg(long, value_enum, required = true)]
        scope: Vec<stevedore::api::auth::Scope>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(config) = &cli.command {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        runtime.worker_threads(config.runtime_workers(cores));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stevedore: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let command = match cli.command {
        // The client commands keep stdout and stderr for their own output.
        Command::Client(command) => return stevedore::cli::run(command).await,
        other => other,
    };
    stevedore::logging::init(&cli.log_format);
    let result = match command {
        Command::Serve(config) => server::run(config).await,
        Command::Proxy(config) => stevedore::proxy::run(config)
            .await
            .map_err(anyhow::Error::from_boxed),
        Command::Audit { command } => audit::run_command(command).map_err(anyhow::Error::msg),
        Command::Token(TokenCommand::New { name, scope }) => {
            let (secret, digest) = stevedore::api::auth::new_token();
            println!(
                "token (shown once; give it to the client as `authorization: Bearer <token>`):"
            );
            println!("{secret}");
            println!();
            println!(
                "add this entry to a tokens file; start the server with --tokens-file FILE, \
                 or send SIGHUP to a server started with it (without a tokens file, \
                 authentication is off and SIGHUP reloads nothing):"
            );
            print!(
                "{}",
                stevedore::api::auth::token_entry(&name, &digest, &scope)
            );
            Ok(())
        }
        Command::Client(_) => unreachable!("dispatched above"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stevedore: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
