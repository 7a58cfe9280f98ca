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
//! database whose applied migration differs from the embedded one is refused.
//!
//! Compatibility: `keygate_settings.min_keygate_version` (migration 3) names the oldest
//! keygate that may use the database. A build older than it refuses to open it
//! ([`OpenError::NeedsNewer`]); a build whose schema needs a newer reader than recorded
//! raises it ([`REQUIRES`]). A database with versions this build does not know, written by
//! a newer keygate that still allows this build, is used as is (migrations only add), with
//! a warning returned to the caller ([`SqlStore::warnings`]).
//!
//! [`SqlStore::warnings`]: crate::SqlStore::warnings
//!
//! [`SqlStore::open`]: crate::SqlStore::open

use std::collections::BTreeMap;

use sqlx::{Executor, PgPool, SqlitePool};

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
        version: 3,
        description: "meta",
        sql: include_str!("../migrations/sqlite/0003_meta.sql"),
    },
    Migration {
        version: 4,
        description: "scopes",
        sql: include_str!("../migrations/sqlite/0004_scopes.sql"),
    },
    Migration {
        version: 5,
        description: "lineage",
        sql: include_str!("../migrations/sqlite/0005_lineage.sql"),
    },
    Migration {
        version: 6,
        description: "iam",
        sql: include_str!("../migrations/sqlite/0006_iam.sql"),
    },
    Migration {
        version: 7,
        description: "last_used",
        sql: include_str!("../migrations/sqlite/0007_last_used.sql"),
    },
    Migration {
        version: 8,
        description: "mint",
        sql: include_str!("../migrations/sqlite/0008_mint.sql"),
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
        version: 3,
        description: "meta",
        sql: include_str!("../migrations/postgres/0003_meta.sql"),
    },
    Migration {
        version: 4,
        description: "scopes",
        sql: include_str!("../migrations/postgres/0004_scopes.sql"),
    },
    Migration {
        version: 5,
        description: "lineage",
        sql: include_str!("../migrations/postgres/0005_lineage.sql"),
    },
    Migration {
        version: 6,
        description: "iam",
        sql: include_str!("../migrations/postgres/0006_iam.sql"),
    },
    Migration {
        version: 7,
        description: "last_used",
        sql: include_str!("../migrations/postgres/0007_last_used.sql"),
    },
    Migration {
        version: 8,
        description: "mint",
        sql: include_str!("../migrations/postgres/0008_mint.sql"),
    },
];

/// This keygate's version (the workspace shares one).
pub(crate) const RUNNING: &str = env!("CARGO_PKG_VERSION");

/// The oldest keygate that can use a database this build has migrated: raised when a
/// release changes the schema in a way older builds would misread (they then refuse the
/// database instead of using it wrongly).
pub(crate) const REQUIRES: &str = "0.1.0";

/// The migration that creates `keygate_settings`.
const SETTINGS_VERSION: i64 = 3;

const MIN_VERSION: &str = "SELECT value FROM keygate_settings WHERE name = 'min_keygate_version'";

/// What opening found out, besides errors.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    /// The newest applied version.
    pub(crate) version: i64,
    /// Things the caller should be told (a schema newer than this build, ...).
    pub(crate) warnings: Vec<String>,
}

/// `MAJOR.MINOR.PATCH` as numbers (a pre-release or build suffix is ignored).
pub(crate) fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let core = text.trim().split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let mut next = || parts.next()?.parse::<u64>().ok();
    let v = (next()?, next()?, next()?);
    parts.next().is_none().then_some(v)
}

/// Refuses a database that needs a newer keygate than this one.
pub(crate) fn check_compatible(min: Option<&str>) -> Result<(), OpenError> {
    let Some(min) = min else { return Ok(()) };
    let needs = parse_version(min).ok_or_else(|| {
        OpenError::Migration(format!(
            "keygate_settings.min_keygate_version is not a version (MAJOR.MINOR.PATCH): {:?}",
            min.chars().take(32).collect::<String>()
        ))
    })?;
    let runs = parse_version(RUNNING).unwrap_or((0, 0, 0));
    if runs < needs {
        return Err(OpenError::NeedsNewer {
            needs: min.trim().to_owned(),
            runs: RUNNING.to_owned(),
        });
    }
    Ok(())
}

/// The warning for versions this build does not know, if any.
fn newer_warning(migrations: &[Migration], applied: &BTreeMap<i64, Vec<u8>>) -> Option<String> {
    let newest = applied.keys().next_back()?;
    let known = migrations.last()?;
    let unknown: Vec<String> = applied
        .keys()
        .filter(|v| **v > known.version)
        .map(i64::to_string)
        .collect();
    (*newest > known.version).then(|| {
        format!(
            "the database has schema version(s) {} from a newer keygate (this one, {RUNNING}, \
             knows up to {}); it allows this version, so it is used as is",
            unknown.join(", "),
            known.version
        )
    })
}

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

/// The oldest keygate the database allows, read with `$executor`; `None` before migration
/// 3 (no `keygate_settings` yet, no requirement). A macro rather than a generic function:
/// a generic executor makes the opening future lose `Send`.
macro_rules! read_min_version {
    ($executor:expr, $applied:expr) => {
        async {
            if !$applied.contains_key(&SETTINGS_VERSION) {
                return Ok::<Option<String>, OpenError>(None);
            }
            let row: Option<String> = sqlx::query_scalar(MIN_VERSION)
                .fetch_optional($executor)
                .await
                .map_err(|e| failed("reading keygate_settings", e))?;
            Ok(row)
        }
    };
}

/// Checks a database that needs no migration: compatible with this build, and what to
/// warn about.
fn current(
    migrations: &'static [Migration],
    applied: &BTreeMap<i64, Vec<u8>>,
    min: Option<&str>,
) -> Result<Opened, OpenError> {
    check_compatible(min)?;
    Ok(Opened {
        version: applied.keys().next_back().copied().unwrap_or(0),
        warnings: newer_warning(migrations, applied).into_iter().collect(),
    })
}

/// The value `min_keygate_version` should be raised to after migrating, if any.
fn raised(min: Option<&str>) -> Option<&'static str> {
    let now = min.and_then(parse_version).unwrap_or((0, 0, 0));
    (parse_version(REQUIRES).unwrap_or((0, 0, 0)) > now).then_some(REQUIRES)
}

/// Brings a SQLite database up to date.
pub(crate) async fn sqlite(pool: &SqlitePool) -> Result<Opened, OpenError> {
    // The fast path: a database already up to date needs no lock (so a server starts at
    // once even while another process holds the write lock for a bulk insert).
    if let Some(applied) = applied_unlocked(pool).await {
        if pending(SQLITE, &applied)?.is_empty() {
            let min = read_min_version!(pool, applied).await?;
            return current(SQLITE, &applied, min.as_deref());
        }
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| OpenError::Unavailable(format!("migration lock: {}", describe(&e))))?;
    sqlx::query(SQLITE_TABLE)
        .execute(&mut *tx)
        .await
        .map_err(|e| failed("creating keygate_migrations", e))?;
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM keygate_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| failed("reading keygate_migrations", e))?;
    let mut applied: BTreeMap<i64, Vec<u8>> = rows.into_iter().collect();
    check_compatible(read_min_version!(&mut *tx, applied).await?.as_deref())?;
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
    let min = read_min_version!(&mut *tx, applied).await?;
    if let Some(to) = raised(min.as_deref()) {
        sqlx::query("UPDATE keygate_settings SET value = $1 WHERE name = 'min_keygate_version'")
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("raising min_keygate_version", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| failed("committing migrations", e))?;
    current(SQLITE, &applied, raised(min.as_deref()).or(min.as_deref()))
}

/// Brings a PostgreSQL schema up to date, creating `create_schema` first if given.
pub(crate) async fn postgres(
    pool: &PgPool,
    create_schema: Option<&str>,
) -> Result<Opened, OpenError> {
    if let Some(applied) = applied_unlocked(pool).await {
        if pending(POSTGRES, &applied)?.is_empty() {
            let min = read_min_version!(pool, applied).await?;
            return current(POSTGRES, &applied, min.as_deref());
        }
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
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM keygate_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| failed("reading keygate_migrations", e))?;
    let mut applied: BTreeMap<i64, Vec<u8>> = rows.into_iter().collect();
    check_compatible(read_min_version!(&mut *tx, applied).await?.as_deref())?;
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
    let min = read_min_version!(&mut *tx, applied).await?;
    if let Some(to) = raised(min.as_deref()) {
        sqlx::query("UPDATE keygate_settings SET value = $1 WHERE name = 'min_keygate_version'")
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("raising min_keygate_version", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| failed("committing migrations", e))?;
    current(
        POSTGRES,
        &applied,
        raised(min.as_deref()).or(min.as_deref()),
    )
}

/// Read-only opening: checks that the database is current without writing anything (no
/// migration, no schema creation). `exists`: whether `keygate_migrations` exists.
fn read_only_check(
    migrations: &'static [Migration],
    exists: bool,
    applied: Option<BTreeMap<i64, Vec<u8>>>,
    min: Option<&str>,
) -> Result<Opened, OpenError> {
    let applied = match (exists, applied) {
        (false, _) | (true, None) => return Err(OpenError::NotInitialized),
        (true, Some(a)) => a,
    };
    check_compatible(min)?;
    let missing = pending(migrations, &applied)?;
    if let Some(first) = missing.first() {
        return Err(OpenError::Outdated {
            version: applied.keys().next_back().copied().unwrap_or(0),
            needs: migrations.last().map_or(first.version, |m| m.version),
        });
    }
    current(migrations, &applied, min)
}

/// Checks a SQLite database opened read-only. The outer error: the database could not be
/// read at all (the caller may retry differently); the inner one: its verdict.
pub(crate) async fn sqlite_read_only(
    pool: &SqlitePool,
) -> Result<Result<Opened, OpenError>, sqlx::Error> {
    let exists: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'keygate_migrations'",
    )
    .fetch_one(pool)
    .await?;
    let outcome = async {
        if exists == 0 {
            return read_only_check(SQLITE, false, None, None);
        }
        let applied = applied_unlocked(pool).await;
        let min = match &applied {
            Some(a) => read_min_version!(pool, a).await?,
            None => None,
        };
        read_only_check(SQLITE, true, applied, min.as_deref())
    }
    .await;
    Ok(outcome)
}

/// Checks a PostgreSQL schema opened read-only: `schema` (when named) must exist.
pub(crate) async fn postgres_read_only(
    pool: &PgPool,
    schema: Option<&str>,
) -> Result<Opened, OpenError> {
    let unavailable = |e: sqlx::Error| OpenError::Unavailable(describe(&e));
    if let Some(schema) = schema {
        let found: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(pool)
                .await
                .map_err(unavailable)?;
        if !found {
            return Err(OpenError::NoSchema(schema.to_owned()));
        }
    }
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('keygate_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    if !exists {
        return read_only_check(POSTGRES, false, None, None);
    }
    let applied = applied_unlocked(pool).await;
    let min = match &applied {
        Some(a) => read_min_version!(pool, a).await?,
        None => None,
    };
    read_only_check(POSTGRES, true, applied, min.as_deref())
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
        // Unknown newer versions are tolerated, and named in a warning.
        assert_eq!(newer_warning(SQLITE, &applied), None);
        applied.insert(999, vec![1]);
        assert!(pending(SQLITE, &applied).is_ok());
        let w = newer_warning(SQLITE, &applied).unwrap();
        assert!(
            w.contains("version(s) 999")
                && w.contains(&format!("knows up to {}", SQLITE[SQLITE.len() - 1].version)),
            "{w}"
        );
    }

    #[test]
    fn versions_are_compared_as_numbers() {
        assert_eq!(parse_version("0.10.2"), Some((0, 10, 2)));
        assert_eq!(parse_version("1.2.3-rc.1"), Some((1, 2, 3)));
        for bad in ["", "1.2", "1.2.3.4", "a.b.c", "1.-2.3"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert!(parse_version(RUNNING).is_some());
        assert!(parse_version(REQUIRES) <= parse_version(RUNNING));
        assert!(check_compatible(None).is_ok());
        assert!(check_compatible(Some(RUNNING)).is_ok());
        assert!(check_compatible(Some("0.0.1")).is_ok());
        let e = check_compatible(Some("0.100.0")).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("this database needs keygate >= 0.100.0; you run {RUNNING} (upgrade keygate to use it)")
        );
        assert!(matches!(
            check_compatible(Some("soon")),
            Err(OpenError::Migration(_))
        ));
        assert_eq!(raised(Some("0.0.9")), Some(REQUIRES));
        assert_eq!(raised(Some("99.0.0")), None);
    }
}
