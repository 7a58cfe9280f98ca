//! The audit page: the recent events the caller may see, filtered by key, code and time,
//! and the hash chain's verification.

use std::collections::HashSet;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use http::{Method, StatusCode};
use keygate::core::audit::{verify_dir, AuditEvent};
use keygate::core::time::rfc3339_seconds;

use super::html::{self, esc};
use super::keys::rows;
use super::{html as answer, Form, Inner};

type St = State<Arc<Inner>>;

/// The most events one page lists.
const MAX_ROWS: usize = 200;

/// How far back the page looks: `since` as a duration (`1h`, `7d`), default a day.
fn since(text: Option<&str>) -> Duration {
    text.filter(|t| !t.is_empty())
        .and_then(|t| humantime::parse_duration(t).ok())
        .unwrap_or(Duration::from_secs(86_400))
}

/// (kind, code, what) of an event, for the table and the code filter.
fn describe(e: &AuditEvent) -> (&'static str, String, String) {
    match e {
        AuditEvent::Request(r) => (
            "request",
            r.denial.map_or("allowed", |d| d.as_str()).to_owned(),
            format!(
                "{} {} → {}",
                r.method,
                r.path,
                r.status.map_or_else(|| "—".to_owned(), |s| s.to_string())
            ),
        ),
        AuditEvent::Lifecycle(l) => (
            "change",
            l.action.as_str().to_owned(),
            format!("by {} (now {})", l.actor, l.status.as_str()),
        ),
        AuditEvent::Denials(d) => (
            "denials",
            d.denial.map_or("denied", |c| c.as_str()).to_owned(),
            format!("{} × {} {}", d.count, d.method, d.path),
        ),
        AuditEvent::Anomaly(a) => (
            "anomaly",
            a.kind.as_str().to_owned(),
            format!("count {}", a.count),
        ),
    }
}

fn key_name(e: &AuditEvent) -> Option<String> {
    match e {
        AuditEvent::Request(r) => r.key_name.as_deref().map(str::to_owned),
        AuditEvent::Lifecycle(l) => Some(l.key_name.clone()),
        AuditEvent::Anomaly(a) => a.key_name.as_deref().map(str::to_owned),
        AuditEvent::Denials(_) => None,
    }
}

pub(crate) async fn page(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let query = Form::query(&parts);
    let key = query.get("key").unwrap_or("");
    let code = query.get("code").unwrap_or("");
    let since_text = query.get("since").unwrap_or("");
    let live = query.get("live") == Some("1");
    let base = esc(&c.base);
    let mut body = String::new();
    body.push_str(&chain_status(&c).await);
    let _ = write!(
        body,
        "<form method=\"get\" action=\"{base}/audit\"><label for=\"key\">Key id</label> \
         <input type=\"text\" id=\"key\" name=\"key\" value=\"{}\" size=\"14\"> \
         <label for=\"code\">Code or action</label> <input type=\"text\" id=\"code\" name=\"code\" value=\"{}\" size=\"18\"> \
         <label for=\"since\">Since (e.g. 1h, 7d)</label> <input type=\"text\" id=\"since\" name=\"since\" value=\"{}\" size=\"6\"> \
         <label><input type=\"checkbox\" name=\"live\" value=\"1\"{}> update every 5 s</label> \
         <button type=\"submit\">Filter</button></form>",
        esc(key),
        esc(code),
        esc(since_text),
        if live { " checked" } else { "" }
    );
    let Some(recent) = &c.events else {
        body.push_str("<p>No audit events are kept for this console.</p>");
        return answer(StatusCode::OK, html::page(&frame(&c, &signed, live), &body));
    };
    let visible: HashSet<String> = match c.call(&signed, Method::GET, "/keys", None).await {
        Ok(v) => rows(v).into_iter().map(|r| r.id).collect(),
        Err(p) => {
            body.push_str(&p.html());
            HashSet::new()
        }
    };
    let anonymous = c.sees_anonymous(&signed);
    let from = c
        .now()
        .checked_sub(since(Some(since_text)))
        .unwrap_or(std::time::UNIX_EPOCH);
    let _ = write!(
        body,
        "<table id=\"events\"><caption>Newest first, at most {MAX_ROWS}</caption><thead><tr>\
         <th scope=\"col\">Time</th><th scope=\"col\">Kind</th><th scope=\"col\">Key</th>\
         <th scope=\"col\">Code</th><th scope=\"col\">What</th><th scope=\"col\">Client</th></tr></thead><tbody>"
    );
    let mut shown = 0;
    for e in recent.events().iter().rev() {
        if shown >= MAX_ROWS {
            break;
        }
        if e.time() < from {
            continue;
        }
        let id = e.key_id().map(|k| k.to_string());
        let may = match &id {
            Some(id) => visible.contains(id),
            None => anonymous,
        };
        if !may || (!key.is_empty() && id.as_deref() != Some(key)) {
            continue;
        }
        let (kind, what_code, what) = describe(e);
        if !code.is_empty() && what_code != code {
            continue;
        }
        let client = match e {
            AuditEvent::Request(r) => r.client_ip,
            AuditEvent::Denials(d) => d.client_ip,
            AuditEvent::Anomaly(a) => a.client_ip,
            AuditEvent::Lifecycle(_) => None,
        };
        let keycell = match (&id, key_name(e)) {
            (Some(id), Some(n)) => format!("{} (<code>{}</code>)", esc(&n), esc(id)),
            (Some(id), None) => format!("<code>{}</code>", esc(id)),
            (None, _) => "—".into(),
        };
        let class = if what_code == "allowed" {
            ""
        } else {
            " class=\"due\""
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{kind}</td><td>{keycell}</td><td{class}><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            esc(&rfc3339_seconds(e.time()).to_string()),
            esc(&what_code),
            esc(&what),
            client.map_or_else(|| "—".to_owned(), |ip| ip.to_string()),
        );
        shown += 1;
    }
    body.push_str("</tbody></table>");
    answer(StatusCode::OK, html::page(&frame(&c, &signed, live), &body))
}

/// The frame; with `live`, a meta refresh (no script) reloads the page with the same
/// filters every 5 seconds.
fn frame<'a>(c: &'a Inner, signed: &'a super::Signed, live: bool) -> html::Frame<'a> {
    let mut f = c.frame("Audit", Some(signed));
    f.refresh = live.then_some(5);
    f
}

/// The chain's verification, run off the async workers.
async fn chain_status(c: &Inner) -> String {
    let Some(chain) = c.chain.clone() else {
        return "<p id=\"chain\">Chain verification: no hash-chained log is configured for this console.</p>".into();
    };
    let result = tokio_blocking(move || verify_dir(&chain.dir, &chain.stem, &chain.options)).await;
    match result {
        Some(Ok(r)) => format!(
            "<p id=\"chain\" class=\"notice\" role=\"status\">Chain verified: {} line{} in {} file{}, unbroken.</p>",
            r.lines,
            if r.lines == 1 { "" } else { "s" },
            r.files,
            if r.files == 1 { "" } else { "s" },
        ),
        Some(Err(b)) => format!(
            "<p id=\"chain\" class=\"error\" role=\"alert\">Chain BROKEN at line {} of {}: {}</p>",
            b.line,
            esc(&b.file.display().to_string()),
            esc(&b.problem.to_string())
        ),
        None => "<p id=\"chain\" class=\"error\" role=\"alert\">Chain verification could not run.</p>".into(),
    }
}

async fn tokio_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}
