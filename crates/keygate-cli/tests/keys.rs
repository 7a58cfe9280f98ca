//! `keygate keys ...`, `keygate usage` and `keygate audit events` run as processes against
//! SQLite (a temporary file) and PostgreSQL (a schema per test): keys created by the CLI
//! verify through a `Verifier` over the same store, JSON and table shapes, rotation with a
//! grace period, status changes reaching the store, usage from the SQL usage store, the
//! CLI's own audit events, and every kind of bad input failing with its exit code, one
//! line on stderr, and nothing changed.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use keygate_core::usage::{Admission, Limit, UsageStore, Window};
use keygate_core::{DenialCode, KeyId, KeyStatus, KeyStore, QuotaWindow, Verifier};
use keygate_sql::AuditQuery;
use serde_json::Value;

/// The fields of a key's JSON (stable: only ever added to).
const KEY_FIELDS: [&str; 17] = [
    "allowed_ips",
    "attributes",
    "created_at",
    "expired",
    "expires_at",
    "id",
    "metadata",
    "name",
    "owner",
    "prefix",
    "quotas",
    "rate_limits",
    "resources",
    "rotated_from",
    "scopes",
    "status",
    "updated_at",
];

fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

fn id_of(v: &Value) -> KeyId {
    KeyId::parse(str_of(v, "id")).unwrap()
}

fn rfc3339(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

async fn create_then_verify(env: &Env) {
    if let Some(file) = env.sqlite_file() {
        assert!(!file.exists());
    }
    let out = env
        .run(&[
            "keys",
            "create",
            "--json",
            "--name",
            "ci-pipeline",
            "--owner",
            "acme",
            "--scope",
            "points:read",
            "--scope",
            "collections:*",
            "--collection",
            "tenant-*",
            "--attr",
            "tenant=acme",
            "--attr",
            "tier=gold=1",
            "--allow-ip",
            "10.0.0.0/8",
            "--allow-ip",
            "2001:db8::/32",
            "--rate",
            "burst=20/s",
            "--rate",
            "hourly=1000/h",
            "--quota",
            "daily=10000/d",
            "--quota",
            "monthly=50000/month",
            "--expires-in",
            "90d",
            "--prefix",
            "sk_test",
            "--meta",
            r#"{"team":"search","n":[1,2]}"#,
        ])
        .ok()
        .json();
    // SQLite: `keys create` made the file.
    if let Some(file) = env.sqlite_file() {
        assert!(file.exists());
    }
    let mut expected: BTreeSet<String> = KEY_FIELDS.iter().map(|s| s.to_string()).collect();
    expected.insert("key".into());
    assert_eq!(fields(&out), expected);
    let key = str_of(&out, "key").to_owned();
    assert!(key.starts_with("sk_test_"), "the prefix");
    assert_eq!(out["name"], "ci-pipeline");
    assert_eq!(out["owner"], "acme");
    assert_eq!(out["status"], "active");
    assert_eq!(out["expired"], false);
    assert_eq!(
        out["scopes"],
        serde_json::json!(["points:read", "collections:*"])
    );
    assert_eq!(out["resources"], serde_json::json!(["tenant-*"]));
    assert_eq!(
        out["attributes"],
        serde_json::json!({"tenant": "acme", "tier": "gold=1"})
    );
    assert_eq!(
        out["allowed_ips"],
        serde_json::json!(["10.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(
        out["rate_limits"],
        serde_json::json!([{"name":"burst","limit":20,"period":1000},{"name":"hourly","limit":1000,"period":3_600_000}])
    );
    assert_eq!(
        out["quotas"],
        serde_json::json!([{"name":"daily","limit":10000,"window":"day"},{"name":"monthly","limit":50000,"window":"month"}])
    );
    assert_eq!(
        out["metadata"],
        serde_json::json!({"team":"search","n":[1,2]})
    );
    let expires = rfc3339(&out["expires_at"]);
    let in_90d = SystemTime::now() + Duration::from_secs(90 * 86_400);
    assert!(
        expires <= in_90d && expires > in_90d - Duration::from_secs(120),
        "expires in 90 days"
    );

    // The key verifies through a verifier over the same store, with what was asked for.
    let store = env.store().await;
    let verifier = Verifier::builder(store.clone())
        .parser(keygate_core::KeyParser::new([keygate_core::Prefix::new(
            "sk_test",
        )
        .unwrap()]))
        .build();
    let p = verifier
        .verify(&key)
        .await
        .expect("the created key verifies");
    assert_eq!(p.key_id(), id_of(&out));
    assert_eq!(p.subject(), Some("acme"));
    assert_eq!(p.tenant(), Some("acme"));
    let record = store.get(&id_of(&out)).await.unwrap().unwrap();
    assert_eq!(record.allowed_ips.len(), 2);
    assert_eq!(record.quotas.len(), 2);

    // The plaintext: once on stdout, never on stderr, with the warning there.
    let human = env
        .run(&["keys", "create", "--name", "plain"])
        .ok()
        .clone_out();
    assert!(
        human.stderr.contains("only time the key is shown"),
        "{human:?}"
    );
    let line = human
        .stdout
        .lines()
        .find(|l| l.starts_with("key: "))
        .expect("a key line");
    let plain = line.trim_start_matches("key: ").to_owned();
    assert_eq!(human.stdout.matches(&plain).count(), 1);
    assert!(!human.stderr.contains(&plain));
    assert!(
        human.stdout.contains("name          plain"),
        "{}",
        human.stdout
    );
    let p = Verifier::new(store.clone()).verify(&plain).await.unwrap();
    assert_eq!(p.name(), "plain");
}
both!(
    sqlite_create_then_verify,
    postgres_create_then_verify,
    create_then_verify
);

trait CloneOut {
    fn clone_out(&self) -> Out;
}

impl CloneOut for Out {
    fn clone_out(&self) -> Out {
        Out {
            code: self.code,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
        }
    }
}

async fn list_and_show_shapes(env: &Env) {
    let a = create(env, &["--name", "a", "--owner", "alice"]);
    let b = create(env, &["--name", "b", "--owner", "alice"]);
    let c = create(env, &["--name", "c", "--owner", "bob"]);
    env.run(&["keys", "disable", str_of(&b, "id")]).ok();

    let all = env.run(&["keys", "list", "--json"]).ok().json();
    let all = all.as_array().expect("an array");
    assert_eq!(all.len(), 3);
    let ids: Vec<&str> = all.iter().map(|k| str_of(k, "id")).collect();
    assert_eq!(ids, [str_of(&a, "id"), str_of(&b, "id"), str_of(&c, "id")]);
    let expected: BTreeSet<String> = KEY_FIELDS.iter().map(|s| s.to_string()).collect();
    assert!(all.iter().all(|k| fields(k) == expected));
    assert!(all.iter().all(|k| k.get("key").is_none()), "no plaintext");
    assert_eq!(all[1]["status"], "disabled");

    let alice = env
        .run(&["keys", "list", "--owner", "alice", "--json"])
        .ok()
        .json();
    assert_eq!(alice.as_array().unwrap().len(), 2);
    let disabled = env
        .run(&["keys", "list", "--status", "disabled", "--json"])
        .ok()
        .json();
    assert_eq!(disabled.as_array().unwrap().len(), 1);
    assert_eq!(disabled[0]["id"], b["id"]);
    // `--json` may also come first.
    let none = env
        .run(&["--json", "keys", "list", "--status", "revoked"])
        .ok()
        .json();
    assert_eq!(none, serde_json::json!([]));

    let table = env.run(&["keys", "list"]).ok().stdout.clone();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "NAME", "OWNER", "STATUS", "CREATED", "EXPIRES", "LAST", "USED"]
    );
    let row_b: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row_b[..4], [str_of(&b, "id"), "b", "alice", "disabled"]);
    assert_eq!(row_b[5], "never");
    assert_eq!(row_b[6], "never", "never used");

    let shown = env
        .run(&["keys", "show", str_of(&c, "id"), "--json"])
        .ok()
        .json();
    assert_eq!(&shown, &all[2]);
    let human = env
        .run(&["keys", "show", str_of(&b, "id")])
        .ok()
        .stdout
        .clone();
    assert!(
        human.contains(&format!("id            {}", str_of(&b, "id"))),
        "{human}"
    );
    assert!(human.contains("status        disabled"), "{human}");
    assert!(human.contains("owner         alice"), "{human}");
}
both!(
    sqlite_list_and_show_shapes,
    postgres_list_and_show_shapes,
    list_and_show_shapes
);

async fn rotate_keeps_the_old_key_for_the_grace(env: &Env) {
    let old = create(env, &["--name", "svc", "--scope", "points:read"]);
    let rotated = env
        .run(&[
            "keys",
            "rotate",
            str_of(&old, "id"),
            "--grace",
            "1h",
            "--json",
        ])
        .ok()
        .clone_out();
    assert!(rotated.stderr.contains("only time the key is shown"));
    let new = rotated.json();
    assert_ne!(new["id"], old["id"]);
    assert_eq!(new["rotated_from"], old["id"]);
    assert_eq!(new["scopes"], old["scopes"]);
    assert_eq!(new["name"], "svc");
    assert_eq!(new["previous"]["id"], old["id"]);
    let old_end = rfc3339(&new["previous"]["expires_at"]);
    let hour = SystemTime::now() + Duration::from_secs(3600);
    assert!(old_end <= hour && old_end > hour - Duration::from_secs(120));

    // Both work during the grace period.
    let store = env.store().await;
    let v = Verifier::new(store.clone());
    v.verify(str_of(&old, "key"))
        .await
        .expect("old key in grace");
    v.verify(str_of(&new, "key")).await.expect("new key");
    assert_eq!(
        store
            .get(&id_of(&old))
            .await
            .unwrap()
            .unwrap()
            .expires_at
            .map(|t| t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()),
        Some(
            old_end
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        )
    );

    // No grace: the rotated key stops at once, the newest works.
    let newest = env
        .run(&[
            "keys",
            "rotate",
            str_of(&new, "id"),
            "--grace",
            "0s",
            "--json",
        ])
        .ok()
        .json();
    let v = Verifier::new(store.clone());
    let denied = v.verify(str_of(&new, "key")).await.unwrap_err();
    assert_eq!(denied.code(), DenialCode::ExpiredKey);
    v.verify(str_of(&newest, "key")).await.expect("newest key");
    // Human form prints the new key and when the old one ends.
    let human = env
        .run(&["keys", "rotate", str_of(&newest, "id"), "--grace", "15m"])
        .ok()
        .stdout
        .clone();
    assert!(human.contains(&format!(
        "the old key {} works until",
        str_of(&newest, "id")
    )));
    assert_eq!(human.lines().filter(|l| l.starts_with("key: ")).count(), 1);
}
both!(
    sqlite_rotate_keeps_the_old_key_for_the_grace,
    postgres_rotate_keeps_the_old_key_for_the_grace,
    rotate_keeps_the_old_key_for_the_grace
);

async fn status_changes_reach_the_store(env: &Env) {
    let k = create(env, &["--name", "svc"]);
    let id = str_of(&k, "id");
    let key = str_of(&k, "key");
    let store = env.store().await;
    let status = || async { store.get(&id_of(&k)).await.unwrap().unwrap().status };
    let verify = || async { Verifier::new(store.clone()).verify(key).await.map(|_| ()) };

    let out = env.run(&["keys", "disable", id, "--json"]).ok().json();
    assert_eq!(out["status"], "disabled");
    assert_eq!(status().await, KeyStatus::Disabled);
    assert_eq!(verify().await.unwrap_err().code(), DenialCode::DisabledKey);

    let out = env.run(&["keys", "enable", id]).ok().stdout.clone();
    assert_eq!(out, format!("key {id} (svc) is active\n"));
    assert_eq!(status().await, KeyStatus::Active);
    verify().await.expect("enabled again");

    env.run(&["keys", "revoke", id]).ok();
    assert_eq!(status().await, KeyStatus::Revoked);
    assert_eq!(verify().await.unwrap_err().code(), DenialCode::RevokedKey);
    // Revoking again changes nothing and says so.
    let again = env.run(&["keys", "revoke", id]).ok().stdout.clone();
    assert!(again.contains("(unchanged)"), "{again}");
    // A revoked key cannot come back.
    let out = env.run(&["keys", "enable", id]);
    out.fails(1);
    assert!(out.stderr.contains("revoked"), "{out:?}");
    assert_eq!(status().await, KeyStatus::Revoked);

    // Every change is in the database's audit table, by the actor, without the key.
    let events = store
        .audit_events(&AuditQuery {
            key_id: Some(id_of(&k)),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            let l = e.event.as_lifecycle().unwrap();
            (l.action.as_str(), l.actor.as_str())
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("issued", "tester"),
            ("disabled", "tester"),
            ("enabled", "tester"),
            ("revoked", "tester")
        ]
    );
    let listed = env
        .run(&["audit", "events", "--key", id, "--json"])
        .ok()
        .clone_out();
    assert!(
        !listed.stdout.contains(key),
        "no plaintext in the audit table"
    );
    let listed = listed.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[3]["event"]["action"], "revoked");
    assert!(listed[0]["seq"].as_i64().unwrap() < listed[3]["seq"].as_i64().unwrap());
    let human = env
        .run(&["audit", "events", "--limit", "1"])
        .ok()
        .stdout
        .clone();
    assert_eq!(human.lines().count(), 1);
    assert!(human.contains("revoked") && human.contains(id), "{human}");
}
both!(
    sqlite_status_changes_reach_the_store,
    postgres_status_changes_reach_the_store,
    status_changes_reach_the_store
);

/// Everything the database holds that a command could change, as text.
async fn snapshot(env: &Env) -> (String, usize) {
    let keys = env.run(&["keys", "list", "--json"]).ok().stdout.clone();
    let events = env
        .store()
        .await
        .audit_events(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .len();
    (keys, events)
}

async fn bad_input_changes_nothing(env: &Env) {
    let k = create(env, &["--name", "keep"]);
    let id = str_of(&k, "id").to_owned();
    let before = snapshot(env).await;
    let unknown = "AAAAAAAAAAAA";
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // Unknown ids.
        (vec!["keys", "show", unknown], 1, "no key with id"),
        (vec!["keys", "revoke", unknown], 1, "no key with id"),
        (vec!["keys", "disable", unknown], 1, "no key with id"),
        (vec!["keys", "enable", unknown], 1, "no key with id"),
        (vec!["keys", "rotate", unknown], 1, "no key with id"),
        (vec!["usage", unknown], 1, "no key with id"),
        // Not an id at all.
        (vec!["keys", "revoke", "nope"], 2, "not a key id"),
        (vec!["keys", "show", "kg_AAAAAAAAAAAA"], 2, "not a key id"),
        // Bad networks.
        (
            vec!["keys", "create", "--name", "x", "--allow-ip", "10.0.0.0/33"],
            2,
            "--allow-ip",
        ),
        (
            vec!["keys", "create", "--name", "x", "--allow-ip", "10.0.0.1/8"],
            2,
            "host bits",
        ),
        (
            vec!["keys", "create", "--name", "x", "--allow-ip", "banana"],
            2,
            "--allow-ip",
        ),
        // Bad durations.
        (
            vec!["keys", "create", "--name", "x", "--expires-in", "10x"],
            2,
            "duration",
        ),
        (
            vec!["keys", "create", "--name", "x", "--expires-in", "-5d"],
            2,
            "duration",
        ),
        (
            vec!["keys", "create", "--name", "x", "--expires-in", "1.5h"],
            2,
            "duration",
        ),
        (
            vec!["keys", "create", "--name", "x", "--expires-in", "0s"],
            2,
            "future",
        ),
        (
            vec!["keys", "rotate", &id, "--grace", "forever"],
            2,
            "duration",
        ),
        // Bad scopes and collections.
        (
            vec!["keys", "create", "--name", "x", "--scope", "points"],
            2,
            "scope",
        ),
        (
            vec!["keys", "create", "--name", "x", "--scope", "a b:c"],
            2,
            "scope",
        ),
        (
            vec!["keys", "create", "--name", "x", "--collection", "a/b"],
            2,
            "--collection",
        ),
        // Bad rate and quota specs.
        (
            vec!["keys", "create", "--name", "x", "--rate", "burst=20/x"],
            2,
            "UNIT",
        ),
        (
            vec!["keys", "create", "--name", "x", "--rate", "burst20/s"],
            2,
            "NAME=N/UNIT",
        ),
        (
            vec!["keys", "create", "--name", "x", "--rate", "burst=0/s"],
            2,
            "at least 1",
        ),
        (
            vec![
                "keys", "create", "--name", "x", "--rate", "b=1/s", "--rate", "b=2/m",
            ],
            2,
            "duplicate",
        ),
        (
            vec!["keys", "create", "--name", "x", "--quota", "daily=10/s"],
            2,
            "UNIT",
        ),
        // Other bad values.
        (
            vec!["keys", "create", "--name", "x", "--attr", "novalue"],
            2,
            "KEY=VALUE",
        ),
        (
            vec!["keys", "create", "--name", "x", "--attr", "bad key=1"],
            2,
            "attribute",
        ),
        (
            vec!["keys", "create", "--name", "x", "--meta", "{"],
            2,
            "JSON",
        ),
        (
            vec!["keys", "create", "--name", "x", "--prefix", "Bad!"],
            2,
            "--prefix",
        ),
        (vec!["keys", "create", "--name", ""], 2, "name"),
        (
            vec!["keys", "create", "--actor", "", "--name", "x"],
            2,
            "actor",
        ),
        (vec!["keys", "list", "--status", "gone"], 2, "--status"),
        // The command line itself.
        (vec!["keys", "create"], 2, "--name"),
        (vec!["keys", "frobnicate"], 2, "frobnicate"),
        (vec!["keys"], 2, "command"),
        (
            vec!["keys", "list", "--no-such-option"],
            2,
            "--no-such-option",
        ),
        // A revoked key cannot be rotated (after revoking a second key below).
    ];
    for (args, code, needle) in &cases {
        let out = env.run(args);
        out.fails(*code);
        assert!(
            out.stderr.contains(needle),
            "{args:?}: expected {needle:?} in {:?}",
            out.stderr
        );
        assert_eq!(snapshot(env).await, before, "{args:?} changed something");
    }

    // Unreachable databases: exit 1, one line, nothing anywhere.
    let mut unreachable = vec![(
        "postgres://postgres@127.0.0.1:1/nowhere".to_owned(),
        "database unavailable",
    )];
    let missing_dir = env.dir.path().join("no-such-dir").join("k.db");
    unreachable.push((format!("sqlite://{}", missing_dir.display()), "no database"));
    let other_file = env.dir.path().join("other.db");
    unreachable.push((format!("sqlite://{}", other_file.display()), "no database"));
    for (url, needle) in &unreachable {
        for args in [
            vec!["keys", "list"],
            vec!["keys", "revoke", &id],
            vec!["usage"],
        ] {
            let mut c = env.cmd();
            c.env_remove("KEYGATE_DATABASE_SCHEMA");
            let out = Out::from(
                c.arg("--database-url")
                    .arg(url)
                    .args(&args)
                    .output()
                    .unwrap(),
            );
            out.fails(1);
            assert!(out.stderr.contains(needle), "{url} {args:?}: {out:?}");
        }
    }
    // `keys create` into an unreachable database (a SQLite file that cannot be made).
    let mut c = env.cmd();
    c.env_remove("KEYGATE_DATABASE_SCHEMA");
    let out = Out::from(
        c.args([
            "--database-url",
            &unreachable[1].0,
            "keys",
            "create",
            "--name",
            "x",
        ])
        .output()
        .unwrap(),
    );
    out.fails(1);
    assert!(out.stderr.contains("database unavailable"), "{out:?}");
    // Bad input on a missing SQLite file creates no file.
    let mut c = env.cmd();
    c.env_remove("KEYGATE_DATABASE_SCHEMA");
    let out = Out::from(
        c.args([
            "--database-url",
            &unreachable[2].0,
            "keys",
            "create",
            "--name",
            "x",
            "--attr",
            "bad key=1",
        ])
        .output()
        .unwrap(),
    );
    out.fails(2);
    assert!(!other_file.exists(), "no database file was created");
    assert!(!missing_dir.parent().unwrap().exists());
    // An unsupported URL is a usage error.
    let out = env.run(&["--database-url", "mysql://x/y", "keys", "list"]);
    out.fails(2);
    // --schema with SQLite is a usage error.
    if env.schema.is_none() {
        env.run(&["--schema", "kg", "keys", "list"]).fails(2);
    }
    assert_eq!(snapshot(env).await, before);

    // Status rules: a revoked key cannot be rotated or enabled.
    let gone = create(env, &["--name", "gone"]);
    env.run(&["keys", "revoke", str_of(&gone, "id")]).ok();
    let before = snapshot(env).await;
    for args in [
        vec!["keys", "rotate", str_of(&gone, "id")],
        vec!["keys", "enable", str_of(&gone, "id")],
        vec!["keys", "disable", str_of(&gone, "id")],
    ] {
        let out = env.run(&args);
        out.fails(1);
        assert!(out.stderr.contains("revoked"), "{out:?}");
        assert_eq!(snapshot(env).await, before, "{args:?}");
    }
}
both!(
    sqlite_bad_input_changes_nothing,
    postgres_bad_input_changes_nothing,
    bad_input_changes_nothing
);

async fn usage_reads_the_sql_store(env: &Env) {
    let k = create(
        env,
        &[
            "--name",
            "metered",
            "--quota",
            "daily=5/d",
            "--quota",
            "monthly=100/month",
        ],
    );
    let free = create(env, &["--name", "free"]);
    let id = id_of(&k);
    let store = env.store().await;
    let usage = store.usage_store();
    let now = SystemTime::now();
    let windows = [
        Window::containing(QuotaWindow::Day, now),
        Window::containing(QuotaWindow::Month, now),
    ];
    let limits = [
        Limit {
            window: 0,
            limit: 5,
        },
        Limit {
            window: 1,
            limit: 100,
        },
    ];
    for cost in [1, 2] {
        let a = usage
            .check_and_add(&id, &windows, &limits, cost)
            .await
            .unwrap();
        assert!(matches!(a, Admission::Admitted(_)));
    }
    let out = env.run(&["usage", str_of(&k, "id"), "--json"]).ok().json();
    assert_eq!(out["id"], k["id"]);
    assert_eq!(out["name"], "metered");
    let quotas = out["quotas"].as_array().unwrap();
    assert_eq!(quotas.len(), 2);
    assert_eq!(quotas[0]["name"], "daily");
    assert_eq!(quotas[0]["window"], "day");
    assert_eq!(quotas[0]["limit"], 5);
    assert_eq!(quotas[0]["used"], 3);
    assert_eq!(quotas[0]["remaining"], 2);
    assert_eq!(quotas[0]["requests"], 2);
    assert_eq!(
        rfc3339(&quotas[0]["window_start"]),
        windows[0].start,
        "the current day"
    );
    assert_eq!(quotas[1]["name"], "monthly");
    assert_eq!(quotas[1]["used"], 3);
    assert_eq!(quotas[1]["remaining"], 97);

    // Every key with a quota.
    let all = env.run(&["usage", "--json"]).ok().json();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 1, "only the key with quotas");
    assert_eq!(all[0], out);

    let table = env.run(&["usage"]).ok().stdout.clone();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(
        lines[0][..8],
        [
            "ID",
            "NAME",
            "QUOTA",
            "WINDOW",
            "LIMIT",
            "USED",
            "REMAINING",
            "REQUESTS"
        ]
    );
    assert_eq!(
        lines[1][..8],
        [
            str_of(&k, "id"),
            "metered",
            "daily",
            "d",
            "5",
            "3",
            "2",
            "2"
        ]
    );
    let none = env.run(&["usage", str_of(&free, "id")]).ok().stdout.clone();
    assert!(none.contains("has no quotas"), "{none}");
}
both!(
    sqlite_usage_reads_the_sql_store,
    postgres_usage_reads_the_sql_store,
    usage_reads_the_sql_store
);

/// Help and version are successes, on stdout.
#[test]
fn help_and_version() {
    let env = Env::sqlite();
    for args in [
        vec!["--help"],
        vec!["keys", "create", "--help"],
        vec!["--version"],
    ] {
        let out = env.run(&args);
        out.ok();
        assert!(!out.stdout.is_empty());
    }
    let help = env.run(&["keys", "create", "--help"]).stdout.clone();
    for option in [
        "--name",
        "--owner",
        "--scope",
        "--collection",
        "--attr",
        "--allow-ip",
        "--rate",
        "--quota",
        "--expires-in",
        "--prefix",
        "--meta",
        "--json",
    ] {
        assert!(help.contains(option), "{option} in the help");
    }
    // Nothing was created by asking for help.
    assert!(files_in(env.dir.path()).is_empty());
}

/// A key used through a verifier over the same database shows its last use (to the
/// minute) in `keys list` and `keys show`, table and JSON, once the verifier flushed it; an
/// unused key reads `never` and has no `last_used_at`.
async fn last_used_is_listed_and_shown(env: &Env) {
    let used = create(env, &["--name", "used"]);
    let idle = create(env, &["--name", "idle"]);
    let store = env.store().await;
    use keygate_core::Clock as _;
    let clock = keygate_core::ManualClock::new(SystemTime::now());
    let verifier = Verifier::builder(store).clock(clock.clone()).build();
    for _ in 0..3 {
        verifier.verify(str_of(&used, "key")).await.unwrap();
    }
    // Requests alone write nothing.
    let shown = env
        .run(&["keys", "show", str_of(&used, "id"), "--json"])
        .ok()
        .json();
    assert!(shown.get("last_used_at").is_none(), "{shown}");
    assert_eq!(verifier.flush_last_used().await.unwrap(), 1);

    let secs = clock
        .now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute = SystemTime::UNIX_EPOCH + Duration::from_secs(secs / 60 * 60);
    let shown = env
        .run(&["keys", "show", str_of(&used, "id"), "--json"])
        .ok()
        .json();
    assert_eq!(rfc3339(&shown["last_used_at"]), minute, "{shown}");
    let listed = env.run(&["keys", "list", "--json"]).ok().json();
    let find = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        find(str_of(&used, "id"))["last_used_at"],
        shown["last_used_at"]
    );
    assert!(find(str_of(&idle, "id")).get("last_used_at").is_none());

    let human = keygate_core::time::rfc3339_seconds(minute).to_string();
    let details = env
        .run(&["keys", "show", str_of(&used, "id")])
        .ok()
        .stdout
        .clone();
    assert!(
        details.contains(&format!("last used     {human}")),
        "{details}"
    );
    let table = env.run(&["keys", "list"]).ok().stdout.clone();
    let row = |name: &str| {
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.get(1) == Some(&name))
            .unwrap()
            .last()
            .map(|c| c.to_string())
            .unwrap()
    };
    assert_eq!(row("used"), human, "{table}");
    assert_eq!(row("idle"), "never", "{table}");
}
both!(
    sqlite_last_used_is_listed_and_shown,
    postgres_last_used_is_listed_and_shown,
    last_used_is_listed_and_shown
);
