//! The Qdrant REST subset: request and response shapes (as in Qdrant's OpenAPI) and the
//! handlers. Answers are `{"result": ..., "status": "ok", "time": seconds}`; errors
//! `{"status": {"error": "..."}, "time": seconds}` with Qdrant's status codes and messages.
//!
//! Every handler reads the caller's [`Principal`]: `GET /collections` lists only the
//! collections the key may access, and the key's `tenant` attribute is passed to the store,
//! which enforces row-level security (see [`super::store`]).

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use keygate::{Authenticated, Principal};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::filter::Filter;
use super::store::{Distance, Found, Point, PointId, Read, Selector, StoreError, VectorParams};
use super::{AppState, PointCount};

/// The Qdrant version whose REST API this server imitates (what `GET /` reports).
pub const QDRANT_VERSION: &str = "1.19.0";
/// The most points one search, query or scroll returns.
pub const MAX_LIMIT: usize = 10_000;

// ---------------------------------------------------------------------------------------
// Envelopes
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Answer<T> {
    result: T,
    status: &'static str,
    time: f64,
}

#[derive(Serialize)]
struct ErrorStatus<'a> {
    error: &'a str,
}

#[derive(Serialize)]
struct Failure<'a> {
    status: ErrorStatus<'a>,
    time: f64,
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `{"result": result, "status": "ok", "time": ...}`.
pub fn ok<T: Serialize>(result: T, started: Instant) -> Response {
    let body = Answer {
        result,
        status: "ok",
        time: started.elapsed().as_secs_f64(),
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => json_response(StatusCode::OK, bytes),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Service internal error: the answer could not be encoded",
            started,
        ),
    }
}

/// `{"status": {"error": message}, "time": ...}` with `status`.
pub fn error(status: StatusCode, message: &str, started: Instant) -> Response {
    let body = Failure {
        status: ErrorStatus { error: message },
        time: started.elapsed().as_secs_f64(),
    };
    json_response(status, serde_json::to_vec(&body).unwrap_or_default())
}

fn store_error(e: StoreError, started: Instant) -> Response {
    error(e.status, &e.message, started)
}

/// Parses a JSON body (whatever its content type, as curl users forget it).
fn body<T: DeserializeOwned>(bytes: &[u8], started: Instant) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        let msg: String = e.to_string().chars().take(300).collect();
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("Format error in JSON body: {msg}"),
            started,
        ))
    })
}

/// Like [`body`], an empty body reading as `{}`.
fn body_or_default<T: DeserializeOwned + Default>(
    bytes: &[u8],
    started: Instant,
) -> Result<T, Box<Response>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    body(bytes, started)
}

fn tenant(p: &Principal) -> Option<&str> {
    p.tenant()
}

// ---------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------

/// `VectorParams` (extra Qdrant settings such as `hnsw_config` are accepted and ignored).
#[derive(Debug, Deserialize)]
struct VectorParamsIn {
    size: u64,
    distance: Distance,
}

/// `VectorsConfig`: one unnamed vector, or named ones (refused).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum VectorsConfig {
    Single(VectorParamsIn),
    /// Read only to be refused.
    #[allow(dead_code)]
    Named(BTreeMap<String, Value>),
}

/// `CreateCollection` (only `vectors` is used; Qdrant's tuning fields are accepted).
#[derive(Debug, Deserialize)]
struct CreateCollection {
    vectors: VectorsConfig,
    #[serde(default)]
    sparse_vectors: Option<Value>,
}

/// A dense vector, or `{"": [...]}` (Qdrant's name for the unnamed vector).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum VectorIn {
    Dense(Vec<f32>),
    Named(BTreeMap<String, Value>),
}

impl VectorIn {
    fn dense(self) -> Result<Vec<f32>, StoreError> {
        match self {
            VectorIn::Dense(v) => Ok(v),
            VectorIn::Named(mut m) if m.len() == 1 && m.contains_key("") => {
                serde_json::from_value(m.remove("").unwrap_or(Value::Null))
                    .map_err(|_| StoreError::wrong_input("the vector must be a list of numbers"))
            }
            VectorIn::Named(_) => Err(StoreError::wrong_input(
                "named, sparse and multi-vectors are not supported by this server: send a list of numbers",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
struct PointStruct {
    id: PointId,
    vector: VectorIn,
    #[serde(default)]
    payload: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
struct Batch {
    ids: Vec<PointId>,
    vectors: Vec<VectorIn>,
    #[serde(default)]
    payloads: Option<Vec<Option<Map<String, Value>>>>,
}

/// `PointInsertOperations`: a list of points or a batch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Upsert {
    List {
        points: Vec<PointStruct>,
        #[serde(default)]
        update_filter: Option<Value>,
    },
    Batch {
        batch: Batch,
        #[serde(default)]
        update_filter: Option<Value>,
    },
}

impl Upsert {
    /// The number of points it writes (if it is written at all: a batch whose lists differ
    /// in length is refused).
    fn len(&self) -> usize {
        match self {
            Upsert::List { points, .. } => points.len(),
            Upsert::Batch { batch, .. } => batch.ids.len(),
        }
    }
}

/// The number of points in an upsert body, read exactly as [`upsert`] reads it (the same
/// type and parser, so the count charged is the count written); `None` if the body does not
/// parse, in which case [`upsert`] refuses it with 400.
pub fn count_points(bytes: &[u8]) -> Option<usize> {
    serde_json::from_slice::<Upsert>(bytes)
        .ok()
        .map(|u| u.len())
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

/// `WithVector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum WithVector {
    All(bool),
    Names(Vec<String>),
}

fn shape_payload(p: &Map<String, Value>, with: &WithPayload) -> Option<Map<String, Value>> {
    match with {
        WithPayload::All(false) => None,
        WithPayload::All(true) => Some(p.clone()),
        WithPayload::Fields(f) | WithPayload::Include { include: f } => Some(
            p.iter()
                .filter(|(k, _)| f.iter().any(|x| x == *k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        WithPayload::Exclude { exclude } => Some(
            p.iter()
                .filter(|(k, _)| !exclude.iter().any(|x| x == *k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    }
}

fn wants_vector(w: &WithVector) -> bool {
    match w {
        WithVector::All(b) => *b,
        WithVector::Names(n) => !n.is_empty(),
    }
}

/// `Record` (retrieve, scroll).
#[derive(Serialize)]
struct Record {
    id: PointId,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector: Option<Vec<f32>>,
}

/// `ScoredPoint` (search, query).
#[derive(Serialize)]
struct ScoredPoint {
    id: PointId,
    version: u64,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vector: Option<Vec<f32>>,
}

fn record(f: Found, payload: &WithPayload, vector: &WithVector) -> Record {
    Record {
        id: f.id,
        payload: shape_payload(&f.point.payload, payload),
        vector: wants_vector(vector).then_some(f.point.vector),
    }
}

/// A [`Record`] copying from `point` only what was asked for.
fn record_of(id: PointId, point: &Point, payload: &WithPayload, vector: &WithVector) -> Record {
    Record {
        id,
        payload: shape_payload(&point.payload, payload),
        vector: wants_vector(vector).then(|| point.vector.clone()),
    }
}

fn scored(f: Found, payload: &WithPayload, vector: &WithVector) -> ScoredPoint {
    ScoredPoint {
        id: f.id,
        version: f.point.version,
        score: f.score,
        payload: shape_payload(&f.point.payload, payload),
        vector: wants_vector(vector).then_some(f.point.vector),
    }
}

/// `QueryResponse`.
#[derive(Serialize)]
struct QueryResponse {
    points: Vec<ScoredPoint>,
}

/// `ScrollResult`.
#[derive(Serialize)]
struct ScrollResult {
    points: Vec<Record>,
    next_page_offset: Option<PointId>,
}

fn update_result(operation_id: u64) -> Value {
    json!({"operation_id": operation_id, "status": "completed"})
}

fn limit(n: Option<usize>, default: usize) -> usize {
    n.unwrap_or(default).min(MAX_LIMIT)
}

// ---------------------------------------------------------------------------------------
// Service routes
// ---------------------------------------------------------------------------------------

/// `GET /`: version info (unwrapped, as Qdrant answers it).
pub async fn root() -> Response {
    let body = json!({"title": "keygate vector_db showcase (Qdrant REST subset)", "version": QDRANT_VERSION});
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

/// `GET /healthz`, `GET /livez`.
pub async fn healthz() -> &'static str {
    "healthz check passed"
}

// ---------------------------------------------------------------------------------------
// Collections
// ---------------------------------------------------------------------------------------

/// `GET /collections`: the collections this key may access.
pub async fn list_collections(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
) -> Response {
    let started = Instant::now();
    let collections: Vec<Value> = app
        .vectors
        .names()
        .into_iter()
        .filter(|n| p.can_access(n))
        .map(|name| json!({ "name": name }))
        .collect();
    ok(json!({ "collections": collections }), started)
}

/// `PUT /collections/{c}`.
pub async fn create_collection(
    State(app): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: CreateCollection = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if req.sparse_vectors.as_ref().is_some_and(|v| !v.is_null()) {
        return store_error(
            StoreError::wrong_input("sparse vectors are not supported by this server"),
            started,
        );
    }
    let params = match req.vectors {
        VectorsConfig::Single(v) => VectorParams {
            size: v.size,
            distance: v.distance,
        },
        VectorsConfig::Named(_) => {
            return store_error(
                StoreError::wrong_input("named vectors are not supported by this server: give {\"size\": N, \"distance\": \"Cosine\"}"),
                started,
            )
        }
    };
    match app.vectors.create(&name, params) {
        Ok(()) => ok(true, started),
        Err(e) => store_error(e, started),
    }
}

/// `GET /collections/{c}`: `CollectionInfo` (point count as this key sees it).
pub async fn collection_info(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
) -> Response {
    let started = Instant::now();
    match app.vectors.info(&name, tenant(&p)) {
        Ok((params, points)) => ok(
            json!({
                "status": "green",
                "optimizer_status": "ok",
                "indexed_vectors_count": 0,
                "points_count": points,
                "segments_count": 1,
                "config": {
                    "params": {
                        "vectors": {"size": params.size, "distance": params.distance},
                        "shard_number": 1,
                        "replication_factor": 1,
                        "write_consistency_factor": 1,
                        "on_disk_payload": false
                    },
                    "hnsw_config": {"m": 16, "ef_construct": 100, "full_scan_threshold": 10000, "max_indexing_threads": 0, "on_disk": false},
                    "optimizer_config": {
                        "deleted_threshold": 0.2, "vacuum_min_vector_number": 1000,
                        "default_segment_number": 0, "max_segment_size": null, "memmap_threshold": null,
                        "indexing_threshold": 20000, "flush_interval_sec": 5, "max_optimization_threads": null
                    },
                    "wal_config": {"wal_capacity_mb": 32, "wal_segments_ahead": 0},
                    "quantization_config": null
                },
                "payload_schema": app.extras.payload_schema(&app, &name, tenant(&p))
            }),
            started,
        ),
        Err(e) => store_error(e, started),
    }
}

/// `DELETE /collections/{c}`: `true` if it existed.
pub async fn delete_collection(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
) -> Response {
    let started = Instant::now();
    match app.vectors.delete(&name, tenant(&p)) {
        Ok(existed) => ok(existed, started),
        Err(e) => store_error(e, started),
    }
}

/// `GET /collections/{c}/exists`.
pub async fn collection_exists(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let started = Instant::now();
    ok(json!({"exists": app.vectors.exists(&name)}), started)
}

// ---------------------------------------------------------------------------------------
// Points
// ---------------------------------------------------------------------------------------

/// `PUT /collections/{c}/points`: upsert a list or a batch (all or nothing).
///
/// The rate limit and the quota charged the [`PointCount`] that
/// [`super::count_upserted_points`] read from these bytes; an upsert that was not counted,
/// or whose count differs from what is written, is refused (500: a wiring error, never
/// written at the wrong cost).
pub async fn upsert(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    counted: Option<Extension<PointCount>>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: Upsert = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if counted.map(|Extension(PointCount(n))| n) != Some(req.len().max(1)) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Service internal error: the upsert was not counted",
            started,
        );
    }
    let points = match to_points(req) {
        Ok(p) => p,
        Err(e) => return store_error(e, started),
    };
    match app.vectors.upsert(&name, points, tenant(&p)) {
        Ok(op) => ok(update_result(op), started),
        Err(e) => store_error(e, started),
    }
}

type NewPoint = (PointId, Vec<f32>, Map<String, Value>);

fn to_points(req: Upsert) -> Result<Vec<NewPoint>, StoreError> {
    let unsupported = |f: &Option<Value>| f.as_ref().is_some_and(|v| !v.is_null());
    match req {
        Upsert::List {
            points,
            update_filter,
        } => {
            if unsupported(&update_filter) {
                return Err(StoreError::wrong_input(
                    "update_filter is not supported by this server",
                ));
            }
            points
                .into_iter()
                .map(|p| Ok((p.id, p.vector.dense()?, p.payload.unwrap_or_default())))
                .collect()
        }
        Upsert::Batch {
            batch,
            update_filter,
        } => {
            if unsupported(&update_filter) {
                return Err(StoreError::wrong_input(
                    "update_filter is not supported by this server",
                ));
            }
            let n = batch.ids.len();
            let payloads = batch.payloads.unwrap_or_default();
            if batch.vectors.len() != n || (!payloads.is_empty() && payloads.len() != n) {
                return Err(StoreError::wrong_input(
                    "batch: ids, vectors and payloads must have the same length",
                ));
            }
            let mut payloads = payloads.into_iter();
            batch
                .ids
                .into_iter()
                .zip(batch.vectors)
                .map(|(id, v)| {
                    Ok((
                        id,
                        v.dense()?,
                        payloads.next().flatten().unwrap_or_default(),
                    ))
                })
                .collect()
        }
    }
}

#[derive(Debug, Deserialize)]
struct PointRequest {
    ids: Vec<PointId>,
    #[serde(default)]
    with_payload: Option<WithPayload>,
    #[serde(default)]
    with_vector: Option<WithVector>,
}

/// `POST /collections/{c}/points`: retrieve points by id.
pub async fn retrieve(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: PointRequest = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if req.ids.len() > MAX_LIMIT {
        return store_error(
            StoreError::wrong_input(format!(
                "at most {MAX_LIMIT} ids can be retrieved at once, got {}",
                req.ids.len()
            )),
            started,
        );
    }
    let payload = req.with_payload.unwrap_or(WithPayload::All(true));
    let vector = req.with_vector.unwrap_or(WithVector::All(false));
    match app
        .vectors
        .retrieve(&name, &req.ids, tenant(&p), |id, point| {
            record_of(id, point, &payload, &vector)
        }) {
        Ok(records) => ok(records, started),
        Err(e) => store_error(e, started),
    }
}

/// `GET /collections/{c}/points/{id}`.
pub async fn get_point(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    let started = Instant::now();
    let Some(id) = PointId::parse(&id) else {
        return store_error(
            StoreError::wrong_input(format!(
                "{:?} is not a valid point id: expected an unsigned integer or a UUID",
                id.chars().take(64).collect::<String>()
            )),
            started,
        );
    };
    let everything = |id: PointId, point: &Point| {
        record_of(id, point, &WithPayload::All(true), &WithVector::All(true))
    };
    match app.vectors.retrieve(&name, &[id], tenant(&p), everything) {
        Ok(mut found) => match found.pop() {
            Some(r) => ok(r, started),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("Not found: No point with id {id} found"),
                started,
            ),
        },
        Err(e) => store_error(e, started),
    }
}

/// `NamedVectorStruct` of a search: a list, or `{"name": "", "vector": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SearchVector {
    Dense(Vec<f32>),
    Named { name: String, vector: Vec<f32> },
}

#[derive(Debug, Deserialize)]
struct SearchRequest {
    vector: SearchVector,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    params: Option<Value>,
    limit: usize,
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    with_payload: Option<WithPayload>,
    #[serde(default)]
    with_vector: Option<WithVector>,
    #[serde(default)]
    score_threshold: Option<f32>,
}

/// `POST /collections/{c}/points/search`: `ScoredPoint` list.
pub async fn search(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: SearchRequest = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.params;
    let vector = match req.vector {
        SearchVector::Dense(v) => v,
        SearchVector::Named { name: n, vector } if n.is_empty() => vector,
        SearchVector::Named { .. } => {
            return store_error(
                StoreError::wrong_input("named vectors are not supported by this server"),
                started,
            )
        }
    };
    let payload = req.with_payload.unwrap_or(WithPayload::All(false));
    let with_vector = req.with_vector.unwrap_or(WithVector::All(false));
    let read = Read {
        tenant: tenant(&p),
        filter: req.filter.as_ref(),
    };
    match app.vectors.search(
        &name,
        vector,
        read,
        limit(Some(req.limit), 10),
        req.offset.unwrap_or(0),
        req.score_threshold,
    ) {
        Ok(found) => ok(
            found
                .into_iter()
                .map(|f| scored(f, &payload, &with_vector))
                .collect::<Vec<_>>(),
            started,
        ),
        Err(e) => store_error(e, started),
    }
}

/// What a universal query asks for: a vector, a point id (its vector), `{"nearest": ...}`.
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

#[derive(Debug, Default, Deserialize)]
struct QueryRequest {
    #[serde(default)]
    query: Option<QueryInput>,
    #[serde(default)]
    prefetch: Option<Value>,
    #[serde(default)]
    using: Option<String>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    score_threshold: Option<f32>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    with_vector: Option<WithVector>,
    #[serde(default)]
    with_payload: Option<WithPayload>,
    #[serde(default)]
    lookup_from: Option<Value>,
}

/// `POST /collections/{c}/points/query`: `{"points": [ScoredPoint]}`. Without a query, the
/// points in id order with score 1.
pub async fn query(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: QueryRequest = match body_or_default(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.params;
    let refused = |what: &str| {
        store_error(
            StoreError::wrong_input(format!("{what} is not supported by this server")),
            started,
        )
    };
    if req.prefetch.as_ref().is_some_and(|v| !v.is_null()) {
        return refused("prefetch");
    }
    if req.lookup_from.as_ref().is_some_and(|v| !v.is_null()) {
        return refused("lookup_from");
    }
    if req.using.as_deref().is_some_and(|u| !u.is_empty()) {
        return refused("a named vector (using)");
    }
    let t = tenant(&p);
    let read = Read {
        tenant: t,
        filter: req.filter.as_ref(),
    };
    let payload = req.with_payload.unwrap_or(WithPayload::All(false));
    let with_vector = req.with_vector.unwrap_or(WithVector::All(false));
    let n = limit(req.limit, 10);
    let offset = req.offset.unwrap_or(0);
    if offset.saturating_add(n) > MAX_LIMIT {
        return store_error(
            StoreError::wrong_input(format!("offset + limit must be at most {MAX_LIMIT}")),
            started,
        );
    }
    let target = match req.query {
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
        ) => match app.vectors.vector_of(&name, id, t) {
            Ok(v) => Some(v),
            Err(e) => return store_error(e, started),
        },
    };
    let found = match target {
        Some(v) => app
            .vectors
            .search(&name, v, read, n, offset, req.score_threshold),
        None => app
            .vectors
            .scroll(&name, read, None, offset, n)
            .map(|(page, _)| page),
    };
    match found {
        Ok(found) => ok(
            QueryResponse {
                points: found
                    .into_iter()
                    .map(|f| scored(f, &payload, &with_vector))
                    .collect(),
            },
            started,
        ),
        Err(e) => store_error(e, started),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ScrollRequest {
    #[serde(default)]
    offset: Option<PointId>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    with_payload: Option<WithPayload>,
    #[serde(default)]
    with_vector: Option<WithVector>,
    #[serde(default)]
    order_by: Option<Value>,
}

/// `POST /collections/{c}/points/scroll`: `{"points": [Record], "next_page_offset": id}`.
pub async fn scroll(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: ScrollRequest = match body_or_default(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    if req.order_by.as_ref().is_some_and(|v| !v.is_null()) {
        return store_error(
            StoreError::wrong_input("order_by is not supported by this server"),
            started,
        );
    }
    let payload = req.with_payload.unwrap_or(WithPayload::All(true));
    let with_vector = req.with_vector.unwrap_or(WithVector::All(false));
    let read = Read {
        tenant: tenant(&p),
        filter: req.filter.as_ref(),
    };
    match app
        .vectors
        .scroll(&name, read, req.offset, 0, limit(req.limit, 10))
    {
        Ok((found, next)) => ok(
            ScrollResult {
                points: found
                    .into_iter()
                    .map(|f| record(f, &payload, &with_vector))
                    .collect(),
                next_page_offset: next,
            },
            started,
        ),
        Err(e) => store_error(e, started),
    }
}

#[derive(Debug, Default, Deserialize)]
struct CountRequest {
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    exact: Option<bool>,
}

/// `POST /collections/{c}/points/count`: `{"count": n}` (always exact).
pub async fn count(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: CountRequest = match body_or_default(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let _ = req.exact;
    let read = Read {
        tenant: tenant(&p),
        filter: req.filter.as_ref(),
    };
    match app.vectors.count(&name, read) {
        Ok(n) => ok(json!({ "count": n }), started),
        Err(e) => store_error(e, started),
    }
}

/// `PointsSelector`: ids or a filter.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PointsSelector {
    Ids { points: Vec<PointId> },
    Filter { filter: Box<Filter> },
}

/// `POST /collections/{c}/points/delete`.
pub async fn delete_points(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let started = Instant::now();
    let req: PointsSelector = match body(&bytes, started) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let selector = match req {
        PointsSelector::Ids { points } => Selector::Ids(points),
        PointsSelector::Filter { filter } => Selector::Filter(filter),
    };
    match app.vectors.delete_points(&name, &selector, tenant(&p)) {
        Ok(op) => ok(update_result(op), started),
        Err(e) => store_error(e, started),
    }
}

/// A Qdrant-shaped 404 for paths this server does not serve.
pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Not found: this server implements a subset of Qdrant's REST API",
        Instant::now(),
    )
}

impl IntoResponse for StoreError {
    fn into_response(self) -> Response {
        store_error(self, Instant::now())
    }
}
