//! The admin API's JSON inputs, paths and queries, in-process through its router.

use std::cell::RefCell;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Body;
use axum::Router;
use http::{Method, Request};
use http_body_util::BodyExt;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::{KeyGate, KeyManager, KeySpec, ManualClock, MemoryStore, Verifier};
use keygate_admin::AdminApi;
use tower::ServiceExt;

#[derive(Debug, Arbitrary)]
enum Call {
    Issue(Vec<u8>),
    List(String),
    Get(Target),
    Rotate(Target, Vec<u8>),
    Revoke(Target),
    Disable(Target),
    Enable(Target),
    Usage(Target, String),
    Raw(u8, String, Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Target {
    /// The key issued by an earlier call (or the admin's own when none).
    Issued(u8),
    Admin,
    Text(String),
}

#[derive(Debug, Arbitrary)]
struct AdminInput {
    calls: Vec<Call>,
    /// Whether the caller is a narrow admin (`keys:admin` and `points:*` on `docs`).
    narrow: bool,
}

/// The admin API and its key store, built once per thread and reused across inputs (the
/// inputs stay independent: the world is rebuilt when an input may have changed the admin
/// keys themselves, and every [`REBUILD_EVERY`] inputs so the store stays small).
struct World {
    app: Router,
    sink: MemorySink,
    /// The broad admin key (`*` on `*`) and the narrow one (`keys:admin` and `points:*` on
    /// `docs`): (secret, id).
    broad: (String, String),
    narrow: (String, String),
    /// Every key issued in this world, so none may appear in a later answer either.
    secrets: Vec<String>,
    inputs: usize,
}

/// Inputs run in one world before it is rebuilt.
const REBUILD_EVERY: usize = 512;

async fn world() -> World {
    let clock = ManualClock::at_2026();
    let gate = KeyGate::new(
        Verifier::builder(MemoryStore::new())
            .clock(clock.clone())
            .build(),
    );
    let sink = MemorySink::new();
    let keys = KeyManager::for_verifier(gate.verifier(), Auditor::direct(sink.clone()));
    let mut admins = Vec::new();
    for spec in [
        KeySpec::new("admin").scope("*").resource("*"),
        KeySpec::new("admin")
            .scope("keys:admin")
            .scope("points:*")
            .resource("docs"),
    ] {
        let admin = keys.issue("setup", spec).await.expect("issue an admin key");
        admins.push((
            admin.key.expose_secret().to_owned(),
            admin.key.id().to_string(),
        ));
    }
    let app: Router = Router::new().nest(
        "/admin",
        AdminApi::new(keys)
            .gate(&gate)
            .usage_store(Arc::new(MemoryUsageStore::new()))
            .router(),
    );
    let narrow = admins.pop().expect("two admin keys");
    let broad = admins.pop().expect("two admin keys");
    World {
        app,
        sink,
        secrets: vec![broad.0.clone(), narrow.0.clone()],
        broad,
        narrow,
        inputs: 0,
    }
}

/// Up to four calls; every answer is a documented status, never 5xx (the store and audit
/// log are in memory and up), carries no key but the one it issues, and no audit event
/// carries a key.
pub fn admin(data: &[u8]) {
    let Ok(input) = AdminInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    thread_local! {
        static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
    }
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let stale = slot.as_ref().is_none_or(|w| w.inputs >= REBUILD_EVERY);
        if stale {
            *slot = Some(crate::block_on(world()));
        }
        let w = slot.as_mut().expect("a world");
        w.inputs += 1;
        let touched_admins = crate::block_on(run(w, input));
        if touched_admins {
            *slot = None;
        }
    });
}

/// Runs the calls; true when one of them named an admin key (it may have revoked,
/// disabled or rotated it, so the next input needs a fresh world).
async fn run(w: &mut World, input: AdminInput) -> bool {
    let (admin_secret, admin_id) = if input.narrow {
        w.narrow.clone()
    } else {
        w.broad.clone()
    };
    let app = w.app.clone();
    let events_before = w.sink.len();
    let mut touched = false;
    let secrets = &mut w.secrets;
    let mut issued: Vec<String> = Vec::new();
    for call in input.calls.into_iter().take(4) {
        let id = |t: &Target| -> String {
            match t {
                Target::Issued(i) if !issued.is_empty() => {
                    issued[usize::from(*i) % issued.len()].clone()
                }
                Target::Issued(_) | Target::Admin => admin_id.clone(),
                Target::Text(s) => s.clone(),
            }
        };
        let (method, path, body) = match &call {
            Call::Issue(b) => (Method::POST, "/admin/keys".to_owned(), b.clone()),
            Call::List(q) => (Method::GET, format!("/admin/keys?{q}"), Vec::new()),
            Call::Get(t) => (Method::GET, format!("/admin/keys/{}", id(t)), Vec::new()),
            Call::Rotate(t, b) => (
                Method::POST,
                format!("/admin/keys/{}/rotate", id(t)),
                b.clone(),
            ),
            Call::Revoke(t) => (
                Method::POST,
                format!("/admin/keys/{}/revoke", id(t)),
                Vec::new(),
            ),
            Call::Disable(t) => (
                Method::POST,
                format!("/admin/keys/{}/disable", id(t)),
                Vec::new(),
            ),
            Call::Enable(t) => (
                Method::POST,
                format!("/admin/keys/{}/enable", id(t)),
                Vec::new(),
            ),
            Call::Usage(t, q) => (
                Method::GET,
                format!("/admin/keys/{}/usage?{q}", id(t)),
                Vec::new(),
            ),
            Call::Raw(m, p, b) => (
                if m % 2 == 0 {
                    Method::GET
                } else {
                    Method::POST
                },
                format!("/admin/{p}"),
                b.clone(),
            ),
        };
        // GETs change nothing; any other call naming an admin key may have changed it.
        touched |=
            method != Method::GET && (path.contains(&w.broad.1) || path.contains(&w.narrow.1));
        let Ok(req) = Request::builder()
            .method(method)
            .uri(&path)
            .header("authorization", format!("Bearer {admin_secret}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
        else {
            continue;
        };
        let res = app.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .expect("an in-memory body")
            .to_bytes();
        assert!(
            !status.is_server_error(),
            "{status} for {call:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let text = String::from_utf8_lossy(&bytes);
        for s in secrets.iter() {
            assert!(
                !text.contains(s.as_str()),
                "a key's secret in an answer to {call:?}"
            );
        }
        if status.as_u16() == 201 {
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("201 is JSON");
            let key = v["key"]
                .as_str()
                .expect("201 carries the new key")
                .to_owned();
            let id = v["id"].as_str().expect("201 names the key").to_owned();
            assert!(key.contains(&id));
            secrets.push(key);
            issued.push(id);
        }
    }
    for event in w.sink.events().iter().skip(events_before) {
        let text = serde_json::to_string(&event).expect("events serialize");
        for s in w.secrets.iter() {
            assert!(
                !text.contains(s.as_str()),
                "a key's secret in an audit event"
            );
        }
    }
    touched
}
