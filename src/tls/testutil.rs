//! Test helpers: a throw-away cluster CA and node files in a temporary directory.

use std::path::{Path, PathBuf};

use super::TlsFiles;
use super::pki::{self, Pem};

/// A CA with its files in a temporary directory.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: Pem,
}

impl TestPki {
    pub fn new() -> Self {
        TestPki {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: pki::new_ca(30).expect("CA"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `node`'s certificate and writes `<prefix>ca.pem`, `<prefix>NODE.pem`,
    /// `<prefix>NODE-key.pem` (0600).
    pub fn node(&self, node: &str) -> TlsFiles {
        self.node_with_prefix(node, "")
    }

    pub fn node_with_prefix(&self, node: &str, prefix: &str) -> TlsFiles {
        let issued = pki::issue(node, &self.ca.cert, &self.ca.key, 10).expect("issue");
        let files = TlsFiles {
            ca_file: self.path(&format!("{prefix}ca.pem")),
            cert_file: self.path(&format!("{prefix}{node}.pem")),
            key_file: self.path(&format!("{prefix}{node}-key.pem")),
        };
        write(&files.ca_file, &self.ca.cert, 0o644);
        write(&files.cert_file, &issued.cert, 0o644);
        write(&files.key_file, &issued.key, 0o600);
        files
    }
}

pub fn write(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
