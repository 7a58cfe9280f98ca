//! The showcase's rotation notices over a real socket, with the manual clock: with a
//! maximum key age and an expiry warning, a key due for rotation or about to expire keeps
//! working and answers with `Deprecation` and `Sunset`; a fresh key answers without them.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use showcase_support::*;

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn keys_due_for_rotation_answer_with_deprecation_and_sunset() {
    let w = World::with(|mut o| {
        o.max_key_age = Some(DAY * 90);
        o.expiry_warning = Some(DAY * 14);
        o
    })
    .await;
    // Issued at 2026-01-01T00:00:00Z; the second expires 30 days later.
    let (plain, _) = w
        .issue(json!({"name": "plain", "scopes": ["collections:read"], "collections": ["*"]}))
        .await;
    let (expiring, _) = w
        .issue(json!({"name": "expiring", "scopes": ["collections:read"], "collections": ["*"], "expires_in": "30d"}))
        .await;

    let r = w.call("GET", "/collections", Some(&plain), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("deprecation"), None);
    assert_eq!(r.header("sunset"), None);

    // Day 20: inside the expiring key's 14-day window (from day 16).
    w.clock.advance(DAY * 20);
    let r = w.call("GET", "/collections", Some(&expiring), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("deprecation"), Some("@1768608000"));
    assert_eq!(r.header("sunset"), Some("Sat, 31 Jan 2026 00:00:00 GMT"));
    let r = w.call("GET", "/collections", Some(&plain), None).await;
    assert_eq!(r.header("deprecation"), None);

    // Day 95: the plain key is past its rotation date (day 90) and still works.
    w.clock.advance(DAY * 75);
    let r = w.call("GET", "/collections", Some(&plain), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("deprecation"), Some("@1775001600"));
    assert_eq!(r.header("sunset"), None);
}
