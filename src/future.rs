//! The response future shared by keygate's layers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
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

/// One check's `RateLimit-Policy` and `RateLimit` values. The policy is a header value
/// (often one precomputed); the limit, rendered per request, is kept as the bytes cut from
/// the per-thread buffer ([`chunk`](crate::chunk)) and checked as a header value once, when
/// written: alone by the note's own layer, or joined with the values of fused checks.
#[doc(hidden)]
#[derive(Clone)]
pub struct FieldValues {
    policy: HeaderValue,
    limit: Bytes,
}

// The limit bytes are only ever rendered by keygate's field writers, so without the
// rate-limit and quota features nothing builds these.
#[cfg_attr(not(any(feature = "rate-limit", feature = "quota")), allow(dead_code))]
impl FieldValues {
    pub(crate) fn new(policy: HeaderValue, limit: Bytes) -> Self {
        FieldValues { policy, limit }
    }

    /// Appends the two values to `res` (nothing when the limit is not a valid header value,
    /// as when its rendering failed).
    pub(crate) fn write<B>(self, res: &mut Response<B>) {
        if let Ok(limit) = HeaderValue::from_maybe_shared(self.limit) {
            let h = res.headers_mut();
            h.append(&crate::reject::RATELIMIT_POLICY, self.policy);
            h.append(&crate::reject::RATELIMIT, limit);
        }
    }
}

impl fmt::Debug for FieldValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = HeaderValue::from_maybe_shared(self.limit.clone());
        f.debug_tuple("")
            .field(&self.policy)
            .field(&limit.as_ref().map_err(|_| &self.limit))
            .finish()
    }
}

/// The `RateLimit-Policy` and `RateLimit` values of fused checks, collected as they are
/// handed over ([`ResponseNote::take_ratelimit_fields`]) and joined once when written.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct RateLimitFields {
    // Inline for the usual rate limit and quota; more checks spill into `more`.
    first: Option<FieldValues>,
    second: Option<FieldValues>,
    more: Vec<FieldValues>,
}

impl RateLimitFields {
    /// Adds one check's values after those already handed over.
    pub fn push(&mut self, values: FieldValues) {
        if self.first.is_none() {
            self.first = Some(values);
        } else if self.second.is_none() {
            self.second = Some(values);
        } else {
            self.more.push(values);
        }
    }

    /// Whether no check handed over any value.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &FieldValues> + Clone {
        self.first.iter().chain(&self.second).chain(&self.more)
    }

    /// Appends the values to `res`: one `RateLimit-Policy` and one `RateLimit` line, each
    /// the checks' member lists joined (`a, b`) in the order they were handed over. A check
    /// whose limit is not a valid header value (never expected) is left out, as its own
    /// layer would write nothing.
    pub fn write<B>(self, res: &mut Response<B>) {
        if self.second.is_none() {
            if let Some(only) = self.first {
                only.write(res);
            }
            return;
        }
        if let Some((policy, limit)) = join_all(self.iter()) {
            append(res, policy, limit);
            return;
        }
        // Some limit is not a header value: join only those that are.
        let mut valid: Vec<FieldValues> = self
            .first
            .into_iter()
            .chain(self.second)
            .chain(self.more)
            .filter(|v| HeaderValue::from_maybe_shared(v.limit.clone()).is_ok())
            .collect();
        if valid.len() == 1 {
            if let Some(only) = valid.pop() {
                only.write(res);
            }
        } else if let Some((policy, limit)) = join_all(valid.iter()) {
            append(res, policy, limit);
        }
    }
}

fn append<B>(res: &mut Response<B>, policy: HeaderValue, limit: HeaderValue) {
    let h = res.headers_mut();
    h.append(&crate::reject::RATELIMIT_POLICY, policy);
    h.append(&crate::reject::RATELIMIT, limit);
}

/// `a, b, ...`: the member lists of each field joined into one value (`None` when there
/// is nothing to join or a joined value is not a valid header value).
fn join_all<'a>(
    parts: impl Iterator<Item = &'a FieldValues> + Clone,
) -> Option<(HeaderValue, HeaderValue)> {
    match (
        parts.clone().next(),
        parts.clone().nth(1),
        parts.clone().nth(2),
    ) {
        (None, _, _) => None,
        // The usual two checks: no allocation.
        (Some(a), Some(b), None) => join_pairs(&[a.pair(), b.pair()]),
        _ => join_pairs(&parts.map(FieldValues::pair).collect::<Vec<_>>()),
    }
}

impl FieldValues {
    fn pair(&self) -> (&[u8], &[u8]) {
        (self.policy.as_bytes(), &self.limit)
    }
}

thread_local! {
    /// The last joined `RateLimit-Policy` value made on this thread. The policies of a
    /// stack are the same request after request (configured, or cached per key), so their
    /// join is reused while its bytes are those the parts make.
    static LAST_POLICY: std::cell::RefCell<Option<HeaderValue>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether `joined` is exactly the `parts` joined with `, `.
fn is_join_of(joined: &[u8], parts: &[(&[u8], &[u8])]) -> bool {
    let mut rest = joined;
    for (i, (p, _)) in parts.iter().enumerate() {
        if i > 0 {
            match rest.strip_prefix(b", ") {
                Some(r) => rest = r,
                None => return false,
            }
        }
        match rest.strip_prefix(*p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn join_pairs(parts: &[(&[u8], &[u8])]) -> Option<(HeaderValue, HeaderValue)> {
    let cached = LAST_POLICY.with(|last| {
        last.borrow()
            .as_ref()
            .filter(|v| is_join_of(v.as_bytes(), parts))
            .cloned()
    });
    if let Some(policy) = cached {
        let limit = crate::chunk::join(parts.iter().map(|p| p.1));
        return Some((policy, HeaderValue::from_maybe_shared(limit).ok()?));
    }
    let (policy, limit) = crate::chunk::join_pairs(parts.iter().copied());
    let policy = HeaderValue::from_maybe_shared(policy).ok()?;
    let limit = HeaderValue::from_maybe_shared(limit).ok()?;
    LAST_POLICY.with(|last| *last.borrow_mut() = Some(policy.clone()));
    Some((policy, limit))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(parts: &[(&str, &str)]) -> (String, String) {
        let parts: Vec<(&[u8], &[u8])> = parts
            .iter()
            .map(|(p, l)| (p.as_bytes(), l.as_bytes()))
            .collect();
        let (p, l) = join_pairs(&parts).unwrap();
        (p.to_str().unwrap().into(), l.to_str().unwrap().into())
    }

    #[test]
    fn joins_are_exact_whether_or_not_the_policy_is_reused() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        // A miss, then hits (the same policies, other limits).
        assert_eq!(joined(&[("a", "1"), ("b", "2")]), s("a, b", "1, 2"));
        assert_eq!(joined(&[("a", "3"), ("b", "4")]), s("a, b", "3, 4"));
        // Other splits of the same bytes join to the same value.
        assert_eq!(joined(&[("a, b", "5")]), s("a, b", "5"));
        assert_eq!(
            joined(&[("a", "6"), ("", "7"), ("b", "8")]),
            s("a, , b", "6, 7, 8")
        );
        assert_eq!(joined(&[("a", "6"), ("b", "7")]), s("a, b", "6, 7"));
        // Prefixes and extensions of the last value are not it.
        assert_eq!(joined(&[("a", "1")]), s("a", "1"));
        assert_eq!(
            joined(&[("a", "1"), ("b", "2"), ("c", "3")]),
            s("a, b, c", "1, 2, 3")
        );
        assert_eq!(joined(&[("a", "1"), ("b", "2")]), s("a, b", "1, 2"));
        assert_eq!(joined(&[("a", "1"), ("bc", "2")]), s("a, bc", "1, 2"));
        // A limit that is no header value: no join.
        assert!(join_pairs(&[(b"a", b"1"), (b"b", b"\n")]).is_none());
        assert!(is_join_of(b"x, y", &[(b"x", b""), (b"y", b"")]));
        assert!(!is_join_of(b"x, y", &[(b"x", b"")]));
        assert!(!is_join_of(b"x,y", &[(b"x", b""), (b"y", b"")]));
    }

    #[test]
    fn fused_fields_write_one_line_each() {
        let v = |p: &'static str, l: &'static str| {
            FieldValues::new(
                HeaderValue::from_static(p),
                Bytes::from_static(l.as_bytes()),
            )
        };
        let lines = |f: RateLimitFields| {
            let mut res = Response::new(());
            f.write(&mut res);
            let h = res.headers();
            let all = |n: &http::HeaderName| -> Vec<String> {
                h.get_all(n)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect()
            };
            (
                all(&crate::reject::RATELIMIT_POLICY),
                all(&crate::reject::RATELIMIT),
            )
        };
        let mut f = RateLimitFields::default();
        f.push(v("p1", "l1"));
        assert_eq!(lines(f), (vec!["p1".into()], vec!["l1".into()]));
        let mut f = RateLimitFields::default();
        for i in 1..=3 {
            f.push(v(["p1", "p2", "p3"][i - 1], ["l1", "l2", "l3"][i - 1]));
        }
        assert_eq!(
            lines(f),
            (vec!["p1, p2, p3".into()], vec!["l1, l2, l3".into()])
        );
        // A limit that is no header value is left out, as its layer alone writes nothing.
        let mut f = RateLimitFields::default();
        f.push(v("p1", "l1"));
        f.push(v("p2", "bad\n"));
        f.push(v("p3", "l3"));
        assert_eq!(lines(f), (vec!["p1, p3".into()], vec!["l1, l3".into()]));
        let mut f = RateLimitFields::default();
        f.push(v("p1", "bad\n"));
        f.push(v("p2", "l2"));
        assert_eq!(lines(f), (vec!["p2".into()], vec!["l2".into()]));
        let mut f = RateLimitFields::default();
        f.push(v("p1", "bad\n"));
        assert_eq!(lines(f), (vec![], vec![]));
    }
}
