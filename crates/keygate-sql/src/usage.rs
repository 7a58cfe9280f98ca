//! [`SqlUsageStore`]: quota counters in the `keygate_usage` table, for SQLite and
//! PostgreSQL, sharing a [`SqlStore`]'s connection pool.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::SystemTime;

use async_trait::async_trait;
use keygate_core::usage::{
    violated_limits, Admission, Increment, Limit, Usage, UsageError, UsageRecord, UsageStore,
    Window,
};
use keygate_core::{KeyId, QuotaWindow, Refill};
use sqlx::Row;

use crate::error::describe;
use crate::row::{from_ms, to_ms};
use crate::store::{Pool, SqlStore};

/// Quota usage counters in the `keygate_usage` table of a [`SqlStore`]'s database (see
/// `SCHEMA.md`). Made by [`SqlStore::usage_store`]; cheap to clone, clones and the store
/// share one connection pool.
///
/// ```
/// use keygate_core::usage::{Admission, Limit, UsageStore, Window};
/// use keygate_core::{KeyId, QuotaWindow};
/// use keygate_sql::SqlStore;
/// use std::time::SystemTime;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = SqlStore::open("sqlite::memory:").await.unwrap();
/// let usage = store.usage_store();
/// let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
/// let day = Window::containing(QuotaWindow::Day, SystemTime::now());
/// let limits = [Limit { window: 0, limit: 2 }];
/// for _ in 0..2 {
///     let a = usage.check_and_add(&key, &[day], &limits, 1).await.unwrap();
///     assert!(matches!(a, Admission::Admitted(_)));
/// }
/// let refused = usage.check_and_add(&key, &[day], &limits, 1).await.unwrap();
/// assert!(matches!(refused, Admission::Refused { ref violated, .. } if violated == &[0]));
/// assert_eq!(usage.load(&key, &[day]).await.unwrap()[0].cost, 2);
/// # }
/// ```
///
/// # Atomicity
/// [`UsageStore::check_and_add`] reads, decides and writes in one transaction that holds a
/// lock on the key's counters from the read to the commit, so concurrent calls (other
/// tasks, other processes, other replicas) never push a window over its limit:
/// - SQLite: `BEGIN IMMEDIATE` takes the database's write lock before the read (other
///   writers wait for it through the busy timeout).
/// - PostgreSQL: the missing counter rows are created (`INSERT .. ON CONFLICT DO NOTHING`),
///   then read with `SELECT .. FOR UPDATE` (row locks held to the commit), in one fixed
///   order (window kind, then start) so two calls never wait on each other in a cycle.
///   A refused call rolls back, leaving no empty rows.
///
/// # Numbers
/// Counters are stored as signed 64-bit integers: values above `i64::MAX` are clamped
/// there (additions saturate in the database too), subtractions stop at zero. A negative
/// or unreadable stored value is [`UsageError::Corrupt`]; every database failure is
/// [`UsageError::Unavailable`] (the quota layer then answers `store_unavailable`: fail
/// closed).
#[derive(Clone)]
pub struct SqlUsageStore {
    store: SqlStore,
}

impl SqlStore {
    /// A [`UsageStore`] over this store's database and connection pool.
    pub fn usage_store(&self) -> SqlUsageStore {
        SqlUsageStore {
            store: self.clone(),
        }
    }
}

/// The `window_kind` column of a window kind: `hour`, `day`, `month`, `credits`,
/// `credits_daily`, or `credits_monthly_<day>` (the refill day, 1 to 31).
pub fn window_kind(kind: QuotaWindow) -> String {
    match kind {
        QuotaWindow::Credits(Refill::Monthly { day }) => format!("credits_monthly_{day}"),
        other => other.as_str().to_owned(),
    }
}

/// The window kind of a `window_kind` column value (see [`window_kind`]).
pub fn parse_window_kind(text: &str) -> Option<QuotaWindow> {
    Some(match text {
        "hour" => QuotaWindow::Hour,
        "day" => QuotaWindow::Day,
        "month" => QuotaWindow::Month,
        "credits" => QuotaWindow::Credits(Refill::Never),
        "credits_daily" => QuotaWindow::Credits(Refill::Daily),
        other => {
            let day: u8 = other.strip_prefix("credits_monthly_")?.parse().ok()?;
            if !(1..=31).contains(&day) {
                return None;
            }
            QuotaWindow::Credits(Refill::Monthly { day })
        }
    })
}

/// A counter value for a column (clamped at `i64::MAX`).
fn to_col(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A window's identity in the table: kind text and start (ms).
type WindowKey = (String, i64);

fn window_key(w: &Window) -> WindowKey {
    (window_kind(w.kind), to_ms(w.start))
}

fn unavailable(op: &str, e: sqlx::Error) -> UsageError {
    UsageError::Unavailable(format!("{op}: {}", describe(&e)))
}

/// A row's counter, checked.
fn counter(op: &str, what: &str, v: i64) -> Result<u64, UsageError> {
    u64::try_from(v).map_err(|_| UsageError::Corrupt(format!("{op}: {what} is negative ({v})")))
}

/// One counter row as read.
struct Counted {
    key: WindowKey,
    usage: Usage,
}

fn decode_counted<'r, R>(op: &str, row: &'r R) -> Result<Counted, UsageError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let bad = |e: sqlx::Error| UsageError::Corrupt(format!("{op}: {}", describe(&e)));
    let kind: String = row.try_get(0).map_err(bad)?;
    let start: i64 = row.try_get(1).map_err(bad)?;
    let cost: i64 = row.try_get(2).map_err(bad)?;
    let requests: i64 = row.try_get(3).map_err(bad)?;
    Ok(Counted {
        key: (kind, start),
        usage: Usage {
            cost: counter(op, "cost", cost)?,
            requests: counter(op, "requests", requests)?,
        },
    })
}

/// The distinct windows of a call, in the table's lock order (kind, then start), with
/// their ends.
fn distinct(windows: &[Window]) -> BTreeMap<WindowKey, Option<i64>> {
    windows
        .iter()
        .map(|w| (window_key(w), w.end.map(to_ms)))
        .collect()
}

/// Increments merged per (key, window), in lock order.
fn merge(increments: &[Increment]) -> BTreeMap<(String, String, i64), (Option<i64>, Usage)> {
    let mut out: BTreeMap<(String, String, i64), (Option<i64>, Usage)> = BTreeMap::new();
    for inc in increments {
        let (kind, start) = window_key(&inc.window);
        let entry = out
            .entry((inc.key.as_str().to_owned(), kind, start))
            .or_insert((inc.window.end.map(to_ms), Usage::default()));
        entry.1 = entry.1.plus(inc.usage);
    }
    out
}

/// The decision of a check-and-add over the usage read under the lock: the answer, and
/// (when admitted) the new value of each distinct window.
fn decide(
    windows: &[Window],
    stored: &BTreeMap<WindowKey, Usage>,
    limits: &[Limit],
    cost: u64,
) -> (Admission, Option<BTreeMap<WindowKey, Usage>>) {
    let keys: Vec<WindowKey> = windows.iter().map(window_key).collect();
    let usage: Vec<Usage> = keys
        .iter()
        .map(|k| stored.get(k).copied().unwrap_or_default())
        .collect();
    let violated = violated_limits(&usage, limits, cost);
    if !violated.is_empty() {
        return (Admission::Refused { usage, violated }, None);
    }
    // As the in-memory store does: each listed window gets one addition, in order (a
    // window listed twice counts twice).
    let one = Usage { cost, requests: 1 };
    let mut next = stored.clone();
    let mut after = Vec::with_capacity(keys.len());
    for k in keys {
        let u = next.entry(k).or_default();
        *u = u.plus(one);
        after.push(*u);
    }
    (Admission::Admitted(after), Some(next))
}

// Saturating arithmetic in SQL (both backends): `cost + x` clamped at i64::MAX, and
// `cost - x` clamped at zero.
const ADD_COST: &str = "CASE WHEN keygate_usage.cost > 9223372036854775807 - excluded.cost \
     THEN 9223372036854775807 ELSE keygate_usage.cost + excluded.cost END";
const ADD_REQUESTS: &str =
    "CASE WHEN keygate_usage.requests > 9223372036854775807 - excluded.requests \
     THEN 9223372036854775807 ELSE keygate_usage.requests + excluded.requests END";

impl SqlUsageStore {
    /// The store whose pool this uses.
    pub fn store(&self) -> &SqlStore {
        &self.store
    }

    /// Runs `f` within the store's operation timeout.
    async fn timed<T>(
        &self,
        op: &str,
        f: impl Future<Output = Result<T, UsageError>>,
    ) -> Result<T, UsageError> {
        let limit = self.store.options().operation_timeout;
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(UsageError::Unavailable(format!(
                "{op}: no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }

    /// What every key used in every window that starts in `[from, to)`, ordered by key,
    /// then window start, then kind. For reports (`keygate usage`).
    pub async fn report_all(
        &self,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        self.report_where(None, from, to).await
    }

    /// Deletes the counters of every window that ended at or before `before`; returns how
    /// many rows went. Counters of credits that never refill are kept. Not automatic: call
    /// it from a maintenance job, keeping what reports need.
    pub async fn prune(&self, before: SystemTime) -> Result<u64, UsageError> {
        let before = to_ms(before);
        self.timed("prune", async {
            let sql = "DELETE FROM keygate_usage WHERE window_end IS NOT NULL AND window_end <= $1";
            let done = match &self.store.inner.pool {
                Pool::Sqlite(pool) => sqlx::query(sql)
                    .bind(before)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected()),
                Pool::Postgres(pool) => sqlx::query(sql)
                    .bind(before)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected()),
            };
            done.map_err(|e| unavailable("prune", e))
        })
        .await
    }

    async fn report_where(
        &self,
        key: Option<&KeyId>,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        const SQL: &str = "SELECT key_id, window_kind, window_start, window_end, cost, requests \
             FROM keygate_usage \
             WHERE (CAST($1 AS TEXT) IS NULL OR key_id = $1) \
             AND window_start >= $2 AND window_start < $3 \
             ORDER BY key_id, window_start, window_kind";
        let (from, to) = (to_ms(from), to_ms(to));
        let key = key.map(|k| k.as_str().to_owned());
        self.timed("report", async {
            type Raw = (String, String, i64, Option<i64>, i64, i64);
            let rows: Vec<Raw> = match &self.store.inner.pool {
                Pool::Sqlite(pool) => {
                    sqlx::query_as(SQL)
                        .bind(&key)
                        .bind(from)
                        .bind(to)
                        .fetch_all(pool)
                        .await
                }
                Pool::Postgres(pool) => {
                    sqlx::query_as(SQL)
                        .bind(&key)
                        .bind(from)
                        .bind(to)
                        .fetch_all(pool)
                        .await
                }
            }
            .map_err(|e| unavailable("report", e))?;
            rows.into_iter()
                .map(|(key_id, kind, start, end, cost, requests)| {
                    let corrupt = |what: &str| {
                        UsageError::Corrupt(format!(
                            "report: key {key_id:?} window {kind:?} at {start}: {what}"
                        ))
                    };
                    let key = KeyId::parse(&key_id).map_err(|_| corrupt("not a key id"))?;
                    let kind_v = parse_window_kind(&kind).ok_or_else(|| corrupt("unknown kind"))?;
                    let start_t = from_ms(start).ok_or_else(|| corrupt("bad start"))?;
                    let end_t = match end {
                        Some(e) => Some(from_ms(e).ok_or_else(|| corrupt("bad end"))?),
                        None => None,
                    };
                    Ok(UsageRecord {
                        key,
                        window: Window {
                            kind: kind_v,
                            start: start_t,
                            end: end_t,
                        },
                        usage: Usage {
                            cost: counter("report", "cost", cost)?,
                            requests: counter("report", "requests", requests)?,
                        },
                    })
                })
                .collect()
        })
        .await
    }

    async fn check_and_add_sqlite(
        pool: &sqlx::SqlitePool,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        let op = "check_and_add";
        let wanted = distinct(windows);
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| unavailable(op, e))?;
        let mut stored = BTreeMap::new();
        for (kind, start) in wanted.keys() {
            let row = sqlx::query(
                "SELECT window_kind, window_start, cost, requests FROM keygate_usage \
                 WHERE key_id = ?1 AND window_kind = ?2 AND window_start = ?3",
            )
            .bind(key.as_str())
            .bind(kind)
            .bind(start)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| unavailable(op, e))?;
            if let Some(row) = row {
                let c = decode_counted(op, &row)?;
                stored.insert(c.key, c.usage);
            }
        }
        let (answer, next) = decide(windows, &stored, limits, cost);
        let Some(next) = next else {
            // Nothing was written: ending the transaction either way is the same.
            let _ = tx.rollback().await;
            return Ok(answer);
        };
        for ((kind, start), usage) in &next {
            let end = wanted.get(&(kind.clone(), *start)).copied().flatten();
            sqlx::query(
                "INSERT INTO keygate_usage \
                 (key_id, window_kind, window_start, window_end, cost, requests) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (key_id, window_kind, window_start) \
                 DO UPDATE SET cost = excluded.cost, requests = excluded.requests",
            )
            .bind(key.as_str())
            .bind(kind)
            .bind(start)
            .bind(end)
            .bind(to_col(usage.cost))
            .bind(to_col(usage.requests))
            .execute(&mut *tx)
            .await
            .map_err(|e| unavailable(op, e))?;
        }
        tx.commit().await.map_err(|e| unavailable(op, e))?;
        Ok(answer)
    }

    async fn check_and_add_postgres(
        pool: &sqlx::PgPool,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        let op = "check_and_add";
        let wanted = distinct(windows);
        let kinds: Vec<&str> = wanted.keys().map(|(k, _)| k.as_str()).collect();
        let starts: Vec<i64> = wanted.keys().map(|(_, s)| *s).collect();
        let ends: Vec<Option<i64>> = wanted.values().copied().collect();
        let mut tx = pool.begin().await.map_err(|e| unavailable(op, e))?;
        // Make sure every counter row exists, so the next statement can lock it. Rows are
        // inserted in lock order.
        sqlx::query(
            "INSERT INTO keygate_usage \
             (key_id, window_kind, window_start, window_end, cost, requests) \
             SELECT $1, k, s, e, 0, 0 \
             FROM UNNEST($2::text[], $3::int8[], $4::int8[]) WITH ORDINALITY AS t(k, s, e, n) \
             ORDER BY n \
             ON CONFLICT (key_id, window_kind, window_start) DO NOTHING",
        )
        .bind(key.as_str())
        .bind(&kinds)
        .bind(&starts)
        .bind(&ends)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable(op, e))?;
        let rows = sqlx::query(
            "SELECT window_kind, window_start, cost, requests FROM keygate_usage \
             WHERE key_id = $1 \
             AND (window_kind, window_start) IN (SELECT * FROM UNNEST($2::text[], $3::int8[])) \
             ORDER BY window_kind, window_start \
             FOR UPDATE",
        )
        .bind(key.as_str())
        .bind(&kinds)
        .bind(&starts)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| unavailable(op, e))?;
        let mut stored = BTreeMap::new();
        for row in &rows {
            let c = decode_counted(op, row)?;
            stored.insert(c.key, c.usage);
        }
        let (answer, next) = decide(windows, &stored, limits, cost);
        let Some(next) = next else {
            // Drops the empty rows this call created.
            let _ = tx.rollback().await;
            return Ok(answer);
        };
        let kinds: Vec<&str> = next.keys().map(|(k, _)| k.as_str()).collect();
        let starts: Vec<i64> = next.keys().map(|(_, s)| *s).collect();
        let costs: Vec<i64> = next.values().map(|u| to_col(u.cost)).collect();
        let requests: Vec<i64> = next.values().map(|u| to_col(u.requests)).collect();
        sqlx::query(
            "UPDATE keygate_usage AS u SET cost = t.c, requests = t.r \
             FROM UNNEST($2::text[], $3::int8[], $4::int8[], $5::int8[]) AS t(k, s, c, r) \
             WHERE u.key_id = $1 AND u.window_kind = t.k AND u.window_start = t.s",
        )
        .bind(key.as_str())
        .bind(&kinds)
        .bind(&starts)
        .bind(&costs)
        .bind(&requests)
        .execute(&mut *tx)
        .await
        .map_err(|e| unavailable(op, e))?;
        tx.commit().await.map_err(|e| unavailable(op, e))?;
        Ok(answer)
    }
}

#[async_trait]
impl UsageStore for SqlUsageStore {
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let op = "load";
        let wanted = distinct(windows);
        let kinds: Vec<String> = wanted.keys().map(|(k, _)| k.clone()).collect();
        let starts: Vec<i64> = wanted.keys().map(|(_, s)| *s).collect();
        let stored = self
            .timed(op, async {
                let mut stored: BTreeMap<WindowKey, Usage> = BTreeMap::new();
                match &self.store.inner.pool {
                    Pool::Sqlite(pool) => {
                        let mut sql = String::from(
                            "SELECT window_kind, window_start, cost, requests FROM keygate_usage \
                             WHERE key_id = ? AND (",
                        );
                        for i in 0..kinds.len() {
                            if i > 0 {
                                sql.push_str(" OR ");
                            }
                            sql.push_str("(window_kind = ? AND window_start = ?)");
                        }
                        sql.push(')');
                        let mut q = sqlx::query(&sql).bind(key.as_str());
                        for (k, s) in kinds.iter().zip(&starts) {
                            q = q.bind(k).bind(*s);
                        }
                        let rows = q.fetch_all(pool).await.map_err(|e| unavailable(op, e))?;
                        for row in &rows {
                            let c = decode_counted(op, row)?;
                            stored.insert(c.key, c.usage);
                        }
                    }
                    Pool::Postgres(pool) => {
                        let rows = sqlx::query(
                            "SELECT window_kind, window_start, cost, requests FROM keygate_usage \
                             WHERE key_id = $1 AND (window_kind, window_start) IN \
                             (SELECT * FROM UNNEST($2::text[], $3::int8[]))",
                        )
                        .bind(key.as_str())
                        .bind(&kinds)
                        .bind(&starts)
                        .fetch_all(pool)
                        .await
                        .map_err(|e| unavailable(op, e))?;
                        for row in &rows {
                            let c = decode_counted(op, row)?;
                            stored.insert(c.key, c.usage);
                        }
                    }
                }
                Ok(stored)
            })
            .await?;
        Ok(windows
            .iter()
            .map(|w| stored.get(&window_key(w)).copied().unwrap_or_default())
            .collect())
    }

    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        if windows.is_empty() {
            // Nothing to count in; limits can only name windows, so none applies.
            let violated = violated_limits(&[], limits, cost);
            return Ok(if violated.is_empty() {
                Admission::Admitted(Vec::new())
            } else {
                Admission::Refused {
                    usage: Vec::new(),
                    violated,
                }
            });
        }
        self.timed("check_and_add", async {
            match &self.store.inner.pool {
                Pool::Sqlite(pool) => {
                    Self::check_and_add_sqlite(pool, key, windows, limits, cost).await
                }
                Pool::Postgres(pool) => {
                    Self::check_and_add_postgres(pool, key, windows, limits, cost).await
                }
            }
        })
        .await
    }

    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        if increments.is_empty() {
            return Ok(());
        }
        let op = "add";
        let merged = merge(increments);
        self.timed(op, async {
            match &self.store.inner.pool {
                Pool::Sqlite(pool) => {
                    let sql = format!(
                        "INSERT INTO keygate_usage \
                         (key_id, window_kind, window_start, window_end, cost, requests) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                         ON CONFLICT (key_id, window_kind, window_start) \
                         DO UPDATE SET cost = {ADD_COST}, requests = {ADD_REQUESTS}"
                    );
                    let mut tx = pool
                        .begin_with("BEGIN IMMEDIATE")
                        .await
                        .map_err(|e| unavailable(op, e))?;
                    for ((key, kind, start), (end, usage)) in &merged {
                        sqlx::query(&sql)
                            .bind(key)
                            .bind(kind)
                            .bind(start)
                            .bind(end)
                            .bind(to_col(usage.cost))
                            .bind(to_col(usage.requests))
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| unavailable(op, e))?;
                    }
                    tx.commit().await.map_err(|e| unavailable(op, e))?;
                }
                Pool::Postgres(pool) => {
                    // One statement, rows in lock order (merged: no row twice).
                    let sql = format!(
                        "INSERT INTO keygate_usage \
                         (key_id, window_kind, window_start, window_end, cost, requests) \
                         SELECT k, w, s, e, c, r FROM UNNEST($1::text[], $2::text[], $3::int8[], \
                         $4::int8[], $5::int8[], $6::int8[]) WITH ORDINALITY AS t(k, w, s, e, c, r, n) \
                         ORDER BY n \
                         ON CONFLICT (key_id, window_kind, window_start) \
                         DO UPDATE SET cost = {ADD_COST}, requests = {ADD_REQUESTS}"
                    );
                    let keys: Vec<&str> = merged.keys().map(|(k, _, _)| k.as_str()).collect();
                    let kinds: Vec<&str> = merged.keys().map(|(_, w, _)| w.as_str()).collect();
                    let starts: Vec<i64> = merged.keys().map(|(_, _, s)| *s).collect();
                    let ends: Vec<Option<i64>> = merged.values().map(|(e, _)| *e).collect();
                    let costs: Vec<i64> = merged.values().map(|(_, u)| to_col(u.cost)).collect();
                    let reqs: Vec<i64> =
                        merged.values().map(|(_, u)| to_col(u.requests)).collect();
                    sqlx::query(&sql)
                        .bind(&keys)
                        .bind(&kinds)
                        .bind(&starts)
                        .bind(&ends)
                        .bind(&costs)
                        .bind(&reqs)
                        .execute(pool)
                        .await
                        .map_err(|e| unavailable(op, e))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError> {
        if decrements.is_empty() {
            return Ok(());
        }
        let op = "subtract";
        let merged = merge(decrements);
        const SET: &str = "cost = CASE WHEN cost > $4 THEN cost - $4 ELSE 0 END, \
             requests = CASE WHEN requests > $5 THEN requests - $5 ELSE 0 END";
        self.timed(op, async {
            match &self.store.inner.pool {
                Pool::Sqlite(pool) => {
                    let sql = format!(
                        "UPDATE keygate_usage SET {SET} \
                         WHERE key_id = $1 AND window_kind = $2 AND window_start = $3"
                    );
                    let mut tx = pool
                        .begin_with("BEGIN IMMEDIATE")
                        .await
                        .map_err(|e| unavailable(op, e))?;
                    for ((key, kind, start), (_, usage)) in &merged {
                        sqlx::query(&sql)
                            .bind(key)
                            .bind(kind)
                            .bind(start)
                            .bind(to_col(usage.cost))
                            .bind(to_col(usage.requests))
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| unavailable(op, e))?;
                    }
                    tx.commit().await.map_err(|e| unavailable(op, e))?;
                }
                Pool::Postgres(pool) => {
                    let keys: Vec<&str> = merged.keys().map(|(k, _, _)| k.as_str()).collect();
                    let kinds: Vec<&str> = merged.keys().map(|(_, w, _)| w.as_str()).collect();
                    let starts: Vec<i64> = merged.keys().map(|(_, _, s)| *s).collect();
                    let costs: Vec<i64> = merged.values().map(|(_, u)| to_col(u.cost)).collect();
                    let reqs: Vec<i64> = merged.values().map(|(_, u)| to_col(u.requests)).collect();
                    sqlx::query(
                        "UPDATE keygate_usage AS u SET \
                         cost = CASE WHEN u.cost > t.c THEN u.cost - t.c ELSE 0 END, \
                         requests = CASE WHEN u.requests > t.r THEN u.requests - t.r ELSE 0 END \
                         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) \
                         AS t(k, w, s, c, r) \
                         WHERE u.key_id = t.k AND u.window_kind = t.w AND u.window_start = t.s",
                    )
                    .bind(&keys)
                    .bind(&kinds)
                    .bind(&starts)
                    .bind(&costs)
                    .bind(&reqs)
                    .execute(pool)
                    .await
                    .map_err(|e| unavailable(op, e))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        self.report_where(Some(key), from, to).await
    }
}

impl fmt::Debug for SqlUsageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlUsageStore")
            .field("store", &self.store)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_kinds_round_trip() {
        for kind in [
            QuotaWindow::Hour,
            QuotaWindow::Day,
            QuotaWindow::Month,
            QuotaWindow::Credits(Refill::Never),
            QuotaWindow::Credits(Refill::Daily),
            QuotaWindow::Credits(Refill::Monthly { day: 1 }),
            QuotaWindow::Credits(Refill::Monthly { day: 31 }),
        ] {
            assert_eq!(parse_window_kind(&window_kind(kind)), Some(kind));
        }
        for bad in [
            "",
            "week",
            "credits_monthly_0",
            "credits_monthly_32",
            "credits_monthly_x",
        ] {
            assert_eq!(parse_window_kind(bad), None, "{bad}");
        }
    }
}
