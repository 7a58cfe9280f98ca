//! The showcase's secret-scanning endpoint, `POST /leaks/github`: open (no API key), it
//! takes only reports signed by a configured public key, and a reported key stops working.

mod showcase_support;

use axum::body::Body;
use base64::Engine as _;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::LifecycleAction;
use keygate_admin::leak::{LeakPolicy, PublicKeys};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use showcase_support::*;
use tower::ServiceExt;

const KEY_ID: &str = "test-key-1";

fn signer() -> SigningKey {
    let mut bytes = [0u8; 32];
    bytes[0] = 0x22;
    bytes[31] = 9;
    SigningKey::from_bytes(&bytes.into()).unwrap()
}

async fn post(w: &World, signature: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = Request::post("/leaks/github").header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req
            .header("Github-Public-Key-Identifier", KEY_ID)
            .header("Github-Public-Key-Signature", sig);
    }
    let res = w
        .app
        .router
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_signed_report_disables_the_leaked_key_and_an_unsigned_one_is_refused() {
    let signer = signer();
    let pem = signer
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let w = World::with(|mut o| {
        o.leak_public_keys = Some(PublicKeys::new().with_key(KEY_ID, &pem).unwrap());
        o.leak_policy = LeakPolicy::Disable;
        o
    })
    .await;
    let (key, id) = w
        .issue(json!({"name": "reader", "scopes": ["collections:read"], "collections": ["*"]}))
        .await;
    assert_eq!(
        w.call("GET", "/collections", Some(&key), None).await.status,
        StatusCode::OK
    );
    let body = json!([{"token": key, "type": "keygate_api_key",
        "url": "https://github.com/o/r/blob/1/.env", "source": "content"}])
    .to_string();

    // Unsigned: refused, the key still works.
    let (status, answer) = post(&w, None, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["code"], "missing_signature");
    assert_eq!(
        w.call("GET", "/collections", Some(&key), None).await.status,
        StatusCode::OK
    );

    let sig: DerSignature = signer.sign(body.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(sig.as_bytes());
    let (status, answer) = post(&w, Some(&sig), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer[0]["label"], "true_positive");

    let r = w.call("GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let shown = w.admin("GET", &format!("/admin/keys/{id}"), None).await;
    assert_eq!(shown.json["status"], "disabled");
    let exposed = w
        .sink
        .events()
        .into_iter()
        .filter_map(|e| e.as_lifecycle().cloned())
        .find(|e| e.action == LifecycleAction::Exposed)
        .expect("an exposed event");
    assert_eq!(exposed.key_id.to_string(), id);
    assert_eq!(
        exposed.changes[0].new["url"],
        "https://github.com/o/r/blob/1/.env"
    );
}

#[tokio::test]
async fn without_public_keys_there_is_no_open_leak_endpoint() {
    // The path is then an ordinary one behind the layers: without an API key, 401.
    let w = World::new().await;
    let (status, answer) = post(&w, Some("AAAA"), "[]").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["code"], "missing_key");
}
