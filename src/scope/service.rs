use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use http::Request;

use super::rules::{Need, PathPattern, RouteScopes, Unmatched};
use crate::check::{Caller, Check, Guarded, One};
use crate::{Denial, DenialCode, Principal};

/// What a [`Scope`] service enforces.
#[derive(Debug)]
pub(crate) enum Policy {
    Require {
        scope: crate::Scope,
        resource: Option<(PathPattern, Box<str>)>,
    },
    Table(RouteScopes),
}

/// Middleware that checks scopes and resources. See [`ScopeLayer`](super::ScopeLayer).
///
/// Not to be confused with [`keygate::Scope`](crate::Scope), one scope a key holds (a
/// different path: the layers' services are named after their feature, as
/// [`IpAllow`](crate::ip::IpAllow) and [`Quota`](crate::quota::Quota) are).
pub type Scope<S> = Guarded<One<ScopeCheck>, S>;

/// Where the request landed in the policy, found before resolution.
enum Decision {
    /// No rule matched (and unmatched requests are denied).
    Unmatched,
    /// A table rule needing a scope.
    Rule {
        index: usize,
        resource: Option<Range<usize>>,
    },
    /// `require`; `Err(())` when the resource pattern did not match.
    Require {
        resource: Result<Option<Range<usize>>, ()>,
    },
}

/// The scope check: the caller's scopes and collection patterns against the route's need.
#[derive(Clone, Debug)]
pub struct ScopeCheck {
    policy: Arc<Policy>,
    /// Whether some requests pass whoever calls (no key verified for them).
    open: bool,
}

impl ScopeCheck {
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        let open = matches!(&*policy, Policy::Table(t) if t.may_pass_anyone());
        ScopeCheck { policy, open }
    }

    /// Where `req` lands in the policy; `None` when it passes whoever calls (a public rule,
    /// or an unmatched route the table lets through).
    fn decide<B>(&self, req: &Request<B>) -> Option<Decision> {
        Some(match &*self.policy {
            Policy::Table(table) => match table.find_index(req.method(), req.uri().path()) {
                Some((index, _)) if matches!(table.need(index), Need::Public) => return None,
                Some((index, resource)) => Decision::Rule { index, resource },
                None if table.allows_unmatched() => return None,
                None => Decision::Unmatched,
            },
            Policy::Require { resource, .. } => Decision::Require {
                resource: match resource {
                    None => Ok(None),
                    Some((pattern, param)) => {
                        pattern.matches(req.uri().path(), Some(param)).ok_or(())
                    }
                },
            },
        })
    }
}

impl Check for ScopeCheck {
    type Note = ();

    /// Pure (it only reads the request and its caller): it may run ahead of an earlier
    /// check's I/O.
    fn speculative(&self) -> bool {
        true
    }

    fn needs_caller<B>(&self, req: &Request<B>) -> bool {
        !self.open || self.decide(req).is_some()
    }

    fn check<B>(&self, req: &mut Request<B>, who: Caller<'_>) -> Result<(), Denial> {
        let Some(decision) = self.decide(req) else {
            return Ok(());
        };
        let principal = who.map_err(Denial::clone)?;
        let (scope, resource) = match (&*self.policy, decision) {
            (Policy::Table(table), Decision::Unmatched)
                if table.unmatched() == Unmatched::UnknownRoute =>
            {
                return Err(Denial::new(DenialCode::UnknownRoute)
                    .with_detail("No route of this service matches this method and path."))
            }
            (_, Decision::Unmatched) => {
                return Err(Denial::new(DenialCode::InsufficientScope)
                    .with_detail("No rule grants access to this route."))
            }
            (Policy::Table(table), Decision::Rule { index, resource }) => match table.need(index) {
                Need::Scope(scope) => (scope, resource),
                Need::Public => return Ok(()),
            },
            (Policy::Require { scope, .. }, Decision::Require { resource }) => match resource {
                Ok(r) => (scope, r),
                Err(()) => {
                    return Err(Denial::new(DenialCode::ResourceForbidden)
                        .with_detail("The path names no resource this route allows."))
                }
            },
            _ => return Err(Denial::new(DenialCode::InsufficientScope)),
        };
        if !principal.has_scope(scope) {
            return Err(
                Denial::new(DenialCode::InsufficientScope).with_required_scope(scope.to_string())
            );
        }
        if let Some(range) = resource {
            let raw = req.uri().path().get(range).unwrap_or("");
            let name = decode(raw);
            let allowed = name.as_deref().is_some_and(|n| principal.can_access(n));
            if !allowed {
                return Err(resource_forbidden(name.as_deref(), principal));
            }
            // Grants pair scopes with collections: the scope must be granted on this one.
            if name
                .as_deref()
                .is_some_and(|n| !principal.permits(scope, n))
            {
                return Err(Denial::new(DenialCode::InsufficientScope)
                    .with_required_scope(scope.to_string())
                    .with_detail(
                        "The API key holds this scope only on other collections, not this one.",
                    ));
            }
        }
        Ok(())
    }
}

/// Longest collection name echoed in a `resource_forbidden` detail.
const MAX_ECHOED_NAME: usize = 64;

/// The `resource_forbidden` denial for collection `name` (`None`: the path segment does not
/// decode to a name any pattern may hold). The name is the caller's own input: echoed
/// quoted and escaped when it is short printable ASCII, described otherwise. The key's
/// patterns are never listed (they may name other tenants' collections).
fn resource_forbidden(name: Option<&str>, principal: &Principal) -> Denial {
    let Some(name) = name else {
        return Denial::new(DenialCode::ResourceForbidden).with_detail(
            "The collection name in the path is not valid (it must decode to UTF-8 without \
             '/' or control characters).",
        );
    };
    let shown = if name.is_empty() {
        "The empty collection name".to_owned()
    } else if name.len() <= MAX_ECHOED_NAME && name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        // `{:?}` quotes the name and escapes `"` and `\`.
        format!("Collection {name:?}")
    } else {
        format!("The collection asked for ({} bytes, not shown)", name.len())
    };
    let why = if principal.resources().is_empty() {
        "the API key has no collection patterns, so it may access no collection"
    } else {
        "it matches none of the API key's collection patterns"
    };
    Denial::new(DenialCode::ResourceForbidden).with_detail(format!("{shown} is refused: {why}."))
}

/// Percent-decodes a path segment; `None` if it does not decode to UTF-8 or decodes to a
/// name no resource pattern may hold (`/`, control characters).
fn decode(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.contains('%') {
        // The URI parser lets non-ASCII bytes through, C1 controls among them.
        return (!raw.chars().any(char::is_control)).then_some(Cow::Borrowed(raw));
    }
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decoded_names_with_slashes_or_controls_are_refused() {
        assert_eq!(decode("tenant-a").as_deref(), Some("tenant-a"));
        assert_eq!(decode("tenant%2Da").as_deref(), Some("tenant-a"));
        assert_eq!(decode("100%"), Some("100%".into()));
        assert_eq!(decode("tenant-x%2F..%2Fother"), None);
        assert_eq!(decode("a%00b"), None);
        assert_eq!(decode("%FF"), None);
    }
}
