//! The Qdrant routes beyond points and collections, over a real socket: payload indexes,
//! payload writes, aliases, batch searches and queries, facets and groups. Each route is
//! checked for its answer shape, its scope in the route table, and (when it reads or writes
//! points) row-level security by tenant. Also: a route no rule names is refused for every
//! key, the admin key included.

mod showcase_support;

use http::StatusCode;
use serde_json::{json, Value};
use showcase_support::*;

/// A world with collection `shared`: acme's points 1-3 and globex's 4-5 (payload `city`,
/// `tags`), and keys for both tenants.
struct Tenants {
    w: World,
    acme: String,
    globex: String,
}

impl Tenants {
    async fn new() -> Tenants {
        let w = World::new().await;
        w.collection("shared").await;
        let spec = |tenant: &str| {
            json!({"name": tenant, "scopes": ["points:*", "collections:read"],
                   "collections": ["shared", "shared-*"], "attributes": {"tenant": tenant}})
        };
        let (acme, _) = w.issue(spec("acme")).await;
        let (globex, _) = w.issue(spec("globex")).await;
        let t = Tenants { w, acme, globex };
        let pts = |tenant: &str, ids: &[(u64, &str, &[&str])]| {
            let points: Vec<Value> = ids
                .iter()
                .map(|(id, city, tags)| {
                    json!({"id": id, "vector": [1.0, *id as f32, 0.5, 0.25],
                           "payload": {"city": city, "tags": tags, "tenant": tenant}})
                })
                .collect();
            json!({ "points": points })
        };
        let acme_points = pts(
            "acme",
            &[
                (1, "Paris", &["a", "b"]),
                (2, "Paris", &["b"]),
                (3, "Oslo", &["a"]),
            ],
        );
        let r = t
            .call_as(&t.acme, "PUT", "/collections/shared/points", acme_points)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let globex_points = pts("globex", &[(4, "Paris", &["a"]), (5, "Rome", &["c"])]);
        let r = t
            .call_as(
                &t.globex,
                "PUT",
                "/collections/shared/points",
                globex_points,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        t
    }

    async fn call_as(&self, key: &str, method: &str, path: &str, body: Value) -> Resp {
        self.w.call(method, path, Some(key), Some(body)).await
    }

    /// The payload of point `id` as the admin sees it.
    async fn payload(&self, id: u64) -> Value {
        let r = self
            .w
            .admin("GET", &format!("/collections/shared/points/{id}"), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json["result"]["payload"].clone()
    }
}

fn error_text(r: &Resp) -> &str {
    r.json["status"]["error"].as_str().unwrap_or("")
}

#[tokio::test]
async fn routes_no_rule_names_are_refused_even_for_the_admin_key() {
    let w = World::new().await;
    // Without a key, or with a bad one, the answer is 401 first, whatever the route.
    let r = w.call("GET", "/foo", None, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "missing_key")
    );
    let r = w.call("GET", "/foo", Some("kg_not-a-key"), None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "malformed_key")
    );
    // The admin key (`*` on everything) still may not use a route the table does not know.
    for (method, path) in [
        ("GET", "/foo"),
        ("POST", "/collections/shared/points/recommend"),
        ("POST", "/collections/shared/points/discover"),
    ] {
        let r = w.admin(method, path, Some(json!({}))).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "unknown_route"),
            "{method} {path}: {}",
            r.text
        );
    }
}

/// The documented answer for a route no rule names: 404 `unknown_route` for an
/// authenticated caller, 401 first without a key.
#[tokio::test]
async fn routes_no_rule_names_are_404_unknown_route() {
    let w = World::new().await;
    let r = w.admin("GET", "/foo", None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "unknown_route")
    );
    let r = w.call("GET", "/foo", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_python_clients_routes_answer_the_admin_key() {
    let t = Tenants::new().await;
    let w = &t.w;
    let calls: [(&str, &str, Value); 14] = [
        (
            "PUT",
            "/collections/shared/index",
            json!({"field_name": "city", "field_schema": "keyword"}),
        ),
        ("DELETE", "/collections/shared/index/city", Value::Null),
        (
            "POST",
            "/collections/shared/points/payload",
            json!({"payload": {"x": 1}, "points": [1]}),
        ),
        (
            "PUT",
            "/collections/shared/points/payload",
            json!({"payload": {"x": 2}, "points": [1]}),
        ),
        (
            "POST",
            "/collections/shared/points/payload/delete",
            json!({"keys": ["x"], "points": [1]}),
        ),
        (
            "POST",
            "/collections/shared/points/payload/clear",
            json!({"points": [1]}),
        ),
        ("GET", "/aliases", Value::Null),
        ("GET", "/collections/shared/aliases", Value::Null),
        (
            "POST",
            "/collections/aliases",
            json!({"actions": [{"create_alias": {"collection_name": "shared", "alias_name": "current"}}]}),
        ),
        (
            "POST",
            "/collections/shared/points/query/batch",
            json!({"searches": [{"query": [1.0, 0.0, 0.0, 0.0], "limit": 1}]}),
        ),
        (
            "POST",
            "/collections/shared/points/search/batch",
            json!({"searches": [{"vector": [1.0, 0.0, 0.0, 0.0], "limit": 1}]}),
        ),
        ("POST", "/collections/shared/facet", json!({"key": "city"})),
        (
            "POST",
            "/collections/shared/points/query/groups",
            json!({"query": [1.0, 0.0, 0.0, 0.0], "group_by": "city"}),
        ),
        (
            "POST",
            "/collections/shared/points/search/groups",
            json!({"vector": [1.0, 0.0, 0.0, 0.0], "group_by": "city"}),
        ),
    ];
    for (method, path, body) in calls {
        let body = (!body.is_null()).then_some(body);
        let r = w.admin(method, path, body).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {}", r.text);
        assert_eq!(r.json["status"], "ok", "{method} {path}: {}", r.text);
    }
}

#[tokio::test]
async fn payload_indexes_show_in_the_collection_info_and_need_collections_manage() {
    let t = Tenants::new().await;
    let w = &t.w;
    let r = w
        .admin(
            "PUT",
            "/collections/shared/index?wait=true",
            Some(json!({"field_name": "city", "field_schema": {"type": "keyword", "is_tenant": false}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["status"], "completed");
    assert!(r.json["result"]["operation_id"].as_u64().is_some());
    let r = w.admin("GET", "/collections/shared", None).await;
    assert_eq!(
        r.json["result"]["payload_schema"],
        json!({"city": {"data_type": "keyword", "points": 5}})
    );
    // A tenant counts only its own points in the schema.
    let r = w
        .call("GET", "/collections/shared", Some(&t.globex), None)
        .await;
    assert_eq!(
        r.json["result"]["payload_schema"]["city"]["points"], 2,
        "{}",
        r.text
    );

    // Bad input: 400 and nothing recorded.
    for bad in [
        json!({"field_name": "n", "field_schema": "vector"}),
        json!({"field_name": "n"}),
        json!({"field_name": "", "field_schema": "keyword"}),
        json!({"field_schema": "keyword"}),
    ] {
        let r = w
            .admin("PUT", "/collections/shared/index", Some(bad.clone()))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    let r = w
        .admin(
            "PUT",
            "/collections/nothing/index",
            Some(json!({"field_name": "n", "field_schema": "keyword"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);

    // The tenants' keys have points:* and collections:read, not collections:manage.
    for (method, path, body) in [
        (
            "PUT",
            "/collections/shared/index",
            Some(json!({"field_name": "tags", "field_schema": "keyword"})),
        ),
        ("DELETE", "/collections/shared/index/city", None),
    ] {
        let r = w.call(method, path, Some(&t.acme), body).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "insufficient_scope"),
            "{method} {path}"
        );
    }
    let r = w
        .admin("DELETE", "/collections/shared/index/city", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w.admin("GET", "/collections/shared", None).await;
    assert_eq!(r.json["result"]["payload_schema"], json!({}));
}

#[tokio::test]
async fn payload_writes_set_overwrite_delete_and_clear() {
    let t = Tenants::new().await;
    let w = &t.w;
    // Set merges, by ids.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/payload",
            Some(json!({"payload": {"rank": 1, "city": "Lyon"}, "points": [1, 2]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["status"], "completed");
    assert_eq!(
        t.payload(1).await,
        json!({"city": "Lyon", "rank": 1, "tags": ["a", "b"], "tenant": "acme"})
    );
    // Set under a key, by filter.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/payload",
            Some(json!({"payload": {"lang": "fr"}, "key": "meta",
                        "filter": {"must": [{"key": "city", "match": {"value": "Lyon"}}]}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(2).await["meta"], json!({"lang": "fr"}));
    assert_eq!(t.payload(3).await.get("meta"), None);
    // Overwrite replaces.
    let r = w
        .admin(
            "PUT",
            "/collections/shared/points/payload",
            Some(json!({"payload": {"only": true}, "points": [5]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(5).await, json!({"only": true}));
    // Delete keys.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/payload/delete",
            Some(json!({"keys": ["rank", "meta"], "points": [1, 2]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        t.payload(2).await,
        json!({"city": "Lyon", "tags": ["b"], "tenant": "acme"})
    );
    // Clear.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/payload/clear",
            Some(json!({"points": [3]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(3).await, json!({}));

    // A missing id: 404, and nothing of the request is applied.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/payload",
            Some(json!({"payload": {"z": 1}, "points": [1, 99]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert_eq!(error_text(&r), "Not found: No point with id 99 found");
    assert_eq!(t.payload(1).await.get("z"), None);
    // Both or neither selector, and bad bodies: 400.
    for bad in [
        json!({"payload": {"z": 1}}),
        json!({"payload": {"z": 1}, "points": [1], "filter": {}}),
        json!({"payload": {"z": 1}, "points": [1], "key": "a.b"}),
        json!({"points": [1]}),
        json!({"payload": [1], "points": [1]}),
    ] {
        let r = w
            .admin(
                "POST",
                "/collections/shared/points/payload",
                Some(bad.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }

    // A read-only key may not write payloads.
    let (reader, _) = w
        .issue(json!({"name": "reader", "scopes": ["points:read"], "collections": ["shared"]}))
        .await;
    for (method, path) in [
        ("POST", "/collections/shared/points/payload"),
        ("PUT", "/collections/shared/points/payload"),
        ("POST", "/collections/shared/points/payload/delete"),
        ("POST", "/collections/shared/points/payload/clear"),
    ] {
        let r = w
            .call(
                method,
                path,
                Some(&reader),
                Some(json!({"payload": {}, "keys": [], "points": [1]})),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "insufficient_scope"),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn payload_writes_touch_only_the_tenants_points() {
    let t = Tenants::new().await;
    let globex_4 = t.payload(4).await;
    let globex_5 = t.payload(5).await;

    // By filter: acme's "everything" is only acme's points; the tenant field stays acme.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/payload",
            json!({"payload": {"seen": true, "tenant": "globex"}, "filter": {}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for id in [1, 2, 3] {
        let p = t.payload(id).await;
        assert_eq!(
            (p["seen"].clone(), p["tenant"].clone()),
            (json!(true), json!("acme"))
        );
    }
    // By id: globex's point is answered like a missing one, and nothing is applied.
    for (method, path, body) in [
        (
            "POST",
            "/collections/shared/points/payload",
            json!({"payload": {"owned": 1}, "points": [1, 4]}),
        ),
        (
            "PUT",
            "/collections/shared/points/payload",
            json!({"payload": {"owned": 1}, "points": [4]}),
        ),
        (
            "POST",
            "/collections/shared/points/payload/delete",
            json!({"keys": ["city"], "points": [5]}),
        ),
        (
            "POST",
            "/collections/shared/points/payload/clear",
            json!({"points": [4, 5]}),
        ),
    ] {
        let r = t.call_as(&t.acme, method, path, body).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            r.text
        );
        assert!(error_text(&r).starts_with("Not found: No point with id"));
    }
    assert_eq!(t.payload(1).await.get("owned"), None);
    // Overwrite, delete and clear by filter: acme's points only, which keep their tenant.
    let r = t
        .call_as(
            &t.acme,
            "PUT",
            "/collections/shared/points/payload",
            json!({"payload": {"v": 2}, "filter": {"must": [{"key": "city", "match": {"value": "Paris"}}]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(1).await, json!({"v": 2, "tenant": "acme"}));
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/payload/delete",
            json!({"keys": ["tenant", "city"], "filter": {}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(3).await["tenant"], "acme");
    assert_eq!(t.payload(3).await.get("city"), None);
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/payload/clear",
            json!({"filter": {}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.payload(2).await, json!({"tenant": "acme"}));
    // globex's points are as they were.
    assert_eq!(t.payload(4).await, globex_4);
    assert_eq!(t.payload(5).await, globex_5);
}

/// Ids are per tenant: a payload write by id changes only the caller's own point with that
/// id, and takes its operation id from the caller's counter.
#[tokio::test]
async fn payload_writes_by_a_shared_id_change_only_the_callers_point() {
    let t = Tenants::new().await;
    let read = |key: &str, id: u64| {
        let key = key.to_owned();
        let w = &t.w;
        async move {
            let r = w
                .call(
                    "GET",
                    &format!("/collections/shared/points/{id}"),
                    Some(&key),
                    None,
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r.json["result"]["payload"].clone()
        }
    };
    // acme takes id 4, which globex also owns (acme's second write: operation 2).
    let r = t
        .call_as(
            &t.acme,
            "PUT",
            "/collections/shared/points",
            json!({"points": [{"id": 4, "vector": [1.0, 4.0, 0.5, 0.25], "payload": {"city": "Lima"}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["operation_id"], 2, "{}", r.text);
    let globex_4 = read(&t.globex, 4).await;
    assert_eq!(globex_4["city"], "Paris");

    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/payload",
            json!({"payload": {"seen": true}, "points": [4]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["operation_id"], 3, "{}", r.text);
    assert_eq!(
        read(&t.acme, 4).await,
        json!({"city": "Lima", "seen": true, "tenant": "acme"})
    );
    assert_eq!(read(&t.globex, 4).await, globex_4);

    // globex's counter is its own: its first payload write is its second operation.
    let r = t
        .call_as(
            &t.globex,
            "POST",
            "/collections/shared/points/payload/clear",
            json!({"points": [4]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["operation_id"], 2, "{}", r.text);
    assert_eq!(read(&t.globex, 4).await, json!({"tenant": "globex"}));
    assert_eq!(read(&t.acme, 4).await["seen"], true);

    // An operator's write may not leave an id with two points of one tenant: refused, and
    // nothing applied.
    let r =
        t.w.admin(
            "PUT",
            "/collections/shared/points/payload",
            Some(json!({"payload": {"tenant": "acme"}, "points": [4]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(read(&t.globex, 4).await, json!({"tenant": "globex"}));
    assert_eq!(read(&t.acme, 4).await["city"], "Lima");
}

#[tokio::test]
async fn aliases_resolve_to_collections_the_key_may_access() {
    let t = Tenants::new().await;
    let w = &t.w;
    w.collection("private").await;
    let r = w
        .admin(
            "POST",
            "/collections/aliases",
            Some(json!({"actions": [
                {"create_alias": {"collection_name": "shared", "alias_name": "shared-current"}},
                {"create_alias": {"collection_name": "private", "alias_name": "shared-secret"}},
            ]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"], true);
    let r = w.admin("GET", "/aliases", None).await;
    assert_eq!(
        r.json["result"]["aliases"],
        json!([
            {"alias_name": "shared-current", "collection_name": "shared"},
            {"alias_name": "shared-secret", "collection_name": "private"},
        ])
    );
    let r = w.admin("GET", "/collections/private/aliases", None).await;
    assert_eq!(
        r.json["result"]["aliases"],
        json!([{"alias_name": "shared-secret", "collection_name": "private"}])
    );

    // Through the alias, acme reads the collection, and still only its own points.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared-current/points/count",
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["count"], 3);
    // acme may use the name `shared-secret`, but not the collection it names.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared-secret/points/count",
            json!({}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "resource_forbidden"),
        "{}",
        r.text
    );
    // Listings show only aliases whose name and collection the key may access.
    let r = w.call("GET", "/aliases", Some(&t.acme), None).await;
    assert_eq!(
        r.json["result"]["aliases"],
        json!([{"alias_name": "shared-current", "collection_name": "shared"}])
    );
    // The audit log names the collection really touched.
    let touched: Vec<String> = w
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request().map(|r| r.path.to_string()))
        .filter(|p| p.ends_with("/points/count"))
        .collect();
    assert_eq!(
        touched,
        [
            "/collections/shared/points/count",
            "/collections/private/points/count"
        ]
    );

    // Changing aliases needs collections:manage, and access to every name it uses.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/aliases",
            json!({"actions": [{"delete_alias": {"alias_name": "shared-current"}}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    let (manager, _) = w
        .issue(json!({"name": "manager", "scopes": ["collections:*", "points:read"], "collections": ["shared*"]}))
        .await;
    for actions in [
        json!([{"create_alias": {"collection_name": "private", "alias_name": "shared-mine"}}]),
        json!([{"create_alias": {"collection_name": "shared", "alias_name": "elsewhere"}}]),
        json!([{"delete_alias": {"alias_name": "shared-secret"}}]),
        json!([{"rename_alias": {"old_alias_name": "shared-secret", "new_alias_name": "shared-x"}}]),
    ] {
        let r = w
            .call(
                "POST",
                "/collections/aliases",
                Some(&manager),
                Some(json!({ "actions": actions })),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{actions}: {}", r.text);
    }
    // All or nothing: a failing action leaves the earlier ones undone.
    let r = w
        .call(
            "POST",
            "/collections/aliases",
            Some(&manager),
            Some(json!({"actions": [
                {"rename_alias": {"old_alias_name": "shared-current", "new_alias_name": "shared-now"}},
                {"delete_alias": {"alias_name": "shared-gone"}},
            ]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = w.admin("GET", "/collections/shared/aliases", None).await;
    assert_eq!(
        r.json["result"]["aliases"],
        json!([{"alias_name": "shared-current", "collection_name": "shared"}])
    );
    let r = w
        .call(
            "POST",
            "/collections/aliases",
            Some(&manager),
            Some(json!({"actions": [
                {"rename_alias": {"old_alias_name": "shared-current", "new_alias_name": "shared-now"}},
            ]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared-now/points/scroll",
            json!({}),
        )
        .await;
    assert_eq!(ids(&r.json["result"]["points"]), [1, 2, 3]);

    // An alias cannot take a collection's name, nor a collection an alias's.
    let r = w
        .admin(
            "POST",
            "/collections/aliases",
            Some(json!({"actions": [{"create_alias": {"collection_name": "shared", "alias_name": "private"}}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let r = w
        .admin(
            "PUT",
            "/collections/shared-now",
            Some(json!({"vectors": {"size": 4, "distance": "Cosine"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    // Deleting a collection drops its aliases.
    let r = w.admin("DELETE", "/collections/private", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w.admin("GET", "/aliases", None).await;
    assert_eq!(
        r.json["result"]["aliases"],
        json!([{"alias_name": "shared-now", "collection_name": "shared"}])
    );
}

#[tokio::test]
async fn batches_answer_each_request_and_keep_tenants_apart() {
    let t = Tenants::new().await;
    let w = &t.w;
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/search/batch",
            Some(json!({"searches": [
                {"vector": [1.0, 5.0, 0.5, 0.25], "limit": 1},
                {"vector": [1.0, 1.0, 0.5, 0.25], "limit": 2, "with_payload": ["city"]},
            ]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"][0]), [5]);
    assert_eq!(ids(&r.json["result"][1]), [1, 2]);
    assert_eq!(r.json["result"][1][0]["payload"], json!({"city": "Paris"}));
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/query/batch",
            Some(json!({"searches": [{"query": 5, "limit": 1}, {"limit": 2}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"][0]["points"]), [5]);
    assert_eq!(ids(&r.json["result"][1]["points"]), [1, 2]);

    // A tenant's batch sees only its points; querying another tenant's point id is 404.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/search/batch",
            json!({"searches": [{"vector": [1.0, 5.0, 0.5, 0.25], "limit": 10}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"][0]), [3, 2, 1]);
    let r = t
        .call_as(
            &t.globex,
            "POST",
            "/collections/shared/points/query/batch",
            json!({"searches": [{"limit": 10}, {"query": 1}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = t
        .call_as(
            &t.globex,
            "POST",
            "/collections/shared/points/query/batch",
            json!({"searches": [{"limit": 10}]}),
        )
        .await;
    assert_eq!(ids(&r.json["result"][0]["points"]), [4, 5]);

    // One bad request fails the batch with its own error; too many requests are refused.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/search/batch",
            Some(json!({"searches": [{"vector": [1.0], "limit": 1}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(
        error_text(&r).contains("Vector dimension error"),
        "{}",
        r.text
    );
    // (101 requests cost 101: more than the admin key's 100 per second, refused first.)
    let (big, _) = w
        .issue(
            json!({"name": "big", "scopes": ["points:read"], "collections": ["shared"],
                      "rate_limits": ["burst=1000/s"]}),
        )
        .await;
    let many: Vec<Value> = (0..101).map(|_| json!({"limit": 1})).collect();
    let r = w
        .call(
            "POST",
            "/collections/shared/points/query/batch",
            Some(&big),
            Some(json!({ "searches": many })),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(error_text(&r).contains("at most 100"), "{}", r.text);
    // Reads: a key without points:read is refused.
    let (writer, _) = w
        .issue(json!({"name": "writer", "scopes": ["points:write"], "collections": ["shared"]}))
        .await;
    for path in [
        "/collections/shared/points/search/batch",
        "/collections/shared/points/query/batch",
        "/collections/shared/facet",
        "/collections/shared/points/search/groups",
        "/collections/shared/points/query/groups",
    ] {
        let r = w.call("POST", path, Some(&writer), Some(json!({}))).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "insufficient_scope"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn facets_count_only_the_tenants_points() {
    let t = Tenants::new().await;
    let w = &t.w;
    let r = w
        .admin(
            "POST",
            "/collections/shared/facet",
            Some(json!({"key": "city"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["result"]["hits"],
        json!([
            {"value": "Paris", "count": 3},
            {"value": "Oslo", "count": 1},
            {"value": "Rome", "count": 1},
        ])
    );
    // Arrays count each value once per point; limit and filter apply.
    let r = w
        .admin(
            "POST",
            "/collections/shared/facet",
            Some(json!({"key": "tags", "limit": 2,
                        "filter": {"must_not": [{"key": "city", "match": {"value": "Rome"}}]}})),
        )
        .await;
    assert_eq!(
        r.json["result"]["hits"],
        json!([{"value": "a", "count": 3}, {"value": "b", "count": 2}])
    );
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/facet",
            json!({"key": "city"}),
        )
        .await;
    assert_eq!(
        r.json["result"]["hits"],
        json!([{"value": "Paris", "count": 2}, {"value": "Oslo", "count": 1}])
    );
    let r = t
        .call_as(
            &t.globex,
            "POST",
            "/collections/shared/facet",
            json!({"key": "tenant"}),
        )
        .await;
    assert_eq!(
        r.json["result"]["hits"],
        json!([{"value": "globex", "count": 2}])
    );
    let r = w
        .admin(
            "POST",
            "/collections/shared/facet",
            Some(json!({"limit": 2})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = w
        .admin(
            "POST",
            "/collections/none/facet",
            Some(json!({"key": "city"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
}

#[tokio::test]
async fn groups_hold_only_the_tenants_points() {
    let t = Tenants::new().await;
    let w = &t.w;
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/search/groups",
            Some(
                json!({"vector": [1.0, 4.0, 0.5, 0.25], "group_by": "city", "group_size": 2,
                        "limit": 2, "with_payload": ["city"]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let groups = &r.json["result"]["groups"];
    assert_eq!(groups.as_array().map(Vec::len), Some(2), "{}", r.text);
    assert_eq!(groups[0]["id"], "Paris");
    assert_eq!(ids(&groups[0]["hits"]), [4, 2]);
    assert_eq!(groups[0]["hits"][0]["payload"], json!({"city": "Paris"}));
    assert_eq!(groups[1]["id"], "Rome");
    // Arrays: a point is in each of its groups.
    let r = w
        .admin(
            "POST",
            "/collections/shared/points/query/groups",
            Some(json!({"group_by": "tags", "group_size": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let groups = &r.json["result"]["groups"];
    assert_eq!(groups[0]["id"], "a");
    assert_eq!(ids(&groups[0]["hits"]), [1, 3, 4]);
    assert_eq!(groups[1]["id"], "b");
    assert_eq!(ids(&groups[1]["hits"]), [1, 2]);

    // acme's groups: only acme's points, never Rome (globex only) nor point 4.
    for (path, body) in [
        (
            "/collections/shared/points/search/groups",
            json!({"vector": [1.0, 4.0, 0.5, 0.25], "group_by": "city", "group_size": 5}),
        ),
        (
            "/collections/shared/points/query/groups",
            json!({"query": [1.0, 4.0, 0.5, 0.25], "group_by": "city", "group_size": 5}),
        ),
    ] {
        let r = t.call_as(&t.acme, "POST", path, body).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        let groups = &r.json["result"]["groups"];
        assert_eq!(groups[0]["id"], "Oslo", "{path}: {}", r.text);
        assert_eq!(ids(&groups[0]["hits"]), [3]);
        assert_eq!(groups[1]["id"], "Paris");
        assert_eq!(ids(&groups[1]["hits"]), [2, 1]);
        assert_eq!(groups.as_array().map(Vec::len), Some(2));
    }
    // A query by another tenant's point id is a missing point.
    let r = t
        .call_as(
            &t.acme,
            "POST",
            "/collections/shared/points/query/groups",
            json!({"query": 4, "group_by": "city"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // Bad input.
    for bad in [
        json!({"vector": [1.0, 0.0, 0.0, 0.0]}),
        json!({"vector": [1.0, 0.0, 0.0, 0.0], "group_by": "city", "group_size": 0}),
        json!({"vector": [1.0, 0.0, 0.0, 0.0], "group_by": "city", "limit": 10001}),
        json!({"group_by": "city"}),
        json!({"vector": [1.0, 0.0, 0.0, 0.0], "group_by": "city", "with_lookup": "other"}),
    ] {
        let r = w
            .admin(
                "POST",
                "/collections/shared/points/search/groups",
                Some(bad.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
}

#[tokio::test]
async fn a_batch_costs_its_number_of_requests() {
    let t = Tenants::new().await;
    let w = &t.w;
    let (key, _) = w
        .issue(
            json!({"name": "slow", "scopes": ["points:read"], "collections": ["shared"],
                      "rate_limits": ["burst=5/m"]}),
        )
        .await;
    let three = json!({"searches": [{"limit": 1}, {"limit": 1}, {"query": 1, "limit": 1}]});
    let r = w
        .call(
            "POST",
            "/collections/shared/points/query/batch",
            Some(&key),
            Some(three.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=2;t=36"#));
    // Three more do not fit in the two left; nothing is answered.
    let r = w
        .call(
            "POST",
            "/collections/shared/points/search/batch",
            Some(&key),
            Some(json!({"searches": [
                {"vector": [1.0, 0.0, 0.0, 0.0], "limit": 1},
                {"vector": [1.0, 0.0, 0.0, 0.0], "limit": 1},
                {"vector": [1.0, 0.0, 0.0, 0.0], "limit": 1},
            ]})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        r.text
    );
    // An unreadable batch costs one and is refused by the handler.
    let r = w
        .call(
            "POST",
            "/collections/shared/points/query/batch",
            Some(&key),
            Some(json!({"searches": 3})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.header("ratelimit"), Some(r#""burst";r=1;t=48"#));
}
