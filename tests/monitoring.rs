//! The shipped monitoring files: every metric they use is one the daemon exports, the dashboard
//! is well-formed, and the alert rules pass `promtool check rules`.

use std::collections::BTreeSet;

const ALERTS: &str = include_str!("../packaging/monitoring/egressd-alerts.yml");
const DASHBOARD: &str = include_str!("../packaging/monitoring/grafana-dashboard.json");

/// Metric names the daemon exports, with the suffixes Prometheus derives (counters' `_total`,
/// histograms' `_bucket`, `_sum`, `_count`).
fn exported() -> BTreeSet<String> {
    // Families print nothing until they have a series: give each one.
    let m = egressd::metrics::Metrics::new();
    let mut status = egressd::status::Status {
        node: "gw1".into(),
        ..Default::default()
    };
    status.cluster.leader = Some("gw1".into());
    status.cluster.members = vec!["gw1".into()];
    status.gateways = vec![egressd::status::GatewayStatus {
        name: "g".into(),
        last_failover_detect_ms: Some(1),
        ..Default::default()
    }];
    let mut actions = std::collections::BTreeMap::new();
    actions.insert("dropped".to_string(), Default::default());
    status.dataplane.traffic.insert("g".into(), actions);
    let mut state = egressd::cluster::ClusterState::default();
    state.stats.insert("g".into(), Default::default());
    m.observe(&status, &state);
    m.announced(false);
    m.init_repairs("egressd");
    let text = m.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        }
    }
    names
}

fn used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("egressd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn monitoring_files_use_only_exported_metrics() {
    let exported = exported();
    assert!(exported.contains("egressd_gateway_active"), "{exported:?}");
    for (file, text) in [("alerts", ALERTS), ("dashboard", DASHBOARD)] {
        let used = used(text);
        assert!(!used.is_empty(), "{file} uses no metric");
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the daemon does not export: {unknown:?}"
        );
    }
}

#[test]
fn dashboard_is_wellformed() {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("egressd_")));
        }
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "rules", "packaging/monitoring/egressd-alerts.yml"])
        .output()
    else {
        if std::env::var("EGRESSD_E2E").as_deref() == Ok("1") {
            panic!(
                "promtool is missing (Debian package prometheus) and EGRESSD_E2E=1 forbids skipping"
            );
        }
        eprintln!(
            "SKIPPED alert_rules_pass_promtool: promtool not installed (apt-get install prometheus)"
        );
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS: 11 rules found"), "{said}");
}
