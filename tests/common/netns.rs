//! Throw-away network labs in network namespaces for tests and benchmarks.
//!
//! Every namespace of a lab has a name unique to this process and lab, nothing is ever connected
//! to the host's own interfaces, and everything (processes, then namespaces, which takes their
//! veths and bridges with them) is removed when the `Lab` is dropped, also when a test panics.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::tools;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// True when the test may run. When not root: skip loudly, or fail when `EGRESSD_E2E=1`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("EGRESSD_E2E").as_deref() == Ok("1") {
        panic!("{test}: needs root for network namespaces, and EGRESSD_E2E=1 forbids skipping");
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED {test}: not root; network-namespace tests need root.\n\
         !!! Run as root (CI sets EGRESSD_E2E=1, which turns this skip into a failure).\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// `tag` names the test in the namespace names (keep it short).
    pub fn new(tag: &str) -> Lab {
        let n = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("egt{}x{}-{}", std::process::id(), n, tag);
        Lab {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Creates a namespace with `lo` up and returns its full name.
    pub fn ns(&mut self, short: &str) -> String {
        let name = format!("{}-{}", self.prefix, short);
        run(tools::cmd("ip").args(["netns", "add", &name]));
        self.namespaces.push(name.clone());
        self.exec(&name, ["ip", "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair with one end in each namespace, both up. Created inside `ns_a`, so nothing
    /// ever appears in the host's namespace.
    pub fn veth(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) {
        self.exec(
            ns_a,
            [
                "ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
            ],
        );
        self.exec(ns_a, ["ip", "link", "set", if_a, "up"]);
        self.exec(ns_b, ["ip", "link", "set", if_b, "up"]);
    }

    /// Client (10.201.0.2) — gateway (10.201.0.1 | 10.202.0.1, forwarding on) — server
    /// (10.202.0.2), the client routing the server's network through the gateway. Returns the
    /// three namespaces.
    pub fn three_hop(&mut self) -> (String, String, String) {
        let cli = self.ns("cli");
        let gw = self.ns("gw");
        let srv = self.ns("srv");
        self.veth(&cli, "eth0", &gw, "c0");
        self.veth(&gw, "s0", &srv, "eth0");
        self.exec(&cli, ["ip", "addr", "add", "10.201.0.2/24", "dev", "eth0"]);
        self.exec(&gw, ["ip", "addr", "add", "10.201.0.1/24", "dev", "c0"]);
        self.exec(&gw, ["ip", "addr", "add", "10.202.0.1/24", "dev", "s0"]);
        self.exec(&srv, ["ip", "addr", "add", "10.202.0.2/24", "dev", "eth0"]);
        self.exec(
            &cli,
            ["ip", "route", "add", "10.202.0.0/24", "via", "10.201.0.1"],
        );
        self.exec(&gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        (cli, gw, srv)
    }

    /// A bridge inside `ns` with the given (already existing) ports.
    pub fn bridge(&self, ns: &str, name: &str, ports: &[&str]) {
        self.exec(ns, ["ip", "link", "add", name, "type", "bridge"]);
        // Forward at once instead of waiting through STP learning.
        self.exec(
            ns,
            [
                "ip",
                "link",
                "set",
                name,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ],
        );
        for p in ports {
            self.exec(ns, ["ip", "link", "set", p, "master", name]);
        }
        self.exec(ns, ["ip", "link", "set", name, "up"]);
    }

    /// Runs a command in `ns` and panics with its stderr when it fails.
    pub fn exec<I, S>(&self, ns: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        if let Some(prog) = args.first() {
            tools::need(&prog.as_ref().to_string_lossy());
        }
        run(tools::cmd("ip").args(["netns", "exec", ns]).args(args))
    }

    /// Runs a command in `ns` and returns its output whatever its exit code.
    pub fn try_exec<I, S>(&self, ns: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        if let Some(prog) = args.first() {
            tools::need(&prog.as_ref().to_string_lossy());
        }
        let out = tools::cmd("ip")
            .args(["netns", "exec", ns])
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
        // `ip netns exec` exits 255 when it cannot run the program at all: that is never an
        // answer a test may interpret.
        if out.status.code() == Some(255)
            && String::from_utf8_lossy(&out.stderr).contains("exec of")
        {
            panic!(
                "could not run {:?} in {ns}: {}",
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy())
                    .collect::<Vec<_>>(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// Starts a long-running process in `ns`; it is killed when the lab is dropped. Returns its
    /// index for `child`.
    pub fn spawn(&mut self, ns: &str, cmd: Command) -> usize {
        let prog = cmd.get_program().to_owned();
        tools::need(&prog.to_string_lossy());
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(prog).args(args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped.stdin(Stdio::null());
        let child = wrapped
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn in {ns}: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts a prepared command (which must enter its namespace itself, e.g. through
    /// `ip netns exec`); it is killed when the lab is dropped.
    pub fn spawn_raw(&mut self, mut cmd: Command) -> usize {
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index]
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            // Kill whatever a test left running in the namespace (e.g. a grandchild), then drop
            // the namespace; its veths and bridges go with it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    out
}
