//! Key lifecycle through `KeyManager` over the memory store: issue, rotate with grace,
//! revoke, disable/enable, update, list, show; each change audited, and a running verifier
//! sees every change on the next request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keygate::core::audit::{AuditEvent, Auditor, LifecycleAction, MemorySink};
use keygate::{
    Clock, DenialCode, KeyFilter, KeyManager, KeySpec, KeyStatus, KeyStore, KeyUpdate, ManualClock,
    MemoryStore, Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy, Verifier,
};
use keygate::{Expiry, LifecycleError};

struct Env {
    store: MemoryStore,
    clock: ManualClock,
    verifier: Verifier,
    sink: MemorySink,
    keys: KeyManager,
}

fn env() -> Env {
    env_with(|b| b)
}

fn env_with(f: impl FnOnce(keygate::VerifierBuilder) -> keygate::VerifierBuilder) -> Env {
    let store = MemoryStore::new();
    let clock = ManualClock::at_2026();
    let verifier = f(Verifier::builder(store.clone()).clock(clock.clone())).build();
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
    Env {
        store,
        clock,
        verifier,
        sink,
        keys,
    }
}

fn lifecycle(sink: &MemorySink) -> Vec<keygate::core::audit::LifecycleEvent> {
    sink.events()
        .into_iter()
        .map(|e| match e {
            AuditEvent::Lifecycle(l) => l,
            other => panic!("unexpected event {other:?}"),
        })
        .collect()
}

fn full_spec() -> KeySpec {
    KeySpec::new("ingest")
        .owner("acme-corp")
        .scope("points:write")
        .scope("points:read")
        .resource("tenant-acme-*")
        .attribute("tenant", "acme")
        .allow_ip("10.0.0.0/8".parse().unwrap())
        .rate_limit(RateLimitPolicy::per_second("burst", 20))
        .quota(QuotaPolicy::new("daily", 10_000, QuotaWindow::Day))
        .expires_in(Duration::from_secs(86_400 * 90))
        .metadata(serde_json::json!({"ticket": "OPS-1"}))
}

#[tokio::test]
async fn issue_stores_the_record_returns_the_plaintext_once_and_audits() {
    let e = env();
    let issued = e.keys.issue("alice", full_spec()).await.unwrap();
    let r = &issued.record;
    assert_eq!(issued.key.id(), r.id);
    assert_eq!(r.name, "ingest");
    assert_eq!(r.owner.as_deref(), Some("acme-corp"));
    assert_eq!(r.scopes, ["points:write", "points:read"]);
    assert_eq!(r.resources, ["tenant-acme-*"]);
    assert_eq!(r.attributes.get("tenant").map(String::as_str), Some("acme"));
    assert_eq!(
        r.allowed_ips,
        ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        r.expires_at,
        Some(e.clock.now() + Duration::from_secs(86_400 * 90))
    );
    assert_eq!(r.status, KeyStatus::Active);
    assert_eq!(r.rotated_from, None);

    let stored = e.store.get(&r.id).await.unwrap().unwrap();
    assert_eq!(stored.info(), r.info());
    // Debug of the issued key never shows the secret.
    assert!(!format!("{issued:?}").contains(issued.key.expose_secret()));

    let p = e.verifier.verify(issued.key.expose_secret()).await.unwrap();
    assert_eq!(p.tenant(), Some("acme"));

    let events = lifecycle(&e.sink);
    assert_eq!(events.len(), 1);
    let ev = &events[0];
    assert_eq!(
        (ev.action, ev.actor.as_str(), ev.key_id),
        (LifecycleAction::Issued, "alice", r.id)
    );
    assert_eq!(ev.subject.as_deref(), Some("acme-corp"));
    let fields: Vec<&str> = ev.changes.iter().map(|c| c.field.as_str()).collect();
    for f in [
        "id",
        "name",
        "owner",
        "status",
        "scopes",
        "resources",
        "attributes",
        "allowed_ips",
        "rate_limits",
        "quotas",
        "expires_at",
        "metadata",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    assert!(ev.changes.iter().all(|c| c.old.is_null()));
}

#[tokio::test]
async fn a_key_issued_while_the_verifier_is_preloaded_works_at_once() {
    let e = env();
    assert_eq!(e.verifier.preload().await.unwrap(), 0);
    let issued = e.keys.issue("alice", KeySpec::new("late")).await.unwrap();
    assert!(e.verifier.verify(issued.key.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn invalid_specs_change_nothing_and_name_the_field() {
    let e = env();
    let past = e.clock.now() - Duration::from_secs(1);
    let cases: Vec<(KeySpec, &str)> = vec![
        (KeySpec::new(""), "name"),
        (KeySpec::new("   "), "name"),
        (KeySpec::new("a\nb"), "name"),
        (KeySpec::new("x".repeat(129)), "name"),
        (KeySpec::new("k").owner(""), "owner"),
        (KeySpec::new("k").scope("points"), "scopes"),
        (KeySpec::new("k").scope("points:re ad"), "scopes"),
        (KeySpec::new("k").resource("a/b"), "resources"),
        (KeySpec::new("k").resource(""), "resources"),
        (KeySpec::new("k").attribute("ten ant", "x"), "attributes"),
        (
            KeySpec::new("k").attribute("tenant", "a\u{0}"),
            "attributes",
        ),
        (
            KeySpec::new("k").allow_ip("10.0.0.1/8".parse().unwrap()),
            "allowed_ips",
        ),
        (
            KeySpec::new("k").rate_limit(RateLimitPolicy::per_second("burst", 0)),
            "rate_limits",
        ),
        (
            KeySpec::new("k").rate_limit(RateLimitPolicy::new("b", 1, Duration::ZERO)),
            "rate_limits",
        ),
        (
            KeySpec::new("k")
                .rate_limit(RateLimitPolicy::per_second("burst", 1))
                .rate_limit(RateLimitPolicy::per_hour("burst", 100)),
            "rate_limits",
        ),
        (
            KeySpec::new("k").rate_limit(RateLimitPolicy::per_second("bad name", 1)),
            "rate_limits",
        ),
        (
            KeySpec::new("k").quota(QuotaPolicy::new("daily", 0, QuotaWindow::Day)),
            "quotas",
        ),
        (KeySpec::new("k").expires_at(past), "expires"),
        (KeySpec::new("k").expires_at(e.clock.now()), "expires"),
        (KeySpec::new("k").expires_in(Duration::ZERO), "expires"),
        (
            KeySpec::new("k").prefix(Prefix::new("sk_live").unwrap()),
            "prefix",
        ),
        (
            KeySpec::new("k").metadata(serde_json::json!({"blob": "x".repeat(70_000)})),
            "metadata",
        ),
    ];
    for (spec, field) in cases {
        match e.keys.issue("alice", spec.clone()).await {
            Err(LifecycleError::Invalid(inv)) => assert_eq!(inv.field, field, "{spec:?}"),
            other => panic!("{spec:?}: expected invalid {field}, got {other:?}"),
        }
    }
    match e.keys.issue("", KeySpec::new("k")).await {
        Err(LifecycleError::Invalid(inv)) => assert_eq!(inv.field, "actor"),
        other => panic!("expected invalid actor, got {other:?}"),
    }
    assert!(e.store.is_empty());
    assert!(e.sink.is_empty());
}

#[tokio::test]
async fn a_prefix_the_verifier_accepts_is_used() {
    let e = env_with(|b| {
        b.parser(keygate::KeyParser::new([
            Prefix::default(),
            Prefix::new("sk_live").unwrap(),
        ]))
    });
    let issued = e
        .keys
        .issue(
            "alice",
            KeySpec::new("live").prefix(Prefix::new("sk_live").unwrap()),
        )
        .await
        .unwrap();
    assert!(issued.key.expose_secret().starts_with("sk_live_"));
    assert!(e.verifier.verify(issued.key.expose_secret()).await.is_ok());
}

#[tokio::test]
async fn rotation_inherits_everything_and_the_old_key_works_until_the_grace_ends() {
    let e = env();
    let old = e.keys.issue("alice", full_spec()).await.unwrap();
    // Cache the old key in the verifier first: the rotation must reach the cache.
    assert!(e.verifier.verify(old.key.expose_secret()).await.is_ok());
    e.sink.take();

    let grace = Duration::from_secs(3600);
    let new = e.keys.rotate("bob", old.key.id(), grace).await.unwrap();
    assert_ne!(new.key.id(), old.key.id());
    assert_eq!(new.record.rotated_from, Some(old.key.id()));
    let (a, b) = (old.record.info(), new.record.info());
    assert_eq!(
        (
            &a.name,
            &a.owner,
            &a.scopes,
            &a.resources,
            &a.attributes,
            &a.allowed_ips
        ),
        (
            &b.name,
            &b.owner,
            &b.scopes,
            &b.resources,
            &b.attributes,
            &b.allowed_ips
        )
    );
    assert_eq!(
        (&a.rate_limits, &a.quotas, &a.metadata, &a.expires_at),
        (&b.rate_limits, &b.quotas, &b.metadata, &b.expires_at)
    );

    let stored_old = e.store.get(&old.key.id()).await.unwrap().unwrap();
    assert_eq!(stored_old.expires_at, Some(e.clock.now() + grace));
    assert_eq!(stored_old.status, KeyStatus::Active);

    // Both work during the grace period.
    assert!(e.verifier.verify(old.key.expose_secret()).await.is_ok());
    assert!(e.verifier.verify(new.key.expose_secret()).await.is_ok());
    e.clock.advance(grace - Duration::from_millis(1));
    assert!(e.verifier.verify(old.key.expose_secret()).await.is_ok());
    // At the end of the grace period the old key stops; the new one goes on.
    e.clock.advance(Duration::from_millis(1));
    assert_eq!(
        e.verifier
            .verify(old.key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::ExpiredKey
    );
    assert!(e.verifier.verify(new.key.expose_secret()).await.is_ok());

    let events = lifecycle(&e.sink);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].action, LifecycleAction::Rotated);
    assert_eq!(events[0].key_id, old.key.id());
    assert_eq!(events[0].related_key, Some(new.key.id()));
    assert_eq!(events[0].actor, "bob");
    assert_eq!(events[0].changes.len(), 1);
    assert_eq!(events[0].changes[0].field, "expires_at");
    assert_eq!(events[1].action, LifecycleAction::Issued);
    assert_eq!(events[1].key_id, new.key.id());
    assert_eq!(events[1].related_key, Some(old.key.id()));
    assert!(events[1]
        .changes
        .iter()
        .any(|c| c.field == "rotated_from" && c.new == old.key.id().as_str()));
}

#[tokio::test]
async fn rotation_with_zero_grace_stops_the_old_key_now() {
    let e = env();
    let old = e.keys.issue("alice", KeySpec::new("k")).await.unwrap();
    assert!(e.verifier.verify(old.key.expose_secret()).await.is_ok());
    let new = e
        .keys
        .rotate("alice", old.key.id(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        e.verifier
            .verify(old.key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::ExpiredKey
    );
    assert!(e.verifier.verify(new.key.expose_secret()).await.is_ok());
    // An expired key does not rotate again.
    assert!(matches!(
        e.keys.rotate("alice", old.key.id(), Duration::ZERO).await,
        Err(LifecycleError::Expired(id)) if id == old.key.id()
    ));
}

#[tokio::test]
async fn an_earlier_expiry_survives_a_longer_grace() {
    let e = env();
    let old = e
        .keys
        .issue(
            "alice",
            KeySpec::new("k").expires_in(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let end = old.record.expires_at;
    e.keys
        .rotate("alice", old.key.id(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        e.store
            .get(&old.key.id())
            .await
            .unwrap()
            .unwrap()
            .expires_at,
        end
    );
}

#[tokio::test]
async fn revoke_is_immediate_permanent_and_idempotent() {
    let e = env();
    let k = e.keys.issue("alice", KeySpec::new("k")).await.unwrap();
    assert!(e.verifier.verify(k.key.expose_secret()).await.is_ok());
    let r = e.keys.revoke("root", k.key.id()).await.unwrap();
    assert_eq!(r.status, KeyStatus::Revoked);
    assert_eq!(
        e.verifier
            .verify(k.key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::RevokedKey
    );
    // Again: no change, no event.
    e.keys.revoke("root", k.key.id()).await.unwrap();
    for result in [
        e.keys.enable("root", k.key.id()).await,
        e.keys.disable("root", k.key.id()).await,
        e.keys
            .update("root", k.key.id(), KeyUpdate::new().name("x"))
            .await,
    ] {
        assert!(matches!(
            result,
            Err(LifecycleError::WrongStatus {
                status: KeyStatus::Revoked,
                ..
            })
        ));
    }
    assert!(matches!(
        e.keys.rotate("root", k.key.id(), Duration::ZERO).await,
        Err(LifecycleError::WrongStatus { .. })
    ));
    let events = lifecycle(&e.sink);
    let actions: Vec<_> = events.iter().map(|e| e.action).collect();
    assert_eq!(actions, [LifecycleAction::Issued, LifecycleAction::Revoked]);
    let rev = &events[1];
    assert_eq!(rev.actor, "root");
    assert_eq!(rev.status, KeyStatus::Revoked);
    assert_eq!(rev.changes.len(), 1);
    assert_eq!(
        (
            rev.changes[0].field.as_str(),
            &rev.changes[0].old,
            &rev.changes[0].new
        ),
        ("status", &"active".into(), &"revoked".into())
    );
}

#[tokio::test]
async fn disable_and_enable() {
    let e = env();
    let k = e.keys.issue("alice", KeySpec::new("k")).await.unwrap();
    assert!(e.verifier.verify(k.key.expose_secret()).await.is_ok());
    e.keys.disable("alice", k.key.id()).await.unwrap();
    assert_eq!(
        e.verifier
            .verify(k.key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::DisabledKey
    );
    assert!(matches!(
        e.keys.rotate("alice", k.key.id(), Duration::ZERO).await,
        Err(LifecycleError::WrongStatus {
            status: KeyStatus::Disabled,
            ..
        })
    ));
    e.keys.disable("alice", k.key.id()).await.unwrap(); // no-op
    e.keys.enable("alice", k.key.id()).await.unwrap();
    assert!(e.verifier.verify(k.key.expose_secret()).await.is_ok());
    e.keys.enable("alice", k.key.id()).await.unwrap(); // no-op
    let actions: Vec<_> = lifecycle(&e.sink).iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            LifecycleAction::Issued,
            LifecycleAction::Disabled,
            LifecycleAction::Enabled
        ]
    );
}

#[tokio::test]
async fn policy_changes_reach_the_verifier_at_once_and_are_audited_with_old_and_new() {
    let e = env();
    let k = e
        .keys
        .issue(
            "alice",
            KeySpec::new("k")
                .scope("points:read")
                .rate_limit(RateLimitPolicy::per_second("burst", 5)),
        )
        .await
        .unwrap();
    let p = e.verifier.verify(k.key.expose_secret()).await.unwrap();
    assert_eq!(p.scopes(), ["points:read"]);
    e.sink.take();

    let mut attrs = BTreeMap::new();
    attrs.insert("tenant".to_owned(), "acme".to_owned());
    let updated = e
        .keys
        .update(
            "ops",
            k.key.id(),
            KeyUpdate::new()
                .scopes(["points:read", "points:write"])
                .rate_limits(vec![RateLimitPolicy::per_second("burst", 50)])
                .attributes(attrs)
                .expires(Some(Expiry::In(Duration::from_secs(60)))),
        )
        .await
        .unwrap();
    assert_eq!(updated.scopes, ["points:read", "points:write"]);
    let p = e.verifier.verify(k.key.expose_secret()).await.unwrap();
    assert_eq!(p.scopes(), ["points:read", "points:write"]);
    assert_eq!(p.rate_limits()[0].limit, 50);
    assert_eq!(p.tenant(), Some("acme"));

    let events = lifecycle(&e.sink);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, LifecycleAction::Updated);
    let mut fields: Vec<&str> = events[0].changes.iter().map(|c| c.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["attributes", "expires_at", "rate_limits", "scopes"]
    );
    let scopes = events[0]
        .changes
        .iter()
        .find(|c| c.field == "scopes")
        .unwrap();
    assert_eq!(scopes.old, serde_json::json!(["points:read"]));
    assert_eq!(
        scopes.new,
        serde_json::json!(["points:read", "points:write"])
    );

    // An update that changes nothing records nothing.
    e.keys
        .update(
            "ops",
            k.key.id(),
            KeyUpdate::new().scopes(["points:read", "points:write"]),
        )
        .await
        .unwrap();
    assert_eq!(e.sink.len(), 1);
    // A bad update changes nothing.
    let before = e.store.get(&k.key.id()).await.unwrap().unwrap().info();
    assert!(matches!(
        e.keys
            .update("ops", k.key.id(), KeyUpdate::new().scopes(["nope"]))
            .await,
        Err(LifecycleError::Invalid(_))
    ));
    assert_eq!(
        e.store.get(&k.key.id()).await.unwrap().unwrap().info(),
        before
    );
    // Removing the expiry is a change too.
    e.keys
        .update("ops", k.key.id(), KeyUpdate::new().expires(None))
        .await
        .unwrap();
    assert_eq!(
        e.store.get(&k.key.id()).await.unwrap().unwrap().expires_at,
        None
    );
}

#[tokio::test]
async fn list_filters_and_show() {
    let e = env();
    let a = e
        .keys
        .issue("x", KeySpec::new("a").owner("acme"))
        .await
        .unwrap();
    e.clock.advance(Duration::from_secs(1));
    let b = e
        .keys
        .issue("x", KeySpec::new("b").owner("acme"))
        .await
        .unwrap();
    e.clock.advance(Duration::from_secs(1));
    let c = e
        .keys
        .issue("x", KeySpec::new("c").owner("globex"))
        .await
        .unwrap();
    e.keys.revoke("x", b.key.id()).await.unwrap();

    let ids = |v: Vec<keygate::KeyRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(e.keys.list(&KeyFilter::default()).await.unwrap()),
        [a.key.id(), b.key.id(), c.key.id()]
    );
    let acme = KeyFilter {
        owner: Some("acme".into()),
        ..KeyFilter::default()
    };
    assert_eq!(
        ids(e.keys.list(&acme).await.unwrap()),
        [a.key.id(), b.key.id()]
    );
    let active_acme = KeyFilter {
        status: Some(KeyStatus::Active),
        ..acme.clone()
    };
    assert_eq!(ids(e.keys.list(&active_acme).await.unwrap()), [a.key.id()]);
    let other_prefix = KeyFilter {
        prefix: Some("sk_live".into()),
        ..KeyFilter::default()
    };
    assert!(e.keys.list(&other_prefix).await.unwrap().is_empty());

    assert_eq!(e.keys.show(c.key.id()).await.unwrap().name, "c");
    let (ghost, _) = keygate::KeyRecord::generate(
        &Prefix::default(),
        e.verifier.hasher(),
        "ghost",
        e.clock.now(),
    )
    .unwrap();
    assert!(matches!(
        e.keys.show(ghost.id()).await,
        Err(LifecycleError::NotFound(id)) if id == ghost.id()
    ));
    assert!(matches!(
        e.keys.revoke("x", ghost.id()).await,
        Err(LifecycleError::NotFound(_))
    ));
}

#[tokio::test]
async fn no_change_is_made_once_the_audit_log_is_shut_down() {
    let store = MemoryStore::new();
    let verifier = Verifier::new(store.clone());
    let sink = MemorySink::new();
    let auditor = Auditor::spawn(sink.clone()).unwrap();
    let keys = KeyManager::for_verifier(&verifier, auditor.clone());
    let k = keys.issue("alice", KeySpec::new("k")).await.unwrap();
    auditor.shutdown().await;
    assert_eq!(sink.len(), 1);
    assert!(matches!(
        keys.issue("alice", KeySpec::new("k2")).await,
        Err(LifecycleError::AuditClosed)
    ));
    assert!(matches!(
        keys.revoke("alice", k.key.id()).await,
        Err(LifecycleError::AuditClosed)
    ));
    assert_eq!(store.len(), 1);
    assert_eq!(
        store.get(&k.key.id()).await.unwrap().unwrap().status,
        KeyStatus::Active
    );
}

#[tokio::test]
async fn lifecycle_events_never_hold_a_key_or_a_digest() {
    let e = env();
    let mut plaintexts = Vec::new();
    let mut digests = Vec::new();
    let k = e.keys.issue("alice", full_spec()).await.unwrap();
    plaintexts.push(k.key.expose_secret().to_owned());
    digests.push(k.record.digest.to_hex());
    let r = e
        .keys
        .rotate("alice", k.key.id(), Duration::from_secs(5))
        .await
        .unwrap();
    plaintexts.push(r.key.expose_secret().to_owned());
    digests.push(r.record.digest.to_hex());
    e.keys.disable("alice", r.key.id()).await.unwrap();
    e.keys.enable("alice", r.key.id()).await.unwrap();
    e.keys
        .update("alice", r.key.id(), KeyUpdate::new().name("renamed"))
        .await
        .unwrap();
    e.keys.revoke("alice", r.key.id()).await.unwrap();

    let json = serde_json::to_string(&e.sink.events()).unwrap();
    let debug = format!("{:?}", e.sink.events());
    assert_eq!(e.sink.len(), 7);
    for secret in plaintexts.iter().chain(&digests) {
        let body = &secret[secret.len() - 20..];
        assert!(!json.contains(body), "secret or digest in audit JSON");
        assert!(!debug.contains(body), "secret or digest in audit Debug");
    }
    assert!(!json.contains("digest"));
}

#[tokio::test]
async fn a_manager_without_a_verifier_uses_the_store_alone() {
    let store = Arc::new(MemoryStore::new());
    let sink = MemorySink::new();
    let keys = KeyManager::builder(store.clone())
        .auditor(Auditor::direct(sink.clone()))
        .default_prefix(Prefix::new("sk_test").unwrap())
        .build();
    let k = keys.issue("cli", KeySpec::new("k")).await.unwrap();
    assert!(k.key.expose_secret().starts_with("sk_test_"));
    assert_eq!(store.len(), 1);
    // A verifier built later (another process) accepts it.
    let v = Verifier::builder(store.clone())
        .parser(keygate::KeyParser::new([Prefix::new("sk_test").unwrap()]))
        .build();
    assert!(v.verify(k.key.expose_secret()).await.is_ok());
    assert_eq!(sink.len(), 1);
}
