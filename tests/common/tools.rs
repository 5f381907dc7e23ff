//! The external programs the tests and benchmarks run. One list, `scripts/deps.sh`, says which
//! programs exist for them and which package brings each; a helper that runs a program first asks
//! [`need`], which fails at once, naming the package, when the program is missing or not listed.
//! So "could not run" is never read as "not reachable".
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn top() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `(program, package)` of a profile of `scripts/deps.sh` ("test" or "demo").
pub fn listed(profile: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(top().join("scripts/deps.sh"))
        .unwrap_or_else(|e| panic!("cannot read scripts/deps.sh: {e}"));
    let var = match profile {
        "test" => "TEST_TOOLS=\"",
        "demo" => "DEMO_TOOLS=\"",
        other => panic!("no profile {other} in scripts/deps.sh"),
    };
    let start = text
        .find(var)
        .unwrap_or_else(|| panic!("scripts/deps.sh has no {var}"));
    let body = &text[start + var.len()..];
    let body = &body[..body.find('"').expect("closing quote of the tool list")];
    body.split_whitespace()
        .map(|e| {
            let (prog, pkg) = e
                .split_once(':')
                .unwrap_or_else(|| panic!("scripts/deps.sh: {e:?} is not program:package"));
            (prog.to_string(), pkg.to_string())
        })
        .collect()
}

fn test_tools() -> &'static Vec<(String, String)> {
    static TOOLS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    TOOLS.get_or_init(|| listed("test"))
}

/// Where `prog` is on PATH, if it is.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Panics unless `prog` is listed in `scripts/deps.sh` (test profile) and installed. Paths (a
/// built binary, a script of the repository) are not external programs and pass.
pub fn need(prog: &str) {
    if prog.contains('/') {
        return;
    }
    let Some((_, pkg)) = test_tools().iter().find(|(p, _)| p == prog) else {
        panic!(
            "the tests run {prog:?}, which is not listed in scripts/deps.sh (TEST_TOOLS): add \
             \"{prog}:<package>\" there and to .ci/run, so that a fresh machine installs it"
        );
    };
    if which(prog).is_none() {
        panic!(
            "{prog:?} is not installed (package {pkg}); run scripts/deps.sh as root, which \
             installs every program the tests use"
        );
    }
}

/// `Command::new(prog)` after [`need`].
pub fn cmd(prog: &str) -> Command {
    need(prog);
    Command::new(prog)
}
