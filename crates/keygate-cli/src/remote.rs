//! `keys create --as-key`: the key is minted by the admin API, authenticated with an API
//! key (delegated minting), so the caller never needs the database.

use std::io::Cursor;
use std::net::IpAddr;
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

use crate::cli::{Cli, CreateArgs};
use crate::output::{print, print_json};
use crate::Failure;

/// The environment variable holding the key for `--as-key`.
pub(crate) const KEY_ENV: &str = "KEYGATE_KEY";

/// How long the admin API may take to answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The most of an answer read (an issued key is a few kilobytes).
const MAX_ANSWER: usize = 1 << 20;

/// The key to authenticate with: `--key-file`, else `KEYGATE_KEY` (never an argument, so
/// it stays out of shell history and process listings).
fn api_key(args: &CreateArgs) -> Result<String, Failure> {
    let text = match &args.key_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            Failure::Failed(format!("cannot read --key-file {}: {e}", path.display()))
        })?,
        None => std::env::var(KEY_ENV).map_err(|_| {
            Failure::Usage(format!(
                "--as-key needs the API key in {KEY_ENV} or a --key-file"
            ))
        })?,
    };
    let key = text.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(Failure::Usage(
            "the API key for --as-key is empty or holds white space".into(),
        ));
    }
    Ok(key.to_owned())
}

/// The admin API's `keys` URL from `--admin-url`: plain HTTP to this host only (the key
/// travels in a header; TLS to another host is not supported by the CLI yet).
fn keys_url(base: &str) -> Result<Uri, Failure> {
    let bad = |why: &str| Failure::Usage(format!("--admin-url {:?}: {why}", clip(base)));
    let uri: Uri = base.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad(
            "only http:// to this host is supported (run the CLI next to the admin API, \
             or behind a local TLS proxy)",
        ));
    }
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(bad(
            "plain HTTP would send the key over the network; only a loopback host is allowed",
        ));
    }
    let path = uri.path().trim_end_matches('/');
    format!(
        "http://{}{path}/keys",
        uri.authority().map(|a| a.as_str()).unwrap_or(host)
    )
    .parse()
    .map_err(|_| bad("not a URL"))
}

/// The strings of a JSON array joined with `,` (`-` for none).
fn join(v: &Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn clip(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The body of `POST /admin/keys` from the create options.
fn body(args: &CreateArgs) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(args.name));
    if let Some(o) = &args.owner {
        m.insert("owner".into(), json!(o));
    }
    m.insert("scopes".into(), json!(args.scopes));
    m.insert("collections".into(), json!(args.collections));
    m.insert(
        "grants".into(),
        serde_json::to_value(crate::parse::grants(&args.grants)).unwrap_or(Value::Null),
    );
    m.insert(
        "attributes".into(),
        Value::Object(
            args.attributes
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect(),
        ),
    );
    m.insert(
        "allowed_ips".into(),
        json!(args
            .allow_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()),
    );
    m.insert(
        "rate_limits".into(),
        serde_json::to_value(&args.rates).unwrap_or(Value::Null),
    );
    m.insert(
        "quotas".into(),
        serde_json::to_value(&args.quotas).unwrap_or(Value::Null),
    );
    if let Some(d) = args.expires_in {
        // Whole seconds: the form every duration parser reads (`1day` is not one).
        m.insert("expires_in".into(), json!(format!("{}s", d.as_secs())));
    }
    if let Some(p) = &args.prefix {
        m.insert("prefix".into(), json!(p.as_str()));
    }
    if let Some(meta) = &args.meta {
        m.insert("metadata".into(), meta.clone());
    }
    m.insert("roles".into(), json!(args.roles));
    if let Some(i) = &args.identity {
        m.insert("identity".into(), json!(i));
    }
    if args.allow_unknown_scope {
        m.insert("allow_unknown_scopes".into(), json!(true));
    }
    Value::Object(m)
}

/// `keys create --as-key`.
pub(crate) async fn create(cli: &Cli, args: &CreateArgs) -> Result<(), Failure> {
    let url = keys_url(args.admin_url.as_deref().unwrap_or_default())?;
    let key = api_key(args)?;
    let payload = serde_json::to_vec(&body(args))
        .map_err(|e| Failure::Failed(format!("cannot encode the request: {e}")))?;
    let req = Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Full::new(Cursor::new(payload)))
        .map_err(|_| Failure::Failed("cannot build the request".into()))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let answer = async {
        let res = client
            .request(req)
            .await
            .map_err(|e| Failure::Failed(format!("the admin API could not be reached: {e}")))?;
        let status = res.status();
        let bytes = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|_| Failure::Failed("the admin API's answer could not be read".into()))?
            .to_bytes();
        Ok::<_, Failure>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(TIMEOUT, answer)
        .await
        .map_err(|_| Failure::Failed("the admin API did not answer in 30 s".into()))??;
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status != StatusCode::CREATED {
        let code = value["code"].as_str().unwrap_or("-");
        let detail = value["detail"].as_str().unwrap_or("");
        return Err(Failure::Failed(format!(
            "the admin API refused the key ({}, {code}): {}",
            status.as_u16(),
            clip(detail)
        )));
    }
    if let Some(ws) = value["warnings"].as_array() {
        for w in ws.iter().filter_map(Value::as_str) {
            crate::warning(w);
        }
    }
    crate::warning("this is the only time the key is shown: store it now, it cannot be recovered");
    if cli.json {
        return print_json(&value);
    }
    let field = |name: &str| match &value[name] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                // A grant: `points:read on docs-2026`.
                Value::Object(g) => format!(
                    "{} on {}",
                    join(&g["scopes"]),
                    join(g.get("collections").unwrap_or(&Value::Null))
                ),
                v => v.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        v => v.to_string(),
    };
    let mut out = String::new();
    for name in [
        "id",
        "name",
        "identity",
        "expires_at",
        "scopes",
        "resources",
        "grants",
    ] {
        out.push_str(&format!("{name:<12}  {}\n", field(name)));
    }
    out.push_str(&format!("\nkey: {}\n", field("key")));
    print(&out)
}
