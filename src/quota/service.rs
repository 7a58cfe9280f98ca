use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response};
use smallvec::SmallVec;

use super::config::{validate_policy, Shared};
use super::meter::{KeyCounters, PolicyField};
use crate::check::{Caller, Check, Guarded, One, Settle, Step};
use crate::core::usage::{
    violated_limits, write_limit_item, write_policy_item, Admission, FieldSink, Increment, Limit,
    LimitState, Usage, Window,
};
use crate::cost::RequestHead;
use crate::future::{FieldValues, RateLimitFields, ResponseNote};
use crate::traffic::FieldBuf;
use crate::{Denial, DenialCode, KeyId, Principal, QuotaWindow, RequestContext};

/// Middleware that enforces per-key quotas. See [`QuotaLayer`](super::QuotaLayer).
pub type Quota<S> = Guarded<One<QuotaCheck>, S>;

/// Where one quota of the caller stands, as a handler sees it in [`QuotaStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState<'a> {
    /// The policy's name.
    pub name: &'a str,
    /// Its limit per window.
    pub limit: u64,
    /// Its window.
    pub window: QuotaWindow,
    /// What is left after this request.
    pub remaining: u64,
    /// How long until the window resets (`None`: credits that never refill).
    pub reset_after: Option<Duration>,
}

/// The caller's remaining allowance, in the request's context for handlers
/// ([`RequestContext::quota`]) (when the key
/// has quotas and the request passed). Values are as of this request, after counting it.
#[derive(Clone, Debug)]
pub struct QuotaStatus {
    principal: Principal,
    states: SmallVec<[(u64, Option<Duration>); 2]>,
}

impl QuotaStatus {
    /// Every quota of the key, in the record's order.
    pub fn iter(&self) -> impl Iterator<Item = QuotaState<'_>> + '_ {
        self.principal
            .quotas()
            .iter()
            .zip(&self.states)
            .map(|(p, (remaining, reset_after))| QuotaState {
                name: &p.name,
                limit: p.limit,
                window: p.window,
                remaining: *remaining,
                reset_after: *reset_after,
            })
    }

    /// The quota named `name`.
    pub fn get(&self, name: &str) -> Option<QuotaState<'_>> {
        self.iter().find(|s| s.name == name)
    }

    /// The smallest remaining allowance across the key's quotas.
    pub fn remaining(&self) -> Option<u64> {
        self.states.iter().map(|(r, _)| *r).min()
    }
}

/// What [`Quota`] writes on the inner service's response: the `RateLimit-Policy` and
/// `RateLimit` fields of the key's quotas, and, when the request was then refused (a
/// keygate denial, or a 4xx other than 429 from the service: see the
/// [module docs](super)), the refund of what was counted.
pub struct QuotaNote {
    fields: Option<FieldValues>,
    refund: Option<Refund>,
}

struct Refund {
    shared: Arc<Shared>,
    key: KeyId,
    /// The identity's usage id, when some windows are the identity's (those from `split`).
    identity: Option<KeyId>,
    split: usize,
    /// The windows counted in, each as its kind and start: a window is rebuilt from its start
    /// on the rare refund, which keeps the note (moved with every response future around it)
    /// small.
    windows: SmallVec<[(QuotaWindow, SystemTime); 3]>,
    cost: u64,
}

impl QuotaNote {
    fn none() -> Self {
        QuotaNote {
            fields: None,
            refund: None,
        }
    }
}

impl std::fmt::Debug for QuotaNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaNote")
            .field("fields", &self.fields)
            .field("refund", &self.refund.as_ref().map(|r| r.cost))
            .finish()
    }
}

impl ResponseNote for QuotaNote {
    fn apply<B>(self, res: &mut Response<B>) {
        if let Some(r) = self.refund {
            if !r.shared.charge_refused && refused(res) {
                r.run();
            }
        }
        if let Some(fields) = self.fields {
            fields.write(res);
        }
    }

    fn take_ratelimit_fields(&mut self, out: &mut RateLimitFields) {
        if let Some(fields) = self.fields.take() {
            out.push(fields);
        }
    }

    /// Gives back what was counted (whether or not refused requests are charged: the
    /// request was refused by a check before this one).
    fn cancel(self) {
        if let Some(r) = self.refund {
            r.run();
        }
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Whether the request of `res` was refused, so a quota does not charge it:
/// - a keygate layer refused it (a [`Denial`] in the response's extensions, whatever its
///   status: 401, 403, 404, 413, 429, 503);
/// - or the service answered a client error, 4xx, except 429 (the service's own "too many
///   requests" counts: the caller used the service's capacity);
/// - or a gRPC service answered trailers-only (the `grpc-status` in the response head) with
///   the status of a client error: 3 INVALID_ARGUMENT, 5 NOT_FOUND, 6 ALREADY_EXISTS,
///   7 PERMISSION_DENIED, 9 FAILED_PRECONDITION, 11 OUT_OF_RANGE, 12 UNIMPLEMENTED or
///   16 UNAUTHENTICATED. A `grpc-status` sent in trailers, after the body, is not seen: such
///   a call is charged.
///
/// 5xx answers are charged: the service may have done the work before failing.
fn refused<B>(res: &Response<B>) -> bool {
    if res.extensions().get::<Denial>().is_some() {
        return true;
    }
    let status = res.status();
    if status.is_client_error() {
        return status != http::StatusCode::TOO_MANY_REQUESTS;
    }
    if status == http::StatusCode::OK {
        if let Some(code) = res.headers().get(&GRPC_STATUS) {
            return matches!(
                code.as_bytes(),
                b"3" | b"5" | b"6" | b"7" | b"9" | b"11" | b"12" | b"16"
            );
        }
    }
    false
}

impl Refund {
    fn run(self) {
        let usage = Usage {
            cost: self.cost,
            requests: 1,
        };
        let windows: SmallVec<[Window; 3]> = self
            .windows
            .iter()
            .map(|&(kind, start)| Window::containing(kind, start))
            .collect();
        let split = self.split.min(windows.len());
        let meter = &self.shared.meter;
        if !self.shared.strict {
            meter.refund(&meter.keys, self.key, &windows[..split], usage);
            if let Some(id) = self.identity {
                meter.refund(&meter.identities, id, &windows[split..], usage);
            }
            return;
        }
        let decrements: Vec<Increment> = windows
            .iter()
            .enumerate()
            .map(|(i, w)| Increment {
                key: match self.identity {
                    Some(id) if i >= split => id,
                    _ => self.key,
                },
                window: *w,
                usage,
            })
            .collect();
        subtract_in_background(&self.shared, decrements);
    }
}

/// Gives `decrements` back to the store in the background (a flush waits for it, as does a
/// report).
fn subtract_in_background(shared: &Arc<Shared>, decrements: Vec<Increment>) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            let guard = super::config::Refunds::start(shared);
            let shared = shared.clone();
            rt.spawn(async move {
                if let Err(e) = shared.store.subtract(&decrements).await {
                    tracing::warn!(error = %e, "quota refund failed");
                }
                drop(guard);
            });
        }
        Err(_) => tracing::warn!("quota refund skipped: no tokio runtime"),
    }
}

/// A count made in the store that the rest of the decision has not kept yet: given back
/// in the background if dropped armed (the request's future was dropped in between).
struct GiveBack {
    shared: Arc<Shared>,
    decrements: Option<Vec<Increment>>,
}

impl GiveBack {
    /// Keeps the count: the decision went on (and gives back itself when it must).
    fn disarm(mut self) -> Vec<Increment> {
        self.decrements.take().unwrap_or_default()
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if let Some(d) = self.decrements.take() {
            subtract_in_background(&self.shared, d);
        }
    }
}

/// The quota check: the caller's quotas (and the meter) count the request.
#[derive(Clone)]
pub struct QuotaCheck {
    pub(crate) shared: Arc<Shared>,
    /// The clock windows are read from (the layer's: configured, hub's or system).
    pub(crate) clock: Arc<dyn crate::Clock>,
}

impl std::fmt::Debug for QuotaCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaCheck").finish_non_exhaustive()
    }
}

impl Default for QuotaNote {
    fn default() -> Self {
        QuotaNote::none()
    }
}

/// What one request is checked against: its windows (the key's quota windows, deduplicated,
/// then the meter's; then the identity's shared quota windows) and, per policy, the window
/// it counts in.
struct Plan {
    principal: Principal,
    now: SystemTime,
    cost: u64,
    windows: SmallVec<[Window; 3]>,
    limits: SmallVec<[Limit; 3]>,
    /// The identity's usage id, when some quota is shared: `windows[split..]` count for it.
    identity: Option<KeyId>,
    /// Where the identity's windows start (`windows.len()` without them).
    split: usize,
}

impl Check for QuotaCheck {
    type Note = QuotaNote;

    /// Yes: what it counts is given back when a check before it refuses, so a strict
    /// quota's store round trip overlaps a rate limit's (see [`Check::speculative`]).
    fn speculative(&self) -> bool {
        true
    }

    fn check<ReqB>(&self, req: &mut Request<ReqB>, who: Caller<'_>) -> Result<QuotaNote, Denial> {
        // The synchronous form decides only what needs no store round trip.
        let plan = match self.prepare(req, who) {
            Ok(plan) => plan,
            Err(verdict) => return verdict,
        };
        let shared = &self.shared;
        if shared.strict {
            return Err(store_unavailable());
        }
        match count(shared, &plan) {
            Some((verdict, policy)) => finish(shared, plan, verdict, policy, req),
            None => Err(store_unavailable()),
        }
    }

    fn begin<ReqB: Send + 'static>(
        &self,
        req: &mut Request<ReqB>,
        who: Caller<'_>,
    ) -> Step<ReqB, QuotaNote> {
        let plan = match self.prepare(req, who) {
            Ok(plan) => plan,
            Err(verdict) => return Step::Now(verdict),
        };
        let shared = self.shared.clone();
        if shared.strict {
            return Step::Io(Box::pin(async move {
                let counted = strict(&shared, &plan).await;
                // Given back if dropped unsettled (the request went no further).
                let unsettled = Unsettled {
                    admitted: matches!(counted, Ok(Ok(_))),
                    shared: shared.clone(),
                    plan: Some(plan),
                };
                Box::new(move |req: &mut Request<ReqB>, go: bool| {
                    let mut unsettled = unsettled;
                    let Some(plan) = unsettled.plan.take() else {
                        return Err(store_unavailable());
                    };
                    match counted {
                        Ok(verdict) if go => finish(&shared, plan, verdict, None, req),
                        Ok(Ok(_)) => {
                            // An earlier check refused the request while this one counted it.
                            refund_of(&shared, &plan).run();
                            Ok(QuotaNote::none())
                        }
                        Ok(Err(_)) => Ok(QuotaNote::none()),
                        Err(denial) => Err(denial),
                    }
                }) as Settle<ReqB, QuotaNote>
            }));
        }
        if let Some((verdict, policy)) = count(&shared, &plan) {
            return Step::Now(finish(&shared, plan, verdict, policy, req));
        }
        Step::Later(Box::new(move |mut req| {
            Box::pin(async move {
                let verdict = load_then_count(&shared, plan, &mut req).await;
                (req, verdict)
            })
        }))
    }
}

impl QuotaCheck {
    /// What the request is counted against, or the verdict when nothing is to count.
    #[allow(clippy::result_large_err)]
    fn prepare<ReqB>(
        &self,
        req: &Request<ReqB>,
        who: Caller<'_>,
    ) -> Result<Plan, Result<QuotaNote, Denial>> {
        // Quotas are per key: requests without a principal pass unchanged.
        let Ok(principal) = who else {
            return Err(Ok(QuotaNote::none()));
        };
        let shared = &self.shared;
        let quotas = principal.quotas();
        if quotas.is_empty() && shared.meter_window.is_none() {
            return Err(Ok(QuotaNote::none()));
        }
        if let Some(bad) = quotas.iter().find(|q| validate_policy(q).is_err()) {
            // A stored record that bypassed validation: fail closed.
            tracing::warn!(policy = %bad.name, "invalid quota policy on a key record; refusing its requests");
            return Err(Err(Denial::new(DenialCode::QuotaExceeded)
                .with_detail("The key's quota policy is invalid.")));
        }
        let cost = match &shared.cost {
            Some(f) => f(&RequestHead::of(req, Some(principal))),
            None => 1,
        };
        if cost == 0 {
            // Free requests pass uncounted.
            return Err(Ok(QuotaNote::none()));
        }
        Ok(plan(shared, self.clock.now(), principal.clone(), cost))
    }
}

fn plan(shared: &Shared, now: SystemTime, principal: Principal, cost: u64) -> Plan {
    let mut windows: SmallVec<[Window; 3]> = SmallVec::new();
    let mut limits: SmallVec<[Limit; 3]> = SmallVec::new();
    let window_of = |windows: &mut SmallVec<[Window; 3]>, from: usize, kind: QuotaWindow| {
        let w = Window::containing(kind, now);
        match windows[from..].iter().position(|x| *x == w) {
            Some(i) => from + i,
            None => {
                windows.push(w);
                windows.len() - 1
            }
        }
    };
    let quotas = principal.quotas();
    let identity = principal
        .identity_usage_id()
        .filter(|_| (0..quotas.len()).any(|i| principal.quota_is_shared(i)));
    let is_shared = |i: usize| identity.is_some() && principal.quota_is_shared(i);
    for (i, q) in quotas.iter().enumerate() {
        let window = if is_shared(i) {
            // Placed below, after the key's windows.
            usize::MAX
        } else {
            window_of(&mut windows, 0, q.window)
        };
        limits.push(Limit {
            window,
            limit: q.limit,
        });
    }
    if let Some(kind) = shared.meter_window {
        window_of(&mut windows, 0, kind);
    }
    let split = windows.len();
    if identity.is_some() {
        for (i, q) in quotas.iter().enumerate() {
            if is_shared(i) {
                limits[i].window = window_of(&mut windows, split, q.window);
            }
        }
    }
    Plan {
        principal,
        now,
        cost,
        windows,
        limits,
        identity,
        split,
    }
}

/// The outcome of counting: the usage of each window after the request, or the usage and
/// the violated limits.
type Counted = Result<SmallVec<[Usage; 3]>, (SmallVec<[Usage; 3]>, Vec<usize>)>;

/// Batched counting in memory; `None` when a window is not loaded yet. Also yields the
/// key's `RateLimit-Policy` field when headers are on (cached with the counters).
fn count(shared: &Shared, plan: &Plan) -> Option<(Counted, Option<HeaderValue>)> {
    // The key's counters (none needed when every window is the identity's).
    let entry = match plan.split {
        0 => None,
        _ => Some(shared.meter.keys.get(&plan.principal.lineage_id())?),
    };
    let mut c: Option<std::sync::MutexGuard<'_, KeyCounters>> = entry
        .as_ref()
        .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()));
    let mut idx: SmallVec<[usize; 3]> = SmallVec::new();
    if let Some(c) = &c {
        for w in &plan.windows[..plan.split] {
            idx.push(c.find(w)?);
        }
    }
    // The identity's counters, taken while holding the key's (always in this order, from
    // a map of their own), so the request is counted in both or neither.
    let identity_entry = match plan.identity {
        Some(id) => Some(shared.meter.identities.get(&id)?),
        None => None,
    };
    let mut ic = identity_entry
        .as_ref()
        .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()));
    let mut iidx: SmallVec<[usize; 2]> = SmallVec::new();
    if let Some(ic) = &ic {
        for w in &plan.windows[plan.split..] {
            iidx.push(ic.find(w)?);
        }
    }
    let policy = if shared.headers && !plan.principal.quotas().is_empty() {
        match &mut c {
            Some(c) => cached_policy_field(c, plan),
            None => policy_field(plan),
        }
    } else {
        None
    };
    // Pushes, not `collect`: SmallVec's `Extend` costs more than the loop at these sizes.
    let mut usage: SmallVec<[Usage; 3]> = SmallVec::new();
    if let Some(c) = &c {
        for i in &idx {
            usage.push(c.windows[*i].total());
        }
    }
    if let Some(ic) = &ic {
        for i in &iidx {
            usage.push(ic.windows[*i].total());
        }
    }
    let violated = violated_limits(&usage, &plan.limits, plan.cost);
    if !violated.is_empty() {
        return Some((Err((usage, violated)), policy));
    }
    let one = Usage {
        cost: plan.cost,
        requests: 1,
    };
    let (own, theirs) = usage.split_at_mut(idx.len());
    if let Some(c) = &mut c {
        for (i, u) in idx.iter().zip(own.iter_mut()) {
            c.windows[*i].pending = c.windows[*i].pending.plus(one);
            *u = u.plus(one);
        }
        c.touched = true;
    }
    if let Some(ic) = &mut ic {
        for (i, u) in iidx.iter().zip(theirs.iter_mut()) {
            ic.windows[*i].pending = ic.windows[*i].pending.plus(one);
            *u = u.plus(one);
        }
        ic.touched = true;
    }
    Some((Ok(usage), policy))
}

/// The `RateLimit-Policy` field of `plan`: the one cached with the key's counters when it was
/// formatted from the same policies and windows, else formatted now and cached.
fn cached_policy_field(c: &mut KeyCounters, plan: &Plan) -> Option<HeaderValue> {
    let quotas = plan.principal.quotas();
    if let Some(f) = &c.policy_field {
        if f.windows == plan.windows && *f.quotas == *quotas {
            return Some(f.value.clone());
        }
    }
    let value = policy_field(plan)?;
    c.policy_field = Some(PolicyField {
        quotas: quotas.into(),
        windows: plan.windows.clone(),
        value: value.clone(),
    });
    Some(value)
}

async fn load_then_count<B>(
    shared: &Arc<Shared>,
    plan: Plan,
    req: &mut Request<B>,
) -> Result<QuotaNote, Denial> {
    let key = plan.principal.lineage_id();
    let (own, theirs) = plan.windows.split_at(plan.split);
    let meter = &shared.meter;
    for _ in 0..3 {
        if !own.is_empty() {
            let usage = shared.store.load(&key, own).await.map_err(unavailable)?;
            meter.loaded(&meter.keys, key, own, &usage);
        }
        if let Some(id) = plan.identity {
            let usage = shared.store.load(&id, theirs).await.map_err(unavailable)?;
            meter.loaded(&meter.identities, id, theirs, &usage);
        }
        if let Some((verdict, policy)) = count(shared, &plan) {
            return finish(shared, plan, verdict, policy, req);
        }
    }
    Err(store_unavailable())
}

/// The strict count: the store decides (one round trip; two when some quotas are the
/// identity's).
async fn strict(shared: &Arc<Shared>, plan: &Plan) -> Result<Counted, Denial> {
    let key = plan.principal.lineage_id();
    let Some(id) = plan.identity else {
        return Ok(
            match shared
                .store
                .check_and_add(&key, &plan.windows, &plan.limits, plan.cost)
                .await
                .map_err(unavailable)?
            {
                Admission::Admitted(usage) => Ok(usage.into_iter().collect()),
                Admission::Refused { usage, violated } => {
                    Err((usage.into_iter().collect(), violated))
                }
            },
        );
    };
    // Two counts, the key's then the identity's: a store decides one id atomically, so a
    // request the identity refuses has its key's count given back (another request of the
    // same key may see that count in between: errs toward refusing).
    let (own, theirs) = plan.windows.split_at(plan.split);
    let split_limits = |mine: bool| -> (SmallVec<[usize; 3]>, Vec<Limit>) {
        plan.limits
            .iter()
            .enumerate()
            .filter(|(_, l)| (l.window >= plan.split) != mine)
            .map(|(i, l)| {
                let offset = if mine { 0 } else { plan.split };
                (
                    i,
                    Limit {
                        window: l.window - offset,
                        limit: l.limit,
                    },
                )
            })
            .unzip()
    };
    let (own_index, own_limits) = split_limits(true);
    let (their_index, their_limits) = split_limits(false);
    let store = &shared.store;
    let counted_own = if own.is_empty() {
        Admission::Admitted(Vec::new())
    } else {
        store
            .check_and_add(&key, own, &own_limits, plan.cost)
            .await
            .map_err(unavailable)?
    };
    let verdict = match counted_own {
        Admission::Refused { usage, violated } => {
            let mut all: SmallVec<[Usage; 3]> = usage.into_iter().collect();
            all.extend(store.load(&id, theirs).await.map_err(unavailable)?);
            Err((all, violated.iter().map(|v| own_index[*v]).collect()))
        }
        Admission::Admitted(usage) => {
            let mut all: SmallVec<[Usage; 3]> = usage.into_iter().collect();
            let one = Usage {
                cost: plan.cost,
                requests: 1,
            };
            let give_back = || {
                own.iter()
                    .map(|w| Increment {
                        key,
                        window: *w,
                        usage: one,
                    })
                    .collect::<Vec<_>>()
            };
            // The key's count is given back if this future is dropped before the identity
            // answers (the request went no further).
            let pending = GiveBack {
                shared: shared.clone(),
                decrements: Some(give_back()),
            };
            let answer = store
                .check_and_add(&id, theirs, &their_limits, plan.cost)
                .await;
            let give_back = pending.disarm();
            match answer {
                Ok(Admission::Admitted(usage)) => {
                    all.extend(usage);
                    Ok(all)
                }
                Ok(Admission::Refused { usage, violated }) => {
                    if let Err(e) = store.subtract(&give_back).await {
                        tracing::warn!(error = %e, "quota refund failed");
                    }
                    for u in all.iter_mut() {
                        *u = u.minus(one);
                    }
                    all.extend(usage);
                    Err((all, violated.iter().map(|v| their_index[*v]).collect()))
                }
                Err(e) => {
                    if let Err(e) = store.subtract(&give_back).await {
                        tracing::warn!(error = %e, "quota refund failed");
                    }
                    return Err(unavailable(e));
                }
            }
        }
    };
    Ok(verdict)
}

fn unavailable(e: crate::core::usage::UsageError) -> Denial {
    tracing::warn!(error = %e, "usage store unavailable; refusing");
    store_unavailable()
}

/// Turns a count into the note (and the status extension) or the denial. `policy` is the
/// key's `RateLimit-Policy` field when already at hand (formatted here otherwise).
fn finish<B>(
    shared: &Arc<Shared>,
    plan: Plan,
    verdict: Counted,
    policy: Option<HeaderValue>,
    req: &mut Request<B>,
) -> Result<QuotaNote, Denial> {
    let quotas = plan.principal.quotas();
    let standing = |usage: &[Usage], i: usize| {
        let l = plan.limits[i];
        let w = plan.windows[l.window];
        let used = usage.get(l.window).map_or(0, |u| u.cost);
        (l.limit.saturating_sub(used), w.remaining_at(plan.now))
    };
    let usage = match verdict {
        Ok(usage) => usage,
        Err((usage, violated)) => {
            let mut retry: Option<Duration> = Some(Duration::ZERO);
            let states = (0..plan.limits.len())
                .map(|i| {
                    let (remaining, reset_after) = standing(&usage, i);
                    let is_violated = violated.contains(&i);
                    if is_violated {
                        retry = match (retry, reset_after) {
                            (Some(r), Some(w)) if plan.cost <= plan.limits[i].limit => {
                                Some(r.max(w))
                            }
                            _ => None,
                        };
                    }
                    LimitState {
                        name: quotas[i].name.clone(),
                        limit: quotas[i].limit,
                        remaining,
                        reset_after,
                        window: plan.windows[plan.limits[i].window].length(),
                        violated: is_violated,
                    }
                })
                .collect();
            // A cost above a violated quota's whole limit never passes: say so (413), not
            // "used up" (which would read as "wait").
            let oversized = violated
                .iter()
                .filter(|&&i| plan.cost > plan.limits[i].limit)
                .min_by_key(|&&i| plan.limits[i].limit);
            if let Some(&i) = oversized {
                let q = &quotas[i];
                let per = match q.window {
                    QuotaWindow::Credits(crate::Refill::Never) => "in all",
                    _ => "per period",
                };
                return Err(Denial::new(DenialCode::CostExceedsLimit)
                    .with_detail(format!(
                        "This request costs {}; the quota {:?} allows {} {per}. \
                         Send smaller requests.",
                        plan.cost, q.name, q.limit
                    ))
                    .with_limits(states));
            }
            let mut denial = Denial::new(DenialCode::QuotaExceeded).with_limits(states);
            if let Some(wait) = retry {
                denial = denial.with_retry_after(wait);
            }
            return Err(denial);
        }
    };
    if !shared.strict {
        shared.maybe_flush(plan.now);
    }
    let fields = (shared.headers && !quotas.is_empty())
        .then(|| {
            Some(FieldValues::new(
                policy.or_else(|| policy_field(&plan))?,
                limit_field(&plan, &usage),
            ))
        })
        .flatten();
    let status = (shared.status && !quotas.is_empty()).then(|| {
        let mut states = SmallVec::new();
        for i in 0..plan.limits.len() {
            states.push(standing(&usage, i));
        }
        states
    });
    let refund = refund_of(shared, &plan);
    if let Some(states) = status {
        // The plan ends here: its principal moves into the status.
        RequestContext::of_mut(req.extensions_mut()).set_quota(QuotaStatus {
            principal: plan.principal,
            states,
        });
    }
    Ok(QuotaNote {
        fields,
        refund: Some(refund),
    })
}

/// A strict count whose settle has not run: what it admitted is given back if it is
/// dropped so (the request's future was dropped while another check's I/O was in flight).
struct Unsettled {
    admitted: bool,
    shared: Arc<Shared>,
    plan: Option<Plan>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(plan) = self.plan.take() {
            if self.admitted {
                refund_of(&self.shared, &plan).run();
            }
        }
    }
}

/// How to give back what `plan` counted.
fn refund_of(shared: &Arc<Shared>, plan: &Plan) -> Refund {
    let mut windows = SmallVec::new();
    for w in &plan.windows {
        windows.push((w.kind, w.start));
    }
    Refund {
        shared: shared.clone(),
        key: plan.principal.lineage_id(),
        identity: plan.identity,
        split: plan.split,
        windows,
        cost: plan.cost,
    }
}

/// The `RateLimit-Policy` field of the key's quotas: `"name";q=limit;w=secs, ...`.
fn policy_field(plan: &Plan) -> Option<HeaderValue> {
    let quotas = plan.principal.quotas();
    let mut policy = FieldBuf::new();
    for (i, (q, l)) in quotas.iter().zip(&plan.limits).enumerate() {
        if i > 0 {
            policy.push_str(", ");
        }
        write_policy_item(
            &mut policy,
            &q.name,
            q.limit,
            plan.windows[l.window].length(),
        );
    }
    policy.to_header()
}

/// The `RateLimit` field after this request: `"name";r=remaining;t=secs, ...`.
/// Its bytes, checked as a header value when written.
fn limit_field(plan: &Plan, usage: &[Usage]) -> bytes::Bytes {
    let quotas = plan.principal.quotas();
    let mut limit = FieldBuf::new();
    for (i, (q, l)) in quotas.iter().zip(&plan.limits).enumerate() {
        if i > 0 {
            limit.push_str(", ");
        }
        let used = usage.get(l.window).map_or(0, |u| u.cost);
        let reset = plan.windows[l.window].remaining_at(plan.now);
        write_limit_item(&mut limit, &q.name, q.limit.saturating_sub(used), reset);
    }
    limit.to_bytes()
}

/// The usage store could not answer: 503 `store_unavailable`, to be retried in a second
/// (as the verifier and the rate limiter answer).
fn store_unavailable() -> Denial {
    Denial::new(DenialCode::StoreUnavailable).with_retry_after(Duration::from_secs(1))
}
