//! In a fused stack, a strict quota's store round trip overlaps the rate limit's (the quota
//! check is speculative): both are in flight at once, the decisions are those of the checks
//! run in order, and what the quota counted for a request an earlier check refused is given
//! back. A check that is not speculative still waits for the rate limit's answer.
//!
//! The backends here are in memory and hold each call at a barrier or record the order of
//! events, so the overlap is observed without measuring time: a stack that ran the two round
//! trips one after the other would never pass the two-party barrier (the test then fails on
//! its timeout).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{Request, Response, StatusCode};
use keygate::check::{Caller, Check};
use keygate::core::rate::{RateBackend, RateDecision, RateError, RateStanding, RateSubject};
use keygate::core::usage::{
    Admission, Increment, Limit, MemoryUsageStore, Usage, UsageError, UsageRecord, UsageStore,
    Window,
};
use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, Clock, Denial, KeyGate, KeyId, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix,
    QuotaPolicy, QuotaWindow, RateLimitPolicy, Verifier,
};
use tokio::sync::{mpsc, Barrier};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request<String>, Response<String>, Infallible>;

/// The longest a test waits for something that should happen at once: reached only when the
/// behaviour under test is wrong.
const STUCK: Duration = Duration::from_secs(20);

/// A rate backend that allows or refuses as told, after the barrier (when set).
#[derive(Clone)]
struct Rate {
    allow: Arc<AtomicBool>,
    barrier: Option<Arc<Barrier>>,
    calls: Arc<AtomicUsize>,
    answered: Arc<AtomicBool>,
    /// Never answers while set.
    hang: Arc<AtomicBool>,
}

#[async_trait]
impl RateBackend for Rate {
    async fn check(
        &self,
        _subject: RateSubject,
        policies: &[RateLimitPolicy],
        _cost: u32,
    ) -> Result<RateDecision, RateError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let allowed = self.allow.load(Ordering::SeqCst);
        let standings = policies
            .iter()
            .map(|p| RateStanding {
                remaining: if allowed { u64::from(p.limit) - 1 } else { 0 },
                reset_after: Duration::from_secs(60),
                wait: Some(if allowed {
                    Duration::ZERO
                } else {
                    Duration::from_secs(7)
                }),
            })
            .collect();
        self.answered.store(true, Ordering::SeqCst);
        Ok(RateDecision { allowed, standings })
    }

    fn refund(&self, _: RateSubject, _: &[RateLimitPolicy], _: u32) {}
}

/// A usage store in memory whose `check_and_add` waits at the barrier (when set), and which
/// reports every `subtract` on a channel.
#[derive(Clone)]
struct Usages {
    inner: MemoryUsageStore,
    barrier: Option<Arc<Barrier>>,
    counted: Arc<AtomicUsize>,
    subtracted: mpsc::UnboundedSender<usize>,
    /// Calls for this id never answer while the flag is set.
    hang: Option<(KeyId, Arc<AtomicBool>)>,
}

#[async_trait]
impl UsageStore for Usages {
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError> {
        self.inner.load(key, windows).await
    }
    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        self.counted.fetch_add(1, Ordering::SeqCst);
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        if let Some((id, on)) = &self.hang {
            if id == key && on.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
        self.inner.check_and_add(key, windows, limits, cost).await
    }
    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        self.inner.add(increments).await
    }
    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError> {
        let r = self.inner.subtract(decrements).await;
        let _ = self.subtracted.send(decrements.len());
        r
    }
    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        self.inner.report(key, from, to).await
    }
}

/// A check that is not speculative: records whether the rate backend had answered when it
/// ran.
#[derive(Clone)]
struct Observer {
    answered: Arc<AtomicBool>,
    saw_answer: Arc<AtomicUsize>,
    ran: Arc<AtomicUsize>,
}

impl Check for Observer {
    type Note = ();
    fn check<B>(&self, _req: &mut Request<B>, _caller: Caller<'_>) -> Result<(), Denial> {
        self.ran.fetch_add(1, Ordering::SeqCst);
        if self.answered.load(Ordering::SeqCst) {
            self.saw_answer.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

struct World {
    svc: Svc,
    key: ApiKey,
    key_id: KeyId,
    clock: ManualClock,
    rate: Rate,
    usage: Usages,
    subtracted: mpsc::UnboundedReceiver<usize>,
    observer: Observer,
    reached: Arc<AtomicUsize>,
    quota: keygate::quota::QuotaHandle,
}

/// A fused stack `rate, auth, scope, [observer], quota` (strict, 2 a day) in front of a
/// service that counts its calls. `barrier`: both round trips wait for each other.
async fn world(barrier: bool, observer: bool) -> World {
    world_counting(barrier, observer, Counting::Strict).await
}

async fn world_counting(barrier: bool, observer: bool, counting: Counting) -> World {
    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "k",
        clock.now(),
    )
    .unwrap();
    record.scopes = vec!["points:read".into()];
    record.resources = vec!["docs".into()];
    record.rate_limits = vec![RateLimitPolicy::per_minute("burst", 100)];
    record.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)];
    store.insert(&record).await.unwrap();

    let barrier = barrier.then(|| Arc::new(Barrier::new(2)));
    let answered = Arc::new(AtomicBool::new(false));
    let rate = Rate {
        allow: Arc::new(AtomicBool::new(true)),
        barrier: barrier.clone(),
        calls: Arc::new(AtomicUsize::new(0)),
        answered: answered.clone(),
        hang: Arc::new(AtomicBool::new(false)),
    };
    let (tx, subtracted) = mpsc::unbounded_channel();
    let usage = Usages {
        inner: MemoryUsageStore::new(),
        barrier,
        counted: Arc::new(AtomicUsize::new(0)),
        subtracted: tx,
        hang: None,
    };
    let rate_layer = RateLimitLayer::new(
        RateLimitConfig::new()
            .anonymous_policies(vec![RateLimitPolicy::per_minute("anonymous", 100)])
            .backend(rate.clone()),
    )
    .unwrap();
    let quota = QuotaLayer::new(
        QuotaConfig::new(usage.clone())
            .counting(counting)
            .clock(clock.clone()),
    )
    .unwrap();
    let rules = RouteScopes::builder()
        .route(
            "POST",
            "/collections/{collection}/points/search",
            "points:read",
        )
        .route("PUT", "/collections/{collection}/points", "points:write")
        .build()
        .unwrap();
    let obs = Observer {
        answered,
        saw_answer: Arc::new(AtomicUsize::new(0)),
        ran: Arc::new(AtomicUsize::new(0)),
    };
    let reached = Arc::new(AtomicUsize::new(0));
    let hits = reached.clone();
    let inner = tower::service_fn(move |_req: Request<String>| {
        hits.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new("ok".to_string())) }
    });
    let scope = ScopeLayer::table(rules);
    let svc = if observer {
        let stack = gate
            .stack()
            .rate(&rate_layer)
            .auth()
            .scope(&scope)
            .check(obs.clone())
            .quota(&quota);
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(stack)
                .service(inner)
                .map_response(drop_body),
        )
    } else {
        let stack = gate
            .stack()
            .rate(&rate_layer)
            .auth()
            .scope(&scope)
            .quota(&quota);
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(stack)
                .service(inner)
                .map_response(drop_body),
        )
    };
    World {
        svc,
        key_id: record.lineage_id(),
        key,
        clock,
        rate,
        usage,
        subtracted,
        observer: obs,
        reached,
        quota: quota.handle(),
    }
}

fn drop_body<B>(r: Response<B>) -> Response<String> {
    r.map(|_| String::new())
}

fn request(method: &str, path: &str, key: Option<&ApiKey>) -> Request<String> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        b = b.header("x-api-key", k.expose_secret());
    }
    let mut req = b.body(String::new()).unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from(([198, 51, 100, 7], 4000)));
    req
}

const SEARCH: &str = "/collections/docs/points/search";

async fn call(w: &World, req: Request<String>) -> Response<String> {
    tokio::time::timeout(STUCK, w.svc.clone().oneshot(req))
        .await
        .expect("the stack never answered: its round trips did not overlap")
        .unwrap()
}

fn code(res: &Response<String>) -> Option<String> {
    res.extensions()
        .get::<Denial>()
        .map(|d| d.code().as_str().to_owned())
}

async fn used(w: &World) -> u64 {
    let day = Window::containing(QuotaWindow::Day, w.clock.now());
    w.usage.inner.load(&w.key_id, &[day]).await.unwrap()[0].cost
}

#[tokio::test]
async fn the_rate_limit_and_the_strict_quota_are_in_flight_at_once() {
    // Each backend waits at a two-party barrier: only concurrent calls get past it.
    let w = world(true, false).await;
    let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(w.reached.load(Ordering::SeqCst), 1);
    // Both checks' fields, joined into one value of each field.
    let policy = res.headers().get_all("ratelimit-policy").iter().count();
    assert_eq!(policy, 1);
    assert_eq!(
        res.headers()["ratelimit-policy"],
        r#""daily";q=2;w=86400, "burst";q=100;w=60"#
    );
    assert_eq!(used(&w).await, 1);
}

#[tokio::test]
async fn a_rate_refusal_gives_back_what_the_quota_counted_meanwhile() {
    let mut w = world(false, false).await;
    w.rate.allow.store(false, Ordering::SeqCst);
    let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code(&res).as_deref(), Some("rate_limited"));
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(w.reached.load(Ordering::SeqCst), 0);
    // The quota counted the request while the rate limit decided, then gave it back.
    assert_eq!(w.usage.counted.load(Ordering::SeqCst), 1);
    // A flush waits for the refund sent in the background.
    w.quota.flush().await.unwrap();
    assert_eq!(w.subtracted.try_recv(), Ok(1), "one window given back");
    assert_eq!(used(&w).await, 0);
    // No quota fields on the rate limit's refusal.
    assert!(!res.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains("daily"));

    // Allowed again: both requests of the day are there to use.
    w.rate.allow.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code(&res).as_deref(), Some("quota_exceeded"));
    assert_eq!(used(&w).await, 2);
    assert_eq!(w.reached.load(Ordering::SeqCst), 2);
    // The rate limit counted every request, the refused ones too.
    assert_eq!(w.rate.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_check_that_refuses_without_io_keeps_the_quota_from_counting() {
    let w = world(false, false).await;
    // The key may only read: scope refuses, without I/O, while the rate limit decides.
    let res = call(&w, request("PUT", "/collections/docs/points", Some(&w.key))).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(code(&res).as_deref(), Some("insufficient_scope"));
    // No request without a key either.
    let res = call(&w, request("POST", SEARCH, None)).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(&res).as_deref(), Some("missing_key"));
    assert_eq!(w.rate.calls.load(Ordering::SeqCst), 2);
    assert_eq!(w.usage.counted.load(Ordering::SeqCst), 0);
    assert_eq!(used(&w).await, 0);
    assert_eq!(w.reached.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_rate_refusal_wins_over_a_scope_refusal_decided_meanwhile() {
    let w = world(false, false).await;
    w.rate.allow.store(false, Ordering::SeqCst);
    let res = call(&w, request("PUT", "/collections/docs/points", Some(&w.key))).await;
    // As separate layers in this order answer: the rate limit, outermost, refuses first.
    assert_eq!(code(&res).as_deref(), Some("rate_limited"));
    assert_eq!(w.usage.counted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_check_that_is_not_speculative_waits_for_the_rate_limit() {
    let w = world(false, true).await;
    let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(w.observer.ran.load(Ordering::SeqCst), 1);
    assert_eq!(w.observer.saw_answer.load(Ordering::SeqCst), 1);
    assert_eq!(used(&w).await, 1);

    // Refused by the rate limit: the custom check never runs, nothing is counted.
    w.rate.allow.store(false, Ordering::SeqCst);
    let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
    assert_eq!(code(&res).as_deref(), Some("rate_limited"));
    assert_eq!(w.observer.ran.load(Ordering::SeqCst), 1);
    assert_eq!(w.usage.counted.load(Ordering::SeqCst), 1);
    assert_eq!(used(&w).await, 1);
}

/// A request whose future is dropped while the rate limit's answer is pending (a client
/// gone) was never served: what the quota counted meanwhile is given back.
#[tokio::test]
async fn a_request_dropped_while_the_rate_limit_decides_is_not_charged() {
    use futures_util::FutureExt;
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        let w = world_counting(false, false, counting).await;
        // One request served: counted.
        let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
        assert_eq!(res.status(), StatusCode::OK);
        w.rate.hang.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            // Polled once (the quota counts, the rate limit hangs), then dropped.
            let pending = w
                .svc
                .clone()
                .oneshot(request("POST", SEARCH, Some(&w.key)))
                .now_or_never();
            assert!(
                pending.is_none(),
                "{counting:?}: the rate limit never answers"
            );
        }
        w.quota.flush().await.unwrap();
        assert_eq!(used(&w).await, 1, "{counting:?}: only the request served");
        // The key still has its second request of the day.
        w.rate.hang.store(false, Ordering::SeqCst);
        let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
        assert_eq!(res.status(), StatusCode::OK, "{counting:?}");
        let res = call(&w, request("POST", SEARCH, Some(&w.key))).await;
        assert_eq!(
            code(&res).as_deref(),
            Some("quota_exceeded"),
            "{counting:?}"
        );
        w.quota.flush().await.unwrap();
        assert_eq!(used(&w).await, 2, "{counting:?}");
        assert_eq!(w.reached.load(Ordering::SeqCst), 2, "{counting:?}");
    }
}

/// A key whose quota is shared with its identity is counted twice, the key's windows then
/// the identity's: a request dropped in between gives the key's count back.
#[tokio::test]
async fn a_request_dropped_between_the_key_and_identity_counts_is_not_charged() {
    use futures_util::FutureExt;
    use keygate::Identity;

    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    let mut etl = Identity::new("etl", clock.now());
    etl.quotas = vec![QuotaPolicy::new("etl-daily", 5, QuotaWindow::Day)];
    store.insert_identity(&etl).await.unwrap();
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "k",
        clock.now(),
    )
    .unwrap();
    record.identity = Some("etl".into());
    record.quotas = vec![QuotaPolicy::new("own", 100, QuotaWindow::Month)];
    store.insert(&record).await.unwrap();
    let hang = Arc::new(AtomicBool::new(true));
    let (tx, _rx) = mpsc::unbounded_channel();
    let usage = Usages {
        inner: MemoryUsageStore::new(),
        barrier: None,
        counted: Arc::new(AtomicUsize::new(0)),
        subtracted: tx,
        hang: Some((Identity::usage_id("etl"), hang.clone())),
    };
    let quota = QuotaLayer::new(
        QuotaConfig::new(usage.clone())
            .counting(Counting::Strict)
            .clock(clock.clone()),
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(gate.stack().auth().quota(&quota))
        .service(tower::service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let month = Window::containing(QuotaWindow::Month, clock.now());
    let day = Window::containing(QuotaWindow::Day, clock.now());
    let own = |u: &Usages| {
        let u = u.inner.clone();
        let id = record.lineage_id();
        async move { u.load(&id, &[month]).await.unwrap()[0].requests }
    };
    // The key's month is counted, the identity's day never answers: dropped.
    let pending = svc
        .clone()
        .oneshot(request("POST", SEARCH, Some(&key)))
        .now_or_never();
    assert!(pending.is_none());
    assert_eq!(
        usage.counted.load(Ordering::SeqCst),
        2,
        "both counts were asked"
    );
    quota.handle().flush().await.unwrap();
    assert_eq!(own(&usage).await, 0, "the key's count was given back");

    hang.store(false, Ordering::SeqCst);
    let res = svc
        .clone()
        .oneshot(request("POST", SEARCH, Some(&key)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(own(&usage).await, 1);
    let shared = usage
        .inner
        .load(&Identity::usage_id("etl"), &[day])
        .await
        .unwrap()[0];
    assert_eq!(shared.requests, 1);
}
