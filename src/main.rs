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

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeConfig),
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    stevedore::logging::init(&cli.log_format);
    let result = match cli.command {
        Command::Serve(config) => server::run(config).await,
        Command::Audit { command } => audit::run_command(command).map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stevedore: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
