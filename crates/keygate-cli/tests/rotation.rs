//! The rotation policy, run as processes against SQLite and PostgreSQL:
//! `keys list --older-than` / `--expiring-within` (alone, together, with the other filters),
//! `keys rotate --older-than AGE` rotating exactly the active keys of that age (audited,
//! one JSON line per new key, the old keys working until the grace ends), `--dry-run`
//! changing nothing, a key that fails to rotate not stopping the others, and bad durations.
//!
//! The CLI reads the system clock: keys are made "old" by moving their creation (and
//! expiry) times into the past through the store, and the grace is checked with a verifier
//! on a manual clock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_core::{DenialCode, KeyId, KeyStatus, KeyStore, ManualClock, Verifier};
use keygate_sql::{AuditQuery, SqlStore};
use serde_json::Value;
use sqlx::Connection;

const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);

/// The fields of a line of `keys rotate --older-than` (stable: only ever added to).
const LINE_FIELDS: [&str; 7] = [
    "expires_at",
    "grace_end",
    "key",
    "name",
    "new_id",
    "old_id",
    "owner",
];
/// The fields of a line of `keys rotate --older-than --dry-run`.
const DRY_FIELDS: [&str; 5] = ["created_at", "grace_end", "name", "old_id", "owner"];

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

fn id_of(v: &Value) -> KeyId {
    KeyId::parse(str_of(v, "id")).unwrap()
}

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn rfc3339(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

/// Stdout as JSON lines (each line one object).
#[track_caller]
fn lines(out: &Out) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Sets a key's creation time and, when given, its expiry (`Some(None)`: never).
async fn backdate(
    store: &SqlStore,
    id: KeyId,
    created: SystemTime,
    expires: Option<Option<SystemTime>>,
) {
    let mut r = store.get(&id).await.unwrap().unwrap();
    r.created_at = created;
    r.updated_at = created;
    if let Some(e) = expires {
        r.expires_at = e;
    }
    store.update(&r).await.unwrap();
}

/// The names `keys list ARGS --json` prints.
fn listed(env: &Env, args: &[&str]) -> BTreeSet<String> {
    let mut all = vec!["keys", "list", "--json"];
    all.extend_from_slice(args);
    env.run(&all)
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| str_of(k, "name").to_owned())
        .collect()
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Everything the database holds that a command could change: the keys (their public
/// JSON) and the number of audit events.
async fn snapshot(env: &Env) -> (Vec<Value>, usize) {
    let store = env.store().await;
    let keys = store
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::to_value(r.info()).unwrap())
        .collect();
    let events = store
        .audit_events(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .len();
    (keys, events)
}

async fn list_filters(env: &Env) {
    let mut ids = BTreeMap::new();
    for (name, owner) in [
        ("old100", "acme"),
        ("old91", "acme"),
        ("old89", "acme"),
        ("soon", "other"),
        ("edge_in", "other"),
        ("edge_out", "other"),
        ("gone", "other"),
    ] {
        let k = create(env, &["--name", name, "--owner", owner]);
        ids.insert(name, id_of(&k));
    }
    let store = env.store().await;
    let now = SystemTime::now();
    // Ages: around the 90 days, an hour either side (the CLI runs a moment later).
    backdate(&store, ids["old100"], now - 100 * DAY, None).await;
    backdate(&store, ids["old91"], now - 90 * DAY - HOUR, None).await;
    backdate(&store, ids["old89"], now - 90 * DAY + HOUR, None).await;
    // Expiries: around the 14 days, and one already past.
    backdate(&store, ids["soon"], now, Some(Some(now + 13 * DAY))).await;
    backdate(
        &store,
        ids["edge_in"],
        now,
        Some(Some(now + 14 * DAY - HOUR)),
    )
    .await;
    backdate(
        &store,
        ids["edge_out"],
        now,
        Some(Some(now + 14 * DAY + HOUR)),
    )
    .await;
    backdate(&store, ids["gone"], now, Some(Some(now - HOUR))).await;

    assert_eq!(
        listed(env, &["--older-than", "90d"]),
        names(&["old100", "old91"])
    );
    assert_eq!(
        listed(env, &["--older-than", "89d"]),
        names(&["old100", "old91", "old89"])
    );
    // An already expired key is not "expiring within"; a key that never expires neither.
    assert_eq!(
        listed(env, &["--expiring-within", "14d"]),
        names(&["soon", "edge_in"])
    );
    assert_eq!(listed(env, &["--expiring-within", "12d"]), names(&[]));
    assert_eq!(listed(env, &["--older-than", "0s"]).len(), 7);

    // Combined with each other and with the other filters.
    backdate(
        &store,
        ids["old91"],
        now - 90 * DAY - HOUR,
        Some(Some(now + 5 * DAY)),
    )
    .await;
    assert_eq!(
        listed(env, &["--expiring-within", "14d", "--older-than", "90d"]),
        names(&["old91"])
    );
    assert_eq!(
        listed(env, &["--expiring-within", "14d"]),
        names(&["soon", "edge_in", "old91"])
    );
    env.run(&["keys", "revoke", ids["old100"].as_str()]).ok();
    assert_eq!(
        listed(env, &["--older-than", "90d", "--status", "active"]),
        names(&["old91"])
    );
    assert_eq!(
        listed(env, &["--older-than", "90d", "--status", "revoked"]),
        names(&["old100"])
    );
    assert_eq!(
        listed(env, &["--expiring-within", "14d", "--owner", "other"]),
        names(&["soon", "edge_in"])
    );
    assert_eq!(
        listed(env, &["--older-than", "90d", "--prefix", "sk"]),
        names(&[])
    );

    // The table form: the header and the matching keys, oldest first.
    let table = env
        .run(&["keys", "list", "--older-than", "90d"])
        .ok()
        .stdout
        .clone();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].starts_with("ID "), "{table}");
    assert!(rows[1].starts_with(ids["old100"].as_str()), "{table}");
    assert!(rows[2].starts_with(ids["old91"].as_str()), "{table}");
}
both!(sqlite_list_filters, postgres_list_filters, list_filters);

async fn bulk_rotation(env: &Env) {
    let mut keys = BTreeMap::new();
    for (name, extra) in [
        ("due1", vec!["--owner", "acme"]),
        ("due2", vec!["--expires-in", "30d"]),
        ("due_short", vec!["--expires-in", "3d"]),
        ("young", vec![]),
        ("revoked", vec![]),
        ("disabled", vec![]),
        ("expired", vec![]),
        ("chain", vec![]),
    ] {
        let mut args = vec!["--name", name, "--scope", "points:read"];
        args.extend(extra);
        keys.insert(name, create(env, &args));
    }
    let id = |name: &str| id_of(&keys[name]);
    env.run(&["keys", "revoke", id("revoked").as_str()]).ok();
    env.run(&["keys", "disable", id("disabled").as_str()]).ok();
    // A rotated key: its first key is in its grace period (not due again), its successor
    // counts its age from its own creation.
    let successor = env
        .run(&[
            "keys",
            "rotate",
            id("chain").as_str(),
            "--grace",
            "30d",
            "--json",
        ])
        .ok()
        .json();
    let store = env.store().await;
    let now = SystemTime::now();
    for name in ["due1", "revoked", "disabled"] {
        backdate(&store, id(name), now - 100 * DAY, None).await;
    }
    backdate(&store, id("due2"), now - 91 * DAY, None).await;
    backdate(&store, id("due_short"), now - 95 * DAY, None).await;
    backdate(&store, id("young"), now - 10 * DAY, None).await;
    backdate(
        &store,
        id("expired"),
        now - 100 * DAY,
        Some(Some(now - HOUR)),
    )
    .await;
    backdate(&store, id("chain"), now - 200 * DAY, None).await;
    backdate(&store, id_of(&successor), now - 95 * DAY, None).await;
    let short_end = store
        .get(&id("due_short"))
        .await
        .unwrap()
        .unwrap()
        .expires_at
        .unwrap();
    let mut plain: BTreeMap<KeyId, String> = keys
        .values()
        .map(|k| (id_of(k), str_of(k, "key").to_owned()))
        .collect();
    plain.insert(id_of(&successor), str_of(&successor, "key").to_owned());
    let expected: BTreeSet<KeyId> = [id("due1"), id("due2"), id("due_short"), id_of(&successor)]
        .into_iter()
        .collect();

    // --dry-run: what would be rotated, without keys, and nothing changed (not even an
    // audit event). --json changes nothing: the output is JSON lines either way.
    let before = snapshot(env).await;
    for json in [false, true] {
        let mut args = vec!["keys", "rotate", "--older-than", "90d", "--grace", "7d"];
        args.push("--dry-run");
        if json {
            args.push("--json");
        }
        let out = env.run(&args);
        out.ok();
        assert_eq!(out.stderr, "", "{out:?}");
        let dry = lines(&out);
        let olds: BTreeSet<KeyId> = dry
            .iter()
            .map(|l| KeyId::parse(str_of(l, "old_id")).unwrap())
            .collect();
        assert_eq!(olds, expected);
        assert_eq!(dry.len(), expected.len());
        for l in &dry {
            assert_eq!(
                fields(l),
                DRY_FIELDS.iter().map(|s| s.to_string()).collect()
            );
        }
        for p in plain.values() {
            assert!(!out.stdout.contains(p.as_str()));
        }
        assert_eq!(snapshot(env).await, before, "--dry-run changed something");
    }

    // The real run, with the file log as well as the database table.
    let out = env.run(&[
        "keys",
        "rotate",
        "--older-than",
        "90d",
        "--grace",
        "7d",
        "--audit-dir",
        "log",
    ]);
    out.ok();
    let started = SystemTime::now();
    assert_eq!(
        out.stderr.matches("only time the key is shown").count(),
        1,
        "{out:?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    let rotated = lines(&out);
    assert_eq!(rotated.len(), expected.len(), "{out:?}");
    let olds: BTreeSet<KeyId> = rotated
        .iter()
        .map(|l| KeyId::parse(str_of(l, "old_id")).unwrap())
        .collect();
    assert_eq!(olds, expected, "exactly the old active keys");
    for l in &rotated {
        assert_eq!(
            fields(l),
            LINE_FIELDS.iter().map(|s| s.to_string()).collect()
        );
        let old_id = KeyId::parse(str_of(l, "old_id")).unwrap();
        let new_id = KeyId::parse(str_of(l, "new_id")).unwrap();
        let key = str_of(l, "key");
        assert_eq!(out.stdout.matches(key).count(), 1, "each key once");
        assert!(!out.stderr.contains(key));
        // The new key: stored as the old one's successor, and it verifies.
        let new = store.get(&new_id).await.unwrap().unwrap();
        assert_eq!(new.rotated_from, Some(old_id));
        assert_eq!(new.name, str_of(l, "name"));
        let p = Verifier::new(store.clone()).verify(key).await.unwrap();
        assert_eq!(p.key_id(), new_id);
        // The old key ends at the grace end printed (its own earlier expiry if sooner).
        let grace_end = rfc3339(&l["grace_end"]);
        let old = store.get(&old_id).await.unwrap().unwrap();
        assert_eq!(old.expires_at.map(ms), Some(ms(grace_end)));
        if old_id == id("due_short") {
            assert_eq!(ms(grace_end), ms(short_end));
            assert_eq!(rfc3339(&l["expires_at"]), short_end);
        } else {
            assert!(grace_end > now + 7 * DAY - HOUR && grace_end <= started + 7 * DAY);
        }
        // It works until then, and is expired from then on.
        let at = |t: SystemTime| {
            Verifier::builder(store.clone())
                .clock(ManualClock::new(t))
                .build()
        };
        let old_key = plain[&old_id].as_str();
        at(grace_end - Duration::from_secs(1))
            .verify(old_key)
            .await
            .expect("the old key works during the grace");
        assert_eq!(
            at(grace_end).verify(old_key).await.unwrap_err().code(),
            DenialCode::ExpiredKey
        );
        // Audited like a single rotation, by the actor.
        let events = store
            .audit_events(&AuditQuery {
                key_id: Some(old_id),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let last = events.last().unwrap().event.as_lifecycle().unwrap();
        assert_eq!(
            (last.action.as_str(), last.actor.as_str(), last.related_key),
            ("rotated", "tester", Some(new_id))
        );
    }
    assert_eq!(
        rotated
            .iter()
            .find(|l| l["old_id"] == keys["due1"]["id"])
            .unwrap()["owner"],
        "acme"
    );
    // The keys not due are as they were.
    for name in ["young", "revoked", "disabled", "expired", "chain"] {
        let b = before
            .0
            .iter()
            .find(|r| r["id"] == keys[name]["id"])
            .unwrap();
        let a = serde_json::to_value(store.get(&id(name)).await.unwrap().unwrap().info()).unwrap();
        assert_eq!(b, &a, "{name}");
    }
    // The file log holds the rotations, verifies, and no key.
    let log = env.dir.path().join("log");
    env.run(&["audit", "verify", log.to_str().unwrap()]).ok();
    let tail = env
        .run(&["audit", "tail", log.to_str().unwrap(), "--all", "--json"])
        .ok()
        .stdout
        .clone();
    assert_eq!(
        tail.lines()
            .filter(|l| l.contains(r#""action":"rotated""#))
            .count(),
        expected.len(),
        "{tail}"
    );
    for l in &rotated {
        assert!(!tail.contains(str_of(l, "key")));
    }

    // Run again: the new keys are young and the old ones in their grace: nothing to do.
    let again = env.run(&["keys", "rotate", "--older-than", "90d"]);
    again.ok();
    assert_eq!((again.stdout.as_str(), again.stderr.as_str()), ("", ""));

    // No grace: a due key's old key reads expired at once.
    let new1 = KeyId::parse(str_of(
        rotated
            .iter()
            .find(|l| l["old_id"] == keys["due1"]["id"])
            .unwrap(),
        "new_id",
    ))
    .unwrap();
    backdate(&store, new1, now - 100 * DAY, None).await;
    let out = env.run(&["keys", "rotate", "--older-than", "90d", "--grace", "0s"]);
    out.ok();
    let last = lines(&out);
    assert_eq!(last.len(), 1);
    assert_eq!(str_of(&last[0], "old_id"), new1.as_str());
    let shown = env
        .run(&["keys", "show", new1.as_str(), "--json"])
        .ok()
        .json();
    assert_eq!(shown["expired"], true);
}
both!(sqlite_bulk_rotation, postgres_bulk_rotation, bulk_rotation);

/// Makes the database refuse new keys rotated from `id` (a trigger), so that key's
/// rotation fails while the others go through.
async fn refuse_rotation_of(env: &Env, id: KeyId) {
    match &env.schema {
        None => {
            let mut c = sqlx::SqliteConnection::connect(&env.url).await.unwrap();
            sqlx::raw_sql(&format!(
                "CREATE TRIGGER kg_test_refuse BEFORE INSERT ON keygate_keys \
                 WHEN NEW.rotated_from = '{id}' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
            ))
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
        }
        Some(schema) => {
            let mut c = sqlx::PgConnection::connect(&env.url).await.unwrap();
            sqlx::raw_sql(&format!(
                "CREATE FUNCTION {schema}.kg_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.rotated_from = '{id}' THEN RAISE EXCEPTION 'refused by the test'; \
                 END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER kg_test_refuse BEFORE INSERT ON {schema}.keygate_keys \
                 FOR EACH ROW EXECUTE FUNCTION {schema}.kg_test_refuse();"
            ))
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
        }
    }
}

async fn one_failure_does_not_stop_the_others(env: &Env) {
    let keys: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|n| create(env, &["--name", n]))
        .collect();
    let store = env.store().await;
    let now = SystemTime::now();
    for (i, k) in keys.iter().enumerate() {
        backdate(&store, id_of(k), now - (100 + i as u32) * DAY, None).await;
    }
    let refused = id_of(&keys[1]);
    refuse_rotation_of(env, refused).await;
    let before = store.get(&refused).await.unwrap().unwrap();

    let out = env.run(&["keys", "rotate", "--older-than", "90d", "--grace", "1h"]);
    assert_eq!(out.code, 1, "{out:?}");
    // The others were rotated, and their lines are valid.
    let rotated = lines(&out);
    let olds: BTreeSet<&str> = rotated.iter().map(|l| str_of(l, "old_id")).collect();
    assert_eq!(
        olds,
        [str_of(&keys[0], "id"), str_of(&keys[2], "id")].into()
    );
    // Stderr: the warning, the key that failed (by id), and the summary; no key.
    let err: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(err.len(), 3, "{out:?}");
    assert!(err[0].contains("only time the key is shown"), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("keygate: cannot rotate key {refused} (b): ")),
        "{out:?}"
    );
    assert!(
        err[2].starts_with("keygate: 1 of 3 key(s) due could not be rotated"),
        "{out:?}"
    );
    for k in &keys {
        assert!(!out.stderr.contains(str_of(k, "key")));
    }
    for l in &rotated {
        assert!(!out.stderr.contains(str_of(l, "key")));
    }
    // The refused key is untouched.
    let after = store.get(&refused).await.unwrap().unwrap();
    assert_eq!(
        (after.status, after.expires_at, after.updated_at),
        (before.status, before.expires_at, before.updated_at)
    );
    assert_eq!(after.status, KeyStatus::Active);
}
both!(
    sqlite_one_failure_does_not_stop_the_others,
    postgres_one_failure_does_not_stop_the_others,
    one_failure_does_not_stop_the_others
);

async fn bad_durations_change_nothing(env: &Env) {
    let k = create(env, &["--name", "old"]);
    let id = str_of(&k, "id").to_owned();
    let store = env.store().await;
    backdate(&store, id_of(&k), SystemTime::now() - 100 * DAY, None).await;
    let before = snapshot(env).await;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["keys", "list", "--older-than", "10x"],
            "invalid value '10x' for '--older-than <DURATION>'",
        ),
        (
            vec!["keys", "list", "--expiring-within", "-5d"],
            "--expiring-within",
        ),
        (
            vec!["keys", "list", "--expiring-within", "36501d"],
            "the maximum is 36500d",
        ),
        (
            vec!["keys", "rotate", "--older-than", "1.5h"],
            "is not a duration like 30s, 15m, 12h or 90d",
        ),
        (
            vec!["keys", "rotate", "--older-than", "36501d"],
            "the maximum is 36500d",
        ),
        (
            vec!["keys", "rotate", "--older-than", "0s", "--grace", "forever"],
            "--grace",
        ),
        (
            vec!["keys", "rotate", &id, "--older-than", "90d"],
            "cannot be used with",
        ),
        (vec!["keys", "rotate", &id, "--dry-run"], "--dry-run"),
        (vec!["keys", "rotate", "--dry-run"], "--older-than"),
        (vec!["keys", "rotate"], "<ID|--older-than <DURATION>>"),
    ];
    for (args, needle) in &cases {
        let out = env.run(args);
        out.fails(2);
        assert!(
            out.stderr.contains(needle),
            "{args:?}: expected {needle:?} in {:?}",
            out.stderr
        );
        assert_eq!(snapshot(env).await, before, "{args:?} changed something");
    }
    // The single form is unchanged.
    let out = env
        .run(&["keys", "rotate", &id, "--grace", "1h", "--json"])
        .ok()
        .json();
    assert_eq!(out["previous"]["id"], k["id"]);
}
both!(
    sqlite_bad_durations_change_nothing,
    postgres_bad_durations_change_nothing,
    bad_durations_change_nothing
);

/// Runs `sql` against the test's database, outside keygate.
async fn exec(env: &Env, sql: &str) {
    match &env.schema {
        None => {
            let mut c = sqlx::SqliteConnection::connect(&env.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            c.close().await.unwrap();
        }
        Some(schema) => {
            let mut c = sqlx::PgConnection::connect(&env.url).await.unwrap();
            sqlx::raw_sql(&format!("SET search_path TO {schema}; {sql}"))
                .execute(&mut c)
                .await
                .unwrap();
            c.close().await.unwrap();
        }
    }
}

async fn unreadable_rows_are_reported_and_skipped(env: &Env) {
    let good = create(env, &["--name", "good"]);
    let bad = create(env, &["--name", "bad"]);
    let store = env.store().await;
    for k in [&good, &bad] {
        backdate(&store, id_of(k), SystemTime::now() - 100 * DAY, None).await;
    }
    exec(
        env,
        &format!(
            "UPDATE keygate_keys SET quotas = '[' WHERE id = '{}'",
            id_of(&bad)
        ),
    )
    .await;
    let dry = env.run(&["keys", "rotate", "--older-than", "90d", "--dry-run"]);
    dry.ok();
    assert_eq!(lines(&dry).len(), 1);
    let out = env.run(&["keys", "rotate", "--older-than", "90d"]);
    out.ok();
    let rotated = lines(&out);
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0]["old_id"], good["id"]);
    for o in [&dry, &out] {
        assert!(
            o.stderr.contains(&format!(
                "keygate: warning: skipped key {}: column quotas cannot be read",
                id_of(&bad)
            )) && o.stderr.contains("not considered for rotation"),
            "{o:?}"
        );
    }
}
both!(
    sqlite_unreadable_rows_are_reported_and_skipped,
    postgres_unreadable_rows_are_reported_and_skipped,
    unreadable_rows_are_reported_and_skipped
);

/// A new key that cannot be written out (a full disk behind stdout) stops the run at once:
/// exit 1, naming the key to revoke and the one to rotate again, and no other key changed.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_unwritable_output_stops_the_run() {
    let env = Env::sqlite();
    let keys: Vec<Value> = ["a", "b"]
        .iter()
        .map(|n| create(&env, &["--name", n]))
        .collect();
    let store = env.store().await;
    let now = SystemTime::now();
    backdate(&store, id_of(&keys[0]), now - 101 * DAY, None).await;
    backdate(&store, id_of(&keys[1]), now - 100 * DAY, None).await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Out::from(
        env.cmd()
            .args(["keys", "rotate", "--older-than", "90d"])
            .stdout(full)
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 1, "{out:?}");
    let first = store.get(&id_of(&keys[0])).await.unwrap().unwrap();
    let successor = store
        .list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.rotated_from == Some(first.id))
        .expect("the first key was rotated");
    let last = out.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("keygate: cannot write the output")
            && last.contains(&format!(
                "revoke {} and rotate {} again",
                successor.id, first.id
            )),
        "{out:?}"
    );
    // The second key was left alone.
    let second = store.get(&id_of(&keys[1])).await.unwrap().unwrap();
    assert_eq!(second.expires_at, None);
    assert_eq!(store.list(&Default::default()).await.unwrap().len(), 3);
}
