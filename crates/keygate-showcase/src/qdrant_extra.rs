//! The Qdrant routes a client uses beyond points and collections: payload indexes, payload
//! writes (set, overwrite, delete keys, clear), aliases, batch searches and queries, facets
//! and groups, with Qdrant's JSON shapes. The route table of [`super::routes`] gives each its
//! scope; row-level security by tenant applies to every one that reads or writes points.
//!
//! - Payload writes select points by id or filter. A tenant's key selects only its own
//!   points: ids are per tenant, so an id only another tenant owns is answered like a
//!   missing one (404, nothing changed) and a shared id changes only the caller's point;
//!   the payload's `tenant` field is stamped back after every change, as upserts stamp it.
//!   Every write (index changes too) takes one operation id from the caller's tenant's
//!   counter, as upserts do.
//! - Facets and groups count and return only the points the caller can see.
//! - Aliases: `/collections/{alias}/...` is rewritten to the collection the alias names by
//!   [`resolve_aliases`] before any layer sees the request, so the scope layer checks the
//!   key against the real collection (a key allowed on the alias name but not on its
//!   collection is refused), and the audit log records the collection touched. Creating an
//!   alias needs access to both names.
//! - Batch searches and queries run each request of the batch through the single-request
//!   handler (same parsing, limits and errors); the first failing one fails the batch. A
//!   batch of `n` costs `n` against rate limits and quotas ([`count_batch_requests`]), as
//!   `n` separate requests would.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::Extension;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use keygate::{Authenticated, Principal};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::filter::Filter;
use super::qdrant::{error, ok, MAX_LIMIT};
use super::store::{check_name, Found, PointId, Read, Selector, StoreError, VectorStore};
use super::{AppState, PointCount, MAX_BODY};

/// The most searches or queries one batch request holds.
pub const MAX_BATCH: usize = 100;
/// The most alias actions one `POST /collections/aliases` holds.
pub const MAX_ALIAS_ACTIONS: usize = 100;
/// The most aliases the server keeps.
pub const MAX_ALIASES: usize = 10_000;
/// The most payload indexes one collection keeps.
pub const MAX_INDEXES: usize = 1_000;
/// The payload index types Qdrant knows.
pub const INDEX_TYPES: [&str; 8] = [
    "keyword", "integer", "float", "bool", "geo", "text", "datetime", "uuid",
];

/// What the extra routes keep besides the points: aliases and payload indexes, shared by
/// every clone.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Alias name to collection name.
    aliases: Arc<RwLock<BTreeMap<String, String>>>,
    /// Whether any alias exists: while none does, [`resolve_aliases`] takes no lock.
    any_alias: Arc<AtomicBool>,
    /// Collection to field to index type.
    indexes: Arc<RwLock<BTreeMap<String, BTreeMap<String, String>>>>,
}

impl Extras {
    /// Nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The collection `alias` names, if it is an alias.
    pub fn alias_target(&self, alias: &str) -> Option<String> {
        if !self.any_alias.load(Ordering::Acquire) {
            return None;
        }
        self.aliases
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(alias)
            .cloned()
    }

    /// Forgets the aliases and indexes of a deleted collection.
    pub fn collection_deleted(&self, name: &str) {
        let mut aliases = self.aliases.write().unwrap_or_else(PoisonError::into_inner);
        aliases.retain(|_, target| target != name);
        self.any_alias.store(!aliases.is_empty(), Ordering::Release);
        drop(aliases);
        self.indexes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// `payload_schema` of collection `name` (`{"field": {"data_type": "keyword", "points":
    /// n}}`), `n` counting the points with that field the caller can see. Blocks like the
    /// store's methods (it scans the collection once per index).
    pub fn payload_schema(
        &self,
        vectors: &VectorStore,
        name: &str,
        tenant: Option<&str>,
    ) -> Map<String, Value> {
        let fields = self
            .indexes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .unwrap_or_default();
        fields
            .into_iter()
            .map(|(field, data_type)| {
                let read = Read {
                    tenant,
                    filter: None,
                };
                let points = vectors
                    .read_points(name, read, |pts| {
                        pts.filter(|(_, p)| field_values(&p.payload, &field).next().is_some())
                            .count()
                    })
                    .unwrap_or(0);
                (field, json!({"data_type": data_type, "points": points}))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------

fn store_error(e: StoreError, started: Instant) -> Response {
    error(e.status, &e.message, started)
}

fn wrong_input(what: impl std::fmt::Display, started: Instant) -> Response {
    store_error(StoreError::wrong_input(what), started)
}

/// Parses a JSON body (whatever its content type), as the core routes do.
fn body<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    started: Instant,
) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        let msg: String = e.to_string().chars().take(300).collect();
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("Format error in JSON body: {msg}"),
            started,
        ))
    })
}

/// Runs a handler's body on tokio's blocking pool: it calls the store, whose methods take a
/// collection's lock and may scan every point, which must not hold up the async workers.
/// 500 if the body did not finish.
async fn off_workers(body: impl FnOnce() -> Response + Send + 'static) -> Response {
    let started = Instant::now();
    tokio::task::spawn_blocking(body)
        .await
        .unwrap_or_else(|_| store_error(StoreError::internal(), started))
}

fn update_result(operation_id: u64) -> Value {
    json!({"operation_id": operation_id, "status": "completed"})
}

fn forbidden(message: String, started: Instant) -> Response {
    error(StatusCode::FORBIDDEN, &message, started)
}

/// The values of payload field `key` (a dotted path through objects, `a.b`): an array's
/// elements, or the value itself.
fn field_values<'a>(payload: &'a Map<String, Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    let mut parts = key.split('.');
    let first = parts.next().and_then(|k| payload.get(k));
    let found = parts
        .try_fold(first, |v, k| Some(v.and_then(|v| v.get(k))))
        .flatten();
    let (one, many) = match found {
        Some(Value::Array(a)) => (None, a.as_slice()),
        Some(Value::Null) | None => (None, &[][..]),
        Some(v) => (Some(v), &[][..]),
    };
    one.into_iter().chain(many.iter())
}

/// `WithPayloadInterface`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum WithPayload {
    All(bool),
    Fields(Vec<String>),
    Include { include: Vec<String> },
    Exclude { exclude: Vec<String> },
}

impl WithPayload {
    fn shape(&self, p: &Map<String, Value>) -> Option<Map<String, Value>> {
        let keep = |k: &String| match self {
            WithPayload::All(all) => *all,
            WithPayload::Fields(f) | WithPayload::Include { include: f } => f.contains(k),
            WithPayload::Exclude { exclude } => !exclude.contains(k),
        };
        if matches!(self, WithPayload::All(false)) {
            return None;
        }
        Some(
            p.iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// `WithVector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum WithVector {
    All(bool),
    Names(Vec<String>),
}

impl WithVector {
    fn wanted(&self) -> bool {
        match self {
            WithVector::All(b) => *b,
            WithVector::Names(n) => !n.is_empty(),
        }
    }
}

/// `ScoredPoint`.
#[derive(Debug, Serialize)]
struct ScoredPoint {
    id: PointId,
    version: u64,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector: Option<Vec<f32>>,
}

fn scored(f: &Found, payload: &WithPayload, vector: &WithVector) -> ScoredPoint {
    ScoredPoint {
        id: f.id,
        version: f.point.version,
        score: f.score,
        payload: payload.shape(&f.point.payload),
        vector: vector.wanted().then(|| f.point.vector.clone()),
    }
}

/// Refuses a field this server does not implement when it is set (not null).
fn refuse_set(field: &Option<Value>, what: &str, started: Instant) -> Result<(), Box<Response>> {
    match field {
        Some(v) if !v.is_null() => Err(Box::new(wrong_input(
            format!("{what} is not supported by this server"),
            started,
        ))),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Collections: deletion forgets aliases and indexes
// ---------------------------------------------------------------------------------------

/// `DELETE /collections/{c}`: as [`super::qdrant::delete_collection`], then the collection's
/// aliases and payload indexes are dropped (as Qdrant drops them).
pub async fn delete_collection(
    State(app): State<AppState>,
    auth: Authenticated,
    Path(name): Path<String>,
) -> Response {
    let res = super::qdrant::delete_collection(State(app.clone()), auth, Path(name.clone())).await;
    if res.status() == StatusCode::OK && !app.vectors.exists(&name) {
        app.extras.collection_deleted(&name);
    }
    res
}

// ---------------------------------------------------------------------------------------
// Payload indexes
// ---------------------------------------------------------------------------------------

/// `PayloadFieldSchema`: `"keyword"` or `{"type": "keyword", ...}` (the parameters are
/// accepted and ignored: search here is exact).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FieldSchema {
    Name(String),
    Params {
        #[serde(rename = "type")]
        kind: String,
    },
}

#[derive(Debug, Deserialize)]
struct CreateFieldIndex {
    field_name: String,
    #[serde(default)]
    field_schema: Option<FieldSchema>,
}

/// `PUT /collections/{c}/index`: records a payload index (`payload_schema` of the
/// collection's info lists it). Indexes change no result here (every search is exact).
pub async fn create_index(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || {
        let started = Instant::now();
        let req: CreateFieldIndex = match body(&bytes, started) {
            Ok(r) => r,
            Err(res) => return *res,
        };
        let kind = match req.field_schema {
            Some(FieldSchema::Name(k) | FieldSchema::Params { kind: k }) => k,
            None => return wrong_input("field_schema is required", started),
        };
        if !INDEX_TYPES.contains(&kind.as_str()) {
            return wrong_input(
                format!(
                    "field_schema {:?} is not one of {}",
                    kind.chars().take(64).collect::<String>(),
                    INDEX_TYPES.join(", ")
                ),
                started,
            );
        }
        if req.field_name.is_empty() || req.field_name.len() > 256 {
            return wrong_input("field_name must be 1 to 256 bytes", started);
        }
        // The operation id (and the check that the collection exists) come from the store.
        let indexes = &app.extras.indexes;
        let done = app.vectors.write_operation(&name, p.tenant(), || {
            let mut all = indexes.write().unwrap_or_else(PoisonError::into_inner);
            let fields = all.entry(name.clone()).or_default();
            if fields.len() >= MAX_INDEXES && !fields.contains_key(&req.field_name) {
                return Err(StoreError::wrong_input(format!(
                    "a collection keeps at most {MAX_INDEXES} payload indexes"
                )));
            }
            fields.insert(req.field_name.clone(), kind.clone());
            Ok(())
        });
        match done {
            Ok(((), op)) => ok(update_result(op), started),
            Err(e) => store_error(e, started),
        }
    })
    .await
}

/// `DELETE /collections/{c}/index/{field}`: forgets a payload index (completed whether or
/// not there was one, as Qdrant answers).
pub async fn delete_index(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path((name, field)): Path<(String, String)>,
) -> Response {
    off_workers(move || {
        let started = Instant::now();
        let indexes = &app.extras.indexes;
        let done = app.vectors.write_operation(&name, p.tenant(), || {
            if let Some(fields) = indexes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&name)
            {
                fields.remove(&field);
            }
            Ok(())
        });
        match done {
            Ok(((), op)) => ok(update_result(op), started),
            Err(e) => store_error(e, started),
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Payload writes
// ---------------------------------------------------------------------------------------

/// Which points a payload write selects: `points` (ids) or `filter`, exactly one.
#[derive(Debug, Default, Deserialize)]
struct Selection {
    #[serde(default)]
    points: Option<Vec<PointId>>,
    #[serde(default)]
    filter: Option<Filter>,
}

#[derive(Debug, Deserialize)]
struct SetPayload {
    payload: Map<String, Value>,
    #[serde(flatten)]
    select: Selection,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    shard_key: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct DeletePayload {
    keys: Vec<String>,
    #[serde(flatten)]
    select: Selection,
    #[serde(default)]
    shard_key: Option<Value>,
}

impl Selection {
    /// The store's selector: exactly one of `points` and `filter`.
    fn selector(&self) -> Result<Selector, StoreError> {
        match (&self.points, &self.filter) {
            (Some(ids), None) => Ok(Selector::Ids(ids.clone())),
            (None, Some(f)) => Ok(Selector::Filter(Box::new(f.clone()))),
            _ => Err(StoreError::wrong_input(
                "give either points (a list of ids) or filter, not both and not neither",
            )),
        }
    }
}

/// What a payload write does to each selected point's payload.
enum Change<'a> {
    /// Merge these fields in (under `key` when given).
    Set(&'a Map<String, Value>, Option<&'a str>),
    /// Replace the whole payload.
    Overwrite(&'a Map<String, Value>),
    /// Remove these fields.
    Delete(&'a [String]),
    /// Remove every field.
    Clear,
}

impl Change<'_> {
    fn apply(&self, payload: &mut Map<String, Value>) {
        match self {
            Change::Set(fields, None) => {
                for (k, v) in fields.iter() {
                    payload.insert(k.clone(), v.clone());
                }
            }
            Change::Set(fields, Some(key)) => {
                let slot = payload
                    .entry((*key).to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(inner) = slot {
                    for (k, v) in fields.iter() {
                        inner.insert(k.clone(), v.clone());
                    }
                }
            }
            Change::Overwrite(fields) => *payload = (*fields).clone(),
            Change::Delete(keys) => keys.iter().for_each(|k| {
                payload.remove(k);
            }),
            Change::Clear => payload.clear(),
        }
    }
}

fn write_payload(
    app: &AppState,
    p: &Principal,
    name: &str,
    select: &Selection,
    change: Change<'_>,
    started: Instant,
) -> Response {
    // The store stamps a tenant's `tenant` field back after the change.
    let done = select.selector().and_then(|selector| {
        app.vectors
            .update_payloads(name, &selector, p.tenant(), |payload| change.apply(payload))
    });
    match done {
        Ok(op) => ok(update_result(op), started),
        Err(e) => store_error(e, started),
    }
}

fn set_or_overwrite(
    app: &AppState,
    p: &Principal,
    name: &str,
    bytes: &[u8],
    overwrite: bool,
) -> Response {
    let started = Instant::now();
    let req: SetPayload = match body(bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if let Err(res) = refuse_set(&req.shard_key, "shard_key", started) {
        return *res;
    }
    let change = match (overwrite, req.key.as_deref()) {
        (true, None) => Change::Overwrite(&req.payload),
        (true, Some(_)) => return wrong_input("key is not supported when overwriting", started),
        (false, Some(k)) if k.is_empty() || k.contains(['.', '[', ']']) => {
            return wrong_input(
                "key must name one top-level field (nested paths are not supported by this server)",
                started,
            )
        }
        (false, key) => Change::Set(&req.payload, key),
    };
    write_payload(app, p, name, &req.select, change, started)
}

/// `POST /collections/{c}/points/payload`: sets payload fields of the selected points
/// (others kept).
pub async fn set_payload(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || set_or_overwrite(&app, &p, &name, &bytes, false)).await
}

/// `PUT /collections/{c}/points/payload`: replaces the selected points' whole payload.
pub async fn overwrite_payload(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || set_or_overwrite(&app, &p, &name, &bytes, true)).await
}

/// `POST /collections/{c}/points/payload/delete`: removes fields from the selected points.
pub async fn delete_payload(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || {
        let started = Instant::now();
        let req: DeletePayload = match body(&bytes, started) {
            Ok(r) => r,
            Err(res) => return *res,
        };
        if let Err(res) = refuse_set(&req.shard_key, "shard_key", started) {
            return *res;
        }
        write_payload(
            &app,
            &p,
            &name,
            &req.select,
            Change::Delete(&req.keys),
            started,
        )
    })
    .await
}

/// `POST /collections/{c}/points/payload/clear`: removes every field of the selected
/// points (a tenant's points keep their `tenant`).
pub async fn clear_payload(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || {
        let started = Instant::now();
        let select: Selection = match body(&bytes, started) {
            Ok(r) => r,
            Err(res) => return *res,
        };
        write_payload(&app, &p, &name, &select, Change::Clear, started)
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Aliases
// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct AliasDescription<'a> {
    alias_name: &'a str,
    collection_name: &'a str,
}

fn alias_list<'a>(
    aliases: impl Iterator<Item = (&'a String, &'a String)>,
    started: Instant,
) -> Response {
    let list: Vec<AliasDescription<'_>> = aliases
        .map(|(a, c)| AliasDescription {
            alias_name: a,
            collection_name: c,
        })
        .collect();
    ok(json!({ "aliases": list }), started)
}

/// `GET /aliases`: the aliases whose name and collection the key may both access.
pub async fn list_aliases(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
) -> Response {
    let started = Instant::now();
    let all = app
        .extras
        .aliases
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    alias_list(
        all.iter()
            .filter(|(a, c)| p.can_access(a) && p.can_access(c)),
        started,
    )
}

/// `GET /collections/{c}/aliases`: the aliases of collection `c` the key may access.
pub async fn collection_aliases(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
) -> Response {
    let started = Instant::now();
    if !app.vectors.exists(&name) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("Not found: Collection `{name}` doesn't exist!"),
            started,
        );
    }
    let all = app
        .extras
        .aliases
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    alias_list(
        all.iter().filter(|(a, c)| **c == name && p.can_access(a)),
        started,
    )
}

#[derive(Debug, Deserialize)]
struct CreateAlias {
    collection_name: String,
    alias_name: String,
}

#[derive(Debug, Deserialize)]
struct DeleteAlias {
    alias_name: String,
}

#[derive(Debug, Deserialize)]
struct RenameAlias {
    old_alias_name: String,
    new_alias_name: String,
}

/// `AliasOperations`.
#[derive(Debug, Deserialize)]
enum AliasAction {
    #[serde(rename = "create_alias")]
    Create(CreateAlias),
    #[serde(rename = "delete_alias")]
    Delete(DeleteAlias),
    #[serde(rename = "rename_alias")]
    Rename(RenameAlias),
}

#[derive(Debug, Deserialize)]
struct ChangeAliases {
    actions: Vec<AliasAction>,
    #[serde(default)]
    timeout: Option<Value>,
}

fn no_alias(name: &str) -> StoreError {
    StoreError {
        status: StatusCode::NOT_FOUND,
        message: format!("Not found: Alias {name} does not exist!"),
    }
}

/// `POST /collections/aliases`: creates, deletes and renames aliases, all actions or none.
/// The key must be allowed on every alias name and collection an action names (403
/// otherwise); an alias may not take the name of a collection.
pub async fn change_aliases(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: ChangeAliases = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.timeout;
    if req.actions.len() > MAX_ALIAS_ACTIONS {
        return wrong_input(
            format!("at most {MAX_ALIAS_ACTIONS} alias actions at once"),
            started,
        );
    }
    // Every name must be one this key may touch, before anything changes.
    for action in &req.actions {
        let names: [&str; 2] = match action {
            AliasAction::Create(a) => [&a.alias_name, &a.collection_name],
            AliasAction::Delete(a) => [&a.alias_name, &a.alias_name],
            AliasAction::Rename(a) => [&a.old_alias_name, &a.new_alias_name],
        };
        for n in names {
            if let Err(e) = check_name(n) {
                return store_error(e, started);
            }
            if !p.can_access(n) {
                return forbidden(format!("Forbidden: this key may not access `{n}`"), started);
            }
        }
    }
    let mut all = app
        .extras
        .aliases
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    // Applied to a copy, kept only if every action succeeds.
    let mut next = all.clone();
    for action in req.actions {
        let result = match action {
            AliasAction::Create(a) => {
                if !app.vectors.exists(&a.collection_name) {
                    Err(StoreError {
                        status: StatusCode::NOT_FOUND,
                        message: format!(
                            "Not found: Collection `{}` doesn't exist!",
                            a.collection_name
                        ),
                    })
                } else if app.vectors.exists(&a.alias_name) {
                    Err(StoreError {
                        status: StatusCode::CONFLICT,
                        message: format!(
                            "Wrong input: Collection `{}` already exists: an alias cannot take its name",
                            a.alias_name
                        ),
                    })
                } else {
                    // Qdrant replaces an alias created again.
                    next.insert(a.alias_name, a.collection_name);
                    Ok(())
                }
            }
            AliasAction::Delete(a) => match next.get(&a.alias_name) {
                Some(target) if p.can_access(target) => {
                    next.remove(&a.alias_name);
                    Ok(())
                }
                Some(_) => Err(StoreError {
                    status: StatusCode::FORBIDDEN,
                    message: format!(
                        "Forbidden: this key may not access the collection of alias `{}`",
                        a.alias_name
                    ),
                }),
                None => Err(no_alias(&a.alias_name)),
            },
            AliasAction::Rename(a) => {
                if app.vectors.exists(&a.new_alias_name) {
                    Err(StoreError {
                        status: StatusCode::CONFLICT,
                        message: format!(
                            "Wrong input: Collection `{}` already exists: an alias cannot take its name",
                            a.new_alias_name
                        ),
                    })
                } else {
                    match next.remove(&a.old_alias_name) {
                        Some(target) if p.can_access(&target) => {
                            next.insert(a.new_alias_name, target);
                            Ok(())
                        }
                        Some(_) => Err(StoreError {
                            status: StatusCode::FORBIDDEN,
                            message: format!(
                                "Forbidden: this key may not access the collection of alias `{}`",
                                a.old_alias_name
                            ),
                        }),
                        None => Err(no_alias(&a.old_alias_name)),
                    }
                }
            }
        };
        if let Err(e) = result {
            return store_error(e, started);
        }
    }
    if next.len() > MAX_ALIASES {
        return wrong_input(
            format!("the server keeps at most {MAX_ALIASES} aliases"),
            started,
        );
    }
    *all = next;
    app.extras
        .any_alias
        .store(!all.is_empty(), Ordering::Release);
    ok(true, started)
}

/// What is escaped in a collection name put back into a path.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// What [`resolve_aliases`] does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum AliasUse {
    /// Not an alias (or a route that takes names as they are): pass it on.
    Keep,
    /// Send it to this path and query instead.
    Rewrite(String),
    /// `PUT /collections/{alias}`: a collection may not take an alias's name.
    Taken(String),
}

/// Where the request for `method path` goes when the collection in its path is an alias:
/// every `/collections/{c}` and `/collections/{c}/...` route takes an alias, except
/// creating and deleting the collection, `exists` and `aliases`, which take names as they
/// are.
pub fn alias_use(extras: &Extras, method: &Method, uri: &Uri) -> AliasUse {
    let path = uri.path();
    let Some(rest) = path.strip_prefix("/collections/") else {
        return AliasUse::Keep;
    };
    let (raw, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if raw.is_empty()
        || matches!(tail, "/exists" | "/aliases")
        || (tail.is_empty() && *method == Method::DELETE)
        || (tail.is_empty() && *method == Method::POST && raw == "aliases")
    {
        return AliasUse::Keep;
    }
    let Ok(name) = percent_decode_str(raw).decode_utf8() else {
        return AliasUse::Keep;
    };
    let Some(target) = extras.alias_target(&name) else {
        return AliasUse::Keep;
    };
    if tail.is_empty() && *method == Method::PUT {
        return AliasUse::Taken(name.into_owned());
    }
    let mut to = format!(
        "/collections/{}{tail}",
        utf8_percent_encode(&target, SEGMENT)
    );
    if let Some(q) = uri.query() {
        to.push('?');
        to.push_str(q);
    }
    AliasUse::Rewrite(to)
}

/// Middleware around the whole router: a request naming an alias in a collection path is
/// sent to the alias's collection (see [`alias_use`]) before routing and before any layer,
/// so every check applies to the real collection. While no alias exists it only reads an
/// atomic flag.
pub async fn resolve_aliases(
    State(extras): State<Extras>,
    mut req: Request,
    next: Next,
) -> Response {
    match alias_use(&extras, req.method(), req.uri()) {
        AliasUse::Keep => {}
        AliasUse::Rewrite(to) => match to.parse::<Uri>() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Wrong input: the alias's collection does not make a valid path",
                    Instant::now(),
                )
            }
        },
        AliasUse::Taken(name) => {
            return error(
                StatusCode::CONFLICT,
                &format!(
                    "Wrong input: Alias `{name}` already exists: a collection cannot take its name"
                ),
                Instant::now(),
            )
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------

/// The collection of a batch search or query (`POST /collections/{c}/points/{search,query}/batch`),
/// still percent-encoded; `None` for any other request.
fn batched_collection<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if method != Method::POST {
        return None;
    }
    let rest = path.strip_prefix("/collections/")?;
    let (raw, tail) = rest.split_at(rest.find('/')?);
    (!raw.is_empty() && matches!(tail, "/points/search/batch" | "/points/query/batch"))
        .then_some(raw)
}

/// Whether the scope layer will let `p` read points of `raw` (the collection as it appears
/// in the path, decoded as the scope layer decodes it).
fn may_read(p: &Principal, raw: &str) -> bool {
    let name = match percent_decode_str(raw).decode_utf8() {
        Ok(name) if !name.chars().any(|c| c == '/' || c.is_control()) => name,
        _ => return false,
    };
    keygate::Scope::parse("points:read").is_ok_and(|s| p.has_scope(&s)) && p.can_access(&name)
}

/// The number of requests in a batch body, read exactly as the batch handlers read it;
/// `None` if it does not parse (the handler then refuses it with 400).
pub fn count_batch(bytes: &[u8]) -> Option<usize> {
    serde_json::from_slice::<BatchRequest>(bytes)
        .ok()
        .map(|b| b.searches.len())
}

/// Middleware beside [`crate::body::read_upsert`]: for a batch search or query by a key
/// that may read the collection, reads the body (at most [`MAX_BODY`]) and puts the number of
/// requests in it (at least 1) in a [`PointCount`], which the rate-limit and quota layers
/// charge. Every other request passes untouched, its body unread.
pub async fn count_batch_requests(
    State(gate): State<keygate::KeyGate>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(raw) = batched_collection(req.method(), req.uri().path()).map(str::to_owned) else {
        return next.run(req).await;
    };
    match gate.resolve(&mut req).await {
        Ok(p) if may_read(&p, &raw) => {}
        _ => return next.run(req).await,
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large: the body is over 32 MiB or could not be read",
            Instant::now(),
        );
    };
    let n = count_batch(&bytes).unwrap_or(1).max(1);
    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
    req.extensions_mut().insert(PointCount(n));
    next.run(req).await
}

#[derive(Debug, Deserialize)]
struct BatchRequest {
    searches: Vec<Value>,
    #[serde(default)]
    timeout: Option<Value>,
}

/// Runs each request of a batch through `one` (the single-request handler), collecting the
/// `result`s; the first answer that is not 200 is the batch's answer. A batch that was not
/// charged its size (see [`count_batch_requests`]) is refused (500: a wiring error, never
/// answered at the wrong cost).
async fn batch<F, Fut>(bytes: &[u8], counted: Option<usize>, mut one: F) -> Response
where
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let started = Instant::now();
    let req: BatchRequest = match body(bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.timeout;
    if counted != Some(req.searches.len().max(1)) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Service internal error: the batch was not counted",
            started,
        );
    }
    if req.searches.len() > MAX_BATCH {
        return wrong_input(
            format!(
                "a batch holds at most {MAX_BATCH} requests, got {}",
                req.searches.len()
            ),
            started,
        );
    }
    let mut results = Vec::with_capacity(req.searches.len());
    for search in req.searches {
        let Ok(bytes) = serde_json::to_vec(&search) else {
            return wrong_input("a batch request could not be read", started);
        };
        let res = one(Bytes::from(bytes)).await;
        if res.status() != StatusCode::OK {
            return res;
        }
        let answer = axum::body::to_bytes(res.into_body(), usize::MAX).await;
        match answer
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            Some(mut v) => results.push(v["result"].take()),
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Service internal error: a batch answer could not be read",
                    started,
                )
            }
        }
    }
    ok(results, started)
}

/// `POST /collections/{c}/points/search/batch`: `{"searches": [SearchRequest]}`, answered
/// with one list of `ScoredPoint` per search.
pub async fn search_batch(
    State(app): State<AppState>,
    auth: Authenticated,
    Path(name): Path<String>,
    counted: Option<Extension<PointCount>>,
    bytes: Bytes,
) -> Response {
    let counted = counted.map(|Extension(PointCount(n))| n);
    batch(&bytes, counted, |b| {
        super::qdrant::search(State(app.clone()), auth.clone(), Path(name.clone()), b)
    })
    .await
}

/// `POST /collections/{c}/points/query/batch`: `{"searches": [QueryRequest]}`, answered with
/// one `{"points": [...]}` per query.
pub async fn query_batch(
    State(app): State<AppState>,
    auth: Authenticated,
    Path(name): Path<String>,
    counted: Option<Extension<PointCount>>,
    bytes: Bytes,
) -> Response {
    let counted = counted.map(|Extension(PointCount(n))| n);
    batch(&bytes, counted, |b| {
        super::qdrant::query(State(app.clone()), auth.clone(), Path(name.clone()), b)
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Facets
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct FacetRequest {
    key: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    exact: Option<bool>,
    #[serde(default)]
    shard_key: Option<Value>,
}

/// `FacetValueHit`.
#[derive(Debug, Serialize)]
struct FacetHit {
    value: Value,
    count: usize,
}

/// `FacetResponse`.
#[derive(Debug, Serialize)]
struct FacetResponse {
    hits: Vec<FacetHit>,
}

/// `PointGroup`.
#[derive(Debug, Serialize)]
struct PointGroup {
    id: Value,
    hits: Vec<ScoredPoint>,
}

/// `GroupsResult`.
#[derive(Debug, Serialize)]
struct GroupsResult {
    groups: Vec<PointGroup>,
}

/// A facet value in the order Qdrant lists equal counts: by value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum FacetValue {
    Bool(bool),
    Int(i128),
    Text(String),
}

impl FacetValue {
    fn of(v: &Value) -> Option<FacetValue> {
        match v {
            Value::String(s) => Some(FacetValue::Text(s.clone())),
            Value::Bool(b) => Some(FacetValue::Bool(*b)),
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .map(FacetValue::Int),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            FacetValue::Bool(b) => json!(b),
            FacetValue::Int(i) => i64::try_from(*i)
                .map(Value::from)
                .or_else(|_| u64::try_from(*i).map(Value::from))
                .unwrap_or(Value::Null),
            FacetValue::Text(s) => json!(s),
        }
    }
}

/// `POST /collections/{c}/facet`: `{"hits": [{"value": v, "count": n}]}`, the values of
/// payload field `key` (strings, integers, booleans; each value of an array once per point)
/// among the points the caller can see and the filter keeps, most frequent first (equal
/// counts by value), at most `limit` (10 by default). Always exact; no index is needed.
pub async fn facet(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || {
        let started = Instant::now();
        let req: FacetRequest = match body(&bytes, started) {
            Ok(r) => r,
            Err(res) => return *res,
        };
        let _ = req.exact;
        if let Err(res) = refuse_set(&req.shard_key, "shard_key", started) {
            return *res;
        }
        let limit = req.limit.unwrap_or(10).min(MAX_LIMIT);
        let tenant = p.tenant();
        let read = Read {
            tenant,
            filter: req.filter.as_ref(),
        };
        let counted = app.vectors.read_points(&name, read, |points| {
            let mut counts: HashMap<FacetValue, usize> = HashMap::new();
            for (_, point) in points {
                let mut values: Vec<FacetValue> = field_values(&point.payload, &req.key)
                    .filter_map(FacetValue::of)
                    .collect();
                values.sort();
                values.dedup();
                for v in values {
                    *counts.entry(v).or_default() += 1;
                }
            }
            counts
        });
        let counts = match counted {
            Ok(c) => c,
            Err(e) => return store_error(e, started),
        };
        let mut hits: Vec<(FacetValue, usize)> = counts.into_iter().collect();
        hits.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let hits: Vec<FacetHit> = hits
            .into_iter()
            .take(limit)
            .map(|(v, count)| FacetHit {
                value: v.to_json(),
                count,
            })
            .collect();
        ok(FacetResponse { hits }, started)
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------

/// A search vector: a list, or `{"name": "", "vector": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SearchVector {
    Dense(Vec<f32>),
    Named { name: String, vector: Vec<f32> },
}

/// A query: a vector, a point id (its vector), or `{"nearest": ...}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum QueryInput {
    Vector(Vec<f32>),
    Id(PointId),
    Nearest { nearest: NearestInput },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NearestInput {
    Vector(Vec<f32>),
    Id(PointId),
}

/// `SearchGroupsRequest` and `QueryGroupsRequest` in one: `vector` for searches, `query`
/// for queries.
#[derive(Debug, Deserialize)]
struct GroupsRequest {
    #[serde(default)]
    vector: Option<SearchVector>,
    #[serde(default)]
    query: Option<QueryInput>,
    group_by: String,
    #[serde(default)]
    group_size: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    score_threshold: Option<f32>,
    #[serde(default)]
    with_payload: Option<WithPayload>,
    #[serde(default)]
    with_vector: Option<WithVector>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    with_lookup: Option<Value>,
    #[serde(default)]
    prefetch: Option<Value>,
    #[serde(default)]
    using: Option<String>,
    #[serde(default)]
    lookup_from: Option<Value>,
    #[serde(default)]
    shard_key: Option<Value>,
}

/// Groups of hits, best group (by its best hit) first.
fn group(
    found: &[Found],
    group_by: &str,
    limit: usize,
    size: usize,
    payload: &WithPayload,
    vector: &WithVector,
) -> Vec<PointGroup> {
    let mut order: Vec<FacetValue> = Vec::new();
    let mut groups: HashMap<FacetValue, Vec<ScoredPoint>> = HashMap::new();
    for f in found {
        let mut values: Vec<FacetValue> = field_values(&f.point.payload, group_by)
            .filter_map(FacetValue::of)
            .collect();
        values.sort();
        values.dedup();
        for v in values {
            match groups.get_mut(&v) {
                Some(hits) if hits.len() < size => hits.push(scored(f, payload, vector)),
                Some(_) => {}
                None if order.len() < limit => {
                    order.push(v.clone());
                    groups.insert(v, vec![scored(f, payload, vector)]);
                }
                None => {}
            }
        }
    }
    order
        .into_iter()
        .map(|v| {
            let hits = groups.remove(&v).unwrap_or_default();
            PointGroup {
                id: v.to_json(),
                hits,
            }
        })
        .collect()
}

fn groups(app: &AppState, p: &Principal, name: &str, bytes: &[u8], search: bool) -> Response {
    let started = Instant::now();
    let req: GroupsRequest = match body(bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.params;
    for (field, what) in [
        (&req.with_lookup, "with_lookup"),
        (&req.prefetch, "prefetch"),
        (&req.lookup_from, "lookup_from"),
        (&req.shard_key, "shard_key"),
    ] {
        if let Err(res) = refuse_set(field, what, started) {
            return *res;
        }
    }
    if req.using.as_deref().is_some_and(|u| !u.is_empty()) {
        return wrong_input(
            "a named vector (using) is not supported by this server",
            started,
        );
    }
    if req.group_by.is_empty() {
        return wrong_input("group_by must name a payload field", started);
    }
    let size = req.group_size.unwrap_or(3);
    let limit = req.limit.unwrap_or(10);
    if size == 0 || limit == 0 || size.saturating_mul(limit) > MAX_LIMIT {
        return wrong_input(
            format!(
                "group_size and limit must be at least 1, and their product at most {MAX_LIMIT}"
            ),
            started,
        );
    }
    let tenant = p.tenant();
    let read = Read {
        tenant,
        filter: req.filter.as_ref(),
    };
    let target = if search {
        match req.vector {
            Some(SearchVector::Dense(v)) => Some(v),
            Some(SearchVector::Named { name: n, vector }) if n.is_empty() => Some(vector),
            Some(SearchVector::Named { .. }) => {
                return wrong_input("named vectors are not supported by this server", started)
            }
            None => return wrong_input("vector is required", started),
        }
    } else {
        match req.query {
            None => None,
            Some(
                QueryInput::Vector(v)
                | QueryInput::Nearest {
                    nearest: NearestInput::Vector(v),
                },
            ) => Some(v),
            Some(
                QueryInput::Id(id)
                | QueryInput::Nearest {
                    nearest: NearestInput::Id(id),
                },
            ) => match app.vectors.vector_of(name, id, tenant) {
                Ok(v) => Some(v),
                Err(e) => return store_error(e, started),
            },
        }
    };
    // The candidates: the best MAX_LIMIT points the caller can see (all of them without a
    // query, in id order with score 1).
    let found = match target {
        Some(v) => app
            .vectors
            .search(name, v, read, MAX_LIMIT, 0, req.score_threshold),
        None => app
            .vectors
            .scroll(name, read, None, 0, MAX_LIMIT)
            .map(|(page, _)| page),
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => return store_error(e, started),
    };
    let payload = req.with_payload.unwrap_or(WithPayload::All(false));
    let vector = req.with_vector.unwrap_or(WithVector::All(false));
    let groups = group(&found, &req.group_by, limit, size, &payload, &vector);
    ok(GroupsResult { groups }, started)
}

/// `POST /collections/{c}/points/search/groups`: `{"groups": [{"id": value, "hits":
/// [ScoredPoint]}]}`, the nearest points grouped by payload field `group_by` (strings and
/// integers; a point with an array is in each of its groups), at most `limit` groups (10)
/// of at most `group_size` hits (3), among the 10,000 nearest points the caller can see.
pub async fn search_groups(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || groups(&app, &p, &name, &bytes, true)).await
}

/// `POST /collections/{c}/points/query/groups`: as [`search_groups`] with a universal query
/// (`query`: a vector, a point id, `{"nearest": ...}`, or none for id order).
pub async fn query_groups(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    off_workers(move || groups(&app, &p, &name, &bytes, false)).await
}
