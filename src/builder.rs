//! `ServiceBuilder` shortcuts.

#[cfg(feature = "auth")]
use tower::layer::util::Stack;
use tower::ServiceBuilder;

#[allow(unused_imports)]
use crate::KeyGate;

/// Adds keygate's layers to a [`ServiceBuilder`].
///
/// ```
/// use keygate::{KeyGate, MemoryStore, ServiceBuilderExt, Verifier};
/// use tower::ServiceBuilder;
///
/// let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
/// let _stack = ServiceBuilder::new().api_key_auth(&gate);
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds the [`ApiKeyAuthLayer`](crate::auth::ApiKeyAuthLayer) of `gate`.
    #[cfg(feature = "auth")]
    fn api_key_auth(self, gate: &KeyGate)
        -> ServiceBuilder<Stack<crate::auth::ApiKeyAuthLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "auth")]
    fn api_key_auth(
        self,
        gate: &KeyGate,
    ) -> ServiceBuilder<Stack<crate::auth::ApiKeyAuthLayer, L>> {
        self.layer(gate.auth_layer())
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
