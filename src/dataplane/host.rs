//! Interfaces and addresses through rtnetlink, announcements through raw sockets, and a watch on
//! link and address events so that a change on the host is acted on at once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use futures::stream::StreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{Handle, MulticastGroup};

use super::overlay::{self, Overlay};
use super::{ADDRESS_PROTOCOL, Error, Host, HostInterface, HostState, Result};

/// The kernel's view of this host, through one rtnetlink connection.
pub struct NetlinkHost {
    handle: Handle,
    /// Interface index and MAC of the interfaces seen by the last `observe`, for the calls that
    /// name an interface.
    links: BTreeMap<String, (u32, Option<[u8; 6]>)>,
}

impl NetlinkHost {
    /// Opens the rtnetlink connection; its driver runs as a tokio task.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Io {
            op: "opening rtnetlink socket",
            source,
        })?;
        tokio::spawn(conn);
        Ok(NetlinkHost {
            handle,
            links: BTreeMap::new(),
        })
    }

    fn link(&self, op: &'static str, iface: &str) -> Result<(u32, Option<[u8; 6]>)> {
        self.links
            .get(iface)
            .copied()
            .ok_or_else(|| Error::Netlink {
                op,
                interface: iface.to_string(),
                detail: "no such interface".into(),
            })
    }
}

fn nl_err(op: &'static str, iface: &str) -> impl FnOnce(rtnetlink::Error) -> Error {
    let interface = iface.to_string();
    move |e| Error::Netlink {
        op,
        interface,
        detail: e.to_string(),
    }
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

impl Host for NetlinkHost {
    fn learn(&mut self, state: &HostState) {
        self.links = state
            .iter()
            .map(|(n, i)| (n.clone(), (i.index, i.mac)))
            .collect();
    }

    async fn observe(&mut self) -> Result<HostState> {
        let mut state = HostState::new();
        let mut by_index = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(nl_err("listing links", "*"))?
        {
            let mut name = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Address(a) if a.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(a);
                        mac = Some(m);
                    }
                    _ => {}
                }
            }
            let Some(name) = name else { continue };
            let flags = msg.header.flags;
            // Administratively up and with carrier: a cut cable or a peer that went away clears
            // LOWER_UP even while the interface stays configured up.
            let up = flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp);
            by_index.insert(msg.header.index, name.clone());
            state.insert(
                name,
                HostInterface {
                    index: msg.header.index,
                    up,
                    mac,
                    addresses: Vec::new(),
                    tagged: Vec::new(),
                },
            );
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(nl_err("listing addresses", "*"))?
        {
            let Some(name) = by_index.get(&msg.header.index) else {
                continue;
            };
            // IFA_LOCAL is the interface's own address on point-to-point links, IFA_ADDRESS
            // otherwise; prefer LOCAL when present.
            let mut ip = None;
            let mut ours = false;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(a) => ip = Some(*a),
                    AddressAttribute::Address(a) if ip.is_none() => ip = Some(*a),
                    AddressAttribute::Protocol(p) => ours = u8::from(*p) == ADDRESS_PROTOCOL,
                    _ => {}
                }
            }
            if let (Some(ip), Some(iface)) = (ip, state.get_mut(name)) {
                iface.addresses.push((ip, msg.header.prefix_len));
                if ours {
                    iface.tagged.push(ip);
                }
            }
        }
        self.links = state
            .iter()
            .map(|(n, i)| (n.clone(), (i.index, i.mac)))
            .collect();
        Ok(state)
    }

    async fn add_address(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        let (index, _) = self.link("adding address", iface)?;
        let mut req = self
            .handle
            .address()
            .add(index, ip, host_prefix(ip))
            .replace();
        let msg = req.message_mut();
        // Tagged, so that a later run finds egressd's addresses whatever its configuration
        // says by then (kernels before 6.1 ignore the attribute).
        msg.attributes
            .push(AddressAttribute::Protocol(ADDRESS_PROTOCOL.into()));
        if ip.is_ipv6() {
            // Duplicate address detection would keep the VIP tentative (unusable) for a second.
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(nl_err("adding address", iface))
    }

    async fn set_overlay(&mut self, want: Option<&Overlay>) -> Result<Option<u32>> {
        // The device goes first and comes back with everything on it (forwarding entries,
        // neighbours and routes go with a device): what a crashed or older run left is
        // replaced, never added to. The rules stay in place throughout, and the catch-all
        // rule after them means a redirect-marked packet without its route is dropped, never
        // routed by `main` with the client's address.
        if let Some(index) = self.overlay_index().await? {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(nl_err("deleting the overlay device", overlay::DEVICE))?;
        }
        match want {
            Some(o) => {
                self.set_rules(Some(o)).await?;
                self.build_overlay(o).await?;
                self.overlay_index().await
            }
            None => self.set_rules(None).await.map(|()| None),
        }
    }

    async fn del_address(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        let (index, _) = self.link("removing address", iface)?;
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(ip)
            .execute();
        let mut msgs: Vec<AddressMessage> = Vec::new();
        while let Some(m) = found
            .next()
            .await
            .transpose()
            .map_err(nl_err("looking up address", iface))?
        {
            msgs.push(m);
        }
        for m in msgs {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                // Already gone (e.g. removed by someone else in between): the goal is met.
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::EADDRNOTAVAIL || e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(nl_err("removing address", iface)(e)),
            }
        }
        Ok(())
    }
}

/// The protocol egressd tags its routes and rules with (`ip rule` prints it as `proto 230`), so
/// that a later run finds them.
const ROUTE_PROTOCOL: u8 = ADDRESS_PROTOCOL;

/// One of egressd's `ip rule`s: the family, the mark it matches (`None`: the catch-all for any
/// redirect mark) and the table it looks up.
type OverlayRule = (bool, u32, Option<u32>);

impl NetlinkHost {
    async fn overlay_index(&self) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(overlay::DEVICE.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(m)) => Ok(Some(m.header.index)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err("looking up the overlay device", overlay::DEVICE)(e)),
        }
    }

    /// The VXLAN device, its forwarding entries, the static neighbours of the members' overlay
    /// gateways and each member's routing table.
    async fn build_overlay(&self, o: &Overlay) -> Result<()> {
        use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
        let dev = overlay::DEVICE;
        let mut link = rtnetlink::LinkVxlan::new(dev, overlay::VNI)
            .port(overlay::PORT)
            .learning(false);
        link = match o.local {
            IpAddr::V4(a) => link.local(a),
            IpAddr::V6(a) => link.local6(a),
        };
        let mtu = self.underlay_mtu(o.local).await? - overlay::overhead(o.local);
        let msg = link.address(o.mac.to_vec()).mtu(mtu).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err("creating the overlay device", dev))?;
        let index = self.overlay_index().await?.ok_or_else(|| Error::Netlink {
            op: "creating the overlay device",
            interface: dev.to_string(),
            detail: "created, but not found".into(),
        })?;
        // Not tagged as egressd's (`ADDRESS_PROTOCOL`): those are VIPs, released when unwanted.
        self.handle
            .address()
            .add(index, IpAddr::V4(o.address4), 32)
            .execute()
            .await
            .map_err(nl_err("adding the overlay address", dev))?;
        // Redirected packets arrive from the client's address, whose route is not the overlay.
        let rp = format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter");
        std::fs::write(&rp, "2").map_err(|source| Error::Io {
            op: "setting the overlay's rp_filter to loose",
            source,
        })?;
        for p in &o.peers {
            let neigh = self.handle.neighbours();
            neigh
                .add_bridge(index, &p.mac)
                .destination(p.underlay)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err("adding an overlay forwarding entry", dev))?;
            for gw in [IpAddr::V4(p.gateway4()), IpAddr::V6(p.gateway6())] {
                neigh
                    .add(index, gw)
                    .link_layer_address(&p.mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl_err("adding an overlay neighbour", dev))?;
            }
            let protocol = rtnetlink::packet_route::route::RouteProtocol::Other(ROUTE_PROTOCOL);
            let v4 = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(p.table())
                .output_interface(index)
                .gateway(p.gateway4())
                .protocol(protocol)
                .onlink()
                .build();
            let v6 = rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(p.table())
                .output_interface(index)
                .gateway(p.gateway6())
                .protocol(protocol)
                .onlink()
                .build();
            for route in [v4, v6] {
                self.handle
                    .route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl_err("adding an overlay route", dev))?;
            }
        }
        Ok(())
    }

    /// The MTU of the interface that holds `local` (1500 when none does: the device then gets
    /// the usual VXLAN MTU).
    async fn underlay_mtu(&self, local: IpAddr) -> Result<u32> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_address_filter(local)
            .execute();
        let Some(a) = addrs
            .try_next()
            .await
            .map_err(nl_err("looking up the underlay address", "*"))?
        else {
            return Ok(1500);
        };
        let mut links = self
            .handle
            .link()
            .get()
            .match_index(a.header.index)
            .execute();
        let link = links
            .try_next()
            .await
            .map_err(nl_err("looking up the underlay interface", "*"))?;
        Ok(link
            .and_then(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
            })
            .unwrap_or(1500))
    }

    /// egressd's rules now in the kernel, with the message each was listed as.
    async fn list_rules(
        &self,
    ) -> Result<Vec<(OverlayRule, rtnetlink::packet_route::rule::RuleMessage)>> {
        use rtnetlink::packet_route::route::RouteProtocol;
        use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
        let mut out = Vec::new();
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let v4 = matches!(version, rtnetlink::IpVersion::V4);
            let mut rules = self.handle.rule().get(version).execute();
            while let Some(m) = rules
                .try_next()
                .await
                .map_err(nl_err("listing rules", "*"))?
            {
                let mut ours = false;
                let mut mark = None;
                let mut table = u32::from(m.header.table);
                for a in &m.attributes {
                    match a {
                        RuleAttribute::Protocol(RouteProtocol::Other(p))
                            if *p == ROUTE_PROTOCOL =>
                        {
                            ours = true
                        }
                        RuleAttribute::FwMark(v) => mark = Some(*v),
                        RuleAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                if !ours {
                    continue;
                }
                let key = match (m.header.action, mark) {
                    (RuleAction::ToTable, Some(mark)) => (v4, mark, Some(table)),
                    (_, mark) => (v4, mark.unwrap_or(0), None),
                };
                out.push((key, m));
            }
        }
        Ok(out)
    }

    /// Makes egressd's rules: per member, its redirect mark to its table; per family, every
    /// other redirect mark to nowhere. New rules are added before stale ones go, so that a
    /// redirect-marked packet always meets one.
    async fn set_rules(&self, o: Option<&Overlay>) -> Result<()> {
        use rtnetlink::packet_route::route::RouteProtocol;
        use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
        let mut want: Vec<OverlayRule> = Vec::new();
        if let Some(o) = o {
            for v4 in [true, false] {
                for p in &o.peers {
                    want.push((v4, p.mark(), Some(p.table())));
                }
                want.push((v4, overlay::REDIRECT, None));
            }
        }
        let have = self.list_rules().await?;
        for rule in want.iter().filter(|w| !have.iter().any(|(h, _)| h == *w)) {
            let (v4, mark, table) = *rule;
            let req = self.handle.rule().add();
            let mut msg = if v4 {
                let mut r = req.v4().fw_mark(mark);
                std::mem::take(r.message_mut())
            } else {
                let mut r = req.v6().fw_mark(mark);
                std::mem::take(r.message_mut())
            };
            let (mask, priority, action) = match table {
                Some(t) => {
                    msg.attributes.push(RuleAttribute::Table(t));
                    (
                        overlay::MARK_MASK,
                        overlay::RULE_PRIORITY,
                        RuleAction::ToTable,
                    )
                }
                None => (
                    overlay::REDIRECT,
                    overlay::RULE_PRIORITY + 1,
                    RuleAction::Blackhole,
                ),
            };
            msg.header.action = action;
            msg.header.table = 0;
            msg.attributes.extend([
                RuleAttribute::FwMask(mask),
                RuleAttribute::Priority(priority),
                RuleAttribute::Protocol(RouteProtocol::Other(ROUTE_PROTOCOL)),
            ]);
            let mut req = self.handle.rule().add();
            *req.message_mut() = msg;
            req.execute()
                .await
                .map_err(nl_err("adding an overlay rule", overlay::DEVICE))?;
        }
        for (key, msg) in have {
            if want.contains(&key) {
                continue;
            }
            match self.handle.rule().del(msg).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
                Err(e) => return Err(nl_err("removing an overlay rule", overlay::DEVICE)(e)),
            }
        }
        Ok(())
    }
}

/// Link and address events, for waking the reconciler.
pub struct HostEvents {
    rx: UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl HostEvents {
    pub fn subscribe() -> Result<Self> {
        let (conn, _handle, rx) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(|source| Error::Io {
            op: "subscribing to rtnetlink link and address events",
            source,
        })?;
        tokio::spawn(conn);
        Ok(HostEvents { rx })
    }

    /// Waits for the next event; `None` when the event socket is gone.
    pub async fn next(&mut self) -> Option<()> {
        self.rx.next().await.map(|_| ())
    }
}
