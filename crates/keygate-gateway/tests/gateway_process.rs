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

    let (running, addr, metrics) = start(
        &config,
        &url,
        &dir.path().join("audit"),
        &["--metrics-listen", "127.0.0.1:0"],
        &admin,
    );

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
    let metrics = metrics.expect("the metrics address");
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

/// Starts the binary with `config` over the key database `url` and `extra` flags; waits
/// for `ready`. Returns the process, its address and its metrics address (if printed).
/// `secret` must never appear in its output.
fn start(
    config: &std::path::Path,
    url: &str,
    audit: &std::path::Path,
    extra: &[&str],
    secret: &str,
) -> (Running, std::net::SocketAddr, Option<std::net::SocketAddr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate-gateway"))
        .arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--database-url", url])
        .arg("--audit-log")
        .arg(audit)
        .args(extra)
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_REDIS_URL")
        .env_remove("KEYGATE_PEPPER")
        .env_remove("KEYGATE_PEPPER_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
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
    let (mut addr, mut metrics) = (None, None);
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        assert!(!line.contains(secret), "a secret was printed");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if let Some(rest) = line.split("metrics without a key on http://").nth(1) {
            metrics = rest.split('/').next().and_then(|a| a.parse().ok());
        }
        if line == "ready" {
            break;
        }
    }
    (
        running,
        addr.expect("the gateway printed its address"),
        metrics,
    )
}

/// With `--redis-url`, rate limits are counted in Redis: a second process with the same
/// prefix continues the first one's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_rate_limits_outlive_the_process() {
    let Some(redis) = keygate_testkit::server_url("KEYGATE_TEST_REDIS_URL") else {
        return;
    };
    let svc = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"{\"result\":{\"count\":0}}"),
        )))
    });
    let up = keygate_testkit::serve::spawn_hyper(svc).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "preset = \"qdrant\"\n[upstream]\nurl = \"http://{up}\"\n[[rate_limits]]\nname = \"hourly\"\nlimit = 2\nperiod = \"1h\"\n"
        ),
    )
    .expect("write");
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let store = SqlStore::open(&url).await.expect("open");
    let keys = KeyManager::for_verifier(
        &Verifier::builder(store.clone()).build(),
        Auditor::direct(MemorySink::new()),
    );
    let key = keys
        .issue("cli", KeySpec::new("ops").scope("*").resource("*"))
        .await
        .expect("issue");
    let key = key.key.expose_secret().to_owned();
    let prefix = format!("kg-gw-test-{}", std::process::id());
    let flags = [
        "--redis-url",
        redis.as_str(),
        "--redis-prefix",
        prefix.as_str(),
    ];
    let audit = dir.path().join("audit");

    let (first, addr, _) = start(&config, &url, &audit, &flags, &key);
    for _ in 0..2 {
        let r = call(
            addr,
            "POST",
            "/collections/docs/points/count",
            Some(&key),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    drop(first);
    let (_second, addr, _) = start(&config, &url, &audit, &flags, &key);
    let r = call(
        addr,
        "POST",
        "/collections/docs/points/count",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert_eq!(r.code(), "rate_limited");
    store.close().await;
}
