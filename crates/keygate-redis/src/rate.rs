use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use keygate_core::rate::{RateBackend, RateDecision, RateError, RateStanding, RateSubject};
use keygate_core::{Clock, RateLimitPolicy};
use redis::Script;

use crate::conn::{micros, Error, Redis};
use crate::epoch::{epoch_key, hold_key, EpochView};
use crate::lease::LeaseOptions;
use crate::rate_lease::RateLeases;

/// The default hold after Redis lost the rate-limit state.
const DEFAULT_HOLD: Duration = Duration::from_secs(60);

/// The longest period a policy may have (366 days), as in-process.
const MAX_PERIOD_US: u64 = 366 * 86_400 * 1_000_000;

/// Below this (µs), a computed wait counts as zero (rounding of `period / limit`).
const EPS: f64 = 0.001;

/// Lua, the start of every time-reading script: `now`, microseconds since the Unix epoch,
/// from ARGV[1], or from the server's clock when ARGV[1] is "".
pub(crate) const LUA_NOW: &str = r#"local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"#;

/// Lua, after [`LUA_NOW`] and `local n = ...`, in the rate-limit scripts: the epoch
/// (KEYS[n + 1], created as ARGV[4] when missing) and the hold after Redis lost the state
/// (KEYS[n + 2], "<epoch> <until us>"): once per new epoch that this replica did not know
/// (ARGV[3], "0": none), everything is held for ARGV[5] us; while held, the script answers
/// {-1, now, epoch, hold until}.
pub(crate) const LUA_EPOCH_HOLD: &str = r#"local epoch = redis.call('GET', KEYS[n + 1])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[n + 1], epoch)
end
local held = redis.call('GET', KEYS[n + 2])
local held_epoch, held_until
if held then held_epoch, held_until = string.match(held, '^(%d+) (%d+)$') end
if ARGV[3] ~= '0' and epoch ~= ARGV[3] and held_epoch ~= epoch then
  -- The state this replica counted in is gone: hold once per epoch, from now.
  held_epoch, held_until = epoch, string.format('%.0f', now + tonumber(ARGV[5]))
  redis.call('SET', KEYS[n + 2], held_epoch .. ' ' .. held_until)
end
if held_epoch == epoch and now < tonumber(held_until) then
  return {-1, now, tonumber(epoch), tonumber(held_until)}
end
"#;

static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            r#"
-- GCRA over the policies of a request (each key names its subject), all or nothing.
-- KEYS[i], i <= n: state of shape i, "<base> <units>" (TAT = base + units * period / limit,
-- in us); KEYS[n + 1]: the epoch; KEYS[n + 2]: the hold after a loss, "<epoch> <until us>".
-- ARGV[1]: now (us since the Unix epoch), or "" to read the server's clock.
-- ARGV[2]: cost (0: count nothing, report only).
-- ARGV[3]: the epoch this replica saw last ("0": none); ARGV[4]: the epoch to create if
-- there is none; ARGV[5]: how long to hold after a loss (us).
-- ARGV[4 + 2i], ARGV[5 + 2i]: period (us) and limit of shape i.
-- Returns {allowed, now, epoch, then per shape: remaining, ahead (us, floor), wait (us,
-- ceil; 0 fits, -1 never)}, or {-1, now, epoch, hold until} while holding after a loss.
"#,
            LUA_NOW,
            "local n = #KEYS - 2\n",
            LUA_EPOCH_HOLD,
            r#"local cost = tonumber(ARGV[2])
local eps = 0.001
local out = {1, now, tonumber(epoch)}
local st = {}
for i = 1, n do
  local period = tonumber(ARGV[4 + 2 * i])
  local limit = tonumber(ARGV[5 + 2 * i])
  local base, units = now, 0
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local b, u = string.match(raw, '^(%d+) (%d+)$')
    if not b then
      return redis.error_reply('keygate: unreadable rate-limit state at ' .. KEYS[i])
    end
    base, units = tonumber(b), tonumber(u)
  end
  local ahead = (base - now) + units * period / limit
  if ahead <= 0 then
    base, units, ahead = now, 0, 0
  end
  local wait
  if cost > limit then
    wait = -1
  else
    wait = ahead + cost * period / limit - period
    if wait <= eps then wait = 0 else wait = math.ceil(wait) end
  end
  if wait ~= 0 then out[1] = 0 end
  st[i] = {base, units, ahead, period, limit, wait}
end
for i = 1, n do
  local base, units, ahead, period, limit, wait = unpack(st[i])
  if out[1] == 1 and cost > 0 then
    units = units + cost
    local k = math.floor(units / limit)
    base = base + k * period
    units = units - k * limit
    ahead = (base - now) + units * period / limit
    redis.call('SET', KEYS[i], string.format('%.0f %.0f', base, units),
      'PX', math.ceil(ahead / 1000) + 1)
  end
  local spent = math.ceil(ahead * limit / period - eps)
  if spent < 0 then spent = 0 end
  if spent > limit then spent = limit end
  out[#out + 1] = limit - spent
  out[#out + 1] = math.floor(ahead)
  out[#out + 1] = wait
end
return out
"#,
        ]
        .concat(),
    )
});

static REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            r#"
-- Gives back ARGV[2] units in every shape (same KEYS and ARGV as the check; the epoch is
-- not consulted: giving back to a state that started over only makes it fresher).
"#,
            LUA_NOW,
            r#"local cost = tonumber(ARGV[2])
for i = 1, #KEYS - 2 do
  local period = tonumber(ARGV[4 + 2 * i])
  local limit = tonumber(ARGV[5 + 2 * i])
  local raw = redis.call('GET', KEYS[i])
  local b, u
  if raw then b, u = string.match(raw, '^(%d+) (%d+)$') end
  if b then
    local base, units = tonumber(b), tonumber(u) - cost
    if units < 0 then
      local k = math.ceil(-units / limit)
      base = base - k * period
      units = units + k * limit
    end
    local ahead = (base - now) + units * period / limit
    if ahead <= 0 then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], string.format('%.0f %.0f', base, units),
        'PX', math.ceil(ahead / 1000) + 1)
    end
  end
end
return 0
"#,
        ]
        .concat(),
    )
});

/// Where a [`RedisRateLimiter`] reads the time.
#[derive(Clone, Default)]
pub enum TimeSource {
    /// Redis's own clock (`TIME` inside the script): one clock for all replicas.
    #[default]
    Server,
    /// The caller's clock, passed to the script (tests step a `ManualClock`). Replicas'
    /// clocks must agree; see the [`RedisRateLimiter`] docs for what skew does.
    Clock(Arc<dyn Clock>),
}

impl std::fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeSource::Server => f.write_str("Server"),
            TimeSource::Clock(_) => f.write_str("Clock"),
        }
    }
}

/// A [`RateBackend`] on Redis: GCRA for every replica at once, one Lua script (one round
/// trip) per request. See the [`RedisRateLimiter`] docs for the arithmetic, the time source and
/// the local pre-check. Cheap to clone; clones share the pre-check memory and counters.
///
/// ```no_run
/// use keygate_redis::{Redis, RedisRateLimiter};
/// use keygate_core::rate::{RateBackend, RateSubject};
/// use keygate_core::{KeyId, RateLimitPolicy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let redis = Redis::open("redis://127.0.0.1:6379").await.unwrap();
/// let limiter = RedisRateLimiter::new(&redis);
/// let key = RateSubject::Key(KeyId::parse("AbCdEfGhIjKl").unwrap());
/// let policies = [RateLimitPolicy::per_second("burst", 20), RateLimitPolicy::per_hour("hourly", 10_000)];
/// let decision = limiter.check(key, &policies, 1).await.unwrap();
/// assert!(decision.allowed);
/// # }
/// ```
///
/// [`RedisRateLimiter`]: GCRA in one Lua script per request, shared by every replica.
///
/// # State and arithmetic
/// One Redis string per (subject, policy shape): `{prefix}:rl:{<subject>}:<limit>:<period µs>`
/// holding `"<base> <units>"`, meaning the theoretical arrival time (GCRA's TAT) is
/// `base + units · period / limit` microseconds since the Unix epoch. `base` and `units` are
/// integers (whole periods are folded from `units` into `base`), so the state never drifts
/// however long a key stays busy, and every comparison is made on differences of a few
/// periods, far inside a double's exact range. A request of cost `c` fits a policy when
/// `max(TAT, now) + c · period / limit - now <= period` (bursts of up to `limit`, one unit
/// every `period / limit`), exactly as the in-process limiter. Keys expire when their state
/// is back to fresh.
///
/// # One round trip
/// The script decides every policy of the request (deduplicated by shape) and writes only if
/// all have room, so a request is counted everywhere or nowhere; Redis runs scripts one at a
/// time, so concurrent replicas cannot both take the last unit. It answers each policy's
/// remaining units, time until full, and wait, which is all the `RateLimit` fields and
/// `Retry-After` need.
///
/// # Time
/// [`TimeSource::Server`] (the default) reads Redis's clock (`TIME`) inside the script: one
/// clock for every replica, so clock skew between replicas cannot matter.
/// [`TimeSource::Clock`] passes the caller's clock instead (a `ManualClock` in tests, so
/// windows can be stepped). Then replicas must agree on the time: a replica whose clock runs
/// `δ` ahead sees every state `δ` older and may let up to `δ / (period / limit)` extra units
/// through early; one running behind is stricter. Key expiry always uses Redis's clock
/// (relative TTLs), so a caller clock must advance at the real rate.
///
/// Time resolution is one microsecond: a policy of more than one unit per microsecond is
/// refused ([`RateError::InvalidPolicy`]), and periods count in whole microseconds.
///
/// # When Redis loses the state
/// GCRA state lost to a flush, an eviction or a restart cannot be recovered exactly: it
/// exists nowhere else. Every script reads the [epoch](crate::RestartMonitor), so a replica notices
/// the loss on its first call after it (a restart that brought back an older snapshot: when
/// a [`RestartMonitor`](crate::RestartMonitor) notices it). It then holds for
/// [`hold_after_loss`](RedisRateLimiter::hold_after_loss) (default 60 s, shared by every
/// replica through `{prefix}:epoch:hold`): checks fail with [`RateError::Unavailable`], so
/// the layer answers 503 `store_unavailable` (`Fallback::Deny`) or limits in-process
/// (`Fallback::Local`); then counting starts over from a fresh state.
///
/// The bound: a subject's lost TAT was at most one period `P` ahead of the moment of the
/// loss, so after a hold `H` a policy of `limit` per `P` lets through at most
/// `ceil(limit · (P − H) / P)` units more than had nothing been lost (none when `H ≥ P`),
/// per loss and subject. With `Fallback::Local`, add what each replica allows in-process
/// during the hold (up to `limit` each). Not covered: calls made between the loss and the
/// first call of a replica that had seen the old state (only a replica started after the loss
/// can make them), and, after a restart that brought back an older state, calls until the
/// restart monitor's next check.
///
/// # Leases
/// With [`RedisRateLimiter::leased`] a replica does not make a round trip per request. For a
/// (subject, policies) pair it leases `k` units: one script moves the GCRA state's TAT ahead
/// by `k · period / limit` if the burst has room (the same arithmetic as `k` requests, all
/// policies of the request at once, all or nothing), and the replica then allows requests
/// from a lock-free local counter ([`RateBackend::try_local`], no I/O, no await). When the
/// lease is spent or expired, the next request makes one script that gives back what the
/// previous lease did not spend (the TAT moved back by that many units, exactly as if they
/// had never been taken) and takes the next lease; concurrent requests of the same key wait
/// for that one refill (single flight) and spend from it. Expired leases are given back by a
/// background task every half lifetime, and [`release_leases`](RedisRateLimiter::release_leases)
/// gives back everything at shutdown.
///
/// - **Never over the limit**: every unit a replica spends was debited in Redis first.
/// - **Size**: adaptive, see [`LeaseOptions`]: twice what the previous lease served per
///   lifetime, capped at `min(limit / 10, limit / (2 · replicas))`; a policy below 20 per
///   period, or named [`LeaseOptions::precise`], is never leased: a request under it makes
///   one script, as without leases (a request mixing it with leased policies too).
/// - **Lifetime**: 1 s, at most a tenth of the shortest period; a lease is never spent
///   after it on this replica's clock (the limiter's [`TimeSource`]).
/// - **Under-use**: a request is refused only when Redis has no room; what the other
///   replicas hold unspent then is at most `(replicas − 1) · cap`, given back within one
///   lifetime. A replica that crashes strands at most its unspent lease, which the GCRA
///   state forgets within one period.
/// - **Changes**: a lease belongs to its policies; a lowered limit or a role change is a
///   different policy, decided afresh from its first request. A revoked key is refused by
///   the verifier before the rate limit. A change made in Redis itself (the hold after a
///   loss) reaches a replica at its next refill, within one lifetime.
/// - **Headers**: `RateLimit` fields from a lease are computed from the last answer and the
///   units spent since (another replica's spending shows at the next refill).
///
/// # Local pre-check
/// With [`RedisRateLimiter::local_precheck`] the limiter remembers, per subject and shape,
/// the TAT of the last answer (bounded memory). A request whose cost cannot fit according to
/// that memory is refused without a round trip. Other replicas only add to the state and the
/// memory is never ahead of Redis, so this refuses only what Redis would refuse, except
/// right after a refund made by another replica (its own refunds correct the memory),
/// which it does not see: such a subject may be refused up to its wait early. Errs toward
/// refusing.
#[derive(Clone)]
pub struct RedisRateLimiter {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) redis: Redis,
    pub(crate) epoch_key: String,
    pub(crate) hold_key: String,
    pub(crate) epoch: EpochView,
    pub(crate) hold: Duration,
    losses: AtomicU64,
    time: TimeSource,
    origin: Instant,
    memory: Option<Memory>,
    pub(crate) round_trips: AtomicU64,
    pub(crate) prechecked: AtomicU64,
    refunding: AtomicU64,
    /// Leased allowances ([`RedisRateLimiter::leased`]); `None`: precise.
    pub(crate) leases: Option<RateLeases>,
}

/// The local pre-check's memory: the TAT (local µs) last seen per subject and shape.
struct Memory {
    tats: DashMap<(RateSubject, u32, u64), f64>,
    capacity: usize,
    /// Local µs before which no sweep runs again (a full map sweeps at most every 100 ms).
    next_sweep: AtomicU64,
}

/// One distinct policy shape of a call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) limit: u32,
    pub(crate) period_us: u64,
}

impl Shape {
    fn of(p: &RateLimitPolicy) -> Result<Shape, RateError> {
        let invalid = |reason| RateError::InvalidPolicy {
            name: p.name.chars().take(64).collect(),
            reason,
        };
        let period_us = micros(p.period);
        if p.limit == 0 {
            return Err(invalid("the limit must be at least 1"));
        }
        if period_us == 0 || period_us > MAX_PERIOD_US {
            return Err(invalid("the period must be 1 microsecond to 366 days"));
        }
        if period_us < u64::from(p.limit) {
            return Err(invalid(
                "more than one unit per microsecond (the Redis backend's resolution)",
            ));
        }
        Ok(Shape {
            limit: p.limit,
            period_us,
        })
    }

    pub(crate) fn t(&self) -> f64 {
        self.period_us as f64 / f64::from(self.limit)
    }

    /// Remaining units, time until full, and the wait for `cost` (None: never) when the TAT
    /// is `ahead` µs past now.
    pub(crate) fn standing(&self, ahead: f64, cost: u32) -> RateStanding {
        let ahead = ahead.max(0.0);
        let limit = f64::from(self.limit);
        let spent = (ahead * limit / self.period_us as f64 - EPS)
            .ceil()
            .clamp(0.0, limit);
        let wait = if cost > self.limit {
            None
        } else {
            let w = ahead + f64::from(cost) * self.t() - self.period_us as f64;
            Some(if w <= EPS {
                Duration::ZERO
            } else {
                Duration::from_micros(w.ceil() as u64)
            })
        };
        RateStanding {
            remaining: u64::from(self.limit) - spent as u64,
            reset_after: Duration::from_micros(ahead.floor() as u64),
            wait,
        }
    }
}

/// The distinct (subject, shape) pairs of a call and, per policy, the index of its pair.
struct Shapes {
    shapes: Vec<(RateSubject, Shape)>,
    index: Vec<usize>,
}

impl Shapes {
    #[cfg(test)]
    fn of(policies: &[RateLimitPolicy]) -> Result<Shapes, RateError> {
        Self::of_each(|_| RateSubject::Unknown, policies)
    }

    /// `subject(i)` is the subject of `policies[i]`.
    fn of_each(
        subject: impl Fn(usize) -> RateSubject,
        policies: &[RateLimitPolicy],
    ) -> Result<Shapes, RateError> {
        let mut shapes: Vec<(RateSubject, Shape)> = Vec::with_capacity(policies.len());
        let mut index = Vec::with_capacity(policies.len());
        for (i, p) in policies.iter().enumerate() {
            let s = (subject(i), Shape::of(p)?);
            match shapes.iter().position(|x| *x == s) {
                Some(i) => index.push(i),
                None => {
                    shapes.push(s);
                    index.push(shapes.len() - 1);
                }
            }
        }
        Ok(Shapes { shapes, index })
    }
}

impl RedisRateLimiter {
    /// A limiter on `redis` reading Redis's clock, without the local pre-check.
    pub fn new(redis: &Redis) -> Self {
        RedisRateLimiter {
            inner: Arc::new(Inner {
                redis: redis.clone(),
                epoch_key: epoch_key(redis),
                hold_key: hold_key(redis),
                epoch: EpochView::new(),
                hold: DEFAULT_HOLD,
                losses: AtomicU64::new(0),
                time: TimeSource::Server,
                origin: Instant::now(),
                memory: None,
                round_trips: AtomicU64::new(0),
                prechecked: AtomicU64::new(0),
                refunding: AtomicU64::new(0),
                leases: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                // Shared already: rebuild (counters start over).
                let mut inner = Inner {
                    redis: self.inner.redis.clone(),
                    epoch_key: self.inner.epoch_key.clone(),
                    hold_key: self.inner.hold_key.clone(),
                    epoch: EpochView::new(),
                    hold: self.inner.hold,
                    losses: AtomicU64::new(0),
                    time: self.inner.time.clone(),
                    origin: self.inner.origin,
                    memory: self.inner.memory.as_ref().map(|m| Memory::new(m.capacity)),
                    round_trips: AtomicU64::new(0),
                    prechecked: AtomicU64::new(0),
                    refunding: AtomicU64::new(0),
                    leases: self
                        .inner
                        .leases
                        .as_ref()
                        .map(|l| RateLeases::new(l.options.clone(), &self.inner.redis)),
                };
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// Where the time comes from (default [`TimeSource::Server`]).
    pub fn time_source(self, time: TimeSource) -> Self {
        self.edit(|i| i.time = time)
    }

    /// Turns on the local pre-check, remembering at most `capacity` (subject, shape) states
    /// (about 80 bytes each); beyond it new subjects are simply not remembered.
    pub fn local_precheck(self, capacity: NonZeroUsize) -> Self {
        self.edit(|i| i.memory = Some(Memory::new(capacity.get())))
    }

    /// How long to refuse after Redis lost the rate-limit state (default 60 s; zero: go on
    /// from a fresh state at once). While it lasts, checks fail with
    /// [`RateError::Unavailable`], so the rate-limit layer applies its failure policy:
    /// 503 `store_unavailable` with `Fallback::Deny`, in-process limits with
    /// `Fallback::Local`. See the [`RedisRateLimiter`] docs for what a loss costs with and
    /// without it.
    pub fn hold_after_loss(self, hold: Duration) -> Self {
        self.edit(|i| i.hold = hold)
    }

    /// Leases allowances (see [`LeaseOptions`]): a replica reserves a slice of a key's
    /// allowance in Redis and decides requests from it without a round trip, sized by the
    /// key's observed rate; policies below the options' `min_limit` or named `precise` keep
    /// one script per request. See [Leases](RedisRateLimiter#leases).
    pub fn leased(self, options: LeaseOptions) -> Self {
        self.edit(|i| i.leases = Some(RateLeases::new(options, &i.redis)))
    }

    /// Whether allowances are leased.
    pub fn is_leased(&self) -> bool {
        self.inner.leases.is_some()
    }

    /// How many requests were decided from a lease (or a lease's refusal) without a round
    /// trip.
    pub fn decided_locally(&self) -> u64 {
        self.inner
            .leases
            .as_ref()
            .map_or(0, |l| l.local.load(Ordering::Relaxed))
    }

    /// How many leases this limiter took (refills that granted something).
    pub fn leases_taken(&self) -> u64 {
        self.inner
            .leases
            .as_ref()
            .map_or(0, |l| l.taken.load(Ordering::Relaxed))
    }

    /// How many leases hold unspent units now.
    pub fn leases_held(&self) -> usize {
        self.inner.leases.as_ref().map_or(0, |l| l.held())
    }

    /// Gives back the unspent units of expired leases now (a background task does it every
    /// half lifetime; tests with a manual clock call it after stepping the clock).
    pub async fn release_expired(&self) {
        self.give_back(false).await
    }

    /// Gives back every lease's unspent units (at shutdown: what a replica holds is
    /// otherwise lost until its period passes). Requests after it lease again.
    pub async fn release_leases(&self) {
        self.give_back(true).await
    }

    /// How many times this limiter found that Redis had lost (or replaced) the state it
    /// counted in.
    pub fn losses(&self) -> u64 {
        self.inner.losses.load(Ordering::Relaxed)
    }

    /// How many scripts (checks and refunds) were sent to Redis.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// How many requests the local pre-check refused without a round trip.
    pub fn prechecked(&self) -> u64 {
        self.inner.prechecked.load(Ordering::Relaxed)
    }

    /// How many refunds were started and have not finished (sent, or failed) yet.
    pub fn refunds_in_flight(&self) -> u64 {
        self.inner.refunding.load(Ordering::Acquire)
    }

    /// How many (subject, shape) states the pre-check remembers.
    pub fn remembered(&self) -> usize {
        self.inner.memory.as_ref().map_or(0, |m| m.tats.len())
    }

    /// The Redis handle.
    pub fn redis(&self) -> &Redis {
        &self.inner.redis
    }
}

impl Inner {
    /// The script's `now` argument: empty for the server's clock.
    pub(crate) fn now_arg(&self) -> String {
        match &self.time {
            TimeSource::Server => String::new(),
            TimeSource::Clock(c) => {
                micros(c.now().duration_since(UNIX_EPOCH).unwrap_or_default()).to_string()
            }
        }
    }

    /// The pre-check's time base: the caller's clock, or a local monotonic count.
    pub(crate) fn local_now(&self) -> f64 {
        match &self.time {
            TimeSource::Server => micros(self.origin.elapsed()) as f64,
            TimeSource::Clock(c) => {
                micros(c.now().duration_since(UNIX_EPOCH).unwrap_or_default()) as f64
            }
        }
    }

    pub(crate) fn key(&self, subject: RateSubject, s: &Shape) -> String {
        self.redis
            .key(format_args!("rl:{{{subject}}}:{}:{}", s.limit, s.period_us))
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &'static Script,
        shapes: &[(RateSubject, Shape)],
        cost: u32,
    ) -> Result<T, Error> {
        let mut keys: Vec<String> = shapes.iter().map(|(sub, s)| self.key(*sub, s)).collect();
        keys.push(self.epoch_key.clone());
        keys.push(self.hold_key.clone());
        let mut args: Vec<String> = Vec::with_capacity(5 + 2 * shapes.len());
        args.push(self.now_arg());
        args.push(cost.to_string());
        args.push(self.epoch.known().to_string());
        args.push(self.epoch.candidate().to_string());
        args.push(micros(self.hold).to_string());
        for (_, s) in shapes {
            args.push(s.period_us.to_string());
            args.push(s.limit.to_string());
        }
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.redis.eval(script, keys, args).await
    }

    fn remember(&self, subject: RateSubject, shape: &Shape, local_now: f64, ahead: f64) {
        let Some(m) = &self.memory else { return };
        let key = (subject, shape.limit, shape.period_us);
        if ahead <= 0.0 {
            m.tats.remove(&key);
            return;
        }
        let tat = local_now + ahead;
        if let Some(mut v) = m.tats.get_mut(&key) {
            *v = tat;
            return;
        }
        if m.tats.len() >= m.capacity {
            m.sweep(local_now);
            if m.tats.len() >= m.capacity {
                return;
            }
        }
        m.tats.insert(key, tat);
    }
}

impl Inner {
    /// Notes a new epoch in a script's answer (`{status, now, epoch, ..}`); fails while
    /// holding after a loss.
    pub(crate) fn check_epoch(&self, out: &[i64]) -> Result<(), RateError> {
        if out.len() < 3 {
            return Ok(());
        }
        let token = u64::try_from(out[2]).unwrap_or(0);
        if self.epoch.saw(token) {
            self.losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                hold = ?self.hold,
                "Redis lost the shared rate-limit state (flushed, evicted or restarted); \
                 holding before counting from a fresh state"
            );
        }
        if out[0] == -1 {
            let left = out
                .get(3)
                .map_or(0, |until| until.saturating_sub(out[1]).max(0));
            return Err(RateError::Unavailable(format!(
                "Redis lost the shared rate-limit state; limits resume in {:?}",
                Duration::from_micros(left as u64)
            )));
        }
        Ok(())
    }
}

impl Memory {
    fn new(capacity: usize) -> Memory {
        Memory {
            tats: DashMap::new(),
            capacity: capacity.max(1),
            next_sweep: AtomicU64::new(0),
        }
    }

    /// Drops states back to fresh (at most once per 100 ms).
    fn sweep(&self, now: f64) {
        let at = self.next_sweep.load(Ordering::Relaxed);
        if (now as u64) < at
            || self
                .next_sweep
                .compare_exchange(
                    at,
                    now as u64 + 100_000,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        self.tats.retain(|_, tat| *tat > now);
        self.tats.shrink_to_fit();
    }
}

pub(crate) fn unavailable(e: Error) -> RateError {
    match e {
        Error::Unavailable(s) | Error::Unexpected(s) => RateError::Unavailable(s),
    }
}

impl RedisRateLimiter {
    /// One script for every policy, each counted for its subject.
    async fn decide(
        &self,
        subject: impl Fn(usize) -> RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        let inner = &*self.inner;
        let Shapes { shapes, index } = Shapes::of_each(subject, policies)?;
        if shapes.is_empty() {
            return Ok(RateDecision {
                allowed: true,
                standings: Vec::new(),
            });
        }
        if let Some(leases) = &inner.leases {
            if leases.leasable(policies) {
                return self.lease_decide(&shapes, &index, cost).await;
            }
        }
        let local_now = inner.local_now();
        let out: Vec<i64> = inner.run(&GCRA, &shapes, cost).await.map_err(unavailable)?;
        inner.check_epoch(&out)?;
        if out.len() != 3 + 3 * shapes.len() {
            return Err(RateError::Unavailable(format!(
                "the rate-limit script answered {} values",
                out.len()
            )));
        }
        let allowed = out[0] == 1;
        let mut per_shape = Vec::with_capacity(shapes.len());
        for (i, (subject, s)) in shapes.iter().enumerate() {
            let remaining = u64::try_from(out[3 + 3 * i]).unwrap_or(0);
            let ahead = out[4 + 3 * i].max(0);
            let wait = out[5 + 3 * i];
            inner.remember(*subject, s, local_now, ahead as f64);
            per_shape.push(RateStanding {
                remaining: remaining.min(u64::from(s.limit)),
                reset_after: Duration::from_micros(ahead as u64),
                wait: u64::try_from(wait).ok().map(Duration::from_micros),
            });
        }
        Ok(RateDecision {
            allowed,
            standings: index.iter().map(|i| per_shape[*i]).collect(),
        })
    }

    /// A decision without I/O: from a lease for leased policies, else the pre-check.
    fn local_decision(
        &self,
        subject: impl Fn(usize) -> RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        if let Some(leases) = &self.inner.leases {
            if leases.leasable(policies) {
                let Shapes { shapes, index } = Shapes::of_each(&subject, policies).ok()?;
                if shapes.is_empty() {
                    return None;
                }
                return self.lease_local(&shapes, &index, cost);
            }
        }
        self.remembered_refusal(subject, policies, cost)
    }

    /// The local pre-check, each policy looked up for its subject.
    fn remembered_refusal(
        &self,
        subject: impl Fn(usize) -> RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        let inner = &*self.inner;
        let memory = inner.memory.as_ref()?;
        if cost == 0 || memory.tats.is_empty() {
            return None;
        }
        let now = inner.local_now();
        let mut standings = Vec::with_capacity(policies.len());
        let mut refused = false;
        for (i, p) in policies.iter().enumerate() {
            let subject = subject(i);
            let shape = Shape::of(p).ok()?;
            let ahead = memory
                .tats
                .get(&(subject, shape.limit, shape.period_us))
                .map_or(0.0, |tat| *tat - now);
            let s = shape.standing(ahead, cost);
            refused |= s.wait.is_some_and(|w| !w.is_zero());
            standings.push(s);
        }
        if !refused {
            return None;
        }
        inner.prechecked.fetch_add(1, Ordering::Relaxed);
        Some(RateDecision {
            allowed: false,
            standings,
        })
    }
}

#[async_trait]
impl RateBackend for RedisRateLimiter {
    async fn check(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        self.decide(|_| subject, policies, cost).await
    }

    /// One script for every subject: the key's and the identity's policies are decided
    /// together, all or nothing, as for one subject.
    async fn check_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        let Some(&first) = subjects.first() else {
            return self.decide(|_| RateSubject::Unknown, policies, cost).await;
        };
        self.decide(
            |i| subjects.get(i).copied().unwrap_or(first),
            policies,
            cost,
        )
        .await
    }

    fn precheck(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        self.remembered_refusal(|_| subject, policies, cost)
    }

    /// With leases: allowed from this replica's lease (or refused while Redis's last refusal
    /// stands) without a round trip. Otherwise the pre-check.
    fn try_local(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        self.local_decision(|_| subject, policies, cost)
    }

    fn try_local_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        let first = *subjects.first()?;
        self.local_decision(
            |i| subjects.get(i).copied().unwrap_or(first),
            policies,
            cost,
        )
    }

    fn precheck_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        let first = *subjects.first()?;
        self.remembered_refusal(
            |i| subjects.get(i).copied().unwrap_or(first),
            policies,
            cost,
        )
    }

    fn refund(&self, subject: RateSubject, policies: &[RateLimitPolicy], cost: u32) {
        if cost == 0 {
            return;
        }
        let Ok(Shapes { shapes, .. }) = Shapes::of_each(|_| subject, policies) else {
            return;
        };
        if shapes.is_empty() {
            return;
        }
        if self.lease_refund(&shapes, cost) {
            return;
        }
        if let Some(m) = &self.inner.memory {
            for (_, s) in &shapes {
                if let Some(mut tat) = m.tats.get_mut(&(subject, s.limit, s.period_us)) {
                    *tat -= f64::from(cost) * s.t();
                }
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("rate-limit refund skipped: no tokio runtime");
            return;
        };
        let inner = self.inner.clone();
        inner.refunding.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            if let Err(e) = inner.run::<i64>(&REFUND, &shapes, cost).await {
                tracing::warn!(error = %e, "rate-limit refund failed; the cost stays counted");
            }
            inner.refunding.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl std::fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("redis", &self.inner.redis)
            .field("time", &self.inner.time)
            .field("precheck", &self.inner.memory.is_some())
            .field("leased", &self.inner.leases.is_some())
            .field("round_trips", &self.round_trips())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_validated_and_deduplicated() {
        let p =
            |name: &str, limit, ms| RateLimitPolicy::new(name, limit, Duration::from_millis(ms));
        let s = Shapes::of(&[p("a", 20, 1000), p("b", 10, 60_000), p("c", 20, 1000)])
            .ok()
            .unwrap();
        assert_eq!(s.shapes.len(), 2);
        assert_eq!(s.index, vec![0, 1, 0]);
        assert!(matches!(
            Shapes::of(&[p("fine", 2_000_000, 1000)]),
            Err(RateError::InvalidPolicy { .. })
        ));
        assert!(matches!(
            Shapes::of(&[p("zero", 0, 1000)]),
            Err(RateError::InvalidPolicy { .. })
        ));
        assert!(matches!(
            Shapes::of(&[p("long", 1, 367 * 86_400_000)]),
            Err(RateError::InvalidPolicy { .. })
        ));
    }

    #[test]
    fn standings_match_gcra() {
        let s = Shape {
            limit: 20,
            period_us: 1_000_000,
        };
        // Fresh: everything left, fits.
        let fresh = s.standing(0.0, 1);
        assert_eq!(fresh.remaining, 20);
        assert_eq!(fresh.wait, Some(Duration::ZERO));
        // Full (TAT one period ahead): nothing left, one unit in 50 ms.
        let full = s.standing(1_000_000.0, 1);
        assert_eq!(full.remaining, 0);
        assert_eq!(full.wait, Some(Duration::from_millis(50)));
        assert_eq!(full.reset_after, Duration::from_secs(1));
        // Half used: 10 left; 11 do not fit (wait one unit), more than the limit never.
        let half = s.standing(500_000.0, 11);
        assert_eq!(half.remaining, 10);
        assert_eq!(half.wait, Some(Duration::from_millis(50)));
        assert_eq!(s.standing(0.0, 21).wait, None);
    }
}
