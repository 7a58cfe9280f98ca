//! Tenant row-level security for Qdrant: the rewrites of [`QdrantOp`].
//!
//! A point belongs to the tenant named in its payload's tenant field
//! ([`TenantConfig::payload_key`](crate::config::TenantConfig::payload_key)). For a key
//! with a `tenant` attribute:
//! - every filter (and every `prefetch`'s) gets `{"key": FIELD, "match": {"value": TENANT}}`
//!   among its `must` conditions, so reads, counts, facets and deletes only ever reach the
//!   tenant's points;
//! - point ids used as examples (`recommend`, `discover`, `query` by id) must be the
//!   tenant's ([`Check::Owned`]); `lookup_from` and `with_lookup` (another collection) are
//!   refused;
//! - upserts get the tenant stamped on every payload, and an id another owner holds is
//!   refused ([`Check::NotElsewhere`]): Qdrant ids are global to a collection, so writing
//!   it would overwrite the other tenant's point;
//! - selectors by id become filters (`has_id` and the tenant condition), so a delete never
//!   reaches another tenant's point; payload writes may not change or delete the tenant
//!   field.
//!
//! A body that does not have the expected shape is refused, never forwarded as it is.

use serde_json::{json, Map, Value};

use crate::preset::QdrantOp;
use crate::problem::Refusal;

/// A check the gateway makes with the upstream before forwarding a rewritten request.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Every one of these ids must be a point of the tenant (else `404 point_not_found`).
    Owned(Vec<Value>),
    /// None of these ids may be a point of another owner (else `409 tenant_conflict`).
    NotElsewhere(Vec<Value>),
}

/// What a tenant key's request becomes: the body to forward, and the checks to make first.
#[derive(Debug, Clone, PartialEq)]
pub struct Scoped {
    /// The rewritten body.
    pub body: Value,
    /// Checks against the upstream, in order.
    pub checks: Vec<Check>,
}

/// The tenant condition.
pub fn condition(field: &str, tenant: &str) -> Value {
    json!({"key": field, "match": {"value": tenant}})
}

fn unscopable(detail: impl Into<String>) -> Refusal {
    Refusal::tenant_unscopable(detail)
}

fn object(body: &mut Value) -> Result<&mut Map<String, Value>, Refusal> {
    if body.is_null() {
        *body = Value::Object(Map::new());
    }
    body.as_object_mut()
        .ok_or_else(|| Refusal::bad_body("the body must be a JSON object"))
}

/// Adds `cond` to the `must` conditions of the filter in `obj[field]` (creating it).
fn add_must(obj: &mut Map<String, Value>, field: &str, cond: &Value) -> Result<(), Refusal> {
    let filter = obj
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()));
    if filter.is_null() {
        *filter = Value::Object(Map::new());
    }
    let filter = filter
        .as_object_mut()
        .ok_or_else(|| Refusal::bad_body(format!("`{field}` must be a filter object")))?;
    let must = filter.entry("must").or_insert(Value::Null);
    match must {
        Value::Null => *must = Value::Array(vec![cond.clone()]),
        Value::Array(list) => list.push(cond.clone()),
        Value::Object(_) => {
            let one = must.take();
            *must = Value::Array(vec![one, cond.clone()]);
        }
        _ => return Err(Refusal::bad_body("`must` must be a condition or a list")),
    }
    Ok(())
}

/// An id where a vector may stand (a `VectorInput`): an unsigned integer or a string
/// (UUID). Vectors (arrays, objects) are not ids.
fn example_id(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Number(n) if n.is_u64() => out.push(v.clone()),
        Value::String(_) => out.push(v.clone()),
        _ => {}
    }
}

fn example_list(v: Option<&Value>, out: &mut Vec<Value>) {
    match v {
        Some(Value::Array(items)) => items.iter().for_each(|i| example_id(i, out)),
        Some(other) => example_id(other, out),
        None => {}
    }
}

/// `context` pairs: one `{positive, negative}` or a list of them.
fn context_pairs(v: Option<&Value>, out: &mut Vec<Value>) {
    let pair = |p: &Value, out: &mut Vec<Value>| {
        example_list(p.get("positive"), out);
        example_list(p.get("negative"), out);
    };
    match v {
        Some(Value::Array(items)) => items.iter().for_each(|p| pair(p, out)),
        Some(p @ Value::Object(_)) => pair(p, out),
        _ => {}
    }
}

/// The ids a `query` (Query API) uses as examples.
fn query_ids(q: &Value, out: &mut Vec<Value>) {
    match q {
        Value::Object(o) => {
            example_list(o.get("nearest"), out);
            if let Some(r) = o.get("recommend") {
                example_list(r.get("positive"), out);
                example_list(r.get("negative"), out);
            }
            if let Some(d) = o.get("discover") {
                example_list(d.get("target"), out);
                context_pairs(d.get("context"), out);
            }
            context_pairs(o.get("context"), out);
        }
        other => example_id(other, out),
    }
}

fn refuse_other_collections(obj: &Map<String, Value>) -> Result<(), Refusal> {
    for field in ["lookup_from", "with_lookup"] {
        if obj.get(field).is_some_and(|v| !v.is_null()) {
            return Err(unscopable(format!(
                "`{field}` reads another collection, which cannot be scoped to a tenant"
            )));
        }
    }
    Ok(())
}

/// One read request (search, query, recommend, discover, scroll, count, facet, groups,
/// matrix) scoped in place; example ids collected.
fn scope_read(
    req: &mut Value,
    cond: &Value,
    ids: &mut Vec<Value>,
    depth: usize,
) -> Result<(), Refusal> {
    if depth > 16 {
        return Err(Refusal::bad_body("prefetches are nested too deep"));
    }
    let obj = object(req)?;
    refuse_other_collections(obj)?;
    add_must(obj, "filter", cond)?;
    if let Some(q) = obj.get("query") {
        query_ids(q, ids);
    }
    // Recommend and discover APIs.
    example_list(obj.get("positive"), ids);
    example_list(obj.get("negative"), ids);
    example_list(obj.get("target"), ids);
    context_pairs(obj.get("context"), ids);
    match obj.get_mut("prefetch") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for p in list {
                scope_read(p, cond, ids, depth + 1)?;
            }
        }
        Some(p @ Value::Object(_)) => scope_read(p, cond, ids, depth + 1)?,
        Some(_) => return Err(Refusal::bad_body("`prefetch` must be an object or a list")),
    }
    Ok(())
}

/// A points selector (`points` ids, or `filter`) turned into a tenant-scoped filter.
fn scope_selector(obj: &mut Map<String, Value>, cond: &Value) -> Result<(), Refusal> {
    match obj.remove("points") {
        Some(Value::Array(ids)) => {
            if obj.get("filter").is_some_and(|f| !f.is_null()) {
                return Err(Refusal::bad_body("give `points` or `filter`, not both"));
            }
            obj.insert(
                "filter".into(),
                json!({"must": [{"has_id": ids}, cond.clone()]}),
            );
            Ok(())
        }
        Some(Value::Null) | None => {
            if obj.get("filter").is_none_or(Value::is_null) {
                return Err(Refusal::bad_body("a selector needs `points` or `filter`"));
            }
            add_must(obj, "filter", cond)
        }
        Some(_) => Err(Refusal::bad_body("`points` must be a list of ids")),
    }
}

/// Whether a payload key (`a.b`, `a[]`) is the tenant field or inside it.
fn touches(key: &str, field: &str) -> bool {
    key == field
        || key
            .strip_prefix(field)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

fn stamp(payload: &mut Value, field: &str, tenant: &str) -> Result<(), Refusal> {
    if payload.is_null() {
        *payload = Value::Object(Map::new());
    }
    let p = payload
        .as_object_mut()
        .ok_or_else(|| Refusal::bad_body("a payload must be a JSON object"))?;
    p.insert(field.to_owned(), Value::String(tenant.to_owned()));
    Ok(())
}

fn scope_upsert(
    obj: &mut Map<String, Value>,
    field: &str,
    tenant: &str,
) -> Result<Vec<Value>, Refusal> {
    let mut ids = Vec::new();
    if let Some(points) = obj.get_mut("points") {
        let points = points
            .as_array_mut()
            .ok_or_else(|| Refusal::bad_body("`points` must be a list"))?;
        for point in points {
            let point = point
                .as_object_mut()
                .ok_or_else(|| Refusal::bad_body("a point must be a JSON object"))?;
            ids.push(point.get("id").cloned().unwrap_or(Value::Null));
            stamp(point.entry("payload").or_insert(Value::Null), field, tenant)?;
        }
    } else if let Some(batch) = obj.get_mut("batch") {
        let batch = batch
            .as_object_mut()
            .ok_or_else(|| Refusal::bad_body("`batch` must be a JSON object"))?;
        let batch_ids = batch
            .get("ids")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| Refusal::bad_body("`batch.ids` must be a list"))?;
        let payloads = batch.entry("payloads").or_insert(Value::Null);
        if payloads.is_null() {
            *payloads = Value::Array(vec![Value::Null; batch_ids.len()]);
        }
        let payloads = payloads
            .as_array_mut()
            .ok_or_else(|| Refusal::bad_body("`batch.payloads` must be a list"))?;
        if payloads.len() != batch_ids.len() {
            return Err(Refusal::bad_body(
                "`batch.payloads` must have one payload per id",
            ));
        }
        for p in payloads {
            stamp(p, field, tenant)?;
        }
        ids = batch_ids;
    } else {
        return Err(Refusal::bad_body("an upsert needs `points` or `batch`"));
    }
    Ok(ids)
}

/// Scopes `body` (the request's JSON; `Null` for an empty body) of operation `op` to
/// `tenant`, whose points carry `field`. [`QdrantOp::GetPoint`] and
/// [`QdrantOp::Retrieve`] are not rewritten here (the proxy asks the upstream which ids are
/// the tenant's).
pub fn scope(op: QdrantOp, mut body: Value, field: &str, tenant: &str) -> Result<Scoped, Refusal> {
    let cond = condition(field, tenant);
    let mut checks = Vec::new();
    match op {
        QdrantOp::Read => {
            let mut ids = Vec::new();
            scope_read(&mut body, &cond, &mut ids, 0)?;
            if !ids.is_empty() {
                checks.push(Check::Owned(ids));
            }
        }
        QdrantOp::ReadBatch => {
            let obj = object(&mut body)?;
            let searches = obj
                .get_mut("searches")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| Refusal::bad_body("a batch needs a `searches` list"))?;
            let mut ids = Vec::new();
            for s in searches {
                scope_read(s, &cond, &mut ids, 0)?;
            }
            if !ids.is_empty() {
                checks.push(Check::Owned(ids));
            }
        }
        QdrantOp::Upsert => {
            let ids = scope_upsert(object(&mut body)?, field, tenant)?;
            checks.push(Check::NotElsewhere(ids));
        }
        QdrantOp::Select => scope_selector(object(&mut body)?, &cond)?,
        QdrantOp::SetPayload => {
            let obj = object(&mut body)?;
            match obj.get("key") {
                Some(Value::String(k)) if touches(k, field) => {
                    return Err(unscopable("the tenant field cannot be changed"))
                }
                Some(Value::String(_)) => {}
                Some(Value::Null) | None => {
                    let payload = obj
                        .get_mut("payload")
                        .ok_or_else(|| Refusal::bad_body("`payload` is missing"))?;
                    if let Some(v) = payload.get(field) {
                        if v.as_str() != Some(tenant) {
                            return Err(unscopable("the tenant field cannot be changed"));
                        }
                    }
                    stamp(payload, field, tenant)?;
                }
                Some(_) => return Err(Refusal::bad_body("`key` must be a string")),
            }
            scope_selector(obj, &cond)?;
        }
        QdrantOp::DeletePayload => {
            let obj = object(&mut body)?;
            let keys = obj
                .get("keys")
                .and_then(Value::as_array)
                .ok_or_else(|| Refusal::bad_body("`keys` must be a list"))?;
            if keys
                .iter()
                .any(|k| k.as_str().is_none_or(|k| touches(k, field)))
            {
                return Err(unscopable("the tenant field cannot be deleted"));
            }
            scope_selector(obj, &cond)?;
        }
        QdrantOp::UpdateVectors => {
            let obj = object(&mut body)?;
            let points = obj
                .get("points")
                .and_then(Value::as_array)
                .ok_or_else(|| Refusal::bad_body("`points` must be a list"))?;
            let ids = points
                .iter()
                .map(|p| p.get("id").cloned().unwrap_or(Value::Null))
                .collect();
            checks.push(Check::Owned(ids));
        }
        QdrantOp::GetPoint | QdrantOp::Retrieve => {}
    }
    Ok(Scoped { body, checks })
}

/// An id compared as Qdrant compares them: an integer by its digits, a UUID in any case,
/// with or without hyphens.
pub fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => format!("u{}", s.to_ascii_lowercase().replace('-', "")),
        other => format!("n{other}"),
    }
}

/// Ids without repeats (by [`id_key`]), in first-seen order.
pub fn distinct(ids: &[Value]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter(|v| seen.insert(id_key(v)))
        .cloned()
        .collect()
}

/// The count request asking how many of `ids` are the tenant's.
pub fn owned_count(ids: &[Value], field: &str, tenant: &str) -> Value {
    json!({"filter": {"must": [{"has_id": ids}, condition(field, tenant)]}, "exact": true})
}

/// The count request asking how many of `ids` belong to another owner.
pub fn elsewhere_count(ids: &[Value], field: &str, tenant: &str) -> Value {
    json!({"filter": {"must": [{"has_id": ids}], "must_not": [condition(field, tenant)]}, "exact": true})
}

/// The scroll request listing which of `ids` are the tenant's.
pub fn owned_scroll(ids: &[Value], field: &str, tenant: &str) -> Value {
    json!({
        "filter": {"must": [{"has_id": ids}, condition(field, tenant)]},
        "limit": ids.len().max(1),
        "with_payload": false,
        "with_vector": false
    })
}

/// A point id from a path segment: digits are an integer, anything else a string.
pub fn path_id(segment: &str) -> Value {
    match segment.parse::<u64>() {
        Ok(n) => Value::from(n),
        Err(_) => Value::String(segment.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn must(v: &Value) -> &Vec<Value> {
        v["filter"]["must"].as_array().expect("must list")
    }

    #[test]
    fn a_search_without_filter_gets_one() {
        let s = scope(
            QdrantOp::Read,
            json!({"vector": [0.1, 0.2], "limit": 3}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert_eq!(
            s.body["filter"],
            json!({"must": [condition("tenant", "acme")]})
        );
        assert!(s.checks.is_empty());
        assert_eq!(s.body["vector"], json!([0.1, 0.2]));
    }

    #[test]
    fn existing_filters_keep_their_conditions() {
        let body = json!({"filter": {"must": {"key": "color", "match": {"value": "red"}},
                                     "should": [{"key": "a", "match": {"value": 1}}]}});
        let s = scope(QdrantOp::Read, body, "tenant", "acme").expect("scoped");
        let m = must(&s.body);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["key"], "color");
        assert_eq!(m[1], condition("tenant", "acme"));
        assert_eq!(s.body["filter"]["should"][0]["key"], "a");
        // A filter trying to name another tenant still has the caller's condition (both
        // must hold: nothing matches).
        let s = scope(
            QdrantOp::Read,
            json!({"filter": {"should": [{"key": "tenant", "match": {"value": "other"}}]}}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert_eq!(must(&s.body), &vec![condition("tenant", "acme")]);
    }

    #[test]
    fn an_empty_body_is_scoped_too() {
        let s = scope(QdrantOp::Read, Value::Null, "t", "acme").expect("scoped");
        assert_eq!(
            s.body,
            json!({"filter": {"must": [condition("t", "acme")]}})
        );
    }

    #[test]
    fn prefetches_and_batches_are_scoped_and_example_ids_checked() {
        let body = json!({
            "prefetch": [{"query": [0.1], "prefetch": {"query": 7}}],
            "query": {"recommend": {"positive": [1, "5c56c793-69f3-4fbf-87e6-c4bf54c28c26"], "negative": [[0.3]]}}
        });
        let s = scope(QdrantOp::Read, body, "tenant", "a").expect("scoped");
        assert_eq!(must(&s.body).len(), 1);
        assert_eq!(must(&s.body["prefetch"][0]).len(), 1);
        assert_eq!(must(&s.body["prefetch"][0]["prefetch"]).len(), 1);
        assert_eq!(
            s.checks,
            vec![Check::Owned(vec![
                json!(1),
                json!("5c56c793-69f3-4fbf-87e6-c4bf54c28c26"),
                json!(7)
            ])]
        );
        let batch = json!({"searches": [{"vector": [1.0]}, {"positive": [3], "filter": null}]});
        let s = scope(QdrantOp::ReadBatch, batch, "tenant", "a").expect("scoped");
        assert_eq!(must(&s.body["searches"][0]).len(), 1);
        assert_eq!(must(&s.body["searches"][1]).len(), 1);
        assert_eq!(s.checks, vec![Check::Owned(vec![json!(3)])]);
        let discover = json!({"target": 4, "context": [{"positive": 5, "negative": 6}]});
        let s = scope(QdrantOp::Read, discover, "tenant", "a").expect("scoped");
        assert_eq!(
            s.checks,
            vec![Check::Owned(vec![json!(4), json!(5), json!(6)])]
        );
    }

    #[test]
    fn reads_of_other_collections_and_odd_shapes_are_refused() {
        for body in [
            json!({"query": 1, "lookup_from": {"collection": "other"}}),
            json!({"group_by": "doc", "with_lookup": "other"}),
        ] {
            let e = scope(QdrantOp::Read, body, "t", "a").expect_err("refused");
            assert_eq!(e.code, "tenant_unscopable");
        }
        for body in [
            json!([1, 2]),
            json!({"filter": "all"}),
            json!({"filter": {"must": 3}}),
        ] {
            let e = scope(QdrantOp::Read, body, "t", "a").expect_err("refused");
            assert_eq!(e.status, 400, "{e:?}");
        }
        assert!(scope(QdrantOp::ReadBatch, json!({}), "t", "a").is_err());
    }

    #[test]
    fn upserts_are_stamped_and_their_ids_checked() {
        let body = json!({"points": [
            {"id": 1, "vector": [1.0], "payload": {"tenant": "other", "x": 1}},
            {"id": 2, "vector": [1.0]}
        ]});
        let s = scope(QdrantOp::Upsert, body, "tenant", "acme").expect("scoped");
        assert_eq!(
            s.body["points"][0]["payload"],
            json!({"tenant": "acme", "x": 1})
        );
        assert_eq!(s.body["points"][1]["payload"], json!({"tenant": "acme"}));
        assert_eq!(
            s.checks,
            vec![Check::NotElsewhere(vec![json!(1), json!(2)])]
        );
        let batch = json!({"batch": {"ids": [3, 4], "vectors": [[1.0], [2.0]]}});
        let s = scope(QdrantOp::Upsert, batch, "tenant", "acme").expect("scoped");
        assert_eq!(
            s.body["batch"]["payloads"],
            json!([{"tenant": "acme"}, {"tenant": "acme"}])
        );
        let short = json!({"batch": {"ids": [3, 4], "vectors": [[1.0], [2.0]], "payloads": [{}]}});
        assert!(scope(QdrantOp::Upsert, short, "tenant", "acme").is_err());
        assert!(scope(
            QdrantOp::Upsert,
            json!({"points": [{"id": 1, "payload": 3}]}),
            "tenant",
            "a"
        )
        .is_err());
        assert!(scope(QdrantOp::Upsert, json!({}), "tenant", "a").is_err());
    }

    #[test]
    fn selectors_become_scoped_filters() {
        let s = scope(QdrantOp::Select, json!({"points": [1, 2]}), "tenant", "a").expect("scoped");
        assert_eq!(
            s.body,
            json!({"filter": {"must": [{"has_id": [1, 2]}, condition("tenant", "a")]}})
        );
        let s = scope(
            QdrantOp::Select,
            json!({"filter": {"must": []}}),
            "tenant",
            "a",
        )
        .expect("scoped");
        assert_eq!(must(&s.body), &vec![condition("tenant", "a")]);
        assert!(scope(QdrantOp::Select, json!({}), "tenant", "a").is_err());
        assert!(scope(
            QdrantOp::Select,
            json!({"points": [1], "filter": {}}),
            "tenant",
            "a"
        )
        .is_err());
    }

    #[test]
    fn the_tenant_field_cannot_be_changed_or_deleted() {
        let s = scope(
            QdrantOp::SetPayload,
            json!({"payload": {"color": "red"}, "points": [1]}),
            "tenant",
            "a",
        )
        .expect("scoped");
        assert_eq!(s.body["payload"], json!({"color": "red", "tenant": "a"}));
        assert_eq!(s.body["filter"]["must"][0], json!({"has_id": [1]}));
        for body in [
            json!({"payload": {"tenant": "b"}, "points": [1]}),
            json!({"payload": {"x": 1}, "key": "tenant.sub", "points": [1]}),
        ] {
            let e = scope(QdrantOp::SetPayload, body, "tenant", "a").expect_err("refused");
            assert_eq!(e.code, "tenant_unscopable");
        }
        let e = scope(
            QdrantOp::DeletePayload,
            json!({"keys": ["x", "tenant"], "filter": {}}),
            "tenant",
            "a",
        )
        .expect_err("refused");
        assert_eq!(e.code, "tenant_unscopable");
        let s = scope(
            QdrantOp::DeletePayload,
            json!({"keys": ["tenants"], "points": [1]}),
            "tenant",
            "a",
        )
        .expect("another field");
        assert_eq!(s.body["keys"], json!(["tenants"]));
    }

    #[test]
    fn vector_updates_need_owned_ids() {
        let s = scope(
            QdrantOp::UpdateVectors,
            json!({"points": [{"id": 9, "vector": [1.0]}]}),
            "tenant",
            "a",
        )
        .expect("scoped");
        assert_eq!(s.checks, vec![Check::Owned(vec![json!(9)])]);
    }

    #[test]
    fn helpers() {
        assert_eq!(
            distinct(&[json!(1), json!(1), json!("1")]),
            vec![json!(1), json!("1")]
        );
        assert_eq!(path_id("42"), json!(42));
        assert_eq!(
            path_id("5c56c793-69f3-4fbf-87e6-c4bf54c28c26"),
            json!("5c56c793-69f3-4fbf-87e6-c4bf54c28c26")
        );
        assert!(touches("tenant", "tenant"));
        assert!(touches("tenant.x", "tenant"));
        assert!(!touches("tenants", "tenant"));
    }
}
