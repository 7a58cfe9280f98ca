//! The keys page and its actions.

use std::fmt::Write;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::response::Response;
use http::{Method, StatusCode};
use keygate::Scope;
use serde::Deserialize;
use serde_json::{json, Value};

use super::html::{self, csrf_field, esc, q};
use super::{forbidden, html as answer, redirect, Form, Inner, Problem, Signed};

type St = State<Arc<Inner>>;

/// The grace periods the rotate form offers.
const GRACE: [(&str, &str); 4] = [
    ("0s", "none"),
    ("15m", "15 minutes"),
    ("1h", "1 hour"),
    ("24h", "24 hours"),
];

/// One key as `GET /admin/keys` lists it (the fields the page shows).
#[derive(Deserialize)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) owner: Option<String>,
    pub(crate) status: String,
    pub(crate) created_at: String,
    #[serde(default)]
    pub(crate) expires_at: Option<String>,
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    #[serde(default)]
    pub(crate) resources: Vec<String>,
    #[serde(default)]
    pub(crate) grants: Vec<GrantRow>,
    #[serde(default)]
    pub(crate) roles: Vec<String>,
    #[serde(default)]
    pub(crate) identity: Option<String>,
    /// The key this one replaced.
    #[serde(default)]
    pub(crate) rotated_from: Option<String>,
    /// When the store keeps it.
    #[serde(default, alias = "last_used")]
    pub(crate) last_used_at: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct GrantRow {
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    collections: Vec<String>,
}

impl Row {
    fn all_scopes(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        for g in &self.grants {
            v.extend(g.scopes.iter().map(String::as_str));
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    fn all_collections(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.resources.iter().map(String::as_str).collect();
        for g in &self.grants {
            v.extend(g.collections.iter().map(String::as_str));
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    fn matches(&self, needle: &str) -> bool {
        if needle.is_empty() {
            return true;
        }
        let needle = needle.to_lowercase();
        let hit = |s: &str| s.to_lowercase().contains(&needle);
        hit(&self.id)
            || hit(&self.name)
            || self.owner.as_deref().is_some_and(hit)
            || self.identity.as_deref().is_some_and(hit)
            || self.roles.iter().any(|r| hit(r))
            || self.all_scopes().into_iter().any(hit)
            || self.all_collections().into_iter().any(hit)
    }
}

/// Reads the `keys` array of a list answer.
pub(crate) fn rows(v: Value) -> Vec<Row> {
    let keys = v.get("keys").cloned().unwrap_or(Value::Null);
    serde_json::from_value(keys).unwrap_or_default()
}

/// `2026-12-04T22:10:31.000Z` as `2026-12-04 22:10`.
pub(crate) fn short_time(t: &str) -> String {
    t.get(..16)
        .map_or_else(|| t.to_owned(), |s| s.replace('T', " "))
}

fn list_text(items: &[&str]) -> String {
    if items.is_empty() {
        return "—".into();
    }
    items
        .iter()
        .map(|s| format!("<code>{}</code>", esc(s)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a key created at `created` is due for rotation at `now`.
fn due(c: &Inner, created: &str, now: SystemTime) -> Option<bool> {
    let age = c.rotate_after?;
    let created = humantime::parse_rfc3339(created).ok()?;
    Some(created + age <= now)
}

/// A path segment that is safe to put back into a URI: a key id's letters and digits.
fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The scopes the create form offers: the known scopes (the API's vocabulary) the caller
/// holds, or without a vocabulary the caller's own scopes. Nothing the caller does not hold.
fn offered_scopes(c: &Inner, signed: &Signed) -> Vec<String> {
    let known = c.shared.vocabulary.scopes();
    if known.is_empty() {
        let mut own: Vec<String> = signed
            .caller
            .grants()
            .into_iter()
            .flat_map(|g| g.scopes)
            .collect();
        own.sort();
        own.dedup();
        return own;
    }
    known
        .iter()
        .filter(|k| Scope::parse(&k.scope).is_ok_and(|s| signed.caller.granted().allows(&s)))
        .map(|k| k.scope.clone())
        .collect()
}

fn names(v: Result<Value, Problem>, field: &str) -> Vec<String> {
    v.ok()
        .and_then(|v| v.get(field).cloned())
        .and_then(|a| a.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|x| x.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

pub(crate) async fn list(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let query = Form::query(&parts);
    let mut notice = String::new();
    if let (Some(done), Some(id)) = (query.get("done"), query.get("id")) {
        let what = match done {
            "revoked" => Some("revoked"),
            "disabled" => Some("disabled"),
            "enabled" => Some("enabled"),
            _ => None,
        };
        if let Some(what) = what.filter(|_| id_ok(id)) {
            notice = format!(
                "<div class=\"notice\" role=\"status\">Key <code>{}</code> {what}.</div>",
                esc(id)
            );
        }
    }
    page(&c, &signed, &query, notice, StatusCode::OK).await
}

async fn page(
    c: &Inner,
    signed: &Signed,
    query: &Form,
    top: String,
    status: StatusCode,
) -> Response {
    let needle = query.get("q").unwrap_or("");
    let wanted = query
        .get("status")
        .filter(|s| matches!(*s, "active" | "disabled" | "revoked"));
    let uri = match wanted {
        Some(s) => format!("/keys?status={s}"),
        None => "/keys".to_owned(),
    };
    let mut body = top;
    let keys = match c.call(signed, Method::GET, &uri, None).await {
        Ok(v) => rows(v),
        Err(p) => {
            body.push_str(&p.html());
            Vec::new()
        }
    };
    let now = c.now();
    let base = esc(&c.base);
    let _ = write!(
        body,
        "<form method=\"get\" action=\"{base}/keys\" role=\"search\">\
         <label for=\"q\">Search</label> <input type=\"search\" id=\"q\" name=\"q\" value=\"{}\"> \
         <label for=\"status\">Status</label> <select id=\"status\" name=\"status\">",
        esc(needle)
    );
    for (value, label) in [
        ("", "any"),
        ("active", "active"),
        ("disabled", "disabled"),
        ("revoked", "revoked"),
    ] {
        let sel = if wanted.unwrap_or("") == value {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option value=\"{value}\"{sel}>{label}</option>");
    }
    body.push_str("</select> <button type=\"submit\">Filter</button></form>");

    let shown: Vec<&Row> = keys.iter().filter(|r| r.matches(needle)).collect();
    let _ = write!(
        body,
        "<table id=\"keys\"><caption>{} of {} keys you may see</caption><thead><tr>\
         <th scope=\"col\">Name</th><th scope=\"col\">Key id</th><th scope=\"col\">Owner / identity</th>\
         <th scope=\"col\">Roles</th><th scope=\"col\">Scopes</th><th scope=\"col\">Collections</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Created</th><th scope=\"col\">Expires</th>\
         <th scope=\"col\">Last used</th><th scope=\"col\">Rotation</th><th scope=\"col\">Actions</th>\
         </tr></thead><tbody>",
        shown.len(),
        keys.len()
    );
    let csrf = csrf_field(&signed.csrf);
    for r in &shown {
        if !id_ok(&r.id) {
            continue;
        }
        let id = esc(&r.id);
        let owner = match (&r.owner, &r.identity) {
            (Some(o), Some(i)) => format!("{} / {}", esc(o), esc(i)),
            (Some(o), None) => esc(o),
            (None, Some(i)) => format!("— / {}", esc(i)),
            (None, None) => "—".into(),
        };
        let roles: Vec<&str> = r.roles.iter().map(String::as_str).collect();
        let rotation = match due(c, &r.created_at, now) {
            Some(true) => "<span class=\"due\">due</span>",
            Some(false) => "not due",
            None => "—",
        };
        let mut actions = String::new();
        if r.status != "revoked" {
            let _ = write!(
                actions,
                "<form class=\"inline\" method=\"post\" action=\"{base}/keys/{id}/rotate\">{csrf}\
                 <label for=\"grace-{id}\">Grace</label> <select id=\"grace-{id}\" name=\"grace\">"
            );
            for (value, label) in GRACE {
                let _ = write!(actions, "<option value=\"{value}\">{label}</option>");
            }
            let _ = write!(
                actions,
                "</select> <button type=\"submit\" id=\"rotate-{id}\">Rotate</button></form> "
            );
            let (verb, label) = if r.status == "disabled" {
                ("enable", "Enable")
            } else {
                ("disable", "Disable")
            };
            let _ = write!(
                actions,
                "<form class=\"inline\" method=\"post\" action=\"{base}/keys/{id}/{verb}\">{csrf}\
                 <button type=\"submit\" id=\"{verb}-{id}\">{label}</button></form> \
                 <a href=\"{base}/keys/{id}/revoke\" id=\"revoke-{id}\">Revoke…</a>"
            );
        }
        let _ = write!(
            body,
            "<tr id=\"row-{id}\"><td>{name}</td><td><code>{id}</code></td><td>{owner}</td><td>{roles}</td>\
             <td>{scopes}</td><td>{collections}</td><td class=\"status-{status}\">{status}</td>\
             <td>{created}</td><td>{expires}</td><td>{last}</td><td>{rotation}</td><td>{actions}</td></tr>",
            name = esc(&r.name),
            roles = list_text(&roles),
            scopes = list_text(&r.all_scopes()),
            collections = list_text(&r.all_collections()),
            status = esc(&r.status),
            created = esc(&short_time(&r.created_at)),
            expires = r
                .expires_at
                .as_deref()
                .map_or_else(|| "never".into(), |t| esc(&short_time(t))),
            last = r
                .last_used_at
                .as_deref()
                .map_or_else(|| "—".into(), |t| esc(&short_time(t))),
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(&create_form(c, signed).await);
    answer(status, html::page(&c.frame("Keys", Some(signed)), &body))
}

async fn create_form(c: &Inner, signed: &Signed) -> String {
    let base = esc(&c.base);
    let mut f = format!(
        "<h2 id=\"create\">Issue a key</h2><form method=\"post\" action=\"{base}/keys\" aria-labelledby=\"create\">{}\
         <p><label for=\"name\">Name</label> <input type=\"text\" id=\"name\" name=\"name\" required maxlength=\"200\"> \
         <label for=\"owner\">Owner</label> <input type=\"text\" id=\"owner\" name=\"owner\" maxlength=\"200\"></p>",
        csrf_field(&signed.csrf)
    );
    let scopes = offered_scopes(c, signed);
    if !scopes.is_empty() {
        f.push_str("<fieldset><legend>Scopes</legend>");
        for (i, s) in scopes.iter().enumerate() {
            let _ = write!(
                f,
                "<label><input type=\"checkbox\" name=\"scope\" value=\"{v}\" id=\"scope-{i}\"> <code>{v}</code></label>",
                v = esc(s)
            );
        }
        f.push_str("</fieldset>");
    }
    let own: Vec<String> = signed
        .caller
        .grants()
        .into_iter()
        .flat_map(|g| g.collections)
        .collect();
    let _ = write!(
        f,
        "<p><label for=\"collections\">Collections (comma-separated; yours: {})</label> \
         <input type=\"text\" id=\"collections\" name=\"collections\" size=\"40\"></p>",
        esc(&own.join(", "))
    );
    let roles = names(c.call(signed, Method::GET, "/roles", None).await, "roles");
    if !roles.is_empty() {
        f.push_str("<fieldset><legend>Roles</legend>");
        for (i, r) in roles.iter().enumerate() {
            let _ = write!(
                f,
                "<label><input type=\"checkbox\" name=\"role\" value=\"{v}\" id=\"role-{i}\"> {v}</label>",
                v = esc(r)
            );
        }
        f.push_str("</fieldset>");
    }
    let identities = names(
        c.call(signed, Method::GET, "/identities", None).await,
        "identities",
    );
    if !identities.is_empty() {
        f.push_str("<p><label for=\"identity\">Identity</label> <select id=\"identity\" name=\"identity\"><option value=\"\">none</option>");
        for i in &identities {
            let _ = write!(f, "<option value=\"{v}\">{v}</option>", v = esc(i));
        }
        f.push_str("</select></p>");
    }
    f.push_str(
        "<p><label for=\"expires_in\">Expires in (e.g. 90d; empty: as your key allows)</label> \
         <input type=\"text\" id=\"expires_in\" name=\"expires_in\" size=\"8\"></p>\
         <p><button type=\"submit\" id=\"create-key\">Issue key</button></p></form>",
    );
    f
}

/// The page showing a new plaintext key, once.
fn secret_page(c: &Inner, signed: &Signed, title: &str, answer: &Value) -> Response {
    let key = answer.get("key").and_then(Value::as_str).unwrap_or("");
    let id = answer.get("id").and_then(Value::as_str).unwrap_or("");
    let mut body = format!(
        "<div class=\"secret\" role=\"status\"><p>Copy this key now. It is shown this once and \
         cannot be shown again.</p><p><code id=\"new-key\">{}</code> \
         <button type=\"button\" data-copy=\"new-key\">Copy</button></p><p>Key id <code id=\"new-key-id\">{}</code></p></div>",
        esc(key),
        esc(id)
    );
    if let Some(warnings) = answer.get("warnings").and_then(Value::as_array) {
        for w in warnings.iter().filter_map(Value::as_str) {
            let _ = write!(body, "<div class=\"notice\">{}</div>", esc(w));
        }
    }
    let _ = write!(
        body,
        "<p><a href=\"{}/keys\">Back to the keys</a></p>",
        esc(&c.base)
    );
    answer_page(c, signed, title, body, StatusCode::CREATED)
}

fn answer_page(
    c: &Inner,
    signed: &Signed,
    title: &str,
    body: String,
    status: StatusCode,
) -> Response {
    answer(status, html::page(&c.frame(title, Some(signed)), &body))
}

fn split_list(text: Option<&str>) -> Vec<String> {
    text.unwrap_or("")
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(crate) async fn create(State(c): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let Some(form) = Form::read(body).await else {
        return forbidden(&c, Some(&signed));
    };
    if !c.csrf_ok(&parts, &form, &signed.csrf) {
        return forbidden(&c, Some(&signed));
    }
    let mut spec = json!({
        "name": form.get("name").unwrap_or(""),
        "scopes": form.all("scope"),
        "collections": split_list(form.get("collections")),
        "roles": form.all("role"),
    });
    let optional = [
        ("owner", "owner"),
        ("identity", "identity"),
        ("expires_in", "expires_in"),
    ];
    for (field, key) in optional {
        if let Some(v) = form.get(field).filter(|v| !v.is_empty()) {
            spec[key] = Value::from(v);
        }
    }
    match c.call(&signed, Method::POST, "/keys", Some(spec)).await {
        Ok(v) => secret_page(&c, &signed, "Key issued", &v),
        Err(p) => {
            let status = p.status;
            page(&c, &signed, &Form(Vec::new()), p.html(), status).await
        }
    }
}

pub(crate) async fn confirm_revoke(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let Some((id, _)) = target(parts.uri.path()) else {
        return answer_page(
            &c,
            &signed,
            "Not found",
            String::new(),
            StatusCode::NOT_FOUND,
        );
    };
    confirm_page(&c, &signed, id, StatusCode::OK).await
}

async fn confirm_page(c: &Inner, signed: &Signed, id: &str, status: StatusCode) -> Response {
    let key = match c
        .call(signed, Method::GET, &format!("/keys/{id}"), None)
        .await
    {
        Ok(v) => v,
        Err(p) => return answer_page(c, signed, "Revoke a key", p.html(), p.status),
    };
    let name = key.get("name").and_then(Value::as_str).unwrap_or("");
    let body = format!(
        "<p>Revoking key <code>{id}</code> (<strong>{name}</strong>) cannot be undone: every \
         request with it is refused from now on.</p>\
         <form method=\"post\" action=\"{base}/keys/{id}/revoke\">{csrf}\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
         <button type=\"submit\" class=\"danger\" id=\"confirm-revoke\">Revoke for good</button> \
         <a href=\"{base}/keys\">Cancel</a></form>",
        id = esc(id),
        name = esc(name),
        base = esc(&c.base),
        csrf = csrf_field(&signed.csrf),
    );
    answer_page(c, signed, "Revoke a key", body, status)
}

/// `/keys/{id}/{action}` → (id, action), for a well-formed id.
fn target(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/keys/")?;
    let (id, action) = rest.split_once('/')?;
    id_ok(id).then_some((id, action))
}

pub(crate) async fn action(State(c): St, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let Some(form) = Form::read(body).await else {
        return forbidden(&c, Some(&signed));
    };
    if !c.csrf_ok(&parts, &form, &signed.csrf) {
        return forbidden(&c, Some(&signed));
    }
    let Some((id, action)) = target(parts.uri.path()) else {
        return answer_page(
            &c,
            &signed,
            "Not found",
            String::new(),
            StatusCode::NOT_FOUND,
        );
    };
    let uri = format!("/keys/{id}/{action}");
    let result = match action {
        "rotate" => {
            let body = match form.get("grace").filter(|g| !g.is_empty()) {
                Some(g) => json!({ "grace": g }),
                None => json!({}),
            };
            match c.call(&signed, Method::POST, &uri, Some(body)).await {
                Ok(v) => return secret_page(&c, &signed, "Key rotated", &v),
                Err(p) => Err(p),
            }
        }
        "revoke" if form.get("confirm") != Some("yes") => {
            return confirm_page(&c, &signed, id, StatusCode::BAD_REQUEST).await;
        }
        "revoke" | "disable" | "enable" => c
            .call(&signed, Method::POST, &uri, None)
            .await
            .map(|_| format!("{action}d")),
        _ => {
            return answer_page(
                &c,
                &signed,
                "Not found",
                String::new(),
                StatusCode::NOT_FOUND,
            )
        }
    };
    match result {
        Ok(done) => redirect(&format!("{}/keys?done={done}&id={}", c.base, q(id))),
        Err(p) => {
            let status = p.status;
            page(&c, &signed, &Form(Vec::new()), p.html(), status).await
        }
    }
}
