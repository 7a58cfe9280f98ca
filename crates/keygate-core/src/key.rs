//! The API key format: generation, parsing and display.
//!
//! A key reads `{prefix}_{body}`, for example
//! `kg_3hG7xQ2mPa9Zk0Lr8VbN4sTu6WyE1cFd5gHj2KoMnP7qR9`:
//!
//! | part     | length | what it is |
//! |----------|--------|------------|
//! | prefix   | 1–32   | lower-case ASCII letters, digits and single underscores, starting with a letter (`kg`, `sk_live`) |
//! | `_`      | 1      | separator (the last underscore of the key) |
//! | key id   | 12     | base62, random, public: used for lookup, display, logs and revocation |
//! | secret   | 22     | base62, 131 bits from the operating system's CSPRNG |
//! | checksum | 6      | base62 of the CRC32 of everything before it |
//!
//! The checksum lets a verifier reject typos and garbage before any lookup, and lets secret
//! scanners match keys with few false positives. The regex for scanners is
//! [`SCANNER_REGEX`]; for one prefix, replace the prefix group with it (for `kg`:
//! `\bkg_[0-9A-Za-z]{40}\b`).

use std::fmt;
use std::str::FromStr;

/// The base62 alphabet used by key ids, secrets and checksums.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the public key id, in characters.
pub const KEY_ID_LEN: usize = 12;
/// Length of the secret, in characters (22 base62 characters carry 131 bits).
pub const SECRET_LEN: usize = 22;
/// Length of the checksum, in characters.
pub const CHECKSUM_LEN: usize = 6;
/// Length of the body (key id, secret and checksum) after the separator.
pub const BODY_LEN: usize = KEY_ID_LEN + SECRET_LEN + CHECKSUM_LEN;
/// Longest prefix accepted.
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest presented credential that is parsed at all; anything longer is
/// [`KeyParseError::TooLong`] without being read further.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 1 + BODY_LEN;

/// A regular expression (POSIX ERE / RE2 / Rust `regex` syntax) matching every key of any
/// valid prefix, for secret scanners. For a single prefix use `\b<prefix>_[0-9A-Za-z]{40}\b`.
pub const SCANNER_REGEX: &str = r"\b[a-z][a-z0-9]*(_[a-z0-9]+)*_[0-9A-Za-z]{40}\b";

/// Why a presented credential is not a well-formed key. Every variant maps to the
/// `malformed_key` denial code; the variants say which check failed, for logs and tests.
///
/// The messages never contain the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum KeyParseError {
    /// The credential is empty.
    #[error("the key is empty")]
    Empty,
    /// The credential is longer than any key can be ([`MAX_KEY_LEN`]).
    #[error("the key is too long")]
    TooLong,
    /// There is no `_` between prefix and body.
    #[error("the key has no prefix separator")]
    MissingSeparator,
    /// The prefix is not one this verifier accepts.
    #[error("the key has an unknown prefix")]
    UnknownPrefix,
    /// The body after the prefix has the wrong length.
    #[error("the key has the wrong length")]
    BadLength,
    /// The body has a character outside base62.
    #[error("the key has a character outside [0-9A-Za-z]")]
    BadCharacter,
    /// The checksum does not match: a typo or not a key of this format.
    #[error("the key checksum does not match")]
    BadChecksum,
}

/// Why a prefix is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key prefix {0:?}: use 1 to 32 lower-case ASCII letters, digits and single underscores, starting with a letter and not ending with an underscore")]
pub struct InvalidPrefix(pub String);

/// A validated key prefix such as `kg` or `sk_live`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(Box<str>);

impl Prefix {
    /// Validates `prefix`: 1 to 32 characters of `[a-z0-9_]`, starting with a letter, no
    /// trailing or doubled underscore.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let b = prefix.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_PREFIX_LEN
            && b[0].is_ascii_lowercase()
            && b[b.len() - 1] != b'_'
            && !prefix.contains("__")
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
        if ok {
            Ok(Prefix(prefix.into()))
        } else {
            Err(InvalidPrefix(prefix.chars().take(64).collect()))
        }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    /// `kg`.
    fn default() -> Self {
        Prefix("kg".into())
    }
}

impl FromStr for Prefix {
    type Err = InvalidPrefix;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Prefix::new(s)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public identifier of a key: 12 base62 characters, stored inline (no allocation).
///
/// It is safe to log, display and store in plain text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

/// Why a text is not a key id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key id: expected 12 characters of [0-9A-Za-z]")]
pub struct InvalidKeyId;

impl KeyId {
    /// Parses a key id: exactly 12 base62 characters.
    pub fn parse(s: &str) -> Result<Self, InvalidKeyId> {
        let b = s.as_bytes();
        if b.len() != KEY_ID_LEN || !b.iter().all(u8::is_ascii_alphanumeric) {
            return Err(InvalidKeyId);
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(b);
        Ok(KeyId(id))
    }

    /// A new random key id from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, KeyGenError> {
        let mut id = [0u8; KEY_ID_LEN];
        fill_base62(&mut id)?;
        Ok(KeyId(id))
    }

    /// A key id derived from `data` (blake3 in key-derivation mode under `context`): the
    /// same in every process.
    pub(crate) fn derive(context: &str, data: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(context);
        hasher.update(data);
        let mut out = [0u8; 2 * KEY_ID_LEN];
        hasher.finalize_xof().fill(&mut out);
        // Two hash bytes per character: 65536 mod 62 biases some characters by 1 in 1057,
        // which matters nowhere here.
        let mut id = [0u8; KEY_ID_LEN];
        for (c, pair) in id.iter_mut().zip(out.chunks_exact(2)) {
            let n = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
            *c = ALPHABET[n % ALPHABET.len()];
        }
        KeyId(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Invariant: only base62 ASCII bytes are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("????????????")
    }

    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FromStr for KeyId {
    type Err = InvalidKeyId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyId::parse(s)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The operating system's random number generator failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct KeyGenError(String);

/// Fills `out` with uniformly distributed base62 characters (rejection sampling, so no
/// modulo bias).
fn fill_base62(out: &mut [u8]) -> Result<(), KeyGenError> {
    let mut buf = [0u8; 64];
    let mut i = 0;
    while i < out.len() {
        getrandom::fill(&mut buf).map_err(|e| KeyGenError(e.to_string()))?;
        for &byte in &buf {
            // 248 = 4 * 62: bytes at or above it would bias the distribution.
            if byte < 248 {
                out[i] = ALPHABET[(byte % 62) as usize];
                i += 1;
                if i == out.len() {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn checksum(head: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(head);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// A plaintext API key. It exists once, when a key is issued or rotated; hand it to the
/// caller and drop it.
///
/// `Debug` and `Display` show only the prefix and key id ([`ApiKey::redacted`]); the secret
/// is reachable only through [`ApiKey::expose_secret`].
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    id: KeyId,
    prefix: Prefix,
}

impl ApiKey {
    /// Generates a new key with `prefix` from the operating system's CSPRNG.
    pub fn generate(prefix: &Prefix) -> Result<Self, KeyGenError> {
        let mut text = String::with_capacity(prefix.as_str().len() + 1 + BODY_LEN);
        text.push_str(prefix.as_str());
        text.push('_');
        let mut body = [0u8; KEY_ID_LEN + SECRET_LEN];
        fill_base62(&mut body)?;
        // Infallible: base62 bytes are ASCII.
        text.push_str(std::str::from_utf8(&body).unwrap_or_default());
        let sum = checksum(text.as_bytes());
        text.push_str(std::str::from_utf8(&sum).unwrap_or_default());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&body[..KEY_ID_LEN]);
        Ok(ApiKey {
            text,
            id: KeyId(id),
            prefix: prefix.clone(),
        })
    }

    /// The public key id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The whole key, secret included. Show it to its owner once; never log it.
    pub fn expose_secret(&self) -> &str {
        &self.text
    }

    /// The display form for humans and logs: `kg_3hG7xQ2mPa9Z…`.
    pub fn redacted(&self) -> String {
        format!("{}_{}…", self.prefix, self.id)
    }

    /// Parses this key's parts (always succeeds for a generated key).
    pub fn parsed(&self) -> ParsedKey<'_> {
        let start = self.prefix.as_str().len() + 1;
        ParsedKey {
            prefix: self.prefix.as_str(),
            id: self.id,
            secret: &self.text[start + KEY_ID_LEN..start + KEY_ID_LEN + SECRET_LEN],
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}_{}…)", self.prefix, self.id)
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}…", self.prefix, self.id)
    }
}

/// A presented key split into its parts, borrowing from the presented text.
///
/// `Debug` never shows the secret.
#[derive(Clone, Copy)]
pub struct ParsedKey<'a> {
    prefix: &'a str,
    id: KeyId,
    secret: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// The prefix as presented (one the parser accepts).
    pub fn prefix(&self) -> &'a str {
        self.prefix
    }
    /// The public key id.
    pub fn id(&self) -> KeyId {
        self.id
    }
    /// The secret part. Feed it to a [`KeyHasher`](crate::KeyHasher); never log it.
    pub fn secret(&self) -> &'a str {
        self.secret
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParsedKey({}_{}…)", self.prefix, self.id)
    }
}

/// Parses presented credentials against the prefixes a service accepts.
#[derive(Clone, Debug)]
pub struct KeyParser {
    prefixes: Vec<Prefix>,
}

impl Default for KeyParser {
    /// Accepts the `kg` prefix.
    fn default() -> Self {
        KeyParser {
            prefixes: vec![Prefix::default()],
        }
    }
}

impl KeyParser {
    /// A parser accepting exactly these prefixes (an empty list accepts none).
    pub fn new(prefixes: impl IntoIterator<Item = Prefix>) -> Self {
        let mut prefixes: Vec<Prefix> = prefixes.into_iter().collect();
        prefixes.sort();
        prefixes.dedup();
        KeyParser { prefixes }
    }

    /// The accepted prefixes.
    pub fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }

    /// Splits `presented` into prefix, key id and secret, checking length, alphabet and
    /// checksum. Does no lookup and no allocation.
    pub fn parse<'a>(&self, presented: &'a str) -> Result<ParsedKey<'a>, KeyParseError> {
        if presented.is_empty() {
            return Err(KeyParseError::Empty);
        }
        if presented.len() > MAX_KEY_LEN {
            return Err(KeyParseError::TooLong);
        }
        // Fast path for the usual shape, `_` then 40 base62 characters at the end: then that
        // `_` is the last one, so the split below is the one `rsplit_once` would make, and
        // the length and alphabet checks are already passed. Anything else takes the
        // general path, which reports the first failing check.
        let (prefix, body, well_shaped) = match split_well_shaped(presented) {
            Some((prefix, body)) => (prefix, body, true),
            None => {
                let (prefix, body) = presented
                    .rsplit_once('_')
                    .ok_or(KeyParseError::MissingSeparator)?;
                (prefix, body, false)
            }
        };
        if !self.prefixes.iter().any(|p| p.as_str() == prefix) {
            return Err(KeyParseError::UnknownPrefix);
        }
        let b = body.as_bytes();
        if !well_shaped {
            if b.len() != BODY_LEN {
                return Err(KeyParseError::BadLength);
            }
            if !all_base62(b) {
                return Err(KeyParseError::BadCharacter);
            }
        }
        let head_len = presented.len() - CHECKSUM_LEN;
        let expected = checksum(&presented.as_bytes()[..head_len]);
        if expected != b[KEY_ID_LEN + SECRET_LEN..] {
            return Err(KeyParseError::BadChecksum);
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&b[..KEY_ID_LEN]);
        Ok(ParsedKey {
            prefix,
            id: KeyId(id),
            secret: &body[KEY_ID_LEN..KEY_ID_LEN + SECRET_LEN],
        })
    }
}

/// Splits `presented` into prefix and body when it ends in `_` and [`BODY_LEN`] base62
/// characters; `None` otherwise.
fn split_well_shaped(presented: &str) -> Option<(&str, &str)> {
    let sep = presented.len().checked_sub(BODY_LEN + 1)?;
    let b = presented.as_bytes();
    if b[sep] != b'_' || !all_base62(&b[sep + 1..]) {
        return None;
    }
    // `sep` is an ASCII byte, so both sides are on character boundaries.
    Some((presented.get(..sep)?, presented.get(sep + 1..)?))
}

/// Whether every byte is in `[0-9A-Za-z]`. Checks all bytes without an early exit, which
/// lets the compiler vectorize it.
fn all_base62(b: &[u8]) -> bool {
    b.iter().fold(true, |ok, &c| {
        // Digits, or (after folding case) letters; wrapping subtraction turns each range
        // test into one comparison.
        let digit = c.wrapping_sub(b'0') < 10;
        let letter = (c | 0x20).wrapping_sub(b'a') < 26;
        ok & (digit | letter)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_are_distinct() {
        let p = Prefix::default();
        let parser = KeyParser::default();
        let a = ApiKey::generate(&p).unwrap();
        let b = ApiKey::generate(&p).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        let parsed = parser.parse(a.expose_secret()).unwrap();
        assert_eq!(parsed.id(), a.id());
        assert_eq!(parsed.prefix(), "kg");
        assert_eq!(parsed.secret().len(), SECRET_LEN);
        assert_eq!(a.expose_secret().len(), 3 + BODY_LEN);
    }

    #[test]
    fn prefixes_with_underscores_work() {
        let p = Prefix::new("sk_live").unwrap();
        let parser = KeyParser::new([p.clone()]);
        let k = ApiKey::generate(&p).unwrap();
        assert_eq!(parser.parse(k.expose_secret()).unwrap().prefix(), "sk_live");
        assert_eq!(
            KeyParser::default().parse(k.expose_secret()).unwrap_err(),
            KeyParseError::UnknownPrefix
        );
    }

    #[test]
    fn prefix_validation() {
        for ok in ["kg", "sk_live", "a1", "x"] {
            assert!(Prefix::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Kg",
            "1kg",
            "kg_",
            "sk__live",
            "kg-live",
            "kg live",
            "_kg",
            "ké",
            "abcdefghijklmnopqrstuvwxyzabcdefg",
        ] {
            assert!(Prefix::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_malformation_has_its_error() {
        let parser = KeyParser::default();
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        let s = k.expose_secret();
        assert_eq!(parser.parse("").unwrap_err(), KeyParseError::Empty);
        assert_eq!(
            parser.parse(&"a".repeat(MAX_KEY_LEN + 1)).unwrap_err(),
            KeyParseError::TooLong
        );
        assert_eq!(
            parser.parse("kgnounderscore").unwrap_err(),
            KeyParseError::MissingSeparator
        );
        assert_eq!(
            parser.parse(&s.replacen("kg_", "zz_", 1)).unwrap_err(),
            KeyParseError::UnknownPrefix
        );
        assert_eq!(
            parser.parse(&s[..s.len() - 1]).unwrap_err(),
            KeyParseError::BadLength
        );
        let mut bad_char = s.to_string();
        bad_char.replace_range(10..11, "-");
        assert_eq!(
            parser.parse(&bad_char).unwrap_err(),
            KeyParseError::BadCharacter
        );
        // Change one secret character: the checksum catches it.
        let mut typo = s.as_bytes().to_vec();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(parser.parse(&typo).unwrap_err(), KeyParseError::BadChecksum);
    }

    /// The parser as first written (one general path), to check the fast path against.
    fn reference_parse<'a>(
        parser: &KeyParser,
        presented: &'a str,
    ) -> Result<(&'a str, KeyId, &'a str), KeyParseError> {
        if presented.is_empty() {
            return Err(KeyParseError::Empty);
        }
        if presented.len() > MAX_KEY_LEN {
            return Err(KeyParseError::TooLong);
        }
        let (prefix, body) = presented
            .rsplit_once('_')
            .ok_or(KeyParseError::MissingSeparator)?;
        if !parser.prefixes.iter().any(|p| p.as_str() == prefix) {
            return Err(KeyParseError::UnknownPrefix);
        }
        let b = body.as_bytes();
        if b.len() != BODY_LEN {
            return Err(KeyParseError::BadLength);
        }
        if !b.iter().all(u8::is_ascii_alphanumeric) {
            return Err(KeyParseError::BadCharacter);
        }
        let expected = checksum(&presented.as_bytes()[..presented.len() - CHECKSUM_LEN]);
        if expected != b[KEY_ID_LEN + SECRET_LEN..] {
            return Err(KeyParseError::BadChecksum);
        }
        let id = KeyId::parse(&body[..KEY_ID_LEN]).unwrap();
        Ok((prefix, id, &body[KEY_ID_LEN..KEY_ID_LEN + SECRET_LEN]))
    }

    #[test]
    fn parse_agrees_with_the_reference_on_every_mutation() {
        let kg = Prefix::default();
        let live = Prefix::new("sk_live").unwrap();
        let parser = KeyParser::new([kg.clone(), live.clone()]);
        let mut inputs: Vec<String> = vec![
            String::new(),
            "_".into(),
            "kg_".into(),
            "a".repeat(MAX_KEY_LEN),
            "a".repeat(MAX_KEY_LEN + 1),
            format!("_{}", "a".repeat(BODY_LEN)),
            format!("kg__{}", "a".repeat(BODY_LEN - 1)),
        ];
        for prefix in [&kg, &live] {
            let key = ApiKey::generate(prefix).unwrap();
            let text = key.expose_secret().to_string();
            inputs.push(text.clone());
            inputs.push(format!("x{text}"));
            inputs.push(format!("{text}x"));
            inputs.push(text[1..].to_string());
            inputs.push(text[..text.len() - 1].to_string());
            for i in 0..text.len() {
                for replacement in ["_", "-", "a", "Z", "0", " ", "é", "\u{0}"] {
                    let mut m = text.clone();
                    m.replace_range(i..i + 1, replacement);
                    inputs.push(m);
                }
                let mut cut = text.clone();
                cut.remove(i);
                inputs.push(cut);
            }
        }
        for input in &inputs {
            let fast = parser
                .parse(input)
                .map(|p| (p.prefix(), p.id(), p.secret()));
            assert_eq!(fast, reference_parse(&parser, input), "{input:?}");
        }
        assert!(inputs.iter().filter(|i| parser.parse(i).is_ok()).count() >= 2);
    }

    #[test]
    fn base62_check_matches_ascii_alphanumeric() {
        for c in 0..=255u8 {
            assert_eq!(all_base62(&[c]), c.is_ascii_alphanumeric(), "{c}");
        }
    }

    #[test]
    fn debug_and_display_hide_the_secret() {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        let secret = k.parsed().secret().to_string();
        for shown in [
            format!("{k:?}"),
            format!("{k}"),
            k.redacted(),
            format!("{:?}", k.parsed()),
        ] {
            assert!(!shown.contains(&secret), "{shown}");
            assert!(shown.contains(k.id().as_str()));
        }
    }

    #[test]
    fn key_id_parse_and_serde() {
        let id = KeyId::generate().unwrap();
        assert_eq!(KeyId::parse(id.as_str()).unwrap(), id);
        assert!(KeyId::parse("short").is_err());
        assert!(KeyId::parse("abcdefghijk!").is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }

    #[test]
    fn secrets_use_the_whole_alphabet() {
        // A sanity check on the sampler: over many keys every base62 character shows up.
        let mut seen = [false; 128];
        for _ in 0..200 {
            let k = ApiKey::generate(&Prefix::default()).unwrap();
            for c in k.parsed().secret().bytes() {
                seen[c as usize] = true;
            }
        }
        assert!(ALPHABET.iter().all(|&c| seen[c as usize]));
    }
}
