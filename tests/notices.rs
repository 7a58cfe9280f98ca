//! Expiry and rotation-due notices: the sweep, driven by the manual clock, raises each
//! notice once (again only after the repeat interval), takes the tightest of the global,
//! role and identity maximum ages, records lifecycle audit events the metrics count, and
//! POSTs each notice to a webhook over a real socket, retrying a failing receiver a bounded
//! number of times; the body never holds the key or its digest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use keygate::core::audit::{AuditEvent, Auditor, LifecycleAction, MemorySink, TeeSink};
use keygate::metrics::Metrics;
use keygate::notices::{NoticeKind, NoticeSweep, Webhook, WebhookError};
use keygate::{
    ApiKey, Clock, Identity, KeyHasher, KeyRecord, KeyStatus, KeyStore, ManualClock, MemoryStore,
    Prefix, Role,
};

const DAY: Duration = Duration::from_secs(86_400);

struct World {
    clock: ManualClock,
    store: MemoryStore,
    sink: MemorySink,
    metrics: Metrics,
    auditor: Auditor,
}

fn world() -> World {
    let sink = MemorySink::new();
    let metrics = Metrics::new();
    let auditor = Auditor::direct(TeeSink::new(metrics.clone(), sink.clone()));
    World {
        clock: ManualClock::at_2026(),
        store: MemoryStore::new(),
        sink,
        metrics,
        auditor,
    }
}

impl World {
    async fn key(&self, name: &str, edit: impl FnOnce(&mut KeyRecord)) -> (ApiKey, KeyRecord) {
        let (key, mut record) = KeyRecord::generate(
            &Prefix::default(),
            &KeyHasher::new(),
            name,
            self.clock.now(),
        )
        .unwrap();
        edit(&mut record);
        self.store.insert(&record).await.unwrap();
        (key, record)
    }

    fn sweep(&self) -> NoticeSweep {
        NoticeSweep::new(Arc::new(self.store.clone()), Arc::new(self.clock.clone()))
            .max_age(DAY * 90)
            .warn_before_expiry(DAY * 14)
            .auditor(self.auditor.clone())
    }

    fn actions(&self) -> Vec<(LifecycleAction, String)> {
        self.sink
            .events()
            .iter()
            .filter_map(AuditEvent::as_lifecycle)
            .map(|e| (e.action, e.key_name.clone()))
            .collect()
    }
}

fn kinds(report: &keygate::notices::SweepReport) -> Vec<(NoticeKind, String)> {
    let mut v: Vec<_> = report
        .notices
        .iter()
        .map(|n| (n.kind, n.key_name.clone()))
        .collect();
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v
}

#[tokio::test]
async fn notices_are_raised_once_with_the_tightest_max_age() {
    let w = world();
    let now = w.clock.now();
    let mut role = Role::new("short-lived", now);
    role.attributes.insert("max_key_age".into(), "30d".into());
    w.store.insert_role(&role).await.unwrap();
    let mut team = Identity::new("batch-jobs", now);
    team.metadata = serde_json::json!({"max_key_age": "10d"});
    w.store.insert_identity(&team).await.unwrap();

    w.key("plain", |_| {}).await;
    w.key("expiring", |r| r.expires_at = Some(now + DAY * 100))
        .await;
    w.key("role", |r| r.roles = vec!["short-lived".into()])
        .await;
    w.key("identity", |r| r.identity = Some("batch-jobs".into()))
        .await;
    let (_, revoked) = w.key("revoked", |r| r.status = KeyStatus::Revoked).await;
    let sweep = w.sweep();

    w.clock.advance(DAY * 5);
    assert!(sweep.run_once().await.unwrap().notices.is_empty());

    // Day 11: the identity's 10 days are up.
    w.clock.advance(DAY * 6);
    let r = sweep.run_once().await.unwrap();
    assert_eq!(
        kinds(&r),
        [(NoticeKind::RotationDue, "identity".to_owned())]
    );
    assert_eq!(r.notices[0].max_age_s, Some(10 * 86_400));
    assert_eq!(
        r.notices[0].rotation_due_at.as_deref(),
        Some("2026-01-11T00:00:00Z")
    );
    // Raised once: the next sweep the same day says nothing new.
    assert!(sweep.run_once().await.unwrap().notices.is_empty());

    // Day 31: the role's 30 days; the identity key again (a day has passed).
    w.clock.advance(DAY * 20);
    let r = sweep.run_once().await.unwrap();
    assert_eq!(
        kinds(&r),
        [
            (NoticeKind::RotationDue, "identity".to_owned()),
            (NoticeKind::RotationDue, "role".to_owned()),
        ]
    );

    // Day 91: the global 90 days for the plain and expiring keys, and the expiring key is
    // inside its 14-day window (from day 86). The revoked key is never noticed.
    w.clock.advance(DAY * 60);
    let r = sweep.run_once().await.unwrap();
    assert_eq!(
        kinds(&r),
        [
            (NoticeKind::RotationDue, "expiring".to_owned()),
            (NoticeKind::Expiring, "expiring".to_owned()),
            (NoticeKind::RotationDue, "identity".to_owned()),
            (NoticeKind::RotationDue, "plain".to_owned()),
            (NoticeKind::RotationDue, "role".to_owned()),
        ]
    );
    assert!(r.notices.iter().all(|n| n.key_id != revoked.id));

    // Each notice is one lifecycle audit event, counted by the metrics.
    let actions = w.actions();
    assert_eq!(actions.len(), 1 + 2 + 5);
    assert_eq!(
        actions
            .iter()
            .filter(|(a, _)| *a == LifecycleAction::Expiring)
            .count(),
        1
    );
    let text = w.metrics.render();
    assert!(
        text.contains(r#"keygate_key_lifecycle_total{action="rotation_due"} 7"#),
        "{text}"
    );
    assert!(text.contains(r#"keygate_key_lifecycle_total{action="expiring"} 1"#));

    // Past its expiry a key is no longer noticed.
    w.clock.advance(DAY * 10);
    let r = sweep.run_once().await.unwrap();
    assert!(r.notices.iter().all(|n| n.key_name != "expiring"), "{r:?}");
}

/// A receiver over a real socket that answers 500 to the first `failures` POSTs, then
/// 204, and keeps every body it saw.
async fn receiver(failures: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let bodies = seen.clone();
    let app = axum::Router::new().route(
        "/hooks/keygate",
        post(move |body: String| {
            let bodies = bodies.clone();
            async move {
                let mut b = bodies.lock().unwrap();
                b.push(body);
                if b.len() <= failures {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let addr = keygate_testkit::serve::spawn_axum(app).await;
    (format!("http://{addr}/hooks/keygate"), seen)
}

#[tokio::test]
async fn the_webhook_gets_each_notice_retrying_a_failing_receiver() {
    let w = world();
    let (key, record) = w.key("ci", |_| {}).await;
    // Fails twice, then accepts: one notice, three attempts, delivered.
    let (url, seen) = receiver(2).await;
    let sweep = w.sweep().webhook(
        Webhook::new(&url)
            .unwrap()
            .attempts(4)
            .backoff(Duration::from_millis(1)),
    );
    w.clock.advance(DAY * 91);
    let r = sweep.run_once().await.unwrap();
    assert_eq!((r.notices.len(), r.delivered, r.failed), (1, 1, 0));
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "two failures and the accepted retry");
    assert!(bodies.iter().all(|b| b == &bodies[0]), "the same notice");
    let body: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(body["type"], "keygate.key_notice");
    assert_eq!(body["kind"], "rotation_due");
    assert_eq!(body["key_id"], record.id.as_str());
    assert_eq!(body["key_name"], "ci");
    assert_eq!(body["rotation_due_at"], "2026-04-01T00:00:00Z");
    // Never the key, its secret or its digest.
    assert!(!bodies[0].contains(key.expose_secret()));
    let secret = &key.expose_secret()[key.expose_secret().len() - 28..];
    assert!(!bodies[0].contains(secret));
    let digest_hex: String = record
        .digest
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!bodies[0].to_lowercase().contains(&digest_hex));
    assert!(body.get("digest").is_none());

    // A receiver that never accepts: bounded attempts, counted as failed, then the sweep
    // goes on (the audit event was recorded regardless).
    let w = world();
    w.key("ci", |_| {}).await;
    let (url, seen) = receiver(usize::MAX).await;
    let sweep = w.sweep().webhook(
        Webhook::new(&url)
            .unwrap()
            .attempts(3)
            .backoff(Duration::from_millis(1)),
    );
    w.clock.advance(DAY * 91);
    let r = sweep.run_once().await.unwrap();
    assert_eq!((r.notices.len(), r.delivered, r.failed), (1, 0, 1));
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(w.actions().len(), 1);
}

#[test]
fn only_http_and_https_urls_with_a_host_are_accepted() {
    for bad in [
        "ftp://h/x",
        "not a url",
        "http:///x",
        "https:///x",
        "/relative",
    ] {
        assert!(
            matches!(Webhook::new(bad), Err(WebhookError::BadUrl(_))),
            "{bad}"
        );
    }
    assert!(Webhook::new("http://127.0.0.1:9/x").is_ok());
    // An https:// URL needs trusted roots: the system's, or the certificates given.
    assert!(matches!(
        Webhook::trusting_pem("https://hooks.test/x", b"no certificate here"),
        Err(WebhookError::Certificates(_))
    ));
    if let Err(e) = Webhook::new("https://hooks.test/x") {
        assert!(matches!(e, WebhookError::Certificates(_)), "{e}");
    }
}

/// A receiver over TLS (a self-signed certificate for `localhost`) that accepts every
/// POST; answers its URL, its certificate (PEM) and the bodies it saw.
async fn tls_receiver() -> (String, String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let bodies = seen.clone();
    let app = axum::Router::new().route(
        "/hooks/keygate",
        post(move |body: String| {
            let bodies = bodies.clone();
            async move {
                bodies.lock().unwrap().push(body);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let (addr, pem) = keygate_testkit::serve::spawn_axum_tls(app).await;
    (
        format!("https://localhost:{}/hooks/keygate", addr.port()),
        pem,
        seen,
    )
}

#[tokio::test]
async fn an_https_webhook_gets_the_notice_when_its_certificate_is_trusted() {
    let (url, pem, seen) = tls_receiver().await;
    // Trusting the receiver's certificate: delivered over TLS at the first attempt.
    let w = world();
    w.key("ci", |_| {}).await;
    let hook = Webhook::trusting_pem(&url, pem.as_bytes()).unwrap();
    let sweep = w
        .sweep()
        .webhook(hook.attempts(2).backoff(Duration::from_millis(1)));
    w.clock.advance(DAY * 91);
    let r = sweep.run_once().await.unwrap();
    assert_eq!((r.notices.len(), r.delivered, r.failed), (1, 1, 0));
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Trusting another certificate: the handshake fails, nothing is delivered.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let w = world();
    w.key("ci", |_| {}).await;
    let hook = Webhook::trusting_pem(&url, other.cert.pem().as_bytes())
        .unwrap()
        .attempts(2)
        .backoff(Duration::from_millis(1));
    let sweep = w.sweep().webhook(hook);
    w.clock.advance(DAY * 91);
    let r = sweep.run_once().await.unwrap();
    assert_eq!((r.notices.len(), r.delivered, r.failed), (1, 0, 1));
    assert_eq!(seen.lock().unwrap().len(), 1, "no new delivery");
}
