//! Failing closed when the audit log cannot be written: [`AuditGuardLayer`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::core::audit::Auditor;
use crate::future::ResponseFuture;
use crate::reject::{rejection, DefaultRenderer, Renderer};
use crate::{Denial, DenialCode, KeyGate};

/// Refuses every request with 503 `store_unavailable` (and `Retry-After: 1`) while its
/// auditor is not writing events ([`Auditor::is_healthy`]: the sink's last write or flush
/// failed, or the auditor has shut down), so no request is served unaudited once the log
/// is known to be failing. Built with [`AuditLayer::fail_closed`](super::AuditLayer::fail_closed)
/// and placed just inside that audit layer, so each refusal is itself recorded (with its
/// exact code): the first refusal whose event is written again lets traffic through.
///
/// The check is one or two atomic loads per request. With a queued auditor a failure is
/// noticed when the writer meets it, so requests already on their way are not refused.
///
/// ```
/// use keygate::core::audit::{AuditError, AuditEvent, AuditSink, Auditor};
/// use keygate::audit::AuditLayer;
/// use http::{Request, Response, StatusCode};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// struct Broken;
/// impl AuditSink for Broken {
///     fn record(&self, _: &AuditEvent) -> Result<(), AuditError> {
///         Err(AuditError::Other("disk full".into()))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let audit = AuditLayer::new(Auditor::direct(Broken));
/// let svc = ServiceBuilder::new()
///     .layer(audit.clone())
///     .layer(audit.fail_closed())
///     .service_fn(|_req: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
/// let first = svc.clone().oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(first.status(), StatusCode::OK); // its event fails to be written...
/// let second = svc.oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE); // ...so the next is refused
/// # }
/// ```
#[derive(Clone)]
pub struct AuditGuardLayer {
    auditor: Auditor,
    gate: Option<KeyGate>,
    renderer: Arc<dyn Renderer>,
}

impl std::fmt::Debug for AuditGuardLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditGuardLayer")
            .field("auditor", &self.auditor)
            .finish_non_exhaustive()
    }
}

impl AuditGuardLayer {
    /// A guard over `auditor`; refusals are rendered with the default renderer.
    pub fn new(auditor: Auditor) -> Self {
        AuditGuardLayer {
            auditor,
            gate: None,
            renderer: Arc::new(DefaultRenderer::default()),
        }
    }

    /// Renders refusals with `gate`'s renderer.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        self.gate = Some(gate.clone());
        self
    }
}

impl<S> Layer<S> for AuditGuardLayer {
    type Service = AuditGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditGuard {
            inner,
            layer: self.clone(),
        }
    }
}

/// Middleware of [`AuditGuardLayer`].
#[derive(Clone, Debug)]
pub struct AuditGuard<S> {
    inner: S,
    layer: AuditGuardLayer,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for AuditGuard<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<crate::reject::ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.layer.auditor.is_healthy() {
            return ResponseFuture::inner(self.inner.call(req), ());
        }
        let denial =
            Denial::new(DenialCode::StoreUnavailable).with_retry_after(Duration::from_secs(1));
        let renderer: &dyn Renderer = match &self.layer.gate {
            Some(g) => g.renderer(),
            None => &*self.layer.renderer,
        };
        ResponseFuture::rejected(rejection(renderer, denial, &req))
    }
}
