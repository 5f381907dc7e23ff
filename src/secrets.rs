//! The files a configuration names that hold secrets or identities — the admin token, the peer
//! TLS files, the admin endpoint's TLS files — read and checked as the daemon uses them, so
//! that `egressd check-config`, a start and a reload refuse the same problems with the same
//! messages. Secrets never reach a log line: [`AdminToken`]'s `Debug` shows only its length.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors};

/// Shortest accepted admin token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Largest admin token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// The admin API's bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(<{} characters>)", self.0.len())
    }
}

impl AdminToken {
    /// Reads the token from `path`: a regular file, not accessible to others (the owner and the
    /// group — `egressd` in the package — may read it), at least [`MIN_TOKEN_LEN`] characters
    /// after trimming whitespace.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(format!(
                "{shown} has mode {mode:04o}: others may access the admin token, so egressd \
                 refuses it; run `chmod o-rwx {shown}` (0600, or 0640 with group egressd)"
            ));
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        if text.len() as u64 > MAX_TOKEN_FILE {
            return Err(format!(
                "{shown} is larger than {MAX_TOKEN_FILE} bytes: not a token file"
            ));
        }
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token in {shown} is {} characters; at least {MIN_TOKEN_LEN} are required \
                 (e.g. `head -c 32 /dev/urandom | base64`)",
                token.len()
            ));
        }
        Ok(AdminToken(token.to_owned()))
    }

    /// Whether `given` is the token, compared in constant time (the time does not tell how
    /// much of a guess was right).
    pub fn matches(&self, given: &[u8]) -> bool {
        let a = self.0.as_bytes();
        a.len() == given.len() && a.iter().zip(given).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The token, for a client to send.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The admin token in force, replaced on SIGHUP (`None`: mutations are refused). Cheap to
/// clone; clones share it.
#[derive(Clone, Default, Debug)]
pub struct TokenCell(std::sync::Arc<std::sync::RwLock<Option<AdminToken>>>);

impl TokenCell {
    pub fn new(token: Option<AdminToken>) -> Self {
        TokenCell(std::sync::Arc::new(std::sync::RwLock::new(token)))
    }

    pub fn get(&self) -> Option<AdminToken> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, token: Option<AdminToken>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
    }
}

/// Every problem with the files `config` names, as `check-config` lists them: the peer TLS
/// files (readable, the key private, the certificate this node's and chaining to the CA), the
/// admin endpoint's certificate and key, the admin token. `file` names the config file.
pub fn check_files(config: &Config, file: &str) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    let mut push = |key: &str, message: String| {
        errors.push(ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        })
    };
    if let Some(files) = &config.cluster.tls
        && let Err(e) = crate::tls::TlsMaterial::load(files, &config.node.name)
    {
        push(tls_key(&e, "cluster.tls"), e.to_string());
    }
    if let Some(t) = &config.admin.tls {
        let files = crate::tls::admin::AdminTlsFiles {
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
        };
        if let Err(e) = crate::tls::admin::server_config(&files) {
            push(tls_key(&e, "admin.tls"), e.to_string());
        }
    }
    if let Some(path) = &config.admin.token_file
        && let Err(e) = AdminToken::load(path)
    {
        push("admin.token_file", e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The config key of the file a TLS error is about.
fn tls_key(e: &crate::tls::TlsError, section: &'static str) -> &'static str {
    use crate::tls::TlsError;
    let role = match e {
        TlsError::Read { role, .. } | TlsError::Invalid { role, .. } => *role,
        TlsError::KeyPermissions { .. } | TlsError::KeyMismatch { .. } => "private key file",
        TlsError::NotOurs { .. } => "certificate file",
        TlsError::BadNodeName { .. } | TlsError::Config { .. } => "",
    };
    match (section, role) {
        ("cluster.tls", "CA file") => "cluster.tls.ca_file",
        ("cluster.tls", "certificate file") => "cluster.tls.cert_file",
        ("cluster.tls", "private key file") => "cluster.tls.key_file",
        ("admin.tls", "certificate file") => "admin.tls.cert_file",
        ("admin.tls", "private key file") => "admin.tls.key_file",
        (s, _) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_private_long_enough_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  a-token-of-enough-characters\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let t = AdminToken::load(&path).unwrap();
        assert!(t.matches(b"a-token-of-enough-characters"));
        assert!(!t.matches(b"a-token-of-enough-characterS"));
        assert!(!t.matches(b"a-token"));
        assert!(!format!("{t:?}").contains("token-of"), "{t:?}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AdminToken::load(&path).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod o-rwx"), "{e}");

        std::fs::write(&path, "short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = AdminToken::load(&path).unwrap_err();
        assert!(
            e.contains("5 characters") && e.contains("at least 16"),
            "{e}"
        );

        let e = AdminToken::load(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn check_files_names_the_key_of_every_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::tls::testutil::TestPki::new();
        let files = pki.node("gw1");
        let key_mode = |mode| {
            std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(mode))
                .unwrap()
        };
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef-token\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o604)).unwrap();
        let text = format!(
            "[node]\nname = \"gw1\"\n[cluster]\nlisten = \"10.0.0.1:7480\"\npeers = [{{ name = \
             \"gw1\", address = \"10.0.0.1:7480\" }}, {{ name = \"gw2\", address = \
             \"10.0.0.2:7480\" }}]\n[cluster.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file \
             = \"{}\"\n[admin]\ntoken_file = \"{}\"\n[admin.tls]\ncert_file = \"{}\"\nkey_file = \
             \"{}\"\n",
            files.ca_file.display(),
            files.cert_file.display(),
            files.key_file.display(),
            token.display(),
            dir.path().join("no-cert.pem").display(),
            files.key_file.display(),
        );
        let config = crate::config::parse_str(&text, "test.toml").unwrap();
        key_mode(0o640);
        let e = check_files(&config, "test.toml").unwrap_err();
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cluster.tls.key_file",
                "admin.tls.cert_file",
                "admin.token_file"
            ],
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        key_mode(0o600);
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_files(&config, "test.toml").unwrap_err();
        assert_eq!(e.len(), 1, "{e}");
        assert!(e.to_string().contains("no-cert.pem"), "{e}");
    }
}
