//! Duration, rate, quota, scope, status, prefix and key-id spellings (the CLI's and the
//! admin API's), and the JSON forms of the policies.

use std::str::FromStr;
use std::time::Duration;

use keygate::core::time::{parse_duration, MAX_DURATION};
use keygate::{KeyId, KeyStatus, Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy, Scope};

/// The documented duration grammar: whitespace, digits, one of `s m h d`, whitespace.
fn reference_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let unit = t.chars().last()?;
    let n = &t[..t.len() - unit.len_utf8()];
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let per = match unit {
        's' => 1u128,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return None,
    };
    // Arbitrarily many digits: compare as big numbers.
    let digits = n.trim_start_matches('0');
    if digits.len() > 30 {
        return None;
    }
    let secs = digits.parse::<u128>().unwrap_or(0) * per;
    (secs <= u128::from(MAX_DURATION.as_secs())).then(|| Duration::from_secs(secs as u64))
}

fn unit_of(period: Duration) -> &'static str {
    match period.as_secs() {
        1 => "s",
        60 => "m",
        3600 => "h",
        86_400 => "d",
        other => panic!("a parsed rate limit has period {other}s"),
    }
}

/// The first byte picks the spelling; the rest is the text (or JSON).
pub fn spellings(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 8 == 7 {
        json_policies(rest);
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 8 {
        0 => {
            let got = parse_duration(text);
            assert_eq!(
                got.as_ref().ok().copied(),
                reference_duration(text),
                "{text:?}"
            );
            if let Err(e) = got {
                assert!(e.to_string().chars().count() <= 64 * 10 + 128);
            }
        }
        1 => {
            if let Ok(p) = RateLimitPolicy::from_str(text) {
                assert!(p.limit >= 1);
                let again = format!("{}={}/{}", p.name, p.limit, unit_of(p.period));
                assert_eq!(RateLimitPolicy::from_str(&again).as_ref(), Ok(&p));
                let _ = keygate::rate_limit::validate_policy(&p);
            }
        }
        2 => {
            if let Ok(p) = QuotaPolicy::from_str(text) {
                assert!(p.limit >= 1);
                let again = format!("{}={}/{}", p.name, p.limit, p.window.as_str());
                assert_eq!(QuotaPolicy::from_str(&again).as_ref(), Ok(&p));
                let _ = keygate::quota::validate_policy(&p);
            }
        }
        3 => {
            if let Ok(s) = Scope::parse(text) {
                assert_eq!(Scope::parse(&s.to_string()).as_ref(), Ok(&s));
            }
        }
        4 => {
            if let Ok(s) = KeyStatus::from_str(text) {
                assert_eq!(KeyStatus::from_str(&s.to_string()), Ok(s));
            }
        }
        5 => {
            if let Ok(p) = Prefix::new(text) {
                assert_eq!(p.as_str(), text);
                assert_eq!(Prefix::from_str(&p.to_string()).as_ref(), Ok(&p));
            }
        }
        _ => {
            if let Ok(id) = KeyId::parse(text) {
                assert_eq!(id.as_str(), text);
                assert_eq!(KeyId::parse(&id.to_string()), Ok(id));
            }
        }
    }
}

/// The policies' JSON forms (the admin API and the stores read them): what deserializes
/// serializes back to the same value.
fn json_policies(bytes: &[u8]) {
    if let Ok(p) = serde_json::from_slice::<RateLimitPolicy>(bytes) {
        let text = serde_json::to_string(&p).expect("serializes");
        assert_eq!(
            serde_json::from_str::<RateLimitPolicy>(&text).ok(),
            Some(p.clone())
        );
        let _ = keygate::rate_limit::validate_policy(&p);
    }
    if let Ok(p) = serde_json::from_slice::<QuotaPolicy>(bytes) {
        let text = serde_json::to_string(&p).expect("serializes");
        assert_eq!(
            serde_json::from_str::<QuotaPolicy>(&text).ok(),
            Some(p.clone())
        );
        let _ = keygate::quota::validate_policy(&p);
    }
    if let Ok(w) = serde_json::from_slice::<QuotaWindow>(bytes) {
        let text = serde_json::to_string(&w).expect("serializes");
        assert_eq!(serde_json::from_str::<QuotaWindow>(&text).ok(), Some(w));
    }
}
