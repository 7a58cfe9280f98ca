//! The Qdrant preset against the showcase's Qdrant-compatible store, on a loopback port.
//!
//! The upstream is the showcase reached with its own admin key (no tenant): the gateway holds
//! that key as the upstream credential, so the store sees every request as an operator's and
//! applies no tenant rule of its own. Every isolation asserted here is the gateway's.

mod support;

use std::sync::Arc;

use http::StatusCode;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::Counting;
use keygate::rate_limit::LimiterClock;
use keygate::{KeySpec, ManualClock, MemoryStore, Verifier};
use keygate_gateway::preset::Preset;
use keygate_gateway::proxy::UpstreamCredential;
use serde_json::{json, Value};
use support::{call, call_h2, python, Gw};

/// The showcase on a loopback port; returns its address and admin key.
async fn upstream() -> (std::net::SocketAddr, String) {
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(MemoryStore::new())
        .clock(clock.clone())
        .build();
    let mut opts = keygate_showcase::Options::new(verifier, Auditor::direct(MemorySink::new()));
    opts.limiter_clock = LimiterClock::manual(clock);
    opts.usage = Arc::new(MemoryUsageStore::new());
    opts.counting = Counting::Strict;
    let app = keygate_showcase::build(opts).expect("the showcase");
    let admin = app
        .keys
        .issue("setup", KeySpec::new("admin").scope("*").resource("*"))
        .await
        .expect("admin key");
    let addr = keygate_testkit::serve::spawn_axum_with_peer(app.router.clone()).await;
    // The store lives as long as the router; keep the app alive with the runtime.
    std::mem::forget(app);
    (addr, admin.key.expose_secret().to_owned())
}

/// The gateway in front of a fresh showcase with collection `docs` (2 dimensions).
async fn world() -> (Gw, std::net::SocketAddr, String) {
    let (up, admin) = upstream().await;
    let created = call(
        up,
        "PUT",
        "/collections/docs",
        Some(&admin),
        Some(&json!({"vectors": {"size": 2, "distance": "Dot"}})),
    )
    .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text);
    let credential = UpstreamCredential::new("api-key", None, &admin).expect("credential");
    let gw = Gw::start(
        Preset::Qdrant,
        &format!("http://{up}"),
        Some(credential),
        |_| {},
    )
    .await;
    (gw, up, admin)
}

fn ids(r: &support::Resp) -> Vec<u64> {
    let points = r.json["result"]["points"]
        .as_array()
        .or_else(|| r.json["result"].as_array())
        .unwrap_or_else(|| panic!("points in {}", r.text));
    let mut ids: Vec<u64> = points
        .iter()
        .map(|p| p["id"].as_u64().expect("id"))
        .collect();
    ids.sort_unstable();
    ids
}

async fn upsert(gw: &Gw, key: &str, points: Value) -> support::Resp {
    gw.call(
        "PUT",
        "/collections/docs/points?wait=true",
        Some(key),
        Some(json!({ "points": points })),
    )
    .await
}

#[tokio::test]
async fn two_tenants_cannot_see_each_others_points() {
    let (gw, up, admin) = world().await;
    let (acme, _) = gw.tenant_key("acme", "docs").await;
    let (globex, _) = gw.tenant_key("globex", "docs").await;

    // Acme's second point claims to be Globex's: the gateway stamps Acme over it.
    let r = upsert(
        &gw,
        &acme,
        json!([
            {"id": 1, "vector": [1.0, 0.0], "payload": {"n": 1}},
            {"id": 2, "vector": [0.9, 0.1], "payload": {"n": 2, "tenant": "globex"}}
        ]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = upsert(&gw, &globex, json!([{"id": 3, "vector": [1.0, 0.0]}])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // What the store holds (read directly with its admin key): stamped payloads.
    let stored = call(
        up,
        "POST",
        "/collections/docs/points/scroll",
        Some(&admin),
        Some(&json!({"limit": 10})),
    )
    .await;
    let tenants: Vec<(u64, String)> = stored.json["result"]["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["id"].as_u64().expect("id"),
                p["payload"]["tenant"].as_str().expect("tenant").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tenants,
        vec![(1, "acme".into()), (2, "acme".into()), (3, "globex".into())]
    );

    let scroll = json!({"limit": 10, "with_payload": true});
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/scroll",
            Some(&acme),
            Some(scroll.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r), vec![1, 2]);
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/scroll",
            Some(&globex),
            Some(scroll),
        )
        .await;
    assert_eq!(ids(&r), vec![3]);

    // Search, query and count see only the caller's points, even when the filter names
    // another tenant.
    let search = json!({"vector": [1.0, 0.0], "limit": 10});
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/search",
            Some(&globex),
            Some(search),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r), vec![3]);
    let query = json!({"query": [1.0, 0.0], "limit": 10,
        "filter": {"must": [{"key": "tenant", "match": {"value": "acme"}}]}});
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/query",
            Some(&globex),
            Some(query),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.json["result"]["points"]
            .as_array()
            .expect("points")
            .is_empty(),
        "{}",
        r.text
    );
    let r = gw
        .call("POST", "/collections/docs/points/count", Some(&acme), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["count"], 2);

    // Reads by id: another tenant's point is absent.
    let r = gw
        .call(
            "POST",
            "/collections/docs/points",
            Some(&acme),
            Some(json!({"ids": [1, 3]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r), vec![1]);
    let r = gw
        .call("GET", "/collections/docs/points/3", Some(&acme), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert_eq!(r.code(), "point_not_found");
    let r = gw
        .call("GET", "/collections/docs/points/3", Some(&globex), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["id"], 3);

    // Another tenant's point as a query example is refused.
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/query",
            Some(&acme),
            Some(json!({"query": 3, "limit": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert_eq!(r.code(), "point_not_found");

    // Writing over another tenant's id is refused; nothing changes.
    let r = upsert(&gw, &globex, json!([{"id": 1, "vector": [0.0, 1.0]}])).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(r.code(), "tenant_conflict");

    // Deleting another tenant's point by id reaches nothing.
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/delete?wait=true",
            Some(&acme),
            Some(json!({"points": [3]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/count",
            Some(&globex),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.json["result"]["count"], 1, "{}", r.text);

    // A key without a tenant (an operator) sees every point.
    let operator = gw.operator_key().await;
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/count",
            Some(&operator),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.json["result"]["count"], 3, "{}", r.text);
}

#[tokio::test]
async fn revocation_refuses_the_next_request() {
    let (gw, _, _) = world().await;
    let (acme, id) = gw.tenant_key("acme", "docs").await;
    let r = gw
        .call("POST", "/collections/docs/points/count", Some(&acme), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    gw.gateway.keys.revoke("test", id).await.expect("revoke");
    let r = gw
        .call("POST", "/collections/docs/points/count", Some(&acme), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert_eq!(r.code(), "invalid_key");
}

#[tokio::test]
async fn tenant_keys_cannot_reach_operations_that_span_tenants() {
    let (gw, _, _) = world().await;
    let (broad, _) = gw
        .issue(
            KeySpec::new("broad")
                .scope("*")
                .resource("*")
                .attribute("tenant", "acme"),
        )
        .await;
    for (method, path, body) in [
        ("DELETE", "/collections/docs", None),
        (
            "POST",
            "/collections/docs/points/payload/clear",
            Some(json!({"points": [1]})),
        ),
        ("POST", "/collections/docs/snapshots", None),
        ("GET", "/cluster", None),
        (
            "POST",
            "/collections/docs/points/query",
            Some(json!({"query": 1, "lookup_from": {"collection": "other"}})),
        ),
        (
            "POST",
            "/collections/docs/points/payload",
            Some(json!({"payload": {"tenant": "globex"}, "points": [1]})),
        ),
    ] {
        let r = gw.call(method, path, Some(&broad), body).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            r.text
        );
        assert_eq!(r.code(), "tenant_unscopable", "{method} {path}");
    }
    // The collection is still there.
    let operator = gw.operator_key().await;
    let r = gw
        .call("GET", "/collections/docs/exists", Some(&operator), None)
        .await;
    assert_eq!(r.json["result"]["exists"], true, "{}", r.text);
}

#[tokio::test]
async fn routes_outside_the_preset_are_refused_and_scopes_enforced() {
    let (gw, _, _) = world().await;
    let operator = gw.operator_key().await;
    let r = gw
        .call(
            "POST",
            "/collections/docs/points/explode",
            Some(&operator),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "unknown_route");
    let r = gw
        .call("POST", "/collections/docs/points/explode", None, None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "missing_key");
    // A key for another collection.
    let (other, _) = gw.tenant_key("acme", "other").await;
    let r = gw
        .call("POST", "/collections/docs/points/count", Some(&other), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "resource_forbidden");
    // A read-only key cannot write.
    let (reader, _) = gw
        .issue(KeySpec::new("reader").scope("points:read").resource("docs"))
        .await;
    let r = upsert(&gw, &reader, json!([{"id": 9, "vector": [1.0, 0.0]}])).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "insufficient_scope");
    // A dot segment the upstream could resolve to another route is not forwarded.
    for path in [
        "/collections/docs/points/..",
        "/collections/docs/points/%2E%2e",
    ] {
        let r = gw.call("GET", path, Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
        assert_eq!(r.code(), "bad_path");
    }
    // Health checks pass without a key.
    let r = gw.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Every request through the layers was audited.
    assert!(gw.sink.events().len() >= 5);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let (gw, _, _) = world().await;
    let (acme, _) = gw.tenant_key("acme", "docs").await;
    let r = call_h2(
        gw.addr,
        "PUT",
        "/collections/docs/points?wait=true",
        &acme,
        Some(&json!({"points": [{"id": 5, "vector": [1.0, 1.0]}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call_h2(
        gw.addr,
        "POST",
        "/collections/docs/points/count",
        &acme,
        None,
    )
    .await;
    assert_eq!(r.json["result"]["count"], 1, "{}", r.text);
}

/// The official `qdrant-client` through the gateway (`tests/qdrant/client.py`). Needs
/// `KEYGATE_TEST_GATEWAY_VENV` (`scripts/gateway-venv.sh`); prints that it skipped when unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_through_the_gateway() {
    let Ok(venv) = std::env::var("KEYGATE_TEST_GATEWAY_VENV") else {
        eprintln!("skipped: KEYGATE_TEST_GATEWAY_VENV is not set (scripts/gateway-venv.sh)");
        return;
    };
    let venv = std::path::PathBuf::from(venv);
    let (gw, _, _) = world().await;
    let spec = |tenant: &str| {
        KeySpec::new(tenant)
            .scope("service:read")
            .scope("collections:read")
            .scope("points:read")
            .scope("points:write")
            .resource("docs")
            .attribute("tenant", tenant)
    };
    let (acme, acme_id) = gw.issue(spec("acme")).await;
    let (globex, _) = gw.issue(spec("globex")).await;
    let script = "tests/qdrant/client.py";
    let port = gw.addr.port();
    let r = python(&venv, script, port, "isolation", &[&acme, &globex]).await;
    assert_eq!(r["acme_scroll"], json!([1, 2]), "{r}");
    assert_eq!(r["acme_tenants"], json!(["acme", "acme"]), "{r}");
    assert_eq!(r["globex_scroll"], json!([3]), "{r}");
    assert_eq!(r["acme_query"], json!([1, 2]), "{r}");
    assert_eq!(r["globex_query_filtered"], json!([]), "{r}");
    assert_eq!(r["acme_count"], 2, "{r}");
    assert_eq!(r["acme_retrieve"], json!([1]), "{r}");
    let upsert = r["globex_upsert_acme_id"].as_str().unwrap_or_default();
    assert!(
        upsert.contains("409") && upsert.contains("tenant_conflict"),
        "{r}"
    );
    assert_eq!(r["acme_after_globex_delete"], 2, "{r}");
    let delete = r["acme_delete_collection"].as_str().unwrap_or_default();
    assert!(delete.contains("insufficient_scope"), "{r}");

    gw.gateway
        .keys
        .revoke("test", acme_id)
        .await
        .expect("revoke");
    let r = python(&venv, script, port, "refused", &[&acme]).await;
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("401") && error.contains("invalid_key"),
        "{r}"
    );
}
