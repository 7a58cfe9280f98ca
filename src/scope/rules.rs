//! Route tables: method + path pattern -> required scope, and which path parameter names the
//! resource.

use std::fmt;
use std::ops::Range;

use http::Method;

use crate::{InvalidScope, Scope};

/// Why a route table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRule {
    /// The scope does not parse.
    #[error(transparent)]
    Scope(#[from] InvalidScope),
    /// The path pattern is not valid.
    #[error("invalid path pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern (shortened).
        pattern: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The method is not a valid HTTP method.
    #[error("invalid method {0:?}")]
    Method(String),
}

fn bad_pattern(pattern: &str, reason: &'static str) -> InvalidRule {
    InvalidRule::Pattern {
        pattern: pattern.chars().take(128).collect(),
        reason,
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param(Box<str>),
}

/// A parsed path pattern: `/collections/{collection}/points/search` or a gRPC path
/// `/qdrant.Points/Search`. Segments are literal or `{name}` (one whole segment); literals
/// are compared to the raw (still percent-encoded) request path, exactly. A trailing slash
/// is a segment of its own: `/collections/` does not match `/collections`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PathPattern {
    text: Box<str>,
    segments: Box<[Segment]>,
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

/// At most this many path segments are matched (longer paths match no rule).
const MAX_SEGMENTS: usize = 32;

impl PathPattern {
    pub(crate) fn parse(pattern: &str) -> Result<Self, InvalidRule> {
        let rest = pattern
            .strip_prefix('/')
            .ok_or_else(|| bad_pattern(pattern, "must start with /"))?;
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if let Some(inner) = seg.strip_prefix('{') {
                let name = inner
                    .strip_suffix('}')
                    .ok_or_else(|| bad_pattern(pattern, "a parameter must be a whole {segment}"))?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(bad_pattern(pattern, "parameter names are [A-Za-z0-9_]+"));
                }
                if segments
                    .iter()
                    .any(|s| matches!(s, Segment::Param(n) if &**n == name))
                {
                    return Err(bad_pattern(pattern, "a parameter name appears twice"));
                }
                segments.push(Segment::Param(name.into()));
            } else {
                if seg.contains(['{', '}']) {
                    return Err(bad_pattern(
                        pattern,
                        "a parameter must be a whole {segment}",
                    ));
                }
                if seg
                    .bytes()
                    .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
                {
                    return Err(bad_pattern(
                        pattern,
                        "literals must not contain spaces, controls, ? or #",
                    ));
                }
                segments.push(Segment::Literal(seg.into()));
            }
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(bad_pattern(pattern, "more than 32 segments"));
        }
        Ok(PathPattern {
            text: pattern.into(),
            segments: segments.into(),
        })
    }

    pub(crate) fn has_param(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Param(n) if &**n == name))
    }

    /// The index of segment parameter `name`, if the pattern has it.
    fn param_index(&self, name: &str) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| matches!(s, Segment::Param(n) if &**n == name))
    }

    /// Matches `path` (without query); on success returns the byte range of parameter
    /// `param` in `path`, if the pattern has it.
    pub(crate) fn matches(&self, path: &str, param: Option<&str>) -> Option<Option<Range<usize>>> {
        let split = SplitPath::new(path)?;
        self.matches_split(path, &split, param.and_then(|p| self.param_index(p)))
    }

    /// Matches an already split path; `resource_at` is the segment index of the resource
    /// parameter.
    fn matches_split(
        &self,
        path: &str,
        split: &SplitPath,
        resource_at: Option<usize>,
    ) -> Option<Option<Range<usize>>> {
        let parts = split.parts();
        if parts.len() != self.segments.len() {
            return None;
        }
        let bytes = path.as_bytes();
        for (seg, &(a, b)) in self.segments.iter().zip(parts) {
            let (a, b) = (a as usize, b as usize);
            match seg {
                Segment::Literal(l) => {
                    if bytes[a..b] != *l.as_bytes() {
                        return None;
                    }
                }
                Segment::Param(_) => {
                    if a == b {
                        return None;
                    }
                }
            }
        }
        Some(resource_at.map(|i| parts[i].0 as usize..parts[i].1 as usize))
    }
}

/// A request path split once into the byte ranges of its segments (no allocation).
pub(crate) struct SplitPath {
    /// `(start, end)` byte offsets of each segment (32-bit: a URI is far shorter).
    bounds: [(u32, u32); MAX_SEGMENTS],
    len: usize,
}

impl SplitPath {
    /// `None` when the path does not start with `/` or has more than 32 segments.
    pub(crate) fn new(path: &str) -> Option<Self> {
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') || u32::try_from(bytes.len()).is_err() {
            return None;
        }
        let mut split = SplitPath {
            bounds: [(0, 0); MAX_SEGMENTS],
            len: 0,
        };
        // Offsets fit in u32 (checked above).
        let mut start = 1u32;
        for (i, &c) in bytes[1..].iter().enumerate() {
            if c == b'/' {
                if split.len == MAX_SEGMENTS {
                    return None;
                }
                let at = i as u32 + 1;
                split.bounds[split.len] = (start, at);
                split.len += 1;
                start = at + 1;
            }
        }
        if split.len == MAX_SEGMENTS {
            return None;
        }
        split.bounds[split.len] = (start, bytes.len() as u32);
        split.len += 1;
        Some(split)
    }

    fn parts(&self) -> &[(u32, u32)] {
        &self.bounds[..self.len]
    }
}

/// What a matched rule asks for.
#[derive(Debug, Clone)]
pub(crate) enum Need {
    /// No key needed.
    Public,
    /// This scope, and (when the pattern names it) access to the resource in the path.
    Scope(Scope),
}

#[derive(Debug, Clone)]
struct Rule {
    method: Option<Method>,
    pattern: PathPattern,
    need: Need,
    /// The segment index of the resource parameter, when the pattern has it.
    resource: Option<usize>,
}

/// What a [`ScopeLayer`](super::ScopeLayer) with a [`RouteScopes`] table answers for a
/// request that no rule of the table matches (method and path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Unmatched {
    /// 404 `unknown_route` (gRPC 12 UNIMPLEMENTED) for an authenticated caller: the route
    /// does not exist, which is not a permission problem. A caller without a valid key gets
    /// its authentication verdict (401) first, so anonymous callers learn nothing about
    /// which routes exist. The default.
    #[default]
    UnknownRoute,
    /// 403 `insufficient_scope` with the detail "No rule grants access to this route." (the
    /// answer before `unknown_route` existed), for services whose clients rely on it.
    InsufficientScope,
    /// The request goes on to the inner service unchecked (and without needing a key).
    Pass,
}

/// A route table: for each request, the first rule whose method and path pattern match says
/// which scope it needs and which path parameter names the resource (collection).
///
/// ```
/// use keygate::scope::RouteScopes;
///
/// let rules = RouteScopes::builder()
///     .route("GET", "/collections", "collections:read")
///     .route("PUT", "/collections/{collection}", "collections:manage")
///     // Qdrant sends reads as POST: declare them as reads.
///     .reads("POST", ["/collections/{collection}/points/search",
///                     "/collections/{collection}/points/scroll"], "points:read")
///     .grpc("/qdrant.Points/Search", "points:read")
///     .public("GET", "/healthz")
///     .build()
///     .unwrap();
/// # let _ = rules;
/// ```
///
/// A request matching no rule is denied 404 `unknown_route` (after authentication: a caller
/// without a valid key gets 401 first), or as [`RouteScopesBuilder::unmatched`] says
/// ([`Unmatched::InsufficientScope`] keeps the older 403; [`Unmatched::Pass`], also set by
/// [`RouteScopesBuilder::allow_unmatched`], lets it through). The resource is the parameter named
/// `collection` unless [`RouteScopesBuilder::resource_param`] says otherwise; its value is
/// percent-decoded before it is checked against the key's resource patterns (a value that
/// does not decode to UTF-8, or decodes to a name with `/` or a control character, is
/// forbidden). `HEAD` requests match `GET` rules, as axum serves them from GET routes.
#[derive(Debug, Clone)]
pub struct RouteScopes {
    rules: Vec<Rule>,
    /// Rule indexes by segment count, in table order: only rules with as many segments as
    /// the path can match it.
    by_len: Vec<Vec<usize>>,
    unmatched: Unmatched,
}

/// Builds a [`RouteScopes`]. Errors are collected and reported by
/// [`RouteScopesBuilder::build`], so a bad rule fails at start-up, never at request time.
#[derive(Debug, Clone)]
pub struct RouteScopesBuilder {
    entries: Vec<(String, String, Option<String>)>,
    resource_param: String,
    unmatched: Unmatched,
}

impl RouteScopes {
    /// Starts a table.
    pub fn builder() -> RouteScopesBuilder {
        RouteScopesBuilder {
            entries: Vec::new(),
            resource_param: "collection".to_owned(),
            unmatched: Unmatched::default(),
        }
    }

    /// The index of the first rule matching `method` and `path`, and where the resource is
    /// in the path.
    pub(crate) fn find_index(
        &self,
        method: &Method,
        path: &str,
    ) -> Option<(usize, Option<Range<usize>>)> {
        let split = SplitPath::new(path)?;
        let candidates = self.by_len.get(split.len)?;
        candidates.iter().find_map(|&i| {
            let rule = &self.rules[i];
            if let Some(m) = &rule.method {
                // HEAD is served by GET routes (as axum does), so GET rules cover it.
                let same = m == method || (*m == Method::GET && method == Method::HEAD);
                if !same {
                    return None;
                }
            }
            let resource = rule.pattern.matches_split(path, &split, rule.resource)?;
            Some((i, resource))
        })
    }

    /// What rule `index` needs.
    pub(crate) fn need(&self, index: usize) -> &Need {
        &self.rules[index].need
    }

    /// Whether some requests pass whoever calls (a public rule, or unmatched requests pass).
    pub(crate) fn may_pass_anyone(&self) -> bool {
        self.allows_unmatched() || self.rules.iter().any(|r| matches!(r.need, Need::Public))
    }

    /// Whether requests that match no rule pass.
    pub fn allows_unmatched(&self) -> bool {
        self.unmatched == Unmatched::Pass
    }

    /// What requests that match no rule get.
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// The scopes the table's rules require, each once, with whether every rule requiring
    /// it names a resource (so a key holding it but no resource can use none of them): the
    /// vocabulary to register where keys are issued (`SqlStore::register_scopes`, the admin
    /// API's `scope_vocabulary`), so a typo in a new key's scope is refused.
    pub fn scopes(&self) -> Vec<crate::KnownScope> {
        let mut out: Vec<crate::KnownScope> = Vec::new();
        for rule in &self.rules {
            let Need::Scope(scope) = &rule.need else {
                continue;
            };
            let text = scope.to_string();
            let needs = rule.resource.is_some();
            match out.iter_mut().find(|k| k.scope == text) {
                Some(k) => k.needs_collection &= needs,
                None => out.push(crate::KnownScope::new(text, needs)),
            }
        }
        out
    }
}

impl RouteScopesBuilder {
    /// A rule: requests with `method` (`GET`, `POST`, ..., or `*` for any) on paths matching
    /// `pattern` need `scope`, and access to the resource named by the resource parameter
    /// when the pattern has it.
    pub fn route(mut self, method: &str, pattern: &str, scope: &str) -> Self {
        self.entries.push((
            method.to_owned(),
            pattern.to_owned(),
            Some(scope.to_owned()),
        ));
        self
    }

    /// Several paths with one method and one scope: for reads sent as POST (search, query,
    /// scroll, count, retrieve).
    pub fn reads<I, T>(mut self, method: &str, patterns: I, scope: &str) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        for p in patterns {
            self = self.route(method, p.as_ref(), scope);
        }
        self
    }

    /// A gRPC method (`/package.Service/Method`) needing `scope`. gRPC carries the
    /// collection in the message body, which a layer does not read: check it in the handler
    /// with [`Principal::can_access`](crate::Principal::can_access).
    pub fn grpc(self, path: &str, scope: &str) -> Self {
        self.route("POST", path, scope)
    }

    /// A route that needs no key.
    pub fn public(mut self, method: &str, pattern: &str) -> Self {
        self.entries
            .push((method.to_owned(), pattern.to_owned(), None));
        self
    }

    /// The path parameter that names the resource (default `collection`).
    pub fn resource_param(mut self, name: &str) -> Self {
        self.resource_param = name.to_owned();
        self
    }

    /// Lets requests that match no rule pass (`true`: [`Unmatched::Pass`]) or not (`false`:
    /// the default, [`Unmatched::UnknownRoute`]).
    pub fn allow_unmatched(mut self, yes: bool) -> Self {
        self.unmatched = if yes {
            Unmatched::Pass
        } else {
            Unmatched::default()
        };
        self
    }

    /// What requests that match no rule get (default [`Unmatched::UnknownRoute`]: 404).
    pub fn unmatched(mut self, unmatched: Unmatched) -> Self {
        self.unmatched = unmatched;
        self
    }

    /// Validates every rule and builds the table.
    pub fn build(self) -> Result<RouteScopes, InvalidRule> {
        let mut rules = Vec::with_capacity(self.entries.len());
        for (method, pattern, scope) in self.entries {
            let method = if method == "*" {
                None
            } else {
                Some(
                    Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                        .map_err(|_| InvalidRule::Method(method.chars().take(32).collect()))?,
                )
            };
            let pattern = PathPattern::parse(&pattern)?;
            let need = match scope {
                Some(s) => Need::Scope(Scope::parse(&s)?),
                None => Need::Public,
            };
            let resource = pattern.param_index(&self.resource_param);
            rules.push(Rule {
                method,
                pattern,
                need,
                resource,
            });
        }
        let mut by_len: Vec<Vec<usize>> = vec![Vec::new(); MAX_SEGMENTS + 1];
        for (i, rule) in rules.iter().enumerate() {
            by_len[rule.pattern.segments.len()].push(i);
        }
        Ok(RouteScopes {
            rules,
            by_len,
            unmatched: self.unmatched,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segments as `str::split` sees them (what the byte loop must reproduce).
    fn reference(path: &str) -> Option<Vec<(usize, usize)>> {
        let rest = path.strip_prefix('/')?;
        let mut out = Vec::new();
        let mut start = 1;
        for part in rest.split('/') {
            out.push((start, start + part.len()));
            start += part.len() + 1;
        }
        (out.len() <= MAX_SEGMENTS).then_some(out)
    }

    #[test]
    fn split_path_matches_str_split() {
        let long32 = "/a".repeat(32);
        let long33 = "/a".repeat(33);
        let trailing32 = format!("{}/", "/a".repeat(31));
        let trailing33 = format!("{}/", "/a".repeat(32));
        for p in [
            "/",
            "//",
            "/a",
            "/a/",
            "/collections/docs/points/search",
            "///x//",
            "/é/ü",
            "",
            "a/b",
            &long32,
            &long33,
            &trailing32,
            &trailing33,
        ] {
            let got = SplitPath::new(p).map(|s| {
                s.parts()
                    .iter()
                    .map(|&(a, b)| (a as usize, b as usize))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, reference(p), "{p:?}");
        }
    }

    #[test]
    fn head_requests_match_get_rules_and_first_rule_wins() {
        let t = RouteScopes::builder()
            .route("GET", "/collections/{collection}", "collections:read")
            .route("*", "/collections/{collection}", "collections:manage")
            .build()
            .unwrap();
        let (i, r) = t.find_index(&Method::HEAD, "/collections/abc").unwrap();
        assert_eq!(i, 0);
        assert_eq!(r, Some(13..16));
        let (i, _) = t.find_index(&Method::DELETE, "/collections/abc").unwrap();
        assert_eq!(i, 1);
        assert!(t.find_index(&Method::GET, "/collections/").is_none());
        assert!(t.find_index(&Method::GET, "/collections").is_none());
        let long = "/a".repeat(40);
        assert!(t.find_index(&Method::GET, &long).is_none());
    }

    #[test]
    fn scopes_lists_each_required_scope_once() {
        let rules = RouteScopes::builder()
            .route("GET", "/collections", "collections:read")
            .route("GET", "/collections/{collection}", "collections:read")
            .route("POST", "/collections/{collection}/points", "points:read")
            .route(
                "GET",
                "/collections/{collection}/points/{id}",
                "points:read",
            )
            .public("GET", "/healthz")
            .build()
            .unwrap();
        let scopes = rules.scopes();
        assert_eq!(
            scopes,
            [
                crate::KnownScope::new("collections:read", false),
                crate::KnownScope::new("points:read", true),
            ]
        );
    }
}
