//! The admin API as a library router: it fails closed however it is mounted, refuses
//! privilege escalation, confines tenant admins to their tenant, answers bad input with
//! clear 4xx errors and changes nothing then, and reports usage. A narrow admin sees and
//! manages only keys within its own grants and limits; new keys' scopes are checked against
//! the server's scope vocabulary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::client_ip::{parse_network, TrustedProxies};
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::{Increment, MemoryUsageStore, Usage, UsageStore, Window};
use keygate::{
    Clock, KeyFilter, KeyGate, KeyManager, KeySpec, ManualClock, MemoryStore, QuotaWindow, Verifier,
};
use keygate::{KnownScope, ScopeVocabulary};
use keygate_admin::AdminApi;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Setup {
    gate: KeyGate,
    keys: KeyManager,
    sink: MemorySink,
    clock: ManualClock,
}

fn setup() -> Setup {
    let clock = ManualClock::at_2026();
    let gate = KeyGate::new(
        Verifier::builder(MemoryStore::new())
            .clock(clock.clone())
            .build(),
    );
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(gate.verifier(), Auditor::direct(sink.clone()));
    Setup {
        gate,
        keys,
        sink,
        clock,
    }
}

impl Setup {
    async fn key(&self, spec: KeySpec) -> (String, String) {
        let k = self.keys.issue("test", spec).await.unwrap();
        (k.key.expose_secret().to_owned(), k.key.id().to_string())
    }

    async fn count(&self) -> usize {
        self.keys.list(&KeyFilter::default()).await.unwrap().len()
    }
}

struct Answer {
    status: StatusCode,
    json: Value,
    headers: http::HeaderMap,
}

async fn send(app: &Router, method: &str, path: &str, key: Option<&str>, body: &str) -> Answer {
    send_from(app, None, &[], method, path, key, body).await
}

/// Sends from the connection peer `peer` (none: unknown), with extra `headers`.
async fn send_from(
    app: &Router,
    peer: Option<&str>,
    headers: &[(&str, &str)],
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Answer {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut req = req.body(Body::from(body.to_owned())).unwrap();
    if let Some(ip) = peer {
        let addr = SocketAddr::new(ip.parse().unwrap(), 40_000);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
    }
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    }
}

fn admin_spec() -> KeySpec {
    KeySpec::new("admin").scope("*").resource("*")
}

#[tokio::test]
async fn mounted_without_any_keygate_layer_or_hub_it_refuses_everyone() {
    let s = setup();
    let (admin, id) = s.key(admin_spec()).await;
    let app = Router::new().nest("/admin", AdminApi::new(s.keys.clone()).router());
    let before = s.count().await;
    for (method, path, body) in [
        ("POST", "/admin/keys".to_owned(), r#"{"name":"x"}"#),
        ("GET", "/admin/keys".to_owned(), ""),
        ("GET", format!("/admin/keys/{id}"), ""),
        ("POST", format!("/admin/keys/{id}/rotate"), ""),
        ("POST", format!("/admin/keys/{id}/revoke"), ""),
        ("POST", format!("/admin/keys/{id}/disable"), ""),
        ("GET", format!("/admin/keys/{id}/usage"), ""),
    ] {
        let r = send(&app, method, &path, Some(&admin), body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(r.json["code"], "missing_key");
    }
    assert_eq!(s.count().await, before);
    assert_eq!(
        s.keys
            .show(id.parse().unwrap())
            .await
            .unwrap()
            .status
            .as_str(),
        "active"
    );
}

#[tokio::test]
async fn behind_the_auth_layer_or_with_the_hub_it_checks_keys_admin() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let (reader, _) = s
        .key(KeySpec::new("reader").scope("points:read").resource("*"))
        .await;
    let behind_auth = Router::new()
        .nest("/admin", AdminApi::new(s.keys.clone()).router())
        .layer(s.gate.auth_layer());
    let with_hub = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    for app in [&behind_auth, &with_hub] {
        let r = send(app, "GET", "/admin/keys", Some(&admin), "").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json["keys"].as_array().unwrap().len(), 2);
        assert!(r.json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("digest").is_none()));
        let r = send(app, "GET", "/admin/keys", Some(&reader), "").await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("insufficient_scope"))
        );
        assert!(r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("scope=\"keys:admin\""));
        let r = send(app, "GET", "/admin/keys", None, "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // A custom required scope.
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone())
            .gate(&s.gate)
            .required_scope("points:read")
            .unwrap()
            .router(),
    );
    assert_eq!(
        send(&app, "GET", "/admin/keys", Some(&reader), "")
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_key_grants_and_manages_only_what_it_holds() {
    let s = setup();
    let (root, root_id) = s.key(admin_spec()).await;
    let (sub, _) = s
        .key(
            KeySpec::new("sub")
                .scope("keys:admin")
                .scope("points:*")
                .resource("docs*"),
        )
        .await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let create = |body: &'static str| send(&app, "POST", "/admin/keys", Some(&sub), body);

    let r = create(r#"{"name":"ok","scopes":["points:read"],"collections":["docs-a","docs-x*"]}"#)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let ok_id = r.json["id"].as_str().unwrap().to_owned();
    let before = s.count().await;
    for body in [
        r#"{"name":"all","scopes":["*"],"collections":["docs-a"]}"#,
        r#"{"name":"admin","scopes":["keys:admin","collections:manage"],"collections":["docs-a"]}"#,
        r#"{"name":"wide","scopes":["points:read"],"collections":["*"]}"#,
        r#"{"name":"other","scopes":["points:read"],"collections":["other"]}"#,
        r#"{"name":"glob","scopes":["points:read"],"collections":["d*"]}"#,
    ] {
        let r = create(body).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("privilege_escalation")),
            "{body}"
        );
    }
    assert_eq!(s.count().await, before, "nothing was issued");
    // It may not rotate (and so obtain) or switch off a key holding more than it does:
    // such a key reads as not found, as if it did not exist.
    for action in ["rotate", "revoke", "disable"] {
        let r = send(
            &app,
            "POST",
            &format!("/admin/keys/{root_id}/{action}"),
            Some(&sub),
            "",
        )
        .await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("key_not_found")),
            "{action}"
        );
        assert!(r.json.get("key").is_none(), "no plaintext");
    }
    assert_eq!(
        send(&app, "GET", "/admin/keys", Some(&root), "")
            .await
            .status,
        StatusCode::OK
    );
    // What it issued, it manages.
    let r = send(
        &app,
        "POST",
        &format!("/admin/keys/{ok_id}/rotate"),
        Some(&sub),
        r#"{"grace":"10m"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // Changes are audited with the caller as actor.
    let sub_id = &sub["kg_".len().."kg_".len() + 12];
    let actors: Vec<String> = s
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_lifecycle())
        .filter(|l| l.actor != "test")
        .map(|l| l.actor.clone())
        .collect();
    assert_eq!(
        actors,
        vec![format!("key:{sub_id}"); 3],
        "issued, rotated, issued"
    );
}

#[tokio::test]
async fn tenant_admins_see_and_manage_only_their_tenant() {
    let s = setup();
    let (acme_admin, _) = s
        .key(admin_spec().attribute("tenant", "acme").scope("keys:admin"))
        .await;
    let (_, globex_id) = s
        .key(
            KeySpec::new("g")
                .scope("points:read")
                .resource("*")
                .attribute("tenant", "globex"),
        )
        .await;
    let (_, plain_id) = s.key(KeySpec::new("no-tenant").scope("points:read")).await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(acme_admin.as_str());

    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"a","scopes":["points:read"],"collections":["x"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.json["attributes"]["tenant"], "acme",
        "stamped with the admin's tenant"
    );
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"b","attributes":{"tenant":"globex"}}"#,
    )
    .await;
    assert_eq!(r.json["code"], "privilege_escalation");
    let r = send(&app, "GET", "/admin/keys", k, "").await;
    let mut names: Vec<&str> = r.json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "admin"]);
    for id in [&globex_id, &plain_id] {
        let r = send(&app, "GET", &format!("/admin/keys/{id}"), k, "").await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("key_not_found"))
        );
        let r = send(&app, "POST", &format!("/admin/keys/{id}/revoke"), k, "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        s.keys
            .show(globex_id.parse().unwrap())
            .await
            .unwrap()
            .status
            .as_str(),
        "active"
    );
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_and_changes_nothing() {
    let s = setup();
    let (admin, admin_id) = s.key(admin_spec()).await;
    let (_, dead_id) = s.key(KeySpec::new("dead")).await;
    s.keys
        .revoke("test", dead_id.parse().unwrap())
        .await
        .unwrap();
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(admin.as_str());
    let before = s.count().await;
    let big = format!(r#"{{"name":"n","metadata":"{}"}}"#, "x".repeat(300 * 1024));
    for (method, path, body, status, code) in [
        ("POST", "/admin/keys", "{not json", 400, "invalid_json"),
        ("POST", "/admin/keys", "", 400, "invalid_json"),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","scope":["points:read"]}"#,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"scopes":["points:read"]}"#,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","scopes":["points"]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","collections":["a/b"]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"","scopes":[]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","allowed_ips":["10.0.0.1/8"]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","rate_limits":["burst=0/s"]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","quotas":["q=5/week"]}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","expires_in":"-1d"}"#,
            400,
            "invalid_request",
        ),
        // Past the 36500d maximum (it once reached past year 9999 and broke every listing).
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","expires_in":"3000000d"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","expires_at":"2020-01-01T00:00:00Z"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/admin/keys",
            r#"{"name":"n","attributes":{"bad name":"x"}}"#,
            400,
            "invalid_request",
        ),
        ("POST", "/admin/keys", &big, 413, "payload_too_large"),
        ("GET", "/admin/keys?status=gone", "", 400, "invalid_request"),
        ("GET", "/admin/keys/not-an-id", "", 400, "invalid_request"),
        ("GET", "/admin/keys/AAAAAAAAAAAA", "", 404, "key_not_found"),
        (
            "POST",
            "/admin/keys/AAAAAAAAAAAA/revoke",
            "",
            404,
            "key_not_found",
        ),
        (
            "POST",
            &format!("/admin/keys/{dead_id}/enable"),
            "",
            409,
            "wrong_status",
        ),
        (
            "POST",
            &format!("/admin/keys/{dead_id}/rotate"),
            "",
            409,
            "wrong_status",
        ),
        (
            "POST",
            &format!("/admin/keys/{admin_id}/rotate"),
            r#"{"grace":"soon"}"#,
            400,
            "invalid_request",
        ),
        (
            "POST",
            &format!("/admin/keys/{admin_id}/disable"),
            r#"{"now":true}"#,
            400,
            "invalid_json",
        ),
        (
            "GET",
            &format!("/admin/keys/{admin_id}/usage"),
            "",
            501,
            "usage_unavailable",
        ),
    ] {
        let r = send(&app, method, path, k, body).await;
        assert_eq!(
            (r.status.as_u16(), r.json["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {}",
            body.chars().take(80).collect::<String>()
        );
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert!(r.json["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(s.count().await, before);
    assert_eq!(
        s.keys
            .show(admin_id.parse().unwrap())
            .await
            .unwrap()
            .status
            .as_str(),
        "active"
    );
}

#[tokio::test]
async fn usage_comes_from_the_usage_store() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let issued = s
        .keys
        .issue(
            "test",
            KeySpec::new("metered").quota("daily=100/day".parse().unwrap()),
        )
        .await
        .unwrap();
    let id = issued.key.id();
    let usage = Arc::new(MemoryUsageStore::new());
    let now = s.clock.now();
    let day = Window::containing(QuotaWindow::Day, now);
    usage
        .add(&[Increment {
            key: id,
            window: day,
            usage: Usage {
                cost: 30,
                requests: 3,
            },
        }])
        .await
        .unwrap();
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone())
            .gate(&s.gate)
            .usage_store(usage.clone())
            .router(),
    );
    let r = send(
        &app,
        "GET",
        &format!("/admin/keys/{id}/usage"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["quotas"][0]["used"], 30);
    assert_eq!(r.json["quotas"][0]["remaining"], 70);
    assert_eq!(r.json["windows"][0]["requests"], 3);
    // A range that excludes today lists no window, but the quota still reads today's use.
    s.clock.advance(Duration::from_secs(3600));
    let r = send(
        &app,
        "GET",
        &format!("/admin/keys/{id}/usage?from=2020-01-01T00:00:00Z&to=2021-01-01T00:00:00Z"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(r.json["windows"], json!([]));
    assert_eq!(r.json["quotas"][0]["used"], 30);
    // Usage belongs to the key's lineage: the rotated key reads what its predecessor used.
    let rotated = s
        .keys
        .rotate("test", id, Duration::from_secs(60))
        .await
        .unwrap();
    let r = send(
        &app,
        "GET",
        &format!("/admin/keys/{}/usage", rotated.key.id()),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["quotas"][0]["used"], 30, "{}", r.json);
    assert_eq!(r.json["key_id"], rotated.key.id().to_string());
}

/// An admin key that expires in a day and works only from 10.0.0.0/8.
fn limited_admin_spec() -> KeySpec {
    KeySpec::new("limited")
        .scope("keys:admin")
        .scope("points:*")
        .resource("*")
        .expires_in(Duration::from_secs(86_400))
        .allow_ip(parse_network("10.0.0.0/8").unwrap())
}

const INSIDE: Option<&str> = Some("10.1.2.3");

#[tokio::test]
async fn a_limited_admin_issues_only_keys_as_limited_as_itself() {
    let s = setup();
    let (limited, limited_id) = s.key(limited_admin_spec()).await;
    let limit = s
        .keys
        .show(limited_id.parse().unwrap())
        .await
        .unwrap()
        .expires_at
        .unwrap();
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(limited.as_str());
    let create = |body: &'static str| send_from(&app, INSIDE, &[], "POST", "/admin/keys", k, body);

    // Unspecified: the new key inherits the caller's expiry and networks.
    let r = create(r#"{"name":"plain","scopes":["points:*"],"collections":["docs"]}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let plain = s
        .keys
        .show(r.json["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap();
    assert_eq!(plain.expires_at, Some(limit), "the caller's expiry");
    assert_eq!(plain.allowed_ips, [parse_network("10.0.0.0/8").unwrap()]);
    assert_eq!(r.json["allowed_ips"], json!(["10.0.0.0/8"]));
    assert!(r.json["expires_at"].is_string());

    // Narrower is fine.
    let r = create(
        r#"{"name":"narrow","scopes":["points:read"],"expires_in":"1h","allowed_ips":["10.1.0.0/16","10.2.3.4"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let narrow = s
        .keys
        .show(r.json["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        narrow.expires_at,
        Some(s.clock.now() + Duration::from_secs(3600))
    );
    assert_eq!(narrow.allowed_ips.len(), 2);

    // Longer-lived or wider is escalation, and nothing is issued.
    let before = s.count().await;
    for body in [
        r#"{"name":"x","scopes":["points:read"],"expires_in":"2d"}"#,
        r#"{"name":"x","scopes":["points:read"],"expires_at":"2099-01-01T00:00:00Z"}"#,
        r#"{"name":"x","scopes":["points:read"],"allowed_ips":["0.0.0.0/0"]}"#,
        r#"{"name":"x","scopes":["points:read"],"allowed_ips":["::/0"]}"#,
        r#"{"name":"x","scopes":["points:read"],"allowed_ips":["192.168.0.0/16"]}"#,
        r#"{"name":"x","scopes":["points:read"],"allowed_ips":["10.0.0.0/7"]}"#,
        r#"{"name":"x","scopes":["points:read"],"allowed_ips":["10.0.0.0/8","192.0.2.1"]}"#,
    ] {
        let r = create(body).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("privilege_escalation")),
            "{body}"
        );
    }
    assert_eq!(s.count().await, before, "nothing was issued");

    // An unrestricted admin is not bounded.
    let (root, _) = s.key(admin_spec()).await;
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        Some(&root),
        r#"{"name":"free","scopes":["points:read"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json["expires_at"], Value::Null);
    assert_eq!(r.json["allowed_ips"], json!([]));
}

#[tokio::test]
async fn a_limited_admin_manages_only_keys_as_limited_as_itself() {
    let s = setup();
    let (limited, _) = s.key(limited_admin_spec()).await;
    let peer = || KeySpec::new("peer").scope("points:read").resource("docs");
    let ten = || parse_network("10.0.0.0/8").unwrap();
    let (_, free) = s.key(peer()).await;
    let (_, later) = s
        .key(
            peer()
                .allow_ip(ten())
                .expires_in(Duration::from_secs(2 * 86_400)),
        )
        .await;
    let (_, never) = s.key(peer().allow_ip(ten())).await;
    let (_, anywhere) = s.key(peer().expires_in(Duration::from_secs(3600))).await;
    let (_, outside) = s
        .key(
            peer()
                .allow_ip(parse_network("10.0.0.0/8").unwrap())
                .allow_ip(parse_network("192.0.2.0/24").unwrap())
                .expires_in(Duration::from_secs(3600)),
        )
        .await;
    let (_, within) = s
        .key(
            peer()
                .allow_ip(parse_network("10.1.0.0/16").unwrap())
                .expires_in(Duration::from_secs(3600)),
        )
        .await;
    let (_, off) = s.key(peer()).await;
    s.keys.disable("test", off.parse().unwrap()).await.unwrap();
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(limited.as_str());
    let before = s.count().await;
    let events = s.sink.events().len();

    for id in [&free, &later, &never, &anywhere, &outside] {
        for action in ["rotate", "revoke", "disable"] {
            let r = send_from(
                &app,
                INSIDE,
                &[],
                "POST",
                &format!("/admin/keys/{id}/{action}"),
                k,
                "",
            )
            .await;
            assert_eq!(
                (r.status, r.json["code"].as_str()),
                (StatusCode::NOT_FOUND, Some("key_not_found")),
                "{action} {id}"
            );
            assert!(r.json.get("key").is_none(), "no plaintext");
        }
    }
    let r = send_from(
        &app,
        INSIDE,
        &[],
        "POST",
        &format!("/admin/keys/{off}/enable"),
        k,
        "",
    )
    .await;
    assert_eq!(r.json["code"], "key_not_found");
    assert_eq!(s.count().await, before, "nothing was rotated");
    assert_eq!(s.sink.events().len(), events, "nothing was changed");
    for id in [&free, &later, &never, &anywhere, &outside] {
        let r = s.keys.show(id.parse().unwrap()).await.unwrap();
        assert_eq!(r.status.as_str(), "active");
    }

    // A key at least as restricted as the caller it manages; the rotated key keeps the
    // restrictions.
    let r = send_from(
        &app,
        INSIDE,
        &[],
        "POST",
        &format!("/admin/keys/{within}/rotate"),
        k,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["allowed_ips"], json!(["10.1.0.0/16"]));
    let r = send_from(
        &app,
        INSIDE,
        &[],
        "POST",
        &format!("/admin/keys/{within}/revoke"),
        k,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
}

#[tokio::test]
async fn an_admin_key_with_an_allowlist_is_refused_from_elsewhere() {
    let s = setup();
    let (admin, _) = s
        .key(admin_spec().allow_ip(parse_network("10.0.0.0/8").unwrap()))
        .await;
    let k = Some(admin.as_str());
    let standalone = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let behind_auth = Router::new()
        .nest("/admin", AdminApi::new(s.keys.clone()).router())
        .layer(s.gate.auth_layer());
    let before = s.count().await;
    for app in [&standalone, &behind_auth] {
        let r = send_from(app, INSIDE, &[], "GET", "/admin/keys", k, "").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
        for peer in [Some("192.0.2.1"), Some("::1"), None] {
            let r = send_from(app, peer, &[], "GET", "/admin/keys", k, "").await;
            assert_eq!(
                (r.status, r.json["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("ip_not_allowed")),
                "{peer:?}"
            );
            assert_eq!(r.headers["content-type"], "application/problem+json");
            let r = send_from(
                app,
                peer,
                &[],
                "POST",
                "/admin/keys",
                k,
                r#"{"name":"x","scopes":["points:read"]}"#,
            )
            .await;
            assert_eq!(r.json["code"], "ip_not_allowed");
        }
        // A forwarded header from an untrusted peer is not believed.
        let r = send_from(
            app,
            Some("192.0.2.1"),
            &[("x-forwarded-for", "10.1.2.3")],
            "GET",
            "/admin/keys",
            k,
            "",
        )
        .await;
        assert_eq!(r.json["code"], "ip_not_allowed");
    }
    assert_eq!(s.count().await, before, "nothing was issued");

    // Behind a trusted proxy the hub's client address counts.
    let proxied_gate = KeyGate::builder(s.gate.verifier().clone())
        .trusted_proxies(TrustedProxies::new(["127.0.0.1"]).unwrap())
        .build();
    let proxied = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&proxied_gate).router(),
    );
    for (xff, code) in [("10.9.9.9", None), ("192.0.2.1", Some("ip_not_allowed"))] {
        let r = send_from(
            &proxied,
            Some("127.0.0.1"),
            &[("x-forwarded-for", xff)],
            "GET",
            "/admin/keys",
            k,
            "",
        )
        .await;
        assert_eq!(r.json["code"].as_str(), code, "{xff}");
        let ok = code.is_none();
        assert_eq!(r.status == StatusCode::OK, ok, "{xff}");
    }

    // A key without an allowlist may call from anywhere, or from an unknown address.
    let (open, _) = s.key(admin_spec()).await;
    let r = send(&standalone, "GET", "/admin/keys", Some(&open), "").await;
    assert_eq!(r.status, StatusCode::OK);
}

/// The ids of the keys `key` lists.
async fn listed(app: &Router, key: &str) -> Vec<String> {
    let r = send(app, "GET", "/admin/keys", Some(key), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let mut ids: Vec<String> = r.json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_narrow_admin_sees_only_keys_within_its_grants() {
    let s = setup();
    let (root, root_id) = s.key(admin_spec()).await;
    let (narrow, narrow_id) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:*")
                .resource("docs*"),
        )
        .await;
    let metered = || {
        KeySpec::new("reader")
            .scope("points:read")
            .resource("docs-a")
            .quota("daily=100/day".parse().unwrap())
    };
    let (_, inside) = s.key(metered()).await;
    let (_, wider_scope) = s.key(metered().scope("collections:manage")).await;
    let (_, wider_collection) = s.key(metered().resource("other")).await;
    let usage = Arc::new(MemoryUsageStore::new());
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone())
            .gate(&s.gate)
            .usage_store(usage)
            .router(),
    );

    // The `*` admin sees everything; the narrow one only itself and the key within it.
    assert_eq!(listed(&app, &root).await.len(), 5);
    let mut expected = vec![narrow_id.clone(), inside.clone()];
    expected.sort();
    assert_eq!(listed(&app, &narrow).await, expected);
    for id in [&root_id, &wider_scope, &wider_collection] {
        for path in [
            format!("/admin/keys/{id}"),
            format!("/admin/keys/{id}/usage"),
        ] {
            let r = send(&app, "GET", &path, Some(&narrow), "").await;
            assert_eq!(
                (r.status, r.json["code"].as_str()),
                (StatusCode::NOT_FOUND, Some("key_not_found")),
                "{path}"
            );
            assert_eq!(r.json["detail"], format!("no key with id {id}"));
        }
        let r = send(
            &app,
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(&narrow),
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.json);
    }
    for path in [
        format!("/admin/keys/{inside}"),
        format!("/admin/keys/{inside}/usage"),
    ] {
        let r = send(&app, "GET", &path, Some(&narrow), "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.json);
    }
}

#[tokio::test]
async fn a_metered_admin_grants_no_looser_limits_than_its_own() {
    let s = setup();
    let (admin, admin_id) = s
        .key(
            KeySpec::new("metered-admin")
                .scope("keys:admin")
                .scope("points:*")
                .resource("*")
                .rate_limit("burst=10/s".parse().unwrap())
                .quota("daily=1000/day".parse().unwrap()),
        )
        .await;
    let (_, unlimited) = s
        .key(KeySpec::new("free").scope("points:read").resource("docs"))
        .await;
    let (_, tighter) = s
        .key(
            KeySpec::new("tight")
                .scope("points:read")
                .resource("docs")
                .rate_limit("slow=5/s".parse().unwrap())
                .quota("monthly=900/month".parse().unwrap()),
        )
        .await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(admin.as_str());
    let before = s.count().await;
    for limits in [
        r#""rate_limits":["burst=20/s"]"#,
        r#""rate_limits":["burst=100/m"]"#,
        r#""rate_limits":[{"name":"fast","limit":10,"period":500}]"#,
        r#""rate_limits":["burst=10/s"],"quotas":["daily=2000/day"]"#,
        r#""rate_limits":["burst=10/s"],"quotas":["hourly=1000/hour"]"#,
    ] {
        let body =
            format!(r#"{{"name":"x","scopes":["points:read"],"collections":["d"],{limits}}}"#);
        let r = send(&app, "POST", "/admin/keys", k, &body).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("privilege_escalation")),
            "{limits}"
        );
        assert!(r.json.get("key").is_none());
    }
    assert_eq!(s.count().await, before, "nothing was issued");

    // Asked without limits, the key gets the caller's.
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"plain","scopes":["points:read"],"collections":["d"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        r.json["rate_limits"],
        json!([{"name":"burst","limit":10,"period":1000}])
    );
    assert_eq!(
        r.json["quotas"],
        json!([{"name":"daily","limit":1000,"window":"day"}])
    );
    // Tighter limits (a smaller burst at a lower rate, a longer quota window) are fine.
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"tight","scopes":["points:read"],"collections":["d"],
            "rate_limits":["slow=10/m"],"quotas":["m=1000/month"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);

    // An unlimited key is invisible to it and cannot be rotated by it; a tighter one can.
    assert!(!listed(&app, &admin).await.contains(&unlimited));
    assert!(listed(&app, &admin).await.contains(&admin_id));
    let r = send(
        &app,
        "POST",
        &format!("/admin/keys/{unlimited}/rotate"),
        k,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.json);
    let r = send(
        &app,
        "POST",
        &format!("/admin/keys/{tighter}/rotate"),
        k,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["rate_limits"][0]["name"], "slow");
}

fn showcase_vocabulary() -> ScopeVocabulary {
    ScopeVocabulary::new([
        KnownScope::new("collections:read", false),
        KnownScope::new("collections:manage", true),
        KnownScope::new("points:read", true),
        KnownScope::new("points:write", true),
        KnownScope::new("keys:admin", false),
    ])
}

#[tokio::test]
async fn unknown_scopes_are_refused_with_a_suggestion_unless_allowed() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone())
            .gate(&s.gate)
            .scope_vocabulary(showcase_vocabulary())
            .router(),
    );
    let k = Some(admin.as_str());
    let before = s.count().await;
    for (typo, fix) in [
        ("point:read", "points:read"),
        ("points:raed", "points:read"),
        ("Points:Read", "points:read"),
        ("pionts:*", "points:*"),
    ] {
        let body = format!(r#"{{"name":"x","scopes":["{typo}"],"collections":["d"]}}"#);
        let r = send(&app, "POST", "/admin/keys", k, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{typo}");
        assert_eq!(r.json["code"], "unknown_scope");
        assert_eq!(
            r.json["detail"],
            format!(
                "scopes: unknown scope \"{typo}\" (did you mean `{fix}`?); set \"allow_unknown_scopes\": true to grant it anyway"
            )
        );
    }
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"x","scopes":["billing:*"]}"#,
    )
    .await;
    assert_eq!(r.json["code"], "unknown_scope");
    assert_eq!(s.count().await, before, "nothing was issued");

    // Known scopes and wildcards of known families pass, without warnings.
    for scopes in [
        r#"["points:read"]"#,
        r#"["points:*","collections:read"]"#,
        r#"["*"]"#,
    ] {
        let body = format!(r#"{{"name":"ok","scopes":{scopes},"collections":["d"]}}"#);
        let r = send(&app, "POST", "/admin/keys", k, &body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{scopes}: {}", r.json);
        assert_eq!(r.json["warnings"], json!([]), "{scopes}");
    }
    // A custom scope on purpose: issued, with a warning that says so.
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"custom","scopes":["billing:export"],"collections":["d"],"allow_unknown_scopes":true}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["scopes"], json!(["billing:export"]));
    assert_eq!(r.json["warnings"][0], "granted on purpose: unknown scope \"billing:export\" (not a scope this server's routes require)");
}

#[tokio::test]
async fn a_key_that_can_reach_nothing_is_issued_with_a_warning() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let with = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone())
            .gate(&s.gate)
            .scope_vocabulary(showcase_vocabulary())
            .router(),
    );
    let without = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let k = Some(admin.as_str());
    let r = send(
        &with,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"r","scopes":["points:read","points:write"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        r.json["warnings"],
        json!(["every route these scopes open needs a collection and the key has none: it can use none of them"])
    );
    // collections:read lists collections without naming one: reachable.
    let r = send(
        &with,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"r","scopes":["points:read","collections:read"]}"#,
    )
    .await;
    assert_eq!(r.json["warnings"], json!([]));
    // No vocabulary: nothing was checked, and the answer says so.
    let r = send(
        &without,
        "POST",
        "/admin/keys",
        k,
        r#"{"name":"r","scopes":["points:raed"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        r.json["warnings"],
        json!(["no scope vocabulary is registered: the scopes were not checked against the server's routes"])
    );
}

#[tokio::test]
async fn an_unknown_field_is_named_with_every_allowed_field() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    let r = send(
        &app,
        "POST",
        "/admin/keys",
        Some(&admin),
        r#"{"name":"n","scope":["points:read"]}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    assert_eq!(
        r.json["detail"],
        "unknown field \"scope\"; the allowed fields are: name, owner, scopes, collections, \
         resources, attributes, allowed_ips, rate_limits, quotas, expires_in, expires_at, \
         prefix, metadata, allow_unknown_scopes, grants, roles, identity"
    );
    let r = send(
        &app,
        "POST",
        "/admin/keys/AAAAAAAAAAAA/rotate",
        Some(&admin),
        r#"{"grace":"1m","graec":1}"#,
    )
    .await;
    assert_eq!(
        r.json["detail"],
        "unknown field \"graec\"; the allowed fields are: grace"
    );
    let r = send(
        &app,
        "POST",
        "/admin/keys/AAAAAAAAAAAA/revoke",
        Some(&admin),
        r#"{"why":1}"#,
    )
    .await;
    assert_eq!(
        r.json["detail"],
        "unknown field \"why\": this body takes no fields"
    );
}

#[tokio::test]
async fn keys_show_their_last_use_once_the_verifier_flushed_it() {
    let s = setup();
    let (admin, admin_id) = s.key(admin_spec()).await;
    let (_, idle_id) = s.key(KeySpec::new("idle").scope("points:read")).await;
    let app = Router::new().nest(
        "/admin",
        AdminApi::new(s.keys.clone()).gate(&s.gate).router(),
    );
    // 2026-01-01T00:00:00Z + 61 s: the admin's own requests use its key.
    s.clock.advance(Duration::from_secs(61));
    let r = send(
        &app,
        "GET",
        &format!("/admin/keys/{admin_id}"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json.get("last_used_at").is_none(), "not flushed yet");
    assert_eq!(s.gate.verifier().flush_last_used().await.unwrap(), 1);
    let r = send(
        &app,
        "GET",
        &format!("/admin/keys/{admin_id}"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(r.json["last_used_at"], "2026-01-01T00:01:00.000Z");
    let r = send(&app, "GET", "/admin/keys", Some(&admin), "").await;
    let keys = r.json["keys"].as_array().unwrap();
    let find = |id: &str| keys.iter().find(|k| k["id"] == id).unwrap();
    assert_eq!(find(&admin_id)["last_used_at"], "2026-01-01T00:01:00.000Z");
    assert!(find(&idle_id).get("last_used_at").is_none());
}
