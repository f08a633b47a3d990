//! Runs the comparison: the CSRs first (one P-256 key and CSR per client,
//! `workload.rs`, shared by every server), then the servers — a meshward
//! signer with its SQLite ledger (and one with the ledger off for the
//! unrecorded cells), OpenBao dev, OpenBao on raft — all started once and
//! kept for the section; then `rounds` rounds of every cell in `slots`
//! order. A cell opens fresh client connections, waits out the warm-up,
//! reads the server's CPU, runs the window, reads it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;
use tracing::info;

use super::server::{BaoServer, client};
use super::{
    Cell, INT_MOUNT, NO_STORE_ROLE, OpenbaoComparison, ROLE, Sample, Server, Signed, Storage,
    aggregate, parse_sign_answer, sign_body, slots,
};
use crate::config::OpenbaoBench;
use crate::report::loadavg;
use crate::signer_proc::{ChildSigner, LedgerKind, SignerSetup, process_cpu_time};
use crate::stats::{Summary, millis};
use crate::workload::{self, KeyType};

/// One sign request, at most (the closed loops end by the window's end plus this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// TLS handshakes (each with a first request) in flight while connecting.
const CONNECTING: usize = 32;

/// What the section needs from outside.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `bao` binary.
    pub bao: PathBuf,
    /// The release `meshward-signer`.
    pub signer: PathBuf,
    /// Where the servers' temp dirs go.
    pub work_dir: PathBuf,
    /// The signer's `server.max_concurrent_requests` (at least the largest
    /// concurrency, so nothing is refused).
    pub max_concurrent_requests: usize,
}

/// Measures every cell `config.rounds` times, interleaved.
pub async fn measure(config: &OpenbaoBench, setup: &Setup) -> anyhow::Result<OpenbaoComparison> {
    let bao_version = bao_version(&setup.bao).await?;
    let slots = slots(&config.concurrency, config.no_store_concurrency);
    let max = slots.iter().map(|c| c.clients).max().unwrap_or(1);
    let workloads = tokio::task::spawn_blocking(move || workload::generate(KeyType::P256, max, 0))
        .await
        .context("CSR task")??;
    let bodies: Vec<String> = workloads.iter().map(|w| sign_body(&w.csr_pem)).collect();
    info!(csrs = workloads.len(), bao = %bao_version, "openbao: CSRs ready");

    let meshward = start_signer(setup, max, LedgerKind::Sqlite).await?;
    let meshward_unrecorded = if slots.iter().any(|c| !c.stored) {
        Some(start_signer(setup, max, LedgerKind::Off).await?)
    } else {
        None
    };
    let dev = BaoServer::start(&setup.bao, Storage::Dev, &setup.work_dir)
        .await
        .context("OpenBao dev server")?;
    let raft = BaoServer::start(&setup.bao, Storage::Raft, &setup.work_dir)
        .await
        .context("OpenBao on raft storage")?;

    let loadavg_start = loadavg();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_string());
    let mut samples = Vec::new();
    for round in 1..=config.rounds {
        for &cell in &slots {
            let load = loadavg()
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string();
            let sample = match cell.server {
                Server::Meshward => {
                    let signer = if cell.stored {
                        &meshward
                    } else {
                        meshward_unrecorded
                            .as_ref()
                            .context("no signer with the ledger off")?
                    };
                    let t = crate::load::throughput(
                        signer,
                        &workloads,
                        cell.clients,
                        config.warmup,
                        config.window,
                    )
                    .await
                    .with_context(|| format!("meshward at {} clients", cell.clients))?;
                    Sample::of_signer(round, &t, load)
                }
                Server::OpenbaoDev | Server::OpenbaoRaft => {
                    let server = if cell.server == Server::OpenbaoDev {
                        &dev
                    } else {
                        &raft
                    };
                    let role = if cell.stored { ROLE } else { NO_STORE_ROLE };
                    sign_throughput(server, &bodies, role, cell, config, round, load)
                        .await
                        .with_context(|| {
                            format!("{} at {} clients", cell.server.label(), cell.clients)
                        })?
                }
            };
            info!(
                round,
                server = cell.server.label(),
                stored = cell.stored,
                clients = cell.clients,
                certs_per_s = format!("{:.0}", sample.certs_per_s),
                p50_ms = sample.latency_ms.map(|s| format!("{:.2}", s.p50)),
                p99_ms = sample.latency_ms.map(|s| format!("{:.2}", s.p99)),
                server_cores = format!("{:.2}", sample.server_cores),
                certs_per_server_cpu_s = format!("{:.0}", sample.certs_per_server_cpu_s),
                errors = sample.errors,
                "openbao comparison"
            );
            samples.push((cell, sample));
        }
    }
    drop(raft);
    drop(dev);
    drop(meshward_unrecorded);
    drop(meshward);
    Ok(OpenbaoComparison {
        bao_version,
        loadavg_start,
        loadavg_end: loadavg(),
        date,
        window_s: config.window.as_secs_f64(),
        warmup_s: config.warmup.as_secs_f64(),
        rounds: config.rounds,
        rows: aggregate(&slots, &samples),
    })
}

async fn start_signer(
    setup: &Setup,
    clients: usize,
    ledger: LedgerKind,
) -> anyhow::Result<ChildSigner> {
    let s = SignerSetup {
        binary: setup.signer.clone(),
        ca_key: KeyType::P256.ca_key(),
        max_concurrent_requests: setup.max_concurrent_requests.max(clients),
        ledger,
        work_dir: setup.work_dir.clone(),
    };
    let signer = tokio::task::spawn_blocking(move || ChildSigner::start(&s))
        .await
        .context("signer start task")??;
    info!(
        pid = signer.pid(),
        ledger = ledger.label(),
        "openbao: meshward signer started"
    );
    Ok(signer)
}

async fn bao_version(bin: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} version", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} version: {}",
        bin.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// One sign request; the answer's leaf, or what was wrong.
async fn sign(
    client: &reqwest::Client,
    url: &reqwest::Url,
    token: &str,
    body: &str,
) -> anyhow::Result<Signed> {
    let resp = client
        .post(url.clone())
        .header("X-Vault-Token", token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if status != reqwest::StatusCode::OK {
        anyhow::bail!(
            "{status}: {}",
            String::from_utf8_lossy(bytes.get(..bytes.len().min(300)).unwrap_or_default())
        );
    }
    parse_sign_answer(&bytes)
}

/// One client per body, each with its own connection: opened (TLS
/// handshake) and checked with a first sign request before any clock
/// starts, [`CONNECTING`] at a time.
async fn connect_all(
    server: &BaoServer,
    url: &reqwest::Url,
    bodies: &[String],
) -> anyhow::Result<Vec<reqwest::Client>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut set = JoinSet::new();
    for (i, body) in bodies.iter().enumerate() {
        let sem = sem.clone();
        let client = client(&server.ca_pem, REQUEST_TIMEOUT)?;
        let (url, token, body) = (url.clone(), server.sign_token.clone(), body.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let first = sign(&client, &url, &token, &body).await;
            (i, client, first)
        });
    }
    let mut clients: Vec<Option<reqwest::Client>> = bodies.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, client, first) = joined.context("connect task")?;
        let signed = first.with_context(|| format!("client {i}'s first request"))?;
        anyhow::ensure!(
            signed.chain_len >= 1,
            "client {i}: the answer has no ca_chain"
        );
        if let Some(slot) = clients.get_mut(i) {
            *slot = Some(client);
        }
    }
    clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("client {i} missing")))
        .collect()
}

/// `cell.clients` closed loops of `POST /v1/pki_int/sign/<role>`; counts
/// what completes between the warm-up's end and the window's.
async fn sign_throughput(
    server: &BaoServer,
    bodies: &[String],
    role: &str,
    cell: Cell,
    config: &OpenbaoBench,
    round: usize,
    loadavg: String,
) -> anyhow::Result<Sample> {
    let concurrency = cell.clients;
    let bodies = bodies
        .get(..concurrency)
        .with_context(|| format!("{} CSRs for {concurrency} clients", bodies.len()))?;
    let url: reqwest::Url = format!("{}/v1/{INT_MOUNT}/sign/{role}", server.base)
        .parse()
        .context("sign URL")?;
    let clients = connect_all(server, &url, bodies).await?;

    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let t0 = start + config.warmup;
    let t1 = t0 + config.window;
    let mut set = JoinSet::new();
    for (client, body) in clients.into_iter().zip(bodies) {
        let (url, token, body) = (url.clone(), server.sign_token.clone(), body.clone());
        let (issued, errors, first_error) = (issued.clone(), errors.clone(), first_error.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let sent = Instant::now();
                if sent >= t1 {
                    break;
                }
                let result = sign(&client, &url, &token, &body).await;
                let done = Instant::now();
                match result {
                    Ok(_) => {
                        if sent >= t0 && done <= t1 {
                            issued.fetch_add(1, Ordering::Relaxed);
                            latencies.push(millis(done - sent));
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock()
                            && slot.is_none()
                        {
                            *slot = Some(format!("{e:#}"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            latencies
        });
    }

    tokio::time::sleep_until(t0.into()).await;
    let server_cpu0 = server.cpu_times()?;
    let own_cpu0 = process_cpu_time("/proc/self/stat")?;
    let real_t0 = Instant::now();
    tokio::time::sleep_until(t1.into()).await;
    let server_cpu1 = server.cpu_times()?;
    let own_cpu1 = process_cpu_time("/proc/self/stat")?;
    let measured = real_t0.elapsed().as_secs_f64().max(1e-9);
    let memory = server.memory().ok();

    let mut latencies = Vec::new();
    while let Some(joined) = set.join_next().await {
        latencies.extend(joined.context("client task")?);
    }
    let issued = issued.load(Ordering::Relaxed);
    let used = server_cpu1.since(server_cpu0);
    let cpu = used.total().as_secs_f64();
    Ok(Sample {
        round,
        issued,
        certs_per_s: issued as f64 / config.window.as_secs_f64(),
        latency_ms: Summary::of(&mut latencies),
        server_cores: cpu / measured,
        loadgen_cores: own_cpu1.saturating_sub(own_cpu0).as_secs_f64() / measured,
        certs_per_server_cpu_s: if cpu > 0.0 { issued as f64 / cpu } else { 0.0 },
        server_kernel_us_per_cert: if issued > 0 {
            used.system.as_secs_f64() * 1e6 / issued as f64
        } else {
            0.0
        },
        server_peak_rss: memory.map(|m| m.peak_rss),
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().ok().and_then(|e| e.clone()),
        loadavg,
    })
}
