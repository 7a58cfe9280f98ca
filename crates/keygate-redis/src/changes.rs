//! Change propagation between replicas: key writes are published on a Redis channel, and
//! every replica's verifier evicts the key it is told about.
//!
//! - A writer wraps its key store in [`Publishing`] (or calls [`Publisher::publish`]
//!   itself): after each successful insert or update, one Lua script increments the
//!   sequence `{prefix}:changes:seq` and publishes `"<seq> <key id>"` on `{prefix}:changes`.
//!   A publish that fails (Redis down) never fails the write: the id is queued and published
//!   again in the background until Redis answers.
//! - Every replica runs a [`ChangeWatcher`] ([`Redis::watch`]): a subscriber that calls
//!   [`Verifier::invalidate`] for each message, so the next request with that key reads the
//!   store again.
//! - Messages can be lost (pub/sub delivers at most once: a subscriber that was disconnected
//!   misses what was published meanwhile). The sequence number heals that: a message whose
//!   number skips one, a sequence read after reconnecting that moved while the subscriber
//!   was away, or a sequence that stays ahead of the last message across two periodic checks
//!   ([`WatchOptions::resync_every`]), makes the watcher call [`Verifier::invalidate_all`]:
//!   the cache starts over from the store. A Redis restart (the sequence going back) does
//!   the same.
//!
//! So a change reaches every connected replica within one pub/sub delivery, and a replica
//! that missed it within two resync periods (or at once on reconnecting).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use keygate_core::{KeyFilter, KeyId, KeyRecord, KeyStore, StoreError, Verifier};
use redis::Script;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::conn::{describe, Error, Redis};

static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1]: the sequence; ARGV[1]: the channel; ARGV[2]: the key id.
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], seq .. ' ' .. ARGV[2])
return seq
"#,
    )
});

/// Retry backoff of queued publishes and of the watcher's reconnection.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

fn channel(redis: &Redis) -> String {
    redis.key(format_args!("changes"))
}

fn sequence(redis: &Redis) -> String {
    redis.key(format_args!("changes:seq"))
}

/// Announces key changes to every replica (see the [module docs](self)). Cheap to clone;
/// clones share the retry queue.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    redis: Redis,
    channel: String,
    sequence: String,
    /// Ids whose publish failed, published again by the retry task.
    pending: Mutex<HashSet<KeyId>>,
    retrying: AtomicBool,
}

impl Publisher {
    /// A publisher on `redis`'s prefix.
    pub fn new(redis: &Redis) -> Self {
        Publisher {
            inner: Arc::new(PublisherInner {
                redis: redis.clone(),
                channel: channel(redis),
                sequence: sequence(redis),
                pending: Mutex::new(HashSet::new()),
                retrying: AtomicBool::new(false),
            }),
        }
    }

    /// Publishes that `id` changed; returns its sequence number.
    pub async fn publish(&self, id: &KeyId) -> Result<u64, Error> {
        let inner = &*self.inner;
        let (seq_key, channel, id) = (inner.sequence.clone(), inner.channel.clone(), *id);
        inner
            .redis
            .run(move |mut c| async move {
                PUBLISH
                    .key(seq_key)
                    .arg(channel)
                    .arg(id.as_str())
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    /// Publishes that `id` changed; if Redis cannot take it now, queues it and publishes it
    /// in the background (retrying with backoff) instead of failing. Must be called within
    /// a tokio runtime for the retry to run.
    pub async fn announce(&self, id: &KeyId) {
        if let Err(e) = self.publish(id).await {
            tracing::warn!(key_id = %id, error = %e, "could not publish a key change; retrying in the background");
            self.queue(*id);
        }
    }

    /// How many changes are waiting to be published again.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<KeyId>> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self, id: KeyId) {
        self.lock().insert(id);
        if self.inner.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.retrying.store(false, Ordering::Release);
            tracing::warn!("no tokio runtime: queued key changes are published on the next write");
            return;
        };
        let this = self.clone();
        rt.spawn(async move { this.retry().await });
    }

    async fn retry(self) {
        let mut backoff = BACKOFF_START;
        loop {
            tokio::time::sleep(backoff).await;
            let ids: Vec<KeyId> = self.lock().iter().copied().collect();
            let mut failed = false;
            for id in ids {
                match self.publish(&id).await {
                    Ok(_) => {
                        self.lock().remove(&id);
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if !failed {
                self.inner.retrying.store(false, Ordering::Release);
                // An id queued after the snapshot, while `retrying` was still set.
                if self.pending() > 0 && !self.inner.retrying.swap(true, Ordering::AcqRel) {
                    backoff = BACKOFF_START;
                    continue;
                }
                tracing::info!("queued key changes published");
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.inner.channel)
            .field("pending", &self.pending())
            .finish()
    }
}

/// A [`KeyStore`] that announces every successful insert and update through a
/// [`Publisher`], so every replica's verifier evicts the key. Reads go straight to the
/// inner store. Give it to the [`Verifier`] (a `KeyManager` built with
/// `KeyManager::for_verifier` then publishes its issues, rotations, revocations and edits).
///
/// The write returns after the publish was sent (or queued for retry, if Redis is down: a
/// write never fails because of Redis).
#[derive(Clone)]
pub struct Publishing<S> {
    inner: S,
    publisher: Publisher,
}

impl<S: KeyStore> Publishing<S> {
    /// Wraps `store`, publishing on `redis`.
    pub fn new(store: S, redis: &Redis) -> Self {
        Publishing {
            inner: store,
            publisher: Publisher::new(redis),
        }
    }

    /// Wraps `store`, publishing through `publisher`.
    pub fn with_publisher(store: S, publisher: Publisher) -> Self {
        Publishing {
            inner: store,
            publisher,
        }
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }
}

impl<S> std::fmt::Debug for Publishing<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publishing")
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for Publishing<S> {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await?;
        self.publisher.announce(&record.id).await;
        Ok(())
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update(record).await?;
        self.publisher.announce(&record.id).await;
        Ok(())
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(filter).await
    }

    async fn list_report(
        &self,
        filter: &KeyFilter,
    ) -> Result<keygate_core::KeyListing, StoreError> {
        self.inner.list_report(filter).await
    }

    async fn set_status(
        &self,
        id: &KeyId,
        status: keygate_core::KeyStatus,
        at: std::time::SystemTime,
    ) -> Result<keygate_core::StatusWrite, StoreError> {
        let written = self.inner.set_status(id, status, at).await?;
        if written == keygate_core::StatusWrite::Written {
            self.publisher.announce(id).await;
        }
        Ok(written)
    }
}

/// What a [`ChangeWatcher`] tells about changes. [`Verifier`] implements it by
/// invalidating its cache.
pub trait ChangeHandler: Send + Sync + 'static {
    /// The key `id` changed.
    fn changed(&self, id: &KeyId);
    /// Changes may have been missed: forget everything derived from the store.
    fn resync(&self);
}

impl ChangeHandler for Verifier {
    fn changed(&self, id: &KeyId) {
        self.invalidate(id);
    }
    fn resync(&self) {
        self.invalidate_all();
    }
}

impl<H: ChangeHandler + ?Sized> ChangeHandler for Arc<H> {
    fn changed(&self, id: &KeyId) {
        (**self).changed(id);
    }
    fn resync(&self) {
        (**self).resync();
    }
}

/// Settings of a [`ChangeWatcher`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    resync_every: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            resync_every: Duration::from_secs(1),
        }
    }
}

impl WatchOptions {
    /// The defaults: the sequence is checked every second.
    pub fn new() -> Self {
        Self::default()
    }

    /// How often the sequence is read (and the subscription pinged): a missed message is
    /// healed within two of these (default 1 s; at least 10 ms).
    pub fn resync_every(mut self, every: Duration) -> Self {
        self.resync_every = every.max(Duration::from_millis(10));
        self
    }
}

#[derive(Default)]
struct State {
    subscribed: AtomicBool,
    resyncs: AtomicU64,
    messages: AtomicU64,
}

/// A running task that makes a [`ChangeHandler`] (a replica's [`Verifier`]) follow the key
/// changes published on Redis. Made by [`Redis::watch`] or [`Redis::follow`]. Dropping it
/// stops the task; [`ChangeWatcher::shutdown`] stops it and waits.
#[must_use = "the watcher stops when dropped"]
pub struct ChangeWatcher {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    seq: watch::Receiver<u64>,
    state: Arc<State>,
}

impl ChangeWatcher {
    /// The sequence number of the last change handled (or resynced past).
    pub fn seq(&self) -> u64 {
        *self.seq.borrow()
    }

    /// Waits until every change up to `seq` was handled (or the watcher stopped).
    pub async fn caught_up(&self, seq: u64) {
        let mut rx = self.seq.clone();
        let _ = rx.wait_for(|s| *s >= seq).await;
    }

    /// Waits until the subscription is up (or the watcher stopped).
    pub async fn subscribed(&self) {
        let mut rx = self.seq.clone();
        while !self.is_subscribed() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the subscription is up.
    pub fn is_subscribed(&self) -> bool {
        self.state.subscribed.load(Ordering::Acquire)
    }

    /// How many times the whole cache was dropped because changes may have been missed.
    pub fn resyncs(&self) -> u64 {
        self.state.resyncs.load(Ordering::Acquire)
    }

    /// How many change messages were handled.
    pub fn messages(&self) -> u64 {
        self.state.messages.load(Ordering::Acquire)
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

impl Drop for ChangeWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ChangeWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeWatcher")
            .field("seq", &self.seq())
            .field("subscribed", &self.is_subscribed())
            .field("resyncs", &self.resyncs())
            .finish()
    }
}

impl Redis {
    /// Makes `verifier` follow the key changes published on this prefix: each message
    /// evicts its key; a missed message drops the whole cache (see the [module
    /// docs](crate::changes)). Changes published before the subscription is up are not
    /// reported; wait for [`ChangeWatcher::subscribed`] before relying on it. Must be
    /// called within a tokio runtime.
    pub async fn watch(&self, verifier: &Verifier, options: WatchOptions) -> ChangeWatcher {
        self.follow(verifier.clone(), options).await
    }

    /// Runs a watcher that reports the key changes published on this prefix to `handler`.
    pub async fn follow<H: ChangeHandler>(
        &self,
        handler: H,
        options: WatchOptions,
    ) -> ChangeWatcher {
        let (seq_tx, seq_rx) = watch::channel(0);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let state = Arc::new(State::default());
        let task = tokio::spawn(run(
            self.clone(),
            handler,
            options,
            seq_tx,
            shutdown_rx,
            state.clone(),
        ));
        ChangeWatcher {
            shutdown: Some(shutdown_tx),
            task: Some(task),
            seq: seq_rx,
            state,
        }
    }
}

/// The watcher's view of the sequence.
struct Follow<H> {
    handler: H,
    /// The last sequence number handled; `None` before the first subscription.
    last: Option<u64>,
    /// A sequence read ahead of `last` at the previous check (messages may be in flight).
    suspect: Option<u64>,
    seq_tx: watch::Sender<u64>,
    state: Arc<State>,
}

impl<H: ChangeHandler> Follow<H> {
    fn set(&mut self, seq: u64) {
        self.last = Some(seq);
        self.seq_tx.send_replace(seq);
    }

    fn resync(&mut self, seq: u64, why: &str) {
        tracing::warn!(
            seq,
            reason = why,
            "key changes may have been missed; dropping the key cache"
        );
        self.handler.resync();
        self.state.resyncs.fetch_add(1, Ordering::AcqRel);
        self.suspect = None;
        self.set(seq);
    }

    fn message(&mut self, payload: &str) {
        let Some((seq, id)) = payload.split_once(' ') else {
            tracing::warn!("unreadable key-change message ignored");
            return;
        };
        let (Ok(seq), Ok(id)) = (seq.parse::<u64>(), KeyId::parse(id)) else {
            tracing::warn!("unreadable key-change message ignored");
            return;
        };
        self.handler.changed(&id);
        self.state.messages.fetch_add(1, Ordering::AcqRel);
        match self.last {
            Some(last) if seq == last + 1 => self.set(seq),
            Some(last) if seq > last + 1 => self.resync(seq, "a message was skipped"),
            Some(last) if seq < last => {
                self.resync(seq, "the sequence went back (Redis restarted?)")
            }
            Some(_) => {}
            None => self.set(seq),
        }
    }

    /// Compares the stored sequence with what was handled.
    fn check(&mut self, current: u64, reconnected: bool) {
        let Some(last) = self.last else {
            self.set(current);
            return;
        };
        if current == last {
            self.suspect = None;
        } else if current < last {
            self.resync(current, "the sequence went back (Redis restarted?)");
        } else if reconnected {
            self.resync(current, "changes were published while disconnected");
        } else if self.suspect.is_some_and(|s| last < s) {
            self.resync(current, "a message did not arrive");
        } else {
            self.suspect = Some(current);
        }
    }
}

async fn read_seq(redis: &Redis, key: &str) -> Result<u64, Error> {
    let key = key.to_owned();
    let v: Option<u64> = redis
        .run(move |mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
        .await?;
    Ok(v.unwrap_or(0))
}

async fn run<H: ChangeHandler>(
    redis: Redis,
    handler: H,
    options: WatchOptions,
    seq_tx: watch::Sender<u64>,
    mut shutdown: oneshot::Receiver<()>,
    state: Arc<State>,
) {
    let channel = channel(&redis);
    let seq_key = sequence(&redis);
    let timeout = redis.timeout();
    let mut f = Follow {
        handler,
        last: None,
        suspect: None,
        seq_tx,
        state: state.clone(),
    };
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    loop {
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = redis.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(error = %describe(&e), "key-change subscriber cannot connect; retrying");
                }
                failing = true;
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                failing = true;
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        // Subscribed: anything published from now on arrives. Read the sequence to learn
        // what was missed before.
        let reconnected = f.last.is_some();
        match read_seq(&redis, &seq_key).await {
            Ok(current) => f.check(current, reconnected),
            Err(_) => {
                failing = true;
                if sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        }
        if failing {
            tracing::info!("key-change subscriber connected again");
        }
        failing = false;
        backoff = BACKOFF_START;
        state.subscribed.store(true, Ordering::Release);
        f.seq_tx.send_modify(|_| {});
        let (mut sink, mut stream) = pubsub.split();
        let mut tick = tokio::time::interval(options.resync_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let lost = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    state.subscribed.store(false, Ordering::Release);
                    return;
                }
                msg = stream.next() => match msg {
                    Some(msg) => match msg.get_payload::<String>() {
                        Ok(payload) => f.message(&payload),
                        Err(_) => tracing::warn!("unreadable key-change message ignored"),
                    },
                    None => break "connection lost",
                },
                _ = tick.tick() => {
                    let alive = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break "the subscription stopped answering";
                    }
                    match read_seq(&redis, &seq_key).await {
                        Ok(current) => f.check(current, false),
                        Err(_) => break "the sequence cannot be read",
                    }
                }
            }
        };
        state.subscribed.store(false, Ordering::Release);
        tracing::warn!(
            reason = lost,
            "key-change subscriber disconnected; reconnecting"
        );
        if sleep_or_stop(&mut shutdown, &mut backoff).await {
            return;
        }
    }
}

/// Sleeps for the backoff (then doubles it); `true` if the watcher was stopped meanwhile.
async fn sleep_or_stop(shutdown: &mut oneshot::Receiver<()>, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = shutdown => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Log(StdMutex<Vec<String>>);

    impl ChangeHandler for Log {
        fn changed(&self, id: &KeyId) {
            self.0.lock().unwrap().push(id.to_string());
        }
        fn resync(&self) {
            self.0.lock().unwrap().push("resync".into());
        }
    }

    fn follow() -> (Follow<Arc<Log>>, Arc<Log>) {
        let log = Arc::new(Log::default());
        let (seq_tx, _) = watch::channel(0);
        (
            Follow {
                handler: log.clone(),
                last: None,
                suspect: None,
                seq_tx,
                state: Arc::default(),
            },
            log,
        )
    }

    #[test]
    fn gaps_and_restarts_resync() {
        let (mut f, log) = follow();
        f.check(5, false);
        f.message("6 AAAAAAAAAAAA");
        f.message("6 AAAAAAAAAAAA");
        f.message("8 BBBBBBBBBBBB");
        f.message("2 CCCCCCCCCCCC");
        f.message("garbage");
        f.message("3 not-an-id");
        assert_eq!(
            *log.0.lock().unwrap(),
            [
                "AAAAAAAAAAAA",
                "AAAAAAAAAAAA",
                "BBBBBBBBBBBB",
                "resync",
                "CCCCCCCCCCCC",
                "resync"
            ]
        );
        assert_eq!(f.last, Some(2));
    }

    #[test]
    fn a_lost_last_message_heals_on_the_second_check() {
        let (mut f, log) = follow();
        f.check(10, false);
        // The sequence moved but its message is (maybe) in flight: wait one check.
        f.check(11, false);
        assert!(log.0.lock().unwrap().is_empty());
        // It arrived: nothing to do.
        f.message("11 AAAAAAAAAAAA");
        f.check(11, false);
        f.check(12, false);
        // Still missing at the next check: resync.
        f.check(12, false);
        assert_eq!(*log.0.lock().unwrap(), ["AAAAAAAAAAAA", "resync"]);
        // After a reconnection any difference resyncs at once.
        f.check(13, true);
        assert_eq!(log.0.lock().unwrap().len(), 3);
        assert_eq!(f.last, Some(13));
    }
}
