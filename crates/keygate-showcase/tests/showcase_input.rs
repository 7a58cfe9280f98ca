//! The showcase against hostile input over a real socket: filters nested to blow up the
//! parser, retrieves of repeated ids, upserts whose body hides their size, queries paging
//! past the limit, large bodies from keys that may not upsert, and refusals that would name
//! another tenant's ids.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use showcase_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: each of these requests is answered in milliseconds; before the fixes they
/// took minutes (or waited for a body forever).
const DEADLINE: Duration = Duration::from_secs(2);

/// `[[[ ... true ... ]]]`, `depth` arrays deep.
fn deep_arrays(depth: usize) -> Value {
    let text = format!("{}true{}", "[".repeat(depth), "]".repeat(depth));
    serde_json::from_str(&text).expect("deep arrays")
}

/// `{"must": [{"must": [ ... ]}]}` with `levels` filters in all, the innermost keeping
/// points whose `n` is at least 2.
fn nested_filter(levels: usize) -> Value {
    let mut f = json!({"must": [{"key": "n", "range": {"gte": 2}}]});
    for _ in 1..levels {
        f = json!({ "must": [f] });
    }
    f
}

/// A world with collection `docs` holding points 1 to 5 (payload `{"n": id}`).
async fn docs() -> World {
    let w = World::new().await;
    w.collection("docs").await;
    let r = w
        .admin("PUT", "/collections/docs/points", Some(points(1, 5)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    w
}

async fn within(w: &World, method: &str, path: &str, key: &str, body: Value) -> Resp {
    tokio::time::timeout(DEADLINE, w.call(method, path, Some(key), Some(body)))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within {DEADLINE:?}"))
}

fn error_text(r: &Resp) -> &str {
    r.json["status"]["error"].as_str().unwrap_or("")
}

// The server runs on the runtime's workers and the test on its own thread, so a handler
// stuck parsing cannot stop the deadline from firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_filters_are_refused_at_once() {
    let w = docs().await;
    let admin = w.admin.clone();
    let deep = json!({ "must": [deep_arrays(40)] });
    let requests = [
        (
            "/collections/docs/points/search",
            json!({"vector": [1, 0, 0, 0], "limit": 3, "filter": deep}),
        ),
        ("/collections/docs/points/query", json!({"filter": deep})),
        ("/collections/docs/points/scroll", json!({"filter": deep})),
        ("/collections/docs/points/count", json!({"filter": deep})),
        ("/collections/docs/points/delete", json!({"filter": deep})),
    ];
    for (path, body) in requests {
        let r = within(&w, "POST", path, &admin, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
        assert!(
            error_text(&r).starts_with("Format error in JSON body"),
            "{path}: {}",
            r.text
        );
    }

    // Nested filters (objects) are capped at 32 levels, with a message saying so.
    let count = |filter: Value| {
        within(
            &w,
            "POST",
            "/collections/docs/points/count",
            &admin,
            json!({ "filter": filter }),
        )
    };
    let r = count(nested_filter(32)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["count"], 4);
    let r = count(nested_filter(33)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(
        error_text(&r).contains("the filter is nested deeper than 32 levels"),
        "{}",
        r.text
    );
    // Nothing was deleted by the refused delete.
    let r = count(json!({})).await;
    assert_eq!(r.json["result"]["count"], 5);
}

#[tokio::test]
async fn arrays_are_not_read_as_conditions() {
    let w = docs().await;
    let admin = w.admin.clone();
    // A derived struct reads a list by position: `["tenant"]` was a field condition on
    // `tenant` with nothing to match, so it kept every point.
    for filter in [
        json!({"must": [["tenant"]]}),
        json!({"must": ["tenant"]}),
        json!({"should": [{"key": "n", "range": [2, 3]}]}),
        json!({"must": [{"has_id": [1], "key": "n"}]}),
        json!([{"key": "n"}]),
    ] {
        let r = within(
            &w,
            "POST",
            "/collections/docs/points/count",
            &admin,
            json!({ "filter": filter }),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{filter}: {}", r.text);
    }
    // The shapes Qdrant documents still read.
    for (filter, n) in [
        (json!({"must": {"key": "n", "match": {"value": 2}}}), 1),
        (
            json!({"must": [{"key": "n", "match": {"any": [1, 2, 9]}}]}),
            2,
        ),
        (json!({"must_not": [{"has_id": [1, 2]}]}), 3),
        (
            json!({"should": [{"must": [{"key": "n", "range": {"lt": 3}}]}]}),
            2,
        ),
        (
            json!({"min_should": {"conditions": [{"has_id": [1, 2]}, {"key": "n", "range": {"gte": 2}}], "min_count": 2}}),
            1,
        ),
    ] {
        let r = within(
            &w,
            "POST",
            "/collections/docs/points/count",
            &admin,
            json!({ "filter": filter }),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{filter}: {}", r.text);
        assert_eq!(r.json["result"]["count"], n, "{filter}");
    }
}

#[tokio::test]
async fn retrieve_refuses_too_many_ids_and_answers_each_once() {
    let w = docs().await;
    let admin = w.admin.clone();
    let path = "/collections/docs/points";
    let many: Vec<u64> = std::iter::repeat_n(1, 10_001).collect();
    let r = within(&w, "POST", path, &admin, json!({ "ids": many })).await;
    let head: String = r.text.chars().take(200).collect();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{head}");
    assert!(error_text(&r).contains("at most 10000 ids"), "{}", r.text);

    // At the limit, repeated ids are answered once, in the order first asked.
    let mut ids_asked: Vec<u64> = vec![3, 1, 3, 42, 1];
    ids_asked.resize(10_000, 3);
    let r = within(&w, "POST", path, &admin, json!({ "ids": ids_asked })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"]), [3, 1]);
    let first = &r.json["result"][0];
    assert_eq!(first["payload"], json!({"n": 3}));
    assert!(first.get("vector").is_none(), "no vector unless asked");

    // Only what is asked for is returned.
    let body = json!({"ids": [2, 2], "with_payload": ["missing"], "with_vector": true});
    let r = within(&w, "POST", path, &admin, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"]), [2]);
    assert_eq!(r.json["result"][0]["payload"], json!({}));
    assert_eq!(
        r.json["result"][0]["vector"].as_array().map(Vec::len),
        Some(4)
    );
    let body = json!({"ids": [2], "with_payload": false});
    let r = within(&w, "POST", path, &admin, body).await;
    assert_eq!(r.json["result"], json!([{"id": 2}]));
}

#[tokio::test]
async fn an_upsert_is_charged_the_points_it_writes() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(
            json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"],
                      "rate_limits": ["burst=5/m"]}),
        )
        .await;
    let path = "/collections/docs/points";
    // 8 points are more than the limit: refused, nothing written.
    let r = within(&w, "PUT", path, &key, points(1, 8)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "cost_exceeds_limit"),
        "{}",
        r.text
    );
    // A body with both shapes is refused whole (it is not read as one of them): it costs 1.
    let mut body = points(1, 3);
    body["batch"] = json!(0);
    let r = within(&w, "PUT", path, &key, body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=4;t=12"#));
    let r = within(
        &w,
        "POST",
        "/collections/docs/points/count",
        &w.admin,
        json!({}),
    )
    .await;
    assert_eq!(r.json["result"]["count"], 0, "nothing was written");
    w.clock.advance(Duration::from_secs(12));

    // Within the limit it passes and costs its 3 points.
    let r = within(&w, "PUT", path, &key, points(1, 3)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.header("ratelimit"),
        Some(r#""burst";r=2;t=36"#),
        "3 of 5 used"
    );

    // A body that is no upsert costs 1 and writes nothing.
    let r = within(&w, "PUT", path, &key, json!({"points": [{"id": 9}]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=1;t=48"#));
    let r = within(
        &w,
        "POST",
        "/collections/docs/points/count",
        &w.admin,
        json!({}),
    )
    .await;
    assert_eq!(r.json["result"]["count"], 3);
}

#[tokio::test]
async fn query_cannot_page_past_the_limit() {
    let w = docs().await;
    let admin = w.admin.clone();
    let path = "/collections/docs/points/query";
    for body in [
        json!({"offset": 1_000_000_000_u64, "limit": 10}),
        json!({"offset": 9_991, "limit": 10}),
        json!({"offset": 1, "limit": 10_000}),
        json!({"query": [1, 0, 0, 0], "offset": 10_000}),
    ] {
        let r = within(&w, "POST", path, &admin, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(
            error_text(&r).contains("offset + limit must be at most 10000"),
            "{}",
            r.text
        );
    }
    let r = within(
        &w,
        "POST",
        path,
        &admin,
        json!({"offset": 9_990, "limit": 10}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"]["points"]), Vec::<u64>::new());
    let r = within(&w, "POST", path, &admin, json!({"offset": 2, "limit": 2})).await;
    assert_eq!(ids(&r.json["result"]["points"]), [3, 4]);
    // Scroll pages still continue where they stopped.
    let r = within(
        &w,
        "POST",
        "/collections/docs/points/scroll",
        &admin,
        json!({"offset": 2, "limit": 2}),
    )
    .await;
    assert_eq!(ids(&r.json["result"]["points"]), [2, 3]);
    assert_eq!(r.json["result"]["next_page_offset"], 4);
}

/// Sends the head of a `PUT path` announcing the largest body a 4-dimension collection
/// takes, and 1 KiB of it, then waits for the status line (the rest of the body never
/// comes).
async fn announce_large_upsert(w: &World, path: &str, key: &str) -> String {
    announce_upsert(w, path, key, server::body::upsert_cap(4)).await
}

/// Sends the head of a `PUT path` announcing a body of `size` bytes, and 1 KiB of it, then
/// waits for the status line (the rest of the body never comes).
async fn announce_upsert(w: &World, path: &str, key: &str, size: usize) -> String {
    let mut s = TcpStream::connect(w.addr).await.expect("connect");
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: {}\r\napi-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n",
        w.addr,
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&[b' '; 1024]).await.expect("body");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .unwrap_or_else(|_| {
            panic!("PUT {path}: no answer within {DEADLINE:?}: the body was awaited")
        });
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn upserts_the_scope_layer_refuses_are_not_buffered() {
    let w = docs().await;
    w.collection("other").await;
    let (reader, _) = w
        .issue(json!({"name": "reader", "scopes": ["points:read"], "collections": ["docs"]}))
        .await;
    let (writer, _) = w
        .issue(json!({"name": "writer", "scopes": ["points:write"], "collections": ["other"]}))
        .await;
    let path = "/collections/docs/points";
    assert_eq!(
        announce_large_upsert(&w, path, &reader).await,
        "HTTP/1.1 403 Forbidden",
        "no points:write"
    );
    assert_eq!(
        announce_large_upsert(&w, path, &writer).await,
        "HTTP/1.1 403 Forbidden",
        "not this collection"
    );
    // A key that may upsert still gets its body read and counted.
    let r = within(
        &w,
        "PUT",
        "/collections/other/points",
        &writer,
        points(1, 2),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn foreign_ids_answer_exactly_as_absent_ones() {
    let w = World::new().await;
    w.collection("shared").await;
    let spec = |tenant: &str| {
        json!({"name": tenant, "scopes": ["points:*"], "collections": ["shared"],
               "attributes": {"tenant": tenant}})
    };
    let (acme, _) = w.issue(spec("acme")).await;
    let (globex, _) = w.issue(spec("globex")).await;
    let path = "/collections/shared/points";
    // acme writes 1 and 2 in two operations: its operation ids are 1 and 2.
    for id in [1, 2] {
        let r = within(&w, "PUT", path, &acme, points(id, 1)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["result"]["operation_id"], id, "{}", r.text);
    }

    // For globex, acme's id 1 reads exactly as the free id 9: same status, same words.
    let strip_time = |r: &Resp| {
        let mut v = r.json.clone();
        v["time"] = json!(0);
        (r.status, v)
    };
    for (method, suffix, body) in [
        ("GET", "/1", None),
        ("POST", "/query", Some(json!({"query": 1}))),
        ("POST", "", Some(json!({"ids": [1]}))),
    ] {
        let mine = w
            .call(
                method,
                &format!("{path}{suffix}"),
                Some(&globex),
                body.clone(),
            )
            .await;
        let free_path = format!("{path}{}", suffix.replace('1', "9"));
        let free_body = body.map(|b| {
            serde_json::from_str::<Value>(&b.to_string().replace('1', "9")).expect("json")
        });
        let free = w.call(method, &free_path, Some(&globex), free_body).await;
        assert_eq!(
            strip_time(&mine),
            {
                let (s, v) = strip_time(&free);
                (
                    s,
                    serde_json::from_str(&v.to_string().replace('9', "1")).expect("json"),
                )
            },
            "{method} {suffix}: {} / {}",
            mine.text,
            free.text
        );
    }
    // Taking id 1 succeeds like taking id 9 would, and is globex's own id 1: operation
    // ids count globex's writes only (acme's two are not visible in them).
    let r = within(&w, "PUT", path, &globex, points(1, 1)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["operation_id"], 1, "{}", r.text);
    let mut mine = points(1, 1);
    mine["points"][0]["vector"] = json!([0.0, 0.0, 1.0, 0.0]);
    mine["points"][0]["payload"] = json!({"owner": "globex"});
    let r = within(&w, "PUT", path, &globex, mine).await;
    assert_eq!(r.json["result"]["operation_id"], 2, "{}", r.text);
    // Each tenant reads its own point 1; acme's is untouched.
    let r = w.call("GET", &format!("{path}/1"), Some(&acme), None).await;
    assert_eq!(
        r.json["result"]["payload"],
        json!({"n": 1, "tenant": "acme"})
    );
    let r = w
        .call("GET", &format!("{path}/1"), Some(&globex), None)
        .await;
    assert_eq!(
        r.json["result"]["payload"],
        json!({"owner": "globex", "tenant": "globex"})
    );
    // Deleting id 1 as globex deletes globex's point only.
    let r = within(
        &w,
        "POST",
        &format!("{path}/delete"),
        &globex,
        json!({"points": [1]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["operation_id"], 3);
    let r = w.call("GET", &format!("{path}/1"), Some(&acme), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w
        .call("GET", &format!("{path}/1"), Some(&globex), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // The admin (no tenant) sees both tenants' points.
    let r = within(&w, "POST", &format!("{path}/count"), &w.admin, json!({})).await;
    assert_eq!(r.json["result"]["count"], 2);
}
