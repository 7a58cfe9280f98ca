//! The shared hub: one handle holding the verifier, the clock, the credential sources and
//! the renderer, from which every layer is built.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{Extensions, Request};

use crate::client_ip::TrustedProxies;
use crate::credentials::Credentials;
use crate::reject::{DefaultRenderer, Renderer};
use crate::{Clock, Denial, PendingLookup, Principal, RequestContext, Verifier};

/// The shared hub of keygate: the [`Verifier`] (with its clock and cache), where keys travel
/// ([`Credentials`]) and how denials are rendered ([`Renderer`]). Cheap to clone.
///
/// Layers built from the same `KeyGate` share the per-request resolution: the key is
/// verified once per request, by whichever layer gets there first, and the verdict
/// (success or failure) is memoized in the request's [`RequestContext`].
#[derive(Clone)]
pub struct KeyGate {
    inner: Arc<Inner>,
}

struct Inner {
    verifier: Verifier,
    credentials: Credentials,
    renderer: Arc<dyn Renderer>,
    proxies: TrustedProxies,
    #[cfg(feature = "tokens")]
    tokens: Option<crate::token::Tokens>,
}

/// Configures a [`KeyGate`].
pub struct KeyGateBuilder {
    verifier: Verifier,
    credentials: Credentials,
    renderer: Arc<dyn Renderer>,
    proxies: TrustedProxies,
    #[cfg(feature = "tokens")]
    tokens: Option<crate::token::Tokens>,
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

    /// Accepts short-lived tokens signed by `tokens` wherever keys are read (feature
    /// `tokens`): a credential shaped like a JWT is verified as a token and resolves to its
    /// key's principal, narrowed ([`crate::token`]). Without it a token is `malformed_key`.
    #[cfg(feature = "tokens")]
    pub fn tokens(mut self, tokens: crate::token::Tokens) -> Self {
        self.tokens = Some(tokens);
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
                #[cfg(feature = "tokens")]
                tokens: self.tokens,
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
            #[cfg(feature = "tokens")]
            tokens: None,
        }
    }

    /// The short-lived tokens this hub accepts, if any (feature `tokens`).
    #[cfg(feature = "tokens")]
    pub fn tokens(&self) -> Option<&crate::token::Tokens> {
        self.inner.tokens.as_ref()
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

    /// The client address of `req`, settled once per request: the one an earlier layer
    /// settled (in the [`RequestContext`]), else the peer address (through trusted proxies'
    /// forwarded headers), memoized in the context. `None` when unknown.
    pub fn client_ip<B>(&self, req: &mut Request<B>) -> Option<IpAddr> {
        if let Some(ip) = crate::client_ip::settled_earlier(req) {
            return Some(ip);
        }
        let ip = self.inner.proxies.client_ip(req)?;
        RequestContext::of_mut(req.extensions_mut()).set_client_ip(ip);
        Some(ip)
    }

    /// The authentication layer of this hub: [`ApiKeyAuthLayer::new(self)`](crate::auth::ApiKeyAuthLayer::new).
    #[cfg(feature = "auth")]
    pub fn auth_layer(&self) -> crate::auth::ApiKeyAuthLayer {
        crate::auth::ApiKeyAuthLayer::new(self)
    }

    /// The audit layer of this hub, recording through `auditor`: shorthand for
    /// [`AuditLayer::new(auditor).with_gate(self)`](crate::audit::AuditLayer::with_gate).
    #[cfg(feature = "audit")]
    pub fn audit_layer(&self, auditor: crate::core::audit::Auditor) -> crate::audit::AuditLayer {
        crate::audit::AuditLayer::new(auditor).with_gate(self)
    }

    /// A fused stack of this hub's checks: one service, one response future, whatever the
    /// number of checks (see [`Stack`](crate::stack::Stack)).
    pub fn stack(&self) -> crate::stack::Stack<crate::check::Empty> {
        crate::stack::Stack::new(self)
    }

    /// Resolves the caller of `req` once: reuses an earlier verdict from the request
    /// context, or reads the credential and verifies it (asking the store only on a cache
    /// miss), then memoizes the verdict in the context. The one resolution entry point of
    /// keygate: its layers, the admin API and custom layers all go through it.
    pub async fn resolve<B>(&self, req: &mut Request<B>) -> Result<Principal, Denial> {
        match self.start(req) {
            Start::Known(r) => r,
            Start::Pending(p) => self.finish(p, req).await,
        }
    }

    /// The synchronous part of [`KeyGate::resolve`]: an earlier verdict, or one reached now
    /// without I/O (memoized here), or the store lookup still to make.
    pub(crate) fn start<B>(&self, req: &mut Request<B>) -> Start {
        let ctx = RequestContext::of_mut(req.extensions_mut());
        if let Some(r) = ctx.resolution() {
            return Start::Known(r.cloned().map_err(Denial::clone));
        }
        let result = match self.inner.credentials.extract(req.headers(), req.uri()) {
            #[cfg(feature = "tokens")]
            Ok(Some(presented))
                if self.inner.tokens.is_some() && crate::token::is_token_shaped(&presented) =>
            {
                let Some(tokens) = &self.inner.tokens else {
                    return Start::Known(Err(Denial::new(crate::DenialCode::InvalidToken)));
                };
                let now = self.inner.verifier.clock().now();
                match tokens.lookup(&presented, &self.inner.verifier, now) {
                    crate::token::TokenLookup::Done(r) => r,
                    crate::token::TokenLookup::Pending(lookup, token) => {
                        return Start::Pending(Pending {
                            lookup,
                            token: Some(token),
                        })
                    }
                }
            }
            Ok(Some(presented)) => match self.inner.verifier.lookup(&presented) {
                crate::Lookup::Done(r) => r,
                crate::Lookup::Pending(lookup) => {
                    return Start::Pending(Pending {
                        lookup,
                        #[cfg(feature = "tokens")]
                        token: None,
                    })
                }
            },
            // Off the hot path: only requests without a credential look further.
            Ok(None) => Err(self.inner.credentials.missing(
                req.headers(),
                req.uri(),
                self.inner.verifier.parser().prefixes(),
            )),
            Err(d) => Err(d),
        };
        RequestContext::of_mut(req.extensions_mut()).set_resolution(result.clone());
        Start::Known(result)
    }

    /// The async part of [`KeyGate::resolve`]: asks the store, memoizes the verdict.
    pub(crate) async fn finish<B>(
        &self,
        pending: Pending,
        req: &mut Request<B>,
    ) -> Result<Principal, Denial> {
        let result = self.inner.verifier.finish(pending.lookup).await;
        #[cfg(feature = "tokens")]
        let result = match (pending.token, &self.inner.tokens) {
            (Some(token), Some(tokens)) => result.map(|parent| tokens.narrowed(token, parent)),
            _ => result,
        };
        RequestContext::of_mut(req.extensions_mut()).set_resolution(result.clone());
        result
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
pub(crate) enum Start {
    /// Decided (now, or by an earlier layer), and memoized.
    Known(Result<Principal, Denial>),
    /// The store must be asked.
    Pending(Pending),
}

/// A resolution waiting for the store: the key's lookup, and for a token what narrows the
/// key's principal once it is read.
pub(crate) struct Pending {
    lookup: PendingLookup,
    #[cfg(feature = "tokens")]
    token: Option<crate::token::TokenPending>,
}

/// The verdict an earlier layer reached for this request, if any: the [`Principal`] it
/// resolved, or the exact [`Denial`] (with its precise code, e.g. `revoked_key`, even when
/// the client was shown `invalid_key`). Shorthand for
/// [`RequestContext::resolution`] on the request's context.
pub fn resolution(ext: &Extensions) -> Option<Result<&Principal, &Denial>> {
    RequestContext::of(ext)?.resolution()
}
