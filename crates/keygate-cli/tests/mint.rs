//! `keygate keys create --as-key`: a pipeline mints its own short-lived key through the
//! admin API (a real admin router on a loopback port), authenticated with its API key from
//! `KEYGATE_KEY` or `--key-file`, never touching the database; the admin API's refusals
//! come back as exit 1 with their code, bad options as exit 2, and nothing is created.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime};

use axum::Router;
use common::*;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::{KeyGate, KeyId, KeyManager, KeyStore, Verifier};
use keygate_admin::AdminApi;

/// Runs a prepared command off the runtime's threads.
async fn run(mut c: Command) -> Out {
    tokio::task::spawn_blocking(move || Out::from(c.output().expect("run keygate")))
        .await
        .unwrap()
}

/// The policy, made with the CLI: an identity `etl`, a role `minter` that may mint for an
/// hour, and the pipeline's key holding it; answers the key and the admin API over the
/// store (a router to serve).
async fn minting_setup(env: &Env) -> (String, KeyGate, Router) {
    env.run(&["identities", "create", "etl"]).ok();
    env.run(&[
        "roles",
        "create",
        "minter",
        "--scope",
        "keys:create",
        "--grant",
        "points:read:docs-*",
        "--mint-max-lifetime",
        "1h",
    ])
    .ok();
    let shown = env.run(&["roles", "show", "minter", "--json"]).ok().json();
    assert_eq!(shown["mint_max_lifetime_secs"], 3600);
    let pipeline = create(
        env,
        &[
            "--name",
            "pipeline",
            "--role",
            "minter",
            "--identity",
            "etl",
        ],
    );
    let secret = pipeline["key"].as_str().unwrap().to_owned();
    // The server: the admin API over its own store handle.
    let verifier = Verifier::builder(env.store().await).build();
    let gate = KeyGate::new(verifier);
    let keys = KeyManager::for_verifier(gate.verifier(), Auditor::direct(MemorySink::new()));
    let app = Router::new().nest("/admin", AdminApi::new(keys).gate(&gate).router());
    (secret, gate, app)
}

async fn a_pipeline_mints_its_own_keys_through_the_admin_api(env: &Env) {
    let (secret, gate, app) = minting_setup(env).await;
    let store = env.store().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/admin", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let count = || async { store.list(&Default::default()).await.unwrap().len() };
    let before = count().await;

    // Minted with the key from the environment: for the pipeline's identity, 30 minutes.
    let mut c = env.cmd();
    c.env_remove("KEYGATE_DATABASE_URL")
        .env("KEYGATE_KEY", &secret)
        .args([
            "keys",
            "create",
            "--as-key",
            "--admin-url",
            &url,
            "--name",
            "job-1",
            "--grant",
            "points:read:docs-1",
            "--expires-in",
            "30m",
            "--json",
        ]);
    let out = run(c).await;
    let minted = out.ok().json();
    assert_eq!(minted["identity"], "etl");
    assert_eq!(minted["name"], "job-1");
    let id = KeyId::parse(minted["id"].as_str().unwrap()).unwrap();
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.identity.as_deref(), Some("etl"));
    let life = stored
        .expires_at
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(life <= Duration::from_secs(1800) && life > Duration::from_secs(1700));
    // The plaintext works.
    let p = gate
        .verifier()
        .verify(minted["key"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(p.identity(), Some("etl"));
    // The key never appears on the command line or in the output but for the minted one.
    assert!(!out.stdout.contains(&secret) && !out.stderr.contains(&secret));

    // The same with --key-file, text output.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{secret}\n")).unwrap();
    let mut c = env.cmd();
    c.args([
        "keys",
        "create",
        "--as-key",
        "--admin-url",
        &url,
        "--key-file",
        file.path().to_str().unwrap(),
        "--name",
        "job-2",
        "--grant",
        "points:read:docs-2",
    ]);
    let out = run(c).await;
    out.ok();
    assert!(out.stdout.contains("key: kg_"), "{}", out.stdout);
    assert_eq!(count().await, before + 2);

    // Refused by the admin API (exit 1, its code named): a lifetime above the ceiling, a
    // grant beyond the key's, another identity.
    for (extra, code) in [
        (
            &["--grant", "points:read:docs-1", "--expires-in", "2h"][..],
            "mint_ceiling_exceeded",
        ),
        (
            &["--grant", "points:write:docs-1"][..],
            "privilege_escalation",
        ),
        (
            &["--grant", "points:read:docs-1", "--identity", "other"][..],
            "identity_forbidden",
        ),
    ] {
        let mut c = env.cmd();
        c.env("KEYGATE_KEY", &secret).args([
            "keys",
            "create",
            "--as-key",
            "--admin-url",
            &url,
            "--name",
            "refused",
        ]);
        c.args(extra);
        let out = run(c).await;
        out.fails(1);
        assert!(out.stderr.contains(code), "{code}: {}", out.stderr);
    }
    // Bad options: no key, plain HTTP to another host, another scheme (exit 2).
    for (url, key) in [
        (url.as_str(), None),
        ("http://192.0.2.1:6333/admin", Some(&secret)),
        ("ftp://127.0.0.1:6333/admin", Some(&secret)),
    ] {
        let mut c = env.cmd();
        if let Some(k) = key {
            c.env("KEYGATE_KEY", k);
        }
        c.args([
            "keys",
            "create",
            "--as-key",
            "--admin-url",
            url,
            "--name",
            "x",
        ]);
        run(c).await.fails(2);
    }
    // A wrong key: the admin API's 401 (exit 1).
    let mut c = env.cmd();
    c.env("KEYGATE_KEY", "kg_not-a-key").args([
        "keys",
        "create",
        "--as-key",
        "--admin-url",
        &url,
        "--name",
        "x",
    ]);
    run(c).await.fails(1);
    assert_eq!(count().await, before + 2, "nothing else was created");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_pipeline_mints_its_own_keys_through_the_admin_api() {
    a_pipeline_mints_its_own_keys_through_the_admin_api(&Env::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_pipeline_mints_its_own_keys_through_the_admin_api() {
    let Some(env) = Env::postgres() else {
        return;
    };
    a_pipeline_mints_its_own_keys_through_the_admin_api(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_mints_over_https_trusting_the_admin_apis_certificate() {
    let env = Env::sqlite();
    let (secret, _gate, app) = minting_setup(&env).await;
    let store = env.store().await;
    let (addr, cert_pem) = keygate_testkit::serve::spawn_axum_tls(app).await;
    let url = format!("https://localhost:{}/admin", addr.port());
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &cert_pem).unwrap();
    let count = || async { store.list(&Default::default()).await.unwrap().len() };
    let before = count().await;
    let mint = |extra: &[&str]| {
        let mut c = env.cmd();
        c.env_remove("KEYGATE_DATABASE_URL")
            .env("KEYGATE_KEY", &secret)
            .args(["keys", "create", "--as-key", "--admin-url", &url])
            .args(extra)
            .args(["--name", "job", "--grant", "points:read:docs-1", "--json"]);
        c
    };

    // The admin API's self-signed certificate is not among the system's roots: refused
    // before any request, nothing minted.
    let out = run(mint(&[])).await;
    out.fails(1);
    assert!(
        out.stderr.contains("could not be reached"),
        "{}",
        out.stderr
    );
    assert_eq!(count().await, before);

    // Trusted through --admin-ca: minted over TLS.
    let ca_path = ca.path().to_str().unwrap().to_owned();
    let out = run(mint(&["--admin-ca", &ca_path])).await;
    let minted = out.ok().json();
    assert_eq!(minted["identity"], "etl");
    assert_eq!(count().await, before + 1);

    // --admin-ca with a file that holds no certificate is a usage error (exit 2).
    let empty = tempfile::NamedTempFile::new().unwrap();
    run(mint(&["--admin-ca", empty.path().to_str().unwrap()]))
        .await
        .fails(2);
    assert_eq!(count().await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_another_host_is_refused_before_any_connection() {
    let env = Env::sqlite();
    for url in [
        "http://admin.internal:6333/admin",
        "http://192.0.2.10/admin",
        "ftp://localhost/admin",
        "https://user:pw@localhost/admin",
        "not a url",
    ] {
        let mut c = env.cmd();
        c.env_remove("KEYGATE_DATABASE_URL")
            .env("KEYGATE_KEY", "kg_whatever")
            .args([
                "keys",
                "create",
                "--as-key",
                "--admin-url",
                url,
                "--name",
                "x",
            ]);
        let out = run(c).await;
        out.fails(2);
        assert!(out.stderr.contains("--admin-url"), "{url}: {}", out.stderr);
        assert!(
            !out.stderr.contains(":pw@"),
            "the password is not shown: {}",
            out.stderr
        );
    }
}
