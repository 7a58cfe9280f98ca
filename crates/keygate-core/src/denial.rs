//! Denials: why a request was refused, with stable codes shared by responses, audit records
//! and metrics.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::key::KeyParseError;
use crate::usage::LimitState;

/// A stable denial code. The text forms (`as_str`) never change; responses, audit records
/// and metrics all use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DenialCode {
    /// No credential in the request.
    MissingKey,
    /// A credential that is not a well-formed key (or two different ones).
    MalformedKey,
    /// A well-formed key that is unknown or whose secret does not match.
    InvalidKey,
    /// The key has expired.
    ExpiredKey,
    /// The key was revoked.
    RevokedKey,
    /// The key is disabled.
    DisabledKey,
    /// The key lacks the scope the operation needs.
    InsufficientScope,
    /// The key may not touch this resource (collection).
    ResourceForbidden,
    /// The request comes from an address that is not allowed.
    IpNotAllowed,
    /// The caller is going too fast.
    RateLimited,
    /// The caller has used up its allowance for the period.
    QuotaExceeded,
    /// The key store could not be reached to decide.
    StoreUnavailable,
    /// The key's stored record is unreadable (a corrupt row): refused, not retryable. Clients
    /// read `invalid_key`; the audit record keeps this code.
    CorruptKey,
    /// The request alone costs more than the limit or quota ever allows (a batch larger
    /// than the burst or the whole period's allowance): waiting does not help.
    CostExceedsLimit,
    /// No rule of the route table knows this route (HTTP 404): not a permission problem.
    UnknownRoute,
    /// A key arrived over plaintext (not TLS) from a peer that is not on this host, where
    /// `RequireTls` is in force (HTTP 403): whoever could see the traffic may have the key,
    /// so it is recorded as exposed (and may be disabled at once).
    InsecureTransport,
    /// A short-lived token (a signed JWT derived from an API key) whose `exp` has passed.
    ExpiredToken,
    /// A token that is not a well-formed signed JWT of this service, or whose signature or
    /// claims do not check out (a tampered token). The exact reason is in the detail.
    InvalidToken,
    /// A token signed with a key (`kid`) this service does not hold: another issuer's, or
    /// one rotated out. Clients read `invalid_token`; the audit record keeps this code.
    UnknownTokenKey,
    /// A token whose `alg` is not the one this service signs with (`none` among them).
    /// Clients read `invalid_token`; the audit record keeps this code.
    UnsupportedTokenAlgorithm,
}

impl DenialCode {
    /// Every code, in a stable order.
    pub const ALL: [DenialCode; 20] = [
        DenialCode::MissingKey,
        DenialCode::MalformedKey,
        DenialCode::InvalidKey,
        DenialCode::ExpiredKey,
        DenialCode::RevokedKey,
        DenialCode::DisabledKey,
        DenialCode::InsufficientScope,
        DenialCode::ResourceForbidden,
        DenialCode::IpNotAllowed,
        DenialCode::RateLimited,
        DenialCode::QuotaExceeded,
        DenialCode::StoreUnavailable,
        DenialCode::CorruptKey,
        DenialCode::CostExceedsLimit,
        DenialCode::UnknownRoute,
        DenialCode::InsecureTransport,
        DenialCode::ExpiredToken,
        DenialCode::InvalidToken,
        DenialCode::UnknownTokenKey,
        DenialCode::UnsupportedTokenAlgorithm,
    ];

    /// Which of keygate's checks refuses with this code: `auth` (the key or token,
    /// including a store that cannot be reached to decide), `scope`, `ip`, `rate_limit`,
    /// `quota`, `limit` (a single request costing more than a rate limit or quota ever
    /// allows, either of the two) or `require_tls`. For metrics and dashboards.
    pub const fn layer(self) -> &'static str {
        use DenialCode::*;
        match self {
            MissingKey
            | MalformedKey
            | InvalidKey
            | ExpiredKey
            | RevokedKey
            | DisabledKey
            | StoreUnavailable
            | CorruptKey
            | ExpiredToken
            | InvalidToken
            | UnknownTokenKey
            | UnsupportedTokenAlgorithm => "auth",
            InsufficientScope | ResourceForbidden | UnknownRoute => "scope",
            IpNotAllowed => "ip",
            RateLimited => "rate_limit",
            QuotaExceeded => "quota",
            CostExceedsLimit => "limit",
            InsecureTransport => "require_tls",
        }
    }

    /// The stable text form (`missing_key`, `rate_limited`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            DenialCode::MissingKey => "missing_key",
            DenialCode::MalformedKey => "malformed_key",
            DenialCode::InvalidKey => "invalid_key",
            DenialCode::ExpiredKey => "expired_key",
            DenialCode::RevokedKey => "revoked_key",
            DenialCode::DisabledKey => "disabled_key",
            DenialCode::InsufficientScope => "insufficient_scope",
            DenialCode::ResourceForbidden => "resource_forbidden",
            DenialCode::IpNotAllowed => "ip_not_allowed",
            DenialCode::RateLimited => "rate_limited",
            DenialCode::QuotaExceeded => "quota_exceeded",
            DenialCode::StoreUnavailable => "store_unavailable",
            DenialCode::CorruptKey => "corrupt_key",
            DenialCode::CostExceedsLimit => "cost_exceeds_limit",
            DenialCode::UnknownRoute => "unknown_route",
            DenialCode::InsecureTransport => "insecure_transport",
            DenialCode::ExpiredToken => "expired_token",
            DenialCode::InvalidToken => "invalid_token",
            DenialCode::UnknownTokenKey => "unknown_token_key",
            DenialCode::UnsupportedTokenAlgorithm => "unsupported_token_algorithm",
        }
    }

    /// Whether the code is about the credential itself (authentication, HTTP 401).
    pub const fn is_authentication(self) -> bool {
        matches!(
            self,
            DenialCode::MissingKey
                | DenialCode::MalformedKey
                | DenialCode::InvalidKey
                | DenialCode::ExpiredKey
                | DenialCode::RevokedKey
                | DenialCode::DisabledKey
                | DenialCode::CorruptKey
                | DenialCode::ExpiredToken
                | DenialCode::InvalidToken
                | DenialCode::UnknownTokenKey
                | DenialCode::UnsupportedTokenAlgorithm
        )
    }

    /// The code a client is shown by default: `revoked_key`, `disabled_key` and
    /// `corrupt_key` read `invalid_key`, `unknown_token_key` and
    /// `unsupported_token_algorithm` read `invalid_token`, so a client learns no more than it needs; every
    /// other code reads as itself. Audit records keep the exact code.
    pub const fn public(self) -> DenialCode {
        match self {
            DenialCode::RevokedKey | DenialCode::DisabledKey | DenialCode::CorruptKey => {
                DenialCode::InvalidKey
            }
            DenialCode::UnknownTokenKey | DenialCode::UnsupportedTokenAlgorithm => {
                DenialCode::InvalidToken
            }
            other => other,
        }
    }

    /// A short, fixed, secret-free sentence describing the code.
    pub const fn description(self) -> &'static str {
        match self {
            DenialCode::MissingKey => "No API key was provided.",
            DenialCode::MalformedKey => "The API key is not well-formed.",
            DenialCode::InvalidKey => "The API key is not valid.",
            DenialCode::ExpiredKey => "The API key has expired.",
            DenialCode::RevokedKey => "The API key has been revoked.",
            DenialCode::DisabledKey => "The API key is disabled.",
            DenialCode::InsufficientScope => "The API key lacks the scope this operation needs.",
            DenialCode::ResourceForbidden => "The API key may not access this resource.",
            DenialCode::IpNotAllowed => "Requests from this address are not allowed.",
            DenialCode::RateLimited => "Too many requests; slow down.",
            DenialCode::QuotaExceeded => "The quota for this period is used up.",
            DenialCode::StoreUnavailable => "The key store is unavailable; try again later.",
            DenialCode::CorruptKey => "The API key's stored record is unreadable.",
            DenialCode::CostExceedsLimit => {
                "This request costs more than the key's limit or quota allows at all; \
                 send a smaller request."
            }
            DenialCode::UnknownRoute => "No such route.",
            DenialCode::InsecureTransport => {
                "API keys must be sent over HTTPS; this key was sent in the clear and is \
                 treated as exposed."
            }
            DenialCode::ExpiredToken => "The access token has expired; request a new one.",
            DenialCode::InvalidToken => "The access token is not valid.",
            DenialCode::UnknownTokenKey => "The access token is signed with an unknown key.",
            DenialCode::UnsupportedTokenAlgorithm => {
                "The access token uses a signing algorithm this service does not accept."
            }
        }
    }
}

impl fmt::Display for DenialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a stable [`DenialCode`] plus optional details for the response.
///
/// It carries no secret: details are fixed strings or values the server chose (scope names,
/// wait times), never the presented credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Denial {
    code: DenialCode,
    detail: Option<Cow<'static, str>>,
    retry_after: Option<Duration>,
    required_scope: Option<Cow<'static, str>>,
    limits: Vec<LimitState>,
}

impl Denial {
    /// A denial with `code` and no details.
    pub const fn new(code: DenialCode) -> Self {
        Denial {
            code,
            detail: None,
            retry_after: None,
            required_scope: None,
            limits: Vec::new(),
        }
    }

    /// A `malformed_key` denial saying which check failed.
    pub fn malformed(err: KeyParseError) -> Self {
        let detail: &'static str = match err {
            KeyParseError::Empty => "The API key is empty.",
            KeyParseError::TooLong => "The API key is too long.",
            KeyParseError::MissingSeparator => "The API key has no prefix separator.",
            KeyParseError::UnknownPrefix => "The API key has an unknown prefix.",
            KeyParseError::BadLength => "The API key has the wrong length.",
            KeyParseError::BadCharacter => "The API key contains an invalid character.",
            KeyParseError::BadChecksum => "The API key checksum does not match.",
        };
        Denial::new(DenialCode::MalformedKey).with_detail(detail)
    }

    /// Adds a human-readable detail. Never put a credential here.
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds how long to wait before retrying (429, 503).
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Names the scope the operation needed (for `insufficient_scope`).
    pub fn with_required_scope(mut self, scope: impl Into<Cow<'static, str>>) -> Self {
        self.required_scope = Some(scope.into());
        self
    }

    /// Attaches the state of the rate-limit or quota policies that decided (those the
    /// request broke marked [`LimitState::violated`]); renderers write them as the
    /// `RateLimit-Policy` / `RateLimit` fields and `violated-policies`.
    pub fn with_limits(mut self, limits: Vec<LimitState>) -> Self {
        self.limits = limits;
        self
    }

    /// The state of the rate-limit or quota policies that decided (empty for other denials).
    pub fn limits(&self) -> &[LimitState] {
        &self.limits
    }

    /// The names of the policies the request broke.
    pub fn violated_policies(&self) -> impl Iterator<Item = &str> {
        self.limits
            .iter()
            .filter(|l| l.violated)
            .map(|l| l.name.as_str())
    }

    /// The exact code.
    pub fn code(&self) -> DenialCode {
        self.code
    }

    /// The detail, or the code's fixed description.
    pub fn detail(&self) -> &str {
        self.detail
            .as_deref()
            .unwrap_or_else(|| self.code.description())
    }

    /// How long to wait before retrying, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The scope the operation needed, if this is a scope denial.
    pub fn required_scope(&self) -> Option<&str> {
        self.required_scope.as_deref()
    }
}

impl From<DenialCode> for Denial {
    fn from(code: DenialCode) -> Self {
        Denial::new(code)
    }
}

impl fmt::Debug for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Denial")
            .field("code", &self.code.as_str())
            .field("detail", &self.detail())
            .field("retry_after", &self.retry_after)
            .field("required_scope", &self.required_scope)
            .field("limits", &self.limits)
            .finish()
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail())
    }
}

impl std::error::Error for Denial {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_names_its_layer() {
        let layers: std::collections::BTreeSet<&str> =
            DenialCode::ALL.iter().map(|c| c.layer()).collect();
        assert_eq!(
            layers.into_iter().collect::<Vec<_>>(),
            [
                "auth",
                "ip",
                "limit",
                "quota",
                "rate_limit",
                "require_tls",
                "scope"
            ]
        );
        assert_eq!(DenialCode::MissingKey.layer(), "auth");
        assert_eq!(DenialCode::ExpiredToken.layer(), "auth");
        assert_eq!(DenialCode::ResourceForbidden.layer(), "scope");
        assert_eq!(DenialCode::QuotaExceeded.layer(), "quota");
    }

    #[test]
    fn codes_are_stable_and_distinct() {
        let names: Vec<&str> = DenialCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "missing_key",
                "malformed_key",
                "invalid_key",
                "expired_key",
                "revoked_key",
                "disabled_key",
                "insufficient_scope",
                "resource_forbidden",
                "ip_not_allowed",
                "rate_limited",
                "quota_exceeded",
                "store_unavailable",
                "corrupt_key",
                "cost_exceeds_limit",
                "unknown_route",
                "insecure_transport",
                "expired_token",
                "invalid_token",
                "unknown_token_key",
                "unsupported_token_algorithm"
            ]
        );
        // Token codes: a foreign key or algorithm reads invalid_token; all are 401s.
        assert_eq!(
            DenialCode::UnknownTokenKey.public(),
            DenialCode::InvalidToken
        );
        assert_eq!(
            DenialCode::UnsupportedTokenAlgorithm.public(),
            DenialCode::InvalidToken
        );
        assert_eq!(DenialCode::ExpiredToken.public(), DenialCode::ExpiredToken);
        assert!(DenialCode::ALL[16..].iter().all(|c| c.is_authentication()));
        assert_eq!(DenialCode::RevokedKey.public(), DenialCode::InvalidKey);
        assert_eq!(DenialCode::DisabledKey.public(), DenialCode::InvalidKey);
        assert_eq!(DenialCode::CorruptKey.public(), DenialCode::InvalidKey);
        assert_eq!(DenialCode::ExpiredKey.public(), DenialCode::ExpiredKey);
    }
}
