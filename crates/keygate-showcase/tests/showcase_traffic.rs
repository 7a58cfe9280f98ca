//! The showcase's traffic control over a real socket, on a manual clock: rate limits and
//! quotas answer 429, and a batch upsert costs its point count.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use keygate::RateLimitPolicy;
use serde_json::json;
use showcase_support::*;

#[tokio::test]
async fn batch_upserts_cost_their_point_count_against_rate_limits() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(
            json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"],
                      "rate_limits": ["burst=5/m"]}),
        )
        .await;
    let upsert = |first: u64, n: u64| {
        w.call(
            "PUT",
            "/collections/docs/points",
            Some(&key),
            Some(points(first, n)),
        )
    };

    let r = upsert(1, 3).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.header("ratelimit"),
        Some(r#""burst";r=2;t=36"#),
        "3 of 5 used"
    );
    let r = upsert(4, 3).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(
        r.header("retry-after"),
        Some("12"),
        "one more point in 12 s (5 per minute)"
    );
    assert_eq!(r.json["violated-policies"], json!(["burst"]));
    // A refused batch wrote nothing and cost nothing: a read (cost 1) still passes.
    let r = w
        .call("POST", "/collections/docs/points/count", Some(&key), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["result"]["count"], 3);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=1;t=48"#));

    w.clock.advance(Duration::from_secs(60));
    let r = upsert(4, 3).await;
    assert_eq!(r.status, StatusCode::OK, "the limit refilled: {}", r.text);
    // A batch larger than the limit can never pass: refused at once (413
    // cost_exceeds_limit), without Retry-After.
    w.clock.advance(Duration::from_secs(60));
    let r = upsert(10, 6).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "cost_exceeds_limit")
    );
    assert_eq!(r.header("retry-after"), None);
    // The batch form counts too.
    let batch = json!({"batch": {"ids": [20, 21, 22, 23], "vectors": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}});
    let r = w
        .call("PUT", "/collections/docs/points", Some(&key), Some(batch))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.header("ratelimit"),
        Some(r#""burst";r=1;t=48"#),
        "4 of 5 used"
    );
}

#[tokio::test]
async fn keys_without_limits_get_the_default_and_strangers_the_anonymous_limit() {
    let w = World::with(|mut o| {
        o.default_rate_limits = vec![RateLimitPolicy::per_minute("default", 2)];
        o.anonymous_rate_limits = vec![RateLimitPolicy::per_minute("anonymous", 1)];
        o
    })
    .await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(json!({"name": "plain", "scopes": ["points:read"], "collections": ["docs"]}))
        .await;
    for _ in 0..2 {
        let r = w
            .call("POST", "/collections/docs/points/count", Some(&key), None)
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = w
        .call("POST", "/collections/docs/points/count", Some(&key), None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(r.header("ratelimit-policy"), Some(r#""default";q=2;w=60"#));

    // Guessing keys: the first wrong key is a 401, the next ones from the address a 429.
    let r = w.call("GET", "/collections", Some("kg_nope"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = w.call("GET", "/collections", Some("kg_nope"), None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
}

#[tokio::test]
async fn quotas_answer_429_and_the_admin_api_reports_usage() {
    let w = World::new().await;
    // 2026-07-04 18:00 UTC: six hours of the day left.
    w.clock.set(keygate::core::usage::utc(2026, 7, 4, 18, 0, 0));
    w.collection("docs").await;
    let (key, id) = w
        .issue(
            json!({"name": "metered", "scopes": ["points:*"], "collections": ["docs"],
                      "quotas": ["daily=10/day"]}),
        )
        .await;
    let upsert = |first: u64, n: u64| {
        w.call(
            "PUT",
            "/collections/docs/points",
            Some(&key),
            Some(points(first, n)),
        )
    };

    assert_eq!(upsert(1, 4).await.status, StatusCode::OK);
    let r = upsert(5, 4).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .headers
        .get_all("ratelimit")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(", "))
        .any(|m| m == r#""daily";r=2;t=21600"#));
    let r = upsert(9, 4).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded")
    );
    assert_eq!(r.header("retry-after"), Some("21600"), "until midnight UTC");
    assert_eq!(
        r.json["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    // Two units left: a read passes.
    assert_eq!(
        w.call("POST", "/collections/docs/points/count", Some(&key), None)
            .await
            .status,
        StatusCode::OK
    );

    let r = w
        .admin("GET", &format!("/admin/keys/{id}/usage"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["quotas"],
        json!([{"name": "daily", "window": "day", "limit": 10, "used": 9, "remaining": 1,
                "resets_at": "2026-07-05T00:00:00.000Z"}])
    );
    let day = &r.json["windows"][0];
    assert_eq!(
        (
            day["window"].as_str(),
            day["cost"].as_u64(),
            day["requests"].as_u64()
        ),
        (Some("day"), Some(9), Some(3))
    );

    // The next day the allowance is back.
    w.clock.set(keygate::core::usage::utc(2026, 7, 5, 0, 0, 1));
    assert_eq!(upsert(9, 4).await.status, StatusCode::OK);
}

#[tokio::test]
async fn legacy_ratelimit_fields_are_sent_when_asked_for() {
    let w = World::with(|mut o| {
        o.legacy_ratelimit_headers = true;
        o
    })
    .await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(
            json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"],
                      "rate_limits": ["burst=5/m"]}),
        )
        .await;
    let r = w
        .call(
            "PUT",
            "/collections/docs/points",
            Some(&key),
            Some(points(1, 3)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=2;t=36"#));
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("36"));
    let r = w
        .call(
            "PUT",
            "/collections/docs/points",
            Some(&key),
            Some(points(4, 3)),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));

    // Off by default.
    let plain = World::new().await;
    plain.collection("docs").await;
    let r = plain
        .call("GET", "/collections", Some(&plain.admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-ratelimit-limit").is_none());
}
