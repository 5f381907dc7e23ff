//! Flow-state replication for the gateways with `conntrack_sync = true`, through conntrackd
//! (conntrack-tools), driven by egressd the way keepalived's `primary-backup.sh` drives it.
//!
//! conntrackd's FTFW protocol is made for two nodes: its receiver tracks one sequence number,
//! so with three nodes sending to one multicast group the messages of the node whose counter
//! is behind are dropped as "delayed" (seen here: a standby received none of the active
//! node's flows). So egressd runs one conntrackd per peer, each a two-node FTFW link over UDP
//! unicast on the peer network, with a port of its own per pair of nodes ([`pair_port`]).
//!
//! egressd writes each one's configuration (its own socket and lock file under `data_dir`, so
//! that several daemons on one host do not collide), starts it as a child (killed with egressd:
//! parent-death signal) and tells every one what to do at each change of role:
//!
//! - **takeover** of a synced gateway, *before* its SNAT and addresses go in: `-c` (commit the
//!   external cache, the active node's flows, into the kernel; an entry the kernel already
//!   has, left from an earlier tenure here, is updated). Once the data plane is in place: `-f`
//!   (flush both caches), `-R` (refill the internal cache from the kernel), `-B` (bulk-send it
//!   to the standbys).
//! - **release**, at start, and when a standby is back in contact with the cluster: `-n` (ask
//!   the peer for its whole cache). `primary-backup.sh` also runs `-t` there, which in
//!   conntrackd 1.4.7 schedules a *flush* of every replicable kernel entry 60 s later: that
//!   would end the flows of the node's other gateways, so egressd does not; the entries a
//!   released gateway leaves behind stay until they time out, and a later commit updates them.
//!
//! Strict conntrack (`nf_conntrack_tcp_loose = 0`, invalid packets dropped) is where un-synced
//! connections die for certain; `tests/e2e_ctsync.rs` runs in it.
//!
//! The replication is not authenticated (conntrackd has no such option): it belongs on the
//! peer network only.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// What can go wrong with conntrackd.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("conntrackd exited ({status}); its log: {}", log.display())]
    Exited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("conntrackd did not open its control socket {} within {waited:?}", socket.display())]
    NotListening { socket: PathBuf, waited: Duration },
    #[error("conntrackd {flag} ({what}) failed: {detail}")]
    Control {
        flag: &'static str,
        what: &'static str,
        detail: String,
    },
}

/// How one node's conntrackd is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub program: PathBuf,
    /// conntrackd's own directory (configuration, control socket, lock file, log).
    pub dir: PathBuf,
    /// This node's address on the peer network, and the interface that carries it.
    pub address: Ipv4Addr,
    pub interface: String,
    /// The peer's address on the peer network, and the port of the pair.
    pub peer: Ipv4Addr,
    pub port: u16,
    /// Flows from or to these addresses are not replicated (the nodes' own traffic: peer
    /// connections, management).
    pub ignore: BTreeSet<IpAddr>,
}

impl Settings {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("conntrackd.conf")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("conntrackd.ctl")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("conntrackd.lock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("conntrackd.log")
    }

    /// conntrackd's configuration file.
    pub fn render(&self) -> String {
        let mut ignore4 = String::new();
        let mut ignore6 = String::new();
        for a in &self.ignore {
            match a {
                IpAddr::V4(a) => {
                    let _ = writeln!(ignore4, "\t\t\tIPv4_address {a}");
                }
                IpAddr::V6(a) => {
                    let _ = writeln!(ignore6, "\t\t\tIPv6_address {a}");
                }
            }
        }
        format!(
            "# Written by egressd at each start; edits are overwritten.\n\
             Sync {{\n\
             \tMode FTFW {{\n\
             \t\tDisableExternalCache no\n\
             \t\tStartupResync yes\n\
             \t}}\n\
             \tUDP {{\n\
             \t\tIPv4_address {address}\n\
             \t\tIPv4_Destination_Address {peer}\n\
             \t\tPort {port}\n\
             \t\tInterface {interface}\n\
             \t\tSndSocketBuffer 1249280\n\
             \t\tRcvSocketBuffer 1249280\n\
             \t\tChecksum on\n\
             \t}}\n\
             }}\n\
             General {{\n\
             \tHashSize 32768\n\
             \tHashLimit 262144\n\
             \tLogFile {log}\n\
             \tSyslog off\n\
             \tLockFile {lock}\n\
             \tUNIX {{\n\
             \t\tPath {socket}\n\
             \t}}\n\
             \tNetlinkBufferSize 2097152\n\
             \tNetlinkBufferSizeMaxGrowth 8388608\n\
             \tNetlinkEventsReliable on\n\
             \tFilter From Userspace {{\n\
             \t\tProtocol Accept {{\n\
             \t\t\tTCP\n\
             \t\t\tUDP\n\
             \t\t\tICMP\n\
             \t\t\tIPv6-ICMP\n\
             \t\t}}\n\
             \t\tAddress Ignore {{\n\
             {ignore4}{ignore6}\
             \t\t}}\n\
             \t}}\n\
             }}\n",
            peer = self.peer,
            port = self.port,
            address = self.address,
            interface = self.interface,
            log = self.log_path().display(),
            lock = self.lock_path().display(),
            socket = self.socket_path().display(),
        )
    }
}

/// What conntrackd's statistics (`-s`) say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Entries of this node's kernel that conntrackd tracks (and sends).
    pub internal: u64,
    /// Entries received from the other nodes (what a takeover commits).
    pub external: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Messages lost on the way (FTFW asks for them again).
    pub lost: u64,
    pub malformed: u64,
}

/// Reads the output of `conntrackd -s`.
pub fn parse_stats(text: &str) -> Stats {
    let mut s = Stats::default();
    let mut section = "";
    // "  752 Bytes sent      0 Bytes recv": number, then the words that name it.
    let pairs = |line: &str| -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut i = 0;
        while i < words.len() {
            if let Ok(n) = words[i].parse::<u64>() {
                let mut name = Vec::new();
                let mut j = i + 1;
                while j < words.len() && words[j].parse::<u64>().is_err() {
                    name.push(words[j]);
                    j += 1;
                }
                out.push((n, name.join(" ")));
                i = j;
            } else {
                i += 1;
            }
        }
        out
    };
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("cache internal") {
            section = "internal";
        } else if t.starts_with("cache external") {
            section = "external";
        } else if t.starts_with("multicast traffic") || t.starts_with("UDP ") {
            section = "traffic";
        } else if t.starts_with("message tracking") {
            section = "tracking";
        } else if t.starts_with("traffic processed") || t.starts_with("network statistics") {
            section = "";
        } else if let Some(n) = t.strip_prefix("current active connections:") {
            let n = n.trim().parse().unwrap_or(0);
            match section {
                "internal" => s.internal = n,
                "external" => s.external = n,
                _ => {}
            }
        } else if section == "traffic" || section == "tracking" {
            for (n, name) in pairs(t) {
                match name.as_str() {
                    "Bytes sent" => s.bytes_sent = n,
                    "Bytes recv" => s.bytes_received = n,
                    "Pckts sent" | "Pckt sent" => s.packets_sent = n,
                    "Pckts recv" | "Pckt recv" => s.packets_received = n,
                    "Malformed msgs" => s.malformed = n,
                    "Lost msgs" => s.lost = n,
                    _ => {}
                }
            }
        }
    }
    s
}

/// A running conntrackd, egressd's child. Dropping it stops it.
pub struct Conntrackd {
    settings: Settings,
    child: Child,
}

/// How long conntrackd may take to open its control socket.
const START_WAIT: Duration = Duration::from_secs(5);

impl Conntrackd {
    /// Writes the configuration and starts conntrackd; returns once its control socket
    /// answers. Must be called from a thread that lives as long as the daemon: conntrackd gets
    /// the parent-death signal when the thread that started it ends.
    pub async fn start(settings: Settings) -> Result<Conntrackd, SyncError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| SyncError::Io { op, path, source }
        };
        std::fs::create_dir_all(&settings.dir).map_err(io("creating", &settings.dir))?;
        let conf = settings.config_path();
        std::fs::write(&conf, settings.render()).map_err(io("writing", &conf))?;
        // A killed conntrackd leaves its lock file and socket behind (and a killed egressd
        // takes its conntrackd with it), so the lock of this directory is stale here.
        for stale in [settings.lock_path(), settings.socket_path()] {
            match std::fs::remove_file(&stale) {
                Ok(()) => debug!(path = %stale.display(), "removed a stale conntrackd file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &stale)(e)),
            }
        }
        let mut cmd = Command::new(&settings.program);
        cmd.arg("-C")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls: prctl and setpriority.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The data-plane thread runs at nice 10: the replication does not.
                libc::setpriority(libc::PRIO_PROCESS, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SyncError::Spawn {
            program: settings.program.clone(),
            source,
        })?;
        let mut d = Conntrackd { settings, child };
        let started = Instant::now();
        loop {
            d.check()?;
            if d.control("-s", "statistics").await.is_ok() {
                break;
            }
            if started.elapsed() > START_WAIT {
                return Err(SyncError::NotListening {
                    socket: d.settings.socket_path(),
                    waited: START_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!(
            pid = d.child.id(),
            peer = %d.settings.peer,
            port = d.settings.port,
            interface = %d.settings.interface,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "conntrackd started: flow state of the conntrack_sync gateways is replicated on the \
             peer network"
        );
        Ok(d)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether it still runs.
    pub fn check(&mut self) -> Result<(), SyncError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(SyncError::Exited {
                status,
                log: self.settings.log_path(),
            }),
            Err(e) => Err(SyncError::Io {
                op: "waiting for conntrackd",
                path: self.settings.program.clone(),
                source: e,
            }),
        }
    }

    /// Runs `conntrackd -C CONF FLAG [ARG]` against the running daemon's socket.
    async fn control_args(
        &self,
        flag: &'static str,
        arg: Option<&str>,
        what: &'static str,
    ) -> Result<String, SyncError> {
        let mut cmd = tokio::process::Command::new(&self.settings.program);
        cmd.arg("-C").arg(self.settings.config_path()).arg(flag);
        if let Some(a) = arg {
            cmd.arg(a);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| SyncError::Control {
                flag,
                what,
                detail: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(SyncError::Control {
                flag,
                what,
                detail: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    text.trim()
                ),
            })
        }
    }

    async fn control(&self, flag: &'static str, what: &'static str) -> Result<String, SyncError> {
        self.control_args(flag, None, what).await
    }

    /// The external cache into the kernel (`-c`); returns how long it took.
    pub async fn commit(&self) -> Result<Duration, SyncError> {
        let started = Instant::now();
        self.control("-c", "commit the external cache into the kernel")
            .await?;
        Ok(started.elapsed())
    }

    /// After a takeover, with the data plane in place: `-f`, `-R`, `-B` (see the module).
    pub async fn promoted(&self) -> Result<(), SyncError> {
        self.control("-f", "flush the caches").await?;
        self.control("-R", "resync the internal cache with the kernel")
            .await?;
        self.control("-B", "send a bulk update to the standbys")
            .await?;
        Ok(())
    }

    /// After a release, and at start as a standby: `-n` (see the module).
    pub async fn standby(&self) -> Result<(), SyncError> {
        self.control("-n", "request a resync from the peer").await?;
        Ok(())
    }

    pub async fn stats(&self) -> Result<Stats, SyncError> {
        Ok(parse_stats(&self.control("-s", "statistics").await?))
    }
}

impl Drop for Conntrackd {
    fn drop(&mut self) {
        // SIGTERM: conntrackd removes its lock file and socket.
        // SAFETY: kill with a pid of our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                info!("conntrackd stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        warn!("conntrackd did not stop on SIGTERM within 2 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The UDP port of the link between two members (by name) among `members`: pairs numbered in
/// the order of the sorted names, from `base`. Both ends compute the same. None when a name is
/// not a member or the port would pass 65535.
pub fn pair_port(base: u16, members: &[String], a: &str, b: &str) -> Option<u16> {
    let mut names: Vec<&str> = members.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    let n = names.len();
    let i = names.iter().position(|x| *x == a)?;
    let j = names.iter().position(|x| *x == b)?;
    let (i, j) = (i.min(j), i.max(j));
    if i == j {
        return None;
    }
    let k = i * n - i * (i + 1) / 2 + (j - i - 1);
    u16::try_from(usize::from(base) + k).ok()
}

/// The replication with one peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerSync {
    pub peer: String,
    /// `running`, `starting` or `failed`.
    pub state: String,
    pub error: Option<String>,
    /// The peer's address and the pair's port.
    pub link: Option<String>,
    pub stats: Option<Stats>,
}

/// The status of the replication on this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// `running` (with every peer), `degraded` (some link failed), `failed`, or `off` (no
    /// gateway of this node asks for it).
    pub state: String,
    pub error: Option<String>,
    pub interface: Option<String>,
    /// The link to each other member.
    pub peers: Vec<PeerSync>,
    /// The entries received from all peers (what a takeover commits).
    pub external: u64,
    /// Takeovers that committed the replicated entries, the last one's duration, how many
    /// entries the external cache held then, and when.
    pub commits: u64,
    pub last_commit_ms: Option<f64>,
    pub last_commit_entries: Option<u64>,
    pub last_commit_unix_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            program: "/usr/sbin/conntrackd".into(),
            dir: "/var/lib/egressd/conntrackd".into(),
            address: Ipv4Addr::new(10, 78, 0, 2),
            interface: "eth2".into(),
            peer: Ipv4Addr::new(10, 78, 0, 3),
            port: 3781,
            ignore: ["127.0.0.1", "10.78.0.2", "10.78.0.3", "::1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
        }
    }

    /// The file names the instance's own socket and lock file, the peer network's interface
    /// and address, and ignores the nodes' own addresses.
    #[test]
    fn the_configuration_is_per_instance_and_on_the_peer_network() {
        let text = settings().render();
        for want in [
            "Mode FTFW",
            "IPv4_address 10.78.0.2",
            "IPv4_Destination_Address 10.78.0.3",
            "Port 3781",
            "Interface eth2",
            "LockFile /var/lib/egressd/conntrackd/conntrackd.lock",
            "Path /var/lib/egressd/conntrackd/conntrackd.ctl",
            "IPv4_address 10.78.0.3",
            "IPv6_address ::1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // Braces balance (conntrackd's parser refuses the file otherwise).
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    /// Both ends of a pair get the same port, every pair its own.
    #[test]
    fn every_pair_has_a_port_of_its_own() {
        let m: Vec<String> = ["gw3", "gw1", "gw2", "gw4"].map(String::from).to_vec();
        let mut seen = BTreeSet::new();
        for a in &m {
            for b in &m {
                if a < b {
                    let p = pair_port(3780, &m, a, b).unwrap();
                    assert_eq!(Some(p), pair_port(3780, &m, b, a));
                    assert!((3780..3786).contains(&p), "{p}");
                    seen.insert(p);
                }
            }
        }
        assert_eq!(seen.len(), 6);
        assert_eq!(pair_port(3780, &m, "gw1", "gw1"), None);
        assert_eq!(pair_port(3780, &m, "gw1", "gw9"), None);
        assert_eq!(pair_port(65535, &m, "gw3", "gw4"), None);
    }

    /// The statistics of conntrackd 1.4.7 as `-s` prints them.
    #[test]
    fn statistics_are_read() {
        let text = "cache internal:\n\
            current active connections:            4\n\
            connections created:                   4    failed:            0\n\
            \n\
            cache external:\n\
            current active connections:           17\n\
            connections created:                  17    failed:            0\n\
            \n\
            traffic processed:\n\
                               0 Bytes                         0 Pckts\n\
            \n\
            multicast traffic (active device=eth2):\n\
                             752 Bytes sent                 1200 Bytes recv\n\
                              13 Pckts sent                   20 Pckts recv\n\
                               0 Error send                    0 Error recv\n\
            \n\
            message tracking:\n\
                               0 Malformed msgs                    3 Lost msgs\n";
        assert_eq!(
            parse_stats(text),
            Stats {
                internal: 4,
                external: 17,
                bytes_sent: 752,
                bytes_received: 1200,
                packets_sent: 13,
                packets_received: 20,
                lost: 3,
                malformed: 0,
            }
        );
    }
}
