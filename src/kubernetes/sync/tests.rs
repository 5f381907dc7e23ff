//! The sync's pure half: watcher events in, the change the leader would write out.

use serde_json::json;

use super::*;
use crate::cluster::state::ClusterState;

fn gateway(name: &str, vip: &str) -> EgressGateway {
    serde_json::from_value(json!({
        "apiVersion": "network.deckhouse.io/v1alpha1", "kind": "EgressGateway",
        "metadata": {"name": name, "generation": 1},
        "spec": {"nodeSelector": {"dedicated/egress": ""},
                 "sourceIP": {"mode": "VirtualIPAddress",
                              "virtualIPAddress": {"ip": vip, "interfaces": ["eth1"]}}}
    }))
    .unwrap()
}

fn policy(name: &str, gw: &str, selector: serde_json::Value) -> EgressGatewayPolicy {
    serde_json::from_value(json!({
        "apiVersion": "network.deckhouse.io/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": name},
        "spec": {"egressGatewayName": gw, "destinationCIDRs": ["0.0.0.0/0"],
                 "selectors": [{"podSelector": selector}]}
    }))
    .unwrap()
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn node(name: &str, unschedulable: bool) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"dedicated/egress": ""}},
        "spec": {"unschedulable": unschedulable}
    }))
    .unwrap()
}

/// A mirror that has listed: one gateway, one policy (the Deckhouse example's selector), pods
/// in two namespaces.
fn listed() -> Mirror {
    let mut m = Mirror::new();
    m.on_gateway(Event::Init);
    m.on_gateway(Event::InitApply(gateway("my-egressgw", "172.18.18.242")));
    m.on_gateway(Event::InitDone);
    m.on_policy(Event::Init);
    m.on_policy(Event::InitApply(policy(
        "my-egressgw-policy",
        "my-egressgw",
        json!({"matchLabels": {"app": "backend", "io.kubernetes.pod.namespace": "my-ns"}}),
    )));
    m.on_policy(Event::InitDone);
    m.on_node(Event::Init);
    m.on_node(Event::InitApply(node("gw1", false)));
    m.on_node(Event::InitDone);
    m.on_pod(Event::Init);
    m.on_pod(Event::InitApply(pod("my-ns", "a", "backend", "10.1.0.1")));
    m.on_pod(Event::InitApply(pod("my-ns", "b", "frontend", "10.1.0.2")));
    m.on_pod(Event::InitApply(pod("other", "c", "backend", "10.1.0.3")));
    m.on_pod(Event::InitDone);
    m
}

fn commit(state: &mut ClusterState, plan: &Plan) {
    for c in [&plan.objects, &plan.nodes].into_iter().flatten() {
        let r = state.apply(c);
        assert_eq!(r.refused, None, "{c:?}");
    }
}

#[test]
fn the_selected_pods_become_the_policy_s_sources() {
    let mut m = listed();
    assert!(m.listed());
    let mut state = ClusterState::default();
    let plan = m.plan(&state, &["gw1".to_string()]);
    commit(&mut state, &plan);
    let p = &state.policies["my-egressgw-policy"];
    assert_eq!(p.source_cidrs, vec!["10.1.0.1/32".parse().unwrap()]);
    assert!(state.gateways.contains_key("my-egressgw"));
    assert_eq!(state.kube_objects.len(), 2);
    assert_eq!(state.kube_nodes["gw1"].labels["dedicated/egress"], "");
    // Nothing changed: nothing to write.
    assert_eq!(m.plan(&state, &["gw1".to_string()]), Plan::default());
}

#[test]
fn pod_churn_changes_only_the_sources() {
    let mut m = listed();
    let mut state = ClusterState::default();
    let members = ["gw1".to_string()];
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    m.on_pod(Event::Apply(pod("my-ns", "d", "backend", "10.1.0.9")));
    // A pod the policy does not select changes nothing.
    m.on_pod(Event::Apply(pod("other", "e", "backend", "10.1.0.10")));
    let plan = m.plan(&state, &members);
    let Some(Command::KubeObjects {
        gateways, policies, ..
    }) = &plan.objects
    else {
        panic!("{plan:?}")
    };
    assert!(gateways.is_empty());
    assert_eq!(policies.len(), 1);
    commit(&mut state, &plan);
    assert_eq!(
        state.policies["my-egressgw-policy"].source_cidrs,
        vec![
            "10.1.0.1/32".parse().unwrap(),
            "10.1.0.9/32".parse().unwrap()
        ]
    );
    m.on_pod(Event::Delete(pod("my-ns", "a", "backend", "10.1.0.1")));
    m.on_pod(Event::Delete(pod("my-ns", "d", "backend", "10.1.0.9")));
    // No pod left: the policy matches nothing and is withdrawn, and says why.
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(!state.policies.contains_key("my-egressgw-policy"));
    let waiting = "policy my-egressgw-policy: selects no Pod yet";
    assert!(
        m.rejected().iter().any(|r| r.starts_with(waiting)),
        "{:?}",
        m.rejected()
    );
    // A pod again: committed, and no longer named.
    m.on_pod(Event::Apply(pod("my-ns", "f", "backend", "10.1.0.11")));
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(state.policies.contains_key("my-egressgw-policy"));
    assert!(!m.rejected().iter().any(|r| r.starts_with(waiting)));
}

#[test]
fn a_relist_cut_short_deletes_nothing() {
    let mut m = listed();
    let mut state = ClusterState::default();
    let members = ["gw1".to_string()];
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    // A relist that never completes (the API server went away in the middle of it).
    m.on_pod(Event::Init);
    m.on_policy(Event::Init);
    m.on_gateway(Event::Init);
    assert_eq!(m.plan(&state, &members), Plan::default());
    // A full comparison (a new leader) with the relist still open: nothing changes either.
    m.mark_full();
    assert_eq!(m.plan(&state, &members), Plan::default());
    // The relist completes without pod a: only now is it gone.
    m.on_pod(Event::InitApply(pod("my-ns", "b", "frontend", "10.1.0.2")));
    m.on_pod(Event::InitDone);
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(!state.policies.contains_key("my-egressgw-policy"));
}

#[test]
fn nothing_is_written_before_every_watcher_has_listed() {
    let mut m = Mirror::new();
    m.on_gateway(Event::Init);
    m.on_gateway(Event::InitApply(gateway("g", "172.18.18.242")));
    m.on_gateway(Event::InitDone);
    assert!(!m.listed());
}

#[test]
fn a_bad_object_is_named_and_the_others_go_on() {
    let mut m = listed();
    m.on_gateway(Event::Apply(gateway("bad", "172.18.18.999")));
    m.on_policy(Event::Apply(policy(
        "odd",
        "my-egressgw",
        json!({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}),
    )));
    m.on_policy(Event::Apply(policy(
        "orphan",
        "nowhere",
        json!({"matchLabels": {"app": "backend"}}),
    )));
    let mut state = ClusterState::default();
    let plan = m.plan(&state, &["gw1".to_string()]);
    commit(&mut state, &plan);
    assert!(state.gateways.contains_key("my-egressgw"));
    assert!(!state.gateways.contains_key("bad"));
    let rejected = m.rejected().join("\n");
    for expected in [
        "gateway bad: EgressGateway \"bad\": spec.sourceIP.virtualIPAddress.ip",
        "policy odd: spec.selectors[0].podSelector: matchExpressions app: unknown operator \"Near\"",
        "policy orphan: waits for its gateway: no gateway nowhere",
    ] {
        assert!(
            rejected.contains(expected),
            "no {expected:?} in\n{rejected}"
        );
    }
}

#[test]
fn selectors_follow_kubernetes_rules() {
    let labels: BTreeMap<String, String> = [("app", "x"), ("tier", "web")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sel = |v: serde_json::Value| {
        Selector::compile(&serde_json::from_value::<LabelSelector>(v).unwrap())
    };
    assert!(sel(json!({})).unwrap().matches(&labels));
    assert!(
        sel(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["x", "y"]}]}))
            .unwrap()
            .matches(&labels)
    );
    assert!(
        !sel(json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}))
            .unwrap()
            .matches(&labels)
    );
    assert!(
        sel(json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}))
            .unwrap()
            .matches(&labels)
    );
    assert!(
        !sel(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}))
            .unwrap()
            .matches(&labels)
    );
    assert!(sel(json!({"matchExpressions": [{"key": "app", "operator": "In"}]})).is_err());
    assert!(
        sel(json!({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}))
            .is_err()
    );
}

#[test]
fn an_unschedulable_node_is_cordoned_for_its_own_reason() {
    let mut m = listed();
    let mut state = ClusterState::default();
    let members = ["gw1".to_string()];
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    m.on_node(Event::Apply(node("gw1", true)));
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(state.is_cordoned("gw1"));
    // egressd's own uncordon does not lift Kubernetes' reason.
    state.apply(&Command::Cordon("gw1".into()));
    state.apply(&Command::Uncordon("gw1".into()));
    assert!(state.is_cordoned("gw1"));
    assert_eq!(state.cordon_reasons("gw1").len(), 1);
    m.on_node(Event::Apply(node("gw1", false)));
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(!state.is_cordoned("gw1"));
}

#[test]
fn a_gateway_gone_from_kubernetes_takes_its_policies_along() {
    let mut m = listed();
    let mut state = ClusterState::default();
    let members = ["gw1".to_string()];
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    m.on_gateway(Event::Delete(gateway("my-egressgw", "172.18.18.242")));
    let plan = m.plan(&state, &members);
    commit(&mut state, &plan);
    assert!(state.gateways.is_empty() && state.policies.is_empty());
    assert!(state.kube_objects.is_empty());
}

#[test]
fn status_uses_deckhouse_reasons() {
    let mut m = listed();
    let mut state = ClusterState::default();
    let plan = m.plan(&state, &["gw1".to_string()]);
    commit(&mut state, &plan);
    let (s, _) = gateway_status("my-egressgw", Some(1), &state, None, &[], None);
    assert_eq!(s.conditions[0].reason, "ElectionFailed");
    assert_eq!(s.conditions[0].status, "False");
    state.apply(&Command::Assign {
        changes: vec![crate::cluster::state::AssignChange {
            gateway: "my-egressgw".into(),
            to: Some("gw1".into()),
            reason: crate::cluster::state::Reason::Elected,
        }],
        at_unix_ms: 0,
    });
    let member = crate::cluster::node::MemberView {
        name: "gw1".into(),
        alive: true,
        ready: true,
        ..Default::default()
    };
    let (s, _) = gateway_status("my-egressgw", Some(1), &state, None, &[member], None);
    assert_eq!(s.active_node_name.as_deref(), Some("gw1"));
    assert_eq!(
        s.conditions[0].reason,
        "ElectionSucceedAndVirtualIPAnnounced"
    );
    let (s, _) = gateway_status("my-egressgw", Some(1), &state, None, &[], None);
    assert_eq!(s.conditions[0].reason, "VirtualIPAnnouncingFailed");
}
