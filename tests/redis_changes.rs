//! Whoever can publish on the key-change channel (`{prefix}:changes`): forged messages
//! neither make replicas drop their caches more often than the resync interval allows, nor
//! hide a real change whose message was lost, and with a signing key they are ignored.
//! Against the real Redis (`KEYGATE_TEST_REDIS_URL`, a key prefix per test).

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use common::{send, with_key};
use http::StatusCode;
use keygate::redis::redis::{self, aio::MultiplexedConnection};
use keygate::redis::ChangeKey;
use keygate::{
    ApiKey, Clock, KeyId, KeyRecord, KeyStatus, KeyStore, ManualClock, MemoryStore, Prefix,
};
use redis_support::*;

async fn issue(store: &MemoryStore, clock: &ManualClock) -> (ApiKey, KeyRecord) {
    let (key, record) = KeyRecord::generate(
        &Prefix::default(),
        &keygate::KeyHasher::new(),
        "changes",
        clock.now(),
    )
    .unwrap();
    store.insert(&record).await.unwrap();
    (key, record)
}

async fn conn(t: &TestRedis) -> MultiplexedConnection {
    t.redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Publishes `message` on the prefix's change channel, as anyone allowed to could.
async fn forge(c: &mut MultiplexedConnection, t: &TestRedis, message: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{}:changes", t.prefix))
        .arg(message)
        .query_async(c)
        .await
        .unwrap();
}

/// Logs a change of `id` the way a publisher does, but without publishing its message
/// (a message lost on the way). Returns its sequence number.
async fn log_without_message(c: &mut MultiplexedConnection, t: &TestRedis, id: &KeyId) -> u64 {
    let p = &t.prefix;
    let seq: u64 = redis::cmd("INCR")
        .arg(format!("{p}:changes:seq"))
        .query_async(c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{p}:changes:log"))
        .arg(seq)
        .arg(format!("{seq} {id}"))
        .query_async(c)
        .await
        .unwrap();
    seq
}

async fn until_refused(addr: std::net::SocketAddr, key: &ApiKey, limit: Duration) -> Duration {
    poll_until(limit, "the key is refused", || async {
        (send(addr, "/", with_key(key)).await.0 == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await
    .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_message_flood_drops_no_cache_and_checks_at_the_allowed_rate() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
    spec.resync_every = Duration::from_millis(100);
    spec.resync_interval = Duration::from_millis(200);
    let replica = spec.spawn().await;
    replica.watcher.subscribed().await;
    let mut keys = vec![];
    for _ in 0..5 {
        let (key, _) = issue(&store, &clock).await;
        assert_eq!(
            send(replica.addr, "/", with_key(&key)).await.0,
            StatusCode::OK
        );
        keys.push(key);
    }
    let verifier = replica.gate.verifier();
    assert_eq!(verifier.cached(), 5);
    let checks_before = replica.watcher.checks();

    // Alternating sequence numbers, each of which the old watcher answered with a drop.
    let mut c = conn(&t).await;
    let nobody = KeyId::generate().unwrap();
    let start = Instant::now();
    for i in 0..2000u64 {
        let seq = if i % 2 == 0 { 1_000_000 + i } else { 1 };
        forge(&mut c, &t, &format!("{seq} {nobody}")).await;
    }
    let flood = start.elapsed();
    // Every forged message was delivered and handled.
    poll_until(Duration::from_secs(10), "the flood is handled", || async {
        (replica.watcher.messages() >= 2000).then_some(())
    })
    .await;
    let took = start.elapsed();
    let checks = replica.watcher.checks() - checks_before;
    // Periodic checks (every 100 ms) plus at most one extra per 200 ms.
    let allowed = took.as_millis() as u64 / 100 + took.as_millis() as u64 / 200 + 3;
    println!(
        "2000 forged messages in {flood:?} (handled in {took:?}): {} cache drops, {checks} checks (at most {allowed})",
        replica.watcher.resyncs()
    );
    assert_eq!(replica.watcher.resyncs(), 0);
    assert!(checks <= allowed, "{checks} > {allowed}");
    assert_eq!(verifier.cached(), 5, "no key was evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_drops_stay_within_the_resync_interval_even_when_redis_keeps_losing_state() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
    spec.resync_every = Duration::from_millis(10);
    spec.resync_interval = Duration::from_millis(250);
    let replica = spec.spawn().await;
    replica.watcher.subscribed().await;
    let writer = spec.spawn().await;
    let (key, mut record) = issue(&store, &clock).await;
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );
    // Someone who can delete keys wipes the prefix again and again (each wipe starts a new
    // epoch: a real reason to drop), while changes keep coming.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        t.redis.delete_all().await.unwrap();
        writer
            .gate
            .verifier()
            .store()
            .update(&record)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    record.status = KeyStatus::Revoked;
    store.update(&record).await.unwrap();
    t.redis.delete_all().await.unwrap();
    let busy = start.elapsed();
    // The last wipe is still acted on (coalesced), so the revocation takes hold.
    until_refused(replica.addr, &key, Duration::from_secs(5)).await;
    let total = start.elapsed();
    let drops = replica.watcher.resyncs();
    let allowed = total.as_millis() as u64 / 250 + 1;
    println!("prefix wiped every ~5 ms for {busy:?}: {drops} cache drops in {total:?} (at most {allowed})");
    assert!(drops >= 2, "{drops}");
    assert!(drops <= allowed, "{drops} > {allowed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_message_cannot_hide_a_lost_real_change() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
    spec.resync_every = Duration::from_millis(100);
    let replica = spec.spawn().await;
    replica.watcher.subscribed().await;
    let (key, mut record) = issue(&store, &clock).await;
    let (other, _) = issue(&store, &clock).await;
    for k in [&key, &other] {
        assert_eq!(send(replica.addr, "/", with_key(k)).await.0, StatusCode::OK);
    }
    let checks = replica.watcher.checks();
    poll_until(Duration::from_secs(5), "a baseline check", || async {
        (replica.watcher.checks() > checks).then_some(())
    })
    .await;

    // The key is revoked; its change is logged but its message lost...
    record.status = KeyStatus::Revoked;
    store.update(&record).await.unwrap();
    let mut c = conn(&t).await;
    let seq = log_without_message(&mut c, &t, &record.id).await;
    // ...and a forged message takes its number, naming another key.
    forge(&mut c, &t, &format!("{seq} {}", KeyId::generate().unwrap())).await;
    let took = until_refused(replica.addr, &key, Duration::from_secs(3)).await;
    println!("lost revocation applied {took:?} after a forged message took its number (checks every 100 ms)");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(replica.watcher.resyncs(), 0, "applied key by key");
    assert!(replica.watcher.healed() >= 1);
    assert_eq!(
        send(replica.addr, "/", with_key(&other)).await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_signing_key_forged_messages_are_ignored() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let signing = ChangeKey::from_bytes(*b"0123456789abcdef0123456789abcdef");
    let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
    spec.signing_key = Some(signing.clone());
    let replicas = [spec.spawn().await, spec.spawn().await];
    for r in &replicas {
        r.watcher.subscribed().await;
    }
    // An eavesdropper on the channel, to tamper with a genuine message.
    let mut spy = t.redis.client().get_async_pubsub().await.unwrap();
    spy.subscribe(format!("{}:changes", t.prefix))
        .await
        .unwrap();
    let issued = replicas[0]
        .manager
        .issue("test", keygate::KeySpec::new("signed"))
        .await
        .unwrap();
    let (kept, _) = issue(&store, &clock).await;
    for r in &replicas {
        for k in [&issued.key, &kept] {
            assert_eq!(send(r.addr, "/", with_key(k)).await.0, StatusCode::OK);
        }
    }
    let cached = replicas[1].gate.verifier().cached();
    assert_eq!(cached, 2);

    let genuine: String = {
        use futures_util::StreamExt;
        let msg = spy.on_message().next().await.unwrap();
        msg.get_payload().unwrap()
    };
    let parts: Vec<&str> = genuine.split(' ').collect();
    assert_eq!(parts.len(), 3, "signed: {genuine}");
    assert_eq!(parts[1], issued.key.id().as_str());

    // Unsigned, a bad signature, and the genuine signature over another key's line.
    let mut c = conn(&t).await;
    let id = kept.id();
    let forged = [
        format!("{} {id}", parts[0]),
        format!("{} {id} {}", parts[0], "0".repeat(64)),
        format!("{} {id} {}", parts[0], parts[2]),
    ];
    for m in &forged {
        forge(&mut c, &t, m).await;
    }
    poll_until(
        Duration::from_secs(5),
        "the forged messages arrive",
        || async { (replicas[1].watcher.rejected() >= forged.len() as u64).then_some(()) },
    )
    .await;
    assert_eq!(replicas[1].watcher.rejected(), forged.len() as u64);
    assert_eq!(replicas[1].gate.verifier().cached(), 2, "nothing evicted");

    // A real (signed) revocation still goes through as a message.
    let messages = replicas[1].watcher.messages();
    replicas[0]
        .manager
        .revoke("test", issued.key.id())
        .await
        .unwrap();
    let took = until_refused(replicas[1].addr, &issued.key, Duration::from_secs(2)).await;
    println!("signed revocation reached the other replica in {took:?}");
    assert!(replicas[1].watcher.messages() > messages);
    assert_eq!(replicas[1].watcher.resyncs(), 0);
    assert_eq!(
        send(replicas[1].addr, "/", with_key(&kept)).await.0,
        StatusCode::OK
    );
}
