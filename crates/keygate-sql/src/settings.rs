//! `keygate_settings` (migration 3): the pepper fingerprint and the compatibility level.
//!
//! A pepper changes every key digest, so a process with the wrong one (a typo, a missing
//! variable) makes keys no other process accepts, or accepts none of theirs, and nothing
//! says why. [`SqlStore::check_pepper`] compares the process's pepper with the fingerprint
//! recorded by the first process that checked, and records it when there is none.

use keygate_core::{KeyHasher, StoreError, NO_PEPPER_FINGERPRINT};

use crate::error::unavailable;
use crate::store::{Pool, SqlStore};

/// What [`SqlStore::check_pepper`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PepperCheck {
    /// The database had no fingerprint; this pepper's is now recorded.
    Recorded,
    /// The recorded fingerprint is this pepper's.
    Matches,
    /// A read-only store over a database without a fingerprint: nothing to compare,
    /// nothing recorded.
    NotRecorded,
}

/// Why [`SqlStore::check_pepper`] refused. The message says what to do; it never contains
/// the pepper or the fingerprint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PepperCheckError {
    /// The process's pepper is not the one recorded in the database.
    #[error("{}", mismatch(*.recorded_none, *.given_none))]
    Mismatch {
        /// The database's keys were made without a pepper.
        recorded_none: bool,
        /// This process has no pepper.
        given_none: bool,
    },
    /// The database could not be read or written, or holds a damaged fingerprint.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn mismatch(recorded_none: bool, given_none: bool) -> &'static str {
    match (recorded_none, given_none) {
        (true, _) => {
            "this database's keys were made without a pepper, but a pepper was given: \
             unset it (or use a database of its own for peppered keys)"
        }
        (false, true) => {
            "this database's keys were made with a pepper, but none was given: give the \
             same pepper as the server that verifies them"
        }
        (false, false) => {
            "the pepper given is not the one this database's keys were made with (its \
             fingerprint differs): give the same pepper as the server that verifies them"
        }
    }
}

const NAME: &str = "pepper_fingerprint";

impl SqlStore {
    /// Checks `hasher`'s pepper against the fingerprint recorded in the database
    /// ([`KeyHasher::pepper_fingerprint`]; `none` without a pepper), recording it if the
    /// database has none yet (not on a read-only store). Call it at start in every process
    /// that makes or verifies keys (the `keygate` CLI does before creating or rotating a
    /// key, the showcase server before serving), so a pepper typo fails loudly instead of
    /// making keys nobody can use.
    ///
    /// A database whose first keys predate the fingerprint records whichever pepper checks
    /// first: start the server (which has the right one) before using the CLI.
    pub async fn check_pepper(&self, hasher: &KeyHasher) -> Result<PepperCheck, PepperCheckError> {
        let given = hasher.pepper_fingerprint();
        let read_only = self.options().is_read_only();
        let (recorded, stored): (bool, Option<String>) = self
            .timed("check_pepper", async {
                let done: Result<(bool, Option<String>), sqlx::Error> = match &self.inner.pool {
                    Pool::Sqlite(pool) => {
                        async {
                            let recorded = !read_only
                                && sqlx::query(INSERT)
                                    .bind(NAME)
                                    .bind(&given)
                                    .execute(pool)
                                    .await?
                                    .rows_affected()
                                    == 1;
                            let stored = sqlx::query_scalar(SELECT)
                                .bind(NAME)
                                .fetch_optional(pool)
                                .await?;
                            Ok((recorded, stored))
                        }
                        .await
                    }
                    Pool::Postgres(pool) => {
                        async {
                            let recorded = !read_only
                                && sqlx::query(INSERT)
                                    .bind(NAME)
                                    .bind(&given)
                                    .execute(pool)
                                    .await?
                                    .rows_affected()
                                    == 1;
                            let stored = sqlx::query_scalar(SELECT)
                                .bind(NAME)
                                .fetch_optional(pool)
                                .await?;
                            Ok((recorded, stored))
                        }
                        .await
                    }
                };
                done.map_err(|e| unavailable("check_pepper", e))
            })
            .await?;
        match stored {
            None => Ok(PepperCheck::NotRecorded),
            Some(s) if s == given => Ok(if recorded {
                tracing::info!("recorded the pepper fingerprint in the database");
                PepperCheck::Recorded
            } else {
                PepperCheck::Matches
            }),
            Some(s) if s != NO_PEPPER_FINGERPRINT && !is_fingerprint(&s) => {
                Err(PepperCheckError::Store(StoreError::Corrupt(
                    "keygate_settings.pepper_fingerprint is neither `none` nor blake3:<64 hex>"
                        .into(),
                )))
            }
            Some(s) => Err(PepperCheckError::Mismatch {
                recorded_none: s == NO_PEPPER_FINGERPRINT,
                given_none: given == NO_PEPPER_FINGERPRINT,
            }),
        }
    }
}

const INSERT: &str =
    "INSERT INTO keygate_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
const SELECT: &str = "SELECT value FROM keygate_settings WHERE name = $1";

fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("blake3:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
