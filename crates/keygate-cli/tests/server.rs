//! Keys created with the CLI work in a running server, and a revocation made with the CLI
//! (another process) reaches it within the bounds: 1 s on SQLite, 200 ms on
//! PostgreSQL.
//!
//! The server is an axum app on a real socket behind `ApiKeyAuthLayer`, over a `Verifier`
//! that trusts its cache for 30 s (`refresh_after`) and follows the store's change
//! sequence (`SqlStore::watch`): only the change follower can make it see the revocation
//! in time. A client polls the server over HTTP from before the CLI starts until the first
//! 401; the figure printed is the time from the revocation's commit (the change row's
//! database time) to that 401, and from the CLI process's exit to it.
//! (`cargo test -p keygate-cli --test server -- --nocapture` prints the figures.)

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::Router;
use common::*;
use keygate::{KeyGate, Verifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status of `GET /ping` with `key`.
async fn status(addr: SocketAddr, key: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ping HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

async fn cli_keys_work_and_revocation_reaches_the_server(env: &Env) {
    // The running server: its own store handle, opened first (on SQLite it creates the
    // database the CLI then uses).
    let store = env.store().await;
    let verifier = Verifier::builder(store.clone())
        .refresh_after(Duration::from_secs(30))
        .build();
    let follower = store.watch(&verifier).await.expect("follow the store");
    let gate = KeyGate::new(verifier);
    let app = Router::new()
        .route("/ping", get(|| async { "pong" }))
        .layer(gate.auth_layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let bound = match env.name() {
        "postgres" => Duration::from_millis(200),
        _ => Duration::from_secs(1),
    };
    let mut from_commit = Vec::new();
    let mut from_exit = Vec::new();
    for round in 0..5 {
        // A key made by the CLI (another process) works in the running server.
        let created = {
            let env_cmd = env.cmd();
            tokio::task::spawn_blocking(move || {
                let mut c = env_cmd;
                Out::from(
                    c.args(["keys", "create", "--name", "svc", "--json"])
                        .output()
                        .unwrap(),
                )
            })
            .await
            .unwrap()
        };
        let created = created.ok().json();
        let key = created["key"].as_str().unwrap().to_owned();
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(
            status(addr, &key).await,
            200,
            "round {round}: a CLI key works"
        );
        assert_eq!(status(addr, &key).await, 200, "and is cached");

        // Revoke it with the CLI while a client keeps calling.
        let mut revoke = env.cmd();
        revoke.args(["keys", "revoke", &id]);
        let cli = tokio::task::spawn_blocking(move || {
            let out = Out::from(revoke.output().unwrap());
            (out, now_ms())
        });
        let started = Instant::now();
        let denied_at = loop {
            let s = status(addr, &key).await;
            if s == 401 {
                break now_ms();
            }
            assert_eq!(s, 200);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "round {round}: the revocation never reached the server"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let (out, exited_at) = cli.await.unwrap();
        out.ok();
        // When the revocation committed: its change row's database time.
        let last = store.last_change().await.unwrap();
        let changes = store.changes_since(last - 5, 10).await.unwrap();
        let committed = changes
            .iter()
            .rev()
            .find(|c| c.key_id.map(|k| k.to_string()) == Some(id.clone()))
            .expect("the revocation's change row")
            .at
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let commit_to_401 = Duration::from_millis((denied_at - committed).max(0) as u64);
        let exit_to_401 = Duration::from_millis((denied_at - exited_at).max(0) as u64);
        assert!(
            commit_to_401 <= bound,
            "round {round}: the revocation took {commit_to_401:?} (bound {bound:?})"
        );
        from_commit.push(commit_to_401);
        from_exit.push(exit_to_401);
    }
    from_commit.sort();
    from_exit.sort();
    println!(
        "{}: CLI revocation reached the running server: from commit min {:?} median {:?} max {:?}; from CLI exit max {:?} (5 rounds, bound {bound:?}, change poll {:?})",
        env.name(),
        from_commit[0],
        from_commit[2],
        from_commit[4],
        from_exit[4],
        store.poll_interval()
    );
    follower.shutdown().await;
    server.abort();
}
both!(
    sqlite_cli_keys_work_and_revocation_reaches_the_server,
    postgres_cli_keys_work_and_revocation_reaches_the_server,
    cli_keys_work_and_revocation_reaches_the_server
);
