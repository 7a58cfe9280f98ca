use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::{ApiKey, ManualClock, MemoryStore, Prefix};

/// A store that counts reads and can be switched off, made to return corrupt records, or
/// made to hold reads until the test lets them through.
#[derive(Clone, Default)]
struct CountingStore {
    inner: MemoryStore,
    gets: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    corrupt: Arc<AtomicBool>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    last_used_writes: Arc<AtomicUsize>,
}

impl CountingStore {
    fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl KeyStore for CountingStore {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            // Held until the test adds a permit; each read takes one for good.
            gate.acquire().await.expect("gate open").forget();
        }
        self.check()?;
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt(format!(
                "key {id}: column status: \"Active\" is not active, disabled or revoked"
            )));
        }
        self.inner.get(id).await
    }
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert(record).await
    }
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update(record).await
    }
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.list(filter).await
    }
    async fn record_last_used(&self, used: &[(KeyId, SystemTime)]) -> Result<(), StoreError> {
        self.last_used_writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.record_last_used(used).await
    }
}

struct Fixture {
    store: CountingStore,
    clock: ManualClock,
    verifier: Verifier,
}

fn fixture(configure: impl FnOnce(VerifierBuilder) -> VerifierBuilder) -> Fixture {
    let store = CountingStore::default();
    let clock = ManualClock::at_2026();
    let verifier = configure(Verifier::builder(store.clone()).clock(clock.clone())).build();
    Fixture {
        store,
        clock,
        verifier,
    }
}

impl Fixture {
    async fn issue(&self, edit: impl FnOnce(&mut KeyRecord)) -> (ApiKey, KeyRecord) {
        let (key, mut record) = KeyRecord::generate(
            &Prefix::default(),
            self.verifier.hasher(),
            "test",
            self.clock.now(),
        )
        .unwrap();
        edit(&mut record);
        self.store.inner.insert(&record).await.unwrap();
        (key, record)
    }
}

fn code(r: Result<Principal, Denial>) -> DenialCode {
    r.expect_err("expected a denial").code()
}

#[tokio::test]
async fn a_known_key_is_read_once_then_served_from_cache() {
    let f = fixture(|b| b);
    let (key, record) = f
        .issue(|r| {
            r.owner = Some("alice".into());
            r.attributes.insert("tenant".into(), "acme".into());
        })
        .await;
    for _ in 0..5 {
        let p = f.verifier.verify(key.expose_secret()).await.unwrap();
        assert_eq!(p.key_id(), record.id);
        assert_eq!(p.subject(), Some("alice"));
        assert_eq!(p.tenant(), Some("acme"));
    }
    assert_eq!(f.store.gets(), 1);
    assert!(matches!(
        f.verifier.lookup(key.expose_secret()),
        Lookup::Done(Ok(_))
    ));
}

#[tokio::test]
async fn wrong_secret_for_a_known_id_is_invalid() {
    let f = fixture(|b| b);
    let (key, record) = f.issue(|_| {}).await;
    // Same id and prefix, other secret, valid checksum.
    let other = ApiKey::generate(&Prefix::default()).unwrap();
    let forged = forge(&record.id, other.parsed().secret());
    assert_eq!(
        code(f.verifier.verify(&forged).await),
        DenialCode::InvalidKey
    );
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
}

/// Builds a well-formed key text for `id` with `secret` (valid checksum).
fn forge(id: &KeyId, secret: &str) -> String {
    let head = format!("kg_{id}{secret}");
    let mut n = crc32fast::hash(head.as_bytes());
    let alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut sum = [b'0'; 6];
    for slot in sum.iter_mut().rev() {
        *slot = alphabet[(n % 62) as usize];
        n /= 62;
    }
    head + std::str::from_utf8(&sum).unwrap()
}

#[tokio::test]
async fn status_and_expiry_are_enforced_after_the_secret_check() {
    let f = fixture(|b| b);
    let (revoked, _) = f.issue(|r| r.status = KeyStatus::Revoked).await;
    let (disabled, _) = f.issue(|r| r.status = KeyStatus::Disabled).await;
    let now = f.clock.now();
    let (expiring, _) = f
        .issue(|r| r.expires_at = Some(now + Duration::from_secs(60)))
        .await;
    assert_eq!(
        code(f.verifier.verify(revoked.expose_secret()).await),
        DenialCode::RevokedKey
    );
    assert_eq!(
        code(f.verifier.verify(disabled.expose_secret()).await),
        DenialCode::DisabledKey
    );
    assert!(f.verifier.verify(expiring.expose_secret()).await.is_ok());
    f.clock.advance(Duration::from_secs(59));
    assert!(f.verifier.verify(expiring.expose_secret()).await.is_ok());
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        code(f.verifier.verify(expiring.expose_secret()).await),
        DenialCode::ExpiredKey
    );
    // A forged secret for the revoked id reads invalid, not revoked.
    let forged = forge(
        &revoked.id(),
        ApiKey::generate(&Prefix::default())
            .unwrap()
            .parsed()
            .secret(),
    );
    assert_eq!(
        code(f.verifier.verify(&forged).await),
        DenialCode::InvalidKey
    );
}

#[tokio::test]
async fn malformed_keys_never_reach_the_store() {
    let f = fixture(|b| b);
    for bad in [
        "",
        "kg_",
        "nope",
        "kg_abc",
        &"x".repeat(5000),
        "zz_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef",
    ] {
        assert_eq!(
            code(f.verifier.verify(bad).await),
            DenialCode::MalformedKey,
            "{bad:.20}"
        );
    }
    assert_eq!(f.store.gets(), 0);
}

#[tokio::test]
async fn unknown_ids_are_remembered_until_the_ttl_or_an_invalidation() {
    let f = fixture(|b| b.negative_ttl(Duration::from_secs(10)));
    let unknown = ApiKey::generate(&Prefix::default()).unwrap();
    for _ in 0..100 {
        assert_eq!(
            code(f.verifier.verify(unknown.expose_secret()).await),
            DenialCode::InvalidKey
        );
    }
    assert_eq!(
        f.store.gets(),
        1,
        "a repeated unknown id reaches the store once"
    );
    f.clock.advance(Duration::from_secs(10));
    assert_eq!(
        code(f.verifier.verify(unknown.expose_secret()).await),
        DenialCode::InvalidKey
    );
    assert_eq!(f.store.gets(), 2, "after the ttl the store is asked again");

    // A key created after its id was seen as unknown works once invalidated.
    let (key, record) = f.issue(|_| {}).await;
    let _ = f
        .verifier
        .verify(&forge(&record.id, key.parsed().secret()))
        .await;
    f.verifier.invalidate(&record.id);
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn the_negative_cache_is_bounded() {
    let f = fixture(|b| b.negative_capacity(1_000));
    for _ in 0..20_000 {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        let _ = f.verifier.verify(k.expose_secret()).await;
    }
    let len = f.verifier.shared.negative.len();
    assert!(len <= 1_000, "negative cache holds {len} entries");
    assert!(len >= 400, "negative cache holds only {len} entries");
}

#[tokio::test]
async fn preloaded_mode_answers_random_ids_without_the_store() {
    let f = fixture(|b| b);
    let (key, _) = f.issue(|_| {}).await;
    assert_eq!(f.verifier.preload().await.unwrap(), 1);
    for _ in 0..1_000 {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        assert_eq!(
            code(f.verifier.verify(k.expose_secret()).await),
            DenialCode::InvalidKey
        );
    }
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    assert_eq!(f.store.gets(), 0);

    // A key created later becomes usable once its id is invalidated.
    let (late, record) = f.issue(|_| {}).await;
    assert_eq!(
        code(f.verifier.verify(late.expose_secret()).await),
        DenialCode::InvalidKey
    );
    f.verifier.invalidate(&record.id);
    assert!(f.verifier.verify(late.expose_secret()).await.is_ok());
    assert_eq!(f.store.gets(), 1);
}

#[tokio::test]
async fn a_revocation_is_seen_after_invalidate_or_refresh() {
    let f = fixture(|b| b);
    let (key, mut record) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    record.status = KeyStatus::Revoked;
    f.store.inner.update(&record).await.unwrap();
    // Still cached.
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    f.verifier.refresh(&record.id).await.unwrap();
    assert_eq!(
        code(f.verifier.verify(key.expose_secret()).await),
        DenialCode::RevokedKey
    );
}

#[tokio::test]
async fn cached_records_are_refreshed_after_refresh_after() {
    let f = fixture(|b| b.refresh_after(Duration::from_secs(30)));
    let (key, mut record) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    record.status = KeyStatus::Disabled;
    f.store.inner.update(&record).await.unwrap();
    f.clock.advance(Duration::from_secs(29));
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        code(f.verifier.verify(key.expose_secret()).await),
        DenialCode::DisabledKey
    );
    assert_eq!(f.store.gets(), 2);
}

#[tokio::test]
async fn store_outage_serves_cached_keys_within_the_bound_and_fails_closed_otherwise() {
    let f = fixture(|b| {
        b.refresh_after(Duration::from_secs(30))
            .max_stale(Duration::from_secs(60))
    });
    let (cached, _) = f.issue(|_| {}).await;
    let (uncached, _) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(cached.expose_secret()).await.is_ok());
    f.store.set_down(true);

    assert_eq!(
        code(f.verifier.verify(uncached.expose_secret()).await),
        DenialCode::StoreUnavailable
    );
    f.clock.advance(Duration::from_secs(45));
    assert!(
        f.verifier.verify(cached.expose_secret()).await.is_ok(),
        "within the staleness bound"
    );
    f.clock.advance(Duration::from_secs(45));
    let denial = f.verifier.verify(cached.expose_secret()).await.unwrap_err();
    assert_eq!(denial.code(), DenialCode::StoreUnavailable);
    assert_eq!(denial.retry_after(), Some(Duration::from_secs(1)));

    // Recovers by itself.
    f.store.set_down(false);
    assert!(f.verifier.verify(cached.expose_secret()).await.is_ok());
    assert!(f.verifier.verify(uncached.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn a_stale_entry_is_refreshed_by_one_request_while_others_use_it() {
    let f = fixture(|b| b.refresh_after(Duration::from_secs(30)));
    let (key, _) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    f.clock.advance(Duration::from_secs(31));
    let first = f.verifier.lookup(key.expose_secret());
    assert!(
        matches!(first, Lookup::Pending(_)),
        "the first request refreshes"
    );
    for _ in 0..10 {
        assert!(matches!(
            f.verifier.lookup(key.expose_secret()),
            Lookup::Done(Ok(_))
        ));
    }
    let Lookup::Pending(p) = first else {
        unreachable!()
    };
    assert!(f.verifier.finish(p).await.is_ok());
    assert_eq!(f.store.gets(), 2);
}

#[tokio::test]
async fn a_record_under_another_id_is_not_accepted() {
    // A misbehaving store answering with another record must not authenticate.
    #[derive(Clone)]
    struct Liar(KeyRecord);
    #[async_trait]
    impl KeyStore for Liar {
        async fn get(&self, _: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
            Ok(Some(self.0.clone()))
        }
        async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
            Ok(())
        }
        async fn update(&self, _: &KeyRecord) -> Result<(), StoreError> {
            Ok(())
        }
        async fn list(&self, _: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
            Ok(vec![])
        }
    }
    let clock = ManualClock::at_2026();
    let (_, record) =
        KeyRecord::generate(&Prefix::default(), &KeyHasher::new(), "x", clock.now()).unwrap();
    let v = Verifier::builder(Liar(record)).clock(clock).build();
    let other = ApiKey::generate(&Prefix::default()).unwrap();
    assert_eq!(
        code(v.verify(other.expose_secret()).await),
        DenialCode::InvalidKey
    );
}

/// A store whose `list` reads its records, then waits for the test before answering: the
/// test changes a record in that gap, as another process would.
#[derive(Clone)]
struct SlowListStore {
    inner: MemoryStore,
    listed: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl KeyStore for SlowListStore {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update(record).await
    }
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let snapshot = self.inner.list(filter).await;
        self.listed.notify_one();
        self.release.notified().await;
        snapshot
    }
}

#[tokio::test]
async fn a_change_during_preload_is_not_lost() {
    let store = SlowListStore {
        inner: MemoryStore::new(),
        listed: Arc::new(tokio::sync::Notify::new()),
        release: Arc::new(tokio::sync::Notify::new()),
    };
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(store.clone())
        .clock(clock.clone())
        .build();
    let (key, mut record) =
        KeyRecord::generate(&Prefix::default(), verifier.hasher(), "t", clock.now()).unwrap();
    store.inner.insert(&record).await.unwrap();

    let loader = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.preload().await })
    };
    // The list has been read (the key still active in it); now the key is revoked and the
    // verifier told, before the preload stores what it read.
    store.listed.notified().await;
    record.status = KeyStatus::Revoked;
    store.inner.update(&record).await.unwrap();
    verifier.invalidate(&record.id);
    store.release.notify_one();
    assert_eq!(loader.await.unwrap().unwrap(), 1);

    assert_eq!(
        code(verifier.verify(key.expose_secret()).await),
        DenialCode::RevokedKey
    );
}

#[tokio::test]
async fn cached_principals_share_compiled_grants() {
    let f = fixture(|b| b);
    let edit = |r: &mut KeyRecord| {
        r.scopes = vec!["points:read".into(), "points:write".into()];
        r.resources = vec!["docs-*".into()];
        r.attributes.insert("tenant".into(), "acme".into());
    };
    let (a, _) = f.issue(edit).await;
    let (b, _) = f.issue(edit).await;
    let (c, _) = f
        .issue(|r| {
            edit(r);
            r.attributes.insert("tenant".into(), "globex".into());
        })
        .await;
    let pa = f.verifier.verify(a.expose_secret()).await.unwrap();
    let pb = f.verifier.verify(b.expose_secret()).await.unwrap();
    let pc = f.verifier.verify(c.expose_secret()).await.unwrap();
    assert!(std::ptr::eq(pa.granted(), pb.granted()));
    assert!(std::ptr::eq(pa.granted(), pc.granted()));
    assert!(std::ptr::eq(pa.attributes(), pb.attributes()));
    assert!(!std::ptr::eq(pa.attributes(), pc.attributes()));
    assert_eq!(pc.tenant(), Some("globex"));
    assert_eq!(pa.tenant(), Some("acme"));
    assert!(pa.can_access("docs-1") && !pa.can_access("other"));
    assert_eq!(pa.scopes(), ["points:read", "points:write"]);
    let attrs: Vec<_> = pc.attributes().iter().collect();
    assert_eq!(attrs, [("tenant", "globex")]);
}

#[tokio::test]
async fn a_corrupt_record_evicts_the_cached_key_and_is_refused_without_retry() {
    let f = fixture(|b| {
        b.refresh_after(Duration::from_secs(30))
            .max_stale(Duration::from_secs(300))
    });
    let (key, _) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    assert_eq!(f.verifier.cached(), 1);
    // The row goes bad; the cached copy is due for a refresh but well within max_stale.
    f.store.corrupt.store(true, Ordering::SeqCst);
    f.clock.advance(Duration::from_secs(31));
    let denial = f.verifier.verify(key.expose_secret()).await.unwrap_err();
    assert_eq!(denial.code(), DenialCode::CorruptKey);
    assert_eq!(denial.code().public(), DenialCode::InvalidKey);
    assert_eq!(denial.retry_after(), None);
    assert_eq!(f.verifier.cached(), 0, "the corrupt key is evicted");
    // Every later request is refused too (no stale copy comes back).
    let gets = f.store.gets();
    assert_eq!(
        code(f.verifier.verify(key.expose_secret()).await),
        DenialCode::CorruptKey
    );
    assert_eq!(f.store.gets(), gets + 1);
    // A repaired row works again.
    f.store.corrupt.store(false, Ordering::SeqCst);
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn refresh_of_a_corrupt_record_evicts_it() {
    let f = fixture(|b| b);
    let (key, record) = f.issue(|_| {}).await;
    assert!(f.verifier.verify(key.expose_secret()).await.is_ok());
    f.store.corrupt.store(true, Ordering::SeqCst);
    assert!(matches!(
        f.verifier.refresh(&record.id).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(f.verifier.cached(), 0);
    assert_eq!(
        code(f.verifier.verify(key.expose_secret()).await),
        DenialCode::CorruptKey
    );
}

/// A fixture whose store holds every read until the test adds permits to the gate.
fn gated() -> (Fixture, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let store = CountingStore {
        gate: Some(gate.clone()),
        ..CountingStore::default()
    };
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(store.clone())
        .clock(clock.clone())
        .build();
    (
        Fixture {
            store,
            clock,
            verifier,
        },
        gate,
    )
}

/// How many requests wait on the store read of `id` under way.
fn waiting(v: &Verifier, id: &KeyId) -> usize {
    v.shared.inflight.get(id).map_or(0, |f| f.receiver_count())
}

/// Polls `check` (yielding to the runtime) until it holds; fails after 10 s.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_one_key_share_one_store_read() {
    let (f, gate) = gated();
    let (key, record) = f.issue(|_| {}).await;
    let other = ApiKey::generate(&Prefix::default()).unwrap();
    let forged = forge(&record.id, other.parsed().secret());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let v = f.verifier.clone();
            // Every eighth request presents a wrong secret for the same id.
            let text = if i % 8 == 7 {
                forged.clone()
            } else {
                key.expose_secret().to_owned()
            };
            tokio::spawn(async move { v.verify(&text).await.map(|p| p.key_id()) })
        })
        .collect();
    // One read is under way and the 63 others wait for it.
    until("63 requests waiting on one read", || {
        waiting(&f.verifier, &record.id) == 63
    })
    .await;
    assert_eq!(f.store.gets(), 1);
    gate.add_permits(1);
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        if i % 8 == 7 {
            assert_eq!(r.unwrap_err().code(), DenialCode::InvalidKey, "{i}");
        } else {
            assert_eq!(r.unwrap(), record.id, "{i}");
        }
    }
    assert_eq!(f.store.gets(), 1, "exactly one store read");
    assert!(f.verifier.shared.inflight.is_empty());
    // The cached hot path needs no read at all.
    assert!(matches!(
        f.verifier.lookup(key.expose_secret()),
        Lookup::Done(Ok(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reader_hands_the_read_to_a_waiter() {
    let (f, gate) = gated();
    let (key, record) = f.issue(|_| {}).await;
    let v = f.verifier.clone();
    let text = key.expose_secret().to_owned();
    let leader = tokio::spawn(async move { v.verify(&text).await.is_ok() });
    until("the first read to start", || f.store.gets() == 1).await;
    let v = f.verifier.clone();
    let text = key.expose_secret().to_owned();
    let waiter = tokio::spawn(async move { v.verify(&text).await.map(|p| p.key_id()) });
    until("a waiter", || waiting(&f.verifier, &record.id) == 1).await;
    // The reader goes away mid-read: the waiter reads for itself.
    leader.abort();
    until("the waiter's own read", || f.store.gets() == 2).await;
    gate.add_permits(1);
    assert_eq!(waiter.await.unwrap().unwrap(), record.id);
    assert!(f.verifier.shared.inflight.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_during_a_read_is_not_answered_by_it() {
    let (f, gate) = gated();
    let (key, mut record) = f.issue(|_| {}).await;
    let v = f.verifier.clone();
    let text = key.expose_secret().to_owned();
    let early = tokio::spawn(async move { v.verify(&text).await.is_ok() });
    until("the first read to start", || f.store.gets() == 1).await;
    // Revoked while that read is under way (it may have read the old record).
    record.status = KeyStatus::Revoked;
    f.store.inner.update(&record).await.unwrap();
    f.verifier.invalidate(&record.id);
    let v = f.verifier.clone();
    let text = key.expose_secret().to_owned();
    let late = tokio::spawn(async move { v.verify(&text).await.map_err(|d| d.code()) });
    until("a second read", || f.store.gets() == 2).await;
    gate.add_permits(2);
    early.await.unwrap();
    assert_eq!(late.await.unwrap().unwrap_err(), DenialCode::RevokedKey);
}

#[tokio::test]
async fn last_use_is_marked_in_memory_and_written_by_the_flush_only() {
    let f = fixture(|b| b);
    let (key, record) = f.issue(|_| {}).await;
    let (unused, unused_record) = f.issue(|_| {}).await;
    let _ = unused;
    // 2026-01-01T00:00:00Z plus 90 s: the minute starting at 00:01:00.
    f.clock.advance(Duration::from_secs(90));
    for _ in 0..100 {
        f.verifier.verify(key.expose_secret()).await.unwrap();
    }
    // A refused secret for the same id marks nothing.
    let wrong = crate::ApiKey::generate(&Prefix::default()).unwrap();
    let _ = f.verifier.verify(wrong.expose_secret()).await;
    assert_eq!(
        f.store.last_used_writes.load(Ordering::SeqCst),
        0,
        "no write per request"
    );
    assert_eq!(
        f.store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        None
    );

    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 1);
    assert_eq!(f.store.last_used_writes.load(Ordering::SeqCst), 1);
    let minute = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 60);
    let stored = f.store.inner.get(&record.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(minute));
    assert_eq!(
        stored.info().last_used_at.as_deref(),
        Some("2026-01-01T00:01:00.000Z")
    );
    let never = f.store.inner.get(&unused_record.id).await.unwrap().unwrap();
    assert_eq!(never.last_used_at, None);
    assert!(serde_json::to_value(never.info())
        .unwrap()
        .get("last_used_at")
        .is_none());

    // Nothing new: the store is not called.
    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 0);
    // More uses in the same minute: still nothing to write.
    f.clock.advance(Duration::from_secs(20));
    f.verifier.verify(key.expose_secret()).await.unwrap();
    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 0);
    assert_eq!(f.store.last_used_writes.load(Ordering::SeqCst), 1);

    // The next minute: written once more.
    f.clock.advance(Duration::from_secs(60));
    f.verifier.verify(key.expose_secret()).await.unwrap();
    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 1);
    let stored = f.store.inner.get(&record.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(minute + Duration::from_secs(60)));
}

#[tokio::test]
async fn last_use_marks_survive_invalidation_refresh_and_a_failed_flush() {
    let f = fixture(|b| b);
    let (key, record) = f.issue(|_| {}).await;
    f.verifier.verify(key.expose_secret()).await.unwrap();
    // The entry is dropped before the flush: the mark is kept for it.
    f.verifier.invalidate(&record.id);
    assert_eq!(f.verifier.cached(), 0);
    // The store is down: the flush fails and keeps the mark.
    f.store.set_down(true);
    assert!(f.verifier.flush_last_used().await.is_err());
    f.store.set_down(false);
    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 1);
    assert_eq!(
        f.store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    );

    // A use, then the entry is read again (a refresh replaces it): the mark goes along.
    f.clock.advance(Duration::from_secs(120));
    f.verifier.verify(key.expose_secret()).await.unwrap();
    f.verifier.refresh(&record.id).await.unwrap();
    assert_eq!(f.verifier.flush_last_used().await.unwrap(), 1);
    assert_eq!(
        f.store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 120))
    );
    // An older time never moves it back.
    f.store
        .inner
        .record_last_used(&[(record.id, SystemTime::UNIX_EPOCH)])
        .await
        .unwrap();
    assert_eq!(
        f.store
            .inner
            .get(&record.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 120))
    );
    // An update of the record (read before the flush) leaves it alone.
    let mut stale = record.clone();
    stale.name = "renamed".into();
    f.store.inner.update(&stale).await.unwrap();
    let after = f.store.inner.get(&record.id).await.unwrap().unwrap();
    assert_eq!(after.name, "renamed");
    assert!(after.last_used_at.is_some());
}

#[tokio::test]
async fn stats_count_hits_misses_negative_hits_and_store_errors() {
    let f = fixture(|b| b);
    let (key, record) = f.issue(|_| {}).await;
    f.verifier.verify(key.expose_secret()).await.unwrap(); // miss
    for _ in 0..4 {
        f.verifier.verify(key.expose_secret()).await.unwrap(); // hits
    }
    let unknown = crate::ApiKey::generate(&Prefix::default()).unwrap();
    let _ = f.verifier.verify(unknown.expose_secret()).await; // miss, then unknown
    let _ = f.verifier.verify(unknown.expose_secret()).await; // negative hit
    let _ = f.verifier.verify("kg_not-a-key").await; // malformed: none of them
    f.verifier.invalidate(&record.id);
    f.store.set_down(true);
    let _ = f.verifier.verify(key.expose_secret()).await; // miss, store error
    let stats = f.verifier.stats();
    assert_eq!(
        stats,
        VerifierStats {
            hits: 4,
            misses: 3,
            negative_hits: 1,
            store_errors: 1,
        }
    );
    // Clones share the counts.
    assert_eq!(f.verifier.clone().stats(), stats);
}
