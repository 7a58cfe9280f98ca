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
mod remote;
mod roles;
mod rotation;
mod usage;

use std::io::Write;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{AuditCommand, Cli, Command, IdentitiesCommand, KeysCommand, RolesCommand};

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

/// Prints `keygate: <message>` as exactly one line on stderr, with credentials in URLs
/// and anything shaped like an API key hidden.
pub(crate) fn error_line(message: &str) {
    let one: String = message
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let one = output::hide_keys(&keygate_core::redact_url(&one));
    let _ = writeln!(std::io::stderr().lock(), "keygate: {one}");
}

/// Prints `keygate: warning: <message>` on stderr.
pub(crate) fn warning(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "keygate: warning: {message}");
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_failure(e),
    };
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_failure(e),
    };
    let url_source = matches.value_source("database_url");
    let resolved = database_url(&mut cli, url_source);
    match resolved.and_then(|()| run(cli)) {
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
        ErrorKind::ValueValidation => match invalid_key_shaped_value(&e) {
            Some(line) => {
                error_line(&line);
                ExitCode::from(2)
            }
            None => clap_first_paragraph(&e),
        },
        _ => clap_first_paragraph(&e),
    }
}

/// An invalid value that looks like an API key, as a message that does not repeat it:
/// `invalid value for <ID>: that looks like a full API key; ...`.
fn invalid_key_shaped_value(e: &clap::Error) -> Option<String> {
    let value = match e.get(ContextKind::InvalidValue)? {
        ContextValue::String(v) => v,
        _ => return None,
    };
    let id = output::key_shaped(value)?;
    // `<ID>`, `[ID]` (optional) or `--key <ID>`: the option, or the positional as `<ID>`.
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.split(' ').next().unwrap_or("").replace(['[', ']'], ""),
        _ => String::new(),
    };
    let arg = if arg.starts_with('-') || arg.starts_with('<') {
        arg
    } else {
        format!("<{arg}>")
    };
    let hint = match id {
        Some(id) if arg == "<ID>" || arg == "--key" => format!(
            "that looks like a full API key; pass its id (the part after the prefix, first \
             12 characters) instead: {id}"
        ),
        _ => "that looks like an API key (not repeated here)".to_owned(),
    };
    Some(format!("invalid value for {arg}: {hint} (see --help)"))
}

/// What clap suggests instead of a mistyped command or option (`'create'`), if anything.
fn suggestion(e: &clap::Error) -> Option<String> {
    for kind in [
        ContextKind::SuggestedSubcommand,
        ContextKind::SuggestedArg,
        ContextKind::SuggestedValue,
    ] {
        match e.get(kind) {
            Some(ContextValue::String(s)) => return Some(format!("'{s}'")),
            Some(ContextValue::Strings(v)) if !v.is_empty() => {
                return Some(
                    v.iter()
                        .map(|s| format!("'{s}'"))
                        .collect::<Vec<_>>()
                        .join(" or "),
                )
            }
            _ => {}
        }
    }
    None
}

/// The first paragraph of clap's message (a missing argument is listed on the lines after
/// the first), as one line, with clap's suggestion: exit 2.
fn clap_first_paragraph(e: &clap::Error) -> ExitCode {
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
    match suggestion(e) {
        Some(s) => error_line(&format!("{first} (did you mean {s}? see --help)")),
        None => error_line(&format!("{first} (see --help)")),
    }
    ExitCode::from(2)
}

/// Settles the database URL: from `KEYGATE_DATABASE_URL_FILE` / `--database-url-file` when
/// given (a file no other user may read; the URL given twice is a usage error), and warns
/// when a password was typed on the command line, where `ps` shows it to every user.
fn database_url(cli: &mut Cli, source: Option<ValueSource>) -> Result<(), Failure> {
    let typed = source == Some(ValueSource::CommandLine);
    if let Some(path) = cli.database_url_file.clone() {
        if matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            return Err(Failure::Usage(
                "give the database URL once: --database-url (KEYGATE_DATABASE_URL) or \
                 --database-url-file (KEYGATE_DATABASE_URL_FILE), not both"
                    .into(),
            ));
        }
        cli.database_url = read_url_file(&path)?;
    } else if typed && keygate_core::redact_url(&cli.database_url) != cli.database_url {
        warning(
            "a password on the command line can be read by every user of this machine (ps); \
             use KEYGATE_DATABASE_URL or KEYGATE_DATABASE_URL_FILE instead",
        );
    }
    Ok(())
}

/// The database URL in `path`: the file's text, surrounding whitespace removed. Refused when
/// every user may read it (its mode grants "others" read), when it is empty, larger than
/// 64 KiB or not UTF-8. Messages never quote its contents.
fn read_url_file(path: &std::path::Path) -> Result<String, Failure> {
    use std::io::Read;
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::Usage(format!("cannot read the database URL file {shown}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Failure::Usage(format!("cannot read the database URL file {shown}: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(Failure::Usage(format!(
                "the database URL file {shown} can be read by every user (mode {mode:o}); \
                 make it private first (chmod 600)"
            )));
        }
    }
    if !meta.is_file() {
        return Err(Failure::Usage(format!(
            "the database URL file {shown} is not a file"
        )));
    }
    let mut text = String::new();
    file.take(64 * 1024 + 1)
        .read_to_string(&mut text)
        .map_err(|_| Failure::Usage(format!("the database URL file {shown} is not UTF-8 text")))?;
    if text.len() > 64 * 1024 {
        return Err(Failure::Usage(format!(
            "the database URL file {shown} is larger than 64 KiB"
        )));
    }
    let url = text.trim();
    if url.is_empty() {
        return Err(Failure::Usage(format!(
            "the database URL file {shown} is empty"
        )));
    }
    Ok(url.to_owned())
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        // Reading files needs no runtime.
        Command::Audit(AuditCommand::Verify(args)) => audit::verify(args, cli.json),
        Command::Audit(AuditCommand::Tail(args)) => audit::tail(args, cli.json),
        Command::Audit(AuditCommand::Anomalies(args)) => audit::anomalies(args, cli.json),
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
        Command::Keys(KeysCommand::Update(args)) => keys::update(cli, args).await,
        Command::Roles(RolesCommand::Create(args)) => roles::create(cli, args).await,
        Command::Roles(RolesCommand::List) => roles::list_roles(cli).await,
        Command::Roles(RolesCommand::Show(args)) => roles::show(cli, &args.name).await,
        Command::Roles(RolesCommand::Update(args)) => roles::update(cli, args).await,
        Command::Roles(RolesCommand::Delete(args)) => roles::delete(cli, &args.name).await,
        Command::Identities(IdentitiesCommand::Create(args)) => {
            roles::create_identity(cli, args).await
        }
        Command::Identities(IdentitiesCommand::List) => roles::list_identities(cli).await,
        Command::Identities(IdentitiesCommand::Show(args)) => {
            roles::show_identity(cli, &args.name).await
        }
        Command::Identities(IdentitiesCommand::Update(args)) => {
            roles::update_identity(cli, args).await
        }
        Command::Identities(IdentitiesCommand::Delete(args)) => {
            roles::delete_identity(cli, &args.name).await
        }
        Command::Usage(args) => usage::usage(cli, args).await,
        Command::Audit(AuditCommand::Events(args)) => audit::events(cli, args).await,
        Command::Audit(
            AuditCommand::Verify(_) | AuditCommand::Tail(_) | AuditCommand::Anomalies(_),
        ) => Ok(()),
    }
}
