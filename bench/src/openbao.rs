//! The signer against what users would pick instead for a mesh CA: OpenBao's
//! PKI secrets engine, `pki_int/sign/ROLE`, driven with the same pre-made
//! P-256 CSRs at the same concurrencies as the signer rows.
//!
//! Three servers run side by side for the whole section, each a child
//! process whose CPU is read from `/proc/<pid>/stat` (utime + stime, every
//! thread) at the edges of each measured window:
//!
//! - the release `meshward-signer` (P-256 built-in CA, SQLite ledger: every
//!   issuance recorded before the answer), driven by `load.rs` exactly as
//!   the signer rows are;
//! - `bao server -dev` (storage in memory);
//! - `bao server` on `raft` storage in a temp dir (initialised and unsealed
//!   with one key share) — OpenBao's supported on-disk backend: the `file`
//!   backend was removed in OpenBao 2.7.0.
//!
//! Both OpenBao servers listen on 127.0.0.1 over HTTPS with a P-256
//! certificate made here, hold a root (`pki`) and an `istioca` intermediate
//! (`pki_int`), both EC P-256 keys generated inside OpenBao, and a role that
//! allows exactly `spiffe://cluster.local/*` URI SANs, no CN, 24 h TTL (the
//! signer's default). Each OpenBao client holds one keep-alive HTTP/1.1 TLS
//! connection (reqwest, as the signer's own Vault backend talks to Vault)
//! and sends `POST /v1/pki_int/sign/ROLE` with a token whose only policy is
//! that path, in a closed loop.
//!
//! Every configuration runs once per round, the rounds interleaved; figures
//! are medians of the rounds, and each OpenBao ratio is the median of the
//! rounds' ratios against the meshward run just before it.
//!
//! This file holds what is pure (server configs, request bodies, answers,
//! medians); `openbao/server.rs` runs a `bao` server and
//! `openbao/harness.rs` the comparison.

mod harness;
mod server;

pub use harness::{Setup, measure};

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::stats::{Summary, median};

/// The intermediate's mount; the role signs there.
pub const INT_MOUNT: &str = "pki_int";
/// The root's mount.
pub const ROOT_MOUNT: &str = "pki";
/// The role that stores every certificate (`no_store = false`).
pub const ROLE: &str = "istio";
/// The same role with `no_store = true`.
pub const NO_STORE_ROLE: &str = "istio-no-store";
/// The only policy of the token the load uses.
pub const SIGN_POLICY: &str = "meshward-bench-sign";
/// Leaf lifetime, the signer's `policy.default_ttl`.
pub const LEAF_TTL: &str = "24h";

/// Which server a measurement ran against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// The release `meshward-signer`.
    Meshward,
    /// `bao server -dev`: storage in memory.
    OpenbaoDev,
    /// `bao server` with raft storage on disk.
    OpenbaoRaft,
}

impl Server {
    /// The OpenBao servers, in the order each round runs them.
    pub const OPENBAO: [Server; 2] = [Server::OpenbaoDev, Server::OpenbaoRaft];

    /// Report label.
    pub fn label(self) -> &'static str {
        match self {
            Server::Meshward => "meshward",
            Server::OpenbaoDev => "OpenBao dev (in memory)",
            Server::OpenbaoRaft => "OpenBao raft (on disk)",
        }
    }

    /// Whether it is an OpenBao server.
    pub fn is_openbao(self) -> bool {
        self != Server::Meshward
    }
}

/// How a `bao server` keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `-dev`: in memory, started unsealed.
    Dev,
    /// `storage "raft"` in a directory; `init` + `unseal`.
    Raft,
}

impl Storage {
    /// A file-name tag.
    pub fn tag(self) -> &'static str {
        match self {
            Storage::Dev => "dev",
            Storage::Raft => "raft",
        }
    }
}

/// One configuration: a server, whether it records each certificate, and
/// the clients driving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// What answered.
    pub server: Server,
    /// meshward: the SQLite ledger on; OpenBao: the role's `no_store = false`.
    pub stored: bool,
    /// Concurrent closed-loop clients.
    pub clients: usize,
}

/// Every configuration, in the order each round runs them: per concurrency
/// meshward then each OpenBao server, all recording; then, when
/// `unstored_clients > 0`, the same three at that concurrency recording
/// nothing (ledger off, `no_store = true`).
pub fn slots(concurrency: &[usize], unstored_clients: usize) -> Vec<Cell> {
    let trio = |clients: usize, stored: bool| {
        std::iter::once(Server::Meshward)
            .chain(Server::OPENBAO)
            .map(move |server| Cell {
                server,
                stored,
                clients,
            })
    };
    let mut out: Vec<Cell> = concurrency.iter().flat_map(|&c| trio(c, true)).collect();
    if unstored_clients > 0 {
        out.extend(trio(unstored_clients, false));
    }
    out
}

/// A string as an HCL string literal (HCL takes JSON's escapes).
fn hcl_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Where a server listens and with which certificate.
#[derive(Debug, Clone)]
pub struct Listener<'a> {
    /// API port on 127.0.0.1 (HTTPS).
    pub port: u16,
    /// Cluster port on 127.0.0.1.
    pub cluster_port: u16,
    /// PEM certificate of the listener.
    pub cert_file: &'a Path,
    /// Its PEM key.
    pub key_file: &'a Path,
}

/// The `bao server -config` file: the HTTPS listener, and for raft its
/// storage in `data_dir` and the addresses raft needs. (The dev server keeps
/// its own plaintext listener on `-dev-listen-address` too; the load never
/// uses it.)
pub fn server_config(storage: Storage, listener: &Listener<'_>, data_dir: &Path) -> String {
    let mut s = format!(
        "listener \"tcp\" {{\n  address = {}\n  cluster_address = {}\n  tls_cert_file = {}\n  tls_key_file = {}\n}}\n",
        hcl_string(&format!("127.0.0.1:{}", listener.port)),
        hcl_string(&format!("127.0.0.1:{}", listener.cluster_port)),
        hcl_string(&listener.cert_file.display().to_string()),
        hcl_string(&listener.key_file.display().to_string()),
    );
    if storage == Storage::Raft {
        s.push_str(&format!(
            "storage \"raft\" {{\n  path = {}\n  node_id = \"bench\"\n}}\napi_addr = {}\ncluster_addr = {}\n",
            hcl_string(&data_dir.display().to_string()),
            hcl_string(&format!("https://127.0.0.1:{}", listener.port)),
            hcl_string(&format!("https://127.0.0.1:{}", listener.cluster_port)),
        ));
    }
    s
}

/// The role: URI SANs under `spiffe://cluster.local/` only, taken from the
/// CSR; no CN, no DNS / IP / localhost names; client and server usage; the
/// signer's 24 h TTL; no lease. `no_store` decides whether OpenBao writes
/// each certificate to its storage (`certs/<serial>`).
pub fn role_body(no_store: bool) -> Value {
    json!({
        "allowed_uri_sans": "spiffe://cluster.local/*",
        "key_type": "any",
        "require_cn": false,
        "use_csr_common_name": false,
        "use_csr_sans": true,
        "allow_any_name": false,
        "allow_bare_domains": false,
        "allow_subdomains": false,
        "enforce_hostnames": false,
        "allow_ip_sans": false,
        "allow_localhost": false,
        "server_flag": true,
        "client_flag": true,
        "ttl": LEAF_TTL,
        "max_ttl": LEAF_TTL,
        "generate_lease": false,
        "no_store": no_store,
    })
}

/// The load token's only policy: signing with the bench's roles.
pub fn sign_policy() -> String {
    format!("path \"{INT_MOUNT}/sign/*\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n")
}

/// The body of `POST /v1/pki_int/sign/ROLE` for one CSR (the role's TTL).
pub fn sign_body(csr_pem: &str) -> String {
    json!({ "csr": csr_pem }).to_string()
}

#[derive(Deserialize)]
struct SignAnswer {
    data: SignData,
}

#[derive(Deserialize)]
struct SignData {
    certificate: String,
    #[serde(default)]
    ca_chain: Vec<String>,
}

/// What a sign answer carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The leaf (PEM).
    pub certificate: String,
    /// Certificates of `ca_chain`.
    pub chain_len: usize,
}

/// Reads a `pki/sign` answer: a PEM leaf in `data.certificate`.
pub fn parse_sign_answer(body: &[u8]) -> anyhow::Result<Signed> {
    let a: SignAnswer = serde_json::from_slice(body).with_context(|| {
        format!(
            "not a sign answer: {}",
            String::from_utf8_lossy(body.get(..body.len().min(300)).unwrap_or_default())
        )
    })?;
    anyhow::ensure!(
        a.data
            .certificate
            .starts_with("-----BEGIN CERTIFICATE-----"),
        "data.certificate is not a PEM certificate"
    );
    Ok(Signed {
        certificate: a.data.certificate,
        chain_len: a.data.ca_chain.len(),
    })
}

/// One configuration's measurement in one round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Round (1-based).
    pub round: usize,
    /// Certificates issued inside the window.
    pub issued: u64,
    /// Certificates per second (wall clock).
    pub certs_per_s: f64,
    /// Latency of the requests completed in the window (ms).
    pub latency_ms: Option<Summary>,
    /// The server's CPU in the window, in cores.
    pub server_cores: f64,
    /// The load generator's CPU in the window, in cores.
    pub loadgen_cores: f64,
    /// Certificates per server CPU-second.
    pub certs_per_server_cpu_s: f64,
    /// Server CPU per certificate in the kernel (µs).
    pub server_kernel_us_per_cert: f64,
    /// The server's peak resident memory so far (bytes).
    pub server_peak_rss: Option<u64>,
    /// Failed requests (any answer without a certificate).
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// /proc/loadavg (1 min) when the run started.
    pub loadavg: String,
}

impl Sample {
    /// A signer run of `load.rs`.
    pub fn of_signer(round: usize, t: &crate::load::Throughput, loadavg: String) -> Self {
        Self {
            round,
            issued: t.issued,
            certs_per_s: t.certs_per_s,
            latency_ms: t.latency_ms,
            server_cores: t.signer_cores,
            loadgen_cores: t.loadgen_cores,
            certs_per_server_cpu_s: t.certs_per_signer_cpu_s,
            server_kernel_us_per_cert: t.signer_kernel_us_per_cert,
            server_peak_rss: t.signer_memory.map(|m| m.peak_rss),
            errors: t.errors + t.resource_exhausted,
            first_error: t.first_error.clone(),
            loadavg,
        }
    }
}

/// One configuration over every round.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What ran.
    pub cell: Cell,
    /// Each round's figures, in the order they ran.
    pub samples: Vec<Sample>,
    /// Median certificates per second.
    pub certs_per_s: f64,
    /// Each latency percentile the median of the rounds'.
    pub latency_ms: Option<Summary>,
    /// Median server cores.
    pub server_cores: f64,
    /// Median load generator cores.
    pub loadgen_cores: f64,
    /// Median certificates per server CPU-second.
    pub certs_per_server_cpu_s: f64,
    /// Median kernel part of the server CPU per certificate (µs).
    pub server_kernel_us_per_cert: f64,
    /// Peak resident memory of the server over the rounds (bytes).
    pub server_peak_rss: Option<u64>,
    /// Failed requests over every round.
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// OpenBao rows: meshward's certificates per server CPU-second over
    /// this row's, per round (meshward's run of the same round, clients and
    /// recording); empty for meshward.
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios`.
    pub meshward_ratio: Option<f64>,
}

/// Everything the section measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpenbaoComparison {
    /// `bao version`.
    pub bao_version: String,
    /// /proc/loadavg when the section started.
    pub loadavg_start: String,
    /// … and when it ended.
    pub loadavg_end: String,
    /// UTC when the section started, RFC 3339.
    pub date: String,
    /// Measured window and warm-up (s) and rounds, for the report.
    pub window_s: f64,
    /// Warm-up before each window (s).
    pub warmup_s: f64,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Per configuration.
    pub rows: Vec<Row>,
}

impl OpenbaoComparison {
    /// The row of `cell`.
    pub fn row(&self, cell: Cell) -> Option<&Row> {
        self.rows.iter().find(|r| r.cell == cell)
    }

    /// The concurrencies measured, ascending, each once.
    pub fn concurrencies(&self, stored: bool) -> Vec<usize> {
        let mut c: Vec<usize> = self
            .rows
            .iter()
            .filter(|r| r.cell.stored == stored)
            .map(|r| r.cell.clients)
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }
}

/// The rows of `slots` from every round's samples: medians of the rounds,
/// each OpenBao ratio against meshward's run of the same round.
pub fn aggregate(slots: &[Cell], samples: &[(Cell, Sample)]) -> Vec<Row> {
    let meshward_in = |cell: Cell, round: usize| {
        let m = Cell {
            server: Server::Meshward,
            ..cell
        };
        samples
            .iter()
            .find(|(c, s)| *c == m && s.round == round)
            .map(|(_, s)| s.certs_per_server_cpu_s)
    };
    slots
        .iter()
        .filter_map(|&cell| {
            let mine: Vec<Sample> = samples
                .iter()
                .filter(|(c, _)| *c == cell)
                .map(|(_, s)| s.clone())
                .collect();
            let of = |f: fn(&Sample) -> f64| {
                let mut v: Vec<f64> = mine.iter().map(f).collect();
                median(&mut v)
            };
            let round_ratios: Vec<f64> = if cell.server.is_openbao() {
                mine.iter()
                    .filter(|s| s.certs_per_server_cpu_s > 0.0)
                    .filter_map(|s| {
                        meshward_in(cell, s.round).map(|m| m / s.certs_per_server_cpu_s)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut r = round_ratios.clone();
            let latencies: Vec<Summary> = mine.iter().filter_map(|s| s.latency_ms).collect();
            Some(Row {
                cell,
                certs_per_s: of(|s| s.certs_per_s)?,
                latency_ms: Summary::median_of_rounds(&latencies),
                server_cores: of(|s| s.server_cores)?,
                loadgen_cores: of(|s| s.loadgen_cores)?,
                certs_per_server_cpu_s: of(|s| s.certs_per_server_cpu_s)?,
                server_kernel_us_per_cert: of(|s| s.server_kernel_us_per_cert)?,
                server_peak_rss: mine.iter().filter_map(|s| s.server_peak_rss).max(),
                errors: mine.iter().map(|s| s.errors).sum(),
                first_error: mine.iter().find_map(|s| s.first_error.clone()),
                meshward_ratio: median(&mut r),
                round_ratios,
                samples: mine,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_concurrency_runs_meshward_then_both_openbao_servers() {
        let s = slots(&[1, 64], 64);
        assert_eq!(s.len(), 9);
        assert_eq!(
            s[0],
            Cell {
                server: Server::Meshward,
                stored: true,
                clients: 1
            }
        );
        assert_eq!(s[2].server, Server::OpenbaoRaft);
        assert_eq!((s[3].server, s[3].clients), (Server::Meshward, 64));
        assert!(s[..6].iter().all(|c| c.stored));
        assert!(s[6..].iter().all(|c| !c.stored && c.clients == 64));
        assert_eq!(slots(&[512], 0).len(), 3);
    }

    #[test]
    fn raft_config_has_its_storage_and_addresses_and_quotes_paths() {
        let l = Listener {
            port: 4000,
            cluster_port: 4001,
            cert_file: Path::new("/tmp/a \"b\"/cert.pem"),
            key_file: Path::new("/tmp/key.pem"),
        };
        let raft = server_config(Storage::Raft, &l, Path::new("/tmp/data"));
        assert!(raft.contains("address = \"127.0.0.1:4000\""), "{raft}");
        assert!(raft.contains("cluster_address = \"127.0.0.1:4001\""));
        assert!(raft.contains("tls_cert_file = \"/tmp/a \\\"b\\\"/cert.pem\""));
        assert!(raft.contains("storage \"raft\" {\n  path = \"/tmp/data\""));
        assert!(raft.contains("api_addr = \"https://127.0.0.1:4000\""));
        let dev = server_config(Storage::Dev, &l, Path::new("/tmp/data"));
        assert!(
            !dev.contains("storage") && !dev.contains("api_addr"),
            "{dev}"
        );
        assert!(dev.contains("tls_key_file = \"/tmp/key.pem\""));
    }

    #[test]
    fn role_allows_only_spiffe_uris_and_decides_storage() {
        let stored = role_body(false);
        assert_eq!(stored["allowed_uri_sans"], "spiffe://cluster.local/*");
        assert_eq!(stored["no_store"], false);
        assert_eq!(stored["require_cn"], false);
        assert_eq!(stored["use_csr_sans"], true);
        assert_eq!(stored["allow_any_name"], false);
        assert_eq!(stored["ttl"], "24h");
        assert_eq!(role_body(true)["no_store"], true);
        assert!(sign_policy().contains("path \"pki_int/sign/*\""));
        let body: Value = serde_json::from_str(&sign_body("-----BEGIN\n\"x\"")).unwrap();
        assert_eq!(body["csr"], "-----BEGIN\n\"x\"");
    }

    #[test]
    fn sign_answers_need_a_pem_leaf() {
        let ok = br#"{"data":{"certificate":"-----BEGIN CERTIFICATE-----\nMII","ca_chain":["a","b"],"serial_number":"1"}}"#;
        assert_eq!(parse_sign_answer(ok).unwrap().chain_len, 2);
        assert!(parse_sign_answer(br#"{"errors":["permission denied"]}"#).is_err());
        assert!(parse_sign_answer(br#"{"data":{"certificate":""}}"#).is_err());
        assert!(parse_sign_answer(b"<html>").is_err());
    }

    fn sample(round: usize, per_cpu_s: f64) -> Sample {
        Sample {
            round,
            issued: 100,
            certs_per_s: per_cpu_s,
            latency_ms: None,
            server_cores: 1.0,
            loadgen_cores: 0.5,
            certs_per_server_cpu_s: per_cpu_s,
            server_kernel_us_per_cert: 20.0,
            server_peak_rss: Some(round as u64),
            errors: 0,
            first_error: None,
            loadavg: "1.0".into(),
        }
    }

    #[test]
    fn ratios_are_per_round_against_meshward_of_the_same_round() {
        let slots = slots(&[64], 0);
        let (m, dev) = (slots[0], slots[1]);
        let samples = vec![
            (m, sample(1, 5000.0)),
            (dev, sample(1, 1000.0)),
            (m, sample(2, 3000.0)),
            (dev, sample(2, 1000.0)),
            (m, sample(3, 4800.0)),
            (dev, sample(3, 800.0)),
        ];
        let rows = aggregate(&slots, &samples);
        // Raft never ran: no row.
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].meshward_ratio, None);
        assert_eq!(rows[0].certs_per_server_cpu_s, 4800.0);
        assert_eq!(rows[1].round_ratios, vec![5.0, 3.0, 6.0]);
        assert_eq!(rows[1].meshward_ratio, Some(5.0));
        assert_eq!(rows[1].server_peak_rss, Some(3));
        assert_eq!(rows[1].samples.len(), 3);
    }
}
