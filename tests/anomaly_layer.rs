//! Anomaly signals from real requests: the audit layer's events (timed by the hub's manual
//! clock) go through an `AnomalySink`; a key used from a new network after its learning
//! period raises `new_network`, which is counted by the metrics, and the disable policy
//! disables the key so its next request is refused.
#![cfg(all(feature = "audit", feature = "auth", feature = "metrics"))]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use common::Fixture;
use http::{Request, Response, StatusCode};
use keygate::core::audit::{
    AnomalyConfig, AnomalyKind, AnomalySink, Auditor, LifecycleAction, MemorySink, TeeSink,
};
use keygate::metrics::Metrics;
use keygate::DenialCode;
use keygate::{KeyManager, KeyStatus, KeyStore};
use tower::{service_fn, ServiceBuilder, ServiceExt};

type Body = String;

#[tokio::test(flavor = "current_thread")]
async fn a_new_network_is_signalled_counted_and_disables_the_key() {
    let fx = Fixture::new();
    let key = fx.issue("ci").await;
    let id = key.id();
    let log = MemorySink::new();
    let metrics = Metrics::new();
    let manager = KeyManager::for_verifier(fx.gate.verifier(), Auditor::direct(log.clone()));
    let (sink, disabler) = AnomalySink::new(
        AnomalyConfig {
            learning: Duration::from_secs(3600),
            ..AnomalyConfig::default()
        },
        TeeSink::new(metrics.clone(), log.clone()),
    )
    .disable_keys_on([AnomalyKind::NewNetwork], manager);
    let disabling = tokio::spawn(disabler.run());
    let app = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink)))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    let call = |from: [u8; 4]| {
        let mut req = Request::get("/collections")
            .header("authorization", format!("Bearer {}", key.expose_secret()))
            .body(Body::new())
            .unwrap();
        req.extensions_mut().insert(SocketAddr::from((from, 40000)));
        app.clone().oneshot(req)
    };

    // Learning, then the same /24 after it: no signal.
    assert_eq!(call([192, 0, 2, 7]).await.unwrap().status(), StatusCode::OK);
    fx.clock.advance(Duration::from_secs(7200));
    assert_eq!(call([192, 0, 2, 8]).await.unwrap().status(), StatusCode::OK);
    assert!(log.events().iter().all(|e| e.as_anomaly().is_none()));

    // Another network: the request itself is answered (the detector runs after it), the
    // signal is recorded right after its request event and counted.
    assert_eq!(
        call([198, 51, 100, 1]).await.unwrap().status(),
        StatusCode::OK
    );
    let events = log.events();
    let at = events
        .iter()
        .position(|e| e.as_anomaly().is_some())
        .expect("a signal");
    let signal = events[at].as_anomaly().unwrap();
    assert_eq!(signal.kind, AnomalyKind::NewNetwork);
    assert_eq!(signal.key_id, Some(id));
    assert_eq!(signal.key_name.as_deref(), Some("ci"));
    assert_eq!(signal.network.as_deref(), Some("198.51.100.0/24"));
    assert_eq!(signal.time, fx.gate.clock().now());
    assert_eq!(
        events[at - 1].as_request().unwrap().client_ip,
        Some([198, 51, 100, 1].into())
    );
    assert!(metrics
        .render()
        .contains(r#"keygate_anomalies_total{kind="new_network"} 1"#));

    // The disabler runs on this (single) thread as soon as the test yields; the memory
    // store never waits, so a few turns are enough.
    for _ in 0..100 {
        if fx.store.memory().get(&id).await.unwrap().unwrap().status == KeyStatus::Disabled {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        fx.store.memory().get(&id).await.unwrap().unwrap().status,
        KeyStatus::Disabled
    );
    let disabled = log
        .events()
        .into_iter()
        .filter_map(|e| e.as_lifecycle().cloned())
        .find(|l| l.action == LifecycleAction::Disabled)
        .expect("a disabled event");
    assert_eq!(disabled.actor, "anomaly:new_network");
    // The key's next request is refused, from anywhere.
    let res = call([192, 0, 2, 7]).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let last = log
        .events()
        .into_iter()
        .rev()
        .find_map(|e| e.as_request().cloned())
        .unwrap();
    assert_eq!(last.denial, Some(DenialCode::DisabledKey));
    drop(app);
    disabling.await.unwrap();
}
