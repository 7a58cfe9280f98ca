//! How a request reached the server: over TLS or not.
//!
//! keygate cannot see the connection, so the server says it: whatever accepts TLS
//! connections inserts [`TlsConnection`] into the extensions of every request read from
//! one. [`is_tls`] reads it (and, with the `tonic-tls` feature, tonic's own
//! `TlsConnectInfo`, which tonic's TLS server inserts). A request without either is taken
//! as plaintext: fail closed.
//!
//! - **hyper**: insert it in the service you hand to `serve_connection` for a connection
//!   accepted through `tokio_rustls::TlsAcceptor` (as the showcase's `serve_tls` does):
//!   `req.extensions_mut().insert(TlsConnection)`.
//! - **axum**: `Router::map_request`/`tower::ServiceExt::map_request` around the router in
//!   such an accept loop, or with `axum-server`'s rustls acceptor, a small acceptor wrapper
//!   (`axum_server::accept::Accept`) whose service inserts it.
//! - **tonic**: nothing to do with `Server::builder().tls_config(..)` and the `tonic-tls`
//!   feature, which reads tonic's `TlsConnectInfo`.
//!
//! ```
//! use keygate::transport::{is_tls, TlsConnection};
//!
//! let mut req = http::Request::new(());
//! assert!(!is_tls(&req));
//! req.extensions_mut().insert(TlsConnection);
//! assert!(is_tls(&req));
//! ```

use http::Request;

/// Request extension: the request arrived on a TLS connection. Inserted by the server's
/// TLS acceptor, per connection; never by a client (extensions are not headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlsConnection;

/// Whether `req` arrived over TLS: it carries [`TlsConnection`] (or, with the `tonic-tls`
/// feature, tonic's `TlsConnectInfo`).
pub fn is_tls<B>(req: &Request<B>) -> bool {
    let ext = req.extensions();
    if ext.get::<TlsConnection>().is_some() {
        return true;
    }
    #[cfg(feature = "tonic-tls")]
    if ext
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .is_some()
    {
        return true;
    }
    false
}
