//! SQLite files: created owner-only, and opened read-only.
//!
//! A database file keygate creates is mode 0600 (set explicitly after creation, so the
//! umask does not matter). SQLite gives the `-wal` and `-shm` files it creates the
//! database file's own mode, so they are 0600 too.

use std::path::Path;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::SqlitePool;

use crate::error::{describe, OpenError};
use crate::migrate::{self, Opened};
use crate::options::SqlOptions;
use crate::store::sqlite_pool;

/// The warning given when a SQLite file is read as an immutable snapshot.
pub(crate) const IMMUTABLE: &str = "the database file cannot be written by this process \
     (nor its WAL index created), so it is read as an immutable snapshot: a change made by \
     another process while this one reads may be missed or misread";

/// Creates the database file at `path` owner-only, unless it exists. Its directory must
/// exist (a missing one is an error, as it always was: a typo creates nothing). Not for
/// in-memory databases.
pub(crate) fn create_owner_only(path: &Path) -> Result<(), OpenError> {
    if path.as_os_str().is_empty() || path.exists() {
        return Ok(());
    }
    let fail = |what: &str, p: &Path, e: std::io::Error| {
        OpenError::Unavailable(format!("cannot create {what} {}: {e}", p.display()))
    };
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    match file.open(path) {
        Ok(_) => set_mode(path, 0o600).map_err(|e| fail("the database file", path, e)),
        // Another process made it first: theirs is used as it is.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail("the database file", path, e)),
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Opens a SQLite database read-only: nothing created, nothing migrated. A WAL database
/// whose `-shm` file this process cannot create is unreadable that way; it is then opened
/// as immutable, with a warning, unless its `-wal` file holds changes (an immutable open
/// would not see them: refused).
pub(crate) async fn open_sqlite_read_only(
    connect: SqliteConnectOptions,
    options: &SqlOptions,
    in_memory: bool,
) -> Result<(SqlitePool, Opened), OpenError> {
    let connect = connect.read_only(true).create_if_missing(false);
    let first = match try_open(connect.clone(), options, in_memory).await {
        Ok(done) => return done,
        Err(e) => e,
    };
    if in_memory {
        return Err(OpenError::Unavailable(describe(&first)));
    }
    // An immutable open ignores the write-ahead log: with one holding changes it would
    // show an old state. Refuse then.
    let wal = std::path::PathBuf::from(format!("{}-wal", connect.get_filename().display()));
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(OpenError::Unavailable(format!(
            "{}; the database has a write-ahead log ({}) this process cannot use: run as a \
             user who may write the database's directory, or let its writers finish (the \
             log is merged into the file when the last one closes)",
            describe(&first),
            wal.display()
        )));
    }
    match try_open(connect.immutable(true), options, in_memory).await {
        Ok(Ok((pool, mut opened))) => {
            opened.warnings.push(IMMUTABLE.into());
            Ok((pool, opened))
        }
        Ok(Err(verdict)) => Err(verdict),
        // Report why the plain read-only open failed: that is the database's problem.
        Err(_) => Err(OpenError::Unavailable(describe(&first))),
    }
}

/// The outer error: the database could not be read; the inner: its verdict.
async fn try_open(
    connect: SqliteConnectOptions,
    options: &SqlOptions,
    in_memory: bool,
) -> Result<Result<(SqlitePool, Opened), OpenError>, sqlx::Error> {
    let pool = sqlite_pool(options, in_memory)
        .connect_with(connect)
        .await?;
    match migrate::sqlite_read_only(&pool).await {
        Ok(Ok(opened)) => Ok(Ok((pool, opened))),
        Ok(Err(verdict)) => {
            pool.close().await;
            Ok(Err(verdict))
        }
        Err(e) => {
            pool.close().await;
            Err(e)
        }
    }
}
