//! Replays every saved fuzz input (`fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`)
//! through its target on stable Rust, so what the fuzzer kept and found stays checked.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("a readable directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (name, target) in keygate_fuzz::TARGETS {
        for file in inputs(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&file).expect("a readable input");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{} fails target {name}", file.display());
            n += 1;
        }
    }
    n
}

#[test]
fn the_saved_corpus_replays_cleanly() {
    // Every target has a saved corpus: an empty one would make this test pass vacuously.
    for (name, _) in keygate_fuzz::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        assert!(
            !inputs(&dir).is_empty(),
            "no saved corpus in {}",
            dir.display()
        );
    }
    assert!(replay("corpus") > 0);
}

#[test]
fn every_regression_replays_cleanly() {
    replay("regressions");
}

#[test]
fn every_target_is_a_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in keygate_fuzz::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "no [[bin]] for {name}"
        );
    }
}

/// Deterministic pseudo-random inputs (xorshift), so every target also sees inputs no
/// one saved, the same on every run.
#[test]
fn every_target_survives_seeded_random_inputs() {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (name, target) in keygate_fuzz::TARGETS {
        for round in 0..200 {
            let len = (next() % 256) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "target {name} fails seeded input {round}: {data:?}"
            );
        }
    }
}
