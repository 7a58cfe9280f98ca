//! Short byte strings cut from a per-thread buffer: the header values and audit fields
//! keygate makes on every request (`RateLimit` values, request ids, recorded paths) cost
//! one heap allocation per buffer, not one each.
//!
//! Each value is a [`Bytes`] sharing the buffer it was cut from (reference-counted); the
//! buffer is freed once the last value cut from it is dropped. A value therefore keeps at
//! most one buffer (under 1 KiB) alive, which is why longer values are copied on their own.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

/// Bytes per buffer. Under 1 KiB on purpose: glibc serves a request of 1 KiB or more from
/// its large bins and first consolidates every free small chunk of the arena (measured:
/// ~130k instructions per 8 KiB block, ~500 per request amortized, against a few for a
/// block this size).
const CHUNK: usize = 992;

/// Longest value cut from the shared buffer; longer values get an allocation of their own.
const MAX_SHARED: usize = 256;

thread_local! {
    static BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `b` as [`Bytes`], cut from this thread's buffer when short.
#[cfg_attr(
    not(any(feature = "audit", feature = "rate-limit", feature = "quota")),
    allow(dead_code)
)]
pub(crate) fn copy(b: &[u8]) -> Bytes {
    concat(&[b])
}

/// The concatenation of `parts` as [`Bytes`], cut from this thread's buffer when short.
pub(crate) fn concat(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_SHARED {
        return Bytes::from(parts.concat());
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.capacity() - buf.len() < len {
            *buf = BytesMut::with_capacity(CHUNK);
        }
        for p in parts {
            buf.extend_from_slice(p);
        }
        buf.split().freeze()
    })
}

/// The first and the second members of `pairs`, each list joined with `, ` (`a, b, ...`),
/// cut from this thread's buffer when short (one buffer access for both).
pub(crate) fn join_pairs<'a>(
    pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> (Bytes, Bytes) {
    let joined_len = |second: bool| -> usize {
        pairs
            .clone()
            .enumerate()
            .map(|(i, (a, b))| if second { b.len() } else { a.len() } + if i > 0 { 2 } else { 0 })
            .sum()
    };
    let (len_a, len_b) = (joined_len(false), joined_len(true));
    let write = |buf: &mut BytesMut, second: bool| {
        for (i, (a, b)) in pairs.clone().enumerate() {
            if i > 0 {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(if second { b } else { a });
        }
    };
    if len_a > MAX_SHARED || len_b > MAX_SHARED {
        let mut a = BytesMut::with_capacity(len_a);
        write(&mut a, false);
        let mut b = BytesMut::with_capacity(len_b);
        write(&mut b, true);
        return (a.freeze(), b.freeze());
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.capacity() - buf.len() < len_a + len_b {
            *buf = BytesMut::with_capacity(CHUNK);
        }
        write(&mut buf, false);
        let a = buf.split().freeze();
        write(&mut buf, true);
        (a, buf.split().freeze())
    })
}

/// `parts` joined with `, ` (`a, b, ...`), cut from this thread's buffer when short.
pub(crate) fn join<'a>(parts: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
    let len: usize = parts
        .clone()
        .enumerate()
        .map(|(i, p)| p.len() + if i > 0 { 2 } else { 0 })
        .sum();
    let write = |buf: &mut BytesMut| {
        for (i, p) in parts.clone().enumerate() {
            if i > 0 {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(p);
        }
    };
    if len > MAX_SHARED {
        let mut b = BytesMut::with_capacity(len);
        write(&mut b);
        return b.freeze();
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.capacity() - buf.len() < len {
            *buf = BytesMut::with_capacity(CHUNK);
        }
        write(&mut buf);
        buf.split().freeze()
    })
}

/// `b` as a header value cut from this thread's buffer (`None` if it holds a byte a header
/// value may not: never for the values keygate writes).
#[cfg_attr(not(any(feature = "rate-limit", feature = "quota")), allow(dead_code))]
pub(crate) fn header_value(b: &[u8]) -> Option<http::HeaderValue> {
    http::HeaderValue::from_maybe_shared(copy(b)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_copied_exactly() {
        let mut kept = Vec::new();
        for i in 0..500u32 {
            let text = format!("\"default\";r={i};t=1");
            let v = header_value(text.as_bytes()).unwrap();
            kept.push((text, v));
        }
        for (text, v) in &kept {
            assert_eq!(v.as_bytes(), text.as_bytes());
        }
        let long = "x".repeat(MAX_SHARED + 1);
        assert_eq!(copy(long.as_bytes()), long.as_bytes());
        assert_eq!(copy(b""), &b""[..]);
        assert_eq!(concat(&[b"a", b", ", b"b"]), &b"a, b"[..]);
        assert_eq!(concat(&[long.as_bytes(), b"!"]).len(), MAX_SHARED + 2);
        let pairs: [(&[u8], &[u8]); 3] = [(b"a", b"x"), (b"b", b""), (b"c", b"z")];
        let (a, b) = join_pairs(pairs.iter().copied());
        assert_eq!((&a[..], &b[..]), (&b"a, b, c"[..], &b"x, , z"[..]));
        let parts: [&[u8]; 3] = [b"a", b"", b"c"];
        assert_eq!(join(parts.iter().copied()), &b"a, , c"[..]);
        assert_eq!(join([long.as_bytes()].into_iter()), long.as_bytes());
        let (a, b) = join_pairs([(&b"a"[..], long.as_bytes())].into_iter());
        assert_eq!((&a[..], &b[..]), (&b"a"[..], long.as_bytes()));
    }

    #[test]
    fn refused_bytes_are_refused() {
        assert!(header_value(b"a\nb").is_none());
        assert!(header_value(b"a\x7fb").is_none());
        assert_eq!(header_value(b"a\tb").unwrap().as_bytes(), b"a\tb");
        assert_eq!(
            header_value(b"caf\xc3\xa9").unwrap().as_bytes(),
            b"caf\xc3\xa9"
        );
    }
}
