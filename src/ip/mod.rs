//! Client-address control: [`IpAllowLayer`] decides whether a request may come from its
//! address, by a global deny list, a global allow list and the key's own allowlist (CIDR,
//! IPv4 and IPv6; IPv4-mapped IPv6 is treated as IPv4).
//!
//! The address is the connection's peer, or, behind configured trusted proxies, the first
//! untrusted address of `X-Forwarded-For` / `Forwarded` read from the right (see
//! [`client_ip`](crate::client_ip)). It is left in the request's
//! [`RequestContext`](crate::RequestContext) for handlers and audit.
//!
//! Rules, in order:
//! 1. a policy applies (a global list, or the key's own list) but the address is unknown:
//!    403 `ip_not_allowed`, never allowed;
//! 2. the address is in the global deny list: `ip_not_allowed`;
//! 3. a global allow list exists and the address is not in it: `ip_not_allowed`;
//! 4. per-key checks (on by default) need the principal: without one the request is denied
//!    with the authentication verdict (fail closed); a key with a non-empty allowlist is
//!    refused from any other address. A key with an empty list may come from anywhere.
//!
//! ```
//! use std::net::SocketAddr;
//! use http::{Request, Response, StatusCode};
//! use keygate::ip::{IpAllowLayer, IpPolicy};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let policy = IpPolicy::new().deny(["203.0.113.0/24"]).unwrap().per_key(false);
//! let svc = ServiceBuilder::new()
//!     .layer(IpAllowLayer::new(policy))
//!     .service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//!
//! let mut req = Request::new(());
//! req.extensions_mut().insert(SocketAddr::from(([203, 0, 113, 9], 4000)));
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), StatusCode::FORBIDDEN);
//!
//! let mut req = Request::new(());
//! req.extensions_mut().insert(SocketAddr::from(([198, 51, 100, 1], 4000)));
//! assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

mod layer;
mod service;

pub use layer::{IpAllowLayer, IpPolicy};
pub use service::{IpAllow, IpCheck};
