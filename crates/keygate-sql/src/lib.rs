//! keygate-sql: keygate's key store in SQLite (the embedded default) or PostgreSQL (shared
//! by replicas), through sqlx, with embedded migrations and change propagation to running
//! verifiers.
//!
//! ```
//! use keygate_core::{KeyRecord, KeyStore, Prefix, Verifier, DenialCode, KeyStatus};
//! use keygate_sql::SqlStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // `sqlite://keygate.db` for a file (created if missing); `postgres://...` for PostgreSQL.
//! let store = SqlStore::open("sqlite::memory:").await.unwrap();
//! let verifier = Verifier::new(store.clone());
//! // Follow the store's changes: a revocation by any process reaches this verifier.
//! let follower = store.watch(&verifier).await.unwrap();
//!
//! let (key, mut record) =
//!     KeyRecord::generate(&Prefix::default(), verifier.hasher(), "ci", verifier.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//! assert_eq!(verifier.verify(key.expose_secret()).await.unwrap().key_id(), key.id());
//!
//! record.status = KeyStatus::Revoked;
//! store.update(&record).await.unwrap();
//! follower.caught_up(store.last_change().await.unwrap()).await;
//! let denial = verifier.verify(key.expose_secret()).await.unwrap_err();
//! assert_eq!(denial.code(), DenialCode::RevokedKey);
//! follower.shutdown().await;
//! # }
//! ```
//!
//! # What it provides
//! - [`SqlStore`]: a [`KeyStore`](keygate_core::KeyStore) chosen by URL
//!   ([`SqlStore::open`]), with [`SqlStore::insert_many`] for bulk creation.
//! - Migrations embedded in the binary, applied on open, safe when several processes open
//!   the same database at once (see `SCHEMA.md` in this crate for the tables and how to add
//!   a version).
//! - A change sequence advanced by every write (by database triggers, so writes made by
//!   hand count too) and a [`ChangeFollower`] ([`SqlStore::watch`]) that makes a running
//!   [`Verifier`](keygate_core::Verifier)'s cache follow it: LISTEN/NOTIFY on PostgreSQL,
//!   with a poll behind it; a poll on SQLite.
//! - Roles, identities and conditional writes (migration 6): the store keeps
//!   [`Role`](keygate_core::Role)s and [`Identity`](keygate_core::Identity)s, and a trigger
//!   advances the change sequence of every key that names a role (or belongs to an
//!   identity) when it is written, so a role change reaches every follower like a
//!   revocation, without touching the keys. Every write bumps a key's version;
//!   `update_versioned` and `update_role` write only over the version read.
//! - [`SqlUsageStore`] ([`SqlStore::usage_store`]): quota counters, a
//!   [`UsageStore`](keygate_core::usage::UsageStore) whose `check_and_add` is atomic per key
//!   across processes and replicas (a transaction holding the key's counters locked).
//! - [`SqlAuditSink`] ([`SqlStore::audit_sink`]): an
//!   [`AuditSink`](keygate_core::audit::AuditSink) writing events into a table, run behind
//!   the background [`Auditor`](keygate_core::audit::Auditor); [`SqlStore::audit_events`]
//!   reads them back.
//!
//! - Guards against silent misuse (`keygate_settings`, migration 3): a database that needs
//!   a newer keygate is refused ([`OpenError::NeedsNewer`]), schema versions from a newer
//!   keygate that allows this one are reported ([`SqlStore::warnings`]), and
//!   [`SqlStore::check_pepper`] refuses a process whose pepper differs from the one the
//!   database was first used with.
//! - Read-only use ([`SqlOptions::read_only`]): nothing created or migrated, a missing
//!   PostgreSQL schema refused rather than created.
//! - SQLite files it creates are owner-only: the database (and so its `-wal` and `-shm`
//!   files) mode 0600.
//!
//! # Failure behaviour
//! Every database failure is [`StoreError::Unavailable`](keygate_core::StoreError) (the
//! verifier answers `store_unavailable`, 503, on a cache miss, and keeps serving cached
//! keys within its `max_stale` bound); a damaged row is
//! [`StoreError::Corrupt`](keygate_core::StoreError) naming the key and column, which the
//! verifier answers `corrupt_key` (the key is evicted, not served stale). Listings skip
//! damaged rows and report them ([`KeyStore::list_report`](keygate_core::KeyStore)), and
//! [`KeyStore::set_status`](keygate_core::KeyStore) revokes or disables a damaged row by
//! writing its status alone. Nothing here panics on what it reads from a database.
//!
//! A change sequence found behind a follower (the change table emptied and its numbering
//! restarted, as restoring an older backup does) makes the follower clear its verifier's
//! cache and follow the store's numbers from there (see [`ChangeFollower`]).
#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]

mod audit;
mod error;
mod files;
mod follow;
mod migrate;
mod options;
mod policy;
mod row;
mod scopes;
mod settings;
mod store;
mod usage;

pub use audit::{AuditEntry, AuditQuery, SqlAuditSink, SqlAuditSinkBuilder, StoredEvent};
pub use error::OpenError;
pub use follow::ChangeFollower;
pub use options::{SqlOptions, POSTGRES_POLL_INTERVAL, SQLITE_POLL_INTERVAL};
pub use settings::{PepperCheck, PepperCheckError};
pub use store::{Change, SqlStore};
pub use usage::{parse_window_kind, window_kind, SqlUsageStore};

/// The database behind a [`SqlStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite (a file, or in memory).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
