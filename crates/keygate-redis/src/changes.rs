use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use keygate_core::{
    ChangeHandler, Identity, KeyFilter, KeyId, KeyRecord, KeyStore, Role, StoreError, Verifier,
};
use redis::Script;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{describe, Error, Redis};
use crate::epoch::{epoch_key, new_token};

/// How many changes the log keeps: a watcher further behind than this drops its cache.
pub const LOG_LENGTH: u64 = 10_000;

/// The most (message, key) pairs a watcher remembers between two checks; beyond it,
/// logged changes are evicted again even if a message named them.
const RECENT_CAP: usize = 4096;

static LOG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1]: the sequence; KEYS[2]: the log; KEYS[3]: the epoch.
-- ARGV[1]: the key id; ARGV[2]: an epoch to create if there is none; ARGV[3]: log length.
local seq = redis.call('INCR', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[2]) end
redis.call('ZADD', KEYS[2], seq, seq .. ' ' .. ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[3]))
return seq
"#,
    )
});

static READ_LOG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1]: the sequence; KEYS[2]: the log; KEYS[3]: the epoch.
-- ARGV[1]: the last sequence applied; ARGV[2]: the most entries to return.
-- Returns {epoch or '', sequence, the log entries after ARGV[1] up to the sequence}.
local cur = redis.call('GET', KEYS[1]) or '0'
local out = {redis.call('GET', KEYS[3]) or '', cur}
local from, n = tonumber(ARGV[1]), tonumber(cur)
if n and n > from and n - from <= tonumber(ARGV[2]) then
  for _, e in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], cur)) do
    out[#out + 1] = e
  end
end
return out
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

fn log_key(redis: &Redis) -> String {
    redis.key(format_args!("changes:log"))
}

/// The key that signs change messages (a keyed blake3 MAC). 32 bytes, from configuration;
/// give the same key to every publisher and watcher of a prefix. Never shown by `Debug`.
#[derive(Clone)]
pub struct ChangeKey([u8; 32]);

/// Why [`ChangeKey::from_hex`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a change-signing key is 64 hexadecimal digits (32 bytes)")]
pub struct InvalidChangeKey;

impl ChangeKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChangeKey(bytes)
    }

    /// A key from 64 hexadecimal digits (surrounding whitespace ignored); the error does not
    /// repeat the input.
    pub fn from_hex(hex: &str) -> Result<Self, InvalidChangeKey> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return Err(InvalidChangeKey);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16).ok_or(InvalidChangeKey);
            out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?)
                .map_err(|_| InvalidChangeKey)?;
        }
        Ok(ChangeKey(out))
    }

    /// The MAC of one message line on `channel`.
    fn mac(&self, channel: &str, line: &str) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"keygate change v1\n");
        h.update(channel.as_bytes());
        h.update(b"\n");
        h.update(line.as_bytes());
        h.finalize()
    }

    /// Whether `mac` (hex) signs `line` on `channel` (compared in constant time).
    fn verify(&self, channel: &str, line: &str, mac: &str) -> bool {
        blake3::Hash::from_hex(mac).is_ok_and(|m| m == self.mac(channel, line))
    }
}

impl std::fmt::Debug for ChangeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeKey(..)")
    }
}

/// Announces key changes to every replica (see the [`ChangeWatcher`] docs). Cheap to clone;
/// clones share the retry queue.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    redis: Redis,
    channel: String,
    sequence: String,
    log: String,
    epoch: String,
    key: Option<ChangeKey>,
    /// Ids whose publish failed, published again by the retry task.
    pending: Mutex<HashSet<KeyId>>,
    retrying: AtomicBool,
}

impl Publisher {
    /// A publisher on `redis`'s prefix, sending unsigned messages.
    pub fn new(redis: &Redis) -> Self {
        Publisher {
            inner: Arc::new(PublisherInner {
                redis: redis.clone(),
                channel: channel(redis),
                sequence: sequence(redis),
                log: log_key(redis),
                epoch: epoch_key(redis),
                key: None,
                pending: Mutex::new(HashSet::new()),
                retrying: AtomicBool::new(false),
            }),
        }
    }

    /// Signs every message with `key` (watchers given the same key ignore messages not
    /// signed with it). Call before sharing the publisher.
    pub fn signing_key(mut self, key: ChangeKey) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.key = Some(key),
            None => {
                let mut p = Publisher::new(&self.inner.redis);
                if let Some(inner) = Arc::get_mut(&mut p.inner) {
                    inner.key = Some(key);
                }
                self = p;
            }
        }
        self
    }

    /// Logs that `id` changed and publishes it; returns its sequence number. Once the change
    /// is logged it counts as announced: if only the publish fails, watchers find it in the
    /// log at their next check.
    pub async fn publish(&self, id: &KeyId) -> Result<u64, Error> {
        let inner = &*self.inner;
        let keys = vec![
            inner.sequence.clone(),
            inner.log.clone(),
            inner.epoch.clone(),
        ];
        let args = vec![
            id.as_str().to_owned(),
            new_token().to_string(),
            LOG_LENGTH.to_string(),
        ];
        let seq: u64 = inner.redis.eval(&LOG, keys, args).await?;
        let line = format!("{seq} {id}");
        let message = match &inner.key {
            Some(key) => format!("{line} {}", key.mac(&inner.channel, &line).to_hex()),
            None => line,
        };
        let channel = inner.channel.clone();
        let sent = inner
            .redis
            .run(move |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
        if let Err(e) = sent {
            tracing::warn!(key_id = %id, error = %e, "a key change was logged but not published; watchers find it at their next check");
        }
        Ok(seq)
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
            .field("signed", &self.inner.key.is_some())
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

    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update_versioned(record).await?;
        self.publisher.announce(&record.id).await;
        Ok(())
    }

    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        self.inner.roles(names).await
    }

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        self.inner.list_roles().await
    }

    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        self.inner.insert_role(role).await?;
        // Keys may already name it: they gain its grants.
        self.announce_holders(&role.name).await;
        Ok(())
    }

    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        self.inner.update_role(role).await?;
        self.announce_holders(&role.name).await;
        Ok(())
    }

    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self.inner.delete_role(name).await?;
        if deleted {
            self.announce_holders(name).await;
        }
        Ok(deleted)
    }

    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.inner.keys_with_role(name).await
    }

    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        self.inner.get_identity(name).await
    }

    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.inner.list_identities().await
    }

    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.inner.insert_identity(identity).await
    }

    /// Not a key change: nothing is announced (no replica drops its cached key).
    async fn record_last_used(
        &self,
        used: &[(KeyId, std::time::SystemTime)],
    ) -> Result<(), StoreError> {
        self.inner.record_last_used(used).await
    }

    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.inner.update_identity(identity).await?;
        self.announce_owned(&identity.name).await;
        Ok(())
    }

    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        let deleted = self.inner.delete_identity(name).await?;
        if deleted {
            self.announce_owned(name).await;
        }
        Ok(deleted)
    }

    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.inner.keys_with_identity(name).await
    }
}

impl<S: KeyStore> Publishing<S> {
    /// Announces a change of every key of identity `name`, as [`Self::announce_holders`]
    /// does for a role.
    async fn announce_owned(&self, name: &str) {
        match self.inner.keys_with_identity(name).await {
            Ok(ids) => {
                for id in ids {
                    self.publisher.announce(&id).await;
                }
            }
            Err(e) => {
                tracing::warn!(identity = %name, error = %e, "could not list the keys of a changed identity; replicas resolve them at their next refresh");
            }
        }
    }

    /// Announces a change of every key naming role `name`, so replicas resolve them again.
    /// If the holders cannot be listed, a warning says so (replicas then see the change
    /// at their next refresh of those keys).
    async fn announce_holders(&self, name: &str) {
        match self.inner.keys_with_role(name).await {
            Ok(ids) => {
                for id in ids {
                    self.publisher.announce(&id).await;
                }
            }
            Err(e) => {
                tracing::warn!(role = %name, error = %e, "could not list the keys holding a changed role; replicas resolve them at their next refresh");
            }
        }
    }
}

/// Settings of a [`ChangeWatcher`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    resync_every: Duration,
    resync_interval: Duration,
    key: Option<ChangeKey>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            resync_every: Duration::from_secs(1),
            resync_interval: Duration::from_secs(1),
            key: None,
        }
    }
}

impl WatchOptions {
    /// The defaults: the stored sequence is checked every second, the cache dropped at most
    /// once a second, messages not signed.
    pub fn new() -> Self {
        Self::default()
    }

    /// How often the stored sequence and change log are read (and the subscription
    /// pinged): a missed message is healed within one of these (default 1 s; at least
    /// 10 ms).
    pub fn resync_every(mut self, every: Duration) -> Self {
        self.resync_every = every.max(Duration::from_millis(10));
        self
    }

    /// The least time between two drops of the whole cache, and between two extra checks
    /// asked for by out-of-order messages (default 1 s; at least 10 ms). Reasons arising
    /// within it coalesce into one drop (or check) at its end, so nobody who can publish on
    /// the channel, or flush Redis, can make a replica reload its keys more often.
    pub fn resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Accepts only messages signed with `key` (see the [`ChangeWatcher`] docs); others are
    /// ignored and counted ([`ChangeWatcher::rejected`]). The change log still heals what
    /// they would have announced.
    pub fn signing_key(mut self, key: ChangeKey) -> Self {
        self.key = Some(key);
        self
    }
}

#[derive(Default)]
struct State {
    subscribed: AtomicBool,
    resyncs: AtomicU64,
    messages: AtomicU64,
    rejected: AtomicU64,
    checks: AtomicU64,
    healed: AtomicU64,
}

/// A running task that makes a [`ChangeHandler`] (a replica's [`Verifier`]) follow the key
/// changes published on Redis. Made by [`Redis::watch`] or [`Redis::follow`]. Dropping it
/// stops the task; [`ChangeWatcher::shutdown`] stops it and waits.
///
/// Change propagation between replicas: key writes are published on a Redis channel, and
/// every replica's verifier evicts the key it is told about.
///
/// - A writer wraps its key store in [`Publishing`] (or calls [`Publisher::publish`]
///   itself): after each successful insert or update, one Lua script increments the
///   sequence `{prefix}:changes:seq` and appends `"<seq> <key id>"` to the change log
///   `{prefix}:changes:log` (a sorted set by sequence, the last [`LOG_LENGTH`] changes);
///   then the same line (signed, with a [`ChangeKey`]) is published on `{prefix}:changes`.
///   A change that cannot be logged (Redis down) never fails the write: the id is queued
///   and published again in the background until Redis answers.
/// - Every replica runs a [`ChangeWatcher`] ([`Redis::watch`]): a subscriber that calls
///   [`Verifier::invalidate`] for each message, so the next request with that key reads the
///   store again.
///
/// # What the watcher trusts
/// Messages are only hints: pub/sub delivers at most once, and anyone allowed to publish on
/// the channel can send anything. The watcher's accounting uses only what is stored: every
/// [`WatchOptions::resync_every`] (and soon after a message whose number does not follow
/// the previous one) it reads the stored sequence, the [epoch](crate::RestartMonitor) and the log
/// entries it has not applied, and evicts each logged key that no message named with the
/// same number. So a lost message is healed within one period, and a forged one can neither
/// hide a lost real change (the log still names it) nor make the watcher drop its cache.
/// The whole cache is dropped ([`Verifier::invalidate_all`]) only when the stored state says
/// changes may be unaccounted for: the epoch changed (Redis lost or replaced its state), the
/// sequence went back, or the log no longer reaches back to the last change applied.
/// Drops happen at most once per [`WatchOptions::resync_interval`]; further reasons within
/// it coalesce into one drop at its end.
///
/// A forged message still evicts the key it names (the next request for it reads the store)
/// unless messages are signed: with a [`ChangeKey`] given to the publishers
/// ([`Publisher::signing_key`]) and the watchers ([`WatchOptions::signing_key`]), each
/// message carries a keyed blake3 MAC of the channel, sequence and key id, and watchers
/// ignore (and count, [`ChangeWatcher::rejected`]) messages without a valid one. Roll out
/// signing publishers first: a watcher without a key accepts signed messages too. A replayed
/// signed message only evicts its key again. Better still, allow only the writers to
/// publish (Redis ACLs, see the crate README section of the workspace README).
///
/// So a change reaches every connected replica within one pub/sub delivery, and a replica
/// that missed it within one resync period (or at once on reconnecting).
#[must_use = "the watcher stops when dropped"]
pub struct ChangeWatcher {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    seq: watch::Receiver<u64>,
    state: Arc<State>,
}

impl ChangeWatcher {
    /// The sequence number of the last change handled (announced by a message in order, or
    /// read from the log), or resynced past.
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

    /// How many messages were ignored: unreadable, or (with a signing key) not signed with
    /// it.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Acquire)
    }

    /// How many times the stored sequence and change log were read.
    pub fn checks(&self) -> u64 {
        self.state.checks.load(Ordering::Acquire)
    }

    /// How many logged changes were applied from the log because no message announced them.
    pub fn healed(&self) -> u64 {
        self.state.healed.load(Ordering::Acquire)
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
            .field("rejected", &self.rejected())
            .finish()
    }
}

impl Redis {
    /// Makes `verifier` follow the key changes published on this prefix: each message
    /// evicts its key; the change log heals missed messages; the whole cache is dropped only
    /// when the stored state says changes may be unaccounted for (see the
    /// [`ChangeWatcher`] docs). Changes published before the subscription is up are not
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

/// What one check read: the epoch (empty when none exists), the stored sequence, and the
/// log entries after the last applied sequence (empty when too many).
struct Stored {
    epoch: String,
    current: u64,
    entries: Vec<(u64, KeyId)>,
    /// Every entry was readable.
    readable: bool,
}

impl Stored {
    fn parse(mut raw: Vec<String>) -> Result<Stored, Error> {
        if raw.len() < 2 {
            return Err(Error::Unexpected("short answer from the change log".into()));
        }
        let rest = raw.split_off(2);
        let current = raw[1]
            .parse()
            .map_err(|_| Error::Unexpected("unreadable change sequence".into()))?;
        let mut readable = true;
        let entries = rest
            .iter()
            .filter_map(|e| {
                let parsed = parse_line(e);
                readable &= parsed.is_some();
                parsed
            })
            .collect();
        Ok(Stored {
            epoch: std::mem::take(&mut raw[0]),
            current,
            entries,
            readable,
        })
    }
}

/// `"<seq> <key id>"`.
fn parse_line(line: &str) -> Option<(u64, KeyId)> {
    let (seq, id) = line.split_once(' ')?;
    Some((seq.parse().ok()?, KeyId::parse(id).ok()?))
}

/// The watcher's view of the changes.
struct Follow<H> {
    handler: H,
    channel: String,
    key: Option<ChangeKey>,
    /// The log was applied through this sequence; `None` before the first check.
    confirmed: Option<u64>,
    /// The epoch at the last check ("" when there was none).
    epoch: String,
    /// The sequence of the last message.
    last_message: Option<u64>,
    /// Messages handled since the last check, so the log does not evict their keys twice.
    recent: HashSet<(u64, KeyId)>,
    /// A message suggested a gap: check soon.
    check_wanted: bool,
    /// A drop is due but was deferred by the interval.
    drop_pending: bool,
    interval: Duration,
    last_drop: Option<Instant>,
    seq_tx: watch::Sender<u64>,
    state: Arc<State>,
}

impl<H: ChangeHandler> Follow<H> {
    fn publish_seq(&self, seq: u64) {
        self.seq_tx.send_if_modified(|s| {
            let moved = seq > *s;
            if moved {
                *s = seq;
            }
            moved
        });
    }

    fn reject(&self, why: &str) {
        let n = self.state.rejected.fetch_add(1, Ordering::AcqRel) + 1;
        // First, second, fourth, ...: a flood cannot flood the log too.
        if n.is_power_of_two() {
            tracing::warn!(rejected = n, reason = why, "key-change message ignored");
        }
    }

    fn message(&mut self, payload: &str) {
        let mut parts = payload.splitn(3, ' ');
        let (Some(seq), Some(id)) = (parts.next(), parts.next()) else {
            return self.reject("unreadable");
        };
        let mac = parts.next();
        let line_len = seq.len() + 1 + id.len();
        let (Ok(seq), Ok(id)) = (seq.parse::<u64>(), KeyId::parse(id)) else {
            return self.reject("unreadable");
        };
        if let Some(key) = &self.key {
            let signed = mac.is_some_and(|m| key.verify(&self.channel, &payload[..line_len], m));
            if !signed {
                return self.reject("not signed with the configured key");
            }
        }
        // Counted before the eviction, so whoever sees the eviction's effect (a refused key)
        // also sees the message counted.
        self.state.messages.fetch_add(1, Ordering::AcqRel);
        self.handler.changed(&id);
        if self.recent.len() < RECENT_CAP {
            self.recent.insert((seq, id));
        }
        let in_order = self.last_message.is_some_and(|l| seq == l + 1);
        self.last_message = Some(seq);
        if in_order {
            self.publish_seq(seq);
        } else {
            // Out of order, or a gap: the log will tell (never the message itself).
            self.check_wanted = true;
        }
    }

    /// Applies what a check read.
    fn apply(&mut self, stored: Stored, now: Instant) {
        self.state.checks.fetch_add(1, Ordering::AcqRel);
        self.check_wanted = false;
        let Some(confirmed) = self.confirmed else {
            // The first check: the baseline.
            self.confirmed = Some(stored.current);
            self.epoch = stored.epoch;
            self.last_message = Some(stored.current);
            self.recent.clear();
            self.publish_seq(stored.current);
            return;
        };
        let gap = stored.current.saturating_sub(confirmed);
        let reason = if !self.epoch.is_empty() && stored.epoch != self.epoch {
            Some("Redis lost or replaced its state (the epoch changed)")
        } else if stored.current < confirmed {
            Some("the sequence went back")
        } else if gap > 0
            && (!stored.readable
                || stored.entries.len() as u64 != gap
                || stored
                    .entries
                    .iter()
                    .zip(confirmed + 1..)
                    .any(|((seq, _), want)| *seq != want))
        {
            Some("the change log does not cover the changes missed")
        } else {
            None
        };
        if let Some(why) = reason {
            if self.last_drop.is_some_and(|at| now < at + self.interval) {
                // Coalesce: dropped once the interval is over.
                self.drop_pending = true;
                return;
            }
            tracing::warn!(
                seq = stored.current,
                reason = why,
                "key changes may have been missed; dropping the key cache"
            );
            self.handler.resync();
            self.state.resyncs.fetch_add(1, Ordering::AcqRel);
            self.last_drop = Some(now);
        } else {
            for (seq, id) in &stored.entries {
                if !self.recent.contains(&(*seq, *id)) {
                    self.handler.changed(id);
                    self.state.healed.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        self.drop_pending = false;
        self.confirmed = Some(stored.current);
        self.epoch = stored.epoch;
        let current = stored.current;
        self.recent.retain(|(seq, _)| *seq > current);
        self.publish_seq(current);
    }

    /// When the next extra check may run, if one is wanted.
    fn next_extra(&self, last_extra: Option<Instant>, now: Instant) -> Option<Instant> {
        if self.drop_pending {
            return Some(self.last_drop.map_or(now, |at| at + self.interval));
        }
        self.check_wanted
            .then(|| last_extra.map_or(now, |at| (at + self.interval).max(now)))
    }
}

async fn read_stored(redis: &Redis, keys: &[String; 3], after: u64) -> Result<Stored, Error> {
    let raw: Vec<String> = redis
        .eval(&READ_LOG, keys.to_vec(), vec![after, LOG_LENGTH])
        .await?;
    Stored::parse(raw)
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
    let keys = [sequence(&redis), log_key(&redis), epoch_key(&redis)];
    let timeout = redis.timeout();
    let mut f = Follow {
        handler,
        channel: channel.clone(),
        key: options.key.clone(),
        confirmed: None,
        epoch: String::new(),
        last_message: None,
        recent: HashSet::new(),
        check_wanted: false,
        drop_pending: false,
        interval: options.resync_interval,
        last_drop: None,
        seq_tx,
        state: state.clone(),
    };
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    let mut last_extra: Option<Instant> = None;
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
        // Subscribed: anything published from now on arrives. Read the stored state to
        // learn what was missed before.
        match read_stored(&redis, &keys, f.confirmed.unwrap_or(0)).await {
            Ok(stored) => f.apply(stored, Instant::now()),
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
            let extra = f.next_extra(last_extra, Instant::now());
            // Timers before messages: a flood of messages must not starve the checks.
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    state.subscribed.store(false, Ordering::Release);
                    return;
                }
                _ = tokio::time::sleep_until(extra.unwrap_or_else(Instant::now)), if extra.is_some() => {
                    last_extra = Some(Instant::now());
                    match read_stored(&redis, &keys, f.confirmed.unwrap_or(0)).await {
                        Ok(stored) => f.apply(stored, Instant::now()),
                        Err(_) => break "the change log cannot be read",
                    }
                }
                _ = tick.tick() => {
                    let alive = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break "the subscription stopped answering";
                    }
                    match read_stored(&redis, &keys, f.confirmed.unwrap_or(0)).await {
                        Ok(stored) => f.apply(stored, Instant::now()),
                        Err(_) => break "the change log cannot be read",
                    }
                }
                msg = stream.next() => match msg {
                    Some(msg) => match msg.get_payload::<String>() {
                        Ok(payload) => f.message(&payload),
                        Err(_) => f.reject("unreadable"),
                    },
                    None => break "connection lost",
                },
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

    fn follow(key: Option<ChangeKey>) -> (Follow<Arc<Log>>, Arc<Log>) {
        let log = Arc::new(Log::default());
        let (seq_tx, _) = watch::channel(0);
        (
            Follow {
                handler: log.clone(),
                channel: "p:changes".into(),
                key,
                confirmed: None,
                epoch: String::new(),
                last_message: None,
                recent: HashSet::new(),
                check_wanted: false,
                drop_pending: false,
                interval: Duration::from_secs(1),
                last_drop: None,
                seq_tx,
                state: Arc::default(),
            },
            log,
        )
    }

    fn stored(epoch: &str, current: u64, entries: &[(u64, &str)]) -> Stored {
        Stored {
            epoch: epoch.into(),
            current,
            entries: entries
                .iter()
                .map(|(s, id)| (*s, KeyId::parse(id).unwrap()))
                .collect(),
            readable: true,
        }
    }

    fn seen(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.0.lock().unwrap())
    }

    #[test]
    fn messages_are_hints_and_the_log_decides() {
        let (mut f, log) = follow(None);
        let t0 = Instant::now();
        f.apply(stored("E", 5, &[]), t0);
        f.message("6 AAAAAAAAAAAA");
        assert!(!f.check_wanted, "in order");
        // Forged, out of order: evicts its key, asks for a check, drops nothing.
        f.message("99 BBBBBBBBBBBB");
        f.message("1 BBBBBBBBBBBB");
        assert!(f.check_wanted);
        f.message("garbage");
        f.message("3 not-an-id");
        assert_eq!(f.state.rejected.load(Ordering::Relaxed), 2);
        assert_eq!(seen(&log), ["AAAAAAAAAAAA", "BBBBBBBBBBBB", "BBBBBBBBBBBB"]);
        // The log holds 6 (announced) and 7 (lost): only 7 is applied again.
        f.apply(
            stored("E", 7, &[(6, "AAAAAAAAAAAA"), (7, "CCCCCCCCCCCC")]),
            t0,
        );
        assert_eq!(seen(&log), ["CCCCCCCCCCCC"]);
        assert_eq!(f.state.healed.load(Ordering::Relaxed), 1);
        assert_eq!(f.state.resyncs.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_forged_message_cannot_hide_a_lost_one() {
        let (mut f, log) = follow(None);
        let t0 = Instant::now();
        f.apply(stored("E", 10, &[]), t0);
        // Real 11 (key C) lost; a forged 11 names key F.
        f.message("11 FFFFFFFFFFFF");
        f.apply(stored("E", 11, &[(11, "CCCCCCCCCCCC")]), t0);
        assert_eq!(seen(&log), ["FFFFFFFFFFFF", "CCCCCCCCCCCC"]);
    }

    #[test]
    fn drops_only_on_stored_evidence_and_at_most_once_per_interval() {
        let (mut f, log) = follow(None);
        let t0 = Instant::now();
        f.apply(stored("E", 10, &[]), t0);
        // The log does not reach back (a trimmed log, or INCR without a log entry).
        f.apply(stored("E", 12, &[(12, "AAAAAAAAAAAA")]), t0);
        assert_eq!(seen(&log), ["resync"]);
        // The epoch changed: a drop is due, but within the interval it waits.
        f.apply(stored("F", 1, &[]), t0 + Duration::from_millis(10));
        assert!(seen(&log).is_empty());
        assert!(f.drop_pending);
        assert_eq!(
            f.next_extra(None, t0 + Duration::from_millis(10)),
            Some(t0 + Duration::from_secs(1))
        );
        f.apply(stored("F", 1, &[]), t0 + Duration::from_secs(1));
        assert_eq!(seen(&log), ["resync"]);
        assert!(!f.drop_pending);
        // The sequence going back is a reason too.
        f.apply(stored("F", 0, &[]), t0 + Duration::from_secs(3));
        assert_eq!(seen(&log), ["resync"]);
        assert_eq!(f.state.resyncs.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn signed_messages_only_when_a_key_is_set() {
        let key = ChangeKey::from_bytes([7; 32]);
        let (mut f, log) = follow(Some(key.clone()));
        f.apply(stored("E", 0, &[]), Instant::now());
        let good = format!(
            "1 AAAAAAAAAAAA {}",
            key.mac("p:changes", "1 AAAAAAAAAAAA").to_hex()
        );
        let other_channel = format!(
            "2 BBBBBBBBBBBB {}",
            key.mac("q:changes", "2 BBBBBBBBBBBB").to_hex()
        );
        let other_key = format!(
            "2 BBBBBBBBBBBB {}",
            ChangeKey::from_bytes([8; 32])
                .mac("p:changes", "2 BBBBBBBBBBBB")
                .to_hex()
        );
        let tampered = good.replace("AAAAAAAAAAAA", "CCCCCCCCCCCC");
        for m in [
            good.as_str(),
            "2 BBBBBBBBBBBB",
            &other_channel,
            &other_key,
            &tampered,
            "2 BBBBBBBBBBBB zz",
        ] {
            f.message(m);
        }
        assert_eq!(seen(&log), ["AAAAAAAAAAAA"]);
        assert_eq!(f.state.rejected.load(Ordering::Relaxed), 5);
        // Without a key, signed messages are accepted as well (publishers sign first).
        let (mut f, log) = follow(None);
        f.message(&good);
        assert_eq!(seen(&log), ["AAAAAAAAAAAA"]);
    }

    #[test]
    fn keys_parse_from_hex_without_echoing_it() {
        let hex = "00".repeat(31) + "ff";
        assert!(ChangeKey::from_hex(&hex).is_ok());
        assert!(ChangeKey::from_hex(&format!(" {hex}\n")).is_ok());
        for bad in ["", "abc", &"g".repeat(64), &"0".repeat(66), &"é".repeat(32)] {
            let e = ChangeKey::from_hex(bad).unwrap_err();
            assert!(!e.to_string().contains(bad) || bad.is_empty());
        }
        assert_eq!(
            format!("{:?}", ChangeKey::from_hex(&hex).unwrap()),
            "ChangeKey(..)"
        );
    }
}
