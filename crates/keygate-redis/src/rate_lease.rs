//! The rate limiter's leases: a slice of a (subject, policies) allowance debited in Redis
//! (the GCRA state's TAT moved ahead, as for that many requests) and spent locally.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dashmap::DashMap;
use keygate_core::rate::{RateDecision, RateError, RateStanding, RateSubject};
use keygate_core::RateLimitPolicy;
use redis::Script;

use crate::conn::micros;
use crate::lease::{next_size, replica_id, spawn_sweeper, LeaseOptions};
use crate::rate::{unavailable, Inner, RedisRateLimiter, Shape, LUA_EPOCH_HOLD, LUA_NOW};

static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            r#"
-- Leases units of every shape of a request (all or nothing), giving back first what the
-- previous lease did not spend.
-- KEYS[1..n]: shape states (as the check); KEYS[n + 1]: the epoch; KEYS[n + 2]: the hold
-- after a loss; KEYS[n + 3]: the replicas that leased lately (sorted set, by time).
-- ARGV[1]: now (us) or "" for the server's clock; ARGV[2]: the replica's id;
-- ARGV[3], ARGV[4], ARGV[5]: known epoch, epoch to create, hold (us), as the check;
-- ARGV[6]: units wanted (0: only give back); ARGV[7]: the cost that must fit (0: none);
-- ARGV[8]: units given back; ARGV[7 + 2i], ARGV[8 + 2i]: period (us) and limit of shape i.
-- Returns {fits, now, epoch, replicas, granted, then per shape: ahead (us, floor), wait
-- (us, ceil; 0 fits, -1 never)}, or {-1, now, epoch, hold until} while holding.
"#,
            LUA_NOW,
            "local n = #KEYS - 3\n",
            LUA_EPOCH_HOLD,
            r#"local rk = KEYS[n + 3]
redis.call('ZADD', rk, now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - 10000000)
redis.call('PEXPIRE', rk, 60000)
local replicas = redis.call('ZCARD', rk)
local want, cost, back = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local eps = 0.001
local g = want
local fits = 1
local st = {}
for i = 1, n do
  local period = tonumber(ARGV[7 + 2 * i])
  local limit = tonumber(ARGV[8 + 2 * i])
  local base, units = now, 0
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local b, u = string.match(raw, '^(%d+) (%d+)$')
    if not b then
      return redis.error_reply('keygate: unreadable rate-limit state at ' .. KEYS[i])
    end
    base, units = tonumber(b), tonumber(u) - back
    if units < 0 then
      local k = math.ceil(-units / limit)
      base = base - k * period
      units = units + k * limit
    end
  end
  local ahead = (base - now) + units * period / limit
  if ahead <= 0 then
    base, units, ahead = now, 0, 0
  end
  local room = math.floor((period - ahead + eps) * limit / period)
  if room < 0 then room = 0 end
  local wait
  if cost > limit then
    wait = -1
  else
    wait = ahead + cost * period / limit - period
    if wait <= eps then wait = 0 else wait = math.ceil(wait) end
  end
  if wait ~= 0 then fits = 0 end
  if room < g then g = room end
  st[i] = {base, units, period, limit, wait}
end
if fits == 0 or g < cost then g = 0 end
local out = {fits, now, tonumber(epoch), replicas, g}
for i = 1, n do
  local base, units, period, limit, wait = unpack(st[i])
  units = units + g
  local k = math.floor(units / limit)
  base = base + k * period
  units = units - k * limit
  local ahead = (base - now) + units * period / limit
  if ahead > 0 then
    redis.call('SET', KEYS[i], string.format('%.0f %.0f', base, units),
      'PX', math.ceil(ahead / 1000) + 1)
  else
    redis.call('DEL', KEYS[i])
    ahead = 0
  end
  out[#out + 1] = math.floor(ahead)
  out[#out + 1] = wait
end
return out
"#,
        ]
        .concat(),
    )
});

/// The (subject, limit, period µs) of every distinct shape of a request: what a lease is for.
type Signature = Vec<(RateSubject, u32, u64)>;

/// A limiter's leases.
pub(crate) struct RateLeases {
    pub(crate) options: LeaseOptions,
    table: DashMap<Signature, Arc<Lease>>,
    replica: String,
    replicas_key: String,
    /// Replicas that leased in the last 10 s, as Redis last counted them.
    replicas: AtomicU64,
    sweeping: AtomicBool,
    /// Requests decided from a lease without a round trip.
    pub(crate) local: AtomicU64,
    /// Leases taken (refills that granted something).
    pub(crate) taken: AtomicU64,
}

/// One lease: units debited in Redis and not spent yet.
struct Lease {
    tokens: AtomicU64,
    /// Local µs at which the lease stops being spent.
    expires: AtomicU64,
    /// Local µs before which a refused request is refused locally.
    refused_until: AtomicU64,
    /// Local µs of the last answer, and per shape the TAT's lead then (µs).
    at: AtomicU64,
    ahead: Vec<AtomicU64>,
    /// Single flight: the one refill in progress, and what sizes the next.
    refill: tokio::sync::Mutex<Meta>,
}

struct Meta {
    granted: u64,
    granted_at: u64,
    first: bool,
}

impl Lease {
    fn new(shapes: usize) -> Lease {
        Lease {
            tokens: AtomicU64::new(0),
            expires: AtomicU64::new(0),
            refused_until: AtomicU64::new(0),
            at: AtomicU64::new(0),
            ahead: (0..shapes).map(|_| AtomicU64::new(0)).collect(),
            refill: tokio::sync::Mutex::new(Meta {
                granted: 0,
                granted_at: 0,
                first: true,
            }),
        }
    }

    /// The standings `now`, as the last answer and the unspent units imply.
    fn standings(&self, shapes: &[(RateSubject, Shape)], now: u64, cost: u32) -> Vec<RateStanding> {
        let elapsed = now.saturating_sub(self.at.load(Ordering::Acquire)) as f64;
        let tokens = self.tokens.load(Ordering::Acquire) as f64;
        shapes
            .iter()
            .zip(&self.ahead)
            .map(|((_, s), ahead)| {
                // Unspent units are this replica's, not used: they count as left.
                let lead = ahead.load(Ordering::Acquire) as f64 - elapsed - tokens * s.t();
                s.standing(lead, cost)
            })
            .collect()
    }
}

impl RateLeases {
    pub(crate) fn new(options: LeaseOptions, redis: &crate::Redis) -> RateLeases {
        RateLeases {
            options,
            table: DashMap::new(),
            replica: replica_id(),
            replicas_key: redis.key(format_args!("rl:{{replicas}}")),
            replicas: AtomicU64::new(1),
            sweeping: AtomicBool::new(false),
            local: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        }
    }

    /// Whether every policy may be leased.
    pub(crate) fn leasable(&self, policies: &[RateLimitPolicy]) -> bool {
        policies.iter().all(|p| {
            u64::from(p.limit) >= self.options.min_limit && !self.options.precise.contains(&p.name)
        })
    }

    /// A lease's lifetime (µs) for these shapes: the option's, at most a tenth of a period.
    fn lifetime_us(&self, shapes: &[(RateSubject, Shape)]) -> u64 {
        shapes
            .iter()
            .map(|(_, s)| s.period_us / 10)
            .fold(micros(self.options.lifetime), u64::min)
            .max(1)
    }

    fn cap(&self, shapes: &[(RateSubject, Shape)]) -> u64 {
        let replicas = self.replicas.load(Ordering::Relaxed);
        shapes
            .iter()
            .filter_map(|(_, s)| self.options.cap(u64::from(s.limit), replicas))
            .min()
            .unwrap_or(1)
    }

    /// How many leases this replica holds.
    pub(crate) fn held(&self) -> usize {
        self.table
            .iter()
            .filter(|e| e.value().tokens.load(Ordering::Acquire) > 0)
            .count()
    }
}

fn signature(shapes: &[(RateSubject, Shape)]) -> Signature {
    shapes
        .iter()
        .map(|(sub, s)| (*sub, s.limit, s.period_us))
        .collect()
}

fn decision(allowed: bool, per_shape: &[RateStanding], index: &[usize]) -> RateDecision {
    RateDecision {
        allowed,
        standings: index.iter().map(|i| per_shape[*i]).collect(),
    }
}

impl RedisRateLimiter {
    /// A decision from this replica's lease, without I/O: allowed when the lease has the
    /// units, refused while a refusal Redis gave lately still stands; `None`: ask Redis.
    pub(crate) fn lease_local(
        &self,
        shapes: &[(RateSubject, Shape)],
        index: &[usize],
        cost: u32,
    ) -> Option<RateDecision> {
        let inner = &*self.inner;
        let leases = inner.leases.as_ref()?;
        let lease = leases.table.get(&signature(shapes)[..])?.value().clone();
        let now = inner.local_now() as u64;
        if let Some(d) = spend(&lease, shapes, index, cost, now) {
            leases.local.fetch_add(1, Ordering::Relaxed);
            return Some(d);
        }
        if now < lease.refused_until.load(Ordering::Acquire) {
            let standings = lease.standings(shapes, now, cost);
            if standings.iter().any(|s| s.violated()) {
                leases.local.fetch_add(1, Ordering::Relaxed);
                inner.prechecked.fetch_add(1, Ordering::Relaxed);
                return Some(decision(false, &standings, index));
            }
        }
        None
    }

    /// A decision that needs Redis: the one refill of this lease in flight (concurrent
    /// requests of the same key wait for it and spend from it), giving back what the
    /// previous lease did not spend and leasing the next, sized by the observed rate.
    pub(crate) async fn lease_decide(
        &self,
        shapes: &[(RateSubject, Shape)],
        index: &[usize],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        let inner = &*self.inner;
        let Some(leases) = inner.leases.as_ref() else {
            return Err(RateError::Unavailable("no leases".into()));
        };
        let lease = leases
            .table
            .entry(signature(shapes))
            .or_insert_with(|| Arc::new(Lease::new(shapes.len())))
            .clone();
        if !leases.sweeping.swap(true, Ordering::AcqRel) {
            let every = (leases.options.lifetime / 2).max(Duration::from_millis(10));
            spawn_sweeper(&self.inner, every, |inner: Arc<Inner>| async move {
                RedisRateLimiter { inner }.give_back(false).await;
            });
        }
        let mut meta = lease.refill.lock().await;
        // The refill this request waited for may have brought enough.
        let now = inner.local_now() as u64;
        if let Some(d) = spend(&lease, shapes, index, cost, now) {
            leases.local.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        let back = lease.tokens.swap(0, Ordering::AcqRel);
        let lifetime = leases.lifetime_us(shapes);
        let spent = meta.granted.saturating_sub(back);
        let size = next_size(
            leases.cap(shapes),
            spent,
            now.saturating_sub(meta.granted_at) as f64,
            lifetime as f64,
            meta.first,
        );
        let want = size.max(u64::from(cost));
        let out = self.run_lease(shapes, want, cost, back).await?;
        let (fits, granted) = (out[0] == 1, u64::try_from(out[4]).unwrap_or(0));
        leases
            .replicas
            .store(u64::try_from(out[3]).unwrap_or(1).max(1), Ordering::Relaxed);
        let now = inner.local_now() as u64;
        for (i, a) in lease.ahead.iter().enumerate() {
            a.store(
                u64::try_from(out[5 + 2 * i]).unwrap_or(0),
                Ordering::Release,
            );
        }
        lease.at.store(now, Ordering::Release);
        meta.first = false;
        meta.granted_at = now;
        if fits && granted >= u64::from(cost) {
            leases.taken.fetch_add(1, Ordering::Relaxed);
            meta.granted = granted;
            lease.refused_until.store(0, Ordering::Release);
            lease
                .expires
                .store(now.saturating_add(lifetime), Ordering::Release);
            lease
                .tokens
                .store(granted - u64::from(cost), Ordering::Release);
            let standings = lease.standings(shapes, now, 0);
            return Ok(decision(true, &standings, index));
        }
        meta.granted = 0;
        lease.expires.store(now, Ordering::Release);
        let mut per_shape = Vec::with_capacity(shapes.len());
        let mut longest = 0u64;
        for (i, (_, s)) in shapes.iter().enumerate() {
            let mut st = s.standing(out[5 + 2 * i].max(0) as f64, cost);
            let wait = out[6 + 2 * i];
            st.wait = u64::try_from(wait).ok().map(Duration::from_micros);
            longest = longest.max(u64::try_from(wait).unwrap_or(lifetime));
            per_shape.push(st);
        }
        lease
            .refused_until
            .store(now.saturating_add(longest.min(lifetime)), Ordering::Release);
        Ok(decision(false, &per_shape, index))
    }

    /// Gives `cost` back to the lease it was spent from, when that lease is still live.
    pub(crate) fn lease_refund(&self, shapes: &[(RateSubject, Shape)], cost: u32) -> bool {
        let inner = &*self.inner;
        let Some(leases) = inner.leases.as_ref() else {
            return false;
        };
        let Some(lease) = leases
            .table
            .get(&signature(shapes)[..])
            .map(|e| e.value().clone())
        else {
            return false;
        };
        let now = inner.local_now() as u64;
        if now >= lease.expires.load(Ordering::Acquire) {
            return false;
        }
        lease.tokens.fetch_add(u64::from(cost), Ordering::AcqRel);
        true
    }

    /// Gives back the unspent units of expired leases (`all`: of every lease), and forgets
    /// leases idle for long.
    pub(crate) async fn give_back(&self, all: bool) {
        let inner = &*self.inner;
        let Some(leases) = inner.leases.as_ref() else {
            return;
        };
        let now = inner.local_now() as u64;
        let due: Vec<(Signature, Arc<Lease>)> = leases
            .table
            .iter()
            .filter(|e| {
                let l = e.value();
                l.tokens.load(Ordering::Acquire) > 0
                    && (all || now >= l.expires.load(Ordering::Acquire))
            })
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (sig, lease) in due {
            let _meta = if all {
                lease.refill.lock().await
            } else {
                match lease.refill.try_lock() {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            };
            if !all && now < lease.expires.load(Ordering::Acquire) {
                continue;
            }
            let back = lease.tokens.swap(0, Ordering::AcqRel);
            if back == 0 {
                continue;
            }
            let shapes: Vec<(RateSubject, Shape)> = sig
                .iter()
                .map(|(sub, limit, period_us)| {
                    (
                        *sub,
                        Shape {
                            limit: *limit,
                            period_us: *period_us,
                        },
                    )
                })
                .collect();
            if let Err(e) = self.run_lease(&shapes, 0, 0, back).await {
                tracing::debug!(error = %e, "unspent rate-limit lease not given back (it expires in Redis by itself)");
            }
        }
        // Forget leases idle for a minute that nobody holds.
        let idle = now.saturating_sub(60_000_000);
        leases.table.retain(|_, l| {
            Arc::strong_count(l) > 1
                || l.tokens.load(Ordering::Acquire) > 0
                || l.at.load(Ordering::Acquire) > idle
        });
    }

    async fn run_lease(
        &self,
        shapes: &[(RateSubject, Shape)],
        want: u64,
        cost: u32,
        back: u64,
    ) -> Result<Vec<i64>, RateError> {
        let inner = &*self.inner;
        let Some(leases) = inner.leases.as_ref() else {
            return Err(RateError::Unavailable("no leases".into()));
        };
        let mut keys: Vec<String> = shapes.iter().map(|(sub, s)| inner.key(*sub, s)).collect();
        keys.push(inner.epoch_key.clone());
        keys.push(inner.hold_key.clone());
        keys.push(leases.replicas_key.clone());
        let mut args: Vec<String> = vec![
            inner.now_arg(),
            leases.replica.clone(),
            inner.epoch.known().to_string(),
            inner.epoch.candidate().to_string(),
            micros(inner.hold).to_string(),
            want.to_string(),
            cost.to_string(),
            back.to_string(),
        ];
        for (_, s) in shapes {
            args.push(s.period_us.to_string());
            args.push(s.limit.to_string());
        }
        inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let out: Vec<i64> = inner
            .redis
            .eval(&LEASE, keys, args)
            .await
            .map_err(unavailable)?;
        inner.check_epoch(&out)?;
        if out.len() != 5 + 2 * shapes.len() {
            return Err(RateError::Unavailable(format!(
                "the rate-limit lease script answered {} values",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// Spends `cost` from a live lease.
fn spend(
    lease: &Lease,
    shapes: &[(RateSubject, Shape)],
    index: &[usize],
    cost: u32,
    now: u64,
) -> Option<RateDecision> {
    if now >= lease.expires.load(Ordering::Acquire) {
        return None;
    }
    let cost64 = u64::from(cost);
    lease
        .tokens
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            t.checked_sub(cost64)
        })
        .ok()?;
    let standings = lease.standings(shapes, now, 0);
    Some(decision(true, &standings, index))
}
