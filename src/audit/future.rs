use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime};

use std::sync::Arc;

use http::header::{Entry, HeaderName, HeaderValue};
use http::Response;
use pin_project_lite::pin_project;

use super::layer::Config;
use crate::core::audit::{AuditEvent, Decision, RequestEvent, Text, Transport};
use crate::{Denial, Principal};

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What the layer learned from the request, kept until the response.
pub(crate) struct Capture {
    pub(crate) start: Instant,
    pub(crate) time: SystemTime,
    pub(crate) request_id: HeaderValue,
    /// The request id as recorded (sharing the bytes it was cut from).
    pub(crate) id_text: Text,
    pub(crate) method: Cow<'static, str>,
    pub(crate) path: Text,
    pub(crate) grpc: bool,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) principal: Option<Principal>,
    /// When this layer called its inner service.
    pub(crate) called_at: Option<Instant>,
    /// When the innermost keygate layer called the protected service, if one did
    /// (`crate::timing`).
    pub(crate) inner_at: Option<Instant>,
    /// The request's `keygate.request` span (disabled, and free, without a subscriber that
    /// wants it).
    pub(crate) span: tracing::Span,
}

/// The span of a request (target `keygate`, level DEBUG, as tower-http's trace spans: a
/// subscriber at INFO creates none), with OpenTelemetry's semantic names; the outcome
/// fields are recorded when the response is known ([`record_outcome`]).
pub(crate) fn request_span(method: &str, path: &str, client: Option<IpAddr>) -> tracing::Span {
    let span = tracing::debug_span!(
        target: "keygate",
        "keygate.request",
        otel.kind = "server",
        http.request.method = method,
        url.path = path,
        client.address = tracing::field::Empty,
        user.id = tracing::field::Empty,
        keygate.key_id = tracing::field::Empty,
        keygate.decision = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if let Some(ip) = client {
        span.record("client.address", tracing::field::display(ip));
    }
    span
}

/// Records what became of the request on its span: the caller (`user.id`: the key's owner,
/// else its id), the decision, the status and, for a refusal or failure, `error.type` (the
/// exact denial code, `error` or `cancelled`).
fn record_outcome(span: &tracing::Span, e: &RequestEvent) {
    if span.is_disabled() {
        return;
    }
    if let Some(id) = e.key_id {
        span.record("keygate.key_id", id.as_str());
        match e.subject.as_deref() {
            Some(s) => span.record("user.id", s),
            None => span.record("user.id", id.as_str()),
        };
    }
    let decision = match e.decision {
        Decision::Allowed => "allowed",
        Decision::Denied => "denied",
        Decision::Error => "error",
        Decision::Cancelled => "cancelled",
    };
    span.record("keygate.decision", decision);
    if let Some(status) = e.status {
        span.record("http.response.status_code", status);
    }
    match (e.denial, e.decision) {
        (Some(code), _) => {
            span.record("error.type", code.as_str());
        }
        (None, Decision::Error | Decision::Cancelled) => {
            span.record("error.type", decision);
        }
        _ => {}
    }
}

impl Capture {
    /// The event of a request that ended without a response (`error`, `cancelled`), its
    /// span told.
    fn event(self, decision: Decision) -> RequestEvent {
        let (event, span) = self.finish(decision);
        record_outcome(&span, &event);
        event
    }

    /// The event so far, and the span to record the outcome on.
    fn finish(self, decision: Decision) -> (RequestEvent, tracing::Span) {
        let rpc = if self.grpc {
            self.path.strip_prefix('/').map(str::to_owned)
        } else {
            None
        };
        let (key_id, key_name, subject, tenant, roles) = match &self.principal {
            Some(p) => (
                Some(p.key_id()),
                Some(p.name_shared().clone()),
                p.subject_shared().cloned(),
                p.tenant_shared().cloned(),
                p.roles_shared().cloned(),
            ),
            None => (None, None, None, None, None),
        };
        let (token_id, token_subject) = match &self.principal {
            Some(p) => (
                p.token_id_shared().cloned(),
                p.token_subject_shared().cloned(),
            ),
            None => (None, None),
        };
        let latency = self.start.elapsed();
        // A refused request spent all its time in keygate; an allowed one until the
        // innermost keygate layer (or this one, with none inside) called the service.
        let stack_time = match self.inner_at.or(self.called_at) {
            Some(t) if decision != Decision::Denied => t.saturating_duration_since(self.start),
            _ => latency,
        };
        let event = RequestEvent {
            time: self.time,
            request_id: self.id_text,
            key_id,
            key_name,
            subject,
            tenant,
            client_ip: self.client_ip,
            protocol: if self.grpc {
                Transport::Grpc
            } else {
                Transport::Http
            },
            rpc,
            method: self.method,
            path: self.path,
            status: None,
            grpc_status: None,
            decision,
            denial: None,
            latency,
            roles,
            token_id,
            token_subject,
            policy: None,
            stack_time: Some(stack_time),
        };
        (event, self.span)
    }

    /// The event of a response; sets the request id on it when it has none.
    fn respond<B>(self, res: &mut Response<B>, config: &Config) -> RequestEvent {
        if let Entry::Vacant(v) = res.headers_mut().entry(&config.header) {
            v.insert(self.request_id.clone());
        }
        let refusal = res.extensions().get::<Denial>();
        let denial = refusal.map(Denial::code);
        let policy = refusal
            .and_then(|d| d.violated_policies().next())
            .map(str::to_owned);
        let decision = if denial.is_some() {
            Decision::Denied
        } else {
            Decision::Allowed
        };
        let (mut event, span) = self.finish(decision);
        event.status = Some(res.status().as_u16());
        event.grpc_status = res
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|s| s.trim().parse().ok());
        event.denial = denial;
        event.policy = policy;
        record_outcome(&span, &event);
        event
    }
}

/// The boxed step of a key-cache miss: reads the store, memoizes the verdict, then calls the
/// inner service, yielding its future and the principal.
type Resolving<F> = Pin<Box<dyn Future<Output = (F, Option<Principal>)> + Send + 'static>>;

pin_project! {
    /// Response future for [`Audit`](super::Audit).
    ///
    /// Records the request's event when the inner service's response (or error) arrives. If
    /// the future is dropped first (the client went away), it records a `cancelled` event.
    pub struct ResponseFuture<F>
    where
        F: Future,
    {
        #[pin]
        state: State<F>,
        capture: Option<Capture>,
        config: Arc<Config>,
    }

    impl<F> PinnedDrop for ResponseFuture<F>
    where
        F: Future,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(capture) = this.capture.take() {
                this.config
                    .auditor
                    .record_nowait(AuditEvent::Request(capture.event(Decision::Cancelled)));
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F>
    where
        F: Future,
    {
        Resolving { fut: Resolving<F> },
        Inner { #[pin] fut: F },
        Sending { send: Pin<Box<dyn Future<Output = ()> + Send + 'static>>, output: Option<F::Output> },
    }
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn inner(fut: F, capture: Capture, config: Arc<Config>) -> Self {
        ResponseFuture {
            state: State::Inner { fut },
            capture: Some(capture),
            config,
        }
    }

    pub(crate) fn resolving(fut: Resolving<F>, capture: Capture, config: Arc<Config>) -> Self {
        ResponseFuture {
            state: State::Resolving { fut },
            capture: Some(capture),
            config,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let span = this.capture.as_ref().map(|c| c.span.clone());
        let _entered = span.as_ref().map(tracing::Span::enter);
        loop {
            match this.state.as_mut().project() {
                StateProj::Resolving { fut } => {
                    crate::timing::arm();
                    let polled = fut.as_mut().poll(cx);
                    let called = crate::timing::take();
                    let (inner, principal) = ready!(polled);
                    if let Some(c) = this.capture.as_mut() {
                        c.principal = principal;
                        c.inner_at = c.inner_at.or(called);
                        c.called_at = Some(Instant::now());
                    }
                    this.state.set(State::Inner { fut: inner });
                }
                StateProj::Inner { fut } => {
                    let waiting = this.capture.as_ref().is_some_and(|c| c.inner_at.is_none());
                    if waiting {
                        crate::timing::arm();
                    }
                    let polled = fut.poll(cx);
                    if waiting {
                        let called = crate::timing::take();
                        if let Some(c) = this.capture.as_mut() {
                            c.inner_at = called;
                        }
                    }
                    let mut output = ready!(polled);
                    let Some(capture) = this.capture.take() else {
                        return Poll::Ready(output);
                    };
                    let event = match &mut output {
                        Ok(res) => capture.respond(res, this.config),
                        Err(_) => capture.event(Decision::Error),
                    };
                    match this.config.auditor.try_record(AuditEvent::Request(event)) {
                        Ok(()) => return Poll::Ready(output),
                        Err(event) => {
                            // The queue is full under `Overflow::Block`: the response waits
                            // until its event is queued.
                            let auditor = this.config.auditor.clone();
                            let send = Box::pin(async move {
                                // Fails only after shutdown; counted as dropped there.
                                let _ = auditor.record(event).await;
                            });
                            this.state.set(State::Sending {
                                send,
                                output: Some(output),
                            });
                        }
                    }
                }
                StateProj::Sending { send, output } => {
                    ready!(send.as_mut().poll(cx));
                    let output = output
                        .take()
                        .expect("audit ResponseFuture polled after completion");
                    return Poll::Ready(output);
                }
            }
        }
    }
}

impl<F: Future> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Resolving { .. } => "Resolving",
            State::Inner { .. } => "Inner",
            State::Sending { .. } => "Sending",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}
