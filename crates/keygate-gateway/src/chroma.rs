//! Tenant row-level security for Chroma's v2 API: the rewrites of [`ChromaOp`].
//!
//! A record belongs to the tenant named in its metadata's tenant field. For a key with a
//! `tenant` attribute:
//! - `add` and `upsert` get the tenant stamped on every record's metadata, and ids that
//!   already exist must be the tenant's (an upsert would overwrite another tenant's
//!   record);
//! - `update` may name only the tenant's records (ids that exist must be its own), and the
//!   metadatas it gives are stamped;
//! - `get`, `query` and `delete` get `{FIELD: {"$eq": TENANT}}` joined to their `where`
//!   filter with `$and` (or as the filter when there is none), so they only reach the
//!   tenant's records, by id or not.

use serde_json::{json, Map, Value};

use crate::preset::ChromaOp;
use crate::problem::Refusal;

/// A scoped Chroma request.
#[derive(Debug, Clone, PartialEq)]
pub struct Scoped {
    /// The rewritten body.
    pub body: Value,
    /// Ids that, where they exist, must be the tenant's records.
    pub check_ids: Option<Vec<Value>>,
}

/// The tenant condition of a `where` filter.
pub fn condition(field: &str, tenant: &str) -> Value {
    json!({ field: {"$eq": tenant} })
}

fn object(body: &mut Value) -> Result<&mut Map<String, Value>, Refusal> {
    body.as_object_mut()
        .ok_or_else(|| Refusal::bad_body("the body must be a JSON object"))
}

/// Scopes `body` of operation `op` to `tenant`.
pub fn scope(op: ChromaOp, mut body: Value, field: &str, tenant: &str) -> Result<Scoped, Refusal> {
    let obj = object(&mut body)?;
    match op {
        ChromaOp::Update => {
            let ids = obj
                .get("ids")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| Refusal::bad_body("`ids` must be a list"))?;
            match obj.get_mut("metadatas") {
                None | Some(Value::Null) => {}
                Some(Value::Array(list)) => {
                    if list.len() != ids.len() {
                        return Err(Refusal::bad_body("`metadatas` must have one entry per id"));
                    }
                    for m in list {
                        // No metadata: this record's stays as it is (and keeps its tenant).
                        if let Some(m) = m.as_object_mut() {
                            m.insert(field.to_owned(), Value::String(tenant.to_owned()));
                        } else if !m.is_null() {
                            return Err(Refusal::bad_body("a metadata must be a JSON object"));
                        }
                    }
                }
                Some(_) => return Err(Refusal::bad_body("`metadatas` must be a list")),
            }
            Ok(Scoped {
                body,
                check_ids: Some(ids),
            })
        }
        ChromaOp::Write => {
            let ids = obj
                .get("ids")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| Refusal::bad_body("`ids` must be a list"))?;
            let metadatas = obj.entry("metadatas").or_insert(Value::Null);
            if metadatas.is_null() {
                *metadatas = Value::Array(vec![Value::Null; ids.len()]);
            }
            let list = metadatas
                .as_array_mut()
                .ok_or_else(|| Refusal::bad_body("`metadatas` must be a list"))?;
            if list.len() != ids.len() {
                return Err(Refusal::bad_body("`metadatas` must have one entry per id"));
            }
            for m in list {
                if m.is_null() {
                    *m = Value::Object(Map::new());
                }
                let m = m
                    .as_object_mut()
                    .ok_or_else(|| Refusal::bad_body("a metadata must be a JSON object"))?;
                m.insert(field.to_owned(), Value::String(tenant.to_owned()));
            }
            Ok(Scoped {
                body,
                check_ids: Some(ids),
            })
        }
        ChromaOp::Filter => {
            let cond = condition(field, tenant);
            let w = obj.entry("where").or_insert(Value::Null);
            let empty = match w {
                Value::Null => true,
                Value::Object(o) => o.is_empty(),
                _ => return Err(Refusal::bad_body("`where` must be a JSON object")),
            };
            *w = if empty {
                cond
            } else {
                json!({"$and": [w.take(), cond]})
            };
            Ok(Scoped {
                body,
                check_ids: None,
            })
        }
    }
}

/// Whether every record of a `get` answer (`{"ids": [...], "metadatas": [...]}`) is the
/// tenant's. An answer of another shape is not.
pub fn all_owned(found: &Value, field: &str, tenant: &str) -> bool {
    let Some(ids) = found.get("ids").and_then(Value::as_array) else {
        return false;
    };
    if ids.is_empty() {
        return true;
    }
    let Some(metas) = found.get("metadatas").and_then(Value::as_array) else {
        return false;
    };
    metas.len() == ids.len()
        && metas
            .iter()
            .all(|m| m.get(field).and_then(Value::as_str) == Some(tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_stamped() {
        let s = scope(
            ChromaOp::Write,
            json!({"ids": ["a", "b"], "embeddings": [[1.0], [2.0]], "metadatas": [{"k": 1, "tenant": "x"}, null]}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert_eq!(
            s.body["metadatas"],
            json!([{"k": 1, "tenant": "acme"}, {"tenant": "acme"}])
        );
        assert_eq!(s.check_ids, Some(vec![json!("a"), json!("b")]));
        let s = scope(ChromaOp::Write, json!({"ids": ["a"]}), "tenant", "acme").expect("scoped");
        assert_eq!(s.body["metadatas"], json!([{"tenant": "acme"}]));
        assert!(scope(
            ChromaOp::Write,
            json!({"ids": ["a"], "metadatas": []}),
            "tenant",
            "a"
        )
        .is_err());
        assert!(scope(ChromaOp::Write, json!({"metadatas": []}), "tenant", "a").is_err());
    }

    #[test]
    fn updates_are_checked_and_stamped() {
        let s = scope(
            ChromaOp::Update,
            json!({"ids": ["a", "b"], "metadatas": [{"k": 2, "tenant": "x"}, null]}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert_eq!(
            s.body["metadatas"],
            json!([{"k": 2, "tenant": "acme"}, null])
        );
        assert_eq!(s.check_ids, Some(vec![json!("a"), json!("b")]));
        let s = scope(
            ChromaOp::Update,
            json!({"ids": ["a"], "embeddings": [[1.0]]}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert!(s.body.get("metadatas").is_none());
        assert!(scope(
            ChromaOp::Update,
            json!({"ids": ["a"], "metadatas": [1]}),
            "tenant",
            "a"
        )
        .is_err());
    }

    #[test]
    fn reads_and_deletes_get_the_tenant_in_where() {
        let s = scope(ChromaOp::Filter, json!({"ids": ["a"]}), "tenant", "acme").expect("scoped");
        assert_eq!(s.body["where"], json!({"tenant": {"$eq": "acme"}}));
        let s = scope(
            ChromaOp::Filter,
            json!({"where": {"k": 1}, "n_results": 3}),
            "tenant",
            "acme",
        )
        .expect("scoped");
        assert_eq!(
            s.body["where"],
            json!({"$and": [{"k": 1}, {"tenant": {"$eq": "acme"}}]})
        );
        assert!(scope(ChromaOp::Filter, json!({"where": "all"}), "tenant", "a").is_err());
        assert!(scope(ChromaOp::Filter, json!([1]), "tenant", "a").is_err());
    }

    #[test]
    fn ownership_of_found_records() {
        assert!(all_owned(
            &json!({"ids": [], "metadatas": []}),
            "tenant",
            "a"
        ));
        assert!(all_owned(
            &json!({"ids": ["x"], "metadatas": [{"tenant": "a"}]}),
            "tenant",
            "a"
        ));
        assert!(!all_owned(
            &json!({"ids": ["x"], "metadatas": [{"tenant": "b"}]}),
            "tenant",
            "a"
        ));
        assert!(!all_owned(
            &json!({"ids": ["x"], "metadatas": [null]}),
            "tenant",
            "a"
        ));
        assert!(!all_owned(&json!({"oops": 1}), "tenant", "a"));
    }
}
