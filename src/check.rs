//! Checks: the decisions keygate's layers make, and how to write one of your own.
//!
//! Every keygate layer that can refuse a request is a thin tower wrapper around one
//! [`Check`]: a small synchronous decision over the request and its caller (the verdict on
//! its key, resolved once per request and kept in the [`RequestContext`]). The wrapper,
//! [`Guarded`], resolves the caller when the check needs it, runs the check, and either
//! calls the inner service (writing the check's [`ResponseNote`] on its response) or renders
//! the denial.
//!
//! Several checks fuse into one service with one response future:
//! [`KeyGate::stack`](crate::KeyGate::stack) builds such a stack (`gate.stack().scope(..)
//! .ip(..).rate(..)`), and [`CheckLayer`] wraps any check of your own, alone or fused.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::check::{Caller, Check, CheckLayer};
//! use keygate::{Denial, DenialCode, KeyGate, MemoryStore, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! /// Refuses every request whose key has no `tenant` attribute.
//! #[derive(Clone)]
//! struct NeedsTenant;
//!
//! impl Check for NeedsTenant {
//!     type Note = ();
//!     fn check<B>(&self, _req: &mut Request<B>, caller: Caller<'_>) -> Result<(), Denial> {
//!         let principal = caller.map_err(Denial::clone)?;
//!         match principal.tenant() {
//!             Some(_) => Ok(()),
//!             None => Err(Denial::new(DenialCode::InsufficientScope).with_detail("No tenant.")),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
//! let svc = ServiceBuilder::new()
//!     .layer(CheckLayer::new(NeedsTenant).with_gate(&gate))
//!     .service_fn(|_: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED); // no key: the caller's denial
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::future::{RateLimitFields, ResponseFuture, ResponseNote};
use crate::gate::Start;
use crate::reject::{rejection, DefaultRenderer, Renderer, ResponseBody};
use crate::{Denial, DenialCode, KeyGate, Principal, RequestContext};

/// The caller of a request as a check sees it: the resolved [`Principal`], or the exact
/// [`Denial`] of its key (`missing_key` when it sent none, or when a layer built without
/// the hub finds no earlier verdict).
pub type Caller<'a> = Result<&'a Principal, &'a Denial>;

/// One decision over a request: the interface of every keygate layer that may refuse.
///
/// A check is configuration (cheap to clone, shared by every request); [`Check::check`]
/// decides one request. Wrap it in a [`CheckLayer`] to use it as a tower layer, alone or
/// fused with others.
pub trait Check: Clone + Send + Sync + 'static {
    /// What the check writes on the inner service's response when the request passes
    /// (header fields, refunds); `()` writes nothing.
    type Note: ResponseNote + Default;

    /// Whether this request needs its caller resolved before [`Check::check`] runs
    /// (default: yes). A check that lets some requests through whoever calls (public
    /// routes) answers `false` for them, so no key is verified for them.
    fn needs_caller<B>(&self, req: &Request<B>) -> bool {
        let _ = req;
        true
    }

    /// Whether, fused after a check whose decision waits on I/O ([`Step::Io`]), this check
    /// may run while that I/O is in flight instead of after it (default: no). A fused stack
    /// then overlaps their round trips: a rate limit and a quota on the same Redis cost one
    /// round trip, not two. The decisions stay those of the checks run in order: when the
    /// earlier check refuses, this one's verdict is dropped and what it counted is given
    /// back.
    ///
    /// A check may answer `true` only when (1) its decision reads nothing an earlier check
    /// writes on the request after its I/O, and (2) it can give back what it counted: its
    /// note's [`ResponseNote::cancel`] does, its [`Step::Io`] settles with `go == false`
    /// do, and its [`Step::Later`] steps count nothing unless they run (a dropped step must
    /// leave no trace). keygate's authentication, scope, address, deprecation and quota
    /// checks are speculative; its rate-limit check is not (what it counted stays counted,
    /// so it always waits for the checks before it), nor is the TLS check (it disables
    /// exposed keys). What a speculative check counted is also given back when the request
    /// goes no further (its future dropped while I/O was in flight): its note's `cancel`
    /// runs, and an `Io` settle dropped without being called must give back by itself.
    ///
    /// The price: while the earlier check's I/O runs, what this check counted is visible
    /// to other requests (a quota unit held by a request the rate limit then refuses may
    /// make a concurrent request at the quota's last unit see it used up: toward refusing,
    /// never toward serving more).
    fn speculative(&self) -> bool {
        false
    }

    /// Decides `req`, whose caller is `caller`. `Ok` lets the request through (with the
    /// note for its response, and any change the check made to the request); `Err` refuses
    /// it, rendered by the hub's [`Renderer`]. Must not panic, and must fail closed: a check
    /// that needs a principal and finds a denial returns that denial.
    fn check<B>(&self, req: &mut Request<B>, caller: Caller<'_>) -> Result<Self::Note, Denial>;

    /// Like [`Check::check`], but may defer the decision to an async step (a store round
    /// trip). The default decides now, through `check`.
    fn begin<B: Send + 'static>(
        &self,
        req: &mut Request<B>,
        caller: Caller<'_>,
    ) -> Step<B, Self::Note> {
        Step::Now(self.check(req, caller))
    }
}

/// The async step of a deferred decision: takes the request and yields it back with the
/// verdict.
pub type Deferred<B, N> = Box<
    dyn FnOnce(Request<B>) -> Pin<Box<dyn Future<Output = (Request<B>, Result<N, Denial>)> + Send>>
        + Send,
>;

/// The end of an I/O step ([`Step::Io`]), called once its I/O is done, with `go`:
/// - `true`: the checks before it let the request through: write what the check learned on
///   the request (extensions; a [speculative](Check::speculative) check after this one may
///   already have run, so write nothing a later check reads) and return its verdict;
/// - `false`: a check before it refused the request while this one's I/O ran (the check
///   was [speculative](Check::speculative)): give back what the I/O counted. The verdict
///   returned is then ignored.
pub type Settle<B, N> = Box<dyn FnOnce(&mut Request<B>, bool) -> Result<N, Denial> + Send>;

/// An I/O step that needs no request (a store round trip), then its [`Settle`]. Fused
/// checks run such steps concurrently when the later check is
/// [speculative](Check::speculative).
pub type Io<B, N> = Pin<Box<dyn Future<Output = Settle<B, N>> + Send>>;

/// A check's verdict: made now, or after an async step.
#[non_exhaustive]
pub enum Step<B, N> {
    /// Decided without I/O.
    Now(Result<N, Denial>),
    /// Decided by an async step (a store round trip) that takes the request.
    Later(Deferred<B, N>),
    /// Decided by I/O that needs no request, then settled on it: what store-backed checks
    /// return, so fused checks can overlap their round trips.
    Io(Io<B, N>),
}

/// The verdict of several fused checks: the notes of those that passed, and the denial of
/// the first that refused, if any. The notes are written on the response either way (on
/// the rejection too), as separate layers would.
#[doc(hidden)]
pub struct Outcome<N> {
    note: N,
    denial: Option<Denial>,
}

impl<N> Outcome<N> {
    fn of(result: Result<N, Denial>) -> Self
    where
        N: Default,
    {
        match result {
            Ok(note) => Outcome { note, denial: None },
            Err(d) => Outcome {
                note: N::default(),
                denial: Some(d),
            },
        }
    }
}

impl<N: ResponseNote> Outcome<N> {
    /// Gives back what the checks that passed counted (the request goes no further).
    fn cancel(self) {
        self.note.cancel();
    }
}

/// The async step of fused checks.
type FusedLater<B, N> = Box<
    dyn FnOnce(Request<B>) -> Pin<Box<dyn Future<Output = (Request<B>, Outcome<N>)> + Send>> + Send,
>;

/// The end of fused I/O steps: with `go`, the outcome; without, `None` once everything
/// counted is given back.
type FusedSettle<B, N> = Box<dyn FnOnce(&mut Request<B>, bool) -> Option<Outcome<N>> + Send>;

/// Fused I/O steps (run concurrently), then their settle.
type FusedIo<B, N> = Pin<Box<dyn Future<Output = FusedSettle<B, N>> + Send>>;

/// The fused verdict: now, after an async step, or after I/O that needs no request.
#[doc(hidden)]
pub enum Fused<B, N> {
    Now(Outcome<N>),
    Later(FusedLater<B, N>),
    /// `refuses`: a check already refused without I/O (the outcome is a refusal whatever
    /// the I/O answers), so no later check runs ahead.
    Io {
        io: FusedIo<B, N>,
        refuses: bool,
    },
}

/// Runs fused checks to their outcome (after their async steps, if any).
async fn run_to_end<B: Send + 'static, C: Checks>(
    checks: &C,
    mut req: Request<B>,
    caller: Caller<'_>,
) -> (Request<B>, Outcome<C::Note>) {
    match checks.run(&mut req, caller) {
        Fused::Now(o) => (req, o),
        Fused::Later(step) => step(req).await,
        Fused::Io { io, .. } => {
            let settle = io.await;
            let o = settled(settle(&mut req, true));
            (req, o)
        }
    }
}

/// The outcome a settle called with `go` returns. Never `None` (a settle answers whenever
/// it is told to go on); if it were, the request is refused rather than let through.
fn settled<N: Default>(o: Option<Outcome<N>>) -> Outcome<N> {
    o.unwrap_or_else(|| Outcome {
        note: N::default(),
        denial: Some(
            Denial::new(DenialCode::StoreUnavailable)
                .with_retry_after(std::time::Duration::from_secs(1)),
        ),
    })
}

mod sealed {
    pub trait Sealed {}
}

/// One check or several fused ([`One`], [`Then`]): what a [`Guarded`] service runs. Sealed;
/// implement [`Check`] instead.
pub trait Checks: sealed::Sealed + Clone + Send + Sync + 'static {
    /// The notes of the checks.
    type Note: ResponseNote + Default;

    #[doc(hidden)]
    fn needs_caller<B>(&self, req: &Request<B>) -> bool;

    #[doc(hidden)]
    fn speculative(&self) -> bool;

    #[doc(hidden)]
    fn run<B: Send + 'static>(
        &self,
        req: &mut Request<B>,
        caller: Caller<'_>,
    ) -> Fused<B, Self::Note>;
}

/// A single [`Check`] as [`Checks`].
#[derive(Clone, Debug)]
pub struct One<C>(pub C);

impl<C> sealed::Sealed for One<C> {}

impl<C: Check> Checks for One<C> {
    type Note = C::Note;

    fn needs_caller<B>(&self, req: &Request<B>) -> bool {
        self.0.needs_caller(req)
    }

    fn speculative(&self) -> bool {
        self.0.speculative()
    }

    fn run<B: Send + 'static>(
        &self,
        req: &mut Request<B>,
        caller: Caller<'_>,
    ) -> Fused<B, C::Note> {
        match self.0.begin(req, caller) {
            Step::Now(r) => Fused::Now(Outcome::of(r)),
            Step::Later(step) => Fused::Later(Box::new(move |req| {
                Box::pin(async move {
                    let (req, r) = step(req).await;
                    (req, Outcome::of(r))
                })
            })),
            Step::Io(io) => Fused::Io {
                io: Box::pin(async move {
                    let settle = io.await;
                    Box::new(move |req: &mut Request<B>, go: bool| {
                        let r = settle(req, go);
                        go.then(|| Outcome::of(r))
                    }) as FusedSettle<B, C::Note>
                }),
                refuses: false,
            },
        }
    }
}

/// Two fused checks: `A` decides first; `B` runs only when `A` lets the request through.
#[derive(Clone, Debug)]
pub struct Then<A, B>(pub A, pub B);

impl<A, B> sealed::Sealed for Then<A, B> {}

/// The notes of two fused checks; the inner one is written first, as nested layers would.
#[derive(Debug, Default)]
pub struct Both<A, B>(A, B);

impl<A: ResponseNote, B: ResponseNote> ResponseNote for Both<A, B> {
    /// Writes one `RateLimit-Policy` and one `RateLimit` value for all the checks (their
    /// members in the order separate layers would append them), then the rest of each note.
    fn apply<R>(mut self, res: &mut Response<R>) {
        let mut fields = RateLimitFields::default();
        self.take_ratelimit_fields(&mut fields);
        self.1.apply(res);
        self.0.apply(res);
        // Nested pairs find nothing left to write: only the outermost one writes.
        if !fields.is_empty() {
            fields.write(res);
        }
    }

    fn take_ratelimit_fields(&mut self, out: &mut RateLimitFields) {
        self.1.take_ratelimit_fields(out);
        self.0.take_ratelimit_fields(out);
    }

    fn cancel(self) {
        self.1.cancel();
        self.0.cancel();
    }
}

impl<X: Checks, Y: Checks> Checks for Then<X, Y> {
    type Note = Both<X::Note, Y::Note>;

    fn needs_caller<B>(&self, req: &Request<B>) -> bool {
        self.0.needs_caller(req) || self.1.needs_caller(req)
    }

    /// Only single checks run ahead: a fused pair's later step may hold what its first
    /// check counted, which a dropped step could not give back. (Stacks nest to the left,
    /// so the check added after a pair is always a single one.)
    fn speculative(&self) -> bool {
        false
    }

    fn run<B: Send + 'static>(
        &self,
        req: &mut Request<B>,
        caller: Caller<'_>,
    ) -> Fused<B, Self::Note> {
        match self.0.run(req, caller) {
            Fused::Now(a) => second(a, || self.1.run(req, caller)),
            Fused::Io { io, refuses: true } => Fused::Io {
                // Refused whatever the I/O answers: the second check does not run.
                io: Box::pin(async move {
                    let settle = io.await;
                    Box::new(move |req: &mut Request<B>, go: bool| {
                        settle(req, go).map(|a| Outcome {
                            note: Both(a.note, Y::Note::default()),
                            denial: a.denial,
                        })
                    }) as FusedSettle<B, Self::Note>
                }),
                refuses: true,
            },
            Fused::Io { io, .. } if self.1.speculative() => overlapped(io, self.1.run(req, caller)),
            Fused::Io { io, .. } => {
                // The second check waits for the first's verdict.
                let next = self.1.clone();
                let owned = caller.cloned().map_err(Denial::clone);
                Fused::Later(Box::new(move |mut req| {
                    Box::pin(async move {
                        let settle = io.await;
                        let a = settled(settle(&mut req, true));
                        then_after(a, &next, req, owned.as_ref()).await
                    })
                }))
            }
            Fused::Later(step) => {
                // Rare (a store round trip): the second check runs after the first's step,
                // with its own copy of the caller.
                let next = self.1.clone();
                let owned = caller.cloned().map_err(Denial::clone);
                Fused::Later(Box::new(move |req| {
                    Box::pin(async move {
                        let (req, a) = step(req).await;
                        then_after(a, &next, req, owned.as_ref()).await
                    })
                }))
            }
        }
    }
}

/// The second of two fused checks, run after the first decided `a`.
async fn then_after<B: Send + 'static, NA, Y: Checks>(
    a: Outcome<NA>,
    next: &Y,
    req: Request<B>,
    caller: Caller<'_>,
) -> (Request<B>, Outcome<Both<NA, Y::Note>>) {
    if a.denial.is_some() {
        return (
            req,
            Outcome {
                note: Both(a.note, Y::Note::default()),
                denial: a.denial,
            },
        );
    }
    let (req, b) = run_to_end(next, req, caller).await;
    (
        req,
        Outcome {
            note: Both(a.note, b.note),
            denial: b.denial,
        },
    )
}

/// The fused outcome of `a` then `b` where `a` passed or refused without I/O.
fn second<B: Send + 'static, NA: ResponseNote, NB: ResponseNote + Default>(
    a: Outcome<NA>,
    b: impl FnOnce() -> Fused<B, NB>,
) -> Fused<B, Both<NA, NB>> {
    if a.denial.is_some() {
        return Fused::Now(Outcome {
            note: Both(a.note, NB::default()),
            denial: a.denial,
        });
    }
    match b() {
        Fused::Now(b) => Fused::Now(Outcome {
            note: Both(a.note, b.note),
            denial: b.denial,
        }),
        Fused::Later(step) => Fused::Later(Box::new(move |req| {
            Box::pin(async move {
                let (req, b) = step(req).await;
                (
                    req,
                    Outcome {
                        note: Both(a.note, b.note),
                        denial: b.denial,
                    },
                )
            })
        })),
        Fused::Io { io, refuses } => {
            // Given back if the request goes no further (dropped while `b`'s I/O runs).
            let held = Held(Some(a));
            Fused::Io {
                io: Box::pin(async move {
                    let settle = io.await;
                    Box::new(move |req: &mut Request<B>, go: bool| {
                        let b = settle(req, go);
                        let a = held.into_inner()?;
                        match b {
                            Some(b) => Some(Outcome {
                                note: Both(a.note, b.note),
                                denial: b.denial,
                            }),
                            None => {
                                a.cancel();
                                None
                            }
                        }
                    }) as FusedSettle<B, Both<NA, NB>>
                }),
                refuses,
            }
        }
    }
}

/// `b` decided (or started) while `a`'s I/O is in flight ([`Check::speculative`]): the
/// fused outcome is `a`'s then `b`'s, as if run in order, and what `b` counted is given
/// back when `a` refuses.
fn overlapped<B: Send + 'static, NA: ResponseNote + Default, NB: ResponseNote + Default>(
    a: FusedIo<B, NA>,
    b: Fused<B, NB>,
) -> Fused<B, Both<NA, NB>> {
    match b {
        Fused::Now(b) => {
            let refuses = b.denial.is_some();
            // Given back if the request goes no further (dropped while `a`'s I/O runs).
            let held = Held(Some(b));
            Fused::Io {
                io: Box::pin(async move {
                    let settle_a = a.await;
                    Box::new(move |req: &mut Request<B>, go: bool| {
                        ordered(settle_a(req, go), |pass| {
                            let b = held.into_inner();
                            if pass {
                                b
                            } else {
                                if let Some(b) = b {
                                    b.cancel();
                                }
                                None
                            }
                        })
                    }) as FusedSettle<B, Both<NA, NB>>
                }),
                refuses,
            }
        }
        // Both round trips at once (on a multiplexed connection, one round trip).
        Fused::Io { io: b, refuses } => Fused::Io {
            io: Box::pin(async move {
                let (settle_a, settle_b) = futures_util::future::join(a, b).await;
                Box::new(move |req: &mut Request<B>, go: bool| {
                    let a = settle_a(req, go);
                    ordered(a, |pass| settle_b(req, pass))
                }) as FusedSettle<B, Both<NA, NB>>
            }),
            refuses,
        },
        // A speculative check's later step counts nothing until it runs: it runs only if
        // `a` lets the request through.
        Fused::Later(step) => Fused::Later(Box::new(move |mut req| {
            Box::pin(async move {
                let settle_a = a.await;
                let a = settled(settle_a(&mut req, true));
                if a.denial.is_some() {
                    return (
                        req,
                        Outcome {
                            note: Both(a.note, NB::default()),
                            denial: a.denial,
                        },
                    );
                }
                let (req, b) = step(req).await;
                (
                    req,
                    Outcome {
                        note: Both(a.note, b.note),
                        denial: b.denial,
                    },
                )
            })
        })),
    }
}

/// An outcome not handed on yet: what its checks counted is given back if it is dropped
/// first (the request went no further: its future was dropped, a client gone, while other
/// I/O of the stack was in flight).
struct Held<N: ResponseNote>(Option<Outcome<N>>);

impl<N: ResponseNote> Held<N> {
    fn into_inner(mut self) -> Option<Outcome<N>> {
        self.0.take()
    }
}

impl<N: ResponseNote> Drop for Held<N> {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            o.cancel();
        }
    }
}

/// Settles a speculative second check after the first's outcome `a` (`None`: the whole
/// was cancelled): `b(true)` when `a` passed, else `b(false)` (given back).
fn ordered<NA, NB: Default>(
    a: Option<Outcome<NA>>,
    b: impl FnOnce(bool) -> Option<Outcome<NB>>,
) -> Option<Outcome<Both<NA, NB>>> {
    match a {
        None => {
            b(false);
            None
        }
        Some(a) if a.denial.is_some() => {
            b(false);
            Some(Outcome {
                note: Both(a.note, NB::default()),
                denial: a.denial,
            })
        }
        Some(a) => {
            let b = settled(b(true));
            Some(Outcome {
                note: Both(a.note, b.note),
                denial: b.denial,
            })
        }
    }
}

/// How a layer learns who is calling.
#[derive(Clone)]
pub(crate) enum Resolver {
    /// Built from the hub: resolves the principal itself when no earlier layer has.
    Hub(KeyGate),
    /// Built without the hub: only reads what an earlier layer put in the request context;
    /// with nothing there it sees `missing_key` (and a check that needs a principal fails
    /// closed).
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

    #[cfg(any(feature = "ip-allow", feature = "rate-limit"))]
    pub(crate) fn gate(&self) -> Option<&KeyGate> {
        match self {
            Resolver::Hub(gate) => Some(gate),
            Resolver::Extensions(_) => None,
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

/// The tower layer of a [`Check`] (or of fused [`Checks`]): the one way keygate's layers
/// are built. Without [`with_gate`](CheckLayer::with_gate) it reads the caller an earlier
/// layer resolved; with it, it resolves the caller itself (once per request) and renders
/// with the hub's renderer.
#[derive(Clone, Debug)]
pub struct CheckLayer<C> {
    checks: C,
    resolver: Resolver,
}

impl<C: Check> CheckLayer<One<C>> {
    /// The layer of `check`, without the hub.
    pub fn new(check: C) -> Self {
        CheckLayer {
            checks: One(check),
            resolver: Resolver::standalone(),
        }
    }
}

impl<C> CheckLayer<C> {
    pub(crate) fn from_parts(checks: C, resolver: Resolver) -> Self {
        CheckLayer { checks, resolver }
    }

    /// Resolves the caller through `gate` when no earlier layer has, and renders denials
    /// with the gate's renderer.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        self.resolver = Resolver::Hub(gate.clone());
        self
    }

    /// Renders denials with `renderer` (for a layer built without the hub; with the hub,
    /// the hub's renderer is used).
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        if let Resolver::Extensions(_) = self.resolver {
            self.resolver = Resolver::Extensions(Arc::new(renderer));
        }
        self
    }

    /// The checks.
    pub fn checks(&self) -> &C {
        &self.checks
    }
}

impl<C: Clone, S> Layer<S> for CheckLayer<C> {
    type Service = Guarded<C, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            checks: self.checks.clone(),
            resolver: self.resolver.clone(),
        }
    }
}

/// The service of a [`CheckLayer`]: resolves the caller when the checks need it, runs them,
/// then calls the inner service or renders the denial. One response future, however many
/// checks are fused.
#[derive(Clone)]
pub struct Guarded<C, S> {
    inner: S,
    checks: C,
    resolver: Resolver,
}

impl<C, S> Guarded<C, S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The checks.
    pub fn checks(&self) -> &C {
        &self.checks
    }
}

impl<C, S> std::fmt::Debug for Guarded<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

impl<C, S, ReqB, ResB> Service<Request<ReqB>> for Guarded<C, S>
where
    C: Checks,
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, C::Note>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        call(&mut self.inner, &self.resolver, req, &self.checks)
    }
}

/// `missing_key`, the caller of a request no layer resolved.
fn missing() -> &'static Denial {
    static MISSING: std::sync::OnceLock<Denial> = std::sync::OnceLock::new();
    MISSING.get_or_init(|| Denial::new(DenialCode::MissingKey))
}

/// Resolves the caller (when the checks need it), runs the checks, then calls `inner` or
/// rejects.
///
/// The hot path (cached key, or an earlier layer's verdict) stays synchronous and
/// allocation-free; only a key-cache miss or a store-backed check boxes a future.
fn call<S, ReqB, ResB, C>(
    inner: &mut S,
    resolver: &Resolver,
    mut req: Request<ReqB>,
    checks: &C,
) -> ResponseFuture<S::Future, ResB, C::Note>
where
    C: Checks,
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    let known = match resolver {
        Resolver::Hub(gate) if checks.needs_caller(&req) => match gate.start(&mut req) {
            Start::Known(r) => r,
            Start::Pending(pending) => {
                // Drive the service that was polled ready; leave a fresh clone behind.
                let clone = inner.clone();
                let mut ready = std::mem::replace(inner, clone);
                let gate = gate.clone();
                let checks = checks.clone();
                return ResponseFuture::resolving(Box::pin(async move {
                    let result = gate.finish(pending, &mut req).await;
                    let (req, outcome) = run_to_end(&checks, req, result.as_ref()).await;
                    settle(&mut ready, req, outcome, gate.renderer())
                }));
            }
        },
        _ => match RequestContext::of(req.extensions()).and_then(RequestContext::resolution) {
            Some(r) => r.cloned().map_err(Denial::clone),
            None => Err(missing().clone()),
        },
    };
    match checks.run(&mut req, known.as_ref()) {
        Fused::Now(Outcome { note, denial: None }) => {
            crate::timing::mark();
            ResponseFuture::inner(inner.call(req), note)
        }
        Fused::Now(Outcome {
            note,
            denial: Some(denial),
        }) => {
            let mut res = rejection(resolver.renderer(), denial, &req);
            note.apply(&mut res);
            ResponseFuture::rejected(res)
        }
        Fused::Later(step) => {
            // Drive the service that was polled ready; leave a fresh clone behind.
            let clone = inner.clone();
            let mut ready = std::mem::replace(inner, clone);
            let resolver = resolver.clone();
            ResponseFuture::resolving(Box::pin(async move {
                let (req, outcome) = step(req).await;
                settle(&mut ready, req, outcome, resolver.renderer())
            }))
        }
        Fused::Io { io, .. } => {
            let clone = inner.clone();
            let mut ready = std::mem::replace(inner, clone);
            let resolver = resolver.clone();
            ResponseFuture::resolving(Box::pin(async move {
                let finish = io.await;
                let outcome = settled(finish(&mut req, true));
                settle(&mut ready, req, outcome, resolver.renderer())
            }))
        }
    }
}

/// The end of an async path: calls the inner service, or renders the rejection (with the
/// notes of the checks that passed).
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn settle<S, ReqB, ResB, N: ResponseNote>(
    ready: &mut S,
    req: Request<ReqB>,
    outcome: Outcome<N>,
    renderer: &dyn Renderer,
) -> Result<(S::Future, N), Response<ResponseBody<ResB>>>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    match outcome.denial {
        None => {
            crate::timing::mark();
            Ok((ready.call(req), outcome.note))
        }
        Some(denial) => {
            let mut res = rejection(renderer, denial, &req);
            outcome.note.apply(&mut res);
            Err(res)
        }
    }
}

/// No check: the start of a fused [`Stack`](crate::stack::Stack). Lets every request
/// through without needing its caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Empty;

impl sealed::Sealed for Empty {}

impl Checks for Empty {
    type Note = ();

    fn needs_caller<B>(&self, _req: &Request<B>) -> bool {
        false
    }

    fn speculative(&self) -> bool {
        true
    }

    fn run<B: Send + 'static>(&self, _req: &mut Request<B>, _caller: Caller<'_>) -> Fused<B, ()> {
        Fused::Now(Outcome {
            note: (),
            denial: None,
        })
    }
}
