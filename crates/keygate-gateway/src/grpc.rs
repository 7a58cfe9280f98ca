//! gRPC pass-through for Qdrant (`[grpc]` in the configuration): Qdrant's gRPC methods
//! mapped to the REST preset's scopes, and the collection a request names, read from its
//! first message.
//!
//! - Every method of `qdrant.Collections`, `qdrant.Points`, `qdrant.Snapshots` and
//!   `qdrant.Qdrant` ([`QDRANT_GRPC`]) needs the scope the equivalent REST route needs; any
//!   other method is refused (12 UNIMPLEMENTED).
//! - A method on one collection is checked against the key's grants (the method's scope on
//!   that collection) with the collection named in its first message (`collection_name`,
//!   field 1, in every Qdrant request that has one), and so are the other collections a
//!   message can reach: `lookup_from` and `with_lookup` (also inside batches and
//!   prefetches), the collection a creation copies (`init_from_collection`), and the
//!   collections and aliases of an alias change. The first message is read whole within
//!   `max_message_bytes`, then forwarded unchanged with the rest of the stream. Qdrant's
//!   methods are unary (its server reads the first message and drops the rest), but a
//!   later message of the same request is checked the same way anyway ([`Checker`]) before
//!   it is forwarded: the request is cut (and refused 7 PERMISSION_DENIED) at the first one
//!   naming a collection the key may not use.
//! - A first message that is compressed, malformed, missing, or names no collection where
//!   the method needs one is refused (3 INVALID_ARGUMENT), never forwarded.
//! - Keys with a `tenant` attribute may call only the methods that read no points (health,
//!   collection list / info / exists): the gateway scopes tenants by rewriting JSON bodies,
//!   which it does not do for protobuf messages.

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::problem::Refusal;

/// What the gateway reads from a method's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Nothing: the method names no collection (forwarded without reading).
    NoCollection,
    /// Nothing read: the method acts on every collection (full snapshots, which hold every
    /// collection), so only a key whose grant of its scope covers every collection (`*`)
    /// may call it.
    Everything,
    /// `collection_name` (field 1).
    Collection,
    /// `CreateCollection`: and `init_from_collection` (13, the collection copied).
    Create,
    /// `RecommendPoints`: and `lookup_from` (13).
    Recommend,
    /// `SearchPointGroups`: and `with_lookup` (13).
    SearchGroups,
    /// `RecommendPointGroups`: and `lookup_from` (11), `with_lookup` (15).
    RecommendGroups,
    /// `DiscoverPoints`: and `lookup_from` (11).
    Discover,
    /// `QueryPoints`: and `prefetch` (2, each with `lookup_from` 8 and nested prefetches),
    /// `lookup_from` (14).
    Query,
    /// `QueryPointGroups`: and `prefetch` (2), `lookup_from` (10), `with_lookup` (15).
    QueryGroups,
    /// `SearchBatchPoints`: and each `SearchPoints` (2).
    SearchBatch,
    /// `RecommendBatchPoints`: and each `RecommendPoints` (2).
    RecommendBatch,
    /// `DiscoverBatchPoints`: and each `DiscoverPoints` (2).
    DiscoverBatch,
    /// `QueryBatchPoints`: and each `QueryPoints` (2).
    QueryBatch,
    /// `ChangeAliases`: every collection and alias its actions name.
    Aliases,
}

/// One gRPC method.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    /// `/qdrant.Service/Method`.
    pub path: &'static str,
    /// The scope it needs (the equivalent REST route's).
    pub scope: &'static str,
    /// What is read from its first message.
    pub message: Message,
    /// Whether keys with a tenant may call it (it reads no points).
    pub tenant_keys: bool,
}

const fn m(path: &'static str, scope: &'static str, message: Message, tenant_keys: bool) -> Method {
    Method {
        path,
        scope,
        message,
        tenant_keys,
    }
}

use Message as M;

/// Qdrant's public gRPC API (`collections_service.proto`, `points_service.proto`,
/// `snapshots_service.proto`, `qdrant.proto`), with the scopes of the REST preset.
pub const QDRANT_GRPC: &[Method] = &[
    m(
        "/qdrant.Qdrant/HealthCheck",
        "service:read",
        M::NoCollection,
        true,
    ),
    // Collections.
    m(
        "/qdrant.Collections/Get",
        "collections:read",
        M::Collection,
        true,
    ),
    m(
        "/qdrant.Collections/List",
        "collections:read",
        M::NoCollection,
        true,
    ),
    m(
        "/qdrant.Collections/CollectionExists",
        "collections:read",
        M::Collection,
        true,
    ),
    m(
        "/qdrant.Collections/Create",
        "collections:manage",
        M::Create,
        false,
    ),
    m(
        "/qdrant.Collections/Update",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/Delete",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/UpdateAliases",
        "collections:manage",
        M::Aliases,
        false,
    ),
    m(
        "/qdrant.Collections/ListCollectionAliases",
        "collections:read",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/ListAliases",
        "collections:read",
        M::NoCollection,
        false,
    ),
    m(
        "/qdrant.Collections/CollectionClusterInfo",
        "cluster:read",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/UpdateCollectionClusterSetup",
        "cluster:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/CreateShardKey",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/DeleteShardKey",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Collections/ListShardKeys",
        "collections:read",
        M::Collection,
        false,
    ),
    // Payload indexes and named vectors change the collection's schema.
    m(
        "/qdrant.Points/CreateFieldIndex",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/DeleteFieldIndex",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/CreateVectorName",
        "collections:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/DeleteVectorName",
        "collections:manage",
        M::Collection,
        false,
    ),
    // Point writes.
    m(
        "/qdrant.Points/Upsert",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/Delete",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/UpdateVectors",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/DeleteVectors",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/SetPayload",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/OverwritePayload",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/DeletePayload",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/ClearPayload",
        "points:write",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/UpdateBatch",
        "points:write",
        M::Collection,
        false,
    ),
    // Point reads.
    m("/qdrant.Points/Get", "points:read", M::Collection, false),
    m("/qdrant.Points/Search", "points:read", M::Collection, false),
    m(
        "/qdrant.Points/SearchBatch",
        "points:read",
        M::SearchBatch,
        false,
    ),
    m(
        "/qdrant.Points/SearchGroups",
        "points:read",
        M::SearchGroups,
        false,
    ),
    m("/qdrant.Points/Scroll", "points:read", M::Collection, false),
    m(
        "/qdrant.Points/Recommend",
        "points:read",
        M::Recommend,
        false,
    ),
    m(
        "/qdrant.Points/RecommendBatch",
        "points:read",
        M::RecommendBatch,
        false,
    ),
    m(
        "/qdrant.Points/RecommendGroups",
        "points:read",
        M::RecommendGroups,
        false,
    ),
    m("/qdrant.Points/Discover", "points:read", M::Discover, false),
    m(
        "/qdrant.Points/DiscoverBatch",
        "points:read",
        M::DiscoverBatch,
        false,
    ),
    m("/qdrant.Points/Count", "points:read", M::Collection, false),
    m("/qdrant.Points/Query", "points:read", M::Query, false),
    m(
        "/qdrant.Points/QueryBatch",
        "points:read",
        M::QueryBatch,
        false,
    ),
    m(
        "/qdrant.Points/QueryGroups",
        "points:read",
        M::QueryGroups,
        false,
    ),
    m("/qdrant.Points/Facet", "points:read", M::Collection, false),
    m(
        "/qdrant.Points/SearchMatrixPairs",
        "points:read",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Points/SearchMatrixOffsets",
        "points:read",
        M::Collection,
        false,
    ),
    // Snapshots.
    m(
        "/qdrant.Snapshots/Create",
        "snapshots:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Snapshots/List",
        "snapshots:read",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Snapshots/Delete",
        "snapshots:manage",
        M::Collection,
        false,
    ),
    m(
        "/qdrant.Snapshots/CreateFull",
        "snapshots:manage",
        M::Everything,
        false,
    ),
    m(
        "/qdrant.Snapshots/ListFull",
        "snapshots:read",
        M::NoCollection,
        false,
    ),
    m(
        "/qdrant.Snapshots/DeleteFull",
        "snapshots:manage",
        M::Everything,
        false,
    ),
];

/// The method at `path`, if the preset lists it.
pub fn method(path: &str) -> Option<&'static Method> {
    QDRANT_GRPC.iter().find(|m| m.path == path)
}

/// Whether a request is gRPC (`content-type: application/grpc...`).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC message frame header: compressed flag (1 byte), length (4 bytes, big-endian).
const FRAME_HEADER: usize = 5;

/// Reads a request body until its first message is whole: returns everything read so far
/// (the first frame and whatever followed it in the same reads) and the message's length.
/// Refuses an empty body, a compressed or oversized first message, and a body that ends
/// (or sends trailers) before its first message does.
pub async fn read_first<B>(body: &mut B, max_message: u64) -> Result<(Bytes, usize), Refusal>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    let mut need = FRAME_HEADER;
    let mut len = None;
    loop {
        if len.is_none() && buf.len() >= FRAME_HEADER {
            match buf[0] {
                0 => {}
                1 => {
                    return Err(Refusal::bad_message(
                        "The first message is compressed; the gateway reads the collection only from uncompressed messages.",
                    ))
                }
                _ => return Err(Refusal::bad_message("The first message frame is malformed.")),
            }
            let n = (&buf[1..FRAME_HEADER]).get_u32();
            if u64::from(n) > max_message {
                return Err(Refusal::body_too_large(max_message));
            }
            let n = usize::try_from(n).map_err(|_| Refusal::body_too_large(max_message))?;
            len = Some(n);
            need = FRAME_HEADER + n;
        }
        if let Some(n) = len {
            if buf.len() >= need {
                return Ok((buf.freeze(), n));
            }
        }
        match body.frame().await {
            None => {
                return Err(Refusal::bad_message(if buf.is_empty() {
                    "The request has no message."
                } else {
                    "The request ended inside its first message."
                }))
            }
            Some(Err(_)) => {
                return Err(Refusal::bad_message("The request body could not be read."))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(_) => {
                    return Err(Refusal::bad_message(
                        "The request ended inside its first message.",
                    ))
                }
            },
        }
    }
}

/// Checks the messages of a request after its first one, as they stream: each is held until
/// it is whole (within the message cap), its collections checked with `allowed`, then
/// released to be forwarded.
pub struct Checker {
    kind: Message,
    max_message: u64,
    allowed: Box<dyn Fn(&str) -> bool + Send + Sync>,
    buf: BytesMut,
    verdict: Verdict,
}

/// Where a [`Checker`] leaves its refusal, for the proxy to answer with once the upstream
/// call has failed.
pub type Verdict = std::sync::Arc<std::sync::Mutex<Option<Refusal>>>;

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("kind", &self.kind)
            .field("held", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker of `kind` messages, each at most `max_message` bytes, whose collections
    /// must satisfy `allowed`.
    pub fn new(
        kind: Message,
        max_message: u64,
        allowed: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Checker {
            kind,
            max_message,
            allowed: Box::new(allowed),
            buf: BytesMut::new(),
            verdict: Verdict::default(),
        }
    }

    /// Where its refusal is left.
    pub fn verdict(&self) -> Verdict {
        self.verdict.clone()
    }

    /// Leaves `r` as the verdict (the first one stays) and returns it.
    pub fn refuse(&self, r: Refusal) -> Refusal {
        if let Ok(mut v) = self.verdict.lock() {
            v.get_or_insert_with(|| r.clone());
        }
        r
    }

    /// Takes the next bytes of the request: returns the bytes of the messages completed and
    /// allowed so far (`None`: nothing whole yet), or the refusal of the first message that
    /// may not pass.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Bytes>, Refusal> {
        self.check(data).map_err(|r| self.refuse(r))
    }

    fn check(&mut self, data: &[u8]) -> Result<Option<Bytes>, Refusal> {
        self.buf.extend_from_slice(data);
        let mut ready = 0;
        loop {
            let rest = &self.buf[ready..];
            if rest.len() < FRAME_HEADER {
                break;
            }
            if rest[0] != 0 {
                return Err(Refusal::bad_message(
                    "A later message is compressed or malformed; the gateway checks only uncompressed messages.",
                ));
            }
            let n = (&rest[1..FRAME_HEADER]).get_u32();
            if u64::from(n) > self.max_message {
                return Err(Refusal::body_too_large(self.max_message));
            }
            let end = FRAME_HEADER + n as usize;
            let Some(msg) = rest.get(FRAME_HEADER..end) else {
                break;
            };
            let names = collections(self.kind, msg)?;
            if let Some(name) = names.refused(&self.allowed) {
                return Err(Refusal::collection_refused(name));
            }
            ready += end;
        }
        Ok((ready > 0).then(|| self.buf.split_to(ready).freeze()))
    }

    /// Whether part of a message is held (the request may not end there).
    pub fn holds_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

// The fields of Qdrant's request messages that name collections (field numbers from
// Qdrant's proto files); every other field is skipped by prost.

#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    collection_name: String,
}

/// `CreateCollection`.
#[derive(Clone, PartialEq, prost::Message)]
struct Create {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(string, optional, tag = "13")]
    init_from_collection: Option<String>,
}

/// `LookupLocation`.
#[derive(Clone, PartialEq, prost::Message)]
struct Lookup {
    #[prost(string, tag = "1")]
    collection_name: String,
}

/// `WithLookup`.
#[derive(Clone, PartialEq, prost::Message)]
struct WithLookup {
    #[prost(string, tag = "1")]
    collection: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Recommend {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, optional, tag = "13")]
    lookup_from: Option<Lookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SearchGroups {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, optional, tag = "13")]
    with_lookup: Option<WithLookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RecommendGroups {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, optional, tag = "11")]
    lookup_from: Option<Lookup>,
    #[prost(message, optional, tag = "15")]
    with_lookup: Option<WithLookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Discover {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, optional, tag = "11")]
    lookup_from: Option<Lookup>,
}

/// `PrefetchQuery`.
#[derive(Clone, PartialEq, prost::Message)]
struct Prefetch {
    #[prost(message, repeated, tag = "1")]
    prefetch: Vec<Prefetch>,
    #[prost(message, optional, tag = "8")]
    lookup_from: Option<Lookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Query {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    prefetch: Vec<Prefetch>,
    #[prost(message, optional, tag = "14")]
    lookup_from: Option<Lookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryGroups {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    prefetch: Vec<Prefetch>,
    #[prost(message, optional, tag = "10")]
    lookup_from: Option<Lookup>,
    #[prost(message, optional, tag = "15")]
    with_lookup: Option<WithLookup>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SearchBatch {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    items: Vec<Named>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RecommendBatch {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    items: Vec<Recommend>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DiscoverBatch {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    items: Vec<Discover>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct QueryBatch {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "2")]
    items: Vec<Query>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChangeAliases {
    #[prost(message, repeated, tag = "1")]
    actions: Vec<AliasOperation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AliasOperation {
    #[prost(oneof = "AliasAction", tags = "1, 2, 3")]
    action: Option<AliasAction>,
}

/// One alias action: the `oneof` of gRPC's `AliasOperations`, and one entry of the REST
/// body's `actions` (`{"create_alias": {...}}`, `{"rename_alias": ...}`,
/// `{"delete_alias": ...}`).
#[derive(Clone, PartialEq, prost::Oneof, serde::Deserialize)]
pub(crate) enum AliasAction {
    #[prost(message, tag = "1")]
    #[serde(rename = "create_alias")]
    Create(CreateAlias),
    #[prost(message, tag = "2")]
    #[serde(rename = "rename_alias")]
    Rename(RenameAlias),
    #[prost(message, tag = "3")]
    #[serde(rename = "delete_alias")]
    Delete(DeleteAlias),
}

#[derive(Clone, PartialEq, prost::Message, serde::Deserialize)]
pub(crate) struct CreateAlias {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(string, tag = "2")]
    alias_name: String,
}

#[derive(Clone, PartialEq, prost::Message, serde::Deserialize)]
pub(crate) struct RenameAlias {
    #[prost(string, tag = "1")]
    old_alias_name: String,
    #[prost(string, tag = "2")]
    new_alias_name: String,
}

#[derive(Clone, PartialEq, prost::Message, serde::Deserialize)]
pub(crate) struct DeleteAlias {
    #[prost(string, tag = "1")]
    alias_name: String,
}

/// The collections (and aliases) a message names, the request's own collection first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names(pub Vec<String>);

impl Names {
    fn lookup(&mut self, l: Option<Lookup>) {
        if let Some(l) = l {
            self.0.push(l.collection_name);
        }
    }

    fn with_lookup(&mut self, w: Option<WithLookup>) {
        if let Some(w) = w {
            self.0.push(w.collection);
        }
    }

    fn prefetches(&mut self, list: Vec<Prefetch>) {
        for p in list {
            self.lookup(p.lookup_from);
            self.prefetches(p.prefetch);
        }
    }

    /// An inner request of a batch: its own collection, when it names one.
    fn inner(&mut self, name: String) {
        if !name.is_empty() {
            self.0.push(name);
        }
    }

    fn recommend(&mut self, r: Recommend) {
        self.inner(r.collection_name);
        self.lookup(r.lookup_from);
    }

    fn discover(&mut self, d: Discover) {
        self.inner(d.collection_name);
        self.lookup(d.lookup_from);
    }

    fn query(&mut self, q: Query) {
        self.inner(q.collection_name);
        self.prefetches(q.prefetch);
        self.lookup(q.lookup_from);
    }

    /// Adds a collection (or alias) name.
    pub fn push(&mut self, name: impl Into<String>) {
        self.0.push(name.into());
    }

    /// The first name `allowed` refuses, if any.
    pub fn refused(&self, allowed: impl Fn(&str) -> bool) -> Option<&str> {
        self.0.iter().map(String::as_str).find(|n| !allowed(n))
    }
}

/// Every collection and alias the alias `actions` name (gRPC `ChangeAliases` and the REST
/// body of `POST /collections/aliases` alike): a creation's collection and alias, a
/// renaming's old and new alias, a deletion's alias. `bad` makes the refusal of an action
/// of an unknown kind (`None`), of no action at all, and of an empty name.
pub(crate) fn alias_names(
    actions: impl IntoIterator<Item = Option<AliasAction>>,
    bad: fn(String) -> Refusal,
) -> Result<Names, Refusal> {
    let mut names = Names::default();
    for action in actions {
        match action {
            Some(AliasAction::Create(a)) => {
                names.push(a.collection_name);
                names.push(a.alias_name);
            }
            Some(AliasAction::Rename(a)) => {
                names.push(a.old_alias_name);
                names.push(a.new_alias_name);
            }
            Some(AliasAction::Delete(a)) => names.push(a.alias_name),
            None => {
                return Err(bad(
                    "An alias action of a kind the gateway does not know cannot be checked.".into(),
                ))
            }
        }
    }
    if names.0.is_empty() {
        return Err(bad("The alias change names no alias.".into()));
    }
    if names.0.iter().any(String::is_empty) {
        return Err(bad("An alias action names no collection or alias.".into()));
    }
    Ok(names)
}

fn decode<T: prost::Message + Default>(msg: &[u8]) -> Result<T, Refusal> {
    T::decode(msg).map_err(|_| {
        Refusal::bad_message("The first message is not a valid request of this method.")
    })
}

/// Every collection (and alias) `msg`, the first message of a `kind` request, names: the
/// request's own collection first. Refuses a message that does not decode, and one without
/// a collection where the method needs one.
pub fn collections(kind: Message, msg: &[u8]) -> Result<Names, Refusal> {
    let mut names = Names::default();
    let own = match kind {
        M::NoCollection | M::Everything => return Ok(names),
        M::Collection => decode::<Named>(msg)?.collection_name,
        M::Create => {
            let c = decode::<Create>(msg)?;
            if let Some(from) = c.init_from_collection {
                names.push(from);
            }
            c.collection_name
        }
        M::Recommend => {
            let r = decode::<Recommend>(msg)?;
            names.lookup(r.lookup_from);
            r.collection_name
        }
        M::SearchGroups => {
            let r = decode::<SearchGroups>(msg)?;
            names.with_lookup(r.with_lookup);
            r.collection_name
        }
        M::RecommendGroups => {
            let r = decode::<RecommendGroups>(msg)?;
            names.lookup(r.lookup_from);
            names.with_lookup(r.with_lookup);
            r.collection_name
        }
        M::Discover => {
            let r = decode::<Discover>(msg)?;
            names.lookup(r.lookup_from);
            r.collection_name
        }
        M::Query => {
            let r = decode::<Query>(msg)?;
            names.prefetches(r.prefetch);
            names.lookup(r.lookup_from);
            r.collection_name
        }
        M::QueryGroups => {
            let r = decode::<QueryGroups>(msg)?;
            names.prefetches(r.prefetch);
            names.lookup(r.lookup_from);
            names.with_lookup(r.with_lookup);
            r.collection_name
        }
        M::SearchBatch => {
            let b = decode::<SearchBatch>(msg)?;
            b.items
                .into_iter()
                .for_each(|i| names.inner(i.collection_name));
            b.collection_name
        }
        M::RecommendBatch => {
            let b = decode::<RecommendBatch>(msg)?;
            b.items.into_iter().for_each(|i| names.recommend(i));
            b.collection_name
        }
        M::DiscoverBatch => {
            let b = decode::<DiscoverBatch>(msg)?;
            b.items.into_iter().for_each(|i| names.discover(i));
            b.collection_name
        }
        M::QueryBatch => {
            let b = decode::<QueryBatch>(msg)?;
            b.items.into_iter().for_each(|i| names.query(i));
            b.collection_name
        }
        M::Aliases => {
            let c = decode::<ChangeAliases>(msg)?;
            return alias_names(
                c.actions.into_iter().map(|a| a.action),
                Refusal::bad_message,
            );
        }
    };
    if own.is_empty() {
        return Err(Refusal::bad_message("The request names no collection."));
    }
    names.0.insert(0, own);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn frame(msg: &[u8], flag: u8) -> Bytes {
        let mut b = vec![flag];
        b.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_be_bytes());
        b.extend_from_slice(msg);
        Bytes::from(b)
    }

    fn named(name: &str) -> Vec<u8> {
        Named {
            collection_name: name.into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_table_has_no_duplicates_and_every_path_is_a_method_path() {
        for (i, a) in QDRANT_GRPC.iter().enumerate() {
            assert!(a.path.starts_with("/qdrant."), "{}", a.path);
            assert_eq!(a.path.matches('/').count(), 2, "{}", a.path);
            assert!(
                QDRANT_GRPC[i + 1..].iter().all(|b| b.path != a.path),
                "{} listed twice",
                a.path
            );
            // Tenant keys only on methods that read no points.
            if a.tenant_keys {
                assert!(!a.path.starts_with("/qdrant.Points/"), "{}", a.path);
            }
        }
        assert_eq!(
            method("/qdrant.Points/Upsert").map(|m| m.scope),
            Some("points:write")
        );
        assert_eq!(
            method("/qdrant.Points/Search").map(|m| m.scope),
            Some("points:read")
        );
        assert!(method("/qdrant.Points/Explode").is_none());
        assert!(method("/qdrant.PointsInternal/Upsert").is_none());
    }

    #[test]
    fn the_collection_is_field_one() {
        let names = collections(M::Collection, &named("docs")).expect("decodes");
        assert_eq!(names.0, vec!["docs".to_owned()]);
        // Unknown fields are skipped.
        let mut msg = named("docs");
        msg.extend_from_slice(&[0x10, 0x05]); // field 2, varint 5
        assert_eq!(
            collections(M::Collection, &msg).expect("decodes").0,
            vec!["docs"]
        );
        assert!(collections(M::NoCollection, b"\xff\xff")
            .expect("unread")
            .0
            .is_empty());
    }

    #[test]
    fn missing_or_malformed_collections_are_refused() {
        for msg in [
            Vec::new(),
            named(""),
            vec![0x0a, 0x05, b'a'],
            vec![0x0a, 0x02, 0xff, 0xfe],
        ] {
            let e = collections(M::Collection, &msg).expect_err("refused");
            assert_eq!(e.code, "bad_message", "{msg:?}");
            assert_eq!(e.grpc_status(), 3);
        }
        // Field 1 with another wire type (a varint).
        assert!(collections(M::Collection, &[0x08, 0x01]).is_err());
    }

    #[test]
    fn lookups_batches_and_prefetches_are_collected() {
        let q = Query {
            collection_name: "docs".into(),
            prefetch: vec![Prefetch {
                prefetch: vec![Prefetch {
                    prefetch: vec![],
                    lookup_from: Some(Lookup {
                        collection_name: "deep".into(),
                    }),
                }],
                lookup_from: None,
            }],
            lookup_from: Some(Lookup {
                collection_name: "other".into(),
            }),
        };
        let names = collections(M::Query, &q.encode_to_vec()).expect("decodes");
        assert_eq!(names.0, vec!["docs", "deep", "other"]);
        let c = Create {
            collection_name: "docs".into(),
            init_from_collection: Some("other".into()),
        };
        let names = collections(M::Create, &c.encode_to_vec()).expect("decodes");
        assert_eq!(names.0, vec!["docs", "other"]);
        let names = collections(M::Create, &named("docs")).expect("decodes");
        assert_eq!(names.0, vec!["docs"]);
        let b = QueryBatch {
            collection_name: "docs".into(),
            items: vec![q],
        };
        let names = collections(M::QueryBatch, &b.encode_to_vec()).expect("decodes");
        assert_eq!(names.0, vec!["docs", "docs", "deep", "other"]);
        let g = RecommendGroups {
            collection_name: "docs".into(),
            lookup_from: None,
            with_lookup: Some(WithLookup {
                collection: "joined".into(),
            }),
        };
        let names = collections(M::RecommendGroups, &g.encode_to_vec()).expect("decodes");
        assert_eq!(names.0, vec!["docs", "joined"]);
        let s = SearchBatch {
            collection_name: "docs".into(),
            items: vec![Named {
                collection_name: String::new(),
            }],
        };
        assert_eq!(
            collections(M::SearchBatch, &s.encode_to_vec())
                .expect("decodes")
                .0,
            vec!["docs"]
        );
    }

    #[test]
    fn alias_changes_name_collections_and_aliases() {
        let c = ChangeAliases {
            actions: vec![
                AliasOperation {
                    action: Some(AliasAction::Create(CreateAlias {
                        collection_name: "private".into(),
                        alias_name: "mine".into(),
                    })),
                },
                AliasOperation {
                    action: Some(AliasAction::Delete(DeleteAlias {
                        alias_name: "old".into(),
                    })),
                },
            ],
        };
        let names = collections(M::Aliases, &c.encode_to_vec()).expect("decodes");
        assert_eq!(names.0, vec!["private", "mine", "old"]);
        assert!(collections(M::Aliases, &[]).is_err());
        let unknown = ChangeAliases {
            actions: vec![AliasOperation { action: None }],
        };
        assert!(collections(M::Aliases, &unknown.encode_to_vec()).is_err());
    }

    #[tokio::test]
    async fn the_first_frame_is_read_within_the_cap() {
        let msg = named("docs");
        let whole = frame(&msg, 0);
        // Split over three data frames, followed by a second message.
        let mut parts = vec![whole.slice(..2), whole.slice(2..7), whole.slice(7..)];
        parts.push(frame(&named("next"), 0));
        let mut stream = body_of(parts);
        let (buf, n) = read_first(&mut stream, 1024).await.expect("read");
        assert_eq!(n, msg.len());
        assert_eq!(&buf[5..5 + n], &msg[..]);
        // Compressed, oversized, empty, cut short.
        let e = read_first(&mut body_of(vec![frame(&msg, 1)]), 1024)
            .await
            .expect_err("compressed");
        assert_eq!(e.code, "bad_message");
        let e = read_first(&mut body_of(vec![frame(&msg, 0)]), 3)
            .await
            .expect_err("too large");
        assert_eq!(e.grpc_status(), 8);
        let e = read_first(&mut body_of(vec![]), 1024)
            .await
            .expect_err("empty");
        assert_eq!(e.code, "bad_message");
        let e = read_first(&mut body_of(vec![whole.slice(..6)]), 1024)
            .await
            .expect_err("short");
        assert_eq!(e.code, "bad_message");
    }

    #[test]
    fn later_messages_are_held_until_whole_and_checked() {
        let mut c = Checker::new(M::Collection, 1024, |n| n == "docs");
        let a = frame(&named("docs"), 0);
        // Partial: nothing released.
        assert_eq!(c.feed(&a[..3]).expect("fed"), None);
        assert!(c.holds_partial());
        // The rest of it and half of the next one: the first released whole.
        let b = frame(&named("docs"), 0);
        let mut more = a[3..].to_vec();
        more.extend_from_slice(&b[..4]);
        assert_eq!(c.feed(&more).expect("fed"), Some(a.clone()));
        assert_eq!(c.feed(&b[4..]).expect("fed"), Some(b));
        assert!(!c.holds_partial());
        // A message for another collection is refused, whole or not yet released.
        let e = c.feed(&frame(&named("private"), 0)).expect_err("refused");
        assert_eq!(e.grpc_status(), 7);
        assert_eq!(c.verdict().lock().expect("lock").as_ref(), Some(&e));
        let mut c = Checker::new(M::Collection, 1024, |_| true);
        assert_eq!(
            c.feed(&frame(&named("x"), 1))
                .expect_err("compressed")
                .grpc_status(),
            3
        );
        let mut c = Checker::new(M::Collection, 4, |_| true);
        assert_eq!(
            c.feed(&frame(&named("docs"), 0))
                .expect_err("large")
                .grpc_status(),
            8
        );
    }

    /// A body of `chunks`, one data frame each.
    fn body_of(chunks: Vec<Bytes>) -> Chunks {
        Chunks(chunks.into_iter().collect())
    }

    struct Chunks(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
        }
    }
}
