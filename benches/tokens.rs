//! Short-lived tokens against API keys on the hub's resolution path.
//!
//! Run with `cargo bench --features tokens --bench tokens` (quick form: append
//! `-- --warm-up-time 1 --measurement-time 3`).
//!
//! - `tokens/resolve/key_cached`: `KeyGate::resolve` of a request carrying a cached API key
//!   (`Authorization: Bearer`): credential extraction, parse, keyed digest, cache read,
//!   the context's one allocation.
//! - `tokens/resolve/token_cached`: the same request carrying a token derived from that key,
//!   verified before: digest of its signature, the token cache, the key's state from the
//!   verifier's cache (`Verifier::lookup_parent`), the remembered narrowing. The claim is
//!   that this costs at most 1.5x the key.
//! - `tokens/resolve/token_first_use`: a token never seen (a cache of one entry and two
//!   tokens used in turn): header, Ed25519 signature check, claims, narrowing.
//!
//! Requests are built outside the timed section (`iter_batched`), futures polled once with
//! `now_or_never` (none needs I/O).
//!
//! Wall-clock figures on a shared machine move with its load; instruction counts do not.
//! `KEYGATE_PROFILE=key|token|build KEYGATE_PROFILE_N=100000` runs only that many
//! resolutions of one variant (`build`: the requests alone) and exits, for
//! `valgrind --tool=callgrind`: `(variant - build) / N` is the instructions per
//! resolution.

use std::hint::black_box;

use criterion::{criterion_group, BatchSize, Criterion};
use futures_util::FutureExt;
use http::Request;
use keygate::token::{SigningKeys, TokenRequest, Tokens};
use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};

fn request(credential: &str) -> Request<()> {
    Request::get("/collections/docs/points/search")
        .header("authorization", format!("Bearer {credential}"))
        .body(())
        .expect("valid request")
}

struct Fixture {
    gate: KeyGate,
    cold_gate: KeyGate,
    key: String,
    token: String,
    pair: Vec<String>,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = MemoryStore::new();
    let verifier = Verifier::new(store.clone());
    let keys = SigningKeys::generate().expect("a key");
    let tokens = Tokens::new(keys.clone());
    let gate = KeyGate::builder(verifier.clone())
        .tokens(tokens.clone())
        .build();
    let now = gate.clock().now();
    let (key, mut record) =
        KeyRecord::generate(&Prefix::default(), verifier.hasher(), "bench", now).expect("key");
    record.scopes = vec!["points:read".into(), "points:write".into()];
    record.resources = vec!["docs".into()];
    rt.block_on(store.insert(&record)).expect("insert");
    let principal = rt
        .block_on(verifier.verify(key.expose_secret()))
        .expect("the key verifies");
    let narrow = TokenRequest {
        scopes: Some(vec!["points:read".into()]),
        subject: Some("user-42".into()),
        ..TokenRequest::default()
    };
    let token = tokens.issue(&principal, &narrow, now).expect("a token");
    let token = token.expose_secret().to_owned();
    // Both verified once, so both are cached.
    let key_text = key.expose_secret().to_owned();
    for c in [&key_text, &token] {
        let p = gate
            .resolve(&mut request(c))
            .now_or_never()
            .expect("no I/O")
            .expect("resolves");
        assert!(p.has_scope(&keygate::Scope::parse("points:read").expect("scope")));
    }

    // A gate whose token cache holds one entry, used with two tokens in turn.
    let small = Tokens::builder(keys).cache_capacity(1).build();
    let cold_gate = KeyGate::builder(verifier.clone())
        .tokens(small.clone())
        .build();
    let pair: Vec<String> = (0..2)
        .map(|_| {
            small
                .issue(&principal, &narrow, now)
                .expect("a token")
                .expose_secret()
                .to_owned()
        })
        .collect();

    Fixture {
        gate,
        cold_gate,
        key: key_text,
        token,
        pair,
    }
}

fn benches(c: &mut Criterion) {
    let Fixture {
        gate,
        cold_gate,
        key: key_text,
        token,
        pair,
    } = fixture();
    let mut g = c.benchmark_group("tokens");
    g.bench_function("resolve/key_cached", |b| {
        b.iter_batched_ref(
            || request(&key_text),
            |req| {
                black_box(gate.resolve(req).now_or_never().expect("no I/O")).expect("accepted");
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("resolve/token_cached", |b| {
        b.iter_batched_ref(
            || request(&token),
            |req| {
                black_box(gate.resolve(req).now_or_never().expect("no I/O")).expect("accepted");
            },
            BatchSize::SmallInput,
        )
    });
    let mut turn = 0usize;
    g.bench_function("resolve/token_first_use", |b| {
        b.iter_batched_ref(
            || {
                turn += 1;
                request(&pair[turn % 2])
            },
            |req| {
                black_box(cold_gate.resolve(req).now_or_never().expect("no I/O"))
                    .expect("accepted");
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Runs `KEYGATE_PROFILE_N` resolutions of one variant, for callgrind.
fn profile(which: &str) {
    let f = fixture();
    let n: usize = std::env::var("KEYGATE_PROFILE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let credential = match which {
        "token" => &f.token,
        _ => &f.key,
    };
    for _ in 0..n {
        let mut req = request(credential);
        if which != "build" {
            black_box(f.gate.resolve(&mut req).now_or_never().expect("no I/O")).expect("accepted");
        }
        black_box(req);
    }
}

criterion_group!(tokens, benches);

fn main() {
    if let Ok(which) = std::env::var("KEYGATE_PROFILE") {
        profile(&which);
        return;
    }
    tokens();
    Criterion::default().configure_from_args().final_summary();
}
