//! Errors: opening a store ([`OpenError`]), and how database errors become
//! [`StoreError`]s.

use keygate_core::StoreError;

/// Why [`SqlStore::open`](crate::SqlStore::open) failed. Messages never contain the URL
/// (it may hold a password).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL is neither `sqlite:` nor `postgres:` / `postgresql:`.
    #[error("unsupported database URL: expected sqlite://PATH, sqlite::memory: or postgres://...")]
    UnsupportedScheme,
    /// The URL could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// An option is out of range (a schema name that is not a plain identifier, a zero pool).
    #[error("invalid store option: {0}")]
    InvalidOption(String),
    /// The database could not be reached or opened.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The schema could not be brought up to date (a failed migration, or an applied
    /// migration whose text differs from the one this build embeds).
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The database records that it needs a newer keygate than this one
    /// (`keygate_settings.min_keygate_version`): a newer keygate changed it in a way this
    /// build would misread. Nothing was read or written.
    #[error("this database needs keygate >= {needs}; you run {runs} (upgrade keygate to use it)")]
    NeedsNewer {
        /// The oldest keygate the database allows.
        needs: String,
        /// This keygate's version.
        runs: String,
    },
    /// Opened read-only ([`SqlOptions::read_only`](crate::SqlOptions::read_only)), the
    /// schema is older than this build's and cannot be upgraded without writing.
    #[error(
        "the database schema is at version {version} and this keygate needs version {needs}; \
         open it once with write access (any command that changes keys, or the server) to \
         upgrade it"
    )]
    Outdated {
        /// The newest version applied to the database.
        version: i64,
        /// The newest version this build knows.
        needs: i64,
    },
    /// Opened read-only: the database has no keygate tables (it was never opened with
    /// write access). Nothing was created.
    #[error("the database has no keygate tables yet (nothing was created)")]
    NotInitialized,
    /// Opened read-only: the PostgreSQL schema named by
    /// [`SqlOptions::schema`](crate::SqlOptions::schema) does not exist. Nothing was
    /// created.
    #[error("no keygate schema `{0}` in this database")]
    NoSchema(String),
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Whether `e` is a uniqueness violation (a primary key taken).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// A database error as a store error. Everything that is not a damaged row (those are
/// decoded by `row.rs` into [`StoreError::Corrupt`]) means the store cannot answer now:
/// [`StoreError::Unavailable`], so callers fail closed.
pub(crate) fn unavailable(op: &str, e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("{op}: {}", describe(&e)))
}

/// A short description of a sqlx error, without query parameters.
pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("database error {code}: {}", db.message()),
            None => format!("database error: {}", db.message()),
        },
        sqlx::Error::PoolTimedOut => "no database connection within the acquire timeout".into(),
        sqlx::Error::PoolClosed => "the connection pool is closed".into(),
        other => other.to_string(),
    }
}
