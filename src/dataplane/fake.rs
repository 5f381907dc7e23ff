//! In-memory stand-ins for the kernel, so that the reconciler's behaviour is tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::fence::Fence;
use super::{Announcer, Error, Firewall, Host, HostInterface, HostState, Result, Roles};
use crate::lease::Time;
use crate::policy::SnatMap;

/// What the reconciler asked of the fake, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddAddress(String, IpAddr),
    DelAddress(String, IpAddr),
    Announce(String, IpAddr),
    Snat(usize),
    /// The gateways whose chains SNAT (active here).
    Roles(Vec<crate::policy::GwId>),
    /// The gateways whose chains redirect, with the member slot they redirect to.
    Redirects(Vec<(crate::policy::GwId, u16)>),
    /// The overlay was set up toward these members (`None`: removed).
    Overlay(Option<Vec<String>>),
    /// The fence's lease elements were written: these addresses are answered for.
    Lease(Vec<IpAddr>),
    BuildFence(Vec<IpAddr>),
    RemoveTable,
    RemoveFence,
}

/// One ordered record shared by a fake host and a fake firewall, so that tests see the order of
/// address and SNAT changes relative to each other.
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Op>>>);

impl Journal {
    fn push(&self, op: Op) {
        if let Ok(mut j) = self.0.lock() {
            j.push(op);
        }
    }

    pub fn ops(&self) -> Vec<Op> {
        self.0.lock().map(|j| j.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut j) = self.0.lock() {
            j.clear();
        }
    }
}

#[derive(Debug, Default)]
pub struct FakeHost {
    pub state: HostState,
    pub journal: Journal,
    pub overlay: Option<super::overlay::Overlay>,
    /// The overlay device's interface index as last made (a new one each time).
    pub overlay_index: u32,
}

impl FakeHost {
    /// Adds an up interface with the given addresses.
    pub fn with_interface(mut self, name: &str, addrs: &[(&str, u8)]) -> Self {
        let index = self.state.len() as u32 + 2;
        self.state.insert(
            name.to_string(),
            HostInterface {
                index,
                up: true,
                mac: Some([2, 0, 0, 0, 0, index as u8]),
                addresses: addrs
                    .iter()
                    .map(|(a, p)| (a.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), *p))
                    .collect(),
                tagged: Vec::new(),
            },
        );
        self
    }

    pub fn holds(&self, iface: &str, ip: IpAddr) -> bool {
        self.state
            .get(iface)
            .is_some_and(|i| i.addresses.iter().any(|(a, _)| *a == ip))
    }

    fn iface(&mut self, iface: &str) -> Result<&mut HostInterface> {
        self.state.get_mut(iface).ok_or_else(|| Error::Netlink {
            op: "fake",
            interface: iface.to_string(),
            detail: "no such interface".into(),
        })
    }
}

impl Host for FakeHost {
    async fn observe(&mut self) -> Result<HostState> {
        Ok(self.state.clone())
    }

    async fn add_address(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        self.journal.push(Op::AddAddress(iface.to_string(), ip));
        let i = self.iface(iface)?;
        if !i.addresses.iter().any(|(a, _)| *a == ip) {
            i.addresses.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            i.tagged.push(ip);
        }
        Ok(())
    }

    async fn del_address(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        self.journal.push(Op::DelAddress(iface.to_string(), ip));
        let i = self.iface(iface)?;
        i.addresses.retain(|(a, _)| *a != ip);
        i.tagged.retain(|a| *a != ip);
        Ok(())
    }

    /// As the real one: the device comes back with a new index each time.
    async fn set_overlay(
        &mut self,
        overlay: Option<&super::overlay::Overlay>,
    ) -> Result<Option<u32>> {
        self.journal.push(Op::Overlay(
            overlay.map(|o| o.peers.iter().map(|p| p.name.clone()).collect()),
        ));
        self.overlay = overlay.cloned();
        self.overlay_index += 1;
        Ok(overlay.map(|_| self.overlay_index))
    }
}

#[derive(Debug, Default)]
pub struct FakeFirewall {
    pub map: Option<SnatMap>,
    pub roles: Roles,
    pub journal: Journal,
}

impl Firewall for FakeFirewall {
    /// As the real one: the next apply installs everything (a full replace).
    fn forget(&mut self) {
        self.map = None;
        self.roles.clear();
    }

    async fn apply(&mut self, map: &Arc<SnatMap>, roles: &Roles) -> Result<()> {
        if self.map.as_ref() != Some(&**map) {
            self.journal.push(Op::Snat(map.len()));
            self.map = Some((**map).clone());
        }
        if self.roles != *roles {
            let active = |roles: &Roles| -> Vec<crate::policy::GwId> {
                roles
                    .iter()
                    .filter(|(_, r)| r.v4.is_some() || r.v6.is_some())
                    .map(|(id, _)| *id)
                    .collect()
            };
            let redirects = |roles: &Roles| -> Vec<(crate::policy::GwId, u16)> {
                roles
                    .iter()
                    .filter_map(|(id, r)| r.redirect.map(|s| (*id, s)))
                    .collect()
            };
            if active(&self.roles) != active(roles) || self.roles.is_empty() {
                self.journal.push(Op::Roles(active(roles)));
            }
            if redirects(&self.roles) != redirects(roles) {
                self.journal.push(Op::Redirects(redirects(roles)));
            }
            self.roles = roles.clone();
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        self.journal.push(Op::RemoveTable);
        self.map = None;
        self.roles.clear();
        Ok(())
    }
}

/// A fence that records what it was told; `leases` is what the kernel would answer for (until
/// each lease ends).
#[derive(Debug, Default)]
pub struct FakeFence {
    pub built: Option<(BTreeSet<IpAddr>, BTreeSet<String>)>,
    pub leases: BTreeMap<IpAddr, Time>,
    pub journal: Journal,
    /// Make the next write fail.
    pub fail_next: bool,
}

impl Fence for FakeFence {
    async fn rebuild(
        &mut self,
        managed: &BTreeSet<IpAddr>,
        devices: &BTreeSet<String>,
    ) -> Result<()> {
        self.journal
            .push(Op::BuildFence(managed.iter().copied().collect()));
        self.built = Some((managed.clone(), devices.clone()));
        self.leases.clear();
        Ok(())
    }

    async fn write(&mut self, leases: &BTreeMap<IpAddr, Time>) -> Result<()> {
        if std::mem::take(&mut self.fail_next) {
            return Err(Error::Nft {
                op: "fake",
                detail: "write failed".into(),
            });
        }
        let managed = self.built.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        let leases: BTreeMap<IpAddr, Time> = leases
            .iter()
            .filter(|(a, _)| managed.contains(*a))
            .map(|(a, t)| (*a, *t))
            .collect();
        let before: Vec<IpAddr> = self.leases.keys().copied().collect();
        let after: Vec<IpAddr> = leases.keys().copied().collect();
        if before != after {
            self.journal.push(Op::Lease(after));
        }
        self.leases = leases;
        Ok(())
    }

    fn built(&self) -> Option<&(BTreeSet<IpAddr>, BTreeSet<String>)> {
        self.built.as_ref()
    }

    async fn remove(&mut self) -> Result<()> {
        self.journal.push(Op::RemoveFence);
        self.built = None;
        self.leases.clear();
        Ok(())
    }
}

/// An announcer that records what it sent.
#[derive(Debug, Default)]
pub struct FakeAnnouncer {
    pub journal: Journal,
}

impl Announcer for FakeAnnouncer {
    fn announce(&mut self, name: &str, _iface: &HostInterface, ip: IpAddr) -> Result<()> {
        self.journal.push(Op::Announce(name.to_string(), ip));
        Ok(())
    }
}
