//! The audit layer's `keygate.request` span, with OpenTelemetry's semantic names: method,
//! path (a key in it masked), client address, the caller as `user.id`, the status, and
//! `error.type` (the exact denial code) for refusals; the service runs inside it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use keygate::core::audit::{Auditor, MemorySink};
use keygate::{Clock, KeyGate, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix, Verifier};
use tower::{ServiceBuilder, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

type Fields = BTreeMap<String, String>;

#[derive(Clone, Default)]
struct Spans {
    open: Arc<Mutex<HashMap<u64, (String, Fields)>>>,
    closed: Arc<Mutex<Vec<(String, Fields)>>>,
    /// The span the service's own event was seen in.
    inside: Arc<Mutex<Vec<String>>>,
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

impl<S> Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        self.open
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_owned(), fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some((_, fields)) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Visitor(fields));
        }
    }
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        if fields.get("message").map(String::as_str) == Some("inside the service") {
            let span = ctx.event_span(event).map(|s| s.name().to_owned());
            self.inside.lock().unwrap().push(span.unwrap_or_default());
        }
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(done) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(done);
        }
    }
}

#[tokio::test]
async fn each_request_is_a_span_with_semantic_fields() {
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));

    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "ci",
        clock.now(),
    )
    .unwrap();
    record.owner = Some("alice".into());
    store.insert(&record).await.unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            gate.stack()
                .auth()
                .audit(Auditor::direct(MemorySink::new())),
        )
        .service(tower::service_fn(|_: Request<()>| async {
            tracing::info!("inside the service");
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let send = |path: String, k: Option<&str>| {
        let mut b = Request::post(path);
        if let Some(k) = k {
            b = b.header("x-api-key", k);
        }
        let mut req = b.body(()).unwrap();
        req.extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 7], 4000)));
        svc.clone().oneshot(req)
    };
    let ok = send("/data".into(), Some(key.expose_secret()))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let refused = send(format!("/data/{}", key.expose_secret()), None)
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    let closed = spans.closed.lock().unwrap().clone();
    let requests: Vec<&Fields> = closed
        .iter()
        .filter(|(name, _)| name == "keygate.request")
        .map(|(_, f)| f)
        .collect();
    assert_eq!(requests.len(), 2, "{closed:?}");
    let first = requests[0];
    for (field, want) in [
        ("http.request.method", "POST"),
        ("url.path", "/data"),
        ("client.address", "192.0.2.7"),
        ("user.id", "alice"),
        ("keygate.key_id", record.id.as_str()),
        ("keygate.decision", "allowed"),
        ("http.response.status_code", "200"),
        ("otel.kind", "server"),
    ] {
        assert_eq!(
            first.get(field).map(String::as_str),
            Some(want),
            "{field}: {first:?}"
        );
    }
    assert!(first.get("error.type").is_none(), "{first:?}");

    let second = requests[1];
    assert_eq!(second["error.type"], "missing_key");
    assert_eq!(second["http.response.status_code"], "401");
    assert_eq!(second["keygate.decision"], "denied");
    assert!(second.get("user.id").is_none());
    // The key in the path is masked, as in the audit record.
    assert!(
        !second["url.path"].contains(key.expose_secret()),
        "{second:?}"
    );
    assert!(second["url.path"].starts_with("/data/"));

    // The service ran inside the request's span.
    assert_eq!(spans.inside.lock().unwrap().as_slice(), ["keygate.request"]);
}
