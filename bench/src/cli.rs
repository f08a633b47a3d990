//! Command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::load::h2load::Identities;
use crate::workload::KeyType;

/// meshward benchmarks: signer throughput against the `openssl speed` bound,
/// a mass restart, and the filter's decision cost natively and in wasm.
/// `scripts/bench` builds everything in release and runs `run`.
#[derive(Debug, Parser)]
#[command(name = "meshward-bench", version)]
pub struct Cli {
    /// TOML file overriding the embedded defaults key by key
    /// (see bench/src/config/defaults.toml).
    #[arg(long, short = 'c', global = true, env = "MESHWARD_BENCH_CONFIG")]
    pub config: Option<PathBuf>,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything; writes BENCHMARKS.md (unless --check without --output).
    Run(RunArgs),
    /// Signer throughput: N istio-agent-like clients against a child signer.
    Load(LoadArgs),
    /// Mass restart: N clients asking at once, retrying with backoff.
    Restart(RestartArgs),
    /// Filter decision cost (native and, when the .wasm exists, in wasm).
    Filter(FilterArgs),
    /// Print the effective configuration.
    Config,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Quick version: exit non-zero when a target is missed.
    #[arg(long)]
    pub check: bool,
    /// Markdown report path (default BENCHMARKS.md for a full run).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only this section (and check only its targets); writes no
    /// BENCHMARKS.md, only `--output` (that section alone) and `--json`.
    #[arg(long, value_enum)]
    pub only: Option<Section>,
    /// With --only: put that section's tables and target rows into the
    /// existing report (`--output`, default BENCHMARKS.md) in place of its
    /// previous ones, leaving every other section's figures as they were.
    #[arg(long, requires = "only", conflicts_with = "check")]
    pub merge: bool,
}

/// A section `run --only` can run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// The filter in real Envoy against Envoy's RBAC and an empty plugin.
    EnvoyAuthz,
    /// The signer against OpenBao's PKI secrets engine (it runs its own
    /// signer rows for the comparison).
    Openbao,
}

/// `load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// CSR (and CA) key type.
    #[arg(long, value_enum, default_value_t = KeyType::P256)]
    pub key: KeyType,
    /// Concurrent clients; repeat or comma-separate for several runs.
    #[arg(long, short = 'n', value_delimiter = ',', default_values_t = [64usize])]
    pub concurrency: Vec<usize>,
    /// Measurement window.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// Run the signer with its issuance ledger off.
    #[arg(long, conflicts_with = "postgres_ledger")]
    pub no_ledger: bool,
    /// Record into a PostgreSQL server the bench starts (`[ledger.postgres]`)
    /// instead of the SQLite file.
    #[arg(long)]
    pub postgres_ledger: bool,
    /// Drive the signer with h2load instead of the Rust clients, -n
    /// connections: `one-identity` = one h2load process, every connection
    /// with the same token and CSR; `identities` = one h2load process per
    /// connection, each with its own identity (the Rust clients'). Both
    /// comma-separated run one after the other on the same signer.
    /// Certificates are counted by the signer (its /metrics).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "IDENTITIES")]
    pub h2load: Vec<Identities>,
}

/// `restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Clients starting at once.
    #[arg(long, short = 'n')]
    pub clients: Option<usize>,
}

/// `filter`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Rule counts; repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub rules: Vec<usize>,
    /// Native only (skip the wasm host).
    #[arg(long)]
    pub native_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("meshward-bench").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_check_with_output_and_global_config() {
        let cli = parse(&["run", "--check", "-o", "out.md", "--config", "b.toml"]).unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("b.toml")));
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert!(run.check);
        assert_eq!(run.output, Some(PathBuf::from("out.md")));
        assert_eq!(run.json, None);
        assert_eq!(run.only, None);
        let Command::Run(only) = parse(&["run", "--only", "envoy-authz"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(only.only, Some(Section::EnvoyAuthz));
        assert!(!only.merge);
        assert!(parse(&["run", "--only", "signer"]).is_err());
        let Command::Run(bao) = parse(&["run", "--only", "openbao", "--merge"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert_eq!((bao.only, bao.merge), (Some(Section::Openbao), true));
        // Merging needs a section, and a quick check never writes the report.
        assert!(parse(&["run", "--merge"]).is_err());
        assert!(parse(&["run", "--only", "openbao", "--merge", "--check"]).is_err());
    }

    #[test]
    fn load_takes_comma_separated_concurrency_key_and_window() {
        let cli = parse(&[
            "load", "--key", "rsa2048", "-n", "1,64,512", "--window", "1500ms",
        ])
        .unwrap();
        let Command::Load(load) = cli.command else {
            panic!("not load")
        };
        assert_eq!(load.key, KeyType::Rsa2048);
        assert_eq!(load.concurrency, vec![1, 64, 512]);
        assert_eq!(load.window, Some(Duration::from_millis(1500)));
        assert!(!load.no_ledger);
        let Command::Load(default) = parse(&["load"]).unwrap().command else {
            panic!("not load")
        };
        assert_eq!(
            (default.key, default.concurrency),
            (KeyType::P256, vec![64])
        );
        assert!(default.h2load.is_empty());
    }

    #[test]
    fn load_takes_the_h2load_identities() {
        let Command::Load(one) = parse(&["load", "--h2load", "one-identity"])
            .unwrap()
            .command
        else {
            panic!("not load")
        };
        assert_eq!(one.h2load, vec![Identities::One]);
        let Command::Load(both) =
            parse(&["load", "--h2load", "identities,one-identity", "-n", "64"])
                .unwrap()
                .command
        else {
            panic!("not load")
        };
        assert_eq!(both.h2load, vec![Identities::PerClient, Identities::One]);
        assert!(parse(&["load", "--h2load", "many"]).is_err());
        assert!(parse(&["load", "--h2load"]).is_err());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["load", "--key", "dsa"]).is_err());
        assert!(parse(&["load", "-n", "many"]).is_err());
        assert!(parse(&["load", "--window", "soon"]).is_err());
        assert!(parse(&["run", "--chek"]).is_err());
    }
}
