//! The audit trail under pressure: anonymous floods folded per source and window (on the
//! manual clock), failing closed when the log cannot be written (requests and key
//! changes), and keys hidden inside request ids and paths never recorded.
#![cfg(all(feature = "audit", feature = "auth"))]

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use http::{Request, Response, StatusCode};
use keygate::core::audit::{
    AggregateSink, AuditError, AuditEvent, AuditSink, Auditor, Decision, MemorySink,
};
use keygate::{Clock, DenialCode, KeyStatus};
use keygate::{KeyFilter, KeyManager, KeySpec, LifecycleError};
use tower::{service_fn, ServiceBuilder, ServiceExt};

type Body = String;

/// A sink that fails while `broken` is set, and otherwise keeps events in memory.
#[derive(Clone, Default)]
struct Switch {
    broken: Arc<AtomicBool>,
    memory: MemorySink,
}

impl Switch {
    fn set_broken(&self, yes: bool) {
        self.broken.store(yes, Ordering::SeqCst);
    }
}

impl AuditSink for Switch {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(AuditError::Io(std::io::Error::other("disk full")));
        }
        self.memory.record(event)
    }
}

fn from(ip: [u8; 4], path: &str) -> Request<Body> {
    let mut req = Request::get(path).body(Body::new()).unwrap();
    req.extensions_mut().insert(SocketAddr::from((ip, 40_000)));
    req
}

#[tokio::test]
async fn anonymous_denials_fold_into_one_event_per_source_and_window() {
    let fx = Fixture::new();
    let key = fx.issue("reader").await;
    let memory = MemorySink::new();
    let auditor =
        Auditor::direct(AggregateSink::new(memory.clone()).window(Duration::from_secs(10)));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(auditor.clone()))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    // Start on a window boundary so the test does not depend on where 2026 falls in one.
    let now = fx.clock.now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    fx.clock.advance(Duration::from_secs(10 - secs % 10));

    // 500 requests without a key from one address, 200 from another, and two with a valid
    // key in between: all in one 10-second window.
    for i in 0..700 {
        let ip = if i % 7 < 5 {
            [203, 0, 113, 9]
        } else {
            [198, 51, 100, 4]
        };
        let res = svc.clone().oneshot(from(ip, "/collections")).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        if i == 100 || i == 600 {
            let mut req = from([203, 0, 113, 9], "/collections");
            req.headers_mut()
                .insert("x-api-key", key.expose_secret().parse().unwrap());
            assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
        }
        fx.clock.advance(Duration::from_millis(10));
    }
    // Within the window: the first denial of each source and the two allowed requests.
    let events = memory.events();
    assert_eq!(events.len(), 4, "{events:#?}");
    // The next window's first event closes it: one summary per source, in the order the
    // sources were first seen, then the new event.
    fx.clock.advance(Duration::from_secs(10));
    svc.clone()
        .oneshot(from([203, 0, 113, 9], "/collections"))
        .await
        .unwrap();
    let events = memory.events();
    assert_eq!(events.len(), 7, "{events:#?}");
    let a = events[4].as_denials().expect("a summary");
    let b = events[5].as_denials().expect("a summary");
    assert_eq!(a.client_ip, Some(IpAddr::from([203, 0, 113, 9])));
    assert_eq!(
        (a.count, a.denial, a.status),
        (499, Some(DenialCode::MissingKey), Some(401))
    );
    assert_eq!(b.client_ip, Some(IpAddr::from([198, 51, 100, 4])));
    assert_eq!(b.count, 199);
    assert_eq!(
        a.until.duration_since(a.time).unwrap(),
        Duration::from_secs(10)
    );
    assert!(a.first >= a.time && a.last < a.until && a.first < a.last);
    let last = events[6]
        .as_request()
        .expect("the next window's first request");
    assert_eq!(last.decision, Decision::Denied);
    // 701 denied and 2 allowed requests, accounted for in 7 events.
    let folded: u64 = events
        .iter()
        .filter_map(|e| e.as_denials())
        .map(|d| d.count)
        .sum();
    let single = events.iter().filter(|e| e.as_request().is_some()).count() as u64;
    assert_eq!(folded + single, 703);
    // A flush closes the window too.
    svc.clone()
        .oneshot(from([203, 0, 113, 9], "/collections"))
        .await
        .unwrap();
    auditor.flush().await.unwrap();
    let events = memory.events();
    assert_eq!(events.last().unwrap().as_denials().unwrap().count, 1);
}

#[tokio::test]
async fn fail_closed_refuses_requests_while_the_log_cannot_be_written() {
    let fx = Fixture::new();
    let key = fx.issue("reader").await;
    let sink = Switch::default();
    let audit = fx.gate.audit_layer(Auditor::direct(sink.clone()));
    let svc = ServiceBuilder::new()
        .layer(audit.clone())
        .layer(audit.fail_closed())
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    let get = || {
        Request::get("/points")
            .header("x-api-key", key.expose_secret())
            .body(Body::new())
            .unwrap()
    };
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 200);
    sink.set_broken(true);
    // This one is served, but its event cannot be written...
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 200);
    assert!(!audit.auditor().is_healthy());
    // ...so the next ones are refused, unaudited or not.
    for _ in 0..3 {
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "1");
    }
    assert_eq!(audit.auditor().stats().failed, 4);
    // The log works again: the next refusal is recorded, and traffic flows after it.
    sink.set_broken(false);
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(audit.auditor().is_healthy());
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 200);
    let events: Vec<_> = sink
        .memory
        .events()
        .iter()
        .map(|e| e.as_request().unwrap().denial)
        .collect();
    assert_eq!(events, [None, Some(DenialCode::StoreUnavailable), None]);

    // Without the guard, requests carry on (the default), counted as lost events.
    let plain = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    sink.set_broken(true);
    for _ in 0..2 {
        assert_eq!(plain.clone().oneshot(get()).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn fail_closed_notices_a_queued_writer_failing() {
    let fx = Fixture::new();
    let sink = Switch::default();
    let auditor = Auditor::spawn(sink.clone()).unwrap();
    let audit = fx.gate.audit_layer(auditor.clone());
    let svc = ServiceBuilder::new()
        .layer(audit.clone())
        .layer(audit.fail_closed())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    sink.set_broken(true);
    assert_eq!(
        svc.clone()
            .oneshot(from([192, 0, 2, 1], "/"))
            .await
            .unwrap()
            .status(),
        200
    );
    // Once the writer has met the failure, requests are refused.
    let _ = auditor.flush().await;
    assert!(!auditor.is_healthy());
    let res = svc
        .clone()
        .oneshot(from([192, 0, 2, 1], "/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // After shutdown, too: nothing would be recorded any more.
    sink.set_broken(false);
    auditor.shutdown().await;
    let res = svc
        .clone()
        .oneshot(from([192, 0, 2, 1], "/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn key_changes_fail_when_their_event_cannot_be_written() {
    for queued in [false, true] {
        let fx = Fixture::new();
        let sink = Switch::default();
        let auditor = if queued {
            Auditor::spawn(sink.clone()).unwrap()
        } else {
            Auditor::direct(sink.clone())
        };
        let keys = KeyManager::for_verifier(fx.gate.verifier(), auditor);
        let kept = keys.issue("alice", KeySpec::new("kept")).await.unwrap();
        let off = keys.issue("alice", KeySpec::new("off")).await.unwrap();
        keys.disable("alice", off.record.id).await.unwrap();
        sink.set_broken(true);

        // Issuing: refused, and the key it stored is revoked (its plaintext never shown).
        let err = keys
            .issue("alice", KeySpec::new("ghost"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, LifecycleError::AuditFailed { kept: false, .. }),
            "{err}"
        );
        let all = keys.list(&KeyFilter::default()).await.unwrap();
        let ghost = all.iter().find(|r| r.name == "ghost").expect("stored");
        assert_eq!(ghost.status, KeyStatus::Revoked);
        // Enabling: undone.
        let err = keys.enable("alice", off.record.id).await.unwrap_err();
        assert!(matches!(
            err,
            LifecycleError::AuditFailed { kept: false, .. }
        ));
        assert_eq!(
            keys.show(off.record.id).await.unwrap().status,
            KeyStatus::Disabled
        );
        // Rotating: undone (the old key keeps its expiry, the new one is revoked).
        let err = keys
            .rotate("alice", kept.record.id, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            LifecycleError::AuditFailed { kept: false, .. }
        ));
        assert_eq!(keys.show(kept.record.id).await.unwrap().expires_at, None);
        // Revoking: the key stays revoked (failing closed), and the caller is told.
        let err = keys.revoke("alice", kept.record.id).await.unwrap_err();
        assert!(
            matches!(err, LifecycleError::AuditFailed { kept: true, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(
            keys.show(kept.record.id).await.unwrap().status,
            KeyStatus::Revoked
        );
        // Only the changes that were recorded are in the log.
        let actions: Vec<_> = sink
            .memory
            .events()
            .iter()
            .map(|e| e.as_lifecycle().unwrap().action.as_str())
            .collect();
        assert_eq!(
            actions,
            ["issued", "issued", "disabled"],
            "queued: {queued}"
        );
    }
}

#[tokio::test]
async fn a_key_inside_a_request_id_or_path_is_never_recorded() {
    let fx = Fixture::new();
    let key = fx.issue("reader").await;
    let secret = key.expose_secret().to_owned();
    let body = secret[secret.len() - 40..].to_owned();
    let memory = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(memory.clone())))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    for id in [
        format!("req-{secret}"),
        format!("{secret}:1"),
        format!("a.{secret}.b"),
    ] {
        let req = Request::get(format!("/collections/{secret}/points"))
            .header("x-api-key", &secret)
            .header("x-request-id", &id)
            .body(Body::new())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let echoed = res.headers()["x-request-id"].to_str().unwrap();
        assert!(!echoed.contains(&body), "{echoed}");
    }
    let text = serde_json::to_string(&memory.events()).unwrap();
    assert_eq!(memory.len(), 3);
    assert!(!text.contains(&body), "{text}");
    let e = memory.events()[0].as_request().unwrap().clone();
    assert_eq!(e.path, format!("/collections/kg_{}/points", "*".repeat(40)));
    assert_eq!(
        e.request_id.len(),
        32,
        "a generated id replaced the client's"
    );
}
