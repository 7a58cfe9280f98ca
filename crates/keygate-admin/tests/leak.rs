//! The secret-scanning endpoint: reports signed with a test P-256 key. A true positive is
//! revoked or disabled (or only recorded) and audited as exposed with the report's URL; a
//! false positive (bad checksum, unknown key, another secret) changes nothing; a missing,
//! bad or foreign signature, a tampered or malformed body and too many candidates are
//! refused with a 4xx and change nothing. Answers are in the partner format.

use axum::body::Body;
use axum::Router;
use base64::Engine as _;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::{AuditEvent, Auditor, LifecycleAction, MemorySink};
use keygate::{KeyManager, KeySpec, KeyStatus, ManualClock, MemoryStore, Verifier};
use keygate_admin::leak::{LeakPolicy, LeakReports, PublicKeys};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use tower::ServiceExt;

const KEY_ID: &str = "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a";

fn signing_key(seed: u8) -> SigningKey {
    let mut bytes = [0u8; 32];
    bytes[31] = seed;
    bytes[0] = 0x11;
    SigningKey::from_bytes(&bytes.into()).unwrap()
}

fn pem(key: &SigningKey) -> String {
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

/// The JSON GitHub publishes, with the test key as the current one.
fn published(key: &SigningKey) -> String {
    json!({"public_keys": [
        {"key_identifier": KEY_ID, "key": pem(key), "is_current": true},
    ]})
    .to_string()
}

fn sign(key: &SigningKey, body: &[u8]) -> String {
    let sig: DerSignature = key.sign(body);
    base64::engine::general_purpose::STANDARD.encode(sig.as_bytes())
}

struct Setup {
    keys: KeyManager,
    sink: MemorySink,
    signer: SigningKey,
    verifier: Verifier,
}

fn setup() -> Setup {
    let verifier = Verifier::builder(MemoryStore::new())
        .clock(ManualClock::at_2026())
        .build();
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
    Setup {
        keys,
        sink,
        signer: signing_key(7),
        verifier,
    }
}

impl Setup {
    fn app(&self, policy: LeakPolicy) -> Router {
        let public = PublicKeys::from_github_json(&published(&self.signer)).unwrap();
        Router::new().nest(
            "/leaks/github",
            LeakReports::new(self.keys.clone(), &self.verifier, public, policy)
                .max_candidates(3)
                .router(),
        )
    }

    async fn issue(&self, name: &str) -> (String, keygate::KeyId) {
        let k = self
            .keys
            .issue("test", KeySpec::new(name).scope("points:read"))
            .await
            .unwrap();
        (k.key.expose_secret().to_owned(), k.key.id())
    }

    async fn status(&self, id: keygate::KeyId) -> KeyStatus {
        self.keys.show(id).await.unwrap().status
    }

    /// Lifecycle events after the issues: (action, key id, JSON of the changes).
    fn events(&self) -> Vec<(LifecycleAction, keygate::KeyId, Value)> {
        self.sink
            .events()
            .iter()
            .filter_map(AuditEvent::as_lifecycle)
            .filter(|e| e.action != LifecycleAction::Issued)
            .map(|e| {
                (
                    e.action,
                    e.key_id,
                    serde_json::to_value(&e.changes).unwrap(),
                )
            })
            .collect()
    }
}

struct Answer {
    status: StatusCode,
    json: Value,
    headers: http::HeaderMap,
}

async fn post(app: &Router, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = Request::post("/leaks/github").header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        json,
        headers,
    }
}

/// A report signed by the test key under its identifier.
async fn report(s: &Setup, app: &Router, body: &str) -> Answer {
    let sig = sign(&s.signer, body.as_bytes());
    post(
        app,
        &[
            ("Github-Public-Key-Identifier", KEY_ID),
            ("Github-Public-Key-Signature", &sig),
        ],
        body,
    )
    .await
}

fn candidate(token: &str, url: &str) -> Value {
    json!({"token": token, "type": "keygate_api_key", "url": url, "source": "content"})
}

#[tokio::test]
async fn a_true_positive_is_revoked_audited_with_the_url_and_answered_in_the_partner_format() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (leaked, id) = s.issue("leaked").await;
    let (_, other) = s.issue("bystander").await;
    assert!(s.verifier.verify(&leaked).await.is_ok());

    let url = "https://user:hunter2@github.com/octo/app/blob/abc/config.env";
    let body = json!([candidate(&leaked, url)]).to_string();
    let a = report(&s, &app, &body).await;

    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(
        a.json,
        json!([{"token_raw": leaked, "token_type": "keygate_api_key", "label": "true_positive"}])
    );
    assert_eq!(s.status(id).await, KeyStatus::Revoked);
    assert_eq!(s.status(other).await, KeyStatus::Active);
    // The verifier learns at once: the leaked key fails on its next use.
    assert!(s.verifier.verify(&leaked).await.is_err());

    let events = s.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, LifecycleAction::Exposed);
    assert_eq!(events[0].1, id);
    let exposure = &events[0].2[0];
    assert_eq!(exposure["field"], "exposure");
    let recorded_url = exposure["new"]["url"].as_str().unwrap();
    assert!(recorded_url.starts_with("https://user:"), "{recorded_url}");
    assert!(recorded_url.ends_with("@github.com/octo/app/blob/abc/config.env"));
    assert!(!recorded_url.contains("hunter2"), "{recorded_url}");
    assert_eq!(exposure["new"]["source"], "content");
    assert_eq!(exposure["new"]["reporter"], "github");
    assert_eq!(events[1].0, LifecycleAction::Revoked);
    assert_eq!(events[1].1, id);
    // The key itself is in no audit event.
    let all = serde_json::to_string(&s.sink.events()).unwrap();
    assert!(!all.contains(&leaked));
}

#[tokio::test]
async fn the_disable_policy_disables_and_report_only_changes_no_status() {
    let s = setup();
    let (leaked, id) = s.issue("leaked").await;
    let body = json!([candidate(&leaked, "https://github.com/o/r/blob/1/a")]).to_string();

    let a = report(&s, &s.app(LeakPolicy::ReportOnly), &body).await;
    assert_eq!(a.json[0]["label"], "true_positive");
    assert_eq!(s.status(id).await, KeyStatus::Active);
    let events = s.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, LifecycleAction::Exposed);

    let a = report(&s, &s.app(LeakPolicy::Disable), &body).await;
    assert_eq!(a.json[0]["label"], "true_positive");
    assert_eq!(s.status(id).await, KeyStatus::Disabled);
    let actions: Vec<_> = s.events().into_iter().map(|e| e.0).collect();
    assert_eq!(
        actions,
        [
            LifecycleAction::Exposed,
            LifecycleAction::Exposed,
            LifecycleAction::Disabled
        ]
    );
}

#[tokio::test]
async fn false_positives_change_nothing_and_are_answered_as_such() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (real, id) = s.issue("real").await;

    // The last character changed: the checksum no longer matches.
    let mut bad_checksum = real.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    // A well-formed key this service never issued.
    let unknown = keygate::ApiKey::generate(&keygate::Prefix::default())
        .unwrap()
        .expose_secret()
        .to_owned();
    let body = json!([
        candidate(&bad_checksum, "https://github.com/o/r/blob/1/a"),
        candidate(&unknown, "https://github.com/o/r/blob/1/b"),
        {"token": "not a key at all", "type": "keygate_api_key"},
    ])
    .to_string();
    let a = report(&s, &app, &body).await;

    assert_eq!(a.status, StatusCode::OK);
    let labels: Vec<_> = a
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["label"].clone())
        .collect();
    assert_eq!(labels, ["false_positive"; 3]);
    assert_eq!(a.json[0]["token_raw"], bad_checksum.as_str());
    assert_eq!(a.json[2]["token_raw"], "not a key at all");
    assert_eq!(s.status(id).await, KeyStatus::Active);
    assert!(s.events().is_empty(), "{:?}", s.events());
}

#[tokio::test]
async fn a_key_whose_secret_does_not_match_the_stored_digest_is_a_false_positive() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (reported, id) = s.issue("reported").await;
    let (_, donor) = s.issue("donor").await;
    // The stored record of `reported` now holds another key's digest: the reported
    // candidate parses and its id exists, but its secret is not the stored one.
    let mut record = s.keys.show(id).await.unwrap();
    record.digest = s.keys.show(donor).await.unwrap().digest;
    s.keys.store().update(&record).await.unwrap();
    s.verifier.invalidate(&id);

    let body = json!([candidate(&reported, "https://github.com/o/r/blob/1/a")]).to_string();
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json[0]["label"], "false_positive");
    assert_eq!(s.status(id).await, KeyStatus::Active);
    assert!(s.events().is_empty());
}

#[tokio::test]
async fn a_key_reported_twice_is_handled_once_and_both_are_answered() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (leaked, id) = s.issue("leaked").await;
    let body = json!([
        candidate(&leaked, "https://github.com/o/r/blob/1/a"),
        candidate(&leaked, "https://github.com/o/r/blob/1/b"),
    ])
    .to_string();
    let a = report(&s, &app, &body).await;
    assert_eq!(a.json[0]["label"], "true_positive");
    assert_eq!(a.json[1]["label"], "true_positive");
    assert_eq!(s.status(id).await, KeyStatus::Revoked);
    let actions: Vec<_> = s.events().into_iter().map(|e| e.0).collect();
    assert_eq!(
        actions,
        [LifecycleAction::Exposed, LifecycleAction::Revoked]
    );

    // Reported again later: still a true positive, the key stays revoked.
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json[0]["label"], "true_positive");
    assert_eq!(s.status(id).await, KeyStatus::Revoked);
}

#[tokio::test]
async fn unsigned_badly_signed_foreign_or_tampered_reports_are_refused_and_change_nothing() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (leaked, id) = s.issue("leaked").await;
    let body = json!([candidate(&leaked, "https://github.com/o/r/blob/1/a")]).to_string();
    let good = sign(&s.signer, body.as_bytes());

    // No headers at all, or only one of them.
    let a = post(&app, &[], &body).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json["code"], "missing_signature");
    let a = post(&app, &[("Github-Public-Key-Identifier", KEY_ID)], &body).await;
    assert_eq!(a.json["code"], "missing_signature");

    // An identifier that is not configured.
    let a = post(
        &app,
        &[
            ("Github-Public-Key-Identifier", "f9525bf080f75b35"),
            ("Github-Public-Key-Signature", &good),
        ],
        &body,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["code"], "unknown_public_key");

    // Signed by another key under the configured identifier.
    let forged = sign(&signing_key(8), body.as_bytes());
    let a = post(
        &app,
        &[
            ("Github-Public-Key-Identifier", KEY_ID),
            ("Github-Public-Key-Signature", &forged),
        ],
        &body,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["code"], "bad_signature");

    // Not base64, or not DER.
    for sig in ["%%%not-base64%%%", "aGVsbG8="] {
        let a = post(
            &app,
            &[
                ("Github-Public-Key-Identifier", KEY_ID),
                ("Github-Public-Key-Signature", sig),
            ],
            &body,
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{sig}");
        assert_eq!(a.json["code"], "bad_signature");
    }

    // The signature of the original body over a tampered one (another URL).
    let tampered = body.replace("blob/1/a", "blob/1/z");
    let a = post(
        &app,
        &[
            ("Github-Public-Key-Identifier", KEY_ID),
            ("Github-Public-Key-Signature", &good),
        ],
        &tampered,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["code"], "bad_signature");

    // No error answer echoes the key.
    assert!(!a.json.to_string().contains(&leaked));
    assert_eq!(s.status(id).await, KeyStatus::Active);
    assert!(s.events().is_empty());

    // The genuine report still works.
    let a = post(
        &app,
        &[
            ("Github-Public-Key-Identifier", KEY_ID),
            ("Github-Public-Key-Signature", &good),
        ],
        &body,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(s.status(id).await, KeyStatus::Revoked);
}

#[tokio::test]
async fn malformed_bodies_and_too_many_candidates_are_refused_and_change_nothing() {
    let s = setup();
    let app = s.app(LeakPolicy::Revoke);
    let (leaked, id) = s.issue("leaked").await;

    for body in [
        "not json".to_owned(),
        json!({"token": leaked}).to_string(),
        json!([{"token": leaked}]).to_string(),
    ] {
        let a = report(&s, &app, &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(a.json["code"], "invalid_json");
        assert!(!a.json.to_string().contains(&leaked));
    }

    // The cap is 3 here: four candidates, the leaked key among them, change nothing.
    let c = candidate(&leaked, "https://github.com/o/r/blob/1/a");
    let body = json!([c, c, c, c]).to_string();
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.json["code"], "too_many_candidates");

    // An empty report is answered with an empty array.
    let a = report(&s, &app, "[]").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json, json!([]));

    assert_eq!(s.status(id).await, KeyStatus::Active);
    assert!(s.events().is_empty());
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_refused() {
    let s = setup();
    let public = PublicKeys::new().with_key(KEY_ID, &pem(&s.signer)).unwrap();
    let app = Router::new().nest(
        "/leaks/github",
        LeakReports::new(s.keys.clone(), &s.verifier, public, LeakPolicy::Revoke)
            .max_body_bytes(64)
            .router(),
    );
    let body = format!("[{}]", " ".repeat(100));
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn public_keys_load_from_the_published_json_and_refuse_bad_keys() {
    let signer = signing_key(7);
    let dir = std::env::temp_dir().join(format!("keygate-leak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.json");
    std::fs::write(&path, published(&signer)).unwrap();
    let keys = PublicKeys::from_file(&path).unwrap();
    assert_eq!(keys.identifiers(), [KEY_ID]);
    std::fs::remove_dir_all(&dir).unwrap();

    assert!(PublicKeys::from_github_json("{}").is_err());
    let bad = json!({"public_keys": [{"key_identifier": "k", "key": "not a pem"}]}).to_string();
    let e = PublicKeys::from_github_json(&bad).unwrap_err();
    assert!(e.to_string().contains("\"k\""), "{e}");
    assert!(PublicKeys::new().with_key("", &pem(&signer)).is_err());
    assert!(PublicKeys::from_file(std::path::Path::new("/nonexistent/keys.json")).is_err());
}

/// A memory store whose `get` fails while `down` is set.
#[derive(Clone)]
struct FlakyStore {
    inner: MemoryStore,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl keygate::KeyStore for FlakyStore {
    async fn get(
        &self,
        id: &keygate::KeyId,
    ) -> Result<Option<keygate::KeyRecord>, keygate::StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(keygate::StoreError::Unavailable("test outage".into()));
        }
        self.inner.get(id).await
    }
    async fn insert(&self, record: &keygate::KeyRecord) -> Result<(), keygate::StoreError> {
        self.inner.insert(record).await
    }
    async fn update(&self, record: &keygate::KeyRecord) -> Result<(), keygate::StoreError> {
        self.inner.update(record).await
    }
    async fn list(
        &self,
        filter: &keygate::KeyFilter,
    ) -> Result<Vec<keygate::KeyRecord>, keygate::StoreError> {
        self.inner.list(filter).await
    }
}

#[tokio::test]
async fn a_store_outage_while_classifying_answers_503_and_changes_nothing() {
    let store = FlakyStore {
        inner: MemoryStore::new(),
        down: Default::default(),
    };
    let verifier = Verifier::builder(store.clone())
        .clock(ManualClock::at_2026())
        .build();
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
    let s = Setup {
        keys,
        sink,
        signer: signing_key(7),
        verifier,
    };
    let app = s.app(LeakPolicy::Revoke);
    let (leaked, id) = s.issue("leaked").await;

    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let body = json!([candidate(&leaked, "https://github.com/o/r/blob/1/a")]).to_string();
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.json["code"], "store_unavailable");
    assert!(!a.json.to_string().contains(&leaked));

    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s.status(id).await, KeyStatus::Active);
    assert!(s.events().is_empty());
    // The reporter's retry then works.
    let a = report(&s, &app, &body).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(s.status(id).await, KeyStatus::Revoked);
}

/// The signed sample request of GitHub's partner program documentation, with the public key
/// GitHub published for it: the signature verifies (its DER `s` is 31 bytes long), and the
/// sample token is not a keygate key.
#[tokio::test]
async fn the_signed_sample_request_from_githubs_documentation_verifies() {
    const ID: &str = "bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c";
    const PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYAGMWO8XgCamYKMJS6jc/qgvSlAd\nAjPuDPRcXU22YxgBrz+zoN19MzuRyW87qEt9/AmtoNP5GrobzUvQSyJFVw==\n-----END PUBLIC KEY-----\n";
    const SIGNATURE: &str = "MEQCIQDaMKqrGnE27S0kgMrEK0eYBmyG0LeZismAEz/BgZyt7AIfXt9fErtRS4XaeSt/AO1RtBY66YcAdjxji410VQV4xg==";
    const BODY: &str = r#"[{"source":"commit","token":"some_token","type":"some_type","url":"https://example.com/base-repo-url/"}]"#;
    let s = setup();
    let published =
        json!({"public_keys": [{"key_identifier": ID, "key": PEM, "is_current": true}]});
    let public = PublicKeys::from_github_json(&published.to_string()).unwrap();
    let app = Router::new().nest(
        "/leaks/github",
        LeakReports::new(s.keys.clone(), &s.verifier, public, LeakPolicy::Revoke).router(),
    );
    let headers = [
        ("Github-Public-Key-Identifier", ID),
        ("Github-Public-Key-Signature", SIGNATURE),
    ];
    let a = post(&app, &headers, BODY).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(
        a.json,
        json!([{"token_raw": "some_token", "token_type": "some_type", "label": "false_positive"}])
    );
    // One byte changed: refused.
    let a = post(&app, &headers, &BODY.replace("commit", "commis")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}
