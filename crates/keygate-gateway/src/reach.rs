//! The collections a REST request reaches besides the one in its path, for keys without a
//! tenant (tenant keys are refused these routes or fields by [`crate::qdrant`]).
//!
//! The scope layer checks the collection in the path. Some Qdrant bodies name others, and
//! Qdrant acts on those too:
//! - reads (`recommend`, `discover`, `query`, their `groups` and `batch` forms, and
//!   `search/groups`): `lookup_from: {"collection": ..}` (vectors read from another
//!   collection) and `with_lookup: ".."` / `{"collection": ..}` (payloads read from
//!   another collection), also inside `prefetch` (nested) and in each request of a batch
//!   (`{"searches": [..]}`);
//! - `POST /collections/aliases`: every collection and alias of every action;
//! - `PUT /collections/{c}`: `init_from: {"collection": ..}` (copies that collection's
//!   points).
//!
//! Every name must be permitted to the key with the route's scope (and, for `init_from`,
//! with `points:read` too), else the request is refused `403 resource_forbidden` and never
//! forwarded. Such a body is read whole (within `rewrite_body_bytes`) and forwarded
//! unchanged; one that is not JSON of the expected shape is refused `400 bad_body`. A key
//! whose grant of the route's scope covers every collection (`*`) is not read for.
//!
//! Some routes act on every collection at once ([`Reach::Everything`]): storage snapshots
//! (`POST /snapshots`, `GET`/`DELETE /snapshots/{snapshot}`: they hold every collection),
//! snapshot recovery from a location (`PUT .../snapshots/recover`: the Qdrant server reads
//! the URL or `file:` path itself, which may be another collection's snapshot, or its
//! own API), and removing a peer (`DELETE /cluster/peer/{peer}`: the shards of every
//! collection on it). Only a key whose grant of the route's scope covers every collection
//! may use them; others upload a snapshot (`.../snapshots/upload`) instead.
//!
//! Chroma's record routes name a collection by id, which Chroma serves whatever database
//! the path names: [`chroma_collection`] finds them, and the proxy checks that the id is
//! a collection of the path's database.

use serde_json::{Map, Value};

use crate::grpc::{alias_names, AliasAction, Names};
use crate::preset::{matches, Preset};
use crate::problem::Refusal;

/// What a route's body can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// One read: `lookup_from`, `with_lookup`, and those of its prefetches.
    Read,
    /// A batch of reads (`{"searches": [..]}`), each as [`Reach::Read`].
    ReadBatch,
    /// Alias actions.
    Aliases,
    /// Collection creation: `init_from`.
    Create,
    /// Every collection: only for keys whose grant covers every collection.
    Everything,
}

/// The Qdrant routes whose requests reach other collections.
const QDRANT_REACH: &[(&str, &str, Reach)] = &[
    (
        "POST",
        "/collections/{collection}/points/search/groups",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/recommend",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/recommend/groups",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/recommend/batch",
        Reach::ReadBatch,
    ),
    (
        "POST",
        "/collections/{collection}/points/discover",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/discover/batch",
        Reach::ReadBatch,
    ),
    (
        "POST",
        "/collections/{collection}/points/query",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/query/groups",
        Reach::Read,
    ),
    (
        "POST",
        "/collections/{collection}/points/query/batch",
        Reach::ReadBatch,
    ),
    ("POST", "/collections/aliases", Reach::Aliases),
    ("PUT", "/collections/{collection}", Reach::Create),
    (
        "PUT",
        "/collections/{collection}/snapshots/recover",
        Reach::Everything,
    ),
    (
        "PUT",
        "/collections/{collection}/shards/{shard}/snapshots/recover",
        Reach::Everything,
    ),
    ("POST", "/snapshots", Reach::Everything),
    ("GET", "/snapshots/{snapshot}", Reach::Everything),
    ("DELETE", "/snapshots/{snapshot}", Reach::Everything),
    ("DELETE", "/cluster/peer/{peer}", Reach::Everything),
];

/// A Chroma collection named by id in a path, with the tenant and database the path puts
/// it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChromaCollection {
    /// The tenant segment.
    pub tenant: String,
    /// The database segment (what a key's patterns are matched against).
    pub database: String,
    /// The collection id.
    pub id: String,
}

/// The Chroma routes naming a collection by id. Chroma (1.x) looks the id up without
/// checking that the collection is in the path's tenant and database, so the database a
/// key's patterns matched may not be the collection's: the proxy checks that it is.
/// (`GET` and `DELETE .../collections/{name}` take a name, looked up in the database.)
const CHROMA_BY_ID: &[(&str, &str)] = &[
    ("PUT", ""),
    ("POST", "/add"),
    ("POST", "/upsert"),
    ("POST", "/update"),
    ("POST", "/get"),
    ("POST", "/query"),
    ("POST", "/delete"),
    ("GET", "/count"),
];

/// The Chroma tenant a path on the Chroma preset is under (`/api/v2/tenants/{tenant}...`).
pub fn chroma_tenant(preset: Preset, path: &str) -> Option<&str> {
    if preset != Preset::Chroma {
        return None;
    }
    let rest = path.strip_prefix("/api/v2/tenants/")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The collection `method` `path` names by id on the Chroma preset, and its route's scope.
pub fn chroma_collection(
    preset: Preset,
    method: &str,
    path: &str,
) -> Option<(ChromaCollection, &'static str)> {
    if preset != Preset::Chroma {
        return None;
    }
    let method = if method == "HEAD" { "GET" } else { method };
    let rest = path.strip_prefix("/api/v2/tenants/")?;
    let mut parts = rest.splitn(6, '/');
    let tenant = parts.next()?;
    let (Some("databases"), Some(database), Some("collections"), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let op = parts.next().map_or(String::new(), |op| format!("/{op}"));
    if [tenant, database, id].iter().any(|s| s.is_empty())
        || !CHROMA_BY_ID.iter().any(|(m, o)| *m == method && *o == op)
    {
        return None;
    }
    let route = preset
        .routes()
        .iter()
        .find(|r| r.method == method && matches(r.path, path))?;
    Some((
        ChromaCollection {
            tenant: tenant.to_owned(),
            database: database.to_owned(),
            id: id.to_owned(),
        },
        route.scope,
    ))
}

/// What `method` `path` reaches beyond its path, and the scope its route needs; `None`
/// when nothing (every Chroma route: no body of Chroma's v2 API names another collection
/// or database; for its ids in paths, see [`chroma_collection`]).
pub fn reach(preset: Preset, method: &str, path: &str) -> Option<(Reach, &'static str)> {
    if preset != Preset::Qdrant {
        return None;
    }
    let method = if method == "HEAD" { "GET" } else { method };
    let (_, _, reach) = QDRANT_REACH
        .iter()
        .find(|(m, p, _)| *m == method && matches(p, path))?;
    let route = preset
        .routes()
        .iter()
        .find(|r| r.method == method && matches(r.path, path))?;
    Some((*reach, route.scope))
}

fn bad(detail: impl Into<String>) -> Refusal {
    Refusal::bad_body(detail)
}

/// A `{"collection": ".."}` object's collection.
fn collection_of(v: &Map<String, Value>, field: &str) -> Result<String, Refusal> {
    match v.get("collection") {
        Some(Value::String(c)) => Ok(c.clone()),
        _ => Err(bad(format!("`{field}.collection` must be a string"))),
    }
}

/// The other collections one read request reaches.
fn read_names(req: &Value, names: &mut Names, depth: usize) -> Result<(), Refusal> {
    if depth > 16 {
        return Err(bad("prefetches are nested too deep"));
    }
    let obj = match req {
        Value::Object(o) => o,
        Value::Null if depth == 0 => return Ok(()),
        _ => return Err(bad("a request must be a JSON object")),
    };
    match obj.get("lookup_from") {
        None | Some(Value::Null) => {}
        Some(Value::Object(l)) => names.push(collection_of(l, "lookup_from")?),
        Some(_) => return Err(bad("`lookup_from` must be an object")),
    }
    match obj.get("with_lookup") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) => names.push(c.clone()),
        Some(Value::Object(w)) => names.push(collection_of(w, "with_lookup")?),
        Some(_) => return Err(bad("`with_lookup` must be a name or an object")),
    }
    match obj.get("prefetch") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for p in list {
                read_names(p, names, depth + 1)?;
            }
        }
        Some(p @ Value::Object(_)) => read_names(p, names, depth + 1)?,
        Some(_) => return Err(bad("`prefetch` must be an object or a list")),
    }
    Ok(())
}

/// The alias actions of a `POST /collections/aliases` body.
#[derive(serde::Deserialize)]
struct ChangeAliases {
    actions: Vec<AliasAction>,
}

/// Every collection (and alias) `body` (JSON; `Null` when empty) of a `reach` route names
/// besides the one in its path. Refuses `400 bad_body` a body of another shape.
/// [`Reach::Everything`] names none (it is decided without the body).
pub fn names(reach: Reach, body: &Value) -> Result<Names, Refusal> {
    let mut names = Names::default();
    match reach {
        Reach::Read => read_names(body, &mut names, 0)?,
        Reach::ReadBatch => {
            let searches = body
                .get("searches")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("a batch needs a `searches` list"))?;
            for s in searches {
                if !s.is_object() {
                    return Err(bad("each request of a batch must be a JSON object"));
                }
                read_names(s, &mut names, 0)?;
            }
        }
        Reach::Aliases => {
            let change: ChangeAliases = serde_json::from_value(body.clone()).map_err(|_| {
                bad("the body must be `{\"actions\": [..]}` of create_alias, rename_alias or delete_alias")
            })?;
            return alias_names(change.actions.into_iter().map(Some), Refusal::bad_body);
        }
        Reach::Create => match body.get("init_from") {
            None | Some(Value::Null) => {}
            Some(Value::Object(i)) => names.push(collection_of(i, "init_from")?),
            Some(_) => return Err(bad("`init_from` must be an object")),
        },
        Reach::Everything => {}
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(reach: Reach, body: Value) -> Vec<String> {
        names(reach, &body).expect("names").0
    }

    #[test]
    fn routes_are_found_with_their_scopes() {
        let q = Preset::Qdrant;
        assert_eq!(
            reach(q, "POST", "/collections/a/points/query"),
            Some((Reach::Read, "points:read"))
        );
        assert_eq!(
            reach(q, "POST", "/collections/a/points/query/batch"),
            Some((Reach::ReadBatch, "points:read"))
        );
        assert_eq!(
            reach(q, "POST", "/collections/aliases"),
            Some((Reach::Aliases, "collections:manage"))
        );
        assert_eq!(
            reach(q, "PUT", "/collections/a"),
            Some((Reach::Create, "collections:manage"))
        );
        assert_eq!(
            reach(q, "HEAD", "/snapshots/full.snapshot"),
            Some((Reach::Everything, "snapshots:read"))
        );
        assert_eq!(reach(q, "POST", "/collections/a/points/search"), None);
        assert_eq!(reach(q, "POST", "/collections/a/points/scroll"), None);
        assert_eq!(reach(q, "GET", "/collections/a"), None);
        assert_eq!(reach(Preset::Chroma, "POST", "/collections/aliases"), None);
        // Every row is a route of the preset.
        for (m, p, _) in QDRANT_REACH {
            let path = p.replace(['{', '}'], "");
            assert!(reach(q, m, &path).is_some(), "{m} {p}");
        }
    }

    #[test]
    fn chroma_tenants_are_read_from_the_path() {
        let c = Preset::Chroma;
        assert_eq!(chroma_tenant(c, "/api/v2/tenants/t1"), Some("t1"));
        assert_eq!(
            chroma_tenant(c, "/api/v2/tenants/t1/databases/db/collections"),
            Some("t1")
        );
        assert_eq!(chroma_tenant(c, "/api/v2/tenants/"), Some(""));
        assert_eq!(chroma_tenant(c, "/api/v2/tenants"), None);
        assert_eq!(chroma_tenant(c, "/api/v2/heartbeat"), None);
        assert_eq!(chroma_tenant(Preset::Qdrant, "/api/v2/tenants/t1"), None);
    }

    #[test]
    fn chroma_collections_by_id_are_found() {
        let c = Preset::Chroma;
        let base = "/api/v2/tenants/t/databases/db/collections/0b5e";
        let (found, scope) =
            chroma_collection(c, "POST", &format!("{base}/get")).expect("a record route");
        assert_eq!(
            found,
            ChromaCollection {
                tenant: "t".into(),
                database: "db".into(),
                id: "0b5e".into()
            }
        );
        assert_eq!(scope, "records:read");
        assert!(chroma_collection(c, "PUT", base).is_some());
        assert!(chroma_collection(c, "GET", &format!("{base}/count")).is_some());
        assert!(chroma_collection(c, "POST", &format!("{base}/add")).is_some());
        // By name, looked up in the database by Chroma itself.
        assert!(chroma_collection(c, "GET", base).is_none());
        assert!(chroma_collection(c, "DELETE", base).is_none());
        assert!(chroma_collection(c, "POST", &format!("{base}/fork")).is_none());
        assert!(chroma_collection(c, "POST", &format!("{base}/get/x")).is_none());
        assert!(chroma_collection(Preset::Qdrant, "POST", &format!("{base}/get")).is_none());
    }

    #[test]
    fn lookups_prefetches_and_batches_are_collected() {
        assert_eq!(
            of(
                Reach::Read,
                json!({"query": 1, "lookup_from": {"collection": "b"}, "with_lookup": "c",
                       "prefetch": [{"prefetch": {"lookup_from": {"collection": "d"}}}]})
            ),
            vec!["b", "c", "d"]
        );
        assert_eq!(
            of(
                Reach::Read,
                json!({"group_by": "x", "with_lookup": {"collection": "e", "with_payload": true}})
            ),
            vec!["e"]
        );
        assert!(of(Reach::Read, json!({"query": [0.1]})).is_empty());
        assert!(of(Reach::Read, Value::Null).is_empty());
        assert_eq!(
            of(
                Reach::ReadBatch,
                json!({"searches": [{"query": 1}, {"positive": [1], "lookup_from": {"collection": "b"}}]})
            ),
            vec!["b"]
        );
        for (reach, body) in [
            (Reach::Read, json!([1])),
            (Reach::Read, json!({"lookup_from": "b"})),
            (Reach::Read, json!({"lookup_from": {"vector": "v"}})),
            (Reach::Read, json!({"with_lookup": 3})),
            (Reach::Read, json!({"prefetch": "b"})),
            (Reach::Read, json!({"prefetch": [3]})),
            (Reach::ReadBatch, json!({})),
            (Reach::ReadBatch, json!({"searches": [null]})),
            (Reach::Create, json!({"init_from": "b"})),
        ] {
            let e = names(reach, &body).expect_err("refused");
            assert_eq!(e.code, "bad_body", "{body}");
        }
        let mut deep = json!({"lookup_from": {"collection": "b"}});
        for _ in 0..20 {
            deep = json!({ "prefetch": deep });
        }
        assert!(names(Reach::Read, &deep).is_err());
    }

    #[test]
    fn alias_actions_and_init_from_are_collected() {
        assert_eq!(
            of(
                Reach::Aliases,
                json!({"actions": [
                    {"create_alias": {"collection_name": "other", "alias_name": "team-x"}},
                    {"rename_alias": {"old_alias_name": "team-x", "new_alias_name": "team-y"}},
                    {"delete_alias": {"alias_name": "team-y"}}
                ]})
            ),
            vec!["other", "team-x", "team-x", "team-y", "team-y"]
        );
        for body in [
            json!({"actions": []}),
            json!({"actions": [{"drop_everything": {}}]}),
            json!({"actions": [{"delete_alias": {"alias_name": ""}}]}),
            json!({"actions": [{"create_alias": {"alias_name": "x"}}]}),
            json!({}),
            Value::Null,
        ] {
            let e = names(Reach::Aliases, &body).expect_err("refused");
            assert_eq!(e.code, "bad_body", "{body}");
        }
        assert_eq!(
            of(
                Reach::Create,
                json!({"vectors": {"size": 2, "distance": "Dot"}, "init_from": {"collection": "b"}})
            ),
            vec!["b"]
        );
        assert!(of(Reach::Create, json!({"vectors": {}})).is_empty());
    }
}
