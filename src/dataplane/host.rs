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
