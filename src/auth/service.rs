use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::guard::{self, Check, Resolver};
use crate::reject::ResponseBody;
use crate::{Credentials, Denial, KeyGate, Principal};

/// Middleware that authenticates requests by API key. See [`ApiKeyAuthLayer`].
///
/// [`ApiKeyAuthLayer`]: super::ApiKeyAuthLayer
#[derive(Clone, Debug)]
pub struct ApiKeyAuth<S> {
    inner: S,
    resolver: Resolver,
    strip: Option<Arc<Credentials>>,
}

impl<S> ApiKeyAuth<S> {
    pub(crate) fn new(inner: S, gate: KeyGate, strip_credentials: bool) -> Self {
        ApiKeyAuth {
            inner,
            strip: strip_credentials.then(|| Arc::new(gate.credentials().clone())),
            resolver: Resolver::Hub(gate),
        }
    }

    /// The layer of `gate`.
    pub fn layer(gate: KeyGate) -> super::ApiKeyAuthLayer {
        super::ApiKeyAuthLayer::new(gate)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The authentication check: the resolution itself is the verdict.
struct Authenticate(Option<Arc<Credentials>>);

impl<ReqB> Check<ReqB> for Authenticate {
    type Note = ();

    fn check(
        self,
        req: &mut Request<ReqB>,
        who: Result<&Principal, &Denial>,
    ) -> Result<(), Denial> {
        who.map_err(Denial::clone)?;
        if let Some(credentials) = self.0 {
            credentials.strip(req);
        }
        Ok(())
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

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        guard::call(
            &mut self.inner,
            &self.resolver,
            req,
            Authenticate(self.strip.clone()),
        )
    }
}
