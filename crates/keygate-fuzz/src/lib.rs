//! Fuzz target bodies for keygate.
//!
//! Each target is a function taking the fuzzer's bytes; it panics when an invariant breaks
//! (that is how libFuzzer learns of a failure). The `cargo fuzz` binaries under `fuzz/` call
//! these functions, and this crate's tests replay every saved input under `fuzz/corpus/` and
//! `fuzz/regressions/` on stable Rust, so what the fuzzer found stays checked by
//! `cargo test --workspace --all-features`.
//!
//! The targets, by name (the directory names under `fuzz/corpus/` and `fuzz/regressions/`):
//!
//! | target | what it reads | checked against |
//! |---|---|---|
//! | `key` | a presented key | a plain reference parser (length, alphabet, CRC32 checksum) |
//! | `credentials` | a header map and URI | a plain reference extractor; no credential echoed in a denial |
//! | `forwarded` | `Forwarded` / `X-Forwarded-For` behind trusted proxies | where the answer may come from |
//! | `network` | an address or CIDR | round trips; the allow list built from it |
//! | `routes` | a route table and a request | a plain reference matcher (first rule, percent-decoded resource) |
//! | `spellings` | durations, rate limits, quotas, scopes, statuses, prefixes, key ids | round trips through `Display` |
//! | `admin` | the admin API's JSON bodies and paths | no 5xx, no key material but the issued key, fail closed |
//! | `audit` | an audit log file for `verify_files` | no panic; a verified file is a well-formed chain |
//! | `showcase` | the showcase's filters, searches, upserts and ids through its router | no 5xx; over-cap filters refused; one tenant never sees or changes another's points |
//! | `router` | a route table and a path, through `ScopeLayer` and axum's `Router` | each other, where their semantics overlap |
//! | `stack` | request sequences through all six layers | the policies' reference model, every layer order |
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod audit;
mod key;
mod net;
mod router;
mod routes;
mod showcase;
mod spellings;
mod stack;

pub use admin::admin;
pub use audit::audit;
pub use key::{credentials, key};
pub use net::{forwarded, network};
pub use router::router;
pub use routes::routes;
pub use showcase::showcase;
pub use spellings::spellings;
pub use stack::stack;

/// A target: its name and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name, for the replay tests and the fuzz script.
pub const TARGETS: &[Target] = &[
    ("key", key),
    ("credentials", credentials),
    ("forwarded", forwarded),
    ("network", network),
    ("routes", routes),
    ("spellings", spellings),
    ("admin", admin),
    ("audit", audit),
    ("stack", stack),
    ("showcase", showcase),
    ("router", router),
];

/// A current-thread tokio runtime for the targets that drive services, one per thread.
pub(crate) fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(fut))
}
