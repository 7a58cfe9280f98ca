//! The machinery every keygate layer shares: find out who is calling (through the hub, or
//! from the extensions alone), run the layer's check, then call the inner service or reject.

// With only `auth` every layer is built from the hub (the standalone parts go unused); with
// only `audit` nothing here is used.
#![cfg_attr(
    not(all(
        feature = "auth",
        any(
            feature = "scope",
            feature = "ip-allow",
            feature = "rate-limit",
            feature = "quota"
        )
    )),
    allow(dead_code)
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use tower_service::Service;

use crate::future::{ResponseFuture, ResponseNote};
use crate::gate::{remember, resolution, Begin};
use crate::reject::{rejection, DefaultRenderer, Renderer};
use crate::{Denial, DenialCode, KeyGate, Principal};

/// How a layer learns who is calling.
#[derive(Clone)]
pub(crate) enum Resolver {
    /// Built from the hub: resolves the principal itself when no earlier layer has.
    Hub(KeyGate),
    /// Built without the hub: only reads what an earlier layer put in the extensions; with
    /// nothing there it sees `missing_key` (and a layer that needs a principal fails closed).
    Extensions(Arc<dyn Renderer>),
}

impl Resolver {
    /// The resolver of a layer built without the hub, rendering with the default renderer.
    pub(crate) fn standalone() -> Self {
        Resolver::Extensions(Arc::new(DefaultRenderer::default()))
    }

    pub(crate) fn renderer(&self) -> &dyn Renderer {
        match self {
            Resolver::Hub(gate) => gate.renderer(),
            Resolver::Extensions(r) => &**r,
        }
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolver::Hub(_) => f.write_str("Resolver::Hub"),
            Resolver::Extensions(_) => f.write_str("Resolver::Extensions"),
        }
    }
}

/// A layer's decision, made once the caller is known.
pub(crate) trait Check<ReqB>: Send + 'static {
    /// What the decision writes on the inner service's response.
    type Note: ResponseNote;

    /// Decides for `req`, whose caller resolved to `who`. On success the request goes on
    /// (with any change the check made to it); on failure the denial is rendered.
    fn check(
        self,
        req: &mut Request<ReqB>,
        who: Result<&Principal, &Denial>,
    ) -> Result<Self::Note, Denial>;

    /// Like [`Check::check`], but may defer the decision to an async step (a usage store).
    /// The default decides now, through `check`.
    fn begin(
        self,
        req: &mut Request<ReqB>,
        who: Result<&Principal, &Denial>,
    ) -> Step<ReqB, Self::Note>
    where
        Self: Sized,
    {
        Step::Now(self.check(req, who))
    }
}

/// The async step of a deferred decision: takes the request and yields it back with the
/// verdict.
pub(crate) type Deferred<ReqB, N> = Box<
    dyn FnOnce(
            Request<ReqB>,
        )
            -> Pin<Box<dyn Future<Output = (Request<ReqB>, Result<N, Denial>)> + Send + 'static>>
        + Send
        + 'static,
>;

/// A check's verdict: made now, or after an async step.
pub(crate) enum Step<ReqB, N> {
    /// Decided without I/O.
    Now(Result<N, Denial>),
    /// Decided by an async step (a usage-store round trip).
    #[cfg_attr(not(feature = "quota"), allow(dead_code))]
    Later(Deferred<ReqB, N>),
}

/// Resolves the caller, runs `check`, then calls `inner` or rejects.
///
/// The hot path (cached key, or an earlier layer's verdict) stays synchronous and
/// allocation-free; only a key-cache miss boxes the store lookup.
pub(crate) fn call<S, ReqB, ResB, C>(
    inner: &mut S,
    resolver: &Resolver,
    mut req: Request<ReqB>,
    check: C,
) -> ResponseFuture<S::Future, ResB, C::Note>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
    C: Check<ReqB>,
{
    let missing;
    let result = match resolver {
        Resolver::Hub(gate) => match gate.begin(&req) {
            Begin::Done(r) => r,
            Begin::Fresh(r) => {
                remember(req.extensions_mut(), &r);
                r
            }
            Begin::Pending(pending) => {
                // Drive the service that was polled ready; leave a fresh clone behind.
                let clone = inner.clone();
                let mut ready = std::mem::replace(inner, clone);
                let gate = gate.clone();
                return ResponseFuture::resolving(Box::pin(async move {
                    let result = gate.verifier().finish(pending).await;
                    remember(req.extensions_mut(), &result);
                    let (req, verdict) = match check.begin(&mut req, result.as_ref()) {
                        Step::Now(verdict) => (req, verdict),
                        Step::Later(step) => step(req).await,
                    };
                    match verdict {
                        Ok(note) => Ok((ready.call(req), note)),
                        Err(denial) => Err(rejection(gate.renderer(), denial, &req)),
                    }
                }));
            }
        },
        Resolver::Extensions(_) => match resolution(req.extensions()) {
            Some(r) => r.cloned().map_err(Denial::clone),
            None => {
                missing = Denial::new(DenialCode::MissingKey);
                Err(missing)
            }
        },
    };
    match check.begin(&mut req, result.as_ref()) {
        Step::Now(Ok(note)) => ResponseFuture::inner(inner.call(req), note),
        Step::Now(Err(denial)) => {
            ResponseFuture::rejected(rejection(resolver.renderer(), denial, &req))
        }
        Step::Later(step) => {
            // Drive the service that was polled ready; leave a fresh clone behind.
            let clone = inner.clone();
            let mut ready = std::mem::replace(inner, clone);
            let resolver = resolver.clone();
            ResponseFuture::resolving(Box::pin(async move {
                let (req, verdict) = step(req).await;
                match verdict {
                    Ok(note) => Ok((ready.call(req), note)),
                    Err(denial) => Err(rejection(resolver.renderer(), denial, &req)),
                }
            }))
        }
    }
}
