//! Benchmark at size (root only; `cargo bench --bench scale`): three real daemons in network
//! namespaces whose files hold 1, 10 000 or 100 000 policies, in two shapes:
//! - `sources`: that many policies, each selecting one /32 source to everywhere (an allow-list
//!   of client hosts);
//! - `destinations`: one policy from the client LAN to that many /24 destinations, none
//!   adjacent (an allow-list of cloud ranges).
//!
//! Per size and shape, on one cluster: start of the three daemons → the VIP held by gw1, and
//! whether it then stays put for 5 s (same holder, same term); resident memory and idle CPU of
//! each daemon (10 s); a one-policy `egressd apply` (and `delete`) through the leader's CLI →
//! the SNAT map updated on the active node (log timestamps on the same clock), and in the
//! `destinations` shape one destination of the big policy added and removed, by `apply` of the
//! whole policy and by `egressd policy add-cidrs`/`remove-cidrs`; failovers with
//! the active node a follower and the leader (kill -9, links cut) and a planned handover
//! (cordon), measured as in `benches/failover.rs` (failure → the successor's first gratuitous
//! ARP; the client's ping outage; ARP probes answered twice); and how many failovers nobody
//! caused. Prints markdown tables of medians and maxima.
//!
//! Options: `--sizes 1,10000,100000`, `--shapes sources,destinations`, `--trials N` (per
//! failover scenario, default 3), `--rounds N` (applies, default 10), `--idle SECS` (the idle
//! measurement, default 10; longer to profile the daemons at rest, their pids printed),
//! `--busy N` (N busy loops beside the daemons for the whole run: a loaded host), `--pause MS`
//! (a wait before each change, so that no node still works on the previous one). With
//! `EGRESSD_BENCH_LOGS=DIR` the daemons' logs are kept in `DIR/<shape>-<size>/`; with
//! `EGRESSD_BIN=PATH` the daemons are that binary (a release build: see `common::topo::egressd_bin`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::*;
use common::cluster::*;
use common::topo::*;

const TOKEN: &str = "bench-admin-token-0123456789";
/// A start or a recovery with 100 000 policies takes a while; this is the limit, not a target.
const LONG: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Sources,
    Destinations,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Sources => "sources",
            Shape::Destinations => "destinations",
        }
    }

    fn objects(self, n: usize) -> String {
        match self {
            Shape::Sources => many_sources(n),
            Shape::Destinations => many_destinations(n),
        }
    }

    /// A one-policy, one-CIDR change in the style of the shape.
    fn one_policy(self, round: usize) -> String {
        let (src, dst) = match self {
            Shape::Sources => (
                format!("10.200.{}.{}/32", round / 256, round % 256),
                "0.0.0.0/0".to_string(),
            ),
            Shape::Destinations => (LAN_NET.to_string(), format!("198.51.{}.0/24", round % 256)),
        };
        format!(
            "[[policy]]\nname = \"bench-{round}\"\negress_gateway_name = \"{GW}\"\n\
             source_cidrs = [\"{src}\"]\ndestination_cidrs = [\"{dst}\"]\n"
        )
    }
}

#[derive(Default)]
struct Row {
    start_s: f64,
    stable: bool,
    rss_mib: Vec<f64>,
    cpu_pct: Vec<f64>,
    apply_ms: (f64, f64),
    delete_ms: (f64, f64),
    big_apply_ms: Option<(f64, f64)>,
    /// One destination added to (and removed from) the big policy by `egressd policy
    /// add-cidrs` (`remove-cidrs`): only the change through Raft.
    edit_ms: Option<((f64, f64), (f64, f64))>,
    failovers: Vec<(&'static str, Vec<Trial>)>,
    unexplained_failovers: usize,
}

fn term(c: &Cluster, i: usize) -> Option<u64> {
    c.topo.status(i)?["cluster"]["term"].as_u64()
}

fn failover_lines(c: &Cluster) -> usize {
    (0..c.n)
        .map(|i| {
            c.topo
                .log(i)
                .lines()
                .filter(|l| l.contains("assignment change") && l.contains("kind=Failover"))
                .count()
        })
        .sum()
}

fn pid(c: &mut Cluster, i: usize) -> Option<u32> {
    let idx = c.children[i]?;
    Some(c.topo.lab.child(idx).id())
}

/// Restarts node `i`'s daemon (after a kill) and waits until it is back in the cluster with its
/// data plane in place. At 100 000 policies a starting node is busy for seconds and answers
/// votes late (see the README's known limits): a failure injected before that would measure
/// the start, and the leader arrangement could only ever elect the starting node.
fn restart(c: &mut Cluster, i: usize) {
    let cfg = c.configs[i].clone();
    c.children[i] = Some(c.topo.start_egressd(i, &cfg));
    wait_for(
        "the restarted node back in the cluster and ready",
        LONG,
        || {
            c.topo.leader(i).is_some()
                && c.topo.status(i).is_some_and(|s| {
                    s["ready"] == true && s["dataplane"]["snat_elements"].as_u64().unwrap_or(0) > 0
                })
        },
    );
    std::thread::sleep(Duration::from_secs(1));
}

/// Makes gw1 the Raft leader (`true`) or a follower (`false`); returns how many failovers
/// that caused (a restart of gw1, the active node).
///
/// A follower is made by killing and restarting gw1 while it leads. A leader is made by pausing
/// the other follower (SIGSTOP) while the leader is killed: gw1 alone campaigns, without a
/// quorum, until its term is the highest, and the resumed node votes for it. Killing leaders
/// until gw1 wins also works since the campaign watch (src/cluster/campaign.rs; before it,
/// gw1 never won), but at 100 000 policies each cycle restarts a node for seconds, and a node
/// that is starting answers votes late, so the starting node would win.
fn arrange_leader(c: &mut Cluster, gw1_leads: bool) -> usize {
    let mut caused = 0;
    for _ in 0..10 {
        let l = c.leader();
        if (l == "gw1") == gw1_leads {
            return caused;
        }
        let i = c.index(&l);
        if l == "gw1" {
            caused += 1;
            c.signal(&l, "KILL");
        } else {
            let other = if l == "gw2" { "gw3" } else { "gw2" };
            c.signal(other, "STOP");
            c.signal(&l, "KILL");
            let t0 = term(c, 0).unwrap_or(0);
            wait_for("gw1 campaigning alone", LONG, || {
                term(c, 0).is_some_and(|t| t > t0 + 2)
            });
            c.signal(other, "CONT");
        }
        wait_for("a new leader", LONG, || {
            c.live().any(|j| c.topo.leader(j).is_some_and(|x| x != l))
        });
        restart(c, i);
    }
    keep_logs(c, "arrange-failed");
    panic!("could not arrange the leadership");
}

/// One `egressd apply -f` (or `delete`) through the leader's CLI → the next "SNAT map updated"
/// on the active node, in ms (from before the CLI starts to the log line's timestamp).
fn change_to_live(c: &Cluster, token: &std::path::Path, args: &[&str]) -> f64 {
    // `--pause MS`: the three nodes share two cores here, and the bench waits only for the
    // active node; a pause lets the other two finish the previous change first.
    let pause = arg("--pause").and_then(|s| s.parse().ok()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(pause));
    let li = c.index(&c.leader());
    let seen = c.topo.log(0).matches("SNAT map updated").count();
    let t0 = day_time(unix_now());
    let out = cli_with_token(c, li, args, token);
    if !out.status.success() {
        keep_logs(c, "failed");
        panic!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for("the change live on the active node", LONG, || {
        c.topo.log(0).matches("SNAT map updated").count() > seen
    });
    let log = c.topo.log(0);
    let line = log
        .lines()
        .filter(|l| l.contains("SNAT map updated"))
        .nth(seen)
        .unwrap_or_default();
    // The daemon's own account (plan and total time of the round) goes with the figure.
    eprintln!("  {args:?}: {line}");
    let at = log_time(line).unwrap_or(f64::NAN);
    (at - t0) * 1e3
}

fn run(size: usize, shape: Shape, trials: usize, rounds: usize, idle: u64) -> Row {
    let mut row = Row::default();
    let (token, admin) = admin_token(TOKEN);
    let objects = shape.objects(size);
    let started = Instant::now();
    let mut c = Cluster::launch(
        &format!("sc{}{}", shape.name().chars().next().unwrap_or('x'), size),
        3,
        &admin,
        &objects,
        |_| {},
    );
    c.wait_active_within("gw1", LONG);
    row.start_s = started.elapsed().as_secs_f64();
    let terms: Vec<Option<u64>> = (0..3).map(|i| term(&c, i)).collect();
    let settle = Instant::now();
    row.stable = true;
    while settle.elapsed() < Duration::from_secs(5) {
        let same_terms = (0..3).all(|i| term(&c, i) == terms[i]);
        if !same_terms
            || !c.topo.node_holds(0, GW)
            || c.topo.active(1, GW).as_deref() != Some("gw1")
        {
            row.stable = false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Idle: resident memory and CPU.
    let pids: Vec<u32> = (0..3).filter_map(|i| pid(&mut c, i)).collect();
    eprintln!("idle for {idle} s: daemons gw1..gw3 are pids {pids:?}");
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(idle));
    let secs = t.elapsed().as_secs_f64();
    let hz = ticks_per_second();
    row.cpu_pct = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| (cpu_ticks(*p) - b) as f64 / hz / secs * 100.0)
        .collect();
    row.rss_mib = pids.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();

    // One policy added and deleted through the leader's CLI.
    let (mut adds, mut dels) = (vec![], vec![]);
    for r in 0..rounds {
        let file = c.topo.dir.path().join(format!("one-{r}.toml"));
        std::fs::write(&file, shape.one_policy(r)).expect("apply file");
        let file = file.display().to_string();
        adds.push(change_to_live(&c, token.path(), &["apply", "-f", &file]));
        let name = format!("bench-{r}");
        dels.push(change_to_live(
            &c,
            token.path(),
            &["delete", "policy", &name],
        ));
    }
    row.apply_ms = stats(adds);
    row.delete_ms = stats(dels);
    if shape == Shape::Destinations && size > 1 {
        // One more destination in the big policy: the whole policy goes through `apply`.
        let mut big = vec![];
        for r in 0..rounds.min(3) {
            let body = many_destinations(size).replace(
                "destination_cidrs = [",
                &format!("destination_cidrs = [\"198.18.{r}.0/24\", "),
            );
            let file = c.topo.dir.path().join(format!("big-{r}.toml"));
            std::fs::write(&file, body).expect("apply file");
            let file = file.display().to_string();
            big.push(change_to_live(&c, token.path(), &["apply", "-f", &file]));
        }
        row.big_apply_ms = Some(stats(big));
        let (mut adds, mut removes) = (vec![], vec![]);
        for r in 0..rounds {
            let cidr = format!("198.19.{r}.0/24");
            for (verb, out) in [("add-cidrs", &mut adds), ("remove-cidrs", &mut removes)] {
                let args = ["policy", verb, "cloud", "--destination", &cidr];
                out.push(change_to_live(&c, token.path(), &args));
            }
        }
        row.edit_ms = Some((stats(adds), stats(removes)));
    }

    let induced_before = failover_lines(&c);
    let mut induced = 0;
    let scenarios: [(&'static str, &str, bool); 5] = [
        ("kill -9, active is a follower", "KILL", false),
        ("kill -9, active is the leader", "KILL", true),
        ("links cut, active is a follower", "CUT", false),
        ("links cut, active is the leader", "CUT", true),
        ("cordon (planned handover)", "CORDON", false),
    ];
    for (what, how, leads) in scenarios {
        let mut got = vec![];
        for _ in 0..trials {
            induced += arrange_leader(&mut c, leads);
            c.wait_active_within("gw1", LONG);
            got.push(failover_trial(&mut c, "gw1", how, token.path()));
            match how {
                "KILL" => {
                    induced += 1;
                    restart(&mut c, 0);
                }
                "CUT" => {
                    induced += 1;
                    c.restore_links("gw1");
                }
                _ => {
                    let out = cli_with_token(&c, 1, &["node", "uncordon", "gw1"], token.path());
                    assert!(out.status.success(), "uncordon");
                }
            }
            c.wait_active_within("gw1", LONG);
        }
        row.failovers.push((what, got));
    }
    // Before the trials nothing was caused; during them, each kill or cut of the active node
    // causes one.
    row.unexplained_failovers =
        induced_before + (failover_lines(&c) - induced_before).saturating_sub(induced);
    keep_logs(&c, &format!("{}-{size}", shape.name()));
    row
}

/// The daemons' logs outlive the lab's temporary directory when asked (to explain a figure or
/// a failure), in `$EGRESSD_BENCH_LOGS/<tag>/`.
fn keep_logs(c: &Cluster, tag: &str) {
    let Some(keep) = std::env::var_os("EGRESSD_BENCH_LOGS") else {
        return;
    };
    let keep = std::path::Path::new(&keep).join(tag);
    std::fs::create_dir_all(&keep).expect("log directory");
    for i in 0..3 {
        let to = keep.join(format!("gw{}.log", i + 1));
        std::fs::copy(c.topo.log_path(i), &to).expect("copy a log");
    }
    eprintln!("logs kept in {}", keep.display());
}

/// Processes that keep cores busy for the whole run (`--busy N`): the daemons then start and
/// run on a machine where something else wants the CPU, as on a loaded host.
struct Busy(Vec<std::process::Child>);

impl Busy {
    fn spin(n: usize) -> Busy {
        if n > 0 {
            eprintln!("{n} busy loop(s) run beside the daemons");
        }
        Busy(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.0} ms")
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED benches/scale.rs: needs root for network namespaces");
        return;
    }
    let bin = egressd_bin();
    let bytes = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    eprintln!("daemon: {bin} ({bytes} bytes; EGRESSD_BIN names another)");
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "1,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let shapes: Vec<Shape> = arg("--shapes")
        .unwrap_or_else(|| "sources,destinations".into())
        .split(',')
        .filter_map(|s| match s.trim() {
            "sources" => Some(Shape::Sources),
            "destinations" => Some(Shape::Destinations),
            _ => None,
        })
        .collect();
    let trials: usize = arg("--trials").and_then(|s| s.parse().ok()).unwrap_or(3);
    let rounds: usize = arg("--rounds").and_then(|s| s.parse().ok()).unwrap_or(10);
    let idle: u64 = arg("--idle").and_then(|s| s.parse().ok()).unwrap_or(10);
    let busy: usize = arg("--busy").and_then(|s| s.parse().ok()).unwrap_or(0);
    let _load = Busy::spin(busy);
    let mut rows: Vec<(usize, Shape, Row)> = vec![];
    for &size in &sizes {
        for &shape in &shapes {
            // One policy is one policy, whatever the shape.
            if size <= 1 && shape == Shape::Destinations && shapes.contains(&Shape::Sources) {
                continue;
            }
            eprintln!("--- {size} policies, shape {} ---", shape.name());
            let row = run(size, shape, trials, rounds, idle);
            print_row(size, shape, &row);
            rows.push((size, shape, row));
        }
    }
    println!("\n## Summary ({trials} trials per failover scenario, {rounds} applies)\n");
    println!(
        "| policies | shape | start → VIP held | stable 5 s | RSS per node | idle CPU per node | apply → live: median / max | delete → live | unexplained failovers |"
    );
    println!("| ---: | --- | ---: | --- | --- | --- | ---: | ---: | ---: |");
    for (size, shape, r) in &rows {
        let list = |v: &[f64], unit: &str| {
            v.iter()
                .map(|x| format!("{x:.1}{unit}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| {size} | {} | {:.1} s | {} | {} | {} | {} / {} | {} / {} | {} |",
            shape.name(),
            r.start_s,
            if r.stable { "yes" } else { "NO" },
            list(&r.rss_mib, " MiB"),
            list(&r.cpu_pct, " %"),
            ms(r.apply_ms.0),
            ms(r.apply_ms.1),
            ms(r.delete_ms.0),
            ms(r.delete_ms.1),
            r.unexplained_failovers
        );
    }
    println!(
        "\n| policies | shape | scenario | failover to first GARP: median / max | client outage: median / max | probes answered twice |"
    );
    println!("| ---: | --- | --- | ---: | ---: | ---: |");
    for (size, shape, r) in &rows {
        for (what, trials) in &r.failovers {
            let (fm, fx) = stats(trials.iter().map(|t| t.failover_ms).collect());
            let (om, ox) = stats(trials.iter().map(|t| t.outage_ms).collect());
            let doubles: usize = trials.iter().map(|t| t.doubles).sum();
            println!(
                "| {size} | {} | {what} | {} / {} | {} / {} | {doubles} |",
                shape.name(),
                ms(fm),
                ms(fx),
                ms(om),
                ms(ox)
            );
        }
    }
    for (size, shape, r) in &rows {
        if let Some((m, x)) = r.big_apply_ms {
            println!(
                "\none destination added to the {size}-CIDR policy (the whole policy through `apply`) → live: median {} / max {} ({})",
                ms(m),
                ms(x),
                shape.name()
            );
        }
        if let Some(((am, ax), (rm, rx))) = r.edit_ms {
            println!(
                "one destination added to the {size}-CIDR policy by `egressd policy add-cidrs` → live: median {} / max {}; removed by `remove-cidrs`: {} / {} ({})",
                ms(am),
                ms(ax),
                ms(rm),
                ms(rx),
                shape.name()
            );
        }
    }
}

fn print_row(size: usize, shape: Shape, r: &Row) {
    eprintln!(
        "{size} {}: start {:.1} s, stable {}, RSS {:?} MiB, CPU {:?} %, apply {:?}, delete {:?}, big {:?}, edit {:?}, unexplained failovers {}",
        shape.name(),
        r.start_s,
        r.stable,
        r.rss_mib,
        r.cpu_pct,
        r.apply_ms,
        r.delete_ms,
        r.big_apply_ms,
        r.edit_ms,
        r.unexplained_failovers
    );
    for (what, trials) in &r.failovers {
        let f: Vec<String> = trials
            .iter()
            .map(|t| format!("{:.0}/{:.0}/{}", t.failover_ms, t.outage_ms, t.doubles))
            .collect();
        eprintln!("  {what}: {f:?}");
    }
}
