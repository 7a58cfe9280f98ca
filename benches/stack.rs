//! The performance report, in one run: each layer alone and the full six-layer
//! stack against the bare service, the peers (tower-http's bearer check, tower_governor),
//! per-request latency percentiles, multi-thread throughput, and cached verification at
//! 1k, 100k and 1M keys.
//!
//! ```text
//! cargo bench --all-features --bench stack
//! cargo bench --all-features --bench stack -- --warm-up-time 1 --measurement-time 2   # quicker
//! ```
//!
//! Every request is one `oneshot` on a clone of the service (as axum does per request),
//! polled once with `now_or_never`: every variant completes on its first poll (a pending
//! future would be driven to the end on the calling thread and counted, so nothing is
//! skipped). Requests
//! are built outside the timed part, the same way for every variant:
//! `POST /collections/docs/points/search` with `Authorization: Bearer <key>`, three common
//! headers, and the peer address as axum's `ConnectInfo` and a `SocketAddr` extension.
//!
//! Variants (`stack/*` in criterion; the same names in the printed tables):
//! - `bare`: a `service_fn` answering an empty 200.
//! - `auth`: `ApiKeyAuthLayer` from the hub; `tower_http_bearer`: tower-http's
//!   `ValidateRequestHeaderLayer::bearer` with the same token (the peer).
//! - `scope`, `ip`, `rate_limit`, `quota`, `audit`: each layer alone on a request that
//!   already carries the resolved `Principal` (what the layer adds behind an auth layer);
//!   `tower_governor`: tower_governor's `GovernorLayer` keyed by peer address (the peer of
//!   `rate_limit`).
//! - `full_stack`: audit → auth → ip → scope (a 13-rule Qdrant route table) → rate limit →
//!   quota → handler, all from one hub, from the raw key.
//! - `fused_stack`: the same six as one fused stack (`KeyGate::stack`): the audit layer
//!   around one service running the auth, ip, scope, rate-limit and quota checks, with one
//!   response future.
//!
//! Policies are never reached (limits of 10⁹), headers are on (`RateLimit` fields), the
//! quota counts in memory in batches, and the audit layer hands each event to a queued
//! `Auditor` whose writer thread discards it (the file sink's throughput is `benches/audit.rs`).
//!
//! After criterion's groups, four printed reports (`KEYGATE_ALLOCS=1` prints only the
//! first; it needs no release build: `KEYGATE_ALLOCS=1 cargo test --all-features --bench
//! stack`; add `KEYGATE_INNER_HEADER=1` for an inner service whose response has a header):
//! - **allocations**: allocations (and reallocations) per request of every variant, counted
//!   by a counting global allocator over 10,000 requests built beforehand.
//! - **latency**: 20 interleaved rounds of 10,000 requests per variant, each request timed
//!   on its own (`Instant`, ~20 ns of timer cost in every variant alike); p50 and p99 per
//!   variant and added over `bare`.
//! - **throughput**: both stacks and the bare service driven by 1 and 2 OS threads for
//!   3 s each, on one hot key and on 10,000 keys; requests/s and the stack/bare ratio.
//! - **verify scaling**: `Verifier::lookup` of a cached key with 1k, 100k and 1M keys in
//!   the cache (1,000 hot keys, and 10,000 keys spread over the map).

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use criterion::{BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use keygate::core::audit::{AuditError, AuditEvent, AuditSink, Auditor};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, KeyGate, KeyHasher, KeyRecord, KeyStore, Lookup, MemoryStore, Prefix, Principal,
    QuotaPolicy, QuotaWindow, RateLimitPolicy, Verifier,
};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::PeerIpKeyExtractor;
use tower_governor::GovernorLayer;
use tower_http::validate_request::ValidateRequestHeaderLayer;

/// Counts every allocation (and reallocation) of the process, for the allocation report.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Discards events: the request path's cost is measured, not the sink's.
struct Discard;

impl AuditSink for Discard {
    fn record(&self, _: &AuditEvent) -> Result<(), AuditError> {
        Ok(())
    }
}

/// The inner service: an empty 200. With `KEYGATE_INNER_HEADER=1` its response carries a
/// `content-type`, as a real service's does; its header map is then allocated by the service
/// (in `bare` too), not by the first field keygate writes.
async fn empty(_: Request<Body>) -> Result<Response<Body>, Infallible> {
    static WITH_HEADER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let mut res = Response::new(Body::empty());
    if *WITH_HEADER.get_or_init(|| std::env::var_os("KEYGATE_INNER_HEADER").is_some()) {
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    Ok(res)
}

const PEER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7)),
    40_000,
);

/// The hub, one hot key and 10,000 other keys, all cached.
struct World {
    gate: KeyGate,
    hot: ApiKey,
    hot_principal: Principal,
    many: Vec<ApiKey>,
    rules: RouteScopes,
    auditor: Auditor,
    _rt: tokio::runtime::Runtime,
}

fn record(hasher: &KeyHasher) -> (ApiKey, KeyRecord) {
    let (key, mut r) =
        KeyRecord::generate(&Prefix::default(), hasher, "bench", SystemTime::now()).expect("rng");
    r.owner = Some("acme-search".into());
    r.scopes = vec!["points:read".into(), "collections:read".into()];
    r.resources = vec!["docs".into(), "docs-*".into()];
    r.attributes.insert("tenant".into(), "acme".into());
    r.allowed_ips = vec!["198.51.100.0/24".parse().expect("cidr")];
    r.quotas = vec![QuotaPolicy::new(
        "daily",
        1_000_000_000_000,
        QuotaWindow::Day,
    )];
    (key, r)
}

/// The Qdrant REST routes of the showcase.
fn rules() -> RouteScopes {
    RouteScopes::builder()
        .route("GET", "/collections", "collections:read")
        .route("GET", "/collections/{collection}", "collections:read")
        .route("PUT", "/collections/{collection}", "collections:manage")
        .route("DELETE", "/collections/{collection}", "collections:manage")
        .route(
            "GET",
            "/collections/{collection}/exists",
            "collections:read",
        )
        .route("PUT", "/collections/{collection}/points", "points:write")
        .route(
            "GET",
            "/collections/{collection}/points/{id}",
            "points:read",
        )
        .route(
            "POST",
            "/collections/{collection}/points/delete",
            "points:write",
        )
        .reads(
            "POST",
            [
                "/collections/{collection}/points",
                "/collections/{collection}/points/search",
                "/collections/{collection}/points/query",
                "/collections/{collection}/points/scroll",
                "/collections/{collection}/points/count",
            ],
            "points:read",
        )
        .build()
        .expect("rules")
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let store = MemoryStore::new();
        let verifier = Verifier::new(store.clone());
        let gate = KeyGate::new(verifier);
        let hasher = gate.verifier().hasher().clone();
        let (hot, r) = record(&hasher);
        let mut records = vec![r];
        let mut many = Vec::new();
        for _ in 0..10_000 {
            let (k, r) = record(&hasher);
            records.push(r);
            many.push(k);
        }
        let hot_principal = rt.block_on(async {
            for r in &records {
                store.insert(r).await.expect("insert");
            }
            gate.verifier().preload().await.expect("preload");
            gate.verifier()
                .verify(hot.expose_secret())
                .await
                .expect("hot key")
        });
        let auditor = {
            let _g = rt.enter();
            Auditor::builder().spawn(Discard).expect("auditor")
        };
        World {
            gate,
            hot,
            hot_principal,
            many,
            rules: rules(),
            auditor,
            _rt: rt,
        }
    }

    fn request(&self, key: &ApiKey, resolved: bool) -> Request<Body> {
        let mut req = Request::post("/collections/docs/points/search")
            .header("host", "127.0.0.1:6333")
            .header("user-agent", "qdrant-client/1.12")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", key.expose_secret()))
            .body(Body::empty())
            .expect("request");
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(PEER));
        req.extensions_mut().insert(PEER);
        if resolved {
            req.extensions_mut()
                .insert(keygate::RequestContext::authenticated(
                    self.hot_principal.clone(),
                ));
        }
        req
    }

    fn rate_config(&self) -> RateLimitConfig {
        RateLimitConfig::new()
            .default_policies([RateLimitPolicy::per_second("default", 1_000_000_000)])
            .headers(true)
    }

    fn quota_config(&self) -> QuotaConfig {
        QuotaConfig::new(MemoryUsageStore::new())
    }
}

/// Drives one request: polled once; a future that is not ready yet is counted and finished
/// on this thread (none is expected: the count printed at the end shows it).
fn drive<F: Future>(fut: F, pending: &AtomicU64) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().now_or_never() {
        Some(out) => out,
        None => {
            pending.fetch_add(1, Ordering::Relaxed);
            futures_executor_block_on(fut)
        }
    }
}

/// A minimal block_on (tokio's needs a runtime handle the caller may not be in).
fn futures_executor_block_on<F: Future>(mut fut: std::pin::Pin<&mut F>) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Sends one request through a variant's service (counting requests not ready at once).
/// Answers the response's status; the response itself is dropped inside (as a server drops
/// it once written), alike for every variant.
type Driver = Box<dyn Fn(Request<Body>, &AtomicU64) -> http::StatusCode + Send + Sync>;

/// The variants, each as a clonable service plus whether its requests carry the principal.
struct Variant {
    name: &'static str,
    resolved: bool,
    svc: Driver,
}

fn variant<S, B>(name: &'static str, resolved: bool, svc: S) -> Variant
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    Variant {
        name,
        resolved,
        svc: Box::new(move |req, pending| {
            let res = drive(svc.clone().oneshot(req), pending);
            match res {
                Ok(r) => r.status(),
                Err(e) => match e {},
            }
        }),
    }
}

fn full_stack(w: &World) -> Variant {
    let g = &w.gate;
    variant(
        "full_stack",
        false,
        ServiceBuilder::new()
            .layer(g.audit_layer(w.auditor.clone()))
            .layer(g.auth_layer())
            .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(g))
            .layer(ScopeLayer::table(w.rules.clone()).with_gate(g))
            .layer(
                RateLimitLayer::new(w.rate_config())
                    .expect("rate")
                    .with_gate(g),
            )
            .layer(
                QuotaLayer::new(w.quota_config())
                    .expect("quota")
                    .with_gate(g),
            )
            .service_fn(empty),
    )
}

/// The same six checks as `full_stack`, fused: one service, one response future, the audit
/// layer around it.
fn fused_stack(w: &World) -> Variant {
    let g = &w.gate;
    let ip = IpAllowLayer::new(IpPolicy::new());
    let scope = ScopeLayer::table(w.rules.clone());
    let rate = RateLimitLayer::new(w.rate_config())
        .expect("rate")
        .with_gate(g);
    let quota = QuotaLayer::new(w.quota_config())
        .expect("quota")
        .with_gate(g);
    variant(
        "fused_stack",
        false,
        ServiceBuilder::new()
            .layer(
                g.stack()
                    .auth()
                    .ip(&ip)
                    .scope(&scope)
                    .rate(&rate)
                    .quota(&quota)
                    .audit(w.auditor.clone()),
            )
            .service_fn(empty),
    )
}

fn variants(w: &World) -> Vec<Variant> {
    let g = &w.gate;
    let governor = Arc::new(
        GovernorConfigBuilder::default()
            .per_nanosecond(1)
            .burst_size(u32::MAX)
            .key_extractor(PeerIpKeyExtractor)
            .use_headers()
            .finish()
            .expect("governor config"),
    );
    vec![
        variant("bare", false, service_fn(empty)),
        variant("auth", false, g.auth_layer().layer(service_fn(empty))),
        variant(
            "tower_http_bearer",
            false,
            #[allow(deprecated)]
            ValidateRequestHeaderLayer::bearer(w.hot.expose_secret()).layer(service_fn(empty)),
        ),
        variant(
            "scope",
            true,
            ScopeLayer::table(w.rules.clone()).layer(service_fn(empty)),
        ),
        variant(
            "ip",
            true,
            IpAllowLayer::new(IpPolicy::new().deny(["192.0.2.0/24"]).expect("cidr"))
                .layer(service_fn(empty)),
        ),
        variant(
            "rate_limit",
            true,
            RateLimitLayer::new(w.rate_config())
                .expect("rate")
                .layer(service_fn(empty)),
        ),
        variant(
            "tower_governor",
            true,
            GovernorLayer::new(governor).layer(service_fn(empty)),
        ),
        variant(
            "quota",
            true,
            QuotaLayer::new(w.quota_config())
                .expect("quota")
                .layer(service_fn(empty)),
        ),
        variant(
            "audit",
            true,
            keygate::audit::AuditLayer::new(w.auditor.clone()).layer(service_fn(empty)),
        ),
        full_stack(w),
        fused_stack(w),
    ]
}

/// Allocations per request of every variant (a counting global allocator; requests are
/// built before counting starts, and the response is dropped inside, as in the timed runs).
/// The audit writer thread's work on an event (none with the discarding sink) would count
/// too.
fn allocation_report(w: &World, vs: &[Variant], pending: &AtomicU64) {
    const N: u64 = 10_000;
    println!("\nallocations per request ({N} requests per variant, after warm-up)");
    println!("{:<18} {:>10} {:>12}", "variant", "allocs", "added");
    let mut base = None;
    for v in vs {
        for _ in 0..1_000 {
            black_box((v.svc)(w.request(&w.hot, v.resolved), pending));
        }
        let reqs: Vec<_> = (0..N).map(|_| w.request(&w.hot, v.resolved)).collect();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for req in reqs {
            black_box((v.svc)(req, pending));
        }
        let per = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64;
        let b = *base.get_or_insert(per);
        println!("{:<18} {:>10.2} {:>12.2}", v.name, per, per - b);
    }
}

fn check_statuses(w: &World, vs: &[Variant], pending: &AtomicU64) {
    for v in vs {
        let res = (v.svc)(w.request(&w.hot, v.resolved), pending);
        assert_eq!(res, 200, "{} answered {}", v.name, res);
    }
}

fn criterion_groups(c: &mut Criterion, w: &World, vs: &[Variant], pending: &AtomicU64) {
    let mut group = c.benchmark_group("stack");
    for v in vs {
        group.bench_function(v.name, |b| {
            b.iter_batched(
                || w.request(&w.hot, v.resolved),
                |req| black_box((v.svc)(req, pending)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency_report(w: &World, vs: &[Variant], pending: &AtomicU64) {
    const ROUNDS: usize = 20;
    const N: usize = 10_000;
    let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(ROUNDS * N); vs.len()];
    for _ in 0..ROUNDS {
        for (v, out) in vs.iter().zip(samples.iter_mut()) {
            let reqs: Vec<_> = (0..N).map(|_| w.request(&w.hot, v.resolved)).collect();
            for req in reqs {
                let t = Instant::now();
                let res = (v.svc)(req, pending);
                let ns = t.elapsed().as_nanos() as u64;
                black_box(res);
                out.push(ns);
            }
        }
    }
    let stats: Vec<(u64, u64)> = samples
        .iter_mut()
        .map(|s| {
            s.sort_unstable();
            (percentile(s, 0.5), percentile(s, 0.99))
        })
        .collect();
    let (b50, b99) = stats[0];
    println!("\nlatency per request ({ROUNDS} interleaved rounds x {N} requests per variant)");
    println!(
        "{:<18} {:>8} {:>8} {:>12} {:>12}",
        "variant", "p50 ns", "p99 ns", "added p50", "added p99"
    );
    for (v, (p50, p99)) in vs.iter().zip(&stats) {
        println!(
            "{:<18} {:>8} {:>8} {:>12} {:>12}",
            v.name,
            p50,
            p99,
            *p50 as i64 - b50 as i64,
            *p99 as i64 - b99 as i64
        );
    }
    let find = |n: &str| vs.iter().position(|v| v.name == n).map(|i| stats[i]);
    if let (Some(a), Some(t)) = (find("auth"), find("tower_http_bearer")) {
        println!(
            "auth / tower_http_bearer (added p50): {:.2}x",
            (a.0 - b50) as f64 / (t.0.saturating_sub(b50)).max(1) as f64
        );
    }
    if let (Some(r), Some(t)) = (find("rate_limit"), find("tower_governor")) {
        println!(
            "rate_limit / tower_governor (added p50): {:.2}x",
            (r.0 - b50) as f64 / (t.0.saturating_sub(b50)).max(1) as f64
        );
    }
}

/// Requests per second over `threads` OS threads for `secs`.
fn throughput(w: &World, v: &Variant, threads: usize, keys: &[&ApiKey], secs: f64) -> f64 {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let pending = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, total, pending) = (&stop, &total, &pending);
            s.spawn(move || {
                let mut n = 0u64;
                let mut i = t * 7919;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let key = keys[i % keys.len()];
                        i += 1;
                        black_box((v.svc)(w.request(key, v.resolved), pending));
                    }
                    n += 64;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / secs
}

fn throughput_report(w: &World, vs: &[Variant]) {
    let bare = vs.iter().find(|v| v.name == "bare").expect("bare");
    let stack = vs
        .iter()
        .find(|v| v.name == "full_stack")
        .expect("full_stack");
    let fused = vs
        .iter()
        .find(|v| v.name == "fused_stack")
        .expect("fused_stack");
    let hot = [&w.hot];
    let many: Vec<&ApiKey> = w.many.iter().collect();
    println!("\nthroughput, requests/s (3 s each; request building included in both)");
    println!(
        "{:<10} {:<8} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "keys", "threads", "bare", "full_stack", "ratio", "fused_stack", "ratio"
    );
    for (label, keys) in [("1 hot", &hot[..]), ("10,000", &many[..])] {
        for threads in [1, 2] {
            let b = throughput(w, bare, threads, keys, 3.0);
            let s = throughput(w, stack, threads, keys, 3.0);
            let f = throughput(w, fused, threads, keys, 3.0);
            println!(
                "{:<10} {:<8} {:>12.0} {:>12.0} {:>7.1}% {:>12.0} {:>7.1}%",
                label,
                threads,
                b,
                s,
                100.0 * s / b,
                f,
                100.0 * f / b
            );
        }
    }
}

fn verify_scaling() {
    println!("\ncached verification (Verifier::lookup), keys in the cache");
    println!(
        "{:<10} {:>14} {:>14} {:>10}",
        "keys", "1k hot p50", "10k spread p50", "vs 1k"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let hasher = KeyHasher::new();
    let store = MemoryStore::new();
    let mut sample: Vec<ApiKey> = Vec::new();
    let mut have = 0usize;
    let mut base = None;
    for n in [1_000usize, 100_000, 1_000_000] {
        rt.block_on(async {
            let mut batch = Vec::new();
            while have < n {
                let (k, r) = record(&hasher);
                if sample.len() < 10_000 && have.is_multiple_of((n / 10_000).max(1)) {
                    sample.push(k);
                }
                batch.push(r);
                have += 1;
            }
            for r in &batch {
                store.insert(r).await.expect("insert");
            }
        });
        let verifier = Verifier::builder(store.clone())
            .hasher(hasher.clone())
            .build();
        rt.block_on(verifier.preload()).expect("preload");
        let measure = |keys: &[ApiKey]| {
            let mut best = u64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let mut it = 0u64;
                for _ in 0..20 {
                    for k in keys {
                        match verifier.lookup(k.expose_secret()) {
                            Lookup::Done(Ok(p)) => {
                                black_box(p);
                            }
                            _ => panic!("a cached key did not verify"),
                        }
                        it += 1;
                    }
                }
                best = best.min(t.elapsed().as_nanos() as u64 / it);
            }
            best
        };
        let hot = measure(&sample[..sample.len().min(1_000)]);
        let spread = measure(&sample);
        let b = *base.get_or_insert(hot);
        println!(
            "{:<10} {:>11} ns {:>11} ns {:>9.2}x",
            n,
            hot,
            spread,
            hot as f64 / b as f64
        );
    }
}

fn main() {
    let w = World::new();
    let vs = variants(&w);
    let pending = AtomicU64::new(0);
    check_statuses(&w, &vs, &pending);
    // `KEYGATE_PROFILE=<variant>`: only drive that variant 100,000 times (for callgrind or
    // perf: `valgrind --tool=callgrind target/release/deps/stack-* --bench`). Instructions
    // per request: the inclusive count of `stack::variant::{{closure}}` / 100,000, minus
    // `bare`'s (whole-program totals move with the random keys of the setup).
    if std::env::var_os("KEYGATE_ALLOCS").is_some() {
        allocation_report(&w, &vs, &pending);
        return;
    }
    if let Ok(name) = std::env::var("KEYGATE_PROFILE") {
        let v = vs.iter().find(|v| v.name == name).expect("no such variant");
        for _ in 0..100_000 {
            black_box((v.svc)(w.request(&w.hot, v.resolved), &pending));
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &w, &vs, &pending);
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    allocation_report(&w, &vs, &pending);
    latency_report(&w, &vs, &pending);
    throughput_report(&w, &vs);
    verify_scaling();
    let stats = w.auditor.stats();
    println!(
        "\nchecks: requests that were not ready on the first poll: {}; audit events written {}, dropped {}",
        pending.load(Ordering::Relaxed),
        stats.written,
        stats.dropped
    );
    c.final_summary();
}
