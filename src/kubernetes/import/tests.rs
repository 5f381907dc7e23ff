//! The conversion: both source-IP modes, excluded CIDRs, node selectors, where sources come
//! from, `List` input, the Deckhouse documentation's examples, and bad input.

use super::*;
use crate::model::SourceIp;

fn sources(args: &[&str]) -> Sources {
    Sources::from_args(args.iter().copied()).expect("valid --sources")
}

fn ok(yaml: &str, s: &[&str]) -> Imported {
    match import(yaml, "in.yaml", &sources(s), References::InInput) {
        Ok(i) => i,
        Err(e) => panic!("import failed:\n{e}"),
    }
}

fn errors(yaml: &str, s: &[&str], references: References) -> String {
    match import(yaml, "in.yaml", &sources(s), references) {
        Ok(i) => panic!("import succeeded: {i:?}"),
        Err(e) => e.to_string(),
    }
}

/// The printed TOML is a configuration file `check-config` accepts, holding the same objects.
fn round_trip(i: &Imported) -> String {
    let text = to_toml(i, &["imported".to_string()]).expect("TOML");
    let cfg = match config::parse_str(&text, "imported.toml") {
        Ok(c) => c,
        Err(e) => panic!("check-config refuses the output:\n{e}\n---\n{text}"),
    };
    assert_eq!(cfg.gateways, i.gateways, "{text}");
    assert_eq!(cfg.policies, i.policies, "{text}");
    text
}

const VIP: &str = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata:
  name: egw-vip
spec:
  nodeSelector:
    node-role.deckhouse.io/egress: ""
    zone: a
  sourceIP:
    mode: VirtualIPAddress
    virtualIPAddress:
      ip: 198.18.0.50
      interfaces: [eth1, eth2]
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata:
  name: pol
spec:
  egressGatewayName: egw-vip
  destinationCIDRs: [0.0.0.0/0]
  excludedCIDRs: [192.168.0.0/16, 10.0.0.0/8]
  selectors:
  - podSelector:
      matchLabels: {app: backend, io.kubernetes.pod.namespace: my-ns}
      matchExpressions:
      - {key: tier, operator: In, values: [web, api]}
"#;

#[test]
fn virtual_ip_gateway_with_selector_and_excluded_cidrs() {
    let i = ok(VIP, &["pol=10.77.0.0/24, 10.78.0.0/24"]);
    let g = &i.gateways[0];
    assert_eq!(g.name, "egw-vip");
    assert_eq!(
        g.node_selector,
        [("node-role.deckhouse.io/egress", ""), ("zone", "a")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    );
    assert_eq!(g.selection, Selection::Alphabetical);
    assert!(g.preempt);
    assert_eq!(
        g.source_ip,
        SourceIp::VirtualIp {
            ip: "198.18.0.50".parse().unwrap(),
            interfaces: vec!["eth1".into(), "eth2".into()],
        }
    );
    let p = &i.policies[0];
    assert_eq!(p.egress_gateway_name, "egw-vip");
    assert_eq!(
        p.source_cidrs,
        vec![
            "10.77.0.0/24".parse().unwrap(),
            "10.78.0.0/24".parse().unwrap()
        ]
    );
    assert_eq!(p.destination_cidrs, vec!["0.0.0.0/0".parse().unwrap()]);
    assert_eq!(
        p.excluded_cidrs,
        vec![
            "192.168.0.0/16".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap()
        ]
    );
    let text = round_trip(&i);
    assert!(
        text.contains("# sources from --sources; in Kubernetes it selects app=backend,io.kubernetes.pod.namespace=my-ns,tier In (web,api)"),
        "{text}"
    );
}

#[test]
fn primary_ip_gateway() {
    let yaml = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: basic}
spec:
  sourceIP:
    mode: PrimaryIPFromEgressGatewayNodeInterface
    primaryIPFromEgressGatewayNodeInterface: {interfaceName: eth1}
"#;
    let i = ok(yaml, &[]);
    assert_eq!(
        i.gateways[0].source_ip,
        SourceIp::PrimaryIp {
            interface: "eth1".into()
        }
    );
    // No nodeSelector: every node, as in Deckhouse.
    assert!(i.gateways[0].node_selector.is_empty());
    assert!(i.policies.is_empty());
    round_trip(&i);
}

#[test]
fn sources_from_the_annotation_and_the_command_line_wins() {
    let yaml = format!(
        "{VIP}---\n{}",
        r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata:
  name: annotated
  annotations:
    egressd.io/source-cidrs: "10.90.0.0/16,"
spec:
  egressGatewayName: egw-vip
  destinationCIDRs: [203.0.113.0/24]
"#
    );
    let i = ok(&yaml, &["pol=10.77.0.0/24"]);
    assert_eq!(
        i.policies[1].source_cidrs,
        vec!["10.90.0.0/16".parse().unwrap()]
    );
    assert_eq!(
        i.policy_notes[1],
        "sources from the annotation; in Kubernetes it selects no pods"
    );
    let i = ok(&yaml, &["pol=10.77.0.0/24", "annotated=10.91.0.0/16"]);
    assert_eq!(
        i.policies[1].source_cidrs,
        vec!["10.91.0.0/16".parse().unwrap()]
    );
    round_trip(&i);
}

/// What `kubectl get egressgateways,egressgatewaypolicies -o yaml` prints: a `List` whose items
/// carry server fields and a status.
#[test]
fn kubectl_list() {
    let yaml = r#"
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: network.deckhouse.io/v1alpha1
  kind: EgressGateway
  metadata:
    creationTimestamp: "2024-05-07T11:10:59Z"
    generation: 1
    name: egg-dev
    resourceVersion: "123456"
    uid: bc8a4fc5-94cb-46c5-98cc-03a051c36d0b
  spec:
    nodeSelector:
      node-role: egress
    sourceIP:
      mode: VirtualIPAddress
      virtualIPAddress:
        ip: 10.2.2.8
        interfaces: [eth1]
  status:
    activeNodeName: frontend-1
    conditions:
    - lastHeartbeatTime: "2024-05-07T11:34:17Z"
      lastTransitionTime: "2024-05-07T11:10:59Z"
      message: Node frontend-1 was elected as active node and VirtualIP is announced
      reason: ElectionSucceedAndVirtualIPAnnounced
      status: "True"
      type: Ready
    observedGeneration: 1
    readyNodes: 2
- apiVersion: network.deckhouse.io/v1alpha1
  kind: EgressGatewayPolicy
  metadata:
    name: egp-dev
    annotations:
      egressd.io/source-cidrs: 10.111.0.0/16
  spec:
    selectors:
    - podSelector:
        matchLabels:
          role: worker
    destinationCIDRs:
    - "192.168.0.0/16"
    excludedCIDRs:
    - "10.0.2.0/24"
    egressGatewayName: egg-dev
"#;
    let i = ok(yaml, &[]);
    assert_eq!(i.gateways.len(), 1);
    assert_eq!(i.policies.len(), 1);
    assert_eq!(i.policies[0].name, "egp-dev");
    round_trip(&i);
}

#[test]
fn the_status_reads_as_deckhouse_writes_it() {
    let yaml = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: g}
spec:
  sourceIP: {mode: VirtualIPAddress, virtualIPAddress: {ip: 10.2.2.8}}
status:
  activeNodeName: frontend-1
  conditions:
  - lastHeartbeatTime: "2024-05-07T11:34:17Z"
    lastTransitionTime: "2024-05-07T11:10:59Z"
    message: Node was elected as active node
    reason: ElectionSucceed
    status: "True"
    type: Ready
  observedGeneration: 3
  readyNodes: 2
"#;
    let g: EgressGateway = serde_saphyr::from_str(yaml).expect("status");
    let s = g.status.expect("a status");
    assert_eq!(s.active_node_name.as_deref(), Some("frontend-1"));
    assert_eq!((s.observed_generation, s.ready_nodes), (Some(3), Some(2)));
    let c = &s.conditions[0];
    assert_eq!(c.type_, crate::kubernetes::types::READY);
    assert_eq!(
        c.reason,
        crate::kubernetes::types::ReadyReason::ElectionSucceed.as_str()
    );
    assert_eq!(
        crate::kubernetes::types::ReadyReason::VirtualIPAnnouncingFailed.status(),
        "False"
    );
    // Written back, the status keeps Deckhouse's names.
    let back = serde_json::to_value(&s).unwrap();
    for key in [
        "activeNodeName",
        "readyNodes",
        "observedGeneration",
        "conditions",
    ] {
        assert!(back.get(key).is_some(), "{key} in {back}");
    }
    assert!(back["conditions"][0].get("lastHeartbeatTime").is_some());
}

#[test]
fn every_policy_without_sources_is_named_once() {
    let yaml = format!(
        "{VIP}---\n{}",
        r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: second}
spec: {egressGatewayName: egw-vip, destinationCIDRs: [0.0.0.0/0]}
"#
    );
    let e = errors(&yaml, &[], References::InInput);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("2 EgressGatewayPolicy(s) without sources: \"pol\", \"second\""),
        "{e}"
    );
    assert!(e.contains("--sources NAME=CIDR"), "{e}");
    assert!(e.contains(SOURCES_ANNOTATION), "{e}");
}

#[test]
fn bad_values_are_named_by_resource_and_field() {
    let yaml = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: g1}
spec:
  nodeSelector: {"bad key!": x}
  sourceIP:
    mode: VirtualIPAddress
    virtualIPAddress: {ip: 300.1.1.1, interfaces: [eth1]}
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: g2}
spec:
  sourceIP: {mode: VirtualIPAddress}
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: g3}
spec:
  sourceIP: {mode: Magic}
---
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: p1}
spec:
  egressGatewayName: g1
  destinationCIDRs: [0.0.0.0/0, not-a-cidr]
  excludedCIDRs: [10.0.0.1/8]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;
    let e = errors(yaml, &["p1=10.0.0.0/33"], References::InInput);
    for expected in [
        "in.yaml: EgressGateway \"g1\": spec.nodeSelector.",
        "in.yaml: EgressGateway \"g1\": spec.sourceIP.virtualIPAddress.ip:",
        "in.yaml: EgressGateway \"g2\": spec.sourceIP.virtualIPAddress: missing",
        "in.yaml: EgressGateway \"g3\" (document 3): spec.sourceIP.mode: unknown variant `Magic`",
        "in.yaml: EgressGatewayPolicy \"p1\": spec.destinationCIDRs[1]:",
        "in.yaml: EgressGatewayPolicy \"p1\": spec.excludedCIDRs[0]:",
        "in.yaml: EgressGatewayPolicy \"p1\": --sources \"p1\"[0]:",
        "in.yaml: document 5: Deployment \"web\" (\"apps/v1\") is not a resource egressd imports",
    ] {
        assert!(e.contains(expected), "no {expected:?} in:\n{e}");
    }
    assert_eq!(e.lines().count(), 8, "{e}");
}

#[test]
fn a_policy_must_name_a_gateway_of_the_input_unless_applied() {
    let yaml = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: p}
spec: {egressGatewayName: elsewhere, destinationCIDRs: [0.0.0.0/0]}
"#;
    let e = errors(yaml, &["p=10.0.0.0/24"], References::InInput);
    assert!(
        e.starts_with("in.yaml: EgressGatewayPolicy \"p\": spec.egressGatewayName:"),
        "{e}"
    );
    // Applied to a cluster, the gateway may be committed there: the cluster decides.
    let i = import(
        yaml,
        "in.yaml",
        &sources(&["p=10.0.0.0/24"]),
        References::InCluster,
    )
    .expect("import for --apply");
    assert_eq!(i.policies[0].egress_gateway_name, "elsewhere");
}

#[test]
fn input_that_is_not_yaml_or_holds_nothing() {
    let e = errors("a: [b\n", &[], References::InInput);
    assert!(e.starts_with("in.yaml: not valid YAML:"), "{e}");
    let e = errors("---\n---\n", &[], References::InInput);
    assert!(e.contains("no EgressGateway or EgressGatewayPolicy"), "{e}");
    let e = errors("- 1\n- 2\n", &[], References::InInput);
    assert!(
        e.contains("document 1: expected a Kubernetes object"),
        "{e}"
    );
}

#[test]
fn sources_arguments() {
    let mut s = Sources::default();
    assert!(s.add("p=10.0.0.0/24,10.1.0.0/24").is_ok());
    assert!(s.add("p=10.2.0.0/24").unwrap_err().contains("given twice"));
    assert!(s.add("no-equals").unwrap_err().contains("NAME=CIDR"));
    assert!(s.add("=10.0.0.0/8").unwrap_err().contains("name"));
    assert!(s.add("q=").unwrap_err().contains("no CIDR"));
    let e = errors(
        VIP,
        &["pol=10.0.0.0/24", "typo=10.0.0.0/24"],
        References::InInput,
    );
    assert!(
        e.contains("--sources names no EgressGatewayPolicy of in.yaml: \"typo\""),
        "{e}"
    );
}

/// The three examples of the Deckhouse documentation: each gateway with the policy imports and
/// passes check-config. (Both gateways are named `my-egressgw`, so all three at once are one
/// gateway too many, which is said as the file says it.)
#[test]
fn deckhouse_documentation_examples() {
    let primary = include_str!("../../../tests/fixtures/deckhouse/egressgateway-primary.yaml");
    let vip = include_str!("../../../tests/fixtures/deckhouse/egressgateway-vip.yaml");
    let policy = include_str!("../../../tests/fixtures/deckhouse/egressgatewaypolicy.yaml");
    let s = ["my-egressgw-policy=10.77.0.0/24"];
    for gateway in [primary, vip] {
        let i = ok(&format!("{gateway}---\n{policy}"), &s);
        assert_eq!(i.gateways[0].name, "my-egressgw");
        assert_eq!(i.policies[0].egress_gateway_name, "my-egressgw");
        round_trip(&i);
    }
    let e = errors(
        &format!("{primary}---\n{vip}---\n{policy}"),
        &s,
        References::InInput,
    );
    assert!(e.contains("duplicate gateway name \"my-egressgw\""), "{e}");
}

/// More objects than the YAML reader's default limits allow (1 024 documents), as separate
/// documents and as one List.
#[test]
fn thousands_of_objects() {
    let gateway = "apiVersion: network.deckhouse.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: gw}\nspec: {sourceIP: {mode: PrimaryIPFromEgressGatewayNodeInterface, primaryIPFromEgressGatewayNodeInterface: {interfaceName: eth1}}}\n";
    let policy = |i: usize| {
        format!(
            "apiVersion: network.deckhouse.io/v1alpha1\nkind: EgressGatewayPolicy\nmetadata: {{name: p{i}, annotations: {{egressd.io/source-cidrs: 10.{}.{}.0/24}}}}\nspec: {{egressGatewayName: gw, destinationCIDRs: [203.0.113.0/24]}}\n",
            i / 256,
            i % 256
        )
    };
    let n = 3000;
    let documents: Vec<String> = std::iter::once(gateway.to_string())
        .chain((0..n).map(policy))
        .collect();
    assert_eq!(ok(&documents.join("---\n"), &[]).policies.len(), n);
    let items: String = documents
        .iter()
        .map(|d| {
            let mut lines = d.lines();
            let first = lines.next().unwrap_or_default();
            std::iter::once(format!("- {first}\n"))
                .chain(lines.map(|l| format!("  {l}\n")))
                .collect::<String>()
        })
        .collect();
    let list = format!("apiVersion: v1\nkind: List\nitems:\n{items}");
    assert_eq!(ok(&list, &[]).policies.len(), n);
}

/// Deckhouse fields egressd does not use are said, not refused; nothing outside `spec` is.
#[test]
fn unknown_spec_fields_are_warnings() {
    let yaml = r#"
apiVersion: network.deckhouse.io/v1alpha1
kind: EgressGateway
metadata: {name: g, labels: {a: b}, uid: x}
spec:
  sourceIP:
    mode: VirtualIPAddress
    virtualIPAddress: {ip: 10.2.2.8, interfaces: [eth1], routingTableName: external}
  future: 1
status: {somethingNew: true}
"#;
    let i = ok(yaml, &[]);
    assert_eq!(
        i.warnings,
        [
            // In key order: the objects are read as JSON maps.
            "in.yaml: EgressGateway \"g\" (document 1): spec.future: not an egressd setting; ignored",
            "in.yaml: EgressGateway \"g\" (document 1): spec.sourceIP.virtualIPAddress.routingTableName: not an egressd setting; ignored",
        ]
    );
    assert!(ok(VIP, &["pol=10.0.0.0/24"]).warnings.is_empty());
}
