//! [`Text`]: an immutable string sharing its bytes, for the audit fields recorded on every
//! request (request id, path).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable UTF-8 string whose bytes may be shared (reference-counted) with other
/// values: the audit layer cuts the request id and path of every event from one per-thread
/// buffer, so recording them copies a few bytes and allocates nothing of its own. Reads as
/// a `&str` (it dereferences to `str`), compares with `str` and `String`, and serializes as
/// a JSON string.
///
/// ```
/// use keygate_core::audit::Text;
///
/// let id = Text::from("req-1");
/// assert_eq!(id, "req-1");
/// assert_eq!(id.len(), 5);
/// assert_eq!(String::from(id.clone()), "req-1");
/// assert_eq!(serde_json::to_string(&id).unwrap(), r#""req-1""#);
/// ```
#[derive(Clone, Default)]
pub struct Text(Bytes);

impl Text {
    /// `bytes` as text, if they are UTF-8 (shared, not copied).
    pub fn from_utf8(bytes: Bytes) -> Result<Text, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    /// `bytes` as text, if they are ASCII (shared, not copied); otherwise the bytes back.
    /// Checks less than [`Text::from_utf8`], for text that is ASCII as a rule (request ids,
    /// paths).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use keygate_core::audit::Text;
    ///
    /// assert_eq!(Text::from_ascii(Bytes::from_static(b"/v1/items")).unwrap(), "/v1/items");
    /// assert!(Text::from_ascii(Bytes::from_static("caf\u{e9}".as_bytes())).is_err());
    /// ```
    pub fn from_ascii(bytes: Bytes) -> Result<Text, Bytes> {
        if bytes.is_ascii() {
            Ok(Text(bytes))
        } else {
            Err(bytes)
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Built only from UTF-8 (`from_utf8`, `From<&str>`, `From<String>`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s))
    }
}

impl From<Text> for String {
    fn from(t: Text) -> Self {
        t.as_str().to_owned()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.0 == other.0
    }
}

impl Eq for Text {}

impl Hash for Text {
    /// As the `str` it holds (so `Borrow<str>` lookups find it).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

macro_rules! eq_str {
    ($($t:ty),*) => {$(
        impl PartialEq<$t> for Text {
            fn eq(&self, other: &$t) -> bool {
                self.as_str() == AsRef::<str>::as_ref(other)
            }
        }
        impl PartialEq<Text> for $t {
            fn eq(&self, other: &Text) -> bool {
                AsRef::<str>::as_ref(self) == other.as_str()
            }
        }
    )*};
}
eq_str!(str, &str, String);

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        String::deserialize(d).map(Text::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_hashes_and_orders_as_str() {
        use std::collections::HashSet;
        let a = Text::from("abc");
        let b = Text::from_utf8(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, "abc");
        assert_eq!("abc", a);
        assert_eq!(a, String::from("abc"));
        assert_eq!(Text::from("abd").cmp(&a), std::cmp::Ordering::Greater);
        let set: HashSet<Text> = [a.clone()].into();
        assert!(set.contains("abc"));
        assert_eq!(format!("{a} {a:?}"), r#"abc "abc""#);
        assert!(Text::from_utf8(Bytes::from_static(b"caf\xc3")).is_err());
        let back: Text = serde_json::from_str(r#""a\"b""#).unwrap();
        assert_eq!(back, "a\"b");
        assert_eq!(Text::default(), "");
    }
}
