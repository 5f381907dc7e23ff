//! Watching egressd's nftables tables, and healing them when something outside changes them.
//!
//! Something outside may remove or alter egressd's tables at any time: `nft flush ruleset` (what
//! `systemctl restart nftables` does with a file that begins with `flush ruleset`), `nft delete
//! table inet egressd`, a deleted chain or map, a foreign rule added to one of egressd's chains.
//! Without a repair, the client traffic leaves un-NATed and nothing says so.
//!
//! - **Notifications.** A netlink socket subscribed to `NFNLGRP_NFTABLES` hears every committed
//!   nftables change: the table, chain, rule, set, element and object messages of a transaction,
//!   then the `NFT_MSG_NEWGEN` that closes it, carrying the process id and name that made it
//!   (`NFTA_GEN_PROC_PID`, `NFTA_GEN_PROC_NAME`; the id is the kernel's thread id). Every message
//!   of a transaction carries the port id of the socket that sent it (`nlmsg_pid`).
//! - **Own or outside.** egressd's own transactions come from its netlink sockets (element
//!   batches: their port ids are registered in [`own`] while they are open) or from the `nft`
//!   processes it spawned (their pids are registered as they are spawned; `nft`'s socket port id
//!   is its pid as well). A transaction that touches egressd's tables (`inet <t>` for SNAT;
//!   `arp <t>`, `ip6 <t>`, `netdev <t>` for the fence) and is not egressd's own is an outside
//!   change. Foreign tables are never looked at beyond their names.
//! - **Expiry is not tampering.** A lease element that times out is the fence working. On this
//!   kernel (6.18) expired elements of egressd's lease sets (rbtree intervals with timeouts) are
//!   collected without a notification (checked: `tests/e2e_heal.rs`, which fails on any repair
//!   while leases only expire).
//! - **Repair.** An outside change marks the part it touched (SNAT or fence) as needing repair
//!   and wakes the task that owns it ([`Heal`]): the data-plane task forgets what it installed, so
//!   that its next round does a full replace; the lease task forgets its fence tables, so that
//!   its next round rebuilds them with only the leases it holds now (a lease that ended is never
//!   put back). Between the change and the repair, the status says "not converged" and claims no
//!   gateway held. Something that keeps changing the tables is not fought in a loop: repairs
//!   closer than [`FIGHT`] to the previous one wait, 250 ms, then twice as long each time, up to
//!   8 s, and the status says so.
//! - **Backstop.** Notifications can be lost (the socket's buffer overflows) or missed (a large
//!   load is sent while the watcher is deaf, see [`Own::quiet`]). A check every [`BACKSTOP`]
//!   lists egressd's tables, chains, rules and sets through netlink dumps and compares them with
//!   what the tasks say they installed ([`Manifest`]); after lost or missed notifications it also
//!   counts the elements of every map. No `nft` process is run for it.
//! - **Why deaf windows.** With a listener on the group, the kernel builds one notification per
//!   element of a transaction: a 100 000-element load took ~3 s instead of ~1.1 s here. Batches of
//!   [`QUIET_MIN`] elements or more are therefore sent with the watcher unsubscribed, and a
//!   complete check (element counts included) follows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::nfnl::{self, attrs, wait_readable};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNLGRP_NFTABLES: libc::c_int = 7;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_DROP_MEMBERSHIP: libc::c_int = 2;

pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_DELOBJ: u16 = 20;
const NFT_MSG_NEWFLOWTABLE: u16 = 22;
const NFT_MSG_DELFLOWTABLE: u16 = 24;
const NFT_MSG_DESTROYTABLE: u16 = 26;
const NFT_MSG_DESTROYCHAIN: u16 = 27;
const NFT_MSG_DESTROYRULE: u16 = 28;
const NFT_MSG_DESTROYSET: u16 = 29;
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFT_MSG_DESTROYOBJ: u16 = 31;
const NFT_MSG_DESTROYFLOWTABLE: u16 = 32;

/// Attribute 1 is the table's name (tables) or the table an object belongs to (everything else).
const ATTR_TABLE: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_FLOWTABLE_NAME: u16 = 2;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
const NFT_SET_MAP: u32 = 0x8;

pub const NFPROTO_INET: u8 = nfnl::NFPROTO_INET;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_ARP: u8 = nfnl::NFPROTO_ARP;
pub const NFPROTO_NETDEV: u8 = nfnl::NFPROTO_NETDEV;
pub const NFPROTO_BRIDGE: u8 = 7;
pub const NFPROTO_IPV6: u8 = nfnl::NFPROTO_IPV6;

/// How often the backstop check lists egressd's tables.
pub const BACKSTOP: Duration = Duration::from_secs(5);
/// A repair needed within this long of the previous one's start is a fight: it waits.
pub const FIGHT: Duration = Duration::from_secs(2);
/// The first wait of a fight, doubled at each further repair of the fight up to [`MAX_GAP`].
pub const MIN_GAP: Duration = Duration::from_millis(250);
pub const MAX_GAP: Duration = Duration::from_secs(8);
/// Element batches at least this large are sent while the watcher is deaf (see the module
/// documentation).
pub const QUIET_MIN: usize = 10_000;
/// How long own sockets and `nft` processes are remembered after they closed or were spawned:
/// far longer than any notification takes to be read.
const REMEMBER: Duration = Duration::from_secs(60);
/// The watcher's receive buffer: a 10 000-element transaction's notifications fit.
const EVENT_BUFFER: libc::c_int = 32 << 20;

/// The family as nft names it.
pub fn family_name(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        NFPROTO_IPV4 => "ip",
        NFPROTO_ARP => "arp",
        NFPROTO_NETDEV => "netdev",
        NFPROTO_BRIDGE => "bridge",
        NFPROTO_IPV6 => "ip6",
        _ => "unknown",
    }
}

// ------------------------------------------------------------------------------------------
// Decoding notifications

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Table,
    Chain,
    Rule,
    Set,
    Element,
    Object,
    Flowtable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    New,
    Del,
}

/// One object message of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub op: Op,
    pub family: u8,
    pub table: String,
    /// The chain, set, object or flowtable; for a rule its chain; for elements their set.
    pub name: Option<String>,
    /// A set message with the map flag.
    pub map: bool,
    /// Elements in an element message.
    pub elements: usize,
    /// A table message's flags (e.g. 1: dormant).
    pub table_flags: Option<u32>,
    /// The port id of the socket that sent the transaction (0: the kernel itself).
    pub portid: u32,
}

/// The message that closes a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub id: u32,
    /// The kernel's id of the thread that committed (`task_pid_nr`), 0 when absent.
    pub pid: u32,
    pub comm: String,
    pub portid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Change(Change),
    Gen(Generation),
}

pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn be32(p: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(p).ok().map(u32::from_be_bytes)
}

fn string(p: &[u8]) -> String {
    let p = p.split(|b| *b == 0).next().unwrap_or(p);
    String::from_utf8_lossy(p).into_owned()
}

/// The netlink messages of one datagram.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 16 > buf.len() {
            return None;
        }
        let len = u32_at(buf, off) as usize;
        if len < 16 || off + len > buf.len() {
            return None;
        }
        let m = &buf[off..off + len];
        off += (len + 3) & !3;
        Some(m)
    })
}

/// Decodes one nftables notification; `None` for anything else (other subsystems, message
/// types egressd does not look at, truncated messages).
pub fn decode(msg: &[u8]) -> Option<Notice> {
    if msg.len() < 20 {
        return None;
    }
    let ty = u16_at(msg, 4);
    if ty >> 8 != NFNL_SUBSYS_NFTABLES {
        return None;
    }
    let portid = u32_at(msg, 12);
    let family = msg[16];
    let body = &msg[20..];
    let attr = |t: u16| attrs(body).find(|(a, _, _)| *a == t).map(|(_, p, _)| p);
    let text = |t: u16| attr(t).map(string);
    let msg_type = ty & 0xff;
    if msg_type == NFT_MSG_NEWGEN {
        return Some(Notice::Gen(Generation {
            id: attr(NFTA_GEN_ID).and_then(be32).unwrap_or(0),
            pid: attr(NFTA_GEN_PROC_PID).and_then(be32).unwrap_or(0),
            comm: text(NFTA_GEN_PROC_NAME).unwrap_or_default(),
            portid,
        }));
    }
    // `nft destroy` is announced as a deletion; both are read as such.
    let (kind, op, name_attr) = match msg_type {
        NFT_MSG_NEWTABLE => (Kind::Table, Op::New, None),
        NFT_MSG_DELTABLE | NFT_MSG_DESTROYTABLE => (Kind::Table, Op::Del, None),
        NFT_MSG_NEWCHAIN => (Kind::Chain, Op::New, Some(NFTA_CHAIN_NAME)),
        NFT_MSG_DELCHAIN | NFT_MSG_DESTROYCHAIN => (Kind::Chain, Op::Del, Some(NFTA_CHAIN_NAME)),
        NFT_MSG_NEWRULE => (Kind::Rule, Op::New, Some(NFTA_RULE_CHAIN)),
        NFT_MSG_DELRULE | NFT_MSG_DESTROYRULE => (Kind::Rule, Op::Del, Some(NFTA_RULE_CHAIN)),
        NFT_MSG_NEWSET => (Kind::Set, Op::New, Some(NFTA_SET_NAME)),
        NFT_MSG_DELSET | NFT_MSG_DESTROYSET => (Kind::Set, Op::Del, Some(NFTA_SET_NAME)),
        NFT_MSG_NEWSETELEM => (Kind::Element, Op::New, Some(NFTA_SET_ELEM_LIST_SET)),
        NFT_MSG_DELSETELEM | NFT_MSG_DESTROYSETELEM => {
            (Kind::Element, Op::Del, Some(NFTA_SET_ELEM_LIST_SET))
        }
        NFT_MSG_NEWOBJ => (Kind::Object, Op::New, Some(NFTA_OBJ_NAME)),
        NFT_MSG_DELOBJ | NFT_MSG_DESTROYOBJ => (Kind::Object, Op::Del, Some(NFTA_OBJ_NAME)),
        NFT_MSG_NEWFLOWTABLE => (Kind::Flowtable, Op::New, Some(NFTA_FLOWTABLE_NAME)),
        NFT_MSG_DELFLOWTABLE | NFT_MSG_DESTROYFLOWTABLE => {
            (Kind::Flowtable, Op::Del, Some(NFTA_FLOWTABLE_NAME))
        }
        _ => return None,
    };
    let table = text(ATTR_TABLE)?;
    let elements = if kind == Kind::Element {
        attr(NFTA_SET_ELEM_LIST_ELEMENTS).map_or(0, |l| attrs(l).count())
    } else {
        0
    };
    Some(Notice::Change(Change {
        kind,
        op,
        family,
        table,
        name: name_attr.and_then(text),
        map: kind == Kind::Set
            && attr(NFTA_SET_FLAGS)
                .and_then(be32)
                .is_some_and(|f| f & NFT_SET_MAP != 0),
        elements,
        table_flags: if kind == Kind::Table {
            attr(NFTA_TABLE_FLAGS).and_then(be32)
        } else {
            None
        },
        portid,
    }))
}

// ------------------------------------------------------------------------------------------
// Which tables are egressd's, and what a transaction did to them

/// The two things egressd keeps in nftables, each repaired by the task that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// `inet <t>`: classification maps and gateway chains (the data-plane task).
    Snat,
    /// `arp <t>`, `ip6 <t>`, `netdev <t>`: the lease fence (the lease task).
    Fence,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Snat, Part::Fence];

    fn index(self) -> usize {
        match self {
            Part::Snat => 0,
            Part::Fence => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Part::Snat => "SNAT",
            Part::Fence => "fence",
        }
    }
}

/// egressd's tables: one name, four families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ours {
    pub table: String,
}

impl Ours {
    pub fn part(&self, family: u8, table: &str) -> Option<Part> {
        if table != self.table {
            return None;
        }
        match family {
            NFPROTO_INET => Some(Part::Snat),
            NFPROTO_ARP | NFPROTO_IPV6 | NFPROTO_NETDEV => Some(Part::Fence),
            _ => None,
        }
    }
}

/// The messages of one transaction, gathered until its `NEWGEN`.
#[derive(Debug, Default)]
pub struct Tracker {
    changes: Vec<Change>,
    /// Messages about egressd's tables dropped beyond the first ones (a 100 000-element load).
    more: usize,
}

/// Messages about egressd's tables kept per transaction, for the description.
const KEEP_CHANGES: usize = 64;

/// A transaction that touched egressd's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub generation: Generation,
    /// The messages about egressd's tables (the first [`KEEP_CHANGES`]).
    pub changes: Vec<Change>,
}

impl Tracker {
    /// Takes one notice; returns the transaction it closes, if that touched egressd's tables.
    pub fn feed(&mut self, ours: &Ours, notice: Notice) -> Option<Transaction> {
        match notice {
            Notice::Change(c) => {
                if ours.part(c.family, &c.table).is_some() {
                    if self.changes.len() < KEEP_CHANGES {
                        self.changes.push(c);
                    } else {
                        self.more += 1;
                    }
                }
                None
            }
            Notice::Gen(generation) => {
                self.more = 0;
                let changes = std::mem::take(&mut self.changes);
                (!changes.is_empty()).then_some(Transaction {
                    generation,
                    changes,
                })
            }
        }
    }

    /// Forgets a transaction in progress (after lost notifications).
    pub fn reset(&mut self) {
        self.changes.clear();
        self.more = 0;
    }
}

/// Whether a transaction (or one of its messages) is egressd's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Own,
    Outside,
    /// Not known yet: an `nft` is being spawned and may not be registered yet.
    Unsure,
}

/// What egressd knows of its own sockets and processes at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub portids: BTreeSet<u32>,
    pub pids: BTreeSet<u32>,
    /// `nft` processes being spawned, not registered yet.
    pub spawning: usize,
}

/// The origin of the messages of `t` sent from port `portid`: own when the port is one of
/// egressd's sockets, or when the transaction was committed by (or from the socket of) an `nft`
/// egressd spawned; messages from the kernel itself (port 0) are own too (they are not changes
/// anybody made: e.g. a device of a netdev chain going away).
pub fn classify(known: &Known, generation: &Generation, portid: u32) -> Origin {
    if portid == 0 || known.portids.contains(&portid) {
        return Origin::Own;
    }
    // An nft process binds its socket to its pid (in its pid namespace); the kernel names the
    // committing thread by its global id. Either matches a child egressd spawned.
    if portid == generation.portid
        && (known.pids.contains(&generation.pid) || known.pids.contains(&portid))
    {
        return Origin::Own;
    }
    if known.spawning > 0 {
        return Origin::Unsure;
    }
    Origin::Outside
}

/// An outside change to one part, as the status, the log and the event say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tamper {
    pub part: Part,
    /// The tables it touched, as nft names them (`inet egressd`): the repair counter's label.
    pub objects: BTreeSet<String>,
    /// What happened, e.g. "table inet egressd was removed".
    pub what: String,
    pub by: Culprit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Culprit {
    /// A process (the kernel's thread id and name of the committing thread).
    Process { pid: u32, comm: String },
    /// Found by the backstop check.
    Check,
    /// Found by the check that follows lost or missed notifications.
    Lost,
}

impl Tamper {
    /// "table inet egressd was removed from outside (by nft, pid 4242)".
    pub fn describe(&self) -> String {
        match &self.by {
            Culprit::Process { pid, comm } => {
                let comm = if comm.is_empty() { "?" } else { comm };
                format!("{} from outside (by {comm}, pid {pid})", self.what)
            }
            Culprit::Check => format!("{} (found by the periodic check)", self.what),
            Culprit::Lost => format!(
                "{} (found by the check after lost nftables notifications)",
                self.what
            ),
        }
    }
}

/// Describes what the outside messages `changes` did to each part.
pub fn tampers(ours: &Ours, generation: &Generation, changes: &[&Change]) -> Vec<Tamper> {
    let mut out = Vec::new();
    for part in Part::ALL {
        let mine: Vec<&Change> = changes
            .iter()
            .copied()
            .filter(|c| ours.part(c.family, &c.table) == Some(part))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let objects: BTreeSet<String> = mine
            .iter()
            .map(|c| format!("{} {}", family_name(c.family), c.table))
            .collect();
        out.push(Tamper {
            part,
            objects,
            what: summary(&mine),
            by: Culprit::Process {
                pid: generation.pid,
                comm: generation.comm.clone(),
            },
        });
    }
    out
}

/// A few words for what `changes` (all about one part) did: table removals first, then the
/// other deletions, then the rest.
fn summary(changes: &[&Change]) -> String {
    let mut lines: Vec<String> = Vec::new();
    let removed: BTreeSet<String> = changes
        .iter()
        .filter(|c| c.kind == Kind::Table && c.op == Op::Del)
        .map(|c| format!("{} {}", family_name(c.family), c.table))
        .collect();
    for t in &removed {
        lines.push(format!("table {t} was removed"));
    }
    let in_removed =
        |c: &Change| removed.contains(&format!("{} {}", family_name(c.family), c.table));
    // Elements are summed per set.
    let mut elements: BTreeMap<(Op, String), usize> = BTreeMap::new();
    let mut rest: Vec<String> = Vec::new();
    for c in changes.iter().filter(|c| !in_removed(c)) {
        let t = format!("{} {}", family_name(c.family), c.table);
        let name = c.name.as_deref().unwrap_or("?");
        match (c.kind, c.op) {
            (Kind::Element, op) => {
                *elements.entry((op, format!("{t} {name}"))).or_default() += c.elements.max(1)
            }
            // Counted above (every message of a removed table is skipped).
            (Kind::Table, Op::Del) => {}
            (Kind::Table, Op::New) => rest.push(match c.table_flags {
                Some(f) if f & 1 != 0 => format!("table {t} was made dormant"),
                _ => format!("table {t} was created or changed"),
            }),
            (Kind::Chain, Op::Del) => rest.insert(0, format!("chain {t} {name} was deleted")),
            (Kind::Chain, Op::New) => rest.push(format!("chain {t} {name} was created or changed")),
            (Kind::Set, Op::Del) => {
                let kind = if c.map { "map" } else { "set" };
                rest.insert(0, format!("{kind} {t} {name} was deleted"));
            }
            (Kind::Set, Op::New) => rest.push(format!("set {t} {name} was created")),
            (Kind::Rule, Op::Del) => rest.push(format!("a rule of chain {t} {name} was deleted")),
            (Kind::Rule, Op::New) => rest.push(format!("a rule was added to chain {t} {name}")),
            (Kind::Object, op) => rest.push(format!(
                "object {t} {name} was {}",
                if op == Op::Del {
                    "deleted"
                } else {
                    "created or changed"
                }
            )),
            (Kind::Flowtable, op) => rest.push(format!(
                "flowtable {t} {name} was {}",
                if op == Op::Del {
                    "deleted"
                } else {
                    "created or changed"
                }
            )),
        }
    }
    for ((op, set), n) in elements {
        let verb = if op == Op::Del {
            "deleted from"
        } else {
            "added to"
        };
        let s = if n == 1 { "" } else { "s" };
        rest.push(format!("{n} element{s} {verb} {set}"));
    }
    let mut seen = BTreeSet::new();
    rest.retain(|l| seen.insert(l.clone()));
    lines.extend(rest);
    let total = lines.len();
    let mut s = lines.into_iter().take(3).collect::<Vec<_>>().join(", ");
    if total > 3 {
        let _ = write!(s, " and {} more changes", total - 3);
    }
    s
}

// ------------------------------------------------------------------------------------------
// egressd's own sockets and processes (process-wide)

/// What this process knows of its own nftables sockets and `nft` children. Process-wide:
/// "own" means made by this process.
pub struct Own {
    inner: Mutex<OwnInner>,
    spawning: AtomicUsize,
}

#[derive(Default)]
struct OwnInner {
    /// Port id → when the socket closed (`None`: open).
    sockets: BTreeMap<u32, Option<Instant>>,
    /// `nft` children: pid and when it was spawned.
    children: VecDeque<(u32, Instant)>,
    /// Live watchers, for deaf windows.
    listeners: Vec<Weak<Listener>>,
}

/// The process-wide registry.
pub fn own() -> &'static Own {
    static OWN: OnceLock<Own> = OnceLock::new();
    OWN.get_or_init(|| Own {
        inner: Mutex::new(OwnInner::default()),
        spawning: AtomicUsize::new(0),
    })
}

/// Registers an `nft` being spawned: `spawned` with its pid once known; dropping the guard ends
/// the spawn (the watcher waits for it before it calls a transaction of an unknown process
/// outside).
pub struct Spawning<'a> {
    own: &'a Own,
}

impl Spawning<'_> {
    pub fn spawned(&self, pid: u32) {
        let mut g = self.own.lock();
        let now = Instant::now();
        while g
            .children
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > REMEMBER)
        {
            g.children.pop_front();
        }
        g.children.push_back((pid, now));
    }
}

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        self.own.spawning.fetch_sub(1, Ordering::SeqCst);
    }
}

/// While alive, the watchers of its network namespace are unsubscribed (see [`Own::quiet`]).
pub struct Quiet {
    listeners: Vec<Arc<Listener>>,
}

impl Drop for Quiet {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.hear();
        }
    }
}

impl Own {
    fn lock(&self) -> std::sync::MutexGuard<'_, OwnInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn socket_opened(&self, portid: u32) {
        self.lock().sockets.insert(portid, None);
    }

    pub fn socket_closed(&self, portid: u32) {
        let mut g = self.lock();
        let now = Instant::now();
        g.sockets
            .retain(|_, closed| closed.is_none_or(|at| now.duration_since(at) < REMEMBER));
        if let Some(c) = g.sockets.get_mut(&portid) {
            *c = Some(now);
        }
    }

    /// Call before spawning an `nft`; see [`Spawning`].
    pub fn spawning(&self) -> Spawning<'_> {
        self.spawning.fetch_add(1, Ordering::SeqCst);
        Spawning { own: self }
    }

    pub fn known(&self) -> Known {
        // Read `spawning` first: a spawn that ends after this still has its pid registered below.
        let spawning = self.spawning.load(Ordering::SeqCst);
        let g = self.lock();
        Known {
            portids: g.sockets.keys().copied().collect(),
            pids: g.children.iter().map(|(p, _)| *p).collect(),
            spawning,
        }
    }

    /// Before an element batch of `elements` elements in network namespace `netns`: a large one
    /// is sent with that namespace's watchers unsubscribed (the kernel then builds no
    /// notification per element); they check everything once it is over.
    pub fn quiet(&self, netns: Option<&str>, elements: usize) -> Option<Quiet> {
        if elements < QUIET_MIN {
            return None;
        }
        let listeners: Vec<Arc<Listener>> = {
            let mut g = self.lock();
            g.listeners.retain(|w| w.strong_count() > 0);
            g.listeners
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|l| l.netns.as_deref() == netns)
                .collect()
        };
        if listeners.is_empty() {
            return None;
        }
        for l in &listeners {
            l.deafen();
        }
        Some(Quiet { listeners })
    }

    fn add_listener(&self, l: &Arc<Listener>) {
        self.lock().listeners.push(Arc::downgrade(l));
    }
}

/// The parent pid of `pid`, from `/proc` (a child egressd spawned and has not reaped yet).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

// ------------------------------------------------------------------------------------------
// What the tasks installed, and the check against the kernel

/// How many elements a set must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Not checked.
    Any,
    Exactly(usize),
    /// At most this many (a lease set: elements expire by themselves).
    AtMost(usize),
}

/// One of egressd's tables as a task installed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub family: u8,
    pub name: String,
    /// Chain → number of rules.
    pub chains: BTreeMap<String, usize>,
    pub sets: BTreeMap<String, Count>,
}

/// What a part's tables hold, as its task installed them. Extra objects are not looked at
/// (nftables notifications report them as they are made).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub tables: Vec<TableSpec>,
}

/// One table as listed from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListedTable {
    pub chains: BTreeMap<String, usize>,
    /// Set → its element count, when it was listed.
    pub sets: BTreeMap<String, Option<usize>>,
}

/// Whether the check lists a set's elements: always for small and lease sets, every set in a
/// complete check.
fn list_elements(deep: bool, count: Count) -> bool {
    match count {
        Count::Any => false,
        Count::AtMost(_) => true,
        Count::Exactly(n) => deep || n <= 64,
    }
}

/// The differences between what `manifest` says and the kernel's `listed` tables (keyed by
/// family and name), in words.
pub fn compare(
    manifest: &Manifest,
    listed: &BTreeMap<(u8, String), ListedTable>,
    deep: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for spec in &manifest.tables {
        let t = format!("{} {}", family_name(spec.family), spec.name);
        let Some(l) = listed.get(&(spec.family, spec.name.clone())) else {
            out.push((t.clone(), format!("table {t} is missing")));
            continue;
        };
        for (chain, rules) in &spec.chains {
            match l.chains.get(chain) {
                None => out.push((t.clone(), format!("chain {t} {chain} is missing"))),
                Some(n) if n != rules => out.push((
                    t.clone(),
                    format!("chain {t} {chain} has {n} rules instead of {rules}"),
                )),
                Some(_) => {}
            }
        }
        for (set, count) in &spec.sets {
            match l.sets.get(set) {
                None => out.push((t.clone(), format!("set {t} {set} is missing"))),
                Some(n) => {
                    let Some(n) = *n else { continue };
                    if !list_elements(deep, *count) {
                        continue;
                    }
                    let bad = match count {
                        Count::Any => false,
                        Count::Exactly(want) => n != *want,
                        Count::AtMost(max) => n > *max,
                    };
                    if bad {
                        let want = match count {
                            Count::AtMost(m) => format!("at most {m}"),
                            Count::Exactly(m) => m.to_string(),
                            Count::Any => "any".into(),
                        };
                        out.push((
                            t.clone(),
                            format!("set {t} {set} holds {n} elements instead of {want}"),
                        ));
                    }
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// The repair state shared by the watcher and the tasks

/// What the watcher and the tasks tell the rest of the daemon (status, events, metrics, log).
#[derive(Debug)]
pub enum HealEvent<'a> {
    /// An outside change was noticed; a repair is pending.
    Detected { part: Part, tamper: &'a Tamper },
    /// The part's repair waits: something keeps changing it.
    BackingOff {
        part: Part,
        tamper: &'a Tamper,
        wait: Duration,
    },
    /// The part is back as egressd had it.
    Repaired {
        part: Part,
        tampers: &'a [Tamper],
        /// From the first outside change noticed to the end of the repair.
        since: Duration,
        /// The repair itself.
        took: Duration,
    },
}

type Report = Box<dyn Fn(&Heal, &HealEvent<'_>) + Send + Sync>;

/// The repair state of both parts; shared by the watcher (which records outside changes) and the
/// tasks (which repair and publish what they installed).
pub struct Heal {
    parts: [PartState; 2],
    report: Report,
}

struct PartState {
    inner: Mutex<PartInner>,
    wake: watch::Sender<u64>,
}

#[derive(Default)]
struct PartInner {
    /// Outside changes noticed, and how many of them a finished repair covered.
    seen: u64,
    repaired: u64,
    /// The outside changes since the last repair (the first few).
    tampers: Vec<Tamper>,
    /// When the first of them was noticed.
    since: Option<Instant>,
    /// When the pending repair may start, and the wait it applies.
    due: Option<Instant>,
    next_gap: Duration,
    /// The wait the last repair applied, and when it started.
    gap: Duration,
    last_start: Option<Instant>,
    /// Odd while a task changes the part; the manifest is what it installed last.
    version: u64,
    manifest: Option<Manifest>,
}

/// What a task should do about its part this round.
#[derive(Debug)]
pub enum Begin {
    /// Nothing outside happened.
    Idle,
    /// Forget what is installed, install everything, then call [`Heal::repaired`].
    Repair(Repair),
    /// A repair is pending but waits until then (something keeps changing the part).
    Wait(Instant),
}

/// A repair under way.
#[derive(Debug)]
pub struct Repair {
    seen: u64,
    started: Instant,
}

/// A task's change of its part under way: [`ChangeGuard::done`] with what it installed.
pub struct ChangeGuard<'a> {
    heal: &'a Heal,
    part: Part,
    seen: u64,
    finished: bool,
}

impl ChangeGuard<'_> {
    /// The change succeeded and the part now holds `manifest` (`None`: not known).
    pub fn done(mut self, manifest: Option<Manifest>) {
        self.finish(manifest);
    }

    fn finish(&mut self, manifest: Option<Manifest>) {
        self.finished = true;
        let mut g = self.heal.lock(self.part);
        g.version += 1;
        // An outside change noticed meanwhile may have undone part of it: not known then.
        g.manifest = if g.seen == self.seen { manifest } else { None };
    }
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(None);
        }
    }
}

impl Heal {
    /// `report` is called (outside the heal state's lock) for everything the rest of the daemon
    /// should know.
    pub fn new(report: impl Fn(&Heal, &HealEvent<'_>) + Send + Sync + 'static) -> Arc<Heal> {
        let part = || PartState {
            inner: Mutex::new(PartInner::default()),
            wake: watch::channel(0).0,
        };
        Arc::new(Heal {
            parts: [part(), part()],
            report: Box::new(report),
        })
    }

    fn lock(&self, part: Part) -> std::sync::MutexGuard<'_, PartInner> {
        self.parts[part.index()]
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Changes when an outside change to `part` is noticed.
    pub fn subscribe(&self, part: Part) -> watch::Receiver<u64> {
        self.parts[part.index()].wake.subscribe()
    }

    /// Records an outside change and wakes the task that repairs it.
    pub fn outside(&self, tamper: Tamper) {
        let part = tamper.part;
        let now = Instant::now();
        let (seen, wait) = {
            let mut g = self.lock(part);
            g.seen += 1;
            g.manifest = None;
            if g.tampers.len() < 8 && !g.tampers.iter().any(|t| t.what == tamper.what) {
                g.tampers.push(tamper.clone());
            }
            g.since.get_or_insert(now);
            let mut wait = None;
            if g.due.is_none() {
                let fight = g.last_start.is_some_and(|l| now.duration_since(l) < FIGHT);
                g.next_gap = if fight {
                    (g.gap * 2).clamp(MIN_GAP, MAX_GAP)
                } else {
                    Duration::ZERO
                };
                let due = g.last_start.map_or(now, |l| (l + g.next_gap).max(now));
                g.due = Some(due);
                if due > now {
                    wait = Some(due - now);
                }
            }
            (g.seen, wait)
        };
        (self.report)(
            self,
            &HealEvent::Detected {
                part,
                tamper: &tamper,
            },
        );
        if let Some(wait) = wait {
            (self.report)(
                self,
                &HealEvent::BackingOff {
                    part,
                    tamper: &tamper,
                    wait,
                },
            );
        }
        self.parts[part.index()].wake.send_replace(seen);
    }

    /// While a repair of `part` is pending: why the part is not converged, for the status.
    pub fn pending(&self, part: Part) -> Option<String> {
        let g = self.lock(part);
        if g.seen == g.repaired {
            return None;
        }
        let what = g
            .tampers
            .iter()
            .map(Tamper::describe)
            .collect::<Vec<_>>()
            .join("; ");
        let now = Instant::now();
        let when = match g.due {
            Some(due) if due > now => format!(
                "something keeps changing it: repairs back off, next in {:.1} s",
                (due - now).as_secs_f64()
            ),
            _ => "repairing".to_string(),
        };
        Some(format!(
            "{} not converged: {what}; {when}",
            match part {
                Part::Snat => "SNAT table",
                Part::Fence => "fence tables",
            }
        ))
    }

    /// The not-converged reasons of both parts.
    pub fn reasons(&self) -> Vec<String> {
        Part::ALL.iter().filter_map(|p| self.pending(*p)).collect()
    }

    /// Called by the task that owns `part` at the start of its round.
    pub fn begin(&self, part: Part) -> Begin {
        let mut g = self.lock(part);
        if g.seen == g.repaired {
            return Begin::Idle;
        }
        let now = Instant::now();
        match g.due {
            Some(due) if due > now => Begin::Wait(due),
            _ => {
                g.gap = g.next_gap;
                g.last_start = Some(now);
                g.due = Some(now);
                Begin::Repair(Repair {
                    seen: g.seen,
                    started: now,
                })
            }
        }
    }

    /// The repair `r` of `part` succeeded.
    pub fn repaired(&self, part: Part, r: Repair) {
        let now = Instant::now();
        let (tampers, since) = {
            let mut g = self.lock(part);
            g.repaired = g.repaired.max(r.seen);
            let since = g.since.map_or(Duration::ZERO, |s| now.duration_since(s));
            let tampers = if g.seen == g.repaired {
                g.due = None;
                g.since = None;
                std::mem::take(&mut g.tampers)
            } else {
                // Changed again during the repair: another round repairs that.
                g.tampers.clone()
            };
            (tampers, since)
        };
        (self.report)(
            self,
            &HealEvent::Repaired {
                part,
                tampers: &tampers,
                since,
                took: now.duration_since(r.started),
            },
        );
    }

    /// The repair `r` of `part` failed: the next is due after the wait of a fight.
    pub fn failed(&self, part: Part, r: Repair) {
        let mut g = self.lock(part);
        let wait = g.gap.max(MIN_GAP);
        g.due = Some(r.started + wait);
        g.next_gap = wait;
    }

    /// A task starts changing `part`.
    pub fn change(&self, part: Part) -> ChangeGuard<'_> {
        let mut g = self.lock(part);
        g.version += 1;
        ChangeGuard {
            heal: self,
            part,
            seen: g.seen,
            finished: false,
        }
    }

    /// The part's version (odd: a change is under way) and what it holds, if known.
    fn snapshot(&self, part: Part) -> (u64, Option<Manifest>) {
        let g = self.lock(part);
        (g.version, g.manifest.clone())
    }

    fn version(&self, part: Part) -> u64 {
        self.lock(part).version
    }
}

// ------------------------------------------------------------------------------------------
// Listing egressd's tables through netlink dumps

/// A request-and-answer netfilter socket for dumps.
pub(super) struct Query {
    pub(super) sock: nfnl::Socket,
    pub(super) seq: u32,
    pub(super) buf: Vec<u8>,
}

impl Query {
    pub(super) fn open(netns: Option<&str>) -> io::Result<Query> {
        Ok(Query {
            sock: nfnl::Socket::open(netns)?,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends a dump request of nftables message `msg_type` for `family` with `attributes`
    /// (type, payload) and calls `each` with the attributes of every answer. `Ok(false)` when
    /// the kernel answered "no such file or directory" (the table or set does not exist).
    fn dump(
        &mut self,
        msg_type: u16,
        family: u8,
        attributes: &[(u16, &[u8])],
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<bool> {
        self.request(
            NFNL_SUBSYS_NFTABLES,
            msg_type,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            attributes,
            |m| each(&m[20..]),
        )
    }

    /// Sends one request and calls `each` with every answer message (at least the 20 bytes of
    /// the headers) until the dump is done or the kernel acknowledges.
    pub(super) fn request(
        &mut self,
        subsys: u16,
        msg_type: u16,
        flags: u16,
        family: u8,
        attributes: &[(u16, &[u8])],
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = Vec::with_capacity(64);
        push_header(&mut req, (subsys << 8) | msg_type, flags, seq, family);
        for (t, p) in attributes {
            let len = 4 + p.len();
            req.extend_from_slice(&(len as u16).to_ne_bytes());
            req.extend_from_slice(&t.to_ne_bytes());
            req.extend_from_slice(p);
            while !req.len().is_multiple_of(4) {
                req.push(0);
            }
        }
        let len = req.len() as u32;
        req[..4].copy_from_slice(&len.to_ne_bytes());
        let fd = self.sock.as_raw_fd();
        send_all(fd, &req)?;
        loop {
            let Some(n) = recv_answer(fd, &mut self.buf, "a netlink request")? else {
                continue;
            };
            for m in messages(&self.buf[..n]) {
                if u32_at(m, 8) != seq {
                    continue;
                }
                match u16_at(m, 4) {
                    NLMSG_DONE => return Ok(true),
                    NLMSG_ERROR => {
                        let code = if m.len() >= 20 {
                            i32::from_ne_bytes([m[16], m[17], m[18], m[19]])
                        } else {
                            0
                        };
                        if code == 0 {
                            return Ok(true);
                        }
                        if -code == libc::ENOENT {
                            return Ok(false);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ if m.len() >= 20 => each(m),
                    _ => {}
                }
            }
        }
    }

    /// egressd's tables as the kernel holds them: every table named `table` in the families of
    /// `specs`, their chains with rule counts, their sets, and the element counts of the sets
    /// `count` says.
    fn list(
        &mut self,
        table: &str,
        specs: &[&TableSpec],
        deep: bool,
    ) -> io::Result<BTreeMap<(u8, String), ListedTable>> {
        let mut out: BTreeMap<(u8, String), ListedTable> = BTreeMap::new();
        let name = cstr(table);
        let families: BTreeSet<u8> = specs.iter().map(|s| s.family).collect();
        for family in families {
            let mut exists = false;
            self.dump(NFT_MSG_GETTABLE, family, &[], |a| {
                if attr_str(a, ATTR_TABLE).as_deref() == Some(table) {
                    exists = true;
                }
            })?;
            if !exists {
                continue;
            }
            let mut t = ListedTable::default();
            self.dump(NFT_MSG_GETCHAIN, family, &[(ATTR_TABLE, &name)], |a| {
                if attr_str(a, ATTR_TABLE).as_deref() == Some(table)
                    && let Some(c) = attr_str(a, NFTA_CHAIN_NAME)
                {
                    t.chains.entry(c).or_insert(0);
                }
            })?;
            self.dump(NFT_MSG_GETRULE, family, &[(ATTR_TABLE, &name)], |a| {
                if attr_str(a, ATTR_TABLE).as_deref() == Some(table)
                    && let Some(c) = attr_str(a, NFTA_RULE_CHAIN)
                {
                    *t.chains.entry(c).or_insert(0) += 1;
                }
            })?;
            let mut sets = Vec::new();
            self.dump(NFT_MSG_GETSET, family, &[(ATTR_TABLE, &name)], |a| {
                if attr_str(a, ATTR_TABLE).as_deref() == Some(table)
                    && let Some(s) = attr_str(a, NFTA_SET_NAME)
                {
                    sets.push(s);
                }
            })?;
            let wanted: BTreeMap<&str, Count> = specs
                .iter()
                .filter(|s| s.family == family && s.name == table)
                .flat_map(|s| s.sets.iter().map(|(n, c)| (n.as_str(), *c)))
                .collect();
            for set in sets {
                let count = wanted.get(set.as_str()).copied().unwrap_or(Count::Any);
                let n = if list_elements(deep, count) {
                    let mut n = 0;
                    let set_name = cstr(&set);
                    let found = self.dump(
                        NFT_MSG_GETSETELEM,
                        family,
                        &[(ATTR_TABLE, &name), (NFTA_SET_ELEM_LIST_SET, &set_name)],
                        |a| {
                            if let Some((_, l, _)) =
                                attrs(a).find(|(t, _, _)| *t == NFTA_SET_ELEM_LIST_ELEMENTS)
                            {
                                n += attrs(l).count();
                            }
                        },
                    )?;
                    found.then_some(n)
                } else {
                    None
                };
                t.sets.insert(set, n);
            }
            out.insert((family, table.to_string()), t);
        }
        Ok(out)
    }
}

/// The chains, sets and maps of table `table` of `family` in network namespace `netns`, as
/// (`"chain"`, `"set"` or `"map"`, name); empty when there is no such table. Through netlink
/// dumps: a full replace needs this list, and an `nft` process to list it costs ~10 ms.
pub fn list_objects(
    netns: Option<&str>,
    family: u8,
    table: &str,
) -> io::Result<Vec<(&'static str, String)>> {
    let mut q = Query::open(netns)?;
    let name = cstr(table);
    let mut out = Vec::new();
    q.dump(NFT_MSG_GETCHAIN, family, &[(ATTR_TABLE, &name)], |a| {
        if attr_str(a, ATTR_TABLE).as_deref() == Some(table)
            && let Some(c) = attr_str(a, NFTA_CHAIN_NAME)
        {
            out.push(("chain", c));
        }
    })?;
    q.dump(NFT_MSG_GETSET, family, &[(ATTR_TABLE, &name)], |a| {
        if attr_str(a, ATTR_TABLE).as_deref() == Some(table)
            && let Some(s) = attr_str(a, NFTA_SET_NAME)
        {
            let map = attrs(a)
                .find(|(t, _, _)| *t == NFTA_SET_FLAGS)
                .and_then(|(_, p, _)| be32(p))
                .is_some_and(|f| f & NFT_SET_MAP != 0);
            out.push((if map { "map" } else { "set" }, s));
        }
    })?;
    Ok(out)
}

/// nftables' message to get stateful objects, and the counter object's attributes.
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// The named counters of table `table` of `family` in network namespace `netns`, as (name,
/// packets, bytes); empty when there is no such table. Through one netlink dump: `nft list
/// counters` builds nft's whole cache first (every element of 100 000-element maps, ~0.4 s
/// each time) and starts over whenever the ruleset changes meanwhile, which on a node renewing
/// its leases ~20 times a second it then did for minutes.
pub fn list_counters(
    netns: Option<&str>,
    family: u8,
    table: &str,
) -> io::Result<Vec<(String, u64, u64)>> {
    let mut q = Query::open(netns)?;
    let name = cstr(table);
    let kind = NFT_OBJECT_COUNTER.to_be_bytes();
    let mut out = Vec::new();
    q.dump(
        NFT_MSG_GETOBJ,
        family,
        &[(ATTR_TABLE, &name), (NFTA_OBJ_TYPE, &kind)],
        |a| {
            let is_counter = attrs(a)
                .find(|(t, _, _)| *t == NFTA_OBJ_TYPE)
                .and_then(|(_, p, _)| be32(p))
                == Some(NFT_OBJECT_COUNTER);
            if attr_str(a, ATTR_TABLE).as_deref() != Some(table) || !is_counter {
                return;
            }
            let Some(n) = attr_str(a, NFTA_OBJ_NAME) else {
                return;
            };
            let (mut packets, mut bytes) = (0, 0);
            if let Some((_, data, _)) = attrs(a).find(|(t, _, _)| *t == NFTA_OBJ_DATA) {
                for (t, p, _) in attrs(data) {
                    let v = p
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes);
                    match t {
                        NFTA_COUNTER_PACKETS => packets = v.unwrap_or(0),
                        NFTA_COUNTER_BYTES => bytes = v.unwrap_or(0),
                        _ => {}
                    }
                }
            }
            out.push((n, packets, bytes));
        },
    )?;
    Ok(out)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn attr_str(a: &[u8], t: u16) -> Option<String> {
    attrs(a)
        .find(|(x, _, _)| *x == t)
        .map(|(_, p, _)| string(p))
}

/// A netlink message header and an nfgenmsg (length 0: the caller fills it in).
pub(super) fn push_header(buf: &mut Vec<u8>, msg_type: u16, flags: u16, seq: u32, family: u8) {
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0, 0, 0]);
}

/// Sends `buf` on the netlink socket `fd` in one call.
pub(super) fn send_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is valid for its length.
    if unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to 5 s for the answer to `what` and reads one datagram of it into `buf`: its
/// length, or `None` when a signal interrupted the read (read again).
pub(super) fn recv_answer(fd: RawFd, buf: &mut [u8], what: &str) -> io::Result<Option<usize>> {
    if !wait_readable(fd, 5000)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer to {what}"),
        ));
    }
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(n as usize))
}

// ------------------------------------------------------------------------------------------
// The watcher

/// The subscribed socket of a running watcher, reachable from the runners for deaf windows.
struct Listener {
    netns: Option<String>,
    sock: nfnl::Socket,
    /// Deaf windows open, under a lock so that joins and leaves stay in order.
    deaf: Mutex<usize>,
    /// A deaf window ended: check everything.
    missed: AtomicBool,
    wake: OwnedFd,
}

impl Listener {
    fn membership(&self, opt: libc::c_int) {
        if let Err(e) = self.sock.setsockopt(SOL_NETLINK, opt, NFNLGRP_NFTABLES) {
            warn!(error = %e, "nftables watcher: cannot change its subscription");
        }
    }

    fn deafen(&self) {
        let mut d = self.deaf.lock().unwrap_or_else(|p| p.into_inner());
        if *d == 0 {
            self.membership(NETLINK_DROP_MEMBERSHIP);
        }
        *d += 1;
    }

    fn hear(&self) {
        let mut d = self.deaf.lock().unwrap_or_else(|p| p.into_inner());
        *d = d.saturating_sub(1);
        if *d == 0 {
            self.membership(NETLINK_ADD_MEMBERSHIP);
            self.missed.store(true, Ordering::SeqCst);
            self.poke();
        }
    }

    fn poke(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to an eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// A running watcher; dropping it stops the thread.
pub struct Watcher {
    listener: Arc<Listener>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching egressd's tables named `table` in network namespace `netns` (`None`:
    /// this process's) on a thread of its own.
    pub fn start(table: &str, netns: Option<&str>, heal: Arc<Heal>) -> io::Result<Watcher> {
        Watcher::start_with(table, netns, heal, BACKSTOP)
    }

    /// Like `start` with another backstop period (tests).
    pub fn start_with(
        table: &str,
        netns: Option<&str>,
        heal: Arc<Heal>,
        backstop: Duration,
    ) -> io::Result<Watcher> {
        let sock = nfnl::Socket::open(netns)?;
        sock.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, EVENT_BUFFER)?;
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)?;
        // SAFETY: eventfd(2); the result is checked before it is wrapped.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let query = Query::open(netns)?;
        let listener = Arc::new(Listener {
            netns: netns.map(str::to_owned),
            sock,
            deaf: Mutex::new(0),
            missed: AtomicBool::new(false),
            wake,
        });
        own().add_listener(&listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut run = Run {
            ours: Ours {
                table: table.to_owned(),
            },
            listener: listener.clone(),
            query,
            heal,
            stop: stop.clone(),
            tracker: Tracker::default(),
            backstop,
            buf: vec![0; 1 << 20],
        };
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("nft-watch".into())
            .spawn(move || {
                let _enter = span.enter();
                run.run();
            })?;
        Ok(Watcher {
            listener,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread (e.g. before a clean shutdown removes the tables).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.listener.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The watcher thread's state.
struct Run {
    ours: Ours,
    listener: Arc<Listener>,
    query: Query,
    heal: Arc<Heal>,
    stop: Arc<AtomicBool>,
    tracker: Tracker,
    backstop: Duration,
    buf: Vec<u8>,
}

/// A check to make, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// The periodic one: structure, rules, small sets.
    Periodic,
    /// After lost or missed notifications: every element count too.
    Complete,
}

impl Run {
    fn run(&mut self) {
        let fd = self.listener.sock.as_raw_fd();
        let wake = self.listener.wake.as_raw_fd();
        // A first check soon after start: outside changes before the watcher started.
        let mut next_check = Instant::now() + Duration::from_millis(500);
        let mut pending = Some(Check::Periodic);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = next_check
                .saturating_duration_since(now)
                .as_millis()
                .min(60_000) as i32;
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    warn!(error = %e, "nftables watcher: poll failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[1].revents != 0 {
                let mut b = [0u8; 8];
                // SAFETY: reading 8 bytes from an eventfd into `b`.
                let _ = unsafe { libc::read(wake, b.as_mut_ptr().cast(), 8) };
            }
            if fds[0].revents != 0 && self.drain() {
                pending = Some(Check::Complete);
                next_check = Instant::now();
            }
            if self.listener.missed.swap(false, Ordering::SeqCst) {
                self.tracker.reset();
                pending = Some(Check::Complete);
                next_check = Instant::now();
            }
            if Instant::now() >= next_check {
                let check = pending.take().unwrap_or(Check::Periodic);
                if self.check(check) {
                    next_check = Instant::now() + self.backstop;
                } else {
                    // A task was changing its part: again shortly.
                    pending = Some(check);
                    next_check = Instant::now() + Duration::from_millis(50);
                }
            }
        }
    }

    /// Reads every queued notification. Returns true when some were lost.
    fn drain(&mut self) -> bool {
        let fd = self.listener.sock.as_raw_fd();
        let mut lost = false;
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return lost,
                    Some(libc::ENOBUFS) => {
                        warn!(
                            "nftables watcher: notifications were lost (receive buffer full); \
                             checking egressd's tables completely"
                        );
                        self.tracker.reset();
                        lost = true;
                        continue;
                    }
                    _ => {
                        warn!(error = %e, "nftables watcher: reading notifications failed");
                        return true;
                    }
                }
            }
            let data = self.buf[..n as usize].to_vec();
            for m in messages(&data) {
                let Some(notice) = decode(m) else { continue };
                if let Some(t) = self.tracker.feed(&self.ours, notice) {
                    self.judge(t);
                }
            }
        }
    }

    /// Decides whether `t` came from outside and, if so, reports it.
    fn judge(&mut self, t: Transaction) {
        let mut known = own().known();
        let mut outside: Vec<&Change> = Vec::new();
        for c in &t.changes {
            let mut origin = classify(&known, &t.generation, c.portid);
            if origin == Origin::Unsure {
                // An nft is being spawned: its pid is registered right after the spawn returns,
                // long before it can commit; wait for that (bounded).
                let until = Instant::now() + Duration::from_secs(2);
                while origin == Origin::Unsure && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                    known = own().known();
                    origin = classify(&known, &t.generation, c.portid);
                }
                if origin == Origin::Unsure {
                    origin = Origin::Outside;
                }
            }
            if origin == Origin::Outside {
                // Last resort: a child not registered (yet) is still ours.
                let me = std::process::id();
                if parent_of(t.generation.pid) == Some(me) || parent_of(c.portid) == Some(me) {
                    continue;
                }
                outside.push(c);
            }
        }
        if outside.is_empty() {
            return;
        }
        for tamper in tampers(&self.ours, &t.generation, &outside) {
            self.heal.outside(tamper);
        }
    }

    /// Compares the kernel's tables with what the tasks installed. Returns false when a task
    /// changed a part meanwhile (the check is to be made again).
    fn check(&mut self, check: Check) -> bool {
        let started = Instant::now();
        let deep = check == Check::Complete;
        let mut consistent = true;
        for part in Part::ALL {
            let (version, manifest) = self.heal.snapshot(part);
            let Some(manifest) = manifest else { continue };
            if version % 2 == 1 {
                consistent = false;
                continue;
            }
            let specs: Vec<&TableSpec> = manifest.tables.iter().collect();
            let listed = match self.query.list(&self.ours.table, &specs, deep) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, part = part.name(), "nftables watcher: cannot list egressd's tables");
                    continue;
                }
            };
            if self.heal.version(part) != version {
                consistent = false;
                continue;
            }
            let diffs = compare(&manifest, &listed, deep);
            if diffs.is_empty() {
                continue;
            }
            // A change made while the tables were listed is reported by its notification, with
            // the process that made it: read those first, so that one change is not reported
            // twice (once by the check, once by its notification).
            if self.drain() {
                // Lost ones: a complete check follows (see `run`).
                self.listener.missed.store(true, Ordering::SeqCst);
            }
            if self.heal.version(part) != version || self.heal.pending(part).is_some() {
                continue;
            }
            let objects: BTreeSet<String> = diffs.iter().map(|(o, _)| o.clone()).collect();
            let n = diffs.len();
            let mut what = diffs
                .iter()
                .take(3)
                .map(|(_, d)| d.clone())
                .collect::<Vec<_>>()
                .join(", ");
            if n > 3 {
                let _ = write!(what, " and {} more differences", n - 3);
            }
            self.heal.outside(Tamper {
                part,
                objects,
                what,
                by: if deep { Culprit::Lost } else { Culprit::Check },
            });
        }
        debug!(
            complete = deep,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            consistent,
            "nftables watcher: checked egressd's tables"
        );
        consistent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification as the kernel sends it: header, nfgenmsg, attributes.
    fn msg(ty: u16, family: u8, portid: u32, attributes: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | ty).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&portid.to_ne_bytes());
        m.extend_from_slice(&[family, 0, 0, 7]);
        for (t, p) in attributes {
            m.extend_from_slice(&((4 + p.len()) as u16).to_ne_bytes());
            m.extend_from_slice(&t.to_ne_bytes());
            m.extend_from_slice(p);
            while m.len() % 4 != 0 {
                m.push(0);
            }
        }
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    fn s(x: &str) -> Vec<u8> {
        cstr(x)
    }

    fn gen_msg(id: u32, pid: u32, comm: &str, portid: u32) -> Vec<u8> {
        msg(
            NFT_MSG_NEWGEN,
            0,
            portid,
            &[
                (NFTA_GEN_ID, id.to_be_bytes().to_vec()),
                (NFTA_GEN_PROC_PID, pid.to_be_bytes().to_vec()),
                (NFTA_GEN_PROC_NAME, s(comm)),
            ],
        )
    }

    fn ours() -> Ours {
        Ours {
            table: "egressd".into(),
        }
    }

    /// Two datagrams recorded on this machine (kernel 6.18, `tests`-style namespace) while
    /// `nft flush ruleset` removed a table `inet egressd` (map `m4_1_0`, chains
    /// `g4_00112233aabbccdd` and `c4_1_0`), a table `arp egressd` (set `lease`) and a table
    /// `ip foreign`: every message from port 8978, closed by generation 0x4a of nft, pid 8978.
    const FLUSH_0: &str = concat!(
        "ac000000080a000001000000122300000100004a0c00010065677265737364001800020067345f303031313232333361",
        "61626263636464000c0003000000000000000004680004002c0001000e000100696d6d65646961746500000018000200",
        "08000100000000010c00020008000100cb00713238000100080001006e6174002c000200080001000000000008000200",
        "000000020800030000000001080004000000000108000700000000012c010000080a000001000000122300000100004a",
        "0c00010065677265737364000b00020063345f315f3000000c0003000000000000000005f40004002400010009000100",
        "6d6574610000000014000200080002000000000f08000100000000012c00010008000100636d70002000020008000100",
        "0000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100",
        "000000010800020000000001080003000000000c0800040000000004340001000c0001007061796c6f61640024000200",
        "0800010000000009080002000000000108000300000000100800040000000004380001000b0001006c6f6f6b75700000",
        "280002000b0001006d345f315f300000080002000000000108000300000000000800050000000000380000000b0a0000",
        "01000000122300000100004a0c00010065677265737364000b0002006d345f315f3000000c0010000000000000000003",
        "44000000050a000001000000122300000100004a0c00010065677265737364001800030067345f303031313232333361",
        "61626263636464000c000200000000000000000138000000050a000001000000122300000100004a0c00010065677265",
        "737364000b00030063345f315f3000000c000200000000000000000234000000020a000001000000122300000100004a",
        "0c000100656772657373640008000300000000000c0004000000000000000021380000000b0a00000100000012230000",
        "0300004a0c00010065677265737364000a0002006c656173650000000c001000000000000000000134000000020a0000",
        "01000000122300000300004a0c000100656772657373640008000300000000000c000400000000000000002234000000",
        "050a000001000000122300000200004a0c000100666f726569676e0006000300630000000c0002000000000000000001",
        "34000000020a000001000000122300000200004a0c000100666f726569676e0008000300000000000c00040000000000",
        "00000023",
    );
    const FLUSH_1: &str =
        "2c0000000f0a000001000000122300000000004a080001000000004a0800020000002312080003006e667400";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The recorded flush, read as the watcher reads it: one transaction, from outside, that
    /// removed both parts' tables; the foreign table is not among them.
    #[cfg(target_endian = "little")]
    #[test]
    fn flush_ruleset_as_recorded() {
        let o = ours();
        let mut tracker = Tracker::default();
        let mut closed = Vec::new();
        let mut seen = Vec::new();
        for d in [unhex(FLUSH_0), unhex(FLUSH_1)] {
            for m in messages(&d) {
                let n = decode(m).expect("an nftables notification");
                seen.push(match &n {
                    Notice::Change(c) => format!(
                        "{:?} {:?} {} {} {}",
                        c.op,
                        c.kind,
                        family_name(c.family),
                        c.table,
                        c.name.as_deref().unwrap_or("-")
                    ),
                    Notice::Gen(g) => format!("generation {} {} {}", g.id, g.comm, g.pid),
                });
                closed.extend(tracker.feed(&o, n));
            }
        }
        assert_eq!(
            seen,
            [
                "Del Rule inet egressd g4_00112233aabbccdd",
                "Del Rule inet egressd c4_1_0",
                "Del Set inet egressd m4_1_0",
                "Del Chain inet egressd g4_00112233aabbccdd",
                "Del Chain inet egressd c4_1_0",
                "Del Table inet egressd -",
                "Del Set arp egressd lease",
                "Del Table arp egressd -",
                "Del Chain ip foreign c",
                "Del Table ip foreign -",
                "generation 74 nft 8978",
            ]
        );
        let [t] = closed.as_slice() else {
            panic!("{closed:?}")
        };
        assert_eq!(
            t.changes.len(),
            8,
            "the foreign table's messages are not kept"
        );
        assert!(t.changes.iter().all(|c| c.portid == 8978));
        let known = Known {
            portids: [1234].into_iter().collect(),
            pids: [4321].into_iter().collect(),
            spawning: 0,
        };
        assert_eq!(classify(&known, &t.generation, 8978), Origin::Outside);
        let refs: Vec<&Change> = t.changes.iter().collect();
        let what: Vec<(Part, String)> = tampers(&o, &t.generation, &refs)
            .into_iter()
            .map(|t| (t.part, t.describe()))
            .collect();
        assert_eq!(
            what,
            [
                (
                    Part::Snat,
                    "table inet egressd was removed from outside (by nft, pid 8978)".to_string()
                ),
                (
                    Part::Fence,
                    "table arp egressd was removed from outside (by nft, pid 8978)".to_string()
                ),
            ]
        );
        // Had egressd run that nft, it would be its own.
        let mine = Known {
            pids: [8978].into_iter().collect(),
            ..known
        };
        assert_eq!(classify(&mine, &t.generation, 8978), Origin::Own);
    }

    #[test]
    fn decodes_every_kind_and_the_generation() {
        let table = decode(&msg(
            NFT_MSG_DELTABLE,
            NFPROTO_INET,
            42,
            &[
                (ATTR_TABLE, s("egressd")),
                (NFTA_TABLE_FLAGS, 0u32.to_be_bytes().to_vec()),
            ],
        ));
        assert_eq!(
            table,
            Some(Notice::Change(Change {
                kind: Kind::Table,
                op: Op::Del,
                family: NFPROTO_INET,
                table: "egressd".into(),
                name: None,
                map: false,
                elements: 0,
                table_flags: Some(0),
                portid: 42,
            }))
        );
        let chain = decode(&msg(
            NFT_MSG_DELCHAIN,
            NFPROTO_INET,
            42,
            &[
                (ATTR_TABLE, s("egressd")),
                (NFTA_CHAIN_NAME, s("g4_00112233aabbccdd")),
            ],
        ));
        let Some(Notice::Change(c)) = chain else {
            panic!("{chain:?}")
        };
        assert_eq!((c.kind, c.op), (Kind::Chain, Op::Del));
        assert_eq!(c.name.as_deref(), Some("g4_00112233aabbccdd"));
        let rule = decode(&msg(
            NFT_MSG_NEWRULE,
            NFPROTO_ARP,
            42,
            &[(ATTR_TABLE, s("egressd")), (NFTA_RULE_CHAIN, s("input"))],
        ));
        let Some(Notice::Change(c)) = rule else {
            panic!("{rule:?}")
        };
        assert_eq!((c.kind, c.op, c.family), (Kind::Rule, Op::New, NFPROTO_ARP));
        assert_eq!(c.name.as_deref(), Some("input"));
        let map = decode(&msg(
            NFT_MSG_DELSET,
            NFPROTO_INET,
            42,
            &[
                (ATTR_TABLE, s("egressd")),
                (NFTA_SET_NAME, s("m4_3_0")),
                (NFTA_SET_FLAGS, (NFT_SET_MAP | 0x1).to_be_bytes().to_vec()),
            ],
        ));
        let Some(Notice::Change(c)) = map else {
            panic!("{map:?}")
        };
        assert!(c.map && c.kind == Kind::Set && c.op == Op::Del);
        // Two elements in the list.
        let mut list = Vec::new();
        for _ in 0..2 {
            list.extend_from_slice(&8u16.to_ne_bytes());
            list.extend_from_slice(&(1u16 | 0x8000).to_ne_bytes());
            list.extend_from_slice(&[0, 0, 0, 0]);
        }
        let els = decode(&msg(
            NFT_MSG_DELSETELEM,
            NFPROTO_INET,
            42,
            &[
                (ATTR_TABLE, s("egressd")),
                (NFTA_SET_ELEM_LIST_SET, s("m4_3_0")),
                (NFTA_SET_ELEM_LIST_ELEMENTS | 0x8000, list),
            ],
        ));
        let Some(Notice::Change(c)) = els else {
            panic!("{els:?}")
        };
        assert_eq!((c.kind, c.elements), (Kind::Element, 2));
        // `nft destroy table` is read as a deletion.
        let destroy = decode(&msg(
            NFT_MSG_DESTROYTABLE,
            NFPROTO_ARP,
            42,
            &[(ATTR_TABLE, s("egressd"))],
        ));
        assert!(matches!(
            destroy,
            Some(Notice::Change(Change {
                kind: Kind::Table,
                op: Op::Del,
                ..
            }))
        ));
        assert_eq!(
            decode(&gen_msg(12, 4242, "nft", 4242)),
            Some(Notice::Gen(Generation {
                id: 12,
                pid: 4242,
                comm: "nft".into(),
                portid: 4242
            }))
        );
        // Another subsystem, a GET, a truncated message: nothing.
        let mut other = gen_msg(1, 1, "x", 1);
        other[5] = 11;
        assert_eq!(decode(&other), None);
        assert_eq!(decode(&msg(NFT_MSG_GETTABLE, 1, 1, &[])), None);
        assert_eq!(decode(&[0u8; 12]), None);
    }

    #[test]
    fn a_datagram_splits_into_messages() {
        let mut d = msg(
            NFT_MSG_DELTABLE,
            NFPROTO_ARP,
            9,
            &[(ATTR_TABLE, s("egressd"))],
        );
        d.extend(gen_msg(3, 9, "nft", 9));
        let got: Vec<_> = messages(&d).filter_map(decode).collect();
        assert_eq!(got.len(), 2);
        assert!(matches!(got[1], Notice::Gen(_)));
        // A length running past the end stops the split.
        let mut bad = d.clone();
        bad[0] = 0xff;
        assert_eq!(messages(&bad).count(), 0);
    }

    fn change(
        kind: Kind,
        op: Op,
        family: u8,
        table: &str,
        name: Option<&str>,
        portid: u32,
    ) -> Change {
        Change {
            kind,
            op,
            family,
            table: table.into(),
            name: name.map(String::from),
            map: false,
            elements: usize::from(kind == Kind::Element),
            table_flags: None,
            portid,
        }
    }

    #[test]
    fn transactions_keep_only_egressds_tables() {
        let mut t = Tracker::default();
        let o = ours();
        let foreign = change(Kind::Table, Op::Del, NFPROTO_INET, "filter", None, 7);
        let other_family = change(Kind::Table, Op::Del, NFPROTO_IPV4, "egressd", None, 7);
        assert_eq!(t.feed(&o, Notice::Change(foreign)), None);
        assert_eq!(t.feed(&o, Notice::Change(other_family)), None);
        let g = Generation {
            id: 5,
            pid: 7,
            comm: "nft".into(),
            portid: 7,
        };
        assert_eq!(
            t.feed(&o, Notice::Gen(g.clone())),
            None,
            "only foreign tables"
        );
        let mine = change(Kind::Table, Op::Del, NFPROTO_ARP, "egressd", None, 7);
        t.feed(&o, Notice::Change(mine.clone()));
        assert_eq!(
            t.feed(&o, Notice::Gen(g.clone())),
            Some(Transaction {
                generation: g,
                changes: vec![mine]
            })
        );
    }

    #[test]
    fn own_sockets_and_children_are_own_the_rest_is_outside() {
        let known = Known {
            portids: [100, 4_000_000_001].into_iter().collect(),
            pids: [555].into_iter().collect(),
            spawning: 0,
        };
        // egressd's element batch, sent from a worker thread (any thread id).
        let batch = Generation {
            id: 1,
            pid: 31337,
            comm: "tokio-runtime-w".into(),
            portid: 100,
        };
        assert_eq!(classify(&known, &batch, 100), Origin::Own);
        // An nft egressd spawned: its thread id and its socket (bound to its pid).
        let child = Generation {
            id: 2,
            pid: 555,
            comm: "nft".into(),
            portid: 555,
        };
        assert_eq!(classify(&known, &child, 555), Origin::Own);
        // The same in another pid namespace: only the port id matches.
        let child_ns = Generation {
            pid: 987_654,
            ..child.clone()
        };
        assert_eq!(classify(&known, &child_ns, 555), Origin::Own);
        // An nft of the operator's, and its lookalike name.
        let other = Generation {
            id: 3,
            pid: 777,
            comm: "nft".into(),
            portid: 777,
        };
        assert_eq!(classify(&known, &other, 777), Origin::Outside);
        // A message from another socket than the one that closed the transaction: by its own
        // port; the kernel's own messages (port 0) are nobody's change.
        assert_eq!(classify(&known, &other, 4_000_000_001), Origin::Own);
        assert_eq!(classify(&known, &other, 0), Origin::Own);
        // While an nft is being spawned, an unknown process is not judged yet.
        let spawning = Known {
            spawning: 1,
            ..known.clone()
        };
        assert_eq!(classify(&spawning, &other, 777), Origin::Unsure);
    }

    #[test]
    fn the_registry_tracks_sockets_and_spawns() {
        let own = Own {
            inner: Mutex::new(OwnInner::default()),
            spawning: AtomicUsize::new(0),
        };
        own.socket_opened(11);
        {
            let s = own.spawning();
            assert_eq!(own.known().spawning, 1);
            s.spawned(4321);
        }
        let k = own.known();
        assert_eq!(k.spawning, 0);
        assert!(k.portids.contains(&11) && k.pids.contains(&4321));
        // A closed socket is still remembered (its last notifications may be unread).
        own.socket_closed(11);
        assert!(own.known().portids.contains(&11));
        assert!(
            own.quiet(None, QUIET_MIN).is_none(),
            "no watcher: nothing to quiet"
        );
    }

    #[test]
    fn descriptions_say_what_happened() {
        let o = ours();
        let g = Generation {
            id: 9,
            pid: 4242,
            comm: "nft".into(),
            portid: 4242,
        };
        // nft flush ruleset: the table and its contents go.
        let flush = [
            change(
                Kind::Rule,
                Op::Del,
                NFPROTO_INET,
                "egressd",
                Some("postrouting_3"),
                4242,
            ),
            change(
                Kind::Set,
                Op::Del,
                NFPROTO_INET,
                "egressd",
                Some("m4_3_0"),
                4242,
            ),
            change(
                Kind::Chain,
                Op::Del,
                NFPROTO_INET,
                "egressd",
                Some("postrouting_3"),
                4242,
            ),
            change(Kind::Table, Op::Del, NFPROTO_INET, "egressd", None, 4242),
            change(Kind::Table, Op::Del, NFPROTO_ARP, "egressd", None, 4242),
            change(Kind::Table, Op::Del, NFPROTO_IPV6, "egressd", None, 4242),
        ];
        let refs: Vec<&Change> = flush.iter().collect();
        let t = tampers(&o, &g, &refs);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].part, Part::Snat);
        assert_eq!(t[0].what, "table inet egressd was removed");
        assert_eq!(
            t[0].describe(),
            "table inet egressd was removed from outside (by nft, pid 4242)"
        );
        assert_eq!(
            t[0].objects,
            ["inet egressd".to_string()].into_iter().collect()
        );
        assert_eq!(t[1].part, Part::Fence);
        assert_eq!(
            t[1].what,
            "table arp egressd was removed, table ip6 egressd was removed"
        );
        // One chain; elements summed per set; a map named as such.
        let mut map = change(
            Kind::Set,
            Op::Del,
            NFPROTO_INET,
            "egressd",
            Some("m4_3_1"),
            1,
        );
        map.map = true;
        let mut els = change(
            Kind::Element,
            Op::Del,
            NFPROTO_INET,
            "egressd",
            Some("m4_3_0"),
            1,
        );
        els.elements = 2;
        let more = [
            change(
                Kind::Chain,
                Op::Del,
                NFPROTO_INET,
                "egressd",
                Some("g4_0011"),
                1,
            ),
            map,
            els.clone(),
            els,
        ];
        let refs: Vec<&Change> = more.iter().collect();
        let t = tampers(&o, &g, &refs);
        assert_eq!(
            t[0].what,
            "map inet egressd m4_3_1 was deleted, chain inet egressd g4_0011 was deleted, \
             4 elements deleted from inet egressd m4_3_0"
        );
        let check = Tamper {
            by: Culprit::Check,
            ..t[0].clone()
        };
        assert!(check.describe().ends_with("(found by the periodic check)"));
    }

    fn spec() -> Manifest {
        Manifest {
            tables: vec![TableSpec {
                family: NFPROTO_ARP,
                name: "egressd".into(),
                chains: [("input".to_string(), 1), ("output".to_string(), 1)]
                    .into_iter()
                    .collect(),
                sets: [
                    ("managed".to_string(), Count::Exactly(2)),
                    ("lease".to_string(), Count::AtMost(1)),
                    ("big".to_string(), Count::Exactly(1000)),
                ]
                .into_iter()
                .collect(),
            }],
        }
    }

    #[test]
    fn the_check_names_what_differs() {
        let m = spec();
        let mut t = ListedTable::default();
        t.chains.insert("input".into(), 1);
        t.chains.insert("output".into(), 1);
        t.chains.insert("extra".into(), 3);
        t.sets.insert("managed".into(), Some(2));
        t.sets.insert("lease".into(), Some(1));
        t.sets.insert("big".into(), Some(999));
        let mut listed = BTreeMap::new();
        listed.insert((NFPROTO_ARP, "egressd".to_string()), t.clone());
        // Periodic: the big set's count is not looked at; extra objects are not either.
        assert!(compare(&m, &listed, false).is_empty());
        let deep = compare(&m, &listed, true);
        assert_eq!(
            deep,
            [(
                "arp egressd".to_string(),
                "set arp egressd big holds 999 elements instead of 1000".to_string()
            )]
        );
        // A flushed chain, a lease more than written, a missing set.
        t.chains.insert("input".into(), 0);
        t.sets.insert("lease".into(), Some(2));
        t.sets.remove("managed");
        listed.insert((NFPROTO_ARP, "egressd".to_string()), t);
        let d: Vec<String> = compare(&m, &listed, false)
            .into_iter()
            .map(|x| x.1)
            .collect();
        assert_eq!(
            d,
            [
                "chain arp egressd input has 0 rules instead of 1",
                "set arp egressd lease holds 2 elements instead of at most 1",
                "set arp egressd managed is missing",
            ]
        );
        assert_eq!(
            compare(&m, &BTreeMap::new(), false),
            [(
                "arp egressd".to_string(),
                "table arp egressd is missing".to_string()
            )]
        );
    }

    fn tamper(part: Part) -> Tamper {
        Tamper {
            part,
            objects: ["inet egressd".to_string()].into_iter().collect(),
            what: "table inet egressd was removed".into(),
            by: Culprit::Process {
                pid: 1,
                comm: "nft".into(),
            },
        }
    }

    #[test]
    fn a_repair_clears_the_pending_state_and_reports() {
        let events = Arc::new(Mutex::new(Vec::<String>::new()));
        let log = events.clone();
        let heal = Heal::new(move |_, e| {
            let line = match e {
                HealEvent::Detected { part, .. } => format!("detected {}", part.name()),
                HealEvent::BackingOff { wait, .. } => format!("backoff {}", wait.as_millis() > 0),
                HealEvent::Repaired { part, tampers, .. } => {
                    format!("repaired {} {}", part.name(), tampers.len())
                }
            };
            log.lock().unwrap().push(line);
        });
        let mut rx = heal.subscribe(Part::Snat);
        assert!(matches!(heal.begin(Part::Snat), Begin::Idle));
        // A change under way when the outside change is noticed publishes nothing.
        let before = heal.change(Part::Snat);
        heal.outside(tamper(Part::Snat));
        before.done(Some(Manifest::default()));
        assert_eq!(heal.snapshot(Part::Snat).1, None);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let reason = heal.pending(Part::Snat).unwrap();
        assert!(
            reason.starts_with(
                "SNAT table not converged: table inet egressd was removed from outside"
            ),
            "{reason}"
        );
        assert!(heal.pending(Part::Fence).is_none());
        let Begin::Repair(r) = heal.begin(Part::Snat) else {
            panic!("due at once")
        };
        let g = heal.change(Part::Snat);
        assert_eq!(heal.snapshot(Part::Snat).0 % 2, 1, "odd while changing");
        g.done(Some(Manifest::default()));
        heal.repaired(Part::Snat, r);
        assert!(heal.pending(Part::Snat).is_none());
        assert_eq!(heal.snapshot(Part::Snat).1, Some(Manifest::default()));
        assert_eq!(
            *events.lock().unwrap(),
            ["detected SNAT", "repaired SNAT 1"]
        );
    }

    #[test]
    fn repeated_changes_back_off_up_to_the_limit() {
        let heal = Heal::new(|_, _| {});
        let mut waits = Vec::new();
        for _ in 0..9 {
            heal.outside(tamper(Part::Fence));
            let r = loop {
                match heal.begin(Part::Fence) {
                    Begin::Repair(r) => break r,
                    Begin::Wait(at) => {
                        waits.push(at.saturating_duration_since(Instant::now()));
                        // Pretend the wait passed.
                        let mut g = heal.lock(Part::Fence);
                        g.due = Some(Instant::now());
                    }
                    Begin::Idle => panic!("pending"),
                }
            };
            // The fight goes on at once after each repair.
            heal.repaired(Part::Fence, r);
        }
        // First repair at once; then 250 ms, doubling, at most 8 s.
        let ms: Vec<u128> = waits
            .iter()
            .map(|w| (w.as_millis() + 5) / 10 * 10)
            .collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // A repair that fails is not retried at once either.
        heal.outside(tamper(Part::Snat));
        let Begin::Repair(r) = heal.begin(Part::Snat) else {
            panic!("due")
        };
        heal.failed(Part::Snat, r);
        assert!(matches!(heal.begin(Part::Snat), Begin::Wait(_)));
    }

    #[test]
    fn parent_of_reads_proc() {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() } as u32;
        assert_eq!(parent_of(std::process::id()), Some(parent));
        assert_eq!(parent_of(u32::MAX), None);
    }
}
