//! The signing key set of short-lived tokens: Ed25519 keys, loaded from PEM or JWK, the
//! newest signing and every one verifying.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The environment variable holding the token signing keys themselves (PEM or JWK).
pub const TOKEN_KEYS_ENV: &str = "KEYGATE_TOKEN_KEYS";
/// The environment variable naming a file that holds the token signing keys (what Vault or
/// a cloud secret manager writes).
pub const TOKEN_KEYS_FILE_ENV: &str = "KEYGATE_TOKEN_KEYS_FILE";
/// The largest signing key file read.
const MAX_KEYS_LEN: u64 = 64 * 1024;

/// The DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410), followed by the 32-byte
/// seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a signing key set could not be loaded. Never holds key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// Both the variable and its `_FILE` form are set.
    #[error("set {TOKEN_KEYS_ENV} or {TOKEN_KEYS_FILE_ENV}, not both")]
    Both,
    /// The key file could not be read.
    #[error("cannot read the token signing keys from {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The key file may be read by other users.
    #[error(
        "the token signing key file {path} is accessible to other users (mode {mode:04o}): make it owner-only (chmod 600) and replace the keys if others may have read them"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The text holds no key, or a key that is not an Ed25519 private key.
    #[error("token signing keys: {0}")]
    Invalid(String),
}

/// One Ed25519 key of the set.
struct SigningKey {
    kid: String,
    /// The public key, base64url (the JWK `x`).
    x: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The keys tokens are signed and verified with: Ed25519 (`EdDSA`), each named by a `kid`.
/// The **last** key of the set signs new tokens; every key verifies, so a rotation adds the
/// new key at the end, keeps the old one until the longest token it signed has expired
/// (the maximum time to live), then removes it.
///
/// Text forms ([`SigningKeys::parse`]): one or more PEM `PRIVATE KEY` blocks (PKCS#8, what
/// `openssl genpkey -algorithm ed25519` writes), whose `kid` is the key's RFC 7638
/// thumbprint; or a JWK (`{"kty":"OKP","crv":"Ed25519","d":...,"kid":...}`) or a JWK set
/// (`{"keys":[...]}`), whose `kid` is the JWK's own (else the thumbprint).
///
/// Private key material never appears in `Debug`, errors or logs.
#[derive(Clone)]
pub struct SigningKeys {
    keys: std::sync::Arc<[SigningKey]>,
}

impl SigningKeys {
    /// Parses PEM or JWK text (see the type's documentation).
    pub fn parse(text: &str) -> Result<SigningKeys, KeysError> {
        let text = text.trim();
        let keys = if text.starts_with('{') {
            parse_jwk(text)?
        } else {
            parse_pem(text)?
        };
        if keys.is_empty() {
            return Err(KeysError::Invalid("no key found".into()));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.kid == k.kid) {
                return Err(KeysError::Invalid(format!(
                    "two keys have the kid {:?}",
                    k.kid
                )));
            }
        }
        Ok(SigningKeys { keys: keys.into() })
    }

    /// One new random key (from the OS generator): for tests and local use, where tokens
    /// need not outlive the process.
    pub fn generate() -> Result<SigningKeys, KeysError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeysError::Invalid("the system random generator failed".into()))?;
        Ok(SigningKeys {
            keys: vec![from_pkcs8(pkcs8.as_ref(), None)?].into(),
        })
    }

    /// Reads the file at `path` (refused when other users may access it: unix mode
    /// `o=` as `chmod 600` leaves it).
    pub fn from_file(path: &Path) -> Result<SigningKeys, KeysError> {
        let shown = path.display().to_string();
        let read_err = |e: std::io::Error| KeysError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o007 != 0 {
                return Err(KeysError::Exposed { path: shown, mode });
            }
        }
        if meta.len() > MAX_KEYS_LEN {
            return Err(KeysError::Read {
                path: shown,
                reason: format!("larger than {MAX_KEYS_LEN} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        SigningKeys::parse(&text)
    }

    /// The keys named by the environment: [`TOKEN_KEYS_ENV`] (the text) or
    /// [`TOKEN_KEYS_FILE_ENV`] (a file, as [`SigningKeys::from_file`]); `Ok(None)` when
    /// neither is set, an error when both are.
    pub fn from_env() -> Result<Option<SigningKeys>, KeysError> {
        let direct = std::env::var_os(TOKEN_KEYS_ENV).filter(|v| !v.is_empty());
        let file = std::env::var_os(TOKEN_KEYS_FILE_ENV).filter(|v| !v.is_empty());
        match (direct, file) {
            (Some(_), Some(_)) => Err(KeysError::Both),
            (Some(text), None) => {
                let text = text
                    .into_string()
                    .map_err(|_| KeysError::Invalid(format!("{TOKEN_KEYS_ENV} is not UTF-8")))?;
                SigningKeys::parse(&text).map(Some)
            }
            (None, Some(path)) => SigningKeys::from_file(Path::new(&path)).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The `kid` of every key, in order (the last one signs).
    pub fn kids(&self) -> impl Iterator<Item = &str> + '_ {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// The public keys as a JWK set (`{"keys":[...]}`), for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": k.x,
                    "kid": k.kid,
                    "use": "sig",
                    "alg": "EdDSA",
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The key that signs: the last one.
    pub(crate) fn signer(&self) -> Option<(&str, &EncodingKey)> {
        self.keys.last().map(|k| (k.kid.as_str(), &k.encoding))
    }

    /// The verifying key named `kid`.
    pub(crate) fn verifier(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.iter().find(|k| k.kid == kid).map(|k| &k.decoding)
    }
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A key from its PKCS#8 DER, named `kid` (else by its thumbprint).
fn from_pkcs8(der: &[u8], kid: Option<String>) -> Result<SigningKey, KeysError> {
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|_| KeysError::Invalid("a key is not an Ed25519 private key (PKCS#8)".into()))?;
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let decoding = DecodingKey::from_ed_components(&x)
        .map_err(|_| KeysError::Invalid("a public key could not be read back".into()))?;
    let kid = kid.unwrap_or_else(|| thumbprint(&x));
    Ok(SigningKey {
        kid,
        x,
        encoding: EncodingKey::from_ed_der(der),
        decoding,
    })
}

/// The RFC 7638 thumbprint of an Ed25519 public key (base64url SHA-256).
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    let d = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(d.as_ref())
}

fn parse_pem(text: &str) -> Result<Vec<SigningKey>, KeysError> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        if !block.starts_with(BEGIN) {
            return Err(KeysError::Invalid(
                "only PEM \"PRIVATE KEY\" blocks (PKCS#8 Ed25519) are read".into(),
            ));
        }
        let body_start = BEGIN.len();
        let Some(end) = block.find(END) else {
            return Err(KeysError::Invalid("a PEM block has no end line".into()));
        };
        let body: String = block[body_start..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = STANDARD
            .decode(body)
            .map_err(|_| KeysError::Invalid("a PEM block is not base64".into()))?;
        keys.push(from_pkcs8(&der, None)?);
        rest = &block[end + END.len()..];
    }
    if keys.is_empty() {
        return Err(KeysError::Invalid(
            "no PEM \"PRIVATE KEY\" block and no JWK found".into(),
        ));
    }
    Ok(keys)
}

#[derive(serde::Deserialize)]
struct Jwk {
    kty: String,
    crv: Option<String>,
    d: Option<String>,
    x: Option<String>,
    kid: Option<String>,
}

#[derive(serde::Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

fn parse_jwk(text: &str) -> Result<Vec<SigningKey>, KeysError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| KeysError::Invalid(format!("not JSON (line {})", e.line())))?;
    let list = if value.get("keys").is_some() {
        serde_json::from_value::<JwkSet>(value)
            .map_err(|_| KeysError::Invalid("not a JWK set".into()))?
            .keys
    } else {
        vec![serde_json::from_value::<Jwk>(value)
            .map_err(|_| KeysError::Invalid("not a JWK".into()))?]
    };
    list.into_iter()
        .map(|jwk| {
            if jwk.kty != "OKP" || jwk.crv.as_deref() != Some("Ed25519") {
                return Err(KeysError::Invalid(
                    "only Ed25519 keys (kty OKP, crv Ed25519) are read".into(),
                ));
            }
            let d = jwk.d.ok_or_else(|| {
                KeysError::Invalid("a JWK has no private part (d): it cannot sign".into())
            })?;
            let seed = URL_SAFE_NO_PAD
                .decode(d.trim_end_matches('='))
                .ok()
                .filter(|s| s.len() == 32)
                .ok_or_else(|| KeysError::Invalid("a JWK's d is not 32 bytes base64url".into()))?;
            let mut der = PKCS8_ED25519_PREFIX.to_vec();
            der.extend_from_slice(&seed);
            let key = from_pkcs8(&der, jwk.kid)?;
            if jwk.x.is_some_and(|x| x.trim_end_matches('=') != key.x) {
                return Err(KeysError::Invalid(
                    "a JWK's x is not the public half of its d".into(),
                ));
            }
            Ok(key)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_and_jwk_forms_name_and_order_keys() {
        let a = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let b = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pem = |der: &[u8]| {
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                STANDARD.encode(der)
            )
        };
        let keys = SigningKeys::parse(&(pem(a.as_ref()) + &pem(b.as_ref()))).unwrap();
        let kids: Vec<&str> = keys.kids().collect();
        assert_eq!(kids.len(), 2);
        assert_eq!(keys.signer().unwrap().0, kids[1], "the last key signs");
        assert!(!format!("{keys:?}").contains("PRIVATE"));

        // The same key as a JWK with its own kid.
        let seed = &a.as_ref()[16..48];
        let jwk = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","d":"{}","kid":"k1"}}]}}"#,
            URL_SAFE_NO_PAD.encode(seed)
        );
        let from_jwk = SigningKeys::parse(&jwk).unwrap();
        assert_eq!(from_jwk.kids().collect::<Vec<_>>(), ["k1"]);
        assert_eq!(
            from_jwk.jwks()["keys"][0]["x"],
            keys.jwks()["keys"][0]["x"],
            "same public key"
        );
        assert!(from_jwk.jwks().to_string().find("\"d\"").is_none());

        for bad in ["", "{}", "garbage", "-----BEGIN RSA PRIVATE KEY-----\n"] {
            assert!(SigningKeys::parse(bad).is_err(), "{bad:?}");
        }
        // A duplicated kid is refused.
        assert!(SigningKeys::parse(&(pem(a.as_ref()) + &pem(a.as_ref()))).is_err());
    }
}
