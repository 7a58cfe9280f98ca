//! [`SqlOptions`]: pool sizes, timeouts, the PostgreSQL schema and the change poll.

use std::time::Duration;

use crate::error::OpenError;

/// How [`SqlStore::open_with`](crate::SqlStore::open_with) connects. Every setting has a
/// default; see each method.
///
/// ```
/// use std::time::Duration;
/// use keygate_sql::SqlOptions;
///
/// let options = SqlOptions::new()
///     .max_connections(4)
///     .acquire_timeout(Duration::from_secs(1))
///     .poll_interval(Duration::from_millis(100));
/// assert_eq!(options.get_max_connections(), Some(4));
/// ```
#[derive(Debug, Clone)]
pub struct SqlOptions {
    pub(crate) max_connections: Option<u32>,
    pub(crate) acquire_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) busy_timeout: Duration,
    pub(crate) schema: Option<String>,
    pub(crate) poll_interval: Option<Duration>,
    pub(crate) read_only: bool,
}

impl Default for SqlOptions {
    fn default() -> Self {
        SqlOptions {
            max_connections: None,
            acquire_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            schema: None,
            poll_interval: None,
            read_only: false,
        }
    }
}

/// The change poll's default period on SQLite (the only way it learns of changes).
pub const SQLITE_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The change poll's default period on PostgreSQL, where it backs up LISTEN/NOTIFY (it
/// catches what a lost listener connection missed).
pub const POSTGRES_POLL_INTERVAL: Duration = Duration::from_secs(1);

impl SqlOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most this many pooled connections (default: 4 on SQLite, 10 on PostgreSQL; an
    /// in-memory SQLite database always uses 1). The PostgreSQL change listener uses one
    /// more connection of its own.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// How long an operation waits for a pooled connection, or for a new one to be
    /// established, before failing with `StoreError::Unavailable` (default 2 s). This bounds
    /// how long a cache miss waits during an outage before it is answered
    /// `store_unavailable`.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// How long any one store operation may take in all, connection included, before it
    /// fails with `StoreError::Unavailable` (default 5 s; bulk inserts get this per batch).
    /// It catches a database that accepts connections but stops answering.
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.operation_timeout = d;
        self
    }

    /// SQLite only: how long a statement waits for another connection's write lock
    /// (default 5 s).
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }

    /// PostgreSQL only: keep keygate's tables in this schema (set as the connections'
    /// `search_path`; created if missing, unless [`SqlOptions::read_only`]). A plain identifier: 1 to 63 characters of
    /// `[a-z0-9_]`, not starting with a digit. Default: the server's `search_path`
    /// (normally `public`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// How often a change follower reads the change table (default
    /// [`SQLITE_POLL_INTERVAL`] on SQLite, [`POSTGRES_POLL_INTERVAL`] on PostgreSQL).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = Some(d);
        self
    }

    /// Open for reading only (default `false`): nothing is created or migrated, and the
    /// database must already be current.
    ///
    /// - SQLite: the file is opened read-only and must exist; a file this process cannot
    ///   write (and whose WAL index it cannot create) is read as an immutable snapshot,
    ///   with a warning ([`SqlStore::warnings`](crate::SqlStore::warnings)).
    /// - PostgreSQL: transactions are read-only (`default_transaction_read_only`); the
    ///   schema set with [`SqlOptions::schema`] must exist
    ///   ([`OpenError::NoSchema`](crate::OpenError::NoSchema)), never created.
    ///
    /// A database without keygate tables is
    /// [`OpenError::NotInitialized`](crate::OpenError::NotInitialized); one whose schema
    /// is older than this build is [`OpenError::Outdated`](crate::OpenError::Outdated).
    /// Writes through such a store fail.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether the store opens read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The configured pool size, if set.
    pub fn get_max_connections(&self) -> Option<u32> {
        self.max_connections
    }

    /// The configured schema, if set.
    pub fn get_schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    pub(crate) fn validate(&self) -> Result<(), OpenError> {
        if self.max_connections == Some(0) {
            return Err(OpenError::InvalidOption(
                "max_connections must be at least 1".into(),
            ));
        }
        if let Some(s) = &self.schema {
            let b = s.as_bytes();
            let ok = !b.is_empty()
                && b.len() <= 63
                && !b[0].is_ascii_digit()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
            if !ok {
                return Err(OpenError::InvalidOption(format!(
                    "schema {:?} is not a plain identifier ([a-z_][a-z0-9_]*, at most 63)",
                    s.chars().take(64).collect::<String>()
                )));
            }
        }
        for (name, d) in [
            ("acquire_timeout", self.acquire_timeout),
            ("operation_timeout", self.operation_timeout),
        ] {
            if d.is_zero() {
                return Err(OpenError::InvalidOption(format!("{name} must not be zero")));
            }
        }
        if self.poll_interval.is_some_and(|d| d.is_zero()) {
            return Err(OpenError::InvalidOption(
                "poll_interval must not be zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for ok in ["kg", "kg_test_1a2b", "_x"] {
            assert!(SqlOptions::new().schema(ok).validate().is_ok(), "{ok}");
        }
        for bad in ["", "1kg", "Kg", "kg-test", "kg\"; drop", &"a".repeat(64)] {
            assert!(SqlOptions::new().schema(bad).validate().is_err(), "{bad}");
        }
        assert!(SqlOptions::new().max_connections(0).validate().is_err());
        assert!(SqlOptions::new()
            .poll_interval(Duration::ZERO)
            .validate()
            .is_err());
    }
}
