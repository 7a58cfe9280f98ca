//! `keygate audit anomalies` over a hash-chained log recorded through an `AnomalySink`: the
//! command raises exactly the signals the live sink recorded, the log still verifies with
//! the signals in it, and bad input gets the documented exit codes.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_core::audit::{
    AnomalyConfig, AnomalyKind, AnomalySink, AuditEvent, Auditor, Decision, FileSink, RequestEvent,
};
use keygate_core::{DenialCode, KeyId};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn event(secs: u64, key: Option<KeyId>, ip: &str, denied: bool) -> AuditEvent {
    let mut e = RequestEvent::new(at(secs), format!("r{secs}"), "GET", "/collections");
    e.key_id = key;
    e.key_name = key.map(|_| "ci".into());
    e.client_ip = Some(ip.parse().unwrap());
    if denied {
        e.decision = Decision::Denied;
        e.denial = Some(DenialCode::InvalidKey);
        e.status = Some(401);
    } else {
        e.status = Some(200);
    }
    e.into()
}

/// Records a day of a key's traffic from one network, then a request from another, and 25
/// invalid keys from one address in 25 seconds, through an `AnomalySink` (the live path,
/// with the CLI's defaults) into a file log.
async fn record(dir: &Path) -> Vec<AuditEvent> {
    let key: KeyId = "3hG7xQ2mPa9Z".parse().unwrap();
    let mut events = Vec::new();
    for h in 0..30 {
        events.push(event(h * 3600, Some(key), "192.0.2.10", false));
    }
    events.push(event(30 * 3600, Some(key), "198.51.100.7", false));
    for s in 0..25 {
        events.push(event(31 * 3600 + s, None, "203.0.113.9", true));
    }
    let sink = AnomalySink::new(
        AnomalyConfig::default(),
        FileSink::builder(dir).open().unwrap(),
    );
    let auditor = Auditor::spawn(sink).unwrap();
    for e in events.clone() {
        auditor.record(e).await.unwrap();
    }
    auditor.shutdown().await;
    events
}

#[tokio::test]
async fn anomalies_replays_a_recorded_log_and_finds_what_the_live_sink_found() {
    let env = Env::sqlite();
    let dir = env.dir.path().join("log");
    record(&dir).await;
    let d = dir.to_str().unwrap();

    // What the live sink wrote into the log.
    let tail = env
        .run(&["audit", "tail", d, "--all", "--json"])
        .ok()
        .stdout
        .clone();
    let live: Vec<AuditEvent> = tail
        .lines()
        .map(|l| serde_json::from_str::<AuditEvent>(l).unwrap())
        .filter(|e| e.as_anomaly().is_some())
        .collect();
    let kinds: Vec<AnomalyKind> = live.iter().map(|e| e.as_anomaly().unwrap().kind).collect();
    assert_eq!(kinds, [AnomalyKind::NewNetwork, AnomalyKind::DenialBurst]);
    // The log, signals included, still verifies.
    env.run(&["audit", "verify", d]).ok();

    // The command finds the same signals, one JSON line each.
    let out = env
        .run(&["audit", "anomalies", d, "--json"])
        .ok()
        .stdout
        .clone();
    let replayed: Vec<AuditEvent> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(replayed, live);
    let first = serde_json::to_value(&replayed[0]).unwrap();
    assert_eq!(first["type"], "anomaly");
    assert_eq!(first["kind"], "new_network");
    assert_eq!(first["key_id"], "3hG7xQ2mPa9Z");
    assert_eq!(first["network"], "198.51.100.0/24");
    let burst = replayed[1].as_anomaly().unwrap();
    assert_eq!(burst.client_ip, Some("203.0.113.9".parse().unwrap()));
    assert_eq!(burst.count, 20);

    // Readable lines, and thresholds from the command line.
    let file = log_files(&dir);
    let out = env.run(&["audit", "anomalies", &file]).ok().stdout.clone();
    assert_eq!(out.lines().count(), 2);
    assert!(out
        .lines()
        .next()
        .unwrap()
        .contains("anomaly    new_network  key=3hG7xQ2mPa9Z"));
    let out = env
        .run(&[
            "audit",
            "anomalies",
            &file,
            "--denials",
            "30",
            "--learning",
            "40d",
        ])
        .ok()
        .stdout
        .clone();
    assert_eq!(out, "", "no burst of 30, and the key still learning");
}

fn log_files(dir: &Path) -> String {
    let files = keygate_core::audit::log_files(dir, "audit").unwrap();
    assert_eq!(files.len(), 1);
    files[0].to_str().unwrap().to_owned()
}

#[test]
fn anomalies_exit_codes() {
    let env = Env::sqlite();
    // A missing file: 1.
    let missing = env.dir.path().join("nope.jsonl");
    env.run(&["audit", "anomalies", missing.to_str().unwrap()])
        .fails(1);
    // A directory without logs: 1.
    env.run(&["audit", "anomalies", env.dir.path().to_str().unwrap()])
        .fails(1);
    // Bad options: 2.
    let file = env.dir.path().join("x.jsonl");
    std::fs::write(&file, "not an event\n").unwrap();
    let f = file.to_str().unwrap();
    env.run(&["audit", "anomalies", f, "--spike-factor", "0.5"])
        .fails(2);
    env.run(&["audit", "anomalies", f, "--denials", "many"])
        .fails(2);
    env.run(&["audit", "anomalies"]).fails(2);
    // Lines that are not events are skipped with a warning.
    let out = env.run(&["audit", "anomalies", f]);
    out.ok();
    assert_eq!(out.stdout, "");
    assert!(out.stderr.contains("line 1 is not an audit event"));
}
