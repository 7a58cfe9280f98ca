//! Redis losing keygate's state: its keys deleted (as `FLUSHALL` or a restart without
//! persistence would), or a restart that brings back an older snapshot. Quotas keep counting
//! from the durable copy (SQLite, and PostgreSQL when `KEYGATE_TEST_POSTGRES_URL` is set),
//! and rate limits fail to the configured policy for the hold instead of starting over
//! silently. Runs against the real Redis (`KEYGATE_TEST_REDIS_URL`, a key prefix per test);
//! the restart test starts a Redis server of its own (`redis-server` on the PATH).

mod common;
mod redis_support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{send, with_key};
use http::StatusCode;
use keygate::core::usage::{UsageStore, Window};
use keygate::rate_limit::Fallback;
use keygate::redis::{Redis, RedisOptions};
use keygate::sql::{SqlOptions, SqlStore};
use keygate::{ApiKey, Clock, ManualClock, MemoryStore, QuotaPolicy, QuotaWindow, RateLimitPolicy};
use redis_support::*;

const PG_ENV: &str = "KEYGATE_TEST_POSTGRES_URL";

async fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["code"].as_str().unwrap_or_default().to_owned()
}

/// A SQL database for the durable copy: a SQLite file, or a PostgreSQL schema of its own
/// (dropped with `psql` at the end).
struct Db {
    name: &'static str,
    store: SqlStore,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((url, schema)) = &self.pg_schema {
            let dropped = Command::new("psql")
                .arg(url)
                .args([
                    "-q",
                    "-c",
                    &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(dropped, Ok(s) if s.success()) {
                eprintln!("warning: could not drop schema {schema}");
            }
        }
    }
}

/// SQLite always; PostgreSQL too when `KEYGATE_TEST_POSTGRES_URL` is set.
async fn databases() -> Vec<Db> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("usage.db").display());
    let mut dbs = vec![Db {
        name: "sqlite",
        store: SqlStore::open(&url).await.unwrap(),
        _dir: Some(dir),
        pg_schema: None,
    }];
    match std::env::var(PG_ENV) {
        Ok(url) => {
            let schema = format!(
                "kg_test_{}",
                keygate::KeyId::generate().unwrap().as_str().to_lowercase()
            );
            let store = SqlStore::open_with(&url, SqlOptions::new().schema(schema.clone()))
                .await
                .unwrap();
            dbs.push(Db {
                name: "postgres",
                store,
                _dir: None,
                pg_schema: Some((url, schema)),
            });
        }
        Err(_) => println!("postgres skipped: {PG_ENV} is not set"),
    }
    dbs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_prefix_twice_does_not_reset_a_quota() {
    for db in databases().await {
        let Some(t) = TestRedis::new().await else {
            return;
        };
        let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
        let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
        spec.durable = Some(Arc::new(db.store.usage_store()));
        let replicas = [spec.spawn().await, spec.spawn().await];
        let (key, record) = issue(&store, &clock, |r| {
            r.quotas = vec![QuotaPolicy::new("daily", 5, QuotaWindow::Day)]
        })
        .await;
        let mut statuses = vec![];
        let mut i = 0;
        let mut ask = |n: usize| {
            let mut out = vec![];
            for _ in 0..n {
                out.push(replicas[i % 2].addr);
                i += 1;
            }
            out
        };
        for addr in ask(3) {
            statuses.push(send(addr, "/", with_key(&key)).await.0);
        }
        assert!(t.redis.delete_all().await.unwrap() > 0);
        for addr in ask(3) {
            statuses.push(send(addr, "/", with_key(&key)).await.0);
        }
        t.redis.delete_all().await.unwrap();
        for addr in ask(3) {
            let (status, _, body) = send(addr, "/", with_key(&key)).await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(code(&body).await, "quota_exceeded");
            }
            statuses.push(status);
        }
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        println!(
            "{}: 9 requests to a 5/day quota around two deletions of the prefix: {ok} allowed",
            db.name
        );
        assert_eq!(ok, 5, "{}: {statuses:?}", db.name);
        assert_eq!(
            statuses[5..],
            [StatusCode::TOO_MANY_REQUESTS; 4],
            "{}",
            db.name
        );
        // The durable copy counted every admitted request, and Redis was re-seeded from it.
        let day = Window::containing(QuotaWindow::Day, clock.now());
        let kept = db
            .store
            .usage_store()
            .load(&record.id, &[day])
            .await
            .unwrap()[0];
        assert_eq!((kept.cost, kept.requests), (5, 5), "{}", db.name);
        let seen = replicas[0].usage.load(&record.id, &[day]).await.unwrap()[0];
        assert_eq!(seen.cost, 5, "{}", db.name);
        // Reports come from the durable copy, complete although Redis lost its index.
        let rows = replicas[1]
            .usage
            .report(&record.id, day.start, clock.now() + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "{}: {rows:?}", db.name);
        assert_eq!(rows[0].usage.cost, 5, "{}", db.name);
    }
}

#[tokio::test]
async fn without_a_durable_copy_a_deletion_resets_the_window() {
    // What the durable copy is for: the same store without it starts over.
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replica = ReplicaSpec::new(&t, store.clone(), clock.clone())
        .spawn()
        .await;
    let (key, _) = issue(&store, &clock, |r| {
        r.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)]
    })
    .await;
    let mut ok = 0;
    for round in 0..2 {
        for _ in 0..3 {
            ok += usize::from(send(replica.addr, "/", with_key(&key)).await.0 == StatusCode::OK);
        }
        if round == 0 {
            t.redis.delete_all().await.unwrap();
        }
    }
    assert_eq!(ok, 4);
}

#[tokio::test]
async fn a_durable_copy_that_cannot_be_written_refuses_and_takes_the_count_back() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let db = databases().await.remove(0);
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = ReplicaSpec::new(&t, store.clone(), clock.clone());
    spec.durable = Some(Arc::new(db.store.usage_store()));
    let replica = spec.spawn().await;
    let (key, record) = issue(&store, &clock, |r| {
        r.quotas = vec![QuotaPolicy::new("daily", 5, QuotaWindow::Day)]
    })
    .await;
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );
    db.store.close().await;
    let (status, _, body) = send(replica.addr, "/", with_key(&key)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code(&body).await, "store_unavailable");
    // Redis still holds one: the refused request was taken back.
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let mut c = t
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cost: String = keygate::redis::redis::cmd("HGET")
        .arg(format!(
            "{}:q:{{{}}}:day:{}",
            t.prefix,
            record.id,
            day.start_secs()
        ))
        .arg("c")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(cost, "1");
}

/// A 3/hour key on a replica with `fallback` and a hold of 20 minutes.
async fn limited(
    t: &TestRedis,
    fallback: Fallback,
) -> (Vec<Replica>, ApiKey, ManualClock, MemoryStore) {
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = ReplicaSpec::new(t, store.clone(), clock.clone());
    spec.fallback = fallback;
    spec.hold = Some(Duration::from_secs(20 * 60));
    let replicas = vec![spec.spawn().await, spec.spawn().await];
    let (key, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_hour("hourly", 3)]
    })
    .await;
    (replicas, key, clock, store)
}

#[tokio::test]
async fn a_lost_rate_limit_state_is_refused_for_the_hold_then_counted_afresh() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (replicas, key, clock, _) = limited(&t, Fallback::Deny).await;
    for r in [&replicas[0], &replicas[1], &replicas[0]] {
        assert_eq!(send(r.addr, "/", with_key(&key)).await.0, StatusCode::OK);
    }
    let (status, _, body) = send(replicas[1].addr, "/", with_key(&key)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code(&body).await, "rate_limited");

    t.redis.delete_all().await.unwrap();
    // Both replicas refuse (the hold is shared), and keep refusing for 20 minutes.
    for r in &replicas {
        let (status, headers, body) = send(r.addr, "/", with_key(&key)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(code(&body).await, "store_unavailable");
        assert_eq!(headers["retry-after"], "1");
    }
    assert_eq!(
        replicas[0].limiter.losses() + replicas[1].limiter.losses(),
        2
    );
    clock.advance(Duration::from_secs(20 * 60 - 1));
    assert_eq!(
        send(replicas[1].addr, "/", with_key(&key)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Then counting starts over: the full burst (two more than had nothing been lost,
    // the documented bound ceil(3 · (60 − 20) / 60)).
    clock.advance(Duration::from_secs(1));
    let mut ok = 0;
    for i in 0..5 {
        ok +=
            usize::from(send(replicas[i % 2].addr, "/", with_key(&key)).await.0 == StatusCode::OK);
    }
    assert_eq!(ok, 3);
    // A second loss holds again.
    t.redis.delete_all().await.unwrap();
    assert_eq!(
        send(replicas[0].addr, "/", with_key(&key)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn with_the_local_fallback_a_lost_state_is_limited_in_process_during_the_hold() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let (replicas, key, _clock, _) = limited(&t, Fallback::Local).await;
    let r = &replicas[0];
    for _ in 0..3 {
        assert_eq!(send(r.addr, "/", with_key(&key)).await.0, StatusCode::OK);
    }
    t.redis.delete_all().await.unwrap();
    // In-process: this replica's own 3/hour.
    let mut statuses = vec![];
    for _ in 0..4 {
        let (status, headers, _) = send(r.addr, "/", with_key(&key)).await;
        statuses.push((status, headers.get("ratelimit").cloned()));
    }
    assert_eq!(
        statuses.iter().map(|s| s.0).collect::<Vec<_>>(),
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(statuses[0].1.as_ref().unwrap(), r#""hourly";r=2;t=1200"#);
    assert_eq!(r.limiter.losses(), 1);
    assert_eq!(t.key_count().await, 0, "nothing counted in Redis meanwhile");
}

/// A Redis server of this test's own, saving its snapshot in `dir`.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start(dir: &std::path::Path, port: u16) -> Option<OwnRedis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(OwnRedis { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(url: &str) -> Redis {
    let redis = Redis::open_with(url, RedisOptions::new().prefix("kgrestart"))
        .await
        .unwrap();
    poll_until(Duration::from_secs(10), "the own Redis answers", || async {
        redis.ping().await.ok()
    })
    .await;
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_brings_back_an_older_snapshot_is_noticed() {
    if std::env::var(REDIS_ENV).is_err() {
        println!("skipped: {REDIS_ENV} is not set");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(server) = OwnRedis::start(dir.path(), port) else {
        println!("skipped: redis-server is not on the PATH");
        return;
    };
    let url = server.url();
    let admin = wait_for(&url).await;
    let db = databases().await.remove(0);
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replica = ReplicaSpec {
        store: store.clone(),
        clock: clock.clone(),
        url: url.clone(),
        options: RedisOptions::new()
            .prefix("kgrestart")
            .timeout(Duration::from_millis(200))
            .retry_after(Duration::from_millis(50)),
        fallback: Fallback::Deny,
        resync_every: Duration::from_millis(100),
        precheck: false,
        server_time: false,
        durable: Some(Arc::new(db.store.usage_store())),
        hold: Some(Duration::from_secs(60)),
        restart_every: Some(Duration::from_millis(20)),
        resync_interval: Duration::from_secs(1),
        signing_key: None,
        rate_leases: None,
        quota_leases: None,
    }
    .spawn()
    .await;
    let (metered, _) = issue(&store, &clock, |r| {
        r.quotas = vec![QuotaPolicy::new("daily", 5, QuotaWindow::Day)]
    })
    .await;
    let (limited, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_hour("hourly", 3)]
    })
    .await;
    let monitor = replica.monitor.as_ref().unwrap();
    poll_until(
        Duration::from_secs(10),
        "the monitor stamps the epoch",
        || async { (monitor.checks() > 0).then_some(()) },
    )
    .await;
    for key in [&metered, &metered, &limited] {
        assert_eq!(
            send(replica.addr, "/", with_key(key)).await.0,
            StatusCode::OK
        );
    }
    // A snapshot now: two of five used, one of three.
    let mut c = admin
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = keygate::redis::redis::cmd("SAVE")
        .query_async(&mut c)
        .await
        .unwrap();
    for key in [&metered, &metered, &metered, &limited, &limited] {
        assert_eq!(
            send(replica.addr, "/", with_key(key)).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        send(replica.addr, "/", with_key(&metered)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );

    // The server restarts from the older snapshot (same port and directory).
    server.stop();
    let _server = OwnRedis::start(dir.path(), port).expect("restart redis-server");
    wait_for(&url).await;
    poll_until(
        Duration::from_secs(10),
        "the monitor notices the restart",
        || async { (monitor.restarts() == 1).then_some(()) },
    )
    .await;
    // The quota is re-seeded from the durable copy (5 used), not the snapshot's 2. (While
    // the connection comes back requests may get 503s; never a 200.)
    let (body, took) = poll_until(Duration::from_secs(10), "the quota answers", || async {
        let (status, _, body) = send(replica.addr, "/", with_key(&metered)).await;
        assert_ne!(status, StatusCode::OK, "counted on the older snapshot");
        (status == StatusCode::TOO_MANY_REQUESTS).then_some(body)
    })
    .await;
    assert_eq!(code(&body).await, "quota_exceeded");
    // The rate limit holds rather than trust the snapshot's one of three.
    poll_until(Duration::from_secs(10), "the limiter notices", || async {
        let (status, _, _) = send(replica.addr, "/", with_key(&limited)).await;
        assert_ne!(status, StatusCode::OK, "counted on the older snapshot");
        (replica.limiter.losses() == 1).then_some(())
    })
    .await;
    let (status, _, body) = send(replica.addr, "/", with_key(&limited)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code(&body).await, "store_unavailable");
    println!("restart from an older snapshot: quota re-seeded, rate limit held (the quota answered {took:?} after the restart was noticed)");
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "prints latency figures; run with --ignored --nocapture"]
async fn what_the_durable_copy_costs_per_strict_check() {
    use keygate::core::usage::{Limit, MemoryUsageStore};
    use keygate::redis::RedisUsageStore;
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let day = Window::containing(QuotaWindow::Day, ManualClock::at_2026().now());
    let limits = [Limit {
        window: 0,
        limit: u64::MAX,
    }];
    let mut stores: Vec<(&str, RedisUsageStore, Option<Db>)> = vec![
        ("redis only", RedisUsageStore::new(&t.redis), None),
        (
            "redis + memory copy",
            RedisUsageStore::new(&t.redis).durable(MemoryUsageStore::new()),
            None,
        ),
    ];
    for db in databases().await {
        let store = RedisUsageStore::new(&t.redis).durable(db.store.usage_store());
        stores.push((db.name, store, Some(db)));
    }
    for (name, store, _db) in &stores {
        let key = keygate::KeyId::generate().unwrap();
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let start = std::time::Instant::now();
            store.check_and_add(&key, &[day], &limits, 1).await.unwrap();
            samples.push(start.elapsed());
        }
        let (median, p99) = percentiles(&mut samples);
        println!("check_and_add, {name}: median {median:?}, p99 {p99:?}");
    }
}
