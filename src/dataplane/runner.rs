//! Running `nft` (native syntax on stdin) and sending netlink element batches on a persistent
//! socket: the two ways egressd changes its nftables tables. One runner per owner (the SNAT
//! tables, the fence), each with its own socket, so that a long SNAT load never delays a lease
//! renewal.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::nfnl::{self, Batch};
use super::{Error, Result};

/// Longest nft stderr kept in an error: enough for a few error messages, not for a flood.
const MAX_DETAIL: usize = 4000;

/// A script for nft's stdin: ready, or made at the moment it is written.
pub enum Script<'a> {
    Text(&'a str),
    Late(Box<dyn FnOnce() -> String + Send + 'a>),
}

pub fn clip(s: &str) -> String {
    if s.len() <= MAX_DETAIL {
        return s.to_owned();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} […{} more bytes]", &s[..end], s.len() - end)
}

/// Runs `nft` and owns one netlink socket.
#[derive(Debug)]
pub struct NftRunner {
    /// Program and leading arguments; `["nft"]` for the daemon, e.g.
    /// `["ip", "netns", "exec", NS, "nft"]` for tests and benchmarks.
    command: Vec<String>,
    /// Network namespace (`/run/netns/NAME`) of the netlink socket; `None`: this process's.
    netns: Option<String>,
    /// The persistent netlink socket, opened on first use and after a socket error.
    socket: Option<nfnl::Socket>,
    transactions: u64,
}

impl NftRunner {
    /// Runs `nft` from `PATH`; the socket is opened in this process's network namespace.
    pub fn new() -> NftRunner {
        NftRunner {
            command: vec!["nft".to_owned()],
            netns: None,
            socket: None,
            transactions: 0,
        }
    }

    /// The same inside network namespace `netns` (as `ip netns` names it): `nft` runs through
    /// `ip netns exec`, and the netlink socket is opened in the namespace. For tests and
    /// benchmarks.
    pub fn in_netns(netns: &str) -> NftRunner {
        NftRunner {
            command: ["ip", "netns", "exec", netns, "nft"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            netns: Some(netns.to_owned()),
            socket: None,
            transactions: 0,
        }
    }

    /// How many kernel transactions (nft scripts and netlink batches) were sent, successful or
    /// not.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Runs the nft command with `args`, feeding `stdin` when given; returns stdout.
    pub async fn run(
        &self,
        op: &'static str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        self.run_script(op, args, stdin.map(Script::Text)).await
    }

    /// Like `run`, with a script that may be written only once nft has started (see `Script`).
    pub async fn run_script(
        &self,
        op: &'static str,
        args: &[&str],
        stdin: Option<Script<'_>>,
    ) -> Result<String> {
        let Some((program, prefix)) = self.command.split_first() else {
            return Err(Error::Nft {
                op,
                detail: "the nft command is empty".to_owned(),
            });
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(prefix)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Registered as egressd's own before it can commit anything, so that the watcher does
        // not take its transaction for an outside change.
        let spawning = super::watch::own().spawning();
        let mut child = cmd.spawn().map_err(|e| Error::Nft {
            op,
            detail: format!("cannot start {}: {e}", self.command.join(" ")),
        })?;
        if let Some(pid) = child.id() {
            spawning.spawned(pid);
        }
        drop(spawning);
        let input = child.stdin.take();
        // Feed stdin while collecting output: nft may report an error (and fill the stderr
        // pipe) before it has read the whole script.
        let write = async {
            if let (Some(mut pipe), Some(script)) = (input, stdin) {
                let text = match script {
                    Script::Text(t) => std::borrow::Cow::Borrowed(t),
                    Script::Late(f) => std::borrow::Cow::Owned(f()),
                };
                // A write error (broken pipe) means nft exited early; its exit status and
                // stderr below say why, so this error is only kept when nft "succeeded".
                let r = pipe.write_all(text.as_bytes()).await;
                drop(pipe);
                r
            } else {
                Ok(())
            }
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        let output = output.map_err(|e| Error::Nft {
            op,
            detail: format!("waiting for {}: {e}", self.command.join(" ")),
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Error::Nft {
                op,
                detail: format!(
                    "{} ({}): {}",
                    self.command.join(" "),
                    output.status,
                    clip(stderr.trim())
                ),
            });
        }
        if let Err(e) = written {
            return Err(Error::Nft {
                op,
                detail: format!("writing the script to {}: {e}", self.command.join(" ")),
            });
        }
        String::from_utf8(output.stdout).map_err(|e| Error::Nft {
            op,
            detail: format!("nft printed non-UTF-8 output: {e}"),
        })
    }

    /// Sends one script (one transaction) and counts it.
    pub async fn transaction(&mut self, op: &'static str, script: &str) -> Result<()> {
        self.transactions += 1;
        self.run(op, &["-f", "-"], Some(script)).await.map(|_| ())
    }

    /// The chains, sets and maps of table `family table` (see `watch::list_objects`), off the
    /// async threads.
    pub async fn list_objects(
        &self,
        op: &'static str,
        family: u8,
        table: &str,
    ) -> Result<Vec<(&'static str, String)>> {
        let (netns, table) = (self.netns.clone(), table.to_owned());
        tokio::task::spawn_blocking(move || {
            super::watch::list_objects(netns.as_deref(), family, &table)
        })
        .await
        .map_err(|e| Error::Nft {
            op,
            detail: format!("the netlink lister failed: {e}"),
        })?
        .map_err(|e| Error::Nft {
            op,
            detail: format!("listing over netlink: {e}"),
        })
    }

    /// The named counters of `table` as (name, packets, bytes), through one netlink dump off
    /// the async threads (see `watch::list_counters` for why not `nft`).
    pub async fn list_counters(&self, family: u8, table: &str) -> Result<Vec<(String, u64, u64)>> {
        let (netns, table) = (self.netns.clone(), table.to_owned());
        tokio::task::spawn_blocking(move || {
            super::watch::list_counters(netns.as_deref(), family, &table)
        })
        .await
        .map_err(|e| Error::Nft {
            op: "list counters",
            detail: format!("the netlink lister failed: {e}"),
        })?
        .map_err(|e| Error::Nft {
            op: "list counters",
            detail: format!("listing over netlink: {e}"),
        })
    }

    /// Sends the batch that `make` builds as one kernel transaction, on the persistent socket,
    /// off the async threads (a 100 000-element batch keeps the kernel busy ~0.6 s). `make`
    /// runs just before the send, so a timeout it computes is fresh.
    pub async fn send_batch(
        &mut self,
        op: &'static str,
        make: impl FnOnce() -> Batch + Send + 'static,
    ) -> Result<()> {
        self.send_batches(op, move || vec![make()]).await
    }

    /// Sends the batches that `make` builds, in order, each its own kernel transaction, and
    /// stops at the first that fails. For loads that need no atomicity of their own (elements
    /// of maps nothing references yet): nftables holds its per-namespace commit lock for a
    /// whole transaction, and other writers of the namespace (the lease task's fence
    /// renewals) wait for it, so a 100 000-element load goes in parts.
    pub async fn send_batches(
        &mut self,
        op: &'static str,
        make: impl FnOnce() -> Vec<Batch> + Send + 'static,
    ) -> Result<()> {
        let socket = match self.socket.take() {
            Some(s) => s,
            None => nfnl::Socket::open(self.netns.as_deref()).map_err(|e| Error::Nft {
                op,
                detail: format!("opening a netfilter netlink socket: {e}"),
            })?,
        };
        let netns = self.netns.clone();
        let (socket, sent, result) = tokio::task::spawn_blocking(move || {
            let mut socket = socket;
            let batches = make();
            // A large load goes while the watcher is deaf (see `watch::Own::quiet`), once for
            // all its parts.
            let total = batches.iter().map(Batch::len).sum();
            let _quiet = super::watch::own().quiet(netns.as_deref(), total);
            let mut sent = 0;
            for batch in batches {
                if let Err(e) = socket.send(batch) {
                    return (socket, sent, Err(e));
                }
                sent += 1;
            }
            (socket, sent, Ok(()))
        })
        .await
        .map_err(|e| Error::Nft {
            op,
            detail: format!("the netlink sender failed: {e}"),
        })?;
        self.transactions += sent as u64 + u64::from(result.is_err());
        match result {
            Ok(()) => {
                self.socket = Some(socket);
                Ok(())
            }
            Err(e) => {
                // A rejected batch leaves the socket usable; a socket error does not.
                if matches!(e, nfnl::SendError::Rejected(_)) {
                    self.socket = Some(socket);
                }
                Err(Error::Nft {
                    op,
                    detail: e.to_string(),
                })
            }
        }
    }
}

impl Default for NftRunner {
    fn default() -> Self {
        NftRunner::new()
    }
}
