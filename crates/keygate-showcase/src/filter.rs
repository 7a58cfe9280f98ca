//! Qdrant payload filters: `must`, `should`, `must_not` and `min_should` over conditions
//! (`match` value / any / except / text, `range`, `is_empty`, `is_null`, `has_id`, nested
//! filters).
//!
//! Conditions this server does not implement (geo, `values_count`, `nested`, ...) are
//! refused with 400 rather than ignored: a filter that was silently dropped would return
//! more points than the client asked for.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::store::PointId;

/// The deepest nesting of filters accepted (a filter inside a condition inside a filter
/// counts two levels); deeper ones are refused with 400.
pub const MAX_DEPTH: usize = 32;
/// The most conditions one filter may hold, nested ones included.
pub const MAX_CONDITIONS: usize = 1_000;
/// The most parts (`a.b[].c` has three) of a payload key.
pub const MAX_KEY_PARTS: usize = 16;
/// The longest payload key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// The most values of one `match.any` / `match.except` list, or ids of one `has_id`.
pub const MAX_LIST: usize = 10_000;
/// The most work one request's filter may take: points examined times the filter's
/// [`weight`](Filter::weight). A filter over that for the collection is refused with 400
/// before the scan starts.
pub const WORK_BUDGET: u64 = 10_000_000;

// Parsing: every type below is read by hand from a `serde_json::Value` (itself read once,
// in linear time), dispatching on the JSON type and keys. Derived `#[serde(untagged)]`
// enums would try every alternative at every level, and derived structs also read JSON
// arrays by position, so nested arrays took time exponential in their depth; here a wrong
// shape is refused at the first level where it appears.

/// One condition or a list of them (Qdrant accepts both): a JSON array is `Many`, a JSON
/// object `One`.
#[derive(Debug, Clone)]
pub enum OneOrMany<T> {
    /// A list.
    Many(Vec<T>),
    /// One.
    One(T),
}

impl<T> OneOrMany<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(t) => std::slice::from_ref(t),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// All must match.
    pub must: Option<OneOrMany<Condition>>,
    /// At least one must match (when any is given).
    pub should: Option<OneOrMany<Condition>>,
    /// None may match.
    pub must_not: Option<OneOrMany<Condition>>,
    /// At least `min_count` of `conditions` must match.
    pub min_should: Option<MinShould>,
}

/// `min_should`.
#[derive(Debug, Clone)]
pub struct MinShould {
    /// The conditions.
    pub conditions: Vec<Condition>,
    /// How many must match.
    pub min_count: usize,
}

/// A condition.
#[derive(Debug, Clone)]
pub enum Condition {
    /// On a payload field.
    Field(FieldCondition),
    /// On the point id.
    HasId(HasId),
    /// The field is missing, null or an empty list.
    IsEmpty(IsEmpty),
    /// The field is null.
    IsNull(IsNull),
    /// A nested filter.
    Filter(Box<Filter>),
}

/// A condition on a payload field (`key` is a dotted path; `[]` after a name reads every
/// element of a list).
#[derive(Debug, Clone)]
pub struct FieldCondition {
    /// The field.
    pub key: String,
    /// Equality-like matches.
    pub matches: Option<Match>,
    /// A numeric range.
    pub range: Option<Range>,
    /// `true`: the field is empty.
    pub is_empty: Option<bool>,
    /// `true`: the field is null.
    pub is_null: Option<bool>,
}

/// `match`.
#[derive(Debug, Clone)]
pub enum Match {
    /// `{"value": "red"}`.
    Value {
        /// The value (string, integer or boolean).
        value: Value,
    },
    /// `{"any": ["red", "blue"]}`.
    Any {
        /// The values.
        any: Vec<Value>,
    },
    /// `{"except": ["red"]}`.
    Except {
        /// The values.
        except: Vec<Value>,
    },
    /// `{"text": "word"}` (substring).
    Text {
        /// The text.
        text: String,
    },
}

/// `range`.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// `<`.
    pub lt: Option<f64>,
    /// `>`.
    pub gt: Option<f64>,
    /// `>=`.
    pub gte: Option<f64>,
    /// `<=`.
    pub lte: Option<f64>,
}

/// `{"has_id": [1, 2]}`.
#[derive(Debug, Clone)]
pub struct HasId {
    /// The ids.
    pub has_id: Vec<PointId>,
}

/// `{"is_empty": {"key": "tags"}}`.
#[derive(Debug, Clone)]
pub struct IsEmpty {
    /// The field.
    pub is_empty: KeyRef,
}

/// `{"is_null": {"key": "tags"}}`.
#[derive(Debug, Clone)]
pub struct IsNull {
    /// The field.
    pub is_null: KeyRef,
}

/// `{"key": "..."}`.
#[derive(Debug, Clone)]
pub struct KeyRef {
    /// The field.
    pub key: String,
}

type Parsed<T> = Result<T, String>;

/// The JSON type of `v`, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object<'a>(v: &'a Value, what: &str) -> Parsed<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| format!("{what} must be a JSON object, not {}", kind(v)))
}

/// Refuses keys of `m` outside `allowed`.
fn only(m: &Map<String, Value>, allowed: &[&str], what: &str) -> Parsed<()> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(format!(
            "unknown field `{}` in {what} (expected one of: {})",
            k.chars().take(64).collect::<String>(),
            allowed.join(", ")
        )),
    }
}

/// `m[name]`, a missing field and `null` both reading as `None`.
fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).filter(|v| !v.is_null())
}

fn opt_bool(m: &Map<String, Value>, name: &str) -> Parsed<Option<bool>> {
    field(m, name)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| format!("`{name}` must be a boolean, not {}", kind(v)))
        })
        .transpose()
}

fn opt_number(m: &Map<String, Value>, name: &str) -> Parsed<Option<f64>> {
    field(m, name)
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| format!("range `{name}` must be a number, not {}", kind(v)))
        })
        .transpose()
}

fn string(v: Option<&Value>, what: &str) -> Parsed<String> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{what} must be a string, not {}", kind(other))),
        None => Err(format!("{what} is missing")),
    }
}

/// A payload key within [`MAX_KEY_LEN`] and [`MAX_KEY_PARTS`].
fn key(v: Option<&Value>, what: &str) -> Parsed<String> {
    let k = string(v, what)?;
    if k.len() > MAX_KEY_LEN {
        return Err(format!("{what} is longer than {MAX_KEY_LEN} bytes"));
    }
    if k.split('.').nth(MAX_KEY_PARTS).is_some() {
        return Err(format!("{what} has more than {MAX_KEY_PARTS} parts"));
    }
    Ok(k)
}

/// A list of at most [`MAX_LIST`] items.
fn list<'a>(v: &'a Value, what: &str) -> Parsed<&'a Vec<Value>> {
    let items = array(v, what)?;
    if items.len() > MAX_LIST {
        return Err(format!("{what} has more than {MAX_LIST} items"));
    }
    Ok(items)
}

fn array<'a>(v: &'a Value, what: &str) -> Parsed<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| format!("{what} must be a JSON array, not {}", kind(v)))
}

impl Filter {
    /// Reads a filter at nesting level `depth` (the outermost is 1).
    fn parse(v: &Value, depth: usize) -> Parsed<Filter> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "the filter is nested deeper than {MAX_DEPTH} levels"
            ));
        }
        let m = object(v, "a filter")?;
        only(m, &["must", "should", "must_not", "min_should"], "a filter")?;
        let list = |name: &str| {
            field(m, name)
                .map(|v| OneOrMany::parse(v, depth))
                .transpose()
        };
        Ok(Filter {
            must: list("must")?,
            should: list("should")?,
            must_not: list("must_not")?,
            min_should: field(m, "min_should")
                .map(|v| MinShould::parse(v, depth))
                .transpose()?,
        })
    }
}

impl OneOrMany<Condition> {
    /// A condition or a list of them, in a filter at level `depth`.
    fn parse(v: &Value, depth: usize) -> Parsed<Self> {
        match v {
            Value::Array(items) => items
                .iter()
                .map(|c| Condition::parse(c, depth))
                .collect::<Parsed<Vec<_>>>()
                .map(OneOrMany::Many),
            Value::Object(_) => Condition::parse(v, depth).map(OneOrMany::One),
            other => Err(format!(
                "conditions must be an object or a list of objects, not {}",
                kind(other)
            )),
        }
    }
}

impl MinShould {
    fn parse(v: &Value, depth: usize) -> Parsed<Self> {
        let m = object(v, "`min_should`")?;
        only(m, &["conditions", "min_count"], "`min_should`")?;
        let conditions = list(
            m.get("conditions").unwrap_or(&Value::Null),
            "`min_should.conditions`",
        )?
        .iter()
        .map(|c| Condition::parse(c, depth))
        .collect::<Parsed<Vec<_>>>()?;
        let min_count = m
            .get("min_count")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or("`min_should.min_count` must be an unsigned integer")?;
        Ok(MinShould {
            conditions,
            min_count,
        })
    }
}

/// Condition kinds Qdrant has and this server refuses (rather than ignore).
const UNSUPPORTED: &[&str] = &[
    "nested",
    "has_vector",
    "geo_bounding_box",
    "geo_radius",
    "geo_polygon",
    "values_count",
    "datetime_range",
];

impl Condition {
    /// A condition inside a filter at level `depth`: the object's keys say which kind.
    fn parse(v: &Value, depth: usize) -> Parsed<Self> {
        let m = object(v, "a filter condition")?;
        if let Some(k) = UNSUPPORTED.iter().find(|k| m.contains_key(**k)) {
            return Err(format!("`{k}` conditions are not supported by this server"));
        }
        if m.contains_key("key") {
            return FieldCondition::parse(m).map(Condition::Field);
        }
        if let Some(ids) = m.get("has_id") {
            only(m, &["has_id"], "a `has_id` condition")?;
            let has_id = list(ids, "`has_id`")?
                .iter()
                .map(|id| PointId::deserialize(id).map_err(|e| e.to_string()))
                .collect::<Parsed<Vec<_>>>()?;
            return Ok(Condition::HasId(HasId { has_id }));
        }
        if let Some(k) = m.get("is_empty") {
            only(m, &["is_empty"], "an `is_empty` condition")?;
            let is_empty = KeyRef::parse(k, "`is_empty`")?;
            return Ok(Condition::IsEmpty(IsEmpty { is_empty }));
        }
        if let Some(k) = m.get("is_null") {
            only(m, &["is_null"], "an `is_null` condition")?;
            let is_null = KeyRef::parse(k, "`is_null`")?;
            return Ok(Condition::IsNull(IsNull { is_null }));
        }
        Filter::parse(v, depth + 1).map(|f| Condition::Filter(Box::new(f)))
    }
}

impl KeyRef {
    fn parse(v: &Value, what: &str) -> Parsed<Self> {
        let m = object(v, what)?;
        only(m, &["key"], what)?;
        Ok(KeyRef {
            key: key(m.get("key"), &format!("{what}.key"))?,
        })
    }
}

impl FieldCondition {
    fn parse(m: &Map<String, Value>) -> Parsed<Self> {
        only(
            m,
            &["key", "match", "range", "is_empty", "is_null"],
            "a field condition",
        )?;
        Ok(FieldCondition {
            key: key(m.get("key"), "`key`")?,
            matches: field(m, "match").map(Match::parse).transpose()?,
            range: field(m, "range").map(Range::parse).transpose()?,
            is_empty: opt_bool(m, "is_empty")?,
            is_null: opt_bool(m, "is_null")?,
        })
    }
}

impl Match {
    fn parse(v: &Value) -> Parsed<Self> {
        let m = object(v, "`match`")?;
        let mut kinds = m.iter();
        let (Some((k, v)), None) = (kinds.next(), kinds.next()) else {
            return Err(
                "`match` must have exactly one of `value`, `any`, `except` or `text`".to_owned(),
            );
        };
        match k.as_str() {
            "value" => Ok(Match::Value { value: v.clone() }),
            "any" => Ok(Match::Any {
                any: list(v, "`match.any`")?.clone(),
            }),
            "except" => Ok(Match::Except {
                except: list(v, "`match.except`")?.clone(),
            }),
            "text" => Ok(Match::Text {
                text: string(Some(v), "`match.text`")?,
            }),
            other => Err(format!(
                "`match` with `{}` is not supported by this server (use `value`, `any`, `except` or `text`)",
                other.chars().take(64).collect::<String>()
            )),
        }
    }
}

impl Range {
    fn parse(v: &Value) -> Parsed<Self> {
        let m = object(v, "`range`")?;
        only(m, &["lt", "gt", "gte", "lte"], "`range`")?;
        Ok(Range {
            lt: opt_number(m, "lt")?,
            gt: opt_number(m, "gt")?,
            gte: opt_number(m, "gte")?,
            lte: opt_number(m, "lte")?,
        })
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let f = Filter::parse(&v, 1).map_err(D::Error::custom)?;
        let n = f.conditions();
        if n > MAX_CONDITIONS {
            return Err(D::Error::custom(format!(
                "the filter has {n} conditions, more than {MAX_CONDITIONS}"
            )));
        }
        Ok(f)
    }
}

fn parts(key: &str) -> u64 {
    key.split('.').count() as u64
}

impl Condition {
    /// How many conditions this is, nested ones included.
    fn conditions(&self) -> usize {
        match self {
            Condition::Filter(f) => 1 + f.conditions(),
            _ => 1,
        }
    }

    /// The work of testing one point against it (see [`Filter::weight`]).
    fn weight(&self) -> u64 {
        match self {
            Condition::Field(f) => {
                let values = match &f.matches {
                    Some(Match::Any { any }) => any.len() as u64,
                    Some(Match::Except { except }) => except.len() as u64,
                    _ => 1,
                };
                1 + parts(&f.key) + values
            }
            Condition::HasId(h) => 1 + h.has_id.len() as u64,
            Condition::IsEmpty(e) => 1 + parts(&e.is_empty.key),
            Condition::IsNull(n) => 1 + parts(&n.is_null.key),
            Condition::Filter(f) => 1 + f.weight(),
        }
    }
}

impl Filter {
    fn lists(&self) -> impl Iterator<Item = &Condition> {
        [&self.must, &self.should, &self.must_not]
            .into_iter()
            .flatten()
            .flat_map(|l| l.as_slice())
            .chain(self.min_should.iter().flat_map(|m| &m.conditions))
    }

    /// How many conditions the filter holds, nested ones included.
    pub fn conditions(&self) -> usize {
        self.lists().map(Condition::conditions).sum()
    }

    /// The work of testing one point against the filter, in steps: per condition 1, plus
    /// its key's parts, plus its list's values (`match.any`, `match.except`, `has_id`).
    /// A scan's work is the points it examines times this ([`WORK_BUDGET`]).
    pub fn weight(&self) -> u64 {
        self.lists().map(Condition::weight).sum::<u64>().max(1)
    }

    /// Refuses a scan of `points` points with this filter when it would take more than
    /// [`WORK_BUDGET`].
    pub fn check_budget(&self, points: usize) -> Result<(), String> {
        let work = (points as u64).saturating_mul(self.weight());
        if work > WORK_BUDGET {
            return Err(format!(
                "the filter asks for more work than one request may take (points examined x conditions, at most {WORK_BUDGET}): use fewer conditions or shorter lists"
            ));
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Condition::parse(&v, 1).map_err(D::Error::custom)
    }
}

impl<'de> Deserialize<'de> for OneOrMany<Condition> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        OneOrMany::parse(&v, 1).map_err(D::Error::custom)
    }
}

/// The values at a dotted path, lists flattened.
fn values_at<'a>(payload: &'a Map<String, Value>, key: &str) -> Vec<&'a Value> {
    let mut current: Vec<&Value> = Vec::new();
    for (i, part) in key.split('.').enumerate() {
        let name = part.strip_suffix("[]").unwrap_or(part);
        let mut next = Vec::new();
        if i == 0 {
            if let Some(v) = payload.get(name) {
                next.push(v);
            }
        } else {
            for v in current {
                match v {
                    Value::Object(m) => next.extend(m.get(name)),
                    Value::Array(items) => next.extend(
                        items
                            .iter()
                            .filter_map(|x| x.as_object().and_then(|m| m.get(name))),
                    ),
                    _ => {}
                }
            }
        }
        current = next;
    }
    current
        .into_iter()
        .flat_map(|v| match v {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            other => vec![other],
        })
        .collect()
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_i64().zip(y.as_i64()).map_or(x == y, |(x, y)| x == y)
        }
        _ => a == b,
    }
}

impl Range {
    fn holds(&self, x: f64) -> bool {
        self.lt.is_none_or(|b| x < b)
            && self.gt.is_none_or(|b| x > b)
            && self.gte.is_none_or(|b| x >= b)
            && self.lte.is_none_or(|b| x <= b)
    }
}

impl FieldCondition {
    fn matches(&self, payload: &Map<String, Value>) -> bool {
        let values = values_at(payload, &self.key);
        let mut ok = true;
        if let Some(m) = &self.matches {
            ok &= match m {
                Match::Value { value } => values.iter().any(|v| same(v, value)),
                Match::Any { any } => values.iter().any(|v| any.iter().any(|a| same(v, a))),
                Match::Except { except } => {
                    !values.iter().any(|v| except.iter().any(|e| same(v, e)))
                }
                Match::Text { text } => values
                    .iter()
                    .any(|v| v.as_str().is_some_and(|s| s.contains(text.as_str()))),
            };
        }
        if let Some(r) = &self.range {
            ok &= values
                .iter()
                .any(|v| v.as_f64().is_some_and(|x| r.holds(x)));
        }
        if let Some(want) = self.is_empty {
            let empty = values.iter().all(|v| v.is_null());
            ok &= empty == want;
        }
        if let Some(want) = self.is_null {
            let direct = payload_path_is_null(payload, &self.key);
            ok &= direct == want;
        }
        ok
    }
}

fn payload_path_is_null(payload: &Map<String, Value>, key: &str) -> bool {
    let mut v: Option<&Value> = None;
    for (i, part) in key.split('.').enumerate() {
        v = if i == 0 {
            payload.get(part)
        } else {
            v.and_then(Value::as_object).and_then(|m| m.get(part))
        };
    }
    matches!(v, Some(Value::Null))
}

impl Condition {
    fn matches(&self, id: PointId, payload: &Map<String, Value>) -> bool {
        match self {
            Condition::Field(f) => f.matches(payload),
            Condition::HasId(h) => h.has_id.contains(&id),
            Condition::IsEmpty(e) => values_at(payload, &e.is_empty.key)
                .iter()
                .all(|v| v.is_null()),
            Condition::IsNull(n) => payload_path_is_null(payload, &n.is_null.key),
            Condition::Filter(f) => f.matches(id, payload),
        }
    }
}

impl Filter {
    /// Whether the point passes.
    pub fn matches(&self, id: PointId, payload: &Map<String, Value>) -> bool {
        if let Some(must) = &self.must {
            if !must.as_slice().iter().all(|c| c.matches(id, payload)) {
                return false;
            }
        }
        if let Some(not) = &self.must_not {
            if not.as_slice().iter().any(|c| c.matches(id, payload)) {
                return false;
            }
        }
        if let Some(should) = &self.should {
            let list = should.as_slice();
            if !list.is_empty() && !list.iter().any(|c| c.matches(id, payload)) {
                return false;
            }
        }
        if let Some(min) = &self.min_should {
            let n = min
                .conditions
                .iter()
                .filter(|c| c.matches(id, payload))
                .count();
            if n < min.min_count {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        serde_json::from_value(v).unwrap()
    }

    fn payload(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn must_should_and_must_not() {
        let p = payload(json!({"city": "London", "tags": ["a", "b"], "n": 5, "geo": {"c": "uk"}}));
        let id = PointId::Num(1);
        assert!(
            filter(json!({"must": [{"key": "city", "match": {"value": "London"}}]}))
                .matches(id, &p)
        );
        assert!(
            !filter(json!({"must": {"key": "city", "match": {"value": "Paris"}}})).matches(id, &p)
        );
        assert!(
            filter(json!({"must": [{"key": "tags", "match": {"any": ["b", "z"]}}]}))
                .matches(id, &p)
        );
        assert!(
            filter(json!({"must": [{"key": "geo.c", "match": {"value": "uk"}}]})).matches(id, &p)
        );
        assert!(
            filter(json!({"must": [{"key": "n", "range": {"gte": 5, "lt": 6}}]})).matches(id, &p)
        );
        assert!(
            !filter(json!({"must_not": [{"key": "n", "match": {"value": 5}}]})).matches(id, &p)
        );
        assert!(
            filter(json!({"should": [{"has_id": [1]}, {"key": "x", "match": {"value": 1}}]}))
                .matches(id, &p)
        );
        assert!(filter(json!({"must": [{"is_empty": {"key": "missing"}}]})).matches(id, &p));
        assert!(filter(
            json!({"must": [{"must_not": [{"key": "city", "match": {"except": ["London"]}}]}]})
        )
        .matches(id, &p));
    }

    #[test]
    fn unsupported_conditions_are_refused() {
        for bad in [
            json!({"must": [{"key": "loc", "geo_radius": {"center": {"lon": 0, "lat": 0}, "radius": 1}}]}),
            json!({"must": [{"nested": {"key": "a", "filter": {}}}]}),
            json!({"filters": []}),
            json!({"must": [["tenant"]]}),
            json!({"must": [{"key": "n", "range": [1, 2, 3, 4]}]}),
            json!({"must": [{"key": "n", "match": {"value": 1, "any": [1]}}]}),
            json!({"must": [{"has_id": [1], "key": "n"}]}),
            json!({"min_should": {"conditions": [], "min_count": -1}}),
            json!({"must": 7}),
            json!([]),
        ] {
            assert!(
                serde_json::from_value::<Filter>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    /// `{"must": [{"must": [ ... ]}]}` with `levels` filters in all.
    fn nested(levels: usize) -> Value {
        let mut v = json!({"must": [{"key": "n", "match": {"value": 5}}]});
        for _ in 1..levels {
            v = json!({ "must": [v] });
        }
        v
    }

    #[test]
    fn nesting_is_capped() {
        let p = payload(json!({"n": 5}));
        assert!(filter(nested(MAX_DEPTH)).matches(PointId::Num(1), &p));
        let err = serde_json::from_value::<Filter>(nested(MAX_DEPTH + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested deeper than 32 levels"), "{err}");
    }

    #[test]
    fn every_accepted_shape_still_reads() {
        let p = payload(json!({"n": 5, "t": "red fox", "z": null}));
        let id = PointId::Num(3);
        for (f, want) in [
            (json!({}), true),
            (json!({"must": null, "should": []}), true),
            (json!({"must": {"has_id": [3]}}), true),
            (json!({"must": [{}]}), true),
            (
                json!({"must": [{"key": "t", "match": {"text": "fox"}}]}),
                true,
            ),
            (
                json!({"must": [{"key": "n", "range": {"gt": 5, "lte": null}}]}),
                false,
            ),
            (json!({"must": [{"is_null": {"key": "z"}}]}), true),
            (json!({"must": [{"key": "z", "is_null": true}]}), true),
            (
                json!({"min_should": {"conditions": [{"has_id": [3]}, {"has_id": [4]}], "min_count": 2}}),
                false,
            ),
            (
                json!({"should": {"must_not": {"key": "n", "match": {"value": 5}}}}),
                false,
            ),
        ] {
            assert_eq!(filter(f.clone()).matches(id, &p), want, "{f}");
        }
    }
}
