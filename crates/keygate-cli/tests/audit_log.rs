//! `keygate audit verify` and `keygate audit tail` over hash-chained logs written by
//! keygate-core's `FileSink`, and `--audit-dir`, which sends the CLI's own key changes to
//! such a log.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use keygate_core::audit::{log_files, AuditEvent, AuditSink, Auditor, FileSink, RequestEvent};

/// Writes `n` request events (`r{from}`..) into the log in `dir` (a new file per call,
/// continuing the chain; a new file every `rotate` bytes).
async fn write_events(dir: &Path, from: usize, n: usize, rotate: Option<u64>) {
    let mut b = FileSink::builder(dir);
    if let Some(bytes) = rotate {
        b = b.rotate_bytes(bytes);
    }
    let auditor = Auditor::spawn(b.open().unwrap()).unwrap();
    for i in from..from + n {
        let mut e = RequestEvent::new(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i as u64),
            format!("r{i}"),
            "GET",
            format!("/collections/c{i}"),
        );
        e.status = Some(200);
        auditor.record(e.into()).await.unwrap();
    }
    assert_eq!(auditor.shutdown().await.written, n as u64);
}

fn files(dir: &Path) -> Vec<PathBuf> {
    log_files(dir, "audit").unwrap()
}

fn ids(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            let e: AuditEvent = serde_json::from_str(l).expect("a JSON event per line");
            e.as_request().unwrap().request_id.to_string()
        })
        .collect()
}

#[tokio::test]
async fn verify_accepts_a_good_log_and_names_the_first_broken_line() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("log");
    write_events(&dir, 0, 5, None).await;
    write_events(&dir, 5, 5, None).await;
    let f = files(&dir);
    assert_eq!(f.len(), 2);
    let (f1, f2) = (f[0].to_str().unwrap(), f[1].to_str().unwrap());

    // Files in order, or the directory.
    let out = env.run(&["audit", "verify", f1, f2]).ok().stdout.clone();
    assert!(
        out.starts_with("ok: 10 lines in 2 file(s), last seq 10 hash "),
        "{out}"
    );
    let out = env
        .run(&["audit", "verify", dir.to_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(out["ok"], true);
    assert_eq!(out["lines"], 10);
    assert_eq!(out["files"], 2);
    assert_eq!(out["last"]["seq"], 10);
    let last_hash = out["last"]["hash"].as_str().unwrap().to_owned();
    // An anchor kept elsewhere.
    env.run(&[
        "audit",
        "verify",
        f1,
        f2,
        "--end",
        &format!("10:{last_hash}"),
    ])
    .ok();
    // The second file alone fails (it continues a chain), unless started at its anchor.
    let alone = env.run(&["audit", "verify", f2]);
    alone.fails(1);
    assert!(alone.stderr.contains("line 1"), "{alone:?}");
    // Out of order.
    let swapped = env.run(&["audit", "verify", f2, f1]);
    swapped.fails(1);

    // Tamper with line 3 of the second file: named, with exit 1.
    let text = std::fs::read_to_string(&f[1]).unwrap();
    let tampered: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                l.replace("\"/collections/c7\"", "\"/collections/cX\"")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert_ne!(tampered.join("\n") + "\n", text, "the edit applies");
    std::fs::write(&f[1], tampered.join("\n") + "\n").unwrap();
    let out = env.run(&["audit", "verify", f1, f2]);
    out.fails(1);
    assert!(
        out.stderr
            .contains(&format!("{f2}: line 3: hash does not match")),
        "{:?}",
        out.stderr
    );
    // The same as JSON: the report on stdout, the line on stderr.
    let out = env.run(&["audit", "verify", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.lines().count(), 1);
    let report = out.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["file"], f2);
    assert_eq!(report["line"], 3);
    assert_eq!(report["seq"], 8);

    // A removed line: the sequence gap names the line after it.
    std::fs::write(
        &f[1],
        text.lines()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = env.run(&["audit", "verify", f1, f2]);
    out.fails(1);
    assert!(
        out.stderr.contains("line 2: sequence gap"),
        "{:?}",
        out.stderr
    );

    // Bad arguments.
    env.run(&["audit", "verify"]).fails(2);
    env.run(&["audit", "verify", "/no/such/file"]).fails(1);
    env.run(&["audit", "verify", f1, "--end", "10:xyz"])
        .fails(2);
    let empty = env.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = env.run(&["audit", "verify", empty.to_str().unwrap()]);
    out.fails(1);
    assert!(out.stderr.contains("no audit log files"), "{out:?}");
}

#[tokio::test]
async fn tail_prints_the_last_events_readable_or_as_json() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("log");
    write_events(&dir, 0, 30, Some(2_000)).await;
    assert!(files(&dir).len() > 2, "rotated into several files");
    let d = dir.to_str().unwrap();

    let out = env.run(&["audit", "tail", d, "--json"]).ok().stdout.clone();
    let expected: Vec<String> = (20..30).map(|i| format!("r{i}")).collect();
    assert_eq!(ids(&out), expected, "the last 10 by default, across files");
    let out = env
        .run(&["audit", "tail", d, "-n", "3", "--json"])
        .ok()
        .stdout
        .clone();
    assert_eq!(ids(&out), ["r27", "r28", "r29"]);
    let out = env
        .run(&["audit", "tail", d, "--all", "--json"])
        .ok()
        .stdout
        .clone();
    assert_eq!(ids(&out).len(), 30);
    let last_file = files(&dir).pop().unwrap();
    let out = env
        .run(&["audit", "tail", last_file.to_str().unwrap(), "-n", "1"])
        .ok()
        .stdout
        .clone();
    assert_eq!(out.lines().count(), 1);
    assert!(
        out.contains("#30  request    GET /collections/c29 -> 200 allowed"),
        "{out}"
    );
    assert!(out.starts_with("2027-01-15T08:00:29.000Z"), "{out}");

    // A line that is not an event is skipped with a warning.
    std::fs::write(env.dir.path().join("odd.jsonl"), "not json\n").unwrap();
    let out = env.run(&["audit", "tail", "odd.jsonl"]);
    out.ok();
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("line 1 is not an audit event"),
        "{out:?}"
    );
    env.run(&["audit", "tail", "/no/such/file"]).fails(1);
    env.run(&["audit", "tail", d, "-n", "x"]).fails(2);
}

/// `--follow` keeps printing what is appended, into new files of a directory's log too;
/// the test reads the child's output with a deadline, then stops it.
#[tokio::test]
async fn tail_follows_appends_and_new_files() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("log");
    write_events(&dir, 0, 3, None).await;
    let mut child = env
        .cmd()
        .args([
            "audit",
            "tail",
            dir.to_str().unwrap(),
            "--follow",
            "--interval",
            "20ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let expect = |n: usize, seen: &mut Vec<String>| {
        while seen.len() < n {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no event within 10 s; seen {seen:?}"));
            seen.extend(ids(&line));
        }
    };
    expect(3, &mut seen);
    // Each `write_events` opens a new file: the follower moves on to it.
    write_events(&dir, 3, 4, None).await;
    expect(7, &mut seen);
    write_events(&dir, 7, 20, Some(1_500)).await;
    expect(27, &mut seen);
    let expected: Vec<String> = (0..27).map(|i| format!("r{i}")).collect();
    assert_eq!(seen, expected, "every event once, in order");
    assert!(child.try_wait().unwrap().is_none(), "still following");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `--audit-dir`: the CLI's key changes also go to a hash-chained log that verifies and
/// tails, and holds no key.
#[tokio::test]
async fn cli_changes_go_to_the_audit_dir_too() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("cli-log");
    let d = dir.to_str().unwrap();
    let created = env
        .run(&[
            "--audit-dir",
            d,
            "keys",
            "create",
            "--name",
            "logged",
            "--json",
        ])
        .ok()
        .json();
    let id = created["id"].as_str().unwrap();
    env.run(&["--audit-dir", d, "keys", "revoke", id]).ok();
    env.run(&["audit", "verify", d]).ok();
    let out = env.run(&["audit", "tail", d, "--json"]).ok().stdout.clone();
    let actions: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let e: AuditEvent = serde_json::from_str(l).unwrap();
            let l = e.as_lifecycle().unwrap();
            (l.action.as_str().to_owned(), l.key_id.to_string())
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("issued".into(), id.to_owned()),
            ("revoked".into(), id.to_owned())
        ]
    );
    for f in log_files(&dir, "keygate-audit").unwrap() {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            !text.contains(created["key"].as_str().unwrap()),
            "no key in the log"
        );
    }
    // The database table has them as well.
    let out = env.run(&["audit", "events", "--json"]).ok().json();
    assert_eq!(out.as_array().unwrap().len(), 2);
}

/// Writes `n` request events into the log `stem` in `dir` with the public key.
fn write_stem(dir: &Path, stem: &str, n: usize) {
    let sink = FileSink::builder(dir).stem(stem).open().unwrap();
    for i in 0..n {
        let e = RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/collections");
        sink.record(&e.into()).unwrap();
    }
    sink.sync().unwrap();
}

/// `keygate audit verify .` in the showcase's folder finds its `keygate-audit-*` files and
/// checks them against their checkpoint: lines cut off the end fail, naming the first
/// missing line; so does an emptied file.
#[tokio::test]
async fn verify_finds_the_showcase_log_in_a_folder_and_catches_a_cut() {
    let env = Env::sqlite();
    let dir = env.dir.path();
    write_stem(dir, "keygate-audit", 6);
    let out = env.run(&["audit", "verify", "."]);
    out.ok();
    assert!(
        out.stdout.starts_with("ok: 6 lines in 1 file(s)"),
        "{out:?}"
    );
    assert!(out.stderr.contains("public default chain key"), "{out:?}");
    env.run(&["audit", "tail", "."]).ok();

    let file = dir.join("keygate-audit-000001.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let kept: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, kept).unwrap();
    let out = env.run(&["audit", "verify", "."]);
    out.fails(1);
    assert!(
        out.stderr.contains("keygate-audit-000001.jsonl: line 5: missing: the log ends at seq 4 but its checkpoint says seq 6"),
        "{out:?}"
    );
    // The files named one by one are checked against the checkpoint too.
    env.run(&["audit", "verify", "keygate-audit-000001.jsonl"])
        .fails(1);
    std::fs::write(&file, "").unwrap();
    let out = env.run(&["audit", "verify", "."]);
    out.fails(1);
    assert!(out.stderr.contains("line 1: missing"), "{out:?}");
    // Without the checkpoint, verification refuses to vouch for the log...
    std::fs::remove_file(dir.join("keygate-audit.checkpoint")).unwrap();
    let out = env.run(&["audit", "verify", "."]);
    out.fails(1);
    assert!(out.stderr.contains("no checkpoint"), "{out:?}");
    // ...unless told to.
    env.run(&["audit", "verify", ".", "--no-checkpoint"]).ok();
}

/// A log rewritten with the public key fails when verified with the secret key it was
/// written with (from the environment or from the key file beside the log).
#[tokio::test]
async fn verify_uses_the_secret_key_and_catches_a_rewrite() {
    let env = Env::sqlite();
    let dir = env.dir.path();
    // The CLI makes the log (and its key file) in the folder of the database.
    env.run(&["--audit-dir", ".", "keys", "create", "--name", "a"])
        .ok();
    assert!(dir.join("keygate-audit.key").exists());
    let out = env.run(&["audit", "verify", "."]);
    out.ok();
    assert!(
        out.stderr.contains("keygate-audit.key beside the log"),
        "{out:?}"
    );
    // Rewritten with the public key (checkpoint included).
    for f in log_files(dir, "keygate-audit").unwrap() {
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_file(dir.join("keygate-audit.checkpoint")).unwrap();
    write_stem(dir, "keygate-audit", 1);
    let out = env.run(&["audit", "verify", "."]);
    out.fails(1);
    assert!(
        out.stderr
            .contains("keygate-audit-000001.jsonl: line 1: hash does not match"),
        "{out:?}"
    );
    // The same with the key given in the environment (the file beside the log removed).
    let secret = std::fs::read_to_string(dir.join("keygate-audit.key")).unwrap();
    std::fs::remove_file(dir.join("keygate-audit.key")).unwrap();
    let out = Out::from(
        env.cmd()
            .env("KEYGATE_AUDIT_KEY", secret.trim())
            .args(["audit", "verify", "."])
            .output()
            .unwrap(),
    );
    out.fails(1);
    assert!(
        !out.stderr.contains(secret.trim()),
        "the key is never printed"
    );
}

/// Six CLI processes creating keys at once into one log: each waits for the log's lock,
/// every key has its `issued` line, the chain verifies, and every process exits 0.
#[tokio::test]
async fn parallel_cli_runs_keep_one_verifiable_chain() {
    let env = Env::sqlite();
    // The database first (its creation is not what is tested here).
    let first = env
        .run(&[
            "--audit-dir",
            "log",
            "keys",
            "create",
            "--name",
            "k0",
            "--json",
        ])
        .ok()
        .json();
    let mut ids = vec![first["id"].as_str().unwrap().to_owned()];
    let children: Vec<_> = (1..=6)
        .map(|i| {
            env.cmd()
                .args([
                    "--audit-dir",
                    "log",
                    "keys",
                    "create",
                    "--name",
                    &format!("k{i}"),
                    "--json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = Out::from(c.wait_with_output().unwrap());
        let id = out.ok().json()["id"].as_str().unwrap().to_owned();
        ids.push(id);
    }
    let dir = env.dir.path().join("log");
    let out = env.run(&["audit", "verify", "log"]);
    out.ok();
    assert!(out.stdout.starts_with("ok: 7 lines"), "{out:?}");
    let mut logged: Vec<String> = log_files(&dir, "keygate-audit")
        .unwrap()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert_eq!(v["event"]["action"], "issued");
                    v["event"]["key_id"].as_str().unwrap().to_owned()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    logged.sort();
    ids.sort();
    assert_eq!(logged, ids);
}

/// With a SQLite database beside the showcase's log, the CLI writes its key changes into
/// that log without being told; a log it must not continue (cut) makes the change fail
/// with exit 1 and no key made.
#[tokio::test]
async fn cli_changes_join_the_servers_log_and_fail_when_it_cannot_be_written() {
    let env = Env::sqlite();
    let dir = env.dir.path();
    env.run(&["keys", "create", "--name", "before"]).ok();
    // No log there yet: nothing written to a file.
    assert!(log_files(dir, "keygate-audit").unwrap().is_empty());
    // The server's log (as the showcase keeps it, with its key file).
    let (key, _) =
        keygate_core::audit::ChainKey::load_or_create(dir.join("keygate-audit.key")).unwrap();
    let sink = FileSink::builder(dir)
        .stem("keygate-audit")
        .key(key)
        .open()
        .unwrap();
    for i in 0..3 {
        sink.record(&RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into())
            .unwrap();
    }
    sink.sync().unwrap();
    drop(sink);
    let made = env
        .run(&["keys", "create", "--name", "joined", "--json"])
        .ok()
        .json();
    let out = env
        .run(&["audit", "tail", ".", "--json"])
        .ok()
        .stdout
        .clone();
    let last: AuditEvent = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        last.as_lifecycle().unwrap().key_id.as_str(),
        made["id"].as_str().unwrap()
    );
    let out = env.run(&["audit", "verify", "."]);
    out.ok();
    assert!(out.stdout.starts_with("ok: 4 lines"), "{out:?}");

    // The CLI continued the server's file rather than leave a one-line file of its own.
    let files = log_files(dir, "keygate-audit").unwrap();
    assert_eq!(
        files.len(),
        1,
        "the CLI continues the newest file: {files:?}"
    );

    // Cut the log's last line (the CLI's): the next change is refused before anything is
    // changed.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let kept: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&files[0], kept).unwrap();
    let out = env.run(&["keys", "create", "--name", "refused"]);
    out.fails(1);
    assert!(out.stderr.contains("refusing to continue it"), "{out:?}");
    let list = env.run(&["keys", "list", "--json"]).ok().json();
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "refused"),
        "no key was made: {list}"
    );
}

/// `audit events` reports an unreadable row, prints the others, and exits 1.
#[tokio::test]
async fn audit_events_skips_and_reports_a_corrupt_row() {
    let env = Env::sqlite();
    let made = env
        .run(&["keys", "create", "--name", "a", "--json"])
        .ok()
        .json();
    env.run(&["keys", "revoke", made["id"].as_str().unwrap()])
        .ok();
    {
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&env.url)
            .await
            .unwrap();
        sqlx::query("UPDATE keygate_audit SET event = '{not json' WHERE seq = (SELECT MIN(seq) FROM keygate_audit)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let out = env.run(&["audit", "events", "--json"]);
    assert_eq!(out.code, 1, "{out:?}");
    let events = out.json();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events[0]["event"]["action"], "revoked");
    assert!(
        out.stderr.contains("unreadable") && out.stderr.contains("skipped"),
        "{out:?}"
    );
}

/// Each CLI command records its key change by continuing the newest log file, so a series
/// of commands leaves one file, not one per command; a file ending in a partial line (a
/// crash) is never continued: the next command starts a new file.
#[tokio::test]
async fn cli_commands_continue_one_file_but_not_after_a_partial_line() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("log");
    let d = dir.to_str().unwrap();
    for i in 0..4 {
        env.run(&[
            "--audit-dir",
            d,
            "keys",
            "create",
            "--name",
            &format!("k{i}"),
        ])
        .ok();
    }
    let files = log_files(&dir, "keygate-audit").unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    let out = env.run(&["audit", "verify", d]);
    out.ok();
    assert!(
        out.stdout.starts_with("ok: 4 lines in 1 file(s)"),
        "{out:?}"
    );

    // A crash left half a line after the last complete one.
    let mut text = std::fs::read(&files[0]).unwrap();
    text.extend_from_slice(b"{\"seq\":5,\"prev\":\"");
    std::fs::write(&files[0], &text).unwrap();
    env.run(&["--audit-dir", d, "keys", "create", "--name", "after"])
        .ok();
    let files = log_files(&dir, "keygate-audit").unwrap();
    assert_eq!(files.len(), 2, "a new file after a partial line: {files:?}");
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        text,
        "the damaged file is left as it was"
    );
    let second = std::fs::read_to_string(&files[1]).unwrap();
    assert_eq!(second.lines().count(), 1);
    assert!(second.starts_with("{\"seq\":5,"), "{second}");
}
