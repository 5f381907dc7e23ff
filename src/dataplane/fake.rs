//! In-memory stand-ins for the kernel, so that the reconciler's behaviour is tested without root.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Error, Firewall, Host, HostInterface, HostState, Result};
use crate::policy::SnatMap;

/// What the reconciler asked of the fake, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddAddress(String, IpAddr),
    DelAddress(String, IpAddr),
    Announce(String, IpAddr),
    Snat(usize),
    Lease(Vec<IpAddr>),
    RemoveTable,
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
        }
        Ok(())
    }

    async fn del_address(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        self.journal.push(Op::DelAddress(iface.to_string(), ip));
        self.iface(iface)?.addresses.retain(|(a, _)| *a != ip);
        Ok(())
    }

    async fn announce(&mut self, iface: &str, ip: IpAddr) -> Result<()> {
        self.journal.push(Op::Announce(iface.to_string(), ip));
        self.iface(iface).map(|_| ())
    }
}

#[derive(Debug, Default)]
pub struct FakeFirewall {
    pub map: Option<SnatMap>,
    pub leased: BTreeSet<IpAddr>,
    pub journal: Journal,
}

impl Firewall for FakeFirewall {
    async fn apply(&mut self, map: &SnatMap) -> Result<()> {
        if self.map.as_ref() != Some(map) {
            self.journal.push(Op::Snat(map.len()));
            self.map = Some(map.clone());
        }
        Ok(())
    }

    async fn lease(
        &mut self,
        _managed: &BTreeSet<IpAddr>,
        leased: &BTreeSet<IpAddr>,
        until: Instant,
    ) -> Result<()> {
        let leased = if until > Instant::now() {
            leased.clone()
        } else {
            BTreeSet::new()
        };
        if leased != self.leased {
            self.journal
                .push(Op::Lease(leased.iter().copied().collect()));
            self.leased = leased.clone();
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        self.journal.push(Op::RemoveTable);
        self.map = None;
        self.leased.clear();
        Ok(())
    }
}
