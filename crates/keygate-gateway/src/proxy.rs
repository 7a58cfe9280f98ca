//! The forwarding service: the innermost service of the gateway, behind keygate's layers.
//!
//! - Client credentials are always removed before forwarding (`Authorization`,
//!   `Proxy-Authorization`, `X-API-Key`, `api-key`, `X-Chroma-Token`, and every header the
//!   hub reads keys from); the upstream's own credential is added.
//! - Hop-by-hop headers (RFC 9110 section 7.6.1, and those named in `Connection`) are not
//!   forwarded, either way.
//! - Bodies stream both ways. A request body announced larger than the cap is refused
//!   `413` before it is read; a longer stream is cut at the cap. Only a request of a key with
//!   a tenant, on a route whose body must be rewritten, and one whose body may name other
//!   collections than its path ([`crate::reach`]), are read whole (within
//!   `rewrite_body_bytes`).
//! - The upstream client pools keep-alive connections (hyper-util's client).
//! - Upstream failures are problem documents: `503 upstream_unavailable` (connection
//!   refused or not made), `504 upstream_timeout` (no answer head in time), `502
//!   upstream_error` (anything else).
//! - gRPC requests (`content-type: application/grpc...`, and every gRPC method path) go to
//!   the gRPC upstream (`[grpc]`, HTTP/2) after the checks of [`crate::grpc`]; their
//!   refusals and upstream failures are in gRPC form ([`Refusal::grpc_response`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keygate::reject::{DefaultRenderer, RenderContext, Renderer};
use keygate::{Denial, DenialCode, RequestContext};
use serde_json::Value;

use crate::config::ExtraRoute;
use crate::preset::{ChromaOp, Preset, QdrantOp, Tenancy};
use crate::problem::Refusal;
use crate::qdrant::{self, Check};

/// The body of a request sent upstream: the client's, streamed (and capped), or one the
/// gateway wrote.
pub type UpstreamBody = Either<Prefixed, Full<Bytes>>;

/// A client's body, streamed and capped, after bytes the gateway already read from it (a
/// gRPC request's first message), which go first; with a [`Checker`](crate::grpc::Checker),
/// every later gRPC message is released only once whole and allowed.
#[derive(Debug)]
pub struct Prefixed {
    head: Option<Bytes>,
    rest: Limited<Incoming>,
    checker: Option<crate::grpc::Checker>,
}

impl Prefixed {
    /// `head`, then the rest of `body`, cut when the whole runs over `max` bytes.
    pub fn new(head: Option<Bytes>, body: Incoming, max: u64) -> Self {
        let read = head.as_ref().map_or(0, |h| h.len() as u64);
        Prefixed {
            head: head.filter(|h| !h.is_empty()),
            rest: Limited::new(body, cap(max.saturating_sub(read))),
            checker: None,
        }
    }

    /// As [`Prefixed::new`], the rest of the body passed through `checker`.
    pub fn checked(
        head: Option<Bytes>,
        body: Incoming,
        max: u64,
        checker: crate::grpc::Checker,
    ) -> Self {
        Prefixed {
            checker: Some(checker),
            ..Prefixed::new(head, body, max)
        }
    }
}

/// A later gRPC message the gateway refused: the request stream is cut with it.
#[derive(Debug)]
pub struct MessageRefused(pub Refusal);

impl std::fmt::Display for MessageRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.code, self.0.detail)
    }
}

impl std::error::Error for MessageRefused {}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        let this = &mut *self;
        let Some(checker) = this.checker.as_mut() else {
            return Pin::new(&mut this.rest).poll_frame(cx);
        };
        loop {
            let frame = match Pin::new(&mut this.rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) if checker.holds_partial() => {
                    let cut =
                        checker.refuse(Refusal::bad_message("The request ended inside a message."));
                    return Poll::Ready(Some(Err(Box::new(MessageRefused(cut)))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => match checker.feed(&data) {
                    Ok(Some(ready)) => return Poll::Ready(Some(Ok(http_body::Frame::data(ready)))),
                    // Part of a message: held; read on.
                    Ok(None) => {}
                    Err(r) => return Poll::Ready(Some(Err(Box::new(MessageRefused(r))))),
                },
                Err(trailers) => {
                    if checker.holds_partial() {
                        let cut = checker
                            .refuse(Refusal::bad_message("The request ended inside a message."));
                        return Poll::Ready(Some(Err(Box::new(MessageRefused(cut)))));
                    }
                    return Poll::Ready(Some(Ok(trailers)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.rest.is_end_stream()
            && !self
                .checker
                .as_ref()
                .is_some_and(crate::grpc::Checker::holds_partial)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.size_hint();
        let n = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let mut hint = http_body::SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(n));
        }
        hint.set_lower(rest.lower().saturating_add(n));
        hint
    }
}

/// The body of the gateway's answers: the upstream's, streamed, or one the gateway wrote.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The upstream's own credential: a header value, marked sensitive, never shown by `Debug`.
#[derive(Clone)]
pub struct UpstreamCredential {
    header: HeaderName,
    value: HeaderValue,
}

impl UpstreamCredential {
    /// `header: [scheme ]secret`. Fails on a header name or value HTTP cannot carry.
    pub fn new(header: &str, scheme: Option<&str>, secret: &str) -> Result<Self, String> {
        let header = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("{header:?} is not a header name"))?;
        let text = match scheme {
            Some(s) => format!("{s} {secret}"),
            None => secret.to_owned(),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            "the upstream credential holds characters a header cannot carry".to_owned()
        })?;
        value.set_sensitive(true);
        Ok(UpstreamCredential { header, value })
    }

    /// The header it travels in.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCredential")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// How the proxy reaches the upstream and what it lets through.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The upstream's base URL (`http://host:port`, maybe with a path prefix).
    pub upstream: Uri,
    /// The upstream's credential.
    pub credential: Option<UpstreamCredential>,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long the upstream may take to answer a request's head.
    pub timeout: Duration,
    /// HTTP/2 without negotiation to the upstream.
    pub http2: bool,
    /// Idle connections kept per host.
    pub pool_max_idle: usize,
    /// For an `https://` upstream: the PEM certificates to trust instead of the system's
    /// roots.
    pub upstream_ca: Option<Vec<u8>>,
    /// The largest request body forwarded.
    pub max_body: u64,
    /// The largest body read whole for a rewrite.
    pub rewrite_cap: u64,
    /// The API spoken.
    pub preset: Preset,
    /// The configuration's extra routes.
    pub extra_routes: Vec<ExtraRoute>,
    /// The payload / metadata field naming a record's tenant.
    pub tenant_field: String,
    /// The Chroma tenants served (the `chroma` preset): paths under another are refused.
    pub chroma_tenants: Vec<String>,
    /// gRPC pass-through (`None`: gRPC requests are refused 12 UNIMPLEMENTED).
    pub grpc: Option<GrpcUpstream>,
}

/// Where gRPC requests go.
#[derive(Debug, Clone)]
pub struct GrpcUpstream {
    /// The upstream's gRPC base URL (`http://host:6334`: HTTP/2 without negotiation;
    /// `https://`: HTTP/2 by ALPN).
    pub upstream: Uri,
    /// The largest first message read for its collection.
    pub max_message: u64,
}

/// The forwarding service (cheap to clone).
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
    config: ProxyConfig,
    /// Headers a client key may travel in, removed before forwarding.
    credential_headers: Vec<HeaderName>,
    /// The proxy to the gRPC upstream, and the first-message cap.
    grpc: Option<(Proxy, u64)>,
    /// Refusals in gRPC form (the gRPC proxy).
    grpc_form: bool,
    /// Chroma collection ids seen in a tenant and database (a collection never moves).
    chroma_known: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
}

/// Chroma collection ids remembered at most (then forgotten all at once).
const CHROMA_KNOWN_MAX: usize = 10_000;
/// Collections listed per page, and pages listed at most, when looking for an id in a
/// Chroma database.
const CHROMA_PAGE: usize = 1000;
const CHROMA_MAX_PAGES: usize = 100;

/// Headers that never carry a client's key upstream, whatever the hub reads.
const CLIENT_CREDENTIALS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-chroma-token",
];

/// Hop-by-hop headers.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The roots an `https://` upstream's certificate is checked against: the PEM
/// certificates given, else the system's (none needed for `http://`).
fn upstream_roots(tls: bool, ca: Option<&[u8]>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("upstream.ca_file: not PEM certificates ({e})"))?;
            if certs.is_empty() {
                return Err("upstream.ca_file holds no certificate".into());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.ca_file: {e}"))?;
            }
        }
        None if tls => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(
                    "no trusted root certificates on this system for the https:// upstream; set upstream.ca_file"
                        .into(),
                );
            }
        }
        None => {}
    }
    Ok(roots)
}

impl Proxy {
    /// A proxy to `config.upstream`; `hub_credentials` are the headers the hub reads keys
    /// from (removed too). Fails on an upstream URL without a scheme and host, or neither
    /// `https` nor `http`, and on unusable upstream certificates.
    pub fn new(
        config: ProxyConfig,
        hub_credentials: &keygate::credentials::Credentials,
    ) -> Result<Proxy, String> {
        let grpc = match &config.grpc {
            Some(g) => {
                let sub = ProxyConfig {
                    upstream: g.upstream.clone(),
                    http2: true,
                    grpc: None,
                    ..config.clone()
                };
                Some((Proxy::build(sub, hub_credentials, true)?, g.max_message))
            }
            None => None,
        };
        let mut proxy = Proxy::build(config, hub_credentials, false)?;
        if let Some(inner) = Arc::get_mut(&mut proxy.inner) {
            inner.grpc = grpc;
        }
        Ok(proxy)
    }

    fn build(
        config: ProxyConfig,
        hub_credentials: &keygate::credentials::Credentials,
        grpc_form: bool,
    ) -> Result<Proxy, String> {
        let parts = config.upstream.clone().into_parts();
        let scheme = parts
            .scheme
            .ok_or("the upstream URL needs a scheme (http://)")?;
        let tls = if scheme == http::uri::Scheme::HTTPS {
            true
        } else if scheme == http::uri::Scheme::HTTP {
            false
        } else {
            return Err("the upstream URL must be https:// or http://".into());
        };
        let authority = parts.authority.ok_or("the upstream URL needs a host")?;
        if authority.as_str().contains('@') {
            return Err("the upstream URL may not carry a user or password: use credential_file or credential_env".into());
        }
        let prefix = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        // The TLS connector below hands it `https://` URIs too.
        connector.enforce_http(false);
        let roots = upstream_roots(tls, config.upstream_ca.as_deref())?;
        let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(config.http2)
            .build(connector);
        let mut credential_headers: Vec<HeaderName> = CLIENT_CREDENTIALS
            .iter()
            .map(|h| HeaderName::from_static(h))
            .collect();
        for source in hub_credentials.sources() {
            if let keygate::credentials::CredentialSource::Header(h) = source {
                if !credential_headers.contains(h) {
                    credential_headers.push(h.clone());
                }
            }
        }
        Ok(Proxy {
            inner: Arc::new(Inner {
                client,
                scheme,
                authority,
                prefix,
                config,
                credential_headers,
                grpc: None,
                grpc_form,
                chroma_known: std::sync::Mutex::default(),
            }),
        })
    }

    /// Forwards `req` as it is (credentials and hop-by-hop headers removed): the open
    /// health routes.
    pub async fn forward_plain(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        self.clean(&mut parts.headers);
        if let Err(r) = self.check_length(&parts.headers) {
            return problem(&r);
        }
        if !plain_path(parts.uri.path()) {
            return problem(&Refusal::bad_path());
        }
        let body = Either::Left(Prefixed::new(None, body, self.inner.config.max_body));
        self.forward(parts, body).await
    }

    async fn handle(self, req: Request<Incoming>) -> Response<ProxyBody> {
        if crate::grpc::is_grpc(req.headers()) || crate::grpc::method(req.uri().path()).is_some() {
            return match &self.inner.grpc {
                Some((grpc, max_message)) => grpc.handle_grpc(req, *max_message).await,
                None => grpc_refusal(&Refusal::unknown_method(
                    "gRPC pass-through is not enabled on this gateway.",
                )),
            };
        }
        let principal = RequestContext::of(req.extensions())
            .and_then(RequestContext::principal)
            .cloned();
        let tenant = principal
            .as_ref()
            .and_then(|p| p.tenant())
            .map(str::to_owned);
        let (mut parts, body) = req.into_parts();
        self.clean(&mut parts.headers);
        if let Err(r) = self.check_length(&parts.headers) {
            return problem(&r);
        }
        if !plain_path(parts.uri.path()) {
            return problem(&Refusal::bad_path());
        }
        if let Some(t) = crate::reach::chroma_tenant(self.inner.config.preset, parts.uri.path()) {
            if !self.inner.config.chroma_tenants.iter().any(|a| a == t) {
                return rest_denial(
                    Denial::new(DenialCode::ResourceForbidden).with_detail(
                        "This gateway does not serve that Chroma tenant (see [chroma] tenants in its configuration).",
                    ),
                    &parts,
                );
            }
        }
        if let Some((c, scope)) = crate::reach::chroma_collection(
            self.inner.config.preset,
            parts.method.as_str(),
            parts.uri.path(),
        ) {
            if let Err(res) = self
                .chroma_in_database(principal.as_ref(), &parts, &c, scope)
                .await
            {
                return res;
            }
        }
        let Some(tenant) = tenant else {
            return self.forward_reached(principal.as_ref(), parts, body).await;
        };
        let config = &self.inner.config;
        let tenancy = crate::preset::tenancy(
            config.preset,
            &config.extra_routes,
            parts.method.as_str(),
            parts.uri.path(),
        );
        match tenancy {
            Some(Tenancy::Pass) => {
                let body = Either::Left(Prefixed::new(None, body, config.max_body));
                self.forward(parts, body).await
            }
            Some(Tenancy::Qdrant(op)) => match self.qdrant(op, &mut parts, body, &tenant).await {
                Ok(Some(body)) => self.forward_json(parts, body).await,
                Ok(None) => {
                    self.forward(parts, Either::Right(Full::new(Bytes::new())))
                        .await
                }
                Err(res) => res,
            },
            Some(Tenancy::Chroma(op)) => match self.chroma(op, &parts, body, &tenant).await {
                Ok(body) => self.forward_json(parts, body).await,
                Err(res) => res,
            },
            Some(Tenancy::Refuse) | None => problem(&Refusal::tenant_unscopable(
                "This operation cannot be scoped to a tenant.",
            )),
        }
    }

    /// A request of a key without a tenant: forwarded, streamed, unless its route reaches
    /// other collections ([`crate::reach`]) and the key's grant of the route's scope does
    /// not cover every collection; then its body is read whole, and forwarded unchanged
    /// only if every collection it names is permitted to the key.
    async fn forward_reached(
        &self,
        principal: Option<&keygate::Principal>,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let config = &self.inner.config;
        let Some((reach, scope)) =
            crate::reach::reach(config.preset, parts.method.as_str(), parts.uri.path())
        else {
            let body = Either::Left(Prefixed::new(None, body, config.max_body));
            return self.forward(parts, body).await;
        };
        let Some(principal) = principal else {
            // The layers let no request without a key this far; fail closed anyway.
            return rest_denial(Denial::new(DenialCode::MissingKey), &parts);
        };
        // The route's scope, and for `init_from` (it copies the other collection's points)
        // `points:read` too.
        let read = (reach == crate::reach::Reach::Create).then_some("points:read");
        let Ok(scopes) = std::iter::once(scope)
            .chain(read)
            .map(keygate::Scope::parse)
            .collect::<Result<Vec<_>, _>>()
        else {
            return problem(&Refusal::upstream_error());
        };
        if scopes.iter().all(|s| covers_every_collection(principal, s)) {
            let body = Either::Left(Prefixed::new(None, body, config.max_body));
            return self.forward(parts, body).await;
        }
        if reach == crate::reach::Reach::Everything {
            return rest_denial(every_collection_denial(scope), &parts);
        }
        let bytes = match self.read_body(body).await {
            Ok(b) => b,
            Err(res) => return res,
        };
        let json = match parse_json(&bytes) {
            Ok(v) => v,
            Err(r) => return problem(&r),
        };
        let names = match crate::reach::names(reach, &json) {
            Ok(n) => n,
            Err(r) => return problem(&r),
        };
        for scope in &scopes {
            if let Some(name) = names.refused(|n| principal.permits(scope, n)) {
                return rest_denial(collection_denial(principal, scope, name), &parts);
            }
        }
        self.forward(parts, Either::Right(Full::new(bytes))).await
    }

    /// Whether Chroma collection `c` (named by id) is in the tenant and database its path
    /// names, asked of the upstream (its collections listed) unless the key's grant of the
    /// route's scope covers every database or the id was seen there before. `Err`: the
    /// answer (`403 resource_forbidden`, or the upstream's own).
    async fn chroma_in_database(
        &self,
        principal: Option<&keygate::Principal>,
        parts: &http::request::Parts,
        c: &crate::reach::ChromaCollection,
        scope: &str,
    ) -> Result<(), Response<ProxyBody>> {
        let Some(principal) = principal else {
            return Err(rest_denial(Denial::new(DenialCode::MissingKey), parts));
        };
        if keygate::Scope::parse(scope).is_ok_and(|s| covers_every_collection(principal, &s)) {
            return Ok(());
        }
        let place = (c.tenant.clone(), c.database.clone());
        let known =
            |m: &std::collections::HashMap<String, (String, String)>| m.get(&c.id) == Some(&place);
        if self.inner.chroma_known.lock().is_ok_and(|m| known(&m)) {
            return Ok(());
        }
        for page in 0..CHROMA_MAX_PAGES {
            let path = format!(
                "/api/v2/tenants/{}/databases/{}/collections?limit={CHROMA_PAGE}&offset={}",
                c.tenant,
                c.database,
                page * CHROMA_PAGE
            );
            let listed = self.ask(Method::GET, &path, &Value::Null).await?;
            let Some(list) = listed.as_array() else {
                return Err(problem(&Refusal::upstream_error()));
            };
            if list
                .iter()
                .any(|col| col["id"].as_str() == Some(c.id.as_str()))
            {
                if let Ok(mut m) = self.inner.chroma_known.lock() {
                    if m.len() >= CHROMA_KNOWN_MAX {
                        m.clear();
                    }
                    m.insert(c.id.clone(), place);
                }
                return Ok(());
            }
            if list.len() < CHROMA_PAGE {
                break;
            }
        }
        Err(rest_denial(
            Denial::new(DenialCode::ResourceForbidden).with_detail(
                "The collection id in the path is not a collection of the database the path names.",
            ),
            parts,
        ))
    }

    /// Removes client credentials and hop-by-hop headers.
    fn clean(&self, headers: &mut HeaderMap) {
        strip_hop_by_hop(headers);
        for h in &self.inner.credential_headers {
            headers.remove(h);
        }
        headers.remove(HOST);
    }

    fn check_length(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let max = self.inner.config.max_body;
        match headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(n) if n > max => Err(Refusal::body_too_large(max)),
            _ => Ok(()),
        }
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, Refusal> {
        let i = &self.inner;
        Uri::builder()
            .scheme(i.scheme.clone())
            .authority(i.authority.clone())
            .path_and_query(format!("{}{}", i.prefix, path_and_query))
            .build()
            .map_err(|_| Refusal::bad_body("the request path cannot be forwarded"))
    }

    async fn send(&self, mut req: Request<UpstreamBody>) -> Result<Response<Incoming>, Refusal> {
        if let Some(c) = &self.inner.config.credential {
            req.headers_mut().insert(c.header.clone(), c.value.clone());
        }
        let sent = tokio::time::timeout(self.inner.config.timeout, self.inner.client.request(req));
        match sent.await {
            Err(_) => Err(Refusal::upstream_timeout()),
            Ok(Err(e)) if e.is_connect() => Err(Refusal::upstream_unavailable()),
            // The client's body ran over the cap while it was streamed.
            Ok(Err(e)) if over_limit(&e) => {
                Err(Refusal::body_too_large(self.inner.config.max_body))
            }
            // A later gRPC message was refused while the body was streamed.
            Ok(Err(e)) if refused_message(&e).is_some() => {
                Err(refused_message(&e).unwrap_or_else(Refusal::upstream_error))
            }
            Ok(Err(_)) => Err(Refusal::upstream_error()),
            Ok(Ok(res)) => Ok(res),
        }
    }

    async fn forward(
        &self,
        parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Response<ProxyBody> {
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let uri = match self.uri(pq) {
            Ok(u) => u,
            Err(r) => return self.refuse(&r),
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers;
        if self.inner.config.http2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        match self.send(req).await {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(r) => self.refuse(&r),
        }
    }

    /// A refusal in the form this proxy's clients read (gRPC or problem+json).
    fn refuse(&self, r: &Refusal) -> Response<ProxyBody> {
        if self.inner.grpc_form {
            grpc_refusal(r)
        } else {
            problem(r)
        }
    }

    /// A gRPC request (this is the gRPC proxy): the method must be one of the preset's, a
    /// tenant key may only call the methods that read no points, and every collection the
    /// first message names must be one the key may use; then the request is forwarded,
    /// its first message re-sent as it was read.
    async fn handle_grpc(&self, req: Request<Incoming>, max_message: u64) -> Response<ProxyBody> {
        let Some(method) = crate::grpc::method(req.uri().path()) else {
            return grpc_refusal(&Refusal::unknown_method(
                "The gateway does not forward this gRPC method.",
            ));
        };
        if !crate::grpc::is_grpc(req.headers()) {
            return problem(&Refusal::not_grpc());
        }
        let Some(principal) = RequestContext::of(req.extensions())
            .and_then(RequestContext::principal)
            .cloned()
        else {
            // The layers let no request without a key this far; fail closed anyway.
            return grpc_denial(Denial::new(DenialCode::MissingKey));
        };
        if principal.tenant().is_some() && !method.tenant_keys {
            return grpc_refusal(&Refusal::tenant_unscopable(
                "Keys with a tenant may not call this gRPC method: the gateway scopes tenants only over REST.",
            ));
        }
        let (mut parts, mut body) = req.into_parts();
        self.clean(&mut parts.headers);
        if let Err(r) = self.check_length(&parts.headers) {
            return grpc_refusal(&r);
        }
        let max_body = self.inner.config.max_body;
        if method.message == crate::grpc::Message::Everything {
            let covered = keygate::Scope::parse(method.scope)
                .is_ok_and(|scope| covers_every_collection(&principal, &scope));
            if !covered {
                return grpc_denial(every_collection_denial(method.scope));
            }
        }
        if matches!(
            method.message,
            crate::grpc::Message::NoCollection | crate::grpc::Message::Everything
        ) {
            return self
                .forward(parts, Either::Left(Prefixed::new(None, body, max_body)))
                .await;
        }
        // The first message must arrive within the upstream timeout.
        let first = crate::grpc::read_first(&mut body, max_message.min(max_body));
        let (head, len) = match tokio::time::timeout(self.inner.config.timeout, first).await {
            Ok(Ok(read)) => read,
            Ok(Err(r)) => return grpc_refusal(&r),
            Err(_) => return grpc_refusal(&Refusal::message_timeout()),
        };
        let Some(first) = head.get(5..5 + len) else {
            return grpc_refusal(&Refusal::bad_message("The first message is incomplete."));
        };
        let names = match crate::grpc::collections(method.message, first) {
            Ok(names) => names,
            Err(r) => return grpc_refusal(&r),
        };
        let Ok(scope) = keygate::Scope::parse(method.scope) else {
            return grpc_refusal(&Refusal::upstream_error());
        };
        if let Some(refused) = names.refused(|n| principal.permits(&scope, n)) {
            return grpc_denial(collection_denial(&principal, &scope, refused));
        }
        // Later messages (bytes already read past the first one, then the stream) are
        // checked the same way as they come.
        let first_len = 5 + len;
        let mut checker =
            crate::grpc::Checker::new(method.message, max_message.min(max_body), move |name| {
                principal.permits(&scope, name)
            });
        let mut head = head;
        let extra = head.split_off(first_len.min(head.len()));
        match checker.feed(&extra) {
            Ok(Some(ready)) => {
                let mut joined = bytes::BytesMut::from(&head[..]);
                joined.extend_from_slice(&ready);
                head = joined.freeze();
            }
            Ok(None) => {}
            Err(r) => return grpc_refusal(&r),
        }
        let verdict = checker.verdict();
        let res = self
            .forward(
                parts,
                Either::Left(Prefixed::checked(Some(head), body, max_body, checker)),
            )
            .await;
        // A later message refused before the upstream answered: the refusal, not the
        // failure it caused upstream.
        match verdict.lock().ok().and_then(|v| v.clone()) {
            Some(r) => grpc_refusal(&r),
            None => res,
        }
    }

    async fn forward_json(
        &self,
        mut parts: http::request::Parts,
        body: Value,
    ) -> Response<ProxyBody> {
        let bytes = Bytes::from(body.to_string());
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        parts
            .headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        parts.headers.remove(http::header::CONTENT_ENCODING);
        self.forward(parts, Either::Right(Full::new(bytes))).await
    }

    /// Reads a body whole, within the rewrite cap.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Response<ProxyBody>> {
        let limit = self.inner.config.rewrite_cap;
        match Limited::new(body, cap(limit)).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(problem(&Refusal::body_too_large(limit)))
            }
            Err(_) => Err(problem(&Refusal::bad_body("the body could not be read"))),
        }
    }

    /// Reads a body whole, within the rewrite cap, as JSON (`Null` when empty).
    async fn read_json(&self, body: Incoming) -> Result<Value, Response<ProxyBody>> {
        let bytes = self.read_body(body).await?;
        parse_json(&bytes).map_err(|r| problem(&r))
    }

    /// A JSON request of the gateway's own to the upstream (checks; `Null`: no body): the
    /// `result` of a 2xx answer; any other answer is passed to the client as it is.
    async fn ask(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, Response<ProxyBody>> {
        let uri = self.uri(path).map_err(|r| problem(&r))?;
        let bytes = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let mut req = Request::new(Either::Right(Full::new(bytes)));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let res = self.send(req).await.map_err(|r| problem(&r))?;
        if !res.status().is_success() {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            return Err(Response::from_parts(parts, Either::Left(body)));
        }
        let limit = self.inner.config.rewrite_cap;
        let bytes = Limited::new(res.into_body(), cap(limit))
            .collect()
            .await
            .map_err(|_| problem(&Refusal::upstream_error()))?
            .to_bytes();
        let mut v: Value =
            serde_json::from_slice(&bytes).map_err(|_| problem(&Refusal::upstream_error()))?;
        Ok(v.get_mut("result").map(Value::take).unwrap_or(v))
    }

    /// The Qdrant rules: `Some(body)` to forward rewritten, `None` for a bodiless request
    /// to forward as it is, `Err` for the answer.
    async fn qdrant(
        &self,
        op: QdrantOp,
        parts: &mut http::request::Parts,
        body: Incoming,
        tenant: &str,
    ) -> Result<Option<Value>, Response<ProxyBody>> {
        let field = self.inner.config.tenant_field.as_str();
        let path = parts.uri.path().to_owned();
        let segments: Vec<&str> = path.split('/').collect();
        // `/collections/{c}/...`: every tenant operation names a collection.
        let Some(collection) = segments.get(2).filter(|c| !c.is_empty()) else {
            return Err(problem(&Refusal::tenant_unscopable(
                "no collection in the path",
            )));
        };
        let count_path = format!("/collections/{collection}/points/count");
        match op {
            QdrantOp::GetPoint => {
                let id = qdrant::path_id(segments.last().copied().unwrap_or_default());
                let found = self
                    .ask(
                        Method::POST,
                        &count_path,
                        &qdrant::owned_count(&[id], field, tenant),
                    )
                    .await?;
                if found["count"].as_u64() != Some(1) {
                    return Err(problem(&Refusal::point_not_found()));
                }
                Ok(None)
            }
            QdrantOp::Retrieve => {
                let mut req = self.read_json(body).await?;
                let obj = req
                    .as_object_mut()
                    .ok_or_else(|| problem(&Refusal::bad_body("the body must be a JSON object")))?;
                let ids = obj
                    .get("ids")
                    .and_then(Value::as_array)
                    .cloned()
                    .ok_or_else(|| problem(&Refusal::bad_body("`ids` must be a list")))?;
                let ids = qdrant::distinct(&ids);
                let owned: std::collections::HashSet<String> = if ids.is_empty() {
                    std::collections::HashSet::new()
                } else {
                    let scroll_path = format!("/collections/{collection}/points/scroll");
                    let found = self
                        .ask(
                            Method::POST,
                            &scroll_path,
                            &qdrant::owned_scroll(&ids, field, tenant),
                        )
                        .await?;
                    found["points"]
                        .as_array()
                        .map(|ps| ps.iter().map(|p| qdrant::id_key(&p["id"])).collect())
                        .unwrap_or_default()
                };
                let kept: Vec<Value> = ids
                    .into_iter()
                    .filter(|id| owned.contains(&qdrant::id_key(id)))
                    .collect();
                obj.insert("ids".into(), Value::Array(kept));
                Ok(Some(req))
            }
            _ => {
                let req = self.read_json(body).await?;
                let scoped = qdrant::scope(op, req, field, tenant).map_err(|r| problem(&r))?;
                for check in &scoped.checks {
                    match check {
                        Check::Owned(ids) => {
                            let ids = qdrant::distinct(ids);
                            let found = self
                                .ask(
                                    Method::POST,
                                    &count_path,
                                    &qdrant::owned_count(&ids, field, tenant),
                                )
                                .await?;
                            if found["count"].as_u64() != Some(ids.len() as u64) {
                                return Err(problem(&Refusal::point_not_found()));
                            }
                        }
                        Check::NotElsewhere(ids) => {
                            let ids = qdrant::distinct(ids);
                            let found = self
                                .ask(
                                    Method::POST,
                                    &count_path,
                                    &qdrant::elsewhere_count(&ids, field, tenant),
                                )
                                .await?;
                            if found["count"].as_u64() != Some(0) {
                                return Err(problem(&Refusal::tenant_conflict()));
                            }
                        }
                    }
                }
                Ok(Some(scoped.body))
            }
        }
    }

    /// The Chroma rules.
    async fn chroma(
        &self,
        op: ChromaOp,
        parts: &http::request::Parts,
        body: Incoming,
        tenant: &str,
    ) -> Result<Value, Response<ProxyBody>> {
        let field = self.inner.config.tenant_field.as_str();
        let req = self.read_json(body).await?;
        let scoped = crate::chroma::scope(op, req, field, tenant).map_err(|r| problem(&r))?;
        if let Some(ids) = &scoped.check_ids {
            // Records with these ids that exist must be the tenant's: an upsert would
            // overwrite another tenant's record.
            let path = parts.uri.path();
            let get_path = match path.rsplit_once('/') {
                Some((base, _)) => format!("{base}/get"),
                None => {
                    return Err(problem(&Refusal::tenant_unscopable(
                        "no collection in the path",
                    )))
                }
            };
            let found = self
                .ask(
                    Method::POST,
                    &get_path,
                    &serde_json::json!({"ids": ids, "include": ["metadatas"]}),
                )
                .await?;
            if !crate::chroma::all_owned(&found, field, tenant) {
                return Err(problem(&Refusal::tenant_conflict()));
            }
        }
        Ok(scoped.body)
    }
}

/// Whether `path` is safe to forward as it was checked: no `.` or `..` segment and no
/// encoded `/` or `\` in a segment, however percent-encoded, so the upstream cannot resolve
/// it to another route or collection than the one the scope layer saw.
pub fn plain_path(path: &str) -> bool {
    path.split('/').all(|segment| {
        if !segment.contains(['.', '%']) {
            return true;
        }
        let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
        decoded != b"." && decoded != b".." && !decoded.contains(&b'/') && !decoded.contains(&b'\\')
    })
}

/// The refusal of a later gRPC message, if `e` (or an error it wraps) is one.
fn refused_message(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(m) = err.downcast_ref::<MessageRefused>() {
            return Some(m.0.clone());
        }
        cur = err.source();
    }
    None
}

/// Whether `e` (or an error it wraps) is a body running over its [`Limited`] cap.
fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn cap(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A gateway answer in gRPC form.
pub fn grpc_refusal(r: &Refusal) -> Response<ProxyBody> {
    r.grpc_response().map(|b| Either::Right(Full::new(b)))
}

/// A keygate denial in gRPC form, as keygate's layers render it (the denial in the
/// response's extensions, for the audit layer).
fn grpc_denial(denial: Denial) -> Response<ProxyBody> {
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    rendered(denial, &req)
}

/// `denial` rendered for `req` by keygate's renderer, the denial in the response's
/// extensions (the audit layer records it).
fn rendered(denial: Denial, req: &Request<()>) -> Response<ProxyBody> {
    let res = DefaultRenderer::new().render(&denial, &RenderContext::of(req));
    let mut res = res.map(|b| Either::Right(Full::new(b)));
    res.extensions_mut().insert(denial);
    res
}

/// The denial of collection `name` to `principal` for `scope`, as the scope layer words it
/// for the collection in a path: `resource_forbidden` when no pattern of the key matches
/// it, `insufficient_scope` when only grants without `scope` do.
fn collection_denial(principal: &keygate::Principal, scope: &keygate::Scope, name: &str) -> Denial {
    if principal.can_access(name) {
        Denial::new(DenialCode::InsufficientScope)
            .with_required_scope(scope.to_string())
            .with_detail(
                "The API key holds this scope only on other collections, not on one the request names.",
            )
    } else {
        resource_forbidden(name)
    }
}

/// The denial of an operation on every collection to a key whose grants do not cover
/// them all.
fn every_collection_denial(scope: &str) -> Denial {
    Denial::new(DenialCode::ResourceForbidden).with_detail(format!(
        "This operation reaches every collection: it needs a grant of {scope} on every collection (*)."
    ))
}

/// A body as JSON (`Null` when empty).
fn parse_json(bytes: &[u8]) -> Result<Value, Refusal> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|_| Refusal::bad_body("the body is not valid JSON"))
}

/// Whether one grant of `principal` holds `scope` on every collection (`*`): its requests
/// can reach no collection it may not use, so their bodies need not be read.
fn covers_every_collection(principal: &keygate::Principal, scope: &keygate::Scope) -> bool {
    // The union of the patterns first: without `*` there, no grant has it (no allocation).
    principal.resources().iter().any(|p| p == "*")
        && principal.grants().iter().any(|g| {
            g.collections.iter().any(|p| p == "*")
                && keygate::ScopeSet::compile(&g.scopes).allows(scope)
        })
}

/// A keygate denial of a REST request, as keygate's layers render it (the denial in the
/// response's extensions, for the audit layer).
fn rest_denial(denial: Denial, parts: &http::request::Parts) -> Response<ProxyBody> {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    rendered(denial, &req)
}

/// `resource_forbidden` for collection `name` (echoed when short and printable).
fn resource_forbidden(name: &str) -> Denial {
    let shown = crate::problem::shown_collection(name, "The collection");
    Denial::new(DenialCode::ResourceForbidden).with_detail(format!(
        "{shown} named in the request is refused: the key's collection patterns do not match it."
    ))
}

/// A gateway answer.
pub fn problem(r: &Refusal) -> Response<ProxyBody> {
    r.response().map(|b| Either::Right(Full::new(b)))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the `Connection` field names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        // gRPC needs `te: trailers` end to end.
        if h == "te"
            && headers
                .get(h)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        headers.remove(h);
    }
}

impl tower::Service<Request<Incoming>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::plain_path;

    #[test]
    fn dot_segments_and_encoded_separators_are_not_plain() {
        assert!(plain_path("/collections/docs/points/search"));
        assert!(plain_path("/collections/my.docs/points/1"));
        assert!(plain_path("/collections/caf%C3%A9/points"));
        for bad in [
            "/collections/docs/../other/points/search",
            "/collections/./docs",
            "/collections/%2e%2E/points",
            "/collections/.%2e/points",
            "/collections/a%2Fb/points",
            "/collections/a%5Cb/points",
        ] {
            assert!(!plain_path(bad), "{bad}");
        }
    }
}
