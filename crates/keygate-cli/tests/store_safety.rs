//! The CLI against databases that are wrong in ways nobody would otherwise be told about,
//! run as processes on SQLite and PostgreSQL: times past year 9999 (refused at parse time,
//! damaged rows reported by column, never a panic), a pepper that differs from the one the
//! database was first used with, a database needing a newer keygate, a read-only SQLite
//! file, a mistyped `--schema`, and the modes of the files keygate creates.

mod common;

use std::str::FromStr;

use common::*;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

/// Runs `sql` on the test's database directly (as an operator or a damaged disk would).
async fn exec(env: &Env, sql: &str) {
    match &env.schema {
        Some(schema) => {
            let mut c = PgConnectOptions::from_str(&env.url)
                .unwrap()
                .options([("search_path", schema.as_str())])
                .connect()
                .await
                .unwrap();
            c.execute(sql).await.unwrap();
            c.close().await.unwrap();
        }
        None => {
            let mut c = SqliteConnectOptions::new()
                .filename(env.sqlite_file().unwrap())
                .connect()
                .await
                .unwrap();
            c.execute(sql).await.unwrap();
            c.close().await.unwrap();
        }
    }
}

fn str_of<'a>(v: &'a serde_json::Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

async fn far_times_are_refused_not_panicked_on(env: &Env) {
    // Durations past the maximum are usage errors, named with the maximum; nothing is
    // created (not even the database).
    for long in ["2914000d", "3000000d", "36501d"] {
        let out = env.run(&["keys", "create", "--name", "far", "--expires-in", long]);
        out.fails(2);
        assert!(
            out.stderr.contains("the maximum is 36500d"),
            "{long}: {}",
            out.stderr
        );
    }
    if env.sqlite_file().is_some() {
        assert!(files_in(env.dir.path()).is_empty(), "nothing was created");
    }
    // The maximum itself works and shows a four-digit year.
    let k = create(env, &["--name", "longest", "--expires-in", "36500d"]);
    assert!(str_of(&k, "expires_at").starts_with("21"), "{k}");

    // Rows damaged by hand: a time past 9999 or before year 0 is reported by key and
    // column (exit 1, one line), never a crash (exit 101).
    let id = str_of(&k, "id").to_owned();
    for (column, value) in [
        ("expires_at", i64::MAX),
        ("created_at", i64::MIN),
        ("updated_at", 253_402_300_800_000),
    ] {
        exec(
            env,
            &format!("UPDATE keygate_keys SET {column} = {value} WHERE id = '{id}'"),
        )
        .await;
        for args in [
            vec!["keys", "show", id.as_str()],
            vec!["keys", "show", id.as_str(), "--json"],
            vec!["keys", "list"],
            vec!["keys", "list", "--json"],
        ] {
            let out = env.run(&args);
            out.fails(1);
            assert!(
                out.stderr
                    .contains(&format!("key {id}: column {column}: out of range")),
                "{args:?}: {}",
                out.stderr
            );
        }
        exec(
            env,
            &format!("UPDATE keygate_keys SET {column} = 1780000000000 WHERE id = '{id}'"),
        )
        .await;
    }
    // A time before 1970 is in range: shown, not a panic.
    exec(
        env,
        &format!("UPDATE keygate_keys SET created_at = -5 WHERE id = '{id}'"),
    )
    .await;
    let out = env.run(&["keys", "show", &id]);
    out.ok();
    assert!(
        out.stdout.contains("1969-12-31T23:59:59Z"),
        "{}",
        out.stdout
    );
    let shown = env.run(&["keys", "show", &id, "--json"]).ok().json();
    assert_eq!(str_of(&shown, "created_at"), "1969-12-31T23:59:59.995Z");
}
both!(
    sqlite_far_times_are_refused_not_panicked_on,
    postgres_far_times_are_refused_not_panicked_on,
    far_times_are_refused_not_panicked_on
);
