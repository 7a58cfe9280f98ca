//! Deprecation notices for keys due for rotation: `Deprecation` (RFC 9745) and `Sunset`
//! (RFC 8594) response fields, so clients see a key's end coming while it still works.
//!
//! [`KeyDeprecation`] is a [`Check`] that never refuses. For a valid key it compares two
//! dates with the clock:
//!
//! - the **rotation date**, `created_at + max_age` ([`KeyDeprecation::max_age`], for
//!   example 90 days): from then on the key is due for rotation;
//! - the **warning window** before `expires_at` ([`KeyDeprecation::warn_before_expiry`],
//!   for example 14 days).
//!
//! A key past its rotation date or inside its warning window keeps working; its responses
//! carry `Deprecation: @<unix seconds>` (the earlier of the rotation date and the start of
//! the warning window: when the key was, or is, deprecated) and, when the key expires,
//! `Sunset: <HTTP-date>` (its `expires_at`: when it stops working). A key that is not due
//! costs two comparisons and writes nothing. Requests without a valid key are left to the
//! layers that refuse them.
//!
//! Fuse it with the auth check in one service: `gate.stack().auth().check(KeyDeprecation::
//! new(gate.clock().clone()).max_age(..))`, or wrap it alone in a
//! [`CheckLayer`](crate::check::CheckLayer).
//!
//! A key (or a role it holds) may set a tighter maximum age of its own with the attribute
//! `max_key_age` (`30d`, `12h`; the resolved attribute: the key's own, else its first role
//! having one), and so may its identity (its metadata field `max_key_age`, folded into the
//! resolved attribute when tighter, once per change of the key, not per request); the
//! tightest of those and the global one applies, here and in the background sweep
//! ([`keygate::notices`](https://docs.rs/keygate/latest/keygate/notices/), feature
//! `notices`).
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use keygate::check::CheckLayer;
//! use keygate::deprecation::KeyDeprecation;
//! use keygate::{KeyGate, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let clock = ManualClock::at_2026();
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::builder(store.clone()).clock(clock.clone()).build());
//! let (key, record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "ci", gate.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//! let notices = KeyDeprecation::new(gate.clock().clone()).max_age(Duration::from_secs(90 * 86_400));
//! let svc = ServiceBuilder::new()
//!     .layer(CheckLayer::new(notices).with_gate(&gate))
//!     .service_fn(|_: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(())) });
//! let call = || Request::get("/").header("x-api-key", key.expose_secret()).body(()).unwrap();
//!
//! let res = svc.clone().oneshot(call()).await.unwrap();
//! assert!(res.headers().get("deprecation").is_none()); // a new key
//! clock.advance(Duration::from_secs(91 * 86_400));
//! let res = svc.oneshot(call()).await.unwrap();
//! assert_eq!(res.status(), 200); // still works
//! assert!(res.headers()["deprecation"].to_str().unwrap().starts_with('@'));
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};

use crate::check::{Caller, Check};
use crate::future::ResponseNote;
use crate::{Denial, Principal};
use keygate_core::Clock;

/// `Deprecation` (RFC 9745).
pub static DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
/// `Sunset` (RFC 8594).
pub static SUNSET: HeaderName = HeaderName::from_static("sunset");

/// The attribute (on a key or a role) naming a key's own maximum age (`30d`).
pub const MAX_KEY_AGE: &str = "max_key_age";

/// Adds `Deprecation` and `Sunset` to the responses of keys past their rotation date or
/// close to their expiry. See the [module docs](self).
#[derive(Clone)]
pub struct KeyDeprecation {
    clock: Arc<dyn Clock>,
    max_age: Option<Duration>,
    warn_before_expiry: Option<Duration>,
}

impl fmt::Debug for KeyDeprecation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyDeprecation")
            .field("max_age", &self.max_age)
            .field("warn_before_expiry", &self.warn_before_expiry)
            .finish_non_exhaustive()
    }
}

/// When a key is deprecated and when it stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// The earlier of the rotation date and the start of the warning window.
    pub deprecated_at: SystemTime,
    /// The key's expiry, if it has one.
    pub sunset: Option<SystemTime>,
}

/// The note [`KeyDeprecation`] writes: nothing for a key that is not due.
#[derive(Debug, Default)]
pub struct DeprecationNote(Option<Notice>);

impl ResponseNote for DeprecationNote {
    fn apply<B>(self, res: &mut Response<B>) {
        let Some(n) = self.0 else {
            return;
        };
        let secs = match n.deprecated_at.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i128,
            Err(e) => -(e.duration().as_secs() as i128),
        };
        if let Ok(v) = HeaderValue::try_from(format!("@{secs}")) {
            res.headers_mut().insert(DEPRECATION.clone(), v);
        }
        if let Some(at) = n.sunset {
            if let Ok(v) = HeaderValue::try_from(httpdate::fmt_http_date(at)) {
                res.headers_mut().insert(SUNSET.clone(), v);
            }
        }
    }
}

impl KeyDeprecation {
    /// No notices yet (set [`max_age`](Self::max_age) and/or
    /// [`warn_before_expiry`](Self::warn_before_expiry)); dates read from `clock` (the
    /// hub's: `gate.clock().clone()`).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        KeyDeprecation {
            clock,
            max_age: None,
            warn_before_expiry: None,
        }
    }

    /// Keys older than `age` are due for rotation (a key's, role's or identity's tighter
    /// `max_key_age` wins).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Keys that expire within `window` are warned.
    pub fn warn_before_expiry(mut self, window: Duration) -> Self {
        self.warn_before_expiry = Some(window);
        self
    }

    /// The notice for `p` at `now`: `None` when the key is not due.
    pub fn notice(&self, p: &Principal, now: SystemTime) -> Option<Notice> {
        let own = p
            .attribute(MAX_KEY_AGE)
            .and_then(|t| keygate_core::time::parse_duration(t).ok());
        let max_age = match (self.max_age, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let rotation = max_age
            .and_then(|age| p.created_at().checked_add(age))
            .filter(|due| *due <= now);
        let expires = p.expires_at();
        let warning = match (self.warn_before_expiry, expires) {
            (Some(w), Some(exp)) => {
                let start = exp.checked_sub(w).unwrap_or(UNIX_EPOCH);
                (start <= now).then_some(start)
            }
            _ => None,
        };
        let deprecated_at = match (rotation, warning) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some(Notice {
            deprecated_at,
            sunset: expires,
        })
    }
}

impl Check for KeyDeprecation {
    type Note = DeprecationNote;

    /// Pure (it only reads the request and its caller): it may run ahead of an earlier
    /// check's I/O.
    fn speculative(&self) -> bool {
        true
    }

    fn needs_caller<B>(&self, _req: &Request<B>) -> bool {
        true
    }

    fn check<B>(
        &self,
        _req: &mut Request<B>,
        caller: Caller<'_>,
    ) -> Result<DeprecationNote, Denial> {
        match caller {
            Ok(p) => Ok(DeprecationNote(self.notice(p, self.clock.now()))),
            Err(_) => Ok(DeprecationNote(None)),
        }
    }
}
