//! The `keygate` command line: manage API keys in a keygate SQL store (SQLite or
//! PostgreSQL), read quota usage, verify and read audit logs.
//!
//! See `README.md` in this crate for every command, the JSON shapes and the exit codes:
//! 0 success, 1 failure, 2 usage (a bad option or value; nothing was changed). Errors are
//! one line on stderr, starting `keygate: `.
#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]

mod audit;
mod cli;
mod db;
mod keys;
mod output;
mod parse;
mod usage;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use crate::cli::{AuditCommand, Cli, Command, KeysCommand};

/// Why a command did not succeed, and so its exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The command line is wrong (an option, a value): exit 2. Nothing was changed.
    Usage(String),
    /// The command was understood but failed (unknown key, database unreachable, broken
    /// log): exit 1.
    Failed(String),
    /// Output was already written that says what failed (a broken audit log in JSON):
    /// exit 1 with this one-line message on stderr.
    Reported(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Failed(_) | Failure::Reported(_) => 1,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Failed(m) | Failure::Reported(m) => m,
        }
    }
}

/// Prints `keygate: <message>` as exactly one line on stderr.
pub(crate) fn error_line(message: &str) {
    let one: String = message
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(std::io::stderr().lock(), "keygate: {one}");
}

/// Prints `keygate: warning: <message>` on stderr.
pub(crate) fn warning(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "keygate: warning: {message}");
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_failure(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            error_line(f.message());
            ExitCode::from(f.code())
        }
    }
}

/// Help and version go to stdout with exit 0; every other parse error is one line and
/// exit 2.
fn clap_failure(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            error_line("a command is missing (see keygate --help)");
            ExitCode::from(2)
        }
        _ => {
            // The first paragraph of clap's message (a missing argument is listed on the
            // lines after the first), as one line.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            let first = if first.is_empty() {
                "invalid command line"
            } else {
                first
            };
            error_line(&format!("{first} (see --help)"));
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        // Reading files needs no runtime.
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(args, cli.json),
        Command::Audit(AuditCommand::Tail(args)) => audit::tail(args, cli.json),
        _ => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::Failed(format!("cannot start the runtime: {e}")))?;
            runtime.block_on(async {
                let result = run_async(&cli).await;
                db::close_opened().await;
                result
            })
        }
    }
}

async fn run_async(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Keys(KeysCommand::Create(args)) => keys::create(cli, args).await,
        Command::Keys(KeysCommand::List(args)) => keys::list(cli, args).await,
        Command::Keys(KeysCommand::Show(args)) => keys::show(cli, args.id).await,
        Command::Keys(KeysCommand::Rotate(args)) => keys::rotate(cli, args).await,
        Command::Keys(KeysCommand::Revoke(args)) => {
            keys::set_status(cli, args.id, keys::StatusChange::Revoke).await
        }
        Command::Keys(KeysCommand::Disable(args)) => {
            keys::set_status(cli, args.id, keys::StatusChange::Disable).await
        }
        Command::Keys(KeysCommand::Enable(args)) => {
            keys::set_status(cli, args.id, keys::StatusChange::Enable).await
        }
        Command::Usage(args) => usage::usage(cli, args).await,
        Command::Audit(AuditCommand::Events(args)) => audit::events(cli, args).await,
        Command::Audit(AuditCommand::Verify(_) | AuditCommand::Tail(_)) => Ok(()),
    }
}
