//! `keygate usage [ID]`: each quota's use in its current window, from the SQL usage store.

use std::time::SystemTime;

use keygate_core::usage::{UsageStore, Window};
use keygate_core::{KeyFilter, KeyRecord, KeyStatus, KeyStore};
use keygate_sql::{window_kind, SqlStore};
use serde_json::{json, Value};

use crate::cli::{Cli, UsageArgs};
use crate::db;
use crate::output::{self, print, print_json};
use crate::Failure;

/// One quota of one key, now.
struct Line {
    name: String,
    window: Window,
    limit: u64,
    used: u64,
    requests: u64,
}

async fn lines(
    store: &SqlStore,
    record: &KeyRecord,
    now: SystemTime,
) -> Result<Vec<Line>, Failure> {
    // Counted per lineage: a rotated key's usage is its chain's.
    quota_lines(store, &record.lineage_id(), &record.quotas, now).await
}

/// Where each of `quotas`, counted under `id`, stands now.
async fn quota_lines(
    store: &SqlStore,
    id: &keygate_core::KeyId,
    quotas: &[keygate_core::QuotaPolicy],
    now: SystemTime,
) -> Result<Vec<Line>, Failure> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    let windows: Vec<Window> = quotas
        .iter()
        .map(|q| Window::containing(q.window, now))
        .collect();
    let used = store
        .usage_store()
        .load(id, &windows)
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    Ok(quotas
        .iter()
        .zip(windows)
        .zip(used)
        .map(|((q, w), u)| Line {
            name: q.name.clone(),
            window: w,
            limit: q.limit,
            used: u.cost,
            requests: u.requests,
        })
        .collect())
}

fn key_object(record: &KeyRecord, lines: &[Line]) -> Value {
    json!({
        "id": record.id,
        "name": record.name,
        "owner": record.owner,
        "status": record.status,
        "quotas": quota_objects(lines),
    })
}

fn quota_objects(lines: &[Line]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "window": l.window.kind,
                "window_kind": window_kind(l.window.kind),
                "window_start": output::time(l.window.start),
                "window_end": l.window.end.map(output::time),
                "limit": l.limit,
                "used": l.used,
                "remaining": l.limit.saturating_sub(l.used),
                "requests": l.requests,
            })
        })
        .collect()
}

fn rows(record: &KeyRecord, lines: &[Line], now: SystemTime) -> Vec<Vec<String>> {
    rows_of(&record.id.to_string(), &record.name, lines, now)
}

fn rows_of(id: &str, name: &str, lines: &[Line], now: SystemTime) -> Vec<Vec<String>> {
    lines
        .iter()
        .map(|l| {
            vec![
                id.to_owned(),
                name.to_owned(),
                l.name.clone(),
                output::window(l.window.kind),
                l.limit.to_string(),
                l.used.to_string(),
                l.limit.saturating_sub(l.used).to_string(),
                l.requests.to_string(),
                output::until(l.window.end, now),
            ]
        })
        .collect()
}

const HEADER: [&str; 9] = [
    "ID",
    "NAME",
    "QUOTA",
    "WINDOW",
    "LIMIT",
    "USED",
    "REMAINING",
    "REQUESTS",
    "RESETS IN",
];

/// `keygate usage [ID]`.
pub(crate) async fn usage(cli: &Cli, args: &UsageArgs) -> Result<(), Failure> {
    let store = db::open(cli, db::Access::Read).await?;
    let now = SystemTime::now();
    if let Some(identity) = &args.identity {
        return by_identity(cli, &store, identity, now).await;
    }
    if let Some(id) = args.id {
        let record = store
            .get(&id)
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?
            .ok_or_else(|| Failure::Failed(format!("no key with id {id}")))?;
        let lines = lines(&store, &record, now).await?;
        if cli.json {
            return print_json(&key_object(&record, &lines));
        }
        if lines.is_empty() {
            return print(&format!("key {id} ({}) has no quotas\n", record.name));
        }
        return print(&output::table(&HEADER, &rows(&record, &lines, now)));
    }
    // Every key with a quota that can still be used.
    let records = store
        .list(&KeyFilter::default())
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    let mut objects = Vec::new();
    let mut table = Vec::new();
    for record in records
        .iter()
        .filter(|r| !r.quotas.is_empty() && r.status != KeyStatus::Revoked)
    {
        let lines = lines(&store, record, now).await?;
        objects.push(key_object(record, &lines));
        table.extend(rows(record, &lines, now));
    }
    if cli.json {
        print_json(&Value::Array(objects))
    } else if table.is_empty() {
        print("no key has a quota\n")
    } else {
        print(&output::table(&HEADER, &table))
    }
}

/// `keygate usage --identity NAME`: the identity's own quotas (one count shared by all its
/// keys, stored under `Identity::usage_id`), every key of the identity with its quotas,
/// and the keys' total per quota name and window (what it is billed for).
async fn by_identity(
    cli: &Cli,
    store: &SqlStore,
    identity: &str,
    now: SystemTime,
) -> Result<(), Failure> {
    keygate_core::validate_name("identity", identity)
        .map_err(|e| Failure::Usage(format!("invalid --identity: {e}")))?;
    let Some(stored) = store
        .get_identity(identity)
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?
    else {
        return Err(Failure::Failed(format!("no identity named {identity:?}")));
    };
    let usage_id = keygate_core::Identity::usage_id(identity);
    let shared = quota_lines(store, &usage_id, &stored.quotas, now).await?;
    let records = crate::roles::keys_of(store, identity).await?;
    let mut objects = Vec::new();
    let mut table = rows_of("identity", identity, &shared, now);
    // (quota name, window kind) -> (used, requests), in first-seen order.
    let mut totals: Vec<((String, String), u64, u64)> = Vec::new();
    for record in &records {
        let lines = lines(store, record, now).await?;
        for l in &lines {
            let k = (l.name.clone(), output::window(l.window.kind));
            match totals.iter_mut().find(|(t, _, _)| *t == k) {
                Some(t) => {
                    t.1 += l.used;
                    t.2 += l.requests;
                }
                None => totals.push((k, l.used, l.requests)),
            }
        }
        objects.push(key_object(record, &lines));
        table.extend(rows(record, &lines, now));
    }
    if cli.json {
        return print_json(&json!({
            "identity": identity,
            "usage_id": usage_id,
            "shared": quota_objects(&shared),
            "keys": objects,
            "totals": totals.iter().map(|((name, window), used, requests)| json!({
                "name": name,
                "window": window,
                "used": used,
                "requests": requests,
            })).collect::<Vec<_>>(),
        }));
    }
    for ((name, window), used, requests) in &totals {
        table.push(vec![
            "total".into(),
            identity.to_owned(),
            name.clone(),
            window.clone(),
            "-".into(),
            used.to_string(),
            "-".into(),
            requests.to_string(),
            "-".into(),
        ]);
    }
    if table.is_empty() {
        print(&format!(
            "identity {identity} has no quota and no key with a quota\n"
        ))
    } else {
        print(&output::table(&HEADER, &table))
    }
}
