//! Finding and masking API keys inside text that is about to be recorded.
//!
//! A key is `{prefix}_{body}` where the body is [`BODY_LEN`](crate::BODY_LEN) base62
//! characters. Anything with that shape, anywhere in a value (a request id `req-kg_...`,
//! a path segment, an actor name), counts as a key: the check errs on the side of masking.
//! It looks for an `_` preceded by a letter or digit and followed by at least `BODY_LEN`
//! letters or digits.
//!
//! ```
//! use keygate_core::audit::{contains_key_like, mask_keys};
//!
//! let key = format!("kg_{}", "a1B2".repeat(10));
//! assert!(contains_key_like(format!("req-{key}").as_bytes()));
//! assert!(!contains_key_like(b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736"));
//!
//! let mut path = format!("/collections/{key}/points").into_bytes();
//! assert!(mask_keys(&mut path));
//! assert_eq!(String::from_utf8(path).unwrap(), format!("/collections/kg_{}/points", "*".repeat(40)));
//! ```

use crate::key::BODY_LEN;

/// The start of the body of the first key-shaped run in `b` at or after `from`.
fn find(b: &[u8], mut from: usize) -> Option<usize> {
    while from < b.len() {
        let at = from + memchr::memchr(b'_', &b[from..])?;
        let body = at + 1;
        let preceded = at > 0 && b[at - 1].is_ascii_alphanumeric();
        if preceded
            && b.len() - body >= BODY_LEN
            && b[body..body + BODY_LEN]
                .iter()
                .all(u8::is_ascii_alphanumeric)
        {
            return Some(body);
        }
        from = body;
    }
    None
}

/// Whether `b` contains something shaped like an API key anywhere (see the module docs).
pub fn contains_key_like(b: &[u8]) -> bool {
    find(b, 0).is_some()
}

/// Replaces the body of everything shaped like an API key in `b` with `*` (the prefix stays,
/// so a reader sees which kind of key leaked). In place, no allocation; `*` is ASCII, so
/// UTF-8 text stays valid. Returns whether anything was masked.
pub fn mask_keys(b: &mut [u8]) -> bool {
    let mut from = 0;
    let mut masked = false;
    while let Some(body) = find(b, from) {
        let mut end = body;
        while end < b.len() && b[end].is_ascii_alphanumeric() {
            b[end] = b'*';
            end += 1;
        }
        masked = true;
        from = end;
    }
    masked
}

/// [`mask_keys`] on a `String` (no allocation when there is nothing to mask). Returns
/// whether anything was masked.
pub fn mask_keys_in(s: &mut String) -> bool {
    if !contains_key_like(s.as_bytes()) {
        return false;
    }
    // Masking replaces ASCII alphanumerics with ASCII `*`: the text stays UTF-8.
    let mut bytes = std::mem::take(s).into_bytes();
    let masked = mask_keys(&mut bytes);
    *s = String::from_utf8(bytes).unwrap_or_default();
    masked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ApiKey, Prefix};

    #[test]
    fn keys_are_found_anywhere() {
        let key = ApiKey::generate(&Prefix::new("sk_live").unwrap()).unwrap();
        let k = key.expose_secret();
        for text in [
            k.to_owned(),
            format!("req-{k}"),
            format!("{k}-tail"),
            format!("a/{k}/b"),
            format!("x{k}"),
        ] {
            assert!(contains_key_like(text.as_bytes()), "{text}");
            let mut s = text.clone();
            assert!(mask_keys_in(&mut s));
            assert!(!s.contains(&k[k.len() - BODY_LEN..]), "{s}");
            assert!(!contains_key_like(s.as_bytes()));
        }
    }

    #[test]
    fn ordinary_values_are_left_alone() {
        for text in [
            "",
            "_",
            "abc",
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
            "0123456789abcdef0123456789abcdef",
            "/collections/my_collection/points",
            &format!("_{}", "a".repeat(60)), // no prefix before the underscore
            &format!("kg_{}", "a".repeat(39)), // one short
        ] {
            assert!(!contains_key_like(text.as_bytes()), "{text}");
            let mut s = text.to_owned();
            assert!(!mask_keys_in(&mut s));
            assert_eq!(s, text);
        }
    }

    #[test]
    fn two_keys_are_both_masked() {
        let a = format!("kg_{}", "A".repeat(40));
        let b = format!("sk_live_{}", "9".repeat(40));
        let mut s = format!("{a} and {b}").into_bytes();
        assert!(mask_keys(&mut s));
        assert_eq!(
            String::from_utf8(s).unwrap(),
            format!("kg_{0} and sk_live_{0}", "*".repeat(40))
        );
    }
}
