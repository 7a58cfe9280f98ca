//! The plaintext key never leaves: every rejection `ApiKeyAuthLayer` can produce (the whole
//! bad-input matrix, HTTP and gRPC, both renderer modes, keys in the query string, a store
//! outage) is rendered and searched for the keys and their secret parts, in the status
//! line, the headers, the body and the tracing output captured at TRACE level; and no
//! `Debug` or `Display` of the types that travel with a request shows a secret.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use keygate::credentials::Credentials;
use keygate::reject::DefaultRenderer;
use keygate::{resolution, ApiKey, Denial, KeyGate, KeyRecord, Lookup};
use tower::{ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;

/// Asserts that no secret in `secrets` occurs in `text`.
fn assert_clean(secrets: &[String], what: &str, text: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} contains a plaintext secret ({} characters)\n{text}",
            secret.len()
        );
    }
}

/// The status line, headers, body and `Debug` of a response, as one text.
async fn render(res: Response<keygate::reject::ResponseBody<Full<Bytes>>>) -> String {
    let debug = format!("{res:?}");
    let (parts, body) = res.into_parts();
    let mut text = format!(
        "{:?} {} {}\n",
        parts.version,
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        text.push_str(&format!("{name}: {}\n", lossy(value.as_bytes())));
    }
    if let Some(denial) = parts.extensions.get::<Denial>() {
        text.push_str(&format!("{denial:?}\n{denial:#?}\n{denial}\n"));
    }
    text.push('\n');
    text.push_str(&lossy(&body_bytes(body).await));
    text.push('\n');
    text.push_str(&debug);
    text
}

/// An inner service that renders the `Debug` of what the request's extensions carry.
fn debug_extensions(
    out: Arc<Mutex<String>>,
) -> impl tower::Service<
    Req,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Req| {
        let ext = req.extensions();
        let text = format!(
            "{:?}\n{:?}\n{:#?}\n{:?}\n",
            ext,
            keygate::RequestContext::of(ext).and_then(|c| c.principal()),
            keygate::RequestContext::of(ext).and_then(|c| c.principal()),
            resolution(ext)
        );
        out.lock().expect("lock").push_str(&text);
        async { Ok(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    })
}

/// Runs every request of the matrix (and the extra shapes) through `gate` in process, HTTP
/// and gRPC, returning everything that came out.
async fn every_rejection_in_process(gate: &KeyGate, keys: &MatrixKeys) -> String {
    let ext_debug = Arc::new(Mutex::new(String::new()));
    let svc = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service(debug_extensions(ext_debug.clone()));
    // A custom layer's view of the memoized verdict, success or failure.
    let resolving = {
        let gate = gate.clone();
        let out = ext_debug.clone();
        move |mut req: Req| {
            let gate = gate.clone();
            let out = out.clone();
            async move {
                let verdict = gate.resolve(&mut req).await;
                let text = format!("{verdict:?}\n{:?}\n", resolution(req.extensions()));
                out.lock().expect("lock").push_str(&text);
            }
        }
    };
    let mut out = String::new();
    let mut rendered = 0;
    for row in matrix(keys) {
        for extra in [&[][..], &[("content-type", "application/grpc")][..]] {
            let res = svc
                .clone()
                .oneshot(row.request(extra, Full::default()))
                .await
                .expect("infallible");
            out.push_str(&render(res).await);
            resolving(row.request(extra, Full::default())).await;
            rendered += 1;
        }
    }
    // Keys in the query string (enabled on this hub).
    for key in [
        keys.unknown.expose_secret(),
        keys.revoked.expose_secret(),
        keys.disabled.expose_secret(),
        keys.expired.expose_secret(),
        keys.wrong_secret.as_str(),
        keys.bad_checksum.as_str(),
    ] {
        for extra in [&[][..], &[("content-type", "application/grpc")][..]] {
            let mut req = Request::get(format!("/collections/x?api_key={key}&limit=1"))
                .body(Full::default())
                .expect("request");
            for (n, v) in extra {
                req.headers_mut().insert(*n, v.parse().expect("value"));
            }
            let res = svc.clone().oneshot(req).await.expect("infallible");
            out.push_str(&render(res).await);
            rendered += 1;
        }
    }
    assert!(rendered >= 60, "{rendered}");
    out.push_str(&ext_debug.lock().expect("lock"));
    out
}

#[tokio::test]
async fn no_rejection_and_no_log_line_contains_the_key() {
    let capture = Capture::new();
    let _guard = capture.install();
    tracing::trace!("capture installed");

    let mut all_secrets = Vec::new();
    let mut outputs = String::new();
    for exact in [false, true] {
        let fx = Fixture::with(
            |v| v,
            |g| {
                g.credentials(Credentials::default().with_query("api_key"))
                    .renderer(DefaultRenderer::new().expose_exact_codes(exact))
            },
        );
        let keys = matrix_keys(&fx).await;
        let secrets = keys.secrets();
        outputs.push_str(&every_rejection_in_process(&fx.gate, &keys).await);

        // Over a socket: the bytes on the wire (raw status line and headers).
        let addr = spawn_hyper(
            ServiceBuilder::new()
                .layer(fx.gate.auth_layer())
                .service(counting_ok::<hyper::body::Incoming>(Arc::default())),
        )
        .await;
        for row in matrix(&keys) {
            let raw = send_raw_bytes(addr, &raw_head(&row)).await;
            assert!(raw.starts_with(b"HTTP/1.1 "), "{}", row.name);
            outputs.push_str(&lossy(&raw));
        }

        // A store outage on a cache miss (503 / UNAVAILABLE, and a warning in the log).
        let fresh = fx.issue("fresh").await;
        fx.store.set_down(true);
        for extra in [&[][..], &[("content-type", "application/grpc")][..]] {
            let mut req = Request::get("/")
                .header("authorization", format!("Bearer {}", fresh.expose_secret()))
                .body(Full::<Bytes>::default())
                .expect("request");
            for (n, v) in extra {
                req.headers_mut().insert(*n, v.parse().expect("value"));
            }
            let res = ServiceBuilder::new()
                .layer(fx.gate.auth_layer())
                .service(counting_ok::<Full<Bytes>>(Arc::default()))
                .oneshot(req)
                .await
                .expect("infallible");
            assert_eq!(
                res.status().as_u16(),
                if extra.is_empty() { 503 } else { 200 }
            );
            outputs.push_str(&render(res).await);
        }
        all_secrets.extend(secrets);
        all_secrets.push(fresh.expose_secret().to_owned());
        all_secrets.push(secret_of(&fresh).to_owned());
    }

    // The outputs really are the rejections (so the search below can find something).
    for code in [
        "missing_key",
        "malformed_key",
        "invalid_key",
        "expired_key",
        "revoked_key",
        "disabled_key",
        "store_unavailable",
        "grpc-status: 16",
        "grpc-status: 14",
        "www-authenticate: Bearer realm=\"keygate\", error=\"invalid_token\"",
    ] {
        assert!(outputs.contains(code), "outputs lack {code}");
    }
    assert_clean(&all_secrets, "a response or an extension's Debug", &outputs);

    let logs = capture.text();
    for expected in [
        "capture installed",
        "request denied",
        "revoked_key",
        "key store lookup failed",
    ] {
        assert!(
            logs.contains(expected),
            "tracing output lacks {expected:?}:\n{logs}"
        );
    }
    assert_clean(&all_secrets, "the tracing output", &logs);
}

#[tokio::test]
async fn debug_and_display_never_show_a_secret() {
    let fx = Fixture::new();
    let (key, mut record) = KeyRecord::generate(
        &keygate::Prefix::default(),
        fx.gate.verifier().hasher(),
        "debuggable",
        fx.gate.clock().now(),
    )
    .expect("rng");
    record.owner = Some("alice".into());
    record.scopes = vec!["points:read".into()];
    keygate::KeyStore::insert(fx.store.memory(), &record)
        .await
        .expect("fresh id");
    let secrets = vec![key.expose_secret().to_owned(), secret_of(&key).to_owned()];
    let digest_hex = record.digest.to_hex();

    let principal = fx
        .gate
        .verifier()
        .verify(key.expose_secret())
        .await
        .expect("valid");
    let parsed = fx
        .gate
        .verifier()
        .parser()
        .parse(key.expose_secret())
        .expect("well-formed");
    fx.gate.verifier().invalidate(&key.id());
    let pending = fx.gate.verifier().lookup(key.expose_secret());
    assert!(matches!(pending, Lookup::Pending(_)), "{pending:?}");

    let mut texts = vec![
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{key}"),
        key.redacted(),
        format!("{record:?}"),
        format!("{record:#?}"),
        format!("{:?}", record.info()),
        serde_json::to_string(&record.info()).expect("json"),
        format!("{:?}", record.digest),
        format!("{principal:?}"),
        format!("{principal:#?}"),
        format!("{parsed:?}"),
        format!("{pending:?}"),
        format!("{:?}", fx.gate),
        format!("{:?}", fx.gate.verifier()),
        format!("{:?}", fx.gate.auth_layer()),
    ];
    for code in keygate::DenialCode::ALL {
        let d = Denial::new(code);
        texts.push(format!("{d:?} {d}"));
    }
    // Denials produced from the key itself, as the verifier and the layer make them.
    for presented in [
        key.expose_secret().to_owned(),
        wrong_secret(&key),
        bad_checksum(&key),
        format!("{}x", key.expose_secret()),
    ] {
        match fx.gate.verifier().verify(&presented).await {
            Ok(p) => texts.push(format!("{p:?}")),
            Err(d) => texts.push(format!("{d:?} {d}")),
        }
        if let Err(e) = fx.gate.verifier().parser().parse(&presented) {
            texts.push(format!("{e:?} {e}"));
        }
    }
    for text in &texts {
        assert_clean(&secrets, "a Debug/Display", text);
        assert!(!text.contains(&digest_hex), "the digest shows in {text}");
    }
    // They still say something useful: the public id.
    assert!(texts[0].contains(key.id().as_str()));
    assert!(texts[4].contains(key.id().as_str()));
    assert!(texts[9].contains(key.id().as_str()));
}

#[test]
fn api_key_generation_shows_only_the_id() {
    let key = ApiKey::generate(&keygate::Prefix::default()).expect("rng");
    assert_eq!(format!("{key}"), format!("kg_{}…", key.id()));
    assert_eq!(format!("{key:?}"), format!("ApiKey(kg_{}…)", key.id()));
}
