//! Connection tracking, through ctnetlink: reading the kernel's conntrack entries and deleting
//! the ones whose NAT decision egressd's table would no longer make.
//!
//! The kernel decides NAT once per connection, on its first packet, and keeps the decision in
//! the connection's conntrack entry for as long as the entry lives (a UDP flow that keeps
//! sending lives forever). So a policy change reaches new connections at once but a running one
//! only when its entry goes: a flow that left with its own address keeps doing so after a
//! policy selects it, and a flow translated to a gateway's address keeps that address after the
//! policy is deleted, excluded or moved, or after the gateway's source IP changed.
//! kube-proxy deletes stale entries of UDP services for the same reason.
//!
//! What is stale ([`stale`]): an entry whose (source, destination) the change reclassified —
//! another gateway (or none) wins it now, or the winning gateway's source address here changed —
//! and whose NAT state (untranslated, or translated to which address: the reply tuple's
//! destination) differs from what the table decides now. Only such entries are deleted, one by
//! one, never the table. The classification is the policy compiler's map ([`SnatMap::lookup`]),
//! the one the kernel holds; there is no second classifier. A gateway moving away from this
//! node alone reclassifies nothing: the old holder's entries keep the flows that still reach it
//! (stale neighbour caches) working until the announcement moves them. A gateway moving to this
//! node makes its untranslated entries stale: connections forwarded here as a standby
//! (redirected to the then active node) must not go on untranslated (the data plane drops
//! their packets until then, `nft.rs`).
//!
//! TCP: an established connection cannot change its source address; deleting its entry alone
//! would make its next packet a mid-stream new entry, translated anew, that the server does not
//! know. By default ([`TcpPolicy::Keep`]) TCP entries keep their old translation until the
//! connection ends. With [`TcpPolicy::Reset`] the entry is deleted and its tuple goes into
//! egressd's `ended4`/`ended6` sets for [`RESET_WINDOW`]: the table answers the client's next
//! packet of that connection (anything but a fresh SYN) with a TCP reset.
//!
//! Deleting can take long with 100 000 tracked flows (a dump of every entry, then a message per
//! deleted one), so it runs on a thread of its own ([`Sweeper`]): nothing waits for it, neither
//! the data-plane round nor the lease task.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::Roles;
use super::nfnl::{self, Batch, Data, Element, KeyBytes, Op, attrs};
use super::watch::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR, Query, be32, messages, push_header, recv_answer,
    send_all, u16_at, u32_at,
};
use crate::policy::{GwId, SnatMap};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// Conntrack status bit: the connection's source is translated.
const IPS_SRC_NAT: u32 = 1 << 4;
const NLM_F_ACK: u16 = 0x4;
/// Deletions sent in one datagram (each acknowledged).
const DELETE_CHUNK: usize = 256;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// How long the table answers an ended TCP connection's packets with a reset. A client idle
/// for longer sends its next packet into a new mid-stream entry, which the server, not knowing
/// the connection from that address, normally answers with a reset itself.
pub const RESET_WINDOW: Duration = Duration::from_secs(600);
/// egressd's sets of ended TCP connections and the chain that resets their packets (only
/// with [`TcpPolicy::Reset`]; see `nft.rs`).
pub const ENDED_SET4: &str = "ended4";
pub const ENDED_SET6: &str = "ended6";
pub const ENDED_CHAIN: &str = "ended";

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports for TCP, UDP, SCTP, ...; 0 for protocols without them (ICMP: id and type).
    pub sport: u16,
    pub dport: u16,
}

/// One conntrack entry as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The direction of the connection's first packet, as it arrived (before any NAT).
    pub orig: Tuple,
    /// The direction of the answers, as they arrive (after NAT: its destination is the address
    /// the source was translated to).
    pub reply: Tuple,
    pub status: u32,
    /// The kernel's id of the entry: a new entry of the same tuple has another.
    pub id: u32,
    /// Seconds left before the entry expires: a packet renews it, so the entries of flows
    /// that are sending have the most left.
    pub timeout: u32,
    family: u8,
    /// The raw `CTA_TUPLE_ORIG`, `CTA_ID` and `CTA_ZONE` attributes, sent back to delete it
    /// (the id makes sure a new entry with the same tuple is not deleted instead).
    key: Vec<u8>,
}

impl Flow {
    /// The address the source was translated to, or `None` when it was not.
    pub fn translated_to(&self) -> Option<IpAddr> {
        (self.status & IPS_SRC_NAT != 0).then_some(self.reply.dst)
    }

    /// The destination egressd's postrouting chain classified: after any DNAT (a service
    /// address rewritten to a backend's), which is the source of the answers.
    pub fn routed_dst(&self) -> IpAddr {
        self.reply.src
    }

    pub fn protocol(&self) -> &'static str {
        protocol_name(self.orig.proto)
    }

    /// An entry as a test builds it (not deletable: no kernel key).
    #[cfg(test)]
    pub(crate) fn example(orig: Tuple, translated_to: Option<IpAddr>) -> Flow {
        Flow {
            orig,
            reply: Tuple {
                src: orig.dst,
                dst: translated_to.unwrap_or(orig.src),
                proto: orig.proto,
                sport: orig.dport,
                dport: orig.sport,
            },
            status: if translated_to.is_some() {
                IPS_SRC_NAT
            } else {
                0
            },
            id: 0,
            timeout: 0,
            family: 0,
            key: Vec::new(),
        }
    }
}

/// The metric label of an IP protocol.
pub fn protocol_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP | IPPROTO_ICMPV6 => "icmp",
        _ => "other",
    }
}

fn address(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => <[u8; 4]>::try_from(v).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(v).ok().map(IpAddr::from),
        _ => None,
    }
}

fn be16(p: &[u8]) -> Option<u16> {
    <[u8; 2]>::try_from(p).ok().map(u16::from_be_bytes)
}

/// Reads a `CTA_TUPLE_*` attribute's payload.
fn parse_tuple(p: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, 0, 0);
    for (t, v, _) in attrs(p) {
        match t {
            CTA_TUPLE_IP => {
                for (t, a, _) in attrs(v) {
                    match t {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = address(a),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = address(a),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, a, _) in attrs(v) {
                    match t {
                        CTA_PROTO_NUM => proto = a.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(a).unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = be16(a).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// Appends the whole attribute at `off` of `a` to `key`, padded.
fn keep_attr(key: &mut Vec<u8>, a: &[u8], off: usize) {
    let len = u16_at(a, off) as usize;
    key.extend_from_slice(&a[off..off + len]);
    while !key.len().is_multiple_of(4) {
        key.push(0);
    }
}

/// Reads one conntrack entry from a dump message's attributes.
fn parse_flow(family: u8, a: &[u8]) -> Option<Flow> {
    let mut key = Vec::new();
    let (mut orig, mut reply) = (None, None);
    let mut status = 0;
    let mut id = 0;
    let mut timeout = 0;
    for (t, p, off) in attrs(a) {
        match t {
            CTA_TUPLE_ORIG => {
                keep_attr(&mut key, a, off);
                orig = parse_tuple(p);
            }
            CTA_TUPLE_REPLY => reply = parse_tuple(p),
            CTA_ID => {
                keep_attr(&mut key, a, off);
                id = be32(p).unwrap_or(0);
            }
            CTA_ZONE => keep_attr(&mut key, a, off),
            CTA_STATUS => status = be32(p)?,
            CTA_TIMEOUT => timeout = be32(p).unwrap_or(0),
            _ => {}
        }
    }
    Some(Flow {
        orig: orig?,
        reply: reply?,
        status,
        id,
        timeout,
        family,
        key,
    })
}

/// A ctnetlink socket, bound to the network namespace it was opened in.
pub struct Conntrack {
    q: Query,
}

impl Conntrack {
    /// Opens one in this process's network namespace, or in the named one (`ip netns`).
    pub fn open(netns: Option<&str>) -> io::Result<Conntrack> {
        Ok(Conntrack {
            q: Query::open(netns)?,
        })
    }

    /// Calls `each` with every entry of the table, IPv4 and IPv6.
    pub fn dump(&mut self, mut each: impl FnMut(Flow)) -> io::Result<()> {
        self.q.request(
            NFNL_SUBSYS_CTNETLINK,
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            0,
            &[],
            |m| {
                if let Some(f) = parse_flow(m[16], &m[20..]) {
                    each(f);
                }
            },
        )?;
        Ok(())
    }

    /// Deletes `flows` (as dumped), in their order; returns how many were deleted, per
    /// protocol (an entry already gone is not counted, and is no error).
    pub fn delete(&mut self, flows: &[Flow]) -> io::Result<BTreeMap<&'static str, usize>> {
        let mut deleted = BTreeMap::new();
        for chunk in flows.chunks(DELETE_CHUNK) {
            self.delete_chunk(chunk, &mut deleted)?;
        }
        Ok(deleted)
    }

    /// One datagram of deletions, one message each.
    fn delete_chunk(
        &mut self,
        flows: &[Flow],
        deleted: &mut BTreeMap<&'static str, usize>,
    ) -> io::Result<()> {
        let q = &mut self.q;
        let mut buf = Vec::with_capacity(flows.len() * 96);
        let first = q.seq.wrapping_add(1);
        let sent_flows: Vec<&Flow> = flows.iter().filter(|f| !f.key.is_empty()).collect();
        for f in &sent_flows {
            q.seq = q.seq.wrapping_add(1);
            let start = buf.len();
            push_header(
                &mut buf,
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                q.seq,
                f.family,
            );
            buf.extend_from_slice(&f.key);
            let len = (buf.len() - start) as u32;
            buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        }
        let sent = sent_flows.len();
        if buf.is_empty() {
            return Ok(());
        }
        let fd = q.sock.as_raw_fd();
        send_all(fd, &buf)?;
        let mut acked = 0;
        while acked < sent {
            let Some(n) = recv_answer(fd, &mut q.buf, "conntrack deletions")? else {
                continue;
            };
            for m in messages(&q.buf[..n]) {
                let seq = u32_at(m, 8);
                if u16_at(m, 4) != NLMSG_ERROR
                    || seq.wrapping_sub(first) >= sent as u32
                    || m.len() < 20
                {
                    continue;
                }
                acked += 1;
                match -i32::from_ne_bytes([m[16], m[17], m[18], m[19]]) {
                    0 => {
                        let f = sent_flows[seq.wrapping_sub(first) as usize];
                        *deleted.entry(f.protocol()).or_insert(0) += 1;
                    }
                    libc::ENOENT => {}
                    code => return Err(io::Error::from_raw_os_error(code)),
                }
            }
        }
        Ok(())
    }
}

/// Deletes the conntrack entries of network namespace `netns` whose source is not translated
/// and that `translate(src, dst)` says egressd translates: connections that began while the
/// SNAT table was missing. Without this, such a connection would go on un-NATed for as long as
/// its entry lives, also after the repair; deleted, its next packet starts a new entry, which
/// the table translates (a TCP connection begun un-NATed then breaks, which is what its server
/// would see anyway). Returns how many were deleted, per protocol.
pub fn drop_untranslated(
    netns: Option<&str>,
    translate: impl Fn(IpAddr, IpAddr) -> bool,
) -> io::Result<BTreeMap<&'static str, usize>> {
    let mut ct = Conntrack::open(netns)?;
    let mut flows = Vec::new();
    ct.dump(|f| {
        if f.translated_to().is_none() && translate(f.orig.src, f.routed_dst()) {
            flows.push(f);
        }
    })?;
    ct.delete(&flows)
}

// ------------------------------------------------------------------------------------------
// Which entries a change made stale

/// What egressd's table does with the first packet of a connection on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Nothing: no policy selects it (or an exclusion), or it is the node's own traffic.
    Pass,
    /// SNAT to this address: its policy's gateway is active here.
    Snat(IpAddr),
    /// Drop: its policy's gateway is active elsewhere, or nowhere.
    Drop,
}

/// What the table on this node decides, as the data plane installed it.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    /// The classification map (the one the kernel holds).
    pub map: Arc<SnatMap>,
    /// Every gateway's role here.
    pub roles: Roles,
    /// The host's addresses: its own traffic (`fib saddr type local`) and traffic to it are
    /// never classified.
    pub local: Arc<BTreeSet<IpAddr>>,
}

impl Classifier {
    fn gateway(&self, src: IpAddr, dst: IpAddr) -> Option<GwId> {
        if self.local.contains(&src) || self.local.contains(&dst) {
            return None;
        }
        self.map.lookup(src, dst)
    }

    /// Gateway `g`'s source address here, of `dst`'s family.
    fn source(&self, g: GwId, dst: IpAddr) -> Option<IpAddr> {
        let r = self.roles.get(&g)?;
        match dst {
            IpAddr::V4(_) => r.v4.map(IpAddr::V4),
            IpAddr::V6(_) => r.v6.map(IpAddr::V6),
        }
    }

    /// The decision for a new connection from `src` to `dst`.
    pub fn decide(&self, src: IpAddr, dst: IpAddr) -> Nat {
        match self.gateway(src, dst) {
            None => Nat::Pass,
            Some(g) => self.source(g, dst).map_or(Nat::Drop, Nat::Snat),
        }
    }

    /// Whether going from `self` to `next` reclassified `src → dst`: another gateway (or none)
    /// wins it, its gateway is active here in both and its source address changed, or its
    /// gateway became active here (a takeover). A connection this node forwarded as a standby
    /// (redirected to the active node, untranslated here) must not go on untranslated once
    /// this node holds the gateway; the data plane drops its packets meanwhile. A release
    /// alone reclassifies nothing (see the module documentation).
    pub fn reclassifies(&self, next: &Classifier, src: IpAddr, dst: IpAddr) -> bool {
        let g = self.gateway(src, dst);
        if g != next.gateway(src, dst) {
            return true;
        }
        g.is_some_and(|g| source_changed(self.source(g, dst), next.source(g, dst)))
    }

    /// Whether `next` may reclassify any connection at all (cheap: no connection looked at).
    pub fn may_reclassify(&self, next: &Classifier) -> bool {
        self.decisions_differ(next) || self.local != next.local || self.took_over(next)
    }

    /// Whether a gateway became active here (in a mode whose source address may not be a new
    /// local address, such as the interface's primary address).
    fn took_over(&self, next: &Classifier) -> bool {
        next.roles.iter().any(|(g, b)| {
            let a = self.roles.get(g).copied().unwrap_or_default();
            (a.v4.is_none() && b.v4.is_some()) || (a.v6.is_none() && b.v6.is_some())
        })
    }

    /// Whether the policies' classification or a source address of a gateway active in both
    /// differs: what an operator changed, as opposed to the node's own addresses.
    fn decisions_differ(&self, next: &Classifier) -> bool {
        let map = !Arc::ptr_eq(&self.map, &next.map) && *self.map != *next.map;
        map || self.roles.iter().any(|(g, a)| {
            next.roles.get(g).is_some_and(|b| {
                matches!((a.v4, b.v4), (Some(x), Some(y)) if x != y)
                    || matches!((a.v6, b.v6), (Some(x), Some(y)) if x != y)
            })
        })
    }
}

/// A gateway's source address here changed, or the gateway became active here.
fn source_changed(before: Option<IpAddr>, after: Option<IpAddr>) -> bool {
    match (before, after) {
        (Some(a), Some(b)) => a != b,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// Whether an entry translated to `translated_to` (`None`: not translated) is what `nat` makes.
pub fn agrees(nat: Nat, translated_to: Option<IpAddr>) -> bool {
    match (nat, translated_to) {
        (Nat::Pass, None) => true,
        (Nat::Snat(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Whether `flow` is stale after the changes of `history` (the classifications in force one
/// after the other since the last sweep, oldest first; the last is the kernel's now): a change
/// reclassified its (source, destination), and its NAT state is not what the table decides now.
/// An entry begun after the change agrees with it and stays; so does every connection the
/// changes did not reclassify, whatever its state.
pub fn stale(history: &[Arc<Classifier>], flow: &Flow) -> bool {
    let Some(now) = history.last() else {
        return false;
    };
    let (src, dst) = (flow.orig.src, flow.routed_dst());
    history
        .windows(2)
        .any(|w| w[0].reclassifies(&w[1], src, dst))
        && !agrees(now.decide(src, dst), flow.translated_to())
}

/// What to do with an established TCP connection whose entry is stale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpPolicy {
    /// Leave its entry: it keeps its old translation until it ends.
    #[default]
    Keep,
    /// End it: delete its entry and answer the client's next packet with a TCP reset.
    Reset,
}

impl TcpPolicy {
    pub fn parse(s: &str) -> Option<TcpPolicy> {
        match s {
            "keep" => Some(TcpPolicy::Keep),
            "reset" => Some(TcpPolicy::Reset),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TcpPolicy::Keep => "keep",
            TcpPolicy::Reset => "reset",
        }
    }
}

// ------------------------------------------------------------------------------------------
// The sweeper thread

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries read.
    pub examined: usize,
    /// Entries deleted, per protocol (`tcp`: connections ended with a reset).
    pub deleted: BTreeMap<&'static str, usize>,
    /// Stale TCP entries left alone ([`TcpPolicy::Keep`]).
    pub kept_tcp: usize,
    /// Classification changes the sweep covered (several changes in a row are swept once).
    pub changes: usize,
    /// Only the node's own addresses changed (a takeover adds the VIP) and nothing was stale:
    /// not worth an event.
    pub quiet: bool,
    pub took: Duration,
    /// Of `took`, reading the entries (the rest is deleting).
    pub read: Duration,
}

impl Sweep {
    pub fn deleted_total(&self) -> usize {
        self.deleted.values().sum()
    }
}

/// Where and how the sweeper works.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The network namespace (`ip netns` name), `None` for the process's own.
    pub netns: Option<String>,
    pub tcp: TcpPolicy,
    /// egressd's inet table, which holds the sets of ended connections with `Reset`.
    pub table: String,
}

#[derive(Default)]
struct Queue {
    /// The classification the last sweep left the table agreeing with.
    base: Option<Arc<Classifier>>,
    /// Classifications installed since, oldest first.
    pending: Vec<Arc<Classifier>>,
    /// A sweep is running.
    busy: bool,
    stop: bool,
}

/// At most this many classifications wait for a sweep; beyond, the newest replaces the last
/// (a change installed and changed again within one sweep: entries begun under it in the
/// regions only it reclassified may stay until they end).
const MAX_PENDING: usize = 64;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sweeps stale conntrack entries on a thread of its own after each classification change.
pub struct Sweeper {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the thread; `report` is called on it after every sweep, `failed` after a sweep
    /// that could not finish.
    pub fn start(
        settings: Settings,
        report: impl Fn(&Sweep) + Send + 'static,
        failed: impl Fn(&io::Error) + Send + 'static,
    ) -> io::Result<Sweeper> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let span = tracing::Span::current();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("conntrack".into())
            .spawn(move || {
                let _span = span.entered();
                run(&s, &settings, &report, &failed);
            })?;
        Ok(Sweeper {
            shared,
            thread: Some(thread),
        })
    }

    /// The data plane now installs `c`. The first classification is the starting point; a
    /// later one that may reclassify connections wakes the thread.
    pub fn installed(&self, c: Classifier) {
        let mut q = self.shared.lock();
        let last = q.pending.last().or(q.base.as_ref()).cloned();
        match last {
            None => q.base = Some(Arc::new(c)),
            Some(last) if !last.may_reclassify(&c) => {
                // A takeover, a release, or nothing: the newest stands for the last.
                let c = Arc::new(c);
                match q.pending.last_mut() {
                    Some(p) => *p = c,
                    None => q.base = Some(c),
                }
            }
            Some(_) => {
                if q.pending.len() >= MAX_PENDING {
                    q.pending.pop();
                }
                q.pending.push(Arc::new(c));
                self.shared.wake.notify_all();
            }
        }
    }

    /// Waits until no change waits for a sweep and none runs, up to `limit` (tests, benches).
    pub fn settle(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut q = self.shared.lock();
        while q.busy || !q.pending.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .shared
                .wake
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, settings: &Settings, report: &dyn Fn(&Sweep), failed: &dyn Fn(&io::Error)) {
    let mut ct: Option<Conntrack> = None;
    let mut resets: Option<nfnl::Socket> = None;
    loop {
        let history = {
            let mut q = shared.lock();
            while !q.stop && q.pending.is_empty() {
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.stop {
                return;
            }
            q.busy = true;
            let mut h: Vec<Arc<Classifier>> = q.base.iter().cloned().collect();
            h.append(&mut q.pending);
            h
        };
        let newest = || shared.lock().pending.last().cloned();
        let result = match ct.as_mut() {
            Some(c) => sweep(c, &mut resets, settings, &history, newest),
            None => Conntrack::open(settings.netns.as_deref())
                .and_then(|c| sweep(ct.insert(c), &mut resets, settings, &history, newest)),
        };
        match result {
            Ok(s) => report(&s),
            Err(e) => {
                // A socket in an unknown state: open a fresh one next time.
                ct = None;
                resets = None;
                failed(&e);
            }
        }
        let mut q = shared.lock();
        // Swept or not, the table agrees with the last one as far as this sweep could make it;
        // a failed sweep is not retried in a loop (the next change sweeps again).
        q.base = history.last().cloned();
        q.busy = false;
        shared.wake.notify_all();
    }
}

/// One sweep: reads every entry, keeps the stale ones, and deletes them (ending TCP ones with
/// `Reset`, leaving them with `Keep`).
fn sweep(
    ct: &mut Conntrack,
    resets: &mut Option<nfnl::Socket>,
    settings: &Settings,
    history: &[Arc<Classifier>],
    newest: impl Fn() -> Option<Arc<Classifier>>,
) -> io::Result<Sweep> {
    let started = Instant::now();
    let mut out = Sweep {
        changes: history.len().saturating_sub(1),
        ..Sweep::default()
    };
    let mut found = Vec::new();
    ct.dump(|f| {
        out.examined += 1;
        if stale(history, &f) {
            found.push(f);
        }
    })?;
    out.read = started.elapsed();
    // A change installed while reading: an entry the newest classification agrees with may
    // have begun under it; the next sweep judges it.
    if let Some(n) = newest() {
        found.retain(|f| !agrees(n.decide(f.orig.src, f.routed_dst()), f.translated_to()));
    }
    // The entries with the most time left first: packets renew an entry, so these are the flows
    // that are sending now, whose next packets wait for this (at 100 000 stale entries the
    // deletions take most of a second).
    found.sort_by_key(|f| std::cmp::Reverse(f.timeout));
    let (tcp, other): (Vec<Flow>, Vec<Flow>) =
        found.into_iter().partition(|f| f.orig.proto == IPPROTO_TCP);
    let mut deleted = ct.delete(&other)?;
    match settings.tcp {
        TcpPolicy::Keep => out.kept_tcp = tcp.len(),
        TcpPolicy::Reset if !tcp.is_empty() => {
            // The reset first: the client's next packet must meet it, not a fresh entry.
            let sock = match resets {
                Some(s) => s,
                None => resets.insert(nfnl::Socket::open(settings.netns.as_deref())?),
            };
            sock.send(ended_batch(&settings.table, &tcp))
                .map_err(|e| io::Error::other(format!("adding ended connections: {e}")))?;
            deleted.extend(ct.delete(&tcp)?);
        }
        TcpPolicy::Reset => {}
    }
    out.deleted = deleted;
    out.took = started.elapsed();
    out.quiet = out.deleted.is_empty()
        && out.kept_tcp == 0
        && !history.windows(2).any(|w| w[0].decisions_differ(&w[1]));
    debug!(
        examined = out.examined,
        deleted = out.deleted_total(),
        kept_tcp = out.kept_tcp,
        took_ms = out.took.as_secs_f64() * 1e3,
        "conntrack sweep"
    );
    Ok(out)
}

/// The key of an ended connection in `ended4`/`ended6`: `saddr . sport . daddr . dport` as the
/// client's packets carry them at the forward hook (after any DNAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended<A>(pub A, pub u16, pub A, pub u16);

impl<A: KeyBytes> KeyBytes for Ended<A> {
    fn put(self, out: &mut Vec<u8>) {
        // Each part of a concatenation takes whole 32-bit registers: a port is padded to four.
        self.0.put(out);
        out.extend_from_slice(&self.1.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        self.2.put(out);
        out.extend_from_slice(&self.3.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    const WIDTH: usize = 2 * A::WIDTH + 8;
    fn show(b: &[u8]) -> String {
        if b.len() != Self::WIDTH {
            return format!("{b:02x?}");
        }
        let (a, rest) = b.split_at(A::WIDTH);
        let (p, rest) = rest.split_at(4);
        let (c, q) = rest.split_at(A::WIDTH);
        format!(
            "{} . {} . {} . {}",
            A::show(a),
            u16::from_be_bytes([p[0], p[1]]),
            A::show(c),
            u16::from_be_bytes([q[0], q[1]])
        )
    }
}

/// The batch that adds `flows` to the sets of ended connections for [`RESET_WINDOW`].
fn ended_batch(table: &str, flows: &[Flow]) -> Batch {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for f in flows {
        // At the forward hook the destination is the routed one (after DNAT), and so is its
        // port: the reply's source.
        match (f.orig.src, f.routed_dst()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => v4.push(Ended(s, f.orig.sport, d, f.reply.sport)),
            (IpAddr::V6(s), IpAddr::V6(d)) => v6.push(Ended(s, f.orig.sport, d, f.reply.sport)),
            _ => {}
        }
    }
    let timeout_ms = Some(RESET_WINDOW.as_millis() as u64);
    let mut b = Batch::new();
    let op = Op::Add { exclusive: false };
    b.elements::<Ended<Ipv4Addr>>(
        op,
        nfnl::NFPROTO_INET,
        table,
        ENDED_SET4,
        v4.into_iter().map(|k| Element {
            key: (k, None),
            key_end: None,
            data: Data::None,
            timeout_ms,
            interval_end: false,
        }),
    );
    b.elements::<Ended<Ipv6Addr>>(
        op,
        nfnl::NFPROTO_INET,
        table,
        ENDED_SET6,
        v6.into_iter().map(|k| Element {
            key: (k, None),
            key_end: None,
            data: Data::None,
            timeout_ms,
            interval_end: false,
        }),
    );
    b
}

/// Logs a sweep that could not finish.
pub fn log_failure(e: &io::Error) {
    warn!(
        error = %e,
        "cannot delete the conntrack entries a policy change made stale: those connections \
         keep their old translation until they end"
    );
}

#[cfg(test)]
mod tests;
