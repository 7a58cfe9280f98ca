//! Shared test fixtures: a database per test (a SQLite temp file, or a PostgreSQL schema of
//! its own, dropped at the end), records, a TCP proxy that can cut connections, polling.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate_core::{
    ApiKey, KeyHasher, KeyId, KeyRecord, Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy,
};
use keygate_sql::{SqlOptions, SqlStore};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

/// The variable naming the test PostgreSQL server.
#[allow(unused_imports)]
pub use keygate_testkit::pg::PG_ENV;

/// A database for one test.
pub enum Db {
    /// A SQLite file in a temporary directory (removed at the end).
    Sqlite { dir: tempfile::TempDir, url: String },
    /// A PostgreSQL schema of its own (dropped at the end).
    Postgres(PgSchema),
}

/// A connection of its own to the SQLite database at `url`.
async fn sqlite_connect(url: &str) -> sqlx::SqliteConnection {
    SqliteConnectOptions::from_str(url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

impl Db {
    /// A new SQLite database file (not created yet: opening creates it).
    pub fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
        Db::Sqlite { dir, url }
    }

    /// A new PostgreSQL schema, or `None` (after printing the skip line) when
    /// `KEYGATE_TEST_POSTGRES_URL` is unset.
    pub async fn postgres() -> Option<Db> {
        PgSchema::create().await.map(Db::Postgres)
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        match self {
            Db::Sqlite { url, .. } => url,
            Db::Postgres(pg) => &pg.url,
        }
    }

    /// Options placing the store in this database (the schema, on PostgreSQL).
    pub fn options(&self) -> SqlOptions {
        match self {
            Db::Sqlite { .. } => SqlOptions::new(),
            Db::Postgres(pg) => SqlOptions::new().schema(pg.schema.clone()),
        }
    }

    /// Opens a store handle (its own pool).
    pub async fn open(&self) -> SqlStore {
        self.open_with(self.options()).await
    }

    /// Opens a store handle with `options`.
    pub async fn open_with(&self, options: SqlOptions) -> SqlStore {
        SqlStore::open_with(self.url(), options)
            .await
            .expect("open the store")
    }

    /// Runs `sql` on a connection of its own, outside the store (to damage rows, read
    /// tables directly).
    pub async fn exec(&self, sql: &str) {
        match self {
            Db::Sqlite { url, .. } => {
                let mut c = sqlite_connect(url).await;
                c.execute(sql).await.expect("exec");
                c.close().await.expect("close");
            }
            Db::Postgres(pg) => {
                let mut c = pg.connect().await;
                c.execute(sql).await.expect("exec");
                c.close().await.expect("close");
            }
        }
    }

    /// One integer from `sql`, on a connection of its own.
    pub async fn scalar(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite { url, .. } => {
                let mut c = sqlite_connect(url).await;
                let v: i64 = sqlx::query_scalar(sql)
                    .fetch_one(&mut c)
                    .await
                    .expect("scalar");
                c.close().await.expect("close");
                v
            }
            Db::Postgres(pg) => {
                let mut c = pg.connect().await;
                let v: i64 = sqlx::query_scalar(sql)
                    .fetch_one(&mut c)
                    .await
                    .expect("scalar");
                c.close().await.expect("close");
                v
            }
        }
    }

    /// `sqlite` or `postgres`.
    pub fn name(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }
}

pub use keygate_testkit::pg::PgSchema;

/// Generates both backends' tests from one async check `fn(&Db)`.
#[macro_export]
macro_rules! both {
    ($sqlite:ident, $postgres:ident, $check:path) => {
        keygate_testkit::sqlite_and_postgres!(
            $sqlite,
            $postgres,
            $check,
            sqlite = $crate::common::Db::sqlite(),
            postgres = $crate::common::Db::postgres().await
        );
    };
}

/// Milliseconds since the epoch as a time.
pub fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A key and its active record named `name`, created at `created` (whole milliseconds,
/// so it survives the store's precision), with no policies.
pub fn plain(hasher: &KeyHasher, name: &str, created: SystemTime) -> (ApiKey, KeyRecord) {
    KeyRecord::generate(&Prefix::default(), hasher, name, created).expect("generate")
}

/// A key whose record sets every field.
pub fn full(hasher: &KeyHasher, name: &str, created: SystemTime) -> (ApiKey, KeyRecord) {
    let prefix = Prefix::new("sk_live").expect("prefix");
    let (key, mut r) = KeyRecord::generate(&prefix, hasher, name, created).expect("generate");
    r.owner = Some("acme".into());
    r.updated_at = created + Duration::from_millis(5);
    r.expires_at = Some(created + Duration::from_secs(86_400 * 90));
    r.scopes = vec!["points:read".into(), "collections:*".into()];
    r.resources = vec!["tenant-*".into(), "shared".into()];
    r.attributes = BTreeMap::from([
        ("tenant".to_string(), "acme".to_string()),
        ("région".to_string(), "eu \"west\"".to_string()),
    ]);
    r.allowed_ips = vec![
        "10.0.0.0/8".parse().expect("net"),
        "2001:db8::/32".parse().expect("net"),
    ];
    r.rate_limits = vec![
        RateLimitPolicy::per_second("burst", 20),
        RateLimitPolicy::per_hour("hourly", 10_000),
    ];
    r.quotas = vec![
        QuotaPolicy::new("daily", 5_000, QuotaWindow::Day),
        QuotaPolicy::new(
            "credits",
            100,
            QuotaWindow::Credits(keygate_core::Refill::Monthly { day: 15 }),
        ),
    ];
    r.metadata = serde_json::json!({"team": "search", "n": [1, 2.5, null], "ok": true});
    r.rotated_from = Some(KeyId::generate().expect("id"));
    (key, r)
}

/// Whether two records are equal in every field (digest included).
pub fn same(a: &KeyRecord, b: &KeyRecord) -> bool {
    a.info() == b.info() && a.digest.ct_eq(&b.digest)
}

pub use keygate_testkit::net::*;

/// The host and port of a `postgres://` URL.
pub fn pg_addr(url: &str) -> SocketAddr {
    url_addr(url, 5432)
}
