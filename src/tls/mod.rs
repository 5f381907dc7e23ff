//! Mutual TLS between egressd peers (rustls with the *ring* provider; no OpenSSL, no aws-lc).
//!
//! # Identity model
//!
//! A cluster has its own certificate authority (`egressd tls init-ca`). Every node holds a
//! certificate signed by it (`egressd tls issue NODE`) whose DNS subject alternative name is the
//! node's name as written in `cluster.peers`, with both the serverAuth and clientAuth extended key
//! usages: the same certificate serves the node's peer listener and authenticates it when it
//! dials the others.
//!
//! - **Server side** ([`PeerTls::server_config`]): a client must present a certificate chaining to
//!   the cluster CA (rustls' `WebPkiClientVerifier`), or the handshake fails. After the
//!   handshake the server reads the client's node name(s) — the DNS SANs of its end-entity
//!   certificate, [`PeerIdentity`] — and decides whether that name is a cluster member
//!   ([`server::ServeOptions::authorize`]).
//! - **Client side** ([`PeerTls::client_config`]): peers are dialled by IP address, so the usual
//!   host-name check does not apply. Each expected peer gets its own `ClientConfig` whose
//!   verifier checks that the server's chain ends at the cluster CA (webpki) *and* that one of
//!   its DNS SANs equals the expected peer's node name. A server presenting another node's
//!   certificate, one from another CA, or none fails the handshake.
//!
//! Only TLS 1.3 is offered: every peer is an egressd.
//!
//! # Files and reload
//!
//! [`TlsFiles`] names the three PEM files (`[cluster.tls]` `ca_file`, `cert_file`, `key_file`).
//! The CA file may hold several certificates: during a CA rotation the old and the new CA are
//! bundled, so that nodes with certificates of either are accepted. A key file readable or
//! writable by group or others is refused. Every error names the file.
//!
//! [`PeerTls`] is the live handle: [`PeerTls::reload`] (on SIGHUP) re-reads the files and, if
//! they are all valid, new handshakes use them from then on; connections already established
//! keep the identity they were set up with. A failed reload changes nothing and says why.

pub mod admin;
pub mod client;
pub mod pki;
pub mod server;

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// Largest PEM file accepted (a CA bundle of a few certificates is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The three PEM files of a node's peer TLS identity: `[cluster.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate(s); old and new CA may be bundled during a rotation.
    pub ca_file: PathBuf,
    /// This node's certificate (first), optionally followed by intermediate CA certificates.
    pub cert_file: PathBuf,
    /// This node's private key (PKCS#8, SEC1 or PKCS#1 PEM), mode 0600.
    pub key_file: PathBuf,
}

/// Why the TLS files cannot be used. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {role} {}: {source}", path.display())]
    Read {
        role: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the private key file {} has mode {mode:04o}: it is accessible to group or others, so \
         egressd refuses to use it; run `chmod 600 {}` and make it owned by the user egressd \
         runs as",
        path.display(), path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the {role} {}: {detail}", path.display())]
    Invalid {
        role: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "the private key in {} does not belong to the certificate in {}: use the key file that \
         `egressd tls issue` wrote beside the certificate ({detail})",
        key.display(), cert.display()
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("the certificate in {} cannot identify this node: {detail}", path.display())]
    NotOurs { path: PathBuf, detail: String },
    #[error(
        "{name:?} cannot be a peer's TLS identity: node names must be DNS names (letters, digits, \
         '-', '_' and '.') to be carried as a certificate's DNS subject alternative name"
    )]
    BadNodeName { name: String },
    #[error("cannot build the TLS configuration from {files}: {detail}")]
    Config { files: String, detail: String },
}

/// What a loaded set of files holds, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// The node name the certificate was checked against.
    pub node_name: String,
    /// The DNS SANs of this node's certificate.
    pub cert_names: Vec<String>,
    /// This node's certificate expiry, seconds since the Unix epoch.
    pub cert_not_after: i64,
    /// Subjects of the trusted CA certificates, in file order.
    pub ca_subjects: Vec<String>,
}

impl fmt::Display for TlsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = (self.cert_not_after - unix_now()).div_euclid(86_400);
        write!(
            f,
            "certificate for {} (valid {} more days), trusting {} CA certificate(s): {}",
            self.cert_names.join(", "),
            days,
            self.ca_subjects.len(),
            self.ca_subjects.join("; ")
        )
    }
}

/// The verified identity of a peer that connected to this node: the DNS SANs of its
/// certificate (which chains to the cluster CA) and its address. The server-side helpers insert
/// it into every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
    pub remote: SocketAddr,
}

impl PeerIdentity {
    /// Whether the certificate names `node` (DNS names compare case-insensitively).
    pub fn is(&self, node: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(node))
    }

    /// The first of `members` that the certificate names, if any.
    pub fn member_of<'a, I>(&self, members: I) -> Option<&'a str>
    where
        I: IntoIterator<Item = &'a str>,
    {
        members.into_iter().find(|m| self.is(m))
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.names.as_slice() {
            [] => write!(f, "a peer at {} with no DNS name", self.remote),
            names => write!(f, "{} at {}", names.join("/"), self.remote),
        }
    }
}

/// The DNS subject alternative names of a DER certificate, in certificate order.
pub fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The names of the verified client certificate of a finished server-side handshake (empty
/// when there is none, which the server configuration of this module never accepts).
pub fn client_names(conn: &rustls::CommonState) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| dns_names(c).ok())
        .unwrap_or_default()
}

/// The crypto provider of every configuration built here: *ring*, TLS 1.3.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn dns_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    match ServerName::try_from(name.to_owned()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        _ => Err(TlsError::BadNodeName {
            name: name.to_owned(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

const CA_ROLE: &str = "CA file";
const CERT_ROLE: &str = "certificate file";
const KEY_ROLE: &str = "private key file";

fn read_pem_file(path: &Path, role: &'static str) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        role,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(TlsError::Invalid {
            role,
            path: path.to_owned(),
            detail: "not a regular file".to_owned(),
        });
    }
    if role == KEY_ROLE {
        check_key_mode(path, &meta)?;
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            role,
            path: path.to_owned(),
            detail: format!(
                "{} bytes; a PEM file of certificates or a key is at most {MAX_PEM_BYTES}",
                meta.len()
            ),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

/// Refuses a private key file that group or others may access in any way.
pub fn check_key_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The certificate chain and its key as one, or why they do not belong together.
fn certify(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &Arc<CryptoProvider>,
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
            detail: e.to_string(),
        },
        e => TlsError::Invalid {
            role: KEY_ROLE,
            path: key_file.to_owned(),
            detail: format!("cannot use the key: {e}"),
        },
    })
}

fn parse_certs(
    bytes: &[u8],
    path: &Path,
    role: &'static str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |detail: String| TlsError::Invalid {
        role,
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "no PEM CERTIFICATE block found; expected {what}"
        )));
    }
    Ok(certs)
}

fn subject_and_expiry(cert: &CertificateDer<'_>) -> Result<(String, i64), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok((
        x509.subject().to_string(),
        x509.validity().not_after.timestamp(),
    ))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One loaded, checked generation of the TLS files, with the configurations built from them.
pub struct TlsMaterial {
    files: TlsFiles,
    summary: TlsSummary,
    roots: Arc<RootCertStore>,
    key: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    /// Per expected peer; built on first use. Each has its own session cache, so a reload
    /// (a new `TlsMaterial`) never resumes a session set up under the old files.
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("files", &self.files)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and checks the three files for node `node_name`: the CA file holds at least one
    /// certificate, the key file is private and matches the certificate, and the certificate
    /// chains to one of the CAs, is currently valid for both server and client use, and carries
    /// `node_name` as a DNS SAN (otherwise every peer would refuse this node).
    pub fn load(files: &TlsFiles, node_name: &str) -> Result<Self, TlsError> {
        let own_name = dns_server_name(node_name)?;
        let provider = provider();

        let ca_bytes = read_pem_file(&files.ca_file, CA_ROLE)?;
        let cas = parse_certs(
            &ca_bytes,
            &files.ca_file,
            CA_ROLE,
            "the cluster CA certificate(s) (ca.pem of `egressd tls init-ca`)",
        )?;
        let mut roots = RootCertStore::empty();
        let mut ca_subjects = Vec::new();
        for (i, ca) in cas.into_iter().enumerate() {
            let invalid = |detail: String| TlsError::Invalid {
                role: CA_ROLE,
                path: files.ca_file.clone(),
                detail: format!("certificate #{}: {detail}", i + 1),
            };
            let (subject, _) = subject_and_expiry(&ca).map_err(invalid)?;
            roots
                .add(ca)
                .map_err(|e| invalid(format!("not usable as a trust anchor: {e}")))?;
            ca_subjects.push(subject);
        }
        let roots = Arc::new(roots);

        let cert_bytes = read_pem_file(&files.cert_file, CERT_ROLE)?;
        let chain = parse_certs(
            &cert_bytes,
            &files.cert_file,
            CERT_ROLE,
            "this node's certificate (NODE.pem of `egressd tls issue`)",
        )?;
        let key_bytes = read_pem_file(&files.key_file, KEY_ROLE)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Invalid {
            role: KEY_ROLE,
            path: files.key_file.clone(),
            detail: match e {
                rustls::pki_types::pem::Error::NoItemsFound => "no PEM PRIVATE KEY block found; \
                     expected this node's key (NODE-key.pem of `egressd tls issue`)"
                    .to_owned(),
                e => format!("not a valid PEM private key: {e}"),
            },
        })?;
        let key = Arc::new(certify(
            chain,
            key,
            &provider,
            &files.cert_file,
            &files.key_file,
        )?);

        // The node's own certificate, checked as its peers will check it.
        let not_ours = |detail: String| TlsError::NotOurs {
            path: files.cert_file.clone(),
            detail,
        };
        let Some((leaf, intermediates)) = key.cert.split_first() else {
            return Err(not_ours("it holds no certificate".to_owned()));
        };
        let now = UnixTime::now();
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| not_ours(format!("cannot parse it: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            not_ours(format!(
                "as a server certificate against {}: {e}",
                files.ca_file.display()
            ))
        })?;
        let client_verifier = client_verifier(&roots, &provider, &files.ca_file)?;
        client_verifier
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|e| {
                not_ours(format!(
                    "as a client certificate against {}: {e}",
                    files.ca_file.display()
                ))
            })?;
        let cert_names = dns_names(leaf).map_err(not_ours)?;
        if !cert_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(own_name.to_str().as_ref()))
        {
            return Err(not_ours(format!(
                "it names {} but this node is {node_name:?} (node.name); issue one with \
                 `egressd tls issue {node_name}`",
                if cert_names.is_empty() {
                    "no DNS name".to_owned()
                } else {
                    cert_names.join(", ")
                }
            )));
        }
        let (_, cert_not_after) = subject_and_expiry(leaf).map_err(not_ours)?;

        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(files, e))?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));

        Ok(TlsMaterial {
            files: files.clone(),
            summary: TlsSummary {
                node_name: node_name.to_owned(),
                cert_names,
                cert_not_after,
                ca_subjects,
            },
            roots,
            key,
            provider,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn summary(&self) -> &TlsSummary {
        &self.summary
    }

    /// The server configuration: TLS 1.3, a client certificate chaining to the CA required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client configuration for dialling `peer`: presents this node's certificate and
    /// accepts only a server whose certificate chains to the CA and names `peer`.
    pub fn client_config(&self, peer: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cache = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cache.get(peer) {
            return Ok(c.clone());
        }
        let verifier = PeerVerifier::new(
            peer,
            self.roots.clone(),
            self.provider.signature_verification_algorithms,
        )?;
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(&self.files, e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.key.clone())));
        let config = Arc::new(config);
        cache.insert(peer.to_owned(), config.clone());
        Ok(config)
    }
}

fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    ca_file: &Path,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid {
            role: CA_ROLE,
            path: ca_file.to_owned(),
            detail: format!("cannot verify clients with it: {e}"),
        })
}

fn config_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::Config {
        files: format!(
            "{}, {}, {}",
            files.ca_file.display(),
            files.cert_file.display(),
            files.key_file.display()
        ),
        detail: e.to_string(),
    }
}

/// The client-side verifier: the chain must end at one of the cluster CAs (webpki) and a DNS
/// SAN must equal the expected node name exactly (case-insensitively; no wildcards). The name
/// rustls passes in (the dialled IP address) plays no part.
#[derive(Debug)]
struct PeerVerifier {
    expected: String,
    expected_name: ServerName<'static>,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn new(
        expected: &str,
        roots: Arc<RootCertStore>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Result<Self, TlsError> {
        Ok(PeerVerifier {
            expected: expected.to_owned(),
            expected_name: dns_server_name(expected)?,
            roots,
            algs,
        })
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let names = dns_names(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                std::io::Error::other(e),
            ))))
        })?;
        if names.iter().any(|n| n.eq_ignore_ascii_case(&self.expected)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: self.expected_name.clone(),
                    presented: names,
                },
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// The live handle

/// The node's peer TLS identity, reloadable. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct PeerTls {
    shared: Arc<Shared>,
}

struct Shared {
    node_name: String,
    current: RwLock<Arc<TlsMaterial>>,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("node_name", &self.shared.node_name)
            .field("current", &*self.material())
            .finish()
    }
}

impl PeerTls {
    /// Loads the files for node `node_name` (see [`TlsMaterial::load`]).
    pub fn load(files: TlsFiles, node_name: &str) -> Result<Self, TlsError> {
        let material = TlsMaterial::load(&files, node_name)?;
        Ok(PeerTls {
            shared: Arc::new(Shared {
                node_name: node_name.to_owned(),
                current: RwLock::new(Arc::new(material)),
            }),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.shared.node_name
    }

    /// The files and configurations new handshakes use now.
    pub fn material(&self) -> Arc<TlsMaterial> {
        self.shared
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the current files (SIGHUP). On success new handshakes use them; on failure
    /// the previous ones stay in force and the error says why.
    pub fn reload(&self) -> Result<TlsSummary, TlsError> {
        let files = self.material().files.clone();
        self.reload_from(files)
    }

    /// As [`PeerTls::reload`], with file names from a reloaded configuration.
    pub fn reload_from(&self, files: TlsFiles) -> Result<TlsSummary, TlsError> {
        let material = TlsMaterial::load(&files, &self.shared.node_name)?;
        let summary = material.summary.clone();
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(material);
        Ok(summary)
    }

    pub fn summary(&self) -> TlsSummary {
        self.material().summary.clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server_config()
    }

    pub fn client_config(&self, peer: &str) -> Result<Arc<ClientConfig>, TlsError> {
        self.material().client_config(peer)
    }
}

/// How long a TLS handshake may take before the connection is dropped, on either side, unless
/// the caller chooses otherwise. A LAN handshake takes about a millisecond.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
