//! The `keygate-gateway` binary: a configuration file, keys in a SQLite database written by
//! another process (as the `keygate` CLI writes them), the upstream's credential from a
//! file, and a revocation made elsewhere reaching the running gateway.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::Counting;
use keygate::sql::SqlStore;
use keygate::{KeyManager, KeySpec, MemoryStore, Verifier};
use serde_json::json;
use support::call;

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_keys_from_the_database_and_follows_revocations() {
    // The upstream: the showcase, reached with its admin key.
    let verifier = Verifier::builder(MemoryStore::new()).build();
    let mut opts = keygate_showcase::Options::new(verifier, Auditor::direct(MemorySink::new()));
    opts.usage = Arc::new(MemoryUsageStore::new());
    opts.counting = Counting::Strict;
    let app = keygate_showcase::build(opts).expect("the showcase");
    let admin = app
        .keys
        .issue("setup", KeySpec::new("admin").scope("*").resource("*"))
        .await
        .expect("admin key");
    let admin = admin.key.expose_secret().to_owned();
    let up = keygate_testkit::serve::spawn_axum_with_peer(app.router.clone()).await;
    let r = call(
        up,
        "PUT",
        "/collections/docs",
        Some(&admin),
        Some(&json!({"vectors": {"size": 2, "distance": "Dot"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let dir = tempfile::tempdir().expect("tempdir");
    let credential = dir.path().join("qdrant.key");
    std::fs::write(&credential, format!("{admin}\n")).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&credential, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "preset = \"qdrant\"\n[upstream]\nurl = \"http://{up}\"\ncredential_file = \"{}\"\n",
            credential.display()
        ),
    )
    .expect("write");

    // Keys written by another process's store, as the CLI writes them.
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = SqlStore::open(&url).await.expect("open");
    let keys = KeyManager::for_verifier(
        &Verifier::builder(store.clone()).build(),
        Auditor::direct(MemorySink::new()),
    );
    let issued = keys
        .issue(
            "cli",
            KeySpec::new("acme")
                .scope("points:read")
                .scope("points:write")
                .resource("docs")
                .attribute("tenant", "acme"),
        )
        .await
        .expect("issue");
    let acme = issued.key.expose_secret().to_owned();
    // Another tenant's point, written to the upstream directly.
    let r = call(
        up,
        "PUT",
        "/collections/docs/points",
        Some(&admin),
        Some(
            &json!({"points": [{"id": 9, "vector": [1.0, 0.0], "payload": {"tenant": "globex"}}]}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate-gateway"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--database-url", &url])
        .arg("--audit-log")
        .arg(dir.path().join("audit"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_REDIS_URL")
        .env_remove("KEYGATE_PEPPER")
        .env_remove("KEYGATE_PEPPER_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut metrics = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        assert!(
            !line.contains(&admin),
            "the upstream credential was printed"
        );
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.split("metrics without a key on http://").nth(1) {
            metrics = rest.split('/').next().map(str::to_owned);
        }
        if line == "ready" {
            break;
        }
    }
    let addr: std::net::SocketAddr = addr
        .expect("the gateway printed its address")
        .parse()
        .expect("address");

    let r = call(
        addr,
        "POST",
        "/collections/docs/points/count",
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["result"]["count"], 0,
        "another tenant's point is not counted"
    );
    let r = call(
        addr,
        "PUT",
        "/collections/docs/points",
        Some(&acme),
        Some(&json!({"points": [{"id": 1, "vector": [1.0, 0.0]}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(
        addr,
        "POST",
        "/collections/docs/points/count",
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(r.json["result"]["count"], 1, "{}", r.text);
    let r = call(addr, "GET", "/collections/docs/points/9", Some(&acme), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);

    // Revoked by the other process: refused once the gateway's follower sees the change
    // (SQLite is polled every second), within a bounded wait.
    keys.revoke("cli", issued.record.id).await.expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = call(
            addr,
            "POST",
            "/collections/docs/points/count",
            Some(&acme),
            None,
        )
        .await;
        if r.status == StatusCode::UNAUTHORIZED {
            assert_eq!(r.code(), "invalid_key");
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            Instant::now() < deadline,
            "the revocation did not reach the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The counters see the allowed requests and the refusal (recorded off the request
    // path: polled, bounded).
    let metrics: std::net::SocketAddr = metrics
        .expect("the metrics address")
        .parse()
        .expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = call(metrics, "GET", "/metrics", None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.text
                .contains("keygate_requests_total{decision=\"allowed\""),
            "{}",
            r.text
        );
        if r.text.contains("code=\"revoked_key\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal counted: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(running);
    store.close().await;
}
