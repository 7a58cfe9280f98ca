//! The in-memory vector store behind the showcase: collections of points (id, dense vector,
//! JSON payload), exact search (cosine, dot, euclid, manhattan), payload filters, and
//! row-level security by tenant.
//!
//! Row-level security: every operation takes the caller's tenant (`None` for keys without a
//! `tenant` attribute). A point belongs to the tenant written in its payload's `tenant`
//! field. With a tenant, upserts stamp that field (whatever the client sent), and every read
//! and delete sees only the tenant's points. Ids are per tenant: an id another tenant uses
//! reads as absent and is free to take (both tenants then own a point with that id), and
//! operation ids are counted per tenant, so one tenant can neither read, change nor detect
//! another's points or writes. Without a tenant (operators, admins) everything is visible
//! (an id may then answer one point per owner) and payloads are stored as sent; such an
//! upsert writes the point of the tenant its payload names, or the untenanted one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::filter::Filter;

/// The payload field that names a point's tenant.
pub const TENANT_FIELD: &str = "tenant";
/// The largest vector dimension accepted (Qdrant's limit).
pub const MAX_DIMENSION: u64 = 65_536;
/// The longest collection name.
pub const MAX_NAME_LEN: usize = 255;

/// A point id: an unsigned integer or a UUID (Qdrant's `ExtendedPointId`). Integers sort
/// before UUIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PointId {
    /// `42`.
    Num(u64),
    /// `"550e8400-e29b-41d4-a716-446655440000"`.
    Uuid(u128),
}

impl PointId {
    /// Parses a path segment: digits are an integer id, anything else must be a UUID.
    pub fn parse(text: &str) -> Option<PointId> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse().ok().map(PointId::Num);
        }
        parse_uuid(text).map(PointId::Uuid)
    }
}

/// A UUID in its hyphenated (`8-4-4-4-12`) or simple (32 hex digits) form.
fn parse_uuid(text: &str) -> Option<u128> {
    let hex: String = match text.len() {
        36 => {
            let b = text.as_bytes();
            if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
                return None;
            }
            text.chars().filter(|c| *c != '-').collect()
        }
        32 => text.to_owned(),
        _ => return None,
    };
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointId::Num(n) => write!(f, "{n}"),
            PointId::Uuid(u) => {
                let h = format!("{u:032x}");
                write!(
                    f,
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
        }
    }
}

impl Serialize for PointId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PointId::Num(n) => s.serialize_u64(*n),
            PointId::Uuid(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for PointId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(PointId::Num(n)),
            Raw::Text(t) => parse_uuid(&t).map(PointId::Uuid).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{:?} is not a valid point id: expected an unsigned integer or a UUID",
                    t.chars().take(64).collect::<String>()
                ))
            }),
        }
    }
}

/// How vectors are compared (Qdrant's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Distance {
    /// Cosine similarity (vectors are normalized when stored); higher is closer.
    Cosine,
    /// Dot product; higher is closer.
    Dot,
    /// Euclidean distance; lower is closer.
    Euclid,
    /// Manhattan distance; lower is closer.
    Manhattan,
}

impl Distance {
    fn higher_is_closer(self) -> bool {
        matches!(self, Distance::Cosine | Distance::Dot)
    }

    fn score(self, a: &[f32], b: &[f32]) -> f32 {
        let pairs = a.iter().zip(b);
        match self {
            Distance::Cosine | Distance::Dot => pairs.map(|(x, y)| x * y).sum(),
            Distance::Euclid => pairs.map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt(),
            Distance::Manhattan => pairs.map(|(x, y)| (x - y).abs()).sum(),
        }
    }
}

/// A stored point.
#[derive(Debug, Clone)]
pub struct Point {
    /// The vector (normalized for cosine collections).
    pub vector: Vec<f32>,
    /// The payload.
    pub payload: Map<String, Value>,
    /// The operation that last wrote it.
    pub version: u64,
}

impl Point {
    fn tenant(&self) -> Option<&str> {
        self.payload.get(TENANT_FIELD).and_then(Value::as_str)
    }

    fn visible_to(&self, tenant: Option<&str>) -> bool {
        tenant.is_none_or(|t| self.tenant() == Some(t))
    }
}

/// A collection's vector parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectorParams {
    /// Dimension.
    pub size: u64,
    /// Metric.
    pub distance: Distance,
}

/// A collection: its parameters and points.
///
/// Ids are per tenant: each id holds at most one point per owner (the tenant named in the
/// point's payload, or none), so two tenants may both own id 7 and neither can tell the
/// other's ids from free ones. Operation ids are counted per owner too.
#[derive(Debug)]
pub struct Collection {
    /// Vector parameters.
    pub params: VectorParams,
    points: BTreeMap<PointId, Vec<Point>>,
    /// The last operation id of each owner.
    operations: HashMap<Option<String>, u64>,
}

impl Collection {
    /// The points `tenant` can see with ids in `range`, by id (a tenant's own; every point
    /// for `None`).
    fn visible<'a>(
        &'a self,
        tenant: Option<&'a str>,
        range: (std::ops::Bound<PointId>, std::ops::Bound<PointId>),
    ) -> impl Iterator<Item = (PointId, &'a Point)> + 'a {
        self.points.range(range).flat_map(move |(id, owners)| {
            owners
                .iter()
                .filter(move |p| p.visible_to(tenant))
                .map(move |p| (*id, p))
        })
    }

    /// Every point `tenant` can see, by id.
    fn all<'a>(
        &'a self,
        tenant: Option<&'a str>,
    ) -> impl Iterator<Item = (PointId, &'a Point)> + 'a {
        self.visible(
            tenant,
            (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
        )
    }

    /// The points with id `id` that `tenant` can see.
    fn at<'a>(
        &'a self,
        id: &PointId,
        tenant: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Point> + 'a {
        self.points
            .get(id)
            .into_iter()
            .flatten()
            .filter(move |p| p.visible_to(tenant))
    }

    /// The next operation id of `owner`.
    fn next_operation(&mut self, owner: Option<&str>) -> u64 {
        let n = self.operations.entry(owner.map(str::to_owned)).or_insert(0);
        *n += 1;
        *n
    }
}

/// A point as a read returns it.
#[derive(Debug, Clone)]
pub struct Found {
    /// Id.
    pub id: PointId,
    /// Score (searches) or 1.0 (listings).
    pub score: f32,
    /// The point.
    pub point: Point,
}

/// Why an operation failed: an HTTP status and Qdrant's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// The status to answer with.
    pub status: StatusCode,
    /// The message (`Not found: Collection `x` doesn't exist!`).
    pub message: String,
}

impl StoreError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        StoreError {
            status,
            message: message.into(),
        }
    }

    /// 500 `Service internal error: ...` (a store call that did not finish).
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Service internal error: the operation did not finish",
        )
    }

    /// 400 `Wrong input: ...`.
    pub fn wrong_input(what: impl fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, format!("Wrong input: {what}"))
    }

    /// 404 `Not found: Collection `name` doesn't exist!`.
    pub fn missing(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("Not found: Collection `{name}` doesn't exist!"),
        )
    }
}

/// What to do with each point's vector in a read.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    /// The caller's tenant.
    pub tenant: Option<&'a str>,
    /// The filter, if any.
    pub filter: Option<&'a Filter>,
}

/// Which points a delete selects.
#[derive(Debug, Clone)]
pub enum Selector {
    /// These ids.
    Ids(Vec<PointId>),
    /// Those matching this filter.
    Filter(Box<Filter>),
}

/// The store: named collections, shared by every clone.
///
/// Its methods block (they take the collection's lock and may scan every point): call them
/// off the async workers (`tokio::task::spawn_blocking`), as the handlers do.
#[derive(Debug, Clone, Default)]
pub struct VectorStore {
    collections: Arc<RwLock<BTreeMap<String, Arc<Slot>>>>,
    scans: Arc<AtomicUsize>,
}

/// A collection and its dimension, readable without the collection's lock (so checking a
/// body's size never waits for a scan).
#[derive(Debug)]
struct Slot {
    size: u64,
    collection: RwLock<Collection>,
}

impl std::ops::Deref for Slot {
    type Target = RwLock<Collection>;
    fn deref(&self) -> &RwLock<Collection> {
        &self.collection
    }
}

/// Counts a scan in [`VectorStore::scans_in_flight`] while it lives.
struct ScanGuard<'a>(&'a AtomicUsize);

impl<'a> ScanGuard<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        ScanGuard(n)
    }
}

impl Drop for ScanGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn check_budget(filter: Option<&Filter>, points: usize) -> Result<(), StoreError> {
    filter
        .map_or(Ok(()), |f| f.check_budget(points))
        .map_err(StoreError::wrong_input)
}

/// Checks a collection name: 1 to 255 characters, no `/`, `\` or control characters.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(StoreError::wrong_input(
            "collection name must be 1 to 255 characters",
        ));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(StoreError::wrong_input(
            "collection name must not contain /, \\ or control characters",
        ));
    }
    Ok(())
}

/// Checks a vector against a collection's dimension; normalizes it for cosine.
fn prepare(params: &VectorParams, mut v: Vec<f32>) -> Result<Vec<f32>, StoreError> {
    if v.len() as u64 != params.size {
        return Err(StoreError::wrong_input(format!(
            "Vector dimension error: expected dim: {}, got {}",
            params.size,
            v.len()
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::wrong_input("vectors must hold finite numbers"));
    }
    if params.distance == Distance::Cosine {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > f32::EPSILON {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
    Ok(v)
}

impl VectorStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, name: &str) -> Result<Arc<Slot>, StoreError> {
        self.collections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::missing(name))
    }

    /// Every collection name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.collections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// How many searches, scrolls, counts and filtered deletes are running (waiting for
    /// their collection's lock included).
    pub fn scans_in_flight(&self) -> usize {
        self.scans.load(Ordering::Relaxed)
    }

    /// Runs `f` while holding collection `name`'s write lock (every read and write of it
    /// waits); `false` if there is no such collection. For maintenance, and for tests that
    /// hold scans in flight.
    pub fn while_locked(&self, name: &str, f: impl FnOnce()) -> bool {
        let Ok(c) = self.get(name) else {
            return false;
        };
        let _held = c.write().unwrap_or_else(PoisonError::into_inner);
        f();
        true
    }

    /// The vector dimension of collection `name`, if it exists.
    pub fn dimension(&self, name: &str) -> Option<u64> {
        self.collections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|c| c.size)
    }

    /// Whether `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.collections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// Creates a collection; 409 if it exists.
    pub fn create(&self, name: &str, params: VectorParams) -> Result<(), StoreError> {
        check_name(name)?;
        if params.size == 0 || params.size > MAX_DIMENSION {
            return Err(StoreError::wrong_input(format!(
                "vector size must be 1 to {MAX_DIMENSION}"
            )));
        }
        let mut all = self
            .collections
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if all.contains_key(name) {
            return Err(StoreError::new(
                StatusCode::CONFLICT,
                format!("Wrong input: Collection `{name}` already exists!"),
            ));
        }
        all.insert(
            name.to_owned(),
            Arc::new(Slot {
                size: params.size,
                collection: RwLock::new(Collection {
                    params,
                    points: BTreeMap::new(),
                    operations: HashMap::new(),
                }),
            }),
        );
        Ok(())
    }

    /// Deletes a collection; `false` if there was none. A tenant may not delete a collection
    /// holding other tenants' points (403).
    pub fn delete(&self, name: &str, tenant: Option<&str>) -> Result<bool, StoreError> {
        let mut all = self
            .collections
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(c) = all.get(name) else {
            return Ok(false);
        };
        if tenant.is_some() {
            let c = c.read().unwrap_or_else(PoisonError::into_inner);
            if c.points.values().flatten().any(|p| !p.visible_to(tenant)) {
                return Err(StoreError::new(
                    StatusCode::FORBIDDEN,
                    format!("Forbidden: collection `{name}` holds points of other tenants"),
                ));
            }
        }
        all.remove(name);
        Ok(true)
    }

    /// The collection's parameters and how many points the caller can see.
    pub fn info(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<(VectorParams, usize), StoreError> {
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        let n = c.all(tenant).count();
        Ok((c.params, n))
    }

    /// Inserts or replaces points, all or none; returns the operation id.
    pub fn upsert(
        &self,
        name: &str,
        points: Vec<(PointId, Vec<f32>, Map<String, Value>)>,
        tenant: Option<&str>,
    ) -> Result<u64, StoreError> {
        let c = self.get(name)?;
        let mut c = c.write().unwrap_or_else(PoisonError::into_inner);
        let mut ready = Vec::with_capacity(points.len());
        for (id, vector, mut payload) in points {
            let vector = prepare(&c.params, vector)?;
            if let Some(t) = tenant {
                payload.insert(TENANT_FIELD.to_owned(), Value::String(t.to_owned()));
            }
            ready.push((id, vector, payload));
        }
        let version = c.next_operation(tenant);
        for (id, vector, payload) in ready {
            let point = Point {
                vector,
                payload,
                version,
            };
            let owners = c.points.entry(id).or_default();
            match owners.iter_mut().find(|p| p.tenant() == point.tenant()) {
                Some(old) => *old = point,
                None => owners.push(point),
            }
        }
        Ok(version)
    }

    /// Deletes the selected points the caller can see; returns the operation id.
    pub fn delete_points(
        &self,
        name: &str,
        selector: &Selector,
        tenant: Option<&str>,
    ) -> Result<u64, StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let mut c = c.write().unwrap_or_else(PoisonError::into_inner);
        if let Selector::Filter(f) = selector {
            check_budget(Some(f), c.points.len())?;
        }
        match selector {
            Selector::Ids(ids) => {
                for id in ids {
                    if let Some(owners) = c.points.get_mut(id) {
                        owners.retain(|p| !p.visible_to(tenant));
                        if owners.is_empty() {
                            c.points.remove(id);
                        }
                    }
                }
            }
            Selector::Filter(f) => c.points.retain(|id, owners| {
                owners.retain(|p| !(p.visible_to(tenant) && f.matches(*id, &p.payload)));
                !owners.is_empty()
            }),
        }
        Ok(c.next_operation(tenant))
    }

    /// The points with these ids the caller can see, in the order first asked (missing ids
    /// are left out, repeated ones answered once), each turned into what `pick` takes from
    /// it (so only what the caller asked for is copied).
    pub fn retrieve<T>(
        &self,
        name: &str,
        ids: &[PointId],
        tenant: Option<&str>,
        mut pick: impl FnMut(PointId, &Point) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashSet::with_capacity(ids.len());
        Ok(ids
            .iter()
            .filter(|id| seen.insert(**id))
            .flat_map(|id| c.at(id, tenant).map(|p| (*id, p)))
            .map(|(id, p)| pick(id, p))
            .collect())
    }

    /// The vector of a point the caller can see (for queries by id).
    pub fn vector_of(
        &self,
        name: &str,
        id: PointId,
        tenant: Option<&str>,
    ) -> Result<Vec<f32>, StoreError> {
        self.retrieve(name, &[id], tenant, |_, p| p.vector.clone())?
            .pop()
            .ok_or_else(|| {
                StoreError::new(
                    StatusCode::NOT_FOUND,
                    format!("Not found: No point with id {id} found"),
                )
            })
    }

    /// Exact nearest neighbours of `vector` among the points the caller can see and the
    /// filter keeps: best first, `offset` skipped, at most `limit`, only scores passing
    /// `threshold` (at least it for cosine and dot, at most it for distances).
    pub fn search(
        &self,
        name: &str,
        vector: Vec<f32>,
        read: Read<'_>,
        limit: usize,
        offset: usize,
        threshold: Option<f32>,
    ) -> Result<Vec<Found>, StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        check_budget(read.filter, c.points.len())?;
        let query = prepare(&c.params, vector)?;
        let metric = c.params.distance;
        let mut scored: Vec<(f32, PointId, &Point)> = c
            .all(read.tenant)
            .filter(|(id, p)| read.filter.is_none_or(|f| f.matches(*id, &p.payload)))
            .map(|(id, p)| (metric.score(&query, &p.vector), id, p))
            .filter(|(s, _, _)| {
                threshold.is_none_or(|t| {
                    if metric.higher_is_closer() {
                        *s >= t
                    } else {
                        *s <= t
                    }
                })
            })
            .collect();
        scored.sort_by(|a, b| {
            let order = a.0.total_cmp(&b.0);
            let order = if metric.higher_is_closer() {
                order.reverse()
            } else {
                order
            };
            order.then(a.1.cmp(&b.1))
        });
        Ok(scored
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(score, id, p)| Found {
                id,
                score,
                point: p.clone(),
            })
            .collect())
    }

    /// Points the caller can see and the filter keeps, by id from `from`, the first `skip`
    /// of them passed over (not copied): at most `limit`, and the id to continue from.
    pub fn scroll(
        &self,
        name: &str,
        read: Read<'_>,
        from: Option<PointId>,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<Found>, Option<PointId>), StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        check_budget(read.filter, c.points.len())?;
        let start = from.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Included);
        let mut page = c
            .visible(read.tenant, (start, std::ops::Bound::Unbounded))
            .filter(|(id, p)| read.filter.is_none_or(|f| f.matches(*id, &p.payload)))
            .skip(skip)
            .take(limit.saturating_add(1))
            .map(|(id, p)| Found {
                id,
                score: 1.0,
                point: p.clone(),
            })
            .collect::<Vec<_>>();
        let next = if page.len() > limit {
            page.pop().map(|f| f.id)
        } else {
            None
        };
        Ok((page, next))
    }

    /// How many points the caller can see and the filter keeps.
    pub fn count(&self, name: &str, read: Read<'_>) -> Result<usize, StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        check_budget(read.filter, c.points.len())?;
        Ok(c.all(read.tenant)
            .filter(|(id, p)| read.filter.is_none_or(|f| f.matches(*id, &p.payload)))
            .count())
    }
}

// Access for the routes of `qdrant_extra.rs` (payload writes, facets, groups, indexes),
// under the same locks and per-tenant rules as the operations above.

impl VectorStore {
    /// Runs `read` over the points of collection `name` the caller can see and the filter
    /// keeps, by id (an id may come once per owner for `None`), under its read lock.
    pub fn read_points<T>(
        &self,
        name: &str,
        read: Read<'_>,
        f: impl FnOnce(&mut dyn Iterator<Item = (PointId, &Point)>) -> T,
    ) -> Result<T, StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let c = c.read().unwrap_or_else(PoisonError::into_inner);
        check_budget(read.filter, c.points.len())?;
        let mut points = c
            .all(read.tenant)
            .filter(|(id, p)| read.filter.is_none_or(|f| f.matches(*id, &p.payload)));
        Ok(f(&mut points))
    }

    /// Runs `write` under collection `name`'s write lock (so it is ordered with every other
    /// write of it) and, when it succeeds, takes one operation id from the caller's counter,
    /// as [`VectorStore::upsert`] does; a refused write uses no id.
    pub fn write_operation<T>(
        &self,
        name: &str,
        tenant: Option<&str>,
        write: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let c = self.get(name)?;
        let mut c = c.write().unwrap_or_else(PoisonError::into_inner);
        let out = write()?;
        Ok((out, c.next_operation(tenant)))
    }

    /// Changes the payload of the selected points the caller can see, all or none; returns
    /// the operation id (one from the caller's counter).
    ///
    /// An id the caller cannot see (missing, or another tenant's) is 404 `No point with id
    /// ... found` and nothing changes, so a tenant learns nothing of other tenants' ids. With
    /// a tenant, the payload's `tenant` field is stamped back after the change. Without one
    /// (operators), every owner's point at a selected id changes, and a change that would
    /// leave an id with two points of one owner is refused (400).
    pub fn update_payloads(
        &self,
        name: &str,
        selector: &Selector,
        tenant: Option<&str>,
        change: impl Fn(&mut Map<String, Value>),
    ) -> Result<u64, StoreError> {
        let _scan = ScanGuard::new(&self.scans);
        let c = self.get(name)?;
        let mut c = c.write().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<PointId> = match selector {
            Selector::Ids(ids) => {
                let mut seen = HashSet::with_capacity(ids.len());
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if c.at(id, tenant).next().is_none() {
                        return Err(StoreError::new(
                            StatusCode::NOT_FOUND,
                            format!("Not found: No point with id {id} found"),
                        ));
                    }
                    if seen.insert(*id) {
                        out.push(*id);
                    }
                }
                out
            }
            Selector::Filter(f) => {
                check_budget(Some(f), c.points.len())?;
                let mut out: Vec<PointId> = c
                    .all(tenant)
                    .filter(|(id, p)| f.matches(*id, &p.payload))
                    .map(|(id, _)| id)
                    .collect();
                out.dedup();
                out
            }
        };
        // Every new payload is worked out and checked before any point changes.
        let mut changed: Vec<(PointId, Vec<Map<String, Value>>)> = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(owners) = c.points.get(&id) else {
                continue;
            };
            let mut payloads = Vec::with_capacity(owners.len());
            for p in owners {
                let mut payload = p.payload.clone();
                if p.visible_to(tenant) {
                    change(&mut payload);
                    if let Some(t) = tenant {
                        payload.insert(TENANT_FIELD.to_owned(), Value::String(t.to_owned()));
                    }
                }
                payloads.push(payload);
            }
            let mut owned = HashSet::with_capacity(payloads.len());
            if !payloads
                .iter()
                .all(|p| owned.insert(p.get(TENANT_FIELD).and_then(Value::as_str)))
            {
                return Err(StoreError::wrong_input(format!(
                    "the change would give point {id} two points of one tenant"
                )));
            }
            changed.push((id, payloads));
        }
        let version = c.next_operation(tenant);
        for (id, payloads) in changed {
            if let Some(owners) = c.points.get_mut(&id) {
                for (p, payload) in owners.iter_mut().zip(payloads) {
                    if p.visible_to(tenant) {
                        p.payload = payload;
                        p.version = version;
                    }
                }
            }
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print_like_qdrant() {
        let u = PointId::parse("550E8400-E29B-41D4-A716-446655440000").unwrap();
        assert_eq!(u.to_string(), "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(PointId::parse("42"), Some(PointId::Num(42)));
        assert_eq!(PointId::parse("x"), None);
        assert_eq!(PointId::parse("99999999999999999999999"), None);
    }
}
