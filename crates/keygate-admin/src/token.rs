//! The token endpoint: `POST /auth/token` trades an API key for a short-lived token,
//! `GET /.well-known/jwks.json` publishes the public keys that verify it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::StatusCode;

use keygate::reject::RenderContext;
use keygate::token::{IssueError, TokenRequest, Tokens};
use keygate::{Denial, DenialCode, KeyGate};

/// The largest token request body read.
const MAX_BODY: usize = 16 * 1024;

/// The token endpoint (feature `tokens`): `POST /auth/token` and
/// `GET /.well-known/jwks.json`, as one router to merge into an application (the paths are
/// absolute: `app.merge(TokenApi::new(&gate, tokens).router())`).
///
/// `POST /auth/token` authenticates the caller's API key exactly as the hub's layers do
/// (any place keys are read, the key's own `allowed_ips` enforced) and answers an RFC 6749
/// section 5.1 token response:
///
/// ```json
/// {"access_token":"eyJ...","token_type":"Bearer","expires_in":900,"token_id":"..."}
/// ```
///
/// with `Cache-Control: no-store`. The optional JSON body ([`TokenRequest`]) narrows the
/// token: `scopes`, `collections` (each within the key's own), `ttl` in seconds (default
/// 15 minutes, cut to the configured cap and to the key's expiry) and `subject`, the end
/// user the token is for. Errors follow RFC 6749 section 5.2 (`{"error", "error_description"}`):
///
/// | status | `error` | when |
/// |---|---|---|
/// | 400 | `invalid_request` | the body is not JSON of that shape, a scope or collection does not parse, `ttl` is 0, `subject` is empty or too long |
/// | 400 | `invalid_scope` | a scope or collection the key does not hold (narrowing only) |
/// | 401 | `invalid_client` | the credential is itself a token (tokens do not mint tokens) |
/// | 401 / 403 / 503 | keygate's denial codes (problem+json) | no key, a bad, revoked or expired key, a key used from outside its `allowed_ips`, the store down |
///
/// `GET /.well-known/jwks.json` answers the public keys ([`SigningKeys::jwks`](keygate::token::SigningKeys::jwks)),
/// without authentication.
#[derive(Clone, Debug)]
pub struct TokenApi {
    shared: Arc<TokenShared>,
}

#[derive(Clone)]
struct TokenShared {
    gate: KeyGate,
    tokens: Tokens,
    on_issued: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for TokenShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShared")
            .field("gate", &self.gate)
            .field("tokens", &self.tokens)
            .field("on_issued", &self.on_issued.is_some())
            .finish()
    }
}

impl TokenApi {
    /// The endpoint issuing `tokens` to callers resolved through `gate`. For the tokens to
    /// be accepted, the same [`Tokens`] must be given to the hub
    /// ([`KeyGateBuilder::tokens`](keygate::KeyGateBuilder::tokens)).
    pub fn new(gate: &KeyGate, tokens: Tokens) -> Self {
        TokenApi {
            shared: Arc::new(TokenShared {
                gate: gate.clone(),
                tokens,
                on_issued: None,
            }),
        }
    }

    /// Calls `hook` once for every token handed out (after it is signed, before the answer
    /// leaves), e.g. `move || metrics.token_issued()` to count them in
    /// `keygate_tokens_issued_total`. Set it before [`router`](TokenApi::router) or
    /// [`split`](TokenApi::split); a later call replaces it.
    pub fn on_issued(self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        let mut shared = (*self.shared).clone();
        shared.on_issued = Some(Arc::new(hook));
        TokenApi {
            shared: Arc::new(shared),
        }
    }

    /// The two routes, at `/auth/token` and `/.well-known/jwks.json`.
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let (issue, jwks) = self.split();
        issue.merge(jwks)
    }

    /// The two routes apart: `POST /auth/token` (to mount behind the keygate layers) and
    /// `GET /.well-known/jwks.json` (to mount where no key is needed).
    pub fn split<S, T>(self) -> (Router<S>, Router<T>)
    where
        S: Clone + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        (
            Router::new()
                .route("/auth/token", post(issue))
                .with_state(self.shared.clone()),
            Router::new()
                .route("/.well-known/jwks.json", get(jwks))
                .with_state(self.shared),
        )
    }
}

async fn jwks(State(shared): State<Arc<TokenShared>>) -> Response {
    let body = shared.tokens.keys().jwks().to_string();
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    res
}

async fn issue(State(shared): State<Arc<TokenShared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut head = http::Request::from_parts(parts, ());
    let gate = &shared.gate;
    let verdict = gate
        .resolve(&mut head)
        .await
        .and_then(|p| own_network(gate, &mut head, &p).map(|()| p));
    let parent = match verdict {
        Ok(p) => p,
        Err(d) => {
            let cx = RenderContext::of(&head);
            let mut res = gate.renderer().render(&d, &cx).map(Body::from);
            res.extensions_mut().insert(d);
            return res;
        }
    };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return oauth_error(&IssueError::InvalidRequest(format!(
            "the body is larger than {MAX_BODY} bytes or could not be read"
        )));
    };
    let request: TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let what = match e.classify() {
                    serde_json::error::Category::Data => {
                        "the body must be a JSON object with only scopes, collections, ttl, subject"
                    }
                    _ => "the body is not valid JSON",
                };
                return oauth_error(&IssueError::InvalidRequest(what.into()));
            }
        }
    };
    match shared.tokens.issue(&parent, &request, gate.clock().now()) {
        Ok(t) => {
            if let Some(hook) = &shared.on_issued {
                hook();
            }
            let body = serde_json::json!({
                "access_token": t.expose_secret(),
                "token_type": "Bearer",
                "expires_in": t.expires_in.as_secs(),
                "token_id": t.id,
            });
            let mut res = Response::new(Body::from(body.to_string()));
            let h = res.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
            res
        }
        Err(e) => oauth_error(&e),
    }
}

/// The caller's own `allowed_ips`, enforced here whether or not an `IpAllowLayer` is in
/// front: a key limited to some networks mints no token from elsewhere.
fn own_network(
    gate: &KeyGate,
    req: &mut http::Request<()>,
    caller: &keygate::Principal,
) -> Result<(), Denial> {
    let own = caller.allowed_ips();
    if own.is_empty() {
        return Ok(());
    }
    match gate.client_ip(req) {
        Some(ip) if own.iter().any(|n| n.contains(&ip)) => Ok(()),
        _ => Err(Denial::new(DenialCode::IpNotAllowed)
            .with_detail("This API key may not be used from this address.")),
    }
}

/// An RFC 6749 section 5.2 error answer.
fn oauth_error(e: &IssueError) -> Response {
    let status = match e {
        IssueError::InvalidClient(_) => StatusCode::UNAUTHORIZED,
        IssueError::Server(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let body = serde_json::json!({ "error": e.code(), "error_description": e.to_string() });
    let mut res = Response::new(Body::from(body.to_string()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}
