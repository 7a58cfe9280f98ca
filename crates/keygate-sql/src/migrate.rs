//! The embedded, versioned migrations and their runner.
//!
//! Each backend has its own folder (`migrations/sqlite`, `migrations/postgres`) of files
//! `NNNN_name.sql`, listed in [`SQLITE`] and [`POSTGRES`] below. [`SqlStore::open`]
//! applies the missing ones in one transaction that holds a lock for the whole run, so
//! several processes opening the same database at once apply each migration exactly once:
//!
//! - SQLite: `BEGIN IMMEDIATE` (the database's write lock; the others wait for it through
//!   the busy timeout), then read `keygate_migrations`, apply, commit.
//! - PostgreSQL: `BEGIN`, `pg_advisory_xact_lock` on a key derived from the schema name,
//!   then the same. PostgreSQL's DDL is transactional, so a failed migration leaves nothing
//!   behind.
//!
//! `keygate_migrations` records each applied version with a blake3 checksum of its text; a
//! database whose applied migration differs from the embedded one is refused. A database
//! with versions this build does not know (written by a newer keygate) is used as is:
//! migrations only add.
//!
//! [`SqlStore::open`]: crate::SqlStore::open

use std::collections::BTreeMap;

use sqlx::{Executor, PgPool, Row, SqlitePool};

use crate::error::{describe, OpenError};
use crate::row::to_ms;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// Its version: the number its file name starts with.
    pub(crate) version: i64,
    /// A short name.
    pub(crate) description: &'static str,
    /// The SQL, run as one script.
    pub(crate) sql: &'static str,
}

impl Migration {
    fn checksum(&self) -> Vec<u8> {
        blake3::hash(self.sql.as_bytes()).as_bytes().to_vec()
    }
}

/// SQLite's migrations, in order. Add a version: put `migrations/sqlite/NNNN_name.sql` next
/// to the others and a line here (and the PostgreSQL twin in [`POSTGRES`]).
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        description: "keys",
        sql: include_str!("../migrations/sqlite/0001_keys.sql"),
    },
    Migration {
        version: 2,
        description: "usage_audit",
        sql: include_str!("../migrations/sqlite/0002_usage_audit.sql"),
    },
    Migration {
        version: 4,
        description: "scopes",
        sql: include_str!("../migrations/sqlite/0004_scopes.sql"),
    },
];

/// PostgreSQL's migrations, in order (same versions as [`SQLITE`]).
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        description: "keys",
        sql: include_str!("../migrations/postgres/0001_keys.sql"),
    },
    Migration {
        version: 2,
        description: "usage_audit",
        sql: include_str!("../migrations/postgres/0002_usage_audit.sql"),
    },
    Migration {
        version: 4,
        description: "scopes",
        sql: include_str!("../migrations/postgres/0004_scopes.sql"),
    },
];

/// The advisory-lock class of the migration lock (PostgreSQL); the second key is
/// `hashtext(schema)`.
const MIGRATION_LOCK_CLASS: i32 = 0x6B47_0001;

const SQLITE_TABLE: &str = "CREATE TABLE IF NOT EXISTS keygate_migrations (
    version     INTEGER NOT NULL PRIMARY KEY,
    description TEXT    NOT NULL,
    checksum    BLOB    NOT NULL,
    applied_at  INTEGER NOT NULL
)";

const POSTGRES_TABLE: &str = "CREATE TABLE IF NOT EXISTS keygate_migrations (
    version     BIGINT NOT NULL PRIMARY KEY,
    description TEXT   NOT NULL,
    checksum    BYTEA  NOT NULL,
    applied_at  BIGINT NOT NULL
)";

/// Which versions `applied` lacks, after checking the ones it has.
fn pending(
    migrations: &'static [Migration],
    applied: &BTreeMap<i64, Vec<u8>>,
) -> Result<Vec<&'static Migration>, OpenError> {
    let mut out = Vec::new();
    for m in migrations {
        match applied.get(&m.version) {
            Some(sum) if *sum == m.checksum() => {}
            Some(_) => {
                return Err(OpenError::Migration(format!(
                    "migration {} ({}) was applied with a different text than this build embeds",
                    m.version, m.description
                )))
            }
            None => out.push(m),
        }
    }
    if let (Some(newest), Some(known)) = (applied.keys().next_back(), migrations.last()) {
        if *newest > known.version {
            tracing::warn!(
                database = *newest,
                known = known.version,
                "the database schema is newer than this build; using it as is"
            );
        }
    }
    Ok(out)
}

fn failed(step: &str, e: sqlx::Error) -> OpenError {
    OpenError::Migration(format!("{step}: {}", describe(&e)))
}

/// The applied versions and checksums, read without a lock; `None` if they cannot be read
/// (a new database: no `keygate_migrations` yet).
async fn applied_unlocked<'e, E>(executor: E) -> Option<BTreeMap<i64, Vec<u8>>>
where
    E: sqlx::Executor<'e>,
    i64: for<'r> sqlx::Decode<'r, E::Database> + sqlx::Type<E::Database>,
    Vec<u8>: for<'r> sqlx::Decode<'r, E::Database> + sqlx::Type<E::Database>,
    (i64, Vec<u8>): for<'r> sqlx::FromRow<'r, <E::Database as sqlx::Database>::Row>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
{
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM keygate_migrations")
            .fetch_all(executor)
            .await
            .ok()?;
    Some(rows.into_iter().collect())
}

/// The fast path of opening: a database already up to date needs no lock (so a server
/// starts at once even while another process holds the write lock for a bulk insert).
fn up_to_date(
    migrations: &'static [Migration],
    applied: Option<BTreeMap<i64, Vec<u8>>>,
) -> Result<Option<i64>, OpenError> {
    match applied {
        Some(applied) if pending(migrations, &applied)?.is_empty() => {
            Ok(applied.keys().next_back().copied())
        }
        _ => Ok(None),
    }
}

/// Brings a SQLite database up to date. Returns the newest applied version.
pub(crate) async fn sqlite(pool: &SqlitePool) -> Result<i64, OpenError> {
    if let Some(version) = up_to_date(SQLITE, applied_unlocked(pool).await)? {
        return Ok(version);
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| OpenError::Unavailable(format!("migration lock: {}", describe(&e))))?;
    sqlx::query(SQLITE_TABLE)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("creating keygate_migrations", e))?;
    let rows = sqlx::query("SELECT version, checksum FROM keygate_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed("reading keygate_migrations", e))?;
    let mut applied = BTreeMap::new();
    for row in &rows {
        let version: i64 = row.try_get(0).map_err(|e| failed("reading versions", e))?;
        let sum: Vec<u8> = row.try_get(1).map_err(|e| failed("reading checksums", e))?;
        applied.insert(version, sum);
    }
    for m in pending(SQLITE, &applied)? {
        tracing::info!(
            version = m.version,
            name = m.description,
            "applying migration"
        );
        (&mut *tx)
            .execute(m.sql)
            .await
            .map_err(|e| failed(&format!("migration {} ({})", m.version, m.description), e))?;
        sqlx::query(
            "INSERT INTO keygate_migrations (version, description, checksum, applied_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(m.description)
        .bind(m.checksum())
        .bind(to_ms(std::time::SystemTime::now()))
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("recording a migration", e))?;
        applied.insert(m.version, m.checksum());
    }
    tx.commit()
        .await
        .map_err(|e| failed("committing migrations", e))?;
    Ok(applied.keys().next_back().copied().unwrap_or(0))
}

/// Brings a PostgreSQL schema up to date, creating `create_schema` first if given. Returns
/// the newest applied version.
pub(crate) async fn postgres(pool: &PgPool, create_schema: Option<&str>) -> Result<i64, OpenError> {
    if let Some(version) = up_to_date(POSTGRES, applied_unlocked(pool).await)? {
        return Ok(version);
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| OpenError::Unavailable(format!("migration lock: {}", describe(&e))))?;
    // `current_schema()` is NULL while the search_path names no existing schema; the lock
    // then keys on the schema about to be created.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(COALESCE(CAST($2 AS TEXT), CAST(current_schema() AS TEXT), '')))")
        .bind(MIGRATION_LOCK_CLASS)
        .bind(create_schema)
        .execute(&mut *tx)
        .await
        .map_err(|e| OpenError::Unavailable(format!("migration lock: {}", describe(&e))))?;
    if let Some(schema) = create_schema {
        // The name was checked to be a plain identifier (see `SqlOptions::schema`).
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("creating the schema", e))?;
    }
    sqlx::query(POSTGRES_TABLE)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("creating keygate_migrations", e))?;
    let rows = sqlx::query("SELECT version, checksum FROM keygate_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| failed("reading keygate_migrations", e))?;
    let mut applied = BTreeMap::new();
    for row in &rows {
        let version: i64 = row.try_get(0).map_err(|e| failed("reading versions", e))?;
        let sum: Vec<u8> = row.try_get(1).map_err(|e| failed("reading checksums", e))?;
        applied.insert(version, sum);
    }
    for m in pending(POSTGRES, &applied)? {
        tracing::info!(
            version = m.version,
            name = m.description,
            "applying migration"
        );
        (&mut *tx)
            .execute(m.sql)
            .await
            .map_err(|e| failed(&format!("migration {} ({})", m.version, m.description), e))?;
        sqlx::query(
            "INSERT INTO keygate_migrations (version, description, checksum, applied_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(m.description)
        .bind(m.checksum())
        .bind(to_ms(std::time::SystemTime::now()))
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("recording a migration", e))?;
        applied.insert(m.version, m.checksum());
    }
    tx.commit()
        .await
        .map_err(|e| failed("committing migrations", e))?;
    Ok(applied.keys().next_back().copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_twinned() {
        for list in [SQLITE, POSTGRES] {
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
            assert_eq!(list.first().map(|m| m.version), Some(1));
        }
        let s: Vec<i64> = SQLITE.iter().map(|m| m.version).collect();
        let p: Vec<i64> = POSTGRES.iter().map(|m| m.version).collect();
        assert_eq!(s, p);
    }

    #[test]
    fn a_changed_migration_is_refused() {
        let mut applied = BTreeMap::new();
        applied.insert(1, vec![0u8; 32]);
        let err = pending(SQLITE, &applied).unwrap_err();
        assert!(err.to_string().contains("migration 1"), "{err}");
        applied.insert(1, SQLITE[0].checksum());
        assert!(pending(SQLITE, &applied).unwrap().len() == SQLITE.len() - 1);
        // Unknown newer versions are tolerated.
        applied.insert(999, vec![1]);
        assert!(pending(SQLITE, &applied).is_ok());
    }
}
