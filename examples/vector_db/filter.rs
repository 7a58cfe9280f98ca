//! Qdrant payload filters: `must`, `should`, `must_not` and `min_should` over conditions
//! (`match` value / any / except / text, `range`, `is_empty`, `is_null`, `has_id`, nested
//! filters).
//!
//! Conditions this server does not implement (geo, `values_count`, `nested`, ...) are
//! refused with 400 rather than ignored: a filter that was silently dropped would return
//! more points than the client asked for.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::store::PointId;

/// One condition or a list of them (Qdrant accepts both).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A list (tried first: a derived struct would also read a list, by position).
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// All must match.
    #[serde(default)]
    pub must: Option<OneOrMany<Condition>>,
    /// At least one must match (when any is given).
    #[serde(default)]
    pub should: Option<OneOrMany<Condition>>,
    /// None may match.
    #[serde(default)]
    pub must_not: Option<OneOrMany<Condition>>,
    /// At least `min_count` of `conditions` must match.
    #[serde(default)]
    pub min_should: Option<MinShould>,
}

/// `min_should`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinShould {
    /// The conditions.
    pub conditions: Vec<Condition>,
    /// How many must match.
    pub min_count: usize,
}

/// A condition.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldCondition {
    /// The field.
    pub key: String,
    /// Equality-like matches.
    #[serde(default, rename = "match")]
    pub matches: Option<Match>,
    /// A numeric range.
    #[serde(default)]
    pub range: Option<Range>,
    /// `true`: the field is empty.
    #[serde(default)]
    pub is_empty: Option<bool>,
    /// `true`: the field is null.
    #[serde(default)]
    pub is_null: Option<bool>,
}

/// `match`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    /// `<`.
    #[serde(default)]
    pub lt: Option<f64>,
    /// `>`.
    #[serde(default)]
    pub gt: Option<f64>,
    /// `>=`.
    #[serde(default)]
    pub gte: Option<f64>,
    /// `<=`.
    #[serde(default)]
    pub lte: Option<f64>,
}

/// `{"has_id": [1, 2]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HasId {
    /// The ids.
    pub has_id: Vec<PointId>,
}

/// `{"is_empty": {"key": "tags"}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsEmpty {
    /// The field.
    pub is_empty: KeyRef,
}

/// `{"is_null": {"key": "tags"}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsNull {
    /// The field.
    pub is_null: KeyRef,
}

/// `{"key": "..."}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// The field.
    pub key: String,
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
        ] {
            assert!(
                serde_json::from_value::<Filter>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
