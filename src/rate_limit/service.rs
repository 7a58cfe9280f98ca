use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use smallvec::SmallVec;
use tower_service::Service;

use super::layer::Shared;
use super::limiter::{Limiter, Shape, Standing, Subject, Verdict};
use crate::core::usage::{LimitState, MAX_SF_INTEGER};
use crate::cost::{FieldBuf, RequestHead};
use crate::future::{ResponseFuture, ResponseNote};
use crate::guard::{self, Check, Resolver};
use crate::reject::{ResponseBody, RATELIMIT, RATELIMIT_POLICY};
use crate::{client_ip, Denial, DenialCode, Principal, RateLimitPolicy};

/// Middleware that rate-limits requests per key (and per client address without a key). See
/// [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Clone)]
pub struct RateLimit<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) resolver: Resolver,
}

impl<S> RateLimit<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, RateLimitNote>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let check = RateCheck {
            shared: self.shared.clone(),
        };
        guard::call(&mut self.inner, &self.resolver, req, check)
    }
}

/// What [`RateLimit`] writes on the inner service's response: the `RateLimit-Policy` and
/// `RateLimit` fields of the request's policies, and, for a key whose request another layer
/// then refused (a [`Denial`] on the response), the refund of what was counted.
pub struct RateLimitNote {
    fields: Option<(HeaderValue, HeaderValue)>,
    refund: Option<Refund>,
}

struct Refund {
    shared: Arc<Shared>,
    principal: Principal,
    cost: u32,
}

impl std::fmt::Debug for RateLimitNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitNote")
            .field("fields", &self.fields)
            .field("refund", &self.refund.as_ref().map(|r| r.cost))
            .finish()
    }
}

impl ResponseNote for RateLimitNote {
    fn apply<B>(mut self, res: &mut Response<B>) {
        if let Some(r) = self.refund {
            if res.extensions().get::<Denial>().is_some() {
                if let Ok(plan) = plan(&r.shared, Some(&r.principal)) {
                    let subject = Subject::Key(r.principal.key_id());
                    for e in plan.entries.iter().filter(|e| e.same_as.is_none()) {
                        e.limiter.refund(subject, r.cost);
                    }
                    if self.fields.is_some() {
                        let standings: SmallVec<[Standing; 2]> = plan
                            .entries
                            .iter()
                            .map(|e| e.limiter.peek(subject, 1).0)
                            .collect();
                        self.fields = fields(&plan, &standings);
                    }
                }
            }
        }
        if let Some((policy, limit)) = self.fields {
            let h = res.headers_mut();
            h.append(&RATELIMIT_POLICY, policy);
            h.append(&RATELIMIT, limit);
        }
    }
}

/// The rate-limit decision of one request.
struct RateCheck {
    shared: Arc<Shared>,
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
    /// An earlier entry of the same shape (same GCRA state): decided once.
    same_as: Option<usize>,
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

impl<ReqB> Check<ReqB> for RateCheck {
    type Note = RateLimitNote;

    fn check(
        self,
        req: &mut Request<ReqB>,
        who: Result<&Principal, &Denial>,
    ) -> Result<RateLimitNote, Denial> {
        let shared = &*self.shared;
        let principal = who.ok();
        let subject = match principal {
            Some(p) => Subject::Key(p.key_id()),
            None => client_address(shared, shared.gate.as_ref(), req),
        };
        let plan = plan(shared, principal)?;
        if plan.entries.is_empty() {
            return Ok(RateLimitNote {
                fields: None,
                refund: None,
            });
        }
        let cost = match &shared.cost {
            Some(f) => f(&RequestHead::of(req, principal)),
            None => 1,
        };
        let standings = decide(&plan, subject, cost)?;
        for e in &plan.entries {
            if e.limiter.take_due() {
                e.limiter.housekeeping();
            }
        }
        let fields = shared.headers.then(|| fields(&plan, &standings)).flatten();
        drop(plan);
        let refund = match principal {
            Some(p) if cost > 0 => Some(Refund {
                principal: p.clone(),
                cost,
                shared: self.shared,
            }),
            _ => None,
        };
        Ok(RateLimitNote { fields, refund })
    }
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
            });
        }
        return Ok(Plan {
            entries,
            policy_field: set.policy_field.as_ref(),
        });
    }
    let mut entries: SmallVec<[Entry<'a>; 2]> = SmallVec::new();
    for policy in own {
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
        let same_as = entries.iter().position(|e| e.limiter.shape == shape);
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
        });
    }
    Ok(Plan {
        entries,
        policy_field: None,
    })
}

/// Counts `cost` against every policy of `plan`, all or nothing; the standing of each entry.
fn decide(plan: &Plan<'_>, subject: Subject, cost: u32) -> Result<SmallVec<[Standing; 2]>, Denial> {
    let entries = &plan.entries;
    let mut standings: SmallVec<[Standing; 2]> = SmallVec::new();
    let Some(n) = NonZeroU32::new(cost) else {
        // Free requests pass without being counted.
        for e in entries {
            standings.push(e.limiter.peek(subject, 1).0);
        }
        return Ok(standings);
    };
    if entries.iter().any(|e| cost > e.policy.limit) {
        let states = entries
            .iter()
            .map(|e| {
                let (standing, _) = e.limiter.peek(subject, 1);
                state(e.policy, standing, cost > e.policy.limit)
            })
            .collect();
        return Err(Denial::new(DenialCode::RateLimited)
            .with_detail("The request costs more than the rate limit allows at once.")
            .with_limits(states));
    }
    for (i, e) in entries.iter().enumerate() {
        if let Some(j) = e.same_as {
            let s = standings[j];
            standings.push(s);
            continue;
        }
        match e.limiter.check(subject, n) {
            Verdict::Allowed(s) => standings.push(s),
            Verdict::Denied(wait) => {
                // Give back what the earlier policies counted, then report every policy.
                for earlier in entries[..i].iter().filter(|e| e.same_as.is_none()) {
                    earlier.limiter.refund(subject, cost);
                }
                return Err(denied(entries, subject, cost, i, wait));
            }
        }
    }
    Ok(standings)
}

fn denied(
    entries: &[Entry<'_>],
    subject: Subject,
    cost: u32,
    first: usize,
    wait: Duration,
) -> Denial {
    let mut retry = wait;
    let mut states = Vec::with_capacity(entries.len());
    for (k, e) in entries.iter().enumerate() {
        let (standing, would_wait) = e.limiter.peek(subject, cost);
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

/// Appends `"name";q=limit;w=secs` (no `w` unless the period is whole seconds).
pub(crate) fn write_policy_item(out: &mut FieldBuf, name: &str, limit: u32, period: Duration) {
    out.push_sf_string(name);
    out.push_str(";q=");
    out.push_u64(u64::from(limit));
    if period.subsec_nanos() == 0 && period.as_secs() > 0 {
        out.push_str(";w=");
        out.push_u64(period.as_secs().min(MAX_SF_INTEGER));
    }
}

/// The `RateLimit-Policy` and `RateLimit` fields of a request that passed.
fn fields(plan: &Plan<'_>, standings: &[Standing]) -> Option<(HeaderValue, HeaderValue)> {
    let policy = match plan.policy_field {
        Some(v) => v.clone(),
        None => {
            let mut out = FieldBuf::new();
            for (i, e) in plan.entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_policy_item(&mut out, &e.policy.name, e.policy.limit, e.policy.period);
            }
            out.to_header()?
        }
    };
    let mut out = FieldBuf::new();
    for (i, (e, s)) in plan.entries.iter().zip(standings).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_sf_string(&e.policy.name);
        let reset = s.reset_after.as_secs() + u64::from(s.reset_after.subsec_nanos() > 0);
        out.push_str(";r=");
        out.push_u64(s.remaining);
        out.push_str(";t=");
        out.push_u64(reset.min(MAX_SF_INTEGER));
    }
    Some((policy, out.to_header()?))
}
