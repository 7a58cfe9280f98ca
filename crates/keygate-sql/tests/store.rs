//! `SqlStore` as a `KeyStore` on both backends: round trips, errors, ordering and filters
//! (checked against `MemoryStore`), damaged rows, bulk inserts, the change sequence,
//! pruning, and migrations under concurrency.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use keygate_core::ChangeHandler;
use keygate_core::{
    DenialCode, KeyFilter, KeyHasher, KeyId, KeyRecord, KeyStatus, KeyStore, MemoryStore, Prefix,
    StatusWrite, StoreError, Verifier,
};
use keygate_sql::{Backend, OpenError, SqlOptions, SqlStore};

const T0: u64 = 1_780_000_000_000;

async fn crud_round_trip(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let (_, rec) = full(&h, "full", at_ms(T0));
    assert!(store.get(&rec.id).await.unwrap().is_none());
    store.insert(&rec).await.unwrap();
    let back = store.get(&rec.id).await.unwrap().expect("stored");
    assert!(same(&back, &rec), "{:?}\n{:?}", back.info(), rec.info());

    // A second insert of the same id is refused and changes nothing.
    let (_, mut other) = plain(&h, "other", at_ms(T0 + 1));
    other.id = rec.id;
    match store.insert(&other).await {
        Err(StoreError::AlreadyExists(id)) => assert_eq!(id, rec.id),
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    assert!(same(&store.get(&rec.id).await.unwrap().unwrap(), &rec));

    // Update replaces every field.
    let mut changed = rec.clone();
    changed.status = KeyStatus::Revoked;
    changed.owner = None;
    changed.expires_at = None;
    changed.scopes = vec!["*".into()];
    changed.metadata = serde_json::Value::Null;
    changed.rotated_from = None;
    changed.updated_at = at_ms(T0 + 99);
    store.update(&changed).await.unwrap();
    assert!(same(&store.get(&rec.id).await.unwrap().unwrap(), &changed));

    // Updating an unknown key is NotFound and stores nothing.
    let (_, ghost) = plain(&h, "ghost", at_ms(T0));
    match store.update(&ghost).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, ghost.id),
        r => panic!("expected NotFound, got {r:?}"),
    }
    assert!(store.get(&ghost.id).await.unwrap().is_none());

    // Times before 1970 and sub-millisecond parts: stored to the millisecond.
    let (_, mut old) = plain(
        &h,
        "old",
        SystemTime::UNIX_EPOCH - Duration::from_millis(1_500),
    );
    old.expires_at = Some(at_ms(T0) + Duration::from_micros(700));
    store.insert(&old).await.unwrap();
    let back = store.get(&old.id).await.unwrap().unwrap();
    assert_eq!(back.created_at, old.created_at);
    assert_eq!(back.expires_at, Some(at_ms(T0)));
}
both!(
    sqlite_crud_round_trip,
    postgres_crud_round_trip,
    crud_round_trip
);

async fn list_matches_the_memory_store(db: &Db) {
    let store = db.open().await;
    let memory = MemoryStore::new();
    let h = KeyHasher::new();
    let sk = Prefix::new("sk").unwrap();
    let mut records = Vec::new();
    // Out of order, with ties on created_at (then ordered by id).
    for (i, created) in [5u64, 1, 3, 3, 3, 9, 0, 1].into_iter().enumerate() {
        let prefix = if i % 3 == 0 {
            sk.clone()
        } else {
            Prefix::default()
        };
        let (_, mut r) =
            KeyRecord::generate(&prefix, &h, format!("k{i}"), at_ms(T0 + created)).unwrap();
        r.owner = match i % 3 {
            0 => Some("alice".into()),
            1 => Some("bob".into()),
            _ => None,
        };
        r.status = match i % 4 {
            0 => KeyStatus::Active,
            1 => KeyStatus::Disabled,
            2 => KeyStatus::Revoked,
            _ => KeyStatus::Active,
        };
        records.push(r);
    }
    for r in &records {
        store.insert(r).await.unwrap();
        memory.insert(r).await.unwrap();
    }
    let filters = [
        KeyFilter::default(),
        KeyFilter {
            owner: Some("alice".into()),
            ..Default::default()
        },
        KeyFilter {
            owner: Some("nobody".into()),
            ..Default::default()
        },
        KeyFilter {
            status: Some(KeyStatus::Active),
            ..Default::default()
        },
        KeyFilter {
            status: Some(KeyStatus::Revoked),
            ..Default::default()
        },
        KeyFilter {
            prefix: Some("sk".into()),
            ..Default::default()
        },
        KeyFilter {
            owner: Some("bob".into()),
            status: Some(KeyStatus::Disabled),
            prefix: Some("kg".into()),
        },
    ];
    for f in &filters {
        let got: Vec<KeyId> = store.list(f).await.unwrap().iter().map(|r| r.id).collect();
        let want: Vec<KeyId> = memory.list(f).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(got, want, "filter {f:?}");
    }
    assert_eq!(
        store.list(&KeyFilter::default()).await.unwrap().len(),
        records.len()
    );
}
both!(
    sqlite_list_matches_the_memory_store,
    postgres_list_matches_the_memory_store,
    list_matches_the_memory_store
);

/// Damages one column of one row by hand and expects `Corrupt` naming key and column.
async fn damaged_rows_are_corrupt(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let pg = db.name() == "postgres";
    let short_digest = if pg { "'\\x0001'::bytea" } else { "x'0001'" };
    let mut cases: Vec<(&str, String)> = vec![
        ("digest", format!("digest = {short_digest}")),
        ("scopes", "scopes = '[\"points:read\"'".into()),
        ("attributes", "attributes = '[1, 2]'".into()),
        ("metadata", "metadata = '{nope'".into()),
        ("allowed_ips", "allowed_ips = '[\"10.0.0.0/99\"]'".into()),
        (
            "rate_limits",
            "rate_limits = '[{\"name\":\"b\",\"limit\":1,\"period\":0}]'".into(),
        ),
        ("status", "status = 'Active'".into()),
        ("prefix", "prefix = 'Not A Prefix'".into()),
        ("rotated_from", "rotated_from = 'short'".into()),
    ];
    if !pg {
        // SQLite keeps any value in any column: a time that is not a number.
        cases.push(("created_at", "created_at = 'soon'".into()));
    }
    for (column, set) in &cases {
        let (key, rec) = plain(&h, column, at_ms(T0));
        store.insert(&rec).await.unwrap();
        db.exec(&format!(
            "UPDATE keygate_keys SET {set} WHERE id = '{}'",
            rec.id
        ))
        .await;
        match store.get(&rec.id).await {
            Err(StoreError::Corrupt(msg)) => {
                assert!(msg.contains(rec.id.as_str()), "{column}: {msg}");
                assert!(msg.contains(column), "{column}: {msg}");
            }
            r => panic!("{column}: expected Corrupt, got {r:?}"),
        }
        // A listing leaves it out and says which key and column (it does not fail).
        assert!(store.list(&KeyFilter::default()).await.unwrap().is_empty());
        let listing = store.list_report(&KeyFilter::default()).await.unwrap();
        assert!(listing.records.is_empty(), "{column}");
        assert_eq!(listing.skipped.len(), 1, "{column}");
        assert_eq!(listing.skipped[0].key_id, Some(rec.id), "{column}");
        assert_eq!(listing.skipped[0].column, *column);
        // A verifier refuses it as corrupt (never a panic, never a pass, not an outage).
        let verifier = Verifier::new(store.clone());
        let denial = verifier.verify(key.expose_secret()).await.unwrap_err();
        assert_eq!(denial.code(), DenialCode::CorruptKey, "{column}");
        assert_eq!(denial.retry_after(), None, "{column}");
        db.exec(&format!("DELETE FROM keygate_keys WHERE id = '{}'", rec.id))
            .await;
    }
    // A row whose id is not a key id: found by list, reported without trusting the text.
    let (_, rec) = plain(&h, "bad-id", at_ms(T0));
    store.insert(&rec).await.unwrap();
    db.exec(&format!(
        "UPDATE keygate_keys SET id = 'bad id \"x\"' WHERE id = '{}'",
        rec.id
    ))
    .await;
    let listing = store.list_report(&KeyFilter::default()).await.unwrap();
    assert!(listing.records.is_empty());
    assert_eq!(listing.skipped.len(), 1);
    assert_eq!(listing.skipped[0].key_id, None);
    assert_eq!(listing.skipped[0].column, "id");
    assert_eq!(listing.skipped[0].id, "\"bad id \\\"x\\\"\"");
}

/// One corrupt row among good ones: listings and preload go on without it (and say so),
/// and it can still be revoked or disabled by a status-only write.
async fn a_corrupt_row_is_skipped_reported_and_revocable(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let mut good = Vec::new();
    for i in 0..3 {
        let (key, rec) = plain(&h, &format!("good{i}"), at_ms(T0 + i));
        store.insert(&rec).await.unwrap();
        good.push((key, rec));
    }
    let (bad_key, bad) = plain(&h, "bad", at_ms(T0 + 1));
    store.insert(&bad).await.unwrap();
    db.exec(&format!(
        "UPDATE keygate_keys SET scopes = '[oops' WHERE id = '{}'",
        bad.id
    ))
    .await;

    let listing = store.list_report(&KeyFilter::default()).await.unwrap();
    let ids: Vec<KeyId> = listing.records.iter().map(|r| r.id).collect();
    assert_eq!(ids, good.iter().map(|(_, r)| r.id).collect::<Vec<_>>());
    assert_eq!(listing.skipped.len(), 1);
    let skipped = &listing.skipped[0];
    assert_eq!(
        (skipped.key_id, skipped.column.as_str()),
        (Some(bad.id), "scopes")
    );
    assert_eq!(skipped.id, bad.id.as_str());
    assert!(skipped.to_string().contains("column scopes"), "{skipped}");
    assert_eq!(store.list(&KeyFilter::default()).await.unwrap().len(), 3);

    // Preload loads the good ones; the corrupt key is refused as corrupt, not unknown.
    let verifier = Verifier::new(store.clone());
    assert_eq!(verifier.preload().await.unwrap(), 3);
    for (key, _) in &good {
        verifier.verify(key.expose_secret()).await.unwrap();
    }
    assert_eq!(
        verifier
            .verify(bad_key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::CorruptKey
    );

    // Status-only writes: disable, then revoke; a revoked row stays revoked.
    let at = at_ms(T0 + 1_000);
    assert_eq!(
        store
            .set_status(&bad.id, KeyStatus::Disabled, at)
            .await
            .unwrap(),
        StatusWrite::Written
    );
    assert_eq!(
        store
            .set_status(&bad.id, KeyStatus::Disabled, at)
            .await
            .unwrap(),
        StatusWrite::Unchanged
    );
    assert_eq!(
        store
            .set_status(&bad.id, KeyStatus::Revoked, at)
            .await
            .unwrap(),
        StatusWrite::Written
    );
    assert_eq!(
        store
            .set_status(&bad.id, KeyStatus::Active, at)
            .await
            .unwrap(),
        StatusWrite::Revoked
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM keygate_keys WHERE id = '{}' AND status = 'revoked' AND updated_at = {}",
            bad.id,
            T0 + 1_000
        ))
        .await,
        1
    );
    // Its other columns are untouched (still unreadable).
    assert!(matches!(
        store.get(&bad.id).await,
        Err(StoreError::Corrupt(_))
    ));
    let (_, ghost) = plain(&h, "ghost", at_ms(T0));
    assert!(matches!(
        store.set_status(&ghost.id, KeyStatus::Revoked, at).await,
        Err(StoreError::NotFound(id)) if id == ghost.id
    ));

    // A corrupt status column is repaired by revoking: the record reads again, revoked.
    let (_, odd) = plain(&h, "odd-status", at_ms(T0 + 2));
    store.insert(&odd).await.unwrap();
    db.exec(&format!(
        "UPDATE keygate_keys SET status = 'Active' WHERE id = '{}'",
        odd.id
    ))
    .await;
    assert_eq!(
        store
            .set_status(&odd.id, KeyStatus::Revoked, at)
            .await
            .unwrap(),
        StatusWrite::Written
    );
    assert_eq!(
        store.get(&odd.id).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
    // Through the key manager, audited; enabling blind is refused.
    let (_, third) = plain(&h, "third", at_ms(T0 + 3));
    store.insert(&third).await.unwrap();
    db.exec(&format!(
        "UPDATE keygate_keys SET metadata = '{{nope' WHERE id = '{}'",
        third.id
    ))
    .await;
    let sink = keygate_core::audit::MemorySink::new();
    let keys = keygate_core::KeyManager::builder(Arc::new(store.clone()))
        .auditor(keygate_core::audit::Auditor::direct(sink.clone()))
        .build();
    assert!(matches!(
        keys.revoke("ops", third.id).await,
        Err(keygate_core::LifecycleError::Store(StoreError::Corrupt(_)))
    ));
    assert!(matches!(
        keys.set_status_only("ops", third.id, KeyStatus::Active)
            .await,
        Err(keygate_core::LifecycleError::Invalid(_))
    ));
    assert_eq!(
        keys.set_status_only("ops", third.id, KeyStatus::Revoked)
            .await
            .unwrap(),
        StatusWrite::Written
    );
    assert_eq!(
        keys.set_status_only("ops", third.id, KeyStatus::Revoked)
            .await
            .unwrap(),
        StatusWrite::Unchanged
    );
    assert!(matches!(
        keys.set_status_only("ops", third.id, KeyStatus::Disabled)
            .await,
        Err(keygate_core::LifecycleError::WrongStatus { .. })
    ));
    let events = sink.events();
    assert_eq!(events.len(), 1);
    let e = events[0].as_lifecycle().unwrap();
    assert_eq!(
        (e.key_id, e.status, e.actor.as_str()),
        (third.id, KeyStatus::Revoked, "ops")
    );
}
both!(
    sqlite_a_corrupt_row_is_skipped_reported_and_revocable,
    postgres_a_corrupt_row_is_skipped_reported_and_revocable,
    a_corrupt_row_is_skipped_reported_and_revocable
);
both!(
    sqlite_damaged_rows_are_corrupt,
    postgres_damaged_rows_are_corrupt,
    damaged_rows_are_corrupt
);

/// A cached key whose row goes bad is evicted at its next refresh and refused with
/// `corrupt_key`, not served stale as if the store were down.
async fn a_corrupt_row_does_not_keep_a_cached_key_alive(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let clock = keygate_core::ManualClock::at_2026();
    let verifier = Verifier::builder(store.clone())
        .clock(clock.clone())
        .refresh_after(Duration::from_secs(30))
        .max_stale(Duration::from_secs(300))
        .build();
    let (key, rec) = plain(&h, "soon-corrupt", keygate_core::Clock::now(&clock));
    store.insert(&rec).await.unwrap();
    verifier.verify(key.expose_secret()).await.unwrap();
    db.exec(&format!(
        "UPDATE keygate_keys SET status = 'Active' WHERE id = '{}'",
        rec.id
    ))
    .await;
    clock.advance(Duration::from_secs(31));
    let denial = verifier.verify(key.expose_secret()).await.unwrap_err();
    assert_eq!(denial.code(), DenialCode::CorruptKey);
    assert_eq!(denial.retry_after(), None);
    assert_eq!(verifier.cached(), 0);
    assert_eq!(
        verifier
            .verify(key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::CorruptKey
    );
}
both!(
    sqlite_a_corrupt_row_does_not_keep_a_cached_key_alive,
    postgres_a_corrupt_row_does_not_keep_a_cached_key_alive,
    a_corrupt_row_does_not_keep_a_cached_key_alive
);

/// Every record's lineage is stored (rows from before it existed read as their own id),
/// rotation through the key manager carries it over, and the verifier's principal names it.
async fn lineage_is_stored_and_carried_by_rotation(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let (_, fresh) = plain(&h, "fresh", at_ms(T0));
    assert_eq!((fresh.lineage, fresh.lineage_id()), (None, fresh.id));
    store.insert(&fresh).await.unwrap();
    assert_eq!(store.get(&fresh.id).await.unwrap().unwrap().lineage, None);
    // Stored as NULL for a key of its own lineage (as every row from before migration 5).
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM keygate_keys WHERE id = '{}' AND lineage IS NULL",
            fresh.id
        ))
        .await,
        1
    );

    let (_, mut child) = plain(&h, "child", at_ms(T0 + 1));
    child.lineage = Some(fresh.id);
    store.insert(&child).await.unwrap();
    assert_eq!(
        store.get(&child.id).await.unwrap().unwrap().lineage,
        Some(fresh.id)
    );
    let (_, mut bulk) = plain(&h, "bulk", at_ms(T0 + 2));
    bulk.lineage = Some(fresh.id);
    store
        .insert_many(std::slice::from_ref(&bulk))
        .await
        .unwrap();
    let listed = store.list(&KeyFilter::default()).await.unwrap();
    let lineages: Vec<KeyId> = listed.iter().map(|r| r.lineage_id()).collect();
    assert_eq!(lineages, [fresh.id, fresh.id, fresh.id]);
    // Updates keep it (and can change it).
    let mut moved = child.clone();
    moved.lineage = None;
    store.update(&moved).await.unwrap();
    assert_eq!(store.get(&child.id).await.unwrap().unwrap().lineage, None);

    // A row written without the column (an older keygate, or by hand).
    let old_id = KeyId::generate().unwrap();
    let digest = if db.name() == "postgres" {
        "decode(repeat('00', 32), 'hex')"
    } else {
        "zeroblob(32)"
    };
    db.exec(&format!(
        "INSERT INTO keygate_keys (id, prefix, digest, name, status, created_at, updated_at) \
         VALUES ('{old_id}', 'kg', {digest}, 'old', 'active', 0, 0)"
    ))
    .await;
    assert_eq!(
        store.get(&old_id).await.unwrap().unwrap().lineage_id(),
        old_id
    );
    // A lineage that is not a key id is a corrupt row naming the column.
    db.exec(&format!(
        "UPDATE keygate_keys SET lineage = 'nope' WHERE id = '{old_id}'"
    ))
    .await;
    match store.get(&old_id).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("column lineage"), "{msg}"),
        r => panic!("expected Corrupt, got {r:?}"),
    }
    db.exec(&format!("DELETE FROM keygate_keys WHERE id = '{old_id}'"))
        .await;

    // Rotation through the key manager: the whole chain has the first key's lineage.
    let verifier = Verifier::new(store.clone());
    let keys = keygate_core::KeyManager::for_verifier(
        &verifier,
        keygate_core::audit::Auditor::direct(keygate_core::audit::MemorySink::new()),
    );
    let first = keys
        .issue("ops", keygate_core::KeySpec::new("chain"))
        .await
        .unwrap();
    let second = keys
        .rotate("ops", first.key.id(), Duration::from_secs(60))
        .await
        .unwrap();
    let third = keys
        .rotate("ops", second.key.id(), Duration::from_secs(60))
        .await
        .unwrap();
    for k in [&first, &second, &third] {
        assert_eq!(
            store.get(&k.key.id()).await.unwrap().unwrap().lineage_id(),
            first.key.id()
        );
        let fresh_verifier = Verifier::new(store.clone());
        let p = fresh_verifier.verify(k.key.expose_secret()).await.unwrap();
        assert_eq!((p.key_id(), p.lineage_id()), (k.key.id(), first.key.id()));
    }
}
both!(
    sqlite_lineage_is_stored_and_carried_by_rotation,
    postgres_lineage_is_stored_and_carried_by_rotation,
    lineage_is_stored_and_carried_by_rotation
);

async fn insert_many_is_all_or_nothing(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    assert_eq!(store.insert_many(&[]).await.unwrap(), 0);
    let batch: Vec<KeyRecord> = (0..1_234)
        .map(|i| full(&h, &format!("bulk{i}"), at_ms(T0 + i)).1)
        .collect();
    assert_eq!(store.insert_many(&batch).await.unwrap(), 1_234);
    let listed = store.list(&KeyFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1_234);
    assert!(same(&listed[777], &batch[777]));

    // One id already stored, in the middle of a new batch: nothing of it is inserted.
    let mut next: Vec<KeyRecord> = (0..1_100)
        .map(|i| plain(&h, &format!("next{i}"), at_ms(T0 + i)).1)
        .collect();
    next[900].id = batch[5].id;
    match store.insert_many(&next).await {
        Err(StoreError::AlreadyExists(id)) => assert_eq!(id, batch[5].id),
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    assert!(store.get(&next[0].id).await.unwrap().is_none());
    assert_eq!(
        store.list(&KeyFilter::default()).await.unwrap().len(),
        1_234
    );

    // An id repeated within the batch.
    let mut twice: Vec<KeyRecord> = (0..3).map(|i| plain(&h, "t", at_ms(T0 + i)).1).collect();
    twice[2].id = twice[0].id;
    assert!(matches!(
        store.insert_many(&twice).await,
        Err(StoreError::AlreadyExists(id)) if id == twice[0].id
    ));
    assert!(store.get(&twice[1].id).await.unwrap().is_none());
}
both!(
    sqlite_insert_many_is_all_or_nothing,
    postgres_insert_many_is_all_or_nothing,
    insert_many_is_all_or_nothing
);

async fn every_write_advances_the_change_sequence(db: &Db) {
    let store = db.open().await;
    let h = KeyHasher::new();
    let s0 = store.last_change().await.unwrap();
    let (_, mut a) = plain(&h, "a", at_ms(T0));
    store.insert(&a).await.unwrap();
    a.status = KeyStatus::Disabled;
    store.update(&a).await.unwrap();
    // A failed write records nothing.
    assert!(store.insert(&a).await.is_err());
    let (_, ghost) = plain(&h, "ghost", at_ms(T0));
    assert!(store.update(&ghost).await.is_err());
    // A write by hand counts too (the triggers record it).
    db.exec(&format!(
        "UPDATE keygate_keys SET name = 'renamed' WHERE id = '{}'",
        a.id
    ))
    .await;
    let bulk: Vec<KeyRecord> = (0..3).map(|i| plain(&h, "b", at_ms(T0 + i)).1).collect();
    store.insert_many(&bulk).await.unwrap();
    db.exec(&format!(
        "DELETE FROM keygate_keys WHERE id = '{}'",
        bulk[0].id
    ))
    .await;

    let changes = store.changes_since(s0, 100).await.unwrap();
    let ids: Vec<KeyId> = changes.iter().map(|c| c.key_id.unwrap()).collect();
    let mut bulk_ids: Vec<KeyId> = bulk.iter().map(|r| r.id).collect();
    let got_bulk: Vec<KeyId> = {
        let mut v = ids[3..6].to_vec();
        v.sort();
        v
    };
    bulk_ids.sort();
    assert_eq!(&ids[..3], &[a.id, a.id, a.id]);
    assert_eq!(got_bulk, bulk_ids);
    assert_eq!(ids[6], bulk[0].id);
    assert_eq!(ids.len(), 7);
    assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.last_change().await.unwrap(), changes[6].seq);
    let now = SystemTime::now();
    assert!(changes
        .iter()
        .all(|c| c.at <= now + Duration::from_secs(5) && c.at + Duration::from_secs(60) >= now));
}
both!(
    sqlite_every_write_advances_the_change_sequence,
    postgres_every_write_advances_the_change_sequence,
    every_write_advances_the_change_sequence
);

/// Records what a follower reports.
#[derive(Default)]
struct Recorder {
    changed: Mutex<Vec<KeyId>>,
    resyncs: Mutex<u32>,
}

impl ChangeHandler for Recorder {
    fn changed(&self, id: &KeyId) {
        self.changed.lock().unwrap().push(*id);
    }
    fn resync(&self) {
        *self.resyncs.lock().unwrap() += 1;
    }
}

async fn pruned_changes_force_a_resync(db: &Db) {
    // A poll far apart: the follower reads only when told (`poll_now`) or notified.
    let store = db
        .open_with(db.options().poll_interval(Duration::from_secs(3_600)))
        .await;
    let h = KeyHasher::new();
    let rec = Arc::new(Recorder::default());
    let follower = store.follow(rec.clone()).await.unwrap();
    let s0 = follower.cursor();

    // Three writes whose changes are pruned before the follower can read them (one
    // transaction, so neither a poll nor a notification comes in between).
    let digest = if db.name() == "postgres" {
        "decode(repeat('00', 32), 'hex')"
    } else {
        "zeroblob(32)"
    };
    let mut script = String::from("BEGIN;");
    for id in ["handwritten1", "handwritten2", "handwritten3"] {
        script.push_str(&format!(
            "INSERT INTO keygate_keys (id, prefix, digest, name, status, created_at, updated_at) \
             VALUES ('{id}', 'kg', {digest}, 'x', 'active', 0, 0);"
        ));
    }
    script.push_str(
        "UPDATE keygate_meta SET value = (SELECT MAX(seq) FROM keygate_changes) \
         WHERE name = 'changes_pruned_through'; DELETE FROM keygate_changes; COMMIT;",
    );
    db.exec(&script).await;
    let pruned = store.pruned_through().await.unwrap();
    assert_eq!(pruned, s0 + 3);
    assert_eq!(store.last_change().await.unwrap(), pruned);
    follower.poll_now();
    follower.caught_up(pruned).await;
    assert_eq!(*rec.resyncs.lock().unwrap(), 1);
    assert!(rec.changed.lock().unwrap().is_empty());

    // Later changes are reported one by one again.
    let (_, more) = plain(&h, "more", at_ms(T0));
    store.insert(&more).await.unwrap();
    follower.poll_now();
    follower.caught_up(pruned + 1).await;
    assert_eq!(*rec.changed.lock().unwrap(), vec![more.id]);

    // prune_changes: deletes what is older than the cut, records how far it went; a
    // follower that had read everything does not resync.
    assert_eq!(
        store.prune_changes(SystemTime::UNIX_EPOCH).await.unwrap(),
        0
    );
    let deleted = store
        .prune_changes(SystemTime::now() + Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(store.pruned_through().await.unwrap(), pruned + 1);
    assert_eq!(store.last_change().await.unwrap(), pruned + 1);
    assert!(store.changes_since(0, 10).await.unwrap().is_empty());
    follower.poll_now();
    let (_, last) = plain(&h, "last", at_ms(T0));
    store.insert(&last).await.unwrap();
    follower.poll_now();
    follower.caught_up(pruned + 2).await;
    assert_eq!(*rec.resyncs.lock().unwrap(), 1);
    assert_eq!(*rec.changed.lock().unwrap(), vec![more.id, last.id]);
    follower.shutdown().await;
}
both!(
    sqlite_pruned_changes_force_a_resync,
    postgres_pruned_changes_force_a_resync,
    pruned_changes_force_a_resync
);

/// The newest migration version this build embeds (1: keys; 2: usage and audit; 3: meta;
/// 4: scopes; 5: lineage; 6: iam; 7: last-used times; 8: mint), and how many versions it
/// embeds.
const LATEST: i64 = 8;
const EMBEDDED: i64 = 8;

async fn migrations_apply_once_under_concurrency(db: &Db) {
    // Eight handles open the same new database at once.
    let opens = (0..8).map(|_| {
        let url = db.url().to_owned();
        let options = db.options();
        tokio::spawn(async move { SqlStore::open_with(&url, options).await })
    });
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("every concurrent open succeeds"));
    }
    assert!(stores.iter().all(|s| s.schema_version() == LATEST));
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_migrations").await,
        EMBEDDED
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_meta WHERE name = 'changes_pruned_through'")
            .await,
        1
    );
    // All of them work on the same data.
    let (_, r) = plain(&KeyHasher::new(), "shared", at_ms(T0));
    stores[3].insert(&r).await.unwrap();
    assert!(stores[6].get(&r.id).await.unwrap().is_some());
    // Opening again applies nothing.
    let again = db.open().await;
    assert_eq!(again.schema_version(), LATEST);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_migrations").await,
        EMBEDDED
    );

    // A database whose applied migration differs from the embedded one is refused.
    let tamper = if db.name() == "postgres" {
        "'\\x00'::bytea"
    } else {
        "x'00'"
    };
    db.exec(&format!(
        "UPDATE keygate_migrations SET checksum = {tamper} WHERE version = 1"
    ))
    .await;
    match SqlStore::open_with(db.url(), db.options()).await {
        Err(OpenError::Migration(msg)) => assert!(msg.contains("migration 1"), "{msg}"),
        r => panic!("expected a migration error, got {r:?}"),
    }
}
both!(
    sqlite_migrations_apply_once_under_concurrency,
    postgres_migrations_apply_once_under_concurrency,
    migrations_apply_once_under_concurrency
);

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let db = Db::sqlite();
    let Db::Sqlite { dir, .. } = &db else {
        unreachable!()
    };
    let path = dir.path().join("keygate.db");
    assert!(!path.exists());
    let store = db.open().await;
    assert!(path.exists());
    assert_eq!(store.backend(), Backend::Sqlite);
    let mode: String = {
        use sqlx::{ConnectOptions, Connection};
        use std::str::FromStr;
        let mut c = sqlx::sqlite::SqliteConnectOptions::from_str(db.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let m = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        m
    };
    assert_eq!(mode, "wal");
    assert!(format!("{store:?}").contains("Sqlite"));
}

#[tokio::test]
async fn open_errors_are_typed_and_keep_secrets() {
    assert!(matches!(
        SqlStore::open("mysql://u:p@localhost/db").await,
        Err(OpenError::UnsupportedScheme)
    ));
    assert!(matches!(
        SqlStore::open_with("sqlite::memory:", SqlOptions::new().schema("Bad-Name")).await,
        Err(OpenError::InvalidOption(_))
    ));
    assert!(matches!(
        SqlStore::open("sqlite:///nonexistent-dir-kg/sub/keygate.db").await,
        Err(OpenError::Unavailable(_))
    ));
    // Nothing listens on port 1: unavailable within the acquire timeout, password unsaid.
    let start = std::time::Instant::now();
    let err = SqlStore::open_with(
        "postgres://kg:hunter2secret@127.0.0.1:1/db",
        SqlOptions::new().acquire_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, OpenError::Unavailable(_)), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!err.to_string().contains("hunter2secret"));
    assert!(!format!("{err:?}").contains("hunter2secret"));
    // As a store error it is Unavailable.
    assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
}

#[tokio::test]
async fn postgres_schema_is_created_and_used() {
    let Some(Db::Postgres(pg)) = Db::postgres().await else {
        return;
    };
    // A schema that does not exist yet is created on open.
    let inner = format!("{}_sub", pg.schema);
    let _inner_guard = PgSchema::adopt(&pg.url, &inner);
    let store = SqlStore::open_with(&pg.url, SqlOptions::new().schema(inner.clone()))
        .await
        .unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    let (_, r) = plain(&KeyHasher::new(), "in-schema", at_ms(T0));
    store.insert(&r).await.unwrap();
    let db = Db::Postgres(pg);
    assert_eq!(
        db.scalar(&format!("SELECT COUNT(*) FROM {inner}.keygate_keys"))
            .await,
        1
    );
}

/// Last-used times: marked by the verifier in memory, written by its flush (one statement
/// per flush, not per request), read back by `get` and `list`, never moved back, left
/// alone by `update`, and invisible to the change sequence and the record's version.
async fn last_used_is_flushed_not_written_per_request(db: &Db) {
    let store = Arc::new(db.open().await);
    let h = KeyHasher::new();
    let clock = keygate_core::ManualClock::new(at_ms(T0));
    let (key, rec) = plain(&h, "used", at_ms(T0));
    let (_, idle) = plain(&h, "idle", at_ms(T0 + 1));
    store.insert(&rec).await.unwrap();
    store.insert(&idle).await.unwrap();
    let verifier = Verifier::builder_shared(store.clone())
        .clock(clock.clone())
        .build();
    let changes_before = store.last_change().await.unwrap();

    clock.advance(Duration::from_secs(125));
    for _ in 0..50 {
        verifier.verify(key.expose_secret()).await.unwrap();
    }
    // Requests wrote nothing.
    assert_eq!(
        store.get(&rec.id).await.unwrap().unwrap().last_used_at,
        None
    );
    assert_eq!(verifier.flush_last_used().await.unwrap(), 1);
    // T0 is 1_780_000_000_000 ms; + 125 s, cut to the minute.
    let minute_ms = (T0 / 1000 + 125) / 60 * 60 * 1000;
    let got = store.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(at_ms(minute_ms)));
    assert_eq!(got.version, rec.version, "no version bump");
    let listed = store.list(&KeyFilter::default()).await.unwrap();
    let by_name = |n: &str| listed.iter().find(|r| r.name == n).unwrap().last_used_at;
    assert_eq!(by_name("used"), Some(at_ms(minute_ms)));
    assert_eq!(by_name("idle"), None);
    assert_eq!(
        store.last_change().await.unwrap(),
        changes_before,
        "a last-used write is not a key change"
    );

    // Older times never move it back; unknown ids are ignored.
    let (_, ghost) = plain(&h, "ghost", at_ms(T0));
    store
        .record_last_used(&[(rec.id, at_ms(T0)), (ghost.id, at_ms(T0))])
        .await
        .unwrap();
    assert_eq!(
        store.get(&rec.id).await.unwrap().unwrap().last_used_at,
        Some(at_ms(minute_ms))
    );
    assert!(store.get(&ghost.id).await.unwrap().is_none());

    // An update from a record read before the flush leaves the time alone.
    let mut stale = rec.clone();
    stale.name = "renamed".into();
    store.update(&stale).await.unwrap();
    let got = store.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.name, "renamed");
    assert_eq!(got.last_used_at, Some(at_ms(minute_ms)));

    // A later minute moves it forward; a flush with nothing new does not call the store.
    clock.advance(Duration::from_secs(60));
    verifier.verify(key.expose_secret()).await.unwrap();
    assert_eq!(verifier.flush_last_used().await.unwrap(), 1);
    assert_eq!(verifier.flush_last_used().await.unwrap(), 0);
    assert_eq!(
        store.get(&rec.id).await.unwrap().unwrap().last_used_at,
        Some(at_ms(minute_ms + 60_000))
    );
}
both!(
    sqlite_last_used_is_flushed_not_written_per_request,
    postgres_last_used_is_flushed_not_written_per_request,
    last_used_is_flushed_not_written_per_request
);
