use super::*;
use crate::dataplane::Role;
use crate::model::Policy;

const CLIENT: &str = "10.0.0.10";
const OTHER_CLIENT: &str = "10.0.0.11";
const SERVER: &str = "203.0.113.10";
const SERVER2: &str = "203.0.113.20";
const ELSEWHERE: &str = "192.0.2.5";
const VIP_A: &str = "198.18.0.1";
const VIP_B: &str = "198.18.0.2";
const VIP_A2: &str = "198.18.0.3";
const NODE: &str = "10.0.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pol(name: &str, gw: &str, dst: &str, excl: &[&str]) -> Policy {
    Policy {
        name: name.into(),
        egress_gateway_name: gw.into(),
        source_cidrs: vec![format!("{CLIENT}/32").parse().expect("cidr")],
        destination_cidrs: vec![dst.parse().expect("cidr")],
        excluded_cidrs: excl.iter().map(|c| c.parse().expect("cidr")).collect(),
    }
}

/// The classification with `policies`, gateways `a` and `b`, and `active` the gateways active
/// here with their source address.
fn classifier(policies: &[Policy], active: &[(&str, &str)]) -> Arc<Classifier> {
    let names: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let map = crate::policy::compile(policies, &names);
    let mut roles = Roles::new();
    for g in ["a", "b"] {
        let role = match active.iter().find(|(n, _)| *n == g) {
            Some((_, addr)) => match ip(addr) {
                IpAddr::V4(a) => Role {
                    v4: Some(a),
                    ..Role::default()
                },
                IpAddr::V6(a) => Role {
                    v6: Some(a),
                    ..Role::default()
                },
            },
            None => Role::default(),
        };
        roles.insert(GwId::of(g), role);
    }
    let local: BTreeSet<IpAddr> = [NODE]
        .iter()
        .map(|a| ip(a))
        .chain(active.iter().map(|(_, a)| ip(a)))
        .collect();
    Arc::new(Classifier {
        map: Arc::new(map),
        roles,
        local: Arc::new(local),
    })
}

fn udp(src: &str, dst: &str, translated_to: Option<&str>) -> Flow {
    Flow::example(
        Tuple {
            src: ip(src),
            dst: ip(dst),
            proto: IPPROTO_UDP,
            sport: 40000,
            dport: 9999,
        },
        translated_to.map(ip),
    )
}

fn is_stale(history: &[Arc<Classifier>], f: &Flow) -> bool {
    stale(history, f)
}

#[test]
fn a_policy_added_makes_untranslated_flows_it_selects_stale() {
    let before = classifier(&[], &[("a", VIP_A)]);
    let after = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, None)));
    // Begun after the change: translated as the table decides now.
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    // Not selected: untouched, translated or not.
    assert!(!is_stale(&h, &udp(OTHER_CLIENT, SERVER, None)));
    assert!(!is_stale(&h, &udp(CLIENT, ELSEWHERE, None)));
    assert!(!is_stale(
        &h,
        &udp(OTHER_CLIENT, SERVER, Some("198.51.100.1"))
    ));
}

#[test]
fn a_policy_removed_makes_its_translated_flows_stale() {
    let before = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let after = classifier(&[], &[("a", VIP_A)]);
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, None)));
    assert!(!is_stale(&h, &udp(CLIENT, ELSEWHERE, None)));
}

#[test]
fn an_exclusion_added_makes_only_the_excluded_destination_stale() {
    let before = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let after = classifier(
        &[pol("p", "a", "203.0.113.0/24", &[&format!("{SERVER}/32")])],
        &[("a", VIP_A)],
    );
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, None)));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER2, Some(VIP_A))));
}

#[test]
fn a_policy_moved_to_another_gateway_active_here_makes_the_old_translation_stale() {
    let active = [("a", VIP_A), ("b", VIP_B)];
    let before = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &active);
    let after = classifier(&[pol("p", "b", "203.0.113.0/24", &[])], &active);
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_B))));
    assert!(!is_stale(&h, &udp(CLIENT, ELSEWHERE, None)));
}

#[test]
fn a_policy_moved_to_a_gateway_active_elsewhere_makes_every_entry_of_it_stale() {
    // This node holds a, not b: b's traffic is dropped here, so no entry of it may pass.
    let before = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let after = classifier(&[pol("p", "b", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(is_stale(&h, &udp(CLIENT, SERVER, None)));
}

#[test]
fn on_a_standby_a_new_policy_makes_the_flows_it_selects_stale() {
    // The gateway is active elsewhere: the flows that passed here untranslated must stop.
    let before = classifier(&[], &[]);
    let after = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[]);
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, None)));
    assert!(!is_stale(&h, &udp(OTHER_CLIENT, SERVER, None)));
}

#[test]
fn a_source_ip_change_makes_the_old_address_stale_and_nothing_else() {
    let policies = [
        pol("p", "a", "203.0.113.0/24", &[]),
        pol("q", "b", "192.0.2.0/24", &[]),
    ];
    let before = classifier(&policies, &[("a", VIP_A), ("b", VIP_B)]);
    let after = classifier(&policies, &[("a", VIP_A2), ("b", VIP_B)]);
    assert!(before.may_reclassify(&after));
    let h = [before, after];
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A2))));
    // The other gateway's flows are untouched.
    assert!(!is_stale(&h, &udp(CLIENT, ELSEWHERE, Some(VIP_B))));
}

/// A takeover makes the untranslated entries of the gateway's traffic stale: connections this
/// node forwarded as a standby (redirected to the then active node) must not go on untranslated
/// from the new active node. A release changes nothing.
#[test]
fn a_takeover_makes_untranslated_entries_stale_and_a_release_nothing() {
    let policies = [pol("p", "a", "203.0.113.0/24", &[])];
    let standby = classifier(&policies, &[]);
    let active = classifier(&policies, &[("a", VIP_A)]);
    let mut same_local = (*active).clone();
    same_local.local = standby.local.clone();
    // Also where the source address is not a new local address (primary-IP mode).
    assert!(standby.may_reclassify(&same_local));
    let took_over = [standby.clone(), active.clone()];
    assert!(is_stale(&took_over, &udp(CLIENT, SERVER, None)));
    assert!(!is_stale(&took_over, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&took_over, &udp(CLIENT, ELSEWHERE, None)));
    let released = [active.clone(), standby.clone()];
    assert!(!is_stale(&released, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&released, &udp(CLIENT, SERVER, None)));
}

#[test]
fn the_nodes_own_traffic_and_traffic_to_it_are_never_stale() {
    let before = classifier(&[], &[("a", VIP_A)]);
    let after = classifier(&[pol("p", "a", "0.0.0.0/0", &[])], &[("a", VIP_A)]);
    let h = [before, after];
    assert!(!is_stale(&h, &udp(NODE, SERVER, None)));
    assert!(!is_stale(&h, &udp(CLIENT, NODE, None)));
    assert!(is_stale(&h, &udp(CLIENT, SERVER, None)));
}

#[test]
fn a_change_undone_before_the_sweep_still_catches_entries_begun_in_between() {
    let without = classifier(&[], &[("a", VIP_A)]);
    let with = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let h = [without.clone(), with, without];
    // Begun while the policy existed: translated, stale again.
    assert!(is_stale(&h, &udp(CLIENT, SERVER, Some(VIP_A))));
    assert!(!is_stale(&h, &udp(CLIENT, SERVER, None)));
    // Without the middle step nothing was reclassified.
    let h2 = [h[0].clone(), h[2].clone()];
    assert!(!is_stale(&h2, &udp(CLIENT, SERVER, Some(VIP_A))));
}

#[test]
fn the_routed_destination_after_dnat_is_what_is_classified() {
    let before = classifier(&[], &[("a", VIP_A)]);
    let after = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let h = [before, after];
    // The client sent to a service address; DNAT made it the server (the reply's source).
    let mut f = udp(CLIENT, "172.30.0.1", None);
    f.reply.src = ip(SERVER);
    assert!(is_stale(&h, &f));
    let mut g = udp(CLIENT, SERVER, None);
    g.reply.src = ip(ELSEWHERE);
    assert!(!is_stale(&h, &g));
}

#[test]
fn no_history_or_one_classification_deletes_nothing() {
    let one = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    assert!(!is_stale(&[], &udp(CLIENT, SERVER, None)));
    assert!(!is_stale(&[one], &udp(CLIENT, SERVER, None)));
}

#[test]
fn an_unchanged_map_and_roles_do_not_wake_the_sweeper() {
    let a = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    let b = classifier(&[pol("p", "a", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    assert!(!a.may_reclassify(&b));
    let c = classifier(&[pol("p", "a", "203.0.113.0/25", &[])], &[("a", VIP_A)]);
    assert!(a.may_reclassify(&c));
}

#[test]
fn only_the_nodes_own_addresses_changing_is_not_a_decision_change() {
    let policies = [pol("p", "a", "203.0.113.0/24", &[])];
    let standby = classifier(&policies, &[]);
    let active = classifier(&policies, &[("a", VIP_A)]);
    // The VIP became a local address: worth a sweep, not an operator's change.
    assert!(standby.may_reclassify(&active));
    assert!(!standby.decisions_differ(&active));
    let moved = classifier(&[pol("p", "b", "203.0.113.0/24", &[])], &[("a", VIP_A)]);
    assert!(active.decisions_differ(&moved));
}

#[test]
fn ended_keys_pad_each_port_to_a_register() {
    let mut b = Vec::new();
    Ended(
        Ipv4Addr::new(10, 0, 0, 10),
        40000,
        Ipv4Addr::new(203, 0, 113, 10),
        8080,
    )
    .put(&mut b);
    assert_eq!(
        b,
        [
            10, 0, 0, 10, 0x9c, 0x40, 0, 0, 203, 0, 113, 10, 0x1f, 0x90, 0, 0
        ]
    );
    assert_eq!(b.len(), Ended::<Ipv4Addr>::WIDTH);
    assert_eq!(
        Ended::<Ipv4Addr>::show(&b),
        "10.0.0.10 . 40000 . 203.0.113.10 . 8080"
    );
    assert_eq!(Ended::<Ipv6Addr>::WIDTH, 40);
}

#[test]
fn tcp_policy_names() {
    assert_eq!(TcpPolicy::parse("keep"), Some(TcpPolicy::Keep));
    assert_eq!(TcpPolicy::parse("reset"), Some(TcpPolicy::Reset));
    assert_eq!(TcpPolicy::parse("Reset"), None);
    assert_eq!(TcpPolicy::default().as_str(), "keep");
}

/// A dump message's attributes as the kernel sends them, read back.
#[test]
fn an_entry_is_read_with_both_tuples_and_its_nat_state() {
    fn attr(t: u16, p: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + p.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&t.to_ne_bytes());
        v.extend_from_slice(p);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }
    fn nested(t: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(t | 0x8000, &parts.concat())
    }
    fn tuple(t: u16, s: [u8; 4], d: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        nested(
            t,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &s), attr(CTA_IP_V4_DST, &d)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[IPPROTO_UDP]),
                        attr(CTA_PROTO_SRC_PORT, &sp.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dp.to_be_bytes()),
                    ],
                ),
            ],
        )
    }
    let msg = [
        tuple(
            CTA_TUPLE_ORIG,
            [10, 0, 0, 10],
            [203, 0, 113, 10],
            40000,
            9999,
        ),
        tuple(
            CTA_TUPLE_REPLY,
            [203, 0, 113, 10],
            [198, 18, 0, 1],
            9999,
            40000,
        ),
        attr(CTA_STATUS, &(IPS_SRC_NAT | 0x8).to_be_bytes()),
        attr(CTA_ID, &7u32.to_be_bytes()),
        attr(CTA_TIMEOUT, &117u32.to_be_bytes()),
    ]
    .concat();
    let f = parse_flow(2, &msg).expect("an entry");
    assert_eq!(f.orig.src, ip("10.0.0.10"));
    assert_eq!(f.orig.sport, 40000);
    assert_eq!(f.routed_dst(), ip(SERVER));
    assert_eq!(f.translated_to(), Some(ip(VIP_A)));
    assert_eq!(f.protocol(), "udp");
    assert_eq!(f.id, 7);
    assert_eq!(f.timeout, 117);
    // The deletion key: the original tuple and the id, not the reply tuple, the status or the
    // timeout.
    assert_eq!(
        f.key.len(),
        msg.len()
            - 2 * attr(CTA_STATUS, &[0; 4]).len()
            - tuple(CTA_TUPLE_REPLY, [0; 4], [0; 4], 0, 0).len()
    );
}
