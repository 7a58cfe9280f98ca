//! Short-lived tokens through the showcase: `POST /auth/token`, the token in the key's
//! place, narrowing, the ttl cap, every refusal code, revocation and role changes reaching
//! tokens on the next request, the audit record, and a second replica.

mod showcase_support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keygate::core::audit::{AuditEvent, Auditor, MemorySink, RequestEvent};
use keygate::token::{SigningKeys, Tokens};
use keygate::{DenialCode, KeySpec, Verifier};
use serde_json::{json, Value};
use showcase_support::*;
use tokio::net::TcpStream;

fn tokens() -> Tokens {
    Tokens::builder(SigningKeys::generate().unwrap())
        .max_ttl(Duration::from_secs(3600))
        .build()
}

async fn world() -> World {
    World::with(|mut o| {
        o.tokens = Some(tokens());
        // Refusals below come quickly; keep them 401s, not per-address 429s.
        o.anonymous_rate_limits = Vec::new();
        o
    })
    .await
}

/// A request with `Authorization: Bearer <credential>`.
async fn bearer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    credential: &str,
    body: Option<Value>,
) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {credential}"));
    let bytes = match &body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(v).unwrap())
        }
        None => Bytes::new(),
    };
    let res = sender
        .send_request(req.body(Full::new(bytes)).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Trades `key` for a token; asserts success and returns the answer.
async fn token(addr: SocketAddr, key: &str, body: Value) -> Value {
    let r = bearer(addr, "POST", "/auth/token", key, Some(body)).await;
    assert_eq!(r.status, StatusCode::OK, "token: {}", r.text);
    r.json
}

fn requests(sink: &MemorySink) -> Vec<RequestEvent> {
    sink.events()
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Request(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn last_request(sink: &MemorySink) -> RequestEvent {
    requests(sink).pop().expect("a request event")
}

fn scroll(collection: &str) -> String {
    format!("/collections/{collection}/points/scroll")
}

#[tokio::test]
async fn a_token_is_issued_used_narrowed_and_audited_by_id_and_subject() {
    let w = world().await;
    w.collection("docs-a").await;
    w.collection("docs-b").await;
    let (key, key_id) = w
        .issue(json!({"name": "app", "scopes": ["points:read", "points:write", "collections:read"], "collections": ["docs-*"]}))
        .await;

    let answer = token(
        w.addr,
        &key,
        json!({"scopes": ["points:read"], "collections": ["docs-a"], "subject": "user-42"}),
    )
    .await;
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 900, "15 minutes by default");
    let tok = answer["access_token"].as_str().unwrap().to_owned();
    let tid = answer["token_id"].as_str().unwrap().to_owned();
    assert_eq!(tok.split('.').count(), 3, "a JWT");

    // The answer is not cached anywhere.
    let r = bearer(w.addr, "POST", "/auth/token", &key, None).await;
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.json["expires_in"], 900,
        "an empty body takes the defaults"
    );

    // The token works where the key would, within its narrowing.
    let r = bearer(w.addr, "POST", &scroll("docs-a"), &tok, Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let event = last_request(&w.sink);
    assert_eq!(
        event.key_id.unwrap().to_string(),
        key_id,
        "charged to the key"
    );
    assert_eq!(event.token_id.as_deref(), Some(tid.as_str()));
    assert_eq!(event.token_subject.as_deref(), Some("user-42"));
    // Also in Qdrant's api-key header.
    let r = w
        .call("POST", &scroll("docs-a"), Some(&tok), Some(json!({})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Verified once, then served from the cache by its digest.
    assert_eq!(w.app.gate.tokens().unwrap().cached(), 1);

    // Another collection of the key's: not the token's.
    let r = bearer(w.addr, "POST", &scroll("docs-b"), &tok, Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "resource_forbidden");
    // The key's write scope: not the token's.
    let r = bearer(
        w.addr,
        "PUT",
        "/collections/docs-a/points",
        &tok,
        Some(points(1, 1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "insufficient_scope");
    // The key itself still may.
    let r = bearer(
        w.addr,
        "PUT",
        "/collections/docs-a/points",
        &key,
        Some(points(1, 1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let event = last_request(&w.sink);
    assert!(event.token_id.is_none() && event.token_subject.is_none());

    // The audit log never holds the token, and its JSON names the token by id.
    let all = serde_json::to_string(&w.sink.events()).unwrap();
    assert!(!all.contains(&tok));
    assert!(
        !all.contains(tok.rsplit('.').next().unwrap()),
        "not even the signature"
    );
    assert!(all.contains(&format!("\"token_id\":\"{tid}\"")));
    assert!(all.contains("\"token_subject\":\"user-42\""));

    // The public keys, without a key; the token's kid is among them, no private part.
    let r = w.call("GET", "/.well-known/jwks.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(tok.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(r.json["keys"][0]["kid"], header["kid"]);
    assert_eq!(r.json["keys"][0]["kty"], "OKP");
    assert!(r.json["keys"][0].get("d").is_none());
}

#[tokio::test]
async fn narrowing_only_and_the_ttl_is_capped_by_configuration_and_the_key() {
    let w = world().await;
    let (key, _) = w
        .issue(
            json!({"name": "app", "scopes": ["points:read"], "collections": ["docs-*", "shared"]}),
        )
        .await;
    let ask = |body: Value| {
        let key = key.clone();
        async move { bearer(w.addr, "POST", "/auth/token", &key, Some(body)).await }
    };
    for (body, code) in [
        (json!({"scopes": ["points:write"]}), "invalid_scope"),
        (json!({"scopes": ["*"]}), "invalid_scope"),
        (json!({"collections": ["other"]}), "invalid_scope"),
        (json!({"collections": ["*"]}), "invalid_scope"),
        (json!({"scopes": ["not a scope"]}), "invalid_request"),
        (json!({"ttl": 0}), "invalid_request"),
        (json!({"subject": ""}), "invalid_request"),
        (json!({"scope": "points:read"}), "invalid_request"),
        (json!(["points:read"]), "invalid_request"),
    ] {
        let r = ask(body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.json["error"], code, "{body}");
        assert!(r.json["error_description"].is_string());
    }
    // Within the key: fine, as a glob inside the key's glob.
    let ok = ask(json!({"scopes": ["points:read"], "collections": ["docs-1*", "shared"]})).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);

    // The configured cap.
    let r = ask(json!({"ttl": 86_400})).await;
    assert_eq!(r.json["expires_in"], 3600);
    let r = ask(json!({"ttl": 60})).await;
    assert_eq!(r.json["expires_in"], 60);

    // The key's own expiry.
    let (short, _) = w
        .issue(json!({"name": "short", "scopes": ["points:read"], "collections": ["docs-*"], "expires_in": "10m"}))
        .await;
    let r = bearer(
        w.addr,
        "POST",
        "/auth/token",
        &short,
        Some(json!({"ttl": 3600})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let secs = r.json["expires_in"].as_u64().unwrap();
    assert!(
        (590..=600).contains(&secs),
        "cut to the key's expiry: {secs}"
    );

    // A token does not mint tokens; no credential is the usual 401.
    let tok = token(w.addr, &key, json!({})).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = bearer(w.addr, "POST", "/auth/token", &tok, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json["error"], "invalid_client");
    let r = w.call("POST", "/auth/token", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "missing_key");
}

/// `header.payload.signature` with `header` replaced.
fn with_header(token: &str, header: Value) -> String {
    let mut parts = token.splitn(2, '.');
    parts.next();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        parts.next().unwrap()
    )
}

/// Uses `t` on a read of `docs`; the answer and the audit record's exact code.
async fn use_it(w: &World, t: String) -> (Resp, Option<DenialCode>) {
    let r = bearer(w.addr, "POST", &scroll("docs"), &t, Some(json!({}))).await;
    (r, last_request(&w.sink).denial)
}

#[tokio::test]
async fn expired_tampered_foreign_and_unsigned_tokens_are_refused_with_their_codes() {
    let w = world().await;
    w.collection("docs").await;
    let (key, _) = w
        .issue(json!({"name": "app", "scopes": ["points:read"], "collections": ["docs"]}))
        .await;
    let tok = token(w.addr, &key, json!({"ttl": 60})).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let kid = {
        let h: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(tok.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        h["kid"].as_str().unwrap().to_owned()
    };
    let (r, _) = use_it(&w, tok.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Tampered: the payload changed (a wider collection list), the signature kept.
    let mut parts: Vec<String> = tok.split('.').map(str::to_owned).collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["collections"] = json!(["*"]);
    parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    let (r, denial) = use_it(&w, parts.join(".")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "invalid_token");
    assert_eq!(denial, Some(DenialCode::InvalidToken));
    assert!(r
        .header("www-authenticate")
        .is_some_and(|h| h.contains("invalid_token")));
    // Garbage in JWT shape.
    let (r, denial) = use_it(&w, "a.b.c".into()).await;
    assert_eq!(
        (r.code(), denial),
        ("invalid_token", Some(DenialCode::InvalidToken))
    );

    // A key of another issuer (its own kid) and one claiming our kid.
    let foreign = tokens();
    let principal = w.app.gate.verifier().verify(&key).await.unwrap();
    let other = foreign
        .issue(
            &principal,
            &Default::default(),
            keygate::Clock::now(&w.clock),
        )
        .unwrap();
    let (r, denial) = use_it(&w, other.expose_secret().to_owned()).await;
    assert_eq!(r.code(), "invalid_token", "clients read invalid_token");
    assert_eq!(denial, Some(DenialCode::UnknownTokenKey));
    let forged = with_header(
        other.expose_secret(),
        json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}),
    );
    let (r, denial) = use_it(&w, forged).await;
    assert_eq!(
        (r.code(), denial),
        ("invalid_token", Some(DenialCode::InvalidToken))
    );

    // alg none, with and without the signature; and another algorithm.
    let none = with_header(&tok, json!({"alg": "none", "typ": "JWT", "kid": kid}));
    let unsigned = format!("{}.", none.rsplit_once('.').unwrap().0);
    for t in [none, unsigned] {
        let (r, denial) = use_it(&w, t).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.code(), "invalid_token");
        assert_eq!(denial, Some(DenialCode::UnsupportedTokenAlgorithm));
    }
    let hs = with_header(&tok, json!({"alg": "HS256", "typ": "JWT", "kid": kid}));
    let (_, denial) = use_it(&w, hs).await;
    assert_eq!(denial, Some(DenialCode::UnsupportedTokenAlgorithm));

    // Still fine, from the cache; then expired by the clock.
    let (r, _) = use_it(&w, tok.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    w.clock.advance(Duration::from_secs(60));
    let (r, denial) = use_it(&w, tok.clone()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "expired_token");
    assert_eq!(denial, Some(DenialCode::ExpiredToken));
    // And again (no longer cached: verified and refused afresh).
    let (_, denial) = use_it(&w, tok).await;
    assert_eq!(denial, Some(DenialCode::ExpiredToken));
}

#[tokio::test]
async fn revoking_or_disabling_the_key_refuses_its_tokens_on_the_next_request() {
    let w = world().await;
    w.collection("docs").await;
    for action in ["disable", "revoke"] {
        let (key, id) = w
            .issue(json!({"name": action, "scopes": ["points:read"], "collections": ["docs"]}))
            .await;
        let tok = token(w.addr, &key, json!({"subject": "u"})).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        for _ in 0..2 {
            let r = bearer(w.addr, "POST", &scroll("docs"), &tok, Some(json!({}))).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        let r = w
            .admin("POST", &format!("/admin/keys/{id}/{action}"), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = bearer(w.addr, "POST", &scroll("docs"), &tok, Some(json!({}))).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{action}: the very next request"
        );
        let event = last_request(&w.sink);
        let expected = if action == "revoke" {
            DenialCode::RevokedKey
        } else {
            DenialCode::DisabledKey
        };
        assert_eq!(event.denial, Some(expected));
        if action == "disable" {
            w.admin("POST", &format!("/admin/keys/{id}/enable"), None)
                .await;
            let r = bearer(w.addr, "POST", &scroll("docs"), &tok, Some(json!({}))).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "enabled again: the token works again"
            );
        }
    }
}

#[tokio::test]
async fn a_role_taken_from_the_key_narrows_and_then_refuses_its_tokens() {
    let w = world().await;
    w.collection("docs").await;
    let r = w
        .admin(
            "POST",
            "/admin/roles",
            Some(json!({"name": "writer", "scopes": ["points:write"], "collections": ["docs"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (key, id) = w
        .issue(json!({"name": "app", "scopes": ["points:read"], "collections": ["docs"], "roles": ["writer"]}))
        .await;
    // A token with both scopes, one of them from the role.
    let tok = token(
        w.addr,
        &key,
        json!({"scopes": ["points:read", "points:write"]}),
    )
    .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let write = || {
        bearer(
            w.addr,
            "PUT",
            "/collections/docs/points",
            &tok,
            Some(points(1, 1)),
        )
    };
    let docs = scroll("docs");
    let read = || bearer(w.addr, "POST", &docs, &tok, Some(json!({})));
    assert_eq!(write().await.status, StatusCode::OK);
    assert_eq!(read().await.status, StatusCode::OK);
    assert_eq!(
        last_request(&w.sink).roles.as_deref().map(|r| r.len()),
        Some(1),
        "the request names the key's roles"
    );

    let r = w
        .admin(
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"remove_roles": ["writer"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The token's copy of the scopes does not count: the key no longer writes.
    let r = write().await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "insufficient_scope");
    assert_eq!(read().await.status, StatusCode::OK, "reads still hold");

    // Deleting a role reaches tokens too: a token of a key whose only grant was the role.
    let (key2, _) = w
        .issue(json!({"name": "role-only", "roles": ["writer"]}))
        .await;
    let tok2 = token(w.addr, &key2, json!({})).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = bearer(
        w.addr,
        "PUT",
        "/collections/docs/points",
        &tok2,
        Some(points(2, 1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = w.admin("DELETE", "/admin/roles/writer", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = bearer(
        w.addr,
        "PUT",
        "/collections/docs/points",
        &tok2,
        Some(points(3, 1)),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
}

#[tokio::test]
async fn a_second_replica_on_the_same_sqlite_store_refuses_a_token_after_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    two_replicas(
        &url,
        keygate::sql::SqlOptions::new(),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test]
async fn a_second_replica_on_the_same_postgres_store_refuses_a_token_after_revocation() {
    let Some(pg) = keygate_testkit::pg::PgSchema::create().await else {
        return;
    };
    let options = keygate::sql::SqlOptions::new().schema(pg.schema.clone());
    two_replicas(&pg.url, options, Duration::from_secs(2)).await;
}

/// Two showcases over one database (`url`, `options`), sharing the signing keys: a token
/// minted at one works at the other, and once its key is revoked at the first, the second
/// refuses it within `bound`.
async fn two_replicas(url: &str, options: keygate::sql::SqlOptions, bound: Duration) {
    use keygate::sql::SqlStore;
    let shared_keys = tokens();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = SqlStore::open_with(url, options.clone()).await.unwrap();
        let verifier = Verifier::new(store.clone());
        let follower = store.watch(&verifier).await.unwrap();
        let mut opts = Options::new(verifier, Auditor::direct(MemorySink::new()));
        opts.anonymous_rate_limits = Vec::new();
        opts.tokens = Some(shared_keys.clone());
        let app = build(opts).unwrap();
        let addr = serve(app.router.clone()).await;
        replicas.push((app, addr, follower));
    }
    let admin = replicas[0]
        .0
        .keys
        .issue("setup", KeySpec::new("admin").scope("*").resource("*"))
        .await
        .unwrap();
    let (a, b) = (replicas[0].1, replicas[1].1);
    let r = bearer(
        a,
        "PUT",
        "/collections/docs",
        admin.key.expose_secret(),
        Some(json!({"vectors": {"size": 4, "distance": "Cosine"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = bearer(
        a,
        "POST",
        "/admin/keys",
        admin.key.expose_secret(),
        Some(json!({"name": "app", "scopes": ["collections:read"], "collections": ["*"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (key, id) = (
        r.json["key"].as_str().unwrap().to_owned(),
        r.json["id"].as_str().unwrap().to_owned(),
    );

    // Minted at replica A, used at replica B.
    let tok = token(a, &key, json!({"subject": "u"})).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = bearer(b, "GET", "/collections", &tok, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Revoked at A: refused at A on the next request, and at B within SQLite's bound.
    let r = bearer(
        a,
        "POST",
        &format!("/admin/keys/{id}/revoke"),
        admin.key.expose_secret(),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        bearer(a, "GET", "/collections", &tok, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let took = poll_until(bound, "revocation reaches replica B", || async {
        bearer(b, "GET", "/collections", &tok, None).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    println!("a token's revocation reached the second replica in {took:?}");
    for (_, _, follower) in replicas {
        follower.shutdown().await;
    }
}

/// The example binary, if built and newer than the example's source.
fn example_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("examples").join("vector_db");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("vector_db.rs");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let written = std::fs::metadata(&source).and_then(|m| m.modified()).ok();
    match (built, written) {
        (Some(b), Some(w)) if b >= w => Some(bin),
        _ => {
            println!("SKIPPED: the vector_db example is not built or older than its source");
            None
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_showcase_refuses_bad_token_keys_before_creating_anything() {
    use std::os::unix::fs::PermissionsExt;
    let Some(bin) = example_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("token-keys.pem");
    let pem = {
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        )
    };
    std::fs::write(&keys, &pem).unwrap();
    let body_line = pem.lines().nth(1).unwrap().to_owned();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let keys_text = keys.display().to_string();
    for env in [
        vec![("KEYGATE_TOKEN_KEYS_FILE", keys_text.as_str())],
        vec![("KEYGATE_TOKEN_KEYS", "not a key")],
    ] {
        let out = tokio::process::Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(&work)
            .env_remove("KEYGATE_DATABASE_URL")
            .env_remove("KEYGATE_REDIS_URL")
            .env_remove("KEYGATE_TOKEN_KEYS")
            .env_remove("KEYGATE_TOKEN_KEYS_FILE")
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with("error: ") && err.lines().count() == 1,
            "{err}"
        );
        assert!(err.contains("token signing key"), "{err}");
        assert!(
            !err.contains(&body_line[..16]) && !err.contains("not a key"),
            "no key material: {err}"
        );
        assert_eq!(
            std::fs::read_dir(&work).unwrap().count(),
            0,
            "nothing created"
        );
    }
}

/// The counter of issued tokens, from the metrics text.
fn tokens_issued(metrics: &keygate::metrics::Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("keygate_tokens_issued_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn issued_tokens_are_counted_in_the_metrics_and_refusals_are_not() {
    let metrics = keygate::metrics::Metrics::new();
    let m = metrics.clone();
    let w = World::with(move |mut o| {
        o.tokens = Some(tokens());
        o.metrics = Some(m);
        o.anonymous_rate_limits = Vec::new();
        o
    })
    .await;
    let (key, _) = w
        .issue(json!({"name": "app", "scopes": ["points:read"], "collections": ["docs-*"]}))
        .await;
    assert_eq!(tokens_issued(&metrics), 0);
    token(w.addr, &key, json!({})).await;
    token(w.addr, &key, json!({"subject": "user-7"})).await;
    assert_eq!(tokens_issued(&metrics), 2);
    // Asking for more than the key holds issues nothing, and counts nothing.
    let r = bearer(
        w.addr,
        "POST",
        "/auth/token",
        &key,
        Some(json!({"scopes": ["points:write"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(tokens_issued(&metrics), 2);
}
