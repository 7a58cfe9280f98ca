//! Test helpers shared by keygate's crates (not published): loopback servers, a TCP proxy
//! and polling, a counting key store, a PostgreSQL schema per test, a counting allocator.
//!
//! | module | what |
//! |---|---|
//! | [`net`] | [`poll_until`](net::poll_until), a TCP [`Proxy`](net::Proxy) that can cut or stall connections, URL address rewriting |
//! | [`serve`] | axum and hyper servers on 127.0.0.1, with or without the peer address |
//! | [`store`] | [`CountingStore`]: counts lookups, simulates outages |
//! | [`pg`] | [`PgSchema`](pg::PgSchema): a schema created for one test and dropped at its end |
//! | [`alloc`] | a global allocator counting live heap bytes |
#![warn(missing_docs)]

pub mod alloc;
pub mod net;
pub mod pg;
pub mod serve;
pub mod store;

pub use store::CountingStore;
