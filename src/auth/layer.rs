use tower_layer::Layer;

use super::ApiKeyAuth;
use crate::KeyGate;

/// Layer that applies [`ApiKeyAuth`]: resolves each request's key to a
/// [`Principal`](crate::Principal) (inserted in the request's extensions) or rejects the
/// request (401, or gRPC UNAUTHENTICATED; 503 `store_unavailable` when the store cannot be
/// reached on a cache miss).
#[derive(Clone, Debug)]
pub struct ApiKeyAuthLayer {
    gate: KeyGate,
    strip_credentials: bool,
}

impl ApiKeyAuthLayer {
    /// The layer of `gate`.
    pub fn new(gate: KeyGate) -> Self {
        ApiKeyAuthLayer {
            gate,
            strip_credentials: false,
        }
    }

    /// Removes the credential headers (and query parameter) before the inner service sees
    /// the request, so it cannot log or forward the key. Off by default.
    pub fn strip_credentials(mut self, yes: bool) -> Self {
        self.strip_credentials = yes;
        self
    }
}

impl<S> Layer<S> for ApiKeyAuthLayer {
    type Service = ApiKeyAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyAuth::new(inner, self.gate.clone(), self.strip_credentials)
    }
}
