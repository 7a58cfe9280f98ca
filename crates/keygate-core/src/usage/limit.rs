//! The state of one rate-limit or quota policy for one caller, as the IETF `RateLimit-Policy`
//! and `RateLimit` fields report it.

use std::time::Duration;

/// Where one policy stands for one caller: what it allows, what is left, and when it is
/// whole again. Carried by a [`Denial`](crate::Denial) (rate and quota rejections) and used
/// to write the `RateLimit-Policy` / `RateLimit` fields of
/// draft-ietf-httpapi-ratelimit-headers-10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    /// The policy's name (`burst`, `daily`).
    pub name: String,
    /// What the policy allows per window (its quota, in requests or cost units).
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// How long until the whole limit is available again (`None`: never, for credits that
    /// do not refill).
    pub reset_after: Option<Duration>,
    /// The policy's window, if it has one (`w`); only whole seconds are reported.
    pub window: Option<Duration>,
    /// Whether this policy is one the request broke.
    pub violated: bool,
}

impl LimitState {
    /// Appends this policy as a `RateLimit-Policy` list item: `"burst";q=20;w=1`. The `w`
    /// parameter is left out when the window is not a whole, non-zero number of seconds
    /// (the draft has no sub-second windows).
    pub fn write_policy_item(&self, out: &mut String) {
        write_policy_item(out, &self.name, self.limit, self.window);
    }

    /// Appends this policy as a `RateLimit` list item: `"burst";r=19;t=1`, where `t` is the
    /// whole seconds (rounded up) until the whole limit is available again; left out when it
    /// never is.
    pub fn write_limit_item(&self, out: &mut String) {
        write_limit_item(out, &self.name, self.remaining, self.reset_after);
    }

    /// The `RateLimit-Policy` field value of `states` (a comma-separated list).
    pub fn policy_field(states: &[LimitState]) -> String {
        let mut out = String::with_capacity(32 * states.len());
        for (i, s) in states.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            s.write_policy_item(&mut out);
        }
        out
    }

    /// The `RateLimit` field value of `states` (a comma-separated list).
    pub fn limit_field(states: &[LimitState]) -> String {
        let mut out = String::with_capacity(24 * states.len());
        for (i, s) in states.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            s.write_limit_item(&mut out);
        }
        out
    }
}

/// The largest Integer a structured field may carry (RFC 9651: 15 digits).
pub const MAX_SF_INTEGER: u64 = 999_999_999_999_999;

/// Whole seconds, rounded up (`0` stays `0`): the one rounding of `RateLimit`'s `t` and of
/// `Retry-After` (which is at least 1 on top of it).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Where `RateLimit-Policy` and `RateLimit` field values are written: a `String`, or a
/// layer's own stack buffer. The one formatter of both fields
/// ([`write_policy_item`], [`write_limit_item`]) writes through it.
pub trait FieldSink {
    /// Appends text.
    fn push_str(&mut self, s: &str);

    /// Appends `n` in decimal.
    fn push_u64(&mut self, n: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut n = n;
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // Only ASCII digits were written.
        self.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("0"));
    }
}

impl FieldSink for String {
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
}

/// Appends one `RateLimit-Policy` list item: `"name";q=limit;w=secs`, without `w` when
/// `window` is not a whole, non-zero number of seconds.
pub fn write_policy_item(
    out: &mut impl FieldSink,
    name: &str,
    limit: u64,
    window: Option<Duration>,
) {
    push_sf_string(out, name);
    out.push_str(";q=");
    out.push_u64(limit.min(MAX_SF_INTEGER));
    if let Some(w) = window.filter(|w| w.subsec_nanos() == 0 && w.as_secs() > 0) {
        out.push_str(";w=");
        out.push_u64(w.as_secs().min(MAX_SF_INTEGER));
    }
}

/// Appends one `RateLimit` list item: `"name";r=remaining;t=secs`, `t` rounded up
/// ([`ceil_secs`]) and left out when the limit never comes back (`None`).
pub fn write_limit_item(
    out: &mut impl FieldSink,
    name: &str,
    remaining: u64,
    reset_after: Option<Duration>,
) {
    push_sf_string(out, name);
    out.push_str(";r=");
    out.push_u64(remaining.min(MAX_SF_INTEGER));
    if let Some(t) = reset_after {
        out.push_str(";t=");
        out.push_u64(ceil_secs(t).min(MAX_SF_INTEGER));
    }
}

/// [`write_sf_string`] into any [`FieldSink`].
fn push_sf_string(out: &mut impl FieldSink, s: &str) {
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str("\"");
        out.push_str(s);
        out.push_str("\"");
    } else {
        let mut quoted = String::new();
        write_sf_string(s, &mut quoted);
        out.push_str(&quoted);
    }
}

/// Appends `n` in decimal (without the formatting machinery: this runs on every response).
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("0"));
}

/// Writes `s` as an RFC 9651 String: quoted, `"` and `\` escaped, characters outside
/// printable ASCII dropped.
pub fn write_sf_string(s: &str, out: &mut String) {
    out.push('"');
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str, limit: u64, remaining: u64, reset_ms: u64, window_s: u64) -> LimitState {
        LimitState {
            name: name.into(),
            limit,
            remaining,
            reset_after: Some(Duration::from_millis(reset_ms)),
            window: Some(Duration::from_secs(window_s)),
            violated: false,
        }
    }

    #[test]
    fn fields_follow_the_draft_syntax() {
        let states = [
            state("burst", 20, 19, 50, 1),
            state("hourly", 10_000, 9_999, 360, 3600),
        ];
        assert_eq!(
            LimitState::policy_field(&states),
            r#""burst";q=20;w=1, "hourly";q=10000;w=3600"#
        );
        assert_eq!(
            LimitState::limit_field(&states),
            r#""burst";r=19;t=1, "hourly";r=9999;t=1"#
        );
        let mut never = state("credits", 5, 0, 0, 0);
        never.reset_after = None;
        never.window = None;
        assert_eq!(
            LimitState::policy_field(&[never.clone()]),
            r#""credits";q=5"#
        );
        assert_eq!(LimitState::limit_field(&[never]), r#""credits";r=0"#);
        let mut sub = state("fast", 5, 5, 0, 0);
        sub.window = Some(Duration::from_millis(500));
        assert_eq!(LimitState::policy_field(&[sub.clone()]), r#""fast";q=5"#);
        assert_eq!(LimitState::limit_field(&[sub]), r#""fast";r=5;t=0"#);
    }

    #[test]
    fn names_are_escaped() {
        let mut out = String::new();
        write_sf_string("a\"b\\c\u{e9}\n", &mut out);
        assert_eq!(out, r#""a\"b\\c""#);
        let mut out = String::new();
        write_sf_string("burst-1_x", &mut out);
        for n in [0, 7, 10, 999, u64::MAX] {
            out.push(' ');
            push_u64(&mut out, n);
        }
        assert_eq!(out, r#""burst-1_x" 0 7 10 999 18446744073709551615"#);
    }
}
