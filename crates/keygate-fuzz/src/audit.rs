//! The audit log's line parser and `verify_files` on arbitrary files.

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use keygate::core::audit::{verify_files, ChainKey, ChainPoint, VerifyOptions};

#[derive(Debug, Arbitrary)]
struct Line {
    /// `None`: the next sequence number; `Some`: this one.
    seq: Option<u64>,
    /// Extra fields, each `"x<name>":"<value>"` with the name and value kept alphanumeric.
    fields: Vec<(u8, String)>,
    /// Link to the previous line's hash (`true`) or to zeros.
    linked: bool,
}

#[derive(Debug, Arbitrary)]
struct Chain {
    start: Option<u64>,
    lines: Vec<Line>,
    /// A byte to change after the chain is written: (position, xor mask).
    tamper: Option<(u32, u8)>,
}

fn scratch() -> PathBuf {
    let id = format!(
        "keygate-fuzz-audit-{}-{:?}.log",
        std::process::id(),
        std::thread::current().id()
    );
    // A memory file system when there is one: the target writes a file per input.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(id.replace(['(', ')'], ""))
}

/// Removes the scratch file when the input is done (or its check panicked).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn hex_to_bytes(h: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

/// The first byte picks the mode: even, the rest is the file as is; odd, the rest builds a
/// chain with the real hash (so deep lines are reached), optionally tampered with by one
/// byte, and the verdict is checked: an untouched well-linked chain verifies, a changed
/// byte never does.
pub fn audit(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let scratch = Scratch(scratch());
    let path = &scratch.0;
    let key = ChainKey::default();
    if mode % 2 == 0 {
        std::fs::write(path, rest).expect("write the scratch file");
        let _ = verify_files(&[path], &VerifyOptions::default());
        return;
    }
    let Ok(chain) = Chain::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let start_seq = chain.start.unwrap_or(0);
    let mut prev = [0u8; 32];
    let mut seq = start_seq;
    let mut file = Vec::new();
    let mut well_formed = true;
    for line in chain.lines.iter().take(16) {
        let next = seq.checked_add(1);
        let this = match line.seq {
            Some(s) => s,
            None => next.unwrap_or_default(),
        };
        well_formed &= Some(this) == next && (line.linked || prev == [0u8; 32]);
        let link = if line.linked { prev } else { [0u8; 32] };
        let mut body = format!(
            "{{\"seq\":{this},\"prev\":\"{}\"",
            link.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        for (n, v) in line.fields.iter().take(4) {
            let v: String = v
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(32)
                .collect();
            body.push_str(&format!(",\"x{n}\":\"{v}\""));
        }
        let hash = key.line_hash(body.as_bytes());
        file.extend_from_slice(body.as_bytes());
        file.extend_from_slice(format!(",\"hash\":\"{hash}\"}}\n").as_bytes());
        prev = hex_to_bytes(&hash);
        seq = this;
    }
    let mut tampered = false;
    if let Some((at, mask)) = chain.tamper {
        if !file.is_empty() && mask != 0 {
            let at = at as usize % file.len();
            file[at] ^= mask;
            tampered = true;
        }
    }
    std::fs::write(path, &file).expect("write the scratch file");
    let options = VerifyOptions {
        start: chain.start.map(|seq| ChainPoint {
            seq,
            hash: "0".repeat(64),
        }),
        ..VerifyOptions::default()
    };
    let verdict = verify_files(&[path], &options);
    if tampered {
        assert!(verdict.is_err(), "a changed byte verified: {verdict:?}");
    } else if well_formed {
        let report = verdict.expect("an untouched chain verifies");
        assert_eq!(report.lines, chain.lines.len().min(16) as u64);
    }
}
