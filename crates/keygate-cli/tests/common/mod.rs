//! Fixtures for running the `keygate` binary as a process against a database of its own:
//! a SQLite file in a temporary directory, or a PostgreSQL schema made for the test and
//! dropped at its end.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keygate_sql::{SqlOptions, SqlStore};
use serde_json::Value;

/// The variable naming the test PostgreSQL server.
pub use keygate_testkit::pg::PG_ENV;

/// Where one test's keys live.
pub struct Env {
    /// A temporary directory: the processes' working directory, the SQLite file's home.
    pub dir: tempfile::TempDir,
    /// The database URL given to the CLI.
    pub url: String,
    /// PostgreSQL: the test's schema (dropped at the end).
    pub schema: Option<String>,
}

impl Env {
    /// A SQLite file that does not exist yet (`keys create` makes it).
    pub fn sqlite() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
        Env {
            dir,
            url,
            schema: None,
        }
    }

    /// A PostgreSQL schema of its own, or `None` (after printing the skip line) when
    /// `KEYGATE_TEST_POSTGRES_URL` is unset. The CLI creates the schema on first use.
    pub fn postgres() -> Option<Env> {
        let url = keygate_testkit::server_url(PG_ENV)?;
        let schema = keygate_testkit::pg::schema_name("kg_cli");
        Some(Env {
            dir: tempfile::tempdir().expect("temp dir"),
            url,
            schema: Some(schema),
        })
    }

    /// `sqlite` or `postgres`.
    pub fn name(&self) -> &'static str {
        if self.schema.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// The SQLite file, if this is SQLite.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        self.schema
            .is_none()
            .then(|| self.dir.path().join("keygate.db"))
    }

    /// The `keygate` binary, with this database in its environment (and no other keygate
    /// variable from the caller's).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KEYGATE_") {
                c.env_remove(k);
            }
        }
        c.current_dir(self.dir.path())
            .env("KEYGATE_DATABASE_URL", &self.url)
            .env("KEYGATE_ACTOR", "tester");
        if let Some(s) = &self.schema {
            c.env("KEYGATE_DATABASE_SCHEMA", s);
        }
        c
    }

    /// Runs `keygate ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Out {
        Out::from(self.cmd().args(args).output().expect("run keygate"))
    }

    /// Options that place a store in this test's database.
    pub fn options(&self) -> SqlOptions {
        match &self.schema {
            Some(s) => SqlOptions::new().schema(s.clone()),
            None => SqlOptions::new(),
        }
    }

    /// A store handle of the test's own.
    pub async fn store(&self) -> SqlStore {
        SqlStore::open_with(&self.url, self.options())
            .await
            .expect("open the store")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(schema) = &self.schema {
            keygate_testkit::pg::drop_schema(&self.url, schema);
        }
    }
}

/// What a process did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Self {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Out {
    /// Asserts exit code 0.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }

    /// Stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts a failure with `code`, nothing on stdout and exactly one line on stderr,
    /// starting `keygate: `.
    #[track_caller]
    pub fn fails(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "exit code: {self:?}");
        assert_eq!(self.stdout, "", "nothing on stdout: {self:?}");
        assert!(
            self.stderr.starts_with("keygate: ")
                && self.stderr.ends_with('\n')
                && self.stderr.lines().count() == 1,
            "one line on stderr: {:?}",
            self.stderr
        );
        self
    }
}

/// Generates both backends' tests from one async check `fn(&Env)`.
#[macro_export]
macro_rules! both {
    ($sqlite:ident, $postgres:ident, $check:path) => {
        keygate_testkit::sqlite_and_postgres!(
            $sqlite,
            $postgres,
            $check,
            sqlite = $crate::common::Env::sqlite(),
            postgres = $crate::common::Env::postgres()
        );
    };
}

/// Creates a key with `args` (after `keys create --json`); returns its JSON (with `key`).
#[track_caller]
pub fn create(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["keys", "create", "--json"];
    all.extend_from_slice(args);
    env.run(&all).ok().json()
}

/// Polls `check` until it returns `Some`, failing after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every file under `dir`, for "nothing was created" checks.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}
