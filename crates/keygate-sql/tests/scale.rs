//! Scale figures (ignored by default; minutes in release mode):
//!
//! ```text
//! cargo test -p keygate-sql --release --test scale -- --ignored --nocapture --test-threads=1
//! ```
//!
//! - `scale_sqlite_1m`, `scale_postgres_1m`: bulk creation of 1,000,000 keys
//!   (`insert_many`), a cold server's first verified request (open, migrations check,
//!   follower start, one cache miss), a full preload, and cached verification at 1M.
//! - `cache_latency_and_memory`: the verifier cache alone at 1k, 100k and 1M keys:
//!   latency of a cached verification (mean, p50, p99) and memory per cached key (live
//!   heap bytes counted by this binary's allocator, and the RSS delta).
//!
//! PostgreSQL runs need `KEYGATE_TEST_POSTGRES_URL`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use keygate_core::{ApiKey, KeyHasher, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
use keygate_testkit::alloc::{Counting, LIVE};

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident set size in bytes (Linux).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// `n` keys; realistic ones have an owner, two scopes, a collection pattern and a tenant
/// attribute, the others only a name. Keeps the plaintext of every `sample_every`-th key.
fn keys(n: usize, sample_every: usize, realistic: bool) -> (Vec<KeyRecord>, Vec<ApiKey>) {
    let h = KeyHasher::new();
    let start = SystemTime::now() - Duration::from_secs(86_400);
    let mut records = Vec::with_capacity(n);
    let mut sample = Vec::new();
    for i in 0..n {
        let (key, mut r) = KeyRecord::generate(
            &Prefix::default(),
            &h,
            format!("svc-{i}"),
            start + Duration::from_millis(i as u64),
        )
        .expect("generate");
        if realistic {
            r.owner = Some(format!("customer-{}", i % 10_000));
            r.scopes = vec!["points:read".into(), "points:write".into()];
            r.resources = vec![format!("tenant-{}-*", i % 10_000)];
            r.attributes = BTreeMap::from([("tenant".into(), format!("t{}", i % 10_000))]);
        }
        records.push(r);
        if i % sample_every == 0 {
            sample.push(key);
        }
    }
    (records, sample)
}

struct Latency {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

/// Cached verifications cycling through the first `working_set` keys of `sample`, in 5
/// rounds of 200,000 calls (each round timed as a whole, then call by call). The machine
/// is shared, so each figure is the best round's: the one least disturbed by other work.
async fn measure(verifier: &Verifier, sample: &[ApiKey], working_set: usize) -> Latency {
    let keys: Vec<&str> = sample
        .iter()
        .take(working_set)
        .map(|k| k.expose_secret())
        .collect();
    // Warm: every key of the working set cached.
    for k in &keys {
        verifier.verify(k).await.expect("verify");
    }
    const CALLS: usize = 200_000;
    let mut best: Option<Latency> = None;
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..CALLS {
            let p = verifier.verify(keys[i % keys.len()]).await.expect("verify");
            std::hint::black_box(p);
        }
        let mean = start.elapsed() / CALLS as u32;
        let mut each = Vec::with_capacity(CALLS);
        for i in 0..CALLS {
            let t = Instant::now();
            let p = verifier.verify(keys[i % keys.len()]).await.expect("verify");
            each.push(t.elapsed());
            std::hint::black_box(p);
        }
        each.sort();
        let round = Latency {
            mean,
            p50: each[each.len() / 2],
            p99: each[each.len() * 99 / 100],
        };
        best = Some(match best {
            None => round,
            Some(b) => Latency {
                mean: b.mean.min(round.mean),
                p50: b.p50.min(round.p50),
                p99: b.p99.min(round.p99),
            },
        });
    }
    best.expect("five rounds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes; run in release mode: see the module docs"]
async fn cache_latency_and_memory() {
    for realistic in [true, false] {
        let shape = if realistic {
            "owner, 2 scopes, 1 collection, 1 attribute"
        } else {
            "name only"
        };
        println!("records: {shape}");
        cache_at_sizes(realistic).await;
    }
}

async fn cache_at_sizes(realistic: bool) {
    let mut base = None;
    for n in [1_000usize, 100_000, 1_000_000] {
        let (records, sample) = keys(n, (n / 10_000).max(1), realistic);
        let store = MemoryStore::new();
        for r in &records {
            store.insert(r).await.unwrap();
        }
        drop(records);
        let verifier = Verifier::new(store.clone());
        let (heap0, rss0) = (live(), rss());
        assert_eq!(verifier.preload().await.unwrap(), n);
        let (heap1, rss1) = (live(), rss());
        let per_key = (heap1 - heap0) as f64 / n as f64;
        let rss_per_key = match (rss0, rss1) {
            (Some(a), Some(b)) => format!("{:.0}", (b as f64 - a as f64) / n as f64),
            _ => "n/a".into(),
        };
        let hot = measure(&verifier, &sample, 1_000).await;
        let spread = measure(&verifier, &sample, 10_000).await;
        let (rh, rs) = match base {
            None => {
                base = Some((hot.p50, spread.p50));
                (1.0, 1.0)
            }
            Some((bh, bs)) => (
                hot.p50.as_secs_f64() / bh.as_secs_f64(),
                spread.p50.as_secs_f64() / bs.as_secs_f64(),
            ),
        };
        println!(
            "cache n={n}: verify, 1,000 hot keys: mean {:?} p50 {:?} p99 {:?} (p50 {rh:.2}x of n=1k); \
             {} keys spread over the map: mean {:?} p50 {:?} p99 {:?} (p50 {rs:.2}x of n=1k); \
             memory per cached key: {per_key:.0} B live heap, {rss_per_key} B RSS",
            hot.mean, hot.p50, hot.p99, sample.len().min(10_000), spread.mean, spread.p50, spread.p99
        );
    }
}

async fn scale_1m(db: &Db) {
    // KEYGATE_SCALE_KEYS overrides the count for quicker runs.
    let n: usize = std::env::var("KEYGATE_SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let t = Instant::now();
    let (records, sample) = keys(n, 100, true);
    println!("{}: generated {n} keys in {:?}", db.name(), t.elapsed());

    let store = db.open().await;
    let t = Instant::now();
    for chunk in records.chunks(100_000) {
        store.insert_many(chunk).await.expect("insert_many");
    }
    let took = t.elapsed();
    println!(
        "{}: bulk-created {n} keys in {took:?} ({:.0} keys/s, insert_many in chunks of 100,000)",
        db.name(),
        n as f64 / took.as_secs_f64()
    );
    drop(records);
    store.close().await;
    if let Db::Sqlite { dir, .. } = db {
        let size = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        println!(
            "sqlite: database file {} MB, WAL {} MB after closing",
            size("keygate.db") / 1_000_000,
            size("keygate.db-wal") / 1_000_000
        );
    }

    // A cold server: open (migrations check), follower, first request (a cache miss). The
    // file at rest first: flush the bulk load's dirty pages so their write-back is not
    // counted as start-up time.
    let _ = std::process::Command::new("sync").status();
    let t = Instant::now();
    let store = db.open().await;
    let opened = t.elapsed();
    let verifier = Verifier::new(store.clone());
    let follower = store.watch(&verifier).await.unwrap();
    let watching = t.elapsed();
    verifier
        .verify(sample[0].expose_secret())
        .await
        .expect("first verify");
    println!(
        "{}: cold server, open to first verified request: {:?} (open and migrations check {opened:?}, follower running at {watching:?})",
        db.name(),
        t.elapsed()
    );
    let t = Instant::now();
    let first = verifier
        .verify(sample[1].expose_secret())
        .await
        .expect("verify");
    std::hint::black_box(first);
    println!(
        "{}: one cache miss (a store read) at {n} keys: {:?}",
        db.name(),
        t.elapsed()
    );

    let t = Instant::now();
    let loaded = verifier.preload().await.unwrap();
    assert_eq!(loaded, n);
    println!(
        "{}: preloaded {n} keys into the cache in {:?}",
        db.name(),
        t.elapsed()
    );
    let l = measure(&verifier, &sample, 10_000).await;
    println!(
        "{}: cached verify at {n} keys (10,000 keys spread): mean {:?} p50 {:?} p99 {:?}",
        db.name(),
        l.mean,
        l.p50,
        l.p99
    );
    follower.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes; run in release mode: see the module docs"]
async fn scale_sqlite_1m() {
    scale_1m(&Db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes; run in release mode: see the module docs"]
async fn scale_postgres_1m() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    scale_1m(&db).await;
}
