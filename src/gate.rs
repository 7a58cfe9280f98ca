//! The shared hub: one handle holding the verifier, the clock, the credential sources and
//! the renderer, from which every layer is built.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{Extensions, Request};

use crate::client_ip::{ClientIp, TrustedProxies};
use crate::credentials::Credentials;
use crate::reject::{DefaultRenderer, Renderer};
use crate::{Clock, Denial, PendingLookup, Principal, Verifier};

/// The shared hub of keygate: the [`Verifier`] (with its clock and cache), where keys travel
/// ([`Credentials`]) and how denials are rendered ([`Renderer`]). Cheap to clone.
///
/// Layers built from the same `KeyGate` share the per-request resolution: the key is
/// verified once per request, by whichever layer gets there first, and the verdict
/// (success or failure) is memoized in the request's extensions.
#[derive(Clone)]
pub struct KeyGate {
    inner: Arc<Inner>,
}

struct Inner {
    verifier: Verifier,
    credentials: Credentials,
    renderer: Arc<dyn Renderer>,
    proxies: TrustedProxies,
}

/// Configures a [`KeyGate`].
pub struct KeyGateBuilder {
    verifier: Verifier,
    credentials: Credentials,
    renderer: Arc<dyn Renderer>,
    proxies: TrustedProxies,
}

impl KeyGateBuilder {
    /// Where requests carry their key (default: `Authorization: Bearer`, `X-API-Key`,
    /// `api-key`).
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// How denials are rendered (default: [`DefaultRenderer`]).
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        self.renderer = Arc::new(renderer);
        self
    }

    /// The proxies whose `X-Forwarded-For` / `Forwarded` headers are believed (default:
    /// none). Every layer of the hub settles on the same client address.
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// Builds the hub.
    pub fn build(self) -> KeyGate {
        KeyGate {
            inner: Arc::new(Inner {
                verifier: self.verifier,
                credentials: self.credentials,
                renderer: self.renderer,
                proxies: self.proxies,
            }),
        }
    }
}

impl KeyGate {
    /// A hub with default credentials and renderer.
    pub fn new(verifier: Verifier) -> Self {
        Self::builder(verifier).build()
    }

    /// Configures a hub around `verifier`.
    pub fn builder(verifier: Verifier) -> KeyGateBuilder {
        KeyGateBuilder {
            verifier,
            credentials: Credentials::default(),
            renderer: Arc::new(DefaultRenderer::default()),
            proxies: TrustedProxies::none(),
        }
    }

    /// The verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// The clock every time-dependent decision reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        self.inner.verifier.clock()
    }

    /// Where requests carry their key.
    pub fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    /// The renderer.
    pub fn renderer(&self) -> &dyn Renderer {
        &*self.inner.renderer
    }

    /// The trusted proxies.
    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.inner.proxies
    }

    /// The client address of `req`, settled once per request: an earlier layer's
    /// [`ClientIp`] extension if present, else the peer address (through trusted proxies'
    /// forwarded headers), memoized as a [`ClientIp`] extension. `None` when unknown.
    pub fn client_ip<B>(&self, req: &mut Request<B>) -> Option<IpAddr> {
        if let Some(ClientIp(ip)) = req.extensions().get::<ClientIp>() {
            return Some(*ip);
        }
        let ip = self.inner.proxies.client_ip(req)?;
        req.extensions_mut().insert(ClientIp(ip));
        Some(ip)
    }

    /// The authentication layer of this hub.
    #[cfg(feature = "auth")]
    pub fn auth_layer(&self) -> crate::auth::ApiKeyAuthLayer {
        crate::auth::ApiKeyAuthLayer::new(self.clone())
    }

    /// The audit layer of this hub, recording through `auditor` (see
    /// [`AuditLayer::with_gate`](crate::audit::AuditLayer::with_gate)).
    #[cfg(feature = "audit")]
    pub fn audit_layer(&self, auditor: crate::core::audit::Auditor) -> crate::audit::AuditLayer {
        crate::audit::AuditLayer::with_gate(self, auditor)
    }

    /// Resolves the caller of `req` once: reuses an earlier verdict from the extensions, or
    /// reads the credential and verifies it (asking the store only on a cache miss), then
    /// memoizes the verdict in the extensions. For custom layers and handlers.
    pub async fn resolve<B>(&self, req: &mut Request<B>) -> Result<Principal, Denial> {
        let result = match self.begin(req) {
            Begin::Done(r) => return r,
            Begin::Fresh(r) => r,
            Begin::Pending(p) => self.inner.verifier.finish(p).await,
        };
        remember(req.extensions_mut(), &result);
        result
    }

    /// The synchronous part of [`KeyGate::resolve`]; memoizes only through
    /// [`remember`].
    pub(crate) fn begin<B>(&self, req: &Request<B>) -> Begin {
        if let Some(r) = resolution(req.extensions()) {
            return Begin::Done(r.cloned().map_err(Denial::clone));
        }
        let presented = match self.inner.credentials.extract(req.headers(), req.uri()) {
            Ok(Some(c)) => c,
            Ok(None) => {
                // Off the hot path: only requests without a credential look further.
                return Begin::Fresh(Err(self.inner.credentials.missing(
                    req.headers(),
                    req.uri(),
                    self.inner.verifier.parser().prefixes(),
                )));
            }
            Err(d) => return Begin::Fresh(Err(d)),
        };
        match self.inner.verifier.lookup(&presented) {
            crate::Lookup::Done(r) => Begin::Fresh(r),
            crate::Lookup::Pending(p) => Begin::Pending(p),
        }
    }
}

impl fmt::Debug for KeyGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyGate")
            .field("verifier", &self.inner.verifier)
            .field("credentials", &self.inner.credentials)
            .finish_non_exhaustive()
    }
}

/// Where the synchronous part of resolution got to.
pub(crate) enum Begin {
    /// An earlier layer already decided (memoized).
    Done(Result<Principal, Denial>),
    /// Decided now, without I/O; not yet memoized.
    Fresh(Result<Principal, Denial>),
    /// The store must be asked.
    Pending(PendingLookup),
}

/// The memoized failure of a resolution (success is memoized as the [`Principal`] itself).
#[derive(Clone)]
struct Unauthenticated(Denial);

/// Memoizes a verdict in `ext`: the [`Principal`] on success, the denial on failure.
pub(crate) fn remember(ext: &mut Extensions, result: &Result<Principal, Denial>) {
    match result {
        Ok(p) => {
            ext.insert(p.clone());
        }
        Err(d) => {
            ext.insert(Unauthenticated(d.clone()));
        }
    }
}

/// The verdict an earlier layer reached for this request, if any: the [`Principal`] it
/// resolved, or the exact [`Denial`] (with its precise code, e.g. `revoked_key`, even when
/// the client was shown `invalid_key`).
pub fn resolution(ext: &Extensions) -> Option<Result<&Principal, &Denial>> {
    if let Some(p) = ext.get::<Principal>() {
        return Some(Ok(p));
    }
    ext.get::<Unauthenticated>().map(|u| Err(&u.0))
}
