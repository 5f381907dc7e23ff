use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use axum::http::Method;
use egressd::admin_client::{AdminClient, Answer};
use egressd::config::schema::{GatewaySpec, Mode, PolicySpec};
use egressd::config::{self, Config, rules};
use egressd::daemon;
use egressd::status::Status;

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
        /// Show the recent events (elections, failovers, handovers, cordons, config changes).
        #[arg(long)]
        events: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Create or replace gateways and policies cluster-wide from a TOML file of [[gateway]] and
    /// [[policy]] tables (the configuration file's syntax); "-" reads standard input.
    Apply {
        /// The TOML file, or "-" for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        target: AdminTarget,
        /// File holding the admin token; default: the config file's admin.token_file.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Convert Deckhouse EgressGateway and EgressGatewayPolicy manifests to egressd's
    /// [[gateway]] and [[policy]] tables (printed), or apply them with --apply.
    ///
    /// Reads YAML documents, each an object or a List (what `kubectl get -o yaml` prints);
    /// "-" reads standard input. Pod selectors cannot be
    /// resolved offline: each policy's source CIDRs come from --sources NAME=CIDR[,CIDR...] or
    /// its annotation egressd.io/source-cidrs ("CIDR[,CIDR...]"); --sources wins. The objects
    /// are checked by the rules of the configuration file; every problem is listed and nothing
    /// is printed or applied. Needs the `kubernetes` build feature.
    Import(ImportArgs),
    /// The Kubernetes adapter's manifests (needs the `kubernetes` build feature).
    Kubernetes {
        #[command(subcommand)]
        action: KubernetesAction,
    },
    /// List the committed gateways or policies.
    Get {
        kind: Kind,
        /// Print the JSON the admin endpoint serves.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Delete a gateway or a policy cluster-wide (a gateway only once no policy names it).
    Delete {
        kind: Kind,
        name: String,
        #[command(flatten)]
        target: AdminTarget,
        /// File holding the admin token; default: the config file's admin.token_file.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Add CIDRs to a policy, or remove them, without sending the whole policy (one CIDR of a
    /// 100 000-CIDR allow-list is a few bytes, not the file).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
        #[command(flatten)]
        target: AdminTarget,
        /// File holding the admin token; default: the config file's admin.token_file.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
    },
    /// Cluster membership: add a node, remove one (one voter change at a time; a change that
    /// would leave the voters without a quorum of live nodes is refused).
    Member {
        #[command(subcommand)]
        action: MemberAction,
        #[command(flatten)]
        target: AdminTarget,
        /// File holding the admin token; default: the config file's admin.token_file.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
    },
    /// Peer TLS: create the cluster CA and the node certificates peers authenticate with.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
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

#[derive(clap::Args)]
struct ImportArgs {
    /// The YAML file, or "-" for standard input.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// A policy's source CIDRs, NAME=CIDR[,CIDR...]; repeat for each policy.
    #[arg(long = "sources", value_name = "NAME=CIDR,...")]
    sources: Vec<String>,
    /// Apply the objects to the cluster (as `egressd apply`) instead of printing them; their
    /// policies may then name gateways the cluster already has.
    #[arg(long)]
    apply: bool,
    #[command(flatten)]
    target: AdminTarget,
    /// File holding the admin token (with --apply); default: the config file's admin.token_file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KubernetesAction {
    /// Print the CustomResourceDefinitions of EgressGateway and EgressGatewayPolicy (YAML, as
    /// packaging/kubernetes/crds.yaml), for clusters without Deckhouse's.
    Crds,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kind {
    #[value(alias = "gateways")]
    Gateway,
    #[value(alias = "policies")]
    Policy,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Gateway => "gateways",
            Kind::Policy => "policies",
        }
    }
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

#[derive(Subcommand)]
enum MemberAction {
    /// Add a node: it joins as a learner and becomes a voter once it has caught up (the first
    /// five by name vote). Start the node (with an empty data_dir and the cluster's peers in
    /// its file) after this command.
    Add {
        name: String,
        /// Its peer address, address:port (its cluster.listen).
        address: String,
    },
    /// Remove a node (e.g. a failed one before its replacement is added); stop it and clear
    /// its data_dir afterwards.
    Remove { name: String },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Add CIDRs to a policy's lists (one already listed stays once).
    AddCidrs(CidrArgs),
    /// Remove CIDRs from a policy's lists (one not listed is no change); the source and
    /// destination lists must keep at least one CIDR.
    RemoveCidrs(CidrArgs),
}

#[derive(clap::Args)]
struct CidrArgs {
    /// The policy.
    name: String,
    /// A source CIDR (repeat, or comma-separate, for more).
    #[arg(long = "source", value_delimiter = ',')]
    sources: Vec<String>,
    /// A destination CIDR (repeat, or comma-separate, for more).
    #[arg(long = "destination", value_delimiter = ',')]
    destinations: Vec<String>,
    /// An excluded CIDR (repeat, or comma-separate, for more).
    #[arg(long = "excluded", value_delimiter = ',')]
    excluded: Vec<String>,
}

#[derive(Subcommand)]
enum TlsAction {
    /// Create a cluster CA (ca.pem and ca-key.pem in --out-dir).
    ///
    /// Writes OUT_DIR/ca.pem, the certificate every node trusts (`cluster.tls.ca_file`), and
    /// OUT_DIR/ca-key.pem, its private key (mode 0600; keep it where certificates are issued,
    /// not on the nodes). ECDSA P-256, self-signed, valid 10 years unless --days says
    /// otherwise. Existing files are kept unless --force is given.
    InitCa {
        /// Directory to write into; created if missing.
        #[arg(long)]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = egressd::tls::pki::CA_DAYS)]
        days: u32,
        /// Replace existing ca.pem / ca-key.pem (the old CA's certificates stop being trusted
        /// once no node's ca_file lists it).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate (NODE.pem and NODE-key.pem in --out-dir) with the CA in --ca-dir.
    ///
    /// Writes OUT_DIR/NODE.pem (`cluster.tls.cert_file`) and OUT_DIR/NODE-key.pem
    /// (`cluster.tls.key_file`, mode 0600). The certificate carries NODE as its DNS subject
    /// alternative name and the extended key usages serverAuth and clientAuth; ECDSA P-256,
    /// valid from one hour before now for 2 years unless --days says otherwise (never beyond
    /// the CA's own expiry). Existing files are kept unless --force is given.
    Issue {
        /// The node's name, exactly as in cluster.peers.
        node: String,
        /// Directory holding ca.pem and ca-key.pem (from `egressd tls init-ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory to write into; created if missing.
        #[arg(long)]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = egressd::tls::pki::NODE_DAYS)]
        days: u32,
        /// Replace existing NODE.pem / NODE-key.pem.
        #[arg(long)]
        force: bool,
        /// Another subject alternative name, a DNS name or an IP address (repeatable): for a
        /// certificate of the admin endpoint ([admin.tls]) reached by address.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

#[derive(clap::Args)]
struct AdminTarget {
    /// Admin endpoint URL; default: from the config file's admin.listen (https:// with
    /// [admin.tls]).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// The CA an https:// admin endpoint's certificate chains to; default: the config file's
    /// admin.tls.ca_file.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    #[arg(long, global = true, env = "EGRESSD_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The config file, read at most once and only for what the options leave open: a node's
    /// file may hold 100 000 CIDRs (0.1 s or more to read), and every client command read it
    /// once for the CA even with `--admin`, and again for the token.
    #[arg(skip)]
    file: std::cell::OnceCell<Option<Config>>,
}

impl AdminTarget {
    fn file(&self) -> Option<&Config> {
        self.file
            .get_or_init(|| config::load(&self.config).ok())
            .as_ref()
    }

    fn client(&self) -> anyhow::Result<AdminClient> {
        let url = match &self.admin {
            Some(a) => a.clone(),
            None => self
                .file()
                .map(|c| c.admin.url())
                .unwrap_or_else(|| "http://127.0.0.1:7481".to_string()),
        };
        // A CA only matters to an https:// endpoint.
        let ca = match &self.ca_file {
            Some(f) => Some(f.clone()),
            None if url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://")) =>
            {
                self.file()
                    .and_then(|c| c.admin.tls.as_ref()?.ca_file.clone())
            }
            None => None,
        };
        AdminClient::new(&url, ca.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config).and_then(|c| {
            egressd::secrets::check_files(&c, &config.display().to_string()).map(|()| c)
        }) {
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
            // Broken gateways or policies alone do not stop a start: the node runs the
            // cluster's committed objects and reports them (see `config::load_for_run`).
            let loaded = config::load_for_run(&config).and_then(|(c, o)| {
                egressd::secrets::check_files(&c, &config.display().to_string()).map(|()| (c, o))
            });
            let (cfg, object_errors) = match loaded {
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
            report(runtime().and_then(|rt| rt.block_on(daemon::run(cfg, config, object_errors))))
        }
        Command::Status {
            json,
            events,
            target,
        } => report(runtime().and_then(|rt| rt.block_on(status(&target, json, events)))),
        Command::Apply {
            file,
            target,
            token_file,
        } => report(runtime().and_then(|rt| rt.block_on(apply(&file, &target, token_file)))),
        Command::Import(args) => report(import(args)),
        Command::Kubernetes { action } => report(kubernetes_command(action)),
        Command::Get { kind, json, target } => {
            report(runtime().and_then(|rt| rt.block_on(get(kind, json, &target))))
        }
        Command::Delete {
            kind,
            name,
            target,
            token_file,
        } => report(runtime().and_then(|rt| rt.block_on(delete(kind, &name, &target, token_file)))),
        Command::Policy {
            action,
            target,
            token_file,
        } => report(
            runtime().and_then(|rt| rt.block_on(policy_command(action, &target, token_file))),
        ),
        Command::Tls { action } => report(tls_command(action)),
        Command::Member {
            action,
            target,
            token_file,
        } => report(
            runtime().and_then(|rt| rt.block_on(member_command(action, &target, token_file))),
        ),
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
    let mut drain = None;
    let (name, path, body) = match action {
        NodeAction::Cordon { name } => (name, "cordon", None),
        NodeAction::Drain { name, timeout } => {
            drain = Some(std::time::Duration::from_secs(timeout));
            (name, "cordon", None)
        }
        NodeAction::Uncordon { name } => (name, "uncordon", None),
        NodeAction::Label { name, label } => {
            // KEY=VALUE sets (a value may not end in '-' anyway), KEY- removes.
            let change = if let Some((key, value)) = label.split_once('=') {
                egressd::admin::LabelChange {
                    key: key.to_string(),
                    value: Some(value.to_string()),
                }
            } else if let Some(key) = label.strip_suffix('-') {
                egressd::admin::LabelChange {
                    key: key.to_string(),
                    value: None,
                }
            } else {
                anyhow::bail!(
                    "label {}: expected KEY=VALUE to set or KEY- to remove",
                    rules::quote(&label)
                );
            };
            // The rules the cluster applies, checked here first for a message without a round
            // trip (and before a token is needed).
            if let Err(m) = rules::label_key(&change.key) {
                anyhow::bail!("label key: {m}");
            }
            if let Some(Err(m)) = change.value.as_deref().map(rules::label_value) {
                anyhow::bail!("label value: {m}");
            }
            (name, "labels", Some(change))
        }
    };
    let token = read_token(target, token_file)?;
    let client = target.client()?;
    // What the node holds before it is cordoned, to say afterwards where each gateway went.
    let before = match drain {
        Some(_) => active_on(&fetch_status(&client).await?, &name),
        None => Vec::new(),
    };
    let body = body
        .map(|b| serde_json::to_vec(&b))
        .transpose()
        .context("encoding the request")?;
    let resp = client
        .send(
            Method::POST,
            &format!("/v1/nodes/{name}/{path}"),
            Some(&token),
            body,
        )
        .await?;
    let done = committed(resp)?;
    if let Some(timeout) = drain {
        return wait_drained(&client, &name, before, timeout).await;
    }
    println!(
        "{name}: {path} {}",
        if done.changed {
            "committed"
        } else {
            "(already so)"
        }
    );
    if let Some(note) = done.note {
        println!("note: {note}");
    }
    Ok(())
}

async fn member_command(
    action: MemberAction,
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let token = read_token(target, token_file)?;
    let client = target.client()?;
    let (what, resp) = match action {
        MemberAction::Add { name, address } => {
            let body = serde_json::to_vec(&egressd::admin::MemberAdd {
                name: name.clone(),
                address: address.clone(),
            })
            .context("encoding the request")?;
            let resp = client
                .send(Method::POST, "/v1/members", Some(&token), Some(body))
                .await?;
            (format!("{name} ({address}) added"), resp)
        }
        MemberAction::Remove { name } => {
            let resp = client
                .send(
                    Method::DELETE,
                    &format!("/v1/members/{name}"),
                    Some(&token),
                    None,
                )
                .await?;
            (format!("{name} removed"), resp)
        }
    };
    let done = committed(resp)?;
    if done.changed {
        println!(
            "member {what}; the leader changes the voters one at a time (`egressd status` shows \
             them)"
        );
    } else {
        println!("member list unchanged (already so)");
    }
    Ok(())
}

fn tls_command(action: TlsAction) -> anyhow::Result<()> {
    use egressd::tls::pki;
    match action {
        TlsAction::InitCa {
            out_dir,
            days,
            force,
        } => {
            let w = pki::init_ca_dir(&out_dir, days, force)?;
            println!(
                "wrote {} (CA certificate, valid until {}: every node's cluster.tls.ca_file)",
                w.cert.display(),
                w.not_after.date()
            );
            println!(
                "wrote {} (CA private key, mode 0600: keep it off the nodes)",
                w.key.display()
            );
            println!(
                "next: egressd tls issue NODE --ca-dir {} --out-dir DIR, for every node of \
                 cluster.peers",
                out_dir.display()
            );
        }
        TlsAction::Issue {
            node,
            ca_dir,
            out_dir,
            days,
            force,
            sans,
        } => {
            let w = pki::issue_to_dir_with(&node, &sans, &ca_dir, &out_dir, days, force)?;
            println!(
                "wrote {} (certificate for {node}, valid until {}: cluster.tls.cert_file)",
                w.cert.display(),
                w.not_after.date()
            );
            println!(
                "wrote {} (private key, mode 0600: cluster.tls.key_file; on {node}, owned by \
                 the user egressd runs as)",
                w.key.display()
            );
        }
    }
    Ok(())
}

fn read_token(target: &AdminTarget, token_file: Option<PathBuf>) -> anyhow::Result<String> {
    let token_file = token_file
        .or_else(|| target.file()?.admin.token_file.clone())
        .context("no admin token: pass --token-file or set admin.token_file in the config")?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin token {}", token_file.display()))?;
    Ok(token.trim().to_string())
}

/// The answer to a mutation: committed, or the endpoint's reason as the error.
fn committed(resp: Answer) -> anyhow::Result<egressd::admin::Committed> {
    success(&resp)?;
    serde_json::from_slice(&resp.body).context("reading the answer")
}

/// A 2xx answer, or the endpoint's reason as the error.
fn success(resp: &Answer) -> anyhow::Result<()> {
    if resp.status.is_success() {
        return Ok(());
    }
    let msg = serde_json::from_slice::<egressd::admin::ApiError>(&resp.body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).trim().to_string());
    anyhow::bail!("{}: {msg}", resp.status)
}

/// The text of `file`, or of standard input for "-", with the name errors give it.
fn read_input(file: &std::path::Path) -> anyhow::Result<(String, String)> {
    if file == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading standard input")?;
        Ok(("<stdin>".to_string(), text))
    } else {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        Ok((file.display().to_string(), text))
    }
}

async fn apply(
    file: &std::path::Path,
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (name, text) = read_input(file)?;
    // Checked here first, so that errors name the file and its keys.
    let (gateways, policies) = match config::parse_objects(&text, &name) {
        Ok(o) => o,
        Err(errors) => {
            eprintln!("{errors}");
            anyhow::bail!("{name}: {} error(s), nothing applied", errors.0.len());
        }
    };
    send_apply(&gateways, &policies, target, token_file).await
}

/// `POST /v1/apply` of checked objects (`egressd apply`, `egressd import --apply`).
async fn send_apply(
    gateways: &[egressd::model::Gateway],
    policies: &[egressd::model::Policy],
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let token = read_token(target, token_file)?;
    let client = target.client()?;
    let body = egressd::admin::ApplyRequest {
        gateways: gateways.iter().map(GatewaySpec::from).collect(),
        policies: policies.iter().map(PolicySpec::from).collect(),
    };
    let json = serde_json::to_vec(&body).context("encoding the request")?;
    let resp = client
        .send(Method::POST, "/v1/apply", Some(&token), Some(json))
        .await?;
    let done = committed(resp)?;
    let names: Vec<String> = body
        .gateways
        .iter()
        .map(|g| format!("gateway/{}", g.name))
        .chain(body.policies.iter().map(|p| format!("policy/{}", p.name)))
        .collect();
    println!(
        "{}: {}",
        names.join(", "),
        if done.changed { "applied" } else { "unchanged" }
    );
    Ok(())
}

/// `egressd import`: Deckhouse manifests to egressd's tables, printed or applied.
#[cfg(feature = "kubernetes")]
fn import(args: ImportArgs) -> anyhow::Result<()> {
    use egressd::kubernetes::import::{self as k8s, References, Sources};
    let sources =
        Sources::from_args(args.sources.iter().map(String::as_str)).map_err(anyhow::Error::msg)?;
    let (name, text) = read_input(&args.file)?;
    let references = if args.apply {
        References::InCluster
    } else {
        References::InInput
    };
    let imported = match k8s::import(&text, &name, &sources, references) {
        Ok(i) => {
            for w in &i.warnings {
                eprintln!("warning: {w}");
            }
            i
        }
        Err(errors) => {
            eprintln!("{errors}");
            anyhow::bail!(
                "{name}: {} error(s), nothing {}",
                errors.0.len(),
                if args.apply { "applied" } else { "printed" }
            );
        }
    };
    if args.apply {
        return runtime()?.block_on(send_apply(
            &imported.gateways,
            &imported.policies,
            &args.target,
            args.token_file,
        ));
    }
    let header = [
        format!(
            "Imported by `egressd import` from {name}: {} gateway(s), {} policy(s).",
            imported.gateways.len(),
            imported.policies.len()
        ),
        "A policy's source_cidrs stand for its pod selectors (see the comment above it).".into(),
    ];
    let text = k8s::to_toml(&imported, &header).context("writing the TOML")?;
    print!("{text}");
    Ok(())
}

#[cfg(not(feature = "kubernetes"))]
fn import(_: ImportArgs) -> anyhow::Result<()> {
    Err(no_kubernetes())
}

#[cfg(feature = "kubernetes")]
fn kubernetes_command(action: KubernetesAction) -> anyhow::Result<()> {
    match action {
        KubernetesAction::Crds => {
            print!(
                "{}",
                egressd::kubernetes::crds_yaml().context("writing the CRDs")?
            );
            Ok(())
        }
    }
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes_command(_: KubernetesAction) -> anyhow::Result<()> {
    Err(no_kubernetes())
}

/// The commands of the adapter exist in every build, so that the command line and its manual
/// are the same; without the feature they say how to get it.
#[cfg(not(feature = "kubernetes"))]
fn no_kubernetes() -> anyhow::Error {
    anyhow::anyhow!(
        "this egressd was built without the Kubernetes adapter; build it with \
         `cargo build --release --features kubernetes` (the Debian package has it)"
    )
}

async fn get(kind: Kind, json: bool, target: &AdminTarget) -> anyhow::Result<()> {
    let resp = target
        .client()?
        .get(&format!("/v1/{}", kind.plural()))
        .await?;
    success(&resp)?;
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    if json {
        println!("{text}");
        return Ok(());
    }
    use egressd::admin::Listed;
    match kind {
        Kind::Gateway => {
            let list: Vec<Listed<GatewaySpec>> =
                serde_json::from_str(&text).context("the answer is not a gateway list")?;
            println!(
                "{:<24} {:<6} {:<8} {:<26} {:<12} SELECTOR",
                "NAME", "ORIGIN", "MODE", "SOURCE", "SELECTION"
            );
            for Listed { origin, object: g } in list {
                let s = &g.source_ip;
                let (mode, source) = match s.mode {
                    Mode::PrimaryIp => (
                        "primary",
                        format!(
                            "primary IPv4 of {}",
                            s.primary_ip_from_egress_gateway_node_interface
                                .as_ref()
                                .map_or("?", |p| p.interface_name.as_str())
                        ),
                    ),
                    Mode::VirtualIp => (
                        "vip",
                        s.virtual_ip_address.as_ref().map_or("?".into(), |v| {
                            format!("{} on {}", v.ip, v.interfaces.join(","))
                        }),
                    ),
                };
                let selector: Vec<String> = g
                    .node_selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<24} {:<6} {:<8} {:<26} {:<12} {}",
                    g.name,
                    origin,
                    mode,
                    source,
                    format!(
                        "{:?}{}",
                        g.selection,
                        if g.preempt { "" } else { ",sticky" }
                    )
                    .to_lowercase(),
                    selector.join(",")
                );
            }
        }
        Kind::Policy => {
            let list: Vec<Listed<PolicySpec>> =
                serde_json::from_str(&text).context("the answer is not a policy list")?;
            println!(
                "{:<24} {:<6} {:<20} {:<20} {:<20} EXCLUDED",
                "NAME", "ORIGIN", "GATEWAY", "SOURCES", "DESTINATIONS"
            );
            let join = |v: &[String]| v.join(",");
            for Listed { origin, object: p } in list {
                println!(
                    "{:<24} {:<6} {:<20} {:<20} {:<20} {}",
                    p.name,
                    origin,
                    p.egress_gateway_name,
                    join(&p.source_cidrs),
                    join(&p.destination_cidrs),
                    join(&p.excluded_cidrs)
                );
            }
        }
    }
    Ok(())
}

async fn delete(
    kind: Kind,
    name: &str,
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let token = read_token(target, token_file)?;
    let resp = target
        .client()?
        .send(
            Method::DELETE,
            &format!("/v1/{}/{name}", kind.plural()),
            Some(&token),
            None,
        )
        .await?;
    committed(resp)?;
    let kind = match kind {
        Kind::Gateway => "gateway",
        Kind::Policy => "policy",
    };
    println!("{kind}/{name}: deleted");
    Ok(())
}

/// `egressd policy add-cidrs|remove-cidrs`: `POST /v1/policies/{name}/cidrs`. The CIDRs are
/// checked by the admin endpoint, as an apply's are.
async fn policy_command(
    action: PolicyAction,
    target: &AdminTarget,
    token_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (args, adding) = match action {
        PolicyAction::AddCidrs(a) => (a, true),
        PolicyAction::RemoveCidrs(a) => (a, false),
    };
    let lists = config::schema::CidrListsSpec {
        source_cidrs: args.sources,
        destination_cidrs: args.destinations,
        excluded_cidrs: args.excluded,
    };
    let (add, remove) = if adding {
        (lists, Default::default())
    } else {
        (Default::default(), lists)
    };
    let edit = config::schema::CidrEdit { add, remove };
    let token = read_token(target, token_file)?;
    let json = serde_json::to_vec(&edit).context("encoding the request")?;
    let resp = target
        .client()?
        .send(
            Method::POST,
            &format!("/v1/policies/{}/cidrs", args.name),
            Some(&token),
            Some(json),
        )
        .await?;
    let done = committed(resp)?;
    println!(
        "policy/{}: {}",
        args.name,
        if done.changed { "changed" } else { "unchanged" }
    );
    Ok(())
}

async fn fetch_status(client: &AdminClient) -> anyhow::Result<Status> {
    let resp = client.get("/v1/status").await?;
    success(&resp)?;
    serde_json::from_slice(&resp.body)
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
    url: &AdminClient,
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

async fn status(target: &AdminTarget, json: bool, events: bool) -> anyhow::Result<()> {
    let client = target.client()?;
    let s = fetch_status(&client).await?;
    let event_list: Vec<egressd::events::Event> = if events {
        let resp = client.get("/v1/events?limit=50").await?;
        success(&resp)?;
        serde_json::from_slice(&resp.body)
            .context("the admin endpoint answered something that is not an event list")?
    } else {
        Vec::new()
    };
    if json {
        if events {
            let both = serde_json::json!({ "status": s, "events": event_list });
            println!("{}", serde_json::to_string_pretty(&both)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        return Ok(());
    }
    let ready = if s.ready {
        "ready".to_string()
    } else {
        format!("NOT READY: {}", s.not_ready.join("; "))
    };
    println!("node {}  {}", s.node, ready);
    println!(
        "cluster {}: leader {}, term {}, last log index {}, applied index {}, snapshot index {}, \
         lease {} ms",
        s.cluster.id.as_deref().unwrap_or("(no id yet)"),
        s.cluster.leader.as_deref().unwrap_or("none"),
        s.cluster.term,
        s.cluster.last_log_index,
        s.cluster.applied_index,
        s.cluster.snapshot_index,
        s.cluster.lease_remaining_ms,
    );
    println!(
        "data plane: {} addresses held, {} SNAT elements, {} applies{}{}",
        s.dataplane.held_addresses.len(),
        s.dataplane.snat_elements,
        s.dataplane.applies,
        s.dataplane
            .last_apply_ms
            .zip(s.dataplane.last_apply_unix_ms)
            .map(|(ms, at)| format!(
                " (last at {}, took {ms:.1} ms)",
                egressd::events::format_utc(at)
            ))
            .unwrap_or_default(),
        s.dataplane
            .last_error
            .as_ref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    );
    for (gateway, actions) in &s.dataplane.traffic {
        let parts: Vec<String> = actions
            .iter()
            .map(|(a, t)| format!("{a} {} packets ({} bytes)", t.packets, t.bytes))
            .collect();
        println!("  traffic here for {gateway}: {}", parts.join(", "));
    }
    if let Some(tls) = &s.cluster.peer_tls {
        println!("peer TLS: {tls}");
    }
    for d in &s.config.drift {
        println!("CONFIG DRIFT: {d}");
    }
    for d in &s.config.member_drift {
        println!("MEMBER DRIFT: {d}");
    }
    if !s.config.last_reload_errors.is_empty() {
        println!(
            "LAST RELOAD REJECTED (running config kept): {}",
            s.config.last_reload_errors.join("; ")
        );
    }
    for p in &s.config.orphaned_policies {
        println!("POLICY WITHOUT GATEWAY: {p} names a gateway that does not exist");
    }
    println!();
    if s.members.is_empty() {
        println!("members: {} (no leader view)", s.cluster.members.join(", "));
    } else {
        println!(
            "{:<16} {:<8} {:<6} {:<6} {:<9} {:<9} LABELS",
            "MEMBER", "ROLE", "ALIVE", "READY", "SILENT", "CORDONED"
        );
        for m in &s.members {
            let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{:<16} {:<8} {:<6} {:<6} {:<9} {:<9} {}",
                m.name,
                m.role,
                yes(m.alive),
                yes(m.ready),
                format!("{} ms", m.silent_ms),
                yes(m.cordoned),
                labels.join(",")
            );
        }
        for m in s.members.iter().filter(|m| !m.cordon_reasons.is_empty()) {
            println!("{} is cordoned by: {}", m.name, m.cordon_reasons.join("; "));
        }
    }
    println!();
    println!(
        "{:<20} {:<8} {:<16} {:<10} {:<25} {:<9} {:<20} INELIGIBLE",
        "GATEWAY", "MODE", "SOURCE IP", "ACTIVE", "SINCE", "FAILOVERS", "ELIGIBLE"
    );
    for g in &s.gateways {
        let mode = if g.mode == "VirtualIPAddress" {
            "vip"
        } else {
            "primary"
        };
        let failovers = match g.last_failover_detect_ms {
            Some(ms) => format!("{} ({ms} ms)", g.failovers),
            None => g.failovers.to_string(),
        };
        println!(
            "{:<20} {:<8} {:<16} {:<10} {:<25} {:<9} {:<20} {}",
            g.name,
            mode,
            g.source_ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            g.active.as_deref().unwrap_or("-"),
            g.active_since_unix_ms
                .map(egressd::events::format_utc)
                .unwrap_or_else(|| "-".into()),
            failovers,
            g.eligible.join(","),
            g.ineligible
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if events {
        println!();
        println!("EVENTS (newest last)");
        for e in &event_list {
            let scope = match (&e.gateway, e.index) {
                (Some(g), _) => format!("{g}: "),
                (None, None) => format!("{}: ", s.node),
                _ => String::new(),
            };
            println!(
                "{}  {:<15} {scope}{}",
                egressd::events::format_utc(e.at_unix_ms),
                e.kind.as_str(),
                e.message
            );
        }
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
