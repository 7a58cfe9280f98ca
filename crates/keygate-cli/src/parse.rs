//! Value parsers: every option value is checked before anything is opened or changed.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use keygate_core::audit::ChainPoint;
use keygate_core::{validate_resource_pattern, KeyId, Prefix, QuotaPolicy, RateLimitPolicy, Scope};

/// `30s`, `15m`, `12h`, `90d`: a whole number and a unit (seconds, minutes, hours, days),
/// at most `36500d` (the syntax and limit the admin API shares, `keygate_core::time`).
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    keygate_core::time::parse_duration(text).map_err(|e| e.to_string())
}

/// A polling interval: like [`duration`], plus `ms`; at least 10 ms.
pub(crate) fn poll_interval(text: &str) -> Result<Duration, String> {
    let d = match text.strip_suffix("ms") {
        Some(n) => Duration::from_millis(
            n.parse::<u64>()
                .map_err(|_| format!("{text:?} is not a duration like 250ms or 1s"))?,
        ),
        None => duration(text)?,
    };
    if d < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".into());
    }
    Ok(d)
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host). Host bits are refused.
pub(crate) fn cidr(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(format!(
                    "{:?} is not a network like 10.0.0.0/8 or 2001:db8::/32",
                    shorten(text)
                ))
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `NAME=N/UNIT`, UNIT one of `s`, `m`, `h`, `d`.
pub(crate) fn rate(text: &str) -> Result<RateLimitPolicy, String> {
    text.parse::<RateLimitPolicy>().map_err(|e| e.to_string())
}

/// `NAME=N/UNIT`, UNIT one of `h`, `d`, `month`.
pub(crate) fn quota(text: &str) -> Result<QuotaPolicy, String> {
    text.parse::<QuotaPolicy>().map_err(|e| e.to_string())
}

/// A scope as the key store accepts it.
pub(crate) fn scope(text: &str) -> Result<String, String> {
    Scope::parse(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

/// A collection name or pattern.
pub(crate) fn collection(text: &str) -> Result<String, String> {
    validate_resource_pattern(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

/// `SCOPE:COLLECTION-PATTERN` (`points:write:docs-*`): one scope on one collection
/// pattern, split at the last `:` (collection patterns hold no `:`).
pub(crate) fn grant(text: &str) -> Result<(String, String), String> {
    let usage = || {
        format!(
            "{:?} is not SCOPE:COLLECTION-PATTERN (like points:write:docs-*)",
            shorten(text)
        )
    };
    let (s, c) = text.rsplit_once(':').ok_or_else(usage)?;
    if s.is_empty() || c.is_empty() {
        return Err(usage());
    }
    let s = scope(s).map_err(|e| format!("{}: {e}", usage()))?;
    let c = collection(c).map_err(|e| format!("{}: {e}", usage()))?;
    Ok((s, c))
}

/// `--grant` values as grants: the scopes given on one collection pattern make one grant,
/// in the order first seen.
pub(crate) fn grants(pairs: &[(String, String)]) -> Vec<keygate_core::Grant> {
    let mut out: Vec<keygate_core::Grant> = Vec::new();
    for (s, c) in pairs {
        match out
            .iter_mut()
            .find(|g| g.collections.len() == 1 && &g.collections[0] == c)
        {
            Some(g) => {
                if !g.scopes.contains(s) {
                    g.scopes.push(s.clone());
                }
            }
            None => out.push(keygate_core::Grant::new([s.clone()], [c.clone()])),
        }
    }
    out
}

/// `KEY=VALUE` (the value may contain `=`; names are checked when the key is created).
pub(crate) fn attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{:?} is not KEY=VALUE", shorten(text))),
    }
}

/// A key prefix (`kg`, `sk_live`).
pub(crate) fn prefix(text: &str) -> Result<Prefix, String> {
    Prefix::new(text).map_err(|e| e.to_string())
}

/// A public key id.
pub(crate) fn key_id(text: &str) -> Result<KeyId, String> {
    KeyId::parse(text).map_err(|_| {
        format!(
            "{:?} is not a key id (12 characters of 0-9, A-Z, a-z)",
            shorten(text)
        )
    })
}

/// Any JSON value.
pub(crate) fn json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// `SEQ:HASH` (HASH: 64 hex characters).
pub(crate) fn chain_point(text: &str) -> Result<ChainPoint, String> {
    let bad = || format!("{:?} is not SEQ:HASH (64 hex characters)", shorten(text));
    let (seq, hash) = text.split_once(':').ok_or_else(bad)?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(ChainPoint {
        seq,
        hash: hash.to_ascii_lowercase(),
    })
}

/// At most 64 characters of `text`, for messages.
pub(crate) fn shorten(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "s",
            "10",
            "10x",
            "-5d",
            "1.5h",
            "10 s",
            "10S",
            "99999999999999999999d",
            "4000000d",
            "2914000d",
            "36501d",
        ] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        assert_eq!(duration("36500d"), Ok(Duration::from_secs(36_500 * 86_400)));
        let e = duration("2914000d").unwrap_err();
        assert!(e.contains("the maximum is 36500d"), "{e}");
        assert_eq!(poll_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(poll_interval("1ms").is_err());
    }

    #[test]
    fn networks() {
        assert_eq!(cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(cidr("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        let e = cidr("10.0.0.1/8").unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
        for bad in ["10.0.0.0/33", "banana", "10.0.0/8", ""] {
            assert!(cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_and_others() {
        assert_eq!(
            rate("burst=20/s").unwrap(),
            RateLimitPolicy::per_second("burst", 20)
        );
        assert!(rate("burst=20/x").is_err());
        assert!(quota("daily=10000/d").is_ok());
        assert!(quota("monthly=5/month").is_ok());
        assert!(quota("fast=5/s").is_err());
        assert_eq!(attribute("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(attribute("novalue").is_err());
        assert!(attribute("=v").is_err());
        assert!(scope("points:read").is_ok());
        assert!(scope("points").is_err());
        assert!(chain_point(&format!("7:{}", "ab".repeat(32))).is_ok());
        assert!(chain_point("7:abc").is_err());
    }
}
