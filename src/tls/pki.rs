//! The cluster's own small PKI, behind `egressd tls init-ca` and `egressd tls issue` (rcgen).
//!
//! - The CA: an ECDSA P-256 key and a self-signed certificate (basic constraints CA with path
//!   length 0, key usages keyCertSign and cRLSign), valid [`CA_DAYS`] days by default, common
//!   name "egressd cluster CA <creation date> <key id>" so that old and new CAs are told apart in a
//!   rotation bundle.
//! - A node certificate: a fresh ECDSA P-256 key, the node name as the only DNS subject
//!   alternative name and as the common name, key usage digitalSignature, extended key usages
//!   serverAuth and clientAuth, valid [`NODE_DAYS`] days by default (never past the CA's own
//!   expiry). Both start one hour in the past, so that a node whose clock is a little behind
//!   the issuing machine's accepts them at once.
//!
//! Private keys are written with mode 0600, certificates 0644; existing files are kept unless
//! `force` is given. Every file is written to a temporary name and then linked (or, with
//! `force`, renamed) into place, so that a reader never sees half a file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

/// Default validity of a cluster CA: ten years.
pub const CA_DAYS: u32 = 3650;
/// Default validity of a node certificate: two years.
pub const NODE_DAYS: u32 = 730;
/// How far in the past certificates start, for clock differences between machines.
const BACKDATE: time::Duration = time::Duration::hours(1);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    /// Expiry of the certificate.
    pub not_after: OffsetDateTime,
}

/// A new cluster CA valid for `days` days.
pub fn new_ca(days: u32) -> anyhow::Result<Pem> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    // Unique per key: chain building picks the anchor by name, so two CAs with one name (a
    // rotation bundle, two clusters set up the same day) would make verification errors
    // confusing ("bad signature" instead of "unknown issuer").
    let id: String = params.key_identifier(&key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "egressd");
    dn.push(
        DnType::CommonName,
        format!("egressd cluster CA {} {id}", now.date()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(days.max(1)));
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: params.not_after,
    })
}

/// A certificate for node `node` signed by the CA (`ca_cert_pem` may be a bundle: the
/// certificate whose public key is `ca_key_pem`'s signs), valid for `days` days or until the
/// CA expires, whichever comes first.
pub fn issue(node: &str, ca_cert_pem: &str, ca_key_pem: &str, days: u32) -> anyhow::Result<Pem> {
    issue_with_sans(node, &[], ca_cert_pem, ca_key_pem, days)
}

/// [`issue`] with more subject alternative names after the node's: each a DNS name or an IP
/// address (for an admin endpoint reached by address, `[admin.tls]`).
pub fn issue_with_sans(
    node: &str,
    extra_sans: &[String],
    ca_cert_pem: &str,
    ca_key_pem: &str,
    days: u32,
) -> anyhow::Result<Pem> {
    let mut sans = Vec::new();
    for extra in extra_sans {
        sans.push(match extra.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => match rustls::pki_types::ServerName::try_from(extra.as_str()) {
                Ok(rustls::pki_types::ServerName::DnsName(_)) => SanType::DnsName(
                    extra
                        .as_str()
                        .try_into()
                        .with_context(|| format!("{extra:?} as a DNS name"))?,
                ),
                _ => bail!("--san {extra:?}: expected a DNS name or an IP address"),
            },
        });
    }
    let san = match rustls::pki_types::ServerName::try_from(node) {
        Ok(rustls::pki_types::ServerName::DnsName(_)) => SanType::DnsName(
            node.try_into()
                .with_context(|| format!("{node:?} as a DNS name"))?,
        ),
        _ => bail!(
            "{node:?} is not a DNS name: node names that peers authenticate with TLS must be made \
             of letters, digits, '-', '_' and '.' (the name is the certificate's DNS subject \
             alternative name)"
        ),
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key is not a PEM private key")?;
    let ca_der = ca_matching_key(ca_cert_pem, &ca_key)?;
    let ca_not_after = {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, x509) = X509Certificate::from_der(&ca_der)
            .map_err(|e| anyhow::anyhow!("the CA certificate cannot be parsed: {e}"))?;
        x509.validity().not_after.to_datetime()
    };
    let issuer =
        Issuer::from_ca_cert_der(&ca_der, ca_key).context("the CA certificate cannot sign")?;

    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "egressd");
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.subject_alt_names = std::iter::once(san).chain(sans).collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = (now + time::Duration::days(i64::from(days.max(1)))).min(ca_not_after);
    if params.not_after <= now {
        bail!("the CA expired on {ca_not_after}: create a new one with `egressd tls init-ca`");
    }
    let key = KeyPair::generate().context("generating the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: params.not_after,
    })
}

/// The DER of the certificate in `pem` whose public key is `key`'s.
fn ca_matching_key(pem: &str, key: &KeyPair) -> anyhow::Result<CertificateDer<'static>> {
    use rcgen::PublicKeyData;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the CA certificate file is not valid PEM: {e}"))?;
    if certs.is_empty() {
        bail!("the CA certificate file holds no PEM CERTIFICATE block");
    }
    let spki = key.subject_public_key_info();
    for cert in certs {
        let parsed = rustls::server::ParsedCertificate::try_from(&cert)
            .map_err(|e| anyhow::anyhow!("a CA certificate cannot be parsed: {e}"))?;
        if parsed.subject_public_key_info().as_ref() == spki.as_slice() {
            return Ok(cert);
        }
    }
    bail!("no certificate in the CA certificate file belongs to the CA key")
}

/// What `init-ca` / `issue` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: OffsetDateTime,
}

/// `egressd tls init-ca`: writes `ca.pem` and `ca-key.pem` into `out_dir` (created if missing).
pub fn init_ca_dir(out_dir: &Path, days: u32, force: bool) -> anyhow::Result<Written> {
    let cert = out_dir.join(CA_CERT_FILE);
    let key = out_dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert, &key], force)?;
    let pem = new_ca(days)?;
    write_files(out_dir, &cert, &pem.cert, &key, &pem.key, force)?;
    Ok(Written {
        cert,
        key,
        not_after: pem.not_after,
    })
}

/// `egressd tls issue`: reads `ca.pem` and `ca-key.pem` from `ca_dir` and writes `NODE.pem` and
/// `NODE-key.pem` into `out_dir` (created if missing).
pub fn issue_to_dir(
    node: &str,
    ca_dir: &Path,
    out_dir: &Path,
    days: u32,
    force: bool,
) -> anyhow::Result<Written> {
    issue_to_dir_with(node, &[], ca_dir, out_dir, days, force)
}

/// [`issue_to_dir`] with more subject alternative names (see [`issue_with_sans`]).
pub fn issue_to_dir_with(
    node: &str,
    extra_sans: &[String],
    ca_dir: &Path,
    out_dir: &Path,
    days: u32,
    force: bool,
) -> anyhow::Result<Written> {
    if node.contains('/') || node.starts_with('.') {
        bail!("{node:?} cannot be a node name (it would be a path)");
    }
    let cert = out_dir.join(format!("{node}.pem"));
    let key = out_dir.join(format!("{node}-key.pem"));
    refuse_existing(&[&cert, &key], force)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert = std::fs::read_to_string(&ca_cert_path)
        .with_context(|| format!("reading the CA certificate {}", ca_cert_path.display()))?;
    let meta = std::fs::metadata(&ca_key_path)
        .with_context(|| format!("reading the CA key {}", ca_key_path.display()))?;
    if super::check_key_mode(&ca_key_path, &meta).is_err() {
        use std::os::unix::fs::PermissionsExt;
        bail!(
            "the CA key {} has mode {:04o}: it is accessible to group or others, so it is not \
             used; run `chmod 600 {}`",
            ca_key_path.display(),
            meta.permissions().mode() & 0o7777,
            ca_key_path.display()
        );
    }
    let ca_key = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("reading the CA key {}", ca_key_path.display()))?;
    let pem = issue_with_sans(node, extra_sans, &ca_cert, &ca_key, days).with_context(|| {
        format!(
            "issuing a certificate for {node} with the CA in {}",
            ca_dir.display()
        )
    })?;
    write_files(out_dir, &cert, &pem.cert, &key, &pem.key, force)?;
    Ok(Written {
        cert,
        key,
        not_after: pem.not_after,
    })
}

fn refuse_existing(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let existing: Vec<String> = paths
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    match existing.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one} already exists; nothing written (pass --force to replace it)"),
        many => bail!(
            "{} already exist; nothing written (pass --force to replace them)",
            many.join(" and ")
        ),
    }
}

fn write_files(
    dir: &Path,
    cert: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
    force: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The key first: a certificate without its key is useless, the reverse is harmless.
    write_file(key, key_pem, 0o600, force)?;
    write_file(cert, cert_pem, 0o644, force)
}

/// Writes `contents` to `path` with `mode` through a temporary file in the same directory;
/// without `force` an existing `path` is an error (checked atomically by linking).
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        if force {
            std::fs::rename(&tmp, path)
        } else {
            std::fs::hard_link(&tmp, path)
        }
        .with_context(|| format!("writing {}", path.display()))
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates_have_the_documented_shape() {
        use x509_parser::prelude::*;
        let ca = new_ca(30).unwrap();
        let node = issue("gw1", &ca.cert, &ca.key, 3650).unwrap();

        let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap();
        let (_, ca_x) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca_x.is_ca());
        let ca_bc = ca_x.basic_constraints().unwrap().unwrap();
        assert_eq!(ca_bc.value.path_len_constraint, Some(0));
        assert!(ca_x.subject().to_string().contains("egressd cluster CA"));

        let der = CertificateDer::from_pem_slice(node.cert.as_bytes()).unwrap();
        let (_, x) = X509Certificate::from_der(&der).unwrap();
        assert!(!x.is_ca());
        assert_eq!(crate::tls::dns_names(&der).unwrap(), vec!["gw1".to_owned()]);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(x.issuer(), ca_x.subject());
        // Clamped to the CA's expiry, not 3650 days.
        assert_eq!(
            x.validity().not_after.timestamp(),
            ca_x.validity().not_after.timestamp()
        );
        assert!(x.validity().not_before.timestamp() < OffsetDateTime::now_utc().unix_timestamp());
    }

    #[test]
    fn issue_picks_the_ca_of_its_key_from_a_bundle_and_refuses_bad_names() {
        let old = new_ca(30).unwrap();
        let new = new_ca(30).unwrap();
        let bundle = format!("{}{}", old.cert, new.cert);
        let node = issue("gw2", &bundle, &new.key, 10).unwrap();
        let der = CertificateDer::from_pem_slice(node.cert.as_bytes()).unwrap();
        let ca_der = CertificateDer::from_pem_slice(new.cert.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(&der).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            crate::tls::provider().signature_verification_algorithms.all,
        )
        .unwrap();

        let other = new_ca(30).unwrap();
        let e = issue("gw2", &old.cert, &other.key, 10).unwrap_err();
        assert!(format!("{e:#}").contains("belongs to the CA key"), "{e:#}");
        for bad in ["10.0.0.1", "", "a b"] {
            let e = issue(bad, &old.cert, &old.key, 10).unwrap_err();
            assert!(format!("{e:#}").contains("DNS name"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn files_are_written_private_and_never_overwritten_without_force() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let w = init_ca_dir(&ca_dir, 30, false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&w.key), 0o600);
        assert_eq!(mode(&w.cert), 0o644);
        let before = std::fs::read(&w.key).unwrap();
        let e = init_ca_dir(&ca_dir, 30, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(&w.key).unwrap(), before);
        init_ca_dir(&ca_dir, 30, true).unwrap();
        assert_ne!(std::fs::read(&w.key).unwrap(), before);
        assert_eq!(mode(&w.key), 0o600);

        let out = dir.path().join("nodes");
        let n = issue_to_dir("gw1", &ca_dir, &out, 30, false).unwrap();
        assert_eq!(n.cert, out.join("gw1.pem"));
        assert_eq!(n.key, out.join("gw1-key.pem"));
        assert_eq!(mode(&n.key), 0o600);
        assert!(issue_to_dir("gw1", &ca_dir, &out, 30, false).is_err());
        assert!(issue_to_dir("../x", &ca_dir, &out, 30, false).is_err());

        // A CA key others can read is refused too.
        std::fs::set_permissions(&w.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = issue_to_dir("gw2", &ca_dir, &out, 30, false).unwrap_err();
        assert!(format!("{e:#}").contains("chmod 600"), "{e:#}");
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }
}
