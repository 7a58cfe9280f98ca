//! The tamper-evident JSON Lines sink: the chain across rotations and restarts, and every
//! kind of tampering detected by verification, naming the first broken line.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::core::audit::{
    log_files, verify_dir, verify_files, AuditEvent, AuditSink, Auditor, BrokenChain, ChainKey,
    ChainPoint, FileSink, Problem, RequestEvent, VerifyOptions,
};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keygate-audit-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const T0: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn event(i: u64, at: SystemTime) -> AuditEvent {
    let mut e = RequestEvent::new(at, format!("req-{i}"), "POST", format!("/collections/c{i}"));
    e.status = Some(200);
    e.latency = Duration::from_micros(i);
    e.into()
}

/// Writes `n` events at 2026-01-01 into `dir` with `builder`'s settings.
fn write_log(dir: &Path, n: u64, rotate_bytes: Option<u64>) -> FileSink {
    let mut b = FileSink::builder(dir);
    if let Some(bytes) = rotate_bytes {
        b = b.rotate_bytes(bytes);
    }
    let sink = b.open().unwrap();
    for i in 1..=n {
        sink.record(&event(i, UNIX_EPOCH + Duration::from_secs(T0 + i)))
            .unwrap();
    }
    sink.sync().unwrap();
    sink
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn verify(dir: &Path) -> Result<keygate::core::audit::VerifyReport, BrokenChain> {
    verify_dir(dir, "audit", &VerifyOptions::default())
}

#[test]
fn an_untouched_log_verifies_and_every_line_carries_seq_prev_and_hash() {
    let d = TempDir::new("ok");
    let sink = write_log(d.path(), 10, None);
    let files = log_files(d.path(), "audit").unwrap();
    assert_eq!(files.len(), 1);
    let ls = lines(&files[0]);
    assert_eq!(ls.len(), 10);
    let mut prev = "0".repeat(64);
    for (i, l) in ls.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], i as u64 + 1);
        assert_eq!(v["prev"], prev.as_str());
        assert_eq!(v["event"]["type"], "request");
        prev = v["hash"].as_str().unwrap().to_owned();
        assert_eq!(prev.len(), 64);
        // The event is readable back.
        let _: AuditEvent = serde_json::from_value(v["event"].clone()).unwrap();
    }
    let report = verify(d.path()).unwrap();
    assert_eq!((report.files, report.lines), (1, 10));
    assert_eq!(report.last, sink.head());
    assert_eq!(report.last.unwrap().hash, prev);
}

#[test]
fn an_edited_line_is_named() {
    let d = TempDir::new("edit");
    write_log(d.path(), 10, None);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let mut ls = lines(file);
    ls[4] = ls[4].replace("\"status\":200", "\"status\":201");
    write_lines(file, &ls);
    let err = verify(d.path()).unwrap_err();
    assert_eq!(
        (&err.file, err.line, err.seq, &err.problem),
        (file, 5, Some(5), &Problem::HashMismatch)
    );
    assert!(err.to_string().contains("line 5"), "{err}");
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    // An attacker without the chain's secret key cannot recompute the hash, so the line
    // itself fails; with the public key, the next line's `prev` gives the edit away.
    let d = TempDir::new("rehash");
    write_log(d.path(), 5, None);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let mut ls = lines(file);
    let edited = ls[1].replace("\"status\":200", "\"status\":500");
    let cut = edited.len() - (",\"hash\":\"".len() + 64 + 2);
    let body = &edited[..cut];
    let hash = ChainKey::default().line_hash(body.as_bytes());
    ls[1] = format!("{body},\"hash\":\"{hash}\"}}");
    write_lines(file, &ls);
    let err = verify(d.path()).unwrap_err();
    assert_eq!((err.line, &err.problem), (3, &Problem::PrevMismatch));
}

#[test]
fn a_deleted_line_is_named() {
    let d = TempDir::new("delete");
    write_log(d.path(), 10, None);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let mut ls = lines(file);
    ls.remove(3);
    write_lines(file, &ls);
    let err = verify(d.path()).unwrap_err();
    assert_eq!(err.line, 4);
    assert_eq!(
        err.problem,
        Problem::SequenceGap {
            expected: 4,
            found: 5
        }
    );
}

#[test]
fn reordered_lines_are_named() {
    let d = TempDir::new("reorder");
    write_log(d.path(), 10, None);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let mut ls = lines(file);
    ls.swap(6, 7);
    write_lines(file, &ls);
    let err = verify(d.path()).unwrap_err();
    assert_eq!(err.line, 7);
    assert_eq!(
        err.problem,
        Problem::SequenceGap {
            expected: 7,
            found: 8
        }
    );
}

#[test]
fn a_truncated_line_is_named() {
    let d = TempDir::new("truncate");
    write_log(d.path(), 10, None);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let text = fs::read_to_string(file).unwrap();
    // Cut the last line in the middle.
    fs::write(file, &text[..text.len() - 40]).unwrap();
    let err = verify(d.path()).unwrap_err();
    assert_eq!((err.line, &err.problem), (10, &Problem::Truncated));

    // A line cut in the middle of the file (with its newline kept) is malformed.
    let ls = lines(file);
    let mut ls: Vec<String> = ls[..9].to_vec();
    ls[2].truncate(50);
    write_lines(file, &ls);
    let err = verify(d.path()).unwrap_err();
    assert_eq!((err.line, &err.problem), (3, &Problem::Malformed));
}

#[test]
fn lines_cut_off_the_end_are_detected_against_an_anchor() {
    let d = TempDir::new("anchor");
    let sink = write_log(d.path(), 10, None);
    let anchor = sink.head().unwrap();
    assert_eq!(anchor.seq, 10);
    drop(sink);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let ls = lines(file);
    write_lines(file, &ls[..8]);
    // Without an anchor the shorter log is consistent...
    assert_eq!(verify(d.path()).unwrap().lines, 8);
    // ...with one, the cut shows.
    let opts = VerifyOptions {
        end: Some(anchor),
        ..VerifyOptions::default()
    };
    let err = verify_dir(d.path(), "audit", &opts).unwrap_err();
    assert_eq!(
        err.problem,
        Problem::EndMismatch {
            expected: 10,
            found: 8
        }
    );
    assert_eq!(err.line, 8);
}

#[test]
fn size_rotation_carries_the_chain_and_a_removed_rotated_file_is_detected() {
    let d = TempDir::new("rotate");
    write_log(d.path(), 60, Some(2_000));
    let files = log_files(d.path(), "audit").unwrap();
    assert!(files.len() >= 4, "{} files", files.len());
    for f in &files {
        assert!(fs::metadata(f).unwrap().len() <= 2_000);
    }
    // The first line of the second file continues the first file's chain.
    let last_of_first: serde_json::Value =
        serde_json::from_str(lines(&files[0]).last().unwrap()).unwrap();
    let first_of_second: serde_json::Value = serde_json::from_str(&lines(&files[1])[0]).unwrap();
    assert_eq!(first_of_second["prev"], last_of_first["hash"]);
    assert_eq!(
        first_of_second["seq"].as_u64().unwrap(),
        last_of_first["seq"].as_u64().unwrap() + 1
    );
    let report = verify(d.path()).unwrap();
    assert_eq!((report.files, report.lines), (files.len(), 60));

    // Remove a rotated file from the middle: the next file's first line is named.
    let expected_seq = first_of_second["seq"].as_u64().unwrap();
    fs::remove_file(&files[1]).unwrap();
    let err = verify(d.path()).unwrap_err();
    assert_eq!(err.file, files[2]);
    assert_eq!(err.line, 1);
    assert!(
        matches!(err.problem, Problem::SequenceGap { expected, .. } if expected == expected_seq)
    );

    // Remove the oldest file: the log no longer starts at seq 1.
    fs::remove_file(&files[0]).unwrap();
    let err = verify(d.path()).unwrap_err();
    assert_eq!((err.file.clone(), err.line), (files[2].clone(), 1));
    assert!(matches!(
        err.problem,
        Problem::SequenceGap { expected: 1, .. }
    ));
}

#[test]
fn retention_is_verifiable_from_a_start_point() {
    let d = TempDir::new("retention");
    write_log(d.path(), 60, Some(2_000));
    let files = log_files(d.path(), "audit").unwrap();
    let last_of_first: serde_json::Value =
        serde_json::from_str(lines(&files[0]).last().unwrap()).unwrap();
    fs::remove_file(&files[0]).unwrap();
    let opts = VerifyOptions {
        start: Some(ChainPoint {
            seq: last_of_first["seq"].as_u64().unwrap(),
            hash: last_of_first["hash"].as_str().unwrap().to_owned(),
        }),
        ..VerifyOptions::default()
    };
    let report = verify_files(&files[1..], &opts).unwrap();
    assert_eq!(report.last.unwrap().seq, 60);
}

#[test]
fn daily_rotation_starts_a_file_per_utc_day() {
    let d = TempDir::new("daily");
    let sink = FileSink::builder(d.path())
        .rotate_daily(true)
        .open()
        .unwrap();
    let day = 86_400;
    let times = [
        T0 + 10,
        T0 + day - 1, // 23:59:59 of day 1
        T0 + day,     // midnight: day 2
        T0 + day - 5, // late event of day 1: stays in day 2's file
        T0 + 3 * day,
    ];
    for (i, t) in times.iter().enumerate() {
        sink.record(&event(i as u64, UNIX_EPOCH + Duration::from_secs(*t)))
            .unwrap();
    }
    sink.sync().unwrap();
    let files = log_files(d.path(), "audit").unwrap();
    let counts: Vec<usize> = files.iter().map(|f| lines(f).len()).collect();
    assert_eq!(counts, [2, 2, 1]);
    assert_eq!(verify(d.path()).unwrap().lines, 5);
}

#[test]
fn reopening_continues_the_chain_in_a_new_file() {
    let d = TempDir::new("reopen");
    drop(write_log(d.path(), 5, None));
    let sink = FileSink::builder(d.path()).open().unwrap();
    assert_eq!(sink.head().unwrap().seq, 5);
    sink.record(&event(6, UNIX_EPOCH + Duration::from_secs(T0)))
        .unwrap();
    sink.sync().unwrap();
    assert_eq!(log_files(d.path(), "audit").unwrap().len(), 2);
    let report = verify(d.path()).unwrap();
    assert_eq!((report.files, report.lines), (2, 6));
}

#[test]
fn a_secret_chain_key_is_needed_to_verify() {
    let d = TempDir::new("key");
    let key = ChainKey::new(b"kept elsewhere");
    let sink = FileSink::builder(d.path()).key(key.clone()).open().unwrap();
    for i in 1..=3 {
        sink.record(&event(i, UNIX_EPOCH)).unwrap();
    }
    sink.sync().unwrap();
    let err = verify(d.path()).unwrap_err();
    assert_eq!((err.line, &err.problem), (1, &Problem::HashMismatch));
    let opts = VerifyOptions {
        key,
        ..VerifyOptions::default()
    };
    assert_eq!(verify_dir(d.path(), "audit", &opts).unwrap().lines, 3);
    assert!(!format!("{:?}", opts.key).contains("kept"));
}

#[tokio::test]
async fn the_background_writer_fills_a_verifiable_log_and_shutdown_waits_for_the_disk() {
    let d = TempDir::new("writer");
    let sink = FileSink::builder(d.path())
        .rotate_bytes(64 * 1024)
        .open()
        .unwrap();
    let auditor = Auditor::builder().capacity(256).spawn(sink).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let a = auditor.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250u64 {
                a.record(event(t * 1000 + i, UNIX_EPOCH)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    auditor.flush().await.unwrap();
    assert_eq!(verify(d.path()).unwrap().lines, 2000);
    let stats = auditor.shutdown().await;
    assert_eq!((stats.written, stats.dropped, stats.failed), (2000, 0, 0));
    // After shutdown, events are refused and counted.
    assert!(auditor.record(event(0, UNIX_EPOCH)).await.is_err());
    auditor.record_nowait(event(0, UNIX_EPOCH));
    assert_eq!(auditor.stats().dropped, 2);
    assert!(auditor.flush().await.is_err());
    assert_eq!(verify(d.path()).unwrap().lines, 2000);
}

#[test]
fn an_invalid_stem_is_refused() {
    let d = TempDir::new("stem");
    assert!(FileSink::builder(d.path()).stem("../x").open().is_err());
    assert!(FileSink::builder(d.path()).stem("").open().is_err());
}
