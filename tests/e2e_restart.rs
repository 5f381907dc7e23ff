//! A restart takes an edited config file, and only an edited one (issue 15): real daemons in
//! network namespaces. Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.
//!
//! - one node: VirtualIPAddress gateway, SIGTERM, the file edited to
//!   PrimaryIPFromEgressGatewayNodeInterface mode, start again: the server sees the primary
//!   address (and the time from the start to the edited object in the kernel, measured);
//! - a restart with an unchanged file after `egressd apply` keeps the applied object;
//! - three nodes: a node restarted with its unchanged old file changes nothing, while another
//!   node's edited-and-restarted file is applied;
//! - an edited file whose gateways or policies break a rule (its other sections valid) starts the
//!   node with the committed objects and reports every error in the log and in `status`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, GW, WAIT, admin_token};
use common::netns::require_root;
use common::topo::*;

const VIP_MODE: &str = r#"mode = "VirtualIPAddress"
virtual_ip_address = { ip = "203.0.113.50", interfaces = ["eth1"] }"#;
const PRIMARY_MODE: &str = r#"mode = "PrimaryIPFromEgressGatewayNodeInterface"
primary_ip_from_egress_gateway_node_interface = { interface_name = "eth1" }"#;

/// The daemon's log lines of the start-up commit (see `daemon::Started`).
const APPLIED_AT_START: &str = "changed since this node last applied them";
const UNCHANGED_AT_START: &str = "are those this node last applied";
const DRIFT_AT_START: &str = "config drift after start";

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Node `i`'s config file with `from` replaced by `to` (which must be there).
fn edit(c: &Cluster, i: usize, from: &str, to: &str) {
    let path = &c.configs[i];
    let body = std::fs::read_to_string(path).expect("config");
    assert!(
        body.contains(from),
        "{from:?} not in {}:\n{body}",
        path.display()
    );
    std::fs::write(path, body.replace(from, to)).expect("config");
}

/// SIGTERM to `node`, and waits until it has exited (cleanly).
fn stop(c: &mut Cluster, node: &str) {
    let i = c.index(node);
    let child = c.children[i].take().expect("running");
    signal(c.topo.lab.child(child), "TERM");
    let status = c.topo.lab.child(child).wait().expect("wait for egressd");
    assert!(status.success(), "{node} exit: {status}\n{}", c.topo.log(i));
}

/// Starts `node` again with its config file.
fn start(c: &mut Cluster, node: &str) {
    let i = c.index(node);
    let cfg = c.configs[i].clone();
    c.children[i] = Some(c.topo.start_egressd(i, &cfg));
}

/// Waits until `node`'s log holds `count` lines containing `what`.
fn wait_log(c: &Cluster, node: &str, what: &str, count: usize) {
    let i = c.index(node);
    let start = Instant::now();
    while c.topo.log(i).matches(what).count() < count {
        if start.elapsed() > WAIT {
            panic!(
                "timed out waiting for {count} log lines of {node} with {what:?}\n{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The committed names of `kind` (gateways or policies) as node `i` serves them.
fn names(c: &Cluster, i: usize, kind: &str) -> Vec<String> {
    let out = c.topo.cli(i, &["get", kind, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["object"]["name"].as_str().map(String::from))
        .collect()
}

/// Node `i`'s status strings at `config.<field>`.
fn config_list(c: &Cluster, i: usize, field: &str) -> Vec<String> {
    let s = c.topo.status(i).expect("status");
    s["config"][field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(String::from))
        .collect()
}

/// Restarts gw1 with its file switched from one source-IP mode to the other and returns the
/// time from the start to the edited gateway in the kernel: its nftables chain SNATs to the new
/// address (and, for the VIP, the VIP is on eth1).
fn restart_into(c: &mut Cluster, from: &str, to: &str, expect: &str) -> Duration {
    let gw = c.topo.nodes[0].clone();
    stop(c, "gw1");
    edit(c, 0, from, to);
    let t = Instant::now();
    start(c, "gw1");
    while !(c.topo.gateway_snat(&gw, GW).as_deref() == Some(expect)
        && (expect != VIP || c.topo.holds(&gw, "eth1", VIP)))
    {
        if t.elapsed() > WAIT {
            panic!(
                "timed out: the edited gateway ({expect}) not in the kernel after the restart; \
                 its chain SNATs to {:?}\n{}",
                c.topo.gateway_snat(&gw, GW),
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

#[test]
fn an_edited_file_takes_effect_on_restart() {
    if !require_root("an_edited_file_takes_effect_on_restart") {
        return;
    }
    let mut c = Cluster::start("rsedit", 1);
    let gw = c.topo.nodes[0].clone();
    let primary = node_wan_ip(0);
    c.assert_traffic_via_vip();

    // The issue's scenario: stop, edit to the primary-address mode, start.
    let took = restart_into(&mut c, VIP_MODE, PRIMARY_MODE, &primary);
    let mut seen = None;
    wait_for("the server to see the primary address", WAIT, || {
        seen = c.topo.seen_source(CLIENT_IP, SERVER_IP);
        seen.as_deref() == Some(primary.as_str())
    });
    assert!(!c.topo.holds(&gw, "eth1", VIP), "the VIP is held again");
    wait_log(&c, "gw1", APPLIED_AT_START, 1);
    assert!(config_list(&c, 0, "drift").is_empty(), "{}", c.logs());
    let log = c.topo.log(0);
    assert!(!log.contains(DRIFT_AT_START), "{log}");

    // Timing: back and forth a few more times.
    let mut runs = vec![(took, "VIP -> primary")];
    for k in 0..4 {
        let (from, to, expect, what) = if k % 2 == 0 {
            (PRIMARY_MODE, VIP_MODE, VIP, "primary -> VIP")
        } else {
            (VIP_MODE, PRIMARY_MODE, primary.as_str(), "VIP -> primary")
        };
        runs.push((restart_into(&mut c, from, to, expect), what));
    }
    // The last run went to the primary address, end to end too.
    wait_for("the server to see the primary address again", WAIT, || {
        c.topo.seen_source(CLIENT_IP, SERVER_IP).as_deref() == Some(primary.as_str())
    });
    let mut ms: Vec<f64> = runs.iter().map(|(d, _)| d.as_secs_f64() * 1e3).collect();
    for (d, what) in &runs {
        println!(
            "restart with an edited file ({what}): start to the edited gateway in the kernel {:.0} ms",
            d.as_secs_f64() * 1e3
        );
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "restart with an edited file: median {:.0} ms over {} runs (min {:.0}, max {:.0})",
        ms[ms.len() / 2],
        ms.len(),
        ms[0],
        ms[ms.len() - 1]
    );
}

#[test]
fn a_restart_with_an_unchanged_file_keeps_an_applied_object() {
    if !require_root("a_restart_with_an_unchanged_file_keeps_an_applied_object") {
        return;
    }
    let (token_file, extra) = admin_token("restart-test-admin-token-0123456789");
    let tok = token_file.path().display().to_string();
    let mut c = Cluster::start_with("rsapply", 1, &extra);
    let primary = node_wan_ip(0);
    c.assert_traffic_via_vip();

    // At runtime: the file's gateway replaced by an applied one in the primary-address mode.
    let apply = c.topo.dir.path().join("apply.toml");
    std::fs::write(
        &apply,
        format!(
            "[[gateway]]\nname = \"{GW}\"\nnode_selector = {{ egress = \"\" }}\n\
             [gateway.source_ip]\n{PRIMARY_MODE}\n\
             [gateway.next_hop]\nip = \"{NEXT_HOP}\"\ninterface = \"eth0\"\n"
        ),
    )
    .expect("apply file");
    let out = c.topo.cli(
        0,
        &[
            "apply",
            "-f",
            &apply.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the applied gateway in use", WAIT, || {
        c.topo.seen_source(CLIENT_IP, SERVER_IP).as_deref() == Some(primary.as_str())
    });

    // The same file again: nothing is committed, the applied gateway stays.
    let index_before = c.topo.status(0).expect("status")["cluster"]["applied_index"].clone();
    stop(&mut c, "gw1");
    start(&mut c, "gw1");
    wait_log(&c, "gw1", UNCHANGED_AT_START, 1);
    wait_log(&c, "gw1", DRIFT_AT_START, 1);
    c.wait_active("gw1");
    assert_eq!(
        c.topo.seen_source(CLIENT_IP, SERVER_IP).as_deref(),
        Some(primary.as_str()),
        "a restart with an unchanged file undid `apply`\n{}",
        c.logs()
    );
    assert!(!c.topo.holds(&c.topo.nodes[0], "eth1", VIP));
    let drift = config_list(&c, 0, "drift");
    assert_eq!(
        drift,
        [format!(
            "gateway {GW}: the file's definition is overridden by `apply`"
        )],
        "{}",
        c.logs()
    );
    // Only the start's own entries were committed (members, no objects).
    let s = c.topo.status(0).expect("status");
    let (before, after) = (
        index_before.as_u64().expect("index"),
        s["cluster"]["applied_index"].as_u64().expect("index"),
    );
    let out = c.topo.cli(0, &["status", "--events"]);
    let events = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !events.contains("configuration file reloaded"),
        "a restart with an unchanged file committed objects ({before} -> {after})\n{events}"
    );
    let out = c.topo.cli(0, &["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CONFIG DRIFT: gateway vip"),
        "{}",
        text(&out)
    );
}

#[test]
fn three_nodes_an_old_file_changes_nothing_and_an_edited_one_applies() {
    if !require_root("three_nodes_an_old_file_changes_nothing_and_an_edited_one_applies") {
        return;
    }
    let mut c = Cluster::start("rs3", 3);
    c.assert_traffic_via_vip();
    assert_eq!(
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(CLIENT_OTHER_IP),
        "no policy for the other client yet"
    );

    // gw3's file gets a second policy: for the other client, through the same gateway.
    stop(&mut c, "gw3");
    let extra = format!(
        "\n[[policy]]\nname = \"other\"\negress_gateway_name = \"{GW}\"\n\
         source_cidrs = [\"{CLIENT_OTHER_IP}/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n"
    );
    let body = std::fs::read_to_string(&c.configs[2]).expect("config") + &extra;
    std::fs::write(&c.configs[2], body).expect("config");
    start(&mut c, "gw3");
    wait_log(&c, "gw3", APPLIED_AT_START, 1);
    wait_for("the other client's traffic SNATed to the VIP", WAIT, || {
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() == Some(VIP)
    });
    for i in 0..3 {
        assert_eq!(names(&c, i, "policies"), ["other", "to-wan"], "node {i}");
    }
    assert!(config_list(&c, 2, "drift").is_empty(), "{}", c.logs());
    // The other nodes' files lack it: drift, not a fight.
    let lacking = "policy other: committed from a file, not in this node's file".to_string();
    wait_for("drift on gw2", WAIT, || {
        config_list(&c, 1, "drift") == [lacking.clone()]
    });

    // gw2 restarts with its old, unchanged file: nothing changes, and it says so loudly.
    stop(&mut c, "gw2");
    start(&mut c, "gw2");
    wait_log(&c, "gw2", UNCHANGED_AT_START, 1);
    wait_log(&c, "gw2", DRIFT_AT_START, 1);
    assert!(
        c.topo.log(1).contains(&lacking),
        "the drift is in the log\n{}",
        c.topo.log(1)
    );
    // Give a wrong commit time to show.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        assert_eq!(names(&c, i, "policies"), ["other", "to-wan"], "node {i}");
    }
    assert_eq!(config_list(&c, 1, "drift"), [lacking]);
    assert_eq!(
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(VIP),
        "{}",
        c.logs()
    );
    c.assert_traffic_via_vip();
}

#[test]
fn broken_objects_start_the_node_with_the_committed_ones() {
    if !require_root("broken_objects_start_the_node_with_the_committed_ones") {
        return;
    }
    let mut c = Cluster::start("rsbad", 1);
    let primary = node_wan_ip(0);
    c.assert_traffic_via_vip();

    // The edit: a valid change of mode, plus two policies that break rules.
    stop(&mut c, "gw1");
    edit(&c, 0, VIP_MODE, PRIMARY_MODE);
    let broken = "\n[[policy]]\nname = \"missing-gw\"\negress_gateway_name = \"nowhere\"\n\
                  source_cidrs = [\"10.77.0.0/24\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n\
                  \n[[policy]]\nname = \"bad-cidr\"\negress_gateway_name = \"vip\"\n\
                  source_cidrs = [\"10.77.0.0/33\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n";
    let body = std::fs::read_to_string(&c.configs[0]).expect("config") + broken;
    std::fs::write(&c.configs[0], body).expect("config");
    let check = c.topo.lab.try_exec(
        &c.topo.nodes[0],
        [
            env!("CARGO_BIN_EXE_egressd"),
            "check-config",
            "--config",
            &c.configs[0].display().to_string(),
        ],
    );
    assert!(!check.status.success(), "{}", text(&check));
    let errors: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .filter(|l| l.contains(": policy"))
        .map(String::from)
        .collect();
    assert_eq!(errors.len(), 2, "{}", text(&check));

    // It starts, runs the committed gateway (the VIP), and reports every error.
    start(&mut c, "gw1");
    c.wait_active("gw1");
    c.assert_traffic_via_vip();
    wait_log(&c, "gw1", "break a rule", 1);
    let log = c.topo.log(0);
    for e in &errors {
        assert!(log.contains(e.as_str()), "{e:?} not in the log\n{log}");
    }
    let reported = config_list(&c, 0, "last_reload_errors");
    assert_eq!(reported, errors, "{}", c.logs());
    let out = c.topo.cli(0, &["status"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    for e in &errors {
        assert!(shown.contains(e.as_str()), "{e:?} not in status\n{shown}");
    }
    let out = c.topo.cli(0, &["status", "--events"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rejected at start (2 errors)"),
        "{}",
        text(&out)
    );
    assert!(config_list(&c, 0, "drift").is_empty());

    // Fixed and reloaded: the edit is committed, the errors go.
    let body = std::fs::read_to_string(&c.configs[0]).expect("config");
    std::fs::write(&c.configs[0], body.replace(broken, "")).expect("config");
    let child = c.children[0].expect("running");
    signal(c.topo.lab.child(child), "HUP");
    wait_for("the server to see the primary address", WAIT, || {
        c.topo.seen_source(CLIENT_IP, SERVER_IP).as_deref() == Some(primary.as_str())
    });
    assert!(config_list(&c, 0, "last_reload_errors").is_empty());
}
