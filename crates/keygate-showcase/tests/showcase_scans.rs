//! The showcase's scans over a real socket: filters are capped (key parts, list lengths,
//! conditions), a filter whose work over the collection is over the budget is refused
//! before the scan, and scans run off the async workers, so `/healthz` answers while they
//! are in flight.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use showcase_support::server::filter::{MAX_CONDITIONS, MAX_KEY_PARTS, MAX_LIST, WORK_BUDGET};
use showcase_support::*;

const DEADLINE: Duration = Duration::from_secs(5);

fn error_text(r: &Resp) -> &str {
    r.json["status"]["error"].as_str().unwrap_or("")
}

async fn count(w: &World, filter: Value) -> Resp {
    tokio::time::timeout(
        DEADLINE,
        w.admin(
            "POST",
            "/collections/docs/points/count",
            Some(json!({ "filter": filter })),
        ),
    )
    .await
    .expect("an answer within the deadline")
}

/// A world with collection `docs` holding points 0 to `n - 1`.
async fn docs(n: u64) -> World {
    let w = World::new().await;
    w.collection("docs").await;
    let mut first = 0;
    while first < n {
        let batch = (n - first).min(1000);
        let r = w
            .admin(
                "PUT",
                "/collections/docs/points",
                Some(points(first, batch)),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        first += batch;
        // The default limit takes 2,000 points per 20 s.
        w.clock.advance(Duration::from_secs(10));
    }
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_capped() {
    let w = docs(10).await;
    let long_key = vec!["a"; 500_000].join(".");
    let parts = vec!["a"; MAX_KEY_PARTS + 1].join(".");
    let many: Vec<u64> = (0..=MAX_LIST as u64).collect();
    let conditions: Vec<Value> = (0..=MAX_CONDITIONS)
        .map(|i| json!({"key": "n", "match": {"value": i}}))
        .collect();
    for (filter, words) in [
        (
            json!({"must": [{"key": long_key, "match": {"value": 1}}]}),
            "longer than 512 bytes",
        ),
        (
            json!({"must": [{"key": parts, "match": {"value": 1}}]}),
            "more than 16 parts",
        ),
        (
            json!({"must": [{"is_empty": {"key": parts}}]}),
            "more than 16 parts",
        ),
        (
            json!({"must": [{"key": "n", "match": {"any": many}}]}),
            "more than 10000 items",
        ),
        (json!({"must": [{"has_id": many}]}), "more than 10000 items"),
        (json!({ "should": conditions }), "1001 conditions"),
    ] {
        let r = count(&w, filter).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(error_text(&r).contains(words), "{words}: {}", r.text);
    }
    // At the caps, filters still work.
    let parts = vec!["a"; MAX_KEY_PARTS].join(".");
    let r = count(
        &w,
        json!({"must_not": [{"key": parts, "match": {"value": 1}}]}),
    )
    .await;
    assert_eq!(r.json["result"]["count"], 10, "{}", r.text);
    let any: Vec<u64> = (5..MAX_LIST as u64).collect();
    let r = count(&w, json!({"must": [{"key": "n", "match": {"any": any}}]})).await;
    assert_eq!(r.json["result"]["count"], 5, "{}", r.text);
}

#[tokio::test]
async fn a_filter_over_the_work_budget_is_refused_before_the_scan() {
    let w = docs(2_000).await;
    // Each condition weighs 1 + 1 key part + 1,000 values: 5 of them over 2,000 points is
    // 10,020,000 steps, over the budget; 4 are 8,016,000, within it.
    let condition = json!({"key": "n", "match": {"any": (0..1000).collect::<Vec<u64>>()}});
    let heavy = json!({"should": vec![condition.clone(); 5]});
    const { assert!(2_000 * 5 * 1_002 > WORK_BUDGET) };
    const { assert!(2_000 * 4 * 1_002 <= WORK_BUDGET) };
    for path in ["count", "scroll", "search", "delete"] {
        let mut body = json!({ "filter": heavy });
        if path == "search" {
            body["vector"] = json!([1, 0, 0, 0]);
            body["limit"] = json!(1);
        }
        let r = w
            .admin(
                "POST",
                &format!("/collections/docs/points/{path}"),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
        assert!(
            error_text(&r).contains("more work than one request may take"),
            "{}",
            r.text
        );
    }
    let r = count(&w, json!({"should": vec![condition; 4]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["count"], 1000);
    // The refused delete deleted nothing.
    let r = count(&w, json!({})).await;
    assert_eq!(r.json["result"]["count"], 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_scans_are_in_flight() {
    let w = docs(100).await;
    let vectors = w.app.vectors.clone();
    // Hold the collection: every scan of it waits, in flight, until the lock is let go.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        vectors.while_locked("docs", || {
            locked_tx.send(()).expect("locked");
            let _ = held.recv();
        })
    });
    locked.recv().expect("the lock is held");

    // More scans than the runtime has workers: run on the workers, they would stop it.
    // Counts, and searches (whose body size is checked against the collection's dimension
    // first, which must not wait for the lock either).
    let scans: Vec<_> = (0..4)
        .map(|i| {
            let (addr, key) = (w.addr, w.admin.clone());
            let filter = json!({"must": [{"key": "n", "range": {"gte": 50}}]});
            let (path, body) = if i % 2 == 0 {
                ("count", json!({ "filter": filter }))
            } else {
                (
                    "search",
                    json!({"vector": [1, 0, 0, 0], "limit": 100, "filter": filter}),
                )
            };
            tokio::spawn(async move {
                call(
                    addr,
                    "POST",
                    &format!("/collections/docs/points/{path}"),
                    Some(&key),
                    Some(&body),
                )
                .await
            })
        })
        .collect();
    let in_flight = || {
        let n = w.app.vectors.scans_in_flight();
        async move { n == 4 }
    };
    poll_until(DEADLINE, "4 scans in flight", in_flight).await;

    let r = tokio::time::timeout(DEADLINE, w.call("GET", "/healthz", None, None))
        .await
        .expect("/healthz answers while the scans wait");
    assert_eq!(r.status, StatusCode::OK);
    let r = tokio::time::timeout(
        DEADLINE,
        w.call("GET", "/collections", Some(&w.admin), None),
    )
    .await
    .expect("other requests are answered too");
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        w.app.vectors.scans_in_flight(),
        4,
        "the scans were still in flight"
    );

    release.send(()).expect("release");
    assert!(holder.join().expect("holder"));
    for (i, s) in scans.into_iter().enumerate() {
        let r = s.await.expect("scan");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if i % 2 == 0 {
            assert_eq!(r.json["result"]["count"], 50);
        } else {
            assert_eq!(r.json["result"].as_array().map(Vec::len), Some(50));
        }
    }
}
