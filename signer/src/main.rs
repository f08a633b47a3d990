//! `meshward-signer`: the Istio-compatible CA as a command-line program.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshward_signer::config::Config;
use meshward_signer::issuer::builtin::CaKeyAlgorithm;
use tracing::info;

/// An Istio-compatible certificate authority for SPIFFE workload
/// certificates: serves Istio's CA API (istio-agent, ztunnel) over TLS,
/// authenticates callers by Kubernetes service-account token, and signs
/// short-lived certificates whose only SAN is the caller's SPIFFE ID.
#[derive(Debug, Parser)]
#[command(name = "meshward-signer", version, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHWARD_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the signer: gRPC CA API over TLS plus the admin HTTP port.
    Serve(ServeArgs),
    /// Print the effective configuration (defaults, file, overrides) as TOML.
    Config(ServeArgs),
    /// Inspect the issuance policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The CA: `ca rotate-intermediate`, `ca rotate-root [--overlap 24h]`,
    /// `ca status` (a running signer picks the change up); `ca revoke`,
    /// `ca unrevoke`, `ca revocations` (in the ledger, so every replica
    /// sharing it sees them).
    Ca(CaArgs),
    /// The issuance ledger: `ledger import --from <ledger.sqlite>` copies a
    /// replica's SQLite records into the shared `[ledger.postgres]` store
    /// (run it in each replica's pod when moving to the shared ledger; it
    /// skips what is already there, so it can run again).
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Copy every record of a SQLite ledger file into `[ledger.postgres]`
    /// (same configuration sources as `serve`).
    Import(ImportArgs),
}

/// `ledger import`.
#[derive(Debug, Args)]
struct ImportArgs {
    /// The SQLite ledger to read (e.g. /var/lib/meshward/ledger.sqlite).
    #[arg(long)]
    from: PathBuf,
    #[command(flatten)]
    config: ServeArgs,
}

/// `ca` subcommands, with the same configuration sources as `serve`.
#[derive(Debug, Args)]
struct CaArgs {
    #[command(flatten)]
    config: ServeArgs,
    #[command(subcommand)]
    command: meshward_signer::bundle::rotation::CaCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Show the policy that applies to one workload: its SPIFFE ID, tier,
    /// TTLs, allowed key types, and whether it is a trusted node agent.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// Kubernetes namespace of the workload.
    #[arg(long)]
    ns: String,
    /// Kubernetes service account of the workload.
    #[arg(long)]
    sa: String,
    /// A label of the namespace (`key=value`, repeatable), for tiers that
    /// select namespaces by label.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    config: ServeArgs,
}

/// Configuration sources, lowest precedence first: embedded defaults, the
/// config file, environment variables, flags.
#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// TOML config file (every key optional; unknown keys are an error).
    #[arg(long, short = 'c', env = "MESHWARD_CONFIG")]
    config: Option<PathBuf>,
    /// Override `trust_domain`.
    #[arg(long, env = "MESHWARD_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Override `server.grpc_addr` (Istio CA API, default 0.0.0.0:15012).
    #[arg(long, env = "MESHWARD_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Override `server.admin_addr` (/healthz, /readyz, /metrics; default 0.0.0.0:15014).
    #[arg(long, env = "MESHWARD_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Override `ca.data_dir` (built-in CA root, intermediate and keys).
    #[arg(long, env = "MESHWARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Override `ca.key_algorithm` for a newly created CA.
    #[arg(long, env = "MESHWARD_CA_KEY_ALGORITHM", value_parser = parse_key_alg)]
    ca_key_algorithm: Option<CaKeyAlgorithm>,
    /// Override `policy.max_ttl` (e.g. `24h`).
    #[arg(long, env = "MESHWARD_MAX_TTL", value_parser = humantime::parse_duration)]
    max_ttl: Option<std::time::Duration>,
    /// Override `policy.default_ttl` (e.g. `24h`).
    #[arg(long, env = "MESHWARD_DEFAULT_TTL", value_parser = humantime::parse_duration)]
    default_ttl: Option<std::time::Duration>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

fn parse_key_alg(s: &str) -> Result<CaKeyAlgorithm, String> {
    match s {
        "ecdsa-p256" => Ok(CaKeyAlgorithm::EcdsaP256),
        "rsa-2048" => Ok(CaKeyAlgorithm::Rsa2048),
        other => Err(format!("{other:?}: expected ecdsa-p256 or rsa-2048")),
    }
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.trust_domain {
            config.trust_domain = v.clone();
        }
        if let Some(v) = self.grpc_addr {
            config.server.grpc_addr = v;
        }
        if let Some(v) = self.admin_addr {
            config.server.admin_addr = v;
        }
        if let Some(v) = &self.data_dir {
            config.ca.data_dir = v.clone();
        }
        if let Some(v) = self.ca_key_algorithm {
            config.ca.key_algorithm = v;
        }
        if let Some(v) = self.max_ttl {
            config.policy.max_ttl = v;
        }
        if let Some(v) = self.default_ttl {
            config.policy.default_ttl = v;
        }
        config.validate()?;
        Ok(config)
    }
}

/// `serve` logs to stdout; other commands to stderr. For `serve`, through a writer thread: a request only
/// formats its line and queues it; the thread writes whatever has queued in
/// one `write` (one line per syscall otherwise costs as much as a TLS
/// handshake's worth of CPU under load). The returned guard flushes the
/// queue when `main` ends. Lines beyond the queue's capacity (128 Ki) are
/// dropped, never blocking a request on a slow log pipe, and counted in
/// `meshward_signer_log_lines_dropped_total`.
fn init_logs(
    format: LogFormat,
    buffered: bool,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if !buffered {
        // A one-shot command prints its answer on stdout (`config`'s TOML,
        // `ca revocations -o json`): its logs go to stderr.
        let builder = builder.with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
        return None;
    }
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .finish(std::io::BufWriter::new(std::io::stdout()));
    meshward_signer::metrics::report_dropped_log_lines(writer.error_counter());
    let builder = builder.with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Some(guard)
}

/// `ledger import`: the SQLite file at `from` into the configured shared
/// store.
async fn import_ledger(config: &Config, from: &std::path::Path) -> anyhow::Result<String> {
    use meshward_signer::ledger::{PostgresLedger, SqliteLedger, SqliteOptions, import_sqlite};
    let Some(pg) = &config.ledger.postgres else {
        anyhow::bail!("ledger import copies into [ledger.postgres], which the config does not set");
    };
    if !from.is_file() {
        anyhow::bail!("{}: no such ledger file", from.display());
    }
    let source = SqliteLedger::open(&SqliteOptions {
        path: from.to_path_buf(),
        busy_timeout: config.ledger.busy_timeout,
        commit_delay: std::time::Duration::ZERO,
    })?;
    let opts = pg.options(config.ledger.commit_delay)?;
    let target = PostgresLedger::open(&opts, None).await?;
    let report = import_sqlite(&source, &target).await?;
    info!(
        from = %from.display(),
        read = report.read,
        inserted = report.inserted,
        replica = %opts.replica,
        "ledger imported"
    );
    Ok(format!(
        "imported {} new records of {} read from {} (recorded_by {}; the rest were already there)",
        report.inserted,
        report.read,
        from.display(),
        opts.replica
    ))
}

/// mimalloc instead of glibc malloc: per-request allocations (h2 frames,
/// protobuf, DER) cost ~10 % of the signer's CPU with glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _log_guard = init_logs(cli.log_format, matches!(cli.command, Command::Serve(_)));
    match cli.command {
        Command::Config(args) => {
            print!("{}", args.load()?.to_toml()?);
            Ok(())
        }
        Command::Policy(PolicyCommand::Explain(args)) => {
            let config = args.config.load()?;
            let labels: std::collections::BTreeMap<String, String> =
                args.labels.into_iter().collect();
            print!("{}", explain(&config, &args.ns, &args.sa, &labels)?);
            Ok(())
        }
        Command::Ledger(LedgerCommand::Import(args)) => {
            let config = args.config.load()?;
            println!("{}", import_ledger(&config, &args.from).await?);
            Ok(())
        }
        Command::Ca(args) => {
            let config = args.config.load()?;
            if let meshward_signer::bundle::rotation::CaCommand::Revocation(cmd) = &args.command {
                let ledger = meshward_signer::ledger::LedgerService::open(
                    &config.ledger,
                    &config.ca.data_dir,
                )
                .await?
                .context("revocations live in the ledger, and [ledger] enabled = false")?;
                // With Vault, revocations go to Vault's PKI too (its CRL).
                let vault = match (config.ca.backend.as_str(), &config.ca.vault) {
                    ("vault", Some(v)) => Some(
                        meshward_signer::issuer::vault::VaultIssuer::connect(v)
                            .await
                            .map_err(|e| anyhow::anyhow!("[ca.vault]: {e}"))?,
                    ),
                    _ => None,
                };
                match meshward_signer::revocation::run(
                    cmd,
                    ledger.ledger().as_ref(),
                    vault
                        .as_ref()
                        .map(|v| v as &dyn meshward_signer::issuer::Issuer),
                    time::OffsetDateTime::now_utc(),
                )
                .await
                {
                    Ok(out) => {
                        print!("{out}");
                        return Ok(());
                    }
                    Err(why) => anyhow::bail!("{why}"),
                }
            }
            if matches!(
                args.command,
                meshward_signer::bundle::rotation::CaCommand::CheckVault
            ) {
                let vault = config
                    .ca
                    .vault
                    .as_ref()
                    .context("ca check-vault needs [ca.vault] in the configuration")?;
                match meshward_signer::issuer::vault::check(vault).await {
                    Ok(report) => {
                        print!("{report}");
                        return Ok(());
                    }
                    Err(why) => anyhow::bail!("{why}"),
                }
            }
            print!(
                "{}",
                meshward_signer::bundle::rotation::run_ca_command(
                    &args.command,
                    &config,
                    time::OffsetDateTime::now_utc()
                )?
            );
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.load()?;
            let signer = meshward_signer::Signer::start(config)
                .await
                .context("starting the signer")?;
            #[cfg(unix)]
            {
                let reloader = signer.reloader();
                tokio::spawn(reload_on_sighup(args, reloader));
            }
            let stopper = signer.stopper();
            tokio::spawn(async move {
                shutdown_signal().await;
                info!("shutting down");
                stopper.stop();
            });
            signer
                .wait()
                .await
                .map_err(|e| anyhow::anyhow!("signer stopped: {e}"))
        }
    }
}

fn explain(
    config: &Config,
    ns: &str,
    sa: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let td = spiffe::TrustDomain::new(&config.trust_domain)?;
    let id = spiffe::SpiffeId::from_segments(td, &["ns", ns, "sa", sa])
        .with_context(|| format!("{ns}/{sa} does not make a valid SPIFFE ID"))?;
    let policy = config.issuance_policy()?;
    let effective = policy.for_namespace(ns, Some(labels));
    let tier_source = policy
        .tiers
        .iter()
        .find(|t| t.name == effective.tier)
        .map(|t| {
            let labels: Vec<String> = t.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            match (t.namespaces.is_empty(), labels.is_empty()) {
                (_, true) => t.namespaces.to_string(),
                (true, false) => format!("namespace labels {}", labels.join(",")),
                (false, false) => {
                    format!("{}, or namespace labels {}", t.namespaces, labels.join(","))
                }
            }
        })
        .unwrap_or_else(|| "no [[policy.tiers]] entry matches this namespace".to_string());
    let node_agent = config
        .trusted_node_accounts()
        .iter()
        .any(|(n, s)| n == ns && s == sa);
    let hd = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let mut out = String::new();
    writeln!(out, "identity:          {id}")?;
    writeln!(out, "tier:              {} ({tier_source})", effective.tier)?;
    writeln!(
        out,
        "default TTL:       {} (validity_duration = 0)",
        hd(effective.ttl.default_ttl)
    )?;
    writeln!(
        out,
        "max TTL:           {} (longer requests are clamped to it; negative ones refused)",
        hd(effective.ttl.max_ttl)
    )?;
    writeln!(
        out,
        "backdate:          {} (never before, nor after, the signing CA's validity)",
        hd(effective.ttl.backdate)
    )?;
    if policy.needs_labels() && labels.is_empty() {
        writeln!(
            out,
            "note:              some tiers select namespaces by label; pass the namespace's labels with --label key=value"
        )?;
    }
    writeln!(
        out,
        "key types:         {}",
        effective
            .allowed_keys
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "node agent:        {}",
        if node_agent && config.authn.node_authorization.is_some() {
            "yes: may request, with ImpersonatedIdentity, the identities of pods on its own node"
        } else if node_agent {
            "yes: may request ANY identity with ImpersonatedIdentity (authn.unbound_node_agents)"
        } else {
            "no: ImpersonatedIdentity is refused (PERMISSION_DENIED)"
        }
    )?;
    let p = &config.policy;
    writeln!(
        out,
        "rate limit:        {}",
        if p.rate_limit_burst == 0 || p.rate_limit_interval.is_zero() {
            "none".to_string()
        } else {
            format!(
                "{} requests at once per pod, then one per {} (RESOURCE_EXHAUSTED beyond)",
                p.rate_limit_burst,
                hd(p.rate_limit_interval)
            )
        }
    )?;
    let issuers: Vec<String> = config
        .authn
        .jwt
        .iter()
        .map(|j| format!("{} (aud {})", j.issuer, j.audiences.join("|")))
        .collect();
    writeln!(out, "token issuers:     {}", issuers.join("; "))?;
    writeln!(
        out,
        "mTLS renewal:      {}",
        if config.authn.mtls_renewal {
            "on: a valid certificate from this CA renews its own identity without a token"
        } else {
            "off"
        }
    )?;
    Ok(out)
}

/// `SIGHUP`: read the configuration again from the same file, environment
/// and flags, and apply what a running signer can change (see
/// [`meshward_signer::runtime::Reloader`]). A configuration that does not
/// load or validate is refused with an error line; the running one stays.
#[cfg(unix)]
async fn reload_on_sighup(args: ServeArgs, reloader: meshward_signer::runtime::Reloader) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: configuration reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        let next = match args.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "configuration reload refused; the running configuration stays");
                continue;
            }
        };
        match reloader.reload(next) {
            Ok(report) => {
                if !report.need_restart.is_empty() {
                    tracing::warn!(sections = ?report.need_restart, "changed settings that take effect only after a restart (running values kept)");
                }
                info!(applied = ?report.applied, "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays")
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
