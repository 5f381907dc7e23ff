use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use egressd::config::{self, Config};
use egressd::daemon::{self, Status};

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
    /// Show the node, its gateways and the data plane.
    Status {
        /// Print the JSON the admin endpoint serves.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(clap::Args)]
struct AdminTarget {
    /// Admin endpoint URL; default: from the config file's admin.listen.
    #[arg(long)]
    admin: Option<String>,
    #[arg(long, env = "EGRESSD_CONFIG", default_value = DEFAULT_CONFIG)]
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

async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let s: Status = reqwest::get(format!("{url}/v1/status"))
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {url}"))?
        .error_for_status()?
        .json()
        .await
        .context("the admin endpoint answered something that is not a status")?;
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
