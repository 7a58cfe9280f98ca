//! Roles, identities and live policy changes through the admin API: `PATCH /keys/{id}`,
//! `/roles`, `/roles/{name}`, `/identities`. A caller grants only what it holds, per
//! collection; changes reach the next request; bad input changes nothing; and two admins
//! racing on one key cannot both write (the check and the write are one step).

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::{Grant, Identity, KeyListing, Role, Scope, StatusWrite, StoreError};
use keygate::{
    KeyFilter, KeyGate, KeyId, KeyManager, KeyRecord, KeySpec, KeyStatus, KeyStore, ManualClock,
    MemoryStore, Verifier,
};
use keygate_admin::AdminApi;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A write made by "another admin", run once on the memory store.
type Hook = Box<dyn FnOnce(&MemoryStore) + Send>;

/// A memory store that runs a hook (once) just before a conditional write: another
/// writer landing between an admin's check and its write.
#[derive(Clone, Default)]
struct Racing {
    inner: MemoryStore,
    hook: Arc<Mutex<Option<Hook>>>,
}

#[async_trait::async_trait]
impl KeyStore for Racing {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(r).await
    }
    async fn update(&self, r: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update(r).await
    }
    async fn list(&self, f: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(f).await
    }
    async fn list_report(&self, f: &KeyFilter) -> Result<KeyListing, StoreError> {
        self.inner.list_report(f).await
    }
    async fn set_status(
        &self,
        id: &KeyId,
        s: KeyStatus,
        at: std::time::SystemTime,
    ) -> Result<StatusWrite, StoreError> {
        self.inner.set_status(id, s, at).await
    }
    async fn update_versioned(&self, r: &KeyRecord) -> Result<(), StoreError> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook(&self.inner);
        }
        self.inner.update_versioned(r).await
    }
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        self.inner.roles(names).await
    }
    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        self.inner.list_roles().await
    }
    async fn insert_role(&self, r: &Role) -> Result<(), StoreError> {
        self.inner.insert_role(r).await
    }
    async fn update_role(&self, r: &Role) -> Result<(), StoreError> {
        self.inner.update_role(r).await
    }
    async fn delete_role(&self, n: &str) -> Result<bool, StoreError> {
        self.inner.delete_role(n).await
    }
    async fn keys_with_role(&self, n: &str) -> Result<Vec<KeyId>, StoreError> {
        self.inner.keys_with_role(n).await
    }
    async fn get_identity(&self, n: &str) -> Result<Option<Identity>, StoreError> {
        self.inner.get_identity(n).await
    }
    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.inner.list_identities().await
    }
    async fn insert_identity(&self, i: &Identity) -> Result<(), StoreError> {
        self.inner.insert_identity(i).await
    }
    async fn update_identity(&self, i: &Identity) -> Result<(), StoreError> {
        self.inner.update_identity(i).await
    }
    async fn delete_identity(&self, n: &str) -> Result<bool, StoreError> {
        self.inner.delete_identity(n).await
    }
    async fn keys_with_identity(&self, n: &str) -> Result<Vec<KeyId>, StoreError> {
        self.inner.keys_with_identity(n).await
    }
}

/// Runs a memory-store future (which never waits) to its end.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

struct Setup {
    store: Racing,
    gate: KeyGate,
    keys: KeyManager,
    app: Router,
}

fn setup() -> Setup {
    let store = Racing::default();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(ManualClock::at_2026())
            .build(),
    );
    let keys = KeyManager::for_verifier(gate.verifier(), Auditor::direct(MemorySink::new()));
    let app = Router::new().nest("/admin", AdminApi::new(keys.clone()).gate(&gate).router());
    Setup {
        store,
        gate,
        keys,
        app,
    }
}

impl Setup {
    async fn key(&self, spec: KeySpec) -> (String, KeyId) {
        let k = self.keys.issue("test", spec).await.unwrap();
        (k.key.expose_secret().to_owned(), k.key.id())
    }
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> (StatusCode, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap()
}

#[tokio::test]
async fn patch_changes_a_live_key_on_the_next_request() {
    let s = setup();
    let (admin, _) = s.key(KeySpec::new("admin").scope("*").resource("*")).await;
    let (secret, id) = s
        .key(KeySpec::new("k").scope("points:read").resource("docs"))
        .await;
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert!(!p.permits(&scope("points:write"), "docs"));
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &admin,
        json!({
            "grants": [{"scopes": ["points:write"], "collections": ["docs"]}],
            "attributes": {"tenant": "acme"},
            "allowed_ips": ["10.0.0.0/8"],
            "rate_limits": ["burst=5/s"],
            "expires_in": "30d",
        }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["grants"][0]["scopes"], json!(["points:write"]));
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert!(p.permits(&scope("points:write"), "docs"));
    assert_eq!(p.tenant(), Some("acme"));
    assert_eq!(p.allowed_ips().len(), 1);
    assert!(p.expires_at().is_some());
    // expires_at: null takes the expiry away again.
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &admin,
        json!({"expires_at": null}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["expires_at"].is_null());

    // Bad input changes nothing.
    let before = s.store.get(&id).await.unwrap().unwrap();
    for (bad, code) in [
        (json!({}), "invalid_request"),
        (json!({"scopes": ["not a scope"]}), "invalid_request"),
        (json!({"roles": ["ghost"]}), "invalid_request"),
        (json!({"identity": "ghost"}), "invalid_request"),
        (
            json!({"grants": [{"scopes": [], "collections": ["x"]}]}),
            "invalid_request",
        ),
        (json!({"sopes": ["x:y"]}), "invalid_json"),
        (
            json!({"expires_in": "1d", "expires_at": null}),
            "invalid_request",
        ),
    ] {
        let (st, body) = send(
            &s.app,
            "PATCH",
            &format!("/admin/keys/{id}"),
            &admin,
            bad.clone(),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["code"], code, "{bad}: {body}");
    }
    let after = s.store.get(&id).await.unwrap().unwrap();
    assert_eq!(after.version, before.version);
    let (st, _) = send(
        &s.app,
        "PATCH",
        "/admin/keys/AAAAAAAAAAAA",
        &admin,
        json!({"name": "x"}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_caller_grants_only_what_it_holds_per_collection() {
    let s = setup();
    // Writes docs-* but only reads shared.
    let (narrow, _) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("shared")
                .grant(Grant::new(["points:write", "points:read"], ["docs-*"])),
        )
        .await;
    // Issue: write on shared is beyond it, though it holds the scope and the collection.
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &narrow,
        json!({"name": "x", "scopes": ["points:write"], "collections": ["shared"]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "privilege_escalation");
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &narrow,
        json!({"name": "x", "grants": [{"scopes": ["points:write"], "collections": ["docs-1"]}],
               "scopes": ["points:read"], "collections": ["shared"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    // Patch: widening the key's write to shared is refused, and nothing changes.
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &narrow,
        json!({"grants": [{"scopes": ["points:write"], "collections": ["shared"]}]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "privilege_escalation");
    let stored = s
        .store
        .get(&KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.grants, [Grant::new(["points:write"], ["docs-1"])]);
    assert_eq!(stored.version, 0);

    // Roles: the narrow admin cannot create one granting write on shared, nor give a key
    // a role that does.
    let (st, _) = send(
        &s.app,
        "POST",
        "/admin/roles",
        &narrow,
        json!({"name": "wide", "scopes": ["points:write"], "collections": ["shared"]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    s.keys
        .create_role(
            "test",
            Role::new("wide", std::time::SystemTime::now())
                .with_grant(Grant::new(["points:write"], ["shared"])),
        )
        .await
        .unwrap();
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &narrow,
        json!({"add_roles": ["wide"]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, _) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &narrow,
        json!({"name": "y", "roles": ["wide"]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // It does not see the role it cannot grant.
    let (st, body) = send(&s.app, "GET", "/admin/roles", &narrow, Value::Null).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["roles"], json!([]));
    let (st, _) = send(&s.app, "GET", "/admin/roles/wide", &narrow, Value::Null).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(&s.app, "DELETE", "/admin/roles/wide", &narrow, Value::Null).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn roles_and_identities_through_the_api() {
    let s = setup();
    let (admin, _) = s.key(KeySpec::new("admin").scope("*").resource("*")).await;
    let (st, role) = send(
        &s.app,
        "POST",
        "/admin/roles",
        &admin,
        json!({"name": "vector-reader", "scopes": ["points:read"], "collections": ["shared"],
               "rate_limits": ["burst=5/s"], "attributes": {"tier": "reader"}}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{role}");
    assert_eq!(role["version"], 0);
    let (st, _) = send(
        &s.app,
        "POST",
        "/admin/roles",
        &admin,
        json!({"name": "vector-reader"}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    for bad in [
        json!({"name": "bad name"}),
        json!({"name": "r", "collections": ["x"]}),
        json!({"name": "r", "scopes": ["nope"]}),
        json!({"name": "r", "rate_limits": ["b=0/s"]}),
    ] {
        let (st, body) = send(&s.app, "POST", "/admin/roles", &admin, bad.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (st, identity) = send(
        &s.app,
        "POST",
        "/admin/identities",
        &admin,
        json!({"name": "etl-pipeline", "metadata": {"team": "data"}, "rate_limits": ["burst=2/s"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{identity}");
    let (st, body) = send(&s.app, "GET", "/admin/identities", &admin, Value::Null).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["identities"][0]["name"], "etl-pipeline");
    let (st, body) = send(
        &s.app,
        "GET",
        "/admin/identities/ghost",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "identity_not_found", "{body}");
    let (st, body) = send(
        &s.app,
        "PATCH",
        "/admin/roles/ghost",
        &admin,
        json!({"scopes": ["points:read"]}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "role_not_found", "{body}");

    // A key with the role and the identity.
    let (st, key) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &admin,
        json!({"name": "etl", "roles": ["vector-reader"], "identity": "etl-pipeline"}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{key}");
    let secret = key["key"].as_str().unwrap().to_owned();
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert!(p.permits(&scope("points:read"), "shared"));
    assert_eq!(p.identity(), Some("etl-pipeline"));
    assert_eq!(p.attribute("tier"), Some("reader"));

    // Narrowing the role reaches the key on its next request.
    let (st, body) = send(
        &s.app,
        "PATCH",
        "/admin/roles/vector-reader",
        &admin,
        json!({"scopes": ["points:read"], "collections": ["docs"]}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 1);
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "shared"));
    assert!(p.permits(&scope("points:read"), "docs"));
    let (st, _) = send(
        &s.app,
        "PATCH",
        "/admin/roles/vector-reader",
        &admin,
        json!({}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        &s.app,
        "PATCH",
        "/admin/roles/ghost",
        &admin,
        json!({"scopes": ["a:b"]}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Deleting it takes the rest away.
    let (st, _) = send(
        &s.app,
        "DELETE",
        "/admin/roles/vector-reader",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "docs"));
    let (st, _) = send(
        &s.app,
        "DELETE",
        "/admin/roles/vector-reader",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A tenant admin manages no roles or identities.
    let (tenant, _) = s
        .key(
            KeySpec::new("t")
                .scope("*")
                .resource("*")
                .attribute("tenant", "acme"),
        )
        .await;
    let (st, _) = send(
        &s.app,
        "POST",
        "/admin/roles",
        &tenant,
        json!({"name": "t-role"}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = send(
        &s.app,
        "POST",
        "/admin/identities",
        &tenant,
        json!({"name": "t-id"}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

/// A narrow admin reads a key within its authority; before its write lands, a wide admin
/// makes the key `*`. The narrow admin's write must not land on top of the key it can no
/// longer manage: 409, and the wide admin's change stands. Without the race the same
/// change succeeds.
#[tokio::test]
async fn two_admins_racing_cannot_bypass_the_check() {
    let s = setup();
    let (narrow, _) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("docs-*"),
        )
        .await;
    let (_, id) = s
        .key(KeySpec::new("k").scope("points:read").resource("docs-1"))
        .await;
    // The wide admin's write, landing between the narrow admin's check and write.
    *s.store.hook.lock().unwrap() = Some(Box::new(move |store: &MemoryStore| {
        let mut r = now(store.get(&id)).unwrap().unwrap();
        r.scopes = vec!["*".into()];
        r.resources = vec!["*".into()];
        now(store.update(&r)).unwrap();
    }));
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &narrow,
        json!({"collections": ["docs-2"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");
    let stored = s.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.scopes, ["*"]);
    assert_eq!(stored.resources, ["*"]);
    // Retried, the narrow admin no longer sees the key at all.
    let (st, _) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &narrow,
        json!({"collections": ["docs-2"]}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Without a race, the same change on a key within it succeeds.
    let (_, other) = s
        .key(KeySpec::new("k2").scope("points:read").resource("docs-1"))
        .await;
    let (st, body) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{other}"),
        &narrow,
        json!({"collections": ["docs-2"]}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["resources"], json!(["docs-2"]));
}

/// Revoke, disable and rotate keep the same rule as `PATCH`: the check "the caller may act
/// on this key" and the write are one conditional step. A narrow admin acts on a key
/// within its authority; before its write lands, a wide admin makes the key `*`: 409, the
/// key keeps the wide admin's change and its status (and a rotation leaves no usable new
/// key). Without the race each succeeds.
#[tokio::test]
async fn revoke_disable_and_rotate_racing_a_widening_cannot_bypass_the_check() {
    let s = setup();
    let (narrow, _) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("docs-*"),
        )
        .await;
    for (path, body) in [
        ("revoke", Value::Null),
        ("disable", Value::Null),
        ("rotate", json!({"grace": "1h"})),
    ] {
        let (secret, id) = s
            .key(KeySpec::new("k").scope("points:read").resource("docs-1"))
            .await;
        let before = s.store.list(&KeyFilter::default()).await.unwrap().len();
        *s.store.hook.lock().unwrap() = Some(Box::new(move |store: &MemoryStore| {
            let mut r = now(store.get(&id)).unwrap().unwrap();
            r.scopes = vec!["*".into()];
            r.resources = vec!["*".into()];
            now(store.update(&r)).unwrap();
        }));
        let (st, res) = send(
            &s.app,
            "POST",
            &format!("/admin/keys/{id}/{path}"),
            &narrow,
            body.clone(),
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT, "{path}: {res}");
        assert_eq!(res["code"], "conflict");
        let stored = s.store.get(&id).await.unwrap().unwrap();
        assert_eq!(stored.status, KeyStatus::Active, "{path}");
        assert_eq!(stored.scopes, ["*"], "{path}");
        assert_eq!(stored.expires_at, None, "{path}");
        // The key still works; any key a failed rotation made is revoked.
        assert!(s.gate.verifier().verify(&secret).await.is_ok(), "{path}");
        let all = s.store.list(&KeyFilter::default()).await.unwrap();
        for r in all.iter().filter(|r| r.rotated_from == Some(id)) {
            assert_eq!(r.status, KeyStatus::Revoked, "{path}");
        }
        assert!(all.len() <= before + 1);
        // Retried, the narrow admin no longer sees the key.
        let (st, _) = send(
            &s.app,
            "POST",
            &format!("/admin/keys/{id}/{path}"),
            &narrow,
            body.clone(),
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}");

        // Without a race, the same operation on a key within it succeeds.
        let (_, other) = s
            .key(KeySpec::new("k2").scope("points:read").resource("docs-1"))
            .await;
        let (st, res) = send(
            &s.app,
            "POST",
            &format!("/admin/keys/{other}/{path}"),
            &narrow,
            body,
        )
        .await;
        assert!(st.is_success(), "{path}: {st} {res}");
        let stored = s.store.get(&other).await.unwrap().unwrap();
        match path {
            "revoke" => assert_eq!(stored.status, KeyStatus::Revoked),
            "disable" => assert_eq!(stored.status, KeyStatus::Disabled),
            _ => assert!(stored.expires_at.is_some(), "the rotated key ends"),
        }
    }
}

/// `PATCH` and `DELETE /admin/identities/{name}`: the change reaches the identity's keys on
/// their next request; bad input and a tenant admin change nothing; an identity a live key
/// names is not deleted (409 `identity_in_use`).
#[tokio::test]
async fn identities_are_changed_and_deleted() {
    let s = setup();
    let (admin, _) = s.key(KeySpec::new("admin").scope("*").resource("*")).await;
    let (tenant, _) = s
        .key(
            KeySpec::new("tenant")
                .scope("*")
                .resource("*")
                .attribute("tenant", "acme"),
        )
        .await;
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/identities",
        &admin,
        json!({"name": "etl", "rate_limits": ["etl-burst=100/s"]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (secret, id) = s.key(KeySpec::new("k").identity("etl")).await;
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert_eq!(p.rate_limits()[0].limit, 100);

    for (who, body, code) in [
        (
            &admin,
            json!({"rate_limits": ["etl-burst=0/s"]}),
            StatusCode::BAD_REQUEST,
        ),
        (&admin, json!({"unknown": 1}), StatusCode::BAD_REQUEST),
        (&admin, json!({}), StatusCode::BAD_REQUEST),
        (
            &tenant,
            json!({"rate_limits": ["etl-burst=5/s"]}),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (st, res) = send(&s.app, "PATCH", "/admin/identities/etl", who, body).await;
        assert_eq!(st, code, "{res}");
    }
    let (st, res) = send(
        &s.app,
        "PATCH",
        "/admin/identities/ghost",
        &admin,
        json!({"metadata": {}}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(res["code"], "identity_not_found");
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert_eq!(p.rate_limits()[0].limit, 100, "nothing changed");

    let (st, res) = send(
        &s.app,
        "PATCH",
        "/admin/identities/etl",
        &admin,
        json!({"rate_limits": ["etl-burst=5/s"], "metadata": {"team": "data"}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{res}");
    assert_eq!(res["metadata"]["team"], "data");
    let p = s.gate.verifier().verify(&secret).await.unwrap();
    assert_eq!(p.rate_limits()[0].limit, 5, "on the next request");

    // In use: refused, and the identity stays.
    let (st, res) = send(
        &s.app,
        "DELETE",
        "/admin/identities/etl",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{res}");
    assert_eq!(res["code"], "identity_in_use");
    let (st, _) = send(
        &s.app,
        "DELETE",
        "/admin/identities/etl",
        &tenant,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(s.store.get_identity("etl").await.unwrap().is_some());
    // Its key moves away; then it can go.
    let (st, res) = send(
        &s.app,
        "PATCH",
        &format!("/admin/keys/{id}"),
        &admin,
        json!({"identity": null}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{res}");
    let (st, res) = send(
        &s.app,
        "DELETE",
        "/admin/identities/etl",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{res}");
    assert_eq!(res["deleted"], true);
    assert!(s.store.get_identity("etl").await.unwrap().is_none());
    let (st, res) = send(
        &s.app,
        "DELETE",
        "/admin/identities/etl",
        &admin,
        Value::Null,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(res["code"], "identity_not_found");
}

/// Delegated minting: a key holding a role that grants `keys:create` with a ceiling mints
/// keys through `POST /admin/keys`, for its own identity, within its own grants, living at
/// most the ceiling; everything else is refused with its documented code and changes
/// nothing.
#[tokio::test]
async fn a_key_with_a_minting_role_mints_within_its_grants_identity_and_ceiling() {
    let s = setup();
    let (admin, _) = s.key(KeySpec::new("admin").scope("*").resource("*")).await;
    for name in ["etl", "other"] {
        s.keys
            .create_identity("test", Identity::new(name, std::time::UNIX_EPOCH))
            .await
            .unwrap();
    }
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/roles",
        &admin,
        json!({
            "name": "minter",
            "grants": [
                {"scopes": ["keys:create"]},
                {"scopes": ["points:read"], "collections": ["docs-*"]},
                {"scopes": ["points:write"], "collections": ["docs-1"]},
            ],
            "mint_max_lifetime": "1h",
        }),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["mint_max_lifetime_secs"], 3600);
    let (minter, _) = s
        .key(KeySpec::new("pipeline").role("minter").identity("etl"))
        .await;
    let p = s.gate.verifier().verify(&minter).await.unwrap();
    assert_eq!(p.mint_ceiling(), Some(std::time::Duration::from_secs(3600)));
    let count = || async { s.store.list(&KeyFilter::default()).await.unwrap().len() };
    let before = count().await;

    // A subset, for 30 minutes: minted, for the minter's identity.
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &minter,
        json!({"name": "job-1", "scopes": ["points:read"], "collections": ["docs-2"], "expires_in": "30m"}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["identity"], "etl");
    let minted = body["key"].as_str().unwrap().to_owned();
    let mp = s.gate.verifier().verify(&minted).await.unwrap();
    assert!(mp.permits(&scope("points:read"), "docs-2"));
    assert_eq!(mp.identity(), Some("etl"));
    let life = mp
        .expires_at()
        .unwrap()
        .duration_since(keygate::Clock::now(s.gate.clock()))
        .unwrap();
    assert_eq!(life, std::time::Duration::from_secs(1800));
    // Without an expiry: the ceiling.
    let (st, body) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &minter,
        json!({"name": "job-2", "grants": [{"scopes": ["points:write"], "collections": ["docs-1"]}]}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let mp = s
        .gate
        .verifier()
        .verify(body["key"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        mp.expires_at()
            .unwrap()
            .duration_since(keygate::Clock::now(s.gate.clock()))
            .unwrap(),
        std::time::Duration::from_secs(3600)
    );
    assert_eq!(count().await, before + 2);

    // Refused, each with its code; nothing is created.
    for (body, status, code) in [
        // A superset: write on every docs-* collection.
        (
            json!({"name": "x", "scopes": ["points:write"], "collections": ["docs-*"], "expires_in": "10m"}),
            StatusCode::FORBIDDEN,
            "privilege_escalation",
        ),
        // Longer than the ceiling.
        (
            json!({"name": "x", "scopes": ["points:read"], "collections": ["docs-1"], "expires_in": "2h"}),
            StatusCode::FORBIDDEN,
            "mint_ceiling_exceeded",
        ),
        // Another identity.
        (
            json!({"name": "x", "scopes": ["points:read"], "collections": ["docs-1"], "identity": "other"}),
            StatusCode::FORBIDDEN,
            "identity_forbidden",
        ),
        // A key that could mint in turn.
        (
            json!({"name": "x", "scopes": ["keys:create"]}),
            StatusCode::FORBIDDEN,
            "privilege_escalation",
        ),
        (
            json!({"name": "x", "roles": ["minter"]}),
            StatusCode::FORBIDDEN,
            "privilege_escalation",
        ),
    ] {
        let (st, res) = send(&s.app, "POST", "/admin/keys", &minter, body.clone()).await;
        assert_eq!(st, status, "{body}: {res}");
        assert_eq!(res["code"], code, "{body}: {res}");
    }
    assert_eq!(count().await, before + 2);

    // Minting is all it may do: the other routes want the admin scope.
    let (st, res) = send(&s.app, "GET", "/admin/keys", &minter, Value::Null).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{res}");
    assert_eq!(res["code"], "insufficient_scope");
    // A key holding keys:create without a ceiling (no minting role) mints nothing.
    let (plain_create, _) = s
        .key(
            KeySpec::new("no-ceiling")
                .scope("keys:create")
                .scope("points:read")
                .resource("docs-*")
                .identity("etl"),
        )
        .await;
    let (st, res) = send(
        &s.app,
        "POST",
        "/admin/keys",
        &plain_create,
        json!({"name": "x", "scopes": ["points:read"], "collections": ["docs-1"]}),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{res}");
    assert_eq!(res["code"], "insufficient_scope");
    assert_eq!(count().await, before + 3);
}
