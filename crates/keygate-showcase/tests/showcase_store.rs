//! The showcase over a SQLite key store it follows (as `examples/vector_db.rs` runs it):
//! keys created, disabled and revoked through another store handle (as the `keygate` CLI
//! does, from another process) take effect in the running server without a restart.

mod showcase_support;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::sql::SqlStore;
use keygate::{KeyManager, KeySpec, Verifier};
use showcase_support::*;

#[tokio::test]
async fn changes_made_through_another_store_handle_reach_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());

    // The server's handle, followed by its verifier.
    let store = SqlStore::open(&url).await.unwrap();
    let verifier = Verifier::new(store.clone());
    let follower = store.watch(&verifier).await.unwrap();
    let mut opts = Options::new(verifier, Auditor::direct(MemorySink::new()));
    // The polls below send failing keys quickly; keep them 401s, not per-address 429s.
    opts.anonymous_rate_limits = Vec::new();
    let app = build(opts).unwrap();
    let addr = serve(app.router.clone()).await;

    // Another handle, as the CLI would open it: no verifier of its own.
    let other = SqlStore::open(&url).await.unwrap();
    let cli = KeyManager::builder(Arc::new(other.clone()))
        .auditor(Auditor::direct(MemorySink::new()))
        .build();
    let admin = cli
        .issue("cli", KeySpec::new("admin").scope("*").resource("*"))
        .await
        .unwrap();
    let key = admin.key.expose_secret().to_owned();
    let r = call(addr, "GET", "/collections", Some(&key), None).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a key created elsewhere works at once"
    );

    cli.disable("cli", admin.key.id()).await.unwrap();
    let took = poll_until(
        Duration::from_secs(5),
        "disable reaches the server",
        || async {
            call(addr, "GET", "/collections", Some(&key), None)
                .await
                .status
                == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    println!("disable through another handle took effect in {took:?}");
    cli.enable("cli", admin.key.id()).await.unwrap();
    poll_until(
        Duration::from_secs(5),
        "enable reaches the server",
        || async {
            call(addr, "GET", "/collections", Some(&key), None)
                .await
                .status
                == StatusCode::OK
        },
    )
    .await;
    cli.revoke("cli", admin.key.id()).await.unwrap();
    let took = poll_until(
        Duration::from_secs(5),
        "revocation reaches the server",
        || async {
            call(addr, "GET", "/collections", Some(&key), None)
                .await
                .status
                == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    println!("revocation through another handle took effect in {took:?}");

    follower.shutdown().await;
    other.close().await;
    store.close().await;
}
