//! Qdrant bodies that reach another collection than the one in the path (`lookup_from`,
//! `with_lookup`, prefetches, batches, alias actions, `init_from`) and routes that reach
//! every collection, for keys without a tenant: refused unless the key may use every
//! collection named, never forwarded; allowed ones reach the upstream unchanged.

mod support;

use std::sync::atomic::Ordering;

use http::StatusCode;
use keygate::core::audit::{Decision, RequestEvent};
use keygate::{DenialCode, KeySpec};
use keygate_gateway::preset::Preset;
use serde_json::{json, Value};
use support::{echo, requests, Gw};

async fn world() -> (Gw, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (up, calls) = echo().await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{up}"), None, |_| {}).await;
    (gw, calls)
}

fn last_request(gw: &Gw) -> RequestEvent {
    requests(gw).pop().expect("a request event")
}

/// `method path` with `body` is refused `403 resource_forbidden`, the upstream sees
/// nothing, and the audit event is a denial.
async fn refused(
    gw: &Gw,
    calls: &std::sync::atomic::AtomicUsize,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) {
    refused_as(
        gw,
        calls,
        key,
        (method, path, body),
        DenialCode::ResourceForbidden,
    )
    .await;
}

/// As [`refused`], with denial `code` (`insufficient_scope`: the key may use the other
/// collection, but not with the route's scope).
async fn refused_as(
    gw: &Gw,
    calls: &std::sync::atomic::AtomicUsize,
    key: &str,
    (method, path, body): (&str, &str, Option<Value>),
    code: DenialCode,
) {
    let before = calls.load(Ordering::SeqCst);
    let r = gw.call(method, path, Some(key), body.clone()).await;
    let shown = body.map(|b| b.to_string()).unwrap_or_default();
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "{method} {path} {shown}: {}",
        r.text
    );
    assert_eq!(r.code(), code.as_str(), "{method} {path} {shown}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "{method} {path} {shown} reached the upstream"
    );
    let event = last_request(gw);
    assert_eq!(event.decision, Decision::Denied, "{method} {path} {shown}");
    assert_eq!(event.denial, Some(code));
    assert_eq!(event.status, Some(403));
}

/// `method path` with `body` reaches the upstream with the body unchanged.
async fn allowed(gw: &Gw, key: &str, method: &str, path: &str, body: Value) {
    let r = gw.call(method, path, Some(key), Some(body.clone())).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{method} {path} {body}: {}",
        r.text
    );
    assert_eq!(r.json["path"], path);
    assert_eq!(
        r.json["body"].as_str(),
        Some(body.to_string().as_str()),
        "{method} {path}"
    );
    assert_eq!(last_request(gw).decision, Decision::Allowed);
}

#[tokio::test]
async fn reads_reaching_another_collection_are_refused() {
    let (gw, calls) = world().await;
    let (key, _) = gw
        .issue(KeySpec::new("reader").scope("points:read").resource("a"))
        .await;
    let other = json!({"collection": "b"});
    for (path, body) in [
        (
            "/collections/a/points/query",
            json!({"query": 1, "lookup_from": other}),
        ),
        (
            "/collections/a/points/query",
            json!({"query": 1, "prefetch": [{"query": 2}, {"prefetch": {"query": 3, "lookup_from": other}}]}),
        ),
        (
            "/collections/a/points/query/groups",
            json!({"query": 1, "group_by": "doc", "with_lookup": "b"}),
        ),
        (
            "/collections/a/points/query/groups",
            json!({"query": 1, "group_by": "doc", "lookup_from": other}),
        ),
        (
            "/collections/a/points/search/groups",
            json!({"vector": [0.1], "group_by": "doc", "limit": 1, "group_size": 1,
                   "with_lookup": {"collection": "b", "with_payload": true}}),
        ),
        (
            "/collections/a/points/recommend",
            json!({"positive": [1], "lookup_from": other}),
        ),
        (
            "/collections/a/points/recommend/groups",
            json!({"positive": [1], "group_by": "doc", "with_lookup": "b"}),
        ),
        (
            "/collections/a/points/discover",
            json!({"target": 1, "lookup_from": other}),
        ),
        (
            "/collections/a/points/query/batch",
            json!({"searches": [{"query": 1}, {"query": 1, "lookup_from": other}]}),
        ),
        (
            "/collections/a/points/recommend/batch",
            json!({"searches": [{"positive": [1], "lookup_from": other}]}),
        ),
        (
            "/collections/a/points/discover/batch",
            json!({"searches": [{"target": 1}, {"target": 1, "lookup_from": other}]}),
        ),
    ] {
        refused(&gw, &calls, &key, "POST", path, Some(body)).await;
    }
    // Only the key's own collection: forwarded as it was sent.
    let own = json!({"collection": "a", "vector": "v"});
    for (path, body) in [
        (
            "/collections/a/points/query",
            json!({"query": 1, "lookup_from": own, "prefetch": {"query": 2, "lookup_from": own}}),
        ),
        ("/collections/a/points/query", json!({"query": [0.1, 0.2]})),
        (
            "/collections/a/points/query/groups",
            json!({"query": 1, "group_by": "doc", "with_lookup": "a"}),
        ),
        (
            "/collections/a/points/recommend/batch",
            json!({"searches": [{"positive": [1], "lookup_from": own}, {"positive": [2]}]}),
        ),
        // Search has no lookup: not read.
        (
            "/collections/a/points/search",
            json!({"vector": [0.1], "limit": 1}),
        ),
    ] {
        allowed(&gw, &key, "POST", path, body).await;
    }
    // A body of another shape is refused, not forwarded.
    let before = calls.load(Ordering::SeqCst);
    for body in [
        json!({"query": 1, "lookup_from": "b"}),
        json!({"searches": {"query": 1}}),
        json!([1]),
    ] {
        let path = if body.get("searches").is_some() {
            "/collections/a/points/query/batch"
        } else {
            "/collections/a/points/query"
        };
        let r = gw.call("POST", path, Some(&key), Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.code(), "bad_body", "{body}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // A key on every collection reaches any of them.
    let operator = gw.operator_key().await;
    allowed(
        &gw,
        &operator,
        "POST",
        "/collections/a/points/query",
        json!({"query": 1, "lookup_from": other}),
    )
    .await;
}

#[tokio::test]
async fn alias_actions_must_name_collections_and_aliases_of_the_key() {
    let (gw, calls) = world().await;
    let (key, _) = gw
        .issue(
            KeySpec::new("manager")
                .scope("collections:manage")
                .resource("team-*"),
        )
        .await;
    for action in [
        json!({"create_alias": {"collection_name": "other", "alias_name": "team-x"}}),
        json!({"create_alias": {"collection_name": "team-a", "alias_name": "other-alias"}}),
        json!({"rename_alias": {"old_alias_name": "team-x", "new_alias_name": "other"}}),
        json!({"rename_alias": {"old_alias_name": "other", "new_alias_name": "team-x"}}),
        json!({"delete_alias": {"alias_name": "other"}}),
    ] {
        // Alone, and after an allowed action.
        let ok = json!({"delete_alias": {"alias_name": "team-z"}});
        for actions in [json!([action.clone()]), json!([ok, action.clone()])] {
            refused(
                &gw,
                &calls,
                &key,
                "POST",
                "/collections/aliases",
                Some(json!({ "actions": actions })),
            )
            .await;
        }
    }
    allowed(
        &gw,
        &key,
        "POST",
        "/collections/aliases",
        json!({"actions": [
            {"create_alias": {"collection_name": "team-a", "alias_name": "team-x"}},
            {"rename_alias": {"old_alias_name": "team-x", "new_alias_name": "team-y"}},
            {"delete_alias": {"alias_name": "team-y"}}
        ]}),
    )
    .await;
    // An unknown action cannot be checked.
    let before = calls.load(Ordering::SeqCst);
    let r = gw
        .call(
            "POST",
            "/collections/aliases",
            Some(&key),
            Some(json!({"actions": [{"drop_alias": {"alias_name": "team-x"}}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.code(), "bad_body");
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // The scope must be held on the other collection, not just access to it.
    let (split, _) = gw
        .issue(
            KeySpec::new("split")
                .grant(keygate::Grant::new(["collections:manage"], ["team-*"]))
                .grant(keygate::Grant::new(["points:read"], ["other"])),
        )
        .await;
    let body = json!({"actions": [{"create_alias": {"collection_name": "other", "alias_name": "team-x"}}]});
    refused_as(
        &gw,
        &calls,
        &split,
        ("POST", "/collections/aliases", Some(body)),
        DenialCode::InsufficientScope,
    )
    .await;
}

#[tokio::test]
async fn init_from_must_be_readable_by_the_key() {
    let (gw, calls) = world().await;
    let (key, _) = gw
        .issue(
            KeySpec::new("manager")
                .scope("collections:manage")
                .scope("points:read")
                .resource("team-*"),
        )
        .await;
    let create = |from: &str| json!({"vectors": {"size": 2, "distance": "Dot"}, "init_from": {"collection": from}});
    refused(
        &gw,
        &calls,
        &key,
        "PUT",
        "/collections/team-a",
        Some(create("other")),
    )
    .await;
    allowed(&gw, &key, "PUT", "/collections/team-a", create("team-b")).await;
    allowed(
        &gw,
        &key,
        "PUT",
        "/collections/team-a",
        json!({"vectors": {"size": 2, "distance": "Dot"}}),
    )
    .await;
    // Copying needs points:read on the source too.
    let (manage_only, _) = gw
        .issue(
            KeySpec::new("manage-only")
                .scope("collections:manage")
                .resource("team-*"),
        )
        .await;
    refused_as(
        &gw,
        &calls,
        &manage_only,
        ("PUT", "/collections/team-a", Some(create("team-b"))),
        DenialCode::InsufficientScope,
    )
    .await;
    // Managing every collection is not reading every collection.
    let (manage_all, _) = gw
        .issue(
            KeySpec::new("manage-all")
                .grant(keygate::Grant::new(["collections:manage"], ["*"]))
                .grant(keygate::Grant::new(["points:read"], ["team-*"])),
        )
        .await;
    refused_as(
        &gw,
        &calls,
        &manage_all,
        ("PUT", "/collections/team-a", Some(create("other"))),
        DenialCode::InsufficientScope,
    )
    .await;
    allowed(
        &gw,
        &manage_all,
        "PUT",
        "/collections/team-a",
        create("team-b"),
    )
    .await;
}

#[tokio::test]
async fn routes_reaching_every_collection_need_a_grant_on_every_collection() {
    let (gw, calls) = world().await;
    let (key, _) = gw
        .issue(
            KeySpec::new("limited")
                .scope("snapshots:read")
                .scope("snapshots:manage")
                .scope("cluster:manage")
                .resource("a"),
        )
        .await;
    let recover = json!({"location": "file:///qdrant/snapshots/b/b-1.snapshot"});
    for (method, path, body) in [
        (
            "PUT",
            "/collections/a/snapshots/recover",
            Some(recover.clone()),
        ),
        (
            "PUT",
            "/collections/a/snapshots/recover",
            Some(json!({"location": "http://localhost:6333/collections/b/snapshots/b-1.snapshot"})),
        ),
        (
            "PUT",
            "/collections/a/shards/0/snapshots/recover",
            Some(recover.clone()),
        ),
        ("POST", "/snapshots", None),
        ("GET", "/snapshots/full-1.snapshot", None),
        ("DELETE", "/snapshots/full-1.snapshot", None),
        ("DELETE", "/cluster/peer/7", None),
    ] {
        refused(&gw, &calls, &key, method, path, body).await;
    }
    // Its own collection's snapshots are still its to make and upload.
    let r = gw
        .call("POST", "/collections/a/snapshots", Some(&key), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A key on every collection may recover from a location.
    let (everything, _) = gw
        .issue(
            KeySpec::new("snapshots")
                .scope("snapshots:manage")
                .resource("*"),
        )
        .await;
    allowed(
        &gw,
        &everything,
        "PUT",
        "/collections/a/snapshots/recover",
        recover,
    )
    .await;
}

/// Chroma: a key's collection patterns name databases, not Chroma tenants, so the gateway
/// serves only the Chroma tenants its configuration lists (`default_tenant` by default):
/// a path under another is refused for every key, even one on every database, and never
/// forwarded.
#[tokio::test]
async fn chroma_tenants_not_served_are_refused() {
    let (up, calls) = echo().await;
    let gw = Gw::start(Preset::Chroma, &format!("http://{up}"), None, |_| {}).await;
    let key = gw.operator_key().await;
    for path in [
        "/api/v2/tenants/other",
        "/api/v2/tenants/other/databases",
        "/api/v2/tenants/other/databases/db/collections",
        "/api/v2/tenants/default_tenantx/databases",
    ] {
        refused(&gw, &calls, &key, "GET", path, None).await;
    }
    let r = gw
        .call(
            "GET",
            "/api/v2/tenants/default_tenant/databases",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["path"], "/api/v2/tenants/default_tenant/databases");

    // Listed tenants are served, and only those.
    let gw = Gw::start(Preset::Chroma, &format!("http://{up}"), None, |c| {
        c.chroma.tenants = vec!["acme".into(), "globex".into()];
    })
    .await;
    let key = gw.operator_key().await;
    for tenant in ["acme", "globex"] {
        let path = format!("/api/v2/tenants/{tenant}/databases");
        let r = gw.call("GET", &path, Some(&key), None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
    }
    refused(
        &gw,
        &calls,
        &key,
        "GET",
        "/api/v2/tenants/default_tenant/databases",
        None,
    )
    .await;
}
