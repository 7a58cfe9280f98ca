//! Change propagation, measured: a key revoked through one store handle (another pool, or
//! another process) stops working in a verifier fed by a different handle within 1 s on
//! SQLite and 200 ms on PostgreSQL. The verifiers here trust their cache for 30 s
//! (`refresh_after`), so only the change follower can make them see a change in time.
//!
//! How the bound is asserted: tests that measure several revocations assert the bound on
//! the median, and every single measurement against a looser ceiling ([`ceiling`]). A
//! loaded machine (parallel test binaries, other builds on two cores) can stall a process
//! for several poll intervals at a time; that is the machine, not propagation, and one such
//! stall must not fail the run, while a follower that stopped working still does (its
//! revocations would take the verifier's 30 s refresh).
//!
//! The measured times are printed (`cargo test -p keygate-sql --test propagation --
//! --nocapture`).

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_core::{DenialCode, KeyHasher, KeyId, KeyStatus, KeyStore, Verifier};
use keygate_sql::{Backend, SqlOptions, SqlStore};

/// The propagation bound the issue sets for each backend.
fn bound(db: &Db) -> Duration {
    match db.name() {
        "postgres" => Duration::from_millis(200),
        _ => Duration::from_secs(1),
    }
}

/// The most any single measurement may take: the bound plus room for a loaded machine to
/// stall the test process, still far below the 30 s the verifiers would need without the
/// follower.
fn ceiling(db: &Db) -> Duration {
    match db.name() {
        "postgres" => Duration::from_secs(1),
        _ => Duration::from_secs(3),
    }
}

/// Sorts `times` and asserts the bound on the median and the ceiling on the worst.
fn assert_within_bound(db: &Db, what: &str, times: &mut [Duration]) {
    times.sort();
    let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
    println!(
        "{}: {what} reached the verifier in min {:?}, median {median:?}, max {worst:?} ({} runs, bound {:?} on the median, ceiling {:?})",
        db.name(),
        times[0],
        times.len(),
        bound(db),
        ceiling(db)
    );
    assert!(
        median <= bound(db),
        "median {median:?} over {:?}",
        bound(db)
    );
    assert!(
        worst <= ceiling(db),
        "worst {worst:?} over {:?}",
        ceiling(db)
    );
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// Polls `verifier` with `key` until it is denied with `code`; fails the test after
/// `limit`. Returns the wall-clock time of the first denial (µs since the epoch).
async fn until_denied(verifier: &Verifier, key: &str, code: DenialCode, limit: Duration) -> u128 {
    poll_until(limit, "the verifier to deny the revoked key", || async {
        match verifier.verify(key).await {
            Ok(_) => None,
            Err(d) if d.code() == code => Some(now_us()),
            Err(d) => panic!("unexpected denial {:?}", d.code()),
        }
    })
    .await
    .0
}

async fn revocation_reaches_another_handle(db: &Db) {
    let serving = db.open().await;
    let admin = db.open().await;
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let h = KeyHasher::new();
    let mut times = Vec::new();
    for i in 0..10 {
        let (key, mut rec) = plain(&h, &format!("k{i}"), SystemTime::now());
        admin.insert(&rec).await.unwrap();
        // The new key works here as soon as the store has it (a miss reads the store).
        verifier.verify(key.expose_secret()).await.unwrap();
        follower.caught_up(admin.last_change().await.unwrap()).await;
        verifier.verify(key.expose_secret()).await.unwrap();

        rec.status = KeyStatus::Revoked;
        let start = now_us();
        admin.update(&rec).await.unwrap();
        let denied = until_denied(
            &verifier,
            key.expose_secret(),
            DenialCode::RevokedKey,
            ceiling(db),
        )
        .await;
        times.push(Duration::from_micros((denied - start) as u64));
    }
    assert_within_bound(db, "revocation through another handle", &mut times);
    follower.shutdown().await;
}
both!(
    sqlite_revocation_reaches_another_handle,
    postgres_revocation_reaches_another_handle,
    revocation_reaches_another_handle
);

const CHILD_URL: &str = "KEYGATE_SQL_CHILD_URL";
const CHILD_SCHEMA: &str = "KEYGATE_SQL_CHILD_SCHEMA";
const CHILD_KEY: &str = "KEYGATE_SQL_CHILD_KEY";

/// Run as a separate process by the cross-process tests (the test binary re-executes
/// itself): opens the store named by the environment, revokes the key, prints when.
#[tokio::test]
#[ignore = "a helper: the cross-process propagation tests run it as a child process"]
async fn child_revokes_a_key() {
    let (Ok(url), Ok(id)) = (std::env::var(CHILD_URL), std::env::var(CHILD_KEY)) else {
        println!("nothing to do: run by the propagation tests only");
        return;
    };
    let mut options = SqlOptions::new();
    if let Ok(schema) = std::env::var(CHILD_SCHEMA) {
        options = options.schema(schema);
    }
    let store = SqlStore::open_with(&url, options)
        .await
        .expect("child: open");
    let id = KeyId::parse(&id).expect("child: key id");
    let mut rec = store
        .get(&id)
        .await
        .expect("child: get")
        .expect("child: the key");
    rec.status = KeyStatus::Revoked;
    rec.updated_at = SystemTime::now();
    let start = now_us();
    store.update(&rec).await.expect("child: revoke");
    let done = now_us();
    println!("KEYGATE_CHILD revoke_start_us={start} revoke_done_us={done}");
}

async fn revocation_reaches_another_process(db: &Db) {
    let serving = db.open().await;
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let (key, rec) = plain(&KeyHasher::new(), "cross-process", SystemTime::now());
    serving.insert(&rec).await.unwrap();
    follower
        .caught_up(serving.last_change().await.unwrap())
        .await;
    verifier.verify(key.expose_secret()).await.unwrap();

    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_revokes_a_key", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_URL, db.url())
        .env(CHILD_KEY, rec.id.as_str())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Db::Postgres(pg) = db {
        cmd.env(CHILD_SCHEMA, &pg.schema);
    } else {
        cmd.env_remove(CHILD_SCHEMA);
    }
    let child = cmd.spawn().expect("spawn the child process");
    // The child needs time to start and open its store; the bound is checked against the
    // moment it wrote, which it reports.
    let denied = until_denied(
        &verifier,
        key.expose_secret(),
        DenialCode::RevokedKey,
        Duration::from_secs(60),
    )
    .await;
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("KEYGATE_CHILD "))
        .unwrap_or_else(|| panic!("no report from the child: {stdout}"));
    let field = |name: &str| -> u128 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    let start = field("revoke_start_us=");
    let done = field("revoke_done_us=");
    let from_start = Duration::from_micros(denied.saturating_sub(start) as u64);
    let from_commit = Duration::from_micros(denied.saturating_sub(done) as u64);
    println!(
        "{}: revocation by another process reached the verifier {:?} after its write started ({:?} after it committed; bound {:?})",
        db.name(),
        from_start,
        from_commit,
        bound(db)
    );
    // One measurement: the ceiling (see the module docs); the bound itself is asserted on
    // the median of the ten in-process revocations above.
    assert!(from_start <= ceiling(db), "{from_start:?}");
    follower.shutdown().await;
}
both!(
    sqlite_revocation_reaches_another_process,
    postgres_revocation_reaches_another_process,
    revocation_reaches_another_process
);

/// A preloaded verifier answers unknown ids without the store; keys created elsewhere
/// reach it through the follower, and so do disable and enable.
async fn preloaded_verifier_follows_creation_and_status(db: &Db) {
    let serving = db.open().await;
    let admin = db.open().await;
    let h = KeyHasher::new();
    let (old_key, old) = plain(&h, "old", SystemTime::now());
    admin.insert(&old).await.unwrap();
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    // Follower first, then preload: nothing written in between is missed.
    let follower = serving.watch(&verifier).await.unwrap();
    assert_eq!(verifier.preload().await.unwrap(), 1);
    verifier.verify(old_key.expose_secret()).await.unwrap();

    let (key, mut rec) = plain(&h, "new", SystemTime::now());
    // Unknown to the preloaded cache: denied without asking the store.
    assert_eq!(
        verifier
            .verify(key.expose_secret())
            .await
            .unwrap_err()
            .code(),
        DenialCode::InvalidKey
    );
    admin.insert(&rec).await.unwrap();
    let bound = ceiling(db);
    poll_until(bound, "the new key to work", || async {
        verifier.verify(key.expose_secret()).await.ok()
    })
    .await;

    rec.status = KeyStatus::Disabled;
    admin.update(&rec).await.unwrap();
    until_denied(
        &verifier,
        key.expose_secret(),
        DenialCode::DisabledKey,
        bound,
    )
    .await;
    rec.status = KeyStatus::Active;
    admin.update(&rec).await.unwrap();
    poll_until(bound, "the enabled key to work", || async {
        verifier.verify(key.expose_secret()).await.ok()
    })
    .await;
    assert_eq!(
        serving.backend() == Backend::Postgres,
        follower.is_listening()
    );
    follower.shutdown().await;
}
both!(
    sqlite_preloaded_verifier_follows_creation_and_status,
    postgres_preloaded_verifier_follows_creation_and_status,
    preloaded_verifier_follows_creation_and_status
);

/// Restoring an older backup empties the change table and restarts its numbering: the
/// follower's position is then ahead of every number the store will hand out for a while.
/// A key revoked after that still stops working within the propagation bound (the
/// follower notices it is ahead, clears the cache and follows the store's numbers again).
async fn revocation_after_a_sequence_reset_reaches_another_handle(db: &Db) {
    let serving = db.open().await;
    let admin = db.open().await;
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let h = KeyHasher::new();
    let reset = if db.name() == "postgres" {
        "TRUNCATE keygate_changes RESTART IDENTITY;"
    } else {
        "DELETE FROM keygate_changes; DELETE FROM sqlite_sequence WHERE name = 'keygate_changes';"
    };
    let mut times = Vec::new();
    for round in 0..5 {
        // Three new keys, cached: the follower's position is at least 3 past the reset.
        let mut keys = Vec::new();
        for i in 0..3 {
            let (key, rec) = plain(&h, &format!("r{round}k{i}"), SystemTime::now());
            admin.insert(&rec).await.unwrap();
            keys.push((key, rec));
        }
        follower.caught_up(admin.last_change().await.unwrap()).await;
        for (key, _) in &keys {
            verifier.verify(key.expose_secret()).await.unwrap();
        }
        let cursor = follower.cursor();
        assert!(cursor >= 3, "{cursor}");
        let (key, rec) = &keys[0];

        // One transaction: the reset and the revocation land together, so the follower
        // never sees the empty table, only a sequence (1) behind its position.
        let start = now_us();
        db.exec(&format!(
            "BEGIN; {reset} UPDATE keygate_meta SET value = 0 WHERE name = 'changes_pruned_through'; \
             UPDATE keygate_keys SET status = 'revoked' WHERE id = '{}'; COMMIT;",
            rec.id
        ))
        .await;
        assert_eq!(admin.last_change().await.unwrap(), 1);
        let denied = until_denied(
            &verifier,
            key.expose_secret(),
            DenialCode::RevokedKey,
            ceiling(db),
        )
        .await;
        times.push(Duration::from_micros(denied.saturating_sub(start) as u64));

        // The follower follows the store's numbers again: the next change reaches it.
        follower.caught_up(1).await;
        assert!(follower.cursor() < cursor);
        let (key2, mut rec2) = (&keys[1].0, keys[1].1.clone());
        // Cached again after the resync: only the follower can make it see the change.
        verifier.verify(key2.expose_secret()).await.unwrap();
        rec2.status = KeyStatus::Disabled;
        admin.update(&rec2).await.unwrap();
        until_denied(
            &verifier,
            key2.expose_secret(),
            DenialCode::DisabledKey,
            ceiling(db),
        )
        .await;
        follower.caught_up(2).await;
        assert_eq!(follower.cursor(), 2);
    }
    assert_within_bound(db, "revocation after a sequence reset", &mut times);
    follower.shutdown().await;
}
both!(
    sqlite_revocation_after_a_sequence_reset_reaches_another_handle,
    postgres_revocation_after_a_sequence_reset_reaches_another_handle,
    revocation_after_a_sequence_reset_reaches_another_handle
);

/// A role changed or deleted through another handle reaches every key holding it, without
/// touching the keys, within the revocation bound: the role trigger advances the change
/// sequence of each holder, and the follower invalidates them.
async fn role_change_reaches_another_handle(db: &Db) {
    use keygate_core::{Grant, Role, Scope};
    let serving = db.open().await;
    let admin = db.open().await;
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let h = KeyHasher::new();
    let write = Scope::parse("points:write").unwrap();
    let mut times = Vec::new();
    for i in 0..5 {
        let name = format!("writer-{i}");
        let mut role = Role::new(&name, SystemTime::now())
            .with_grant(Grant::new(["points:write"], ["docs-*"]));
        admin.insert_role(&role).await.unwrap();
        let (a, mut ra) = plain(&h, &format!("a{i}"), SystemTime::now());
        let (b, mut rb) = plain(&h, &format!("b{i}"), SystemTime::now());
        ra.roles = vec![name.clone()];
        rb.roles = vec![name.clone()];
        admin.insert(&ra).await.unwrap();
        admin.insert(&rb).await.unwrap();
        assert_eq!(admin.keys_with_role(&name).await.unwrap().len(), 2);
        for k in [&a, &b] {
            let p = verifier.verify(k.expose_secret()).await.unwrap();
            assert!(p.permits(&write, "docs-1"), "the role grants the write");
            assert_eq!(&*p.roles()[0], name.as_str());
        }
        follower.caught_up(admin.last_change().await.unwrap()).await;
        // Cached now (the follower's invalidations of the inserts are behind us).
        for k in [&a, &b] {
            verifier.verify(k.expose_secret()).await.unwrap();
        }
        let keys_version = admin.get(&ra.id).await.unwrap().unwrap().version;

        // Narrow the role: it no longer writes docs-*.
        role.grants = vec![Grant::new(["points:read"], ["docs-*"])];
        let start = now_us();
        admin.update_role(&role).await.unwrap();
        let done = poll_until(
            ceiling(db),
            "the role change to reach both keys",
            || async {
                let pa = verifier.verify(a.expose_secret()).await.unwrap();
                let pb = verifier.verify(b.expose_secret()).await.unwrap();
                (!pa.permits(&write, "docs-1") && !pb.permits(&write, "docs-1")).then(now_us)
            },
        )
        .await
        .0;
        times.push(Duration::from_micros((done - start) as u64));
        // The keys were not written.
        assert_eq!(
            admin.get(&ra.id).await.unwrap().unwrap().version,
            keys_version
        );
        // A stale version is refused: compare-and-set.
        assert!(matches!(
            admin.update_role(&role).await,
            Err(keygate_core::StoreError::Conflict { .. })
        ));

        // Deleting the role takes its grants away too.
        assert!(admin.delete_role(&name).await.unwrap());
        let read = Scope::parse("points:read").unwrap();
        poll_until(
            ceiling(db),
            "the role deletion to reach the key",
            || async {
                let p = verifier.verify(a.expose_secret()).await.unwrap();
                (!p.permits(&read, "docs-1") && p.roles().is_empty()).then_some(())
            },
        )
        .await;
        rb.roles.clear();
        admin.update(&rb).await.unwrap();
        assert!(admin.keys_with_role(&name).await.unwrap().len() == 1);
        ra.status = KeyStatus::Revoked;
        admin.update(&ra).await.unwrap();
    }
    assert_within_bound(db, "a role change through another handle", &mut times);
    follower.shutdown().await;
}
both!(
    sqlite_role_change_reaches_another_handle,
    postgres_role_change_reaches_another_handle,
    role_change_reaches_another_handle
);

/// Two writers that read the same version of a key: only one conditional write lands.
async fn conditional_key_writes_refuse_a_stale_version(db: &Db) {
    let a = db.open().await;
    let b = db.open().await;
    let (_, rec) = plain(&KeyHasher::new(), "raced", SystemTime::now());
    a.insert(&rec).await.unwrap();
    let read = a.get(&rec.id).await.unwrap().unwrap();
    let mut first = read.clone();
    first.scopes = vec!["points:read".into()];
    let mut second = read.clone();
    second.scopes = vec!["*".into()];
    let (x, y) = tokio::join!(a.update_versioned(&first), b.update_versioned(&second));
    assert!(
        x.is_ok() != y.is_ok(),
        "exactly one conditional write lands: {x:?} / {y:?}"
    );
    let stored = a.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(stored.version, read.version + 1);
    let loser = if x.is_ok() { y } else { x };
    assert!(matches!(
        loser,
        Err(keygate_core::StoreError::Conflict { .. })
    ));
}
both!(
    sqlite_conditional_key_writes_refuse_a_stale_version,
    postgres_conditional_key_writes_refuse_a_stale_version,
    conditional_key_writes_refuse_a_stale_version
);

/// An identity changed or deleted through another handle reaches every key it owns,
/// without touching the keys, within the revocation bound (the identity trigger advances
/// each key's change sequence).
async fn identity_change_reaches_another_handle(db: &Db) {
    use keygate_core::{Identity, RateLimitPolicy};
    let serving = db.open().await;
    let admin = db.open().await;
    let verifier = Verifier::builder(serving.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = serving.watch(&verifier).await.unwrap();
    let h = KeyHasher::new();
    let mut times = Vec::new();
    for i in 0..5 {
        let name = format!("etl-{i}");
        let mut identity = Identity::new(&name, SystemTime::now());
        identity.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 100)];
        admin.insert_identity(&identity).await.unwrap();
        let (a, mut ra) = plain(&h, &format!("a{i}"), SystemTime::now());
        ra.identity = Some(name.clone());
        admin.insert(&ra).await.unwrap();
        assert_eq!(admin.keys_with_identity(&name).await.unwrap(), [ra.id]);
        let p = verifier.verify(a.expose_secret()).await.unwrap();
        assert_eq!(p.rate_limits()[0].limit, 100);
        follower.caught_up(admin.last_change().await.unwrap()).await;
        verifier.verify(a.expose_secret()).await.unwrap();
        let keys_version = admin.get(&ra.id).await.unwrap().unwrap().version;
        let created = admin.get_identity(&name).await.unwrap().unwrap().created_at;

        identity.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 7)];
        identity.metadata = serde_json::json!({"team": "data"});
        let start = now_us();
        admin.update_identity(&identity).await.unwrap();
        let done = poll_until(
            ceiling(db),
            "the identity change to reach its key",
            || async {
                let p = verifier.verify(a.expose_secret()).await.unwrap();
                (p.rate_limits()[0].limit == 7).then(now_us)
            },
        )
        .await
        .0;
        times.push(Duration::from_micros((done - start) as u64));
        let stored = admin.get_identity(&name).await.unwrap().unwrap();
        assert_eq!(stored.metadata["team"], "data");
        assert_eq!(stored.created_at, created);
        assert_eq!(
            admin.get(&ra.id).await.unwrap().unwrap().version,
            keys_version,
            "the key was not written"
        );

        // Deleted: the key keeps the name, the shared limit is gone on its next request.
        assert!(admin.delete_identity(&name).await.unwrap());
        assert!(!admin.delete_identity(&name).await.unwrap());
        poll_until(
            ceiling(db),
            "the identity deletion to reach its key",
            || async {
                let p = verifier.verify(a.expose_secret()).await.unwrap();
                p.rate_limits().is_empty().then_some(())
            },
        )
        .await;
        assert!(matches!(
            admin.update_identity(&identity).await,
            Err(keygate_core::StoreError::NoSuchName { .. })
        ));
    }
    assert_within_bound(db, "an identity change through another handle", &mut times);
    follower.shutdown().await;
}
both!(
    sqlite_identity_change_reaches_another_handle,
    postgres_identity_change_reaches_another_handle,
    identity_change_reaches_another_handle
);
