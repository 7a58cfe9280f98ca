//! The showcase's Qdrant-style filters and point bodies, directly (the public `filter`
//! parser) and through the whole showcase router in-process, with two tenants sharing a
//! collection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Body;
use axum::Router;
use http::{Method, Request};
use http_body_util::BodyExt;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::Counting;
use keygate::rate_limit::LimiterClock;
use keygate::{KeySpec, ManualClock, MemoryStore, RateLimitPolicy, Verifier};
use keygate_showcase::filter::{Filter, MAX_CONDITIONS};
use keygate_showcase::store::{Distance, PointId, VectorParams, VectorStore};
use keygate_showcase::{build, Options};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

/// The victim tenant's marker: no answer to the other tenant may contain it.
const MARKER: &str = "globex-private-marker";
const SHARED: &str = "shared";

const METHODS: &[Method] = &[Method::GET, Method::POST, Method::PUT, Method::DELETE];
/// Routes after `/collections/{c}`. Not aliases or payload indexes: they outlive the
/// per-input reset (they live beside the vector store), so inputs would stop being
/// independent.
const SUFFIXES: &[&str] = &[
    "",
    "/points",
    "/points/search",
    "/points/query",
    "/points/scroll",
    "/points/count",
    "/points/delete",
    "/points/payload",
    "/points/payload/delete",
    "/points/payload/clear",
    "/points/search/batch",
    "/points/query/batch",
    "/points/search/groups",
    "/points/query/groups",
    "/facet",
    "/aliases",
    "/exists",
    "/points/1",
];
const COLLECTIONS: &[&str] = &[SHARED, "acme-own", "globex-own", "sh%61red"];

#[derive(Debug, Arbitrary)]
enum BodyShape {
    /// `{"filter": F, "limit": n, "with_payload": true}`.
    Filter(String, u8),
    /// A search or query with a filter.
    Search(String),
    /// An upsert of points whose id and payload are the fuzzer's.
    Upsert(String, String),
    /// A retrieve or delete by ids.
    Ids(String),
    /// Raw bytes.
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Call {
    method: u8,
    collection: u8,
    suffix: u8,
    body: BodyShape,
}

#[derive(Debug, Arbitrary)]
struct ShowcaseInput {
    /// Parsed directly as a filter, then run on a few payloads.
    filter: String,
    calls: Vec<Call>,
}

struct World {
    router: Router,
    vectors: VectorStore,
    acme: String,
    globex: String,
    /// What the victim sees of its own points, before any input.
    globex_view: Value,
}

fn world() -> World {
    crate::block_on(async {
        let clock = ManualClock::at_2026();
        let sink = MemorySink::new();
        let verifier = Verifier::builder(MemoryStore::new())
            .clock(clock.clone())
            .build();
        let mut opts = Options::new(verifier, Auditor::direct(sink));
        opts.limiter_clock = LimiterClock::manual(clock);
        opts.usage = Arc::new(MemoryUsageStore::new());
        opts.counting = Counting::Strict;
        // Limits high enough never to refuse: the target is the parsers, not the limiter.
        let unlimited = RateLimitPolicy::new("default", 1_000_000_000, Duration::from_secs(3_600));
        opts.default_rate_limits = vec![unlimited.clone()];
        opts.anonymous_rate_limits = vec![unlimited];
        let app = build(opts).expect("build the showcase");
        let spec = |tenant: &str| {
            KeySpec::new(tenant)
                .scope("points:*")
                .scope("collections:*")
                .resource(SHARED)
                .resource(format!("{tenant}-*"))
                .attribute("tenant", tenant)
        };
        let acme = app.keys.issue("setup", spec("acme")).await.expect("acme");
        let globex = app
            .keys
            .issue("setup", spec("globex"))
            .await
            .expect("globex");
        let mut w = World {
            router: app.router.clone(),
            vectors: app.vectors.clone(),
            acme: acme.key.expose_secret().to_owned(),
            globex: globex.key.expose_secret().to_owned(),
            globex_view: Value::Null,
        };
        reset(&w);
        w.globex_view = globex_view(&w).await;
        // The attacker's key works and sees none of the shared collection's points: the
        // target's requests reach the parsers, and the isolation checks start from there.
        let (status, text) = send(
            &w.router,
            Method::POST,
            "/collections/shared/points/scroll",
            &w.acme,
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(status, 200, "acme scrolls: {text}");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["result"]["points"], json!([]), "{text}");
        w
    })
}

/// Back to the start: the shared collection holds globex's three points only, and no other
/// collection exists.
fn reset(w: &World) {
    for name in w.vectors.names() {
        let _ = w.vectors.delete(&name, None);
    }
    w.vectors
        .create(
            SHARED,
            VectorParams {
                size: 4,
                distance: Distance::Dot,
            },
        )
        .expect("create the shared collection");
    let points = (1..=3)
        .map(|i| {
            let mut payload = Map::new();
            payload.insert("secret".into(), json!(MARKER));
            payload.insert("n".into(), json!(i));
            (PointId::Num(i), vec![1.0, 0.5, 0.25, i as f32], payload)
        })
        .collect();
    w.vectors
        .upsert(SHARED, points, Some("globex"))
        .expect("globex's points");
}

async fn send(
    router: &Router,
    method: Method,
    path: &str,
    key: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let Ok(mut req) = Request::builder()
        .method(method)
        .uri(path)
        .header("api-key", key)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
    else {
        return (0, String::new());
    };
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [127, 0, 0, 1],
            40_000,
        ))));
    let res = router.clone().oneshot(req).await.expect("infallible");
    let status = res.status().as_u16();
    let bytes = res
        .into_body()
        .collect()
        .await
        .expect("an in-memory body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn globex_view(w: &World) -> Value {
    let body = json!({"ids": [1, 2, 3], "with_payload": true, "with_vector": true});
    let (status, text) = send(
        &w.router,
        Method::POST,
        "/collections/shared/points",
        &w.globex,
        serde_json::to_vec(&body).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "globex reads its points: {text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    v["result"].clone()
}

/// The filter alone: parsed within the caps, then matched against a few payloads when
/// its work fits the budget.
fn direct(text: &str) {
    let Ok(filter) = serde_json::from_str::<Filter>(text) else {
        return;
    };
    assert!(filter.conditions() <= MAX_CONDITIONS, "{text}");
    if filter.check_budget(4).is_err() {
        return;
    }
    let payloads = [
        json!({}),
        json!({"a": 1, "b": "x", "c": [1, 2, {"d": null}], "tenant": "acme"}),
        json!({"a": {"b": {"c": 1.5}}, "k": true, "l": []}),
    ];
    for (i, p) in payloads.iter().enumerate() {
        let Value::Object(map) = p else {
            unreachable!()
        };
        filter.matches(PointId::Num(i as u64), map);
        filter.matches(PointId::Uuid(i as u128), map);
    }
}

/// Filters, searches, upserts, ids and raw bodies of one tenant (`acme`) through the whole
/// showcase: no 5xx; a body whose filter the filter parser refuses (over its caps) is
/// refused (4xx), not run; no answer carries the other tenant's (`globex`) points; and
/// `globex` sees its points unchanged afterwards. Work stays bounded: libFuzzer's timeout
/// fails any input that runs long.
pub fn showcase(data: &[u8]) {
    let Ok(input) = ShowcaseInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    direct(&input.filter);
    thread_local! {
        static WORLD: World = world();
    }
    WORLD.with(|w| crate::block_on(run(w, input)));
}

async fn run(w: &World, input: ShowcaseInput) {
    let mut wrote = false;
    for call in input.calls.iter().take(4) {
        let method = METHODS[usize::from(call.method) % METHODS.len()].clone();
        let collection = COLLECTIONS[usize::from(call.collection) % COLLECTIONS.len()];
        let suffix = SUFFIXES[usize::from(call.suffix) % SUFFIXES.len()];
        let path = format!("/collections/{collection}{suffix}");
        let (body, filter) = match &call.body {
            BodyShape::Filter(f, n) => (
                format!(r#"{{"filter":{f},"limit":{n},"with_payload":true}}"#),
                Some(f),
            ),
            BodyShape::Search(f) => (
                format!(r#"{{"vector":[1,0,0,1],"filter":{f},"with_payload":true}}"#),
                Some(f),
            ),
            BodyShape::Upsert(id, payload) => (
                format!(r#"{{"points":[{{"id":{id},"vector":[1,2,3,4],"payload":{payload}}}]}}"#),
                None,
            ),
            BodyShape::Ids(ids) => (
                format!(r#"{{"ids":{ids},"points":{ids},"with_payload":true}}"#),
                None,
            ),
            BodyShape::Raw(b) => (String::from_utf8_lossy(b).into_owned(), None),
        };
        wrote |= method != Method::GET;
        let (status, text) =
            send(&w.router, method.clone(), &path, &w.acme, body.into_bytes()).await;
        if status == 0 {
            continue;
        }
        assert!(
            status < 500,
            "{status} for {method} {path} {call:?}: {text}"
        );
        assert!(
            !text.contains(MARKER),
            "acme sees globex's point: {method} {path} {call:?}: {text}"
        );
        if let Some(f) = filter {
            if serde_json::from_str::<Value>(f).is_ok_and(|v| !v.is_null())
                && serde_json::from_str::<Filter>(f).is_err()
                && method == Method::POST
                && matches!(
                    suffix,
                    "/points/scroll" | "/points/count" | "/points/search" | "/points/query"
                )
                && status == 200
            {
                panic!("a filter the parser refuses ran: {method} {path} {call:?}: {text}");
            }
        }
    }
    if wrote {
        assert_eq!(
            globex_view(w).await,
            w.globex_view,
            "globex's points changed after {:?}",
            input.calls
        );
        reset(w);
    }
}
