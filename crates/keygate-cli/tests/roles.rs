//! `keygate roles ...`, `keygate identities ...`, `keygate keys create --role/--identity`,
//! `keygate keys update` and `keygate usage --identity`, run as processes against SQLite
//! and PostgreSQL: the changes reach a `Verifier` over the same store, JSON shapes, and bad
//! input failing with exit 2 (or 1), one line on stderr, and nothing changed.

mod common;

use common::*;
use keygate_core::usage::{Admission, Limit, UsageStore, Window};
use keygate_core::{KeyId, KeyStore, QuotaWindow, Scope, Verifier};
use serde_json::{json, Value};

fn id_of(v: &Value) -> KeyId {
    KeyId::parse(v["id"].as_str().unwrap()).unwrap()
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap()
}

async fn roles_and_keys_update(env: &Env) {
    // A role: read points on shared, with a rate limit and an attribute.
    let role = env
        .run(&[
            "roles",
            "create",
            "vector-reader",
            "--json",
            "--scope",
            "points:read",
            "--collection",
            "shared",
            "--rate",
            "burst=5/s",
            "--attr",
            "tier=reader",
        ])
        .ok()
        .json();
    assert_eq!(role["name"], "vector-reader");
    assert_eq!(
        role["grants"],
        json!([{"scopes": ["points:read"], "collections": ["shared"]}])
    );
    assert_eq!(role["version"], 0);
    // A key that writes docs-* on its own and holds the role.
    let key = create(
        env,
        &[
            "--name",
            "ingest",
            "--scope",
            "points:write",
            "--collection",
            "docs-*",
            "--role",
            "vector-reader",
        ],
    );
    assert_eq!(key["roles"], json!(["vector-reader"]));
    let id = id_of(&key);
    let secret = key["key"].as_str().unwrap().to_owned();
    let store = env.store().await;
    let verifier = Verifier::new(store.clone());
    let p = verifier.verify(&secret).await.unwrap();
    assert!(p.permits(&scope("points:write"), "docs-1"));
    assert!(p.permits(&scope("points:read"), "shared"));
    assert!(!p.permits(&scope("points:write"), "shared"));
    assert_eq!(p.attribute("tier"), Some("reader"));

    // roles list / show.
    let listed = env.run(&["roles", "list", "--json"]).ok().json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let shown = env
        .run(&["roles", "show", "vector-reader", "--json"])
        .ok()
        .json();
    assert_eq!(shown["keys"], json!([id.to_string()]));
    let text = env.run(&["roles", "list"]).ok().stdout.clone();
    assert!(text.contains("points:read on shared"), "{text}");

    // roles update: the key reads docs-* too from now on (a fresh verifier: no follower).
    let updated = env
        .run(&[
            "roles",
            "update",
            "vector-reader",
            "--json",
            "--scope",
            "points:read",
            "--collection",
            "shared",
            "--collection",
            "docs-*",
        ])
        .ok()
        .json();
    assert_eq!(updated["version"], 1);
    let p = Verifier::new(store.clone()).verify(&secret).await.unwrap();
    assert!(p.permits(&scope("points:read"), "docs-1"));

    // keys update: remove the role, narrow the collections, set an expiry.
    let out = env
        .run(&[
            "keys",
            "update",
            &id.to_string(),
            "--json",
            "--remove-role",
            "vector-reader",
            "--collection",
            "docs-a",
            "--expires-in",
            "30d",
        ])
        .ok()
        .json();
    assert!(out.get("roles").is_none(), "no roles left: {out}");
    assert_eq!(out["resources"], json!(["docs-a"]));
    assert!(out["expires_at"].is_string());
    let p = Verifier::new(store.clone()).verify(&secret).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "shared"));
    assert!(!p.permits(&scope("points:write"), "docs-1"));
    assert!(p.permits(&scope("points:write"), "docs-a"));
    let stored = store.get(&id).await.unwrap().unwrap();
    assert!(stored.version >= 1);

    // Bad input: exit 2 (or 1 for an unknown name), one line, nothing changed.
    let before = store.get(&id).await.unwrap().unwrap();
    env.run(&["keys", "update", &id.to_string(), "--role", "nope"])
        .fails(2);
    env.run(&["keys", "update", &id.to_string(), "--scope", "bad scope"])
        .fails(2);
    env.run(&["keys", "update", &id.to_string()]).fails(2);
    env.run(&["keys", "update", "AAAAAAAAAAAA", "--name", "x"])
        .fails(1);
    env.run(&["keys", "create", "--name", "x", "--role", "nope"])
        .fails(2);
    env.run(&["keys", "create", "--name", "x", "--role", "bad name"])
        .fails(2);
    env.run(&["roles", "create", "bad name"]).fails(2);
    env.run(&["roles", "create", "r2", "--collection", "x"])
        .fails(2);
    env.run(&["roles", "create", "vector-reader"]).fails(1);
    env.run(&["roles", "update", "ghost", "--scope", "points:read"])
        .fails(1);
    env.run(&["roles", "update", "vector-reader"]).fails(2);
    let after = store.get(&id).await.unwrap().unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(after.info(), before.info());
    assert_eq!(store.list_roles().await.unwrap().len(), 1);
    assert_eq!(store.list(&Default::default()).await.unwrap().len(), 1);

    // roles delete.
    env.run(&["roles", "delete", "vector-reader", "--json"])
        .ok();
    env.run(&["roles", "delete", "vector-reader"]).fails(1);
    assert!(store.list_roles().await.unwrap().is_empty());
}
both!(
    sqlite_roles_and_keys_update,
    postgres_roles_and_keys_update,
    roles_and_keys_update
);

async fn identities_and_usage(env: &Env) {
    let made = env
        .run(&[
            "identities",
            "create",
            "etl-pipeline",
            "--json",
            "--rate",
            "burst=50/s",
            "--quota",
            "etl-daily=1000/d",
            "--meta",
            r#"{"team":"data"}"#,
        ])
        .ok()
        .json();
    assert_eq!(made["name"], "etl-pipeline");
    assert_eq!(made["metadata"], json!({"team": "data"}));
    env.run(&["identities", "create", "etl-pipeline"]).fails(1);
    env.run(&["identities", "create", "bad/name"]).fails(2);
    let a = create(
        env,
        &[
            "--name",
            "a",
            "--identity",
            "etl-pipeline",
            "--quota",
            "daily=100/d",
        ],
    );
    let b = create(
        env,
        &[
            "--name",
            "b",
            "--identity",
            "etl-pipeline",
            "--quota",
            "daily=100/d",
        ],
    );
    create(env, &["--name", "other", "--quota", "daily=100/d"]);
    env.run(&["keys", "create", "--name", "x", "--identity", "ghost"])
        .fails(2);
    let shown = env
        .run(&["identities", "show", "etl-pipeline", "--json"])
        .ok()
        .json();
    assert_eq!(shown["keys"].as_array().unwrap().len(), 2);
    let listed = env.run(&["identities", "list", "--json"]).ok().json();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // Use: a spends 3, b spends 4; the identity's total is 7.
    let store = env.store().await;
    let usage = store.usage_store();
    let now = std::time::SystemTime::now();
    for (key, n) in [(&a, 3u64), (&b, 4)] {
        let id = id_of(key);
        let windows = [Window::containing(QuotaWindow::Day, now)];
        let limits = [Limit {
            window: 0,
            limit: 100,
        }];
        let r = usage
            .check_and_add(&id, &windows, &limits, n)
            .await
            .unwrap();
        assert!(matches!(r, Admission::Admitted(_)));
    }
    // The identity's own quota, one count for all its keys, under its usage id.
    let shared_id = keygate_core::Identity::usage_id("etl-pipeline");
    let day = [Window::containing(QuotaWindow::Day, now)];
    let one = [Limit {
        window: 0,
        limit: 1000,
    }];
    let r = usage
        .check_and_add(&shared_id, &day, &one, 9)
        .await
        .unwrap();
    assert!(matches!(r, Admission::Admitted(_)));
    let out = env
        .run(&["usage", "--identity", "etl-pipeline", "--json"])
        .ok()
        .json();
    assert_eq!(out["identity"], "etl-pipeline");
    assert_eq!(out["usage_id"], shared_id.to_string());
    assert_eq!(out["shared"][0]["name"], "etl-daily");
    assert_eq!(out["shared"][0]["used"], 9);
    assert_eq!(out["shared"][0]["remaining"], 991);
    assert_eq!(out["keys"].as_array().unwrap().len(), 2);
    assert_eq!(out["totals"][0]["name"], "daily");
    assert_eq!(out["totals"][0]["used"], 7);
    let text = env
        .run(&["usage", "--identity", "etl-pipeline"])
        .ok()
        .stdout
        .clone();
    assert!(text.contains("total"), "{text}");
    assert!(text.contains("etl-daily"), "{text}");
    env.run(&["usage", "--identity", "ghost"]).fails(1);

    // identities update: each option replaces its field; the keys are not written.
    let version = store.get(&id_of(&a)).await.unwrap().unwrap().version;
    let changed = env
        .run(&[
            "identities",
            "update",
            "etl-pipeline",
            "--rate",
            "etl-burst=5/s",
            "--clear-quotas",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(changed["rate_limits"][0]["name"], "etl-burst");
    assert_eq!(changed["quotas"], json!([]));
    assert_eq!(changed["metadata"], json!({"team": "data"}), "kept");
    let stored = store.get_identity("etl-pipeline").await.unwrap().unwrap();
    assert_eq!(stored.rate_limits[0].limit, 5);
    assert!(stored.quotas.is_empty());
    assert_eq!(
        store.get(&id_of(&a)).await.unwrap().unwrap().version,
        version
    );
    env.run(&["identities", "update", "etl-pipeline"]).fails(2);
    env.run(&["identities", "update", "ghost", "--meta", "{}"])
        .fails(1);
    env.run(&["identities", "update", "etl-pipeline", "--rate", "x=0/s"])
        .fails(2);

    // identities delete: refused while a live key names it.
    let refused = env.run(&["identities", "delete", "etl-pipeline"]);
    refused.fails(1);
    assert!(refused.stderr.contains("not revoked"), "{}", refused.stderr);
    assert!(store.get_identity("etl-pipeline").await.unwrap().is_some());
    for k in [&a, &b] {
        env.run(&["keys", "revoke", &id_of(k).to_string()]).ok();
    }
    let gone = env
        .run(&["identities", "delete", "etl-pipeline", "--json"])
        .ok()
        .json();
    assert_eq!(gone["deleted"], true);
    assert!(store.get_identity("etl-pipeline").await.unwrap().is_none());
    env.run(&["identities", "delete", "etl-pipeline"]).fails(1);
}
both!(
    sqlite_identities_and_usage,
    postgres_identities_and_usage,
    identities_and_usage
);

/// `--grant SCOPE:COLLECTION-PATTERN` on keys create/update and roles create/update: one
/// scope on one pattern, scopes on the same pattern one grant; bad values change nothing.
async fn per_collection_grants(env: &Env) {
    let key = create(
        env,
        &[
            "--name",
            "ingest",
            "--grant",
            "points:write:docs-*",
            "--grant",
            "points:read:shared",
            "--grant",
            "points:read:docs-*",
        ],
    );
    assert_eq!(
        key["grants"],
        json!([
            {"scopes": ["points:write", "points:read"], "collections": ["docs-*"]},
            {"scopes": ["points:read"], "collections": ["shared"]},
        ])
    );
    let store = env.store().await;
    let id = id_of(&key);
    let secret = key["key"].as_str().unwrap().to_owned();
    let verifier = Verifier::builder(store.clone()).build();
    let p = verifier.verify(&secret).await.unwrap();
    assert!(p.permits(&scope("points:write"), "docs-1"));
    assert!(p.permits(&scope("points:read"), "shared"));
    assert!(!p.permits(&scope("points:write"), "shared"));

    for bad in ["points:write", "points:write:", ":docs", "po ints:docs"] {
        env.run(&["keys", "create", "--name", "x", "--grant", bad])
            .fails(2);
        env.run(&["keys", "update", &id.to_string(), "--grant", bad])
            .fails(2);
    }
    assert_eq!(store.list(&Default::default()).await.unwrap().len(), 1);
    assert_eq!(store.get(&id).await.unwrap().unwrap().version, 0);

    // keys update --grant replaces the grants; --no-grants clears them.
    let updated = env
        .run(&[
            "keys",
            "update",
            &id.to_string(),
            "--grant",
            "points:read:shared",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        updated["grants"],
        json!([{"scopes": ["points:read"], "collections": ["shared"]}])
    );
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.grants.len(), 1);
    env.run(&["keys", "update", &id.to_string(), "--no-grants"])
        .ok();
    assert!(store.get(&id).await.unwrap().unwrap().grants.is_empty());

    // roles create/update --grant, next to --scope × --collection.
    let role = env
        .run(&[
            "roles",
            "create",
            "mixed",
            "--scope",
            "points:read",
            "--collection",
            "docs-*",
            "--grant",
            "points:write:docs-2026",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        role["grants"],
        json!([
            {"scopes": ["points:read"], "collections": ["docs-*"]},
            {"scopes": ["points:write"], "collections": ["docs-2026"]},
        ])
    );
    let role = env
        .run(&[
            "roles",
            "update",
            "mixed",
            "--grant",
            "points:read:shared",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        role["grants"],
        json!([{"scopes": ["points:read"], "collections": ["shared"]}])
    );
    env.run(&["roles", "update", "mixed", "--grant", "nope"])
        .fails(2);
    assert_eq!(store.list_roles().await.unwrap()[0].grants.len(), 1);
}
both!(
    sqlite_per_collection_grants,
    postgres_per_collection_grants,
    per_collection_grants
);
