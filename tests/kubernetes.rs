//! The Kubernetes adapter's commands through the real binary (built with `--features
//! kubernetes`; `cargo test` without it skips this file): `egressd import` prints TOML that
//! `egressd check-config` accepts, reads standard input, refuses bad input printing nothing,
//! and with `--apply` changes a running cluster's data plane; `egressd kubernetes crds` prints
//! the packaged CRDs. The live sync against the test API server of `kube_api/` (which the
//! real `kubectl` checks for fidelity): imported state, a VIP held end to end, pod churn,
//! `kubectl cordon`, status written back, the API server stopped and restarted.

mod common;
mod kube_api;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::netns::require_root;
use common::topo::*;

const EGRESSD: &str = env!("CARGO_BIN_EXE_egressd");

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deckhouse")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `egressd ARGS` with `stdin` on its standard input.
fn egressd(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(EGRESSD)
        .args(args)
        // No configuration of this machine's own is read by import or check-config here.
        .env_remove("EGRESSD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("egressd runs");
    if let Some(mut input) = child.stdin.take()
        && let Err(e) = std::io::Write::write_all(&mut input, stdin.as_bytes())
    {
        // A command that reads a file, or refuses its arguments, may exit before reading its
        // standard input.
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "stdin: {e}");
    }
    child.wait_with_output().expect("egressd ends")
}

/// The Deckhouse documentation's examples, imported from a file, pass `check-config`.
#[test]
fn documentation_examples_import_and_pass_check_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = fixture("egressgatewaypolicy.yaml");
    for gateway in ["egressgateway-primary.yaml", "egressgateway-vip.yaml"] {
        let input = dir.path().join("in.yaml");
        std::fs::write(&input, format!("{}---\n{policy}", fixture(gateway))).expect("input");
        let out = egressd(
            &[
                "import",
                "-f",
                &input.display().to_string(),
                "--sources",
                "my-egressgw-policy=10.77.0.0/24,10.78.0.0/24",
            ],
            "",
        );
        assert!(out.status.success(), "{gateway}: {}", text(&out));
        let toml = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            toml.contains("[[gateway]]") && toml.contains("[[policy]]"),
            "{toml}"
        );
        assert!(
            toml.contains("selects app=backend,io.kubernetes.pod.namespace=my-ns"),
            "{toml}"
        );
        let config = dir.path().join("egressd.toml");
        std::fs::write(&config, &toml).expect("config");
        let check = egressd(
            &["check-config", "--config", &config.display().to_string()],
            "",
        );
        assert!(
            check.status.success(),
            "{gateway}: {}\n{toml}",
            text(&check)
        );
        assert!(
            String::from_utf8_lossy(&check.stdout).contains("ok (1 gateways, 1 policies"),
            "{}",
            text(&check)
        );
    }
}

/// `-f -` reads standard input: here a `kubectl get -o yaml` list, sources from annotations.
#[test]
fn import_from_standard_input() {
    let input = r#"
apiVersion: v1
kind: List
items:
- apiVersion: network.deckhouse.io/v1alpha1
  kind: EgressGateway
  metadata: {name: gw, resourceVersion: "42"}
  spec:
    nodeSelector: {node-role.deckhouse.io/egress: ""}
    sourceIP:
      mode: VirtualIPAddress
      virtualIPAddress: {ip: 198.18.0.50, interfaces: [eth1], routingTableName: external}
  status: {activeNodeName: gw1, readyNodes: 2}
- apiVersion: network.deckhouse.io/v1alpha1
  kind: EgressGatewayPolicy
  metadata:
    name: pol
    annotations: {egressd.io/source-cidrs: "10.77.0.0/24"}
  spec:
    egressGatewayName: gw
    destinationCIDRs: [0.0.0.0/0]
    excludedCIDRs: [192.168.0.0/16]
"#;
    let out = egressd(&["import", "-f", "-"], input);
    assert!(out.status.success(), "{}", text(&out));
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(
        toml.contains("from <stdin>: 1 gateway(s), 1 policy(s)"),
        "{toml}"
    );
    assert!(
        toml.contains("excluded_cidrs = [\"192.168.0.0/16\"]"),
        "{toml}"
    );
    assert!(toml.contains("sources from the annotation"), "{toml}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "warning: <stdin>: EgressGateway \"gw\" (document 1, items[0]): \
             spec.sourceIP.virtualIPAddress.routingTableName: not an egressd setting; ignored"
        ),
        "{}",
        text(&out)
    );
}

/// Bad input: exit 1, every problem on standard error naming the resource, nothing printed.
#[test]
fn bad_input_prints_nothing() {
    let input = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: gw}
spec:
  sourceIP: {mode: VirtualIPAddress, virtualIPAddress: {ip: 198.18.0.500, interfaces: [eth1]}}
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: unmapped-a}
spec: {egressGatewayName: gw, destinationCIDRs: [0.0.0.0/0]}
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: unmapped-b}
spec: {egressGatewayName: gw, destinationCIDRs: [0.0.0.0/0]}
"#;
    let out = egressd(&["import", "-f", "-"], input);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(out.stdout.is_empty(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "<stdin>: EgressGateway \"gw\": spec.sourceIP.virtualIPAddress.ip:",
        "2 EgressGatewayPolicy(s) without sources: \"unmapped-a\", \"unmapped-b\"",
        "<stdin>: 2 error(s), nothing printed",
    ] {
        assert!(err.contains(expected), "no {expected:?} in:\n{err}");
    }
    let out = egressd(&["import", "-f", "-", "--sources", "oops"], input);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected NAME=CIDR"),
        "{}",
        text(&out)
    );
}

#[test]
fn crds_command_prints_the_packaged_file() {
    let out = egressd(&["kubernetes", "crds"], "");
    assert!(out.status.success(), "{}", text(&out));
    let packaged = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kubernetes/crds.yaml"),
    )
    .expect("packaged CRDs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), packaged);
}

/// `--apply` through the admin API of a running node: the imported policy is committed and its
/// traffic leaves through the gateway's VIP; a policy naming a gateway the cluster lacks is
/// refused by the cluster with its reason.
#[test]
fn import_apply_reaches_the_data_plane() {
    if !require_root("import_apply_reaches_the_data_plane") {
        return;
    }
    const TOKEN: &str = "k8s-import-token-0123456789";
    let (token, extra) = admin_token(TOKEN);
    let c = Cluster::start_with("k8s", 1, &extra);
    let tok = token.path().display().to_string();
    assert_eq!(
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(CLIENT_OTHER_IP),
        "not SNATed before the import"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("policy.yaml");
    std::fs::write(
        &input,
        format!(
            r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {{name: imported}}
spec:
  egressGatewayName: {GW}
  destinationCIDRs: ["{SERVER_IP}/32"]
  selectors:
  - podSelector: {{matchLabels: {{app: other}}}}
"#
        ),
    )
    .expect("input");
    let file = input.display().to_string();
    let sources = format!("imported={CLIENT_OTHER_IP}/32");
    let out = c.topo.cli(
        0,
        &[
            "import",
            "-f",
            &file,
            "--sources",
            &sources,
            "--apply",
            "--token-file",
            &tok,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("policy/imported: applied"),
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + WAIT;
    while c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() != Some(VIP) {
        assert!(
            Instant::now() < deadline,
            "the imported policy's traffic never left through the VIP\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The Deckhouse example names my-egressgw, which this cluster does not have.
    let example = dir.path().join("example.yaml");
    std::fs::write(&example, fixture("egressgatewaypolicy.yaml")).expect("example");
    let out = c.topo.cli(
        0,
        &[
            "import",
            "-f",
            &example.display().to_string(),
            "--sources",
            "my-egressgw-policy=10.77.0.0/24",
            "--apply",
            "--token-file",
            &tok,
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("409") && err.contains("names gateway my-egressgw"),
        "{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// The live sync, against the test API server
// ---------------------------------------------------------------------------------------------

use kube_api::{Kind, KubeApi};
use serde_json::{Value, json};

fn yaml_fixture(name: &str) -> Value {
    serde_saphyr::from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The Deckhouse documentation's three examples: the VirtualIPAddress gateway and the policy as
/// they are, the PrimaryIP gateway renamed (both examples are named `my-egressgw`, and one
/// cluster cannot hold two objects of one name).
fn deckhouse_examples() -> Vec<Value> {
    let mut primary = yaml_fixture("egressgateway-primary.yaml");
    primary["metadata"]["name"] = json!("my-egressgw-primary");
    vec![
        yaml_fixture("egressgateway-vip.yaml"),
        primary,
        yaml_fixture("egressgatewaypolicy.yaml"),
    ]
}

/// `kubectl ARGS` against `api` (its own cache directory: nothing of this machine's).
fn kubectl(api: &KubeApi, dir: &Path, args: &[&str]) -> Output {
    let config = dir.join("kubeconfig");
    std::fs::write(&config, api.kubeconfig()).expect("kubeconfig");
    common::tools::cmd("kubectl")
        .arg("--kubeconfig")
        .arg(&config)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(args)
        .env("HOME", dir)
        .output()
        .expect("kubectl runs")
}

/// The real `kubectl` reads the test API server: discovery, `get` with the CRDs' printer
/// columns, `-o json`, a watch that sees a status change, `kubectl cordon` (a patch of the
/// Node), and a watch from a resourceVersion older than a restart gets 410 Gone.
#[test]
fn kubectl_reads_the_test_api_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut api = KubeApi::new(None, "127.0.0.1:0".parse().expect("addr"));
    api.with(|s| {
        kube_api::seed(s, &deckhouse_examples());
        kube_api::seed(
            s,
            &[
                kube_api::node("gw1", json!({"dedicated/egress": ""})),
                kube_api::pod("my-ns", "backend-1", json!({"app": "backend"}), "10.1.0.7"),
            ],
        );
    });
    let out = kubectl(&api, dir.path(), &["get", "egressgateways"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "NAME",
        "READY",
        "MODE",
        "ACTIVE",
        "READY NODES",
        "my-egressgw ",
        "VirtualIPAddress",
        "my-egressgw-primary",
        "PrimaryIPFromEgressGatewayNodeInterface",
    ] {
        assert!(table.contains(expected), "no {expected:?} in\n{table}");
    }
    let out = kubectl(
        &api,
        dir.path(),
        &["get", "egressgatewaypolicies", "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list["items"][0]["spec"]["egressGatewayName"], "my-egressgw");
    let out = kubectl(
        &api,
        dir.path(),
        &["get", "pods", "-n", "my-ns", "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let pods: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(pods["items"][0]["status"]["podIP"], "10.1.0.7");

    // A watch sees the status egressd would write.
    let config = dir.path().join("kubeconfig");
    let mut watch = common::tools::cmd("kubectl")
        .arg("--kubeconfig")
        .arg(&config)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["get", "egressgateways", "--watch", "-o", "json"])
        .env("HOME", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl --watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdout = stdout;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    let read_until = |what: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "kubectl --watch never printed {what:?}:\n{seen}"
            );
            if let Ok(chunk) = rx.recv_timeout(left) {
                seen.push_str(&chunk);
            }
        }
    };
    read_until("\"my-egressgw-primary\"", &mut seen);
    api.with(|s| {
        let mut g = s.get(Kind::EgressGateway, "my-egressgw").expect("gateway");
        g["status"] = json!({"activeNodeName": "gw1", "readyNodes": 1});
        s.put(Kind::EgressGateway, g);
    });
    read_until("\"activeNodeName\": \"gw1\"", &mut seen);
    let _ = watch.kill();
    let _ = watch.wait();

    // kubectl cordon: GET then a strategic merge patch of the Node.
    let out = kubectl(&api, dir.path(), &["cordon", "gw1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        api.with(|s| s.get(Kind::Node, "gw1")).expect("node")["spec"]["unschedulable"],
        true
    );
    let out = kubectl(&api, dir.path(), &["get", "nodes"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SchedulingDisabled"),
        "{}",
        text(&out)
    );

    // After a restart the history is gone: a watch from before it is answered with 410.
    let rv = api.with(|s| s.list(Kind::EgressGateway)[0]["metadata"]["resourceVersion"].clone());
    api.stop();
    api.start();
    let path = format!(
        "/apis/network.deckhouse.io/v1alpha1/egressgateways?watch=1&resourceVersion={}",
        rv.as_str().unwrap_or_default()
    );
    let out = kubectl(&api, dir.path(), &["get", "--raw", &path]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"type\":\"ERROR\"") && body.contains("\"code\":410"),
        "{}",
        text(&out)
    );
}

/// `[kubernetes]` problems are refused by `check-config` with the key and what is expected.
#[test]
fn bad_kubernetes_settings_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("egressd.toml");
    for (body, expected) in [
        (
            "[kubernetes]\nenabled = true\nkubeconfg = \"/x\"\n",
            "kubernetes.kubeconfg",
        ),
        (
            "[kubernetes]\nenabled = true\ncontext = \"prod\"\n",
            "a context needs kubernetes.kubeconfig",
        ),
        ("[kubernetes]\nenabled = \"yes\"\n", "kubernetes.enabled"),
    ] {
        std::fs::write(&config, format!("[node]\nname = \"gw1\"\n{body}")).expect("config");
        let out = egressd(
            &["check-config", "--config", &config.display().to_string()],
            "",
        );
        assert!(!out.status.success(), "{body}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(err.contains(expected), "{body}: no {expected:?} in {err}");
    }
}

/// The address the test API server listens on inside the lab's cluster network.
const KUBE_API_IP: &str = "10.78.0.100";
/// A pod address the lab's client holds and no file policy selects.
const POD_IP: &str = "10.77.0.12";
const POD_IP2: &str = "10.77.0.13";
/// The Deckhouse example's virtual IP.
const EXAMPLE_VIP: &str = "172.18.18.242";

/// The test API server in the lab's cluster network (at [`KUBE_API_IP`]), and a kubeconfig
/// for it at `kubeconfig`.
fn lab_api(topo: &Topo, kubeconfig: &Path) -> KubeApi {
    topo.lab.exec(
        &topo.mgmt,
        [
            "ip",
            "addr",
            "add",
            &format!("{KUBE_API_IP}/24"),
            "dev",
            "br2",
        ],
    );
    let a = KubeApi::new(
        Some(&topo.mgmt),
        format!("{KUBE_API_IP}:6443").parse().expect("addr"),
    );
    std::fs::write(kubeconfig, a.kubeconfig()).expect("kubeconfig");
    a
}

fn deckhouse_vip_seed() -> Vec<Value> {
    let mut v = deckhouse_examples();
    v.remove(1); // the PrimaryIP gateway: the lab's nodes run the VIP example
    v.extend([
        kube_api::node("gw1", json!({"dedicated/egress": ""})),
        kube_api::node("gw2", json!({"dedicated/egress": ""})),
        kube_api::pod("my-ns", "backend-1", json!({"app": "backend"}), POD_IP),
        // Selected by nothing: other namespace.
        kube_api::pod(
            "other-ns",
            "backend-x",
            json!({"app": "backend"}),
            "10.77.0.99",
        ),
        // Breaks a rule: not imported, named in the status; the others go on.
        json!({"apiVersion": "network.deckhouse.io/v1alpha1", "kind": "EgressGateway",
               "metadata": {"name": "bad-vip"},
               "spec": {"nodeSelector": {"dedicated/egress": ""},
                        "sourceIP": {"mode": "VirtualIPAddress",
                                     "virtualIPAddress": {"ip": "172.18.18.999",
                                                          "interfaces": ["eth1"]}}}}),
    ]);
    v
}

fn status_of(c: &Cluster, i: usize) -> Value {
    c.topo.status(i).unwrap_or_default()
}

fn wait_source(c: &Cluster, src: &str, expected: impl Fn(Option<&str>) -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = c.topo.seen_source(src, SERVER_IP);
        if expected(seen.as_deref()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the server saw {seen:?} from {src}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The live sync end to end, two nodes in network namespaces, the API server in the cluster
/// network: the Deckhouse examples imported (origin kubernetes, the Nodes' labels matching the
/// example's nodeSelector), the example's VIP held and the selected pod's traffic SNATed to
/// it, `apply`/`delete` refused for them, status written back; pod churn moves the SNAT
/// sources; `kubectl cordon` moves the active node and `egressd node uncordon` does not lift
/// it; the API server stopped (nothing changes) and restarted (resync through 410 Gone).
#[test]
fn live_sync_end_to_end() {
    if !require_root("live_sync_end_to_end") {
        return;
    }
    const TOKEN: &str = "k8s-live-token-0123456789";
    let (token, admin) = admin_token(TOKEN);
    let tok = token.path().display().to_string();
    let kube_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = kube_dir.path().join("kubeconfig");
    let mut api: Option<KubeApi> = None;
    let extra = format!(
        "\n{admin}\n[kubernetes]\nenabled = true\nkubeconfig = \"{}\"\n",
        kubeconfig.display()
    );
    let c = Cluster::start_prepared("k8l", 2, &extra, "", |topo| {
        for ip in [POD_IP, POD_IP2] {
            topo.lab.exec(
                &topo.client,
                ["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
        }
        // The server reaches the example's VIP on its segment (the active node answers ARP).
        topo.lab.exec(
            &topo.server,
            [
                "ip",
                "route",
                "add",
                &format!("{EXAMPLE_VIP}/32"),
                "dev",
                "eth0",
            ],
        );
        let a = lab_api(topo, &kubeconfig);
        a.with(|s| kube_api::seed(s, &deckhouse_vip_seed()));
        api = Some(a);
    });
    let mut api = api.expect("the API server");

    // Imported: the example's gateway and policy, origin kubernetes; its VIP held by gw1 (the
    // Nodes' dedicated/egress label selects both nodes) and the pod's traffic SNATed to it.
    wait_source(
        &c,
        POD_IP,
        |s| s == Some(EXAMPLE_VIP),
        "the imported policy",
    );
    let out = c.topo.cli(0, &["get", "gateways"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("my-egressgw") && listing.contains("kubernetes"),
        "{}",
        text(&out)
    );
    assert_eq!(c.topo.active(0, "my-egressgw").as_deref(), Some("gw1"));
    assert!(!c.topo.holds(&c.topo.nodes[1], "eth1", EXAMPLE_VIP));
    // The pod of another namespace is not selected.
    assert_ne!(
        c.topo.seen_source(POD_IP2, SERVER_IP).as_deref(),
        Some(EXAMPLE_VIP)
    );
    // The writer (the Raft leader) names what it did not import.
    let s = status_of(&c, c.index(&c.leader()));
    let k = &s["kubernetes"];
    assert_eq!(k["state"], "synced", "{s}");
    assert_eq!(k["writer"], true, "{s}");
    let not_imported = k["not_imported"].to_string();
    assert!(
        not_imported.contains("gateway bad-vip") && not_imported.contains("172.18.18.999"),
        "{s}"
    );

    // Status written back through /status.
    let mut written = Value::Null;
    wait_for("the gateway's status in Kubernetes", WAIT, || {
        written = api
            .with(|s| s.get(Kind::EgressGateway, "my-egressgw"))
            .expect("gw")["status"]
            .clone();
        written["activeNodeName"] == "gw1" && written["readyNodes"] == 2
    });
    let cond = &written["conditions"][0];
    assert_eq!(cond["type"], "Ready", "{written}");
    assert_eq!(cond["status"], "True", "{written}");
    assert_eq!(
        cond["reason"], "ElectionSucceedAndVirtualIPAnnounced",
        "{written}"
    );
    assert_eq!(written["observedGeneration"], 1, "{written}");
    wait_for("the bad gateway's status", WAIT, || {
        let st = api
            .with(|s| s.get(Kind::EgressGateway, "bad-vip"))
            .expect("gw")["status"]
            .clone();
        st["conditions"][0]["reason"] == "ElectionFailed"
            && st["conditions"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("172.18.18.999"))
    });

    // apply and delete refuse Kubernetes-owned objects, changing nothing.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[[gateway]]\nname = \"my-egressgw\"\n[gateway.source_ip]\nmode = \
         \"PrimaryIPFromEgressGatewayNodeInterface\"\n\
         primary_ip_from_egress_gateway_node_interface = { interface_name = \"eth1\" }\n",
    )
    .expect("file");
    for args in [
        vec![
            "apply",
            "-f",
            &file.display().to_string(),
            "--token-file",
            &tok,
        ],
        vec![
            "delete",
            "policy",
            "my-egressgw-policy",
            "--token-file",
            &tok,
        ],
    ] {
        let out = c.topo.cli(0, &args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("owned by Kubernetes"),
            "{args:?}: {}",
            text(&out)
        );
    }
    let out = c.topo.cli(0, &["get", "gateways"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("172.18.18.242 on eth1"),
        "the refused apply changed the gateway: {}",
        text(&out)
    );

    // Pod churn: the pod goes, another comes with another address.
    api.with(|s| {
        s.delete(Kind::Pod, "my-ns/backend-1");
        s.put(
            Kind::Pod,
            kube_api::pod("my-ns", "backend-2", json!({"app": "backend"}), POD_IP2),
        );
    });
    wait_source(
        &c,
        POD_IP2,
        |s| s == Some(EXAMPLE_VIP),
        "the new pod's traffic",
    );
    wait_source(
        &c,
        POD_IP,
        |s| s == Some(POD_IP),
        "the gone pod's traffic, not SNATed",
    );

    // kubectl cordon gw1: Kubernetes' reason moves the gateway to gw2...
    let out = lab_kubectl(&c, &api, kube_dir.path(), &["cordon", "gw1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the VIP on gw2", WAIT, || {
        c.topo.holds(&c.topo.nodes[1], "eth1", EXAMPLE_VIP)
            && !c.topo.holds(&c.topo.nodes[0], "eth1", EXAMPLE_VIP)
    });
    wait_source(
        &c,
        POD_IP2,
        |s| s == Some(EXAMPLE_VIP),
        "traffic through gw2",
    );
    // ... and egressd's uncordon does not lift it (status names both reasons).
    let out = c
        .topo
        .cli(0, &["node", "cordon", "gw1", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("both cordon reasons in status", WAIT, || {
        let s = status_of(&c, 0);
        s["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "gw1"))
            .is_some_and(|m| m["cordon_reasons"].as_array().is_some_and(|r| r.len() == 2))
    });
    let out = c
        .topo
        .cli(0, &["node", "uncordon", "gw1", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stays cordoned"),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.topo.active(0, "my-egressgw").as_deref(), Some("gw2"));
    wait_for("gw2 active in the Kubernetes status", WAIT, || {
        api.with(|s| s.get(Kind::EgressGateway, "my-egressgw"))
            .expect("gw")["status"]["activeNodeName"]
            == "gw2"
    });
    // kubectl uncordon: back to gw1 (the first eligible node by name).
    let out = lab_kubectl(&c, &api, kube_dir.path(), &["uncordon", "gw1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the VIP back on gw1", WAIT, || {
        c.topo.holds(&c.topo.nodes[0], "eth1", EXAMPLE_VIP)
    });

    // The API server goes away: the last imported state keeps running, whatever changes there.
    api.stop();
    api.with(|s| {
        s.delete(Kind::Pod, "my-ns/backend-2");
    });
    wait_for("the sync noticing the API server is gone", WAIT, || {
        status_of(&c, 0)["kubernetes"]["state"]
            .as_str()
            .is_some_and(|s| s.contains("unreachable"))
    });
    assert_eq!(
        c.topo.seen_source(POD_IP2, SERVER_IP).as_deref(),
        Some(EXAMPLE_VIP),
        "changed while the API server was away\n{}",
        c.logs()
    );
    // Back: the watch is answered 410 Gone, the sync relists and the pod's removal lands.
    api.start();
    wait_source(
        &c,
        POD_IP2,
        |s| s == Some(POD_IP2),
        "the resync after the restart",
    );
    let logs = c.logs();
    assert!(logs.contains("resynced"), "{logs}");
    // The gateway stays (the policy is withdrawn: it selects no pod).
    assert_eq!(c.topo.active(0, "my-egressgw").as_deref(), Some("gw1"));
}

/// `kubectl` in the lab's cluster network namespace, against the test API server there.
fn lab_kubectl(c: &Cluster, api: &KubeApi, dir: &Path, args: &[&str]) -> Output {
    let config = dir.join("kubeconfig");
    std::fs::write(&config, api.kubeconfig()).expect("kubeconfig");
    let cache = dir.join("cache").display().to_string();
    let config = config.display().to_string();
    let mut full = vec!["kubectl", "--kubeconfig", &config, "--cache-dir", &cache];
    full.extend(args);
    c.topo.lab.try_exec(&c.topo.mgmt, full)
}

// ---------------------------------------------------------------------------------------------
// Figures (not a test: `cargo test --release --features kubernetes --test kubernetes
// live_sync_figures -- --ignored --nocapture`, as root)
// ---------------------------------------------------------------------------------------------

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rss_kib(c: &mut Cluster, i: usize) -> u64 {
    let child = c.children[i].expect("running");
    let pid = c.topo.lab.child(child).id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until node 0 has `policies` committed and its data plane has had no change for 2 s
/// since; returns when the last change finished (Unix ms) and the SNAT elements.
fn settled(c: &Cluster, policies: u64) -> (u64, u64) {
    let mut last = (0, 0);
    let mut since = Instant::now();
    wait_for(
        "the policies committed and applied",
        Duration::from_secs(600),
        || {
            let s = status_of(c, 0);
            let now = (
                s["dataplane"]["last_apply_unix_ms"].as_u64().unwrap_or(0),
                s["dataplane"]["snat_elements"].as_u64().unwrap_or(0),
            );
            if s["cluster"]["policies"].as_u64() != Some(policies) || now != last {
                last = now;
                since = Instant::now();
                return false;
            }
            since.elapsed() > Duration::from_secs(2)
        },
    );
    last
}

/// One egressd node and the test API server; prints the figures of the issue: a pod's address
/// → SNAT live on the active node (the daemon's own time of the finished data-plane change,
/// against the moment the pod was put in the API server), the time to import and apply 1 000
/// policies selecting 10 000 pods, and the memory the sync adds (the daemon's RSS with the
/// imported objects against the same objects given by `egressd apply` without the sync).
#[test]
#[ignore = "figures for the README; run by hand as root, release build"]
fn live_sync_figures() {
    if !require_root("live_sync_figures") {
        return;
    }
    const TOKEN: &str = "k8s-bench-token-0123456789";
    const POLICIES: usize = 1_000;
    const PODS_PER_POLICY: usize = 10;
    const CHANGES: usize = 40;
    let (token, admin) = admin_token(TOKEN);
    let tok = token.path().display().to_string();
    let kube_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = kube_dir.path().join("kubeconfig");
    let mut api: Option<KubeApi> = None;
    let extra = format!(
        "\n{admin}\n[kubernetes]\nenabled = true\nkubeconfig = \"{}\"\n",
        kubeconfig.display()
    );
    let mut c = Cluster::start_prepared("k8f", 1, &extra, "", |topo| {
        let a = lab_api(topo, &kubeconfig);
        a.with(|s| {
            kube_api::seed(s, &deckhouse_examples()[..1]);
            kube_api::seed(
                s,
                &[
                    yaml_fixture("egressgatewaypolicy.yaml"),
                    kube_api::node("gw1", json!({"dedicated/egress": ""})),
                    kube_api::pod("my-ns", "p0", json!({"app": "backend"}), "10.200.0.1"),
                ],
            );
        });
        api = Some(a);
    });
    let api = api.expect("the API server");
    let applies = |c: &Cluster| -> (u64, u64) {
        let s = status_of(c, 0);
        (
            s["dataplane"]["applies"].as_u64().unwrap_or(0),
            s["dataplane"]["last_apply_unix_ms"].as_u64().unwrap_or(0),
        )
    };
    wait_for("the example imported", WAIT, || {
        status_of(&c, 0)["cluster"]["policies"].as_u64() == Some(2)
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(&mut c, 0);

    // 1. A pod's address → SNAT live.
    let mut lat = Vec::new();
    for i in 0..CHANGES {
        let (n0, _) = applies(&c);
        let ip = format!("10.200.1.{}", i + 1);
        let t0 = unix_ms();
        api.with(|s| {
            s.put(
                Kind::Pod,
                kube_api::pod("my-ns", &format!("c{i}"), json!({"app": "backend"}), &ip),
            )
        });
        let mut done = 0;
        wait_for("the pod's address in the data plane", WAIT, || {
            let (n, at) = applies(&c);
            done = at;
            n > n0 && at >= t0
        });
        lat.push(done.saturating_sub(t0));
        assert!(
            c.topo.ruleset(&c.topo.nodes[0]).contains(&ip),
            "{ip} not in the ruleset"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lat.sort();
    println!(
        "pod address -> SNAT live on the active node: median {} ms, max {} ms ({CHANGES} changes)",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );

    // 2. 1 000 policies selecting 10 000 pods, arriving at once.
    let before = status_of(&c, 0);
    let t0 = unix_ms();
    let started = Instant::now();
    api.with(|s| {
        for p in 0..POLICIES {
            for k in 0..PODS_PER_POLICY {
                let n = p * PODS_PER_POLICY + k;
                s.put(
                    Kind::Pod,
                    kube_api::pod(
                        "bench",
                        &format!("pod-{n}"),
                        json!({"app": format!("app-{p}")}),
                        &format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256),
                    ),
                );
            }
            s.put(
                Kind::EgressGatewayPolicy,
                json!({"metadata": {"name": format!("bench-{p}")},
                       "spec": {"egressGatewayName": "my-egressgw",
                                "destinationCIDRs": ["0.0.0.0/0"],
                                "selectors": [{"podSelector": {"matchLabels": {
                                    "app": format!("app-{p}"),
                                    "io.kubernetes.pod.namespace": "bench"}}}]}}),
            );
        }
    });
    let put_ms = started.elapsed().as_millis();
    let (done, elements) = settled(&c, 2 + POLICIES as u64);
    let after = status_of(&c, 0);
    println!(
        "  (Raft entries {} -> {}, data-plane changes {} -> {})",
        before["cluster"]["applied_index"],
        after["cluster"]["applied_index"],
        before["dataplane"]["applies"],
        after["dataplane"]["applies"]
    );
    println!(
        "1 000 policies selecting 10 000 pods: imported and applied {} ms after they were put \
         in the API server (putting them took {put_ms} ms; {elements} SNAT elements)",
        done.saturating_sub(t0)
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss_k8s = rss_kib(&mut c, 0);
    println!("RSS: {rss_before} KiB before, {rss_k8s} KiB with 1 000 imported policies");
    drop(c);

    // 3. The same objects through `egressd apply`, without the sync.
    let mut objects = String::new();
    let mut p_all = Vec::new();
    for p in 0..POLICIES {
        let sources: Vec<String> = (0..PODS_PER_POLICY)
            .map(|k| {
                let n = p * PODS_PER_POLICY + k;
                format!(
                    "\"10.{}.{}.{}/32\"",
                    100 + n / 65536,
                    (n / 256) % 256,
                    n % 256
                )
            })
            .collect();
        p_all.push(format!(
            "[[policy]]\nname = \"bench-{p}\"\negress_gateway_name = \"{GW}\"\nsource_cidrs = [{}]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
            sources.join(", ")
        ));
    }
    objects.push_str(&p_all.join("\n"));
    let mut c = Cluster::start_with("k8g", 1, &admin);
    let rss_plain_before = rss_kib(&mut c, 0);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bench.toml");
    std::fs::write(&file, objects).expect("objects");
    let out = c.topo.cli(
        0,
        &[
            "apply",
            "-f",
            &file.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    settled(&c, 1 + POLICIES as u64);
    std::thread::sleep(Duration::from_secs(2));
    let rss_plain = rss_kib(&mut c, 0);
    println!(
        "RSS without the sync: {rss_plain_before} KiB before, {rss_plain} KiB with the same \
         1 000 policies applied; the sync adds {} KiB",
        rss_k8s as i64 - rss_plain as i64
    );
}
