//! What keeps a database from being used wrongly without anyone being told, on both
//! backends: the pepper fingerprint, the compatibility level (a database needing a newer
//! keygate, schema versions from a newer one), read-only opening (nothing created or
//! migrated), and owner-only SQLite files.

mod common;

use common::*;
use keygate_core::{KeyHasher, KeyStore, StoreError};
use keygate_sql::{OpenError, PepperCheck, PepperCheckError, SqlOptions, SqlStore};

/// The newest migration version this build embeds.
const LATEST: i64 = 8;

async fn open_err(url: &str, options: SqlOptions) -> OpenError {
    match SqlStore::open_with(url, options).await {
        Ok(s) => panic!("expected a refusal, opened {s:?}"),
        Err(e) => e,
    }
}

async fn stored_fingerprint(db: &Db) -> i64 {
    db.scalar("SELECT COUNT(*) FROM keygate_settings WHERE name = 'pepper_fingerprint'")
        .await
}

async fn the_pepper_is_recorded_then_enforced(db: &Db) {
    let store = db.open().await;
    let right = KeyHasher::with_pepper(b"the server's pepper");
    // A read-only store records nothing.
    let reader = db.open_with(db.options().read_only(true)).await;
    assert_eq!(
        reader.check_pepper(&right).await.unwrap(),
        PepperCheck::NotRecorded
    );
    assert_eq!(stored_fingerprint(db).await, 0);
    // The first check records it; the same pepper then matches, from any handle.
    assert_eq!(
        store.check_pepper(&right).await.unwrap(),
        PepperCheck::Recorded
    );
    assert_eq!(
        store.check_pepper(&right).await.unwrap(),
        PepperCheck::Matches
    );
    assert_eq!(
        reader.check_pepper(&right).await.unwrap(),
        PepperCheck::Matches
    );
    // The fingerprint is not the pepper.
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM keygate_settings WHERE name = 'pepper_fingerprint' \
             AND value LIKE 'blake3:%' AND value NOT LIKE '%pepper%'"
        )
        .await,
        1
    );
    // A typo, or no pepper at all, is refused with what to do; the record stays.
    for (wrong, says) in [
        (
            KeyHasher::with_pepper(b"the server's peper"),
            "fingerprint differs",
        ),
        (KeyHasher::new(), "none was given"),
    ] {
        let e = db.open().await.check_pepper(&wrong).await.unwrap_err();
        assert!(matches!(e, PepperCheckError::Mismatch { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(says) && text.contains("same pepper"),
            "{text}"
        );
        assert!(
            !text.contains("peper") && !text.contains("blake3"),
            "{text}"
        );
    }
    assert_eq!(
        store.check_pepper(&right).await.unwrap(),
        PepperCheck::Matches
    );

    // A database first used without a pepper refuses one.
    db.exec("DELETE FROM keygate_settings WHERE name = 'pepper_fingerprint'")
        .await;
    assert_eq!(
        store.check_pepper(&KeyHasher::new()).await.unwrap(),
        PepperCheck::Recorded
    );
    let e = store.check_pepper(&right).await.unwrap_err().to_string();
    assert!(e.contains("made without a pepper"), "{e}");

    // A damaged fingerprint is reported, not compared.
    db.exec("UPDATE keygate_settings SET value = 'garbage' WHERE name = 'pepper_fingerprint'")
        .await;
    assert!(matches!(
        store.check_pepper(&right).await,
        Err(PepperCheckError::Store(StoreError::Corrupt(_)))
    ));
}
both!(
    sqlite_the_pepper_is_recorded_then_enforced,
    postgres_the_pepper_is_recorded_then_enforced,
    the_pepper_is_recorded_then_enforced
);

async fn a_database_for_a_newer_keygate_is_refused(db: &Db) {
    let store = db.open().await;
    assert!(store.warnings().is_empty(), "{:?}", store.warnings());
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_settings WHERE name = 'min_keygate_version'")
            .await,
        1
    );
    store.close().await;

    // A newer keygate added a version this one does not know but still allows it: used,
    // with a warning naming the version.
    let byte = if db.name() == "postgres" {
        "'\\x00'::bytea"
    } else {
        "X'00'"
    };
    db.exec(&format!(
        "INSERT INTO keygate_migrations (version, description, checksum, applied_at) \
         VALUES (99, 'future', {byte}, 0)"
    ))
    .await;
    for options in [db.options(), db.options().read_only(true)] {
        let store = db.open_with(options).await;
        assert_eq!(store.warnings().len(), 1, "{:?}", store.warnings());
        let w = &store.warnings()[0];
        assert!(
            w.contains("version(s) 99") && w.contains("used as is"),
            "{w}"
        );
        assert!(store.list(&Default::default()).await.is_ok());
    }

    // A newer keygate that this one would misread raised the level: refused, writable or
    // read-only, before anything is migrated.
    db.exec("UPDATE keygate_settings SET value = '999.0.0' WHERE name = 'min_keygate_version'")
        .await;
    for options in [db.options(), db.options().read_only(true)] {
        let e = open_err(db.url(), options).await;
        assert!(matches!(e, OpenError::NeedsNewer { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "this database needs keygate >= 999.0.0; you run {} (upgrade keygate to use it)",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
    // Even when migrations are pending (they are not applied).
    db.exec("DELETE FROM keygate_migrations WHERE version = 2")
        .await;
    let e = open_err(db.url(), db.options()).await;
    assert!(matches!(e, OpenError::NeedsNewer { .. }), "{e:?}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_migrations WHERE version = 2")
            .await,
        0
    );
    // Garbage is refused too (fail closed).
    db.exec("UPDATE keygate_settings SET value = 'later' WHERE name = 'min_keygate_version'")
        .await;
    let e = open_err(db.url(), db.options().read_only(true)).await;
    assert!(e.to_string().contains("min_keygate_version"), "{e}");
}

both!(
    sqlite_a_database_for_a_newer_keygate_is_refused,
    postgres_a_database_for_a_newer_keygate_is_refused,
    a_database_for_a_newer_keygate_is_refused
);

async fn read_only_creates_and_migrates_nothing(db: &Db) {
    let ro = || db.options().read_only(true);
    // Nothing there yet: refused, and nothing created.
    let e = open_err(db.url(), ro()).await;
    match db {
        Db::Sqlite { dir, .. } => {
            assert!(matches!(e, OpenError::Unavailable(_)), "{e:?}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            // An empty file has no keygate tables.
            std::fs::write(dir.path().join("keygate.db"), b"").unwrap();
            let e = open_err(db.url(), ro()).await;
            assert!(matches!(e, OpenError::NotInitialized), "{e:?}");
            assert!(e.to_string().contains("nothing was created"), "{e}");
        }
        Db::Postgres(_) => {
            // The test's schema exists but is empty.
            assert!(matches!(e, OpenError::NotInitialized), "{e:?}");
            assert!(e.to_string().contains("nothing was created"), "{e}");
            assert_eq!(
                db.scalar("SELECT COUNT(*) FROM pg_tables WHERE tablename LIKE 'keygate_%' AND schemaname = current_schema()")
                    .await,
                0
            );
        }
    }

    // Current: opened without writing; reads work, writes fail.
    let (_, record) = plain(&KeyHasher::new(), "kept", at_ms(1_780_000_000_000));
    db.open().await.insert(&record).await.unwrap();
    let reader = db.open_with(ro()).await;
    assert_eq!(reader.schema_version(), LATEST);
    assert!(reader.warnings().is_empty(), "{:?}", reader.warnings());
    assert_eq!(reader.list(&Default::default()).await.unwrap().len(), 1);
    assert!(reader.get(&record.id).await.unwrap().is_some());
    let (_, other) = plain(&KeyHasher::new(), "refused", at_ms(1_780_000_000_000));
    assert!(matches!(
        reader.insert(&other).await,
        Err(StoreError::Unavailable(_))
    ));
    reader.close().await;

    // Older than this build: a clear error, no migration attempted.
    // (A database from before migration 3: its later migrations' tables and column go too.)
    for sql in [
        "DROP TABLE keygate_key_last_used",
        "DROP TRIGGER keygate_keys_roles_insert",
        "DROP TRIGGER keygate_keys_roles_update",
        "DROP TRIGGER keygate_keys_roles_delete",
        "DROP TABLE keygate_key_roles",
        "DROP TABLE keygate_roles",
        "DROP TABLE keygate_identities",
        "DROP INDEX keygate_keys_identity",
        "ALTER TABLE keygate_keys DROP COLUMN grants",
        "ALTER TABLE keygate_keys DROP COLUMN roles",
        "ALTER TABLE keygate_keys DROP COLUMN identity",
        "ALTER TABLE keygate_keys DROP COLUMN version",
    ] {
        let sql = match (db, sql.strip_prefix("DROP TRIGGER ")) {
            // PostgreSQL names a trigger's table.
            (Db::Postgres(_), Some(t)) => format!("DROP TRIGGER {t} ON keygate_keys"),
            _ => sql.to_owned(),
        };
        db.exec(&sql).await;
    }
    db.exec("DROP TABLE keygate_settings").await;
    db.exec("DROP TABLE keygate_scopes").await;
    db.exec("ALTER TABLE keygate_keys DROP COLUMN lineage")
        .await;
    db.exec("DELETE FROM keygate_migrations WHERE version >= 3")
        .await;
    let e = open_err(db.url(), ro()).await;
    assert!(
        matches!(
            e,
            OpenError::Outdated {
                version: 2,
                needs: LATEST
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("write access"), "{e}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM keygate_migrations").await,
        2
    );
    // A writable open upgrades it, keeping the keys.
    let store = db.open().await;
    assert_eq!(store.schema_version(), LATEST);
    assert!(store.get(&record.id).await.unwrap().is_some());
}
both!(
    sqlite_read_only_creates_and_migrates_nothing,
    postgres_read_only_creates_and_migrates_nothing,
    read_only_creates_and_migrates_nothing
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_refuses_a_missing_schema() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    let missing = format!("{}_typo", pg.schema);
    let e = open_err(
        db.url(),
        SqlOptions::new().schema(missing.clone()).read_only(true),
    )
    .await;
    assert!(
        matches!(&e, OpenError::NoSchema(s) if *s == missing),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("no keygate schema `{missing}` in this database")
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM pg_namespace WHERE nspname = '{missing}'"
        ))
        .await,
        0,
        "the schema was not created"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let store = SqlStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let (_, record) = plain(&KeyHasher::new(), "k", at_ms(1_780_000_000_000));
    store.insert(&record).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // While the store is open its WAL files exist.
    let mut files = vec![path.clone()];
    for suffix in ["-wal", "-shm"] {
        files.push(std::path::PathBuf::from(format!(
            "{}{suffix}",
            path.display()
        )));
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    store.close().await;
    // An existing file keeps its mode (an operator's choice).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let again = SqlStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(again.get(&record.id).await.unwrap().is_some());
    assert_eq!(mode(&path), 0o640);
}
