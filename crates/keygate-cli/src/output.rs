//! Printing: JSON documents, tables and the readable forms of records and events.

use std::io::Write;
use std::time::{Duration, SystemTime};

use keygate_core::audit::{AuditEvent, Decision};
use keygate_core::{KeyRecord, QuotaPolicy, QuotaWindow, RateLimitPolicy, Refill};
use serde_json::Value;

use crate::Failure;

/// Writes `text` to stdout. A closed pipe (`keygate ... | head`) is not an error worth a
/// message: it ends the command quietly.
pub(crate) fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure::Failed(format!("cannot write the output: {e}"))),
    }
}

/// Prints `value` as pretty JSON and a newline.
pub(crate) fn print_json(value: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::Failed(format!("cannot encode the output: {e}")))?;
    print(&format!("{text}\n"))
}

/// A record's public JSON: its `KeyInfo` plus `expired` (whether its expiry has passed).
pub(crate) fn key_json(record: &KeyRecord, now: SystemTime) -> Value {
    let mut v = serde_json::to_value(record.info()).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("expired".into(), Value::Bool(record.is_expired_at(now)));
    }
    v
}

/// An instant to the second, UTC: `2026-05-01T10:30:00Z`.
pub(crate) fn time(t: SystemTime) -> String {
    keygate_core::time::rfc3339_seconds(t).to_string()
}

/// A rate limit as the `--rate` spelling: `burst=20/s` (`name=N/Pms` for other periods).
pub(crate) fn rate(p: &RateLimitPolicy) -> String {
    let unit = match p.period.as_millis() {
        1_000 => "s".to_owned(),
        60_000 => "m".to_owned(),
        3_600_000 => "h".to_owned(),
        86_400_000 => "d".to_owned(),
        ms => format!("{ms}ms"),
    };
    format!("{}={}/{unit}", p.name, p.limit)
}

/// A quota window's short name: `h`, `d`, `month`, `credits`, `credits/daily`,
/// `credits/monthly@15`.
pub(crate) fn window(w: QuotaWindow) -> String {
    match w {
        QuotaWindow::Hour => "h".into(),
        QuotaWindow::Day => "d".into(),
        QuotaWindow::Month => "month".into(),
        QuotaWindow::Credits(Refill::Never) => "credits".into(),
        QuotaWindow::Credits(Refill::Daily) => "credits/daily".into(),
        QuotaWindow::Credits(Refill::Monthly { day }) => format!("credits/monthly@{day}"),
    }
}

/// A quota as the `--quota` spelling: `daily=10000/d`.
pub(crate) fn quota(q: &QuotaPolicy) -> String {
    format!("{}={}/{}", q.name, q.limit, window(q.window))
}

/// A grant as `scope,scope on collection,collection` (`on -`: no collection).
pub(crate) fn grant(g: &keygate_core::Grant) -> String {
    format!(
        "{} on {}",
        g.scopes.join(","),
        list(g.collections.iter().cloned())
    )
}

/// `-` for an empty list, else the items joined with `, `.
pub(crate) fn list<I: IntoIterator<Item = String>>(items: I) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// The status column: `active`, `active (expired)`, `disabled`, `revoked`.
pub(crate) fn status(record: &KeyRecord, now: SystemTime) -> String {
    if record.is_expired_at(now) {
        format!("{} (expired)", record.status)
    } else {
        record.status.to_string()
    }
}

/// A record as `field  value` lines.
pub(crate) fn key_details(record: &KeyRecord, now: SystemTime) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("id", record.id.to_string()),
        ("name", record.name.clone()),
        ("prefix", record.prefix.to_string()),
        ("owner", record.owner.clone().unwrap_or_else(|| "-".into())),
        ("status", status(record, now)),
        ("created", time(record.created_at)),
        ("updated", time(record.updated_at)),
        (
            "expires",
            record.expires_at.map_or_else(|| "never".into(), time),
        ),
        (
            "last used",
            record.last_used_at.map_or_else(|| "never".into(), time),
        ),
        ("scopes", list(record.scopes.iter().cloned())),
        ("collections", list(record.resources.iter().cloned())),
        (
            "attributes",
            list(record.attributes.iter().map(|(k, v)| format!("{k}={v}"))),
        ),
        (
            "allowed ips",
            list(record.allowed_ips.iter().map(ToString::to_string)),
        ),
        ("rate limits", list(record.rate_limits.iter().map(rate))),
        ("quotas", list(record.quotas.iter().map(quota))),
        (
            "metadata",
            if record.metadata.is_null() {
                "-".into()
            } else {
                record.metadata.to_string()
            },
        ),
        ("grants", list(record.grants.iter().map(grant))),
        ("roles", list(record.roles.iter().cloned())),
        (
            "identity",
            record.identity.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "rotated from",
            record
                .rotated_from
                .map_or_else(|| "-".into(), |k| k.to_string()),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out
}

/// A table: a header row and rows, columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// An audit event on one line: `time  [#seq]  kind  details`.
pub(crate) fn event_line(seq: Option<u64>, event: &AuditEvent) -> String {
    let when = keygate_core::time::rfc3339_millis(event.time()).to_string();
    let seq = seq.map(|s| format!("#{s}  ")).unwrap_or_default();
    match event {
        AuditEvent::Lifecycle(l) => format!(
            "{when}  {seq}lifecycle  {:<8}  key={}  name={:?}  actor={:?}  status={}{}",
            l.action.as_str(),
            l.key_id,
            l.key_name,
            l.actor,
            l.status,
            l.related_key
                .map(|k| format!("  related={k}"))
                .unwrap_or_default()
        ),
        AuditEvent::Denials(d) => {
            let mut s = format!(
                "{when}  {seq}denials    {} {} -> {} denied",
                d.method,
                d.path,
                d.status.map_or_else(|| "-".into(), |s| s.to_string()),
            );
            if let Some(c) = d.denial {
                s.push_str(&format!(" ({})", c.as_str()));
            }
            if let Some(ip) = d.client_ip {
                s.push_str(&format!("  ip={ip}"));
            }
            s.push_str(&format!(
                "  x{} until {}",
                d.count,
                humantime::format_rfc3339_millis(d.until)
            ));
            s
        }
        AuditEvent::Anomaly(a) => {
            let mut s = format!("{when}  {seq}anomaly    {}", a.kind.as_str());
            if let Some(k) = a.key_id {
                s.push_str(&format!("  key={k}"));
            }
            if let Some(n) = &a.key_name {
                s.push_str(&format!("  name={n:?}"));
            }
            if let Some(ip) = a.client_ip {
                s.push_str(&format!("  ip={ip}"));
            }
            if let Some(n) = &a.network {
                s.push_str(&format!("  network={n}"));
            }
            s.push_str(&format!("  count={}", a.count));
            if let Some(t) = a.threshold {
                s.push_str(&format!("  threshold={t:.1}"));
            }
            if let Some(b) = a.baseline {
                s.push_str(&format!("  baseline={b:.1}"));
            }
            if let Some(w) = a.window_s {
                s.push_str(&format!("  window={w}s"));
            }
            s
        }
        AuditEvent::Request(r) => {
            let decision = match r.decision {
                Decision::Allowed => "allowed",
                Decision::Denied => "denied",
                Decision::Error => "error",
                Decision::Cancelled => "cancelled",
            };
            let mut s = format!(
                "{when}  {seq}request    {} {} -> {} {decision}",
                r.method,
                r.path,
                r.status.map_or_else(|| "-".into(), |s| s.to_string()),
            );
            if let Some(d) = r.denial {
                s.push_str(&format!(" ({})", d.as_str()));
            }
            if let Some(k) = r.key_id {
                s.push_str(&format!("  key={k}"));
            }
            if let Some(ip) = r.client_ip {
                s.push_str(&format!("  ip={ip}"));
            }
            s.push_str(&format!(
                "  {}us  id={:?}",
                r.latency.as_micros(),
                r.request_id
            ));
            s
        }
    }
}

/// How long until `end`, rounded to the second: `3h12m5s` (`-` when never).
pub(crate) fn until(end: Option<SystemTime>, now: SystemTime) -> String {
    match end {
        None => "never".into(),
        Some(e) => {
            let d = e.duration_since(now).unwrap_or(Duration::ZERO);
            humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
        }
    }
}

/// An audit event as JSON (its stable form).
pub(crate) fn event_json(event: &AuditEvent) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}

/// Whether `text` looks like an API key (`prefix_` and 20 or more letters and digits, or
/// 34 to 40 letters and digits mixing upper and lower case, as a key's body): `Some` with
/// the key id it starts with when one can be read, `None` when it is not key-shaped.
pub(crate) fn key_shaped(text: &str) -> Option<Option<String>> {
    let alnum = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if let Some((prefix, body)) = text.rsplit_once('_') {
        let prefix_ok = !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if prefix_ok && alnum(body) && body.len() >= 20 {
            return Some(body.get(..keygate_core::KEY_ID_LEN).map(str::to_owned));
        }
    }
    let mixed = text.bytes().any(|b| b.is_ascii_uppercase())
        && text.bytes().any(|b| b.is_ascii_lowercase());
    if alnum(text) && (34..=keygate_core::BODY_LEN).contains(&text.len()) && mixed {
        return Some(text.get(..keygate_core::KEY_ID_LEN).map(str::to_owned));
    }
    None
}

/// `text` with every word (a run of letters, digits and `_`) that [`key_shaped`] calls a
/// key replaced by `[key hidden]`.
pub(crate) fn hide_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if key_shaped(word).is_some() {
            out.push_str("[key hidden]");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recognised_and_hidden() {
        let key = "kg_3hG7xQ2mPa9Zk0Lr8VbN4sTu6WyE1cFd5gHj2KoMnP7qR9";
        assert_eq!(key_shaped(key), Some(Some("3hG7xQ2mPa9Z".into())));
        assert_eq!(
            key_shaped("sk_live_3hG7xQ2mPa9Zk0Lr8VbN4sTu6WyE1cFd5gHj2KoMnP7qR9"),
            Some(Some("3hG7xQ2mPa9Z".into()))
        );
        assert_eq!(
            key_shaped("3hG7xQ2mPa9Zk0Lr8VbN4sTu6WyE1cFd5gHj2KoMnP7qR9"[..40].as_ref()),
            Some(Some("3hG7xQ2mPa9Z".into()))
        );
        // Ids, names, hex digests are not keys.
        for not in [
            "3hG7xQ2mPa9Z",
            "kg_3hG7xQ2mPa9Z",
            "ci-pipeline",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "",
        ] {
            assert_eq!(key_shaped(not), None, "{not}");
        }
        assert_eq!(
            hide_keys(&format!("no key {key:?} here, id 3hG7xQ2mPa9Z")),
            "no key \"[key hidden]\" here, id 3hG7xQ2mPa9Z"
        );
    }
}
