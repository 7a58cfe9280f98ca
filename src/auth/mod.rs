//! Authentication: [`ApiKeyAuthLayer`] resolves the key of every request to a
//! [`Principal`](crate::Principal) or rejects it.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, RequestContext, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "demo", gate.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(gate.auth_layer())
//!     .service_fn(|req: Request<String>| async move {
//!         let who = RequestContext::of(req.extensions()).unwrap().principal().unwrap().name().to_owned();
//!         Ok::<_, std::convert::Infallible>(Response::new(who))
//!     });
//!
//! let ok = svc.clone().oneshot(
//!     Request::get("/").header("x-api-key", key.expose_secret()).body(String::new()).unwrap(),
//! ).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//!
//! let denied = svc.oneshot(Request::get("/").body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(denied.extensions().get::<keygate::Denial>().unwrap().code().as_str(), "missing_key");
//! # }
//! ```

mod layer;
mod service;

pub use layer::ApiKeyAuthLayer;
pub use service::{ApiKeyAuth, Authenticate};
