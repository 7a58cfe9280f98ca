//! HTML text: escaping and the page frame.

use std::fmt::Write;

/// Escapes text for HTML element content and double-quoted attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one query-string value.
pub(crate) fn q(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// What the frame around a page shows.
pub(crate) struct Frame<'a> {
    /// The console's mount path (`/console`).
    pub base: &'a str,
    /// The page title.
    pub title: &'a str,
    /// The signed-in caller's key id and the session's CSRF token, when signed in.
    pub session: Option<(&'a str, &'a str)>,
    /// Reload the page every this many seconds.
    pub refresh: Option<u32>,
}

/// The whole page: head, navigation (when signed in), `body` in `<main>`.
pub(crate) fn page(frame: &Frame<'_>, body: &str) -> String {
    let base = esc(frame.base);
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         {refresh}<title>{title} · keygate console</title>\
         <link rel=\"stylesheet\" href=\"{base}/static/console.css\">\
         <script src=\"{base}/static/console.js\" defer></script></head><body>\
         <header><span class=\"brand\">keygate console</span>",
        title = esc(frame.title),
        refresh = frame
            .refresh
            .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
            .unwrap_or_default(),
    );
    if let Some((who, csrf)) = frame.session {
        let _ = write!(
            out,
            "<nav aria-label=\"Main\"><a href=\"{base}/keys\">Keys</a><a href=\"{base}/usage\">Usage</a>\
             <a href=\"{base}/audit\">Audit</a></nav>\
             <span>Signed in with key <code>{who}</code></span>\
             <form class=\"inline\" method=\"post\" action=\"{base}/logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\">Sign out</button></form>",
            who = esc(who),
            csrf = esc(csrf),
        );
    }
    let _ = writeln!(
        out,
        "</header><main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        esc(frame.title)
    );
    out
}

/// A hidden CSRF field.
pub(crate) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(q("a b&c=d"), "a+b%26c%3Dd");
    }
}
