//! Roles, grants and identities through the `KeyManager` and the verifier, on the memory
//! store: the union/tightest rule, live changes reaching cached keys, validation that
//! changes nothing, and conditional writes refusing a racing writer.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use keygate_core::audit::{Auditor, LifecycleAction, MemorySink};
use keygate_core::{
    Grant, Identity, KeyManager, KeySpec, KeyStore, KeyUpdate, LifecycleError, ManualClock,
    MemoryStore, QuotaPolicy, QuotaWindow, RateLimitPolicy, Role, RoleUpdate, Scope, StoreError,
    Verifier,
};

fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap()
}

fn setup() -> (MemoryStore, Verifier, KeyManager, MemorySink) {
    let store = MemoryStore::new();
    let verifier = Verifier::builder(store.clone())
        .clock(ManualClock::at_2026())
        // Only explicit invalidation refreshes the cache in these tests.
        .refresh_after(Duration::from_secs(3600))
        .build();
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
    (store, verifier, keys, sink)
}

/// Runs a future that never waits (the memory store's) to its end, synchronously.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

#[tokio::test]
async fn roles_union_grants_and_the_tightest_limits_apply() {
    let (_, verifier, keys, _) = setup();
    let t = verifier.clock().now();
    let reader = Role::new("vector-reader", t)
        .with_grant(Grant::new(
            ["points:read", "collections:read"],
            ["shared", "docs-*"],
        ))
        .with_rate_limit(RateLimitPolicy::per_second("burst", 5))
        .with_quota(QuotaPolicy::new("daily", 100, QuotaWindow::Day))
        .with_attribute("tier", "reader");
    let ingester = Role::new("data-ingester", t)
        .with_grant(Grant::new(["points:write"], ["docs-*"]))
        .with_rate_limit(RateLimitPolicy::per_hour("hourly", 1000))
        .with_attribute("tier", "ingester");
    keys.create_role("admin", reader).await.unwrap();
    keys.create_role("admin", ingester).await.unwrap();
    let issued = keys
        .issue(
            "admin",
            KeySpec::new("etl")
                .role("vector-reader")
                .role("data-ingester")
                .attribute("tenant", "acme")
                .rate_limit(RateLimitPolicy::per_second("burst", 50)),
        )
        .await
        .unwrap();
    let p = verifier.verify(issued.key.expose_secret()).await.unwrap();
    assert!(p.permits(&scope("points:write"), "docs-1"));
    assert!(p.permits(&scope("points:read"), "shared"));
    assert!(!p.permits(&scope("points:write"), "shared"));
    assert!(!p.permits(&scope("points:read"), "other"));
    // Tightest of each name: burst 5/s (the role's, not the key's 50/s), hourly joins.
    assert_eq!(
        p.rate_limits(),
        [
            RateLimitPolicy::per_second("burst", 5),
            RateLimitPolicy::per_hour("hourly", 1000)
        ]
    );
    assert_eq!(
        p.quotas(),
        [QuotaPolicy::new("daily", 100, QuotaWindow::Day)]
    );
    // The key's own attributes first, then the first role's.
    assert_eq!(p.attribute("tenant"), Some("acme"));
    assert_eq!(p.attribute("tier"), Some("reader"));
    let roles: Vec<&str> = p.roles().iter().map(|r| &**r).collect();
    assert_eq!(roles, ["vector-reader", "data-ingester"]);
    let write = scope("points:write");
    let granting: Vec<&str> = p
        .granting_roles(&write, Some("docs-1"))
        .map(|r| &**r)
        .collect();
    assert_eq!(granting, ["data-ingester"]);
}

#[tokio::test]
async fn a_role_change_reaches_cached_keys_and_is_audited() {
    let (_, verifier, keys, sink) = setup();
    let t = verifier.clock().now();
    keys.create_role(
        "admin",
        Role::new("writer", t).with_grant(Grant::new(["points:write"], ["docs-*"])),
    )
    .await
    .unwrap();
    let a = keys
        .issue("admin", KeySpec::new("a").role("writer"))
        .await
        .unwrap();
    let b = keys
        .issue("admin", KeySpec::new("b").role("writer"))
        .await
        .unwrap();
    for k in [&a, &b] {
        let p = verifier.verify(k.key.expose_secret()).await.unwrap();
        assert!(p.permits(&scope("points:write"), "docs-1"));
    }
    // Cached: a second verify reads no store. Narrow the role.
    let updated = keys
        .update_role(
            "admin",
            "writer",
            RoleUpdate {
                grants: Some(vec![Grant::new(["points:read"], ["docs-*"])]),
                ..RoleUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.version, 1);
    for k in [&a, &b] {
        let p = verifier.verify(k.key.expose_secret()).await.unwrap();
        assert!(
            !p.permits(&scope("points:write"), "docs-1"),
            "narrowed at once"
        );
        assert!(p.permits(&scope("points:read"), "docs-1"));
    }
    // The keys' records were not touched.
    assert_eq!(keys.show(a.key.id()).await.unwrap().version, 0);
    // One role_changed event per holder.
    let changed: Vec<_> = sink
        .events()
        .iter()
        .filter_map(|e| e.as_lifecycle())
        .filter(|e| e.action == LifecycleAction::RoleChanged)
        .map(|e| (e.key_id, e.changes[0].field.clone()))
        .collect();
    // Created (no holders yet: no event), updated (two holders).
    assert_eq!(changed.len(), 2);
    assert!(changed.iter().all(|(_, f)| f == "role:writer"));

    // Deleting it takes the rest away.
    assert!(keys.delete_role("admin", "writer").await.unwrap());
    let p = verifier.verify(a.key.expose_secret()).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "docs-1"));
    assert!(p.roles().is_empty());
    assert!(!keys.delete_role("admin", "writer").await.unwrap());
}

#[tokio::test]
async fn bad_role_input_changes_nothing() {
    let (store, verifier, keys, _) = setup();
    let t = verifier.clock().now();
    // Unknown role on issue: refused, no key stored.
    let e = keys
        .issue("admin", KeySpec::new("k").role("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, LifecycleError::Invalid(ref i) if i.field == "roles"),
        "{e:?}"
    );
    assert!(store.is_empty());
    // Bad role names and grants.
    for bad in [
        Role::new("bad name", t),
        Role::new("ok", t).with_grant(Grant::new(["not a scope"], ["x"])),
        Role::new("ok", t).with_grant(Grant::new(Vec::<String>::new(), ["x"])),
        Role::new("ok", t).with_grant(Grant::new(["points:read"], ["a/b"])),
        Role::new("ok", t).with_rate_limit(RateLimitPolicy::per_second("b", 0)),
    ] {
        assert!(matches!(
            keys.create_role("admin", bad).await,
            Err(LifecycleError::Invalid(_))
        ));
    }
    assert!(keys.list_roles().await.unwrap().is_empty());
    // A taken name.
    keys.create_role("admin", Role::new("ok", t)).await.unwrap();
    assert!(matches!(
        keys.create_role("admin", Role::new("ok", t)).await,
        Err(LifecycleError::Store(StoreError::NameTaken { .. }))
    ));
    // Unknown identity on update: refused, key unchanged.
    let k = keys.issue("admin", KeySpec::new("k")).await.unwrap();
    let e = keys
        .update(
            "admin",
            k.key.id(),
            KeyUpdate::new().identity(Some("ghost".into())),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::Invalid(_)), "{e:?}");
    assert_eq!(keys.show(k.key.id()).await.unwrap().identity, None);
}

#[tokio::test]
async fn keys_update_changes_roles_grants_and_identity_live() {
    let (_, verifier, keys, _) = setup();
    let t = verifier.clock().now();
    keys.create_role(
        "admin",
        Role::new("reader", t).with_grant(Grant::new(["points:read"], ["shared"])),
    )
    .await
    .unwrap();
    let mut etl = Identity::new("etl-pipeline", t);
    etl.rate_limits = vec![RateLimitPolicy::per_second("burst", 2)];
    keys.create_identity("admin", etl).await.unwrap();
    let k = keys.issue("admin", KeySpec::new("k")).await.unwrap();
    let p = verifier.verify(k.key.expose_secret()).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "shared"));

    let updated = keys
        .update(
            "admin",
            k.key.id(),
            KeyUpdate::new()
                .add_role("reader")
                .grants(vec![Grant::new(["points:write"], ["docs-*"])])
                .identity(Some("etl-pipeline".into())),
        )
        .await
        .unwrap();
    assert_eq!(updated.version, 1);
    let p = verifier.verify(k.key.expose_secret()).await.unwrap();
    assert!(p.permits(&scope("points:read"), "shared"));
    assert!(p.permits(&scope("points:write"), "docs-1"));
    assert!(!p.permits(&scope("points:write"), "shared"));
    assert_eq!(p.identity(), Some("etl-pipeline"));
    assert_eq!(p.rate_limits(), [RateLimitPolicy::per_second("burst", 2)]);
    assert!(p.rate_limit_is_shared(0), "the identity's limit is shared");

    let after = keys
        .update("admin", k.key.id(), KeyUpdate::new().remove_role("reader"))
        .await
        .unwrap();
    assert!(after.roles.is_empty(), "{:?}", after.roles);
    let p = verifier.verify(k.key.expose_secret()).await.unwrap();
    assert!(!p.permits(&scope("points:read"), "shared"));
}

/// Two admins (two managers, as two replicas would be) update one key at once: the second
/// write was based on a version the first replaced, so it is refused, and what the first
/// checked is what is stored.
#[tokio::test]
async fn racing_updates_cannot_both_land() {
    let (store, verifier, keys, _) = setup();
    let other = KeyManager::for_verifier(&verifier, Auditor::direct(MemorySink::new()));
    let k = keys
        .issue(
            "admin",
            KeySpec::new("k").scope("points:read").resource("docs"),
        )
        .await
        .unwrap();
    let id = k.key.id();
    let store2 = Arc::new(store.clone());
    // Admin A's check runs after it read the key; admin B writes in that window.
    let e = keys
        .update_checked(
            "a",
            id,
            KeyUpdate::new().resources(["docs", "shared"]),
            |old, _new| {
                let mut b = old.clone();
                b.scopes = vec!["*".into()];
                now(store2.update(&b)).unwrap();
                Ok(())
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, LifecycleError::Store(StoreError::Conflict { .. })),
        "{e:?}"
    );
    // B's write stands alone: A's collections did not land on top of B's `*`.
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.scopes, ["*"]);
    assert_eq!(stored.resources, ["docs"]);
    // A retry reads the new version and succeeds (its check sees B's change).
    let saw = std::sync::Mutex::new(Vec::new());
    other
        .update_checked(
            "a",
            id,
            KeyUpdate::new().resources(["docs", "shared"]),
            |old, _| {
                saw.lock().unwrap().clone_from(&old.scopes);
                Ok(())
            },
        )
        .await
        .unwrap();
    assert_eq!(*saw.lock().unwrap(), ["*"]);
    // A refusing check writes nothing.
    let e = keys
        .update_checked("a", id, KeyUpdate::new().resources(["x"]), |_, _| {
            Err("beyond the caller".into())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::Refused(_)));
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().resources,
        ["docs", "shared"]
    );
}

#[tokio::test]
async fn a_rotated_key_keeps_its_grants_roles_and_identity() {
    let (_, verifier, keys, _) = setup();
    let t = verifier.clock().now();
    keys.create_role(
        "admin",
        Role::new("reader", t).with_grant(Grant::new(["points:read"], ["shared"])),
    )
    .await
    .unwrap();
    keys.create_identity("admin", Identity::new("etl", t))
        .await
        .unwrap();
    let old = keys
        .issue(
            "admin",
            KeySpec::new("k")
                .role("reader")
                .identity("etl")
                .grant(Grant::new(["points:write"], ["docs-*"])),
        )
        .await
        .unwrap();
    let new = keys
        .rotate("admin", old.key.id(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(new.record.roles, ["reader"]);
    assert_eq!(new.record.identity.as_deref(), Some("etl"));
    assert_eq!(new.record.grants, old.record.grants);
    let p = verifier.verify(new.key.expose_secret()).await.unwrap();
    assert!(p.permits(&scope("points:read"), "shared"));
    assert!(p.permits(&scope("points:write"), "docs-1"));
}

/// A preloaded verifier resolves every key's roles and identity from one listing each.
#[tokio::test]
async fn preload_resolves_roles_and_identities() {
    let store = MemoryStore::new();
    let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    store
        .insert_role(&Role::new("reader", t).with_grant(Grant::new(["points:read"], ["docs"])))
        .await
        .unwrap();
    let mut id = Identity::new("etl", t);
    id.quotas = vec![QuotaPolicy::new("daily", 10, QuotaWindow::Day)];
    store.insert_identity(&id).await.unwrap();
    let hasher = keygate_core::KeyHasher::new();
    let (key, mut record) =
        keygate_core::KeyRecord::generate(&keygate_core::Prefix::default(), &hasher, "k", t)
            .unwrap();
    record.roles = vec!["reader".into()];
    record.identity = Some("etl".into());
    store.insert(&record).await.unwrap();
    let verifier = Verifier::builder(store.clone())
        .clock(ManualClock::at_2026())
        .build();
    assert_eq!(verifier.preload().await.unwrap(), 1);
    let p = verifier.verify(key.expose_secret()).await.unwrap();
    assert!(p.permits(&scope("points:read"), "docs"));
    assert_eq!(
        p.quotas(),
        [QuotaPolicy::new("daily", 10, QuotaWindow::Day)]
    );
    assert!(p.quota_is_shared(0));
}

#[tokio::test]
async fn identity_updates_reach_its_keys_and_deleting_one_in_use_is_refused() {
    use keygate_core::IdentityUpdate;
    let (store, verifier, keys, sink) = setup();
    let mut id = Identity::new("etl", std::time::SystemTime::UNIX_EPOCH);
    id.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 100)];
    keys.create_identity("admin", id).await.unwrap();
    let a = keys
        .issue("admin", KeySpec::new("a").identity("etl"))
        .await
        .unwrap();
    let b = keys
        .issue("admin", KeySpec::new("b").identity("etl"))
        .await
        .unwrap();
    for k in [&a, &b] {
        let p = verifier.verify(k.key.expose_secret()).await.unwrap();
        assert_eq!(
            p.rate_limits(),
            [RateLimitPolicy::per_second("etl-burst", 100)]
        );
    }
    keys.revoke("admin", b.key.id()).await.unwrap();

    // Bad input changes nothing.
    let bad = keys
        .update_identity(
            "admin",
            "etl",
            IdentityUpdate {
                rate_limits: Some(vec![RateLimitPolicy::per_second("etl-burst", 0)]),
                ..IdentityUpdate::default()
            },
        )
        .await;
    assert!(matches!(bad, Err(LifecycleError::Invalid(_))), "{bad:?}");
    assert!(matches!(
        keys.update_identity("admin", "ghost", IdentityUpdate::default())
            .await,
        Err(LifecycleError::Store(StoreError::NoSuchName { .. }))
    ));

    let updated = keys
        .update_identity(
            "admin",
            "etl",
            IdentityUpdate {
                rate_limits: Some(vec![RateLimitPolicy::per_second("etl-burst", 5)]),
                metadata: Some(serde_json::json!({"team": "data"})),
                ..IdentityUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.metadata["team"], "data");
    // The next request of its key sees it (the cache was told), the key untouched.
    let p = verifier.verify(a.key.expose_secret()).await.unwrap();
    assert_eq!(
        p.rate_limits(),
        [RateLimitPolicy::per_second("etl-burst", 5)]
    );
    assert_eq!(keys.show(a.key.id()).await.unwrap().version, 0);
    // One identity_changed event, for the key that is not revoked.
    let changed: Vec<_> = sink
        .events()
        .iter()
        .filter_map(|e| e.as_lifecycle())
        .filter(|e| e.action == LifecycleAction::IdentityChanged)
        .map(|e| (e.key_id, e.changes[0].field.clone()))
        .collect();
    assert_eq!(changed, [(a.key.id(), "identity:etl".to_string())]);

    // Deleting an identity a live key names is refused; nothing changes.
    let refused = keys.delete_identity("admin", "etl").await;
    assert!(
        matches!(
            refused,
            Err(LifecycleError::Store(StoreError::InUse { holders: 1, .. }))
        ),
        "{refused:?}"
    );
    assert!(now(store.get_identity("etl")).unwrap().is_some());
    // Once its keys are gone (revoked), it can go.
    keys.revoke("admin", a.key.id()).await.unwrap();
    assert!(keys.delete_identity("admin", "etl").await.unwrap());
    assert!(!keys.delete_identity("admin", "etl").await.unwrap());
    assert!(now(store.get_identity("etl")).unwrap().is_none());
}
