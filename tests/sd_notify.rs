//! The systemd notification protocol, with this test playing systemd: it binds a NOTIFY_SOCKET,
//! starts the real daemon (one node, a VIP gateway on a veth, in a network namespace)
//! with WATCHDOG_USEC, and checks the messages and their order — STATUS and READY=1 once
//! joined, watchdog pings while healthy, no pings while the reconciler is wedged in an `nft`
//! call, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
//!
//! The wedge is real: the daemon runs `nft` from PATH for its tables, and the test puts a wrapper
//! `nft` first in PATH that blocks while a flag file exists. Lease renewals go over netlink, so
//! the test then deletes egressd's ARP fence table from outside (what an operator's
//! `nft flush ruleset` does): the next renewal fails, the round after rebuilds the table through
//! `nft`, and the agent loop hangs inside that data plane call, as it would on a stuck nft.
//!
//! Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::{Lab, require_root};
use common::topo::{signal, wait_for};

const WATCHDOG: Duration = Duration::from_secs(2);
const VIP: &str = "192.0.2.50";

/// Every datagram received, with its arrival time.
type Inbox = Arc<Mutex<Vec<(Instant, String)>>>;

fn config(dir: &Path) -> String {
    format!(
        r#"
[node]
name = "gw1"
labels = {{ egress = "true" }}

[cluster]
listen = "127.0.0.1:7480"
data_dir = "{dir}/data"

[[gateway]]
name = "vip"
node_selector = {{ egress = "true" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP}", interfaces = ["eth1"] }}

[[policy]]
name = "clients"
egress_gateway_name = "vip"
source_cidrs = ["10.77.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
"#,
        dir = dir.display()
    )
}

/// The real `nft`, found on PATH the way the daemon would find it.
fn real_nft() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
        .expect("nft not found (apt-get install nftables)")
}

/// A directory holding an `nft` that waits while `flag` exists, then runs the real one.
fn wedgeable_nft(dir: &Path, flag: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let script = format!(
        "#!/bin/sh\nwhile [ -e '{}' ]; do sleep 0.05; done\nexec '{}' \"$@\"\n",
        flag.display(),
        real_nft().display()
    );
    let nft = bin.join("nft");
    std::fs::write(&nft, script).expect("writing the nft wrapper");
    let _ = common::tools::cmd("chmod").arg("0755").arg(&nft).status();
    bin
}

fn listen(sock: &Path) -> Inbox {
    let socket = UnixDatagram::bind(sock).expect("binding the notify socket");
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            sink.lock().expect("inbox").push((Instant::now(), msg));
        }
    });
    inbox
}

fn messages(inbox: &Inbox) -> Vec<(Instant, String)> {
    inbox.lock().expect("inbox").clone()
}

/// Index of the first datagram at or after `from` that has the line `line`.
fn find(inbox: &Inbox, from: usize, line: &str) -> Option<usize> {
    messages(inbox)
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, (_, m))| m.lines().any(|l| l == line))
        .map(|(i, _)| i)
}

fn pings(inbox: &Inbox) -> Vec<Instant> {
    messages(inbox)
        .into_iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| t)
        .collect()
}

fn transcript(inbox: &Inbox, log: &Path) -> String {
    let msgs = messages(inbox);
    let t0 = msgs.first().map(|(t, _)| *t);
    let mut s = String::from("notifications:\n");
    for (t, m) in &msgs {
        let at = t0.map_or(0.0, |t0| t.duration_since(t0).as_secs_f64());
        s.push_str(&format!(
            "  {at:7.3}s {}\n",
            m.trim_end().replace('\n', " | ")
        ));
    }
    s.push_str("daemon log:\n");
    s.push_str(&std::fs::read_to_string(log).unwrap_or_default());
    s
}

#[test]
fn notifies_systemd_and_stops_pinging_when_the_reconciler_is_wedged() {
    if !require_root("notifies_systemd_and_stops_pinging_when_the_reconciler_is_wedged") {
        return;
    }
    let mut lab = Lab::new("ntfy");
    let ns = lab.ns("gw");
    let peer = lab.ns("lan");
    lab.veth(&ns, "eth1", &peer, "eth0");
    lab.exec(&ns, ["ip", "addr", "add", "192.0.2.1/24", "dev", "eth1"]);
    lab.exec(&ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

    let dir = tempfile::tempdir().expect("temp dir");
    let flag = dir.path().join("wedge");
    let bin = wedgeable_nft(dir.path(), &flag);
    let cfg = dir.path().join("egressd.toml");
    std::fs::write(&cfg, config(dir.path())).expect("config");
    let sock = dir.path().join("notify.sock");
    let inbox = listen(&sock);
    let log = dir.path().join("egressd.log");
    let out = std::fs::File::create(&log).expect("log");
    let err = out.try_clone().expect("log");

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = common::tools::cmd("ip");
    cmd.args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_egressd"), "run"])
        .arg("--config")
        .arg(&cfg)
        .env("PATH", path)
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env("RUST_LOG", "info,openraft=warn")
        .stdout(out)
        .stderr(err)
        .stdin(Stdio::null());
    let child = lab.spawn_raw(cmd);
    let started = Instant::now();
    let show = |inbox: &Inbox| transcript(inbox, &log);

    // READY=1 once joined and converged, carrying the status line; nothing but STATUS,
    // WATCHDOG and start-timeout extensions before it.
    wait_for("READY=1", Duration::from_secs(20), || {
        find(&inbox, 0, "READY=1").is_some()
    });
    let ready = find(&inbox, 0, "READY=1").unwrap_or_default();
    let msgs = messages(&inbox);
    for (_, m) in &msgs[..ready] {
        for l in m.lines() {
            assert!(
                l.starts_with("STATUS=")
                    || l == "WATCHDOG=1"
                    || l.starts_with("EXTEND_TIMEOUT_USEC="),
                "unexpected {l:?} before READY=1\n{}",
                show(&inbox)
            );
        }
    }
    assert!(
        msgs[ready].1.contains("STATUS=") && msgs[ready].1.contains("leader gw1, term"),
        "READY=1 comes with the status line naming the leader\n{}",
        show(&inbox)
    );
    println!(
        "READY=1 {:.0} ms after start",
        msgs[ready].0.duration_since(started).as_secs_f64() * 1e3
    );

    // The role change reaches STATUS= (once the grant arrives, the node holds the VIP).
    wait_for(
        "STATUS= active for the gateway",
        Duration::from_secs(10),
        || {
            messages(&inbox).iter().any(|(_, m)| {
                m.lines()
                    .any(|l| l.starts_with("STATUS=active for 1 of 1 (vip), leader gw1"))
            })
        },
    );
    let statuses = messages(&inbox)
        .iter()
        .filter(|(_, m)| m.contains("STATUS="))
        .count();

    // Healthy: pings at least every quarter-ish of the interval, never a gap systemd would
    // punish.
    std::thread::sleep(Duration::from_secs(3));
    let p = pings(&inbox);
    let recent: Vec<_> = p
        .iter()
        .filter(|t| t.elapsed() < Duration::from_secs(3))
        .collect();
    assert!(
        recent.len() >= 4,
        "expected watchdog pings every ~{:?}, got {} in 3 s\n{}",
        WATCHDOG / 4,
        recent.len(),
        show(&inbox)
    );
    let max_gap = p.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(
        max_gap < WATCHDOG,
        "a ping gap of {max_gap:?} would have made systemd kill a healthy daemon\n{}",
        show(&inbox)
    );
    // STATUS= is sent on changes, not every round (about 60 rounds have passed by now).
    let statuses_now = messages(&inbox)
        .iter()
        .filter(|(_, m)| m.contains("STATUS="))
        .count();
    assert_eq!(
        statuses,
        statuses_now,
        "STATUS= repeated without a role change\n{}",
        show(&inbox)
    );

    // Wedge the reconciler: the fence table is gone, and rebuilding it runs nft, which hangs.
    std::fs::write(&flag, "").expect("flag");
    lab.exec(
        &ns,
        [
            real_nft().to_str().expect("path"),
            "delete",
            "table",
            "arp",
            "egressd",
        ],
    );
    let wedged = Instant::now();
    std::thread::sleep(WATCHDOG + WATCHDOG / 2);
    let last = pings(&inbox).last().copied().unwrap_or(wedged);
    // Stale after half the interval, noticed at the next tick (a quarter).
    assert!(
        last < wedged + WATCHDOG / 2 + WATCHDOG / 4 + Duration::from_millis(300),
        "watchdog pings went on {:?} after the reconciler was wedged\n{}",
        last.saturating_duration_since(wedged),
        show(&inbox)
    );
    assert!(
        lab.child(child).try_wait().ok().flatten().is_none(),
        "the daemon must still run (hung, not dead)\n{}",
        show(&inbox)
    );
    let blocked = wedged.elapsed();
    std::fs::remove_file(&flag).expect("unwedge");
    let unwedged = Instant::now();
    wait_for("pings resume after the wedge", WATCHDOG * 2, || {
        pings(&inbox).last().is_some_and(|t| *t > unwedged)
    });
    println!(
        "wedged for {blocked:?}: last ping {:?} after the wedge",
        last.saturating_duration_since(wedged)
    );

    // Reload: RELOADING=1 (with MONOTONIC_USEC) then READY=1.
    let before = messages(&inbox).len();
    signal(lab.child(child), "HUP");
    wait_for("RELOADING=1", Duration::from_secs(5), || {
        find(&inbox, before, "RELOADING=1").is_some()
    });
    let reloading = find(&inbox, before, "RELOADING=1").unwrap_or_default();
    assert!(
        messages(&inbox)[reloading]
            .1
            .lines()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC\n{}",
        show(&inbox)
    );
    wait_for("READY=1 after the reload", Duration::from_secs(5), || {
        find(&inbox, reloading, "READY=1").is_some()
    });

    // Stop: STOPPING=1, then a clean exit; nothing claims readiness afterwards.
    let before = messages(&inbox).len();
    signal(lab.child(child), "TERM");
    wait_for("STOPPING=1", Duration::from_secs(5), || {
        find(&inbox, before, "STOPPING=1").is_some()
    });
    let stopping = find(&inbox, before, "STOPPING=1").unwrap_or_default();
    let mut code = None;
    wait_for("the daemon exits", Duration::from_secs(10), || {
        code = lab.child(child).try_wait().ok().flatten();
        code.is_some()
    });
    assert!(
        code.is_some_and(|c| c.success()),
        "clean exit after SIGTERM, got {code:?}\n{}",
        show(&inbox)
    );
    assert!(
        find(&inbox, stopping, "READY=1").is_none(),
        "READY=1 after STOPPING=1\n{}",
        show(&inbox)
    );
    println!("{}", show(&inbox));
}
