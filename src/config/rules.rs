//! The rules every gateway and policy follows, whichever way it arrives: the configuration
//! file, `egressd apply` (TOML or JSON bodies of the admin API), the Kubernetes adapter, and
//! the Raft state machine that checks the committed set as it applies a change.
//!
//! Three layers, each usable on its own:
//! - **field rules** — one value: [`object_name`], [`label_key`], [`label_value`],
//!   [`interface_name`], [`unicast`], [`network_address`], and the parsers [`ip`], [`cidr`] and
//!   [`socket_addr`], whose messages say what was expected;
//! - **object rules** — one object, or a policy with its gateway: [`gateway`], [`policy`],
//!   [`policy_with_gateway`];
//! - **rules between objects** — names, addresses and references: [`gateway_addresses`] checks
//!   one gateway against a lookup of the addresses other gateways use (so the state machine can
//!   check a changed gateway against an index instead of the whole set), [`missing_gateway`]
//!   words a dangling reference, and [`between`] applies them to whole lists (a file, an apply).
//!
//! Every rule that reports [`Issue`]s takes `at`, the key of what it checks (`gateway[3]`, or
//! `""` for keys relative to the object); messages quote user input with [`quote`], which cuts
//! long input short.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::model::{Gateway, Labels, Policy, SourceIp};

use super::schema::{PRIMARY_MODE, PRIMARY_TABLE, VIP_MODE, VIP_TABLE};

/// One broken rule: the key path of the offending value and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub key: String,
    pub message: String,
}

impl Issue {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Records the error of a field rule under `key`.
pub fn check(issues: &mut Vec<Issue>, key: impl Into<String>, result: Result<(), String>) {
    if let Err(message) = result {
        issues.push(Issue::new(key, message));
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths and quoting
// ---------------------------------------------------------------------------------------------

/// `at.field` (or `field` at the top).
pub fn sub(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_string()
    } else {
        format!("{at}.{field}")
    }
}

/// `at[i]`.
pub fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

/// A map key (a label key) as it appears in a key path: bare when it is a bare TOML key,
/// otherwise quoted, and cut short like any quoted input.
pub fn map_key(at: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key.len() <= QUOTE_MAX
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        sub(at, key)
    } else {
        sub(at, &quote(key))
    }
}

/// How many characters of user input a message quotes.
pub const QUOTE_MAX: usize = 64;

/// `s` quoted (escaped like a Rust string), at most [`QUOTE_MAX`] characters of it: a
/// 100 000-character name must not come back whole in an error message.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!(
            "{:?}…({} more characters)",
            &s[..cut],
            s[cut..].chars().count()
        ),
    }
}

/// Each line of a parser's message (which may show a line of the input) cut to a sensible
/// length.
pub fn shorten_lines(text: &str) -> String {
    const MAX: usize = 200;
    text.lines()
        .map(|l| match l.char_indices().nth(MAX) {
            None => l.to_string(),
            Some((cut, _)) => format!(
                "{}…({} more characters)",
                &l[..cut],
                l[cut..].chars().count()
            ),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The closest known key to an unknown one, when the mistake looks like a typo or a Deckhouse
/// camelCase name (`nodeSelector` → `node_selector`).
pub fn suggest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    if unknown.len() > QUOTE_MAX {
        return None;
    }
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let u = norm(unknown);
    if let Some(k) = known.iter().find(|k| norm(k) == u) {
        return Some(k);
    }
    // Plurals and singulars: `gateways` for `gateway`, `peer` for `peers`.
    if let Some(k) = known
        .iter()
        .find(|k| u.trim_end_matches('s') == norm(k).trim_end_matches('s'))
    {
        return Some(k);
    }
    let limit = if unknown.len() <= 4 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (levenshtein(&u, &norm(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Field rules
// ---------------------------------------------------------------------------------------------

/// Node, gateway and policy names end up in logs, metrics labels and file names.
pub fn object_name(name: &str) -> Result<(), String> {
    let expected = "expected 1 to 63 characters from A-Z, a-z, 0-9, '.', '_' and '-'";
    if name.is_empty() {
        return Err(format!("must not be empty; {expected}"));
    }
    let len = name.chars().count();
    if len > 63 {
        return Err(format!(
            "{} is {len} characters long; {expected}",
            quote(name)
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("{} contains {c:?}; {expected}", quote(name)));
    }
    Ok(())
}

const LABEL_KEY_EXPECTED: &str = "expected [prefix/]name as Kubernetes has it: an optional \
    DNS subdomain prefix (lowercase letters, digits, '-' and '.', at most 253 characters) and \
    '/', then a name of 1 to 63 characters from A-Z, a-z, 0-9, '-', '_' and '.' that starts and \
    ends with a letter or digit, such as \"node-role.deckhouse.io/egress\"";

const LABEL_VALUE_EXPECTED: &str = "expected \"\" or 1 to 63 characters from A-Z, a-z, 0-9, \
    '-', '_' and '.' that start and end with a letter or digit";

/// The name part of a label key, or a label value: Kubernetes' qualified-name rule.
fn label_name(s: &str) -> Result<(), String> {
    let len = s.chars().count();
    if len > 63 {
        return Err(format!("is {len} characters long (at most 63)"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("contains {c:?}"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with a letter or digit".to_string());
    }
    Ok(())
}

/// A DNS subdomain (RFC 1123): lowercase labels of at most 63 characters, separated by dots.
fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!(
            "is {} characters long (at most 253)",
            s.chars().count()
        ));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "has the part {}, which is not 1 to 63 lowercase letters, digits and '-' \
                 starting and ending with a letter or digit",
                quote(label)
            ));
        }
    }
    Ok(())
}

/// A label key (`[node] labels`, `node_selector`, runtime labels), as Kubernetes validates
/// one: an optional DNS-subdomain prefix and '/', then a name.
pub fn label_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!(
            "a label key must not be empty; {LABEL_KEY_EXPECTED}"
        ));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(format!(
                "the label key {} has an empty prefix before '/'; {LABEL_KEY_EXPECTED}",
                quote(key)
            ));
        }
        if let Err(why) = dns_subdomain(p) {
            return Err(format!(
                "the prefix of the label key {} {why}; {LABEL_KEY_EXPECTED}",
                quote(key)
            ));
        }
    }
    if name.is_empty() {
        return Err(format!(
            "the label key {} has no name after '/'; {LABEL_KEY_EXPECTED}",
            quote(key)
        ));
    }
    if let Err(why) = label_name(name) {
        return Err(format!(
            "the name of the label key {} {why}; {LABEL_KEY_EXPECTED}",
            quote(key)
        ));
    }
    Ok(())
}

/// A label value: empty, or a name of at most 63 characters as for keys.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    label_name(value).map_err(|why| {
        format!(
            "the label value {} {why}; {LABEL_VALUE_EXPECTED}",
            quote(value)
        )
    })
}

/// Every key and value of a label map (`[node] labels`, a gateway's `node_selector`); `at` is
/// the key of the map.
pub fn labels(map: &Labels, at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    for (k, v) in map {
        if k.is_empty() {
            check(&mut out, at, label_key(k));
            continue;
        }
        check(&mut out, map_key(at, k), label_key(k));
        check(&mut out, map_key(at, k), label_value(v));
    }
    out
}

/// The kernel's rules (`dev_valid_name`): 1 to 15 bytes, no '/', no whitespace, not "." or "..".
pub fn interface_name(name: &str) -> Result<(), String> {
    let expected = "expected a Linux interface name: 1 to 15 bytes, no '/' and no whitespace, such as \"eth1\"";
    if name.is_empty() {
        return Err(format!("must not be empty; {expected}"));
    }
    if name.len() > 15 {
        return Err(format!(
            "{} is {} bytes long; {expected}",
            quote(name),
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "{} is not a valid interface name; {expected}",
            quote(name)
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c == '\0')
    {
        return Err(format!(
            "{} contains '/', whitespace or NUL; {expected}",
            quote(name)
        ));
    }
    Ok(())
}

/// The interfaces a VIP is held on: at least one, each valid, none twice. `at` is the list's
/// key.
pub fn interfaces(list: &[String], at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    if list.is_empty() {
        out.push(Issue::new(
            at,
            "must not be empty; list the interface(s) to hold the VIP on, e.g. [\"eth1\"]",
        ));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (j, n) in list.iter().enumerate() {
        let k = index(at, j);
        if let Err(m) = interface_name(n) {
            out.push(Issue::new(k, m));
        } else if let Some(first) = seen.get(n.as_str()) {
            out.push(Issue::new(
                k,
                format!(
                    "interface {} is listed twice (also at {at}[{first}])",
                    quote(n)
                ),
            ));
        } else {
            seen.insert(n, j);
        }
    }
    out
}

/// A VIP or next hop must be an address a host can hold and announce.
pub fn unicast(ip: &IpAddr) -> Result<(), String> {
    let bad = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback() || v6.is_multicast(),
    };
    if bad {
        Err(format!(
            "{ip} is not a usable unicast address; expected an address on the gateway's network, such as 198.18.0.50"
        ))
    } else {
        Ok(())
    }
}

/// A CIDR must be written as its network address: `10.0.0.1/24` is most likely a mistake.
pub fn network_address(net: &IpNet) -> Result<(), String> {
    let trunc = net.trunc();
    if trunc.addr() == net.addr() {
        Ok(())
    } else {
        Err(format!(
            "{net} has host bits set; did you mean {trunc}? (or {}/{} for the single address)",
            net.addr(),
            net.max_prefix_len()
        ))
    }
}

/// CIDRs of one list: each a network address, none twice. The items carry their index in the
/// list as written (a reader may give only those it could parse); `at` is the list's key.
///
/// Duplicates are found by sorting integer keys, not hashing nor sorting the `IpNet`s: the
/// state machine checks a changed policy on every node, and a 100 000-CIDR list took 33–41 ms
/// in a SipHash map (most of a one-CIDR edit's apply), 3–4 ms sorted as `IpNet`s.
pub fn cidrs<'a>(items: impl IntoIterator<Item = (usize, &'a IpNet)>, at: &str) -> Vec<Issue> {
    fn key(net: &IpNet) -> (u128, u16) {
        match net {
            IpNet::V4(n) => (u128::from(u32::from(n.addr())), u16::from(n.prefix_len())),
            IpNet::V6(n) => (u128::from(n.addr()), 0x100 | u16::from(n.prefix_len())),
        }
    }
    let mut found: Vec<(usize, String)> = Vec::new();
    let mut valid: Vec<((u128, u16), usize)> = Vec::new();
    // By position in the list, with the index the caller gave.
    let mut nets: Vec<(usize, &IpNet)> = Vec::new();
    for (j, net) in items {
        match network_address(net) {
            Err(m) => found.push((j, m)),
            Ok(()) => {
                valid.push((key(net), nets.len()));
                nets.push((j, net));
            }
        }
    }
    if !valid.is_sorted_by(|a, b| a.0 < b.0) {
        valid.sort_unstable();
        for w in valid
            .chunk_by(|a, b| a.0 == b.0)
            .filter(|run| run.len() > 1)
        {
            let (first, net) = nets[w[0].1];
            for &(_, k) in &w[1..] {
                found.push((
                    nets[k].0,
                    format!("{net} is listed twice (also at {at}[{first}])"),
                ));
            }
        }
        found.sort_by_key(|(j, _)| *j);
    }
    found
        .into_iter()
        .map(|(j, m)| Issue::new(index(at, j), m))
        .collect()
}

/// The source and destination lists of a policy need at least one CIDR.
pub fn required_cidrs(len: usize, at: &str) -> Option<Issue> {
    (len == 0).then(|| {
        Issue::new(
            at,
            "must not be empty; list at least one CIDR (0.0.0.0/0 or ::/0 for everything)",
        )
    })
}

/// The name of egressd's nftables tables.
pub fn nft_table(name: &str) -> Result<(), String> {
    let ok = name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid nftables table name; expected a letter followed by up to 62 letters, digits or '_', such as \"egressd\"",
            quote(name)
        ))
    }
}

/// Parses an IP address, saying what was wrong with one that is not.
pub fn ip(s: &str) -> Result<IpAddr, String> {
    let expected = "expected an IPv4 or IPv6 address such as 198.18.0.50";
    match IpAddr::from_str(s.trim()) {
        Ok(ip) if s.trim() == s => Ok(ip),
        Ok(_) => Err(format!(
            "{} has surrounding whitespace; {expected}",
            quote(s)
        )),
        Err(_) if s.contains('/') => Err(format!(
            "{} is a CIDR, not an IP address; {expected} (without a prefix length)",
            quote(s)
        )),
        Err(_) => Err(format!("{} is not an IP address; {expected}", quote(s))),
    }
}

/// Parses a CIDR (the network-address rule is [`network_address`]).
pub fn cidr(s: &str) -> Result<IpNet, String> {
    let expected = "expected a CIDR such as 10.0.0.0/24 or fd00::/64";
    if let Ok(net) = IpNet::from_str(s) {
        return Ok(net);
    }
    if let Ok(ip) = IpAddr::from_str(s) {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Err(format!(
            "{} has no prefix length; {expected}, or {ip}/{len} for this single address",
            quote(s)
        ));
    }
    Err(format!("{} is not a CIDR; {expected}", quote(s)))
}

/// Parses an address:port (no host names: they are not resolved).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    let expected =
        "expected an address:port such as 10.77.0.11:7480 (IPv6 in brackets: [fd00::11]:7480)";
    if let Ok(a) = SocketAddr::from_str(s) {
        return Ok(a);
    }
    if IpAddr::from_str(s).is_ok() {
        return Err(format!("{} has no port; {expected}", quote(s)));
    }
    Err(format!(
        "{} is not an address:port (host names are not resolved); {expected}",
        quote(s)
    ))
}

// ---------------------------------------------------------------------------------------------
// One object
// ---------------------------------------------------------------------------------------------

/// The key of a gateway's VIP below `at`.
pub fn vip_key(at: &str) -> String {
    sub(at, &format!("source_ip.{VIP_TABLE}.ip"))
}

/// Every rule of one gateway on its own: its fields ([`gateway_fields`]) and how they fit
/// together ([`gateway_coherence`]).
pub fn gateway(g: &Gateway, at: &str) -> Vec<Issue> {
    let mut out = gateway_fields(g, at);
    out.extend(gateway_coherence(g, at));
    out
}

/// The field rules of a gateway: name, selector labels, interfaces, addresses. (The reader of
/// the file applies the same rules field by field, so that a field it could not read does not
/// hide the others.)
pub fn gateway_fields(g: &Gateway, at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    check(&mut out, sub(at, "name"), object_name(&g.name));
    out.extend(labels(&g.node_selector, &sub(at, "node_selector")));
    match &g.source_ip {
        SourceIp::PrimaryIp { interface } => check(
            &mut out,
            sub(at, &format!("source_ip.{PRIMARY_TABLE}.interface_name")),
            interface_name(interface),
        ),
        SourceIp::VirtualIp {
            ip,
            interfaces: list,
        } => {
            check(&mut out, vip_key(at), unicast(ip));
            out.extend(interfaces(
                list,
                &sub(at, &format!("source_ip.{VIP_TABLE}.interfaces")),
            ));
        }
    }
    if let Some(nh) = &g.next_hop {
        check(&mut out, sub(at, "next_hop.ip"), unicast(&nh.ip));
        check(
            &mut out,
            sub(at, "next_hop.interface"),
            interface_name(&nh.interface),
        );
    }
    out
}

/// The rules between a gateway's own fields: its next hop is not its VIP.
pub fn gateway_coherence(g: &Gateway, at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    if let (Some(nh), SourceIp::VirtualIp { ip, .. }) = (&g.next_hop, &g.source_ip)
        && nh.ip == *ip
    {
        out.push(Issue::new(
            sub(at, "next_hop.ip"),
            format!(
                "{} is this gateway's own VIP; the next hop must be a different address",
                nh.ip
            ),
        ));
    }
    if g.conntrack_sync && matches!(g.source_ip, SourceIp::PrimaryIp { .. }) {
        out.push(Issue::new(
            sub(at, "conntrack_sync"),
            format!(
                "conntrack_sync needs mode = \"{VIP_MODE}\": in {PRIMARY_MODE} mode the source \
                 address changes on a failover, so no replicated state can keep a connection"
            ),
        ));
    }
    out
}

/// Every rule of one policy on its own: its fields ([`policy_fields`]) and its address
/// families ([`policy_coherence`]).
pub fn policy(p: &Policy, at: &str) -> Vec<Issue> {
    let mut out = policy_fields(p, at);
    out.extend(policy_coherence(p, at));
    out
}

/// The field rules of a policy: its name, the name of its gateway, its CIDR lists.
pub fn policy_fields(p: &Policy, at: &str) -> Vec<Issue> {
    let mut out = policy_names_and_sizes(p, at);
    for (field, list) in [
        ("source_cidrs", &p.source_cidrs),
        ("destination_cidrs", &p.destination_cidrs),
        ("excluded_cidrs", &p.excluded_cidrs),
    ] {
        out.extend(cidrs(list.iter().enumerate(), &sub(at, field)));
    }
    out
}

/// The field rules of a policy but the contents of its CIDR lists: its names, and that the
/// required lists are not empty.
fn policy_names_and_sizes(p: &Policy, at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    check(&mut out, sub(at, "name"), object_name(&p.name));
    check(
        &mut out,
        sub(at, "egress_gateway_name"),
        object_name(&p.egress_gateway_name),
    );
    for (field, list) in [
        ("source_cidrs", &p.source_cidrs),
        ("destination_cidrs", &p.destination_cidrs),
    ] {
        out.extend(required_cidrs(list.len(), &sub(at, field)));
    }
    out
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn net_family(n: &IpNet) -> &'static str {
    family(&n.addr())
}

/// A set of address families: bit 0 IPv4, bit 1 IPv6 (no allocation per policy checked).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Families(u8);

impl Families {
    fn of(nets: &[IpNet]) -> Families {
        Families(nets.iter().fold(0, |b, n| b | Families::bit(net_family(n))))
    }

    fn bit(family: &str) -> u8 {
        if family == "IPv4" { 1 } else { 2 }
    }

    fn contains(self, family: &str) -> bool {
        self.0 & Families::bit(family) != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn and(self, other: Families) -> Families {
        Families(self.0 & other.0)
    }

    fn names(self) -> impl Iterator<Item = &'static str> {
        ["IPv4", "IPv6"]
            .into_iter()
            .filter(move |f| self.contains(f))
    }
}

/// The families of the traffic a policy can match: those of a source and a destination alike.
fn traffic_families(p: &Policy) -> Families {
    Families::of(&p.source_cidrs).and(Families::of(&p.destination_cidrs))
}

/// CIDRs whose address family cannot match anything (a packet's source and destination have
/// the same family).
pub fn policy_coherence(p: &Policy, at: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    let src = Families::of(&p.source_cidrs);
    let dst = Families::of(&p.destination_cidrs);
    if src.is_empty() || dst.is_empty() {
        return out;
    }
    let traffic = src.and(dst);
    if traffic.is_empty() {
        let s = src.names().collect::<Vec<_>>().join("/");
        let d = dst.names().collect::<Vec<_>>().join("/");
        out.push(Issue::new(
            sub(at, "destination_cidrs"),
            format!(
                "source_cidrs are all {s} but destination_cidrs are all {d}; a packet's source and destination have the same address family, so this policy matches nothing"
            ),
        ));
        return out;
    }
    for (field, list, other, other_name) in [
        ("source_cidrs", &p.source_cidrs, dst, "destination_cidrs"),
        (
            "destination_cidrs",
            &p.destination_cidrs,
            src,
            "source_cidrs",
        ),
    ] {
        for (j, n) in list.iter().enumerate() {
            let f = net_family(n);
            if !other.contains(f) {
                out.push(Issue::new(
                    index(&sub(at, field), j),
                    format!("{n} is {f}, but no {other_name} are {f}, so it matches nothing"),
                ));
            }
        }
    }
    for (j, n) in p.excluded_cidrs.iter().enumerate() {
        let f = net_family(n);
        if !traffic.contains(f) {
            out.push(Issue::new(
                index(&sub(at, "excluded_cidrs"), j),
                format!("{n} is {f}, but the policy matches no {f} traffic (no {f} destination_cidrs with {f} source_cidrs), so excluding it has no effect"),
            ));
        }
    }
    out
}

/// A policy and the gateway it names: the gateway's source IP must be able to carry the
/// policy's traffic (PrimaryIP mode is IPv4 only; a VIP carries its own family). `label` names
/// the gateway in messages (`"vip"`, or `"vip" (gateway[0])` in a file), made only if needed.
pub fn policy_with_gateway(
    p: &Policy,
    g: &Gateway,
    at: &str,
    label: impl Fn() -> String,
) -> Vec<Issue> {
    let mut out = Vec::new();
    let traffic = traffic_families(p);
    let key = || sub(at, "egress_gateway_name");
    match &g.source_ip {
        SourceIp::PrimaryIp { .. } if traffic.contains("IPv6") => out.push(Issue::new(
            key(),
            format!(
                "gateway {} uses mode \"{PRIMARY_MODE}\", which SNATs to the interface's primary IPv4 address only, but this policy matches IPv6 traffic; use a gateway with an IPv6 VirtualIPAddress for it",
                label()
            ),
        )),
        SourceIp::VirtualIp { ip, .. } => {
            let vip_family = family(ip);
            for f in traffic.names() {
                if f != vip_family {
                    out.push(Issue::new(
                        key(),
                        format!(
                            "gateway {} has the {vip_family} VIP {ip}, but this policy matches {f} traffic, which cannot be SNATed to it; use a gateway with an {f} VIP for that traffic",
                            label()
                        ),
                    ));
                }
            }
        }
        SourceIp::PrimaryIp { .. } => {}
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Between objects
// ---------------------------------------------------------------------------------------------

/// How a gateway uses an address it holds on its active node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressUse {
    Vip,
    NextHop,
}

/// The addresses a gateway's active node holds: its VIP (VirtualIPAddress mode) and its next
/// hop. What an index of the committed gateways keys on.
pub fn addresses(g: &Gateway) -> impl Iterator<Item = (IpAddr, AddressUse)> + '_ {
    let vip = match &g.source_ip {
        SourceIp::VirtualIp { ip, .. } => Some((*ip, AddressUse::Vip)),
        SourceIp::PrimaryIp { .. } => None,
    };
    vip.into_iter()
        .chain(g.next_hop.iter().map(|nh| (nh.ip, AddressUse::NextHop)))
}

/// One gateway's addresses against those of the other gateways: no VIP or next hop may be
/// another gateway's VIP or next hop, or two nodes could end up holding it at once. `owner`
/// looks an address up among the *other* gateways and answers how it is used and by whom (the
/// label for messages, e.g. `"vip"` or `"vip" (gateway[0])`).
pub fn gateway_addresses(
    g: &Gateway,
    at: &str,
    owner: impl Fn(IpAddr) -> Option<(AddressUse, String)>,
) -> Vec<Issue> {
    let mut out = Vec::new();
    for (ip, used_as) in addresses(g) {
        let Some((theirs, who)) = owner(ip) else {
            continue;
        };
        let (key, message) = match (used_as, theirs) {
            (AddressUse::Vip, AddressUse::Vip) => (
                vip_key(at),
                format!(
                    "{ip} is already the VIP of gateway {who}; two gateways cannot share one VIP"
                ),
            ),
            (AddressUse::Vip, AddressUse::NextHop) => (
                vip_key(at),
                format!(
                    "{ip} is already the next hop of gateway {who}; a VIP must be a different address from every next hop"
                ),
            ),
            (AddressUse::NextHop, AddressUse::Vip) => (
                sub(at, "next_hop.ip"),
                format!(
                    "{ip} is the VIP of gateway {who}; the next hop must be a different address"
                ),
            ),
            (AddressUse::NextHop, AddressUse::NextHop) => (
                sub(at, "next_hop.ip"),
                format!(
                    "{ip} is already the next hop of gateway {who}; two gateways cannot share one next hop (their active nodes could both hold it at once)"
                ),
            ),
        };
        out.push(Issue::new(key, message));
    }
    out
}

/// The message for a policy naming a gateway that does not exist; `known` are the gateways
/// that do (the first ten are listed).
pub fn missing_gateway(gateway_name: &str, known: &[&str]) -> String {
    const SHOWN: usize = 10;
    let listed = if known.is_empty() {
        "no gateways are defined".to_string()
    } else if known.len() > SHOWN {
        format!(
            "defined gateways: {} and {} more",
            known[..SHOWN].join(", "),
            known.len() - SHOWN
        )
    } else {
        format!("defined gateways: {}", known.join(", "))
    };
    format!("no gateway named {}; {listed}", quote(gateway_name))
}

/// A policy against the gateway it names, looked up by the caller (in the committed set, or an
/// index of it): missing, or unable to carry the policy's traffic ([`policy_with_gateway`]).
/// `known` lists the existing gateways, asked for only when one is missing.
pub fn policy_reference<'g>(
    p: &Policy,
    at: &str,
    gateway: Option<&Gateway>,
    known: impl FnOnce() -> Vec<&'g str>,
) -> Vec<Issue> {
    match gateway {
        Some(g) => policy_with_gateway(p, g, at, || quote(&g.name)),
        None => vec![Issue::new(
            sub(at, "egress_gateway_name"),
            missing_gateway(&p.egress_gateway_name, &known()),
        )],
    }
}

/// A gateway as one entry of a set: its position, its name when that could be read, and the
/// object when all of it could.
pub struct GatewayEntry<'a> {
    pub index: usize,
    pub name: Option<&'a str>,
    pub gateway: Option<&'a Gateway>,
}

/// A policy as one entry of a set, like [`GatewayEntry`]; `gateway_name` is its reference.
pub struct PolicyEntry<'a> {
    pub index: usize,
    pub name: Option<&'a str>,
    pub gateway_name: Option<&'a str>,
    pub policy: Option<&'a Policy>,
}

/// The rules between the objects of one set (a file, an apply, the committed set), in order:
/// names used twice, addresses used twice ([`gateway_addresses`] against the gateways before
/// it), and every policy against its gateway — a missing one (unless `references` is false, as
/// for an apply whose policies may name committed gateways) or an incompatible one. Keys are
/// `gateway[i]` and `policy[i]` with `gateway` and `policy` replaced by `gateway_key` and
/// `policy_key`.
pub fn between(
    gateways: &[GatewayEntry<'_>],
    policies: &[PolicyEntry<'_>],
    references: bool,
    (gateway_key, policy_key): (&str, &str),
) -> Vec<Issue> {
    let mut out = Vec::new();
    let g_at = |i: usize| index(gateway_key, i);
    let p_at = |i: usize| index(policy_key, i);

    let mut first_name: HashMap<&str, usize> = HashMap::new();
    for e in gateways {
        let Some(n) = e.name else { continue };
        if let Some(first) = first_name.get(n) {
            out.push(Issue::new(
                sub(&g_at(e.index), "name"),
                format!(
                    "duplicate gateway name {}; already used by {}",
                    quote(n),
                    g_at(*first)
                ),
            ));
        } else {
            first_name.insert(n, e.index);
        }
    }

    let mut owners: HashMap<IpAddr, (AddressUse, usize, &str)> = HashMap::new();
    for e in gateways {
        let Some(g) = e.gateway else { continue };
        out.extend(gateway_addresses(g, &g_at(e.index), |ip| {
            owners
                .get(&ip)
                .map(|(used, j, name)| (*used, format!("{} ({})", quote(name), g_at(*j))))
        }));
        for (ip, used) in addresses(g) {
            owners.entry(ip).or_insert((used, e.index, g.name.as_str()));
        }
    }

    let mut defined: Vec<&str> = first_name.keys().copied().collect();
    defined.sort_unstable();
    let mut first_policy: HashMap<&str, usize> = HashMap::new();
    let by_name: HashMap<&str, &GatewayEntry<'_>> = gateways
        .iter()
        .rev()
        .filter_map(|e| e.name.map(|n| (n, e)))
        .collect();
    for e in policies {
        let at = p_at(e.index);
        if let Some(n) = e.name {
            if let Some(first) = first_policy.get(n) {
                out.push(Issue::new(
                    sub(&at, "name"),
                    format!(
                        "duplicate policy name {}; already used by {}",
                        quote(n),
                        p_at(*first)
                    ),
                ));
            } else {
                first_policy.insert(n, e.index);
            }
        }
        let Some(gw) = e.gateway_name else { continue };
        match by_name.get(gw) {
            None if references => out.push(Issue::new(
                sub(&at, "egress_gateway_name"),
                missing_gateway(gw, &defined),
            )),
            None => {}
            Some(ge) => {
                if let (Some(p), Some(g)) = (e.policy, ge.gateway) {
                    let label = || format!("{} ({})", quote(&g.name), g_at(ge.index));
                    out.extend(policy_with_gateway(p, g, &at, label));
                }
            }
        }
    }
    out
}

/// Every rule over whole lists of model objects: each object on its own, then [`between`]
/// them. Keys are `gateway[i]...` and `policy[i]...`.
pub fn objects(gateways: &[Gateway], policies: &[Policy]) -> Vec<Issue> {
    objects_with(gateways, policies, false)
}

/// [`objects`], but with `lists_checked` each policy's CIDR lists are taken as known to hold
/// network addresses, none twice (a committed policy after an edit that removed CIDRs and
/// appended checked ones not listed yet): those per-list checks sort each list, which at
/// 100 000 CIDRs was most of the edit's apply on every node. Everything else is checked.
pub fn objects_with(gateways: &[Gateway], policies: &[Policy], lists_checked: bool) -> Vec<Issue> {
    let mut out = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        out.extend(gateway(g, &index("gateway", i)));
    }
    for (i, p) in policies.iter().enumerate() {
        let at = index("policy", i);
        if lists_checked {
            out.extend(policy_names_and_sizes(p, &at));
            out.extend(policy_coherence(p, &at));
        } else {
            out.extend(policy(p, &at));
        }
    }
    let g: Vec<GatewayEntry<'_>> = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| GatewayEntry {
            index: i,
            name: Some(&g.name),
            gateway: Some(g),
        })
        .collect();
    let p: Vec<PolicyEntry<'_>> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| PolicyEntry {
            index: i,
            name: Some(&p.name),
            gateway_name: Some(&p.egress_gateway_name),
            policy: Some(p),
        })
        .collect();
    out.extend(between(&g, &p, true, ("gateway", "policy")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_lists_name_each_duplicate_and_bad_address_in_list_order() {
        let list: Vec<IpNet> = [
            "10.2.0.0/16",
            "10.1.0.0/16",
            "10.2.0.1/16",
            "10.2.0.0/16",
            "fd00::/64",
            "10.1.0.0/16",
            "10.2.0.0/16",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let got: Vec<(String, String)> = cidrs(list.iter().enumerate(), "d")
            .into_iter()
            .map(|i| (i.key, i.message))
            .collect();
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["d[2]", "d[3]", "d[5]", "d[6]"]);
        assert!(got[0].1.contains("host bits"), "{got:?}");
        assert!(
            got[1]
                .1
                .contains("10.2.0.0/16 is listed twice (also at d[0])")
        );
        assert!(
            got[2]
                .1
                .contains("10.1.0.0/16 is listed twice (also at d[1])")
        );
        assert!(got[3].1.contains("also at d[0]"));
        // A sorted list without duplicates, and an empty one, are fine.
        let mut sorted = list.clone();
        sorted.retain(|n| n.trunc() == *n);
        sorted.sort();
        sorted.dedup();
        assert!(cidrs(sorted.iter().enumerate(), "d").is_empty());
        assert!(cidrs(std::iter::empty(), "d").is_empty());
        // The same bits in both families are two networks, not one listed twice.
        let both: Vec<IpNet> = ["::/0", "0.0.0.0/0", "::a/128", "0.0.0.10/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(cidrs(both.iter().enumerate(), "d").is_empty());
    }

    #[test]
    fn suggestions() {
        let known = [
            "node",
            "cluster",
            "admin",
            "dataplane",
            "log",
            "kubernetes",
            "gateway",
            "policy",
        ];
        assert_eq!(suggest("gateways", &known), Some("gateway"));
        assert_eq!(suggest("policies", &known), None);
        assert_eq!(suggest("clutser", &known), Some("cluster"));
        assert_eq!(suggest("completely-different", &known), None);
    }

    fn vip_gateway(name: &str, vip: &str, next_hop: Option<&str>) -> Gateway {
        Gateway {
            name: name.to_string(),
            node_selector: Labels::new(),
            selection: crate::model::Selection::Alphabetical,
            preempt: true,
            source_ip: SourceIp::VirtualIp {
                ip: vip.parse().unwrap(),
                interfaces: vec!["eth1".to_string()],
            },
            next_hop: next_hop.map(|ip| crate::model::NextHop {
                ip: ip.parse().unwrap(),
                interface: "eth0".to_string(),
            }),
            conntrack_sync: false,
        }
    }

    fn a_policy(name: &str, gateway: &str, src: &str, dst: &str) -> Policy {
        Policy {
            name: name.to_string(),
            egress_gateway_name: gateway.to_string(),
            source_cidrs: vec![src.parse().unwrap()],
            destination_cidrs: vec![dst.parse().unwrap()],
            excluded_cidrs: vec![],
        }
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in [
            "egress",
            "node-role.deckhouse.io/egress",
            "a/b",
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
            "A_b.c-9",
            &"n".repeat(63),
            &format!(
                "{}/x",
                [
                    "a".repeat(63),
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(61)
                ]
                .join(".")
            ),
        ] {
            assert_eq!(label_key(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("bad key!", "contains ' '"),
            ("-egress", "start and end with a letter or digit"),
            ("egress_", "start and end with a letter or digit"),
            ("/egress", "empty prefix"),
            ("deckhouse.io/", "no name after '/'"),
            ("Deckhouse.io/egress", "prefix"),
            ("a..b/egress", "prefix"),
            ("a/b/c", "contains '/'"),
            ("zone\n", "contains '\\n'"),
        ] {
            let e = label_key(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(
            label_key(&"n".repeat(64))
                .unwrap_err()
                .contains("64 characters long")
        );
        let long_prefix = format!("{}.io/x", "a".repeat(250));
        assert!(label_key(&long_prefix).unwrap_err().contains("at most 253"));
    }

    #[test]
    fn label_values_follow_kubernetes() {
        for ok in ["", "a", "eu-west-1a", "v1.2_3", &"v".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("a\nb", "contains '\\n'"),
            ("-a", "start and end"),
            ("a b", "contains ' '"),
            ("x/y", "contains '/'"),
        ] {
            let e = label_value(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(
            label_value(&"v".repeat(64))
                .unwrap_err()
                .contains("64 characters")
        );
        let mut m = Labels::new();
        m.insert("bad key!".into(), "ok".into());
        m.insert("ok".into(), "a\nb".into());
        m.insert(String::new(), "x".into());
        let keys: Vec<String> = labels(&m, "node.labels")
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(
            keys,
            ["node.labels", "node.labels.\"bad key!\"", "node.labels.ok"]
        );
    }

    #[test]
    fn quoted_input_is_cut_short() {
        assert_eq!(quote("gw 1"), "\"gw 1\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        let long = "p".repeat(100_000);
        let q = quote(&long);
        assert!(q.len() < 120, "{q}");
        assert!(q.ends_with("…(99936 more characters)"), "{q}");
        let e = object_name(&long).unwrap_err();
        assert!(e.len() < 250, "{e}");
        assert!(e.contains("is 100000 characters long"), "{e}");
        // Multi-byte characters are counted, not cut in half.
        let q = quote(&"é".repeat(70));
        assert!(q.ends_with("…(6 more characters)"), "{q}");
        assert_eq!(
            map_key("node.labels", &"k".repeat(70)).len(),
            "node.labels.".len() + 66 + "…(6 more characters)".len()
        );
        let line = "x".repeat(1_000);
        assert!(shorten_lines(&format!("a\n{line}")).ends_with("…(800 more characters)"));
    }

    /// `conntrack_sync` is refused in PrimaryIP mode (its flows die with the source address
    /// whatever is replicated) and accepted with a VIP.
    #[test]
    fn conntrack_sync_needs_a_virtual_ip() {
        let mut vip = vip_gateway("a", "10.77.0.2", None);
        vip.conntrack_sync = true;
        assert!(gateway(&vip, "gateway[0]").is_empty());
        let mut primary = vip.clone();
        primary.source_ip = SourceIp::PrimaryIp {
            interface: "eth1".into(),
        };
        let issues = gateway(&primary, "gateway[0]");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "gateway[0].conntrack_sync");
        assert!(issues[0].message.contains("VirtualIPAddress"), "{issues:?}");
        primary.conntrack_sync = false;
        assert!(gateway(&primary, "gateway[0]").is_empty());
    }

    #[test]
    fn a_next_hop_is_held_by_one_gateway_only() {
        let e = objects(
            &[
                vip_gateway("a", "198.18.0.50", Some("10.77.0.1")),
                vip_gateway("b", "198.18.0.51", Some("10.77.0.1")),
                vip_gateway("c", "10.77.0.2", None),
                vip_gateway("d", "198.18.0.52", Some("10.77.0.2")),
                vip_gateway("e", "198.18.0.50", None),
            ],
            &[],
        );
        let shown: Vec<String> = e
            .iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect();
        assert_eq!(
            shown,
            [
                "gateway[1].next_hop.ip: 10.77.0.1 is already the next hop of gateway \"a\" (gateway[0]); two gateways cannot share one next hop (their active nodes could both hold it at once)",
                "gateway[3].next_hop.ip: 10.77.0.2 is the VIP of gateway \"c\" (gateway[2]); the next hop must be a different address",
                "gateway[4].source_ip.virtual_ip_address.ip: 198.18.0.50 is already the VIP of gateway \"a\" (gateway[0]); two gateways cannot share one VIP",
            ]
        );
        // A VIP equal to an earlier gateway's next hop.
        let e = objects(
            &[
                vip_gateway("a", "198.18.0.50", Some("10.77.0.1")),
                vip_gateway("b", "10.77.0.1", None),
            ],
            &[],
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "gateway[1].source_ip.virtual_ip_address.ip");
        assert!(
            e[0].message
                .contains("is already the next hop of gateway \"a\"")
        );
    }

    /// What the state machine can do when one gateway changes: check it on its own and against
    /// an index of the addresses of the others, without going over the whole set.
    #[test]
    fn one_changed_gateway_is_checked_against_an_index() {
        let committed = [
            vip_gateway("a", "198.18.0.50", Some("10.77.0.1")),
            vip_gateway("b", "198.18.0.51", None),
        ];
        let mut index: HashMap<IpAddr, (AddressUse, &str)> = HashMap::new();
        for g in &committed {
            for (ip, used) in addresses(g) {
                index.insert(ip, (used, &g.name));
            }
        }
        let changed = vip_gateway("c", "198.18.0.51", Some("10.77.0.1"));
        let owner = |ip: IpAddr| {
            index
                .get(&ip)
                .filter(|(_, name)| *name != changed.name)
                .map(|(used, name)| (*used, quote(name)))
        };
        let mut issues = gateway(&changed, "");
        issues.extend(gateway_addresses(&changed, "", owner));
        let shown: Vec<String> = issues
            .iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect();
        assert_eq!(
            shown,
            [
                "source_ip.virtual_ip_address.ip: 198.18.0.51 is already the VIP of gateway \"b\"; two gateways cannot share one VIP",
                "next_hop.ip: 10.77.0.1 is already the next hop of gateway \"a\"; two gateways cannot share one next hop (their active nodes could both hold it at once)",
            ]
        );
        // Replacing a gateway by itself is no conflict.
        let same = &committed[0];
        let owner = |ip: IpAddr| {
            index
                .get(&ip)
                .filter(|(_, name)| *name != same.name)
                .map(|(used, name)| (*used, quote(name)))
        };
        assert!(gateway_addresses(same, "", owner).is_empty());
    }

    #[test]
    fn one_changed_policy_is_checked_against_the_committed_gateways() {
        let committed: BTreeMap<String, Gateway> = [
            vip_gateway("a", "198.18.0.50", None),
            vip_gateway("b", "2001:db8::50", None),
        ]
        .into_iter()
        .map(|g| (g.name.clone(), g))
        .collect();
        let check = |p: &Policy| {
            let mut out = policy(p, "");
            out.extend(policy_reference(
                p,
                "",
                committed.get(&p.egress_gateway_name),
                || committed.keys().map(String::as_str).collect(),
            ));
            out
        };
        assert_eq!(check(&a_policy("p", "b", "fd00::/64", "::/0")), vec![]);
        let e = check(&a_policy("p", "nope", "10.0.0.0/8", "0.0.0.0/0"));
        assert_eq!(
            e,
            vec![Issue::new(
                "egress_gateway_name",
                "no gateway named \"nope\"; defined gateways: a, b"
            )]
        );
        let e = check(&a_policy("p", "a", "fd00::/64", "::/0"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].message.starts_with("gateway \"a\" has the IPv4 VIP"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn one_changed_policy_is_checked_with_its_gateway() {
        let g = vip_gateway("a", "198.18.0.50", None);
        let p = a_policy("p", "a", "fd00::/64", "::/0");
        assert!(policy(&p, "").is_empty());
        let e = policy_with_gateway(&p, &g, "", || quote(&g.name));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "egress_gateway_name");
        assert!(
            e[0].message
                .contains("has the IPv4 VIP 198.18.0.50, but this policy matches IPv6 traffic")
        );
        let known: Vec<String> = (0..12).map(|i| format!("g{i:02}")).collect();
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        let m = missing_gateway(&"x".repeat(1000), &known);
        assert!(
            m.ends_with(
                "defined gateways: g00, g01, g02, g03, g04, g05, g06, g07, g08, g09 and 2 more"
            ),
            "{m}"
        );
        assert!(m.len() < 200, "{m}");
    }

    #[test]
    fn whole_lists_and_single_objects_agree() {
        let gateways = [
            vip_gateway("a", "198.18.0.50", Some("198.18.0.50")),
            vip_gateway("b!", "0.0.0.0", None),
        ];
        let policies = [a_policy("p", "a", "10.0.0.1/24", "::/0")];
        let mut single: Vec<Issue> = Vec::new();
        for (i, g) in gateways.iter().enumerate() {
            single.extend(gateway(g, &format!("gateway[{i}]")));
        }
        single.extend(policy(&policies[0], "policy[0]"));
        assert_eq!(objects(&gateways, &policies), single);
        assert_eq!(single.len(), 5, "{single:#?}");
    }
}
