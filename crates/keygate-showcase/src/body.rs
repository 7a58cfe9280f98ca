//! Bounded request bodies: what a route may be sent, what a body costs, and the upsert parser
//! that stops at the collection's dimension.
//!
//! # The order of work for a request with a body
//! 1. [`admit`] (before every limit, reading only the head): the body's size must be known
//!    up front (`Content-Length`; otherwise 411) and within what the route can use
//!    ([`route_cap`]; otherwise 413). Nothing of the body is read. It records the size in a
//!    [`BodySize`] extension.
//! 2. The bytes rate limit (a second `RateLimitLayer` with the same policies, cost
//!    [`byte_units`]: one unit per started [`BYTE_UNIT`] past the first, so bodies under 64
//!    KiB are free) refuses a key that sends more bytes than its limit, still before the
//!    body is read.
//! 3. [`read_upsert`]: for an upsert by a key that may make it, reads the body (into one
//!    buffer of the announced size) and parses it with [`parse_upsert`], vectors straight
//!    into `Vec<f32>` and no further than the collection's dimension. It puts the points in
//!    a [`ParsedUpsert`] and their count in a [`PointCount`].
//! 4. The points rate limit (cost: [`PointCount`], else 1) and, after auth and scope, the
//!    quota (cost: points plus byte units).
//!
//! Once a body was read its bytes stay charged, even when a later layer refuses the
//! request: rate limits count every request (they never refund).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header::CONTENT_LENGTH, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Body as _;
use keygate::KeyGate;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::qdrant;
use super::store::{PointId, VectorStore, MAX_DIMENSION};
use super::PointCount;

/// The largest request body on any route (Qdrant's default limit, 32 MiB).
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// The most points one upsert may write.
pub const MAX_BATCH_POINTS: usize = 10_000;
/// The bytes one vector element may take in an upsert's JSON (`-1.2345678e-38, `).
pub const MAX_NUMBER_BYTES: usize = 24;
/// What one point may take besides its vector (id, field names, a small payload).
pub const POINT_OVERHEAD: usize = 256;
/// What an upsert may take besides its points.
pub const UPSERT_BASE: usize = 1024 * 1024;
/// The largest body of a search, query, scroll, count, retrieve or delete (ids, filters),
/// besides a query vector.
pub const READ_BODY: usize = 1024 * 1024;
/// The largest body of any other route (collection settings, the admin API).
pub const SMALL_BODY: usize = 256 * 1024;
/// One unit of the bytes rate limit: a body costs one unit per started 64 KiB past the
/// first (a body under 64 KiB is free).
pub const BYTE_UNIT: u64 = 64 * 1024;

/// A body's announced size, set by [`admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySize(pub u64);

/// What a body costs against the bytes rate limit and the quota: one unit per started
/// [`BYTE_UNIT`] past the first.
pub fn byte_units(bytes: u64) -> u64 {
    bytes / BYTE_UNIT
}

/// The largest upsert body into a collection of dimension `dim`: every point of a full
/// batch with every element at its longest, plus room for ids and small payloads.
pub fn upsert_cap(dim: usize) -> usize {
    MAX_BATCH_POINTS
        .saturating_mul(dim.saturating_mul(MAX_NUMBER_BYTES) + POINT_OVERHEAD)
        .saturating_add(UPSERT_BASE)
        .min(MAX_BODY)
}

/// The collection segment of `/collections/{c}/...`, percent-decoded, and the rest of the
/// path's segments.
fn collection_route(path: &str) -> Option<(String, Vec<&str>)> {
    let mut parts = path.split('/');
    if parts.next() != Some("") || parts.next() != Some("collections") {
        return None;
    }
    let raw = parts.next().filter(|c| !c.is_empty())?;
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    Some((name, parts.collect()))
}

/// The largest body `method path` can use. Upserts: [`upsert_cap`] of the collection's
/// dimension ([`SMALL_BODY`] when it does not exist: the handler answers 404); searches and
/// queries: [`READ_BODY`] plus the longest query vector of the collection; other reads and
/// deletes: [`READ_BODY`]; everything else: [`SMALL_BODY`].
pub fn route_cap(method: &Method, path: &str, vectors: &VectorStore) -> usize {
    let Some((name, rest)) = collection_route(path) else {
        return SMALL_BODY;
    };
    let dim = || {
        vectors
            .dimension(&name)
            .map(|d| usize::try_from(d).unwrap_or(usize::MAX))
    };
    match (method, rest.as_slice()) {
        (&Method::PUT, ["points"]) => dim().map_or(SMALL_BODY, upsert_cap),
        (&Method::POST, ["points", "search" | "query"]) => dim().map_or(READ_BODY, |d| {
            READ_BODY.saturating_add(d.saturating_mul(MAX_NUMBER_BYTES))
        }),
        (&Method::POST, ["points", ..]) => READ_BODY,
        _ => SMALL_BODY,
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    qdrant::error(status, message, std::time::Instant::now())
}

/// Admits a request's body by its head alone: its size must be known (`Content-Length`, or
/// no body at all) and at most [`route_cap`]. 411 or 413 otherwise, before a byte of the
/// body is read. Records the size as [`BodySize`].
pub async fn admit(State(vectors): State<VectorStore>, mut req: Request, next: Next) -> Response {
    let size = match req.body().size_hint().exact() {
        Some(n) => n,
        None if req.headers().contains_key(CONTENT_LENGTH) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Bad request: invalid Content-Length",
            );
        }
        None => {
            return refuse(
                StatusCode::LENGTH_REQUIRED,
                "Length required: send the body with a Content-Length",
            );
        }
    };
    if size > 0 {
        let cap = route_cap(req.method(), req.uri().path(), &vectors);
        if size > cap as u64 {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "Payload too large: this route takes at most {cap} bytes, the body has {size}"
                ),
            );
        }
    }
    req.extensions_mut().insert(BodySize(size));
    next.run(req).await
}

/// The points of an upsert, parsed by [`read_upsert`] and taken by the handler.
#[derive(Clone)]
pub struct ParsedUpsert(Arc<Mutex<Option<Parsed>>>);

/// The points of an upsert, or why its body was refused (the message of a 400).
pub type Parsed = Result<Vec<NewPoint>, String>;

/// A point as read: id, vector, payload if any.
type PointIn = (PointId, Vec<f32>, Option<Map<String, Value>>);

impl ParsedUpsert {
    /// The parsed points, or why the body was refused (once; `None` afterwards).
    pub fn take(&self) -> Option<Parsed> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl fmt::Debug for ParsedUpsert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ParsedUpsert")
    }
}

/// A point to write: id, vector, payload.
pub type NewPoint = (PointId, Vec<f32>, Map<String, Value>);

/// Reads and parses the body of an upsert by a key that may make it (see the module docs);
/// every other request passes untouched. The body is read into one buffer of its announced
/// size; a body that does not parse costs one point and is refused by the handler with 400.
pub async fn read_upsert(
    State((gate, vectors)): State<(KeyGate, VectorStore)>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(raw) = super::upserted_collection(req.method(), req.uri().path()).map(str::to_owned)
    else {
        return next.run(req).await;
    };
    match gate.resolve(&mut req).await {
        Ok(p) if super::may_upsert(&p, &raw) => {}
        _ => return next.run(req).await,
    }
    let Some(BodySize(size)) = req.extensions().get::<BodySize>().copied() else {
        return next.run(req).await;
    };
    let name = collection_route(req.uri().path()).map(|(n, _)| n);
    let dim = name.as_deref().and_then(|n| vectors.dimension(n));
    let Some(dim) = dim else {
        // No such collection: the handler answers 404 without reading the body.
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let bytes = match read_exact(body, size).await {
        Ok(b) => b,
        Err(()) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Bad request: the body could not be read",
            )
        }
    };
    let parsed = parse_upsert(&bytes, usize::try_from(dim).unwrap_or(usize::MAX));
    drop(bytes);
    let n = parsed.as_ref().map_or(1, |p| p.len().max(1));
    let mut req = Request::from_parts(parts, Body::empty());
    req.extensions_mut().insert(PointCount(n));
    req.extensions_mut()
        .insert(ParsedUpsert(Arc::new(Mutex::new(Some(parsed)))));
    next.run(req).await
}

/// Reads `body` (announced as `size` bytes) into one buffer of that size.
async fn read_exact(body: Body, size: u64) -> Result<Bytes, ()> {
    use http_body_util::BodyExt;
    let size = usize::try_from(size).map_err(|_| ())?;
    let mut buf = Vec::with_capacity(size);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > size {
                return Err(());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

// ---------------------------------------------------------------------------------------
// The upsert parser
// ---------------------------------------------------------------------------------------

/// Parses an upsert body (`{"points": [...]}` or `{"batch": {...}}`, Qdrant's
/// `PointInsertOperations`) for a collection of dimension `dim`: each vector is read
/// straight into a `Vec<f32>` of `dim` elements and refused at the first element past it,
/// and at most [`MAX_BATCH_POINTS`] points are read. The error is the message for a 400.
pub fn parse_upsert(bytes: &[u8], dim: usize) -> Result<Vec<NewPoint>, String> {
    let dim = dim.min(MAX_DIMENSION as usize);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = UpsertSeed { dim }
        .deserialize(&mut de)
        .and_then(|u| de.end().map(|()| u));
    let u = parsed.map_err(|e| {
        let msg: String = e.to_string().chars().take(300).collect();
        format!("Format error in JSON body: {msg}")
    })?;
    u.into_points()
}

struct Upsert {
    points: Option<Vec<PointIn>>,
    batch: Option<BatchIn>,
    filtered: bool,
}

struct BatchIn {
    ids: Vec<PointId>,
    vectors: Vec<Vec<f32>>,
    payloads: Option<Vec<Option<Map<String, Value>>>>,
}

fn wrong(what: impl fmt::Display) -> String {
    format!("Wrong input: {what}")
}

impl Upsert {
    fn into_points(self) -> Result<Vec<NewPoint>, String> {
        if self.filtered {
            return Err(wrong("update_filter is not supported by this server"));
        }
        match (self.points, self.batch) {
            (Some(points), None) => Ok(points
                .into_iter()
                .map(|(id, v, p)| (id, v, p.unwrap_or_default()))
                .collect()),
            (None, Some(b)) => {
                let n = b.ids.len();
                let payloads = b.payloads.unwrap_or_default();
                if b.vectors.len() != n || (!payloads.is_empty() && payloads.len() != n) {
                    return Err(wrong(
                        "batch: ids, vectors and payloads must have the same length",
                    ));
                }
                let mut payloads = payloads.into_iter();
                Ok(b.ids
                    .into_iter()
                    .zip(b.vectors)
                    .map(|(id, v)| (id, v, payloads.next().flatten().unwrap_or_default()))
                    .collect())
            }
            (Some(_), Some(_)) => Err(wrong("give either `points` or `batch`, not both")),
            (None, None) => Err(wrong("the body must have `points` or `batch`")),
        }
    }
}

struct UpsertSeed {
    dim: usize,
}

impl<'de> DeserializeSeed<'de> for UpsertSeed {
    type Value = Upsert;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Upsert, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for UpsertSeed {
    type Value = Upsert;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with `points` or `batch`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Upsert, A::Error> {
        let mut u = Upsert {
            points: None,
            batch: None,
            filtered: false,
        };
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "points" if u.points.is_none() => {
                    u.points = Some(m.next_value_seed(Many(PointSeed { dim: self.dim }))?)
                }
                "batch" if u.batch.is_none() => {
                    u.batch = Some(m.next_value_seed(BatchSeed { dim: self.dim })?)
                }
                "update_filter" => u.filtered = !m.next_value::<Value>()?.is_null(),
                "points" | "batch" => {
                    return Err(de::Error::custom(format!("duplicate field `{k}`")))
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(u)
    }
}

/// A list of at most [`MAX_BATCH_POINTS`] items read with the seed `S`.
struct Many<S>(S);

impl<'de, S: DeserializeSeed<'de> + Copy> DeserializeSeed<'de> for Many<S> {
    type Value = Vec<S::Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S: DeserializeSeed<'de> + Copy> Visitor<'de> for Many<S> {
    type Value = Vec<S::Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {MAX_BATCH_POINTS} items")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(s.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = s.next_element_seed(self.0)? {
            if out.len() == MAX_BATCH_POINTS {
                return Err(de::Error::custom(format!(
                    "an upsert writes at most {MAX_BATCH_POINTS} points"
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// A dense vector of exactly `dim` numbers (or `{"": [...]}`, Qdrant's name for the
/// unnamed vector), refused at the first element past `dim`.
#[derive(Clone, Copy)]
struct VectorSeed {
    dim: usize,
}

impl<'de> DeserializeSeed<'de> for VectorSeed {
    type Value = Vec<f32>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<f32>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for VectorSeed {
    type Value = Vec<f32>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {} numbers", self.dim)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Vec<f32>, A::Error> {
        let mut v = Vec::with_capacity(self.dim);
        while let Some(x) = s.next_element::<f32>()? {
            if v.len() == self.dim {
                return Err(de::Error::custom(format!(
                    "Vector dimension error: expected dim: {}, got more",
                    self.dim
                )));
            }
            v.push(x);
        }
        Ok(v)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vec<f32>, A::Error> {
        let mut out = None;
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            if !k.is_empty() || out.is_some() {
                return Err(de::Error::custom(
                    "named, sparse and multi-vectors are not supported by this server: send a list of numbers",
                ));
            }
            out = Some(m.next_value_seed(self)?);
        }
        out.ok_or_else(|| de::Error::custom("the vector must be a list of numbers"))
    }
}

#[derive(Clone, Copy)]
struct PointSeed {
    dim: usize,
}

impl<'de> DeserializeSeed<'de> for PointSeed {
    type Value = PointIn;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PointSeed {
    type Value = PointIn;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a point: {\"id\": ..., \"vector\": [...], \"payload\": {...}}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let (mut id, mut vector, mut payload) = (None, None, None);
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "id" if id.is_none() => id = Some(m.next_value::<PointId>()?),
                "vector" if vector.is_none() => {
                    vector = Some(m.next_value_seed(VectorSeed { dim: self.dim })?)
                }
                "payload" if payload.is_none() => {
                    payload = Some(m.next_value::<Option<Map<String, Value>>>()?)
                }
                "id" | "vector" | "payload" => {
                    return Err(de::Error::custom(format!("duplicate field `{k}`")))
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((
            id.ok_or_else(|| de::Error::missing_field("id"))?,
            vector.ok_or_else(|| de::Error::missing_field("vector"))?,
            payload.flatten(),
        ))
    }
}

#[derive(Clone, Copy)]
struct BatchSeed {
    dim: usize,
}

impl<'de> DeserializeSeed<'de> for BatchSeed {
    type Value = BatchIn;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<BatchIn, D::Error> {
        d.deserialize_map(self)
    }
}

/// A point id, read as [`PointId`] reads it (for [`Many`]).
#[derive(Clone, Copy)]
struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = PointId;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<PointId, D::Error> {
        PointId::deserialize(d)
    }
}

/// An optional payload (for [`Many`]).
#[derive(Clone, Copy)]
struct PayloadSeed;

impl<'de> DeserializeSeed<'de> for PayloadSeed {
    type Value = Option<Map<String, Value>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Option::<Map<String, Value>>::deserialize(d)
    }
}

impl<'de> Visitor<'de> for BatchSeed {
    type Value = BatchIn;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a batch: {\"ids\": [...], \"vectors\": [[...]], \"payloads\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<BatchIn, A::Error> {
        let (mut ids, mut vectors, mut payloads) = (None, None, None);
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "ids" if ids.is_none() => ids = Some(m.next_value_seed(Many(IdSeed))?),
                "vectors" if vectors.is_none() => {
                    vectors = Some(m.next_value_seed(Many(VectorSeed { dim: self.dim }))?)
                }
                "payloads" if payloads.is_none() => {
                    payloads = Some(m.next_value_seed(OptionalMany(PayloadSeed))?)
                }
                "ids" | "vectors" | "payloads" => {
                    return Err(de::Error::custom(format!("duplicate field `{k}`")))
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(BatchIn {
            ids: ids.ok_or_else(|| de::Error::missing_field("ids"))?,
            vectors: vectors.ok_or_else(|| de::Error::missing_field("vectors"))?,
            payloads: payloads.flatten(),
        })
    }
}

/// `null` or a [`Many`] list.
struct OptionalMany<S>(S);

impl<'de, S: DeserializeSeed<'de> + Copy> DeserializeSeed<'de> for OptionalMany<S> {
    type Value = Option<Vec<S::Value>>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de> + Copy> Visitor<'de> for OptionalMany<S> {
    type Value = Option<Vec<S::Value>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a list")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Many(self.0).deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_stop_at_the_dimension() {
        let long = format!(
            "{{\"points\": [{{\"id\": 1, \"vector\": [{}0]}}]}}",
            "0,".repeat(100)
        );
        let err = parse_upsert(long.as_bytes(), 4).unwrap_err();
        assert!(err.contains("expected dim: 4, got more"), "{err}");
        let ok = parse_upsert(
            br#"{"batch": {"ids": [1, 2], "vectors": [[1,2], {"": [3,4]}]}}"#,
            2,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].1, vec![3.0, 4.0]);
    }
}
