//! Hot-path benchmarks of authentication: the verifier and the authentication layer.
//!
//! Run with `cargo bench --bench auth` (quick form:
//! `cargo bench --bench auth -- --warm-up-time 1 --measurement-time 3`). `cargo test` does
//! not build this target; `cargo test --benches` runs every benchmark once, as a smoke test.
//!
//! What is measured, all in one run so the ratios mean something:
//!
//! - `verifier/lookup/*`: the synchronous [`Verifier::lookup`] (no runtime involved) for a
//!   cached key, a well-formed key whose id is unknown and already in the negative cache,
//!   a malformed key (bad checksum: the most expensive malformation, it runs the whole
//!   parse including the CRC32) and garbage (fails at the first check).
//! - `verifier/verify/*`: the async [`Verifier::verify`] for a cached key, polled once with
//!   `now_or_never` (it completes without I/O) and on a current-thread tokio runtime.
//! - `layer/*`: one request through `tower::ServiceExt::oneshot` on a clone of the service
//!   (as axum does per request): a bare `service_fn` returning an empty response, the same
//!   service behind `gate.auth_layer()`, and behind tower-http's
//!   `ValidateRequestHeaderLayer::bearer` as a peer. Each request is built outside the timed
//!   section the same way for every variant (`iter_batched`, 256 at a time), and the futures
//!   are polled with `now_or_never` (all three complete on the first poll). Dropping the
//!   request (inside the inner service) is timed in all three.
//!
//! - `verifier/*/cached_3_roles`: the same for a cached key holding three roles (with
//!   per-collection grants, attributes and limits): a key's roles are resolved once per
//!   change and interned in its cached principal, so this should cost what `cached` does.
//!
//! The store holds 10,000 keys, all of them in the verifier's cache.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use keygate::{
    ApiKey, KeyGate, KeyRecord, KeyStore, Lookup, MemoryStore, Prefix, QuotaPolicy, QuotaWindow,
    RateLimitPolicy, Verifier,
};
use keygate::{Grant, Role};
use tower::{service_fn, ServiceBuilder, ServiceExt};
#[allow(deprecated)] // tower-http calls it "too basic"; it is the peer the issue names.
use tower_http::validate_request::ValidateRequestHeaderLayer;

/// How many keys the store (and the cache) holds.
const KEYS: usize = 10_000;

/// Requests built ahead of each timed batch: few enough to stay in the CPU's cache, so the
/// timed section measures the middleware rather than memory traffic for requests prepared
/// long before (criterion's default batches hold thousands).
const REQUESTS_PER_BATCH: u64 = 256;

struct Fixture {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
    /// A cached, active key.
    cached: ApiKey,
    /// A cached, active key holding three roles.
    with_roles: ApiKey,
    /// A well-formed key that is not in the store; its id is in the negative cache.
    unknown: ApiKey,
    /// `cached` with its checksum broken.
    malformed: String,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let store = MemoryStore::new();
    // Default settings except the cache lifetimes: with the 30 s defaults a long run would
    // see an entry go stale mid-measurement (one lookup would then turn into a refresh) and
    // the unknown id drop out of the negative cache. The hot path's cost does not depend on
    // these values.
    let verifier = Verifier::builder(store.clone())
        .refresh_after(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(3600))
        .build();
    let prefix = Prefix::default();
    let mut keys = Vec::with_capacity(KEYS);
    rt.block_on(async {
        for i in 0..KEYS {
            let (key, record) = KeyRecord::generate(
                &prefix,
                verifier.hasher(),
                format!("bench-{i}"),
                verifier.clock().now(),
            )
            .expect("generate key");
            store.insert(&record).await.expect("insert key");
            keys.push(key);
        }
        // Warm the cache the way traffic would: one verification per key.
        for key in &keys {
            verifier
                .verify(key.expose_secret())
                .await
                .expect("fresh key verifies");
        }
    });
    assert_eq!(verifier.cached(), KEYS);

    // A key holding three roles, each with grants, an attribute and limits.
    let with_roles = rt.block_on(async {
        for (i, name) in ["vector-reader", "data-ingester", "index-admin"]
            .iter()
            .enumerate()
        {
            let role = Role::new(*name, verifier.clock().now())
                .with_grant(Grant::new(
                    [format!("points:{name}"), "collections:read".into()],
                    [format!("tenant-{i}-*"), "shared".into()],
                ))
                .with_attribute(format!("role{i}"), *name)
                .with_rate_limit(RateLimitPolicy::per_second("burst", 100 + i as u32))
                .with_quota(QuotaPolicy::new("daily", 10_000, QuotaWindow::Day));
            store.insert_role(&role).await.expect("insert role");
        }
        let (key, mut record) = KeyRecord::generate(
            &prefix,
            verifier.hasher(),
            "bench-roles",
            verifier.clock().now(),
        )
        .expect("generate key");
        record.roles = vec![
            "vector-reader".into(),
            "data-ingester".into(),
            "index-admin".into(),
        ];
        store.insert(&record).await.expect("insert key");
        let p = verifier
            .verify(key.expose_secret())
            .await
            .expect("fresh key verifies");
        assert_eq!(p.roles().len(), 3, "the roles are resolved");
        key
    });

    let unknown = ApiKey::generate(&prefix).expect("generate key");
    let denial = rt
        .block_on(verifier.verify(unknown.expose_secret()))
        .expect_err("unknown key");
    assert_eq!(denial.code().as_str(), "invalid_key");

    let cached = keys.swap_remove(KEYS / 2);
    let mut malformed = cached.expose_secret().to_owned();
    let last = malformed.pop().expect("non-empty key");
    malformed.push(if last == 'a' { 'b' } else { 'a' });

    // Every case must take the path it claims to measure.
    assert!(matches!(
        verifier.lookup(cached.expose_secret()),
        Lookup::Done(Ok(_))
    ));
    assert!(matches!(
        verifier.lookup(unknown.expose_secret()),
        Lookup::Done(Err(ref d)) if d.code().as_str() == "invalid_key"
    ));
    assert!(matches!(
        verifier.lookup(&malformed),
        Lookup::Done(Err(ref d)) if d.code().as_str() == "malformed_key"
    ));
    assert!(matches!(
        verifier.lookup(with_roles.expose_secret()),
        Lookup::Done(Ok(_))
    ));
    assert_eq!(
        verifier.cached(),
        KEYS + 1,
        "the benchmarks must not touch the store"
    );

    Fixture {
        rt,
        verifier,
        cached,
        with_roles,
        unknown,
        malformed,
    }
}

fn verifier_benches(c: &mut Criterion, f: &Fixture) {
    let v = &f.verifier;
    let cached = f.cached.expose_secret();
    let unknown = f.unknown.expose_secret();
    let malformed = f.malformed.as_str();
    let garbage = "not-a-key";

    let mut g = c.benchmark_group("verifier");
    let with_roles = f.with_roles.expose_secret();
    g.bench_function("lookup/cached", |b| b.iter(|| v.lookup(black_box(cached))));
    g.bench_function("lookup/cached_3_roles", |b| {
        b.iter(|| v.lookup(black_box(with_roles)))
    });
    g.bench_function("verify/cached_3_roles/now_or_never", |b| {
        b.iter(|| {
            v.verify(black_box(with_roles))
                .now_or_never()
                .expect("a cached key needs no I/O")
        })
    });
    g.bench_function("lookup/unknown_negative_cached", |b| {
        b.iter(|| v.lookup(black_box(unknown)))
    });
    g.bench_function("lookup/malformed_bad_checksum", |b| {
        b.iter(|| v.lookup(black_box(malformed)))
    });
    g.bench_function("lookup/malformed_garbage", |b| {
        b.iter(|| v.lookup(black_box(garbage)))
    });
    g.bench_function("verify/cached/now_or_never", |b| {
        b.iter(|| {
            v.verify(black_box(cached))
                .now_or_never()
                .expect("a cached key needs no I/O")
        })
    });
    g.bench_function("verify/cached/tokio_current_thread", |b| {
        b.to_async(&f.rt).iter(|| v.verify(black_box(cached)))
    });
    g.finish();
}

fn request(authorization: &str) -> Request<Empty<Bytes>> {
    Request::get("/points")
        .header("authorization", authorization)
        .body(Empty::new())
        .expect("valid request")
}

async fn empty(_: Request<Empty<Bytes>>) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::new(Empty::new()))
}

fn layer_benches(c: &mut Criterion, f: &Fixture) {
    let bearer = format!("Bearer {}", f.cached.expose_secret());
    let gate = KeyGate::new(f.verifier.clone());

    let bare = service_fn(empty);
    let keygate = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service_fn(empty);
    #[allow(deprecated)]
    let tower_http = ServiceBuilder::new()
        .layer(ValidateRequestHeaderLayer::bearer(f.cached.expose_secret()))
        .service_fn(empty);

    // Same request, same outcome for all three.
    let ok = |status: http::StatusCode| assert_eq!(status, 200);
    ok(bare
        .oneshot(request(&bearer))
        .now_or_never()
        .unwrap()
        .unwrap()
        .status());
    ok(keygate
        .clone()
        .oneshot(request(&bearer))
        .now_or_never()
        .unwrap()
        .unwrap()
        .status());
    ok(tower_http
        .clone()
        .oneshot(request(&bearer))
        .now_or_never()
        .unwrap()
        .unwrap()
        .status());

    let mut g = c.benchmark_group("layer");
    g.bench_function("bare", |b| {
        b.iter_batched(
            || request(&bearer),
            |req| bare.oneshot(req).now_or_never(),
            BatchSize::NumIterations(REQUESTS_PER_BATCH),
        )
    });
    g.bench_function("keygate_auth", |b| {
        b.iter_batched(
            || request(&bearer),
            |req| keygate.clone().oneshot(req).now_or_never(),
            BatchSize::NumIterations(REQUESTS_PER_BATCH),
        )
    });
    g.bench_function("tower_http_bearer", |b| {
        b.iter_batched(
            || request(&bearer),
            |req| tower_http.clone().oneshot(req).now_or_never(),
            BatchSize::NumIterations(REQUESTS_PER_BATCH),
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    verifier_benches(c, &f);
    layer_benches(c, &f);
}

criterion_group!(auth, benches);
criterion_main!(auth);
