//! The token endpoint in a plain axum stack (no showcase): issue, use in the key's place,
//! narrowing through `ScopeLayer`, the parent's revocation on the next request, the audit
//! record, and a hub without tokens.
#![cfg(feature = "tokens")]

use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::{AuditEvent, Auditor, MemorySink};
use keygate::scope::ScopeLayer;
use keygate::token::{SigningKeys, Tokens};
use keygate::{
    Authenticated, Denial, DenialCode, KeyGate, KeyManager, KeySpec, ManualClock, MemoryStore,
    Verifier,
};
use keygate_admin::TokenApi;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Stack {
    app: Router,
    gate: KeyGate,
    keys: KeyManager,
    clock: ManualClock,
    sink: MemorySink,
}

/// `/whoami` (any caller) and `/write` (`points:write`) behind the audit and auth layers,
/// with the token routes merged in.
fn stack(with_tokens: bool) -> (Stack, Tokens) {
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(MemoryStore::new())
        .clock(clock.clone())
        .build();
    let tokens = Tokens::builder(SigningKeys::generate().unwrap())
        .max_ttl(Duration::from_secs(600))
        .build();
    let gate = if with_tokens {
        KeyGate::builder(verifier).tokens(tokens.clone()).build()
    } else {
        KeyGate::new(verifier)
    };
    let sink = MemorySink::new();
    let auditor = Auditor::direct(sink.clone());
    let keys = KeyManager::for_verifier(gate.verifier(), auditor.clone());
    let who = |Authenticated(p): Authenticated| async move {
        json!({
            "key": p.key_id().to_string(),
            "subject": p.token_subject(),
            "token": p.token_id(),
        })
        .to_string()
    };
    let app = Router::new()
        .route(
            "/write",
            get(|| async { "written" }).layer(ScopeLayer::require("points:write").unwrap()),
        )
        .route("/whoami", get(who))
        .layer(gate.auth_layer())
        .merge(TokenApi::new(&gate, tokens.clone()).router())
        .layer(gate.audit_layer(auditor));
    (
        Stack {
            app,
            gate: gate.clone(),
            keys,
            clock,
            sink,
        },
        tokens,
    )
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    credential: &str,
    body: &str,
) -> (StatusCode, Value, Option<Denial>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {credential}"))
        .body(Body::from(body.to_owned()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let denial = res.extensions().get::<Denial>().cloned();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        denial,
    )
}

#[tokio::test]
async fn a_token_from_the_endpoint_works_in_the_keys_place_until_the_key_is_revoked() {
    let (s, _) = stack(true);
    let issued = s
        .keys
        .issue(
            "test",
            KeySpec::new("app")
                .scope("points:read")
                .scope("points:write")
                .resource("*"),
        )
        .await
        .unwrap();
    let key = issued.key.expose_secret().to_owned();
    let id = issued.key.id();

    let (status, body, _) = send(
        &s.app,
        "POST",
        "/auth/token",
        &key,
        r#"{"scopes": ["points:read"], "subject": "user-7", "ttl": 3600}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 600, "capped by max_ttl");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let token_id = body["token_id"].as_str().unwrap().to_owned();

    let (status, who, _) = send(&s.app, "GET", "/whoami", &token, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["key"], id.to_string());
    assert_eq!(who["subject"], "user-7");
    assert_eq!(who["token"], token_id.as_str());
    // The key may write; its token was narrowed to reading.
    assert_eq!(
        send(&s.app, "GET", "/write", &key, "").await.0,
        StatusCode::OK
    );
    let (status, _, denial) = send(&s.app, "GET", "/write", &token, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(denial.unwrap().code(), DenialCode::InsufficientScope);

    // The audit event of a token request names the key, the token id and the subject.
    let events: Vec<_> = s
        .sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Request(r) if r.token_id.is_some() => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.key_id == Some(id)
        && e.token_id.as_deref() == Some(token_id.as_str())
        && e.token_subject.as_deref() == Some("user-7")));

    // Expiry on the hub's clock.
    s.clock.advance(Duration::from_secs(599));
    assert_eq!(
        send(&s.app, "GET", "/whoami", &token, "").await.0,
        StatusCode::OK
    );
    // Revoked: the next request with the token is refused, with the key's exact code.
    s.keys.revoke("test", id).await.unwrap();
    let (status, _, denial) = send(&s.app, "GET", "/whoami", &token, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(denial.unwrap().code(), DenialCode::RevokedKey);
    s.clock.advance(Duration::from_secs(1));
    let (_, _, denial) = send(&s.app, "GET", "/whoami", &token, "").await;
    assert_eq!(denial.unwrap().code(), DenialCode::ExpiredToken);
}

#[tokio::test]
async fn a_hub_without_tokens_reads_a_token_as_a_malformed_key() {
    let (with, tokens) = stack(true);
    let issued = with
        .keys
        .issue("test", KeySpec::new("app").scope("*").resource("*"))
        .await
        .unwrap();
    let principal = with
        .gate
        .verifier()
        .verify(issued.key.expose_secret())
        .await
        .unwrap();
    let token = tokens
        .issue(
            &principal,
            &Default::default(),
            keygate::Clock::now(&with.clock),
        )
        .unwrap();
    let (without, _) = stack(false);
    let (status, _, denial) = send(&without.app, "GET", "/whoami", token.expose_secret(), "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(denial.unwrap().code(), DenialCode::MalformedKey);
}
