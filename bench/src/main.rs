//! `meshward-bench`: the benchmark harness behind `just bench` / `scripts/bench`.
//!
//! Timing loops use `std::time::Instant` here on purpose: this is a
//! benchmark, never a test. See BENCHMARKS.md (generated) for the figures and
//! ARCHITECTURE.md for the layout.

mod bound;
mod cli;
mod config;
mod envoy_authz;
mod filter_cost;
mod load;
mod manifest;
mod openbao;
// The shared-ledger tests' PostgreSQL fixture: the bench starts the same
// server for its PostgreSQL row.
#[path = "../../signer/tests/support/postgres.rs"]
mod pg_server;
mod report;
mod signer_proc;
mod stats;
#[cfg(feature = "wasm")]
mod wasm_cost;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::info;

use crate::cli::{Cli, Command, Section};
use crate::config::BenchConfig;
use crate::filter_cost::{Kind, Sampling};
use crate::load::{Backoff, Generator};
use crate::report::{Machine, Results, SignerRow};
use crate::signer_proc::{ChildSigner, LedgerKind, SignerSetup};
use crate::workload::{KeyType, Workload};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshward-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            BenchConfig::defaults_overridden_by(&text, &path.display().to_string())?
        }
        None => BenchConfig::defaults()?,
    };
    match cli.command {
        Command::Config => {
            print!("{}", toml::to_string(&config)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run(config, args),
        Command::Load(args) => {
            let mut config = config;
            if let Some(w) = args.window {
                config.signer.window = w;
            }
            let rt = runtime()?;
            let ledger = if args.no_ledger {
                LedgerKind::Off
            } else if args.postgres_ledger {
                LedgerKind::Postgres
            } else {
                LedgerKind::Sqlite
            };
            let rows = if args.h2load.is_empty() {
                rt.block_on(signer_throughput(
                    &config,
                    args.key,
                    &args.concurrency,
                    ledger,
                ))?
            } else {
                let binary = h2load_binary(&config);
                let version = load::h2load::version(&binary)?;
                info!(%version, "h2load");
                rt.block_on(signer_throughput_h2load(
                    &config,
                    args.key,
                    &args.h2load,
                    &args.concurrency,
                    ledger,
                    &binary,
                ))?
            };
            let bound = bound::measure(config.openssl.seconds).ok();
            let ring = bound::ring_p256(f64::from(config.openssl.seconds)).ok();
            for row in &rows {
                let ratio = bound.as_ref().map(|o| report::ratio_per_used_core(o, row));
                let split = bound
                    .as_ref()
                    .zip(ring.as_ref())
                    .and_then(|(o, ring)| report::CpuSplit::of(o, ring, row));
                println!(
                    "{}",
                    serde_json::json!({"key": row.key, "ledger": row.ledger, "load": row.load.label(row.run.concurrency), "run": row.run, "ratio_per_used_core": ratio, "cpu_split": split})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart(args) => {
            let mut config = config;
            if let Some(n) = args.clients {
                config.restart.clients = n;
            }
            let rt = runtime()?;
            let r = rt.block_on(mass_restart(&config, config.restart.clients))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Filter(args) => {
            let mut config = config;
            if !args.rules.is_empty() {
                config.filter.rules = args.rules;
            }
            let (native, wasm, size, skipped) = filter_costs(&config, !args.native_only);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "native": native?, "wasm": wasm, "wasm_size": size, "skipped": skipped
                }))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn work_dir(config: &BenchConfig) -> PathBuf {
    config
        .signer
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
}

fn signer_binary(config: &BenchConfig) -> anyhow::Result<PathBuf> {
    match &config.signer.binary {
        Some(p) => Ok(p.clone()),
        None => signer_proc::sibling_binary("meshward-signer").context(
            "no meshward-signer next to meshward-bench: build it in the same target dir \
             (`cargo build --release -p meshward-signer -p meshward-bench`) or set signer.binary",
        ),
    }
}

fn prepare(kind: KeyType, count: usize, config: &BenchConfig) -> anyhow::Result<Vec<Workload>> {
    let t = std::time::Instant::now();
    let w = workload::generate(kind, count, config.signer.rsa_keys)?;
    info!(key = kind.label(), count, took = ?t.elapsed(), "prepared keys and CSRs");
    Ok(w)
}

/// A fresh child signer for `key` and `ledger` admitting `max` requests at
/// once, and `max` workloads' keys and CSRs (made before it starts).
async fn signer_for(
    config: &BenchConfig,
    key: KeyType,
    max: usize,
    ledger: LedgerKind,
) -> anyhow::Result<(ChildSigner, Vec<Workload>)> {
    let workloads = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || prepare(key, max, &config)).await??
    };
    let setup = SignerSetup {
        binary: signer_binary(config)?,
        ca_key: key.ca_key(),
        max_concurrent_requests: config.signer.max_concurrent_requests.max(max),
        ledger,
        work_dir: work_dir(config),
    };
    let signer = tokio::task::spawn_blocking(move || ChildSigner::start(&setup)).await??;
    info!(pid = signer.pid(), addr = %signer.grpc_addr, key = key.label(), ledger = ledger.label(), "signer started");
    Ok((signer, workloads))
}

fn log_row(row: &SignerRow) {
    let run = &row.run;
    info!(
        key = row.key.label(),
        load = row.load.label(run.concurrency),
        clients = run.concurrency,
        certs_per_s = format!("{:.0}", run.certs_per_s),
        p50_ms = run.latency_ms.map(|s| format!("{:.2}", s.p50)),
        p99_ms = run.latency_ms.map(|s| format!("{:.2}", s.p99)),
        signer_cores = format!("{:.2}", run.signer_cores),
        certs_per_signer_cpu_s = format!("{:.0}", run.certs_per_signer_cpu_s),
        loadgen_cores = format!("{:.2}", run.loadgen_cores),
        errors = run.errors,
        "throughput"
    );
}

async fn signer_throughput(
    config: &BenchConfig,
    key: KeyType,
    concurrency: &[usize],
    ledger: LedgerKind,
) -> anyhow::Result<Vec<SignerRow>> {
    let max = concurrency.iter().copied().max().unwrap_or(1);
    let (signer, workloads) = signer_for(config, key, max, ledger).await?;
    let mut rows = Vec::new();
    for &c in concurrency {
        let run = load::throughput(
            &signer,
            &workloads,
            c,
            config.signer.warmup,
            config.signer.window,
        )
        .await
        .with_context(|| format!("{} at {c} clients", key.label()))?;
        let row = SignerRow {
            key,
            ledger,
            load: Generator::Harness,
            run,
        };
        log_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// The h2load binary: `[envoy] h2load`, else `h2load` on PATH.
fn h2load_binary(config: &BenchConfig) -> PathBuf {
    config
        .envoy
        .h2load
        .clone()
        .unwrap_or_else(|| PathBuf::from("h2load"))
}

/// One fresh signer driven by h2load: every `identities` at every
/// `connections`, in that order.
async fn signer_throughput_h2load(
    config: &BenchConfig,
    key: KeyType,
    identities: &[load::h2load::Identities],
    connections: &[usize],
    ledger: LedgerKind,
    h2load: &Path,
) -> anyhow::Result<Vec<SignerRow>> {
    let max = connections.iter().copied().max().unwrap_or(1);
    let (signer, workloads) = signer_for(config, key, max, ledger).await?;
    let mut rows = Vec::new();
    for &c in connections {
        for &i in identities {
            let run = load::h2load::throughput(
                &signer,
                &workloads,
                i,
                c,
                config.signer.warmup,
                config.signer.window,
                h2load,
            )
            .await
            .with_context(|| format!("{} under {}", key.label(), i.label(c)))?;
            let row = SignerRow {
                key,
                ledger,
                load: Generator::H2load(i),
                run,
            };
            log_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

async fn mass_restart(config: &BenchConfig, clients: usize) -> anyhow::Result<load::Restart> {
    let r = &config.restart;
    let workloads = {
        let config = config.clone();
        let (kind, n) = (r.key_type, clients);
        tokio::task::spawn_blocking(move || prepare(kind, n, &config)).await??
    };
    let setup = SignerSetup {
        binary: signer_binary(config)?,
        ca_key: r.key_type.ca_key(),
        max_concurrent_requests: r.max_concurrent_requests,
        ledger: if config.signer.ledger {
            LedgerKind::Sqlite
        } else {
            LedgerKind::Off
        },
        work_dir: work_dir(config),
    };
    let signer = tokio::task::spawn_blocking(move || ChildSigner::start(&setup)).await??;
    let backoff = Backoff {
        initial: r.backoff_initial,
        max: r.backoff_max,
        multiplier: r.backoff_multiplier,
    };
    let result = load::mass_restart(
        &signer,
        &workloads,
        r.max_concurrent_requests,
        backoff,
        r.deadline,
    )
    .await?;
    info!(
        clients = result.clients,
        succeeded = result.succeeded,
        all_done_s = ?result.all_done_s,
        exhausted = result.exhausted_responses,
        "mass restart"
    );
    Ok(result)
}

fn wasm_path(config: &BenchConfig) -> PathBuf {
    config
        .filter
        .wasm
        .clone()
        .unwrap_or_else(|| match std::env::var_os("MESHWARD_FILTER_WASM") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("meshward_filter.wasm"),
        })
}

type FilterCosts = (
    anyhow::Result<Vec<filter_cost::NativeCost>>,
    Vec<filter_cost::WasmCost>,
    Option<u64>,
    Vec<String>,
);

fn filter_costs(config: &BenchConfig, with_wasm: bool) -> FilterCosts {
    let sampling = Sampling {
        samples: config.filter.samples,
        batch: config.filter.batch,
    };
    let mut skipped = Vec::new();
    let path = wasm_path(config);
    let size = match filter_cost::wasm_size(&path) {
        Ok(s) => Some(s),
        Err(e) => {
            skipped.push(format!("wasm: {e:#}"));
            None
        }
    };
    let mut wasm_bytes = if with_wasm && size.is_some() {
        read_wasm(&path, &mut skipped)
    } else {
        None
    };
    let slots: Vec<(Kind, usize)> = Kind::ALL
        .into_iter()
        .flat_map(|kind| config.filter.rules.iter().map(move |&rules| (kind, rules)))
        .collect();
    // Per slot, its rounds; the slots interleaved within each round.
    let mut native: Vec<Vec<filter_cost::NativeCost>> = vec![Vec::new(); slots.len()];
    let mut wasm: Vec<Vec<filter_cost::WasmCost>> = vec![Vec::new(); slots.len()];
    let rounds = config.filter.rounds.max(1);
    for round in 1..=rounds {
        for (slot, &(kind, rules)) in slots.iter().enumerate() {
            match filter_cost::native(rules, kind, sampling) {
                Ok(n) => {
                    info!(
                        round,
                        ?kind,
                        rules,
                        p50_ns = format!("{:.0}", n.compiled_ns.p50),
                        new_identity_p50_ns = format!("{:.0}", n.new_identity_ns.p50),
                        linear_p50_ns = format!("{:.0}", n.linear_ns.p50),
                        "native decision"
                    );
                    if let Some(r) = native.get_mut(slot) {
                        r.push(n);
                    }
                }
                Err(e) => {
                    return (
                        Err(e.context(format!("native {kind:?} at {rules} rules"))),
                        Vec::new(),
                        None,
                        skipped,
                    );
                }
            }
            let Some(bytes) = wasm_bytes.as_deref() else {
                continue;
            };
            match wasm_cost(bytes, rules, kind, sampling) {
                Ok(w) => {
                    info!(
                        round,
                        ?kind,
                        rules,
                        decision_p50_ns = format!("{:.0}", w.decision_ns.p50),
                        abi_floor_p50_ns = format!("{:.0}", w.abi_floor_ns.p50),
                        stream_p50_ns = format!("{:.0}", w.stream_ns.p50),
                        memory = w.memory_after_configure,
                        "wasm decision"
                    );
                    if let Some(r) = wasm.get_mut(slot) {
                        r.push(w);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "wasm measurement failed");
                    skipped.push(format!("wasm {kind:?} at {rules} rules: {e:#}"));
                    // A plugin that fails once is not timed further.
                    wasm_bytes = None;
                    wasm.iter_mut().for_each(Vec::clear);
                }
            }
        }
    }
    let native = native
        .iter()
        .filter_map(|r| filter_cost::NativeCost::median_of_rounds(r))
        .collect();
    let wasm = wasm
        .iter()
        .filter_map(|r| filter_cost::WasmCost::median_of_rounds(r))
        .collect();
    (Ok(native), wasm, size, skipped)
}

fn read_wasm(path: &Path, skipped: &mut Vec<String>) -> Option<Vec<u8>> {
    if !cfg!(feature = "wasm") {
        skipped.push("wasm: meshward-bench was built without its `wasm` feature".to_string());
        return None;
    }
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            skipped.push(format!("wasm: reading {}: {e}", path.display()));
            None
        }
    }
}

#[cfg(feature = "wasm")]
fn wasm_cost(
    bytes: &[u8],
    rules: usize,
    kind: Kind,
    sampling: Sampling,
) -> anyhow::Result<filter_cost::WasmCost> {
    wasm_cost::measure(bytes, rules, kind, sampling)
}

#[cfg(not(feature = "wasm"))]
fn wasm_cost(
    _bytes: &[u8],
    _rules: usize,
    _kind: Kind,
    _sampling: Sampling,
) -> anyhow::Result<filter_cost::WasmCost> {
    anyhow::bail!("meshward-bench was built without its `wasm` feature")
}

fn noop_wasm_path(config: &BenchConfig) -> PathBuf {
    config
        .envoy
        .noop_wasm
        .clone()
        .unwrap_or_else(|| match std::env::var_os("MESHWARD_NOOP_WASM") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("meshward_noop_plugin.wasm"),
        })
}

/// The real-Envoy section; `None` (with the reason in `skipped`) when it
/// could not run. A configuration answering non-2xx fails the whole run.
#[cfg(feature = "envoy")]
fn envoy_authz_section(
    config: &BenchConfig,
    skipped: &mut Vec<String>,
) -> anyhow::Result<Option<envoy_authz::EnvoyAuthz>> {
    let setup = envoy_authz::Setup {
        filter_wasm: wasm_path(config),
        noop_wasm: noop_wasm_path(config),
        h2load: h2load_binary(config),
        work_dir: work_dir(config),
    };
    let rt = runtime()?;
    match rt.block_on(envoy_authz::measure(&config.envoy, &setup)) {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.downcast_ref::<envoy_authz::Non2xx>().is_some() => Err(e),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "envoy authz section failed");
            skipped.push(format!("the filter in real Envoy: {e:#}"));
            Ok(None)
        }
    }
}

#[cfg(not(feature = "envoy"))]
fn envoy_authz_section(
    _config: &BenchConfig,
    skipped: &mut Vec<String>,
) -> anyhow::Result<Option<envoy_authz::EnvoyAuthz>> {
    skipped.push(
        "the filter in real Envoy: meshward-bench was built without its `envoy` feature"
            .to_string(),
    );
    Ok(None)
}

/// The `bao` binary: `[openbao] binary`, else `MESHWARD_BAO`, else what
/// `scripts/openbao --path` finds or installs.
fn bao_binary(config: &BenchConfig) -> anyhow::Result<PathBuf> {
    if let Some(p) = &config.openbao.binary {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("MESHWARD_BAO").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/openbao");
    let out = std::process::Command::new(&script)
        .arg("--path")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} --path: {} (set MESHWARD_BAO or [openbao] binary)",
        script.display(),
        out.status
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The OpenBao comparison; `None` (with the reason in `skipped`) when it
/// could not run.
fn openbao_section(
    config: &BenchConfig,
    rt: &tokio::runtime::Runtime,
    skipped: &mut Vec<String>,
) -> Option<openbao::OpenbaoComparison> {
    let setup = (|| {
        anyhow::Ok(openbao::Setup {
            bao: bao_binary(config)?,
            signer: signer_binary(config)?,
            work_dir: work_dir(config),
            max_concurrent_requests: config.signer.max_concurrent_requests,
        })
    })();
    match setup.and_then(|setup| rt.block_on(openbao::measure(&config.openbao, &setup))) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "openbao comparison failed");
            skipped.push(format!("signer vs OpenBao PKI: {e:#}"));
            None
        }
    }
}

fn run(config: BenchConfig, args: cli::RunArgs) -> anyhow::Result<ExitCode> {
    let config = if args.check { config.quick() } else { config };
    let machine = Machine::describe(signer_proc::filesystem_type(&work_dir(&config)));
    info!(cores = machine.cores, cpu = %machine.cpu_model, loadavg = %machine.loadavg_start, "starting");
    let mut skipped = Vec::new();
    // `--only envoy-authz` runs that section and nothing else.
    let all = args.only.is_none();
    let envoy_on = config.envoy.enabled && matches!(args.only, None | Some(Section::EnvoyAuthz));
    let openbao_on = config.openbao.enabled && matches!(args.only, None | Some(Section::Openbao));

    let (openssl, ring_p256) = if all {
        info!("openssl speed");
        let openssl = match bound::measure(config.openssl.seconds) {
            Ok(o) => Some(o),
            Err(e) => {
                skipped.push(format!("openssl speed: {e:#}"));
                None
            }
        };
        info!("ring P-256 sign and verify");
        let ring_p256 = match bound::ring_p256(f64::from(config.openssl.seconds)) {
            Ok(r) => Some(r),
            Err(e) => {
                skipped.push(format!("ring P-256 rates: {e:#}"));
                None
            }
        };
        (openssl, ring_p256)
    } else {
        (None, None)
    };

    let (native, wasm, wasm_size) = if all {
        info!("filter decision cost");
        let (native, wasm, wasm_size, filter_skipped) = filter_costs(&config, true);
        skipped.extend(filter_skipped);
        (native?, wasm, wasm_size)
    } else {
        (
            Vec::new(),
            Vec::new(),
            filter_cost::wasm_size(&wasm_path(&config)).ok(),
        )
    };

    let envoy_authz = if envoy_on {
        info!("the filter in real Envoy vs Envoy RBAC");
        envoy_authz_section(&config, &mut skipped)?
    } else {
        None
    };

    let rt = runtime()?;
    let mut signer = Vec::new();
    let key_types: &[KeyType] = if all { &config.signer.key_types } else { &[] };
    for &key in key_types {
        info!(key = key.label(), "signer throughput");
        signer.extend(rt.block_on(signer_throughput(
            &config,
            key,
            &config.signer.concurrency,
            if config.signer.ledger {
                LedgerKind::Sqlite
            } else {
                LedgerKind::Off
            },
        ))?);
    }
    if all && config.signer.h2load_concurrency > 0 {
        info!("signer throughput under h2load");
        let binary = h2load_binary(&config);
        match load::h2load::version(&binary) {
            Ok(version) => {
                info!(%version, "h2load");
                signer.extend(rt.block_on(signer_throughput_h2load(
                    &config,
                    KeyType::P256,
                    &[
                        load::h2load::Identities::One,
                        load::h2load::Identities::PerClient,
                    ],
                    &[config.signer.h2load_concurrency],
                    if config.signer.ledger {
                        LedgerKind::Sqlite
                    } else {
                        LedgerKind::Off
                    },
                    &binary,
                ))?);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no h2load rows");
                skipped.push(format!("{}: {e:#}", report::H2LOAD_ROWS));
            }
        }
    }
    if all && config.signer.no_ledger_concurrency > 0 && config.signer.ledger {
        info!("signer throughput without the ledger");
        signer.extend(rt.block_on(signer_throughput(
            &config,
            KeyType::P256,
            &[config.signer.no_ledger_concurrency],
            LedgerKind::Off,
        ))?);
    }
    if all && config.signer.postgres_concurrency > 0 {
        info!("signer throughput with the ledger in PostgreSQL");
        signer.extend(rt.block_on(signer_throughput(
            &config,
            KeyType::P256,
            &[config.signer.postgres_concurrency],
            LedgerKind::Postgres,
        ))?);
    }
    // After the signer rows, in the same run: its own meshward cells
    // interleaved with OpenBao's.
    let openbao = if openbao_on {
        info!("signer vs OpenBao PKI");
        openbao_section(&config, &rt, &mut skipped)
    } else {
        None
    };
    let mut restart = Vec::new();
    if all && config.restart.enabled {
        for &clients in std::iter::once(&config.restart.clients).chain(&config.restart.also_clients)
        {
            info!(clients, "mass restart");
            restart.push(rt.block_on(mass_restart(&config, clients))?);
        }
    }
    drop(rt);

    let signer_memory_limit = if all {
        match manifest::signer_memory_limit() {
            Ok(l) => Some(l),
            Err(e) => {
                skipped.push(format!("the signer StatefulSet's memory limit: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut machine = machine;
    machine.loadavg_end = report::loadavg();
    let results = Results {
        mode: if args.check { "check" } else { "full" },
        machine,
        openssl,
        ring_p256,
        signer,
        signer_max_concurrent_requests: config.signer.max_concurrent_requests,
        restart,
        signer_memory_limit,
        native,
        wasm,
        wasm_size,
        envoy_rules: if envoy_on {
            config.envoy.rules.clone()
        } else {
            Vec::new()
        },
        envoy_authz,
        openbao_asked: openbao_on,
        openbao,
        skipped,
    };
    let mut checks = report::checks(&results, &config.targets);
    match args.only {
        None => {}
        Some(Section::EnvoyAuthz) => checks.retain(report::Check::is_envoy),
        Some(Section::Openbao) => checks.retain(report::Check::is_openbao),
    }
    let output = match (&args.output, args.check, all || args.merge) {
        (Some(p), _, _) => Some(p.clone()),
        (None, false, true) => Some(PathBuf::from("BENCHMARKS.md")),
        (None, _, _) => None,
    };
    if let Some(path) = output {
        let text = match args.only {
            None => report::markdown(&results, &config, &checks),
            Some(section) if args.merge => {
                let existing = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {} to merge into", path.display()))?;
                report::merge_section(&existing, section, &results, &config, &checks)
            }
            Some(section) => report::markdown_alone(section, &results, &config, &checks),
        };
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        info!(path = %path.display(), "report written");
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({"results": results, "checks": checks});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut failed = 0;
    for c in &checks {
        let mark = if c.ok { "ok  " } else { "MISS" };
        println!("{mark} {}: {} (target {})", c.name, c.value, c.target);
        if !c.ok {
            failed += 1;
        }
    }
    for s in &results.skipped {
        println!("note: not measured: {s}");
    }
    if args.check && failed > 0 {
        println!("{failed} target(s) missed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
