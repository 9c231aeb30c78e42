//! `stevedore audit …`

use std::path::PathBuf;

use super::{AUDIT_LOG_FILE, verify};

/// `stevedore audit …`
#[derive(clap::Subcommand, Clone, Debug)]
pub enum AuditCommand {
    /// Check the audit log's hash chain; print the head hash. Exits non-zero naming
    /// the first bad line.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct VerifyArgs {
    /// The audit log (default: DATA_DIR/audit.log).
    pub(crate) path: Option<PathBuf>,
    /// Directory for Stevedore's state (where the default audit log is).
    #[arg(long, env = "STEVEDORE_DATA_DIR", default_value = "./stevedore-data")]
    pub(crate) data_dir: PathBuf,
    /// Also fail unless the last record's hash is this one (detects lines cut off the
    /// end, given a head exported earlier).
    #[arg(long)]
    pub(crate) expect_head: Option<String>,
}

/// Runs an `audit` subcommand: prints the outcome; an error means a non-zero exit.
pub fn run_command(command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Verify(args) => {
            let path = args
                .path
                .unwrap_or_else(|| args.data_dir.join(AUDIT_LOG_FILE));
            let report = verify(&path)?;
            if let Some(expected) = &args.expect_head
                && !expected.eq_ignore_ascii_case(&report.head)
            {
                return Err(format!(
                    "audit log {}: the chain is intact but its head {} is not the expected {expected}: records were cut off the end (or it is another log)",
                    path.display(),
                    report.head
                ));
            }
            println!(
                "ok: {} records in {}\nhead: {}",
                report.records,
                path.display(),
                report.head
            );
            Ok(())
        }
    }
}
