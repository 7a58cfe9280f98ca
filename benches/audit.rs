//! Benchmarks of auditing: the audit layer's cost on the request path, and the file sink's
//! throughput.
//!
//! Run with `cargo bench --features audit --bench audit` (quick form:
//! `cargo bench --features audit --bench audit -- --warm-up-time 1 --measurement-time 3`).
//!
//! What is measured, in one run:
//!
//! - `audit_layer/*`: one request through `oneshot` on a clone of the service (as axum does
//!   per request), polled with `now_or_never` (every variant completes on the first poll).
//!   The request carries `host`, `user-agent` and `accept` headers and the peer address (as
//!   a server hands it over), the response a `content-type`, built outside the timed part:
//!   - `bare`: a `service_fn` returning an empty response;
//!   - `audit`: the same behind `AuditLayer::new` with a queued [`Auditor`] (bounded queue,
//!     background writer, default `Overflow::Block`) over a sink that discards: the request
//!     path's cost (request id, event, queue push). A request id is generated;
//!   - `audit_client_id`: the same with a client `x-request-id` reused;
//!   - `auth` and `audit_hub+auth`: the auth layer alone, and the hub's audit layer in
//!     front of it (the audit layer resolves the key, so the event names it).
//!
//!   The added cost is `audit - bare` and `audit_hub+auth - auth`.
//! - `audit_layer_cpu/*`: the same, timed in this thread's CPU time
//!   (`CLOCK_THREAD_CPUTIME_ID`) instead of the wall clock, for figures that hold on a
//!   machine shared with other work. The audit writer's own thread is not counted there: it
//!   works off the request path.
//! - `file_sink/*`: events per second into a [`FileSink`] (one ~540-byte JSON line each,
//!   hash chain, key masking, 64 MiB rotation; the writers' lock taken and the sealed
//!   checkpoint written once per flush), written to the operating system (buffers flushed,
//!   no `fsync`): `direct` calls the sink on the bench thread (`direct_cpu`: in CPU time);
//!   `queued_10k_then_flush` pushes through the background writer and ends each batch of
//!   10,000 with `Auditor::flush` (which also `fsync`s).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use keygate::audit::AuditLayer;
use keygate::core::audit::{
    AuditError, AuditEvent, AuditSink, Auditor, Decision, FileSink, RequestEvent, Transport,
};
use keygate::{DenialCode, KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// Discards events (the request-path benchmarks measure the producer side only).
struct Discard;

impl AuditSink for Discard {
    fn record(&self, _: &AuditEvent) -> Result<(), AuditError> {
        Ok(())
    }
}

/// The CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`), so figures hold on a
/// machine shared with other work: time spent descheduled is not counted. `None` where the
/// clock cannot be read (then the wall clock is used).
fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Runs `iters` calls of `call` on inputs made by `make` (outside the measured time), in
/// chunks, and returns the thread CPU time (or wall time) the calls took.
fn cpu_iters<I, O>(
    iters: u64,
    mut make: impl FnMut() -> I,
    mut call: impl FnMut(I) -> O,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(4096);
        let inputs: Vec<I> = (0..n).map(|_| make()).collect();
        let (cpu0, wall0) = (thread_cpu(), Instant::now());
        for input in inputs {
            black_box(call(input));
        }
        total += match (cpu0, thread_cpu()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => wall0.elapsed(),
        };
        left -= n;
    }
    total
}

/// The inner service: a JSON API's empty answer (a response carries headers in practice).
async fn empty(_: Request<Empty<Bytes>>) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Empty::new())
        .expect("valid response"))
}

/// A request as a server hands it over: a few headers and the peer address.
fn request(key: Option<&str>, request_id: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get("/collections/docs/points/search?limit=10")
        .header("host", "localhost:6333")
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    if let Some(id) = request_id {
        b = b.header("x-request-id", id);
    }
    let mut req = b.body(Empty::new()).expect("valid request");
    req.extensions_mut()
        .insert(SocketAddr::from(([127, 0, 0, 1], 40_000)));
    req
}

fn layer_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = MemoryStore::new();
    let verifier = Verifier::builder(store.clone())
        .refresh_after(Duration::from_secs(3600))
        .build();
    let gate = KeyGate::new(verifier.clone());
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        verifier.hasher(),
        "bench-key",
        verifier.clock().now(),
    )
    .expect("key");
    record.owner = Some("acme".into());
    record.attributes.insert("tenant".into(), "acme".into());
    rt.block_on(async {
        store.insert(&record).await.expect("insert");
        verifier.verify(key.expose_secret()).await.expect("cached");
    });
    let secret = key.expose_secret();

    // A queue large enough that the writer (competing for the CPU with the benchmark) never
    // makes a request wait; if it ever did, `now_or_never` would drop the response and the
    // event would be counted as dropped (printed at the end).
    let auditor = Auditor::builder()
        .capacity(1 << 16)
        .spawn(Discard)
        .expect("writer thread");
    let bare = service_fn(empty);
    let audit = ServiceBuilder::new()
        .layer(AuditLayer::new(auditor.clone()))
        .service_fn(empty);
    let auth = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service_fn(empty);
    let audit_auth = ServiceBuilder::new()
        .layer(gate.audit_layer(auditor.clone()))
        .layer(gate.auth_layer())
        .service_fn(empty);

    for status in [
        bare.oneshot(request(None, None)).now_or_never(),
        audit.clone().oneshot(request(None, None)).now_or_never(),
    ] {
        assert_eq!(status.expect("ready").expect("ok").status(), 200);
    }
    for status in [
        auth.clone()
            .oneshot(request(Some(secret), None))
            .now_or_never(),
        audit_auth
            .clone()
            .oneshot(request(Some(secret), None))
            .now_or_never(),
    ] {
        let status = status.expect("ready").expect("ok").status();
        assert_eq!(status, 200);
    }

    let mut g = c.benchmark_group("audit_layer");
    g.bench_function("bare", |b| {
        b.iter_batched(
            || request(None, None),
            |req| bare.oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("audit", |b| {
        b.iter_batched(
            || request(None, None),
            |req| audit.clone().oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("audit_client_id", |b| {
        b.iter_batched(
            || request(None, Some("4bf92f3577b34da6a3ce929d0e0e4736")),
            |req| audit.clone().oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("auth", |b| {
        b.iter_batched(
            || request(Some(secret), None),
            |req| auth.clone().oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("audit_hub+auth", |b| {
        b.iter_batched(
            || request(Some(secret), None),
            |req| audit_auth.clone().oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The same, timed in thread CPU time.
    let mut g = c.benchmark_group("audit_layer_cpu");
    g.bench_function("bare", |b| {
        b.iter_custom(|n| {
            cpu_iters(
                n,
                || request(None, None),
                |req| bare.oneshot(req).now_or_never(),
            )
        })
    });
    g.bench_function("audit", |b| {
        b.iter_custom(|n| {
            cpu_iters(
                n,
                || request(None, None),
                |req| audit.clone().oneshot(req).now_or_never(),
            )
        })
    });
    g.bench_function("auth", |b| {
        b.iter_custom(|n| {
            cpu_iters(
                n,
                || request(Some(secret), None),
                |req| auth.clone().oneshot(req).now_or_never(),
            )
        })
    });
    g.bench_function("audit_hub+auth", |b| {
        b.iter_custom(|n| {
            cpu_iters(
                n,
                || request(Some(secret), None),
                |req| audit_auth.clone().oneshot(req).now_or_never(),
            )
        })
    });
    g.finish();
    let stats = rt.block_on(auditor.shutdown());
    eprintln!("audit_layer: auditor {stats:?}");
    assert_eq!(stats.failed, 0);
}

fn sample_event(i: u64) -> AuditEvent {
    let mut e = RequestEvent::new(
        UNIX_EPOCH + Duration::from_secs(1_767_225_600 + i / 1000),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "POST",
        "/collections/docs/points/search",
    );
    e.key_id = Some("3hG7xQ2mPa9Z".parse().expect("key id"));
    e.key_name = Some("ingest-pipeline".into());
    e.subject = Some("acme-corp".into());
    e.tenant = Some("acme".into());
    e.client_ip = Some([203, 0, 113, 7].into());
    e.protocol = Transport::Http;
    e.status = Some(if i.is_multiple_of(10) { 429 } else { 200 });
    e.decision = if i.is_multiple_of(10) {
        Decision::Denied
    } else {
        Decision::Allowed
    };
    e.denial = i.is_multiple_of(10).then_some(DenialCode::RateLimited);
    e.latency = Duration::from_micros(180 + i % 50);
    e.into()
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keygate-bench-audit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_sink(dir: &TempDir) -> FileSink {
    FileSink::builder(&dir.0)
        .rotate_bytes(64 * 1024 * 1024)
        .open()
        .expect("file sink")
}

fn file_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let line_len = serde_json::to_string(&sample_event(1)).expect("json").len() + 150;
    let events: Vec<AuditEvent> = (0..10_000).map(sample_event).collect();

    let mut g = c.benchmark_group("file_sink");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            let dir = TempDir::new();
            let sink = open_sink(&dir);
            let start = Instant::now();
            for i in 0..iters {
                sink.record(&events[(i % 10_000) as usize]).expect("record");
            }
            sink.flush().expect("flush");
            start.elapsed()
        })
    });
    g.bench_function("direct_cpu", |b| {
        b.iter_custom(|iters| {
            let dir = TempDir::new();
            let sink = open_sink(&dir);
            let mut i = 0usize;
            let t = cpu_iters(
                iters,
                || {
                    i = (i + 1) % events.len();
                    i
                },
                |i| sink.record(&events[i]).expect("record"),
            );
            sink.flush().expect("flush");
            t
        })
    });
    const BATCH: u64 = 10_000;
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("queued_10k_then_flush", |b| {
        b.iter_custom(|iters| {
            let dir = TempDir::new();
            let auditor = Auditor::spawn(open_sink(&dir)).expect("writer");
            let start = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    for e in &events {
                        auditor.record(e.clone()).await.expect("record");
                    }
                    auditor.flush().await.expect("flush");
                }
            });
            let elapsed = start.elapsed();
            let stats = rt.block_on(auditor.shutdown());
            assert_eq!(stats.written, iters * BATCH);
            elapsed
        })
    });
    g.finish();
    eprintln!("file_sink: about {line_len} bytes per line");
}

fn benches(c: &mut Criterion) {
    layer_benches(c);
    file_benches(c);
}

criterion_group!(audit, benches);
criterion_main!(audit);
