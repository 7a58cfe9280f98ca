//! Strict quota counting in Redis when an answer is lost (`KEYGATE_TEST_REDIS_URL`, a key
//! prefix per test): a check-and-add that ran in Redis but whose answer never came back is
//! taken back once Redis answers again, and one that never ran is cancelled; either way
//! the count equals the requests admitted.
//!
//! The connection is cut at a chosen point by a proxy in this file: it forwards the
//! client's bytes, and when told to, closes both sockets as soon as Redis answers (the
//! call ran, its answer is lost) or as soon as the client sends (the call never ran).

mod common;
mod redis_support;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate::core::usage::{utc, Admission, Limit, UsageError, UsageStore, Window};
use keygate::redis::{Redis, RedisUsageStore};
use keygate::{KeyId, QuotaWindow};
use redis_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forward everything.
const PASS: u8 = 0;
/// Close the connection when Redis answers (the answer is dropped), then lose requests.
const LOSE_ANSWER: u8 = 1;
/// Close the connection when the client sends (the request is dropped).
const LOSE_REQUEST: u8 = 2;
/// Hold Redis's answers back (forwarded once the mode changes).
const HOLD: u8 = 3;

/// A proxy in front of Redis that can lose one side of a call.
struct Cutter {
    addr: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
}

impl Cutter {
    async fn start(target: std::net::SocketAddr) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(PASS));
        let shared = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = {
                        let mode = mode.clone();
                        async move {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = cr.read(&mut buf).await.unwrap_or(0);
                                if n == 0 || mode.load(Ordering::SeqCst) == LOSE_REQUEST {
                                    return;
                                }
                                if sw.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            // One answer is lost; then requests are, until told to pass
                            // (so that nothing else runs before the test has looked).
                            let lose = mode
                                .compare_exchange(
                                    LOSE_ANSWER,
                                    LOSE_REQUEST,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                )
                                .is_ok();
                            if n == 0 || lose {
                                return;
                            }
                            while mode.load(Ordering::SeqCst) == HOLD {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Whichever side stops first closes both sockets.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Cutter { addr, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn store_through(t: &TestRedis, cutter: &Cutter) -> RedisUsageStore {
    let redis = Redis::open_with(
        &with_addr(&t.url, cutter.addr),
        t.options().timeout(Duration::from_secs(2)),
    )
    .await
    .expect("open through the cutter");
    RedisUsageStore::new(&redis)
}

fn day() -> Window {
    Window::containing(QuotaWindow::Day, utc(2026, 5, 1, 10, 30, 0))
}

const LIMIT: [Limit; 1] = [Limit {
    window: 0,
    limit: 10,
}];

async fn requests(store: &RedisUsageStore, key: &KeyId) -> u64 {
    store.load(key, &[day()]).await.unwrap()[0].requests
}

async fn settled(store: &RedisUsageStore) {
    poll_until(
        Duration::from_secs(10),
        "the lost call is settled",
        || async { (store.unsettled() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_answer_was_lost_is_taken_back() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let store = store_through(&t, &cutter).await;
    let key = KeyId::parse("LostAnswer01").unwrap();
    // Two admitted the normal way.
    for _ in 0..2 {
        let a = store
            .check_and_add(&key, &[day()], &LIMIT, 1)
            .await
            .unwrap();
        assert!(matches!(a, Admission::Admitted(_)));
    }
    // The third runs in Redis, and the connection dies with its answer.
    cutter.set(LOSE_ANSWER);
    let lost = store.check_and_add(&key, &[day()], &LIMIT, 1).await;
    assert!(matches!(lost, Err(UsageError::Unavailable(_))), "{lost:?}");
    // Redis counted it (read on a connection of the test's own).
    let direct = RedisUsageStore::new(&t.redis);
    assert_eq!(
        requests(&direct, &key).await,
        3,
        "the lost call ran in Redis"
    );
    assert_eq!(store.unsettled(), 1);
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(store.settled(), (1, 0), "taken back, not cancelled");
    assert_eq!(
        requests(&direct, &key).await,
        2,
        "the count equals the requests admitted"
    );
    // Later calls count as before, and the settled call is not taken back twice.
    let a = store
        .check_and_add(&key, &[day()], &LIMIT, 1)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted(_)));
    assert_eq!(requests(&direct, &key).await, 3);
    assert_eq!(store.settled(), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_ran_is_cancelled_and_counts_nothing() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let store = store_through(&t, &cutter).await;
    let key = KeyId::parse("LostRequest1").unwrap();
    let a = store
        .check_and_add(&key, &[day()], &LIMIT, 1)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted(_)));
    cutter.set(LOSE_REQUEST);
    let lost = store.check_and_add(&key, &[day()], &LIMIT, 1).await;
    assert!(matches!(lost, Err(UsageError::Unavailable(_))), "{lost:?}");
    assert_eq!(store.unsettled(), 1);
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(store.settled(), (0, 1), "cancelled: it had not run");
    let direct = RedisUsageStore::new(&t.redis);
    assert_eq!(requests(&direct, &key).await, 1);
    // Nothing of the lost call's bookkeeping lingers beyond the store's two hashes.
    let a = store
        .check_and_add(&key, &[day()], &LIMIT, 1)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted(_)));
    assert_eq!(requests(&direct, &key).await, 2);
}

/// A check-and-add whose future is dropped while its answer is on the way (the request went
/// no further) is settled like a lost answer: its count is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_dropped_in_flight_is_taken_back() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let store = store_through(&t, &cutter).await;
    let direct = RedisUsageStore::new(&t.redis);
    let key = KeyId::parse("DroppedCall1").unwrap();
    let a = store
        .check_and_add(&key, &[day()], &LIMIT, 1)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted(_)));
    cutter.set(HOLD);
    let call = {
        let store = store.clone();
        tokio::spawn(async move { store.check_and_add(&key, &[day()], &LIMIT, 1).await })
    };
    // Redis has run it; its answer is held back.
    poll_until(Duration::from_secs(10), "the call ran in Redis", || async {
        (requests(&direct, &key).await == 2).then_some(())
    })
    .await;
    assert_eq!(store.unsettled(), 0);
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(store.unsettled(), 1, "the dropped call is to be settled");
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(store.settled(), (1, 0), "taken back");
    assert_eq!(requests(&direct, &key).await, 1);
}

/// A refund (`subtract`) whose answer, or whose request, was lost is sent again once Redis
/// answers, and applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_did_not_get_through_is_applied_once() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let store = store_through(&t, &cutter).await;
    let direct = RedisUsageStore::new(&t.redis);
    let key = KeyId::parse("LostRefund01").unwrap();
    for _ in 0..4 {
        let a = store
            .check_and_add(&key, &[day()], &LIMIT, 1)
            .await
            .unwrap();
        assert!(matches!(a, Admission::Admitted(_)));
    }
    let one = [keygate::core::usage::Increment {
        key,
        window: day(),
        usage: keygate::core::usage::Usage {
            cost: 1,
            requests: 1,
        },
    }];
    // Applied in Redis, its answer lost: queued, and not applied a second time.
    cutter.set(LOSE_ANSWER);
    store
        .subtract(&one)
        .await
        .expect("a refund is queued, not failed");
    assert_eq!(requests(&direct, &key).await, 3, "the refund ran in Redis");
    assert_eq!(store.unsettled(), 1);
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(requests(&direct, &key).await, 3, "applied once");

    // Never sent: queued, then applied when Redis answers again.
    cutter.set(LOSE_REQUEST);
    store
        .subtract(&one)
        .await
        .expect("a refund is queued, not failed");
    assert_eq!(requests(&direct, &key).await, 3, "the refund has not run");
    assert_eq!(store.unsettled(), 1);
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(requests(&direct, &key).await, 2, "applied once");
    // A refund that gets through is applied at once.
    store.subtract(&one).await.unwrap();
    assert_eq!(requests(&direct, &key).await, 1);
    assert_eq!(store.unsettled(), 0);
}

/// A refund queued while Redis was unreachable reaches the durable copy only once Redis has
/// applied it: a window re-seeded from the durable copy in between (Redis lost it) is not
/// given back twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_refund_is_not_given_back_twice_after_a_reseed() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let durable = keygate::core::usage::MemoryUsageStore::new();
    let store = store_through(&t, &cutter).await.durable(durable.clone());
    // Another replica, on a connection of its own, with the same durable copy.
    let other = RedisUsageStore::new(&t.redis).durable(durable.clone());
    let key = KeyId::parse("ReseedRefund").unwrap();
    for _ in 0..3 {
        let a = store
            .check_and_add(&key, &[day()], &LIMIT, 1)
            .await
            .unwrap();
        assert!(matches!(a, Admission::Admitted(_)));
    }
    // One of the three is refunded while Redis is unreachable: queued.
    cutter.set(LOSE_REQUEST);
    let one = [keygate::core::usage::Increment {
        key,
        window: day(),
        usage: keygate::core::usage::Usage {
            cost: 1,
            requests: 1,
        },
    }];
    store.subtract(&one).await.expect("queued");
    assert_eq!(store.unsettled(), 1);
    assert_eq!(
        durable.load(&key, &[day()]).await.unwrap()[0].requests,
        3,
        "the durable copy waits for Redis"
    );
    // Redis loses the window; the other replica's next admission re-seeds it from the
    // durable copy.
    let window = format!("{}:q:{{{key}}}:day:{}", t.prefix, day().start_secs());
    let mut c = t
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = keygate::redis::redis::cmd("DEL")
        .arg(&window)
        .query_async(&mut c)
        .await
        .unwrap();
    let a = other
        .check_and_add(&key, &[day()], &LIMIT, 1)
        .await
        .unwrap();
    assert!(matches!(a, Admission::Admitted(_)));
    // The refund is applied once, in both.
    cutter.set(PASS);
    settled(&store).await;
    assert_eq!(
        requests(&other, &key).await,
        3,
        "3 served, 1 given back, 1 more"
    );
    assert_eq!(durable.load(&key, &[day()]).await.unwrap()[0].requests, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_report_whose_answer_was_lost_is_counted_once() {
    use keygate::redis::{LeaseOptions, TimeSource};
    use keygate::ManualClock;
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let cutter = Cutter::start(t.addr()).await;
    let clock = ManualClock::at_2026();
    let redis = Redis::open_with(
        &with_addr(&t.url, cutter.addr),
        t.options()
            .timeout(Duration::from_secs(2))
            .retry_after(Duration::from_millis(20)),
    )
    .await
    .expect("open through the cutter");
    let store = RedisUsageStore::new(&redis)
        .time_source(TimeSource::Clock(Arc::new(clock.clone())))
        .leased(LeaseOptions::for_quotas());
    let key = KeyId::parse("LostReport01").unwrap();
    let day = Window::containing(QuotaWindow::Day, keygate::Clock::now(&clock));
    let limits = [Limit {
        window: 0,
        limit: 10_000,
    }];
    for _ in 0..25 {
        let a = store.check_and_add(&key, &[day], &limits, 1).await.unwrap();
        assert!(matches!(a, Admission::Admitted(_)), "{a:?}");
    }
    assert!(store.decided_locally() > 0, "served from leases");
    // The report of what the lease served runs in Redis; its answer is lost, so the store
    // keeps the report and sends it again.
    cutter.set(LOSE_ANSWER);
    store.release_leases().await;
    let direct = RedisUsageStore::new(&t.redis);
    let ran = direct.lease_counts(&key, &[day]).await.unwrap()[0];
    assert_eq!(ran.used, 25, "the report ran: {ran:?}");
    cutter.set(PASS);
    // Sent again until an answer arrives (the first tries may meet the closed connection).
    poll_until(
        Duration::from_secs(10),
        "the report is answered",
        || async {
            store.release_leases().await;
            (store.leases_held() == 0).then_some(())
        },
    )
    .await;
    let after = direct.lease_counts(&key, &[day]).await.unwrap()[0];
    assert_eq!(
        (after.used, after.reserved, after.lost),
        (25, 0, 0),
        "counted once: {after:?}"
    );
}
