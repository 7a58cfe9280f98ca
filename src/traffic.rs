//! The traffic core shared by rate limits and quotas: the `RateLimit-Policy` / `RateLimit`
//! field buffer (the one formatter of both fields is keygate-core's
//! [`write_policy_item`](crate::core::usage::write_policy_item) and
//! [`write_limit_item`](crate::core::usage::write_limit_item), writing into it).

use crate::core::usage::FieldSink;

/// A stack buffer for the `RateLimit-Policy` / `RateLimit` field values the rate-limit and
/// quota layers write on every response: formatted without a heap allocation (up to 256
/// bytes; longer values spill to the heap), then copied once into the
/// [`HeaderValue`](http::HeaderValue), itself cut from a per-thread buffer.
pub(crate) struct FieldBuf {
    len: usize,
    buf: [u8; 256],
    /// Everything written so far, once it no longer fits in `buf` (empty until then).
    spill: Vec<u8>,
}

/// `"00" "01" ... "99"`: two decimal digits per lookup.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

impl FieldBuf {
    #[inline]
    pub(crate) fn new() -> Self {
        FieldBuf {
            len: 0,
            buf: [0; 256],
            spill: Vec::new(),
        }
    }

    /// Appends raw bytes (short constant pieces compile to a few moves when inlined).
    #[inline]
    fn push_bytes(&mut self, b: &[u8]) {
        if self.spill.is_empty() {
            if let Some(dst) = self.buf.get_mut(self.len..self.len + b.len()) {
                dst.copy_from_slice(b);
                self.len += b.len();
                return;
            }
            self.spill.extend_from_slice(&self.buf[..self.len]);
        }
        self.spill.extend_from_slice(b);
    }

    /// Appends `s` as a structured-field String (see
    /// [`write_sf_string`](crate::core::usage::write_sf_string)).
    #[cfg(test)]
    fn push_sf_string(&mut self, s: &str) {
        if s.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.push_bytes(b"\"");
            self.push_bytes(s.as_bytes());
            self.push_bytes(b"\"");
        } else {
            let mut out = String::new();
            crate::core::usage::write_sf_string(s, &mut out);
            self.push_str(&out);
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        if self.spill.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.spill
        }
    }

    /// The value as a header value (`None` if it holds a byte a header value may not), cut
    /// from the per-thread buffer of [`chunk`](crate::chunk): no allocation of its own.
    pub(crate) fn to_header(&self) -> Option<http::HeaderValue> {
        crate::chunk::header_value(self.as_bytes())
    }

    /// The value's bytes, cut from the per-thread buffer of [`chunk`](crate::chunk) and not
    /// yet checked as a header value.
    pub(crate) fn to_bytes(&self) -> bytes::Bytes {
        crate::chunk::copy(self.as_bytes())
    }
}

impl FieldSink for FieldBuf {
    #[inline]
    fn push_str(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    /// Appends `n` in decimal (four digits per division while it has more than four).
    fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        while n >= 10_000 {
            let rest = (n % 10_000) as usize;
            n /= 10_000;
            let (hi, lo) = (rest / 100 * 2, rest % 100 * 2);
            i -= 4;
            digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[hi..hi + 2]);
            digits[i + 2..i + 4].copy_from_slice(&DIGIT_PAIRS[lo..lo + 2]);
        }
        let mut n = n as usize;
        if n >= 100 {
            let pair = n % 100 * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n * 2;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        } else {
            i -= 1;
            digits[i] = b'0' + n as u8;
        }
        self.push_bytes(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::FieldBuf;
    use crate::core::usage::FieldSink;

    fn text(f: &FieldBuf) -> String {
        String::from_utf8(f.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn numbers_in_decimal() {
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            999,
            1000,
            86_400,
            1_000_000_000_000,
            999_999_999_999_999,
            u64::MAX,
        ] {
            let mut f = FieldBuf::new();
            f.push_u64(n);
            assert_eq!(text(&f), n.to_string());
        }
        // Every length, and the values around each power of ten.
        let mut p = 1u64;
        loop {
            for n in [p - 1, p, p + 1, p.saturating_mul(7) / 3] {
                let mut f = FieldBuf::new();
                f.push_u64(n);
                assert_eq!(text(&f), n.to_string());
            }
            match p.checked_mul(10) {
                Some(next) => p = next,
                None => break,
            }
        }
        for n in (0..200_000u64).step_by(7).chain(u64::MAX - 1000..=u64::MAX) {
            let mut f = FieldBuf::new();
            f.push_u64(n);
            assert_eq!(text(&f), n.to_string());
        }
    }

    #[test]
    fn long_values_spill_to_the_heap() {
        let mut f = FieldBuf::new();
        let mut expected = String::new();
        for i in 0..40u64 {
            if i > 0 {
                f.push_str(", ");
                expected.push_str(", ");
            }
            f.push_sf_string("policy");
            f.push_str(";q=");
            f.push_u64(i * 1_000_003);
            expected.push_str(&format!("\"policy\";q={}", i * 1_000_003));
        }
        assert!(expected.len() > 256);
        assert_eq!(text(&f), expected);
        assert_eq!(f.to_header().unwrap().as_bytes(), expected.as_bytes());
    }

    #[test]
    fn sf_strings_are_quoted_and_escaped() {
        let mut f = FieldBuf::new();
        f.push_sf_string("daily");
        f.push_str(", ");
        f.push_sf_string("a\"b");
        assert_eq!(text(&f), r#""daily", "a\"b""#);
    }
}
