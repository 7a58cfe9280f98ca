//! Change propagation: a [`ChangeFollower`] reads the store's change sequence and tells a
//! [`ChangeHandler`] (normally a [`Verifier`]) which keys changed.
//!
//! ```
//! use keygate_core::{KeyRecord, KeyStore, Prefix, Verifier};
//! use keygate_sql::SqlStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = SqlStore::open("sqlite::memory:").await.unwrap();
//! let verifier = Verifier::new(store.clone());
//! let follower = store.watch(&verifier).await.unwrap();
//! let start = follower.cursor();
//!
//! let (_key, record) =
//!     KeyRecord::generate(&Prefix::default(), verifier.hasher(), "ci", verifier.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//! // The insert advanced the sequence; the follower reaches it within one poll.
//! follower.caught_up(start + 1).await;
//! assert_eq!(follower.cursor(), start + 1);
//! follower.shutdown().await;
//! # }
//! ```
//!
//! How it learns of changes:
//! - SQLite: it reads `keygate_changes` every [`SqlStore::poll_interval`] (default 250 ms).
//! - PostgreSQL: a dedicated connection `LISTEN`s on channel `keygate_changes` (the write
//!   triggers `NOTIFY` it at commit) and each notification for this store's schema makes it
//!   read the table at once. The poll still runs (default every 1 s), and a lost listener
//!   connection is re-established with backoff (100 ms doubling to 2 s); after every
//!   (re)connection it reads the table, so changes made while it was away are not missed.
//!
//! While the database is unreachable the follower keeps its position and retries at every
//! poll; the verifier keeps serving cached keys within its `max_stale` bound meanwhile.
//! If changes it had not read were pruned ([`SqlStore::prune_changes`]), it calls
//! [`ChangeHandler::resync`] (the verifier forgets its whole cache) and goes on.
//!
//! If the store's sequence is *behind* the follower (the newest change number, or the
//! pruned one, is below the last change it handled), the change table was emptied with
//! its numbering restarted, which is what restoring an older backup does. The follower
//! logs a warning, calls [`ChangeHandler::resync`] and continues from the store's current
//! number, so changes made after the restore reach the verifier again within one poll.
//! It can only tell from the numbers: if the restored database has already taken more
//! changes than the follower had seen before it next reads, the gap is invisible; restart
//! (or resync) the processes after a restore to be sure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate_core::{ChangeHandler, StoreError, Verifier};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::store::SqlStore;

/// The PostgreSQL notification channel the write triggers notify (payload: the schema).
pub(crate) const CHANNEL: &str = "keygate_changes";

/// How many changes one read of the change table returns at most.
const BATCH: u32 = 1_000;

/// Listener reconnection backoff: first wait, and the most it grows to.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    /// PostgreSQL: whether the LISTEN connection is up.
    listening: AtomicBool,
    /// How many reads of the change table failed in a row.
    failures: AtomicU64,
}

/// A running task that makes a [`ChangeHandler`] follow a [`SqlStore`]'s changes. Made by
/// [`SqlStore::watch`] or [`SqlStore::follow`].
///
/// Dropping it stops the task; [`ChangeFollower::shutdown`] stops it and waits.
#[must_use = "the follower stops when dropped"]
pub struct ChangeFollower {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    cursor: watch::Receiver<i64>,
    state: Arc<State>,
    wake: Arc<Notify>,
}

impl ChangeFollower {
    /// Reads the change table now instead of at the next poll (for example right after a
    /// write this process made and wants reflected at once).
    pub fn poll_now(&self) {
        self.wake.notify_one();
    }

    /// The number of the last change handled.
    pub fn cursor(&self) -> i64 {
        *self.cursor.borrow()
    }

    /// Waits until every change up to `seq` has been handled (or the follower stopped).
    /// Pair it with [`SqlStore::last_change`] to wait for a write to reach the handler.
    pub async fn caught_up(&self, seq: i64) {
        let mut rx = self.cursor.clone();
        // An error means the task ended; there is nothing more to wait for.
        let _ = rx.wait_for(|c| *c >= seq).await;
    }

    /// PostgreSQL: whether the LISTEN connection is up (always `false` on SQLite, which
    /// only polls).
    pub fn is_listening(&self) -> bool {
        self.state.listening.load(Ordering::Acquire)
    }

    /// How many reads of the change table failed in a row (0 while the database answers).
    pub fn failures(&self) -> u64 {
        self.state.failures.load(Ordering::Acquire)
    }

    /// Whether the task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the task and waits for it to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ChangeFollower {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ChangeFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFollower")
            .field("cursor", &self.cursor())
            .field("listening", &self.is_listening())
            .field("failures", &self.failures())
            .finish_non_exhaustive()
    }
}

/// Aborts a task when dropped (the listener dies with the follower).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SqlStore {
    /// Makes `verifier`'s cache follow this store: every changed key is invalidated, so a
    /// key revoked, disabled or edited by any process stops (or starts) working here within
    /// about one poll interval (SQLite) or one notification round trip (PostgreSQL).
    ///
    /// Changes written before this call are not reported: start the follower before
    /// [`Verifier::preload`] so nothing written in between is missed. Must be called within
    /// a tokio runtime; the follower runs as a task on it.
    pub async fn watch(&self, verifier: &Verifier) -> Result<ChangeFollower, StoreError> {
        self.follow(verifier.clone()).await
    }

    /// Runs a follower that reports this store's changes, from now on, to `handler`.
    pub async fn follow<H: ChangeHandler>(&self, handler: H) -> Result<ChangeFollower, StoreError> {
        let start = self.last_change().await?;
        let schema = self.pg_current_schema().await?;
        let (cursor_tx, cursor_rx) = watch::channel(start);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let state = Arc::new(State::default());
        let wake = Arc::new(Notify::new());
        let listener = self.inner.pg_connect.clone().map(|connect| {
            AbortOnDrop(tokio::spawn(listen(
                connect,
                self.inner.options.acquire_timeout,
                schema,
                wake.clone(),
                state.clone(),
            )))
        });
        let task = tokio::spawn(run(
            self.clone(),
            handler,
            start,
            cursor_tx,
            wake.clone(),
            shutdown_rx,
            state.clone(),
            listener,
        ));
        Ok(ChangeFollower {
            shutdown: Some(shutdown_tx),
            task: Some(task),
            cursor: cursor_rx,
            state,
            wake,
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn run<H: ChangeHandler>(
    store: SqlStore,
    handler: H,
    mut cursor: i64,
    cursor_tx: watch::Sender<i64>,
    wake: Arc<Notify>,
    mut shutdown: oneshot::Receiver<()>,
    state: Arc<State>,
    _listener: Option<AbortOnDrop>,
) {
    let mut tick = tokio::time::interval(store.poll_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // Sent, or the follower was dropped: stop either way.
            _ = &mut shutdown => break,
            _ = wake.notified() => {}
            _ = tick.tick() => {}
        }
        match catch_up(&store, &handler, cursor, &cursor_tx).await {
            Ok(c) => {
                cursor = c;
                if state.failures.swap(0, Ordering::AcqRel) > 0 {
                    tracing::info!(cursor, "change follower reads changes again");
                }
            }
            Err(err) => {
                if state.failures.fetch_add(1, Ordering::AcqRel) == 0 {
                    tracing::warn!(error = %err, cursor, "change follower cannot read changes; retrying at every poll");
                }
            }
        }
    }
}

/// Reads and handles every change after `cursor`; returns the new cursor.
async fn catch_up<H: ChangeHandler>(
    store: &SqlStore,
    handler: &H,
    mut cursor: i64,
    cursor_tx: &watch::Sender<i64>,
) -> Result<i64, StoreError> {
    loop {
        let before = cursor;
        let batch = store.changes_since(cursor, BATCH).await?;
        // Read after the changes: a prune that committed before that read shows here.
        let (pruned, newest) = store.sequence_bounds().await?;
        let last = newest.unwrap_or(0).max(pruned);
        if batch.is_empty() && last < before {
            // Numbers this follower has seen no longer exist and were not pruned: the
            // change table was reset (a restored backup). Whatever it missed is unknown.
            tracing::warn!(
                cursor = before,
                store_sequence = last,
                "the store's change sequence is behind this follower (the change table was reset, as restoring an older backup does); clearing the cache and following from the store's number"
            );
            handler.resync();
            cursor_tx.send_replace(last);
            return Ok(last);
        }
        if pruned > before {
            tracing::warn!(
                cursor = before,
                pruned,
                "changes were pruned before this follower read them; clearing the cache"
            );
            handler.resync();
            cursor = pruned;
        }
        for change in &batch {
            if let Some(id) = &change.key_id {
                handler.changed(id);
            }
            cursor = cursor.max(change.seq);
        }
        if cursor != before {
            cursor_tx.send_replace(cursor);
        }
        if batch.len() < BATCH as usize {
            return Ok(cursor);
        }
    }
}

/// PostgreSQL: keeps a LISTEN connection and wakes the follower for each notification of
/// `schema` (and after every (re)connection, to catch up).
async fn listen(
    connect: PgConnectOptions,
    acquire_timeout: Duration,
    schema: String,
    wake: Arc<Notify>,
    state: Arc<State>,
) {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(connect);
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    loop {
        match subscribe(&pool).await {
            Ok(mut listener) => {
                if failing {
                    tracing::info!("change listener connected again");
                }
                failing = false;
                backoff = BACKOFF_START;
                state.listening.store(true, Ordering::Release);
                wake.notify_one();
                let lost = loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            if n.payload() == schema {
                                wake.notify_one();
                            }
                        }
                        Ok(None) => break "connection lost".to_owned(),
                        Err(e) => break crate::error::describe(&e),
                    }
                };
                state.listening.store(false, Ordering::Release);
                tracing::warn!(reason = %lost, "change listener disconnected; reconnecting");
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %crate::error::describe(&e), "change listener cannot connect; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn subscribe(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
