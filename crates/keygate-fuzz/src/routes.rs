//! Route matching with resource parameters and percent-decoding, against a plain reference
//! matcher.

use std::convert::Infallible;

use arbitrary::{Arbitrary, Unstructured};
use http::{Method, Request, Response, StatusCode};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::Denial;
use keygate::{DenialCode, KeyHasher, KeyRecord, Prefix, Principal};
use tower::{service_fn, Layer, ServiceExt};

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "*"];
const LITERALS: &[&str] = &[
    "collections",
    "points",
    "search",
    "a",
    "%41",
    "",
    "x.y",
    "A",
];
const PARAMS: &[&str] = &["collection", "id"];
const RESOURCES: &[&str] = &["*", "docs", "docs-*", "é", "a b"];

#[derive(Debug, Arbitrary)]
struct RuleInput {
    method: u8,
    /// Each segment: a literal (even) or a parameter (odd), by index.
    segments: Vec<u8>,
    public: bool,
}

#[derive(Debug, Arbitrary)]
struct RoutesInput {
    rules: Vec<RuleInput>,
    /// Which rule scopes the key holds (bit i: rule i).
    held: u16,
    resources: Vec<u8>,
    method: u8,
    path: String,
}

#[derive(Debug)]
pub(crate) enum Seg {
    Lit(&'static str),
    Param(&'static str),
}

/// The documented matching: the first rule whose method matches (`*` any, a GET rule also
/// HEAD) and whose pattern has as many `/`-separated segments as the path, literals equal
/// to the raw segment, parameters non-empty.
pub(crate) fn reference_match<'p>(
    rules: &[(&str, Vec<Seg>, bool)],
    method: &str,
    path: &'p str,
) -> Option<(usize, Option<&'p str>)> {
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    if parts.len() > 32 {
        return None;
    }
    rules.iter().enumerate().find_map(|(i, (m, segs, _))| {
        let method_ok = *m == "*" || *m == method || (*m == "GET" && method == "HEAD");
        if !method_ok || segs.len() != parts.len() {
            return None;
        }
        let mut resource = None;
        for (seg, part) in segs.iter().zip(&parts) {
            match seg {
                Seg::Lit(l) if l != part => return None,
                Seg::Lit(_) => {}
                Seg::Param(_) if part.is_empty() => return None,
                Seg::Param(name) => {
                    if *name == "collection" {
                        resource = Some(*part);
                    }
                }
            }
        }
        Some((i, resource))
    })
}

/// Percent-decoding as documented: `%XX` is a byte, anything else stays; the result must be
/// UTF-8 without `/` or control characters.
pub(crate) fn reference_decode(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    let s = String::from_utf8(out).ok()?;
    (!s.chars().any(|c| c == '/' || c.is_control())).then_some(s)
}

/// The segments of a pattern (`{name}` a parameter, anything else a literal).
pub(crate) fn segments(pattern: &'static str) -> Vec<Seg> {
    pattern[1..]
        .split('/')
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Seg::Param(name),
                None => Seg::Lit(s),
            },
        )
        .collect()
}

/// A route table and one request through `ScopeLayer`, against the reference.
pub fn routes(data: &[u8]) {
    let Ok(input) = RoutesInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut table = Vec::new();
    for r in input.rules.iter().take(8) {
        let method = METHODS[usize::from(r.method) % METHODS.len()];
        if method == "HEAD" {
            continue;
        }
        let segs: Vec<Seg> = r
            .segments
            .iter()
            .take(6)
            .map(|s| {
                let i = usize::from(s / 2);
                if s % 2 == 0 {
                    Seg::Lit(LITERALS[i % LITERALS.len()])
                } else {
                    Seg::Param(PARAMS[i % PARAMS.len()])
                }
            })
            .collect();
        let mut names: Vec<&str> = segs
            .iter()
            .filter_map(|s| match s {
                Seg::Param(n) => Some(*n),
                Seg::Lit(_) => None,
            })
            .collect();
        let params = names.len();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        if names.len() != params {
            continue;
        }
        table.push((method, segs, r.public));
    }
    let mut builder = RouteScopes::builder();
    for (i, (method, segs, public)) in table.iter().enumerate() {
        let pattern: String = if segs.is_empty() {
            "/".to_owned()
        } else {
            segs.iter()
                .map(|s| match s {
                    Seg::Lit(l) => format!("/{l}"),
                    Seg::Param(p) => format!("/{{{p}}}"),
                })
                .collect()
        };
        builder = if *public {
            builder.public(method, &pattern)
        } else {
            builder.route(method, &pattern, &format!("r{i}:read"))
        };
    }
    // An empty pattern list is the single segment "" ("/").
    for (_, segs, _) in table.iter_mut() {
        if segs.is_empty() {
            segs.push(Seg::Lit(""));
        }
    }
    let rules = builder.build().expect("generated rules are valid");

    let method = METHODS[usize::from(input.method) % METHODS.len()];
    let method = if method == "*" { "PATCH" } else { method };
    let Ok(req) = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(&input.path)
        .body(())
    else {
        return;
    };
    let path = req.uri().path().to_owned();

    let hasher = KeyHasher::default();
    let (_, mut record) = KeyRecord::generate(
        &Prefix::default(),
        &hasher,
        "fuzz",
        std::time::SystemTime::UNIX_EPOCH,
    )
    .expect("rng");
    record.scopes = (0..table.len())
        .filter(|i| input.held & (1 << i) != 0)
        .map(|i| format!("r{i}:read"))
        .collect();
    record.resources = input
        .resources
        .iter()
        .take(3)
        .map(|r| RESOURCES[usize::from(*r) % RESOURCES.len()].to_owned())
        .collect();
    let principal = Principal::from_record(&record);
    let mut req = req;
    req.extensions_mut()
        .insert(keygate::RequestContext::authenticated(principal.clone()));

    let svc = ScopeLayer::table(rules).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let res = crate::block_on(svc.oneshot(req)).expect("infallible");
    let got = res.extensions().get::<Denial>().map(Denial::code);

    let want = match reference_match(&table, method, &path) {
        None => Some(DenialCode::UnknownRoute),
        Some((i, _)) if table[i].2 => None,
        Some((i, _)) if input.held & (1 << i) == 0 => Some(DenialCode::InsufficientScope),
        Some((_, None)) => None,
        Some((_, Some(raw))) => match reference_decode(raw) {
            Some(name) if principal.can_access(&name) => None,
            _ => Some(DenialCode::ResourceForbidden),
        },
    };
    assert_eq!(
        got,
        want,
        "{method} {path} {:?} against {table:?} resources {:?}",
        path.as_bytes(),
        record.resources
    );
    let expected_status = match want {
        None => StatusCode::OK,
        Some(DenialCode::UnknownRoute) => StatusCode::NOT_FOUND,
        Some(_) => StatusCode::FORBIDDEN,
    };
    assert_eq!(res.status(), expected_status);
}
