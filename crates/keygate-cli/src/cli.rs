//! The command line: every command, option and environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use keygate_core::{KeyId, KeyStatus, Prefix, QuotaPolicy, RateLimitPolicy};

use crate::parse;

/// Manage keygate API keys, read quota usage, verify and read audit logs.
///
/// Exit codes: 0 success, 1 failure (unknown key, database unreachable, broken audit log),
/// 2 usage (a bad option or value; nothing was changed).
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    /// The key database: sqlite://PATH (created by `keys create` if missing) or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE. A password given here is visible to
    /// every user (ps): prefer KEYGATE_DATABASE_URL or --database-url-file.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_DATABASE_URL",
        default_value = "sqlite://keygate.db",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) database_url: String,

    /// Read the database URL from this file (it must not be readable by every user), so the
    /// password is neither on the command line nor in the environment.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_DATABASE_URL_FILE",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub(crate) database_url_file: Option<PathBuf>,

    /// PostgreSQL only: keep keygate's tables in this schema (created if missing).
    #[arg(
        long,
        global = true,
        env = "KEYGATE_DATABASE_SCHEMA",
        hide_env_values = true,
        value_name = "NAME"
    )]
    pub(crate) schema: Option<String>,

    /// Who makes the changes, as recorded in the audit log (default: cli:$USER).
    #[arg(
        long,
        global = true,
        env = "KEYGATE_ACTOR",
        hide_env_values = true,
        value_name = "NAME"
    )]
    pub(crate) actor: Option<String>,

    /// Also append the audit events of key changes to the hash-chained log in this
    /// directory (they always go to the database's keygate_audit table). Default: the
    /// directory of a sqlite:// database when a log named by --audit-stem is already there
    /// (as the showcase server keeps it), else none. The chain key comes from
    /// KEYGATE_AUDIT_KEY or KEYGATE_AUDIT_KEY_FILE, else DIR/STEM.key (created if missing).
    #[arg(
        long,
        global = true,
        env = "KEYGATE_AUDIT_DIR",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub(crate) audit_dir: Option<PathBuf>,

    /// The file-name stem of that log (STEM-000001.jsonl, STEM.checkpoint).
    #[arg(
        long,
        global = true,
        env = "KEYGATE_AUDIT_STEM",
        default_value = "keygate-audit",
        value_name = "STEM"
    )]
    pub(crate) audit_stem: String,

    /// Print JSON (documented in the README) instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

// One value per process, parsed once at start: boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, list, show, rotate, revoke, disable and enable keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create, list, show, update and delete roles: named grants, attributes and limits
    /// that keys hold by name.
    #[command(subcommand)]
    Roles(RolesCommand),
    /// Create, list and show identities: service principals owning several keys (usage
    /// adds them up: `usage --identity`).
    #[command(subcommand)]
    Identities(IdentitiesCommand),
    /// Quota usage in the current windows, per key (or per identity).
    Usage(UsageArgs),
    /// Verify hash-chained audit logs, read them, read the database's audit table.
    #[command(subcommand)]
    Audit(AuditCommand),
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key and print it (once: it cannot be shown again).
    Create(CreateArgs),
    /// List keys, oldest first.
    List(ListArgs),
    /// Show one key.
    Show(IdArg),
    /// Replace a key by a new one; the old key keeps working for the grace period. With
    /// --older-than instead of an ID, rotate every active key of that age or older and print
    /// one JSON line per new key.
    Rotate(RotateArgs),
    /// Revoke a key: it stops working at once, for good.
    Revoke(IdArg),
    /// Disable a key (it can be enabled again).
    Disable(IdArg),
    /// Enable a disabled key.
    Enable(IdArg),
    /// Change a live key's policy: each option given replaces that field (--role adds a
    /// role, --remove-role removes one). The change holds on the next request everywhere.
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// The key's id.
    #[arg(value_name = "ID", value_parser = key_id)]
    pub(crate) id: KeyId,
    /// A new name.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// A new owner.
    #[arg(long, value_name = "S")]
    pub(crate) owner: Option<String>,
    /// Replace the scopes (repeatable).
    #[arg(long = "scope", value_name = "S", value_parser = parse::scope)]
    pub(crate) scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long, conflicts_with = "scopes")]
    pub(crate) no_scopes: bool,
    /// Replace the collections (repeatable).
    #[arg(long = "collection", value_name = "C", value_parser = parse::collection)]
    pub(crate) collections: Vec<String>,
    /// Remove every collection.
    #[arg(long, conflicts_with = "collections")]
    pub(crate) no_collections: bool,
    /// Replace the per-collection grants: one scope on one collection pattern, like
    /// points:write:docs-* (repeatable; scopes on the same pattern make one grant).
    #[arg(long = "grant", value_name = "SCOPE:COLLECTION-PATTERN", value_parser = parse::grant)]
    pub(crate) grants: Vec<(String, String)>,
    /// Remove every per-collection grant.
    #[arg(long, conflicts_with = "grants")]
    pub(crate) no_grants: bool,
    /// Replace the attributes (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse::attribute)]
    pub(crate) attributes: Vec<(String, String)>,
    /// Replace the allowed networks (repeatable).
    #[arg(long = "allow-ip", value_name = "CIDR", value_parser = parse::cidr)]
    pub(crate) allow_ips: Vec<IpNet>,
    /// Allow any address again.
    #[arg(long, conflicts_with = "allow_ips")]
    pub(crate) any_ip: bool,
    /// Replace the rate limits (repeatable).
    #[arg(long = "rate", value_name = "NAME=N/UNIT", value_parser = parse::rate)]
    pub(crate) rates: Vec<RateLimitPolicy>,
    /// Replace the quotas (repeatable).
    #[arg(long = "quota", value_name = "NAME=N/UNIT", value_parser = parse::quota)]
    pub(crate) quotas: Vec<QuotaPolicy>,
    /// Add a role (repeatable; it must exist).
    #[arg(long = "role", value_name = "NAME")]
    pub(crate) roles: Vec<String>,
    /// Remove a role (repeatable).
    #[arg(long = "remove-role", value_name = "NAME")]
    pub(crate) remove_roles: Vec<String>,
    /// Set the identity owning the key (it must exist).
    #[arg(long, value_name = "NAME")]
    pub(crate) identity: Option<String>,
    /// Detach the key from its identity.
    #[arg(long, conflicts_with = "identity")]
    pub(crate) no_identity: bool,
    /// The key stops working this long after now: 30s, 15m, 12h, 90d.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse::duration)]
    pub(crate) expires_in: Option<Duration>,
    /// The key never expires.
    #[arg(long, conflicts_with = "expires_in")]
    pub(crate) no_expiry: bool,
    /// Replace the metadata (JSON, at most 64 KiB).
    #[arg(long, value_name = "JSON", value_parser = parse::json)]
    pub(crate) meta: Option<serde_json::Value>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RolesCommand {
    /// Create a role. Its --scope values on its --collection values are one grant.
    Create(RoleArgs),
    /// List roles, by name.
    List,
    /// Show one role and the keys holding it.
    Show(NameArg),
    /// Change a role: each option given replaces that field. Every key holding it sees the
    /// change on its next request.
    Update(RoleArgs),
    /// Delete a role: keys keep naming it, and it grants them nothing any more.
    Delete(NameArg),
}

#[derive(Debug, Args)]
pub(crate) struct RoleArgs {
    /// The role's name: 1 to 64 characters of [A-Za-z0-9_.-].
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
    /// A granted scope (repeatable).
    #[arg(long = "scope", value_name = "S", value_parser = parse::scope)]
    pub(crate) scopes: Vec<String>,
    /// A collection the scopes apply to: a name or a pattern (repeatable).
    #[arg(long = "collection", value_name = "C", value_parser = parse::collection)]
    pub(crate) collections: Vec<String>,
    /// One more grant: one scope on one collection pattern, like points:read:shared
    /// (repeatable; scopes on the same pattern make one grant). With `update`, the
    /// grants given (these and --scope × --collection) replace the role's.
    #[arg(long = "grant", value_name = "SCOPE:COLLECTION-PATTERN", value_parser = parse::grant)]
    pub(crate) grants: Vec<(String, String)>,
    /// An attribute given to the keys holding the role (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse::attribute)]
    pub(crate) attributes: Vec<(String, String)>,
    /// A rate limit (repeatable; the tightest of a name applies to a key).
    #[arg(long = "rate", value_name = "NAME=N/UNIT", value_parser = parse::rate)]
    pub(crate) rates: Vec<RateLimitPolicy>,
    /// A quota (repeatable; the tightest of a name applies to a key).
    #[arg(long = "quota", value_name = "NAME=N/UNIT", value_parser = parse::quota)]
    pub(crate) quotas: Vec<QuotaPolicy>,
    /// Delegated minting: with keys:create in its grants, the longest lifetime of a key
    /// that a key holding the role may mint (keys create --as-key): 1h, 7d.
    #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
    pub(crate) mint_max_lifetime: Option<Duration>,
    /// (update) Take the minting ceiling away.
    #[arg(long, conflicts_with = "mint_max_lifetime")]
    pub(crate) no_mint: bool,
}

#[derive(Debug, Args)]
pub(crate) struct NameArg {
    /// The name.
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum IdentitiesCommand {
    /// Create an identity.
    Create(IdentityArgs),
    /// List identities, by name.
    List,
    /// Show one identity and its keys.
    Show(NameArg),
    /// Change an identity: each option given replaces that field. Every key of the
    /// identity sees the change on its next request.
    Update(IdentityUpdateArgs),
    /// Delete an identity. Refused while a key that is not revoked names it: move those
    /// keys to another identity (keys update ID --identity NAME) or revoke them first.
    Delete(NameArg),
}

#[derive(Debug, Args)]
pub(crate) struct IdentityUpdateArgs {
    /// The identity's name.
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
    /// A rate limit shared by all the identity's keys (repeatable; replaces them all).
    #[arg(long = "rate", value_name = "NAME=N/UNIT", value_parser = parse::rate)]
    pub(crate) rates: Vec<RateLimitPolicy>,
    /// Take every rate limit away.
    #[arg(long, conflicts_with = "rates")]
    pub(crate) clear_rates: bool,
    /// A quota shared by all the identity's keys (repeatable; replaces them all).
    #[arg(long = "quota", value_name = "NAME=N/UNIT", value_parser = parse::quota)]
    pub(crate) quotas: Vec<QuotaPolicy>,
    /// Take every quota away.
    #[arg(long, conflicts_with = "quotas")]
    pub(crate) clear_quotas: bool,
    /// New free JSON metadata (at most 64 KiB).
    #[arg(long, value_name = "JSON", value_parser = parse::json)]
    pub(crate) meta: Option<serde_json::Value>,
}

#[derive(Debug, Args)]
pub(crate) struct IdentityArgs {
    /// The identity's name: 1 to 64 characters of [A-Za-z0-9_.-].
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
    /// A rate limit shared by all the identity's keys: one bucket for all (repeatable).
    #[arg(long = "rate", value_name = "NAME=N/UNIT", value_parser = parse::rate)]
    pub(crate) rates: Vec<RateLimitPolicy>,
    /// A quota shared by all the identity's keys: one count for all (repeatable).
    #[arg(long = "quota", value_name = "NAME=N/UNIT", value_parser = parse::quota)]
    pub(crate) quotas: Vec<QuotaPolicy>,
    /// Free JSON metadata (at most 64 KiB).
    #[arg(long, value_name = "JSON", value_parser = parse::json)]
    pub(crate) meta: Option<serde_json::Value>,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Mint the key through the admin API at --admin-url, authenticated with an API key
    /// instead of the database (delegated minting: the key's role must grant keys:create
    /// with a minting ceiling). The key is read from KEYGATE_KEY or --key-file, never from
    /// an argument.
    #[arg(long, requires = "admin_url")]
    pub(crate) as_key: bool,
    /// The admin API's base URL: https://admin.example.com/admin (TLS, the server's
    /// certificate checked against the system's roots or --admin-ca), or plain
    /// http://127.0.0.1:6333/admin to this host only.
    #[arg(long, value_name = "URL", env = "KEYGATE_ADMIN_URL")]
    pub(crate) admin_url: Option<String>,
    /// PEM certificates to trust for an https:// --admin-url instead of the system's roots
    /// (a private CA, or the admin API's self-signed certificate).
    #[arg(long, value_name = "PATH", requires = "as_key")]
    pub(crate) admin_ca: Option<std::path::PathBuf>,
    /// A file holding the API key for --as-key (instead of KEYGATE_KEY).
    #[arg(long, value_name = "PATH", requires = "as_key")]
    pub(crate) key_file: Option<std::path::PathBuf>,
    /// A human name for the key (1 to 128 characters).
    #[arg(long, value_name = "NAME")]
    pub(crate) name: String,
    /// Who the key belongs to (a user, a service, a customer).
    #[arg(long, value_name = "S")]
    pub(crate) owner: Option<String>,
    /// A granted scope: points:read, points:*, * (repeatable). Checked against the scopes
    /// the server registered in the database (a typo is refused with a suggestion).
    #[arg(long = "scope", value_name = "S", value_parser = parse::scope)]
    pub(crate) scopes: Vec<String>,
    /// Grant --scope values the server did not register (custom scopes checked by its own
    /// handlers).
    #[arg(long)]
    pub(crate) allow_unknown_scope: bool,
    /// A collection the key may use: a name or a pattern like tenant-* (repeatable).
    #[arg(long = "collection", value_name = "C", value_parser = parse::collection)]
    pub(crate) collections: Vec<String>,
    /// A per-collection grant: one scope on one collection pattern, like
    /// points:write:docs-* (repeatable; scopes on the same pattern make one grant), in
    /// addition to --scope × --collection.
    #[arg(long = "grant", value_name = "SCOPE:COLLECTION-PATTERN", value_parser = parse::grant)]
    pub(crate) grants: Vec<(String, String)>,
    /// An attribute passed to handlers, like tenant=acme (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse::attribute)]
    pub(crate) attributes: Vec<(String, String)>,
    /// A network the key may be used from, like 10.0.0.0/8 or 2001:db8::/32 (repeatable;
    /// none: any address). A bare address is one host.
    #[arg(long = "allow-ip", value_name = "CIDR", value_parser = parse::cidr)]
    pub(crate) allow_ips: Vec<IpNet>,
    /// A rate limit NAME=N/UNIT, UNIT one of s, m, h, d: burst=20/s (repeatable).
    #[arg(long = "rate", value_name = "NAME=N/UNIT", value_parser = parse::rate)]
    pub(crate) rates: Vec<RateLimitPolicy>,
    /// A quota NAME=N/UNIT, UNIT one of h, d, month (UTC calendar windows):
    /// daily=10000/d (repeatable).
    #[arg(long = "quota", value_name = "NAME=N/UNIT", value_parser = parse::quota)]
    pub(crate) quotas: Vec<QuotaPolicy>,
    /// The key stops working this long after now: 30s, 15m, 12h, 90d.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse::duration)]
    pub(crate) expires_in: Option<Duration>,
    /// The key's prefix (default kg).
    #[arg(long, value_name = "P", value_parser = parse::prefix)]
    pub(crate) prefix: Option<Prefix>,
    /// Free JSON metadata (at most 64 KiB).
    #[arg(long, value_name = "JSON", value_parser = parse::json)]
    pub(crate) meta: Option<serde_json::Value>,
    /// A role the key holds (repeatable; it must exist: `keygate roles create`).
    #[arg(long = "role", value_name = "NAME")]
    pub(crate) roles: Vec<String>,
    /// The identity owning the key (it must exist: `keygate identities create`).
    #[arg(long, value_name = "NAME")]
    pub(crate) identity: Option<String>,
}

/// A key id; a whole API key is refused without being repeated, naming only its id.
fn key_id(text: &str) -> Result<KeyId, String> {
    match crate::output::key_shaped(text) {
        Some(Some(id)) => Err(format!(
            "that looks like a full API key; pass its id (the part after the prefix, first \
             12 characters) instead: {id}"
        )),
        Some(None) => Err("that looks like an API key (not repeated here)".into()),
        None => parse::key_id(text),
    }
}

/// A status to filter on.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum StatusArg {
    Active,
    Disabled,
    Revoked,
}

impl From<StatusArg> for KeyStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Active => KeyStatus::Active,
            StatusArg::Disabled => KeyStatus::Disabled,
            StatusArg::Revoked => KeyStatus::Revoked,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only keys of this owner.
    #[arg(long, value_name = "S")]
    pub(crate) owner: Option<String>,
    /// Only keys with this status.
    #[arg(long, value_name = "STATUS")]
    pub(crate) status: Option<StatusArg>,
    /// Only keys with this prefix.
    #[arg(long, value_name = "P")]
    pub(crate) prefix: Option<String>,
    /// Only keys whose expiry falls within this time from now: 14d (keys already expired,
    /// and keys that never expire, are left out).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse::duration)]
    pub(crate) expiring_within: Option<Duration>,
    /// Only keys created this long ago or longer: 90d (a rotated key's age counts from its
    /// own creation).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse::duration)]
    pub(crate) older_than: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct IdArg {
    /// The key's id (12 characters, the part after the prefix).
    #[arg(value_name = "ID", value_parser = key_id)]
    pub(crate) id: KeyId,
}

/// `keys rotate ID` or `keys rotate --older-than AGE`: exactly one of the two.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "older_than"])))]
pub(crate) struct RotateArgs {
    /// The key's id.
    #[arg(value_name = "ID", value_parser = key_id)]
    pub(crate) id: Option<KeyId>,
    /// Instead of one key: rotate every active key created this long ago or longer (90d),
    /// skipping disabled, revoked and expired keys and keys already rotated (in their grace
    /// period). Prints one JSON line per new key.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = parse::duration)]
    pub(crate) older_than: Option<Duration>,
    /// With --older-than: print the keys that would be rotated (one JSON line each, no
    /// key), change nothing.
    #[arg(long, requires = "older_than", conflicts_with = "id")]
    pub(crate) dry_run: bool,
    /// How long the old key keeps working: 0s (stops at once), 15m, 24h, 7d.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "24h",
        allow_hyphen_values = true,
        value_parser = parse::duration
    )]
    pub(crate) grace: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct UsageArgs {
    /// One key (default: every key with a quota).
    #[arg(value_name = "ID", value_parser = key_id, conflicts_with = "identity")]
    pub(crate) id: Option<KeyId>,
    /// The keys of one identity, with their total per quota name (the chargeback view).
    #[arg(long, value_name = "NAME")]
    pub(crate) identity: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the hash chain of audit log files, in the order given (a directory stands
    /// for each log in it, oldest file first), against each log's checkpoint. Names the
    /// first broken line. The chain key: --chain-key-file, else KEYGATE_AUDIT_KEY or
    /// KEYGATE_AUDIT_KEY_FILE, else STEM.key beside the log, else the public default key.
    Verify(VerifyArgs),
    /// Print the events of an audit log file (or of a log directory's files).
    Tail(TailArgs),
    /// Print events from the database's keygate_audit table (the CLI's own changes go
    /// there).
    Events(EventsArgs),
    /// Run the anomaly detectors over recorded audit logs (files in the order given; a
    /// directory stands for each log in it, oldest file first) and print each signal: a
    /// new network for a key, a traffic spike, a burst of denials, one key from many
    /// networks. Exit 0 whether or not signals were raised.
    Anomalies(AnomaliesArgs),
}

#[derive(Debug, Args)]
pub(crate) struct AnomaliesArgs {
    /// Log files (oldest first) or log directories.
    #[arg(value_name = "FILE", required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// The file-name stem of the log in directories (default: every log found there).
    #[arg(long, value_name = "STEM")]
    pub(crate) stem: Option<String>,
    /// How long after a key's first request in the log its networks and traffic are only
    /// learned.
    #[arg(long, default_value = "1d", value_name = "DURATION", value_parser = parse::duration)]
    pub(crate) learning: Duration,
    /// A key's requests in one minute must exceed its moving baseline this many times...
    #[arg(long, default_value_t = 10.0, value_name = "FACTOR")]
    pub(crate) spike_factor: f64,
    /// ...and be at least this many, to be a spike.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub(crate) spike_min: u64,
    /// Denied requests from one address in one minute that make a burst.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) denials: u64,
    /// Distinct networks of one key within ten minutes that raise a signal.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub(crate) networks: usize,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Log files (oldest first) or log directories.
    #[arg(value_name = "FILE", required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// The file-name stem of the log in directories (audit-000001.jsonl: audit). Default:
    /// every log found in the directory.
    #[arg(long, value_name = "STEM")]
    pub(crate) stem: Option<String>,
    /// A file holding the secret chain key the log was written with.
    #[arg(long, value_name = "PATH")]
    pub(crate) chain_key_file: Option<PathBuf>,
    /// Accept a log without a checkpoint (STEM.checkpoint, written since checkpoints
    /// exist): then lines cut off its end cannot be detected.
    #[arg(long)]
    pub(crate) no_checkpoint: bool,
    /// The line just before the first file (older files removed on purpose), as SEQ:HASH.
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse::chain_point)]
    pub(crate) start: Option<keygate_core::audit::ChainPoint>,
    /// The line the log must end with (an anchor kept elsewhere), as SEQ:HASH.
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse::chain_point)]
    pub(crate) end: Option<keygate_core::audit::ChainPoint>,
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// A log file, or a log directory (its files, oldest first).
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The file-name stem of the log in a directory (default: the one log found there).
    #[arg(long, value_name = "STEM")]
    pub(crate) stem: Option<String>,
    /// How many of the last events to print first.
    #[arg(short = 'n', long = "lines", default_value_t = 10, value_name = "N")]
    pub(crate) lines: usize,
    /// Print every event, not only the last ones.
    #[arg(long, conflicts_with = "lines")]
    pub(crate) all: bool,
    /// Keep printing events as they are appended (and follow a directory's log into new
    /// files), until interrupted.
    #[arg(short, long)]
    pub(crate) follow: bool,
    /// While following, how often to look for new lines.
    #[arg(long, default_value = "250ms", value_name = "DURATION", value_parser = parse::poll_interval)]
    pub(crate) interval: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// Only events about this key.
    #[arg(long = "key", value_name = "ID", value_parser = key_id)]
    pub(crate) key_id: Option<KeyId>,
    /// Only events numbered above this.
    #[arg(long, value_name = "SEQ")]
    pub(crate) after: Option<i64>,
    /// At most this many: the latest ones, unless --after is given (then the first ones
    /// after it).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub(crate) limit: u32,
}
