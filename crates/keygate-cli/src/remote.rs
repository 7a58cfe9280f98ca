//! `keys create --as-key`: the key is minted by the admin API, authenticated with an API
//! key (delegated minting), so the caller never needs the database.

use std::io::Cursor;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
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

/// Where the admin API's `keys` collection is, from `--admin-url`.
struct Target {
    /// `https`, or plain HTTP (to a loopback host only).
    tls: bool,
    /// The host as written, without IPv6 brackets (the TLS server name).
    host: String,
    port: u16,
    /// The `Host` field.
    authority: String,
    /// `{path}/keys`, the request target.
    path: String,
}

/// Reads `--admin-url`: `https://HOST[:PORT]/PATH` anywhere, or `http://` to this host only
/// (plain HTTP to another host would send the key over the network in the clear).
fn target(base: &str) -> Result<Target, Failure> {
    // The URL as shown: a password in it (refused below) is never printed.
    let shown = clip(&keygate_core::redact_url(base));
    let bad = |why: &str| Failure::Usage(format!("--admin-url {shown:?}: {why}"));
    let uri: Uri = base.parse().map_err(|_| bad("not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(bad(
                "the URL must start with https:// (or http:// to this host)",
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(bad("the URL names no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not accepted"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("the URL names no host"));
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback {
        return Err(bad(
            "plain HTTP would send the key over the network; use https://, or http:// to a loopback host",
        ));
    }
    if uri.query().is_some() {
        return Err(bad("the URL may not have a query"));
    }
    Ok(Target {
        tls,
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        authority: authority.as_str().to_owned(),
        host,
        path: format!("{}/keys", uri.path().trim_end_matches('/')),
    })
}

/// The TLS client settings: the operating system's trusted roots, or only the
/// certificates of `--admin-ca` when given (a private CA or a self-signed admin API).
fn tls_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, Failure> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    Failure::Usage(format!(
                        "--admin-ca {}: not readable PEM certificates ({e})",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Failure::Usage(format!(
                    "--admin-ca {}: holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    Failure::Usage(format!(
                        "--admin-ca {}: a certificate could not be used ({e})",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(Failure::Failed(
                    "no trusted root certificates were found on this system; give the admin API's CA with --admin-ca"
                        .into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Failed(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends `req` over one connection to `t` (TLS when `t.tls`) and reads the answer.
async fn exchange(
    t: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    req: Request<Full<Cursor<Vec<u8>>>>,
) -> Result<(StatusCode, bytes::Bytes), Failure> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Failure::Failed(format!("the admin API could not be reached: {e}"))
    };
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| unreachable(&e))?;
    let res = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| unreachable(&e))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(&e))?;
            send(TokioIo::new(stream), req).await?
        }
        None => send(TokioIo::new(tcp), req).await?,
    };
    let status = res.status();
    let bytes = Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|_| Failure::Failed("the admin API's answer could not be read".into()))?
        .to_bytes();
    Ok((status, bytes))
}

async fn send<IO>(
    io: TokioIo<IO>,
    req: Request<Full<Cursor<Vec<u8>>>>,
) -> Result<http::Response<hyper::body::Incoming>, Failure>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let failed =
        |e: hyper::Error| Failure::Failed(format!("the admin API could not be reached: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(failed)?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(failed)
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
    let t = target(args.admin_url.as_deref().unwrap_or_default())?;
    if args.admin_ca.is_some() && !t.tls {
        return Err(Failure::Usage(
            "--admin-ca is for an https:// --admin-url".into(),
        ));
    }
    let tls = if t.tls {
        Some(tls_config(args.admin_ca.as_deref())?)
    } else {
        None
    };
    let key = api_key(args)?;
    let payload = serde_json::to_vec(&body(args))
        .map_err(|e| Failure::Failed(format!("cannot encode the request: {e}")))?;
    let req = Request::post(t.path.as_str())
        .header(http::header::HOST, t.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Full::new(Cursor::new(payload)))
        .map_err(|_| Failure::Failed("cannot build the request".into()))?;
    let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange(&t, tls, req))
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
