//! The anomaly detector's heap at its caps (the default ones), counted by a global
//! allocator: every key table and address table full, every key at its network cap. The
//! figure is printed with `-- --nocapture`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use keygate_core::audit::{AnomalyConfig, AnomalyDetector, Decision, RequestEvent};
use keygate_core::{DenialCode, KeyId};
use keygate_testkit::alloc::{Counting, LIVE};

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn the_detector_stays_under_20_mb_at_its_default_caps() {
    let config = AnomalyConfig::default();
    let (keys, addresses, networks) = (
        config.max_keys as u64,
        config.max_addresses as u64,
        config.max_networks_per_key as u64,
    );
    let before = LIVE.load(Ordering::Relaxed);
    let mut d = AnomalyDetector::new(config);
    let mut t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Twice as many keys as the cap, each from more networks than its cap (IPv6, the
    // larger entries), and twice as many denying addresses as the cap.
    for k in 0..keys * 2 {
        let id: KeyId = format!("k{k:011}").parse().unwrap();
        for n in 0..networks + 2 {
            let mut e = RequestEvent::new(t, "r", "GET", "/");
            e.key_id = Some(id);
            e.client_ip = Some(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, k as u16, n as u16, 0, 0, 0, 1,
            )));
            d.observe(&e.into());
            t += Duration::from_micros(10);
        }
    }
    for a in 0..addresses * 2 {
        let mut e = RequestEvent::new(t, "r", "GET", "/");
        e.decision = Decision::Denied;
        e.denial = Some(DenialCode::InvalidKey);
        e.client_ip = Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + a as u32)));
        d.observe(&e.into());
        t += Duration::from_micros(10);
    }
    assert!(d.tracked_keys() as u64 <= keys && d.tracked_keys() as u64 > keys / 2);
    assert!(d.tracked_addresses() as u64 <= addresses);
    let used = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "anomaly detector at its caps: {} keys, {} addresses, {used} bytes ({:.1} MB)",
        d.tracked_keys(),
        d.tracked_addresses(),
        used as f64 / 1e6
    );
    assert!(used < 20_000_000, "{used} bytes");
    drop(d);
}
