//! The Chroma preset against a real Chroma server, driven by the official Python client
//! (`tests/chroma/client.py`): scoped keys, two tenants that cannot see each other's
//! records, and revocation.
//!
//! Needs `KEYGATE_TEST_GATEWAY_VENV`, a virtualenv with the `chromadb` package
//! (`scripts/gateway-venv.sh` makes one); prints that it skipped when unset.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::StatusCode;
use keygate::KeySpec;
use keygate_gateway::preset::Preset;
use support::{call_with, python, Gw};

const SCRIPT: &str = "tests/chroma/client.py";

/// Kills the Chroma server when the test ends, however it ends.
struct Server(tokio::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts `chroma run` on a free loopback port and waits (bounded) for its heartbeat.
async fn chroma(venv: &Path, data: &Path) -> (Server, u16) {
    let port = free_port().await;
    let child = tokio::process::Command::new(venv.join("bin").join("chroma"))
        .arg("run")
        .arg("--path")
        .arg(data)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("ANONYMIZED_TELEMETRY", "False")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chroma");
    let server = Server(child);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let r = call_with(addr, "GET", "/api/v2/heartbeat", &[], None).await;
            if r.status == StatusCode::OK {
                break;
            }
        }
        assert!(Instant::now() < deadline, "chroma did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, port)
}

fn tenant_spec(tenant: &str) -> KeySpec {
    let mut spec = KeySpec::new(tenant);
    for s in [
        "service:read",
        "tenants:read",
        "databases:read",
        "collections:read",
        "records:read",
        "records:write",
    ] {
        spec = spec.scope(s);
    }
    spec.resource("default_database")
        .attribute("tenant", tenant)
}

/// A real Chroma server on a fresh data directory and the gateway in front of it; `None`
/// (and a skip line) without `KEYGATE_TEST_GATEWAY_VENV`.
async fn world() -> Option<(Server, tempfile::TempDir, PathBuf, Gw)> {
    let Ok(venv) = std::env::var("KEYGATE_TEST_GATEWAY_VENV") else {
        eprintln!("skipped: KEYGATE_TEST_GATEWAY_VENV is not set (scripts/gateway-venv.sh)");
        return None;
    };
    let venv = PathBuf::from(venv);
    let data = tempfile::tempdir().expect("tempdir");
    let (server, chroma_port) = chroma(&venv, data.path()).await;
    let gw = Gw::start(
        Preset::Chroma,
        &format!("http://127.0.0.1:{chroma_port}"),
        None,
        |_| {},
    )
    .await;
    Some((server, data, venv, gw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_through_the_gateway() {
    let Some((_server, _data, venv, gw)) = world().await else {
        return;
    };
    let port = gw.addr.port();
    let operator = gw.operator_key().await;
    let (acme, acme_id) = gw.issue(tenant_spec("acme")).await;
    let (globex, _) = gw.issue(tenant_spec("globex")).await;

    let setup = python(&venv, SCRIPT, port, "setup", &[&operator]).await;
    assert_eq!(setup["collections"], serde_json::json!(["docs"]), "{setup}");

    let r = python(&venv, SCRIPT, port, "isolation", &[&acme, &globex]).await;
    assert_eq!(r["acme_get"], serde_json::json!(["a1", "a2"]), "{r}");
    // Acme's second record claimed to be Globex's: stamped Acme's.
    assert_eq!(
        r["acme_metadatas"],
        serde_json::json!(["acme", "acme"]),
        "{r}"
    );
    assert_eq!(r["globex_get"], serde_json::json!(["g1"]), "{r}");
    assert_eq!(r["acme_query"], serde_json::json!(["a1", "a2"]), "{r}");
    assert_eq!(r["globex_query_where"], serde_json::json!(["g1"]), "{r}");
    assert_eq!(r["acme_get_globex_id"], serde_json::json!([]), "{r}");
    assert_eq!(
        r["globex_after_acme_delete"],
        serde_json::json!(["g1"]),
        "{r}"
    );
    let upsert = r["acme_upsert_globex_id"].as_str().unwrap_or_default();
    assert!(upsert.contains("tenant_conflict"), "{r}");
    assert_eq!(
        r["globex_after_acme_upsert"],
        serde_json::json!([1.0, 0.0]),
        "{r}"
    );
    assert_eq!(
        r["acme_a1_after_update"],
        serde_json::json!([{"n": 10, "tenant": "acme"}]),
        "{r}"
    );
    let update = r["acme_update_globex_id"].as_str().unwrap_or_default();
    assert!(update.contains("tenant_conflict"), "{r}");
    assert_eq!(
        r["globex_after_acme_update"],
        serde_json::json!([{"n": 3, "tenant": "globex"}]),
        "{r}"
    );
    assert!(
        r["acme_count"]
            .as_str()
            .unwrap_or_default()
            .contains("tenant_unscopable"),
        "{r}"
    );
    assert!(
        r["acme_delete_collection"]
            .as_str()
            .unwrap_or_default()
            .contains("insufficient_scope"),
        "{r}"
    );

    gw.gateway
        .keys
        .revoke("test", acme_id)
        .await
        .expect("revoke");
    let r = python(&venv, SCRIPT, port, "refused", &[&acme]).await;
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("invalid_key") || error.contains("401"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_id_of_another_database_is_refused() {
    let Some((_server, _data, _venv, gw)) = world().await else {
        return;
    };
    let operator = gw.operator_key().await;
    let base = "/api/v2/tenants/default_tenant/databases";
    let op = |method: &'static str, path: String, body: serde_json::Value| {
        let gw = &gw;
        let operator = operator.clone();
        async move {
            let r = gw.call(method, &path, Some(&operator), Some(body)).await;
            assert!(r.status.is_success(), "{method} {path}: {}", r.text);
            r.json
        }
    };
    op("POST", base.to_owned(), serde_json::json!({"name": "db2"})).await;
    let secret = op(
        "POST",
        format!("{base}/db2/collections"),
        serde_json::json!({"name": "secret"}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let mine = op(
        "POST",
        format!("{base}/default_database/collections"),
        serde_json::json!({"name": "mine"}),
    )
    .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for (db, id, record) in [("db2", &secret, "s"), ("default_database", &mine, "m")] {
        op(
            "POST",
            format!("{base}/{db}/collections/{id}/add"),
            serde_json::json!({"ids": [record], "embeddings": [[1.0, 2.0]]}),
        )
        .await;
    }
    // Chroma itself serves the other database's collection under this database's path.
    let r = gw
        .call(
            "POST",
            &format!("{base}/default_database/collections/{secret}/get"),
            Some(&operator),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(r.json["ids"], serde_json::json!(["s"]), "{}", r.text);

    let mut spec = KeySpec::new("limited");
    for s in ["collections:read", "records:read", "records:write"] {
        spec = spec.scope(s);
    }
    let (limited, _) = gw.issue(spec.resource("default_database")).await;
    let (acme, _) = gw.issue(tenant_spec("acme")).await;
    for key in [&limited, &acme] {
        for (method, op) in [("POST", "get"), ("POST", "query"), ("GET", "count")] {
            let body = (method == "POST").then(|| serde_json::json!({}));
            let path = format!("{base}/default_database/collections/{secret}/{op}");
            let r = gw.call(method, &path, Some(key), body).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text);
            assert_eq!(r.code(), "resource_forbidden", "{path}");
            let event = support::requests(&gw).pop().expect("audited");
            assert_eq!(event.decision, keygate::core::audit::Decision::Denied);
        }
    }
    // Its own database's collection, twice (the second time remembered).
    for _ in 0..2 {
        let r = gw
            .call(
                "POST",
                &format!("{base}/default_database/collections/{mine}/get"),
                Some(&limited),
                Some(serde_json::json!({})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["ids"], serde_json::json!(["m"]), "{}", r.text);
    }
}
