//! `keygate keys` with a corrupt row in the database (a column changed by hand to something
//! keygate cannot read), on SQLite and PostgreSQL: `keys list` lists the other keys, warns
//! about the skipped row on stderr and exits 0; `keys revoke` and `keys disable` still work
//! on the corrupt key (a status-only write, audited); `keys enable` refuses it.

mod common;

use std::str::FromStr;

use common::*;
use keygate_core::{KeyId, KeyStatus, KeyStore, StoreError};
use keygate_sql::AuditQuery;
use sqlx::{ConnectOptions, Connection, Executor};

/// Runs `sql` against the test's database, outside keygate.
async fn exec(env: &Env, sql: &str) {
    match &env.schema {
        None => {
            let mut c = sqlx::sqlite::SqliteConnectOptions::from_str(&env.url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            c.execute(sql).await.unwrap();
            c.close().await.unwrap();
        }
        Some(schema) => {
            let mut c = sqlx::postgres::PgConnectOptions::from_str(&env.url)
                .unwrap()
                .options([("search_path", schema.as_str())])
                .connect()
                .await
                .unwrap();
            c.execute(sql).await.unwrap();
            c.close().await.unwrap();
        }
    }
}

fn id_of(v: &serde_json::Value) -> KeyId {
    KeyId::parse(v["id"].as_str().unwrap()).unwrap()
}

async fn corrupt_rows_are_skipped_and_can_be_revoked(env: &Env) {
    let good = create(env, &["--name", "good"]);
    let bad = create(env, &["--name", "bad"]);
    let other = create(env, &["--name", "other"]);
    let (good_id, bad_id, other_id) = (id_of(&good), id_of(&bad), id_of(&other));
    exec(
        env,
        &format!("UPDATE keygate_keys SET allowed_ips = 'garbage' WHERE id = '{bad_id}'"),
    )
    .await;
    exec(
        env,
        &format!("UPDATE keygate_keys SET quotas = '[' WHERE id = '{other_id}'"),
    )
    .await;

    // The listing goes on: the good key on stdout, one warning line per skipped row.
    let out = env.run(&["keys", "list", "--json"]);
    out.ok();
    let listed = out.json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [good_id.as_str()]);
    let warnings: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{out:?}");
    assert!(
        warnings[0].starts_with("keygate: warning: skipped key ")
            && warnings
                .iter()
                .any(|w| w.contains(bad_id.as_str()) && w.contains("column allowed_ips"))
            && warnings
                .iter()
                .any(|w| w.contains(other_id.as_str()) && w.contains("column quotas")),
        "{warnings:?}"
    );
    let table = env.run(&["keys", "list"]);
    table.ok();
    assert!(table.stdout.contains(good_id.as_str()) && !table.stdout.contains(bad_id.as_str()));
    assert_eq!(table.stderr.lines().count(), 2);

    // Disable, then revoke, the key that cannot be read.
    let store = env.store().await;
    let status = |id: KeyId| {
        let store = store.clone();
        async move {
            store
                .list_report(&Default::default())
                .await
                .unwrap()
                .skipped
                .iter()
                .any(|s| s.key_id == Some(id))
        }
    };
    let out = env.run(&["keys", "disable", bad_id.as_str()]);
    out.ok();
    assert_eq!(out.stdout, format!("key {bad_id} is disabled\n"));
    assert!(out.stderr.contains("cannot be read"), "{out:?}");
    assert!(
        status(bad_id).await,
        "still unreadable: only the status was written"
    );
    let row = |id: KeyId, want: &'static str| {
        let sql =
            format!("SELECT COUNT(*) FROM keygate_keys WHERE id = '{id}' AND status = '{want}'");
        async move { count(env, &sql).await }
    };
    assert_eq!(row(bad_id, "disabled").await, 1);
    // Enabling a key nobody can read is refused, and changes nothing.
    env.run(&["keys", "enable", bad_id.as_str()]).fails(1);
    assert_eq!(row(bad_id, "disabled").await, 1);
    let out = env.run(&["keys", "revoke", bad_id.as_str(), "--json"]);
    out.ok();
    let v = out.json();
    assert_eq!(
        (v["status"].as_str(), v["unchanged"].as_bool()),
        (Some("revoked"), Some(false))
    );
    assert_eq!(row(bad_id, "revoked").await, 1);
    let again = env.run(&["keys", "revoke", bad_id.as_str()]);
    again.ok();
    assert!(again.stdout.contains("(unchanged)"), "{again:?}");
    // Disabling a revoked key is refused.
    env.run(&["keys", "disable", bad_id.as_str()]).fails(1);
    assert_eq!(row(bad_id, "revoked").await, 1);
    assert!(matches!(
        store.get(&bad_id).await,
        Err(StoreError::Corrupt(_))
    ));

    // Both changes are audited, by the actor.
    let events = store
        .audit_events(&AuditQuery {
            key_id: Some(bad_id),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<(&str, KeyStatus, &str)> = events
        .iter()
        .map(|e| {
            let l = e.event.as_lifecycle().unwrap();
            (l.action.as_str(), l.status, l.actor.as_str())
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("issued", KeyStatus::Active, "tester"),
            ("disabled", KeyStatus::Disabled, "tester"),
            ("revoked", KeyStatus::Revoked, "tester")
        ]
    );
}
both!(
    sqlite_corrupt_rows_are_skipped_and_can_be_revoked,
    postgres_corrupt_rows_are_skipped_and_can_be_revoked,
    corrupt_rows_are_skipped_and_can_be_revoked
);

/// One integer from `sql`.
async fn count(env: &Env, sql: &str) -> i64 {
    match &env.schema {
        None => {
            let mut c = sqlx::sqlite::SqliteConnectOptions::from_str(&env.url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let v = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            v
        }
        Some(schema) => {
            let mut c = sqlx::postgres::PgConnectOptions::from_str(&env.url)
                .unwrap()
                .options([("search_path", schema.as_str())])
                .connect()
                .await
                .unwrap();
            let v = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
            c.close().await.unwrap();
            v
        }
    }
}
