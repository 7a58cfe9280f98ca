//! The SQL audit sink against real databases: lifecycle and request events written through
//! an `Auditor` arrive in `keygate_audit` in order, carry no key, read back through
//! `SqlStore::audit_events`; batches, filters, and a database outage (nothing lost, the
//! events are written when it returns).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_core::audit::{AuditSink, Auditor, Decision, LifecycleAction, RequestEvent};
use keygate_core::{DenialCode, KeyManager, KeySpec, Verifier};
use keygate_sql::{AuditQuery, SqlStore};

async fn all_rows(db: &Db) -> Vec<String> {
    let store = db.open().await;
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .audit_events(&AuditQuery {
                after,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        out.extend(
            page.iter()
                .map(|e| serde_json::to_string(&e.event).unwrap()),
        );
    }
    out
}

async fn lifecycle_events_arrive_without_keys(db: &Db) {
    let store = db.open().await;
    let verifier = Verifier::new(store.clone());
    let auditor = Auditor::spawn(store.audit_sink().unwrap()).unwrap();
    let keys = KeyManager::for_verifier(&verifier, auditor.clone());

    let issued = keys
        .issue(
            "alice",
            KeySpec::new("ci").owner("acme").scope("points:read"),
        )
        .await
        .unwrap();
    let rotated = keys
        .rotate("alice", issued.key.id(), Duration::from_secs(60))
        .await
        .unwrap();
    keys.disable("bob", rotated.key.id()).await.unwrap();
    keys.enable("bob", rotated.key.id()).await.unwrap();
    keys.revoke("bob", issued.key.id()).await.unwrap();
    let mut denied = RequestEvent::new(SystemTime::now(), "req-1", "GET", "/collections");
    denied.key_id = Some(issued.key.id());
    denied.decision = Decision::Denied;
    denied.denial = Some(DenialCode::RevokedKey);
    denied.status = Some(401);
    auditor.record(denied.into()).await.unwrap();
    // `flush` waits until the writer thread's batch is committed.
    auditor.flush().await.unwrap();

    let events = store.audit_events(&AuditQuery::default()).await.unwrap();
    let actions: Vec<(LifecycleAction, &str, String)> = events
        .iter()
        .filter_map(|e| e.event.as_lifecycle())
        .map(|l| (l.action, l.actor.as_str(), l.key_id.to_string()))
        .collect();
    let (old, new) = (issued.key.id().to_string(), rotated.key.id().to_string());
    assert_eq!(
        actions,
        [
            (LifecycleAction::Issued, "alice", old.clone()),
            (LifecycleAction::Rotated, "alice", old.clone()),
            (LifecycleAction::Issued, "alice", new.clone()),
            (LifecycleAction::Disabled, "bob", new.clone()),
            (LifecycleAction::Enabled, "bob", new.clone()),
            (LifecycleAction::Revoked, "bob", old.clone()),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let last = events.last().unwrap().event.as_request().unwrap();
    assert_eq!(last.request_id, "req-1");
    assert_eq!(last.denial, Some(DenialCode::RevokedKey));

    // The filter columns.
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_audit WHERE kind = 'lifecycle'")
            .await,
        6
    );
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM keygate_audit WHERE kind = 'request' AND action = 'denied'"
        )
        .await,
        1
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_audit WHERE actor = 'bob'")
            .await,
        3
    );
    // Filter by key, latest first-N.
    let about_old = store
        .audit_events(&AuditQuery {
            key_id: Some(issued.key.id()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(about_old.len(), 4);
    let latest = store
        .audit_events(&AuditQuery {
            limit: 2,
            latest: true,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!(latest[1].seq, events.last().unwrap().seq);
    assert!(latest[0].seq < latest[1].seq);

    // No plaintext anywhere in the table: neither key, nor their secret parts.
    let rows = all_rows(db).await;
    assert_eq!(rows.len(), 7);
    for key in [&issued.key, &rotated.key] {
        let secret = key.expose_secret();
        let tail = &secret[secret.len() - 28..]; // the secret and checksum
        for row in &rows {
            assert!(
                !row.contains(secret) && !row.contains(tail),
                "a key in {row}"
            );
        }
    }
    let raw_hits = db
        .scalar(&format!(
            "SELECT COUNT(*) FROM keygate_audit WHERE event LIKE '%{}%' OR event LIKE '%{}%'",
            issued.key.expose_secret(),
            rotated.key.expose_secret()
        ))
        .await;
    assert_eq!(raw_hits, 0);
    let stats = auditor.shutdown().await;
    assert_eq!(stats.written, 7);
    assert_eq!(stats.failed, 0);
}
both!(
    sqlite_lifecycle_events_arrive_without_keys,
    postgres_lifecycle_events_arrive_without_keys,
    lifecycle_events_arrive_without_keys
);

async fn many_events_in_batches(db: &Db) {
    let store = db.open().await;
    let sink = store.audit_sink_builder().batch(100).build().unwrap();
    let auditor = Auditor::builder().capacity(256).spawn(sink).unwrap();
    const N: usize = 2_500;
    for i in 0..N {
        auditor
            .record(
                RequestEvent::new(
                    UNIX_EPOCH + Duration::from_secs(i as u64),
                    format!("r{i}"),
                    "POST",
                    "/points",
                )
                .into(),
            )
            .await
            .unwrap();
    }
    let stats = auditor.shutdown().await;
    assert_eq!(stats.written, N as u64);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_audit").await,
        N as i64
    );
    // In order: the table's seq follows the record order.
    let mut after = None;
    let mut next = 0;
    loop {
        let page = store
            .audit_events(&AuditQuery {
                after,
                limit: 700,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        for e in &page {
            assert_eq!(e.event.as_request().unwrap().request_id, format!("r{next}"));
            next += 1;
        }
    }
    assert_eq!(next, N);
}
both!(
    sqlite_many_events_in_batches,
    postgres_many_events_in_batches,
    many_events_in_batches
);

/// Called on a worker of a multi-threaded runtime (`Auditor::direct`), the sink waits in
/// `block_in_place`; the events are in the table when `flush` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_direct_auditor_on_a_multi_threaded_runtime() {
    let db = Db::sqlite();
    let store = db.open().await;
    let sink = store.audit_sink().unwrap();
    let auditor = Auditor::direct(sink);
    for i in 0..3 {
        auditor
            .record(RequestEvent::new(UNIX_EPOCH, format!("d{i}"), "GET", "/").into())
            .await
            .unwrap();
    }
    assert_eq!(db.scalar("SELECT COUNT(*) FROM keygate_audit").await, 0);
    auditor.flush().await.unwrap();
    assert_eq!(db.scalar("SELECT COUNT(*) FROM keygate_audit").await, 3);
}

/// On a current-thread runtime the sink cannot wait for its own runtime: `sync` says so,
/// and the batch is still written once the runtime runs.
#[tokio::test(flavor = "current_thread")]
async fn sqlite_current_thread_sync_is_refused_but_nothing_is_lost() {
    let db = Db::sqlite();
    let store = db.open().await;
    let sink = store.audit_sink().unwrap();
    sink.record(&RequestEvent::new(UNIX_EPOCH, "c1", "GET", "/").into())
        .unwrap();
    assert!(sink.sync().is_err());
    poll_until(Duration::from_secs(5), "the handed-over batch", || async {
        (store
            .audit_events(&AuditQuery::default())
            .await
            .unwrap()
            .len()
            == 1)
            .then_some(())
    })
    .await;
}

/// PostgreSQL cut off: flushes fail, the events stay buffered, and the first flush after
/// the database returns writes all of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_keeps_events_until_the_database_returns() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    db.open().await; // migrate through the direct address
    let proxy = Proxy::start(pg_addr(&pg.url)).await;
    let store = SqlStore::open_with(
        &with_addr(&pg.url, proxy.addr),
        db.options()
            .acquire_timeout(Duration::from_millis(300))
            .operation_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let sink = std::sync::Arc::new(store.audit_sink().unwrap());
    let auditor = Auditor::spawn(sink.clone()).unwrap();
    let ev = |i: usize| RequestEvent::new(UNIX_EPOCH, format!("o{i}"), "GET", "/").into();
    auditor.record(ev(0)).await.unwrap();
    auditor.flush().await.unwrap();
    proxy.set_on(false);
    for i in 1..=5 {
        auditor.record(ev(i)).await.unwrap();
    }
    assert!(auditor.flush().await.is_err(), "the database is cut off");
    assert_eq!(sink.buffered(), 5);
    proxy.set_on(true);
    poll_until(Duration::from_secs(10), "a flush to succeed", || async {
        auditor.flush().await.ok()
    })
    .await;
    assert_eq!(sink.buffered(), 0);
    assert_eq!(sink.dropped(), 0);
    let ids: Vec<String> = db
        .open()
        .await
        .audit_events(&AuditQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.as_request().unwrap().request_id.to_string())
        .collect();
    assert_eq!(ids, ["o0", "o1", "o2", "o3", "o4", "o5"]);
    auditor.shutdown().await;
}
