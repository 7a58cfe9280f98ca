//! The [`Verifier`]: from a presented credential to a [`Principal`] or a [`Denial`].
//!
//! ```text
//! parse (prefix, length, alphabet, CRC32)      -> malformed_key, no lookup
//! negative cache (ids recently found unknown)  -> invalid_key, no lookup
//! positive cache (dashmap, by key id)          -> digest check, status, expiry
//! store, on a miss only                        -> cached, then the same checks
//! ```
//!
//! Concurrent misses for one key id share one store read (single flight): the first
//! request reads, the others wait for its result and check their own secret against it.
//!
//! A record the store cannot decode (a corrupt row, [`StoreError::Corrupt`]) is not an
//! outage: the key is evicted from the cache and refused with
//! [`DenialCode::CorruptKey`] (clients see `invalid_key`; no `Retry-After`), and a warning
//! names the key id and the column. Only [`StoreError::Unavailable`] and the like let a
//! cached record be served past its refresh (within `max_stale`).
//!
//! The hot path, a request with a cached key, does no I/O, takes no global lock and
//! allocates nothing: one CRC32, one blake3 of ~40 bytes, one sharded map read, one
//! constant-time compare and one reference-count increment.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use dashmap::{DashMap, DashSet};
use tokio::sync::watch;

use crate::clock::{Clock, SystemClock};
use crate::denial::{Denial, DenialCode};
use crate::digest::{KeyDigest, KeyHasher};
use crate::idhash::KeyIdHashBuilder;
use crate::key::{KeyId, KeyParser, ParsedKey};
use crate::principal::{Interner, Principal};
use crate::record::{KeyRecord, KeyStatus};
use crate::store::{KeyFilter, KeyStore, StoreError};

/// Verifies presented keys against a [`KeyStore`] through an in-memory cache. Cheap to
/// clone; clones share the cache.
#[derive(Clone)]
pub struct Verifier {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn KeyStore>,
    parser: KeyParser,
    hasher: KeyHasher,
    clock: Arc<dyn Clock>,
    cache: DashMap<KeyId, Entry, KeyIdHashBuilder>,
    negative: NegativeCache,
    refresh_after: Duration,
    max_stale: Duration,
    /// Set once [`Verifier::preload`] has loaded every record: a miss then means unknown.
    complete: AtomicBool,
    /// In complete mode, ids invalidated while absent from the cache (they may be new).
    recheck: DashSet<KeyId>,
    /// Bumped by every invalidation, so a lookup that raced one does not cache old data.
    epoch: AtomicU64,
    /// While a preload runs: how many run, and the ids invalidated meanwhile (the loaded
    /// copy of those may be older than the change, so they are dropped after loading).
    loading: Mutex<(usize, Vec<KeyId>)>,
    /// Compiled scopes, patterns and attributes shared between cached principals.
    interner: Interner,
    /// Store reads under way, by key id: later misses for the same id wait for its result.
    inflight: DashMap<KeyId, Arc<Flight>, KeyIdHashBuilder>,
    /// Last-use marks not yet written whose cache entry went away (an invalidation, an
    /// eviction): kept for the next [`Verifier::flush_last_used`], at most
    /// [`MAX_ORPHAN_MARKS`].
    orphan_marks: Mutex<Vec<(KeyId, u32)>>,
    /// How lookups were answered ([`Verifier::stats`]).
    stats: Counters,
}

/// How a verifier's lookups were answered since it was built ([`Verifier::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifierStats {
    /// Answered from the cache of known keys (no store read).
    pub hits: u64,
    /// Needed a store read (a key not cached, or one due for a refresh).
    pub misses: u64,
    /// Answered `invalid_key` from the memory of unknown ids (no store read).
    pub negative_hits: u64,
    /// Store reads that failed (the store unreachable or slow; not a corrupt record).
    pub store_errors: u64,
}

/// A counter spread over cache lines, so that threads counting hits at once do not fight
/// over one line (each thread adds to its own stripe; a reader sums them).
struct Striped([Padded; STRIPES]);

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

const STRIPES: usize = 8;

impl Default for Striped {
    fn default() -> Self {
        Striped(std::array::from_fn(|_| Padded::default()))
    }
}

impl Striped {
    #[inline]
    fn add(&self) {
        self.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }
    fn sum(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |n, p| n.wrapping_add(p.0.load(Ordering::Relaxed)))
    }
}

/// This thread's stripe, assigned round-robin on first use.
#[inline]
fn stripe() -> usize {
    use std::cell::Cell;
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

#[derive(Default)]
struct Counters {
    hits: Striped,
    negative_hits: Striped,
    misses: AtomicU64,
    store_errors: AtomicU64,
}

/// How many last-use marks of evicted cache entries wait for the next flush at most (a
/// flood of invalidations cannot grow memory; past it, the oldest keys' marks are lost
/// until they are used again).
const MAX_ORPHAN_MARKS: usize = 65_536;

/// The resolution of last-used times: one minute.
const LAST_USED_RESOLUTION_S: u64 = 60;

/// One store read shared by every concurrent miss of a key id. The value is set once, when
/// the read ends; a flight dropped without a value (its reader was cancelled) makes the
/// waiters start over.
type Flight = watch::Sender<Option<Arc<Fetched>>>;

/// What one store read found, as every waiter needs it.
enum Fetched {
    /// The record (its checked parts).
    Found {
        digest: KeyDigest,
        status: KeyStatus,
        principal: Principal,
    },
    /// No such key.
    Missing,
    /// The stored record is unreadable.
    Corrupt,
    /// The store did not answer.
    Failed,
}

struct Entry {
    digest: KeyDigest,
    status: KeyStatus,
    principal: Principal,
    /// When the record was read, in nanoseconds since the Unix epoch (8 bytes, not 16).
    fetched_at: u64,
    refreshing: AtomicBool,
    /// The minute (since the Unix epoch) of the last successful use seen here; 0: none.
    used: AtomicU32,
    /// The latest minute written to the store.
    flushed: AtomicU32,
}

impl Entry {
    fn new(record: &KeyRecord, principal: Principal, now: SystemTime) -> Self {
        Entry {
            digest: record.digest,
            status: record.status,
            principal,
            fetched_at: unix_nanos(now),
            refreshing: AtomicBool::new(false),
            used: AtomicU32::new(0),
            flushed: AtomicU32::new(0),
        }
    }

    /// Marks a successful use at `now`: one atomic read, and a write once a minute.
    fn mark_used(&self, now: SystemTime) {
        let minute = use_minute(now);
        if self.used.load(Ordering::Relaxed) < minute {
            self.used.fetch_max(minute, Ordering::Relaxed);
        }
    }

    /// The mark not yet written, if any.
    fn unflushed(&self) -> Option<u32> {
        let used = self.used.load(Ordering::Relaxed);
        (used > self.flushed.load(Ordering::Relaxed)).then_some(used)
    }

    fn age(&self, now: SystemTime) -> Duration {
        // A clock that went backwards reads as "just fetched".
        Duration::from_nanos(unix_nanos(now).saturating_sub(self.fetched_at))
    }

    fn evaluate(&self, digest: Option<&KeyDigest>, now: SystemTime) -> Result<Principal, Denial> {
        let verdict = evaluate(&self.digest, self.status, &self.principal, digest, now);
        if verdict.is_ok() {
            self.mark_used(now);
        }
        verdict
    }
}

/// Checks a presented digest against a record's digest, status and expiry (`None`: the
/// caller proved the key otherwise, see [`Verifier::lookup_parent`]).
fn evaluate(
    stored: &KeyDigest,
    status: KeyStatus,
    principal: &Principal,
    presented: Option<&KeyDigest>,
    now: SystemTime,
) -> Result<Principal, Denial> {
    // The secret is checked first, so nobody learns a key's status without its secret.
    if presented.is_some_and(|p| !stored.ct_eq(p)) {
        return Err(Denial::new(DenialCode::InvalidKey));
    }
    match status {
        KeyStatus::Revoked => return Err(Denial::new(DenialCode::RevokedKey)),
        KeyStatus::Disabled => return Err(Denial::new(DenialCode::DisabledKey)),
        KeyStatus::Active => {}
    }
    if principal.expires_at().is_some_and(|e| now >= e) {
        return Err(Denial::new(DenialCode::ExpiredKey));
    }
    Ok(principal.clone())
}

/// The minute of `t` since the Unix epoch (at least 1, so 0 can mean "never").
fn use_minute(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs / LAST_USED_RESOLUTION_S)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The start of minute `m`.
fn minute_start(m: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(m) * LAST_USED_RESOLUTION_S)
}

/// `t` in nanoseconds since the Unix epoch (0 before it; saturating in year 2554).
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The result of the synchronous part of verification ([`Verifier::lookup`]).
#[derive(Debug)]
pub enum Lookup {
    /// Decided without I/O.
    Done(Result<Principal, Denial>),
    /// The store must be asked: pass this to [`Verifier::finish`].
    Pending(PendingLookup),
}

/// A verification waiting for the store. Holds the key id and the digest of the presented
/// secret, never the secret itself.
#[derive(Debug)]
pub struct PendingLookup {
    id: KeyId,
    /// `None` for [`Verifier::lookup_parent`]: the credential proved the key otherwise.
    digest: Option<KeyDigest>,
}

impl PendingLookup {
    /// The key id being looked up.
    pub fn key_id(&self) -> KeyId {
        self.id
    }
}

/// Configures a [`Verifier`].
pub struct VerifierBuilder {
    store: Arc<dyn KeyStore>,
    parser: KeyParser,
    hasher: KeyHasher,
    clock: Arc<dyn Clock>,
    negative_capacity: usize,
    negative_ttl: Duration,
    refresh_after: Duration,
    max_stale: Duration,
}

impl VerifierBuilder {
    /// Accept these prefixes (default: `kg` only).
    pub fn parser(mut self, parser: KeyParser) -> Self {
        self.parser = parser;
        self
    }
    /// Use this hasher (for a pepper); it must match the one keys were issued with.
    pub fn hasher(mut self, hasher: KeyHasher) -> Self {
        self.hasher = hasher;
        self
    }
    /// Read time from this clock (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }
    /// Read time from this shared clock.
    pub fn shared_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// How many unknown key ids to remember at most (default 65,536; 0 turns the negative
    /// cache off). Memory stays below about 64 bytes per entry.
    pub fn negative_capacity(mut self, n: usize) -> Self {
        self.negative_capacity = n;
        self
    }
    /// How long an unknown id is remembered as unknown (default 30 s). Keys created through
    /// this verifier's [`Verifier::invalidate`] are usable at once regardless.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }
    /// How long a cached record is trusted before it is read again from the store
    /// (default 30 s). This bounds how long a change made by another process without change
    /// notification takes to be seen.
    pub fn refresh_after(mut self, d: Duration) -> Self {
        self.refresh_after = d;
        self
    }
    /// How long past its refresh a cached record may still be used while the store is
    /// unreachable (default 5 min). Past it, requests with that key get `store_unavailable`.
    pub fn max_stale(mut self, d: Duration) -> Self {
        self.max_stale = d;
        self
    }
    /// Builds the verifier.
    pub fn build(self) -> Verifier {
        Verifier {
            shared: Arc::new(Shared {
                store: self.store,
                parser: self.parser,
                hasher: self.hasher,
                clock: self.clock,
                cache: DashMap::with_hasher(KeyIdHashBuilder::new()),
                negative: NegativeCache::new(self.negative_capacity, self.negative_ttl),
                refresh_after: self.refresh_after,
                max_stale: self.max_stale,
                complete: AtomicBool::new(false),
                recheck: DashSet::new(),
                epoch: AtomicU64::new(0),
                loading: Mutex::new((0, Vec::new())),
                interner: Interner::new(),
                inflight: DashMap::with_hasher(KeyIdHashBuilder::new()),
                orphan_marks: Mutex::new(Vec::new()),
                stats: Counters::default(),
            }),
        }
    }
}

impl Verifier {
    /// A verifier over `store` with default settings.
    pub fn new(store: impl KeyStore) -> Self {
        Self::builder(store).build()
    }

    /// Configures a verifier over `store`.
    pub fn builder(store: impl KeyStore) -> VerifierBuilder {
        Self::builder_shared(Arc::new(store))
    }

    /// Configures a verifier over a shared store.
    pub fn builder_shared(store: Arc<dyn KeyStore>) -> VerifierBuilder {
        VerifierBuilder {
            store,
            parser: KeyParser::default(),
            hasher: KeyHasher::new(),
            clock: Arc::new(SystemClock),
            negative_capacity: 65_536,
            negative_ttl: Duration::from_secs(30),
            refresh_after: Duration::from_secs(30),
            max_stale: Duration::from_secs(300),
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.shared.store
    }
    /// The parser (accepted prefixes).
    pub fn parser(&self) -> &KeyParser {
        &self.shared.parser
    }
    /// The hasher keys must be issued with.
    pub fn hasher(&self) -> &KeyHasher {
        &self.shared.hasher
    }
    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }
    /// How many records are cached.
    pub fn cached(&self) -> usize {
        self.shared.cache.len()
    }

    /// How lookups were answered since this verifier was built (clones share the
    /// counts): cache hits, misses (store reads), hits of the memory of unknown ids, and
    /// failed store reads. Counting costs a hit one relaxed add on a counter of its
    /// thread's own.
    pub fn stats(&self) -> VerifierStats {
        let c = &self.shared.stats;
        VerifierStats {
            hits: c.hits.sum(),
            misses: c.misses.load(Ordering::Relaxed),
            negative_hits: c.negative_hits.sum(),
            store_errors: c.store_errors.load(Ordering::Relaxed),
        }
    }

    /// Verifies `presented`, asking the store on a cache miss.
    pub async fn verify(&self, presented: &str) -> Result<Principal, Denial> {
        match self.lookup(presented) {
            Lookup::Done(result) => result,
            Lookup::Pending(p) => self.finish(p).await,
        }
    }

    /// The synchronous part of verification: decides without I/O when it can (malformed,
    /// known unknown, cached), or says the store must be asked.
    pub fn lookup(&self, presented: &str) -> Lookup {
        let s = &*self.shared;
        let parsed = match s.parser.parse(presented) {
            Ok(p) => p,
            Err(e) => return Lookup::Done(Err(Denial::malformed(e))),
        };
        self.lookup_parsed(&parsed)
    }

    /// [`Verifier::lookup`] for an already parsed key.
    pub fn lookup_parsed(&self, parsed: &ParsedKey<'_>) -> Lookup {
        let s = &*self.shared;
        let id = parsed.id();
        let now = s.clock.now();
        if let Some(entry) = s.cache.get(&id) {
            let age = entry.age(now);
            let must_refresh = age >= s.refresh_after;
            // One request refreshes a stale entry; the others keep using it meanwhile, as
            // long as it is within the staleness bound.
            let use_cached = !must_refresh
                || (age < s.refresh_after.saturating_add(s.max_stale)
                    && entry.refreshing.swap(true, Ordering::AcqRel));
            if use_cached {
                s.stats.hits.add();
                let digest = s.hasher.digest(parsed);
                return Lookup::Done(entry.evaluate(Some(&digest), now));
            }
        } else if s.complete.load(Ordering::Acquire) {
            if !s.recheck.contains(&id) {
                s.stats.negative_hits.add();
                return Lookup::Done(Err(Denial::new(DenialCode::InvalidKey)));
            }
        } else if s.negative.contains(&id, now) {
            s.stats.negative_hits.add();
            return Lookup::Done(Err(Denial::new(DenialCode::InvalidKey)));
        }
        s.stats.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Pending(PendingLookup {
            id,
            digest: Some(s.hasher.digest(parsed)),
        })
    }

    /// The current principal of key `id`, for a credential that proves the key by other
    /// means than its secret: a short-lived token this service signed for a caller who
    /// presented the key. Status and expiry are checked exactly as for the key itself
    /// (a revoked, disabled, expired or deleted key refuses its tokens), through the same
    /// cache, refresh and change notification, so a change to the key reaches its tokens on
    /// the next request. Never call it for an id a caller merely named. `now` is the
    /// verifier's clock, as the caller already read it.
    pub fn lookup_parent(&self, id: KeyId, now: SystemTime) -> Lookup {
        let s = &*self.shared;
        if let Some(entry) = s.cache.get(&id) {
            let age = entry.age(now);
            let must_refresh = age >= s.refresh_after;
            let use_cached = !must_refresh
                || (age < s.refresh_after.saturating_add(s.max_stale)
                    && entry.refreshing.swap(true, Ordering::AcqRel));
            if use_cached {
                return Lookup::Done(entry.evaluate(None, now));
            }
        } else if s.complete.load(Ordering::Acquire) {
            if !s.recheck.contains(&id) {
                return Lookup::Done(Err(Denial::new(DenialCode::InvalidKey)));
            }
        } else if s.negative.contains(&id, now) {
            return Lookup::Done(Err(Denial::new(DenialCode::InvalidKey)));
        }
        Lookup::Pending(PendingLookup { id, digest: None })
    }

    /// Finishes a verification that needs the store: reads the record, caches it (or
    /// remembers the id as unknown), and checks it. Concurrent calls for one key id share
    /// one store read. If the store fails, a cached record within the staleness bound still
    /// answers; otherwise `store_unavailable`. A corrupt record is evicted and refused with
    /// `corrupt_key`.
    pub async fn finish(&self, pending: PendingLookup) -> Result<Principal, Denial> {
        let s = &*self.shared;
        let id = pending.id;
        loop {
            let joined = match s.inflight.entry(id) {
                dashmap::Entry::Occupied(e) => Ok(e.get().subscribe()),
                dashmap::Entry::Vacant(v) => {
                    let flight = Arc::new(watch::channel(None).0);
                    v.insert(flight.clone());
                    Err(flight)
                }
            };
            match joined {
                Ok(mut rx) => {
                    // Another request is reading this id: wait for its result.
                    let done = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|v| v.clone());
                    match done {
                        Some(fetched) => return self.conclude(&fetched, &pending),
                        // Its reader was cancelled before the end: start over.
                        None => continue,
                    }
                }
                Err(flight) => {
                    // Ends the flight however this returns (cancellation included).
                    struct Landing<'a> {
                        s: &'a Shared,
                        id: KeyId,
                        flight: Arc<Flight>,
                    }
                    impl Drop for Landing<'_> {
                        fn drop(&mut self) {
                            self.s
                                .inflight
                                .remove_if(&self.id, |_, f| Arc::ptr_eq(f, &self.flight));
                        }
                    }
                    let landing = Landing { s, id, flight };
                    let fetched = Arc::new(self.fetch(id).await);
                    landing.flight.send_replace(Some(fetched.clone()));
                    drop(landing);
                    return self.conclude(&fetched, &pending);
                }
            }
        }
    }

    /// Reads `id` from the store and updates the cache with what it finds.
    async fn fetch(&self, id: KeyId) -> Fetched {
        let s = &*self.shared;
        let epoch = s.epoch.load(Ordering::Acquire);
        let fetched = match s.store.get(&id).await {
            Ok(Some(record)) if record.id == id => match self.resolve(&record).await {
                Ok(principal) => Ok(Some((record, principal))),
                Err(e) => Err(e),
            },
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        let now = s.clock.now();
        let unchanged = s.epoch.load(Ordering::Acquire) == epoch;
        match fetched {
            Ok(Some((record, principal))) => {
                let entry = Entry::new(&record, principal, now);
                let found = Fetched::Found {
                    digest: entry.digest,
                    status: entry.status,
                    principal: entry.principal.clone(),
                };
                if unchanged {
                    s.put(id, entry);
                    s.recheck.remove(&id);
                }
                s.negative.remove(&id);
                found
            }
            Ok(None) => {
                if unchanged {
                    s.evict(&id);
                    s.recheck.remove(&id);
                    s.negative.insert(id, now);
                }
                Fetched::Missing
            }
            Err(StoreError::Corrupt(why)) => {
                // Not an outage: the record is wrong, and a cached copy of it must not keep
                // the key alive. The message names the key and the column, never a value
                // that could be a secret.
                tracing::warn!(key_id = %id, error = %why, "stored key record is unreadable; the key is refused (corrupt_key) until the row is repaired");
                s.evict(&id);
                s.negative.remove(&id);
                if s.complete.load(Ordering::Acquire) {
                    // Preloaded mode: keep asking the store for it (so it reads corrupt_key,
                    // and a repaired row works again).
                    s.recheck.insert(id);
                }
                Fetched::Corrupt
            }
            Err(err) => {
                s.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key_id = %id, error = %err, "key store lookup failed");
                if let Some(entry) = s.cache.get(&id) {
                    entry.refreshing.store(false, Ordering::Release);
                }
                Fetched::Failed
            }
        }
    }

    /// Resolves a record's effective policy: reads its roles and identity when it has
    /// them (the only extra store reads, on a miss), and interns the result.
    async fn resolve(&self, record: &KeyRecord) -> Result<Principal, StoreError> {
        let s = &*self.shared;
        let roles = if record.roles.is_empty() {
            Vec::new()
        } else {
            s.store.roles(&record.roles).await?
        };
        let identity = match &record.identity {
            Some(name) => s.store.get_identity(name).await?,
            None => None,
        };
        Ok(Principal::resolve_shared(
            record,
            &roles,
            identity.as_ref(),
            &s.interner,
        ))
    }

    /// The verdict for `pending` from what the store read found.
    fn conclude(&self, fetched: &Fetched, pending: &PendingLookup) -> Result<Principal, Denial> {
        let s = &*self.shared;
        let now = s.clock.now();
        match fetched {
            Fetched::Found {
                digest,
                status,
                principal,
            } => {
                let verdict = evaluate(digest, *status, principal, pending.digest.as_ref(), now);
                if verdict.is_ok() {
                    if let Some(entry) = s.cache.get(&pending.id) {
                        entry.mark_used(now);
                    }
                }
                verdict
            }
            Fetched::Missing => Err(Denial::new(DenialCode::InvalidKey)),
            Fetched::Corrupt => Err(Denial::new(DenialCode::CorruptKey)),
            Fetched::Failed => {
                if let Some(entry) = s.cache.get(&pending.id) {
                    if entry.age(now) < s.refresh_after.saturating_add(s.max_stale) {
                        return entry.evaluate(pending.digest.as_ref(), now);
                    }
                }
                Err(Denial::new(DenialCode::StoreUnavailable)
                    .with_retry_after(Duration::from_secs(1)))
            }
        }
    }

    /// Forgets what the cache knows about `id`, so the next request reads the store. Call it
    /// after changing a record (lifecycle operations and change notification do).
    pub fn invalidate(&self, id: &KeyId) {
        let s = &*self.shared;
        {
            let mut loading = s.loading.lock().unwrap_or_else(PoisonError::into_inner);
            if loading.0 > 0 {
                loading.1.push(*id);
            }
        }
        s.epoch.fetch_add(1, Ordering::AcqRel);
        // A read under way may predate the change: later misses start a read of their own.
        s.inflight.remove(id);
        s.evict(id);
        s.negative.remove(id);
        if s.complete.load(Ordering::Acquire) {
            s.recheck.insert(*id);
        }
    }

    /// Forgets the whole cache (and leaves preloaded mode).
    pub fn invalidate_all(&self) {
        let s = &*self.shared;
        s.epoch.fetch_add(1, Ordering::AcqRel);
        s.complete.store(false, Ordering::Release);
        s.inflight.clear();
        s.keep_all_marks();
        s.cache.clear();
        s.negative.clear();
        s.recheck.clear();
    }

    /// Reads `id` from the store now and updates the cache.
    pub async fn refresh(&self, id: &KeyId) -> Result<(), StoreError> {
        let s = &*self.shared;
        s.epoch.fetch_add(1, Ordering::AcqRel);
        let record = match s.store.get(id).await {
            Ok(Some(r)) => match self.resolve(&r).await {
                Ok(p) => Some((r, p)),
                Err(e) => {
                    if matches!(e, StoreError::Corrupt(_)) {
                        s.evict(id);
                    }
                    return Err(e);
                }
            },
            Ok(None) => None,
            Err(e) => {
                if matches!(e, StoreError::Corrupt(_)) {
                    // A corrupt record must not stay cached.
                    s.evict(id);
                }
                return Err(e);
            }
        };
        let now = s.clock.now();
        match record {
            Some((r, p)) => {
                s.put(*id, Entry::new(&r, p, now));
                s.negative.remove(id);
            }
            None => {
                s.evict(id);
            }
        }
        s.recheck.remove(id);
        Ok(())
    }

    /// Loads every record into the cache and switches to preloaded mode: from then on an id
    /// missing from the cache is unknown without asking the store, so a flood of random
    /// well-formed keys never reaches it. Changes must then reach the cache through
    /// [`Verifier::invalidate`] or [`Verifier::refresh`]. Returns how many records loaded.
    ///
    /// Rows the store cannot read are left out with a warning each (one corrupt row does
    /// not stop the others from loading); requests with such a key still ask the store and
    /// are refused with `corrupt_key` until the row is repaired.
    pub async fn preload(&self) -> Result<usize, StoreError> {
        let s = &*self.shared;
        s.loading.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        // Ends the loading window however this returns (error or cancellation included).
        struct Loading<'a>(&'a Shared);
        impl Drop for Loading<'_> {
            fn drop(&mut self) {
                let s = self.0;
                let raced = {
                    let mut loading = s.loading.lock().unwrap_or_else(PoisonError::into_inner);
                    loading.0 -= 1;
                    if loading.0 == 0 {
                        std::mem::take(&mut loading.1)
                    } else {
                        loading.1.clone()
                    }
                };
                // A change that landed while the list was read may be missing from the
                // loaded copy: forget it, and ask the store for it on its next use.
                let complete = s.complete.load(Ordering::Acquire);
                for id in raced {
                    s.evict(&id);
                    if complete {
                        s.recheck.insert(id);
                    }
                }
            }
        }
        let guard = Loading(s);
        let listing = s.store.list_report(&KeyFilter::default()).await?;
        let roles = if listing.records.iter().any(|r| !r.roles.is_empty()) {
            match s.store.list_roles().await {
                Ok(roles) => roles,
                Err(StoreError::Unsupported(_)) => Vec::new(),
                Err(e) => return Err(e),
            }
        } else {
            Vec::new()
        };
        let identities = if listing.records.iter().any(|r| r.identity.is_some()) {
            match s.store.list_identities().await {
                Ok(list) => list,
                Err(StoreError::Unsupported(_)) => Vec::new(),
                Err(e) => return Err(e),
            }
        } else {
            Vec::new()
        };
        let now = s.clock.now();
        s.recheck.clear();
        for r in &listing.records {
            let identity = r
                .identity
                .as_deref()
                .and_then(|n| identities.iter().find(|i| i.name == n));
            let principal = Principal::resolve_shared(r, &roles, identity, &s.interner);
            s.put(r.id, Entry::new(r, principal, now));
        }
        for bad in &listing.skipped {
            tracing::warn!(key_id = %bad.id, column = %bad.column, reason = %bad.reason, "preload: left out a key record that cannot be read; requests with that key are refused (corrupt_key)");
            if let Some(id) = bad.key_id {
                // Not loaded, yet not unknown: ask the store for it (which refuses it as
                // corrupt, or finds it repaired).
                s.recheck.insert(id);
            }
        }
        s.complete.store(true, Ordering::Release);
        drop(guard);
        Ok(listing.records.len())
    }
}

impl Shared {
    /// Caches `entry` for `id`, carrying over the last-use mark of the entry it replaces.
    fn put(&self, id: KeyId, entry: Entry) {
        if let Some(old) = self.cache.insert(id, entry) {
            let (used, flushed) = (old.used.into_inner(), old.flushed.into_inner());
            if used > 0 {
                if let Some(new) = self.cache.get(&id) {
                    new.used.fetch_max(used, Ordering::Relaxed);
                    new.flushed.fetch_max(flushed, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops `id` from the cache, keeping its unwritten last-use mark for the next flush.
    fn evict(&self, id: &KeyId) {
        if let Some((_, old)) = self.cache.remove(id) {
            if let Some(minute) = old.unflushed() {
                self.keep_marks([(*id, minute)]);
            }
        }
    }

    /// Keeps the unwritten marks of every cached entry (before the cache is cleared).
    fn keep_all_marks(&self) {
        let marks: Vec<(KeyId, u32)> = self
            .cache
            .iter()
            .filter_map(|e| e.unflushed().map(|m| (*e.key(), m)))
            .collect();
        self.keep_marks(marks);
    }

    fn keep_marks(&self, marks: impl IntoIterator<Item = (KeyId, u32)>) {
        let mut kept = self
            .orphan_marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for mark in marks {
            if kept.len() >= MAX_ORPHAN_MARKS {
                break;
            }
            kept.push(mark);
        }
    }
}

impl Verifier {
    /// Writes the last-use marks taken since the previous flush to the store, in one
    /// [`KeyStore::record_last_used`] call; returns how many keys it wrote (0: nothing to
    /// write, and the store was not called).
    ///
    /// A successful verification marks its key in memory (the cache entry's minute, one
    /// atomic read per request and one write per key and minute): requests never write to
    /// the store. Times are kept to the minute (the start of the minute of the last use).
    /// Call this in the background ([`Verifier::spawn_last_used_flusher`]); when the store
    /// fails, the marks stay and the next flush writes them.
    pub async fn flush_last_used(&self) -> Result<usize, StoreError> {
        let s = &*self.shared;
        let mut marks: Vec<(KeyId, u32)> = std::mem::take(
            &mut *s
                .orphan_marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let orphans = marks.len();
        marks.extend(
            s.cache
                .iter()
                .filter_map(|e| e.unflushed().map(|m| (*e.key(), m))),
        );
        if marks.is_empty() {
            return Ok(0);
        }
        // One entry per key, the latest minute.
        marks.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        marks.dedup_by_key(|m| m.0);
        let times: Vec<(KeyId, SystemTime)> =
            marks.iter().map(|&(id, m)| (id, minute_start(m))).collect();
        let written = s.store.record_last_used(&times).await;
        if let Err(e) = written {
            if matches!(e, StoreError::Unsupported(_)) {
                // The store keeps no such times: holding the marks would only repeat this.
                for (id, minute) in &marks {
                    if let Some(entry) = s.cache.get(id) {
                        entry.flushed.fetch_max(*minute, Ordering::Relaxed);
                    }
                }
                return Err(e);
            }
            // Cached entries still hold theirs; put the orphans back.
            if orphans > 0 {
                let cached: Vec<(KeyId, u32)> = marks
                    .into_iter()
                    .filter(|(id, _)| !s.cache.contains_key(id))
                    .collect();
                s.keep_marks(cached);
            }
            return Err(e);
        }
        for (id, minute) in &marks {
            if let Some(entry) = s.cache.get(id) {
                entry.flushed.fetch_max(*minute, Ordering::Relaxed);
            }
        }
        Ok(marks.len())
    }

    /// Spawns a task on the current tokio runtime that calls
    /// [`flush_last_used`](Self::flush_last_used) every `every` (a failed flush logs a
    /// warning and is retried at the next tick; a store that keeps no last-used times is
    /// not warned about). The task ends by itself once every clone of this verifier is
    /// dropped, or when its handle is aborted.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn spawn_last_used_flusher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let every = every.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let verifier = Verifier { shared };
                if let Err(e) = verifier.flush_last_used().await {
                    if !matches!(e, StoreError::Unsupported(_)) {
                        tracing::warn!(error = %e, "could not write keys' last-used times; retrying at the next flush");
                    }
                }
            }
        })
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cached", &self.shared.cache.len())
            .field("prefixes", &self.shared.parser.prefixes())
            .field("preloaded", &self.shared.complete.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A bounded memory of unknown key ids: sharded, two generations per shard (when the
/// current one fills up it becomes the previous one and the oldest is dropped), each entry
/// valid for a time-to-live.
struct NegativeCache {
    shards: Box<[Mutex<Generations>]>,
    per_generation: usize,
    ttl: Duration,
}

#[derive(Default)]
struct Generations {
    current: std::collections::HashMap<KeyId, SystemTime>,
    previous: std::collections::HashMap<KeyId, SystemTime>,
}

const NEGATIVE_SHARDS: usize = 16;

impl NegativeCache {
    fn new(capacity: usize, ttl: Duration) -> Self {
        let shards = if capacity == 0 { 0 } else { NEGATIVE_SHARDS };
        NegativeCache {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_generation: (capacity / NEGATIVE_SHARDS / 2).max(1),
            ttl,
        }
    }

    fn shard(&self, id: &KeyId) -> Option<&Mutex<Generations>> {
        if self.shards.is_empty() {
            return None;
        }
        let b = id.as_bytes();
        let h = (b[0] as usize) ^ ((b[1] as usize) << 3) ^ ((b[2] as usize) << 6);
        Some(&self.shards[h % self.shards.len()])
    }

    fn lock(m: &Mutex<Generations>) -> std::sync::MutexGuard<'_, Generations> {
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, id: &KeyId, now: SystemTime) -> bool {
        let Some(shard) = self.shard(id) else {
            return false;
        };
        let g = Self::lock(shard);
        let at = g.current.get(id).or_else(|| g.previous.get(id));
        at.is_some_and(|t| now.duration_since(*t).unwrap_or_default() < self.ttl)
    }

    fn insert(&self, id: KeyId, now: SystemTime) {
        let Some(shard) = self.shard(&id) else {
            return;
        };
        let mut g = Self::lock(shard);
        if g.current.len() >= self.per_generation {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(id, now);
    }

    fn remove(&self, id: &KeyId) {
        if let Some(shard) = self.shard(id) {
            let mut g = Self::lock(shard);
            g.current.remove(id);
            g.previous.remove(id);
        }
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            let mut g = Self::lock(shard);
            g.current.clear();
            g.previous.clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let g = Self::lock(s);
                g.current.len() + g.previous.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
