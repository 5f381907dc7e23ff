//! Every program the tests, benchmarks and demo run comes from the install step: listed in
//! `scripts/deps.sh` (program and package), installed by it and by `.ci/run`, and present.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::tools::{listed, which};

fn top() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(top().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The `Command::new("prog")` and `cmd("prog")` / `need("prog")` calls of a Rust file, and the
/// first word of the argument arrays passed to a lab's `exec`/`try_exec` or to `ip netns exec`.
fn programs_in_rust(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pat in ["Command::new(\"", "cmd(\"", "need(\""] {
        for (i, _) in text.match_indices(pat) {
            let rest = &text[i + pat.len()..];
            if let Some(end) = rest.find('"') {
                out.insert(rest[..end].to_string());
            }
        }
    }
    // `exec(&ns, ["prog", ...` and `"exec", &ns, "prog"`, whitespace and newlines ignored.
    for pat in ["exec(", "\"exec\","] {
        for (i, _) in text.match_indices(pat) {
            let window: String = text[i + pat.len()..]
                .chars()
                .take(120)
                .filter(|c| !c.is_whitespace())
                .collect();
            let Some(comma) = window.find(',') else {
                continue;
            };
            let ns = &window[..comma];
            if ns.is_empty() || !ns.chars().all(|c| c.is_alphanumeric() || "&._".contains(c)) {
                continue;
            }
            let rest = window[comma + 1..].trim_start_matches('[');
            if let Some(rest) = rest.strip_prefix('"')
                && let Some(end) = rest.find('"')
            {
                out.insert(rest[..end].to_string());
            }
        }
    }
    out.retain(|p| {
        !p.is_empty()
            && !p.contains('/')
            && !p.chars().any(|c| c.is_ascii_uppercase())
            && !p.contains(' ')
            && p != "netns"
            && p != "exec"
    });
    out
}

#[test]
fn every_program_the_rust_tests_run_is_listed() {
    let listed: BTreeSet<String> = listed("test").into_iter().map(|(p, _)| p).collect();
    let mut unlisted = Vec::new();
    for dir in ["tests", "tests/common", "benches"] {
        for entry in std::fs::read_dir(top().join(dir)).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tools.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            for prog in programs_in_rust(&text) {
                // Arguments that look like programs but are not (nft sub-commands etc.) are
                // only ever found after a listed program; skip the known ones.
                if [
                    "list", "add", "delete", "flush", "-j", "-f", "link", "addr", "route",
                ]
                .contains(&prog.as_str())
                {
                    continue;
                }
                if !listed.contains(&prog) {
                    unlisted.push(format!("{}: {prog}", path.display()));
                }
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "programs run by the tests but not listed in scripts/deps.sh (TEST_TOOLS):\n{}",
        unlisted.join("\n")
    );
}

#[test]
fn every_program_the_demo_runs_in_a_namespace_is_listed() {
    let demo = read("demo.sh");
    let demo_tools: BTreeSet<String> = listed("demo").into_iter().map(|(p, _)| p).collect();
    let mut used = BTreeSet::new();
    for line in demo.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        // `nsx NAMESPACE PROGRAM ...`
        for (i, _) in line.match_indices("nsx ") {
            let mut words = line[i + 4..].split_whitespace();
            let _ns = words.next();
            if let Some(prog) = words.next() {
                let prog = prog.trim_matches('"');
                if !prog.starts_with('$') {
                    used.insert(prog.to_string());
                }
            }
        }
    }
    // Programs of the test profile that the demo may call outside a namespace too.
    let test_only: BTreeSet<String> = listed_words(&demo, &listed("test"));
    used.extend(test_only);
    let missing: Vec<&String> = used.iter().filter(|p| !demo_tools.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "demo.sh runs {missing:?}, which scripts/deps.sh does not list under DEMO_TOOLS"
    );
    assert!(
        used.contains("ping"),
        "the scan found no ping in demo.sh: {used:?}"
    );
}

/// The programs of `tools` that `text` uses as a command word (first word of a line or after a
/// pipe, `;`, `&&` or `$(`).
fn listed_words(text: &str, tools: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        for part in line.split(['|', ';', '&', '(']) {
            if let Some(word) = part.split_whitespace().next()
                && tools.iter().any(|(p, _)| p == word)
            {
                out.insert(word.to_string());
            }
        }
    }
    out
}

#[test]
fn ci_installs_every_listed_package() {
    let ci = read(".ci/run");
    let install = ci
        .lines()
        .skip_while(|l| !l.contains("apt-get install"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut missing = BTreeSet::new();
    for profile in ["test", "demo"] {
        for (prog, pkg) in listed(profile) {
            if !install.split_whitespace().any(|w| w == pkg) {
                missing.insert(format!("{pkg} (for {prog})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        ".ci/run does not install {missing:?}; keep it in step with scripts/deps.sh"
    );
}

#[test]
fn every_listed_program_is_installed() {
    let root = unsafe { libc::geteuid() } == 0;
    let e2e = std::env::var("EGRESSD_E2E").as_deref() == Ok("1");
    let mut missing = Vec::new();
    for profile in ["test", "demo"] {
        for (prog, pkg) in listed(profile) {
            if which(&prog).is_none() {
                missing.push(format!("{prog} (package {pkg})"));
            }
        }
    }
    if !missing.is_empty() && !root && !e2e {
        eprintln!(
            "!!! SKIPPED every_listed_program_is_installed: not root, and missing {missing:?}; \
             scripts/deps.sh installs them"
        );
        return;
    }
    assert!(
        missing.is_empty(),
        "missing after the install step: {missing:?} (scripts/deps.sh installs them)"
    );
}

#[test]
fn the_scanner_finds_what_it_must() {
    let found = programs_in_rust(
        r#"lab.exec(&ns, ["ping", "-c", "1"]); let c = cmd("socat");
           Command::new("promtool"); lab.try_exec(&peer, ["ip", "neigh"]);
           cmd.args(["netns", "exec", &self.wan, "tcpdump", "-tt"]);
           lab.try_exec(
               &cli,
               ["timeout", "3"]);"#,
    );
    let want: BTreeSet<String> = ["ping", "socat", "promtool", "ip", "tcpdump", "timeout"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
}
