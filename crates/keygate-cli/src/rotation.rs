//! The rotation policy: which keys are old or about to expire (`keys list --older-than`,
//! `--expiring-within`), and rotating every key past a maximum age in one run
//! (`keys rotate --older-than AGE`), for a cron job or a CI pipeline.
//!
//! The maximum age is the `--older-than` value the job is run with. Each rotation goes
//! through the `KeyManager` exactly as `keys rotate ID` does (validated, audited to the
//! database table and to the file log), and each new key is printed as one JSON line on
//! stdout as soon as it exists, so the output of an interrupted run still names every key
//! that was rotated.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, SystemTime};

use keygate_core::{KeyFilter, KeyId, KeyRecord, KeyStatus, KeyStore};
use serde_json::{json, Value};

use crate::cli::Cli;
use crate::db::{self, Access, Managed};
use crate::keys::{store_failure, SHOWN_ONCE};
use crate::output::print;
use crate::Failure;

/// The time filters of `keys list`: every one given must match.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AgeFilter {
    /// Only keys whose expiry is after now and at most this far from now.
    pub(crate) expiring_within: Option<Duration>,
    /// Only keys created at least this long ago.
    pub(crate) older_than: Option<Duration>,
}

impl AgeFilter {
    /// Whether `record` passes, at `now`.
    pub(crate) fn matches(&self, record: &KeyRecord, now: SystemTime) -> bool {
        self.expiring_within
            .is_none_or(|w| expires_within(record, now, w))
            && self
                .older_than
                .is_none_or(|a| is_older_than(record, now, a))
    }
}

/// Whether `record` expires after `now` and no later than `now + window`. A key that never
/// expires, or has already expired, is not "expiring within".
pub(crate) fn expires_within(record: &KeyRecord, now: SystemTime, window: Duration) -> bool {
    match record.expires_at {
        Some(end) => match end.duration_since(now) {
            Ok(left) => !left.is_zero() && left <= window,
            Err(_) => false,
        },
        None => false,
    }
}

/// Whether `record` was created at least `age` before `now` (a rotated key counts from its
/// own creation, not its lineage's). A creation time after `now` (clock skew) is age zero.
pub(crate) fn is_older_than(record: &KeyRecord, now: SystemTime, age: Duration) -> bool {
    now.duration_since(record.created_at)
        .unwrap_or(Duration::ZERO)
        >= age
}

/// Whether `record` is due for rotation at `now`: active, not expired, not already
/// rotated (no key names it in `rotated_from`: it is in its grace period), and at least
/// `age` old.
pub(crate) fn due(
    record: &KeyRecord,
    now: SystemTime,
    age: Duration,
    rotated: &HashSet<KeyId>,
) -> bool {
    record.status == KeyStatus::Active
        && !record.is_expired_at(now)
        && !rotated.contains(&record.id)
        && is_older_than(record, now, age)
}

/// When the old key stops working if rotated at `now` with `grace`: the end of the grace,
/// or its own expiry if that comes first (as `KeyManager::rotate` sets it).
pub(crate) fn grace_end(record: &KeyRecord, now: SystemTime, grace: Duration) -> SystemTime {
    let end = now.checked_add(grace).unwrap_or(now);
    record.expires_at.map_or(end, |e| e.min(end))
}

fn millis(t: SystemTime) -> String {
    keygate_core::time::rfc3339_millis(t).to_string()
}

/// Writes one JSON line on stdout and flushes it, returning the error (a closed pipe too:
/// the caller must know that a new key was not shown).
fn write_line(v: &Value) -> std::io::Result<()> {
    let mut text = serde_json::to_string(v).map_err(std::io::Error::other)?;
    text.push('\n');
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// `keys rotate --older-than AGE [--grace G] [--dry-run]`.
pub(crate) async fn rotate_due(
    cli: &Cli,
    age: Duration,
    grace: Duration,
    dry_run: bool,
) -> Result<(), Failure> {
    let hasher = db::hasher()?;
    let access = if dry_run { Access::Read } else { Access::Write };
    let store = db::open(cli, access).await?;
    // On a read-only (dry-run) store this only compares: a pepper that would make the real
    // run fail fails the dry run too.
    db::check_pepper(&store, &hasher).await?;
    let listing = store
        .list_report(&KeyFilter::default())
        .await
        .map_err(store_failure)?;
    for row in &listing.skipped {
        crate::warning(&format!(
            "skipped key {}: column {} cannot be read ({}); it was not considered for rotation",
            row.id, row.column, row.reason
        ));
    }
    let now = SystemTime::now();
    let rotated: HashSet<KeyId> = listing
        .records
        .iter()
        .filter_map(|r| r.rotated_from)
        .collect();
    let due: Vec<&KeyRecord> = listing
        .records
        .iter()
        .filter(|r| due(r, now, age, &rotated))
        .collect();

    if dry_run {
        for old in &due {
            let line = json!({
                "old_id": old.id,
                "name": old.name,
                "owner": old.owner,
                "created_at": millis(old.created_at),
                "grace_end": millis(grace_end(old, now, grace)),
            });
            print(&format!("{line}\n"))?;
        }
        return Ok(());
    }
    if due.is_empty() {
        return Ok(());
    }

    let actor = db::actor(cli);
    let managed = Managed::new(cli, &store, hasher)?;
    let mut failed = 0usize;
    let mut warned = false;
    let mut lost: Option<String> = None;
    for old in &due {
        let issued = match managed.keys.rotate(&actor, old.id, grace).await {
            Ok(issued) => issued,
            Err(e) => {
                failed += 1;
                // The error names the key by id; it never holds a plaintext.
                crate::error_line(&format!(
                    "cannot rotate key {} ({}): {}",
                    old.id,
                    old.name,
                    crate::keys::failure(e).message()
                ));
                continue;
            }
        };
        // The old key's end as stored by the rotation (computed the same way if it cannot
        // be read back).
        let end = match store.get(&old.id).await {
            Ok(Some(r)) => r.expires_at,
            _ => None,
        }
        .unwrap_or_else(|| grace_end(old, SystemTime::now(), grace));
        if !warned {
            crate::warning(SHOWN_ONCE);
            warned = true;
        }
        let line = json!({
            "old_id": old.id,
            "new_id": issued.record.id,
            "name": issued.record.name,
            "owner": issued.record.owner,
            "key": issued.key.expose_secret(),
            "grace_end": millis(end),
            "expires_at": issued.record.expires_at.map(millis),
        });
        if let Err(e) = write_line(&line) {
            lost = Some(format!(
                "cannot write the output ({e}): key {} was rotated to {} but the new key could \
                 not be shown; revoke {} and rotate {} again before {} (no further key was \
                 rotated)",
                old.id,
                issued.record.id,
                issued.record.id,
                old.id,
                millis(end)
            ));
            break;
        }
    }
    let audited = managed.finish().await;
    if let Some(message) = lost {
        return Err(Failure::Failed(message));
    }
    if failed > 0 {
        return Err(Failure::Reported(format!(
            "{failed} of {} key(s) due could not be rotated (named above); the others were",
            due.len()
        )));
    }
    audited
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{KeyHasher, Prefix};

    fn record(created: SystemTime, expires: Option<SystemTime>) -> KeyRecord {
        let (_, mut r) =
            KeyRecord::generate(&Prefix::new("kg").unwrap(), &KeyHasher::new(), "k", created)
                .unwrap();
        r.expires_at = expires;
        r
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn expiring_within_boundaries() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let w = 14 * DAY;
        let at = |e: SystemTime| expires_within(&record(now, Some(e)), now, w);
        assert!(at(now + w), "exactly at the end of the window");
        assert!(at(now + Duration::from_millis(1)));
        assert!(!at(now + w + Duration::from_millis(1)));
        assert!(!at(now), "expires now: already expired");
        assert!(!at(now - DAY), "already expired");
        assert!(!expires_within(&record(now, None), now, w), "never expires");
        assert!(!expires_within(
            &record(now, Some(now + DAY)),
            now,
            Duration::ZERO
        ));
    }

    #[test]
    fn older_than_boundaries() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let age = 90 * DAY;
        let created = |c: SystemTime| is_older_than(&record(c, None), now, age);
        assert!(created(now - age), "exactly the age");
        assert!(created(now - age - DAY));
        assert!(!created(now - age + Duration::from_millis(1)));
        assert!(!created(now + DAY), "created in the future");
        assert!(is_older_than(&record(now + DAY, None), now, Duration::ZERO));
        // Both filters together.
        let both = AgeFilter {
            expiring_within: Some(7 * DAY),
            older_than: Some(age),
        };
        assert!(both.matches(&record(now - 100 * DAY, Some(now + DAY)), now));
        assert!(!both.matches(&record(now - 100 * DAY, Some(now + 8 * DAY)), now));
        assert!(!both.matches(&record(now - DAY, Some(now + DAY)), now));
        assert!(AgeFilter::default().matches(&record(now, None), now));
    }

    #[test]
    fn due_for_rotation() {
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let age = 90 * DAY;
        let none = HashSet::new();
        let old = record(now - 100 * DAY, None);
        assert!(due(&old, now, age, &none));
        assert!(!due(&record(now - DAY, None), now, age, &none), "young");
        let mut revoked = old.clone();
        revoked.status = KeyStatus::Revoked;
        assert!(!due(&revoked, now, age, &none));
        let mut disabled = old.clone();
        disabled.status = KeyStatus::Disabled;
        assert!(!due(&disabled, now, age, &none));
        let expired = record(now - 100 * DAY, Some(now - DAY));
        assert!(!due(&expired, now, age, &none));
        let in_grace: HashSet<KeyId> = [old.id].into_iter().collect();
        assert!(!due(&old, now, age, &in_grace), "already rotated");
        // The grace end: the grace, or an earlier expiry.
        assert_eq!(grace_end(&old, now, 7 * DAY), now + 7 * DAY);
        let soon = record(now - 100 * DAY, Some(now + DAY));
        assert_eq!(grace_end(&soon, now, 7 * DAY), now + DAY);
        assert_eq!(grace_end(&old, now, Duration::ZERO), now);
    }
}
