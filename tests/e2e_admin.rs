//! The admin API and CLI against a real three-node cluster in network namespaces: apply, get and
//! delete seen in the data plane, authentication, reloads with a valid and an invalid file,
//! metrics against status, events, and the served routes against the OpenAPI document.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::cluster::*;
use common::netns::require_root;
use common::topo::*;

const TOKEN: &str = "e2e-admin-token-0123456789";
const ADMIN: &str = "http://127.0.0.1:7481";

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `curl` in node `i`'s namespace: the status code and the body.
fn curl(c: &Cluster, i: usize, args: &[&str]) -> (u16, String) {
    let mut full: Vec<String> = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    full.extend(args.iter().map(|s| s.to_string()));
    let out = c.topo.lab.try_exec(&c.topo.nodes[i], &full);
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn gateway_names(c: &Cluster, i: usize) -> Vec<String> {
    c.topo
        .status(i)
        .and_then(|s| {
            s["gateways"].as_array().map(|a| {
                a.iter()
                    .filter_map(|g| g["name"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// One sample per metric name and label set, as prometheus-parse reads the exposition.
fn scrape(c: &Cluster, i: usize) -> BTreeMap<String, f64> {
    let (code, body) = curl(c, i, &[&format!("{ADMIN}/metrics")]);
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            Some((format!("{}{{{}}}", s.metric, labels.join(",")), v))
        })
        .collect()
}

/// What `egressd get` shows (gateways and policies) and every member's labels, as node 1 sees
/// them.
fn committed(c: &Cluster) -> (String, String, Vec<serde_json::Value>) {
    let get = |kind: &str| {
        let out = c.topo.cli(1, &["get", kind, "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let labels = c
        .topo
        .status(1)
        .and_then(|s| {
            s["members"]
                .as_array()
                .map(|m| m.iter().map(|x| x["labels"].clone()).collect())
        })
        .unwrap_or_default();
    (get("gateways"), get("policies"), labels)
}

const APPLY: &str = r#"
[[gateway]]
name = "api-gw"
node_selector = { egress = "" }
[gateway.source_ip]
mode = "PrimaryIPFromEgressGatewayNodeInterface"
primary_ip_from_egress_gateway_node_interface = { interface_name = "eth1" }

[[policy]]
name = "api-pol"
egress_gateway_name = "api-gw"
source_cidrs = ["10.77.0.11/32"]
destination_cidrs = ["203.0.113.0/24"]
"#;

#[test]
fn admin_api_and_cli_against_a_running_cluster() {
    if !require_root("admin_api_and_cli_against_a_running_cluster") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (token, extra) = admin_token(TOKEN);
    let mut c = Cluster::start_with("adm", 3, &extra);
    let tok = token.path().display().to_string();

    // --- Served routes agree with the OpenAPI document: every documented operation is routed
    // (no 404/405), and a method the document does not list on a path is 405.
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../docs/openapi.json")).expect("openapi");
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        let concrete = path.replace("{name}", "nosuch");
        for m in ["GET", "POST", "DELETE", "PUT"] {
            let (code, body) = curl(&c, 1, &["-X", m, &format!("{ADMIN}{concrete}")]);
            let documented = ops.get(m.to_lowercase()).is_some();
            if documented {
                assert!(
                    code != 404 || body.contains("no member") || body.contains("no gateway"),
                    "{m} {path}: {code} {body}"
                );
                assert_ne!(code, 405, "{m} {path} is documented but not served");
            } else {
                assert_eq!(code, 405, "{m} {path} is served but not documented: {body}");
            }
        }
    }
    let (code, body) = curl(&c, 0, &[&format!("{ADMIN}/v1/nothing-here")]);
    assert_eq!(code, 404);
    assert!(body.contains("\"error\""), "errors are JSON: {body}");

    // --- Before: the second client address is not SNATed (it reaches the server as itself).
    assert_eq!(
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(CLIENT_OTHER_IP)
    );

    // --- Unauthenticated and wrongly authenticated mutations are refused; nothing changes.
    let apply_json = r#"{"gateways":[],"policies":[{"name":"x","egress_gateway_name":"vip","source_cidrs":["10.77.0.99/32"],"destination_cidrs":["0.0.0.0/0"],"excluded_cidrs":[]}]}"#;
    let index_before = c.topo.status(0).expect("status")["cluster"]["applied_index"].clone();
    let (code, body) = curl(
        &c,
        1,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            apply_json,
            &format!("{ADMIN}/v1/apply"),
        ],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization"), "{body}");
    let (code, body) = curl(
        &c,
        1,
        &[
            "-X",
            "POST",
            "-H",
            "authorization: Bearer wrong-token-wrong-token",
            "-d",
            apply_json,
            &format!("{ADMIN}/v1/apply"),
        ],
    );
    assert_eq!(code, 401, "{body}");
    let (code, _) = curl(
        &c,
        1,
        &["-X", "DELETE", &format!("{ADMIN}/v1/policies/to-wan")],
    );
    assert_eq!(code, 401);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        c.topo.status(0).expect("status")["cluster"]["applied_index"],
        index_before,
        "a refused mutation commits nothing"
    );

    // --- Bad input through the CLI: one-line reason, non-zero exit, nothing changes.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[policy]]\nname = \"p\"\negress_gateway_name = \"missing-gw\"\nsource_cidrs = [\"10.77.0.11/32\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
    )
    .expect("file");
    let out = c.topo.cli(
        2,
        &[
            "apply",
            "-f",
            &bad.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("409") && err.contains("names gateway missing-gw"),
        "{}",
        text(&out)
    );
    let bad_cidr = dir.path().join("bad-cidr.toml");
    std::fs::write(&bad_cidr, APPLY.replace("10.77.0.11/32", "10.77.0.11/33")).expect("file");
    let out = c.topo.cli(
        2,
        &[
            "apply",
            "-f",
            &bad_cidr.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy[0].source_cidrs[0]"),
        "{}",
        text(&out)
    );
    assert_eq!(gateway_names(&c, 0), ["vip"]);

    // --- What the file refuses, the API and the CLI refuse too, each with a message naming the
    // field, and the committed state stays as it was (issue 18).
    let before = committed(&c);
    let auth = format!("authorization: Bearer {TOKEN}");
    let post = |path: &str, content_type: &str, body: &str| {
        curl(
            &c,
            1,
            &[
                "-X",
                "POST",
                "-H",
                &auth,
                "-H",
                &format!("content-type: {content_type}"),
                "--data-binary",
                body,
                &format!("{ADMIN}{path}"),
            ],
        )
    };
    let long = "p".repeat(100_000);
    let long_body = dir.path().join("long.json");
    std::fs::write(
        &long_body,
        format!(
            r#"{{"policies":[{{"name":"{long}","egress_gateway_name":"vip","source_cidrs":["10.77.0.99/32"],"destination_cidrs":["203.0.113.0/24"]}}]}}"#
        ),
    )
    .expect("file");
    let long_arg = format!("@{}", long_body.display());
    let shared_next_hop = format!(
        r#"{{"gateways":[{{"name":"nh-clash","node_selector":{{"egress":""}},"source_ip":{{"mode":"VirtualIPAddress","virtual_ip_address":{{"ip":"203.0.113.77","interfaces":["eth1"]}}}},"next_hop":{{"ip":"{NEXT_HOP}","interface":"eth0"}}}}]}}"#
    );
    for (path, content_type, body, code, needles) in [
        (
            "/v1/apply",
            "application/json",
            r#"{"policies":[{"name":"typo","egress_gateway_name":"vip","source_cidrs":["10.77.0.99/32"],"destination_cidrs":["203.0.113.0/24"],"exclude_cidrs":["203.0.113.20/32"]}]}"#,
            422,
            &["policies[0].exclude_cidrs", "did you mean `excluded_cidrs`"][..],
        ),
        (
            "/v1/apply",
            "application/toml",
            "[[policy]]\nname = \"typo\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\nexclude_cidrs = [\"203.0.113.20/32\"]\n",
            422,
            &["policy[0].exclude_cidrs", "did you mean `excluded_cidrs`"][..],
        ),
        (
            "/v1/apply",
            "application/json",
            &long_arg,
            422,
            &[
                "policies[0].name",
                "is 100000 characters long",
                "more characters)",
            ][..],
        ),
        (
            "/v1/apply",
            "application/json",
            &shared_next_hop,
            409,
            &[NEXT_HOP, "two gateways cannot share one next hop"][..],
        ),
        (
            "/v1/apply",
            "application/json",
            r#"{"policies":[{"name":"p"}"#,
            400,
            &["not valid JSON"][..],
        ),
        (
            "/v1/policies/nope/cidrs",
            "application/json",
            r#"{"add":{"destination_cidrs":["192.0.2.0/24"]}}"#,
            404,
            &["no policy \"nope\""][..],
        ),
        (
            "/v1/policies/nope/cidrs",
            "application/json",
            r#"{"add":{"destination_cidrs":["192.0.2.1/24"]},"remove":{"destination":["192.0.2.0/24"]}}"#,
            422,
            &[
                "add.destination_cidrs[0]",
                "host bits",
                "remove.destination",
            ][..],
        ),
        (
            "/v1/policies/nope/cidrs",
            "application/json",
            r#"{}"#,
            422,
            &["nothing to change"][..],
        ),
        (
            "/v1/nodes/gw1/labels",
            "application/json",
            r#"{"key":"bad key!","value":"x"}"#,
            422,
            &["key: the name of the label key \"bad key!\" contains ' '"][..],
        ),
        (
            "/v1/nodes/gw1/labels",
            "application/json",
            r#"{"key":"zone","value":"a\nb"}"#,
            422,
            &["value: the label value \"a\\nb\" contains '\\n'"][..],
        ),
        (
            "/v1/nodes/gw1/labels",
            "application/json",
            r#"{"key":"zone","valeu":"a"}"#,
            422,
            &["valeu: unknown key; did you mean `value`?"][..],
        ),
    ] {
        let (got, answer) = post(path, content_type, body);
        let what = format!("POST {path} {}", &body[..body.len().min(80)]);
        assert_eq!(got, code, "{what}: {answer}");
        let error: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{what}: {e}: {answer}"));
        let error = error["error"].as_str().unwrap_or_default();
        for needle in needles {
            assert!(error.contains(needle), "{what}: {needle:?} not in {error}");
        }
        assert!(answer.len() < 2_000, "{what}: {} characters", answer.len());
    }
    let bad_label = c.topo.cli(
        2,
        &["node", "label", "gw1", "bad key!=x", "--token-file", &tok],
    );
    let zone_newline = c.topo.cli(
        2,
        &["node", "label", "gw1", "zone=a\nb", "--token-file", &tok],
    );
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[[policy]]\nname = \"typo\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\nexclude_cidrs = [\"203.0.113.20/32\"]\n",
    )
    .expect("file");
    let long_name = dir.path().join("long.toml");
    std::fs::write(
        &long_name,
        format!("[[policy]]\nname = \"{long}\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n"),
    )
    .expect("file");
    let two_next_hops = dir.path().join("next-hops.toml");
    let gateway_with_next_hop = |name: &str, vip: &str| {
        format!(
            "[[gateway]]\nname = \"{name}\"\n[gateway.source_ip]\nmode = \"VirtualIPAddress\"\nvirtual_ip_address = {{ ip = \"{vip}\", interfaces = [\"eth1\"] }}\n[gateway.next_hop]\nip = \"10.77.0.254\"\ninterface = \"eth0\"\n"
        )
    };
    std::fs::write(
        &two_next_hops,
        gateway_with_next_hop("nh1", "203.0.113.71")
            + &gateway_with_next_hop("nh2", "203.0.113.72"),
    )
    .expect("file");
    let apply_file = |f: &Path| {
        c.topo.cli(
            2,
            &[
                "apply",
                "-f",
                &f.display().to_string(),
                "--token-file",
                &tok,
            ],
        )
    };
    for (out, needle) in [
        (
            bad_label,
            "label key: the name of the label key \"bad key!\" contains ' '",
        ),
        (
            zone_newline,
            "label value: the label value \"a\\nb\" contains '\\n'",
        ),
        (
            apply_file(&typo),
            "policy[0].exclude_cidrs: unknown key; did you mean `excluded_cidrs`?",
        ),
        (apply_file(&long_name), "policy[0].name: \"pppp"),
        (
            apply_file(&two_next_hops),
            "gateway[1].next_hop.ip: 10.77.0.254 is already the next hop of gateway \"nh1\" (gateway[0]); two gateways cannot share one next hop",
        ),
    ] {
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{needle:?} not in {}", text(&out));
        assert!(
            err.len() < 2_000,
            "{} characters: {}",
            err.len(),
            &err[..300]
        );
    }
    assert_eq!(
        committed(&c),
        before,
        "a refused change changed the committed state"
    );
    // Optional fields are optional in JSON too: a policy without excluded_cidrs is taken.
    let (got, answer) = post(
        "/v1/apply",
        "application/json",
        r#"{"policies":[{"name":"json-pol","egress_gateway_name":"vip","source_cidrs":["10.77.0.99/32"],"destination_cidrs":["203.0.113.0/24"]}]}"#,
    );
    assert_eq!(got, 200, "{answer}");
    let out = c
        .topo
        .cli(2, &["delete", "policy", "json-pol", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(committed(&c), before);

    // --- Apply on a follower (forwarded to the leader): seen in the active node's data plane.
    c.ensure_leader_is_not("gw3");
    let file = dir.path().join("apply.toml");
    std::fs::write(&file, APPLY).expect("file");
    let t = std::time::Instant::now();
    let out = c.topo.cli(
        2,
        &[
            "apply",
            "-f",
            &file.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    let apply_took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("applied"),
        "{}",
        text(&out)
    );
    println!("apply through a follower: {apply_took:?} (CLI start to committed answer)");
    // Read your writes: the follower that took the apply answered once it had applied it.
    let out = c.topo.cli(2, &["get", "gateways", "--json"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"api-gw\""),
        "{}",
        text(&out)
    );
    wait_for("the applied gateway everywhere", WAIT, || {
        (0..3).all(|i| gateway_names(&c, i) == ["api-gw", "vip"])
    });
    let gw1_wan = node_wan_ip(0);
    wait_for("the applied policy SNATs to gw1's eth1", WAIT, || {
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() == Some(gw1_wan.as_str())
    });

    // --- CIDRs out of a policy and back in (`egressd policy remove-cidrs|add-cidrs`): only the
    // change is committed, and the data plane follows it.
    let cidrs = |verb: &str, source: &str| {
        let out = c.topo.cli(
            2,
            &[
                "policy",
                verb,
                "api-pol",
                "--source",
                source,
                "--token-file",
                &tok,
            ],
        );
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out, said)
    };
    let (out, _) = cidrs("remove-cidrs", "10.77.0.11/32");
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("409") && err.contains("leave source_cidrs empty"),
        "{}",
        text(&out)
    );
    for (verb, source, answer) in [
        ("add-cidrs", "10.77.0.12/32", "policy/api-pol: changed"),
        ("remove-cidrs", "10.77.0.11/32", "policy/api-pol: changed"),
        ("remove-cidrs", "10.77.0.11/32", "policy/api-pol: unchanged"),
    ] {
        let (out, said) = cidrs(verb, source);
        assert!(out.status.success(), "{verb} {source}: {}", text(&out));
        assert_eq!(said, answer, "{verb} {source}");
    }
    wait_for("the removed source leaves unchanged", WAIT, || {
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() == Some(CLIENT_OTHER_IP)
    });
    for (verb, source) in [
        ("add-cidrs", "10.77.0.11/32"),
        ("remove-cidrs", "10.77.0.12/32"),
    ] {
        let (out, said) = cidrs(verb, source);
        assert!(out.status.success(), "{verb} {source}: {}", text(&out));
        assert_eq!(said, "policy/api-pol: changed", "{verb} {source}");
    }
    wait_for(
        "the source added back SNATs to gw1's eth1 again",
        WAIT,
        || c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() == Some(gw1_wan.as_str()),
    );
    let out = c.topo.cli(0, &["get", "policies", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let pol = v
        .as_array()
        .and_then(|a| a.iter().find(|p| p["object"]["name"] == "api-pol"))
        .unwrap_or_else(|| panic!("api-pol in {v}"));
    assert_eq!(
        (&pol["object"]["source_cidrs"], &pol["origin"]),
        (
            &serde_json::json!(["10.77.0.11/32"]),
            &serde_json::json!("api")
        ),
        "{pol}"
    );

    let out = c.topo.cli(1, &["get", "gateways"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("api-gw") && l.contains(" api ")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("vip") && l.contains(" file ")),
        "{listing}"
    );
    let out = c.topo.cli(1, &["get", "policies", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(2), "{v}");

    // --- The cluster refuses, whole, what would break a rule across sources: an applied
    // gateway with the file gateway's VIP, and a reload that would leave an applied policy
    // without its gateway.
    let clash = dir.path().join("clash.toml");
    std::fs::write(
        &clash,
        format!(
            "[[gateway]]\nname = \"clash\"\nnode_selector = {{ egress = \"\" }}\n[gateway.source_ip]\nmode = \"VirtualIPAddress\"\nvirtual_ip_address = {{ ip = \"{VIP}\", interfaces = [\"eth1\"] }}\n"
        ),
    )
    .expect("file");
    let out = c.topo.cli(
        2,
        &[
            "apply",
            "-f",
            &clash.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("409") && err.contains(VIP), "{}", text(&out));
    let on_vip = dir.path().join("on-vip.toml");
    std::fs::write(
        &on_vip,
        "[[policy]]\nname = \"api-on-vip\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n",
    )
    .expect("file");
    let out = c.topo.cli(
        2,
        &[
            "apply",
            "-f",
            &on_vip.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let original = std::fs::read_to_string(&c.configs[1]).expect("config");
    let no_objects = original
        .split("[[gateway]]")
        .next()
        .expect("config head")
        .to_string();
    std::fs::write(&c.configs[1], &no_objects).expect("config");
    c.signal("gw2", "HUP");
    wait_for("the cluster's refusal in gw2's status", WAIT, || {
        c.topo.status(1).is_some_and(|s| {
            s["config"]["last_reload_errors"]
                .to_string()
                .contains("refused")
        })
    });
    let errs = c.topo.status(1).expect("status")["config"]["last_reload_errors"].to_string();
    assert!(errs.contains("api-on-vip"), "{errs}");
    assert_eq!(gateway_names(&c, 0), ["api-gw", "vip"], "nothing changed");
    std::fs::write(&c.configs[1], &original).expect("config");
    c.signal("gw2", "HUP");
    wait_for("the next good reload clears the error", WAIT, || {
        c.topo
            .status(1)
            .is_some_and(|s| s["config"]["last_reload_errors"] == serde_json::json!([]))
    });
    let out = c
        .topo
        .cli(2, &["delete", "policy", "api-on-vip", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));

    // A gateway in use cannot be deleted; the policy first, then the gateway.
    let out = c
        .topo
        .cli(2, &["delete", "gateway", "api-gw", "--token-file", &tok]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("used by policies api-pol"),
        "{}",
        text(&out)
    );
    let out = c
        .topo
        .cli(2, &["delete", "policy", "api-pol", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the deleted policy no longer SNATs", WAIT, || {
        c.topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref() == Some(CLIENT_OTHER_IP)
    });
    let out = c
        .topo
        .cli(2, &["delete", "gateway", "api-gw", "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    let out = c
        .topo
        .cli(2, &["delete", "gateway", "api-gw", "--token-file", &tok]);
    assert!(!out.status.success(), "deleting twice: {}", text(&out));
    wait_for("only the file's gateway left", WAIT, || {
        (0..3).all(|i| gateway_names(&c, i) == ["vip"])
    });
    c.assert_traffic_via_vip();

    // --- SIGHUP with an invalid file: rejected, errors in status, the running config stays.
    let good = std::fs::read_to_string(&c.configs[1]).expect("config");
    std::fs::write(
        &c.configs[1],
        good.replace("203.0.113.0/24", "203.0.113.0/99"),
    )
    .expect("w");
    c.signal("gw2", "HUP");
    wait_for("the rejected reload in gw2's status", WAIT, || {
        c.topo.status(1).is_some_and(|s| {
            s["config"]["last_reload_errors"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        })
    });
    let errs = c.topo.status(1).expect("status")["config"]["last_reload_errors"].to_string();
    assert!(errs.contains("destination_cidrs"), "{errs}");
    assert!(c.topo.log(1).contains("configuration reload rejected"));
    assert_eq!(gateway_names(&c, 1), ["vip"]);
    c.assert_traffic_via_vip();
    // A valid file: committed, and the error is gone. The change (an extra excluded range) is
    // visible cluster-wide.
    std::fs::write(
        &c.configs[1],
        good.replace(
            "destination_cidrs = [\"203.0.113.0/24\"]",
            "destination_cidrs = [\"203.0.113.0/24\"]\nexcluded_cidrs = [\"203.0.113.20/32\"]",
        ),
    )
    .expect("w");
    c.signal("gw2", "HUP");
    wait_for("the valid reload committed everywhere", WAIT, || {
        (0..3).all(|i| {
            let out = c.topo.cli(i, &["get", "policies", "--json"]);
            String::from_utf8_lossy(&out.stdout).contains("203.0.113.20/32")
        })
    });
    let s1 = c.topo.status(1).expect("status");
    assert_eq!(s1["config"]["last_reload_errors"], serde_json::json!([]));
    // gw1's and gw3's files still have the old policy: their drift shows it, gw2's is clean.
    wait_for("drift on gw1, none on gw2", WAIT, || {
        let d0 = c.topo.status(0).map(|s| s["config"]["drift"].to_string());
        let d1 = c.topo.status(1).map(|s| s["config"]["drift"].clone());
        d0.is_some_and(|d| d.contains("policy to-wan: the file differs"))
            && d1 == Some(serde_json::json!([]))
    });

    // --- Metrics agree with status.
    let m = scrape(&c, 0);
    let s = c.topo.status(0).expect("status");
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing; have {:?}", m.keys().collect::<Vec<_>>()))
    };
    assert_eq!(get("egressd_gateway_active{gateway=vip,node=gw1}"), 1.0);
    assert_eq!(get("egressd_gateway_active{gateway=vip,node=gw2}"), 0.0);
    // Once seen 0 in a full run (not reproduced alone): say why if it happens again.
    let held = get("egressd_gateway_held{gateway=vip}");
    if held != 1.0 {
        let log = c.topo.log(0);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "gw1 does not hold vip: status {}\nlog (newest first):\n{}",
            s,
            tail.join("\n")
        );
    }
    assert_eq!(get("egressd_ready{}"), 1.0);
    assert_eq!(get("egressd_config_drift{}"), 1.0);
    assert_eq!(
        get("egressd_raft_term{}"),
        s["cluster"]["term"].as_f64().expect("term")
    );
    assert_eq!(
        get("egressd_gateway_failovers_total{gateway=vip}"),
        s["gateways"][0]["failovers"].as_f64().expect("failovers")
    );
    assert!(get("egressd_announcements_total{family=ipv4}") >= 3.0);
    assert!(get("egressd_nft_apply_duration_seconds_count{}") >= 1.0);
    let leader = c.leader();
    let li = c.index(&leader);
    let ml = scrape(&c, li);
    assert_eq!(ml["egressd_raft_is_leader{}"], 1.0);
    assert_eq!(ml["egressd_gateway_eligible_nodes{gateway=vip}"], 3.0);

    // --- Status on a follower carries the leader's view; events list what happened.
    let follower = (0..3).find(|i| *i != li).expect("a follower");
    let s = c.topo.status(follower).expect("status");
    assert_eq!(s["members"].as_array().map(|a| a.len()), Some(3), "{s}");
    assert_eq!(
        s["gateways"][0]["eligible"],
        serde_json::json!(["gw1", "gw2", "gw3"])
    );
    let out = c.topo.cli(follower, &["status", "--events"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    for needle in [
        "EVENTS",
        "elected",
        "applied: gateways +1",
        "gateway api-gw deleted",
        "configuration file reloaded",
    ] {
        assert!(shown.contains(needle), "{needle} not in\n{shown}");
    }
    let rejected = c.topo.cli(1, &["status", "--events"]);
    assert!(
        String::from_utf8_lossy(&rejected.stdout).contains("config_rejected"),
        "{}",
        text(&rejected)
    );
    assert!(Path::new(&c.configs[1]).exists());
}
