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

/// A filter in Qdrant's JSON grammar, built from the fuzzer's bytes (raw text alone rarely
/// becomes valid JSON with the right keys). Depth and width are cut when rendered.
#[derive(Debug, Arbitrary)]
enum Cond {
    Match(u8, Lit),
    Any(u8, Vec<Lit>),
    Except(u8, Vec<Lit>),
    Text(u8, String),
    Range(u8, Option<f64>, Option<f64>, Option<f64>, Option<f64>),
    HasId(Vec<u64>),
    IsEmpty(u8),
    IsNull(u8),
    /// The field form's `is_empty` / `is_null` flags.
    Flags(u8, Option<bool>, Option<bool>),
    Nested(Box<Clauses>),
    /// Text spliced in as JSON (may be invalid, or any value).
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum Lit {
    Int(i64),
    Str(String),
    Bool(bool),
    Null,
    Float(f64),
}

#[derive(Debug, Arbitrary)]
struct Clauses {
    must: Option<Vec<Cond>>,
    should: Option<Vec<Cond>>,
    must_not: Option<Vec<Cond>>,
    min_should: Option<(Vec<Cond>, u8)>,
    /// An unknown or unsupported clause name by index.
    extra: Option<u8>,
}

const KEYS: &[&str] = &[
    "a", "b", "c", "a.b", "a.b.c", "c[].d", "n", "tenant", "secret", "", "k",
];
const EXTRA: &[&str] = &[
    "nested",
    "geo_radius",
    "values_count",
    "datetime_range",
    "bogus",
];

fn lit(l: &Lit) -> Value {
    match l {
        Lit::Int(i) => json!(i),
        Lit::Str(s) => json!(s),
        Lit::Bool(b) => json!(b),
        Lit::Null => Value::Null,
        Lit::Float(f) => json!(f),
    }
}

fn key(k: u8) -> &'static str {
    KEYS[usize::from(k) % KEYS.len()]
}

fn cond(c: &Cond, depth: usize) -> String {
    let v = match c {
        Cond::Match(k, l) => json!({"key": key(*k), "match": {"value": lit(l)}}),
        Cond::Any(k, ls) => {
            json!({"key": key(*k), "match": {"any": ls.iter().take(16).map(lit).collect::<Vec<_>>()}})
        }
        Cond::Except(k, ls) => {
            json!({"key": key(*k), "match": {"except": ls.iter().take(16).map(lit).collect::<Vec<_>>()}})
        }
        Cond::Text(k, t) => json!({"key": key(*k), "match": {"text": t}}),
        Cond::Range(k, lt, gt, gte, lte) => {
            json!({"key": key(*k), "range": {"lt": lt, "gt": gt, "gte": gte, "lte": lte}})
        }
        Cond::HasId(ids) => json!({"has_id": ids.iter().take(16).collect::<Vec<_>>()}),
        Cond::IsEmpty(k) => json!({"is_empty": {"key": key(*k)}}),
        Cond::IsNull(k) => json!({"is_null": {"key": key(*k)}}),
        Cond::Flags(k, e, n) => json!({"key": key(*k), "is_empty": e, "is_null": n}),
        Cond::Nested(c) if depth < 6 => return clauses(c, depth + 1),
        Cond::Nested(_) => json!({}),
        Cond::Raw(t) => return t.clone(),
    };
    v.to_string()
}

fn list(cs: &[Cond], depth: usize) -> String {
    let items: Vec<String> = cs.iter().take(6).map(|c| cond(c, depth)).collect();
    format!("[{}]", items.join(","))
}

/// The filter's JSON text.
fn clauses(c: &Clauses, depth: usize) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &c.must {
        parts.push(format!(r#""must":{}"#, list(m, depth)));
    }
    if let Some(m) = &c.should {
        parts.push(format!(r#""should":{}"#, list(m, depth)));
    }
    if let Some(m) = &c.must_not {
        parts.push(format!(r#""must_not":{}"#, list(m, depth)));
    }
    if let Some((m, n)) = &c.min_should {
        parts.push(format!(
            r#""min_should":{{"conditions":{},"min_count":{n}}}"#,
            list(m, depth)
        ));
    }
    if let Some(e) = c.extra {
        parts.push(format!(r#""{}":{{}}"#, EXTRA[usize::from(e) % EXTRA.len()]));
    }
    format!("{{{}}}", parts.join(","))
}

#[derive(Debug, Arbitrary)]
enum FilterText {
    Built(Clauses),
    Raw(String),
}

impl FilterText {
    fn text(&self) -> String {
        match self {
            FilterText::Built(c) => clauses(c, 0),
            FilterText::Raw(t) => t.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum BodyShape {
    /// `{"filter": F, "limit": n, "with_payload": true}`.
    Filter(FilterText, u8),
    /// A search or query with a filter.
    Search(FilterText),
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
    filter: FilterText,
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
    direct(&input.filter.text());
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
            BodyShape::Filter(f, n) => {
                let f = f.text();
                (
                    format!(r#"{{"filter":{f},"limit":{n},"with_payload":true}}"#),
                    Some(f),
                )
            }
            BodyShape::Search(f) => {
                let f = f.text();
                (
                    format!(r#"{{"vector":[1,0,0,1],"filter":{f},"with_payload":true}}"#),
                    Some(f),
                )
            }
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
        if let Some(f) = &filter {
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
