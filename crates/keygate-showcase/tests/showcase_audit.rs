//! The showcase's audit log: a hash-chained JSON Lines file that verifies, holds one event
//! per request and per key change, and never a plaintext key.

mod showcase_support;

use http::StatusCode;
use keygate::core::audit::{
    verify_dir, AuditEvent, Auditor, Decision, FileSink, LifecycleAction, MemorySink, VerifyOptions,
};
use keygate::DenialCode;
use serde_json::{json, Value};
use showcase_support::*;

#[tokio::test]
async fn the_audit_file_verifies_and_holds_no_plaintext_key() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::builder(dir.path())
        .stem("keygate-audit")
        .open()
        .unwrap();
    let auditor = Auditor::spawn(sink).unwrap();
    let w = World::with_auditor(auditor.clone(), MemorySink::new(), |o| o).await;
    let mut requests = 0;
    let mut plaintexts = vec![w.admin.clone()];

    w.collection("docs").await;
    requests += 1;
    let (key, id) = w
        .issue(json!({"name": "ci", "scopes": ["points:*"], "collections": ["docs"]}))
        .await;
    requests += 1;
    plaintexts.push(key.clone());
    let r = w
        .call(
            "PUT",
            "/collections/docs/points",
            Some(&key),
            Some(points(1, 2)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    requests += 1;
    let r = w
        .admin("POST", &format!("/admin/keys/{id}/rotate"), None)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    requests += 1;
    let rotated = r.json["key"].as_str().unwrap().to_owned();
    let rotated_id = r.json["id"].as_str().unwrap().to_owned();
    plaintexts.push(rotated.clone());
    let r = w
        .admin("POST", &format!("/admin/keys/{rotated_id}/revoke"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    requests += 1;
    for k in [&key, &rotated] {
        let r = w
            .call("POST", "/collections/docs/points/count", Some(k), None)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        requests += 1;
    }
    // A key sent in the query string is not read (not enabled) and not logged either.
    let r = w
        .call(
            "GET",
            &format!("/collections?api_key={}", w.admin),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    requests += 1;

    let stats = auditor.shutdown().await;
    assert_eq!((stats.dropped, stats.failed), (0, 0));
    let report = verify_dir(dir.path(), "keygate-audit", &VerifyOptions::default()).unwrap();
    assert_eq!(report.lines, stats.written);
    assert_eq!(report.files, 1);

    let mut text = String::new();
    let mut everything = String::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let content = std::fs::read_to_string(&path).unwrap();
        everything.push_str(&content);
        // The log's lines (beside them: its checkpoint and lock files).
        if path.extension().is_some_and(|e| e == "jsonl") {
            text.push_str(&content);
        }
    }
    for k in &plaintexts {
        let secret = &k["kg_".len() + 12..];
        assert!(
            !everything.contains(secret),
            "a key's secret is in the audit log"
        );
    }

    let events: Vec<AuditEvent> = text
        .lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(line["event"].clone()).unwrap()
        })
        .collect();
    let request_events: Vec<_> = events.iter().filter_map(AuditEvent::as_request).collect();
    assert_eq!(request_events.len(), requests);
    assert!(request_events.iter().all(|r| !r.path.contains('?')));
    let denied: Vec<_> = request_events
        .iter()
        .filter(|r| r.decision == Decision::Denied)
        .map(|r| r.denial)
        .collect();
    assert_eq!(
        denied,
        [
            Some(DenialCode::ExpiredKey),
            Some(DenialCode::RevokedKey),
            Some(DenialCode::MissingKey)
        ]
    );
    let admin_id = &w.admin["kg_".len().."kg_".len() + 12];
    let lifecycle: Vec<_> = events
        .iter()
        .filter_map(AuditEvent::as_lifecycle)
        .filter(|l| l.actor != "setup")
        .map(|l| (l.action, l.actor.clone()))
        .collect();
    let actor = format!("key:{admin_id}");
    assert_eq!(
        lifecycle,
        [
            (LifecycleAction::Issued, actor.clone()),
            (LifecycleAction::Rotated, actor.clone()),
            (LifecycleAction::Issued, actor.clone()),
            (LifecycleAction::Revoked, actor),
        ]
    );
}
