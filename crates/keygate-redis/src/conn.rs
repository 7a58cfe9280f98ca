//! The shared connection: a [`ConnectionManager`] (one multiplexed connection that
//! reconnects by itself), a key prefix, a per-call timeout and a circuit breaker.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, FromRedisValue, RedisError, Script, ToRedisArgs};

/// Why a Redis operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Redis could not be reached, did not answer within the timeout, or is known to be
    /// down (the circuit is open). Callers fail closed (or use their fallback).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error, or with data keygate cannot read (a key of the wrong
    /// type under the prefix, for instance).
    #[error("redis answered unexpectedly: {0}")]
    Unexpected(String),
}

/// Why [`Redis::open`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL is not a Redis URL (`redis://host:port/db`, `rediss://` needs TLS support,
    /// which this build does not have).
    #[error("invalid redis url: {0}")]
    InvalidUrl(String),
    /// The key prefix is empty, longer than 64 bytes, or not `[A-Za-z0-9_.:-]`.
    #[error("invalid key prefix {0:?}: must be 1 to 64 characters of [A-Za-z0-9_.:-]")]
    InvalidPrefix(String),
    /// A duration setting is zero.
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

/// Connection settings for [`Redis::open_with`]. Every setting has a default.
///
/// | setting | default |
/// |---|---|
/// | [`prefix`](Self::prefix) (every key and channel starts with it) | `keygate` |
/// | [`timeout`](Self::timeout) (one call, connecting included) | 250 ms |
/// | [`retry_after`](Self::retry_after) (after a failure, calls fail at once for this long) | 500 ms |
#[derive(Debug, Clone)]
pub struct RedisOptions {
    prefix: String,
    timeout: Duration,
    retry_after: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "keygate".to_owned(),
            timeout: Duration::from_millis(250),
            retry_after: Duration::from_millis(500),
        }
    }
}

impl RedisOptions {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// The prefix of every key and channel (1 to 64 characters of `[A-Za-z0-9_.:-]`), so
    /// several services, or tests, can share one Redis. Keys read `{prefix}:rl:{...`,
    /// `{prefix}:q:{...`, `{prefix}:changes:seq`, `{prefix}:changes:log`,
    /// `{prefix}:epoch...`, the channel
    /// `{prefix}:changes`. One prefix may be nested in another (`keygate` and
    /// `keygate:staging`): their keys never collide, and [`Redis::delete_all`] on one leaves
    /// the other alone.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one call may take, connecting included, before it counts as a failure.
    /// It bounds the latency a Redis outage adds to a request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// After a failed call, further calls fail at once (without waiting for the timeout)
    /// for this long; then one call tries again, and success closes the circuit. The
    /// connection itself is re-established in the background meanwhile.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = wait;
        self
    }

    fn validate(&self) -> Result<(), OpenError> {
        let p = &self.prefix;
        if p.is_empty()
            || p.len() > 64
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        {
            return Err(OpenError::InvalidPrefix(p.chars().take(64).collect()));
        }
        if self.timeout.is_zero() {
            return Err(OpenError::Zero("timeout"));
        }
        if self.retry_after.is_zero() {
            return Err(OpenError::Zero("retry_after"));
        }
        Ok(())
    }
}

/// A handle on one Redis server: the connection every keygate-redis part uses, its key
/// prefix, and its failure handling. Cheap to clone; clones share the connection.
///
/// Calls time out after [`RedisOptions::timeout`]. After a failure the circuit opens: calls
/// fail at once for [`RedisOptions::retry_after`], then one call probes, and the first
/// success closes it again. The connection reconnects by itself (the redis crate's
/// `ConnectionManager`), so nothing needs restarting after an outage.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    prefix: String,
    timeout: Duration,
    breaker: Breaker,
}

impl Redis {
    /// A handle on the server at `url` (`redis://[user:password@]host[:port][/db]`) with the
    /// default options. Does not wait for the server: when it is down, calls fail (and
    /// callers fail closed) until it answers. Must be called within a tokio runtime.
    pub async fn open(url: &str) -> Result<Redis, OpenError> {
        Self::open_with(url, RedisOptions::default()).await
    }

    /// [`Redis::open`] with `options`.
    pub async fn open_with(url: &str, options: RedisOptions) -> Result<Redis, OpenError> {
        options.validate()?;
        // The error describes the URL's shape; it never repeats a password.
        let client = redis::Client::open(url).map_err(|e| OpenError::InvalidUrl(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(options.retry_after);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| OpenError::InvalidUrl(e.to_string()))?;
        Ok(Redis {
            inner: Arc::new(Inner {
                client,
                manager,
                prefix: options.prefix,
                timeout: options.timeout,
                breaker: Breaker::new(options.retry_after, options.timeout),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The underlying client (to open connections of one's own).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Whether calls are going through (the circuit is closed): `false` after a failure
    /// until a call succeeds again.
    pub fn is_available(&self) -> bool {
        self.inner.breaker.is_closed()
    }

    /// How many calls failed since the handle was opened.
    pub fn failures(&self) -> u64 {
        self.inner.breaker.failures.load(Ordering::Relaxed)
    }

    /// Sends `PING`.
    pub async fn ping(&self) -> Result<(), Error> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }

    /// Deletes keygate's keys under exactly this prefix (`SCAN` + `UNLINK`), for tests and
    /// decommissioning; returns how many keys were deleted.
    ///
    /// Only keys of keygate's own layout directly under the prefix are matched
    /// (`{prefix}:rl:{…`, `{prefix}:q:{…`, `{prefix}:changes:seq`, `{prefix}:changes:log`,
    /// `{prefix}:epoch…`), so
    /// a prefix nested under this one (`keygate:staging` under `keygate`) and keys of other
    /// software that happen to start with `{prefix}:` are left alone. Nested prefixes are
    /// allowed: no key of one can have the name of a key of the other, because a prefix never
    /// contains `{` and every name ends its fixed part differently.
    pub async fn delete_all(&self) -> Result<u64, Error> {
        let p = &self.inner.prefix;
        // Prefix characters ([A-Za-z0-9_.:-]) are never glob metacharacters.
        let patterns = [
            format!("{p}:rl:{{*"),
            format!("{p}:q:{{*"),
            format!("{p}:changes:seq"),
            format!("{p}:changes:log"),
            format!("{p}:epoch"),
            format!("{p}:epoch:*"),
        ];
        let mut deleted = 0;
        for pattern in patterns {
            deleted += self.delete_matching(pattern).await?;
        }
        Ok(deleted)
    }

    async fn delete_matching(&self, pattern: String) -> Result<u64, Error> {
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .run(move |mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                let n: u64 = self
                    .run(move |mut c| async move { c.unlink(keys).await })
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Runs one call on the shared connection, with the timeout and the circuit breaker.
    pub(crate) async fn run<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_tracked(f).await.map_err(|failed| failed.error)
    }

    /// Runs `script` with `keys` and `args` (in order) on the shared connection, as
    /// [`run`](Self::run) runs a call.
    pub(crate) async fn eval<T, A>(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<A>,
    ) -> Result<T, Error>
    where
        T: FromRedisValue,
        A: ToRedisArgs,
    {
        self.eval_tracked(script, keys, args)
            .await
            .map_err(|failed| failed.error)
    }

    /// [`eval`](Self::eval), telling a script that never left from one whose outcome is
    /// unknown ([`run_tracked`](Self::run_tracked)).
    pub(crate) async fn eval_tracked<T, A>(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<A>,
    ) -> Result<T, Failed>
    where
        T: FromRedisValue,
        A: ToRedisArgs,
    {
        self.run_tracked(move |mut c| async move {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a);
            }
            inv.invoke_async(&mut c).await
        })
        .await
    }

    /// [`run`](Self::run), telling a call that never left (the circuit was open) from one
    /// whose outcome is unknown: it may have reached the server and run there, with only
    /// the answer lost (a cut connection, a timeout).
    pub(crate) async fn run_tracked<T, F, Fut>(&self, f: F) -> Result<T, Failed>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let inner = &*self.inner;
        inner.breaker.admit().map_err(|error| Failed {
            error,
            maybe_ran: false,
        })?;
        let failed = |error| Failed {
            error,
            maybe_ran: true,
        };
        match tokio::time::timeout(inner.timeout, f(inner.manager.clone())).await {
            Ok(Ok(v)) => {
                inner.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) if is_unavailable(&e) => {
                inner.breaker.failure();
                Err(failed(Error::Unavailable(describe(&e))))
            }
            Ok(Err(e)) => {
                // The server answered (with an error): the connection is fine, and the
                // call did not run to its end.
                inner.breaker.success();
                Err(Failed {
                    error: Error::Unexpected(describe(&e)),
                    maybe_ran: false,
                })
            }
            Err(_) => {
                inner.breaker.failure();
                Err(failed(Error::Unavailable(format!(
                    "no answer within {:?}",
                    inner.timeout
                ))))
            }
        }
    }

    /// The full name of `key` under the prefix.
    pub(crate) fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}:{}", self.inner.prefix, parts)
    }
}

/// A failed [`Redis::run_tracked`] call.
pub(crate) struct Failed {
    /// What went wrong.
    pub(crate) error: Error,
    /// Whether the call may have run on the server (its answer lost).
    pub(crate) maybe_ran: bool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info may hold a password: show only the prefix and state.
        f.debug_struct("Redis")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

/// Whether an error means the server could not be reached (as opposed to an error reply).
fn is_unavailable(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// A redis error as text (its kind and the server's message; redis errors never carry the
/// connection's password), at most 200 characters.
pub(crate) fn describe(e: &RedisError) -> String {
    e.to_string().chars().take(200).collect()
}

/// The circuit breaker: after a failure, calls fail at once until `open_until`; the first
/// call after it claims a probe (pushing `open_until` by one timeout) and goes through.
struct Breaker {
    origin: Instant,
    /// Microseconds since `origin` before which calls fail at once (0: closed).
    open_until: AtomicU64,
    retry_after: u64,
    probe: u64,
    failures: AtomicU64,
}

impl Breaker {
    fn new(retry_after: Duration, timeout: Duration) -> Breaker {
        Breaker {
            origin: Instant::now(),
            open_until: AtomicU64::new(0),
            retry_after: micros(retry_after),
            probe: micros(timeout).saturating_add(1000),
            failures: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        micros(self.origin.elapsed()).max(1)
    }

    fn is_closed(&self) -> bool {
        self.open_until.load(Ordering::Acquire) == 0
    }

    fn admit(&self) -> Result<(), Error> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = self.now();
        if now >= until
            && self
                .open_until
                .compare_exchange(until, now + self.probe, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This call is the probe.
            return Ok(());
        }
        Err(Error::Unavailable(
            "recent calls failed; retrying shortly".to_owned(),
        ))
    }

    fn success(&self) {
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
            tracing::info!("redis answers again");
        }
    }

    fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) == 0 || self.is_closed() {
            tracing::warn!("redis call failed; failing fast and retrying");
        }
        self.open_until
            .store(self.now() + self.retry_after, Ordering::Release);
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_settings_are_refused_without_echoing_a_password() {
        for url in [
            "redis://user:s3cret@127.0.0.1:notaport/0",
            "redis://user:s3cret@127.0.0.1:6379/db",
            "rediss://user:s3cret@127.0.0.1:6379",
            "http://user:s3cret@127.0.0.1",
        ] {
            let err = Redis::open(url).await.unwrap_err();
            assert!(matches!(err, OpenError::InvalidUrl(_)), "{url}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        for prefix in ["", "has space", "{tag}", "glob*", &"x".repeat(65)] {
            let err = Redis::open_with("redis://127.0.0.1", RedisOptions::new().prefix(prefix))
                .await
                .unwrap_err();
            assert!(matches!(err, OpenError::InvalidPrefix(_)), "{prefix:?}");
        }
        let zero = RedisOptions::new().timeout(Duration::ZERO);
        assert_eq!(
            Redis::open_with("redis://127.0.0.1", zero)
                .await
                .unwrap_err(),
            OpenError::Zero("timeout")
        );
        // Opening does not wait for the server; the Debug output shows no URL.
        let r = Redis::open("redis://user:s3cret@127.0.0.1:1")
            .await
            .unwrap();
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn the_breaker_fails_fast_then_lets_one_probe_through() {
        let b = Breaker::new(Duration::from_millis(30), Duration::from_millis(10));
        assert!(b.admit().is_ok());
        b.failure();
        assert!(!b.is_closed());
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        // One probe, the others still fail fast until it answers.
        assert!(b.admit().is_ok());
        assert!(b.admit().is_err());
        b.success();
        assert!(b.is_closed());
        assert!(b.admit().is_ok());
        assert_eq!(b.failures.load(Ordering::Relaxed), 1);
    }
}
