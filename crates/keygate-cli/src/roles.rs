//! `keygate roles ...` and `keygate identities ...`: through a `KeyManager` (validated,
//! audited), like key changes.

use std::time::SystemTime;

use keygate_core::{validate_name, Grant, Identity, KeyHasher, KeyStore, Role, RoleUpdate};
use serde_json::{json, Value};

use crate::cli::{Cli, IdentityArgs, RoleArgs};
use crate::db::{self, Access, Managed};
use crate::keys::{failure, store_failure};
use crate::output::{self, list, print, print_json};
use crate::Failure;

fn name(what: &'static str, text: &str) -> Result<(), Failure> {
    validate_name(what, text).map_err(|e| Failure::Usage(e.to_string()))
}

/// The role's grants: one from `--scope` × `--collection`, then the `--grant` ones (none
/// given: `None`).
fn grants(args: &RoleArgs) -> Result<Option<Vec<Grant>>, Failure> {
    let extra = crate::parse::grants(&args.grants);
    if args.scopes.is_empty() {
        if !args.collections.is_empty() {
            return Err(Failure::Usage(
                "--collection needs at least one --scope to apply to".into(),
            ));
        }
        return Ok((!extra.is_empty()).then_some(extra));
    }
    let mut all = vec![Grant::new(args.scopes.clone(), args.collections.clone())];
    all.extend(extra);
    Ok(Some(all))
}

fn role_json(role: &Role, holders: Option<&[String]>) -> Value {
    let mut v = serde_json::to_value(role).unwrap_or(Value::Null);
    if let (Value::Object(m), Some(h)) = (&mut v, holders) {
        m.insert("keys".into(), json!(h));
    }
    v
}

/// A role as `field  value` lines; with `holders`, the keys holding it too.
fn role_details(role: &Role, holders: Option<&[String]>) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("name", role.name.clone()),
        ("grants", list(role.grants.iter().map(output::grant))),
        (
            "attributes",
            list(role.attributes.iter().map(|(k, v)| format!("{k}={v}"))),
        ),
        (
            "rate limits",
            list(role.rate_limits.iter().map(output::rate)),
        ),
        ("quotas", list(role.quotas.iter().map(output::quota))),
        (
            "mints up to",
            role.mint_max_lifetime_secs.map_or_else(
                || "-".into(),
                |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
            ),
        ),
        ("created", output::time(role.created_at)),
        ("updated", output::time(role.updated_at)),
        ("version", role.version.to_string()),
    ];
    if let Some(h) = holders {
        rows.push(("keys", list(h.iter().cloned())));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<11}  {v}\n"));
    }
    out
}

/// `roles create`.
pub(crate) async fn create(cli: &Cli, args: &RoleArgs) -> Result<(), Failure> {
    name("role", &args.name)?;
    let mut role = Role::new(args.name.clone(), SystemTime::now());
    role.grants = grants(args)?.unwrap_or_default();
    role.mint_max_lifetime_secs = args.mint_max_lifetime.map(|d| d.as_secs());
    role.attributes = args.attributes.iter().cloned().collect();
    role.rate_limits = args.rates.clone();
    role.quotas = args.quotas.clone();
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Create).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .create_role(&actor, role)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    let role = done?;
    if cli.json {
        print_json(&role_json(&role, None))?;
    } else {
        print(&role_details(&role, None))?;
    }
    audited
}

/// `roles list`.
pub(crate) async fn list_roles(cli: &Cli) -> Result<(), Failure> {
    let store = db::open(cli, Access::Read).await?;
    let roles = store.list_roles().await.map_err(store_failure)?;
    if cli.json {
        return print_json(&Value::Array(
            roles.iter().map(|r| role_json(r, None)).collect(),
        ));
    }
    let rows: Vec<Vec<String>> = roles
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                list(r.grants.iter().map(output::grant)),
                list(r.rate_limits.iter().map(output::rate)),
                list(r.quotas.iter().map(output::quota)),
            ]
        })
        .collect();
    print(&output::table(&["NAME", "GRANTS", "RATE", "QUOTA"], &rows))
}

/// `roles show`.
pub(crate) async fn show(cli: &Cli, role_name: &str) -> Result<(), Failure> {
    name("role", role_name)?;
    let store = db::open(cli, Access::Read).await?;
    let role = store
        .roles(&[role_name.to_owned()])
        .await
        .map_err(store_failure)?
        .into_iter()
        .find(|r| r.name == role_name)
        .ok_or_else(|| Failure::Failed(format!("no role named {role_name:?}")))?;
    let holders: Vec<String> = store
        .keys_with_role(role_name)
        .await
        .map_err(store_failure)?
        .iter()
        .map(ToString::to_string)
        .collect();
    if cli.json {
        print_json(&role_json(&role, Some(&holders)))
    } else {
        print(&role_details(&role, Some(&holders)))
    }
}

/// `roles update`.
pub(crate) async fn update(cli: &Cli, args: &RoleArgs) -> Result<(), Failure> {
    name("role", &args.name)?;
    let update = RoleUpdate {
        grants: grants(args)?,
        attributes: (!args.attributes.is_empty())
            .then(|| args.attributes.iter().cloned().collect()),
        rate_limits: (!args.rates.is_empty()).then(|| args.rates.clone()),
        quotas: (!args.quotas.is_empty()).then(|| args.quotas.clone()),
        mint_max_lifetime_secs: match (args.mint_max_lifetime, args.no_mint) {
            (Some(d), _) => Some(Some(d.as_secs())),
            (None, true) => Some(None),
            (None, false) => None,
        },
    };
    if update == RoleUpdate::default() {
        return Err(Failure::Usage(
            "nothing to change: give at least one option (see --help)".into(),
        ));
    }
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .update_role(&actor, &args.name, update)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    let role = done?;
    if cli.json {
        print_json(&role_json(&role, None))?;
    } else {
        print(&role_details(&role, None))?;
    }
    audited
}

/// `roles delete`.
pub(crate) async fn delete(cli: &Cli, role_name: &str) -> Result<(), Failure> {
    name("role", role_name)?;
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .delete_role(&actor, role_name)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    if !done? {
        return Err(Failure::Failed(format!("no role named {role_name:?}")));
    }
    if cli.json {
        print_json(&json!({ "name": role_name, "deleted": true }))?;
    } else {
        print(&format!("role {role_name} deleted\n"))?;
    }
    audited
}

fn identity_details(identity: &Identity, keys: &[String]) -> String {
    let rows: Vec<(&str, String)> = vec![
        ("name", identity.name.clone()),
        (
            "rate limits",
            list(identity.rate_limits.iter().map(output::rate)),
        ),
        ("quotas", list(identity.quotas.iter().map(output::quota))),
        (
            "metadata",
            if identity.metadata.is_null() {
                "-".into()
            } else {
                identity.metadata.to_string()
            },
        ),
        ("created", output::time(identity.created_at)),
        ("keys", list(keys.iter().cloned())),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<11}  {v}\n"));
    }
    out
}

/// `identities create`.
pub(crate) async fn create_identity(cli: &Cli, args: &IdentityArgs) -> Result<(), Failure> {
    name("identity", &args.name)?;
    let mut identity = Identity::new(args.name.clone(), SystemTime::now());
    identity.rate_limits = args.rates.clone();
    identity.quotas = args.quotas.clone();
    identity.metadata = args.meta.clone().unwrap_or(Value::Null);
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Create).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .create_identity(&actor, identity)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    let identity = done?;
    if cli.json {
        print_json(&serde_json::to_value(&identity).unwrap_or(Value::Null))?;
    } else {
        print(&identity_details(&identity, &[]))?;
    }
    audited
}

/// `identities update`.
pub(crate) async fn update_identity(
    cli: &Cli,
    args: &crate::cli::IdentityUpdateArgs,
) -> Result<(), Failure> {
    name("identity", &args.name)?;
    let update = keygate_core::IdentityUpdate {
        metadata: args.meta.clone(),
        rate_limits: (args.clear_rates || !args.rates.is_empty()).then(|| args.rates.clone()),
        quotas: (args.clear_quotas || !args.quotas.is_empty()).then(|| args.quotas.clone()),
    };
    if update == keygate_core::IdentityUpdate::default() {
        return Err(Failure::Usage(
            "nothing to change: give at least one option (see --help)".into(),
        ));
    }
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .update_identity(&actor, &args.name, update)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    let identity = done?;
    let keys: Vec<String> = keys_of(&store, &args.name)
        .await?
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    if cli.json {
        print_json(&serde_json::to_value(&identity).unwrap_or(Value::Null))?;
    } else {
        print(&identity_details(&identity, &keys))?;
    }
    audited
}

/// `identities delete`.
pub(crate) async fn delete_identity(cli: &Cli, identity_name: &str) -> Result<(), Failure> {
    name("identity", identity_name)?;
    let actor = db::actor(cli);
    let store = db::open(cli, Access::Write).await?;
    let managed = Managed::new(cli, &store, KeyHasher::new())?;
    let done = managed
        .keys
        .delete_identity(&actor, identity_name)
        .await
        .map_err(failure);
    let audited = managed.finish().await;
    if !done? {
        return Err(Failure::Failed(format!(
            "no identity named {identity_name:?}"
        )));
    }
    if cli.json {
        print_json(&json!({ "name": identity_name, "deleted": true }))?;
    } else {
        print(&format!(
            "identity {identity_name} deleted
"
        ))?;
    }
    audited
}

/// `identities list`.
pub(crate) async fn list_identities(cli: &Cli) -> Result<(), Failure> {
    let store = db::open(cli, Access::Read).await?;
    let all = store.list_identities().await.map_err(store_failure)?;
    if cli.json {
        return print_json(&serde_json::to_value(&all).unwrap_or(Value::Null));
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                list(i.rate_limits.iter().map(output::rate)),
                list(i.quotas.iter().map(output::quota)),
            ]
        })
        .collect();
    print(&output::table(&["NAME", "RATE", "QUOTA"], &rows))
}

/// The ids of the keys owned by identity `name`.
pub(crate) async fn keys_of(
    store: &keygate_sql::SqlStore,
    name: &str,
) -> Result<Vec<keygate_core::KeyRecord>, Failure> {
    let all = store
        .list(&keygate_core::KeyFilter::default())
        .await
        .map_err(store_failure)?;
    Ok(all
        .into_iter()
        .filter(|r| r.identity.as_deref() == Some(name))
        .collect())
}

/// `identities show`.
pub(crate) async fn show_identity(cli: &Cli, identity_name: &str) -> Result<(), Failure> {
    name("identity", identity_name)?;
    let store = db::open(cli, Access::Read).await?;
    let identity = store
        .get_identity(identity_name)
        .await
        .map_err(store_failure)?
        .ok_or_else(|| Failure::Failed(format!("no identity named {identity_name:?}")))?;
    let keys: Vec<String> = keys_of(&store, identity_name)
        .await?
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    if cli.json {
        let mut v = serde_json::to_value(&identity).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("keys".into(), json!(keys));
        }
        print_json(&v)
    } else {
        print(&identity_details(&identity, &keys))
    }
}
