//! Outages: cached keys keep working within the verifier's staleness bound
//! (`refresh_after + max_stale`), a cache miss answers 503 `store_unavailable` through the
//! real auth layer, and the service recovers by itself when the database returns.
//!
//! PostgreSQL is cut by a TCP proxy in the test (it drops every connection and closes new
//! ones), or stalled by it (connections stay open, nothing is forwarded). SQLite has no network to cut: its outages are a closed pool (permanent) and a
//! write lock held by another connection (transient).

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::{Denial, DenialCode, KeyGate, ManualClock};
use keygate_core::{KeyHasher, KeyStatus, KeyStore, StoreError, Verifier};
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;

const REFRESH: Duration = Duration::from_secs(10);
const MAX_STALE: Duration = Duration::from_secs(20);

/// The auth layer of `gate` in front of a 200 service.
fn app(
    gate: &KeyGate,
) -> impl Service<
    Req,
    Response = Response<keygate::reject::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service(tower::service_fn(|_req: Req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }))
}

/// Status and denial code of one request with `key`.
async fn call<S>(svc: &S, key: &str) -> (StatusCode, Option<DenialCode>, Option<String>)
where
    S: Service<
            Req,
            Response = Response<keygate::reject::ResponseBody<Full<Bytes>>>,
            Error = Infallible,
        > + Clone,
{
    let req = Request::get("/")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    (
        res.status(),
        res.extensions().get::<Denial>().map(Denial::code),
        res.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_through_a_proxy() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    let proxy = Proxy::start(pg_addr(&pg.url)).await;
    let serving = db_open_via(&db, &with_addr(&pg.url, proxy.addr)).await;
    let admin = db.open().await;
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(serving.clone())
        .clock(clock.clone())
        .refresh_after(REFRESH)
        .max_stale(MAX_STALE)
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let gate = KeyGate::new(verifier.clone());
    let svc = app(&gate);
    let h = KeyHasher::new();
    let (a_key, a) = plain(&h, "cached", SystemTime::now());
    let (b_key, b) = plain(&h, "never-cached", SystemTime::now());
    admin.insert(&a).await.unwrap();
    admin.insert(&b).await.unwrap();
    // The follower has seen the inserts (so it will not invalidate A after it is cached).
    follower.caught_up(admin.last_change().await.unwrap()).await;
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);
    poll_until(
        Duration::from_secs(10),
        "the listener to connect",
        || async { follower.is_listening().then_some(()) },
    )
    .await;

    // The database goes away.
    proxy.set_on(false);
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);
    let start = Instant::now();
    let (status, code, retry) = call(&svc, b_key.expose_secret()).await;
    let miss_time = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, Some(DenialCode::StoreUnavailable));
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(miss_time < Duration::from_secs(3), "{miss_time:?}");
    println!("postgres: a cache miss during the outage was answered 503 in {miss_time:?}");
    poll_until(
        Duration::from_secs(10),
        "the follower to notice",
        || async { (!follower.is_listening() && follower.failures() > 0).then_some(()) },
    )
    .await;

    // Past refresh_after but within max_stale: the failed refresh falls back to the cache.
    clock.advance(REFRESH + Duration::from_secs(5));
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);
    // Past the staleness bound: fail closed.
    clock.advance(MAX_STALE);
    let (status, code, _) = call(&svc, a_key.expose_secret()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, Some(DenialCode::StoreUnavailable));

    // Meanwhile an administrator revokes B on the database directly.
    let mut b_revoked = b.clone();
    b_revoked.status = KeyStatus::Revoked;
    admin.update(&b_revoked).await.unwrap();

    // The database returns: everything recovers without a restart.
    proxy.set_on(true);
    let (_, recovered) = poll_until(Duration::from_secs(10), "A to work again", || async {
        (call(&svc, a_key.expose_secret()).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    println!("postgres: served again {recovered:?} after the database returned");
    let (status, code, _) = call(&svc, b_key.expose_secret()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(code, Some(DenialCode::RevokedKey));
    poll_until(
        Duration::from_secs(10),
        "the follower to recover",
        || async { (follower.is_listening() && follower.failures() == 0).then_some(()) },
    )
    .await;

    // And propagation is back to its bound.
    let mut a_revoked = a.clone();
    a_revoked.status = KeyStatus::Revoked;
    let start = Instant::now();
    admin.update(&a_revoked).await.unwrap();
    let (_, took) = poll_until(Duration::from_millis(200), "A's revocation", || async {
        (call(&svc, a_key.expose_secret()).await.1 == Some(DenialCode::RevokedKey)).then_some(())
    })
    .await;
    println!(
        "postgres: after recovery a revocation propagated in {:?}",
        start.elapsed().max(took)
    );
    follower.shutdown().await;
}

async fn db_open_via(db: &Db, url: &str) -> keygate_sql::SqlStore {
    keygate_sql::SqlStore::open_with(
        url,
        db.options()
            .acquire_timeout(Duration::from_millis(500))
            .operation_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("open through the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_closed_pool_fails_closed() {
    let db = Db::sqlite();
    let store = db.open().await;
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(store.clone())
        .clock(clock.clone())
        .refresh_after(REFRESH)
        .max_stale(MAX_STALE)
        .build();
    let follower = store.watch(&verifier).await.unwrap();
    let gate = KeyGate::new(verifier.clone());
    let svc = app(&gate);
    let h = KeyHasher::new();
    let (a_key, a) = plain(&h, "cached", SystemTime::now());
    let (b_key, b) = plain(&h, "never-cached", SystemTime::now());
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    follower.poll_now();
    follower.caught_up(store.last_change().await.unwrap()).await;
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);

    store.close().await;
    assert!(store.is_closed());
    assert!(matches!(
        store.get(&a.id).await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);
    let (status, code, _) = call(&svc, b_key.expose_secret()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, Some(DenialCode::StoreUnavailable));
    follower.poll_now();
    poll_until(Duration::from_secs(5), "the follower to notice", || async {
        (follower.failures() > 0).then_some(())
    })
    .await;
    clock.advance(REFRESH + Duration::from_secs(5));
    assert_eq!(call(&svc, a_key.expose_secret()).await.0, StatusCode::OK);
    clock.advance(MAX_STALE);
    let (status, code, _) = call(&svc, a_key.expose_secret()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, Some(DenialCode::StoreUnavailable));
    follower.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_lock_is_transient() {
    use sqlx::{ConnectOptions, Connection, Executor};
    use std::str::FromStr;

    let db = Db::sqlite();
    let store = db
        .open_with(db.options().busy_timeout(Duration::from_millis(200)))
        .await;
    let h = KeyHasher::new();
    let (key, mut rec) = plain(&h, "k", SystemTime::now());
    store.insert(&rec).await.unwrap();

    // Another process-like connection takes the write lock and keeps it.
    let mut locker = sqlx::sqlite::SqliteConnectOptions::from_str(db.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    locker.execute("BEGIN IMMEDIATE").await.unwrap();

    rec.status = KeyStatus::Disabled;
    let start = Instant::now();
    match store.update(&rec).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("update"), "{msg}"),
        r => panic!("expected Unavailable, got {r:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    // Readers are not blocked (WAL): a verifier's cache miss still answers.
    let verifier = Verifier::new(store.clone());
    verifier.verify(key.expose_secret()).await.unwrap();

    locker.execute("ROLLBACK").await.unwrap();
    locker.close().await.unwrap();
    store.update(&rec).await.unwrap();
    assert_eq!(
        store.get(&rec.id).await.unwrap().unwrap().status,
        KeyStatus::Disabled
    );
}

/// A database that keeps connections open but stops answering (a hung server, a black
/// hole): every operation gives up within the operation timeout, a cache miss answers 503,
/// and service recovers when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hung_database_times_out() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    let proxy = Proxy::start(pg_addr(&pg.url)).await;
    let serving = keygate_sql::SqlStore::open_with(
        &with_addr(&pg.url, proxy.addr),
        db.options()
            .acquire_timeout(Duration::from_millis(300))
            .operation_timeout(Duration::from_millis(700)),
    )
    .await
    .expect("open through the proxy");
    let admin = db.open().await;
    let verifier = Verifier::new(serving.clone());
    let gate = KeyGate::new(verifier.clone());
    let svc = app(&gate);
    let (key, rec) = plain(&KeyHasher::new(), "k", SystemTime::now());
    admin.insert(&rec).await.unwrap();

    proxy.set(Mode::Stall);
    let start = Instant::now();
    let (status, code, _) = call(&svc, key.expose_secret()).await;
    let took = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, Some(DenialCode::StoreUnavailable));
    assert!(took < Duration::from_secs(3), "{took:?}");
    println!("postgres: a cache miss against a hung database was answered 503 in {took:?}");
    let start = Instant::now();
    assert!(matches!(
        serving.list(&Default::default()).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        serving
            .insert(&plain(&KeyHasher::new(), "x", SystemTime::now()).1)
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(start.elapsed() < Duration::from_secs(5));

    proxy.set(Mode::On);
    poll_until(Duration::from_secs(10), "the key to work again", || async {
        (call(&svc, key.expose_secret()).await.0 == StatusCode::OK).then_some(())
    })
    .await;
}
