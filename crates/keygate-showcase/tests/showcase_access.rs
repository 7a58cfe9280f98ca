//! The showcase over a real socket: open routes, scoped keys, read-only keys, per-collection
//! keys, tenant isolation, and revocation and rotation through the admin API.

mod showcase_support;

use std::time::Duration;

use http::StatusCode;
use keygate::core::audit::Decision;
use keygate::DenialCode;
use serde_json::json;
use showcase_support::*;

#[tokio::test]
async fn open_routes_need_no_key_and_the_api_needs_one() {
    let w = World::new().await;
    let r = w.call("GET", "/healthz", None, None).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::OK, "healthz check passed")
    );
    let r = w.call("GET", "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = w.call("GET", "/", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["version"], "1.19.0");

    let r = w.call("GET", "/collections", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "missing_key");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let r = w
        .call("GET", "/collections", Some("kg_not-a-key"), None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "malformed_key")
    );

    // The open routes are outside the stack: not audited. The denied ones are.
    let paths: Vec<String> = w
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request().map(|r| r.path.to_string()))
        .collect();
    assert_eq!(paths, ["/collections", "/collections"]);
}

#[tokio::test]
async fn read_only_keys_read_and_are_refused_writes() {
    let w = World::new().await;
    w.collection("docs-a").await;
    w.collection("private").await;
    let r = w
        .admin("PUT", "/collections/docs-a/points", Some(points(1, 3)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["status"], "completed");
    let (reader, _) = w
        .issue(json!({"name": "reader", "scopes": ["points:read", "collections:read"], "collections": ["docs*"]}))
        .await;
    let key = Some(reader.as_str());

    let search = json!({"vector": [1.0, 2.0, 0.5, 0.25], "limit": 2});
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points/search",
            key,
            Some(search.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(ids(&r.json["result"]), [2, 3], "nearest first");
    assert_eq!(r.json["status"], "ok");
    assert!(r.json["time"].is_f64());
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points/query",
            key,
            Some(json!({"query": 1, "limit": 1, "with_payload": true})),
        )
        .await;
    assert_eq!(ids(&r.json["result"]["points"]), [1], "query by point id");
    assert_eq!(r.json["result"]["points"][0]["payload"]["n"], 1);
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points/scroll",
            key,
            Some(json!({"limit": 2})),
        )
        .await;
    assert_eq!(ids(&r.json["result"]["points"]), [1, 2]);
    assert_eq!(r.json["result"]["next_page_offset"], 3);
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points/count",
            key,
            Some(json!({"filter": {"must": [{"key": "n", "range": {"gte": 2}}]}})),
        )
        .await;
    assert_eq!(r.json["result"]["count"], 2);
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points",
            key,
            Some(json!({"ids": [3, 9]})),
        )
        .await;
    assert_eq!(ids(&r.json["result"]), [3]);
    let r = w
        .call("GET", "/collections/docs-a/points/2", key, None)
        .await;
    assert_eq!(r.json["result"]["payload"]["n"], 2);
    let r = w.call("GET", "/collections/docs-a", key, None).await;
    assert_eq!(r.json["result"]["points_count"], 3);

    // Writes: 403 insufficient_scope, naming the scope needed.
    let r = w
        .call(
            "PUT",
            "/collections/docs-a/points",
            key,
            Some(points(10, 1)),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"points:write\""));
    let r = w
        .call(
            "POST",
            "/collections/docs-a/points/delete",
            key,
            Some(json!({"points": [1]})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    let r = w
        .call(
            "PUT",
            "/collections/docs-new",
            key,
            Some(json!({"vectors": {"size": 4, "distance": "Dot"}})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    let r = w.call("DELETE", "/collections/docs-a", key, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    // Nothing changed.
    let r = w
        .admin("POST", "/collections/docs-a/points/count", None)
        .await;
    assert_eq!(r.json["result"]["count"], 3);
    // Another collection: 403 resource_forbidden; the admin API: insufficient_scope.
    let r = w
        .call(
            "POST",
            "/collections/private/points/search",
            key,
            Some(search),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "resource_forbidden")
    );
    let r = w.call("GET", "/admin/keys", key, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
}

#[tokio::test]
async fn write_only_and_per_collection_keys() {
    let w = World::new().await;
    for c in ["docs-a", "docs-b", "team-x"] {
        w.collection(c).await;
    }
    let (writer, _) = w
        .issue(json!({"name": "ingest", "scopes": ["points:write"], "collections": ["docs-a"]}))
        .await;
    let key = Some(writer.as_str());
    let r = w
        .call("PUT", "/collections/docs-a/points", key, Some(points(1, 2)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w
        .call("POST", "/collections/docs-a/points/count", key, None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "insufficient_scope")
    );
    let r = w
        .call("PUT", "/collections/docs-b/points", key, Some(points(1, 2)))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "resource_forbidden")
    );

    // GET /collections lists only what the key may see.
    let (lister, _) = w
        .issue(json!({"name": "lister", "scopes": ["collections:read"], "collections": ["docs-*"]}))
        .await;
    let r = w.call("GET", "/collections", Some(&lister), None).await;
    assert_eq!(
        r.json["result"]["collections"],
        json!([{"name": "docs-a"}, {"name": "docs-b"}])
    );
    let r = w.admin("GET", "/collections", None).await;
    assert_eq!(r.json["result"]["collections"].as_array().unwrap().len(), 3);
    let r = w
        .call("GET", "/collections/team-x/exists", Some(&lister), None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "resource_forbidden")
    );
    let r = w
        .call("GET", "/collections/docs-b/exists", Some(&lister), None)
        .await;
    assert_eq!(r.json["result"]["exists"], true);
}

#[tokio::test]
async fn tenants_never_see_or_touch_each_others_points() {
    let w = World::new().await;
    w.collection("shared").await;
    let spec = |tenant: &str| {
        json!({"name": tenant, "scopes": ["points:*", "collections:*"], "collections": ["shared"],
               "attributes": {"tenant": tenant}})
    };
    let (acme, _) = w.issue(spec("acme")).await;
    let (globex, _) = w.issue(spec("globex")).await;
    let (acme, globex) = (Some(acme.as_str()), Some(globex.as_str()));

    // acme writes 1 and 2, claiming globex in the payload: the server stamps acme.
    let mut body = points(1, 2);
    body["points"][0]["payload"]["tenant"] = json!("globex");
    let r = w
        .call("PUT", "/collections/shared/points", acme, Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w
        .call(
            "PUT",
            "/collections/shared/points",
            globex,
            Some(points(3, 1)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // (An id of acme's is free for globex: ids are per tenant, see
    // `foreign_ids_answer_exactly_as_absent_ones` in showcase_input.rs.)

    let everything = json!({"limit": 100, "with_payload": true});
    let r = w
        .call(
            "POST",
            "/collections/shared/points/scroll",
            acme,
            Some(everything.clone()),
        )
        .await;
    assert_eq!(ids(&r.json["result"]["points"]), [1, 2]);
    assert!(r.json["result"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["payload"]["tenant"] == "acme"));
    let r = w
        .call(
            "POST",
            "/collections/shared/points/scroll",
            globex,
            Some(everything.clone()),
        )
        .await;
    assert_eq!(ids(&r.json["result"]["points"]), [3]);
    let r = w
        .call(
            "POST",
            "/collections/shared/points/search",
            globex,
            Some(json!({"vector": [1.0, 1.0, 0.5, 0.25], "limit": 10})),
        )
        .await;
    assert_eq!(ids(&r.json["result"]), [3]);
    let r = w
        .call(
            "POST",
            "/collections/shared/points/query",
            globex,
            Some(json!({"query": 1})),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "acme's point is not a query target for globex"
    );
    let r = w
        .call("POST", "/collections/shared/points/count", globex, None)
        .await;
    assert_eq!(r.json["result"]["count"], 1);
    let r = w
        .call(
            "POST",
            "/collections/shared/points",
            globex,
            Some(json!({"ids": [1, 2, 3]})),
        )
        .await;
    assert_eq!(ids(&r.json["result"]), [3]);
    let r = w
        .call("GET", "/collections/shared/points/1", globex, None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = w.call("GET", "/collections/shared", globex, None).await;
    assert_eq!(r.json["result"]["points_count"], 1);
    // A filter cannot widen the view.
    let r = w
        .call(
            "POST",
            "/collections/shared/points/count",
            globex,
            Some(json!({"filter": {"must": [{"key": "tenant", "match": {"value": "acme"}}]}})),
        )
        .await;
    assert_eq!(r.json["result"]["count"], 0);
    // globex deleting acme's points (by id, by filter) deletes nothing of acme's.
    w.call(
        "POST",
        "/collections/shared/points/delete",
        globex,
        Some(json!({"points": [1, 2]})),
    )
    .await;
    w.call(
        "POST",
        "/collections/shared/points/delete",
        globex,
        Some(json!({"filter": {}})),
    )
    .await;
    let r = w
        .call("POST", "/collections/shared/points/count", acme, None)
        .await;
    assert_eq!(r.json["result"]["count"], 2);
    let r = w
        .call("POST", "/collections/shared/points/count", globex, None)
        .await;
    assert_eq!(r.json["result"]["count"], 0);
    // Nor may a tenant drop a collection holding another tenant's points.
    let r = w.call("DELETE", "/collections/shared", globex, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A key without a tenant sees everything.
    let r = w
        .admin("POST", "/collections/shared/points/count", None)
        .await;
    assert_eq!(r.json["result"]["count"], 2);
    // The audit records carry the tenant.
    let tenants: Vec<Option<String>> = w
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request())
        .filter(|r| r.path == "/collections/shared/points/scroll")
        .map(|r| r.tenant.as_deref().map(str::to_owned))
        .collect();
    assert_eq!(tenants, [Some("acme".into()), Some("globex".into())]);
}

#[tokio::test]
async fn revocation_through_the_admin_api_holds_on_the_next_request() {
    let w = World::new().await;
    w.collection("docs").await;
    let (key, id) = w
        .issue(json!({"name": "doomed", "scopes": ["points:read"], "collections": ["docs"]}))
        .await;
    let count = || w.call("POST", "/collections/docs/points/count", Some(&key), None);
    assert_eq!(count().await.status, StatusCode::OK);

    let r = w
        .admin("POST", &format!("/admin/keys/{id}/disable"), None)
        .await;
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (StatusCode::OK, Some("disabled"))
    );
    let r = count().await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_key")
    );
    let r = w
        .admin("POST", &format!("/admin/keys/{id}/enable"), Some(json!({})))
        .await;
    assert_eq!(r.json["status"], "active");
    assert_eq!(count().await.status, StatusCode::OK);

    let r = w
        .admin("POST", &format!("/admin/keys/{id}/revoke"), None)
        .await;
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (StatusCode::OK, Some("revoked"))
    );
    let r = count().await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_key")
    );
    // The client reads invalid_key; the audit log keeps the exact reason.
    let last = w
        .sink
        .events()
        .into_iter()
        .rev()
        .find_map(|e| e.as_request().cloned())
        .unwrap();
    assert_eq!(
        (last.decision, last.denial),
        (Decision::Denied, Some(DenialCode::RevokedKey))
    );
    // Revoked is final.
    let r = w
        .admin("POST", &format!("/admin/keys/{id}/enable"), None)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "wrong_status"));
    let r = w.admin("GET", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(r.json["status"], "revoked");
}

#[tokio::test]
async fn rotation_through_the_admin_api_with_a_grace_period() {
    let w = World::new().await;
    w.collection("docs").await;
    let (old, id) = w
        .issue(json!({"name": "ci", "scopes": ["points:read"], "collections": ["docs"]}))
        .await;
    let r = w
        .admin(
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace": "1h"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["rotated_from"], id.as_str());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let new = r.json["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let count = |k: &str| {
        let k = k.to_owned();
        let w = &w;
        async move {
            w.call("POST", "/collections/docs/points/count", Some(&k), None)
                .await
        }
    };
    assert_eq!(count(&new).await.status, StatusCode::OK);
    assert_eq!(
        count(&old).await.status,
        StatusCode::OK,
        "inside the grace period"
    );
    w.clock.advance(Duration::from_secs(3601));
    let r = count(&old).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "expired_key")
    );
    assert_eq!(count(&new).await.status, StatusCode::OK);
    // Rotating without grace: the old key stops at once.
    let new_id = key_id(&new);
    let r = w
        .admin("POST", &format!("/admin/keys/{new_id}/rotate"), None)
        .await;
    let newer = r.json["key"].as_str().unwrap().to_owned();
    assert_eq!(count(&new).await.code(), "expired_key");
    assert_eq!(count(&newer).await.status, StatusCode::OK);
}

/// The id of the key `plain` (its 12 characters after the prefix).
fn key_id(plain: &str) -> String {
    plain["kg_".len().."kg_".len() + 12].to_owned()
}
