//! The storage form of a key: a domain-separated blake3 digest, compared in constant time.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::key::{KeyId, ParsedKey, KEY_ID_LEN, MAX_PREFIX_LEN, SECRET_LEN};

/// The blake3 key-derivation context; changing it invalidates every stored digest.
const CONTEXT: &str = "keygate 2026-11 api key digest v1";

/// The blake3 context of pepper fingerprints (a domain of its own: a fingerprint is never
/// a key digest).
const FINGERPRINT_CONTEXT: &str = "keygate 2026-12 pepper fingerprint v1";

/// The fingerprint of "no pepper" (an empty pepper is no pepper).
pub const NO_PEPPER_FINGERPRINT: &str = "none";

/// The environment variable holding the pepper itself.
pub const PEPPER_ENV: &str = "KEYGATE_PEPPER";

/// The environment variable naming a file that holds the pepper.
pub const PEPPER_FILE_ENV: &str = "KEYGATE_PEPPER_FILE";

/// The largest pepper file read, in bytes.
pub const MAX_PEPPER_FILE_LEN: u64 = 4096;

/// The longest message hashed in one shot: length byte, longest prefix, key id, secret.
const DIGEST_INPUT_MAX: usize = 1 + MAX_PREFIX_LEN + KEY_ID_LEN + SECRET_LEN;

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

    /// A fingerprint of the pepper, safe to store beside the keys: [`NO_PEPPER_FINGERPRINT`]
    /// (`none`) without a pepper, else `blake3:` and 64 hex digits of a blake3 hash keyed by
    /// the pepper-derived key in a domain of its own. It tells whether two processes use
    /// the same pepper; it never yields the pepper, though anyone holding it can test
    /// guesses of a guessable one (use a random pepper: 32 random bytes).
    pub fn pepper_fingerprint(&self) -> String {
        let none = blake3::derive_key(CONTEXT, b"");
        if bool::from(self.key.ct_eq(&none)) {
            return NO_PEPPER_FINGERPRINT.to_owned();
        }
        let tag = blake3::keyed_hash(&self.key, FINGERPRINT_CONTEXT.as_bytes());
        format!("blake3:{}", KeyDigest(*tag.as_bytes()).to_hex())
    }

    /// The hasher the environment configures: the pepper from `KEYGATE_PEPPER`, or from the
    /// file named by `KEYGATE_PEPPER_FILE`, or none (see [`KeyHasher::from_pepper_source`]).
    pub fn from_env() -> Result<KeyHasher, PepperError> {
        Self::from_pepper_source(
            std::env::var_os(PEPPER_ENV).as_deref(),
            std::env::var_os(PEPPER_FILE_ENV)
                .as_deref()
                .map(std::path::Path::new),
        )
    }

    /// The hasher for a pepper given as text (`pepper`) or as a file (`file`): at most one
    /// of them (an empty value counts as unset; neither: no pepper). The file must not be
    /// readable, writable or executable by others (unix mode `o=`, as `chmod 600` leaves
    /// it), and holds the pepper as it is, at most 4096 bytes; one trailing newline (`\n`
    /// or `\r\n`) is dropped; an empty one is refused. Errors never contain the pepper.
    pub fn from_pepper_source(
        pepper: Option<&std::ffi::OsStr>,
        file: Option<&std::path::Path>,
    ) -> Result<KeyHasher, PepperError> {
        let pepper = pepper.filter(|p| !p.is_empty());
        let file = file.filter(|f| !f.as_os_str().is_empty());
        match (pepper, file) {
            (Some(_), Some(_)) => Err(PepperError::Both),
            (Some(p), None) => Ok(KeyHasher::with_pepper(p.as_encoded_bytes())),
            (None, None) => Ok(KeyHasher::new()),
            (None, Some(path)) => {
                let bytes = read_pepper_file(path)?;
                Ok(KeyHasher::with_pepper(&bytes))
            }
        }
    }

    /// The digest of a parsed key.
    pub fn digest(&self, key: &ParsedKey<'_>) -> KeyDigest {
        self.digest_parts(key.prefix(), &key.id(), key.secret())
    }

    /// The digest of a key given as its parts.
    pub fn digest_parts(&self, prefix: &str, id: &KeyId, secret: &str) -> KeyDigest {
        // The hashed message: the prefix length as one byte (so no two inputs collide),
        // the prefix, the key id and the secret.
        let (p, i, s) = (prefix.as_bytes(), id.as_bytes(), secret.as_bytes());
        let len = 1 + p.len() + i.len() + s.len();
        let mut buf = [0u8; DIGEST_INPUT_MAX];
        if len <= buf.len() {
            // Hot path (every key of this format fits): one-shot hashing of a stack buffer.
            // `blake3::Hasher` is about 2 KB and its incremental API costs several times
            // the single compression a key needs.
            buf[0] = p.len() as u8;
            buf[1..1 + p.len()].copy_from_slice(p);
            buf[1 + p.len()..1 + p.len() + i.len()].copy_from_slice(i);
            buf[1 + p.len() + i.len()..len].copy_from_slice(s);
            return KeyDigest(*blake3::keyed_hash(&self.key, &buf[..len]).as_bytes());
        }
        // Same message, streamed (only for parts longer than any key has).
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[p.len() as u8]);
        h.update(p);
        h.update(i);
        h.update(s);
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

/// Why a pepper could not be loaded ([`KeyHasher::from_env`]). Messages name the file,
/// never its content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PepperError {
    /// Both `KEYGATE_PEPPER` and `KEYGATE_PEPPER_FILE` are set.
    #[error("set {PEPPER_ENV} or {PEPPER_FILE_ENV}, not both")]
    Both,
    /// The pepper file is readable (or writable) by others.
    #[error(
        "the pepper file {path} is accessible to other users (mode {mode:04o}): make it          owner-only (chmod 600) and use a new pepper if others may have read it"
    )]
    Exposed {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The pepper file could not be read, is empty, too long or not a file.
    #[error("the pepper file {path}: {why}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Reads a pepper file under the rules of [`KeyHasher::from_pepper_source`].
fn read_pepper_file(path: &std::path::Path) -> Result<Vec<u8>, PepperError> {
    use std::io::Read;
    let bad = |why: String| PepperError::File {
        path: path.to_path_buf(),
        why,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot read its metadata: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(PepperError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_PEPPER_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > MAX_PEPPER_FILE_LEN {
        return Err(bad(format!(
            "longer than {MAX_PEPPER_FILE_LEN} bytes (a pepper file holds one secret)"
        )));
    }
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        return Err(bad("empty (no pepper: unset the variable instead)".into()));
    }
    Ok(bytes)
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
        // `subtle`'s comparison on four 64-bit words rather than 32 bytes: the same
        // guarantee (no data-dependent branch), an eighth of the work.
        words(&self.0).ct_eq(&words(&other.0)).into()
    }
}

fn words(bytes: &[u8; 32]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (w, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    out
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

    /// The message as first defined: streamed, part by part.
    fn streamed(hasher: &KeyHasher, prefix: &str, id: &[u8], secret: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&hasher.key);
        h.update(&[prefix.len() as u8]);
        h.update(prefix.as_bytes());
        h.update(id);
        h.update(secret.as_bytes());
        *h.finalize().as_bytes()
    }

    #[test]
    fn stored_digests_stay_valid() {
        // Known answers computed with the original, streamed implementation: a change here
        // would invalidate every digest already in a store.
        let id = KeyId::parse("0123456789ab").unwrap();
        let secret = "ABCDEFGHIJKLMNOPQRSTUV";
        assert_eq!(
            KeyHasher::new().digest_parts("kg", &id, secret).to_hex(),
            "0fc17f5d358b0eaabda33229700a127422e4705afec2cb9130d67467ffc8ef24"
        );
        assert_eq!(
            KeyHasher::with_pepper(b"pepper")
                .digest_parts("sk_live", &id, secret)
                .to_hex(),
            "17b4562de0c6650558eb149b8d6de12dabcd78a71d2055f29268e1b93b73bfde"
        );
    }

    #[test]
    fn one_shot_digest_equals_the_streamed_definition() {
        let h = KeyHasher::with_pepper(b"p");
        let id = KeyId::generate().unwrap();
        let longest = "a".repeat(MAX_PREFIX_LEN);
        let too_long = "b".repeat(MAX_PREFIX_LEN + 1);
        for prefix in [
            "",
            "k",
            "kg",
            "sk_live",
            longest.as_str(),
            too_long.as_str(),
        ] {
            for secret in [
                "",
                "x",
                "ABCDEFGHIJKLMNOPQRSTUV",
                &"s".repeat(SECRET_LEN + 9),
            ] {
                assert_eq!(
                    h.digest_parts(prefix, &id, secret).as_bytes(),
                    &streamed(&h, prefix, id.as_bytes(), secret),
                    "{prefix:?} {secret:?}"
                );
            }
        }
    }

    #[test]
    fn ct_eq_sees_every_byte() {
        let d = KeyDigest::from_bytes([7; 32]);
        assert!(d.ct_eq(&KeyDigest::from_bytes([7; 32])));
        for i in 0..32 {
            for bit in 0..8 {
                let mut other = [7u8; 32];
                other[i] ^= 1 << bit;
                assert!(
                    !d.ct_eq(&KeyDigest::from_bytes(other)),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn pepper_fingerprints() {
        assert_eq!(KeyHasher::new().pepper_fingerprint(), "none");
        assert_eq!(KeyHasher::with_pepper(b"").pepper_fingerprint(), "none");
        let a = KeyHasher::with_pepper(b"pepper").pepper_fingerprint();
        let typo = KeyHasher::with_pepper(b"peper").pepper_fingerprint();
        assert!(a.starts_with("blake3:") && a.len() == 7 + 64, "{a}");
        assert_ne!(a, typo);
        assert_eq!(a, KeyHasher::with_pepper(b"pepper").pepper_fingerprint());
        // Known answer: a change here would make every stored fingerprint refuse its pepper.
        assert_eq!(
            a,
            format!(
                "blake3:{}",
                KeyDigest(
                    *blake3::keyed_hash(
                        &blake3::derive_key(CONTEXT, b"pepper"),
                        FINGERPRINT_CONTEXT.as_bytes()
                    )
                    .as_bytes()
                )
                .to_hex()
            )
        );
        // Not the digest key, not a hash of the pepper in the open.
        assert!(!a.contains(&KeyDigest(blake3::derive_key(CONTEXT, b"pepper")).to_hex()));
        assert!(!a.contains(&blake3::hash(b"pepper").to_hex().to_string()));
    }

    #[test]
    fn pepper_sources() {
        use std::ffi::OsStr;
        let dir = std::env::temp_dir().join(format!(
            "keygate-pepper-{}",
            crate::KeyId::generate().unwrap()
        ));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("pepper");
        let fp = |h: Result<KeyHasher, PepperError>| h.unwrap().pepper_fingerprint();
        let from_text = fp(KeyHasher::from_pepper_source(
            Some(OsStr::new("s3cret")),
            None,
        ));
        assert_eq!(
            from_text,
            KeyHasher::with_pepper(b"s3cret").pepper_fingerprint()
        );
        assert_eq!(
            fp(KeyHasher::from_pepper_source(Some(OsStr::new("")), None)),
            "none"
        );
        assert_eq!(fp(KeyHasher::from_pepper_source(None, None)), "none");
        std::fs::write(&file, b"s3cret\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for mode in [0o644, 0o604, 0o602, 0o601] {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
                let e = KeyHasher::from_pepper_source(None, Some(&file)).unwrap_err();
                assert!(matches!(e, PepperError::Exposed { .. }), "{mode:o}");
                let text = e.to_string();
                assert!(
                    text.contains("chmod 600") && !text.contains("s3cret"),
                    "{text}"
                );
            }
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        // The trailing newline is not part of the pepper.
        assert_eq!(
            fp(KeyHasher::from_pepper_source(None, Some(&file))),
            from_text
        );
        std::fs::write(&file, b"s3cret\r\n").unwrap();
        assert_eq!(
            fp(KeyHasher::from_pepper_source(None, Some(&file))),
            from_text
        );
        assert!(matches!(
            KeyHasher::from_pepper_source(Some(OsStr::new("x")), Some(&file)),
            Err(PepperError::Both)
        ));
        for (content, why) in [(&b"\n"[..], "empty"), (&[b'x'; 5000][..], "longer than")] {
            std::fs::write(&file, content).unwrap();
            let e = KeyHasher::from_pepper_source(None, Some(&file))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
        let e = KeyHasher::from_pepper_source(None, Some(&dir.join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
