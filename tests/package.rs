//! The systemd unit and the Debian package.
//!
//! - `systemd_unit_verifies_and_is_hardened`: `systemd-analyze verify` says nothing about
//!   `systemd/egressd.service` (it exits 0 for unknown keys and bad values, so any output is a
//!   failure), and `systemd-analyze security` rates it at most 2.0. Any user.
//! - `deb_installs_boots_upgrades_and_purges_cleanly`: builds the .deb from this build's binary
//!   (`packaging/build-deb.sh`) and runs `packaging/install-test.sh` on it: a fresh
//!   `debootstrap --variant=minbase bookworm` root, dpkg -i and apt for the dependencies, the
//!   installed paths, a boot with systemd as PID 1 (systemd-nspawn) reaching active (running)
//!   with its STATUS= line, upgrade, rollback, remove and purge back to the original file list.
//!   Root, debootstrap, systemd-container and a Debian mirror; about 40 s here. Skips loudly
//!   when not root; with EGRESSD_E2E=1 it fails instead, and so does a boot that cannot happen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn top() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn e2e() -> bool {
    std::env::var("EGRESSD_E2E").as_deref() == Ok("1")
}

/// Skips loudly, or fails when EGRESSD_E2E=1.
fn skip(test: &str, why: &str) {
    if e2e() {
        panic!("{test}: {why}, and EGRESSD_E2E=1 forbids skipping");
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED {test}: {why}.\n\
         !!! (CI sets EGRESSD_E2E=1, which turns this skip into a failure.)\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The unit with `/usr/bin/egressd` pointing at this build's binary, in a temp dir (verify
/// checks that the commands exist).
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(top().join("systemd/egressd.service")).expect("the unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/egressd run"),
        "the unit starts /usr/bin/egressd run"
    );
    let path = dir.join("egressd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/egressd", env!("CARGO_BIN_EXE_egressd")),
    )
    .expect("writing the unit copy");
    path
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let test = "systemd_unit_verifies_and_is_hardened";
    if !have("systemd-analyze") {
        return skip(test, "systemd-analyze is missing (apt-get install systemd)");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_copy(dir.path());

    let (ok, out) = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .current_dir(dir.path()));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify must be silent about the unit:\n{out}"
    );

    // The man pages the unit's Documentation= names are the ones the binary generates.
    let man = dir.path().join("man");
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_egressd"))
        .args(["man", "--out-dir"])
        .arg(&man));
    assert!(ok, "egressd man: {out}");
    let text = std::fs::read_to_string(&unit).expect("unit");
    for page in text
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|d| d.strip_prefix("man:"))
    {
        let file = page.replace('(', ".").replace(')', "");
        assert!(
            man.join(&file).is_file(),
            "Documentation= names {page}, but `egressd man` makes no {file}"
        );
    }

    let (ok, out) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .current_dir(dir.path()));
    assert!(ok, "systemd-analyze security failed:\n{out}");
    let score: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for egressd.service: ")
                .nth(1)
        })
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    println!("systemd-analyze security: exposure {score}");
    assert!(
        score <= 2.0,
        "exposure {score} > 2.0 (README says 1.8): what got weaker?\n{out}"
    );
}

#[test]
fn deb_installs_boots_upgrades_and_purges_cleanly() {
    let test = "deb_installs_boots_upgrades_and_purges_cleanly";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(
            test,
            "not root; installing into a debootstrap root needs root",
        );
    }
    for tool in ["debootstrap", "systemd-nspawn", "dpkg-deb"] {
        if !have(tool) {
            return skip(
                test,
                &format!("{tool} is missing (scripts/deps.sh installs it)"),
            );
        }
    }
    let started = Instant::now();
    let out = tempfile::tempdir().expect("temp dir");
    let build = |revision: &str| {
        let (ok, text) = run(Command::new(top().join("packaging/build-deb.sh"))
            .args([
                "--binary",
                env!("CARGO_BIN_EXE_egressd"),
                "--fast",
                // The test's binary is built with the features of the test run.
                "--without-kubernetes",
            ])
            .args(["--revision", revision])
            .arg("--out")
            .arg(out.path()));
        assert!(ok, "build-deb.sh failed:\n{text}");
        text.trim().lines().last().unwrap_or_default().to_string()
    };
    let first = build("1");
    let next = build("2");
    let built = started.elapsed();

    let mut cmd = Command::new(top().join("packaging/install-test.sh"));
    cmd.args([&first, &next]);
    if e2e() {
        cmd.env("EGRESSD_INSTALL_TEST_BOOT", "require");
    }
    let (ok, text) = run(&mut cmd);
    println!("{text}");
    assert!(ok, "packaging/install-test.sh failed:\n{text}");
    assert!(
        !text.contains("SKIPPED the boot check") || !e2e(),
        "the boot check was skipped"
    );
    println!(
        "install test: packages built in {:.1} s, whole test {:.1} s",
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
