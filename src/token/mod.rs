//! Short-lived tokens from API keys (feature `tokens`).
//!
//! A caller holding an API key trades it for a signed JWT (EdDSA, with a `kid`) that is
//! valid for minutes, for one end user (`sub`), and narrowed to some of the key's scopes and
//! collections. [`ApiKeyAuthLayer`](crate::auth::ApiKeyAuthLayer) accepts the token wherever
//! it accepts the key (a JWT does not look like a keygate key, so the two are told apart by
//! shape) and resolves the key's [`Principal`] narrowed by the token
//! ([`Principal::narrow`]): rate limits and quotas are charged to the key, and every other
//! layer works unchanged.
//!
//! Revocation beats the token's lifetime: the key's state comes from the same
//! [`Verifier`] cache and change notification as the key's own requests
//! ([`Verifier::lookup_parent`]), and the token only narrows the key's *current* policy,
//! so revoking or disabling the key, or taking a role from it, holds for its tokens on the
//! next request in every replica.
//!
//! A verified token is cached by the digest of its signature (the signed part is compared
//! whole), so its next use costs one digest and two map reads, with no signature check.
//!
//! Refusals (each a [`DenialCode`], HTTP 401): `expired_token`; `invalid_token` (not a
//! JWT, bad signature, tampered, missing claims); `unknown_token_key` (a `kid` not in the
//! key set; clients read `invalid_token`); `unsupported_token_algorithm` (`alg` other than
//! `EdDSA`, `none` included; clients read `invalid_token`). A token whose key is revoked,
//! disabled, expired or gone is refused with the key's own code.
//!
//! Claims: `kid` (header), `sub` (the end user, when given), `jti`, `iat`, `exp`, `kgk`
//! (the parent key id), `scope` (space-separated, when narrowed) and `collections` (when
//! narrowed).
//!
//! Limitations: Ed25519 (`EdDSA`) only, no ES256. One token cannot be revoked alone (revoke
//! or disable its key; tokens are short). A token's first use costs a signature check
//! (tens of microseconds), which a caller without a key can also trigger with well-formed
//! garbage under a known `kid`: keep a per-address limit for anonymous callers in front
//! (the showcase's `RateLimitLayer` has one). A refused token's audit record names no key
//! (the key is named once the token is verified and the key found).

mod keys;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

pub use keys::{KeysError, SigningKeys, TOKEN_KEYS_ENV, TOKEN_KEYS_FILE_ENV};

use crate::{
    validate_resource_pattern, Denial, DenialCode, Grant, KeyId, Lookup, PendingLookup, Principal,
    ResourceSet, Scope, ScopeSet, TokenGrant, Verifier,
};

/// The default time to live of a token: 15 minutes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// The default cap on a token's time to live: 1 hour.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(60 * 60);
/// The default number of verified tokens remembered.
const DEFAULT_CACHE: usize = 65_536;

/// Issues and verifies short-lived tokens: the signing keys, the time-to-live rules and the
/// cache of verified tokens. Cheap to clone; clones share the cache. Give it to the hub
/// ([`KeyGateBuilder::tokens`](crate::KeyGateBuilder::tokens)) so the authentication layer
/// accepts tokens, and to the token endpoint (keygate-admin's `token_router`) to issue them.
#[derive(Clone)]
pub struct Tokens {
    inner: Arc<Inner>,
}

struct Inner {
    keys: SigningKeys,
    default_ttl: Duration,
    max_ttl: Duration,
    capacity: usize,
    validation: Validation,
    /// Verified tokens, by the digest of their signature.
    cache: DashMap<Digest, Entry, DigestHash>,
    /// Serializes the (rare) sweeps of a full cache.
    sweeping: Mutex<()>,
}

/// The blake3 digest of a token's signature: the cache key.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Digest([u8; 32]);

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hashes a [`Digest`] by its first 8 bytes: a digest is already uniform, and only
/// verified tokens (each with a valid signature) are ever inserted, so no caller can aim
/// entries at one bucket.
#[derive(Clone, Copy, Default)]
struct DigestHash;

/// The hasher of [`DigestHash`].
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Digest`; anything else is folded in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One verified token.
struct Entry {
    /// The signed part (`header.payload`, not secret): a hit must match it whole.
    signed: Box<str>,
    parent: KeyId,
    grant: Arc<TokenGrant>,
    /// The key's principal the last narrowing was made from, and that narrowing.
    memo: Option<(Principal, Principal)>,
}

/// The claims of a token.
#[derive(Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    jti: String,
    iat: u64,
    exp: u64,
    /// The parent key id.
    kgk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collections: Option<Vec<String>>,
}

/// What a caller asks a token for; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Limit the token to these scopes (each one the key holds).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Limit the token to these collection patterns (each within the key's).
    #[serde(default)]
    pub collections: Option<Vec<String>>,
    /// Time to live in seconds (default 15 minutes; capped by configuration and by the
    /// key's own expiry).
    #[serde(default)]
    pub ttl: Option<u64>,
    /// The end user the token is for.
    #[serde(default)]
    pub subject: Option<String>,
}

/// A token just issued. `Debug` hides the token.
#[derive(Clone)]
pub struct IssuedToken {
    token: String,
    /// The token's id (`jti`).
    pub id: String,
    /// How long the token is valid.
    pub expires_in: Duration,
    /// When it expires.
    pub expires_at: SystemTime,
}

impl IssuedToken {
    /// The token itself (a bearer credential: never log it).
    pub fn expose_secret(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Why a token was not issued, with its RFC 6749 section 5.2 error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// `invalid_scope`: the request asks for a scope or collection the key does not hold.
    #[error("{0}")]
    InvalidScope(String),
    /// `invalid_request`: a malformed field (a scope that does not parse, a zero ttl, an
    /// over-long subject).
    #[error("{0}")]
    InvalidRequest(String),
    /// `invalid_client`: the credential cannot mint tokens (it is itself a token).
    #[error("{0}")]
    InvalidClient(String),
    /// `server_error`: signing failed.
    #[error("{0}")]
    Server(String),
}

impl IssueError {
    /// The RFC 6749 error code (`invalid_scope`, `invalid_request`, `invalid_client`,
    /// `server_error`).
    pub fn code(&self) -> &'static str {
        match self {
            IssueError::InvalidScope(_) => "invalid_scope",
            IssueError::InvalidRequest(_) => "invalid_request",
            IssueError::InvalidClient(_) => "invalid_client",
            IssueError::Server(_) => "server_error",
        }
    }
}

/// The longest `subject` accepted.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Configures [`Tokens`].
pub struct TokensBuilder {
    keys: SigningKeys,
    default_ttl: Duration,
    max_ttl: Duration,
    capacity: usize,
}

impl TokensBuilder {
    /// The time to live of a token whose request names none (default 15 minutes).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }
    /// The longest time to live granted (default 1 hour); longer requests are cut to it.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }
    /// How many verified tokens are remembered (default 65,536). When full, expired ones
    /// are dropped, then all.
    pub fn cache_capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// Builds it.
    pub fn build(self) -> Tokens {
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Expiry is checked against the hub's clock, not the system's.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Tokens {
            inner: Arc::new(Inner {
                keys: self.keys,
                default_ttl: self.default_ttl.min(self.max_ttl),
                max_ttl: self.max_ttl,
                capacity: self.capacity,
                validation,
                cache: DashMap::with_hasher(DigestHash),
                sweeping: Mutex::new(()),
            }),
        }
    }
}

/// Where the synchronous part of a token's verification got to.
pub(crate) enum TokenLookup {
    /// Decided.
    Done(Result<Principal, Denial>),
    /// The parent key must be read from the store; then [`Tokens::narrowed`].
    Pending(PendingLookup, TokenPending),
}

/// A verified token waiting for its key's record.
pub(crate) struct TokenPending {
    digest: Digest,
    grant: Arc<TokenGrant>,
}

/// Whether a presented credential is shaped like a JWT (three dot-separated parts): keys
/// never contain a dot.
pub(crate) fn is_token_shaped(presented: &str) -> bool {
    presented.contains('.')
}

impl Tokens {
    /// Tokens signed with `keys`, with default settings.
    pub fn new(keys: SigningKeys) -> Self {
        Self::builder(keys).build()
    }

    /// Configures tokens signed with `keys`.
    pub fn builder(keys: SigningKeys) -> TokensBuilder {
        TokensBuilder {
            keys,
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            capacity: DEFAULT_CACHE,
        }
    }

    /// The signing keys.
    pub fn keys(&self) -> &SigningKeys {
        &self.inner.keys
    }

    /// The cap on a token's time to live.
    pub fn max_ttl(&self) -> Duration {
        self.inner.max_ttl
    }

    /// How many verified tokens are cached.
    pub fn cached(&self) -> usize {
        self.inner.cache.len()
    }

    /// Issues a token for the caller `parent` (the principal of the API key it presented)
    /// at `now`. Narrowing only: every requested scope must be one the key holds, every
    /// collection within the key's, and each scope held on each collection by one grant
    /// (`invalid_scope` otherwise). The time to live is the request's (or the default),
    /// cut to the configured cap and to the key's own expiry.
    pub fn issue(
        &self,
        parent: &Principal,
        request: &TokenRequest,
        now: SystemTime,
    ) -> Result<IssuedToken, IssueError> {
        if parent.token_id().is_some() {
            return Err(IssueError::InvalidClient(
                "a token cannot be traded for another token: present the API key".into(),
            ));
        }
        if let Some(s) = &request.subject {
            if s.is_empty() || s.len() > MAX_SUBJECT_LEN || s.chars().any(char::is_control) {
                return Err(IssueError::InvalidRequest(format!(
                    "subject must be 1 to {MAX_SUBJECT_LEN} bytes without control characters"
                )));
            }
        }
        let scopes = request.scopes.as_deref().unwrap_or_default();
        let collections = request.collections.as_deref().unwrap_or_default();
        grant_within(&parent.grants(), scopes, collections)?;
        let ttl = match request.ttl {
            Some(0) => {
                return Err(IssueError::InvalidRequest(
                    "ttl must be at least 1 second".into(),
                ))
            }
            Some(secs) => Duration::from_secs(secs).min(self.inner.max_ttl),
            None => self.inner.default_ttl,
        };
        let iat = unix_secs(now);
        let mut exp = iat.saturating_add(ttl.as_secs().max(1));
        if let Some(key_exp) = parent.expires_at() {
            // Whole seconds, rounded down: the token never outlives the key.
            exp = exp.min(unix_secs(key_exp));
        }
        if exp <= iat {
            return Err(IssueError::InvalidRequest(
                "the key expires within a second: no token can be issued".into(),
            ));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| IssueError::Server("no randomness".into()))?;
        let id = URL_SAFE_NO_PAD.encode(id);
        let claims = Claims {
            sub: request.subject.clone(),
            jti: id.clone(),
            iat,
            exp,
            kgk: parent.key_id().to_string(),
            scope: request.scopes.as_ref().map(|s| s.join(" ")),
            collections: request.collections.clone(),
        };
        let (kid, key) = self
            .inner
            .keys
            .signer()
            .ok_or_else(|| IssueError::Server("no signing key".into()))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        let token = jsonwebtoken::encode(&header, &claims, key)
            .map_err(|_| IssueError::Server("the token could not be signed".into()))?;
        let expires_in = Duration::from_secs(exp - iat);
        Ok(IssuedToken {
            token,
            id,
            expires_in,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// Verifies a presented token at `now` and resolves its key through `verifier`: a
    /// cached token costs a digest and two map reads; a new one a signature check.
    pub(crate) fn lookup(&self, token: &str, verifier: &Verifier, now: SystemTime) -> TokenLookup {
        let Some((signed, signature)) = token.rsplit_once('.') else {
            return TokenLookup::Done(Err(invalid("The access token is not a JWT.")));
        };
        let digest = Digest(*blake3::hash(signature.as_bytes()).as_bytes());
        let grant = match self.inner.cache.get(&digest) {
            Some(e) if *e.signed == *signed => {
                if now >= e.grant.expires_at {
                    drop(e);
                    self.inner.cache.remove(&digest);
                    return TokenLookup::Done(Err(Denial::new(DenialCode::ExpiredToken)));
                }
                let parent = match verifier.lookup_parent(e.parent, now) {
                    Lookup::Done(Ok(p)) => p,
                    Lookup::Done(Err(d)) => return TokenLookup::Done(Err(d)),
                    Lookup::Pending(p) => {
                        let grant = e.grant.clone();
                        return TokenLookup::Pending(p, TokenPending { digest, grant });
                    }
                };
                if let Some((seen, narrowed)) = &e.memo {
                    if Principal::ptr_eq(seen, &parent) {
                        return TokenLookup::Done(Ok(narrowed.clone()));
                    }
                }
                let grant = e.grant.clone();
                drop(e);
                return TokenLookup::Done(Ok(self.remember(digest, &grant, parent)));
            }
            _ => match self.verify(token, now) {
                Ok(v) => v,
                Err(d) => return TokenLookup::Done(Err(d)),
            },
        };
        let (parent_id, grant) = grant;
        let grant = Arc::new(grant);
        self.insert(
            digest,
            Entry {
                signed: signed.into(),
                parent: parent_id,
                grant: grant.clone(),
                memo: None,
            },
            now,
        );
        match verifier.lookup_parent(parent_id, now) {
            Lookup::Done(Ok(parent)) => {
                TokenLookup::Done(Ok(self.remember(digest, &grant, parent)))
            }
            Lookup::Done(Err(d)) => TokenLookup::Done(Err(d)),
            Lookup::Pending(p) => TokenLookup::Pending(p, TokenPending { digest, grant }),
        }
    }

    /// The principal of a token whose key the store has just answered for.
    pub(crate) fn narrowed(&self, pending: TokenPending, parent: Principal) -> Principal {
        self.remember(pending.digest, &pending.grant, parent)
    }

    /// Narrows `parent` by `grant` and remembers it for the token's next use.
    fn remember(&self, digest: Digest, grant: &TokenGrant, parent: Principal) -> Principal {
        let narrowed = parent.narrow(grant);
        if let Some(mut e) = self.inner.cache.get_mut(&digest) {
            e.memo = Some((parent, narrowed.clone()));
        }
        narrowed
    }

    fn insert(&self, digest: Digest, entry: Entry, now: SystemTime) {
        let inner = &*self.inner;
        if inner.cache.len() >= inner.capacity {
            let _one = inner
                .sweeping
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if inner.cache.len() >= inner.capacity {
                inner.cache.retain(|_, e| now < e.grant.expires_at);
                if inner.cache.len() >= inner.capacity {
                    inner.cache.clear();
                }
            }
        }
        inner.cache.insert(digest, entry);
    }

    /// Checks a token not seen before: header, key, signature, claims, expiry.
    fn verify(&self, token: &str, now: SystemTime) -> Result<(KeyId, TokenGrant), Denial> {
        #[derive(Deserialize)]
        struct RawHeader {
            alg: String,
            #[serde(default)]
            kid: Option<String>,
        }
        let header_part = token.split('.').next().unwrap_or_default();
        let header: RawHeader = URL_SAFE_NO_PAD
            .decode(header_part)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("The access token's header cannot be read."))?;
        if header.alg != "EdDSA" {
            return Err(Denial::new(DenialCode::UnsupportedTokenAlgorithm)
                .with_detail("The access token must be signed with EdDSA."));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.inner.keys.verifier(kid))
            .ok_or_else(|| Denial::new(DenialCode::UnknownTokenKey))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.inner.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    invalid("The access token's signature does not match.")
                }
                _ => invalid("The access token's claims cannot be read."),
            },
        )?;
        let c = data.claims;
        let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(c.exp);
        if now >= expires_at {
            return Err(Denial::new(DenialCode::ExpiredToken));
        }
        let parent =
            KeyId::parse(&c.kgk).map_err(|_| invalid("The access token names no valid key."))?;
        Ok((
            parent,
            TokenGrant {
                id: c.jti,
                subject: c.sub,
                scopes: c.scope.map(|s| {
                    s.split(' ')
                        .filter(|w| !w.is_empty())
                        .map(str::to_owned)
                        .collect()
                }),
                collections: c.collections,
                expires_at,
            },
        ))
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("keys", &self.inner.keys)
            .field("default_ttl", &self.inner.default_ttl)
            .field("max_ttl", &self.inner.max_ttl)
            .field("cached", &self.inner.cache.len())
            .finish_non_exhaustive()
    }
}

fn invalid(detail: &'static str) -> Denial {
    Denial::new(DenialCode::InvalidToken).with_detail(detail)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether every collection `pattern` matches is one of `held` may.
fn pattern_within(held: &[String], pattern: &str) -> bool {
    if held.iter().any(|r| r == "*" || r == pattern) {
        return true;
    }
    if !pattern.contains('*') {
        return ResourceSet::compile(held).allows(pattern);
    }
    held.iter().any(|r| {
        r.strip_suffix('*')
            .is_some_and(|p| !p.contains('*') && pattern.starts_with(p))
    })
}

/// Refuses a narrowing beyond the key's grants: one grant must hold each scope on each
/// collection, and each collection must be within some grant.
fn grant_within(
    held: &[Grant],
    scopes: &[String],
    collections: &[String],
) -> Result<(), IssueError> {
    let compiled: Vec<ScopeSet> = held.iter().map(|g| ScopeSet::compile(&g.scopes)).collect();
    for c in collections {
        validate_resource_pattern(c)
            .map_err(|e| IssueError::InvalidRequest(format!("collections: {e}")))?;
        if !held.iter().any(|g| pattern_within(&g.collections, c)) {
            return Err(IssueError::InvalidScope(format!(
                "collection {c:?} is beyond the key's own"
            )));
        }
    }
    for text in scopes {
        let s =
            Scope::parse(text).map_err(|e| IssueError::InvalidRequest(format!("scopes: {e}")))?;
        if !compiled.iter().any(|set| set.allows(&s)) {
            return Err(IssueError::InvalidScope(format!(
                "scope {text:?} is not held by the key"
            )));
        }
        for c in collections {
            let covered = held
                .iter()
                .zip(&compiled)
                .any(|(g, set)| set.allows(&s) && pattern_within(&g.collections, c));
            if !covered {
                return Err(IssueError::InvalidScope(format!(
                    "scope {text:?} on collection {c:?} is not held by the key"
                )));
            }
        }
    }
    Ok(())
}
