//! Shared test support for keygate's integration tests.
//!
//! - [`CountingStore`]: a [`MemoryStore`] that counts `get` calls and can simulate an outage.
//! - [`Fixture`]: a hub over a counting store and a [`ManualClock`], with key issuing helpers.
//! - [`forge`] / [`wrong_secret`]: well-formed keys (valid checksum) that were never issued.
//! - [`Capture`]: a tracing subscriber writing into a buffer, for leakage checks.
//! - [`Row`] / [`matrix`]: the bad-input matrix of the authentication layer, shared by every framework.
//! - Loopback servers and clients: [`spawn_axum`], [`spawn_hyper`], [`send`], [`send_raw`].
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use keygate::{
    ApiKey, DenialCode, KeyGate, KeyGateBuilder, KeyRecord, KeyStatus, KeyStore, ManualClock,
    Prefix, Verifier, VerifierBuilder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// Each test binary uses some of these.
use keygate_testkit::http::CountingService;
#[allow(unused_imports)]
pub use keygate_testkit::serve::{spawn_axum, spawn_hyper};
pub use keygate_testkit::store::CountingStore;

/// Headers carrying `key` in `x-api-key`.
pub fn with_key(key: &ApiKey) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", key.expose_secret().parse().unwrap());
    h
}

// ---------------------------------------------------------------------------------------
// Fixture: hub, manual clock, key issuing
// ---------------------------------------------------------------------------------------

/// A hub over a [`CountingStore`] whose verifier reads a [`ManualClock`].
#[derive(Clone)]
pub struct Fixture {
    pub store: CountingStore,
    pub clock: ManualClock,
    pub gate: KeyGate,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    /// Default verifier settings, default credentials and renderer.
    pub fn new() -> Self {
        Self::with(|v| v, |g| g)
    }

    /// Customizes the verifier (the store and clock are already set) and the hub.
    pub fn with(
        verifier: impl FnOnce(VerifierBuilder) -> VerifierBuilder,
        gate: impl FnOnce(KeyGateBuilder) -> KeyGateBuilder,
    ) -> Self {
        let store = CountingStore::new();
        let clock = ManualClock::at_2026();
        let v = verifier(Verifier::builder(store.clone()).clock(clock.clone())).build();
        let gate = gate(KeyGate::builder(v)).build();
        Fixture { store, clock, gate }
    }

    /// Issues an active `kg` key named `name` (stored without touching the `get` counter).
    pub async fn issue(&self, name: &str) -> ApiKey {
        self.issue_with(name, |_| {}).await
    }

    /// Issues a `kg` key named `name`, letting `edit` change its record before it is stored.
    pub async fn issue_with(&self, name: &str, edit: impl FnOnce(&mut KeyRecord)) -> ApiKey {
        let (key, mut record) = KeyRecord::generate(
            &Prefix::default(),
            self.gate.verifier().hasher(),
            name,
            self.gate.clock().now(),
        )
        .expect("OS random number generator");
        edit(&mut record);
        self.store
            .memory()
            .insert(&record)
            .await
            .expect("fresh key id");
        key
    }
}

// ---------------------------------------------------------------------------------------
// Forged keys
// ---------------------------------------------------------------------------------------

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// CRC-32 (IEEE), bit by bit: the checksum of the key format.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// A well-formed key (correct checksum) made of these parts.
pub fn forge(prefix: &str, id: &str, secret: &str) -> String {
    let mut text = format!("{prefix}_{id}{secret}");
    let mut n = crc32(text.as_bytes());
    let mut sum = [b'0'; 6];
    for slot in sum.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    text.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
    text
}

/// The secret part of `key` (22 characters).
pub fn secret_of(key: &ApiKey) -> &str {
    key.parsed().secret()
}

/// `key`'s id and prefix with another secret, and a valid checksum: parses, reaches the
/// digest check, fails it.
pub fn wrong_secret(key: &ApiKey) -> String {
    let prefix = key.prefix().as_str();
    let id = key.id();
    let secret = secret_of(key);
    assert_eq!(
        forge(prefix, id.as_str(), secret),
        key.expose_secret(),
        "the test's checksum must match the key format's"
    );
    let mut other: Vec<u8> = secret.bytes().collect();
    other[0] = if other[0] == b'A' { b'B' } else { b'A' };
    let other = String::from_utf8(other).expect("ASCII");
    forge(prefix, id.as_str(), &other)
}

/// `key` with its last checksum character changed.
pub fn bad_checksum(key: &ApiKey) -> String {
    let mut text: Vec<u8> = key.expose_secret().bytes().collect();
    let last = text.len() - 1;
    text[last] = if text[last] == b'z' { b'y' } else { b'z' };
    String::from_utf8(text).expect("ASCII")
}

// ---------------------------------------------------------------------------------------
// Tracing capture
// ---------------------------------------------------------------------------------------

/// A buffer that a `tracing_subscriber::fmt` subscriber writes into.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

/// The writer of [`Capture`].
pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(self.0.clone())
    }
}

impl Capture {
    /// A new, empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a TRACE-level subscriber writing into this buffer as the thread's default,
    /// until the guard drops.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// ---------------------------------------------------------------------------------------
// The bad-input matrix
// ---------------------------------------------------------------------------------------

/// What a row must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The inner service is called once and answers 200.
    Allowed,
    /// 401 (gRPC 16) with `public` shown to the client and `exact` in the `Denial`.
    Denied {
        public: DenialCode,
        exact: DenialCode,
    },
}

impl Expect {
    fn denied(code: DenialCode) -> Self {
        Expect::Denied {
            public: code,
            exact: code,
        }
    }
}

/// One request of the matrix: header lines (raw bytes) and the expected outcome.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: &'static str,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    pub expect: Expect,
}

impl Row {
    fn new(name: &'static str, headers: &[(&'static str, &[u8])], expect: Expect) -> Self {
        Row {
            name,
            headers: headers.iter().map(|(n, v)| (*n, v.to_vec())).collect(),
            expect,
        }
    }

    /// Whether every header value is visible ASCII (or space/tab), i.e. what gRPC ASCII
    /// metadata can carry.
    pub fn is_ascii(&self) -> bool {
        self.headers
            .iter()
            .all(|(_, v)| v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t'))
    }

    /// The row's headers as a header map.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_bytes(value).expect("a header value http accepts"),
            );
        }
        map
    }

    /// An in-process request with the row's headers (and `extra` ones).
    pub fn request<B>(&self, extra: &[(&'static str, &'static str)], body: B) -> Request<B> {
        let mut req = Request::get("/").body(body).expect("request");
        *req.headers_mut() = self.header_map();
        for (n, v) in extra {
            req.headers_mut()
                .append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        req
    }
}

/// The keys the matrix uses, each in the state its name says.
pub struct MatrixKeys {
    pub valid: ApiKey,
    pub other_valid: ApiKey,
    pub unknown: ApiKey,
    pub wrong_secret: String,
    pub revoked: ApiKey,
    pub disabled: ApiKey,
    pub expired: ApiKey,
    pub wrong_prefix: ApiKey,
    pub bad_checksum: String,
}

impl MatrixKeys {
    /// Every plaintext credential the matrix sends (for leakage checks): the whole keys and
    /// their secret parts.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for k in [
            &self.valid,
            &self.other_valid,
            &self.unknown,
            &self.revoked,
            &self.disabled,
            &self.expired,
            &self.wrong_prefix,
        ] {
            out.push(k.expose_secret().to_owned());
            out.push(secret_of(k).to_owned());
        }
        for text in [&self.wrong_secret, &self.bad_checksum] {
            out.push(text.clone());
            // prefix `kg_`, 12 id characters, then 22 of secret
            out.push(text[3 + 12..3 + 12 + 22].to_owned());
        }
        out
    }
}

/// Issues the matrix keys in `fx` and moves its clock past the expiry of `expired`.
pub async fn matrix_keys(fx: &Fixture) -> MatrixKeys {
    let valid = fx.issue("valid").await;
    let other_valid = fx.issue("other-valid").await;
    let (unknown, _) = KeyRecord::generate(
        &Prefix::default(),
        fx.gate.verifier().hasher(),
        "never stored",
        fx.gate.clock().now(),
    )
    .expect("rng");
    let revoked = fx
        .issue_with("revoked", |r| r.status = KeyStatus::Revoked)
        .await;
    let disabled = fx
        .issue_with("disabled", |r| r.status = KeyStatus::Disabled)
        .await;
    let now = fx.gate.clock().now();
    let expired = fx
        .issue_with("expired", |r| {
            r.expires_at = Some(now + Duration::from_secs(3600))
        })
        .await;
    fx.clock.advance(Duration::from_secs(2 * 3600));
    // A well-formed key of a prefix the verifier does not accept.
    let wrong_prefix = ApiKey::generate(&Prefix::new("sk_live").expect("prefix")).expect("rng");
    MatrixKeys {
        wrong_secret: wrong_secret(&valid),
        bad_checksum: bad_checksum(&valid),
        valid,
        other_valid,
        unknown,
        revoked,
        disabled,
        expired,
        wrong_prefix,
    }
}

/// The bad-input matrix of the authentication layer (and the accepted variants), with the decisions documented
/// in `src/credentials.rs` and the README.
pub fn matrix(k: &MatrixKeys) -> Vec<Row> {
    use DenialCode::*;
    let valid = k.valid.expose_secret().as_bytes();
    let bearer = |key: &str| format!("Bearer {key}").into_bytes();
    let big = vec![b'a'; 16 * 1024];
    let mut big_bearer = b"Bearer kg_".to_vec();
    big_bearer.extend(vec![b'A'; 16 * 1024]);
    let mut non_ascii = valid.to_vec();
    non_ascii.extend_from_slice("é".as_bytes());
    let mut non_utf8 = valid.to_vec();
    non_utf8.extend_from_slice(b"\xff\xfe");
    let mut bearer_non_utf8 = b"Bearer ".to_vec();
    bearer_non_utf8.extend_from_slice(&non_utf8);
    let lower = format!("bearer {}", k.valid.expose_secret()).into_bytes();
    let upper = format!("BEARER {}", k.valid.expose_secret()).into_bytes();
    let padded_bearer = format!(" \tBearer  {} \t", k.valid.expose_secret()).into_bytes();
    let padded_header = format!("  {}\t", k.valid.expose_secret()).into_bytes();
    let inner_space = format!("Bearer {} x", k.valid.expose_secret()).into_bytes();
    let invalid = Expect::denied(InvalidKey);
    vec![
        // missing_key
        Row::new("no credential", &[], Expect::denied(MissingKey)),
        Row::new(
            "other scheme alone (Basic)",
            &[("authorization", b"Basic dXNlcjpwYXNz")],
            Expect::denied(MissingKey),
        ),
        // malformed_key
        Row::new(
            "empty X-API-Key",
            &[("x-api-key", b"")],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "empty api-key",
            &[("api-key", b"")],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "Bearer with no token",
            &[("authorization", b"Bearer")],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "Bearer with only spaces",
            &[("authorization", b"Bearer   ")],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "bearer token with inner whitespace",
            &[("authorization", &inner_space)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "non-ASCII (UTF-8) X-API-Key",
            &[("x-api-key", &non_ascii)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "non-UTF-8 X-API-Key",
            &[("x-api-key", &non_utf8)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "non-UTF-8 Bearer token",
            &[("authorization", &bearer_non_utf8)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "16 KiB X-API-Key",
            &[("x-api-key", &big)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "16 KiB Bearer token",
            &[("authorization", &big_bearer)],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "bad checksum",
            &[("x-api-key", k.bad_checksum.as_bytes())],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "wrong prefix",
            &[("x-api-key", k.wrong_prefix.expose_secret().as_bytes())],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "two different keys in two headers",
            &[
                ("authorization", &bearer(k.valid.expose_secret())),
                ("x-api-key", k.other_valid.expose_secret().as_bytes()),
            ],
            Expect::denied(MalformedKey),
        ),
        Row::new(
            "two different keys in one header name",
            &[
                ("x-api-key", valid),
                ("x-api-key", k.other_valid.expose_secret().as_bytes()),
            ],
            Expect::denied(MalformedKey),
        ),
        // invalid_key
        Row::new(
            "unknown id",
            &[("x-api-key", k.unknown.expose_secret().as_bytes())],
            invalid,
        ),
        Row::new(
            "right id, wrong secret",
            &[("authorization", &bearer(&k.wrong_secret))],
            invalid,
        ),
        Row::new(
            "revoked",
            &[("x-api-key", k.revoked.expose_secret().as_bytes())],
            Expect::Denied {
                public: InvalidKey,
                exact: RevokedKey,
            },
        ),
        Row::new(
            "disabled",
            &[("api-key", k.disabled.expose_secret().as_bytes())],
            Expect::Denied {
                public: InvalidKey,
                exact: DisabledKey,
            },
        ),
        // expired_key
        Row::new(
            "expired (manual clock)",
            &[("authorization", &bearer(k.expired.expose_secret()))],
            Expect::denied(ExpiredKey),
        ),
        // accepted
        Row::new(
            "Bearer",
            &[("authorization", &bearer(k.valid.expose_secret()))],
            Expect::Allowed,
        ),
        Row::new(
            "lower-case bearer",
            &[("authorization", &lower)],
            Expect::Allowed,
        ),
        Row::new(
            "upper-case BEARER",
            &[("authorization", &upper)],
            Expect::Allowed,
        ),
        Row::new(
            "surrounding whitespace around Bearer",
            &[("authorization", &padded_bearer)],
            Expect::Allowed,
        ),
        Row::new(
            "surrounding whitespace around X-API-Key",
            &[("x-api-key", &padded_header)],
            Expect::Allowed,
        ),
        Row::new("X-API-Key", &[("x-api-key", valid)], Expect::Allowed),
        Row::new("api-key", &[("api-key", valid)], Expect::Allowed),
        Row::new(
            "same key in all three headers",
            &[
                ("authorization", &bearer(k.valid.expose_secret())),
                ("x-api-key", valid),
                ("api-key", valid),
            ],
            Expect::Allowed,
        ),
        Row::new(
            "Basic alongside a valid X-API-Key",
            &[
                ("authorization", b"Basic dXNlcjpwYXNz"),
                ("x-api-key", valid),
            ],
            Expect::Allowed,
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Assertions on rendered rejections
// ---------------------------------------------------------------------------------------

/// Asserts an HTTP answer to `row`: 200 with the inner body, or 401 problem+json with the
/// public code and the right challenge.
pub fn assert_http(row: &Row, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    let name = row.name;
    match row.expect {
        Expect::Allowed => {
            assert_eq!(status, StatusCode::OK, "{name}: {}", lossy(body));
        }
        Expect::Denied { public, .. } => {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}");
            assert_eq!(
                headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
                Some(&b"application/problem+json"[..]),
                "{name}"
            );
            let json: serde_json::Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{name}: body is not JSON ({e}): {}", lossy(body)));
            assert_eq!(json["code"], public.as_str(), "{name}: {json}");
            assert_eq!(json["status"], 401, "{name}: {json}");
            let challenge = headers
                .get(WWW_AUTHENTICATE)
                .unwrap_or_else(|| panic!("{name}: no WWW-Authenticate"))
                .to_str()
                .expect("ASCII challenge");
            if public == DenialCode::MissingKey {
                assert_eq!(challenge, r#"Bearer realm="keygate""#, "{name}");
            } else {
                assert!(
                    challenge.starts_with(r#"Bearer realm="keygate", error="invalid_token""#),
                    "{name}: {challenge}"
                );
            }
        }
    }
}

/// Asserts a gRPC answer to a denied `row`: HTTP 200, trailers-only, `grpc-status` 16 and a
/// `grpc-message` naming the public code.
pub fn assert_grpc_denied(row: &Row, status: StatusCode, headers: &HeaderMap) {
    let name = row.name;
    let Expect::Denied { public, .. } = row.expect else {
        panic!("{name}: not a denied row");
    };
    assert_eq!(status, StatusCode::OK, "{name}");
    assert_eq!(
        headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes),
        Some(&b"application/grpc"[..]),
        "{name}"
    );
    assert_eq!(
        headers.get("grpc-status").map(HeaderValue::as_bytes),
        Some(&b"16"[..]),
        "{name}"
    );
    let message = headers
        .get("grpc-message")
        .unwrap_or_else(|| panic!("{name}: no grpc-message"))
        .to_str()
        .expect("percent-encoded ASCII");
    assert!(
        message.starts_with(public.as_str()),
        "{name}: grpc-message {message:?}"
    );
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// Loopback servers and clients
// ---------------------------------------------------------------------------------------

/// Sends one HTTP/1.1 GET of `path` with `headers` to `addr` with hyper's client and
/// returns the status, headers and whole body.
pub async fn send(
    addr: SocketAddr,
    path: &str,
    headers: HeaderMap,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    for (name, value) in headers.iter() {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let (parts, body) = keygate_testkit::http::send(addr, req).await.into_parts();
    (parts.status, parts.headers, body_bytes(body).await)
}

/// Writes `head` (request line and header lines, without the final blank line) to `addr`
/// over a raw TCP connection, with `Connection: close`, and parses the answer.
pub async fn send_raw(addr: SocketAddr, head: &[u8]) -> (StatusCode, HeaderMap, Bytes) {
    parse_response(&send_raw_bytes(addr, head).await)
}

/// Like [`send_raw`], returning the answer's bytes as they came off the wire.
pub async fn send_raw_bytes(addr: SocketAddr, head: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = head.to_vec();
    req.extend_from_slice(b"connection: close\r\n\r\n");
    stream.write_all(&req).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes")
        .expect("read");
    raw
}

/// The raw HTTP/1.1 request head of `row` (GET /).
pub fn raw_head(row: &Row) -> Vec<u8> {
    let mut head = b"GET / HTTP/1.1\r\nhost: localhost\r\n".to_vec();
    for (name, value) in &row.headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head
}

fn parse_response(raw: &[u8]) -> (StatusCode, HeaderMap, Bytes) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", lossy(raw)));
    let head = &raw[..split];
    let body = &raw[split + 4..];
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lossy(lines.next().expect("status line"));
    let code: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let colon = line.iter().position(|b| *b == b':').expect("header colon");
        let name = HeaderName::from_bytes(&line[..colon]).expect("header name");
        let value = line[colon + 1..].trim_ascii();
        headers.append(name, HeaderValue::from_bytes(value).expect("header value"));
    }
    let body = match headers.get("content-length") {
        Some(len) => {
            let len: usize = len
                .to_str()
                .ok()
                .and_then(|l| l.parse().ok())
                .expect("length");
            Bytes::copy_from_slice(&body[..len])
        }
        None => Bytes::copy_from_slice(body),
    };
    (StatusCode::from_u16(code).expect("status"), headers, body)
}

/// An inner service that counts its calls and answers 200 "ok".
pub fn counting_ok<B>(
    calls: Arc<AtomicUsize>,
) -> CountingService<impl Fn(&Request<B>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static>
{
    keygate_testkit::http::counting(calls, |_: &Request<B>| {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    })
}

pub use keygate_testkit::http::body_bytes;
