use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keygate_core::usage::{Admission, Increment, Limit, Usage, UsageError, UsageRecord, Window};
use keygate_core::{KeyId, QuotaWindow, Refill};
use redis::Script;

use crate::acks::{lock, Acks};
use crate::conn::{Error, Failed, Redis};
use crate::epoch::{epoch_key, EpochView};
use crate::lease::{LeaseOptions, LocalClock};
use crate::quota_lease::{LeaseCounts, QuotaLeases};
use crate::rate::TimeSource;
use keygate_core::usage::UsageStore;

/// The largest count kept exactly (2^53).
pub(crate) const MAX_EXACT: u64 = 1 << 53;

/// The longest window (a calendar month or a monthly credit period), for the index's
/// horizon.
const LONGEST_WINDOW: Duration = Duration::from_secs(31 * 86_400);

static CHECK_AND_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1..n]: window hashes; KEYS[n + 1]: the key's window index; KEYS[n + 2]: the epoch;
-- KEYS[n + 3]: this store's hash of admissions not yet acknowledged; KEYS[n + 4]: its hash
-- of cancelled operations.
-- ARGV[1]: cost; ARGV[2]: number of limits m; ARGV[3]: index ttl (ms); ARGV[4]: index trim
-- score (windows starting before it are dropped from the index); ARGV[5]: the epoch to
-- create if there is none; ARGV[6]: '1' when a durable copy exists (windows not seeded in
-- this epoch must be seeded from it first); ARGV[7]: the epoch the seeds below were read
-- for ('0': no seeds);
-- then per window: ttl (ms, 0: never expires), member, start, seed cost, seed requests;
-- then per limit: window (1-based), limit; then this operation's id, then the ids of
-- earlier admissions whose answers arrived (their entries are dropped).
-- Returns {admitted, epoch, then per window: cost, requests, then the violated limits
-- (0-based)}, {-1, epoch} when windows need seeds read for that epoch, or {-3, 0} when
-- this operation was cancelled (settled as lost) before it arrived.
-- Units reserved by leases (field 'v') count as used.
local n = #KEYS - 4
local cost = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local ops, cancelled = KEYS[n + 3], KEYS[n + 4]
local op_at = 8 + 5 * n + 2 * m
local op = ARGV[op_at]
if #ARGV > op_at then
  redis.call('HDEL', ops, unpack(ARGV, op_at + 1, #ARGV))
end
if redis.call('HEXISTS', cancelled, op) == 1 then return {-3, 0} end
local epoch = redis.call('GET', KEYS[n + 2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[n + 2], epoch)
end
-- A stored count: 0 when absent, nil when not a non-negative integer (then nothing is
-- written: the script refuses before its first write, so no window is left half-counted).
local function count(x)
  if not x then return 0 end
  local v = tonumber(x)
  if not v or v < 0 or v ~= math.floor(v) then return nil end
  return v
end
local usage = {}
local unseeded = {}
local reserved = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'c', 'r', 'e', 'v')
  local c, r, rv = count(v[1]), count(v[2]), count(v[4])
  if c == nil or r == nil or rv == nil then
    return redis.error_reply('keygate: unreadable usage counter')
  end
  usage[i] = {c, r}
  reserved[i] = rv
  if ARGV[6] == '1' and v[3] ~= epoch then unseeded[#unseeded + 1] = i end
end
local idx = KEYS[n + 1]
if #unseeded > 0 then
  if ARGV[7] ~= epoch then return {-1, tonumber(epoch)} end
  -- Seed: what the durable copy holds, unless Redis already counted more.
  for _, i in ipairs(unseeded) do
    local at = 8 + 5 * (i - 1)
    usage[i][1] = math.max(usage[i][1], tonumber(ARGV[at + 3]))
    usage[i][2] = math.max(usage[i][2], tonumber(ARGV[at + 4]))
    redis.call('HSET', KEYS[i], 'c', string.format('%.0f', usage[i][1]),
      'r', string.format('%.0f', usage[i][2]), 'e', epoch)
    local ttl = tonumber(ARGV[at])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[i], ttl)
      redis.call('ZADD', idx, tonumber(ARGV[at + 2]), ARGV[at + 1])
    end
  end
  if redis.call('EXISTS', idx) == 1 then redis.call('PEXPIRE', idx, ARGV[3]) end
end
local at = 8 + 5 * n
local violated = {}
for j = 1, m do
  local w = tonumber(ARGV[at + 2 * (j - 1)])
  local lim = tonumber(ARGV[at + 2 * (j - 1) + 1])
  if usage[w][1] + reserved[w] + cost > lim then violated[#violated + 1] = j - 1 end
end
local out = {0, tonumber(epoch)}
-- A call of cost 0 without limits only seeds (what leases ask before reserving).
local requests = 1
if cost == 0 and m == 0 then requests = 0 end
if #violated == 0 then
  out[1] = 1
  for i = 1, n do
    usage[i][1] = redis.call('HINCRBY', KEYS[i], 'c', cost)
    usage[i][2] = redis.call('HINCRBY', KEYS[i], 'r', requests)
    local ttl = tonumber(ARGV[8 + 5 * (i - 1)])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[i], ttl)
      redis.call('ZADD', idx, tonumber(ARGV[10 + 5 * (i - 1)]), ARGV[9 + 5 * (i - 1)])
    end
  end
  if redis.call('EXISTS', idx) == 1 then
    redis.call('ZREMRANGEBYSCORE', idx, '-inf', '(' .. ARGV[4])
    redis.call('PEXPIRE', idx, ARGV[3])
  end
  -- Until its answer is acknowledged, the admission can be settled if the answer is lost
  -- (a seeding call counts nothing: there is nothing to settle).
  if cost > 0 or requests > 0 then
    redis.call('HSET', ops, op, 1)
    redis.call('PEXPIRE', ops, 86400000)
  end
end
for i = 1, n do
  out[#out + 1] = usage[i][1]
  out[#out + 1] = usage[i][2]
end
for _, v in ipairs(violated) do out[#out + 1] = v end
return out
"#,
    )
});

static SUBTRACT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[i], i <= n: window hashes; KEYS[n + 1]: this store's hash of refunds applied whose
-- answers were not acknowledged yet.
-- ARGV[2i - 1], ARGV[2i]: cost and requests to remove from window i (at most down to zero);
-- then this refund's id, then the ids of earlier refunds whose answers arrived (their
-- entries are dropped).
-- A refund whose id is recorded was applied already (its answer was lost and it is sent
-- again): nothing is removed twice. Windows that do not exist are left alone. An
-- unreadable counter refuses the whole call before any write (it is not "repaired" to
-- zero).
local n = #KEYS - 1
local done = KEYS[n + 1]
local op = ARGV[2 * n + 1]
if #ARGV > 2 * n + 1 then
  redis.call('HDEL', done, unpack(ARGV, 2 * n + 2, #ARGV))
end
if redis.call('HEXISTS', done, op) == 1 then return 0 end
local function count(x)
  if not x then return 0 end
  local v = tonumber(x)
  if not v or v < 0 or v ~= math.floor(v) then return nil end
  return v
end
local now = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'c', 'r')
  local c, r = count(v[1]), count(v[2])
  if c == nil or r == nil then
    return redis.error_reply('keygate: unreadable usage counter')
  end
  now[i] = {c, r, v[1] or v[2]}
end
for i = 1, n do
  if now[i][3] then
    local c = math.max(0, now[i][1] - tonumber(ARGV[2 * i - 1]))
    local r = math.max(0, now[i][2] - tonumber(ARGV[2 * i]))
    redis.call('HSET', KEYS[i], 'c', string.format('%.0f', c), 'r', string.format('%.0f', r))
  end
end
redis.call('HSET', done, op, 1)
redis.call('PEXPIRE', done, 86400000)
return 0
"#,
    )
});

static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- Settles an admission whose answer was lost. KEYS[1]: the store's unacknowledged
-- admissions; KEYS[2]: its cancelled operations; KEYS[3..]: the operation's window hashes.
-- ARGV[1]: the operation's id; ARGV[2]: its cost.
-- If the admission ran, its count is taken back (one request and the cost, at most down
-- to zero) and 1 is returned; if it did not, it is cancelled, so that it admits nothing
-- should it still arrive, and 0 is returned.
local op = ARGV[1]
if redis.call('HEXISTS', KEYS[1], op) == 1 then
  local cost = tonumber(ARGV[2])
  for i = 3, #KEYS do
    local v = redis.call('HMGET', KEYS[i], 'c', 'r')
    local c, r = tonumber(v[1]), tonumber(v[2])
    if c and r then
      redis.call('HSET', KEYS[i], 'c', string.format('%.0f', math.max(0, c - cost)),
        'r', string.format('%.0f', math.max(0, r - 1)))
    end
  end
  redis.call('HDEL', KEYS[1], op)
  return 1
end
redis.call('HSET', KEYS[2], op, 1)
redis.call('PEXPIRE', KEYS[2], 86400000)
return 0
"#,
    )
});

/// Admissions in flight and lost: what makes strict counting exact when a connection
/// fails between Redis admitting a request and the answer arriving.
struct Ledger {
    /// This store's name for its operations (random, per store value).
    id: String,
    /// The next operation's number.
    next: AtomicU64,
    /// Admissions whose answers arrived, to drop from Redis with the next call.
    acknowledged: Acks<u64>,
    /// Refunds whose answers arrived, likewise.
    refunds_acknowledged: Acks<u64>,
    /// Operations whose outcome is unknown (the call may have run, its answer lost).
    unsettled: Mutex<Vec<Lost>>,
    /// Whether a task is settling them.
    settling: AtomicBool,
    /// Admissions taken back, and operations cancelled, by settling.
    taken_back: AtomicU64,
    cancelled: AtomicU64,
}

/// An operation whose outcome is unknown.
#[derive(Clone)]
enum Lost {
    /// A strict admission: taken back if it ran, cancelled if not.
    Admission {
        op: u64,
        key: KeyId,
        windows: Vec<Window>,
        cost: u64,
    },
    /// A refund: sent again until it is known to be applied (once); then written to the
    /// durable copy too when `durable`.
    Refund {
        op: u64,
        decrements: Vec<Increment>,
        durable: bool,
    },
}

impl Lost {
    fn op(&self) -> u64 {
        match self {
            Lost::Admission { op, .. } | Lost::Refund { op, .. } => *op,
        }
    }
}

/// A [`UsageStore`] on Redis.
/// Give it to `keygate::quota::QuotaConfig::new`; with `Counting::Strict` every request is
/// one atomic check-and-add, exact across replicas.
///
/// ```no_run
/// use keygate_core::usage::{Admission, Limit, UsageStore, Window};
/// use keygate_core::{KeyId, QuotaWindow};
/// use keygate_redis::{Redis, RedisUsageStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = RedisUsageStore::new(&Redis::open("redis://127.0.0.1:6379").await.unwrap());
/// let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
/// let day = Window::containing(QuotaWindow::Day, std::time::SystemTime::now());
/// let admitted = store.check_and_add(&key, &[day], &[Limit { window: 0, limit: 1000 }], 1).await.unwrap();
/// assert!(matches!(admitted, Admission::Admitted(_)));
/// # }
/// ```
///
/// [`RedisUsageStore`]: quota counters in Redis, shared by every replica.
///
/// # Layout
/// - One hash per key and window, `{prefix}:q:{<key id>}:<kind>:<start>` (`<start>` in
///   seconds since the Unix epoch), with fields `c` (summed cost) and `r` (requests).
///   It expires [`retention`](RedisUsageStore::retention) plus the window's length after its
///   last write, so it outlives its window by at least the retention whatever clock the
///   caller uses. Credits that never refill never expire.
/// - One sorted set per key, `{prefix}:q:{<key id>}:w`, listing the key's windows by start
///   (for [`report`](keygate_core::usage::UsageStore::report)), trimmed and expiring with the
///   same horizon.
/// - Per store value (a random id each), `{prefix}:q:{ops}:<id>`, the admissions whose
///   answers were not yet acknowledged, and `{prefix}:q:{cancelled}:<id>`, operations
///   settled as lost before they ran (see [Lost answers](RedisUsageStore#lost-answers)),
///   and `{prefix}:q:{refunds}:<id>`, the refunds applied whose answers were not yet
///   acknowledged. All three expire a day after their last write.
///
/// # Atomicity
/// [`check_and_add`](keygate_core::usage::UsageStore::check_and_add) is one Lua script:
/// Redis runs scripts one at a time, so no two replicas can both take the last unit of a
/// window. [`add`](keygate_core::usage::UsageStore::add) (batched counting) is one
/// `MULTI`/`EXEC` transaction per call; [`subtract`](keygate_core::usage::UsageStore::subtract)
/// a script that saturates at zero.
///
/// # Lost answers
/// A connection can fail after Redis ran a check-and-add but before its answer arrived (a
/// cut, a timeout): the request is refused with `store_unavailable`, yet Redis counted it.
/// Strict counting stays exact anyway. Every admission is recorded in Redis under an
/// operation id until its answer is acknowledged (with the store's next call, so this costs
/// no round trip). An operation whose answer was lost is settled in the background as soon
/// as Redis answers again: if it ran, its count is taken back; if not, it is cancelled, so
/// it counts nothing should it still arrive. [`unsettled`](RedisUsageStore::unsettled)
/// says how many are pending, [`settled`](RedisUsageStore::settled) how many were taken
/// back or cancelled. So the usage Redis holds equals the requests admitted, except for
/// admissions whose replica stopped before settling them (at most the requests it had in
/// flight when its connection failed).
///
/// Refunds ([`subtract`](UsageStore::subtract): a request counted, then refused by a later
/// layer or by a check that decided while the count was in flight) are exact the same way:
/// each has an id recorded in Redis with the refund until its answer is acknowledged, so a
/// refund whose answer was lost is sent again in the background until Redis answers, and
/// applied once. `subtract` returns once the refund is applied or queued; queued refunds
/// count in [`unsettled`](RedisUsageStore::unsettled). Batched counting ([`add`](UsageStore::add)) has no
/// such ledger: the quota layer sends a batch whose answer is lost again with its next
/// flush, so that batch may be counted twice (an error toward refusing, never toward
/// serving more than the quota).
///
/// Counts are exact up to 2^53 (Lua numbers); a cost above that is refused with
/// [`UsageError::Corrupt`], and larger limits behave as 2^53.
///
/// # Losing Redis
/// Redis may lose the counters (`FLUSHALL`, the prefix's keys deleted, eviction, a restart
/// without persistence) or bring back older ones (a restart from an RDB snapshot). In strict
/// counting Redis would then hold the only copy, and every loss would reset every quota. So
/// give the store a durable copy ([`RedisUsageStore::durable`], `keygate_sql`'s usage store
/// on the key database): every count is written to it too, and a window is trusted in Redis
/// only once it was seeded in the current [epoch](crate::RestartMonitor). A window that is missing,
/// or was written in an earlier epoch, is seeded first (the larger of Redis's count and the
/// durable one, atomically in the script) and only then admits anything. A new epoch starts
/// when the epoch key is gone (a flush or a restart without persistence: noticed on the
/// next call) or when a [`RestartMonitor`](crate::RestartMonitor) sees another Redis
/// process (noticed within its period).
///
/// What stays uncovered: requests admitted in Redis whose durable write was still in flight
/// at the moment of the loss (at most the requests in flight then), and, after a restart
/// that brought back an older state, the requests admitted before the monitor's next check.
/// Without a durable copy a loss resets the windows it hit to zero.
///
/// # Leases
/// With [`RedisUsageStore::leased`] (defaults [`LeaseOptions::for_quotas`]) a check-and-add
/// whose limits are all at least `min_limit` (1000) is decided from a lease. Each window hash
/// then also holds `v` (cost reserved by live leases) and `l` (cost lost to leases that
/// expired unreported); every lease has a record `{prefix}:q:{<key id>}:lease:<id>` (its
/// amount and windows) listed by expiry in `{prefix}:q:{<key id>}:leases`.
///
/// - **Reserve**: one script reserves `k` in every window of the request if, for every
///   limit, `used + reserved + k ≤ limit` (`k` shrinks to what fits, down to the request's
///   cost; below it the request is refused). The replica then admits requests from the
///   lease locally, counting what it served. The precise check-and-add counts `reserved`
///   as used too, so precise and leased callers share a window exactly.
/// - **Report**: the next refill of the same key and windows, the background task (every
///   half lifetime, for leases past their lifetime) or
///   [`release_leases`](RedisUsageStore::release_leases) (at shutdown) report the lease in
///   the same script: `used += served`, the lease's whole reservation is freed. So once
///   every lease is reported, `used` is exactly what was served.
/// - **Crash**: a lease not reported within `3 · lifetime + 2 s` of its grant is reclaimed by
///   the next script touching the key: its reservation is freed and added to `lost`
///   ([`lease_counts`](RedisUsageStore::lease_counts)), never to `used`. `lost` is the
///   crashed replica's unspent units plus what it served since its last report (at most
///   one lease, `≤ limit / 100`); a late report of a reclaimed lease moves what it served
///   from `lost` to `used`.
/// - **Changes**: a lease is spent only under the limits it was taken for; a lowered limit
///   refills at once (the old lease reported, the new one sized for the new limit).
/// - **Durable copy**: windows are seeded before a lease is taken, and what a lease served
///   is written through when it is reported (within about one lifetime).
/// - A call with a limit below `min_limit` stays one script per request. A call without
///   limits (a metered window) is leased too, its size from the observed rate alone.
#[derive(Clone)]
pub struct RedisUsageStore {
    pub(crate) redis: Redis,
    retention: Duration,
    pub(crate) epoch_key: String,
    pub(crate) epoch: Arc<EpochView>,
    pub(crate) durable: Option<Arc<dyn UsageStore>>,
    ledger: Arc<Ledger>,
    lease_options: Option<LeaseOptions>,
    time: TimeSource,
    leases: Option<Arc<QuotaLeases>>,
}

impl RedisUsageStore {
    /// A store on `redis`, keeping counters 35 days past their window (so last month's
    /// usage can still be reported).
    pub fn new(redis: &Redis) -> Self {
        RedisUsageStore {
            redis: redis.clone(),
            retention: Duration::from_secs(35 * 86_400),
            epoch_key: epoch_key(redis),
            epoch: Arc::new(EpochView::new()),
            durable: None,
            ledger: Arc::new(Ledger {
                id: keygate_core::KeyId::generate()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_else(|_| format!("{:x}", std::process::id())),
                next: AtomicU64::new(1),
                acknowledged: Acks::new(),
                refunds_acknowledged: Acks::new(),
                unsettled: Mutex::new(Vec::new()),
                settling: AtomicBool::new(false),
                taken_back: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
            }),
            lease_options: None,
            time: TimeSource::Server,
            leases: None,
        }
    }

    /// How many strict admissions have an unknown outcome right now: the call may have
    /// counted the request in Redis, but its answer was lost (a cut connection, a
    /// timeout), so the request was refused with `store_unavailable`. Each is settled in
    /// the background as soon as Redis answers again: a count that was made is taken
    /// back, one that was not is cancelled (so that it counts nothing if it still
    /// arrives). Refunds that did not get through count here too until they are applied.
    /// Zero when nothing is pending. See [Lost answers](RedisUsageStore#lost-answers).
    pub fn unsettled(&self) -> usize {
        lock(&self.ledger.unsettled).len()
    }

    /// How many lost admissions settling has taken back (they had been counted in Redis
    /// though their requests were refused), and how many it cancelled (they had not run),
    /// since this store was made.
    pub fn settled(&self) -> (u64, u64) {
        (
            self.ledger.taken_back.load(Ordering::Relaxed),
            self.ledger.cancelled.load(Ordering::Relaxed),
        )
    }

    /// Leases quota allowances (see [`LeaseOptions`], [`LeaseOptions::for_quotas`] for the
    /// defaults): a replica reserves a slice of a key's quota in Redis and admits requests
    /// from it without a round trip; calls with a limit below the options' `min_limit` keep
    /// one script per request. See [Leases](RedisUsageStore#leases).
    pub fn leased(mut self, options: LeaseOptions) -> Self {
        self.lease_options = Some(options);
        self.rebuild_leases()
    }

    /// The clock leases expire on, locally and in Redis (default: Redis's `TIME` in the
    /// scripts, a monotonic clock locally). Tests pass a `ManualClock`.
    pub fn time_source(mut self, time: TimeSource) -> Self {
        self.time = time;
        self.rebuild_leases()
    }

    fn rebuild_leases(mut self) -> Self {
        self.leases = self.lease_options.clone().map(|o| {
            let clock = LocalClock {
                time: self.time.clone(),
                origin: Instant::now(),
            };
            Arc::new(QuotaLeases::new(o, clock, &self))
        });
        self
    }

    /// Whether quota allowances are leased.
    pub fn is_leased(&self) -> bool {
        self.leases.is_some()
    }

    /// How many check-and-adds were decided from a lease without a round trip.
    pub fn decided_locally(&self) -> u64 {
        self.leases
            .as_ref()
            .map_or(0, |l| l.local.load(Ordering::Relaxed))
    }

    /// How many leases this store took.
    pub fn leases_taken(&self) -> u64 {
        self.leases
            .as_ref()
            .map_or(0, |l| l.taken.load(Ordering::Relaxed))
    }

    /// How many leases this store holds now.
    pub fn leases_held(&self) -> usize {
        self.leases.as_ref().map_or(0, |l| l.held())
    }

    /// Reports the leases past their expiry now (a background task does it every half
    /// lifetime; tests with a manual clock call it after stepping the clock).
    pub async fn release_expired(&self) {
        if let Some(l) = &self.leases {
            l.report_due(false).await;
        }
    }

    /// How many key windows have counts that leases reported to Redis but the durable copy
    /// could not take yet (it was unreachable); they are written with the next report or
    /// release. Zero without leases or a durable copy.
    pub fn durable_backlog(&self) -> usize {
        self.leases.as_ref().map_or(0, |l| l.backlog())
    }

    /// Reports every lease (at shutdown): what they served becomes used, the rest is freed.
    pub async fn release_leases(&self) {
        if let Some(l) = &self.leases {
            l.report_due(true).await;
        }
    }

    /// Where `key`'s `windows` stand in Redis: used, reserved by live leases, lost to
    /// leases that expired unreported.
    pub async fn lease_counts(
        &self,
        key: &KeyId,
        windows: &[Window],
    ) -> Result<Vec<LeaseCounts>, UsageError> {
        let mut pipe = redis::pipe();
        for w in windows {
            pipe.cmd("HMGET")
                .arg(self.window_key(key, w))
                .arg("c")
                .arg("v")
                .arg("l");
        }
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> = self
            .redis
            .run(move |mut c| async move { pipe.query_async(&mut c).await })
            .await
            .map_err(usage_error)?;
        rows.into_iter()
            .map(|(c, v, l)| {
                Ok(LeaseCounts {
                    used: parse_count(c, "cost")?,
                    reserved: parse_count(v, "reserved")?,
                    lost: parse_count(l, "lost")?,
                })
            })
            .collect()
    }

    /// Keeps a durable copy of every count in `store` (`keygate_sql`'s usage store, say),
    /// so that losing Redis's data does not reset quotas. See [Losing Redis](RedisUsageStore#losing-redis).
    ///
    /// Every admitted [`check_and_add`](UsageStore::check_and_add), every
    /// [`add`](UsageStore::add) and [`subtract`](UsageStore::subtract) is written to `store`
    /// too, before the call returns; when that write fails, the Redis count is taken back and
    /// the call fails with [`UsageError::Unavailable`] (the quota layer answers 503
    /// `store_unavailable`). A window that Redis has not counted in the current epoch is
    /// seeded from `store` before it admits anything; [`report`](UsageStore::report) reads
    /// `store`.
    pub fn durable(mut self, store: impl UsageStore) -> Self {
        self.durable = Some(Arc::new(store));
        self.rebuild_leases()
    }

    /// Whether a durable copy is kept.
    pub fn has_durable_copy(&self) -> bool {
        self.durable.is_some()
    }

    /// How long counters are kept after their window ends (default 35 days).
    pub fn retention(mut self, keep: Duration) -> Self {
        self.retention = keep;
        self.rebuild_leases()
    }

    fn window_key(&self, key: &KeyId, w: &Window) -> String {
        self.redis.key(format_args!("q:{{{key}}}:{}", member(w)))
    }

    fn index_key(&self, key: &KeyId) -> String {
        self.redis.key(format_args!("q:{{{key}}}:w"))
    }

    /// How long a window's hash lives after a write (ms); 0: forever.
    pub(crate) fn ttl_ms(&self, w: &Window) -> u64 {
        match w.length() {
            Some(len) => millis(len.saturating_add(self.retention)).max(1),
            None => 0,
        }
    }

    /// The index's lifetime after a write (ms), longer than any window's.
    pub(crate) fn index_ttl_ms(&self) -> u64 {
        millis(LONGEST_WINDOW.saturating_add(self.retention)).max(1)
    }

    /// Windows starting before this (seconds) are dropped from the index.
    pub(crate) fn trim_before(&self, windows: &[Window]) -> u64 {
        let earliest = windows
            .iter()
            .filter(|w| w.end.is_some())
            .map(Window::start_secs)
            .min()
            .unwrap_or(0);
        earliest.saturating_sub(LONGEST_WINDOW.saturating_add(self.retention).as_secs())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The kind of a window as stored: `hour`, `day`, `month`, `credits`, `credits_daily`,
/// `credits_monthly15`.
fn kind_token(kind: QuotaWindow) -> String {
    match kind {
        QuotaWindow::Credits(Refill::Monthly { day }) => format!("credits_monthly{day}"),
        other => other.as_str().to_owned(),
    }
}

fn parse_kind(token: &str) -> Option<QuotaWindow> {
    Some(match token {
        "hour" => QuotaWindow::Hour,
        "day" => QuotaWindow::Day,
        "month" => QuotaWindow::Month,
        "credits" => QuotaWindow::Credits(Refill::Never),
        "credits_daily" => QuotaWindow::Credits(Refill::Daily),
        other => {
            let day: u8 = other.strip_prefix("credits_monthly")?.parse().ok()?;
            QuotaWindow::Credits(Refill::Monthly { day })
        }
    })
}

/// The index member (and hash-name suffix) of a window: `<kind>:<start>`.
pub(crate) fn member(w: &Window) -> String {
    format!("{}:{}", kind_token(w.kind), w.start_secs())
}

/// The window of an index member; `None` if unreadable or not the window its start implies.
fn parse_member(s: &str) -> Option<Window> {
    let (kind, start) = s.rsplit_once(':')?;
    let kind = parse_kind(kind)?;
    let start: u64 = start.parse().ok()?;
    let w = Window::containing(kind, UNIX_EPOCH + Duration::from_secs(start));
    (w.start_secs() == start).then_some(w)
}

pub(crate) fn usage_error(e: Error) -> UsageError {
    match e {
        Error::Unavailable(s) => UsageError::Unavailable(s),
        Error::Unexpected(s) => UsageError::Corrupt(s),
    }
}

fn to_usage(cost: i64, requests: i64) -> Result<Usage, UsageError> {
    match (u64::try_from(cost), u64::try_from(requests)) {
        (Ok(cost), Ok(requests)) => Ok(Usage { cost, requests }),
        _ => Err(UsageError::Corrupt(format!(
            "negative usage ({cost}, {requests})"
        ))),
    }
}

fn parse_count(v: Option<String>, what: &str) -> Result<u64, UsageError> {
    match v {
        None => Ok(0),
        Some(s) => s
            .parse()
            .map_err(|_| UsageError::Corrupt(format!("unreadable {what} counter"))),
    }
}

impl RedisUsageStore {
    /// The usage of each window; `None` for a window never counted (or expired).
    async fn read(
        &self,
        key: &KeyId,
        windows: &[Window],
    ) -> Result<Vec<Option<Usage>>, UsageError> {
        Ok(self
            .read_seeded(key, windows)
            .await?
            .into_iter()
            .map(|row| row.map(|(usage, _)| usage))
            .collect())
    }

    /// The usage of each window (`None`: never counted, or expired) and whether it was
    /// seeded (or counted by a check-and-add) in the current epoch.
    async fn read_seeded(
        &self,
        key: &KeyId,
        windows: &[Window],
    ) -> Result<Vec<Option<(Usage, bool)>>, UsageError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&self.epoch_key);
        for w in windows {
            pipe.cmd("HMGET")
                .arg(self.window_key(key, w))
                .arg("c")
                .arg("r")
                .arg("e");
        }
        let mut values: Vec<redis::Value> = self
            .redis
            .run(move |mut c| async move { pipe.query_async(&mut c).await })
            .await
            .map_err(usage_error)?;
        if values.len() != windows.len() + 1 {
            return Err(UsageError::Corrupt("short answer to a usage read".into()));
        }
        let unreadable = |_| UsageError::Corrupt("unreadable usage counter".into());
        let rows = values.split_off(1);
        let epoch: Option<String> =
            redis::from_redis_value(values.remove(0)).map_err(unreadable)?;
        rows.into_iter()
            .map(|v| {
                let (c, r, e): (Option<String>, Option<String>, Option<String>) =
                    redis::from_redis_value(v).map_err(unreadable)?;
                if c.is_none() && r.is_none() {
                    return Ok(None);
                }
                let seeded = epoch.is_some() && e == epoch;
                Ok(Some((
                    Usage {
                        cost: parse_count(c, "cost")?,
                        requests: parse_count(r, "request")?,
                    },
                    seeded,
                )))
            })
            .collect()
    }

    /// One run of the check-and-add script; `seeds`: the epoch and the durable usage of
    /// every window.
    pub(crate) async fn invoke(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
        seeds: Option<&(u64, Vec<Usage>)>,
        op: u64,
    ) -> Result<Vec<i64>, Failed> {
        let mut keys: Vec<String> = windows.iter().map(|w| self.window_key(key, w)).collect();
        keys.push(self.index_key(key));
        keys.push(self.epoch_key.clone());
        keys.push(self.ops_key());
        keys.push(self.cancelled_key());
        let mut args: Vec<String> = vec![
            cost.to_string(),
            limits.len().to_string(),
            self.index_ttl_ms().to_string(),
            self.trim_before(windows).to_string(),
            self.epoch.candidate().to_string(),
            if self.durable.is_some() { "1" } else { "0" }.to_owned(),
            seeds.map_or(0, |(epoch, _)| *epoch).to_string(),
        ];
        for (i, w) in windows.iter().enumerate() {
            let seed = seeds
                .and_then(|(_, usage)| usage.get(i).copied())
                .unwrap_or_default();
            args.push(self.ttl_ms(w).to_string());
            args.push(member(w));
            args.push(w.start_secs().to_string());
            args.push(seed.cost.min(MAX_EXACT).to_string());
            args.push(seed.requests.min(MAX_EXACT).to_string());
        }
        for l in limits {
            args.push((l.window + 1).to_string());
            args.push(l.limit.min(MAX_EXACT).to_string());
        }
        args.push(op.to_string());
        let acks = self.ledger.acknowledged.take();
        args.extend(acks.iter().map(u64::to_string));
        let answer = self.redis.eval_tracked(&CHECK_AND_ADD, keys, args).await;
        if answer.is_err() {
            self.ledger.acknowledged.put_back(acks);
        }
        answer
    }

    /// A new operation id (see [Lost answers](RedisUsageStore#lost-answers)).
    pub(crate) fn next_op(&self) -> u64 {
        self.ledger.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The hash of this store's admissions whose answers have not been acknowledged.
    fn ops_key(&self) -> String {
        self.redis.key(format_args!("q:{{ops}}:{}", self.ledger.id))
    }

    /// The hash of this store's cancelled operations.
    fn cancelled_key(&self) -> String {
        self.redis
            .key(format_args!("q:{{cancelled}}:{}", self.ledger.id))
    }

    /// Records an operation whose outcome is unknown, and makes sure a task settles it.
    fn lost(&self, lost: Lost) {
        lock(&self.ledger.unsettled).push(lost);
        self.settle_in_background();
    }

    fn settle_in_background(&self) {
        if self.ledger.settling.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.ledger.settling.store(false, Ordering::Release);
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            let mut pause = Duration::from_millis(20);
            loop {
                let next = lock(&store.ledger.unsettled).first().cloned();
                let Some(next) = next else {
                    store.ledger.settling.store(false, Ordering::Release);
                    // Something lost between the last look and the flag: settle it too.
                    if lock(&store.ledger.unsettled).is_empty()
                        || store.ledger.settling.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                    continue;
                };
                let op = next.op();
                let outcome = match next {
                    Lost::Admission {
                        key, windows, cost, ..
                    } => store
                        .settle(op, &key, &windows, cost)
                        .await
                        .map(|taken_back| {
                            Some(if taken_back {
                                &store.ledger.taken_back
                            } else {
                                &store.ledger.cancelled
                            })
                        }),
                    Lost::Refund {
                        decrements,
                        durable,
                        ..
                    } => match store.redis_subtract(&decrements, op).await {
                        Ok(()) => {
                            if let (true, Some(copy)) = (durable, &store.durable) {
                                if let Err(e) = copy.subtract(&decrements).await {
                                    tracing::warn!(error = %e, "a quota refund could not be written to the durable copy; it keeps the count");
                                }
                            }
                            Ok(None)
                        }
                        Err(Failed { error, .. }) if refused_by_script(&error) => {
                            // An unreadable counter: sending it again would not help.
                            tracing::warn!(error = %error, "a quota refund was refused by Redis; the count stays");
                            Ok(None)
                        }
                        Err(f) => Err(usage_error(f.error)),
                    },
                };
                match outcome {
                    Ok(counter) => {
                        lock(&store.ledger.unsettled).retain(|l| l.op() != op);
                        if let Some(counter) = counter {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        pause = Duration::from_millis(20);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a lost quota admission or refund is not settled yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Settles one lost admission: `true` when it had been counted (and is now taken
    /// back), `false` when it had not run (and is now cancelled).
    async fn settle(
        &self,
        op: u64,
        key: &KeyId,
        windows: &[Window],
        cost: u64,
    ) -> Result<bool, UsageError> {
        let mut keys = vec![self.ops_key(), self.cancelled_key()];
        keys.extend(windows.iter().map(|w| self.window_key(key, w)));
        let taken_back: i64 = self
            .redis
            .eval(&SETTLE, keys, vec![op, cost.min(MAX_EXACT)])
            .await
            .map_err(usage_error)?;
        Ok(taken_back == 1)
    }

    /// What the durable copy holds for `windows`.
    async fn durable_load(
        &self,
        durable: &dyn UsageStore,
        key: &KeyId,
        windows: &[Window],
    ) -> Result<Vec<Usage>, UsageError> {
        let usage = durable.load(key, windows).await?;
        if usage.len() != windows.len() {
            return Err(UsageError::Corrupt(format!(
                "the durable usage copy answered {} windows of {}",
                usage.len(),
                windows.len()
            )));
        }
        Ok(usage)
    }

    /// Writes `increments` (an `add`) to the durable copy; if that fails, takes them back from Redis
    /// (best effort) and fails.
    async fn write_through(&self, increments: &[Increment]) -> Result<(), UsageError> {
        let Some(durable) = &self.durable else {
            return Ok(());
        };
        if let Err(e) = durable.add(increments).await {
            tracing::warn!(error = %e, "the durable usage copy could not be written; the Redis count is taken back");
            // Redis only: the durable copy never took them.
            if let Err(undo) = self.refund(increments, false).await {
                tracing::warn!(error = %undo, "could not take back the Redis count: it stays counted");
            }
            return Err(UsageError::Unavailable(format!(
                "the durable usage copy could not be written: {e}"
            )));
        }
        Ok(())
    }

    async fn redis_add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        if increments.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for inc in increments {
            if inc.usage.cost > MAX_EXACT || inc.usage.requests > MAX_EXACT {
                return Err(UsageError::Corrupt(
                    "usage above what Redis counts exactly (2^53)".into(),
                ));
            }
            let wkey = self.window_key(&inc.key, &inc.window);
            pipe.cmd("HINCRBY")
                .arg(&wkey)
                .arg("c")
                .arg(inc.usage.cost)
                .ignore();
            pipe.cmd("HINCRBY")
                .arg(&wkey)
                .arg("r")
                .arg(inc.usage.requests)
                .ignore();
            let ttl = self.ttl_ms(&inc.window);
            if ttl > 0 {
                let idx = self.index_key(&inc.key);
                pipe.cmd("PEXPIRE").arg(&wkey).arg(ttl).ignore();
                pipe.cmd("ZADD")
                    .arg(&idx)
                    .arg(inc.window.start_secs())
                    .arg(member(&inc.window))
                    .ignore();
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(&idx)
                    .arg("-inf")
                    .arg(format!(
                        "({}",
                        self.trim_before(std::slice::from_ref(&inc.window))
                    ))
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&idx)
                    .arg(self.index_ttl_ms())
                    .ignore();
            }
        }
        self.redis
            .run(move |mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(usage_error)
    }

    /// Takes `decrements` back from Redis, exactly once, then (with `durable`) from the
    /// durable copy; without `durable` for counts the durable copy never took: now,
    /// or (when Redis does not answer) in the background as soon as it answers again,
    /// counted in [`unsettled`](Self::unsettled) until then (the durable copy is written
    /// after Redis, so a window re-seeded from it in between is not given back twice).
    /// Fails only when Redis refused it (an unreadable counter: sending it again would not
    /// help), or when the durable copy could not be written.
    async fn refund(&self, decrements: &[Increment], durable: bool) -> Result<(), UsageError> {
        if decrements.is_empty() {
            return Ok(());
        }
        let op = self.next_op();
        match self.redis_subtract(decrements, op).await {
            Ok(()) => match (&self.durable, durable) {
                (Some(copy), true) => copy.subtract(decrements).await,
                _ => Ok(()),
            },
            Err(Failed { error, .. }) if refused_by_script(&error) => Err(usage_error(error)),
            Err(Failed { error, .. }) => {
                tracing::debug!(error = %error, "a quota refund did not get through; it is sent again in the background");
                self.lost(Lost::Refund {
                    op,
                    decrements: decrements.to_vec(),
                    durable,
                });
                Ok(())
            }
        }
    }

    /// One refund (`op`): applied once however often it is sent.
    async fn redis_subtract(&self, decrements: &[Increment], op: u64) -> Result<(), Failed> {
        let mut keys: Vec<String> = decrements
            .iter()
            .map(|d| self.window_key(&d.key, &d.window))
            .collect();
        keys.push(self.refunds_key());
        let mut args: Vec<u64> = decrements
            .iter()
            .flat_map(|d| [d.usage.cost.min(MAX_EXACT), d.usage.requests.min(MAX_EXACT)])
            .collect();
        args.push(op);
        let acks = self.ledger.refunds_acknowledged.take();
        args.extend(&acks);
        match self
            .redis
            .eval_tracked::<i64, _>(&SUBTRACT, keys, args)
            .await
        {
            Ok(_) => {
                self.ledger.refunds_acknowledged.push(op);
                Ok(())
            }
            Err(failed) => {
                self.ledger.refunds_acknowledged.put_back(acks);
                Err(failed)
            }
        }
    }

    /// The hash of this store's applied refunds whose answers were not acknowledged.
    fn refunds_key(&self) -> String {
        self.redis
            .key(format_args!("q:{{refunds}}:{}", self.ledger.id))
    }
}

/// A strict admission on its way to Redis: if dropped armed (its future dropped before
/// the answer arrived), the admission is settled as lost, so a count it made is taken back.
struct InFlight<'a> {
    store: &'a RedisUsageStore,
    op: u64,
    key: &'a KeyId,
    windows: &'a [Window],
    cost: u64,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.lost(Lost::Admission {
                op: self.op,
                key: *self.key,
                windows: self.windows.to_vec(),
                cost: self.cost,
            });
        }
    }
}

/// Whether Redis refused a refund for a reason sending it again would not cure (keygate's
/// script found an unreadable counter, or any other error of the script's). Unreachable,
/// and the server's passing states (`LOADING` after a restart, `READONLY` after a failover,
/// `BUSY`, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`), are worth another try.
fn refused_by_script(error: &Error) -> bool {
    const PASSING: [&str; 6] = [
        "LOADING",
        "READONLY",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "CLUSTERDOWN",
    ];
    match error {
        Error::Unavailable(_) => false,
        Error::Unexpected(e) => !PASSING.iter().any(|code| e.contains(code)),
    }
}

#[async_trait]
impl keygate_core::usage::UsageStore for RedisUsageStore {
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError> {
        let rows = self.read_seeded(key, windows).await?;
        let mut usage: Vec<Usage> = rows
            .iter()
            .map(|r| r.map(|(u, _)| u).unwrap_or_default())
            .collect();
        if let Some(durable) = &self.durable {
            if rows.iter().any(|r| !r.is_some_and(|(_, seeded)| seeded)) {
                // Not counted in this epoch: Redis may have lost it; the durable copy did not.
                let kept = self.durable_load(&**durable, key, windows).await?;
                for ((u, row), k) in usage.iter_mut().zip(&rows).zip(kept) {
                    if !row.is_some_and(|(_, seeded)| seeded) {
                        u.cost = u.cost.max(k.cost);
                        u.requests = u.requests.max(k.requests);
                    }
                }
            }
        }
        Ok(usage)
    }

    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        if cost > MAX_EXACT {
            return Err(UsageError::Corrupt(format!(
                "a cost of {cost} is above what Redis counts exactly (2^53)"
            )));
        }
        if let Some(l) = limits.iter().find(|l| l.window >= windows.len()) {
            return Err(UsageError::Corrupt(format!(
                "limit names window {} of {}",
                l.window,
                windows.len()
            )));
        }
        if let Some(leases) = &self.leases {
            if cost > 0 && leases.leasable(limits) {
                return self
                    .lease_check_and_add(leases, key, windows, limits, cost)
                    .await;
            }
        }
        let mut seeds: Option<(u64, Vec<Usage>)> = None;
        // A new epoch can start between reading the seeds and using them (a flush, again):
        // then they are read again, a few times at most.
        let op = self.next_op();
        for _ in 0..3 {
            // Settled as lost if this future is dropped before the answer arrives (the
            // request went no further: a client gone, or a check before the quota refused
            // while this call was in flight).
            let mut in_flight = InFlight {
                store: self,
                op,
                key,
                windows,
                cost,
                armed: true,
            };
            let answer = self
                .invoke(key, windows, limits, cost, seeds.as_ref(), op)
                .await;
            in_flight.armed = false;
            let out = match answer {
                Ok(out) => out,
                Err(Failed { error, maybe_ran }) => {
                    if maybe_ran {
                        self.lost(Lost::Admission {
                            op,
                            key: *key,
                            windows: windows.to_vec(),
                            cost,
                        });
                    }
                    return Err(usage_error(error));
                }
            };
            if out.first() == Some(&-3) {
                return Err(UsageError::Unavailable(
                    "this quota check was settled as lost before it arrived".into(),
                ));
            }
            let epoch = out.get(1).and_then(|e| u64::try_from(*e).ok()).unwrap_or(0);
            if out.first() == Some(&-1) {
                let Some(durable) = &self.durable else {
                    return Err(UsageError::Corrupt(
                        "the quota script asked for seeds without a durable copy".into(),
                    ));
                };
                seeds = Some((epoch, self.durable_load(&**durable, key, windows).await?));
                continue;
            }
            if self.epoch.saw(epoch) {
                tracing::warn!(
                    "Redis lost keygate's quota counters (flushed, evicted or restarted); {}",
                    if self.durable.is_some() {
                        "windows are re-seeded from the durable copy"
                    } else {
                        "without a durable copy they start over from zero"
                    }
                );
            }
            return self.admission(key, windows, cost, &out, op).await;
        }
        Err(UsageError::Unavailable(
            "Redis kept losing its state while quota counters were re-seeded".into(),
        ))
    }

    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        if increments
            .iter()
            .any(|inc| inc.usage.cost > MAX_EXACT || inc.usage.requests > MAX_EXACT)
        {
            return Err(UsageError::Corrupt(
                "usage above what Redis counts exactly (2^53)".into(),
            ));
        }
        self.redis_add(increments).await?;
        self.write_through(increments).await
    }

    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError> {
        // With leases, a refund of a request a lease served and has not reported yet comes
        // out of the lease (neither Redis nor the durable copy has counted it).
        let rest;
        let decrements = match &self.leases {
            Some(leases) => {
                rest = leases.refund_local(decrements);
                &rest[..]
            }
            None => decrements,
        };
        if decrements.is_empty() {
            return Ok(());
        }
        self.refund(decrements, true).await
    }

    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        if let Some(durable) = &self.durable {
            // Complete even after Redis lost windows.
            return durable.report(key, from, to).await;
        }
        let secs_ceil = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            d.as_secs() + u64::from(d.subsec_nanos() > 0)
        };
        let (lo, hi) = (secs_ceil(from), secs_ceil(to));
        if lo >= hi {
            return Ok(Vec::new());
        }
        let idx = self.index_key(key);
        let members: Vec<String> = self
            .redis
            .run(move |mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(idx)
                    .arg(lo)
                    .arg(format!("({hi}"))
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(usage_error)?;
        let mut windows: Vec<Window> = members.iter().filter_map(|m| parse_member(m)).collect();
        // Never-refilling credits start at the epoch and are not indexed.
        if lo == 0 {
            windows.push(Window::containing(
                QuotaWindow::Credits(Refill::Never),
                UNIX_EPOCH,
            ));
        }
        let usage = self.read(key, &windows).await?;
        let mut rows: Vec<UsageRecord> = windows
            .into_iter()
            .zip(usage)
            .filter_map(|(window, usage)| {
                Some(UsageRecord {
                    key: *key,
                    window,
                    usage: usage?,
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.window.start, a.window.kind.as_str()).cmp(&(b.window.start, b.window.kind.as_str()))
        });
        Ok(rows)
    }
}

impl RedisUsageStore {
    /// The answer of an (unseeded or seeded) check-and-add; writes an admission through.
    async fn admission(
        &self,
        key: &KeyId,
        windows: &[Window],
        cost: u64,
        out: &[i64],
        op: u64,
    ) -> Result<Admission, UsageError> {
        let n = windows.len();
        if out.len() < 2 + 2 * n {
            return Err(UsageError::Corrupt(format!(
                "the quota script answered {} values",
                out.len()
            )));
        }
        let usage = (0..n)
            .map(|i| to_usage(out[2 + 2 * i], out[3 + 2 * i]))
            .collect::<Result<Vec<_>, _>>()?;
        if out[0] == 1 {
            if let Some(durable) = &self.durable {
                let increments: Vec<Increment> = windows
                    .iter()
                    .map(|w| Increment {
                        key: *key,
                        window: *w,
                        usage: Usage { cost, requests: 1 },
                    })
                    .collect();
                if let Err(e) = durable.add(&increments).await {
                    tracing::warn!(error = %e, "the durable usage copy could not be written; the Redis count is taken back");
                    // Taken back now if Redis answers, else settled in the background
                    // (the admission stays unacknowledged until then).
                    match self.settle(op, key, windows, cost).await {
                        Ok(_) => {}
                        Err(_) => self.lost(Lost::Admission {
                            op,
                            key: *key,
                            windows: windows.to_vec(),
                            cost,
                        }),
                    }
                    return Err(UsageError::Unavailable(format!(
                        "the durable usage copy could not be written: {e}"
                    )));
                }
            }
            self.ledger.acknowledged.push(op);
            return Ok(Admission::Admitted(usage));
        }
        let violated = out[2 + 2 * n..]
            .iter()
            .map(|v| usize::try_from(*v).map_err(|_| UsageError::Corrupt("bad index".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Admission::Refused { usage, violated })
    }
}

impl std::fmt::Debug for RedisUsageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUsageStore")
            .field("redis", &self.redis)
            .field("retention", &self.retention)
            .field("durable", &self.durable.is_some())
            .field("leased", &self.leases.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::usage::utc;

    #[test]
    fn refunds_are_retried_unless_the_script_refused_them() {
        let unexpected = |s: &str| Error::Unexpected(s.into());
        assert!(refused_by_script(&unexpected(
            "An error was signalled by the server - ResponseError: keygate: unreadable usage counter"
        )));
        for passing in [
            "LOADING: Redis is loading the dataset in memory",
            "READONLY: You can't write against a read only replica.",
            "BUSY: Redis is busy running a script.",
        ] {
            assert!(!refused_by_script(&unexpected(passing)), "{passing}");
        }
        assert!(!refused_by_script(&Error::Unavailable("cut".into())));
    }

    #[test]
    fn members_round_trip() {
        let at = utc(2026, 5, 17, 10, 30, 0);
        for kind in [
            QuotaWindow::Hour,
            QuotaWindow::Day,
            QuotaWindow::Month,
            QuotaWindow::Credits(Refill::Never),
            QuotaWindow::Credits(Refill::Daily),
            QuotaWindow::Credits(Refill::Monthly { day: 15 }),
            QuotaWindow::Credits(Refill::Monthly { day: 31 }),
        ] {
            let w = Window::containing(kind, at);
            assert_eq!(parse_member(&member(&w)), Some(w), "{kind:?}");
        }
        assert_eq!(parse_member("hour:12"), None, "not an hour's start");
        assert_eq!(parse_member("weekly:0"), None);
        assert_eq!(parse_member("credits_monthlyX:0"), None);
        assert_eq!(parse_member("nonsense"), None);
    }
}
