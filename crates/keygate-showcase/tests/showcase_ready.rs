//! The showcase's `/readyz`: open and unlimited, so it answers from a cache and asks the key
//! store at most once per [`READY_CACHE`](showcase_support::server::READY_CACHE) of the
//! hub's (manual) clock, however many callers come.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use keygate::core::audit::{Auditor, MemorySink};
use keygate_testkit::store::CountingStore;
use showcase_support::*;

#[tokio::test]
async fn readyz_asks_the_key_store_at_most_once_a_second() {
    let store = CountingStore::new();
    let sink = MemorySink::new();
    let w = World::with_store(store.clone(), Auditor::direct(sink.clone()), sink, |o| o).await;
    let ready = || w.call("GET", "/readyz", None, None);

    let before = store.gets();
    for _ in 0..50 {
        assert_eq!(ready().await.status, StatusCode::OK);
    }
    // Concurrent callers share the one query too.
    let addr = w.addr;
    let answers = futures_join(20, move || call(addr, "GET", "/readyz", None, None)).await;
    assert!(answers.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(store.gets() - before, 1, "one store query for 70 calls");

    // An outage shows once the cached answer is a second old, and not before.
    store.set_down(true);
    w.clock.advance(Duration::from_millis(999));
    assert_eq!(ready().await.status, StatusCode::OK);
    assert_eq!(store.gets() - before, 1);
    w.clock.advance(Duration::from_millis(1));
    let r = ready().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.text, "the key store is unavailable");
    for _ in 0..10 {
        assert_eq!(ready().await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(store.gets() - before, 2);
    store.set_down(false);
    w.clock.advance(Duration::from_secs(1));
    assert_eq!(ready().await.status, StatusCode::OK);
    assert_eq!(store.gets() - before, 3);
}

/// Runs `n` calls of `f` at once; their statuses.
async fn futures_join<F, Fut>(n: usize, f: F) -> Vec<StatusCode>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Resp> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(f())).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task").status);
    }
    out
}
