//! keygate-core: API keys, key records, principals, the verifier and the store traits.
//!
//! This crate knows nothing about HTTP; the tower layers live in the `keygate` crate.
//!
//! ```
//! use keygate_core::{KeyRecord, MemoryStore, KeyStore, Prefix, Verifier, DenialCode};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let verifier = Verifier::new(store.clone());
//! let (key, record) = KeyRecord::generate(&Prefix::default(), verifier.hasher(), "ci", verifier.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//!
//! let principal = verifier.verify(key.expose_secret()).await.unwrap();
//! assert_eq!(principal.key_id(), key.id());
//! let denial = verifier.verify("kg_nonsense").await.unwrap_err();
//! assert_eq!(denial.code(), DenialCode::MalformedKey);
//! # }
//! ```
#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]

pub mod audit;
mod changes;
mod clock;
mod denial;
mod digest;
mod idhash;
mod key;
mod lifecycle;
mod principal;
pub mod rate;
mod record;
mod redact;
pub mod role;
mod scope;
mod store;
pub mod time;
pub mod usage;
mod verifier;
mod vocabulary;

pub use changes::ChangeHandler;
pub use clock::{Clock, ManualClock, SystemClock};
pub use denial::{Denial, DenialCode};
pub use digest::{
    InvalidDigest, KeyDigest, KeyHasher, PepperError, MAX_PEPPER_FILE_LEN, NO_PEPPER_FINGERPRINT,
    PEPPER_ENV, PEPPER_FILE_ENV,
};
pub use idhash::{KeyIdHashBuilder, KeyIdHasher};
pub use key::{
    ApiKey, InvalidKeyId, InvalidPrefix, KeyGenError, KeyId, KeyParseError, KeyParser, ParsedKey,
    Prefix, BODY_LEN, CHECKSUM_LEN, KEY_ID_LEN, MAX_KEY_LEN, MAX_PREFIX_LEN, SCANNER_REGEX,
    SECRET_LEN,
};
pub use lifecycle::{
    Expiry, IdentityUpdate, InvalidSpec, IssuedKey, KeyManager, KeyManagerBuilder, KeySpec,
    KeyUpdate, LifecycleError, RoleUpdate, MAX_ATTRIBUTE_VALUE_LEN, MAX_METADATA_BYTES,
    MAX_NAME_LEN, MAX_OWNER_LEN,
};
pub use principal::{Attributes, Principal, TokenGrant};
pub use record::{
    InvalidPolicy, InvalidStatus, KeyInfo, KeyRecord, KeyStatus, QuotaPolicy, QuotaWindow,
    RateLimitPolicy, Refill,
};
pub use redact::{redact_url, REDACTED};
pub use role::{validate_name, Grant, Identity, InvalidName, Role};
pub use scope::{validate_resource_pattern, InvalidScope, ResourceSet, Scope, ScopeSet};
pub use store::{
    KeyFilter, KeyListing, KeyStore, MemoryStore, SkippedRow, StatusWrite, StoreError,
};
pub use verifier::{Lookup, PendingLookup, Verifier, VerifierBuilder, VerifierStats};
pub use vocabulary::{KnownScope, ScopeVocabulary, UnknownScope};
