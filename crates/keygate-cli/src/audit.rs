//! `keygate audit verify | tail | events | anomalies`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use keygate_core::audit::{
    checkpoint_path, log_files, log_stems, read_checkpoint, verify_dir, verify_files, AuditEvent,
    BrokenChain, ChainKey, Problem, VerifyOptions, VerifyReport,
};
use keygate_sql::AuditQuery;
use serde_json::{json, Value};

use crate::cli::{AnomaliesArgs, Cli, EventsArgs, TailArgs, VerifyArgs};
use crate::output::{self, print, print_json};
use crate::{db, warning, Failure};

/// The stem of a log file's name (`keygate-audit-000001.jsonl`: `keygate-audit`).
fn stem_of(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    let (stem, n) = name.strip_suffix(".jsonl")?.rsplit_once('-')?;
    if stem.is_empty() || n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, stem.to_owned()))
}

/// The stems of the logs in `dir` (`stem` when given), or a failure when there is none.
fn stems(dir: &Path, stem: Option<&str>) -> Result<Vec<String>, Failure> {
    if let Some(s) = stem {
        return Ok(vec![s.to_owned()]);
    }
    let found = log_stems(dir)
        .map_err(|e| Failure::Failed(format!("cannot list {}: {e}", dir.display())))?;
    if found.is_empty() {
        return Err(Failure::Failed(format!(
            "no audit log files (STEM-NNNNNN.jsonl) in {}",
            dir.display()
        )));
    }
    Ok(found)
}

/// The chain key for the log `stem` in `dir`: --chain-key-file, the environment, the key
/// file beside the log, or the public key. The last two come with a caveat for the reader
/// (printed on stderr when the log verifies).
fn chain_key(
    args: &VerifyArgs,
    dir: &Path,
    stem: &str,
    caveats: &mut Vec<String>,
) -> Result<ChainKey, Failure> {
    if let Some(p) = &args.chain_key_file {
        return ChainKey::from_file(p).map_err(|e| Failure::Failed(e.to_string()));
    }
    if let Some(k) = ChainKey::from_env().map_err(|e| Failure::Failed(e.to_string()))? {
        return Ok(k);
    }
    let beside = dir.join(format!("{stem}.key"));
    if beside.exists() {
        caveats.push(format!(
            "checked with the chain key in {} beside the log: a rewrite by someone who can read that file would not be detected",
            beside.display()
        ));
        return ChainKey::from_file(&beside).map_err(|e| Failure::Failed(e.to_string()));
    }
    caveats.push(
        "checked with the public default chain key (none given with --chain-key-file, KEYGATE_AUDIT_KEY or KEYGATE_AUDIT_KEY_FILE): a rewrite of the whole log would not be detected".into(),
    );
    Ok(ChainKey::default())
}

/// `audit verify FILE...`: every log of each directory against its checkpoint; files given
/// one by one in the order given, against their log's checkpoint.
pub(crate) fn verify(args: &VerifyArgs, json: bool) -> Result<(), Failure> {
    let mut total = VerifyReport {
        files: 0,
        lines: 0,
        last: None,
        checkpoint: None,
    };
    // Files given one by one: one run per log (same directory and stem), in order.
    let mut runs: Vec<(PathBuf, String, Vec<PathBuf>)> = Vec::new();
    let mut dirs: Vec<(PathBuf, String)> = Vec::new();
    for f in &args.files {
        let meta = std::fs::metadata(f)
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", f.display())))?;
        if meta.is_dir() {
            for stem in stems(f, args.stem.as_deref())? {
                dirs.push((f.clone(), stem));
            }
            continue;
        }
        let (dir, stem) = stem_of(f).unwrap_or_else(|| {
            (
                f.parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                String::new(),
            )
        });
        match runs.last_mut() {
            Some((d, s, files)) if *d == dir && *s == stem => files.push(f.clone()),
            _ => runs.push((dir, stem, vec![f.clone()])),
        }
    }
    let mut caveats = Vec::new();
    let result = (|| -> Result<(), Stop> {
        for (dir, stem) in &dirs {
            let options = VerifyOptions {
                key: chain_key(args, dir, stem, &mut caveats).map_err(Stop::Failed)?,
                start: args.start.clone(),
                end: args.end.clone(),
                allow_missing_checkpoint: args.no_checkpoint,
                checkpoint: None,
            };
            add(&mut total, verify_dir(dir, stem, &options)?);
        }
        for (dir, stem, files) in &runs {
            let key = chain_key(args, dir, stem, &mut caveats).map_err(Stop::Failed)?;
            let checkpoint = if stem.is_empty() {
                None
            } else {
                read_checkpoint(dir, stem, &key).map_err(|e| {
                    Stop::Broken(BrokenChain {
                        file: checkpoint_path(dir, stem),
                        line: 1,
                        seq: None,
                        problem: Problem::BadCheckpoint(e.to_string()),
                    })
                })?
            };
            if checkpoint.is_none() && !args.no_checkpoint {
                return Err(Stop::Broken(BrokenChain {
                    file: if stem.is_empty() {
                        files[0].clone()
                    } else {
                        checkpoint_path(dir, stem)
                    },
                    line: 0,
                    seq: None,
                    problem: Problem::MissingCheckpoint,
                }));
            }
            let options = VerifyOptions {
                key,
                start: args.start.clone(),
                end: args.end.clone(),
                allow_missing_checkpoint: args.no_checkpoint,
                checkpoint,
            };
            add(&mut total, verify_files(files, &options)?);
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            caveats.dedup();
            for c in &caveats {
                warning(c);
            }
            let report = total;
            if json {
                print_json(&json!({
                    "ok": true,
                    "files": report.files,
                    "lines": report.lines,
                    "last": report.last.as_ref().map(|p| json!({"seq": p.seq, "hash": p.hash})),
                }))
            } else {
                let last = report
                    .last
                    .as_ref()
                    .map(|p| format!(", last seq {} hash {}", p.seq, p.hash))
                    .unwrap_or_default();
                print(&format!(
                    "ok: {} lines in {} file(s){last}\n",
                    report.lines, report.files
                ))
            }
        }
        Err(Stop::Failed(f)) => Err(f),
        Err(Stop::Broken(broken)) => {
            if json {
                print_json(&json!({
                    "ok": false,
                    "file": broken.file.display().to_string(),
                    "line": broken.line,
                    "seq": broken.seq,
                    "problem": broken.problem.to_string(),
                }))?;
            }
            Err(Failure::Reported(format!("audit log broken: {broken}")))
        }
    }
}

/// Why verification stopped: a broken log, or something else (a chain key that could not
/// be loaded).
enum Stop {
    Broken(BrokenChain),
    Failed(Failure),
}

impl From<BrokenChain> for Stop {
    fn from(b: BrokenChain) -> Self {
        Stop::Broken(b)
    }
}

fn add(total: &mut VerifyReport, r: VerifyReport) {
    total.files += r.files;
    total.lines += r.lines;
    total.last = r.last;
}

/// One line of a log: a chain line (`{"seq":..,"event":{..},..}`) or a bare event.
fn parse_line(line: &[u8]) -> Option<(Option<u64>, AuditEvent)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    if let Some(event) = v.get("event") {
        let seq = v.get("seq").and_then(Value::as_u64);
        let event = serde_json::from_value(event.clone()).ok()?;
        return Some((seq, event));
    }
    serde_json::from_value(v).ok().map(|e| (None, e))
}

fn render(seq: Option<u64>, event: &AuditEvent, json: bool) -> String {
    if json {
        // The event's own stable JSON, one per line.
        format!("{}\n", output::event_json(event))
    } else {
        format!("{}\n", output::event_line(seq, event))
    }
}

/// Reads a file from `pos`: the complete lines after it, and the position after the last
/// complete line (a partial last line is left for later).
struct Reader {
    path: PathBuf,
    pos: u64,
    /// Lines read so far in this file (for warnings).
    line_no: u64,
}

impl Reader {
    fn new(path: PathBuf) -> Self {
        Reader {
            path,
            pos: 0,
            line_no: 0,
        }
    }

    /// The complete lines appended since the last call. Restarts from the beginning if the
    /// file became shorter (replaced or truncated).
    fn read_new(&mut self) -> Result<Vec<Vec<u8>>, Failure> {
        let mut f = File::open(&self.path)
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", self.path.display())))?;
        let len = f
            .metadata()
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", self.path.display())))?
            .len();
        if len < self.pos {
            warning(&format!(
                "{} became shorter; reading it again from the start",
                self.path.display()
            ));
            self.pos = 0;
            self.line_no = 0;
        }
        if len == self.pos {
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(self.pos))
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", self.path.display())))?;
        let mut buf = Vec::new();
        f.take(len - self.pos)
            .read_to_end(&mut buf)
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", self.path.display())))?;
        let complete = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => 0,
        };
        self.pos += complete as u64;
        Ok(buf[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect())
    }

    /// Parses lines, warning about those that are not events.
    fn events(&mut self, lines: Vec<Vec<u8>>) -> Vec<(Option<u64>, AuditEvent)> {
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            self.line_no += 1;
            match parse_line(&line) {
                Some(e) => out.push(e),
                None => warning(&format!(
                    "{} line {} is not an audit event; skipped",
                    self.path.display(),
                    self.line_no
                )),
            }
        }
        out
    }
}

/// `audit tail FILE`: the last events (or all), then, with `--follow`, new ones as they
/// come, following a directory's log into new files.
pub(crate) fn tail(args: &TailArgs, json: bool) -> Result<(), Failure> {
    let is_dir = std::fs::metadata(&args.file)
        .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", args.file.display())))?
        .is_dir();
    let stem = match (&args.stem, is_dir) {
        (Some(s), _) => s.clone(),
        (None, false) => String::new(),
        (None, true) => {
            let found = log_stems(&args.file).map_err(|e| {
                Failure::Failed(format!("cannot list {}: {e}", args.file.display()))
            })?;
            match found.as_slice() {
                [one] => one.clone(),
                [] if args.follow => {
                    return Err(Failure::Usage(
                        "no log in that directory yet: name the one to follow with --stem".into(),
                    ))
                }
                [] => {
                    return Err(Failure::Failed(format!(
                        "no audit log files (STEM-NNNNNN.jsonl) in {}",
                        args.file.display()
                    )))
                }
                many => {
                    return Err(Failure::Usage(format!(
                        "{} holds several logs ({}): choose one with --stem",
                        args.file.display(),
                        many.join(", ")
                    )))
                }
            }
        }
    };
    let mut files = if is_dir {
        log_files(&args.file, &stem)
            .map_err(|e| Failure::Failed(format!("cannot list {}: {e}", args.file.display())))?
    } else {
        vec![args.file.clone()]
    };
    if files.is_empty() && !args.follow {
        return Err(Failure::Failed(format!(
            "no audit log files ({stem}-NNNNNN.jsonl) in {}",
            args.file.display()
        )));
    }
    // What is there now: keep the last N (bounded memory) or print everything.
    let mut last: VecDeque<(Option<u64>, AuditEvent)> = VecDeque::new();
    let mut reader: Option<Reader> = None;
    for f in &files {
        let mut r = Reader::new(f.clone());
        let lines = r.read_new()?;
        for e in r.events(lines) {
            if args.all {
                print(&render(e.0, &e.1, json))?;
            } else {
                last.push_back(e);
                if last.len() > args.lines {
                    last.pop_front();
                }
            }
        }
        reader = Some(r);
    }
    let mut text = String::new();
    for (seq, e) in &last {
        text.push_str(&render(*seq, e, json));
    }
    print(&text)?;
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(args.interval);
        if let Some(r) = reader.as_mut() {
            print_new(r, json)?;
        }
        if is_dir {
            // A newer file: the log rotated (or its first file appeared). Finish the
            // current file, then move to the next one (one at a time, in order).
            let now = log_files(&args.file, &stem).map_err(|e| {
                Failure::Failed(format!("cannot list {}: {e}", args.file.display()))
            })?;
            if let Some(next) = now.iter().find(|f| !files.contains(f)).cloned() {
                if let Some(r) = reader.as_mut() {
                    print_new(r, json)?;
                }
                files.push(next.clone());
                let mut r = Reader::new(next);
                print_new(&mut r, json)?;
                reader = Some(r);
            }
        }
    }
}

/// Prints the events appended to `r`'s file since the last look.
fn print_new(r: &mut Reader, json: bool) -> Result<(), Failure> {
    let lines = r.read_new()?;
    let mut text = String::new();
    for (seq, e) in r.events(lines) {
        text.push_str(&render(seq, &e, json));
    }
    if text.is_empty() {
        Ok(())
    } else {
        print(&text)
    }
}

/// `audit events`: the database's audit table.
pub(crate) async fn events(cli: &Cli, args: &EventsArgs) -> Result<(), Failure> {
    let store = db::open(cli, db::Access::Read).await?;
    let query = AuditQuery {
        after: args.after,
        key_id: args.key_id,
        limit: args.limit,
        latest: args.after.is_none(),
    };
    let entries = store
        .audit_entries(&query)
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    // A row that cannot be read is reported and skipped; the others are printed.
    let mut events = Vec::with_capacity(entries.len());
    let mut skipped = 0u64;
    for e in entries {
        match e.event {
            Ok(event) => events.push((e.seq, event)),
            Err(why) => {
                skipped += 1;
                warning(&format!(
                    "audit event {} in the database is unreadable ({why}); skipped",
                    e.seq
                ));
            }
        }
    }
    if cli.json {
        print_json(&Value::Array(
            events
                .iter()
                .map(|(seq, e)| json!({"seq": seq, "event": output::event_json(e)}))
                .collect(),
        ))?;
    } else {
        let mut text = String::new();
        for (seq, e) in &events {
            text.push_str(&output::event_line(u64::try_from(*seq).ok(), e));
            text.push('\n');
        }
        print(&text)?;
    }
    if skipped > 0 {
        return Err(Failure::Reported(format!(
            "{skipped} unreadable audit event(s) skipped"
        )));
    }
    Ok(())
}

/// `audit anomalies FILE...`: the anomaly detectors over recorded logs, one signal per line
/// (text, or the event's JSON with `--json`). Files are read line by line (memory stays
/// bounded by the detector's caps, whatever the log's size); lines that are not events are
/// skipped with a warning.
pub(crate) fn anomalies(args: &AnomaliesArgs, json: bool) -> Result<(), Failure> {
    use keygate_core::audit::{AnomalyConfig, AnomalyDetector};
    use std::io::{BufRead, BufReader};

    if !(args.spike_factor.is_finite() && args.spike_factor >= 1.0) {
        return Err(Failure::Usage(
            "--spike-factor must be a number of at least 1".into(),
        ));
    }
    let mut files = Vec::new();
    for f in &args.files {
        let meta = std::fs::metadata(f)
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", f.display())))?;
        if meta.is_dir() {
            for stem in stems(f, args.stem.as_deref())? {
                files.extend(
                    log_files(f, &stem).map_err(|e| {
                        Failure::Failed(format!("cannot list {}: {e}", f.display()))
                    })?,
                );
            }
        } else {
            files.push(f.clone());
        }
    }
    let mut detector = AnomalyDetector::new(AnomalyConfig {
        learning: args.learning,
        spike_factor: args.spike_factor,
        spike_min: args.spike_min,
        denial_threshold: args.denials,
        networks_threshold: args.networks,
        ..AnomalyConfig::default()
    });
    for path in &files {
        let file = File::open(path)
            .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", path.display())))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut line_no = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Some((_, event)) = parse_line(text) else {
                warning(&format!(
                    "{} line {line_no} is not an audit event; skipped",
                    path.display()
                ));
                continue;
            };
            for signal in detector.observe(&event) {
                let event = AuditEvent::Anomaly(signal);
                let shown = if json {
                    output::event_json(&event).to_string()
                } else {
                    output::event_line(None, &event)
                };
                print(&format!("{shown}\n"))?;
            }
        }
    }
    Ok(())
}
