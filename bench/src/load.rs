//! The load generator: N istio-agent-like clients, each with its own TLS
//! connection, sending pre-made CSRs with their service-account tokens to
//! the signer's real gRPC API.
//!
//! - [`throughput`]: N clients in closed loops (send, wait, send again) for
//!   a fixed window after a warm-up; certificates per second and latency.
//! - [`mass_restart`]: N clients that all start at once (connect + CSR), and
//!   retry with exponential backoff and jitter when the signer answers
//!   `RESOURCE_EXHAUSTED`, like istio-agent after a node or CA restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use meshward_signer::client::{CaClient, CallOptions, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::signer_proc::{ChildSigner, CpuTimes, Memory, process_cpu_time};
use crate::stats::{Summary, millis};
use crate::workload::Workload;

pub mod h2load;

/// The server name the signer's serving certificate carries.
const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Exponential backoff with jitter: attempt `k` (0-based) waits a uniformly
/// random time in `[d/2, d]`, `d = min(max, initial · multiplier^k)`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Backoff {
    /// First delay.
    #[serde(with = "humantime_serde_ms")]
    pub initial: Duration,
    /// Largest delay.
    #[serde(with = "humantime_serde_ms")]
    pub max: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
}

mod humantime_serde_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

impl Backoff {
    /// The upper bound of attempt `attempt`'s delay.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// A jittered delay for attempt `attempt`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rng.random::<f64>())
    }
}

/// What drives the signer in a throughput measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// `meshward-bench`'s own clients (tonic), one identity each.
    Harness,
    /// h2load (nghttp2): [`h2load`].
    H2load(h2load::Identities),
}

impl Generator {
    /// How the report names the load at `clients` clients.
    pub fn label(self, clients: usize) -> String {
        match self {
            Generator::Harness if clients == 1 => "meshward-bench, 1 identity".to_string(),
            Generator::Harness => format!("meshward-bench, {clients} identities"),
            Generator::H2load(i) => i.label(clients),
        }
    }
}

/// One throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Concurrent clients (= requests in flight).
    pub concurrency: usize,
    /// Certificates issued inside the window.
    pub issued: u64,
    /// Measurement window (seconds).
    pub window_s: f64,
    /// Certificates per second (wall clock).
    pub certs_per_s: f64,
    /// Latency of the requests completed in the window (ms).
    pub latency_ms: Option<Summary>,
    /// Signer CPU used during the window, in cores (CPU-seconds per second).
    pub signer_cores: f64,
    /// Load generator CPU used during the window, in cores.
    pub loadgen_cores: f64,
    /// The PostgreSQL server's CPU during the window, in cores (with the
    /// ledger there; not in the signer's figures).
    pub database_cores: Option<f64>,
    /// Certificates per signer CPU-second.
    pub certs_per_signer_cpu_s: f64,
    /// Signer CPU per certificate in the kernel (µs): system calls, TCP on
    /// loopback (including delivering what the signer sends), file writes
    /// and fsyncs of the ledger.
    pub signer_kernel_us_per_cert: f64,
    /// Ledger group commits per second in the window (one fsync each), from
    /// the signer's `/metrics`; `None` with the ledger off.
    pub ledger_commits_per_s: Option<f64>,
    /// Records per group commit in the window.
    pub ledger_records_per_commit: Option<f64>,
    /// The signer's resident memory at the window's end, and its peak since
    /// it started (this signer served the smaller concurrencies first).
    pub signer_memory: Option<Memory>,
    /// `RESOURCE_EXHAUSTED` answers (retried after a short jittered pause).
    pub resource_exhausted: u64,
    /// Other failures (connection or refusal).
    pub errors: u64,
    /// The first other failure, if any.
    pub first_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    exhausted: AtomicU64,
    errors: AtomicU64,
}

fn is_exhausted(e: &ClientError) -> bool {
    matches!(e, ClientError::Status(s) if s.code() == tonic::Code::ResourceExhausted)
}

/// Connect `count` clients (at most 32 handshakes at a time).
async fn connect_all(signer: &ChildSigner, count: usize) -> anyhow::Result<Vec<CaClient>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = JoinSet::new();
    for i in 0..count {
        let sem = sem.clone();
        let addr = signer.grpc_addr;
        let roots = signer.roots_pem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, CaClient::connect(addr, &roots, SERVER_NAME).await)
        });
    }
    let mut clients: Vec<Option<CaClient>> = (0..count).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, client) = joined.context("connect task")?;
        let client = client.map_err(|e| anyhow::anyhow!("client {i}: {e}"))?;
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

/// `concurrency` clients in closed loops against `signer`; counts what
/// completes between `warmup` and `warmup + window`.
pub async fn throughput(
    signer: &ChildSigner,
    workloads: &[Workload],
    concurrency: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Throughput> {
    anyhow::ensure!(
        workloads.len() >= concurrency,
        "{} workloads prepared for {concurrency} clients",
        workloads.len()
    );
    let clients = connect_all(signer, concurrency).await?;
    let mut jobs = Vec::with_capacity(concurrency);
    for (client, w) in clients.into_iter().zip(workloads) {
        let opts = CallOptions {
            token: Some(w.token(&signer.tokens)?),
            ..CallOptions::default()
        };
        jobs.push((client, opts, w.csr_pem.clone()));
    }

    let counters = Arc::new(Counters::default());
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let t0 = start + warmup;
    let t1 = t0 + window;
    let mut set = JoinSet::new();
    for (client, opts, csr) in jobs {
        let counters = counters.clone();
        let first_error = first_error.clone();
        set.spawn(async move {
            let mut latencies = Vec::new();
            let mut rng = StdRng::from_os_rng();
            loop {
                let sent = Instant::now();
                if sent >= t1 {
                    break;
                }
                let result = client.create_certificate(&csr, &opts).await;
                let done = Instant::now();
                let in_window = sent >= t0 && done <= t1;
                match result {
                    Ok(chain) if chain.len() >= 2 => {
                        if in_window {
                            counters.issued.fetch_add(1, Ordering::Relaxed);
                            latencies.push(millis(done - sent));
                        }
                    }
                    Err(e) if is_exhausted(&e) => {
                        counters.exhausted.fetch_add(1, Ordering::Relaxed);
                        let pause = Duration::from_millis(rng.random_range(5..=20));
                        tokio::time::sleep(pause).await;
                    }
                    other => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        note(
                            &first_error,
                            match other {
                                Ok(chain) => format!("{} chain entries", chain.len()),
                                Err(e) => e.to_string(),
                            },
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            latencies
        });
    }

    // CPU readings at the window's edges.
    tokio::time::sleep_until(t0.into()).await;
    let edge0 = Edge::start(signer, own_cpu()?).await?;
    tokio::time::sleep_until(t1.into()).await;
    let edge1 = Edge::end(signer, own_cpu()?).await?;

    let mut latencies = Vec::new();
    while let Some(joined) = set.join_next().await {
        latencies.extend(joined.context("client task")?);
    }
    let first_error = first_error.lock().ok().and_then(|e| e.clone());
    Ok(Throughput::of(
        signer,
        concurrency,
        Counted {
            issued: counters.issued.load(Ordering::Relaxed),
            window_s: Some(window.as_secs_f64()),
            latencies,
            resource_exhausted: counters.exhausted.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            first_error,
        },
        &edge0,
        &edge1,
    ))
}

/// This process's CPU time (the Rust load generator's).
fn own_cpu() -> anyhow::Result<Duration> {
    process_cpu_time("/proc/self/stat")
}

/// Readings at one edge of a measurement window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    at: Instant,
    signer: CpuTimes,
    database: Option<CpuTimes>,
    /// The ledger's (records, commits) so far.
    commits: Option<(f64, f64)>,
    loadgen: Duration,
}

impl Edge {
    /// A window's start: the ledger's commits (scraping `/metrics` costs the
    /// signer CPU, so before its CPU is read), the signer's (and its
    /// database's) CPU; `loadgen` is the load generator's CPU so far.
    pub(crate) async fn start(signer: &ChildSigner, loadgen: Duration) -> anyhow::Result<Self> {
        let commits = ledger_commits_now(signer).await;
        let signer_cpu = signer.cpu_times()?;
        let database = signer.database_cpu_times();
        Ok(Self {
            at: Instant::now(),
            signer: signer_cpu,
            database,
            commits,
            loadgen,
        })
    }

    /// A window's end: the same readings, the CPU before the scrape.
    pub(crate) async fn end(signer: &ChildSigner, loadgen: Duration) -> anyhow::Result<Self> {
        let signer_cpu = signer.cpu_times()?;
        let database = signer.database_cpu_times();
        let at = Instant::now();
        let commits = ledger_commits_now(signer).await;
        Ok(Self {
            at,
            signer: signer_cpu,
            database,
            commits,
            loadgen,
        })
    }
}

/// What a load generator counted in a window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counted {
    /// Certificates issued in the window.
    pub issued: u64,
    /// The window certs/s is over (s); `None`: the span between the edges.
    pub window_s: Option<f64>,
    /// Per-request latencies (ms), if the generator has them.
    pub latencies: Vec<f64>,
    pub resource_exhausted: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Throughput {
    /// The figures of a window from what was counted in it and the
    /// readings at its edges.
    pub(crate) fn of(
        signer: &ChildSigner,
        concurrency: usize,
        mut counted: Counted,
        edge0: &Edge,
        edge1: &Edge,
    ) -> Self {
        let measured = edge1
            .at
            .saturating_duration_since(edge0.at)
            .as_secs_f64()
            .max(1e-9);
        let signer_memory = signer.memory().ok();
        let issued = counted.issued;
        let window_s = counted.window_s.unwrap_or(measured).max(1e-9);
        let signer_used = edge1.signer.since(edge0.signer);
        let commits = edge0
            .commits
            .zip(edge1.commits)
            .map(|((r0, c0), (r1, c1))| (r1 - r0, c1 - c0))
            .filter(|&(_, c)| c > 0.0);
        let signer_cpu = signer_used.total().as_secs_f64();
        Throughput {
            concurrency,
            issued,
            window_s,
            certs_per_s: issued as f64 / window_s,
            latency_ms: Summary::of(&mut counted.latencies),
            signer_cores: signer_cpu / measured,
            loadgen_cores: edge1.loadgen.saturating_sub(edge0.loadgen).as_secs_f64() / measured,
            database_cores: edge0
                .database
                .zip(edge1.database)
                .map(|(c0, c1)| c1.since(c0).total().as_secs_f64() / measured),
            certs_per_signer_cpu_s: if signer_cpu > 0.0 {
                issued as f64 / signer_cpu
            } else {
                0.0
            },
            signer_kernel_us_per_cert: if issued > 0 {
                signer_used.system.as_secs_f64() * 1e6 / issued as f64
            } else {
                0.0
            },
            ledger_commits_per_s: commits.map(|(_, c)| c / measured),
            ledger_records_per_commit: commits.map(|(r, c)| r / c),
            signer_memory,
            resource_exhausted: counted.resource_exhausted,
            errors: counted.errors,
            first_error: counted.first_error,
        }
    }
}

/// The mass-restart result.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    /// Clients started at once.
    pub clients: usize,
    /// `server.max_concurrent_requests` of the signer.
    pub max_concurrent_requests: usize,
    /// Retry policy.
    pub backoff: Backoff,
    /// Clients holding a certificate at the end.
    pub succeeded: usize,
    /// Time from the start until the last client held a certificate (s);
    /// `None` if some never did.
    pub all_done_s: Option<f64>,
    /// Per-client time to a certificate (ms), over the clients that got one.
    pub time_to_cert_ms: Option<Summary>,
    /// Clients that were answered `RESOURCE_EXHAUSTED` at least once.
    pub clients_exhausted: u64,
    /// `RESOURCE_EXHAUSTED` answers in total (each was retried).
    pub exhausted_responses: u64,
    /// Connection attempts that failed (and were retried).
    pub connect_failures: u64,
    /// Other failed requests (retried).
    pub other_failures: u64,
    /// The first other failure, if any.
    pub first_error: Option<String>,
    /// Signer CPU over the whole restart, in cores.
    pub signer_cores: f64,
    /// The signer's resident memory after the restart, and its peak (a fresh
    /// signer: the peak is the restart's).
    pub signer_memory: Option<Memory>,
    /// The signer's `meshward_signer_grpc_connection_limit_waits_total` at
    /// the end: how often its accept loop had every connection slot taken
    /// (`server.max_connections`) and let connections wait in the backlog.
    pub connection_limit_waits: Option<f64>,
    /// The signer's `server.max_connections`, from its `/metrics`.
    pub max_connections: Option<f64>,
}

/// All `workloads.len()` clients start at the same instant: connect, send
/// the CSR, and on any failure wait `backoff` and try again until `deadline`.
pub async fn mass_restart(
    signer: &ChildSigner,
    workloads: &[Workload],
    max_concurrent_requests: usize,
    backoff: Backoff,
    deadline: Duration,
) -> anyhow::Result<Restart> {
    let mut jobs = Vec::with_capacity(workloads.len());
    for w in workloads {
        jobs.push((w.token(&signer.tokens)?, w.csr_pem.clone()));
    }
    let counters = Arc::new(Counters::default());
    let clients_exhausted = Arc::new(AtomicU64::new(0));
    let connect_failures = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let barrier = Arc::new(tokio::sync::Barrier::new(jobs.len() + 1));
    let mut set = JoinSet::new();
    for (token, csr) in jobs {
        let barrier = barrier.clone();
        let counters = counters.clone();
        let clients_exhausted = clients_exhausted.clone();
        let connect_failures = connect_failures.clone();
        let first_error = first_error.clone();
        let addr = signer.grpc_addr;
        let roots = signer.roots_pem.clone();
        set.spawn(async move {
            let opts = CallOptions {
                token: Some(token),
                ..CallOptions::default()
            };
            let mut rng = StdRng::from_os_rng();
            barrier.wait().await;
            let start = Instant::now();
            let end = start + deadline;
            let mut client = None;
            let mut attempt = 0u32;
            let mut was_exhausted = false;
            while Instant::now() < end {
                let c = match &client {
                    Some(c) => c,
                    None => match CaClient::connect(addr, &roots, SERVER_NAME).await {
                        Ok(c) => client.insert(c),
                        Err(e) => {
                            connect_failures.fetch_add(1, Ordering::Relaxed);
                            note(&first_error, e.to_string());
                            tokio::time::sleep(backoff.delay(attempt, &mut rng)).await;
                            attempt += 1;
                            continue;
                        }
                    },
                };
                match c.create_certificate(&csr, &opts).await {
                    Ok(chain) if chain.len() >= 2 => {
                        counters.issued.fetch_add(1, Ordering::Relaxed);
                        return Some(start.elapsed());
                    }
                    Err(e) if is_exhausted(&e) => {
                        counters.exhausted.fetch_add(1, Ordering::Relaxed);
                        if !was_exhausted {
                            was_exhausted = true;
                            clients_exhausted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        note(&first_error, e.to_string());
                    }
                }
                tokio::time::sleep(backoff.delay(attempt, &mut rng)).await;
                attempt += 1;
            }
            None
        });
    }
    let cpu0 = signer.cpu_time()?;
    barrier.wait().await;
    let started = Instant::now();
    let mut times = Vec::new();
    let mut succeeded = 0usize;
    while let Some(joined) = set.join_next().await {
        if let Some(t) = joined.context("restart client task")? {
            succeeded += 1;
            times.push(millis(t));
        }
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = signer.cpu_time()?.saturating_sub(cpu0).as_secs_f64();
    let signer_memory = signer.memory().ok();
    let metrics = match signer.admin_addr {
        Some(admin) => crate::signer_proc::scrape_metrics(admin, Duration::from_secs(5))
            .await
            .ok(),
        None => None,
    };
    let sample = |name: &str| {
        metrics
            .as_deref()
            .and_then(|m| crate::signer_proc::metric_sample(m, name))
    };
    let summary = Summary::of(&mut times);
    let clients = workloads.len();
    Ok(Restart {
        clients,
        max_concurrent_requests,
        backoff,
        succeeded,
        all_done_s: (succeeded == clients)
            .then(|| summary.map(|s| s.max / 1e3))
            .flatten(),
        time_to_cert_ms: summary,
        clients_exhausted: clients_exhausted.load(Ordering::Relaxed),
        exhausted_responses: counters.exhausted.load(Ordering::Relaxed),
        connect_failures: connect_failures.load(Ordering::Relaxed),
        other_failures: counters.errors.load(Ordering::Relaxed),
        first_error: first_error.lock().ok().and_then(|e| e.clone()),
        signer_cores: cpu / wall,
        signer_memory,
        connection_limit_waits: sample("meshward_signer_grpc_connection_limit_waits_total"),
        max_connections: sample("meshward_signer_grpc_connections_max"),
    })
}

/// Keep the first failure's text.
fn note(slot: &std::sync::Mutex<Option<String>>, text: String) {
    if let Ok(mut s) = slot.lock()
        && s.is_none()
    {
        *s = Some(text);
    }
}

/// The ledger's (records, commits) so far; `None` when the signer has no
/// ledger or its `/metrics` cannot be read (the figures are then omitted).
async fn ledger_commits_now(signer: &ChildSigner) -> Option<(f64, f64)> {
    let admin = signer.admin_addr?;
    let text = crate::signer_proc::scrape_metrics(admin, Duration::from_secs(5))
        .await
        .ok()?;
    crate::signer_proc::ledger_commits(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_its_cap_and_jitters_within_half() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(10), Duration::from_secs(2));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
        let mut rng = rand::rng();
        for attempt in 0..8 {
            let d = b.delay(attempt, &mut rng);
            assert!(
                d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt),
                "{d:?}"
            );
        }
    }
}
