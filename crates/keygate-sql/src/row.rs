//! A key record as a table row, both ways. Reading checks every column and turns anything
//! damaged into [`StoreError::Corrupt`] naming the key and the column; it never panics.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate_core::{
    Grant, KeyDigest, KeyId, KeyRecord, KeyStatus, Prefix, QuotaPolicy, RateLimitPolicy,
    SkippedRow, StoreError,
};
use serde::de::DeserializeOwned;
use sqlx::{ColumnIndex, Decode, Row, Type};

/// How many columns `keygate_keys` has (the values [`KeyRow`] binds).
pub(crate) const COLUMN_COUNT: usize = 21;

/// A record's column values, ready to bind.
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) prefix: String,
    pub(crate) digest: Vec<u8>,
    pub(crate) name: String,
    pub(crate) owner: Option<String>,
    pub(crate) status: &'static str,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) expires_at: Option<i64>,
    pub(crate) scopes: String,
    pub(crate) resources: String,
    pub(crate) attributes: String,
    pub(crate) allowed_ips: String,
    pub(crate) rate_limits: String,
    pub(crate) quotas: String,
    pub(crate) metadata: String,
    pub(crate) rotated_from: Option<String>,
    /// `NULL` when the key is the first of its lineage (as every row from before migration 5).
    pub(crate) lineage: Option<String>,
    pub(crate) grants: String,
    pub(crate) roles: String,
    pub(crate) identity: Option<String>,
}

impl KeyRow {
    /// The row for `record`.
    pub(crate) fn from_record(r: &KeyRecord) -> Result<Self, StoreError> {
        let json = |column: &str, v: Result<String, serde_json::Error>| {
            v.map_err(|e| {
                StoreError::Corrupt(format!(
                    "key {}: column {column} cannot be encoded: {e}",
                    r.id
                ))
            })
        };
        let time = |column: &str, t: SystemTime| {
            if keygate_core::time::in_stored_range(t) {
                Ok(to_ms(t))
            } else {
                Err(StoreError::Corrupt(format!(
                    "key {}: column {column} cannot be stored: {} is outside \
                     0000-01-01T00:00:00Z..9999-12-31T23:59:59.999Z",
                    r.id,
                    keygate_core::time::rfc3339_millis(t)
                )))
            }
        };
        Ok(KeyRow {
            id: r.id.as_str().to_owned(),
            prefix: r.prefix.as_str().to_owned(),
            digest: r.digest.as_bytes().to_vec(),
            name: r.name.clone(),
            owner: r.owner.clone(),
            status: r.status.as_str(),
            created_at: time("created_at", r.created_at)?,
            updated_at: time("updated_at", r.updated_at)?,
            expires_at: r.expires_at.map(|t| time("expires_at", t)).transpose()?,
            scopes: json("scopes", serde_json::to_string(&r.scopes))?,
            resources: json("resources", serde_json::to_string(&r.resources))?,
            attributes: json("attributes", serde_json::to_string(&r.attributes))?,
            allowed_ips: json("allowed_ips", serde_json::to_string(&r.allowed_ips))?,
            rate_limits: json("rate_limits", serde_json::to_string(&r.rate_limits))?,
            quotas: json("quotas", serde_json::to_string(&r.quotas))?,
            metadata: json("metadata", serde_json::to_string(&r.metadata))?,
            rotated_from: r.rotated_from.map(|id| id.as_str().to_owned()),
            lineage: r.lineage.map(|id| id.as_str().to_owned()),
            grants: json("grants", serde_json::to_string(&r.grants))?,
            roles: json("roles", serde_json::to_string(&r.roles))?,
            identity: r.identity.clone(),
        })
    }
}

/// A time as milliseconds since the Unix epoch, saturating at the ends of `i64` (about
/// 292 million years either way).
pub(crate) fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Milliseconds since the Unix epoch as a time, if representable.
pub(crate) fn from_ms(ms: i64) -> Option<SystemTime> {
    if ms >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(ms.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(ms.unsigned_abs()))
    }
}

/// What a key row's time column must hold: milliseconds from year 0 to the end of 9999
/// (`keygate_core::time::{MIN_UNIX_MS, MAX_UNIX_MS}`, RFC 3339's range); anything else is
/// a damaged row, reported rather than read.
fn stored_time(ms: i64) -> Option<SystemTime> {
    keygate_core::time::from_unix_ms(ms)
}

const OUT_OF_RANGE: &str = "out of range (not a time from year 0 to 9999)";

/// A stored text shown in an error: at most 32 characters, escaped.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(32).collect();
    format!("{cut:?}")
}

/// A row that could not be read: which key (as far as known) and which column.
#[derive(Debug, Clone)]
pub(crate) struct BadRow {
    /// The key id, when the id column itself is readable.
    pub(crate) key_id: Option<KeyId>,
    /// The id as stored, cut and escaped (for rows whose id is not a key id).
    pub(crate) shown_id: String,
    /// The first column that could not be read.
    pub(crate) column: &'static str,
    /// Why, in a few words (never a stored secret or digest).
    pub(crate) why: String,
}

impl BadRow {
    /// As the store error [`decode`] returns.
    pub(crate) fn into_error(self) -> StoreError {
        StoreError::Corrupt(match self.key_id {
            Some(id) => format!("key {id}: column {}: {}", self.column, self.why),
            None => format!(
                "key row {}: column {}: {}",
                self.shown_id, self.column, self.why
            ),
        })
    }

    /// As the skipped-row report of a listing.
    pub(crate) fn into_skipped(self) -> SkippedRow {
        SkippedRow {
            key_id: self.key_id,
            id: self.key_id.map_or(self.shown_id, |id| id.to_string()),
            column: self.column.to_owned(),
            reason: self.why,
        }
    }
}

/// Reads one `keygate_keys` row (selected with [`COLUMNS`]) back into a record.
pub(crate) fn decode<'r, R>(row: &'r R) -> Result<KeyRecord, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    decode_checked(row).map_err(BadRow::into_error)
}

/// [`decode`], saying which column of which key is damaged.
pub(crate) fn decode_checked<'r, R>(row: &'r R) -> Result<KeyRecord, BadRow>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let raw_id: String = row.try_get("id").map_err(|e| BadRow {
        key_id: None,
        shown_id: "(unreadable)".into(),
        column: "id",
        why: format!("unreadable: {}", short(&e)),
    })?;
    let id = KeyId::parse(&raw_id).map_err(|_| BadRow {
        key_id: None,
        shown_id: shown(&raw_id),
        column: "id",
        why: "not a key id (12 base62 characters)".into(),
    })?;
    let d = Decoder { row, id };
    let prefix = d.text("prefix")?;
    let prefix = Prefix::new(&prefix).map_err(|_| d.bad("prefix", "not a valid key prefix"))?;
    let digest: Vec<u8> = d.get("digest")?;
    let digest = KeyDigest::from_slice(&digest).map_err(|_| {
        d.bad(
            "digest",
            &format!("expected 32 bytes, found {}", digest.len()),
        )
    })?;
    let status = d.text("status")?;
    let status: KeyStatus = status.parse().map_err(|_| {
        d.bad(
            "status",
            &format!("{} is not active, disabled or revoked", shown(&status)),
        )
    })?;
    let rotated_from = match d.get::<Option<String>>("rotated_from")? {
        None => None,
        Some(text) => Some(KeyId::parse(&text).map_err(|_| d.bad("rotated_from", "not a key id"))?),
    };
    // NULL: the key is the first of its lineage (every row from before migration 5).
    let lineage = match d.get::<Option<String>>("lineage")? {
        None => None,
        Some(text) => Some(KeyId::parse(&text).map_err(|_| d.bad("lineage", "not a key id"))?),
    };
    Ok(KeyRecord {
        id,
        prefix,
        digest,
        name: d.text("name")?,
        owner: d.get("owner")?,
        status,
        created_at: d.time("created_at")?,
        updated_at: d.time("updated_at")?,
        expires_at: match d.get::<Option<i64>>("expires_at")? {
            None => None,
            Some(ms) => Some(stored_time(ms).ok_or_else(|| d.bad("expires_at", OUT_OF_RANGE))?),
        },
        scopes: d.json::<Vec<String>>("scopes")?,
        resources: d.json::<Vec<String>>("resources")?,
        attributes: d.json::<BTreeMap<String, String>>("attributes")?,
        allowed_ips: d.json::<Vec<ipnet::IpNet>>("allowed_ips")?,
        rate_limits: d.json::<Vec<RateLimitPolicy>>("rate_limits")?,
        quotas: d.json::<Vec<QuotaPolicy>>("quotas")?,
        metadata: d.json::<serde_json::Value>("metadata")?,
        rotated_from,
        lineage,
        grants: d.json::<Vec<Grant>>("grants")?,
        roles: d.json::<Vec<String>>("roles")?,
        identity: d.get("identity")?,
        version: {
            let v: i64 = d.get("version")?;
            u64::try_from(v).map_err(|_| d.bad("version", "negative"))?
        },
        // A hint, not part of the key: absent (a query without it), unreadable or out of
        // range reads as "not known", never as a damaged key.
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at")
            .ok()
            .flatten()
            .and_then(stored_time),
    })
}

struct Decoder<'a, R> {
    row: &'a R,
    id: KeyId,
}

impl<'r, R> Decoder<'r, R>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn bad(&self, column: &'static str, why: &str) -> BadRow {
        BadRow {
            key_id: Some(self.id),
            shown_id: String::new(),
            column,
            why: why.to_owned(),
        }
    }

    fn get<T>(&self, column: &'static str) -> Result<T, BadRow>
    where
        T: Decode<'r, R::Database> + Type<R::Database>,
    {
        self.row
            .try_get::<T, _>(column)
            .map_err(|e| self.bad(column, &format!("unreadable: {}", short(&e))))
    }

    fn text(&self, column: &'static str) -> Result<String, BadRow> {
        self.get::<String>(column)
    }

    fn time(&self, column: &'static str) -> Result<SystemTime, BadRow> {
        let ms: i64 = self.get(column)?;
        stored_time(ms).ok_or_else(|| self.bad(column, OUT_OF_RANGE))
    }

    fn json<T: DeserializeOwned>(&self, column: &'static str) -> Result<T, BadRow> {
        let text = self.text(column)?;
        serde_json::from_str(&text).map_err(|e| {
            // serde's message can quote stored values; keep only its class and position.
            let class = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Data => "JSON of the wrong shape",
                serde_json::error::Category::Eof => "truncated JSON",
            };
            self.bad(
                column,
                &format!("{class} (line {}, column {})", e.line(), e.column()),
            )
        })
    }
}

/// A decode error in a few words (sqlx's messages name types, not values).
fn short(e: &sqlx::Error) -> String {
    let mut s = e.to_string();
    if s.len() > 160 {
        let mut cut = 160;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_to_the_millisecond() {
        let t = UNIX_EPOCH + Duration::from_millis(1_780_000_000_123);
        assert_eq!(from_ms(to_ms(t)), Some(t));
        let before = UNIX_EPOCH - Duration::from_millis(5);
        assert_eq!(to_ms(before), -5);
        assert_eq!(from_ms(-5), Some(before));
        // Sub-millisecond parts are dropped.
        let fine = t + Duration::from_micros(999);
        assert_eq!(from_ms(to_ms(fine)), Some(t));
    }

    #[test]
    fn shown_text_is_cut_and_escaped() {
        assert_eq!(shown("a\"b"), "\"a\\\"b\"");
        assert_eq!(shown(&"x".repeat(100)).len(), 34);
    }
}
