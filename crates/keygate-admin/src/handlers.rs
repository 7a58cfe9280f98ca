//! The admin API's handlers.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::StatusCode;
use ipnet::IpNet;
use serde::Serialize;

use crate::error::AdminError;
use crate::input::{self, CreateKey, NoFields, RotateKey};
use crate::{Shared, UsageSource};
use keygate::client_ip::{peer_addr, ClientIp};
use keygate::core::usage::{UsageRecord, Window};
use keygate::reject::{DefaultRenderer, RenderContext, Renderer};
use keygate::{
    resolution, Denial, DenialCode, KeyId, KeyInfo, KeyRecord, Principal, QuotaPolicy, QuotaWindow,
    RateLimitPolicy,
};
use keygate::{
    validate_resource_pattern, Expiry, Grant, KeySpec, Refill, ResourceSet, Role, Scope, ScopeSet,
};
use keygate::{KeyStatus, StoreError};

type St = State<Arc<Shared>>;
type IdPath = Result<Path<String>, PathRejection>;

/// The largest request body read (a key's metadata is at most 64 KiB).
const MAX_BODY: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------
// Who is calling
// ---------------------------------------------------------------------------------------

/// The caller, if it may call from where it calls and holds the required scope; otherwise
/// the rendered denial (401 for credential problems, 403 `ip_not_allowed`, 403
/// `insufficient_scope`). Fails closed: no principal and no hub to resolve one is
/// `missing_key`.
pub(crate) async fn caller(
    shared: &Shared,
    parts: Parts,
    minting: bool,
) -> (Parts, Result<Principal, Response>) {
    let mut req = http::Request::from_parts(parts, ());
    let verdict = match &shared.gate {
        Some(gate) => gate.resolve(&mut req).await,
        None => match resolution(req.extensions()) {
            Some(Ok(p)) => Ok(p.clone()),
            Some(Err(d)) => Err(d.clone()),
            None => Err(Denial::new(DenialCode::MissingKey)),
        },
    };
    let verdict = verdict.and_then(|p| {
        from_allowed_address(shared, &mut req, &p)?;
        Ok(p)
    });
    let result = match verdict {
        Ok(p) if p.has_scope(&shared.scope) => Ok(p),
        // Delegated minting: `POST /keys` also takes a key that may mint.
        Ok(p) if minting && may_mint(&p) => Ok(p),
        Ok(_) => Err(render(
            shared,
            &req,
            Denial::new(DenialCode::InsufficientScope)
                .with_required_scope(shared.scope.to_string()),
        )),
        Err(d) => Err(render(shared, &req, d)),
    };
    (req.into_parts().0, result)
}

/// The client address: through the hub (an earlier layer's [`ClientIp`], else the peer
/// through trusted proxies, memoized), or without a hub an earlier layer's [`ClientIp`],
/// else the connection's peer (forwarded headers are not believed).
pub(crate) fn client_addr(shared: &Shared, req: &mut http::Request<()>) -> Option<IpAddr> {
    match &shared.gate {
        Some(gate) => gate.client_ip(req),
        None => match req.extensions().get::<ClientIp>() {
            Some(ClientIp(ip)) => Some(*ip),
            None => peer_addr(req),
        },
    }
}

/// Enforces the caller's own allowlist (whether or not an `IpAllowLayer` is in front):
/// a key with a non-empty `allowed_ips` is refused (`ip_not_allowed`) from any other
/// address, and when the address is unknown.
fn from_allowed_address(
    shared: &Shared,
    req: &mut http::Request<()>,
    caller: &Principal,
) -> Result<(), Denial> {
    let own = caller.allowed_ips();
    if own.is_empty() {
        return Ok(());
    }
    let not_allowed =
        |detail: &'static str| Denial::new(DenialCode::IpNotAllowed).with_detail(detail);
    let ip =
        client_addr(shared, req).ok_or_else(|| not_allowed("The client address is unknown."))?;
    if own.iter().any(|n| n.contains(&ip)) {
        Ok(())
    } else {
        Err(not_allowed(
            "This API key may not be used from this address.",
        ))
    }
}

fn render(shared: &Shared, req: &http::Request<()>, denial: Denial) -> Response {
    let cx = RenderContext::of(req);
    let res = match &shared.gate {
        Some(g) => g.renderer().render(&denial, &cx),
        None => DefaultRenderer::default().render(&denial, &cx),
    };
    let mut res = res.map(Body::from);
    res.extensions_mut().insert(denial);
    res
}

fn actor(p: &Principal) -> String {
    format!("key:{}", p.key_id())
}

/// Whether `p` may mint keys without the admin scope: it holds `keys:create` and a role
/// that sets a minting ceiling.
fn may_mint(p: &Principal) -> bool {
    p.mint_ceiling().is_some()
        && keygate::Scope::parse("keys:create").is_ok_and(|s| p.has_scope(&s))
}

/// Splits the request, checks the caller, reads the body (bounded).
async fn begin(shared: &Shared, req: Request) -> Result<(Parts, Principal, Bytes), Response> {
    begin_as(shared, req, false).await
}

/// [`begin`], also taking a key that may mint when `minting`.
async fn begin_as(
    shared: &Shared,
    req: Request,
    minting: bool,
) -> Result<(Parts, Principal, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let (parts, who) = caller(shared, parts, minting).await;
    let who = who?;
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {MAX_BODY} bytes or could not be read"),
        )
        .into_response()
    })?;
    Ok((parts, who, bytes))
}

fn key_id(path: IdPath) -> Result<KeyId, AdminError> {
    let Path(text) =
        path.map_err(|_| AdminError::invalid("the key id in the path is not valid"))?;
    KeyId::parse(&text).map_err(|_| {
        AdminError::invalid(format!(
            "{:?} is not a key id (12 letters and digits)",
            input::clip(&text)
        ))
    })
}

// ---------------------------------------------------------------------------------------
// Escalation and tenants
// ---------------------------------------------------------------------------------------

/// Whether every collection `pattern` matches is one of `held` may: exactly when `held`
/// has `*` or the same pattern, the pattern is a plain name `held` matches, or `held` has
/// `P*` (one trailing star) and the pattern starts with `P`.
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

/// Refuses a grant (`scopes` on `collections`) beyond the caller's: one of the caller's
/// grants must hold each scope on each collection (a scope the caller holds only on other
/// collections does not count), and without scopes each collection must be one a caller's
/// grant reaches.
fn grant_within(
    held: &[Grant],
    scopes: &[String],
    collections: &[String],
    what: &str,
) -> Result<(), AdminError> {
    let compiled: Vec<ScopeSet> = held.iter().map(|g| ScopeSet::compile(&g.scopes)).collect();
    for c in collections {
        validate_resource_pattern(c)
            .map_err(|e| AdminError::invalid(format!("collections: {e}")))?;
        if !held.iter().any(|g| pattern_within(&g.collections, c)) {
            return Err(AdminError::escalation(format!(
                "{what} collections {:?}, beyond the calling key's own",
                input::clip(c)
            )));
        }
    }
    for text in scopes {
        let s = Scope::parse(text).map_err(|e| AdminError::invalid(format!("scopes: {e}")))?;
        if !compiled.iter().any(|set| set.allows(&s)) {
            return Err(AdminError::escalation(format!(
                "{what} scope {:?}, which the calling key does not hold",
                input::clip(text)
            )));
        }
        for c in collections {
            let covered = held
                .iter()
                .zip(&compiled)
                .any(|(g, set)| set.allows(&s) && pattern_within(&g.collections, c));
            if !covered {
                return Err(AdminError::escalation(format!(
                    "{what} scope {:?} on collections {:?}, which the calling key holds only \
                     on other collections",
                    input::clip(text),
                    input::clip(c)
                )));
            }
        }
    }
    Ok(())
}

/// Refuses grants beyond the caller's own.
fn check_grants(
    caller: &Principal,
    scopes: &[String],
    collections: &[String],
    what: &str,
) -> Result<(), AdminError> {
    grant_within(&caller.grants(), scopes, collections, what)
}

/// Every grant a record gives its key: its own scopes × collections, its extra grants, and
/// those of the roles it names (`roles`: the stored roles; unknown names grant nothing).
fn record_grants(record: &KeyRecord, roles: &[Role]) -> Vec<Grant> {
    let mut out = vec![Grant {
        scopes: record.scopes.clone(),
        collections: record.resources.clone(),
    }];
    out.extend(record.grants.iter().cloned());
    for name in &record.roles {
        if let Some(r) = roles.iter().find(|r| &r.name == name) {
            out.extend(r.grants.iter().cloned());
        }
    }
    out
}

/// Refuses grants (a record's, or a role's) beyond the caller's own.
fn grants_within(caller: &Principal, grants: &[Grant], what: &str) -> Result<(), AdminError> {
    let held = caller.grants();
    for g in grants {
        grant_within(&held, &g.scopes, &g.collections, what)?;
    }
    Ok(())
}

/// The stored roles (none from a store without roles).
async fn all_roles(shared: &Shared) -> Result<Vec<Role>, AdminError> {
    match shared.keys.list_roles().await {
        Ok(r) => Ok(r),
        Err(keygate::LifecycleError::Store(StoreError::Unsupported(_))) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn same_tenant(caller: &Principal, record: &KeyRecord) -> bool {
    caller
        .tenant()
        .is_none_or(|t| record.attributes.get("tenant").map(String::as_str) == Some(t))
}

/// Whether the caller may see and manage `record`: of its tenant (for a tenant admin),
/// holding no scope or collection the caller lacks, and no less restricted than the caller
/// (expiry, allowlist, rate limits, quotas).
fn within_caller(caller: &Principal, record: &KeyRecord, roles: &[Role]) -> bool {
    same_tenant(caller, record)
        && grants_within(caller, &record_grants(record, roles), "the key holds").is_ok()
        && check_restrictions(caller, record).is_ok()
        && limits_within(caller, &record.rate_limits, &record.quotas)
}

/// The key `id`, if the caller may see it ([`within_caller`]); any other reads as
/// `key_not_found`, so an admin cannot learn of keys beyond its own authority.
async fn visible(shared: &Shared, caller: &Principal, id: KeyId) -> Result<KeyRecord, AdminError> {
    let record = shared.keys.show(id).await?;
    let roles = if record.roles.is_empty() {
        Vec::new()
    } else {
        shared
            .keys
            .store()
            .roles(&record.roles)
            .await
            .map_err(|e| AdminError::store(&e))?
    };
    if !within_caller(caller, &record, &roles) {
        return Err(AdminError::not_found(id.as_str()));
    }
    Ok(record)
}

/// Whether rate limit `q` never lets more through than `p`: no larger burst, no higher
/// sustained rate.
fn rate_within(q: &RateLimitPolicy, p: &RateLimitPolicy) -> bool {
    q.limit <= p.limit
        && u128::from(q.limit) * p.period.as_nanos() <= u128::from(p.limit) * q.period.as_nanos()
}

/// How long a quota window is, for comparing: a longer window contains every shorter one
/// (all are aligned to UTC midnight), credits that never refill last for ever.
fn window_rank(w: QuotaWindow) -> u8 {
    match w {
        QuotaWindow::Hour => 1,
        QuotaWindow::Day | QuotaWindow::Credits(Refill::Daily) => 2,
        QuotaWindow::Month | QuotaWindow::Credits(Refill::Monthly { .. }) => 3,
        QuotaWindow::Credits(Refill::Never) => 4,
    }
}

/// Whether quota `q` never allows more than `p` in any of `p`'s windows: no larger limit,
/// over the same window or a longer one.
fn quota_within(q: &QuotaPolicy, p: &QuotaPolicy) -> bool {
    q.limit <= p.limit && (q.window == p.window || window_rank(q.window) > window_rank(p.window))
}

/// Whether a key with these limits is metered at least as tightly as the caller: each of
/// the caller's rate limits and quotas is matched by one of the key's that is no looser
/// (a key without limits is looser than any limit).
fn limits_within(caller: &Principal, rates: &[RateLimitPolicy], quotas: &[QuotaPolicy]) -> bool {
    caller
        .rate_limits()
        .iter()
        .all(|p| rates.iter().any(|q| rate_within(q, p)))
        && caller
            .quotas()
            .iter()
            .all(|p| quotas.iter().any(|q| quota_within(q, p)))
}

/// Bounds a new key's limits by the caller's: a key asked without rate limits (quotas)
/// gets the caller's; one asked with limits looser than the caller's is refused.
fn bound_limits(caller: &Principal, spec: &mut KeySpec) -> Result<(), AdminError> {
    if spec.rate_limits.is_empty() {
        spec.rate_limits = caller.rate_limits().to_vec();
    }
    if spec.quotas.is_empty() {
        spec.quotas = caller.quotas().to_vec();
    }
    if !limits_within(caller, &spec.rate_limits, &spec.quotas) {
        return Err(AdminError::escalation(
            "cannot grant rate limits or quotas looser than the calling key's own",
        ));
    }
    Ok(())
}

/// Whether every network of `nets` lies inside one of `within` (an empty `nets`, meaning
/// anywhere, does not).
fn networks_within(nets: &[IpNet], within: &[IpNet]) -> bool {
    !nets.is_empty() && nets.iter().all(|n| within.iter().any(|w| w.contains(n)))
}

/// Bounds a new key by the caller's expiry and allowlist: when unspecified they default to
/// the caller's; a later expiry (or none) or a network outside the caller's is refused.
/// A relative expiry is made absolute with `now` so the bound holds exactly.
fn bound_restrictions(
    caller: &Principal,
    spec: &mut KeySpec,
    now: SystemTime,
) -> Result<(), AdminError> {
    if let Some(limit) = caller.expires_at() {
        let at = match spec.expires {
            None => limit,
            Some(Expiry::At(t)) => t,
            Some(Expiry::In(d)) => now
                .checked_add(d)
                .ok_or_else(|| AdminError::invalid("expires_in: too far in the future"))?,
        };
        if at > limit {
            return Err(AdminError::escalation(
                "cannot grant an expiry later than the calling key's own",
            ));
        }
        spec.expires = Some(Expiry::At(at));
    }
    let own = caller.allowed_ips();
    if !own.is_empty() {
        if spec.allowed_ips.is_empty() {
            spec.allowed_ips = own.to_vec();
        } else if !networks_within(&spec.allowed_ips, own) {
            return Err(AdminError::escalation(
                "cannot grant allowed_ips outside the calling key's own networks",
            ));
        }
    }
    Ok(())
}

/// Refuses managing a key less restricted than the caller in expiry or allowlist.
fn check_restrictions(caller: &Principal, record: &KeyRecord) -> Result<(), AdminError> {
    if let Some(limit) = caller.expires_at() {
        if record.expires_at.is_none_or(|e| e > limit) {
            return Err(AdminError::escalation(
                "the key expires later than the calling key (or never)",
            ));
        }
    }
    let own = caller.allowed_ips();
    if !own.is_empty() && !networks_within(&record.allowed_ips, own) {
        return Err(AdminError::escalation(
            "the key may be used from addresses outside the calling key's own networks",
        ));
    }
    Ok(())
}

/// The authority check of a rotation or status change, run inside the key manager's
/// conditional write on exactly the version it overwrites.
fn may_act_on(caller: &Principal, record: &KeyRecord, roles: &[Role]) -> Result<(), String> {
    if within_caller(caller, record, roles) {
        Ok(())
    } else {
        Err("the key is beyond the calling key's authority".into())
    }
}

/// The key `id`, if the caller may manage it: exactly the keys it may see.
async fn manageable(
    shared: &Shared,
    caller: &Principal,
    id: KeyId,
) -> Result<KeyRecord, AdminError> {
    visible(shared, caller, id).await
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut res = Response::new(Body::from(body));
            *res.status_mut() = status;
            let h = res.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(_) => AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the answer could not be encoded",
        )
        .into_response(),
    }
}

/// A key and its plaintext, shown once.
#[derive(Serialize)]
struct WithKey<'a> {
    key: &'a str,
    #[serde(flatten)]
    info: KeyInfo,
}

/// A new key, its plaintext (shown once), and what looks wrong with it.
#[derive(Serialize)]
struct Issued<'a> {
    #[serde(flatten)]
    key: WithKey<'a>,
    /// Why the key may not work as meant (it can reach no route, its scopes were not
    /// checked); empty when nothing looks wrong.
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct KeyList {
    keys: Vec<KeyInfo>,
}

fn done(result: Result<Response, AdminError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

/// The rules of a key minted by a key (delegated minting) rather than by an admin: for the
/// minter's own identity, living at most its ceiling (the ceiling when the body names no
/// expiry), and unable to mint or administer in turn. The grants are then checked as for
/// any caller (a subset of the minter's own).
fn delegated(
    s: &Shared,
    minter: &Principal,
    spec: &mut KeySpec,
    roles: &[Role],
) -> Result<(), AdminError> {
    let ceiling = minter.mint_ceiling().unwrap_or(Duration::ZERO);
    let Some(own) = minter.identity() else {
        return Err(AdminError::new(
            StatusCode::FORBIDDEN,
            "identity_forbidden",
            "a key without an identity cannot mint keys",
        ));
    };
    match spec.identity.as_deref() {
        None => spec.identity = Some(own.to_owned()),
        Some(i) if i == own => {}
        Some(_) => {
            return Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "identity_forbidden",
                "a key mints keys for its own identity only",
            ))
        }
    }
    let now = s.clock.now();
    let lifetime = match spec.expires {
        None => {
            spec.expires = Some(keygate::Expiry::In(ceiling));
            ceiling
        }
        Some(keygate::Expiry::In(d)) => d,
        Some(keygate::Expiry::At(t)) => t.duration_since(now).unwrap_or(Duration::ZERO),
    };
    if lifetime > ceiling {
        return Err(AdminError::new(
            StatusCode::FORBIDDEN,
            "mint_ceiling_exceeded",
            format!(
                "a key minted by this key lives at most {}s (its role's ceiling)",
                ceiling.as_secs()
            ),
        ));
    }
    let admin_scopes = [
        s.scope.clone(),
        keygate::Scope::parse("keys:create").map_err(|_| AdminError::invalid("keys:create"))?,
    ];
    let mut all: Vec<String> = spec.scopes.clone();
    all.extend(spec.grants.iter().flat_map(|g| g.scopes.iter().cloned()));
    all.extend(
        roles
            .iter()
            .flat_map(|r| r.grants.iter().flat_map(|g| g.scopes.iter().cloned())),
    );
    let set = keygate::ScopeSet::compile(&all);
    if admin_scopes.iter().any(|a| set.allows(a))
        || roles.iter().any(|r| r.mint_max_lifetime_secs.is_some())
    {
        return Err(AdminError::escalation(
            "a minted key cannot mint or administer keys in turn",
        ));
    }
    Ok(())
}

pub(crate) async fn create(State(s): St, req: Request) -> Response {
    let (_, who, body) = match begin_as(&s, req, true).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let body: CreateKey = input::json_required(&body)?;
            let allow_unknown = body.allow_unknown_scopes;
            let mut spec = body.into_spec()?;
            if !who.has_scope(&s.scope) {
                let roles = if spec.roles.is_empty() {
                    Vec::new()
                } else {
                    s.keys
                        .store()
                        .roles(&spec.roles)
                        .await
                        .map_err(|e| AdminError::store(&e))?
                };
                delegated(&s, &who, &mut spec, &roles)?;
            }
            let warnings = vocabulary_check(&s, &spec, allow_unknown)?;
            check_grants(&who, &spec.scopes, &spec.resources, "cannot grant")?;
            grants_within(&who, &spec.grants, "cannot grant")?;
            if !spec.roles.is_empty() {
                let roles = s
                    .keys
                    .store()
                    .roles(&spec.roles)
                    .await
                    .map_err(|e| AdminError::store(&e))?;
                for r in &roles {
                    grants_within(&who, &r.grants, &format!("role {:?} would grant", r.name))?;
                }
            }
            bound_restrictions(&who, &mut spec, s.clock.now())?;
            bound_limits(&who, &mut spec)?;
            if let Some(t) = who.tenant() {
                match spec.attributes.get("tenant") {
                    None => {
                        spec.attributes.insert("tenant".into(), t.to_owned());
                    }
                    Some(v) if v == t => {}
                    Some(_) => {
                        return Err(AdminError::escalation(
                            "a tenant admin issues keys of its own tenant only",
                        ))
                    }
                }
            }
            let issued = s.keys.issue(&actor(&who), spec).await?;
            Ok(json(
                StatusCode::CREATED,
                &Issued {
                    key: WithKey {
                        key: issued.key.expose_secret(),
                        info: issued.record.info(),
                    },
                    warnings,
                },
            ))
        }
        .await,
    )
}

/// Checks the new key's scopes against the vocabulary (400 `unknown_scope` for one that is
/// not in it, unless `allow_unknown`), and returns the warnings for the answer: the scopes
/// could not be checked (no vocabulary), unknown scopes granted on purpose, a key that can
/// reach no route.
fn vocabulary_check(
    shared: &Shared,
    spec: &KeySpec,
    allow_unknown: bool,
) -> Result<Vec<String>, AdminError> {
    let vocabulary = &shared.vocabulary;
    let mut warnings = Vec::new();
    if vocabulary.is_empty() {
        if !spec.scopes.is_empty() {
            warnings.push(
                "no scope vocabulary is registered: the scopes were not checked against the \
                 server's routes"
                    .to_owned(),
            );
        }
        return Ok(warnings);
    }
    for scope in &spec.scopes {
        if let Err(e) = vocabulary.check(scope) {
            if !allow_unknown {
                return Err(AdminError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_scope",
                    format!("scopes: {e}; set \"allow_unknown_scopes\": true to grant it anyway"),
                ));
            }
            warnings.push(format!("granted on purpose: {e}"));
        }
    }
    // A key with roles or extra grants may reach routes through them: only a key with its
    // scopes × collections alone is judged.
    if spec.roles.is_empty() && spec.grants.is_empty() {
        if let Some(w) = vocabulary.reach_warning(&spec.scopes, &spec.resources) {
            warnings.push(w);
        }
    }
    Ok(warnings)
}

pub(crate) async fn list(State(s): St, req: Request) -> Response {
    let (parts, who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let filter = input::list_filter(parts.uri.query())?;
            let roles = all_roles(&s).await?;
            let keys = s
                .keys
                .list(&filter)
                .await?
                .iter()
                .filter(|r| within_caller(&who, r, &roles))
                .map(KeyRecord::info)
                .collect();
            Ok(json(StatusCode::OK, &KeyList { keys }))
        }
        .await,
    )
}

pub(crate) async fn show(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let record = visible(&s, &who, key_id(path)?).await?;
            Ok(json(StatusCode::OK, &record.info()))
        }
        .await,
    )
}

pub(crate) async fn rotate(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let id = key_id(path)?;
            let body: RotateKey = input::json_body(&body, true)?;
            let grace = match body.grace {
                Some(g) => input::duration("grace", &g)?,
                None => Duration::ZERO,
            };
            manageable(&s, &who, id).await?;
            let roles = all_roles(&s).await?;
            let issued = s
                .keys
                .rotate_checked(&actor(&who), id, grace, |old| may_act_on(&who, old, &roles))
                .await?;
            Ok(json(
                StatusCode::CREATED,
                &WithKey {
                    key: issued.key.expose_secret(),
                    info: issued.record.info(),
                },
            ))
        }
        .await,
    )
}

#[derive(Clone, Copy)]
enum Switch {
    Revoke,
    Disable,
    Enable,
}

async fn switch(s: Arc<Shared>, path: IdPath, req: Request, to: Switch) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let id = key_id(path)?;
            let _: NoFields = input::json_body(&body, true)?;
            manageable(&s, &who, id).await?;
            let roles = all_roles(&s).await?;
            let status = match to {
                Switch::Revoke => KeyStatus::Revoked,
                Switch::Disable => KeyStatus::Disabled,
                Switch::Enable => KeyStatus::Active,
            };
            let record = s
                .keys
                .set_status_checked(&actor(&who), id, status, |old| {
                    may_act_on(&who, old, &roles)
                })
                .await?;
            Ok(json(StatusCode::OK, &record.info()))
        }
        .await,
    )
}

pub(crate) async fn revoke(State(s): St, path: IdPath, req: Request) -> Response {
    switch(s, path, req, Switch::Revoke).await
}

pub(crate) async fn disable(State(s): St, path: IdPath, req: Request) -> Response {
    switch(s, path, req, Switch::Disable).await
}

pub(crate) async fn enable(State(s): St, path: IdPath, req: Request) -> Response {
    switch(s, path, req, Switch::Enable).await
}

// ---------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------

fn rfc3339(t: SystemTime) -> String {
    keygate::core::time::rfc3339_millis(t).to_string()
}

#[derive(Serialize)]
struct WindowUsage {
    window: QuotaWindow,
    start: String,
    end: Option<String>,
    cost: u64,
    requests: u64,
}

#[derive(Serialize)]
struct QuotaUsage {
    name: String,
    window: QuotaWindow,
    limit: u64,
    used: u64,
    remaining: u64,
    resets_at: Option<String>,
}

#[derive(Serialize)]
struct UsageReport {
    key_id: KeyId,
    from: String,
    to: String,
    /// Every counted window starting in `[from, to)`.
    windows: Vec<WindowUsage>,
    /// The key's quotas in their current windows.
    quotas: Vec<QuotaUsage>,
}

pub(crate) async fn usage(State(s): St, path: IdPath, req: Request) -> Response {
    let (parts, who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let id = key_id(path)?;
            let now = s.clock.now();
            let (from, to) = input::usage_range(parts.uri.query(), now)?;
            let Some(source) = &s.usage else {
                return Err(AdminError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "usage_unavailable",
                    "this admin API was built without a usage source",
                ));
            };
            let record = visible(&s, &who, id).await?;
            // Usage is counted per lineage (the first key of a rotation chain).
            let lineage = record.lineage_id();
            let current: Vec<Window> = record
                .quotas
                .iter()
                .map(|q| Window::containing(q.window, now))
                .collect();
            // Read wide enough to include the current windows, then keep what was asked.
            let lo = current.iter().map(|w| w.start).fold(from, SystemTime::min);
            let hi = to.max(now + Duration::from_secs(1));
            let rows: Vec<UsageRecord> = match source {
                UsageSource::Store(store) => store.report(&lineage, lo, hi).await,
                #[cfg(feature = "quota")]
                UsageSource::Quota(handle) => handle.report(&lineage, lo, hi).await,
            }
            .map_err(|e| AdminError::usage(&e))?;
            let quotas = record
                .quotas
                .iter()
                .zip(&current)
                .map(|(q, w)| {
                    let used = rows
                        .iter()
                        .find(|r| r.window == *w)
                        .map_or(0, |r| r.usage.cost);
                    QuotaUsage {
                        name: q.name.clone(),
                        window: q.window,
                        limit: q.limit,
                        used,
                        remaining: q.limit.saturating_sub(used),
                        resets_at: w.end.map(rfc3339),
                    }
                })
                .collect();
            let windows = rows
                .iter()
                .filter(|r| r.window.start >= from && r.window.start < to)
                .map(|r| WindowUsage {
                    window: r.window.kind,
                    start: rfc3339(r.window.start),
                    end: r.window.end.map(rfc3339),
                    cost: r.usage.cost,
                    requests: r.usage.requests,
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                &UsageReport {
                    key_id: id,
                    from: rfc3339(from),
                    to: rfc3339(to),
                    windows,
                    quotas,
                },
            ))
        }
        .await,
    )
}

// ---------------------------------------------------------------------------------------
// Live policy changes, roles and identities
// ---------------------------------------------------------------------------------------

/// Whether the key (as it would be written) stays within the caller; the refusal's detail
/// otherwise. Run inside the key manager's conditional write, so it judges exactly the
/// version that is overwritten.
fn judged(
    caller: &Principal,
    old: &KeyRecord,
    new: &KeyRecord,
    roles: &[Role],
) -> Result<(), String> {
    if !within_caller(caller, old, roles) {
        return Err("the key is beyond the calling key's authority".into());
    }
    if !same_tenant(caller, new) {
        return Err("a tenant admin keeps its keys in its own tenant".into());
    }
    grants_within(caller, &record_grants(new, roles), "cannot grant")
        .map_err(|e| e.detail_text())?;
    check_restrictions(caller, new).map_err(|e| e.detail_text())?;
    if !limits_within(caller, &new.rate_limits, &new.quotas) {
        return Err("cannot grant rate limits or quotas looser than the calling key's own".into());
    }
    Ok(())
}

pub(crate) async fn update(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let id = key_id(path)?;
            let body: input::UpdateKey = input::json_required(&body)?;
            let update = body.into_update()?;
            // Beyond the caller reads as not found, before anything else is said.
            visible(&s, &who, id).await?;
            let roles = all_roles(&s).await?;
            let record = s
                .keys
                .update_checked(&actor(&who), id, update, |old, new| {
                    judged(&who, old, new, &roles)
                })
                .await?;
            Ok(json(StatusCode::OK, &record.info()))
        }
        .await,
    )
}

/// Roles are shared by every tenant: a tenant admin may not manage them.
fn not_tenant_admin(caller: &Principal) -> Result<(), AdminError> {
    if caller.tenant().is_some() {
        return Err(AdminError::escalation(
            "a tenant admin cannot manage roles or identities (they are shared by every tenant)",
        ));
    }
    Ok(())
}

/// Whether the caller holds everything `role` grants and meters no looser than itself.
fn role_within(caller: &Principal, role: &Role, what: &str) -> Result<(), AdminError> {
    grants_within(caller, &role.grants, what)?;
    if !limits_within(caller, &role.rate_limits, &role.quotas) {
        return Err(AdminError::escalation(
            "cannot grant rate limits or quotas looser than the calling key's own",
        ));
    }
    Ok(())
}

fn role_name(path: IdPath) -> Result<String, AdminError> {
    let Path(text) = path.map_err(|_| AdminError::invalid("the name in the path is not valid"))?;
    keygate::validate_name("role", &text).map_err(|e| AdminError::invalid(e.to_string()))?;
    Ok(text)
}

fn role_not_found(name: &str) -> AdminError {
    AdminError::new(
        StatusCode::NOT_FOUND,
        "role_not_found",
        format!("no role named {:?}", input::clip(name)),
    )
}

#[derive(Serialize)]
struct RoleList {
    roles: Vec<Role>,
}

pub(crate) async fn create_role(State(s): St, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let body: input::RoleInput = input::json_required(&body)?;
            let role = body.into_role(s.clock.now())?;
            not_tenant_admin(&who)?;
            role_within(&who, &role, "cannot grant")?;
            let role = s.keys.create_role(&actor(&who), role).await?;
            Ok(json(StatusCode::CREATED, &role))
        }
        .await,
    )
}

pub(crate) async fn list_roles(State(s): St, req: Request) -> Response {
    let (_, who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let roles = all_roles(&s)
                .await?
                .into_iter()
                .filter(|r| grants_within(&who, &r.grants, "").is_ok())
                .collect();
            Ok(json(StatusCode::OK, &RoleList { roles }))
        }
        .await,
    )
}

/// The role `name`, if the caller holds everything it grants (any other reads as not
/// found).
async fn visible_role(shared: &Shared, caller: &Principal, name: &str) -> Result<Role, AdminError> {
    match shared.keys.show_role(name).await {
        Ok(r) if grants_within(caller, &r.grants, "").is_ok() => Ok(r),
        Ok(_) => Err(role_not_found(name)),
        Err(keygate::LifecycleError::Store(StoreError::NoSuchName { .. })) => {
            Err(role_not_found(name))
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn show_role(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let name = role_name(path)?;
            let role = visible_role(&s, &who, &name).await?;
            Ok(json(StatusCode::OK, &role))
        }
        .await,
    )
}

pub(crate) async fn update_role(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let name = role_name(path)?;
            let body: input::RoleUpdateInput = input::json_required(&body)?;
            let update = body.into_update()?;
            visible_role(&s, &who, &name).await?;
            not_tenant_admin(&who)?;
            let role = s
                .keys
                .update_role_checked(&actor(&who), &name, update, |old, new| {
                    grants_within(&who, &old.grants, "the role holds")
                        .and_then(|()| role_within(&who, new, "cannot grant"))
                        .map_err(|e| e.detail_text())
                })
                .await?;
            Ok(json(StatusCode::OK, &role))
        }
        .await,
    )
}

pub(crate) async fn delete_role(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let name = role_name(path)?;
            let _: NoFields = input::json_body(&body, true)?;
            visible_role(&s, &who, &name).await?;
            not_tenant_admin(&who)?;
            let deleted = s
                .keys
                .delete_role_checked(&actor(&who), &name, |old| {
                    // Deleting takes its limits off the keys holding it: only an admin
                    // metered no tighter than the role may.
                    role_within(&who, old, "the role holds").map_err(|e| e.detail_text())
                })
                .await?;
            if !deleted {
                return Err(role_not_found(&name));
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "name": name, "deleted": true }),
            ))
        }
        .await,
    )
}

#[derive(Serialize)]
struct IdentityList {
    identities: Vec<keygate::Identity>,
}

pub(crate) async fn create_identity(State(s): St, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let body: input::IdentityInput = input::json_required(&body)?;
            let identity = body.into_identity(s.clock.now())?;
            not_tenant_admin(&who)?;
            let identity = s.keys.create_identity(&actor(&who), identity).await?;
            Ok(json(StatusCode::CREATED, &identity))
        }
        .await,
    )
}

pub(crate) async fn list_identities(State(s): St, req: Request) -> Response {
    let (_, _who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let identities = s.keys.list_identities().await?;
            Ok(json(StatusCode::OK, &IdentityList { identities }))
        }
        .await,
    )
}

/// Changing or deleting an identity changes the limits its keys share: only an admin
/// metered no tighter than the identity's limits (old and new) may.
fn identity_within(caller: &Principal, identity: &keygate::Identity) -> Result<(), String> {
    if limits_within(caller, &identity.rate_limits, &identity.quotas) {
        Ok(())
    } else {
        Err("the identity's limits are looser than the calling key's own".into())
    }
}

pub(crate) async fn update_identity(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let Path(name) =
                path.map_err(|_| AdminError::invalid("the name in the path is not valid"))?;
            let body: input::IdentityUpdateInput = input::json_required(&body)?;
            let update = body.into_update()?;
            let old = s.keys.show_identity(&name).await?;
            not_tenant_admin(&who)?;
            identity_within(&who, &old).map_err(AdminError::escalation)?;
            let mut proposed = old.clone();
            if let Some(r) = &update.rate_limits {
                proposed.rate_limits = r.clone();
            }
            if let Some(q) = &update.quotas {
                proposed.quotas = q.clone();
            }
            identity_within(&who, &proposed).map_err(AdminError::escalation)?;
            let identity = s.keys.update_identity(&actor(&who), &name, update).await?;
            Ok(json(StatusCode::OK, &identity))
        }
        .await,
    )
}

pub(crate) async fn delete_identity(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, who, body) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let Path(name) =
                path.map_err(|_| AdminError::invalid("the name in the path is not valid"))?;
            let _: NoFields = input::json_body(&body, true)?;
            let old = s.keys.show_identity(&name).await?;
            not_tenant_admin(&who)?;
            identity_within(&who, &old).map_err(AdminError::escalation)?;
            if !s.keys.delete_identity(&actor(&who), &name).await? {
                return Err(AdminError::store(&keygate::StoreError::NoSuchName {
                    kind: "identity",
                    name,
                }));
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "name": name, "deleted": true }),
            ))
        }
        .await,
    )
}

pub(crate) async fn show_identity(State(s): St, path: IdPath, req: Request) -> Response {
    let (_, _who, _) = match begin(&s, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    done(
        async {
            let Path(name) =
                path.map_err(|_| AdminError::invalid("the name in the path is not valid"))?;
            // A missing identity is the store's `NoSuchName`: 404 `identity_not_found`.
            let identity = s.keys.show_identity(&name).await?;
            Ok(json(StatusCode::OK, &identity))
        }
        .await,
    )
}
