//! `KeyDeprecation` with the manual clock: a key past its rotation date (created_at + max
//! age) or inside its warning window before expiry keeps working and answers with
//! `Deprecation: @<unix seconds>` (RFC 9745) and `Sunset: <HTTP-date>` (RFC 8594); a key
//! that is not due, and a request without a key, get neither.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use keygate::check::CheckLayer;
use keygate::core::audit::Auditor;
use keygate::deprecation::KeyDeprecation;
use keygate::{Clock, KeyGate, KeyManager, KeySpec, ManualClock, MemoryStore, Verifier};
use tower::{ServiceBuilder, ServiceExt};

const DAY: u64 = 86_400;
/// 2026-01-01T00:00:00Z, the manual clock's start and every key's `created_at`.
const START: u64 = 1_767_225_600;

struct Env {
    gate: KeyGate,
    keys: KeyManager,
    clock: ManualClock,
}

fn env() -> Env {
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(MemoryStore::new())
        .clock(clock.clone())
        .build();
    let keys = KeyManager::for_verifier(&verifier, Auditor::tracing());
    Env {
        gate: KeyGate::new(verifier),
        keys,
        clock,
    }
}

impl Env {
    async fn key(&self, expires_in_days: Option<u64>) -> String {
        let mut spec = KeySpec::new("ci");
        if let Some(d) = expires_in_days {
            spec = spec.expires_in(Duration::from_secs(d * DAY));
        }
        let issued = self.keys.issue("setup", spec).await.expect("issue");
        issued.key.expose_secret().to_owned()
    }

    fn at_day(&self, day: u64) {
        self.clock
            .set(std::time::UNIX_EPOCH + Duration::from_secs(START + day * DAY));
    }

    /// `GET /` with `key` through the check: status, Deprecation, Sunset.
    async fn call(
        &self,
        check: &KeyDeprecation,
        key: Option<&str>,
    ) -> (StatusCode, Option<String>, Option<String>) {
        let mut req = Request::get("/");
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let res = ServiceBuilder::new()
            .layer(CheckLayer::new(check.clone()).with_gate(&self.gate))
            .layer(self.gate.auth_layer())
            .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
            .oneshot(req.body(()).expect("request"))
            .await
            .expect("infallible");
        let header = |name: &str| {
            res.headers()
                .get(name)
                .map(|v| v.to_str().expect("ascii").to_owned())
        };
        (res.status(), header("deprecation"), header("sunset"))
    }
}

fn policy(env: &Env) -> KeyDeprecation {
    KeyDeprecation::new(Arc::new(env.clock.clone()))
        .max_age(Duration::from_secs(90 * DAY))
        .warn_before_expiry(Duration::from_secs(14 * DAY))
}

#[tokio::test]
async fn a_key_past_its_rotation_date_keeps_working_and_is_marked_deprecated() {
    let env = env();
    let check = policy(&env);
    let key = env.key(None).await;
    env.at_day(89);
    assert_eq!(
        env.call(&check, Some(&key)).await,
        (StatusCode::OK, None, None)
    );
    env.at_day(90);
    // Deprecated since created_at + 90 days; no expiry, so no Sunset.
    assert_eq!(
        env.call(&check, Some(&key)).await,
        (StatusCode::OK, Some("@1775001600".to_owned()), None)
    );
    env.at_day(400);
    assert_eq!(
        env.call(&check, Some(&key)).await.1.as_deref(),
        Some("@1775001600")
    );
}

#[tokio::test]
async fn a_key_inside_its_warning_window_gets_deprecation_and_sunset() {
    let env = env();
    let check = policy(&env);
    let key = env.key(Some(30)).await;
    env.at_day(15);
    assert_eq!(
        env.call(&check, Some(&key)).await,
        (StatusCode::OK, None, None)
    );
    env.at_day(16);
    // The window opened on day 16 (30 - 14); the key stops working on 2026-01-31.
    assert_eq!(
        env.call(&check, Some(&key)).await,
        (
            StatusCode::OK,
            Some("@1768608000".to_owned()),
            Some("Sat, 31 Jan 2026 00:00:00 GMT".to_owned())
        )
    );
    // Past the expiry the auth layer refuses; the check adds nothing to a refusal it
    // does not see a principal for.
    env.at_day(31);
    let (status, deprecation, _) = env.call(&check, Some(&key)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(deprecation, None);
}

#[tokio::test]
async fn the_earlier_of_rotation_date_and_warning_window_is_the_deprecation_date() {
    let env = env();
    let check = policy(&env);
    let key = env.key(Some(100)).await;
    env.at_day(91);
    // Rotation date: day 90; warning window: from day 86. Sunset: day 100 (2026-04-11).
    assert_eq!(
        env.call(&check, Some(&key)).await,
        (
            StatusCode::OK,
            Some(format!("@{}", START + 86 * DAY)),
            Some("Sat, 11 Apr 2026 00:00:00 GMT".to_owned())
        )
    );
}

#[tokio::test]
async fn no_key_or_no_policy_writes_nothing() {
    let env = env();
    let key = env.key(Some(5)).await;
    env.at_day(4);
    // Without settings, nothing is written.
    let off = KeyDeprecation::new(Arc::new(env.clock.clone()));
    assert_eq!(
        env.call(&off, Some(&key)).await,
        (StatusCode::OK, None, None)
    );
    // A request without a key is left to the auth layer.
    let (status, deprecation, sunset) = env.call(&policy(&env), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!((deprecation, sunset), (None, None));
}

#[tokio::test]
async fn fused_with_auth_in_one_stack() {
    let env = env();
    let key = env.key(Some(30)).await;
    env.at_day(20);
    let svc = ServiceBuilder::new()
        .layer(env.gate.stack().auth().check(policy(&env)))
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let req = |k: Option<&str>| {
        let mut b = Request::get("/");
        if let Some(k) = k {
            b = b.header("x-api-key", k);
        }
        b.body(()).expect("request")
    };
    let res = svc
        .clone()
        .oneshot(req(Some(&key)))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["deprecation"], "@1768608000");
    assert_eq!(res.headers()["sunset"], "Sat, 31 Jan 2026 00:00:00 GMT");
    let res = svc.oneshot(req(None)).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().get("deprecation").is_none());
}

#[tokio::test]
async fn a_key_or_role_max_key_age_tighter_than_the_global_one_wins() {
    let env = env();
    let check = policy(&env);
    // The key's own attribute: 30 days, under the global 90.
    let issued = env
        .keys
        .issue(
            "setup",
            KeySpec::new("short").attribute("max_key_age", "30d"),
        )
        .await
        .expect("issue");
    let short = issued.key.expose_secret().to_owned();
    // A looser one (120 days) does not loosen the global 90.
    let issued = env
        .keys
        .issue(
            "setup",
            KeySpec::new("long").attribute("max_key_age", "120d"),
        )
        .await
        .expect("issue");
    let long = issued.key.expose_secret().to_owned();
    env.at_day(29);
    assert_eq!(env.call(&check, Some(&short)).await.1, None);
    env.at_day(30);
    assert_eq!(
        env.call(&check, Some(&short)).await.1,
        Some(format!("@{}", START + 30 * DAY))
    );
    assert_eq!(env.call(&check, Some(&long)).await.1, None);
    env.at_day(90);
    assert_eq!(
        env.call(&check, Some(&long)).await.1,
        Some(format!("@{}", START + 90 * DAY))
    );
    // Without a global age the attribute alone applies.
    let only_attr = KeyDeprecation::new(Arc::new(env.clock.clone()));
    assert_eq!(
        env.call(&only_attr, Some(&short)).await.1,
        Some(format!("@{}", START + 30 * DAY))
    );
    assert_eq!(env.call(&only_attr, Some(&long)).await.1, None);
}

#[tokio::test]
async fn an_identitys_max_key_age_tightens_its_keys_rotation_date() {
    let env = env();
    let check = policy(&env);
    let mut etl = keygate::Identity::new("etl", env.clock.now());
    etl.metadata = serde_json::json!({"max_key_age": "20d"});
    env.keys
        .create_identity("setup", etl)
        .await
        .expect("identity");
    // The identity's 20 days beat the key's own 30 and the global 90.
    let issued = env
        .keys
        .issue(
            "setup",
            KeySpec::new("job")
                .identity("etl")
                .attribute("max_key_age", "30d"),
        )
        .await
        .expect("issue");
    let key = issued.key.expose_secret().to_owned();
    // A key of no identity keeps its own 30 days.
    let issued = env
        .keys
        .issue(
            "setup",
            KeySpec::new("alone").attribute("max_key_age", "30d"),
        )
        .await
        .expect("issue");
    let alone = issued.key.expose_secret().to_owned();
    env.at_day(19);
    assert_eq!(env.call(&check, Some(&key)).await.1, None);
    env.at_day(20);
    assert_eq!(
        env.call(&check, Some(&key)).await.1,
        Some(format!("@{}", START + 20 * DAY))
    );
    assert_eq!(env.call(&check, Some(&alone)).await.1, None);
}
