use std::sync::Arc;

use tower_layer::Layer;

use super::{ApiKeyAuth, Authenticate};
use crate::check::{CheckLayer, One, Resolver};
use crate::KeyGate;

/// Layer that applies [`ApiKeyAuth`]: resolves each request's key to a
/// [`Principal`](crate::Principal) (kept in the request's
/// [`RequestContext`](crate::RequestContext)) or rejects the request (401, or gRPC
/// UNAUTHENTICATED; 503 `store_unavailable` when the store cannot be reached on a cache
/// miss).
#[derive(Clone, Debug)]
pub struct ApiKeyAuthLayer {
    gate: KeyGate,
    check: Authenticate,
}

impl ApiKeyAuthLayer {
    /// The layer of `gate`: authentication always needs the hub (its verifier and
    /// credential sources), so it is the one layer whose `new` takes it.
    pub fn new(gate: &KeyGate) -> Self {
        ApiKeyAuthLayer {
            gate: gate.clone(),
            check: Authenticate::default(),
        }
    }

    /// Removes the credential headers (and query parameter) before the inner service sees
    /// the request, so it cannot log or forward the key. Off by default.
    pub fn strip_credentials(mut self, yes: bool) -> Self {
        self.check.strip = yes.then(|| Arc::new(self.gate.credentials().clone()));
        self
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> Authenticate {
        self.check.clone()
    }
}

impl<S> Layer<S> for ApiKeyAuthLayer {
    type Service = ApiKeyAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(One(self.check.clone()), Resolver::Hub(self.gate.clone()))
            .layer(inner)
    }
}
