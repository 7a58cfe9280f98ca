//! Route presets: each upstream's API mapped to scopes and resources, and to what the
//! gateway does with a request of a key with a tenant ([`Tenancy`]).
//!
//! A route no preset row (and no `[[routes]]` entry of the configuration) lists is refused
//! `404 unknown_route` to an authenticated caller; nothing unknown reaches the upstream.
//!
//! | preset | resource (matched against a key's collection patterns) | scopes |
//! |---|---|---|
//! | [`Preset::Qdrant`] | the collection in the path | `collections:read`, `collections:manage`, `points:read`, `points:write`, `snapshots:read`, `snapshots:manage`, `cluster:read`, `cluster:manage`, `service:read` |
//! | [`Preset::Chroma`] | the database in the path (Chroma names collections by id) | `tenants:read`, `tenants:manage`, `databases:read`, `databases:manage`, `collections:read`, `collections:manage`, `records:read`, `records:write`, `service:read` |

use serde::Deserialize;

use keygate::scope::{InvalidRule, RouteScopes};

use crate::config::ExtraRoute;

/// The upstream APIs the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Qdrant's REST API.
    Qdrant,
    /// Chroma's v2 REST API.
    Chroma,
}

/// What the gateway does with a request of a key that has a `tenant` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tenancy {
    /// Forwarded unchanged: it reads no records (service and collection metadata).
    Pass,
    /// Refused `403 tenant_unscopable`: it would act on every tenant's records (collection
    /// management, snapshots, cluster) or its records cannot be scoped.
    Refuse,
    /// Rewritten or checked by the Qdrant rules ([`crate::qdrant`]).
    Qdrant(QdrantOp),
    /// Rewritten by the Chroma rules ([`crate::chroma`]).
    Chroma(ChromaOp),
}

/// Qdrant operations the gateway scopes to a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdrantOp {
    /// A read with a `filter` (search, query, scroll, count, facet, recommend, discover,
    /// groups, matrix): the tenant condition joins the filter (and every prefetch's); point
    /// ids used as examples must be the tenant's.
    Read,
    /// A batch of reads (`{"searches": [...]}`): each one as [`QdrantOp::Read`].
    ReadBatch,
    /// `PUT .../points`: the tenant stamped on every payload; ids another tenant holds are
    /// refused.
    Upsert,
    /// `POST .../points` (retrieve by ids): narrowed to the tenant's ids.
    Retrieve,
    /// `GET .../points/{id}`: `404` unless the point is the tenant's.
    GetPoint,
    /// A points selector (`points` ids or a `filter`): turned into a filter with the tenant
    /// condition (delete points, delete vectors).
    Select,
    /// Set or overwrite payload: as [`QdrantOp::Select`], and the tenant field may not be
    /// changed.
    SetPayload,
    /// Delete payload keys: as [`QdrantOp::Select`], and the tenant field may not be
    /// deleted.
    DeletePayload,
    /// Update vectors of listed points: every id must be the tenant's.
    UpdateVectors,
}

/// Chroma operations the gateway scopes to a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChromaOp {
    /// `add` / `upsert`: the tenant stamped on every record's metadata.
    Write,
    /// `get` / `query` / `delete`: the tenant condition joins `where`.
    Filter,
    /// `update`: every named record that exists must be the tenant's; metadatas given are
    /// stamped.
    Update,
}

/// One route of a preset.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET`, `POST`, ...
    pub method: &'static str,
    /// The path pattern; `{name}` matches one segment.
    pub path: &'static str,
    /// The scope it needs.
    pub scope: &'static str,
    /// What happens to a tenant key's request.
    pub tenancy: Tenancy,
}

const fn r(
    method: &'static str,
    path: &'static str,
    scope: &'static str,
    tenancy: Tenancy,
) -> Route {
    Route {
        method,
        path,
        scope,
        tenancy,
    }
}

use QdrantOp as Q;
use Tenancy::{Pass, Refuse};

const READ: Tenancy = Tenancy::Qdrant(Q::Read);
const READ_BATCH: Tenancy = Tenancy::Qdrant(Q::ReadBatch);

/// Qdrant's REST API (as documented for 1.x): collections, aliases, payload indexes,
/// points, every search / query / recommend / discover / scroll / count / facet / groups /
/// matrix / batch read, snapshots, shard keys and the cluster.
pub const QDRANT: &[Route] = &[
    r("GET", "/", "service:read", Pass),
    r("GET", "/telemetry", "service:read", Refuse),
    r("GET", "/metrics", "service:read", Refuse),
    // Collections.
    r("GET", "/collections", "collections:read", Pass),
    r("GET", "/collections/{collection}", "collections:read", Pass),
    r(
        "GET",
        "/collections/{collection}/exists",
        "collections:read",
        Pass,
    ),
    r(
        "PUT",
        "/collections/{collection}",
        "collections:manage",
        Refuse,
    ),
    r(
        "PATCH",
        "/collections/{collection}",
        "collections:manage",
        Refuse,
    ),
    r(
        "DELETE",
        "/collections/{collection}",
        "collections:manage",
        Refuse,
    ),
    // Aliases and payload indexes.
    r("POST", "/collections/aliases", "collections:manage", Refuse),
    r("GET", "/aliases", "collections:read", Refuse),
    r(
        "GET",
        "/collections/{collection}/aliases",
        "collections:read",
        Refuse,
    ),
    r(
        "PUT",
        "/collections/{collection}/index",
        "collections:manage",
        Refuse,
    ),
    r(
        "DELETE",
        "/collections/{collection}/index/{field}",
        "collections:manage",
        Refuse,
    ),
    // Shard keys.
    r(
        "PUT",
        "/collections/{collection}/shards",
        "collections:manage",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/shards/delete",
        "collections:manage",
        Refuse,
    ),
    // Points.
    r(
        "GET",
        "/collections/{collection}/points/{id}",
        "points:read",
        Tenancy::Qdrant(Q::GetPoint),
    ),
    r(
        "POST",
        "/collections/{collection}/points",
        "points:read",
        Tenancy::Qdrant(Q::Retrieve),
    ),
    r(
        "PUT",
        "/collections/{collection}/points",
        "points:write",
        Tenancy::Qdrant(Q::Upsert),
    ),
    r(
        "POST",
        "/collections/{collection}/points/delete",
        "points:write",
        Tenancy::Qdrant(Q::Select),
    ),
    r(
        "PUT",
        "/collections/{collection}/points/vectors",
        "points:write",
        Tenancy::Qdrant(Q::UpdateVectors),
    ),
    r(
        "POST",
        "/collections/{collection}/points/vectors/delete",
        "points:write",
        Tenancy::Qdrant(Q::Select),
    ),
    r(
        "POST",
        "/collections/{collection}/points/payload",
        "points:write",
        Tenancy::Qdrant(Q::SetPayload),
    ),
    r(
        "PUT",
        "/collections/{collection}/points/payload",
        "points:write",
        Tenancy::Qdrant(Q::SetPayload),
    ),
    r(
        "POST",
        "/collections/{collection}/points/payload/delete",
        "points:write",
        Tenancy::Qdrant(Q::DeletePayload),
    ),
    // Clearing a payload would take the tenant field with it.
    r(
        "POST",
        "/collections/{collection}/points/payload/clear",
        "points:write",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/points/batch",
        "points:write",
        Refuse,
    ),
    // Reads.
    r(
        "POST",
        "/collections/{collection}/points/search",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/search/batch",
        "points:read",
        READ_BATCH,
    ),
    r(
        "POST",
        "/collections/{collection}/points/search/groups",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/search/matrix/pairs",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/search/matrix/offsets",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/query",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/query/batch",
        "points:read",
        READ_BATCH,
    ),
    r(
        "POST",
        "/collections/{collection}/points/query/groups",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/recommend",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/recommend/batch",
        "points:read",
        READ_BATCH,
    ),
    r(
        "POST",
        "/collections/{collection}/points/recommend/groups",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/discover",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/discover/batch",
        "points:read",
        READ_BATCH,
    ),
    r(
        "POST",
        "/collections/{collection}/points/scroll",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/points/count",
        "points:read",
        READ,
    ),
    r(
        "POST",
        "/collections/{collection}/facet",
        "points:read",
        READ,
    ),
    // Snapshots.
    r(
        "GET",
        "/collections/{collection}/snapshots",
        "snapshots:read",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/snapshots",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "GET",
        "/collections/{collection}/snapshots/{snapshot}",
        "snapshots:read",
        Refuse,
    ),
    r(
        "DELETE",
        "/collections/{collection}/snapshots/{snapshot}",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "PUT",
        "/collections/{collection}/snapshots/recover",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/snapshots/upload",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "GET",
        "/collections/{collection}/shards/{shard}/snapshots",
        "snapshots:read",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/shards/{shard}/snapshots",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "GET",
        "/collections/{collection}/shards/{shard}/snapshots/{snapshot}",
        "snapshots:read",
        Refuse,
    ),
    r(
        "DELETE",
        "/collections/{collection}/shards/{shard}/snapshots/{snapshot}",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "PUT",
        "/collections/{collection}/shards/{shard}/snapshots/recover",
        "snapshots:manage",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/shards/{shard}/snapshots/upload",
        "snapshots:manage",
        Refuse,
    ),
    r("GET", "/snapshots", "snapshots:read", Refuse),
    r("POST", "/snapshots", "snapshots:manage", Refuse),
    r("GET", "/snapshots/{snapshot}", "snapshots:read", Refuse),
    r(
        "DELETE",
        "/snapshots/{snapshot}",
        "snapshots:manage",
        Refuse,
    ),
    // Cluster.
    r("GET", "/cluster", "cluster:read", Refuse),
    r("POST", "/cluster/recover", "cluster:manage", Refuse),
    r("DELETE", "/cluster/peer/{peer}", "cluster:manage", Refuse),
    r(
        "GET",
        "/collections/{collection}/cluster",
        "cluster:read",
        Refuse,
    ),
    r(
        "POST",
        "/collections/{collection}/cluster",
        "cluster:manage",
        Refuse,
    ),
];

const CHROMA_WRITE: Tenancy = Tenancy::Chroma(ChromaOp::Write);
const CHROMA_FILTER: Tenancy = Tenancy::Chroma(ChromaOp::Filter);

/// Chroma's v2 REST API: identity, tenants, databases, collections and their records
/// (`add`, `upsert`, `update`, `get`, `query`, `delete`, `count`).
pub const CHROMA: &[Route] = &[
    r("GET", "/api/v2/auth/identity", "service:read", Pass),
    r("GET", "/api/v2/pre-flight-checks", "service:read", Pass),
    r("POST", "/api/v2/reset", "tenants:manage", Refuse),
    r("POST", "/api/v2/tenants", "tenants:manage", Refuse),
    r("GET", "/api/v2/tenants/{tenant}", "tenants:read", Pass),
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases",
        "databases:read",
        Pass,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases",
        "databases:manage",
        Refuse,
    ),
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases/{database}",
        "databases:read",
        Pass,
    ),
    r(
        "DELETE",
        "/api/v2/tenants/{tenant}/databases/{database}",
        "databases:manage",
        Refuse,
    ),
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases/{database}/collections",
        "collections:read",
        Pass,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections",
        "collections:manage",
        Refuse,
    ),
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases/{database}/collections_count",
        "collections:read",
        Pass,
    ),
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}",
        "collections:read",
        Pass,
    ),
    r(
        "PUT",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}",
        "collections:manage",
        Refuse,
    ),
    r(
        "DELETE",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}",
        "collections:manage",
        Refuse,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/add",
        "records:write",
        CHROMA_WRITE,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/upsert",
        "records:write",
        CHROMA_WRITE,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/update",
        "records:write",
        Tenancy::Chroma(ChromaOp::Update),
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/get",
        "records:read",
        CHROMA_FILTER,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/query",
        "records:read",
        CHROMA_FILTER,
    ),
    r(
        "POST",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/delete",
        "records:write",
        CHROMA_FILTER,
    ),
    // A count of the whole collection, every tenant's records.
    r(
        "GET",
        "/api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/count",
        "records:read",
        Refuse,
    ),
];

impl Preset {
    /// The preset's routes.
    pub fn routes(self) -> &'static [Route] {
        match self {
            Preset::Qdrant => QDRANT,
            Preset::Chroma => CHROMA,
        }
    }

    /// The path parameter naming the resource a key's collection patterns are matched
    /// against.
    pub fn resource_param(self) -> &'static str {
        match self {
            Preset::Qdrant => "collection",
            Preset::Chroma => "database",
        }
    }

    /// Paths answered without a key (health checks; the upstream exempts them from its
    /// own key too): forwarded outside the layers, `GET` only.
    pub fn open_paths(self) -> &'static [&'static str] {
        match self {
            Preset::Qdrant => &["/healthz", "/livez", "/readyz"],
            Preset::Chroma => &[
                "/api/v2/heartbeat",
                "/api/v2/version",
                "/api/v2/healthcheck",
            ],
        }
    }

    /// The header the upstream reads its own credential from.
    pub fn credential_header(self) -> &'static str {
        match self {
            Preset::Qdrant => "api-key",
            Preset::Chroma => "x-chroma-token",
        }
    }

    /// Where clients send their keys: `Authorization: Bearer`, `X-API-Key` and `api-key`,
    /// and for Chroma also `X-Chroma-Token` (where Chroma's clients send theirs).
    pub fn client_credentials(self) -> keygate::credentials::Credentials {
        let c = keygate::credentials::Credentials::default();
        match self {
            Preset::Qdrant => c,
            Preset::Chroma => {
                c.with_header(http::header::HeaderName::from_static("x-chroma-token"))
            }
        }
    }

    /// The route table for the scope layer: the preset's routes, its gRPC methods when
    /// `grpc` ([`crate::grpc::QDRANT_GRPC`]; their collections are checked by the proxy),
    /// then `extra`.
    pub fn scopes(self, extra: &[ExtraRoute], grpc: bool) -> Result<RouteScopes, InvalidRule> {
        let mut b = RouteScopes::builder().resource_param(self.resource_param());
        for route in self.routes() {
            b = b.route(route.method, route.path, route.scope);
        }
        if grpc && self == Preset::Qdrant {
            for method in crate::grpc::QDRANT_GRPC {
                b = b.grpc(method.path, method.scope);
            }
        }
        for route in extra {
            b = b.route(&route.method, &route.path, &route.scope);
        }
        b.build()
    }
}

/// Whether `pattern` (`/a/{x}/b`) matches `path`: same number of segments, literal
/// segments equal, `{name}` segments non-empty.
pub fn matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut q = path.split('/');
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) => {
                let param = a.starts_with('{') && a.ends_with('}');
                if (param && b.is_empty()) || (!param && a != b) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// What a tenant key's request on `method` `path` gets: the first matching preset row's
/// [`Tenancy`], then the configuration's routes ([`Tenancy::Pass`] when the entry allows
/// tenant keys, else [`Tenancy::Refuse`]). `None` when nothing matches (the scope layer has
/// refused such a request already).
pub fn tenancy(preset: Preset, extra: &[ExtraRoute], method: &str, path: &str) -> Option<Tenancy> {
    let method = if method == "HEAD" { "GET" } else { method };
    if let Some(route) = preset
        .routes()
        .iter()
        .find(|r| r.method == method && matches(r.path, path))
    {
        return Some(route.tenancy);
    }
    extra
        .iter()
        .find(|r| {
            (r.method == "*" || r.method.eq_ignore_ascii_case(method)) && matches(&r.path, path)
        })
        .map(|r| if r.tenant_keys { Pass } else { Refuse })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tables_build_and_have_no_duplicate_rows() {
        for preset in [Preset::Qdrant, Preset::Chroma] {
            preset.scopes(&[], true).expect("the table builds");
            let rows = preset.routes();
            for (i, a) in rows.iter().enumerate() {
                for b in &rows[i + 1..] {
                    assert!(
                        !(a.method == b.method && a.path == b.path),
                        "{} {} listed twice",
                        a.method,
                        a.path
                    );
                }
            }
        }
    }

    #[test]
    fn the_qdrant_table_covers_the_documented_routes() {
        let t = |m: &str, p: &str| tenancy(Preset::Qdrant, &[], m, p);
        assert_eq!(t("POST", "/collections/docs/points/search"), Some(READ));
        assert_eq!(
            t("POST", "/collections/docs/points/query/batch"),
            Some(READ_BATCH)
        );
        assert_eq!(t("POST", "/collections/docs/points/recommend"), Some(READ));
        assert_eq!(
            t("POST", "/collections/docs/points/discover/batch"),
            Some(READ_BATCH)
        );
        assert_eq!(t("POST", "/collections/docs/points/scroll"), Some(READ));
        assert_eq!(t("POST", "/collections/docs/points/count"), Some(READ));
        assert_eq!(t("POST", "/collections/docs/facet"), Some(READ));
        assert_eq!(
            t("PUT", "/collections/docs/points"),
            Some(Tenancy::Qdrant(Q::Upsert))
        );
        assert_eq!(
            t("GET", "/collections/docs/points/42"),
            Some(Tenancy::Qdrant(Q::GetPoint))
        );
        // `search` is a literal row listed before `{id}`: a POST never reaches GetPoint.
        assert_eq!(
            t("POST", "/collections/docs/points"),
            Some(Tenancy::Qdrant(Q::Retrieve))
        );
        assert_eq!(t("DELETE", "/collections/docs"), Some(Refuse));
        assert_eq!(t("POST", "/collections/docs/snapshots"), Some(Refuse));
        assert_eq!(t("GET", "/cluster"), Some(Refuse));
        assert_eq!(t("POST", "/collections/aliases"), Some(Refuse));
        assert_eq!(t("GET", "/collections/docs"), Some(Pass));
        assert_eq!(t("HEAD", "/collections/docs"), Some(Pass));
        assert_eq!(t("POST", "/collections/docs/points/explode"), None);
        assert_eq!(t("GET", "/collections//points/1"), None);
    }

    #[test]
    fn the_chroma_table_covers_records() {
        let base = "/api/v2/tenants/t/databases/db/collections/0b7c/";
        let t = |m: &str, p: &str| tenancy(Preset::Chroma, &[], m, p);
        assert_eq!(t("POST", &format!("{base}add")), Some(CHROMA_WRITE));
        assert_eq!(t("POST", &format!("{base}upsert")), Some(CHROMA_WRITE));
        assert_eq!(t("POST", &format!("{base}get")), Some(CHROMA_FILTER));
        assert_eq!(t("POST", &format!("{base}query")), Some(CHROMA_FILTER));
        assert_eq!(t("POST", &format!("{base}delete")), Some(CHROMA_FILTER));
        assert_eq!(
            t("POST", &format!("{base}update")),
            Some(Tenancy::Chroma(ChromaOp::Update))
        );
        assert_eq!(t("GET", &format!("{base}count")), Some(Refuse));
        assert_eq!(t("POST", "/api/v2/tenants"), Some(Refuse));
        assert_eq!(t("GET", "/api/v2/auth/identity"), Some(Pass));
        assert_eq!(t("POST", "/api/v1/collections"), None);
    }

    #[test]
    fn extra_routes_are_refused_to_tenant_keys_unless_allowed() {
        let extra = vec![
            ExtraRoute {
                method: "POST".into(),
                path: "/collections/{collection}/points/custom".into(),
                scope: "points:write".into(),
                tenant_keys: false,
            },
            ExtraRoute {
                method: "*".into(),
                path: "/status/{x}".into(),
                scope: "service:read".into(),
                tenant_keys: true,
            },
        ];
        let t = |m: &str, p: &str| tenancy(Preset::Qdrant, &extra, m, p);
        assert_eq!(t("POST", "/collections/c/points/custom"), Some(Refuse));
        assert_eq!(t("GET", "/status/now"), Some(Pass));
        assert!(Preset::Qdrant.scopes(&extra, false).is_ok());
        let bad = [ExtraRoute {
            method: "GET".into(),
            path: "no-slash".into(),
            scope: "points:read".into(),
            tenant_keys: false,
        }];
        assert!(Preset::Qdrant.scopes(&bad, false).is_err());
    }

    #[test]
    fn matching_is_by_whole_segments() {
        assert!(matches("/collections/{c}/points", "/collections/a/points"));
        assert!(!matches(
            "/collections/{c}/points",
            "/collections/a/points/"
        ));
        assert!(!matches("/collections/{c}/points", "/collections/a"));
        assert!(!matches("/collections/{c}", "/collections/"));
        assert!(matches("/", "/"));
    }
}
