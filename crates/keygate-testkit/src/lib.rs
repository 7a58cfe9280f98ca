//! Test helpers shared by keygate's crates (not published): loopback servers, a TCP proxy
//! and polling, a counting key store, a PostgreSQL schema per test, a counting allocator.
//!
//! | module | what |
//! |---|---|
//! | [`http`] | an HTTP/1.1 client call, body collection, a counting inner service |
//! | [`net`] | [`poll_until`](net::poll_until), a TCP [`Proxy`](net::Proxy) that can cut or stall connections, URL address rewriting |
//! | [`serve`] | axum and hyper servers on 127.0.0.1, with or without the peer address |
//! | [`store`] | [`CountingStore`](store::CountingStore): counts lookups, simulates outages |
//! | [`pg`] | [`PgSchema`](pg::PgSchema): a schema created for one test and dropped at its end |
//! | [`alloc`] | a global allocator counting live heap bytes |
//! | [`sqlite_and_postgres!`] | one check, two tests: on SQLite and on PostgreSQL (skipped without a server) |
#![warn(missing_docs)]

pub mod alloc;
pub mod http;
pub mod net;
pub mod pg;
pub mod serve;
pub mod store;

/// The value of the environment variable `name` (a test server's URL), or `None` after
/// printing the line that says the test skipped, when it is unset.
pub fn server_url(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(url) => Some(url),
        Err(_) => {
            println!("skipped: {name} is not set");
            None
        }
    }
}

/// Generates two `#[tokio::test]`s running one async check `fn(&T)`: `$sqlite` on the value
/// of the `sqlite` expression, `$postgres` on the value of the `postgres` expression, an
/// `Option` that is `None` when no PostgreSQL server is configured (the test then returns,
/// after the expression printed its skip line). The expressions are evaluated inside the
/// async test, so they may `.await`.
#[macro_export]
macro_rules! sqlite_and_postgres {
    ($sqlite:ident, $postgres:ident, $check:path, sqlite = $s:expr, postgres = $p:expr $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let on = $s;
            $check(&on).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(on) = $p else {
                return;
            };
            $check(&on).await;
        }
    };
}
