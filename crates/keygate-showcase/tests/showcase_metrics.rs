//! The showcase's `/metrics` over a real socket: guarded by `metrics:read`, and its counters
//! (fed from the audit events) move by exactly the requests sent between two scrapes.

mod showcase_support;

use std::collections::BTreeMap;

use http::StatusCode;
use keygate::core::audit::{Auditor, MemorySink, TeeSink};
use keygate::metrics::Metrics;
use serde_json::json;
use showcase_support::*;

/// The `keygate_*` sample lines of a scrape with whole values (counters, histogram counts
/// and buckets): series (name and labels) to value.
fn samples(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| l.starts_with("keygate_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[tokio::test]
async fn a_scrape_sees_exactly_the_requests_sent() {
    let metrics = Metrics::new();
    let sink = MemorySink::new();
    let auditor = Auditor::direct(TeeSink::new(sink.clone(), metrics.clone()));
    let m = metrics.clone();
    let w = World::with_auditor(auditor, sink, move |mut o| {
        o.metrics = Some(m);
        o
    })
    .await;
    let (scraper, _) = w
        .issue(json!({"name": "prometheus", "scopes": ["metrics:read"]}))
        .await;
    let (reader, _) = w
        .issue(json!({"name": "reader", "scopes": ["collections:read"], "collections": ["*"]}))
        .await;

    // Without a key, or without the scope: refused.
    assert_eq!(
        w.call("GET", "/metrics", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = w.call("GET", "/metrics", Some(&reader), None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );

    let first = w.call("GET", "/metrics", Some(&scraper), None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert!(
        first
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        first.headers
    );
    let before = samples(&first.text);
    // The two key issues (admin API) and the refusals above were counted already.
    assert_eq!(
        before.get(r#"keygate_key_lifecycle_total{action="issued"}"#),
        Some(&3),
        "{}",
        first.text
    );

    // Sent between the scrapes: 3 allowed, 2 without a key, 1 with a malformed key.
    for _ in 0..3 {
        let r = w.call("GET", "/collections", Some(&reader), None).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    for _ in 0..2 {
        w.call("GET", "/collections", None, None).await;
    }
    w.call("GET", "/collections", Some("kg_nonsense"), None)
        .await;

    let second = w.call("GET", "/metrics", Some(&scraper), None).await;
    let after = samples(&second.text);
    let moved = delta(&before, &after);
    // Each of the 7 requests (the first scrape's included) was timed once.
    assert_eq!(
        moved.get(r#"keygate_request_duration_seconds_count{protocol="http"}"#),
        Some(&7),
        "{}",
        second.text
    );
    // And the time keygate added to each, once.
    assert_eq!(
        moved.get(r#"keygate_stack_duration_seconds_count{protocol="http"}"#),
        Some(&7),
        "{}",
        second.text
    );
    // The first scrape itself was counted once it was answered: allowed.
    let requests: BTreeMap<String, u64> = moved
        .into_iter()
        .filter(|(k, _)| k.starts_with("keygate_requests_total"))
        .collect();
    assert_eq!(
        requests,
        BTreeMap::from([
            (
                r#"keygate_requests_total{decision="allowed",code="none"}"#.to_owned(),
                4
            ),
            (
                r#"keygate_requests_total{decision="denied",code="missing_key"}"#.to_owned(),
                2
            ),
            (
                r#"keygate_requests_total{decision="denied",code="malformed_key"}"#.to_owned(),
                1
            ),
        ]),
        "{}",
        second.text
    );
    // No key id, address or path in any series.
    assert!(!second.text.contains("/collections") && !second.text.contains("127.0.0.1"));
}
