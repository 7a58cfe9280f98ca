//! Secrets at the showcase's edges: database and Redis URLs shown with their passwords
//! hidden, URLs read from files (so passwords need not be on the command line, where `ps`
//! shows them), and the first-start admin key written to an owner-only file rather than to
//! standard output.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// `url` (a database or Redis URL, or a key/value DSN) with every credential hidden:
/// keygate-core's [`redact_url`](keygate::redact_url).
pub fn redact(url: &str) -> String {
    keygate::redact_url(url)
}

/// Reads a URL from `path` (one line; surrounding whitespace is dropped). A file every
/// user may read (mode `o+r`) is refused: it holds a password. The error names the file,
/// never its contents.
pub fn read_url_file(path: &Path, what: &str) -> Result<String, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read {what} from {}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(format!(
                "{} can be read by every user (mode {mode:o}): it may hold a password; make it owner-only first (chmod 600, or a secret mount with mode 0400)",
                path.display()
            ));
        }
    }
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

/// Refuses a URL with a password given on the command line (`what` names the flag):
/// `ps` and shell histories show arguments to every user. The environment or a file
/// (`*_FILE`) carries it instead. The error never quotes the URL.
pub fn refuse_password_argument(url: &str, flag: &str, env: &str) -> Result<(), String> {
    if redact(url) == url {
        return Ok(());
    }
    Err(format!(
        "{flag} carries a password on the command line, where `ps` shows it to every user: put the URL in {env} or in a file named by {env}_FILE"
    ))
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
