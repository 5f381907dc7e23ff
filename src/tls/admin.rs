//! HTTPS for the admin endpoint (`[admin.tls]`): a server certificate and key, reloadable, and
//! the client configuration the command-line client verifies the endpoint with.
//!
//! Unlike the peer listener, clients present no certificate (mutations carry the admin token),
//! and the endpoint is verified the usual way: the certificate must chain to the CA the client
//! trusts and name the host of the URL (a DNS name or an IP address; `egressd tls issue NODE
//! --san 10.0.0.1` adds one). TLS 1.2 and 1.3 are offered, so that curl and browsers of any
//! age can talk to it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{
    CA_ROLE, CERT_ROLE, KEY_ROLE, TlsError, certify, parse_certs, provider, read_pem_file,
    subject_and_expiry,
};

/// The two files of `[admin.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Reads and checks the certificate and key, and builds the server configuration.
pub fn server_config(files: &AdminTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let cert_bytes = read_pem_file(&files.cert_file, CERT_ROLE)?;
    let chain = parse_certs(
        &cert_bytes,
        &files.cert_file,
        CERT_ROLE,
        "the admin endpoint's certificate",
    )?;
    if let Some(leaf) = chain.first() {
        let (_, not_after) = subject_and_expiry(leaf).map_err(|detail| TlsError::Invalid {
            role: CERT_ROLE,
            path: files.cert_file.clone(),
            detail,
        })?;
        if not_after < super::unix_now() {
            return Err(TlsError::Invalid {
                role: CERT_ROLE,
                path: files.cert_file.clone(),
                detail: "the certificate has expired".to_owned(),
            });
        }
    }
    let key_bytes = read_pem_file(&files.key_file, KEY_ROLE)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Invalid {
        role: KEY_ROLE,
        path: files.key_file.clone(),
        detail: format!("not a PEM private key: {e}"),
    })?;
    let certified = certify(chain, key, &provider, &files.cert_file, &files.key_file)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            files: format!(
                "{}, {}",
                files.cert_file.display(),
                files.key_file.display()
            ),
            detail: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// The admin endpoint's TLS, reloadable (SIGHUP). Cheap to clone.
#[derive(Clone)]
pub struct AdminTls {
    current: Arc<RwLock<(AdminTlsFiles, Arc<ServerConfig>)>>,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls")
            .field("files", &self.files())
            .finish_non_exhaustive()
    }
}

impl AdminTls {
    pub fn load(files: AdminTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(AdminTls {
            current: Arc::new(RwLock::new((files, config))),
        })
    }

    /// Re-reads the files (possibly new paths); on failure the previous ones stay in use.
    pub fn reload_from(&self, files: AdminTlsFiles) -> Result<(), TlsError> {
        let config = server_config(&files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (files, config);
        Ok(())
    }

    pub fn files(&self) -> AdminTlsFiles {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// The configuration for the next handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }
}

/// The client configuration of `egressd status` and friends for an `https://` admin URL: trusts
/// the certificates of `ca_file` (a bundle is fine) and nothing else.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let bytes = read_pem_file(ca_file, CA_ROLE)?;
    let cas = parse_certs(
        &bytes,
        ca_file,
        CA_ROLE,
        "the CA certificate(s) the admin endpoint's certificate chains to",
    )?;
    let mut roots = RootCertStore::empty();
    for (i, ca) in cas.into_iter().enumerate() {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            role: CA_ROLE,
            path: ca_file.to_owned(),
            detail: format!("certificate #{}: not usable as a trust anchor: {e}", i + 1),
        })?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            files: ca_file.display().to_string(),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
