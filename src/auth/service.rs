use std::sync::Arc;

use http::Request;

use crate::check::{Caller, Check, Guarded, One};
use crate::credentials::Credentials;
use crate::Denial;

/// Middleware that authenticates requests by API key. See
/// [`ApiKeyAuthLayer`](super::ApiKeyAuthLayer).
pub type ApiKeyAuth<S> = Guarded<One<Authenticate>, S>;

/// The authentication check: the caller's verdict is the decision. Optionally removes the
/// credentials from the request before the inner service sees it.
#[derive(Clone, Debug, Default)]
pub struct Authenticate {
    pub(crate) strip: Option<Arc<Credentials>>,
}

impl Check for Authenticate {
    type Note = ();

    /// It decides on the caller alone (and strips credentials no later check reads): it may
    /// run ahead of an earlier check's I/O.
    fn speculative(&self) -> bool {
        true
    }

    fn check<B>(&self, req: &mut Request<B>, caller: Caller<'_>) -> Result<(), Denial> {
        caller.map_err(Denial::clone)?;
        if let Some(credentials) = &self.strip {
            credentials.strip(req);
        }
        Ok(())
    }
}
