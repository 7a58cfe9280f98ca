//! `keygate audit verify | tail | events`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use keygate_core::audit::{log_files, verify_files, AuditEvent, ChainKey, VerifyOptions};
use keygate_sql::AuditQuery;
use serde_json::{json, Value};

use crate::cli::{Cli, EventsArgs, TailArgs, VerifyArgs};
use crate::output::{self, print, print_json};
use crate::{db, warning, Failure};

/// The files of `path`: itself, or a directory's log files (oldest first).
fn expand(path: &Path, stem: &str) -> Result<Vec<PathBuf>, Failure> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let files = log_files(path, stem)
        .map_err(|e| Failure::Failed(format!("cannot list {}: {e}", path.display())))?;
    if files.is_empty() {
        return Err(Failure::Failed(format!(
            "no audit log files ({stem}-NNNNNN.jsonl) in {}",
            path.display()
        )));
    }
    Ok(files)
}

/// `audit verify FILE...`.
pub(crate) fn verify(args: &VerifyArgs, json: bool) -> Result<(), Failure> {
    let key = match &args.chain_key_file {
        Some(p) => {
            let mut secret = std::fs::read(p)
                .map_err(|e| Failure::Failed(format!("cannot read {}: {e}", p.display())))?;
            while matches!(secret.last(), Some(b'\n' | b'\r')) {
                secret.pop();
            }
            ChainKey::new(&secret)
        }
        None => ChainKey::default(),
    };
    let mut files = Vec::new();
    for f in &args.files {
        files.extend(expand(f, &args.stem)?);
    }
    let options = VerifyOptions {
        key,
        start: args.start.clone(),
        end: args.end.clone(),
    };
    match verify_files(&files, &options) {
        Ok(report) => {
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
        Err(broken) => {
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
    let mut files = if is_dir {
        log_files(&args.file, &args.stem)
            .map_err(|e| Failure::Failed(format!("cannot list {}: {e}", args.file.display())))?
    } else {
        vec![args.file.clone()]
    };
    if files.is_empty() && !args.follow {
        return Err(Failure::Failed(format!(
            "no audit log files ({}-NNNNNN.jsonl) in {}",
            args.stem,
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
            let now = log_files(&args.file, &args.stem).map_err(|e| {
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
    let events = store
        .audit_events(&query)
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    if cli.json {
        return print_json(&Value::Array(
            events
                .iter()
                .map(|e| json!({"seq": e.seq, "event": output::event_json(&e.event)}))
                .collect(),
        ));
    }
    let mut text = String::new();
    for e in &events {
        text.push_str(&output::event_line(u64::try_from(e.seq).ok(), &e.event));
        text.push('\n');
    }
    print(&text)
}
