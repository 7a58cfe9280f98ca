//! The usage store's leases: a slice of a key's quota reserved in Redis (`reserved` of the
//! window hashes, with a lease record that Redis reclaims when it expires) and spent locally;
//! what was served is reported to `used` with the next lease, exactly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use keygate_core::usage::{Admission, Increment, Limit, Usage, UsageError, UsageStore, Window};
use keygate_core::KeyId;
use redis::Script;

use crate::acks::{lock, Acks};
use crate::conn::{micros, Redis};
use crate::lease::{next_size, replica_id, spawn_sweeper, LeaseOptions, LocalClock};
use crate::usage::{member, usage_error, RedisUsageStore, MAX_EXACT};

static QUOTA_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            r#"
-- Reports the previous lease of this replica, reclaims the key's expired leases, and leases
-- the next (reserves units in every window of the request if every limit has room).
-- KEYS[1..n]: the request's window hashes; KEYS[n + 1]: the key's window index;
-- KEYS[n + 2]: the epoch; KEYS[n + 3]: the key's leases (sorted set, id by expiry in us);
-- KEYS[n + 4]: the replicas that leased lately (sorted set, by time); KEYS[n + 5]: this
-- replica's reports not yet acknowledged.
-- ARGV[1]: now (us) or "" for the server's clock; ARGV[2]: the replica's id;
-- ARGV[3]: prefix of the key's window hashes; ARGV[4]: prefix of lease records;
-- ARGV[5]: index ttl (ms); ARGV[6]: index trim score; ARGV[7]: a lease's life in Redis (us);
-- ARGV[8]: units wanted (0: only report); ARGV[9]: the cost that must fit;
-- ARGV[10]: '1' with a durable copy (windows must be seeded in this epoch first);
-- ARGV[11]: the epoch to create if there is none;
-- ARGV[12]: the previous lease's id ('': none); ARGV[13], ARGV[14]: what it served (cost,
-- requests); ARGV[15]: its windows, "member ttl member ttl ...";
-- ARGV[16]: the new lease's id; ARGV[17]: number of limits m;
-- then per window: ttl (ms, 0: never expires), member, start; then per limit: window
-- (1-based), limit; then the ids of earlier reports whose answers arrived.
-- Returns {granted?, units, replicas, epoch, then per window: used cost, requests,
-- reserved, then the violated limits (0-based)}, or {-1, epoch} when a window must be seeded
-- from the durable copy first (nothing written).
"#,
            crate::rate::LUA_NOW,
            r#"local n = #KEYS - 5
local epoch = redis.call('GET', KEYS[n + 2])
if not epoch then
  epoch = ARGV[11]
  redis.call('SET', KEYS[n + 2], epoch)
end
local function count(x)
  if not x then return 0 end
  local v = tonumber(x)
  if not v or v < 0 or v ~= math.floor(v) then return nil end
  return v
end
local want = tonumber(ARGV[8])
if want > 0 and ARGV[10] == '1' then
  for i = 1, n do
    if redis.call('HGET', KEYS[i], 'e') ~= epoch then return {-1, tonumber(epoch)} end
  end
end
local wp, lp, leases = ARGV[3], ARGV[4], KEYS[n + 3]
local function lower(win, field, amount)
  local v = count(redis.call('HGET', win, field)) or 0
  v = v - amount
  if v < 0 then v = 0 end
  redis.call('HSET', win, field, string.format('%.0f', v))
end
-- Reports are applied once: a report whose answer was lost is sent again, and finds itself
-- in the replica's hash of reports not yet acknowledged (acknowledgements ride on the
-- replica's next call, after the limits).
local reported = KEYS[n + 5]
local ack_at = 18 + 3 * n + 2 * tonumber(ARGV[17])
if #ARGV >= ack_at then
  redis.call('HDEL', reported, unpack(ARGV, ack_at, #ARGV))
end
-- The previous lease: what it served is used, the rest of its reservation is freed.
if ARGV[12] ~= '' and redis.call('HEXISTS', reported, ARGV[12]) == 0 then
  redis.call('HSET', reported, ARGV[12], 1)
  redis.call('PEXPIRE', reported, 86400000)
  local s, q = tonumber(ARGV[13]), tonumber(ARGV[14])
  local k = tonumber(redis.call('HGET', lp .. ARGV[12], 'k'))
  local words = {}
  for w in string.gmatch(ARGV[15], '%S+') do words[#words + 1] = w end
  for j = 1, #words - 1, 2 do
    local win = wp .. words[j]
    local ttl = tonumber(words[j + 1])
    redis.call('HINCRBY', win, 'c', s)
    redis.call('HINCRBY', win, 'r', q)
    if k then
      lower(win, 'v', k)
    else
      -- Reclaimed already and counted lost: what it served was not lost.
      lower(win, 'l', s)
    end
    if ttl > 0 then redis.call('PEXPIRE', win, ttl) end
  end
  redis.call('DEL', lp .. ARGV[12])
  redis.call('ZREM', leases, ARGV[12])
end
-- Expired leases (their replica crashed or lost Redis): the reservation is freed and
-- counted lost, never used.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  local rec = redis.call('HMGET', lp .. id, 'k', 'w')
  local k = tonumber(rec[1])
  if k and rec[2] then
    for m in string.gmatch(rec[2], '%S+') do
      lower(wp .. m, 'v', k)
      redis.call('HINCRBY', wp .. m, 'l', k)
    end
  end
  redis.call('DEL', lp .. id)
  redis.call('ZREM', leases, id)
end
local rk = KEYS[n + 4]
redis.call('ZADD', rk, now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - 10000000)
redis.call('PEXPIRE', rk, 60000)
local replicas = redis.call('ZCARD', rk)
local usage = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'c', 'r', 'v')
  local c, r, rv = count(v[1]), count(v[2]), count(v[3])
  if c == nil or r == nil or rv == nil then
    return redis.error_reply('keygate: unreadable usage counter')
  end
  usage[i] = {c, r, rv}
end
local m = tonumber(ARGV[17])
local at = 18 + 3 * n
local cost = tonumber(ARGV[9])
local g = want
local violated = {}
for j = 1, m do
  local w = tonumber(ARGV[at + 2 * (j - 1)])
  local lim = tonumber(ARGV[at + 2 * (j - 1) + 1])
  local room = lim - usage[w][1] - usage[w][3]
  if room < cost then violated[#violated + 1] = j - 1 end
  if room < g then g = room end
end
if #violated > 0 or g < cost then g = 0 end
local out = {0, g, replicas, tonumber(epoch)}
if g > 0 then
  out[1] = 1
  local members = {}
  for i = 1, n do
    local base = 18 + 3 * (i - 1)
    local ttl = tonumber(ARGV[base])
    usage[i][3] = usage[i][3] + g
    redis.call('HSET', KEYS[i], 'v', string.format('%.0f', usage[i][3]))
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[i], ttl)
      redis.call('ZADD', KEYS[n + 1], tonumber(ARGV[base + 2]), ARGV[base + 1])
    end
    members[#members + 1] = ARGV[base + 1]
  end
  if redis.call('EXISTS', KEYS[n + 1]) == 1 then
    redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', '(' .. ARGV[6])
    redis.call('PEXPIRE', KEYS[n + 1], ARGV[5])
  end
  local life = tonumber(ARGV[7])
  local rec = lp .. ARGV[16]
  redis.call('HSET', rec, 'k', string.format('%.0f', g), 'w', table.concat(members, ' '))
  redis.call('PEXPIRE', rec, ARGV[5])
  redis.call('ZADD', leases, now + life, ARGV[16])
  redis.call('PEXPIRE', leases, ARGV[5])
end
for i = 1, n do
  out[#out + 1] = usage[i][1]
  out[#out + 1] = usage[i][2]
  out[#out + 1] = usage[i][3]
end
for _, v in ipairs(violated) do out[#out + 1] = v end
return out
"#,
        ]
        .concat(),
    )
});

/// Where a key's window stands in Redis with leases: used (reported served), reserved by
/// live leases, and lost to leases that expired unreported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCounts {
    /// Cost served and reported (the quota's usage).
    pub used: u64,
    /// Cost reserved by live leases, not reported yet.
    pub reserved: u64,
    /// Cost reserved by leases that expired before their replica reported them (a crash):
    /// freed, never counted as used.
    pub lost: u64,
}

type LeaseKey = (KeyId, Vec<Window>);

/// The largest lease of windows without a limit (metered only): sized by the rate anyway.
const UNLIMITED_CAP: u64 = 1 << 20;

/// A store's leases.
pub(crate) struct QuotaLeases {
    pub(crate) options: LeaseOptions,
    clock: LocalClock,
    redis: Redis,
    epoch_key: String,
    epoch: Arc<crate::epoch::EpochView>,
    durable: Option<Arc<dyn UsageStore>>,
    index_ttl_ms: u64,
    replica: String,
    replicas_key: String,
    next_id: AtomicU64,
    /// The hash of this replica's reports whose answers have not been acknowledged.
    reported_key: String,
    /// Reports whose answers arrived, to drop from that hash with the next call.
    acknowledged: Acks<String>,
    replicas: AtomicU64,
    table: DashMap<LeaseKey, Arc<QLease>>,
    sweeping: AtomicBool,
    pub(crate) local: AtomicU64,
    pub(crate) taken: AtomicU64,
    /// What reports counted in Redis that the durable copy has not taken yet (it could not
    /// be written), summed per key and window; written with the next report or release.
    backlog: Mutex<std::collections::HashMap<(KeyId, Window), Usage>>,
}

struct QLease {
    state: Mutex<QState>,
    refill: tokio::sync::Mutex<()>,
}

/// A lease as this replica holds it.
#[derive(Default)]
struct QState {
    /// The lease's id ("": none).
    id: String,
    /// The windows it reserved in, with their hash ttl (ms).
    windows: Vec<(Window, u64)>,
    limits: Vec<Limit>,
    tokens: u64,
    served_cost: u64,
    served_requests: u64,
    /// Local µs from which it is not spent any more.
    expires: u64,
    /// Per window at the grant: used + reserved (cost), requests.
    base: Vec<Usage>,
    granted: u64,
    granted_at: u64,
    leased_before: bool,
}

/// A lease taken out of its slot to be reported.
struct Report {
    id: String,
    windows: Vec<(Window, u64)>,
    served: Usage,
}

impl QState {
    fn spend(&mut self, limits: &[Limit], cost: u64, now: u64) -> Option<Vec<Usage>> {
        if self.id.is_empty() || now >= self.expires || self.limits != limits || self.tokens < cost
        {
            return None;
        }
        self.tokens -= cost;
        self.served_cost += cost;
        self.served_requests += 1;
        Some(self.usage())
    }

    /// Takes `u` back out of what the lease served (and, while it is live, gives the cost
    /// back to spend); `false` when the lease did not serve that much.
    fn refund(&mut self, u: Usage, now: u64) -> bool {
        if self.id.is_empty() || self.served_cost < u.cost || self.served_requests < u.requests {
            return false;
        }
        self.served_cost -= u.cost;
        self.served_requests -= u.requests;
        if now < self.expires {
            self.tokens += u.cost;
        }
        true
    }

    fn usage(&self) -> Vec<Usage> {
        self.base
            .iter()
            .map(|b| Usage {
                cost: b.cost.saturating_sub(self.tokens),
                requests: b.requests + self.served_requests,
            })
            .collect()
    }

    /// Takes the lease out (to report it); `None` when there is none.
    fn take(&mut self) -> Option<Report> {
        if self.id.is_empty() {
            return None;
        }
        let report = Report {
            id: std::mem::take(&mut self.id),
            windows: std::mem::take(&mut self.windows),
            served: Usage {
                cost: self.served_cost,
                requests: self.served_requests,
            },
        };
        self.tokens = 0;
        self.served_cost = 0;
        self.served_requests = 0;
        self.expires = 0;
        Some(report)
    }

    /// Puts back a lease whose report failed (it is reported later; not spent again).
    fn restore(&mut self, r: Report) {
        if self.id.is_empty() {
            self.id = r.id;
            self.windows = r.windows;
            self.served_cost = r.served.cost;
            self.served_requests = r.served.requests;
            self.tokens = 0;
            self.expires = 0;
        }
    }
}

impl QuotaLeases {
    pub(crate) fn new(
        options: LeaseOptions,
        clock: LocalClock,
        store: &RedisUsageStore,
    ) -> QuotaLeases {
        let redis = store.redis.clone();
        let replica = replica_id();
        let reported_key = redis.key(format_args!("q:{{reported}}:{replica}"));
        QuotaLeases {
            reported_key,
            options,
            clock,
            replicas_key: redis.key(format_args!("q:{{replicas}}")),
            epoch_key: store.epoch_key.clone(),
            epoch: store.epoch.clone(),
            durable: store.durable.clone(),
            index_ttl_ms: store.index_ttl_ms(),
            redis,
            replica,
            next_id: AtomicU64::new(1),
            acknowledged: Acks::new(),
            replicas: AtomicU64::new(1),
            table: DashMap::new(),
            sweeping: AtomicBool::new(false),
            local: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            backlog: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether a call with these limits is leased (every limit at least `min_limit`; a
    /// call without limits, a metered window, is).
    pub(crate) fn leasable(&self, limits: &[Limit]) -> bool {
        limits.iter().all(|l| l.limit >= self.options.min_limit)
    }

    /// The largest lease for these limits.
    fn cap(&self, limits: &[Limit]) -> u64 {
        let replicas = self.replicas.load(Ordering::Relaxed);
        limits
            .iter()
            .filter_map(|l| self.options.cap(l.limit.min(MAX_EXACT), replicas))
            .min()
            .unwrap_or(UNLIMITED_CAP)
    }

    fn lifetime_us(&self) -> u64 {
        micros(self.options.lifetime).max(1)
    }

    /// How long Redis keeps a lease before reclaiming it: three lifetimes and 2 s (the
    /// grace for a slow report).
    fn redis_life_us(&self) -> u64 {
        self.lifetime_us()
            .saturating_mul(3)
            .saturating_add(2_000_000)
    }

    /// Spends from a live lease, without I/O.
    fn spend_local(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Option<Admission> {
        let lease = self
            .table
            .get(&(*key, windows.to_vec()))
            .map(|e| e.value().clone())?;
        let now = self.clock.now();
        let usage = lease.state.lock().ok()?.spend(limits, cost, now)?;
        self.local.fetch_add(1, Ordering::Relaxed);
        Some(Admission::Admitted(usage))
    }

    /// Takes refunds (`subtract`) out of what this replica's leases served and have not
    /// reported yet, where one lease served them: per key, the decrements of one request
    /// (the same usage in each window of a lease). Those units go back to the lease when it
    /// is still live. Returns the decrements left for Redis (and the durable copy): counts
    /// already reported, or not served from a lease of this replica.
    pub(crate) fn refund_local(&self, decrements: &[Increment]) -> Vec<Increment> {
        let mut rest = Vec::new();
        let mut keys: Vec<KeyId> = Vec::new();
        for d in decrements {
            if !keys.contains(&d.key) {
                keys.push(d.key);
            }
        }
        let now = self.clock.now();
        for key in keys {
            let of_key: Vec<&Increment> = decrements.iter().filter(|d| d.key == key).collect();
            let usage = of_key[0].usage;
            let windows: Vec<Window> = of_key.iter().map(|d| d.window).collect();
            let taken = of_key.iter().all(|d| d.usage == usage)
                && self
                    .table
                    .get(&(key, windows))
                    .map(|e| e.value().clone())
                    .is_some_and(|lease| match lease.state.lock() {
                        Ok(mut st) => st.refund(usage, now),
                        Err(_) => false,
                    });
            if !taken {
                rest.extend(of_key.into_iter().copied());
            }
        }
        rest
    }

    pub(crate) fn held(&self) -> usize {
        self.table
            .iter()
            .filter(|e| e.value().state.lock().is_ok_and(|s| !s.id.is_empty()))
            .count()
    }
}

impl RedisUsageStore {
    /// A check-and-add from a lease: local when this replica's lease for the key and
    /// windows has room, else one script (single flight per key and windows) that reports
    /// the previous lease and takes the next.
    pub(crate) async fn lease_check_and_add(
        &self,
        leases: &Arc<QuotaLeases>,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        if let Some(a) = leases.spend_local(key, windows, limits, cost) {
            return Ok(a);
        }
        let lease = leases
            .table
            .entry((*key, windows.to_vec()))
            .or_insert_with(|| {
                Arc::new(QLease {
                    state: Mutex::new(QState::default()),
                    refill: tokio::sync::Mutex::new(()),
                })
            })
            .clone();
        if !leases.sweeping.swap(true, Ordering::AcqRel) {
            let every = (leases.options.lifetime / 2).max(Duration::from_millis(10));
            spawn_sweeper(leases, every, |l: Arc<QuotaLeases>| async move {
                l.report_due(false).await;
            });
        }
        let _flight = lease.refill.lock().await;
        if let Some(a) = leases.spend_local(key, windows, limits, cost) {
            return Ok(a);
        }
        let now = leases.clock.now();
        let (old, size) = {
            let mut st = lease
                .state
                .lock()
                .map_err(|_| UsageError::Unavailable("a quota lease's lock is poisoned".into()))?;
            let spent = st.granted.saturating_sub(st.tokens);
            let size = next_size(
                leases.cap(limits),
                spent,
                now.saturating_sub(st.granted_at) as f64,
                leases.lifetime_us() as f64,
                !st.leased_before,
            );
            (st.take(), size)
        };
        let want = size.max(cost);
        let windows_ttl: Vec<(Window, u64)> =
            windows.iter().map(|w| (*w, self.ttl_ms(w))).collect();
        let new_id = format!(
            "{}-{}",
            leases.replica,
            leases.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut out = Err(UsageError::Unavailable("not run".into()));
        for _ in 0..3 {
            out = leases
                .run(
                    key,
                    &windows_ttl,
                    limits,
                    want,
                    cost,
                    old.as_ref(),
                    &new_id,
                    self.trim_before(windows),
                )
                .await;
            match &out {
                Ok(o) if o.first() == Some(&-1) => {
                    // Windows not seeded in this epoch: seed them from the durable copy.
                    let epoch = o.get(1).and_then(|e| u64::try_from(*e).ok()).unwrap_or(0);
                    self.seed(key, windows, epoch).await?;
                }
                _ => break,
            }
        }
        let out = match out {
            Ok(o) if o.first() != Some(&-1) => o,
            Ok(_) => {
                if let (Some(old), Ok(mut st)) = (old, lease.state.lock()) {
                    st.restore(old);
                }
                return Err(UsageError::Unavailable(
                    "Redis kept losing its state while quota counters were re-seeded".into(),
                ));
            }
            Err(e) => {
                if let (Some(old), Ok(mut st)) = (old, lease.state.lock()) {
                    st.restore(old);
                }
                return Err(e);
            }
        };
        if let Some(old) = &old {
            leases.write_through(key, old).await;
        }
        let n = windows.len();
        if out.len() < 4 + 3 * n {
            return Err(UsageError::Corrupt(format!(
                "the quota lease script answered {} values",
                out.len()
            )));
        }
        leases
            .replicas
            .store(u64::try_from(out[2]).unwrap_or(1).max(1), Ordering::Relaxed);
        let granted = u64::try_from(out[1]).unwrap_or(0);
        let read = |i: usize| u64::try_from(out[4 + 3 * i]).unwrap_or(0);
        let usage: Vec<Usage> = (0..n)
            .map(|i| Usage {
                cost: read(i).saturating_add(u64::try_from(out[6 + 3 * i]).unwrap_or(0)),
                requests: u64::try_from(out[5 + 3 * i]).unwrap_or(0),
            })
            .collect();
        let now = leases.clock.now();
        let mut st = lease
            .state
            .lock()
            .map_err(|_| UsageError::Unavailable("a quota lease's lock is poisoned".into()))?;
        st.granted_at = now;
        st.leased_before = true;
        if out[0] == 1 && granted >= cost {
            leases.taken.fetch_add(1, Ordering::Relaxed);
            st.id = new_id;
            st.windows = windows_ttl;
            st.limits = limits.to_vec();
            st.tokens = granted;
            st.granted = granted;
            st.served_cost = 0;
            st.served_requests = 0;
            st.expires = now.saturating_add(leases.lifetime_us());
            st.base = usage;
            let spent = st.spend(limits, cost, now).unwrap_or_default();
            return Ok(Admission::Admitted(spent));
        }
        st.granted = 0;
        let violated = out[4 + 3 * n..]
            .iter()
            .map(|v| usize::try_from(*v).map_err(|_| UsageError::Corrupt("bad index".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Admission::Refused { usage, violated })
    }

    /// Seeds `windows` from the durable copy for `epoch` (a check-and-add of cost 0 without
    /// limits only seeds).
    async fn seed(&self, key: &KeyId, windows: &[Window], epoch: u64) -> Result<(), UsageError> {
        let Some(durable) = &self.durable else {
            return Err(UsageError::Corrupt(
                "the quota lease script asked for seeds without a durable copy".into(),
            ));
        };
        let usage = durable.load(key, windows).await?;
        if usage.len() != windows.len() {
            return Err(UsageError::Corrupt("short durable answer".into()));
        }
        let seeds = (epoch, usage);
        // Counts nothing, so an answer lost here leaves nothing to settle.
        self.invoke(key, windows, &[], 0, Some(&seeds), self.next_op())
            .await
            .map(drop)
            .map_err(|failed| usage_error(failed.error))
    }
}

impl QuotaLeases {
    /// Reports the leases that expired (`all`: every lease) and frees what they did not
    /// spend.
    pub(crate) async fn report_due(&self, all: bool) {
        let now = self.clock.now();
        let due: Vec<(KeyId, Arc<QLease>)> = self
            .table
            .iter()
            .filter(|e| {
                e.value()
                    .state
                    .lock()
                    .is_ok_and(|s| !s.id.is_empty() && (all || now >= s.expires))
            })
            .map(|e| (e.key().0, e.value().clone()))
            .collect();
        for (key, lease) in due {
            let _flight = if all {
                lease.refill.lock().await
            } else {
                match lease.refill.try_lock() {
                    Ok(g) => g,
                    Err(_) => continue,
                }
            };
            let old = match lease.state.lock() {
                Ok(mut st) if all || now >= st.expires => st.take(),
                _ => None,
            };
            let Some(old) = old else { continue };
            match self.run(&key, &[], &[], 0, 0, Some(&old), "", 0).await {
                Ok(_) => self.write_through(&key, &old).await,
                Err(e) => {
                    tracing::debug!(error = %e, "quota lease not reported; retried later");
                    if let Ok(mut st) = lease.state.lock() {
                        st.restore(old);
                    }
                }
            }
        }
        self.write_backlog().await;
        let idle = now.saturating_sub(60_000_000);
        self.table.retain(|_, l| {
            Arc::strong_count(l) > 1
                || l.state
                    .lock()
                    .map_or(true, |s| !s.id.is_empty() || s.granted_at > idle)
        });
    }

    /// Writes what a reported lease served to the durable copy, with whatever earlier
    /// reports it could not take. When the copy cannot be written, the counts wait in the
    /// backlog for the next report or release: the durable copy is never left short (a
    /// write whose answer was lost is sent again, so it may count a report twice: an error
    /// toward refusing, should Redis lose its counters and be re-seeded from the copy).
    async fn write_through(&self, key: &KeyId, old: &Report) {
        if self.durable.is_none() || (old.served.requests == 0 && old.served.cost == 0) {
            return;
        }
        {
            let mut backlog = lock(&self.backlog);
            for (w, _) in &old.windows {
                let u = backlog.entry((*key, *w)).or_default();
                *u = u.plus(old.served);
            }
        }
        self.write_backlog().await;
    }

    /// Writes the backlog to the durable copy (all of it, or none: it stays for later).
    pub(crate) async fn write_backlog(&self) {
        let Some(durable) = &self.durable else { return };
        let increments: Vec<Increment> = lock(&self.backlog)
            .drain()
            .map(|((key, window), usage)| Increment { key, window, usage })
            .collect();
        if increments.is_empty() {
            return;
        }
        if let Err(e) = durable.add(&increments).await {
            tracing::warn!(error = %e, "the durable usage copy cannot take leases' reports now; they are kept for the next try");
            let mut backlog = lock(&self.backlog);
            for inc in increments {
                let u = backlog.entry((inc.key, inc.window)).or_default();
                *u = u.plus(inc.usage);
            }
        }
    }

    /// How many key windows wait for the durable copy.
    pub(crate) fn backlog(&self) -> usize {
        lock(&self.backlog).len()
    }

    /// One run of the lease script. `windows` empty and `want` 0: only report `old`.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        key: &KeyId,
        windows: &[(Window, u64)],
        limits: &[Limit],
        want: u64,
        cost: u64,
        old: Option<&Report>,
        new_id: &str,
        trim_before: u64,
    ) -> Result<Vec<i64>, UsageError> {
        let wp = self.redis.key(format_args!("q:{{{key}}}:"));
        let lp = self.redis.key(format_args!("q:{{{key}}}:lease:"));
        let mut keys: Vec<String> = windows
            .iter()
            .map(|(w, _)| format!("{wp}{}", member(w)))
            .collect();
        keys.push(self.redis.key(format_args!("q:{{{key}}}:w")));
        keys.push(self.epoch_key.clone());
        keys.push(self.redis.key(format_args!("q:{{{key}}}:leases")));
        keys.push(self.replicas_key.clone());
        keys.push(self.reported_key.clone());
        let old_windows = old
            .map(|o| {
                o.windows
                    .iter()
                    .map(|(w, ttl)| format!("{} {ttl}", member(w)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let mut args: Vec<String> = vec![
            self.clock.script_now(),
            self.replica.clone(),
            wp,
            lp,
            self.index_ttl_ms.to_string(),
            trim_before.to_string(),
            self.redis_life_us().to_string(),
            want.min(MAX_EXACT).to_string(),
            cost.min(MAX_EXACT).to_string(),
            if self.durable.is_some() { "1" } else { "0" }.to_owned(),
            self.epoch.candidate().to_string(),
            old.map_or(String::new(), |o| o.id.clone()),
            old.map_or(0, |o| o.served.cost).to_string(),
            old.map_or(0, |o| o.served.requests).to_string(),
            old_windows,
            new_id.to_owned(),
            limits.len().to_string(),
        ];
        for (w, ttl) in windows {
            args.push(ttl.to_string());
            args.push(member(w));
            args.push(w.start_secs().to_string());
        }
        for l in limits {
            args.push((l.window + 1).to_string());
            args.push(l.limit.min(MAX_EXACT).to_string());
        }
        let acks = self.acknowledged.take();
        args.extend(acks.iter().cloned());
        let answer: Result<Vec<i64>, UsageError> = self
            .redis
            .eval(&QUOTA_LEASE, keys, args)
            .await
            .map_err(usage_error);
        match (&answer, old) {
            (Err(_), _) => self.acknowledged.put_back(acks),
            // The report ran (a call that must seed first writes nothing).
            (Ok(out), Some(old)) if out.first() != Some(&-1) => {
                self.acknowledged.push(old.id.clone())
            }
            _ => {}
        }
        answer
    }
}
