//! What to measure and how long: embedded defaults (`config/defaults.toml`),
//! optionally replaced key by key from a `--config` file; `--check` shrinks
//! it to the quick version.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::workload::KeyType;

/// The embedded defaults.
pub const DEFAULTS_TOML: &str = include_str!("config/defaults.toml");

/// Everything a run uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    /// Signer throughput.
    pub signer: SignerBench,
    /// Mass restart.
    pub restart: RestartBench,
    /// Filter decision cost.
    pub filter: FilterBench,
    /// `openssl speed`.
    pub openssl: OpensslBench,
    /// The filter in real Envoy against Envoy's RBAC and an empty plugin.
    pub envoy: EnvoyBench,
    /// The signer against OpenBao's PKI secrets engine.
    pub openbao: OpenbaoBench,
    /// Targets `--check` enforces.
    pub targets: Targets,
}

/// Signer throughput settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerBench {
    /// The `meshward-signer` binary; empty = next to `meshward-bench`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Where the signers' data dirs (CA, ledger) go; empty = the system temp dir.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Key types to measure.
    pub key_types: Vec<KeyType>,
    /// Concurrent clients per measurement.
    pub concurrency: Vec<usize>,
    /// Warm-up before each window.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// Measurement window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// `server.max_concurrent_requests` for the throughput runs (above the
    /// largest concurrency, so every request is admitted).
    pub max_concurrent_requests: usize,
    /// Keep the issuance ledger on (the signer's default).
    pub ledger: bool,
    /// Also measure P-256 at this concurrency with the ledger off (0 = skip).
    pub no_ledger_concurrency: usize,
    /// Also measure P-256 at this concurrency with the ledger in a local
    /// PostgreSQL server (0 = skip).
    #[serde(default)]
    pub postgres_concurrency: usize,
    /// Also drive the P-256 signer with h2load at this many connections,
    /// once with one identity and once with one identity per connection
    /// (0 = skip; `[envoy] h2load` is the binary).
    #[serde(default)]
    pub h2load_concurrency: usize,
    /// Distinct RSA keys shared by the RSA workloads.
    pub rsa_keys: usize,
}

/// Mass-restart settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartBench {
    /// Skip it.
    pub enabled: bool,
    /// Clients starting at once.
    pub clients: usize,
    /// Further runs with these many clients (a whole mesh restarting).
    pub also_clients: Vec<usize>,
    /// Their key type.
    pub key_type: KeyType,
    /// `server.max_concurrent_requests` (the signer's default is 256).
    pub max_concurrent_requests: usize,
    /// Give up after this long.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Largest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Delay growth per attempt.
    pub backoff_multiplier: f64,
}

/// Filter settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterBench {
    /// Rule counts.
    pub rules: Vec<usize>,
    /// Timed batches per measurement.
    pub samples: usize,
    /// Every measurement is repeated this many times, the rule counts and
    /// filter types interleaved (round 1 of every slot, then round 2, …),
    /// each wasm round with a freshly loaded plugin; a figure is the median
    /// of its rounds' figures, so a burst of other work on the machine
    /// during one round moves none of them.
    pub rounds: usize,
    /// Wall time of one batch.
    #[serde(with = "humantime_serde")]
    pub batch: Duration,
    /// The plugin; empty = `MESHWARD_FILTER_WASM`, else `target/meshward_filter.wasm`.
    #[serde(default)]
    pub wasm: Option<PathBuf>,
}

/// Settings of the real-Envoy authorization comparison (`envoy_authz.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyBench {
    /// Skip it.
    pub enabled: bool,
    /// Rule / policy counts (the client allowed only by the last).
    pub rules: Vec<usize>,
    /// Every configuration once per round, interleaved; figures are medians.
    pub rounds: usize,
    /// h2load clients (`-c`).
    pub clients: usize,
    /// Concurrent streams per client (`-m`).
    pub streams: usize,
    /// Warm-up load before each measurement (`h2load -D`; it also gives the
    /// rate the measured request count is sized from).
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// About how long each measurement lasts: `warm-up rate × window`
    /// requests, at least `min_requests`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fewest requests per measurement.
    pub min_requests: u64,
    /// Requests per second h2load sends to each HTTP configuration that
    /// sustains it, all such configurations at once (their server CPUs read
    /// over the same interval); the others run alone, closed loop. 0: every
    /// configuration alone, closed loop.
    #[serde(default)]
    pub http_rate: u64,
    /// The same for the network filters (connections per second: one
    /// request per connection).
    #[serde(default)]
    pub network_rate: u64,
    /// Pin the server Envoy to a CPU of its own and the client Envoy and
    /// h2load to the others (needs at least 2 CPUs; `taskset`), so the
    /// server's CPU per request is not inflated by sharing a core (and its
    /// caches) with the load it is measured under.
    #[serde(default = "pin_by_default")]
    pub pin: bool,
    /// The h2load binary; empty = `h2load` on `PATH`.
    #[serde(default)]
    pub h2load: Option<PathBuf>,
    /// The empty plugin; empty = `MESHWARD_NOOP_WASM`, else
    /// `target/meshward_noop_plugin.wasm`.
    #[serde(default)]
    pub noop_wasm: Option<PathBuf>,
}

fn pin_by_default() -> bool {
    true
}

/// Settings of the signer vs OpenBao PKI comparison (`openbao.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenbaoBench {
    /// Skip it.
    pub enabled: bool,
    /// Concurrent clients per measurement (the signer rows' concurrencies).
    pub concurrency: Vec<usize>,
    /// Every cell once per round, interleaved; figures are medians.
    pub rounds: usize,
    /// Warm-up before each window.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// Measurement window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Also at this concurrency with nothing recorded: meshward's ledger
    /// off, OpenBao's role `no_store = true` (0 = skip).
    pub no_store_concurrency: usize,
    /// The `bao` binary; empty = `MESHWARD_BAO`, else `scripts/openbao --path`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// `openssl speed` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpensslBench {
    /// `-seconds` per operation.
    pub seconds: u32,
}

/// The targets of issue 9.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Signer / bound for P-256, at least.
    pub p256_ratio: f64,
    /// Median wasm decision at `flat_from` rules, at most (µs).
    pub wasm_median_us: f64,
    /// Wasm / native, at most.
    pub wasm_over_native: f64,
    /// Median at `flat_to` rules / median at `flat_from` rules, at most.
    pub flat_ratio: f64,
    /// Lower rule count of the flatness check.
    pub flat_from: usize,
    /// Upper rule count of the flatness check.
    pub flat_to: usize,
    /// `.wasm` size, at most (KiB).
    pub wasm_kib: u64,
    /// In Envoy: meshward's marginal CPU / RBAC's, at every rule count, at most.
    pub envoy_over_rbac: f64,
    /// In Envoy: meshward's marginal CPU / the empty plugin's, at every
    /// rule count, at most.
    pub envoy_over_noop: f64,
    /// In Envoy: meshward's marginal CPU at the largest rule count / at the
    /// smallest, at most.
    pub envoy_flat_ratio: f64,
    /// meshward's certificates per server CPU-second / OpenBao's, at
    /// `openbao_clients` clients, at least.
    pub openbao_ratio: f64,
    /// The concurrency that ratio is checked at.
    pub openbao_clients: usize,
}

mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl BenchConfig {
    /// The embedded defaults.
    pub fn defaults() -> anyhow::Result<Self> {
        Self::from_toml(DEFAULTS_TOML, "embedded defaults")
    }

    /// Parse a whole config.
    pub fn from_toml(text: &str, origin: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).with_context(|| format!("parsing {origin}"))?;
        config
            .validate()
            .with_context(|| format!("checking {origin}"))?;
        Ok(config)
    }

    /// The defaults with every key present in `text` replaced (tables merged).
    pub fn defaults_overridden_by(text: &str, origin: &str) -> anyhow::Result<Self> {
        let mut base: toml::Table = toml::from_str(DEFAULTS_TOML).context("embedded defaults")?;
        let over: toml::Table =
            toml::from_str(text).with_context(|| format!("parsing {origin}"))?;
        merge(&mut base, over);
        let merged = toml::to_string(&base).context("re-serialising the merged config")?;
        Self::from_toml(&merged, origin)
    }

    /// The quick version `--check` runs: P-256 only at one concurrency,
    /// short windows, no restart, fewer filter samples, only the rule
    /// counts the targets name, and the Envoy section in one round of short
    /// runs (at every rule count: its targets name them all).
    pub fn quick(mut self) -> Self {
        self.signer.key_types = vec![KeyType::P256];
        let c = self
            .signer
            .concurrency
            .iter()
            .copied()
            .find(|&c| c >= 16)
            .unwrap_or(64);
        self.signer.concurrency = vec![c];
        self.signer.warmup = Duration::from_millis(500);
        self.signer.window = Duration::from_secs(2);
        self.signer.no_ledger_concurrency = 0;
        self.signer.postgres_concurrency = 0;
        self.signer.h2load_concurrency = 0;
        self.restart.enabled = false;
        self.filter.rules = vec![self.targets.flat_from, self.targets.flat_to];
        self.filter.samples = self.filter.samples.min(50);
        self.filter.rounds = self.filter.rounds.min(3);
        self.openssl.seconds = 1;
        // Every rule count: the Envoy targets hold at each of them.
        self.envoy.rounds = 1;
        self.envoy.window = self.envoy.window.min(Duration::from_secs(2));
        // The OpenBao target's concurrency only, one round, recorded only.
        self.openbao.concurrency = vec![self.targets.openbao_clients];
        self.openbao.rounds = 1;
        self.openbao.warmup = self.openbao.warmup.min(Duration::from_millis(500));
        self.openbao.window = self.openbao.window.min(Duration::from_secs(2));
        self.openbao.no_store_concurrency = 0;
        self
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.signer.concurrency.contains(&0),
            "signer.concurrency: 0 clients"
        );
        anyhow::ensure!(
            self.signer.window > Duration::ZERO,
            "signer.window must be > 0"
        );
        anyhow::ensure!(self.restart.clients > 0, "restart.clients must be > 0");
        anyhow::ensure!(
            !self.restart.also_clients.contains(&0),
            "restart.also_clients: 0 clients"
        );
        anyhow::ensure!(
            self.restart.backoff_multiplier >= 1.0,
            "restart.backoff_multiplier must be ≥ 1"
        );
        anyhow::ensure!(!self.filter.rules.contains(&0), "filter.rules: 0 rules");
        anyhow::ensure!(self.filter.samples > 0, "filter.samples must be > 0");
        anyhow::ensure!(self.filter.rounds > 0, "filter.rounds must be > 0");
        anyhow::ensure!(self.openssl.seconds > 0, "openssl.seconds must be > 0");
        anyhow::ensure!(
            !self.envoy.rules.is_empty() && !self.envoy.rules.contains(&0),
            "envoy.rules: at least one count, none 0"
        );
        anyhow::ensure!(self.envoy.rounds > 0, "envoy.rounds must be > 0");
        anyhow::ensure!(
            self.envoy.clients > 0 && self.envoy.streams > 0,
            "envoy.clients and envoy.streams must be > 0"
        );
        anyhow::ensure!(
            self.envoy.window > Duration::ZERO && self.envoy.warmup > Duration::ZERO,
            "envoy.window and envoy.warmup must be > 0"
        );
        anyhow::ensure!(
            !self.openbao.concurrency.is_empty() && !self.openbao.concurrency.contains(&0),
            "openbao.concurrency: at least one, none 0"
        );
        anyhow::ensure!(self.openbao.rounds > 0, "openbao.rounds must be > 0");
        anyhow::ensure!(
            self.openbao.window > Duration::ZERO,
            "openbao.window must be > 0"
        );
        anyhow::ensure!(
            self.targets.openbao_clients > 0,
            "targets.openbao_clients must be > 0"
        );
        Ok(())
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_name_the_issue_targets() {
        let c = BenchConfig::defaults().unwrap();
        assert_eq!(c.signer.concurrency, vec![1, 64, 512]);
        assert_eq!(c.signer.key_types, vec![KeyType::P256, KeyType::Rsa2048]);
        assert_eq!(c.filter.rules, vec![10, 1_000, 10_000]);
        assert_eq!(c.restart.clients, 2_000);
        assert_eq!(c.restart.also_clients, vec![10_000]);
        assert_eq!(c.targets.p256_ratio, 0.5);
        assert!(c.signer.max_concurrent_requests >= 512);
        // The h2load rows at the Rust load's 64 clients, on by default.
        assert_eq!(c.signer.h2load_concurrency, 64);
        assert!(c.signer.concurrency.contains(&c.signer.h2load_concurrency));
    }

    #[test]
    fn a_file_overrides_only_the_keys_it_names() {
        let c = BenchConfig::defaults_overridden_by(
            "[signer]\nconcurrency = [8]\nwindow = \"500ms\"\n[restart]\nenabled = false\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.signer.concurrency, vec![8]);
        assert_eq!(c.signer.window, Duration::from_millis(500));
        assert!(!c.restart.enabled);
        assert_eq!(c.restart.clients, 2_000);
        assert_eq!(c.filter.rules, vec![10, 1_000, 10_000]);
    }

    #[test]
    fn unknown_keys_and_nonsense_values_are_refused() {
        assert!(BenchConfig::defaults_overridden_by("[signer]\nconcurency = [8]\n", "t").is_err());
        assert!(BenchConfig::defaults_overridden_by("[signer]\nconcurrency = [0]\n", "t").is_err());
        assert!(BenchConfig::defaults_overridden_by("[signer]\nwindow = \"soon\"\n", "t").is_err());
        assert!(
            BenchConfig::defaults_overridden_by("[signer]\nkey_types = [\"dsa\"]\n", "t").is_err()
        );
    }

    #[test]
    fn quick_version_keeps_the_checked_rule_counts_and_drops_the_restart() {
        let c = BenchConfig::defaults().unwrap().quick();
        assert_eq!(c.signer.key_types, vec![KeyType::P256]);
        assert_eq!(c.signer.concurrency, vec![64]);
        assert_eq!(c.filter.rules, vec![1_000, 10_000]);
        assert!(!c.restart.enabled);
        assert_eq!(c.signer.h2load_concurrency, 0);
        assert_eq!(c.envoy.rules, vec![10, 1_000, 10_000]);
        assert_eq!(c.envoy.rounds, 1);
        assert_eq!(c.openbao.concurrency, vec![64]);
        assert_eq!((c.openbao.rounds, c.openbao.no_store_concurrency), (1, 0));
    }

    #[test]
    fn openbao_defaults_match_the_signer_rows_and_the_issue_target() {
        let c = BenchConfig::defaults().unwrap();
        assert!(c.openbao.enabled);
        assert_eq!(c.openbao.concurrency, c.signer.concurrency);
        assert_eq!(c.openbao.window, c.signer.window);
        assert_eq!(c.targets.openbao_ratio, 5.0);
        assert_eq!(c.targets.openbao_clients, 64);
        assert!(BenchConfig::defaults_overridden_by("[openbao]\nrounds = 0\n", "t").is_err());
        assert!(BenchConfig::defaults_overridden_by("[openbao]\nconcurrency = []\n", "t").is_err());
    }
}
