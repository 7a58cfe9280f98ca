//! The usage page (charts per key or identity over hours, days or months; denials by code;
//! the top keys by spend) and its CSV export.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{HeaderValue, CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{Method, StatusCode};
use keygate::core::audit::AuditEvent;
use keygate::core::time::rfc3339_seconds;
use keygate::core::usage::Window;
use keygate::QuotaWindow;
use serde::Deserialize;
use serde_json::Value;

use super::chart::{self, Series};
use super::html::{self, esc, q};
use super::keys::{rows, Row};
use super::{html as answer, secure_headers, Form, Inner, Problem, Signed};

type St = State<Arc<Inner>>;

/// The most keys whose usage one page reads.
const MAX_KEYS: usize = 500;
/// Keys drawn on their own in the chart; the rest are summed as "others".
const CHART_KEYS: usize = 6;

/// The period a page shows: its window kind, how far back, and how buckets are labelled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    Hour,
    Day,
    Month,
}

impl Period {
    pub(crate) fn parse(text: Option<&str>) -> Period {
        match text {
            Some("hour") => Period::Hour,
            Some("month") => Period::Month,
            _ => Period::Day,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    pub(crate) fn window(self) -> QuotaWindow {
        match self {
            Period::Hour => QuotaWindow::Hour,
            Period::Day => QuotaWindow::Day,
            Period::Month => QuotaWindow::Month,
        }
    }

    /// How far back the page looks: 48 hours, 31 days, 12 months.
    pub(crate) fn span(self) -> Duration {
        match self {
            Period::Hour => Duration::from_secs(48 * 3600),
            Period::Day => Duration::from_secs(31 * 86_400),
            Period::Month => Duration::from_secs(366 * 86_400),
        }
    }

    /// A bucket's label from its start.
    pub(crate) fn label(self, start: SystemTime) -> String {
        let text = rfc3339_seconds(start).to_string();
        let cut = match self {
            Period::Hour => 16,
            Period::Day => 10,
            Period::Month => 7,
        };
        text.get(..cut).unwrap_or(&text).replace('T', " ")
    }

    /// The starts of every bucket from `from` to `now`, oldest first.
    pub(crate) fn buckets(self, from: SystemTime, now: SystemTime) -> Vec<SystemTime> {
        let mut out = Vec::new();
        let mut w = Window::containing(self.window(), from);
        while w.start <= now && out.len() < 1000 {
            out.push(w.start);
            match w.end {
                Some(end) => w = Window::containing(self.window(), end),
                None => break,
            }
        }
        out
    }
}

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    windows: Vec<WindowRow>,
}

#[derive(Deserialize)]
struct WindowRow {
    window: Value,
    start: String,
    #[serde(default)]
    end: Option<String>,
    cost: u64,
    requests: u64,
}

/// One key's windows of the period's kind.
struct KeyUsage<'a> {
    row: &'a Row,
    windows: Vec<(SystemTime, WindowRow)>,
}

impl KeyUsage<'_> {
    fn cost(&self) -> u64 {
        self.windows.iter().map(|(_, w)| w.cost).sum()
    }
}

/// What the query selects.
struct Selection {
    period: Period,
    key: Option<String>,
    identity: Option<String>,
}

impl Selection {
    fn of(query: &Form) -> Selection {
        Selection {
            period: Period::parse(query.get("period")),
            key: query
                .get("key")
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
            identity: query
                .get("identity")
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
        }
    }

    fn picks(&self, r: &Row) -> bool {
        self.key.as_deref().is_none_or(|k| k == r.id)
            && self
                .identity
                .as_deref()
                .is_none_or(|i| r.identity.as_deref() == Some(i))
    }

    fn query(&self) -> String {
        let mut s = format!("period={}", self.period.as_str());
        if let Some(k) = &self.key {
            let _ = write!(s, "&key={}", q(k));
        }
        if let Some(i) = &self.identity {
            let _ = write!(s, "&identity={}", q(i));
        }
        s
    }
}

/// The visible keys, the selected ones' usage (each rotation lineage once: a key replaced
/// by another visible key is left out, as its successor reports the same counts), or the
/// admin API's problem.
async fn read<'a>(
    c: &Inner,
    signed: &Signed,
    all: &'a [Row],
    sel: &Selection,
    from: SystemTime,
    now: SystemTime,
) -> Result<Vec<KeyUsage<'a>>, Problem> {
    let replaced: HashSet<&str> = all
        .iter()
        .filter_map(|r| r.rotated_from.as_deref())
        .collect();
    let range = format!(
        "from={}&to={}",
        q(&rfc3339_seconds(from).to_string()),
        q(&rfc3339_seconds(now + Duration::from_secs(1)).to_string())
    );
    let mut out = Vec::new();
    for row in all
        .iter()
        .filter(|r| sel.picks(r) && !replaced.contains(r.id.as_str()))
        .take(MAX_KEYS)
    {
        let v = c
            .call(
                signed,
                Method::GET,
                &format!("/keys/{}/usage?{range}", row.id),
                None,
            )
            .await?;
        let report: Report = serde_json::from_value(v).unwrap_or(Report {
            windows: Vec::new(),
        });
        let windows = report
            .windows
            .into_iter()
            .filter(|w| w.window.as_str() == Some(sel.period.as_str()))
            .filter_map(|w| Some((humantime::parse_rfc3339(&w.start).ok()?, w)))
            .collect();
        out.push(KeyUsage { row, windows });
    }
    Ok(out)
}

pub(crate) async fn page(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let query = Form::query(&parts);
    let sel = Selection::of(&query);
    let now = c.now();
    let from = now - sel.period.span();
    let base = esc(&c.base);
    let mut body = String::new();
    let all = match c.call(&signed, Method::GET, "/keys", None).await {
        Ok(v) => rows(v),
        Err(p) => {
            body.push_str(&p.html());
            Vec::new()
        }
    };
    // The selection form: period, key, identity (only what the caller may see).
    let _ = write!(
        body,
        "<form method=\"get\" action=\"{base}/usage\"><label for=\"period\">Period</label> \
         <select id=\"period\" name=\"period\">"
    );
    for p in [Period::Hour, Period::Day, Period::Month] {
        let sel_attr = if p == sel.period { " selected" } else { "" };
        let _ = write!(
            body,
            "<option value=\"{v}\"{sel_attr}>per {v}</option>",
            v = p.as_str()
        );
    }
    body.push_str("</select> <label for=\"key\">Key</label> <select id=\"key\" name=\"key\"><option value=\"\">all keys</option>");
    for r in &all {
        let s = if sel.key.as_deref() == Some(r.id.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            body,
            "<option value=\"{id}\"{s}>{name} ({id})</option>",
            id = esc(&r.id),
            name = esc(&r.name)
        );
    }
    body.push_str("</select> <label for=\"identity\">Identity</label> <select id=\"identity\" name=\"identity\"><option value=\"\">any</option>");
    let mut identities: Vec<&str> = all.iter().filter_map(|r| r.identity.as_deref()).collect();
    identities.sort_unstable();
    identities.dedup();
    for i in identities {
        let s = if sel.identity.as_deref() == Some(i) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option value=\"{v}\"{s}>{v}</option>", v = esc(i));
    }
    let _ = write!(
        body,
        "</select> <button type=\"submit\">Show</button> \
         <a href=\"{base}/usage.csv?{}\" id=\"csv\">Export CSV</a></form>",
        esc(&sel.query())
    );

    let buckets = sel.period.buckets(from, now);
    let labels: Vec<String> = buckets.iter().map(|b| sel.period.label(*b)).collect();
    match read(&c, &signed, &all, &sel, from, now).await {
        Ok(mut usage) => {
            usage.sort_by(|a, b| b.cost().cmp(&a.cost()).then(a.row.id.cmp(&b.row.id)));
            // Requests per bucket, the busiest keys on their own.
            let mut series: Vec<Series> = Vec::new();
            let mut others = vec![0u64; buckets.len()];
            for (n, u) in usage.iter().enumerate() {
                let mut values = vec![0u64; buckets.len()];
                for (start, w) in &u.windows {
                    if let Some(i) = buckets.iter().position(|b| b == start) {
                        values[i] += w.requests;
                    }
                }
                if n < CHART_KEYS {
                    series.push(Series {
                        label: format!("{} ({})", u.row.name, u.row.id),
                        values,
                    });
                } else {
                    for (o, v) in others.iter_mut().zip(values) {
                        *o += v;
                    }
                }
            }
            if others.iter().any(|v| *v > 0) {
                series.push(Series {
                    label: "others".into(),
                    values: others,
                });
            }
            series.retain(|s| s.values.iter().any(|v| *v > 0));
            body.push_str(&chart::stacked(
                "requests",
                &format!("Requests per {}, by key", sel.period.as_str()),
                &labels,
                &series,
            ));
            // The top keys by spend.
            let _ = write!(
                body,
                "<h2>Top keys by spend</h2><table id=\"top\"><caption>Quota units used since {}</caption>\
                 <thead><tr><th scope=\"col\">Key</th><th scope=\"col\">Identity</th><th scope=\"col\">Requests</th>\
                 <th scope=\"col\">Spend</th></tr></thead><tbody>",
                esc(&sel.period.label(from))
            );
            for u in usage.iter().filter(|u| u.cost() > 0).take(20) {
                let requests: u64 = u.windows.iter().map(|(_, w)| w.requests).sum();
                let _ = write!(
                    body,
                    "<tr><td>{} (<code>{}</code>)</td><td>{}</td><td>{requests}</td><td>{}</td></tr>",
                    esc(&u.row.name),
                    esc(&u.row.id),
                    esc(u.row.identity.as_deref().unwrap_or("—")),
                    u.cost()
                );
            }
            body.push_str("</tbody></table>");
        }
        Err(p) => body.push_str(&p.html()),
    }
    // Requests by outcome, denials by code, from the recent audit events.
    body.push_str(&outcomes(&c, &signed, &all, &sel, &buckets, &labels));
    answer(
        StatusCode::OK,
        html::page(&c.frame("Usage", Some(&signed)), &body),
    )
}

/// The stacked chart of allowed requests and denials by code, per bucket.
fn outcomes(
    c: &Inner,
    signed: &Signed,
    all: &[Row],
    sel: &Selection,
    buckets: &[SystemTime],
    labels: &[String],
) -> String {
    let Some(recent) = &c.events else {
        return "<p>Denials by code need the audit events: none are kept for this console.</p>"
            .into();
    };
    let visible: HashSet<&str> = all
        .iter()
        .filter(|r| sel.picks(r))
        .map(|r| r.id.as_str())
        .collect();
    let anonymous = sel.key.is_none() && sel.identity.is_none() && c.sees_anonymous(signed);
    let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in recent.events() {
        let (code, count) = match &e {
            AuditEvent::Request(r) => (r.denial.map_or("allowed", |d| d.as_str()).to_owned(), 1),
            AuditEvent::Denials(d) => (
                d.denial.map_or("denied", |d| d.as_str()).to_owned(),
                d.count,
            ),
            _ => continue,
        };
        let shown = match e.key_id() {
            Some(id) => visible.contains(id.as_str()),
            None => anonymous,
        };
        if !shown {
            continue;
        }
        let start = Window::containing(sel.period.window(), e.time()).start;
        if let Some(i) = buckets.iter().position(|b| *b == start) {
            by.entry(code).or_insert_with(|| vec![0; buckets.len()])[i] += count;
        }
    }
    let mut series: Vec<Series> = Vec::new();
    if let Some(v) = by.remove("allowed") {
        series.push(Series {
            label: "allowed".into(),
            values: v,
        });
    }
    series.extend(
        by.into_iter()
            .map(|(label, values)| Series { label, values }),
    );
    chart::stacked(
        "outcomes",
        &format!(
            "Requests per {} by outcome, denials by code (recent audit events)",
            sel.period.as_str()
        ),
        labels,
        &series,
    )
}

/// A CSV field: quoted when needed, and a leading `=`, `+`, `-` or `@` defused so a
/// spreadsheet does not read it as a formula.
fn csv(field: &str) -> String {
    let field = if field.starts_with(['=', '+', '-', '@']) {
        format!("'{field}")
    } else {
        field.to_owned()
    };
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field
    }
}

pub(crate) async fn export(State(c): St, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let signed = match c.signed(&parts).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let sel = Selection::of(&Form::query(&parts));
    let now = c.now();
    let from = now - sel.period.span();
    let all = match c.call(&signed, Method::GET, "/keys", None).await {
        Ok(v) => rows(v),
        Err(p) => return error_page(&c, &signed, &p),
    };
    let usage = match read(&c, &signed, &all, &sel, from, now).await {
        Ok(u) => u,
        Err(p) => return error_page(&c, &signed, &p),
    };
    let mut out = String::from("key_id,name,owner,identity,window,start,end,requests,cost\n");
    for u in &usage {
        for (_, w) in &u.windows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{}",
                csv(&u.row.id),
                csv(&u.row.name),
                csv(u.row.owner.as_deref().unwrap_or("")),
                csv(u.row.identity.as_deref().unwrap_or("")),
                sel.period.as_str(),
                csv(&w.start),
                csv(w.end.as_deref().unwrap_or("")),
                w.requests,
                w.cost
            );
        }
    }
    let mut res = Response::new(Body::from(out));
    let h = res.headers_mut();
    secure_headers(h);
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"keygate-usage-{}.csv\"",
        sel.period.as_str()
    )) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    res
}

fn error_page(c: &Inner, signed: &Signed, p: &Problem) -> Response {
    answer(
        p.status,
        html::page(&c.frame("Usage", Some(signed)), &p.html()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv("plain"), "plain");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv("-1,2"), "\"'-1,2\"");
    }

    #[test]
    fn buckets_cover_the_span_in_calendar_windows() {
        let now = humantime::parse_rfc3339("2026-03-15T10:30:00Z").unwrap();
        let days = Period::Day.buckets(now - Period::Day.span(), now);
        assert_eq!(days.len(), 32);
        assert_eq!(Period::Day.label(days[31]), "2026-03-15");
        let months = Period::Month.buckets(now - Period::Month.span(), now);
        assert_eq!(Period::Month.label(months[0]), "2025-03");
        assert_eq!(Period::Month.label(*months.last().unwrap()), "2026-03");
        let hours = Period::Hour.buckets(now - Period::Hour.span(), now);
        assert_eq!(hours.len(), 49);
        assert_eq!(Period::Hour.label(hours[48]), "2026-03-15 10:00");
    }
}
