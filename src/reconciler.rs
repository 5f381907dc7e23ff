//! From a committed assignment to the data plane: which addresses this node must hold and which
//! traffic it must SNAT (pure `plan`), and the ordered changes that get the host there
//! (`Reconciler::converge`).
//!
//! Order matters on both edges. On takeover the SNAT map is installed before the address is
//! added and announced, so that no attracted packet leaves un-SNATed. On release the address is
//! removed before the map shrinks, so that traffic stops arriving first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use imbl::OrdMap;
use serde::Serialize;
use tracing::{info, warn};

use crate::dataplane::overlay::{self, Overlay};
use crate::dataplane::{self, Firewall, Host, HostState, Role, Roles};
use crate::metrics::Metrics;
use crate::model::{Assignment, Gateway, InterfaceState, Labels, NodeState, Policy, SourceIp};
use crate::policy::{self, GwId, SnatMap};

/// Addresses egressd may add or remove: every VIP and next hop of the configured gateways.
/// Anything else on the host is never touched.
pub fn managed_addresses(gateways: &[Gateway]) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for g in gateways {
        if let SourceIp::VirtualIp { ip, .. } = &g.source_ip {
            out.insert(*ip);
        }
        if let Some(nh) = &g.next_hop {
            out.insert(nh.ip);
        }
    }
    out
}

/// The primary IPv4 of an interface: its first IPv4 address that egressd does not manage.
fn primary_ipv4(addrs: &[(IpAddr, u8)], managed: &BTreeSet<IpAddr>) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|(a, _)| match a {
        IpAddr::V4(v4) if !managed.contains(a) => Some(*v4),
        _ => None,
    })
}

/// This node's election facts, read off the host.
pub fn local_node_state(
    name: &str,
    labels: &Labels,
    cordoned: bool,
    ready: bool,
    host: &HostState,
    managed: &BTreeSet<IpAddr>,
) -> NodeState {
    NodeState {
        name: name.to_string(),
        labels: labels.clone(),
        cordoned,
        alive: true,
        ready,
        interfaces: host
            .iter()
            .map(|(n, i)| {
                (
                    n.clone(),
                    InterfaceState {
                        up: i.up,
                        primary_ipv4: primary_ipv4(&i.addresses, managed),
                    },
                )
            })
            .collect(),
    }
}

/// What the data plane of one node must look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// (interface, address) pairs to hold.
    pub addresses: BTreeSet<(String, IpAddr)>,
    /// Gateway → the source address its traffic is SNATed to, for the gateways active here.
    pub sources: BTreeMap<String, IpAddr>,
    /// The classification of every node (it does not depend on who is active where).
    pub snat: Arc<SnatMap>,
    /// Every gateway's role here: SNAT to its source address when active, else redirect to the
    /// active node or drop.
    pub roles: Roles,
    /// The overlay standbys redirect through (`None`: this node is not a member with an IP
    /// peer address; it redirects nothing).
    pub overlay: Option<Overlay>,
}

/// What the plan is made of: the committed objects, with the version they come from.
pub struct Objects<'a> {
    pub version: u64,
    pub gateways: &'a [Gateway],
    pub policies: &'a OrdMap<String, Arc<Policy>>,
    /// The committed assignment (who is active for each gateway, as the cluster decided).
    pub committed: &'a Assignment,
    /// The members and their peer addresses.
    pub members: &'a BTreeMap<String, String>,
    /// Whether this node's lease as a member lasts (`NodeLease::in_contact`).
    pub in_contact: bool,
}

/// The data plane this node needs for `assignment` (the gateways it holds a lease for). A
/// PrimaryIP gateway whose interface has no IPv4 address gets no SNAT (the election does not
/// pick such a node, but the host may change between the election and this call). Every other
/// gateway redirects to the node the committed assignment names (`overlay::redirect_target`).
pub fn plan(
    node: &str,
    assignment: &Assignment,
    objects: &Objects,
    host: &HostState,
    managed: &BTreeSet<IpAddr>,
    compiler: &mut policy::Compiler,
) -> Desired {
    let gateways = objects.gateways;
    let mut d = Desired {
        overlay: overlay::overlay(node, objects.members),
        ..Desired::default()
    };
    for g in gateways {
        let mut role = Role::default();
        let held = assignment.get(&g.name).map(String::as_str) == Some(node);
        if !held {
            role.redirect = overlay::redirect_target(
                &g.name,
                objects.committed,
                node,
                d.overlay.as_ref(),
                objects.in_contact,
            );
        }
        if held {
            let source = match &g.source_ip {
                SourceIp::VirtualIp { ip, interfaces } => {
                    for i in interfaces {
                        d.addresses.insert((i.clone(), *ip));
                    }
                    Some(*ip)
                }
                SourceIp::PrimaryIp { interface } => host
                    .get(interface)
                    .and_then(|i| primary_ipv4(&i.addresses, managed))
                    .map(IpAddr::V4),
            };
            if let Some(ip) = source {
                d.sources.insert(g.name.clone(), ip);
                match ip {
                    IpAddr::V4(a) => role.v4 = Some(a),
                    IpAddr::V6(a) => role.v6 = Some(a),
                }
            }
            if let Some(nh) = &g.next_hop {
                d.addresses.insert((nh.interface.clone(), nh.ip));
            }
        }
        d.roles.insert(GwId::of(&g.name), role);
    }
    let names: BTreeSet<String> = gateways.iter().map(|g| g.name.clone()).collect();
    d.snat = compiler.update(objects.policies, &names);
    d
}

/// What one convergence did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub added: Vec<(String, IpAddr)>,
    pub removed: Vec<(String, IpAddr)>,
    pub snat_changed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && !self.snat_changed
    }
}

/// Drives a host and a firewall to a `Desired` state. Answering for the addresses (the fence)
/// and announcing them is the lease task's: it does so once `converge` reports them in place.
pub struct Reconciler<H, F> {
    pub host: H,
    pub firewall: F,
    installed: Option<(Arc<SnatMap>, Roles)>,
    /// The overlay as last set up (outer `None`: not known, set it up again).
    overlay: Option<Option<Overlay>>,
    /// The overlay device's interface index as set up, and whether an observation of the host
    /// has shown it since: one that then lacks it means it was deleted from outside.
    overlay_device: Option<(u32, bool)>,
    /// Addresses this process added, so that they are released even if the config that named
    /// them is gone.
    held: BTreeSet<(String, IpAddr)>,
    /// Where nftables applies are counted.
    pub metrics: Arc<Metrics>,
}

impl<H: Host, F: Firewall> Reconciler<H, F> {
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn new(host: H, firewall: F) -> Self {
        Reconciler {
            host,
            firewall,
            installed: None,
            overlay: None,
            overlay_device: None,
            held: BTreeSet::new(),
            metrics: Arc::default(),
        }
    }

    pub fn held(&self) -> &BTreeSet<(String, IpAddr)> {
        &self.held
    }

    pub fn installed(&self) -> Option<&SnatMap> {
        self.installed.as_ref().map(|(m, _)| &**m)
    }

    /// The firewall was changed from outside: the next `converge` installs everything again.
    /// The overlay is no nftables object and stays: rebuilding it deleted its device, which
    /// took most of a 1 000-policy repair (~50 of ~85 ms) and dropped every redirect in flight.
    pub fn forget(&mut self) {
        self.installed = None;
        self.firewall.forget();
    }

    /// Makes the host match `desired`. `host` is a fresh observation; `managed` are the
    /// addresses egressd may remove (besides those it tagged as its own). Stops at the first
    /// error (the next round retries).
    pub async fn converge(
        &mut self,
        desired: &Desired,
        host: &HostState,
        managed: &BTreeSet<IpAddr>,
    ) -> dataplane::Result<Changes> {
        let mut changes = Changes::default();

        // 1. Release: managed, tagged or held addresses present but not wanted. The lease task
        //    stopped answering for them before the lease was gone from `desired`.
        let mut to_remove = Vec::new();
        for (name, iface) in host {
            for (ip, _) in &iface.addresses {
                let key = (name.clone(), *ip);
                let ours =
                    managed.contains(ip) || iface.tagged.contains(ip) || self.held.contains(&key);
                if ours && !desired.addresses.contains(&key) {
                    to_remove.push(key);
                }
            }
        }
        for (iface, ip) in to_remove {
            self.host.del_address(&iface, ip).await?;
            self.held.remove(&(iface.clone(), ip));
            changes.removed.push((iface, ip));
        }
        // Held addresses whose interface disappeared are gone with it.
        self.held.retain(|(i, _)| host.contains_key(i));

        // 2. The overlay before the roles that redirect into it (they name its members' slots).
        //    It changes with the members, and is set up again when its device was deleted from
        //    outside (its routes and neighbours went with it). Observations from before the
        //    device was made do not count: only one that showed it, then one without it.
        if let Some((index, seen)) = &mut self.overlay_device {
            match host.get(overlay::DEVICE) {
                Some(i) if i.index == *index => *seen = true,
                _ if *seen => {
                    warn!(
                        device = overlay::DEVICE,
                        "the redirect overlay's device was deleted or replaced from outside; \
                         setting the overlay up again"
                    );
                    self.overlay = None;
                }
                _ => {}
            }
        }
        if self.overlay.as_ref() != Some(&desired.overlay) {
            self.overlay = None;
            self.overlay_device = None;
            let index = self.host.set_overlay(desired.overlay.as_ref()).await?;
            self.overlay_device = index.map(|i| (i, false));
            match &desired.overlay {
                Some(o) => info!(
                    local = %o.local,
                    peers = ?o.peers.iter().map(|p| (&p.name, p.slot)).collect::<Vec<_>>(),
                    "redirect overlay set up"
                ),
                None => info!("no redirect overlay (not a member with an IP peer address)"),
            }
            self.overlay = Some(desired.overlay.clone());
        }

        // 3. Classification and roles (for a takeover or a release, only the gateway's chain).
        let same = self.installed.as_ref().is_some_and(|(m, r)| {
            (Arc::ptr_eq(m, &desired.snat) || **m == *desired.snat) && *r == desired.roles
        });
        if !same {
            self.installed = None;
            let started = Instant::now();
            if let Err(e) = self.firewall.apply(&desired.snat, &desired.roles).await {
                self.metrics.nft_apply_errors.inc();
                return Err(e);
            }
            self.metrics
                .nft_apply
                .observe(started.elapsed().as_secs_f64());
            self.installed = Some((desired.snat.clone(), desired.roles.clone()));
            changes.snat_changed = true;
        }

        // 4. Take over: add missing addresses (after their SNAT, so that no attracted packet
        //    leaves un-SNATed).
        for (iface, ip) in &desired.addresses {
            let present = host
                .get(iface)
                .is_some_and(|i| i.addresses.iter().any(|(a, _)| a == ip));
            if !present {
                self.host.add_address(iface, *ip).await?;
                changes.added.push((iface.clone(), *ip));
            }
            self.held.insert((iface.clone(), *ip));
        }
        Ok(changes)
    }

    /// Clean shutdown: give up every held address, then delete egressd's SNAT table.
    pub async fn release_all(&mut self) -> dataplane::Result<()> {
        let held: Vec<_> = self.held.iter().cloned().collect();
        let mut first_err = None;
        for (iface, ip) in held {
            match self.host.del_address(&iface, ip).await {
                Ok(()) => {
                    self.held.remove(&(iface.clone(), ip));
                    info!(interface = %iface, %ip, "released address");
                }
                Err(e) => {
                    warn!(interface = %iface, %ip, error = %e, "could not release address");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.firewall.remove().await {
            first_err.get_or_insert(e);
        }
        // After the table: no rule marks packets for routes that are gone.
        if let Err(e) = self.host.set_overlay(None).await {
            first_err.get_or_insert(e);
        }
        self.overlay = None;
        self.overlay_device = None;
        self.installed = None;
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::{FakeFirewall, FakeHost, Op};
    use crate::model::{NextHop, Selection};

    const VIP: &str = "198.18.0.50";
    const NH: &str = "10.77.0.1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gateways() -> Vec<Gateway> {
        vec![
            Gateway {
                name: "vip".into(),
                node_selector: Labels::new(),
                selection: Selection::Alphabetical,
                preempt: true,
                source_ip: SourceIp::VirtualIp {
                    ip: ip(VIP),
                    interfaces: vec!["eth1".into()],
                },
                next_hop: Some(NextHop {
                    ip: ip(NH),
                    interface: "eth0".into(),
                }),
                conntrack_sync: false,
            },
            Gateway {
                name: "basic".into(),
                node_selector: Labels::new(),
                selection: Selection::Alphabetical,
                preempt: true,
                source_ip: SourceIp::PrimaryIp {
                    interface: "eth1".into(),
                },
                next_hop: None,
                conntrack_sync: false,
            },
        ]
    }

    fn policies() -> OrdMap<String, Arc<Policy>> {
        ["vip", "basic"]
            .iter()
            .enumerate()
            .map(|(i, gw)| Policy {
                name: format!("p-{gw}"),
                egress_gateway_name: gw.to_string(),
                source_cidrs: vec![format!("10.77.{i}.0/24").parse().unwrap()],
                destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                excluded_cidrs: vec![],
            })
            .map(|p| (p.name.clone(), Arc::new(p)))
            .collect()
    }

    fn host() -> FakeHost {
        FakeHost::default()
            .with_interface("eth0", &[("10.77.0.2", 24)])
            .with_interface("eth1", &[("198.18.0.2", 24)])
    }

    fn all_here() -> Assignment {
        [("vip", "gw1"), ("basic", "gw1")]
            .iter()
            .map(|(g, n)| (g.to_string(), n.to_string()))
            .collect()
    }

    fn reconciler(h: FakeHost) -> Reconciler<FakeHost, FakeFirewall> {
        let fw = FakeFirewall {
            journal: h.journal.clone(),
            ..Default::default()
        };
        Reconciler::new(h, fw)
    }

    async fn converge_to(
        rec: &mut Reconciler<FakeHost, FakeFirewall>,
        assignment: &Assignment,
    ) -> Changes {
        let state = rec.host.observe().await.unwrap();
        let (desired, managed) = desired_for(assignment, &BTreeMap::new(), &state);
        rec.converge(&desired, &state, &managed).await.unwrap()
    }

    /// gw1's plan for the test gateways and policies, with the managed addresses.
    fn desired_for(
        assignment: &Assignment,
        members: &BTreeMap<String, String>,
        state: &HostState,
    ) -> (Desired, BTreeSet<IpAddr>) {
        let gws = gateways();
        let managed = managed_addresses(&gws);
        let pols = policies();
        let objects = Objects {
            version: 1,
            gateways: &gws,
            policies: &pols,
            committed: assignment,
            members,
            in_contact: true,
        };
        let desired = plan(
            "gw1",
            assignment,
            &objects,
            state,
            &managed,
            &mut policy::Compiler::new(),
        );
        (desired, managed)
    }

    #[test]
    fn plan_uses_vip_and_primary_ip_and_skips_managed_addresses() {
        let gws = gateways();
        let managed = managed_addresses(&gws);
        let mut h = host();
        // A VIP listed first on the interface must not be taken for its primary address.
        h.state
            .get_mut("eth1")
            .unwrap()
            .addresses
            .insert(0, (ip(VIP), 32));
        let pols = policies();
        let objects = Objects {
            version: 1,
            gateways: &gws,
            policies: &pols,
            committed: &all_here(),
            members: &BTreeMap::new(),
            in_contact: true,
        };
        let mut cache = policy::Compiler::new();
        let d = plan("gw1", &all_here(), &objects, &h.state, &managed, &mut cache);
        assert_eq!(d.sources["vip"], ip(VIP));
        assert_eq!(d.sources["basic"], ip("198.18.0.2"));
        assert!(d.addresses.contains(&("eth1".into(), ip(VIP))));
        assert!(d.addresses.contains(&("eth0".into(), ip(NH))));
        assert_eq!(
            d.snat.lookup(ip("10.77.1.5"), ip("8.8.8.8")),
            Some(GwId::of("basic"))
        );
        assert_eq!(
            d.roles[&GwId::of("basic")].v4,
            Some("198.18.0.2".parse().unwrap())
        );
        assert_eq!(
            d.roles[&GwId::of("vip")].v4,
            Some("198.18.0.50".parse().unwrap())
        );
        let other = plan(
            "gw1",
            &Assignment::new(),
            &objects,
            &h.state,
            &managed,
            &mut cache,
        );
        // Active nowhere here: no address, every chain idle, the same classification.
        assert!(other.addresses.is_empty());
        assert!(other.roles.values().all(|r| *r == Role::default()));
        assert_eq!(other.snat, d.snat);
        // Same version and sources: the compiled map is reused, not rebuilt.
        let again = plan("gw1", &all_here(), &objects, &h.state, &managed, &mut cache);
        let third = plan("gw1", &all_here(), &objects, &h.state, &managed, &mut cache);
        assert!(Arc::ptr_eq(&again.snat, &third.snat));
    }

    #[tokio::test]
    async fn takeover_installs_snat_before_adding() {
        let mut rec = reconciler(host());
        let changes = converge_to(&mut rec, &all_here()).await;
        assert_eq!(changes.added.len(), 2);
        let n = rec.installed().map_or(0, |m| m.len());
        assert!(n > 0);
        let mut active = vec![GwId::of("vip"), GwId::of("basic")];
        active.sort();
        assert_eq!(
            rec.host.journal.ops(),
            vec![
                Op::Overlay(None),
                Op::Snat(n),
                Op::Roles(active),
                Op::AddAddress("eth0".into(), ip(NH)),
                Op::AddAddress("eth1".into(), ip(VIP)),
            ]
        );
    }

    /// A takeover or a release changes the gateway's chain only, never the classification:
    /// its cost does not grow with the number of policies.
    #[tokio::test]
    async fn a_takeover_changes_the_roles_not_the_map() {
        let mut rec = reconciler(host());
        converge_to(&mut rec, &Assignment::new()).await;
        rec.host.journal.clear();
        converge_to(&mut rec, &all_here()).await;
        let ops = rec.host.journal.ops();
        assert!(!ops.iter().any(|o| matches!(o, Op::Snat(_))), "{ops:?}");
        assert!(matches!(ops[0], Op::Roles(_)), "{ops:?}");
    }

    /// A repair after an outside change of the nftables table reinstalls the classification and
    /// the roles, and leaves the overlay (not an nftables object) alone.
    #[tokio::test]
    async fn a_repair_reinstalls_the_firewall_and_not_the_overlay() {
        let mut rec = reconciler(host());
        converge_to(&mut rec, &all_here()).await;
        rec.host.journal.clear();
        rec.forget();
        converge_to(&mut rec, &all_here()).await;
        let ops = rec.host.journal.ops();
        assert!(ops.iter().any(|o| matches!(o, Op::Snat(_))), "{ops:?}");
        assert!(
            !ops.iter().any(|o| matches!(o, Op::Overlay(_))),
            "the overlay was rebuilt: {ops:?}"
        );
    }

    /// The overlay's device deleted (or replaced) from outside, as observations of the host
    /// show it, is set up again; an observation from before the device was made is not taken
    /// for a deletion (that looped: every rebuild deletes the device first).
    #[tokio::test]
    async fn an_overlay_device_deleted_from_outside_is_set_up_again() {
        let mut rec = reconciler(host());
        let members: BTreeMap<String, String> = [("gw1", "10.77.0.2"), ("gw2", "10.77.0.3")]
            .iter()
            .map(|(n, a)| (n.to_string(), format!("{a}:7480")))
            .collect();
        let without = rec.host.observe().await.unwrap();
        let (desired, managed) = desired_for(&Assignment::new(), &members, &without);
        assert!(desired.overlay.is_some());
        let builds = |rec: &Reconciler<FakeHost, FakeFirewall>| {
            rec.host
                .journal
                .ops()
                .iter()
                .filter(|o| matches!(o, Op::Overlay(Some(_))))
                .count()
        };
        let device = |index: u32| crate::dataplane::HostInterface {
            index,
            up: true,
            mac: None,
            addresses: vec![],
            tagged: vec![],
        };
        let converge = async |rec: &mut Reconciler<FakeHost, FakeFirewall>, h: &HostState| {
            rec.converge(&desired, h, &managed).await.unwrap();
            builds(rec)
        };
        assert_eq!(converge(&mut rec, &without).await, 1);
        // Observed before the device was made: nothing happens.
        assert_eq!(converge(&mut rec, &without).await, 1);
        // Seen, then gone.
        let mut with = without.clone();
        with.insert(overlay::DEVICE.into(), device(rec.host.overlay_index));
        assert_eq!(converge(&mut rec, &with).await, 1);
        assert_eq!(converge(&mut rec, &without).await, 2);
        assert_eq!(converge(&mut rec, &without).await, 2, "once");
        // Seen, then replaced by another device of that name.
        with.insert(overlay::DEVICE.into(), device(rec.host.overlay_index));
        assert_eq!(converge(&mut rec, &with).await, 2);
        with.insert(overlay::DEVICE.into(), device(rec.host.overlay_index + 50));
        assert_eq!(converge(&mut rec, &with).await, 3);
    }

    #[tokio::test]
    async fn converging_twice_changes_nothing() {
        let mut rec = reconciler(host());
        converge_to(&mut rec, &all_here()).await;
        rec.host.journal.clear();
        let changes = converge_to(&mut rec, &all_here()).await;
        assert!(changes.is_empty());
        assert_eq!(rec.host.journal.ops(), vec![]);
    }

    #[tokio::test]
    async fn release_removes_addresses_and_empties_snat() {
        let mut rec = reconciler(host());
        converge_to(&mut rec, &all_here()).await;
        rec.host.journal.clear();
        let changes = converge_to(&mut rec, &Assignment::new()).await;
        assert_eq!(changes.removed.len(), 2);
        let ops = rec.host.journal.ops();
        assert_eq!(
            ops.last(),
            Some(&Op::Roles(vec![])),
            "addresses go before the gateways' chains: {ops:?}"
        );
        assert!(changes.snat_changed);
        assert!(!rec.host.holds("eth1", ip(VIP)));
        assert!(!rec.host.holds("eth0", ip(NH)));
        assert!(
            rec.host.holds("eth1", ip("198.18.0.2")),
            "primary untouched"
        );
        assert!(rec.firewall.roles.values().all(|r| *r == Role::default()));
        assert!(rec.held().is_empty());
    }

    #[tokio::test]
    async fn stale_managed_address_is_removed_and_foreign_ones_kept() {
        let mut h = host();
        h.state
            .get_mut("eth1")
            .unwrap()
            .addresses
            .push((ip(VIP), 32));
        h.state
            .get_mut("eth1")
            .unwrap()
            .addresses
            .push((ip("192.0.2.9"), 32));
        let mut rec = reconciler(h);
        converge_to(&mut rec, &Assignment::new()).await;
        assert!(
            !rec.host.holds("eth1", ip(VIP)),
            "a crashed run's VIP is removed"
        );
        assert!(
            rec.host.holds("eth1", ip("192.0.2.9")),
            "not egressd's to remove"
        );
    }

    #[tokio::test]
    async fn an_address_already_present_is_adopted() {
        let mut h = host();
        h.state
            .get_mut("eth1")
            .unwrap()
            .addresses
            .push((ip(VIP), 32));
        let mut rec = reconciler(h);
        converge_to(&mut rec, &all_here()).await;
        assert!(
            !rec.host
                .journal
                .ops()
                .contains(&Op::AddAddress("eth1".into(), ip(VIP)))
        );
        assert!(rec.held().contains(&("eth1".into(), ip(VIP))));
    }

    #[tokio::test]
    async fn a_tagged_address_no_config_names_is_removed() {
        let mut h = host();
        let stray = ip("192.0.2.77");
        let eth1 = h.state.get_mut("eth1").unwrap();
        eth1.addresses.push((stray, 32));
        eth1.tagged.push(stray);
        let mut rec = reconciler(h);
        converge_to(&mut rec, &Assignment::new()).await;
        assert!(
            !rec.host.holds("eth1", stray),
            "egressd's own leftover is removed"
        );
    }

    #[tokio::test]
    async fn release_all_gives_up_everything() {
        let mut rec = reconciler(host());
        converge_to(&mut rec, &all_here()).await;
        rec.release_all().await.unwrap();
        assert!(!rec.host.holds("eth1", ip(VIP)));
        assert!(!rec.host.holds("eth0", ip(NH)));
        let ops = rec.host.journal.ops();
        assert_eq!(ops[ops.len() - 2..], [Op::RemoveTable, Op::Overlay(None)]);
        assert!(rec.firewall.map.is_none());
    }

    fn members() -> BTreeMap<String, String> {
        ["gw1", "gw2", "gw3"]
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), format!("10.78.0.{}:7480", i + 2)))
            .collect()
    }

    /// A standby redirects each gateway to the node the committed assignment names, after the
    /// overlay to it exists; a failover moves only the redirect; cut off from the leader, it
    /// drops.
    #[tokio::test]
    async fn a_standby_redirects_to_the_committed_active_node() {
        let mut rec = reconciler(host());
        let gws = gateways();
        let managed = managed_addresses(&gws);
        let pols = policies();
        let mut compiler = policy::Compiler::new();
        let mut step = async |committed: &Assignment, in_contact: bool| {
            let state = rec.host.observe().await.unwrap();
            let objects = Objects {
                version: 1,
                gateways: &gws,
                policies: &pols,
                committed,
                members: &members(),
                in_contact,
            };
            let d = plan(
                "gw2",
                &Assignment::new(),
                &objects,
                &state,
                &managed,
                &mut compiler,
            );
            assert!(d.addresses.is_empty() && d.sources.is_empty());
            rec.converge(&d, &state, &managed).await.unwrap();
            let ops = rec.host.journal.ops();
            rec.host.journal.clear();
            ops
        };
        let on = |node: &str| -> Assignment {
            [("vip", node), ("basic", node)]
                .iter()
                .map(|(g, n)| (g.to_string(), n.to_string()))
                .collect()
        };
        let to = |slot: u16| {
            let mut v = vec![(GwId::of("vip"), slot), (GwId::of("basic"), slot)];
            v.sort();
            Op::Redirects(v)
        };
        let ops = step(&on("gw1"), true).await;
        assert_eq!(ops[0], Op::Overlay(Some(vec!["gw1".into(), "gw3".into()])));
        assert!(ops.contains(&to(0)), "{ops:?}");
        // Failover to gw3: the redirect follows, nothing else changes.
        assert_eq!(step(&on("gw3"), true).await, [to(2)]);
        // No lease (cut off from the leader): drop.
        assert_eq!(step(&on("gw3"), false).await, [Op::Redirects(vec![])]);
        // Nobody active: drop.
        step(&on("gw3"), true).await;
        assert_eq!(
            step(&Assignment::new(), true).await,
            [Op::Redirects(vec![])]
        );
    }

    #[test]
    fn local_facts_come_from_the_host() {
        let h = host();
        let managed = managed_addresses(&gateways());
        let me = local_node_state("gw1", &Labels::new(), false, true, &h.state, &managed);
        assert!(me.alive && me.ready);
        assert_eq!(
            me.interfaces["eth1"].primary_ipv4,
            Some("198.18.0.2".parse().unwrap())
        );
    }
}
