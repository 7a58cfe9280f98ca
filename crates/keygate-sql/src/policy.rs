//! Roles and identities in SQL (`keygate_roles`, `keygate_identities`, migration 6), and
//! the conditional (compare-and-set) key write.
//!
//! The database propagates them: a trigger advances the change sequence of every key that
//! names a role (or belongs to an identity) when the role (identity) is written, so a
//! follower invalidates exactly those keys and their next request resolves them again.

use std::collections::BTreeMap;
use std::time::SystemTime;

use keygate_core::{Grant, Identity, KeyId, QuotaPolicy, RateLimitPolicy, Role, StoreError};
use serde::de::DeserializeOwned;
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::error::{is_unique_violation, unavailable};
use crate::row;
use crate::store::{Pool, SqlStore};

macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

const ROLE_COLUMNS: &str = "name, grants, attributes, rate_limits, quotas, created_at, \
     updated_at, version, mint_max_lifetime_secs";

const IDENTITY_COLUMNS: &str =
    "name, metadata, rate_limits, quotas, created_at, updated_at, version";

fn json<T: serde::Serialize>(
    kind: &str,
    name: &str,
    column: &str,
    v: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| {
        StoreError::Corrupt(format!(
            "{kind} {name}: column {column} cannot be encoded: {e}"
        ))
    })
}

fn time(kind: &str, name: &str, column: &str, t: SystemTime) -> Result<i64, StoreError> {
    if keygate_core::time::in_stored_range(t) {
        Ok(row::to_ms(t))
    } else {
        Err(StoreError::Corrupt(format!(
            "{kind} {name}: column {column} cannot be stored: out of range"
        )))
    }
}

/// Reads the columns of a role or identity row, naming the column that is damaged.
struct Reader<'a, R> {
    row: &'a R,
    kind: &'static str,
    name: String,
}

impl<'r, R> Reader<'r, R>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn new(row: &'r R, kind: &'static str) -> Result<Self, StoreError> {
        let name: String = row
            .try_get("name")
            .map_err(|_| StoreError::Corrupt(format!("{kind} row: column name is unreadable")))?;
        Ok(Reader { row, kind, name })
    }

    fn bad(&self, column: &str, why: &str) -> StoreError {
        let shown: String = self.name.chars().take(64).collect();
        StoreError::Corrupt(format!("{} {shown:?}: column {column}: {why}", self.kind))
    }

    fn get<T: Decode<'r, R::Database> + Type<R::Database>>(
        &self,
        column: &'static str,
    ) -> Result<T, StoreError> {
        self.row
            .try_get::<T, _>(column)
            .map_err(|_| self.bad(column, "unreadable"))
    }

    fn json<T: DeserializeOwned>(&self, column: &'static str) -> Result<T, StoreError> {
        let text: String = self.get(column)?;
        serde_json::from_str(&text).map_err(|e| {
            self.bad(
                column,
                &format!(
                    "not valid JSON of its shape (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })
    }

    fn time(&self, column: &'static str) -> Result<SystemTime, StoreError> {
        let ms: i64 = self.get(column)?;
        keygate_core::time::from_unix_ms(ms).ok_or_else(|| self.bad(column, "out of range"))
    }

    fn version(&self) -> Result<u64, StoreError> {
        let v: i64 = self.get("version")?;
        u64::try_from(v).map_err(|_| self.bad("version", "negative"))
    }
}

fn decode_role<'r, R>(row: &'r R) -> Result<Role, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let mint: Option<i64> = row
        .try_get("mint_max_lifetime_secs")
        .map_err(|e| StoreError::Corrupt(format!("role: column mint_max_lifetime_secs: {e}")))?;
    let mint_max_lifetime_secs = match mint {
        None => None,
        Some(n) => Some(
            u64::try_from(n)
                .map_err(|_| StoreError::Corrupt("role: negative mint_max_lifetime_secs".into()))?,
        ),
    };
    let r = Reader::new(row, "role")?;
    Ok(Role {
        mint_max_lifetime_secs,
        grants: r.json::<Vec<Grant>>("grants")?,
        attributes: r.json::<BTreeMap<String, String>>("attributes")?,
        rate_limits: r.json::<Vec<RateLimitPolicy>>("rate_limits")?,
        quotas: r.json::<Vec<QuotaPolicy>>("quotas")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        version: r.version()?,
        name: r.name,
    })
}

fn decode_identity<'r, R>(row: &'r R) -> Result<Identity, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let r = Reader::new(row, "identity")?;
    Ok(Identity {
        metadata: r.json::<serde_json::Value>("metadata")?,
        rate_limits: r.json::<Vec<RateLimitPolicy>>("rate_limits")?,
        quotas: r.json::<Vec<QuotaPolicy>>("quotas")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        name: r.name,
    })
}

/// A role's column values, ready to bind.
struct RoleRow {
    name: String,
    grants: String,
    attributes: String,
    rate_limits: String,
    quotas: String,
    created_at: i64,
    updated_at: i64,
    mint: Option<i64>,
}

impl RoleRow {
    fn new(r: &Role) -> Result<Self, StoreError> {
        let n = &r.name;
        Ok(RoleRow {
            name: n.clone(),
            grants: json("role", n, "grants", &r.grants)?,
            attributes: json("role", n, "attributes", &r.attributes)?,
            rate_limits: json("role", n, "rate_limits", &r.rate_limits)?,
            quotas: json("role", n, "quotas", &r.quotas)?,
            created_at: time("role", n, "created_at", r.created_at)?,
            updated_at: time("role", n, "updated_at", r.updated_at)?,
            mint: r
                .mint_max_lifetime_secs
                .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        })
    }
}

fn stored_version(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqlStore {
    pub(crate) async fn roles_sql(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let list = serde_json::to_string(names)
            .map_err(|e| StoreError::Corrupt(format!("role names cannot be encoded: {e}")))?;
        self.timed("roles", async {
            on_pool!(self, pool => {
                let sql = match &self.inner.pool {
                    Pool::Sqlite(_) => format!(
                        "SELECT {ROLE_COLUMNS} FROM keygate_roles \
                         WHERE name IN (SELECT value FROM json_each($1)) ORDER BY name"
                    ),
                    Pool::Postgres(_) => format!(
                        "SELECT {ROLE_COLUMNS} FROM keygate_roles \
                         WHERE name IN (SELECT jsonb_array_elements_text(CAST($1 AS jsonb))) \
                         ORDER BY name"
                    ),
                };
                let rows = sqlx::query(&sql)
                    .bind(list)
                    .fetch_all(pool)
                    .await
                    .map_err(|e| unavailable("roles", e))?;
                rows.iter().map(decode_role).collect()
            })
        })
        .await
    }

    pub(crate) async fn list_roles_sql(&self) -> Result<Vec<Role>, StoreError> {
        self.timed("list_roles", async {
            on_pool!(self, pool => {
                let rows = sqlx::query(&format!("SELECT {ROLE_COLUMNS} FROM keygate_roles ORDER BY name"))
                    .fetch_all(pool)
                    .await
                    .map_err(|e| unavailable("list_roles", e))?;
                rows.iter().map(decode_role).collect()
            })
        })
        .await
    }

    pub(crate) async fn insert_role_sql(&self, role: &Role) -> Result<(), StoreError> {
        let r = RoleRow::new(role)?;
        self.timed("insert_role", async {
            let done = on_pool!(self, pool => {
                sqlx::query(&format!(
                    "INSERT INTO keygate_roles ({ROLE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8)"
                ))
                .bind(r.name)
                .bind(r.grants)
                .bind(r.attributes)
                .bind(r.rate_limits)
                .bind(r.quotas)
                .bind(r.created_at)
                .bind(r.updated_at)
                .bind(r.mint)
                .execute(pool)
                .await
                .map(|_| ())
            });
            done.map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::NameTaken {
                        kind: "role",
                        name: role.name.clone(),
                    }
                } else {
                    unavailable("insert_role", e)
                }
            })
        })
        .await
    }

    pub(crate) async fn update_role_sql(&self, role: &Role) -> Result<(), StoreError> {
        let r = RoleRow::new(role)?;
        let version = stored_version(role.version);
        self.timed("update_role", async {
            let result: Result<(u64, bool), sqlx::Error> = on_pool!(self, pool => {
                async {
                    let n = sqlx::query(
                        "UPDATE keygate_roles SET grants = $2, attributes = $3, rate_limits = $4, \
                         quotas = $5, updated_at = $6, version = version + 1, \
                         mint_max_lifetime_secs = $8 WHERE name = $1 AND version = $7",
                    )
                    .bind(&r.name)
                    .bind(&r.grants)
                    .bind(&r.attributes)
                    .bind(&r.rate_limits)
                    .bind(&r.quotas)
                    .bind(r.updated_at)
                    .bind(version)
                    .bind(r.mint)
                    .execute(pool)
                    .await?
                    .rows_affected();
                    if n > 0 {
                        return Ok((n, true));
                    }
                    let exists: Option<i64> =
                        sqlx::query_scalar("SELECT version FROM keygate_roles WHERE name = $1")
                            .bind(&r.name)
                            .fetch_optional(pool)
                            .await?;
                    Ok((0, exists.is_some()))
                }
                .await
            });
            match result.map_err(|e| unavailable("update_role", e))? {
                (n, _) if n > 0 => Ok(()),
                (_, true) => Err(StoreError::Conflict {
                    kind: "role",
                    name: role.name.clone(),
                }),
                (_, false) => Err(StoreError::NoSuchName {
                    kind: "role",
                    name: role.name.clone(),
                }),
            }
        })
        .await
    }

    pub(crate) async fn delete_role_sql(&self, name: &str) -> Result<bool, StoreError> {
        self.timed("delete_role", async {
            on_pool!(self, pool => {
                sqlx::query("DELETE FROM keygate_roles WHERE name = $1")
                    .bind(name)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected() > 0)
                    .map_err(|e| unavailable("delete_role", e))
            })
        })
        .await
    }

    pub(crate) async fn keys_with_role_sql(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.timed("keys_with_role", async {
            let ids: Vec<String> = on_pool!(self, pool => {
                sqlx::query_scalar("SELECT key_id FROM keygate_key_roles WHERE role = $1 ORDER BY key_id")
                    .bind(name)
                    .fetch_all(pool)
                    .await
                    .map_err(|e| unavailable("keys_with_role", e))
            })?;
            Ok(ids.iter().filter_map(|i| KeyId::parse(i).ok()).collect())
        })
        .await
    }

    pub(crate) async fn get_identity_sql(
        &self,
        name: &str,
    ) -> Result<Option<Identity>, StoreError> {
        self.timed("get_identity", async {
            on_pool!(self, pool => {
                let row = sqlx::query(&format!(
                    "SELECT {IDENTITY_COLUMNS} FROM keygate_identities WHERE name = $1"
                ))
                .bind(name)
                .fetch_optional(pool)
                .await
                .map_err(|e| unavailable("get_identity", e))?;
                row.as_ref().map(decode_identity).transpose()
            })
        })
        .await
    }

    pub(crate) async fn list_identities_sql(&self) -> Result<Vec<Identity>, StoreError> {
        self.timed("list_identities", async {
            on_pool!(self, pool => {
                let rows = sqlx::query(&format!(
                    "SELECT {IDENTITY_COLUMNS} FROM keygate_identities ORDER BY name"
                ))
                .fetch_all(pool)
                .await
                .map_err(|e| unavailable("list_identities", e))?;
                rows.iter().map(decode_identity).collect()
            })
        })
        .await
    }

    pub(crate) async fn insert_identity_sql(&self, identity: &Identity) -> Result<(), StoreError> {
        let n = &identity.name;
        let metadata = json("identity", n, "metadata", &identity.metadata)?;
        let rates = json("identity", n, "rate_limits", &identity.rate_limits)?;
        let quotas = json("identity", n, "quotas", &identity.quotas)?;
        let created = time("identity", n, "created_at", identity.created_at)?;
        let updated = time("identity", n, "updated_at", identity.updated_at)?;
        self.timed("insert_identity", async {
            let done = on_pool!(self, pool => {
                sqlx::query(&format!(
                    "INSERT INTO keygate_identities ({IDENTITY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, 0)"
                ))
                .bind(n)
                .bind(&metadata)
                .bind(&rates)
                .bind(&quotas)
                .bind(created)
                .bind(updated)
                .execute(pool)
                .await
                .map(|_| ())
            });
            done.map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::NameTaken {
                        kind: "identity",
                        name: n.clone(),
                    }
                } else {
                    unavailable("insert_identity", e)
                }
            })
        })
        .await
    }

    /// One `UPDATE` (the triggers advance the change sequence of every key of the
    /// identity).
    pub(crate) async fn update_identity_sql(&self, identity: &Identity) -> Result<(), StoreError> {
        let n = &identity.name;
        let metadata = json("identity", n, "metadata", &identity.metadata)?;
        let rates = json("identity", n, "rate_limits", &identity.rate_limits)?;
        let quotas = json("identity", n, "quotas", &identity.quotas)?;
        let updated = time("identity", n, "updated_at", identity.updated_at)?;
        self.timed("update_identity", async {
            let rows = on_pool!(self, pool => {
                sqlx::query(
                    "UPDATE keygate_identities SET metadata = $2, rate_limits = $3, quotas = $4, \
                     updated_at = $5, version = version + 1 WHERE name = $1",
                )
                .bind(n)
                .bind(&metadata)
                .bind(&rates)
                .bind(&quotas)
                .bind(updated)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(|e| unavailable("update_identity", e))
            })?;
            if rows == 0 {
                return Err(StoreError::NoSuchName {
                    kind: "identity",
                    name: n.clone(),
                });
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn delete_identity_sql(&self, name: &str) -> Result<bool, StoreError> {
        self.timed("delete_identity", async {
            on_pool!(self, pool => {
                sqlx::query("DELETE FROM keygate_identities WHERE name = $1")
                    .bind(name)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected() > 0)
                    .map_err(|e| unavailable("delete_identity", e))
            })
        })
        .await
    }

    pub(crate) async fn keys_with_identity_sql(
        &self,
        name: &str,
    ) -> Result<Vec<KeyId>, StoreError> {
        self.timed("keys_with_identity", async {
            let ids: Vec<String> = on_pool!(self, pool => {
                sqlx::query_scalar("SELECT id FROM keygate_keys WHERE identity = $1 ORDER BY id")
                    .bind(name)
                    .fetch_all(pool)
                    .await
                    .map_err(|e| unavailable("keys_with_identity", e))
            })?;
            Ok(ids.iter().filter_map(|i| KeyId::parse(i).ok()).collect())
        })
        .await
    }
}
