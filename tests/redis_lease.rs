//! Leased allowances on the real Redis (`KEYGATE_TEST_REDIS_URL`, a key prefix per test):
//! three replicas spending leases of one key never overshoot its limit and get close to it
//! (the documented under-use bound), quota leases count exactly what was served, a crashed
//! replica's lease is freed and reported as lost, changes bite within the documented bound,
//! and policies kept precise still make one script per request.

mod common;
mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use common::{send, with_key};
use http::StatusCode;
use keygate::core::rate::{RateBackend, RateSubject};
use keygate::core::usage::{Admission, Increment, Limit, Usage, UsageStore, Window};
use keygate::redis::{LeaseOptions, RedisRateLimiter, RedisUsageStore, TimeSource};
use keygate::{Clock, KeyId, ManualClock, MemoryStore, QuotaPolicy, QuotaWindow, RateLimitPolicy};
use redis_support::*;

fn replica_spec(t: &TestRedis, store: MemoryStore, clock: ManualClock) -> ReplicaSpec {
    let mut spec = ReplicaSpec::new(t, store, clock);
    spec.options = t.options().timeout(Duration::from_secs(2));
    spec.rate_leases = Some(LeaseOptions::new());
    spec.quota_leases = Some(LeaseOptions::for_quotas());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_rate_limits_never_overshoot_across_three_replicas_and_come_close() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replicas = three(&replica_spec(&t, store.clone(), clock.clone())).await;
    let n: u32 = 300;
    let (key, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("per-minute", n)]
    })
    .await;
    // The clock stands still: nothing refills, leases do not expire. A lease is at most
    // min(n / 10, n / (2 · replicas)) = 30 units, so what other replicas hold unspent when
    // one is refused is at most 3 · 30.
    let cap = 30usize;
    let statuses = load(&replicas, &key, 150).await;
    let ok = count(&statuses, StatusCode::OK);
    let limited = count(&statuses, StatusCode::TOO_MANY_REQUESTS);
    let local: u64 = replicas.iter().map(|r| r.limiter.decided_locally()).sum();
    let trips: u64 = replicas.iter().map(|r| r.limiter.round_trips()).sum();
    println!(
        "leased rate limit {n}/min, 450 concurrent requests over 3 replicas: {ok} allowed, \
         {limited} limited; {local} decided from leases, {trips} round trips"
    );
    assert_eq!(ok + limited, 450);
    assert!(ok <= n as usize, "overshoot: {ok} > {n}");
    assert!(
        ok >= n as usize - 3 * cap,
        "under-use beyond the bound: {ok}"
    );
    assert!(local > 0 && trips < 450, "leases saved no round trip");

    // The leases expire (lifetime 1 s; the clock moves 1.5 s, 7.5 units refill): their
    // unspent units go back to Redis. Then one replica alone drains the key: it reaches the
    // limit (plus the refill) exactly, never more.
    clock.advance(Duration::from_millis(1500));
    for r in &replicas {
        r.limiter.release_expired().await;
        assert_eq!(r.limiter.leases_held(), 0);
    }
    let mut more = 0;
    for _ in 0..150 {
        let (status, _, _) = send(replicas[0].addr, "/", with_key(&key)).await;
        more += usize::from(status == StatusCode::OK);
    }
    let total = ok + more;
    println!(
        "after the leases came back: {more} more allowed, {total} in all (limit {n}, 7 refilled)"
    );
    assert_eq!(total, n as usize + 7, "every unit reached, none beyond");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_quotas_count_exactly_what_was_served() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replicas = three(&replica_spec(&t, store.clone(), clock.clone())).await;
    let n: u64 = 2000;
    let (key, record) = issue(&store, &clock, |r| {
        r.quotas = vec![QuotaPolicy::new("daily", n, QuotaWindow::Day)]
    })
    .await;
    let statuses = load(&replicas, &key, 800).await;
    let ok = count(&statuses, StatusCode::OK);
    let refused = count(&statuses, StatusCode::TOO_MANY_REQUESTS);
    let local: u64 = replicas.iter().map(|r| r.usage.decided_locally()).sum();
    println!("leased quota {n}/day, 2400 concurrent requests over 3 replicas: {ok} allowed, {refused} refused, {local} from leases");
    assert_eq!(ok + refused, 2400);
    assert!(ok as u64 <= n, "overshoot: {ok}");
    // A quota lease is at most n / 100 = 20.
    assert!(ok as u64 >= n - 3 * 20, "under-use beyond the bound: {ok}");
    assert!(local > 0);
    // Every replica reports its lease (a graceful shutdown): used is what was served.
    for r in &replicas {
        r.usage.release_leases().await;
        assert_eq!(r.usage.leases_held(), 0);
    }
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let counts = replicas[0]
        .usage
        .lease_counts(&record.lineage_id(), &[day])
        .await
        .unwrap();
    println!("after the reports: {:?}", counts[0]);
    assert_eq!(
        counts[0].used, ok as u64,
        "used must be exactly what was served"
    );
    assert_eq!(counts[0].reserved, 0);
    assert_eq!(counts[0].lost, 0);
    let usage = replicas[0]
        .usage
        .load(&record.lineage_id(), &[day])
        .await
        .unwrap();
    assert_eq!(usage[0].requests, ok as u64);
}

fn leased_store(
    t: &TestRedis,
    redis: &keygate::redis::Redis,
    clock: &ManualClock,
) -> RedisUsageStore {
    let _ = t;
    RedisUsageStore::new(redis)
        .time_source(TimeSource::Clock(Arc::new(clock.clone())))
        .leased(LeaseOptions::for_quotas())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replicas_lease_is_freed_after_expiry_and_reported_as_lost() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let limits = [Limit {
        window: 0,
        limit: 10_000,
    }];
    let admit = |a: Admission| assert!(matches!(a, Admission::Admitted(_)), "{a:?}");
    // Replica A serves 10 and reports (a lease of 4, then a bigger one, cap 100): then it
    // serves 5 more from its lease and crashes without reporting.
    let a = leased_store(&t, &t.redis, &clock);
    for _ in 0..10 {
        admit(a.check_and_add(&key, &[day], &limits, 1).await.unwrap());
    }
    let before = a.lease_counts(&key, &[day]).await.unwrap()[0];
    println!("replica A, 10 served: {before:?}");
    assert_eq!(before.used, 4);
    let held = before.reserved;
    assert!(held > 0);
    for _ in 0..5 {
        admit(a.check_and_add(&key, &[day], &limits, 1).await.unwrap());
    }
    assert!(a.decided_locally() >= 10);
    drop(a);
    // Replica B: while A's lease lives in Redis it stays reserved; once past its Redis
    // expiry (3 lifetimes + 2 s) B's next call frees it and counts it lost, never used.
    let b = leased_store(&t, &t.redis, &clock);
    admit(b.check_and_add(&key, &[day], &limits, 1).await.unwrap());
    let mid = b.lease_counts(&key, &[day]).await.unwrap()[0];
    assert!(mid.reserved >= held, "{mid:?}");
    assert_eq!(mid.lost, 0);
    clock.advance(Duration::from_secs(6));
    b.release_expired().await;
    admit(b.check_and_add(&key, &[day], &limits, 1).await.unwrap());
    b.release_leases().await;
    let after = b.lease_counts(&key, &[day]).await.unwrap()[0];
    println!("after A's lease expired and B reported: {after:?}");
    // Used: A's reported 4, B's 2. Lost: A's whole outstanding lease (its unspent units and
    // the 6 it served without reporting: A served 15 in all).
    assert_eq!(after.used, 4 + 2);
    assert_eq!(after.lost, held);
    assert_eq!(after.reserved, 0);
    assert!(
        after.used + after.lost >= 15 + 2,
        "served requests vanished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_bite_within_the_documented_bound() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    let limiter = RedisRateLimiter::new(&t.redis)
        .time_source(TimeSource::Clock(Arc::new(clock.clone())))
        .leased(LeaseOptions::new());
    let subject = RateSubject::Key(KeyId::parse("AbCdEfGhIjKl").unwrap());
    let decide = |policies: Vec<RateLimitPolicy>| {
        let limiter = limiter.clone();
        async move {
            match limiter.try_local(subject, &policies, 1) {
                Some(d) => (d.allowed, true),
                None => (
                    limiter.check(subject, &policies, 1).await.unwrap().allowed,
                    false,
                ),
            }
        }
    };
    let big = vec![RateLimitPolicy::per_minute("per-minute", 1000)];
    // Warm a lease up: after the first few, decisions are local.
    let mut local = 0;
    for _ in 0..50 {
        let (allowed, here) = decide(big.clone()).await;
        assert!(allowed);
        local += usize::from(here);
    }
    assert!(local > 0, "no decision from the lease");
    assert!(limiter
        .try_local(subject, &big, 1)
        .is_some_and(|d| d.allowed));
    // A lowered limit (the key's record now says 30/min): the lease for 1000/min is not
    // spent for it; the new limit holds from the first request.
    let small = vec![RateLimitPolicy::per_minute("per-minute", 30)];
    let mut allowed = 0;
    for _ in 0..60 {
        allowed += usize::from(decide(small.clone()).await.0);
    }
    assert_eq!(allowed, 30, "the lowered limit must bite at once");
    // A lease is not spent past its lifetime (1 s): then every decision needs Redis again.
    clock.advance(Duration::from_millis(1001));
    assert!(limiter.try_local(subject, &big, 1).is_none());
    // Quotas: a lease taken under one limit is not spent under a lower one.
    let store = leased_store(&t, &t.redis, &clock);
    let key = KeyId::parse("AbCdEfGhIjKm").unwrap();
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let lim = |limit| [Limit { window: 0, limit }];
    for _ in 0..20 {
        assert!(matches!(
            store
                .check_and_add(&key, &[day], &lim(10_000), 1)
                .await
                .unwrap(),
            Admission::Admitted(_)
        ));
    }
    // Lowered to 1000 (still leased): what was used still counts, the new limit holds.
    let mut admitted = 20u64;
    for _ in 0..1200 {
        if matches!(
            store
                .check_and_add(&key, &[day], &lim(1000), 1)
                .await
                .unwrap(),
            Admission::Admitted(_)
        ) {
            admitted += 1;
        }
    }
    store.release_leases().await;
    let counts = store.lease_counts(&key, &[day]).await.unwrap()[0];
    assert!(admitted <= 1000, "{admitted}");
    assert_eq!(counts.used, admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_policies_still_make_one_script_per_request() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    let limiter = RedisRateLimiter::new(&t.redis)
        .time_source(TimeSource::Clock(Arc::new(clock.clone())))
        .leased(LeaseOptions::new().precise("named-precise"));
    let subject = RateSubject::Key(KeyId::parse("AbCdEfGhIjKl").unwrap());
    for policies in [
        vec![RateLimitPolicy::per_minute("named-precise", 1000)],
        // Below the lease threshold (20): precise by size.
        vec![RateLimitPolicy::per_minute("tiny", 5)],
    ] {
        let trips = limiter.round_trips();
        let mut allowed = 0;
        for _ in 0..10 {
            assert!(limiter.try_local(subject, &policies, 1).is_none());
            allowed += usize::from(limiter.check(subject, &policies, 1).await.unwrap().allowed);
        }
        assert_eq!(limiter.round_trips() - trips, 10, "{}", policies[0].name);
        assert_eq!(allowed, 10.min(policies[0].limit as usize));
    }
    assert_eq!(limiter.decided_locally(), 0);
    assert_eq!(limiter.leases_taken(), 0);
    // Quotas below the threshold (1000) are precise: every call is a script, none leased.
    let store = leased_store(&t, &t.redis, &clock);
    let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let mut admitted = 0;
    for _ in 0..12 {
        if matches!(
            store
                .check_and_add(
                    &key,
                    &[day],
                    &[Limit {
                        window: 0,
                        limit: 10
                    }],
                    1
                )
                .await
                .unwrap(),
            Admission::Admitted(_)
        ) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(store.leases_taken(), 0);
    // A window without a limit (metered only) is leased: counted exactly once reported.
    let metered = KeyId::parse("AbCdEfGhIjKn").unwrap();
    for _ in 0..50 {
        assert!(matches!(
            store.check_and_add(&metered, &[day], &[], 1).await.unwrap(),
            Admission::Admitted(_)
        ));
    }
    assert!(store.leases_taken() > 0 && store.decided_locally() > 40);
    store.release_leases().await;
    let counts = store.lease_counts(&metered, &[day]).await.unwrap()[0];
    assert_eq!((counts.used, counts.reserved, counts.lost), (50, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_over_http_answers_from_its_lease() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let r = replica_spec(&t, store.clone(), clock.clone()).spawn().await;
    let (key, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_second("per-second", 1000)];
        r.quotas = vec![QuotaPolicy::new("daily", 100_000, QuotaWindow::Day)];
    })
    .await;
    for _ in 0..100 {
        let (status, headers, _) = send(r.addr, "/", with_key(&key)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("ratelimit"));
    }
    println!(
        "100 sequential requests: {} rate and {} quota decisions from leases, {} rate round trips",
        r.limiter.decided_locally(),
        r.usage.decided_locally(),
        r.limiter.round_trips()
    );
    assert!(r.limiter.decided_locally() >= 80);
    assert!(r.usage.decided_locally() >= 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_quotas_with_a_durable_copy_are_seeded_and_written_through() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let durable = keygate::core::usage::MemoryUsageStore::new();
    // The durable copy already counted 100 (Redis lost its counters, say).
    durable
        .add(&[keygate::core::usage::Increment {
            key,
            window: day,
            usage: keygate::core::usage::Usage {
                cost: 100,
                requests: 100,
            },
        }])
        .await
        .unwrap();
    let store = RedisUsageStore::new(&t.redis)
        .durable(durable.clone())
        .time_source(TimeSource::Clock(Arc::new(clock.clone())))
        .leased(LeaseOptions::for_quotas());
    let limits = [Limit {
        window: 0,
        limit: 1000,
    }];
    let mut admitted = 0u64;
    for _ in 0..1000 {
        if matches!(
            store.check_and_add(&key, &[day], &limits, 1).await.unwrap(),
            Admission::Admitted(_)
        ) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 900, "seeded with the durable 100 first");
    assert!(store.decided_locally() > 0);
    store.release_leases().await;
    let counts = store.lease_counts(&key, &[day]).await.unwrap()[0];
    assert_eq!((counts.used, counts.reserved, counts.lost), (1000, 0, 0));
    let kept = durable.load(&key, &[day]).await.unwrap();
    assert_eq!(kept[0].cost, 1000, "every reported lease written through");
}

/// A refund (another layer refused the request) of a request a lease served and has not
/// reported yet comes out of the lease: before, it went to Redis, which had not counted
/// the request, saturated at zero there, and the later report counted the refunded request
/// anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_before_the_report_is_taken_from_the_lease() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    let key = KeyId::parse("RefundLease1").unwrap();
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let limits = [Limit {
        window: 0,
        limit: 10_000,
    }];
    let store = leased_store(&t, &t.redis, &clock);
    for _ in 0..2 {
        let a = store.check_and_add(&key, &[day], &limits, 1).await.unwrap();
        assert!(matches!(a, Admission::Admitted(_)), "{a:?}");
    }
    assert_eq!(
        store.lease_counts(&key, &[day]).await.unwrap()[0].used,
        0,
        "nothing reported yet"
    );
    let one = Increment {
        key,
        window: day,
        usage: Usage {
            cost: 1,
            requests: 1,
        },
    };
    store.subtract(&[one]).await.unwrap();
    store.release_leases().await;
    let after = store.lease_counts(&key, &[day]).await.unwrap()[0];
    assert_eq!((after.used, after.reserved), (1, 0), "{after:?}");
    let usage = store.load(&key, &[day]).await.unwrap()[0];
    assert_eq!(usage.requests, 1);
    // A refund of what was already reported still goes to Redis.
    store.subtract(&[one]).await.unwrap();
    assert_eq!(store.lease_counts(&key, &[day]).await.unwrap()[0].used, 0);
}
