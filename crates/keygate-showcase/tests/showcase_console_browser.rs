//! The key console end to end, in a real headless Chromium driven over WebDriver, against
//! the showcase on a loopback port: sign in with the admin key, issue a key and see its
//! plaintext once, use it, rotate it (the old key stops), revoke the new one after the
//! confirmation page and watch its next API request fail, see the requests in the usage
//! chart and the denial in the audit view, sign out. Screenshots of each page are saved
//! under the test's target directory.
//!
//! Needs chromedriver: `KEYGATE_TEST_CHROMEDRIVER=http://127.0.0.1:9515` (and
//! `KEYGATE_TEST_CHROMIUM`, the browser binary, default `/usr/bin/chromium`);
//! `.ci/browser.sh` installs Debian's `chromium` and `chromium-driver`, starts the driver
//! and runs this test. Without the variable the test says it skipped.

mod showcase_support;

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use keygate::core::audit::{Auditor, FileSink, MemorySink, TeeSink, VerifyOptions};
use keygate_admin::console::{ChainCheck, RecentEvents};
use serde_json::json;
use showcase_support::World;

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = screenshots().join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
}

async fn browser(driver: &str, profile: &std::path::Path) -> Client {
    let binary =
        std::env::var("KEYGATE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": binary,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("a WebDriver session (is chromedriver running?)")
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

async fn fill(c: &Client, css: &str, value: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(value)
        .await
        .expect("type");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

/// Waits (at most 10 s, polling) until the page's path and query are `want`.
async fn at(c: &Client, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = path(c).await;
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still at {now}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 10 s) for an element to appear, after a navigation.
async fn wait_for(c: &Client, css: &str) {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never appeared: {e}"));
}

async fn path(c: &Client) -> String {
    let url = c.current_url().await.expect("url");
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

#[tokio::test]
async fn sign_in_issue_rotate_revoke_and_see_usage_and_audit_in_chromium() {
    let Ok(driver) = std::env::var("KEYGATE_TEST_CHROMEDRIVER") else {
        println!("SKIPPED: KEYGATE_TEST_CHROMEDRIVER is not set (run .ci/browser.sh)");
        return;
    };
    // Events into memory (the test's), the console's buffer and a hash-chained log, whose
    // chain the audit page verifies.
    let log_dir = tempfile::tempdir().expect("audit directory");
    let file = FileSink::builder(log_dir.path()).open().expect("audit log");
    let recent = RecentEvents::new(10_000);
    let sink = MemorySink::new();
    let auditor = Auditor::direct(TeeSink::new(
        sink.clone(),
        TeeSink::new(recent.clone(), file),
    ));
    let w = World::with_auditor(auditor, sink, |mut o| {
        o.console_events = Some(recent.clone());
        o.console_chain = Some(ChainCheck::new(
            log_dir.path(),
            "audit",
            VerifyOptions::default(),
        ));
        o
    })
    .await;
    w.collection("docs").await;
    let base = format!("http://{}", w.addr);
    let profile = tempfile::tempdir().expect("profile directory");
    let c = browser(&driver, profile.path()).await;

    // Signing in: the console sends to the form; the key goes in a password field.
    c.goto(&format!("{base}/console")).await.expect("goto");
    at(&c, "/console/login").await;
    shot(&c, "01-sign-in").await;
    fill(&c, "#key", &w.admin).await;
    click(&c, "form button[type=submit]").await;
    at(&c, "/console/keys").await;
    assert!(!c.source().await.unwrap().contains(&w.admin));
    let cookies = c.get_all_cookies().await.expect("cookies");
    let session = cookies
        .iter()
        .find(|k| k.name() == "kg_console")
        .expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_ne!(session.value(), w.admin);
    shot(&c, "02-keys").await;

    // Issue a key: its plaintext shown once.
    fill(&c, "#name", "browser-key").await;
    click(&c, "input[name=scope][value='collections:read']").await;
    fill(&c, "#collections", "docs").await;
    click(&c, "#create-key").await;
    wait_for(&c, "#new-key").await;
    let first = text_of(&c, "#new-key").await;
    let first_id = text_of(&c, "#new-key-id").await;
    assert!(first.contains(&first_id), "{first} / {first_id}");
    assert_eq!(c.source().await.unwrap().matches(&first).count(), 1);
    shot(&c, "03-key-issued").await;
    let r = w.call("GET", "/collections/docs", Some(&first), None).await;
    assert_eq!(r.status, StatusCode::OK, "the new key works: {}", r.text);

    // Back on the list: the key is there, its plaintext is not.
    c.goto(&format!("{base}/console/keys?q=browser-key"))
        .await
        .expect("goto");
    let page = c.source().await.unwrap();
    assert!(page.contains(&format!("row-{first_id}")) && !page.contains(&first));

    // Rotate without grace: a new plaintext, the old key stops at once.
    click(&c, &format!("#rotate-{first_id}")).await;
    wait_for(&c, "#new-key").await;
    let second = text_of(&c, "#new-key").await;
    let second_id = text_of(&c, "#new-key-id").await;
    assert_ne!(second, first);
    shot(&c, "04-key-rotated").await;
    let r = w.call("GET", "/collections/docs", Some(&first), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the replaced key");
    let r = w
        .call("GET", "/collections/docs", Some(&second), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "the new key: {}", r.text);

    // Revoke, after the confirmation page; its next request is refused.
    c.goto(&format!("{base}/console/keys")).await.expect("goto");
    click(&c, &format!("#revoke-{second_id}")).await;
    at(&c, &format!("/console/keys/{second_id}/revoke")).await;
    shot(&c, "05-confirm-revoke").await;
    click(&c, "#confirm-revoke").await;
    at(&c, &format!("/console/keys?done=revoked&id={second_id}")).await;
    assert!(text_of(&c, &format!("#row-{second_id} td.status-revoked"))
        .await
        .contains("revoked"));
    let r = w
        .call("GET", "/collections/docs", Some(&second), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the revoked key");
    assert_eq!(r.code(), "invalid_key");

    // Usage: the requests just made are in the chart.
    c.goto(&format!("{base}/console/usage?period=day"))
        .await
        .expect("goto");
    let bars = c
        .find_all(Locator::Css("#requests rect.bar"))
        .await
        .expect("bars");
    assert!(!bars.is_empty(), "a bar for today's requests");
    let outcomes = c
        .find_all(Locator::Css(
            "#outcomes rect.bar[data-series='revoked_key']",
        ))
        .await
        .expect("bars");
    assert_eq!(outcomes.len(), 1, "the denial, stacked by code");
    shot(&c, "06-usage").await;

    // Audit: the log made durable (its checkpoint written), the chain verifies; the denial
    // of the revoked key is listed.
    w.auditor.flush().await.expect("flush the audit log");
    c.goto(&format!("{base}/console/audit?code=revoked_key"))
        .await
        .expect("goto");
    // (A request event names no key the verifier did not accept: the revoked key's denial
    // is recorded with its exact code and path, and shown to a `*` admin.)
    let events = text_of(&c, "#events").await;
    assert!(
        events.contains("revoked_key") && events.contains("GET /collections/docs → 401"),
        "{events}"
    );
    let chain = text_of(&c, "#chain").await;
    assert!(chain.starts_with("Chain verified:"), "{chain}");
    shot(&c, "07-audit").await;
    // The revocation itself, by key.
    c.goto(&format!(
        "{base}/console/audit?key={second_id}&code=revoked"
    ))
    .await
    .expect("goto");
    let events = text_of(&c, "#events").await;
    assert!(
        events.contains(&second_id) && events.contains("change"),
        "{events}"
    );

    // Sign out: the session is gone.
    click(&c, "header form button[type=submit]").await;
    at(&c, "/console/login").await;
    c.goto(&format!("{base}/console/keys")).await.expect("goto");
    at(&c, "/console/login").await;
    c.close().await.expect("close the browser");
}
