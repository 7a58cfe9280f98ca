//! The SQL usage store against real databases: the `UsageStore` contract (all-or-nothing
//! check-and-add, saturating add and subtract, reports), the same answers as the in-memory
//! store over a random sequence of operations, atomicity under concurrent calls from two
//! store handles (two pools), clamping, damaged rows, and failing closed.
//!
//! `cargo test -p keygate-sql --test usage -- --nocapture` prints the measured
//! check-and-add latency; `-- --ignored` runs the longer latency loop.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use keygate_core::usage::{
    utc, Admission, Increment, Limit, MemoryUsageStore, Usage, UsageError, UsageStore, Window,
};
use keygate_core::{KeyId, QuotaWindow, Refill};
use keygate_sql::SqlUsageStore;

fn key(s: &str) -> KeyId {
    KeyId::parse(s).unwrap()
}

fn usage(cost: u64, requests: u64) -> Usage {
    Usage { cost, requests }
}

fn admitted(a: &Admission) -> bool {
    matches!(a, Admission::Admitted(_))
}

async fn contract(db: &Db) {
    let store = db.open().await;
    let u = store.usage_store();
    let k = key("AAAAAAAAAAAA");
    let other = key("BBBBBBBBBBBB");
    let now = utc(2026, 5, 1, 10, 30, 0);
    let hour = Window::containing(QuotaWindow::Hour, now);
    let day = Window::containing(QuotaWindow::Day, now);
    let limits = [
        Limit {
            window: 0,
            limit: 3,
        },
        Limit {
            window: 1,
            limit: 5,
        },
    ];
    assert_eq!(u.load(&k, &[hour, day]).await.unwrap(), [usage(0, 0); 2]);

    let a = u.check_and_add(&k, &[hour, day], &limits, 3).await.unwrap();
    assert_eq!(a, Admission::Admitted(vec![usage(3, 1), usage(3, 1)]));
    // The hour is full: nothing is added to the day either.
    let r = u.check_and_add(&k, &[hour, day], &limits, 1).await.unwrap();
    assert_eq!(
        r,
        Admission::Refused {
            usage: vec![usage(3, 1), usage(3, 1)],
            violated: vec![0]
        }
    );
    assert_eq!(u.load(&k, &[day]).await.unwrap(), [usage(3, 1)]);
    // Another key counts on its own.
    assert_eq!(u.load(&other, &[day]).await.unwrap(), [usage(0, 0)]);

    // The next hour has room until the day is full.
    let hour2 = Window::containing(QuotaWindow::Hour, utc(2026, 5, 1, 11, 0, 0));
    assert!(admitted(
        &u.check_and_add(&k, &[hour2, day], &limits, 2)
            .await
            .unwrap()
    ));
    let r = u
        .check_and_add(&k, &[hour2, day], &limits, 1)
        .await
        .unwrap();
    assert!(matches!(r, Admission::Refused { ref violated, .. } if violated == &[1]));
    // An overflowing cost is refused, not wrapped.
    let r = u
        .check_and_add(
            &k,
            &[hour2],
            &[Limit {
                window: 0,
                limit: u64::MAX,
            }],
            u64::MAX,
        )
        .await
        .unwrap();
    assert!(matches!(r, Admission::Refused { .. }), "{r:?}");
    // A refused call on a new window leaves no row behind.
    let hour3 = Window::containing(QuotaWindow::Hour, utc(2026, 5, 1, 12, 0, 0));
    let r = u
        .check_and_add(
            &k,
            &[hour3],
            &[Limit {
                window: 0,
                limit: 1,
            }],
            2,
        )
        .await
        .unwrap();
    assert!(!admitted(&r));
    let start = hour3.start_secs() as i64 * 1000;
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM keygate_usage WHERE window_start = {start}"
        ))
        .await,
        0
    );

    // add and subtract (saturating at zero), merged per window.
    u.add(&[
        Increment {
            key: other,
            window: day,
            usage: usage(10, 2),
        },
        Increment {
            key: other,
            window: day,
            usage: usage(5, 1),
        },
        Increment {
            key: k,
            window: day,
            usage: usage(1, 1),
        },
    ])
    .await
    .unwrap();
    assert_eq!(u.load(&other, &[day]).await.unwrap(), [usage(15, 3)]);
    assert_eq!(u.load(&k, &[day]).await.unwrap(), [usage(6, 3)]);
    u.subtract(&[Increment {
        key: other,
        window: day,
        usage: usage(4, 1),
    }])
    .await
    .unwrap();
    assert_eq!(u.load(&other, &[day]).await.unwrap(), [usage(11, 2)]);
    u.subtract(&[Increment {
        key: other,
        window: day,
        usage: usage(100, 100),
    }])
    .await
    .unwrap();
    assert_eq!(u.load(&other, &[day]).await.unwrap(), [usage(0, 0)]);
    // Subtracting from a window never counted creates nothing.
    u.subtract(&[Increment {
        key: other,
        window: hour3,
        usage: usage(1, 1),
    }])
    .await
    .unwrap();
    assert_eq!(u.load(&other, &[hour3]).await.unwrap(), [usage(0, 0)]);

    // Reports: every window kind round-trips, ordered by start.
    let credits = Window::containing(QuotaWindow::Credits(Refill::Never), now);
    let monthly15 = Window::containing(QuotaWindow::Credits(Refill::Monthly { day: 15 }), now);
    let month = Window::containing(QuotaWindow::Month, now);
    for w in [credits, monthly15, month] {
        assert!(admitted(&u.check_and_add(&k, &[w], &[], 7).await.unwrap()));
    }
    let rows = u
        .report(&k, SystemTime::UNIX_EPOCH, utc(2027, 1, 1, 0, 0, 0))
        .await
        .unwrap();
    let windows: Vec<Window> = rows.iter().map(|r| r.window).collect();
    // Month and day start together: then by kind (`day` before `month`).
    assert_eq!(windows, [credits, monthly15, day, month, hour, hour2]);
    assert!(rows.iter().all(|r| r.key == k));
    assert_eq!(rows[0].usage, usage(7, 1));
    assert_eq!(rows[0].window.end, None);
    // A range picks by window start.
    let rows = u.report(&k, hour.start, day.end.unwrap()).await.unwrap();
    let windows: Vec<Window> = rows.iter().map(|r| r.window).collect();
    assert_eq!(windows, [hour, hour2]);
    // All keys.
    let all = u.report_all(day.start, day.end.unwrap()).await.unwrap();
    let keys: Vec<(KeyId, Window)> = all.iter().map(|r| (r.key, r.window)).collect();
    assert_eq!(
        keys,
        [(k, day), (k, month), (k, hour), (k, hour2), (other, day)]
    );

    // Pruning drops ended windows, never endless credits.
    let pruned = u.prune(utc(2030, 1, 1, 0, 0, 0)).await.unwrap();
    assert_eq!(pruned, 6);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM keygate_usage").await, 1);
    assert_eq!(u.load(&k, &[credits]).await.unwrap(), [usage(7, 1)]);
}
both!(sqlite_contract, postgres_contract, contract);

/// A tiny deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn same_answers_as_memory(db: &Db) {
    let store = db.open().await;
    let sql = store.usage_store();
    let mem = MemoryUsageStore::new();
    let keys = [key("AAAAAAAAAAAA"), key("BBBBBBBBBBBB")];
    let t = utc(2026, 2, 28, 23, 0, 0);
    let pool = [
        Window::containing(QuotaWindow::Hour, t),
        Window::containing(QuotaWindow::Day, t),
        Window::containing(QuotaWindow::Month, t),
        Window::containing(QuotaWindow::Credits(Refill::Daily), t),
        Window::containing(QuotaWindow::Hour, t + Duration::from_secs(3600)),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for step in 0..300 {
        let k = keys[rng.below(2) as usize];
        // 1 to 3 windows, possibly repeated (a window listed twice counts twice).
        let n = 1 + rng.below(3) as usize;
        let windows: Vec<Window> = (0..n).map(|_| pool[rng.below(5) as usize]).collect();
        match rng.below(6) {
            0 => {
                let inc: Vec<Increment> = windows
                    .iter()
                    .map(|w| Increment {
                        key: k,
                        window: *w,
                        usage: usage(rng.below(5), rng.below(2)),
                    })
                    .collect();
                sql.add(&inc).await.unwrap();
                mem.add(&inc).await.unwrap();
            }
            1 => {
                let dec: Vec<Increment> = windows
                    .iter()
                    .map(|w| Increment {
                        key: k,
                        window: *w,
                        usage: usage(rng.below(8), rng.below(3)),
                    })
                    .collect();
                sql.subtract(&dec).await.unwrap();
                mem.subtract(&dec).await.unwrap();
            }
            _ => {
                let limits: Vec<Limit> = (0..rng.below(3))
                    .map(|_| Limit {
                        window: rng.below(n as u64) as usize,
                        limit: 5 + rng.below(40),
                    })
                    .collect();
                let cost = rng.below(6);
                let a = sql
                    .check_and_add(&k, &windows, &limits, cost)
                    .await
                    .unwrap();
                let b = mem
                    .check_and_add(&k, &windows, &limits, cost)
                    .await
                    .unwrap();
                assert_eq!(
                    a, b,
                    "step {step}: check_and_add({windows:?}, {limits:?}, {cost})"
                );
            }
        }
        let a = sql.load(&k, &pool).await.unwrap();
        let b = mem.load(&k, &pool).await.unwrap();
        assert_eq!(a, b, "step {step}: load");
    }
}
both!(
    sqlite_same_answers_as_memory,
    postgres_same_answers_as_memory,
    same_answers_as_memory
);

async fn concurrent_calls_never_exceed_the_limit(db: &Db) {
    const LIMIT: u64 = 40;
    const TASKS_PER_HANDLE: usize = 8;
    const CALLS_PER_TASK: usize = 10;
    // Two handles: two pools, as two processes or replicas would have.
    let a = db.open().await.usage_store();
    let b = db.open().await.usage_store();
    let k = key("CCCCCCCCCCCC");
    let now = SystemTime::now();
    let windows = [
        Window::containing(QuotaWindow::Hour, now),
        Window::containing(QuotaWindow::Day, now),
    ];
    let limits = [
        Limit {
            window: 0,
            limit: LIMIT,
        },
        Limit {
            window: 1,
            limit: 10 * LIMIT,
        },
    ];
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for handle in [a.clone(), b.clone()] {
        for _ in 0..TASKS_PER_HANDLE {
            let (h, admitted, refused) = (handle.clone(), admitted.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..CALLS_PER_TASK {
                    match h.check_and_add(&k, &windows, &limits, 1).await.unwrap() {
                        Admission::Admitted(after) => {
                            assert!(after[0].cost <= LIMIT, "{after:?}");
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        Admission::Refused { usage, violated } => {
                            assert_eq!(violated, [0]);
                            assert_eq!(usage[0].cost, LIMIT);
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let calls = (2 * TASKS_PER_HANDLE * CALLS_PER_TASK) as u64;
    let elapsed = start.elapsed();
    assert_eq!(admitted.load(Ordering::SeqCst), LIMIT);
    assert_eq!(refused.load(Ordering::SeqCst), calls - LIMIT);
    assert_eq!(
        a.load(&k, &windows).await.unwrap(),
        [usage(LIMIT, LIMIT), usage(LIMIT, LIMIT)]
    );
    println!(
        "{}: {calls} concurrent check_and_add calls from 2 handles x {TASKS_PER_HANDLE} tasks: {LIMIT} admitted, {:.2} ms per call on average (wall {:?})",
        db.name(),
        elapsed.as_secs_f64() * 1000.0 / calls as f64,
        elapsed
    );
}
both!(
    sqlite_concurrent_calls_never_exceed_the_limit,
    postgres_concurrent_calls_never_exceed_the_limit,
    concurrent_calls_never_exceed_the_limit
);

async fn counters_clamp_and_damage_is_reported(db: &Db) {
    let store = db.open().await;
    let u = store.usage_store();
    let k = key("DDDDDDDDDDDD");
    let day = Window::containing(QuotaWindow::Day, utc(2026, 1, 1, 0, 0, 0));
    let huge = Increment {
        key: k,
        window: day,
        usage: usage(u64::MAX, 1),
    };
    u.add(&[huge]).await.unwrap();
    u.add(&[huge]).await.unwrap();
    let max = i64::MAX as u64;
    assert_eq!(u.load(&k, &[day]).await.unwrap(), [usage(max, 2)]);
    // A clamped counter still admits within a larger limit, and stays clamped.
    let r = u
        .check_and_add(
            &k,
            &[day],
            &[Limit {
                window: 0,
                limit: u64::MAX,
            }],
            1,
        )
        .await
        .unwrap();
    assert!(admitted(&r), "{r:?}: i64::MAX + 1 is within u64::MAX");
    assert_eq!(u.load(&k, &[day]).await.unwrap(), [usage(max, 3)]);

    // A damaged row is Corrupt, not a panic and not zero.
    db.exec("UPDATE keygate_usage SET cost = -5").await;
    match u.load(&k, &[day]).await {
        Err(UsageError::Corrupt(msg)) => assert!(msg.contains("negative"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        u.check_and_add(&k, &[day], &[], 1).await,
        Err(UsageError::Corrupt(_))
    ));
    db.exec("UPDATE keygate_usage SET cost = 1, window_kind = 'fortnight'")
        .await;
    assert!(matches!(
        u.report(&k, SystemTime::UNIX_EPOCH, utc(2030, 1, 1, 0, 0, 0))
            .await,
        Err(UsageError::Corrupt(_))
    ));
}
both!(
    sqlite_counters_clamp_and_damage_is_reported,
    postgres_counters_clamp_and_damage_is_reported,
    counters_clamp_and_damage_is_reported
);

async fn a_closed_store_fails_closed(db: &Db) {
    let store = db.open().await;
    let u: SqlUsageStore = store.usage_store();
    let k = key("EEEEEEEEEEEE");
    let day = Window::containing(QuotaWindow::Day, SystemTime::now());
    store.close().await;
    assert!(matches!(
        u.check_and_add(
            &k,
            &[day],
            &[Limit {
                window: 0,
                limit: 10
            }],
            1
        )
        .await,
        Err(UsageError::Unavailable(_))
    ));
    assert!(matches!(
        u.load(&k, &[day]).await,
        Err(UsageError::Unavailable(_))
    ));
    let inc = [Increment {
        key: k,
        window: day,
        usage: usage(1, 1),
    }];
    assert!(matches!(u.add(&inc).await, Err(UsageError::Unavailable(_))));
    assert!(matches!(
        u.subtract(&inc).await,
        Err(UsageError::Unavailable(_))
    ));
}
both!(
    sqlite_a_closed_store_fails_closed,
    postgres_a_closed_store_fails_closed,
    a_closed_store_fails_closed
);

/// PostgreSQL behind a proxy that is cut: an answer within the acquire timeout, and it is
/// `Unavailable`; counting resumes when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_unavailable_then_recovers() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let Db::Postgres(pg) = &db else {
        unreachable!()
    };
    db.open().await; // migrate through the direct address
    let proxy = Proxy::start(pg_addr(&pg.url)).await;
    let url = with_addr(&pg.url, proxy.addr);
    let store = keygate_sql::SqlStore::open_with(
        &url,
        db.options()
            .acquire_timeout(Duration::from_millis(500))
            .operation_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let u = store.usage_store();
    let k = key("FFFFFFFFFFFF");
    let day = Window::containing(QuotaWindow::Day, SystemTime::now());
    let limits = [Limit {
        window: 0,
        limit: 100,
    }];
    assert!(admitted(
        &u.check_and_add(&k, &[day], &limits, 1).await.unwrap()
    ));
    proxy.set_on(false);
    let t = Instant::now();
    let r = u.check_and_add(&k, &[day], &limits, 1).await;
    assert!(matches!(r, Err(UsageError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    proxy.set_on(true);
    poll_until(Duration::from_secs(10), "counting to resume", || async {
        u.check_and_add(&k, &[day], &limits, 1).await.ok()
    })
    .await;
    let used = u.load(&k, &[day]).await.unwrap()[0].cost;
    assert_eq!(used, 2, "the failed call counted nothing");
}

async fn latency_loop(db: &Db, calls: u32) {
    let u = db.open().await.usage_store();
    let k = key("GGGGGGGGGGGG");
    let now = SystemTime::now();
    let windows = [
        Window::containing(QuotaWindow::Hour, now),
        Window::containing(QuotaWindow::Day, now),
    ];
    let limits = [
        Limit {
            window: 0,
            limit: u64::MAX,
        },
        Limit {
            window: 1,
            limit: u64::MAX,
        },
    ];
    // Warm the pool.
    u.check_and_add(&k, &windows, &limits, 1).await.unwrap();
    let mut times = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let t = Instant::now();
        let a = u.check_and_add(&k, &windows, &limits, 1).await.unwrap();
        times.push(t.elapsed());
        assert!(admitted(&a));
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / calls;
    println!(
        "{}: check_and_add (2 windows, 1 caller, sequential) over {calls} calls: mean {:?}, median {:?}, p99 {:?}",
        db.name(),
        mean,
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    );
}

async fn check_and_add_latency_short(db: &Db) {
    latency_loop(db, 200).await;
}
both!(
    sqlite_check_and_add_latency,
    postgres_check_and_add_latency,
    check_and_add_latency_short
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a longer latency loop; run with --ignored --nocapture"]
async fn check_and_add_latency_long() {
    latency_loop(&Db::sqlite(), 5000).await;
    if let Some(db) = Db::postgres().await {
        latency_loop(&db, 5000).await;
    }
}
