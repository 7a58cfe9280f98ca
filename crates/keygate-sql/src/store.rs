//! [`SqlStore`]: the key store over SQLite or PostgreSQL.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use keygate_core::{
    Identity, KeyFilter, KeyId, KeyListing, KeyRecord, KeyStatus, KeyStore, Role, StatusWrite,
    StoreError,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

use crate::error::{describe, is_unique_violation, unavailable, OpenError};
use crate::options::{SqlOptions, POSTGRES_POLL_INTERVAL, SQLITE_POLL_INTERVAL};
use crate::row::{self, KeyRow, COLUMN_COUNT};
use crate::{migrate, Backend};

/// The column list of `keygate_keys`, as a literal, in [`KeyRow`]'s order.
macro_rules! key_columns {
    () => {
        "id, prefix, digest, name, owner, status, created_at, updated_at, expires_at, scopes, \
         resources, attributes, allowed_ips, rate_limits, quotas, metadata, rotated_from, lineage, \
         grants, roles, identity"
    };
}

/// Runs `$body` with `$pool` bound to whichever pool the store has.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

/// Binds a [`KeyRow`]'s 21 values in column order.
macro_rules! bind_row {
    ($query:expr, $row:expr) => {{
        let r = $row;
        $query
            .bind(r.id)
            .bind(r.prefix)
            .bind(r.digest)
            .bind(r.name)
            .bind(r.owner)
            .bind(r.status)
            .bind(r.created_at)
            .bind(r.updated_at)
            .bind(r.expires_at)
            .bind(r.scopes)
            .bind(r.resources)
            .bind(r.attributes)
            .bind(r.allowed_ips)
            .bind(r.rate_limits)
            .bind(r.quotas)
            .bind(r.metadata)
            .bind(r.rotated_from)
            .bind(r.lineage)
            .bind(r.grants)
            .bind(r.roles)
            .bind(r.identity)
    }};
}

/// Deletes changes older than `$before` (ms) in transaction `$tx`, records the highest
/// deleted number, and evaluates to how many rows went.
macro_rules! prune_in {
    ($tx:ident, $before:expr) => {{
        let through: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM keygate_changes WHERE at < $1")
                .bind($before)
                .fetch_one(&mut *$tx)
                .await?;
        match through {
            None => 0,
            Some(through) => {
                let deleted = sqlx::query("DELETE FROM keygate_changes WHERE seq <= $1")
                    .bind(through)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                sqlx::query(
                    "UPDATE keygate_meta SET value = $1 \
                     WHERE name = 'changes_pruned_through' AND value < $1",
                )
                .bind(through)
                .execute(&mut *$tx)
                .await?;
                deleted
            }
        }
    }};
}

/// The last-used time of the row's key (migration 7), beside the key's columns.
macro_rules! last_used_column {
    () => {
        ", (SELECT used_at FROM keygate_key_last_used WHERE key_id = keygate_keys.id) \
         AS last_used_at"
    };
}

const GET: &str = concat!(
    "SELECT ",
    key_columns!(),
    ", version",
    last_used_column!(),
    " FROM keygate_keys WHERE id = $1"
);

/// Raises a key's last-used time (never lowers it).
const SQLITE_LAST_USED: &str = "INSERT INTO keygate_key_last_used (key_id, used_at) \
     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM keygate_keys WHERE id = $1) \
     ON CONFLICT (key_id) DO UPDATE SET used_at = MAX(used_at, excluded.used_at)";
/// [`SQLITE_LAST_USED`] for many keys at once.
const PG_LAST_USED: &str = "INSERT INTO keygate_key_last_used (key_id, used_at) \
     SELECT u.k, u.t FROM UNNEST($1::text[], $2::int8[]) AS u(k, t) \
     WHERE EXISTS (SELECT 1 FROM keygate_keys WHERE id = u.k) \
     ON CONFLICT (key_id) DO UPDATE \
     SET used_at = GREATEST(keygate_key_last_used.used_at, EXCLUDED.used_at)";

const INSERT: &str = concat!(
    "INSERT INTO keygate_keys (",
    key_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20, $21)"
);

const UPDATE: &str = "UPDATE keygate_keys SET prefix = $2, digest = $3, name = $4, owner = $5, \
     status = $6, created_at = $7, updated_at = $8, expires_at = $9, scopes = $10, \
     resources = $11, attributes = $12, allowed_ips = $13, rate_limits = $14, quotas = $15, \
     metadata = $16, rotated_from = $17, lineage = $18, grants = $19, roles = $20, \
     identity = $21, version = version + 1 WHERE id = $1";

/// [`UPDATE`] only over the version the record was read with (compare-and-set).
const UPDATE_VERSIONED: &str = "UPDATE keygate_keys SET prefix = $2, digest = $3, name = $4, \
     owner = $5, status = $6, created_at = $7, updated_at = $8, expires_at = $9, scopes = $10, \
     resources = $11, attributes = $12, allowed_ips = $13, rate_limits = $14, quotas = $15, \
     metadata = $16, rotated_from = $17, lineage = $18, grants = $19, roles = $20, \
     identity = $21, version = version + 1 WHERE id = $1 AND version = $22";

/// Writes a status unless the row has it already or is revoked.
const SET_STATUS: &str = "UPDATE keygate_keys SET status = $2, updated_at = $3, \
     version = version + 1 \
     WHERE id = $1 AND status <> $2 AND status <> 'revoked'";

const LIST: &str = concat!(
    "SELECT ",
    key_columns!(),
    ", version",
    last_used_column!(),
    " FROM keygate_keys",
    " WHERE (CAST($1 AS TEXT) IS NULL OR owner = $1)",
    " AND (CAST($2 AS TEXT) IS NULL OR status = $2)",
    " AND (CAST($3 AS TEXT) IS NULL OR prefix = $3)",
    " ORDER BY created_at, id"
);

const PG_INSERT_MANY: &str = concat!(
    "INSERT INTO keygate_keys (",
    key_columns!(),
    ") SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], \
     $6::text[], $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::text[], $12::text[], \
     $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], \
     $19::text[], $20::text[], $21::text[])"
);

/// Rows per multi-row `INSERT` on SQLite (18 values each, well under SQLite's 32,766
/// parameters).
const SQLITE_BATCH: usize = 500;
/// Rows per `INSERT ... SELECT FROM UNNEST(...)` on PostgreSQL (18 array parameters).
const POSTGRES_BATCH: usize = 5_000;

pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) options: SqlOptions,
    /// PostgreSQL: how to connect (the change listener opens its own connection).
    pub(crate) pg_connect: Option<PgConnectOptions>,
    schema_version: i64,
    warnings: Vec<String>,
}

/// A [`KeyStore`] in SQLite (the embedded default) or PostgreSQL (shared by replicas),
/// chosen by URL. Cheap to clone; clones share one connection pool.
///
/// Opening applies the embedded migrations (see `SCHEMA.md` in this crate for the tables).
/// Every write advances the change sequence that [`SqlStore::watch`] follows.
#[derive(Clone)]
pub struct SqlStore {
    pub(crate) inner: Arc<Inner>,
}

impl SqlStore {
    /// Opens the database at `url` with default [`SqlOptions`], creating a SQLite file if
    /// missing, and applies the migrations.
    ///
    /// URLs: `sqlite://keygate.db` (a path relative to the working directory),
    /// `sqlite:///var/lib/keygate.db`, `sqlite::memory:` (a private in-memory database, for
    /// tests), `postgres://user:password@host:5432/database`.
    pub async fn open(url: &str) -> Result<SqlStore, OpenError> {
        Self::open_with(url, SqlOptions::default()).await
    }

    /// Opens the database at `url` with `options`.
    pub async fn open_with(url: &str, options: SqlOptions) -> Result<SqlStore, OpenError> {
        options.validate()?;
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Self::open_sqlite(url, options).await,
            "postgres" | "postgresql" => Self::open_postgres(url, options).await,
            _ => Err(OpenError::UnsupportedScheme),
        }
    }

    async fn open_sqlite(url: &str, options: SqlOptions) -> Result<SqlStore, OpenError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| OpenError::InvalidUrl(describe(&e)))?
            .busy_timeout(options.busy_timeout);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let (pool, opened) = if options.read_only {
            crate::files::open_sqlite_read_only(connect, &options, in_memory).await?
        } else {
            if !in_memory {
                crate::files::create_owner_only(connect.get_filename())?;
            }
            let connect = connect
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal);
            let pool = sqlite_pool(&options, in_memory)
                .connect_with(connect)
                .await
                .map_err(|e| OpenError::Unavailable(describe(&e)))?;
            let opened = migrate::sqlite(&pool).await?;
            (pool, opened)
        };
        for w in &opened.warnings {
            tracing::warn!("{w}");
        }
        Ok(SqlStore {
            inner: Arc::new(Inner {
                pool: Pool::Sqlite(pool),
                options,
                pg_connect: None,
                schema_version: opened.version,
                warnings: opened.warnings,
            }),
        })
    }

    async fn open_postgres(url: &str, options: SqlOptions) -> Result<SqlStore, OpenError> {
        let mut connect =
            PgConnectOptions::from_str(url).map_err(|e| OpenError::InvalidUrl(describe(&e)))?;
        if let Some(schema) = &options.schema {
            connect = connect.options([("search_path", schema.as_str())]);
        }
        if options.read_only {
            connect = connect.options([("default_transaction_read_only", "on")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.unwrap_or(10))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(|e| OpenError::Unavailable(describe(&e)))?;
        let opened = if options.read_only {
            migrate::postgres_read_only(&pool, options.schema.as_deref()).await
        } else {
            migrate::postgres(&pool, options.schema.as_deref()).await
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                pool.close().await;
                return Err(e);
            }
        };
        for w in &opened.warnings {
            tracing::warn!("{w}");
        }
        Ok(SqlStore {
            inner: Arc::new(Inner {
                pool: Pool::Postgres(pool),
                options,
                pg_connect: Some(connect),
                schema_version: opened.version,
                warnings: opened.warnings,
            }),
        })
    }

    /// What opening found that the caller should pass on (the CLI prints each on stderr):
    /// a schema written by a newer keygate that allows this one, a SQLite file read as an
    /// immutable snapshot. Empty normally.
    pub fn warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    /// Which database this store talks to.
    pub fn backend(&self) -> Backend {
        match self.inner.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// The newest schema version applied when the store was opened.
    pub fn schema_version(&self) -> i64 {
        self.inner.schema_version
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqlOptions {
        &self.inner.options
    }

    /// How often a change follower polls this store (see [`SqlOptions::poll_interval`]).
    pub fn poll_interval(&self) -> std::time::Duration {
        self.inner
            .options
            .poll_interval
            .unwrap_or(match self.backend() {
                Backend::Sqlite => SQLITE_POLL_INTERVAL,
                Backend::Postgres => POSTGRES_POLL_INTERVAL,
            })
    }

    /// Closes the pool: waits for checked-out connections to come back and closes them all.
    /// Every later operation on this store (and its clones) fails with
    /// `StoreError::Unavailable`.
    ///
    /// On a SQLite file opened for writing, first merges the write-ahead log into the file
    /// and empties it (best effort: skipped while another process reads), so the file alone
    /// holds every committed change even when a connection's close is cut short, and a
    /// reader that cannot write (see [`SqlOptions::read_only`]) can open it.
    pub async fn close(&self) {
        if let Pool::Sqlite(pool) = &self.inner.pool {
            if !self.inner.options.read_only && !pool.is_closed() {
                // Not cached, and read to the end: a statement left open would keep the
                // connection from closing cleanly.
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .persistent(false)
                    .fetch_all(pool)
                    .await
                {
                    tracing::debug!(error = %e, "SQLite checkpoint before close failed");
                }
            }
        }
        with_pool!(self, pool => pool.close().await)
    }

    /// Whether [`SqlStore::close`] was called.
    pub fn is_closed(&self) -> bool {
        with_pool!(self, pool => pool.is_closed())
    }

    /// Runs `f` within the operation timeout.
    pub(crate) async fn timed<T>(
        &self,
        op: &str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.inner.options.operation_timeout;
        match tokio::time::timeout(limit, f).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{op}: no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }

    /// Inserts many new records at once, all or none: batched multi-row `INSERT`s on
    /// SQLite (500 rows per statement), `INSERT ... SELECT FROM UNNEST(...)` on
    /// PostgreSQL (5,000 rows per statement), in one transaction. Returns how many rows
    /// were inserted.
    ///
    /// [`StoreError::AlreadyExists`] names the first record (in `records` order) whose id
    /// is already stored or repeated in `records`; nothing is inserted then. Each row
    /// advances the change sequence as a single [`KeyStore::insert`] would.
    pub async fn insert_many(&self, records: &[KeyRecord]) -> Result<u64, StoreError> {
        let mut seen = HashSet::with_capacity(records.len());
        for r in records {
            if !seen.insert(r.id) {
                return Err(StoreError::AlreadyExists(r.id));
            }
        }
        drop(seen);
        if records.is_empty() {
            return Ok(0);
        }
        let batches = records.len().div_ceil(match self.backend() {
            Backend::Sqlite => SQLITE_BATCH,
            Backend::Postgres => POSTGRES_BATCH,
        });
        // The operation timeout applies per batch.
        let limit =
            self.inner.options.operation_timeout * u32::try_from(batches).unwrap_or(u32::MAX);
        let result = match tokio::time::timeout(limit, self.insert_many_tx(records)).await {
            Ok(r) => r,
            Err(_) => Err(Conflict::Store(StoreError::Unavailable(format!(
                "insert_many: no answer within {} ms",
                limit.as_millis()
            )))),
        };
        match result {
            Ok(n) => Ok(n),
            Err(Conflict::Sql(e)) if is_unique_violation(&e) => {
                // Rolled back: find the first id that was already stored.
                Err(self.first_existing(records).await?)
            }
            Err(Conflict::Sql(e)) => Err(unavailable("insert_many", e)),
            Err(Conflict::Store(e)) => Err(e),
        }
    }

    async fn insert_many_tx(&self, records: &[KeyRecord]) -> Result<u64, Conflict> {
        let mut inserted = 0u64;
        match &self.inner.pool {
            Pool::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let full = sqlite_values(SQLITE_BATCH);
                for chunk in records.chunks(SQLITE_BATCH) {
                    let partial;
                    let sql = if chunk.len() == SQLITE_BATCH {
                        &full
                    } else {
                        partial = sqlite_values(chunk.len());
                        &partial
                    };
                    let mut q = sqlx::query(sql);
                    for r in chunk {
                        q = bind_row!(q, KeyRow::from_record(r)?);
                    }
                    inserted += q.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                for chunk in records.chunks(POSTGRES_BATCH) {
                    let c = PgColumns::from_records(chunk)?;
                    inserted += sqlx::query(PG_INSERT_MANY)
                        .bind(c.id)
                        .bind(c.prefix)
                        .bind(c.digest)
                        .bind(c.name)
                        .bind(c.owner)
                        .bind(c.status)
                        .bind(c.created_at)
                        .bind(c.updated_at)
                        .bind(c.expires_at)
                        .bind(c.scopes)
                        .bind(c.resources)
                        .bind(c.attributes)
                        .bind(c.allowed_ips)
                        .bind(c.rate_limits)
                        .bind(c.quotas)
                        .bind(c.metadata)
                        .bind(c.rotated_from)
                        .bind(c.lineage)
                        .bind(c.grants)
                        .bind(c.roles)
                        .bind(c.identity)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
            }
        }
        Ok(inserted)
    }

    /// The first record of `records` whose id is stored, as `AlreadyExists`.
    async fn first_existing(&self, records: &[KeyRecord]) -> Result<StoreError, StoreError> {
        const CHUNK: usize = 500;
        for chunk in records.chunks(CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|r| r.id.as_str().to_owned()).collect();
            let found: Vec<String> = self
                .timed("insert_many", async {
                    let rows: Vec<String> = match &self.inner.pool {
                        Pool::Sqlite(pool) => {
                            let sql = format!(
                                "SELECT id FROM keygate_keys WHERE id IN ({})",
                                vec!["?"; ids.len()].join(", ")
                            );
                            let mut q = sqlx::query_scalar(&sql);
                            for id in &ids {
                                q = q.bind(id);
                            }
                            q.fetch_all(pool).await
                        }
                        Pool::Postgres(pool) => {
                            sqlx::query_scalar("SELECT id FROM keygate_keys WHERE id = ANY($1)")
                                .bind(&ids)
                                .fetch_all(pool)
                                .await
                        }
                    }
                    .map_err(|e| unavailable("insert_many", e))?;
                    Ok(rows)
                })
                .await?;
            if let Some(r) = chunk
                .iter()
                .find(|r| found.iter().any(|f| f == r.id.as_str()))
            {
                return Ok(StoreError::AlreadyExists(r.id));
            }
        }
        Err(StoreError::Unavailable(
            "insert_many: an id was taken while inserting; nothing was inserted".into(),
        ))
    }

    /// The highest change number so far (0 for a new database). A follower started now
    /// reports changes after it.
    pub async fn last_change(&self) -> Result<i64, StoreError> {
        self.timed("last_change", async {
            let (max, pruned): (Option<i64>, i64) = with_pool!(self, pool => {
                let max = sqlx::query_scalar("SELECT MAX(seq) FROM keygate_changes")
                    .fetch_one(pool)
                    .await;
                match max {
                    Ok(max) => sqlx::query_scalar(PRUNED_THROUGH)
                        .fetch_one(pool)
                        .await
                        .map(|p| (max, p)),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| unavailable("last_change", e))?;
            Ok(max.unwrap_or(0).max(pruned))
        })
        .await
    }

    /// Up to `limit` changes numbered above `after`, oldest first.
    pub async fn changes_since(&self, after: i64, limit: u32) -> Result<Vec<Change>, StoreError> {
        self.timed("changes_since", async {
            let rows: Vec<(i64, String, i64)> = with_pool!(self, pool => {
                sqlx::query_as(
                    "SELECT seq, key_id, at FROM keygate_changes WHERE seq > $1 \
                     ORDER BY seq LIMIT $2",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
            })
            .map_err(|e| unavailable("changes_since", e))?;
            Ok(rows
                .into_iter()
                .map(|(seq, key_id, at)| Change {
                    seq,
                    key_id: KeyId::parse(&key_id).ok(),
                    at: row::from_ms(at).unwrap_or(std::time::UNIX_EPOCH),
                })
                .collect())
        })
        .await
    }

    /// The highest change number deleted by [`SqlStore::prune_changes`] (0 if none).
    pub async fn pruned_through(&self) -> Result<i64, StoreError> {
        self.timed("pruned_through", async {
            with_pool!(self, pool => sqlx::query_scalar(PRUNED_THROUGH).fetch_one(pool).await)
                .map_err(|e| unavailable("pruned_through", e))
        })
        .await
    }

    /// The highest change number deleted by pruning and the highest change number still
    /// stored (`None` when the table is empty), read in one statement.
    pub(crate) async fn sequence_bounds(&self) -> Result<(i64, Option<i64>), StoreError> {
        self.timed("sequence_bounds", async {
            let (pruned, newest): (Option<i64>, Option<i64>) = with_pool!(self, pool => {
                sqlx::query_as(SEQUENCE_BOUNDS).fetch_one(pool).await
            })
            .map_err(|e| unavailable("sequence_bounds", e))?;
            Ok((pruned.unwrap_or(0), newest))
        })
        .await
    }

    /// Deletes the changes recorded before `before` and returns how many. A follower whose
    /// position falls in the deleted range notices it and clears its verifier's cache
    /// ([`ChangeHandler::resync`](keygate_core::ChangeHandler::resync)) instead of missing
    /// changes. Keep at least a few minutes of history so a follower that lost its
    /// connection briefly can catch up change by change.
    pub async fn prune_changes(&self, before: SystemTime) -> Result<u64, StoreError> {
        let before = row::to_ms(before);
        self.timed("prune_changes", async {
            let deleted: Result<u64, sqlx::Error> = match &self.inner.pool {
                Pool::Sqlite(pool) => {
                    async {
                        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                        let n = prune_in!(tx, before);
                        tx.commit().await?;
                        Ok(n)
                    }
                    .await
                }
                Pool::Postgres(pool) => {
                    async {
                        let mut tx = pool.begin().await?;
                        let n = prune_in!(tx, before);
                        tx.commit().await?;
                        Ok(n)
                    }
                    .await
                }
            };
            deleted.map_err(|e| unavailable("prune_changes", e))
        })
        .await
    }

    /// The current schema name on PostgreSQL (the first of `search_path`), for matching
    /// notifications to this store.
    pub(crate) async fn pg_current_schema(&self) -> Result<String, StoreError> {
        match &self.inner.pool {
            Pool::Postgres(pool) => {
                self.timed("current_schema", async {
                    sqlx::query_scalar::<_, Option<String>>("SELECT current_schema()")
                        .fetch_one(pool)
                        .await
                        .map(Option::unwrap_or_default)
                        .map_err(|e| unavailable("current_schema", e))
                })
                .await
            }
            Pool::Sqlite(_) => Ok(String::new()),
        }
    }
}

const PRUNED_THROUGH: &str = "SELECT value FROM keygate_meta WHERE name = 'changes_pruned_through'";

const SEQUENCE_BOUNDS: &str = "SELECT \
     (SELECT value FROM keygate_meta WHERE name = 'changes_pruned_through'), \
     (SELECT MAX(seq) FROM keygate_changes)";
/// The SQLite pool settings for `options`.
pub(crate) fn sqlite_pool(options: &SqlOptions, in_memory: bool) -> SqlitePoolOptions {
    let pool = SqlitePoolOptions::new()
        .acquire_timeout(options.acquire_timeout)
        // A local file: no network between the pool and the database to test.
        .test_before_acquire(false);
    if in_memory {
        // The database lives as long as a connection does: keep exactly one.
        pool.max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        pool.max_connections(options.max_connections.unwrap_or(4))
    }
}

/// `INSERT INTO keygate_keys (...) VALUES (?, ...), ...` for `rows` rows.
fn sqlite_values(rows: usize) -> String {
    let one = format!("({})", vec!["?"; COLUMN_COUNT].join(", "));
    let mut sql = String::with_capacity(64 + rows * (one.len() + 2));
    sql.push_str(concat!(
        "INSERT INTO keygate_keys (",
        key_columns!(),
        ") VALUES "
    ));
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&one);
    }
    sql
}

/// A batch of records as one array per column (PostgreSQL `UNNEST`).
#[derive(Default)]
struct PgColumns {
    id: Vec<String>,
    prefix: Vec<String>,
    digest: Vec<Vec<u8>>,
    name: Vec<String>,
    owner: Vec<Option<String>>,
    status: Vec<String>,
    created_at: Vec<i64>,
    updated_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
    scopes: Vec<String>,
    resources: Vec<String>,
    attributes: Vec<String>,
    allowed_ips: Vec<String>,
    rate_limits: Vec<String>,
    quotas: Vec<String>,
    metadata: Vec<String>,
    rotated_from: Vec<Option<String>>,
    lineage: Vec<Option<String>>,
    grants: Vec<String>,
    roles: Vec<String>,
    identity: Vec<Option<String>>,
}

impl PgColumns {
    fn from_records(records: &[KeyRecord]) -> Result<Self, StoreError> {
        let mut c = PgColumns::default();
        for r in records {
            let r = KeyRow::from_record(r)?;
            c.id.push(r.id);
            c.prefix.push(r.prefix);
            c.digest.push(r.digest);
            c.name.push(r.name);
            c.owner.push(r.owner);
            c.status.push(r.status.to_owned());
            c.created_at.push(r.created_at);
            c.updated_at.push(r.updated_at);
            c.expires_at.push(r.expires_at);
            c.scopes.push(r.scopes);
            c.resources.push(r.resources);
            c.attributes.push(r.attributes);
            c.allowed_ips.push(r.allowed_ips);
            c.rate_limits.push(r.rate_limits);
            c.quotas.push(r.quotas);
            c.metadata.push(r.metadata);
            c.rotated_from.push(r.rotated_from);
            c.lineage.push(r.lineage);
            c.grants.push(r.grants);
            c.roles.push(r.roles);
            c.identity.push(r.identity);
        }
        Ok(c)
    }
}

/// A bulk insert's failure before it is classified.
enum Conflict {
    Sql(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for Conflict {
    fn from(e: sqlx::Error) -> Self {
        Conflict::Sql(e)
    }
}

impl From<StoreError> for Conflict {
    fn from(e: StoreError) -> Self {
        Conflict::Store(e)
    }
}

/// One entry of the change sequence: the key row `key_id` was inserted, updated or
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its number; numbers grow in commit order.
    pub seq: i64,
    /// The key that changed; `None` if the row names no valid key id (a row written by
    /// hand), which no verifier can have cached.
    pub key_id: Option<KeyId>,
    /// When the change was written (database clock, millisecond precision).
    pub at: SystemTime,
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("get", async {
            let found = with_pool!(self, pool => {
                sqlx::query(GET)
                    .bind(id.as_str())
                    .fetch_optional(pool)
                    .await
                    .map(|row| row.as_ref().map(row::decode))
            })
            .map_err(|e| unavailable("get", e))?;
            found.transpose()
        })
        .await
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let row = KeyRow::from_record(record)?;
        self.timed("insert", async {
            let done = with_pool!(self, pool => {
                bind_row!(sqlx::query(INSERT), row).execute(pool).await.map(|_| ())
            });
            done.map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists(record.id)
                } else {
                    unavailable("insert", e)
                }
            })
        })
        .await
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let row = KeyRow::from_record(record)?;
        self.timed("update", async {
            let n = with_pool!(self, pool => {
                bind_row!(sqlx::query(UPDATE), row)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            })
            .map_err(|e| unavailable("update", e))?;
            if n == 0 {
                Err(StoreError::NotFound(record.id))
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let listing = self.list_report(filter).await?;
        for row in &listing.skipped {
            tracing::warn!(key_id = %row.id, column = %row.column, reason = %row.reason, "key listing: left out a row that cannot be read");
        }
        Ok(listing.records)
    }

    async fn list_report(&self, filter: &KeyFilter) -> Result<KeyListing, StoreError> {
        let owner = filter.owner.as_deref();
        let status = filter.status.map(|s| s.as_str());
        let prefix = filter.prefix.as_deref();
        // A long list may take as long as it needs, but each row must arrive within the
        // operation timeout (a database that stops answering mid-list is Unavailable).
        let limit = self.inner.options.operation_timeout;
        with_pool!(self, pool => {
            let mut out = KeyListing::default();
            let mut rows = sqlx::query(LIST)
                .bind(owner)
                .bind(status)
                .bind(prefix)
                .fetch(pool);
            loop {
                match tokio::time::timeout(limit, rows.try_next()).await {
                    Ok(Ok(Some(row))) => match row::decode_checked(&row) {
                        Ok(record) => out.records.push(record),
                        // One damaged row must not hide the others.
                        Err(bad) => out.skipped.push(bad.into_skipped()),
                    },
                    Ok(Ok(None)) => break Ok(out),
                    Ok(Err(e)) => break Err(unavailable("list", e)),
                    Err(_) => {
                        break Err(StoreError::Unavailable(format!(
                            "list: no row within {} ms",
                            limit.as_millis()
                        )))
                    }
                }
            }
        })
    }

    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let row = KeyRow::from_record(record)?;
        let version = i64::try_from(record.version).unwrap_or(i64::MAX);
        self.timed("update_versioned", async {
            let result: Result<(u64, bool), sqlx::Error> = with_pool!(self, pool => {
                async {
                    let n = bind_row!(sqlx::query(UPDATE_VERSIONED), row)
                        .bind(version)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    if n > 0 {
                        return Ok((n, true));
                    }
                    let exists: Option<i64> =
                        sqlx::query_scalar("SELECT version FROM keygate_keys WHERE id = $1")
                            .bind(record.id.as_str())
                            .fetch_optional(pool)
                            .await?;
                    Ok((0, exists.is_some()))
                }
                .await
            });
            match result.map_err(|e| unavailable("update_versioned", e))? {
                (n, _) if n > 0 => Ok(()),
                (_, true) => Err(StoreError::Conflict {
                    kind: "key",
                    name: record.id.to_string(),
                }),
                (_, false) => Err(StoreError::NotFound(record.id)),
            }
        })
        .await
    }

    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        self.roles_sql(names).await
    }

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        self.list_roles_sql().await
    }

    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        self.insert_role_sql(role).await
    }

    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        self.update_role_sql(role).await
    }

    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_role_sql(name).await
    }

    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.keys_with_role_sql(name).await
    }

    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        self.get_identity_sql(name).await
    }

    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.list_identities_sql().await
    }

    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.insert_identity_sql(identity).await
    }

    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.update_identity_sql(identity).await
    }

    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        self.delete_identity_sql(name).await
    }

    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.keys_with_identity_sql(name).await
    }

    /// One `UPDATE` of the status and `updated_at` columns only (a revoked row is left
    /// alone), so it works on a row whose other columns cannot be read.
    async fn record_last_used(&self, used: &[(KeyId, SystemTime)]) -> Result<(), StoreError> {
        // One row per key, the latest time (PostgreSQL refuses to update a row twice in
        // one statement).
        let mut latest: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (id, at) in used {
            let ms = row::to_ms(*at);
            latest
                .entry(id.as_str())
                .and_modify(|t| *t = (*t).max(ms))
                .or_insert(ms);
        }
        if latest.is_empty() {
            return Ok(());
        }
        self.timed("record_last_used", async {
            let done: Result<(), sqlx::Error> = match &self.inner.pool {
                Pool::Sqlite(pool) => {
                    async {
                        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                        for (id, ms) in &latest {
                            sqlx::query(SQLITE_LAST_USED)
                                .bind(*id)
                                .bind(*ms)
                                .execute(&mut *tx)
                                .await?;
                        }
                        tx.commit().await
                    }
                    .await
                }
                Pool::Postgres(pool) => {
                    let ids: Vec<&str> = latest.keys().copied().collect();
                    let times: Vec<i64> = latest.values().copied().collect();
                    sqlx::query(PG_LAST_USED)
                        .bind(ids)
                        .bind(times)
                        .execute(pool)
                        .await
                        .map(|_| ())
                }
            };
            done.map_err(|e| unavailable("record_last_used", e))
        })
        .await
    }

    async fn set_status(
        &self,
        id: &KeyId,
        status: KeyStatus,
        at: SystemTime,
    ) -> Result<StatusWrite, StoreError> {
        let at = row::to_ms(at);
        self.timed("set_status", async {
            let found: Result<(u64, Option<String>), sqlx::Error> = with_pool!(self, pool => {
                async {
                    let n = sqlx::query(SET_STATUS)
                        .bind(id.as_str())
                        .bind(status.as_str())
                        .bind(at)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    if n > 0 {
                        return Ok((n, None));
                    }
                    let now: Option<String> =
                        sqlx::query_scalar("SELECT status FROM keygate_keys WHERE id = $1")
                            .bind(id.as_str())
                            .fetch_optional(pool)
                            .await?;
                    Ok((0, now))
                }
                .await
            });
            match found.map_err(|e| unavailable("set_status", e))? {
                (n, _) if n > 0 => Ok(StatusWrite::Written),
                (_, None) => Err(StoreError::NotFound(*id)),
                (_, Some(now)) if now == KeyStatus::Revoked.as_str() => Ok(StatusWrite::Revoked),
                (_, Some(_)) => Ok(StatusWrite::Unchanged),
            }
        })
        .await
    }
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (size, idle) = with_pool!(self, pool => (pool.size(), pool.num_idle()));
        f.debug_struct("SqlStore")
            .field("backend", &self.backend())
            .field("schema", &self.inner.options.schema)
            .field("schema_version", &self.inner.schema_version)
            .field("read_only", &self.inner.options.read_only)
            .field("connections", &size)
            .field("idle", &idle)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: the public futures can be spawned on a multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(store: SqlStore, records: &'static [KeyRecord]) {
        fn spawnable<T: Future + Send + 'static>(_: T) {}
        spawnable(async { SqlStore::open("sqlite::memory:").await });
        let s = store.clone();
        spawnable(async move { s.insert_many(records).await });
        let s = store.clone();
        spawnable(async move { s.prune_changes(SystemTime::now()).await });
        let s = store.clone();
        spawnable(async move { s.last_change().await });
        let s = store.clone();
        let v = keygate_core::Verifier::new(keygate_core::MemoryStore::new());
        spawnable(async move { s.follow(v).await.is_ok() });
    }

    #[test]
    fn column_list_and_bulk_statement_agree() {
        assert_eq!(key_columns!().split(',').count(), COLUMN_COUNT);
        let sql = sqlite_values(3);
        assert_eq!(sql.matches('?').count(), 3 * COLUMN_COUNT);
        assert_eq!(PG_INSERT_MANY.matches("[]").count(), COLUMN_COUNT);
    }
}
