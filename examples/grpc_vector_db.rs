//! A small gRPC vector database behind keygate's six layers, with tonic 0.14.
//!
//! ```text
//! cargo run --example grpc_vector_db --features full                # 127.0.0.1:50051
//! cargo run --example grpc_vector_db --features full -- --listen 127.0.0.1:6334 --audit-dir audit
//! ```
//!
//! It keeps keys in memory, creates two at start and prints them once: `demo` (may create
//! collections, write and read points, in every collection) and `reader` (reads only). Then,
//! from another terminal, with the example as its own client:
//!
//! ```text
//! export KEYGATE_API_KEY=kg_...   # the demo key
//! cargo run --example grpc_vector_db --features full -- client create docs 3
//! cargo run --example grpc_vector_db --features full -- client upsert docs 1 0.1,0.9,0.0 lang=en
//! cargo run --example grpc_vector_db --features full -- client search docs 0.1,0.8,0.1
//! ```
//!
//! `--tls-cert cert.pem --tls-key key.pem` serves TLS (rustls, accepted before tonic; build
//! with the `tonic-tls` feature, which `full` includes): keygate then reads the client
//! address from tonic's `TlsConnectInfo`, so per-key IP lists work behind TLS too. SIGHUP
//! reads both files again: new connections get the new certificate, open ones keep theirs
//! (nothing is dropped); a file that does not load leaves the current certificate in use.
//!
//! Ctrl-C or SIGTERM shuts it down gracefully: calls in flight finish, then quota counts and
//! audit events are flushed.
//!
//! The service is `keygate.vectordb.v1.VectorDb` (`CreateCollection`, `Upsert`, `Search`);
//! `examples/grpc_vector_db.proto` describes it for other languages and grpcurl. Nothing
//! here needs a protobuf compiler: the messages are hand-written prost structs
//! (`#[derive(prost::Message)]`, the same code `prost-build` would emit) and the server and
//! client glue is the few lines of `tonic-build`'s output a unary service needs, with
//! tonic-prost's `ProstCodec`.
//!
//! The layers, outermost first: audit (every call, with its gRPC method and status), the
//! point counter ([`CountPoints`]: an `Upsert` by a key that may write costs its point
//! count), rate limits (outside auth, so calls with bad keys are limited per address too),
//! auth (the key in `authorization: Bearer`, `x-api-key` or `api-key` metadata), IP lists,
//! scopes (one `RouteScopes::grpc` rule per method; a method without a rule is refused) and
//! quotas (cost: the point count too).
//!
//! Connections are bounded: at most [`MAX_CONNECTIONS`] at once (more wait in the listen
//! backlog), [`MAX_STREAMS`] calls in flight per connection, a [`CALL_TIMEOUT`] per call,
//! and HTTP/2 keep-alive pings that close dead peers. Each tenant has its own share of the
//! memory bound ([`MAX_TENANT_FLOATS`]). Denials are gRPC statuses, never bare HTTP errors:
//! UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE (key store down).
//! gRPC carries the collection in the message, which no layer reads, so the handlers check
//! it with `Principal::can_access` (PERMISSION_DENIED `resource_forbidden`). A key with a
//! `tenant` attribute writes into and searches only its tenant's points.
//!
//! Tests (`tests/examples_grpc.rs`) include this file as a module and run [`serve`] on an
//! ephemeral port with their own hub, clock and audit sink.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use keygate::core::audit::{Auditor, FileSink};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
use keygate::scope::{InvalidRule, RouteScopes, ScopeLayer};
use keygate::{
    KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Principal, QuotaPolicy, QuotaWindow,
    RateLimitPolicy, Verifier,
};
use tonic::{Request, Response, Status};

use pb::{
    CreateCollectionRequest, CreateCollectionResponse, Distance, Point, ScoredPoint, SearchRequest,
    SearchResponse, UpsertRequest, UpsertResponse,
};

// ---------------------------------------------------------------------------------------
// Messages and gRPC glue (what protoc + prost-build + tonic-build would generate)
// ---------------------------------------------------------------------------------------

/// The protobuf messages of `keygate.vectordb.v1`, the gRPC server and a client.
pub mod pb {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tonic::codegen::{http, Body, StdError};
    use tonic::{Request, Response, Status};

    /// The full name of the service.
    pub const SERVICE: &str = "keygate.vectordb.v1.VectorDb";
    /// The path of `CreateCollection`.
    pub const CREATE_COLLECTION: &str = "/keygate.vectordb.v1.VectorDb/CreateCollection";
    /// The path of `Upsert`.
    pub const UPSERT: &str = "/keygate.vectordb.v1.VectorDb/Upsert";
    /// The path of `Search`.
    pub const SEARCH: &str = "/keygate.vectordb.v1.VectorDb/Search";

    /// How vectors are compared.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Distance {
        /// Cosine similarity (vectors are normalized on the way in); higher is closer.
        Cosine = 0,
        /// Dot product; higher is closer.
        Dot = 1,
        /// Euclidean distance; lower is closer.
        Euclid = 2,
    }

    /// `CreateCollection`'s request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateCollectionRequest {
        /// The collection's name.
        #[prost(string, tag = "1")]
        pub collection: String,
        /// The length of every vector in it.
        #[prost(uint32, tag = "2")]
        pub dimension: u32,
        /// How its vectors are compared.
        #[prost(enumeration = "Distance", tag = "3")]
        pub distance: i32,
    }

    /// `CreateCollection`'s response.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateCollectionResponse {
        /// False when the collection already existed with the same settings.
        #[prost(bool, tag = "1")]
        pub created: bool,
    }

    /// A point: an id, a vector and a string payload.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Point {
        /// The point's id (per tenant).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// The vector.
        #[prost(float, repeated, tag = "2")]
        pub vector: Vec<f32>,
        /// Free string fields.
        #[prost(btree_map = "string, string", tag = "3")]
        pub payload: BTreeMap<String, String>,
    }

    /// `Upsert`'s request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpsertRequest {
        /// The collection.
        #[prost(string, tag = "1")]
        pub collection: String,
        /// The points to insert or replace.
        #[prost(message, repeated, tag = "2")]
        pub points: Vec<Point>,
    }

    /// `Upsert`'s response.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpsertResponse {
        /// How many points were written.
        #[prost(uint64, tag = "1")]
        pub upserted: u64,
    }

    /// `Search`'s request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SearchRequest {
        /// The collection.
        #[prost(string, tag = "1")]
        pub collection: String,
        /// The query vector.
        #[prost(float, repeated, tag = "2")]
        pub vector: Vec<f32>,
        /// How many hits at most (0 means 10; at most 100).
        #[prost(uint32, tag = "3")]
        pub limit: u32,
    }

    /// A search hit.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScoredPoint {
        /// The point's id.
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Its score (similarity, or distance for `EUCLID`).
        #[prost(float, tag = "2")]
        pub score: f32,
        /// Its payload.
        #[prost(btree_map = "string, string", tag = "3")]
        pub payload: BTreeMap<String, String>,
    }

    /// `Search`'s response.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SearchResponse {
        /// The hits, closest first.
        #[prost(message, repeated, tag = "1")]
        pub hits: Vec<ScoredPoint>,
    }

    /// What the server calls: one method per RPC.
    pub trait VectorDbService: Send + Sync + 'static {
        /// `CreateCollection`.
        fn create_collection(
            &self,
            req: Request<CreateCollectionRequest>,
        ) -> Result<Response<CreateCollectionResponse>, Status>;
        /// `Upsert`.
        fn upsert(&self, req: Request<UpsertRequest>) -> Result<Response<UpsertResponse>, Status>;
        /// `Search`.
        fn search(&self, req: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status>;
    }

    /// The gRPC server of a [`VectorDbService`]: a tower service over `http::Request`s, to
    /// add to `tonic::transport::Server` (after its layers).
    pub struct VectorDbServer<T> {
        inner: Arc<T>,
    }

    impl<T> VectorDbServer<T> {
        /// Serves `inner`.
        pub fn new(inner: T) -> Self {
            VectorDbServer {
                inner: Arc::new(inner),
            }
        }
    }

    impl<T> Clone for VectorDbServer<T> {
        fn clone(&self) -> Self {
            VectorDbServer {
                inner: self.inner.clone(),
            }
        }
    }

    impl<T> tonic::server::NamedService for VectorDbServer<T> {
        const NAME: &'static str = SERVICE;
    }

    type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

    /// Decodes one request message, calls `handler`, encodes its answer (or its status).
    async fn unary<B, Req, Res>(
        req: http::Request<B>,
        mut handler: impl FnMut(Request<Req>) -> Result<Response<Res>, Status> + Send + 'static,
    ) -> http::Response<tonic::body::Body>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
        Req: prost::Message + Default + Send + 'static,
        Res: prost::Message + Send + 'static,
    {
        let codec = tonic_prost::ProstCodec::<Res, Req>::default();
        let svc = tower::service_fn(move |r| std::future::ready(handler(r)));
        tonic::server::Grpc::new(codec).unary(svc, req).await
    }

    impl<T, B> tower::Service<http::Request<B>> for VectorDbServer<T>
    where
        T: VectorDbService,
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let db = self.inner.clone();
            match req.uri().path() {
                CREATE_COLLECTION => {
                    Box::pin(async move { Ok(unary(req, move |r| db.create_collection(r)).await) })
                }
                UPSERT => Box::pin(async move { Ok(unary(req, move |r| db.upsert(r)).await) }),
                SEARCH => Box::pin(async move { Ok(unary(req, move |r| db.search(r)).await) }),
                _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
            }
        }
    }

    /// A client of the service.
    #[derive(Debug, Clone)]
    pub struct VectorDbClient {
        inner: tonic::client::Grpc<tonic::transport::Channel>,
    }

    impl VectorDbClient {
        /// Connects to `dst` (`http://127.0.0.1:50051`).
        pub async fn connect(dst: String) -> Result<Self, tonic::transport::Error> {
            let channel = tonic::transport::Endpoint::from_shared(dst)?
                .connect()
                .await?;
            Ok(Self::new(channel))
        }

        /// A client over `channel`.
        pub fn new(channel: tonic::transport::Channel) -> Self {
            VectorDbClient {
                inner: tonic::client::Grpc::new(channel),
            }
        }

        /// Calls `path` (one of this module's constants) with `req`.
        pub async fn unary<Req, Res>(
            &mut self,
            path: &'static str,
            req: Request<Req>,
        ) -> Result<Response<Res>, Status>
        where
            Req: prost::Message + Send + Sync + 'static,
            Res: prost::Message + Default + Send + Sync + 'static,
        {
            self.inner
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("service was not ready: {e}")))?;
            let codec = tonic_prost::ProstCodec::<Req, Res>::default();
            let path = http::uri::PathAndQuery::from_static(path);
            self.inner.unary(req, path, codec).await
        }

        /// `CreateCollection`.
        pub async fn create_collection(
            &mut self,
            req: Request<CreateCollectionRequest>,
        ) -> Result<Response<CreateCollectionResponse>, Status> {
            self.unary(CREATE_COLLECTION, req).await
        }

        /// `Upsert`.
        pub async fn upsert(
            &mut self,
            req: Request<UpsertRequest>,
        ) -> Result<Response<UpsertResponse>, Status> {
            self.unary(UPSERT, req).await
        }

        /// `Search`.
        pub async fn search(
            &mut self,
            req: Request<SearchRequest>,
        ) -> Result<Response<SearchResponse>, Status> {
            self.unary(SEARCH, req).await
        }
    }
}

// ---------------------------------------------------------------------------------------
// The vector store
// ---------------------------------------------------------------------------------------

/// Longest collection name.
pub const MAX_NAME: usize = 64;
/// Longest vector.
pub const MAX_DIMENSION: u32 = 4096;
/// Most points in one upsert.
pub const MAX_BATCH: usize = 1000;
/// Most hits in one search.
pub const MAX_LIMIT: u32 = 100;
/// Most payload fields per point, and the longest field name and value (bytes).
pub const MAX_FIELDS: usize = 32;
const MAX_FIELD_NAME: usize = 64;
const MAX_FIELD_VALUE: usize = 1024;
/// Most numbers held over all collections (200 MB of `f32`), so memory stays bounded.
pub const MAX_FLOATS: usize = 50_000_000;
/// Most numbers one tenant (or all keys without a tenant together) may hold (40 MB of
/// `f32`), so one tenant cannot fill the database for the others.
pub const MAX_TENANT_FLOATS: usize = 10_000_000;
/// Most connections held at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most calls in flight on one connection.
pub const MAX_STREAMS: usize = 64;
/// The longest a call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request message (tonic's default decoding limit).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Most collections.
pub const MAX_COLLECTIONS: usize = 1000;

/// An in-memory vector database: collections of points, exact search.
pub struct VectorDb {
    inner: RwLock<Collections>,
    /// Most numbers one tenant may hold.
    tenant_share: usize,
}

impl Default for VectorDb {
    fn default() -> Self {
        VectorDb::with_tenant_share(MAX_TENANT_FLOATS)
    }
}

#[derive(Default)]
struct Collections {
    map: HashMap<String, Collection>,
    floats: usize,
    /// Numbers held per tenant.
    tenant_floats: HashMap<Option<Box<str>>, usize>,
}

struct Collection {
    dimension: u32,
    distance: Distance,
    /// Points by (tenant, id): a tenant's ids are its own.
    points: HashMap<(Option<Box<str>>, u64), Stored>,
}

struct Stored {
    vector: Vec<f32>,
    payload: BTreeMap<String, String>,
}

/// The caller, as the layers resolved it.
fn caller<T>(req: &Request<T>) -> Result<Principal, Status> {
    keygate::RequestContext::of(req.extensions())
        .and_then(|c| c.principal())
        .cloned()
        .ok_or_else(|| {
            // Only when the service is served without keygate's layers: fail closed.
            Status::unauthenticated("missing_key: no authenticated caller")
        })
}

/// Validates `name` and checks that `p` may use it.
fn collection_for(p: &Principal, name: &str) -> Result<(), Status> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid {
        return Err(Status::invalid_argument(format!(
            "a collection name is 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"
        )));
    }
    if !p.can_access(name) {
        return Err(Status::permission_denied(format!(
            "resource_forbidden: this key may not use collection {name:?}"
        )));
    }
    Ok(())
}

/// Checks a vector's length and values; normalizes it for cosine.
fn prepare(mut v: Vec<f32>, dimension: u32, distance: Distance) -> Result<Vec<f32>, Status> {
    if v.len() != dimension as usize {
        return Err(Status::invalid_argument(format!(
            "the vector has {} numbers, the collection {dimension}",
            v.len()
        )));
    }
    if !v.iter().all(|x| x.is_finite()) {
        return Err(Status::invalid_argument("vectors hold finite numbers only"));
    }
    if distance == Distance::Cosine {
        let norm = v
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(Status::invalid_argument(
                "a cosine vector must have a finite, non-zero length",
            ));
        }
        for x in &mut v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    Ok(v)
}

fn check_payload(payload: &BTreeMap<String, String>) -> Result<(), Status> {
    if payload.len() > MAX_FIELDS
        || payload
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > MAX_FIELD_NAME || v.len() > MAX_FIELD_VALUE)
    {
        return Err(Status::invalid_argument(format!(
            "a payload has at most {MAX_FIELDS} fields, names of 1 to {MAX_FIELD_NAME} bytes, \
             values of at most {MAX_FIELD_VALUE} bytes"
        )));
    }
    Ok(())
}

fn score(distance: Distance, a: &[f32], b: &[f32]) -> f32 {
    match distance {
        Distance::Cosine | Distance::Dot => a.iter().zip(b).map(|(x, y)| x * y).sum(),
        Distance::Euclid => a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt(),
    }
}

impl VectorDb {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty database where each tenant may hold at most `floats` numbers (at most
    /// [`MAX_TENANT_FLOATS`]).
    pub fn with_tenant_share(floats: usize) -> Self {
        VectorDb {
            inner: RwLock::default(),
            tenant_share: floats.min(MAX_TENANT_FLOATS),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Collections> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Collections> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl pb::VectorDbService for VectorDb {
    fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let p = caller(&req)?;
        let req = req.into_inner();
        collection_for(&p, &req.collection)?;
        if req.dimension == 0 || req.dimension > MAX_DIMENSION {
            return Err(Status::invalid_argument(format!(
                "the dimension is 1 to {MAX_DIMENSION}"
            )));
        }
        let distance = Distance::try_from(req.distance)
            .map_err(|_| Status::invalid_argument("unknown distance"))?;
        let mut db = self.write();
        if let Some(c) = db.map.get(&req.collection) {
            return if c.dimension == req.dimension && c.distance == distance {
                Ok(Response::new(CreateCollectionResponse { created: false }))
            } else {
                Err(Status::already_exists(
                    "the collection exists with other settings",
                ))
            };
        }
        if db.map.len() >= MAX_COLLECTIONS {
            return Err(Status::resource_exhausted("too many collections"));
        }
        db.map.insert(
            req.collection,
            Collection {
                dimension: req.dimension,
                distance,
                points: HashMap::new(),
            },
        );
        Ok(Response::new(CreateCollectionResponse { created: true }))
    }

    fn upsert(&self, req: Request<UpsertRequest>) -> Result<Response<UpsertResponse>, Status> {
        let p = caller(&req)?;
        let tenant = p.tenant().map(Box::<str>::from);
        let req = req.into_inner();
        collection_for(&p, &req.collection)?;
        if req.points.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} points per upsert"
            )));
        }
        let (dimension, distance) = {
            let db = self.read();
            let c = db
                .map
                .get(&req.collection)
                .ok_or_else(|| Status::not_found("no such collection"))?;
            (c.dimension, c.distance)
        };
        // Validate the whole batch before writing any of it.
        let mut batch = Vec::with_capacity(req.points.len());
        for Point {
            id,
            vector,
            mut payload,
        } in req.points
        {
            check_payload(&payload)?;
            if let Some(t) = &tenant {
                payload.insert("tenant".to_owned(), t.to_string());
            }
            batch.push((id, prepare(vector, dimension, distance)?, payload));
        }
        let mut guard = self.write();
        let db = &mut *guard;
        let c = db
            .map
            .get_mut(&req.collection)
            .ok_or_else(|| Status::not_found("no such collection"))?;
        let new = batch
            .iter()
            .filter(|(id, _, _)| !c.points.contains_key(&(tenant.clone(), *id)))
            .count();
        let added = new * dimension as usize;
        let mine = db.tenant_floats.get(&tenant).copied().unwrap_or(0);
        if mine + added > self.tenant_share {
            return Err(Status::resource_exhausted(
                "this tenant's share of the database is full",
            ));
        }
        if db.floats + added > MAX_FLOATS {
            return Err(Status::resource_exhausted("the database is full"));
        }
        db.floats += added;
        *db.tenant_floats.entry(tenant.clone()).or_insert(0) += added;
        let n = batch.len() as u64;
        for (id, vector, payload) in batch {
            c.points
                .insert((tenant.clone(), id), Stored { vector, payload });
        }
        Ok(Response::new(UpsertResponse { upserted: n }))
    }

    fn search(&self, req: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status> {
        let p = caller(&req)?;
        let req = req.into_inner();
        collection_for(&p, &req.collection)?;
        let limit = match req.limit {
            0 => 10,
            n if n <= MAX_LIMIT => n as usize,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "the limit is at most {MAX_LIMIT}"
                )))
            }
        };
        let db = self.read();
        let c = db
            .map
            .get(&req.collection)
            .ok_or_else(|| Status::not_found("no such collection"))?;
        let query = prepare(req.vector, c.dimension, c.distance)?;
        // A tenant's key sees its tenant's points only; a key without a tenant sees all.
        let mut hits: Vec<ScoredPoint> = c
            .points
            .iter()
            .filter(|((t, _), _)| p.tenant().is_none() || t.as_deref() == p.tenant())
            .map(|((_, id), s)| ScoredPoint {
                id: *id,
                score: score(c.distance, &query, &s.vector),
                payload: s.payload.clone(),
            })
            .collect();
        match c.distance {
            Distance::Euclid => hits.sort_by(|a, b| a.score.total_cmp(&b.score)),
            _ => hits.sort_by(|a, b| b.score.total_cmp(&a.score)),
        }
        hits.truncate(limit);
        Ok(Response::new(SearchResponse { hits }))
    }
}

// ---------------------------------------------------------------------------------------
// The protected server
// ---------------------------------------------------------------------------------------

/// The scope each method needs. A method with no rule is refused (`insufficient_scope`).
pub fn rules() -> Result<RouteScopes, InvalidRule> {
    RouteScopes::builder()
        .grpc(pb::CREATE_COLLECTION, "collections:manage")
        .grpc(pb::UPSERT, "points:write")
        .grpc(pb::SEARCH, "points:read")
        .build()
}

/// What protects the service: the hub and each layer's settings.
pub struct Protection {
    /// The hub (verifier, clock, credentials, renderer).
    pub gate: KeyGate,
    /// Global and per-key address lists.
    pub ip: IpPolicy,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
    /// Quotas.
    pub quota: QuotaConfig,
    /// Where audit events go.
    pub auditor: Auditor,
}

/// Serves `db` on `listener` behind the six layers until `shutdown` completes, then writes
/// pending quota counts and audit events. The rate limit and the quota charge each call its
/// [`PointCount`] (1 for calls other than `Upsert`): a cost set on their configurations is
/// replaced.
pub async fn serve(
    listener: tokio::net::TcpListener,
    protection: Protection,
    db: VectorDb,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    serve_tls(listener, protection, db, shutdown, None).await
}

/// [`serve`], over TLS when `tls` is given (accepted with rustls before tonic, so the
/// certificate can be replaced while serving: [`ReloadableTls::reload`]). Its requests carry
/// tonic's `TlsConnectInfo`, which keygate reads (feature `tonic-tls`) for the client
/// address of the IP layer and for `RequireTls`.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    protection: Protection,
    db: VectorDb,
    shutdown: impl Future<Output = ()> + Send,
    tls: Option<ReloadableTls>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let Protection {
        gate,
        ip,
        rate_limit,
        quota,
        auditor,
    } = protection;
    let quota = QuotaLayer::new(quota.cost(|h| point_cost(h.extensions())))?.with_gate(&gate);
    let usage = quota.handle();
    let rate =
        RateLimitLayer::new(rate_limit.cost(|h| point_cost(h.extensions())))?.with_gate(&gate);
    let counter = gate.clone();
    let router = tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(MAX_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(gate.audit_layer(auditor.clone()))
        .layer(tower::layer::layer_fn(move |inner| CountPoints {
            inner,
            gate: counter.clone(),
        }))
        .layer(rate)
        .layer(gate.auth_layer())
        .layer(IpAllowLayer::new(ip).with_gate(&gate))
        .layer(ScopeLayer::table(rules()?).with_gate(&gate))
        .layer(quota)
        .add_service(pb::VectorDbServer::new(db));
    let incoming = capped(listener, MAX_CONNECTIONS);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.accept(incoming), shutdown)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
    }
    usage.flush().await?;
    auditor.flush().await?;
    Ok(())
}

/// The number of points in an `Upsert` call, put in its extensions by [`CountPoints`] and
/// charged by the rate limit and the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointCount(pub u32);

fn point_cost(ext: &http::Extensions) -> u64 {
    ext.get::<PointCount>().map_or(1, |c| u64::from(c.0))
}

/// Counts the points of an `Upsert` call by a key that may write points (resolved through
/// the hub, memoized for the layers after it): reads its message (at most [`MAX_MESSAGE`];
/// RESOURCE_EXHAUSTED past it) and puts a [`PointCount`] in its extensions. Every other
/// call passes untouched, its body unread.
#[derive(Clone)]
pub struct CountPoints<S> {
    inner: S,
    gate: KeyGate,
}

type GrpcRequest = http::Request<tonic::body::Body>;

impl<S, B> tower::Service<GrpcRequest> for CountPoints<S>
where
    S: tower::Service<GrpcRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<http::Response<B>, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: GrpcRequest) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            if req.uri().path() != pb::UPSERT {
                return inner.call(req).await;
            }
            let writes = keygate::Scope::parse("points:write")
                .ok()
                .zip(gate.resolve(&mut req).await.ok())
                .is_some_and(|(s, p)| p.has_scope(&s));
            if !writes {
                return inner.call(req).await;
            }
            let (parts, body) = req.into_parts();
            use http_body_util::BodyExt;
            let bytes = match http_body_util::Limited::new(body, MAX_MESSAGE + 5)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return Ok(Status::resource_exhausted(format!(
                        "the message is over {MAX_MESSAGE} bytes or could not be read"
                    ))
                    .into_http())
                }
            };
            let n = count_points(&bytes);
            let mut req = http::Request::from_parts(
                parts,
                tonic::body::Body::new(http_body_util::Full::new(bytes)),
            );
            req.extensions_mut().insert(PointCount(n));
            inner.call(req).await
        })
    }
}

/// The number of points (field 2 of `UpsertRequest`) in a gRPC frame, read without
/// decoding them; at least 1. A frame this cannot read counts 1 (the service refuses it).
pub fn count_points(frame: &[u8]) -> u32 {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let count = || -> Option<u32> {
        let (&flag, rest) = frame.split_first()?;
        if flag != 0 || rest.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
        let msg = rest.get(4..4 + len)?;
        let (mut i, mut n) = (0usize, 0u32);
        while i < msg.len() {
            let key = varint(msg, &mut i)?;
            match key & 7 {
                0 => {
                    varint(msg, &mut i)?;
                }
                1 => i += 8,
                2 => {
                    let l = usize::try_from(varint(msg, &mut i)?).ok()?;
                    i = i.checked_add(l)?;
                    if key >> 3 == 2 {
                        n = n.saturating_add(1);
                    }
                }
                5 => i += 4,
                _ => return None,
            }
        }
        (i == msg.len()).then_some(n)
    };
    count().unwrap_or(1).max(1)
}

/// A connection holding one of the server's connection permits until it closes.
struct Permitted {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Permitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Permitted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Permitted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The server's certificate, read from two PEM files and read again by
/// [`reload`](ReloadableTls::reload) (the example calls it on SIGHUP): each TLS handshake
/// takes the settings current at that moment, so open connections are never dropped, and a
/// reload starts a fresh session cache (no session made under the old certificate is
/// resumed).
#[derive(Clone)]
pub struct ReloadableTls {
    config: std::sync::Arc<RwLock<std::sync::Arc<rustls::ServerConfig>>>,
    cert: PathBuf,
    key: PathBuf,
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ReloadableTls {
    /// Reads the certificate chain and its private key (PEM files).
    pub fn from_files(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let config = server_config(&cert, &key)?;
        Ok(ReloadableTls {
            config: std::sync::Arc::new(RwLock::new(config)),
            cert,
            key,
        })
    }

    /// Reads both files again; from the next handshake on, the new certificate is served.
    /// On an error the current one stays in use.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.cert, &self.key)?;
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// The TLS connections of `incoming`: handshakes run side by side (at most 64 at a
    /// time, 10 s each); a failed one is dropped and the next connection taken.
    fn accept(
        &self,
        incoming: impl futures_util::Stream<Item = std::io::Result<Permitted>>,
    ) -> impl futures_util::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<Permitted>>>
    {
        use futures_util::StreamExt;
        let config = self.config.clone();
        incoming
            .map(move |conn| {
                let current = config
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                async move {
                    let conn = conn.ok()?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(current);
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn))
                        .await
                        .ok()?
                        .ok()
                }
            })
            .buffer_unordered(64)
            .filter_map(|tls| async move { tls.map(Ok) })
    }
}

/// Server settings for a certificate chain and its key (PEM files), offering HTTP/2 (gRPC).
fn server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: not a PEM certificate chain ({e})", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: holds no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    // gRPC is HTTP/2: say so in the handshake (clients insist on it).
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// Connections from `listener`, at most `max` held at once: the next is accepted only when
/// one closes (meanwhile it waits in the listen backlog).
fn capped(
    listener: tokio::net::TcpListener,
    max: usize,
) -> impl futures_util::Stream<Item = std::io::Result<Permitted>> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        let next = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            Permitted {
                stream,
                _permit: permit,
            }
        });
        Some((next, (listener, permits)))
    })
}

/// Creates the two demo keys in `store`; returns (demo, reader) plaintexts.
async fn demo_keys(
    gate: &KeyGate,
    store: &MemoryStore,
) -> Result<(keygate::ApiKey, keygate::ApiKey), Box<dyn Error + Send + Sync>> {
    let now = gate.clock().now();
    let hasher = gate.verifier().hasher();
    let (demo, mut record) = KeyRecord::generate(&Prefix::default(), hasher, "demo", now)?;
    record.owner = Some("you".into());
    record.scopes = vec![
        "collections:manage".into(),
        "points:write".into(),
        "points:read".into(),
    ];
    record.resources = vec!["*".into()];
    // 2,000 points (or calls) per 20 s: a full batch of 1,000 passes at once.
    record.rate_limits = vec![RateLimitPolicy::new("demo", 2_000, Duration::from_secs(20))];
    record.quotas = vec![QuotaPolicy::new("daily", 10_000, QuotaWindow::Day)];
    store.insert(&record).await?;
    let (reader, mut record) = KeyRecord::generate(&Prefix::default(), hasher, "reader", now)?;
    record.scopes = vec!["points:read".into()];
    record.resources = vec!["*".into()];
    store.insert(&record).await?;
    Ok((demo, reader))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("client") {
        args.next();
        return client(args.collect()).await;
    }
    let (listen, audit_dir, tls_files) = parse_serve_args(args)?;
    let tls = match tls_files {
        Some((cert, key)) => Some(ReloadableTls::from_files(cert, key)?),
        None => None,
    };
    #[cfg(unix)]
    if let Some(tls) = &tls {
        // SIGHUP: read the certificate files again (open connections keep theirs).
        let tls = tls.clone();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => eprintln!("SIGHUP: certificate reloaded"),
                    Err(e) => {
                        eprintln!("SIGHUP: certificate not reloaded, the current one stays: {e}")
                    }
                }
            }
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };

    let store = MemoryStore::new();
    let gate = KeyGate::new(Verifier::new(store.clone()));
    let (demo, reader) = demo_keys(&gate, &store).await?;
    let auditor = match &audit_dir {
        // Hash-chained JSON Lines (`keygate audit verify` checks them), written by a
        // background thread through a bounded queue.
        Some(dir) => Auditor::spawn(FileSink::builder(dir).open()?)?,
        None => {
            tracing_subscriber::fmt()
                .with_target(false)
                .with_writer(std::io::stderr)
                .init();
            Auditor::tracing()
        }
    };
    let protection = Protection {
        gate,
        // Per-key lists only (keys without one may call from anywhere).
        ip: IpPolicy::new(),
        // Keys without their own limits: 2,000 points (or calls) per 20 s, so a full batch
        // of 1,000 points passes.
        rate_limit: RateLimitConfig::new().default_policies([RateLimitPolicy::new(
            "default",
            2_000,
            Duration::from_secs(20),
        )]),
        quota: QuotaConfig::new(MemoryUsageStore::new()),
        auditor: auditor.clone(),
    };

    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!(
        "keygate gRPC vector db listening on {scheme}://{addr} (service {})",
        pb::SERVICE
    );
    println!(
        "demo key (all scopes; shown once):  {}",
        demo.expose_secret()
    );
    println!(
        "reader key (points:read only):      {}",
        reader.expose_secret()
    );
    match &audit_dir {
        Some(dir) => println!("audit log: {}", dir.display()),
        None => println!("audit events: on stderr (--audit-dir DIR for a hash-chained file)"),
    }
    println!("try:  export KEYGATE_API_KEY={}", demo.expose_secret());
    println!("      cargo run --example grpc_vector_db --features full -- client create docs 3");
    serve_tls(listener, protection, VectorDb::new(), stop_signal(), tls).await?;
    let stats = auditor.shutdown().await;
    println!(
        "stopped; audit events written: {}, dropped: {}",
        stats.written, stats.dropped
    );
    Ok(())
}

/// Resolves when SIGINT (Ctrl-C) or, on Unix, SIGTERM arrives.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The PEM certificate chain and key of `--tls-cert` / `--tls-key`.
type TlsFiles = (PathBuf, PathBuf);

fn parse_serve_args(
    mut args: impl Iterator<Item = String>,
) -> Result<(SocketAddr, Option<PathBuf>, Option<TlsFiles>), String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 50051).into();
    let mut audit_dir = None;
    let (mut cert, mut key) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs an address")?;
                listen = v.parse().map_err(|_| {
                    format!("--listen: {v:?} is not an address like 127.0.0.1:50051")
                })?;
            }
            "--audit-dir" => {
                audit_dir = Some(PathBuf::from(
                    args.next().ok_or("--audit-dir needs a folder")?,
                ));
            }
            "--tls-cert" => {
                cert = Some(PathBuf::from(
                    args.next().ok_or("--tls-cert needs a PEM file")?,
                ));
            }
            "--tls-key" => {
                key = Some(PathBuf::from(
                    args.next().ok_or("--tls-key needs a PEM file")?,
                ));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    Ok((listen, audit_dir, tls))
}

const USAGE: &str = "\
usage: grpc_vector_db [--listen ADDR] [--audit-dir DIR] [--tls-cert PEM --tls-key PEM]
                                                             serve (default 127.0.0.1:50051)
       grpc_vector_db client [--connect URL] COMMAND            call it, with $KEYGATE_API_KEY
commands:
  create COLLECTION DIMENSION [cosine|dot|euclid]
  upsert COLLECTION ID V1,V2,... [NAME=VALUE ...]
  search COLLECTION V1,V2,... [LIMIT]";

fn parse_vector(text: &str) -> Result<Vec<f32>, String> {
    text.split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .map_err(|_| format!("{x:?} is not a number (vectors are V1,V2,...)"))
        })
        .collect()
}

fn parse_num<T: std::str::FromStr>(what: &str, text: Option<&String>) -> Result<T, String> {
    let text = text.ok_or_else(|| format!("missing {what}\n{USAGE}"))?;
    text.parse()
        .map_err(|_| format!("{what}: {text:?} is not a number"))
}

/// The example as its own client: one call, its answer printed.
async fn client(mut args: Vec<String>) -> Result<(), Box<dyn Error + Send + Sync>> {
    let mut dst = "http://127.0.0.1:50051".to_owned();
    if args.first().map(String::as_str) == Some("--connect") {
        if args.len() < 2 {
            return Err("--connect needs a URL like http://127.0.0.1:50051".into());
        }
        dst = args.remove(1);
        args.remove(0);
    }
    // From the environment, so the key stays out of shell history and `ps`.
    let key = std::env::var("KEYGATE_API_KEY").map_err(|_| "set KEYGATE_API_KEY to a key")?;
    let key: tonic::metadata::AsciiMetadataValue = key
        .parse()
        .map_err(|_| "KEYGATE_API_KEY is not a valid header value")?;
    fn with_key<T>(msg: T, key: &tonic::metadata::AsciiMetadataValue) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert("x-api-key", key.clone());
        req
    }
    let mut c = pb::VectorDbClient::connect(dst).await?;
    let collection = args.get(1).cloned().unwrap_or_default();
    let answer = match args.first().map(String::as_str) {
        Some("create") => {
            let distance = match args.get(3).map(String::as_str) {
                None | Some("cosine") => Distance::Cosine,
                Some("dot") => Distance::Dot,
                Some("euclid") => Distance::Euclid,
                Some(other) => return Err(format!("unknown distance {other:?}").into()),
            };
            let req = CreateCollectionRequest {
                collection,
                dimension: parse_num("DIMENSION", args.get(2))?,
                distance: distance as i32,
            };
            c.create_collection(with_key(req, &key))
                .await
                .map(|r| format!("{:?}", r.into_inner()))
        }
        Some("upsert") => {
            let mut payload = BTreeMap::new();
            for field in args.iter().skip(4) {
                let (k, v) = field
                    .split_once('=')
                    .ok_or_else(|| format!("payload fields are NAME=VALUE, not {field:?}"))?;
                payload.insert(k.to_owned(), v.to_owned());
            }
            let point = Point {
                id: parse_num("ID", args.get(2))?,
                vector: parse_vector(args.get(3).ok_or("missing the vector")?)?,
                payload,
            };
            let req = UpsertRequest {
                collection,
                points: vec![point],
            };
            c.upsert(with_key(req, &key))
                .await
                .map(|r| format!("{:?}", r.into_inner()))
        }
        Some("search") => {
            let req = SearchRequest {
                collection,
                vector: parse_vector(args.get(2).ok_or("missing the vector")?)?,
                limit: match args.get(3) {
                    Some(_) => parse_num("LIMIT", args.get(3))?,
                    None => 0,
                },
            };
            c.search(with_key(req, &key))
                .await
                .map(|r| format!("{:?}", r.into_inner()))
        }
        _ => return Err(USAGE.into()),
    };
    match answer {
        Ok(text) => println!("{text}"),
        Err(status) => {
            return Err(format!("{:?}: {}", status.code(), status.message()).into());
        }
    }
    Ok(())
}
