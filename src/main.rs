use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use egressd::config::{self, Config};
use egressd::daemon::{self, Status};

mod cli_docs;

const DEFAULT_CONFIG: &str = "/etc/egressd/egressd.toml";

/// egressd: a high-availability egress gateway (virtual IPs and SNAT decided by Raft).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (what the systemd unit starts).
    Run {
        #[arg(long, env = "EGRESSD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration: exit 0, or print every error and exit 1.
    CheckConfig {
        #[arg(long, env = "EGRESSD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Maintenance of a cluster member: cordon, uncordon, label.
    Node {
        #[command(subcommand)]
        action: NodeAction,
        #[command(flatten)]
        target: AdminTarget,
        /// File holding the admin token; default: the config file's admin.token_file.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
    },
    /// Show the node, its gateways and the data plane.
    Status {
        /// Print the JSON the admin endpoint serves.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print the shell completion script (for packaging).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into a directory (for packaging).
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeAction {
    /// Make the node ineligible: its gateways move to the next eligible node (planned handover).
    Cordon { name: String },
    /// Make the node eligible again.
    Uncordon { name: String },
    /// Cordon, then wait until no gateway is active on the node; says where each one went.
    Drain {
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Set a label (KEY=VALUE) or remove one (KEY-); runtime labels override the node's file.
    Label { name: String, label: String },
}

#[derive(clap::Args)]
struct AdminTarget {
    /// Admin endpoint URL; default: from the config file's admin.listen.
    #[arg(long, global = true)]
    admin: Option<String>,
    #[arg(long, global = true, env = "EGRESSD_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

impl AdminTarget {
    fn url(&self) -> String {
        if let Some(a) = &self.admin {
            return a.trim_end_matches('/').to_string();
        }
        let listen = config::load(&self.config)
            .map(|c| c.admin.listen)
            .unwrap_or_else(|_| ([127, 0, 0, 1], 7481).into());
        format!("http://{listen}")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} gateways, {} policies, node {})",
                    config.display(),
                    c.gateways.len(),
                    c.policies.len(),
                    c.node.name
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{}: {} error(s)", config.display(), errors.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!(
                        "egressd: not starting: {} configuration error(s)",
                        errors.0.len()
                    );
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&cfg);
            report(runtime().and_then(|rt| rt.block_on(daemon::run(cfg, config))))
        }
        Command::Status { json, target } => {
            report(runtime().and_then(|rt| rt.block_on(status(&target.url(), json))))
        }
        Command::Completions { shell } => cli_docs::completions::<Cli>(shell),
        Command::Man { out_dir } => report(cli_docs::man::<Cli>(&out_dir)),
        Command::Node {
            action,
            target,
            token_file,
        } => {
            report(runtime().and_then(|rt| rt.block_on(node_command(action, &target, token_file))))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One malloc arena: the daemon is not allocation-bound, and per-thread arenas each keep
    // their own freed memory (several MiB of an idle node's resident size).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    // openraft logs every vote and election step at info; keep it to warnings unless asked.
    let level = if cfg.log.level.contains("openraft") {
        cfg.log.level.clone()
    } else {
        format!("{},openraft=warn", cfg.log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cfg.log.format == config::LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn node_command(
    action: NodeAction,
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let token_file = token_file
        .or_else(|| config::load(&target.config).ok()?.admin.token_file)
        .context("no admin token: pass --token-file or set admin.token_file in the config")?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin token {}", token_file.display()))?;
    let url = target.url();
    let mut drain = None;
    let (name, path, body) = match action {
        NodeAction::Cordon { name } => (name, "cordon", None),
        NodeAction::Drain { name, timeout } => {
            drain = Some(std::time::Duration::from_secs(timeout));
            (name, "cordon", None)
        }
        NodeAction::Uncordon { name } => (name, "uncordon", None),
        NodeAction::Label { name, label } => {
            let change = if let Some(key) = label.strip_suffix('-') {
                egressd::admin::LabelChange {
                    key: key.to_string(),
                    value: None,
                }
            } else if let Some((key, value)) = label.split_once('=') {
                egressd::admin::LabelChange {
                    key: key.to_string(),
                    value: Some(value.to_string()),
                }
            } else {
                anyhow::bail!("label {label:?}: expected KEY=VALUE to set or KEY- to remove");
            };
            (name, "labels", Some(change))
        }
    };
    // What the node holds before it is cordoned, to say afterwards where each gateway went.
    let before = match drain {
        Some(_) => active_on(&fetch_status(&url).await?, &name),
        None => Vec::new(),
    };
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/nodes/{name}/{path}"))
        .bearer_auth(token.trim());
    if let Some(body) = &body {
        req = req.json(body);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {url}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let msg = resp
            .json::<egressd::admin::ApiError>()
            .await
            .map(|e| e.error)
            .unwrap_or_default();
        anyhow::bail!("{status}: {msg}");
    }
    let done: egressd::admin::Committed = resp.json().await.context("reading the answer")?;
    if let Some(timeout) = drain {
        return wait_drained(&url, &name, before, timeout).await;
    }
    println!(
        "{name}: {path} {}",
        if done.changed {
            "committed"
        } else {
            "(already so)"
        }
    );
    Ok(())
}

async fn fetch_status(url: &str) -> anyhow::Result<Status> {
    reqwest::get(format!("{url}/v1/status"))
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {url}"))?
        .error_for_status()?
        .json()
        .await
        .context("the admin endpoint answered something that is not a status")
}

/// The gateways whose committed active node is `name`.
fn active_on(s: &Status, name: &str) -> Vec<String> {
    s.gateways
        .iter()
        .filter(|g| g.active.as_deref() == Some(name))
        .map(|g| g.name.clone())
        .collect()
}

/// Polls the status until no gateway is active on `name`, then prints where each of `had`
/// went.
async fn wait_drained(
    url: &str,
    name: &str,
    had: Vec<String>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let mut s = fetch_status(url).await?;
        let still = active_on(&s, name);
        if still.is_empty() {
            // A planned handover releases first and assigns the successor a moment later.
            let placed = std::time::Instant::now();
            while placed.elapsed() < std::time::Duration::from_secs(2)
                && had.iter().any(|g| {
                    s.gateways
                        .iter()
                        .any(|x| &x.name == g && x.active.is_none())
                })
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                s = fetch_status(url).await?;
            }
            for g in &had {
                let to = s
                    .gateways
                    .iter()
                    .find(|x| &x.name == g)
                    .and_then(|x| x.active.clone())
                    .unwrap_or_else(|| "no eligible node".into());
                println!("{g}: {name} -> {to}");
            }
            println!(
                "{name}: drained in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{name} still active for {} after {} s (it stays cordoned)",
                still.join(", "),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let s = fetch_status(url).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let ready = if s.ready {
        "ready".to_string()
    } else {
        format!("NOT READY: {}", s.not_ready.join("; "))
    };
    println!("node {}  {}", s.node, ready);
    println!(
        "cluster: leader {}, term {}, members {}, applied index {}, lease {} ms{}",
        s.cluster.leader.as_deref().unwrap_or("none"),
        s.cluster.term,
        s.cluster.members.join(","),
        s.cluster.applied_index,
        s.cluster.lease_remaining_ms,
        if s.cluster.config_drift {
            ", CONFIG DRIFT: this node's file differs from the committed objects"
        } else {
            ""
        }
    );
    println!(
        "data plane: {} addresses held, {} SNAT elements, {} applies{}",
        s.dataplane.held_addresses.len(),
        s.dataplane.snat_elements,
        s.dataplane.applies,
        s.dataplane
            .last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    println!();
    println!(
        "{:<24} {:<8} {:<16} {:<10} {:>5} {:<20} INELIGIBLE",
        "GATEWAY", "MODE", "SOURCE IP", "ACTIVE", "EPOCH", "ELIGIBLE"
    );
    for g in &s.gateways {
        let mode = if g.mode == "VirtualIPAddress" {
            "vip"
        } else {
            "primary"
        };
        println!(
            "{:<24} {:<10} {:<18} {:<12} {:<20} {}",
            g.name,
            mode,
            g.source_ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            g.active.as_deref().unwrap_or("-"),
            g.eligible.join(","),
            g.ineligible
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}
