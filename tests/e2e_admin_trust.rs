//! The admin endpoint's secrets and exposure, with a real daemon in a network namespace: the
//! token file is re-read on SIGHUP (the old token stops working, the new one works) and refused
//! when others may read it (at start, by check-config, on reload — which keeps the last good
//! token); `[admin.tls]` serves HTTPS that the CLI verifies with `--ca-file`; limits before
//! trust: an unauthenticated body is refused on its headers, an oversized one with 413, a
//! trickled one with 408 after the body timeout. Root only: skips loudly otherwise, fails
//! instead when EGRESSD_E2E=1.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use common::cluster::*;
use common::netns::require_root;
use common::topo::*;

const OLD_TOKEN: &str = "e2e-old-admin-token-0123456789";
const NEW_TOKEN: &str = "e2e-new-admin-token-9876543210";

fn out_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn the_admin_token_is_reread_on_sighup_and_refused_when_others_may_read_it() {
    if !require_root("the_admin_token_is_reread_on_sighup_and_refused_when_others_may_read_it") {
        return;
    }
    let (token, admin) = admin_token(OLD_TOKEN);
    let mut c = Cluster::start_with("atok", 1, &admin);
    let live = token.path().to_path_buf();
    let dir = c.topo.dir.path().to_path_buf();
    let old = dir.join("old.token");
    std::fs::write(&old, OLD_TOKEN).expect("old token");
    chmod(&old, 0o600);
    let cordon = |c: &Cluster, verb: &str, token: &Path| {
        c.topo.cli(
            0,
            &[
                "node",
                verb,
                "gw1",
                "--token-file",
                &token.display().to_string(),
            ],
        )
    };
    let out = cordon(&c, "cordon", &old);
    assert!(out.status.success(), "{}", out_text(&out));

    // A new token in the file, SIGHUP: the old one is refused, the new one works.
    std::fs::write(&live, format!("{NEW_TOKEN}\n")).expect("new token");
    c.signal("gw1", "HUP");
    wait_for("the token reloaded", WAIT, || {
        c.topo.log(0).contains("admin token reloaded")
    });
    let out = cordon(&c, "uncordon", &old);
    assert!(!out.status.success(), "the old token still works");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong admin token"),
        "{}",
        out_text(&out)
    );
    let out = cordon(&c, "uncordon", &live);
    assert!(out.status.success(), "{}", out_text(&out));

    // Readable by others: the reload is refused and the last good token stays in force.
    chmod(&live, 0o644);
    c.signal("gw1", "HUP");
    wait_for("the reload refused", WAIT, || {
        c.topo
            .log(0)
            .lines()
            .any(|l| l.contains("reload rejected") && l.contains("others may access"))
    });
    let out = cordon(&c, "cordon", &live);
    assert!(out.status.success(), "{}", out_text(&out));
    let cfg = c.configs[0].display().to_string();
    let out = c.topo.lab.try_exec(
        &c.topo.nodes[0],
        [
            env!("CARGO_BIN_EXE_egressd"),
            "check-config",
            "--config",
            &cfg,
        ],
    );
    assert!(!out.status.success(), "check-config accepted it");
    assert!(
        out_text(&out).contains("admin.token_file") && out_text(&out).contains("mode 0644"),
        "{}",
        out_text(&out)
    );
    // And a start with it is refused before anything is bound or touched.
    let out = c.topo.lab.try_exec(
        &c.topo.nodes[0],
        [env!("CARGO_BIN_EXE_egressd"), "run", "--config", &cfg],
    );
    assert!(!out.status.success(), "a start with it: {}", out_text(&out));
    assert!(
        out_text(&out).contains("others may access the admin token"),
        "{}",
        out_text(&out)
    );
    // The token never reaches the log.
    let log = c.topo.log(0);
    assert!(
        !log.contains(OLD_TOKEN) && !log.contains(NEW_TOKEN),
        "a token in the log"
    );
}

/// `[admin.tls]`: HTTPS verified by the CLI, and the limits on the admin listener.
#[test]
fn admin_tls_and_limits_before_trust() {
    if !require_root("admin_tls_and_limits_before_trust") {
        return;
    }
    let (token, admin) = admin_token(OLD_TOKEN);
    let mut topo = Topo::new("atls", 1);
    let dir = topo.dir.path().to_path_buf();
    // The endpoint's certificate, reached as 127.0.0.1, from the cluster CA.
    issue_cert(&dir, "gw1-admin", &["--san", "127.0.0.1"]);
    let d = dir.display();
    let extra = format!(
        "{admin}\n[admin.tls]\ncert_file = \"{d}/tls/certs/gw1-admin.pem\"\nkey_file = \"{d}/tls/certs/gw1-admin-key.pem\"\n"
    );
    let cfg = topo.write_config(0, &config(&topo, 1, 0, true, &extra));
    topo.start_echo_server();
    topo.start_egressd(0, &cfg);
    let ca = format!("{d}/tls/ca/ca.pem");
    let url = "https://127.0.0.1:7481";
    let egressd = |args: &[&str]| {
        let mut full = vec![env!("CARGO_BIN_EXE_egressd")];
        full.extend(args);
        // No config file: only what the command line says.
        full.extend(["--config", "/nonexistent.toml"]);
        topo.lab.try_exec(&topo.nodes[0], full)
    };
    wait_for("status over HTTPS with the CA", WAIT, || {
        egressd(&["status", "--json", "--admin", url, "--ca-file", &ca])
            .status
            .success()
    });
    let out = egressd(&["status", "--admin", url]);
    assert!(
        !out.status.success(),
        "HTTPS without the CA: {}",
        out_text(&out)
    );
    let out = egressd(&["status", "--admin", "http://127.0.0.1:7481"]);
    assert!(!out.status.success(), "plain HTTP: {}", out_text(&out));

    // curl in the node's namespace: (status, seconds).
    let curl = |args: &[&str]| -> (String, f64) {
        let mut full: Vec<&str> = vec![
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            "--cacert",
            &ca,
        ];
        full.extend(args);
        let t = Instant::now();
        let out = topo.lab.try_exec(&topo.nodes[0], &full);
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            t.elapsed().as_secs_f64(),
        )
    };
    let apply = format!("{url}/v1/apply");
    let auth = format!("Authorization: Bearer {OLD_TOKEN}");
    // A body larger than the apply limit (24 MiB).
    let big = dir.join("big.json");
    {
        let f = std::fs::File::create(&big).expect("big");
        f.set_len(30 * 1024 * 1024).expect("size");
    }
    let big_arg = format!("@{}", big.display());
    let json = "Content-Type: application/json";
    let (code, _) = curl(&["-X", "POST", "-H", json, "--data-binary", &big_arg, &apply]);
    assert_eq!(code, "401", "a large body without the token");
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        &auth,
        "--data-binary",
        &big_arg,
        &apply,
    ]);
    assert_eq!(code, "413", "a body over the limit with the token");
    // Every route but apply takes small bodies only.
    let label = format!("{url}/v1/nodes/gw1/labels");
    let medium = dir.join("medium.json");
    std::fs::write(&medium, vec![b' '; 100 * 1024]).expect("medium");
    // `Expect`: the 413 comes before the body is read (see e2e_peer_trust).
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        &auth,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", medium.display()),
        &label,
    ]);
    assert_eq!(code, "413", "100 KiB to the label route");
    // A trickled body: given up on after the body timeout (5 s), long before it would arrive.
    let (code, secs) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        &auth,
        "--limit-rate",
        "2K",
        "--data-binary",
        &format!("@{}", medium.display()),
        &apply,
    ]);
    assert_eq!(code, "408", "a trickled body");
    assert!(secs < 10.0, "the trickled body was waited for {secs:.1} s");
    // And the endpoint still serves.
    let out = egressd(&["status", "--admin", url, "--ca-file", &ca]);
    assert!(out.status.success(), "{}", out_text(&out));
    drop(token);
}
