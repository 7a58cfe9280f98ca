//! A tamper-evident JSON Lines file sink ([`FileSink`]) and its verifier ([`verify_dir`],
//! [`verify_files`]).
//!
//! Every line is one JSON object:
//!
//! ```text
//! {"seq":7,"prev":"<64 hex>","event":{...},"hash":"<64 hex>"}
//! ```
//!
//! - `seq` counts lines from 1 across all files of the log;
//! - `prev` is the `hash` of the line before (64 zeros for the first line);
//! - `hash` is the keyed blake3 hash of the line's bytes up to (not including) `,"hash":`,
//!   keyed by [`ChainKey`].
//!
//! Editing, deleting, reordering or truncating a line, or removing a rotated file, breaks
//! the chain, and verification names the first broken line. Rotation (by size, by UTC day)
//! starts a new file `{stem}-{NNNNNN}.jsonl` whose first line continues the chain.
//!
//! What the chain does and does not prove: with the default (public) key, anyone able to
//! rewrite the files can recompute every hash after an edit; keep the last `seq`/`hash`
//! ([`FileSink::head`], [`VerifyReport::last`]) somewhere else and pass it as
//! [`VerifyOptions::end`], or use a secret [`ChainKey`] kept away from the log's host, to
//! make rewriting detectable too. Cutting whole lines off the end is only detectable
//! against such an anchor.
//!
//! ```
//! use keygate_core::audit::{verify_dir, AuditSink, FileSink, RequestEvent, VerifyOptions};
//! use std::time::UNIX_EPOCH;
//!
//! let dir = std::env::temp_dir().join(format!("keygate-doc-file-{}", std::process::id()));
//! let sink = FileSink::builder(&dir).open().unwrap();
//! for i in 0..3 {
//!     sink.record(&RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into()).unwrap();
//! }
//! sink.sync().unwrap();
//! let report = verify_dir(&dir, "audit", &VerifyOptions::default()).unwrap();
//! assert_eq!(report.lines, 3);
//! assert_eq!(report.last.unwrap().seq, 3);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::event::AuditEvent;
use super::sink::{AuditError, AuditSink};

/// The blake3 key-derivation context of the chain; changing it breaks every existing log.
const CONTEXT: &str = "keygate 2026-11 audit chain v1";
/// What separates a line's hashed part from its hash.
const HASH_FIELD: &[u8] = b",\"hash\":\"";
/// The fixed-length tail of every line: `,"hash":"` + 64 hex + `"}`.
const TAIL_LEN: usize = HASH_FIELD.len() + 64 + 2;
/// The `prev` of the first line of a log.
const GENESIS: [u8; 32] = [0; 32];

/// The key of the hash chain. The default key is public (derived from an empty secret):
/// it detects accidental damage and naive edits. A secret key (kept off the log's host)
/// also makes a consistent rewrite impossible without it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChainKey([u8; 32]);

impl ChainKey {
    /// The key derived from `secret` (any length; empty gives the default key).
    pub fn new(secret: &[u8]) -> Self {
        ChainKey(blake3::derive_key(CONTEXT, secret))
    }

    /// The hash of a line's hashed part (its bytes up to, not including, `,"hash":`), as
    /// written in the line's `hash` field (64 lower-case hex characters).
    pub fn line_hash(&self, data: &[u8]) -> String {
        hex(&self.hash(data))
    }

    fn hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }
}

impl Default for ChainKey {
    fn default() -> Self {
        ChainKey::new(b"")
    }
}

impl fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

/// A position in the chain: a line's `seq` and `hash` (64 lower-case hex characters).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainPoint {
    /// The line's sequence number.
    pub seq: u64,
    /// The line's hash, hex.
    pub hash: String,
}

/// Configures a [`FileSink`].
#[derive(Debug, Clone)]
pub struct FileSinkBuilder {
    dir: PathBuf,
    stem: String,
    max_bytes: Option<u64>,
    daily: bool,
    key: ChainKey,
    capacity: usize,
}

impl FileSinkBuilder {
    /// File names start with `stem` (default `audit`): `{stem}-000001.jsonl`. Letters,
    /// digits, `_`, `-` and `.` only.
    pub fn stem(mut self, stem: impl Into<String>) -> Self {
        self.stem = stem.into();
        self
    }

    /// Starts a new file before one would grow past `bytes` (a single longer line still
    /// gets a file of its own). Off by default.
    pub fn rotate_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes.max(1));
        self
    }

    /// Starts a new file when an event's UTC day is later than the current file's. Off by
    /// default.
    pub fn rotate_daily(mut self, yes: bool) -> Self {
        self.daily = yes;
        self
    }

    /// The chain key (default: the public key, [`ChainKey::default`]).
    pub fn key(mut self, key: ChainKey) -> Self {
        self.key = key;
        self
    }

    /// The size of the write buffer (default 64 KiB).
    pub fn buffer_capacity(mut self, bytes: usize) -> Self {
        self.capacity = bytes.max(1024);
        self
    }

    /// Creates the directory if needed (each directory created is mode 0700 on unix,
    /// whatever the umask; existing ones are left as they are) and continues the chain of the files already in it
    /// (from the last complete line of the newest file) in a new file, opened on the first
    /// event.
    pub fn open(self) -> Result<FileSink, AuditError> {
        if self.stem.is_empty()
            || !self
                .stem
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        {
            return Err(AuditError::Other(format!(
                "invalid audit file stem {:?}",
                self.stem.chars().take(64).collect::<String>()
            )));
        }
        create_private_dirs(&self.dir)?;
        let segments = segments(&self.dir, &self.stem)?;
        let next_index = segments.last().map_or(1, |(i, _)| i + 1);
        let mut head: Option<(u64, [u8; 32])> = None;
        for (_, path) in segments.iter().rev() {
            if let Some(h) = last_line(path)? {
                head = Some(h);
                break;
            }
        }
        let (seq, prev) = head.unwrap_or((0, GENESIS));
        Ok(FileSink {
            state: Mutex::new(State {
                dir: self.dir,
                stem: self.stem,
                max_bytes: self.max_bytes,
                daily: self.daily,
                key: self.key,
                capacity: self.capacity,
                writer: None,
                index: next_index,
                bytes: 0,
                day: 0,
                seq,
                prev,
                buf: Vec::with_capacity(1024),
            }),
        })
    }
}

/// A JSON Lines audit log with a blake3 hash chain, rotation, and verification.
///
/// Every line is one JSON object:
///
/// ```text
/// {"seq":7,"prev":"<64 hex>","event":{...},"hash":"<64 hex>"}
/// ```
///
/// - `seq` counts lines from 1 across all files of the log;
/// - `prev` is the `hash` of the line before (64 zeros for the first line);
/// - `hash` is the keyed blake3 hash of the line's bytes up to (not including) `,"hash":`,
///   keyed by [`ChainKey`] ([`ChainKey::line_hash`]).
///
/// Editing, deleting, reordering or truncating a line, or removing a rotated file, breaks
/// the chain, and [`verify_dir`] / [`verify_files`] name the first broken line. Rotation
/// (by size, by UTC day) starts a new file `{stem}-{NNNNNN}.jsonl` whose first line
/// continues the chain; reopening a directory continues the chain of its newest file in a
/// new file (a partial last line left by a crash stays, and verification reports it).
///
/// What the chain does and does not prove: with the default (public) key, anyone able to
/// rewrite the files can recompute every hash after an edit; keep the last `seq`/`hash`
/// ([`FileSink::head`], [`VerifyReport::last`]) somewhere else and pass it as
/// [`VerifyOptions::end`], or use a secret [`ChainKey`] kept away from the log's host, to
/// make rewriting detectable too. Cutting whole lines off the end is only detectable
/// against such an anchor.
///
/// Writes go through a buffer; [`AuditSink::flush`] hands it to the operating system and
/// [`AuditSink::sync`] also `fsync`s. Use it behind a background
/// [`Auditor`](super::Auditor) so requests never wait on the disk.
pub struct FileSink {
    state: Mutex<State>,
}

struct State {
    dir: PathBuf,
    stem: String,
    max_bytes: Option<u64>,
    daily: bool,
    key: ChainKey,
    capacity: usize,
    /// The open file, if any (opened on the first event, reopened after a write error).
    writer: Option<BufWriter<File>>,
    /// The index of the open file, or of the next one to open.
    index: u64,
    /// Bytes in the open file.
    bytes: u64,
    /// The UTC day (days since 1970) of the open file.
    day: u64,
    /// The last written line's seq (0: none yet).
    seq: u64,
    /// The last written line's hash.
    prev: [u8; 32],
    buf: Vec<u8>,
}

impl FileSink {
    /// Configures a sink writing into `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> FileSinkBuilder {
        FileSinkBuilder {
            dir: dir.into(),
            stem: "audit".to_owned(),
            max_bytes: None,
            daily: false,
            key: ChainKey::default(),
            capacity: 64 * 1024,
        }
    }

    /// The last line written (or continued from): anchor it elsewhere to detect truncation.
    pub fn head(&self) -> Option<ChainPoint> {
        let s = self.lock();
        (s.seq > 0).then(|| ChainPoint {
            seq: s.seq,
            hash: hex(&s.prev),
        })
    }

    /// The path of the file being written, if one is open.
    pub fn current_file(&self) -> Option<PathBuf> {
        let s = self.lock();
        s.writer.as_ref().map(|_| s.path(s.index))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("FileSink")
            .field("dir", &s.dir)
            .field("stem", &s.stem)
            .field("index", &s.index)
            .field("seq", &s.seq)
            .finish_non_exhaustive()
    }
}

impl State {
    fn path(&self, index: u64) -> PathBuf {
        self.dir.join(segment_name(&self.stem, index))
    }

    fn open_next(&mut self, day: u64) -> io::Result<()> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
            w.get_ref().sync_data()?;
            self.index += 1;
        }
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(self.path(self.index))?;
        self.writer = Some(BufWriter::with_capacity(self.capacity, file));
        self.bytes = 0;
        self.day = day;
        Ok(())
    }

    fn write(&mut self, event: &AuditEvent) -> Result<(), AuditError> {
        let seq = self.seq + 1;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(b"{\"seq\":");
        buf.extend_from_slice(seq.to_string().as_bytes());
        buf.extend_from_slice(b",\"prev\":\"");
        push_hex(&mut buf, &self.prev);
        buf.extend_from_slice(b"\",\"event\":");
        let encoded = serde_json::to_writer(&mut buf, event);
        let result = encoded.map_err(AuditError::from).and_then(|()| {
            let hash = self.key.hash(&buf);
            buf.extend_from_slice(HASH_FIELD);
            push_hex(&mut buf, &hash);
            buf.extend_from_slice(b"\"}\n");
            self.append(&buf, day_of(event.time()))?;
            self.seq = seq;
            self.prev = hash;
            Ok(())
        });
        self.buf = buf;
        result
    }

    fn append(&mut self, line: &[u8], day: u64) -> Result<(), AuditError> {
        let len = line.len() as u64;
        let rotate = match &self.writer {
            None => true,
            Some(_) => {
                self.bytes > 0
                    && (self.max_bytes.is_some_and(|max| self.bytes + len > max)
                        || (self.daily && day > self.day))
            }
        };
        if rotate {
            self.open_next(day)?;
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(AuditError::Other("audit file is not open".into()));
        };
        if let Err(e) = w.write_all(line) {
            // The file may now end in a partial line; continue in a new file (verification
            // reports the damage where it is).
            self.writer = None;
            self.index += 1;
            return Err(e.into());
        }
        self.bytes += len;
        Ok(())
    }
}

impl AuditSink for FileSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.lock().write(event)
    }

    fn flush(&self) -> Result<(), AuditError> {
        if let Some(w) = self.lock().writer.as_mut() {
            w.flush()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), AuditError> {
        if let Some(w) = self.lock().writer.as_mut() {
            w.flush()?;
            w.get_ref().sync_data()?;
        }
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Some(w) = self.lock().writer.as_mut() {
            if let Err(e) = w.flush() {
                tracing::error!(error = %e, "audit file flush failed on drop");
            }
        }
    }
}

fn day_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

fn segment_name(stem: &str, index: u64) -> String {
    format!("{stem}-{index:06}.jsonl")
}

/// The files of the log `stem` in `dir`, by index.
fn segments(dir: &Path, stem: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let index = name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".jsonl"))
            .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(i) = index {
            out.push((i, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The files of the log `stem` in `dir`, oldest first: what [`verify_dir`] checks.
pub fn log_files(dir: impl AsRef<Path>, stem: &str) -> io::Result<Vec<PathBuf>> {
    Ok(segments(dir.as_ref(), stem)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

#[derive(Deserialize)]
struct Tail {
    seq: u64,
    hash: String,
}

/// The seq and hash of the last complete, parseable line of `path`.
fn last_line(path: &Path) -> io::Result<Option<(u64, [u8; 32])>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut data = Vec::new();
        Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut data)?;
        let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        // The piece after the last newline is incomplete (or empty).
        lines.pop();
        // The piece before the first newline may be cut by the window.
        let first_complete = usize::from(start > 0);
        for line in lines.iter().skip(first_complete).rev() {
            if let Ok(t) = serde_json::from_slice::<Tail>(line) {
                if let Some(h) = unhex(&t.hash) {
                    return Ok(Some((t.seq, h)));
                }
            }
        }
        if start == 0 {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut v = Vec::with_capacity(64);
    push_hex(&mut v, bytes);
    String::from_utf8(v).unwrap_or_default()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let b = text.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        if pair.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// What [`verify_files`] and [`verify_dir`] check against.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The chain key the log was written with.
    pub key: ChainKey,
    /// The line just before the first file, when older files were removed on purpose
    /// (retention). Default: the first line must be `seq` 1 after the genesis hash.
    pub start: Option<ChainPoint>,
    /// The last line the log must end with (an anchor kept elsewhere); detects lines cut off
    /// the end.
    pub end: Option<ChainPoint>,
}

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files read.
    pub files: usize,
    /// Lines checked.
    pub lines: u64,
    /// The last line (anchor it elsewhere), if any.
    pub last: Option<ChainPoint>,
}

/// What is wrong with the first broken line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The file could not be read.
    Unreadable(String),
    /// The file ends in a line without its newline: cut off.
    Truncated,
    /// The line is not a chain line (`{"seq":..,"prev":..,"event":..,"hash":".."}`).
    Malformed,
    /// The line's hash does not match its content: it was edited.
    HashMismatch,
    /// The line has the wrong sequence number: a line before it is missing, or lines were
    /// reordered, or a file was removed.
    SequenceGap {
        /// The seq this line should have.
        expected: u64,
        /// The seq it has.
        found: u64,
    },
    /// The line's `prev` is not the hash of the line before it.
    PrevMismatch,
    /// The log does not end with the expected last line ([`VerifyOptions::end`]).
    EndMismatch {
        /// The expected last seq.
        expected: u64,
        /// The last seq found (0: none).
        found: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "unreadable: {e}"),
            Problem::Truncated => f.write_str("truncated line (no newline at the end)"),
            Problem::Malformed => f.write_str("not a chain line"),
            Problem::HashMismatch => f.write_str("hash does not match the line (edited)"),
            Problem::SequenceGap { expected, found } => write!(
                f,
                "sequence gap: expected seq {expected}, found {found} (line or file removed, or lines reordered)"
            ),
            Problem::PrevMismatch => {
                f.write_str("prev does not match the hash of the line before")
            }
            Problem::EndMismatch { expected, found } => write!(
                f,
                "the log ends at seq {found}, expected {expected} (lines cut off the end)"
            ),
        }
    }
}

/// The first broken line of a log: which file, which line (1-based, within the file), and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: line {line}: {problem}", file.display())]
pub struct BrokenChain {
    /// The file.
    pub file: PathBuf,
    /// The line number within the file, from 1 (0 when no line applies).
    pub line: u64,
    /// The line's `seq`, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

#[derive(Deserialize)]
struct Head {
    seq: u64,
    prev: String,
}

/// Verifies the chain through `files`, in the order given (oldest first). Stops at the first
/// broken line.
pub fn verify_files<P: AsRef<Path>>(
    files: &[P],
    options: &VerifyOptions,
) -> Result<VerifyReport, BrokenChain> {
    let (mut seq, mut prev) = match &options.start {
        Some(p) => (
            p.seq,
            unhex(&p.hash).ok_or_else(|| BrokenChain {
                file: PathBuf::new(),
                line: 0,
                seq: None,
                problem: Problem::Malformed,
            })?,
        ),
        None => (0, GENESIS),
    };
    let mut lines = 0u64;
    let mut last_file = PathBuf::new();
    let mut last_line_no = 0;
    for path in files {
        let path = path.as_ref();
        let broken = |line: u64, seq: Option<u64>, problem: Problem| BrokenChain {
            file: path.to_path_buf(),
            line,
            seq,
            problem,
        };
        let file =
            File::open(path).map_err(|e| broken(0, None, Problem::Unreadable(e.to_string())))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = Vec::with_capacity(1024);
        let mut json = Vec::with_capacity(1024);
        let mut n = 0u64;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(n + 1, None, Problem::Unreadable(e.to_string())))?;
            if read == 0 {
                break;
            }
            n += 1;
            if line.last() != Some(&b'\n') {
                return Err(broken(n, None, Problem::Truncated));
            }
            line.pop();
            if line.len() < TAIL_LEN || !line.ends_with(b"\"}") {
                return Err(broken(n, None, Problem::Malformed));
            }
            let cut = line.len() - TAIL_LEN;
            let (body, tail) = line.split_at(cut);
            if !tail.starts_with(HASH_FIELD) {
                return Err(broken(n, None, Problem::Malformed));
            }
            let hash_hex = std::str::from_utf8(&tail[HASH_FIELD.len()..HASH_FIELD.len() + 64])
                .ok()
                .and_then(unhex)
                .ok_or_else(|| broken(n, None, Problem::Malformed))?;
            json.clear();
            json.extend_from_slice(body);
            json.push(b'}');
            let head: Head =
                serde_json::from_slice(&json).map_err(|_| broken(n, None, Problem::Malformed))?;
            if options.key.hash(body) != hash_hex {
                return Err(broken(n, Some(head.seq), Problem::HashMismatch));
            }
            if head.seq != seq + 1 {
                return Err(broken(
                    n,
                    Some(head.seq),
                    Problem::SequenceGap {
                        expected: seq + 1,
                        found: head.seq,
                    },
                ));
            }
            if unhex(&head.prev) != Some(prev) {
                return Err(broken(n, Some(head.seq), Problem::PrevMismatch));
            }
            seq = head.seq;
            prev = hash_hex;
            lines += 1;
        }
        last_file = path.to_path_buf();
        last_line_no = n;
    }
    let last = (lines > 0 || options.start.is_some()).then(|| ChainPoint {
        seq,
        hash: hex(&prev),
    });
    if let Some(end) = &options.end {
        let found = last.as_ref().map_or(0, |p| p.seq);
        if last.as_ref() != Some(end) {
            return Err(BrokenChain {
                file: last_file,
                line: last_line_no,
                seq: (found > 0).then_some(found),
                problem: Problem::EndMismatch {
                    expected: end.seq,
                    found,
                },
            });
        }
    }
    Ok(VerifyReport {
        files: files.len(),
        lines,
        last,
    })
}

/// Verifies every file of the log `stem` in `dir` (see [`log_files`]).
pub fn verify_dir(
    dir: impl AsRef<Path>,
    stem: &str,
    options: &VerifyOptions,
) -> Result<VerifyReport, BrokenChain> {
    let dir = dir.as_ref();
    let files = log_files(dir, stem).map_err(|e| BrokenChain {
        file: dir.to_path_buf(),
        line: 0,
        seq: None,
        problem: Problem::Unreadable(e.to_string()),
    })?;
    verify_files(&files, options)
}

/// `create_dir_all`, but each directory it creates is owner-only (0700 on unix, set after
/// creation so the umask does not matter).
fn create_private_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(d) = next.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        next = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = blake3::hash(b"x");
        let text = hex(h.as_bytes());
        assert_eq!(unhex(&text), Some(*h.as_bytes()));
        assert_eq!(unhex(&text.to_uppercase()), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn segment_names_sort_by_index() {
        assert_eq!(segment_name("audit", 7), "audit-000007.jsonl");
    }

    #[cfg(unix)]
    #[test]
    fn created_directories_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!(
            "keygate-dirs-{}",
            crate::KeyId::generate().unwrap()
        ));
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = root.join("a").join("b");
        FileSink::builder(&dir).open().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        // An existing directory is left as it is.
        assert_eq!(mode(&root), 0o755);
        FileSink::builder(&dir).open().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
