//! `keygate keys ...`: every change goes through a `KeyManager` (validated, audited).

use std::sync::Arc;
use std::time::SystemTime;

use keygate_core::audit::{Auditor, MemorySink};
use keygate_core::{
    IssuedKey, KeyFilter, KeyHasher, KeyId, KeyManager, KeyRecord, KeySpec, KeyStatus, KeyStore,
    KeyUpdate, LifecycleError, MemoryStore, ScopeVocabulary, StatusWrite, StoreError,
};
use serde_json::Value;

use crate::cli::{Cli, CreateArgs, ListArgs, RotateArgs, UpdateArgs};
use crate::db::{self, Access, Managed};
use crate::output::{self, key_json, print, print_json};
use crate::rotation::{self, AgeFilter};
use crate::Failure;

/// The warning printed (on stderr) with every new plaintext key.
pub(crate) const SHOWN_ONCE: &str =
    "this is the only time the key is shown: store it now, it cannot be recovered";

/// The option (or variable) a key manager's field name stands for, so messages name what
/// the user typed.
fn flag(field: &str) -> &str {
    match field {
        "name" => "--name",
        "owner" => "--owner",
        "scopes" => "--scope",
        "resources" => "--collection",
        "attributes" => "--attr",
        "allowed_ips" => "--allow-ip",
        "rate_limits" => "--rate",
        "quotas" => "--quota",
        "expires" => "--expires-in",
        "metadata" => "--meta",
        "prefix" => "--prefix",
        "actor" => "--actor (KEYGATE_ACTOR)",
        "grace" => "--grace",
        "roles" => "--role",
        "identity" => "--identity",
        "grants" => "--grant",
        other => other,
    }
}

/// A lifecycle error as a failure: bad input is a usage error (2) naming the option, the
/// rest failures (1).
pub(crate) fn failure(e: LifecycleError) -> Failure {
    match e {
        LifecycleError::Invalid(spec) => {
            Failure::Usage(format!("invalid {}: {}", flag(spec.field), spec.reason))
        }
        other => Failure::Failed(other.to_string()),
    }
}

/// Checks the key's scopes against the vocabulary the server registered in the database:
/// an unknown scope is a usage error (with the closest known one) unless
/// `--allow-unknown-scope`. Returns the warnings to print once the key is made: scopes not
/// checked (no vocabulary), unknown scopes granted on purpose, a key that can use no route.
fn check_scopes(vocabulary: &ScopeVocabulary, args: &CreateArgs) -> Result<Vec<String>, Failure> {
    let mut warnings = Vec::new();
    if vocabulary.is_empty() {
        if !args.scopes.is_empty() {
            warnings.push(
                "no scope vocabulary is registered in this database (a server registers its \
                 routes' scopes when it starts): the scopes were not checked"
                    .to_owned(),
            );
        }
        return Ok(warnings);
    }
    for scope in args.scopes.iter().chain(args.grants.iter().map(|(s, _)| s)) {
        if let Err(e) = vocabulary.check(scope) {
            if !args.allow_unknown_scope {
                return Err(Failure::Usage(format!(
                    "{e}; pass --allow-unknown-scope to grant it anyway"
                )));
            }
            warnings.push(format!("granting on purpose: {e}"));
        }
    }
    // A key with roles may reach routes through them: only a key on its own is judged.
    let reach = if args.roles.is_empty() && args.grants.is_empty() {
        vocabulary.reach_warning(&args.scopes, &args.collections)
    } else {
        None
    };
    if let Some(w) = reach {
        warnings.push(if args.collections.is_empty() {
            format!("{w} (add --collection)")
        } else {
            w
        });
    }
    Ok(warnings)
}

pub(crate) fn store_failure(e: StoreError) -> Failure {
    Failure::Failed(e.to_string())
}

fn spec(args: &CreateArgs) -> KeySpec {
    let mut spec = KeySpec::new(args.name.clone());
    spec.owner = args.owner.clone();
    spec.scopes = args.scopes.clone();
    spec.resources = args.collections.clone();
    spec.attributes = args.attributes.iter().cloned().collect();
    spec.allowed_ips = args.allow_ips.clone();
    spec.rate_limits = args.rates.clone();
    spec.quotas = args.quotas.clone();
    spec.expires = args.expires_in.map(keygate_core::Expiry::In);
    spec.prefix = args.prefix.clone();
    spec.metadata = args.meta.clone().unwrap_or(Value::Null);
    spec.roles = args.roles.clone();
    spec.identity = args.identity.clone();
    spec.grants = crate::parse::grants(&args.grants);
    spec
}

/// Checks `spec` with the key manager's own rules, against a throwaway in-memory store,
/// before the database is opened (or created): bad input changes nothing.
async fn validate(actor: &str, spec: &KeySpec, hasher: &KeyHasher) -> Result<(), Failure> {
    let dry = KeyManager::builder(Arc::new(MemoryStore::new()))
        .hasher(hasher.clone())
        .auditor(Auditor::direct(MemorySink::new()))
        .build();
    // Roles and identities are checked against the database by the real issue (before it
    // writes anything); here only their names.
    let mut spec = spec.clone();
    for r in std::mem::take(&mut spec.roles) {
        keygate_core::validate_name("role", &r)
            .map_err(|e| Failure::Usage(format!("invalid --role: {e}")))?;
    }
    if let Some(i) = spec.identity.take() {
        keygate_core::validate_name("identity", &i)
            .map_err(|e| Failure::Usage(format!("invalid --identity: {e}")))?;
    }
    dry.issue(actor, spec).await.map(|_| ()).map_err(failure)
}

/// Prints a new key: its record and the plaintext (once), with the warning on stderr.
fn print_issued(
    cli: &Cli,
    issued: &IssuedKey,
    previous: Option<&KeyRecord>,
    now: SystemTime,
) -> Result<(), Failure> {
    crate::warning(SHOWN_ONCE);
    if cli.json {
        let mut v = key_json(&issued.record, now);
        if let Value::Object(m) = &mut v {
            m.insert(
                "key".into(),
                Value::String(issued.key.expose_secret().to_owned()),
            );
            if let Some(old) = previous {
                m.insert("previous".into(), key_json(old, now));
            }
        }
        print_json(&v)
    } else {
        let mut text = output::key_details(&issued.record, now);
        if let Some(old) = previous {
            text.push_str(&format!(
                "\nthe old key {} works until {}\n",
                old.id,
                old.expires_at.map_or_else(|| "-".into(), output::time)
            ));
        }
        text.push_str(&format!("\nkey: {}\n", issued.key.expose_secret()));
        print(&text)
    }
}

/// `keys create`.
pub(crate) async fn create(cli: &Cli, args: &CreateArgs) -> Result<(), Failure> {
    if args.as_key {
        return crate::remote::create(cli, args).await;
    }
    let actor = db::actor(cli);
    let spec = spec(args);
    let hasher = db::hasher()?;
    validate(&actor, &spec, &hasher).await?;
    let store = db::open(cli, Access::Create).await?;
    db::check_pepper(&store, &hasher).await?;
    let vocabulary = store.scope_vocabulary().await.map_err(store_failure)?;
    let warnings = check_scopes(&vocabulary, args)?;
    let managed = Managed::new(cli, &store, hasher)?;
    let issued = managed.keys.issue(&actor, spec).await.map_err(failure);
    // The events of whatever was done are written before anything is printed.
    let audited = managed.finish().await;
    let issued = issued?;
    for w in &warnings {
        crate::warning(w);
    }
    let now = SystemTime::now();
    print_issued(cli, &issued, None, now)?;
    audited
}

/// `keys list`.
pub(crate) async fn list(cli: &Cli, args: &ListArgs) -> Result<(), Failure> {
    let store = db::open(cli, Access::Read).await?;
    let filter = KeyFilter {
        owner: args.owner.clone(),
        status: args.status.map(Into::into),
        prefix: args.prefix.clone(),
    };
    let listing = store.list_report(&filter).await.map_err(store_failure)?;
    // A row that cannot be read is left out, said on stderr, and does not fail the
    // listing (exit 0): the other keys are still listed, and the id is there to act on.
    for row in &listing.skipped {
        crate::warning(&format!(
            "skipped key {}: column {} cannot be read ({}); repair the row, or revoke the key with `keygate keys revoke {}`",
            row.id, row.column, row.reason, row.id
        ));
    }
    let now = SystemTime::now();
    let age = AgeFilter {
        expiring_within: args.expiring_within,
        older_than: args.older_than,
    };
    let records: Vec<KeyRecord> = listing
        .records
        .into_iter()
        .filter(|r| age.matches(r, now))
        .collect();
    if cli.json {
        return print_json(&Value::Array(
            records.iter().map(|r| key_json(r, now)).collect(),
        ));
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.owner.clone().unwrap_or_else(|| "-".into()),
                output::status(r, now),
                output::time(r.created_at),
                r.expires_at.map_or_else(|| "never".into(), output::time),
                r.last_used_at.map_or_else(|| "never".into(), output::time),
            ]
        })
        .collect();
    print(&output::table(
        &[
            "ID",
            "NAME",
            "OWNER",
            "STATUS",
            "CREATED",
            "EXPIRES",
            "LAST USED",
        ],
        &rows,
    ))
}

async fn get(store: &keygate_sql::SqlStore, id: KeyId) -> Result<KeyRecord, Failure> {
    match store.get(&id).await.map_err(store_failure)? {
        Some(r) => Ok(r),
        None => Err(Failure::Failed(format!("no key with id {id}"))),
    }
}

/// `keys show`.
pub(crate) async fn show(cli: &Cli, id: KeyId) -> Result<(), Failure> {
    let store = db::open(cli, Access::Read).await?;
    let record = get(&store, id).await?;
    let now = SystemTime::now();
    if cli.json {
        print_json(&key_json(&record, now))
    } else {
        print(&output::key_details(&record, now))
    }
}

/// `keys rotate`: one key (`ID`), or every key due (`--older-than`).
pub(crate) async fn rotate(cli: &Cli, args: &RotateArgs) -> Result<(), Failure> {
    let id = match (args.id, args.older_than) {
        (Some(id), None) => id,
        (None, Some(age)) => {
            return rotation::rotate_due(cli, age, args.grace, args.dry_run).await;
        }
        // The command line allows exactly one of the two.
        _ => {
            return Err(Failure::Usage(
                "give either a key ID or --older-than (see --help)".into(),
            ))
        }
    };
    let actor = db::actor(cli);
    let hasher = db::hasher()?;
    let store = db::open(cli, Access::Write).await?;
    db::check_pepper(&store, &hasher).await?;
    let managed = Managed::new(cli, &store, hasher)?;
    let issued = managed
        .keys
        .rotate(&actor, id, args.grace)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    let issued = issued?;
    let previous = get(&store, id).await.ok();
    print_issued(cli, &issued, previous.as_ref(), SystemTime::now())?;
    audited
}

/// A status change.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StatusChange {
    Revoke,
    Disable,
    Enable,
}

/// `keys revoke`, `keys disable`, `keys enable`.
pub(crate) async fn set_status(cli: &Cli, id: KeyId, change: StatusChange) -> Result<(), Failure> {
    let actor = db::actor(cli);
    // A status change hashes nothing: the pepper is neither needed nor checked.
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let before = managed.keys.show(id).await;
    if let (
        Err(LifecycleError::Store(StoreError::Corrupt(why))),
        StatusChange::Revoke | StatusChange::Disable,
    ) = (&before, change)
    {
        // The record cannot be read: write the status alone (still audited).
        let why = why.clone();
        let to = match change {
            StatusChange::Revoke => KeyStatus::Revoked,
            _ => KeyStatus::Disabled,
        };
        let done = managed
            .keys
            .set_status_only(&actor, id, to)
            .await
            .map_err(failure);
        let audited = managed.finish().await;
        let written = done?;
        crate::warning(&format!(
            "the record of key {id} cannot be read ({why}); only its status was written"
        ));
        let unchanged = written != StatusWrite::Written;
        if cli.json {
            print_json(&serde_json::json!({
                "id": id,
                "status": to,
                "unchanged": unchanged,
                "unreadable": why,
            }))?;
        } else {
            print(&format!(
                "key {id} is {to}{}\n",
                if unchanged { " (unchanged)" } else { "" }
            ))?;
        }
        return audited;
    }
    let before = before.map_err(failure);
    let done = match &before {
        Ok(_) => match change {
            StatusChange::Revoke => managed.keys.revoke(&actor, id).await,
            StatusChange::Disable => managed.keys.disable(&actor, id).await,
            StatusChange::Enable => managed.keys.enable(&actor, id).await,
        }
        .map_err(failure),
        Err(_) => Err(Failure::Failed(format!("no key with id {id}"))),
    };
    let audited = managed.finish().await;
    let (before, record) = (before?, done?);
    let unchanged = before.status == record.status;
    let now = SystemTime::now();
    if cli.json {
        print_json(&key_json(&record, now))?;
    } else {
        print(&format!(
            "key {} ({}) is {}{}\n",
            record.id,
            record.name,
            record.status,
            if unchanged { " (unchanged)" } else { "" }
        ))?;
    }
    audited
}

/// `keys update`.
pub(crate) async fn update(cli: &Cli, args: &UpdateArgs) -> Result<(), Failure> {
    let actor = db::actor(cli);
    let mut u = KeyUpdate::new();
    u.name = args.name.clone();
    u.owner = args.owner.clone().map(Some);
    if !args.scopes.is_empty() || args.no_scopes {
        u.scopes = Some(args.scopes.clone());
    }
    if !args.collections.is_empty() || args.no_collections {
        u.resources = Some(args.collections.clone());
    }
    if !args.grants.is_empty() || args.no_grants {
        u.grants = Some(crate::parse::grants(&args.grants));
    }
    if !args.attributes.is_empty() {
        u.attributes = Some(args.attributes.iter().cloned().collect());
    }
    if !args.allow_ips.is_empty() || args.any_ip {
        u.allowed_ips = Some(args.allow_ips.clone());
    }
    if !args.rates.is_empty() {
        u.rate_limits = Some(args.rates.clone());
    }
    if !args.quotas.is_empty() {
        u.quotas = Some(args.quotas.clone());
    }
    u.add_roles = args.roles.clone();
    u.remove_roles = args.remove_roles.clone();
    if let Some(i) = &args.identity {
        u.identity = Some(Some(i.clone()));
    } else if args.no_identity {
        u.identity = Some(None);
    }
    if let Some(d) = args.expires_in {
        u.expires = Some(Some(keygate_core::Expiry::In(d)));
    } else if args.no_expiry {
        u.expires = Some(None);
    }
    u.metadata = args.meta.clone();
    if u == KeyUpdate::new() {
        return Err(Failure::Usage(
            "nothing to change: give at least one option (see --help)".into(),
        ));
    }
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .update(&actor, args.id, u)
        .await
        .map_err(|e| match e {
            LifecycleError::NotFound(id) => Failure::Failed(format!("no key with id {id}")),
            other => failure(other),
        });
    let audited = managed.finish().await;
    let record = done?;
    let now = SystemTime::now();
    if cli.json {
        print_json(&key_json(&record, now))?;
    } else {
        print(&output::key_details(&record, now))?;
    }
    audited
}
