//! `RequireTls`: a key sent in the clear from off this host is refused with
//! `403 insecure_transport` and recorded as exposed (and disabled when asked); over TLS, from
//! loopback, or through a trusted TLS-terminating proxy it passes; a request without a key
//! passes to the layers behind.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use keygate::check::CheckLayer;
use keygate::client_ip::TrustedProxies;
use keygate::core::audit::{AuditEvent, Auditor, LifecycleAction, MemorySink};
use keygate::require_tls::{RequireTls, ACTOR};
use keygate::transport::TlsConnection;
use keygate::{
    Clock, Denial, DenialCode, KeyGate, KeyManager, KeySpec, KeyStatus, KeyStore, ManualClock,
    MemoryStore, Verifier,
};
use tower::{ServiceBuilder, ServiceExt};

struct Env {
    gate: KeyGate,
    store: MemoryStore,
    sink: MemorySink,
    keys: KeyManager,
    clock: ManualClock,
    key: String,
    id: keygate::KeyId,
}

async fn env() -> Env {
    let store = MemoryStore::new();
    let clock = ManualClock::at_2026();
    let verifier = Verifier::builder(store.clone())
        .clock(clock.clone())
        .build();
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
    let issued = keys
        .issue("setup", KeySpec::new("ci").owner("acme"))
        .await
        .expect("issue");
    sink.take();
    Env {
        gate: KeyGate::new(verifier),
        store,
        sink,
        keys,
        clock,
        key: issued.key.expose_secret().to_owned(),
        id: issued.record.id,
    }
}

/// A request from `peer`, with `key` if given, over TLS if `tls`.
fn request(peer: [u8; 4], key: Option<&str>, tls: bool) -> Request<String> {
    let mut b = Request::get("/points");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let mut req = b.body(String::new()).expect("request");
    req.extensions_mut().insert(SocketAddr::from((peer, 40000)));
    if tls {
        req.extensions_mut().insert(TlsConnection);
    }
    req
}

async fn send(
    env: &Env,
    check: RequireTls,
    req: Request<String>,
) -> Response<keygate::reject::ResponseBody<String>> {
    ServiceBuilder::new()
        .layer(CheckLayer::new(check).with_gate(&env.gate))
        .service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new("ok".to_owned()))
        })
        .oneshot(req)
        .await
        .expect("infallible")
}

fn denial<B>(res: &Response<B>) -> Option<DenialCode> {
    res.extensions().get::<Denial>().map(Denial::code)
}

fn actions(sink: &MemorySink) -> Vec<LifecycleAction> {
    sink.events()
        .iter()
        .filter_map(AuditEvent::as_lifecycle)
        .map(|l| l.action)
        .collect()
}

const REMOTE: [u8; 4] = [203, 0, 113, 7];

#[tokio::test]
async fn a_key_in_the_clear_is_refused_and_recorded_as_exposed() {
    let env = env().await;
    let check = RequireTls::new()
        .audit(Auditor::direct(env.sink.clone()))
        .clock(std::sync::Arc::new(env.clock.clone()));
    let res = send(&env, check.clone(), request(REMOTE, Some(&env.key), false)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));

    let events = env.sink.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let exposed = events[0].as_lifecycle().expect("lifecycle");
    assert_eq!(exposed.action, LifecycleAction::Exposed);
    assert_eq!(exposed.key_id, env.id);
    assert_eq!(exposed.key_name, "ci");
    assert_eq!(exposed.subject.as_deref(), Some("acme"));
    assert_eq!(exposed.actor, ACTOR);
    assert_eq!(exposed.time, env.clock.now());
    let json = serde_json::to_string(&events[0]).expect("json");
    assert!(json.contains(r#""action":"exposed""#), "{json}");
    assert!(!json.contains(&env.key), "no key in the event");

    // Not disabled without the option: the same key over TLS still works.
    let res = send(&env, check, request(REMOTE, Some(&env.key), true)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let stored = env.store.get(&env.id).await.expect("get").expect("record");
    assert_eq!(stored.status, KeyStatus::Active);
}

#[tokio::test]
async fn disable_exposed_disables_the_key_before_the_refusal() {
    let env = env().await;
    let check = RequireTls::new()
        .audit(Auditor::direct(env.sink.clone()))
        .disable_exposed(env.keys.clone());
    let res = send(&env, check.clone(), request(REMOTE, Some(&env.key), false)).await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
    // Disabled by the time the answer is out.
    let stored = env.store.get(&env.id).await.expect("get").expect("record");
    assert_eq!(stored.status, KeyStatus::Disabled);
    assert_eq!(
        actions(&env.sink),
        [LifecycleAction::Exposed, LifecycleAction::Disabled]
    );
    // Over TLS now, the auth layer refuses the key as disabled.
    let res = ServiceBuilder::new()
        .layer(CheckLayer::new(check).with_gate(&env.gate))
        .layer(env.gate.auth_layer())
        .service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new("ok".to_owned()))
        })
        .oneshot(request(REMOTE, Some(&env.key), true))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(denial(&res), Some(DenialCode::DisabledKey));
}

#[tokio::test]
async fn tls_and_loopback_pass_and_nothing_is_recorded() {
    let env = env().await;
    let check = RequireTls::new().audit(Auditor::direct(env.sink.clone()));
    let res = send(&env, check.clone(), request(REMOTE, Some(&env.key), true)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = send(
        &env,
        check.clone(),
        request([127, 0, 0, 1], Some(&env.key), false),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(env.sink.is_empty());
    // Loopback is refused too when asked.
    let res = send(
        &env,
        check.including_loopback(),
        request([127, 0, 0, 1], Some(&env.key), false),
    )
    .await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
}

#[tokio::test]
async fn without_a_key_the_request_passes_and_a_bad_key_is_refused_unnamed() {
    let env = env().await;
    let check = RequireTls::new().audit(Auditor::direct(env.sink.clone()));
    let res = send(&env, check.clone(), request(REMOTE, None, false)).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "nothing exposed: the layers behind decide"
    );
    let res = send(
        &env,
        check.clone(),
        request(REMOTE, Some("kg_not_a_key"), false),
    )
    .await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
    assert!(env.sink.is_empty(), "no key to name");
    // No peer address at all: plaintext from an unknown peer, refused.
    let mut req = request(REMOTE, Some(&env.key), false);
    req.extensions_mut().remove::<SocketAddr>();
    let res = send(&env, check, req).await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
}

#[tokio::test]
async fn a_trusted_proxy_that_terminated_tls_is_believed() {
    let env = env().await;
    let proxies = TrustedProxies::new(["10.0.0.0/8"]).expect("proxies");
    let check = RequireTls::new().behind_proxies(proxies);
    let via = |peer: [u8; 4], proto: &str| {
        let mut req = request(peer, Some(&env.key), false);
        req.headers_mut()
            .insert("x-forwarded-proto", proto.parse().expect("value"));
        req
    };
    let res = send(&env, check.clone(), via([10, 1, 2, 3], "https")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = send(&env, check.clone(), via([10, 1, 2, 3], "http")).await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
    // The last value counts (the nearest proxy's).
    let res = send(&env, check.clone(), via([10, 1, 2, 3], "https, http")).await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
    // From anyone else the header is ignored.
    let res = send(&env, check, via(REMOTE, "https")).await;
    assert_eq!(denial(&res), Some(DenialCode::InsecureTransport));
}
