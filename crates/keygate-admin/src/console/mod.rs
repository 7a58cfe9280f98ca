//! A key console in the browser: server-rendered pages over the [admin API](crate), mounted
//! next to it (`Router::new().nest("/console", Console::new(api).router())`).
//!
//! The console holds no authority of its own. The operator signs in with an admin key; the
//! key stays on the server, in a session table (the browser holds only a random session
//! id, in a cookie that is `HttpOnly`, `SameSite=Strict` and, under TLS or with
//! [`Console::secure_cookies`], `Secure`). Every page checks the key again with the admin
//! API's own caller check (scope, address allowlist, status), and every read and change is
//! a request to the admin API's own router with that key as its bearer: the console can see
//! and do exactly what the key could through `/admin`, no more. A key revoked, disabled or
//! expired ends its sessions on their next page.
//!
//! | method and path (under the mount) | what it does |
//! |---|---|
//! | `GET /` | to the keys page, or the sign-in page |
//! | `GET /login`, `POST /login` | the sign-in form (a per-form token cookie guards it) |
//! | `POST /logout` | ends the session |
//! | `GET /keys` | the keys the caller may see (`?q=` searches, `?status=` filters), and a form issuing one |
//! | `POST /keys` | issues a key and shows its plaintext, this once |
//! | `POST /keys/{id}/rotate` | rotates (field `grace`) and shows the new plaintext, this once |
//! | `GET /keys/{id}/revoke`, `POST /keys/{id}/revoke` | asks for confirmation; revokes (field `confirm=yes`) |
//! | `POST /keys/{id}/disable`, `/enable` | switches a key off and on |
//! | `GET /usage` | requests per key over hours, days or months (`?period=`, `?key=`, `?identity=`), the top keys by spend, and requests by outcome with denials by code (from [`RecentEvents`]) |
//! | `GET /usage.csv` | the same usage as CSV, for billing |
//! | `GET /audit` | the recent events (`?key=`, `?code=`, `?since=1h`, `?live=1` reloads every 5 s) and the log's chain verification ([`ChainCheck`]) |
//! | `GET /static/console.css`, `/static/console.js` | the style sheet and the copy button's script |
//!
//! Refused sign-ins are limited per client address
//! ([`Console::failed_sign_ins_per_minute`]), as the console sits outside the layers' rate
//! limits.
//!
//! Every `POST` needs the session's CSRF token (field `csrf`) and is refused (403) without
//! it; a browser's cross-site `Sec-Fetch-Site` is refused as well. Sessions expire after
//! [`Console::session_idle`] without a page and after [`Console::session_lifetime`] in
//! all, read on the admin API's clock. Every answer is `Cache-Control: no-store` and carries
//! a strict `Content-Security-Policy` (no inline script or style).
//!
//! ```
//! use axum::Router;
//! use keygate::core::audit::Auditor;
//! use keygate::{KeyGate, KeyManager, MemoryStore, Verifier};
//! use keygate_admin::console::Console;
//! use keygate_admin::AdminApi;
//!
//! let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
//! let keys = KeyManager::for_verifier(gate.verifier(), Auditor::tracing());
//! let api = AdminApi::new(keys).gate(&gate);
//! let app: Router = Router::new()
//!     .nest("/admin", api.clone().router())
//!     .nest("/console", Console::new(api).router());
//! ```

mod audit;
mod chart;
mod events;
mod html;
mod keys;
mod usage;

pub use events::{ChainCheck, RecentEvents};

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION,
    SET_COOKIE,
};
use http::{Method, StatusCode};
use keygate::client_ip::ClientIp;
use keygate::transport::TlsConnection;
use keygate::Principal;
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use crate::{AdminApi, Shared};
use html::{esc, Frame};

const SESSION_COOKIE: &str = "kg_console";
const LOGIN_COOKIE: &str = "kg_console_login";
/// The most sessions held at once; a sign-in beyond it (after expired ones are dropped)
/// is refused with 503.
const MAX_SESSIONS: usize = 10_000;
/// The largest form body read.
const MAX_FORM: usize = 64 * 1024;
/// The largest admin API answer read.
const MAX_ANSWER: usize = 32 * 1024 * 1024;

/// The console: configure it, then take its [`router`](Self::router) and mount it. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Console {
    api: AdminApi,
    base: String,
    secure: bool,
    idle: Duration,
    lifetime: Duration,
    rotate_after: Option<Duration>,
    events: Option<RecentEvents>,
    chain: Option<ChainCheck>,
    failed_sign_ins: u32,
}

impl Console {
    /// A console over `api` (its gate, clock, scope and usage source), mounted at
    /// `/console`; sessions end after 30 minutes idle or 8 hours in all.
    pub fn new(api: AdminApi) -> Self {
        Console {
            api,
            base: "/console".to_owned(),
            secure: false,
            idle: Duration::from_secs(30 * 60),
            lifetime: Duration::from_secs(8 * 3600),
            rotate_after: None,
            events: None,
            chain: None,
            failed_sign_ins: 10,
        }
    }

    /// How many refused sign-ins one client address may make per minute (default 10);
    /// beyond them its sign-ins are answered 429 until the minute ends (the console sits
    /// outside the layers' anonymous rate limit). Counted on the admin API's clock, per
    /// address as the hub sees it; an unknown address counts as one.
    pub fn failed_sign_ins_per_minute(mut self, n: u32) -> Self {
        self.failed_sign_ins = n;
        self
    }

    /// Shows these events on the audit page and the usage page's denials chart (only
    /// events of keys the caller may see; events of no key only to a caller holding
    /// `audit:read`, as a `*` admin does, and no `tenant`).
    pub fn recent_events(mut self, events: RecentEvents) -> Self {
        self.events = Some(events);
        self
    }

    /// Verifies this hash-chained log each time the audit page is shown.
    pub fn chain_check(mut self, chain: ChainCheck) -> Self {
        self.chain = Some(chain);
        self
    }

    /// Where the router is mounted (default `/console`): the links and the cookies' `Path`.
    /// A trailing `/` is dropped.
    pub fn mount_path(mut self, path: &str) -> Self {
        self.base = path.trim_end_matches('/').to_owned();
        self
    }

    /// Marks the cookies `Secure` on every answer (default: only for requests that arrived
    /// over TLS, as [`keygate::transport::is_tls`] tells). Set it behind a TLS-terminating
    /// proxy.
    pub fn secure_cookies(mut self, yes: bool) -> Self {
        self.secure = yes;
        self
    }

    /// How long a session lasts without a page (default 30 minutes).
    pub fn session_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// How long a session lasts at most (default 8 hours).
    pub fn session_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Keys older than this are shown as due for rotation (default: none is).
    pub fn rotation_due_after(mut self, age: Duration) -> Self {
        self.rotate_after = Some(age);
        self
    }

    /// The routes, relative to where they are mounted (see the [module docs](self)). Each
    /// router has its own session table.
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let inner = Arc::new(Inner {
            shared: self.api.shared.clone(),
            admin: self.api.router(),
            base: self.base,
            secure: self.secure,
            idle: self.idle,
            lifetime: self.lifetime,
            rotate_after: self.rotate_after,
            events: self.events,
            chain: self.chain,
            failed_sign_ins: self.failed_sign_ins,
            failures: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        });
        Router::new()
            .route("/", get(index))
            .route("/static/console.css", get(css))
            .route("/static/console.js", get(js))
            .route("/login", get(login_form).post(login))
            .route("/logout", post(logout))
            .route("/keys", get(keys::list).post(keys::create))
            .route(
                "/keys/{id}/revoke",
                get(keys::confirm_revoke).post(keys::action),
            )
            .route("/keys/{id}/{action}", post(keys::action))
            .route("/usage", get(usage::page))
            .route("/usage.csv", get(usage::export))
            .route("/audit", get(audit::page))
            .with_state(inner)
    }
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("base", &self.base)
            .field("secure", &self.secure)
            .field("idle", &self.idle)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    shared: Arc<Shared>,
    admin: Router,
    base: String,
    secure: bool,
    idle: Duration,
    lifetime: Duration,
    rotate_after: Option<Duration>,
    events: Option<RecentEvents>,
    chain: Option<ChainCheck>,
    failed_sign_ins: u32,
    /// Refused sign-ins per client address: (minute start, count).
    failures: Mutex<HashMap<Option<IpAddr>, (SystemTime, u32)>>,
    sessions: Mutex<HashMap<String, Session>>,
}

type St = State<Arc<Inner>>;

/// An admin key held for a session. Never printed.
#[derive(Clone)]
struct HeldKey(String);

impl fmt::Debug for HeldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeldKey(…)")
    }
}

struct Session {
    key: HeldKey,
    csrf: String,
    started: SystemTime,
    seen: SystemTime,
}

/// A signed-in request: the session's key and token, the caller as the admin API sees it,
/// and what of the browser's request the admin API needs (address, transport).
pub(crate) struct Signed {
    key: HeldKey,
    pub(crate) csrf: String,
    pub(crate) caller: Principal,
    pub(crate) key_id: String,
    carry: Carry,
}

/// What an internal admin API request takes from the browser's: the connection's peer,
/// an earlier layer's client address, the TLS marker, and the forwarding headers (which
/// the hub believes only from its trusted proxies). Never the browser's own keygate
/// verdict: the admin API resolves the session's key itself.
#[derive(Clone, Default)]
struct Carry {
    peer: Option<ConnectInfo<SocketAddr>>,
    client_ip: Option<ClientIp>,
    tls: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Carry {
    fn of(req: &http::request::Parts) -> Self {
        let headers = ["forwarded", "x-forwarded-for", "x-real-ip"]
            .iter()
            .flat_map(|name| {
                req.headers
                    .get_all(*name)
                    .iter()
                    .map(move |v| (HeaderName::from_static(name), v.clone()))
            })
            .collect();
        Carry {
            peer: req.extensions.get::<ConnectInfo<SocketAddr>>().cloned(),
            client_ip: req.extensions.get::<ClientIp>().cloned(),
            tls: req.extensions.get::<TlsConnection>().is_some(),
            headers,
        }
    }

    fn request(&self, key: &HeldKey, method: Method, uri: &str, body: Body) -> Request {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri.parse().unwrap_or_default();
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", key.0)) {
            h.insert(AUTHORIZATION, v);
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &self.headers {
            h.append(name.clone(), value.clone());
        }
        let ext = req.extensions_mut();
        if let Some(p) = &self.peer {
            ext.insert(*p);
        }
        if let Some(ip) = &self.client_ip {
            ext.insert(*ip);
        }
        if self.tls {
            ext.insert(TlsConnection);
        }
        req
    }
}

/// The most addresses whose refused sign-ins are counted; beyond it, finished minutes are
/// dropped first, then the table is cleared (fail open on counting, never on checking).
const MAX_FAILURE_SOURCES: usize = 10_000;

/// An admin API error answer, for the page.
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) detail: String,
}

impl Problem {
    fn html(&self) -> String {
        format!(
            "<div class=\"error\" role=\"alert\"><strong>{}</strong> (<code>{}</code>): {}</div>",
            self.status.as_u16(),
            esc(&self.code),
            esc(&self.detail)
        )
    }
}

impl Inner {
    fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    fn frame<'a>(&'a self, title: &'a str, signed: Option<&'a Signed>) -> Frame<'a> {
        Frame {
            base: &self.base,
            title,
            session: signed.map(|s| (s.key_id.as_str(), s.csrf.as_str())),
            refresh: None,
        }
    }

    /// The client address of a sign-in, as the admin API's caller check would see it.
    fn address(&self, carry: &Carry) -> Option<IpAddr> {
        let (parts, _) = carry
            .request(&HeldKey(String::new()), Method::POST, "/", Body::empty())
            .into_parts();
        let mut req = http::Request::from_parts(parts, ());
        crate::handlers::client_addr(&self.shared, &mut req)
    }

    /// Whether `ip` has used up its refused sign-ins for this minute.
    fn sign_ins_spent(&self, ip: Option<IpAddr>, now: SystemTime) -> bool {
        let table = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        table.get(&ip).is_some_and(|(start, n)| {
            now < *start + Duration::from_secs(60) && *n >= self.failed_sign_ins
        })
    }

    /// Counts a refused sign-in from `ip`.
    fn sign_in_refused(&self, ip: Option<IpAddr>, now: SystemTime) {
        let minute = Duration::from_secs(60);
        let mut table = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if table.len() >= MAX_FAILURE_SOURCES && !table.contains_key(&ip) {
            table.retain(|_, (start, _)| now < *start + minute);
            if table.len() >= MAX_FAILURE_SOURCES {
                table.clear();
            }
        }
        let entry = table.entry(ip).or_insert((now, 0));
        if now >= entry.0 + minute {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Whether the caller sees events of no key (anonymous requests): it holds
    /// `audit:read` and is no tenant admin.
    fn sees_anonymous(&self, signed: &Signed) -> bool {
        signed.caller.tenant().is_none()
            && keygate::Scope::parse("audit:read").is_ok_and(|s| signed.caller.has_scope(&s))
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self, s: &Session, now: SystemTime) -> bool {
        now < s.started + self.lifetime && now < s.seen + self.idle
    }

    /// The session named by the request's cookie, if live (touching it); an expired one
    /// is dropped.
    fn session(&self, parts: &http::request::Parts) -> Option<(String, HeldKey, String)> {
        let id = cookie(parts, SESSION_COOKIE)?;
        let now = self.now();
        let mut table = self.sessions();
        let live = match table.get(&id) {
            Some(s) => self.live(s, now),
            None => return None,
        };
        if !live {
            table.remove(&id);
            return None;
        }
        let s = table.get_mut(&id)?;
        s.seen = now;
        Some((id, s.key.clone(), s.csrf.clone()))
    }

    /// The admin API's caller check for `key`, from where the browser calls.
    async fn check(&self, key: &HeldKey, carry: &Carry) -> Result<Principal, Problem> {
        let (parts, _) = carry
            .request(key, Method::GET, "/keys", Body::empty())
            .into_parts();
        let (_, verdict) = crate::handlers::caller(&self.shared, parts, false).await;
        match verdict {
            Ok(p) => Ok(p),
            Err(res) => Err(problem_of(res).await),
        }
    }

    /// The signed-in caller of `parts`, or the answer to give instead: to the sign-in page
    /// when there is no live session, or the session's key no longer passes the admin
    /// API's check (the session is then ended).
    async fn signed(&self, parts: &http::request::Parts) -> Result<Signed, Response> {
        let Some((id, key, csrf)) = self.session(parts) else {
            return Err(redirect(&format!("{}/login", self.base)));
        };
        let carry = Carry::of(parts);
        match self.check(&key, &carry).await {
            Ok(caller) => Ok(Signed {
                key,
                csrf,
                key_id: caller.key_id().to_string(),
                caller,
                carry,
            }),
            Err(p) => {
                self.sessions().remove(&id);
                Err(redirect(&format!(
                    "{}/login?ended={}",
                    self.base,
                    html::q(&p.code)
                )))
            }
        }
    }

    /// Calls the admin API as the signed-in caller; the JSON answer, or its problem.
    pub(crate) async fn call(
        &self,
        signed: &Signed,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Problem> {
        let body = match body {
            Some(v) => Body::from(serde_json::to_vec(&v).unwrap_or_default()),
            None => Body::empty(),
        };
        let req = signed.carry.request(&signed.key, method, uri, body);
        let res = match self.admin.clone().oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        let status = res.status();
        if !status.is_success() {
            return Err(problem_of(res).await);
        }
        let bytes = axum::body::to_bytes(res.into_body(), MAX_ANSWER)
            .await
            .map_err(|_| Problem {
                status: StatusCode::BAD_GATEWAY,
                code: "answer_unreadable".into(),
                detail: "the admin API's answer could not be read".into(),
            })?;
        serde_json::from_slice(&bytes).map_err(|_| Problem {
            status: StatusCode::BAD_GATEWAY,
            code: "answer_unreadable".into(),
            detail: "the admin API's answer is not JSON".into(),
        })
    }

    /// Checks a form's CSRF token against the session's, and the browser's
    /// `Sec-Fetch-Site`.
    fn csrf_ok(&self, parts: &http::request::Parts, form: &Form, expected: &str) -> bool {
        same_site(parts) && token_eq(form.get("csrf").unwrap_or(""), expected)
    }

    fn cookie(
        &self,
        parts: &http::request::Parts,
        name: &str,
        value: &str,
        max_age: Option<u64>,
    ) -> HeaderValue {
        let path = if self.base.is_empty() {
            "/"
        } else {
            &self.base
        };
        let secure = if self.secure || parts.extensions.get::<TlsConnection>().is_some() {
            "; Secure"
        } else {
            ""
        };
        let age = max_age
            .map(|s| format!("; Max-Age={s}"))
            .unwrap_or_default();
        HeaderValue::from_str(&format!(
            "{name}={value}; Path={path}; HttpOnly; SameSite=Strict{secure}{age}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("kg_console=; Max-Age=0"))
    }
}

/// Reads a refused admin API answer (`application/problem+json`, or a keygate denial).
async fn problem_of(res: Response) -> Problem {
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), MAX_FORM)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let text = |name: &str| v.get(name).and_then(|x| x.as_str()).map(str::to_owned);
    Problem {
        status,
        code: text("code").unwrap_or_else(|| "error".into()),
        detail: text("detail")
            .or_else(|| text("title"))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("Error").into()),
    }
}

fn token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn token_eq(given: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// A browser's cross-site request is refused; requests without the header (older
/// browsers, tools) rely on the CSRF token alone.
fn same_site(parts: &http::request::Parts) -> bool {
    match parts.headers.get("sec-fetch-site") {
        None => true,
        Some(v) => matches!(v.as_bytes(), b"same-origin" | b"none"),
    }
}

fn cookie(parts: &http::request::Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

/// A parsed form (`application/x-www-form-urlencoded`).
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    async fn read(body: Body) -> Option<Form> {
        let bytes = axum::body::to_bytes(body, MAX_FORM).await.ok()?;
        Some(Form(
            form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }

    fn query(parts: &http::request::Parts) -> Form {
        Form(
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// An HTML answer with the console's headers.
pub(crate) fn html(status: StatusCode, body: String) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(h);
    res
}

fn secure_headers(h: &mut http::HeaderMap) {
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
}

/// 303 See Other to `to`.
pub(crate) fn redirect(to: &str) -> Response {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(LOCATION, v);
    }
    secure_headers(res.headers_mut());
    res
}

fn forbidden(c: &Inner, signed: Option<&Signed>) -> Response {
    html(
        StatusCode::FORBIDDEN,
        html::page(
            &c.frame("Refused", signed),
            "<div class=\"error\" role=\"alert\">This form is out of date or came from \
             another site (its security token does not match). Reload the page and try \
             again.</div>",
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

async fn index(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    match c.session(&parts) {
        Some(_) => redirect(&format!("{}/keys", c.base)),
        None => redirect(&format!("{}/login", c.base)),
    }
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    let mut res = Response::new(Body::from(text));
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

fn login_page(
    c: &Inner,
    parts: &http::request::Parts,
    status: StatusCode,
    message: &str,
) -> Response {
    let Some(token) = token() else {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            html::page(
                &c.frame("Sign in", None),
                "<div class=\"error\" role=\"alert\">No random numbers: cannot sign in.</div>",
            ),
        );
    };
    let body = format!(
        "{message}<form method=\"post\" action=\"{base}/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{token}\">\
         <p><label for=\"key\">Admin API key</label><br>\
         <input type=\"password\" id=\"key\" name=\"key\" autocomplete=\"off\" required size=\"60\"></p>\
         <p><button type=\"submit\">Sign in</button></p></form>\
         <p>The key stays on the server for this session; the browser holds only a session cookie.</p>",
        base = esc(&c.base),
    );
    let mut res = html(status, html::page(&c.frame("Sign in", None), &body));
    res.headers_mut()
        .append(SET_COOKIE, c.cookie(parts, LOGIN_COOKIE, &token, Some(600)));
    res
}

async fn login_form(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if c.session(&parts).is_some() {
        return redirect(&format!("{}/keys", c.base));
    }
    let message = match Form::query(&parts).get("ended") {
        Some(code) => format!(
            "<div class=\"error\" role=\"alert\">The session ended: the key was refused (<code>{}</code>).</div>",
            esc(code)
        ),
        None => String::new(),
    };
    login_page(&c, &parts, StatusCode::OK, &message)
}

async fn login(State(c): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some(form) = Form::read(body).await else {
        return login_page(&c, &parts, StatusCode::BAD_REQUEST, "");
    };
    let expected = cookie(&parts, LOGIN_COOKIE).unwrap_or_default();
    if !c.csrf_ok(&parts, &form, &expected) {
        return forbidden(&c, None);
    }
    let key = HeldKey(form.get("key").unwrap_or("").to_owned());
    let carry = Carry::of(&parts);
    let ip = c.address(&carry);
    if c.sign_ins_spent(ip, c.now()) {
        return login_page(
            &c,
            &parts,
            StatusCode::TOO_MANY_REQUESTS,
            "<div class=\"error\" role=\"alert\">Too many refused sign-ins from this address: \
             wait a minute.</div>",
        );
    }
    if let Err(p) = c.check(&key, &carry).await {
        c.sign_in_refused(ip, c.now());
        let status = if p.status.is_client_error() {
            p.status
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return login_page(
                &c,
                &parts,
                status,
                &format!(
                    "<div class=\"error\" role=\"alert\">This key may not use the console (<code>{}</code>): {}</div>",
                    esc(&p.code),
                    esc(&p.detail)
                ),
            );
    }
    let (Some(id), Some(csrf)) = (token(), token()) else {
        return login_page(&c, &parts, StatusCode::SERVICE_UNAVAILABLE, "");
    };
    let now = c.now();
    {
        let mut table = c.sessions();
        // A new sign-in never continues an earlier session (no fixation): that one ends.
        if let Some(old) = cookie(&parts, SESSION_COOKIE) {
            table.remove(&old);
        }
        if table.len() >= MAX_SESSIONS {
            table.retain(|_, s| c.live(s, now));
        }
        if table.len() >= MAX_SESSIONS {
            drop(table);
            return login_page(
                &c,
                &parts,
                StatusCode::SERVICE_UNAVAILABLE,
                "<div class=\"error\" role=\"alert\">Too many sessions: try again later.</div>",
            );
        }
        table.insert(
            id.clone(),
            Session {
                key,
                csrf,
                started: now,
                seen: now,
            },
        );
    }
    let mut res = redirect(&format!("{}/keys", c.base));
    let h = res.headers_mut();
    h.append(SET_COOKIE, c.cookie(&parts, SESSION_COOKIE, &id, None));
    h.append(SET_COOKIE, c.cookie(&parts, LOGIN_COOKIE, "", Some(0)));
    res
}

async fn logout(State(c): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some((id, _, csrf)) = c.session(&parts) else {
        return redirect(&format!("{}/login", c.base));
    };
    let Some(form) = Form::read(body).await else {
        return forbidden(&c, None);
    };
    if !c.csrf_ok(&parts, &form, &csrf) {
        return forbidden(&c, None);
    }
    c.sessions().remove(&id);
    let mut res = redirect(&format!("{}/login", c.base));
    res.headers_mut()
        .append(SET_COOKIE, c.cookie(&parts, SESSION_COOKIE, "", Some(0)));
    res
}
