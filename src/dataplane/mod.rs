//! The edges that touch the kernel: nftables, addresses, announcements. Each sits behind a small
//! trait so that the reconciler runs the same against the kernel and against the in-memory fake.

pub mod announce;
pub mod conntrack;
pub mod ctsync;
pub mod fake;
pub mod fence;
pub mod host;
pub mod nfnl;
pub mod nft;
pub mod overlay;
pub mod runner;
pub mod shard;
pub mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;

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

/// What a gateway's chains do on this node: SNAT to these addresses (it is active here), or
/// else redirect to the member of this overlay slot (`overlay::redirect_target`), or else drop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Role {
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
    pub redirect: Option<u16>,
}

/// Every gateway's role on this node.
pub type Roles = BTreeMap<crate::policy::GwId, Role>;

/// egressd's own nftables table: the classification maps and the gateways' chains.
pub trait Firewall: Send {
    /// Make the kernel's classification maps equal `map` and the gateways' chains do `roles`
    /// (every gateway that exists, active here or not). The first call (and the first after
    /// an error) replaces any stale egressd table; later calls change only the elements that
    /// differ, in one transaction, and the chains whose role changed, in one more.
    fn apply(
        &mut self,
        map: &std::sync::Arc<SnatMap>,
        roles: &Roles,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Delete egressd's tables (clean shutdown). Other tables are never touched.
    fn remove(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// What the kernel should hold after the last successful `apply`, for the watcher's check
    /// (`None`: not known, or nothing to check).
    fn manifest(&self) -> Option<watch::Manifest> {
        None
    }
    /// The kernel's state is not known any more (changed from outside): the next `apply`
    /// replaces everything.
    fn forget(&mut self) {}
    /// What the gateway chains did with packets, per gateway and action (none when the
    /// firewall keeps no counters).
    fn gateway_counters(&self) -> impl Future<Output = Result<nft::GatewayCounters>> + Send {
        async { Ok(nft::GatewayCounters::new()) }
    }
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
    /// The addresses egressd added (tagged with its address protocol, `ADDRESS_PROTOCOL`), also
    /// those a crashed run left behind.
    pub tagged: Vec<IpAddr>,
}

/// The address protocol (`IFA_PROTO`, as `ip address show` prints `proto`) egressd tags the
/// addresses it adds with, so that a later run finds them whatever the configuration says now.
pub const ADDRESS_PROTOCOL: u8 = 0xe6;

/// Every interface of the host by name.
pub type HostState = BTreeMap<String, HostInterface>;

/// The host's interfaces and addresses, and announcements on its LAN.
pub trait Host: Send {
    /// Reads every interface with its state and addresses.
    fn observe(&mut self) -> impl Future<Output = Result<HostState>> + Send;
    /// Takes what another reader observed (interface indexes) without asking the kernel.
    fn learn(&mut self, _state: &HostState) {}
    /// Adds `ip` as a host address (/32 or /128), idempotently.
    fn add_address(&mut self, iface: &str, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;
    /// Removes `ip` from `iface`; absent already is success.
    fn del_address(&mut self, iface: &str, ip: IpAddr) -> impl Future<Output = Result<()>> + Send;
    /// Makes the redirect overlay (device, forwarding entries, routes, rules) match `overlay`,
    /// replacing whatever an earlier run left; `None` removes all of it. Returns the device's
    /// interface index, when there is one.
    fn set_overlay(
        &mut self,
        overlay: Option<&overlay::Overlay>,
    ) -> impl Future<Output = Result<Option<u32>>> + Send;
}

/// Gratuitous ARP and unsolicited neighbour advertisements.
pub trait Announcer: Send {
    /// Sends one gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6) for `ip`
    /// on `iface` (named `name`).
    fn announce(&mut self, name: &str, iface: &HostInterface, ip: IpAddr) -> Result<()>;
}

/// The real announcer: raw sockets (see `announce.rs`).
#[derive(Debug, Default)]
pub struct RawAnnouncer;

impl Announcer for RawAnnouncer {
    fn announce(&mut self, _name: &str, iface: &HostInterface, ip: IpAddr) -> Result<()> {
        let Some(mac) = iface.mac else {
            // No link-layer address (e.g. a tun device): nothing to announce on.
            return Ok(());
        };
        match ip {
            IpAddr::V4(v4) => announce::send_garp(iface.index, mac, v4),
            IpAddr::V6(v6) => announce::send_na(iface.index, mac, v6),
        }
    }
}
