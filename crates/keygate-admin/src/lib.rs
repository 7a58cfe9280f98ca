//! The admin API: an axum `Router` that manages keys over HTTP, built from a
//! [`KeyManager`] ([`AdminApi`]).
//!
//! | method and path (mounted at `/admin`) | what it does | success |
//! |---|---|---|
//! | `POST /admin/keys` | issues a key; the plaintext is in the answer, once | 201 |
//! | `GET /admin/keys` | lists keys (`?owner=`, `?status=`, `?prefix=`) | 200 |
//! | `GET /admin/keys/{id}` | one key | 200 |
//! | `POST /admin/keys/{id}/rotate` | rotates (`{"grace": "1h"}`, default none); the new plaintext once | 201 |
//! | `POST /admin/keys/{id}/revoke` | revokes, for good | 200 |
//! | `POST /admin/keys/{id}/disable` / `enable` | switches a key off and on | 200 |
//! | `GET /admin/keys/{id}/usage` | quota usage (`?from=`, `?to=`, RFC 3339) | 200 |
//! | `PATCH /admin/keys/{id}` | changes a live key ([`UpdateKey`]: scopes, collections, grants, attributes, networks, limits, quotas, roles, identity, expiry, metadata); holds on the next request | 200 |
//! | `POST /admin/roles` / `GET /admin/roles` | creates ([`RoleInput`]) / lists roles | 201 / 200 |
//! | `GET`, `PATCH`, `DELETE /admin/roles/{name}` | one role; changes it ([`RoleUpdateInput`]) or deletes it, reaching every key holding it on its next request | 200 |
//! | `POST /admin/identities` / `GET /admin/identities` | creates ([`IdentityInput`]) / lists identities | 201 / 200 |
//! | `GET /admin/identities/{name}` | one identity | 200 |
//! | `PATCH /admin/identities/{name}` | changes its metadata or shared limits ([`IdentityUpdateInput`]); its keys follow on their next request | 200 |
//! | `DELETE /admin/identities/{name}` | deletes it; refused (409 `identity_in_use`) while a key that is not revoked names it | 200 |
//!
//! With the feature `tokens`, [`TokenApi`] is a third router: `POST /auth/token` trades an
//! API key for a short-lived signed token, `GET /.well-known/jwks.json` publishes the keys
//! that verify it.
//!
//! The [`leak`] module holds a second router, mounted apart and without an API key: an
//! endpoint for GitHub's secret scanning partner program that revokes (or disables) keys a
//! signed report shows leaked ([`leak::LeakReports`]).
//!
//! The [`console`] module serves a key console in the browser, acting only through this
//! router with the signed-in caller's key.
//!
//! JSON in and out. Keys are shown as [`KeyInfo`](keygate::KeyInfo) (never a digest); issue and
//! rotate answers add `"key"`, the plaintext, shown this once (issue answers also
//! `"warnings"`, see [below](#scope-vocabulary)) (`Cache-Control: no-store` on
//! every answer). Errors are `application/problem+json` with a stable `code`:
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `invalid_json` | the body is not JSON of the expected shape (an unknown field is named with the list of allowed ones) |
//! | 400 | `unknown_scope` | a scope not in the [scope vocabulary](AdminApi::scope_vocabulary), with the closest known one |
//! | 400 | `invalid_request` | a field's value is refused (name, scope, CIDR, policy, duration, id, ...) |
//! | 401 / 403 | keygate's denial codes | no key, a bad key, a key used from outside its `allowed_ips` (`ip_not_allowed`), or a key without `keys:admin` |
//! | 403 | `privilege_escalation` | the key would grant (or manage a key holding or allowed) more than its caller holds or is allowed; a minted key that could mint or administer in turn |
//! | 403 | `mint_ceiling_exceeded` | delegated minting: the key would live longer than the minter's ceiling |
//! | 403 | `identity_forbidden` | delegated minting: a key for another identity, or a minter without an identity |
//! | 404 | `key_not_found` | no such key (or one beyond the caller's authority: another tenant's, more scopes, collections or looser restrictions or limits) |
//! | 404 | `role_not_found`, `identity_not_found` | no such role (or one granting more than the caller holds) or identity |
//! | 409 | `wrong_status` | the key's status forbids it (enable a revoked key, rotate a disabled one) |
//! | 409 | `conflict` | the key (or role) was changed by another request between this one's check and its write: nothing was written; read and retry |
//! | 409 | `name_taken` | a role or identity with this name exists |
//! | 409 | `identity_in_use` | an identity to delete still owns keys that are not revoked |
//! | 501 | `usage_unavailable` | `usage` asked of an API built without a usage source |
//! | 503 | `store_unavailable`, `audit_unavailable` | the key or usage store, or the audit log, is down: nothing changed |
//!
//! # Who may call it
//! Every route needs a caller whose key grants `keys:admin` (configurable with
//! [`AdminApi::required_scope`]). The router checks this itself, from the
//! [`Principal`](keygate::Principal) an earlier keygate layer resolved or, with
//! [`AdminApi::gate`], by resolving the key through the hub: mounted without any keygate
//! layer in front, it still refuses everyone without the scope (fail closed).
//!
//! A caller whose key has its own `allowed_ips` is refused (403 `ip_not_allowed`) from any
//! other address, and when the address is unknown, whether or not an `IpAllowLayer` is in
//! front. The address is the hub's ([`KeyGate::client_ip`]: an earlier layer's
//! [`ClientIp`](keygate::client_ip::ClientIp), else the peer, through trusted proxies); without
//! a hub, an earlier layer's `ClientIp`, else the connection's peer (forwarded headers are
//! then not believed: behind a proxy, use [`AdminApi::gate`] with trusted proxies, or an
//! `IpAllowLayer` in front).
//!
//! It also refuses privilege escalation:
//! - a key may issue only keys whose scopes and collections it holds itself, and may rotate,
//!   revoke, disable or enable only such keys (a `points:*` admin cannot mint or rotate a `*`
//!   key);
//! - a key that expires issues only keys expiring no later (a key asked without an expiry
//!   gets the caller's; a relative `expires_in` is counted from now), and a key with its own
//!   `allowed_ips` issues only keys whose networks each lie inside one of its own (a key
//!   asked without `allowed_ips` gets the caller's list);
//! - likewise it may rotate, revoke, disable or enable only keys no less restricted than
//!   itself: when the caller expires, the key must expire no later; when the caller has
//!   `allowed_ips`, the key's must be a non-empty list inside them. So a key limited to
//!   `10.0.0.0/8` until tomorrow cannot obtain (by issuing or rotating) a key that works
//!   from anywhere or for longer;
//! - a key with a `tenant` attribute is a tenant admin: it sees and manages only keys of its
//!   tenant (others read as `key_not_found`), and the keys it issues carry its tenant.
//!
//! - a key sees and manages only keys within its own authority: their scopes and
//!   collections are ones it holds, and they are no less restricted than itself (expiry,
//!   allowlist, rate limits, quotas). Any other key, the `*` admin's included, reads as
//!   `key_not_found` in `GET /keys/{id}`, `usage` and every change, and is left out of
//!   `GET /keys`;
//! - a key with rate limits or quotas issues only keys metered at least as tightly: each of
//!   its limits must be matched by one of the new key's that is no looser (a rate limit with
//!   no larger burst and no higher rate; a quota with no larger limit over the same window
//!   or a longer one: hour < day < month < credits that never refill). A key asked without
//!   rate limits (quotas) gets the caller's; a key without any limit is looser than every
//!   limit.
//!
//! # Scope vocabulary
//! With [`AdminApi::scope_vocabulary`] (the scopes of the server's route table), a new
//! key's scope that is not in it is refused (400 `unknown_scope`, naming the closest known
//! scope: "did you mean `points:read`?"), unless the body sets `"allow_unknown_scopes":
//! true`. `*` and `family:*` pass when the family is known. The 201 answer of `POST /keys`
//! carries a `warnings` array: the scopes were not checked (no vocabulary), an unknown
//! scope granted on purpose, or a key that can use none of the routes (for example scopes
//! whose routes all need a collection, and no collection).

//! # Grants, roles and identities
//! "Grants only what it holds" is checked per grant: every scope a new or changed key (or
//! role) would hold on a collection must be held by *one* of the caller's grants on that
//! collection, so an admin that writes `docs-*` and only reads `shared` cannot give a key
//! write on `shared`. A key's roles count as its grants: giving a key a role needs
//! authority over everything the role grants. Roles and identities are shared by every
//! tenant, so a tenant admin cannot create, change or delete them; a caller sees (and may
//! change or delete) only roles whose grants it holds, and changes or deletes one only if
//! it meters no looser than the role's own limits.
//!
//! # Delegated minting
//! `POST /keys` also takes a key without `keys:admin` that holds `keys:create` and a role
//! with a minting ceiling ([`keygate::Role::mint_max_lifetime_secs`], `mint_max_lifetime`
//! in [`RoleInput`]): a pipeline mints its own short-lived keys without an admin key or
//! database access (`keygate keys create --as-key`). The minted key belongs to the
//! minter's identity (another is `identity_forbidden`; a minter without an identity mints
//! nothing), lives at most the ceiling (`mint_ceiling_exceeded` beyond it; the ceiling when
//! the body names no expiry), holds only grants the minter holds (`privilege_escalation`,
//! as for any caller) and can neither mint nor administer (no `keys:create`, no
//! `keys:admin`, no role with a ceiling). Every other route still needs `keys:admin`.
//!
//! # Atomic check and write
//! `PATCH /keys/{id}` and `PATCH /roles/{name}` check the caller's authority over the
//! record as read *and* as it would be written inside the key manager's conditional write
//! ([`KeyManager::update_checked`]): the write lands only over the version the check saw,
//! so an admin racing another (or another replica) cannot have its change land on a key it
//! could no longer manage; it gets 409 `conflict` instead.
//!
//! # Limitations
//! Rotate, revoke, disable and enable still check the target key outside the manager's
//! lock (they only ever take access away or copy the key's own grants). A role given to a
//! key is checked as read: a role widened at the same moment by another admin (one who
//! holds the wider grants) is not re-checked.
//!
//! # Audit
//! [`KeyManager`] records every change (issue, rotate, revoke, disable, enable) as a
//! lifecycle event naming the caller as `key:{id}`; mount the router behind an
//! `AuditLayer` (feature `audit`) for one request event per call, reads included.
//! A revocation reaches the manager's verifier at once, so the revoked key fails on the
//! very next request.
//!
//! ```
//! use axum::Router;
//! use keygate_admin::AdminApi;
//! use keygate::core::audit::Auditor;
//! use keygate::{KeyGate, KeyManager, KeySpec, MemoryStore, Verifier};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
//! let keys = KeyManager::for_verifier(gate.verifier(), Auditor::tracing());
//! let admin = keys.issue("setup", KeySpec::new("admin").scope("*").resource("*")).await.unwrap();
//!
//! let app = Router::new().nest("/admin", AdminApi::new(keys).gate(&gate).router());
//! let create = |key: &str| {
//!     http::Request::post("/admin/keys")
//!         .header("authorization", format!("Bearer {key}"))
//!         .body(axum::body::Body::from(r#"{"name":"reader","scopes":["points:read"],"collections":["docs"]}"#))
//!         .unwrap()
//! };
//! let res = app.clone().oneshot(create(admin.key.expose_secret())).await.unwrap();
//! assert_eq!(res.status(), 201);
//!
//! // Without a key the router refuses, even with no auth layer in front of it.
//! let res = app.oneshot(http::Request::get("/admin/keys").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 401);
//! # }
//! ```

pub mod console;
mod error;
mod handlers;
mod input;
pub mod leak;
#[cfg(feature = "tokens")]
mod token;

use std::fmt;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use keygate::core::usage::UsageStore;
use keygate::{Clock, KeyGate, KeyManager, SystemClock};
use keygate::{InvalidScope, Scope, ScopeVocabulary};

pub use input::{
    CreateKey, IdentityInput, IdentityUpdateInput, PolicyInput, RoleInput, RoleUpdateInput,
    RotateKey, UpdateKey,
};
#[cfg(feature = "tokens")]
pub use token::TokenApi;

/// The admin API over a [`KeyManager`]: configure it, then take its [`router`](Self::router)
/// and mount it (`Router::new().nest("/admin", api.router())`). See the
/// [module docs](self) for the routes, answers and who may call them.
#[derive(Clone)]
pub struct AdminApi {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) keys: KeyManager,
    pub(crate) gate: Option<KeyGate>,
    pub(crate) usage: Option<UsageSource>,
    pub(crate) scope: Scope,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) vocabulary: ScopeVocabulary,
}

/// Where usage reports come from.
#[derive(Clone)]
pub(crate) enum UsageSource {
    Store(Arc<dyn UsageStore>),
    #[cfg(feature = "quota")]
    Quota(keygate::quota::QuotaHandle),
}

impl AdminApi {
    /// An admin API over `keys`, requiring `keys:admin`, without usage reports.
    pub fn new(keys: KeyManager) -> Self {
        AdminApi {
            shared: Arc::new(Shared {
                keys,
                gate: None,
                usage: None,
                scope: Scope::parse("keys:admin").expect("a constant, valid scope"),
                clock: Arc::new(SystemClock),
                vocabulary: ScopeVocabulary::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(s) => f(s),
            None => {
                let s = &*self.shared;
                let mut copy = Shared {
                    keys: s.keys.clone(),
                    gate: s.gate.clone(),
                    usage: s.usage.clone(),
                    scope: s.scope.clone(),
                    clock: s.clock.clone(),
                    vocabulary: s.vocabulary.clone(),
                };
                f(&mut copy);
                self.shared = Arc::new(copy);
            }
        }
        self
    }

    /// Resolves callers through `gate` when no earlier layer has (memoized: the key is
    /// verified once per request), renders denials with its renderer, and reads time from
    /// its clock.
    pub fn gate(self, gate: &KeyGate) -> Self {
        let gate = gate.clone();
        self.edit(|s| {
            s.clock = gate.clock().clone();
            s.gate = Some(gate);
        })
    }

    /// The scope every route requires (default `keys:admin`).
    pub fn required_scope(self, scope: &str) -> Result<Self, InvalidScope> {
        let scope = Scope::parse(scope)?;
        Ok(self.edit(|s| s.scope = scope))
    }

    /// Answers `GET /keys/{id}/usage` from this store.
    pub fn usage_store(self, store: Arc<dyn UsageStore>) -> Self {
        self.edit(|s| s.usage = Some(UsageSource::Store(store)))
    }

    /// Answers `GET /keys/{id}/usage` from a quota layer's counters, flushed first so the
    /// report includes every request counted so far.
    #[cfg(feature = "quota")]
    pub fn quota(self, handle: keygate::quota::QuotaHandle) -> Self {
        self.edit(|s| s.usage = Some(UsageSource::Quota(handle)))
    }

    /// Checks new keys' scopes against this vocabulary (build it from the server's route
    /// table: `ScopeVocabulary::new(routes.scopes())`): a scope not in it is refused with
    /// 400 `unknown_scope` and the closest known scope as a suggestion, unless the request
    /// sets `"allow_unknown_scopes": true`. Without one (the default) scopes are not checked
    /// and the answer says so in its `warnings`.
    pub fn scope_vocabulary(self, vocabulary: ScopeVocabulary) -> Self {
        self.edit(|s| s.vocabulary = vocabulary)
    }

    /// Reads time (usage windows, the default report range) from `clock` (default: the
    /// hub's, or the system clock).
    pub fn clock(self, clock: Arc<dyn Clock>) -> Self {
        self.edit(|s| s.clock = clock)
    }

    /// The routes, relative to where they are mounted: `/keys`, `/keys/{id}`,
    /// `/keys/{id}/rotate`, `/keys/{id}/revoke`, `/keys/{id}/disable`, `/keys/{id}/enable`,
    /// `/keys/{id}/usage`. Nest them (`.nest("/admin", api.router())`).
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        Router::new()
            .route("/keys", post(handlers::create).get(handlers::list))
            .route("/keys/{id}", get(handlers::show).patch(handlers::update))
            .route(
                "/roles",
                post(handlers::create_role).get(handlers::list_roles),
            )
            .route(
                "/roles/{name}",
                get(handlers::show_role)
                    .patch(handlers::update_role)
                    .delete(handlers::delete_role),
            )
            .route(
                "/identities",
                post(handlers::create_identity).get(handlers::list_identities),
            )
            .route(
                "/identities/{name}",
                get(handlers::show_identity)
                    .patch(handlers::update_identity)
                    .delete(handlers::delete_identity),
            )
            .route("/keys/{id}/rotate", post(handlers::rotate))
            .route("/keys/{id}/revoke", post(handlers::revoke))
            .route("/keys/{id}/disable", post(handlers::disable))
            .route("/keys/{id}/enable", post(handlers::enable))
            .route("/keys/{id}/usage", get(handlers::usage))
            .with_state(self.shared)
    }
}

impl fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("scope", &self.shared.scope.to_string())
            .field("gate", &self.shared.gate.is_some())
            .field("usage", &self.shared.usage.is_some())
            .field("vocabulary", &self.shared.vocabulary.scopes().len())
            .finish_non_exhaustive()
    }
}
