//! The key console in the gateway (`[console] enabled = true`): served at `/console`,
//! never forwarded to the upstream, acting through the admin API with the signed-in key;
//! off by default (then `/console` is an ordinary, refused route).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keygate::KeySpec;
use keygate_gateway::preset::Preset;
use support::Gw;
use tokio::net::TcpStream;

/// An upstream that counts the requests reaching it and answers 200 `{}`.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = tower::service_fn(move |_req: Request<Incoming>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("{}")))) }
    });
    (keygate_testkit::serve::spawn_hyper(svc).await, calls)
}

/// One request with the given headers and a form body; status, `Location`, `Set-Cookie`
/// values and text.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> (StatusCode, String, Vec<String>, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match form {
        Some(f) => {
            req = req.header("content-type", "application/x-www-form-urlencoded");
            Bytes::from(f.to_owned())
        }
        None => Bytes::new(),
    };
    let res = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let location = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let cookies = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let text =
        String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, location, cookies, text)
}

/// `name=value` of the cookie `name` among `Set-Cookie` values.
fn cookie(cookies: &[String], name: &str) -> String {
    cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie in {cookies:?}"))
        .to_owned()
}

fn csrf(page: &str) -> String {
    let start = "name=\"csrf\" value=\"";
    let at = page.find(start).expect("a csrf field") + start.len();
    page[at..at + page[at..].find('"').unwrap()].to_owned()
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_console_is_served_by_the_gateway_and_never_forwarded() {
    let (up, calls) = upstream().await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{up}"), None, |c| {
        c.console.enabled = true;
    })
    .await;
    let (admin, _) = gw.issue(KeySpec::new("ops").scope("*").resource("*")).await;
    gw.issue(KeySpec::new("reader").scope("points:read").resource("docs"))
        .await;

    // Not signed in: sent to the sign-in form, which the gateway serves itself.
    let (status, location, _, _) = send(gw.addr, "GET", "/console/keys", &[], None).await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/console/login")
    );
    let (status, _, cookies, page) = send(gw.addr, "GET", "/console/login", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let login_cookie = cookie(&cookies, "kg_console_login");
    let form = format!(
        "csrf={}&key={}",
        form_encode(&csrf(&page)),
        form_encode(&admin)
    );
    let (status, location, cookies, text) = send(
        gw.addr,
        "POST",
        "/console/login",
        &[("cookie", &login_cookie)],
        Some(&form),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{text}");
    assert_eq!(location, "/console/keys");
    let session = cookie(&cookies, "kg_console");
    let (status, _, _, keys) = send(
        gw.addr,
        "GET",
        "/console/keys",
        &[("cookie", &session)],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(keys.contains("reader") && keys.contains("ops"), "{keys}");

    // A key without the admin scope cannot sign in.
    let (reader, _) = gw
        .issue(KeySpec::new("r2").scope("points:read").resource("docs"))
        .await;
    let (_, _, cookies, page) = send(gw.addr, "GET", "/console/login", &[], None).await;
    let form = format!(
        "csrf={}&key={}",
        form_encode(&csrf(&page)),
        form_encode(&reader)
    );
    let (status, _, _, _) = send(
        gw.addr,
        "POST",
        "/console/login",
        &[("cookie", &cookie(&cookies, "kg_console_login"))],
        Some(&form),
    )
    .await;
    assert_ne!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn without_the_console_its_path_is_an_unknown_route() {
    let (up, calls) = upstream().await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{up}"), None, |_| {}).await;
    let key = gw.operator_key().await;
    let r = gw.call("GET", "/console/login", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "unknown_route");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
