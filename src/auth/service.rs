use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use crate::gate::{remember, Begin};
use crate::reject::{rejection, ResponseBody};
use crate::{KeyGate, Principal};

/// Middleware that authenticates requests by API key. See [`ApiKeyAuthLayer`].
///
/// [`ApiKeyAuthLayer`]: super::ApiKeyAuthLayer
#[derive(Clone, Debug)]
pub struct ApiKeyAuth<S> {
    inner: S,
    gate: KeyGate,
    strip_credentials: bool,
}

impl<S> ApiKeyAuth<S> {
    pub(crate) fn new(inner: S, gate: KeyGate, strip_credentials: bool) -> Self {
        ApiKeyAuth {
            inner,
            gate,
            strip_credentials,
        }
    }

    /// Wraps `inner` with the authentication of `gate`.
    pub fn layer(gate: KeyGate) -> super::ApiKeyAuthLayer {
        super::ApiKeyAuthLayer::new(gate)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ApiKeyAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let result = match self.gate.begin(&req) {
            Begin::Done(r) => r,
            Begin::Fresh(r) => {
                remember(req.extensions_mut(), &r);
                r
            }
            Begin::Pending(pending) => {
                // Drive the service that was polled ready; leave a fresh clone behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let gate = self.gate.clone();
                let strip = self.strip_credentials;
                return ResponseFuture::resolving(Box::pin(async move {
                    let result = gate.verifier().finish(pending).await;
                    remember(req.extensions_mut(), &result);
                    match result {
                        Ok(_) => {
                            if strip {
                                gate.credentials().strip(&mut req);
                            }
                            Ok(inner.call(req))
                        }
                        Err(denial) => Err(rejection(gate.renderer(), denial, &req)),
                    }
                }));
            }
        };
        match result {
            Ok(_principal) => {
                debug_assert!(req.extensions().get::<Principal>().is_some());
                if self.strip_credentials {
                    self.gate.credentials().strip(&mut req);
                }
                ResponseFuture::inner(self.inner.call(req))
            }
            Err(denial) => ResponseFuture::rejected(rejection(self.gate.renderer(), denial, &req)),
        }
    }
}
