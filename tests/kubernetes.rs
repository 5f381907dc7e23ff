//! The Kubernetes adapter's commands through the real binary (built with `--features
//! kubernetes`; `cargo test` without it skips this file): `egressd import` prints TOML that
//! `egressd check-config` accepts, reads standard input, refuses bad input printing nothing,
//! and with `--apply` changes a running cluster's data plane; `egressd kubernetes crds` prints
//! the packaged CRDs.

mod common;

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
