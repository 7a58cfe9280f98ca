//! Named regression tests for what the fuzzers found in keygate (the inputs themselves are
//! under `fuzz/regressions/<target>/` and replayed by `tests/replay.rs`).

use keygate::core::audit::{verify_files, ChainKey, ChainPoint, Problem, VerifyOptions};

/// `verify_files` with a start point at seq u64::MAX: the next line's expected seq
/// overflowed (a panic with overflow checks, a wrap to 0 without). Now no line may follow.
#[test]
fn audit_verify_after_the_last_possible_seq_reports_a_gap() {
    let dir = std::env::temp_dir().join(format!("keygate-fuzz-regression-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seq-max.log");
    let key = ChainKey::default();
    let body = format!("{{\"seq\":0,\"prev\":\"{}\"", "0".repeat(64));
    let line = format!("{body},\"hash\":\"{}\"}}\n", key.line_hash(body.as_bytes()));
    std::fs::write(&path, line).unwrap();
    let options = VerifyOptions {
        start: Some(ChainPoint {
            seq: u64::MAX,
            hash: "0".repeat(64),
        }),
        ..VerifyOptions::default()
    };
    let err = verify_files(&[&path], &options).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.seq, Some(0));
    assert!(
        matches!(err.problem, Problem::SequenceGap { found: 0, .. }),
        "{:?}",
        err.problem
    );
}
