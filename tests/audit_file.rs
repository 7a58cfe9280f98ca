//! The tamper-evident JSON Lines sink: the chain across rotations and restarts, and every
//! kind of tampering detected by verification, naming the first broken line.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::core::audit::{
    log_files, verify_dir, verify_files, AuditError, AuditEvent, AuditSink, Auditor, BrokenChain,
    ChainKey, ChainPoint, FileSink, Problem, RequestEvent, VerifyOptions,
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
fn lines_cut_off_the_end_fail_against_the_checkpoint_and_an_explicit_anchor() {
    let d = TempDir::new("anchor");
    let sink = write_log(d.path(), 10, None);
    let anchor = sink.head().unwrap();
    assert_eq!(anchor.seq, 10);
    drop(sink);
    let file = &log_files(d.path(), "audit").unwrap()[0];
    let ls = lines(file);
    write_lines(file, &ls[..8]);
    // The checkpoint beside the log says 10: the first missing line is named.
    let err = verify(d.path()).unwrap_err();
    assert_eq!(
        (&err.file, err.line, &err.problem),
        (
            file,
            9,
            &Problem::CutShort {
                checkpoint: 10,
                found: 8
            }
        )
    );
    assert!(err.to_string().contains("line 9"), "{err}");
    // An anchor kept elsewhere says the same, without the checkpoint.
    let opts = VerifyOptions {
        end: Some(anchor),
        allow_missing_checkpoint: true,
        ..VerifyOptions::default()
    };
    let err = verify_files(&[file], &opts).unwrap_err();
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
    // With the public key, the first line already fails.
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

/// A secret key, as an operator would configure it.
fn secret() -> ChainKey {
    ChainKey::new(b"kept away from the people being audited")
}

fn verify_with(
    dir: &Path,
    key: &ChainKey,
) -> Result<keygate::core::audit::VerifyReport, BrokenChain> {
    let opts = VerifyOptions {
        key: key.clone(),
        ..VerifyOptions::default()
    };
    verify_dir(dir, "audit", &opts)
}

fn write_keyed(dir: &Path, key: &ChainKey, from: u64, n: u64) {
    let sink = FileSink::builder(dir).key(key.clone()).open().unwrap();
    for i in from..from + n {
        sink.record(&event(i, UNIX_EPOCH + Duration::from_secs(T0 + i)))
            .unwrap();
    }
    sink.sync().unwrap();
}

#[test]
fn keeping_only_two_lines_emptying_or_deleting_the_log_fails_verify() {
    let key = secret();
    // Keep two lines.
    let d = TempDir::new("two");
    write_keyed(d.path(), &key, 1, 10);
    let file = log_files(d.path(), "audit").unwrap()[0].clone();
    write_lines(&file, &lines(&file)[..2]);
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!(
        (err.line, err.problem.clone()),
        (
            3,
            Problem::CutShort {
                checkpoint: 10,
                found: 2
            }
        )
    );

    // Empty the file.
    fs::write(&file, b"").unwrap();
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!((&err.file, err.line), (&file, 1));
    assert_eq!(
        err.problem,
        Problem::CutShort {
            checkpoint: 10,
            found: 0
        }
    );

    // Delete it.
    fs::remove_file(&file).unwrap();
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!(
        err.problem,
        Problem::CutShort {
            checkpoint: 10,
            found: 0
        }
    );

    // Delete the checkpoint too, leaving a shortened log: still refused.
    let d = TempDir::new("nocp");
    write_keyed(d.path(), &key, 1, 5);
    fs::remove_file(d.path().join("audit.checkpoint")).unwrap();
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!(err.problem, Problem::MissingCheckpoint);
    assert!(err.to_string().contains("audit.checkpoint"), "{err}");
}

#[test]
fn a_full_rewrite_rehashed_with_the_default_key_fails_at_its_first_line() {
    let key = secret();
    let d = TempDir::new("rewrite");
    write_keyed(d.path(), &key, 1, 6);
    // The attacker writes a different history with the public key (checkpoint included)
    // and puts it in place of the real one.
    let forged = TempDir::new("forged");
    let sink = FileSink::builder(forged.path()).open().unwrap();
    for i in 1..=6 {
        sink.record(&event(100 + i, UNIX_EPOCH)).unwrap();
    }
    sink.sync().unwrap();
    drop(sink);
    for name in ["audit-000001.jsonl", "audit.checkpoint"] {
        fs::copy(forged.path().join(name), d.path().join(name)).unwrap();
    }
    // Consistent under the public key...
    assert_eq!(verify(d.path()).unwrap().lines, 6);
    // ...but not under the real one: the first line is named.
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!(
        (
            err.file.file_name().unwrap().to_str().unwrap(),
            err.line,
            &err.problem
        ),
        ("audit-000001.jsonl", 1, &Problem::HashMismatch)
    );
    // A forged checkpoint alone (the log untouched) is named too.
    let d = TempDir::new("forgedcp");
    write_keyed(d.path(), &key, 1, 3);
    fs::copy(
        forged.path().join("audit.checkpoint"),
        d.path().join("audit.checkpoint"),
    )
    .unwrap();
    let err = verify_with(d.path(), &key).unwrap_err();
    assert!(matches!(err.problem, Problem::BadCheckpoint(_)), "{err}");
    assert!(err.to_string().contains("seal"), "{err}");
}

#[test]
fn a_rewritten_line_at_the_checkpoint_is_named() {
    // With the public key an attacker can re-hash the whole chain, but not a checkpoint
    // sealed with the secret key: the line the checkpoint recorded no longer matches.
    let key = secret();
    let d = TempDir::new("cpline");
    write_keyed(d.path(), &key, 1, 4);
    let file = log_files(d.path(), "audit").unwrap()[0].clone();
    // Re-chain every line with the secret key after an edit (only possible with the key):
    // then verification passes, which is the documented limit.
    let ls = lines(&file);
    let mut prev = "0".repeat(64);
    let mut out = Vec::new();
    for l in &ls {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["prev"] = prev.clone().into();
        let event = v["event"]
            .to_string()
            .replace("\"status\":200", "\"status\":204");
        let body = format!(
            "{{\"seq\":{},\"prev\":\"{prev}\",\"event\":{event}",
            v["seq"]
        );
        let hash = key.line_hash(body.as_bytes());
        out.push(format!("{body},\"hash\":\"{hash}\"}}"));
        prev = hash;
    }
    write_lines(&file, &out);
    let err = verify_with(d.path(), &key).unwrap_err();
    assert_eq!((err.line, &err.problem), (4, &Problem::CheckpointMismatch));
}

#[test]
fn a_writer_refuses_to_continue_a_cut_log() {
    let key = secret();
    let d = TempDir::new("refuse");
    write_keyed(d.path(), &key, 1, 10);
    let file = log_files(d.path(), "audit").unwrap()[0].clone();
    write_lines(&file, &lines(&file)[..7]);
    let err = FileSink::builder(d.path())
        .key(key.clone())
        .open()
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AuditError::Tampered(_)), "{text}");
    assert!(
        text.contains("ends at seq 7") && text.contains("checkpoint says seq 10"),
        "{text}"
    );
    // Nothing was added.
    assert_eq!(log_files(d.path(), "audit").unwrap().len(), 1);

    // Opening with the wrong key is refused too (the checkpoint's seal does not match).
    let d = TempDir::new("wrongkey");
    write_keyed(d.path(), &key, 1, 2);
    let err = FileSink::builder(d.path()).open().unwrap_err();
    assert!(err.to_string().contains("seal"), "{err}");

    // Files without a checkpoint are not continued either.
    let d = TempDir::new("nocheckpoint");
    write_keyed(d.path(), &key, 1, 2);
    fs::remove_file(d.path().join("audit.checkpoint")).unwrap();
    let err = FileSink::builder(d.path())
        .key(key.clone())
        .open()
        .unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
}

#[test]
fn a_writer_cut_off_between_its_lines_and_its_checkpoint_is_continued() {
    // Lines written after the last checkpoint (a crash before it was updated) chain from
    // it: the next writer continues after them.
    let key = secret();
    let d = TempDir::new("crash");
    write_keyed(d.path(), &key, 1, 3);
    let cp = fs::read(d.path().join("audit.checkpoint")).unwrap();
    write_keyed(d.path(), &key, 4, 2);
    fs::write(d.path().join("audit.checkpoint"), cp).unwrap();
    let sink = FileSink::builder(d.path()).key(key.clone()).open().unwrap();
    assert_eq!(sink.head().unwrap().seq, 5);
    sink.record(&event(6, UNIX_EPOCH)).unwrap();
    sink.sync().unwrap();
    assert_eq!(verify_with(d.path(), &key).unwrap().lines, 6);
}

#[test]
fn two_writers_on_one_log_take_turns_and_keep_one_chain() {
    let key = secret();
    let d = TempDir::new("two-writers");
    let a = FileSink::builder(d.path()).key(key.clone()).open().unwrap();
    let b = FileSink::builder(d.path())
        .key(key.clone())
        .lock_timeout(Duration::from_millis(50))
        .open()
        .unwrap();
    a.record(&event(1, UNIX_EPOCH)).unwrap();
    // `a` holds the lock until it flushes: `b` gives up after its timeout, writing nothing.
    let err = b.record(&event(100, UNIX_EPOCH)).unwrap_err();
    assert!(matches!(err, AuditError::Locked(_)), "{err}");
    a.record(&event(2, UNIX_EPOCH)).unwrap();
    a.flush().unwrap();
    b.record(&event(3, UNIX_EPOCH)).unwrap();
    b.record(&event(4, UNIX_EPOCH)).unwrap();
    b.flush().unwrap();
    a.record(&event(5, UNIX_EPOCH)).unwrap();
    a.sync().unwrap();
    assert_eq!(a.head().unwrap().seq, 5);
    let report = verify_with(d.path(), &key).unwrap();
    assert_eq!(report.lines, 5);
    let ids: Vec<String> = log_files(d.path(), "audit")
        .unwrap()
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            v["event"]["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, ["req-1", "req-2", "req-3", "req-4", "req-5"]);
}

#[test]
fn two_background_writers_interleave_into_one_verifiable_chain() {
    let key = secret();
    let d = TempDir::new("threads");
    let mut handles = Vec::new();
    for t in 0..3u64 {
        let dir = d.path().to_path_buf();
        let key = key.clone();
        handles.push(std::thread::spawn(move || {
            let sink = FileSink::builder(&dir).key(key).open().unwrap();
            for i in 0..200 {
                sink.record(&event(t * 1000 + i, UNIX_EPOCH)).unwrap();
                if i % 7 == 0 {
                    sink.flush().unwrap();
                }
            }
            sink.sync().unwrap();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(verify_with(d.path(), &key).unwrap().lines, 600);
}

#[cfg(unix)]
#[test]
fn files_are_owner_only_and_a_created_directory_is_0700() {
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new("modes");
    let dir = d.path().join("new").join("audit");
    write_log(&dir, 3, None);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&d.path().join("new")), 0o700);
    for name in ["audit-000001.jsonl", "audit.checkpoint", "audit.lock"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
}

#[cfg(unix)]
#[test]
fn chain_key_files_must_not_be_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new("keyfile");
    let path = d.path().join("audit.key");
    let (created, fresh) = ChainKey::load_or_create(&path).unwrap();
    assert!(fresh);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (again, fresh) = ChainKey::load_or_create(&path).unwrap();
    assert!(!fresh);
    assert_eq!(created, again);
    assert!(!created.is_default());
    assert_eq!(ChainKey::from_file(&path).unwrap(), created);

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = ChainKey::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("other users") && err.contains("644"), "{err}");
    let secret_text = fs::read_to_string(&path).unwrap();
    assert!(
        !err.contains(secret_text.trim()),
        "the key is not in the error"
    );

    let empty = d.path().join("empty.key");
    fs::write(&empty, b"\n").unwrap();
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(ChainKey::from_file(&empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));
}

#[test]
fn retention_keeps_at_most_n_files_and_the_rest_still_verifies() {
    let key = secret();
    let d = TempDir::new("keep");
    let sink = FileSink::builder(d.path())
        .key(key.clone())
        .rotate_bytes(2_000)
        .max_files(3)
        .open()
        .unwrap();
    for i in 1..=60 {
        sink.record(&event(i, UNIX_EPOCH + Duration::from_secs(T0 + i)))
            .unwrap();
    }
    sink.sync().unwrap();
    let files = log_files(d.path(), "audit").unwrap();
    assert_eq!(files.len(), 3);
    assert!(!files[0].ends_with("audit-000001.jsonl"));
    let report = verify_with(d.path(), &key).unwrap();
    assert_eq!(report.last.unwrap().seq, 60);
    assert!(report.lines < 60);
    // Removing one of the kept files is still detected.
    fs::remove_file(&files[0]).unwrap();
    let err = verify_with(d.path(), &key).unwrap_err();
    assert!(matches!(err.problem, Problem::SequenceGap { .. }), "{err}");
}

#[test]
fn retention_by_age_removes_files_last_written_long_ago() {
    let key = secret();
    let d = TempDir::new("age");
    write_keyed(d.path(), &key, 1, 5);
    write_keyed(d.path(), &key, 6, 5);
    let old = SystemTime::now() - Duration::from_secs(3 * 86_400);
    for f in log_files(d.path(), "audit").unwrap() {
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let sink = FileSink::builder(d.path())
        .key(key.clone())
        .max_age(Duration::from_secs(86_400))
        .open()
        .unwrap();
    sink.record(&event(11, UNIX_EPOCH)).unwrap();
    sink.sync().unwrap();
    let files = log_files(d.path(), "audit").unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    let report = verify_with(d.path(), &key).unwrap();
    assert_eq!((report.lines, report.last.unwrap().seq), (1, 11));
}

#[test]
fn hourly_rotation_follows_event_time() {
    let d = TempDir::new("hourly");
    let sink = FileSink::builder(d.path())
        .rotate_every(Duration::from_secs(3600))
        .open()
        .unwrap();
    for t in [T0, T0 + 100, T0 + 3600, T0 + 3 * 3600 + 5] {
        sink.record(&event(t, UNIX_EPOCH + Duration::from_secs(t)))
            .unwrap();
    }
    sink.sync().unwrap();
    let counts: Vec<usize> = log_files(d.path(), "audit")
        .unwrap()
        .iter()
        .map(|f| lines(f).len())
        .collect();
    assert_eq!(counts, [2, 1, 1]);
    assert_eq!(verify(d.path()).unwrap().lines, 4);
}

#[test]
fn a_key_anywhere_in_an_event_is_masked_in_the_file() {
    let d = TempDir::new("mask");
    let key = keygate::ApiKey::generate(&keygate::Prefix::default()).unwrap();
    let k = key.expose_secret().to_owned();
    let body = &k[k.len() - 40..];
    let mut e = RequestEvent::new(UNIX_EPOCH, format!("req-{k}"), "GET", format!("/c/{k}/x"));
    e.key_name = Some(format!("named {k}").into());
    let sink = FileSink::builder(d.path()).open().unwrap();
    sink.record(&e.into()).unwrap();
    sink.sync().unwrap();
    let text = fs::read_to_string(&log_files(d.path(), "audit").unwrap()[0]).unwrap();
    assert!(!text.contains(body), "{text}");
    assert!(text.contains(&"*".repeat(40)));
    assert_eq!(verify(d.path()).unwrap().lines, 1);
}
