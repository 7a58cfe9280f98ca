//! `RequireTls`: a [`Check`] that refuses a key sent in the clear.
//!
//! An API key is a bearer secret: once it has crossed a network in plaintext, anyone on
//! the path may hold it. [`RequireTls`] refuses a request that presents a credential
//! without TLS from a peer that is not on this host, with `403 insecure_transport`, and
//! treats the key as exposed:
//!
//! - with [`RequireTls::audit`], it records a lifecycle event `exposed` naming the key
//!   (id, name, owner), so the key can be found and rotated (one event per refused
//!   request, until the key is disabled or rotated);
//! - with [`RequireTls::disable_exposed`], it also disables the key at once (through the
//!   [`KeyManager`], which records its own `disabled` event) before the refusal is sent.
//!
//! A request without a credential passes (nothing was exposed; the auth layer answers it).
//! A credential that is not a valid key is refused with the same code (so the answer does
//! not tell a client whether it guessed a key), but no event names a key.
//!
//! How the transport is known: the server's TLS acceptor inserts
//! [`TlsConnection`](crate::transport::TlsConnection) into each request's extensions (see
//! [`transport`](crate::transport) for hyper, axum and tonic). A request without it is
//! plaintext (fail closed). Loopback peers (`127.0.0.0/8`, `::1`: a sidecar, a local
//! health check) are exempt unless [`RequireTls::including_loopback`]; the peer is the
//! connection's (never a forwarded header). Behind a proxy that terminates TLS, give
//! [`RequireTls::behind_proxies`]: a request whose connection comes from one of them counts
//! as TLS when its last `X-Forwarded-Proto` value is `https`.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::require_tls::RequireTls;
//! use keygate::transport::TlsConnection;
//! use keygate::check::CheckLayer;
//! use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "ci", gate.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(CheckLayer::new(RequireTls::new()).with_gate(&gate))
//!     .service_fn(|_: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//!
//! let request = |tls: bool| {
//!     let mut req = Request::get("/").header("x-api-key", key.expose_secret()).body(String::new()).unwrap();
//!     req.extensions_mut().insert(std::net::SocketAddr::from(([203, 0, 113, 7], 50000)));
//!     if tls {
//!         req.extensions_mut().insert(TlsConnection);
//!     }
//!     req
//! };
//! let res = svc.clone().oneshot(request(false)).await.unwrap();
//! assert_eq!(res.status(), StatusCode::FORBIDDEN); // insecure_transport
//! let res = svc.oneshot(request(true)).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! # }
//! ```

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::Request;

use crate::check::{Caller, Check, Step};
use crate::client_ip::{peer_addr, TrustedProxies};
use crate::core::audit::{AuditEvent, Auditor, LifecycleAction, LifecycleEvent};
use crate::transport::is_tls;
use crate::{Denial, DenialCode, Principal};
use keygate_core::{Clock, KeyManager, KeyStatus, SystemClock};

/// The actor named in the events `RequireTls` records.
pub const ACTOR: &str = "keygate:require-tls";

/// Refuses keys sent without TLS from peers off this host (`403 insecure_transport`),
/// recording each valid one as exposed and optionally disabling it. See the
/// [module docs](self).
#[derive(Clone)]
pub struct RequireTls {
    auditor: Option<Auditor>,
    disable: Option<KeyManager>,
    loopback_exempt: bool,
    proxies: Option<TrustedProxies>,
    clock: Arc<dyn Clock>,
}

impl Default for RequireTls {
    fn default() -> Self {
        RequireTls::new()
    }
}

impl fmt::Debug for RequireTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireTls")
            .field("audit", &self.auditor.is_some())
            .field("disable_exposed", &self.disable.is_some())
            .field("loopback_exempt", &self.loopback_exempt)
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

impl RequireTls {
    /// Refuses keys sent in the clear; records nothing, disables nothing; loopback peers
    /// exempt.
    pub fn new() -> Self {
        RequireTls {
            auditor: None,
            disable: None,
            loopback_exempt: true,
            proxies: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// Records an `exposed` lifecycle event for each valid key refused, into `auditor`.
    pub fn audit(mut self, auditor: Auditor) -> Self {
        self.auditor = Some(auditor);
        self
    }

    /// Also disables each valid key refused, through `keys` (which records the `disabled`
    /// event), before the refusal is sent. A key that cannot be disabled (the store is
    /// down) is still refused; the failure is logged.
    pub fn disable_exposed(mut self, keys: KeyManager) -> Self {
        self.disable = Some(keys);
        self
    }

    /// Refuses plaintext from loopback peers too (by default they are exempt).
    pub fn including_loopback(mut self) -> Self {
        self.loopback_exempt = false;
        self
    }

    /// Believes `X-Forwarded-Proto: https` (its last value) from connections whose peer is
    /// one of `proxies` (a proxy that terminated TLS).
    pub fn behind_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = Some(proxies);
        self
    }

    /// The clock of the events' times (default: the system clock; give the hub's,
    /// `gate.clock().clone()`, so events agree with the other layers').
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Whether `req` may carry a key: it came over TLS, from a loopback peer (when exempt),
    /// or through a trusted proxy that says it received it over HTTPS.
    pub fn is_secure<B>(&self, req: &Request<B>) -> bool {
        if is_tls(req) {
            return true;
        }
        let peer = peer_addr(req);
        if self.loopback_exempt && peer.is_some_and(|ip: IpAddr| ip.is_loopback()) {
            return true;
        }
        match (&self.proxies, peer) {
            (Some(proxies), Some(ip)) if proxies.is_trusted(ip) => forwarded_https(req),
            _ => false,
        }
    }

    fn denial() -> Denial {
        Denial::new(DenialCode::InsecureTransport)
    }

    fn exposed(&self, p: &Principal) -> AuditEvent {
        AuditEvent::Lifecycle(LifecycleEvent {
            time: self.clock.now(),
            actor: ACTOR.to_owned(),
            action: LifecycleAction::Exposed,
            key_id: p.key_id(),
            key_name: p.name().to_owned(),
            subject: p.subject().map(str::to_owned),
            status: KeyStatus::Active,
            related_key: None,
            changes: Vec::new(),
        })
    }
}

/// The last `X-Forwarded-Proto` value (the one the nearest proxy wrote) is `https`.
fn forwarded_https<B>(req: &Request<B>) -> bool {
    let Some(last) = req
        .headers()
        .get_all("x-forwarded-proto")
        .iter()
        .next_back()
    else {
        return false;
    };
    let Ok(text) = last.to_str() else {
        return false;
    };
    text.rsplit(',')
        .next()
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

impl Check for RequireTls {
    type Note = ();

    fn needs_caller<B>(&self, req: &Request<B>) -> bool {
        !self.is_secure(req)
    }

    fn check<B>(&self, req: &mut Request<B>, caller: Caller<'_>) -> Result<(), Denial> {
        if self.is_secure(req) {
            return Ok(());
        }
        match caller {
            Err(d) if d.code() == DenialCode::MissingKey => Ok(()),
            Err(_) => Err(Self::denial()),
            Ok(p) => {
                if let Some(a) = &self.auditor {
                    a.record_nowait(self.exposed(p));
                }
                Err(Self::denial())
            }
        }
    }

    fn begin<B: Send + 'static>(&self, req: &mut Request<B>, caller: Caller<'_>) -> Step<B, ()> {
        let (Some(keys), Ok(p)) = (&self.disable, caller) else {
            return Step::Now(self.check(req, caller));
        };
        if self.is_secure(req) {
            return Step::Now(Ok(()));
        }
        // The key is disabled (and the exposure recorded) before the refusal goes out.
        let keys = keys.clone();
        let auditor = self.auditor.clone();
        let event = self.exposed(p);
        let id = p.key_id();
        Step::Later(Box::new(move |req| {
            Box::pin(async move {
                if let Some(a) = &auditor {
                    if let Err(e) = a.record(event).await {
                        tracing::error!(key_id = %id, error = %e, "the exposure of a key could not be audited");
                    }
                }
                if let Err(e) = keys.disable(ACTOR, id).await {
                    tracing::error!(key_id = %id, error = %e, "an exposed key could not be disabled");
                }
                (req, Err(Self::denial()))
            })
        }))
    }
}
