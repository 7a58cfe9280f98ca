//! The key console's routes, driven like a browser would (cookies kept, forms posted):
//! sign-in with an admin key only, cookie attributes, CSRF refusal, the plaintext of a new
//! or rotated key shown exactly once, rotate / revoke / disable / enable through the admin
//! API's own checks, a narrow admin seeing only its own reach, session expiry on the
//! gate's clock, and sign-out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::{
    AuditEvent, AuditSink, Auditor, Decision, FileSink, RequestEvent, VerifyOptions,
};
use keygate::core::usage::{Increment, MemoryUsageStore, Usage, UsageStore, Window};
use keygate::transport::TlsConnection;
use keygate::{Clock, DenialCode, Identity, KeyId, QuotaWindow};
use keygate::{KeyFilter, KeyGate, KeyManager, KeySpec, ManualClock, MemoryStore, Verifier};
use keygate::{KnownScope, ScopeVocabulary};
use keygate_admin::console::{ChainCheck, Console, RecentEvents};
use keygate_admin::AdminApi;
use tower::ServiceExt;

struct Setup {
    gate: KeyGate,
    keys: KeyManager,
    clock: ManualClock,
    app: Router,
    usage: Arc<MemoryUsageStore>,
    recent: RecentEvents,
}

fn setup() -> Setup {
    setup_with(|c| c)
}

fn setup_with(f: impl FnOnce(Console) -> Console) -> Setup {
    let clock = ManualClock::at_2026();
    let gate = KeyGate::new(
        Verifier::builder(MemoryStore::new())
            .clock(clock.clone())
            .build(),
    );
    let recent = RecentEvents::new(1000);
    let keys = KeyManager::for_verifier(gate.verifier(), Auditor::direct(recent.clone()));
    let usage = Arc::new(MemoryUsageStore::new());
    let api = AdminApi::new(keys.clone())
        .gate(&gate)
        .usage_store(usage.clone())
        .scope_vocabulary(ScopeVocabulary::new([
            KnownScope::new("points:read", true),
            KnownScope::new("points:write", true),
            KnownScope::new("keys:admin", false),
        ]));
    let app = Router::new().nest("/admin", api.clone().router()).nest(
        "/console",
        f(Console::new(api).recent_events(recent.clone())).router(),
    );
    Setup {
        gate,
        keys,
        clock,
        app,
        usage,
        recent,
    }
}

impl Setup {
    async fn key(&self, spec: KeySpec) -> (String, String) {
        let k = self.keys.issue("test", spec).await.unwrap();
        (k.key.expose_secret().to_owned(), k.key.id().to_string())
    }

    async fn status_of(&self, id: &str) -> String {
        self.keys
            .show(id.parse().unwrap())
            .await
            .unwrap()
            .status
            .as_str()
            .to_owned()
    }

    async fn count(&self) -> usize {
        self.keys.list(&KeyFilter::default()).await.unwrap().len()
    }

    async fn spend(&self, id: &str, window: QuotaWindow, requests: u64, cost: u64) {
        self.usage
            .add(&[Increment {
                key: id.parse().unwrap(),
                window: Window::containing(window, self.clock.now()),
                usage: Usage { cost, requests },
            }])
            .await
            .unwrap();
    }

    /// Records a request event for `key` (none: anonymous), refused with `denial`.
    fn request(&self, key: Option<&str>, denial: Option<DenialCode>, path: &str) {
        let mut e = RequestEvent::new(self.clock.now(), "r", "GET", path.to_owned());
        e.key_id = key.map(|k| KeyId::parse(k).unwrap());
        if let Some(d) = denial {
            e.decision = Decision::Denied;
            e.denial = Some(d);
            e.status = Some(403);
        } else {
            e.status = Some(200);
        }
        self.recent.record(&AuditEvent::Request(e)).unwrap();
    }

    fn browser(&self) -> Browser {
        Browser {
            app: self.app.clone(),
            cookies: BTreeMap::new(),
            tls: false,
            headers: Vec::new(),
            peer: "127.0.0.1:40000".parse().unwrap(),
        }
    }
}

fn admin_spec() -> KeySpec {
    KeySpec::new("admin").scope("*").resource("*")
}

/// A cookie jar and a client over the router.
struct Browser {
    app: Router,
    cookies: BTreeMap<String, String>,
    tls: bool,
    headers: Vec<(&'static str, &'static str)>,
    peer: SocketAddr,
}

struct Page {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
}

impl Page {
    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        between(&self.text, "name=\"csrf\" value=\"", "\"").expect("a csrf field")
    }
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let at = text.find(start)? + start.len();
    let len = text[at..].find(end)?;
    Some(text[at..at + len].to_owned())
}

fn form(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

impl Browser {
    async fn send(&mut self, method: &str, path: &str, body: Option<String>) -> Page {
        let mut req = Request::builder().method(method).uri(path);
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("cookie", jar.join("; "));
        }
        for (name, value) in &self.headers {
            req = req.header(*name, *value);
        }
        if body.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let mut req = req.body(Body::from(body.unwrap_or_default())).unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        if self.tls {
            req.extensions_mut().insert(TlsConnection);
        }
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let page = Page {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        };
        for c in page.set_cookies() {
            let pair = c.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        page
    }

    async fn get(&mut self, path: &str) -> Page {
        self.send("GET", path, None).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.send("POST", path, Some(form(fields))).await
    }

    async fn sign_in(&mut self, key: &str) -> Page {
        let login = self.get("/console/login").await;
        assert_eq!(login.status, StatusCode::OK);
        let csrf = login.csrf();
        self.post("/console/login", &[("csrf", &csrf), ("key", key)])
            .await
    }

    /// Signs in and returns the session's CSRF token (from the keys page).
    async fn signed_in(&mut self, key: &str) -> String {
        let r = self.sign_in(key).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
        assert_eq!(r.location(), "/console/keys");
        let keys = self.get("/console/keys").await;
        assert_eq!(keys.status, StatusCode::OK);
        keys.csrf()
    }
}

fn cookie_line<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {lines:?}"))
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_session_cookie_and_keeps_the_key_off_the_browser() {
    let s = setup();
    let (admin, admin_id) = s.key(admin_spec()).await;
    let (_, reader_id) = s
        .key(KeySpec::new("reader").scope("points:read").resource("docs"))
        .await;
    let mut b = s.browser();

    // Not signed in: every page sends to the sign-in form.
    for path in ["/console", "/console/keys"] {
        let r = b.get(path).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.location(), "/console/login");
    }
    let login = b.get("/console/login").await;
    assert_eq!(login.status, StatusCode::OK);
    assert_eq!(login.headers["cache-control"], "no-store");
    let csp = login.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(login.text.contains("<label for=\"key\">"));
    let lines = login.set_cookies();
    let line = cookie_line(&lines, "kg_console_login");
    assert!(line.contains("HttpOnly") && line.contains("SameSite=Strict"));
    assert!(!line.contains("Secure"), "plain HTTP: {line}");

    let csrf = login.csrf();
    let r = b
        .post("/console/login", &[("csrf", &csrf), ("key", &admin)])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(r.location(), "/console/keys");
    let lines = r.set_cookies();
    let session = cookie_line(&lines, "kg_console");
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    assert!(session.contains("Path=/console"), "{session}");
    assert!(!session.contains(&admin), "the key is not the cookie");
    assert!(!r.location().contains(&admin));
    let sid = b.cookies["kg_console"].clone();
    assert!(sid.len() >= 43, "a 256-bit session id: {sid}");
    // Signing in again starts a new session and ends the old one.
    let mut again = s.browser();
    again.cookies.insert("kg_console".into(), sid.clone());
    assert_eq!(again.get("/console/keys").await.status, StatusCode::OK);
    let login = again.get("/console/login").await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "signed in already");
    again.cookies.remove("kg_console");
    let login = again.get("/console/login").await;
    again.cookies.insert("kg_console".into(), sid.clone());
    let r = again
        .post(
            "/console/login",
            &[("csrf", &login.csrf()), ("key", &admin)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_ne!(again.cookies["kg_console"], sid);
    let mut stale = s.browser();
    stale.cookies.insert("kg_console".into(), sid.clone());
    assert_eq!(
        stale.get("/console/keys").await.status,
        StatusCode::SEE_OTHER
    );
    // (`b` shared that session: it signs in afresh.)
    b.signed_in(&admin).await;

    let keys = b.get("/console/keys").await;
    assert_eq!(keys.status, StatusCode::OK);
    assert!(keys.text.contains(&reader_id) && keys.text.contains(&admin_id));
    assert!(keys.text.contains("<code>points:read</code>"));
    assert!(
        !keys.text.contains(&admin),
        "the admin key is never in a page"
    );
    assert_eq!(keys.headers["cache-control"], "no-store");
    assert!(keys
        .text
        .contains(&format!("Signed in with key <code>{admin_id}</code>")));

    // A search and a status filter.
    let found = b.get("/console/keys?q=READER").await;
    assert!(found.text.contains(&reader_id) && !found.text.contains(&format!("row-{admin_id}")));
    let none = b.get("/console/keys?status=revoked").await;
    assert!(none.text.contains("0 of 0 keys"), "{}", none.text);
}

#[tokio::test]
async fn cookies_are_secure_under_tls_or_when_configured() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let mut b = s.browser();
    b.tls = true;
    let login = b.get("/console/login").await;
    assert!(cookie_line(&login.set_cookies(), "kg_console_login").contains("; Secure"));
    let csrf = login.csrf();
    let r = b
        .post("/console/login", &[("csrf", &csrf), ("key", &admin)])
        .await;
    assert!(cookie_line(&r.set_cookies(), "kg_console").contains("; Secure"));

    let s = setup_with(|c| c.secure_cookies(true));
    let (admin, _) = s.key(admin_spec()).await;
    let mut b = s.browser();
    let r = b.sign_in(&admin).await;
    assert!(cookie_line(&r.set_cookies(), "kg_console").contains("; Secure"));
}

#[tokio::test]
async fn a_key_without_the_admin_scope_or_a_bad_key_cannot_sign_in() {
    let s = setup();
    let (reader, _) = s
        .key(KeySpec::new("reader").scope("points:read").resource("docs"))
        .await;
    let mut b = s.browser();
    let r = b.sign_in(&reader).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text.contains("insufficient_scope"), "{}", r.text);
    assert!(!b.cookies.contains_key("kg_console"));
    assert!(!r.text.contains(&reader), "the key is not echoed");

    let r = b.sign_in("kg_not-a-key").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!b.cookies.contains_key("kg_console"));

    // A disabled admin key is refused too.
    let (admin, admin_id) = s.key(admin_spec()).await;
    s.keys
        .disable("test", admin_id.parse().unwrap())
        .await
        .unwrap();
    let r = b.sign_in(&admin).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!b.cookies.contains_key("kg_console"));
    let r = b.get("/console/keys").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn refused_sign_ins_are_limited_per_address_on_the_clock() {
    let s = setup_with(|c| c.failed_sign_ins_per_minute(3));
    let (admin, _) = s.key(admin_spec()).await;
    let mut b = s.browser();
    for _ in 0..3 {
        assert_eq!(b.sign_in("kg_guess").await.status, StatusCode::UNAUTHORIZED);
    }
    // Spent: even the right key waits, and no session is made.
    let r = b.sign_in(&admin).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!b.cookies.contains_key("kg_console"));
    // Another address is not held back.
    let mut other = s.browser();
    other.peer = "127.0.0.2:40000".parse().unwrap();
    other.signed_in(&admin).await;
    // The minute over, the first address signs in.
    s.clock.advance(Duration::from_secs(60));
    b.signed_in(&admin).await;
}

#[tokio::test]
async fn posts_without_the_session_token_are_refused_and_change_nothing() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let (_, victim) = s
        .key(KeySpec::new("victim").scope("points:read").resource("docs"))
        .await;

    // Sign-in needs the form's token, matching its cookie.
    let mut b = s.browser();
    let r = b.post("/console/login", &[("key", &admin)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let login = b.get("/console/login").await;
    let r = b
        .post("/console/login", &[("csrf", "forged"), ("key", &admin)])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(!b.cookies.contains_key("kg_console"));
    let _ = login;

    let csrf = b.signed_in(&admin).await;
    let before = s.count().await;
    for (path, fields) in [
        ("/console/keys", vec![("name", "evil")]),
        (
            &*format!("/console/keys/{victim}/revoke"),
            vec![("confirm", "yes")],
        ),
        (&*format!("/console/keys/{victim}/disable"), vec![]),
        (&*format!("/console/keys/{victim}/rotate"), vec![]),
    ] {
        let r = b.post(path, &fields).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} without a token");
        let mut forged = fields.clone();
        forged.push(("csrf", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        let r = b.post(path, &forged).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} with a wrong token");
    }
    // The right token from another site (a browser says so) is refused as well.
    b.headers.push(("sec-fetch-site", "cross-site"));
    let r = b
        .post(
            &format!("/console/keys/{victim}/disable"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(s.count().await, before);
    assert_eq!(s.status_of(&victim).await, "active");

    // Another session's token does not fit this one.
    let mut other = s.browser();
    let theirs = other.signed_in(&admin).await;
    assert_ne!(theirs, csrf);
    b.headers.clear();
    let r = b
        .post(
            &format!("/console/keys/{victim}/disable"),
            &[("csrf", &theirs)],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(s.status_of(&victim).await, "active");
}

#[tokio::test]
async fn a_new_key_is_shown_once_and_works_rotate_revoke_disable_enable_go_through_the_api() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let mut b = s.browser();
    let csrf = b.signed_in(&admin).await;
    let page = b.get("/console/keys").await;
    // The form offers the vocabulary's scopes the caller holds.
    assert!(page.text.contains("value=\"points:read\""));
    assert!(page.text.contains("value=\"points:write\""));

    let before = s.count().await;
    let r = b
        .post(
            "/console/keys",
            &[
                ("csrf", &csrf),
                ("name", "search-svc"),
                ("owner", "team-a"),
                ("scope", "points:read"),
                ("collections", "docs, faq"),
                ("expires_in", "30d"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(s.count().await, before + 1);
    let plaintext = between(&r.text, "id=\"new-key\">", "<").unwrap();
    let id = between(&r.text, "id=\"new-key-id\">", "<").unwrap();
    assert_eq!(r.text.matches(&plaintext).count(), 1, "shown exactly once");
    assert_eq!(r.headers["cache-control"], "no-store");
    let p = s.gate.verifier().verify(&plaintext).await.unwrap();
    assert_eq!(p.key_id().to_string(), id);
    assert_eq!(p.scopes(), ["points:read"]);
    assert_eq!(p.resources(), ["docs", "faq"]);
    assert!(p.expires_at().is_some());
    // Never again: not in the list, nor anywhere later.
    let list = b.get("/console/keys").await;
    assert!(list.text.contains(&id) && !list.text.contains(&plaintext));
    assert!(list.text.contains("team-a"));

    // A refused issue (an unknown scope) shows the API's problem and issues nothing.
    let r = b
        .post(
            "/console/keys",
            &[("csrf", &csrf), ("name", "x"), ("scope", "points:raed")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("unknown_scope"), "{}", r.text);
    assert_eq!(s.count().await, before + 1);

    // Rotate with a grace period: a new plaintext, once; the old key works until the grace ends.
    let r = b
        .post(
            &format!("/console/keys/{id}/rotate"),
            &[("csrf", &csrf), ("grace", "1h")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let rotated = between(&r.text, "id=\"new-key\">", "<").unwrap();
    let new_id = between(&r.text, "id=\"new-key-id\">", "<").unwrap();
    assert_ne!(rotated, plaintext);
    assert_eq!(r.text.matches(&rotated).count(), 1);
    assert!(s.gate.verifier().verify(&rotated).await.is_ok());
    assert!(
        s.gate.verifier().verify(&plaintext).await.is_ok(),
        "in grace"
    );
    s.clock.advance(Duration::from_secs(3601));
    assert!(
        s.gate.verifier().verify(&plaintext).await.is_err(),
        "grace over"
    );

    // Disable and enable.
    let b_csrf = b.signed_in(&admin).await; // the session idled out with the clock
    let r = b
        .post(
            &format!("/console/keys/{new_id}/disable"),
            &[("csrf", &b_csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        r.location(),
        format!("/console/keys?done=disabled&id={new_id}")
    );
    assert_eq!(s.status_of(&new_id).await, "disabled");
    let page = b.get(r.location()).await;
    assert!(page
        .text
        .contains(&format!("Key <code>{new_id}</code> disabled.")));
    assert!(page.text.contains(&format!("id=\"enable-{new_id}\"")));
    let r = b
        .post(
            &format!("/console/keys/{new_id}/enable"),
            &[("csrf", &b_csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(s.status_of(&new_id).await, "active");

    // Revoke asks first; without the confirmation nothing happens.
    let confirm = b.get(&format!("/console/keys/{new_id}/revoke")).await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.text.contains("cannot be undone"));
    let r = b
        .post(
            &format!("/console/keys/{new_id}/revoke"),
            &[("csrf", &b_csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.status_of(&new_id).await, "active");
    let r = b
        .post(
            &format!("/console/keys/{new_id}/revoke"),
            &[("csrf", &b_csrf), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(s.status_of(&new_id).await, "revoked");
    assert!(s.gate.verifier().verify(&rotated).await.is_err());
    // A revoked key has no actions left, and enabling it is the API's 409.
    let page = b.get("/console/keys").await;
    assert!(!page.text.contains(&format!("id=\"rotate-{new_id}\"")));
    let r = b
        .post(
            &format!("/console/keys/{new_id}/enable"),
            &[("csrf", &b_csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.text.contains("wrong_status"));
    // An unknown action or a malformed id.
    let r = b
        .post(
            &format!("/console/keys/{new_id}/explode"),
            &[("csrf", &b_csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = b
        .post("/console/keys/..%2Fx/disable", &[("csrf", &b_csrf)])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_narrow_admin_sees_and_offers_only_what_it_holds() {
    let s = setup();
    let (_, root_id) = s.key(admin_spec()).await;
    let (narrow, narrow_id) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("docs"),
        )
        .await;
    let (_, mine) = s
        .key(KeySpec::new("mine").scope("points:read").resource("docs"))
        .await;
    let mut b = s.browser();
    let csrf = b.signed_in(&narrow).await;
    let page = b.get("/console/keys").await;
    assert!(page.text.contains(&format!("row-{mine}")));
    assert!(page.text.contains(&format!("row-{narrow_id}")));
    assert!(
        !page.text.contains(&root_id),
        "the * admin is beyond its reach"
    );
    assert!(page.text.contains("value=\"points:read\""));
    assert!(
        !page.text.contains("value=\"points:write\""),
        "not held: not offered"
    );

    // Acting on a key beyond its reach is the API's 404; granting more is its 403.
    let r = b
        .post(
            &format!("/console/keys/{root_id}/disable"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text.contains("key_not_found"));
    assert_eq!(s.status_of(&root_id).await, "active");
    let r = b.get(&format!("/console/keys/{root_id}/revoke")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let before = s.count().await;
    let r = b
        .post(
            "/console/keys",
            &[
                ("csrf", &csrf),
                ("name", "wider"),
                ("scope", "points:write"),
                ("collections", "docs"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.text.contains("privilege_escalation"));
    assert_eq!(s.count().await, before);
}

#[tokio::test]
async fn sessions_end_on_the_clock_on_sign_out_and_when_the_key_is_revoked() {
    let s = setup_with(|c| {
        c.session_idle(Duration::from_secs(600))
            .session_lifetime(Duration::from_secs(3600))
    });
    let (admin, admin_id) = s.key(admin_spec()).await;
    let mut b = s.browser();
    b.signed_in(&admin).await;

    // Idle: each page keeps it alive; ten idle minutes end it.
    s.clock.advance(Duration::from_secs(599));
    assert_eq!(b.get("/console/keys").await.status, StatusCode::OK);
    s.clock.advance(Duration::from_secs(599));
    assert_eq!(b.get("/console/keys").await.status, StatusCode::OK);
    s.clock.advance(Duration::from_secs(600));
    let r = b.get("/console/keys").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/console/login");

    // The lifetime ends it even when busy.
    b.signed_in(&admin).await;
    for _ in 0..6 {
        s.clock.advance(Duration::from_secs(590));
        assert_eq!(b.get("/console/keys").await.status, StatusCode::OK);
    }
    s.clock.advance(Duration::from_secs(590));
    assert_eq!(b.get("/console/keys").await.status, StatusCode::SEE_OTHER);

    // Sign-out needs the token, clears the cookie and ends the session server-side.
    let csrf = b.signed_in(&admin).await;
    let sid = b.cookies["kg_console"].clone();
    let r = b.post("/console/logout", &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = b.post("/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let cleared = cookie_line(&r.set_cookies(), "kg_console").to_owned();
    assert!(cleared.starts_with("kg_console=;") && cleared.contains("Max-Age=0"));
    b.cookies.insert("kg_console".into(), sid);
    assert_eq!(b.get("/console/keys").await.status, StatusCode::SEE_OTHER);

    // The session's own key revoked elsewhere: its next page ends it.
    b.signed_in(&admin).await;
    s.keys
        .revoke("test", admin_id.parse().unwrap())
        .await
        .unwrap();
    let r = b.get("/console/keys").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/console/login?ended=invalid_key");
    let again = b.get("/console/keys").await;
    assert_eq!(again.location(), "/console/login");
    let login = b.get("/console/login?ended=invalid_key").await;
    assert!(login.text.contains("The session ended"));
}

#[tokio::test]
async fn assets_are_served_compiled_in() {
    let s = setup();
    let mut b = s.browser();
    let css = b.get("/console/static/console.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
    assert!(css.text.contains(":focus"));
    let js = b.get("/console/static/console.js").await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.text.contains("clipboard"));
}

#[tokio::test]
async fn usage_charts_requests_per_key_ranks_spend_stacks_denials_and_exports_csv() {
    let s = setup();
    let (admin, _) = s.key(admin_spec()).await;
    let (_, big) = s
        .key(
            KeySpec::new("big-spender")
                .scope("points:read")
                .resource("docs"),
        )
        .await;
    let (_, small) = s
        .key(
            KeySpec::new("small,spender")
                .scope("points:read")
                .resource("docs"),
        )
        .await;
    s.spend(&big, QuotaWindow::Day, 7, 700).await;
    s.spend(&big, QuotaWindow::Hour, 7, 700).await;
    s.spend(&small, QuotaWindow::Day, 2, 20).await;
    s.request(Some(&big), None, "/collections");
    s.request(Some(&big), Some(DenialCode::RateLimited), "/collections");
    s.request(
        Some(&small),
        Some(DenialCode::QuotaExceeded),
        "/collections",
    );
    s.request(None, Some(DenialCode::MissingKey), "/collections");
    let mut b = s.browser();
    b.signed_in(&admin).await;

    let page = b.get("/console/usage").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page
        .text
        .contains("<figure class=\"chart\" id=\"requests\">"));
    assert!(page
        .text
        .contains(&format!("data-series=\"big-spender ({big})\"")));
    assert!(page
        .text
        .contains(&format!("data-series=\"small,spender ({small})\"")));
    // The top keys, by spend.
    let top = between(&page.text, "<table id=\"top\">", "</table>").unwrap();
    let (at_big, at_small) = (top.find(&big).unwrap(), top.find(&small).unwrap());
    assert!(at_big < at_small, "{top}");
    assert!(top.contains("<td>7</td><td>700</td>"));
    // Requests by outcome: allowed and each denial code stacked; a * admin sees anonymous ones.
    let outcomes = between(&page.text, "id=\"outcomes\"", "</figure>").unwrap();
    for code in ["allowed", "rate_limited", "quota_exceeded", "missing_key"] {
        assert!(
            outcomes.contains(&format!("data-series=\"{code}\"")),
            "{code}: {outcomes}"
        );
    }

    // One key, per hour: only its hourly windows.
    let hour = b
        .get(&format!("/console/usage?period=hour&key={big}"))
        .await;
    assert!(hour
        .text
        .contains(&format!("data-series=\"big-spender ({big})\"")));
    assert!(!hour.text.contains(&format!("({small})\"")));
    let month = b.get("/console/usage?period=month").await;
    assert!(month.text.contains("Nothing counted in this period"));

    // CSV for billing.
    let csv = b.get("/console/usage.csv?period=day").await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert_eq!(
        csv.headers["content-disposition"],
        "attachment; filename=\"keygate-usage-day.csv\""
    );
    let mut lines = csv.text.lines();
    assert_eq!(
        lines.next(),
        Some("key_id,name,owner,identity,window,start,end,requests,cost")
    );
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(rest
        .iter()
        .any(|l| l.starts_with(&format!("{big},big-spender,,,day,")) && l.ends_with(",7,700")));
    assert!(rest.iter().any(
        |l| l.starts_with(&format!("{small},\"small,spender\",,,day,")) && l.ends_with(",2,20")
    ));

    // Per identity: only its keys.
    s.keys
        .create_identity("test", Identity::new("etl", s.clock.now()))
        .await
        .unwrap();
    let (_, etl) = s
        .key(
            KeySpec::new("etl-1")
                .scope("points:read")
                .resource("docs")
                .identity("etl"),
        )
        .await;
    s.spend(&etl, QuotaWindow::Day, 4, 40).await;
    let page = b.get("/console/usage?identity=etl").await;
    assert!(page
        .text
        .contains(&format!("data-series=\"etl-1 ({etl})\"")));
    assert!(!page
        .text
        .contains(&format!("data-series=\"big-spender ({big})\"")));
    assert!(page
        .text
        .contains("<option value=\"etl\" selected>etl</option>"));
    let keys = b.get("/console/keys").await;
    assert!(
        keys.text.contains("<option value=\"etl\">etl</option>"),
        "the create form offers it"
    );

    // A narrow admin sees neither the other keys' usage nor anonymous denials.
    let (narrow, _) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("faq"),
        )
        .await;
    let mut n = s.browser();
    n.signed_in(&narrow).await;
    let page = n.get("/console/usage").await;
    assert!(!page.text.contains(&big) && !page.text.contains("missing_key"));
    let csv = n.get("/console/usage.csv").await;
    assert_eq!(csv.text.lines().count(), 1);
    // Not signed in: no export.
    let mut anon = s.browser();
    assert_eq!(
        anon.get("/console/usage.csv").await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn the_audit_page_filters_the_events_the_caller_may_see_and_verifies_the_chain() {
    let dir = std::env::temp_dir().join(format!("keygate-console-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = FileSink::builder(&dir).open().unwrap();
    for i in 0..3 {
        file.record(&RequestEvent::new(std::time::UNIX_EPOCH, format!("r{i}"), "GET", "/").into())
            .unwrap();
    }
    file.sync().unwrap();
    let s = setup_with(|c| c.chain_check(ChainCheck::new(&dir, "audit", VerifyOptions::default())));
    let (admin, _) = s.key(admin_spec()).await;
    let (_, victim) = s
        .key(KeySpec::new("victim").scope("points:read").resource("docs"))
        .await;
    s.keys
        .revoke("test", victim.parse().unwrap())
        .await
        .unwrap();
    s.request(
        Some(&victim),
        Some(DenialCode::RevokedKey),
        "/collections/docs",
    );
    s.request(None, Some(DenialCode::MissingKey), "/collections");
    let mut b = s.browser();
    b.signed_in(&admin).await;

    let page = b.get("/console/audit").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text.contains("Chain verified: 3 lines in 1 file,"),
        "{}",
        page.text
    );
    let events = between(&page.text, "<table id=\"events\">", "</table>").unwrap();
    assert!(
        events.contains("<code>revoked_key</code>")
            && events.contains("GET /collections/docs → 403")
    );
    assert!(
        events.contains("<code>revoked</code>"),
        "the lifecycle event"
    );
    assert!(
        events.contains("<code>missing_key</code>"),
        "a * admin sees anonymous denials"
    );
    // Newest first.
    assert!(events.find("missing_key").unwrap() < events.find("revoked_key").unwrap());

    let only = b.get("/console/audit?code=revoked_key").await;
    let events = between(&only.text, "<table id=\"events\">", "</table>").unwrap();
    assert_eq!(
        events.matches("<tr>").count(),
        2,
        "header and one event: {events}"
    );
    let by_key = b.get(&format!("/console/audit?key={victim}")).await;
    let events = between(&by_key.text, "<table id=\"events\">", "</table>").unwrap();
    assert!(!events.contains("missing_key") && events.contains("revoked_key"));
    s.clock.advance(Duration::from_secs(2 * 3600));
    b.signed_in(&admin).await;
    let old = b.get("/console/audit?since=1h").await;
    let events = between(&old.text, "<table id=\"events\">", "</table>").unwrap();
    assert!(!events.contains("revoked_key"), "older than an hour");
    let all = b.get("/console/audit?since=1d&live=1").await;
    assert!(all.text.contains("revoked_key"));
    assert!(all
        .text
        .contains("<meta http-equiv=\"refresh\" content=\"5\">"));

    // A narrow admin sees neither other keys' events nor anonymous ones.
    let (narrow, _) = s
        .key(
            KeySpec::new("narrow")
                .scope("keys:admin")
                .scope("points:read")
                .resource("faq"),
        )
        .await;
    let mut n = s.browser();
    n.signed_in(&narrow).await;
    let page = n.get("/console/audit").await;
    assert!(!page.text.contains("revoked_key") && !page.text.contains("missing_key"));

    // A tampered log reads as broken.
    let log = keygate::core::audit::log_files(&dir, "audit")
        .unwrap()
        .remove(0);
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("r1", "r9", 1)).unwrap();
    let page = b.get("/console/audit").await;
    assert!(
        page.text.contains("Chain BROKEN at line 2"),
        "{}",
        page.text
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
