//! The edges that touch the kernel: nftables, addresses, announcements. Each sits behind a small
//! trait so that the reconciler runs the same against the kernel and against the in-memory fake.

pub mod announce;
pub mod fake;
pub mod host;
pub mod nfnl;
pub mod nft;
pub mod shard;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use serde::Serialize;

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
    /// Fence ARP and NDP: the kernel answers for an address of `managed` only while it is in
    /// `leased`, and only until `until` unless this is called again. A daemon that dies or
    /// hangs stops renewing, and its node stops answering for its VIPs when the lease runs out.
    fn lease(
        &mut self,
        managed: &BTreeSet<IpAddr>,
        leased: &BTreeSet<IpAddr>,
        until: Instant,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Delete egressd's tables (clean shutdown). Other tables are never touched.
    fn remove(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// One network interface as the host has it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostInterface {
    pub index: u32,
    /// Administratively up and with carrier.
    pub up: bool,
    pub mac: Option<[u8; 6]>,
    /// Addresses with their prefix length, in the kernel's order (primary first).
    pub addresses: Vec<(IpAddr, u8)>,
}

/// Every interface of the host by name.
pub type HostState = BTreeMap<String, HostInterface>;

/// The host's interfaces and addresses, and announcements on its LAN.
pub trait Host: Send {
    /// Reads every interface with its state and addresses.
    fn observe(&mut self) -> impl Future<Output = Result<HostState>> + Send;
    /// Adds `ip` as a host address (/32 or /128), idempotently.
    fn add_address(&mut self, iface: &str, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;
    /// Removes `ip` from `iface`; absent already is success.
    fn del_address(&mut self, iface: &str, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;
    /// Sends one gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6).
    fn announce(&mut self, iface: &str, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;
}
