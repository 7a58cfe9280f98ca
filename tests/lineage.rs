//! Rotation does not reset usage: rate limits and quotas count per lineage (the first key
//! of a rotation chain), so a key rotated at its limit stays limited, and during the grace
//! period the old and the new key share one allowance instead of having one each.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::{utc, MemoryUsageStore};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{ApiKey, DenialCode, KeyManager, KeySpec, QuotaPolicy, QuotaWindow, RateLimitPolicy};
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn keyed(key: &ApiKey) -> Request<Body> {
    Request::get("/points")
        .header("x-api-key", key.expose_secret())
        .body(Body::default())
        .unwrap()
}

fn manager(fx: &Fixture) -> KeyManager {
    KeyManager::for_verifier(fx.gate.verifier(), Auditor::direct(MemorySink::new()))
}

/// Sends one request with `key` through `svc`; returns the status and the denial code.
async fn send<S>(svc: &S, key: &ApiKey) -> (StatusCode, Option<DenialCode>)
where
    S: tower::Service<Request<Body>, Error = std::convert::Infallible> + Clone,
    S::Response: HasParts,
{
    let res = svc.clone().oneshot(keyed(key)).await.unwrap();
    res.parts()
}

/// The status and denial code of a response.
trait HasParts {
    fn parts(&self) -> (StatusCode, Option<DenialCode>);
}

impl<B> HasParts for http::Response<B> {
    fn parts(&self) -> (StatusCode, Option<DenialCode>) {
        (
            self.status(),
            self.extensions().get::<keygate::Denial>().map(|d| d.code()),
        )
    }
}

const OK: (StatusCode, Option<DenialCode>) = (StatusCode::OK, None);
const LIMITED: (StatusCode, Option<DenialCode>) =
    (StatusCode::TOO_MANY_REQUESTS, Some(DenialCode::RateLimited));
const EXCEEDED: (StatusCode, Option<DenialCode>) = (
    StatusCode::TOO_MANY_REQUESTS,
    Some(DenialCode::QuotaExceeded),
);

#[tokio::test]
async fn a_rotated_key_keeps_its_rate_limit_and_shares_it_during_the_grace() {
    let fx = Fixture::new();
    let keys = manager(&fx);
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(
                RateLimitConfig::new().clock(LimiterClock::manual(fx.clock.clone())),
            )
            .unwrap()
            .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
    // 4 a minute: one more every 15 s.
    let old = keys
        .issue(
            "ops",
            KeySpec::new("svc").rate_limit(RateLimitPolicy::per_minute("burst", 4)),
        )
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(send(&svc, &old.key).await, OK);
    }
    assert_eq!(send(&svc, &old.key).await, LIMITED);

    // Rotated at its limit: the new key is limited too (it does not start afresh).
    let new = keys
        .rotate("ops", old.key.id(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(new.record.lineage, Some(old.key.id()));
    assert_eq!(send(&svc, &new.key).await, LIMITED);
    assert_eq!(send(&svc, &old.key).await, LIMITED);

    // One request's worth comes back: old and new share it (one of them gets it).
    fx.clock.advance(Duration::from_secs(15));
    assert_eq!(send(&svc, &new.key).await, OK);
    assert_eq!(send(&svc, &old.key).await, LIMITED);
    fx.clock.advance(Duration::from_secs(15));
    assert_eq!(send(&svc, &old.key).await, OK);
    assert_eq!(send(&svc, &new.key).await, LIMITED);

    // A key of its own lineage is counted on its own.
    let other = keys
        .issue(
            "ops",
            KeySpec::new("other").rate_limit(RateLimitPolicy::per_minute("burst", 4)),
        )
        .await
        .unwrap();
    assert_eq!(other.record.lineage_id(), other.key.id());
    assert_eq!(send(&svc, &other.key).await, OK);
}

#[tokio::test]
async fn a_rotated_key_keeps_its_quota_and_shares_it_during_the_grace() {
    let fx = Fixture::new();
    let keys = manager(&fx);
    let layer = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
        .unwrap()
        .with_gate(&fx.gate);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer)
        .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
    let spec = || KeySpec::new("svc").quota(QuotaPolicy::new("daily", 3, QuotaWindow::Day));

    // At its quota, rotated: the new key is over it as well.
    let spent = keys.issue("ops", spec()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(send(&svc, &spent.key).await, OK);
    }
    assert_eq!(send(&svc, &spent.key).await, EXCEEDED);
    let renewed = keys
        .rotate("ops", spent.key.id(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(send(&svc, &renewed.key).await, EXCEEDED);

    // Half used, rotated: old and new draw on one allowance of 3 during the grace.
    let old = keys.issue("ops", spec()).await.unwrap();
    assert_eq!(send(&svc, &old.key).await, OK);
    let new = keys
        .rotate("ops", old.key.id(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(send(&svc, &new.key).await, OK);
    assert_eq!(send(&svc, &old.key).await, OK);
    assert_eq!(send(&svc, &new.key).await, EXCEEDED);
    assert_eq!(send(&svc, &old.key).await, EXCEEDED);
    // And a rotation of the rotated key stays in the same lineage.
    let third = keys
        .rotate("ops", new.key.id(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(third.record.lineage, Some(old.key.id()));
    assert_eq!(send(&svc, &third.key).await, EXCEEDED);

    // Counted under the lineage: the first key's id.
    handle.flush().await.unwrap();
    let all = |id| {
        let handle = handle.clone();
        async move {
            let rows = handle
                .report(&id, UNIX_EPOCH, utc(2100, 1, 1, 0, 0, 0))
                .await
                .unwrap();
            rows.iter().map(|r| r.usage.cost).sum::<u64>()
        }
    };
    assert_eq!(all(old.key.id()).await, 3);
    assert_eq!(all(new.key.id()).await, 0);
    assert_eq!(all(spent.key.id()).await, 3);
}
