//! Where a request carries its key, and how it is read.

use std::borrow::Cow;

use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Request, Uri};

use crate::{Denial, DenialCode, Prefix};

/// One place a request may carry its key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// `Authorization: Bearer <key>` (RFC 6750). The scheme is matched case-insensitively;
    /// an `Authorization` header with another scheme (`Basic ...`) is not a keygate
    /// credential and is ignored.
    Bearer,
    /// A header whose whole value is the key (`X-API-Key`, Qdrant's `api-key`).
    Header(HeaderName),
    /// A query parameter (`?api_key=...`). Off unless configured: URLs end up in logs,
    /// browser history and referrers.
    Query(Cow<'static, str>),
}

/// The places a request may carry its key, in order. Every configured place is read; a
/// request that carries two *different* values (in two places or twice in one) is
/// `malformed_key`, never a guess. The same key in two places is fine.
///
/// Rules, each tested:
/// - a present but empty value (an empty `Authorization` header included), `Bearer` with no
///   token, or a token with inner whitespace: `malformed_key`;
/// - non-ASCII or non-UTF-8 bytes in a credential header: `malformed_key`;
/// - leading and trailing spaces and tabs around a value are not part of it (RFC 9110
///   field values) and are ignored;
/// - no credential at all: `missing_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    sources: Vec<CredentialSource>,
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static API_KEY: HeaderName = HeaderName::from_static("api-key");

impl Default for Credentials {
    /// `Authorization: Bearer`, `X-API-Key` and `api-key`; no query parameter.
    fn default() -> Self {
        Credentials {
            sources: vec![
                CredentialSource::Bearer,
                CredentialSource::Header(X_API_KEY.clone()),
                CredentialSource::Header(API_KEY.clone()),
            ],
        }
    }
}

impl Credentials {
    /// Exactly these sources.
    pub fn new(sources: impl IntoIterator<Item = CredentialSource>) -> Self {
        Credentials {
            sources: sources.into_iter().collect(),
        }
    }

    /// Adds a header carrying the bare key.
    pub fn with_header(mut self, name: HeaderName) -> Self {
        let source = CredentialSource::Header(name);
        if !self.sources.contains(&source) {
            self.sources.push(source);
        }
        self
    }

    /// Also reads the key from the query parameter `name`.
    pub fn with_query(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        let source = CredentialSource::Query(name.into());
        if !self.sources.contains(&source) {
            self.sources.push(source);
        }
        self
    }

    /// The configured sources.
    pub fn sources(&self) -> &[CredentialSource] {
        &self.sources
    }

    /// Reads the credential of a request: `Ok(None)` when there is none, `Err` with a
    /// `malformed_key` denial when what is there cannot be a key. Borrows from the request;
    /// allocates only for a percent-encoded query value.
    pub fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        uri: &'a Uri,
    ) -> Result<Option<Cow<'a, str>>, Denial> {
        let mut found: Option<Cow<'a, str>> = None;
        let mut offer = |candidate: Cow<'a, str>| -> Result<(), Denial> {
            match &found {
                Some(prev) if *prev != candidate => Err(malformed(
                    "The request carries more than one different API key.",
                )),
                Some(_) => Ok(()),
                None => {
                    found = Some(candidate);
                    Ok(())
                }
            }
        };
        // One pass over the header fields, each matched against the header sources.
        for (name, value) in headers {
            let Some(source) = self.header_source(name) else {
                continue;
            };
            match source {
                CredentialSource::Bearer => {
                    if let Some(token) = bearer_token(value)? {
                        offer(Cow::Borrowed(token))?;
                    }
                }
                _ => {
                    let text = value.to_str().map_err(|_| non_ascii())?;
                    let text = text.trim_matches(is_ows);
                    if text.is_empty() {
                        return Err(malformed("An API key header is present but empty."));
                    }
                    offer(Cow::Borrowed(text))?;
                }
            }
        }
        for source in &self.sources {
            match source {
                CredentialSource::Bearer | CredentialSource::Header(_) => {}
                CredentialSource::Query(param) => {
                    let Some(query) = uri.query() else { continue };
                    for pair in query.split('&') {
                        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                        if name != param.as_ref() {
                            continue;
                        }
                        let value: Cow<'a, str> = if value.contains(['%', '+']) {
                            form_urlencoded::parse(pair.as_bytes())
                                .next()
                                .map(|(_, v)| Cow::Owned(v.into_owned()))
                                .unwrap_or_default()
                        } else {
                            Cow::Borrowed(value)
                        };
                        if value.is_empty() {
                            return Err(malformed("The API key query parameter is empty."));
                        }
                        offer(value)?;
                    }
                }
            }
        }
        Ok(found)
    }

    /// The header source that reads header `name`, if any.
    fn header_source(&self, name: &HeaderName) -> Option<&CredentialSource> {
        self.sources.iter().find(|s| match s {
            CredentialSource::Bearer => *name == AUTHORIZATION,
            CredentialSource::Header(h) => h == name,
            CredentialSource::Query(_) => false,
        })
    }

    /// Removes every configured credential from the request, so the inner service never sees
    /// the key: the credential headers, `Authorization` only when it uses the Bearer scheme,
    /// and the query parameter.
    pub fn strip<B>(&self, req: &mut Request<B>) {
        for source in &self.sources {
            match source {
                CredentialSource::Bearer => {
                    // The same scheme test as `extract`: the first word, without case.
                    let bearer = req.headers().get_all(AUTHORIZATION).iter().any(|v| {
                        let v = v.as_bytes().trim_ascii_start();
                        let scheme = v.split(is_ows_byte).next().unwrap_or_default();
                        scheme.eq_ignore_ascii_case(b"bearer")
                    });
                    if bearer {
                        req.headers_mut().remove(AUTHORIZATION);
                    }
                }
                CredentialSource::Header(name) => {
                    req.headers_mut().remove(name);
                }
                CredentialSource::Query(param) => strip_query(req, param),
            }
        }
    }
}

impl Credentials {
    /// The `missing_key` denial of a request in which [`extract`](Self::extract) found no
    /// credential. When something shaped like a key (it starts with one of `prefixes` and
    /// `_`, or has the key format: a prefix, `_`, 40 base62 characters) sits where keys are
    /// not read (`Authorization` without `Bearer` or with another scheme, another header, a
    /// query parameter that is not configured), the detail says where it was found and
    /// where keys go; the value itself is never echoed. Only called once no credential was
    /// found, so the requests that carry one pay nothing for it.
    pub fn missing(&self, headers: &HeaderMap, uri: &Uri, prefixes: &[Prefix]) -> Denial {
        let denial = Denial::new(DenialCode::MissingKey);
        match self.misplaced(headers, uri, prefixes) {
            Some(place) => denial.with_detail(format!(
                "No API key was provided where keys are read. Something shaped like an API key \
                 was found in {place}, where keys are not read (it is not shown here); send \
                 the key in {}.",
                self.where_keys_go()
            )),
            None => denial,
        }
    }

    /// Where a key-shaped value sits outside the configured sources, described.
    fn misplaced(&self, headers: &HeaderMap, uri: &Uri, prefixes: &[Prefix]) -> Option<String> {
        let shaped = |t: &str| key_shaped(t, prefixes);
        let bearer = self.sources.contains(&CredentialSource::Bearer);
        for value in headers.get_all(AUTHORIZATION) {
            let Ok(text) = value.to_str() else { continue };
            let mut words = text.split([' ', '\t']).filter(|w| !w.is_empty());
            let (Some(first), second) = (words.next(), words.next()) else {
                continue;
            };
            if shaped(first) {
                return Some("the Authorization header without the Bearer scheme".to_owned());
            }
            if second.is_some_and(shaped) {
                if first.eq_ignore_ascii_case("bearer") && !bearer {
                    return Some("the Authorization header (Bearer)".to_owned());
                }
                return Some(format!(
                    "the Authorization header with the {} scheme (only Bearer is read)",
                    safe_name(first, 20).map_or("another".to_owned(), |s| format!("{s:?}"))
                ));
            }
        }
        for (name, value) in headers {
            if *name == AUTHORIZATION {
                continue;
            }
            let Ok(text) = value.to_str() else { continue };
            if text
                .split([' ', '\t', ',', ';', '=', '"'])
                .any(|t| !t.is_empty() && shaped(t))
            {
                // A name that is itself key-shaped is not shown: it may be a key.
                return Some(match safe_name(name.as_str(), 64).filter(|n| !shaped(n)) {
                    Some(n) => format!("the {n:?} header"),
                    None => "a request header".to_owned(),
                });
            }
        }
        if let Some(query) = uri.query() {
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                if shaped(value.trim_matches(is_ows)) {
                    return Some(match safe_name(&name, 64).filter(|n| !shaped(n)) {
                        Some(n) => format!("the query parameter {n:?}"),
                        None => "a query parameter".to_owned(),
                    });
                }
            }
        }
        None
    }

    /// The configured sources, described for a person.
    fn where_keys_go(&self) -> String {
        let mut places: Vec<String> = self
            .sources
            .iter()
            .map(|s| match s {
                CredentialSource::Bearer => "the Authorization header as \"Bearer <key>\"".into(),
                CredentialSource::Header(n) => format!("the {:?} header", n.as_str()),
                CredentialSource::Query(p) => format!("the {p:?} query parameter"),
            })
            .collect();
        match places.len() {
            0 => "no place: this service reads no keys".to_owned(),
            1 => places.remove(0),
            n => {
                let last = places.remove(n - 1);
                format!("{} or {last}", places.join(", "))
            }
        }
    }
}

/// `name` if it is at most `max` characters of `[A-Za-z0-9_.-]` (safe to echo).
fn safe_name(name: &str, max: usize) -> Option<&str> {
    (!name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    .then_some(name)
}

/// Whether `t` looks like an API key: one of `prefixes` then `_`, or the key format of any
/// prefix (`[a-z][a-z0-9]*(_[a-z0-9]+)*`, `_`, 40 base62 characters).
fn key_shaped(t: &str, prefixes: &[Prefix]) -> bool {
    if prefixes.iter().any(|p| {
        t.strip_prefix(p.as_str())
            .is_some_and(|rest| rest.starts_with('_') && rest.len() > 1)
    }) {
        return true;
    }
    const BODY: usize = 40;
    let b = t.as_bytes();
    if b.len() < BODY + 2 || b[b.len() - BODY - 1] != b'_' {
        return false;
    }
    let (prefix, body) = (&b[..b.len() - BODY - 1], &b[b.len() - BODY..]);
    body.iter().all(u8::is_ascii_alphanumeric)
        && prefix[0].is_ascii_lowercase()
        && prefix.split(|c| *c == b'_').all(|part| {
            !part.is_empty()
                && part
                    .iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

fn strip_query<B>(req: &mut Request<B>, param: &str) {
    let Some(query) = req.uri().query() else {
        return;
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) != param)
        .collect();
    if kept.len() == query.split('&').count() {
        return;
    }
    let path = req.uri().path();
    let path_and_query = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_ows_byte(c: &u8) -> bool {
    *c == b' ' || *c == b'\t'
}

/// The token of one `Authorization` value: `Ok(None)` for another scheme, `Err` when the
/// value is not visible ASCII or the Bearer token is missing or contains whitespace.
///
/// The steps of the string form (`to_str`, trim spaces and tabs, split the scheme at the
/// first space or tab, compare it without case, trim the token), done on byte offsets
/// into the one validated `&str`: it runs on every request, and this is about half the
/// cost of the `str` pattern API.
fn bearer_token(value: &HeaderValue) -> Result<Option<&str>, Denial> {
    let text = value.to_str().map_err(|_| non_ascii())?;
    // `text` is ASCII, so every byte offset below is a character boundary.
    let b = text.as_bytes();
    let (start, end) = trim_ows_range(b, 0, b.len());
    if start == end {
        return Err(malformed("The Authorization header is present but empty."));
    }
    let (scheme_end, token_start) = match b[start..end].iter().position(is_ows_byte) {
        Some(at) => (start + at, start + at + 1),
        None => (end, end),
    };
    if !b[start..scheme_end].eq_ignore_ascii_case(b"bearer") {
        return Ok(None);
    }
    let (start, end) = trim_ows_range(b, token_start, end);
    if start == end {
        return Err(malformed(
            "The Authorization header has the Bearer scheme but no token.",
        ));
    }
    if has_ows(&b[start..end]) {
        return Err(malformed("The bearer token contains whitespace."));
    }
    text.get(start..end).map(Some).ok_or_else(non_ascii)
}

/// Whether `b` contains a space or a tab. Kept out of line: inlined into its caller the
/// loop is no longer vectorized and costs several times more.
#[inline(never)]
fn has_ows(b: &[u8]) -> bool {
    b.iter().fold(false, |ws, c| ws | is_ows_byte(c))
}

/// `start..end` without leading and trailing spaces and tabs.
fn trim_ows_range(b: &[u8], mut start: usize, mut end: usize) -> (usize, usize) {
    while start < end && is_ows_byte(&b[start]) {
        start += 1;
    }
    while end > start && is_ows_byte(&b[end - 1]) {
        end -= 1;
    }
    (start, end)
}

fn malformed(detail: &'static str) -> Denial {
    Denial::new(DenialCode::MalformedKey).with_detail(detail)
}

fn non_ascii() -> Denial {
    malformed("An API key header contains bytes that are not visible ASCII.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn extract(
        headers: &[(&str, &[u8])],
        uri: &str,
        creds: &Credentials,
    ) -> Result<Option<String>, DenialCode> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let uri: Uri = uri.parse().unwrap();
        creds
            .extract(&map, &uri)
            .map(|o| o.map(|c| c.into_owned()))
            .map_err(|d| d.code())
    }

    #[test]
    fn reads_each_default_source() {
        let c = Credentials::default();
        assert_eq!(
            extract(&[("authorization", b"Bearer abc")], "/", &c),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(&[("authorization", b"bEaReR  abc ")], "/", &c),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(&[("x-api-key", b" abc\t")], "/", &c),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(&[("api-key", b"abc")], "/", &c),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(&[], "/?api_key=abc", &c),
            Ok(None),
            "query is off by default"
        );
        assert_eq!(
            extract(&[("authorization", b"Basic dXNlcjpwYXNz")], "/", &c),
            Ok(None)
        );
    }

    #[test]
    fn one_pass_reads_every_source_whatever_the_header_order() {
        let c = Credentials::default().with_header(HeaderName::from_static("x-tenant-key"));
        // Sources seen in any order agree or conflict the same way.
        assert_eq!(
            extract(
                &[
                    ("x-tenant-key", b"abc"),
                    ("accept", b"*/*"),
                    ("authorization", b"Bearer abc"),
                    ("api-key", b"abc"),
                ],
                "/",
                &c
            ),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(
                &[("api-key", b"abd"), ("authorization", b"Bearer abc")],
                "/",
                &c
            ),
            Err(DenialCode::MalformedKey)
        );
        assert_eq!(
            extract(&[("x-api-key2", b"abc"), ("x-api-key-", b"abd")], "/", &c),
            Ok(None),
            "names that only start like a source are not read"
        );
        // The query parameter is still read after the headers, and compared with them.
        let q = Credentials::default().with_query("api_key");
        assert_eq!(
            extract(&[("x-api-key", b"abc")], "/?api_key=abd", &q),
            Err(DenialCode::MalformedKey)
        );
        assert_eq!(
            extract(&[("x-api-key", b"abc")], "/?api_key=abc", &q),
            Ok(Some("abc".into()))
        );
    }

    #[test]
    fn same_key_twice_is_fine_different_keys_are_malformed() {
        let c = Credentials::default();
        assert_eq!(
            extract(
                &[("authorization", b"Bearer abc"), ("x-api-key", b"abc")],
                "/",
                &c
            ),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            extract(
                &[("authorization", b"Bearer abc"), ("x-api-key", b"abd")],
                "/",
                &c
            ),
            Err(DenialCode::MalformedKey)
        );
        assert_eq!(
            extract(&[("x-api-key", b"abc"), ("x-api-key", b"xyz")], "/", &c),
            Err(DenialCode::MalformedKey)
        );
    }

    #[test]
    fn unusable_values_are_malformed() {
        let c = Credentials::default();
        for (name, value) in [
            ("authorization", &b"Bearer"[..]),
            ("authorization", b"Bearer    "),
            ("authorization", b"Bearer a b"),
            ("authorization", b""),
            ("authorization", b" \t "),
            ("x-api-key", b""),
            ("x-api-key", b"   "),
            ("x-api-key", b"caf\xc3\xa9"),
            ("x-api-key", b"\xff\xfe"),
        ] {
            assert_eq!(
                extract(&[(name, value)], "/", &c),
                Err(DenialCode::MalformedKey),
                "{name}: {value:?}"
            );
        }
    }

    /// The Bearer rules as first written with `str` patterns, to check the byte version.
    fn reference_bearer(value: &HeaderValue) -> Result<Option<&str>, DenialCode> {
        let text = value.to_str().map_err(|_| DenialCode::MalformedKey)?;
        let text = text.trim_matches(is_ows);
        if text.is_empty() {
            return Err(DenialCode::MalformedKey);
        }
        let (scheme, token) = text.split_once([' ', '\t']).unwrap_or((text, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let token = token.trim_matches(is_ows);
        if token.is_empty() || token.contains(is_ows) {
            return Err(DenialCode::MalformedKey);
        }
        Ok(Some(token))
    }

    #[test]
    fn bearer_parsing_agrees_with_the_string_rules() {
        let values: &[&[u8]] = &[
            b"Bearer abc",
            b"bearer abc",
            b"BEARER\tabc",
            b"  Bearer   abc  ",
            b"\tBearer\t\tabc\t",
            b"Bearer",
            b"Bearer ",
            b" Bearer \t ",
            b"Bearer a b",
            b"Bearer a\tb",
            b"Bearerabc",
            b"Bearer_abc",
            b"Basic dXNlcjpwYXNz",
            b"Basic",
            b"",
            b"   ",
            b"abc",
            b"Bearer caf\xc3\xa9",
            b"Bearer \xff",
            b"Bearer kg_3hG7xQ2mPa9Zk0Lr8VbN4sTu6WyE1cFd5gHj2KoMn",
        ];
        for v in values {
            let value = HeaderValue::from_bytes(v).unwrap();
            assert_eq!(
                bearer_token(&value).map_err(|d| d.code()),
                reference_bearer(&value),
                "{v:?}"
            );
        }
    }

    #[test]
    fn query_parameter_when_enabled() {
        let c = Credentials::default().with_query("api_key");
        assert_eq!(
            extract(&[], "/p?x=1&api_key=abc", &c),
            Ok(Some("abc".into()))
        );
        assert_eq!(extract(&[], "/p?api_key=a%62c", &c), Ok(Some("abc".into())));
        assert_eq!(
            extract(&[], "/p?api_key=", &c),
            Err(DenialCode::MalformedKey)
        );
        assert_eq!(
            extract(&[("x-api-key", b"abc")], "/p?api_key=abd", &c),
            Err(DenialCode::MalformedKey)
        );
    }

    #[test]
    fn strip_removes_every_credential() {
        let c = Credentials::default().with_query("api_key");
        let mut req = Request::builder()
            .uri("/p?x=1&api_key=abc&y=2")
            .header("authorization", "Bearer abc")
            .header("x-api-key", "abc")
            .header("api-key", "abc")
            .header("x-other", "kept")
            .body(())
            .unwrap();
        c.strip(&mut req);
        assert_eq!(req.uri(), "/p?x=1&y=2");
        assert!(req.headers().get("authorization").is_none());
        assert!(req.headers().get("x-api-key").is_none());
        assert!(req.headers().get("api-key").is_none());
        assert_eq!(req.headers()["x-other"], "kept");

        let mut basic = Request::builder()
            .uri("/p?api_key=abc")
            .header("authorization", "Basic dXNlcjpwYXNz")
            .body(())
            .unwrap();
        c.strip(&mut basic);
        assert_eq!(basic.uri(), "/p");
        assert!(
            basic.headers().get("authorization").is_some(),
            "other schemes are kept"
        );

        let mut lookalike = Request::builder()
            .header("authorization", "Bearerfoo x")
            .body(())
            .unwrap();
        c.strip(&mut lookalike);
        assert!(
            lookalike.headers().get("authorization").is_some(),
            "not the Bearer scheme"
        );
    }
}
