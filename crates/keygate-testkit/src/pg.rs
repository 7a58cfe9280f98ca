//! PostgreSQL schemas for tests: one per test (`KEYGATE_TEST_POSTGRES_URL`), dropped at its end.

use std::str::FromStr;

use keygate_core::KeyId;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

/// The variable naming the PostgreSQL server of the tests (`postgres://user@host/db`).
pub const PG_ENV: &str = "KEYGATE_TEST_POSTGRES_URL";

/// A PostgreSQL schema `kg_test_<random>` created for one test and dropped (with
/// everything in it) when this value is dropped, even if the test panicked.
pub struct PgSchema {
    /// The server (`KEYGATE_TEST_POSTGRES_URL`).
    pub url: String,
    /// The schema's name.
    pub schema: String,
}

impl PgSchema {
    /// Creates the schema, or prints the skip line and returns `None` when the server is
    /// not configured.
    pub async fn create() -> Option<PgSchema> {
        let url = crate::server_url(PG_ENV)?;
        let schema = schema_name("kg_test");
        let mut c = PgConnectOptions::from_str(&url)
            .expect("KEYGATE_TEST_POSTGRES_URL")
            .connect()
            .await
            .expect("connect to KEYGATE_TEST_POSTGRES_URL");
        c.execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .expect("create schema");
        c.close().await.expect("close");
        Some(PgSchema { url, schema })
    }

    /// A guard that drops schema `name` (made by someone else) at the end of the test.
    pub fn adopt(url: &str, name: &str) -> PgSchema {
        PgSchema {
            url: url.to_owned(),
            schema: name.to_owned(),
        }
    }

    /// A connection whose search_path is the schema.
    pub async fn connect(&self) -> sqlx::PgConnection {
        PgConnectOptions::from_str(&self.url)
            .expect("url")
            .options([("search_path", self.schema.as_str())])
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        drop_schema(&self.url, &self.schema);
    }
}

/// Drops PostgreSQL schema `schema` (with everything in it) at `url`, on a thread of its own
/// (so it works inside a test's runtime, and from `Drop`); warns on stderr when it cannot.
pub fn drop_schema(url: &str, schema: &str) {
    let (url, name) = (url.to_owned(), schema.to_owned());
    let done = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut c = PgConnectOptions::from_str(&url)
                .ok()?
                .connect()
                .await
                .ok()?;
            c.execute(format!("DROP SCHEMA IF EXISTS {name} CASCADE").as_str())
                .await
                .ok()?;
            c.close().await.ok()
        })
    })
    .join();
    if !matches!(done, Ok(Some(()))) {
        eprintln!("warning: could not drop test schema {schema}");
    }
}

/// A fresh schema name, `{prefix}_<random lowercase>` (not created).
pub fn schema_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        KeyId::generate()
            .expect("random")
            .as_str()
            .to_ascii_lowercase()
    )
}
