//! Chaos soak: real daemons in network namespaces under random faults, with an invariant checker
//! that watches from outside the nodes.
//!
//! - `chaos_short` (CI): 3 nodes, 40 faults, about a minute.
//! - `chaos_long` (ignored; `scripts/chaos-long.sh`): 5 nodes, `EGRESSD_CHAOS_SECS` seconds
//!   (default 600) or `EGRESSD_CHAOS_FAULTS` faults, whichever comes first.
//!
//! The faults come from a seeded generator (`EGRESSD_CHAOS_SEED` replays a schedule; the seed
//! is printed first): kill -9 of a node and its restart later; every link of a node cut and
//! restored; a partition of one or two nodes from the others on the peer network only (their
//! LAN and WAN legs stay up); trouble on the peer network (`tc netem` delay, loss and reordering
//! when the kernel has netem; otherwise random loss by nftables and a `tbf` bandwidth squeeze);
//! SIGSTOP/SIGCONT (50 ms to 2 s); a restart of the Raft leader while an `egressd apply` is in
//! flight; a full disk under a node's `data_dir` (each `data_dir` is a small tmpfs of its own).
//! Besides, `egressd apply` keeps adding policies through random nodes.
//!
//! The checker, outside the nodes:
//! - an ARP census (`common::arp::ArpProber`): the server asks for the VIP, and a second client
//!   address for the next hop, every 10 ms (every ~15 ms in practice: the prober's 1 ms receive
//!   timeout rounds up to a 4 ms jiffy); no probe may be answered by two MACs;
//! - a passive capture (tcpdump on the WAN and LAN bridges) of every ARP frame that claims the
//!   VIP or the next hop: claims come holder by holder, never interleaved (see
//!   `common::capture::interleavings`);
//! - every acknowledged `egressd apply` (CLI exit 0) is in `egressd get policies` on every node
//!   once everything is healed.
//!
//! Reported, never asserted (the machine is shared): the faults by kind, the client's probe
//! availability (a UDP echo every 10 ms from the client to the server through the gateway,
//! `common::probe`) and its worst outage.
//!
//! A failed run keeps the daemons' logs, the captures and the timeline in
//! `target/tmp/chaos-SEED-PID/` (`EGRESSD_CHAOS_KEEP=1` keeps them after a passing run too).
//! Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::arp::{self, ArpProber};
use common::capture::{self, Capture, Claim};
use common::cluster::*;
use common::netns::require_root;
use common::probe::{ProbeLog, UdpProbe};
use common::tools;
use common::topo::*;

const EGRESSD: &str = env!("CARGO_BIN_EXE_egressd");
/// The server's UDP echo port for the client's probe.
const PROBE_PORT: u16 = 7007;
const TOKEN: &str = "chaos-admin-token-0123456789";
/// Size of the tmpfs under each node's `data_dir`.
const DATA_MB: u32 = 64;
/// Two claims of one holder at most this far apart belong to one holding (see
/// `capture::interleavings`). The census asks every 10 to 16 ms, so a holder claims that often
/// (its ARP replies); moving the role away and back takes two assignment commits, a release
/// confirmed by a report and two grants, which this window is well below.
const HOLDING_WINDOW: Duration = Duration::from_millis(30);
/// How long the healed cluster may take to settle (a liveness bound, not a performance check).
const RECOVER: Duration = Duration::from_secs(120);

/// SplitMix64: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

struct Settings {
    tag: &'static str,
    nodes: usize,
    faults: usize,
    duration: Duration,
    seed: u64,
    /// Faults in force at once, at most.
    concurrent: usize,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn seed() -> u64 {
    env_num("EGRESSD_CHAOS_SEED").unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ u64::from(std::process::id())).next() % 1_000_000_000
    })
}

#[test]
fn chaos_short() {
    if !require_root("chaos_short") {
        return;
    }
    soak(Settings {
        tag: "chs",
        nodes: 3,
        faults: 40,
        duration: Duration::from_secs(60),
        seed: seed(),
        concurrent: 2,
    });
}

#[test]
#[ignore = "long soak: scripts/chaos-long.sh"]
fn chaos_long() {
    if !require_root("chaos_long") {
        return;
    }
    soak(Settings {
        tag: "chl",
        nodes: env_num("EGRESSD_CHAOS_NODES").map_or(5, |n| n as usize),
        faults: env_num("EGRESSD_CHAOS_FAULTS").map_or(usize::MAX, |n| n as usize),
        duration: Duration::from_secs(env_num("EGRESSD_CHAOS_SECS").unwrap_or(600)),
        seed: seed(),
        concurrent: env_num("EGRESSD_CHAOS_CONCURRENT").map_or(2, |n| n as usize),
    });
}

// ---------------------------------------------------------------------------------------------
// The faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Kill,
    Cut,
    Partition,
    PeerNet,
    Pause,
    LeaderRestart,
    DiskFull,
}

const KINDS: [Kind; 7] = [
    Kind::Kill,
    Kind::Cut,
    Kind::Partition,
    Kind::PeerNet,
    Kind::Pause,
    Kind::LeaderRestart,
    Kind::DiskFull,
];

/// Trouble on the peer network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// `tc netem` delay, jitter, loss and reordering on the mgmt bridge ports.
    Netem,
    /// Random loss in the mgmt bridge (nftables `numgen random`).
    Loss,
    /// A `tbf` bandwidth squeeze on the mgmt bridge ports: queueing delay and tail drops.
    Throttle,
}

/// A fault in force, with when it heals.
#[derive(Debug)]
enum Fault {
    /// The daemon is down (killed, or terminating: `exiting` is its child until it has exited)
    /// and restarts at `until`.
    Down {
        node: usize,
        until: Instant,
        exiting: Option<usize>,
    },
    Cut {
        node: usize,
        until: Instant,
    },
    Partition {
        nodes: Vec<usize>,
        until: Instant,
    },
    Peer {
        how: Peer,
        until: Instant,
    },
    Paused {
        node: usize,
        until: Instant,
    },
    Disk {
        node: usize,
        until: Instant,
    },
}

impl Fault {
    fn until(&self) -> Instant {
        match self {
            Fault::Down { until, .. }
            | Fault::Cut { until, .. }
            | Fault::Partition { until, .. }
            | Fault::Peer { until, .. }
            | Fault::Paused { until, .. }
            | Fault::Disk { until, .. } => *until,
        }
    }

    /// The node this fault is about, for faults that take one node.
    fn node(&self) -> Option<usize> {
        match self {
            Fault::Down { node, .. }
            | Fault::Cut { node, .. }
            | Fault::Paused { node, .. }
            | Fault::Disk { node, .. } => Some(*node),
            _ => None,
        }
    }
}

/// An `egressd apply` in flight.
struct Apply {
    name: String,
    node: usize,
    child: Child,
    started: Instant,
    /// Still in flight when the leader went down.
    during_restart: bool,
}

/// The small tmpfs file systems under the nodes' `data_dir`s. Each is mounted in a directory of
/// its own, and `{topo.dir}/data-gwN` is a symbolic link to it, so the lab's directory never
/// has a mount point in it; unmounted (lazily) on drop, also when the test fails.
struct DataDisks {
    dir: tempfile::TempDir,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl DataDisks {
    fn new() -> DataDisks {
        DataDisks {
            dir: tempfile::tempdir().expect("temp dir"),
            mounts: Default::default(),
        }
    }

    fn mount(&self, topo: &Topo, i: usize) {
        let m = self.dir.path().join(name(i));
        std::fs::create_dir(&m).expect("mount point");
        let path = std::ffi::CString::new(m.display().to_string()).expect("path");
        let opts = std::ffi::CString::new(format!("size={DATA_MB}m,mode=0700")).expect("opts");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mount tmpfs on {}: {}",
            m.display(),
            std::io::Error::last_os_error()
        );
        self.mounts.borrow_mut().push(m.clone());
        std::os::unix::fs::symlink(&m, topo.dir.path().join(format!("data-{}", name(i))))
            .expect("data_dir link");
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.path().join(name(i))
    }

    /// Fills node `i`'s disk to the last byte.
    fn fill(&self, i: usize) -> u64 {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path(i).join("fill")).expect("fill file");
        let mut written = 0;
        for chunk in [1 << 20, 4096, 512, 1] {
            let buf = vec![0u8; chunk];
            while f.write_all(&buf).is_ok() {
                written += chunk as u64;
            }
        }
        written
    }

    fn free(&self, i: usize) {
        let _ = std::fs::remove_file(self.path(i).join("fill"));
    }

    /// Bytes used on node `i`'s disk.
    fn used(&self, i: usize) -> u64 {
        let path = std::ffi::CString::new(self.path(i).display().to_string()).expect("path");
        // SAFETY: statvfs fills the struct for a NUL-terminated path.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(path.as_ptr(), &mut s) != 0 {
                return 0;
            }
            (s.f_blocks - s.f_bfree) * s.f_frsize
        }
    }
}

impl Drop for DataDisks {
    fn drop(&mut self) {
        for m in self.mounts.borrow().iter() {
            if let Ok(p) = std::ffi::CString::new(m.display().to_string()) {
                // SAFETY: a NUL-terminated path; MNT_DETACH never blocks.
                unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Whether `tc netem` works on this kernel (it is a module some kernels lack): tried on a veth
/// in a namespace of the lab's.
fn netem_works(c: &Cluster) -> bool {
    let ns = c.topo.mgmt.clone();
    let lab = &c.topo.lab;
    lab.exec(
        &ns,
        [
            "ip", "link", "add", "nt0", "type", "veth", "peer", "name", "nt1",
        ],
    );
    let out = lab.try_exec(
        &ns,
        [
            "tc", "qdisc", "add", "dev", "nt0", "root", "netem", "delay", "1ms",
        ],
    );
    lab.exec(&ns, ["ip", "link", "del", "nt0"]);
    out.status.success()
}

// ---------------------------------------------------------------------------------------------
// The soak

struct Soak {
    c: Cluster,
    disks: DataDisks,
    s: Settings,
    rng: Rng,
    t0: Instant,
    netem: bool,
    token: PathBuf,
    timeline: Vec<String>,
    injected: BTreeMap<String, usize>,
    active: Vec<Fault>,
    paused: Vec<bool>,
    /// Nodes whose daemon exited by itself, with when they are restarted.
    respawn: Vec<Option<Instant>>,
    /// Daemons that exited by themselves, by cause (their last log line).
    self_exits: BTreeMap<String, usize>,
    applies: Vec<Apply>,
    next_apply: usize,
    next_background_apply: Instant,
    acked: Vec<String>,
    /// Applies the CLI reported failed.
    failed: Vec<String>,
    failed_applies: BTreeMap<String, usize>,
    acked_during_restart: usize,
    failed_during_restart: usize,
    /// Leader restarts whose apply had already been answered when the leader went down.
    restarts_after_apply_answered: usize,
    /// Failed applies that were committed all the same (present on every node at the end).
    failed_but_present: usize,
}

impl Soak {
    fn say(&mut self, what: String) {
        let line = format!("[{:8.3}s] {what}", self.t0.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.timeline.push(line);
    }

    fn count(&mut self, what: &str) {
        *self.injected.entry(what.to_string()).or_default() += 1;
    }

    fn running(&self, i: usize) -> bool {
        self.c.children[i].is_some()
    }

    /// Free for a fault of its own: running, not paused, no other fault on it.
    fn free(&self, i: usize) -> bool {
        self.running(i)
            && !self.paused[i]
            && self.respawn[i].is_none()
            && !self.active.iter().any(|f| f.node() == Some(i))
    }

    /// A node for a fault: gw1 (usually the active one) 40% of the time, else any; the first
    /// acceptable one from there on.
    fn pick(&mut self, ok: impl Fn(&Soak, usize) -> bool) -> Option<usize> {
        let first = if self.rng.chance(0.4) {
            0
        } else {
            self.rng.below(self.s.nodes as u64) as usize
        };
        (0..self.s.nodes)
            .map(|k| (first + k) % self.s.nodes)
            .find(|&i| ok(self, i))
    }

    /// The egressd CLI in node `i`'s namespace, bounded by `timeout` (a paused daemon never
    /// answers).
    fn cli(&self, i: usize, secs: u32, args: &[&str]) -> std::process::Output {
        let secs = secs.to_string();
        let mut full: Vec<&str> = vec!["timeout", &secs, EGRESSD];
        full.extend(args);
        full.extend(["--admin", "http://127.0.0.1:7481"]);
        self.c.topo.lab.try_exec(&self.c.topo.nodes[i], full)
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.cli(i, 3, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn restart(&mut self, i: usize) {
        let cfg = self.c.configs[i].clone();
        self.c.children[i] = Some(self.c.topo.start_egressd(i, &cfg));
        self.paused[i] = false;
    }

    fn kill(&mut self, i: usize) {
        if let Some(ch) = self.c.children[i].take() {
            let child = self.c.topo.lab.child(ch);
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused[i] = false;
    }

    fn mgmt_ports(&self) -> Vec<String> {
        (0..self.s.nodes)
            .map(|i| format!("p-{}", name(i)))
            .collect()
    }

    // -- injecting

    /// Injects a fault of a random kind (drawn again while the kind drawn does not apply now,
    /// e.g. a partition while one is in force).
    fn inject(&mut self) -> bool {
        for _ in 0..2 * KINDS.len() {
            let kind = KINDS[self.rng.below(KINDS.len() as u64) as usize];
            if self.try_inject(kind) {
                return true;
            }
        }
        false
    }

    fn try_inject(&mut self, kind: Kind) -> bool {
        let now = Instant::now();
        match kind {
            Kind::Kill => {
                let d = self.rng.ms(300, 2500);
                let Some(i) = self.pick(|s, i| s.free(i)) else {
                    return false;
                };
                self.kill(i);
                self.say(format!("kill -9 {} (restart in {d:?})", name(i)));
                self.count("kill -9, restart later");
                self.active.push(Fault::Down {
                    node: i,
                    until: now + d,
                    exiting: None,
                });
            }
            Kind::Cut => {
                let d = self.rng.ms(200, 2500);
                let Some(i) = self.pick(|s, i| s.free(i)) else {
                    return false;
                };
                self.c.cut_links(&name(i));
                self.say(format!(
                    "links of {} cut (LAN, WAN, peer) for {d:?}",
                    name(i)
                ));
                self.count("links cut");
                self.active.push(Fault::Cut {
                    node: i,
                    until: now + d,
                });
            }
            Kind::Partition => {
                let d = self.rng.ms(300, 3000);
                let size = if self.rng.chance(0.5) { 1 } else { 2 };
                let first = self.pick(|_, _| true).expect("a node");
                let second = self.rng.below(self.s.nodes as u64 - 1) as usize;
                if self
                    .active
                    .iter()
                    .any(|f| matches!(f, Fault::Partition { .. }))
                {
                    return false;
                }
                let mut group = vec![first];
                if size == 2 {
                    group.push((first + 1 + second) % self.s.nodes);
                }
                group.sort();
                let ports = self.mgmt_ports();
                let side = |g: &[usize]| {
                    g.iter()
                        .map(|i| format!("\"{}\"", ports[*i]))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let rest: Vec<usize> = (0..self.s.nodes).filter(|i| !group.contains(i)).collect();
                let (a, b) = (side(&group), side(&rest));
                let rules = format!(
                    "table bridge chaos_part {{\n chain cut {{ type filter hook forward priority 0; policy accept;\n  iifname {{ {a} }} oifname {{ {b} }} drop\n  iifname {{ {b} }} oifname {{ {a} }} drop\n }}\n}}\n"
                );
                self.nft(&rules);
                let names: Vec<String> = group.iter().map(|i| name(*i)).collect();
                self.say(format!(
                    "partition {names:?} from the others on the peer network for {d:?}"
                ));
                self.count(if size == 1 {
                    "partition of one node (peer network)"
                } else {
                    "partition of two nodes (peer network)"
                });
                self.active.push(Fault::Partition {
                    nodes: group,
                    until: now + d,
                });
            }
            Kind::PeerNet => {
                let d = self.rng.ms(1000, 4000);
                let pick = self.rng.below(if self.netem { 3 } else { 2 });
                let (delay, jitter, loss, reorder) = (
                    self.rng.below(80) + 5,
                    self.rng.below(30),
                    self.rng.below(30) + 1,
                    self.rng.below(40),
                );
                let (rate, latency) = (self.rng.below(448) + 64, self.rng.below(250) + 50);
                if self.active.iter().any(|f| matches!(f, Fault::Peer { .. })) {
                    return false;
                }
                let how = match (self.netem, pick) {
                    (true, 2) => Peer::Netem,
                    (_, 0) => Peer::Loss,
                    _ => Peer::Throttle,
                };
                let mgmt = self.c.topo.mgmt.clone();
                match how {
                    Peer::Netem => {
                        for p in self.mgmt_ports() {
                            self.c.topo.lab.exec(
                                &mgmt,
                                [
                                    "tc",
                                    "qdisc",
                                    "add",
                                    "dev",
                                    &p,
                                    "root",
                                    "netem",
                                    "delay",
                                    &format!("{delay}ms"),
                                    &format!("{jitter}ms"),
                                    "loss",
                                    &format!("{loss}%"),
                                    "reorder",
                                    &format!("{reorder}%"),
                                    "50%",
                                ],
                            );
                        }
                        self.say(format!(
                            "netem on the peer network: delay {delay} ms ± {jitter} ms, loss {loss}%, reorder {reorder}%, for {d:?}"
                        ));
                        self.count("netem delay/loss/reorder (peer network)");
                    }
                    Peer::Loss => {
                        self.nft(&format!(
                            "table bridge chaos_loss {{\n chain lose {{ type filter hook forward priority 0; policy accept;\n  numgen random mod 100 < {loss} drop\n }}\n}}\n"
                        ));
                        self.say(format!("{loss}% loss on the peer network for {d:?}"));
                        self.count("random loss (peer network, nftables)");
                    }
                    Peer::Throttle => {
                        for p in self.mgmt_ports() {
                            self.c.topo.lab.exec(
                                &mgmt,
                                [
                                    "tc",
                                    "qdisc",
                                    "add",
                                    "dev",
                                    &p,
                                    "root",
                                    "tbf",
                                    "rate",
                                    &format!("{rate}kbit"),
                                    "burst",
                                    "4kb",
                                    "latency",
                                    &format!("{latency}ms"),
                                ],
                            );
                        }
                        self.say(format!(
                            "peer network squeezed to {rate} kbit/s per port (queue {latency} ms) for {d:?}"
                        ));
                        self.count("bandwidth squeeze (peer network, tbf)");
                    }
                }
                self.active.push(Fault::Peer {
                    how,
                    until: now + d,
                });
            }
            Kind::Pause => {
                let d = self.rng.ms(50, 2000);
                let Some(i) = self.pick(|s, i| s.free(i)) else {
                    return false;
                };
                let ch = self.c.children[i].expect("running");
                signal(self.c.topo.lab.child(ch), "STOP");
                self.paused[i] = true;
                self.say(format!("SIGSTOP {} for {d:?}", name(i)));
                self.count("SIGSTOP/SIGCONT");
                self.active.push(Fault::Paused {
                    node: i,
                    until: now + d,
                });
            }
            Kind::LeaderRestart => {
                let d = self.rng.ms(100, 1500);
                let delay = self.rng.ms(0, 25);
                let term = self.rng.chance(0.3);
                let Some(asked) = self.pick(|s, i| s.free(i)) else {
                    return false;
                };
                let via = self.rng.below(self.s.nodes as u64) as usize;
                let Some(leader) = self
                    .status(asked)
                    .and_then(|s| s["cluster"]["leader"].as_str().map(|l| self.c.index(l)))
                else {
                    self.say(format!("no leader known to {}", name(asked)));
                    return false;
                };
                if !self.free(leader) {
                    return false;
                }
                let via = (0..self.s.nodes)
                    .map(|k| (via + k) % self.s.nodes)
                    .find(|&i| self.running(i) && !self.paused[i])
                    .unwrap_or(leader);
                let applied = self.start_apply(via);
                std::thread::sleep(delay);
                let in_flight = self
                    .applies
                    .last_mut()
                    .is_some_and(|a| a.child.try_wait().ok().flatten().is_none());
                if let Some(a) = self.applies.last_mut() {
                    a.during_restart = in_flight;
                }
                let how = if term { "SIGTERM" } else { "kill -9" };
                let exiting = if term {
                    let ch = self.c.children[leader].take().expect("running");
                    signal(self.c.topo.lab.child(ch), "TERM");
                    Some(ch)
                } else {
                    self.kill(leader);
                    None
                };
                self.say(format!(
                    "leader {} restarted ({how}) {delay:?} after `apply` of {applied} through {} \
                     ({}); back in {d:?}",
                    name(leader),
                    name(via),
                    if in_flight {
                        "still in flight"
                    } else {
                        "already answered"
                    }
                ));
                self.count("leader restart during apply");
                if !in_flight {
                    self.restarts_after_apply_answered += 1;
                }
                self.active.push(Fault::Down {
                    node: leader,
                    until: Instant::now() + d,
                    exiting,
                });
            }
            Kind::DiskFull => {
                let d = self.rng.ms(500, 3000);
                let Some(i) = self.pick(|s, i| s.free(i)) else {
                    return false;
                };
                let bytes = self.disks.fill(i);
                self.say(format!(
                    "data_dir of {} full ({} KiB written) for {d:?}",
                    name(i),
                    bytes / 1024
                ));
                self.count("full disk under data_dir");
                self.active.push(Fault::Disk {
                    node: i,
                    until: now + d,
                });
            }
        }
        true
    }

    fn nft(&self, rules: &str) {
        let path = self
            .c
            .topo
            .dir
            .path()
            .join(format!("chaos-{}.nft", self.timeline.len()));
        std::fs::write(&path, rules).expect("nft file");
        let mgmt = self.c.topo.mgmt.clone();
        self.c
            .topo
            .lab
            .exec(&mgmt, ["nft", "-f", &path.display().to_string()]);
    }

    // -- healing

    /// Heals the faults due (all of them with `all`); returns whether any is left.
    fn heal(&mut self, all: bool) -> bool {
        let now = Instant::now();
        let mut keep = Vec::new();
        for f in std::mem::take(&mut self.active) {
            if !all && f.until() > now {
                keep.push(f);
                continue;
            }
            match f {
                Fault::Down {
                    node,
                    until,
                    exiting: Some(ch),
                } => {
                    let child = self.c.topo.lab.child(ch);
                    if child.try_wait().ok().flatten().is_none() {
                        if now.duration_since(until) > Duration::from_secs(10) {
                            let _ = child.kill();
                            let _ = child.wait();
                            self.say(format!(
                                "{} did not exit within 10 s of SIGTERM: killed",
                                name(node)
                            ));
                        } else {
                            keep.push(Fault::Down {
                                node,
                                until,
                                exiting: Some(ch),
                            });
                            continue;
                        }
                    }
                    self.restart(node);
                    self.say(format!("{} restarted", name(node)));
                }
                Fault::Down { node, .. } => {
                    self.restart(node);
                    self.say(format!("{} restarted", name(node)));
                }
                Fault::Cut { node, .. } => {
                    self.c.restore_links(&name(node));
                    self.say(format!("links of {} restored", name(node)));
                }
                Fault::Partition { nodes, .. } => {
                    let mgmt = self.c.topo.mgmt.clone();
                    self.c
                        .topo
                        .lab
                        .exec(&mgmt, ["nft", "delete", "table", "bridge", "chaos_part"]);
                    let names: Vec<String> = nodes.iter().map(|i| name(*i)).collect();
                    self.say(format!("partition of {names:?} healed"));
                }
                Fault::Peer { how, .. } => {
                    let mgmt = self.c.topo.mgmt.clone();
                    match how {
                        Peer::Loss => {
                            self.c
                                .topo
                                .lab
                                .exec(&mgmt, ["nft", "delete", "table", "bridge", "chaos_loss"]);
                        }
                        Peer::Netem | Peer::Throttle => {
                            for p in self.mgmt_ports() {
                                self.c
                                    .topo
                                    .lab
                                    .exec(&mgmt, ["tc", "qdisc", "del", "dev", &p, "root"]);
                            }
                        }
                    }
                    self.say("peer network healed".to_string());
                }
                Fault::Paused { node, .. } => {
                    if let Some(ch) = self.c.children[node] {
                        signal(self.c.topo.lab.child(ch), "CONT");
                    }
                    self.paused[node] = false;
                    self.say(format!("SIGCONT {}", name(node)));
                }
                Fault::Disk { node, .. } => {
                    self.disks.free(node);
                    self.say(format!("data_dir of {} freed", name(node)));
                }
            }
        }
        self.active = keep;
        !self.active.is_empty()
    }

    /// Notices daemons that exited by themselves and restarts them a second later, as
    /// systemd's `Restart=on-failure` with `RestartSec=1s` would: also while their disk is
    /// still full, so that a start-up that fails (and fails again) is part of the soak.
    fn supervise(&mut self) {
        let now = Instant::now();
        for i in 0..self.s.nodes {
            if let Some(ch) = self.c.children[i]
                && let Ok(Some(status)) = self.c.topo.lab.child(ch).try_wait()
            {
                self.c.children[i] = None;
                self.paused[i] = false;
                let disk_full = self
                    .active
                    .iter()
                    .any(|f| matches!(f, Fault::Disk { node, .. } if *node == i));
                let log = self.c.topo.log(i);
                let mut tail: Vec<&str> = log.lines().rev().take(3).collect();
                tail.reverse();
                let last: String = tail.last().unwrap_or(&"").chars().take(100).collect();
                let cause = format!(
                    "{last} ({status}{})",
                    if disk_full { ", data_dir full" } else { "" }
                );
                *self.self_exits.entry(cause).or_default() += 1;
                self.say(format!(
                    "{} exited by itself ({status}){}; its last lines:\n    {}",
                    name(i),
                    if disk_full {
                        " with its data_dir full"
                    } else {
                        ""
                    },
                    tail.join("\n    ")
                ));
                self.respawn[i] = Some(now + Duration::from_secs(1));
            }
            if let Some(at) = self.respawn[i]
                && at <= now
            {
                self.respawn[i] = None;
                self.restart(i);
                self.say(format!("{} restarted after it exited", name(i)));
            }
        }
    }

    // -- applies

    /// Starts `egressd apply` of a new policy through node `i`; returns the policy's name.
    fn start_apply(&mut self, i: usize) -> String {
        let k = self.next_apply;
        self.next_apply += 1;
        let name = format!("chaos-{k}");
        let file = self.c.topo.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "[[policy]]\nname = \"{name}\"\negress_gateway_name = \"{GW}\"\n\
                 source_cidrs = [\"10.80.{}.{}/32\"]\ndestination_cidrs = [\"198.51.100.0/24\"]\n",
                k / 256 % 256,
                k % 256
            ),
        )
        .expect("apply file");
        let mut cmd = tools::cmd("ip");
        cmd.args([
            "netns",
            "exec",
            &self.c.topo.nodes[i],
            "timeout",
            "60",
            EGRESSD,
        ])
        .args(["apply", "-f"])
        .arg(&file)
        .arg("--token-file")
        .arg(&self.token)
        .args(["--admin", "http://127.0.0.1:7481"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let child = cmd.spawn().expect("egressd apply");
        self.applies.push(Apply {
            name: name.clone(),
            node: i,
            child,
            started: Instant::now(),
            during_restart: false,
        });
        name
    }

    fn poll_applies(&mut self) {
        let mut left = Vec::new();
        for mut a in std::mem::take(&mut self.applies) {
            match a.child.try_wait() {
                Ok(None) => left.push(a),
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Some(mut e) = a.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    let took = a.started.elapsed();
                    if status.success() {
                        self.acked.push(a.name.clone());
                        if a.during_restart {
                            self.acked_during_restart += 1;
                        }
                        if a.during_restart || took > Duration::from_secs(5) {
                            self.say(format!(
                                "apply of {} through {} acknowledged after {took:?}",
                                a.name,
                                name(a.node)
                            ));
                        }
                    } else {
                        if a.during_restart {
                            self.failed_during_restart += 1;
                        }
                        let reason = if status.code() == Some(124) {
                            "no answer within 60 s".to_string()
                        } else {
                            err.lines().last().unwrap_or("").to_string()
                        };
                        self.say(format!(
                            "apply of {} through {} failed after {took:?}: {reason}",
                            a.name,
                            name(a.node)
                        ));
                        *self
                            .failed_applies
                            .entry(short_reason(&reason))
                            .or_default() += 1;
                        self.failed.push(a.name.clone());
                    }
                }
                Err(e) => panic!("waiting for egressd apply: {e}"),
            }
        }
        self.applies = left;
    }

    fn background_apply(&mut self) {
        if Instant::now() < self.next_background_apply {
            return;
        }
        let gap = self.rng.ms(500, 2500);
        self.next_background_apply = Instant::now() + gap;
        let i = self.rng.below(self.s.nodes as u64) as usize;
        if self.running(i) && !self.paused[i] {
            self.start_apply(i);
        }
    }

    fn tick(&mut self) {
        self.heal(false);
        self.supervise();
        self.poll_applies();
    }
}

/// An apply's failure, without the parts that differ from one to the next (numbers, node
/// names, addresses).
fn short_reason(reason: &str) -> String {
    let r = reason
        .trim_start_matches("egressd: ")
        .split(['(', '{', ';'])
        .next()
        .unwrap_or("");
    // "503 Service Unavailable: ..." keeps its status code.
    let (mut out, r) = match r.split_once(' ') {
        Some((code, rest)) if code.len() == 3 && code.chars().all(|c| c.is_ascii_digit()) => (
            format!("{code} "),
            rest.trim_start_matches("Service Unavailable: "),
        ),
        _ => (String::new(), r),
    };
    let mut prev_digit = false;
    for ch in r.chars() {
        if ch.is_ascii_digit() {
            if !prev_digit {
                out.push('N');
            }
            prev_digit = true;
        } else {
            out.push(ch);
            prev_digit = false;
        }
    }
    let out: String = out.chars().take(120).collect();
    let out = out.trim().trim_end_matches(':').trim();
    if out.is_empty() {
        "(no message)".to_string()
    } else {
        out.to_string()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The run

fn soak(s: Settings) {
    let seed = s.seed;
    let rerun = if s.tag == "chs" {
        format!("EGRESSD_CHAOS_SEED={seed} cargo test --test chaos -- chaos_short --nocapture")
    } else {
        format!("EGRESSD_CHAOS_SEED={seed} scripts/chaos-long.sh")
    };
    eprintln!(
        "\n=== chaos soak: seed {seed}, {} nodes, up to {} faults in {:?} (rerun: {rerun})\n",
        s.nodes,
        if s.faults == usize::MAX {
            "unlimited".to_string()
        } else {
            s.faults.to_string()
        },
        s.duration
    );
    let (token, admin) = admin_token(TOKEN);
    let disks = DataDisks::new();
    let n = s.nodes;
    let c = Cluster::start_prepared(s.tag, n, &admin, "", |topo| {
        for i in 0..n {
            disks.mount(topo, i);
        }
    });
    let netem = netem_works(&c);
    if !netem {
        eprintln!(
            "\n!!! tc netem does not work on this kernel (CONFIG_NET_SCH_NETEM is off or the \
             module is missing):\n!!! the netem fault (delay/loss/reordering on the peer \
             network) is SKIPPED; random loss (nftables)\n!!! and a bandwidth squeeze (tbf) on \
             the peer network stand in for it.\n"
        );
    }
    let mut soak = Soak {
        c,
        disks,
        rng: Rng(seed),
        t0: Instant::now(),
        netem,
        token: token.path().to_path_buf(),
        timeline: Vec::new(),
        injected: BTreeMap::new(),
        active: Vec::new(),
        paused: vec![false; n],
        respawn: vec![None; n],
        self_exits: BTreeMap::new(),
        applies: Vec::new(),
        next_apply: 0,
        next_background_apply: Instant::now(),
        acked: Vec::new(),
        failed: Vec::new(),
        failed_applies: BTreeMap::new(),
        acked_during_restart: 0,
        failed_during_restart: 0,
        restarts_after_apply_answered: 0,
        failed_but_present: 0,
        s,
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut soak)));
    let keep = std::env::var("EGRESSD_CHAOS_KEEP").as_deref() == Ok("1");
    match result {
        Ok(problems) if problems.is_empty() => {
            if keep {
                let dir = keep_artifacts(&soak);
                eprintln!("artifacts kept in {}", dir.display());
            }
        }
        Ok(problems) => {
            let dir = keep_artifacts(&soak);
            panic!(
                "chaos soak, seed {seed}: {} problem(s):\n{}\nlogs, captures and timeline kept \
                 in {}\nrerun: {rerun}",
                problems.len(),
                problems.join("\n"),
                dir.display()
            );
        }
        Err(e) => {
            let dir = keep_artifacts(&soak);
            eprintln!(
                "chaos soak, seed {seed}: the test failed; logs, captures and timeline kept in \
                 {}\nrerun: {rerun}",
                dir.display()
            );
            std::panic::resume_unwind(e);
        }
    }
    drop(token);
}

/// Copies the lab's files (daemon logs, captures, ping output) and the timeline to a directory
/// that outlives the test.
fn keep_artifacts(soak: &Soak) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "chaos-{}-{}",
        soak.s.seed,
        std::process::id()
    ));
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(entries) = std::fs::read_dir(soak.c.topo.dir.path()) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_file())
                && let Some(f) = p.file_name()
            {
                let _ = std::fs::copy(&p, dir.join(f));
            }
        }
    }
    let _ = std::fs::write(dir.join("timeline.txt"), soak.timeline.join("\n"));
    dir
}

/// The watchers outside the nodes.
struct Watchers {
    cap_wan: Capture,
    cap_lan: Capture,
    census_wan: ArpProber,
    census_lan: ArpProber,
    probe: UdpProbe,
}

impl Watchers {
    fn start(c: &mut Cluster) -> Watchers {
        let dir = c.topo.dir.path().to_path_buf();
        let (lan, wan) = (c.topo.lan.clone(), c.topo.wan.clone());
        let (client, server) = (c.topo.client.clone(), c.topo.server.clone());
        let cap_wan = Capture::start(&mut c.topo.lab, &wan, "br1", &dir.join("wan.pcap"));
        let cap_lan = Capture::start(&mut c.topo.lab, &lan, "br0", &dir.join("lan.pcap"));
        let census_wan = c.prober();
        let census_lan = ArpProber::start(
            &client,
            "eth0",
            CLIENT_OTHER_IP.parse::<Ipv4Addr>().expect("ip"),
            NEXT_HOP.parse::<Ipv4Addr>().expect("ip"),
            Duration::from_millis(10),
        );
        let probe = UdpProbe::start(
            &client,
            SocketAddr::new(CLIENT_IP.parse().expect("ip"), 0),
            &server,
            SocketAddr::new(SERVER_IP.parse().expect("ip"), PROBE_PORT),
            Duration::from_millis(10),
        );
        Watchers {
            cap_wan,
            cap_lan,
            census_wan,
            census_lan,
            probe,
        }
    }
}

/// What the watchers saw, checked.
struct Findings {
    violations: Vec<String>,
    census: Vec<String>,
    claims: Vec<String>,
    probe: ProbeLog,
}

/// The soak itself; returns the problems found (safety violations, lost acknowledged writes,
/// no recovery).
fn run(soak: &mut Soak) -> Vec<String> {
    soak.c.assert_traffic_via_vip();
    let watchers = Watchers::start(&mut soak.c);
    std::thread::sleep(Duration::from_millis(500));
    let soak_start = unix_now();
    soak.t0 = Instant::now();
    let faults_for = inject_faults(soak);
    let (recovered_in, mut problems) = heal_and_recover(soak);
    let (missing, present) = check_applies(soak);
    soak.failed_but_present = soak.failed.iter().filter(|f| present.contains(*f)).count();
    problems.extend(missing.iter().map(|(node, names)| {
        format!(
            "acknowledged applies missing on {node}: {names:?} (of {} acknowledged)",
            soak.acked.len()
        )
    }));
    if recovered_in.is_some() {
        problems.extend(check_traffic(&soak.c));
    }
    std::thread::sleep(Duration::from_secs(1));
    let findings = check_safety(soak, watchers, soak_start);
    problems.extend(findings.violations.iter().cloned());
    let report = report(
        soak,
        &findings,
        faults_for,
        recovered_in,
        &missing,
        &problems,
    );
    eprintln!("{report}");
    soak.timeline.push(report);
    problems
}

/// Injects faults until the count or the time is reached; returns how long that took.
fn inject_faults(soak: &mut Soak) -> Duration {
    let mut total = 0;
    let mut next = Instant::now() + soak.rng.ms(200, 800);
    while total < soak.s.faults && soak.t0.elapsed() < soak.s.duration {
        soak.tick();
        soak.background_apply();
        if Instant::now() >= next && soak.active.len() < soak.s.concurrent {
            if soak.inject() {
                total += 1;
            }
            next = Instant::now() + soak.rng.ms(300, 1500);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    soak.say(format!("{total} faults injected; healing everything"));
    soak.t0.elapsed()
}

/// Heals every fault, brings every daemon back, lets the applies finish, and waits until the
/// cluster agrees again: gw1 (first by name) active everywhere and holding the gateway. Returns
/// how long that took (None: it did not within `RECOVER`), and the problem if it did not.
fn heal_and_recover(soak: &mut Soak) -> (Option<Duration>, Vec<String>) {
    let until = Instant::now() + Duration::from_secs(20);
    while soak.heal(true) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..soak.s.nodes {
        soak.respawn[i] = soak.respawn[i].map(|_| Instant::now());
    }
    soak.supervise();
    let until = Instant::now() + Duration::from_secs(70);
    while !soak.applies.is_empty() && Instant::now() < until {
        soak.poll_applies();
        soak.supervise();
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..soak.s.nodes {
        if !soak.running(i) {
            soak.restart(i);
            soak.say(format!("{} restarted for the end", name(i)));
        }
    }
    let healed = Instant::now();
    while healed.elapsed() < RECOVER {
        soak.supervise();
        let statuses: Vec<Option<serde_json::Value>> =
            (0..soak.s.nodes).map(|i| soak.status(i)).collect();
        let agreed = statuses.iter().all(|s| {
            s.as_ref().is_some_and(|s| {
                s["gateways"]
                    .as_array()
                    .and_then(|g| g.iter().find(|g| g["name"] == GW))
                    .is_some_and(|g| g["active"] == "gw1")
                    && s["cluster"]["leader"].is_string()
            })
        });
        let holds = statuses[0].as_ref().is_some_and(|s| {
            s["dataplane"]["held_gateways"]
                .as_array()
                .is_some_and(|a| a.iter().any(|g| g == GW))
        });
        if agreed && holds {
            let took = healed.elapsed();
            soak.say(format!("settled {took:?} after the heal"));
            return (Some(took), Vec::new());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    soak.say("did not settle".to_string());
    (
        None,
        vec![format!(
            "no recovery: {RECOVER:?} after every fault was healed, the nodes did not agree on \
             gw1 active and holding the gateway"
        )],
    )
}

/// The acknowledged applies missing on each node (after waiting up to a minute for laggards),
/// and the policies every node has.
fn check_applies(soak: &Soak) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let start = Instant::now();
    loop {
        missing.clear();
        let mut everywhere: Option<BTreeSet<String>> = None;
        for i in 0..soak.s.nodes {
            let out = soak.cli(i, 5, &["get", "policies", "--json"]);
            let names: BTreeSet<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    v.as_array().map(|a| {
                        a.iter()
                            .filter_map(|p| p["object"]["name"].as_str().map(String::from))
                            .collect()
                    })
                })
                .unwrap_or_default();
            for a in &soak.acked {
                if !names.contains(a) {
                    missing.entry(name(i)).or_default().push(a.clone());
                }
            }
            everywhere = Some(match everywhere {
                None => names,
                Some(e) => e.intersection(&names).cloned().collect(),
            });
        }
        if missing.is_empty() || start.elapsed() > Duration::from_secs(60) {
            return (missing, everywhere.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The client's traffic leaves through the VIP again.
fn check_traffic(c: &Cluster) -> Option<String> {
    let mut seen = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        seen = c.topo.seen_source(CLIENT_IP, SERVER_IP);
        if seen.as_deref() == Some(VIP) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(format!(
        "after recovery the server sees the client as {seen:?}, not as the VIP {VIP}"
    ))
}

/// Stops the watchers and checks what they saw: no probe answered twice, no interleaved claims,
/// no claim by a MAC that is no node's.
fn check_safety(soak: &mut Soak, w: Watchers, soak_start: f64) -> Findings {
    let probe = w.probe.stop(Duration::from_millis(500));
    let probes_wan = w.census_wan.stop();
    let probes_lan = w.census_lan.stop();
    let c = &mut soak.c;
    let wan = w.cap_wan.stop(&mut c.topo.lab);
    let lan = w.cap_lan.stop(&mut c.topo.lab);
    let names: BTreeMap<[u8; 6], String> = (0..soak.s.nodes)
        .flat_map(|i| {
            [
                (
                    arp::mac(&c.topo.nodes[i], "eth1"),
                    format!("{}/eth1", name(i)),
                ),
                (
                    arp::mac(&c.topo.nodes[i], "eth0"),
                    format!("{}/eth0", name(i)),
                ),
            ]
        })
        .collect();
    let macs: Vec<String> = names
        .iter()
        .map(|(m, n)| format!("{n} {}", arp::mac_text(*m)))
        .collect();
    soak.timeline
        .push(format!("MACs (to read the captures): {}", macs.join(", ")));
    let who = |m: &[u8; 6]| {
        names
            .get(m)
            .cloned()
            .unwrap_or_else(|| format!("unknown MAC {}", arp::mac_text(*m)))
    };
    let at = |t: f64| format!("+{:.3}s", t - soak_start);
    let mut violations = Vec::new();
    let mut census = Vec::new();
    for (what, probes) in [
        ("VIP on the WAN", &probes_wan),
        ("next hop on the LAN", &probes_lan),
    ] {
        let doubles = arp::double_answers(probes);
        let span = match (probes.first(), probes.last()) {
            (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
            _ => 0.0,
        };
        census.push(format!(
            "{what}: {} probes (one every {:.1} ms), {} answered by two MACs",
            probes.len(),
            1e3 * span / probes.len().max(1) as f64,
            doubles.len()
        ));
        for p in doubles.iter().take(10) {
            let macs: Vec<String> = p.answered_by.iter().map(&who).collect();
            violations.push(format!(
                "ARP census, {what}: the probe at +{:.3}s was answered by {macs:?}",
                p.at.saturating_duration_since(soak.t0).as_secs_f64()
            ));
        }
        if doubles.len() > 10 {
            violations.push(format!("... and {} more", doubles.len() - 10));
        }
    }
    let mut claims_summary = Vec::new();
    for (what, path, ip) in [
        ("VIP on the WAN", &wan, VIP),
        ("next hop on the LAN", &lan, NEXT_HOP),
    ] {
        let claims: Vec<Claim> = capture::read_claims(path, ip.parse().expect("ip"));
        let inter = capture::interleavings(&claims, HOLDING_WINDOW);
        claims_summary.push(format!(
            "{what}: {} claims ({} gratuitous) in {} runs of one holder, {} interleaved",
            claims.len(),
            claims.iter().filter(|c| c.gratuitous).count(),
            capture::runs(&claims).len(),
            inter.len()
        ));
        for x in inter.iter().take(10) {
            violations.push(format!(
                "claims of the {what} interleaved: {} claimed it at {} while {} held it \
                 (claims at {} and {})",
                who(&x.intruder),
                at(x.at),
                who(&x.holder),
                at(x.before),
                at(x.after)
            ));
        }
        if inter.len() > 10 {
            violations.push(format!("... and {} more interleavings", inter.len() - 10));
        }
        let unknown: BTreeSet<[u8; 6]> = claims
            .iter()
            .map(|c| c.mac)
            .filter(|m| !names.contains_key(m))
            .collect();
        for m in unknown {
            violations.push(format!(
                "the {what} was claimed by {}, which is no node's",
                arp::mac_text(m)
            ));
        }
        let spoofed = claims.iter().filter(|c| c.mac != c.eth_src).count();
        if spoofed > 0 {
            violations.push(format!(
                "{spoofed} claims of the {what} carry an ARP sender MAC other than the frame's"
            ));
        }
    }
    Findings {
        violations,
        census,
        claims: claims_summary,
        probe,
    }
}

fn report(
    soak: &Soak,
    f: &Findings,
    faults_for: Duration,
    recovered_in: Option<Duration>,
    missing: &BTreeMap<String, Vec<String>>,
    problems: &[String],
) -> String {
    use std::fmt::Write as _;
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n=== chaos soak report (seed {}, {} nodes)",
        soak.s.seed, soak.s.nodes
    );
    let _ = writeln!(
        r,
        "duration: {:.1} s ({:.1} s of faults, then heal and recovery{})",
        soak.t0.elapsed().as_secs_f64(),
        faults_for.as_secs_f64(),
        recovered_in.map_or(" FAILED".to_string(), |d| format!(
            " in {:.1} s",
            d.as_secs_f64()
        ))
    );
    let total: usize = soak.injected.values().sum();
    let _ = writeln!(r, "faults: {total}");
    for (k, v) in &soak.injected {
        let _ = writeln!(r, "  {v:4}  {k}");
    }
    if !soak.netem {
        let _ = writeln!(r, "     -  netem (not available on this kernel: skipped)");
    }
    if soak.restarts_after_apply_answered > 0 {
        let _ = writeln!(
            r,
            "  ({} of the leader restarts came after their apply had been answered)",
            soak.restarts_after_apply_answered
        );
    }
    let _ = writeln!(
        r,
        "daemons that exited by themselves (restarted a second later): {}",
        soak.self_exits.values().sum::<usize>()
    );
    for (cause, k) in &soak.self_exits {
        let _ = writeln!(r, "  {k:4}  {cause}");
    }
    let _ = writeln!(
        r,
        "applies: {} acknowledged ({} of them in flight while the leader restarted), {} failed \
         ({} in flight while the leader restarted); acknowledged but missing afterwards: {}",
        soak.acked.len(),
        soak.acked_during_restart,
        soak.failed_applies.values().sum::<usize>(),
        soak.failed_during_restart,
        missing.values().map(Vec::len).sum::<usize>()
    );
    for (reason, k) in &soak.failed_applies {
        let _ = writeln!(r, "  {k:4}  {reason}");
    }
    let _ = writeln!(
        r,
        "  ({} of the failed applies were committed all the same: present on every node at the \
         end)",
        soak.failed_but_present
    );
    let _ = writeln!(r, "ARP census:");
    for l in &f.census {
        let _ = writeln!(r, "  {l}");
    }
    let _ = writeln!(r, "passive capture (tcpdump on the bridges):");
    for l in &f.claims {
        let _ = writeln!(r, "  {l}");
    }
    let _ = writeln!(r, "violations: {}", f.violations.len());
    for v in &f.violations {
        let _ = writeln!(r, "  {v}");
    }
    let _ = writeln!(
        r,
        "probe availability: {:.2}% ({} of {} UDP echo probes, one every 10 ms from the client \
         through the gateway, answered)",
        100.0 * f.probe.availability(),
        f.probe.answered.iter().filter(|a| a.is_some()).count(),
        f.probe.sent.len()
    );
    let _ = match f.probe.worst_outage() {
        Some((d, from, lost)) => writeln!(
            r,
            "worst outage: {:.3} s ({lost} probes lost in a row, from +{:.3}s)",
            d.as_secs_f64(),
            from.saturating_duration_since(soak.t0).as_secs_f64()
        ),
        None => writeln!(r, "worst outage: none (every probe answered)"),
    };
    let used: Vec<String> = (0..soak.s.nodes)
        .map(|i| format!("{} {} KiB", name(i), soak.disks.used(i) / 1024))
        .collect();
    let _ = writeln!(
        r,
        "data_dir use at the end ({DATA_MB} MiB tmpfs each): {}",
        used.join(", ")
    );
    for p in problems {
        if !f.violations.contains(p) {
            let _ = writeln!(r, "PROBLEM: {p}");
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The checker checks

fn claim(t: f64, m: u8) -> Claim {
    Claim {
        t,
        mac: [2, 0, 0, 0, 0, m],
        eth_src: [2, 0, 0, 0, 0, m],
        op: 2,
        gratuitous: false,
    }
}

/// Claims handed from holder to holder pass; a claim inside another MAC's holding does not.
#[test]
fn apply_failures_are_grouped() {
    assert_eq!(
        short_reason(
            "egressd: 503 Service Unavailable: not committed: forwarding the write to leader gw4: \
             cannot connect to peer 10.78.0.5:7480: error sending request; retry once"
        ),
        "503 not committed: forwarding the write to leader gwN: cannot connect to peer N.N.N.N:N: \
         error sending request"
    );
    assert_eq!(short_reason(""), "(no message)");
}

#[test]
fn interleaved_claims_are_found() {
    let w = Duration::from_millis(30);
    // gw1 answers every 10 ms, goes silent, gw2 takes over, later gw1 takes it back.
    let mut ok: Vec<Claim> = (0..10).map(|k| claim(k as f64 * 0.01, 1)).collect();
    ok.extend((0..10).map(|k| claim(0.4 + k as f64 * 0.01, 2)));
    ok.extend((0..10).map(|k| claim(0.6 + k as f64 * 0.01, 1)));
    assert!(capture::interleavings(&ok, w).is_empty());
    assert_eq!(capture::runs(&ok).len(), 3);
    // A stale gratuitous ARP of gw1 while gw2 answers.
    let mut stale = ok.clone();
    stale.push(claim(0.455, 1));
    let found = capture::interleavings(&stale, w);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].intruder, [2, 0, 0, 0, 0, 1]);
    assert_eq!(found[0].holder, [2, 0, 0, 0, 0, 2]);
    // Two holders answering alternately.
    let both: Vec<Claim> = (0..10)
        .map(|k| claim(k as f64 * 0.005, 1 + (k % 2) as u8))
        .collect();
    assert!(capture::interleavings(&both, w).len() >= 8);
}

/// The pcap reader finds claims, and only claims, of the address it is asked about.
#[test]
fn pcap_claims_are_parsed() {
    let mut pcap = Vec::new();
    pcap.extend(0xa1b2_c3d4u32.to_le_bytes());
    pcap.extend(2u16.to_le_bytes());
    pcap.extend(4u16.to_le_bytes());
    pcap.extend([0u8; 8]);
    pcap.extend(96u32.to_le_bytes());
    pcap.extend(1u32.to_le_bytes());
    let frame = |op: u16, mac: u8, sender: [u8; 4], target: [u8; 4]| {
        let mut f = vec![0xffu8; 6];
        f.extend([2, 0, 0, 0, 0, mac]);
        f.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4]);
        f.extend(op.to_be_bytes());
        f.extend([2, 0, 0, 0, 0, mac]);
        f.extend(sender);
        f.extend([0u8; 6]);
        f.extend(target);
        f
    };
    let vip = [203, 0, 113, 50];
    for (k, f) in [
        frame(1, 1, vip, vip),               // gratuitous
        frame(2, 2, vip, [203, 0, 113, 10]), // reply
        frame(1, 3, [203, 0, 113, 10], vip), // a request for it: no claim
    ]
    .into_iter()
    .enumerate()
    {
        pcap.extend(100u32.to_le_bytes());
        pcap.extend((k as u32 * 1000).to_le_bytes());
        pcap.extend((f.len() as u32).to_le_bytes());
        pcap.extend((f.len() as u32).to_le_bytes());
        pcap.extend(f);
    }
    pcap.extend([1, 2, 3]); // a truncated record
    let claims = capture::parse_claims(&pcap, Ipv4Addr::new(203, 0, 113, 50));
    assert_eq!(claims.len(), 2, "{claims:?}");
    assert!(claims[0].gratuitous && claims[0].op == 1);
    assert!(!claims[1].gratuitous && claims[1].op == 2);
    assert_eq!(claims[1].mac, [2, 0, 0, 0, 0, 2]);
    assert!((claims[1].t - 100.001).abs() < 1e-9);
}

/// The checker catches two holders: a standby node made to answer for the VIP behind the
/// cluster's back (its daemon stopped, its fence tables deleted, the VIP put on its WAN leg)
/// shows up in the ARP census and in the capture. A checker that cannot fail proves nothing.
#[test]
fn chaos_checker_catches_a_second_holder() {
    if !require_root("chaos_checker_catches_a_second_holder") {
        return;
    }
    let mut c = Cluster::start("chneg", 3);
    let dir = c.topo.dir.path().to_path_buf();
    let wan = c.topo.wan.clone();
    let cap = Capture::start(&mut c.topo.lab, &wan, "br1", &dir.join("wan.pcap"));
    let census = c.prober();
    std::thread::sleep(Duration::from_millis(300));
    c.signal("gw3", "STOP");
    let gw3 = c.topo.nodes[2].clone();
    c.topo
        .lab
        .exec(&gw3, ["nft", "delete", "table", "arp", "egressd"]);
    c.topo
        .lab
        .try_exec(&gw3, ["nft", "delete", "table", "netdev", "egressd"]);
    let vip = format!("{VIP}/32");
    c.topo
        .lab
        .exec(&gw3, ["ip", "addr", "add", &vip, "dev", "eth1"]);
    // Long enough for more than 10 double answers also when the census runs slow: in a full
    // suite on a slow machine, 500 ms gave 9 of 75 probes.
    std::thread::sleep(Duration::from_millis(1000));
    c.topo
        .lab
        .exec(&gw3, ["ip", "addr", "del", &vip, "dev", "eth1"]);
    c.signal("gw3", "CONT");
    std::thread::sleep(Duration::from_millis(300));
    let probes = census.stop();
    let path = cap.stop(&mut c.topo.lab);
    let doubles = arp::double_answers(&probes).len();
    let claims = capture::read_claims(&path, VIP.parse().expect("ip"));
    let inter = capture::interleavings(&claims, HOLDING_WINDOW).len();
    let gw3_mac = arp::mac(&gw3, "eth1");
    assert!(
        doubles > 10,
        "the census missed the second holder: {doubles} of {} probes answered twice",
        probes.len()
    );
    assert!(
        inter > 10 && claims.iter().any(|c| c.mac == gw3_mac),
        "the capture missed the second holder: {inter} interleaved of {} claims",
        claims.len()
    );
    eprintln!(
        "second holder for 500 ms: {doubles} of {} probes answered twice, {inter} interleaved \
         claims of {}",
        probes.len(),
        claims.len()
    );
}
