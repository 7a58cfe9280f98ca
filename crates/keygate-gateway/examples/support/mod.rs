//! What the overhead examples share: collecting the clients' latencies and printing a row.

use std::time::Duration;

/// The latencies of every client task, joined: how many calls, and each call's time.
pub async fn gather(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> (usize, Vec<Duration>) {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    (all.len(), all)
}

/// Prints one row (`unit` per second, p50 and p99) and returns the rate and the p99.
pub fn report(
    name: &str,
    unit: &str,
    seconds: u64,
    (n, mut lat): (usize, Vec<Duration>),
) -> (f64, Duration) {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let rps = n as f64 / seconds.max(1) as f64;
    println!(
        "{name:<28} {rps:>9.0} {unit}/s   p50 {:>7.1} µs   p99 {:>7.1} µs",
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
    (rps, pct(0.99))
}
