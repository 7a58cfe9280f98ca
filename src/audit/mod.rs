//! Audit: [`AuditLayer`] records one event per request, whatever happened to it, and never
//! rejects.
//!
//! Each [`RequestEvent`](crate::core::audit::RequestEvent) holds the time, the request id,
//! the key id, key name, subject and `tenant` attribute, the client address, the protocol
//! (HTTP, or gRPC with its method), the method, the path without its query string, the
//! status, the decision, the exact denial code and the latency. Never the key, a
//! credential header or a query string.
//!
//! ## Where to put it
//! Outermost, built from the hub ([`KeyGate::audit_layer`](crate::KeyGate::audit_layer)):
//! it then records every request, including those inner layers reject. It resolves the
//! caller through the hub before calling inward (verified once per request: the verdict is
//! memoized in the request's extensions, and an inner auth layer reuses it), so it knows the
//! key of every request; the inner layers' decisions come back on the response, whose
//! extensions carry the exact [`Denial`](crate::Denial) (`revoked_key`, even when the client
//! read `invalid_key`). Placed inside another layer, it sees only the requests that layer
//! let through.
//!
//! ## Tracing span
//! Each request also gets a `keygate.request` span (target `keygate`, level DEBUG) with
//! OpenTelemetry's semantic names: `http.request.method`, `url.path` (keys masked, as in
//! the event), `client.address`, and once the response is known `user.id` (the key's owner,
//! else its id), `http.response.status_code` and, for a refusal or failure, `error.type`
//! (the exact denial code, `error` or `cancelled`); also `keygate.key_id`,
//! `keygate.decision` and `otel.kind = "server"`. The inner service runs inside it, so its
//! own spans and events nest under it. Without a subscriber enabled for it, it costs
//! nothing.
//!
//! ## Request ids
//! The client's `x-request-id` is reused when it is 1 to 128 visible ASCII characters;
//! otherwise a 128-bit id (32 hex characters) is generated and set on the request's headers
//! for the inner service. Either way it is kept in the request's
//! [`RequestContext`](crate::RequestContext) as a [`RequestId`](crate::RequestId) and on the response's headers (unless the response already has one).
//!
//! ## Status
//! `status` is the HTTP status. For gRPC, `grpc_status` is read from the response headers,
//! where trailers-only answers (every keygate rejection, and most errors) carry it; a
//! streamed answer carries its status in the trailers, which the layer does not wait for, and
//! then records none. The event is recorded when the response head arrives: `latency` is the
//! time to the response head, and a request dropped before any response (client gone) is
//! recorded as `cancelled`.
//!
//! ## Failing closed
//! By default the layer never rejects: when the log cannot be written, requests carry on and
//! the auditor counts the lost events. [`AuditLayer::fail_closed`] gives a second layer, to
//! place just inside the audit layer, that refuses requests with 503 `store_unavailable`
//! while the auditor is failing (see [`AuditGuardLayer`]).
//!
//! ## Keys in recorded values
//! A client request id that holds anything shaped like an API key (anywhere, not only as
//! the whole value) is not reused; a key in the path or a custom method is masked
//! (`kg_****...`). The file sink masks keys in every field as well.
//!
//! ## Delivery
//! Through an [`Auditor`](crate::core::audit::Auditor): directly into a sink, or through a
//! bounded queue and a background writer ([`Auditor::spawn`](crate::core::audit::Auditor::spawn));
//! see [`keygate_core::audit`](crate::core::audit) for sinks, overflow and shutdown.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::core::audit::{Auditor, Decision, MemorySink};
//! use keygate::{DenialCode, KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let hasher = gate.verifier().hasher();
//! let (key, record) = KeyRecord::generate(&Prefix::default(), hasher, "demo", gate.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//! let (old, mut revoked) = KeyRecord::generate(&Prefix::default(), hasher, "old", gate.clock().now()).unwrap();
//! revoked.status = keygate::KeyStatus::Revoked;
//! store.insert(&revoked).await.unwrap();
//!
//! let sink = MemorySink::new();
//! let svc = ServiceBuilder::new()
//!     .layer(gate.audit_layer(Auditor::direct(sink.clone())))
//!     .layer(gate.auth_layer())
//!     .service_fn(|_req: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//!
//! let get = |key: &str| Request::get("/points?limit=5").header("x-api-key", key).body(String::new()).unwrap();
//! let ok = svc.clone().oneshot(get(key.expose_secret())).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! assert!(ok.headers().contains_key("x-request-id"));
//! let denied = svc.oneshot(get(old.expose_secret())).await.unwrap();
//! assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
//!
//! let events = sink.events();
//! let allowed = events[0].as_request().unwrap();
//! assert_eq!(allowed.key_name.as_deref(), Some("demo"));
//! assert_eq!((allowed.decision, allowed.path.as_str()), (Decision::Allowed, "/points"));
//! let refused = events[1].as_request().unwrap();
//! assert_eq!(refused.decision, Decision::Denied);
//! assert_eq!(refused.denial, Some(DenialCode::RevokedKey)); // the client read invalid_key
//! # }
//! ```

mod future;
mod guard;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use guard::{AuditGuard, AuditGuardLayer};
pub use layer::AuditLayer;
pub use service::Audit;
