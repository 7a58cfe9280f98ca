//! Opening the store, and where the CLI's audit events go.
//!
//! Every key change is made through a [`KeyManager`], which records a lifecycle event per
//! change and waits until it is written. The CLI sends those events to the database's
//! `keygate_audit` table (a [`SqlAuditSink`] behind a background [`Auditor`]) and to the
//! hash-chained file log of `--audit-dir` (by default the one the showcase server keeps
//! beside a SQLite database, when there is one). The file log's lock makes the CLI and a
//! running server take turns, so the chain stays one line after another. A change whose
//! event cannot be written fails (exit 1): changes that grant access are undone, revocations
//! and disables stay.

use std::path::PathBuf;
use std::sync::Arc;

use keygate_core::audit::{
    checkpoint_path, AuditError, AuditEvent, AuditSink, Auditor, ChainKey, FileSink,
};
use keygate_core::{KeyHasher, KeyManager, KeyStore, PEPPER_ENV, PEPPER_FILE_ENV};
use keygate_sql::{OpenError, PepperCheckError, SqlAuditSink, SqlOptions, SqlStore};

use crate::cli::Cli;
use crate::Failure;

/// The path of a SQLite file URL (`None` for PostgreSQL and in-memory databases).
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.contains("mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// Every store this process opened, closed by [`close_opened`] when the command is done.
static OPENED: std::sync::Mutex<Vec<SqlStore>> = std::sync::Mutex::new(Vec::new());

/// Closes every store [`open`] returned: a SQLite database's write-ahead log is merged into
/// the file and removed when its last connection closes, so the file alone holds
/// everything (a reader that cannot write can then read it).
pub(crate) async fn close_opened() {
    let stores = std::mem::take(&mut *OPENED.lock().unwrap_or_else(|p| p.into_inner()));
    for s in stores {
        s.close().await;
    }
}

/// How a command uses the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// `keys create`: a missing SQLite file is created.
    Create,
    /// Other changes: the database must exist.
    Write,
    /// Reading only (`keys list`, `keys show`, `usage`, `audit events`): opened read-only,
    /// nothing created or migrated (a database whose schema is older than this keygate is
    /// upgraded only if it can be written).
    Read,
}

/// Opens the store and prints its warnings on stderr. Commands that do not create say
/// there is no database, or no such PostgreSQL schema, instead of making an empty one.
pub(crate) async fn open(cli: &Cli, access: Access) -> Result<SqlStore, Failure> {
    let url = cli.database_url.as_str();
    let mut options = SqlOptions::new();
    if let Some(schema) = &cli.schema {
        if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
            return Err(Failure::Usage(
                "--schema (KEYGATE_DATABASE_SCHEMA) applies to PostgreSQL only".into(),
            ));
        }
        options = options.schema(schema.clone());
    }
    if let Some(path) = sqlite_path(url) {
        if access != Access::Create && !path.exists() {
            return Err(Failure::Failed(format!(
                "no database at {} (keygate keys create makes one)",
                path.display()
            )));
        }
    }
    let opened = match access {
        Access::Read => match SqlStore::open_with(url, options.clone().read_only(true)).await {
            // Older than this keygate: upgrade it if it can be written, else say so.
            Err(outdated @ OpenError::Outdated { .. }) => SqlStore::open_with(url, options)
                .await
                .map_err(|_| outdated),
            other => other,
        },
        Access::Create | Access::Write => SqlStore::open_with(url, options).await,
    };
    let store = opened.map_err(|e| match e {
        OpenError::UnsupportedScheme | OpenError::InvalidUrl(_) | OpenError::InvalidOption(_) => {
            Failure::Usage(e.to_string())
        }
        OpenError::NoSchema(_) => Failure::Failed(format!(
            "{e} (check --schema / KEYGATE_DATABASE_SCHEMA; keygate keys create makes one)"
        )),
        OpenError::NotInitialized => {
            Failure::Failed(format!("{e}: keygate keys create makes them"))
        }
        _ => Failure::Failed(e.to_string()),
    })?;
    for w in store.warnings() {
        crate::warning(w);
    }
    OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(store.clone());
    Ok(store)
}

/// The hasher: with the pepper from `KEYGATE_PEPPER` or the file named by
/// `KEYGATE_PEPPER_FILE` (owner-only) when set. It must match the server's, which
/// [`check_pepper`] makes sure of.
pub(crate) fn hasher() -> Result<KeyHasher, Failure> {
    KeyHasher::from_env().map_err(|e| Failure::Usage(e.to_string()))
}

/// Refuses to make keys with a pepper other than the one the database was first used
/// with (recording this one if it has none yet).
pub(crate) async fn check_pepper(store: &SqlStore, hasher: &KeyHasher) -> Result<(), Failure> {
    store
        .check_pepper(hasher)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            PepperCheckError::Mismatch { .. } => Failure::Failed(format!(
                "{e} ({PEPPER_ENV} or {PEPPER_FILE_ENV}); nothing was changed"
            )),
            other => Failure::Failed(other.to_string()),
        })
}

/// The actor recorded for changes: `--actor`, else `cli:$USER`, else `cli`.
pub(crate) fn actor(cli: &Cli) -> String {
    if let Some(a) = &cli.actor {
        return a.clone();
    }
    match std::env::var("USER") {
        Ok(u) if !u.is_empty() && u.len() <= 64 && !u.chars().any(char::is_control) => {
            format!("cli:{u}")
        }
        _ => "cli".into(),
    }
}

/// The database table, and optionally the file log.
struct Tee {
    sql: Arc<SqlAuditSink>,
    file: Option<FileSink>,
}

impl AuditSink for Tee {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let a = self.sql.record(event);
        let b = self.file.as_ref().map_or(Ok(()), |f| f.record(event));
        a.and(b)
    }
    fn flush(&self) -> Result<(), AuditError> {
        let a = self.sql.flush();
        let b = self.file.as_ref().map_or(Ok(()), |f| f.flush());
        a.and(b)
    }
    fn sync(&self) -> Result<(), AuditError> {
        let a = self.sql.sync();
        let b = self.file.as_ref().map_or(Ok(()), |f| f.sync());
        a.and(b)
    }
}

/// A key manager over `store` whose events go where the module docs say.
pub(crate) struct Managed {
    pub(crate) keys: KeyManager,
    auditor: Auditor,
    sql: Arc<SqlAuditSink>,
}

impl Managed {
    /// Sets up the audit path (before any change, so a bad `--audit-dir` changes nothing).
    pub(crate) fn new(cli: &Cli, store: &SqlStore, hasher: KeyHasher) -> Result<Managed, Failure> {
        let sql = Arc::new(
            store
                .audit_sink()
                .map_err(|e| Failure::Failed(format!("audit: {e}")))?,
        );
        let file = match audit_dir(cli) {
            Some(dir) => Some(open_file_log(&dir, &cli.audit_stem)?),
            None => None,
        };
        let auditor = Auditor::spawn(Tee {
            sql: sql.clone(),
            file,
        })
        .map_err(|e| Failure::Failed(format!("cannot start the audit writer: {e}")))?;
        let keys = KeyManager::builder(Arc::new(store.clone()) as Arc<dyn KeyStore>)
            .hasher(hasher)
            .auditor(auditor.clone())
            .build();
        Ok(Managed { keys, auditor, sql })
    }

    /// Waits until every event is written (database and file); an error if one could not
    /// be.
    pub(crate) async fn finish(self) -> Result<(), Failure> {
        let flushed = self.auditor.flush().await;
        let stats = self.auditor.shutdown().await;
        let lost = self.sql.buffered() as u64 + self.sql.dropped() + stats.failed;
        match flushed {
            Ok(()) if lost == 0 => Ok(()),
            Ok(()) => Err(Failure::Failed(format!(
                "the change was made, but {lost} audit event(s) could not be written"
            ))),
            Err(e) => Err(Failure::Failed(format!(
                "the change was made, but its audit event could not be written: {e}"
            ))),
        }
    }
}

/// The file log's directory: `--audit-dir`, else the directory of a `sqlite://` database
/// when a log with the CLI's stem is already there (the showcase keeps it so).
fn audit_dir(cli: &Cli) -> Option<PathBuf> {
    if let Some(d) = &cli.audit_dir {
        return Some(d.clone());
    }
    let db = sqlite_path(&cli.database_url)?;
    let dir = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    checkpoint_path(&dir, &cli.audit_stem)
        .exists()
        .then_some(dir)
}

/// Opens the file log in `dir` with the chain key from the environment, else from
/// `dir/STEM.key` (created, owner-only, when missing).
fn open_file_log(dir: &std::path::Path, stem: &str) -> Result<FileSink, Failure> {
    let failed = |e: AuditError| {
        Failure::Failed(format!(
            "cannot open the audit log in {}: {e}",
            dir.display()
        ))
    };
    let key = match ChainKey::from_env().map_err(failed)? {
        Some(k) => k,
        None => {
            ChainKey::load_or_create(dir.join(format!("{stem}.key")))
                .map_err(failed)?
                .0
        }
    };
    FileSink::builder(dir)
        .stem(stem)
        .key(key)
        // One key change per command: continue the newest file rather than leave a
        // one-line file per command.
        .continue_newest_file(true)
        .open()
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://keygate.db"),
            Some("keygate.db".into())
        );
        assert_eq!(
            sqlite_path("sqlite:///var/lib/k.db"),
            Some("/var/lib/k.db".into())
        );
        assert_eq!(sqlite_path("sqlite:k.db?mode=rwc"), Some("k.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://x?mode=memory"), None);
        assert_eq!(sqlite_path("postgres://u@h/db"), None);
    }
}
