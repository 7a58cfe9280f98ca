use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::conn::{Error, Redis};

/// Tokens are below 2^53, so Lua numbers carry them exactly.
const TOKEN_MASK: u64 = (1 << 53) - 1;

pub(crate) fn epoch_key(redis: &Redis) -> String {
    redis.key(format_args!("epoch"))
}

pub(crate) fn hold_key(redis: &Redis) -> String {
    redis.key(format_args!("epoch:hold"))
}

fn run_key(redis: &Redis) -> String {
    redis.key(format_args!("epoch:run"))
}

/// A new random epoch token in `1..2^53`.
pub(crate) fn new_token() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() & TOKEN_MASK).max(1)
}

/// A replica's view of the epoch: the token it last saw (0: none yet) and the token it
/// offers when the epoch must be created.
#[derive(Debug)]
pub(crate) struct EpochView {
    known: AtomicU64,
    candidate: AtomicU64,
}

impl EpochView {
    pub(crate) fn new() -> EpochView {
        EpochView {
            known: AtomicU64::new(0),
            candidate: AtomicU64::new(new_token()),
        }
    }

    pub(crate) fn known(&self) -> u64 {
        self.known.load(Ordering::Acquire)
    }

    pub(crate) fn candidate(&self) -> u64 {
        self.candidate.load(Ordering::Acquire)
    }

    /// Records the token a script answered. Returns `true` when it differs from one seen
    /// before (the state was lost or replaced since).
    pub(crate) fn saw(&self, token: u64) -> bool {
        let cand = self.candidate();
        if token == cand {
            // This replica's candidate became the epoch: offer another one next time.
            let _ = self.candidate.compare_exchange(
                cand,
                new_token(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        let before = self.known.swap(token, Ordering::AcqRel);
        before != 0 && before != token
    }
}

static RUN_CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS[1]: the run id the epoch belongs to; KEYS[2]: the epoch.
-- ARGV[1]: the server's run id now; ARGV[2]: a new epoch token.
-- Returns 1 when Redis restarted since the epoch was stamped (a new epoch was started).
local seen = redis.call('GET', KEYS[1])
if seen == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if seen then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"#,
    )
});

impl Redis {
    /// The `run_id` of the Redis process answering (from `INFO server`).
    pub async fn run_id(&self) -> Result<String, Error> {
        let info: String = self
            .run(|mut c| async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut c)
                    .await
            })
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty() && id.len() <= 64)
            .ok_or_else(|| Error::Unexpected("INFO server has no run_id".into()))
    }

    /// Checks once whether the Redis process changed since the epoch was stamped; if so
    /// starts a new epoch (see the [`RestartMonitor`] docs). Returns `true` when it did.
    pub async fn check_restart(&self) -> Result<bool, Error> {
        let run_id = self.run_id().await?;
        let (run, epoch) = (run_key(self), epoch_key(self));
        let token = new_token();
        let restarted: i64 = self
            .run(move |mut c| async move {
                RUN_CHECK
                    .key(run)
                    .key(epoch)
                    .arg(run_id)
                    .arg(token.to_string())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if restarted == 1 {
            tracing::warn!(
                "Redis restarted since keygate's state was written: a new epoch starts \
                 (quotas re-seeded from the durable copy, rate limits held)"
            );
        }
        Ok(restarted == 1)
    }

    /// Runs a task that calls [`Redis::check_restart`] every `every` (at least 10 ms), so
    /// a Redis restart that brought back an older state (or none) is noticed within
    /// `every`. One per replica is enough (several are harmless). Must be called within a
    /// tokio runtime; dropping the monitor stops it.
    pub fn detect_restarts(&self, every: Duration) -> RestartMonitor {
        let every = every.max(Duration::from_millis(10));
        let state = Arc::new(MonitorState::default());
        let (tx, mut rx) = oneshot::channel::<()>();
        let (redis, st) = (self.clone(), state.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut rx => return,
                    _ = tick.tick() => {}
                }
                match redis.check_restart().await {
                    Ok(restarted) => {
                        if restarted {
                            st.restarts.fetch_add(1, Ordering::AcqRel);
                        }
                        st.checks.fetch_add(1, Ordering::AcqRel);
                        st.failing.store(false, Ordering::Release);
                    }
                    Err(e) => {
                        if !st.failing.swap(true, Ordering::AcqRel) {
                            tracing::warn!(error = %e, "cannot check whether Redis restarted");
                        }
                    }
                }
            }
        });
        RestartMonitor {
            stop: Some(tx),
            task,
            state,
        }
    }
}

#[derive(Default)]
struct MonitorState {
    checks: AtomicU64,
    restarts: AtomicU64,
    failing: AtomicBool,
}

/// The task made by [`Redis::detect_restarts`]. Dropping it stops the task.
///
/// Noticing that Redis lost (or went back on) keygate's state: the epoch.
///
/// Redis can lose what keygate keeps under the prefix: `FLUSHALL`/`FLUSHDB`, someone
/// deleting the prefix's keys, eviction under `maxmemory`, or a restart without persistence.
/// A restart *with* persistence can also bring back an older state (an RDB snapshot, or an
/// AOF synced once a second). Counting on from such a state would silently reset rate
/// limits and quotas, so keygate marks its state with an **epoch**:
///
/// - `{prefix}:epoch` holds a random token. Every rate-limit and quota script reads it (no
///   extra round trip); when it is missing, the script creates a new one. A replica
///   remembers the token it last saw, so a different (or missing) token means the state it
///   counted in is gone.
/// - `{prefix}:epoch:run` holds the `run_id` (from `INFO server`) of the Redis process the
///   epoch belongs to. A [`RestartMonitor`] ([`Redis::detect_restarts`]) polls it: when
///   Redis restarted (another `run_id`) whatever survived is a snapshot of an older state,
///   and the monitor starts a new epoch.
/// - What a new epoch does: quota windows are re-seeded from the durable copy before they
///   admit anything ([`RedisUsageStore::durable`](crate::RedisUsageStore::durable)), and the
///   rate limiter holds off for [`RedisRateLimiter::hold_after_loss`](crate::RedisRateLimiter::hold_after_loss),
///   answering "unavailable" so the rate-limit layer applies its failure policy.
#[must_use = "the monitor stops when dropped"]
pub struct RestartMonitor {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    state: Arc<MonitorState>,
}

impl RestartMonitor {
    /// How many checks completed.
    pub fn checks(&self) -> u64 {
        self.state.checks.load(Ordering::Acquire)
    }

    /// How many restarts this monitor noticed (and started a new epoch for).
    pub fn restarts(&self) -> u64 {
        self.state.restarts.load(Ordering::Acquire)
    }
}

impl Drop for RestartMonitor {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

impl std::fmt::Debug for RestartMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartMonitor")
            .field("checks", &self.checks())
            .field("restarts", &self.restarts())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fit_lua_numbers_and_a_view_notices_a_change() {
        for _ in 0..1000 {
            let t = new_token();
            assert!((1..=TOKEN_MASK).contains(&t));
        }
        let v = EpochView::new();
        let first = v.candidate();
        assert!(!v.saw(first), "the first token seen is no change");
        assert_ne!(v.candidate(), first, "a used candidate is replaced");
        assert!(!v.saw(first));
        assert!(v.saw(77), "another token is a change");
        assert_eq!(v.known(), 77);
    }
}
