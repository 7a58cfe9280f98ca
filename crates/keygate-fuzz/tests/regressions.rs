//! Named regression tests for what the fuzzers found in keygate (the inputs themselves are
//! under `fuzz/regressions/<target>/` and replayed by `tests/replay.rs`).

use keygate::core::audit::{verify_files, ChainKey, ChainPoint, Problem, VerifyOptions};

/// `verify_files` with a start point at seq u64::MAX: the next line's expected seq
/// overflowed (a panic with overflow checks, a wrap to 0 without). Now no line may follow.
#[test]
fn audit_verify_after_the_last_possible_seq_reports_a_gap() {
    let dir = std::env::temp_dir().join(format!("keygate-fuzz-regression-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seq-max.log");
    let key = ChainKey::default();
    let body = format!("{{\"seq\":0,\"prev\":\"{}\"", "0".repeat(64));
    let line = format!("{body},\"hash\":\"{}\"}}\n", key.line_hash(body.as_bytes()));
    std::fs::write(&path, line).unwrap();
    let options = VerifyOptions {
        start: Some(ChainPoint {
            seq: u64::MAX,
            hash: "0".repeat(64),
        }),
        ..VerifyOptions::default()
    };
    let err = verify_files(&[&path], &options).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.seq, Some(0));
    assert!(
        matches!(err.problem, Problem::SequenceGap { found: 0, .. }),
        "{:?}",
        err.problem
    );
}

/// A key-shaped query parameter name (`?kg_…=kg_…`) was echoed in the `missing_key` detail
/// as the place the key was found: key material in a response. Now such a name is not shown.
#[test]
fn a_key_shaped_parameter_name_is_not_echoed_in_the_missing_key_detail() {
    let key = keygate::ApiKey::generate(&keygate::Prefix::default()).unwrap();
    let secret = key.expose_secret();
    let uri: http::Uri = format!("/p?{secret}={secret}").parse().unwrap();
    let creds = keygate::credentials::Credentials::default();
    let headers = http::HeaderMap::new();
    assert!(creds.extract(&headers, &uri).unwrap().is_none());
    let denial = creds.missing(&headers, &uri, &[keygate::Prefix::default()]);
    assert!(
        denial.detail().contains("query parameter"),
        "{}",
        denial.detail()
    );
    assert!(!denial.detail().contains(secret), "{}", denial.detail());
}

/// The same through a header whose name is key-shaped (header names are lower case, so an
/// all-lower-case key body).
#[test]
fn a_key_shaped_header_name_is_not_echoed_in_the_missing_key_detail() {
    let name = format!("kg_{}", "a".repeat(40));
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        http::HeaderValue::from_str(&name).unwrap(),
    );
    let uri = http::Uri::from_static("/p");
    let denial = keygate::credentials::Credentials::default().missing(
        &headers,
        &uri,
        &[keygate::Prefix::default()],
    );
    assert!(denial.detail().contains("header"), "{}", denial.detail());
    assert!(!denial.detail().contains(&name), "{}", denial.detail());
}

/// A collection name sent raw (not percent-encoded) with a C1 control character (`U+0085`,
/// two UTF-8 bytes the URI parser accepts) skipped the control-character check that the
/// percent-decoded form gets, and reached a key allowed every collection.
#[test]
fn a_raw_control_character_in_a_collection_name_is_forbidden() {
    use keygate::scope::{RouteScopes, ScopeLayer};
    use tower::{Layer, ServiceExt};

    let rules = RouteScopes::builder()
        .route("GET", "/collections/{collection}", "collections:read")
        .build()
        .unwrap();
    let hasher = keygate::KeyHasher::default();
    let (_, mut record) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        &hasher,
        "any-collection",
        std::time::SystemTime::UNIX_EPOCH,
    )
    .unwrap();
    record.scopes = vec!["collections:read".into()];
    record.resources = vec!["*".into()];
    let principal = keygate::Principal::from_record(&record);
    let svc = ScopeLayer::table(rules).layer(tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(()))
    }));
    let call = |path: &str| {
        let mut req = http::Request::get(path).body(()).unwrap();
        req.extensions_mut()
            .insert(keygate::RequestContext::authenticated(principal.clone()));
        let res = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(svc.clone().oneshot(req))
            .unwrap();
        res.extensions().get::<keygate::Denial>().map(|d| d.code())
    };
    // The percent-encoded form was already refused; the raw form must be too.
    assert_eq!(
        call("/collections/a%C2%85b"),
        Some(keygate::DenialCode::ResourceForbidden)
    );
    assert_eq!(
        call("/collections/a\u{85}b"),
        Some(keygate::DenialCode::ResourceForbidden)
    );
    assert_eq!(call("/collections/docs"), None);
}
