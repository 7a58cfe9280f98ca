//! The response future shared by keygate's layers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::reject::ResponseBody;

/// Something a layer learned while deciding (rate-limit counters, for instance) and writes
/// onto the inner service's response. Implemented by keygate's layers; `()` writes nothing.
pub trait ResponseNote: Send + 'static {
    /// Writes the note onto the response (headers, extensions).
    fn apply<B>(self, res: &mut Response<B>);

    /// Hands over the note's `RateLimit-Policy` and `RateLimit` field values, innermost
    /// check first, so fused checks write one value of each field (the list members joined,
    /// as RFC 9110 section 5.3 makes equivalent to one field line per check). A note that
    /// writes no such fields keeps the default.
    #[doc(hidden)]
    fn take_ratelimit_fields(&mut self, out: &mut RateLimitFields) {
        let _ = out;
    }

    /// Gives back what the check counted for the request, which goes no further: an
    /// earlier fused check refused it while this one ran ahead
    /// ([`Check::speculative`](crate::check::Check::speculative)). The note is not written
    /// on any response. The default gives back nothing.
    fn cancel(self)
    where
        Self: Sized,
    {
    }
}

/// The `RateLimit-Policy` and `RateLimit` values of fused checks, joined as they are
/// handed over ([`ResponseNote::take_ratelimit_fields`]).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct RateLimitFields {
    joined: Option<(HeaderValue, HeaderValue)>,
    /// Values that could not be joined (never expected), appended on their own.
    apart: Vec<(HeaderValue, HeaderValue)>,
}

impl RateLimitFields {
    /// Adds one check's values after those already handed over.
    pub fn push(&mut self, policy: HeaderValue, limit: HeaderValue) {
        match self.joined.take() {
            None => self.joined = Some((policy, limit)),
            Some((p, l)) => match (join(&p, &policy), join(&l, &limit)) {
                (Some(jp), Some(jl)) => self.joined = Some((jp, jl)),
                _ => {
                    self.joined = Some((p, l));
                    self.apart.push((policy, limit));
                }
            },
        }
    }

    /// Whether no check handed over any value.
    pub fn is_empty(&self) -> bool {
        self.joined.is_none()
    }

    /// Appends the values to `res`.
    pub fn write<B>(self, res: &mut Response<B>) {
        let h = res.headers_mut();
        for (policy, limit) in self.joined.into_iter().chain(self.apart) {
            h.append(&crate::reject::RATELIMIT_POLICY, policy);
            h.append(&crate::reject::RATELIMIT, limit);
        }
    }
}

/// `a, b`: the member lists of one structured field joined into one value.
fn join(a: &HeaderValue, b: &HeaderValue) -> Option<HeaderValue> {
    let bytes = crate::chunk::concat(&[a.as_bytes(), b", ", b.as_bytes()]);
    HeaderValue::from_maybe_shared(bytes).ok()
}

impl ResponseNote for () {
    fn apply<B>(self, _: &mut Response<B>) {}
}

/// The boxed step of a cache miss: reads the store, then either calls the inner service
/// (yielding its future and the note) or yields the rejection.
pub(crate) type Resolving<F, B, N> =
    Pin<Box<dyn Future<Output = Result<(F, N), Response<ResponseBody<B>>>> + Send + 'static>>;

pin_project! {
    /// Response future of keygate's layers: the inner service's future, a rejection, or (on a
    /// key-cache miss) the store lookup followed by one of those.
    pub struct ResponseFuture<F, B, N = ()> {
        #[pin]
        state: State<F, B, N>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, N> {
        Inner { #[pin] fut: F, note: Option<N> },
        Resolving { fut: Resolving<F, B, N> },
        Rejected { response: Option<Response<ResponseBody<B>>> },
    }
}

// The audit layer has a future of its own; with only `audit` these go unused.
#[cfg_attr(
    not(any(
        feature = "auth",
        feature = "scope",
        feature = "ip-allow",
        feature = "rate-limit",
        feature = "quota"
    )),
    allow(dead_code)
)]
impl<F, B, N> ResponseFuture<F, B, N> {
    pub(crate) fn inner(fut: F, note: N) -> Self {
        ResponseFuture {
            state: State::Inner {
                fut,
                note: Some(note),
            },
        }
    }
    pub(crate) fn resolving(fut: Resolving<F, B, N>) -> Self {
        ResponseFuture {
            state: State::Resolving { fut },
        }
    }
    pub(crate) fn rejected(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E, N> Future for ResponseFuture<F, B, N>
where
    F: Future<Output = Result<Response<B>, E>>,
    N: ResponseNote,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { fut, note } => {
                    let mut res = ready!(fut.poll(cx))?;
                    if let Some(note) = note.take() {
                        note.apply(&mut res);
                    }
                    return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                }
                StateProj::Resolving { fut } => match ready!(fut.as_mut().poll(cx)) {
                    Ok((inner, note)) => this.state.set(State::Inner {
                        fut: inner,
                        note: Some(note),
                    }),
                    Err(rejection) => return Poll::Ready(Ok(rejection)),
                },
                StateProj::Rejected { response } => {
                    let res = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(res));
                }
            }
        }
    }
}

impl<F, B, N> fmt::Debug for ResponseFuture<F, B, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Inner { .. } => "Inner",
            State::Resolving { .. } => "Resolving",
            State::Rejected { .. } => "Rejected",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}
