use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{Entry, HeaderValue};
use http::{Method, Request, Response};
use tower_service::Service;

use super::future::{Capture, ResponseFuture};
use super::layer::{AuditLayer, Config};
use crate::core::audit::Transport;
use crate::core::audit::{contains_key_like, mask_keys_in, Auditor, Text};
use crate::gate::Start;
use crate::reject::transport_of;
use crate::RequestContext;

/// Longest path recorded, in bytes; longer paths are cut (on a character boundary).
const MAX_PATH: usize = 2048;
/// Longest client request id reused.
const MAX_REQUEST_ID: usize = 128;

/// Middleware that records one audit event per request. See [`AuditLayer`].
#[derive(Clone, Debug)]
pub struct Audit<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<Config>,
}

impl<S> Audit<S> {
    /// The layer recording through `auditor` (see [`AuditLayer::new`]).
    pub fn layer(auditor: Auditor) -> AuditLayer {
        AuditLayer::new(auditor)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The auditor.
    pub fn auditor(&self) -> &Auditor {
        &self.config.auditor
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Audit<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let start = Instant::now();
        let config = &*self.config;
        let time = config.clock.now();

        // One lookup of the request id header: reuse the client's, or set a generated one
        // (replacing every value the client sent).
        let (request_id, id_text) = match req.headers_mut().entry(&config.header) {
            Entry::Occupied(o) if config.trust_incoming && acceptable_id(o.get()) => {
                let v = o.get().clone();
                let text = text_of(crate::chunk::copy(v.as_bytes()));
                (v, text)
            }
            Entry::Occupied(mut o) => {
                let (v, text) = generate_id();
                o.insert(v.clone());
                (v, text)
            }
            Entry::Vacant(v) => {
                let (id, text) = generate_id();
                v.insert(id.clone());
                (id, text)
            }
        };
        RequestContext::of_mut(req.extensions_mut()).set_request_id(request_id.clone());

        let client_ip = match &config.gate {
            Some(gate) => gate.client_ip(&mut req),
            None => crate::client_ip::settled(&req, config.proxies.as_ref()),
        };
        let grpc = transport_of(&req) == Transport::Grpc;
        let mut capture = Capture {
            start,
            time,
            request_id,
            id_text,
            method: method(req.method()),
            path: path(req.uri().path()),
            grpc,
            client_ip,
            principal: None,
            called_at: None,
            inner_at: None,
            span: tracing::Span::none(),
        };
        // The method and path as recorded: a key-shaped part is masked there too.
        capture.span = super::future::request_span(&capture.method, &capture.path, client_ip);

        match &config.gate {
            Some(gate) => match gate.start(&mut req) {
                Start::Known(r) => capture.principal = r.ok(),
                Start::Pending(pending) => {
                    // Drive the service that was polled ready; leave a fresh clone behind.
                    let clone = self.inner.clone();
                    let mut ready = std::mem::replace(&mut self.inner, clone);
                    let gate = gate.clone();
                    let fut = Box::pin(async move {
                        let result = gate.finish(pending, &mut req).await;
                        (ready.call(req), result.ok())
                    });
                    return ResponseFuture::resolving(fut, capture, self.config.clone());
                }
            },
            None => {
                capture.principal = RequestContext::of(req.extensions())
                    .and_then(RequestContext::principal)
                    .cloned();
            }
        }
        capture.called_at = Some(Instant::now());
        crate::timing::arm();
        let fut = {
            let _entered = capture.span.enter();
            self.inner.call(req)
        };
        capture.inner_at = crate::timing::take();
        ResponseFuture::inner(fut, capture, self.config.clone())
    }
}

/// A client request id is reused when it is 1 to 128 visible ASCII characters and holds
/// nothing shaped like an API key anywhere (a client sending its key as, or inside, a
/// request id must not get it logged).
fn acceptable_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID
        && b.iter().all(|c| (0x21..=0x7e).contains(c))
        && !contains_key_like(b)
}

/// The method as text; the standard ones without allocating.
fn method(m: &Method) -> Cow<'static, str> {
    let s: &'static str = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => {
            let mut s = m.as_str().to_owned();
            mask_keys_in(&mut s);
            return Cow::Owned(s);
        }
    };
    Cow::Borrowed(s)
}

/// `b` as text (ASCII as a rule, checked cheaply first; empty if not UTF-8).
fn text_of(b: bytes::Bytes) -> Text {
    Text::from_ascii(b)
        .or_else(Text::from_utf8)
        .unwrap_or_default()
}

/// The path as recorded: cut to `MAX_PATH` bytes, anything shaped like a key masked. Cut
/// from the per-thread buffer of [`chunk`](crate::chunk) when there is nothing to mask.
fn path(p: &str) -> Text {
    let mut end = p.len().min(MAX_PATH);
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    let p = &p[..end];
    if !contains_key_like(p.as_bytes()) {
        return text_of(crate::chunk::copy(p.as_bytes()));
    }
    let mut out = p.to_owned();
    mask_keys_in(&mut out);
    Text::from(out)
}

/// A new 128-bit request id, 32 lower-case hex characters: a random per-process half and a
/// bijective mix of a per-process counter, so ids never repeat within a process and collide
/// across processes only with negligible probability. No system call per request. Answers
/// the id as a header value and as text, sharing their bytes.
pub(crate) fn generate_id() -> (HeaderValue, Text) {
    // The random high half of every id, and the salt of the low half, drawn once per
    // process; the high half is kept as its hex digits, written once.
    static SEED: OnceLock<([u8; 16], u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (high, salt) = SEED.get_or_init(|| {
        let mut b = [0u8; 16];
        if getrandom::fill(&mut b).is_err() {
            // No OS randomness: fall back to time and process id (still unique per process).
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            b[..8].copy_from_slice(&t.to_le_bytes());
            b[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
        }
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&b[..8]);
        lo.copy_from_slice(&b[8..]);
        let mut high = [0u8; 16];
        write_hex(&mut high, u64::from_le_bytes(hi));
        (high, u64::from_le_bytes(lo))
    });
    // Each thread takes a block of counter values at a time, so threads serving requests
    // side by side do not contend for one atomic's cache line on every request.
    const BLOCK: u64 = 1024;
    thread_local! {
        static NEXT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    let n = NEXT.with(|next| {
        let (mut at, mut end) = next.get();
        if at == end {
            at = COUNTER.fetch_add(BLOCK, Ordering::Relaxed);
            end = at.wrapping_add(BLOCK);
        }
        next.set((at.wrapping_add(1), end));
        at
    });
    let low = mix(n.wrapping_add(*salt));
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(high);
    write_hex(&mut out[16..], low);
    // Cut from the per-thread buffer: one allocation per ~30 ids.
    let bytes = crate::chunk::copy(&out);
    match HeaderValue::from_maybe_shared(bytes.clone()) {
        Ok(v) => (v, text_of(bytes)),
        // Unreachable: hex digits are a valid header value.
        Err(_) => (HeaderValue::from_static("0"), Text::from("0")),
    }
}

/// The splitmix64 finalizer: a bijection on `u64`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes `v` as 16 lower-case hex digits, most significant first, into `out[..16]`.
fn write_hex(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_hex() {
        let (a, text) = generate_id();
        let (b, _) = generate_id();
        assert_ne!(a, b);
        // Across threads (each takes its own block of the counter) and across a block's end.
        let mut seen: std::collections::HashSet<HeaderValue> =
            (0..3_000).map(|_| generate_id().0).collect();
        let other: Vec<HeaderValue> =
            std::thread::spawn(|| (0..3_000).map(|_| generate_id().0).collect())
                .join()
                .unwrap();
        for id in other {
            assert!(seen.insert(id), "an id repeated across threads");
        }
        assert_eq!(seen.len(), 6_000);
        assert_eq!(text, a.to_str().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert!(acceptable_id(&a));
    }

    #[test]
    fn hex_is_most_significant_first() {
        let mut out = [0u8; 16];
        write_hex(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
        write_hex(&mut out, u64::MAX);
        assert_eq!(&out, b"ffffffffffffffff");
    }

    #[test]
    fn request_id_acceptance() {
        assert!(acceptable_id(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable_id(&HeaderValue::from_static("")));
        assert!(!acceptable_id(&HeaderValue::from_static("has space")));
        assert!(!acceptable_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        assert!(!acceptable_id(
            &HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()
        ));
        // A key sent as a request id is not reused (it would end up in the log).
        let key = crate::ApiKey::generate(&crate::Prefix::new("sk_live").unwrap()).unwrap();
        assert!(!acceptable_id(
            &HeaderValue::from_str(key.expose_secret()).unwrap()
        ));
        assert!(acceptable_id(&HeaderValue::from_static(
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
        )));
        // Nor one that holds a key anywhere.
        for id in [
            format!("req-{}", key.expose_secret()),
            format!("{}.1", key.expose_secret()),
        ] {
            assert!(!acceptable_id(&HeaderValue::from_str(&id).unwrap()), "{id}");
        }
    }

    #[test]
    fn keys_in_paths_and_methods_are_masked() {
        let key = crate::ApiKey::generate(&crate::Prefix::default()).unwrap();
        let k = key.expose_secret();
        let p = path(&format!("/collections/{k}/points"));
        assert!(!p.contains(&k[k.len() - 40..]), "{p}");
        assert!(
            p.starts_with("/collections/") && p.ends_with("/points"),
            "{p}"
        );
        let m = Method::from_bytes(format!("X{k}").as_bytes()).unwrap();
        assert!(!method(&m).contains(&k[k.len() - 40..]));
        assert_eq!(method(&Method::GET), "GET");
    }

    #[test]
    fn long_paths_are_cut() {
        assert_eq!(path(&"a".repeat(5000)).len(), MAX_PATH);
        assert_eq!(path("/x"), "/x");
    }
}
