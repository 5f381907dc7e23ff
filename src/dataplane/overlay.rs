//! Redirecting a standby's policy traffic to the active node: which node that is (pure, from the
//! committed state and this node's lease) and the overlay that carries the traffic there.
//!
//! The overlay is one VXLAN device (`egressd0`) whose underlay addresses are the members' peer
//! addresses, so it works wherever the peers reach each other (no shared LAN needed), carries
//! IPv4 and IPv6 alike, and a packet that arrived through it is recognised by its input
//! interface: it is never redirected again. Each member has a slot (its position among the
//! members by name), a MAC derived from its name (the device's own address on that member) and
//! a routing table `TABLE_BASE + slot` whose default routes go through the device to that
//! member's overlay gateway addresses (static neighbour entries, no ARP or NDP on the overlay).
//! An `ip rule` per member sends packets marked `REDIRECT | slot << 16` to its table; the
//! nftables gateway chains set that mark (see `nft.rs`), so that who the target is changes in
//! the same nftables transaction as the roles, never through routes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sha2::{Digest, Sha256};

use crate::model::Assignment;

/// The overlay device's name.
pub const DEVICE: &str = "egressd0";
/// Its VXLAN network identifier and UDP port (the IANA port).
pub const VNI: u32 = 0xe6e6;
pub const PORT: u16 = 4789;
/// VXLAN's encapsulation: outer IPv4 (20) or IPv6 (40), UDP (8), VXLAN (8), inner Ethernet (14).
pub fn overhead(local: IpAddr) -> u32 {
    if local.is_ipv4() { 50 } else { 70 }
}
/// Member `slot`'s routing table is `TABLE_BASE + slot`.
pub const TABLE_BASE: u32 = 0xe600;
/// The priority of egressd's `ip rule`s: before `main` (32766), after `local` (0).
pub const RULE_PRIORITY: u32 = 1000;
/// The packet mark bits egressd uses (the low 16 bits are left to others).
pub const MARK_MASK: u32 = 0xffff_0000;
/// Set with a member's slot: redirect to that member.
pub const REDIRECT: u32 = 0x8000_0000;
/// The conntrack mark bit of a connection this node redirected as a standby: should the node
/// take the gateway over while the connection goes on through it, its packets are dropped
/// rather than sent untranslated (the nat chain never sees the connection again).
pub const CT_REDIRECTED: u32 = 0x0100_0000;
/// More members than this get no slot (the overlay gateway addresses are one byte).
pub const MAX_SLOTS: usize = 250;

/// The mark that sends a packet to member `slot`.
pub fn redirect_mark(slot: u16) -> u32 {
    REDIRECT | (u32::from(slot) << 16)
}

/// Another member, as the overlay reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub slot: u16,
    /// Its peer address: where its VXLAN packets go.
    pub underlay: IpAddr,
    pub mac: [u8; 6],
}

impl Peer {
    /// The overlay gateway addresses of this member (link-local, never on any device: they only
    /// name the static neighbour entry that holds its MAC).
    pub fn gateway4(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, 230, self.slot as u8 + 1)
    }

    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xe6, self.slot + 1)
    }

    pub fn table(&self) -> u32 {
        TABLE_BASE + u32::from(self.slot)
    }

    pub fn mark(&self) -> u32 {
        redirect_mark(self.slot)
    }
}

/// The overlay this node builds: its own underlay address and MAC, and every other member that
/// can be a redirect target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub local: IpAddr,
    pub mac: [u8; 6],
    /// This node's own overlay gateway address, which the device carries: the kernel's source
    /// validation (`rp_filter`) refuses packets arriving on an interface without an IPv4 address.
    pub address4: Ipv4Addr,
    pub peers: Vec<Peer>,
}

/// A member's overlay MAC: locally administered, from its name, the same on every node.
pub fn mac_of(name: &str) -> [u8; 6] {
    let h = Sha256::digest(format!("egressd-overlay#{name}").as_bytes());
    [0x02, 0xe6, h[0], h[1], h[2], h[3]]
}

fn underlay(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// The overlay for node `me` among `members` (name → peer address, as committed). `None` when
/// `me` is not a member, its peer address is not an IP address and port, or it is beyond
/// `MAX_SLOTS`: then it redirects nothing. A member whose address is a host name or of the other family than ours, or beyond
/// `MAX_SLOTS`, is no redirect target.
pub fn overlay(me: &str, members: &BTreeMap<String, String>) -> Option<Overlay> {
    let local = underlay(members.get(me)?)?;
    let slot = members
        .keys()
        .position(|n| n == me)
        .filter(|s| *s < MAX_SLOTS)?;
    let peers = members
        .iter()
        .enumerate()
        .take(MAX_SLOTS)
        .filter(|(_, (name, _))| name.as_str() != me)
        .filter_map(|(slot, (name, addr))| {
            let underlay = underlay(addr).filter(|a| a.is_ipv4() == local.is_ipv4())?;
            Some(Peer {
                name: name.clone(),
                slot: slot as u16,
                underlay,
                mac: mac_of(name),
            })
        })
        .collect();
    Some(Overlay {
        local,
        mac: mac_of(me),
        address4: Peer {
            name: me.to_owned(),
            slot: slot as u16,
            underlay: local,
            mac: mac_of(me),
        }
        .gateway4(),
        peers,
    })
}

/// Where a standby sends `gateway`'s policy traffic: the slot of the member the committed
/// assignment names active, while this node's own lease lasts (`in_contact`; a node cut off
/// from the leader does not know who is active and drops instead). `None`: drop (no node is
/// active, it is this node without a lease for it yet, or the active node is not reachable
/// through the overlay).
pub fn redirect_target(
    gateway: &str,
    committed: &Assignment,
    me: &str,
    overlay: Option<&Overlay>,
    in_contact: bool,
) -> Option<u16> {
    if !in_contact {
        return None;
    }
    let active = committed.get(gateway)?;
    if active == me {
        return None;
    }
    overlay?
        .peers
        .iter()
        .find(|p| &p.name == active)
        .map(|p| p.slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> BTreeMap<String, String> {
        [
            ("gw1", "10.78.0.2:7480"),
            ("gw2", "10.78.0.3:7480"),
            ("gw3", "10.78.0.4:7480"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect()
    }

    fn assigned(g: &str, n: &str) -> Assignment {
        [(g.to_string(), n.to_string())].into_iter().collect()
    }

    #[test]
    fn slots_follow_the_member_names_and_skip_this_node() {
        let o = overlay("gw2", &members()).unwrap();
        assert_eq!(o.local, "10.78.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(o.mac, mac_of("gw2"));
        assert_eq!(o.address4, Ipv4Addr::new(169, 254, 230, 2));
        let names: Vec<(&str, u16)> = o.peers.iter().map(|p| (p.name.as_str(), p.slot)).collect();
        assert_eq!(names, [("gw1", 0), ("gw3", 2)]);
        // Every node computes the same slot and MAC for a member.
        let from_gw1 = overlay("gw1", &members()).unwrap();
        assert_eq!(from_gw1.peers[1], o.peers[1]);
        assert_eq!(o.peers[1].mark(), 0x8002_0000);
        assert_eq!(o.peers[1].table(), TABLE_BASE + 2);
        assert_eq!(o.peers[1].gateway4(), Ipv4Addr::new(169, 254, 230, 3));
    }

    #[test]
    fn no_overlay_without_an_address_of_ours_and_no_peer_of_the_other_family() {
        let mut m = members();
        assert_eq!(overlay("gw9", &m), None);
        m.insert("gw3".into(), "[fd00::4]:7480".into());
        m.insert("gw4".into(), "gw4.example:7480".into());
        let o = overlay("gw1", &m).unwrap();
        let names: Vec<&str> = o.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gw2"]);
        m.insert("gw1".into(), "gw1.example:7480".into());
        assert_eq!(overlay("gw1", &m), None);
    }

    #[test]
    fn the_target_is_the_committed_active_node_while_the_lease_lasts() {
        let o = overlay("gw2", &members());
        let o = o.as_ref();
        assert_eq!(
            redirect_target("g", &assigned("g", "gw3"), "gw2", o, true),
            Some(2)
        );
        // A failover committed: the target follows.
        assert_eq!(
            redirect_target("g", &assigned("g", "gw1"), "gw2", o, true),
            Some(0)
        );
        // Cut off from the leader: drop.
        assert_eq!(
            redirect_target("g", &assigned("g", "gw3"), "gw2", o, false),
            None
        );
        // Nobody active, or this node (not leased yet): drop.
        assert_eq!(
            redirect_target("g", &Assignment::new(), "gw2", o, true),
            None
        );
        assert_eq!(
            redirect_target("g", &assigned("g", "gw2"), "gw2", o, true),
            None
        );
        // Another gateway's assignment says nothing about this one.
        assert_eq!(
            redirect_target("h", &assigned("g", "gw3"), "gw2", o, true),
            None
        );
        // A node the overlay cannot reach, or no overlay at all: drop.
        assert_eq!(
            redirect_target("g", &assigned("g", "gw7"), "gw2", o, true),
            None
        );
        assert_eq!(
            redirect_target("g", &assigned("g", "gw3"), "gw2", None, true),
            None
        );
    }
}
