//! Authorization: [`ScopeLayer`] decides whether the caller may do this operation, on this
//! resource (collection).
//!
//! Two ways to say what a route needs:
//! - per route, [`ScopeLayer::require`]`("points:write")`, for axum's `route_layer`;
//! - a [`RouteScopes`] table for any tower service: method + path pattern -> scope, and
//!   which path parameter names the collection. gRPC paths work the same way.
//!
//! Denials: 403 `insufficient_scope` (with `WWW-Authenticate: Bearer
//! error="insufficient_scope", scope="..."`) and 403 `resource_forbidden`; gRPC
//! PERMISSION_DENIED. A request without a principal is denied with the authentication
//! verdict (`missing_key`, `invalid_key`, ...), so the layer fails closed whatever its
//! place in the stack.
//!
//! A request that no rule of a table matches gets 404 `unknown_route` (gRPC 12
//! UNIMPLEMENTED), even for a key holding `*`: the route does not exist, and no scope would
//! help. It is decided after authentication, so a caller without a valid key still gets
//! 401 and learns nothing about which routes exist; it never reaches the inner service
//! unless the table says so ([`RouteScopesBuilder::public`] rules,
//! [`Unmatched::Pass`]). [`Unmatched::InsufficientScope`] keeps the older 403 answer.
//!
//! `resource_forbidden` says which collection was asked for and why it is refused: the key
//! has no collection pattern matching it, or no collection patterns at all. The name is
//! the caller's own input, echoed only when it is at most 64 printable ASCII characters
//! (quoted and escaped; longer or other names are described, not echoed); the key's
//! patterns are never listed.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::scope::{RouteScopes, ScopeLayer};
//! use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, mut record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "reader", gate.clock().now()).unwrap();
//! record.scopes = vec!["points:read".into()];
//! record.resources = vec!["tenant-*".into()];
//! store.insert(&record).await.unwrap();
//!
//! let rules = RouteScopes::builder()
//!     .route("POST", "/collections/{collection}/points/search", "points:read")
//!     .route("PUT", "/collections/{collection}/points", "points:write")
//!     .build()
//!     .unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(ScopeLayer::table(rules).with_gate(&gate))
//!     .service_fn(|_req: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//!
//! let call = |method: &str, path: &str| {
//!     Request::builder().method(method).uri(path).header("x-api-key", key.expose_secret()).body(String::new()).unwrap()
//! };
//! let ok = svc.clone().oneshot(call("POST", "/collections/tenant-a/points/search")).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let write = svc.clone().oneshot(call("PUT", "/collections/tenant-a/points")).await.unwrap();
//! assert_eq!(write.status(), StatusCode::FORBIDDEN); // insufficient_scope
//! let other = svc.oneshot(call("POST", "/collections/private/points/search")).await.unwrap();
//! assert_eq!(other.status(), StatusCode::FORBIDDEN); // resource_forbidden
//! # }
//! ```

mod layer;
mod rules;
mod service;

pub use layer::ScopeLayer;
pub use rules::{InvalidRule, RouteScopes, RouteScopesBuilder, Unmatched};
pub use service::{Scope, ScopeCheck};
