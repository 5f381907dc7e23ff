//! The edges that touch the kernel: nftables, addresses, announcements. Each sits behind a small
//! trait so that the reconciler runs the same against the kernel and against the in-memory fake.

pub mod nft;

use crate::policy::SnatMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nft {op} failed: {detail}")]
    Nft { op: &'static str, detail: String },
    #[error("{op} on interface {interface}: {detail}")]
    Netlink {
        op: &'static str,
        interface: String,
        detail: String,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// egressd's own nftables table: the SNAT map and the rule that uses it.
pub trait Firewall: Send {
    /// Make the kernel's SNAT map equal `map`. The first call (and the first after an error)
    /// replaces any stale egressd table in one transaction; later calls change only the
    /// elements that differ, also in one transaction.
    fn apply(&mut self, map: &SnatMap) -> impl Future<Output = Result<()>> + Send;
    /// Delete egressd's table (clean shutdown). Other tables are never touched.
    fn remove(&mut self) -> impl Future<Output = Result<()>> + Send;
}
