//! The storage form of a key: a domain-separated blake3 digest, compared in constant time.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::key::{KeyId, ParsedKey};

/// The blake3 key-derivation context; changing it invalidates every stored digest.
const CONTEXT: &str = "keygate 2026-11 api key digest v1";

/// Computes key digests. Built once (it derives its hashing key from the optional pepper)
/// and shared.
///
/// The digest covers the prefix, the key id and the secret, keyed by
/// `blake3::derive_key(CONTEXT, pepper)`. With a pepper (a server-side secret kept out of
/// the database), a stolen database alone does not let anyone test guesses offline.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl KeyHasher {
    /// A hasher without a pepper.
    pub fn new() -> Self {
        Self::with_pepper(b"")
    }

    /// A hasher with a server-side pepper. Every process verifying the same keys must use
    /// the same pepper.
    pub fn with_pepper(pepper: &[u8]) -> Self {
        KeyHasher {
            key: blake3::derive_key(CONTEXT, pepper),
        }
    }

    /// The digest of a parsed key.
    pub fn digest(&self, key: &ParsedKey<'_>) -> KeyDigest {
        self.digest_parts(key.prefix(), &key.id(), key.secret())
    }

    /// The digest of a key given as its parts.
    pub fn digest_parts(&self, prefix: &str, id: &KeyId, secret: &str) -> KeyDigest {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        // Length-prefix the variable-length part so no two inputs collide.
        h.update(&[prefix.len() as u8]);
        h.update(prefix.as_bytes());
        h.update(id.as_bytes());
        h.update(secret.as_bytes());
        KeyDigest(*h.finalize().as_bytes())
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

/// A 32-byte key digest. Compared in constant time; `Debug` shows nothing of it.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

/// Why bytes or text are not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key digest: expected 32 bytes (64 hex characters)")]
pub struct InvalidDigest;

impl KeyDigest {
    /// Wraps 32 raw bytes (as read from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// Reads a digest from a slice, which must be 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, InvalidDigest> {
        <[u8; 32]>::try_from(bytes)
            .map(KeyDigest)
            .map_err(|_| InvalidDigest)
    }

    /// Reads a digest from 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, InvalidDigest> {
        let mut out = [0u8; 32];
        let b = hex.as_bytes();
        if b.len() != 64 {
            return Err(InvalidDigest);
        }
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).ok_or(InvalidDigest)?;
            let lo = (pair[1] as char).to_digit(16).ok_or(InvalidDigest)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(KeyDigest(out))
    }

    /// The raw bytes, for stores.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, for stores that keep text.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{ApiKey, Prefix};

    #[test]
    fn digest_depends_on_secret_id_prefix_and_pepper() {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        let p = k.parsed();
        let h = KeyHasher::new();
        let d = h.digest(&p);
        assert!(d.ct_eq(&h.digest(&p)));
        assert!(!d.ct_eq(&KeyHasher::with_pepper(b"pepper").digest(&p)));
        assert!(!d.ct_eq(&h.digest_parts("sk", &p.id(), p.secret())));
        let mut other = p.secret().to_string();
        other.replace_range(0..1, if other.starts_with('a') { "b" } else { "a" });
        assert!(!d.ct_eq(&h.digest_parts("kg", &p.id(), &other)));
    }

    #[test]
    fn hex_round_trip_and_debug_redacts() {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        let d = KeyHasher::new().digest(&k.parsed());
        let back = KeyDigest::from_hex(&d.to_hex()).unwrap();
        assert!(back.ct_eq(&d));
        assert!(KeyDigest::from_hex("zz").is_err());
        assert!(KeyDigest::from_slice(&[0; 31]).is_err());
        assert_eq!(format!("{d:?}"), "KeyDigest(<redacted>)");
        assert!(!format!("{:?}", KeyHasher::new()).contains('['));
    }
}
