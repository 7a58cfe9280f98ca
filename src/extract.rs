//! The axum extractor for the resolved [`Principal`].

use std::convert::Infallible;
use std::ops::Deref;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::StatusCode;

use crate::{Principal, RequestContext};

/// Extracts the [`Principal`] that [`ApiKeyAuthLayer`](crate::auth::ApiKeyAuthLayer) (or another
/// keygate layer built from the hub) resolved for this request.
///
/// Use `Option<Authenticated>` on routes that allow anonymous callers. Without a principal,
/// the plain extractor answers 500 [`MissingPrincipal`]: the route is not behind the
/// authentication layer, a wiring mistake that must not pass silently.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

impl Deref for Authenticated {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.0
    }
}

/// Rejection of [`Authenticated`] when no principal was resolved: 500 with a problem+json
/// body, since it means the authentication layer is not in front of the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingPrincipal;

impl IntoResponse for MissingPrincipal {
    fn into_response(self) -> Response {
        let body = r#"{"type":"about:blank","title":"Internal Server Error","status":500,"detail":"No authenticated principal: the route is not behind keygate's authentication layer.","code":"missing_principal"}"#;
        let mut res = body.into_response();
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        RequestContext::of(&parts.extensions)
            .and_then(RequestContext::principal)
            .cloned()
            .map(Authenticated)
            .ok_or(MissingPrincipal)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Authenticated {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(RequestContext::of(&parts.extensions)
            .and_then(RequestContext::principal)
            .cloned()
            .map(Authenticated))
    }
}
