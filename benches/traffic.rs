//! Hot-path benchmarks of the traffic layers: the rate-limit and quota layers on a hot key, against
//! the bare service and tower_governor's `GovernorLayer`, all in one run.
//!
//! Run with `cargo bench --bench traffic --features rate-limit,quota` (quick form: add
//! `-- --warm-up-time 1 --measurement-time 3`).
//!
//! - `traffic/bare`: a `service_fn` returning an empty response.
//! - `traffic/keygate_rate_limit[_no_headers]`: the same behind a `RateLimitLayer` built
//!   without the hub (one policy of 10⁹ per second, never reached), the principal already
//!   in the extensions (as an earlier auth layer leaves it); with and without the
//!   `RateLimit` fields.
//! - `traffic/keygate_quota[_no_headers]`: behind a `QuotaLayer` built without the hub
//!   (batched counting, one daily quota never reached); with the fields and the
//!   `QuotaStatus` extension, and without both.
//! - `traffic/tower_governor[_headers]`: behind tower_governor 0.8's `GovernorLayer` keyed by
//!   peer address (axum's `ConnectInfo` extension), one nanosecond per cell, burst `u32::MAX`;
//!   with `use_headers()` for the `x-ratelimit-*` headers.
//!
//! Each request is built outside the timed section (`iter_batched`) the same way for every
//! variant, and polled once with `now_or_never` (every variant completes on the first poll).
//! Before the runs, the memory per tracked key is printed: RSS growth over a million keys
//! tracked by the rate-limit layer (frozen clock, so none is dropped), and over 100,000 keys
//! held by the quota layer's batched counters.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{
    KeyHasher, KeyId, KeyRecord, ManualClock, Prefix, Principal, QuotaPolicy, QuotaWindow,
    RateLimitPolicy,
};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::PeerIpKeyExtractor;
use tower_governor::GovernorLayer;

async fn empty(_: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::empty()))
}

fn record(id: Option<KeyId>) -> KeyRecord {
    let (_, mut r) = KeyRecord::generate(
        &Prefix::default(),
        &KeyHasher::new(),
        "bench",
        std::time::SystemTime::now(),
    )
    .expect("rng");
    if let Some(id) = id {
        r.id = id;
    }
    r
}

fn request(principal: &Principal) -> Request<Body> {
    let mut req = Request::get("/points")
        .body(Body::empty())
        .expect("request");
    req.extensions_mut()
        .insert(keygate::RequestContext::authenticated(principal.clone()));
    // tower_governor's `PeerIpKeyExtractor` reads axum's `ConnectInfo`.
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [203, 0, 113, 7],
            40_000,
        ))));
    req
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn key_id(n: u64) -> KeyId {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = [b'0'; 12];
    let mut v = n;
    for b in id.iter_mut().rev() {
        *b = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    KeyId::parse(std::str::from_utf8(&id).expect("ascii")).expect("base62")
}

/// Prints the memory per tracked key of both layers.
fn memory_per_key() {
    let clock = ManualClock::at_2026();
    let layer = RateLimitLayer::new(
        RateLimitConfig::new()
            .clock(LimiterClock::manual(clock))
            .headers(false),
    )
    .expect("config");
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(empty);
    let template = record(None);
    const N: u64 = 1_000_000;
    let principals: Vec<Principal> = (0..N)
        .map(|i| {
            let mut r = template.clone();
            r.id = key_id(i);
            Principal::from_record(&r)
        })
        .collect();
    let before = rss_kib();
    for p in &principals {
        let res = svc
            .clone()
            .oneshot(request(p))
            .now_or_never()
            .expect("ready");
        assert_eq!(res.expect("infallible").status(), 200);
    }
    let after = rss_kib();
    assert_eq!(layer.tracked(), N as usize);
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "rate limit: {N} tracked keys, RSS +{} KiB = {:.1} bytes per tracked key",
            a - b,
            (a - b) as f64 * 1024.0 / N as f64
        );
    }

    const Q: u64 = 100_000;
    let quota = QuotaLayer::new(
        QuotaConfig::new(MemoryUsageStore::new())
            .counting(Counting::Batched {
                flush_every: Duration::from_secs(3600),
            })
            .headers(false)
            .status_extension(false),
    )
    .expect("config");
    let handle = quota.handle();
    let qsvc = ServiceBuilder::new().layer(quota).service_fn(empty);
    let qprincipals: Vec<Principal> = (0..Q)
        .map(|i| {
            let mut r = template.clone();
            r.id = key_id(N + i);
            r.quotas = vec![QuotaPolicy::new("daily", 1_000_000, QuotaWindow::Day)];
            Principal::from_record(&r)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let before = rss_kib();
    rt.block_on(async {
        for p in &qprincipals {
            let res = qsvc.clone().oneshot(request(p)).await.expect("infallible");
            assert_eq!(res.status(), 200);
        }
    });
    let after = rss_kib();
    assert_eq!(handle.keys_in_memory(), Q as usize);
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "quota (batched): {Q} keys in memory, RSS +{} KiB = {:.1} bytes per key \
             (counters and the memory usage store together)",
            a - b,
            (a - b) as f64 * 1024.0 / Q as f64
        );
    }
}

/// Times every variant in interleaved rounds (A, B, C, ... A, B, C, ...) and prints each
/// one's median time per request and its median added cost over the bare service in the same
/// round. On a loaded machine this keeps the comparison fair where criterion's separate runs
/// drift apart.
#[allow(clippy::too_many_arguments)]
fn interleaved<A, B, C, D, E, F, G>(
    principal: &Principal,
    bare: &A,
    rl_h: &B,
    rl_n: &C,
    q_h: &D,
    q_n: &E,
    gov: &F,
    gov_h: &G,
) where
    A: tower::Service<Request<Body>> + Clone,
    B: tower::Service<Request<Body>> + Clone,
    C: tower::Service<Request<Body>> + Clone,
    D: tower::Service<Request<Body>> + Clone,
    E: tower::Service<Request<Body>> + Clone,
    F: tower::Service<Request<Body>> + Clone,
    G: tower::Service<Request<Body>> + Clone,
{
    const ROUNDS: usize = 31;
    const PER_ROUND: usize = 20_000;
    fn round<S: tower::Service<Request<Body>> + Clone>(svc: &S, reqs: Vec<Request<Body>>) -> f64 {
        let start = std::time::Instant::now();
        for req in reqs {
            let out = svc.clone().oneshot(req).now_or_never();
            std::hint::black_box(out.is_some());
        }
        start.elapsed().as_nanos() as f64 / PER_ROUND as f64
    }
    let reqs = || {
        (0..PER_ROUND)
            .map(|_| request(principal))
            .collect::<Vec<_>>()
    };
    let names = [
        "bare",
        "keygate_rate_limit",
        "keygate_rate_limit_no_headers",
        "keygate_quota",
        "keygate_quota_no_headers",
        "tower_governor",
        "tower_governor_headers",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        times[0].push(round(bare, reqs()));
        times[1].push(round(rl_h, reqs()));
        times[2].push(round(rl_n, reqs()));
        times[3].push(round(q_h, reqs()));
        times[4].push(round(q_n, reqs()));
        times[5].push(round(gov, reqs()));
        times[6].push(round(gov_h, reqs()));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("interleaved medians ({ROUNDS} rounds of {PER_ROUND} requests; added = median over rounds of variant - bare):");
    for (i, name) in names.iter().enumerate() {
        let added: Vec<f64> = times[i].iter().zip(&times[0]).map(|(t, b)| t - b).collect();
        println!(
            "  {name:32} {:8.1} ns/request, added {:8.1} ns",
            median(times[i].clone()),
            median(added)
        );
    }
}

fn benches(c: &mut Criterion) {
    memory_per_key();

    let mut hot = record(None);
    hot.rate_limits = vec![RateLimitPolicy::per_second("hot", 1_000_000_000)];
    hot.quotas = vec![QuotaPolicy::new(
        "daily",
        1_000_000_000_000,
        QuotaWindow::Day,
    )];
    let principal = Principal::from_record(&hot);

    let bare = service_fn(empty);
    let rl = |headers: bool| {
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(RateLimitConfig::new().headers(headers)).expect("config"))
            .service_fn(empty)
    };
    let quota = |on: bool| {
        ServiceBuilder::new()
            .layer(
                QuotaLayer::new(
                    QuotaConfig::new(MemoryUsageStore::new())
                        .counting(Counting::Batched {
                            flush_every: Duration::from_secs(3600),
                        })
                        .headers(on)
                        .status_extension(on),
                )
                .expect("config"),
            )
            .service_fn(empty)
    };
    let (rl_h, rl_n, q_h, q_n) = (rl(true), rl(false), quota(true), quota(false));
    let governor = |headers: bool| {
        let mut b = GovernorConfigBuilder::default();
        b.per_nanosecond(1).burst_size(u32::MAX);
        let mut b = b.key_extractor(PeerIpKeyExtractor);
        if headers {
            let config = b.use_headers().finish().expect("governor config");
            ServiceBuilder::new()
                .layer(GovernorLayer::new(config))
                .service_fn(empty)
                .boxed_clone()
        } else {
            let config = b.finish().expect("governor config");
            ServiceBuilder::new()
                .layer(GovernorLayer::new(config))
                .service_fn(empty)
                .boxed_clone()
        }
    };
    let (gov, gov_h) = (governor(false), governor(true));

    // Warm every layer (the quota counters load on the first request), and check the
    // outcome is the same 200 everywhere, with the fields where asked.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        fn ok<B>(res: Response<B>) -> Response<B> {
            assert_eq!(res.status(), 200);
            res
        }
        ok(bare.oneshot(request(&principal)).await.expect("ok"));
        let r = ok(rl_h.clone().oneshot(request(&principal)).await.expect("ok"));
        assert!(r.headers().contains_key("ratelimit"));
        ok(rl_n.clone().oneshot(request(&principal)).await.expect("ok"));
        let r = ok(q_h.clone().oneshot(request(&principal)).await.expect("ok"));
        assert!(r.headers().contains_key("ratelimit"));
        ok(q_n.clone().oneshot(request(&principal)).await.expect("ok"));
        ok(gov.clone().oneshot(request(&principal)).await.expect("ok"));
        let r = ok(gov_h
            .clone()
            .oneshot(request(&principal))
            .await
            .expect("ok"));
        assert!(r.headers().contains_key("x-ratelimit-remaining"));
    });
    drop(rt);

    interleaved(&principal, &bare, &rl_h, &rl_n, &q_h, &q_n, &gov, &gov_h);

    let mut g = c.benchmark_group("traffic");
    macro_rules! bench {
        ($name:literal, $svc:expr) => {
            g.bench_function($name, |b| {
                b.iter_batched(
                    || request(&principal),
                    |req| $svc.clone().oneshot(req).now_or_never(),
                    BatchSize::SmallInput,
                )
            });
        };
    }
    bench!("bare", bare);
    bench!("keygate_rate_limit", rl_h);
    bench!("keygate_rate_limit_no_headers", rl_n);
    bench!("keygate_quota", q_h);
    bench!("keygate_quota_no_headers", q_n);
    bench!("tower_governor", gov);
    bench!("tower_governor_headers", gov_h);
    g.finish();
}

criterion_group!(traffic, benches);
criterion_main!(traffic);
