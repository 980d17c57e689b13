//! TLS settings built from the config: the listener's certificates (chosen
//! per connection by SNI) and the trust roots backends are verified
//! against. Built, and every file checked, whenever a config generation is
//! built: at start-up, by `--check`, and on every reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{CertificateFiles, TlsListener, TlsVersion};

/// Why the TLS settings of a config cannot be used. Each message names the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, or holds no usable PEM item of its kind.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{}: the key does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// The acceptor side: one [`ServerConfig`] for the listener, ALPN
/// `http/1.1`, the oldest version `tls_min_version`.
pub fn server_config(listener: &TlsListener) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut certificates = Vec::with_capacity(listener.certificates.len());
    for files in &listener.certificates {
        certificates.push(load_certified_key(files, &provider)?);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match listener.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::File {
            path: listener.certificates[0].cert.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { certificates }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The connector side, for backends with `"tls": true`: the certificates
/// of `upstream_ca_file` as the only trust roots, or else the Mozilla
/// roots built into the binary (`webpki-roots`), so that verification is
/// the same on every machine. ALPN `http/1.1`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certificates = read_certificates(path)?;
            let (added, _ignored) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(TlsError::File {
                    path: path.to_path_buf(),
                    reason: "no usable CA certificate in it".into(),
                });
            }
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::File {
            path: ca_file.map(Path::to_path_buf).unwrap_or_default(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `name` as the name a backend's certificate is checked against; the
/// config has validated it already.
pub fn server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_string()).ok()
}

/// The crypto provider: aws-lc-rs (see the commit that chose it for the
/// measurements).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load_certified_key(
    files: &CertificateFiles,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
        path: files.key.clone(),
        reason: pem_reason(e, "private key"),
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::File {
            path: files.key.clone(),
            reason: format!("unusable private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        Err(e) => {
            return Err(TlsError::File {
                path: files.cert.clone(),
                reason: format!("unusable certificate: {e}"),
            })
        }
    }
    // Parsed once here so that a certificate that cannot be matched
    // against SNI is refused now, not at a client's handshake.
    webpki::EndEntityCert::try_from(&certified.cert[0]).map_err(|e| TlsError::File {
        path: files.cert.clone(),
        reason: format!("the first certificate cannot be parsed: {e}"),
    })?;
    Ok(Arc::new(certified))
}

/// Every certificate in a PEM file, in order; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(pem_reason(e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(pem_reason(e, "certificate")))?;
    if certificates.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

fn pem_reason(error: rustls_pki_types::pem::Error, what: &str) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(e) => format!("cannot read: {e}"),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} in it"),
        other => format!("not a valid PEM file: {other}"),
    }
}

/// Chooses the certificate for a connection: the first (in configured
/// order) whose subject alternative names cover the client's SNI name
/// (wildcards as usual: `*.example.com` covers one label), else the first.
#[derive(Debug)]
struct BySni {
    certificates: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let first = self.certificates.first()?;
        if self.certificates.len() == 1 {
            return Some(Arc::clone(first));
        }
        let Some(name) = hello
            .server_name()
            .and_then(|n| rustls_pki_types::DnsName::try_from(n).ok())
        else {
            return Some(Arc::clone(first));
        };
        let name = ServerName::DnsName(name);
        let covers = |key: &&Arc<CertifiedKey>| {
            key.cert.first().is_some_and(|der| {
                webpki::EndEntityCert::try_from(der)
                    .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
        };
        Some(Arc::clone(
            self.certificates.iter().find(covers).unwrap_or(first),
        ))
    }
}
