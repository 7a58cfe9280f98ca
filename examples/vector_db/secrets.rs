//! Secrets at the showcase's edges: database and Redis URLs shown with their passwords
//! hidden, URLs read from files (so passwords need not be on the command line, where `ps`
//! shows them), and the first-start admin key written to an owner-only file rather than to
//! standard output.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What a hidden password reads as.
const HIDDEN: &str = "***";

/// Query and key/value parameter names whose values are hidden (compared without case).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "passwd",
    "pwd",
    "secret",
    "token",
    "sslpassword",
    "sslkey",
];

fn is_secret(name: &str) -> bool {
    SECRET_PARAMS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name.trim()))
}

/// `url` with every password hidden: the `user:password@` of a URL's authority, query
/// parameters such as `?password=` / `&sslpassword=`, and `password=` pairs of a key/value
/// DSN (`host=db user=app password=...`), quoted values included.
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (head, rest) = url.split_at(scheme_end + 3);
        let (authority, tail) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:{HIDDEN}"),
                    None => userinfo.to_owned(),
                };
                format!("{user}{}", &authority[at..])
            }
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => format!("{path}?{}", redact_query(query)),
            None => tail.to_owned(),
        };
        return format!("{head}{authority}{tail}");
    }
    redact_key_values(url)
}

/// `a=1&password=x#frag` with secret values hidden.
fn redact_query(query: &str) -> String {
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut out: Vec<String> = Vec::new();
    for pair in query.split(['&', ';']) {
        match pair.split_once('=') {
            Some((k, _)) if is_secret(&decode(k)) => out.push(format!("{k}={HIDDEN}")),
            _ => out.push(pair.to_owned()),
        }
    }
    let mut s = out.join("&");
    if let Some(f) = fragment {
        s.push('#');
        s.push_str(f);
    }
    s
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `host=db password='a b' user=x` with secret values (quoted or not) hidden.
fn redact_key_values(dsn: &str) -> String {
    let mut out = String::with_capacity(dsn.len());
    let mut rest = dsn;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        let name = before
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("");
        out.push_str(before);
        out.push('=');
        let value = &after[1..];
        let end = value_end(value);
        if is_secret(name) {
            out.push_str(HIDDEN);
        } else {
            out.push_str(&value[..end]);
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// Where the value at the start of `v` ends: a quoted value at its closing quote
/// (backslash escapes skipped), another at the next whitespace.
fn value_end(v: &str) -> usize {
    let bytes = v.as_bytes();
    if bytes.first() == Some(&b'\'') {
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'\'' => return i + 1,
                _ => i += 1,
            }
        }
        return bytes.len();
    }
    v.find(char::is_whitespace).unwrap_or(v.len())
}

/// Reads a URL from `path` (one line; surrounding whitespace is dropped). The error names
/// the file, never its contents.
pub fn read_url_file(path: &Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {what} from {}: {e}", path.display()))?;
    let url = text.trim();
    if url.is_empty() || url.contains(['\n', '\r']) {
        return Err(format!(
            "{}: the file must hold one URL on one line",
            path.display()
        ));
    }
    Ok(url.to_owned())
}

/// The URL given directly (`--x-url` / `KEYGATE_X_URL`) or in a file (`--x-url-file` /
/// `KEYGATE_X_URL_FILE`); both is an error.
pub fn url_from(
    direct: Option<String>,
    file: Option<&Path>,
    what: &str,
) -> Result<Option<String>, String> {
    match (direct, file) {
        (Some(_), Some(_)) => Err(format!(
            "the {what} URL is given both directly and in a file: give one"
        )),
        (Some(u), None) => Ok(Some(u)),
        (None, Some(f)) => read_url_file(f, &format!("the {what} URL")).map(Some),
        (None, None) => Ok(None),
    }
}

/// A file created for a secret: owner-only (0600 on Unix), never one that already existed.
pub struct SecretFile {
    file: File,
    path: PathBuf,
}

impl SecretFile {
    /// Creates `path`; refuses (with a message naming it) if it exists.
    pub fn create(path: &Path) -> Result<SecretFile, String> {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        match opts.open(path) {
            Ok(file) => Ok(SecretFile {
                file,
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(format!(
                "{} already exists: refusing to overwrite it (move it away, or choose another file with --admin-key-file)",
                path.display()
            )),
            Err(e) => Err(format!("cannot create {}: {e}", path.display())),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `secret` and a newline, and syncs the file to disk.
    pub fn write(mut self, secret: &str) -> Result<(), String> {
        let path = self.path.clone();
        let fail = |e: io::Error| format!("cannot write {}: {e}", path.display());
        self.file
            .write_all(secret.as_bytes())
            .and_then(|()| self.file.write_all(b"\n"))
            .and_then(|()| self.file.sync_all())
            .map_err(fail)
    }

    /// Removes the (unwritten) file.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
