//! The command line refuses typos and leaks nothing, run as a process: scopes checked
//! against the vocabulary a server registered (with a suggestion), keys that can reach
//! nothing warned about, errors that name the options typed and suggest the command or
//! option meant, a full API key never repeated, and the database URL taken from the
//! environment or a private file with its password never shown.

mod common;

use common::*;
use keygate_core::{KnownScope, ScopeVocabulary};

/// The scopes of the showcase's route table.
fn showcase() -> ScopeVocabulary {
    ScopeVocabulary::new([
        KnownScope::new("collections:read", false),
        KnownScope::new("collections:manage", true),
        KnownScope::new("points:read", true),
        KnownScope::new("points:write", true),
        KnownScope::new("keys:admin", false),
    ])
}

async fn registered(env: &Env) {
    env.store()
        .await
        .register_scopes(&showcase())
        .await
        .expect("register");
}

fn keys_listed(env: &Env) -> String {
    env.run(&["keys", "list", "--json"]).ok().stdout.clone()
}

async fn scope_typos_are_refused_with_a_suggestion(env: &Env) {
    registered(env).await;
    let before = keys_listed(env);
    for (typo, fix) in [
        ("point:read", "points:read"),
        ("points:raed", "points:read"),
        ("Points:Read", "points:read"),
        ("pionts:*", "points:*"),
    ] {
        let out = env.run(&[
            "keys",
            "create",
            "--name",
            "x",
            "--scope",
            typo,
            "--collection",
            "docs",
        ]);
        out.fails(2);
        assert_eq!(
            out.stderr,
            format!(
                "keygate: unknown scope {typo:?} (did you mean `{fix}`?); pass \
                 --allow-unknown-scope to grant it anyway\n"
            )
        );
        assert_eq!(keys_listed(env), before, "{typo}: nothing was created");
    }
    let out = env.run(&["keys", "create", "--name", "x", "--scope", "billing:*"]);
    out.fails(2);
    assert_eq!(
        out.stderr,
        "keygate: unknown scope \"billing:*\" (not a scope this server's routes require); \
         pass --allow-unknown-scope to grant it anyway\n"
    );
    assert_eq!(keys_listed(env), before);

    // Known scopes and wildcards of known families: no warning but the plaintext's.
    for scope in ["points:read", "points:*", "*", "*:read"] {
        let out = env.run(&[
            "keys",
            "create",
            "--name",
            "ok",
            "--scope",
            scope,
            "--collection",
            "docs",
        ]);
        out.ok();
        assert_eq!(
            out.stderr,
            "keygate: warning: this is the only time the key is shown: store it now, it \
             cannot be recovered\n",
            "{scope}"
        );
    }
    // A custom scope, on purpose.
    let out = env.run(&[
        "keys",
        "create",
        "--json",
        "--name",
        "custom",
        "--scope",
        "billing:export",
        "--collection",
        "docs",
        "--allow-unknown-scope",
    ]);
    out.ok();
    assert_eq!(out.json()["scopes"], serde_json::json!(["billing:export"]));
    assert!(
        out.stderr.starts_with(
            "keygate: warning: granting on purpose: unknown scope \"billing:export\" (not a \
             scope this server's routes require)\n"
        ),
        "{}",
        out.stderr
    );
}
both!(
    sqlite_scope_typos_are_refused_with_a_suggestion,
    postgres_scope_typos_are_refused_with_a_suggestion,
    scope_typos_are_refused_with_a_suggestion
);

async fn a_key_that_can_reach_nothing_is_made_with_a_warning(env: &Env) {
    registered(env).await;
    let out = env.run(&["keys", "create", "--name", "r", "--scope", "points:read"]);
    out.ok();
    assert!(
        out.stderr.starts_with(
            "keygate: warning: every route these scopes open needs a collection and the key \
             has none: it can use none of them (add --collection)\n"
        ),
        "{}",
        out.stderr
    );
    // With a collection, or a scope whose route needs none, no such warning.
    for args in [
        vec!["--scope", "points:read", "--collection", "docs"],
        vec!["--scope", "points:read", "--scope", "collections:read"],
    ] {
        let mut all = vec!["keys", "create", "--name", "r"];
        all.extend(args.iter().copied());
        let out = env.run(&all);
        out.ok();
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
    }
}
both!(
    sqlite_a_key_that_can_reach_nothing_is_made_with_a_warning,
    postgres_a_key_that_can_reach_nothing_is_made_with_a_warning,
    a_key_that_can_reach_nothing_is_made_with_a_warning
);

/// No server registered a vocabulary: any well-formed scope is accepted, with a warning.
#[test]
fn without_a_vocabulary_scopes_are_accepted_with_a_warning() {
    let env = Env::sqlite();
    let out = env.run(&["keys", "create", "--name", "x", "--scope", "points:raed"]);
    out.ok();
    assert!(
        out.stderr.starts_with(
            "keygate: warning: no scope vocabulary is registered in this database (a server \
             registers its routes' scopes when it starts): the scopes were not checked\n"
        ),
        "{}",
        out.stderr
    );
}

/// Mistakes on the command line: the exact line, exit 2.
#[test]
fn errors_name_the_options_typed_and_suggest_what_was_meant() {
    let env = Env::sqlite();
    for (args, line) in [
        (
            vec!["keys", "craete"],
            "keygate: unrecognized subcommand 'craete' (did you mean 'create'? see --help)",
        ),
        (
            vec!["keys", "create", "--name", "x", "--colection", "docs"],
            "keygate: unexpected argument '--colection' found (did you mean '--collection'? \
             see --help)",
        ),
        (
            vec![
                "keys", "create", "--name", "x", "--rate", "b=1/s", "--rate", "b=2/m",
            ],
            "keygate: invalid --rate: b: duplicate policy name",
        ),
        (
            vec!["keys", "create", "--name", "x", "--expires-in", "0s"],
            "keygate: invalid --expires-in: must be in the future",
        ),
        (
            vec!["keys", "create", "--name", " "],
            "keygate: invalid --name: must not be empty",
        ),
        (
            vec!["keys", "create", "--name", "x", "--attr", "bad key=1"],
            "keygate: invalid --attr: \"bad key\" is not an attribute name ([A-Za-z0-9_.-], 1 \
             to 64)",
        ),
    ] {
        let out = env.run(&args);
        out.fails(2);
        assert_eq!(out.stderr, format!("{line}\n"), "{args:?}");
    }
    assert!(files_in(env.dir.path()).is_empty(), "nothing was created");
}

/// A whole API key where an id belongs: refused without repeating it, naming its id.
#[test]
fn a_full_key_is_never_repeated() {
    let env = Env::sqlite();
    let made = create(&env, &["--name", "k"]);
    let key = made["key"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    let secret = &key[key.len() - 28..];
    let hint = format!(
        "that looks like a full API key; pass its id (the part after the prefix, first 12 \
         characters) instead: {id} (see --help)"
    );
    for (args, line) in [
        (
            vec!["keys", "show", key.as_str()],
            format!("keygate: invalid value for <ID>: {hint}\n"),
        ),
        (
            vec!["keys", "revoke", key.as_str()],
            format!("keygate: invalid value for <ID>: {hint}\n"),
        ),
        (
            vec!["usage", key.as_str()],
            format!("keygate: invalid value for <ID>: {hint}\n"),
        ),
        (
            vec!["audit", "events", "--key", key.as_str()],
            format!("keygate: invalid value for --key: {hint}\n"),
        ),
        (
            vec![key.as_str()],
            "keygate: unrecognized subcommand '[key hidden]' (see --help)\n".to_owned(),
        ),
        (
            vec!["keys", "list", "--status", key.as_str()],
            "keygate: invalid value '[key hidden]' for '--status <STATUS>' [possible values: \
             active, disabled, revoked] (see --help)\n"
                .to_owned(),
        ),
    ] {
        let out = env.run(&args);
        out.fails(2);
        assert_eq!(out.stderr, line, "{args:?}");
        assert!(!out.stderr.contains(secret));
    }
    // The key is still active: nothing was revoked.
    let shown = env.run(&["keys", "show", "--json", &id]).ok().json();
    assert_eq!(shown["status"], "active");
}

/// The database URL from the environment or a private file; a password typed on the
/// command line is warned about; no password is ever shown.
#[test]
fn the_database_url_comes_from_the_environment_or_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::sqlite();
    create(&env, &["--name", "k"]);
    let file = env.dir.path().join("db-url");
    std::fs::write(&file, format!("{}\n", env.url)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let from_file = |file: &std::path::Path| {
        let mut c = env.cmd();
        c.env_remove("KEYGATE_DATABASE_URL")
            .env("KEYGATE_DATABASE_URL_FILE", file);
        Out::from(c.args(["keys", "list", "--json"]).output().unwrap())
    };
    let out = from_file(&file);
    out.ok();
    assert_eq!(out.json().as_array().unwrap().len(), 1);

    // Readable by every user: refused.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = from_file(&file);
    out.fails(2);
    assert_eq!(
        out.stderr,
        format!(
            "keygate: the database URL file {} can be read by every user (mode 644); make it \
             private first (chmod 600)\n",
            file.display()
        )
    );
    // Both a URL and a file: refused.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = env.cmd();
    c.env("KEYGATE_DATABASE_URL_FILE", &file);
    let out = Out::from(c.args(["keys", "list"]).output().unwrap());
    out.fails(2);
    assert!(out.stderr.contains("not both"), "{}", out.stderr);

    // A password in the file never shows, even in the error.
    let pg = env.dir.path().join("pg-url");
    std::fs::write(&pg, "postgres://app:Hunter2Secret@127.0.0.1:1/nowhere").unwrap();
    std::fs::set_permissions(&pg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = from_file(&pg);
    out.fails(1);
    assert!(!out.stderr.contains("Hunter2Secret"), "{}", out.stderr);

    // Typed on the command line: it works, with a warning, and is shown nowhere.
    for url in [
        "postgres://app:Hunter2Secret@127.0.0.1:1/nowhere",
        "postgres://127.0.0.1:1/nowhere?user=app&password=Hunter2Secret",
        "host=127.0.0.1 password=Hunter2Secret dbname=nowhere",
    ] {
        let out = env.run(&["--database-url", url, "keys", "list"]);
        assert_ne!(out.code, 0, "{url}");
        assert!(
            !out.stderr.contains("Hunter2Secret"),
            "{url}: {}",
            out.stderr
        );
        if url.contains("://") {
            assert!(
                out.stderr.starts_with(
                    "keygate: warning: a password on the command line can be read by every \
                     user of this machine (ps); use KEYGATE_DATABASE_URL or \
                     KEYGATE_DATABASE_URL_FILE instead\n"
                ),
                "{url}: {}",
                out.stderr
            );
        }
    }
    // Without a password: no warning.
    let out = env.run(&["--database-url", &env.url, "keys", "list"]);
    out.ok();
    assert_eq!(out.stderr, "");

    // --help never shows the environment's values.
    let mut c = env.cmd();
    c.env(
        "KEYGATE_DATABASE_URL",
        "postgres://app:Hunter2Secret@db/keys",
    )
    .env("KEYGATE_DATABASE_URL_FILE", &pg);
    let out = Out::from(c.args(["keys", "create", "--help"]).output().unwrap());
    out.ok();
    assert!(out.stdout.contains("KEYGATE_DATABASE_URL_FILE"));
    assert!(!out.stdout.contains("Hunter2Secret"));
    assert!(!out.stdout.contains("pg-url"));
}
