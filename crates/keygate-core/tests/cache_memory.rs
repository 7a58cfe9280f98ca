//! Memory per cached key: the live heap a [`Verifier`]'s cache holds per key, counted by a
//! global allocator that adds up the sizes asked for (so the figure does not depend on the
//! allocator or the build profile).
//!
//! - `cached_key_memory_stays_within_512_bytes` (100,000 keys, runs in every test run):
//!   keys with an owner, two scopes, a collection pattern and a `tenant` attribute, where
//!   100 keys share each tenant (the shape of `keygate-sql`'s scale test) must cost at most
//!   512 bytes each. It also prints the figure for keys that share nothing but their scopes.
//! - `cached_key_memory_at_one_million` (ignored: run with `--release -- --ignored
//!   --nocapture`): the same figures at 1k, 100k and 1M keys.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use keygate_core::{KeyHasher, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
use keygate_testkit::alloc::{Counting, LIVE};

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// 100 keys per tenant (owner, collection pattern and `tenant` attribute shared).
    SharedTenants,
    /// Every key its own owner, collection pattern and tenant.
    Distinct,
}

fn records(n: usize, shape: Shape) -> Vec<KeyRecord> {
    let h = KeyHasher::new();
    let start = SystemTime::now() - Duration::from_secs(86_400);
    let tenants = match shape {
        Shape::SharedTenants => (n / 100).max(1),
        Shape::Distinct => n,
    };
    (0..n)
        .map(|i| {
            let (_, mut r) = KeyRecord::generate(
                &Prefix::default(),
                &h,
                format!("svc-{i}"),
                start + Duration::from_millis(i as u64),
            )
            .expect("generate");
            let t = i % tenants;
            r.owner = Some(format!("customer-{t}"));
            r.scopes = vec!["points:read".into(), "points:write".into()];
            r.resources = vec![format!("tenant-{t}-*")];
            r.attributes = BTreeMap::from([("tenant".into(), format!("t{t}"))]);
            r
        })
        .collect()
}

/// The allocation counter is global: tests measuring it run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes of live heap per cached key after preloading `n` keys of `shape`.
async fn per_key(n: usize, shape: Shape) -> f64 {
    let _serial = SERIAL.lock().await;
    let store = MemoryStore::new();
    for r in records(n, shape) {
        store.insert(&r).await.expect("insert");
    }
    let verifier = Verifier::new(store.clone());
    let before = LIVE.load(Ordering::Relaxed);
    assert_eq!(verifier.preload().await.expect("preload"), n);
    let after = LIVE.load(Ordering::Relaxed);
    let per_key = (after - before) as f64 / n as f64;
    println!("{n} keys, {shape:?}: {per_key:.0} bytes of live heap per cached key");
    drop(verifier);
    per_key
}

#[tokio::test(flavor = "current_thread")]
async fn cached_key_memory_stays_within_512_bytes() {
    let shared = per_key(100_000, Shape::SharedTenants).await;
    assert!(shared <= 512.0, "{shared:.0} bytes per cached key");
    let distinct = per_key(100_000, Shape::Distinct).await;
    // Nothing shared but the scopes: bounded too, if not by the target.
    assert!(distinct <= 1024.0, "{distinct:.0} bytes per cached key");
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "a million keys: run in release mode"]
async fn cached_key_memory_at_one_million() {
    for n in [1_000, 100_000, 1_000_000] {
        for shape in [Shape::SharedTenants, Shape::Distinct] {
            per_key(n, shape).await;
        }
    }
}
