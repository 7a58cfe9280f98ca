//! HTTPS for the showcase: a rustls server configuration whose certificate can be replaced
//! while the server runs.
//!
//! - [`Tls::from_files`] reads a PEM certificate chain and its PEM private key (PKCS#8,
//!   PKCS#1 or SEC1); [`Tls::reload`] reads them again (the binary calls it on `SIGHUP`).
//!   The new certificate is used by every handshake that starts after the reload; a
//!   connection already open keeps its session and is not dropped. A reload that fails (a
//!   missing file, a key that does not match the certificate) changes nothing: the server
//!   keeps serving the certificate it had.
//! - [`Tls::self_signed`] makes a certificate at start, for local use; its SHA-256
//!   fingerprint ([`Tls::fingerprint`]) is what a client compares.
//!
//! Only HTTP/1.1 is offered (ALPN `http/1.1`), as the accept loop in [`crate::serve`] speaks
//! only that. Connections served through [`crate::serve::serve_tls`] carry the
//! [`keygate::transport::TlsConnection`] extension, which `RequireTls` reads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// The server's TLS settings: the acceptor for new connections, which
/// [`reload`](Tls::reload) replaces. Clones share it.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Current>>,
    files: Option<(PathBuf, PathBuf)>,
    /// The protocols offered by ALPN (HTTP/1.1; HTTP/2 too after [`Tls::offer_http2`]).
    alpn: Vec<Vec<u8>>,
}

/// The acceptor in use, its certificate and the certificate's fingerprint.
#[derive(Clone)]
struct Current {
    acceptor: TlsAcceptor,
    certified: Arc<CertifiedKey>,
    fingerprint: String,
}

/// ALPN offering HTTP/1.1 only.
fn http1_only() -> Vec<Vec<u8>> {
    vec![b"http/1.1".to_vec()]
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.debug_struct("Tls")
            .field("fingerprint", &self.fingerprint())
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration offering `alpn` around one certificate. Each has its own
/// session cache, so a session resumed after a reload is one made with the new certificate.
fn current(certified: CertifiedKey, alpn: &[Vec<u8>]) -> Result<Current, String> {
    let certified = Arc::new(certified);
    let fingerprint = certified
        .cert
        .first()
        .map(|der| fingerprint(der))
        .unwrap_or_default();
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCert(certified.clone())));
    config.alpn_protocols = alpn.to_vec();
    Ok(Current {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        certified,
        fingerprint,
    })
}

/// One certificate for every handshake.
struct SingleCert(Arc<CertifiedKey>);

impl fmt::Debug for SingleCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.write_str("SingleCert")
    }
}

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl Tls {
    /// Reads the PEM certificate chain in `cert` (the server's certificate first) and the PEM
    /// private key in `key`. Errors name the file, never its contents.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Tls, String> {
        let alpn = http1_only();
        Ok(Tls {
            current: Arc::new(RwLock::new(current(load(cert, key)?, &alpn)?)),
            files: Some((cert.to_owned(), key.to_owned())),
            alpn,
        })
    }

    /// A certificate made now for `names` (host names or IP addresses, as subject
    /// alternative names), valid for local use only: clients must be told to trust it (its
    /// [`fingerprint`](Tls::fingerprint)). Returns the certificate in PEM too, so a client
    /// can add it as a root.
    pub fn self_signed(names: &[String]) -> Result<(Tls, String), String> {
        let made = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
        let key = PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
        let certified = CertifiedKey::from_der(vec![made.cert.der().clone()], key, &provider())
            .map_err(|e| format!("cannot use the self-signed certificate: {e}"))?;
        let alpn = http1_only();
        let tls = Tls {
            current: Arc::new(RwLock::new(current(certified, &alpn)?)),
            files: None,
            alpn,
        };
        Ok((tls, made.cert.pem()))
    }

    /// Also offers HTTP/2 by ALPN (`h2`, then `http/1.1`), for a server that speaks both
    /// (the showcase's own server speaks HTTP/1.1 only, so it does not call this).
    pub fn offer_http2(mut self) -> Self {
        self.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let certified = self.get().certified;
        if let Ok(next) = current((*certified).clone(), &self.alpn) {
            match self.current.write() {
                Ok(mut c) => *c = next,
                Err(poisoned) => *poisoned.into_inner() = next,
            }
        }
        self
    }

    fn get(&self) -> Current {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the certificate and key files again and uses them for every handshake from
    /// now on (with a fresh session cache, so no session made under the old certificate
    /// is resumed); connections already open are untouched. Returns the new certificate's
    /// fingerprint. On error (or for a self-signed certificate, which has no files) the
    /// certificate in use stays.
    pub fn reload(&self) -> Result<String, String> {
        let Some((cert, key)) = &self.files else {
            return Err("a self-signed certificate has no files to reload".to_owned());
        };
        let next = current(load(cert, key)?, &self.alpn)?;
        let fingerprint = next.fingerprint.clone();
        match self.current.write() {
            Ok(mut c) => *c = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(fingerprint)
    }

    /// The acceptor for a connection accepted now (the accept loop asks for each one).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.get().acceptor
    }

    /// The SHA-256 fingerprint of the certificate in use, as `openssl x509 -fingerprint
    /// -sha256` prints it (`AB:CD:...`).
    pub fn fingerprint(&self) -> String {
        self.get().fingerprint
    }
}

/// The SHA-256 fingerprint of a DER certificate: 32 upper-case hex bytes joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(95);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        // Writing into a String cannot fail.
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// The certificate chain in `cert` and the key in `key`, checked to belong together.
fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read the TLS private key {}: {}",
            key.display(),
            // The parser's messages name sections, never key bytes.
            e
        )
    })?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        format!(
            "the TLS key {} does not go with the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })
}
