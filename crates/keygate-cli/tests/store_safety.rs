//! The CLI against databases that are wrong in ways nobody would otherwise be told about,
//! run as processes on SQLite and PostgreSQL: times past year 9999 (refused at parse time,
//! damaged rows reported by column, never a panic), a pepper that differs from the one the
//! database was first used with, a database needing a newer keygate, a read-only SQLite
//! file, a mistyped `--schema`, and the modes of the files keygate creates.

mod common;

use std::str::FromStr;

use common::*;
use keygate_core::KeyStore;
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
        // `keys show` refuses the damaged key, naming the column.
        for args in [
            vec!["keys", "show", id.as_str()],
            vec!["keys", "show", id.as_str(), "--json"],
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
        // `keys list` skips it with a warning naming the column, and still lists the rest.
        for args in [vec!["keys", "list"], vec!["keys", "list", "--json"]] {
            let out = env.run(&args);
            assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains(&format!(
                    "skipped key {id}: column {column} cannot be read (out of range"
                )),
                "{args:?}: {}",
                out.stderr
            );
            assert!(
                !out.stdout.contains(id.as_str()),
                "{args:?}: {}",
                out.stdout
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

/// How many keys the database holds, read directly.
async fn key_count(env: &Env) -> usize {
    env.store()
        .await
        .list(&Default::default())
        .await
        .unwrap()
        .len()
}

async fn a_pepper_mismatch_is_refused(env: &Env) {
    let with = |pepper: Option<&str>, args: &[&str]| {
        let mut c = env.cmd();
        if let Some(p) = pepper {
            c.env("KEYGATE_PEPPER", p);
        }
        Out::from(c.args(args).output().unwrap())
    };
    // The first key records the pepper's fingerprint (never the pepper).
    let first = with(
        Some("the-right-pepper"),
        &["keys", "create", "--name", "a", "--json"],
    );
    first.ok();
    let id = str_of(&first.json(), "id").to_owned();
    assert_eq!(key_count(env).await, 1);

    // A typo, or no pepper, is refused before anything is made, saying what to do.
    for (pepper, says) in [
        (Some("the-rihgt-pepper"), "fingerprint differs"),
        (None, "none was given"),
    ] {
        for args in [
            vec!["keys", "create", "--name", "b"],
            vec!["keys", "rotate", id.as_str()],
        ] {
            let out = with(pepper, &args);
            out.fails(1);
            assert!(
                out.stderr.contains(says)
                    && out.stderr.contains("KEYGATE_PEPPER or KEYGATE_PEPPER_FILE")
                    && out.stderr.contains("nothing was changed"),
                "{args:?}: {}",
                out.stderr
            );
            assert!(!out.stderr.contains("rihgt"), "{}", out.stderr);
        }
    }
    assert_eq!(key_count(env).await, 1);
    // Reading and status changes need no pepper.
    with(None, &["keys", "list"]).ok();
    with(None, &["keys", "disable", &id]).ok();
    with(None, &["keys", "enable", &id]).ok();

    // The same pepper from an owner-only file works; a file others can read is refused.
    let file = env.dir.path().join("pepper");
    std::fs::write(&file, "the-right-pepper\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Out::from(
            env.cmd()
                .env("KEYGATE_PEPPER_FILE", &file)
                .args(["keys", "create", "--name", "c"])
                .output()
                .unwrap(),
        );
        out.fails(2);
        assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
        assert!(!out.stderr.contains("the-right-pepper"), "{}", out.stderr);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = Out::from(
        env.cmd()
            .env("KEYGATE_PEPPER_FILE", &file)
            .args(["keys", "create", "--name", "c"])
            .output()
            .unwrap(),
    );
    out.ok();
    // Both at once is ambiguous.
    let out = Out::from(
        env.cmd()
            .env("KEYGATE_PEPPER_FILE", &file)
            .env("KEYGATE_PEPPER", "the-right-pepper")
            .args(["keys", "create", "--name", "d"])
            .output()
            .unwrap(),
    );
    out.fails(2);
    assert!(out.stderr.contains("not both"), "{}", out.stderr);
    assert_eq!(key_count(env).await, 2);
}
both!(
    sqlite_a_pepper_mismatch_is_refused,
    postgres_a_pepper_mismatch_is_refused,
    a_pepper_mismatch_is_refused
);

async fn a_database_for_a_newer_keygate_is_refused(env: &Env) {
    let k = create(env, &["--name", "a"]);
    let id = str_of(&k, "id").to_owned();
    // Versions from a newer keygate that allows this one: used, with a warning.
    let byte = if env.schema.is_some() {
        "'\\x00'::bytea"
    } else {
        "X'00'"
    };
    exec(
        env,
        &format!(
            "INSERT INTO keygate_migrations (version, description, checksum, applied_at) \
             VALUES (99, 'future', {byte}, 0)"
        ),
    )
    .await;
    let out = env.run(&["keys", "list", "--json"]);
    out.ok();
    assert_eq!(out.json().as_array().unwrap().len(), 1);
    assert!(
        out.stderr
            .starts_with("keygate: warning: the database has schema version(s) 99"),
        "{}",
        out.stderr
    );
    // A newer keygate that this one would misread: every command refuses, nothing changes.
    exec(
        env,
        "UPDATE keygate_settings SET value = '999.0.0' WHERE name = 'min_keygate_version'",
    )
    .await;
    let expected = format!(
        "keygate: this database needs keygate >= 999.0.0; you run {}",
        env!("CARGO_PKG_VERSION")
    );
    for args in [
        vec!["keys", "list"],
        vec!["keys", "show", id.as_str()],
        vec!["usage"],
        vec!["audit", "events"],
        vec!["keys", "create", "--name", "b"],
        vec!["keys", "revoke", id.as_str()],
    ] {
        let out = env.run(&args);
        out.fails(1);
        assert!(
            out.stderr.starts_with(&expected),
            "{args:?}: {}",
            out.stderr
        );
    }
    exec(
        env,
        "UPDATE keygate_settings SET value = '0.1.0' WHERE name = 'min_keygate_version'",
    )
    .await;
    let shown = env.run(&["keys", "list", "--json"]).ok().json();
    assert_eq!(shown.as_array().unwrap().len(), 1);
    assert_eq!(shown[0]["status"], "active");
}
both!(
    sqlite_a_database_for_a_newer_keygate_is_refused,
    postgres_a_database_for_a_newer_keygate_is_refused,
    a_database_for_a_newer_keygate_is_refused
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_commands_refuse_a_missing_schema() {
    let Some(env) = Env::postgres() else {
        return;
    };
    create(&env, &["--name", "a"]);
    let typo = format!("{}_typo", env.schema.as_deref().unwrap());
    for args in [
        vec!["keys", "list"],
        vec!["keys", "list", "--json"],
        vec!["keys", "show", "AAAAAAAAAAAA"],
        vec!["usage"],
        vec!["audit", "events"],
    ] {
        let mut all = args.clone();
        all.extend(["--schema", typo.as_str()]);
        let out = env.run(&all);
        out.fails(1);
        assert!(
            out.stderr
                .contains(&format!("no keygate schema `{typo}` in this database")),
            "{args:?}: {}",
            out.stderr
        );
    }
    let mut c = PgConnectOptions::from_str(&env.url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_namespace WHERE nspname = $1")
        .bind(&typo)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0, "the mistyped schema was not created");
    c.close().await.unwrap();
}

/// Whether this process runs as root (which reads and writes any file regardless of mode).
#[cfg(unix)]
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_read_commands_work_on_a_read_only_database() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let env = Env::sqlite();
    let k = create(&env, &["--name", "kept", "--quota", "daily=10/d"]);
    let id = str_of(&k, "id").to_owned();
    let file = env.sqlite_file().unwrap();
    let set = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // Root writes any file: run the commands as `nobody`, who can read the file but not
    // write it or its directory. Anyone else: take the write bits away.
    let root = is_root();
    if root {
        set(env.dir.path(), 0o755);
        set(&file, 0o644);
    } else {
        set(&file, 0o444);
        set(env.dir.path(), 0o555);
    }
    let run = |args: &[&str]| {
        let mut c = env.cmd();
        if root {
            c.uid(65534).gid(65534);
        }
        Out::from(c.args(args).output().unwrap())
    };
    let before = std::fs::read(&file).unwrap();
    // The writer merged its write-ahead log into the file when it closed: whatever SQLite
    // left beside it (an emptied `-wal`, a `-shm`) holds no change.
    let beside = files_in(env.dir.path());
    for f in &beside {
        if f != &file {
            assert!(
                !f.to_string_lossy().ends_with("-wal") || std::fs::metadata(f).unwrap().len() == 0,
                "{f:?} holds changes"
            );
        }
    }
    let list = run(&["keys", "list", "--json"]);
    list.ok();
    assert_eq!(list.json()[0]["id"], id.as_str(), "{list:?}");
    assert!(
        list.stderr.contains("read as an immutable snapshot"),
        "{}",
        list.stderr
    );
    run(&["keys", "list"]).ok();
    let show = run(&["keys", "show", &id]);
    show.ok();
    assert!(show.stdout.contains("kept"), "{}", show.stdout);
    run(&["usage", &id, "--json"]).ok();
    let events = run(&["audit", "events", "--json"]);
    events.ok();
    assert!(events.stdout.contains("issued"), "{}", events.stdout);
    // A change cannot be made, and says so.
    let out = run(&["keys", "revoke", &id]);
    out.fails(1);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the file is unchanged"
    );
    // Nothing was created beside it.
    assert_eq!(files_in(env.dir.path()), beside);

    // While a writer has changes in the write-ahead log (which this reader cannot open),
    // reading the file alone would show an old state: refused, saying why.
    set(env.dir.path(), 0o700);
    set(&file, 0o600);
    let writer = env.store().await;
    let (_, other) = keygate_core::KeyRecord::generate(
        &keygate_core::Prefix::default(),
        &keygate_core::KeyHasher::new(),
        "in the log",
        std::time::SystemTime::now(),
    )
    .unwrap();
    writer.insert(&other).await.unwrap();
    if root {
        set(env.dir.path(), 0o755);
        set(&file, 0o644);
    } else {
        set(&file, 0o444);
        set(env.dir.path(), 0o555);
    }
    let out = run(&["keys", "list"]);
    out.fails(1);
    assert!(out.stderr.contains("write-ahead log"), "{}", out.stderr);
    set(env.dir.path(), 0o700);
    set(&file, 0o600);
    writer.close().await;
    assert_eq!(
        env.run(&["keys", "show", &id, "--json"]).ok().json()["status"],
        "active"
    );
}

#[cfg(unix)]
#[test]
fn sqlite_the_database_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::sqlite();
    create(&env, &["--name", "a"]);
    let file = env.sqlite_file().unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
