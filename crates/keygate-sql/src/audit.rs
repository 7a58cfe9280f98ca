//! [`SqlAuditSink`]: audit events in the `keygate_audit` table, and
//! [`SqlStore::audit_events`] to read them back.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use keygate_core::audit::{AuditError, AuditEvent, AuditSink};
use keygate_core::{KeyId, StoreError};
use tokio::runtime::{Handle, RuntimeFlavor};

use crate::error::unavailable;
use crate::row::to_ms;
use crate::store::{Pool, SqlStore};

/// Rows per multi-row `INSERT` on SQLite (7 values each).
const SQLITE_CHUNK: usize = 500;

/// One event as a row of `keygate_audit`.
struct AuditRow {
    at: i64,
    kind: &'static str,
    key_id: Option<String>,
    action: Option<&'static str>,
    actor: Option<String>,
    event: String,
}

impl AuditRow {
    fn new(event: &AuditEvent) -> Result<Self, AuditError> {
        let (kind, action, actor) = match event {
            AuditEvent::Request(r) => ("request", Some(decision(r.decision)), None),
            AuditEvent::Lifecycle(l) => {
                ("lifecycle", Some(l.action.as_str()), Some(l.actor.clone()))
            }
            AuditEvent::Denials(_) => ("denials", Some("denied"), None),
            AuditEvent::Anomaly(a) => ("anomaly", Some(a.kind.as_str()), None),
        };
        Ok(AuditRow {
            at: to_ms(event.time()),
            kind,
            key_id: event.key_id().map(|k| k.as_str().to_owned()),
            action,
            actor,
            event: serde_json::to_string(event)?,
        })
    }
}

fn decision(d: keygate_core::audit::Decision) -> &'static str {
    use keygate_core::audit::Decision;
    match d {
        Decision::Allowed => "allowed",
        Decision::Denied => "denied",
        Decision::Error => "error",
        Decision::Cancelled => "cancelled",
    }
}

/// Configures a [`SqlAuditSink`] ([`SqlStore::audit_sink_builder`]).
#[derive(Debug, Clone)]
pub struct SqlAuditSinkBuilder {
    store: SqlStore,
    batch: usize,
    max_buffered: usize,
}

impl SqlAuditSinkBuilder {
    /// `record` writes once this many events are buffered (default 512, at least 1).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// The most events kept while the database cannot be written (default 100,000); past
    /// it the oldest are dropped and counted.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }

    /// Builds the sink on the current Tokio runtime (see [`SqlStore::audit_sink`]).
    pub fn build(self) -> Result<SqlAuditSink, AuditError> {
        let runtime = Handle::try_current().map_err(|_| {
            AuditError::Other(
                "the SQL audit sink must be made inside the Tokio runtime the store uses".into(),
            )
        })?;
        Ok(self.build_on(runtime))
    }

    /// Builds the sink, running its writes on `runtime` (the runtime the store's pool
    /// lives on).
    pub fn build_on(self, runtime: Handle) -> SqlAuditSink {
        SqlAuditSink {
            store: self.store,
            runtime,
            batch: self.batch,
            max_buffered: self.max_buffered.max(self.batch),
            buffer: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }
}

/// An [`AuditSink`] writing events into the `keygate_audit` table (see `SCHEMA.md`): the
/// event's JSON (its stable form, as in the file log) plus columns to filter on (time,
/// kind, key id, action, actor). Events carry no secret, so the table holds none.
///
/// ```
/// use keygate_core::audit::{Auditor, RequestEvent};
/// use keygate_sql::{AuditQuery, SqlStore};
/// use std::time::UNIX_EPOCH;
///
/// # #[tokio::main]
/// # async fn main() {
/// let store = SqlStore::open("sqlite::memory:").await.unwrap();
/// // The sink buffers in `record` and writes batches from the auditor's writer thread.
/// let auditor = Auditor::spawn(store.audit_sink().unwrap()).unwrap();
/// auditor.record(RequestEvent::new(UNIX_EPOCH, "r1", "GET", "/").into()).await.unwrap();
/// auditor.flush().await.unwrap(); // waits until the row is committed
/// let events = store.audit_events(&AuditQuery::default()).await.unwrap();
/// assert_eq!(events[0].event.as_request().unwrap().request_id, "r1");
/// # }
/// ```
///
/// # Threads and runtimes
/// [`AuditSink`]'s methods are synchronous, and sqlx is asynchronous. The sink keeps the
/// [`Handle`] of the Tokio runtime it was made on ([`SqlStore::audit_sink`]) and:
/// - [`AuditSink::record`] only serializes the event and appends it to an in-memory buffer
///   (no I/O), except when the buffer holds [`SqlAuditSinkBuilder::batch`] events: then it
///   writes them, as `flush` does;
/// - [`AuditSink::flush`] / [`AuditSink::sync`] write the buffer in one transaction (one
///   multi-row `INSERT`), as a task spawned on that runtime, and wait for its commit
///   (bounded by the store's operation timeout).
///
/// Run it behind [`Auditor::spawn`](keygate_core::audit::Auditor::spawn): there these calls
/// come from the auditor's own writer thread, which may block, and no request ever waits
/// on the database. Called from inside a runtime (for example behind `Auditor::direct`),
/// a multi-threaded runtime's worker waits in `block_in_place`; a current-thread runtime
/// cannot wait for its own task, so there the write is handed to the runtime without
/// waiting (`flush` answers at once, `sync` answers an error).
///
/// A failed write keeps its events buffered (the next flush retries them), up to
/// [`SqlAuditSinkBuilder::max_buffered`] events; past that the oldest are dropped and
/// counted ([`SqlAuditSink::dropped`]).
pub struct SqlAuditSink {
    store: SqlStore,
    runtime: Handle,
    batch: usize,
    max_buffered: usize,
    buffer: Mutex<VecDeque<AuditRow>>,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl SqlStore {
    /// An audit sink writing into this store's database, with the default settings. Call
    /// it inside the Tokio runtime the store was opened on (its writes run there); fails
    /// outside any runtime.
    pub fn audit_sink(&self) -> Result<SqlAuditSink, AuditError> {
        self.audit_sink_builder().build()
    }

    /// Configures an audit sink writing into this store's database.
    pub fn audit_sink_builder(&self) -> SqlAuditSinkBuilder {
        SqlAuditSinkBuilder {
            store: self.clone(),
            batch: 512,
            max_buffered: 100_000,
        }
    }

    /// Audit events from the `keygate_audit` table, oldest first (see [`AuditQuery`]).
    /// Fails with [`StoreError::Corrupt`] if a row cannot be read back as an event; see
    /// [`SqlStore::audit_entries`] to read the others anyway.
    pub async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredEvent>, StoreError> {
        self.audit_entries(query)
            .await?
            .into_iter()
            .map(|e| {
                let seq = e.seq;
                e.event
                    .map(|event| StoredEvent { seq, event })
                    .map_err(|why| StoreError::Corrupt(format!("audit event {seq}: {why}")))
            })
            .collect()
    }

    /// Like [`SqlStore::audit_events`], but a row that cannot be read back as an event is
    /// returned as an error of its own (with its `seq`) instead of failing the whole read.
    pub async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        const SQL_FIRST: &str = "SELECT seq, event FROM keygate_audit \
             WHERE seq > $1 AND (CAST($2 AS TEXT) IS NULL OR key_id = $2) \
             ORDER BY seq LIMIT $3";
        const SQL_LATEST: &str = "SELECT seq, event FROM keygate_audit \
             WHERE seq > $1 AND (CAST($2 AS TEXT) IS NULL OR key_id = $2) \
             ORDER BY seq DESC LIMIT $3";
        let sql = if query.latest { SQL_LATEST } else { SQL_FIRST };
        let after = query.after.unwrap_or(0);
        let key = query.key_id.map(|k| k.as_str().to_owned());
        let limit = i64::from(query.limit);
        let mut rows: Vec<(i64, String)> = self
            .timed("audit_events", async {
                match &self.inner.pool {
                    Pool::Sqlite(pool) => {
                        sqlx::query_as(sql)
                            .bind(after)
                            .bind(&key)
                            .bind(limit)
                            .fetch_all(pool)
                            .await
                    }
                    Pool::Postgres(pool) => {
                        sqlx::query_as(sql)
                            .bind(after)
                            .bind(&key)
                            .bind(limit)
                            .fetch_all(pool)
                            .await
                    }
                }
                .map_err(|e| unavailable("audit_events", e))
            })
            .await?;
        if query.latest {
            rows.reverse();
        }
        Ok(rows
            .into_iter()
            .map(|(seq, json)| AuditEntry {
                seq,
                // serde's messages name a position, never the row's content.
                event: serde_json::from_str(&json).map_err(|e| format!("unreadable JSON: {e}")),
            })
            .collect())
    }

    /// Writes `rows` in one transaction.
    async fn insert_audit_rows(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        self.timed("audit insert", async {
            let done: Result<(), sqlx::Error> = match &self.inner.pool {
                Pool::Sqlite(pool) => {
                    async {
                        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                        for chunk in rows.chunks(SQLITE_CHUNK) {
                            let mut sql = String::from(
                                "INSERT INTO keygate_audit (at, kind, key_id, action, actor, event) VALUES ",
                            );
                            for i in 0..chunk.len() {
                                sql.push_str(if i == 0 { "(?, ?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?, ?)" });
                            }
                            let mut q = sqlx::query(&sql);
                            for r in chunk {
                                q = q
                                    .bind(r.at)
                                    .bind(r.kind)
                                    .bind(r.key_id.as_deref())
                                    .bind(r.action)
                                    .bind(r.actor.as_deref())
                                    .bind(r.event.as_str());
                            }
                            q.execute(&mut *tx).await?;
                        }
                        tx.commit().await
                    }
                    .await
                }
                Pool::Postgres(pool) => {
                    let at: Vec<i64> = rows.iter().map(|r| r.at).collect();
                    let kind: Vec<&str> = rows.iter().map(|r| r.kind).collect();
                    let key: Vec<Option<&str>> = rows.iter().map(|r| r.key_id.as_deref()).collect();
                    let action: Vec<Option<&str>> = rows.iter().map(|r| r.action).collect();
                    let actor: Vec<Option<&str>> = rows.iter().map(|r| r.actor.as_deref()).collect();
                    let event: Vec<&str> = rows.iter().map(|r| r.event.as_str()).collect();
                    // One statement: atomic on its own; rows keep their order (seq).
                    sqlx::query(
                        "INSERT INTO keygate_audit (at, kind, key_id, action, actor, event) \
                         SELECT a, k, i, c, r, e FROM UNNEST($1::int8[], $2::text[], $3::text[], \
                         $4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS t(a, k, i, c, r, e, n) \
                         ORDER BY n",
                    )
                    .bind(&at)
                    .bind(&kind)
                    .bind(&key)
                    .bind(&action)
                    .bind(&actor)
                    .bind(&event)
                    .execute(pool)
                    .await
                    .map(|_| ())
                }
            };
            done.map_err(|e| unavailable("audit insert", e))
        })
        .await
    }
}

/// Which events [`SqlStore::audit_events`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only events numbered above this (`seq`; none: from the first).
    pub after: Option<i64>,
    /// Only events about this key.
    pub key_id: Option<KeyId>,
    /// At most this many (default 1,000).
    pub limit: u32,
    /// The last `limit` matching events instead of the first (still returned oldest
    /// first).
    pub latest: bool,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            after: None,
            key_id: None,
            limit: 1000,
            latest: false,
        }
    }
}

/// An event read back from the table, with its number (`seq`: grows in write order).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Its number.
    pub seq: i64,
    /// The event.
    pub event: AuditEvent,
}

/// A row read back from the table ([`SqlStore::audit_entries`]): its event, or why it
/// could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Its number.
    pub seq: i64,
    /// The event, or what is wrong with the row.
    pub event: Result<AuditEvent, String>,
}

impl SqlAuditSink {
    /// Events dropped because the buffer was full while the database could not be written.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    /// Events committed to the table so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Events waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<AuditRow>> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes everything buffered; `wait`: whether the caller needs the commit (sync) or
    /// only the hand-over (flush).
    fn write_buffered(&self, wait: bool) -> Result<(), AuditError> {
        let rows: Vec<AuditRow> = self.lock().drain(..).collect();
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len() as u64;
        match Handle::try_current() {
            // A plain thread (the auditor's writer): run the write on the store's runtime
            // and wait for it.
            Err(_) => self.run_and_wait(rows, n),
            Ok(current) => match current.runtime_flavor() {
                RuntimeFlavor::CurrentThread => {
                    // This thread is the runtime: it cannot wait for its own task.
                    self.spawn_detached(rows, n);
                    if wait {
                        Err(AuditError::Other(
                            "cannot wait for the database on a current-thread runtime; \
                             run the SQL audit sink behind Auditor::spawn"
                                .into(),
                        ))
                    } else {
                        Ok(())
                    }
                }
                _ => tokio::task::block_in_place(|| self.run_and_wait(rows, n)),
            },
        }
    }

    fn run_and_wait(&self, rows: Vec<AuditRow>, n: u64) -> Result<(), AuditError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let store = self.store.clone();
        self.runtime.spawn(async move {
            let result = store.insert_audit_rows(&rows).await;
            let _ = tx.send(result.map_err(|e| (e, rows)));
        });
        // The write's own timeout is the operation timeout; allow for scheduling on top.
        let limit = self.store.options().operation_timeout + Duration::from_secs(5);
        match rx.recv_timeout(limit) {
            Ok(Ok(())) => {
                self.written.fetch_add(n, Ordering::AcqRel);
                Ok(())
            }
            Ok(Err((e, rows))) => {
                self.requeue(rows);
                Err(AuditError::Other(e.to_string()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(AuditError::Other(format!(
                "audit write did not finish within {} ms (it may still complete)",
                limit.as_millis()
            ))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The runtime dropped the task unrun (it is shutting down): the rows are
                // gone with it.
                self.dropped.fetch_add(n, Ordering::AcqRel);
                Err(AuditError::Other(
                    "the runtime running the audit writes has shut down".into(),
                ))
            }
        }
    }

    fn spawn_detached(&self, rows: Vec<AuditRow>, n: u64) {
        let store = self.store.clone();
        self.runtime.spawn(async move {
            if let Err(e) = store.insert_audit_rows(&rows).await {
                tracing::error!(events = n, error = %e, "audit events could not be written to the database");
            }
        });
    }

    /// Puts failed rows back at the front, dropping the oldest past the bound.
    fn requeue(&self, rows: Vec<AuditRow>) {
        let mut buffer = self.lock();
        for r in rows.into_iter().rev() {
            buffer.push_front(r);
        }
        let over = buffer.len().saturating_sub(self.max_buffered);
        if over > 0 {
            buffer.drain(..over);
            self.dropped.fetch_add(over as u64, Ordering::AcqRel);
            tracing::error!(
                dropped = over,
                "the audit buffer is full while the database cannot be written: oldest events dropped"
            );
        }
    }
}

impl AuditSink for SqlAuditSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let row = AuditRow::new(event)?;
        let full = {
            let mut buffer = self.lock();
            buffer.push_back(row);
            buffer.len() >= self.batch
        };
        if full {
            // The event is buffered whatever happens; a failed write is retried by the next
            // flush, so it is not this event's failure.
            if let Err(e) = self.write_buffered(false) {
                tracing::warn!(error = %e, "audit batch write failed; kept for the next flush");
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), AuditError> {
        self.write_buffered(false)
    }

    fn sync(&self) -> Result<(), AuditError> {
        self.write_buffered(true)
    }
}

impl Drop for SqlAuditSink {
    fn drop(&mut self) {
        let left = self.lock().len();
        if left > 0 {
            tracing::error!(
                events = left,
                "SQL audit sink dropped with unwritten events (flush or shut the auditor down first)"
            );
        }
    }
}

impl fmt::Debug for SqlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlAuditSink")
            .field("backend", &self.store.backend())
            .field("buffered", &self.buffered())
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}
