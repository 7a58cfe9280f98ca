//! The showcase binary as a process: first start issues and prints an admin key, keys and
//! quota usage persist in SQLite across restarts, SIGTERM shuts down gracefully with usage
//! and the audit log flushed, and the log (one file per start, one chain) verifies.
//!
//! The binary is the one `cargo test` builds next to this test
//! (`target/<profile>/examples/vector_db`; `cargo test --workspace --all-features` builds
//! examples). When it is missing or older than the showcase's sources (a run limited with
//! `--test`), the test says so and skips: build it with
//! `cargo build -p keygate-showcase --example vector_db`.

mod showcase_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use keygate::core::audit::{verify_dir, ChainKey, VerifyOptions};
use serde_json::json;
use showcase_support::call;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn newest_source() -> SystemTime {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("examples").join("vector_db.rs")];
    if let Ok(dir) = std::fs::read_dir(root.join("src")) {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The example binary, if built and newer than its sources.
fn binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir
        .join("examples")
        .join(format!("vector_db{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    match built {
        None => {
            println!(
                "SKIPPED: {} is not built (cargo build -p keygate-showcase --example vector_db)",
                bin.display()
            );
            None
        }
        Some(t) if t < newest_source() => {
            println!(
                "SKIPPED: {} is older than the showcase's sources (rebuild it)",
                bin.display()
            );
            None
        }
        Some(_) => Some(bin),
    }
}

struct Server {
    child: Child,
    out: Lines<BufReader<ChildStdout>>,
    addr: std::net::SocketAddr,
    admin_key: Option<String>,
    /// What it printed up to `ready`.
    started: Vec<String>,
}

async fn start(bin: &Path, dir: &Path) -> Server {
    start_with(bin, dir, &[], &[]).await
}

/// Starts the example in `dir` with extra `args` and environment `env` (listening on a
/// free loopback port unless `args` names `--listen`), its stderr discarded.
async fn start_with(bin: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    start_full(bin, dir, args, env, Stdio::null()).await
}

/// Starts the example in `dir` with extra `args` and environment `env`, its stderr going
/// to `stderr`.
async fn start_full(
    bin: &Path,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Server {
    let listen: &[&str] = if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(bin)
        .args(listen)
        .args(args)
        .current_dir(dir)
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_DATABASE_URL_FILE")
        .env_remove("KEYGATE_REDIS_URL")
        .env_remove("KEYGATE_REDIS_URL_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start the example");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut addr = None;
    let mut admin_key = None;
    let mut lines = Vec::new();
    let read = async {
        while let Some(line) = out.next_line().await.expect("stdout") {
            lines.push(line.clone());
            if let Some(a) = line.strip_prefix("keygate vector_db listening on http://") {
                addr = Some(a.parse().expect("address"));
            }
            assert!(
                !line.contains("kg_"),
                "a key on standard output (not a terminal): {line}"
            );
            if let Some(f) = line
                .strip_prefix("admin key written to ")
                .and_then(|l| l.strip_suffix(" (owner-only)"))
            {
                let path = dir.join(f);
                let text = std::fs::read_to_string(&path).expect("the admin key file");
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
                    assert_eq!(mode & 0o777, 0o600, "the admin key file is owner-only");
                }
                admin_key = Some(text.trim_end().to_owned());
            }
            if line == "ready" {
                return;
            }
        }
        panic!("the example exited before it was ready");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the example is ready within 60 s");
    Server {
        child,
        out,
        addr: addr.expect("the listening line"),
        admin_key,
        started: lines,
    }
}

impl Server {
    /// SIGTERM, then the rest of stdout and the exit status.
    async fn terminate(mut self) -> Vec<String> {
        let pid = self.child.id().expect("running").to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill");
        assert!(killed.success());
        let mut rest = Vec::new();
        let finish = async {
            while let Some(line) = self.out.next_line().await.expect("stdout") {
                rest.push(line);
            }
            self.child.wait().await.expect("wait")
        };
        let status = tokio::time::timeout(Duration::from_secs(30), finish)
            .await
            .expect("graceful shutdown within 30 s");
        assert!(status.success(), "exit status {status:?}");
        rest
    }
}

fn written(lines: &[String]) -> u64 {
    lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("audit: ")?
                .strip_suffix(" events written, 0 dropped")?
                .parse()
                .ok()
        })
        .expect("the shutdown line reports no dropped event")
}

#[cfg(unix)]
#[tokio::test]
async fn first_start_restart_and_graceful_shutdown() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();

    let server = start(&bin, dir.path()).await;
    let admin = server
        .admin_key
        .clone()
        .expect("the first start prints an admin key");
    let addr = server.addr;
    assert!(
        dir.path().join("keygate.db").exists(),
        "SQLite file created"
    );
    let a = Some(admin.as_str());
    let r = call(
        addr,
        "PUT",
        "/collections/docs",
        a,
        Some(&json!({"vectors": {"size": 2, "distance": "Dot"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(
        addr,
        "PUT",
        "/collections/docs/points",
        a,
        Some(
            &json!({"points": [{"id": 1, "vector": [1.0, 0.0]}, {"id": 2, "vector": [0.0, 1.0]}]}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(addr, "POST", "/admin/keys", a,
                 Some(&json!({"name": "reader", "scopes": ["points:read", "collections:read"], "collections": ["docs*"]}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let reader = r.json["key"].as_str().unwrap().to_owned();
    let r = call(
        addr,
        "POST",
        "/collections/docs/points/search",
        Some(&reader),
        Some(&json!({"vector": [0.9, 0.1], "limit": 1})),
    )
    .await;
    assert_eq!(r.json["result"][0]["id"], 1);
    let r = call(
        addr,
        "PUT",
        "/collections/docs/points",
        Some(&reader),
        Some(&json!({"points": []})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let first = written(&server.terminate().await);
    assert!(
        first >= 6,
        "{first} events: 5 requests and the admin key's issue"
    );

    // Restart: the keys are still there, so no new admin key; vectors were in memory.
    let server = start(&bin, dir.path()).await;
    assert_eq!(server.admin_key, None, "no second admin key");
    let r = call(server.addr, "GET", "/collections", Some(&reader), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"]["collections"], json!([]));
    // Quota usage of the first run was flushed to the database at shutdown: the admin key's
    // metered day holds its 3 requests there (cost 4: the upsert of 2 points cost 2), plus
    // this one.
    let admin_id = &admin["kg_".len().."kg_".len() + 12];
    let r = call(
        server.addr,
        "GET",
        &format!("/admin/keys/{admin_id}/usage"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let day = &r.json["windows"][0];
    assert_eq!(
        (
            day["window"].as_str(),
            day["cost"].as_u64(),
            day["requests"].as_u64()
        ),
        (Some("day"), Some(5), Some(4)),
        "{}",
        r.text
    );
    let second = written(&server.terminate().await);
    assert_eq!(second, 2);

    // Keyed with the secret the server made beside its log on first start.
    let options = VerifyOptions {
        key: ChainKey::from_file(dir.path().join("keygate-audit.key")).unwrap(),
        ..VerifyOptions::default()
    };
    let report = verify_dir(dir.path(), "keygate-audit", &options).unwrap();
    assert_eq!((report.files, report.lines), (2, first + second));
    let mut text = String::new();
    for f in keygate::core::audit::log_files(dir.path(), "keygate-audit").unwrap() {
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    for k in [&admin, &reader] {
        assert!(
            !text.contains(&k["kg_".len() + 12..]),
            "a key's secret is in the audit log"
        );
    }
}

/// The `keygate` CLI binary `cargo test --workspace` builds next to this test, if it is
/// there and newer than its sources.
fn cli_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe
        .parent()?
        .parent()?
        .join(format!("keygate{}", std::env::consts::EXE_SUFFIX));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../keygate-cli/src");
    let newest = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match std::fs::metadata(&bin).and_then(|m| m.modified()) {
        Ok(t) if t >= newest => Some(bin),
        Ok(_) => {
            println!(
                "SKIPPED: {} is older than its sources (rebuild it)",
                bin.display()
            );
            None
        }
        Err(_) => {
            println!(
                "SKIPPED: {} is not built (cargo build -p keygate-cli)",
                bin.display()
            );
            None
        }
    }
}

/// Runs the CLI on the showcase's database; its stdout parsed as JSON.
async fn cli(bin: &Path, dir: &Path, args: &[&str]) -> serde_json::Value {
    let db = format!("sqlite://{}", dir.join("keygate.db").display());
    let out = Command::new(bin)
        .arg("--database-url")
        .arg(&db)
        .args(args)
        .arg("--json")
        .env_remove("KEYGATE_DATABASE_URL")
        .output()
        .await
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "keygate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Polls `key`'s search until it answers `want`; how long that took.
async fn until_status(addr: std::net::SocketAddr, key: &str, want: StatusCode) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let r = call(addr, "GET", "/collections/docs", Some(key), None).await;
        if r.status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still {} after 5 s",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(unix)]
#[tokio::test]
async fn keys_from_the_cli_work_in_the_running_showcase() {
    let (Some(bin), Some(keygate)) = (binary(), cli_binary()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(&bin, dir.path()).await;
    let admin = server.admin_key.clone().expect("admin key");
    let addr = server.addr;
    let r = call(
        addr,
        "PUT",
        "/collections/docs",
        Some(&admin),
        Some(&json!({"vectors": {"size": 2, "distance": "Cosine"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // A key created by the CLI, in another process, works at once.
    let created = cli(
        &keygate,
        dir.path(),
        &[
            "keys",
            "create",
            "--name",
            "cli-reader",
            "--scope",
            "collections:read",
            "--collection",
            "docs*",
        ],
    )
    .await;
    let (id, key) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    until_status(addr, &key, StatusCode::OK).await;
    let r = call(addr, "DELETE", "/collections/docs", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "read-only key");
    // The showcase registered its routes' scopes at start-up: the CLI refuses a typo.
    let typo = Command::new(&keygate)
        .arg("--database-url")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("keygate.db").display()
        ))
        .args(["keys", "create", "--name", "typo", "--scope", "points:raed"])
        .output()
        .await
        .expect("run the CLI");
    assert_eq!(typo.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&typo.stderr),
        "keygate: unknown scope \"points:raed\" (did you mean `points:read`?); pass \
         --allow-unknown-scope to grant it anyway\n"
    );

    // Rotation: the new key works; the old one keeps working during the grace period.
    let rotated = cli(
        &keygate,
        dir.path(),
        &["keys", "rotate", &id, "--grace", "1h"],
    )
    .await;
    let new_id = rotated["id"].as_str().unwrap().to_owned();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id);
    until_status(addr, &new_key, StatusCode::OK).await;
    let r = call(addr, "GET", "/collections/docs", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK, "old key within its grace period");

    // Revocation from the CLI reaches the running server within the SQLite bound (1 s).
    cli(&keygate, dir.path(), &["keys", "revoke", &new_id]).await;
    let took = until_status(addr, &new_key, StatusCode::UNAUTHORIZED).await;
    println!("CLI revocation reached the running showcase in {took:?} (SQLite, bound 1 s)");
    assert!(took < Duration::from_secs(1), "{took:?}");
    server.terminate().await;

    // The audit log the server wrote passes the CLI's verification.
    let files: Vec<String> = keygate::core::audit::log_files(dir.path(), "keygate-audit")
        .unwrap()
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    assert!(!files.is_empty());
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(String::as_str));
    let report = cli(&keygate, dir.path(), &args).await;
    assert_eq!(report["ok"], true, "{report}");
    // At least: the admin key's issue, the collection, the first read, the refused delete,
    // the new key's read, the old key's read, the revoked key's refusal (more when a poll
    // came before a change arrived).
    assert!(report["lines"].as_u64().unwrap() >= 7, "{report}");
}

/// Splits a command line printed for a POSIX shell into words (plain words and
/// single-quoted ones, as the showcase and the README print them).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quotes in {line:?}");
    if any {
        words.push(word);
    }
    words
}

/// Runs the CLI in `dir` with exactly `args` (no database URL added: the default
/// `sqlite://keygate.db` there); its stdout parsed as JSON.
async fn cli_in(bin: &Path, dir: &Path, args: &[String]) -> serde_json::Value {
    let out = Command::new(bin)
        .args(args)
        .arg("--json")
        .current_dir(dir)
        .env_remove("KEYGATE_DATABASE_URL")
        .output()
        .await
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "keygate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[tokio::test]
async fn a_busy_port_is_named_and_nothing_is_created() {
    let Some(bin) = binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(&bin)
        .args(["--listen", &addr, "--audit-log", "logs/"])
        .current_dir(dir.path())
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_REDIS_URL")
        .output()
        .await
        .expect("run the example");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: cannot listen on {addr}: address in use\n")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // Neither the key database nor the audit folder was created.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    drop(busy);

    // A host that does not resolve: the same one line, exit 1.
    let out = Command::new(&bin)
        .args(["--listen", "no-such-host.invalid:6333"])
        .current_dir(dir.path())
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_REDIS_URL")
        .output()
        .await
        .expect("run the example");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot listen on no-such-host.invalid:6333: ")
            && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[cfg(unix)]
#[tokio::test]
async fn host_names_log_directories_plain_logs_and_a_way_to_a_new_admin_key() {
    let (Some(bin), Some(keygate)) = (binary(), cli_binary()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr.txt");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let server = start_full(
        &bin,
        dir.path(),
        &["--listen", "localhost:0", "--audit-log", "logs/"],
        &[],
        Stdio::from(stderr),
    )
    .await;
    let addr = server.addr;
    assert!(addr.ip().is_loopback(), "{addr}");
    assert!(
        server
            .started
            .iter()
            .any(|l| l == "audit log: logs/keygate-audit-NNNNNN.jsonl"),
        "{:?}",
        server.started
    );

    // The startup output says how to make another admin key; that command works.
    let line = server
        .started
        .iter()
        .find_map(|l| l.strip_prefix("another admin key (if this one is lost): "))
        .expect("the line on a new admin key")
        .to_owned();
    let words = shell_words(&line);
    assert_eq!(words[0], "keygate", "{line}");
    let created = cli_in(&keygate, dir.path(), &words[1..]).await;
    let second_admin = created["key"].as_str().expect("key").to_owned();
    let r = call(addr, "GET", "/admin/keys", Some(&second_admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(
        addr,
        "PUT",
        "/collections/anything",
        Some(&second_admin),
        Some(&json!({"vectors": {"size": 2, "distance": "Dot"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // A key record with an invalid rate limit (written behind the CLI's back) makes the
    // server log a warning: stderr is a file here, so it must hold no colour codes.
    let store = keygate::sql::SqlStore::open(&format!(
        "sqlite://{}",
        dir.path().join("keygate.db").display()
    ))
    .await
    .unwrap();
    let (bad_key, mut record) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        &keygate::KeyHasher::new(),
        "bad-rate",
        SystemTime::now(),
    )
    .unwrap();
    record.scopes = vec!["*".into()];
    record.resources = vec!["*".into()];
    record.rate_limits = vec![keygate::RateLimitPolicy::per_second("broken", 0)];
    keygate::KeyStore::insert(&store, &record).await.unwrap();
    store.close().await;
    let r = call(
        addr,
        "GET",
        "/collections",
        Some(bad_key.expose_secret()),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        r.text
    );
    server.terminate().await;
    let logged = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        logged.contains("invalid rate-limit policy on a key record"),
        "{logged}"
    );
    assert!(
        !logged.contains('\u{1b}'),
        "colour codes in a file: {logged:?}"
    );

    // `--audit-log logs/` wrote its files in logs/, not logs-000001.jsonl beside it.
    let files = keygate::core::audit::log_files(dir.path().join("logs"), "keygate-audit").unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(!dir.path().join("logs-000001.jsonl").exists());
    // Keyed with the secret the server made beside its log (in logs/).
    let options = VerifyOptions {
        key: ChainKey::from_file(dir.path().join("logs").join("keygate-audit.key")).unwrap(),
        ..VerifyOptions::default()
    };
    let report = verify_dir(dir.path().join("logs"), "keygate-audit", &options);
    assert!(report.is_ok(), "{report:?}");
}

/// The README's CLI example, word for word (the line holding `keygate-cli -- keys create`).
fn readme_cli_example() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.contains("cargo run -p keygate-cli -- keys create"))
        .expect("the README's CLI example");
    let start = line.find("cargo run").unwrap();
    let command = &line[start..];
    let end = command
        .find('`')
        .expect("the example ends with a backquote");
    let words = shell_words(&command[..end]);
    let after = words
        .iter()
        .position(|w| w == "--")
        .expect("cargo run ... --");
    words[after + 1..].to_vec()
}

#[cfg(unix)]
#[tokio::test]
async fn the_readme_cli_example_makes_a_key_that_works_in_the_showcase() {
    let (Some(bin), Some(keygate)) = (binary(), cli_binary()) else {
        return;
    };
    let args = readme_cli_example();
    assert_eq!(args[..2], ["keys", "create"], "{args:?}");
    let dir = tempfile::tempdir().unwrap();
    let server = start(&bin, dir.path()).await;
    let admin = server.admin_key.clone().expect("admin key");
    let addr = server.addr;
    let r = call(
        addr,
        "PUT",
        "/collections/docs-2026",
        Some(&admin),
        Some(&json!({"vectors": {"size": 2, "distance": "Cosine"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = call(
        addr,
        "PUT",
        "/collections/docs-2026/points",
        Some(&admin),
        Some(
            &json!({"points": [{"id": 1, "vector": [1.0, 0.0]}, {"id": 2, "vector": [0.0, 1.0]}]}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Exactly the README's command, run where the showcase keeps its keys.
    let created = cli_in(&keygate, dir.path(), &args).await;
    let key = created["key"].as_str().expect("key").to_owned();
    let r = call(
        addr,
        "POST",
        "/collections/docs-2026/points/search",
        Some(&key),
        Some(&json!({"vector": [1.0, 0.1], "limit": 1})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["result"][0]["id"], 1);
    server.terminate().await;
}

/// Runs the showcase in `dir` with `env` until it is ready (`Ok(admin key)`) or exits
/// (`Err(stderr)`).
async fn start_or_fail(
    bin: &Path,
    dir: &Path,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<(Child, String), String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_PEPPER")
        .env_remove("KEYGATE_PEPPER_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the example");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut admin = String::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = out.next_line().await {
            if let Some(f) = line
                .strip_prefix("admin key written to ")
                .and_then(|l| l.strip_suffix(" (owner-only)"))
            {
                admin = std::fs::read_to_string(dir.join(f))
                    .expect("the admin key file")
                    .trim_end()
                    .to_owned();
            }
            if line == "ready" {
                return true;
            }
        }
        false
    })
    .await
    .expect("ready or exited within 60 s");
    if ready {
        return Ok((child, admin));
    }
    let out = child.wait_with_output().await.expect("wait");
    assert!(!out.status.success(), "exited without being ready");
    Err(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the example to completion (it is expected to exit by itself) with `args` and `env`
/// in `dir`: exit success, stdout, stderr.
async fn run_to_exit(
    bin: &Path,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_DATABASE_URL_FILE")
        .env_remove("KEYGATE_REDIS_URL")
        .env_remove("KEYGATE_REDIS_URL_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the example exits within 60 s")
        .expect("run the example");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[tokio::test]
async fn the_showcase_refuses_a_pepper_other_than_the_databases() {
    use std::os::unix::fs::PermissionsExt;
    let Some(bin) = binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pepper");
    std::fs::write(&file, "the-right-pepper\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // First start: the pepper from the file; its fingerprint is recorded.
    let (child, admin) = start_or_fail(
        &bin,
        dir.path(),
        &[("KEYGATE_PEPPER_FILE", file.as_os_str())],
    )
    .await
    .expect("starts");
    assert!(!admin.is_empty());
    drop(child);
    // The same pepper given directly: it starts.
    let (child, _) = start_or_fail(
        &bin,
        dir.path(),
        &[("KEYGATE_PEPPER", std::ffi::OsStr::new("the-right-pepper"))],
    )
    .await
    .expect("starts with the same pepper");
    drop(child);
    // A typo, or none, is refused before serving, saying what to do.
    for (env, says) in [
        (
            vec![("KEYGATE_PEPPER", std::ffi::OsStr::new("the-rihgt-pepper"))],
            "fingerprint differs",
        ),
        (vec![], "none was given"),
    ] {
        let stderr = start_or_fail(&bin, dir.path(), &env)
            .await
            .expect_err("refused");
        assert!(
            stderr.contains(says) && stderr.contains("KEYGATE_PEPPER_FILE"),
            "{stderr}"
        );
        assert!(!stderr.contains("rihgt"), "{stderr}");
    }
    // A pepper file others can read is refused.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = start_or_fail(
        &bin,
        dir.path(),
        &[("KEYGATE_PEPPER_FILE", file.as_os_str())],
    )
    .await
    .expect_err("refused");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[tokio::test]
async fn the_admin_key_goes_to_an_owner_only_file_never_overwritten() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keygate-admin.key"), "old\n").unwrap();
    let (ok, stdout, stderr) =
        run_to_exit(&bin, dir.path(), &["--listen", "127.0.0.1:0"], &[]).await;
    assert!(!ok, "started although the key file exists: {stdout}");
    assert!(
        stderr.contains("keygate-admin.key already exists: refusing to overwrite it"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keygate-admin.key")).unwrap(),
        "old\n"
    );
    // No key was issued: the next start (with another file) issues the first one.
    let server = start_with(
        &bin,
        dir.path(),
        &["--admin-key-file", "elsewhere.key"],
        &[],
    )
    .await;
    let admin = server
        .admin_key
        .clone()
        .expect("an admin key in elsewhere.key");
    let r = call(server.addr, "GET", "/collections", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    server.terminate().await;
}

#[cfg(unix)]
#[tokio::test]
async fn urls_are_hidden_from_help_and_errors_and_can_come_from_files() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let secret_env = [
        (
            "KEYGATE_DATABASE_URL",
            "postgres://app:s3cretpw@127.0.0.1:1/db?sslpassword=s3cretpw",
        ),
        ("KEYGATE_REDIS_URL", "redis://:s3cretpw@127.0.0.1:1"),
    ];
    let (ok, help, _) = run_to_exit(&bin, dir.path(), &["--help"], &secret_env).await;
    assert!(ok);
    assert!(!help.contains("s3cretpw"), "{help}");
    assert!(
        help.contains("KEYGATE_DATABASE_URL_FILE") && help.contains("KEYGATE_REDIS_URL_FILE"),
        "{help}"
    );
    assert!(
        help.contains("belongs in the environment or in a file"),
        "{help}"
    );

    // A database that cannot be opened: the error names it without its password.
    let (ok, stdout, stderr) = run_to_exit(
        &bin,
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &secret_env[..1],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("cannot open the key database"), "{stderr}");
    assert!(
        !stderr.contains("s3cretpw") && !stdout.contains("s3cretpw"),
        "{stdout}{stderr}"
    );

    // The URL from a file (the way to keep a password off the command line): owner-only.
    let url_file = dir.path().join("db.url");
    std::fs::write(&url_file, "sqlite://from-file.db\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (ok, _, stderr) = run_to_exit(
            &bin,
            dir.path(),
            &["--listen", "127.0.0.1:0"],
            &[("KEYGATE_DATABASE_URL_FILE", url_file.to_str().unwrap())],
        )
        .await;
        assert!(!ok, "a world-readable URL file was used");
        assert!(
            stderr.contains("can be read by every user (mode 644)") && stderr.contains("chmod 600"),
            "{stderr}"
        );
        assert!(!dir.path().join("from-file.db").exists());
        std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let server = start_with(
        &bin,
        dir.path(),
        &[],
        &[("KEYGATE_DATABASE_URL_FILE", url_file.to_str().unwrap())],
    )
    .await;
    assert!(server.admin_key.is_some());
    assert!(dir.path().join("from-file.db").exists());
    assert!(!dir.path().join("keygate.db").exists());
    server.terminate().await;
}

#[cfg(unix)]
#[tokio::test]
async fn passwords_are_refused_on_the_command_line_and_created_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    for args in [
        ["--database-url", "postgres://app:s3cretpw@127.0.0.1:1/db"],
        ["--redis-url", "redis://:s3cretpw@127.0.0.1:1"],
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend(args);
        let (ok, stdout, stderr) = run_to_exit(&bin, dir.path(), &all, &[]).await;
        assert!(!ok, "started with a password in {args:?}");
        assert!(
            stderr.contains("carries a password on the command line") && stderr.contains("_FILE"),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cretpw") && !stdout.contains("s3cretpw"));
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing created"
        );
    }
    // Without a password the flag is fine; everything the showcase creates is owner-only.
    let server = start_with(
        &bin,
        dir.path(),
        &["--database-url", "sqlite://keys.db"],
        &[],
    )
    .await;
    assert!(server.admin_key.is_some());
    let rest = server.terminate().await;
    assert!(written(&rest) > 0);
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    for name in [
        "keys.db",
        "keygate-audit-000001.jsonl",
        "keygate-audit.checkpoint",
        "keygate-audit.key",
        "keygate-admin.key",
    ] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
}

/// A client config trusting exactly `roots`.
fn tls_client(roots: &[&rustls::pki_types::CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// `GET /collections` with `key` over a new HTTPS connection: the status and the
/// certificate the server presented.
async fn https_get(
    tls: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    key: &str,
) -> (StatusCode, rustls::pki_types::CertificateDer<'static>) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tls.connect(name, tcp).await.expect("TLS handshake");
    let cert = stream.get_ref().1.peer_certificates().expect("certs")[0]
        .clone()
        .into_owned();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/collections")
        .header("host", "localhost")
        .header("api-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status();
    res.into_body().collect().await.expect("body");
    (status, cert)
}

#[cfg(unix)]
#[tokio::test]
async fn https_from_pem_files_reloaded_on_sighup() {
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (
            c.cert.pem(),
            c.key_pair.serialize_pem(),
            c.cert.der().clone(),
        )
    };
    let (a_pem, a_key, a_der) = make();
    let (b_pem, b_key, b_der) = make();
    std::fs::write(dir.path().join("cert.pem"), &a_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &a_key).unwrap();
    let mut child = Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ])
        .current_dir(dir.path())
        .env_remove("KEYGATE_DATABASE_URL")
        .env_remove("KEYGATE_DATABASE_URL_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut addr = None;
    let mut fingerprint = None;
    let ready = async {
        while let Some(line) = out.next_line().await.expect("stdout") {
            if let Some(a) = line.strip_prefix("keygate vector_db listening on https://") {
                addr = Some(a.parse::<std::net::SocketAddr>().expect("address"));
            }
            if let Some(f) = line.strip_prefix("TLS certificate SHA-256 fingerprint: ") {
                fingerprint = Some(f.to_owned());
            }
            if line == "ready" {
                return;
            }
        }
        panic!("exited before ready");
    };
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .expect("ready within 60 s");
    let addr = addr.expect("an https address");
    use keygate_showcase::tls::fingerprint as fp;
    assert_eq!(fingerprint.as_deref(), Some(fp(&a_der).as_str()));
    let admin = std::fs::read_to_string(dir.path().join("keygate-admin.key")).unwrap();
    let client = tls_client(&[&a_der, &b_der]);
    let (status, cert) = https_get(&client, addr, admin.trim_end()).await;
    assert_eq!((status, &cert), (StatusCode::OK, &a_der));

    // New files, then SIGHUP: the process says so, and new connections get the new one.
    std::fs::write(dir.path().join("cert.pem"), &b_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &b_key).unwrap();
    let pid = child.id().expect("running").to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let reloaded = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = out.next_line().await.expect("stdout") {
            if let Some(f) = line.strip_prefix("TLS certificate reloaded; SHA-256 fingerprint: ") {
                return f.to_owned();
            }
        }
        panic!("exited instead of reloading");
    })
    .await
    .expect("reloaded within 30 s");
    assert_eq!(reloaded, fp(&b_der));
    let (status, cert) = https_get(&client, addr, admin.trim_end()).await;
    assert_eq!((status, &cert), (StatusCode::OK, &b_der));
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success());
}

/// Last-used times are written behind the request path: with a flush interval longer than
/// the test, requests leave the database untouched, and the graceful shutdown writes them.
#[cfg(unix)]
#[tokio::test]
async fn last_used_times_are_flushed_at_shutdown_not_per_request() {
    use keygate::KeyStore as _;
    let Some(bin) = binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(&bin, dir.path(), &["--last-used-every", "86400"], &[]).await;
    let admin = server.admin_key.clone().expect("an admin key");
    for _ in 0..3 {
        let r = call(server.addr, "GET", "/collections", Some(&admin), None).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let last_used = || async {
        let store = keygate::sql::SqlStore::open(&url).await.expect("open");
        let keys = store.list(&Default::default()).await.expect("list");
        store.close().await;
        keys.iter()
            .find(|k| k.name == "admin")
            .expect("the admin key")
            .last_used_at
    };
    assert_eq!(last_used().await, None, "no write per request");
    let before = SystemTime::now();
    let rest = server.terminate().await;
    assert!(
        rest.iter().any(|l| l.contains("last-used times")),
        "{rest:?}"
    );
    let at = last_used().await.expect("written at shutdown");
    // To the minute: at most a minute before now.
    assert!(at <= SystemTime::now());
    assert!(before.duration_since(at).unwrap_or_default() < Duration::from_secs(61));
}
