//! A tamper-evident JSON Lines file sink ([`FileSink`]) and its verifier ([`verify_dir`],
//! [`verify_files`]); the format is documented on [`FileSink`], which is public where this
//! module is not.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::event::AuditEvent;
use super::redact::mask_keys;
use super::sink::{AuditError, AuditSink};

/// The blake3 key-derivation context of the chain; changing it breaks every existing log.
const CONTEXT: &str = "keygate 2026-11 audit chain v1";
/// What separates a line's hashed part from its hash.
const HASH_FIELD: &[u8] = b",\"hash\":\"";
/// The fixed-length tail of every line: `,"hash":"` + 64 hex + `"}`.
const TAIL_LEN: usize = HASH_FIELD.len() + 64 + 2;
/// The `prev` of the first line of a log.
const GENESIS: [u8; 32] = [0; 32];
/// What separates a checkpoint's sealed part from its seal.
const SEAL_FIELD: &[u8] = b",\"seal\":\"";
/// Domain separation: a checkpoint's seal is never a valid line hash.
const SEAL_DOMAIN: &[u8] = b"keygate audit checkpoint v1\n";
/// The environment variable holding the chain key itself.
pub const KEY_ENV: &str = "KEYGATE_AUDIT_KEY";
/// The environment variable naming a file holding the chain key.
pub const KEY_FILE_ENV: &str = "KEYGATE_AUDIT_KEY_FILE";

/// The key of the hash chain and of the checkpoint's seal.
///
/// The default key is public (derived from an empty secret): it detects accidental damage
/// and naive edits only. A secret key makes a consistent rewrite impossible without it.
/// `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ChainKey([u8; 32]);

impl ChainKey {
    /// The key derived from `secret` (any length; empty gives the default key).
    pub fn new(secret: &[u8]) -> Self {
        ChainKey(blake3::derive_key(CONTEXT, secret))
    }

    /// Whether this is the public default key.
    pub fn is_default(&self) -> bool {
        *self == ChainKey::default()
    }

    /// The key in the file at `path` (its bytes, without a trailing newline). Refused: an
    /// empty file, and on Unix a file other users may read or write (mode `o+r` or `o+w`).
    /// Errors name the file, never its content.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref();
        let bad =
            |why: String| AuditError::Key(format!("chain key file {}: {why}", path.display()));
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o006 != 0 {
                return Err(bad(format!(
                    "other users may read or write it (mode {:o}); chmod 600 it",
                    mode & 0o777
                )));
            }
        }
        if !meta.is_file() {
            return Err(bad("not a file".into()));
        }
        let mut secret = Vec::new();
        file.take(64 * 1024)
            .read_to_end(&mut secret)
            .map_err(|e| bad(e.to_string()))?;
        while matches!(secret.last(), Some(b'\n' | b'\r')) {
            secret.pop();
        }
        if secret.is_empty() {
            return Err(bad("empty".into()));
        }
        let key = ChainKey::new(&secret);
        secret.iter_mut().for_each(|b| *b = 0);
        Ok(key)
    }

    /// The key from the environment: `KEYGATE_AUDIT_KEY` (the secret itself), else the file
    /// named by `KEYGATE_AUDIT_KEY_FILE` ([`ChainKey::from_file`]); `None` when neither is
    /// set. Both set is an error (which one is meant?).
    pub fn from_env() -> Result<Option<Self>, AuditError> {
        let inline = std::env::var_os(KEY_ENV).filter(|v| !v.is_empty());
        let file = std::env::var_os(KEY_FILE_ENV).filter(|v| !v.is_empty());
        match (inline, file) {
            (Some(_), Some(_)) => Err(AuditError::Key(format!(
                "both {KEY_ENV} and {KEY_FILE_ENV} are set; set one"
            ))),
            (Some(secret), None) => Ok(Some(ChainKey::new(secret.as_encoded_bytes()))),
            (None, Some(path)) => ChainKey::from_file(PathBuf::from(path)).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The key in the file at `path`, creating the file (owner-only, 0600, with 32 random
    /// bytes as hex; its directory 0700 if missing) when it does not exist. Returns the key
    /// and whether it was created.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<(Self, bool), AuditError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| AuditError::Key(format!("no randomness for a chain key: {e}")))?;
        let mut text = Vec::with_capacity(65);
        push_hex(&mut text, &secret);
        text.push(b'\n');
        match owner_only()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
        {
            Ok(()) => Ok((ChainKey::new(&text[..64]), true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                ChainKey::from_file(path).map(|k| (k, false))
            }
            Err(e) => Err(AuditError::Key(format!(
                "cannot create chain key file {}: {e}",
                path.display()
            ))),
        }
    }

    /// The hash of a line's hashed part (its bytes up to, not including, `,"hash":`), as
    /// written in the line's `hash` field (64 lower-case hex characters).
    pub fn line_hash(&self, data: &[u8]) -> String {
        hex(&self.hash(data))
    }

    fn hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }

    fn seal(&self, body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(SEAL_DOMAIN);
        h.update(body);
        *h.finalize().as_bytes()
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

/// A log's anchor, as read from `{stem}.checkpoint` ([`read_checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The index of the log's first file (older ones were removed by retention).
    pub first_file: u64,
    /// The line just before the first file's first line (`seq` 0 and zeros at first).
    pub start: ChainPoint,
    /// The index of the file the last line is in (or the newest file when no line yet).
    pub file: u64,
    /// The log's last line as of the last write (`seq` 0: none yet).
    pub last: ChainPoint,
}

/// The anchor in raw form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    first_file: u64,
    start_seq: u64,
    start_hash: [u8; 32],
    file: u64,
    seq: u64,
    hash: [u8; 32],
}

impl Anchor {
    fn public(&self) -> Checkpoint {
        Checkpoint {
            first_file: self.first_file,
            start: ChainPoint {
                seq: self.start_seq,
                hash: hex(&self.start_hash),
            },
            file: self.file,
            last: ChainPoint {
                seq: self.seq,
                hash: hex(&self.hash),
            },
        }
    }

    fn encode(&self, key: &ChainKey) -> Vec<u8> {
        let mut out = format!(
            "{{\"first_file\":{},\"start_seq\":{},\"start_hash\":\"{}\",\"file\":{},\"seq\":{},\"hash\":\"{}\"",
            self.first_file,
            self.start_seq,
            hex(&self.start_hash),
            self.file,
            self.seq,
            hex(&self.hash)
        )
        .into_bytes();
        let seal = key.seal(&out);
        out.extend_from_slice(SEAL_FIELD);
        push_hex(&mut out, &seal);
        out.extend_from_slice(b"\"}\n");
        out
    }

    fn decode(text: &[u8], key: &ChainKey) -> Result<Anchor, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            first_file: u64,
            start_seq: u64,
            start_hash: String,
            file: u64,
            seq: u64,
            hash: String,
        }
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let tail = SEAL_FIELD.len() + 64 + 2;
        if text.len() < tail || !text.ends_with(b"\"}") {
            return Err("not a checkpoint".into());
        }
        let (body, rest) = text.split_at(text.len() - tail);
        let seal = rest
            .strip_prefix(SEAL_FIELD)
            .and_then(|r| std::str::from_utf8(&r[..64]).ok())
            .and_then(unhex)
            .ok_or("not a checkpoint")?;
        if blake3::Hash::from_bytes(seal) != blake3::Hash::from_bytes(key.seal(body)) {
            return Err(
                "its seal does not match the chain key (a different key, or the checkpoint was forged)"
                    .into(),
            );
        }
        let mut json = body.to_vec();
        json.push(b'}');
        let raw: Raw = serde_json::from_slice(&json).map_err(|_| "not a checkpoint")?;
        let start_hash = unhex(&raw.start_hash).ok_or("not a checkpoint")?;
        let hash = unhex(&raw.hash).ok_or("not a checkpoint")?;
        if raw.seq < raw.start_seq || raw.first_file == 0 || raw.file < raw.first_file {
            return Err("inconsistent checkpoint".into());
        }
        Ok(Anchor {
            first_file: raw.first_file,
            start_seq: raw.start_seq,
            start_hash,
            file: raw.file,
            seq: raw.seq,
            hash,
        })
    }
}

/// The path of the checkpoint of the log `stem` in `dir`: `{dir}/{stem}.checkpoint`.
pub fn checkpoint_path(dir: impl AsRef<Path>, stem: &str) -> PathBuf {
    dir.as_ref().join(format!("{stem}.checkpoint"))
}

/// Reads and checks the seal of the checkpoint of the log `stem` in `dir`. `Ok(None)` when
/// there is none; an error when it cannot be read, is not a checkpoint, or its seal does not
/// match `key`.
pub fn read_checkpoint(
    dir: impl AsRef<Path>,
    stem: &str,
    key: &ChainKey,
) -> Result<Option<Checkpoint>, AuditError> {
    read_anchor(dir.as_ref(), stem, key).map(|a| a.map(|a| a.public()))
}

fn read_anchor(dir: &Path, stem: &str, key: &ChainKey) -> Result<Option<Anchor>, AuditError> {
    let path = checkpoint_path(dir, stem);
    let mut text = Vec::new();
    match File::open(&path) {
        Ok(f) => {
            f.take(4096).read_to_end(&mut text)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    Anchor::decode(&text, key)
        .map(Some)
        .map_err(|why| AuditError::Tampered(format!("{}: {why}", path.display())))
}

/// Configures a [`FileSink`].
#[derive(Debug, Clone)]
pub struct FileSinkBuilder {
    dir: PathBuf,
    stem: String,
    max_bytes: Option<u64>,
    period: Option<u64>,
    key: ChainKey,
    capacity: usize,
    max_files: Option<usize>,
    max_age: Option<Duration>,
    lock_timeout: Duration,
    continue_newest: bool,
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
    /// default. Same as `rotate_every(Duration::from_secs(86_400))`.
    pub fn rotate_daily(mut self, yes: bool) -> Self {
        self.period = yes.then_some(86_400);
        self
    }

    /// Starts a new file when an event falls in a later period of `every` (whole seconds,
    /// at least one; periods counted from the Unix epoch, so `3600` rotates on the hour)
    /// than the current file's. Event times decide, so rotation follows the clock the
    /// events were stamped with.
    pub fn rotate_every(mut self, every: Duration) -> Self {
        self.period = Some(every.as_secs().max(1));
        self
    }

    /// Retention: keeps at most `n` files (at least 1, the one being written), removing the
    /// oldest when a new file starts. The checkpoint's start point moves past removed files
    /// so the rest still verifies. Off by default.
    pub fn max_files(mut self, n: usize) -> Self {
        self.max_files = Some(n.max(1));
        self
    }

    /// Retention: when a new file starts, removes files last written more than `age` ago
    /// (by their modification time; never the file being written). Off by default.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Whether opening the log continues in its newest file instead of starting a new one,
    /// when that file ends with the complete line the checkpoint records (default: off, each
    /// open starts a new file). Meant for short-lived writers, such as one command of a CLI
    /// that records a single key change: with it they do not leave a one-line file each.
    /// A file that ends in a partial line (a crash) is never continued, and with time
    /// rotation ([`rotate_every`](Self::rotate_every), [`rotate_daily`](Self::rotate_daily))
    /// each open still starts a new file. Size rotation applies as usual.
    pub fn continue_newest_file(mut self, yes: bool) -> Self {
        self.continue_newest = yes;
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

    /// How long a writer waits for another writer's lock on the log before failing with
    /// [`AuditError::Locked`] (default 10 s).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Creates the directory if needed (0700), takes the log's lock, checks that the log's
    /// last line matches its checkpoint, and sets up to continue the chain in a new file,
    /// opened on the first event.
    ///
    /// Fails with [`AuditError::Tampered`] when the checkpoint is sealed with another key
    /// or forged, when the log ends before its checkpoint (lines cut off, files removed or
    /// emptied), or when log files exist without a checkpoint: such a log is not continued.
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
        create_dir(&self.dir)?;
        let lock = owner_only()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("{}.lock", self.stem)))?;
        let mut state = State {
            dir: self.dir,
            stem: self.stem,
            max_bytes: self.max_bytes,
            period: self.period,
            key: self.key,
            capacity: self.capacity,
            max_files: self.max_files,
            max_age: self.max_age,
            lock_timeout: self.lock_timeout,
            continue_newest: self.continue_newest,
            lock,
            locked: false,
            writer: None,
            index: 1,
            bytes: 0,
            slot: 0,
            seq: 0,
            prev: GENESIS,
            first_file: 1,
            start: (0, GENESIS),
            known: None,
            dirty: false,
            buf: Vec::with_capacity(1024),
        };
        state.begin()?;
        state.end(false)?;
        Ok(FileSink {
            state: Mutex::new(state),
        })
    }
}

/// A JSON Lines audit log with a keyed blake3 hash chain, a sealed checkpoint, a writers'
/// lock, rotation, retention and verification. The format and what verification proves
/// follow the next paragraph.
///
/// Reopening a directory continues the chain of its newest file in a new file (a partial
/// last line left by a crash stays, and verification reports it). While it appends, a sink
/// holds the log's lock: from the first event after a flush until the next
/// [`AuditSink::flush`] / [`AuditSink::sync`] (which also update the checkpoint). Another
/// writer of the same log (another process, or another sink in this one) waits for it, then
/// continues the chain where it ended, in the newest file.
///
/// Writes go through a buffer; [`AuditSink::flush`] hands it to the operating system and
/// [`AuditSink::sync`] also `fsync`s. Every event is scanned for anything shaped like an
/// API key, which is masked ([`mask_keys`](super::mask_keys)). Use it behind a background
/// [`Auditor`](super::Auditor) so requests never wait on the disk (its writer flushes
/// whenever its queue runs dry, so the lock is held for one batch at a time).
///
/// # The format
///
/// A tamper-evident JSON Lines file sink ([`FileSink`]) and its verifier ([`verify_dir`],
/// [`verify_files`]).
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
///   keyed by [`ChainKey`].
///
/// Beside the log files `{stem}-NNNNNN.jsonl` live two more:
///
/// - `{stem}.checkpoint`: the **anchor**. One line naming the log's last line (`seq` and
///   `hash`), its first file and the point the chain starts from (after retention removed
///   older files), sealed with the chain key. Writers update it each time they hand lines to
///   the operating system; [`verify_dir`] checks the log against it, so lines cut off the
///   end, an emptied log or deleted files fail verification, and a writer opening a log
///   whose tail does not match it refuses to continue it ([`AuditError::Tampered`]).
/// - `{stem}.lock`: an advisory lock (`flock`) every writer holds while it appends, so two
///   writers (a server and the CLI) take turns and the chain stays one line after another.
///
/// What verification proves, and what it cannot:
///
/// - with a **secret** chain key ([`ChainKey::from_env`], [`ChainKey::from_file`]) that an
///   attacker does not hold: any edit, deletion, reordering, insertion, truncation, removed
///   file or full rewrite of the log (or of its checkpoint) is detected, and the first bad
///   line is named;
/// - with the **public default** key, or against an attacker who can read the key: a
///   consistent rewrite of the whole log and its checkpoint cannot be told from the real
///   thing. Keep the key where the log's writers can read it but the people you audit
///   cannot (a key file beside the log protects against mistakes and against anyone who
///   cannot read that file, not against its owner);
/// - lines lost in a crash after the last checkpoint was written are not noticed (the
///   checkpoint trails the log by at most one writer batch); a partial last line is.
///
/// Rotation (by size, by time) starts a new file whose first line continues the chain;
/// retention ([`FileSinkBuilder::max_files`], [`FileSinkBuilder::max_age`]) removes the
/// oldest files and moves the checkpoint's start point past them, so the rest still
/// verifies. Files are created owner-only (0600), the directory (when created) 0700.
///
/// ```
/// use keygate_core::audit::{verify_dir, AuditSink, ChainKey, FileSink, RequestEvent, VerifyOptions};
/// use std::time::UNIX_EPOCH;
///
/// let dir = std::env::temp_dir().join(format!("keygate-doc-file-{}", std::process::id()));
/// let key = ChainKey::new(b"a secret kept away from the people being audited");
/// let sink = FileSink::builder(&dir).key(key.clone()).open().unwrap();
/// for i in 0..3 {
///     sink.record(&RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into()).unwrap();
/// }
/// sink.sync().unwrap();
/// let options = VerifyOptions { key, ..VerifyOptions::default() };
/// let report = verify_dir(&dir, "audit", &options).unwrap();
/// assert_eq!(report.lines, 3);
/// assert_eq!(report.last.unwrap().seq, 3);
/// // The public default key does not verify it.
/// assert!(verify_dir(&dir, "audit", &VerifyOptions::default()).is_err());
/// # drop(sink);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub struct FileSink {
    state: Mutex<State>,
}

struct State {
    dir: PathBuf,
    stem: String,
    max_bytes: Option<u64>,
    /// Rotation period in seconds.
    period: Option<u64>,
    key: ChainKey,
    capacity: usize,
    max_files: Option<usize>,
    max_age: Option<Duration>,
    lock_timeout: Duration,
    /// Whether a sink without an open file continues in the newest one (see
    /// [`FileSinkBuilder::continue_newest_file`]).
    continue_newest: bool,
    /// The open lock file (`{stem}.lock`).
    lock: File,
    /// Whether this sink holds the lock now.
    locked: bool,
    /// The open file, if any (opened on the first event, reopened after a write error).
    writer: Option<BufWriter<File>>,
    /// The index of the open file, or of the next one to open.
    index: u64,
    /// Bytes in the open file.
    bytes: u64,
    /// The rotation period (event time / period) of the open file.
    slot: u64,
    /// The last written line's seq (0: none yet).
    seq: u64,
    /// The last written line's hash.
    prev: [u8; 32],
    /// The log's first file.
    first_file: u64,
    /// The line before the first file's first line.
    start: (u64, [u8; 32]),
    /// The checkpoint on disk, as this sink last read or wrote it.
    known: Option<Anchor>,
    /// Lines were written since the checkpoint was.
    dirty: bool,
    buf: Vec<u8>,
}

impl FileSink {
    /// Configures a sink writing into `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> FileSinkBuilder {
        FileSinkBuilder {
            dir: dir.into(),
            stem: "audit".to_owned(),
            max_bytes: None,
            period: None,
            key: ChainKey::default(),
            capacity: 64 * 1024,
            max_files: None,
            max_age: None,
            lock_timeout: Duration::from_secs(10),
            continue_newest: false,
        }
    }

    /// The last line written (or continued from): anchor it elsewhere too, if you like.
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

    /// The path of the log's checkpoint.
    pub fn checkpoint_file(&self) -> PathBuf {
        let s = self.lock();
        checkpoint_path(&s.dir, &s.stem)
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

    /// Takes the log's lock (waiting up to the lock timeout) and brings this sink's view of
    /// the log up to date with the disk. On error the lock is released.
    fn begin(&mut self) -> Result<(), AuditError> {
        if self.locked {
            return Ok(());
        }
        let deadline = Instant::now() + self.lock_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match try_lock(&self.lock) {
                Ok(true) => break,
                Ok(false) => {
                    if Instant::now() >= deadline {
                        return Err(AuditError::Locked(format!(
                            "{}: another writer held the lock for over {:?}",
                            self.dir.join(format!("{}.lock", self.stem)).display(),
                            self.lock_timeout
                        )));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.locked = true;
        if let Err(e) = self.catch_up() {
            self.unlock();
            return Err(e);
        }
        Ok(())
    }

    fn unlock(&mut self) {
        if self.locked {
            if let Err(e) = unlock(&self.lock) {
                tracing::error!(error = %e, "audit log unlock failed");
            }
            self.locked = false;
        }
    }

    /// Under the lock: reads the checkpoint and, when another writer moved it (or this sink
    /// has no view yet), checks the log's tail against it and continues from there.
    fn catch_up(&mut self) -> Result<(), AuditError> {
        let disk = read_anchor(&self.dir, &self.stem, &self.key)?;
        if disk.is_some() && disk == self.known && self.writer.is_some() {
            return Ok(());
        }
        let segs = segments(&self.dir, &self.stem)?;
        let newest = segs.last().map_or(0, |(i, _)| *i);
        let mut tail = None;
        for (i, path) in segs.iter().rev() {
            if let Some(t) = last_line(path)? {
                tail = Some((*i, t));
                break;
            }
        }
        let name = || format!("{}/{}-*.jsonl", self.dir.display(), self.stem);
        match disk {
            None => {
                if tail.is_some() {
                    return Err(AuditError::Tampered(format!(
                        "{} has lines but no checkpoint ({}.checkpoint): it may have been cut or replaced; refusing to continue it (check it with `keygate audit verify`, then move it away)",
                        name(),
                        self.stem
                    )));
                }
                self.seq = 0;
                self.prev = GENESIS;
                self.start = (0, GENESIS);
                self.first_file = segs.first().map_or(newest + 1, |(i, _)| *i);
                self.dirty = true;
            }
            Some(a) => {
                let found = tail.map_or((a.start_seq, a.start_hash), |(_, t)| t);
                if found != (a.seq, a.hash) {
                    let extended = found.0 > a.seq
                        && extends(&segs, &a, &self.key).is_some_and(|end| end == found);
                    if !extended {
                        return Err(AuditError::Tampered(format!(
                            "{} ends at seq {} but its checkpoint says seq {}{}: lines were cut off, removed or changed; refusing to continue it (check it with `keygate audit verify`)",
                            name(),
                            found.0,
                            a.seq,
                            if found.0 == a.seq { " with another hash" } else { "" }
                        )));
                    }
                    // A crash between writing lines and the checkpoint: the lines after it
                    // chain correctly from it; adopt them.
                    self.dirty = true;
                } else {
                    self.dirty = false;
                }
                self.seq = found.0;
                self.prev = found.1;
                self.first_file = a.first_file;
                self.start = (a.start_seq, a.start_hash);
            }
        }
        self.known = disk;
        match self.writer.take() {
            Some(w) if self.index == newest => {
                self.bytes = w.get_ref().metadata()?.len();
                self.writer = Some(w);
            }
            Some(mut w) => {
                // Another writer started a newer file: continue in it.
                w.flush()?;
                let path = self.path(newest);
                let file = owner_only().append(true).open(&path)?;
                self.bytes = file.metadata()?.len();
                self.index = newest;
                self.writer = Some(BufWriter::with_capacity(self.capacity, file));
            }
            None => {
                self.index = newest + 1;
                if self.continue_newest && self.period.is_none() && newest > 0 {
                    let path = self.path(newest);
                    if ends_with_line(&path, (self.seq, self.prev))? {
                        let file = owner_only().append(true).open(&path)?;
                        self.bytes = file.metadata()?.len();
                        self.index = newest;
                        self.writer = Some(BufWriter::with_capacity(self.capacity, file));
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands the lines to the operating system (and to the disk when `durable`), updates
    /// the checkpoint and releases the lock.
    fn end(&mut self, durable: bool) -> Result<(), AuditError> {
        if !self.locked {
            return Ok(());
        }
        let result = self.write_out(durable);
        if result.is_err() {
            // What is on disk is unknown now: read it again next time.
            self.writer = None;
            self.known = None;
        }
        self.unlock();
        result
    }

    fn write_out(&mut self, durable: bool) -> Result<(), AuditError> {
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
            if durable {
                w.get_ref().sync_data()?;
            }
        }
        if self.dirty {
            self.write_checkpoint(durable)?;
        }
        Ok(())
    }

    fn anchor(&self) -> Anchor {
        Anchor {
            first_file: self.first_file,
            start_seq: self.start.0,
            start_hash: self.start.1,
            file: if self.writer.is_some() {
                self.index
            } else {
                self.index.saturating_sub(1).max(self.first_file)
            },
            seq: self.seq,
            hash: self.prev,
        }
    }

    fn write_checkpoint(&mut self, durable: bool) -> Result<(), AuditError> {
        let anchor = self.anchor();
        let text = anchor.encode(&self.key);
        let tmp = self.dir.join(format!("{}.checkpoint.tmp", self.stem));
        {
            let mut f = owner_only()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&text)?;
            if durable {
                f.sync_all()?;
            }
        }
        std::fs::rename(&tmp, checkpoint_path(&self.dir, &self.stem))?;
        self.known = Some(anchor);
        self.dirty = false;
        Ok(())
    }

    fn open_next(&mut self, slot: u64) -> Result<(), AuditError> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
            w.get_ref().sync_data()?;
            self.index += 1;
        }
        let file = owner_only()
            .append(true)
            .create_new(true)
            .open(self.path(self.index))?;
        self.writer = Some(BufWriter::with_capacity(self.capacity, file));
        self.bytes = 0;
        self.slot = slot;
        self.retain()?;
        Ok(())
    }

    /// Removes the oldest files past the retention bounds (never the open one), moving the
    /// checkpoint's start past them first.
    fn retain(&mut self) -> Result<(), AuditError> {
        if self.max_files.is_none() && self.max_age.is_none() {
            return Ok(());
        }
        let segs: Vec<(u64, PathBuf)> = segments(&self.dir, &self.stem)?
            .into_iter()
            .filter(|(i, _)| *i >= self.first_file && *i < self.index)
            .collect();
        let now = SystemTime::now();
        let mut remove = Vec::new();
        for (k, (i, path)) in segs.iter().enumerate() {
            // Files left if this one and the older ones go, plus the open one.
            let left = segs.len() - k;
            let too_many = self.max_files.is_some_and(|max| left + 1 > max);
            let too_old = self.max_age.is_some_and(|age| {
                std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.checked_add(age).is_some_and(|t| t < now))
            });
            if !(too_many || too_old) {
                break;
            }
            remove.push((*i, path.clone()));
        }
        let Some((last_removed, _)) = remove.last() else {
            return Ok(());
        };
        for (_, path) in remove.iter().rev() {
            if let Some(t) = last_line(path)? {
                self.start = t;
                break;
            }
        }
        self.first_file = last_removed + 1;
        // The checkpoint first (a crash in between leaves extra old files, which
        // verification skips), then the files.
        self.write_checkpoint(true)?;
        for (_, path) in &remove {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::error!(file = %path.display(), error = %e, "audit retention could not remove a file");
            }
        }
        Ok(())
    }

    fn write(&mut self, event: &AuditEvent) -> Result<(), AuditError> {
        self.begin()?;
        let seq = self.seq + 1;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(b"{\"seq\":");
        // Formatted straight into the line buffer: no string per line.
        let _ = std::io::Write::write_fmt(&mut buf, format_args!("{seq}"));
        buf.extend_from_slice(b",\"prev\":\"");
        push_hex(&mut buf, &self.prev);
        buf.extend_from_slice(b"\",\"event\":");
        let event_at = buf.len();
        let encoded = serde_json::to_writer(&mut buf, event);
        let result = encoded.map_err(AuditError::from).and_then(|()| {
            // Whatever field it is in, nothing shaped like a key is written.
            mask_keys(&mut buf[event_at..]);
            let hash = self.key.hash(&buf);
            buf.extend_from_slice(HASH_FIELD);
            push_hex(&mut buf, &hash);
            buf.extend_from_slice(b"\"}\n");
            self.append(&buf, slot_of(event.time(), self.period))?;
            self.seq = seq;
            self.prev = hash;
            self.dirty = true;
            Ok(())
        });
        self.buf = buf;
        result
    }

    fn append(&mut self, line: &[u8], slot: u64) -> Result<(), AuditError> {
        let len = line.len() as u64;
        let rotate = match &self.writer {
            None => true,
            Some(_) => {
                self.bytes > 0
                    && (self.max_bytes.is_some_and(|max| self.bytes + len > max)
                        || (self.period.is_some() && slot > self.slot))
            }
        };
        if rotate {
            if let Err(e) = self.open_next(slot) {
                self.known = None;
                return Err(e);
            }
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(AuditError::Other("audit file is not open".into()));
        };
        if let Err(e) = w.write_all(line) {
            // The file may now end in a partial line; read the disk again before the next
            // line (verification reports the damage where it is).
            self.writer = None;
            self.known = None;
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
        self.lock().end(false)
    }

    fn sync(&self) -> Result<(), AuditError> {
        self.lock().end(true)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Err(e) = self.lock().end(false) {
            tracing::error!(error = %e, "audit file flush failed on drop");
        }
    }
}

/// Takes the exclusive advisory lock on `file` if free: `Ok(false)` when another open file
/// description holds it. Elsewhere than Unix there is no lock (one writer per log).
#[cfg(unix)]
fn try_lock(file: &File) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) if e == rustix::io::Errno::INTR => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> io::Result<bool> {
    Ok(true)
}

#[cfg(unix)]
fn unlock(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::Unlock).map_err(Into::into)
}

#[cfg(not(unix))]
fn unlock(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Options for files only the owner may read and write (0600 on Unix).
fn owner_only() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// Creates `dir` and its missing parents owner-only (0700 on Unix); an existing directory
/// is left as it is.
fn create_dir(dir: &Path) -> io::Result<()> {
    create_private_dirs(dir)
}

fn slot_of(t: SystemTime, period: Option<u64>) -> u64 {
    let Some(p) = period else { return 0 };
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / p)
}

fn segment_name(stem: &str, index: u64) -> String {
    format!("{stem}-{index:06}.jsonl")
}

/// The index in a file name `{stem}-{digits}.jsonl`.
fn index_of(name: &str, stem: &str) -> Option<u64> {
    name.strip_prefix(stem)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".jsonl"))
        .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok())
}

/// The files of the log `stem` in `dir`, by index.
fn segments(dir: &Path, stem: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(i) = index_of(name, stem) {
            out.push((i, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The files of the log `stem` in `dir`, oldest first (every file, including any older
/// than the checkpoint's first file).
pub fn log_files(dir: impl AsRef<Path>, stem: &str) -> io::Result<Vec<PathBuf>> {
    Ok(segments(dir.as_ref(), stem)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// The stems of the logs in `dir`: every `{stem}` of a `{stem}-NNNNNN.jsonl` file or a
/// `{stem}.checkpoint`, sorted. `keygate audit verify DIR` checks each.
pub fn log_stems(dir: impl AsRef<Path>) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir.as_ref())? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let stem = if let Some(s) = name.strip_suffix(".checkpoint") {
            Some(s)
        } else if let Some(rest) = name.strip_suffix(".jsonl") {
            rest.rsplit_once('-').and_then(|(s, n)| {
                (!n.is_empty() && n.bytes().all(|c| c.is_ascii_digit())).then_some(s)
            })
        } else {
            None
        };
        if let Some(s) = stem.filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        }) {
            out.push(s.to_owned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[derive(Deserialize)]
struct Tail {
    seq: u64,
    hash: String,
}

/// The seq and hash of the last complete, parseable line of `path`.
/// Whether the file at `path` ends with a newline right after the line of `tail` (its seq
/// and hash): a file a writer may continue without leaving anything unverifiable in it.
fn ends_with_line(path: &Path, tail: (u64, [u8; 32])) -> io::Result<bool> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    // A line is far shorter than this; a longer one is simply not continued.
    let start = len.saturating_sub(1024 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::new();
    Read::by_ref(&mut file)
        .take(len - start)
        .read_to_end(&mut data)?;
    let Some(body) = data.strip_suffix(b"\n") else {
        return Ok(false);
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None if start == 0 => body,
        None => return Ok(false),
    };
    Ok(serde_json::from_slice::<Tail>(line)
        .ok()
        .and_then(|t| Some((t.seq, unhex(&t.hash)?)))
        == Some(tail))
}

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

/// Whether the lines from the checkpoint's line on chain correctly from it: the seq and
/// hash of the last line when they do.
fn extends(segs: &[(u64, PathBuf)], a: &Anchor, key: &ChainKey) -> Option<(u64, [u8; 32])> {
    let mut at: Option<(u64, [u8; 32])> = (a.seq == a.start_seq).then_some((a.seq, a.hash));
    for (_, path) in segs.iter().filter(|(i, _)| *i >= a.first_file) {
        let mut reader = BufReader::new(File::open(path).ok()?);
        let mut line = Vec::new();
        let mut json = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).ok()? == 0 {
                break;
            }
            if line.pop() != Some(b'\n') {
                break; // a partial last line: the chain ends before it
            }
            let l = parse_line(&line, key, &mut json).ok()?;
            match at {
                None if l.seq == a.seq => {
                    if l.hash != a.hash {
                        return None;
                    }
                    at = Some((l.seq, l.hash));
                }
                None => {}
                Some((seq, prev)) => {
                    if seq.checked_add(1) != Some(l.seq) || l.prev != prev {
                        return None;
                    }
                    at = Some((l.seq, l.hash));
                }
            }
        }
    }
    at
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Rendered on the stack, appended once (one capacity check, not 64).
    let mut text = [0u8; 64];
    for (pair, b) in text.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    out.extend_from_slice(&text);
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
    /// (retention). Default: the checkpoint's start ([`verify_dir`]), else the first line
    /// must be `seq` 1 after the genesis hash.
    pub start: Option<ChainPoint>,
    /// The last line the log must end with (an anchor kept elsewhere); detects lines cut off
    /// the end.
    pub end: Option<ChainPoint>,
    /// [`verify_dir`] only: accept a log without a checkpoint (written before checkpoints
    /// existed). Then lines cut off the end go unnoticed unless [`VerifyOptions::end`] is
    /// given. Default `false`: a missing checkpoint fails verification.
    pub allow_missing_checkpoint: bool,
    /// [`verify_files`] only: the checkpoint to check the files against (as
    /// [`read_checkpoint`] returns it; [`verify_dir`] reads it itself). Its start point is
    /// used when [`VerifyOptions::start`] is not set.
    pub checkpoint: Option<Checkpoint>,
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
    /// The checkpoint the log was checked against ([`verify_dir`]), if any.
    pub checkpoint: Option<ChainPoint>,
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
    /// The line's hash does not match its content: it was edited, or the log was written
    /// (or rewritten) with another chain key.
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
    /// The log ends before the line its checkpoint names: lines were cut off the end, or
    /// files removed or emptied.
    CutShort {
        /// The checkpoint's last seq.
        checkpoint: u64,
        /// The last seq found (0: none).
        found: u64,
    },
    /// The line has the checkpoint's seq but not its hash: the log was rewritten.
    CheckpointMismatch,
    /// The log has no checkpoint (`{stem}.checkpoint`): it cannot be checked for lines cut
    /// off the end.
    MissingCheckpoint,
    /// The checkpoint cannot be read, or its seal does not match the key.
    BadCheckpoint(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "unreadable: {e}"),
            Problem::Truncated => f.write_str("truncated line (no newline at the end)"),
            Problem::Malformed => f.write_str("not a chain line"),
            Problem::HashMismatch => f.write_str(
                "hash does not match the line (edited, or written with another chain key)",
            ),
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
            Problem::CutShort { checkpoint, found } => write!(
                f,
                "missing: the log ends at seq {found} but its checkpoint says seq {checkpoint} (lines cut off the end, or files removed or emptied)"
            ),
            Problem::CheckpointMismatch => f.write_str(
                "this line's hash is not the one its checkpoint recorded (the log was rewritten)",
            ),
            Problem::MissingCheckpoint => f.write_str(
                "no checkpoint: the log cannot be checked for lines cut off the end",
            ),
            Problem::BadCheckpoint(why) => write!(f, "bad checkpoint: {why}"),
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
    /// The line number within the file, from 1 (0 when no line applies). For lines cut off
    /// the end, the first missing line.
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

/// One parsed, hash-checked line.
struct Line {
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
}

/// Parses a line (without its newline) and checks its hash.
fn parse_line(
    line: &[u8],
    key: &ChainKey,
    json: &mut Vec<u8>,
) -> Result<Line, (Option<u64>, Problem)> {
    if line.len() < TAIL_LEN || !line.ends_with(b"\"}") {
        return Err((None, Problem::Malformed));
    }
    let (body, tail) = line.split_at(line.len() - TAIL_LEN);
    if !tail.starts_with(HASH_FIELD) {
        return Err((None, Problem::Malformed));
    }
    let hash = std::str::from_utf8(&tail[HASH_FIELD.len()..HASH_FIELD.len() + 64])
        .ok()
        .and_then(unhex)
        .ok_or((None, Problem::Malformed))?;
    json.clear();
    json.extend_from_slice(body);
    json.push(b'}');
    let head: Head = serde_json::from_slice(json).map_err(|_| (None, Problem::Malformed))?;
    let prev = unhex(&head.prev).ok_or((Some(head.seq), Problem::Malformed))?;
    if key.hash(body) != hash {
        return Err((Some(head.seq), Problem::HashMismatch));
    }
    Ok(Line {
        seq: head.seq,
        prev,
        hash,
    })
}

/// Verifies the chain through `files`, in the order given (oldest first). Stops at the first
/// broken line. Does not read a checkpoint itself (see [`verify_dir`]); checks against
/// [`VerifyOptions::checkpoint`] when given.
pub fn verify_files<P: AsRef<Path>>(
    files: &[P],
    options: &VerifyOptions,
) -> Result<VerifyReport, BrokenChain> {
    let Some(cp) = &options.checkpoint else {
        return walk(files, options, None);
    };
    let malformed = || BrokenChain {
        file: PathBuf::new(),
        line: 0,
        seq: None,
        problem: Problem::BadCheckpoint("not a chain point".into()),
    };
    let a = Anchor {
        first_file: cp.first_file,
        start_seq: cp.start.seq,
        start_hash: unhex(&cp.start.hash).ok_or_else(malformed)?,
        file: cp.file,
        seq: cp.last.seq,
        hash: unhex(&cp.last.hash).ok_or_else(malformed)?,
    };
    let mut opts = options.clone();
    if opts.start.is_none() {
        opts.start = Some(cp.start.clone());
    }
    let none = PathBuf::new();
    walk(files, &opts, Some((&a, &none)))
}

fn walk<P: AsRef<Path>>(
    files: &[P],
    options: &VerifyOptions,
    anchor: Option<(&Anchor, &Path)>,
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
    let mut last_file = files
        .first()
        .map(|p| p.as_ref().to_path_buf())
        .or_else(|| anchor.map(|(_, p)| p.to_path_buf()))
        .unwrap_or_default();
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
            let l = parse_line(&line, &options.key, &mut json)
                .map_err(|(s, problem)| broken(n, s, problem))?;
            // No line can follow seq u64::MAX (a start point may name it).
            if seq.checked_add(1) != Some(l.seq) {
                return Err(broken(
                    n,
                    Some(l.seq),
                    Problem::SequenceGap {
                        expected: seq.saturating_add(1),
                        found: l.seq,
                    },
                ));
            }
            if l.prev != prev {
                return Err(broken(n, Some(l.seq), Problem::PrevMismatch));
            }
            if let Some((a, _)) = anchor {
                if l.seq == a.seq && l.hash != a.hash {
                    return Err(broken(n, Some(l.seq), Problem::CheckpointMismatch));
                }
            }
            seq = l.seq;
            prev = l.hash;
            lines += 1;
        }
        last_file = path.to_path_buf();
        last_line_no = n;
    }
    let last = (lines > 0 || options.start.is_some()).then(|| ChainPoint {
        seq,
        hash: hex(&prev),
    });
    let found = if lines > 0 { seq } else { 0 };
    if let Some((a, _)) = anchor {
        if seq < a.seq {
            return Err(BrokenChain {
                file: last_file,
                line: last_line_no + 1,
                seq: None,
                problem: Problem::CutShort {
                    checkpoint: a.seq,
                    found,
                },
            });
        }
    }
    if let Some(end) = &options.end {
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
        checkpoint: anchor.map(|(a, _)| ChainPoint {
            seq: a.seq,
            hash: hex(&a.hash),
        }),
    })
}

/// Verifies the log `stem` in `dir` against its checkpoint: the checkpoint's seal (with
/// [`VerifyOptions::key`]), then every line from the checkpoint's first file on, starting
/// from its start point, and that the log reaches the checkpoint's last line with the
/// hash it recorded. Without a checkpoint it fails ([`Problem::MissingCheckpoint`]) unless
/// [`VerifyOptions::allow_missing_checkpoint`] is set (then every file is checked from
/// `seq` 1 or [`VerifyOptions::start`]).
pub fn verify_dir(
    dir: impl AsRef<Path>,
    stem: &str,
    options: &VerifyOptions,
) -> Result<VerifyReport, BrokenChain> {
    let dir = dir.as_ref();
    let cp_path = checkpoint_path(dir, stem);
    let segs = segments(dir, stem).map_err(|e| BrokenChain {
        file: dir.to_path_buf(),
        line: 0,
        seq: None,
        problem: Problem::Unreadable(e.to_string()),
    })?;
    let anchor = match read_anchor(dir, stem, &options.key) {
        Ok(a) => a,
        Err(e) => {
            // A checkpoint sealed with another key: name the first line that does not
            // verify with this key, if any (a rewrite shows at its first line), else the
            // checkpoint itself.
            let files: Vec<PathBuf> = segs.into_iter().map(|(_, p)| p).collect();
            walk(&files, options, None)?;
            return Err(BrokenChain {
                file: cp_path.clone(),
                line: 1,
                seq: None,
                problem: Problem::BadCheckpoint(match e {
                    AuditError::Tampered(why) => why
                        .strip_prefix(&format!("{}: ", cp_path.display()))
                        .unwrap_or(&why)
                        .to_owned(),
                    other => other.to_string(),
                }),
            });
        }
    };
    match anchor {
        None => {
            if !options.allow_missing_checkpoint {
                return Err(BrokenChain {
                    file: cp_path,
                    line: 0,
                    seq: None,
                    problem: Problem::MissingCheckpoint,
                });
            }
            let files: Vec<PathBuf> = segs.into_iter().map(|(_, p)| p).collect();
            walk(&files, options, None)
        }
        Some(a) => {
            let files: Vec<PathBuf> = segs
                .into_iter()
                .filter(|(i, _)| *i >= a.first_file)
                .map(|(_, p)| p)
                .collect();
            let mut opts = options.clone();
            if opts.start.is_none() {
                opts.start = Some(ChainPoint {
                    seq: a.start_seq,
                    hash: hex(&a.start_hash),
                });
            }
            let first = dir.join(segment_name(stem, a.first_file));
            walk(&files, &opts, Some((&a, &first)))
        }
    }
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
        assert_eq!(
            index_of("keygate-audit-000012.jsonl", "keygate-audit"),
            Some(12)
        );
        assert_eq!(index_of("keygate-audit-000012.jsonl", "audit"), None);
    }

    #[test]
    fn checkpoints_round_trip_and_are_sealed() {
        let key = ChainKey::new(b"k");
        let a = Anchor {
            first_file: 2,
            start_seq: 10,
            start_hash: [1; 32],
            file: 3,
            seq: 42,
            hash: [7; 32],
        };
        let text = a.encode(&key);
        assert_eq!(Anchor::decode(&text, &key), Ok(a));
        assert!(Anchor::decode(&text, &ChainKey::default()).is_err());
        let forged = String::from_utf8(text)
            .unwrap()
            .replace("\"seq\":42", "\"seq\":41");
        assert!(Anchor::decode(forged.as_bytes(), &key).is_err());
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
