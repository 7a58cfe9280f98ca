//! The showcase's request bodies over a real socket: a body must announce its size and fit
//! what its route can use (413 / 411 before it is read), bytes are charged before the body
//! is read (and stay charged), a vector longer than the collection's dimension is refused
//! at its first extra element without the memory of parsing it, and ordinary client batches
//! pass the default limits.
//!
//! This test binary counts its heap (a global allocator that records the peak), so the
//! memory a request takes is measured, not guessed.

mod showcase_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use showcase_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = IN_USE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `head` (and `body_start`), then reads up to the end of the status line within
/// [`DEADLINE`]; the rest of any announced body never comes.
async fn status_line(w: &World, head: String, body_start: &[u8]) -> String {
    let mut s = TcpStream::connect(w.addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body_start).await.expect("body");
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
        .expect("an answer before the body was sent");
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn head(w: &World, method: &str, path: &str, key: &str, length: Option<usize>) -> String {
    let framing = match length {
        Some(n) => format!("content-length: {n}"),
        None => "transfer-encoding: chunked".to_owned(),
    };
    format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\napi-key: {key}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n",
        w.addr
    )
}

/// A collection `name` of `dim` dimensions (dot product).
async fn collection(w: &World, name: &str, dim: usize) {
    let r = w
        .admin(
            "PUT",
            &format!("/collections/{name}"),
            Some(json!({"vectors": {"size": dim, "distance": "Dot"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn a_body_over_what_the_route_can_use_is_refused_before_it_is_read() {
    let w = World::new().await;
    w.collection("docs").await;
    let cap = server::body::upsert_cap(4);
    assert!(
        cap < server::MAX_BODY,
        "a 4-dimension collection takes less"
    );
    let upsert = "/collections/docs/points";
    let admin = w.admin.clone();
    assert_eq!(
        status_line(&w, head(&w, "PUT", upsert, &admin, Some(cap + 1)), b"{").await,
        "HTTP/1.1 413 Payload Too Large"
    );
    let search = "/collections/docs/points/search";
    let read_cap = server::body::READ_BODY + 4 * server::body::MAX_NUMBER_BYTES;
    assert_eq!(
        status_line(
            &w,
            head(&w, "POST", search, &admin, Some(read_cap + 1)),
            b"{"
        )
        .await,
        "HTTP/1.1 413 Payload Too Large"
    );
    assert_eq!(
        status_line(
            &w,
            head(
                &w,
                "PUT",
                "/collections/new",
                &admin,
                Some(server::body::SMALL_BODY + 1)
            ),
            b"{"
        )
        .await,
        "HTTP/1.1 413 Payload Too Large"
    );
    // A body of unknown size is refused too, whatever it would hold.
    assert_eq!(
        status_line(&w, head(&w, "PUT", upsert, &admin, None), b"10\r\n").await,
        "HTTP/1.1 411 Length Required"
    );
    // Strangers are refused the same way, before their key is even looked at.
    assert_eq!(
        status_line(&w, head(&w, "PUT", upsert, "kg_nope", Some(cap + 1)), b"{").await,
        "HTTP/1.1 413 Payload Too Large"
    );
    // Nothing was written; the cap itself is accepted.
    let r = w
        .admin("POST", "/collections/docs/points/count", Some(json!({})))
        .await;
    assert_eq!(r.json["result"]["count"], 0);
}

/// An upsert of one point with a payload string of `bytes` bytes (dimension 4).
fn heavy_point(id: u64, bytes: usize) -> serde_json::Value {
    json!({"points": [{"id": id, "vector": [1.0, 0.0, 0.0, 0.0], "payload": {"blob": "x".repeat(bytes)}}]})
}

#[tokio::test]
async fn bodies_cost_their_bytes_before_they_are_read() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, id) = w
        .issue(
            json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"],
                      "rate_limits": ["burst=200/m"]}),
        )
        .await;
    let path = "/collections/docs/points";
    // 2 MiB of payload: 32 units of 64 KiB (plus the point itself, 1 point).
    let blob = 2 * 1024 * 1024;
    for i in 0..6 {
        let r = w
            .call("PUT", path, Some(&key), Some(heavy_point(i, blob)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "upsert {i}: {}", r.text);
        // The points limit saw one point per upsert.
        assert_eq!(
            r.header("ratelimit"),
            Some(
                format!(
                    r#""burst";r={};t={}"#,
                    199 - i,
                    ((i + 1) * 60).div_ceil(200)
                )
                .as_str()
            ),
        );
    }
    // 6 x 32 units used of 200: a 7th is refused on its head, its body never sent.
    let line = status_line(&w, head(&w, "PUT", path, &key, Some(blob + 200)), b"{").await;
    assert_eq!(line, "HTTP/1.1 429 Too Many Requests");
    // The quota counted points plus bytes: 6 x (1 + 32).
    let r = w
        .admin("GET", &format!("/admin/keys/{id}/usage"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["windows"][0]["cost"], 6 * 33, "{}", r.text);
    // Small bodies are free of the bytes limit: reads still pass.
    let r = w
        .call(
            "POST",
            "/collections/docs/points/count",
            Some(&key),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["count"], 6);
}

#[tokio::test]
async fn a_read_body_stays_charged_when_a_later_limit_refuses_it() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(
            json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"],
                      "rate_limits": ["burst=100/m"]}),
        )
        .await;
    let path = "/collections/docs/points";
    // 60 points: the points limit has 100.
    let r = w.call("PUT", path, Some(&key), Some(points(1, 60))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // 60 more points in a 1 MiB body (16 units): read, parsed, then refused on points.
    let mut body = points(100, 60);
    body["padding"] = json!("x".repeat(1024 * 1024));
    let r = w.call("PUT", path, Some(&key), Some(body.clone())).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        r.text
    );
    // Its 16 units were not refunded: 5 more such bodies use the bytes limit up (6 x 16 =
    // 96), and the next one is refused before it is read.
    for _ in 0..5 {
        let r = w.call("PUT", path, Some(&key), Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    }
    let line = status_line(
        &w,
        head(&w, "PUT", path, &key, Some(1024 * 1024 + 10)),
        b"{",
    )
    .await;
    assert_eq!(line, "HTTP/1.1 429 Too Many Requests");
    // The audit log kept the exact refusal of the read bodies.
    let denied = w
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request())
        .filter(|r| r.denial == Some(keygate::DenialCode::RateLimited))
        .count();
    assert!(denied >= 7, "{denied} rate_limited events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_vector_is_refused_at_the_dimension_without_parsing_it_whole() {
    let w = World::new().await;
    collection(&w, "wide", 2048).await;
    assert_eq!(server::body::upsert_cap(2048), server::MAX_BODY);
    // One vector of 15 million zeros: a 30 MB body.
    let mut text = String::with_capacity(30_000_100);
    text.push_str(r#"{"points": [{"id": 1, "vector": ["#);
    for _ in 0..15_000_000 {
        text.push_str("0,");
    }
    text.push_str(r#"0]}]}"#);
    let len = text.len();
    let body = bytes::Bytes::from(text);

    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let r = send_raw(&w, "/collections/wide/points", body).await;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(r.0, StatusCode::BAD_REQUEST, "{}", r.1);
    assert!(r.1.contains("expected dim: 2048, got more"), "{}", r.1);
    println!("body {len} bytes, peak heap above the start {peak} bytes");
    assert!(
        peak < len * 3 / 2,
        "a {len}-byte body took {peak} bytes of heap"
    );
}

/// `PUT path` with the admin key and `body` as it is (no copy), on a fresh connection.
async fn send_raw(w: &World, path: &str, body: bytes::Bytes) -> (StatusCode, String) {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(w.addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::put(path)
        .header("host", w.addr.to_string())
        .header("api-key", &w.admin)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status();
    let text = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn ordinary_client_batches_pass_the_default_limits() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(json!({"name": "ingest", "scopes": ["points:*"], "collections": ["docs"]}))
        .await;
    let path = "/collections/docs/points";
    // Right after other requests of the key, each batch passes at once.
    for _ in 0..10 {
        let r = w
            .call(
                "POST",
                "/collections/docs/points/count",
                Some(&key),
                Some(json!({})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let mut first = 0;
    for n in [1000, 64, 256, 500, 1000] {
        let r = w
            .call("PUT", path, Some(&key), Some(points(first, n)))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{n} points: {}", r.text);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some(r#""default";q=2000;w=20"#)
        );
        first += n;
        w.clock.advance(Duration::from_secs(10));
    }
    let r = w
        .call(
            "POST",
            "/collections/docs/points/count",
            Some(&key),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.json["result"]["count"], first);
}
