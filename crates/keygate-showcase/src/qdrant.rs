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

use super::body::ParsedUpsert;
use super::filter::Filter;
use super::store::{Distance, Found, Point, PointId, Read, Selector, StoreError, VectorParams};
use super::AppState;

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

/// The caller's tenant, owned (for [`blocking`]).
fn owned_tenant(p: &Principal) -> Option<String> {
    p.tenant().map(str::to_owned)
}

/// Runs a store call on tokio's blocking pool: store calls take a collection's lock and may
/// scan every point, which must not hold up the async workers (`/healthz` and every other
/// request keep being answered while a scan runs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(StoreError::internal()))
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
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    let extras = app.extras.clone();
    let counted = blocking(move || {
        let (params, points) = vectors.info(&name, t.as_deref())?;
        let schema = extras.payload_schema(&vectors, &name, t.as_deref());
        Ok((params, points, schema))
    });
    match counted.await {
        Ok((params, points, payload_schema)) => ok(
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
                "payload_schema": payload_schema
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
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    match blocking(move || vectors.delete(&name, t.as_deref())).await {
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
/// The points were read and parsed by [`super::body::read_upsert`], which charged their
/// [`PointCount`](super::PointCount) to the rate limit and the quota; an upsert that was not parsed there
/// (no such collection: 404; otherwise a wiring error, 500) is never written.
pub async fn upsert(
    State(app): State<AppState>,
    Authenticated(p): Authenticated,
    Path(name): Path<String>,
    parsed: Option<Extension<ParsedUpsert>>,
) -> Response {
    let started = Instant::now();
    let Some(Extension(parsed)) = parsed else {
        if !app.vectors.exists(&name) {
            return store_error(StoreError::missing(&name), started);
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Service internal error: the upsert was not counted",
            started,
        );
    };
    let points = match parsed.take() {
        Some(Ok(points)) => points,
        Some(Err(message)) => return error(StatusCode::BAD_REQUEST, &message, started),
        None => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Service internal error: the upsert was not counted",
                started,
            )
        }
    };
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    match blocking(move || vectors.upsert(&name, points, t.as_deref())).await {
        Ok(op) => ok(update_result(op), started),
        Err(e) => store_error(e, started),
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
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    let found = blocking(move || {
        vectors.retrieve(&name, &req.ids, t.as_deref(), |id, point| {
            record_of(id, point, &payload, &vector)
        })
    });
    match found.await {
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
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    match blocking(move || vectors.retrieve(&name, &[id], t.as_deref(), everything)).await {
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
    let (vectors, t, filter) = (app.vectors.clone(), owned_tenant(&p), req.filter);
    let (n, offset, threshold) = (
        limit(Some(req.limit), 10),
        req.offset.unwrap_or(0),
        req.score_threshold,
    );
    let found = blocking(move || {
        let read = Read {
            tenant: t.as_deref(),
            filter: filter.as_ref(),
        };
        vectors.search(&name, vector, read, n, offset, threshold)
    });
    match found.await {
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
    let query = req.query;
    let (vectors, t, filter, threshold) = (
        app.vectors.clone(),
        owned_tenant(&p),
        req.filter,
        req.score_threshold,
    );
    let found = blocking(move || {
        let t = t.as_deref();
        let read = Read {
            tenant: t,
            filter: filter.as_ref(),
        };
        let target = match query {
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
            ) => Some(vectors.vector_of(&name, id, t)?),
        };
        match target {
            Some(v) => vectors.search(&name, v, read, n, offset, threshold),
            None => vectors
                .scroll(&name, read, None, offset, n)
                .map(|(page, _)| page),
        }
    });
    match found.await {
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
    let (vectors, t, filter) = (app.vectors.clone(), owned_tenant(&p), req.filter);
    let (from, n) = (req.offset, limit(req.limit, 10));
    let found = blocking(move || {
        let read = Read {
            tenant: t.as_deref(),
            filter: filter.as_ref(),
        };
        vectors.scroll(&name, read, from, 0, n)
    });
    match found.await {
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
    let (vectors, t, filter) = (app.vectors.clone(), owned_tenant(&p), req.filter);
    let counted = blocking(move || {
        let read = Read {
            tenant: t.as_deref(),
            filter: filter.as_ref(),
        };
        vectors.count(&name, read)
    });
    match counted.await {
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
    let (vectors, t) = (app.vectors.clone(), owned_tenant(&p));
    match blocking(move || vectors.delete_points(&name, &selector, t.as_deref())).await {
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
