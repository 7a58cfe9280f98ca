use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use smallvec::SmallVec;

use super::config::{Fallback, Shared};
use super::limiter::{Limiter, Shape, Standing, Subject, Verdict};
use crate::check::{Caller, Check, Guarded, One, Settle, Step};
use crate::core::rate::{RateBackend, RateDecision, RateError, RateSubject};
use crate::core::usage::{write_limit_item, write_policy_item, FieldSink, LimitState};
use crate::cost::RequestHead;
use crate::future::{FieldValues, RateLimitFields, ResponseNote};
use crate::traffic::FieldBuf;
use crate::{client_ip, Denial, DenialCode, Principal, RateLimitPolicy};

/// Middleware that rate-limits requests per key (and per client address without a key). See
/// [`RateLimitLayer`](super::RateLimitLayer).
pub type RateLimit<S> = Guarded<One<RateCheck>, S>;

/// What [`RateLimit`] writes on the inner service's response: the `RateLimit-Policy` and
/// `RateLimit` fields of the request's policies. Nothing is given back when another layer
/// or the service then refuses the request: rate limits protect capacity, and a refused
/// request used it too.
pub struct RateLimitNote {
    fields: Option<FieldValues>,
}

impl RateLimitNote {
    fn none() -> Self {
        RateLimitNote { fields: None }
    }
}

impl Default for RateLimitNote {
    fn default() -> Self {
        Self::none()
    }
}

impl std::fmt::Debug for RateLimitNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitNote")
            .field("fields", &self.fields)
            .finish()
    }
}

impl ResponseNote for RateLimitNote {
    fn apply<B>(self, res: &mut Response<B>) {
        if let Some(fields) = self.fields {
            fields.write(res);
        }
    }

    fn take_ratelimit_fields(&mut self, out: &mut RateLimitFields) {
        if let Some(fields) = self.fields.take() {
            out.push(fields);
        }
    }
}

/// The rate-limit check: the caller's policies (or the configured ones) count the request.
#[derive(Clone)]
pub struct RateCheck {
    pub(crate) shared: Arc<Shared>,
    /// The hub, when the layer has one (client addresses through its proxies).
    pub(crate) gate: Option<crate::KeyGate>,
}

impl std::fmt::Debug for RateCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateCheck").finish_non_exhaustive()
    }
}

/// A limiter, borrowed from the configuration or fetched for a key's own policy.
enum LimRef<'a> {
    Borrowed(&'a Arc<Limiter>),
    Owned(Arc<Limiter>),
}

impl std::ops::Deref for LimRef<'_> {
    type Target = Limiter;
    fn deref(&self) -> &Limiter {
        match self {
            LimRef::Borrowed(l) => l,
            LimRef::Owned(l) => l,
        }
    }
}

/// One policy of the request.
struct Entry<'a> {
    policy: &'a RateLimitPolicy,
    limiter: LimRef<'a>,
    /// An earlier entry of the same shape and subject (same GCRA state): decided once.
    same_as: Option<usize>,
    /// The identity's (counted under its usage id, for all its keys), not the key's.
    shared: bool,
}

/// Who a request's policies count for: the key (or the client address), and the
/// identity for the identity's own policies.
#[derive(Clone, Copy)]
struct Subjects {
    key: Subject,
    identity: Option<Subject>,
}

impl Subjects {
    fn of(principal: Option<&Principal>, key: Subject) -> Subjects {
        Subjects {
            key,
            identity: principal
                .and_then(Principal::identity_usage_id)
                .map(Subject::Key),
        }
    }

    /// The subject of `e`: an identity policy without an identity (never built so) counts
    /// for the key.
    fn of_entry(&self, e: &Entry<'_>) -> Subject {
        match (e.shared, self.identity) {
            (true, Some(id)) => id,
            _ => self.key,
        }
    }
}

/// The policies of a request and where their fields come from.
struct Plan<'a> {
    entries: SmallVec<[Entry<'a>; 2]>,
    /// The precomputed `RateLimit-Policy` field, for configured sets.
    policy_field: Option<&'a HeaderValue>,
}

fn client_address<B>(
    shared: &Shared,
    hub: Option<&crate::KeyGate>,
    req: &mut Request<B>,
) -> Subject {
    let ip = match hub {
        Some(gate) => gate.client_ip(req),
        None => client_ip::settled(req, None),
    };
    Subject::of_addr(ip, shared.ipv6_prefix)
}

impl Check for RateCheck {
    type Note = RateLimitNote;

    fn begin<ReqB: Send + 'static>(
        &self,
        req: &mut Request<ReqB>,
        who: Caller<'_>,
    ) -> Step<ReqB, RateLimitNote> {
        match &self.shared.backend {
            None => Step::Now(self.check(req, who)),
            Some(backend) => {
                let backend = backend.clone();
                begin_remote(self.shared.clone(), self.gate.as_ref(), backend, req, who)
            }
        }
    }

    fn check<ReqB>(
        &self,
        req: &mut Request<ReqB>,
        who: Caller<'_>,
    ) -> Result<RateLimitNote, Denial> {
        let principal = who.ok();
        let subject = match principal {
            Some(p) => Subject::Key(p.lineage_id()),
            None => client_address(&self.shared, self.gate.as_ref(), req),
        };
        let subject = Subjects::of(principal, subject);
        let req = &*req;
        decide_locally(&self.shared, principal, subject, |shared| {
            match &shared.cost {
                Some(f) => f(&RequestHead::of(req, principal)),
                None => 1,
            }
        })
    }
}

/// The in-process decision: the policies' governor limiters count `cost` for `subject`.
fn decide_locally(
    shared: &Shared,
    principal: Option<&Principal>,
    subject: Subjects,
    cost: impl FnOnce(&Shared) -> u64,
) -> Result<RateLimitNote, Denial> {
    let plan = plan(shared, principal)?;
    if plan.entries.is_empty() {
        return Ok(RateLimitNote::none());
    }
    let cost = cost(shared);
    let standings = decide(&plan, subject, cost)?;
    for e in &plan.entries {
        if e.limiter.take_due() {
            e.limiter.housekeeping();
        }
    }
    let fields = shared.headers.then(|| fields(&plan, &standings)).flatten();
    Ok(RateLimitNote { fields })
}

/// The policies a request is decided on (the key's own, or a configured set) and, for a
/// configured set, its precomputed `RateLimit-Policy` field.
fn policies_of<'a>(
    shared: &'a Shared,
    principal: Option<&'a Principal>,
) -> (&'a [RateLimitPolicy], Option<&'a HeaderValue>) {
    let own = principal.map_or(&[][..], Principal::rate_limits);
    if !own.is_empty() {
        return (own, None);
    }
    let set = if principal.is_some() {
        &shared.defaults
    } else {
        &shared.anonymous
    };
    (&set.policies, set.policy_field.as_ref())
}

fn rate_subject(subject: Subject) -> RateSubject {
    match subject {
        Subject::Key(id) => RateSubject::Key(id),
        Subject::V4(a) => RateSubject::Ipv4(a),
        Subject::V6(p) => RateSubject::Ipv6(p),
        Subject::Unknown | Subject::Overflow => RateSubject::Unknown,
    }
}

/// The backend's path: validates the policies, asks the pre-check, then the backend (an
/// async step).
fn begin_remote<ReqB: Send + 'static>(
    shared: Arc<Shared>,
    gate: Option<&crate::KeyGate>,
    backend: Arc<dyn RateBackend>,
    req: &mut Request<ReqB>,
    who: Result<&Principal, &Denial>,
) -> Step<ReqB, RateLimitNote> {
    let principal = who.ok();
    let subject = match principal {
        Some(p) => Subject::Key(p.lineage_id()),
        None => client_address(&shared, gate, req),
    };
    let (policies, _) = policies_of(&shared, principal);
    if policies.is_empty() {
        return Step::Now(Ok(RateLimitNote::none()));
    }
    if let Some(bad) = policies.iter().find(|p| Shape::of(p).is_err()) {
        // A stored record that bypassed validation: fail closed, as in-process.
        tracing::warn!(policy = %bad.name, "invalid rate-limit policy on a key record; refusing its requests");
        return Step::Now(Err(Denial::new(DenialCode::RateLimited)
            .with_detail("The key's rate-limit policy is invalid.")));
    }
    let cost = match &shared.cost {
        Some(f) => f(&RequestHead::of(req, principal)),
        None => 1,
    };
    if cost == 0 && !shared.headers {
        return Step::Now(Ok(RateLimitNote::none()));
    }
    let remote = rate_subject(subject);
    let subjects = Subjects::of(principal, subject);
    // Per policy, when some count for the identity (else one subject for all).
    let each: Option<SmallVec<[RateSubject; 4]>> = match (principal, subjects.identity) {
        // Only the key's own policies can be the identity's (a configured set never is).
        (Some(p), Some(identity)) if !p.rate_limits().is_empty() => Some(
            (0..policies.len())
                .map(|i| {
                    if p.rate_limit_is_shared(i) {
                        rate_subject(identity)
                    } else {
                        remote
                    }
                })
                .collect(),
        ),
        _ => None,
    };
    // Every limit is a u32: a cost beyond it exceeds them all, and the saturated cost the
    // backend sees says so; the denial names the real cost.
    let units = u32::try_from(cost).unwrap_or(u32::MAX);
    let pre = match &each {
        Some(each) => backend.try_local_each(each, policies, units),
        None => backend.try_local(remote, policies, units),
    };
    if let Some(decision) = pre {
        return Step::Now(settle(&shared, principal, cost, decision));
    }
    let principal = principal.cloned();
    // The round trip needs no request: fused with a speculative check after it (a quota on
    // the same store), both go out at once.
    Step::Io(Box::pin(async move {
        let (policies, _) = policies_of(&shared, principal.as_ref());
        let asked = match &each {
            Some(each) => backend.check_each(each, policies, units).await,
            None => backend.check(remote, policies, units).await,
        };
        let verdict = match asked {
            Ok(decision) => settle(&shared, principal.as_ref(), cost, decision),
            Err(RateError::InvalidPolicy { name, reason }) => {
                tracing::warn!(policy = %name, reason, "rate-limit policy refused by the backend; refusing its requests");
                Err(Denial::new(DenialCode::RateLimited)
                    .with_detail("The key's rate-limit policy is invalid."))
            }
            Err(e) => match shared.fallback {
                Fallback::Local => {
                    tracing::debug!(error = %e, "rate-limit backend unavailable; limiting in-process");
                    decide_locally(&shared, principal.as_ref(), subjects, |_| cost)
                }
                Fallback::Deny => {
                    tracing::warn!(error = %e, "rate-limit backend unavailable; refusing");
                    Err(Denial::new(DenialCode::StoreUnavailable)
                        .with_detail("The rate-limit store is unavailable; try again later.")
                        .with_retry_after(Duration::from_secs(1)))
                }
            },
        };
        // Not speculative, so never settled without `go`: what it counted stays
        // counted, as for any request it let through.
        Box::new(move |_: &mut Request<ReqB>, _go: bool| verdict) as Settle<ReqB, RateLimitNote>
    }))
}

/// Turns a backend's decision into the note (fields) or the denial.
fn settle(
    shared: &Shared,
    principal: Option<&Principal>,
    cost: u64,
    decision: RateDecision,
) -> Result<RateLimitNote, Denial> {
    let (policies, policy_field) = policies_of(shared, principal);
    let standings: SmallVec<[Standing; 2]> = decision
        .standings
        .iter()
        .map(|s| Standing {
            remaining: s.remaining,
            reset_after: s.reset_after,
        })
        .collect();
    if standings.len() != policies.len() {
        tracing::warn!("rate-limit backend answered for the wrong number of policies; refusing");
        return Err(Denial::new(DenialCode::StoreUnavailable)
            .with_detail("The rate-limit store is unavailable; try again later.")
            .with_retry_after(Duration::from_secs(1)));
    }
    if !decision.allowed {
        // As in-process: a cost above a limit names only the policies it exceeds.
        let oversized = decision.standings.iter().any(|d| d.wait.is_none());
        let states = policies
            .iter()
            .zip(&standings)
            .zip(&decision.standings)
            .map(|((p, s), d)| {
                let violated = if oversized {
                    d.wait.is_none()
                } else {
                    d.violated()
                };
                state(p, *s, violated)
            })
            .collect();
        return Err(match decision.retry_after() {
            Some(wait) if !oversized => Denial::new(DenialCode::RateLimited)
                .with_retry_after(wait)
                .with_limits(states),
            _ => cost_exceeds_limit(cost, states),
        });
    }
    let fields = shared
        .headers
        .then(|| fields_of(policies, policy_field, &standings))
        .flatten();
    Ok(RateLimitNote { fields })
}

fn plan<'a>(shared: &'a Shared, principal: Option<&'a Principal>) -> Result<Plan<'a>, Denial> {
    let own = principal.map_or(&[][..], Principal::rate_limits);
    if own.is_empty() {
        let set = if principal.is_some() {
            &shared.defaults
        } else {
            &shared.anonymous
        };
        let mut entries = SmallVec::new();
        for (i, (policy, limiter)) in set.entries.iter().enumerate() {
            let same_as = set.entries[..i]
                .iter()
                .position(|(_, l)| Arc::ptr_eq(l, limiter));
            entries.push(Entry {
                policy,
                limiter: LimRef::Borrowed(limiter),
                same_as,
                shared: false,
            });
        }
        return Ok(Plan {
            entries,
            policy_field: set.policy_field.as_ref(),
        });
    }
    let mut entries: SmallVec<[Entry<'a>; 2]> = SmallVec::new();
    let principal_shared = |i: usize| principal.is_some_and(|p| p.rate_limit_is_shared(i));
    for (i, policy) in own.iter().enumerate() {
        let shared_policy = principal_shared(i);
        let shape = match Shape::of(policy) {
            Ok(s) => s,
            Err(e) => {
                // A stored record that bypassed validation: fail closed.
                tracing::warn!(
                    policy = %policy.name,
                    reason = e.reason(),
                    "invalid rate-limit policy on a key record; refusing its requests"
                );
                return Err(Denial::new(DenialCode::RateLimited)
                    .with_detail("The key's rate-limit policy is invalid."));
            }
        };
        let same_as = entries
            .iter()
            .position(|e| e.limiter.shape == shape && e.shared == shared_policy);
        let limiter = match same_as {
            Some(i) => match &entries[i].limiter {
                LimRef::Borrowed(l) => LimRef::Borrowed(l),
                LimRef::Owned(l) => LimRef::Owned(l.clone()),
            },
            None => LimRef::Owned(shared.limiter(shape)),
        };
        entries.push(Entry {
            policy,
            limiter,
            same_as,
            shared: shared_policy,
        });
    }
    Ok(Plan {
        entries,
        policy_field: None,
    })
}

/// Counts `cost` against every policy of `plan`, all or nothing; the standing of each entry.
fn decide(
    plan: &Plan<'_>,
    subject: Subjects,
    cost: u64,
) -> Result<SmallVec<[Standing; 2]>, Denial> {
    let entries = &plan.entries;
    let mut standings: SmallVec<[Standing; 2]> = SmallVec::new();
    let over = |e: &Entry<'_>| cost > u64::from(e.policy.limit);
    if entries.iter().any(over) {
        let states = entries
            .iter()
            .map(|e| {
                let (standing, _) = e.limiter.peek(subject.of_entry(e), 1);
                state(e.policy, standing, over(e))
            })
            .collect();
        return Err(cost_exceeds_limit(cost, states));
    }
    // Within every limit, so within u32 (limits are u32).
    let cost = u32::try_from(cost).unwrap_or(u32::MAX);
    let Some(n) = NonZeroU32::new(cost) else {
        // Free requests pass without being counted.
        for e in entries {
            standings.push(e.limiter.peek(subject.of_entry(e), 1).0);
        }
        return Ok(standings);
    };
    for (i, e) in entries.iter().enumerate() {
        if let Some(j) = e.same_as {
            let s = standings[j];
            standings.push(s);
            continue;
        }
        match e.limiter.check(subject.of_entry(e), n) {
            Verdict::Allowed(s) => standings.push(s),
            Verdict::Denied(wait) => {
                // Give back what the earlier policies counted, then report every policy.
                for earlier in entries[..i].iter().filter(|e| e.same_as.is_none()) {
                    earlier.limiter.refund(subject.of_entry(earlier), cost);
                }
                return Err(denied(entries, subject, cost, i, wait));
            }
        }
    }
    Ok(standings)
}

/// The refusal of a request whose cost is above a policy's limit (its burst): it can never
/// pass, so it is `cost_exceeds_limit` (413), without `Retry-After`, naming the smallest
/// policy it exceeds in the detail and every policy in the fields.
fn cost_exceeds_limit(cost: u64, states: Vec<LimitState>) -> Denial {
    let detail = match states.iter().filter(|s| s.violated).min_by_key(|s| s.limit) {
        Some(s) => format!(
            "This request costs {cost}; the rate limit {:?} allows at most {} at once. \
             Send smaller requests.",
            s.name, s.limit
        ),
        None => format!("This request costs {cost}, more than the rate limit allows at once."),
    };
    Denial::new(DenialCode::CostExceedsLimit)
        .with_detail(detail)
        .with_limits(states)
}

fn denied(
    entries: &[Entry<'_>],
    subject: Subjects,
    cost: u32,
    first: usize,
    wait: Duration,
) -> Denial {
    let mut retry = wait;
    let mut states = Vec::with_capacity(entries.len());
    for (k, e) in entries.iter().enumerate() {
        let (standing, would_wait) = e.limiter.peek(subject.of_entry(e), cost);
        let violated = k == first || !would_wait.is_zero() || e.same_as == Some(first);
        if violated && k != first {
            retry = retry.max(would_wait);
        }
        states.push(state(e.policy, standing, violated));
    }
    Denial::new(DenialCode::RateLimited)
        .with_retry_after(retry)
        .with_limits(states)
}

fn state(policy: &RateLimitPolicy, standing: Standing, violated: bool) -> LimitState {
    LimitState {
        name: policy.name.clone(),
        limit: u64::from(policy.limit),
        remaining: standing.remaining,
        reset_after: Some(standing.reset_after),
        window: Some(policy.period),
        violated,
    }
}

/// The `RateLimit-Policy` and `RateLimit` fields of a request that passed.
fn fields(plan: &Plan<'_>, standings: &[Standing]) -> Option<FieldValues> {
    write_fields(
        plan.entries.iter().map(|e| e.policy),
        plan.policy_field,
        standings,
    )
}

/// [`fields`] for a list of policies (the backend's path).
fn fields_of(
    policies: &[RateLimitPolicy],
    policy_field: Option<&HeaderValue>,
    standings: &[Standing],
) -> Option<FieldValues> {
    write_fields(policies.iter(), policy_field, standings)
}

fn write_fields<'a>(
    policies: impl Iterator<Item = &'a RateLimitPolicy> + Clone,
    policy_field: Option<&HeaderValue>,
    standings: &[Standing],
) -> Option<FieldValues> {
    let policy = match policy_field {
        Some(v) => v.clone(),
        None => {
            let mut out = FieldBuf::new();
            for (i, p) in policies.clone().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_policy_item(&mut out, &p.name, u64::from(p.limit), Some(p.period));
            }
            out.to_header()?
        }
    };
    let mut out = FieldBuf::new();
    for (i, (p, s)) in policies.zip(standings).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_limit_item(&mut out, &p.name, s.remaining, Some(s.reset_after));
    }
    Some(FieldValues::new(policy, out.to_bytes()))
}
