//! Route matching, differentially: keygate's `ScopeLayer` against axum's `Router` on the
//! same generated route table.
//!
//! Where the two agree by design, and what is checked:
//! - one pattern at a time, a path matches in keygate exactly when it matches in axum
//!   (literal segments compared raw, still percent-encoded; a parameter is one non-empty
//!   segment; a trailing slash is a segment of its own in both: neither redirects);
//! - the collection parameter: where axum decodes it to `D`, a key allowed exactly `D` may
//!   access the route in keygate, and where axum refuses it (not UTF-8 once decoded),
//!   keygate refuses it too (axum refuses a request when any parameter does not decode;
//!   keygate decodes only the collection, so other parameters are its handler's business);
//! - the whole table: a path no pattern matches is unknown to both, and a path exactly one
//!   pattern matches goes to that pattern in both.
//!
//! Where they differ on purpose, and what is not compared:
//! - when several patterns match, keygate takes the first rule of the table and axum the
//!   most specific route (a literal before a parameter);
//! - a collection decoding to a `/` or a control character is refused by keygate
//!   (`resource_forbidden`); axum hands it to the handler;
//! - methods: a rule's method is compared only as `*` (axum's `any`), since axum answers
//!   405 where keygate answers `unknown_route` for a known path with another method;
//! - axum matches a parameter to an empty segment (`//x` against `/{a}/{b}`); keygate
//!   does not (an empty segment names no resource): such a path is unknown to keygate;
//! - keygate refuses paths of more than 32 segments; the tables here have at most 6.

use std::collections::HashMap;
use std::convert::Infallible;

use arbitrary::{Arbitrary, Unstructured};
use axum::extract::Path;
use axum::routing::any;
use axum::Router;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::Denial;
use keygate::{DenialCode, KeyHasher, KeyRecord, Prefix, Principal};
use tower::{service_fn, Layer, ServiceExt};

const LITERALS: &[&str] = &["collections", "points", "a", "%41", "A", "", "x.y", "é"];
/// Parameter names by position, so that two patterns never name the same position
/// differently (axum refuses such a table; keygate accepts it).
const PARAMS: &[&str] = &["p0", "collection", "p2", "p3", "p4", "p5"];
/// Not HEAD: axum answers it without the handler's body, which names the route.
const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

#[derive(Debug, Arbitrary)]
struct RouterInput {
    /// Each rule: segments, a literal (even) or the position's parameter (odd).
    rules: Vec<Vec<u8>>,
    method: u8,
    path: String,
}

fn principal(scopes: Vec<String>, resources: Vec<String>) -> Principal {
    let (_, mut record) = KeyRecord::generate(
        &Prefix::default(),
        &KeyHasher::default(),
        "fuzz",
        std::time::SystemTime::UNIX_EPOCH,
    )
    .expect("rng");
    record.scopes = scopes;
    record.resources = resources;
    Principal::from_record(&record)
}

/// keygate's answer: `None` allowed, else the denial.
async fn keygate(
    patterns: &[(usize, &str)],
    method: &str,
    path: &str,
    p: Principal,
) -> Option<DenialCode> {
    let mut b = RouteScopes::builder();
    for (i, pat) in patterns {
        b = b.route("*", pat, &format!("r{i}:read"));
    }
    let rules = b.build().expect("generated rules are valid");
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .body(())
        .expect("a valid uri");
    req.extensions_mut()
        .insert(keygate::RequestContext::authenticated(p));
    let svc = ScopeLayer::table(rules).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let res = svc.oneshot(req).await.expect("infallible");
    res.extensions().get::<Denial>().map(Denial::code)
}

/// What axum's router did.
#[derive(Debug, PartialEq)]
enum Axum {
    /// No route.
    NotFound,
    /// Route `i`, with the decoded collection parameter if the pattern has one.
    Matched(usize, Option<String>),
    /// A route matched, but a parameter is not UTF-8 once decoded (400).
    BadParam,
}

async fn axum(patterns: &[(usize, &str)], method: &str, path: &str) -> Axum {
    let mut router = Router::new();
    for (i, pat) in patterns {
        let i = *i;
        router = router.route(
            pat,
            any(
                move |params: Option<Path<HashMap<String, String>>>| async move {
                    let params = params.map(|Path(p)| p).unwrap_or_default();
                    let c = params.get("collection").cloned();
                    serde_json::to_string(&(i, c)).expect("json")
                },
            ),
        );
    }
    let req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .body(axum::body::Body::empty())
        .expect("a valid uri");
    let res = router.oneshot(req).await.expect("infallible");
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .expect("in memory")
        .to_bytes();
    match status {
        StatusCode::NOT_FOUND => Axum::NotFound,
        StatusCode::BAD_REQUEST => Axum::BadParam,
        StatusCode::OK => {
            let (i, c): (usize, Option<String>) =
                serde_json::from_slice(&bytes).expect("the handler's JSON");
            Axum::Matched(i, c)
        }
        other => panic!("axum answered {other} for {method} {path}"),
    }
}

/// A generated route table and a path, through keygate and axum (see the module docs).
pub fn router(data: &[u8]) {
    let Ok(input) = RouterInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut owned: Vec<String> = Vec::new();
    for r in input.rules.iter().take(6) {
        let pattern: String = r
            .iter()
            .take(6)
            .enumerate()
            .map(|(pos, s)| {
                if s % 2 == 0 {
                    format!("/{}", LITERALS[usize::from(s / 2) % LITERALS.len()])
                } else {
                    format!("/{{{}}}", PARAMS[pos])
                }
            })
            .collect();
        let pattern = if pattern.is_empty() {
            "/".to_owned()
        } else {
            pattern
        };
        // axum refuses a route twice; keygate's first one wins anyway.
        if !owned.contains(&pattern) {
            owned.push(pattern);
        }
    }
    let patterns: Vec<(usize, &str)> = owned.iter().map(String::as_str).enumerate().collect();
    let method = METHODS[usize::from(input.method) % METHODS.len()];
    let Ok(req) = Request::builder().uri(&input.path).body(()) else {
        return;
    };
    // Both see the same parsed URI.
    let path = req.uri().to_string();
    crate::block_on(compare(&patterns, method, &path));
}

async fn compare(patterns: &[(usize, &str)], method: &str, path: &str) {
    let everything = || {
        principal(
            (0..patterns.len()).map(|i| format!("r{i}:read")).collect(),
            vec!["*".to_owned()],
        )
    };
    // One pattern at a time.
    let mut matching = Vec::new();
    let mut axum_only = false;
    for &(i, pat) in patterns {
        let one = [(i, pat)];
        let a = axum(&one, method, path).await;
        let k = keygate(&one, method, path, everything()).await;
        let k_matched = k != Some(DenialCode::UnknownRoute);
        if a != Axum::NotFound && !k_matched && empty_parameter(pat, path) {
            // A difference on purpose (see the module docs).
            axum_only = true;
            continue;
        }
        assert_eq!(
            a != Axum::NotFound,
            k_matched,
            "{method} {path} against {pat}: axum {a:?}, keygate {k:?}"
        );
        match &a {
            Axum::NotFound => continue,
            // axum refuses the request when any parameter is not UTF-8 once decoded;
            // keygate decodes only the collection, so only a pattern whose one parameter
            // is the collection says which one was refused.
            Axum::BadParam if pat.contains("{collection}") && !pat.contains("{p") => assert_eq!(
                k,
                Some(DenialCode::ResourceForbidden),
                "{path} against {pat}: axum refuses the parameter, keygate does not"
            ),
            Axum::BadParam => {}
            Axum::Matched(_, None) => {
                assert_eq!(k, None, "{path} against {pat}")
            }
            Axum::Matched(_, Some(d)) => {
                let refused_on_purpose = d.chars().any(|c| c == '/' || c.is_control());
                if refused_on_purpose {
                    assert_eq!(
                        k,
                        Some(DenialCode::ResourceForbidden),
                        "{path} against {pat}"
                    );
                } else {
                    assert_eq!(k, None, "{path} against {pat}: collection {d:?}");
                    // A resource pattern is 1 to 128 bytes, `*` a wildcard.
                    if !d.contains('*') && !d.is_empty() && d.len() <= 128 {
                        let exact = principal(vec![format!("r{i}:read")], vec![d.clone()]);
                        let k = keygate(&one, method, path, exact).await;
                        assert_eq!(
                            k, None,
                            "{path} against {pat}: a key for exactly {d:?} is refused"
                        );
                    }
                }
            }
        }
        matching.push(i);
    }
    // The whole table.
    let a = axum(patterns, method, path).await;
    let k = keygate(patterns, method, path, everything()).await;
    if matching.is_empty() {
        if !axum_only {
            assert_eq!(a, Axum::NotFound, "{path} against {patterns:?}");
        }
        assert_eq!(
            k,
            Some(DenialCode::UnknownRoute),
            "{path} against {patterns:?}"
        );
    }
    if let [only] = matching[..] {
        if let (Axum::Matched(i, _), false) = (a, axum_only) {
            assert_eq!(i, only, "{path} against {patterns:?}");
        }
        let held = principal(vec![format!("r{only}:read")], vec!["*".to_owned()]);
        let k = keygate(patterns, method, path, held).await;
        assert_ne!(
            k,
            Some(DenialCode::InsufficientScope),
            "{path} against {patterns:?}: keygate picks another rule than the only match"
        );
        assert_ne!(k, Some(DenialCode::UnknownRoute));
    }
}

/// Whether `path` has as many segments as `pattern` and an empty one where the pattern has
/// a parameter.
fn empty_parameter(pattern: &str, path: &str) -> bool {
    let uri: http::Uri = path.parse().expect("a URI that parsed before");
    let path = uri.path();
    let pat: Vec<&str> = pattern.split('/').collect();
    let parts: Vec<&str> = path.split('/').collect();
    pat.len() == parts.len()
        && pat
            .iter()
            .zip(&parts)
            .any(|(s, p)| s.starts_with('{') && p.is_empty())
}
